"""A K-sensitivity study on UMLS: this platform (stage-1 reuse) against plain Ray Tune, one run.

Run from the repository root::

    .venv/bin/python benchmarks/bench_sweep.py [--steps 5 10 20 40] [--seeds 0 1 2 3]
        [--stage1-epochs 20] [--stage2-epochs 5] [--out sweep.json]

Both sides run the same trials (every K x every seed: 16 by default), the demo config
(``core/configs/demo.yaml``: 20 stage-1 and 5 stage-2 epochs unless changed above) with early
stopping and the official min-of-S protocol switched off (neither is what is compared), on a local Ray with this machine's CPUs, one CPU per trial:

(a) ``diffcom sweep launch`` of a sensitivity study (``sweeps.ray_adapter.launch``): trials with
    the same seed share one stage-1 run, trained once.
(b) a hand-written Ray Tune script, as people write them today: ``tune.Tuner`` over a grid of K
    and seed whose function trainable calls ``core.train.trainer.train`` into its own folder, so
    every trial trains its own stage 1.

Reported: the wall time of each study and the ratio (b)/(a); and Ray's overhead per trial:
``(wall x concurrent trials - sum of trial wall times) / trials``, where a trial's wall time is
measured inside the trial (data loading, stage 1 or waiting for it, stage 2, evaluation).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _overrides(args) -> dict:
    return {
        "train.stage1_epochs": args.stage1_epochs,
        "train.stage2_epochs": args.stage2_epochs,
        "train.patience": 0,
        "eval.report_official": False,
    }


def _platform_side(args, scratch: Path) -> dict:
    from sweeps.experiment import read_json
    from sweeps.ray_adapter import launch

    study = scratch / "bench-k.yaml"
    study.write_text(
        "# diffcom sweep launch benchmarks/bench_sweep.py (generated)\n"
        + yaml.safe_dump(
            {
                "name": "bench-k",
                "kind": "sensitivity",
                "base_config": str(ROOT / "core" / "configs" / "demo.yaml"),
                "overrides": _overrides(args),
                "seeds": list(args.seeds),
                "resources": {"cpus": 1, "gpus": 0, "workers": 1},
                "defaults": {"diffusion.steps": args.steps[0]},
                "axes": {"diffusion.steps": list(args.steps)},
            },
            sort_keys=False,
        )
    )
    started = time.perf_counter()
    folder = launch(study, storage=scratch / "platform", verbose=0)
    wall = time.perf_counter() - started
    statuses = [read_json(p) for p in folder.glob("runs/**/status.json")]
    trained = sum(
        1
        for line in (folder / "stage1").glob("*/events.jsonl")
        for event in line.read_text().splitlines()
        if json.loads(event)["event"] == "trained"
    )
    return {
        "wall_seconds": wall,
        "trial_wall_seconds": [s["wall_seconds"] for s in statuses],
        "finished": sum(s["state"] == "finished" for s in statuses),
        "stage1_trainings": trained,
        "test_mrr": _test_mrr(folder.glob("runs/**/results.json")),
    }


def _naive_trial(config: dict) -> None:
    """What a hand-rolled Ray Tune script does: one full run per trial, stage 1 included."""
    import torch
    from ray import tune

    from core.config import load_config
    from core.train.trainer import train

    torch.set_num_threads(1)
    started = time.perf_counter()
    overrides = [f"{k}={v}" for k, v in config["overrides"].items()]
    run_config = load_config(
        ROOT / "core" / "configs" / "demo.yaml",
        [*overrides, f"diffusion.steps={config['steps']}", f"seed={config['seed']}"],
    )
    folder = Path(config["root"]) / f"k{config['steps']}-seed{config['seed']}"
    results = train(run_config, folder, progress=False)
    tune.report(
        {
            "valid_mrr": results["valid"]["clean"]["mrr"],
            "test_mrr": results["test"]["clean"]["mrr"],
            "trial_wall_seconds": time.perf_counter() - started,
        }
    )


def _naive_side(args, scratch: Path) -> dict:
    import ray
    from ray import tune

    root = scratch / "naive-runs"
    tuner = tune.Tuner(
        tune.with_resources(_naive_trial, {"cpu": 1}),
        param_space={
            "steps": tune.grid_search(list(args.steps)),
            "seed": tune.grid_search(list(args.seeds)),
            "overrides": _overrides(args),
            "root": str(root),
        },
        tune_config=tune.TuneConfig(metric="valid_mrr", mode="max"),
        run_config=tune.RunConfig(storage_path=str(scratch / "naive"), name="naive", verbose=0),
    )
    started = time.perf_counter()
    grid = tuner.fit()
    wall = time.perf_counter() - started
    frame = grid.get_dataframe()
    ray.shutdown()
    return {
        "wall_seconds": wall,
        "trial_wall_seconds": frame["trial_wall_seconds"].tolist(),
        "finished": int(frame["test_mrr"].notna().sum()),
        "stage1_trainings": len(frame),
        "test_mrr": float(frame["test_mrr"].mean()),
    }


def _test_mrr(paths) -> float:
    values = [json.loads(Path(p).read_text())["test"]["clean"]["mrr"] for p in paths]
    return sum(values) / len(values)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, nargs="+", default=[5, 10, 20, 40])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3])
    parser.add_argument("--stage1-epochs", type=int, default=20)
    parser.add_argument("--stage2-epochs", type=int, default=5)
    parser.add_argument("--out", type=Path, help="also write the numbers to this JSON file")
    args = parser.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")

    import ray

    scratch = Path(tempfile.mkdtemp(prefix="bench-sweep-"))
    try:
        concurrency = os.cpu_count()
        platform_side = _platform_side(args, scratch)
        ray.shutdown()
        naive = _naive_side(args, scratch)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)

    trials = len(args.steps) * len(args.seeds)
    print(f"{trials} trials (K in {args.steps} x seeds {args.seeds}) on UMLS, {concurrency} CPUs")
    print(
        f"{'side':<24} {'wall s':>8} {'stage-1 runs':>12} {'overhead s/trial':>17} {'test MRR':>9}"
    )
    rows = {}
    for label, side in (("(a) diffcom sweep", platform_side), ("(b) plain Ray Tune", naive)):
        busy = min(concurrency, trials)
        overhead = (side["wall_seconds"] * busy - sum(side["trial_wall_seconds"])) / trials
        side["overhead_seconds_per_trial"] = overhead
        rows[label] = side
        print(
            f"{label:<24} {side['wall_seconds']:>8.1f} {side['stage1_trainings']:>12} "
            f"{overhead:>17.2f} {side['test_mrr']:>9.4f}"
        )
    ratio = naive["wall_seconds"] / platform_side["wall_seconds"]
    print(f"speed-up of (a) over (b): {ratio:.2f}x (target >= 3x)")
    if args.out is None:
        return
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps(
            {
                "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                "machine": f"{platform.machine()} {concurrency} CPUs, {platform.platform()}",
                "command": " ".join(sys.argv),
                "trials": trials,
                "sides": rows,
                "ratio": ratio,
            },
            indent=2,
        )
        + "\n"
    )


if __name__ == "__main__":
    main()
