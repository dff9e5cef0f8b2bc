"""Studies on a real (local or multi-node) Ray: end to end, killed drivers, lost nodes, workers.

Every driver is a ``diffcom sweep`` subprocess, as a user runs it, so a test can SIGKILL it. These
tests run on loaded 2-core machines: every wait is for an event (a status change, a process exit)
under one generous deadline, never for an amount of progress in a fixed time, and a wait that runs
out says what it waited for and what it saw.
"""

import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

from core.train.checkpoint import load_checkpoint
from sweeps.experiment import read_json
from sweeps.stage1 import Stage1Store

pytestmark = pytest.mark.ray

STUDIES = Path(__file__).parent / "studies"
ROOT = Path(__file__).resolve().parents[2]

#: The longest any one wait may take: a whole study, a driver's exit, a process group's death. A
#: smoke study takes a minute or two on a quiet machine and can take ten times that on a busy 2-core
#: one; every wait ends as soon as its event happens, so a generous deadline costs a quiet machine
#: nothing.
DEADLINE_S = 1200


def _environment() -> dict:
    return {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_DEDUP_LOGS": "0"}


def _wait_for(
    predicate: Callable[[], bool],
    what: str,
    deadline_s: float = DEADLINE_S,
    *,
    poll_s: float = 0.5,
    on_timeout: Callable[[], str] = lambda: "",
) -> None:
    """Poll ``predicate`` until it holds; past ``deadline_s`` fail with ``what`` and ``on_timeout()``.

    A predicate that sees its event can no longer come (its driver exited) raises instead.
    """
    started = time.monotonic()
    while not predicate():
        if time.monotonic() - started > deadline_s:
            raise AssertionError(f"waited {deadline_s:.0f} s for {what}; saw:\n{on_timeout()}")
        time.sleep(poll_s)


def _processes() -> dict[int, tuple[str, int, int]]:
    """Every process: ``pid -> (state, parent pid, process group)``, from ``/proc``."""
    table = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError):
            # The command name (field 2) may hold spaces; the fields after its ")" do not.
            state, parent, group = stat.read_text().rpartition(")")[2].split()[:3]
            table[int(stat.parent.name)] = (state, int(parent), int(group))
    return table


def _tree(root: int) -> set[int]:
    """``root``, its process group and all their descendants: a driver and its local Ray, or a
    node's raylet and its workers. Ray workers lead process groups of their own, so killing the
    driver's group alone leaves them training (and writing the run) for many seconds."""
    table = _processes()
    found = {root} | {pid for pid, (_, _, group) in table.items() if group == root}
    todo = list(found)
    while todo:
        parent = todo.pop()
        children = {pid for pid, (_, up, _) in table.items() if up == parent} - found
        found |= children
        todo += children
    return found


def _kill_tree(pids: set[int], what: str) -> None:
    """SIGKILL ``pids`` and wait until none runs (a zombie does not)."""
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)

    def running() -> list[int]:
        table = _processes()
        return sorted(p for p in pids if p in table and table[p][0] not in ("Z", "X"))

    _wait_for(
        lambda: not running(),
        f"{what} to die",
        on_timeout=lambda: (
            subprocess.run(
                ["ps", "-o", "pid,pgid,stat,args", "-p", ",".join(map(str, running())) or "1"],
                capture_output=True,
                text=True,
            ).stdout
        ),
    )


def _tail(text: str, lines: int = 40) -> str:
    return "\n".join(text.splitlines()[-lines:])


def _trial_states(storage: Path) -> str:
    """One line per run under ``storage``: its state and last epoch, from its ``status.json``."""
    lines = []
    for path in sorted(Path(storage).glob("*/runs/**/status.json")):
        try:
            status = read_json(path)
            lines.append(f"{path.parent}: {status.get('state')}, epoch {status.get('last_epoch')}")
        except Exception as error:  # a file being rewritten; say so rather than hide the rest
            lines.append(f"{path}: unreadable ({error})")
    return "\n".join(lines) or f"no status.json under {storage}"


@dataclass
class _Driver:
    """A ``diffcom`` subprocess leading its own process group (the local Ray it starts joins it).

    Its output goes to unnamed temporary files, which never fill up and block it as a pipe can.
    """

    args: tuple
    storage: Path
    stdout: object = field(default_factory=tempfile.TemporaryFile)
    stderr: object = field(default_factory=tempfile.TemporaryFile)

    def __post_init__(self) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "diffcom", *map(str, self.args)],
            cwd=ROOT,
            env=_environment(),
            stdout=self.stdout,
            stderr=self.stderr,
            start_new_session=True,
        )

    def read(self, stream) -> str:
        stream.seek(0)
        return stream.read().decode(errors="replace")

    def report(self) -> str:
        """What a failed wait shows: the exit status, the end of stderr, every trial's state."""
        return (
            f"`diffcom {' '.join(map(str, self.args))}`: exit status {self.process.poll()}\n"
            f"--- last lines of its stderr ---\n{_tail(self.read(self.stderr))}\n"
            f"--- trials ---\n{_trial_states(self.storage)}"
        )

    def running(self) -> bool:
        """True while the driver runs; an assertion error with its report once it has exited."""
        if self.process.poll() is not None:
            raise AssertionError(f"the driver exited early:\n{self.report()}")
        return True

    def wait(self) -> int:
        _wait_for(
            lambda: self.process.poll() is not None,
            f"`diffcom {' '.join(map(str, self.args))}` to exit",
            on_timeout=self.report,
        )
        return self.process.returncode

    def kill(self) -> None:
        """SIGKILL the driver and its local Ray, workers included, and wait until they are gone."""
        _kill_tree(_tree(self.process.pid), f"the driver {self.process.pid} and its Ray")
        self.process.wait()


def _storage_of(args: tuple) -> Path:
    return Path(args[list(args).index("--storage") + 1])


def _start(*args) -> _Driver:
    return _Driver(args, _storage_of(args))


def _diffcom(*args) -> subprocess.CompletedProcess:
    """Run one ``diffcom`` command to its end; nothing of it outlives the call."""
    driver = _start(*args)
    try:
        returncode = driver.wait()
    finally:
        # A finished driver has shut its Ray down; this ends whatever a failure left behind.
        driver.kill()
    return subprocess.CompletedProcess(
        driver.process.args, returncode, driver.read(driver.stdout), driver.read(driver.stderr)
    )


def _epochs(run: Path) -> list[tuple[int, int]]:
    metrics = run / "metrics.jsonl"
    if not metrics.is_file():
        return []
    return [(r["stage"], r["epoch"]) for r in map(json.loads, metrics.read_text().splitlines())]


def _status(run: Path) -> dict:
    try:
        return read_json(run / "status.json")
    except Exception:  # not written yet, or being replaced
        return {}


def _state(run: Path) -> str | None:
    return _status(run).get("state")


def _checkpointed_epoch(run: Path) -> list | None:
    """``[stage, epoch]`` of the last epoch whose checkpoint was saved (``status.json`` says so
    only after ``checkpoints/last.pt`` is written; ``metrics.jsonl`` says so before)."""
    return _status(run).get("last_epoch")


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
    events = Stage1Store(experiment / "stage1").events()
    assert [e["event"] for e in events].count("trained") == 2  # 4 runs, 2 seeds
    # A seed's two runs train as one fused pack (the study's pack: 8), which obtains it once.
    assert [e["event"] for e in events].count("reused") == 0
    keys = {}
    for run in runs:
        provenance = read_json(run / "trial.json")
        assert {"config", "seed", "code", "packages", "dataset_hash"} <= provenance.keys()
        assert read_json(run / "config.json") == provenance["config"]
        status = read_json(run / "status.json")
        keys.setdefault(run.name, set()).add(status["stage1"]["key"])
        assert status["fused"]["members"] == [
            f"sensitivity/diffusion.steps={steps}/{run.name}" for steps in (5, 10)
        ]
    # Both step values of a seed share its stage-1 run; the two seeds do not share one.
    assert [len(k) for k in keys.values()] == [1, 1] and keys["seed-0"] != keys["seed-1"]
    assert keys["seed-0"] | keys["seed-1"] == {
        p.name for p in (experiment / "stage1").iterdir()
    } - {p.name for p in (experiment / "stage1").glob("*.lock")}
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
    refused = _diffcom("sweep", "launch", study, "--storage", tmp_path)
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
    missing = _diffcom("sweep", "resume", "nothing-here", "--storage", tmp_path)
    assert missing.returncode == 2 and "no experiment 'nothing-here'" in missing.stderr
    assert not list(tmp_path.glob("*/experiment.json"))


def test_a_killed_driver_resumes_without_rerunning_finished_trials(tmp_path):
    experiment = tmp_path / "smoke-ablation"
    runs = experiment / "runs" / "ablation"
    driver = _start("sweep", "launch", STUDIES / "smoke-ablation.yaml", "--storage", tmp_path)
    try:
        # The long cell has 40 stage-2 epochs and the short one 1, so the short one finishes while
        # the long one runs however slow the machine; if the driver exits first, the wait says so.
        _wait_for(
            lambda: (
                driver.running()
                and _state(runs / "short/seed-0") == "finished"
                and (_checkpointed_epoch(runs / "long/seed-0") or [0, 0]) >= [2, 3]
            ),
            "the short cell finished and three checkpointed stage-2 epochs of the long cell",
            on_timeout=driver.report,
        )
        seen = _checkpointed_epoch(runs / "long/seed-0")
    finally:
        # The driver and the local Ray it started die at once, as with their machine.
        driver.kill()
    assert _state(runs / "long/seed-0") != "finished", driver.report()
    short_results = (runs / "short/seed-0/results.json").stat().st_mtime_ns
    long_before = _epochs(runs / "long/seed-0")
    assert not (runs / "long/seed-0/results.json").exists()
    checkpointed = load_checkpoint(runs / "long/seed-0/checkpoints/last.pt")["stage2"]["epoch"]
    assert seen[1] <= checkpointed <= len(long_before), (seen, checkpointed, long_before)

    resumed = _diffcom("sweep", "resume", "smoke-ablation", "--storage", tmp_path)
    assert resumed.returncode == 1, resumed.stderr[-3000:]  # the diverging cell fails, by design

    assert (runs / "short/seed-0/results.json").stat().st_mtime_ns == short_results
    assert len(read_json(runs / "short/seed-0/status.json")["attempts"]) == 1
    long_status = read_json(runs / "long/seed-0/status.json")
    assert long_status["state"] == "finished"
    # The first attempt after the kill starts from the checkpoint the kill left, not earlier.
    assert [a["resumed_from"] for a in long_status["attempts"][:2]] == [None, [2, checkpointed]]
    long_epochs = _epochs(runs / "long/seed-0")
    assert long_epochs[:checkpointed] == long_before[:checkpointed]
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
        cluster.wait_for_nodes(timeout=DEADLINE_S)
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
            lambda: driver.running() and (_checkpointed_epoch(run) or [0, 0]) >= [2, 3],
            "three checkpointed stage-2 epochs on the first node",
            on_timeout=driver.report,
        )
        seen = _checkpointed_epoch(run)
        # The node's workers die with it, as on a real machine (see _tree).
        node_processes = _tree(first.all_processes["raylet"][0].process.pid)
        cluster.remove_node(first, allow_graceful=False)
        _kill_tree(node_processes, "the lost node's raylet and workers")
        cluster.add_node(num_cpus=1)
        assert driver.wait() == 0, driver.report()
    finally:
        if driver is not None:
            driver.kill()
        cluster.shutdown()
    status = read_json(run / "status.json")
    assert status["state"] == "finished"
    first_attempt, last_attempt = status["attempts"][0], status["attempts"][-1]
    assert last_attempt["node"] != first_attempt["node"]
    assert last_attempt["resumed_from"][0] == 2 and last_attempt["resumed_from"][1] >= seen[1]
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
    study = STUDIES / "smoke-search.yaml"
    space = yaml.safe_load(study.read_text())["search"]["space"]
    steps, w_kl = space["diffusion.steps"], space["loss.w_kl"]
    done = _diffcom("sweep", "launch", study, "--storage", tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    old = tmp_path / "smoke-search"
    points = sorted(old.glob("runs/search/*/seed-0/point.json"))
    assert len(points) == 3
    for point in points:
        drawn = read_json(point)
        assert drawn["diffusion.steps"] in range(steps["low"], steps["high"] + 1, steps["q"])
        assert w_kl["low"] <= drawn["loss.w_kl"] <= w_kl["high"]
        config = read_json(point.parent / "config.json")
        assert config["diffusion"]["steps"] == drawn["diffusion.steps"]
        assert config["loss"]["w_kl"] == drawn["loss.w_kl"]
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


def test_a_search_keeps_its_optuna_study_in_the_experiments_sqlite_file(tmp_path):
    import optuna

    from sweeps.experiment import read_json_object

    done = _diffcom("sweep", "launch", STUDIES / "smoke-search.yaml", "--storage", tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    experiment = tmp_path / "smoke-search"
    url = f"sqlite:///{experiment}/optuna.db"
    assert read_json(experiment / "experiment.json")["optuna_storage"] == url
    study = optuna.load_study(study_name="smoke-search", storage=url)
    assert len(study.trials) == 3
    completed = sorted(
        ((t.params, t.value) for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE),
        key=lambda pair: json.dumps(pair[0], sort_keys=True),
    )
    finished = sorted(
        (
            (
                read_json_object(run / "point.json"),  # without its format_version
                read_json(run / "results.json")["valid"]["clean"]["mrr"],
            )
            for run in experiment.glob("runs/search/*/seed-0")
            if _state(run) == "finished"
        ),
        key=lambda pair: json.dumps(pair[0], sort_keys=True),
    )
    # One completed Optuna trial per finished point, same params and value; ASHA's stops are
    # pruned, not completed with a partial value.
    assert [p for p, _ in completed] == [p for p, _ in finished] and finished
    assert [v for _, v in completed] == pytest.approx([v for _, v in finished])
    assert all(
        t.state == optuna.trial.TrialState.PRUNED
        for t in study.trials
        if t.state != optuna.trial.TrialState.COMPLETE
    )
    status = _diffcom("sweep", "status", "smoke-search", "--storage", tmp_path)
    assert f"optuna-dashboard {url}" in status.stdout
