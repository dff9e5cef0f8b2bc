"""A 16-trial stage-2 study on UMLS three ways in one run: fused packs, stage-1 reuse, plain Ray Tune.

Run from the repository root::

    .venv/bin/python benchmarks/bench_sweep.py [--steps 5 10 20 40] [--w-kl 0.1 0.3 1 3]
        [--seeds 0] [--stage1-epochs 20] [--stage2-epochs 10] [--pack 16] [--out sweep.json]

Every side runs the same trials (every K x every ``loss.w_kl`` x every seed: 16 by default), the
demo config (``core/configs/demo.yaml``, the paper's model with MGAT) with the epochs above, early
stopping and the official min-of-S protocol switched off (neither is what is compared), on a
local Ray with this machine's CPUs, one CPU per trial:

(a) ``diffcom sweep launch`` of the grid with ``pack: N``: trials of one seed share one stage-1
    run, trained once, and train their stage 2 as fused packs of up to N (``sweeps.pack``);
(b) the same launch with ``pack: 1``: stage-1 reuse, every stage 2 its own trial (the platform
    before fused trials);
(c) a hand-written Ray Tune script, as people write them today: ``tune.Tuner`` over the grid
    whose function trainable calls ``core.train.trainer.train`` into its own folder, so every
    trial trains its own stage 1.

Reported: the wall time of each study, the ratios (c)/(a) and (b)/(a), trials per minute, and
Ray's overhead per trial (``(wall x concurrent trials - sum of trial wall times) / trials``, a
trial's wall time measured inside it); and whether every trial's test metrics under (a) equal its
unfused twin's under (b), within 1e-4 (several intra-op threads may sum in another order).
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


def _platform_side(args, scratch: Path, pack: int) -> dict:
    from sweeps.experiment import read_json
    from sweeps.ray_adapter import launch

    study = scratch / f"bench-grid-pack{pack}.yaml"
    study.write_text(
        "# diffcom sweep launch benchmarks/bench_sweep.py (generated)\n"
        + yaml.safe_dump(
            {
                "name": f"bench-grid-pack{pack}",
                "kind": "search",
                "base_config": str(ROOT / "core" / "configs" / "demo.yaml"),
                "overrides": _overrides(args),
                "seeds": list(args.seeds),
                "resources": {"cpus": 1, "gpus": 0, "workers": 1},
                "pack": pack,
                "search": {
                    "algorithm": "grid",
                    "space": {
                        "diffusion.steps": {"type": "grid", "values": list(args.steps)},
                        "loss.w_kl": {"type": "grid", "values": list(args.w_kl)},
                    },
                },
            },
            sort_keys=False,
        )
    )
    started = time.perf_counter()
    folder = launch(study, storage=scratch / f"platform-pack{pack}", verbose=0)
    wall = time.perf_counter() - started
    statuses = [read_json(p) for p in folder.glob("runs/**/status.json")]
    trained = sum(
        1
        for line in (folder / "stage1").glob("*/events.jsonl")
        for event in line.read_text().splitlines()
        if json.loads(event)["event"] == "trained"
    )
    results = {
        str(p.parent.relative_to(folder / "runs")): json.loads(p.read_text())["test"]["clean"]
        for p in folder.glob("runs/**/results.json")
    }
    return {
        "wall_seconds": wall,
        "trial_wall_seconds": _trial_walls(statuses),
        "finished": sum(s["state"] == "finished" for s in statuses),
        "stage1_trainings": trained,
        "packs": len({s["fused"]["pack"] for s in statuses if "fused" in s}),
        "test_mrr": sum(r["mrr"] for r in results.values()) / max(len(results), 1),
        "test_metrics": results,
    }


def _trial_walls(statuses: list[dict]) -> list[float]:
    """Each Tune trial's wall time: a lone run's own, a pack's once (its members finish at
    different times; the last one's is the pack's)."""
    walls: dict[str, float] = {}
    for index, status in enumerate(statuses):
        unit = status["fused"]["pack"] if "fused" in status else str(index)
        walls[unit] = max(walls.get(unit, 0.0), status["wall_seconds"])
    return list(walls.values())


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
        [
            *overrides,
            f"diffusion.steps={config['steps']}",
            f"loss.w_kl={config['w_kl']}",
            f"seed={config['seed']}",
        ],
    )
    folder = Path(config["root"]) / f"k{config['steps']}-wkl{config['w_kl']}-seed{config['seed']}"
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
            "w_kl": tune.grid_search(list(args.w_kl)),
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
        "packs": 0,
        "test_mrr": float(frame["test_mrr"].mean()),
    }


def _test_mrr(paths) -> float:
    values = [json.loads(Path(p).read_text())["test"]["clean"]["mrr"] for p in paths]
    return sum(values) / len(values)


def _equal_within(fused: dict, alone: dict, tolerance: float = 1e-4) -> bool:
    return fused.keys() == alone.keys() and all(
        abs(fused[run][key] - alone[run][key]) <= tolerance for run in fused for key in fused[run]
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, nargs="+", default=[5, 10, 20, 40])
    parser.add_argument("--w-kl", type=float, nargs="+", default=[0.1, 0.3, 1.0, 3.0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--stage1-epochs", type=int, default=20)
    parser.add_argument("--stage2-epochs", type=int, default=10)
    parser.add_argument("--pack", type=int, default=16, help="members per pack of side (a)")
    parser.add_argument("--out", type=Path, help="also write the numbers to this JSON file")
    args = parser.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")

    import ray

    scratch = Path(tempfile.mkdtemp(prefix="bench-sweep-"))
    try:
        concurrency = os.cpu_count()
        fused = _platform_side(args, scratch, args.pack)
        ray.shutdown()
        reuse = _platform_side(args, scratch, 1)
        ray.shutdown()
        naive = _naive_side(args, scratch)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)

    trials = len(args.steps) * len(args.w_kl) * len(args.seeds)
    print(
        f"{trials} trials (K in {args.steps} x w_kl in {args.w_kl} x seeds {args.seeds}) on UMLS, "
        f"{concurrency} CPUs"
    )
    print(
        f"{'side':<28} {'wall s':>8} {'trials/min':>10} {'stage-1 runs':>12} {'packs':>5} "
        f"{'overhead s/trial':>17} {'test MRR':>9}"
    )
    rows = {}
    sides = (
        (f"(a) fused, pack {args.pack}", fused),
        ("(b) stage-1 reuse, pack 1", reuse),
        ("(c) plain Ray Tune", naive),
    )
    for label, side in sides:
        units = len(side["trial_wall_seconds"])
        busy = min(concurrency, units)
        side["overhead_seconds_per_trial"] = (
            side["wall_seconds"] * busy - sum(side["trial_wall_seconds"])
        ) / trials
        side["trials_per_minute"] = 60 * trials / side["wall_seconds"]
        rows[label] = side
        print(
            f"{label:<28} {side['wall_seconds']:>8.1f} {side['trials_per_minute']:>10.2f} "
            f"{side['stage1_trainings']:>12} {side['packs']:>5} "
            f"{side['overhead_seconds_per_trial']:>17.2f} {side['test_mrr']:>9.4f}"
        )
    versus_plain = naive["wall_seconds"] / fused["wall_seconds"]
    versus_reuse = reuse["wall_seconds"] / fused["wall_seconds"]
    equal = _equal_within(fused["test_metrics"], reuse["test_metrics"])
    print(
        f"(c)/(a): {versus_plain:.2f}x (target >= 10x); (b)/(a): {versus_reuse:.2f}x (target >= 3x)"
    )
    print(f"every trial's test metrics, fused vs alone, equal within 1e-4: {equal}")
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
                "fused_vs_plain": versus_plain,
                "fused_vs_reuse": versus_reuse,
                "test_metrics_equal": equal,
            },
            indent=2,
        )
        + "\n"
    )


if __name__ == "__main__":
    main()
