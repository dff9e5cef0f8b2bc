"""The experiment and run format on disk, declared once: file names, versions, reads and writes.

Everything the trainer, the trial runner, the sweeps and the analysis write to or read from a run or
experiment folder goes through this module, which imports the standard library only (no torch,
numpy, yaml or Ray; no project package): it is the bottom layer, under :mod:`core`, and the one
project module :mod:`analysis` imports.

A run folder (``diffcom train --out``, or ``<experiment>/runs/<trial>/``)::

    config.json              the run's config (CONFIG)
    metrics.jsonl            one record per epoch (METRICS)
    checkpoints/last.pt      the full training state (CHECKPOINT_DIR / CHECKPOINT_FILE)
    results.json             final metrics of the selected weights (RESULTS)
    ranks_<split>.npz        per-query ranks (:func:`ranks_file`)
    trial.json, status.json  provenance and state of a sweep's run (TRIAL, STATUS)
    point.json               the drawn point of a search trial (POINT)
    tracking.json            a sweep run's MLflow run and last logged epochs (TRACKING)
    tensorboard/             its TensorBoard event files (TENSORBOARD_DIR)

An experiment folder (``<storage>/<name>/``) holds ``experiment.json`` (EXPERIMENT),
``plan.json`` (PLAN), ``study.yaml`` (STUDY_COPY), ``runs/`` (RUNS_DIR) and the shared stage-1 runs
under ``stage1/<key>/`` (STAGE1_DIR) with ``done.json`` (DONE), ``events.jsonl`` (EVENTS) and a
run folder ``run/`` (STAGE1_RUN).

Versions. Every JSON file of a versioned kind carries ``"format_version": "MAJOR.MINOR"``. A reader
takes any version up to its own major (a file without the key is version 1.0: every file written
before versions existed stays readable) and refuses a newer major with a :class:`StoreError`
naming the file, the version found and the version this code reads. A minor bump only adds keys
that older readers may ignore. :func:`read_json` returns the object without ``format_version``.
JSONL lines carry no version key at major 1 (a metrics record stays a flat epoch record); a line
that has one is checked like a file. ``config.json`` is not versioned here: it is also a config
file a user edits and passes to ``--config``, so it holds the config alone, and its schema is the
config's (:mod:`core.config` refuses unknown keys and fills keys added since with defaults).

Writes are atomic: a temporary file in the same folder, flushed to disk, then renamed into place,
so a reader never sees half a file and a crash leaves the previous one.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, NamedTuple

__all__ = [
    "CHECKPOINT_DIR",
    "CHECKPOINT_FILE",
    "CONFIG",
    "DONE",
    "EVENTS",
    "EXPERIMENT",
    "KINDS",
    "METRICS",
    "PLAN",
    "POINT",
    "RESULTS",
    "RUNS_DIR",
    "STAGE1_DIR",
    "STAGE1_RUN",
    "STATUS",
    "STUDY_COPY",
    "TENSORBOARD_DIR",
    "TRACKING",
    "TRIAL",
    "FileKind",
    "JsonLine",
    "JsonLines",
    "StoreError",
    "append_jsonl",
    "atomic_write",
    "atomic_write_bytes",
    "checkpoint_path",
    "default_storage",
    "describe_json",
    "flatten",
    "flatten_results",
    "is_temporary",
    "kind_of",
    "load_json",
    "ranks_file",
    "read_json",
    "read_jsonl",
    "temporary_name",
    "write_json",
    "write_jsonl",
]

VERSION_KEY = "format_version"


class StoreError(ValueError):
    """A file of the experiment format that cannot be read; the message names it and says why.

    Attributes:
        reason: what is wrong.
        path: the file, or ``None``.
        cause: the underlying parser's or system's message, when there is one.
    """

    def __init__(self, reason: str, path: str | Path | None = None, cause: str | None = None):
        super().__init__(f"{path}: {reason}" if path is not None else reason)
        self.reason = reason
        self.path = None if path is None else str(path)
        self.cause = cause


@dataclass(frozen=True)
class FileKind:
    """One kind of file of the format.

    Attributes:
        file: its name in its folder.
        version: ``"MAJOR.MINOR"`` this code writes and reads up to (same major), or ``None`` for
            a file that carries no version (``config.json``, see the module docstring).
        holds: what it holds, for messages.
    """

    file: str
    version: str | None
    holds: str


CONFIG = FileKind("config.json", None, "a run's config")
# 1.1: plateau_decay, the stage-1 epoch that restarted from the best weights at a lower rate.
METRICS = FileKind("metrics.jsonl", "1.1", "one record per epoch")
# 1.1: timings.cpu_seconds; a baseline run's baseline section (model, epochs, budget, stop).
RESULTS = FileKind("results.json", "1.1", "a run's final metrics")
# 1.1: the stage-1 key a run waits for, its first epoch's time and epoch count (sweep watch's ETA).
# 1.2: state "waiting" with waiting_for (a baseline waiting for its reference run), baseline.
STATUS = FileKind("status.json", "1.2", "a sweep run's state and attempts")
# 1.1: baseline (model, budget, clock, the run it was matched to).
TRIAL = FileKind("trial.json", "1.1", "a sweep run's provenance")
POINT = FileKind("point.json", "1.0", "a search trial's drawn point")
# 1.1: optuna_storage, the RDB of a search's Optuna study.
# 1.2: tracking (the MLflow URI and parent run, TensorBoard on or off).
EXPERIMENT = FileKind("experiment.json", "1.2", "what an experiment launched")
PLAN = FileKind("plan.json", "1.0", "an experiment's trial configs")
DONE = FileKind("done.json", "1.0", "a finished shared stage-1 run")
EVENTS = FileKind("events.jsonl", "1.0", "who trained or reused a shared stage-1 run")
TRACKING = FileKind("tracking.json", "1.0", "a sweep run's MLflow run and last logged epochs")
KINDS = (CONFIG, METRICS, RESULTS, STATUS, TRIAL, POINT, EXPERIMENT, PLAN, DONE, EVENTS, TRACKING)

RUNS_DIR = "runs"
STAGE1_DIR = "stage1"
STAGE1_RUN = "run"
STUDY_COPY = "study.yaml"
CHECKPOINT_DIR = "checkpoints"
CHECKPOINT_FILE = "last.pt"
TENSORBOARD_DIR = "tensorboard"

_TEMPORARY = re.compile(r"\..+\.[0-9]+\.[0-9a-f]{12}\.tmp")


def checkpoint_path(run_dir: str | Path) -> Path:
    """``<run_dir>/checkpoints/last.pt``: the checkpoint a run resumes from."""
    return Path(run_dir) / CHECKPOINT_DIR / CHECKPOINT_FILE


def ranks_file(split: str) -> str:
    """``ranks_<split>.npz``: the per-query ranks of a split (``queries``, ``realistic``)."""
    return f"ranks_{split}.npz"


def kind_of(path: str | Path) -> FileKind | None:
    """The declared kind of a file, by its name, or ``None`` for a name outside the format."""
    name = Path(path).name
    return next((kind for kind in KINDS if kind.file == name), None)


def default_storage() -> Path:
    """Where experiments live: ``$DIFFCOM_STORAGE``, else ``~/diffcom-experiments``."""
    configured = os.environ.get("DIFFCOM_STORAGE")
    return Path(configured).expanduser() if configured else Path.home() / "diffcom-experiments"


# ---------------------------------------------------------------------------------- atomic writes


def temporary_name(name: str) -> str:
    """The name a write of the file ``name`` goes under before it is renamed into place: hidden,
    with the process id and a random part (concurrent writers never share one);
    :func:`is_temporary` knows it."""
    return f".{name}.{os.getpid()}.{secrets.token_hex(6)}.tmp"


def is_temporary(name: str) -> bool:
    """Whether a file name is one :func:`temporary_name` gives (a write in flight, or left by a
    kill)."""
    return _TEMPORARY.fullmatch(name) is not None


@contextlib.contextmanager
def atomic_write(path: str | Path) -> Iterator[IO[bytes]]:
    """A binary stream whose content replaces ``path`` only when the block ends without error.

    The stream writes to a temporary file next to ``path`` (its name carries the process id and
    a random part, so concurrent writers never share one), which is flushed to disk and renamed
    over ``path``; an error inside the block removes it and leaves ``path`` as it was. The folder
    is created if missing. ``torch.save`` and ``numpy.savez_compressed`` accept the stream.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(temporary_name(path.name))
    try:
        handle = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        with os.fdopen(handle, "wb") as stream:
            yield stream
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise


def atomic_write_bytes(path: str | Path, payload: bytes) -> None:
    """Replace ``path`` by ``payload`` atomically (see :func:`atomic_write`)."""
    with atomic_write(path) as stream:
        stream.write(payload)


# ------------------------------------------------------------------------------------------ JSON


def write_json(path: str | Path, data: Any, kind: FileKind | None) -> None:
    """Write a JSON object atomically, with ``format_version`` first when ``kind`` is versioned.

    Args:
        path: the file.
        data: the object (left unchanged; values JSON cannot hold are written as text). Any
            other JSON value is written as it is, without a version: readers refuse it, so only
            a test that makes a damaged file has a use for it.
        kind: the file's kind; ``None`` for a JSON file outside the format (no version).
    """
    if isinstance(data, dict) and kind is not None and kind.version is not None:
        data = {VERSION_KEY: kind.version, **{k: v for k, v in data.items() if k != VERSION_KEY}}
    text = json.dumps(data, indent=2, default=str) + "\n"
    atomic_write_bytes(path, text.encode())


def load_json(path: str | Path) -> Any:
    """The JSON value in ``path``, whatever its shape, version unchecked.

    Raises:
        StoreError: the file is missing, unreadable or not JSON.
    """
    try:
        text = Path(path).read_text()
    except FileNotFoundError:
        raise StoreError("missing", path) from None
    except (OSError, UnicodeDecodeError) as error:
        raise StoreError(f"unreadable: {error}", path, cause=str(error)) from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise StoreError(f"not valid JSON ({error})", path, cause=str(error)) from None


def read_json(path: str | Path, kind: FileKind | None) -> dict:
    """The JSON object in ``path``, checked against ``kind``'s version, ``format_version`` removed.

    Args:
        path: the file.
        kind: its kind; ``None`` for a JSON file outside the format (no version check).

    Raises:
        StoreError: naming the file, when it is missing, unreadable, not JSON, JSON of another
            shape than an object, or of a newer major version than this code reads.
    """
    data = load_json(path)
    if not isinstance(data, dict):
        raise StoreError(f"expected a JSON object {{...}}, found {describe_json(data)}", path)
    if kind is None or kind.version is None:
        return data
    _check_version(data.get(VERSION_KEY), kind, path)
    return {key: value for key, value in data.items() if key != VERSION_KEY}


def _major(version: object) -> int | None:
    """The major number of ``"1.0"``, ``"2"`` or ``1``; ``None`` when it is not a version."""
    if isinstance(version, int) and not isinstance(version, bool):
        return version if version >= 0 else None
    if isinstance(version, str):
        major, _, minor = version.partition(".")
        if major.isdigit() and (not minor or minor.isdigit()):
            return int(major)
    return None


def _check_version(found: object, kind: FileKind, where: str | Path) -> None:
    if found is None:  # written before versions existed: version 1
        return
    major = _major(found)
    if major is None:
        raise StoreError(
            f"{VERSION_KEY} {found!r} is not a version (expected MAJOR.MINOR text such as "
            f"{kind.version!r})",
            where,
        )
    if major > _major(kind.version):
        raise StoreError(
            f"{VERSION_KEY} {found} is newer than this code reads ({kind.file} up to major "
            f"{_major(kind.version)}, version {kind.version}); update diffcom to read it",
            where,
        )


def describe_json(value: Any) -> str:
    """``a list``, ``the string 'finished'``, ``the number 42``... for messages."""
    if isinstance(value, list):
        return "a list"
    if isinstance(value, str):
        return f"the string {value[:40]!r}"
    if isinstance(value, bool) or value is None:
        return json.dumps(value)
    if isinstance(value, (int, float)):
        return f"the number {value}"
    return f"a {type(value).__name__}"


# ----------------------------------------------------------------------------------------- JSONL


def append_jsonl(path: str | Path, record: dict) -> None:
    """Append one record as a line (a kill may cut the last line: readers report it as incomplete)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as stream:
        stream.write(json.dumps(record) + "\n")


def write_jsonl(path: str | Path, records: list[dict]) -> None:
    """Replace a JSONL file by ``records`` atomically."""
    atomic_write_bytes(path, "".join(json.dumps(record) + "\n" for record in records).encode())


class JsonLine(NamedTuple):
    """One non-blank line of a JSONL file.

    Attributes:
        number: 1-based line number.
        text: the line, stripped.
        value: the parsed value (``None`` also when the line is not JSON: see ``complete``).
        complete: ``False`` when the line is not JSON (cut by a kill, or still being written).
    """

    number: int
    text: str
    value: Any
    complete: bool


class JsonLines(NamedTuple):
    """What :func:`read_jsonl` read: the non-blank lines and how many lines the file has."""

    lines: list[JsonLine]
    count: int


def read_jsonl(path: str | Path, kind: FileKind) -> JsonLines:
    """Every non-blank line of a JSONL file, parsed; lines that are not JSON are kept, marked.

    Raises:
        StoreError: naming the file, when it is missing or unreadable, or naming the line, when
            an object on it has a ``format_version`` of a newer major than this code reads.
    """
    try:
        text = Path(path).read_text(errors="replace")
    except FileNotFoundError:
        raise StoreError("missing", path) from None
    except OSError as error:
        raise StoreError(f"unreadable: {error}", path, cause=str(error)) from None
    raw = text.splitlines()
    lines = []
    for number, line in enumerate(raw, start=1):
        line = line.strip()
        if not line:
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError:
            lines.append(JsonLine(number, line, None, False))
            continue
        if isinstance(value, dict) and VERSION_KEY in value:
            _check_version(value[VERSION_KEY], kind, f"{path}:{number}")
        lines.append(JsonLine(number, line, value, True))
    return JsonLines(lines, len(raw))


# --------------------------------------------------------------------------------------- flatten


def flatten(tree: dict, prefix: str = "", separator: str = ".") -> dict:
    """Nested objects as one level of joined keys: ``{"a": {"b": 1}}`` → ``{"a.b": 1}``.

    Every key gets ``prefix`` in front; an empty nested object gives no key; lists and other
    values are kept as they are.
    """
    flat = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, f"{name}{separator}", separator))
        else:
            flat[name] = value
    return flat


_RESULT_SPLITS = ("valid", "test")


def flatten_results(results: dict) -> dict:
    """``results.json`` metrics as flat ``split.protocol.measure`` keys (``valid.clean.mrr``),
    plus ``split.inference_ms_per_query`` and ``train_seconds``; ``clean_all`` (the full ranking
    report) is left out."""
    flat = {}
    for split in _RESULT_SPLITS:
        section = results.get(split, {})
        for protocol, values in section.items():
            if isinstance(values, dict) and protocol != "clean_all":
                flat.update(flatten(values, f"{split}.{protocol}."))
        if "inference_ms_per_query" in section:
            flat[f"{split}.inference_ms_per_query"] = section["inference_ms_per_query"]
    flat["train_seconds"] = results.get("timings", {}).get("train_seconds")
    return flat
