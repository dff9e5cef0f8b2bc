"""Fused stage 2 against lone stage-2 runs: N members from one stage-1 checkpoint, in one process.

Run from the repository root::

    .venv/bin/python benchmarks/bench_fused.py [--dataset umls] [--members 16]
        [--stage1-epochs 5] [--stage2-epochs 3] [--width 256] [--plain]
        [--scale fb15k-237 --queries 2048] [--text-encoder minilm] [--precision no|bf16]
        [--threads 1] [--count-ops] [--out fused.json]

Trains one stage 1 (not timed), then the same N stage-2 configs (a grid over K, ``loss.w_kl`` and
``train.lr_stage2``) two or three ways, one after the other in this process, on the GPU when torch
sees one (as the trainer does), else on ``--threads`` torch threads:

(a) lone: ``train(config, out, stage1_checkpoint=...)`` once per member, one after the other
    (what a sweep with stage-1 reuse runs, one trial after another);
(b) fused: one ``train_fused(configs, outs, stage1_checkpoint)``;
(c) with ``--plain``: ``train(config, out)`` once per member, each training its own stage 1 too
    (what a plain Ray Tune script runs, without Ray's own overhead).

``--scale fb15k-237`` replaces the dataset by the ``fb15k-237-img`` synthetic preset's 14,541
entities and 237 relations with ``--train`` triples, random frozen features of the usual widths
(as ``bench_scale.py`` injects them) and stage 2 cut to its first ``--queries`` training queries:
what a member costs there grows with the entity count, not with the query count.

Reported: the wall time of each side, the ratios, trials per minute; on a GPU the fused call's peak
GPU memory; with ``--count-ops`` the operators and device reads per fused training batch (each
operator a kernel launch on a GPU, each read a wait); with ``--profile`` (the default on a CPU)
where the fused time went (set-up, training steps, per-epoch validation, final evaluation), from a
profile of the fused call by function (with ``--out``, the whole profile in ``OUT.prof``); and how
far every member's test metrics are from its lone twin's (equal, bitwise, on one CPU thread; GPU
kernels and bf16 reduce in other orders).
"""

from __future__ import annotations

import argparse
import cProfile
import dataclasses
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
sys.path.insert(0, str(ROOT / "benchmarks"))
os.environ.setdefault("OMP_NUM_THREADS", "1")


def _configs(args, dataset: str):
    from core.config import load_config

    base = [
        f"data.dataset={dataset}",
        f"features.text_encoder={args.text_encoder}",
        "features.image_encoder=none",
        f"train.stage1_epochs={args.stage1_epochs}",
        f"train.stage2_epochs={args.stage2_epochs}",
        f"train.mixed_precision={args.precision}",
        f"diffusion.denoiser_width={args.width}",
        "train.patience=0",
        "eval.report_official=false",
        "seed=0",
    ]
    steps, weights, rates = [3, 5, 10, 20], [0.1, 1.0], [3e-4, 1e-3]
    grid = list(itertools.product(steps, weights, rates))
    grid = (grid * (args.members // len(grid) + 1))[: args.members]
    members = [
        load_config(
            overrides=[*base, f"diffusion.steps={k}", f"loss.w_kl={w}", f"train.lr_stage2={lr}"]
        )
        for k, w, lr in grid
    ]
    return load_config(overrides=[*base, "train.stage2_epochs=0"]), members


def _at_scale(args) -> str:
    """The FB15k-237-sized synthetic graph with random frozen features; returns its folder."""
    import bench_fused_memory

    from core.data.registry import synthetic_dataset_folder
    from core.train.trainer import load_run_dataset

    folder = synthetic_dataset_folder(bench_fused_memory._spec(args))
    bench_fused_memory.use_random_features(load_run_dataset(_configs(args, str(folder))[0]))
    bench_fused_memory.cut_stage2_queries(args.queries)
    return str(folder)


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
        "step": "  of which the optimizer steps (all members)",
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


def _count_training_ops(members, checkpoint: Path, scratch: Path) -> dict:
    """Operators dispatched and device reads per training batch of one fused stage-2 epoch.

    On a GPU each operator is at least one kernel launch and each read of a device value into
    Python (``aten::_local_scalar_dense``: ``.item()``, ``.tolist()``, ``if tensor``) a wait for
    the device; a pack whose step is small is bound by these, not by its arithmetic. Counted with
    ``torch.profiler`` on the device the pack runs on, over a fresh pack of the same members.
    """
    import torch
    from torch.profiler import ProfilerActivity, profile

    from core.train import fused

    counted: dict = {}
    real_epoch = fused._train_epoch

    def profiled_epoch(*args):  # (active, ..., queries, progress): also older signatures
        if counted:
            return real_epoch(*args)
        with profile(activities=[ProfilerActivity.CPU]) as profiler:
            real_epoch(*args)
        names = [event.name for event in profiler.events()]
        config, queries = args[0][0].config, args[-2]
        batches = -(-len(queries) // config.train.batch_size)
        counted["operators_per_batch"] = round(
            sum(name.startswith("aten::") for name in names) / batches
        )
        counted["device_reads_per_batch"] = round(
            names.count("aten::_local_scalar_dense") / batches, 1
        )
        counted["batches"] = batches
        return None

    fused._train_epoch = profiled_epoch
    try:
        one_epoch = [
            dataclasses.replace(config, train=dataclasses.replace(config.train, stage2_epochs=1))
            for config in members
        ]
        outs = [scratch / "count" / str(index) for index in range(len(members))]
        fused.train_fused(one_epoch, outs, checkpoint)
    finally:
        fused._train_epoch = real_epoch
    counted["members"] = len(members)
    counted["torch_threads"] = torch.get_num_threads()
    return counted


def _trials_per_minute(count: int, seconds: float) -> float:
    return round(60.0 * count / seconds, 2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="umls")
    parser.add_argument("--members", type=int, default=16)
    parser.add_argument("--stage1-epochs", type=int, default=5)
    parser.add_argument("--stage2-epochs", type=int, default=3)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--text-encoder", default="minilm", help="features.text_encoder")
    parser.add_argument("--precision", default="no", choices=("no", "bf16"))
    parser.add_argument("--plain", action="store_true", help="also time (c): no stage-1 reuse")
    parser.add_argument("--scale", choices=("fb15k-237",), help="a synthetic graph of this size")
    parser.add_argument("--train", type=int, default=15000, help="with --scale: training triples")
    parser.add_argument("--valid", type=int, default=200, help="with --scale: valid triples")
    parser.add_argument("--test", type=int, default=200, help="with --scale: test triples")
    parser.add_argument("--queries", type=int, default=2048, help="with --scale: stage-2 queries")
    parser.add_argument("--threads", type=int, default=1, help="torch threads on a CPU")
    parser.add_argument(
        "--profile",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="profile the fused call (default: on a CPU only; it slows GPU launches)",
    )
    parser.add_argument(
        "--count-ops",
        action="store_true",
        help="also count operators and device reads per fused training batch (one more epoch)",
    )
    parser.add_argument(
        "--out", type=Path, help="write the report here (and a profiled run's stats to OUT.prof)"
    )
    args = parser.parse_args()
    if args.plain and args.scale:
        # --scale cuts stage 2 to --queries but not stage 1: (c) would be mostly stage-1 epochs.
        parser.error("--plain compares whole runs; with --scale stage 2 is cut, so leave one out")

    import torch

    from core.train.fused import train_fused
    from core.train.trainer import train

    torch.set_num_threads(args.threads)
    cuda = torch.cuda.is_available()
    profile_fused = (not cuda) if args.profile is None else args.profile
    load_at_start = round(os.getloadavg()[0], 2)
    dataset = _at_scale(args) if args.scale else args.dataset
    stage1_config, members = _configs(args, dataset)

    def synchronised() -> float:
        if cuda:
            torch.cuda.synchronize()
        return time.perf_counter()

    with tempfile.TemporaryDirectory(prefix="bench-fused-") as scratch:
        scratch = Path(scratch)
        started = synchronised()
        train(stage1_config, scratch / "stage1", progress=False)
        stage1_seconds = synchronised() - started
        checkpoint = scratch / "stage1" / "checkpoints" / "last.pt"

        started = synchronised()
        for index, config in enumerate(members):
            train(
                config, scratch / "lone" / str(index), stage1_checkpoint=checkpoint, progress=False
            )
        lone_seconds = synchronised() - started

        outs = [scratch / "fused" / str(index) for index in range(len(members))]
        profile = cProfile.Profile()
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        started = synchronised()
        if profile_fused:
            profile.enable()
        results = train_fused(members, outs, checkpoint)
        if profile_fused:
            profile.disable()
        fused_seconds = synchronised() - started
        failed = [str(result) for result in results if isinstance(result, BaseException)]
        fused_gpu_peak = torch.cuda.max_memory_allocated() / 2**20 if cuda else None

        operators = _count_training_ops(members, checkpoint, scratch) if args.count_ops else None

        plain_seconds = None
        if args.plain:
            started = synchronised()
            for index, config in enumerate(members):
                train(config, scratch / "plain" / str(index), progress=False)
            plain_seconds = synchronised() - started

        pairs = [
            (_test_metrics(out), _test_metrics(scratch / "lone" / str(index)))
            for index, out in enumerate(outs)
        ]
    differences = [abs(fused["mrr"] - lone["mrr"]) for fused, lone in pairs]
    report = {
        "dataset": args.scale or args.dataset,
        "members": len(members),
        "stage1_epochs": args.stage1_epochs,
        "stage2_epochs": args.stage2_epochs,
        "denoiser_width": args.width,
        "precision": args.precision,
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "threads": torch.get_num_threads(),
        "stage1_seconds": round(stage1_seconds, 2),
        "lone_seconds": round(lone_seconds, 2),
        "fused_seconds": round(fused_seconds, 2),
        "plain_seconds": None if plain_seconds is None else round(plain_seconds, 2),
        "ratio": round(lone_seconds / fused_seconds, 2),
        "plain_ratio": None if plain_seconds is None else round(plain_seconds / fused_seconds, 2),
        "trials_per_minute": {
            "lone": _trials_per_minute(len(members), lone_seconds),
            "fused": _trials_per_minute(len(members), fused_seconds),
            **({"plain": _trials_per_minute(len(members), plain_seconds)} if plain_seconds else {}),
        },
        "fused_gpu_peak_mib": None if fused_gpu_peak is None else round(fused_gpu_peak),
        "fused_failed_members": failed,
        "fused_parts_seconds": _where_fused_time_goes(profile) if profile_fused else None,
        "fused_operators": operators,
        "test_metrics_equal": all(fused == lone for fused, lone in pairs),
        "test_mrr_max_abs_difference": max(differences),
        # Other work on the machine slows both sides, not necessarily equally.
        "load_average_1min": {"start": load_at_start, "end": round(os.getloadavg()[0], 2)},
        "machine": platform.processor() or platform.machine(),
        "torch": torch.__version__,
    }
    if args.scale:
        report["scale"] = {
            "triples": {"train": args.train, "valid": args.valid, "test": args.test},
            "stage2_queries": args.queries,
        }
    print(json.dumps(report, indent=2))
    print(f"ratio lone/fused: {report['ratio']}x")
    if plain_seconds is not None:
        print(f"ratio plain/fused: {report['plain_ratio']}x")
    if args.out:
        args.out.write_text(json.dumps(report, indent=2) + "\n")
        if profile_fused:  # the whole profile, for `python -m pstats OUT.prof`
            profile.dump_stats(args.out.with_name(args.out.name + ".prof"))


if __name__ == "__main__":
    main()
