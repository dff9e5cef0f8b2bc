"""Quality against the field's library: DiffusionCom vs PyKEEN baselines at the same CPU budget.

What it measures: test MRR, Hits@1 and Hits@10 (filtered, both directions, realistic ties, the
clean protocol) of the shipped default recipe and of PyKEEN models trained on the same id triples
for as much CPU time as our run took, per graph, as mean ± sample std over seeds; how much the
final model gains over its own stage 1; and how stage 1 learned (curves, collapses, plateau stops).

Run from the repository root::

    .venv/bin/python benchmarks/bench_quality.py [--datasets umls,nations] [--seeds 0,1,2]
        [--models DistMult,RotatE,TuckER] [--variants full,mgat] [--quick] [--out DIR]
        [--resume] [--set KEY=VALUE ...]
    .venv/bin/python benchmarks/bench_quality.py --from-experiments DIR [DIR ...] [--out DIR]

``make bench`` runs it with its defaults: five graphs (``umls``, ``nations``, ``synthetic:small``,
``umls:anonymous``, ``nations:anonymous``; ``NAME:anonymous`` is NAME with
``data.entity_text=anonymous``, every entity's text an opaque id), three seeds, three baselines.
``--quick`` is a smoke run: the first seed, 2 + 1 epochs for ours and at most 2 for each baseline.

There is one harness: every graph is an ablation study (``sweeps/studies/quality.yaml``, launched
through :func:`sweeps.ray_adapter.launch` as ``diffcom sweep launch`` does, on a local Ray, one
CPU per trial) named ``quality-<graph>`` under ``--out`` (default: a new temporary folder). Its
cell ``full`` is the default recipe (``--variants`` adds ``mgat``, the same with the paper's MGAT structure encoder on); its baselines
(``--models``; any of TransE, DistMult, ComplEx, RotatE, TuckER) train through
:mod:`core.baselines` (LCWA, softmax cross entropy, Adam lr 0.01, batch 256, dim 200, no label
smoothing: the ``baseline.*`` defaults), keep their best-valid weights and are ranked by our
evaluator. With the default seeds, models and variants the shipped study file itself is launched,
with ``--set data.dataset=...`` (and ``data.entity_text=anonymous``); other choices write a copy
of it under ``--out/studies/``. Each launch prints the ``diffcom sweep launch`` command that makes
the same runs by hand. ``--resume`` continues experiments already under ``--out`` (through
:func:`sweeps.ray_adapter.resume`) instead of refusing them; ``--from-experiments`` trains nothing
and prints the tables of existing experiment folders (read by :mod:`analysis.load`, as the report
reads them).

How the budget is counted now (``baseline_budget: match``, CPU clock): each baseline run of seed
``s`` gets the CPU seconds that the full model's run of seed ``s`` took in all: the process CPU
time of its shared stage-1 run plus that of its own run (set-up, stage 2 with its per-epoch valid
evaluation, and its final valid/test evaluation, which a baseline's budget does not contain: the
rounding favours PyKEEN). A baseline's clock starts with its run (set-up included) and is checked
after each epoch. With one torch thread per trial, CPU time is what an idle machine's wall clock
would show, so other load on a shared machine does not move the budget. The frozen text and image
features are computed before the launch, so no run's clock holds that one-off cost (a launch by
hand with a cold feature cache charges it to the first run). Unlike earlier versions of this
script, ``NAME:anonymous`` trains its own baselines (PyKEEN sees only id triples, so they differ
from NAME's only in their budget).

Output: per graph, a Markdown table (budget T = the full model's cost, the time each model used,
epochs, test MRR/Hits@1/Hits@10 and valid MRR; our rows also as "stage 1 only" from the same
runs' ``stage1_clean`` results), the final-minus-stage-1 lines, the verdict (ours ≥ the best
PyKEEN model on mean test MRR and Hits@1) and the stage-1 stability table per run; also written
to ``--out/table.md``. The exit status is 1 when some run did not finish. The same folders make
the project's report (``diffcom report DIR/quality-umls``), whose Baselines table and significance
tests read the same runs.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import math
import os
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

#: The shipped study every graph's experiment is launched from.
STUDY = ROOT / "sweeps" / "studies" / "quality.yaml"
DATASETS = ("umls", "nations", "synthetic:small", "umls:anonymous", "nations:anonymous")
#: ``NAME:anonymous`` is graph NAME with every entity's text replaced by an opaque id.
ANONYMOUS_SUFFIX = ":anonymous"
#: Our cells: the default recipe (the paper's full model) and, on request, the paper's
#: "DiffusionCom−MGAT" ablation (no structure encoder).
# full: the default recipe; mgat: the same with the paper's MGAT structure encoder on.
VARIANTS: dict[str, dict[str, object]] = {"full": {}, "mgat": {"structure.encoder": "mgat"}}
DEFAULT_MODELS = ("DistMult", "RotatE", "TuckER")
DEFAULT_SEEDS = (0, 1, 2)
#: Launch overrides of ``--quick`` (a ``--set`` of the same key wins).
QUICK_OVERRIDES = ("train.stage1_epochs=2", "train.stage2_epochs=1", "baseline.epochs=2")
#: Stage-1 epochs whose valid MRR the stability table shows.
CURVE_EPOCHS = (1, 5, 10, 20, 40)


class BenchError(Exception):
    """Bad input or a folder the benchmark cannot use; printed as one line."""


# ------------------------------------------------------------------------------------------ helpers


def _mean_std(values: list[float]) -> tuple[float, float]:
    values = [v for v in values if v is not None and not math.isnan(v)]
    if not values:
        return math.nan, math.nan
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def _fmt(values: list[float], digits: int = 3) -> str:
    mean, std = _mean_std(values)
    if math.isnan(mean):
        return "—"
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def _number(value) -> float:
    """A frame value as a float; NaN for missing ones."""
    if value is None or isinstance(value, bool):
        return math.nan
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def dataset_overrides(dataset: str) -> list[str]:
    """Config overrides of a graph spec: ``umls`` or ``umls:anonymous`` (opaque entity text)."""
    if dataset.endswith(ANONYMOUS_SUFFIX):
        name = dataset[: -len(ANONYMOUS_SUFFIX)]
        return [f"data.dataset={name}", "data.entity_text=anonymous"]
    return [f"data.dataset={dataset}"]


def experiment_name(dataset: str) -> str:
    """``quality-umls``, ``quality-synthetic-small``, ``quality-nations-anonymous``."""
    return "quality-" + re.sub(r"[^a-z0-9]+", "-", dataset.lower()).strip("-")


def baseline_model(name: str) -> str:
    """``TuckER``, ``tucker`` or ``pykeen:TuckER`` → ``pykeen:TuckER``."""
    from core.baselines import BASELINE_MODELS

    wanted = name.strip().lower().removeprefix("pykeen:")
    for model in BASELINE_MODELS:
        if model.lower().removeprefix("pykeen:") == wanted:
            return model
    choices = ", ".join(m.removeprefix("pykeen:") for m in BASELINE_MODELS)
    raise BenchError(f"--models: unknown model {name!r}; choose from {choices}")


def _short(model: str) -> str:
    return model.removeprefix("pykeen:")


# ------------------------------------------------------------------------------------------ studies


def study_for(seeds: list[int], models: list[str], variants: list[str], folder: Path) -> Path:
    """The study file to launch: the shipped one when it is what was asked, else a copy of it
    with these ``seeds``, baselines and ``variants`` under ``folder`` (named by its content, so
    an experiment's study file is never overwritten by another's)."""
    import yaml

    from core.config import read_yaml

    data = read_yaml(STUDY, "study")
    asked = {
        "seeds": list(seeds),
        "variants": {name: dict(VARIANTS[name]) for name in variants},
        "baselines": list(models),
    }
    if all(data.get(key) == value for key, value in asked.items()):
        return STUDY
    data.update(asked)
    body = yaml.safe_dump(data, sort_keys=False, allow_unicode=True)
    digest = hashlib.sha256(body.encode()).hexdigest()[:10]
    path = folder / f"quality-{digest}.yaml"
    header = (
        f"# diffcom sweep launch {path}\n"
        f"# Written by benchmarks/bench_quality.py: {STUDY.relative_to(ROOT)} with seeds, "
        "variants and baselines as asked; one experiment per graph (--set data.dataset=...).\n"
    )
    if not path.is_file():
        folder.mkdir(parents=True, exist_ok=True)
        path.write_text(header + body)
    return path


def launch_overrides(dataset: str, quick: bool, extra: list[str]) -> list[str]:
    """``--set`` texts of one graph's launch: the graph, ``--quick``'s epochs, then ``extra``
    (which replaces a ``--quick`` value of the same key)."""
    given = {}
    for text in extra:
        key = text.split("=", 1)[0].strip()
        if "=" not in text or not key:
            raise BenchError(f"--set {text}: expected KEY=VALUE")
        if key in ("data.dataset", "data.entity_text"):
            raise BenchError(f"--set {text}: {key} comes from --datasets")
        given[key] = text
    quick_texts = [t for t in QUICK_OVERRIDES if t.split("=", 1)[0] not in given] if quick else []
    return [*dataset_overrides(dataset), *quick_texts, *given.values()]


def by_hand(study: Path, dataset: str, overrides: list[str], storage: Path) -> str:
    """The ``diffcom sweep launch`` command that makes the same runs."""
    shown = study.relative_to(ROOT) if study.is_relative_to(ROOT) else study
    sets = " ".join(f"--set {text}" for text in overrides)
    return (
        f"diffcom sweep launch {shown} --name {experiment_name(dataset)} {sets} --storage {storage}"
    )


def _check_same_design(folder: Path, study: Path, overrides: list[str]) -> None:
    """Refuse to resume an experiment that was launched from another study or other ``--set``."""
    from sweeps.experiment import read_experiment

    metadata = read_experiment(folder)
    recorded = (metadata.get("study_sha256"), list(metadata.get("launch_overrides") or []))
    asked = (hashlib.sha256(study.read_bytes()).hexdigest(), list(overrides))
    if recorded != asked:
        raise BenchError(
            f"{folder}: launched from {metadata.get('study_file')} with --set "
            f"{' '.join(recorded[1]) or '(none)'}; this command asks for {study} with --set "
            f"{' '.join(overrides)}: resume it with the options it was run with, or use "
            "another --out"
        )


def _all_finished(folder: Path) -> bool:
    from sweeps.experiment import PLAN_FILE, ExperimentError, read_json_object

    try:
        trials = read_json_object(folder / PLAN_FILE).get("trials") or {}
        return bool(trials) and all(
            read_json_object(folder / "runs" / name / "status.json").get("state") == "finished"
            for name in trials
        )
    except ExperimentError:
        return False


def run_study(dataset: str, study: Path, overrides: list[str], storage: Path, resume: bool) -> Path:
    """Launch one graph's experiment under ``storage``, or resume it; returns its folder."""
    from sweeps.ray_adapter import launch
    from sweeps.ray_adapter import resume as resume_experiment

    name = experiment_name(dataset)
    folder = storage / name
    print(f"[{dataset}] by hand: {by_hand(study, dataset, overrides, storage)}", flush=True)
    if folder.exists():
        if not resume:
            raise BenchError(
                f"{folder} exists: pass --resume to continue it, or choose another --out"
            )
        _check_same_design(folder, study, overrides)
        if _all_finished(folder):
            print(f"[{dataset}] {folder}: every run has finished", flush=True)
            return folder
        print(f"[{dataset}] resuming {folder}", flush=True)
        return resume_experiment(name, storage=storage)
    _warm_features(study, overrides)
    return launch(study, overrides=tuple(overrides), name=name, storage=storage)


def _warm_features(study: Path, overrides: list[str]) -> None:
    """Compute the frozen features before any run's clock starts (every trial shares them)."""
    from core.features import extract_features
    from core.train.trainer import feature_settings, load_run_dataset
    from sweeps.study import load_study, study_config

    config = study_config(load_study(study, overrides))
    extract_features(load_run_dataset(config), feature_settings(config), progress=False)


# ------------------------------------------------------------------------------------------ reading


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


@dataclasses.dataclass
class Collected:
    """What :func:`collect` read: ``records[dataset][seed]`` holds ``ours`` (variant → run),
    ``pykeen`` (baseline label → run) and ``budget_seconds`` (T: the reference run's cost)."""

    records: dict
    datasets: list[str]
    variants: list[str]
    models: list[str]
    unfinished: list[str]
    problems: list[str]


def _dataset_label(row, experiment: str) -> str:
    dataset = row.get("config.data.dataset")
    if not isinstance(dataset, str):
        return experiment  # a config without the key: name the graph by its experiment
    if row.get("config.data.entity_text") == "anonymous":
        return dataset + ANONYMOUS_SUFFIX
    return dataset


def _measures(rows, split: str, protocol: str) -> dict | None:
    chosen = rows[(rows["split"] == split) & (rows["protocol"] == protocol)]
    if chosen.empty:
        return None
    row = chosen.iloc[0]
    return {m: _number(row.get(m)) for m in ("mrr", "hits@1", "hits@10")}


def _run_cost(experiment_path: Path, run: str) -> float:
    """CPU seconds of a finished DiffusionCom run with its shared stage 1: the cost a ``match``
    baseline gets (:func:`sweeps.trial.matched_budget`, the same definition)."""
    from sweeps.trial import TrialFailed, matched_budget

    try:
        seconds = matched_budget(experiment_path, run, "cpu")
    except TrialFailed:
        return math.nan
    return math.nan if seconds is None else seconds


def _epoch_log(curve) -> list[dict]:
    """``metrics.jsonl``-like records (stage, epoch, valid MRR, early stop) of a learning curve."""
    records = []
    for row in curve.sort_values(["stage", "epoch"]).itertuples(index=False):
        record = {
            "stage": int(row.stage),
            "epoch": int(row.epoch),
            "early_stopped": bool(row.early_stopped),
        }
        if not math.isnan(_number(row.valid_mrr)):
            record["valid.clean.mrr"] = float(row.valid_mrr)
        records.append(record)
    return records


def _ours(rows, experiment_path: Path, curve) -> dict:
    first = rows.iloc[0]
    log = _epoch_log(curve)
    stage1 = [
        (r["valid.clean.mrr"], r["epoch"])
        for r in log
        if r["stage"] == 1 and "valid.clean.mrr" in r
    ]
    # The trainer keeps the first epoch of the best valid MRR (a strictly better one replaces it).
    best_mrr, best_epoch = max(stage1, key=lambda pair: (pair[0], -pair[1]), default=(math.nan, 0))
    final_stage = 2 if _number(first.get("final_stage")) == 2 else 1
    best_epochs = {"stage1": best_epoch}
    if any(r["stage"] == 2 for r in log):
        # A stage 2 that never beat its stage 1 on valid keeps its best epoch at 0 (trainer's rule).
        selected = _number(first.get("best_epoch"))
        best_epochs["stage2"] = selected if final_stage == 2 and not math.isnan(selected) else 0
    return {
        "budget_seconds": _run_cost(experiment_path, first["run"]),
        "best_epochs": best_epochs,
        "valid": _measures(rows, "valid", "clean"),
        "test": _measures(rows, "test", "clean"),
        "valid_stage1": _measures(rows, "valid", "stage1_clean"),
        "test_stage1": _measures(rows, "test", "stage1_clean"),
        "selection": {"selected": f"stage{final_stage}"},
        "stability": stability(log),
        "stage1_epochs": len(stage1),
        "stage1_best": (best_mrr, best_epoch),
    }


def _baseline(rows) -> dict:
    first = rows.iloc[0]
    return {
        "seconds": _number(first.get("cpu_seconds")),
        "budget": _number(first.get("baseline_budget_seconds")),
        "epochs": _number(first.get("baseline_epochs_run")),
        "best_epoch": _number(first.get("baseline_best_epoch")),
        "valid": _measures(rows, "valid", "clean"),
        "test": _measures(rows, "test", "clean"),
    }


def collect(folders: list[Path]) -> Collected:
    """Every finished run of these experiment folders, by graph and seed (through
    :func:`analysis.load.load_experiments`, the report's reader).

    Raises:
        BenchError: a folder is no experiment, or two experiments hold the same graph, cell and
            seed.
    """
    from analysis.load import load_experiments
    from core.baselines import BASELINE_MODELS

    for folder in folders:
        if not (folder / "experiment.json").is_file():
            raise BenchError(f"{folder}: no experiment.json (not an experiment folder)")
    loaded = load_experiments(folders)
    problems = [f"{path}: {reason}" for path, reason in loaded.problems]
    frame = loaded.frame
    records: dict = {}
    datasets: list[str] = []
    variants: list[str] = []
    labels: dict[str, tuple] = {}
    unfinished: list[str] = []
    seen: dict[tuple, str] = {}
    references: set[str] = set()
    if frame.empty:
        return Collected(records, datasets, variants, [], unfinished, problems)
    curves = {key: group for key, group in loaded.curves.groupby(["experiment", "run"])}
    for (experiment, run), rows in frame.groupby(["experiment", "run"], sort=False):
        first = rows.iloc[0]
        metadata = loaded.experiments[experiment]
        if not bool(first["finished"]):
            unfinished.append(f"{experiment}/{run} ({first['state']})")
            continue
        dataset = _dataset_label(first, experiment)
        seed, cell = int(first["seed"]), str(first["cell"])
        key = (dataset, cell, seed)
        if key in seen:
            raise BenchError(
                f"{dataset} {cell} seed {seed} is in two experiments: {seen[key]} and "
                f"{experiment}; give each seed of a graph once"
            )
        seen[key] = experiment
        if dataset not in records:
            records[dataset] = {}
            datasets.append(dataset)
        record = records[dataset].setdefault(seed, {"ours": {}, "pykeen": {}})
        if bool(first["baseline"]):
            model = str(first["model"])
            label = f"PyKEEN {_short(model)}"
            if cell != re.sub(r"[^a-z0-9_-]", "-", model.lower()):
                label += f" ({cell})"  # a cell with its own settings
            order = (
                BASELINE_MODELS.index(model) if model in BASELINE_MODELS else len(BASELINE_MODELS)
            )
            labels[label] = (order, label)
            record["pykeen"][label] = _baseline(rows)
        else:
            curve = curves.get((experiment, run))
            curve = curve if curve is not None else loaded.curves.iloc[0:0]
            record["ours"][cell] = _ours(rows, Path(metadata["path"]), curve)
            reference = metadata.get("reference") or "full"
            if cell == reference:
                record["reference"] = cell
                references.add(cell)
            if cell not in variants:
                variants.append(cell)
    for runs in records.values():
        for record in runs.values():
            record["budget_seconds"] = _budget(record)
    variants.sort(key=lambda variant: (variant not in references, variant))
    models = [label for _, label in sorted(labels.values())]
    return Collected(records, datasets, variants, models, unfinished, problems)


def _budget(record: dict) -> float:
    """T of one graph and seed: its reference run's cost, else the budget its baselines got."""
    reference = record["ours"].get(record.get("reference"))
    if reference is not None and not math.isnan(reference["budget_seconds"]):
        return reference["budget_seconds"]
    budgets = [r["budget"] for r in record["pykeen"].values() if not math.isnan(r["budget"])]
    return statistics.fmean(budgets) if budgets else math.nan


# ------------------------------------------------------------------------------------------ report


def _row(dataset: str, label: str, budget: str, used: str, epochs: str, tests, valids) -> str:
    tests = [t for t in tests if t is not None]
    valids = [v for v in valids if v is not None]
    return (
        f"| {dataset} | {label} | {budget} | {used} | {epochs} | "
        f"{_fmt([t['mrr'] for t in tests])} | {_fmt([t['hits@1'] for t in tests])} | "
        f"{_fmt([t['hits@10'] for t in tests])} | {_fmt([v['mrr'] for v in valids])} |"
    )


def markdown_table(
    records: dict, datasets: list[str], variants: list[str], models: list[str]
) -> str:
    """Mean ± std over seeds per graph and model, and the stage-2 gain of each of our variants."""
    lines = [
        "| dataset | model | budget T (s) | time used (s) | epochs (best) | test MRR | test Hits@1 "
        "| test Hits@10 | valid MRR |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    gains = []
    for dataset in datasets:
        runs = [records[dataset][seed] for seed in sorted(records[dataset])]
        budget = _fmt([run["budget_seconds"] for run in runs], 0)
        for variant in variants:
            seeds = [
                seed
                for seed in sorted(records[dataset])
                if variant in records[dataset][seed]["ours"]
            ]
            ours = [records[dataset][seed]["ours"][variant] for seed in seeds]
            if not ours:
                continue
            best1 = statistics.fmean(o["best_epochs"].get("stage1", 0) for o in ours)
            best2 = statistics.fmean(o["best_epochs"].get("stage2", 0) for o in ours)
            lines.append(
                _row(
                    dataset,
                    f"**DiffusionCom {variant} (ours)**",
                    budget,
                    _fmt([o["budget_seconds"] for o in ours], 0),
                    f"best: s1 {best1:.1f}, s2 {best2:.1f}",
                    [o["test"] for o in ours],
                    [o["valid"] for o in ours],
                )
            )
            if any(o["test_stage1"] is None for o in ours):
                gains.append(f"- {dataset}, {variant}: no stage 2 in some run; no stage-1 row")
                continue
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
            selected = [o["selection"]["selected"] for o in ours]
            gains.append(
                f"- {dataset}, {variant}: final model − its stage 1, test Hits@1 "
                f"{_fmt(diff, 4)}, MRR {_fmt(diff_mrr, 4)} "
                f"(per seed Hits@1: {', '.join(f'{d:+.4f}' for d in diff)}; "
                f"selected: {', '.join(selected)})"
            )
        for model in models:
            results = [run["pykeen"][model] for run in runs if model in run["pykeen"]]
            if not results:
                continue
            epochs = statistics.fmean(r["epochs"] for r in results)
            best = statistics.fmean(r["best_epoch"] for r in results)
            lines.append(
                _row(
                    dataset,
                    model,
                    budget,
                    _fmt([r["seconds"] for r in results], 0),
                    f"{epochs:.0f} ({best:.0f})",
                    [r["test"] for r in results],
                    [r["valid"] for r in results],
                )
            )
    return "\n".join(lines) + "\n\n" + "\n".join(gains) + "\n"


def verdict(records: dict, datasets: list[str], variants: list[str], models: list[str]) -> str:
    """Each of our variants vs the best PyKEEN model per graph on mean test MRR and Hits@1."""
    lines = []
    for dataset in datasets:
        runs = list(records[dataset].values())
        for metric in ("mrr", "hits@1"):
            means = [
                (
                    m.removeprefix("PyKEEN "),
                    statistics.fmean(
                        r["pykeen"][m]["test"][metric] for r in runs if m in r["pykeen"]
                    ),
                )
                for m in models
                if any(m in r["pykeen"] for r in runs)
            ]
            if not means:
                continue
            best_name, best = max(means, key=lambda pair: pair[1])
            for variant in variants:
                values = [r["ours"][variant]["test"][metric] for r in runs if variant in r["ours"]]
                if not values:
                    continue
                ours = statistics.fmean(values)
                status = "met" if ours >= best else "NOT met"
                lines.append(
                    f"- {dataset} {metric}: ours {variant} {ours:.3f} vs best PyKEEN "
                    f"({best_name}) {best:.3f} → {status}"
                )
    return "\n".join(lines) + "\n"


def stability_table(records: dict, datasets: list[str], variants: list[str]) -> str:
    """Stage-1 curve, stops and the stage-2 selection of every run of ours."""
    epochs = " / ".join(map(str, CURVE_EPOCHS))
    lines = [
        "| dataset | variant | seed | T (CPU s) | stage-1 epochs run | best (epoch) | valid MRR "
        f"by epoch {epochs} | collapses | plateau stop | selected | valid stage 1 → final |",
        "|---|---|---:|---:|---:|---:|---|---:|---|---|---|",
    ]
    notes = []
    for dataset in datasets:
        for variant in variants:
            seeds = [s for s in sorted(records[dataset]) if variant in records[dataset][s]["ours"]]
            if not seeds:
                continue
            never_below, collapses = [], []
            for seed in seeds:
                ours = records[dataset][seed]["ours"][variant]
                checks = ours["stability"]
                curve = checks["stage1_valid_curve"]
                by_epoch = " / ".join(
                    f"{curve[e]:.3f}" if e in curve else "—" for e in CURVE_EPOCHS
                )
                best_mrr, best_epoch = ours["stage1_best"]
                best = "—" if math.isnan(best_mrr) else f"{best_mrr:.3f} ({best_epoch})"
                cost = ours["budget_seconds"]
                if ours["valid_stage1"] is not None and ours["valid"] is not None:
                    start, final = ours["valid_stage1"]["mrr"], ours["valid"]["mrr"]
                    change = f"{start:.3f} → {final:.3f}"
                    never_below.append(final >= start)
                else:
                    change = "—"
                lines.append(
                    f"| {dataset} | {variant} | {seed} | "
                    f"{'—' if math.isnan(cost) else f'{cost:.0f}'} | {ours['stage1_epochs']} | "
                    f"{best} | {by_epoch} | {len(checks['collapses'])} | "
                    f"{checks['plateau_stop']} | {ours['selection']['selected']} | {change} |"
                )
                collapses += [f"  - seed {seed}: {c}" for c in checks["collapses"]]
            if never_below:
                count = f"{len(never_below)} seed" + ("s" if len(never_below) > 1 else "")
                notes.append(
                    f"- {dataset} {variant}: final ≥ stage 1 on valid in every run: "
                    f"{all(never_below)} ({count})"
                )
            elif collapses:
                notes.append(f"- {dataset} {variant}: collapses")
            notes += collapses
    return "\n".join(lines) + "\n\n" + "\n".join(notes) + "\n"


def render(collected: Collected) -> str:
    """Everything the benchmark prints and writes to ``table.md``."""
    args = (collected.records, collected.datasets, collected.variants, collected.models)
    parts = [
        markdown_table(*args),
        verdict(*args),
        "Stage-1 curves, stops and the stage-2 selection, per run (valid MRR; T the run's CPU "
        "seconds with its shared stage 1):\n",
        stability_table(*args[:3]),
    ]
    if collected.unfinished:
        parts.append("Runs not finished (left out): " + ", ".join(collected.unfinished) + "\n")
    return "\n".join(parts)


# ------------------------------------------------------------------------------------------ main


def _list(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


def _seeds(text: str) -> list[int]:
    try:
        seeds = [int(item) for item in _list(text)]
    except ValueError:
        raise BenchError(f"--seeds {text}: expected comma-separated integers, e.g. 0,1,2") from None
    if not seeds or any(s < 0 for s in seeds) or len(set(seeds)) != len(seeds):
        raise BenchError(f"--seeds {text}: expected distinct seeds >= 0")
    return seeds


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line, checked: ``datasets``, ``seeds``, ``models`` (``pykeen:...``) and
    ``variants`` as lists; ``--quick`` keeps the first seed.

    Raises:
        BenchError: a bad option value, naming the option.
    """
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument(
        "--datasets",
        default=",".join(DATASETS),
        help="comma-separated; NAME:anonymous replaces every entity's text by an opaque id",
    )
    parser.add_argument("--seeds", default=",".join(map(str, DEFAULT_SEEDS)))
    parser.add_argument(
        "--models",
        default=",".join(DEFAULT_MODELS),
        help="PyKEEN baselines: TransE, DistMult, ComplEx, RotatE, TuckER",
    )
    parser.add_argument("--variants", default="full", help=f"ours: {', '.join(VARIANTS)}")
    parser.add_argument(
        "--quick", action="store_true", help="first seed only, 2+1 epochs for ours, 2 for PyKEEN"
    )
    parser.add_argument(
        "--out",
        type=Path,
        help="experiment storage and table.md (default: a new temporary folder; with "
        "--from-experiments, table.md only when given)",
    )
    runs = parser.add_mutually_exclusive_group()
    runs.add_argument(
        "--resume",
        action="store_true",
        help="continue the experiments already under --out (the same options they were "
        "launched with) instead of refusing them",
    )
    runs.add_argument(
        "--from-experiments",
        type=Path,
        nargs="+",
        metavar="DIR",
        help="train nothing: print the tables of these experiment folders (graphs merged "
        "across folders, each graph, cell and seed once)",
    )
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="config override for every trial (repeatable), e.g. train.stage1_epochs=40",
    )
    args = parser.parse_args(argv)
    args.datasets = _list(args.datasets)
    if not args.datasets:
        raise BenchError("--datasets: give at least one graph")
    args.seeds = _seeds(args.seeds)[:1] if args.quick else _seeds(args.seeds)
    args.models = [baseline_model(name) for name in _list(args.models)]
    args.variants = _list(args.variants)
    unknown = [v for v in args.variants if v not in VARIANTS]
    if unknown or not args.variants:
        what = f"unknown variant {unknown[0]!r}" if unknown else "give at least one variant"
        raise BenchError(f"--variants: {what}; choose from {', '.join(VARIANTS)}")
    if "full" not in args.variants:
        raise BenchError("--variants: full is the reference every baseline's budget is matched to")
    for name in args.datasets:
        launch_overrides(name, args.quick, args.overrides)  # a bad --set, refused before Ray
    return args


def _use_out_for_caches(out: Path) -> None:
    """Never write PyKEEN's or our cache into the home folder: under ``--out`` unless set."""
    for variable, name in (("PYSTOW_HOME", ".pystow"), ("DIFFCOM_CACHE_DIR", ".cache")):
        if not os.environ.get(variable):
            os.environ[variable] = str((out / name).resolve())


def main(argv: list[str] | None = None) -> int:
    from analysis.load import AnalysisError
    from core.config import ConfigError
    from sweeps.experiment import ExperimentError
    from sweeps.study import StudyError

    try:
        args = parse_args(argv)
        if args.from_experiments:
            folders = [Path(folder).resolve() for folder in args.from_experiments]
        else:
            folders = _train(args)
        collected = collect(folders)
    except (BenchError, ConfigError, ExperimentError, StudyError, AnalysisError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    for problem in collected.problems:
        print(f"note: {problem}", file=sys.stderr)
    if not collected.datasets:
        print("error: no finished run in " + ", ".join(map(str, folders)), file=sys.stderr)
        return 1
    text = render(collected)
    print()
    print(text)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "table.md").write_text(text)
        print(f"written: {args.out / 'table.md'}")
    return 1 if collected.unfinished else 0


def _train(args: argparse.Namespace) -> list[Path]:
    """Launch (or resume) every graph's experiment; returns their folders."""
    if args.out is None:
        args.out = Path(tempfile.mkdtemp(prefix="bench-quality-"))
    args.out = args.out.resolve()
    args.out.mkdir(parents=True, exist_ok=True)
    _use_out_for_caches(args.out)
    from sweeps.study import load_study

    study = study_for(args.seeds, args.models, args.variants, args.out / "studies")
    launches = {d: launch_overrides(d, args.quick, args.overrides) for d in args.datasets}
    for overrides in launches.values():
        load_study(study, overrides)  # a bad --set, refused before any graph trains
    began = time.perf_counter()
    folders = []
    try:
        for dataset, overrides in launches.items():
            folders.append(run_study(dataset, study, overrides, args.out, args.resume))
    finally:
        if "ray" in sys.modules:
            import ray

            ray.shutdown()
    print(f"total {(time.perf_counter() - began) / 60:.1f} min; experiments in {args.out}")
    return folders


if __name__ == "__main__":
    sys.exit(main())
