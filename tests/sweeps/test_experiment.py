"""Experiment folders without Ray: names, storage, provenance helpers and the status listing."""

import json
import os
import re
import socket
import subprocess
import sys

import pytest

from runstore.bucket import BucketError, BucketUri
from sweeps.experiment import (
    ExperimentError,
    check_name,
    eta_seconds,
    experiment_dir,
    read_experiment,
    read_json,
    read_json_object,
    read_statuses,
    resolve_storage,
    write_json,
)


@pytest.mark.parametrize(
    "name", ["../x", "/abs/path", "a/b", "..", ".", "", "has space", "x" * 101, "-leading", "é"]
)
def test_names_that_would_escape_or_confuse_the_storage_root_are_refused(name):
    with pytest.raises(ExperimentError, match="is not allowed"):
        check_name(name)


@pytest.mark.parametrize("name", ["demo", "paper-ablation", "k_sweep.v2", "A1"])
def test_plain_names_are_accepted(name):
    assert check_name(name) == name


def test_storage_paths_uris_and_the_default(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert resolve_storage("rel") == tmp_path / "rel"  # resolved once, before trials chdir
    assert resolve_storage(f"file://{tmp_path}/x") == tmp_path / "x"
    monkeypatch.setenv("DIFFCOM_STORAGE", str(tmp_path / "store"))
    assert resolve_storage(None) == tmp_path / "store"
    assert resolve_storage("s3://bucket/experiments/") == BucketUri("bucket", "experiments")
    assert resolve_storage("gs://bucket/experiments") == BucketUri("bucket", "experiments", "gs://")
    assert resolve_storage("az://lab/exp") == BucketUri("lab", "exp", "az://")
    # Any other store fsspec opens; a scheme it does not know, or text that is no URI, refused.
    assert resolve_storage("hdfs://namenode:8020/experiments") == BucketUri(
        "namenode:8020", "experiments", "hdfs://"
    )
    assert resolve_storage("sftp://me@lab/data/exp").scheme == "sftp://"
    with pytest.raises(BucketError, match=r"fsspec knows no file system 'nosuch'"):
        resolve_storage("nosuch://host/experiments")
    with pytest.raises(ExperimentError, match=r"neither a folder nor a URI .*sftp://HOST/PATH"):
        resolve_storage("my store://x")
    with pytest.raises(BucketError, match=r"'B' is not a bucket name"):
        resolve_storage("s3://B/x")


def test_existing_names_are_never_reused_and_missing_ones_are_listed(tmp_path):
    write_json(tmp_path / "first" / "experiment.json", {"name": "first"})
    with pytest.raises(
        ExperimentError, match=r"'first' already exists .*`diffcom sweep resume first`"
    ):
        experiment_dir(tmp_path, "first", must_exist=False)
    with pytest.raises(
        ExperimentError, match=r"no experiment 'second' .* experiments there: first"
    ):
        experiment_dir(tmp_path, "second", must_exist=True)
    assert experiment_dir(tmp_path, "first", must_exist=True) == tmp_path / "first"


def test_json_is_written_atomically_and_damage_is_named(tmp_path):
    write_json(tmp_path / "a" / "b.json", {"x": 1})
    assert read_json(tmp_path / "a" / "b.json") == {"x": 1}
    assert [p.name for p in (tmp_path / "a").iterdir()] == ["b.json"]  # no temporary left
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ExperimentError, match=r"bad.json: not valid JSON"):
        read_json(tmp_path / "bad.json")
    with pytest.raises(ExperimentError, match=r"gone.json: missing"):
        read_json(tmp_path / "gone.json")


def _run(root, name, status, metrics=(), results=None):
    folder = root / "runs" / name
    write_json(folder / "status.json", status)
    (folder / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in metrics))
    if results is not None:
        write_json(folder / "results.json", results)


def test_status_listing_reads_states_and_survives_damage(tmp_path):
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True
    )
    dead_pid = int(dead.stdout)
    here = socket.gethostname()
    results = {
        "valid": {"clean": {"mrr": 0.5}},
        "test": {"clean": {"mrr": 0.4, "hits@1": 0.3}},
    }
    _run(
        tmp_path, "a/seed-0", {"state": "finished", "seed": 0}, [{"stage": 2, "epoch": 3}], results
    )
    _run(
        tmp_path,
        "b/seed-0",
        {"state": "running", "host": here, "pid": os.getpid(), "attempts": [{}]},
        [{"stage": 1, "epoch": 1, "valid.clean.mrr": 0.2}],
    )
    _run(tmp_path, "c/seed-0", {"state": "running", "host": here, "pid": dead_pid})
    _run(tmp_path, "d/seed-0", {"state": "failed", "error": "stage 1, epoch 1: loss is nan"})
    _run(tmp_path, "e/seed-0", {"state": "finished"}, results={"valid": {}})
    (tmp_path / "runs" / "f" / "seed-0").mkdir(parents=True)
    (tmp_path / "runs" / "f" / "seed-0" / "status.json").write_text("{")

    statuses = {
        s.name: s for s in read_statuses(tmp_path, "valid.clean.mrr", ["a/seed-0", "g/seed-0"])
    }
    assert statuses["a/seed-0"].state == "finished"
    assert statuses["a/seed-0"].metric == 0.5 and statuses["a/seed-0"].test["hits@1"] == 0.3
    assert statuses["a/seed-0"].epochs == (2, 3)
    assert statuses["b/seed-0"].state == "running" and statuses["b/seed-0"].metric == 0.2
    assert statuses["c/seed-0"].state == "interrupted"  # its process is gone
    assert statuses["d/seed-0"].state == "failed" and "nan" in statuses["d/seed-0"].error
    assert statuses["e/seed-0"].state == "failed"
    assert "unreadable results" in statuses["e/seed-0"].error
    assert statuses["f/seed-0"].state == "failed" and "not valid JSON" in statuses["f/seed-0"].error
    assert statuses["g/seed-0"].state == "pending"


# ------------------------------------------------------------------------- bad inputs on disk

WRONG_SHAPES = [
    ("[1, 2]", "a list"),
    ('"finished"', "the string 'finished'"),
    ("42", "the number 42"),
    ("null", "null"),
    ("true", "true"),
]


@pytest.mark.parametrize(("text", "found"), WRONG_SHAPES)
def test_json_of_another_shape_than_an_object_is_named(tmp_path, text, found):
    (tmp_path / "x.json").write_text(text)
    read_json(tmp_path / "x.json")  # valid JSON: only the shape is wrong
    with pytest.raises(
        ExperimentError, match=rf"x.json: expected a JSON object {{...}}, found {found}"
    ):
        read_json_object(tmp_path / "x.json")


GOOD_EXPERIMENT = {"name": "e", "kind": "ablation", "metric": "valid.clean.mrr", "mode": "max"}


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (42, r"experiment.json: expected a JSON object \{...\}, found the number 42"),
        ([], r"experiment.json: expected a JSON object \{...\}, found a list"),
        ({"name": "e"}, r"experiment.json: key 'kind' is missing"),
        ({**GOOD_EXPERIMENT, "metric": 3}, r"experiment.json: metric: expected text"),
        ({**GOOD_EXPERIMENT, "metric": "mrr"}, r"metric: expected SPLIT.PROTOCOL.MEASURE"),
        ({**GOOD_EXPERIMENT, "mode": "up"}, r"mode: expected max or min, found 'up'"),
        ({**GOOD_EXPERIMENT, "seeds": 3}, r"seeds: expected a list of seeds"),
        ({**GOOD_EXPERIMENT, "parents": [1]}, r"parents: expected a list of experiment folders"),
        ({**GOOD_EXPERIMENT, "resources": []}, r"resources: expected an object, found a list"),
    ],
)
def test_a_damaged_experiment_json_is_an_error_naming_file_and_key(tmp_path, content, message):
    write_json(tmp_path / "experiment.json", content)
    with pytest.raises(ExperimentError, match=message):
        read_experiment(tmp_path)


def test_a_good_experiment_json_is_read(tmp_path):
    write_json(tmp_path / "experiment.json", {**GOOD_EXPERIMENT, "parents": ["/x/y"]})
    assert read_experiment(tmp_path)["parents"] == ["/x/y"]


@pytest.mark.parametrize(
    ("status", "results", "message"),
    [
        ("[]", None, r"status.json: expected a JSON object \{...\}, found a list"),
        ('"finished"', None, r"status.json: expected a JSON object.*found the string 'finished'"),
        ('{"state": 3}', None, r"status.json: state: expected text, found the number 3"),
        ('{"state": "running", "attempts": 5}', None, r"attempts: expected a list of attempts"),
        ('{"state": "finished", "error": ["x"]}', None, r"error: expected text, found a list"),
        ('{"state": "finished"}', "[1, 2]", r"unreadable results: .*results.json: expected a JSON"),
        ('{"state": "finished"}', '{"valid": []}', r"results.json: no valid.clean.mrr"),
        (
            '{"state": "finished"}',
            '{"valid": {"clean": {"mrr": "high"}}}',
            r"results.json: valid.clean.mrr: expected a number, found the string 'high'",
        ),
    ],
)
def test_a_run_with_files_of_the_wrong_shape_is_failed_not_fatal(
    tmp_path, status, results, message
):
    run = tmp_path / "runs" / "a" / "seed-0"
    run.mkdir(parents=True)
    (run / "status.json").write_text(status)
    if results is not None:
        (run / "results.json").write_text(results)
    # A line of another shape (a kill mid-write can leave anything) is skipped, not fatal.
    (run / "metrics.jsonl").write_text(
        '[1]\n"x"\n{"stage": 1, "epoch": 2, "valid.clean.mrr": "?"}\n'
    )
    (listed,) = read_statuses(tmp_path, "valid.clean.mrr")
    assert listed.state == "failed"
    assert re.search(message, listed.error), listed.error
    assert listed.metric is None


@pytest.mark.parametrize("storage", ["", "  ", "file://"])
def test_an_empty_storage_is_refused_not_taken_as_the_current_directory(storage):
    with pytest.raises(ExperimentError, match=r"--storage .* is empty: give a folder"):
        resolve_storage(storage)


def test_a_storage_that_is_a_file_is_refused_naming_it(tmp_path, monkeypatch):
    file = tmp_path / "notes.txt"
    file.write_text("x")
    with pytest.raises(ExperimentError, match=rf"{file} is a file, not a folder"):
        resolve_storage(str(file))
    with pytest.raises(ExperimentError, match=rf"{file} is a file, not a folder"):
        resolve_storage(f"file://{file}")
    monkeypatch.setenv("DIFFCOM_STORAGE", str(file))
    with pytest.raises(ExperimentError, match=rf"storage: {file} is a file"):
        resolve_storage(None)
    assert resolve_storage(str(tmp_path / "new")) == tmp_path / "new"  # created at launch


@pytest.mark.parametrize("occupant", ["folder", "file"])
def test_a_taken_name_that_is_no_experiment_gets_a_hint_that_fits(tmp_path, occupant):
    path = tmp_path / "taken"
    if occupant == "folder":
        path.mkdir()
        (path / "something").write_text("x")
    else:
        path.write_text("x")
    with pytest.raises(ExperimentError) as error:
        experiment_dir(tmp_path, "taken", must_exist=False)
    message = str(error.value)
    assert f"{path} already exists and is a {occupant}, not an experiment" in message
    assert "choose another name, or remove it" in message
    assert "resume" not in message and "extend" not in message  # they cannot use it
    with pytest.raises(ExperimentError, match=r"exists but has no experiment.json"):
        experiment_dir(tmp_path, "taken", must_exist=True)


# ----------------------------------------------------------- shared stage 1, progress and ETA


def _stage1_run(experiment, key, epochs, trained_by, mtime):
    """A shared stage-1 folder whose run has finished ``epochs`` epochs, trained by a trial."""
    folder = experiment / "stage1" / key
    folder.mkdir(parents=True)
    (folder / "events.jsonl").write_text(
        json.dumps({"event": "training", "trial": trained_by, "precise_time": 1.0}) + "\n"
    )
    metrics = folder / "run" / "metrics.jsonl"
    metrics.parent.mkdir()
    metrics.write_text(
        "".join(
            json.dumps({"stage": 1, "epoch": e, "train_seconds": 3.0}) + "\n"
            for e in range(1, epochs + 1)
        )
    )
    os.utime(metrics, (mtime, mtime))


def test_a_run_waiting_for_a_shared_stage1_shows_that_runs_epoch_and_heartbeat(tmp_path):
    here, key = socket.gethostname(), "0123456789abcdef"
    running = {"state": "running", "host": here, "pid": os.getpid()}
    started = {"attempts": [{"started": "2030-01-01T00:00:00+00:00"}]}
    for trial in ("a/seed-0", "b/seed-0"):
        _run(
            tmp_path,
            trial,
            {**running, **started, "stage1": {"key": key, "trial": trial, "epochs": 200}},
        )
    # 2030-01-01T00:05:00Z: fresher than the waiting trials' own start time.
    _stage1_run(tmp_path, key, epochs=23, trained_by="a/seed-0", mtime=1893456300)
    # Once the trial has its stage-1 checkpoint, its own epochs are its progress again.
    _run(
        tmp_path,
        "c/seed-0",
        {**running, "stage1": {"key": key, "checkpoint": "x/last.pt"}},
        [{"stage": 2, "epoch": 1}],
    )

    statuses = {s.name: s for s in read_statuses(tmp_path, "valid.clean.mrr")}
    trainer, waiting = statuses["a/seed-0"], statuses["b/seed-0"]
    assert trainer.stage1.training and not waiting.stage1.training
    assert waiting.state == "running" and waiting.stage1.key == key
    assert (waiting.stage1.epoch, waiting.stage1.epochs) == (23, 200)
    assert waiting.heartbeat == waiting.stage1.heartbeat == "2030-01-01T00:05:00+00:00"
    assert eta_seconds(waiting) == (200 - 23) * 3.0
    assert statuses["c/seed-0"].stage1 is None and statuses["c/seed-0"].epochs == (2, 1)


def test_the_eta_is_the_runs_epochs_left_at_its_wall_rate_so_far(tmp_path):
    here = socket.gethostname()
    attempt = {"started": "2030-01-01T00:00:00+00:00", "first_epoch": "2030-01-01T00:01:00+00:00"}
    status = {"state": "running", "host": here, "pid": os.getpid()}
    # Four stage-2 epochs, the first at 00:01:00, the fourth at 00:01:30: 10 s an epoch.
    _run(
        tmp_path,
        "a/seed-0",
        {
            **status,
            "heartbeat": "2030-01-01T00:01:30+00:00",
            "attempts": [{**attempt, "epochs": 4}],
        },
        [{"stage": 2, "epoch": e, "valid.clean.mrr": m} for e, m in ((1, 0.2), (3, 0.5), (4, 0.4))],
    )
    write_json(
        tmp_path / "runs" / "a" / "seed-0" / "trial.json",
        {"config": {"train": {"stage1_epochs": 5, "stage2_epochs": 10}}},
    )
    # One epoch so far: its training seconds are the rate; still on its own stage 1.
    _run(
        tmp_path,
        "b/seed-0",
        {**status, "attempts": [{**attempt, "epochs": 1}]},
        [{"stage": 1, "epoch": 1, "train_seconds": 2.0}],
    )
    (tmp_path / "runs" / "b" / "seed-0" / "config.json").write_text(
        json.dumps({"train": {"stage1_epochs": 5, "stage2_epochs": 10}})
    )
    _run(tmp_path, "c/seed-0", status)  # no epoch yet, no config: unknown

    statuses = {s.name: s for s in read_statuses(tmp_path, "valid.clean.mrr", mode="max")}
    assert statuses["a/seed-0"].planned == (5, 10)
    assert statuses["a/seed-0"].seconds_per_epoch == 10.0
    assert eta_seconds(statuses["a/seed-0"]) == 60.0
    assert statuses["a/seed-0"].best == 0.5 and statuses["a/seed-0"].metric == 0.4
    assert eta_seconds(statuses["b/seed-0"]) == (4 + 10) * 2.0
    assert eta_seconds(statuses["c/seed-0"]) is None
    (low,) = [s for s in read_statuses(tmp_path, "valid.clean.mrr", mode="min") if s.best == 0.2]
    assert low.name == "a/seed-0"
