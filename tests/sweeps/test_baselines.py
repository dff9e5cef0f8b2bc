"""Baselines in a study: parsing, trial order, the matched budget and its wait, without Ray.

The Ray run of a study with baselines (and its killed-driver resume) is in
``test_ray_baselines.py`` (marked ray).
"""

import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from core.baselines import BASELINE_MODELS
from core.config import load_config
from sweeps import ray_adapter
from sweeps import trial as trial_module
from sweeps.experiment import read_json, read_statuses, runs_alive_on_this_host, write_json
from sweeps.study import (
    STUDIES_DIR,
    BaselineBudget,
    StudyError,
    expand_trials,
    load_study,
    trial_config,
)
from sweeps.trial import RunSpec, TrialFailed, matched_budget, run_trial

#: The longest a test waits for an event of another thread; it ends as soon as the event happens.
DEADLINE_S = 120

ABLATION = """\
    kind: ablation
    overrides:
      data.dataset: nations
      features.image_encoder: none
      structure.encoder: mgat
    seeds: [0, 1]
    variants:
      full: {}
      no-mgat: {structure.encoder: none}
"""


def write_study(tmp_path, text: str, base: str = ABLATION) -> Path:
    path = tmp_path / "study.yaml"
    path.write_text(textwrap.dedent(base) + textwrap.dedent(text))
    return path


# ------------------------------------------------------------------------------------ the study


def test_a_list_of_baselines_becomes_cells_after_every_other_trial(tmp_path):
    study = load_study(write_study(tmp_path, "baselines: [pykeen:TuckER, pykeen:RotatE]\n"))
    assert study.baseline_budget == BaselineBudget("match")
    assert [(b.name, b.model, b.settings) for b in study.baselines] == [
        ("pykeen-tucker", "pykeen:TuckER", ()),
        ("pykeen-rotate", "pykeen:RotatE", ()),
    ]
    trials = expand_trials(study)
    assert [t.name for t in trials] == [
        "ablation/full/seed-0",
        "ablation/no-mgat/seed-0",
        "ablation/full/seed-1",
        "ablation/no-mgat/seed-1",
        "ablation/pykeen-tucker/seed-0",
        "ablation/pykeen-rotate/seed-0",
        "ablation/pykeen-tucker/seed-1",
        "ablation/pykeen-rotate/seed-1",
    ]
    assert [t.baseline for t in trials] == [None] * 4 + ["pykeen:TuckER", "pykeen:RotatE"] * 2
    # match: each baseline's budget is the reference variant's run of its own seed.
    assert [t.match_to for t in trials[4:]] == ["ablation/full/seed-0"] * 2 + [
        "ablation/full/seed-1"
    ] * 2
    config = trial_config(study, trials[-1])
    assert (config.baseline.model, config.seed, config.baseline.budget_seconds) == (
        "pykeen:RotatE",
        1,
        0.0,
    )
    assert config.data.dataset == "nations"  # the study's overrides hold for baselines too
    assert trial_config(study, trials[0]).baseline.model == "none"


def test_the_match_budget_is_against_the_studys_reference(tmp_path):
    study = load_study(write_study(tmp_path, "reference: no-mgat\nbaselines: [pykeen:TransE]\n"))
    assert [t.match_to for t in expand_trials(study) if t.baseline] == [
        "ablation/no-mgat/seed-0",
        "ablation/no-mgat/seed-1",
    ]


def test_a_mapping_gives_settings_and_a_list_of_values_one_cell_per_value(tmp_path):
    study = load_study(
        write_study(
            tmp_path,
            """\
            baselines:
              pykeen:TuckER: {}
              pykeen:RotatE:
                baseline.lr: [0.003, 1e-2]
                baseline.embedding_dim: 100
                baseline.batch_size: [128, 512]
            baseline_budget: {epochs: 5}
            """,
        )
    )
    assert [b.name for b in study.baselines] == [
        "pykeen-tucker",
        "pykeen-rotate-lr=0.003,batch_size=128",
        "pykeen-rotate-lr=0.003,batch_size=512",
        "pykeen-rotate-lr=0.01,batch_size=128",
        "pykeen-rotate-lr=0.01,batch_size=512",
    ]
    trials = {t.name: t for t in expand_trials(study)}
    trial = trials["ablation/pykeen-rotate-lr=0.01,batch_size=128/seed-1"]
    assert trial.match_to is None  # a fixed number of epochs waits for nothing
    assert trial.changes == (
        ("baseline.model", "pykeen:RotatE"),
        ("baseline.embedding_dim", 100),
        ("baseline.lr", 0.01),
        ("baseline.batch_size", 128),
        ("baseline.epochs", 5),
        ("baseline.budget_seconds", 0.0),
    )
    config = trial_config(study, trial)
    assert (config.baseline.lr, config.baseline.embedding_dim, config.baseline.epochs) == (
        0.01,
        100,
        5,
    )
    # The override strings rebuild the same config through core.config's own parser.
    assert load_config(None, trial.override_strings()) == config


def test_a_budget_in_seconds_sets_the_budget_and_its_clock(tmp_path):
    study = load_study(
        write_study(
            tmp_path,
            "baselines: [pykeen:DistMult]\nbaseline_budget: {seconds: 90, clock: wall}\n",
        )
    )
    assert study.baseline_budget == BaselineBudget("seconds", seconds=90.0, clock="wall")
    trial = [t for t in expand_trials(study) if t.baseline][0]
    config = trial_config(study, trial)
    assert (config.baseline.budget_seconds, config.baseline.clock) == (90.0, "wall")
    assert trial.match_to is None


def test_the_shipped_baselines_study_compares_five_pykeen_models_at_matched_cost():
    study = load_study(STUDIES_DIR / "baselines-umls.yaml")
    assert [v.name for v in study.variants] == ["full", "no-mgat"]
    assert dict(study.variants[1].overrides) == {"structure.encoder": "none"}
    assert study.variants[0].overrides == () and study.reference == "full"
    assert tuple(b.model for b in study.baselines) == BASELINE_MODELS
    assert study.baseline_budget.kind == "match" and study.seeds == (0, 1, 2)
    trials = expand_trials(study)
    assert len(trials) == 21 and all(t.baseline for t in trials[6:])
    assert trial_config(study, trials[0]).data.dataset == "umls"


def test_the_plan_starts_baselines_last_and_names_their_references(tmp_path):
    study = load_study(write_study(tmp_path, "baselines: [pykeen:TuckER]\n"))
    plan = ray_adapter._plan(study)
    names = list(plan["trials"])
    assert names[-2:] == ["ablation/pykeen-tucker/seed-0", "ablation/pykeen-tucker/seed-1"]
    assert set(names[:-2]) == {t.name for t in expand_trials(study) if not t.baseline}
    assert plan["matches"] == {
        "ablation/pykeen-tucker/seed-0": "ablation/full/seed-0",
        "ablation/pykeen-tucker/seed-1": "ablation/full/seed-1",
    }


@pytest.mark.parametrize(
    ("text", "where", "message"),
    [
        (
            "baselines: [pykeen:Foo]\n",
            "baselines.pykeen:Foo",
            "unknown baseline; choose one of " + ", ".join(BASELINE_MODELS),
        ),
        ("baselines: [pykeen:tucker]\n", "baselines.pykeen:tucker", "did you mean pykeen:TuckER?"),
        ("baselines: [pykeen:TuckER, pykeen:TuckER]\n", "baselines[1]", "is repeated"),
        ("baselines: []\n", "baselines", "expected at least one baseline"),
        ("baselines: pykeen:TuckER\n", "baselines", "expected a list of baseline names"),
        (
            "baselines: {pykeen:TuckER: {train.lr_stage1: 0.1}}\n",
            "baselines.pykeen:TuckER.train.lr_stage1",
            "only baseline.* settings belong to a baseline",
        ),
        (
            "baselines: {pykeen:TuckER: {baseline.lr: 0}}\n",
            "baselines.pykeen:TuckER.baseline.lr",
            "0",
        ),
        (
            "baselines: {pykeen:TuckER: {baseline.lrate: 0.1}}\n",
            "baselines.pykeen:TuckER.baseline.lrate",
            "did you mean baseline.lr?",
        ),
        (
            "baselines: {pykeen:TuckER: {baseline.model: pykeen:RotatE}}\n",
            "baselines.pykeen:TuckER.baseline.model",
            "the model is the entry's name",
        ),
        (
            "baselines: {pykeen:TuckER: {baseline.budget_seconds: 10}}\n",
            "baselines.pykeen:TuckER.baseline.budget_seconds",
            "baseline_budget sets it",
        ),
        (
            "baselines: {pykeen:TuckER: {baseline.epochs: 3}}\nbaseline_budget: {epochs: 5}\n",
            "baselines.pykeen:TuckER.baseline.epochs",
            "baseline_budget sets it",
        ),
        (
            "baselines: {pykeen:TuckER: {baseline.lr: []}}\n",
            "baselines.pykeen:TuckER.baseline.lr",
            "expected a non-empty list of values",
        ),
        ("baselines: [pykeen:TuckER]\nbaseline_budget: all\n", "baseline_budget", "expected match"),
        (
            "baselines: [pykeen:TuckER]\nbaseline_budget: {epochs: 0}\n",
            "baseline_budget.epochs",
            "expected an integer >= 1",
        ),
        (
            "baselines: [pykeen:TuckER]\nbaseline_budget: {epochs: 2, seconds: 3}\n",
            "baseline_budget.seconds",
            "unknown key; valid keys: epochs",
        ),
        (
            "baselines: [pykeen:TuckER]\nbaseline_budget: {seconds: -1}\n",
            "baseline_budget.seconds",
            "expected a number of seconds > 0",
        ),
        (
            "baselines: [pykeen:TuckER]\nbaseline_budget: {seconds: 60, clock: gpu}\n",
            "baseline_budget.clock",
            "'gpu' is not a clock; choose one of cpu, wall",
        ),
        (
            "baselines: [pykeen:TuckER]\nbaseline_budget: {minutes: 1}\n",
            "baseline_budget.minutes",
            "unknown budget",
        ),
        ("baseline_budget: match\n", "baseline_budget", "the study has no baselines"),
    ],
)
def test_bad_baselines_are_refused_naming_the_file_and_the_key(tmp_path, text, where, message):
    path = write_study(tmp_path, text)
    with pytest.raises(StudyError) as error:
        load_study(path)
    assert str(error.value).startswith(f"{path}: {where}: "), str(error.value)
    assert message in str(error.value)


def test_a_baseline_cell_named_as_a_variant_is_refused(tmp_path):
    base = ABLATION.replace("no-mgat: {structure.encoder: none}", "pykeen-tucker: {loss.w_kl: 0.5}")
    path = write_study(tmp_path, "baselines: [pykeen:TuckER]\n", base)
    with pytest.raises(StudyError, match=r"baselines\.pykeen:TuckER: its cell 'pykeen-tucker' has"):
        load_study(path)


@pytest.mark.parametrize("kind", ["search", "sensitivity"])
def test_baselines_belong_to_ablations_only(tmp_path, kind):
    main = {
        "search": "search: {algorithm: grid, space: {diffusion.steps: {type: grid, values: [5]}}}",
        "sensitivity": "axes: {diffusion.steps: [5, 10]}",
    }[kind]
    path = tmp_path / "study.yaml"
    path.write_text(f"kind: {kind}\n{main}\nbaselines: [pykeen:TuckER]\n")
    with pytest.raises(StudyError) as error:
        load_study(path)
    assert str(error.value) == (
        f"{path}: baselines: belongs to ablation studies; this study is kind {kind}"
    )


@pytest.mark.parametrize(
    ("text", "where"),
    [
        ("", "variants.no-mgat.baseline.model"),  # a variant that is a baseline
        ("baselines: [pykeen:TuckER]\n", "variants.no-mgat.baseline.model"),
    ],
)
def test_a_variant_may_not_be_a_baseline(tmp_path, text, where):
    base = ABLATION.replace("{structure.encoder: none}", "{baseline.model: pykeen:TransE}")
    path = write_study(tmp_path, text, base)
    with pytest.raises(StudyError, match=rf"{where}: an ablation's baselines are listed under"):
        load_study(path)


def test_overrides_may_tune_every_baseline_but_not_the_budget(tmp_path):
    base = ABLATION.replace("  features.image_encoder: none\n", "  baseline.embedding_dim: 16\n")
    study = load_study(write_study(tmp_path, "baselines: [pykeen:TuckER]\n", base))
    assert trial_config(study, expand_trials(study)[-1]).baseline.embedding_dim == 16
    base = ABLATION.replace("  features.image_encoder: none\n", "  baseline.budget_seconds: 9\n")
    path = write_study(tmp_path, "baselines: [pykeen:TuckER]\n", base)
    with pytest.raises(StudyError, match=r"overrides\.baseline\.budget_seconds: baseline_budget"):
        load_study(path)


def test_set_at_launch_may_not_change_what_the_baselines_vary(tmp_path):
    path = write_study(tmp_path, "baselines: {pykeen:TuckER: {baseline.lr: 0.003}}\n")
    assert load_study(path, ["baseline.epochs=7"]).overrides[-1] == ("baseline.epochs", 7)
    for text, varies in [
        ("baseline.lr=0.1", "(baselines.pykeen:TuckER)"),
        ("baseline.model=pykeen:RotatE", "(baselines)"),
        ("baseline.budget_seconds=5", "(baseline_budget)"),
    ]:
        with pytest.raises(StudyError) as error:
            load_study(path, [text])
        assert f"{path}: --set {text}: the study varies" in str(error.value)
        assert varies in str(error.value)
    plain = write_study(tmp_path, "")
    with pytest.raises(StudyError, match=r"--set baseline.model=pykeen:RotatE: overrides"):
        load_study(plain, ["baseline.model=pykeen:RotatE"])


# ------------------------------------------------------------------------ the matched budget


@pytest.fixture
def experiment(tmp_path):
    write_json(
        tmp_path / "experiment.json",
        {"name": "unit", "kind": "ablation", "metric": "valid.clean.mrr", "mode": "max"},
    )
    return tmp_path


def _finish(run: Path, cpu: float, wall: float, stage1: dict | None = None, state="finished"):
    """A reference run folder as a finished trial leaves it, written by hand."""
    write_json(run / "results.json", {"timings": {"train_seconds": wall, "cpu_seconds": cpu}})
    status = {"state": state, "attempts": [{}], **({"stage1": stage1} if stage1 else {})}
    write_json(run / "status.json", status)


def _shared_stage1(root: Path, key: str, cpu: float, wall: float) -> dict:
    run = root / "stage1" / key / "run"
    write_json(run / "results.json", {"timings": {"train_seconds": wall, "cpu_seconds": cpu}})
    checkpoint = run / "checkpoints" / "last.pt"
    # What the stage-1 store leaves for a finished key: its checkpoint and done.json.
    checkpoint.parent.mkdir(parents=True)
    checkpoint.write_bytes(b"")
    write_json(
        root / "stage1" / key / "done.json", {"checkpoint": str(checkpoint), "seconds": wall}
    )
    return {"key": key, "reused": True, "checkpoint": str(checkpoint), "train_seconds": wall}


def test_the_budget_is_the_reference_run_and_its_shared_stage1(experiment):
    reference = experiment / "runs" / "ablation/full/seed-0"
    assert matched_budget(experiment, "ablation/full/seed-0", "cpu") is None  # not started
    write_json(reference / "status.json", {"state": "running", "attempts": [{}]})
    assert matched_budget(experiment, "ablation/full/seed-0", "cpu") is None
    stage1 = _shared_stage1(experiment, "abc123", cpu=30.5, wall=20.25)
    _finish(reference, cpu=12.0, wall=8.0, stage1=stage1)
    assert matched_budget(experiment, "ablation/full/seed-0", "cpu") == 42.5
    assert matched_budget(experiment, "ablation/full/seed-0", "wall") == 28.25
    # A run that trained its own stage 1 has it in its own timings.
    _finish(reference, cpu=12.0, wall=8.0)
    assert matched_budget(experiment, "ablation/full/seed-0", "cpu") == 12.0


def test_a_shared_stage1_of_a_parent_experiment_is_found_by_its_key(experiment, tmp_path_factory):
    parent = tmp_path_factory.mktemp("parent")
    stage1 = _shared_stage1(parent, "k1", cpu=5.0, wall=4.0)
    stage1["checkpoint"] = "/moved/elsewhere/run/checkpoints/last.pt"  # the layout is trusted
    metadata = read_json(experiment / "experiment.json")
    write_json(experiment / "experiment.json", {**metadata, "parents": [str(parent)]})
    _finish(experiment / "runs" / "r", cpu=1.0, wall=1.0, stage1=stage1)
    assert matched_budget(experiment, "r", "cpu") == 6.0


def test_a_failed_or_incomplete_reference_is_a_clear_failure(experiment):
    reference = experiment / "runs" / "ablation/full/seed-0"
    write_json(
        reference / "status.json",
        {"state": "failed", "error": "loss is nan at stage 2, epoch 3", "attempts": [{}]},
    )
    with pytest.raises(TrialFailed) as error:
        matched_budget(experiment, "ablation/full/seed-0", "cpu")
    assert "the reference run ablation/full/seed-0 failed (loss is nan at stage 2" in str(
        error.value
    )
    write_json(reference / "status.json", {"state": "finished", "attempts": [{}]})
    write_json(reference / "results.json", {"timings": {"train_seconds": 3.0}})
    with pytest.raises(TrialFailed, match=r"results.json: timings.cpu_seconds: expected"):
        matched_budget(experiment, "ablation/full/seed-0", "cpu")


class _FakeTrain:
    """``train`` without training: records the config, writes what a finished run has."""

    def __init__(self):
        self.configs = []

    def __call__(self, config, run_dir, **kwargs):
        from core.config import save_config

        assert kwargs.get("stage1_checkpoint") is None  # a baseline has no shared stage 1
        self.configs.append(config)
        save_config(config, Path(run_dir) / "config.json")
        results = {"valid": {"clean": {"mrr": 0.5}}, "timings": {"cpu_seconds": 1.0}}
        write_json(Path(run_dir) / "results.json", results)
        return results


BASELINE = [
    "data.dataset=nations",
    "features.image_encoder=none",
    "baseline.model=pykeen:DistMult",
    "baseline.embedding_dim=8",
]


def test_a_match_baseline_waits_for_its_reference_then_trains_with_its_cost(
    experiment, monkeypatch
):
    monkeypatch.setattr(trial_module, "MATCH_POLL_SECONDS", 0.05)
    fake = _FakeTrain()
    monkeypatch.setattr(trial_module, "train", fake)
    run = experiment / "runs" / "ablation/pykeen-distmult/seed-0"
    reference = experiment / "runs" / "ablation/full/seed-0"
    seen = {}

    def reference_finishes_once_the_baseline_waits():
        started = time.monotonic()
        while time.monotonic() - started < DEADLINE_S:
            try:
                status = read_json(run / "status.json")
            except Exception:  # not written yet
                status = {}
            if status.get("state") == "waiting":
                seen.update(status)
                break
            time.sleep(0.02)
        stage1 = _shared_stage1(experiment, "s1", cpu=7.25, wall=5.0)
        _finish(reference, cpu=3.5, wall=2.0, stage1=stage1)

    writer = threading.Thread(target=reference_finishes_once_the_baseline_waits)
    writer.start()
    spec = RunSpec(run.relative_to(experiment / "runs").as_posix(), load_config(overrides=BASELINE))
    spec = RunSpec(spec.name, spec.config, match_to="ablation/full/seed-0")
    run_trial(experiment, spec.name, [spec], lambda metrics: None)
    writer.join()

    assert seen["waiting_for"] == "ablation/full/seed-0" and seen["heartbeat"], seen
    assert [c.baseline.budget_seconds for c in fake.configs] == [10.75]
    record = {
        "model": "pykeen:DistMult",
        "budget_seconds": 10.75,
        "clock": "cpu",
        "matched_to": "ablation/full/seed-0",
    }
    status = read_json(run / "status.json")
    assert status["state"] == "finished" and status["baseline"] == record
    assert "waiting_for" not in status and "stage1" not in status
    provenance = read_json(run / "trial.json")
    assert provenance["baseline"] == record
    assert provenance["config"]["baseline"]["budget_seconds"] == 10.75
    assert read_json(run / "config.json")["baseline"]["budget_seconds"] == 10.75
    # The stage-1 store is never asked: it holds only the reference's stage 1 written above.
    assert [p.name for p in (experiment / "stage1").iterdir()] == ["s1"]
    assert not (experiment / "stage1" / "s1" / "events.jsonl").exists()


def test_a_baseline_fails_when_its_reference_failed(experiment, monkeypatch):
    monkeypatch.setattr(trial_module, "MATCH_POLL_SECONDS", 0.05)
    monkeypatch.setattr(trial_module, "train", _FakeTrain())
    write_json(
        experiment / "runs" / "ablation/full/seed-0" / "status.json",
        {"state": "failed", "error": "OSError: disk full", "attempts": [{}]},
    )
    spec = RunSpec("ablation/pykeen-distmult/seed-0", load_config(overrides=BASELINE))
    spec = RunSpec(spec.name, spec.config, match_to="ablation/full/seed-0")
    with pytest.raises(
        TrialFailed, match=r"the reference run ablation/full/seed-0 failed \(OSError"
    ):
        run_trial(experiment, spec.name, [spec], lambda metrics: None)
    status = read_json(experiment / "runs" / spec.name / "status.json")
    assert status["state"] == "failed" and status["failure"] == "reference"
    assert "the reference run ablation/full/seed-0 failed" in status["error"]


def test_a_restarted_baseline_keeps_the_budget_it_resolved(experiment, monkeypatch):
    fake = _FakeTrain()
    monkeypatch.setattr(trial_module, "train", fake)
    spec = RunSpec(
        "ablation/pykeen-distmult/seed-0",
        load_config(overrides=BASELINE),
        match_to="ablation/full/seed-0",
    )
    run = experiment / "runs" / spec.name
    # An earlier attempt resolved 12.5 s and started training; the reference says otherwise now
    # (it is not even there): the budget that ran stays.
    earlier = load_config(overrides=[*BASELINE, "baseline.budget_seconds=12.5"])
    from core.config import save_config

    save_config(earlier, run / "config.json")
    write_json(run / "status.json", {"state": "running", "attempts": [{}]})
    run_trial(experiment, spec.name, [spec], lambda metrics: None)
    assert [c.baseline.budget_seconds for c in fake.configs] == [12.5]
    status = read_json(run / "status.json")
    assert status["baseline"]["budget_seconds"] == 12.5 and len(status["attempts"]) == 2


def test_a_baseline_trial_trains_pykeen_through_the_trainer(experiment):
    config = load_config(overrides=[*BASELINE, "baseline.epochs=2", "baseline.batch_size=512"])
    spec = RunSpec("ablation/pykeen-distmult/seed-0", config)
    reports = []
    run_trial(experiment, spec.name, [spec], reports.append)
    epochs = [(r["stage"], r["epoch"], r["global_epoch"]) for r in reports if not r["final"]]
    assert epochs == [(1, 1, 1), (1, 2, 2)]
    run = experiment / "runs" / spec.name
    results = read_json(run / "results.json")
    assert results["baseline"]["model"] == "pykeen:DistMult"
    assert results["baseline"]["epochs_run"] == 2
    status = read_json(run / "status.json")
    assert status["baseline"] == {
        "model": "pykeen:DistMult",
        "budget_seconds": None,
        "clock": "cpu",
        "matched_to": None,
    }
    assert "stage1" not in status and not (experiment / "stage1").exists()


# --------------------------------------------------------------------- a waiting run's status


def test_a_waiting_run_is_listed_as_waiting_and_alive_until_its_process_ends(experiment):
    run = experiment / "runs" / "ablation/pykeen-tucker/seed-0"
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        write_json(
            run / "status.json",
            {
                "state": "waiting",
                "waiting_for": "ablation/full/seed-0",
                "host": socket.gethostname(),
                "pid": sleeper.pid,
                "heartbeat": "2024-01-01T00:00:00+00:00",
                "attempts": [{"started": "2024-01-01T00:00:00+00:00"}],
            },
        )
        (listed,) = read_statuses(experiment, "valid.clean.mrr")
        assert (listed.state, listed.waiting_for) == ("waiting", "ablation/full/seed-0")
        assert runs_alive_on_this_host(experiment) == [
            ("ablation/pykeen-tucker/seed-0", sleeper.pid)
        ]
    finally:
        sleeper.kill()
        sleeper.wait()
    (listed,) = read_statuses(experiment, "valid.clean.mrr")
    assert listed.state == "interrupted" and runs_alive_on_this_host(experiment) == []
