"""Experiments in a bucket (sweeps.remote) against real servers on localhost: S3-compatible
(tests/s3.py), GCS-compatible (tests/gcs.py), Azurite (tests/azure.py) and SFTP (tests/sftp.py,
through fsspec, its conditional writes done by this machine's coordinator). The shared stage 1
under a lease, a trial's mirror, launch and its refusals, status.

Every test runs on S3, launch on all four stores, the others on one or two more: the race of six
processes for a stage-1 key on SFTP too, whose processes share this machine's coordinator. The
stores' own contract, leases and mirrors included, is tested on all four in
tests/runstore/test_bucket.py; the end-to-end study on Ray (a killed driver, resume, status and
report from the bucket) is in test_ray_remote.py."""

from __future__ import annotations

import concurrent.futures
import functools
import json
import multiprocessing
import threading
from pathlib import Path

import pytest

from core.config import load_config
from diffcom.cli import main
from runstore.bucket import Bucket, BucketError
from sweeps import ray_adapter, remote
from sweeps.experiment import ExperimentError, read_json
from sweeps.remote import BucketStage1Store, RemoteExperiment, open_trial, pull_view
from sweeps.stage1 import Stage1Store, stage1_key
from sweeps.trial import RunSpec, run_trial
from tests import azure, gcs, sftp
from tests.s3 import new_bucket
from tests.smoke import SMOKE
from tests.sweeps.bucket_workers import (
    ask,
    die_while_training,
    environment,
    fake_stage1,
    nations_config,
)

STUDIES = Path(__file__).parent / "studies"


@pytest.fixture
def uri(request) -> str:
    """A new experiment's location in a fresh bucket: S3, or the store a test is parametrized
    with (``"gs"``, ``"az"``, ``"sftp"``: a fresh folder on the SFTP server)."""
    store = getattr(request, "param", "s3")
    if store == "sftp":
        return f"{sftp.new_folder(request.getfixturevalue('sftp_server'), 'experiments')}/exp"
    if store == "gs":
        request.getfixturevalue("gcs_server")
        return f"gs://{gcs.new_bucket()}/experiments/exp"
    if store == "az":
        request.getfixturevalue("azurite")
        return f"az://{azure.new_container()}/experiments/exp"
    request.getfixturevalue("s3_server")
    return f"s3://{new_bucket()}/experiments/exp"


ALL_STORES = pytest.mark.parametrize("uri", ["s3", "gs", "az", "sftp"], indirect=True)
S3_GCS_AND_SFTP = pytest.mark.parametrize("uri", ["s3", "gs", "sftp"], indirect=True)
S3_AND_AZURE = pytest.mark.parametrize("uri", ["s3", "az"], indirect=True)


@pytest.mark.parametrize("uri", ["s3", "sftp"], indirect=True)
def test_trials_racing_for_a_key_in_a_bucket_train_it_once(uri, tmp_path):
    log = str(tmp_path / "trainings.log")
    asks = [
        (environment(), uri, log, seed, f"trial-{i}-seed-{seed}")
        for i in range(3)
        for seed in (0, 1)
    ]
    with multiprocessing.get_context("spawn").Pool(6) as pool:
        trained = pool.starmap(ask, asks)
    assert sum(trained) == 2  # one per seed, whatever the interleaving
    assert sorted(Path(log).read_text().split()) == ["0", "1"]
    bucket = Bucket(uri)
    listing = bucket.listing("stage1")
    for seed in (0, 1):
        key = stage1_key(nations_config(f"seed={seed}"))
        assert f"stage1/{key}/done.json" in listing
        assert f"stage1/{key}/run/checkpoints/last.pt" in listing
        assert f"stage1/{key}.lease" not in listing  # released
    # One events file per trial: concurrent trials never overwrite each other's lines.
    view = pull_view(bucket.uri)
    events = BucketStage1Store(view, []).events()
    assert sorted(e["event"] for e in events) == ["reused"] * 4 + ["trained"] * 2 + ["training"] * 2


@S3_GCS_AND_SFTP
def test_a_dead_holders_lease_is_taken_over_and_its_partial_run_resumed(uri, monkeypatch, capsys):
    process = multiprocessing.get_context("spawn").Process(
        target=die_while_training, args=(environment(), uri)
    )
    process.start()
    process.join(timeout=600)
    assert process.exitcode == 17
    key = stage1_key(nations_config())
    assert Bucket(uri).exists(f"stage1/{key}.lease")  # still there: its holder never released it

    monkeypatch.setattr(remote, "LEASE_TTL_SECONDS", 1.0)
    experiment = RemoteExperiment(remote.BucketUri.parse(uri), "trial")
    resumed_from = []

    def resume(config, folder):
        resumed_from.append((folder / "checkpoints" / "last.pt").read_bytes())
        (folder / "checkpoints" / "last.pt").write_bytes(b"weights")
        return {"timings": {"train_seconds": 1.0}}

    try:
        found = BucketStage1Store(experiment, []).obtain(nations_config(), resume, trial="second")
    finally:
        experiment.close()
    assert found.trained_here and resumed_from == [b"half"]
    assert "took over the lease of first" in capsys.readouterr().out
    done = json.loads(Bucket(uri).read(f"stage1/{key}/done.json")[0])
    assert done["trained_by"] == "second"
    assert Bucket(uri).read(f"stage1/{key}/run/checkpoints/last.pt")[0] == b"weights"


def test_a_parent_experiment_in_a_bucket_is_read_and_never_written(uri, tmp_path):
    parent_uri = uri + "-parent"
    log = str(tmp_path / "trainings.log")
    assert ask(environment(), parent_uri, log, 0, "old")
    before = Bucket(parent_uri).listing()
    experiment = RemoteExperiment(remote.BucketUri.parse(uri), "trial")
    try:
        store = BucketStage1Store(experiment, [parent_uri])
        found = store.obtain(
            nations_config("seed=0"), functools.partial(fake_stage1, log), trial="new"
        )
        assert not found.trained_here and found.checkpoint.read_bytes() == b"weights"
    finally:
        experiment.close()
    assert Bucket(parent_uri).listing() == before
    assert Path(log).read_text().split() == ["0"]


@S3_AND_AZURE
def test_a_trial_in_a_bucket_trains_in_its_mirror_and_leaves_everything_in_the_bucket(uri):
    bucket = Bucket(uri)
    bucket.write(
        "experiment.json",
        json.dumps(
            {"name": "exp", "kind": "ablation", "metric": "valid.clean.mrr", "mode": "max"}
        ).encode(),
    )
    config = load_config(overrides=SMOKE)
    reports = []
    with open_trial(uri) as trial:
        folder = trial.folder

        def report(metrics):
            trial.sync()
            reports.append(
                sorted(
                    name
                    for name in bucket.listing("runs")
                    if name.endswith(("metrics.jsonl", "last.pt"))
                )
            )

        run_trial(folder, "ablation/full/seed-0", [RunSpec("ablation/full/seed-0", config)], report)
    assert not folder.exists()  # the mirror is gone; the bucket has it all
    listing = bucket.listing()
    run = "runs/ablation/full/seed-0"
    for name in (
        "results.json",
        "metrics.jsonl",
        "checkpoints/last.pt",
        "status.json",
        "trial.json",
        "config.json",
    ):
        assert f"{run}/{name}" in listing, name
    # Each stage-2 epoch's report found that epoch's files in the bucket already.
    assert [f"{run}/checkpoints/last.pt", f"{run}/metrics.jsonl"] in reports
    view = pull_view(bucket.uri)
    status = read_json(view.folder / run / "status.json")
    assert status["state"] == "finished" and status["stage1"]["reused"] is False
    assert not (view.folder / run / "checkpoints").exists()  # a reader's copy: no checkpoints
    key = stage1_key(config)
    assert f"stage1/{key}/done.json" in listing


@pytest.fixture
def no_ray(monkeypatch):
    """Launches write and push the experiment but neither start Ray nor run a Tuner."""
    tuned = []
    monkeypatch.setattr(ray_adapter, "_start_ray", lambda address: None)
    monkeypatch.setattr(ray_adapter, "_cluster_resources", dict)
    monkeypatch.setattr(ray_adapter, "_concurrency", lambda resources: 1)
    monkeypatch.setattr(ray_adapter, "_tuner", lambda *args: tuned.append(args))
    monkeypatch.setattr(ray_adapter, "_fit", lambda tuner: None)
    return tuned


@ALL_STORES
def test_launch_into_a_bucket_pushes_the_experiment_and_refuses_what_a_bucket_cannot_hold(
    uri, no_ray, monkeypatch
):
    tuned = no_ray
    # The refusals come before Ray would start.
    monkeypatch.setattr(ray_adapter, "_start_ray", lambda address: pytest.fail("Ray started"))
    root = uri.rsplit("/", 1)[0]
    scheme = uri.split("://")[0]
    missing, words = f"{scheme}://no-such-bucket/x", "'no-such-bucket' does not exist"
    if scheme == "sftp":  # a folder is created if missing: a file in its way refuses it
        Bucket(root).write("blocker", b"a file")
        missing, words = f"{root}/blocker/x", "blocker is a file, not a folder"
    with pytest.raises(BucketError, match=words):
        ray_adapter.launch(STUDIES / "smoke-ablation.yaml", storage=missing)
    with pytest.raises(ExperimentError, match="workers > 1 .* resources.workers = 2"):
        ray_adapter.launch(STUDIES / "smoke-two-workers.yaml", storage=root)
    with pytest.raises(ExperimentError, match="cannot live in a bucket: give --optuna-storage"):
        ray_adapter.launch(STUDIES / "smoke-search.yaml", storage=root)

    monkeypatch.setattr(ray_adapter, "_start_ray", lambda address: None)
    folder = ray_adapter.launch(STUDIES / "smoke-ablation.yaml", storage=root)
    listing = Bucket(f"{root}/smoke-ablation").listing()
    assert {"experiment.json", "plan.json", "study.yaml"} <= set(listing)
    metadata = read_json(folder / "experiment.json")
    assert metadata["name"] == "smoke-ablation" and metadata["storage"] == f"{root}/smoke-ablation"
    (study, mirror, plan, history, verbose, optuna, location) = tuned[0]
    assert location == f"{root}/smoke-ablation" and mirror.name == "smoke-ablation"
    # Ray Tune reaches the same place through pyarrow: on a GCS-compatible server and in Azure
    # with a client pointed at it (pyarrow reads neither $STORAGE_EMULATOR_HOST nor Azure's
    # settings), over SFTP through fsspec, on S3 by the URI.
    path, filesystem = ray_adapter._tune_storage(location)
    if scheme in ("gs", "az", "sftp"):
        found = filesystem.get_file_info(f"{path}/experiment.json")
        assert found.size == listing["experiment.json"].size
    else:
        assert (path, filesystem) == (location, None)
    with pytest.raises(ExperimentError, match=f"'smoke-ablation' already exists in {scheme}://"):
        ray_adapter.launch(STUDIES / "smoke-ablation.yaml", storage=root)
    with pytest.raises(
        ExperimentError, match=f"no experiment 'other' in {scheme}://.*there: smoke-ablation"
    ):
        ray_adapter.resume("other", storage=root)


@pytest.mark.parametrize("uri", ["s3", "az", "sftp"], indirect=True)
def test_of_two_launches_racing_for_one_name_one_pushes_and_the_other_writes_nothing(
    uri, no_ray, monkeypatch
):
    root = uri.rsplit("/", 1)[0]
    target = remote.BucketUri.parse(f"{root}/smoke-ablation")

    def the_other_launch_wins(address):
        # Both passed the existence check; the other launch claims the name while this one
        # starts Ray, and has not pushed its experiment yet.
        Bucket(target).create(remote.LAUNCH_FILE, b'{"host": "node-b", "pid": 7, "time": "t0"}')

    monkeypatch.setattr(ray_adapter, "_start_ray", the_other_launch_wins)
    with pytest.raises(
        ExperimentError,
        match=r"'smoke-ablation' .* was launched meanwhile by node-b \(pid 7\) at t0; this "
        r"launch wrote nothing there.*delete .*/launch.json",
    ):
        ray_adapter.launch(STUDIES / "smoke-ablation.yaml", storage=root)
    assert set(Bucket(target).listing()) == {remote.LAUNCH_FILE}
    assert not no_ray  # Tune never ran

    # The claim itself: of several claimants at once (threads, each with its own client, released
    # together), exactly one wins.
    contested = remote.BucketUri.parse(f"{root}/contested")
    start = threading.Barrier(4)

    def claim() -> bool:
        start.wait(timeout=60)
        try:
            remote.claim_new_experiment(contested)
        except ExperimentError as error:
            assert "was launched meanwhile" in str(error)
            return False
        return True

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        outcomes = [future.result() for future in [pool.submit(claim) for _ in range(4)]]
    assert sorted(outcomes) == [False, False, False, True]


def test_extend_in_a_bucket_links_the_new_experiment_to_the_old_one_there(uri, no_ray, tmp_path):
    root = uri.rsplit("/", 1)[0]
    study = tmp_path / "smoke-sensitivity.yaml"
    study.write_text((STUDIES / "smoke-sensitivity.yaml").read_text())
    ray_adapter.launch(study, storage=root)
    new = ray_adapter.extend("smoke-sensitivity", seeds=(2,), storage=root)
    assert new.name == "smoke-sensitivity-ext1"
    metadata = json.loads(Bucket(f"{root}/smoke-sensitivity-ext1").read("experiment.json")[0])
    assert metadata["parents"] == [f"{root}/smoke-sensitivity"]
    assert metadata["extension"] == {"seeds": [2]}
    assert no_ray[-1][-1] == f"{root}/smoke-sensitivity-ext1"  # the Tuner's location
    # A trial of the extension reuses the parent's stage 1 from the bucket, read-only.
    parent = RemoteExperiment(remote.BucketUri.parse(f"{root}/smoke-sensitivity"), "trial")
    log = str(tmp_path / "trainings.log")
    try:
        BucketStage1Store(parent, []).obtain(
            nations_config("seed=0"), functools.partial(fake_stage1, log), trial="old"
        )
        parent.push()
    finally:
        parent.close()
    child = RemoteExperiment(remote.BucketUri.parse(f"{root}/smoke-sensitivity-ext1"), "trial")
    try:
        store = Stage1Store.of_experiment(child.folder, metadata)
        assert isinstance(store, BucketStage1Store)
        found = store.obtain(
            nations_config("seed=0"), functools.partial(fake_stage1, log), trial="new"
        )
        assert not found.trained_here
    finally:
        child.close()
    assert Path(log).read_text().split() == ["0"]


@S3_AND_AZURE
def test_status_and_watch_read_an_experiment_in_the_bucket(uri, no_ray, capsys):
    def main_output(root: str) -> str:
        main(["sweep", "status", "smoke-ablation", "--storage", root])
        return capsys.readouterr().out

    root = uri.rsplit("/", 1)[0]
    ray_adapter.launch(STUDIES / "smoke-ablation.yaml", storage=root)
    bucket = Bucket(f"{root}/smoke-ablation")
    bucket.write(
        "runs/ablation/short/seed-0/status.json",
        json.dumps(
            {"state": "running", "heartbeat": "2026-01-01T00:00:00+00:00", "attempts": []}
        ).encode(),
    )
    assert main(["sweep", "status", "smoke-ablation", "--storage", root]) == 0
    shown = capsys.readouterr().out
    assert f"in {root}/smoke-ablation" in shown and "2 pending, 1 running" in shown
    bucket.write(
        "runs/ablation/short/seed-0/status.json",
        json.dumps({"state": "failed", "error": "boom", "attempts": []}).encode(),
    )
    assert main(["sweep", "watch", "smoke-ablation", "--storage", root, "--once"]) == 0
    shown = capsys.readouterr().out
    assert "1 failed, 2 pending" in shown and "boom" in shown
    assert f"tensorboard --logdir {root}/smoke-ablation/runs" in main_output(root)


def test_checkpoints_go_up_every_n_epochs_and_at_the_end_of_a_run(uri):
    experiment = RemoteExperiment(remote.BucketUri.parse(uri), "trial")
    trial = remote.RemoteTrial(experiment, checkpoint_every=2)
    run = experiment.folder / "runs" / "r"
    (run / "checkpoints").mkdir(parents=True)
    bucket = Bucket(uri)
    try:
        for epoch in (1, 2, 3):
            (run / "metrics.jsonl").write_text(f'{{"epoch": {epoch}}}\n' * epoch)
            (run / "checkpoints" / "last.pt").write_bytes(b"w" * epoch)
            stored = trial.sync({"global_epoch": epoch, "final": False})
            uploaded = bucket.read("runs/r/checkpoints/last.pt")
            assert bucket.read("runs/r/metrics.jsonl")[0].count(b"epoch") == epoch
            assert (uploaded[0] if uploaded else None) == (None, b"ww", b"ww")[epoch - 1]
            # What trackers may log: the epochs whose checkpoint is in the bucket.
            assert stored == (0, 2, 2)[epoch - 1]
        # The run's end: everything, and the trial's next run starts with nothing stored.
        assert trial.sync({"global_epoch": 3, "final": True}) is None
        assert bucket.read("runs/r/checkpoints/last.pt")[0] == b"www"
        assert trial.sync({"global_epoch": 1, "final": False}) == 0
    finally:
        experiment.close()


def test_checkpoint_every_is_recorded_for_a_bucket_and_refused_for_a_folder(uri, no_ray, tmp_path):
    root = uri.rsplit("/", 1)[0]
    with pytest.raises(
        ExperimentError, match="--checkpoint-every 3: needs an s3://, gs:// or az:// --storage"
    ):
        ray_adapter.launch(STUDIES / "smoke-ablation.yaml", storage=tmp_path, checkpoint_every=3)
    with pytest.raises(ExperimentError, match="--checkpoint-every 0: needs an integer >= 1"):
        ray_adapter.launch(STUDIES / "smoke-ablation.yaml", storage=root, checkpoint_every=0)
    folder = ray_adapter.launch(STUDIES / "smoke-ablation.yaml", storage=root, checkpoint_every=3)
    metadata = read_json(folder / "experiment.json")
    assert metadata["bucket"] == {"checkpoint_every": 3}
    assert remote.checkpoint_every_of(metadata) == 3
    assert remote.checkpoint_every_of({}) == 1


def test_report_names_an_experiment_missing_from_the_bucket(uri, tmp_path, capsys):
    root = uri.rsplit("/", 1)[0]
    assert main(["report", "nothing", "--storage", root, "--out", str(tmp_path / "r")]) == 2
    assert f"no experiment named so in {root}" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()
