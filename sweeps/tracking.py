"""Experiment tracking of sweep runs: TensorBoard event files and MLflow runs (no Ray here).

The run folder stays the record (``metrics.jsonl``, ``results.json``, ``status.json``); trackers are
views of it for dashboards, fed by :func:`sweeps.trial.run_trial` as epochs finish. An experiment
records what it tracks in ``experiment.json``'s ``tracking`` (:func:`start_tracking`), from the
study's ``tracking:`` or ``diffcom sweep launch --mlflow URI --tensorboard/--no-tensorboard``;
resume and extend reuse it. An experiment without that key (launched before tracking) tracks
nothing.

TensorBoard (on unless the study or ``--no-tensorboard`` turns it off: a few KB per run, no server;
written with ``torch.utils.tensorboard``, or ``tensorboardX``, which comes with Ray Tune, where the
``tensorboard`` package is missing: :func:`_summary_writer`): event files in ``<run>/tensorboard/``, one scalar per
numeric epoch metric with step = the global epoch (epochs over both stages,
:func:`sweeps.trial._global_epoch`), and when the run finishes an hparams summary (every scalar
config value, with the final metrics) in ``<run>/tensorboard/hparams/``. ``tensorboard --logdir
EXPERIMENT/runs`` shows every run.

MLflow (only when asked for; ``mlflow`` is imported only then): the driver opens one parent run per
experiment, in the MLflow experiment named after the study (:func:`start_tracking`). Each run folder
gets a child run (tag ``mlflow.parentRunId``) named after it, with the flattened config as params,
every numeric epoch metric with step = the global epoch (names MLflow refuses, ``hits@1``, become
``hits_at_1``), tags naming the experiment, trial, cell, seed, stage-1 key, code revision, dataset
hash and run folder; when it finishes the final metrics (``final.<split>.<protocol>.<measure>``)
and ``results.json`` as an artifact. A run whose shared stage 1 another run trained logs that
stage-1 run's epochs too, so every curve starts at global epoch 1.

Resume. ``<run>/tracking.json`` holds the run's MLflow run id and, per tracker, the last global
epoch it logged. A resumed run continues its MLflow run and logs only newer epochs: first those of
its checkpoint that the killed attempt had not logged (from ``metrics.jsonl``), then its own. Its
TensorBoard writer opens with ``purge_step`` one past the last epoch logged, so TensorBoard drops
anything a killed attempt wrote after it. A kill between logging an epoch and writing
``tracking.json`` logs that epoch again: TensorBoard's purge hides the first copy, MLflow keeps both
points of that one step.

Failures. A tracker that cannot be reached, or fails, never stops training: one warning line on
stderr, and that tracker is off for the rest of the run (or the rest of the launch). A malformed
URI is refused before anything starts (:func:`mlflow_uri_problem`).
"""

from __future__ import annotations

import json
import os
import re
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from core.config import ExperimentConfig, config_to_dict
from runstore import (
    EXPERIMENT,
    METRICS,
    RESULTS,
    RUNS_DIR,
    TENSORBOARD_DIR,
    TRACKING,
    TRIAL,
    StoreError,
    flatten,
    flatten_results,
    read_jsonl,
)
from runstore.bucket import is_bucket_uri
from sweeps.experiment import ExperimentError, read_json_object, resolve_storage, write_json
from sweeps.stage1 import stage1_key

__all__ = [
    "PROBE_SECONDS",
    "RunTracker",
    "log_report",
    "mlflow_uri_problem",
    "open_run",
    "reopen_parent_run",
    "set_parent_run_state",
    "start_tracking",
]

#: Seconds to wait for an MLflow server's ``/health`` before calling it unreachable.
PROBE_SECONDS = 5.0

# MLflow's limits (mlflow.utils.validation): longer values are cut, longer batches split.
_MAX_PARAM_VALUE = 6000
_MAX_TAG_VALUE = 8000
_MAX_PARAMS_PER_BATCH = 100
_MAX_METRICS_PER_BATCH = 1000

_URI_SCHEMES = ("http", "https", "file", "sqlite", "postgresql", "mysql", "mssql", "databricks")
#: Epoch-record keys that are the time axis, not metrics.
_AXIS_KEYS = ("stage", "epoch")


def mlflow_uri_problem(uri: Any) -> str | None:
    """What is wrong with an MLflow tracking URI, or ``None`` when it is well formed.

    Accepted: ``http(s)://HOST[:PORT][/PATH]`` (a tracking server), ``file:///ABS/PATH``,
    ``sqlite:////ABS/PATH.db`` and other SQLAlchemy database URLs, ``databricks[://PROFILE]``.
    Whether the server answers is not checked here (an unreachable one only warns).
    """
    expected = (
        "expected a tracking URI such as http://127.0.0.1:5000 (an MLflow server), "
        "file:///abs/path/mlruns or sqlite:////abs/path/mlflow.db"
    )
    if not isinstance(uri, str) or not uri.strip():
        return f"{expected}, got {uri!r}"
    if uri == "databricks":
        return None
    scheme, separator, rest = uri.partition("://")
    base = scheme.split("+", 1)[0].lower()  # postgresql+psycopg2://...
    if not separator or base not in _URI_SCHEMES:
        return f"{expected}, got {uri!r} (schemes: {', '.join(_URI_SCHEMES)})"
    if base in ("http", "https"):
        parsed = urllib.parse.urlsplit(uri)
        try:
            parsed.port  # noqa: B018  (raises for a port that is not a number in 0-65535)
        except ValueError:
            return f"{expected}, got {uri!r} (its port is not a number in 0-65535)"
        if not parsed.hostname:
            return f"{expected}, got {uri!r} (no host)"
    elif base == "file" and not rest.startswith("/"):
        return f"{expected}, got {uri!r} (a file:// URI needs an absolute path: file:///...)"
    elif base == "sqlite" and not rest.startswith("//"):
        # Trials run in folders of their own: a relative database would be one per trial.
        return f"{expected}, got {uri!r} (a sqlite URI needs an absolute path: sqlite:////...)"
    elif base != "databricks" and not rest.strip("/"):
        return f"{expected}, got {uri!r} (nothing after {scheme}://)"
    return None


# ------------------------------------------------------------------------- the experiment (driver)


def start_tracking(
    folder: Path, *, study: str, mlflow: str | None, tensorboard: bool, tags: dict[str, str]
) -> dict:
    """``experiment.json``'s ``tracking`` of a new experiment; opens its MLflow parent run.

    Args:
        folder: the experiment folder (its name names the parent run).
        study: the study's name: the MLflow experiment the parent run goes to (created if new).
        mlflow: the tracking URI, or ``None`` for no MLflow.
        tensorboard: whether runs write TensorBoard event files.
        tags: the parent run's tags (experiment, kind, code revision...).

    Returns:
        ``{"tensorboard": bool, "mlflow": None | {"uri", "experiment", "experiment_id",
        "parent_run_id"}}``; the two ids are ``None`` when the server could not be reached (one
        warning line): trials then log to an MLflow experiment of the study's name, without a
        parent, and ``resume`` tries the parent run again (:func:`reopen_parent_run`).
    """
    record: dict[str, Any] = {"tensorboard": bool(tensorboard), "mlflow": None}
    if mlflow is not None:
        target = {"uri": mlflow, "experiment": study, "experiment_id": None, "parent_run_id": None}
        record["mlflow"] = _with_parent_run(target, folder.name, tags)
    return record


def reopen_parent_run(folder: Path, metadata: dict) -> None:
    """On resume: the parent run's state back to running, or the parent run the launch could not
    open (its server was unreachable) opened now and recorded in ``experiment.json``."""
    target = _mlflow_target(metadata)
    if target is None:
        return
    if target.get("parent_run_id"):
        set_parent_run_state(metadata, "RUNNING")
        return
    tags = {"diffcom.experiment": metadata["name"], "diffcom.folder": str(folder)}
    opened = _with_parent_run(dict(target), metadata["name"], tags)
    if opened["parent_run_id"]:
        tracking = {**metadata["tracking"], "mlflow": opened}
        write_json(folder / EXPERIMENT.file, {**metadata, "tracking": tracking})
        metadata["tracking"] = tracking


def set_parent_run_state(metadata: dict, state: str) -> None:
    """Mark an experiment's parent run ``RUNNING`` or ``FINISHED`` (after ``fit``); a warning line
    when the server cannot be reached."""
    target = _mlflow_target(metadata)
    if target is None or not target.get("parent_run_id"):
        return
    client = _client_or_warn(target["uri"], f"the parent run of {metadata['name']}")
    if client is None:
        return
    try:
        if state == "RUNNING":
            client.update_run(target["parent_run_id"], status=state)
        else:
            client.set_terminated(target["parent_run_id"], state)
    except Exception as error:  # a server error must not fail the study
        _warn(f"MLflow at {target['uri']}: cannot mark the parent run {state}: {_reason(error)}")


def log_report(experiments: Iterable[str], storage: str | None, out: Path) -> None:
    """Log a ``diffcom report`` folder as artifacts (``report/``) of the MLflow parent run of each
    experiment that recorded one. Experiments are found as the report found them (a folder, or a
    name under ``storage``); one that cannot be read was reported already and is skipped."""
    for given in experiments:
        folder = Path(given)
        try:
            if (folder / EXPERIMENT.file).is_file():
                metadata = read_json_object(folder / EXPERIMENT.file)
            elif isinstance(root := resolve_storage(storage), Path):
                folder = root / given
                metadata = read_json_object(folder / EXPERIMENT.file)
            else:  # a bucket: its experiment.json is all this needs
                metadata = _metadata_in_bucket(root.child(given))
        except StoreError:  # ExperimentError and BucketError among them
            continue
        target = _mlflow_target(metadata)
        if target is None or not target.get("parent_run_id"):
            continue
        client = _client_or_warn(target["uri"], f"the report of {folder.name}")
        if client is None:
            continue
        try:
            client.log_artifacts(target["parent_run_id"], str(out), artifact_path="report")
        except Exception as error:  # the report is written either way
            _warn(f"MLflow at {target['uri']}: the report was not logged: {_reason(error)}")
            continue
        print(f"report logged to MLflow run {target['parent_run_id']} at {target['uri']}")


def _metadata_in_bucket(uri) -> dict:
    """The ``experiment.json`` of an experiment in a bucket (``StoreError`` when unreadable)."""
    from runstore.bucket import Bucket

    found = Bucket(uri).read(EXPERIMENT.file)
    data = json.loads(found[0]) if found else None
    if not isinstance(data, dict):
        raise StoreError(f"{uri}: no readable {EXPERIMENT.file}")
    return data


def _mlflow_target(metadata: dict) -> dict | None:
    """``tracking.mlflow`` of an ``experiment.json``, or ``None`` when it names no URI."""
    tracking = metadata.get("tracking")
    target = tracking.get("mlflow") if isinstance(tracking, dict) else None
    if isinstance(target, dict) and isinstance(target.get("uri"), str):
        return target
    return None


def _with_parent_run(target: dict, name: str, tags: dict[str, str]) -> dict:
    """``target`` with the MLflow experiment's id and a new parent run's id, when reachable."""
    client = _client_or_warn(target["uri"], f"experiment {name} (no parent run)")
    if client is None:
        return target
    try:
        experiment_id = _mlflow_experiment(client, target["experiment"])
        run = client.create_run(experiment_id, run_name=name, tags=_tag_values(tags))
    except Exception as error:
        _warn(f"MLflow at {target['uri']}: no parent run for {name}: {_reason(error)}")
        return target
    return {**target, "experiment_id": experiment_id, "parent_run_id": run.info.run_id}


def _mlflow_experiment(client, name: str) -> str:
    """The id of the MLflow experiment ``name``, created (or restored from deletion) if needed."""
    found = client.get_experiment_by_name(name)
    if found is None:
        try:
            return client.create_experiment(name)
        except Exception:
            found = client.get_experiment_by_name(name)  # another launch created it just now
            if found is None:
                raise
    if found.lifecycle_stage == "deleted":
        client.restore_experiment(found.experiment_id)
    return found.experiment_id


# ------------------------------------------------------------------------------- one run (worker)


def open_run(
    metadata: dict,
    run_dir: Path,
    *,
    trial: str,
    run: str,
    config: ExperimentConfig,
    resumed_from: list[int] | None,
    step_of: Callable[[dict], int],
    stage1_run: Path | None = None,
    is_main: bool = True,
) -> RunTracker:
    """The trackers of one run folder, as the experiment's ``tracking`` asks.

    Args:
        metadata: the experiment's ``experiment.json``.
        run_dir: the run folder (``<experiment>/runs/<run>``).
        trial, run: the trial's name and the run's path under ``runs/``.
        config: the run's config.
        resumed_from: ``[stage, epoch]`` of the checkpoint the run resumes from, or ``None``:
            the epochs up to it that no tracker logged yet are logged now, from ``metrics.jsonl``.
        step_of: an epoch record's global epoch (the step every tracker logs it at).
        stage1_run: the shared stage-1 run folder a resumed run started from: its epochs are
            logged first when no tracker logged them yet (a tracker that was off or unreachable
            in the earlier attempt gets the whole curve).
        is_main: only the main process of a multi-process trial tracks.
    """
    tracker = RunTracker(run_dir, config, step_of)
    settings = metadata.get("tracking")
    if not is_main or not isinstance(settings, dict):
        return tracker
    # The checkpoint is the truth, as for metrics.jsonl: epochs a tracker logged past it (a run
    # restarted from scratch, a checkpoint removed) are logged again. A run without one starts
    # after its shared stage 1, whose epochs stay.
    if resumed_from is not None:
        tracker.forget_after(step_of({"stage": resumed_from[0], "epoch": resumed_from[1]}))
    else:
        tracker.forget_after(config.train.stage1_epochs if config.baseline.model == "none" else 0)
    if settings.get("tensorboard"):
        tracker.open_tensorboard()
    target = _mlflow_target(metadata)
    if target is not None:
        tracker.open_mlflow(target, _run_tags(metadata, run_dir, trial, run, config))
    if stage1_run is not None:
        tracker.log_metrics_file(stage1_run / METRICS.file)
    if resumed_from is not None:
        tracker.log_metrics_file(run_dir / METRICS.file, up_to=tuple(resumed_from))
    return tracker


class RunTracker:
    """TensorBoard and MLflow for one run folder; a tracker that is off (or failed) is skipped.

    Every method catches the tracker's own errors (one warning line, then that tracker is off):
    training never stops because of tracking.
    """

    def __init__(self, run_dir: Path, config: ExperimentConfig, step_of: Callable[[dict], int]):
        self.run_dir = Path(run_dir)
        self.config = config
        self.step_of = step_of
        self.tensorboard = None  # a SummaryWriter (_summary_writer)
        self.mlflow = None  # an MlflowClient
        self.mlflow_uri: str | None = None
        self.run_id: str | None = None
        self.state: dict = {"mlflow": None, "last_step": {}}
        self.queued: list[dict] = []  # epoch records waiting for their checkpoint to be stored
        state_file = self.run_dir / TRACKING.file
        if state_file.is_file():
            try:
                self.state = {**self.state, **read_json_object(state_file)}
            except ExperimentError as error:
                _warn(f"{error}; tracking starts afresh")
        if not isinstance(self.state.get("last_step"), dict):
            self.state["last_step"] = {}

    # --- opening

    def forget_after(self, step: int) -> None:
        """Treat epochs past global epoch ``step`` as never logged (call before opening)."""
        for tracker, last in list(self.state["last_step"].items()):
            if not isinstance(last, int) or last > step:
                self.state["last_step"][tracker] = step if step > 0 else None

    def open_tensorboard(self) -> None:
        last = self._last_step("tensorboard")
        try:
            # TensorBoard drops every event at or after purge_step written before it: what a
            # killed attempt logged after the last epoch recorded as logged is replaced, never
            # duplicated.
            self.tensorboard = _summary_writer(
                self.run_dir / TENSORBOARD_DIR, purge_step=None if last is None else last + 1
            )
        except Exception as error:  # not installed, or the folder cannot be written
            _warn(f"no TensorBoard event files for {self.run_dir}: {_reason(error)}")

    def open_mlflow(self, target: dict, tags: dict[str, str]) -> None:
        """Continue the run's MLflow run (``tracking.json``) or open one under the parent run."""
        uri = target["uri"]
        client = _client_or_warn(uri, f"run {self.run_dir}")
        if client is None:
            return
        recorded = self.state.get("mlflow")
        run_id = recorded.get("run_id") if isinstance(recorded, dict) else None
        try:
            if run_id and recorded.get("uri") == uri:
                client.update_run(run_id, status="RUNNING")
                # The server knows what it holds; tracking.json can be an epoch behind it: in a
                # bucket the run's files go up before the epoch is logged, and a kill right after
                # the logging leaves the bucket's tracking.json without it.
                logged = [m.step for m in client.get_metric_history(run_id, _mlflow_name("loss"))]
                known = self._last_step("mlflow")
                if logged and (known is None or max(logged) > known):
                    self.state["last_step"]["mlflow"] = max(logged)
            else:
                experiment_id = target.get("experiment_id") or _mlflow_experiment(
                    client, target["experiment"]
                )
                parent = target.get("parent_run_id")
                opening = {**tags, **({"mlflow.parentRunId": parent} if parent else {})}
                run_name = tags.get("diffcom.run")
                run = client.create_run(experiment_id, run_name=run_name, tags=opening)
                run_id = run.info.run_id
                self.state["mlflow"] = {"uri": uri, "run_id": run_id}
                self.state["last_step"].pop("mlflow", None)
                self._save()
            self._mlflow_batch(client, run_id, params=_params(self.config), tags=tags)
        except Exception as error:
            _warn(f"MLflow at {uri}: run {self.run_dir} is not tracked there: {_reason(error)}")
            return
        self.mlflow, self.mlflow_uri, self.run_id = client, uri, run_id

    # --- epochs

    def queue(self, record: dict) -> None:
        """Hold one epoch record until :meth:`log_stored` says its checkpoint is stored.

        MLflow keeps every value logged at a step: an epoch logged before its checkpoint reached
        the experiment's storage, then trained again by a resumed run (a killed driver, a bucket
        that takes checkpoints every N epochs), would show twice.
        """
        self.queued.append(record)

    def log_stored(self, stored_through: int | None) -> None:
        """Log the queued records up to global epoch ``stored_through`` (``None``: all of them):
        the storage holds the checkpoint of each."""

        def stored(record: dict) -> bool:
            return stored_through is None or self.step_of(record) <= stored_through

        ready = [record for record in self.queued if stored(record)]
        self.queued = [record for record in self.queued if not stored(record)]
        self.log_records(ready)

    def log_metrics_file(self, path: Path, up_to: tuple[int, int] | None = None) -> None:
        """Log the epoch records of a ``metrics.jsonl`` (up to ``(stage, epoch)``, inclusive)
        that a tracker has not logged yet: a resumed run's, or a shared stage-1 run's."""
        try:
            lines = read_jsonl(path, METRICS).lines if path.is_file() else []
        except StoreError as error:
            _warn(f"{error}; its epochs are not tracked")
            return
        records = [
            line.value
            for line in lines
            if line.complete
            and isinstance(line.value, dict)
            and type(line.value.get("stage")) is int
            and type(line.value.get("epoch")) is int
            and (up_to is None or (line.value["stage"], line.value["epoch"]) <= up_to)
        ]
        self.log_records(records)

    def log_records(self, records: list[dict]) -> None:
        """Log epoch records a tracker has not logged yet (a global epoch past its last one)."""
        if self.tensorboard is None and self.mlflow is None:
            return
        steps = [(self.step_of(record), _numbers(record, skip=_AXIS_KEYS)) for record in records]
        changed = False
        if self.tensorboard is not None and (new := _newer(steps, self._last_step("tensorboard"))):
            writer = self.tensorboard

            def write() -> None:
                for step, values in new:
                    for name, value in values.items():
                        writer.add_scalar(name, value, global_step=step)
                writer.flush()  # a killed worker loses nothing it reported

            if self._guard("tensorboard", write):
                self.state["last_step"]["tensorboard"] = new[-1][0]
                changed = True
        if self.mlflow is not None and (new := _newer(steps, self._last_step("mlflow"))):
            stamp = int(time.time() * 1000)
            metrics = [
                (_mlflow_name(name), value, stamp, step)
                for step, values in new
                for name, value in values.items()
            ]
            client, run_id = self.mlflow, self.run_id
            if self._guard("mlflow", lambda: self._mlflow_batch(client, run_id, metrics=metrics)):
                self.state["last_step"]["mlflow"] = new[-1][0]
                changed = True
        if changed:
            self._save()

    # --- the end

    def finish(self, results: dict) -> None:
        """The run finished: final metrics, the hparams summary, ``results.json``, run closed."""
        self.log_stored(None)  # the final report stores everything next
        final = {f"final.{k}": v for k, v in _numbers(flatten_results(results)).items()}
        logged = [s for s in (self._last_step("tensorboard"), self._last_step("mlflow")) if s]
        planned = self.config.train.stage1_epochs + self.config.train.stage2_epochs
        step = max(logged) if logged else planned
        if self.tensorboard is not None:
            writer = self.tensorboard
            self._guard(
                "tensorboard",
                lambda: writer.add_hparams(
                    _hparams(self.config), final, run_name="hparams", global_step=step
                ),
            )
        if self.mlflow is not None:
            client, run_id = self.mlflow, self.run_id
            dataset_hash = results.get("dataset_hash")

            def close_mlflow() -> None:
                stamp = int(time.time() * 1000)
                metrics = [(_mlflow_name(k), v, stamp, step) for k, v in final.items()]
                tags = {"diffcom.dataset_hash": dataset_hash} if dataset_hash else {}
                self._mlflow_batch(client, run_id, metrics=metrics, tags=tags)
                if (self.run_dir / RESULTS.file).is_file():
                    client.log_artifact(run_id, str(self.run_dir / RESULTS.file))
                client.set_terminated(run_id, "FINISHED")

            self._guard("mlflow", close_mlflow)
        self.close()

    def fail(self, reason: str) -> None:
        """The run failed: its MLflow run ends ``FAILED`` with the reason as a tag.

        Its queued epochs are logged first: a failed run's curve up to the failure is what its
        user looks at. A retry from an older checkpoint then logs the epochs it trains again a
        second time (at most ``checkpoint_every - 1``; none with a shared folder).
        """
        self.log_stored(None)
        self._end("FAILED", {"diffcom.error": reason})

    def stop(self) -> None:
        """The scheduler (or Ctrl-C) stopped the run: its MLflow run ends ``KILLED``; its queued
        epochs are logged first (the scheduler stops a run from within a report, after its files
        were stored)."""
        self.log_stored(None)
        self._end("KILLED", {})

    def close(self) -> None:
        if self.tensorboard is not None:
            self._guard("tensorboard", self.tensorboard.close)
            self.tensorboard = None
        self.mlflow = None

    def _end(self, state: str, tags: dict[str, str]) -> None:
        if self.mlflow is not None:
            client, run_id = self.mlflow, self.run_id

            def end() -> None:
                if tags:
                    self._mlflow_batch(client, run_id, tags=tags)
                client.set_terminated(run_id, state)

            self._guard("mlflow", end)
        self.close()

    # --- helpers

    def _last_step(self, tracker: str) -> int | None:
        step = self.state["last_step"].get(tracker)
        return step if isinstance(step, int) else None

    def _save(self) -> None:
        try:
            write_json(self.run_dir / TRACKING.file, self.state)
        except OSError as error:
            _warn(f"cannot write {self.run_dir / TRACKING.file}: {_reason(error)}")

    def _guard(self, tracker: str, action: Callable[[], None]) -> bool:
        """Run ``action``; on an error warn once and turn ``tracker`` off. Whether it worked."""
        try:
            action()
        except Exception as error:
            where = f"MLflow at {self.mlflow_uri}" if tracker == "mlflow" else "TensorBoard"
            _warn(f"{where}: tracking of {self.run_dir} stops here: {_reason(error)}")
            if tracker == "mlflow":
                self.mlflow = None
            else:
                self.tensorboard = None
            return False
        return True

    @staticmethod
    def _mlflow_batch(client, run_id: str, *, metrics=(), params=None, tags=None) -> None:
        """``log_batch`` within MLflow's limits on entries per request."""
        from mlflow.entities import Metric, Param, RunTag

        entries = [Metric(key, value, stamp, step) for key, value, stamp, step in metrics]
        for start in range(0, len(entries), _MAX_METRICS_PER_BATCH):
            client.log_batch(run_id, metrics=entries[start : start + _MAX_METRICS_PER_BATCH])
        pairs = [Param(k, v) for k, v in (params or {}).items()]
        for start in range(0, len(pairs), _MAX_PARAMS_PER_BATCH):
            client.log_batch(run_id, params=pairs[start : start + _MAX_PARAMS_PER_BATCH])
        if tags:
            client.log_batch(run_id, tags=[RunTag(k, v) for k, v in _tag_values(tags).items()])


def _run_location(metadata: dict, run_dir: Path, run: str) -> str:
    """Where a run lives for a reader: its folder, or its place in a bucket (the folder being
    then a trial's temporary copy)."""
    storage = metadata.get("storage")
    if is_bucket_uri(storage):
        return f"{storage}/{RUNS_DIR}/{run}"
    return str(run_dir)


def _run_tags(
    metadata: dict, run_dir: Path, trial: str, run: str, config: ExperimentConfig
) -> dict[str, str]:
    """A child run's tags: where it belongs and where its result came from."""
    parts = run.split("/")
    code = metadata.get("code") if isinstance(metadata.get("code"), dict) else {}
    revision = str(code.get("revision") or "unknown")
    tags = {
        "diffcom.experiment": metadata["name"],
        "diffcom.trial": trial,
        "diffcom.run": run,
        # ablation/<cell>/seed-N, sensitivity/<cell>/seed-N, search/<trial id>/seed-N
        "diffcom.cell": parts[1] if len(parts) >= 3 else parts[0],
        "diffcom.seed": str(config.seed),
        "diffcom.code_revision": revision + ("+dirty" if code.get("dirty") else ""),
        "mlflow.source.git.commit": revision,
        "diffcom.run_folder": _run_location(metadata, run_dir, run),
    }
    if config.baseline.model == "none":
        tags["diffcom.stage1_key"] = stage1_key(config)
    else:
        tags["diffcom.baseline"] = config.baseline.model
    try:  # written before training starts (sweeps.trial._write_provenance)
        dataset_hash = read_json_object(run_dir / TRIAL.file).get("dataset_hash")
    except ExperimentError:
        dataset_hash = None
    if dataset_hash:
        tags["diffcom.dataset_hash"] = dataset_hash
    return tags


def _params(config: ExperimentConfig) -> dict[str, str]:
    """The flattened config as MLflow params (text, cut to MLflow's length limit)."""
    return {
        _mlflow_name(key): _text(value)[:_MAX_PARAM_VALUE]
        for key, value in flatten(config_to_dict(config)).items()
    }


def _summary_writer(folder: Path, purge_step: int | None):
    """A TensorBoard event writer whose ``flush()`` returns once every event added is on disk.

    ``torch.utils.tensorboard`` (with the ``tensorboard`` package, the ``tracking`` extra) waits
    for its queue; tensorboardX's ``flush()`` does not (events still queued for its writer thread
    stay in memory), so a worker killed just after an epoch could lose the epoch's events while
    ``tracking.json`` says they were written. tensorboardX, which Ray Tune installs, is the
    fallback without ``tensorboard``.
    """
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        from tensorboardX import SummaryWriter

        class SummaryWriter(SummaryWriter):  # noqa: F811 - the fallback, with torch's names
            def add_hparams(self, hparam_dict, metric_dict, run_name=None, global_step=None):
                super().add_hparams(
                    hparam_dict, metric_dict, name=run_name, global_step=global_step
                )

    return SummaryWriter(str(folder), purge_step=purge_step)


def _hparams(config: ExperimentConfig) -> dict[str, Any]:
    """Every config value as a TensorBoard hparam: numbers, text and booleans as they are, the
    rest (``None``, lists) as text."""
    return {
        key: value if isinstance(value, bool | int | float | str) else _text(value)
        for key, value in flatten(config_to_dict(config)).items()
    }


def _newer(steps: list[tuple[int, dict]], last: int | None) -> list[tuple[int, dict]]:
    """The ``(step, values)`` whose step is past ``last`` and past every step kept before it."""
    kept = []
    for step, values in steps:
        if last is None or step > last:
            kept.append((step, values))
            last = step
    return kept


def _numbers(values: dict, skip: tuple[str, ...] = ()) -> dict[str, float]:
    return {
        key: float(value)
        for key, value in values.items()
        if key not in skip and isinstance(value, int | float) and not isinstance(value, bool)
    }


def _mlflow_name(key: str) -> str:
    """A metric or param name MLflow takes: ``hits@1`` → ``hits_at_1``, other characters ``_``."""
    return re.sub(r"[^/\w.\- ]", "_", key.replace("@", "_at_"))


def _text(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def _tag_values(tags: dict[str, str]) -> dict[str, str]:
    return {key: str(value)[:_MAX_TAG_VALUE] for key, value in tags.items()}


def _client_or_warn(uri: str, what: str):
    """An ``MlflowClient`` for ``uri``, or ``None`` (and a warning naming ``what``) when its server
    does not answer or ``mlflow`` is not installed."""
    problem = _unreachable(uri)
    if problem is not None:
        _warn(f"MLflow at {uri} is unreachable ({problem}): {what} not tracked there")
        return None
    # MLflow retries a failed request 7 times with growing pauses (minutes in all); a worker's
    # epoch must not wait that long, so a sweep asks for less unless the user has set them.
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")
    try:
        from mlflow.tracking import MlflowClient
    except ImportError as error:
        _warn(
            f"MLflow is not installed ({error}; pip install 'diffusioncom-sweeps[tracking]'): "
            f"{what} not tracked at {uri}"
        )
        return None
    # An explicit client, never mlflow.set_tracking_uri: nothing is left set for the next trial
    # of this worker process.
    return MlflowClient(tracking_uri=uri)


def _unreachable(uri: str) -> str | None:
    """Why an MLflow server does not answer at ``uri``, or ``None`` (not a server URI, or it
    answered, even with an HTTP error)."""
    if not uri.startswith(("http://", "https://")):
        return None
    try:
        with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=PROBE_SECONDS):
            return None
    except urllib.error.HTTPError:
        return None  # it answered; a path prefix or authentication is MLflow's to handle
    except (OSError, ValueError) as error:
        return _reason(error)


def _reason(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0][:200] if text else ''}"


def _warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr, flush=True)
