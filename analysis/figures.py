"""Plotly figures: sensitivity curves, the K latency trade-off, search importance and coordinates."""

from __future__ import annotations

import math
import warnings

import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

__all__ = ["importance_figure", "parallel_coordinates", "pareto_figure", "sensitivity_figure"]

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
