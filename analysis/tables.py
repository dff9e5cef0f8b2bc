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
from analysis.stats import Comparison, mark, paired_bootstrap, paired_t_test, summarize

__all__ = [
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


def _per_query(group: pd.DataFrame, seeds: list, measure: str) -> np.ndarray | None:
    """``(Q,)`` per-query values of ``measure`` averaged over ``seeds``, or None if not stored.

    MRR's per-query value is ``1 / rank``, Hits@k's is ``rank <= k`` (as in ``core.evaluation``);
    both are averaged over seeds query by query, so the bootstrap pairs the same test query.
    """
    arrays = []
    for seed in seeds:
        files = group.loc[group["seed"] == seed, "ranks_file"].dropna()
        if files.empty:
            return None
        with np.load(files.iloc[0]) as ranks:
            realistic = ranks["realistic"].astype(float)
        if measure == "mrr":
            arrays.append(1.0 / realistic)
        else:
            arrays.append((realistic <= int(measure.split("@")[1])).astype(float))
    if not arrays or len({a.shape for a in arrays}) != 1:
        return None
    return np.mean(arrays, axis=0)


def _compare(group: pd.DataFrame, reference: pd.DataFrame, measure: str) -> Comparison:
    seeds = sorted(set(group["seed"]) & set(reference["seed"]))
    if measure != "mr" and "ranks_file" in group and seeds:
        mine, theirs = _per_query(group, seeds, measure), _per_query(reference, seeds, measure)
        if mine is not None and theirs is not None and mine.shape == theirs.shape:
            return paired_bootstrap(mine, theirs)
    return paired_t_test(
        dict(zip(group["seed"], group[measure].astype(float), strict=True)),
        dict(zip(reference["seed"], reference[measure].astype(float), strict=True)),
    )


def ablation_table(
    frame: pd.DataFrame, reference: str = "full", order: list[str] = ()
) -> pd.DataFrame:
    """One row per ablation variant (test split, clean protocol), the reference first.

    Variants follow ``order`` (the study file's order), then any others alphabetically.

    Columns per measure: mean, std and 95% CI bounds over seeds; then the MRR and Hits@1
    differences against ``reference`` with their paired test, p-value and mark.
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
    rows = []
    for cell in cells:
        group = finished[finished["cell"] == cell]
        row = {"variant": cell, "experiment": ", ".join(sorted(set(group["experiment"])))}
        row.update(_summary_columns(group))
        for measure in ("mrr", "hits@1"):
            if cell == reference or reference_rows.empty:
                row.update({f"delta_{measure}": math.nan, f"p_{measure}": math.nan})
                continue
            comparison = _compare(group, reference_rows, measure)
            row.update(
                {
                    f"delta_{measure}": comparison.delta,
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


def format_table(table: pd.DataFrame, kind: str) -> pd.DataFrame:
    """Readable text cells: ``mean ± std`` per measure, signed deltas with their marks."""
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
        for measure in ("mrr", "hits@1"):
            formatted[f"Δ {LABELS[measure]}"] = table.apply(
                lambda r, m=measure: (
                    "-"
                    if math.isnan(r[f"delta_{m}"])
                    else f"{r[f'delta_{m}']:+.3f}{r.get(f'mark_{m}', '') or ''}"
                ),
                axis=1,
            )
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
