"""Experiment folders without Ray: names, storage, provenance helpers and the status listing."""

import json
import os
import socket
import subprocess
import sys

import pytest

from sweeps.experiment import (
    ExperimentError,
    check_name,
    experiment_dir,
    read_json,
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
    with pytest.raises(ExperimentError, match=r"s3:// storage is not supported; mount it"):
        resolve_storage("s3://bucket/experiments")


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
