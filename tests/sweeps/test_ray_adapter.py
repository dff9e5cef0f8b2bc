"""Studies on a real (local or multi-node) Ray: end to end, killed drivers, lost nodes, workers.

Every driver is a ``diffcom sweep`` subprocess, as a user runs it, so a test can SIGKILL it.
"""

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sweeps.experiment import read_json
from sweeps.stage1 import Stage1Store

pytestmark = pytest.mark.slow

STUDIES = Path(__file__).parent / "studies"
ROOT = Path(__file__).resolve().parents[2]


def _environment() -> dict:
    return {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_DEDUP_LOGS": "0"}


def _diffcom(*args, timeout=300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "core.cli", *map(str, args)],
        cwd=ROOT,
        env=_environment(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _start(*args) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "core.cli", *map(str, args)],
        cwd=ROOT,
        env=_environment(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,  # the driver and the local Ray it starts share one group
    )


def _epochs(run: Path) -> list[tuple[int, int]]:
    metrics = run / "metrics.jsonl"
    if not metrics.is_file():
        return []
    return [(r["stage"], r["epoch"]) for r in map(json.loads, metrics.read_text().splitlines())]


def _wait_for(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.5)


def _state(run: Path) -> str | None:
    try:
        return read_json(run / "status.json").get("state")
    except Exception:
        return None


def test_a_stage2_sensitivity_study_end_to_end_trains_stage1_once_per_seed(tmp_path):
    done = _diffcom("sweep", "launch", STUDIES / "smoke-sensitivity.yaml", "--storage", tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    experiment = tmp_path / "smoke-sensitivity"
    runs = sorted(p.parent for p in (experiment / "runs").glob("**/results.json"))
    assert [r.relative_to(experiment / "runs").as_posix() for r in runs] == [
        "sensitivity/diffusion.steps=10/seed-0",
        "sensitivity/diffusion.steps=10/seed-1",
        "sensitivity/diffusion.steps=5/seed-0",
        "sensitivity/diffusion.steps=5/seed-1",
    ]
    events = [e["event"] for e in Stage1Store(experiment / "stage1").events()]
    assert events.count("trained") == 2 and events.count("reused") == 2  # 4 trials, 2 seeds
    for run in runs:
        provenance = read_json(run / "trial.json")
        assert {"config", "seed", "code", "packages", "dataset_hash"} <= provenance.keys()
        assert read_json(run / "config.json") == provenance["config"]
        assert read_json(run / "status.json")["stage1"]["key"]
    assert (experiment / "tuner.pkl").is_file()  # Ray's own state, for resume

    status = _diffcom("sweep", "status", "smoke-sensitivity", "--storage", tmp_path)
    assert status.returncode == 0 and "runs: 4 finished" in status.stdout
    assert "best so far: sensitivity/" in status.stdout

    again = _diffcom("sweep", "launch", STUDIES / "smoke-sensitivity.yaml", "--storage", tmp_path)
    assert again.returncode == 2 and "already exists" in again.stderr
    assert "diffcom sweep resume smoke-sensitivity" in again.stderr


def test_bad_input_is_refused_before_ray_starts(tmp_path):
    study = tmp_path / "bad.yaml"
    study.write_text(
        (STUDIES / "smoke-sensitivity.yaml")
        .read_text()
        .replace("diffusion.steps: [5, 10]", "diffusion.stepz: [5]")
    )
    refused = _diffcom("sweep", "launch", study, "--storage", tmp_path, timeout=60)
    assert refused.returncode == 2 and f"{study}" in refused.stderr and "stepz" in refused.stderr
    escaping = _diffcom(
        "sweep",
        "launch",
        STUDIES / "smoke-sensitivity.yaml",
        "--name",
        "../out",
        "--storage",
        tmp_path,
    )
    assert escaping.returncode == 2 and "is not allowed" in escaping.stderr
    missing = _diffcom("sweep", "resume", "nothing-here", "--storage", tmp_path, timeout=60)
    assert missing.returncode == 2 and "no experiment 'nothing-here'" in missing.stderr
    assert not list(tmp_path.glob("*/experiment.json"))


def test_a_killed_driver_resumes_without_rerunning_finished_trials(tmp_path):
    experiment = tmp_path / "smoke-ablation"
    runs = experiment / "runs" / "ablation"
    driver = _start("sweep", "launch", STUDIES / "smoke-ablation.yaml", "--storage", tmp_path)
    try:
        _wait_for(
            lambda: (
                _state(runs / "short/seed-0") == "finished"
                and len(_epochs(runs / "long/seed-0")) >= 3
            ),
            timeout=240,
            what="one finished trial and one running trial",
        )
        os.kill(driver.pid, signal.SIGKILL)
        driver.wait(timeout=30)
    finally:
        time.sleep(3)
        # What the driver left behind (Ray's helper processes) dies too, as with its machine.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(driver.pid, signal.SIGKILL)
    short_results = (runs / "short/seed-0/results.json").stat().st_mtime_ns
    long_before = _epochs(runs / "long/seed-0")
    assert not (runs / "long/seed-0/results.json").exists()

    resumed = _diffcom("sweep", "resume", "smoke-ablation", "--storage", tmp_path)
    assert resumed.returncode == 1, resumed.stderr[-3000:]  # the diverging cell fails, by design

    assert (runs / "short/seed-0/results.json").stat().st_mtime_ns == short_results
    assert len(read_json(runs / "short/seed-0/status.json")["attempts"]) == 1
    long_status = read_json(runs / "long/seed-0/status.json")
    assert long_status["state"] == "finished"
    resumed_from = long_status["attempts"][-1]["resumed_from"]
    assert resumed_from is not None and resumed_from[0] == 2 and resumed_from[1] >= 3
    long_epochs = _epochs(runs / "long/seed-0")
    assert long_epochs[: len(long_before) - 1] == long_before[:-1]
    assert long_epochs == [(2, e) for e in range(1, 41)]  # no epoch repeated or lost

    diverging = read_json(runs / "diverging/seed-0/status.json")
    assert diverging["state"] == "failed" and diverging["failure"] == "non-finite-loss"
    assert "loss is nan" in diverging["error"]
    assert len(diverging["attempts"]) == 1  # retries fail at once instead of repeating it
    status = _diffcom("sweep", "status", "smoke-ablation", "--storage", tmp_path)
    assert "1 failed, 2 finished" in status.stdout and "loss is nan" in status.stdout


def test_a_trial_on_a_lost_node_finishes_from_its_checkpoint_elsewhere(tmp_path, monkeypatch):
    from ray.cluster_utils import Cluster

    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    driver = None
    try:
        first = cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
        run = tmp_path / "smoke-node-loss" / "runs" / "ablation" / "long" / "seed-0"
        driver = _start(
            "sweep",
            "launch",
            STUDIES / "smoke-node-loss.yaml",
            "--storage",
            tmp_path,
            "--address",
            cluster.address,
        )
        _wait_for(
            lambda: len(_epochs(run)) >= 3, timeout=240, what="three epochs on the first node"
        )
        cluster.remove_node(first, allow_graceful=False)
        cluster.add_node(num_cpus=1)
        assert driver.wait(timeout=300) == 0
    finally:
        if driver is not None and driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)
        cluster.shutdown()
    status = read_json(run / "status.json")
    assert status["state"] == "finished"
    first_attempt, last_attempt = status["attempts"][0], status["attempts"][-1]
    assert last_attempt["node"] != first_attempt["node"]
    assert last_attempt["resumed_from"][0] == 2 and last_attempt["resumed_from"][1] >= 3
    assert _epochs(run) == [(2, e) for e in range(1, 41)]


def test_a_two_worker_trial_runs_accelerate_inside_ray_train(tmp_path):
    done = _diffcom("sweep", "launch", STUDIES / "smoke-two-workers.yaml", "--storage", tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    run = tmp_path / "smoke-two-workers" / "runs" / "ablation" / "full" / "seed-0"
    results = read_json(run / "results.json")
    assert results["environment"]["processes"] == 2
    assert read_json(run / "status.json")["state"] == "finished"
    assert _epochs(run) == [(2, 1), (2, 2)]  # written once, by the main worker


def test_a_search_is_extended_as_a_new_linked_experiment(tmp_path):
    done = _diffcom("sweep", "launch", STUDIES / "smoke-search.yaml", "--storage", tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    old = tmp_path / "smoke-search"
    points = sorted(old.glob("runs/search/*/seed-0/point.json"))
    assert len(points) == 3
    for point in points:
        drawn = read_json(point)
        assert drawn["diffusion.steps"] in (5, 10, 15, 20) and 0.1 <= drawn["loss.w_kl"] <= 10
        config = read_json(point.parent / "config.json")
        assert config["diffusion"]["steps"] == drawn["diffusion.steps"]
    before = {p: p.stat().st_mtime_ns for p in old.rglob("*") if p.is_file()}

    wrong = _diffcom("sweep", "extend", "smoke-search", "--seeds", "4", "--storage", tmp_path)
    assert wrong.returncode == 2 and "extend it with --samples" in wrong.stderr
    extended = _diffcom("sweep", "extend", "smoke-search", "--samples", "1", "--storage", tmp_path)
    assert extended.returncode == 0, extended.stderr[-3000:]
    new = tmp_path / "smoke-search-ext1"
    metadata = read_json(new / "experiment.json")
    # Optuna is warm-started with every point that finished (ASHA may have stopped one early).
    finished = [p for p in points if _state(p.parent) == "finished"]
    assert {_state(p.parent) for p in points} <= {"finished", "stopped"} and finished
    assert metadata["parents"] == [str(old)]
    assert metadata["extension"]["warm_start"] == len(finished)
    assert len(list(new.glob("runs/search/*/seed-0/results.json"))) == 1
    assert {p: p.stat().st_mtime_ns for p in old.rglob("*") if p.is_file()} == before
    events = Stage1Store(new / "stage1").events()
    assert [e["event"] for e in events] == ["reused"]
    assert events[0]["source"] == str(old / "stage1")


def test_set_at_launch_is_recorded_and_extend_applies_it_again(tmp_path):
    # The 40-epoch node-loss study, cut to one stage-2 epoch from the command line.
    sets = ["--set", "train.stage2_epochs=1", "--set", "eval.official_samples=1"]
    study = STUDIES / "smoke-node-loss.yaml"
    done = _diffcom("sweep", "launch", study, *sets, "--name", "cut", "--storage", tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    extended = _diffcom("sweep", "extend", "cut", "--seeds", "1", "--storage", tmp_path)
    assert extended.returncode == 0, extended.stderr[-3000:]

    for name, seed in (("cut", 0), ("cut-ext1", 1)):
        experiment = tmp_path / name
        metadata = read_json(experiment / "experiment.json")
        assert metadata["launch_overrides"] == ["train.stage2_epochs=1", "eval.official_samples=1"]
        assert (
            "# launched with --set train.stage2_epochs=1" in (experiment / "study.yaml").read_text()
        )
        run = experiment / "runs" / "ablation" / "long" / f"seed-{seed}"
        config = read_json(run / "config.json")
        assert config["train"]["stage2_epochs"] == 1 and config["eval"]["official_samples"] == 1
        assert config["data"]["dataset"] == "nations"  # the study's own overrides still hold
        assert _epochs(run)[-1] == (2, 1)
        assert read_json(run / "status.json")["state"] == "finished"
    status = _diffcom("sweep", "status", "cut-ext1", "--storage", tmp_path)
    assert (
        "launched with: --set train.stage2_epochs=1 --set eval.official_samples=1" in status.stdout
    )
    assert "runs: 1 finished" in status.stdout
