"""Experiment folders → one tidy pandas frame (files only, through the format
:mod:`runstore`; no ``core``, no ``ray``).

One row per run × split × protocol. A finished run (``results.json``) gives rows for ``valid`` and
``test`` under each protocol it reports: ``clean`` (the deterministic, label-free protocol models
are selected by), ``stage1_clean`` (the same weights' extractor alone) and
``official-min-of-S`` (the released code's best of S stochastic passes, which uses the test
labels). An unfinished run (running, interrupted, stopped, failed) gives one ``valid``/``clean``
row from the best epoch in its ``metrics.jsonl`` so far, with ``finished`` false.

Every row carries what makes it interpretable: the experiment, kind and cell (ablation variant,
sensitivity axis and value, or search point), the seed, the run's config flattened into
``config.<section>.<key>`` columns, its best and last epochs (both explicit: the best epoch, by
valid MRR under the clean protocol, is what ``results.json`` reports), timings and provenance.
A folder or file that cannot be read is listed in :attr:`Loaded.problems` and skipped, never
fatal: JSON files must hold an object (:func:`read_json_object`), and a key of the wrong type is
ignored and listed. A finished run whose ``results.json`` cannot be read keeps a row with state
``damaged``.

Each experiment's metadata also gets what its copied ``study.yaml`` says of an ablation:
``variant_order`` (the variants in file order) and ``reference`` (the variant every other
variant's difference is against: the study's ``reference``, else ``full`` if there is such a
variant, else the first; the rule of :mod:`sweeps.study`). An ablation without a readable study
file takes ``full`` if some run is of it, else the first of its cells alphabetically. Other kinds
get ``None``.

Every row also says which model made it: ``model`` is ``DiffusionCom`` or a classical baseline's
name (``pykeen:TuckER`` ...) and ``baseline`` is true for the latter: a run is a baseline when its
config's ``baseline.model`` exists and is not ``none`` (experiments written before baselines
existed have no such key and read as DiffusionCom). The cost of a run: ``train_seconds`` and
``cpu_seconds`` (``results.json``'s ``timings``), ``stage1_seconds`` (the shared stage 1 it used,
``status.json``'s ``stage1.train_seconds``) and ``total_train_seconds``, their sum (the x of the
report's MRR-against-time figure; a baseline trains no stage 1, so it is its ``train_seconds``).
A baseline run's budget: ``baseline_budget_seconds`` (``None`` without a time budget),
``baseline_clock``, ``baseline_epochs`` (the most epochs it may train), ``baseline_epochs_run``,
``baseline_stopped_by`` and ``baseline_matched_to`` (the reference run whose time it was given);
``None`` on DiffusionCom rows.

The same pass reads every run's ``metrics.jsonl`` into :attr:`Loaded.curves`, the learning
curves: one row per run × recorded epoch (columns :data:`CURVE_COLUMNS`). ``epoch`` counts within
its stage; ``global_epoch`` counts across both, stage 2 continuing after stage 1's last epoch. A
run whose stage 1 was trained once for several trials (``<experiment>/stage1/<key>/run/``) has no
stage-1 epochs of its own; that shared run's stage-1 epochs are its curve's start (``source``
``"shared stage 1"``). A line that is not a complete record (cut by a kill, or still being
written) is skipped and listed in :attr:`Loaded.problems`.

Runs of different datasets must never be pooled: :func:`dataset_labels` names each row's dataset
(the content hash of the graph it trained on when known, else its config's ``data.dataset`` and
``data.entity_text``) with a readable label, ``umls`` or ``umls (entity_text=anonymous)``.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import yaml

import runstore as store
from runstore import (
    CONFIG,
    EXPERIMENT,
    METRICS,
    RESULTS,
    RUNS_DIR,
    STAGE1_DIR,
    STAGE1_RUN,
    STATUS,
    STUDY_COPY,
    TRIAL,
    StoreError,
    describe_json,
    flatten,
    ranks_file,
)

__all__ = [
    "CURVE_COLUMNS",
    "DIFFUSIONCOM",
    "MEASURES",
    "AnalysisError",
    "Loaded",
    "dataset_labels",
    "load_experiments",
    "protocol_kind",
    "read_json_object",
]

MEASURES = ("mr", "mrr", "hits@1", "hits@3", "hits@10")

# What names a run in every frame: its experiment, study kind, trial name, cell and seed.
_RUN_COLUMNS = ["experiment", "kind", "run", "cell", "axis", "axis_value", "seed"]

CURVE_COLUMNS = [
    *_RUN_COLUMNS,
    "source",  # "run" (its own metrics.jsonl) or "shared stage 1"
    "stage",
    "epoch",  # 1-based within the stage
    "global_epoch",  # 1-based across both stages
    "loss",
    "lr",
    "train_seconds",
    "kl",
    "bce",
    "lambda",
    *(f"valid_{measure}" for measure in MEASURES),  # clean protocol; NaN on epochs not evaluated
    "early_stopped",
]

# What an epoch record of core's trainer carries besides stage, epoch and validation.
_RECORD_KEYS = ("loss", "lr", "train_seconds", "kl", "bce", "lambda")


class AnalysisError(StoreError):
    """A file or folder a report cannot use; the message names it and says why.

    Attributes:
        reason: what is wrong.
        path: the file or folder (or option) it is about, or ``None``.
    """

    def __init__(self, reason: str, path: str | Path | None = None) -> None:
        super().__init__(reason, path)


def read_json_object(path: str | Path) -> dict:
    """Read a JSON file that must hold an object (every file an experiment folder holds does),
    checked against the version of its kind (:func:`runstore.read_json`, the kind by its name).

    Raises:
        AnalysisError: naming the file, when it is missing, unreadable, not JSON, JSON of
            another shape (a list, a string, a number...) or of a newer format version.
    """
    try:
        return store.read_json(path, store.kind_of(path))
    except StoreError as error:
        if error.reason == "missing":
            raise AnalysisError("missing", path) from None
        raise AnalysisError(f"unreadable: {error.cause or error.reason}", path) from None


# The keys readers use, by file, with the type each must have; a key of another type is dropped
# (as if absent) and listed in the problems, so one bad value cannot stop a report.
_TEXT = (str, "text")
_NUMBER = ((int, float), "a number")
_LIST = (list, "a list")
_OBJECT = (dict, "an object")
_EXPERIMENT_KEYS = {
    "name": _TEXT,
    "kind": _TEXT,
    "metric": _TEXT,
    "mode": _TEXT,
    "created": _TEXT,
    "seeds": _LIST,
    "parents": _LIST,
    "code": _OBJECT,
    "packages": _OBJECT,
    "cluster_resources": _OBJECT,
}
_STATUS_KEYS = {
    "state": _TEXT,
    "error": _TEXT,
    "attempts": _LIST,
    "wall_seconds": _NUMBER,
    "stage1": _OBJECT,
    "baseline": _OBJECT,
}
_TRIAL_KEYS = {"config": _OBJECT, "code": _OBJECT, "dataset": _TEXT, "dataset_hash": _TEXT}
_RESULTS_KEYS = {
    "timings": _OBJECT,
    "best_epochs": _OBJECT,
    "dataset_hash": _TEXT,
    "baseline": _OBJECT,
}

#: ``model`` of a DiffusionCom run (``baseline.model`` missing or ``none``).
DIFFUSIONCOM = "DiffusionCom"


def _typed(data: dict, keys: dict, path: Path, loaded: Loaded) -> dict:
    """``data`` without the keys of ``keys`` whose value has the wrong type (each listed)."""
    wrong = [
        key
        for key, (kind, _) in keys.items()
        if data.get(key) is not None
        and (not isinstance(data[key], kind) or isinstance(data[key], bool))
    ]
    for key in wrong:
        loaded.problems.append(
            (
                str(path),
                f"{key}: expected {keys[key][1]}, found {describe_json(data[key])}; ignored",
            )
        )
    return {key: value for key, value in data.items() if key not in wrong}


def _number(value):
    """``value`` when it is a number, else ``None`` (a measure written as text counts as absent)."""
    return value if isinstance(value, (int, float)) and not isinstance(value, bool) else None


@dataclass
class Loaded:
    """What :func:`load_experiments` found.

    Attributes:
        frame: the tidy frame (empty, with its columns, when nothing could be read).
        experiments: ``experiment.json`` of each experiment, by name, with ``path``,
            ``variant_order`` and ``reference`` (an ablation's reference variant, else ``None``)
            added.
        problems: ``(path, reason)`` of every folder, file or line skipped.
        curves: the learning curves, one row per run × epoch (columns :data:`CURVE_COLUMNS`).
    """

    frame: pd.DataFrame
    experiments: dict[str, dict] = field(default_factory=dict)
    problems: list[tuple[str, str]] = field(default_factory=list)
    curves: pd.DataFrame = field(default_factory=lambda: pd.DataFrame(columns=CURVE_COLUMNS))


def protocol_kind(protocol: str) -> str:
    """``clean``, ``stage1`` or ``label-using`` (the official min-of-S protocol)."""
    if protocol.startswith("official"):
        return "label-using"
    return "stage1" if protocol.startswith("stage1") else "clean"


def load_experiments(paths: list[str | Path]) -> Loaded:
    """Read experiment folders (each with ``experiment.json`` and ``runs/``)."""
    loaded = Loaded(frame=pd.DataFrame())
    rows: list[dict] = []
    curve_rows: list[dict] = []
    shared: dict[Path, list[dict]] = {}  # shared stage-1 metrics, read once however many trials
    for path in map(Path, paths):
        metadata = _read(path / EXPERIMENT.file, loaded, _EXPERIMENT_KEYS)
        if metadata is None:
            continue
        name = metadata.get("name", path.name)
        if name in loaded.experiments:
            loaded.problems.append((str(path), f"a second experiment named {name!r}; skipped"))
            continue
        metadata["path"] = str(path)
        metadata["variant_order"], metadata["reference"] = _ablation_design(
            path / STUDY_COPY, metadata.get("kind"), loaded
        )
        loaded.experiments[name] = metadata
        status_files = sorted((path / RUNS_DIR).glob(f"**/{STATUS.file}"))
        if not status_files:
            loaded.problems.append((str(path), "no runs yet (empty experiment)"))
        experiment_rows = []
        for status_file in status_files:
            run_rows, run_curve = _run_rows(path, metadata, status_file.parent, loaded, shared)
            experiment_rows += run_rows
            curve_rows += run_curve
        if metadata.get("kind") == "ablation" and metadata["reference"] is None and experiment_rows:
            cells = sorted({row["cell"] for row in experiment_rows})
            metadata["reference"] = _default_reference(cells)
        rows += experiment_rows
    frame = pd.DataFrame(rows)
    if frame.empty:
        frame = pd.DataFrame(columns=_BASE_COLUMNS)
    loaded.frame = frame
    if curve_rows:
        loaded.curves = pd.DataFrame(curve_rows).reindex(columns=CURVE_COLUMNS)
    return loaded


_BASE_COLUMNS = [
    *_RUN_COLUMNS,
    "state",
    "finished",
    "split",
    "protocol",
    "protocol_kind",
    *MEASURES,
]


def _read(path: Path, loaded: Loaded, keys: dict | None = None) -> dict | None:
    """The JSON object in ``path`` (``keys`` checked), or ``None`` with the problem listed."""
    try:
        data = read_json_object(path)
    except AnalysisError as error:
        loaded.problems.append((error.path, error.reason))
        return None
    return _typed(data, keys, path, loaded) if keys else data


def _ablation_design(
    study_file: Path, kind: str | None, loaded: Loaded
) -> tuple[list[str], str | None]:
    """``(variants in file order, reference variant)`` from an experiment's copied study file.

    The order is the paper's row order (``[]`` without a readable list of variants). The reference
    is the study's ``reference``, else ``full`` if it has such a variant, else its first; ``None``
    for other kinds or without variants. A reference that is not one of the variants is kept (its
    comparisons stay empty) and listed in ``loaded.problems``.
    """
    try:
        study = yaml.safe_load(study_file.read_text())
    except (OSError, yaml.YAMLError):
        return [], None
    variants = study.get("variants") if isinstance(study, dict) else None
    order = [str(variant) for variant in variants] if isinstance(variants, dict) else []
    if kind != "ablation" or not order:
        return order, None
    reference = study.get("reference")
    if reference is None:
        return order, _default_reference(order)
    if reference not in order:
        loaded.problems.append(
            (
                str(study_file),
                f"reference {reference!r} is not one of its variants ({', '.join(order)}): "
                "no variant has a difference to show",
            )
        )
    return order, str(reference)


def _default_reference(variants: list[str]) -> str:
    """``full`` if it is among ``variants``, else the first (as :mod:`sweeps.study` chooses)."""
    return "full" if "full" in variants else variants[0]


def _cell(kind: str, run: str, config: dict) -> tuple[str, str | None, object]:
    """``(cell, axis, axis value)`` from the run's name (``ablation/no-mgat/seed-1`` ...)."""
    parts = run.split("/")
    cell = parts[1] if len(parts) > 2 else parts[0]
    if kind == "sensitivity" and "=" in cell:
        axis = cell.split("=", 1)[0]
        return cell, axis, config.get(f"config.{axis}")
    return cell, None, None


def _read_metrics(metrics_file: Path, loaded: Loaded) -> list[dict]:
    """The epoch records of a ``metrics.jsonl``, by stage then epoch; ``[]`` when there is none.

    A line that is not a complete record (a run killed mid-write, or one still writing) is
    skipped and listed in ``loaded.problems``. Should an epoch appear twice (a run killed between
    its record and its checkpoint repeats it), the later record is kept.
    """
    if not metrics_file.is_file():
        return []
    try:
        lines = store.read_jsonl(metrics_file, METRICS)
    except StoreError as error:
        loaded.problems.append((error.path, error.reason))
        return []
    records: dict[tuple[int, int], dict] = {}
    skipped = []
    for line in lines.lines:
        record = line.value
        if not (
            isinstance(record, dict)
            and record.get("stage") in (1, 2)
            and isinstance(record.get("epoch"), int)
        ):
            skipped.append(line.number)
            continue
        records[(record["stage"], record["epoch"])] = record
    if skipped:
        shown = ", ".join(map(str, skipped[:5])) + (", ..." if len(skipped) > 5 else "")
        loaded.problems.append(
            (
                str(metrics_file),
                f"line{'s' if len(skipped) > 1 else ''} {shown} of {lines.count} not a complete "
                "epoch record (cut by a kill, or still being written); skipped",
            )
        )
    return [records[key] for key in sorted(records)]


def _epochs(records: list[dict]) -> dict:
    """Best (by valid clean MRR, final stage) and last epochs of a run's own epoch records."""
    if not records:
        return {}
    last = records[-1]
    final_stage = last.get("stage")
    evaluated = [
        r
        for r in records
        if r.get("stage") == final_stage and _number(r.get("valid.clean.mrr")) is not None
    ]
    best = max(evaluated, key=lambda r: r["valid.clean.mrr"], default=None)
    return {
        "last_stage": final_stage,
        "last_epoch": last.get("epoch"),
        "valid_mrr_last_epoch": next(
            (
                r["valid.clean.mrr"]
                for r in reversed(records)
                if _number(r.get("valid.clean.mrr")) is not None
            ),
            None,
        ),
        "best_epoch": best["epoch"] if best else None,
        "valid_mrr_best_epoch": best["valid.clean.mrr"] if best else None,
        "_best_record": best,
    }


def _shared_stage1(
    experiment: Path, status: dict, loaded: Loaded, shared: dict[Path, list[dict]]
) -> list[dict]:
    """Stage-1 records of the shared stage-1 run a trial used (``status.json``'s ``stage1``).

    Looked up under this experiment first (it may have been copied elsewhere), then beside the
    checkpoint the trial loaded (a parent experiment's, for one that extends another).
    """
    stage1 = status.get("stage1") or {}
    key = stage1.get("key")
    if not key:
        return []
    candidates = [experiment / STAGE1_DIR / str(key) / STAGE1_RUN / METRICS.file]
    if isinstance(stage1.get("checkpoint"), str):
        candidates.append(Path(stage1["checkpoint"]).parent.parent / METRICS.file)
    for candidate in candidates:
        if candidate.is_file():
            if candidate not in shared:
                shared[candidate] = _read_metrics(candidate, loaded)
            return [r for r in shared[candidate] if r["stage"] == 1]
    return []


def _curve_rows(
    identity: dict, own: list[dict], shared_stage1: list[dict], stage1_epochs: object
) -> list[dict]:
    """One row per epoch of a run: its own records, after the shared stage 1 when it has none.

    Stage 2's ``global_epoch`` continues after the last stage-1 epoch recorded (early stopping
    may end stage 1 before ``train.stage1_epochs``); with no stage-1 record at all, after the
    configured ``stage1_epochs``.
    """
    sources = [("run", r) for r in own]
    if shared_stage1 and not any(r["stage"] == 1 for r in own):
        sources = [("shared stage 1", r) for r in shared_stage1] + sources
    stage1_last = max((r["epoch"] for _, r in sources if r["stage"] == 1), default=None)
    if stage1_last is None:
        stage1_last = stage1_epochs if isinstance(stage1_epochs, int) else 0
    rows = []
    for source, record in sources:
        offset = stage1_last if record["stage"] == 2 else 0
        rows.append(
            {
                **identity,
                "source": source,
                "stage": record["stage"],
                "epoch": record["epoch"],
                "global_epoch": offset + record["epoch"],
                **{key: record.get(key) for key in _RECORD_KEYS},
                **{f"valid_{m}": record.get(f"valid.clean.{m}") for m in MEASURES},
                "early_stopped": bool(record.get("early_stopped", False)),
            }
        )
    return rows


def _run_rows(
    experiment: Path,
    metadata: dict,
    run_dir: Path,
    loaded: Loaded,
    shared: dict[Path, list[dict]],
) -> tuple[list[dict], list[dict]]:
    """The run's rows of the tidy frame and of the learning curves."""
    run = run_dir.relative_to(experiment / RUNS_DIR).as_posix()
    status = _read(run_dir / STATUS.file, loaded, _STATUS_KEYS)
    if status is None:
        return [], []
    config_tree = _read(run_dir / CONFIG.file, loaded) if (run_dir / CONFIG.file).exists() else None
    provenance = (
        _read(run_dir / TRIAL.file, loaded, _TRIAL_KEYS) if (run_dir / TRIAL.file).exists() else {}
    ) or {}
    config = flatten(config_tree or provenance.get("config") or {}, "config.")
    cell, axis, axis_value = _cell(metadata.get("kind", ""), run, config)
    records = _read_metrics(run_dir / METRICS.file, loaded)
    epochs = _epochs(records)
    best_record = epochs.pop("_best_record", None)
    stage1 = status.get("stage1") or {}
    model = _model(config, run_dir, loaded)
    common = {
        "experiment": metadata.get("name", experiment.name),
        "kind": metadata.get("kind"),
        "run": run,
        "cell": cell,
        "axis": axis,
        "axis_value": axis_value,
        "seed": status.get("seed", config.get("config.seed")),
        "state": status.get("state", "running"),
        "error": status.get("error"),
        "attempts": len(status.get("attempts", [])),
        "wall_seconds": status.get("wall_seconds"),
        "model": model,
        "baseline": model != DIFFUSIONCOM,
        "stage1_reused": stage1.get("reused"),
        "stage1_seconds": _number(stage1.get("train_seconds")),
        "dataset": provenance.get("dataset", config.get("config.data.dataset")),
        "dataset_hash": provenance.get("dataset_hash"),
        "code_revision": (provenance.get("code") or {}).get("revision"),
        "run_path": str(run_dir),
        **_budget_columns(model, config, status, None),
        **epochs,
        **config,
    }
    identity = {
        k: common[k] for k in ("experiment", "kind", "run", "cell", "axis", "axis_value", "seed")
    }
    curve = _curve_rows(
        identity,
        records,
        _shared_stage1(experiment, status, loaded, shared),
        config.get("config.train.stage1_epochs"),
    )
    results = None
    if common["state"] == "finished":
        results = _read(run_dir / RESULTS.file, loaded, _RESULTS_KEYS)
        if results is None:
            common["state"] = "damaged"
    if results is None:
        return [_unfinished_row(common, best_record)], curve
    rows = []
    timings = results.get("timings", {})
    common["train_seconds"] = _number(timings.get("train_seconds"))
    common["cpu_seconds"] = _number(timings.get("cpu_seconds"))
    # A baseline trains no stage 1: a stage1 entry in its status would not be time it spent.
    stage1_seconds = None if common["baseline"] else common["stage1_seconds"]
    common["total_train_seconds"] = (
        None
        if common["train_seconds"] is None
        else common["train_seconds"] + (stage1_seconds or 0.0)
    )
    common.update(_budget_columns(model, config, status, results))
    common["dataset_hash"] = common["dataset_hash"] or results.get("dataset_hash")
    common["final_stage"] = results.get("final_stage")
    # The trainer's own record of the epoch it selected; a run whose stage 1 came from a shared
    # stage-1 run has no epochs of its own in metrics.jsonl.
    selected = (results.get("best_epochs") or {}).get(f"stage{common['final_stage']}")
    if isinstance(selected, int) and not isinstance(selected, bool):
        common["best_epoch"] = selected
    for split in ("valid", "test"):
        section = results.get(split)
        if not isinstance(section, dict):
            loaded.problems.append((str(run_dir / RESULTS.file), f"no {split} section"))
            continue
        for protocol, values in section.items():
            if protocol == "clean_all" or not isinstance(values, dict):
                continue
            rows.append(
                {
                    **common,
                    "finished": True,
                    "split": split,
                    "protocol": protocol,
                    "protocol_kind": protocol_kind(protocol),
                    "inference_ms_per_query": section.get("inference_ms_per_query"),
                    "ranks_file": str(run_dir / ranks_file(split))
                    if (run_dir / ranks_file(split)).is_file() and protocol == "clean"
                    else None,
                    **{m: _number(values.get(m)) for m in MEASURES},
                }
            )
    if not rows:  # a results.json with no split in it holds no result at all
        common["state"] = "damaged"
        return [_unfinished_row(common, best_record)], curve
    return rows, curve


def _model(config: dict, run_dir: Path, loaded: Loaded) -> str:
    """:data:`DIFFUSIONCOM`, or the baseline model the run's ``baseline.model`` names.

    A config without the key (written before baselines existed) or with ``none`` is DiffusionCom;
    a value that is not text is listed in ``loaded.problems`` and read as DiffusionCom.
    """
    name = config.get("config.baseline.model")
    if name is None or name == "none":
        return DIFFUSIONCOM
    if not isinstance(name, str):
        loaded.problems.append(
            (
                str(run_dir / CONFIG.file),
                f"baseline.model: expected text, found {describe_json(name)}; read as "
                f"{DIFFUSIONCOM}",
            )
        )
        return DIFFUSIONCOM
    return name


def dataset_labels(frame: pd.DataFrame) -> pd.Series:
    """Each row's dataset as a readable label, one label per dataset (indexed as ``frame``).

    Two runs are of one dataset when their ``dataset_hash`` (the graph's content: ids, splits,
    texts, images) is the same, which also tells apart two folders of one name. A run without a
    hash (one that stopped before recording it, or written by hand) is known by its name, and is
    of the dataset with that name and a hash when there is exactly one. The name is the config's
    ``data.dataset`` (else the ``dataset`` the run recorded), followed by ``(entity_text=...)``
    when the entities' text is not the dataset's own: ``umls (entity_text=anonymous)``. Should two
    datasets share a name, each label adds the first 8 characters of its hash in brackets
    (``[no hash]`` for one without).
    """
    names = []
    for configured, recorded, text in zip(
        _values(frame, "config.data.dataset"),
        _values(frame, "dataset"),
        _values(frame, "config.data.entity_text"),
        strict=True,
    ):
        name = str(next((v for v in (configured, recorded) if _given(v)), "unknown dataset"))
        names.append(
            name + (f" (entity_text={text})" if _given(text) and text != "dataset" else "")
        )
    hashes = [str(h) if _given(h) else None for h in _values(frame, "dataset_hash")]
    hashes_of: dict[str, set[str]] = {}
    for digest, name in zip(hashes, names, strict=True):
        if digest:
            hashes_of.setdefault(name, set()).add(digest)
    keys = []
    for digest, name in zip(hashes, names, strict=True):
        known = hashes_of.get(name, set())
        if digest is None and len(known) == 1:  # e.g. a run that failed before recording it
            digest = next(iter(known))
        keys.append((digest, None if digest else name))
    name_of: dict[tuple, str] = {}
    for key, name in zip(keys, names, strict=True):
        name_of.setdefault(key, name)  # one hash, one label, whatever the runs called it
    shared = {name for name, count in Counter(name_of.values()).items() if count > 1}
    labels = {
        key: f"{name} [{key[0][:8] if key[0] else 'no hash'}]" if name in shared else name
        for key, name in name_of.items()
    }
    return pd.Series([labels[key] for key in keys], index=frame.index, dtype=object)


def _values(frame: pd.DataFrame, column: str) -> list:
    return frame[column].tolist() if column in frame else [None] * len(frame)


def _given(value) -> bool:
    """Whether a cell holds a value (not ``None``, NaN or empty text)."""
    return value is not None and value == value and value != ""


def _budget_columns(model: str, config: dict, status: dict, results: dict | None) -> dict:
    """A baseline run's budget and how it ended (``baseline_*`` columns; ``None`` for DiffusionCom).

    ``results.json``'s ``baseline`` (what ran) comes first, then ``status.json``'s, then the
    config's; a budget of ``0`` seconds (the config's "no budget") is ``None``.
    """
    names = (
        "budget_seconds",
        "clock",
        "epochs",
        "epochs_run",
        "best_epoch",
        "stopped_by",
        "matched_to",
    )
    if model == DIFFUSIONCOM:
        return {f"baseline_{name}": None for name in names}
    sources = [
        (results or {}).get("baseline") or {},
        status.get("baseline") or {},
        {key.removeprefix("config.baseline."): value for key, value in config.items()},
    ]
    found = {}
    for name in names:
        value = next((source[name] for source in sources if source.get(name) is not None), None)
        if name in ("budget_seconds", "epochs", "epochs_run", "best_epoch"):
            value = _number(value)
        elif value is not None and not isinstance(value, str):
            value = None
        found[f"baseline_{name}"] = value
    if not found["baseline_budget_seconds"]:
        found["baseline_budget_seconds"] = None
    return found


def _unfinished_row(common: dict, best_record: dict | None) -> dict:
    """The one row of a run without results: its best valid epoch so far, if any."""
    measures = {
        m: _number(best_record.get(f"valid.clean.{m}")) if best_record else None for m in MEASURES
    }
    return {
        **common,
        "finished": False,
        "split": "valid",
        "protocol": "clean",
        "protocol_kind": "clean",
        **measures,
    }
