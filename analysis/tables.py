"""The paper's tables from the tidy frame: ablation, sensitivity, protocol audit, search points.

Every table is a pandas frame of plain numbers (written as CSV) plus a formatted rendering
(Markdown and LaTeX) where each cell reads ``mean ± std``. Only finished runs of the test split
enter the ablation and sensitivity tables; the protocol is always named.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd

from analysis.load import MEASURES
from analysis.stats import Comparison, mark, paired_t_test, summarize, two_level_bootstrap

__all__ = [
    "ablation_reference",
    "ablation_table",
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
            alphabetically.

    Columns: ``variant``, ``experiment``, ``reference`` (the same in every row, so the CSV says
    what the differences are against), ``seeds``; per measure, mean, std and 95% CI bounds over
    seeds; then, for MRR and Hits@1, the difference against ``reference`` (``delta_<m>``), its
    95% interval (``delta_<m>_ci_low``,
    ``delta_<m>_ci_high``), the paired test that gave them (``test_<m>``: a two-level bootstrap
    over seeds and queries when per-query ranks are stored, else a paired t over seeds), its
    p-value (``p_<m>``) and mark (``mark_<m>``). The reference's own row has NaN there.
    """
    finished = _finished(frame[frame["kind"] == "ablation"]) if not frame.empty else frame
    if finished.empty:
        return pd.DataFrame()
    present = set(finished["cell"])
    cells = [c for c in dict.fromkeys(order) if c in present] + sorted(present - set(order))
    if reference in cells:
        cells.remove(reference)
        cells.insert(0, reference)
    reference_rows = finished[finished["cell"] == reference]
    ranks: dict = {}  # ranks files read so far: each is read once per table
    rows = []
    for cell in cells:
        group = finished[finished["cell"] == cell]
        row = {
            "variant": cell,
            "experiment": ", ".join(sorted(set(group["experiment"]))),
            "reference": reference,
        }
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


def ablation_reference(table: pd.DataFrame) -> str | None:
    """The variant an :func:`ablation_table`'s differences are against (None for an empty one)."""
    if table.empty or "reference" not in table:
        return None
    return str(table["reference"].iloc[0])


def format_table(table: pd.DataFrame, kind: str) -> pd.DataFrame:
    """Readable text cells: ``mean ± std`` per measure, signed deltas with marks and intervals.

    An ablation's difference columns name their reference: ``Δ MRR vs full [95% CI]``.
    """
    if table.empty:
        return table
    formatted = pd.DataFrame()
    if kind == "ablation":
        formatted["Variant"] = table["variant"]
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
        return text.replace("±", r"$\pm$").replace("Δ", r"$\Delta$")

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
