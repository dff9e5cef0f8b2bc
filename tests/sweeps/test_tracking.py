"""Tracking of sweep runs: MLflow runs on a real MLflow server, TensorBoard event files, resumes.

The MLflow tests share the session's real ``mlflow server`` (SQLite backend, artifacts in a
temporary folder; the ``mlflow_server`` fixture of tests/conftest.py). The fast tests call
:func:`sweeps.trial.run_trial` without Ray, as ``test_trial.py`` does; a study launched through
the CLI on Ray, killed and resumed, is tracked in test_ray_remote.py.
"""

import importlib.util
import sys
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from core.config import load_config
from diffcom.cli import main
from runstore import METRICS, read_jsonl
from sweeps import ray_adapter
from sweeps.experiment import read_json, write_json
from sweeps.stage1 import stage1_key
from sweeps.tracking import mlflow_uri_problem, start_tracking
from sweeps.trial import RunSpec, TrialFailed, run_trial
from tests.servers import free_port
from tests.smoke import SMOKE

ROOT = Path(__file__).resolve().parents[2]
RUN = "ablation/full/seed-0"

needs_mlflow = pytest.mark.skipif(
    importlib.util.find_spec("mlflow") is None,
    reason="mlflow is not installed: pip install -e '.[tracking]' (make test installs it)",
)


def _client(uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def _experiment(folder: Path, mlflow: str | None, tensorboard: bool = True) -> Path:
    """An experiment folder as ``launch`` writes it, enough for ``run_trial``; its MLflow
    experiment is named after the folder so tests sharing the server do not see each other's."""
    tracking = start_tracking(
        folder,
        study=f"study-{folder.name}",
        mlflow=mlflow,
        tensorboard=tensorboard,
        tags={"diffcom.experiment": "unit"},
    )
    write_json(
        folder / "experiment.json",
        {
            "name": "unit",
            "kind": "ablation",
            "metric": "valid.clean.mrr",
            "mode": "max",
            "code": {"revision": "0123abc", "dirty": True},
            "tracking": tracking,
        },
    )
    return folder


def _child_runs(uri: str, folder: Path) -> list:
    tracking = read_json(folder / "experiment.json")["tracking"]["mlflow"]
    runs = _client(uri).search_runs([tracking["experiment_id"]])
    return [r for r in runs if r.data.tags.get("mlflow.parentRunId") == tracking["parent_run_id"]]


def _records(metrics_file: Path) -> list[dict]:
    return [line.value for line in read_jsonl(metrics_file, METRICS).lines]


def _expected_losses(folder: Path, run_dir: Path, config) -> list[tuple[int, float]]:
    """``(global epoch, loss)`` the run's curves must hold: its shared stage-1 run's epochs, then
    its own stage-2 epochs."""
    stage1 = folder / "stage1" / stage1_key(config) / "run" / "metrics.jsonl"
    own = [r for r in _records(run_dir / "metrics.jsonl") if r["stage"] == 2]
    stage1_epochs = config.train.stage1_epochs
    return [(r["epoch"], r["loss"]) for r in _records(stage1)] + [
        (r["epoch"] + stage1_epochs, r["loss"]) for r in own
    ]


def _scalars(logdir: Path, tag: str) -> list[tuple[int, float]]:
    events = EventAccumulator(str(logdir))
    events.Reload()
    return [(event.step, pytest.approx(event.value)) for event in events.Scalars(tag)]


def _resume_and_check_each_step_logged_once(uri: str, folder: Path, config, killed) -> None:
    """Resume the killed run: it continues its one MLflow run, and MLflow and TensorBoard hold
    every epoch of both stages once."""
    run_trial(folder, RUN, [RunSpec(RUN, config)], lambda metrics: None)
    (resumed,) = _child_runs(uri, folder)
    assert resumed.info.run_id == killed.info.run_id and resumed.info.status == "FINISHED"
    history = _client(uri).get_metric_history(resumed.info.run_id, "loss")
    run_dir = folder / "runs" / RUN
    expected = _expected_losses(folder, run_dir, config)
    assert sorted((m.step, m.value) for m in history) == expected  # each step once
    assert _scalars(run_dir / "tensorboard", "loss") == expected


@needs_mlflow
def test_a_run_is_one_child_run_with_params_metrics_tags_and_its_results(
    mlflow_server, tmp_path, capsys
):
    folder = _experiment(tmp_path, mlflow_server)
    config = load_config(overrides=SMOKE)
    run_trial(folder, RUN, [RunSpec(RUN, config)], lambda metrics: None)
    run_dir = folder / "runs" / RUN
    results = read_json(run_dir / "results.json")

    (child,) = _child_runs(mlflow_server, folder)
    assert child.info.status == "FINISHED" and child.info.run_name == RUN
    params = child.data.params
    assert (params["model.hidden_dim"], params["data.dataset"], params["seed"]) == (
        "32",
        "nations",
        "0",
    )
    assert params["train.stage1_epochs"] == "2" and params["structure.encoder"] == "mgat"
    tags = child.data.tags
    assert tags["diffcom.experiment"] == "unit" and tags["diffcom.cell"] == "full"
    assert tags["diffcom.seed"] == "0" and tags["diffcom.stage1_key"] == stage1_key(config)
    assert tags["diffcom.code_revision"] == "0123abc+dirty"
    assert tags["diffcom.dataset_hash"] == results["dataset_hash"]
    assert tags["diffcom.run_folder"] == str(run_dir)

    client = _client(mlflow_server)
    history = client.get_metric_history(child.info.run_id, "loss")
    expected = _expected_losses(folder, run_dir, config)
    assert [s for s, _ in expected] == [1, 2, 3, 4]  # step = global epoch, over both stages
    assert sorted((m.step, m.value) for m in history) == expected
    hits = client.get_metric_history(child.info.run_id, "valid.clean.hits_at_1")
    assert sorted(m.step for m in hits) == [1, 2, 3, 4]
    assert child.data.metrics["final.test.clean.mrr"] == results["test"]["clean"]["mrr"]
    assert "results.json" in [a.path for a in client.list_artifacts(child.info.run_id)]

    # TensorBoard: the same curve, and the hparams summary with the final metrics.
    assert _scalars(run_dir / "tensorboard", "loss") == expected
    hparams = EventAccumulator(str(run_dir / "tensorboard" / "hparams"))
    hparams.Reload()
    assert "_hparams_/session_start_info" in hparams.PluginTagToContent("hparams")
    assert _scalars(run_dir / "tensorboard" / "hparams", "final.test.clean.mrr") == [
        (4, results["test"]["clean"]["mrr"])
    ]
    assert "warning" not in capsys.readouterr().err


@needs_mlflow
def test_a_killed_and_resumed_run_continues_its_one_mlflow_run(mlflow_server, tmp_path):
    folder = _experiment(tmp_path, mlflow_server)
    config = load_config(overrides=SMOKE)
    run_dir = folder / "runs" / RUN

    class Stop(Exception):
        pass

    def stop_after_first_own_epoch(metrics):
        if metrics["stage"] == 2:  # the checkpoint holds stage 2, epoch 1 (global epoch 3)
            raise Stop

    with pytest.raises(TrialFailed):
        run_trial(folder, RUN, [RunSpec(RUN, config)], stop_after_first_own_epoch)
    (killed,) = _child_runs(mlflow_server, folder)
    assert killed.info.status == "FAILED" and "Stop" in killed.data.tags["diffcom.error"]
    # As if the kill came after TensorBoard wrote epoch 3 but before tracking.json said so: the
    # resumed writer must drop that event and write it once more, not twice.
    state = read_json(run_dir / "tracking.json")
    assert state["last_step"] == {"tensorboard": 3, "mlflow": 3}
    write_json(
        run_dir / "tracking.json", {**state, "last_step": {**state["last_step"], "tensorboard": 2}}
    )

    _resume_and_check_each_step_logged_once(mlflow_server, folder, config, killed)


class _Killed(BaseException):
    """A SIGKILL in-process: no handler of the trial catches it, so nothing runs after it."""


@needs_mlflow
def test_an_epoch_is_logged_only_once_its_checkpoint_is_stored(mlflow_server, tmp_path):
    """A bucket that takes checkpoints every 2 epochs: what MLflow and TensorBoard show never
    runs ahead of what the bucket holds, so a resumed run never logs an epoch twice."""
    folder = _experiment(tmp_path, mlflow_server)
    config = load_config(overrides=SMOKE)
    run_dir = folder / "runs" / RUN
    logged_at_report = []

    def every_second_checkpoint_then_killed(metrics):
        epoch = metrics["global_epoch"]
        state = (
            read_json(run_dir / "tracking.json") if (run_dir / "tracking.json").is_file() else {}
        )
        logged_at_report.append((epoch, state.get("last_step", {}).get("mlflow")))
        if epoch == 3:  # its metrics are up, its checkpoint is not: killed here
            raise _Killed
        return epoch - epoch % 2

    with pytest.raises(_Killed):
        run_trial(folder, RUN, [RunSpec(RUN, config)], every_second_checkpoint_then_killed)
    # Epoch 1 waited for epoch 2's checkpoint; epoch 3 was never logged.
    assert logged_at_report == [(1, None), (2, None), (3, 2)]
    (killed,) = _child_runs(mlflow_server, folder)
    history = _client(mlflow_server).get_metric_history(killed.info.run_id, "loss")
    assert sorted(m.step for m in history) == [1, 2]
    assert [step for step, _ in _scalars(run_dir / "tensorboard", "loss")] == [1, 2]
    # As a bucket's copy of tracking.json can be (it goes up with the epoch's files, before the
    # epoch is logged): one epoch behind what the trackers hold. The server's word wins, and
    # TensorBoard's events past it are replaced.
    state = read_json(run_dir / "tracking.json")
    assert state["last_step"] == {"tensorboard": 2, "mlflow": 2}
    write_json(run_dir / "tracking.json", {**state, "last_step": {"tensorboard": 1, "mlflow": 1}})

    _resume_and_check_each_step_logged_once(mlflow_server, folder, config, killed)


@needs_mlflow
def test_an_epoch_checkpointed_but_never_logged_is_logged_on_resume(
    mlflow_server, tmp_path, monkeypatch
):
    folder = _experiment(tmp_path, mlflow_server, tensorboard=False)
    config = load_config(overrides=SMOKE)
    run_dir = folder / "runs" / RUN

    def killed_before_logging_stage2(metrics):
        # The kill comes after the checkpoint of stage 2, epoch 1 (global epoch 3), while its
        # report is under way: before the trackers log it.
        if metrics["stage"] == 2:
            raise _Killed

    with pytest.raises(_Killed):
        run_trial(folder, RUN, [RunSpec(RUN, config)], killed_before_logging_stage2)
    (stopped,) = _child_runs(mlflow_server, folder)
    assert stopped.info.status == "RUNNING"  # nobody closed it
    assert read_json(run_dir / "tracking.json")["last_step"] == {"mlflow": 2}

    run_trial(folder, RUN, [RunSpec(RUN, config)], lambda metrics: None)
    (resumed,) = _child_runs(mlflow_server, folder)
    assert resumed.info.run_id == stopped.info.run_id
    history = _client(mlflow_server).get_metric_history(resumed.info.run_id, "loss")
    # 1-2: the shared stage 1; 3: from metrics.jsonl (the checkpoint's); 4: trained on resume.
    assert sorted((m.step, m.value) for m in history) == _expected_losses(folder, run_dir, config)
    assert not (run_dir / "tensorboard").exists()


@needs_mlflow
def test_a_run_first_tracked_on_resume_gets_its_whole_curve(mlflow_server, tmp_path):
    unreachable = f"http://127.0.0.1:{free_port()}"
    folder = _experiment(tmp_path, unreachable)
    config = load_config(overrides=SMOKE)
    run_dir = folder / "runs" / RUN

    def stop_at_own_epoch(metrics):
        if metrics["stage"] == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_trial(folder, RUN, [RunSpec(RUN, config)], stop_at_own_epoch)
    # The server is back (here: the experiment names a reachable one) when the run resumes.
    _experiment(tmp_path, mlflow_server)
    run_trial(folder, RUN, [RunSpec(RUN, config)], lambda metrics: None)
    (child,) = _child_runs(mlflow_server, folder)
    history = _client(mlflow_server).get_metric_history(child.info.run_id, "loss")
    # The shared stage 1's epochs and the checkpoint's come from their metrics.jsonl files.
    assert sorted((m.step, m.value) for m in history) == _expected_losses(folder, run_dir, config)


def test_an_unreachable_server_warns_and_training_finishes(tmp_path, capsys):
    uri = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    folder = _experiment(tmp_path, uri)
    assert read_json(folder / "experiment.json")["tracking"]["mlflow"]["parent_run_id"] is None
    summary = run_trial(folder, RUN, [RunSpec(RUN, load_config(overrides=SMOKE))], lambda m: None)
    assert summary["runs_finished"] == 1
    assert read_json(folder / "runs" / RUN / "status.json")["state"] == "finished"
    warnings = [line for line in capsys.readouterr().err.splitlines() if "warning" in line]
    # One line at launch, one when the run opens its trackers; nothing per epoch.
    assert len(warnings) == 2 and all(f"MLflow at {uri} is unreachable" in w for w in warnings)
    assert (folder / "runs" / RUN / "tensorboard").is_dir()  # TensorBoard is not held up


@pytest.mark.parametrize(
    ("uri", "problem"),
    [
        ("http://127.0.0.1:5000", None),
        ("https://mlflow.example.org/prefix", None),
        ("file:///abs/mlruns", None),
        ("sqlite:////abs/mlflow.db", None),
        ("databricks", None),
        ("127.0.0.1:5000", "schemes: http"),
        ("http://:5000", "no host"),
        ("http://127.0.0.1:99999", "port"),
        ("file://relative/mlruns", "absolute path"),
        ("sqlite:///relative.db", "absolute path"),
        ("ftp://host/x", "schemes: http"),
        ("", "expected a tracking URI"),
    ],
)
def test_mlflow_uris_are_checked(uri, problem):
    found = mlflow_uri_problem(uri)
    assert (found is None) if problem is None else (problem in found)


def test_a_bad_mlflow_uri_is_refused_before_ray(tmp_path, capsys, monkeypatch):
    def start(address):
        raise AssertionError("Ray started")

    monkeypatch.setattr(ray_adapter, "_start_ray", start)
    study = Path(__file__).parent / "studies" / "smoke-sensitivity.yaml"
    argv = ["sweep", "launch", str(study), "--mlflow", "localhost:5000", "--storage", str(tmp_path)]
    assert main(argv) == 2
    error = capsys.readouterr().err.strip()
    assert (
        error.startswith("diffcom: error: --mlflow: expected a tracking URI") and "\n" not in error
    )
    assert not list(tmp_path.iterdir())
    # The adapter itself refuses it too (it is the API the CLI calls).
    with pytest.raises(ValueError, match="--mlflow: expected a tracking URI"):
        ray_adapter.launch(study, storage=tmp_path, mlflow="localhost:5000")


@pytest.mark.parametrize(
    ("tracking", "message"),
    [
        ("tracking: {mlflow: 'localhost:5000'}", "tracking.mlflow: expected a tracking URI"),
        ("tracking: {tensorboard: 'yes'}", "tracking.tensorboard: expected true or false"),
        ("tracking: {wandb: x}", "tracking.wandb: unknown key; valid keys: mlflow, tensorboard"),
        ("tracking: [mlflow]", "tracking: expected a mapping with keys mlflow, tensorboard"),
    ],
)
def test_a_bad_tracking_key_names_the_study_file_and_key(tmp_path, tracking, message):
    from sweeps.study import StudyError, load_study

    study = tmp_path / "s.yaml"
    base = (Path(__file__).parent / "studies" / "smoke-sensitivity.yaml").read_text()
    study.write_text(f"{base}\n{tracking}\n")
    with pytest.raises(StudyError) as caught:
        load_study(study)
    assert str(caught.value).startswith(f"{study}: {message}")


def test_the_study_tracking_key_and_the_launch_flags(tmp_path):
    from sweeps.study import Tracking, load_study

    study = tmp_path / "s.yaml"
    base = (Path(__file__).parent / "studies" / "smoke-sensitivity.yaml").read_text()
    assert load_study(Path(__file__).parent / "studies" / "smoke-sensitivity.yaml").tracking == (
        Tracking(mlflow=None, tensorboard=True)
    )
    study.write_text(f"{base}\ntracking: {{mlflow: 'http://h:5000', tensorboard: false}}\n")
    assert load_study(study).tracking == Tracking(mlflow="http://h:5000", tensorboard=False)


@needs_mlflow
def test_the_report_is_logged_to_the_parent_run(mlflow_server, tmp_path):
    from sweeps.tracking import log_report

    folder = tmp_path / "unit"
    folder.mkdir()
    _experiment(folder, mlflow_server)
    out = tmp_path / "report"
    out.mkdir()
    (out / "report.html").write_text("<html></html>")
    log_report([str(folder)], None, out)
    parent = read_json(folder / "experiment.json")["tracking"]["mlflow"]["parent_run_id"]
    logged = _client(mlflow_server).list_artifacts(parent, "report")
    assert [a.path for a in logged] == ["report/report.html"]


@needs_mlflow
def test_each_member_of_a_fused_pack_is_its_own_tracked_run(mlflow_server, tmp_path):
    from sweeps.pack import run_pack

    folder = _experiment(tmp_path, mlflow_server)
    members = {
        "ablation/k3/seed-0": load_config(overrides=[*SMOKE, "diffusion.steps=3"]),
        "ablation/k5/seed-0": load_config(overrides=SMOKE),
    }
    specs = [RunSpec(name, config) for name, config in members.items()]
    run_pack(folder, "pack/0", specs, lambda metrics: None, memory_limit_mib=1e6)
    children = {child.info.run_name: child for child in _child_runs(mlflow_server, folder)}
    assert set(children) == set(members)
    client = _client(mlflow_server)
    for name, config in members.items():
        child, run_dir = children[name], folder / "runs" / name
        assert child.info.status == "FINISHED"
        assert child.data.tags["diffcom.stage1_key"] == stage1_key(config)
        history = client.get_metric_history(child.info.run_id, "loss")
        # Both members' curves start with the pack's one shared stage 1, then their own stage 2.
        expected = _expected_losses(folder, run_dir, config)
        assert sorted((m.step, m.value) for m in history) == expected
        assert _scalars(run_dir / "tensorboard", "loss") == expected
        results = read_json(run_dir / "results.json")
        assert child.data.metrics["final.test.clean.mrr"] == results["test"]["clean"]["mrr"]


@pytest.mark.parametrize("library", ["torch.utils.tensorboard", "tensorboardX"])
def test_event_files_are_on_disk_at_flush_and_hparams_go_to_their_folder(
    library, tmp_path, monkeypatch
):
    from sweeps.tracking import _summary_writer

    if library == "tensorboardX":  # no `tensorboard` package: Ray Tune's tensorboardX
        monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    writer = _summary_writer(tmp_path, purge_step=None)
    assert any(base.__module__.startswith(library) for base in type(writer).__mro__)
    for step in (1, 2, 3):
        writer.add_scalar("loss", 1.0 / step, global_step=step)
    writer.flush()
    if library == "torch.utils.tensorboard":  # tensorboardX's flush leaves queued events behind
        assert [step for step, _ in _scalars(tmp_path, "loss")] == [1, 2, 3]  # writer still open
    writer.add_hparams(
        {"lr": 0.1, "name": "x"}, {"final.mrr": 0.5}, run_name="hparams", global_step=3
    )
    writer.close()
    assert _scalars(tmp_path, "loss") == [(1, 1.0), (2, 0.5), (3, 1.0 / 3)]
    assert _scalars(tmp_path / "hparams", "final.mrr") == [(3, 0.5)]
