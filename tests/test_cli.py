"""The ``diffcom`` command (``diffcom.cli``): its error policy and ``train --out`` checks.

The per-command behaviour is tested with each package (tests/core/data/test_registry.py,
tests/sweeps/test_cli.py, tests/analysis/test_report.py, tests/core/train/test_trainer.py).
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from core.config import load_config, save_config
from diffcom.cli import main
from tests.smoke import SMOKE

REPO = Path(__file__).resolve().parents[1]
SETS = [part for item in SMOKE for part in ("--set", item)]


def _run(*args) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=120
    )


# ------------------------------------------------------------------------------- error policy


def test_a_project_error_prints_one_line_and_exits_2(tmp_path, capsys):
    assert main(["data", "check", str(tmp_path / "missing")]) == 2
    error = capsys.readouterr().err
    assert error.startswith("diffcom: error: ")
    assert "neither a known name" in error
    assert error.count("\n") == 1  # one line, no traceback


def test_debug_prints_the_traceback_of_a_project_error(tmp_path, capsys):
    assert main(["--debug", "data", "check", str(tmp_path / "missing")]) == 2
    error = capsys.readouterr().err
    assert error.startswith("Traceback (most recent call last):")
    assert "DatasetError" in error
    assert error.splitlines()[-1].startswith("diffcom: error: ")


def test_an_analysis_error_is_one_line(tmp_path, capsys):
    assert main(["report", str(tmp_path / "nope"), "--out", str(tmp_path / "report")]) == 2
    error = capsys.readouterr().err
    assert error.startswith("diffcom: error: ") and error.count("\n") == 1
    assert "neither an experiment folder" in error


def test_a_plain_value_error_raised_by_project_code_is_one_line(monkeypatch, capsys):
    import core.data.registry

    # A function whose module is core's, as a check in core/ that raises ValueError would be.
    namespace = {"__name__": "core.data.registry"}
    exec("def refuse(*args):\n    raise ValueError('nations: expected something else')", namespace)
    monkeypatch.setattr(core.data.registry, "load_dataset", namespace["refuse"])
    assert main(["data", "check", "nations"]) == 2
    assert capsys.readouterr().err == "diffcom: error: nations: expected something else\n"


@pytest.mark.parametrize(
    "failure",
    [
        pytest.param(lambda: {}["boom"], id="KeyError"),
        # A ValueError raised inside a library is a bug too, not a refusal of the user's input.
        pytest.param(lambda: json.loads("{"), id="library-ValueError"),
    ],
)
def test_an_unexpected_error_propagates_with_its_traceback(failure, monkeypatch, capsys):
    import core.data.registry

    monkeypatch.setattr(core.data.registry, "load_dataset", lambda *args: failure())
    with pytest.raises((KeyError, ValueError)):
        main(["data", "check", "nations"])
    assert "diffcom: error" not in capsys.readouterr().err


def test_the_command_exits_non_zero_with_a_traceback_on_an_unexpected_error():
    code = (
        "import sys, core.data.registry as registry\n"
        "def fail(*args): raise KeyError('boom')\n"
        "registry.load_dataset = fail\n"
        "from diffcom.cli import main\n"
        "sys.exit(main(['data', 'check', 'nations']))\n"
    )
    done = _run("-c", code)
    assert done.returncode == 1
    assert "Traceback (most recent call last)" in done.stderr
    assert "KeyError: 'boom'" in done.stderr
    assert "diffcom: error" not in done.stderr


def test_the_parser_has_every_command_and_the_debug_flag():
    from diffcom.cli import build_parser

    listing = build_parser().format_help()
    assert "{data,train,sweep,report}" in listing and "--debug" in listing


def test_python_dash_m_runs_the_whole_command(tmp_path):
    # `python -m diffcom` is what `torchrun -m diffcom train` (README) runs.
    done = _run("-m", "diffcom", "data", "check", str(tmp_path / "missing"))
    assert done.returncode == 2, done.stderr
    assert done.stderr.startswith("diffcom: error: ") and done.stderr.count("\n") == 1


# ------------------------------------------------------------------------------ train --out


@pytest.fixture
def trainings(monkeypatch):
    """Replace the trainer: these tests check which folders the command accepts, not training."""
    import core.train.trainer

    calls = []

    def fake_train(config, out_dir, **options):
        calls.append(Path(out_dir))
        metrics = {"mrr": 0.5, "hits@1": 0.25, "hits@3": 0.5, "hits@10": 0.75, "mr": 3.0}
        return {"dataset": config.data.dataset, "test": {"clean": metrics}}

    monkeypatch.setattr(core.train.trainer, "train", fake_train)
    return calls


def test_train_refuses_a_folder_that_is_not_a_run(tmp_path, trainings, capsys):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "config.json").write_text('{"my": "settings"}\n')
    (mine / "notes.txt").write_text("keep me\n")
    assert main(["train", "--quiet", "--out", str(mine), *SETS]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1
    assert f"--out {mine}: not empty and not a diffcom run" in error
    assert "it holds config.json, notes.txt" in error and "--force" in error
    assert trainings == []
    assert (mine / "config.json").read_text() == '{"my": "settings"}\n'

    assert main(["train", "--quiet", "--force", "--out", str(mine), *SETS]) == 0
    assert trainings == [mine]


def test_train_refuses_a_file_as_out(tmp_path, trainings, capsys):
    (tmp_path / "file").write_text("x")
    assert main(["train", "--quiet", "--out", str(tmp_path / "file"), *SETS]) == 2
    assert "exists and is not a folder" in capsys.readouterr().err
    assert trainings == []


def _missing(folder: Path) -> None:
    pass


def _empty(folder: Path) -> None:
    folder.mkdir()


def _with_metrics(folder: Path) -> None:
    folder.mkdir()
    (folder / "metrics.jsonl").write_text("")


def _with_checkpoints(folder: Path) -> None:
    (folder / "checkpoints").mkdir(parents=True)


def _with_saved_config_only(folder: Path) -> None:
    # A run stopped before its first epoch has only the config.json that train wrote.
    folder.mkdir()
    save_config(load_config(overrides=SMOKE), folder / "config.json")


@pytest.mark.parametrize(
    "make", [_missing, _empty, _with_metrics, _with_checkpoints, _with_saved_config_only]
)
def test_train_accepts_a_new_or_empty_folder_and_a_run_to_resume(make, tmp_path, trainings):
    out = tmp_path / "run"
    make(out)
    assert main(["train", "--quiet", "--out", str(out), *SETS]) == 0
    assert trainings == [out]


def test_a_bad_config_leaves_no_run_folder(tmp_path, capsys):
    out = tmp_path / "new"
    assert main(["train", "--quiet", "--out", str(out), *SETS, "--set", "train.lr_stage1=-1"]) == 2
    assert "train.lr_stage1" in capsys.readouterr().err
    assert not out.exists()


def test_a_run_the_trainer_refuses_leaves_no_folder_it_created(tmp_path, capsys):
    # The trainer creates --out, then fails to load the dataset: nothing was written.
    argv = ["train", "--quiet", *SETS, "--set", f"data.dataset={tmp_path / 'no-data'}"]
    assert main([*argv, "--out", str(tmp_path / "new")]) == 2
    assert "neither a known name" in capsys.readouterr().err
    assert not (tmp_path / "new").exists()
    # A folder the user made is theirs: it stays.
    (tmp_path / "theirs").mkdir()
    assert main([*argv, "--out", str(tmp_path / "theirs")]) == 2
    assert (tmp_path / "theirs").is_dir()
