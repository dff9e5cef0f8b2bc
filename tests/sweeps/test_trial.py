"""A trial without Ray: stage-1 reuse, reports, provenance, failures and restarts."""

import json

import pytest

from core.config import load_config
from sweeps import trial as trial_module
from sweeps.experiment import read_json, read_statuses, write_json
from sweeps.stage1 import Stage1Store, stage1_key
from sweeps.trial import NON_FINITE, RunSpec, TrialFailed, flatten_results, run_trial
from tests.smoke import SMOKE

DIVERGING = ["train.lr_stage1=10.0", "train.weight_decay=10.0", "train.warmup_fraction=0.0"]


@pytest.fixture
def experiment(tmp_path):
    write_json(
        tmp_path / "experiment.json",
        {"name": "unit", "kind": "ablation", "metric": "valid.clean.mrr", "mode": "max"},
    )
    return tmp_path


def test_two_seeds_of_a_point_with_shared_stage1_and_every_report(experiment):
    runs = [
        RunSpec(f"search/p/seed-{seed}", load_config(overrides=[*SMOKE, f"seed={seed}"]))
        for seed in (0, 1)
    ]
    reports = []
    summary = run_trial(experiment, "search/p", runs, reports.append)
    epochs = [m for m in reports if not m["final"]]
    finals = [m for m in reports if m["final"]]
    # Each seed trains its shared stage-1 run here, so the trial reports those epochs too, then
    # its own stage 2; global_epoch runs on.
    assert [(m["seed"], m["stage"], m["epoch"], m["global_epoch"]) for m in epochs] == [
        (0, 1, 1, 1),
        (0, 1, 2, 2),
        (0, 2, 1, 3),
        (0, 2, 2, 4),
        (1, 1, 1, 1),
        (1, 1, 2, 2),
        (1, 2, 1, 3),
        (1, 2, 2, 4),
    ]
    assert [m.get("stage1_shared", False) for m in epochs] == [True, True, False, False] * 2
    assert [f["runs_finished"] for f in finals] == [1, 2]
    per_seed = [
        read_json(experiment / "runs" / spec.name / "results.json")["valid"]["clean"]["mrr"]
        for spec in runs
    ]
    assert summary["valid.clean.mrr"] == pytest.approx(sum(per_seed) / 2)

    provenance = read_json(experiment / "runs" / "search/p/seed-1" / "trial.json")
    assert provenance["seed"] == 1 and provenance["config"]["seed"] == 1
    assert provenance["dataset"] == "nations" and len(provenance["dataset_hash"]) >= 16
    assert provenance["code"]["revision"] and provenance["packages"]["torch"]
    status = read_json(experiment / "runs" / "search/p/seed-0" / "status.json")
    assert status["state"] == "finished" and status["stage1"]["reused"] is False
    events = [e["event"] for e in Stage1Store(experiment / "stage1").events()]
    assert events == ["training", "trained", "training", "trained"]  # seeds differ: two keys

    # Asked again (a restarted trial), finished runs are read back, not retrained.
    reports.clear()
    again = run_trial(experiment, "search/p", runs, reports.append)
    assert reports == [] and again["valid.clean.mrr"] == summary["valid.clean.mrr"]


def test_a_nan_run_fails_with_its_reason_and_is_not_retried(experiment, monkeypatch):
    runs = [RunSpec("ablation/diverging/seed-0", load_config(overrides=[*SMOKE, *DIVERGING]))]
    with pytest.raises(TrialFailed, match=r"loss is nan"):
        run_trial(experiment, "ablation/diverging/seed-0", runs, lambda metrics: None)
    status = read_json(experiment / "runs" / "ablation/diverging/seed-0" / "status.json")
    assert status["state"] == "failed" and status["failure"] == NON_FINITE
    assert "loss is nan" in status["error"]

    def must_not_train(*args, **kwargs):
        raise AssertionError("a NaN run was trained again")

    monkeypatch.setattr(trial_module, "train", must_not_train)
    with pytest.raises(TrialFailed, match=r"not retried: it would repeat"):
        run_trial(experiment, "ablation/diverging/seed-0", runs, lambda metrics: None)


def test_other_errors_are_recorded_and_the_run_retried(experiment, monkeypatch):
    runs = [RunSpec("ablation/full/seed-0", load_config(overrides=SMOKE))]
    real_train = trial_module.train
    calls = []

    def flaky(config, folder, **kwargs):
        calls.append(folder)
        if len(calls) == 2:  # after the shared stage 1: the trial's own run
            raise OSError("disk full")
        return real_train(config, folder, **kwargs)

    monkeypatch.setattr(trial_module, "train", flaky)
    with pytest.raises(TrialFailed, match=r"OSError: disk full"):
        run_trial(experiment, "ablation/full/seed-0", runs, lambda metrics: None)
    status = read_json(experiment / "runs" / "ablation/full/seed-0" / "status.json")
    assert status["state"] == "failed" and status["failure"] == "OSError"
    assert "Traceback" in status["traceback"]
    run_trial(experiment, "ablation/full/seed-0", runs, lambda metrics: None)
    status = read_json(experiment / "runs" / "ablation/full/seed-0" / "status.json")
    assert status["state"] == "finished" and len(status["attempts"]) == 2


def test_a_restarted_trial_continues_from_its_run_folder(experiment):
    runs = [RunSpec("ablation/full/seed-0", load_config(overrides=SMOKE))]

    class Stop(Exception):
        pass

    def stop_after_first_own_epoch(metrics):
        if metrics["stage"] == 2:  # the run's checkpoint now holds stage 2, epoch 1
            raise Stop

    with pytest.raises(TrialFailed):
        run_trial(experiment, "t", runs, stop_after_first_own_epoch)
    reports = []
    run_trial(experiment, "t", runs, reports.append)  # what Tune's retry or `resume` calls
    status = read_json(experiment / "runs" / "ablation/full/seed-0" / "status.json")
    assert [a["resumed_from"] for a in status["attempts"]] == [None, [2, 1]]
    assert [(m["stage"], m["epoch"]) for m in reports if not m["final"]] == [(2, 2)]
    assert reports[-1]["final"] and reports[-1]["global_epoch"] == 4


def test_flatten_results_names_split_protocol_and_measure():
    results = {
        "valid": {"clean": {"mrr": 0.5}, "clean_all": {"x": 1}, "inference_ms_per_query": 2.0},
        "test": {"clean": {"mrr": 0.4}, "official-min-of-20": {"mrr": 0.9}},
        "timings": {"train_seconds": 3.0},
    }
    assert flatten_results(results) == {
        "valid.clean.mrr": 0.5,
        "valid.inference_ms_per_query": 2.0,
        "test.clean.mrr": 0.4,
        "test.official-min-of-20.mrr": 0.9,
        "train_seconds": 3.0,
    }
    assert json.dumps(flatten_results(results))


def test_the_shared_stage1_key_is_recorded_before_stage1_trains(experiment, monkeypatch):
    seen = []

    def stage1_then_stop(config, folder, **options):
        # Inside the shared stage 1: the trial's status must already point at this run.
        (folder / "metrics.jsonl").parent.mkdir(parents=True, exist_ok=True)
        (folder / "metrics.jsonl").write_text('{"stage": 1, "epoch": 1, "train_seconds": 1.0}\n')
        seen.extend(read_statuses(experiment, "valid.clean.mrr"))
        raise RuntimeError("stopped here")

    monkeypatch.setattr(trial_module, "train", stage1_then_stop)
    spec = RunSpec("ablation/full/seed-0", load_config(overrides=SMOKE))
    with pytest.raises(TrialFailed, match="stopped here"):
        run_trial(experiment, "ablation/full/seed-0", [spec], lambda metrics: None)
    (status,) = seen
    assert status.stage1.key == stage1_key(spec.config) and status.stage1.training
    assert (status.stage1.epoch, status.stage1.epochs) == (1, spec.config.train.stage1_epochs)
