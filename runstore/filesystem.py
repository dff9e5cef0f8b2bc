"""Experiments in any other store fsspec opens (``sftp://``, ``ftp://``, ``hdfs://``,
``webdav://``, ``smb://``...): the :class:`~runstore.bucket.Bucket` methods through fsspec, and a
coordinator in place of the conditional writes such stores lack.

An experiment at ``sftp://HOST/PATH/<name>`` holds the same files as in a bucket, each a file
under the same relative path; mirrors, status, watch, report and resume work unchanged. What
differs:

* **Writes** go to a temporary name beside the file (one :func:`runstore.is_temporary` accepts,
  so listings skip it) and are renamed over it (the file system's ``mv``), so a reader never sees
  half a checkpoint where that rename is atomic and replaces the file: SFTP's ``posix-rename``
  (tested here), and a rename on the server's own disk for most FTP, SMB and HDFS servers.
* **Versions.** A listing dates and sizes each file; where the store gives no checksum, a file's
  version (its "ETag") is its size and modification time. A store that keeps whole seconds (an
  SFTP server) may then hide a rewrite of the same size within the same second from a reader
  until the next one; trials never depend on it (they resume from what the holder pushed and
  then stopped writing). :meth:`FilesystemBucket.read` versions a file by its content's digest.
* **Conditional writes** (:meth:`~runstore.bucket.Bucket.create`, ``replace`` and the ``head``
  a lease's expiry reads) go through one :class:`Coordinator` per store, which does them one at
  a time and keeps each conditional object's digest and the time it last changed on its own
  clock. Inside Ray (a trial, a driver after ``ray.init``) it is a named Ray actor that every
  node reaches (:func:`use_coordinators`, set by :mod:`sweeps.ray_adapter`); elsewhere it is
  this machine's, a lock file and a state file under the scratch folder. A coordinator that
  restarts (its node lost) adopts each lease it finds as renewed at first sight: a dead holder's
  lease is taken over one TTL later, never early. Two drivers on different machines that share
  no Ray cluster are not coordinated with each other.

Credentials and options come from fsspec's own environment variables,
``FSSPEC_<PROTOCOL>_<OPTION>`` (``FSSPEC_SFTP_USERNAME``, ``FSSPEC_SFTP_KEY_FILENAME``,
``FSSPEC_SFTP_PASSWORD``...), or from an SSH agent and ``~/.ssh`` for SFTP. A password inside
the URI is refused (it would be written into ``experiment.json``).
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import hashlib
import json
import os
import socket
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from runstore import atomic_write_bytes, is_temporary, temporary_name
from runstore.bucket import Bucket, BucketError, BucketUri, RemoteObject

__all__ = [
    "Coordinator",
    "FilesystemBucket",
    "LocalCoordinator",
    "digest",
    "make_folders",
    "renamed_into",
    "use_coordinators",
]

#: Finds the coordinator of a store (``protocol://host``) for this process, or ``None`` for
#: this machine's (:class:`LocalCoordinator`); see :func:`use_coordinators`.
_COORDINATORS: Callable[[str], object | None] | None = None


def use_coordinators(find: Callable[[str], object | None] | None) -> None:
    """Have every :class:`FilesystemBucket` of this process ask ``find(store)`` for its
    coordinator (an object with :class:`Coordinator`'s ``create``, ``replace`` and ``head``),
    falling back to this machine's when it answers ``None``. :mod:`sweeps.ray_adapter` sets one
    that answers a Ray actor whenever Ray is initialized."""
    global _COORDINATORS
    _COORDINATORS = find


def digest(payload: bytes) -> str:
    """The version of a conditional object: its content's digest."""
    return hashlib.sha256(payload).hexdigest()[:32]


class FilesystemBucket(Bucket):
    """A location in a store fsspec opens (see the module docstring)."""

    NOUN = "folder"
    CREATE_HINT = "check the path; on an SFTP server it is absolute"
    DENIED_HINT = (
        "check the credentials fsspec reads for it (FSSPEC_<PROTOCOL>_USERNAME, _PASSWORD, "
        "_KEY_FILENAME..., or an SSH agent) and the folder's permissions"
    )

    @property
    def client(self):
        """The fsspec file system. Not kept on the bucket: fsspec keeps one per protocol,
        options and thread, and an SFTP session must not serve two threads at once (a lease's
        renewer, a trial's status pushes)."""
        import fsspec
        import fsspec.config

        # fsspec reads FSSPEC_* variables when imported; read them again for this store.
        fsspec.config.set_conf_env(fsspec.config.conf)
        try:
            return fsspec.core.url_to_fs(f"{self.store}/")[0]
        except ImportError as error:  # the protocol's package is missing
            raise BucketError(f"{self.uri}: {error}") from None

    @property
    def protocol(self) -> str:
        return self.uri.scheme[: -len("://")]

    @property
    def store(self) -> str:
        """``protocol://host``: what one coordinator serves."""
        return f"{self.uri.scheme}{self.uri.bucket}"

    def where(self) -> str:
        return str(self.uri)

    def _path(self, relative: str = "") -> str:
        """The path of ``relative`` in the store's file system (no connection needed)."""
        import fsspec

        try:
            kind = fsspec.get_filesystem_class(self.protocol)
        except ImportError as error:  # the protocol's package is missing
            raise BucketError(f"{self.uri}: {error}") from None
        root = kind._strip_protocol(f"{self.store}/{self.uri.key()}").rstrip("/")
        relative = relative.strip("/")
        return f"{root}/{relative}" if relative else root or "/"

    # -------------------------------------------------------------------------------- checks

    def _top(self) -> str:
        return f"{self._path()!r} on {self.uri.bucket}"

    def _ask_for_one_object(self) -> None:
        # As a local --storage folder, the folder is created if missing (as far as the server
        # lets this user); the probe write that follows checks it can be written.
        make_folders(self.client, self._path())

    def _failure(self, error: Exception) -> tuple[str, str] | None:
        name = type(error).__name__
        reason = f"{name}: {error}".rstrip(": ")
        if isinstance(error, BucketError):
            return "other", str(error)
        if isinstance(error, FileNotFoundError):
            return "missing", reason
        if isinstance(error, PermissionError) or "Authentication" in name:
            return "denied", reason
        if isinstance(error, (ConnectionError, TimeoutError, socket.gaierror)) or name in (
            "NoValidConnectionsError",
            "SSHException",
        ):
            return "unreachable", reason  # refused, timed out, no such host, a broken session
        if isinstance(error, OSError):
            return "other", f"cannot use it ({reason})"  # e.g. a file where the folder should be
        return None

    # ------------------------------------------------------------------------------- objects

    def listing(self, under: str = "") -> dict[str, RemoteObject]:
        top = self._path(under)
        root = self._path()
        try:
            found = self.client.find(top, detail=True)
        except FileNotFoundError:
            return {}
        objects = {}
        for path, info in found.items():
            relative = path[len(root) :].lstrip("/") if path.startswith(root) else None
            if not relative or info.get("type") != "file" or is_temporary(Path(path).name):
                continue
            size = int(info.get("size") or 0)
            modified = _modified(info)
            objects[relative] = RemoteObject(size, _version(info, size, modified), modified)
        return objects

    def exists(self, relative: str) -> bool:
        return self.client.isfile(self._path(relative))

    def head(self, relative: str) -> tuple[str, float, float] | None:
        """``(digest, last changed, now)`` on the coordinator's clock (see the module
        docstring); the object is read whole, so only small ones (leases) are asked for."""
        return self.coordinator.head(str(self.uri), relative)

    def read(self, relative: str) -> tuple[bytes, str, float] | None:
        path = self._path(relative)
        try:
            payload = self.client.cat_file(path)
            modified = _modified(self.client.info(path))
        except FileNotFoundError:
            return None
        return payload, digest(payload), modified

    def download(self, relative: str, path: Path) -> None:
        # get_file, not a read loop: SFTP's get pipelines its reads (65 MiB: 0.8 s, not 16 s).
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_name(temporary_name(path.name))
        try:
            self.client.get_file(self._path(relative), str(temporary))
            os.replace(temporary, path)
        except BaseException:
            temporary.unlink(missing_ok=True)
            raise

    def upload(self, path: Path, relative: str) -> None:
        with self._renamed_into(relative) as temporary:
            self.client.put_file(str(path), temporary)

    def write(self, relative: str, payload: bytes) -> str:
        with self._renamed_into(relative) as temporary:
            self.client.pipe_file(temporary, payload)
        return digest(payload)

    def create(self, relative: str, payload: bytes) -> str | None:
        return self.coordinator.create(str(self.uri), relative, payload)

    def replace(self, relative: str, payload: bytes, etag: str) -> str | None:
        return self.coordinator.replace(str(self.uri), relative, payload, etag)

    def delete(self, relative: str) -> None:
        with contextlib.suppress(FileNotFoundError):  # as S3's delete: gone either way
            self.client.rm_file(self._path(relative))

    @contextlib.contextmanager
    def _renamed_into(self, relative: str) -> Iterator[str]:
        with renamed_into(self.client, self._path(relative)) as temporary:
            yield temporary

    # --------------------------------------------------------------------------- coordination

    @property
    def coordinator(self):
        """This store's coordinator for this process (see :func:`use_coordinators`)."""
        found = _COORDINATORS(self.store) if _COORDINATORS is not None else None
        return found if found is not None else LocalCoordinator.of(self.store)

    def pyarrow_filesystem(self):
        """``(pyarrow file system, path)``: this location for Ray Tune, through pyarrow's
        handler of this store's fsspec file systems (:class:`runstore.arrow.StoreHandler`)."""
        import pyarrow.fs

        from runstore.arrow import StoreHandler

        return pyarrow.fs.PyFileSystem(StoreHandler(self.store)), self._path()


@contextlib.contextmanager
def renamed_into(filesystem, final: str) -> Iterator[str]:
    """A temporary path beside ``final`` to write (in the same thread); renamed over ``final``
    after the block, removed if the block fails. Its folder is created first."""
    parent, _, name = final.rpartition("/")
    make_folders(filesystem, parent or "/")
    temporary = f"{parent}/{temporary_name(name)}"
    try:
        yield temporary
        filesystem.mv(temporary, final)
    except BaseException:
        with contextlib.suppress(Exception):
            filesystem.rm_file(temporary)
        raise


def make_folders(filesystem, path: str) -> None:
    """``mkdir -p path`` that another process or thread may be doing at the same time: fsspec's
    ``makedirs`` checks, then creates, and fails on SFTP when someone else created the folder
    between the two."""
    try:
        kind = filesystem.info(path).get("type")  # one request: isdir, then exists, would race
    except FileNotFoundError:
        kind = None
    if kind == "directory":
        return
    if kind is not None:
        raise NotADirectoryError(f"{path} is a file, not a folder")
    parent = filesystem._parent(path)
    if parent and parent != path:
        make_folders(filesystem, parent)
    try:
        filesystem.mkdir(path, create_parents=False)
    except OSError:
        if not filesystem.isdir(path):  # not a lost race: a real failure
            raise


def _modified(info: dict) -> float:
    """A listing entry's modification time in seconds (fsspec's backends name it differently)."""
    for key in ("mtime", "modified", "LastModified", "last_modified", "updated", "created"):
        value = info.get(key)
        if isinstance(value, datetime.datetime):
            return value.timestamp()
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            with contextlib.suppress(ValueError):
                return datetime.datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
    return 0.0


def _version(info: dict, size: int, modified: float) -> str:
    """A file's version as a listing gives it: the store's checksum, else size and mtime."""
    for key in ("ETag", "etag", "md5", "checksum", "content_md5"):
        if info.get(key):
            return str(info[key]).strip('"')
    return f"{size}-{modified:.6f}"


class Coordinator:
    """Conditional writes for one store that has none: one at a time, with each conditional
    object's digest and the time it last changed (on this object's clock) kept in ``versions``.

    A :class:`LocalCoordinator` keeps ``versions`` in a file under a lock; a Ray actor holds a
    plain :class:`Coordinator` (:mod:`sweeps.ray_adapter`).
    """

    def __init__(self) -> None:
        #: store path -> (digest, changed at): the versions this coordinator made or saw.
        self.versions: dict[str, tuple[str, float]] = {}

    @staticmethod
    def _bucket(location: str) -> FilesystemBucket:
        bucket = Bucket(BucketUri.parse(location))
        assert isinstance(bucket, FilesystemBucket), location
        return bucket

    def create(self, location: str, relative: str, payload: bytes) -> str | None:
        """Write ``location/relative`` only if no file is there; its digest, or ``None``."""
        bucket = self._bucket(location)
        if bucket.exists(relative):
            return None
        version = bucket.write(relative, payload)
        self.versions[bucket._path(relative)] = (version, time.time())
        return version

    def replace(self, location: str, relative: str, payload: bytes, etag: str) -> str | None:
        """Overwrite ``location/relative`` only if its content's digest is still ``etag``."""
        bucket = self._bucket(location)
        found = bucket.read(relative)
        if found is None or found[1] != etag:
            return None
        version = bucket.write(relative, payload)
        self.versions[bucket._path(relative)] = (version, time.time())
        return version

    def head(self, location: str, relative: str) -> tuple[str, float, float] | None:
        """``(digest, changed at, now)`` on this coordinator's clock, or ``None``. A file this
        coordinator has not seen in this version (written before it started) counts as changed
        now: a lease's TTL runs from the first look, never from a time it cannot know."""
        bucket = self._bucket(location)
        path = bucket._path(relative)
        found = bucket.read(relative)
        now = time.time()
        if found is None:
            self.versions.pop(path, None)
            return None
        version, changed = self.versions.get(path, ("", now))
        if version != found[1]:
            version, changed = found[1], now
            self.versions[path] = (version, changed)
        return version, changed, now


class LocalCoordinator:
    """This machine's coordinator of one store: every process on the machine does its
    conditional writes under one lock file, with the versions in a JSON file beside it
    (``$DIFFCOM_SCRATCH``, default the system's temporary folder,
    ``/diffcom-coordinator-<hash of the store>.{lock,json}``)."""

    _OF: dict[str, LocalCoordinator] = {}
    _OF_LOCK = threading.Lock()

    def __init__(self, store: str):
        base = Path(os.environ.get("DIFFCOM_SCRATCH") or tempfile.gettempdir())
        base.mkdir(parents=True, exist_ok=True)
        name = f"diffcom-coordinator-{hashlib.sha256(store.encode()).hexdigest()[:12]}"
        self.lock_path = base / f"{name}.lock"
        self.state_path = base / f"{name}.json"
        self._threads = threading.Lock()  # flock does not exclude threads of one process

    @classmethod
    def of(cls, store: str) -> LocalCoordinator:
        with cls._OF_LOCK:
            if store not in cls._OF:
                cls._OF[store] = cls(store)
            return cls._OF[store]

    @contextlib.contextmanager
    def _held(self) -> Iterator[Coordinator]:
        with self._threads, self.lock_path.open("a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            coordinator = Coordinator()
            with contextlib.suppress(OSError, ValueError, TypeError):
                saved = json.loads(self.state_path.read_text())
                coordinator.versions = {path: tuple(entry) for path, entry in saved.items()}
            before = dict(coordinator.versions)
            yield coordinator
            if coordinator.versions != before:
                atomic_write_bytes(self.state_path, json.dumps(coordinator.versions).encode())

    def create(self, location: str, relative: str, payload: bytes) -> str | None:
        with self._held() as coordinator:
            return coordinator.create(location, relative, payload)

    def replace(self, location: str, relative: str, payload: bytes, etag: str) -> str | None:
        with self._held() as coordinator:
            return coordinator.replace(location, relative, payload, etag)

    def head(self, location: str, relative: str) -> tuple[str, float, float] | None:
        with self._held() as coordinator:
            return coordinator.head(location, relative)
