"""Experiment folders written by hand, in the layout the trial runner writes.

For what the real pipeline (``conftest.py``) cannot produce on demand: chosen per-query ranks,
many runs, early stopping at a given epoch, a cut ``metrics.jsonl`` line, a shared stage 1, and
classical baselines' runs (:func:`write_baseline_run`, in the layout of the baselines contract:
``config.json``'s ``baseline`` section, ``results.json``'s ``baseline`` and ``timings``, ranks).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

MEASURES = ("mr", "mrr", "hits@1", "hits@3", "hits@10")

# core.config's ``baseline`` section as a DiffusionCom run written after baselines existed has it.
BASELINE_DEFAULTS = {
    "model": "none",
    "embedding_dim": 200,
    "lr": 0.01,
    "batch_size": 256,
    "epochs": 1000,
    "budget_seconds": 0.0,
    "clock": "cpu",
    "patience": 0,
}


def write_experiment(
    root: Path, name: str, kind: str, variants: list[str] = (), reference: str | None = None
) -> Path:
    """``experiment.json`` (and ``study.yaml`` listing ``variants`` in order, for an ablation,
    with ``reference: <reference>`` when given)."""
    folder = root / name
    folder.mkdir(parents=True)
    (folder / "experiment.json").write_text(
        json.dumps({"name": name, "kind": kind, "metric": "valid.clean.mrr", "mode": "max"})
    )
    if variants:
        lines = ["variants:"] + [f"  {v}: []" for v in variants]
        if reference is not None:
            lines.append(f"reference: {reference}")
        (folder / "study.yaml").write_text("\n".join(lines) + "\n")
    return folder


def write_ablation(
    root: Path,
    name: str,
    shifts: dict[str, float],
    *,
    reference: str | None = None,
    seeds=(0, 1),
    queries: int = 200,
    data: dict | None = None,
    dataset_hash: str | None = None,
) -> tuple[Path, dict[str, np.ndarray]]:
    """An ablation whose variant ``v`` ranks every query ``shifts[v]`` (plus the seed) worse.

    Variants are ``shifts``' keys in order; every run stores its test ranks. ``data`` and
    ``dataset_hash`` are every run's (:func:`write_run`).

    Returns:
        The experiment folder and each variant's ``(S, Q)`` reciprocal ranks, seeds in order.
    """
    experiment = write_experiment(root, name, "ablation", list(shifts), reference=reference)
    base = np.random.default_rng(0).integers(1, 20, queries).astype(float)
    arms = {}
    for variant, shift in shifts.items():
        per_seed = []
        for seed in seeds:
            ranks = base + shift + seed
            write_run(
                experiment,
                f"ablation/{variant}/seed-{seed}",
                seed=seed,
                realistic=ranks,
                data=data,
                results_extra={"dataset_hash": dataset_hash} if dataset_hash else None,
            )
            per_seed.append(1 / ranks)
        arms[variant] = np.stack(per_seed)
    return experiment, arms


def epochs(
    stage: int, count: int, *, start_mrr: float = 0.3, step: float = 0.01, early_stop: bool = False
) -> list[dict]:
    """``count`` epoch records of ``stage`` with a rising valid MRR and a falling loss."""
    records = []
    for epoch in range(1, count + 1):
        record = {
            "stage": stage,
            "epoch": epoch,
            "loss": 1.0 / (epoch + 1) + (0.2 if stage == 2 else 0.0),
            "lr": 1e-3,
            "train_seconds": 0.1,
            "valid.clean.mrr": start_mrr + step * epoch,
            "valid.clean.hits@1": start_mrr / 2 + step * epoch,
        }
        if stage == 2:
            record.update(kl=0.01, bce=0.5)
        records.append(record)
    if early_stop and records:
        records[-1]["early_stopped"] = True
    return records


def ranks_measures(realistic: np.ndarray) -> dict:
    """The clean-protocol measures of ``(Q,)`` realistic ranks, as ``core.evaluation`` has them."""
    return {
        "mr": float(realistic.mean()),
        "mrr": float((1.0 / realistic).mean()),
        **{f"hits@{k}": float((realistic <= k).mean()) for k in (1, 3, 10)},
    }


def write_run(
    experiment: Path,
    run: str,
    *,
    seed: int,
    records: list[dict] = (),
    realistic: np.ndarray | None = None,
    stage1_epochs: int = 5,
    stage1: dict | None = None,
    metrics_text: str | None = None,
    baseline: dict | None = None,
    valid: dict | None = None,
    timings: dict | None = None,
    results_extra: dict | None = None,
    status_extra: dict | None = None,
    final_stage: int = 2,
    data: dict | None = None,
) -> Path:
    """A finished run: ``status.json``, ``config.json``, ``metrics.jsonl``, ``results.json``.

    Args:
        run: e.g. ``ablation/full/seed-0``.
        records: its own epoch records (written one JSON object a line).
        realistic: ``(Q,)`` test ranks; when given, ``ranks_test.npz`` is written (queries
            ``(Q, 3)`` numbered ``0..Q-1``) and the test measures are computed from them.
        stage1_epochs: ``train.stage1_epochs`` of its config.
        stage1: ``status.json``'s ``stage1`` (a shared stage-1 run's ``key`` and ``checkpoint``).
        metrics_text: ``metrics.jsonl`` exactly, instead of ``records``.
        baseline: ``config.json``'s ``baseline`` section (none without it: a run written
            before baselines existed).
        valid: the valid clean measures (the test ones by default).
        timings: ``results.json``'s ``timings`` (``{"train_seconds": 1.0}`` by default).
        results_extra, status_extra: keys added to ``results.json`` and ``status.json``.
        final_stage: ``results.json``'s ``final_stage`` (its ``best_epochs`` say that stage).
        data: ``config.json``'s ``data`` section (``{"dataset": "umls"}``; none by default).
    """
    folder = experiment / "runs" / run
    folder.mkdir(parents=True)
    status = {"state": "finished", "seed": seed, "attempts": [{}], "wall_seconds": 1.0}
    if stage1 is not None:
        status["stage1"] = stage1
    status.update(status_extra or {})
    (folder / "status.json").write_text(json.dumps(status))
    config = {"seed": seed, "train": {"stage1_epochs": stage1_epochs, "stage2_epochs": 3}}
    if baseline is not None:
        config["baseline"] = baseline
    if data is not None:
        config["data"] = data
    (folder / "config.json").write_text(json.dumps(config))
    text = "".join(json.dumps(r) + "\n" for r in records) if metrics_text is None else metrics_text
    if text:
        (folder / "metrics.jsonl").write_text(text)
    if realistic is None:
        test = dict(zip(MEASURES, (2.0, 0.5, 0.3, 0.6, 0.9), strict=True))
    else:
        realistic = np.asarray(realistic, dtype=float)
        queries = np.stack([np.arange(len(realistic))] * 3, axis=1)
        np.savez(folder / "ranks_test.npz", queries=queries, realistic=realistic)
        test = ranks_measures(realistic)
    results = {
        "final_stage": final_stage,
        "valid": {"clean": valid or test, "inference_ms_per_query": 0.1},
        "test": {"clean": test, "inference_ms_per_query": 0.1},
        "best_epochs": {f"stage{final_stage}": 1},
        "timings": {"train_seconds": 1.0} if timings is None else timings,
        **(results_extra or {}),
    }
    (folder / "results.json").write_text(json.dumps(results))
    return folder


def write_shared_stage1(experiment: Path, key: str, records: list[dict]) -> dict:
    """A shared stage-1 run under ``stage1/<key>/run``; returns the ``stage1`` a trial records."""
    folder = experiment / "stage1" / key / "run"
    folder.mkdir(parents=True)
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return {"key": key, "reused": True, "checkpoint": str(folder / "checkpoints" / "last.pt")}


def write_baseline_run(
    experiment: Path,
    run: str,
    *,
    seed: int,
    model: str,
    realistic: np.ndarray,
    valid_mrr: float = 0.4,
    budget_seconds: float | None = None,
    clock: str = "cpu",
    max_epochs: int = 1000,
    epochs_run: int = 5,
    settings: dict | None = None,
    train_seconds: float = 2.0,
    cpu_seconds: float = 3.0,
    matched_to: str | None = None,
    data: dict | None = None,
    dataset_hash: str | None = None,
) -> Path:
    """A finished baseline run (``ablation/pykeen-tucker/seed-0`` ...), as the contract has it.

    Args:
        model: ``baseline.model`` (``pykeen:TuckER`` ...).
        realistic: ``(Q,)`` test ranks (``ranks_test.npz``; the test measures come from them).
        valid_mrr: its valid clean MRR (other valid measures fixed).
        budget_seconds: the resolved time budget (``None``: no time budget, written as ``0.0``
            in the config and ``null`` in the results).
        max_epochs: ``baseline.epochs``, the most epochs it may train.
        epochs_run: epochs it trained (``results.json``'s ``baseline.epochs_run``).
        settings: other ``baseline.*`` values it was given (``{"lr": 0.003}``).
        train_seconds, cpu_seconds: ``results.json``'s ``timings``.
        matched_to: the reference run whose time it was given (``status.json``'s ``baseline``).
        data, dataset_hash: ``config.json``'s ``data`` and ``results.json``'s ``dataset_hash``.
    """
    config = {
        **BASELINE_DEFAULTS,
        **(settings or {}),
        "model": model,
        "epochs": max_epochs,
        "budget_seconds": budget_seconds or 0.0,
        "clock": clock,
    }
    stopped_by = "budget" if budget_seconds else "epochs"
    return write_run(
        experiment,
        run,
        seed=seed,
        records=[{**record, "valid.clean.mrr": valid_mrr} for record in epochs(1, epochs_run)],
        realistic=realistic,
        baseline=config,
        valid={"mr": 3.0, "mrr": valid_mrr, "hits@1": 0.3, "hits@3": 0.5, "hits@10": 0.7},
        timings={"train_seconds": train_seconds, "cpu_seconds": cpu_seconds},
        results_extra={
            "baseline": {
                "model": model,
                "epochs_run": epochs_run,
                "best_epoch": epochs_run,
                "budget_seconds": budget_seconds,
                "clock": clock,
                "stopped_by": stopped_by,
            },
            **({"dataset_hash": dataset_hash} if dataset_hash else {}),
        },
        status_extra={
            "baseline": {
                "model": model,
                "budget_seconds": budget_seconds,
                "clock": clock,
                "matched_to": matched_to,
            }
        },
        final_stage=1,
        data=data,
    )
