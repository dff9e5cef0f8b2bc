"""Inference cost of the reverse chain against the number of diffusion steps K, on UMLS.

Run from the repository root::

    .venv/bin/python benchmarks/bench_inference_k.py [--quick] [--ks 0,5,10,20,40,100] [--seed 0]

What it does, all in one process:

1. Trains stage 1 once with the demo config (``core/configs/demo.yaml``, ``diffusion.enabled=true``,
   ``train.stage2_epochs=0``) through ``core.train.trainer.train``.
2. For every K > 0 trains stage 2 only, ``train(config_K, out, stage1_checkpoint=<stage-1
   run>/checkpoints/last.pt)``, with ``diffusion.steps=K``: every K refines the same extractor.
   K = 0 is the stage-1 model itself (the extractor's scores).
3. Rebuilds every model with ``build_model`` and loads the weights the run selected (best valid MRR
   under the clean protocol), checks that its clean test metrics equal the ones ``train`` reported,
   then times clean-protocol inference over all test queries (both directions) in batches of 256
   under ``torch.no_grad()``: ``model.scores`` (the deterministic reverse chain, the ``clean``
   protocol's ``zero-noise`` inference) for K > 0, ``model.stage1_scores`` for K = 0. Filtering and
   ranking are not timed, only the score function. One untimed pass first (it also fills the
   subgraph sampler's cache), then ``--repeats`` rounds; each round times every K once, in a
   rotated order, so that load drift on a shared machine hits every K alike. Reported: the median
   ms/query, and the ratio to K = 0 as the median over rounds of the per-round ratio.

Metrics are the clean protocol's filtered test Hits@1 and MRR (realistic ties) from ``train``'s
``results.json``. The official min-of-S protocol is switched off (``eval.report_official=false``)
because it is not what is measured and costs S·K denoiser passes per split.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

os.environ.setdefault("DIFFCOM_CACHE_DIR", tempfile.mkdtemp(prefix="bench-inference-k-cache-"))

import torch  # noqa: E402

from core.config import ExperimentConfig, load_config  # noqa: E402
from core.data.registry import load_dataset  # noqa: E402
from core.train.checkpoint import load_checkpoint  # noqa: E402
from core.train.trainer import build_model, evaluate_clean, train  # noqa: E402

_REPO = Path(__file__).resolve().parents[1]
_DEMO = _REPO / "core" / "configs" / "demo.yaml"
_BATCH = 256
_TARGET_K = 10
_TARGET_RATIO = 1.5


def _config(k: int, args: argparse.Namespace) -> ExperimentConfig:
    overrides = [
        "diffusion.enabled=true",
        f"seed={args.seed}",
        "eval.report_official=false",
        f"eval.batch_size={_BATCH}",
    ]
    if k > 0:
        overrides.append(f"diffusion.steps={k}")
    else:
        overrides.append("train.stage2_epochs=0")
    if args.quick:
        overrides += ["train.stage1_epochs=2"] + (["train.stage2_epochs=1"] if k > 0 else [])
    return load_config(_DEMO, overrides)


def _load_selected(config: ExperimentConfig, graph, run_dir: Path, k: int):
    """The model of a finished run with the weights ``train`` selected and evaluated."""
    model = build_model(config, graph, progress=False)
    state = load_checkpoint(run_dir / "checkpoints" / "last.pt")
    weights = state.get("best_stage2" if k > 0 else "best_stage1") or state["model"]
    model.load_state_dict(weights)
    model.eval()
    return model


def _time_pass(score, queries: torch.Tensor) -> float:
    """Seconds to score all ``queries`` in batches of 256 (no ranking)."""
    started = time.perf_counter()
    with torch.no_grad():
        for batch in queries.split(_BATCH):
            score(batch[:, 0], batch[:, 1])
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny epochs and few repeats")
    parser.add_argument("--ks", default="0,5,10,20,40,100", help="comma-separated K; 0 = stage 1")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=None, help="timed rounds (default 15)")
    parser.add_argument(
        "--threads", type=int, default=None, help="torch threads (default: torch's)"
    )
    parser.add_argument("--work-dir", default=None, help="run folders (default: a temp folder)")
    args = parser.parse_args()
    ks = sorted({int(k) for k in args.ks.split(",")} | {0})
    repeats = args.repeats or (3 if args.quick else 15)
    if args.threads:
        torch.set_num_threads(args.threads)
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="bench-inference-k-"))
    work.mkdir(parents=True, exist_ok=True)
    load_start = os.getloadavg()
    print(
        f"# bench_inference_k: UMLS, ks={ks}, seed={args.seed}, quick={args.quick}, "
        f"repeats={repeats}, torch {torch.__version__}, threads={torch.get_num_threads()}, "
        f"{platform.processor() or platform.machine()}; work dir {work}",
        flush=True,
    )
    print(f"# start {datetime.now(timezone.utc):%Y-%m-%d %H:%M:%S} UTC, load {load_start}")

    # ------------------------------------------------------------------ training
    configs = {k: _config(k, args) for k in ks}
    shown = configs[max(ks)]
    print(
        f"# demo config: stage1_epochs={shown.train.stage1_epochs}, stage2_epochs="
        f"{shown.train.stage2_epochs}, patience={shown.train.patience}, hidden_dim="
        f"{shown.model.hidden_dim}, denoiser {shown.diffusion.denoiser_width}x"
        f"{shown.diffusion.denoiser_depth}, schedule {shown.diffusion.schedule}, "
        f"reverse {shown.diffusion.reverse}, target {shown.diffusion.target}, "
        f"diffuse {shown.diffusion.diffuse}",
        flush=True,
    )
    results, run_dirs, train_seconds = {}, {}, {}
    for k in ks:
        run_dirs[k] = work / ("stage1" if k == 0 else f"K{k}")
        started = time.perf_counter()
        reuse = None if k == 0 else run_dirs[0] / "checkpoints" / "last.pt"
        results[k] = train(configs[k], run_dirs[k], stage1_checkpoint=reuse, progress=False)
        train_seconds[k] = time.perf_counter() - started
        clean = results[k]["test"]["clean"]
        print(
            f"trained K={k:3d} in {train_seconds[k]:6.1f}s (final stage {results[k]['final_stage']}"
            f", best epochs {results[k]['best_epochs']}): test MRR {clean['mrr']:.4f}, "
            f"Hits@1 {clean['hits@1']:.4f}",
            flush=True,
        )

    # ------------------------------------------------------------------ timing
    graph = load_dataset(configs[0].data.dataset)
    queries = graph.queries("test")[:, :2]
    scorers = {}
    for k in ks:
        model = _load_selected(configs[k], graph, run_dirs[k], k)
        stage = 1 if k == 0 else 2
        check = evaluate_clean(model, graph, "test", stage, configs[k]).metrics(configs[k].eval.tie)
        reported = results[k]["test"]["clean"]
        if abs(check["mrr"] - reported["mrr"]) > 1e-6:
            raise RuntimeError(f"K={k}: rebuilt model MRR {check['mrr']} != reported {reported}")
        scorers[k] = model.stage1_scores if k == 0 else model.scores
        _time_pass(scorers[k], queries)  # warm-up: fills the sampler cache, allocator, kernels

    seconds: dict[int, list[float]] = {k: [] for k in ks}
    ratios: dict[int, list[float]] = {k: [] for k in ks}
    for round_ in range(repeats):
        order = ks[round_ % len(ks) :] + ks[: round_ % len(ks)]
        this_round = {k: _time_pass(scorers[k], queries) for k in order}
        for k in ks:
            seconds[k].append(this_round[k])
            ratios[k].append(this_round[k] / this_round[0])
    load_end = os.getloadavg()

    # ------------------------------------------------------------------ report
    num_queries = len(queries)
    base_ms = 1000 * statistics.median(seconds[0]) / num_queries
    rows = []
    for k in ks:
        ms = 1000 * statistics.median(seconds[k]) / num_queries
        q1, _, q3 = statistics.quantiles(ratios[k], n=4) if repeats > 1 else (0, 0, 0)
        clean = results[k]["test"]["clean"]
        rows.append(
            {
                "k": k,
                "hits@1": clean["hits@1"],
                "mrr": clean["mrr"],
                "ms_per_query": ms,
                "ratio": statistics.median(ratios[k]),
                "ratio_iqr": (q1, q3),
                "ms_per_step": (ms - base_ms) / k if k else None,
                "train_seconds": train_seconds[k],
            }
        )
    print(
        f"\n# {num_queries} test queries (both directions), batches of {_BATCH}, "
        f"{repeats} rounds; load {load_start} -> {load_end}; "
        f"end {datetime.now(timezone.utc):%Y-%m-%d %H:%M:%S} UTC\n"
    )
    print(
        "| K | test Hits@1 | test MRR | ms/query | × K=0 (IQR) | extra ms/query per step | train s |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for row in rows:
        label = "0 (stage 1)" if row["k"] == 0 else str(row["k"])
        step = "—" if row["ms_per_step"] is None else f"{row['ms_per_step']:.4f}"
        q1, q3 = row["ratio_iqr"]
        print(
            f"| {label} | {row['hits@1']:.4f} | {row['mrr']:.4f} | {row['ms_per_query']:.4f} | "
            f"{row['ratio']:.2f}x ({q1:.2f}–{q3:.2f}) | {step} | {row['train_seconds']:.0f} |"
        )
    target = next((row for row in rows if row["k"] == _TARGET_K), None)
    if target is not None:
        verdict = "MET" if target["ratio"] <= _TARGET_RATIO else "NOT MET"
        print(
            f"\nTarget K={_TARGET_K} ≤ {_TARGET_RATIO}× stage-1 forward: {verdict} "
            f"({target['ratio']:.2f}×)."
        )
    (work / "bench_inference_k.json").write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
