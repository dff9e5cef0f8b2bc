"""The ``diffcom`` command: ``data`` and ``train`` from ``core``, ``sweep`` from ``sweeps``,
``report`` from ``analysis``.

Error policy: the project's own errors (bad input it names: a config key, a dataset file, a
checkpoint, a study) print one line, ``diffcom: error: ...``, and exit 2; ``--debug`` prints their
traceback too. Anything else is a bug and propagates with its full traceback.
"""

from __future__ import annotations

import argparse
import sys
import traceback
from pathlib import Path

from analysis.cli import add_report_command
from core.cli import add_core_commands
from sweeps.cli import add_sweep_commands

__all__ = ["build_parser", "main"]

#: The project's error types, as (module, class name). They are looked up in ``sys.modules`` only:
#: an error cannot be of a type whose module was never imported, and ``diffcom report`` should not
#: load torch just to name the trainer's errors.
_PROJECT_ERRORS = (
    ("core.config", "ConfigError"),
    ("runstore", "StoreError"),
    ("core.data.files", "DatasetError"),
    ("core.train.checkpoint", "CheckpointError"),
    ("core.train.trainer", "NonFiniteLossError"),
    ("sweeps.study", "StudyError"),
    ("sweeps.experiment", "ExperimentError"),
    ("analysis.load", "AnalysisError"),
)

#: Packages whose plain ``ValueError`` is a refusal of bad input with a message written for the
#: user (e.g. ``data synth --entities 0``: ``SyntheticSpec`` checks its fields); a
#: ``ValueError`` raised inside a library (torch, numpy, json, ...) is a bug and keeps its traceback.
_PROJECT_PACKAGES = frozenset({"core", "sweeps", "analysis", "diffcom"})


def _raised_by_project(error: BaseException) -> bool:
    frame = error.__traceback__
    if frame is None:
        return False
    while frame.tb_next is not None:
        frame = frame.tb_next
    module = frame.tb_frame.f_globals.get("__name__", "")
    return module.split(".")[0] in _PROJECT_PACKAGES


def _is_project_error(error: BaseException) -> bool:
    for module, name in _PROJECT_ERRORS:
        kind = getattr(sys.modules.get(module), name, None)
        if kind is not None and isinstance(error, kind):
            return True
    # FileExistsError: the commands' "will not write over that" refusals (data synth, train --out).
    if isinstance(error, FileExistsError):
        return True
    return isinstance(error, ValueError) and _raised_by_project(error)


def build_parser() -> argparse.ArgumentParser:
    """The full argument parser; every command and subcommand has ``--help``."""
    parser = argparse.ArgumentParser(
        prog="diffcom",
        description="Train DiffusionCom, sweep and ablate it, and report the results.",
    )
    parser.add_argument(
        "--debug",
        action="store_true",
        help="print the traceback of the project's own errors too (other errors always print it)",
    )
    nouns = parser.add_subparsers(dest="noun", metavar="{data,train,sweep,report}", required=True)
    add_core_commands(nouns)
    # The sweep and report commands live with their packages: sweeps loads Ray only when a sweep
    # starts; analysis never loads core or Ray.
    add_sweep_commands(nouns)
    add_report_command(nouns)
    report = nouns.choices["report"]
    report.set_defaults(handler=_logged_to_mlflow(report.get_default("handler")))
    return parser


def _logged_to_mlflow(report_handler):
    """``report``, then its folder logged to the MLflow parent run of every experiment that
    recorded one (:func:`sweeps.tracking.log_report`). Here, not in ``analysis``: analysis only
    reads files."""

    def handler(args: argparse.Namespace) -> int:
        status = report_handler(args)
        from sweeps.tracking import log_report

        log_report(args.experiments, args.storage, Path(args.out))
        return status

    return handler


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``diffcom`` console script; returns the exit status."""
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except Exception as error:
        if not _is_project_error(error):
            raise
        if args.debug:
            traceback.print_exc()
        print(f"diffcom: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
