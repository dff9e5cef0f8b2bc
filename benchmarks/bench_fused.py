"""Fused stage 2 against lone stage-2 runs: N members from one stage-1 checkpoint, one thread.

Run from the repository root::

    .venv/bin/python benchmarks/bench_fused.py [--dataset umls] [--members 16]
        [--stage1-epochs 5] [--stage2-epochs 3] [--width 256] [--out fused.json]

Trains one stage 1 (not timed), then the same N stage-2 configs (a grid over K, ``loss.w_kl`` and
``train.lr_stage2``) two ways in this process on one torch thread:

(a) lone: ``train(config, out, stage1_checkpoint=...)`` once per member, one after the other;
(b) fused: one ``train_fused(configs, outs, stage1_checkpoint)``.

Reported: the wall time of each side and the ratio (a)/(b); for (b), where its time went
(set-up, training steps, per-epoch validation, final evaluation), from a profile of the fused call
by function; and whether every member's test metrics equal its lone twin's.
"""

from __future__ import annotations

import argparse
import cProfile
import itertools
import json
import os
import platform
import pstats
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("OMP_NUM_THREADS", "1")


def _configs(args):
    from core.config import load_config

    base = [
        f"data.dataset={args.dataset}",
        "features.image_encoder=none",
        f"train.stage1_epochs={args.stage1_epochs}",
        f"train.stage2_epochs={args.stage2_epochs}",
        f"diffusion.denoiser_width={args.width}",
        "train.patience=0",
        "eval.report_official=false",
        "seed=0",
    ]
    steps, weights, rates = [3, 5, 10, 20], [0.1, 1.0], [3e-4, 1e-3]
    grid = list(itertools.product(steps, weights, rates))[: args.members]
    members = [
        load_config(
            overrides=[*base, f"diffusion.steps={k}", f"loss.w_kl={w}", f"train.lr_stage2={lr}"]
        )
        for k, w, lr in grid
    ]
    return load_config(overrides=[*base, "train.stage2_epochs=0"]), members


def _test_metrics(run: Path) -> dict:
    return json.loads((run / "results.json").read_text())["test"]["clean"]


def _where_fused_time_goes(profile: cProfile.Profile) -> dict:
    """Cumulative seconds of the fused call's parts (they nest: training includes its steps)."""
    stats = pstats.Stats(profile)
    parts = {
        "_open_member": "member set-up (checkpoint, start evaluation)",
        "_start_stage2": "optimizers and stage-2 start evaluation",
        "_train_epoch": "training epochs (all members)",
        "backward": "  of which backward",
        "step": "  of which the members' AdamW steps",
        "_validate": "per-epoch validation (all members ranked at once)",
        "_finish_member_epoch": "per-epoch selection, metrics and checkpoints",
        "save_checkpoint": "  of which writing checkpoints",
        "_final_evaluation": "final evaluation and results",
        "_rank_pack": "batched ranking (validation and final, all members)",
        "_stacked_denoiser": "batched denoiser forward (training and ranking)",
        "build_model": "building the shared model",
    }
    seconds = {}
    for (file, _, name), row in stats.stats.items():
        known = ("fused" in file or "trainer" in file or "checkpoint" in file) or (
            name in ("backward", "step") and ("_tensor" in file or "adam" in file)
        )
        if name in parts and known:
            seconds[parts[name]] = seconds.get(parts[name], 0.0) + row[3]
    return {key: round(value, 2) for key, value in seconds.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="umls")
    parser.add_argument("--members", type=int, default=16)
    parser.add_argument("--stage1-epochs", type=int, default=5)
    parser.add_argument("--stage2-epochs", type=int, default=3)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()

    import torch

    from core.train.fused import train_fused
    from core.train.trainer import train

    torch.set_num_threads(1)
    load_at_start = round(os.getloadavg()[0], 2)
    stage1_config, members = _configs(args)
    with tempfile.TemporaryDirectory(prefix="bench-fused-") as scratch:
        scratch = Path(scratch)
        train(stage1_config, scratch / "stage1", progress=False)
        checkpoint = scratch / "stage1" / "checkpoints" / "last.pt"

        started = time.perf_counter()
        for index, config in enumerate(members):
            train(
                config, scratch / "lone" / str(index), stage1_checkpoint=checkpoint, progress=False
            )
        lone_seconds = time.perf_counter() - started

        outs = [scratch / "fused" / str(index) for index in range(len(members))]
        profile = cProfile.Profile()
        started = time.perf_counter()
        profile.enable()
        train_fused(members, outs, checkpoint)
        profile.disable()
        fused_seconds = time.perf_counter() - started

        equal = [
            _test_metrics(out) == _test_metrics(scratch / "lone" / str(index))
            for index, out in enumerate(outs)
        ]
    report = {
        "dataset": args.dataset,
        "members": len(members),
        "stage2_epochs": args.stage2_epochs,
        "denoiser_width": args.width,
        "threads": torch.get_num_threads(),
        "lone_seconds": round(lone_seconds, 2),
        "fused_seconds": round(fused_seconds, 2),
        "ratio": round(lone_seconds / fused_seconds, 2),
        "fused_parts_seconds": _where_fused_time_goes(profile),
        "test_metrics_equal": all(equal),
        # Other work on the machine slows both sides, not necessarily equally.
        "load_average_1min": {"start": load_at_start, "end": round(os.getloadavg()[0], 2)},
        "machine": platform.processor() or platform.machine(),
        "torch": torch.__version__,
    }
    print(json.dumps(report, indent=2))
    print(f"ratio lone/fused: {report['ratio']}x")
    if args.out:
        args.out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
