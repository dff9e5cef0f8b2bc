"""Peak memory of a fused stage-2 pack at FB15k-237 size, against the estimate that splits packs.

Run from the repository root::

    .venv/bin/python benchmarks/bench_fused_memory.py [--members 1,4,16] [--limit-mib 8192]
        [--width 1024] [--out memory.json]

The graph is the ``fb15k-237-img`` synthetic preset's 14,541 entities and 237 relations with fewer
triples (``--train``, at least one per entity and relation, ``--valid``, ``--test``), and stage 2
trains on the first ``--queries`` of its training queries only (the pack's split is cut in the
child): a pack's memory grows with the entity count (every member diffuses a score per entity),
the denoiser's width and the batch, not with the number of queries, and few of them keep each
measurement to minutes. As in bench_scale.py, feature
extraction is not measured: random frozen features of the usual widths (384 text, 1280 image)
replace it. The stage-1 checkpoint (one epoch, untimed) is trained in a first subprocess; then each
pack size trains one stage-2 epoch with its final evaluation in a fresh subprocess of its own, with
the process's resident set size sampled every 2 ms (``psutil``) from just before
``train_fused`` to its end.

Reported per pack size: RSS before the pack, peak RSS during it, the pack's own peak (the
difference), and :func:`core.train.fused.member_memory_mib` times the number of members, the
estimate a memory limit is checked against; the measured growth per member (the slope between the
smallest and the largest pack) against the estimate per member. With ``--limit-mib`` the largest
pack runs again under that limit (split into groups that fit) and its peak is reported too.
A size whose estimate exceeds ``--headroom`` (default 0.8) of the memory available now is skipped
and says so.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("DIFFCOM_CACHE_DIR", tempfile.mkdtemp(prefix="bench-fused-memory-cache-"))

# The RSS sampler and the feature widths of the stage-2 scale benchmark (this folder).
from bench_scale import IMAGE_WIDTH, TEXT_WIDTH, _PeakRSS  # noqa: E402


def _spec(args):
    from core.data.synthetic import SyntheticSpec

    spec = SyntheticSpec.preset(
        "fb15k-237-img",
        num_train=args.train,
        num_valid=args.valid,
        num_test=args.test,
        images_per_entity=0,
    )
    return dataclasses.replace(spec, name="synthetic-fb15k-237-img-few-triples")


def _configs(args, folder: Path, members: int):
    from core.config import load_config

    base = [
        f"data.dataset={folder}",
        "features.text_encoder=none",
        "features.image_encoder=none",
        f"diffusion.denoiser_width={args.width}",
        "train.stage1_epochs=1",
        "train.stage2_epochs=1",
        "train.patience=0",
        "eval.report_official=false",
        "seed=0",
    ]
    stage1 = load_config(overrides=[*base, "train.stage2_epochs=0"])
    # Members differ in what a stage-2 study varies; the shape is shared.
    grid = [(k, w) for k in (3, 5, 10, 20) for w in (0.1, 0.3, 1.0, 3.0)]
    configs = [
        load_config(overrides=[*base, f"diffusion.steps={k}", f"loss.w_kl={w}"])
        for k, w in (grid * (members // len(grid) + 1))[:members]
    ]
    return stage1, configs


def _random_features(num_entities: int):
    import torch

    generator = torch.Generator().manual_seed(0)
    text = torch.nn.functional.normalize(
        torch.randn(num_entities, TEXT_WIDTH, generator=generator), dim=1
    )
    image = torch.randn(num_entities, IMAGE_WIDTH, generator=generator).abs()
    mask = torch.ones(num_entities, dtype=torch.bool)
    return SimpleNamespace(text=text, text_mask=mask, image=image, image_mask=mask)


def use_random_features(graph) -> None:
    """Give every model this process builds random frozen features instead of extracted ones."""
    import core.train.trainer as trainer

    features = _random_features(graph.num_entities)
    # build_model (the lone trainer's and the pack's) reads features through this name.
    trainer.extract_features = lambda graph, settings, progress=True: features


def cut_stage2_queries(count: int) -> None:
    """Train stage 2 (lone runs and packs) on the first ``count`` training queries only."""
    import core.train.fused as fused
    import core.train.trainer as trainer

    whole_split = trainer.training_split

    def fewer_queries(config, graph):
        split = whole_split(config, graph)
        return dataclasses.replace(split, stage2_queries=split.stage2_queries[:count])

    trainer.training_split = fused.training_split = fewer_queries


def _child(args) -> None:
    import psutil
    import torch

    import core.train.trainer as trainer
    from core.data.registry import synthetic_dataset_folder
    from core.train.fused import member_memory_mib, train_fused

    torch.set_num_threads(1)
    folder = synthetic_dataset_folder(_spec(args))
    stage1_config, configs = _configs(args, folder, args.child_members)
    graph = trainer.load_run_dataset(stage1_config)
    use_random_features(graph)
    scratch = Path(args.scratch)
    checkpoint = scratch / "stage1" / "checkpoints" / "last.pt"
    if args.child_members == 0:
        trainer.train(stage1_config, scratch / "stage1", progress=False)
        print("RESULT {}", flush=True)
        return

    cut_stage2_queries(args.queries)
    denoiser = trainer.build_model(configs[0], graph, progress=False).denoiser
    estimate = member_memory_mib(configs[0], denoiser)
    del denoiser
    outs = [
        scratch / f"pack-{len(configs)}-{args.child_limit}" / str(i) for i in range(len(configs))
    ]
    process = psutil.Process()
    before = process.memory_info().rss
    started = time.perf_counter()
    with _PeakRSS() as peak:
        results = train_fused(configs, outs, checkpoint, memory_limit_mib=args.child_limit or None)
    failed = [str(r) for r in results if isinstance(r, BaseException)]
    print(
        "RESULT "
        + json.dumps(
            {
                "members": len(configs),
                "memory_limit_mib": args.child_limit or None,
                "entities": graph.num_entities,
                "rss_before_mib": before / 2**20,
                "rss_peak_mib": peak.peak / 2**20,
                "pack_peak_mib": (peak.peak - before) / 2**20,
                "estimate_per_member_mib": estimate,
                "estimate_mib": estimate * len(configs),
                "seconds": time.perf_counter() - started,
                "failed": failed,
            }
        ),
        flush=True,
    )


def _run_child(args, members: int, limit: float = 0.0) -> dict:
    command = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--child-members",
        str(members),
        "--child-limit",
        str(limit),
        "--scratch",
        args.scratch,
        "--width",
        str(args.width),
        "--train",
        str(args.train),
        "--valid",
        str(args.valid),
        "--test",
        str(args.test),
        "--queries",
        str(args.queries),
    ]
    completed = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, check=False)
    if completed.returncode != 0:
        raise SystemExit(
            f"pack of {members} failed (exit {completed.returncode}):\n{completed.stderr[-4000:]}"
        )
    line = next(x for x in completed.stdout.splitlines() if x.startswith("RESULT "))
    return json.loads(line[len("RESULT ") :])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--members", default="1,4,16", help="pack sizes, comma-separated")
    parser.add_argument(
        "--limit-mib", type=float, default=0.0, help="also run the largest under it"
    )
    parser.add_argument("--width", type=int, default=1024, help="diffusion.denoiser_width")
    parser.add_argument("--train", type=int, default=15000)
    parser.add_argument("--valid", type=int, default=100)
    parser.add_argument("--test", type=int, default=100)
    parser.add_argument("--queries", type=int, default=512, help="stage-2 training queries")
    parser.add_argument(
        "--headroom",
        type=float,
        default=0.8,
        help="skip a size whose estimate exceeds this share of the memory available (the estimate "
        "is about 9%% above the measured slope; 1.0 on an otherwise idle machine)",
    )
    parser.add_argument("--out", type=Path)
    parser.add_argument("--scratch", default="")
    parser.add_argument("--child-members", type=int, default=-1, help=argparse.SUPPRESS)
    parser.add_argument("--child-limit", type=float, default=0.0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child_members >= 0:
        _child(args)
        return

    import psutil

    sizes = sorted(int(x) for x in args.members.split(","))
    with tempfile.TemporaryDirectory(prefix="bench-fused-memory-") as scratch:
        args.scratch = scratch
        _run_child(args, 0)  # the stage-1 checkpoint
        rows = []
        for members in sizes:
            available = psutil.virtual_memory().available / 2**20
            if rows and rows[0]["estimate_per_member_mib"] * members > args.headroom * available:
                rows.append({"members": members, "skipped": f"{available:,.0f} MiB available"})
                continue
            rows.append(_run_child(args, members))
        if args.limit_mib:
            rows.append(_run_child(args, sizes[-1], args.limit_mib))
    measured = [r for r in rows if "pack_peak_mib" in r and not r["memory_limit_mib"]]
    slope = None
    if len(measured) >= 2:
        first, last = measured[0], measured[-1]
        slope = (last["pack_peak_mib"] - first["pack_peak_mib"]) / (
            last["members"] - first["members"]
        )
    report = {
        "rows": rows,
        "measured_mib_per_member": slope,
        "denoiser_width": args.width,
        "triples": {"train": args.train, "valid": args.valid, "test": args.test},
        "stage2_queries": args.queries,
        "machine": platform.processor() or platform.machine(),
        "load_average_1min": round(os.getloadavg()[0], 2),
    }
    print(json.dumps(report, indent=2))
    for row in rows:
        if "skipped" in row:
            print(f"{row['members']:>3} members: skipped ({row['skipped']})")
            continue
        limit = (
            f" under a {row['memory_limit_mib']:,.0f} MiB limit" if row["memory_limit_mib"] else ""
        )
        print(
            f"{row['members']:>3} members{limit}: pack peak {row['pack_peak_mib']:,.0f} MiB, "
            f"estimate {row['estimate_mib']:,.0f} MiB, {row['seconds']:.0f} s"
        )
    if slope is not None:
        print(
            f"per member: measured {slope:,.0f} MiB, estimated "
            f"{measured[0]['estimate_per_member_mib']:,.0f} MiB"
        )
    if args.out:
        args.out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
