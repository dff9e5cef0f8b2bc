"""Experiment folders on disk: names, storage, provenance and trial states (no Ray here).

An experiment lives in ``<storage>/<name>/``; Ray Tune keeps its own state files there
(``tuner.pkl``, ``experiment_state-*.json``, one folder per Ray trial) and this package adds::

    experiment.json          what was launched: study file, launch overrides (--set), kind,
                             metric, parent, code revision, tracking (see sweeps.tracking), ...
    study.yaml               a copy of the study file as launched, a header comment naming
                             any --set
    plan.json                expanded studies: trial name -> full config; searches: the base config
    runs/<trial>/            one core run per trial (and seed): config.json, metrics.jsonl,
                             checkpoints/, results.json, plus trial.json and status.json below
    stage1/<key>/            stage-1 checkpoints shared by trials (see :mod:`sweeps.stage1`)

``trial.json`` records the provenance of one run (config, seed, code revision, package versions,
dataset hash, host) and ``status.json`` its state (``running``, ``finished``, ``failed``), with
each attempt and where it resumed from, and the key of the shared stage-1 run it uses (written
before it waits for or trains it, so the listing can show that run's progress). Everything here is plain JSON so ``diffcom sweep status``
and :mod:`analysis` work without a cluster, on a folder copied to another machine.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import platform
import re
import socket
import subprocess
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import runstore as store
from runstore import (
    CONFIG,
    EVENTS,
    EXPERIMENT,
    METRICS,
    PLAN,
    RESULTS,
    RUNS_DIR,
    STAGE1_DIR,
    STAGE1_RUN,
    STATUS,
    TRIAL,
    StoreError,
    default_storage,
    describe_json,
)
from runstore.bucket import BucketUri, is_bucket_uri

__all__ = [
    "EXPERIMENT_FILE",
    "OPTUNA_DB",
    "PLAN_FILE",
    "ExperimentError",
    "Stage1Progress",
    "TrialStatus",
    "check_name",
    "code_revision",
    "eta_seconds",
    "default_storage",
    "event_files",
    "experiment_dir",
    "optuna_storage_url",
    "package_versions",
    "read_experiment",
    "runs_alive_on_this_host",
    "read_json",
    "read_json_object",
    "read_statuses",
    "resolve_storage",
    "write_json",
]

EXPERIMENT_FILE = EXPERIMENT.file
PLAN_FILE = PLAN.file
#: The default Optuna storage of a search: a SQLite file in the experiment folder.
OPTUNA_DB = "optuna.db"
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")
_PACKAGES = (
    "diffusioncom-sweeps",
    "torch",
    "torch-geometric",
    "accelerate",
    "ray",
    "optuna",
    "numpy",
    "transformers",
)


class ExperimentError(StoreError):
    """A bad experiment name, storage location or experiment folder; the message names it."""

    def __init__(self, message: str) -> None:
        super().__init__(message)


def resolve_storage(storage: str | Path | None) -> Path | BucketUri:
    """Where experiments live: an absolute folder from a path, a ``file://`` URI or ``None`` (the
    default), or a location in a store from an ``s3://bucket/prefix``, ``gs://bucket/prefix``,
    ``az://container/prefix`` or other fsspec URI such as ``sftp://host/path``
    (:mod:`sweeps.remote`, :mod:`runstore.filesystem`).

    Trials change into their own directories, so relative paths are resolved here, once.

    Raises:
        ExperimentError: for text that is neither a path nor a URI.
        runstore.bucket.BucketError: for a malformed URI, or a scheme fsspec does not know.
    """
    if storage is None:
        return _storage_folder(default_storage().resolve(), "storage")
    text = str(storage)
    if is_bucket_uri(text):
        return BucketUri.parse(text)
    if text.startswith("file://"):
        text = text[len("file://") :]
    elif "://" in text:
        raise ExperimentError(
            f"--storage {text}: neither a folder nor a URI (expected a path, or PROTOCOL://..., "
            "e.g. s3://BUCKET/PREFIX, gs://BUCKET/PREFIX, az://CONTAINER/PREFIX, "
            "sftp://HOST/PATH)"
        )
    if not text.strip():
        # An empty path would be the current directory: experiments there are easily lost.
        raise ExperimentError(
            f"--storage {storage!r} is empty: give a folder, or leave --storage out for "
            f"the default ({default_storage()})"
        )
    return _storage_folder(Path(text).expanduser().resolve(), f"--storage {storage}")


def _storage_folder(path: Path, given: str) -> Path:
    """``path``, refused when it exists but is not a folder (caught before Ray starts)."""
    if path.exists() and not path.is_dir():
        raise ExperimentError(f"{given}: {path} is a file, not a folder; give a storage folder")
    return path


def optuna_storage_url(folder: Path, given: str | None = None) -> str:
    """The Optuna storage (an RDB URL) of a search experiment in ``folder``.

    Args:
        folder: the experiment folder (absolute: trials change directory).
        given: ``--optuna-storage``, or ``None`` for ``sqlite:///<folder>/optuna.db``. Only the
            search's driver writes to it, so SQLite's single writer is enough; a database server
            (``postgresql://...``) lets ``optuna-dashboard`` run on another machine.

    Raises:
        ExperimentError: ``given`` is empty or not a ``SCHEME://...`` URL.
    """
    if given is None:
        return f"sqlite:///{Path(folder) / OPTUNA_DB}"
    scheme, separator, rest = given.partition("://")
    if not separator or not re.fullmatch(r"[A-Za-z][A-Za-z0-9+.-]*", scheme) or not rest.strip():
        raise ExperimentError(
            f"--optuna-storage {given!r}: expected a database URL such as "
            "sqlite:////abs/path/optuna.db or postgresql://user@host/db"
        )
    return given


def check_name(name: str) -> str:
    """Refuse names that are not one plain directory name (no ``..``, ``/``, spaces, ...)."""
    if not isinstance(name, str) or not _NAME.fullmatch(name) or name in {".", ".."}:
        raise ExperimentError(
            f"experiment name {name!r} is not allowed: use 1-100 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit (it becomes one directory under the storage root)"
        )
    return name


def experiment_dir(storage: Path, name: str, *, must_exist: bool) -> Path:
    """``storage/name`` after checking the name; whether it must or must not exist yet."""
    path = storage / check_name(name)
    if must_exist and not (path / EXPERIMENT_FILE).is_file():
        known = sorted(p.parent.name for p in storage.glob(f"*/{EXPERIMENT_FILE}"))
        listing = f"; experiments there: {', '.join(known)}" if known else ""
        found = f" ({path} exists but has no {EXPERIMENT_FILE})" if path.exists() else ""
        raise ExperimentError(f"no experiment {name!r} in {storage}{found}{listing}")
    if not must_exist and (path / EXPERIMENT_FILE).is_file():
        raise ExperimentError(
            f"experiment {name!r} already exists in {storage}: continue it with "
            f"`diffcom sweep resume {name}`, add trials with `diffcom sweep extend {name}`, "
            "or launch under another --name"
        )
    if not must_exist and path.exists():
        # Not an experiment (no experiment.json), so resume and extend cannot use it either.
        what = "a folder" if path.is_dir() else "a file"
        raise ExperimentError(
            f"{path} already exists and is {what}, not an experiment (no {EXPERIMENT_FILE}): "
            "choose another name, or remove it if nothing in it is needed"
        )
    return path


def read_json(path: Path) -> Any:
    """Read a JSON file of any shape (:func:`runstore.load_json`); a missing or damaged file is
    an :class:`ExperimentError` naming it."""
    try:
        return store.load_json(path)
    except StoreError as error:
        raise ExperimentError(str(error)) from None


def read_json_object(path: Path) -> dict:
    """Read a JSON file that must hold an object (every file this package writes does), checked
    against the version of its kind (:func:`runstore.read_json`, the kind by its file name).

    Raises:
        ExperimentError: naming the file when it is missing, not JSON, JSON of another shape
            (a list, a string, a number...), or of a newer format version, so no reader fails
            later on a wrong type.
    """
    try:
        return store.read_json(path, store.kind_of(path))
    except StoreError as error:
        raise ExperimentError(str(error)) from None


def write_json(path: Path, data: Any) -> None:
    """Write a JSON object atomically (:func:`runstore.write_json`), versioned by its kind (the
    kind its file name declares; a name outside the format gets no version)."""
    store.write_json(path, data, store.kind_of(path))


# What the readers of experiment.json (status, resume, extend) rely on: the keys every one has,
# and the type of each key they use when it is there.
_EXPERIMENT_REQUIRED = ("name", "kind", "metric", "mode")
_EXPERIMENT_TYPES = {
    "name": (str, "text"),
    "kind": (str, "text"),
    "metric": (str, "text such as valid.clean.mrr"),
    "mode": (str, "max or min"),
    "study_file": (str, "a path"),
    "study_sha256": (str, "text"),
    "seeds": (list, "a list of seeds"),
    "parents": (list, "a list of experiment folders"),
    "launch_overrides": (list, "a list of KEY=VALUE"),
    "resources": (dict, "an object"),
    "optuna_storage": (str, "a database URL"),
    "tracking": (dict, "an object with tensorboard and mlflow (see sweeps.tracking)"),
}


def read_experiment(path: Path, required: tuple[str, ...] = ()) -> dict:
    """The ``experiment.json`` of an experiment folder, its keys checked for what readers use.

    ``required`` names keys a caller needs beyond those every reader needs (``resume`` needs
    ``resources``; ``extend`` the study file, its hash and the seeds).

    Raises:
        ExperimentError: naming the file and the key, for a file that is not a JSON object, a
            missing required key or a key of the wrong type.
    """
    file = Path(path) / EXPERIMENT_FILE
    data = read_json_object(file)
    for key in (*_EXPERIMENT_REQUIRED, *required):
        if key not in data:
            raise ExperimentError(f"{file}: key {key!r} is missing")
    for key, (kind, expected) in _EXPERIMENT_TYPES.items():
        if key in data and not isinstance(data[key], kind):
            raise ExperimentError(
                f"{file}: {key}: expected {expected}, found {describe_json(data[key])}"
            )
    if data["metric"].count(".") < 2:
        raise ExperimentError(
            f"{file}: metric: expected SPLIT.PROTOCOL.MEASURE (e.g. valid.clean.mrr), "
            f"found {data['metric']!r}"
        )
    if data["mode"] not in ("max", "min"):
        raise ExperimentError(f"{file}: mode: expected max or min, found {data['mode']!r}")
    if not all(isinstance(parent, str) for parent in data.get("parents", [])):
        raise ExperimentError(f"{file}: parents: expected a list of experiment folders")
    return data


def code_revision() -> dict:
    """The git revision of this source tree (and whether it has uncommitted changes)."""
    root = Path(__file__).resolve().parent.parent
    try:
        revision = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return {"revision": "unknown", "dirty": None}
    return {"revision": revision, "dirty": bool(dirty)}


def package_versions() -> dict:
    """Python and the versions of the packages a result depends on."""
    versions = {"python": platform.python_version()}
    for package in _PACKAGES:
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    return versions


def now() -> str:
    """The current UTC time, ISO 8601."""
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


@dataclass(frozen=True)
class Stage1Progress:
    """The shared stage-1 run (:mod:`sweeps.stage1`) a running run's trial trains or waits for.

    Attributes:
        key: its key: the run folder is ``stage1/<key>/run/``.
        training: whether this run's trial trains it (``False``: another trial does, and this one
            waits for its lock).
        epoch: its last finished epoch, or ``None`` before the first.
        epochs: the stage-1 epochs it trains, or ``None`` when the run does not say.
        heartbeat: when it last finished an epoch (its ``metrics.jsonl`` was last written; before
            the first epoch, when its trainer took the lock), UTC, ISO 8601; ``None`` before that.
        seconds_per_epoch: its mean training seconds per epoch so far, or ``None``.
    """

    key: str
    training: bool
    epoch: int | None = None
    epochs: int | None = None
    heartbeat: str | None = None
    seconds_per_epoch: float | None = None


@dataclass(frozen=True)
class TrialStatus:
    """One run's state as read from its folder.

    Attributes:
        name: the run's path under ``runs/``.
        state: ``pending`` (planned, not started), ``running``, ``waiting`` (a baseline waiting
            for the reference run whose cost is its budget), ``interrupted`` (marked running or
            waiting by a process on this host that no longer exists), ``stopped`` (by the
            scheduler, e.g. ASHA, or Ctrl-C), ``finished`` or ``failed``.
        seed: the training seed.
        epochs: ``(stage, epoch)`` of the last finished epoch, or ``None``.
        metric: the study metric of the finished run (selected weights), or of the last epoch.
        test: test MRR and Hits@1 under the clean protocol once finished.
        error: the failure reason.
        attempts: how many times the run was started.
        heartbeat: when a running run last finished an epoch (UTC, ISO 8601); while it trains or
            waits for a shared stage 1, when that stage-1 run last did.
        best: the best study metric of any epoch so far (``mode`` of :func:`read_statuses`), or
            the finished run's metric.
        planned: ``(stage-1 epochs, stage-2 epochs)`` of a running run's config, or ``None``.
        seconds_per_epoch: a running run's wall seconds per epoch in its current attempt
            (evaluation included; training seconds alone after its first epoch), or ``None``.
        stage1: the shared stage-1 run a running run is training or waiting for, or ``None``.
        waiting_for: the run (under ``runs/``) a waiting run waits for, or ``None``.
        fused: the fused pack a run trains (or trained) in and its number of members, e.g.
            ``("pack/0", 8)`` (:mod:`sweeps.pack`), or ``None`` for a run trained alone.
    """

    name: str
    state: str
    seed: int | None = None
    epochs: tuple[int, int] | None = None
    metric: float | None = None
    test: dict | None = None
    error: str | None = None
    attempts: int = 0
    heartbeat: str | None = None
    best: float | None = None
    planned: tuple[int, int] | None = None
    seconds_per_epoch: float | None = None
    stage1: Stage1Progress | None = None
    waiting_for: str | None = None
    fused: tuple[str, int] | None = None


def eta_seconds(status: TrialStatus) -> float | None:
    """Seconds until a running run's last planned epoch, at its rate so far; ``None`` if unknown.

    A run on stage 2 has ``stage2 - epoch`` epochs left, one still on its own stage 1 also the
    rest of stage 1. A run training or waiting for a shared stage 1 gets that stage 1's time left
    (its stage 2 has no rate yet). Early stopping can end a run sooner.
    """
    if status.state != "running":
        return None
    if status.stage1 is not None:
        progress = status.stage1
        if progress.epochs is None or progress.seconds_per_epoch is None:
            return None
        return max(progress.epochs - (progress.epoch or 0), 0) * progress.seconds_per_epoch
    if status.planned is None or status.epochs is None or status.seconds_per_epoch is None:
        return None
    stage1_epochs, stage2_epochs = status.planned
    stage, epoch = status.epochs
    left = stage2_epochs - epoch if stage == 2 else stage1_epochs - epoch + stage2_epochs
    return max(left, 0) * status.seconds_per_epoch


#: The states of a run whose process is at work on it.
_ALIVE_STATES = ("running", "waiting")


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def runs_alive_on_this_host(path: Path) -> list[tuple[str, int]]:
    """``(run, pid)`` of every run under ``path/runs`` whose ``status.json`` says it is running (or
    waiting to, see :mod:`sweeps.trial`) in a process of this host that still exists.

    A driver killed outright can leave its Ray workers training (they run in their own process
    groups); resuming then would train those runs twice into the same folders.
    """
    runs_root = Path(path) / RUNS_DIR
    alive = []
    for status_file in sorted(runs_root.glob(f"**/{STATUS.file}")):
        try:
            status = _checked_status(status_file)
        except ExperimentError:
            continue  # damaged: the listing reports it; it is no live process either way
        pid = status.get("pid")
        if (
            status.get("state", "running") in _ALIVE_STATES
            and status.get("host") == socket.gethostname()
            and isinstance(pid, int)
            and pid != os.getpid()
            and _process_alive(pid)
        ):
            alive.append((status_file.parent.relative_to(runs_root).as_posix(), pid))
    return alive


def read_statuses(
    path: Path, metric: str, planned: list[str] = (), mode: str = "max"
) -> list[TrialStatus]:
    """The state of every run under ``path/runs`` plus planned runs not started yet.

    A damaged ``status.json`` or ``results.json`` (not JSON, or JSON of the wrong shape) makes
    that run ``failed`` with the reason, naming the file; it never stops the listing. Lines of
    ``metrics.jsonl`` that are not epoch records (cut by a kill) are skipped. ``mode`` (``max``
    or ``min``) says which value of ``metric`` is the best.
    """
    pick = max if mode == "max" else min
    runs_root = Path(path) / RUNS_DIR
    found: dict[str, TrialStatus] = {}
    for status_file in sorted(runs_root.glob(f"**/{STATUS.file}")):
        run = status_file.parent
        name = run.relative_to(runs_root).as_posix()
        try:
            status = _checked_status(status_file)
        except ExperimentError as error:
            found[name] = TrialStatus(name, "failed", error=str(error))
            continue
        state = status.get("state", "running")
        if (
            state in _ALIVE_STATES
            and status.get("host") == socket.gethostname()
            and isinstance(status.get("pid"), int)
            and not _process_alive(status["pid"])
        ):
            state = "interrupted"
        epochs, value, test = None, None, None
        metrics_file = run / METRICS.file
        try:
            records = (
                store.read_jsonl(metrics_file, METRICS).lines if metrics_file.is_file() else []
            )
        except StoreError as error:
            found[name] = TrialStatus(name, "failed", error=str(error))
            continue
        records = [line.value for line in records if isinstance(line.value, dict)]
        values = []
        for record in records:
            epochs = (record.get("stage"), record.get("epoch"))
            if _is_number(record.get(metric)):
                value = record[metric]
                values.append(value)
        results_file = run / RESULTS.file
        if state == "finished" and results_file.is_file():
            try:
                results = read_json_object(results_file)
                split, protocol, measure = metric.split(".", 2)
                value = _measure(results, results_file, split, protocol, measure)
                test = {
                    "mrr": _measure(results, results_file, "test", "clean", "mrr"),
                    "hits@1": _measure(results, results_file, "test", "clean", "hits@1"),
                }
                values = [value]  # the selected weights are the run's result
            except ExperimentError as error:
                state, status["error"] = "failed", f"unreadable results: {error}"
        attempts = status.get("attempts", [])
        last_attempt = attempts[-1] if attempts and isinstance(attempts[-1], dict) else {}
        heartbeat = status.get("heartbeat") or last_attempt.get("started")
        running = {}
        if state == "running":
            running = {
                "planned": _planned_epochs(run),
                "seconds_per_epoch": _seconds_per_epoch(last_attempt, heartbeat, records),
                "stage1": _stage1_progress(Path(path), status.get("stage1")),
            }
            if running["stage1"] is not None and running["stage1"].heartbeat is not None:
                heartbeat = running["stage1"].heartbeat
        found[name] = TrialStatus(
            name,
            state,
            seed=status.get("seed"),
            epochs=epochs,
            metric=value,
            test=test,
            error=status.get("error"),
            attempts=len(attempts),
            heartbeat=heartbeat,
            best=pick(values) if values else None,
            waiting_for=status.get("waiting_for") if state == "waiting" else None,
            fused=_fused(status.get("fused")),
            **running,
        )
    for name in planned:
        found.setdefault(name, TrialStatus(name, "pending"))
    return [found[name] for name in sorted(found)]


def _fused(value) -> tuple[str, int] | None:
    """``status.json``'s ``fused`` (``{"pack": ..., "members": [...]}``) as (pack, members)."""
    if not isinstance(value, dict) or not isinstance(value.get("pack"), str):
        return None
    members = value.get("members")
    return value["pack"], len(members) if isinstance(members, list) else 0


def _planned_epochs(run: Path) -> tuple[int, int] | None:
    """``(stage1_epochs, stage2_epochs)`` from the run's ``trial.json`` (written before stage 1
    starts) or ``config.json``; ``None`` when neither says."""
    for file, inside in ((TRIAL, ("config",)), (CONFIG, ())):
        try:
            found: Any = store.read_json(run / file.file, file)
        except StoreError:
            continue
        for key in (*inside, "train"):
            found = found.get(key) if isinstance(found, dict) else None
        if isinstance(found, dict):
            stage1, stage2 = found.get("stage1_epochs"), found.get("stage2_epochs")
            if isinstance(stage1, int) and isinstance(stage2, int):
                return stage1, stage2
    return None


def _seconds_per_epoch(attempt: dict, heartbeat: str | None, records: list[dict]) -> float | None:
    """Wall seconds per epoch of this attempt: from its first epoch to its last heartbeat over
    the epochs between (``status.json``: ``first_epoch``, ``epochs`` of the attempt); with one
    epoch only, its training seconds; ``None`` before the first epoch."""
    first, done = attempt.get("first_epoch"), attempt.get("epochs")
    if isinstance(first, str) and heartbeat and isinstance(done, int) and done >= 2:
        seconds = _seconds_between(first, heartbeat)
        if seconds is not None and seconds > 0:
            return seconds / (done - 1)
    return _mean_train_seconds(records[-1:])


def _mean_train_seconds(records: list[dict]) -> float | None:
    seconds = [r["train_seconds"] for r in records if _is_number(r.get("train_seconds"))]
    return sum(seconds) / len(seconds) if seconds else None


def _seconds_between(start: str, end: str) -> float | None:
    try:
        began = datetime.datetime.fromisoformat(start)
        ended = datetime.datetime.fromisoformat(end)
        return (ended - began).total_seconds()
    except (TypeError, ValueError):
        return None


def event_files(key_folder: Path) -> list[Path]:
    """The events files of a shared stage-1 key (``stage1/<key>/``): ``events.jsonl``, and one
    per trial under ``events/`` when the experiment lives in a bucket (:mod:`sweeps.remote`)."""
    single = key_folder / EVENTS.file
    return ([single] if single.is_file() else []) + sorted((key_folder / "events").glob("*.jsonl"))


def _stage1_progress(experiment: Path, recorded: Any) -> Stage1Progress | None:
    """The shared stage-1 run a running run waits for, from ``status.json``'s ``stage1``.

    :mod:`sweeps.trial` records ``{"key", "trial", "epochs"}`` before it asks for the stage-1
    checkpoint and adds ``checkpoint`` once it has it: only a record without a checkpoint is
    progress to show.
    """
    if not isinstance(recorded, dict) or "checkpoint" in recorded:
        return None
    key = recorded.get("key")
    if not isinstance(key, str) or not key or "/" in key or key.startswith("."):
        return None
    folder = experiment / STAGE1_DIR / key
    records = []
    metrics_file = folder / STAGE1_RUN / METRICS.file
    with contextlib.suppress(StoreError):
        records = [
            line.value
            for line in store.read_jsonl(metrics_file, METRICS).lines
            if isinstance(line.value, dict) and line.value.get("stage") == 1
        ]
    trainer = None
    for events in event_files(folder):
        with contextlib.suppress(StoreError):
            for line in store.read_jsonl(events, EVENTS).lines:
                if isinstance(line.value, dict) and line.value.get("event") == "training":
                    trainer = line.value.get("trial")
    heartbeat = None
    for file in (metrics_file, *event_files(folder)):
        with contextlib.suppress(OSError):
            stamp = file.stat().st_mtime
            heartbeat = datetime.datetime.fromtimestamp(stamp, datetime.timezone.utc).isoformat(
                timespec="seconds"
            )
            break
    epoch = records[-1].get("epoch") if records else None
    epochs = recorded.get("epochs")
    return Stage1Progress(
        key,
        training=trainer is not None and trainer == recorded.get("trial"),
        epoch=epoch if isinstance(epoch, int) else None,
        epochs=epochs if isinstance(epochs, int) else None,
        heartbeat=heartbeat,
        seconds_per_epoch=_mean_train_seconds(records),
    )


# The keys of status.json the listing shows, and their types when present.
_STATUS_TYPES = {
    "state": (str, "text"),
    "error": (str, "text"),
    "heartbeat": (str, "a time"),
    "attempts": (list, "a list of attempts"),
}


def _checked_status(status_file: Path) -> dict:
    """A run's ``status.json``, its keys checked for what the listing uses."""
    status = read_json_object(status_file)
    for key, (kind, expected) in _STATUS_TYPES.items():
        if status.get(key) is not None and not isinstance(status[key], kind):
            raise ExperimentError(
                f"{status_file}: {key}: expected {expected}, found {describe_json(status[key])}"
            )
    return status


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _measure(results: dict, results_file: Path, split: str, protocol: str, measure: str) -> float:
    """``results[split][protocol][measure]``, a number, or an error naming what is missing."""
    found: Any = results
    for part in (split, protocol, measure):
        if not isinstance(found, dict) or part not in found:
            raise ExperimentError(f"{results_file}: no {split}.{protocol}.{measure}")
        found = found[part]
    if not _is_number(found):
        raise ExperimentError(
            f"{results_file}: {split}.{protocol}.{measure}: expected a number, "
            f"found {describe_json(found)}"
        )
    return found
