"""The tidy frame against the files it was read from; damaged, partial and empty folders."""

import json
import shutil
import subprocess
import sys

import pytest

from analysis.load import MEASURES, load_experiments


def _results(run_dir):
    return json.loads((run_dir / "results.json").read_text())


def test_one_row_per_run_split_and_protocol_with_the_files_values(ablation_experiment):
    loaded = load_experiments([ablation_experiment])
    frame = loaded.frame
    assert loaded.problems == []
    runs = sorted(p.parent for p in (ablation_experiment / "runs").glob("**/results.json"))
    assert len(runs) == 6 and frame["run"].nunique() == 6
    for run_dir in runs:
        results = _results(run_dir)
        name = run_dir.relative_to(ablation_experiment / "runs").as_posix()
        for split in ("valid", "test"):
            protocols = [
                p for p, v in results[split].items() if isinstance(v, dict) and p != "clean_all"
            ]
            rows = frame[(frame["run"] == name) & (frame["split"] == split)]
            assert sorted(rows["protocol"]) == sorted(protocols)
            for protocol in protocols:
                row = rows[rows["protocol"] == protocol].iloc[0]
                for measure in MEASURES:
                    assert row[measure] == pytest.approx(results[split][protocol][measure])
    full = frame[(frame["cell"] == "full") & (frame["seed"] == 1)].iloc[0]
    assert full["config.seed"] == 1 and full["config.diffusion.steps"] == 5
    assert full["finished"] and full["state"] == "finished" and full["dataset"] == "nations"
    assert set(frame[frame["protocol"].str.startswith("official")]["protocol_kind"]) == {
        "label-using"
    }
    no_diffusion = frame[frame["cell"] == "no-diffusion"]
    assert not no_diffusion["protocol"].str.startswith("official").any()  # stage 1 only: no chain


def test_best_and_last_epochs_are_both_explicit(ablation_experiment):
    frame = load_experiments([ablation_experiment]).frame
    run_dir = ablation_experiment / "runs" / "ablation" / "full" / "seed-0"
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    last = records[-1]
    final = [r for r in records if r["stage"] == last["stage"]]
    best = max(final, key=lambda r: r["valid.clean.mrr"])
    row = frame[(frame["run"] == "ablation/full/seed-0")].iloc[0]
    assert (row["last_stage"], row["last_epoch"]) == (last["stage"], last["epoch"])
    assert row["best_epoch"] == best["epoch"]
    assert row["valid_mrr_best_epoch"] == pytest.approx(best["valid.clean.mrr"])
    assert row["valid_mrr_last_epoch"] == pytest.approx(last["valid.clean.mrr"])
    assert _results(run_dir)["best_epochs"]["stage2"] == best["epoch"]


def test_partial_damaged_and_empty_folders_are_reported_not_fatal(ablation_experiment, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(ablation_experiment, copy)
    running = copy / "runs" / "ablation" / "full" / "seed-1"
    (running / "results.json").unlink()
    status = json.loads((running / "status.json").read_text())
    (running / "status.json").write_text(json.dumps({**status, "state": "running"}))
    (copy / "runs" / "ablation" / "no-mgat" / "seed-0" / "status.json").write_text("{broken")
    gone = copy / "runs" / "ablation" / "no-mgat" / "seed-1"
    (gone / "results.json").write_text("")
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "experiment.json").write_text(json.dumps({"name": "empty", "kind": "ablation"}))
    not_an_experiment = tmp_path / "nothing"
    not_an_experiment.mkdir()

    loaded = load_experiments([copy, empty, not_an_experiment])
    frame = loaded.frame
    reasons = dict(loaded.problems)
    assert "unreadable" in reasons[str(copy / "runs/ablation/no-mgat/seed-0/status.json")]
    assert "unreadable" in reasons[str(gone / "results.json")]
    assert reasons[str(empty)] == "no runs yet (empty experiment)"
    assert reasons[str(not_an_experiment / "experiment.json")] == "missing"
    unfinished = frame[frame["run"] == "ablation/full/seed-1"]
    assert len(unfinished) == 1 and not unfinished["finished"].iloc[0]
    assert unfinished["state"].iloc[0] == "running" and unfinished["split"].iloc[0] == "valid"
    assert frame[frame["run"] == "ablation/no-mgat/seed-1"]["state"].iloc[0] == "damaged"
    assert "ablation/no-mgat/seed-0" not in set(frame["run"])


def test_nothing_readable_gives_an_empty_frame_with_columns(tmp_path):
    loaded = load_experiments([tmp_path])
    assert loaded.frame.empty and "mrr" in loaded.frame.columns and loaded.problems


def test_analysis_imports_neither_core_nor_ray():
    code = (
        "import sys, analysis.report, analysis.cli; "
        "bad = [m for m in sys.modules if m.split('.')[0] in ('core', 'ray', 'sweeps', 'torch')]; "
        "print(bad); sys.exit(1 if bad else 0)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


def test_a_run_on_a_shared_stage1_takes_its_best_epoch_from_the_trainer(ablation_experiment):
    frame = load_experiments([ablation_experiment]).frame
    run_dir = ablation_experiment / "runs" / "ablation" / "no-diffusion" / "seed-0"
    row = frame[frame["run"] == "ablation/no-diffusion/seed-0"].iloc[0]
    assert row["final_stage"] == 1
    assert row["best_epoch"] == _results(run_dir)["best_epochs"]["stage1"]
