"""``diffcom sweep`` arguments and output, without Ray (the Ray runs: ``test_ray_adapter.py``)."""

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
            {"overrides": ("a.b=1", "c.d=two"), "name": "x", "storage": None, "address": None},
        )
    ]


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
