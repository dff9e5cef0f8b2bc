"""``diffcom report``: one self-contained HTML report, tables and figures from experiment folders.

Reads only files (``experiment.json``, ``runs/**``); writes into ``out``::

    report.html                  everything below, plotly.js inlined (opens offline)
    tables/ablation.{md,tex,csv} Δ against the reference variant; when the experiments name
                                 different ones, tables/ablation-vs-<variant>.* (one per reference)
    tables/baselines.{md,tex,csv} only for ablations with classical baselines: each baseline
                                 cell's model, settings, budget and results beside the reference
                                 variant's (tables/baselines-vs-<variant>.* as for the ablation)
    tables/sensitivity.{md,tex,csv}
                                 (ablation, baselines and sensitivity: when the runs are of several
                                 datasets, one table per dataset, its slug after the name:
                                 tables/ablation-umls-entity_text-anonymous.*)
    tables/protocol-audit.{md,tex,csv}
    tables/search-points.csv
    tables/runs.csv              the tidy frame itself
    tables/curves.csv            every run's epochs (the learning curves)
    figures/*.png                when a Chromium is available (kaleido); skipped with a note otherwise
    report-manifest.json         what wrote the folder and every file above, with the problems

The Baselines section (after the Ablation, only when some ablation run is a classical baseline,
so a report without any is what it was before baselines existed) holds that table and a figure of
test MRR against training time, one point per variant and baseline; the baselines' Δ against the
reference, with the ablation's paired test, are rows of the ablation table, marked as baselines.

Runs of different datasets (:func:`analysis.load.dataset_labels`: by content hash, else by
``data.dataset`` and ``data.entity_text``) are never pooled: every table and figure that groups
runs by cell is split by dataset, as it is by reference variant, with the dataset in its file
name, caption and title. With one dataset nothing names it, and experiments of one dataset that
extend each other (more seeds) pool as before.

``out`` must be a new or empty folder, or one an earlier report wrote (its
``report-manifest.json`` says so; the files it lists are replaced, so no table of the earlier
report is left behind). Any other non-empty folder, or a file, is refused unless ``force``: then
the report's files are written into it and everything else there is kept.
"""

from __future__ import annotations

import html
import json
import logging
import os
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import plotly.graph_objects as go
import plotly.io
import plotly.offline

from analysis.figures import (
    LATENCY_AXIS,
    cost_figure,
    forest_figure,
    importance_figure,
    learning_curves_figure,
    parallel_coordinates,
    pareto_figure,
    sensitivity_figure,
)
from analysis.load import AnalysisError, Loaded, dataset_labels, load_experiments
from analysis.tables import (
    BEST,
    ablation_table,
    baselines_table,
    cost_points,
    format_table,
    protocol_audit,
    search_points,
    sensitivity_table,
    write_table,
)

__all__ = ["MANIFEST", "Report", "build_report", "find_chromium"]

#: The file that marks a folder as written by ``diffcom report`` (and lists what it wrote).
MANIFEST = "report-manifest.json"
_WRITER = "diffcom report"

PROTOCOL_NOTE = (
    "All tables use the <b>clean</b> protocol on the <b>test</b> split unless they say otherwise: "
    "one deterministic reverse pass, filtered ranks, realistic ties, no use of test labels. "
    "Models are selected by valid MRR under the same protocol. The released code's "
    "<b>official min-of-S</b> protocol (the best gold rank over S stochastic passes, which needs "
    "the test labels) appears only in the protocol audit."
)

ABLATION_TEST_NOTE = (
    "The two-level bootstrap resamples seeds, then test queries (the same queries for both arms), "
    "from each run's stored per-query ranks, so its interval carries seed-to-seed as well as "
    "query-to-query variance; with one common seed it is a bootstrap over queries only and says "
    "so. Without stored ranks, a paired t-test over seeds (and its t interval)."
)

CURVES_NOTE = (
    "Valid MRR (clean protocol, on evaluated epochs) and the mean training loss of every epoch, "
    "one line per run; seeds of a cell share its colour and its legend entry. The x axis counts "
    "epochs across both stages: stage 2 continues after stage 1's last epoch, and the dashed line "
    "marks where it starts. Runs that shared a stage-1 run show its stage-1 epochs. Loss is stage "
    "1's BCE, then stage 2's weighted KL + BCE. Every epoch is in <code>tables/curves.csv</code>."
)


@dataclass
class Report:
    """What :func:`build_report` wrote and what it had to leave out.

    Attributes:
        html: ``report.html``.
        files: every file written, ``report.html`` first.
        notes: what was left out of the report itself (PNG figures, importance...).
        problems: ``(path, reason)`` of every folder, file or line skipped while reading (the
            report's Problems section lists them too).
        usable_runs: runs with a result or at least one evaluated epoch; ``0`` means the report
            has nothing to show but its problems.
        seconds: how long it took.
    """

    html: Path
    files: list[Path] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    problems: list[tuple[str, str]] = field(default_factory=list)
    usable_runs: int = 0
    seconds: float = 0.0


def find_chromium() -> str | None:
    """A Chromium or Chrome executable kaleido can drive, or None."""
    configured = os.environ.get("BROWSER_PATH")
    if configured and Path(configured).is_file():
        return configured
    for name in ("chromium", "chromium-browser", "google-chrome", "chrome"):
        found = shutil.which(name)
        if found:
            return found
    return None


def build_report(
    experiments: list[str | Path],
    out: str | Path,
    *,
    png: bool = True,
    title: str | None = None,
    force: bool = False,
) -> Report:
    """Load experiments, write tables, figures and ``report.html`` into ``out``.

    Damaged or unfinished runs and folders are listed in the report (and in
    :attr:`Report.problems`), not fatal; check :attr:`Report.usable_runs` for whether anything
    else is left.

    Raises:
        AnalysisError: before anything is written, when ``out`` is a file, or a non-empty folder
            no earlier report wrote (unless ``force``), or when no experiment could be read.
    """
    started = time.perf_counter()
    out = Path(out)
    earlier = _earlier_report_files(out, force)
    loaded = load_experiments(experiments)
    if not loaded.experiments:
        reasons = "; ".join(f"{path}: {reason}" for path, reason in loaded.problems)
        raise AnalysisError(f"no experiment could be read ({reasons}); nothing written")
    for stale in earlier:
        stale.unlink(missing_ok=True)
    try:
        (out / "tables").mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise AnalysisError(f"cannot create the report folder: {error}", f"--out {out}") from None
    report = Report(html=out / "report.html", problems=list(loaded.problems))
    report.usable_runs = _usable_runs(loaded.frame)
    frame = loaded.frame
    frame.to_csv(out / "tables" / "runs.csv", index=False)
    report.files.append(out / "tables" / "runs.csv")
    loaded.curves.to_csv(out / "tables" / "curves.csv", index=False)
    report.files.append(out / "tables" / "curves.csv")

    sections: list[str] = [_overview(loaded)]
    figures: list[tuple[str, go.Figure]] = []

    ablation = _ablation_section(loaded, out, report, figures)
    if ablation:
        sections.append(ablation)
    baselines = _baselines_section(loaded, out, report, figures)
    if baselines:
        sections.append(baselines)
    sensitivity = _sensitivity_section(loaded, out, report, figures)
    if sensitivity:
        sections.append(sensitivity)
    points = search_points(frame)
    if not points.empty:
        points.to_csv(out / "tables" / "search-points.csv", index=False)
        report.files.append(out / "tables" / "search-points.csv")
        parts = [_table_html(points.round(4))]
        searches = [m for m in loaded.experiments.values() if m.get("kind") == "search"]
        mode = searches[0].get("mode", "max") if searches else "max"
        try:
            importance = importance_figure(points, "valid_mrr", mode)
        except (ValueError, RuntimeError) as error:
            importance = None
            report.notes.append(f"parameter importance skipped: {error}")
        if importance is not None:
            figures.append(("search-importance", importance))
            parts.append(_figure_placeholder(len(figures) - 1))
        else:
            parts.append(_paragraph("Parameter importance needs at least three finished points."))
        coordinates = parallel_coordinates(points, "valid_mrr")
        if coordinates is not None:
            figures.append(("search-coordinates", coordinates))
            parts.append(_figure_placeholder(len(figures) - 1))
        sections.append(_section("Search", "".join(parts)))
    audit = protocol_audit(frame)
    if not audit.empty:
        formatted_audit = audit.copy()
        for column in formatted_audit.columns:
            if formatted_audit[column].dtype == float:
                pattern = "{:+.3f}" if column.startswith("inflation") else "{:.3f}"
                formatted_audit[column] = formatted_audit[column].map(pattern.format)
        report.files += write_table(
            audit,
            formatted_audit,
            out / "tables" / "protocol-audit",
            "Protocol audit: clean against official min-of-S (test)",
        )
        sections.append(
            _section(
                "Protocol audit",
                _paragraph(
                    "The official code reports, per query, the best gold rank over S stochastic "
                    "passes: a protocol that reads the test answers. Inflation = official − clean."
                )
                + _table_html(formatted_audit),
            )
        )
    curves = _curves_section(loaded, figures)
    if curves:
        sections.append(curves)
    sections.append(_runs_section(frame))
    sections.append(_problems_section(loaded, report.notes))

    if png and figures:
        _write_pngs(figures, out / "figures", report)
    html_text = _page(title or "DiffusionCom report", sections, figures)
    report.html.write_text(html_text)
    report.files.insert(0, report.html)
    _write_manifest(out, experiments, report)
    report.seconds = time.perf_counter() - started
    return report


# -------------------------------------------------------------------------------- sensitivity


def _sensitivity_section(
    loaded: Loaded, out: Path, report: Report, figures: list[tuple[str, go.Figure]]
) -> str:
    """The sensitivity table and its figures, one of each per dataset ("" when none)."""
    by_dataset = _by_dataset(loaded.frame, dataset_labels(loaded.frame))
    tables = [(dataset, sensitivity_table(rows)) for dataset, rows in by_dataset]
    tables = [(dataset, table) for dataset, table in tables if not table.empty]
    if not tables:
        return ""
    several_datasets = len(tables) > 1
    parts = [_several_datasets_note("table and figures")] if several_datasets else []
    stems: set[str] = set()
    for dataset, sensitivity in tables:
        dataset = dataset if several_datasets else None
        stem = _stem("sensitivity", None, dataset, stems)
        suffix = stem.removeprefix("sensitivity")
        formatted = format_table(sensitivity, "sensitivity")
        report.files += write_table(
            sensitivity,
            formatted,
            out / "tables" / stem,
            f"Sensitivity{_on(dataset)} (test, clean protocol)",
        )
        parts += [_heading(dataset), _table_html(formatted)]
        for axis in dict.fromkeys(sensitivity["axis"]):
            figure = _titled(sensitivity_figure(sensitivity, axis), dataset)
            figures.append((f"sensitivity-{axis}{suffix}", figure))
            parts.append(_figure_placeholder(len(figures) - 1))
            if axis == LATENCY_AXIS:
                figures.append((f"pareto-k{suffix}", _titled(pareto_figure(sensitivity), dataset)))
                parts.append(_figure_placeholder(len(figures) - 1))
    return _section("Sensitivity", "".join(parts))


# ------------------------------------------------------------------------------ output folder


def _earlier_report_files(out: Path, force: bool) -> list[Path]:
    """The files an earlier report in ``out`` wrote (to replace); refuse any other occupant.

    A folder counts as an earlier report when its :data:`MANIFEST` says ``diffcom report`` wrote
    it; only files it lists, inside ``out``, are returned.
    """
    if out.exists() and not out.is_dir():
        raise AnalysisError("a file, not a folder; give a folder for the report", f"--out {out}")
    if not out.is_dir() or not any(out.iterdir()):
        return []
    manifest = _read_manifest(out)
    if manifest is None:
        if force:
            return []
        raise AnalysisError(
            f"the folder is not empty and no earlier report wrote it (no {MANIFEST}); give a "
            "new or empty folder, or --force to write into it (files of the same names are "
            "replaced, the others kept)",
            f"--out {out}",
        )
    root = out.resolve()
    files = []
    for name in manifest.get("files", []):
        path = (out / str(name)).resolve()
        if path.is_relative_to(root) and path != root and path.is_file():
            files.append(path)
    return files


def _read_manifest(out: Path) -> dict | None:
    """The :data:`MANIFEST` of an earlier report in ``out``, or ``None`` when there is none."""
    try:
        manifest = json.loads((out / MANIFEST).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    if not (isinstance(manifest, dict) and manifest.get("written_by") == _WRITER):
        return None
    if not (out / "report.html").is_file() or not isinstance(manifest.get("files"), list):
        return None
    return manifest


def _write_manifest(out: Path, experiments: list[str | Path], report: Report) -> None:
    manifest = out / MANIFEST
    report.files.append(manifest)
    content = {
        "written_by": _WRITER,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "experiments": [str(Path(e).resolve()) for e in experiments],
        "files": [path.relative_to(out).as_posix() for path in report.files],
        "usable_runs": report.usable_runs,
        "problems": [{"path": path, "reason": reason} for path, reason in report.problems],
    }
    manifest.write_text(json.dumps(content, indent=2) + "\n")


def _usable_runs(frame: pd.DataFrame) -> int:
    """Runs with a number to show: a result, or an evaluated epoch so far."""
    if frame.empty or "mrr" not in frame:
        return 0
    return int(
        frame.loc[pd.to_numeric(frame["mrr"], errors="coerce").notna(), "run_path"].nunique()
    )


# ----------------------------------------------------------------------------------- ablation


def _ablation_groups(loaded: Loaded) -> list[tuple[str, str, list[str], pd.DataFrame]]:
    """``(reference, dataset, experiments, runs)`` of each ablation table, in load order.

    Runs that share a reference variant and a dataset (a study and its extensions, which add
    seeds) are pooled into one table, as cells of the same name always were; runs with different
    references, or of different datasets (:func:`analysis.load.dataset_labels`), never are, so
    every Δ of a table is against the one variant its header names, on one graph.
    """
    by_reference: dict[str, list[str]] = {}
    for name, metadata in loaded.experiments.items():
        if metadata.get("kind") == "ablation" and metadata.get("reference") is not None:
            by_reference.setdefault(metadata["reference"], []).append(name)
    labels = dataset_labels(loaded.frame)
    groups = []
    for reference, names in by_reference.items():
        runs = loaded.frame[loaded.frame["experiment"].isin(names)]
        for dataset, rows in _by_dataset(runs, labels):
            found = set(rows["experiment"])
            groups.append((reference, dataset, [n for n in names if n in found], rows))
    return groups


def _by_dataset(frame: pd.DataFrame, labels: pd.Series) -> list[tuple[str, pd.DataFrame]]:
    """The frame's rows split by dataset, in order of first appearance.

    ``labels`` are :func:`analysis.load.dataset_labels` of the whole report's frame (a subset's
    own could give two datasets of one name the same label).
    """
    labels = labels.loc[frame.index]
    return [(label, frame[labels == label]) for label in dict.fromkeys(labels)]


def _stem(base: str, reference: str | None, dataset: str | None, stems: set[str]) -> str:
    """``base``, then ``-vs-<reference>`` and ``-<dataset>`` for each that is given (a report
    with several of them), unique among ``stems`` (which it joins)."""
    stem = base + (f"-vs-{_slug(reference)}" if reference else "")
    stem += f"-{_slug(dataset)}" if dataset else ""
    if stem in stems:  # two names that differ only in odd characters
        stem = f"{stem}-{len(stems)}"
    stems.add(stem)
    return stem


def _on(dataset: str | None) -> str:
    """`` on <dataset>`` for a caption when the report has several datasets, else ``""``."""
    return f" on {dataset}" if dataset else ""


def _heading(*parts: str | None) -> str:
    """An ``<h3>`` of the given parts (``""`` when none is given: one table, no heading)."""
    text = ": ".join(part for part in parts if part)
    return f"<h3>{html.escape(text)}</h3>" if text else ""


def _titled(figure: go.Figure, dataset: str | None) -> go.Figure:
    """``figure`` with the dataset after its title, when the report has several."""
    if dataset:
        figure.update_layout(title=f"{figure.layout.title.text} — {dataset}")
    return figure


def _several_datasets_note(what: str) -> str:
    return _paragraph(
        f"These runs are of different datasets, so each dataset has its own {what}; runs of "
        "different datasets are never pooled (a dataset is the graph a run trained on: its "
        "name, entity text, and content hash)."
    )


def _ablation_section(
    loaded: Loaded, out: Path, report: Report, figures: list[tuple[str, go.Figure]]
) -> str:
    """The ablation tables (one per reference variant and dataset) and their forest plots ("" when
    none)."""
    tables = []
    for reference, dataset, names, runs in _ablation_groups(loaded):
        order = [v for name in names for v in loaded.experiments[name].get("variant_order", [])]
        table = ablation_table(runs, reference=reference, order=order)
        if not table.empty:
            tables.append((reference, dataset, names, table))
    if not tables:
        return ""
    several = len({reference for reference, *_ in tables}) > 1
    several_datasets = len({dataset for _, dataset, *_ in tables}) > 1
    parts = [
        _paragraph(
            "Mean ± sample std over seeds; 95% t interval of MRR; Δ = variant − reference "
            "variant, with its 95% interval [in brackets] and a paired test, named per row: "
            "* p < 0.05, ** p < 0.01. The reference is the study's <code>reference</code> "
            "(by default the variant called full, else the study's first). " + ABLATION_TEST_NOTE
        )
    ]
    if several:
        parts.append(
            _paragraph(
                "These experiments name different reference variants, so each reference has its "
                "own table and forest plot; experiments that share one are pooled."
            )
        )
    if several_datasets:
        parts.append(_several_datasets_note("table and forest plot"))
    stems: set[str] = set()
    for reference, dataset, names, table in tables:
        dataset = dataset if several_datasets else None
        stem = _stem("ablation", reference if several else None, dataset, stems)
        formatted = format_table(table, "ablation")
        report.files += write_table(
            table,
            formatted,
            out / "tables" / stem,
            f"Ablation{_on(dataset)} (test, clean protocol; Δ vs {reference})",
        )
        tests = sorted(
            {t for c in ("test_mrr", "test_hits@1") if c in table for t in table[c].dropna()}
        )
        experiments = ", ".join(names)
        text = (
            f"Δ against <b>{html.escape(reference)}</b>, the reference variant of "
            f"{html.escape(experiments)}{html.escape(_on(dataset))}; paired tests: "
            f"{html.escape('; '.join(tests) or 'none')}."
        )
        if "baseline" in table:
            text += (
                " Cells marked <i>(baseline)</i> are classical baselines (see Baselines), "
                "compared with the same paired test."
            )
        if reference not in set(table["variant"]):
            text += (
                f" The reference {html.escape(reference)} has no finished run yet, so no Δ is "
                "shown."
            )
        parts.append(_heading(dataset, f"Δ vs {reference}" if several else None))
        parts += [_paragraph(text), _table_html(formatted)]
        forest = forest_figure(table, reference=reference)
        if forest is not None:
            figures.append(
                (stem.replace("ablation", "ablation-forest", 1), _titled(forest, dataset))
            )
            parts.append(_figure_placeholder(len(figures) - 1))
    return _section("Ablation", "".join(parts))


# ---------------------------------------------------------------------------------- baselines

BASELINES_NOTE = (
    "Classical KGC baselines (PyKEEN models trained on the same id triples and splits, ranked by "
    "this project's evaluator under the clean protocol) beside the reference variant. Mean ± "
    "sample std over seeds; " + BEST + " marks the best mean of its column. <i>Settings</i> are "
    "the <code>baseline.*</code> values that differ from the defaults; <i>Budget</i> is the mean "
    "time budget over seeds and the clock it counts (<i>matched</i>: each run got the time the "
    "reference run of its seed took), or the most epochs when there is no time budget. "
    "<i>Train s</i> is training time: a run's own plus the shared stage 1 it used. Each "
    "baseline's Δ against the reference, with its paired test, is in the Ablation table."
)


def _baselines_section(
    loaded: Loaded, out: Path, report: Report, figures: list[tuple[str, go.Figure]]
) -> str:
    """Per ablation reference and dataset with baseline runs: the baselines table and the
    MRR-against-time figure ("" when no ablation has a finished baseline run)."""
    found = []
    for reference, dataset, names, runs in _ablation_groups(loaded):
        table = baselines_table(runs, reference=reference)
        if not table.empty:
            order = [v for n in names for v in loaded.experiments[n].get("variant_order", [])]
            found.append((reference, dataset, names, table, cost_points(runs, reference, order)))
    if not found:
        return ""
    several = len({reference for reference, *_ in found}) > 1
    several_datasets = len({dataset for _, dataset, *_ in found}) > 1
    parts = [_paragraph(BASELINES_NOTE)]
    if several_datasets:
        parts.append(_several_datasets_note("baselines table and figure"))
    stems: set[str] = set()
    for reference, dataset, names, table, points in found:
        dataset = dataset if several_datasets else None
        stem = _stem("baselines", reference if several else None, dataset, stems)
        formatted = format_table(table, "baselines")
        report.files += write_table(
            table,
            formatted,
            out / "tables" / stem,
            f"Baselines{_on(dataset)} (test, clean protocol; beside {reference}; {BEST} best in "
            "its column)",
        )
        parts.append(_heading(dataset, f"Beside {reference}" if several else None))
        text = f"Beside <b>{html.escape(reference)}</b>, the reference variant of "
        text += html.escape(", ".join(names) + _on(dataset))
        parts += [_paragraph(text + "."), _table_html(formatted)]
        figure = cost_figure(
            points, title=f"Test MRR against training time ({', '.join(names)}; mean over seeds)"
        )
        if figure is not None:
            figure = _titled(figure, dataset)
            figures.append((stem.replace("baselines", "mrr-vs-time", 1), figure))
            parts.append(_figure_placeholder(len(figures) - 1))
    return _section("Baselines", "".join(parts))


# --------------------------------------------------------------------------------------- html


def _section(title: str, body: str) -> str:
    anchor = title.lower().replace(" ", "-")
    return f'<section id="{anchor}"><h2>{html.escape(title)}</h2>{body}</section>'


def _paragraph(text: str) -> str:
    return f"<p>{text}</p>"


def _table_html(frame: pd.DataFrame) -> str:
    return frame.to_html(index=False, escape=True, classes="table", border=0, na_rep="-")


def _figure_placeholder(index: int) -> str:
    return f"<!--figure-{index}-->"


def _hours(seconds: float) -> str:
    return f"{seconds / 3600:.2f} h ({seconds:.0f} s)"


def _resource_text(name: str, value) -> str:
    """``CPU 2``, ``GPU 1``, ``memory 15.9 GiB`` (Ray reports memory in bytes)."""
    if not isinstance(value, (int, float)):
        return f"{name} {value}"
    if name == "memory":
        return f"memory {value / 2**30:.1f} GiB"
    return f"{name} {value:g}"


def _overview(loaded: Loaded) -> str:
    frame = loaded.frame
    items = []
    for name, metadata in loaded.experiments.items():
        runs = frame[frame["experiment"] == name] if not frame.empty else frame
        per_run = runs.drop_duplicates("run") if not runs.empty else runs
        states = per_run["state"].value_counts().to_dict() if not per_run.empty else {}
        compute = 0.0
        if not per_run.empty:
            wall = per_run.get("wall_seconds", pd.Series(dtype=float)).astype(float)
            train = per_run.get("train_seconds", pd.Series(dtype=float)).astype(float)
            compute = float(wall.fillna(train).fillna(0).sum())
        datasets = sorted({str(d) for d in per_run.get("dataset", pd.Series(dtype=str)).dropna()})
        revisions = sorted(
            {str(r) for r in per_run.get("code_revision", pd.Series(dtype=str)).dropna()}
        )
        code = metadata.get("code") or {}
        packages = metadata.get("packages") or {}
        resources = metadata.get("cluster_resources") or {}
        hardware = ", ".join(_resource_text(k, v) for k, v in resources.items())
        status_text = ", ".join(f"{n} {s}" for s, n in sorted(states.items())) or "no runs"
        rows = [
            ("kind", metadata.get("kind")),
            ("folder", metadata.get("path")),
            ("created", metadata.get("created")),
            ("dataset", ", ".join(datasets) or "-"),
            ("protocol", "clean (selection and tables); official min-of-S in the audit only"),
            ("seeds", ", ".join(map(str, metadata.get("seeds", []))) or "-"),
            ("runs", status_text),
            ("metric", f"{metadata.get('metric')} ({metadata.get('mode')})"),
            *(
                [("reference variant", f"{metadata['reference']} (every Δ is against it)")]
                if metadata.get("reference") is not None
                else []
            ),
            (
                "code revision",
                f"{code.get('revision', 'unknown')}{' (uncommitted changes)' if code.get('dirty') else ''}"
                + (f"; runs: {', '.join(r[:12] for r in revisions)}" if revisions else ""),
            ),
            ("packages", ", ".join(f"{k} {v}" for k, v in packages.items() if v)),
            ("hardware", hardware or "-"),
            ("total compute", _hours(compute) + " of trial wall time"),
            ("extends", ", ".join(map(str, metadata.get("parents", []))) or "-"),
        ]
        body = "".join(
            f"<tr><th>{html.escape(k)}</th><td>{html.escape(str(v))}</td></tr>" for k, v in rows
        )
        items.append(f"<h3>{html.escape(name)}</h3><table class='meta'>{body}</table>")
    if not items:
        items.append("<p>No experiment could be read.</p>")
    return _section("Experiments", _paragraph(PROTOCOL_NOTE) + "".join(items))


def _curves_section(loaded: Loaded, figures: list[tuple[str, go.Figure]]) -> str:
    """One learning-curve figure per experiment with recorded epochs ("" when none has any)."""
    curves = loaded.curves
    if curves.empty:
        return ""
    parts = [_paragraph(CURVES_NOTE)]
    for name, metadata in loaded.experiments.items():
        rows = curves[curves["experiment"] == name]
        figure = learning_curves_figure(
            rows,
            order=metadata.get("variant_order", []),
            title=f"Learning curves: {name} ({metadata.get('kind')}, {rows['run'].nunique()} runs)",
        )
        if figure is None:
            continue
        slug = f"curves-{_slug(name)}"
        if slug in {n for n, _ in figures}:  # two names that differ only in odd characters
            slug = f"{slug}-{len(figures)}"
        figures.append((slug, figure))
        parts.append(_figure_placeholder(len(figures) - 1))
    return _section("Learning curves", "".join(parts)) if len(parts) > 1 else ""


def _slug(name: str) -> str:
    """A file- and id-safe form of an experiment name."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", name).strip("-") or "experiment"


def _runs_section(frame: pd.DataFrame) -> str:
    if frame.empty:
        return _section("Runs", "<p>No runs.</p>")
    columns = [
        c
        for c in (
            "experiment",
            "run",
            "seed",
            "state",
            "split",
            "protocol",
            "mrr",
            "hits@1",
            "best_epoch",
            "last_epoch",
            "valid_mrr_best_epoch",
            "valid_mrr_last_epoch",
            "wall_seconds",
        )
        if c in frame.columns
    ]
    shown = frame[(frame["protocol"] == "clean")][columns].round(4)
    for column in ("seed", "best_epoch", "last_epoch"):
        if column in shown:
            shown[column] = shown[column].astype("Int64")
    return _section(
        "Runs",
        _paragraph(
            "Every run's clean-protocol rows. <i>best_epoch</i> (selected by valid MRR) is the epoch "
            "whose weights were evaluated; <i>last_epoch</i> is where training stopped. Unfinished "
            "runs show their best valid epoch so far."
        )
        + _table_html(shown),
    )


def _problems_section(loaded: Loaded, notes: list[str]) -> str:
    if not loaded.problems and not notes:
        return _section("Problems", "<p>None: every folder was read.</p>")
    items = "".join(
        f"<li><code>{html.escape(path)}</code>: {html.escape(reason)}</li>"
        for path, reason in loaded.problems
    ) + "".join(f"<li>{html.escape(note)}</li>" for note in notes)
    return _section("Problems", f"<p>Skipped or left out:</p><ul>{items}</ul>")


_STYLE = """
body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1200px;color:#222}
table{border-collapse:collapse;margin:1em 0;font-size:0.9em}
th,td{padding:4px 10px;border-bottom:1px solid #ddd;text-align:right}
table.meta th,table.meta td{text-align:left}
h2{border-bottom:2px solid #444;padding-bottom:4px;margin-top:2em}
.figure{margin:1em 0}
"""


def _page(title: str, sections: list[str], figures: list[tuple[str, go.Figure]]) -> str:
    body = "".join(sections)
    for index, (name, figure) in enumerate(figures):
        div = plotly.io.to_html(
            figure,
            full_html=False,
            include_plotlyjs=False,
            div_id=f"figure-{name}",
            config={"displaylogo": False},
        )
        body = body.replace(_figure_placeholder(index), f'<div class="figure">{div}</div>')
    script = f"<script>{plotly.offline.get_plotlyjs()}</script>" if figures else ""
    return (
        "<!DOCTYPE html><html><head><meta charset='utf-8'>"
        f"<title>{html.escape(title)}</title><style>{_STYLE}</style>{script}</head>"
        f"<body><h1>{html.escape(title)}</h1>{body}</body></html>\n"
    )


def _write_pngs(figures, folder: Path, report: Report) -> None:
    chromium = find_chromium()
    if chromium is None:
        report.notes.append(
            "PNG figures skipped: no Chromium found (make install-chromium, or set BROWSER_PATH)"
        )
        return
    os.environ.setdefault("BROWSER_PATH", chromium)
    # kaleido's browser driver logs stray protocol messages as tracebacks; its result is checked.
    for name in ("choreographer", "kaleido", "logistro"):
        logging.getLogger(name).setLevel(logging.CRITICAL)
    folder.mkdir(parents=True, exist_ok=True)
    try:
        import plotly.io as pio

        paths = [folder / f"{name}.png" for name, _ in figures]
        pio.write_images([f for _, f in figures], paths, width=1000, height=500)
        report.files += paths
    except Exception as error:  # kaleido's failures are many and none is fatal to a report
        report.notes.append(f"PNG figures skipped: {type(error).__name__}: {error}".splitlines()[0])
