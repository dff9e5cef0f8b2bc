"""The one place Ray is used: studies become Ray Tune experiments; trials run :func:`run_trial`.

``launch`` validates the study, writes the experiment folder (see :mod:`sweeps.experiment`) and
runs a ``Tuner``; ``resume`` restores it (finished trials stay finished, unfinished ones continue
from their checkpoints, errored ones are retried, the searcher state and the concurrency limit are
restored from Tune's own state); ``extend`` launches a new experiment linked to an old one.

Trials resume from their run folders (``runs/<trial>/checkpoints/last.pt``, written every epoch on
the experiment's shared storage), not from copies kept by Tune: a copy per epoch costs a write of
the whole checkpoint, and a driver killed between Tune's checkpoint rotation and its state snapshot
left a state pointing at a deleted copy, which Tune then refused to restore.

Ray's API has changed shape several times; everything that touches it is in this module, written
against Ray 2.6x (``tune.report``/``tune.get_checkpoint``, Train V2's ``TorchTrainer`` inside a
Tune function for multi-worker trials).
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import os
import shlex
import sys
import uuid
from pathlib import Path
from typing import Any

from core.config import config_from_dict, config_to_dict
from runstore import POINT, RESULTS, RUNS_DIR, STATUS, STUDY_COPY, atomic_write_bytes
from runstore.bucket import (
    AZURE_SCHEME,
    GCS_SCHEME,
    AzureAccount,
    Bucket,
    BucketUri,
    is_bucket_uri,
)
from runstore.filesystem import Coordinator, FilesystemBucket, use_coordinators
from sweeps.experiment import (
    EXPERIMENT_FILE,
    PLAN_FILE,
    ExperimentError,
    check_name,
    code_revision,
    experiment_dir,
    now,
    optuna_storage_url,
    package_versions,
    read_experiment,
    read_json_object,
    resolve_storage,
    runs_alive_on_this_host,
    write_json,
)
from sweeps.pack import PACK_PREFIX, plan_packs, run_pack
from sweeps.remote import (
    RemoteExperiment,
    checkpoint_every_of,
    claim_new_experiment,
    experiment_in_bucket,
    find_experiment,
    open_trial,
    pull_view,
)
from sweeps.stage1 import interleave_by_stage1
from sweeps.study import (
    Choice,
    LogUniform,
    RandInt,
    Study,
    StudyError,
    Tracking,
    Uniform,
    expand_trials,
    load_study,
    point_config,
    study_config,
    trial_config,
)
from sweeps.tracking import (
    mlflow_uri_problem,
    reopen_parent_run,
    set_parent_run_state,
    start_tracking,
)
from sweeps.trial import RunSpec, run_trial

__all__ = ["extend", "launch", "resume"]

#: Seconds between Ray Tune's uploads of its experiment state to a bucket.
BUCKET_SYNC_SECONDS = 15

#: Retries of a failed trial (a lost node, a killed worker) from its last checkpoint.
MAX_FAILURES = 2

#: The Ray namespace of the stores' coordinators: one per store for every driver and trial on a
#: cluster, whichever job started it.
COORDINATOR_NAMESPACE = "diffcom"


# ---------------------------------------------------------------------------------- public API


def launch(
    study_path: str | Path,
    *,
    overrides: tuple[str, ...] = (),
    name: str | None = None,
    storage: str | Path | None = None,
    address: str | None = None,
    optuna_storage: str | None = None,
    mlflow: str | None = None,
    tensorboard: bool | None = None,
    checkpoint_every: int | None = None,
    verbose: int = 1,
) -> Path:
    """Run a study as a new experiment ``<storage>/<name>``; returns the experiment folder.

    Args:
        study_path: the study YAML.
        overrides: ``KEY=VALUE`` texts (``--set``) merged into the study's ``overrides`` (see
            :func:`~sweeps.study.load_study`); the experiment records them and ``extend``
            re-applies them.
        name: the experiment name (default: the study's name); an existing one is refused.
        storage: a path every node sees, or ``file://`` URI (default :func:`default_storage`).
        address: a running Ray cluster to join; ``None`` starts a local Ray on this machine.
        optuna_storage: where an Optuna search keeps its Optuna study (named as the experiment):
            an RDB URL, default ``sqlite:///<experiment>/optuna.db`` (see
            :func:`~sweeps.experiment.optuna_storage_url`); refused for other studies.
        mlflow: an MLflow tracking URI for every run (:mod:`sweeps.tracking`), in place of the
            study's ``tracking.mlflow``; a malformed one is refused here.
        tensorboard: TensorBoard event files in every run, in place of the study's
            ``tracking.tensorboard`` (``None``: as the study says).
        checkpoint_every: in a bucket, upload each run's checkpoint every N epochs (default 1;
            metrics and status go up every epoch); refused for a folder.
        verbose: Tune's console verbosity (0-3).
    """
    study = load_study(study_path, overrides)  # every check before Ray starts
    if mlflow is not None and (problem := mlflow_uri_problem(mlflow)):
        raise ExperimentError(f"--mlflow: {problem}")
    tracking = study.tracking
    if mlflow is not None:
        tracking = dataclasses.replace(tracking, mlflow=mlflow)
    if tensorboard is not None:
        tracking = dataclasses.replace(tracking, tensorboard=tensorboard)
    study = dataclasses.replace(study, tracking=tracking)
    if optuna_storage is not None:
        if not _uses_optuna(study):
            what = f"{study.search.algorithm} search" if study.search else f"{study.kind} study"
            article = "an" if what[0] in "aeiou" else "a"
            raise ExperimentError(
                f"--optuna-storage: {study.path} is not an optuna-tpe search ({article} {what}); "
                "only such a search has an Optuna study"
            )
        optuna_storage_url(Path("."), optuna_storage)  # a malformed URL, refused here
    root = resolve_storage(storage)
    if isinstance(root, BucketUri):
        _check_bucket_study(root, study, optuna_storage)
    if checkpoint_every is not None and (
        not isinstance(root, BucketUri)
        or isinstance(checkpoint_every, bool)
        or checkpoint_every < 1
    ):
        problem = (
            "an integer >= 1"
            if isinstance(root, BucketUri)
            else "an s3://, gs:// or az:// --storage"
        )
        raise ExperimentError(
            f"--checkpoint-every {checkpoint_every}: needs {problem} (runs in a folder keep every "
            "epoch's checkpoint where they are; only uploads to a bucket are thinned)"
        )
    return _launch(
        study,
        name,
        root,
        address,
        checkpoint_every=checkpoint_every,
        optuna_storage=optuna_storage,
        verbose=verbose,
    )


def _check_bucket_study(root: BucketUri, study: Study, optuna_storage: str | None) -> None:
    """Refuse, before Ray starts, a bucket that cannot be used and what a bucket cannot hold."""
    Bucket(root).check()
    if study.resources.workers > 1:
        raise ExperimentError(
            f"--storage {root}: trials with workers > 1 ({study.path}: resources.workers = "
            f"{study.resources.workers}) share their run folder between processes, which needs "
            "a folder every node mounts; use such a folder, or workers: 1"
        )
    if _uses_optuna(study) and optuna_storage is None:
        raise ExperimentError(
            f"--storage {root}: an Optuna search keeps its Optuna study in a database; its "
            "default, a SQLite file in the experiment folder, cannot live in a bucket: give "
            "--optuna-storage URL (e.g. postgresql://user@host/db, or sqlite:////abs/path.db on "
            "the machine that runs the driver)"
        )


def _uses_optuna(study: Study) -> bool:
    return study.kind == "search" and study.search.algorithm == "optuna-tpe"


def _launch(
    study: Study,
    name: str | None,
    storage_root: Path | BucketUri,
    address: str | None,
    *,
    parents: tuple[Path | str, ...] = (),
    history: list[tuple[dict, float]] = (),
    extension: dict | None = None,
    optuna_storage: str | None = None,
    checkpoint_every: int | None = None,
    verbose: int = 1,
) -> Path:
    remote = None
    if isinstance(storage_root, BucketUri):
        # The driver writes the experiment's own files in a mirror and pushes them; trials and
        # Ray Tune's state go to the bucket (sweeps.remote).
        uri = experiment_in_bucket(storage_root, name or study.name, must_exist=False)
        remote = RemoteExperiment(uri, "driver")
        folder, location = remote.folder, str(uri)
    else:
        folder = experiment_dir(storage_root, check_name(name or study.name), must_exist=False)
        location = str(folder)
    optuna_url = optuna_storage_url(folder, optuna_storage) if _uses_optuna(study) else None
    if optuna_storage is not None:
        _check_new_optuna_study(optuna_url, check_name(name or study.name))
    _start_ray(address)
    if remote is None:
        _check_storage_visible(storage_root)

    folder.mkdir(parents=True, exist_ok=remote is not None)
    header = f"# extended from {parents[-1]}: {extension}\n" if extension else ""
    if study.launch_overrides:
        sets = " ".join(f"--set {shlex.quote(text)}" for text in study.launch_overrides)
        header += f"# launched with {sets} (merged into overrides below)\n"
    atomic_write_bytes(folder / STUDY_COPY, (header + study.path.read_text()).encode())
    plan = _plan(study, _concurrency(study.resources))
    write_json(folder / PLAN_FILE, plan)
    write_json(
        folder / EXPERIMENT_FILE,
        {
            "name": check_name(name or study.name),
            "kind": study.kind,
            "description": study.description,
            "study_file": str(study.path),
            "study_sha256": hashlib.sha256(study.path.read_bytes()).hexdigest(),
            "launch_overrides": list(study.launch_overrides),
            "extension": extension,
            "metric": study.metric,
            "mode": study.mode,
            "seeds": list(study.seeds),
            "resources": vars(study.resources),
            "search": _describe_search(study),
            "parents": [str(p) for p in parents],
            "created": now(),
            "address": address,
            "storage": location,
            **({"bucket": {"checkpoint_every": checkpoint_every or 1}} if remote else {}),
            "code": code_revision(),
            "packages": package_versions(),
            "cluster_resources": _cluster_resources(),
            **({"optuna_storage": optuna_url} if optuna_url else {}),
            "tracking": start_tracking(
                folder,
                study=study.name,
                mlflow=study.tracking.mlflow,
                tensorboard=study.tracking.tensorboard,
                tags=_parent_run_tags(folder, location, study, parents),
            ),
        },
    )
    if remote is not None:
        claim_new_experiment(remote.uri)
        remote.push()
    tuner = _tuner(study, folder, plan, list(history), verbose, optuna_url, location)
    try:
        _fit(tuner)
    finally:
        if remote is not None:
            remote.close()
    if remote is not None:
        folder = pull_view(remote.uri).folder
    set_parent_run_state(read_experiment(folder), "FINISHED")
    return folder


def _parent_run_tags(
    folder: Path, location: str, study: Study, parents: tuple[Path | str, ...]
) -> dict[str, str]:
    """The tags of an experiment's MLflow parent run (:func:`~sweeps.tracking.start_tracking`)."""
    revision = code_revision()
    tags = {
        "diffcom.experiment": folder.name,
        "diffcom.kind": study.kind,
        "diffcom.folder": location,
        "diffcom.study_file": str(study.path),
        "mlflow.source.git.commit": revision["revision"],
    }
    if parents:
        tags["diffcom.extends"] = str(parents[-1])
    return tags


def _plan(study: Study, slots: int = 1) -> dict[str, Any]:
    """What trials run on (``plan.json``): every trial's full config, or a search's base config.

    Trials, ``resume`` included, build their configs from this plan, never from the study file.
    Tune starts trials in the order of ``trials``: an ablation's baselines come last (a ``match``
    baseline waits for its reference run, which must not wait behind it for a free slot);
    ``matches`` names each such baseline's reference run. ``packs`` (with ``pack`` above 1) names
    the runs trained together as one fused Tune trial (:mod:`sweeps.pack`; ``slots``, the trials
    the cluster runs at once, caps their size), ``units`` the Tune trials in start order: each
    pack where its first member would start, every other run alone.
    """
    if study.kind == "search" and study.search.algorithm != "grid":
        return {
            "base": config_to_dict(study_config(study)),
            "space": [key for key, _ in study.search.space],
            "seeds": list(study.seeds),
        }
    trials = expand_trials(study)
    configs = {t.name: trial_config(study, t) for t in trials}
    order = interleave_by_stage1({t.name: configs[t.name] for t in trials if not t.baseline})
    order += [t.name for t in trials if t.baseline]
    plan: dict[str, Any] = {"trials": {name: config_to_dict(configs[name]) for name in order}}
    matches = {t.name: t.match_to for t in trials if t.match_to}
    if matches:
        plan["matches"] = matches
    packs = plan_packs({name: configs[name] for name in order}, study.pack, slots)
    if packs:
        plan["packs"] = packs
        member_of = {member: pack for pack, members in packs.items() for member in members}
        plan["units"] = list(dict.fromkeys(member_of.get(name, name) for name in order))
    return plan


def resume(
    name: str,
    *,
    storage: str | Path | None = None,
    address: str | None = None,
) -> Path:
    """Continue an interrupted experiment from Tune's saved state; returns its folder.

    Tune's console verbosity comes back with the rest of the saved run settings. Trials read their
    configs from the experiment's ``plan.json``, so launch overrides (``--set``) hold as launched.
    """
    root = resolve_storage(storage)
    if isinstance(root, BucketUri):
        Bucket(root).check()
    folder, location, remote = find_experiment(root, name)
    metadata = read_experiment(folder, required=("resources",))
    alive = runs_alive_on_this_host(folder)
    if alive:
        shown = ", ".join(f"{run} (pid {pid})" for run, pid in alive[:3])
        more = f" and {len(alive) - 3} more" if len(alive) > 3 else ""
        raise ExperimentError(
            f"{location}: still being trained by processes of this host: {shown}{more} (workers "
            "of a driver that was killed keep running); resuming now would train them twice in "
            "the same folders: wait for them to end, or stop them (kill PID), then resume"
        )

    from ray import tune

    tune_path, tune_filesystem = _tune_storage(location)
    if not tune.Tuner.can_restore(tune_path, storage_filesystem=tune_filesystem):
        raise ExperimentError(
            f"{location}: Ray Tune never saved its state here (the launch stopped before the "
            "first trial started); launch the study again under a new --name"
        )
    _start_ray(address)
    if remote is None:
        _check_storage_visible(folder.parent)
    reopen_parent_run(folder, metadata)
    if remote is not None:
        remote.mirror.read_only = False
        remote.push(EXPERIMENT_FILE)  # the reopened MLflow parent run
    tuner = tune.Tuner.restore(
        tune_path,
        trainable=_trainable_with_resources(location, metadata["resources"]),
        resume_unfinished=True,
        resume_errored=True,
        storage_filesystem=tune_filesystem,
    )
    _fit(tuner)
    if remote is not None:
        folder = pull_view(remote.uri, into=remote).folder
    set_parent_run_state(metadata, "FINISHED")
    return folder


def extend(
    name: str,
    *,
    samples: int | None = None,
    seeds: tuple[int, ...] | None = None,
    new_name: str | None = None,
    storage: str | Path | None = None,
    address: str | None = None,
    verbose: int = 1,
) -> Path:
    """Add trials to a finished study as a new experiment linked to ``name`` (left untouched).

    A search gets ``samples`` more points (an Optuna searcher is warm-started with every finished
    point of the old experiment: every completed trial of its Optuna study when that can be read,
    its own warm start included, else the finished runs of its folder); the new Optuna study
    goes to the old one's storage when that was a ``--optuna-storage`` URL. An ablation, sensitivity or grid study gets its cells on the new
    ``seeds``. The overrides the old experiment was launched with (``--set``) apply again, and so
    does its tracking (``--mlflow``, TensorBoard; a new MLflow parent run). Stage-1 checkpoints of
    the old experiment are reused, read-only.
    """
    storage_root = resolve_storage(storage)
    if isinstance(storage_root, BucketUri):
        Bucket(storage_root).check()
    old, old_location, _ = find_experiment(storage_root, name)
    metadata = read_experiment(old, required=("study_file", "study_sha256", "seeds", "resources"))
    study_file = Path(metadata["study_file"])
    if not study_file.is_file():
        raise ExperimentError(f"{old}: its study file {study_file} is gone; extend needs it")
    if hashlib.sha256(study_file.read_bytes()).hexdigest() != metadata["study_sha256"]:
        raise ExperimentError(
            f"{study_file} changed since {name!r} was launched; extend adds trials of the same "
            "study only: launch the edited study as a new experiment instead"
        )
    study = load_study(study_file, metadata.get("launch_overrides", ()))
    study = dataclasses.replace(study, tracking=_recorded_tracking(metadata))
    new_name = check_name(new_name or _next_name(storage_root, name))
    history: list[tuple[dict, float]] = []
    if study.kind == "search" and study.search.algorithm != "grid":
        if not samples or samples < 1 or seeds:
            raise ExperimentError(f"{name!r} is a search: extend it with --samples N (N >= 1)")
        history = _completed_in_optuna(metadata)
        warm_start_from = "optuna" if history is not None else "runs"
        if history is None:
            history = _finished_points(old, metadata)
        # A new searcher seed, so a random search does not draw the old points again.
        searcher_seed = study.search.seed + 1 + len(metadata.get("parents", []))
        search = dataclasses.replace(study.search, num_samples=samples, seed=searcher_seed)
        study = dataclasses.replace(study, search=search)
        extension = {
            "samples": samples,
            "searcher_seed": searcher_seed,
            "warm_start": len(history),
            "warm_start_from": warm_start_from,
        }
    else:
        if not seeds or samples:
            raise ExperimentError(
                f"{name!r} is a {study.kind} study: extend it with --seeds S [S ...] (new seeds)"
            )
        repeated = sorted(set(seeds) & set(metadata["seeds"]))
        if repeated:
            raise ExperimentError(f"{name!r} already ran seeds {repeated}; give new seeds")
        study = dataclasses.replace(study, seeds=tuple(seeds))
        extension = {"seeds": list(seeds)}
    return _launch(
        study,
        new_name,
        storage_root,
        address,
        parents=(*metadata.get("parents", []), old_location),
        history=history,
        extension=extension,
        optuna_storage=_shared_optuna_storage(old, metadata),
        checkpoint_every=checkpoint_every_of(metadata),
        verbose=verbose,
    )


# ---------------------------------------------------------------------------- the trial itself


def _prepare_trial(
    config: dict, folder: Path, trial_id: str, *, is_main: bool = True
) -> tuple[str, list[RunSpec], str]:
    """The trial's name, its runs and the study metric, from Tune's config dict.

    A search trial's drawn point is kept beside each run (``point.json``) for ``extend`` to
    warm-start a searcher with.
    """
    plan = read_json_object(folder / PLAN_FILE)
    metric = read_experiment(folder)["metric"]
    if config.get("trial") in plan.get("packs", {}):
        name = config["trial"]
        members = plan["packs"][name]
        return name, [RunSpec(m, config_from_dict(plan["trials"][m])) for m in members], metric
    if "trial" in config:
        name = config["trial"]
        match_to = plan.get("matches", {}).get(name)
        return name, [RunSpec(name, config_from_dict(plan["trials"][name]), match_to)], metric
    point = {key: _plain(config[key]) for key in plan["space"]}
    name = f"search/{trial_id}"
    runs = [
        RunSpec(f"{name}/seed-{seed}", point_config(plan["base"], point.items(), seed))
        for seed in plan["seeds"]
    ]
    for spec in runs:
        target = folder / RUNS_DIR / spec.name / POINT.file
        if is_main and not target.is_file():
            write_json(target, point)
    return name, runs, metric


def _plain(value):
    """Numpy scalars from a searcher as Python numbers (configs and JSON want plain types)."""
    return value.item() if hasattr(value, "item") else value


def _tune_trial(config: dict, experiment: str, cpus: float) -> None:
    """A Tune function trainable: one trial in this process (its experiment a folder, or an
    ``s3://`` URI it works on through a local mirror: :func:`sweeps.remote.open_trial`)."""
    import torch

    torch.set_num_threads(max(1, int(cpus)))
    try:
        if is_bucket_uri(experiment):
            with open_trial(experiment) as remote:
                _run_tune_trial(config, remote.folder, sync=remote.sync, pull=remote.pull_runs)
        else:
            _run_tune_trial(config, Path(experiment))
    finally:
        _release_memory()


def _run_tune_trial(config: dict, folder: Path, *, sync=None, pull=None) -> None:
    import ray
    from ray import tune

    name, runs, metric = _prepare_trial(config, folder, _trial_id())
    if pull is not None:
        pull([spec.name for spec in runs])  # a retried or resumed run's checkpoint and files

    def report(metrics: dict) -> int | None:
        # The epoch's files to the bucket, before Tune may stop the trial; what the bucket now
        # holds is what the trackers may log (sweeps.trial.Report).
        stored = sync(metrics) if sync is not None else None
        if metric in metrics:  # Tune needs the metric in every report: epochs without validation
            tune.report(metrics)
        return stored

    node = ray.get_runtime_context().get_node_id()
    if name.startswith(PACK_PREFIX):
        run_pack(folder, name, runs, report, node=node)
    else:
        run_trial(folder, name, runs, report, node=node)


def _release_memory() -> None:
    """Free what a finished trial held, so the next trial in this process starts clean."""
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _multi_worker_trial(config: dict, experiment: str, cpus: float, gpus: float, workers: int):
    """A Tune function trainable whose training runs on ``workers`` Ray Train workers."""
    import ray.train
    from ray.train.torch import TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    folder = Path(experiment)
    trial_id = _trial_id()
    trainer = TorchTrainer(
        _worker_loop,
        train_loop_config={"tune_config": config, "experiment": experiment, "trial_id": trial_id},
        scaling_config=ray.train.ScalingConfig(
            num_workers=workers,
            use_gpu=gpus > 0,
            resources_per_worker={"CPU": cpus, **({"GPU": gpus} if gpus else {})},
        ),
        run_config=ray.train.RunConfig(
            name=f"{trial_id}-{uuid.uuid4().hex[:6]}",
            storage_path=str(folder / "ray-train"),
            callbacks=[TuneReportCallback()],
            # Retries belong to Tune (FailureConfig of the experiment), which resumes the trial
            # from its run folder; a worker group that cannot start fails the trial at once.
            failure_config=ray.train.FailureConfig(max_failures=0),
        ),
    )
    trainer.fit()


def _worker_loop(loop_config: dict) -> None:
    """One Ray Train worker: the core trainer's Accelerate code joins Ray's process group."""
    import ray
    import ray.train
    import torch
    import torch.distributed as dist

    folder = Path(loop_config["experiment"])
    rank = ray.train.get_context().get_world_rank()
    torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))
    name, runs, metric = _prepare_trial(
        loop_config["tune_config"], folder, loop_config["trial_id"], is_main=rank == 0
    )

    def share(value):
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def report(metrics: dict) -> None:
        # Train V2: every worker reports; the run folder on shared storage is the checkpoint.
        if metric in metrics:
            ray.train.report(metrics)

    run_trial(
        folder,
        name,
        runs,
        report,
        is_main=rank == 0,
        share=share,
        node=ray.get_runtime_context().get_node_id(),
    )


def _trial_id() -> str:
    from ray import tune

    return tune.get_context().get_trial_id()


# -------------------------------------------------------------------------------- Tune set-up


def _tuner(
    study: Study,
    folder: Path,
    plan: dict,
    history: list,
    verbose: int,
    optuna_storage: str | None = None,
    location: str | None = None,
):
    """The Tuner of a new experiment; ``location`` is where it lives when not ``folder`` (an
    ``s3://`` URI, ``folder`` being the driver's mirror of it)."""
    from ray import tune

    location = location or str(folder)
    resources = study.resources
    tune_config = tune.TuneConfig(
        metric=study.metric,
        mode=study.mode,
        max_concurrent_trials=_concurrency(resources),
        trial_dirname_creator=_trial_dirname,
        # A new trial runs in the finished trial's process: torch, the data and the encoders are
        # imported once per process, not once per trial (seconds each). The trial function
        # releases its memory (and CUDA's cache) when it ends, so nothing carries over.
        reuse_actors=True,
    )
    if "trials" in plan:
        param_space: dict = {"trial": tune.grid_search(plan.get("units") or list(plan["trials"]))}
    else:
        param_space = {key: _tune_distribution(d) for key, d in study.search.space}
        search = study.search
        tune_config.num_samples = search.num_samples
        if search.algorithm == "optuna-tpe":
            from optuna.storages import RDBStorage

            tune_config.search_alg = _optuna_search_class()(
                metric=study.metric,
                mode=study.mode,
                seed=search.seed,
                # The study lives in an RDB (optuna-dashboard shows it live), named as the
                # experiment; only this driver writes to it.
                storage=RDBStorage(optuna_storage or optuna_storage_url(folder)),
                study_name=folder.name,
                points_to_evaluate=[point for point, _ in history] or None,
                evaluated_rewards=[value for _, value in history] or None,
            )
        else:
            from ray.tune.search.basic_variant import BasicVariantGenerator

            tune_config.search_alg = BasicVariantGenerator(random_state=search.seed)
        if search.asha is not None:
            from ray.tune.schedulers import ASHAScheduler

            tune_config.scheduler = ASHAScheduler(
                time_attr="global_epoch",  # epochs over both stages (see sweeps.trial)
                max_t=search.asha.max_t,
                grace_period=search.asha.grace_period,
                reduction_factor=search.asha.reduction_factor,
                # A trial that reaches max_t still reports its final results after its last
                # epoch: stopping it there would lose them.
                stop_last_trials=False,
            )
    storage_path, storage_filesystem = (
        _tune_storage(location.rsplit("/", 1)[0])
        if is_bucket_uri(location)
        else (str(folder.parent), None)
    )
    run_config = tune.RunConfig(
        name=folder.name,
        # A bucket location: Tune keeps its state in the bucket itself (through pyarrow).
        storage_path=storage_path,
        storage_filesystem=storage_filesystem,
        failure_config=tune.FailureConfig(max_failures=MAX_FAILURES),
        # Tune uploads its state to a bucket at most every sync_period (default 300 s): a driver
        # killed before the first upload leaves nothing to resume. Trials resume from their run
        # folders, so a state a little old costs only a finished trial's quick re-check.
        sync_config=tune.SyncConfig(sync_period=BUCKET_SYNC_SECONDS)
        if is_bucket_uri(location)
        else None,
        verbose=verbose,
    )
    return tune.Tuner(
        _trainable_with_resources(location, vars(resources)),
        param_space=param_space,
        tune_config=tune_config,
        run_config=run_config,
    )


def _tune_storage(location: str | Path):
    """``(path, pyarrow filesystem or None)``: how Ray Tune reaches ``location``.

    A folder, an ``s3://`` URI (pyarrow's S3 client reads the same ``AWS_*`` settings as boto3)
    and a ``gs://`` URI on Google Cloud itself need no filesystem. pyarrow's GCS client does not
    read ``$STORAGE_EMULATOR_HOST``, so a ``gs://`` location on a GCS-compatible server gets a
    client pointed at it, and the path without its scheme. pyarrow reads no Azure settings from
    the environment at all: an ``az://`` location gets an AzureFileSystem of the account that
    :class:`runstore.bucket.AzureAccount` finds there, and ``CONTAINER/PREFIX`` as its path. Any
    other store fsspec opens (``sftp://``...) gets pyarrow's handler of its fsspec file systems
    (:class:`runstore.arrow.StoreHandler`) and its path on the server.
    """
    location = str(location)
    if is_bucket_uri(location) and isinstance(store := Bucket(location), FilesystemBucket):
        filesystem, path = store.pyarrow_filesystem()
        return path, filesystem
    if location.startswith(AZURE_SCHEME):
        return location[len(AZURE_SCHEME) :], AzureAccount.from_environment().pyarrow_filesystem()
    emulator = os.environ.get("STORAGE_EMULATOR_HOST")
    if not location.startswith(GCS_SCHEME) or not emulator:
        return location, None
    import pyarrow.fs

    scheme, _, host = emulator.rpartition("://")
    filesystem = pyarrow.fs.GcsFileSystem(
        anonymous=True, scheme=scheme or "http", endpoint_override=host
    )
    return location[len(GCS_SCHEME) :], filesystem


class RayCoordinator:
    """The coordinator of a store without conditional writes (:mod:`runstore.filesystem`) for
    every process of a Ray cluster: a named, detached actor holding a
    :class:`runstore.filesystem.Coordinator`, which runs one call at a time.

    Detached, it outlives the driver that started it (a killed driver's trials still hold their
    leases, and a resumed driver finds them); it takes no CPU. Restarted on another node after
    its own is lost, it starts with no versions and adopts each lease it finds as renewed then.
    """

    def __init__(self, store: str):
        self.store = store
        self.name = f"diffcom-coordinator-{hashlib.sha256(store.encode()).hexdigest()[:12]}"
        self._handle = None

    def _actor(self):
        import ray

        if self._handle is None:
            actor = ray.remote(num_cpus=0, max_restarts=-1, max_concurrency=1)(Coordinator)
            self._handle = actor.options(
                name=self.name,
                namespace=COORDINATOR_NAMESPACE,
                lifetime="detached",
                get_if_exists=True,
            ).remote()
        return self._handle

    def _call(self, method: str, *args):
        import ray
        from ray.exceptions import RayActorError

        for attempt in range(3):
            try:
                return ray.get(getattr(self._actor(), method).remote(*args))
            except RayActorError:
                # Killed by hand, or its node lost while restarting: ask for it again (a new one
                # if it is gone), at most three times.
                self._handle = None
                if attempt == 2:
                    raise

    def create(self, location: str, relative: str, payload: bytes) -> str | None:
        return self._call("create", location, relative, payload)

    def replace(self, location: str, relative: str, payload: bytes, etag: str) -> str | None:
        return self._call("replace", location, relative, payload, etag)

    def head(self, location: str, relative: str) -> tuple[str, float, float] | None:
        return self._call("head", location, relative)


#: This process's coordinators, by Ray cluster (its GCS address) and store.
_RAY_COORDINATORS: dict[tuple[str, str], RayCoordinator] = {}


def _coordinator_in_ray(store: str) -> RayCoordinator | None:
    """The store's Ray coordinator in a process where Ray is initialized (a driver after
    ``ray.init``, a trial); ``None`` elsewhere (this machine's coordinator then)."""
    ray = sys.modules.get("ray")
    if ray is None or not ray.is_initialized():
        return None
    key = (ray.get_runtime_context().gcs_address, store)
    if key not in _RAY_COORDINATORS:
        _RAY_COORDINATORS[key] = RayCoordinator(store)
    return _RAY_COORDINATORS[key]


# Every process that runs this module's drivers or trials coordinates fsspec stores through Ray.
use_coordinators(_coordinator_in_ray)


def _trainable_with_resources(location: str | Path, resources: dict):
    """The trainable bound to its experiment (a folder, or an ``s3://`` URI), with the resources
    it asks Ray for."""
    from ray import tune

    cpus, gpus, workers = resources["cpus"], resources["gpus"], resources["workers"]
    if workers == 1:
        trainable = tune.with_parameters(_tune_trial, experiment=str(location), cpus=cpus)
        return tune.with_resources(trainable, {"cpu": cpus, "gpu": gpus})
    trainable = tune.with_parameters(
        _multi_worker_trial, experiment=str(location), cpus=cpus, gpus=gpus, workers=workers
    )
    # The trial's own process only waits for its workers, which reserve the real resources
    # (any CPU it kept would be missing when the workers need the whole machine); Ray refuses
    # a request of nothing at all, so it asks for a little memory only.
    return tune.with_resources(trainable, {"cpu": 0, "memory": 256 * 2**20})


def _trial_dirname(trial) -> str:
    if "trial" in trial.config:
        return f"{trial.config['trial'].replace('/', '__')}-{trial.trial_id}"
    return f"search-{trial.trial_id}"


def _tune_distribution(distribution):
    from ray import tune

    if isinstance(distribution, Choice):
        return tune.choice(list(distribution.values))
    if isinstance(distribution, Uniform):
        if distribution.q:
            return tune.quniform(distribution.low, distribution.high, distribution.q)
        return tune.uniform(distribution.low, distribution.high)
    if isinstance(distribution, LogUniform):
        if distribution.q:
            return tune.qloguniform(distribution.low, distribution.high, distribution.q)
        return tune.loguniform(distribution.low, distribution.high)
    if isinstance(distribution, RandInt):
        # Both bounds inclusive in a study; Ray's randint excludes its upper bound, qrandint not.
        if distribution.q:
            return tune.qrandint(distribution.low, distribution.high, distribution.q)
        return tune.randint(distribution.low, distribution.high + 1)
    raise StudyError(f"no Ray Tune counterpart for {distribution!r}")


def _describe_search(study: Study) -> dict | None:
    if study.search is None:
        return None
    return {
        "algorithm": study.search.algorithm,
        "seed": study.search.seed,
        "num_samples": study.search.num_samples,
        "asha": vars(study.search.asha) if study.search.asha else None,
        "space": {key: repr(d) for key, d in study.search.space},
    }


def _concurrency(resources) -> int:
    """As many trials at once as the cluster's CPUs (and GPUs) hold, at least one."""
    import ray

    total = ray.cluster_resources()
    per_trial_cpus = resources.cpus * resources.workers
    limit = math.floor(total.get("CPU", 1) / per_trial_cpus) if per_trial_cpus else 1
    if resources.gpus:
        limit = min(limit, math.floor(total.get("GPU", 0) / (resources.gpus * resources.workers)))
    if limit < 1:
        raise ExperimentError(
            f"one trial needs {per_trial_cpus} CPUs and {resources.gpus * resources.workers} GPUs; "
            f"the cluster has {total.get('CPU', 0)} CPUs and {total.get('GPU', 0)} GPUs"
        )
    return limit


def _cluster_resources() -> dict:
    import ray

    return {k: v for k, v in ray.cluster_resources().items() if k in ("CPU", "GPU", "memory")}


def _start_ray(address: str | None) -> None:
    """Join ``address`` or start a local Ray with this machine's resources."""
    import ray

    if ray.is_initialized():
        return
    if address is None:
        # A local Ray on one machine needs no cluster token (Ray 2.6x asks for one by default).
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    ray.init(address=address, include_dashboard=False, log_to_driver=True)


def _check_storage_visible(storage_root: Path) -> None:
    """Refuse storage that some node of a multi-node cluster cannot see."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    nodes = [node for node in ray.nodes() if node.get("Alive")]
    if len(nodes) < 2:
        return
    storage_root.mkdir(parents=True, exist_ok=True)
    marker = storage_root / f".diffcom-visible-{uuid.uuid4().hex}"
    marker.write_text("shared storage check\n")
    try:
        probe = ray.remote(num_cpus=0)(_sees)
        answers = ray.get(
            [
                probe.options(
                    scheduling_strategy=NodeAffinitySchedulingStrategy(node["NodeID"], soft=False)
                ).remote(str(marker))
                for node in nodes
            ],
            timeout=120,
        )
    finally:
        marker.unlink(missing_ok=True)
    blind = [f"{host} ({address})" for seen, host, address in answers if not seen]
    if blind:
        raise ExperimentError(
            f"--storage {storage_root} is not shared: node(s) {', '.join(blind)} cannot see it. "
            "A multi-node experiment needs storage every node mounts (e.g. NFS at the same path)"
        )


def _sees(path: str) -> tuple[bool, str, str]:
    import socket

    import ray

    return os.path.exists(path), socket.gethostname(), ray.util.get_node_ip_address()


def _fit(tuner) -> None:
    results = tuner.fit()
    failed = [r for r in results if r.error is not None]
    if failed:
        print(f"{len(failed)} of {len(results)} trials failed; see `diffcom sweep status`")


def _recorded_tracking(metadata: dict) -> Tracking:
    """The tracking an experiment was launched with (``--mlflow`` included), for its extension;
    an experiment launched before tracking existed tracks nothing."""
    recorded = metadata.get("tracking")
    if not isinstance(recorded, dict):
        return Tracking(mlflow=None, tensorboard=False)
    mlflow = recorded.get("mlflow")
    uri = mlflow.get("uri") if isinstance(mlflow, dict) else None
    return Tracking(mlflow=uri, tensorboard=recorded.get("tensorboard") is True)


def _next_name(storage_root: Path | BucketUri, name: str) -> str:
    def taken(candidate: str) -> bool:
        if isinstance(storage_root, BucketUri):
            return Bucket(storage_root.child(candidate)).exists(EXPERIMENT_FILE)
        return (storage_root / candidate).exists()

    index = 1
    while taken(f"{name}-ext{index}"):
        index += 1
    return f"{name}-ext{index}"


def _finished_points(folder: Path, metadata: dict) -> list[tuple[dict, float]]:
    """``(point, mean metric over seeds)`` of every finished search trial of an experiment."""
    split, protocol, measure = metadata["metric"].split(".", 2)
    points = []
    for trial in sorted((folder / RUNS_DIR / "search").glob("*")):
        values, point = [], None
        for run in sorted(trial.glob("seed-*")):
            try:
                status = read_json_object(run / STATUS.file)
                if status.get("state") != "finished":
                    values = []
                    break
                point = read_json_object(run / POINT.file)
                values.append(read_json_object(run / RESULTS.file)[split][protocol][measure])
            except (ExperimentError, KeyError, TypeError):  # TypeError: a file of another shape
                values = []
                break
        if values and point is not None and len(values) == len(metadata["seeds"]):
            points.append((point, sum(values) / len(values)))
    return points


# ------------------------------------------------------------------------ Optuna's own storage


def _finished_runs_optuna_search():
    """Ray's ``OptunaSearch``, except that a trial completes in Optuna only when all its runs did.

    Tune hands the searcher a trial's last result when it ends, and Ray's searcher tells Optuna
    that value as a completed trial even when ASHA stopped the trial mid-way: its RDB study (and
    a warm start read from it) would mix partial values with finished ones. Here a trial whose
    last result is not the final report of its last run (:func:`sweeps.trial.run_trial`) is told
    as pruned (its epochs stay as intermediate values), or failed after an error.
    """
    from ray.tune.search.optuna import OptunaSearch

    class _FinishedRunsOptunaSearch(OptunaSearch):
        def on_trial_complete(self, trial_id: str, result: dict | None = None, error=False):
            finished = (
                result is not None
                and result.get("final") is True
                and result.get("runs_finished") == result.get("runs")
            )
            super().on_trial_complete(trial_id, result if finished else None, error)

    # Named as a module attribute (see __getattr__ below), so pickle can find it again.
    _FinishedRunsOptunaSearch.__module__ = __name__
    _FinishedRunsOptunaSearch.__qualname__ = "_FinishedRunsOptunaSearch"
    return _FinishedRunsOptunaSearch


def _optuna_search_class():
    """The searcher class, built once (see :func:`_finished_runs_optuna_search`)."""
    if "_FinishedRunsOptunaSearch" not in globals():
        globals()["_FinishedRunsOptunaSearch"] = _finished_runs_optuna_search()
    return globals()["_FinishedRunsOptunaSearch"]


def __getattr__(name: str):
    # The searcher class subclasses Ray's, so it is built when first used, not when this module
    # is imported (the CLI imports it without Ray). Tune pickles the searcher in its experiment
    # state; pickle finds the class here by name when `resume` restores it.
    if name == "_FinishedRunsOptunaSearch":
        return _optuna_search_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _check_new_optuna_study(url: str, name: str) -> None:
    """Refuse a ``--optuna-storage`` that already holds a study of this name (its trials would
    mix with the new experiment's) or that cannot be opened; before Ray starts."""
    import optuna

    try:
        names = optuna.study.get_all_study_names(storage=url)
    except Exception as error:  # a bad URL, a missing driver, an unreachable server
        raise ExperimentError(
            f"--optuna-storage {url}: cannot open it ({type(error).__name__}: {error})"
        ) from None
    if name in names:
        raise ExperimentError(
            f"--optuna-storage {url} already holds an Optuna study named {name!r}; launch under "
            "another --name, or delete that study (optuna delete-study)"
        )


def _shared_optuna_storage(folder: Path, metadata: dict) -> str | None:
    """The ``--optuna-storage`` URL an experiment was launched with, for its extension; ``None``
    when it used the default (the extension gets its own SQLite file)."""
    url = metadata.get("optuna_storage")
    return url if url and url != optuna_storage_url(folder) else None


def _completed_in_optuna(metadata: dict) -> list[tuple[dict, float]] | None:
    """``(params, value)`` of every completed trial of an experiment's Optuna study, or ``None``
    when it has none that can be read (launched before studies were stored, or the file is gone):
    then the run folders tell. Nothing is written to the old storage."""
    url = metadata.get("optuna_storage")
    if not url:
        return None
    if url.startswith("sqlite:///") and not Path(url[len("sqlite:///") :]).is_file():
        return None  # opening it would create an empty database in the old experiment
    import optuna

    try:
        storage = optuna.storages.RDBStorage(
            url, skip_table_creation=True, skip_compatibility_check=True
        )
        study = optuna.load_study(study_name=metadata["name"], storage=storage)
        trials = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    except Exception as error:  # no such study, an unreachable server: the folders still tell
        print(f"note: reading the Optuna study in {url} failed ({error}); using the run folders")
        return None
    return [(dict(trial.params), trial.value) for trial in trials]
