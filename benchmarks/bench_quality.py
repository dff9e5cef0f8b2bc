"""Quality against the field's library: DiffusionCom vs PyKEEN baselines at the same time budget.

Run from the repository root::

    .venv/bin/python benchmarks/bench_quality.py [--datasets umls,nations] [--seeds 0,1,2]
        [--models TuckER,DistMult] [--clock cpu|wall] [--quick] [--out DIR]

For every dataset and seed:

1. **Ours**: ``core.train.trainer.train`` on the shipped default recipe (the config defaults;
   ``data.dataset`` and ``seed`` set, then the :data:`VARIANTS` change and any ``--set
   KEY=VALUE``). The frozen text (and image) features are computed once before timing. The budget
   ``T`` is the longest of our variants' times. With ``--clock cpu`` (the default) a time is the
   process's CPU seconds over the whole ``train`` call: dataset loading, model construction, both
   stages with their per-epoch valid evaluation and checkpoints, and the final valid/test
   evaluation (which PyKEEN's budget does not contain: the rounding favours PyKEEN). With one
   thread per process this equals the wall clock of an idle machine, and another job's load on a
   shared machine cannot move it. ``--clock wall`` uses the trainer's own
   ``results["timings"]["train_seconds"]`` (wall clock, final test evaluation excluded).
2. **PyKEEN** models (``--models``; TransE, DistMult, ComplEx, RotatE, TuckER by default), trained
   on the *same* id triples (a ``TriplesFactory`` built from our graph's tensors and vocabularies,
   so ids match ours exactly) with LCWA (1-vs-all over tails, inverse triples so heads are learned
   as tails of ``r⁻¹``), epoch after epoch until ``T`` is spent on the same clock (checked after
   each epoch; the clock starts before the triples factory and model are built). After every epoch
   the model is ranked on the valid split by our evaluator and the weights with the best valid MRR
   are kept, as our trainer does. On ``NAME:anonymous`` PyKEEN's run of ``NAME`` with the same
   seed is reused when its budget was at least ``T`` (PyKEEN sees only the id triples).
3. **Evaluation**: every model is ranked on the test split by ``core.evaluation.evaluate`` (filtered,
   realistic ties, both directions). A head query ``(t, r + R, ?)`` is mapped to PyKEEN's
   ``predict_h`` on ``rt_batch = (r, t)``, which for a model trained with inverse triples scores it as
   the tail query ``(t, r_inv, ?)``; a tail query ``(h, r, ?)`` goes to ``predict_t((h, r))``.

The PyKEEN settings are fixed across seeds and datasets (see ``PYKEEN_MODELS`` and the
``--pykeen-*`` options; lr 0.01 was chosen over 1e-3 and 5e-3 on valid MRR). Every model runs with
``--threads`` torch threads (default 1). The script prints a Markdown table (mean ± sample std over
seeds) and, with ``--out``, writes ``table.md`` and ``results.json`` (every per-seed number, wall
and CPU seconds of every run, load averages) after every seed; ``--from-results`` prints the table
of several such files (e.g. of two processes that each ran some datasets).
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# Never write pykeen's or our cache into the home folder: temporary folders unless given.
for _variable, _prefix in (("PYSTOW_HOME", "pystow"), ("DIFFCOM_CACHE_DIR", "cache")):
    if not os.environ.get(_variable):
        os.environ[_variable] = tempfile.mkdtemp(prefix=f"bench-quality-{_prefix}-")

from pykeen.losses import CrossEntropyLoss  # noqa: E402
from pykeen.models import ComplEx, DistMult, RotatE, TransE, TuckER  # noqa: E402
from pykeen.training import LCWATrainingLoop  # noqa: E402
from pykeen.training.callbacks import TrainingCallback  # noqa: E402
from pykeen.triples import TriplesFactory  # noqa: E402
from pykeen.utils import set_random_seed  # noqa: E402

from core.config import ExperimentConfig, config_to_dict, load_config  # noqa: E402
from core.data.graph import KnowledgeGraph  # noqa: E402
from core.evaluation import evaluate  # noqa: E402
from core.features import extract_features  # noqa: E402
from core.train.trainer import feature_settings, load_run_dataset, train  # noqa: E402

#: Our variants on top of the shipped default recipe (the config defaults, also
#: ``core/configs/recipe.yaml``, chosen on valid MRR across datasets; see BENCHMARKS.md), never
#: tuned per dataset. ``recipe`` is the paper's full model; ``-MGAT`` the same without the
#: structure encoder (the paper's "DiffusionCom−MGAT" ablation), measured on request.
VARIANTS: dict[str, tuple[str, ...]] = {
    "recipe": (),
    "-MGAT": ("structure.encoder=none",),
}
#: ``NAME:anonymous`` is dataset NAME with every entity's text replaced by an opaque id.
ANONYMOUS_SUFFIX = ":anonymous"

#: name → (class, constructor kwargs). Dimensions are real dims for TransE/DistMult/TuckER and
#: complex dims for ComplEx/RotatE (so 2x the real parameters there). Regularizers: model defaults.
PYKEEN_MODELS: dict[str, tuple[type, dict]] = {
    "TransE": (TransE, {"embedding_dim": 200}),
    "DistMult": (DistMult, {"embedding_dim": 200}),
    "ComplEx": (ComplEx, {"embedding_dim": 200}),
    "RotatE": (RotatE, {"embedding_dim": 200}),
    "TuckER": (TuckER, {"embedding_dim": 200, "relation_dim": 30}),
}


# ------------------------------------------------------------------------------------------ helpers


def _load_average() -> float:
    return round(os.getloadavg()[0], 2)


def _mean_std(values: list[float]) -> tuple[float, float]:
    values = [v for v in values if not math.isnan(v)]
    if not values:
        return math.nan, math.nan
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def _fmt(values: list[float], digits: int = 3) -> str:
    mean, std = _mean_std(values)
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def _dataset_overrides(dataset: str) -> list[str]:
    """Config overrides of a dataset spec: ``umls`` or ``umls:anonymous`` (opaque entity text)."""
    if dataset.endswith(ANONYMOUS_SUFFIX):
        name = dataset[: -len(ANONYMOUS_SUFFIX)]
        return [f"data.dataset={name}", "data.entity_text=anonymous"]
    return [f"data.dataset={dataset}"]


def _graph(dataset: str) -> KnowledgeGraph:
    return load_run_dataset(load_config(overrides=_dataset_overrides(dataset)))


def stability(epochs_log: list[dict]) -> dict:
    """Collapses and plateau stops in one run's per-epoch valid MRR (both stages in order).

    A collapse is an epoch whose valid MRR is below half the best valid MRR reached before it; a
    plateau stop is an early stop of stage 1 whose best valid MRR closed less than a quarter of the
    gap between its first epoch's and 1 (it never left its starting level: on a graph of 14
    entities the first epoch is already near 0.5, so a ratio to the first epoch would not do).
    """
    best, collapses = 0.0, []
    for record in epochs_log:
        mrr = record.get("valid.clean.mrr")
        if mrr is None:
            continue
        if mrr < 0.5 * best:
            collapses.append(
                f"stage {record['stage']} epoch {record['epoch']}: {mrr:.3f} < half of {best:.3f}"
            )
        best = max(best, mrr)
    stage1 = [
        r["valid.clean.mrr"] for r in epochs_log if r["stage"] == 1 and "valid.clean.mrr" in r
    ]
    stopped = any(r.get("early_stopped") for r in epochs_log if r["stage"] == 1)
    plateau = bool(stage1) and stopped and max(stage1) - stage1[0] < 0.25 * (1 - stage1[0])
    checkpoints = (1, 5, 10, 20, 40, 80, 120, 160, 200)
    curve = {epoch: round(stage1[epoch - 1], 3) for epoch in checkpoints if epoch <= len(stage1)}
    return {"collapses": collapses, "plateau_stop": plateau, "stage1_valid_curve": curve}


# ------------------------------------------------------------------------------------------ ours


def our_config(
    dataset: str, seed: int, variant: str, overrides: list[str], quick: bool
) -> ExperimentConfig:
    """The default recipe on ``dataset`` with ``seed`` and the :data:`VARIANTS` change (quick:
    2 + 1 epochs), then ``overrides``."""
    quick_epochs = ["train.stage1_epochs=2", "train.stage2_epochs=1"] if quick else []
    return load_config(
        None,
        [
            *_dataset_overrides(dataset),
            f"seed={seed}",
            # The label-using "official" protocol is not compared here; skipping it saves wall time
            # after training (it is outside T anyway).
            "eval.report_official=false",
            *VARIANTS[variant],
            *quick_epochs,
            *overrides,
        ],
    )


def run_ours(config: ExperimentConfig, graph: KnowledgeGraph, out_dir: Path, clock: str) -> dict:
    """Train our model; returns test/valid metrics, stage-1 metrics, the budget ``T`` and the
    per-epoch log (the run folder is deleted afterwards)."""
    # Compute (or reuse) the frozen features before timing: a one-off cost shared by every seed.
    extract_features(graph, feature_settings(config), progress=False)
    load_before = _load_average()
    started, started_cpu = time.perf_counter(), time.process_time()
    results = train(config, out_dir, progress=False)
    wall, cpu = time.perf_counter() - started, time.process_time() - started_cpu
    metrics_log = [
        json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()
    ]
    shutil.rmtree(out_dir, ignore_errors=True)  # checkpoints: tens of MB per run
    return {
        # cpu: the process's CPU seconds over the whole call, final valid/test evaluation included
        # (PyKEEN's budget has no such evaluation in it, so the rounding is in its favour).
        "budget_seconds": round(cpu, 2) if clock == "cpu" else results["timings"]["train_seconds"],
        "train_seconds": results["timings"]["train_seconds"],
        "wall_seconds_incl_final_eval": round(wall, 2),
        "cpu_seconds_incl_final_eval": round(cpu, 2),
        "best_epochs": results["best_epochs"],
        "valid": results["valid"]["clean"],
        "test": results["test"]["clean"],
        "test_stage1": results["test"]["stage1_clean"],
        "valid_stage1": results["valid"]["stage1_clean"],
        "load_average": [load_before, _load_average()],
        "selection": results.get("selection"),
        "stability": stability(metrics_log),
        "epochs_log": metrics_log,
    }


# ------------------------------------------------------------------------------------------ PyKEEN


def pykeen_score_fn(model, num_relations: int):
    """Our ``score_fn(heads, relations in [0, 2R)) -> (B, E)`` on top of a PyKEEN model.

    Tail query ``(h, r, ?)`` → ``predict_t([[h, r]])``; head query of ``(?, r, t)``, asked by our
    evaluator as ``(t, r + R, ?)`` → ``predict_h([[r, t]])`` (``rt_batch`` columns are relation,
    tail). ``predict_*`` set eval mode and handle the inverse-relation id mapping.
    """

    def score(heads: torch.Tensor, relations: torch.Tensor) -> torch.Tensor:
        forward = relations < num_relations
        out = torch.empty(len(heads), model.num_entities)
        if forward.any():
            hr = torch.stack([heads[forward], relations[forward]], dim=1)
            out[forward] = model.predict_t(hr).float()
        if (~forward).any():
            rt = torch.stack([relations[~forward] - num_relations, heads[~forward]], dim=1)
            out[~forward] = model.predict_h(rt).float()
        return out

    return score


class _BudgetAndBest(TrainingCallback):
    """After every epoch: valid MRR by our evaluator, keep the best weights, stop once over budget."""

    def __init__(
        self,
        graph: KnowledgeGraph,
        budget: float,
        clock,
        started: float,
        max_epochs: int | None,
    ):
        super().__init__()
        self.graph, self.budget, self.max_epochs = graph, budget, max_epochs
        self.clock, self.started = clock, started
        self.best_mrr, self.best_epoch, self.best_state = -1.0, 0, None
        self.epochs = 0

    def post_epoch(self, epoch: int, epoch_loss: float, **kwargs) -> None:
        self.epochs = epoch
        score = pykeen_score_fn(self.model, self.graph.num_relations)
        mrr = evaluate(score, self.graph, "valid", 256).metrics("realistic")["mrr"]
        if mrr > self.best_mrr:
            self.best_mrr, self.best_epoch = mrr, epoch
            self.best_state = copy.deepcopy(self.model.state_dict())
        over_budget = self.clock() - self.started >= self.budget
        if over_budget or (self.max_epochs is not None and epoch >= self.max_epochs):
            self.training_loop._should_stop = True


def run_pykeen(
    name: str,
    graph: KnowledgeGraph,
    seed: int,
    budget: float,
    args: argparse.Namespace,
) -> dict:
    """Train one PyKEEN model for ``budget`` seconds (``args.clock``: CPU or wall) and rank it with
    our evaluator."""
    model_cls, kwargs = PYKEEN_MODELS[name]
    load_before = _load_average()
    set_random_seed(seed)
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    started, started_wall, started_cpu = clock(), time.perf_counter(), time.process_time()
    factory = TriplesFactory(
        mapped_triples=graph.train,
        entity_to_id={entity: i for i, entity in enumerate(graph.entities)},
        relation_to_id={relation: i for i, relation in enumerate(graph.relations)},
        create_inverse_triples=True,
    )
    model = model_cls(
        triples_factory=factory,
        loss=CrossEntropyLoss(),
        random_seed=seed,
        **kwargs,
    )
    loop = LCWATrainingLoop(
        model=model,
        triples_factory=factory,
        optimizer="adam",
        optimizer_kwargs={"lr": args.pykeen_lr},
    )
    callback = _BudgetAndBest(graph, budget, clock, started, 2 if args.quick else None)
    loop.train(
        triples_factory=factory,
        num_epochs=100_000,  # the callback stops at the budget
        batch_size=args.pykeen_batch_size,
        label_smoothing=args.pykeen_label_smoothing,
        use_tqdm=False,
        callbacks=[callback],
    )
    seconds = clock() - started
    wall, cpu = time.perf_counter() - started_wall, time.process_time() - started_cpu
    if callback.best_state is not None:
        model.load_state_dict(callback.best_state)
    score = pykeen_score_fn(model, graph.num_relations)
    valid = evaluate(score, graph, "valid", 256).metrics("realistic")
    test = evaluate(score, graph, "test", 256).metrics("realistic")
    return {
        "seconds": round(seconds, 2),
        "wall_seconds": round(wall, 2),
        "cpu_seconds": round(cpu, 2),
        "epochs": callback.epochs,
        "best_epoch": callback.best_epoch,
        "valid": valid,
        "test": test,
        "load_average": [load_before, _load_average()],
    }


# ------------------------------------------------------------------------------------------ report


def _row(dataset: str, label: str, budget: str, used: str, epochs: str, tests, valids) -> str:
    return (
        f"| {dataset} | {label} | {budget} | {used} | {epochs} | "
        f"{_fmt([t['mrr'] for t in tests])} | {_fmt([t['hits@1'] for t in tests])} | "
        f"{_fmt([t['hits@10'] for t in tests])} | {_fmt([v['mrr'] for v in valids])} |"
    )


def markdown_table(
    records: dict, datasets: list[str], variants: list[str], models: list[str]
) -> str:
    """Mean ± std over seeds per dataset and model, and the stage-2 gain of each of our variants."""
    lines = [
        "| dataset | model | budget T (s) | time used (s) | epochs (best) | test MRR | test Hits@1 "
        "| test Hits@10 | valid MRR |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    gains = []
    for dataset in datasets:
        runs = records[dataset].values()
        budget = _fmt([run["budget_seconds"] for run in runs], 0)
        for variant in variants:
            ours = [run["ours"][variant] for run in runs]
            best1 = statistics.fmean(o["best_epochs"].get("stage1", 0) for o in ours)
            best2 = statistics.fmean(o["best_epochs"].get("stage2", 0) for o in ours)
            used = _fmt([o["budget_seconds"] for o in ours], 0)
            lines.append(
                _row(
                    dataset,
                    f"**DiffusionCom {variant} (ours)**",
                    budget,
                    used,
                    f"best: s1 {best1:.1f}, s2 {best2:.1f}",
                    [o["test"] for o in ours],
                    [o["valid"] for o in ours],
                )
            )
            lines.append(
                _row(
                    dataset,
                    f"ours {variant}, stage 1 only (same runs)",
                    budget,
                    "—",
                    "—",
                    [o["test_stage1"] for o in ours],
                    [o["valid_stage1"] for o in ours],
                )
            )
            diff = [o["test"]["hits@1"] - o["test_stage1"]["hits@1"] for o in ours]
            diff_mrr = [o["test"]["mrr"] - o["test_stage1"]["mrr"] for o in ours]
            selected = [str((o.get("selection") or {}).get("selected", "?")) for o in ours]
            gains.append(
                f"- {dataset}, {variant}: final model − its stage 1, test Hits@1 "
                f"{_fmt(diff, 4)}, MRR {_fmt(diff_mrr, 4)} "
                f"(per seed Hits@1: {', '.join(f'{d:+.4f}' for d in diff)}; "
                f"selected: {', '.join(selected)})"
            )
            for o in ours:
                checks = o.get("stability") or {}
                gains.append(
                    f"  - stability: {len(checks.get('collapses', []))} collapse(s), plateau stop: "
                    f"{checks.get('plateau_stop')}; stage-1 valid MRR by epoch "
                    f"{checks.get('stage1_valid_curve')}"
                )
        for model in models:
            results = [run["pykeen"][model] for run in runs]
            epochs = statistics.fmean(r["epochs"] for r in results)
            best = statistics.fmean(r["best_epoch"] for r in results)
            reused = {r["reused_from"] for r in results if "reused_from" in r}
            label = f"PyKEEN {model}" + (
                f" (the {', '.join(sorted(reused))} runs: budget ≥ T)" if reused else ""
            )
            lines.append(
                _row(
                    dataset,
                    label,
                    budget,
                    _fmt([r["seconds"] for r in results], 0),
                    f"{epochs:.0f} ({best:.0f})",
                    [r["test"] for r in results],
                    [r["valid"] for r in results],
                )
            )
    return "\n".join(lines) + "\n\n" + "\n".join(gains) + "\n"


def verdict(records: dict, datasets: list[str], variants: list[str], models: list[str]) -> str:
    """Each of our variants vs the best PyKEEN model per dataset on mean test MRR and Hits@1."""
    lines = []
    for dataset in datasets:
        runs = records[dataset].values()
        for metric in ("mrr", "hits@1"):
            best_name, best = max(
                (
                    (m, statistics.fmean(run["pykeen"][m]["test"][metric] for run in runs))
                    for m in models
                ),
                key=lambda pair: pair[1],
            )
            for variant in variants:
                ours = statistics.fmean(run["ours"][variant]["test"][metric] for run in runs)
                status = "met" if ours >= best else "NOT met"
                lines.append(
                    f"- {dataset} {metric}: ours {variant} {ours:.3f} vs best PyKEEN "
                    f"({best_name}) {best:.3f} → {status}"
                )
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------ main


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--datasets",
        default="umls,nations,synthetic:small,umls:anonymous,nations:anonymous",
        help="comma-separated; NAME:anonymous replaces every entity's text by an opaque id",
    )
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--models", default=",".join(PYKEEN_MODELS))
    parser.add_argument(
        "--variants", default="recipe", help=f"ours to train: {', '.join(VARIANTS)}"
    )
    parser.add_argument(
        "--quick", action="store_true", help="1 seed, 2+1 epochs for ours, 2 for PyKEEN"
    )
    parser.add_argument("--out", type=Path, help="folder for table.md and results.json")
    parser.add_argument(
        "--from-results",
        type=Path,
        nargs="+",
        metavar="RESULTS_JSON",
        help="train nothing: print the table of these results.json files (e.g. of two processes "
        "that each ran some datasets)",
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra config override for ours (repeatable), e.g. train.stage1_epochs=40",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads for every model (default 1: on a shared, oversubscribed 2-core VM "
        "two threads make epoch times swing 10-50x, which would make the budget meaningless)",
    )
    parser.add_argument(
        "--clock",
        choices=("cpu", "wall"),
        default="cpu",
        help="what the budget counts: the process's CPU seconds (default; with one thread per "
        "process it equals the wall clock of an idle machine, and another job's load cannot move "
        "it) or wall-clock seconds",
    )
    parser.add_argument("--pykeen-lr", type=float, default=0.01)
    parser.add_argument("--pykeen-batch-size", type=int, default=256)
    parser.add_argument("--pykeen-label-smoothing", type=float, default=0.0)
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    logging.getLogger("pykeen").setLevel(logging.ERROR)
    logging.getLogger("torch_max_mem").setLevel(logging.ERROR)
    datasets = [d for d in args.datasets.split(",") if d]
    seeds = [int(s) for s in args.seeds.split(",") if s]
    if args.quick:
        seeds = seeds[:1]
    variants = [v for v in args.variants.split(",") if v]
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown:
        parser.error(f"unknown variant {unknown[0]}; choose from {', '.join(VARIANTS)}")
    models = [m for m in args.models.split(",") if m]
    unknown = sorted(set(models) - set(PYKEEN_MODELS))
    if unknown:
        parser.error(f"unknown model {unknown[0]}; choose from {', '.join(PYKEEN_MODELS)}")

    if args.from_results:
        records, configs, datasets = merge_results(args.from_results)
        variants = sorted(
            {v for runs in records.values() for r in runs.values() for v in r["ours"]}
        )
        models = [
            m
            for m in PYKEEN_MODELS
            if all(m in r["pykeen"] for runs in records.values() for r in runs.values())
        ]
        table = markdown_table(records, datasets, variants, models)
        print(table)
        print(verdict(records, datasets, variants, models))
        return

    work = Path(tempfile.mkdtemp(prefix="bench-quality-runs-"))
    began = time.perf_counter()
    records: dict = {}
    configs: dict = {}
    # (dataset without ":anonymous", seed, model) -> (budget, result): PyKEEN sees only id triples,
    # so NAME:anonymous reuses NAME's run of the same seed when that one had at least its budget.
    pykeen_runs: dict[tuple[str, int, str], tuple[float, dict]] = {}
    for dataset in datasets:
        graph = _graph(dataset)
        records[dataset] = {}
        for seed in seeds:
            record: dict = {"ours": {}, "pykeen": {}}
            for variant in variants:
                config = our_config(dataset, seed, variant, args.set, args.quick)
                configs.setdefault(dataset, {})[variant] = config_to_dict(config)
                ours = run_ours(config, graph, work / f"{dataset}-seed{seed}-{variant}", args.clock)
                record["ours"][variant] = ours
                print(
                    f"[{dataset} seed {seed}] ours {variant}: T={ours['budget_seconds']:.1f}s "
                    f"test MRR {ours['test']['mrr']:.4f} H@1 {ours['test']['hits@1']:.4f} "
                    f"(stage 1: {ours['test_stage1']['hits@1']:.4f}) "
                    f"load {ours['load_average']}",
                    flush=True,
                )
            # Every PyKEEN model gets the longest time any of our variants took.
            budget = max(ours["budget_seconds"] for ours in record["ours"].values())
            record["budget_seconds"] = budget
            base = dataset.removesuffix(ANONYMOUS_SUFFIX)
            for model in models:
                earlier = pykeen_runs.get((base, seed, model))
                if earlier is not None and earlier[0] >= budget:
                    result = {**earlier[1], "reused_from": base, "reused_budget": earlier[0]}
                else:
                    result = run_pykeen(model, graph, seed, budget, args)
                    pykeen_runs[(base, seed, model)] = (budget, result)
                record["pykeen"][model] = result
                print(
                    f"[{dataset} seed {seed}] {model}: {result['seconds']:.1f}s "
                    f"{result['epochs']} epochs (best {result['best_epoch']}) "
                    f"test MRR {result['test']['mrr']:.4f} H@1 {result['test']['hits@1']:.4f} "
                    f"load {result['load_average']}"
                    + (
                        f" (reused from {base}, budget {earlier[0]:.1f}s)"
                        if "reused_from" in result
                        else ""
                    ),
                    flush=True,
                )
            records[dataset][str(seed)] = record
            if args.out is not None:  # after every seed: an interrupted run keeps what it measured
                write_results(args, seeds, datasets, configs, models, records, began)

    shutil.rmtree(work, ignore_errors=True)
    table = markdown_table(records, datasets, variants, models)
    summary = verdict(records, datasets, variants, models)
    elapsed = time.perf_counter() - began
    print()
    print(table)
    print(summary)
    print(f"total {elapsed / 60:.1f} min, load average now {os.getloadavg()}")
    if args.out is not None:
        write_results(args, seeds, datasets, configs, models, records, began)
        (args.out / "table.md").write_text(table + "\n" + summary)


def write_results(args, seeds, datasets, configs, models, records, began) -> None:
    """``results.json`` under ``--out``: every per-seed number measured so far, written atomically."""
    args.out.mkdir(parents=True, exist_ok=True)
    payload = {
        "argv": sys.argv,
        "seeds": seeds,
        "datasets": datasets,
        "our_configs": configs,
        "pykeen": {
            "models": {m: PYKEEN_MODELS[m][1] for m in models},
            "training": "LCWA, create_inverse_triples=True, CrossEntropyLoss, Adam",
            "lr": args.pykeen_lr,
            "batch_size": args.pykeen_batch_size,
            "label_smoothing": args.pykeen_label_smoothing,
            "selection": "best valid MRR epoch (our evaluator), checked after every epoch",
        },
        "environment": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
        },
        "clock": args.clock,
        "total_seconds": round(time.perf_counter() - began, 1),
        "records": records,
    }
    partial = args.out / "results.json.partial"
    partial.write_text(json.dumps(payload, indent=2) + "\n")
    partial.replace(args.out / "results.json")


def merge_results(paths: list[Path]) -> tuple[dict, dict, list[str]]:
    """Records, configs and dataset order of several ``results.json`` (e.g. processes that each ran
    some datasets or seeds); the same dataset and seed in two files is an error."""
    records: dict = {}
    configs: dict = {}
    datasets: list[str] = []
    for path in paths:
        payload = json.loads(Path(path).read_text())
        for dataset in payload["datasets"]:
            runs = payload["records"].get(dataset) or {}
            if not runs:
                continue
            if dataset not in records:
                records[dataset] = {}
                datasets.append(dataset)
            for seed, run in runs.items():
                if seed in records[dataset]:
                    raise SystemExit(f"{path}: {dataset} seed {seed} is also in an earlier file")
                for ours in run["ours"].values():  # the rule of this code, not of the run's
                    if "epochs_log" in ours:
                        ours["stability"] = stability(ours["epochs_log"])
                records[dataset][seed] = run
            configs.setdefault(dataset, payload["our_configs"].get(dataset, {}))
    return records, configs, datasets


if __name__ == "__main__":
    main()
