"""Fused trials: stage-2 runs of one stage 1 and one denoiser shape trained as one pack.

A study's ``pack: N`` (default :data:`DEFAULT_PACK`, or :data:`DEFAULT_GPU_PACK` when every trial
gets a whole GPU) groups the runs of an expanded study (ablation, sensitivity, grid search) whose
configs share a :func:`core.train.fused.pack_key` — the stage-1 config, the denoiser's shape and
the stage-2 queries — into packs of up to N members. A
pack is one Ray Tune trial that obtains the shared stage 1 once and trains every member's stage 2
in one :func:`core.train.fused.train_fused` loop. Everything users read stays per run: each member
keeps its own run folder (``config.json``, ``metrics.jsonl``, checkpoints, ``results.json``,
``ranks_*.npz``), its own ``trial.json`` and its own ``status.json``, which says it trained fused
and with whom (``fused``), so ``status``, ``watch``, reports and analysis list every member as its
own trial, and the experiment's trackers (:mod:`sweeps.tracking`) see each member as its own run.
A member that is done is finished at once (its results written, its status ``finished``) while
the others train on. A killed pack resumes each member from its own checkpoint; a finished member
is not trained again; a member whose loss turned non-finite fails alone (its ``status.json`` says
so) and the pack fails after the others have finished, so the scheduler's retry trains nothing
twice.

Runs a pack cannot hold (a baseline, no diffusion stage, a fine-tuned extractor, the BCE control,
mixed precision) and runs whose key no other run shares stay trials of their own. Searches that
draw points one at a time (Optuna, random) and schedulers that stop single trials (ASHA) keep one
run per trial: :mod:`sweeps.study` refuses ``pack`` above 1 for them.
"""

from __future__ import annotations

import math
import os
import socket
import time
import traceback
from pathlib import Path

from core.config import ExperimentConfig
from core.train.fused import pack_key, train_fused
from core.train.trainer import NonFiniteLossError, train
from runstore import METRICS, RESULTS, RUNS_DIR, STATUS, checkpoint_path
from sweeps.experiment import now, read_json_object, write_json
from sweeps.stage1 import Stage1Store, stage1_key
from sweeps.study import DEFAULT_GPU_PACK, DEFAULT_PACK
from sweeps.tracking import RunTracker
from sweeps.trial import (
    NON_FINITE,
    Report,
    RunSpec,
    TrialFailed,
    _epoch_report,
    _fail,
    _mean_of,
    _open_tracker,
    _progress,
    _record_epoch,
    _write_provenance,
)

__all__ = ["DEFAULT_GPU_PACK", "DEFAULT_PACK", "PACK_PREFIX", "plan_packs", "run_pack"]

#: Pack trials are named ``pack/<n>``; no study trial name starts so.
PACK_PREFIX = "pack/"

#: Share of the memory available when a pack starts that the packs of one node may use
#: together; each pack's share is this over the trials the node runs at once, and a pack above it
#: trains in consecutive groups that fit (:func:`core.train.fused.pack_groups`).
MEMORY_SHARE = 0.8


def plan_packs(
    configs: dict[str, ExperimentConfig], size: int, slots: int = 1
) -> dict[str, list[str]]:
    """Packs of the runs in ``configs`` (name → config, in the order trials should start).

    Runs with equal :func:`~core.train.fused.pack_key` are dealt, in order, into as few packs of
    up to ``size`` members as they fill (run ``i`` of a key into pack ``i mod count``, so sizes
    differ by one at most); a key with a single run, and a run that cannot be fused, form no
    pack. A pack trains on one trial's resources, so with ``slots``
    trials at once the size is also capped at ``ceil(fusable runs / slots)`` (at least 2): 16
    runs on two slots make two packs of 8, not one of 16 beside an idle slot. Returns
    ``pack/<n>`` → member names, numbered in the order of each pack's first member.
    """
    groups: dict[str, list[str]] = {}
    for name, config in configs.items():
        key = pack_key(config)
        if key is not None:
            groups.setdefault(key, []).append(name)
    fusable = sum(len(members) for members in groups.values())
    size = min(size, max(2, math.ceil(fusable / max(slots, 1))))
    if size <= 1:
        return {}
    chunks = []
    for members in groups.values():
        # Dealt out in turn, so each pack gets a share of every value a study varies in order
        # (K, say, whose evaluation cost grows with it) and packs of one key end together.
        count = math.ceil(len(members) / size)
        chunks += [members[index::count] for index in range(count)]
    packed = [chunk for chunk in chunks if len(chunk) > 1]
    order = {name: index for index, name in enumerate(configs)}
    packed.sort(key=lambda chunk: order[chunk[0]])
    width = len(str(len(packed)))
    return {f"{PACK_PREFIX}{index:0{width}d}": chunk for index, chunk in enumerate(packed)}


def run_pack(
    experiment: Path,
    pack: str,
    runs: list[RunSpec],
    report: Report,
    *,
    node: str | None = None,
    memory_limit_mib: float | None = None,
) -> dict:
    """Train the members ``runs`` of ``pack`` as one fused stage 2 over their shared stage 1.

    ``report`` gets every member's epoch records (with ``run`` naming the member) and, at the end,
    the mean of the finished members' results. ``memory_limit_mib`` bounds what the members add
    at once (default: :data:`MEMORY_SHARE` of the memory available now, over the trials this
    node runs at once).

    Raises:
        TrialFailed: a member failed; the message names each, and every other member finished.
    """
    experiment = Path(experiment)
    metadata = read_json_object(experiment / "experiment.json")
    members = [spec.name for spec in runs]
    finished: dict[str, dict] = {}
    failed: dict[str, str] = {}
    training: list[tuple[RunSpec, Path, dict, RunTracker]] = []
    for spec in runs:
        run_dir = experiment / RUNS_DIR / spec.name
        status_file = run_dir / STATUS.file
        status = read_json_object(status_file) if status_file.is_file() else {"attempts": []}
        if status.get("state") == "finished" and (run_dir / RESULTS.file).is_file():
            finished[spec.name] = read_json_object(run_dir / RESULTS.file)
            continue
        if status.get("failure") == NON_FINITE:
            failed[spec.name] = f"{status['error']} (not retried: it would repeat)"
            continue
        status.update(
            state="running",
            seed=spec.config.seed,
            host=socket.gethostname(),
            pid=os.getpid(),
            error=None,
            failure=None,
            fused={"pack": pack, "members": members},
        )
        resumed_from = _progress(checkpoint_path(run_dir))
        status["attempts"].append(
            {"started": now(), "host": status["host"], "node": node, "resumed_from": resumed_from}
        )
        write_json(status_file, status)
        _write_provenance(run_dir, pack, spec, metadata)
        tracker = _open_tracker(experiment, metadata, run_dir, pack, spec, status, resumed_from)
        training.append((spec, run_dir, status, tracker))

    if training:
        _train(experiment, pack, training, report, metadata, memory_limit_mib, finished, failed)
    if failed:
        shown = "; ".join(f"{name}: {reason}" for name, reason in failed.items())
        raise TrialFailed(f"{pack}: {len(failed)} of {len(runs)} members failed: {shown}")
    summary = _mean_of(list(finished.values()))
    return summary | {"final": True, "runs_finished": len(finished), "runs": len(runs)}


def _train(experiment, pack, training, report, metadata, memory_limit_mib, finished, failed):
    """Obtain the shared stage 1 and train the members in ``training``; fills ``finished`` and
    ``failed`` (member name → results or reason)."""
    specs = [spec for spec, _, _, _ in training]
    first = specs[0]
    key = stage1_key(first.config)
    for _, run_dir, status, _ in training:
        status["stage1"] = {"key": key, "trial": pack, "epochs": first.config.train.stage1_epochs}
        write_json(run_dir / STATUS.file, status)

    def on_shared_stage1_epoch(record: dict) -> None:
        for spec, _, _, tracker in training:
            tracker.queue(record)
            tracker.log_stored(report(_epoch_report(spec, record, stage1_shared=True)))

    store = Stage1Store.of_experiment(experiment, metadata)
    started = time.perf_counter()
    try:
        stage1 = store.obtain(
            first.config,
            lambda config, folder: train(
                config, folder, progress=False, callback=on_shared_stage1_epoch
            ),
            trial=pack,
        )
    except (KeyboardInterrupt, SystemExit):
        _stop_all(training)
        raise
    except Exception as error:
        reason = f"stage 1: {type(error).__name__}: {error}"
        for spec, run_dir, status, tracker in training:
            _fail(status, run_dir / STATUS.file, reason, type(error).__name__, True)
            tracker.fail(reason)
            failed[spec.name] = reason
        return
    for _, run_dir, status, tracker in training:
        status["stage1"] = {
            "key": stage1.key,
            "reused": not stage1.trained_here,
            "checkpoint": str(stage1.checkpoint),
            "train_seconds": stage1.train_seconds,
        }
        write_json(run_dir / STATUS.file, status)
        if not stage1.trained_here:  # its epochs start the member's tracked curves
            tracker.log_metrics_file(stage1.checkpoint.parent.parent / METRICS.file)

    def on_member_epoch(index: int, record: dict) -> None:
        spec, run_dir, status, tracker = training[index]
        _record_epoch(run_dir, status, record)
        tracker.queue(record)
        tracker.log_stored(report(_epoch_report(spec, record)))

    def on_member_done(index: int, outcome) -> None:
        spec, run_dir, status, tracker = training[index]
        if isinstance(outcome, BaseException):
            failure = (
                NON_FINITE if isinstance(outcome, NonFiniteLossError) else type(outcome).__name__
            )
            _fail(status, run_dir / STATUS.file, str(outcome), failure, True)
            tracker.fail(str(outcome))
            failed[spec.name] = str(outcome)
            return
        tracker.finish(outcome)
        # Wall time of this attempt until the member was done, stage 1 (or waiting for it)
        # included, as a lone trial's.
        wall = round(time.perf_counter() - started, 2)
        status.update(state="finished", finished=now(), wall_seconds=wall)
        write_json(run_dir / STATUS.file, status)
        finished[spec.name] = outcome
        report(
            {
                **_mean_of([outcome]),
                "final": True,
                "run": spec.name,
                "global_epoch": spec.config.train.stage1_epochs + spec.config.train.stage2_epochs,
            }
        )

    if memory_limit_mib is None:
        memory_limit_mib = _memory_limit_mib(metadata.get("resources", {}))
    try:
        train_fused(
            [spec.config for spec in specs],
            [run_dir for _, run_dir, _, _ in training],
            stage1.checkpoint,
            callback=on_member_epoch,
            memory_limit_mib=memory_limit_mib,
            done_callback=on_member_done,
        )
    except (KeyboardInterrupt, SystemExit):
        _stop_all([entry for entry in training if entry[0].name not in finished])
        raise
    except Exception as error:  # the pack as a whole (set-up, a config error, a report)
        reason = f"{type(error).__name__}: {error}"
        details = traceback.format_exc()
        for spec, run_dir, status, tracker in training:
            if spec.name not in finished and spec.name not in failed:
                _fail(status, run_dir / STATUS.file, reason, type(error).__name__, True, details)
                tracker.fail(reason)
                failed[spec.name] = reason


def _memory_limit_mib(resources: dict) -> float:
    """What a pack's members may add: :data:`MEMORY_SHARE` of the memory available now over the
    trials that share it. On a GPU (where the pack trains when one is visible) that is the
    device's free memory, shared by the trials on the device (``resources.gpus`` each); on a CPU
    the host's, shared by the trials its cores hold (``resources.cpus`` each)."""
    import torch

    if torch.cuda.is_available():
        free, _ = torch.cuda.mem_get_info()
        share = resources.get("gpus") or 1
        concurrent = max(1, int(1 // share)) if share < 1 else 1
        return MEMORY_SHARE * free / 2**20 / concurrent
    import psutil

    cpus = resources.get("cpus") or 1
    concurrent = max(1, int((os.cpu_count() or 1) // cpus))
    return MEMORY_SHARE * psutil.virtual_memory().available / 2**20 / concurrent


def _stop_all(training) -> None:
    """The scheduler stopped the pack or someone pressed Ctrl-C: its members are not finished."""
    for _, run_dir, status, tracker in training:
        status.update(state="stopped", stopped=now())
        write_json(run_dir / STATUS.file, status)
        tracker.stop()
