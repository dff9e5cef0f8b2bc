"""The paper's tables from the tidy frame: ablation, baselines, sensitivity, protocol audit, search
points, and the cost points of the MRR-against-training-time figure.

Every table is a pandas frame of plain numbers (written as CSV) plus a formatted rendering
(Markdown and LaTeX) where each cell reads ``mean ± std``. Only finished runs of the test split
enter the ablation, baselines and sensitivity tables; the protocol is always named.

Classical baselines (runs whose ``baseline`` column is true, :mod:`analysis.load`) are ablation
cells like any variant: the ablation table lists them after the variants, with their Δ against the
reference and the same paired, seed-aware test, and, only when it has any, ``model`` and
``baseline`` columns that mark them. :func:`baselines_table` puts each baseline cell's model,
settings, budget and results beside the reference variant's; its formatted form marks the best
mean of each measure column with ``★``.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd

from analysis.load import DIFFUSIONCOM, MEASURES
from analysis.stats import Comparison, mark, paired_t_test, summarize, two_level_bootstrap

__all__ = [
    "BASELINE_DEFAULTS",
    "BEST",
    "ablation_reference",
    "ablation_table",
    "baselines_table",
    "cost_points",
    "format_table",
    "protocol_audit",
    "search_points",
    "sensitivity_table",
    "write_table",
]

LABELS = {"mr": "MR", "mrr": "MRR", "hits@1": "Hits@1", "hits@3": "Hits@3", "hits@10": "Hits@10"}


def _finished(frame: pd.DataFrame, split: str = "test", protocol: str = "clean") -> pd.DataFrame:
    if frame.empty:
        return frame
    chosen = frame[frame["finished"].eq(True) & (frame["split"] == split)]
    return chosen[chosen["protocol"] == protocol]


def _summary_columns(group: pd.DataFrame) -> dict:
    row = {"seeds": int(group["seed"].nunique())}
    for measure in MEASURES:
        summary = summarize(group[measure].astype(float).tolist())
        row.update(
            {
                f"{measure}_mean": summary.mean,
                f"{measure}_std": summary.std,
                f"{measure}_ci_low": summary.ci_low,
                f"{measure}_ci_high": summary.ci_high,
            }
        )
    return row


def _ranks(path: str, cache: dict) -> tuple[np.ndarray, np.ndarray | None]:
    """``(Q,)`` realistic ranks of a ``ranks_*.npz`` and its ``(Q, 3)`` queries (None if absent)."""
    if path not in cache:
        with np.load(path) as ranks:
            queries = ranks["queries"] if "queries" in ranks.files else None
            cache[path] = (ranks["realistic"].astype(float), queries)
    return cache[path]


def _ranks_file(group: pd.DataFrame, seed) -> str | None:
    files = group.loc[group["seed"] == seed, "ranks_file"].dropna()
    return None if files.empty else files.iloc[0]


def _per_query(group: pd.DataFrame, seeds: list, measure: str, cache: dict) -> np.ndarray:
    """``(S, Q)`` per-query values of ``measure``, one row per seed of ``seeds``.

    MRR's per-query value is ``1 / rank``, Hits@k's is ``rank <= k`` (as in ``core.evaluation``).
    """
    rows = []
    for seed in seeds:
        realistic, _ = _ranks(_ranks_file(group, seed), cache)
        if measure == "mrr":
            rows.append(1.0 / realistic)
        else:
            rows.append((realistic <= int(measure.split("@")[1])).astype(float))
    return np.stack(rows)


def _same_queries(files: list[str], cache: dict) -> bool:
    """Whether every ranks file ranks the same queries in the same order (the pairing holds)."""
    first, first_queries = _ranks(files[0], cache)
    for path in files[1:]:
        realistic, queries = _ranks(path, cache)
        if realistic.shape != first.shape:
            return False
        known = queries is not None and first_queries is not None
        if known and not np.array_equal(queries, first_queries):
            return False
    return True


def _compare(group: pd.DataFrame, reference: pd.DataFrame, measure: str, cache: dict) -> Comparison:
    """The variant's ``measure`` against the reference's, paired by seed (and query).

    A two-level bootstrap over seeds and queries when both arms stored per-query ranks for at
    least one common seed (only those seeds enter it); otherwise a paired t-test over the
    per-seed values.
    """
    seeds = sorted(set(group["seed"]) & set(reference["seed"]))
    if measure != "mr" and "ranks_file" in group and "ranks_file" in reference:
        ranked = [s for s in seeds if _ranks_file(group, s) and _ranks_file(reference, s)]
        files = [f for s in ranked for f in (_ranks_file(group, s), _ranks_file(reference, s))]
        if ranked and _same_queries(files, cache):
            return two_level_bootstrap(
                _per_query(group, ranked, measure, cache),
                _per_query(reference, ranked, measure, cache),
            )
    return paired_t_test(
        dict(zip(group["seed"], group[measure].astype(float), strict=True)),
        dict(zip(reference["seed"], reference[measure].astype(float), strict=True)),
    )


def _has_baselines(frame: pd.DataFrame) -> bool:
    return "baseline" in frame and bool(frame["baseline"].eq(True).any())


def _baseline_cells(frame: pd.DataFrame) -> set[str]:
    """Cells whose runs are classical baselines."""
    if not _has_baselines(frame):
        return set()
    return set(frame.loc[frame["baseline"].eq(True), "cell"])


def _cell_order(finished: pd.DataFrame, reference: str, order: list[str]) -> list[str]:
    """The reference, the variants in ``order``, the other variants by name, then the baselines
    by name (they are not in the study's variants)."""
    present = set(finished["cell"])
    baselines = _baseline_cells(finished)
    variants = present - baselines
    cells = [c for c in dict.fromkeys(order) if c in variants]
    cells += sorted(variants - set(cells)) + sorted(baselines)
    if reference in cells:
        cells.remove(reference)
        cells.insert(0, reference)
    return cells


def ablation_table(
    frame: pd.DataFrame, reference: str = "full", order: list[str] = ()
) -> pd.DataFrame:
    """One row per ablation variant (test split, clean protocol), the reference first.

    Args:
        frame: the tidy frame; only its ablation runs enter.
        reference: the variant every other variant is compared with (the study's ``reference``,
            :attr:`analysis.load.Loaded.experiments`' ``reference``). A reference without
            finished runs leaves every difference NaN.
        order: the study file's variant order; variants follow it, then any others
            alphabetically, then the baseline cells alphabetically.

    Columns: ``variant``, ``experiment``, ``reference`` (the same in every row, so the CSV says
    what the differences are against), ``seeds``; per measure, mean, std and 95% CI bounds over
    seeds; then, for MRR and Hits@1, the difference against ``reference`` (``delta_<m>``), its
    95% interval (``delta_<m>_ci_low``,
    ``delta_<m>_ci_high``), the paired test that gave them (``test_<m>``: a two-level bootstrap
    over seeds and queries when per-query ranks are stored, else a paired t over seeds), its
    p-value (``p_<m>``) and mark (``mark_<m>``). The reference's own row has NaN there.
    When some cell is a classical baseline, ``model`` (``DiffusionCom`` or the baseline's) and
    ``baseline`` follow ``variant``; a table without baselines has neither (it is the table it
    was before baselines existed).
    """
    finished = _finished(frame[frame["kind"] == "ablation"]) if not frame.empty else frame
    if finished.empty:
        return pd.DataFrame()
    cells = _cell_order(finished, reference, list(order))
    baselines = _baseline_cells(finished)
    reference_rows = finished[finished["cell"] == reference]
    ranks: dict = {}  # ranks files read so far: each is read once per table
    rows = []
    for cell in cells:
        group = finished[finished["cell"] == cell]
        row = {"variant": cell}
        if baselines:
            row["model"] = _model_name(group)
            row["baseline"] = cell in baselines
        row.update(
            experiment=", ".join(sorted(set(group["experiment"]))),
            reference=reference,
        )
        row.update(_summary_columns(group))
        for measure in ("mrr", "hits@1"):
            if cell == reference or reference_rows.empty:
                row.update(
                    {
                        f"delta_{measure}": math.nan,
                        f"delta_{measure}_ci_low": math.nan,
                        f"delta_{measure}_ci_high": math.nan,
                        f"p_{measure}": math.nan,
                    }
                )
                continue
            comparison = _compare(group, reference_rows, measure, ranks)
            row.update(
                {
                    f"delta_{measure}": comparison.delta,
                    f"delta_{measure}_ci_low": comparison.ci_low,
                    f"delta_{measure}_ci_high": comparison.ci_high,
                    f"p_{measure}": comparison.p_value,
                    f"test_{measure}": comparison.test,
                    f"mark_{measure}": mark(comparison.p_value),
                }
            )
        rows.append(row)
    return pd.DataFrame(rows)


def _model_name(group: pd.DataFrame) -> str:
    """The model of a cell's runs (``a, b`` should its seeds disagree)."""
    if "model" not in group:
        return DIFFUSIONCOM
    return ", ".join(sorted({str(m) for m in group["model"].dropna()})) or DIFFUSIONCOM


#: ``baseline.*`` defaults of the contract, for settings when no reference run records its own
#: (analysis never imports core, whose config holds them).
BASELINE_DEFAULTS = {
    "embedding_dim": 200,
    "lr": 0.01,
    "batch_size": 256,
    "epochs": 1000,
    "patience": 0,
}

# Shown in the budget column, not among the settings.
_BUDGET_KEYS = ("model", "budget_seconds", "clock")


def _mean(group: pd.DataFrame, column: str) -> float:
    if column not in group:
        return math.nan
    return summarize(pd.to_numeric(group[column], errors="coerce").tolist()).mean


def _std(group: pd.DataFrame, column: str) -> float:
    if column not in group:
        return math.nan
    return summarize(pd.to_numeric(group[column], errors="coerce").tolist()).std


def _baseline_config(group: pd.DataFrame) -> dict:
    """``{key: value}`` of the first run's ``config.baseline.*`` columns that hold a value."""
    prefix = "config.baseline."
    first = group.iloc[0]
    return {
        column.removeprefix(prefix): first[column]
        for column in group.columns
        if column.startswith(prefix) and not _missing(first[column])
    }


def _missing(value) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def _settings(group: pd.DataFrame, defaults: dict, budget_in_epochs: bool) -> str:
    """``key=value`` of the ``baseline.*`` settings that differ from ``defaults`` (``-`` if none).

    The model, the time budget and its clock have their own columns; so does ``epochs`` when it
    is the budget.
    """
    differing = []
    for key, value in sorted(_baseline_config(group).items()):
        if key in _BUDGET_KEYS or (key == "epochs" and budget_in_epochs):
            continue
        if key not in defaults or defaults[key] != value:
            differing.append(f"{key}={value:g}" if isinstance(value, float) else f"{key}={value}")
    return ", ".join(differing) or "-"


def baselines_table(frame: pd.DataFrame, reference: str = "full") -> pd.DataFrame:
    """One row per classical-baseline cell of the ablation runs, the reference variant's first.

    Args:
        frame: the tidy frame; only its ablation runs enter (test and valid split, clean
            protocol, finished).
        reference: the variant the baselines are set beside (the ablation's reference); the
            baselines follow it alphabetically.

    Columns: ``cell``, ``model``, ``baseline``, ``experiment``, ``reference``, ``settings`` (the
    ``baseline.*`` values that differ from the reference runs' own, else from
    :data:`BASELINE_DEFAULTS`; ``-`` when none), ``budget_seconds`` (mean over seeds of the time
    budget each run was given; NaN without one), ``clock``, ``budget_epochs`` (``baseline.epochs``
    when the budget is epochs), ``matched`` (whether its budget was matched to a reference run),
    ``epochs_run`` (mean), ``seeds``; per test measure (MRR, Hits@1, Hits@3, Hits@10) mean and
    std over seeds; ``valid_mrr_mean``/``_std``; ``train_seconds_mean``/``_std`` (the runs'
    ``total_train_seconds``). Empty when no finished run is a baseline.
    """
    if frame.empty or "kind" not in frame:
        return pd.DataFrame()
    ablation = frame[frame["kind"] == "ablation"]
    test, valid = _finished(ablation), _finished(ablation, split="valid")
    if test.empty or not _has_baselines(test):
        return pd.DataFrame()
    cells = sorted(_baseline_cells(test) - {reference})
    reference_test = test[test["cell"] == reference]
    defaults = dict(BASELINE_DEFAULTS)
    if not reference_test.empty:
        # The reference's own baseline.* are the defaults its code had (absent in older runs).
        defaults.update(
            {k: v for k, v in _baseline_config(reference_test).items() if k not in _BUDGET_KEYS}
        )
    rows = []
    for cell in ([reference] if not reference_test.empty else []) + cells:
        group = test[test["cell"] == cell]
        is_baseline = cell != reference
        budget = _mean(group, "baseline_budget_seconds")
        in_epochs = is_baseline and math.isnan(budget)
        clocks = sorted({str(c) for c in group.get("baseline_clock", pd.Series()).dropna()})
        row = {
            "cell": cell,
            "model": _model_name(group),
            "baseline": is_baseline,
            "experiment": ", ".join(sorted(set(group["experiment"]))),
            "reference": reference,
            "settings": _settings(group, defaults, in_epochs) if is_baseline else "-",
            "budget_seconds": budget,
            "clock": ", ".join(clocks) if is_baseline and not in_epochs else None,
            "budget_epochs": _mean(group, "baseline_epochs") if in_epochs else math.nan,
            "matched": bool(group.get("baseline_matched_to", pd.Series()).notna().any()),
            "epochs_run": _mean(group, "baseline_epochs_run"),
            "seeds": int(group["seed"].nunique()),
        }
        for measure in ("mrr", "hits@1", "hits@3", "hits@10"):
            row[f"{measure}_mean"] = _mean(group, measure)
            row[f"{measure}_std"] = _std(group, measure)
        valid_group = valid[valid["cell"] == cell]
        row["valid_mrr_mean"] = _mean(valid_group, "mrr")
        row["valid_mrr_std"] = _std(valid_group, "mrr")
        row["train_seconds_mean"] = _mean(group, "total_train_seconds")
        row["train_seconds_std"] = _std(group, "total_train_seconds")
        rows.append(row)
    return pd.DataFrame(rows)


def cost_points(
    frame: pd.DataFrame, reference: str | None = None, order: list[str] = ()
) -> pd.DataFrame:
    """Test MRR against training time per ablation cell (clean protocol, finished runs).

    Columns: ``cell``, ``model``, ``baseline``, ``reference`` (whether the cell is the
    reference), ``seeds`` (runs with both numbers), ``mrr_mean``/``_std`` and
    ``seconds_mean``/``_std`` over those seeds, where a run's seconds are its
    ``total_train_seconds`` (its training plus the shared stage 1 it used). A cell without a run
    that has both is left out. Cells in the ablation table's order.
    """
    if frame.empty or "kind" not in frame or "total_train_seconds" not in frame:
        return pd.DataFrame()
    test = _finished(frame[frame["kind"] == "ablation"])
    if test.empty:
        return pd.DataFrame()
    baselines = _baseline_cells(test)
    rows = []
    for cell in _cell_order(test, reference or "", list(order)):
        group = test[test["cell"] == cell]
        seconds = pd.to_numeric(group["total_train_seconds"], errors="coerce")
        mrr = pd.to_numeric(group["mrr"], errors="coerce")
        usable = group[seconds.notna() & mrr.notna()]
        if usable.empty:
            continue
        rows.append(
            {
                "cell": cell,
                "model": _model_name(usable),
                "baseline": cell in baselines,
                "reference": cell == reference,
                "seeds": int(usable["seed"].nunique()),
                "mrr_mean": _mean(usable, "mrr"),
                "mrr_std": _std(usable, "mrr"),
                "seconds_mean": _mean(usable, "total_train_seconds"),
                "seconds_std": _std(usable, "total_train_seconds"),
            }
        )
    return pd.DataFrame(rows)


def sensitivity_table(frame: pd.DataFrame) -> pd.DataFrame:
    """One row per (axis, value) of the sensitivity studies (test split, clean protocol)."""
    finished = _finished(frame[frame["kind"] == "sensitivity"]) if not frame.empty else frame
    if finished.empty:
        return pd.DataFrame()
    rows = []
    for (axis, value), group in finished.groupby(["axis", "axis_value"], sort=True):
        row = {"axis": axis, "value": value}
        row.update(_summary_columns(group))
        latency = summarize(group["inference_ms_per_query"].astype(float).tolist())
        row.update(ms_per_query_mean=latency.mean, ms_per_query_std=latency.std)
        rows.append(row)
    return pd.DataFrame(rows)


def protocol_audit(frame: pd.DataFrame) -> pd.DataFrame:
    """Clean against official min-of-S on the test split, per experiment and cell.

    ``inflation`` is official minus clean: what reporting the label-using protocol adds.
    """
    finished = (
        frame[frame["finished"].eq(True) & (frame["split"] == "test")] if not frame.empty else frame
    )
    if finished.empty:
        return pd.DataFrame()
    rows = []
    for (experiment, cell), group in finished.groupby(["experiment", "cell"], sort=False):
        clean = group[group["protocol"] == "clean"]
        for protocol in sorted(p for p in set(group["protocol"]) if p.startswith("official")):
            official = group[group["protocol"] == protocol]
            row = {"experiment": experiment, "cell": cell, "protocol": protocol}
            for measure in ("mrr", "hits@1"):
                clean_mean = summarize(clean[measure].astype(float).tolist()).mean
                official_mean = summarize(official[measure].astype(float).tolist()).mean
                row.update(
                    {
                        f"clean_{measure}": clean_mean,
                        f"official_{measure}": official_mean,
                        f"inflation_{measure}": official_mean - clean_mean,
                    }
                )
            row["seeds"] = int(official["seed"].nunique())
            rows.append(row)
    return pd.DataFrame(rows)


def search_points(frame: pd.DataFrame, metric: str = "mrr") -> pd.DataFrame:
    """Finished search points: the swept config values and the mean valid metric over seeds."""
    finished = (
        _finished(frame[frame["kind"] == "search"], split="valid") if not frame.empty else frame
    )
    if finished.empty:
        return pd.DataFrame()
    swept = [
        column
        for column in finished.columns
        if column.startswith("config.")
        and column != "config.seed"
        and finished.groupby("cell")[column].first().nunique(dropna=True) > 1
    ]
    grouped = finished.groupby(["experiment", "cell"])
    points = grouped[swept].first()
    points[f"valid_{metric}"] = grouped[metric].mean()
    points["seeds"] = grouped["seed"].nunique()
    return points.reset_index()


# ---------------------------------------------------------------------------------- rendering


def _cell_text(row: pd.Series, measure: str, digits: int) -> str:
    mean, std = row[f"{measure}_mean"], row[f"{measure}_std"]
    if isinstance(mean, float) and math.isnan(mean):
        return "-"
    if isinstance(std, float) and math.isnan(std):
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def _delta_text(row: pd.Series, measure: str) -> str:
    """``+0.012** [+0.004, +0.020]``: the difference, its mark and its 95% interval.

    ``reference`` on the reference's own row, ``-`` where there is no difference to show.
    """
    if row["variant"] == row.get("reference"):
        return "reference"
    delta = row[f"delta_{measure}"]
    if isinstance(delta, float) and math.isnan(delta):
        return "-"
    text = f"{delta:+.3f}{row.get(f'mark_{measure}', '') or ''}"
    low, high = row.get(f"delta_{measure}_ci_low"), row.get(f"delta_{measure}_ci_high")
    if low is None or high is None or math.isnan(low) or math.isnan(high):
        return f"{text} [no CI]"
    return f"{text} [{low:+.3f}, {high:+.3f}]"


def _test_text(row: pd.Series) -> str:
    """The paired test behind the row's differences (one name when MRR and Hits@1 share it)."""
    tests = {
        LABELS[m]: row.get(f"test_{m}")
        for m in ("mrr", "hits@1")
        if isinstance(row.get(f"test_{m}"), str)
    }
    if not tests:
        return "-"
    if len(set(tests.values())) == 1:
        return next(iter(tests.values()))
    return "; ".join(f"{label}: {test}" for label, test in tests.items())


#: What marks the best mean of a column in a formatted baselines table.
BEST = "★"


def _best_marked(texts: pd.Series, means: pd.Series) -> pd.Series:
    """``texts`` with :data:`BEST` after each that has the column's highest mean (ties all)."""
    values = pd.to_numeric(means, errors="coerce")
    if values.notna().sum() < 2:  # one number is best of nothing
        return texts
    best = values.max()
    return pd.Series(
        [f"{t} {BEST}" if v == best else t for t, v in zip(texts, values, strict=True)],
        index=texts.index,
    )


def _number_text(value) -> str:
    """A count (a mean of counts keeps one decimal); ``-`` when missing."""
    if _missing(value):
        return "-"
    return f"{value:.0f}" if float(value).is_integer() else f"{value:.1f}"


def _budget_text(row: pd.Series) -> str:
    """``120 s cpu (matched)``, ``epochs 50`` or, on the reference's row, ``reference``."""
    if not row["baseline"]:
        return "reference"
    if not _missing(row["budget_seconds"]):
        matched = " (matched)" if row.get("matched") else ""
        seconds = _number_text(row["budget_seconds"])
        return f"{seconds} s {row['clock'] or ''}".rstrip() + matched
    return f"epochs {_number_text(row['budget_epochs'])}"


def _format_baselines(table: pd.DataFrame) -> pd.DataFrame:
    formatted = pd.DataFrame()
    formatted["Cell"] = table["cell"]
    formatted["Model"] = [
        f"{model} (baseline)" if baseline else f"{model} (reference)"
        for model, baseline in zip(table["model"], table["baseline"], strict=True)
    ]
    formatted["Settings"] = table["settings"]
    formatted["Budget"] = table.apply(_budget_text, axis=1)
    formatted["Epochs run"] = table["epochs_run"].map(_number_text)
    formatted["Seeds"] = table["seeds"]
    for measure in ("mrr", "hits@1", "hits@3", "hits@10"):
        texts = table.apply(lambda r, m=measure: _cell_text(r, m, 3), axis=1)
        formatted[LABELS[measure]] = _best_marked(texts, table[f"{measure}_mean"])
    valid = table.apply(lambda r: _cell_text(r, "valid_mrr", 3), axis=1)
    formatted["Valid MRR"] = _best_marked(valid, table["valid_mrr_mean"])
    formatted["Train s"] = table.apply(lambda r: _cell_text(r, "train_seconds", 1), axis=1)
    return formatted


def ablation_reference(table: pd.DataFrame) -> str | None:
    """The variant an :func:`ablation_table`'s differences are against (None for an empty one)."""
    if table.empty or "reference" not in table:
        return None
    return str(table["reference"].iloc[0])


def format_table(table: pd.DataFrame, kind: str) -> pd.DataFrame:
    """Readable text cells: ``mean ± std`` per measure, signed deltas with marks and intervals.

    ``kind`` is ``ablation``, ``baselines`` (:func:`baselines_table`: the best mean of each
    measure column marked :data:`BEST`) or ``sensitivity``. An ablation's difference columns
    name their reference: ``Δ MRR vs full [95% CI]``; its baseline cells, when it has any, read
    ``pykeen-tucker (baseline)`` and a ``Model`` column follows.
    """
    if table.empty:
        return table
    if kind == "baselines":
        return _format_baselines(table)
    formatted = pd.DataFrame()
    if kind == "ablation":
        formatted["Variant"] = table["variant"]
        if "baseline" in table:
            formatted["Variant"] = [
                f"{variant} (baseline)" if baseline else variant
                for variant, baseline in zip(table["variant"], table["baseline"], strict=True)
            ]
            formatted["Model"] = table["model"]
    elif kind == "sensitivity":
        formatted["Axis"] = table["axis"]
        formatted["Value"] = table["value"].map(
            lambda v: f"{v:g}" if isinstance(v, float) else str(v)
        )
    formatted["Seeds"] = table["seeds"]
    for measure in MEASURES:
        digits = 1 if measure == "mr" else 3
        formatted[LABELS[measure]] = table.apply(
            lambda r, m=measure, d=digits: _cell_text(r, m, d), axis=1
        )
    if kind == "ablation":
        versus = f" vs {ablation_reference(table)}" if "reference" in table else ""
        for measure in ("mrr", "hits@1"):
            formatted[f"Δ {LABELS[measure]}{versus} [95% CI]"] = table.apply(
                lambda r, m=measure: _delta_text(r, m), axis=1
            )
        formatted["Test"] = table.apply(_test_text, axis=1)
        formatted["95% CI of MRR"] = table.apply(
            lambda r: (
                "-"
                if math.isnan(r["mrr_ci_low"])
                else f"[{r['mrr_ci_low']:.3f}, {r['mrr_ci_high']:.3f}]"
            ),
            axis=1,
        )
    if kind == "sensitivity":
        formatted["ms/query"] = table["ms_per_query_mean"].map(lambda v: f"{v:.2f}")
    return formatted


def write_table(
    table: pd.DataFrame, formatted: pd.DataFrame, stem: Path, caption: str
) -> list[Path]:
    """``stem.csv`` (numbers), ``stem.md`` and ``stem.tex`` (formatted); returns the paths."""
    stem.parent.mkdir(parents=True, exist_ok=True)
    table.to_csv(stem.with_suffix(".csv"), index=False)
    markdown = f"{caption}\n\n" + _markdown(formatted) + "\n"
    stem.with_suffix(".md").write_text(markdown)
    stem.with_suffix(".tex").write_text(_latex(formatted, caption))
    return [stem.with_suffix(suffix) for suffix in (".csv", ".md", ".tex")]


def _markdown(frame: pd.DataFrame) -> str:
    header = "| " + " | ".join(map(str, frame.columns)) + " |"
    rule = "|" + "|".join("---" for _ in frame.columns) + "|"
    lines = ["| " + " | ".join(str(v) for v in row) + " |" for row in frame.itertuples(index=False)]
    return "\n".join([header, rule, *lines])


def _latex(frame: pd.DataFrame, caption: str) -> str:
    def escape(text) -> str:
        text = str(text)
        for raw, safe in (
            ("\\", r"\textbackslash{}"),
            ("&", r"\&"),
            ("%", r"\%"),
            ("_", r"\_"),
            ("#", r"\#"),
        ):
            text = text.replace(raw, safe)
        return text.replace("±", r"$\pm$").replace("Δ", r"$\Delta$").replace(BEST, r"$^\star$")

    columns = "l" + "r" * (len(frame.columns) - 1)
    lines = [
        r"\begin{table}[t]",
        r"\centering",
        rf"\caption{{{escape(caption)}}}",
        rf"\begin{{tabular}}{{{columns}}}",
        r"\toprule",
        " & ".join(escape(c) for c in frame.columns) + r" \\",
        r"\midrule",
        *(" & ".join(escape(v) for v in row) + r" \\" for row in frame.itertuples(index=False)),
        r"\bottomrule",
        r"\end{tabular}",
        r"\end{table}",
    ]
    return "\n".join(lines) + "\n"
