"""``diffcom sweep`` arguments and output, without Ray (the Ray runs: ``test_ray_adapter.py``)."""

from pathlib import Path

from core.cli import build_parser, main
from sweeps import cli, ray_adapter
from sweeps.experiment import write_json

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
