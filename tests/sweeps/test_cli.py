"""``diffcom sweep`` arguments and output, without Ray (the Ray runs: ``test_ray_adapter.py``)."""

import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from diffcom.cli import build_parser, main
from sweeps import cli, ray_adapter
from sweeps.experiment import ExperimentError, write_json

STUDIES = Path(__file__).parent / "studies"


def test_launch_parses_repeated_set_in_order():
    args = build_parser().parse_args(
        ["sweep", "launch", "s.yaml", "--set", "data.dataset=nations", "--set", "loss.w_kl=0.5"]
    )
    assert args.overrides == ["data.dataset=nations", "loss.w_kl=0.5"]
    assert build_parser().parse_args(["sweep", "launch", "s.yaml"]).overrides == []


def test_launch_passes_the_sets_to_the_adapter(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(
        ray_adapter, "launch", lambda study, **options: calls.append((study, options)) or tmp_path
    )
    monkeypatch.setattr(cli, "_finish", lambda folder: 0)
    argv = ["sweep", "launch", "s.yaml", "--set", "a.b=1", "--name", "x", "--set", "c.d=two"]
    assert main(argv) == 0
    assert calls == [
        (
            "s.yaml",
            {
                "overrides": ("a.b=1", "c.d=two"),
                "name": "x",
                "storage": None,
                "address": None,
                "optuna_storage": None,
                "mlflow": None,
                "tensorboard": None,
                "checkpoint_every": None,
            },
        )
    ]
    argv = ["sweep", "launch", "s.yaml", "--storage", "s3://b-1/x", "--checkpoint-every", "4"]
    assert main(argv) == 0
    assert calls[-1][1]["checkpoint_every"] == 4 and calls[-1][1]["storage"] == "s3://b-1/x"


def test_a_bad_set_exits_2_naming_it_before_anything_starts(tmp_path, capsys):
    study = STUDIES / "smoke-sensitivity.yaml"
    argv = ["sweep", "launch", str(study), "--set", "diffusion.stepz=3", "--storage", str(tmp_path)]
    assert main(argv) == 2
    error = capsys.readouterr().err
    assert f"{study}: --set diffusion.stepz=3: unknown config key diffusion.stepz" in error
    assert "did you mean diffusion.steps?" in error
    assert not list(tmp_path.iterdir())


def test_status_shows_the_launch_overrides(tmp_path, capsys):
    experiment = tmp_path / "nations-run"
    write_json(
        experiment / "experiment.json",
        {
            "name": "nations-run",
            "kind": "ablation",
            "metric": "valid.clean.mrr",
            "mode": "max",
            "launch_overrides": ["data.dataset=nations", "train.lr_stage1=1.0e-3"],
        },
    )
    write_json(experiment / "plan.json", {"trials": {"ablation/full/seed-0": {}}})
    assert main(["sweep", "status", "nations-run", "--storage", str(tmp_path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "launched with: --set data.dataset=nations --set train.lr_stage1=1.0e-3" in lines
    assert "runs: 1 pending" in lines


# ------------------------------------------------------------------- bad inputs, without Ray


@pytest.fixture
def no_ray(monkeypatch):
    """Fail the test if Ray would start: every refusal below must come before it."""

    def start(address):
        raise AssertionError("Ray started")

    monkeypatch.setattr(ray_adapter, "_start_ray", start)


def _error_line(capsys) -> str:
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and error[0].startswith("diffcom: error: "), error  # one line
    return error[0]


def _experiment(storage: Path, name: str = "exp") -> Path:
    folder = storage / name
    write_json(
        folder / "experiment.json",
        {"name": name, "kind": "ablation", "metric": "valid.clean.mrr", "mode": "max"},
    )
    write_json(folder / "plan.json", {"trials": {"ablation/full/seed-0": {}}})
    return folder


@pytest.mark.parametrize(
    ("file", "text", "message"),
    [
        (
            "experiment.json",
            "42",
            "experiment.json: expected a JSON object {...}, found the number",
        ),
        ("experiment.json", "[]", "experiment.json: expected a JSON object {...}, found a list"),
        ("plan.json", '"x"', "plan.json: expected a JSON object {...}, found the string 'x'"),
        ("plan.json", '{"trials": 3}', "plan.json: trials: expected an object of trial names"),
    ],
)
def test_status_of_a_damaged_experiment_is_one_error_naming_the_file(
    tmp_path, capsys, file, text, message
):
    folder = _experiment(tmp_path)
    (folder / file).write_text(text)
    assert main(["sweep", "status", "exp", "--storage", str(tmp_path)]) == 2
    line = _error_line(capsys)
    assert str(folder / file) in line and message in line


@pytest.mark.parametrize(
    ("status", "reason"),
    [
        ("[]", "status.json: expected a JSON object {...}, found a list"),
        ('"finished"', "status.json: expected a JSON object {...}, found the string 'finished'"),
        ('{"state": ["finished"]}', "status.json: state: expected text, found a list"),
    ],
)
def test_status_lists_a_damaged_run_as_failed_and_goes_on(tmp_path, capsys, status, reason):
    folder = _experiment(tmp_path)
    run = folder / "runs" / "ablation" / "full" / "seed-0"
    run.mkdir(parents=True)
    (run / "status.json").write_text(status)
    assert main(["sweep", "status", "exp", "--storage", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "runs: 1 failed" in out
    (row,) = [line for line in out.splitlines() if line.startswith("ablation/full/seed-0")]
    assert "failed" in row and reason in row


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--name", ""], "--name is empty: give a name, or leave --name out"),
        (["--name", "  "], "--name is empty"),
        (["--name", "../up"], "experiment name '../up' is not allowed"),
        (["--storage", ""], "--storage '' is empty: give a folder"),
        (["--storage", "file://"], "--storage 'file://' is empty"),
    ],
)
def test_launch_refuses_an_empty_name_or_storage_before_ray(
    tmp_path, capsys, no_ray, monkeypatch, argv, message
):
    monkeypatch.chdir(tmp_path)  # an empty storage would have meant this folder
    study = STUDIES / "smoke-sensitivity.yaml"
    assert main(["sweep", "launch", str(study), *argv]) == 2
    assert message in _error_line(capsys)
    assert not list(tmp_path.iterdir())


def test_launch_refuses_a_storage_that_is_a_file_before_ray(tmp_path, capsys, no_ray):
    file = tmp_path / "storage.txt"
    file.write_text("x")
    study = STUDIES / "smoke-sensitivity.yaml"
    assert main(["sweep", "launch", str(study), "--storage", str(file)]) == 2
    assert f"{file} is a file, not a folder" in _error_line(capsys)
    # The adapter itself refuses it too (it is the API the CLI calls), still before Ray.
    with pytest.raises(ExperimentError, match="is a file, not a folder"):
        ray_adapter.launch(study, storage=file)


def test_launch_under_a_taken_name_that_is_no_experiment_says_what_fits(tmp_path, capsys, no_ray):
    (tmp_path / "smoke-sensitivity").mkdir()
    study = STUDIES / "smoke-sensitivity.yaml"
    assert main(["sweep", "launch", str(study), "--storage", str(tmp_path)]) == 2
    line = _error_line(capsys)
    assert "is a folder, not an experiment (no experiment.json)" in line
    assert "choose another name, or remove it" in line and "resume" not in line


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--seeds", "3", "--new-name", ""], "--new-name is empty"),
        (["--seeds", "3", "-1"], "--seeds: negative [-1]; give distinct seeds >= 0"),
        (["--seeds", "3", "3"], "--seeds: repeated [3]; give distinct seeds >= 0"),
    ],
)
def test_extend_refuses_empty_names_and_bad_seeds(tmp_path, capsys, no_ray, argv, message):
    _experiment(tmp_path)
    assert main(["sweep", "extend", "exp", "--storage", str(tmp_path), *argv]) == 2
    assert message in _error_line(capsys)


@pytest.mark.parametrize("verb", ["status", "resume", "extend"])
def test_every_verb_refuses_a_storage_that_is_a_file(tmp_path, capsys, no_ray, verb):
    file = tmp_path / "storage.txt"
    file.write_text("x")
    assert main(["sweep", verb, "exp", "--storage", str(file)]) == 2
    assert f"{file} is a file, not a folder" in _error_line(capsys)


def test_a_study_without_seeds_says_it_trains_seed_0(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(ray_adapter, "launch", lambda study, **options: tmp_path)
    monkeypatch.setattr(cli, "_finish", lambda folder: 0)
    study = STUDIES / "smoke-sensitivity.yaml"
    without = tmp_path / "no-seeds.yaml"
    without.write_text(study.read_text().replace("seeds: [0, 1]\n", ""))
    assert main(["sweep", "launch", str(without)]) == 0
    assert f"note: {without} sets no seeds: every cell trains once, with seed 0" in (
        capsys.readouterr().err
    )
    assert main(["sweep", "launch", str(study)]) == 0
    assert "seeds" not in capsys.readouterr().err


# ------------------------------------------------------------------------------ sweep watch


def _running(folder: Path, run: str, epochs: int) -> Path:
    """A run marked running by this (live) process, with ``epochs`` stage-2 epochs done."""
    path = folder / "runs" / run
    write_json(
        path / "status.json",
        {"state": "running", "host": socket.gethostname(), "pid": os.getpid()},
    )
    (path / "metrics.jsonl").write_text(
        "".join(
            json.dumps({"stage": 2, "epoch": e, "train_seconds": 30.0, "valid.clean.mrr": 0.1 * e})
            + "\n"
            for e in range(1, epochs + 1)
        )
    )
    write_json(path / "trial.json", {"config": {"train": {"stage1_epochs": 2, "stage2_epochs": 6}}})
    return path


def test_watch_once_draws_the_table_and_exits(tmp_path, capsys):
    folder = _experiment(tmp_path)
    _running(folder, "ablation/full/seed-0", epochs=2)
    argv = ["sweep", "watch", "exp", "--once", "--storage", str(tmp_path)]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "\x1b[2J" not in out  # not a terminal: plain tables, no screen clearing
    assert "runs: 1 running" in out
    (row,) = [line for line in out.splitlines() if line.startswith("ablation/full/seed-0")]
    # Two of six stage-2 epochs at 30 s each: four left, two minutes.
    assert row.split()[:5] == ["ablation/full/seed-0", "running", "2:2", "0.2000", "2m"]
    assert "best so far: ablation/full/seed-0 valid.clean.mrr=0.2000 (an epoch" in out
    assert "has ended" not in out


def test_watch_of_a_search_counts_trials_tune_has_not_started(tmp_path, capsys):
    folder = _experiment(tmp_path, "search")
    metadata = {"name": "search", "kind": "search", "metric": "valid.clean.mrr", "mode": "max"}
    write_json(folder / "experiment.json", {**metadata, "search": {"num_samples": 3}})
    write_json(folder / "plan.json", {"base": {}, "space": [], "seeds": [0]})
    run = _running(folder, "search/t1/seed-0", epochs=1)
    write_json(run / "status.json", {"state": "finished"})
    assert main(["sweep", "watch", "search", "--once", "--storage", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "runs: 1 finished, 2 pending" in out and "2 search trial(s) not started yet" in out


def test_watch_exits_by_itself_once_every_run_has_finished(tmp_path, capsys, monkeypatch):

    folder = _experiment(tmp_path)
    run = _running(folder, "ablation/full/seed-0", epochs=1)
    waiting, returned = threading.Event(), []
    sleep = time.sleep

    def noting_sleep(seconds):
        waiting.set()  # the live table is drawn: the watch now waits for its next read
        sleep(seconds)

    def watch():
        argv = ["sweep", "watch", "exp", "--interval", "0.05", "--storage", str(tmp_path)]
        returned.append(main(argv))

    def finish():
        waiting.wait(timeout=60)
        write_json(run / "status.json", {"state": "finished"})

    monkeypatch.setattr(time, "sleep", noting_sleep)
    watcher = threading.Thread(target=watch, daemon=True)
    finisher = threading.Thread(target=finish, daemon=True)
    watcher.start()
    finisher.start()
    watcher.join(timeout=60)  # generous: it takes two reads, a tenth of a second
    assert not watcher.is_alive(), "watch did not exit after every run finished"
    assert returned == [0]
    out = capsys.readouterr().out
    first, last = out.split("runs: ")[1], out.split("runs: ")[-1]
    assert first.startswith("1 running") and last.startswith("1 finished")
    assert out.rstrip().endswith("the experiment has ended")


def test_watch_stops_quietly_with_130_on_ctrl_c(tmp_path, capsys, monkeypatch):

    folder = _experiment(tmp_path)
    _running(folder, "ablation/full/seed-0", epochs=1)

    def interrupted(seconds):
        raise KeyboardInterrupt

    monkeypatch.setattr(time, "sleep", interrupted)
    assert main(["sweep", "watch", "exp", "--storage", str(tmp_path)]) == 130
    captured = capsys.readouterr()
    assert "runs: 1 running" in captured.out and captured.err == ""


def test_watch_reads_files_only_and_never_imports_ray(tmp_path):

    folder = _experiment(tmp_path)
    _running(folder, "ablation/full/seed-0", epochs=1)
    script = (
        "import sys; from diffcom.cli import main; "
        f"code = main(['sweep', 'watch', 'exp', '--once', '--storage', {str(tmp_path)!r}]); "
        "print('ray imported' if 'ray' in sys.modules else 'no ray'); sys.exit(code)"
    )
    done = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=Path(__file__).resolve().parents[2],
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "runs: 1 running" in done.stdout and done.stdout.rstrip().endswith("no ray")


def test_status_and_watch_say_which_pack_a_run_trains_in(tmp_path, capsys):
    folder = _experiment(tmp_path)
    run = folder / "runs" / "ablation/full/seed-0"
    members = ["ablation/full/seed-0", "ablation/k3/seed-0", "ablation/k8/seed-0"]
    write_json(
        run / "status.json",
        {
            "state": "running",
            "host": "another-host",
            "heartbeat": "2026-11-29T10:00:00+00:00",
            "fused": {"pack": "pack/0", "members": members},
            "attempts": [{}],
        },
    )
    assert main(["sweep", "status", "exp", "--storage", str(tmp_path)]) == 0
    row = next(line for line in capsys.readouterr().out.splitlines() if "full/seed-0" in line)
    assert "fused in pack/0 (3 runs); last heartbeat 2026-11-29T10:00:00+00:00" in row
    assert main(["sweep", "watch", "exp", "--storage", str(tmp_path), "--once"]) == 0
    row = next(line for line in capsys.readouterr().out.splitlines() if "full/seed-0" in line)
    assert "fused in pack/0 (3 runs)" in row
