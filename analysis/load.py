"""Experiment folders → one tidy pandas frame (files only: no ``core``, no ``ray``).

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
A folder that cannot be read is listed in :attr:`Loaded.problems` and skipped, never fatal.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import yaml

__all__ = ["MEASURES", "Loaded", "load_experiments", "protocol_kind"]

MEASURES = ("mr", "mrr", "hits@1", "hits@3", "hits@10")


@dataclass
class Loaded:
    """What :func:`load_experiments` found.

    Attributes:
        frame: the tidy frame (empty, with its columns, when nothing could be read).
        experiments: ``experiment.json`` of each experiment, by name, with ``path`` added.
        problems: ``(path, reason)`` of every folder or file skipped.
    """

    frame: pd.DataFrame
    experiments: dict[str, dict] = field(default_factory=dict)
    problems: list[tuple[str, str]] = field(default_factory=list)


def protocol_kind(protocol: str) -> str:
    """``clean``, ``stage1`` or ``label-using`` (the official min-of-S protocol)."""
    if protocol.startswith("official"):
        return "label-using"
    return "stage1" if protocol.startswith("stage1") else "clean"


def load_experiments(paths: list[str | Path]) -> Loaded:
    """Read experiment folders (each with ``experiment.json`` and ``runs/``)."""
    loaded = Loaded(frame=pd.DataFrame())
    rows: list[dict] = []
    for path in map(Path, paths):
        metadata = _read(path / "experiment.json", loaded)
        if metadata is None:
            continue
        name = metadata.get("name", path.name)
        if name in loaded.experiments:
            loaded.problems.append((str(path), f"a second experiment named {name!r}; skipped"))
            continue
        metadata["path"] = str(path)
        metadata["variant_order"] = _variant_order(path / "study.yaml")
        loaded.experiments[name] = metadata
        status_files = sorted((path / "runs").glob("**/status.json"))
        if not status_files:
            loaded.problems.append((str(path), "no runs yet (empty experiment)"))
        for status_file in status_files:
            rows += _run_rows(path, metadata, status_file.parent, loaded)
    frame = pd.DataFrame(rows)
    if frame.empty:
        frame = pd.DataFrame(columns=_BASE_COLUMNS)
    loaded.frame = frame
    return loaded


_BASE_COLUMNS = [
    "experiment",
    "kind",
    "run",
    "cell",
    "axis",
    "axis_value",
    "seed",
    "state",
    "finished",
    "split",
    "protocol",
    "protocol_kind",
    *MEASURES,
]


def _read(path: Path, loaded: Loaded):
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        loaded.problems.append((str(path), "missing"))
    except (json.JSONDecodeError, UnicodeDecodeError, OSError) as error:
        loaded.problems.append((str(path), f"unreadable: {error}"))
    return None


def _variant_order(study_file: Path) -> list[str]:
    """Ablation variants in the order the study file lists them (the paper's row order)."""
    try:
        study = yaml.safe_load(study_file.read_text())
    except (OSError, yaml.YAMLError):
        return []
    variants = study.get("variants") if isinstance(study, dict) else None
    return list(variants) if isinstance(variants, dict) else []


def _cell(kind: str, run: str, config: dict) -> tuple[str, str | None, object]:
    """``(cell, axis, axis value)`` from the run's name (``ablation/no-mgat/seed-1`` ...)."""
    parts = run.split("/")
    cell = parts[1] if len(parts) > 2 else parts[0]
    if kind == "sensitivity" and "=" in cell:
        axis = cell.split("=", 1)[0]
        return cell, axis, config.get(f"config.{axis}")
    return cell, None, None


def _flatten(tree: dict, prefix: str) -> dict:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _epochs(metrics_file: Path) -> dict:
    """Best (by valid clean MRR, final stage) and last epochs of a run's ``metrics.jsonl``."""
    records = []
    if metrics_file.is_file():
        for line in metrics_file.read_text().splitlines():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # a line cut by a kill; the trainer drops it on resume
    if not records:
        return {}
    last = records[-1]
    final_stage = last.get("stage")
    evaluated = [r for r in records if r.get("stage") == final_stage and "valid.clean.mrr" in r]
    best = max(evaluated, key=lambda r: r["valid.clean.mrr"], default=None)
    return {
        "last_stage": final_stage,
        "last_epoch": last.get("epoch"),
        "valid_mrr_last_epoch": next(
            (r["valid.clean.mrr"] for r in reversed(records) if "valid.clean.mrr" in r), None
        ),
        "best_epoch": best["epoch"] if best else None,
        "valid_mrr_best_epoch": best["valid.clean.mrr"] if best else None,
        "_best_record": best,
    }


def _run_rows(experiment: Path, metadata: dict, run_dir: Path, loaded: Loaded) -> list[dict]:
    run = run_dir.relative_to(experiment / "runs").as_posix()
    status = _read(run_dir / "status.json", loaded)
    if status is None:
        return []
    config_tree = (
        _read(run_dir / "config.json", loaded) if (run_dir / "config.json").exists() else None
    )
    provenance = (
        _read(run_dir / "trial.json", loaded) if (run_dir / "trial.json").exists() else {}
    ) or {}
    config = _flatten(config_tree or provenance.get("config") or {}, "config.")
    cell, axis, axis_value = _cell(metadata.get("kind", ""), run, config)
    epochs = _epochs(run_dir / "metrics.jsonl")
    best_record = epochs.pop("_best_record", None)
    stage1 = status.get("stage1") or {}
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
        "stage1_reused": stage1.get("reused"),
        "stage1_seconds": stage1.get("train_seconds"),
        "dataset": provenance.get("dataset", config.get("config.data.dataset")),
        "dataset_hash": provenance.get("dataset_hash"),
        "code_revision": (provenance.get("code") or {}).get("revision"),
        "run_path": str(run_dir),
        **epochs,
        **config,
    }
    results = None
    if common["state"] == "finished":
        results = _read(run_dir / "results.json", loaded)
        if results is None:
            common["state"] = "damaged"
    if results is None:
        if best_record is None:
            return [
                {
                    **common,
                    "finished": False,
                    "split": "valid",
                    "protocol": "clean",
                    "protocol_kind": "clean",
                }
            ]
        measures = {m: best_record.get(f"valid.clean.{m}") for m in MEASURES}
        return [
            {
                **common,
                "finished": False,
                "split": "valid",
                "protocol": "clean",
                "protocol_kind": "clean",
                **measures,
            }
        ]
    rows = []
    common["train_seconds"] = results.get("timings", {}).get("train_seconds")
    common["dataset_hash"] = common["dataset_hash"] or results.get("dataset_hash")
    common["final_stage"] = results.get("final_stage")
    # The trainer's own record of the epoch it selected; a run whose stage 1 came from a shared
    # stage-1 run has no epochs of its own in metrics.jsonl.
    selected = (results.get("best_epochs") or {}).get(f"stage{common['final_stage']}")
    if selected is not None:
        common["best_epoch"] = selected
    for split in ("valid", "test"):
        section = results.get(split)
        if not isinstance(section, dict):
            loaded.problems.append((str(run_dir / "results.json"), f"no {split} section"))
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
                    "ranks_file": str(run_dir / f"ranks_{split}.npz")
                    if (run_dir / f"ranks_{split}.npz").is_file() and protocol == "clean"
                    else None,
                    **{m: values.get(m) for m in MEASURES},
                }
            )
    return rows
