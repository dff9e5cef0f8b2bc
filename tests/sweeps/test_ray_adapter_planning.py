"""What ``launch`` and ``extend`` write and plan, with Ray's parts stubbed out (no Ray starts).

The Ray runs themselves are in ``test_ray_adapter.py`` (marked ray: the full tier).
"""

import json
import shutil
from pathlib import Path

import optuna
import pytest
from optuna.distributions import FloatDistribution, IntDistribution
from optuna.trial import TrialState

from diffcom.cli import main
from sweeps import ray_adapter
from sweeps.experiment import ExperimentError, optuna_storage_url, read_json
from sweeps.study import StudyError

STUDIES = Path(__file__).parent / "studies"
SETS = ("data.dataset=umls", "train.stage2_epochs=1")


@pytest.fixture
def no_ray(monkeypatch):
    """``_launch`` writes the experiment folder but neither starts Ray nor runs a Tuner."""
    tuned = []
    monkeypatch.setattr(ray_adapter, "_start_ray", lambda address: None)
    monkeypatch.setattr(ray_adapter, "_check_storage_visible", lambda storage: None)
    monkeypatch.setattr(ray_adapter, "_cluster_resources", dict)
    monkeypatch.setattr(ray_adapter, "_concurrency", lambda resources: 1)
    monkeypatch.setattr(ray_adapter, "_tuner", lambda study, *args: tuned.append(study))
    monkeypatch.setattr(ray_adapter, "_fit", lambda tuner: None)
    return tuned


def _study_copy(tmp_path, name: str) -> Path:
    """A copy of a test study (``extend`` checks the file has not changed since launch)."""
    path = tmp_path / f"{name}.yaml"
    shutil.copy(STUDIES / f"{name}.yaml", path)
    return path


def test_launch_overrides_are_recorded_and_planned(tmp_path, no_ray):
    study = _study_copy(tmp_path, "smoke-sensitivity")
    folder = ray_adapter.launch(study, overrides=SETS, storage=tmp_path / "store")

    metadata = read_json(folder / "experiment.json")
    assert metadata["launch_overrides"] == list(SETS)
    assert metadata["study_file"] == str(study)
    copied = (folder / "study.yaml").read_text()
    assert copied.splitlines()[0] == (
        "# launched with --set data.dataset=umls --set train.stage2_epochs=1 "
        "(merged into overrides below)"
    )
    assert copied.endswith(study.read_text())
    trials = read_json(folder / "plan.json")["trials"]
    assert len(trials) == 4
    for config in trials.values():
        assert config["data"]["dataset"] == "umls" and config["train"]["stage2_epochs"] == 1
        assert config["model"]["hidden_dim"] == 32  # the study's own overrides still hold
    # A trial (first run or resumed) builds its config from the plan, not from the study file.
    study.write_text(study.read_text().replace("data.dataset: nations", "data.dataset: kinships"))
    name = "sensitivity/diffusion.steps=10/seed-1"
    _, (spec,), _ = ray_adapter._prepare_trial({"trial": name}, folder, "trial-id")
    assert spec.config.data.dataset == "umls" and spec.config.diffusion.steps == 10


def test_a_launch_without_overrides_records_none(tmp_path, no_ray):
    folder = ray_adapter.launch(
        _study_copy(tmp_path, "smoke-sensitivity"), storage=tmp_path / "store"
    )
    assert read_json(folder / "experiment.json")["launch_overrides"] == []
    assert (folder / "study.yaml").read_text().startswith("# diffcom sweep launch")
    for config in read_json(folder / "plan.json")["trials"].values():
        assert config["data"]["dataset"] == "nations"


def test_extend_applies_the_launch_overrides_again(tmp_path, no_ray):
    storage = tmp_path / "store"
    study = _study_copy(tmp_path, "smoke-sensitivity")
    old = ray_adapter.launch(study, overrides=SETS, name="first", storage=storage)
    new = ray_adapter.extend("first", seeds=(7,), storage=storage)

    assert new == storage / "first-ext1"
    metadata = read_json(new / "experiment.json")
    assert metadata["launch_overrides"] == list(SETS)
    assert metadata["parents"] == [str(old)] and metadata["extension"] == {"seeds": [7]}
    header = (new / "study.yaml").read_text().splitlines()[:2]
    assert header[0].startswith(f"# extended from {old}")
    assert header[1].startswith("# launched with --set data.dataset=umls")
    trials = read_json(new / "plan.json")["trials"]
    assert sorted(trials) == [
        "sensitivity/diffusion.steps=10/seed-7",
        "sensitivity/diffusion.steps=5/seed-7",
    ]
    for config in trials.values():
        assert config["data"]["dataset"] == "umls" and config["train"]["stage2_epochs"] == 1
        assert config["seed"] == 7
    # ... and the extension of the extension too.
    again = ray_adapter.extend("first-ext1", seeds=(8,), storage=storage)
    for config in read_json(again / "plan.json")["trials"].values():
        assert config["data"]["dataset"] == "umls" and config["seed"] == 8


def test_a_search_plan_carries_the_launch_overrides_in_its_base(tmp_path, no_ray):
    study = _study_copy(tmp_path, "smoke-search")
    folder = ray_adapter.launch(study, overrides=SETS, storage=tmp_path / "store")
    plan = read_json(folder / "plan.json")
    assert plan["base"]["data"]["dataset"] == "umls"
    assert plan["base"]["train"]["stage2_epochs"] == 1
    point = {"diffusion.steps": 15, "loss.w_kl": 0.5}
    _, (spec,), _ = ray_adapter._prepare_trial(point, folder, "abc")
    assert spec.config.data.dataset == "umls" and spec.config.diffusion.steps == 15


def test_bad_launch_overrides_are_refused_before_anything_is_written(tmp_path, no_ray):
    study = _study_copy(tmp_path, "smoke-sensitivity")
    with pytest.raises(StudyError, match=r"--set diffusion\.steps=20: the study varies"):
        ray_adapter.launch(study, overrides=("diffusion.steps=20",), storage=tmp_path / "store")
    assert not (tmp_path / "store").exists() and not no_ray


# ------------------------------------------------------------------------ Optuna's own storage


def test_the_optuna_storage_url_defaults_to_sqlite_in_the_experiment():
    assert optuna_storage_url(Path("/data/exp")) == "sqlite:////data/exp/optuna.db"
    url = "postgresql://me@db.example/optuna"
    assert optuna_storage_url(Path("/data/exp"), url) == url
    for bad in ("", "optuna.db", "://x", "sqlite://", "1x://y"):
        with pytest.raises(ExperimentError, match=r"--optuna-storage .*expected a database URL"):
            optuna_storage_url(Path("/data/exp"), bad)


def test_a_search_records_its_optuna_storage_and_status_prints_the_dashboard(
    tmp_path, no_ray, capsys
):
    storage = tmp_path / "store"
    study = _study_copy(tmp_path, "smoke-search")
    folder = ray_adapter.launch(study, storage=storage)
    url = f"sqlite:///{folder}/optuna.db"
    assert read_json(folder / "experiment.json")["optuna_storage"] == url
    assert main(["sweep", "status", "smoke-search", "--storage", str(storage)]) == 0
    assert f"optuna-dashboard {url}" in capsys.readouterr().out

    shared = f"sqlite:///{tmp_path}/shared.db"
    named = ray_adapter.launch(study, name="second", storage=storage, optuna_storage=shared)
    assert read_json(named / "experiment.json")["optuna_storage"] == shared
    # An ablation has no Optuna study: no key, and --optuna-storage is refused for it.
    ablation = ray_adapter.launch(_study_copy(tmp_path, "smoke-sensitivity"), storage=storage)
    assert "optuna_storage" not in read_json(ablation / "experiment.json")
    with pytest.raises(
        ExperimentError,
        match=r"--optuna-storage: .*smoke-ablation.yaml is not an optuna-tpe search \(an ablation",
    ):
        ray_adapter.launch(
            _study_copy(tmp_path, "smoke-ablation"),
            name="x",
            storage=storage,
            optuna_storage=shared,
        )


def test_a_storage_that_already_holds_the_study_name_is_refused(tmp_path, no_ray):
    shared = f"sqlite:///{tmp_path}/shared.db"
    optuna.create_study(study_name="taken", storage=shared)
    study = _study_copy(tmp_path, "smoke-search")
    with pytest.raises(ExperimentError, match=r"already holds an Optuna study named 'taken'"):
        ray_adapter.launch(study, name="taken", storage=tmp_path / "store", optuna_storage=shared)
    assert not (tmp_path / "store" / "taken").exists()


def test_extend_warm_starts_from_the_completed_trials_of_the_optuna_study(
    tmp_path, no_ray, monkeypatch
):
    histories = []
    monkeypatch.setattr(
        ray_adapter, "_tuner", lambda study, folder, plan, history, *rest: histories.append(history)
    )
    storage = tmp_path / "store"
    old = ray_adapter.launch(_study_copy(tmp_path, "smoke-search"), storage=storage)
    url = read_json(old / "experiment.json")["optuna_storage"]
    # What the searcher wrote: two completed trials and one ASHA stopped (pruned).
    searched = optuna.create_study(study_name="smoke-search", storage=url, direction="maximize")
    space = {
        "diffusion.steps": IntDistribution(5, 20, step=5),
        "loss.w_kl": FloatDistribution(0.1, 10.0, log=True),
    }
    for steps, w_kl, state, value in (
        (10, 0.5, TrialState.COMPLETE, 0.3),
        (5, 2.0, TrialState.PRUNED, None),
        (20, 1.0, TrialState.COMPLETE, 0.4),
    ):
        searched.add_trial(
            optuna.trial.create_trial(
                params={"diffusion.steps": steps, "loss.w_kl": w_kl},
                distributions=space,
                state=state,
                value=value,
            )
        )
    before = {p: p.stat().st_mtime_ns for p in old.rglob("*") if p.is_file()}

    new = ray_adapter.extend("smoke-search", samples=1, storage=storage)
    extension = read_json(new / "experiment.json")["extension"]
    assert extension["warm_start"] == 2 and extension["warm_start_from"] == "optuna"
    assert histories[-1] == [
        ({"diffusion.steps": 10, "loss.w_kl": 0.5}, 0.3),
        ({"diffusion.steps": 20, "loss.w_kl": 1.0}, 0.4),
    ]
    assert read_json(new / "experiment.json")["optuna_storage"] == f"sqlite:///{new}/optuna.db"
    assert {p: p.stat().st_mtime_ns for p in old.rglob("*") if p.is_file()} == before

    # Without its database (a folder copied without it) the finished runs tell, as before.
    (old / "optuna.db").unlink()
    again = ray_adapter.extend("smoke-search", samples=1, storage=storage)
    assert read_json(again / "experiment.json")["extension"]["warm_start_from"] == "runs"
    assert not (old / "optuna.db").exists()  # looking for it did not create an empty one


def test_resume_refuses_while_a_killed_drivers_worker_still_trains_a_run(tmp_path, no_ray):
    """A worker outliving its killed driver still writes its run: resuming would train it twice."""
    import socket
    import subprocess
    import sys

    study = _study_copy(tmp_path, "smoke-sensitivity")
    folder = ray_adapter.launch(study, overrides=SETS, storage=tmp_path / "store")
    run = folder / "runs" / "cell" / "seed-0"
    run.mkdir(parents=True)
    worker = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        status = {"state": "running", "host": socket.gethostname(), "pid": worker.pid}
        (run / "status.json").write_text(json.dumps(status))
        with pytest.raises(ExperimentError, match=rf"cell/seed-0 \(pid {worker.pid}\)"):
            ray_adapter.resume(folder.name, storage=tmp_path / "store")
    finally:
        worker.kill()
        worker.wait()
    # Once that process is gone the run is merely interrupted, and resume goes on to Ray Tune's
    # saved state (which this stubbed launch never wrote).
    with pytest.raises(ExperimentError, match="never saved its state"):
        ray_adapter.resume(folder.name, storage=tmp_path / "store")


def test_runs_of_one_stage1_and_denoiser_shape_are_planned_as_packs(tmp_path, no_ray):
    folder = ray_adapter.launch(STUDIES / "smoke-ablation.yaml", storage=tmp_path / "store")
    plan = read_json(folder / "plan.json")
    # short and long share stage 1 and the denoiser's shape; diverging has its own stage 1.
    assert plan["packs"] == {"pack/0": ["ablation/short/seed-0", "ablation/long/seed-0"]}
    assert plan["units"] == ["pack/0", "ablation/diverging/seed-0"]
    assert set(plan["trials"]) == {
        "ablation/short/seed-0",
        "ablation/long/seed-0",
        "ablation/diverging/seed-0",
    }
    name, runs, metric = ray_adapter._prepare_trial({"trial": "pack/0"}, folder, "t0")
    assert name == "pack/0" and [r.name for r in runs] == plan["packs"]["pack/0"]
    assert runs[1].config.train.stage2_epochs == 40 and metric == "valid.clean.mrr"

    study = tmp_path / "alone.yaml"
    study.write_text((STUDIES / "smoke-ablation.yaml").read_text().replace("pack: 8", "pack: 1"))
    alone = ray_adapter.launch(study, name="alone", storage=tmp_path / "store")
    alone = read_json(alone / "plan.json")
    assert "packs" not in alone and "units" not in alone
