"""One trial of a sweep as plain Python: stage-1 reuse, core training, provenance, reports.

:func:`run_trial` is everything a Ray trial does, written without Ray: the adapter in
:mod:`sweeps.ray_adapter` hands it a ``report`` function that forwards to Tune, tests hand it a list.
A trial trains one config per seed (one for an ablation or sensitivity cell, one per study seed
for a drawn search point), each in its own run folder under ``<experiment>/runs/``. Each run's
epochs and result also go to the trackers the experiment recorded (:mod:`sweeps.tracking`:
TensorBoard, MLflow), which never stop training.

A baseline run (``baseline.model`` set, see :mod:`core.baselines`) has no stage 1 to share. With
``baseline_budget: match`` (:attr:`RunSpec.match_to`) its budget is the cost of the reference run
of the same seed, known once that run has finished: the trial waits for it (``status.json``
state ``waiting``, ``waiting_for`` that run), then trains with :func:`matched_budget` as
``baseline.budget_seconds``, which its ``config.json`` and ``trial.json`` hold, and fails if the
reference failed. A restarted baseline keeps the budget it resolved the first time.
"""

from __future__ import annotations

import dataclasses
import os
import socket
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from core.config import ExperimentConfig, config_to_dict
from core.train.checkpoint import CheckpointError, load_checkpoint
from core.train.trainer import NonFiniteLossError, load_run_dataset, train
from runstore import (
    CONFIG,
    EXPERIMENT,
    METRICS,
    RESULTS,
    RUNS_DIR,
    STATUS,
    TRIAL,
    checkpoint_path,
    flatten_results,
)
from sweeps.experiment import (
    ExperimentError,
    code_revision,
    now,
    package_versions,
    read_json_object,
    write_json,
)
from sweeps.stage1 import Stage1Store, stage1_key
from sweeps.tracking import open_run

__all__ = [
    "MATCH_POLL_SECONDS",
    "NON_FINITE",
    "RunSpec",
    "TrialFailed",
    "flatten_results",
    "matched_budget",
    "run_trial",
]

#: ``status.json`` ``failure`` of a run whose loss became NaN or infinite. Such a failure repeats
#: exactly on a retry from the same checkpoint, so a retried or resumed run fails at once instead.
NON_FINITE = "non-finite-loss"

#: Seconds between two looks at the reference run a ``match`` baseline waits for: that run takes
#: minutes to hours, and each look rewrites the waiting run's ``status.json`` (its heartbeat).
MATCH_POLL_SECONDS = 15.0

#: What a trial calls after each epoch and each finished run. It may return the last global epoch
#: whose checkpoint the experiment's storage now holds (a bucket that takes checkpoints every N
#: epochs: :mod:`sweeps.remote`); ``None`` means every epoch so far (a shared folder, written
#: before the report). Trackers log an epoch only once it is stored, so a resumed run, which
#: trains again what its checkpoint lacks, never logs an epoch twice.
Report = Callable[[dict], "int | None"]


class TrialFailed(RuntimeError):
    """A run of the trial failed; the message names the run folder and the reason."""


@dataclass(frozen=True)
class RunSpec:
    """One core run of a trial: its folder under ``runs/`` and its full config.

    ``match_to``: for a baseline run whose budget is ``match``, the reference run (its folder under
    ``runs/``) whose cost becomes ``baseline.budget_seconds`` once it has finished.
    """

    name: str
    config: ExperimentConfig
    match_to: str | None = None


def run_trial(
    experiment: Path,
    trial: str,
    runs: list[RunSpec],
    report: Report,
    *,
    is_main: bool = True,
    share: Callable[[object], object] = lambda value: value,
    node: str | None = None,
) -> dict:
    """Train every run of a trial in turn, reporting each epoch and each finished run.

    Args:
        experiment: the experiment folder.
        trial: the trial's name (logged with stage-1 reuse).
        runs: the runs, one per seed.
        report: called with the metrics after each epoch and after each run (see
            :data:`Report`). The run's own ``checkpoints/last.pt`` (on the experiment's shared
            storage) is what a restarted trial resumes from; the scheduler keeps no copy.
        is_main, share: for multi-process trials (see :meth:`Stage1Store.obtain`).
        node: where this attempt runs (a Ray node id), recorded in ``status.json``.

    Returns:
        The last report: the mean over finished runs of each flattened result metric.

    Raises:
        TrialFailed: a run failed (NaN loss, bad checkpoint, any error); its ``status.json``
            says why, and the trial's earlier runs stay finished.
    """
    experiment = Path(experiment)
    metadata = read_json_object(experiment / EXPERIMENT.file)
    store = Stage1Store.of_experiment(experiment, metadata)
    finished: list[dict] = []
    for spec in runs:
        run_dir = experiment / RUNS_DIR / spec.name
        results_file = run_dir / RESULTS.file
        status_file = run_dir / STATUS.file
        status = read_json_object(status_file) if status_file.is_file() else {"attempts": []}
        if status.get("state") == "finished" and results_file.is_file():
            finished.append(read_json_object(results_file))
            continue
        if status.get("failure") == NON_FINITE:
            raise TrialFailed(f"{run_dir}: {status['error']} (not retried: it would repeat)")
        resumed_from = _progress(checkpoint_path(run_dir))
        baseline = _baseline_model(spec.config)
        budget = _resolved_budget(run_dir, status) if spec.match_to else None
        waits = spec.match_to is not None and budget is None

        status.update(
            state="waiting" if waits else "running",
            seed=spec.config.seed,
            host=socket.gethostname(),
            pid=os.getpid(),
            error=None,
            failure=None,
        )
        status["attempts"].append(
            {"started": now(), "host": status["host"], "node": node, "resumed_from": resumed_from}
        )
        if waits:
            try:
                budget = _wait_for_budget(experiment, spec, status, status_file, is_main)
            except (KeyboardInterrupt, SystemExit):
                status.update(state="stopped", stopped=now())
                if is_main:
                    write_json(status_file, status)
                raise
            except Exception as error:  # the reference failed, or its files are damaged
                reason = str(error)
                if not isinstance(error, TrialFailed):
                    reason = f"{type(error).__name__}: {reason}"
                _fail(status, status_file, reason, "reference", is_main)
                raise TrialFailed(f"{run_dir}: {reason}") from error
        if budget is not None:
            # What runs is what config.json and trial.json say: the resolved budget in the config.
            spec = dataclasses.replace(
                spec,
                config=dataclasses.replace(
                    spec.config,
                    baseline=dataclasses.replace(spec.config.baseline, budget_seconds=budget),
                ),
            )
        if baseline is not None:
            status.pop("waiting_for", None)
            status.update(state="running", baseline=_baseline_record(spec))
        if is_main:
            write_json(status_file, status)
            _write_provenance(run_dir, trial, spec, metadata)
        tracker = _open_tracker(
            experiment, metadata, run_dir, trial, spec, status, resumed_from, is_main
        )

        def on_epoch(record: dict, spec=spec, run_dir=run_dir, status=status, tracker=tracker):
            if is_main:
                _record_epoch(run_dir, status, record)
            tracker.queue(record)
            tracker.log_stored(report(_epoch_report(spec, record)))

        def on_shared_stage1_epoch(record: dict, spec=spec, tracker=tracker) -> None:
            # This trial trains the shared stage-1 run: its epochs are this trial's progress too
            # (schedulers such as ASHA see them), and the first epochs of its tracked curves.
            tracker.queue(record)
            tracker.log_stored(report(_epoch_report(spec, record, stage1_shared=True)))

        started = time.perf_counter()
        try:
            stage1 = None
            if resumed_from is None and baseline is None:
                # Recorded before waiting for or training the shared stage 1, so `status` and
                # `watch` show that stage-1 run's progress instead of a run that looks hung.
                status["stage1"] = {
                    "key": stage1_key(spec.config),
                    "trial": trial,
                    "epochs": spec.config.train.stage1_epochs,
                }
                if is_main:
                    write_json(status_file, status)
                stage1 = store.obtain(
                    spec.config,
                    lambda config, folder: train(
                        config, folder, progress=False, callback=on_shared_stage1_epoch
                    ),
                    trial=trial,
                    is_main=is_main,
                    share=share,
                )
                status["stage1"] = {
                    "key": stage1.key,
                    "reused": not stage1.trained_here,
                    "checkpoint": str(stage1.checkpoint),
                    "train_seconds": stage1.train_seconds,
                }
                if is_main:
                    write_json(status_file, status)
                # A stage 1 another trial trained: its epochs start this run's tracked curves.
                tracker.log_metrics_file(stage1.checkpoint.parent.parent / METRICS.file)
                print(
                    f"[{trial}] stage 1 {'trained' if stage1.trained_here else 'reused'}: "
                    f"{stage1.checkpoint} (key {stage1.key}, {stage1.train_seconds:.1f} s of training)",
                    flush=True,
                )
            results = train(
                spec.config,
                run_dir,
                callback=on_epoch,
                stage1_checkpoint=stage1.checkpoint if stage1 else None,
                progress=False,
            )
        except (KeyboardInterrupt, SystemExit):
            # The scheduler stopped the trial (ASHA exits the training thread from a report) or
            # someone pressed Ctrl-C: neither is a failure, and the run is not finished.
            status.update(state="stopped", stopped=now())
            if is_main:
                write_json(status_file, status)
            tracker.stop()
            raise
        except NonFiniteLossError as error:
            _fail(status, status_file, str(error), NON_FINITE, is_main)
            tracker.fail(str(error))
            raise TrialFailed(f"{run_dir}: {error}") from error
        except Exception as error:  # recorded, then re-raised for the scheduler's retries
            reason = f"{type(error).__name__}: {error}"
            _fail(
                status, status_file, reason, type(error).__name__, is_main, traceback.format_exc()
            )
            tracker.fail(reason)
            raise TrialFailed(f"{run_dir}: {reason}") from error
        tracker.finish(results)
        # Wall time of this attempt: waiting for or training stage 1, stage 2, evaluation.
        status.update(
            state="finished", finished=now(), wall_seconds=round(time.perf_counter() - started, 2)
        )
        if is_main:
            write_json(status_file, status)
        finished.append(results)
        summary = _mean_of(finished)
        summary.update(
            final=True,
            runs_finished=len(finished),
            runs=len(runs),
            run=spec.name,
            global_epoch=spec.config.train.stage1_epochs + spec.config.train.stage2_epochs,
        )
        report(summary)
    return _mean_of(finished) | {"final": True, "runs_finished": len(finished), "runs": len(runs)}


def matched_budget(experiment: Path, reference: str, clock: str) -> float | None:
    """What the reference run ``runs/<reference>`` cost in all, once it has finished.

    The cost counted is ``clock`` seconds (``cpu``: the process CPU time that the trainer's
    ``results.json`` records as ``timings.cpu_seconds``; ``wall``: ``timings.train_seconds``) of the
    reference run itself (its stage 2 and every evaluation, or all of it when it trained its own
    stage 1) plus, when it started from a shared stage-1 run (``status.json`` ``stage1`` with a
    ``checkpoint``), the same seconds of that stage-1 run, whoever trained it: a baseline gets what
    producing the reference's result took. Shared stage 1 found by its key in this experiment's
    store or a parent's (``experiment.json`` ``parents``), else where its checkpoint was.

    Returns:
        The seconds, or ``None`` while the reference has not finished (not started, running,
        waiting or stopped: a stopped run is resumed).

    Raises:
        TrialFailed: the reference run failed, or its files lack the seconds to match.
    """
    from sweeps.remote import refresh

    refresh(experiment, f"{RUNS_DIR}/{reference}")  # from the bucket, when it lives in one
    run = Path(experiment) / RUNS_DIR / reference
    status_file = run / STATUS.file
    if not status_file.is_file():
        return None
    status = read_json_object(status_file)
    if status.get("state") == "failed":
        raise TrialFailed(
            f"the reference run {reference} failed ({status.get('error') or 'no reason given'}); "
            "a baseline with baseline_budget: match gets that run's cost as its budget: resume "
            "the experiment to retry both"
        )
    if status.get("state") != "finished" or not (run / RESULTS.file).is_file():
        return None
    key = "cpu_seconds" if clock == "cpu" else "train_seconds"
    seconds = _timing(run / RESULTS.file, key)
    stage1 = status.get("stage1")
    if isinstance(stage1, dict) and stage1.get("checkpoint"):
        seconds += _timing(_shared_stage1_run(Path(experiment), stage1) / RESULTS.file, key)
    return round(seconds, 2)


def _timing(results_file: Path, key: str) -> float:
    """``timings.<key>`` of a finished run's ``results.json``, a number > 0."""
    try:
        value = read_json_object(results_file).get("timings", {}).get(key)
    except (ExperimentError, AttributeError) as error:
        raise TrialFailed(f"cannot read the budget to match from {results_file}: {error}") from None
    if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
        raise TrialFailed(
            f"{results_file}: timings.{key}: expected the seconds the run took (> 0) to match, "
            f"found {value!r}"
        )
    return float(value)


def _shared_stage1_run(experiment: Path, stage1: dict) -> Path:
    """The folder of the shared stage-1 run a run's ``status.json`` ``stage1`` names."""
    key = stage1.get("key")
    if isinstance(key, str) and key and "/" not in key:
        store = Stage1Store.of_experiment(
            experiment, read_json_object(experiment / EXPERIMENT.file)
        )
        if (folder := store.run_folder(key)) is not None:
            return folder
    return Path(stage1["checkpoint"]).parent.parent  # <run>/checkpoints/last.pt


def _stage1_run_of(experiment: Path, status: dict) -> Path | None:
    """The shared stage-1 run folder a run started from (``status.json``'s ``stage1``), if any."""
    stage1 = status.get("stage1")
    if isinstance(stage1, dict) and stage1.get("checkpoint"):
        return _shared_stage1_run(experiment, stage1)
    return None


def _baseline_model(config: ExperimentConfig) -> str | None:
    model = config.baseline.model
    return None if model == "none" else model


def _baseline_record(spec: RunSpec) -> dict:
    """``status.json``'s and ``trial.json``'s ``baseline``: what it trains under which budget."""
    baseline = spec.config.baseline
    return {
        "model": baseline.model,
        "budget_seconds": baseline.budget_seconds or None,
        "clock": baseline.clock,
        "matched_to": spec.match_to,
    }


def _resolved_budget(run_dir: Path, status: dict) -> float | None:
    """The budget an earlier attempt of this run resolved: its ``config.json`` (what trained), or
    its ``status.json`` when it died before training; ``None`` when it never resolved one."""
    found = None
    if (run_dir / CONFIG.file).is_file():
        with_config = read_json_object(run_dir / CONFIG.file).get("baseline")
        found = with_config.get("budget_seconds") if isinstance(with_config, dict) else None
    if not found and isinstance(status.get("baseline"), dict):
        found = status["baseline"].get("budget_seconds")
    ok = isinstance(found, int | float) and not isinstance(found, bool) and found > 0
    return float(found) if ok else None


def _wait_for_budget(
    experiment: Path, spec: RunSpec, status: dict, status_file: Path, is_main: bool
) -> float:
    """Poll the reference run until it has finished; its cost is the budget.

    Every process of a multi-process trial reads the same finished files, so all get the same
    budget without talking to each other.
    """
    status["waiting_for"] = spec.match_to
    while (budget := matched_budget(experiment, spec.match_to, spec.config.baseline.clock)) is None:
        status["heartbeat"] = now()
        if is_main:
            write_json(status_file, status)
        time.sleep(MATCH_POLL_SECONDS)
    return budget


def _epoch_report(spec: RunSpec, record: dict, **extra) -> dict:
    """What the scheduler gets of one epoch record of the run ``spec``."""
    return {
        **record,
        "run": spec.name,
        "seed": spec.config.seed,
        "final": False,
        "global_epoch": _global_epoch(spec.config, record),
        **extra,
    }


def _record_epoch(run_dir: Path, status: dict, record: dict) -> None:
    """A finished epoch in the run's ``status.json``: its heartbeat, the epoch, and the
    attempt's epoch count (its rate gives ``diffcom sweep watch`` an ETA)."""
    status["heartbeat"] = now()
    status["last_epoch"] = [record["stage"], record["epoch"]]
    attempt = status["attempts"][-1]
    attempt.setdefault("first_epoch", status["heartbeat"])
    attempt["epochs"] = attempt.get("epochs", 0) + 1
    write_json(run_dir / STATUS.file, status)


def _open_tracker(
    experiment: Path,
    metadata: dict,
    run_dir: Path,
    trial: str,
    spec: RunSpec,
    status: dict,
    resumed_from: list[int] | None,
    is_main: bool = True,
):
    """The run's trackers (:func:`sweeps.tracking.open_run`), its epochs on the global axis."""
    return open_run(
        metadata,
        run_dir,
        trial=trial,
        run=spec.name,
        config=spec.config,
        resumed_from=resumed_from,
        step_of=lambda record, config=spec.config: _global_epoch(config, record),
        stage1_run=_stage1_run_of(experiment, status) if resumed_from else None,
        is_main=is_main,
    )


def _global_epoch(config: ExperimentConfig, record: dict) -> int:
    """Epochs since the run began, over both stages: the time axis schedulers compare trials on.

    A trial that reuses a shared stage 1 starts reporting at ``stage1_epochs + 1``, where a trial
    that trained it would be.
    """
    return record["epoch"] + (config.train.stage1_epochs if record["stage"] == 2 else 0)


def _mean_of(results: list[dict]) -> dict:
    flats = [flatten_results(r) for r in results]
    keys = [k for k in flats[0] if all(isinstance(f.get(k), (int, float)) for f in flats)]
    return {key: sum(f[key] for f in flats) / len(flats) for key in keys}


def _fail(status, status_file, reason, failure, is_main, details=None) -> None:
    status.update(state="failed", error=reason, failure=failure, failed=now())
    if details:
        status["traceback"] = details[-4000:]
    if is_main:
        write_json(status_file, status)


def _progress(checkpoint: Path) -> list[int] | None:
    """``[stage, epoch]`` a run resumes from, or ``None`` for a fresh run."""
    if not checkpoint.is_file():
        return None
    try:
        state = load_checkpoint(checkpoint)
    except CheckpointError:
        return None  # the trainer reports the damaged file when it resumes
    stage = 2 if "stage2" in state else 1
    return [stage, state.get(f"stage{stage}", {}).get("epoch", 0)]


def _write_provenance(run_dir: Path, trial: str, spec: RunSpec, metadata: dict) -> None:
    """``trial.json``: everything needed to say where a result came from."""
    config = spec.config
    started = time.perf_counter()
    graph = load_run_dataset(config)
    baseline = {"baseline": _baseline_record(spec)} if _baseline_model(config) else {}
    write_json(
        run_dir / TRIAL.file,
        {
            "experiment": metadata["name"],
            "trial": trial,
            "run": spec.name,
            "seed": config.seed,
            "config": config_to_dict(config),
            "dataset": graph.name,
            "dataset_hash": graph.content_hash(),
            "dataset_seconds": round(time.perf_counter() - started, 3),
            "code": code_revision(),
            "launched_from": metadata.get("code"),
            "packages": package_versions(),
            "host": socket.gethostname(),
            **baseline,
        },
    )
