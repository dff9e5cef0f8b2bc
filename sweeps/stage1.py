"""Stage-1 checkpoints shared by the trials of an experiment (no Ray here).

Stage 1 trains the feature extractor alone; the diffusion steps, denoiser width and depth, the
loss weights and every other stage-2 knob do not change it. Trials whose stage-1 configuration
(and seed) is identical therefore share one stage-1 run, trained once under
``<experiment>/stage1/<key>/`` where ``key`` hashes exactly the config values stage 1 depends on::

    stage1/<key>.lock        an exclusive lock (flock) held while the key is looked up or trained
    stage1/<key>/run/        the stage-1 run (config.json, metrics.jsonl, checkpoints/last.pt, ...)
    stage1/<key>/done.json   written last: the checkpoint to reuse and what training it cost
    stage1/<key>/events.jsonl  one line per trial that trained or reused it

In a bucket (:mod:`sweeps.remote`) the same layout holds, with a lease object ``stage1/<key>.lease``
in place of the lock and one events file per trial attempt under ``stage1/<key>/events/``.

Two trials asking for the same key at once are safe: the second waits on the lock and then
reuses. A trial killed while training leaves no ``done.json`` and releases the lock (the kernel
drops it with the process); the next trial to ask resumes that partial run from its checkpoint.
``flock`` works across the nodes of an NFS (v4) mount, which is what a multi-node experiment needs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import runstore as store
from core.config import ExperimentConfig, stage1_key_values, stage1_relevant
from runstore import DONE, EVENTS, STAGE1_DIR, STAGE1_RUN, checkpoint_path
from sweeps.experiment import event_files, now, read_json_object, write_json

__all__ = [
    "STAGE1_DIR",
    "Stage1Checkpoint",
    "Stage1Store",
    "interleave_by_stage1",
    "stage1_key",
    "stage1_relevant",
]


def stage1_key(config: ExperimentConfig) -> str:
    """A short content hash of :func:`core.config.stage1_key_values` (:func:`stage1_relevant`
    less the later-added fields at their defaults)."""
    text = json.dumps(stage1_key_values(config), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def stage1_only(config: ExperimentConfig) -> ExperimentConfig:
    """The config of the shared stage-1 run: the trial's config without a stage 2."""
    return dataclasses.replace(config, train=dataclasses.replace(config.train, stage2_epochs=0))


def interleave_by_stage1(configs: dict[str, ExperimentConfig]) -> list[str]:
    """Trial names in an order that starts different stage-1 runs first.

    Trials run in submission order, as many at once as the resources allow. Submitted in study
    order (every cell of seed 0, then of seed 1, ...), the first concurrent trials all need the
    same stage-1 run: one trains it while the others wait on its lock, idle. Taking one trial of
    each stage-1 key in turn (round robin, first appearance first, study order within a key)
    lets the first wave train distinct stage-1 runs in parallel and every later trial reuse one.
    """
    groups: dict[str, list[str]] = {}
    for name, config in configs.items():
        groups.setdefault(stage1_key(config), []).append(name)
    order = []
    for position in range(max((len(g) for g in groups.values()), default=0)):
        order += [group[position] for group in groups.values() if position < len(group)]
    return order


@dataclass(frozen=True)
class Stage1Checkpoint:
    """A stage-1 checkpoint a trial starts its stage 2 from.

    Attributes:
        key: the content key.
        checkpoint: the ``last.pt`` holding the best stage-1 weights.
        trained_here: whether this call trained it (``False``: reused).
        train_seconds: what training it cost, whoever trained it.
    """

    key: str
    checkpoint: Path
    trained_here: bool
    train_seconds: float


class Stage1Store:
    """Find or train the stage-1 run of a config, once per key across all trials.

    The folders are local; a store whose runs live elsewhere (a bucket) overrides
    :meth:`_fetch` (bring a key's files here), :meth:`_lock` and :meth:`_events_file`.

    Args:
        root: ``<experiment>/stage1``.
        read_only_roots: stores of parent experiments (``diffcom sweep extend``), searched for a
            finished key but never written.
    """

    def __init__(self, root: Path, read_only_roots: tuple[Path, ...] = ()):
        self.root = Path(root)
        self.read_only_roots = tuple(Path(r) for r in read_only_roots)

    @classmethod
    def of_experiment(cls, experiment: Path, metadata: dict) -> Stage1Store:
        """The store of an experiment folder, its parents' stores (``metadata["parents"]``, from
        ``experiment.json``) read-only; the bucket's (:mod:`sweeps.remote`) when the folder is a
        mirror of an experiment in a bucket."""
        from sweeps.remote import stage1_store_of

        if (remote := stage1_store_of(experiment, metadata)) is not None:
            return remote
        parents = tuple(Path(p) / STAGE1_DIR for p in metadata.get("parents", []))
        return cls(Path(experiment) / STAGE1_DIR, parents)

    def run_folder(self, key: str) -> Path | None:
        """The folder of the finished stage-1 run of ``key`` in this store or a parent's."""
        for root in (self.root, *self.read_only_roots):
            if self._finished(root, key) is not None:
                return root / key / STAGE1_RUN
        return None

    def obtain(
        self,
        config: ExperimentConfig,
        train_stage1: Callable[[ExperimentConfig, Path], dict],
        *,
        trial: str,
        is_main: bool = True,
        share: Callable[[object], object] = lambda value: value,
    ) -> Stage1Checkpoint:
        """The stage-1 checkpoint of ``config``, training it with ``train_stage1`` if needed.

        Args:
            config: the trial's config (its stage-2 settings are ignored).
            train_stage1: ``(stage-1 config, run directory) -> results``; resumes from the run
                directory's checkpoint when one is there.
            trial: the asking trial's name, logged in ``events.jsonl``.
            is_main: in a multi-process trial, only the main process locks and writes; all
                processes train together.
            share: broadcasts the main process's value to every process (identity for one).
        """
        key = stage1_key(config)

        def finished_in(root: Path) -> Stage1Checkpoint | None:
            found = share(self._finished(root, key) if is_main else None)
            if found is None:
                return None
            if is_main:
                self._event(key, "reused", trial, source=str(root))
            return Stage1Checkpoint(key, Path(found["checkpoint"]), False, found["seconds"])

        for root in (self.root, *self.read_only_roots):
            if (reused := finished_in(root)) is not None:
                return reused
        with self._lock(key, enabled=is_main):
            # Another trial may have trained it while this one waited for the lock.
            if (reused := finished_in(self.root)) is not None:
                return reused
            if is_main:
                self._fetch(self.root, key, run=True)  # a partial run to resume, if any
            run_dir = self.root / key / STAGE1_RUN
            if is_main:
                self._event(key, "training", trial)
            started = time.perf_counter()
            results = train_stage1(stage1_only(config), run_dir)
            seconds = float(results.get("timings", {}).get("train_seconds", 0.0))
            checkpoint = checkpoint_path(run_dir)
            if is_main:
                write_json(
                    self.root / key / DONE.file,
                    {
                        "checkpoint": str(checkpoint),
                        "seconds": seconds,
                        "wall_seconds": round(time.perf_counter() - started, 2),
                        "trained_by": trial,
                        "finished": now(),
                        "stage1_config": stage1_relevant(config),
                    },
                )
                self._event(key, "trained", trial)
            return Stage1Checkpoint(key, checkpoint, True, seconds)

    def events(self) -> list[dict]:
        """Every ``trained``/``reused``/``training`` event of every key, oldest first."""
        events = []
        keys = [folder for folder in sorted(self.root.glob("*")) if folder.is_dir()]
        for path in [file for key in keys for file in event_files(key)]:
            events += [
                line.value
                for line in store.read_jsonl(path, EVENTS).lines
                if isinstance(line.value, dict)
            ]
        return sorted(events, key=lambda event: event["precise_time"])

    def _finished(self, root: Path, key: str) -> dict | None:
        self._fetch(root, key, run=False)
        done = root / key / DONE.file
        if not done.is_file():
            return None
        found = read_json_object(done)
        # The store may have been moved or mounted elsewhere since: trust the layout.
        found["checkpoint"] = str(checkpoint_path(root / key / STAGE1_RUN))
        return found if Path(found["checkpoint"]).is_file() else None

    def _fetch(self, root: Path, key: str, *, run: bool) -> None:
        """Bring a key's ``done.json`` (and its run once done, or with ``run``) to ``root``:
        nothing to do in a folder every trial sees."""

    @contextlib.contextmanager
    def _lock(self, key: str, *, enabled: bool) -> Iterator[None]:
        if not enabled:
            yield
            return
        self.root.mkdir(parents=True, exist_ok=True)
        with (self.root / f"{key}.lock").open("a") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def _event(self, key: str, event: str, trial: str, **extra) -> None:
        record = {"time": now(), "precise_time": time.time(), "event": event, "trial": trial}
        store.append_jsonl(self._events_file(key, trial), {**record, **extra})

    def _events_file(self, key: str, trial: str) -> Path:
        return self.root / key / EVENTS.file
