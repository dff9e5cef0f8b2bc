"""``diffcom sweep launch|resume|extend|status|watch``: studies on Ray Tune from the command line."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections import Counter
from pathlib import Path

from runstore.bucket import is_bucket_uri

__all__ = ["add_sweep_commands"]


def _storage_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--storage",
        help="experiment storage: a folder path (or file:// URI) every node sees, created if "
        "missing; not empty, not a file; or a bucket: s3://BUCKET/PREFIX (an S3-compatible "
        "server through $AWS_ENDPOINT_URL), gs://BUCKET/PREFIX (a GCS-compatible one through "
        "$STORAGE_EMULATOR_HOST), az://CONTAINER/PREFIX (the account of "
        "$AZURE_STORAGE_CONNECTION_STRING or $AZURE_STORAGE_ACCOUNT_NAME), or another store "
        "fsspec opens, e.g. sftp://[USER@]HOST[:PORT]/PATH (options in $FSSPEC_SFTP_*) "
        "(default: $DIFFCOM_STORAGE or ~/diffcom-experiments)",
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


def _with_pack(status, note: str) -> str:
    """A run of a fused pack says so while it is not finished (its pack trains it with others)."""
    if status.fused is None or status.state == "finished":
        return note
    pack, members = status.fused
    return "; ".join(part for part in (f"fused in {pack} ({members} runs)", note) if part)


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
    if args.mlflow is not None:
        from sweeps.experiment import ExperimentError
        from sweeps.tracking import mlflow_uri_problem

        if problem := mlflow_uri_problem(args.mlflow):
            raise ExperimentError(f"--mlflow: {problem}")
    _note_default_seeds(args.study)
    folder = launch(
        args.study,
        overrides=tuple(args.overrides),
        name=args.name,
        storage=args.storage,
        address=args.address,
        optuna_storage=args.optuna_storage,
        mlflow=args.mlflow,
        tensorboard=args.tensorboard,
        checkpoint_every=args.checkpoint_every,
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
    where = _where(folder, metadata)
    storage = f" --storage {where.rsplit('/', 1)[0]}" if is_bucket_uri(where) else ""
    print(f"experiment {where}: {summary}; see `diffcom sweep status {folder.name}{storage}`")
    # Runs the scheduler stopped early (ASHA) ended as designed; failed ones did not.
    return 1 if counts.keys() - {"finished", "stopped"} else 0


def _state_counts(statuses) -> dict[str, int]:
    return dict(Counter(status.state for status in statuses))


def _read(args: argparse.Namespace) -> tuple[Path, dict, list]:
    """The experiment folder, its ``experiment.json`` and every run's status (files only). An
    experiment in a bucket is read from a local copy of its files (no checkpoints), which
    :func:`_refresh` brings up to date."""
    from sweeps.experiment import read_experiment, resolve_storage
    from sweeps.remote import find_experiment

    folder, _, _ = find_experiment(resolve_storage(args.storage), args.name)
    metadata = read_experiment(folder)
    return folder, metadata, _statuses(folder, metadata)


def _refresh(folder: Path) -> None:
    """A local copy of an experiment in a bucket brought up to date (changed files only)."""
    from sweeps.remote import refresh_view

    refresh_view(folder)


def _where(folder: Path, metadata: dict) -> str:
    """Where an experiment lives, for people: its bucket URI, or its folder."""
    storage = metadata.get("storage")
    return storage if is_bucket_uri(storage) else str(folder)


def _statuses(folder: Path, metadata: dict) -> list:
    from sweeps.experiment import PLAN_FILE, ExperimentError, read_json_object, read_statuses

    plan = read_json_object(folder / PLAN_FILE)
    trials = plan.get("trials", {})
    if not isinstance(trials, dict):
        raise ExperimentError(f"{folder / PLAN_FILE}: trials: expected an object of trial names")
    return read_statuses(folder, metadata["metric"], list(trials), metadata["mode"])


def _status(args: argparse.Namespace) -> int:
    folder, metadata, statuses = _read(args)
    if args.json:
        print(json.dumps([dataclasses.asdict(s) for s in statuses], indent=2))
        return 0
    metric = metadata["metric"]
    print(f"experiment {metadata['name']} ({metadata['kind']}) in {_where(folder, metadata)}")
    if metadata.get("parents"):
        print(f"extends: {', '.join(metadata['parents'])}")
    if metadata.get("launch_overrides"):
        print("launched with: " + " ".join(f"--set {t}" for t in metadata["launch_overrides"]))
    if isinstance(metadata.get("optuna_storage"), str):
        print(f"optuna study {metadata['name']!r}: optuna-dashboard {metadata['optuna_storage']}")
    tracking = metadata.get("tracking") if isinstance(metadata.get("tracking"), dict) else {}
    if isinstance(tracking.get("mlflow"), dict):
        mlflow = tracking["mlflow"]
        print(f"mlflow: {mlflow.get('uri')} (parent run {mlflow.get('parent_run_id') or '-'})")
    if tracking.get("tensorboard"):
        print(f"tensorboard: tensorboard --logdir {_where(folder, metadata)}/runs")
    counts = _state_counts(statuses)
    print("runs: " + ", ".join(f"{n} {state}" for state, n in sorted(counts.items())))
    width = max([len(s.name) for s in statuses] + [3])
    print(f"{'run':<{width}}  {'state':<11}  {'epoch':>9}  {metric:>16}  {'test mrr':>8}  error")
    for status in statuses:
        value = f"{status.metric:.4f}" if status.metric is not None else "-"
        test = f"{status.test['mrr']:.4f}" if status.test else "-"
        # The row names the run: a file of it is named by its name alone, so the reason fits.
        error = (status.error or "").replace(f"{folder / 'runs' / status.name}/", "")
        error = error.splitlines()[0][:80] if error else ""
        if status.stage1 is not None:
            error = f"{_stage1_note(status.stage1)}; last heartbeat {status.heartbeat or '-'}"
        elif status.waiting_for:
            error = f"waiting for {status.waiting_for}; last heartbeat {status.heartbeat or '-'}"
        elif status.state == "running" and status.heartbeat:
            error = f"last heartbeat {status.heartbeat}"
        error = _with_pack(status, error)
        print(
            f"{status.name:<{width}}  {_state_label(status):<11}  {_epoch_label(status):>9}  "
            f"{value:>16}  {test:>8}  {error}"
        )
    best = _best_finished(statuses, metadata["mode"])
    if best is not None:
        print(
            f"best so far: {best.name} {metric}={best.metric:.4f} (test clean mrr {best.test['mrr']:.4f})"
        )
    return 0


def _state_label(status) -> str:
    """``stage1`` for a run training a shared stage 1, ``stage1-wait`` for one waiting for it."""
    if status.stage1 is None:
        return status.state
    return "stage1" if status.stage1.training else "stage1-wait"


def _epoch_label(status) -> str:
    """``2:14`` (stage 2, epoch 14); ``s1:23/200`` for the shared stage-1 run a run waits for."""
    if status.stage1 is not None:
        progress = status.stage1
        done = "-" if progress.epoch is None else progress.epoch
        return f"s1:{done}/{progress.epochs}" if progress.epochs else f"s1:{done}"
    return f"{status.epochs[0]}:{status.epochs[1]}" if status.epochs else "-"


def _stage1_note(progress) -> str:
    key = progress.key[:8]
    if progress.training:
        return f"training shared stage 1 {key}"
    return f"waiting for stage 1 {key} (epoch {'-' if progress.epoch is None else progress.epoch})"


def _best_finished(statuses, mode: str):
    finished = [s for s in statuses if s.state == "finished" and s.metric is not None]
    if not finished:
        return None
    pick = max if mode == "max" else min
    return pick(finished, key=lambda s: s.metric)


# ---------------------------------------------------------------------------------- sweep watch

#: States of a run that has not ended: an experiment with none left has ended.
_LIVE = ("pending", "running", "waiting")


def _duration(seconds: float | None) -> str:
    """``45s``, ``12m``, ``3h05m``, ``2d04h``; ``-`` for ``None``."""
    if seconds is None:
        return "-"
    seconds = round(seconds)
    if seconds < 60:
        return f"{seconds}s"
    minutes, hours = seconds // 60, seconds // 3600
    if seconds < 3600:
        return f"{minutes}m"
    if seconds < 86400:
        return f"{hours}h{minutes % 60:02d}m"
    return f"{hours // 24}d{hours % 24:02d}h"


def _unstarted_search_trials(folder: Path, metadata: dict) -> int:
    """Search trials Tune has not started yet: they have no folder under ``runs/search/``."""
    from runstore import RUNS_DIR

    search = metadata.get("search")
    total = search.get("num_samples") if isinstance(search, dict) else None
    if metadata.get("kind") != "search" or not isinstance(total, int):
        return 0
    started = [p for p in (folder / RUNS_DIR / "search").glob("*") if p.is_dir()]
    return max(total - len(started), 0)


def _watch_table(folder: Path, metadata: dict, statuses: list) -> tuple[list[str], bool]:
    """The lines ``watch`` draws and whether the experiment has ended (no run left to run)."""
    from sweeps.experiment import eta_seconds

    metric, mode = metadata["metric"], metadata["mode"]
    unstarted = _unstarted_search_trials(folder, metadata)
    counts = _state_counts(statuses)
    if unstarted:
        counts["pending"] = counts.get("pending", 0) + unstarted
    lines = [f"experiment {metadata['name']} ({metadata['kind']}) in {_where(folder, metadata)}"]
    lines.append("runs: " + ", ".join(f"{n} {state}" for state, n in sorted(counts.items())))
    if unstarted:
        lines.append(f"({unstarted} search trial(s) not started yet)")
    width = max([len(s.name) for s in statuses] + [3])
    best_header = f"best {metric}"
    lines.append(
        f"{'run':<{width}}  {'state':<11}  {'epoch':>9}  {best_header:>{len(best_header)}}  "
        f"{'eta':>6}  note"
    )
    for status in statuses:
        best = f"{status.best:.4f}" if status.best is not None else "-"
        eta = _duration(eta_seconds(status))
        if status.stage1 is not None and eta != "-":
            eta = f"s1 {eta}"  # the shared stage 1's time left; stage 2 has no rate yet
        note = ""
        if status.stage1 is not None:
            note = f"{_stage1_note(status.stage1)}, heartbeat {status.heartbeat or '-'}"
        elif status.waiting_for:
            note = f"waiting for {status.waiting_for}, heartbeat {status.heartbeat or '-'}"
        elif status.state == "running" and status.heartbeat:
            note = f"heartbeat {status.heartbeat}"
        elif status.error:
            note = status.error.replace(f"{folder / 'runs' / status.name}/", "").splitlines()[0]
        note = _with_pack(status, note)
        lines.append(
            f"{status.name:<{width}}  {_state_label(status):<11}  {_epoch_label(status):>9}  "
            f"{best:>{len(best_header)}}  {eta:>6}  {note[:80]}"
        )
    best = _best_finished(statuses, mode)
    if best is not None:
        lines.append(f"best so far: {best.name} {metric}={best.metric:.4f} (finished)")
    else:
        scored = [s for s in statuses if s.best is not None]
        if scored:
            pick = max if mode == "max" else min
            leader = pick(scored, key=lambda s: s.best)
            lines.append(
                f"best so far: {leader.name} {metric}={leader.best:.4f} (an epoch; none finished)"
            )
    ended = not unstarted and not counts.keys() & set(_LIVE)
    return lines, ended


def _watch(args: argparse.Namespace) -> int:
    import time

    from sweeps.experiment import now

    if args.interval <= 0:
        from sweeps.experiment import ExperimentError

        raise ExperimentError(f"--interval {args.interval}: expected seconds > 0")
    folder, metadata, statuses = _read(args)
    clear = sys.stdout.isatty()
    ended_before = False
    try:
        while True:
            lines, ended = _watch_table(folder, metadata, statuses)
            # Between a failed attempt and Tune's retry of it no run is running for a moment:
            # the experiment has ended only when two reads in a row say so.
            final = args.once or (ended and ended_before)
            if clear:
                sys.stdout.write("\x1b[H\x1b[2J")
            print(f"{now()}  (every {args.interval:g} s; Ctrl-C to stop)" if not final else now())
            print("\n".join(lines), flush=True)
            if final:
                if ended:
                    print("the experiment has ended", flush=True)
                return 0
            if not clear:
                print(flush=True)
            ended_before = ended
            time.sleep(args.interval)
            _refresh(folder)
            statuses = _statuses(folder, metadata)
    except KeyboardInterrupt:
        return 130


def add_sweep_commands(nouns) -> None:
    """Add ``sweep`` and its verbs to the ``diffcom`` parser's subcommands."""
    sweep = nouns.add_parser(
        "sweep", help="run studies (search, ablation, sensitivity) on Ray Tune"
    )
    verbs = sweep.add_subparsers(
        dest="verb", metavar="{launch,resume,extend,status,watch}", required=True
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
    launch.add_argument(
        "--optuna-storage",
        metavar="URL",
        help="an optuna-tpe search's Optuna study (named as the experiment) goes to this RDB "
        "URL, e.g. postgresql://user@host/db (default: sqlite:///EXPERIMENT/optuna.db); "
        "`optuna-dashboard URL` shows it live. Recorded in the experiment for resume and extend",
    )
    launch.add_argument(
        "--mlflow",
        metavar="URI",
        help="log every run to this MLflow tracking URI (e.g. http://127.0.0.1:5000): one "
        "child run per run folder under one parent run per experiment; in place of the "
        "study's tracking.mlflow. Recorded in the experiment for resume and extend; an "
        "unreachable server only warns",
    )
    launch.add_argument(
        "--tensorboard",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="TensorBoard event files in every run folder (default: the study's "
        "tracking.tensorboard, on when it says nothing): tensorboard --logdir EXPERIMENT/runs",
    )
    launch.add_argument(
        "--checkpoint-every",
        type=int,
        metavar="N",
        help="with an s3://, gs:// or az:// --storage: upload each run's checkpoint every N epochs "
        "and when it ends (default 1; metrics and status go up every epoch). A resumed run "
        "repeats at most N - 1 epochs; MLflow and TensorBoard get an epoch once its checkpoint "
        "is up. See BENCHMARKS.md for the checkpoint sizes that call for it",
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

    watch = verbs.add_parser(
        "watch",
        help="a live table of an experiment's runs, until it ends (no cluster needed)",
        description="Re-read an experiment folder every --interval seconds and redraw its runs: "
        "state, epoch (s1:E/N for a shared stage 1 being trained or waited for), best study "
        "metric, ETA at the run's rate so far; then the best so far. Works from any machine that "
        "sees the storage; exits 0 once no run is pending or running, 130 on Ctrl-C.",
    )
    watch.add_argument("name", help="experiment name")
    watch.add_argument(
        "--interval", type=float, default=5.0, metavar="SECONDS", help="seconds between reads"
    )
    watch.add_argument("--once", action="store_true", help="draw the table once and exit")
    _storage_argument(watch)
    watch.set_defaults(handler=_watch)


if __name__ == "__main__":  # pragma: no cover
    sys.exit("use the diffcom command: diffcom sweep --help")
