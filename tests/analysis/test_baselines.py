"""Classical baselines in the report: which runs are baselines, their table, their Δ, the figure.

Every expected number is computed here from the values the fake runs were written with.
"""

import json
import math
import statistics

import numpy as np
import pandas as pd
import pytest

from analysis.figures import cost_figure
from analysis.load import DIFFUSIONCOM, load_experiments
from analysis.report import build_report
from analysis.tables import (
    BEST,
    ablation_table,
    baselines_table,
    cost_points,
    format_table,
)
from tests.analysis.fake_runs import (
    BASELINE_DEFAULTS,
    write_ablation,
    write_baseline_run,
    write_experiment,
    write_run,
)

TWO_LEVEL = "two-level bootstrap over seeds and queries"
SEEDS = (0, 1)
QUERIES = 200

# Per seed: (rank shift, budget seconds, train seconds, valid MRR, epochs run).
TUCKER = {0: (1.0, 10.0, 9.0, 0.40, 6), 1: (4.0, 11.0, 10.0, 0.46, 9)}
ROTATE = {0: (-0.5, None, 3.0, 0.50, 50), 1: (0.5, None, 5.0, 0.52, 50)}


def _base_ranks() -> np.ndarray:
    # The ranks write_ablation gives its variants (shift 0, seed 0), so the arms are paired.
    return np.random.default_rng(0).integers(1, 20, QUERIES).astype(float)


def _with_baselines(root):
    """An ablation (full, no-mgat) plus TuckER (time budget, matched) and RotatE (epochs)."""
    experiment, arms = write_ablation(root, "with-baselines", {"full": 0, "no-mgat": 2})
    base = _base_ranks()
    for cell, model, spec, settings in (
        ("pykeen-tucker", "pykeen:TuckER", TUCKER, {"lr": 0.003}),
        ("pykeen-rotate", "pykeen:RotatE", ROTATE, {}),
    ):
        per_seed = []
        for seed in SEEDS:
            shift, budget, seconds, valid_mrr, epochs_run = spec[seed]
            ranks = base + shift + seed
            write_baseline_run(
                experiment,
                f"ablation/{cell}/seed-{seed}",
                seed=seed,
                model=model,
                realistic=ranks,
                valid_mrr=valid_mrr,
                budget_seconds=budget,
                max_epochs=1000 if budget else 50,
                epochs_run=epochs_run,
                settings=settings,
                train_seconds=seconds,
                cpu_seconds=seconds + 1,
                matched_to=f"ablation/full/seed-{seed}" if budget else None,
            )
            per_seed.append(1 / ranks)
        arms[cell] = np.stack(per_seed)
    return experiment, arms


def _test_values(arms, cell, measure):
    """Per-seed test values of ``measure`` from the reciprocal ranks the runs were written with."""
    ranks = 1 / arms[cell]
    if measure == "mrr":
        return [float(r.mean()) for r in arms[cell]]
    k = int(measure.split("@")[1])
    return [float((r <= k).mean()) for r in ranks]


# --------------------------------------------------------------------------------- loading


def test_runs_are_classified_by_their_configs_baseline_model(tmp_path):
    experiment = write_experiment(tmp_path, "mixed", "ablation", ["full"])
    # Written before baselines existed: no baseline section at all.
    write_run(
        experiment,
        "ablation/full/seed-0",
        seed=0,
        stage1={"key": "k", "reused": True, "train_seconds": 5.0},
        timings={"train_seconds": 2.0},
    )
    # Written after: the section with model none.
    write_run(
        experiment,
        "ablation/full/seed-1",
        seed=1,
        baseline=BASELINE_DEFAULTS,
        timings={"train_seconds": 3.0, "cpu_seconds": 7.5},
    )
    write_baseline_run(
        experiment,
        "ablation/pykeen-tucker/seed-0",
        seed=0,
        model="pykeen:TuckER",
        realistic=_base_ranks(),
        budget_seconds=12.5,
        train_seconds=11.0,
        cpu_seconds=12.6,
        epochs_run=4,
        matched_to="ablation/full/seed-0",
    )
    write_baseline_run(
        experiment,
        "ablation/pykeen-rotate/seed-0",
        seed=0,
        model="pykeen:RotatE",
        realistic=_base_ranks(),
        max_epochs=30,
        epochs_run=30,
    )
    loaded = load_experiments([experiment])
    assert loaded.problems == []
    runs = loaded.frame.drop_duplicates("run").set_index("run")
    assert runs["model"].to_dict() == {
        "ablation/full/seed-0": DIFFUSIONCOM,
        "ablation/full/seed-1": DIFFUSIONCOM,
        "ablation/pykeen-tucker/seed-0": "pykeen:TuckER",
        "ablation/pykeen-rotate/seed-0": "pykeen:RotatE",
    }
    assert runs["baseline"].to_dict() == {
        "ablation/full/seed-0": False,
        "ablation/full/seed-1": False,
        "ablation/pykeen-tucker/seed-0": True,
        "ablation/pykeen-rotate/seed-0": True,
    }
    old = runs.loc["ablation/full/seed-0"]
    assert old["total_train_seconds"] == 2.0 + 5.0  # its own plus the shared stage 1 it used
    assert pd.isna(old["cpu_seconds"]) and pd.isna(old["baseline_budget_seconds"])
    assert runs.loc["ablation/full/seed-1", "total_train_seconds"] == 3.0
    assert runs.loc["ablation/full/seed-1", "cpu_seconds"] == 7.5
    tucker = runs.loc["ablation/pykeen-tucker/seed-0"]
    assert (tucker["total_train_seconds"], tucker["cpu_seconds"]) == (11.0, 12.6)
    assert tucker["baseline_budget_seconds"] == 12.5 and tucker["baseline_clock"] == "cpu"
    assert tucker["baseline_epochs_run"] == 4 and tucker["baseline_stopped_by"] == "budget"
    assert tucker["baseline_matched_to"] == "ablation/full/seed-0"
    rotate = runs.loc["ablation/pykeen-rotate/seed-0"]
    assert pd.isna(rotate["baseline_budget_seconds"])  # 0.0 in its config: no time budget
    assert rotate["baseline_epochs"] == 30 and rotate["baseline_stopped_by"] == "epochs"
    assert rotate["best_epoch"] == 1  # results.json's best_epochs.stage1


def test_a_baseline_model_that_is_not_text_is_listed_and_read_as_diffusioncom(tmp_path):
    experiment = write_experiment(tmp_path, "odd", "ablation")
    run = write_run(experiment, "ablation/full/seed-0", seed=0, baseline={"model": 3})
    loaded = load_experiments([experiment])
    assert loaded.frame["model"].eq(DIFFUSIONCOM).all()
    assert (
        str(run / "config.json"),
        "baseline.model: expected text, found the number 3; read as DiffusionCom",
    ) in loaded.problems


# ---------------------------------------------------------------------------------- tables


def test_the_baselines_table_has_each_cells_means_stds_budget_and_settings(tmp_path):
    experiment, arms = _with_baselines(tmp_path)
    table = baselines_table(load_experiments([experiment]).frame, reference="full")
    assert list(table["cell"]) == ["full", "pykeen-rotate", "pykeen-tucker"]
    assert list(table["model"]) == [DIFFUSIONCOM, "pykeen:RotatE", "pykeen:TuckER"]
    assert list(table["baseline"]) == [False, True, True]
    for cell in table["cell"]:
        row = table[table["cell"] == cell].iloc[0]
        assert row["seeds"] == 2
        for measure in ("mrr", "hits@1", "hits@3", "hits@10"):
            values = _test_values(arms, cell, measure)
            assert row[f"{measure}_mean"] == pytest.approx(statistics.mean(values)), measure
            assert row[f"{measure}_std"] == pytest.approx(statistics.stdev(values)), measure
    tucker = table[table["cell"] == "pykeen-tucker"].iloc[0]
    assert tucker["budget_seconds"] == pytest.approx(statistics.mean([10.0, 11.0]))
    assert tucker["clock"] == "cpu" and tucker["matched"] and math.isnan(tucker["budget_epochs"])
    assert tucker["epochs_run"] == pytest.approx(statistics.mean([6, 9]))
    assert tucker["valid_mrr_mean"] == pytest.approx(statistics.mean([0.40, 0.46]))
    assert tucker["valid_mrr_std"] == pytest.approx(statistics.stdev([0.40, 0.46]))
    assert tucker["train_seconds_mean"] == pytest.approx(9.5)
    assert tucker["settings"] == "lr=0.003"  # the one baseline.* value off its default
    rotate = table[table["cell"] == "pykeen-rotate"].iloc[0]
    assert math.isnan(rotate["budget_seconds"]) and rotate["budget_epochs"] == 50
    assert rotate["settings"] == "-"  # epochs is its budget, not a setting
    assert not rotate["matched"] and rotate["epochs_run"] == 50

    formatted = format_table(table, "baselines").set_index("Cell")
    assert formatted.loc["pykeen-tucker", "Budget"] == "10.5 s cpu (matched)"
    assert formatted.loc["pykeen-rotate", "Budget"] == "epochs 50"
    assert formatted.loc["full", "Budget"] == "reference"
    assert formatted.loc["pykeen-tucker", "Epochs run"] == "7.5"
    assert formatted.loc["pykeen-rotate", "Model"] == "pykeen:RotatE (baseline)"
    mrr = {cell: statistics.mean(_test_values(arms, cell, "mrr")) for cell in table["cell"]}
    best = max(mrr, key=mrr.get)
    assert best == "pykeen-rotate"  # its ranks are the best of the three
    for cell in table["cell"]:
        marked = formatted.loc[cell, "MRR"].endswith(f" {BEST}")
        assert marked == (cell == best), cell
    assert formatted.loc["pykeen-rotate", "Valid MRR"].endswith(
        BEST
    )  # 0.51: TuckER 0.43, full ~0.16
    assert not formatted.loc["pykeen-tucker", "Valid MRR"].endswith(BEST)


def test_baselines_join_the_ablation_table_with_their_delta_and_paired_test(tmp_path):
    experiment, arms = _with_baselines(tmp_path)
    loaded = load_experiments([experiment])
    metadata = loaded.experiments["with-baselines"]
    table = ablation_table(loaded.frame, metadata["reference"], metadata["variant_order"])
    assert list(table["variant"]) == ["full", "no-mgat", "pykeen-rotate", "pykeen-tucker"]
    assert list(table["baseline"]) == [False, False, True, True]
    for cell in ("pykeen-tucker", "pykeen-rotate"):
        row = table[table["variant"] == cell].iloc[0]
        difference = arms[cell] - arms["full"]  # (S, Q), paired by seed and query
        assert row["delta_mrr"] == pytest.approx(difference.mean())
        assert row["test_mrr"] == TWO_LEVEL and not math.isnan(row["p_mrr"])
        assert row["mark_mrr"] in ("", "*", "**")
    tucker = table[table["variant"] == "pykeen-tucker"].iloc[0]
    assert tucker["delta_mrr"] < 0 and tucker["mark_mrr"] == "**"  # worse on every query
    formatted = format_table(table, "ablation")
    assert list(formatted["Variant"]) == [
        "full",
        "no-mgat",
        "pykeen-rotate (baseline)",
        "pykeen-tucker (baseline)",
    ]
    assert list(formatted["Model"])[2:] == ["pykeen:RotatE", "pykeen:TuckER"]
    assert formatted.iloc[3]["Test"] == TWO_LEVEL
    assert formatted.iloc[3]["Δ MRR vs full [95% CI]"].startswith(f"{tucker['delta_mrr']:+.3f}**")


# --------------------------------------------------------------------------------- figure


def test_the_time_figure_has_one_point_per_cell_at_its_means(tmp_path):
    experiment, arms = _with_baselines(tmp_path)
    frame = load_experiments([experiment]).frame
    points = cost_points(frame, reference="full", order=["full", "no-mgat"])
    figure = cost_figure(points)
    plotted = {}
    for trace in figure.data:
        for cell, x, y, dx, dy in zip(
            trace.text, trace.x, trace.y, trace.error_x.array, trace.error_y.array, strict=True
        ):
            assert cell not in plotted  # one point per cell, in one trace only
            plotted[cell] = (trace.name, x, y, dx, dy)
    assert set(plotted) == {"full", "no-mgat", "pykeen-tucker", "pykeen-rotate"}
    # write_ablation's variants train 1.0 s per seed; the baselines as written above.
    seconds = {"full": [1.0, 1.0], "no-mgat": [1.0, 1.0], "pykeen-tucker": [9.0, 10.0]}
    seconds["pykeen-rotate"] = [3.0, 5.0]
    for cell, (name, x, y, dx, dy) in plotted.items():
        mrr = _test_values(arms, cell, "mrr")
        assert x == pytest.approx(statistics.mean(seconds[cell])), cell
        assert dx == pytest.approx(statistics.stdev(seconds[cell])), cell
        assert y == pytest.approx(statistics.mean(mrr)), cell
        assert dy == pytest.approx(statistics.stdev(mrr)), cell
        expected = "classical baselines" if cell.startswith("pykeen") else "DiffusionCom variants"
        assert name == expected
    symbols = {trace.name: trace.marker.symbol for trace in figure.data}
    assert symbols["classical baselines"] != symbols["DiffusionCom variants"]
    assert figure.layout.xaxis.type == "log"
    tucker = next(t for t in figure.data if t.name == "classical baselines")
    hover = dict(zip(tucker.text, tucker.hovertext, strict=True))["pykeen-tucker"]
    assert "pykeen-tucker" in hover and "2 seeds" in hover and "pykeen:TuckER" in hover
    assert cost_figure(points.iloc[0:0]) is None


# --------------------------------------------------------------------------------- report


def test_a_report_with_baselines_has_their_section_table_and_figure(tmp_path):
    experiment, arms = _with_baselines(tmp_path)
    out = tmp_path / "out"
    html = build_report([experiment], out, png=False).html.read_text()
    assert html.index(">Ablation</h2>") < html.index(">Baselines</h2>") < html.index(">Runs</h2>")
    baselines = html[html.index(">Baselines</h2>") : html.index(">Runs</h2>")]
    assert 'id="figure-mrr-vs-time"' in baselines and "pykeen:TuckER (baseline)" in baselines
    assert "pykeen-tucker (baseline)" in html[: html.index(">Baselines</h2>")]  # ablation rows
    table = pd.read_csv(out / "tables" / "baselines.csv")
    tucker = table[table["cell"] == "pykeen-tucker"].iloc[0]
    assert tucker["mrr_mean"] == pytest.approx(
        statistics.mean(_test_values(arms, tucker["cell"], "mrr"))
    )
    markdown = (out / "tables" / "baselines.md").read_text()
    assert markdown.startswith("Baselines (test, clean protocol; beside full;")
    assert (
        "| pykeen-tucker | pykeen:TuckER (baseline) | lr=0.003 | 10.5 s cpu (matched) |" in markdown
    )
    assert r"$^\star$" in (out / "tables" / "baselines.tex").read_text()
    ablation = pd.read_csv(out / "tables" / "ablation.csv")
    assert list(ablation.columns[:3]) == ["variant", "model", "baseline"]


def test_a_report_without_baselines_is_the_report_it_was(tmp_path):
    experiment, _ = write_ablation(tmp_path, "plain", {"full": 0, "no-mgat": 2})
    out = tmp_path / "out"
    report = build_report([experiment], out, png=False)
    html = report.html.read_text()
    assert ">Baselines</h2>" not in html and "(baseline)" not in html
    assert "mrr-vs-time" not in html
    assert sorted(p.name for p in (out / "tables").iterdir()) == [
        "ablation.csv",
        "ablation.md",
        "ablation.tex",
        "curves.csv",
        "runs.csv",
    ]
    header = (out / "tables" / "ablation.csv").read_text().splitlines()[0].split(",")
    assert header[:4] == ["variant", "experiment", "reference", "seeds"]
    assert "model" not in header and "baseline" not in header
    assert "Model" not in (out / "tables" / "ablation.md").read_text()
    manifest = json.loads((out / "report-manifest.json").read_text())
    assert not any("baselines" in name for name in manifest["files"])
