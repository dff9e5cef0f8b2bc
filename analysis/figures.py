"""Plotly figures: sensitivity curves, the K latency trade-off, search importance and coordinates,
learning curves, the ablation's forest plot, and test MRR against training time for an ablation's
variants and classical baselines (:func:`cost_figure`)."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pandas as pd
import plotly.colors
import plotly.graph_objects as go
from plotly.subplots import make_subplots

__all__ = [
    "cost_figure",
    "forest_figure",
    "importance_figure",
    "learning_curves_figure",
    "parallel_coordinates",
    "pareto_figure",
    "sensitivity_figure",
]

LATENCY_AXIS = "diffusion.steps"


def _error(table: pd.DataFrame, measure: str) -> list[float]:
    """Half-width of the 95% interval (0 where a single seed gives none)."""
    return [
        0.0 if math.isnan(high) else high - mean
        for mean, high in zip(table[f"{measure}_mean"], table[f"{measure}_ci_high"], strict=True)
    ]


def sensitivity_figure(table: pd.DataFrame, axis: str) -> go.Figure:
    """Test Hits@1 and MRR against one axis with 95% intervals; for K also ms/query."""
    rows = table[table["axis"] == axis].sort_values("value")
    with_latency = axis == LATENCY_AXIS
    figure = make_subplots(specs=[[{"secondary_y": with_latency}]])
    for measure, label in (("hits@1", "Hits@1"), ("mrr", "MRR")):
        figure.add_trace(
            go.Scatter(
                x=rows["value"],
                y=rows[f"{measure}_mean"],
                error_y={"type": "data", "array": _error(rows, measure), "visible": True},
                mode="lines+markers",
                name=f"{label} (test, clean)",
            ),
            secondary_y=False,
        )
    if with_latency:
        figure.add_trace(
            go.Scatter(
                x=rows["value"],
                y=rows["ms_per_query_mean"],
                mode="lines+markers",
                name="ms/query (clean inference)",
                line={"dash": "dot"},
            ),
            secondary_y=True,
        )
        figure.update_yaxes(title_text="ms per query", secondary_y=True)
    figure.update_yaxes(title_text="test metric (clean protocol)", secondary_y=False)
    figure.update_layout(
        title=f"Sensitivity to {axis} (mean over seeds, 95% CI)",
        xaxis_title=axis,
        template="plotly_white",
        height=420,
    )
    return figure


def pareto_figure(table: pd.DataFrame) -> go.Figure:
    """Hits@1 against inference latency for each K, with the Pareto front (faster and better)."""
    rows = table[table["axis"] == LATENCY_AXIS].sort_values("ms_per_query_mean")
    front, best = [], -math.inf
    for index, hits in zip(rows.index, rows["hits@1_mean"], strict=True):
        if hits > best:  # faster than every later point and better than every earlier one
            front.append(index)
            best = hits
    figure = go.Figure()
    figure.add_trace(
        go.Scatter(
            x=rows["ms_per_query_mean"],
            y=rows["hits@1_mean"],
            text=[f"K={v:g}" for v in rows["value"]],
            mode="markers+text",
            textposition="top center",
            name="K",
        )
    )
    pareto = rows.loc[front]
    figure.add_trace(
        go.Scatter(
            x=pareto["ms_per_query_mean"],
            y=pareto["hits@1_mean"],
            mode="lines",
            name="Pareto front",
            line={"dash": "dash"},
        )
    )
    figure.update_layout(
        title="Hits@1 against inference latency over K (test, clean protocol)",
        xaxis_title="ms per query",
        yaxis_title="Hits@1",
        template="plotly_white",
        height=420,
    )
    return figure


def _optuna_study(points: pd.DataFrame, metric_column: str, mode: str):
    import optuna
    from optuna.distributions import CategoricalDistribution, FloatDistribution

    parameters = [c for c in points.columns if c.startswith("config.")]
    distributions = {}
    for column in parameters:
        values = points[column].dropna()
        if pd.api.types.is_numeric_dtype(values) and not pd.api.types.is_bool_dtype(values):
            low, high = float(values.min()), float(values.max())
            distributions[column] = FloatDistribution(low, high if high > low else low + 1e-12)
        else:
            distributions[column] = CategoricalDistribution(sorted(set(map(str, values))))
    study = optuna.create_study(direction="maximize" if mode == "max" else "minimize")
    for _, row in points.iterrows():
        params = {
            c: (float(row[c]) if isinstance(distributions[c], FloatDistribution) else str(row[c]))
            for c in parameters
        }
        study.add_trial(
            optuna.trial.create_trial(
                params=params, distributions=distributions, value=float(row[metric_column])
            )
        )
    return study


def importance_figure(points: pd.DataFrame, metric_column: str, mode: str) -> go.Figure | None:
    """Optuna's parameter importances (its default evaluator) over finished search points."""
    import optuna

    if len(points) < 3 or not [c for c in points.columns if c.startswith("config.")]:
        return None
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        importances = optuna.importance.get_param_importances(
            _optuna_study(points, metric_column, mode)
        )
    names = list(importances)[::-1]
    figure = go.Figure(go.Bar(x=[importances[n] for n in names], y=names, orientation="h"))
    figure.update_layout(
        title=f"Parameter importance for valid {metric_column} (Optuna, {len(points)} points)",
        xaxis_title="importance",
        template="plotly_white",
        height=120 + 40 * len(names),
    )
    return figure


def parallel_coordinates(points: pd.DataFrame, metric_column: str) -> go.Figure | None:
    """One line per search point across its swept values and the metric."""
    parameters = [c for c in points.columns if c.startswith("config.")]
    if not parameters or points.empty:
        return None
    dimensions = []
    for column in [*parameters, metric_column]:
        values = points[column]
        if pd.api.types.is_numeric_dtype(values) and not pd.api.types.is_bool_dtype(values):
            dimensions.append(
                {"label": column.removeprefix("config."), "values": values.astype(float)}
            )
        else:
            labels = sorted(set(map(str, values)))
            dimensions.append(
                {
                    "label": column.removeprefix("config."),
                    "values": [labels.index(str(v)) for v in values],
                    "tickvals": list(range(len(labels))),
                    "ticktext": labels,
                }
            )
    figure = go.Figure(
        go.Parcoords(
            line={
                "color": points[metric_column].astype(float),
                "colorscale": "Viridis",
                "showscale": True,
            },
            dimensions=dimensions,
        )
    )
    figure.update_layout(
        title="Search points (valid, clean protocol)", template="plotly_white", height=450
    )
    return figure


# ------------------------------------------------------------------------------ learning curves

# 24 distinguishable colours; cells beyond that reuse them (the legend and hover still tell).
_PALETTE = plotly.colors.qualitative.Dark24


def _cell_order(curves: pd.DataFrame, order: list[str]) -> list[str]:
    """``order`` first (the study's), then the rest by axis and numeric value, then by name."""
    present = list(dict.fromkeys(curves["cell"]))
    first = [c for c in dict.fromkeys(order) if c in present]
    values = curves.groupby("cell", sort=False)[["axis", "axis_value"]].first()

    def key(cell):
        axis, value = values.loc[cell, "axis"], values.loc[cell, "axis_value"]
        numeric = isinstance(value, (int, float)) and not isinstance(value, bool)
        return (
            str(axis) if isinstance(axis, str) else "",
            not numeric,
            value if numeric else 0,
            cell,
        )

    return first + sorted((c for c in present if c not in first), key=key)


def learning_curves_figure(
    curves: pd.DataFrame, order: list[str] = (), title: str | None = None, max_legend: int = 30
) -> go.Figure | None:
    """Valid MRR (top) and training loss (bottom) per epoch, one line per run.

    Args:
        curves: rows of :attr:`analysis.load.Loaded.curves`, usually one experiment's.
        order: cells in this order first (the study's variants), the others after.
        title: the figure's title.
        max_legend: above this many cells the legend is hidden (hover still names each run).

    The x axis is the epoch across both stages (``global_epoch``); a dashed line marks where
    stage 2 starts (one per distinct start, since early stopping can end stage 1 at different
    epochs). Seeds of one cell share its colour and its single legend entry, which toggles them
    all. Valid MRR appears on the epochs that were evaluated. Loss is stage 1's BCE, then
    stage 2's weighted KL + BCE, so it jumps at the line; its axis is logarithmic when every loss
    is positive. None when there is nothing to draw.
    """
    if curves.empty:
        return None
    cells = _cell_order(curves, list(order))
    figure = make_subplots(
        rows=2,
        cols=1,
        shared_xaxes=True,
        vertical_spacing=0.07,
        subplot_titles=("valid MRR (clean protocol)", "training loss (mean over batches)"),
    )
    legend = len(cells) <= max_legend
    traces = []
    by_run = dict(tuple(curves.groupby("run", sort=True)))
    for index, cell in enumerate(cells):
        colour = _PALETTE[index % len(_PALETTE)]
        in_legend = legend
        for run in sorted(set(curves.loc[curves["cell"] == cell, "run"])):
            rows = by_run[run].sort_values("global_epoch")
            for axis, column in (("y", "valid_mrr"), ("y2", "loss")):
                shown = rows[rows[column].notna()]
                if shown.empty:
                    continue
                traces.append(
                    go.Scatter(
                        # int32 and float32 halve the base64 the page carries for many runs.
                        x=shown["global_epoch"].to_numpy(np.int32),
                        y=shown[column].to_numpy(np.float32),
                        customdata=shown[["stage", "epoch"]].to_numpy(np.int32),
                        meta=str(run),
                        line={"color": colour},
                        name=str(cell),
                        legendgroup=str(cell),
                        showlegend=in_legend,
                        xaxis="x2" if axis == "y2" else "x",
                        yaxis=axis,
                    )
                )
                in_legend = False  # one legend entry per cell
    # What every line shares is set once, in the figure's template, not once per trace.
    figure.update_layout(template="plotly_white")
    figure.layout.template.data.scatter = [
        go.Scatter(
            mode="lines+markers",
            line={"width": 1.5},
            marker={"size": 3},
            opacity=0.8,
            hovertemplate="%{meta}<br>stage %{customdata[0]}, epoch %{customdata[1]}"
            "<br>%{y:.4f}<extra></extra>",
        )
    ]
    figure.add_traces(traces)
    starts = sorted(
        {
            float(first) - 0.5
            for first in curves[curves["stage"] == 2].groupby("run")["global_epoch"].min()
        }
    )
    for start in starts:
        figure.add_vline(x=start, line_dash="dash", line_color="#777", line_width=1, row="all")
    if starts:
        figure.add_annotation(
            x=starts[0],
            y=0.98,
            xref="x",
            yref="y domain",
            text=" stage 2 →",
            showarrow=False,
            xanchor="left",
            yanchor="top",
            font={"size": 11, "color": "#555"},
        )
    if (curves["loss"].dropna() > 0).all() and curves["loss"].notna().any():
        figure.update_yaxes(type="log", row=2, col=1)
    figure.update_xaxes(title_text="epoch (stage 1, then stage 2)", row=2, col=1)
    if curves["global_epoch"].max() <= 20:
        figure.update_xaxes(dtick=1)  # whole epochs only
    runs = curves["run"].nunique()
    figure.update_layout(
        title=title or f"Learning curves ({runs} runs; seeds of a cell share its colour)",
        height=640,
        legend={"title": {"text": "cell" if legend else ""}, "groupclick": "togglegroup"},
        hovermode="closest",
    )
    return figure


# ------------------------------------------------------------------------------- forest plot


def _column(rows: pd.DataFrame, name: str) -> pd.Series:
    return rows[name].astype(float) if name in rows else pd.Series(math.nan, index=rows.index)


def forest_figure(table: pd.DataFrame, reference: str | None = None) -> go.Figure | None:
    """Δ MRR and Δ Hits@1 of each variant against ``reference`` with their 95% intervals.

    Args:
        table: :func:`analysis.tables.ablation_table`'s frame (its ``delta_<m>``,
            ``delta_<m>_ci_low``/``_high``, ``p_<m>``, ``test_<m>`` and ``mark_<m>`` columns).
        reference: the variant the others were compared with; it gets no row, and the titles
            name it. By default the table's ``reference`` column, else ``full``.

    Variants keep the table's order (the study's), top to bottom; a dashed line marks zero, so a
    bar that crosses it is a difference the paired test cannot tell from none. A variant without
    an interval (one seed and no stored ranks) shows its point alone. None when no variant has a
    difference to show.
    """
    if table.empty or "variant" not in table:
        return None
    if reference is None:
        reference = str(table["reference"].iloc[0]) if "reference" in table else "full"
    rows = table[table["variant"] != reference]
    rows = rows[_column(rows, "delta_mrr").notna() | _column(rows, "delta_hits@1").notna()]
    if rows.empty:
        return None
    variants = [str(v) for v in rows["variant"]]
    figure = make_subplots(
        rows=1,
        cols=2,
        shared_yaxes=True,
        horizontal_spacing=0.06,
        subplot_titles=(f"Δ MRR vs {reference}", f"Δ Hits@1 vs {reference}"),
    )
    for col, (measure, label) in enumerate((("mrr", "MRR"), ("hits@1", "Hits@1")), start=1):
        delta = _column(rows, f"delta_{measure}")
        low, high = (
            _column(rows, f"delta_{measure}_ci_low"),
            _column(rows, f"delta_{measure}_ci_high"),
        )
        tests = (
            rows[f"test_{measure}"]
            if f"test_{measure}" in rows
            else pd.Series("", index=rows.index)
        )
        marks = (
            rows[f"mark_{measure}"]
            if f"mark_{measure}" in rows
            else pd.Series("", index=rows.index)
        )
        p_values = _column(rows, f"p_{measure}")
        hover = [
            f"{variant}: Δ {label} {d:+.4f}{m if isinstance(m, str) else ''}<br>"
            + (
                f"95% CI [{lo:+.4f}, {hi:+.4f}]"
                if not (math.isnan(lo) or math.isnan(hi))
                else "no CI"
            )
            + f"<br>{t if isinstance(t, str) else 'no test'}, "
            + (f"p = {p:.3g}" if not math.isnan(p) else "p unknown")
            for variant, d, lo, hi, t, m, p in zip(
                variants, delta, low, high, tests, marks, p_values, strict=True
            )
        ]
        figure.add_trace(
            go.Scatter(
                x=delta,
                y=variants,
                mode="markers+text",
                text=[m if isinstance(m, str) else "" for m in marks],
                textposition="top center",
                marker={"size": 10, "symbol": "diamond", "color": "#1f77b4"},
                error_x={
                    "type": "data",
                    "symmetric": False,
                    "array": (high - delta).fillna(0).clip(lower=0).tolist(),
                    "arrayminus": (delta - low).fillna(0).clip(lower=0).tolist(),
                    "visible": True,
                    "thickness": 1.5,
                    "width": 6,
                },
                name=f"Δ {label} (95% CI)",
                hovertext=hover,
                hoverinfo="text",
                showlegend=False,
            ),
            row=1,
            col=col,
        )
        figure.add_vline(x=0, line_dash="dash", line_color="#777", line_width=1, row=1, col=col)
        figure.update_xaxes(title_text=f"Δ {label} (test, clean protocol)", row=1, col=col)
    figure.update_yaxes(categoryorder="array", categoryarray=variants, autorange="reversed")
    figure.update_layout(
        title=f"Ablation: difference against {reference} with 95% intervals",
        template="plotly_white",
        height=160 + 45 * len(variants),
    )
    return figure


# ------------------------------------------------------------------------ MRR against time

_VARIANT_STYLE = {"symbol": "circle", "color": "#1f77b4"}
_BASELINE_STYLE = {"symbol": "diamond", "color": "#d62728"}


def cost_figure(points: pd.DataFrame, title: str | None = None) -> go.Figure | None:
    """Test MRR against training time, one point per ablation cell, mean over its seeds.

    Args:
        points: :func:`analysis.tables.cost_points`' frame (``cell``, ``model``, ``baseline``,
            ``reference``, ``seeds``, ``mrr_mean``/``_std``, ``seconds_mean``/``_std``).
        title: the figure's title.

    DiffusionCom's variants (blue circles; the reference a larger one) and classical baselines
    (red diamonds) are two traces; error bars are one std over seeds on both axes (none with one
    seed). The x axis (seconds of training, a run's own plus the shared stage 1 it used) is
    logarithmic: budgets span orders of magnitude. Each point is labelled and its hover says the
    cell, model, seeds and both numbers. None when there is no point to draw.
    """
    if points.empty:
        return None
    points = points[pd.to_numeric(points["seconds_mean"], errors="coerce") > 0]
    if points.empty:
        return None  # a log axis has no place for zero seconds
    figure = go.Figure()
    for is_baseline, name, style in (
        (False, "DiffusionCom variants", _VARIANT_STYLE),
        (True, "classical baselines", _BASELINE_STYLE),
    ):
        rows = points[points["baseline"].eq(is_baseline)]
        if rows.empty:
            continue
        sizes = [16 if ref else 11 for ref in rows["reference"]]
        hover = [
            f"<b>{cell}</b>{' (reference)' if ref else ''}<br>{model}, {seeds} "
            f"seed{'s' if seeds != 1 else ''}<br>test MRR {mrr:.4f}"
            + (f" ± {mrr_std:.4f}" if not math.isnan(mrr_std) else "")
            + f"<br>{sec:.1f} s"
            + (f" ± {sec_std:.1f}" if not math.isnan(sec_std) else "")
            + " of training"
            for cell, ref, model, seeds, mrr, mrr_std, sec, sec_std in zip(
                rows["cell"],
                rows["reference"],
                rows["model"],
                rows["seeds"],
                rows["mrr_mean"].astype(float),
                rows["mrr_std"].astype(float),
                rows["seconds_mean"].astype(float),
                rows["seconds_std"].astype(float),
                strict=True,
            )
        ]
        figure.add_trace(
            go.Scatter(
                x=rows["seconds_mean"].astype(float).tolist(),
                y=rows["mrr_mean"].astype(float).tolist(),
                error_x={
                    "type": "data",
                    "array": rows["seconds_std"].astype(float).fillna(0).tolist(),
                    "visible": True,
                },
                error_y={
                    "type": "data",
                    "array": rows["mrr_std"].astype(float).fillna(0).tolist(),
                    "visible": True,
                },
                mode="markers+text",
                text=[str(cell) for cell in rows["cell"]],
                textposition="top center",
                marker={**style, "size": sizes, "line": {"width": 1, "color": "#333"}},
                name=name,
                hovertext=hover,
                hoverinfo="text",
            )
        )
    figure.update_xaxes(type="log", title_text="training time, s (log; mean over seeds ± std)")
    figure.update_yaxes(title_text="test MRR (clean protocol; mean over seeds ± std)")
    figure.update_layout(
        title=title or "Test MRR against training time (one point per cell)",
        template="plotly_white",
        height=480,
    )
    return figure
