"""Experiments that live in a bucket (``--storage s3://bucket/prefix``, ``gs://...`` or
``az://...``); no Ray here.

The bucket holds the experiment's folder layout object by object (:mod:`runstore.bucket`). Each
process works in a local mirror of the part it needs, so the trainer, the trial runner and the
readers keep their ordinary file code:

* a **trial** (:func:`open_trial`) pulls ``experiment.json`` and ``plan.json``, then the folders of
  its runs (a retried or resumed run continues from the checkpoint there), trains in its mirror and
  pushes what changed after every epoch (the report of the epoch), every
  :data:`STATUS_PUSH_SECONDS` (``status.json`` only: heartbeats of waits), and when it ends. Its
  mirror is deleted then: everything it made is in the bucket.
* the **shared stage 1** (:class:`BucketStage1Store`) is found by its ``done.json`` in the bucket
  and trained under a lease object ``stage1/<key>.lease`` (:class:`runstore.bucket.Lease`) in
  place of ``flock``: two trials never train one key at once, and a dead holder's lease expires
  after :data:`LEASE_TTL_SECONDS` without renewal, when the next asker resumes its partial run
  from the checkpoint it pushed. The holder pushes the finished run and ``done.json`` before it
  releases the lease.
* a **driver** (launch, resume, extend) writes the experiment's own files into its mirror and
  pushes them, a new experiment after claiming its name (:func:`claim_new_experiment`); Ray Tune
  keeps its state in the bucket itself.
* a **reader** (``status``, ``watch``, ``report``) pulls everything but checkpoints and
  TensorBoard files (:func:`pull_view`), again on every refresh, changed files only.

Code that only has the mirror's folder (:meth:`sweeps.stage1.Stage1Store.of_experiment`, a
baseline's wait for its reference run) finds the bucket behind it among this process's open
mirrors; the folder's marker file (:data:`runstore.bucket.MARKER`) names it for a person.
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import json
import os
import secrets
import shutil
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

from runstore import (
    CHECKPOINT_DIR,
    EXPERIMENT,
    RUNS_DIR,
    STAGE1_DIR,
    STAGE1_RUN,
    STATUS,
)
from runstore.bucket import (
    HEAVY_PARTS,
    Bucket,
    BucketError,
    BucketUri,
    Lease,
    Mirror,
    is_bucket_uri,
    pull_metadata,
    pull_results,
    scratch_folder,
)
from sweeps.experiment import ExperimentError, check_name, experiment_dir, now
from sweeps.stage1 import Stage1Store

__all__ = [
    "LAUNCH_FILE",
    "LEASE_TTL_SECONDS",
    "BucketStage1Store",
    "RemoteExperiment",
    "claim_new_experiment",
    "find_experiment",
    "open_trial",
    "pull_view",
    "refresh",
    "refresh_view",
]

#: Seconds a stage-1 lease lives without renewal (renewed every quarter of it): a trial killed
#: while training a shared stage 1 holds it up for at most this long.
LEASE_TTL_SECONDS = 120.0

#: Seconds between two uploads of changed ``status.json`` files while a trial runs (its
#: heartbeat while it waits for a stage 1 or a reference run; epochs push on their own).
STATUS_PUSH_SECONDS = 15.0

# The open mirrors of this process, by local folder: a store or a refresh finds its mirror here.
_OPEN: dict[Path, RemoteExperiment] = {}
_OPEN_LOCK = threading.Lock()


class RemoteExperiment:
    """One experiment in a bucket and this process's local mirror of it.

    Args:
        uri: ``s3://bucket/prefix/<name>``.
        role: names the mirror's scratch folder (``driver``, ``trial``, ``view``...).
        read_only: a mirror that never pushes (readers, parents of an extension).
    """

    def __init__(self, uri: BucketUri, role: str, *, read_only: bool = False):
        self.uri = uri
        self.bucket = Bucket(uri)
        # Named as the experiment, so the folder's name is the experiment's name everywhere.
        self._scratch = scratch_folder(uri, role)
        self.mirror = Mirror(self.bucket, self._scratch / uri.name, read_only=read_only)
        with _OPEN_LOCK:
            _OPEN[self.folder.resolve()] = self
        # A reader's copy (status, a launch's summary) lives as long as its process.
        atexit.register(shutil.rmtree, self._scratch, ignore_errors=True)

    @property
    def folder(self) -> Path:
        return self.mirror.local

    def pull_metadata(self) -> None:
        """``experiment.json``, ``plan.json`` and the study copy."""
        pull_metadata(self.mirror)

    def push(self, under: str = "", *, skip: tuple[str, ...] = ()) -> int:
        return self.mirror.push(under, skip=skip)

    def close(self) -> None:
        """Forget the mirror and delete its folder (everything in it is in the bucket)."""
        with _OPEN_LOCK:
            _OPEN.pop(self.folder.resolve(), None)
        shutil.rmtree(self._scratch, ignore_errors=True)


def experiment_in_bucket(root: BucketUri, name: str, *, must_exist: bool) -> BucketUri:
    """``root/name`` after checking the name and whether an experiment is there (as
    :func:`sweeps.experiment.experiment_dir` does for folders)."""
    uri = root.child(check_name(name))
    bucket = Bucket(uri)
    try:
        present = bucket.exists(EXPERIMENT.file)
    except Exception as error:
        raise BucketError(f"{uri}: cannot read it ({error})") from None
    if must_exist and not present:
        known = sorted(
            relative.split("/")[0]
            for relative in Bucket(root).listing()
            if relative.count("/") == 1 and relative.endswith(f"/{EXPERIMENT.file}")
        )
        listing = f"; experiments there: {', '.join(known)}" if known else ""
        raise ExperimentError(f"no experiment {name!r} in {root}{listing}")
    if not must_exist and present:
        raise ExperimentError(
            f"experiment {name!r} already exists in {root}: continue it with "
            f"`diffcom sweep resume {name}`, add trials with `diffcom sweep extend {name}`, "
            "or launch under another --name"
        )
    return uri


LAUNCH_FILE = "launch.json"


def claim_new_experiment(uri: BucketUri) -> None:
    """Claim ``uri`` for the experiment a launch (or extend) is about to push.

    :func:`experiment_in_bucket` checked that no experiment is there, but two launches of one name
    can both pass that check. The claim is a conditional create of :data:`LAUNCH_FILE` (who
    launched, when): of two launches racing for one name exactly one creates it and pushes its
    experiment; the other is refused here, before it has written anything to the bucket.

    Raises:
        ExperimentError: another launch claimed the name first.
    """
    bucket = Bucket(uri)
    record = {"host": socket.gethostname(), "pid": os.getpid(), "time": now()}
    if bucket.create(LAUNCH_FILE, json.dumps(record).encode()) is not None:
        return
    found = bucket.read(LAUNCH_FILE)
    try:
        other = json.loads(found[0]) if found else {}
        who = f" by {other['host']} (pid {other['pid']}) at {other['time']}"
    except (ValueError, KeyError, TypeError):
        who = ""
    raise ExperimentError(
        f"experiment {uri.name!r} in {uri} was launched meanwhile{who}; this launch wrote nothing "
        f"there. If no launch of that name is running and {uri}/{EXPERIMENT.file} is missing, a "
        f"launch died before pushing it: delete {uri}/{LAUNCH_FILE} and launch again"
    )


def find_experiment(root: Path | BucketUri, name: str) -> tuple[Path, str, RemoteExperiment | None]:
    """An existing experiment ``name`` under a storage root: its folder (for a bucket, a
    :func:`pull_view` copy), where it lives (the folder, or its ``s3://`` URI) and the copy
    (``None`` for a folder)."""
    if isinstance(root, BucketUri):
        view = pull_view(experiment_in_bucket(root, name, must_exist=True))
        return view.folder, str(view.uri), view
    folder = experiment_dir(root, name, must_exist=True)
    return folder, str(folder), None


def pull_view(uri: BucketUri, *, into: RemoteExperiment | None = None) -> RemoteExperiment:
    """A read-only local copy of an experiment for ``status``, ``watch`` and ``report``: every
    file but checkpoints and TensorBoard events; with ``into``, that copy brought up to date
    (changed files only)."""
    view = into or RemoteExperiment(uri, "view", read_only=True)
    pull_results(view.mirror)
    return view


def _mirror_at(folder: Path) -> RemoteExperiment | None:
    """This process's open mirror whose folder is ``folder``, if any."""
    with _OPEN_LOCK:
        return _OPEN.get(Path(folder).resolve())


def refresh_view(folder: Path) -> None:
    """Bring a :func:`pull_view` copy up to date; nothing for an ordinary folder."""
    remote = _mirror_at(folder)
    if remote is not None:
        pull_view(remote.uri, into=remote)


def refresh(folder: Path, under: str) -> None:
    """Bring ``folder/under`` up to date from the bucket when ``folder`` is a mirror (results,
    no checkpoints); nothing for an ordinary folder."""
    remote = _mirror_at(folder)
    if remote is not None:
        remote.mirror.pull(under, skip=HEAVY_PARTS)


def stage1_store_of(folder: Path, metadata: dict) -> Stage1Store | None:
    """The stage-1 store of a mirror folder (``None`` for an ordinary folder)."""
    remote = _mirror_at(folder)
    if remote is None:
        return None
    return BucketStage1Store(remote, metadata.get("parents", []))


class BucketStage1Store(Stage1Store):
    """:class:`~sweeps.stage1.Stage1Store` over a bucket: keys fetched on demand, a lease in
    place of the lock, one events file per trial attempt (concurrent trials never overwrite
    each other's lines). Parents of an extension (``s3://`` URIs, or folders) are read-only."""

    def __init__(self, remote: RemoteExperiment, parents: list[str]):
        self.remote = remote
        self.parents: dict[Path, Mirror] = {}
        roots = []
        for parent in parents:
            if is_bucket_uri(parent):
                mirror = _parent_mirror(BucketUri.parse(parent))
                self.parents[mirror.local / STAGE1_DIR] = mirror
                roots.append(mirror.local / STAGE1_DIR)
            else:
                roots.append(Path(parent) / STAGE1_DIR)
        super().__init__(remote.folder / STAGE1_DIR, tuple(roots))
        self.trial = "trial"
        self._attempt = secrets.token_hex(4)

    def _mirror_of(self, root: Path) -> Mirror | None:
        if root == self.root:
            return self.remote.mirror
        return self.parents.get(root)

    def _fetch(self, root: Path, key: str, *, run: bool) -> None:
        mirror = self._mirror_of(root)
        if mirror is None:
            return
        done = mirror.pull_file(f"{STAGE1_DIR}/{key}/done.json")
        if done or run:
            mirror.pull(f"{STAGE1_DIR}/{key}/{STAGE1_RUN}")

    @contextlib.contextmanager
    def _lock(self, key: str, *, enabled: bool) -> Iterator[None]:
        if not enabled:
            yield
            return
        lease = Lease(
            self.remote.bucket,
            f"{STAGE1_DIR}/{key}.lease",
            holder=self.trial,
            ttl=LEASE_TTL_SECONDS,
            poll=2.0,
        )
        with lease:
            if lease.took_over:
                print(
                    f"[{self.trial}] stage 1 {key}: took over the lease of "
                    f"{lease.took_over.get('holder', 'an unknown holder')}, which stopped renewing "
                    "it; resuming its run from the last checkpoint it pushed",
                    flush=True,
                )
            try:
                yield
            finally:
                # What was trained (the run, done.json, the events) is in the bucket before any
                # other trial can take the lease and look for it.
                self.remote.push(f"{STAGE1_DIR}/{key}")

    def _events_file(self, key: str, trial: str) -> Path:
        # One file per trial attempt: an attempt starts from a fresh mirror without the files
        # of earlier attempts, and must not replace their lines in the bucket.
        safe = trial.replace("/", "__")
        return self.root / key / "events" / f"{safe}.{self._attempt}.jsonl"

    def obtain(self, config, train_stage1, *, trial, is_main=True, share=lambda value: value):
        self.trial = trial
        found = super().obtain(config, train_stage1, trial=trial, is_main=is_main, share=share)
        if is_main:
            self.remote.push(f"{STAGE1_DIR}/{found.key}")  # a reuse event
        return found


_PARENTS: dict[str, Mirror] = {}


def _parent_mirror(uri: BucketUri) -> Mirror:
    """One read-only mirror per parent experiment in this process (pulled keys stay pulled)."""
    key = str(uri)
    if key not in _PARENTS:
        _PARENTS[key] = RemoteExperiment(uri, "parent", read_only=True).mirror
    return _PARENTS[key]


@dataclasses.dataclass
class RemoteTrial:
    """What a trial of a bucket experiment works with (see :func:`open_trial`).

    ``checkpoint_every``: checkpoints go up at every N-th epoch (the experiment's
    ``checkpoint_every``, see :func:`checkpoint_every_of`) and when a run ends; metrics and status
    at every epoch. A run resumed after a kill repeats at most N - 1 epochs.
    """

    remote: RemoteExperiment
    checkpoint_every: int = 1
    #: The last global epoch of the current run whose checkpoint was pushed (0: none yet).
    stored_through: int = 0

    @property
    def folder(self) -> Path:
        return self.remote.folder

    def pull_runs(self, names: list[str]) -> None:
        """The folders of the trial's runs, checkpoints included (a retry resumes from them)."""
        for name in names:
            self.remote.mirror.pull(f"{RUNS_DIR}/{name}")

    def sync(self, report: dict | None = None) -> int | None:
        """Push what changed at an epoch boundary (``report``: the epoch's report) or the end of
        a run (``report`` final, or ``None``): checkpoints only every ``checkpoint_every``
        epochs (over both stages), the rest always.

        Returns the last global epoch whose checkpoint is now in the bucket (``None``: all of
        them), what :data:`sweeps.trial.Report` returns: trackers log epochs up to it.
        """
        epoch = (report or {}).get("global_epoch")
        final = report is None or report.get("final") is not False
        if final or not isinstance(epoch, int) or epoch % self.checkpoint_every == 0:
            self.remote.push()
            # After a run's end the next run of the trial starts again at global epoch 1.
            self.stored_through = epoch if isinstance(epoch, int) and not final else 0
            return None if final or not isinstance(epoch, int) else epoch
        self.remote.push(skip=(f"{CHECKPOINT_DIR}/",))  # no checkpoints this epoch
        return self.stored_through


def checkpoint_every_of(metadata: dict) -> int:
    """``bucket.checkpoint_every`` of an ``experiment.json`` (1 when absent or malformed)."""
    bucket = metadata.get("bucket")
    every = bucket.get("checkpoint_every") if isinstance(bucket, dict) else None
    return every if isinstance(every, int) and not isinstance(every, bool) and every >= 1 else 1


@contextlib.contextmanager
def open_trial(uri: str) -> Iterator[RemoteTrial]:
    """A trial's mirror of the experiment at ``uri``: metadata pulled, ``status.json`` files
    pushed every :data:`STATUS_PUSH_SECONDS` while it runs, everything changed pushed when it
    ends (an error included), the mirror deleted after."""
    remote = RemoteExperiment(BucketUri.parse(uri), "trial")
    stop = threading.Event()

    def push_statuses() -> None:
        while not stop.wait(STATUS_PUSH_SECONDS):
            with contextlib.suppress(Exception):  # the next beat, or the final push, retries
                remote.mirror.push(names=(STATUS.file,))

    beat = threading.Thread(target=push_statuses, name="status-push", daemon=True)
    try:
        remote.pull_metadata()
        if not (remote.folder / EXPERIMENT.file).is_file():
            raise ExperimentError(f"{uri}: no {EXPERIMENT.file} in the bucket")
        beat.start()
        metadata = json.loads((remote.folder / EXPERIMENT.file).read_text())
        yield RemoteTrial(remote, checkpoint_every_of(metadata))
    finally:
        stop.set()
        if beat.is_alive():
            beat.join()
        try:
            remote.push()
        finally:
            remote.close()
