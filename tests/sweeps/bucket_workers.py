"""What the bucket tests (test_remote.py) run in spawned processes: trials that ask for a shared
stage 1 in a bucket, and one that dies holding its lease.

A spawned process imports the module of the function it runs. This one imports only the bucket
code and the config (well under a second), where the test module would bring Ray, torch and the
CLI with it (several seconds a process, six processes at once in the race test).
"""

from __future__ import annotations

import functools
import os
import time
from pathlib import Path

from core.config import ExperimentConfig, load_config
from sweeps import remote
from sweeps.remote import BucketStage1Store, RemoteExperiment
from tests.s3 import CREDENTIALS


def nations_config(*overrides: str) -> ExperimentConfig:
    """The config the bucket tests share a stage 1 for: Nations, the recipe otherwise."""
    return load_config(overrides=["data.dataset=nations", *overrides])


def environment() -> dict:
    """What a spawned process needs to reach the test's S3, GCS, Azure or SFTP server."""
    keys = (
        *CREDENTIALS,
        "AWS_ENDPOINT_URL",
        "STORAGE_EMULATOR_HOST",
        "AZURE_STORAGE_CONNECTION_STRING",
        "FSSPEC_SFTP_PASSWORD",
        "FSSPEC_SFTP_LOOK_FOR_KEYS",
    )
    return {key: os.environ[key] for key in keys if key in os.environ}


def fake_stage1(log: str, config: ExperimentConfig, folder: Path) -> dict:
    """Stands in for core training: takes a while, writes the checkpoint, counts itself."""
    with open(log, "a") as stream:
        stream.write(f"{config.seed}\n")
    time.sleep(1.0)
    (folder / "checkpoints").mkdir(parents=True, exist_ok=True)
    (folder / "checkpoints" / "last.pt").write_bytes(b"weights")
    return {"timings": {"train_seconds": 1.0}}


def ask(environment: dict, uri: str, log: str, seed: int, trial: str) -> bool:
    """One trial asking for the stage 1 of ``seed``; whether it trained it."""
    os.environ.update(environment)
    experiment = RemoteExperiment(remote.BucketUri.parse(uri), "trial")
    try:
        store = BucketStage1Store(experiment, [])
        found = store.obtain(
            nations_config(f"seed={seed}"), functools.partial(fake_stage1, log), trial=trial
        )
        return found.trained_here
    finally:
        experiment.close()


def die_while_training(environment: dict, uri: str) -> None:
    """A trial that trains stage 1, pushes a partial checkpoint, and dies holding the lease."""
    os.environ.update(environment)
    experiment = RemoteExperiment(remote.BucketUri.parse(uri), "trial")

    def crash(config, folder):
        (folder / "checkpoints").mkdir(parents=True)
        (folder / "checkpoints" / "last.pt").write_bytes(b"half")
        experiment.push()  # an epoch boundary
        os._exit(17)  # no release, no cleanup: a SIGKILL or a lost node

    BucketStage1Store(experiment, []).obtain(nations_config(), crash, trial="first")


def claim_in_ray(location: str, index: int) -> str | None:
    """A Ray task's conditional create of ``claim`` at ``location`` (through the store's Ray
    coordinator once :mod:`sweeps.ray_adapter` is imported); its version, or ``None``."""
    import sweeps.ray_adapter  # noqa: F401  (installs the Ray coordinators)
    from runstore.bucket import Bucket

    return Bucket(location).create("claim", f"claimed by task {index}".encode())
