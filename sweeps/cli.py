"""``diffcom sweep launch|resume|extend|status``: studies on Ray Tune from the command line."""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path

__all__ = ["add_sweep_commands"]


def _storage_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--storage",
        help="experiment storage: a folder path (or file:// URI) every node sees, created if "
        "missing; not empty, not a file (default: $DIFFCOM_STORAGE or ~/diffcom-experiments)",
    )


def _address_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--address",
        help="a running Ray cluster to join (e.g. auto, or ray://HOST:10001); "
        "without it a local Ray starts on this machine",
    )


def _check_new_name(name: str | None, option: str) -> None:
    """Refuse an empty name (the adapter would take the default for it) and a bad one."""
    from sweeps.experiment import ExperimentError, check_name

    if name is None:
        return
    if not name.strip():
        raise ExperimentError(f"{option} is empty: give a name, or leave {option} out")
    check_name(name)


def _note_default_seeds(study: str) -> None:
    """Say so when a study sets no ``seeds:`` and every cell trains once, with seed 0.

    The default stays (it keeps small studies short); this makes it visible before Ray starts.
    An unreadable file is left to :func:`sweeps.study.load_study`, which names the problem.
    """
    import yaml

    try:
        data = yaml.safe_load(Path(study).read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return
    if isinstance(data, dict) and "seeds" not in data:
        print(
            f"note: {study} sets no seeds: every cell trains once, with seed 0 "
            "(add e.g. `seeds: [0, 1, 2]` for more)",
            file=sys.stderr,
        )


def _launch(args: argparse.Namespace) -> int:
    from sweeps.experiment import resolve_storage
    from sweeps.ray_adapter import launch

    _check_new_name(args.name, "--name")
    resolve_storage(args.storage)  # an empty or file --storage, refused before the study loads
    _note_default_seeds(args.study)
    folder = launch(
        args.study,
        overrides=tuple(args.overrides),
        name=args.name,
        storage=args.storage,
        address=args.address,
    )
    return _finish(folder)


def _resume(args: argparse.Namespace) -> int:
    from sweeps.experiment import resolve_storage

    resolve_storage(args.storage)  # refused before Ray Tune is even imported
    from sweeps.ray_adapter import resume

    return _finish(resume(args.name, storage=args.storage, address=args.address))


def _extend(args: argparse.Namespace) -> int:
    from sweeps.experiment import ExperimentError, resolve_storage

    _check_new_name(args.new_name, "--new-name")
    resolve_storage(args.storage)
    if args.seeds:
        negative = [seed for seed in args.seeds if seed < 0]
        repeated = sorted({seed for seed in args.seeds if args.seeds.count(seed) > 1})
        if negative or repeated:
            problem = f"negative {negative}" if negative else f"repeated {repeated}"
            raise ExperimentError(f"--seeds: {problem}; give distinct seeds >= 0")
    from sweeps.ray_adapter import extend

    folder = extend(
        args.name,
        samples=args.samples,
        seeds=tuple(args.seeds) if args.seeds else None,
        new_name=args.new_name,
        storage=args.storage,
        address=args.address,
    )
    return _finish(folder)


def _finish(folder: Path) -> int:
    from sweeps.experiment import read_experiment, read_statuses

    metadata = read_experiment(folder)
    counts = _state_counts(read_statuses(folder, metadata["metric"]))
    summary = ", ".join(f"{n} {state}" for state, n in sorted(counts.items()))
    print(f"experiment {folder}: {summary}; see `diffcom sweep status {folder.name}`")
    # Runs the scheduler stopped early (ASHA) ended as designed; failed ones did not.
    return 1 if counts.keys() - {"finished", "stopped"} else 0


def _state_counts(statuses) -> dict[str, int]:
    return dict(Counter(status.state for status in statuses))


def _status(args: argparse.Namespace) -> int:
    from sweeps.experiment import (
        PLAN_FILE,
        ExperimentError,
        experiment_dir,
        read_experiment,
        read_json_object,
        read_statuses,
        resolve_storage,
    )

    folder = experiment_dir(resolve_storage(args.storage), args.name, must_exist=True)
    metadata = read_experiment(folder)
    plan = read_json_object(folder / PLAN_FILE)
    trials = plan.get("trials", {})
    if not isinstance(trials, dict):
        raise ExperimentError(f"{folder / PLAN_FILE}: trials: expected an object of trial names")
    statuses = read_statuses(folder, metadata["metric"], list(trials))
    if args.json:
        print(json.dumps([vars(s) for s in statuses], indent=2))
        return 0
    metric, mode = metadata["metric"], metadata["mode"]
    print(f"experiment {metadata['name']} ({metadata['kind']}) in {folder}")
    if metadata.get("parents"):
        print(f"extends: {', '.join(metadata['parents'])}")
    if metadata.get("launch_overrides"):
        print("launched with: " + " ".join(f"--set {t}" for t in metadata["launch_overrides"]))
    counts = _state_counts(statuses)
    print("runs: " + ", ".join(f"{n} {state}" for state, n in sorted(counts.items())))
    width = max([len(s.name) for s in statuses] + [3])
    print(f"{'run':<{width}}  {'state':<11}  {'epoch':>7}  {metric:>16}  {'test mrr':>8}  error")
    for status in statuses:
        epoch = f"{status.epochs[0]}:{status.epochs[1]}" if status.epochs else "-"
        value = f"{status.metric:.4f}" if status.metric is not None else "-"
        test = f"{status.test['mrr']:.4f}" if status.test else "-"
        # The row names the run: a file of it is named by its name alone, so the reason fits.
        error = (status.error or "").replace(f"{folder / 'runs' / status.name}/", "")
        error = error.splitlines()[0][:80] if error else ""
        if status.state == "running" and status.heartbeat:
            error = f"last heartbeat {status.heartbeat}"
        print(
            f"{status.name:<{width}}  {status.state:<11}  {epoch:>7}  {value:>16}  {test:>8}  {error}"
        )
    finished = [s for s in statuses if s.state == "finished" and s.metric is not None]
    if finished:
        pick = max if mode == "max" else min
        best = pick(finished, key=lambda s: s.metric)
        print(
            f"best so far: {best.name} {metric}={best.metric:.4f} (test clean mrr {best.test['mrr']:.4f})"
        )
    return 0


def add_sweep_commands(nouns) -> None:
    """Add ``sweep`` and its verbs to the ``diffcom`` parser's subcommands."""
    sweep = nouns.add_parser(
        "sweep", help="run studies (search, ablation, sensitivity) on Ray Tune"
    )
    verbs = sweep.add_subparsers(
        dest="verb", metavar="{launch,resume,extend,status}", required=True
    )

    launch = verbs.add_parser(
        "launch",
        help="run a study file as a new experiment",
        description="Validate a study file and run it as a new Ray Tune experiment under "
        "STORAGE/NAME. Without --address a local Ray starts with this machine's resources.",
    )
    launch.add_argument("study", help="study YAML (see sweeps/studies/)")
    launch.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="set a config key in every trial, e.g. data.dataset=nations (repeatable): merged "
        "into the study's overrides, checked like them; a key the study varies is refused. "
        "Recorded in the experiment; extend applies it again",
    )
    launch.add_argument(
        "--name", help="experiment name (default: the study's name); must be new, not empty"
    )
    _storage_argument(launch)
    _address_argument(launch)
    launch.set_defaults(handler=_launch)

    resume = verbs.add_parser(
        "resume",
        help="continue an interrupted experiment",
        description="Continue an experiment: finished trials are kept, unfinished ones continue "
        "from their last checkpoint, errored ones are retried (a NaN loss is not: it would repeat).",
    )
    resume.add_argument("name", help="experiment name")
    _storage_argument(resume)
    _address_argument(resume)
    resume.set_defaults(handler=_resume)

    extend = verbs.add_parser(
        "extend",
        help="add trials to an experiment as a new, linked experiment",
        description="Add trials as a new experiment linked to NAME, which is left untouched: "
        "--samples N more points for a search (Optuna is warm-started with the finished ones), "
        "--seeds for an ablation or sensitivity study. Stage-1 checkpoints of NAME are reused.",
    )
    extend.add_argument("name", help="experiment to extend")
    extend.add_argument("--samples", type=int, help="more search points")
    extend.add_argument("--seeds", type=int, nargs="+", help="new seeds for every cell")
    extend.add_argument("--new-name", help="name of the new experiment (default: NAME-extK)")
    _storage_argument(extend)
    _address_argument(extend)
    extend.set_defaults(handler=_extend)

    status = verbs.add_parser(
        "status",
        help="show an experiment's runs, states and best result (no cluster needed)",
        description="Read an experiment folder and list every run: state, last epoch, the study "
        "metric, test MRR, errors; then the best finished run.",
    )
    status.add_argument("name", help="experiment name")
    status.add_argument("--json", action="store_true", help="print the runs as JSON")
    _storage_argument(status)
    status.set_defaults(handler=_status)


if __name__ == "__main__":  # pragma: no cover
    sys.exit("use the diffcom command: diffcom sweep --help")
