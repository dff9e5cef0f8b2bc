"""``diffcom report EXP [EXP ...] --out DIR``."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

__all__ = ["add_report_command"]


def _storage(value: str | None) -> Path:
    # Same default as `diffcom sweep` (sweeps.experiment.default_storage); repeated here because
    # analysis never imports the packages that train.
    if value:
        return Path(value.removeprefix("file://")).expanduser().resolve()
    configured = os.environ.get("DIFFCOM_STORAGE")
    return Path(configured).expanduser() if configured else Path.home() / "diffcom-experiments"


def _resolve(experiment: str, storage: str | None) -> Path:
    path = Path(experiment)
    if (path / "experiment.json").is_file():
        return path.resolve()
    under = _storage(storage) / experiment
    if "/" not in experiment and (under / "experiment.json").is_file():
        return under
    raise ValueError(
        f"{experiment}: neither an experiment folder (with experiment.json) nor an experiment "
        f"name in {_storage(storage)}"
    )


def _report(args: argparse.Namespace) -> int:
    from analysis.report import build_report

    folders = [_resolve(e, args.storage) for e in args.experiments]
    report = build_report(folders, args.out, png=not args.no_png)
    for note in report.notes:
        print(f"note: {note}")
    print(f"report: {report.html.resolve()} ({len(report.files)} files, {report.seconds:.1f} s)")
    return 0


def add_report_command(nouns) -> None:
    """Add ``report`` to the ``diffcom`` parser's subcommands."""
    report = nouns.add_parser(
        "report",
        help="write the ablation, sensitivity and protocol-audit report of experiments",
        description="Read experiment folders (or names under --storage) and write report.html "
        "(self-contained, offline), the tables as .md/.tex/.csv and PNG figures when a Chromium "
        "is available, into --out.",
    )
    report.add_argument("experiments", nargs="+", metavar="EXP", help="experiment folder or name")
    report.add_argument("--out", required=True, help="output folder")
    report.add_argument(
        "--storage", help="where named experiments live (default: as for diffcom sweep)"
    )
    report.add_argument("--no-png", action="store_true", help="do not render PNG figures")
    report.set_defaults(handler=_report)
