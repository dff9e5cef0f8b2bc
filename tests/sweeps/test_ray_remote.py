"""A study in a bucket on a real local Ray: launched into ``s3://``, its driver SIGKILLed mid-study,
resumed, every trial finished with nothing lost or rerun, then ``status`` and ``report`` straight
from the bucket. The bucket is a real S3-compatible server on localhost (tests/s3.py), reached by
the driver, Ray Tune and the trials over HTTP.

Every wait is for an event (an object in the bucket, a process exit) under one generous deadline.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from runstore.bucket import Bucket
from tests.s3 import new_bucket, start_server
from tests.sweeps.test_ray_adapter import _diffcom, _Driver, _wait_for

pytestmark = pytest.mark.ray

STUDIES = Path(__file__).parent / "studies"


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    yield from start_server(tmp_path_factory.mktemp("s3"))


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


def test_a_study_in_a_bucket_survives_a_killed_driver_and_reports_from_the_bucket(s3, tmp_path):
    storage = f"s3://{new_bucket()}/experiments"
    bucket = Bucket(f"{storage}/smoke-ablation")
    short, long = "runs/ablation/short/seed-0", "runs/ablation/long/seed-0"
    args = ("sweep", "launch", STUDIES / "smoke-ablation.yaml", "--storage", storage)
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
            poll_s=2.0,
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
    assert long_epochs == [(2, e) for e in range(1, 41)]  # no epoch repeated or lost
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

    status = _diffcom("sweep", "status", "smoke-ablation", "--storage", storage)
    assert "1 failed, 2 finished" in status.stdout and "loss is nan" in status.stdout
    assert f"in {storage}/smoke-ablation" in status.stdout
    out = tmp_path / "report"
    made = _diffcom("report", "smoke-ablation", "--storage", storage, "--out", out)
    assert made.returncode == 0, made.stderr[-3000:]
    html = (out / "report.html").read_text()
    assert "ablation/long" in html or "long" in html
