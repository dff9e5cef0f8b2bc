"""``diffcom report EXP [EXP ...] --out DIR``.

Exit status: 0 when the report shows at least one run's numbers (a damaged or unfinished run is a
warning, listed in the report); 1 when it was written but no run has a result or an evaluated
epoch (its Problems section says why); 2, writing nothing, for a bad argument: an experiment that
is not found, none that can be read, an ``--out`` that is a file or a non-empty folder no
earlier report wrote (without ``--force``).
"""

from __future__ import annotations

import argparse
import atexit
import shutil
import sys
from pathlib import Path

from runstore import EXPERIMENT, default_storage
from runstore.bucket import Bucket, BucketUri, Mirror, is_bucket_uri, pull_results, scratch_folder

__all__ = ["add_report_command"]


def _from_bucket(experiment: str, storage: str) -> Path:
    """A local copy of the files a report reads of an experiment in a bucket (no checkpoints)."""
    from analysis.load import AnalysisError

    root = BucketUri.parse(storage)
    bucket = Bucket(root.child(experiment))
    if "/" in experiment or not bucket.exists(EXPERIMENT.file):
        raise AnalysisError(f"no experiment named so in {root}", experiment)
    scratch = scratch_folder(bucket.uri, "report")
    atexit.register(shutil.rmtree, scratch, ignore_errors=True)  # the copy outlives no report
    mirror = Mirror(bucket, scratch / experiment, read_only=True)
    return pull_results(mirror).local


def _storage(value: str | None) -> Path:
    from analysis.load import AnalysisError  # pandas loads only when a report is made

    if value is not None:
        if not value.removeprefix("file://").strip():
            raise AnalysisError(
                "empty: give the folder that holds the experiments, or leave --storage out",
                f"--storage {value!r}",
            )
        return Path(value.removeprefix("file://")).expanduser().resolve()
    return default_storage()


def _resolve(experiment: str, storage: str | None) -> Path:
    from analysis.load import AnalysisError

    if is_bucket_uri(storage):
        return _from_bucket(experiment, storage)
    path = Path(experiment)
    if (path / EXPERIMENT.file).is_file():
        return path.resolve()
    under = _storage(storage) / experiment
    if "/" not in experiment and (under / EXPERIMENT.file).is_file():
        return under
    raise AnalysisError(
        f"neither an experiment folder (with experiment.json) nor an experiment name in "
        f"{_storage(storage)}",
        experiment,
    )


def _report(args: argparse.Namespace) -> int:
    from analysis.report import build_report

    if args.storage is not None and not is_bucket_uri(args.storage):
        _storage(args.storage)  # an empty --storage is refused even when no name needs it
    folders = [_resolve(e, args.storage) for e in args.experiments]
    report = build_report(folders, args.out, png=not args.no_png, force=args.force)
    for path, reason in report.problems:
        print(f"warning: {path}: {reason}", file=sys.stderr)
    for note in report.notes:
        print(f"note: {note}")
    print(f"report: {report.html.resolve()} ({len(report.files)} files, {report.seconds:.1f} s)")
    if report.usable_runs == 0:
        print(
            "diffcom: error: no run has a result or an evaluated epoch; the report lists only "
            "problems (see its Problems section and the warnings above)",
            file=sys.stderr,
        )
        return 1
    return 0


def add_report_command(nouns) -> None:
    """Add ``report`` to the ``diffcom`` parser's subcommands."""
    report = nouns.add_parser(
        "report",
        help="write the ablation, sensitivity and protocol-audit report of experiments",
        description="Read experiment folders (or names under --storage) and write report.html "
        "(self-contained, offline), the tables as .md/.tex/.csv and PNG figures when a Chromium "
        "is available, into --out. Damaged, unfinished and empty runs or folders are listed "
        "in the report and printed as warnings; the exit status is 1 when no run has a result "
        "or an evaluated epoch, 2 (nothing written) for a bad argument.",
    )
    report.add_argument("experiments", nargs="+", metavar="EXP", help="experiment folder or name")
    report.add_argument(
        "--out",
        required=True,
        help="output folder: new, empty, or an earlier report's (whose files are replaced)",
    )
    report.add_argument(
        "--force",
        action="store_true",
        help="write into a non-empty --out that no report wrote (files of the same names are "
        "replaced, the others kept)",
    )
    report.add_argument(
        "--storage", help="where named experiments live (default: as for diffcom sweep)"
    )
    report.add_argument("--no-png", action="store_true", help="do not render PNG figures")
    report.set_defaults(handler=_report)
