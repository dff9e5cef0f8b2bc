"""A study with baselines on a real local Ray: matched budgets, and a killed driver's resume.

The drivers are ``diffcom sweep`` subprocesses (the helpers of ``test_ray_adapter.py``); every wait
is for an event under one generous deadline, never for an amount of progress in a fixed time.
"""

from pathlib import Path

import pytest

from sweeps.experiment import read_json
from sweeps.trial import matched_budget
from tests.sweeps.test_ray_adapter import _diffcom, _epochs, _start, _state, _status, _wait_for

pytestmark = pytest.mark.ray

STUDIES = Path(__file__).parent / "studies"
BASELINES = ("pykeen-distmult", "pykeen-tucker")


def _resolved(run: Path) -> bool:
    """The baseline has its budget and trains (a checkpointed epoch), or has finished."""
    status = _status(run)
    return status.get("state") == "finished" or bool(
        status.get("baseline") and status.get("last_epoch")
    )


def test_baselines_train_at_the_reference_cost_and_resume_after_a_killed_driver(tmp_path):
    experiment = tmp_path / "smoke-baselines"
    runs = experiment / "runs" / "ablation"
    reference = runs / "full/seed-0"
    driver = _start("sweep", "launch", STUDIES / "smoke-baselines.yaml", "--storage", tmp_path)
    try:
        _wait_for(
            lambda: (
                driver.running()
                and _state(reference) == "finished"
                and any(_resolved(runs / f"{name}/seed-0") for name in BASELINES)
            ),
            "the full run finished and a baseline training at its matched budget",
            on_timeout=driver.report,
        )
    finally:
        driver.kill()
    plan = read_json(experiment / "plan.json")
    assert list(plan["trials"]) == [f"ablation/{name}/seed-0" for name in ("full", *BASELINES)]
    budget = matched_budget(experiment, "ablation/full/seed-0", "cpu")
    assert budget is not None and budget > 0
    before = {}
    for name in ("full", *BASELINES):
        run = runs / f"{name}/seed-0"
        finished = _state(run) == "finished"
        before[name] = {
            "finished": finished,
            "results": (run / "results.json").stat().st_mtime_ns if finished else None,
            "budget": (_status(run).get("baseline") or {}).get("budget_seconds"),
            "checkpointed": _status(run).get("last_epoch") if not finished else None,
        }

    resumed = _diffcom("sweep", "resume", "smoke-baselines", "--storage", tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]

    for name, seen in before.items():
        run = runs / f"{name}/seed-0"
        status = read_json(run / "status.json")
        assert status["state"] == "finished", (name, status)
        if seen["finished"]:  # nothing finished is trained again
            assert (run / "results.json").stat().st_mtime_ns == seen["results"], name
            assert len(status["attempts"]) == 1, name
        elif seen["checkpointed"]:  # continued from its checkpoint, not from scratch
            assert status["attempts"][1]["resumed_from"] is not None, (name, status)
    assert matched_budget(experiment, "ablation/full/seed-0", "cpu") == budget

    for name in BASELINES:
        run = runs / f"{name}/seed-0"
        status = read_json(run / "status.json")
        assert status["baseline"]["matched_to"] == "ablation/full/seed-0"
        # Each baseline trained with the reference's cost, resolved once and kept on resume.
        assert status["baseline"]["budget_seconds"] == budget, (name, status["baseline"])
        assert before[name]["budget"] in (None, budget)
        assert read_json(run / "config.json")["baseline"]["budget_seconds"] == budget
        assert read_json(run / "trial.json")["baseline"] == status["baseline"]
        results = read_json(run / "results.json")
        assert results["baseline"]["budget_seconds"] == budget
        assert results["baseline"]["stopped_by"] in ("budget", "epochs")
        epochs = _epochs(run)
        assert epochs == [(1, e) for e in range(1, len(epochs) + 1)], name  # none lost or repeated
        assert results["baseline"]["epochs_run"] == len(epochs)
        assert "stage1" not in status

    shown = _diffcom("sweep", "status", "smoke-baselines", "--storage", tmp_path)
    assert shown.returncode == 0 and "runs: 3 finished" in shown.stdout, shown.stdout
