"""Experiment folders on disk: names, storage, provenance and trial states (no Ray here).

An experiment lives in ``<storage>/<name>/``; Ray Tune keeps its own state files there
(``tuner.pkl``, ``experiment_state-*.json``, one folder per Ray trial) and this package adds::

    experiment.json          what was launched: study file, launch overrides (--set), kind,
                             metric, parent, code revision, ...
    study.yaml               a copy of the study file as launched, a header comment naming
                             any --set
    plan.json                expanded studies: trial name -> full config; searches: the base config
    runs/<trial>/            one core run per trial (and seed): config.json, metrics.jsonl,
                             checkpoints/, results.json, plus trial.json and status.json below
    stage1/<key>/            stage-1 checkpoints shared by trials (see :mod:`sweeps.stage1`)

``trial.json`` records the provenance of one run (config, seed, code revision, package versions,
dataset hash, host) and ``status.json`` its state (``running``, ``finished``, ``failed``), with
each attempt and where it resumed from. Everything here is plain JSON so ``diffcom sweep status``
and :mod:`analysis` work without a cluster, on a folder copied to another machine.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import re
import socket
import subprocess
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

__all__ = [
    "EXPERIMENT_FILE",
    "PLAN_FILE",
    "ExperimentError",
    "TrialStatus",
    "check_name",
    "code_revision",
    "default_storage",
    "experiment_dir",
    "package_versions",
    "read_experiment",
    "read_json",
    "read_statuses",
    "resolve_storage",
    "write_json",
]

EXPERIMENT_FILE = "experiment.json"
PLAN_FILE = "plan.json"
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


class ExperimentError(ValueError):
    """A bad experiment name, storage location or experiment folder; the message names it."""


def default_storage() -> Path:
    """``$DIFFCOM_STORAGE``, else ``~/diffcom-experiments``."""
    configured = os.environ.get("DIFFCOM_STORAGE")
    return Path(configured).expanduser() if configured else Path.home() / "diffcom-experiments"


def resolve_storage(storage: str | Path | None) -> Path:
    """An absolute storage directory from a path, a ``file://`` URI or ``None`` (the default).

    Trials change into their own directories, so relative paths are resolved here, once.

    Raises:
        ExperimentError: for object-store URIs (``s3://``, ``gs://``...): trials write their runs
            and the shared stage-1 checkpoints with ordinary file operations, so the storage must
            be a path every node mounts (NFS, or a bucket mounted with a FUSE driver).
    """
    if storage is None:
        return default_storage().resolve()
    text = str(storage)
    if text.startswith("file://"):
        text = text[len("file://") :]
    elif "://" in text:
        scheme = text.split("://", 1)[0]
        raise ExperimentError(
            f"--storage {text}: {scheme}:// storage is not supported; mount it on every node "
            "(NFS, or a FUSE mount of the bucket) and pass the mounted path"
        )
    return Path(text).expanduser().resolve()


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
        raise ExperimentError(f"no experiment {name!r} in {storage}{listing}")
    if not must_exist and path.exists():
        raise ExperimentError(
            f"experiment {name!r} already exists in {storage}: continue it with "
            f"`diffcom sweep resume {name}`, add trials with `diffcom sweep extend {name}`, "
            "or launch under another --name"
        )
    return path


def read_json(path: Path) -> Any:
    """Read a JSON file; a missing or damaged file is an :class:`ExperimentError` naming it."""
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise ExperimentError(f"{path}: missing") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ExperimentError(f"{path}: not valid JSON ({error})") from None


def write_json(path: Path, data: Any) -> None:
    """Write JSON atomically (a reader never sees half a file, a crash never leaves one)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    temporary.write_text(json.dumps(data, indent=2, default=str) + "\n")
    os.replace(temporary, path)


def read_experiment(path: Path) -> dict:
    """The ``experiment.json`` of an experiment folder."""
    data = read_json(Path(path) / EXPERIMENT_FILE)
    for key in ("name", "kind", "metric", "mode"):
        if key not in data:
            raise ExperimentError(f"{Path(path) / EXPERIMENT_FILE}: key {key!r} is missing")
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
class TrialStatus:
    """One run's state as read from its folder.

    Attributes:
        name: the run's path under ``runs/``.
        state: ``pending`` (planned, not started), ``running``, ``interrupted`` (marked running by
            a process on this host that no longer exists), ``stopped`` (by the scheduler, e.g.
            ASHA, or Ctrl-C), ``finished`` or ``failed``.
        seed: the training seed.
        epochs: ``(stage, epoch)`` of the last finished epoch, or ``None``.
        metric: the study metric of the finished run (selected weights), or of the last epoch.
        test: test MRR and Hits@1 under the clean protocol once finished.
        error: the failure reason.
        attempts: how many times the run was started.
        heartbeat: when a running run last finished an epoch (UTC, ISO 8601).
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


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def read_statuses(path: Path, metric: str, planned: list[str] = ()) -> list[TrialStatus]:
    """The state of every run under ``path/runs`` plus planned runs not started yet.

    A damaged ``status.json`` or ``results.json`` makes that run ``failed`` with the reason; it
    never stops the listing.
    """
    runs_root = Path(path) / "runs"
    found: dict[str, TrialStatus] = {}
    for status_file in sorted(runs_root.glob("**/status.json")):
        run = status_file.parent
        name = run.relative_to(runs_root).as_posix()
        try:
            status = read_json(status_file)
        except ExperimentError as error:
            found[name] = TrialStatus(name, "failed", error=str(error))
            continue
        state = status.get("state", "running")
        if (
            state == "running"
            and status.get("host") == socket.gethostname()
            and isinstance(status.get("pid"), int)
            and not _process_alive(status["pid"])
        ):
            state = "interrupted"
        epochs, value, test = None, None, None
        metrics_file = run / "metrics.jsonl"
        if metrics_file.is_file():
            for line in metrics_file.read_text().splitlines():
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    continue
                epochs = (record.get("stage"), record.get("epoch"))
                value = record.get(metric, value)
        results_file = run / "results.json"
        if state == "finished" and results_file.is_file():
            try:
                results = read_json(results_file)
                split, protocol, measure = metric.split(".", 2)
                value = results[split][protocol][measure]
                test = {
                    "mrr": results["test"]["clean"]["mrr"],
                    "hits@1": results["test"]["clean"]["hits@1"],
                }
            except (ExperimentError, KeyError, ValueError) as error:
                state, status["error"] = "failed", f"unreadable results: {error}"
        found[name] = TrialStatus(
            name,
            state,
            seed=status.get("seed"),
            epochs=epochs,
            metric=value,
            test=test,
            error=status.get("error"),
            attempts=len(status.get("attempts", [])),
            heartbeat=status.get("heartbeat")
            or (status.get("attempts") or [{}])[-1].get("started"),
        )
    for name in planned:
        found.setdefault(name, TrialStatus(name, "pending"))
    return [found[name] for name in sorted(found)]
