"""A study in a bucket on a real local Ray, tracked in MLflow: launched into ``s3://``, its driver
SIGKILLed mid-study, resumed, every trial finished with nothing lost or rerun and one MLflow run
each, then ``status`` and ``report`` straight from the bucket. The bucket is a real S3-compatible
server on localhost (tests/s3.py), reached by the driver, Ray Tune and the trials over HTTP; the
MLflow server is the session's real one (tests/conftest.py). Then the coordinator of a store
without conditional writes (an SFTP server, tests/sftp.py) as the Ray actor that tasks share.

Every wait is for an event (an object in the bucket, a process exit) under one generous deadline.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from diffcom.cli import main
from runstore.bucket import Bucket, Lease
from sweeps.ray_adapter import COORDINATOR_NAMESPACE, RayCoordinator
from tests.s3 import new_bucket
from tests.sftp import new_folder
from tests.sweeps.bucket_workers import claim_in_ray
from tests.sweeps.test_ray_adapter import ROOT, _diffcom, _Driver, _wait_for

pytestmark = pytest.mark.ray

STUDIES = Path(__file__).parent / "studies"

#: Stage-2 epochs of the long cell here (the shared study has 40): enough that the driver is
#: killed while it trains (the kill comes a few epochs in), few enough to keep the resume short.
LONG_EPOCHS = 24


def _json(bucket: Bucket, relative: str) -> dict:
    found = bucket.read(relative)
    try:
        return json.loads(found[0]) if found else {}
    except ValueError:
        return {}


def _epochs(bucket: Bucket, run: str) -> list[tuple[int, int]]:
    found = bucket.read(f"{run}/metrics.jsonl")
    lines = found[0].decode().splitlines() if found else []
    return [(r["stage"], r["epoch"]) for r in map(json.loads, lines)]


def _states(bucket: Bucket) -> str:
    lines = [
        f"{name}: {_json(bucket, name).get('state')}, epoch {_json(bucket, name).get('last_epoch')}"
        for name in sorted(bucket.listing("runs"))
        if name.endswith("status.json")
    ]
    return "\n".join(lines) or "no status.json in the bucket"


def test_a_study_in_a_bucket_survives_a_killed_driver_and_reports_from_the_bucket(
    s3_server, mlflow_server, tmp_path, capsys
):
    storage = f"s3://{new_bucket()}/experiments"
    bucket = Bucket(f"{storage}/smoke-ablation")
    short, long = "runs/ablation/short/seed-0", "runs/ablation/long/seed-0"
    study = tmp_path / "smoke-ablation.yaml"
    shared = (STUDIES / "smoke-ablation.yaml").read_text()
    study.write_text(
        shared.replace("train.stage2_epochs: 40", f"train.stage2_epochs: {LONG_EPOCHS}")
    )
    assert study.read_text() != shared
    args = ("sweep", "launch", study, "--storage", storage)
    args = (*args, "--mlflow", mlflow_server)
    driver = _Driver(args, tmp_path)
    report = lambda: f"{driver.report()}\n--- in the bucket ---\n{_states(bucket)}"  # noqa: E731
    try:
        _wait_for(
            lambda: (
                driver.running()
                and _json(bucket, f"{short}/status.json").get("state") == "finished"
                and (_json(bucket, f"{long}/status.json").get("last_epoch") or [0, 0]) >= [2, 3]
                and any(name.startswith("experiment_state") for name in bucket.listing())
            ),
            "the short cell finished, three stage-2 epochs of the long cell and Tune's state, "
            "all in the bucket",
            on_timeout=report,
            poll_s=1.0,
        )
    finally:
        driver.kill()
    short_etag = bucket.listing(short)[f"{short}/results.json"].etag
    long_before = _epochs(bucket, long)
    assert _json(bucket, f"{long}/status.json").get("state") != "finished", report()

    resumed = _diffcom("sweep", "resume", "smoke-ablation", "--storage", storage)
    assert resumed.returncode == 1, resumed.stderr[-3000:]  # the diverging cell fails, by design

    listing = bucket.listing()
    assert listing[f"{short}/results.json"].etag == short_etag  # not trained again
    assert len(_json(bucket, f"{short}/status.json")["attempts"]) == 1
    long_status = _json(bucket, f"{long}/status.json")
    assert long_status["state"] == "finished"
    resumed_from = long_status["attempts"][1]["resumed_from"]
    assert resumed_from[0] == 2 and resumed_from[1] >= 3  # from the checkpoint in the bucket
    long_epochs = _epochs(bucket, long)
    assert long_epochs[: resumed_from[1]] == long_before[: resumed_from[1]]
    assert long_epochs == [(2, e) for e in range(1, LONG_EPOCHS + 1)]  # no epoch repeated or lost
    # Two stage-1 keys: short and long share one, trained once (before the kill) and reused on
    # resume; diverging's own never finishes training (its loss turns NaN in stage 1).
    trained = [
        name.split("/")[1]
        for name in listing
        if name.startswith("stage1/") and "/events/" in name
        for line in bucket.read(name)[0].decode().splitlines()
        if json.loads(line)["event"] == "trained"
    ]
    assert len(trained) == 1 and f"stage1/{trained[0]}/done.json" in listing, trained
    assert len({name.split("/")[1] for name in listing if name.startswith("stage1/")}) == 2
    assert not [name for name in listing if name.endswith(".lease")]

    _assert_one_mlflow_run_per_trial(mlflow_server, _json(bucket, "experiment.json"))

    # status and report in this process: neither starts Ray, and both read the bucket directly.
    assert main(["sweep", "status", "smoke-ablation", "--storage", storage]) == 0
    status = capsys.readouterr().out
    assert "1 failed, 2 finished" in status and "loss is nan" in status
    assert f"in {storage}/smoke-ablation" in status
    out = tmp_path / "report"
    assert main(["report", "smoke-ablation", "--storage", storage, "--out", str(out)]) == 0
    html = (out / "report.html").read_text()
    assert "ablation/long" in html or "long" in html


def _assert_one_mlflow_run_per_trial(uri: str, metadata: dict) -> None:
    """One parent run for the experiment and one child run per trial, the killed and resumed
    trial's included: the resumed run continued its run, every epoch logged once."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    tracking = metadata["tracking"]["mlflow"]
    runs = client.search_runs([tracking["experiment_id"]])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert [p.info.run_id for p in parents] == [tracking["parent_run_id"]]
    assert parents[0].info.status == "FINISHED" and parents[0].info.run_name == "smoke-ablation"
    children = {r.info.run_name: r for r in runs if r not in parents}
    assert sorted(children) == [
        f"ablation/{cell}/seed-0" for cell in ("diverging", "long", "short")
    ]
    assert len(runs) == 4, [r.info.run_name for r in runs]  # no second run for the resumed trial
    states = {name: child.info.status for name, child in children.items()}
    assert states == {
        "ablation/diverging/seed-0": "FAILED",
        "ablation/long/seed-0": "FINISHED",
        "ablation/short/seed-0": "FINISHED",
    }
    for cell, stage2_epochs in (("short", 1), ("long", LONG_EPOCHS)):
        child = children[f"ablation/{cell}/seed-0"]
        assert child.data.tags["mlflow.parentRunId"] == tracking["parent_run_id"]
        steps = [m.step for m in client.get_metric_history(child.info.run_id, "loss")]
        assert sorted(steps) == list(range(1, 2 + stage2_epochs + 1)), cell  # stage 1: 2 epochs


def test_a_store_without_conditional_writes_is_coordinated_by_one_ray_actor(
    sftp_server, monkeypatch
):
    import ray

    location = new_folder(sftp_server)
    bucket = Bucket(location)
    monkeypatch.setenv("PYTHONPATH", str(ROOT))  # the workers import tests.sweeps.bucket_workers
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")  # a local Ray, as sweeps.ray_adapter starts it
    ray.init(num_cpus=2, include_dashboard=False, configure_logging=False)
    try:
        # Two tasks in two other processes and this process claim one name: one wins.
        claim = ray.remote(num_cpus=1)(claim_in_ray)
        tasks = [claim.remote(location, index) for index in range(2)]
        here = bucket.create("claim", b"claimed by the test")
        outcomes = [here, *ray.get(tasks, timeout=300)]
        assert sum(outcome is not None for outcome in outcomes) == 1, outcomes
        # Through one detached actor, which this process reaches too.
        coordinator = bucket.coordinator
        assert isinstance(coordinator, RayCoordinator)
        actor = ray.get_actor(coordinator.name, namespace=COORDINATOR_NAMESPACE)
        with Lease(bucket, "stage1/k.lease", "here", ttl=30) as lease:
            assert bucket.create("stage1/k.lease", b"another holder") is None
        assert not lease.lost and not bucket.exists("stage1/k.lease")
        version, changed, _ = bucket.head("claim")
        # Its node lost: it restarts with no versions, and dates each file from its first look.
        ray.kill(actor, no_restart=False)
        after = bucket.head("claim")
        assert after[0] == version and after[1] > changed
    finally:
        ray.shutdown()
