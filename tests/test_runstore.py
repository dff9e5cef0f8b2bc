"""The declared on-disk format: every file kind round-trips, versions are checked, writes are
atomic, one flatten, one storage default."""

import json
import os
from pathlib import Path

import pytest

import runstore as store
from runstore import StoreError

# One realistic object per JSON kind (as the trainer, the trial runner and the sweeps write them).
JSON_SAMPLES = {
    store.CONFIG: {"seed": 3, "data": {"dataset": "nations"}, "model": {"hidden_dim": 32}},
    store.RESULTS: {
        "dataset": "nations",
        "final_stage": 2,
        "valid": {"clean": {"mrr": 0.5, "hits@1": 0.25}, "inference_ms_per_query": 1.5},
        "timings": {"train_seconds": 12.0},
    },
    store.STATUS: {"state": "finished", "seed": 0, "attempts": [{"started": "t"}], "error": None},
    store.TRIAL: {"experiment": "e", "trial": "t", "config": {"seed": 0}, "host": "h"},
    store.POINT: {"diffusion.steps": 50, "loss.w_kl": 0.1},
    store.EXPERIMENT: {"name": "e", "kind": "ablation", "metric": "valid.clean.mrr", "mode": "max"},
    store.PLAN: {"trials": {"ablation/full/seed-0": {"seed": 0}}},
    store.DONE: {"checkpoint": "/x/last.pt", "seconds": 1.5, "trained_by": "t"},
    store.TRACKING: {"mlflow": {"uri": "http://h:5000", "run_id": "abc"}, "last_step": {}},
}
JSONL_SAMPLES = {
    store.METRICS: [{"stage": 1, "epoch": 1, "loss": 0.7}, {"stage": 1, "epoch": 2, "loss": 0.6}],
    store.EVENTS: [{"time": "t", "precise_time": 1.0, "event": "trained", "trial": "a"}],
}


def test_every_kind_is_declared_once_with_its_own_file_name():
    assert set(store.KINDS) == set(JSON_SAMPLES) | set(JSONL_SAMPLES)
    assert len({kind.file for kind in store.KINDS}) == len(store.KINDS)
    for kind in store.KINDS:
        assert store.kind_of(Path("/some/run") / kind.file) is kind
    assert store.kind_of("notes.json") is None


@pytest.mark.parametrize("kind", list(JSON_SAMPLES), ids=lambda kind: kind.file)
def test_every_json_kind_round_trips_with_its_version(tmp_path, kind):
    data = JSON_SAMPLES[kind]
    path = tmp_path / "run" / kind.file
    store.write_json(path, data, kind)
    assert store.read_json(path, kind) == data
    on_disk = json.loads(path.read_text())
    if kind.version is None:  # config.json holds the config alone (the module docstring says why)
        assert on_disk == data
    else:
        assert on_disk == {"format_version": kind.version, **data}
        assert next(iter(on_disk)) == "format_version"  # first, where a reader looks
    assert sorted(p.name for p in path.parent.iterdir()) == [kind.file]  # no temporary left


@pytest.mark.parametrize("kind", list(JSONL_SAMPLES), ids=lambda kind: kind.file)
def test_every_jsonl_kind_round_trips(tmp_path, kind):
    path = tmp_path / kind.file
    for record in JSONL_SAMPLES[kind]:
        store.append_jsonl(path, record)
    read = store.read_jsonl(path, kind)
    assert [line.value for line in read.lines] == JSONL_SAMPLES[kind]
    assert all(line.complete for line in read.lines) and read.count == len(JSONL_SAMPLES[kind])
    store.write_jsonl(path, JSONL_SAMPLES[kind][:1])
    assert [line.value for line in store.read_jsonl(path, kind).lines] == JSONL_SAMPLES[kind][:1]


def test_binary_files_are_named_by_the_store(tmp_path):
    assert store.checkpoint_path(tmp_path) == tmp_path / "checkpoints" / "last.pt"
    assert store.ranks_file("test") == "ranks_test.npz"
    store.atomic_write_bytes(store.checkpoint_path(tmp_path), b"state")
    assert store.checkpoint_path(tmp_path).read_bytes() == b"state"


def test_a_newer_major_version_is_refused_naming_the_file_and_both_versions(tmp_path):
    path = tmp_path / "results.json"
    path.write_text(json.dumps({"format_version": "2.0", "valid": {}}))
    with pytest.raises(StoreError) as caught:
        store.read_json(path, store.RESULTS)
    message = str(caught.value)
    assert message.startswith(f"{path}: format_version 2.0 is newer than this code reads")
    assert "results.json up to major 1, version 1.1" in message
    assert isinstance(caught.value, ValueError)  # the CLI prints it as one line


def test_a_newer_major_version_on_a_jsonl_line_names_the_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"stage": 1, "epoch": 1}\n{"format_version": "3.1", "stage": 1}\n')
    with pytest.raises(StoreError, match=rf"{path}:2: format_version 3.1 is newer"):
        store.read_jsonl(path, store.METRICS)


@pytest.mark.parametrize("version", ["1.0", "1.7", "1", 1, "0.9", None])
def test_older_same_major_and_missing_versions_are_read(tmp_path, version):
    path = tmp_path / "status.json"
    data = {"state": "running"} | ({} if version is None else {"format_version": version})
    path.write_text(json.dumps(data))
    assert store.read_json(path, store.STATUS) == {"state": "running"}


@pytest.mark.parametrize("version", ["one", "1.x", "", True, [1]])
def test_a_version_that_is_not_one_is_named(tmp_path, version):
    path = tmp_path / "status.json"
    path.write_text(json.dumps({"format_version": version}))
    with pytest.raises(StoreError, match=r"status\.json: format_version .* is not a version"):
        store.read_json(path, store.STATUS)


@pytest.mark.parametrize(
    ("text", "found"),
    [
        ("[1, 2]", "a list"),
        ('"done"', "the string 'done'"),
        ("42", "the number 42"),
        ("null", "null"),
    ],
)
def test_a_file_that_is_not_an_object_is_refused(tmp_path, text, found):
    path = tmp_path / "experiment.json"
    path.write_text(text)
    with pytest.raises(StoreError) as caught:
        store.read_json(path, store.EXPERIMENT)
    assert str(caught.value) == f"{path}: expected a JSON object {{...}}, found {found}"
    assert store.load_json(path) == json.loads(text)  # the shape-blind reader takes it


def test_missing_and_broken_files_are_named(tmp_path):
    with pytest.raises(StoreError, match=r"gone\.json: missing") as caught:
        store.read_json(tmp_path / "gone.json", None)
    assert caught.value.reason == "missing" and caught.value.path == str(tmp_path / "gone.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(StoreError, match=r"bad\.json: not valid JSON \(Expecting") as caught:
        store.read_json(tmp_path / "bad.json", None)
    assert caught.value.cause.startswith("Expecting property name")


def test_jsonl_lines_cut_by_a_kill_are_kept_marked_not_fatal(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"stage": 1, "epoch": 1}\n\n[1, 2]\n{"stage": 1, "ep')
    read = store.read_jsonl(path, store.METRICS)
    assert [(line.number, line.complete) for line in read.lines] == [
        (1, True),
        (3, True),
        (4, False),
    ]
    assert read.lines[1].value == [1, 2] and read.count == 4


def test_a_failed_write_leaves_the_old_file_whole_and_no_temporary(tmp_path):
    path = tmp_path / "last.pt"
    store.atomic_write_bytes(path, b"old state")
    with pytest.raises(RuntimeError, match="killed"), store.atomic_write(path) as stream:
        stream.write(b"half of the new")
        raise RuntimeError("killed mid-write")
    assert path.read_bytes() == b"old state"
    assert os.listdir(tmp_path) == ["last.pt"]


def test_a_json_value_that_cannot_be_written_leaves_the_old_file(tmp_path):
    path = tmp_path / "status.json"
    store.write_json(path, {"state": "running"}, store.STATUS)
    with pytest.raises(ValueError, match="Circular reference"):
        loop: dict = {}
        loop["self"] = loop
        store.write_json(path, {"state": loop}, store.STATUS)
    assert store.read_json(path, store.STATUS) == {"state": "running"}
    assert os.listdir(tmp_path) == ["status.json"]
    store.write_json(path, [1, 2], store.STATUS)  # a damaged file, as tests make them
    with pytest.raises(StoreError, match="found a list"):
        store.read_json(path, store.STATUS)


def test_temporary_names_are_recognised_and_nothing_else(tmp_path, monkeypatch):
    seen = []
    replace = os.replace
    monkeypatch.setattr(
        store.os,
        "replace",
        lambda source, target: (seen.append(Path(source).name), replace(source, target)),
    )
    store.atomic_write_bytes(tmp_path / "results.json", b"{}")
    assert len(seen) == 1 and store.is_temporary(seen[0])
    assert not store.is_temporary(".hidden.tmp") and not store.is_temporary("results.json")


def test_a_written_version_replaces_one_the_data_carried(tmp_path):
    path = tmp_path / "status.json"
    store.write_json(path, {"format_version": "0.1", "state": "x"}, store.STATUS)
    assert json.loads(path.read_text()) == {"format_version": store.STATUS.version, "state": "x"}


def test_flatten_joins_nested_keys_and_keeps_leaves():
    tree = {"a": {"b": 1, "c": {"d": [1, 2]}}, "e": None, "empty": {}}
    assert store.flatten(tree) == {"a.b": 1, "a.c.d": [1, 2], "e": None}
    assert store.flatten(tree, "config.") == {
        "config.a.b": 1,
        "config.a.c.d": [1, 2],
        "config.e": None,
    }
    assert store.flatten({"a": {"b": 1}}, separator="/") == {"a/b": 1}
    assert store.flatten({}) == {}


def test_flatten_results_names_split_protocol_and_measure():
    results = JSON_SAMPLES[store.RESULTS] | {
        "test": {"clean": {"mrr": 0.4}, "clean_all": {"per_relation": {"r": 1}}}
    }
    assert store.flatten_results(results) == {
        "valid.clean.mrr": 0.5,
        "valid.clean.hits@1": 0.25,
        "valid.inference_ms_per_query": 1.5,
        "test.clean.mrr": 0.4,
        "train_seconds": 12.0,
    }


def test_default_storage_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("DIFFCOM_STORAGE", str(tmp_path / "experiments"))
    assert store.default_storage() == tmp_path / "experiments"
    monkeypatch.setenv("DIFFCOM_STORAGE", "~/elsewhere")
    assert store.default_storage() == Path.home() / "elsewhere"
    monkeypatch.delenv("DIFFCOM_STORAGE")
    assert store.default_storage() == Path.home() / "diffcom-experiments"
