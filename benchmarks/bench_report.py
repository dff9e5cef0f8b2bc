"""Report generation time for 200 trials (synthetic result folders in the real layout).

Run from the repository root::

    .venv/bin/python benchmarks/bench_report.py [--repeats 3] [--png]

Writes three experiments whose folders have the layout the sweep platform writes (``experiment.json``
and per run ``status.json``, ``trial.json``, ``config.json``, ``metrics.jsonl``, ``results.json``,
``ranks_{valid,test}.npz`` and, for search points, ``point.json``), with made-up metrics:

* an ablation: 10 variants x 5 seeds = 50 runs (per-query ranks on 1,322 test queries, UMLS' size,
  so the MRR column runs the paired bootstrap);
* a sensitivity study: 6 axes x 5 values x 3 seeds = 90 runs;
* a search: 60 points, one seed each.

Then times ``analysis.report.build_report`` on all three (tables, figures, HTML; PNGs only with
``--png``) and prints the median over ``--repeats`` runs. Target: under 10 s.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from analysis.report import build_report  # noqa: E402
from core.config import ExperimentConfig, config_to_dict  # noqa: E402

AXES = {
    "diffusion.steps": [5, 10, 20, 40, 100],
    "diffusion.denoiser_width": [128, 256, 512, 1024, 2048],
    "diffusion.denoiser_depth": [1, 2, 3, 4, 5],
    "structure.lambda_fusion": [0.1, 0.3, 0.5, 0.7, 0.9],
    "loss.w_kl": [0.0, 0.25, 0.5, 1.0, 2.0],
    "loss.w_bce": [0.0, 0.25, 0.5, 1.0, 2.0],
}


def _write(path: Path, data) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))


def _run(folder: Path, name: str, seed: int, changes: dict, quality: float, rng) -> None:
    run = folder / "runs" / name
    tree = config_to_dict(ExperimentConfig())
    tree["seed"] = seed
    for key, value in changes.items():
        section, field = key.split(".")
        tree[section][field] = value
    _write(run / "config.json", tree)
    _write(
        run / "trial.json",
        {
            "config": tree,
            "seed": seed,
            "dataset": "umls",
            "dataset_hash": "f" * 64,
            "code": {"revision": "bench"},
        },
    )
    _write(
        run / "status.json",
        {
            "state": "finished",
            "seed": seed,
            "attempts": [{}],
            "wall_seconds": 60.0,
            "stage1": {"reused": True},
        },
    )
    epochs = [
        {"stage": 2, "epoch": e, "loss": 1 / e, "valid.clean.mrr": quality - 0.05 / e}
        for e in range(1, 26)
    ]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in epochs))

    def metrics(shift: float) -> dict:
        mrr = float(np.clip(quality + shift + rng.normal(0, 0.01), 0.01, 1))
        return {
            "mr": 1 / mrr,
            "mrr": mrr,
            "hits@1": mrr * 0.8,
            "hits@3": mrr * 1.1,
            "hits@10": min(1, mrr * 1.3),
        }

    results = {"dataset": "umls", "final_stage": 2, "timings": {"train_seconds": 55.0}}
    for split in ("valid", "test"):
        results[split] = {
            "clean": metrics(0),
            "stage1_clean": metrics(-0.01),
            "official-min-of-20": metrics(0.15),
            "inference_ms_per_query": 0.1 + 0.01 * changes.get("diffusion.steps", 20),
        }
        ranks = rng.geometric(min(0.99, quality), size=1322)
        np.savez_compressed(
            run / f"ranks_{split}.npz", queries=np.zeros((1322, 3), np.int64), realistic=ranks
        )
    _write(run / "results.json", results)
    if name.startswith("search/"):
        _write(run / "point.json", changes)


def _experiments(root: Path) -> list[Path]:
    rng = np.random.default_rng(0)
    folders = []
    for name, kind in (
        ("ablation", "ablation"),
        ("sensitivity", "sensitivity"),
        ("search", "search"),
    ):
        folder = root / name
        _write(
            folder / "experiment.json",
            {
                "name": name,
                "kind": kind,
                "metric": "valid.clean.mrr",
                "mode": "max",
                "seeds": [0, 1, 2, 3, 4],
            },
        )
        folders.append(folder)
    for variant in range(10):
        for seed in range(5):
            _run(
                root / "ablation",
                f"ablation/{'full' if variant == 0 else f'v{variant}'}/seed-{seed}",
                seed,
                {},
                0.7 - 0.01 * variant,
                rng,
            )
    for axis, values in AXES.items():
        for value in values:
            for seed in range(3):
                _run(
                    root / "sensitivity",
                    f"sensitivity/{axis}={value}/seed-{seed}",
                    seed,
                    {axis: value},
                    0.7,
                    rng,
                )
    for point in range(60):
        changes = {
            "diffusion.steps": int(rng.integers(5, 100)),
            "loss.w_kl": float(rng.uniform(0.1, 2)),
        }
        _run(
            root / "search",
            f"search/p{point:03d}/seed-0",
            0,
            changes,
            0.6 + 0.001 * changes["diffusion.steps"],
            rng,
        )
    return folders


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--png", action="store_true", help="also render PNGs (needs Chromium)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        folders = _experiments(Path(scratch) / "experiments")
        runs = sum(1 for folder in folders for _ in folder.glob("runs/**/results.json"))
        seconds = []
        for repeat in range(args.repeats):
            started = time.perf_counter()
            report = build_report(folders, Path(scratch) / f"report-{repeat}", png=args.png)
            seconds.append(time.perf_counter() - started)
        size = report.html.stat().st_size / 2**20
    print(f"{runs} runs in 3 experiments; {platform.machine()}, {platform.python_version()}")
    print(
        f"report ({'with' if args.png else 'without'} PNGs): median {statistics.median(seconds):.2f} s over "
        f"{args.repeats} runs ({', '.join(f'{s:.2f}' for s in seconds)}); report.html {size:.1f} MiB; "
        f"target < 10 s"
    )
    for note in report.notes:
        print(f"note: {note}")


if __name__ == "__main__":
    main()
