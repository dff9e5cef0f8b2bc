"""Figures checked on their data: what each trace, shape and axis holds."""

import math

import numpy as np
import pandas as pd
import plotly.io
import pytest

from analysis.figures import forest_figure, learning_curves_figure
from analysis.load import CURVE_COLUMNS, load_experiments
from analysis.tables import ablation_table


def _curves(cells=("full", "no-mgat"), seeds=(0, 1), stage1=4, stage2=3, stage1_of=None):
    """A curves frame: every run evaluated each epoch; ``stage1_of[cell]`` overrides ``stage1``."""
    rows = []
    for cell in cells:
        first = (stage1_of or {}).get(cell, stage1)
        for seed in seeds:
            for stage, count in ((1, first), (2, stage2)):
                for epoch in range(1, count + 1):
                    rows.append(
                        {
                            "experiment": "x",
                            "kind": "ablation",
                            "run": f"ablation/{cell}/seed-{seed}",
                            "cell": cell,
                            "seed": seed,
                            "source": "run",
                            "stage": stage,
                            "epoch": epoch,
                            "global_epoch": epoch + (first if stage == 2 else 0),
                            "loss": 1 / epoch + stage,
                            "valid_mrr": 0.1 * stage + 0.01 * epoch + 0.001 * seed,
                        }
                    )
    return pd.DataFrame(rows).reindex(columns=CURVE_COLUMNS)


def _stage2_lines(figure):
    return sorted({shape.x0 for shape in figure.layout.shapes if shape.line.dash == "dash"})


def test_learning_curves_draw_each_run_in_its_cells_colour_with_one_legend_entry():
    curves = _curves(cells=("full", "no-mgat", "no-diffusion"))
    figure = learning_curves_figure(curves, order=["full", "no-diffusion"])
    assert len(figure.data) == 3 * 2 * 2  # cells x seeds x (valid MRR, loss)
    legend = [trace.name for trace in figure.data if trace.showlegend]
    assert legend == ["full", "no-diffusion", "no-mgat"]  # the study's order, then the rest
    colours = {}
    for trace in figure.data:
        colours.setdefault(trace.legendgroup, set()).add(trace.line.color)
    assert all(len(c) == 1 for c in colours.values())  # seeds overlaid in their cell's colour
    assert len(set().union(*colours.values())) == 3
    # Top row valid MRR, bottom row loss, on one shared x axis of global epochs.
    seed1 = [t for t in figure.data if t.meta == "ablation/no-mgat/seed-1"]
    assert [t.yaxis for t in seed1] == ["y", "y2"]
    run = curves[curves["run"] == "ablation/no-mgat/seed-1"]
    assert list(seed1[0].x) == list(run["global_epoch"]) == list(range(1, 8))
    assert np.allclose(seed1[0].y, run["valid_mrr"]) and np.allclose(seed1[1].y, run["loss"])
    assert [list(c) for c in seed1[0].customdata[3:5]] == [[1, 4], [2, 1]]  # stage, epoch
    assert figure.layout.xaxis.matches == "x2" or figure.layout.xaxis2.matches == "x"
    # Stage 2 starts after epoch 4: one dashed line in each row, between epochs 4 and 5.
    assert _stage2_lines(figure) == [4.5]
    assert {s.yref for s in figure.layout.shapes} == {"y domain", "y2 domain"}
    assert any("stage 2" in a.text for a in figure.layout.annotations)
    assert figure.layout.yaxis2.type == "log"  # every loss is positive


def test_runs_whose_stage1_stopped_early_get_their_own_stage2_line():
    curves = _curves(stage1_of={"no-mgat": 2})
    figure = learning_curves_figure(curves)
    assert _stage2_lines(figure) == [2.5, 4.5]
    early = [t for t in figure.data if t.meta == "ablation/no-mgat/seed-0"][0]
    assert list(early.x) == [1, 2, 3, 4, 5]


def test_valid_mrr_is_drawn_where_evaluated_and_a_negative_loss_keeps_a_linear_axis():
    curves = _curves(cells=("full",), seeds=(0,))
    curves.loc[curves["epoch"] % 2 == 0, "valid_mrr"] = math.nan  # evaluated every 2nd epoch
    curves.loc[0, "loss"] = -0.1
    figure = learning_curves_figure(curves)
    mrr, loss = figure.data
    assert list(mrr.x) == [1, 3, 5, 7] and len(loss.x) == 7
    assert figure.layout.yaxis2.type != "log"
    assert learning_curves_figure(curves.iloc[0:0]) is None


def test_two_hundred_runs_stay_readable_and_small():
    cells = [f"variant-{i}" for i in range(10)]
    curves = _curves(cells=cells, seeds=range(20), stage1=20, stage2=10)
    figure = learning_curves_figure(curves)
    assert curves["run"].nunique() == 200 and len(figure.data) == 400
    assert [t.name for t in figure.data if t.showlegend] == cells  # one entry per variant
    assert len({t.legendgroup for t in figure.data}) == 10
    html = plotly.io.to_html(figure, full_html=False, include_plotlyjs=False)
    assert len(html) < 450_000, len(html)  # 12,000 points: about 31 bytes each, all told
    crowded = learning_curves_figure(_curves(cells=[f"c{i}" for i in range(40)], seeds=(0,)))
    assert not any(t.showlegend for t in crowded.data)  # 40 cells: hover names them instead


def _ablation_frame():
    nan = math.nan
    return pd.DataFrame(
        {
            "variant": ["full", "no-mgat", "no-diffusion", "one-seed"],
            "delta_mrr": [nan, -0.02, 0.004, 0.01],
            "delta_mrr_ci_low": [nan, -0.03, -0.002, nan],
            "delta_mrr_ci_high": [nan, -0.012, 0.011, nan],
            "p_mrr": [nan, 0.001, 0.3, nan],
            "test_mrr": [nan, "two-level", "two-level", "paired t over seeds"],
            "mark_mrr": [nan, "**", "", ""],
            "delta_hits@1": [nan, -0.05, 0.0, 0.02],
            "delta_hits@1_ci_low": [nan, -0.07, -0.01, nan],
            "delta_hits@1_ci_high": [nan, -0.02, 0.012, nan],
            "p_hits@1": [nan, 0.001, 0.9, nan],
            "test_hits@1": [nan, "two-level", "two-level", "paired t over seeds"],
            "mark_hits@1": [nan, "**", "", ""],
        }
    )


def test_forest_plot_shows_each_variants_deltas_with_their_intervals_in_order():
    figure = forest_figure(_ablation_frame())
    mrr, hits = figure.data
    assert list(mrr.y) == ["no-mgat", "no-diffusion", "one-seed"]  # the reference has no row
    assert list(figure.layout.yaxis.categoryarray) == list(mrr.y)
    assert figure.layout.yaxis.autorange == "reversed"  # the study's first variant on top
    assert list(mrr.x) == pytest.approx([-0.02, 0.004, 0.01])
    assert list(mrr.error_x.array) == pytest.approx([0.008, 0.007, 0.0])
    assert list(mrr.error_x.arrayminus) == pytest.approx([0.01, 0.006, 0.0])
    assert list(hits.x) == pytest.approx([-0.05, 0.0, 0.02])
    assert list(hits.error_x.array) == pytest.approx([0.03, 0.012, 0.0])
    assert (mrr.xaxis, hits.xaxis) == ("x", "x2")
    zero_lines = [s for s in figure.layout.shapes if s.x0 == 0 and s.x1 == 0]
    assert sorted(s.xref for s in zero_lines) == ["x", "x2"]
    assert "no CI" in mrr.hovertext[2] and "p = 0.001" in mrr.hovertext[0]
    assert list(mrr.text) == ["**", "", ""]  # the marks beside the points
    assert forest_figure(_ablation_frame().iloc[:1]) is None  # the reference alone
    assert forest_figure(pd.DataFrame()) is None


def test_forest_plot_of_a_real_ablation_table(ablation_experiment):
    table = ablation_table(load_experiments([ablation_experiment]).frame)
    figure = forest_figure(table)
    rows = table[table["variant"] != "full"]
    assert list(figure.data[0].y) == list(rows["variant"])
    high = rows["delta_mrr_ci_high"] - rows["delta_mrr"]
    assert list(figure.data[0].error_x.array) == pytest.approx(list(high))


def test_forest_plot_names_the_tables_reference():
    table = _ablation_frame().assign(reference="no-diffusion")
    figure = forest_figure(table)
    assert list(figure.data[0].y) == ["no-mgat", "one-seed"]  # the reference has no row
    titles = [annotation.text for annotation in figure.layout.annotations]
    assert titles == ["Δ MRR vs no-diffusion", "Δ Hits@1 vs no-diffusion"]
    assert "against no-diffusion" in figure.layout.title.text
