"""Tables checked against values computed here, independently, from the run folders."""

import json
import math
import statistics

import numpy as np
import pytest
from scipy import stats

from analysis.load import load_experiments
from analysis.stats import paired_bootstrap, summarize, two_level_bootstrap
from analysis.tables import (
    ablation_table,
    format_table,
    protocol_audit,
    sensitivity_table,
    write_table,
)
from tests.analysis.fake_runs import write_ablation, write_experiment, write_run

TWO_LEVEL = "two-level bootstrap over seeds and queries"


def _test_metric(experiment, run, measure, protocol="clean"):
    results = json.loads((experiment / "runs" / run / "results.json").read_text())
    return results["test"][protocol][measure]


def test_ablation_table_mean_std_ci_and_paired_comparison(ablation_experiment, tmp_path):
    frame = load_experiments([ablation_experiment]).frame
    table = ablation_table(frame)
    assert list(table["variant"]) == ["full", "no-diffusion", "no-mgat"]  # no study file here
    ordered = ablation_table(frame, order=["full", "no-mgat", "no-diffusion"])
    assert list(ordered["variant"]) == ["full", "no-mgat", "no-diffusion"]
    for variant in table["variant"]:
        row = table[table["variant"] == variant].iloc[0]
        for measure in ("mr", "mrr", "hits@1", "hits@10"):
            values = [
                _test_metric(ablation_experiment, f"ablation/{variant}/seed-{s}", measure)
                for s in (0, 1)
            ]
            mean, std = statistics.mean(values), statistics.stdev(values)
            half = stats.t.ppf(0.975, 1) * std / math.sqrt(2)
            assert row[f"{measure}_mean"] == pytest.approx(mean)
            assert row[f"{measure}_std"] == pytest.approx(std)
            assert row[f"{measure}_ci_high"] == pytest.approx(mean + half)
        assert row["seeds"] == 2

    # MRR: two-level bootstrap over seeds and test queries (ranks are stored), seeds paired.
    no_mgat = table[table["variant"] == "no-mgat"].iloc[0]
    assert no_mgat["test_mrr"] == TWO_LEVEL
    per_query = {}
    for variant in ("full", "no-mgat"):
        per_query[variant] = np.stack(
            [
                1
                / np.load(
                    ablation_experiment / "runs" / f"ablation/{variant}/seed-{s}" / "ranks_test.npz"
                )["realistic"]
                for s in (0, 1)
            ]
        )  # (S, Q)
    assert no_mgat["delta_mrr"] == pytest.approx((per_query["no-mgat"] - per_query["full"]).mean())
    expected = two_level_bootstrap(per_query["no-mgat"], per_query["full"])
    assert (no_mgat["delta_mrr_ci_low"], no_mgat["delta_mrr_ci_high"]) == pytest.approx(
        (expected.ci_low, expected.ci_high)
    )
    assert no_mgat["p_mrr"] == pytest.approx(expected.p_value)
    # Hits@1 from the same ranks: the mean over queries of rank <= 1 is the reported Hits@1.
    hits = {
        v: [_test_metric(ablation_experiment, f"ablation/{v}/seed-{s}", "hits@1") for s in (0, 1)]
        for v in ("full", "no-mgat")
    }
    assert no_mgat["test_hits@1"] == TWO_LEVEL
    assert no_mgat["delta_hits@1"] == pytest.approx(
        np.mean(hits["no-mgat"]) - np.mean(hits["full"])
    )

    # Without stored ranks the comparison falls back to a paired t-test over seeds.
    without_ranks = ablation_table(frame.drop(columns=["ranks_file"]))
    row = without_ranks[without_ranks["variant"] == "no-mgat"].iloc[0]
    assert row["test_hits@1"] == "paired t over seeds"
    assert row["delta_hits@1"] == pytest.approx(np.mean(np.subtract(hits["no-mgat"], hits["full"])))
    expected_p = stats.ttest_rel(hits["no-mgat"], hits["full"]).pvalue
    assert row["p_hits@1"] == pytest.approx(expected_p, nan_ok=True)

    formatted = format_table(table, "ablation")
    assert (
        formatted.iloc[0]["MRR"]
        == f"{table.iloc[0]['mrr_mean']:.3f} ± {table.iloc[0]['mrr_std']:.3f}"
    )
    no_mgat_text = formatted[formatted["Variant"] == "no-mgat"].iloc[0]
    assert no_mgat_text["Δ MRR vs full [95% CI]"] == (
        f"{no_mgat['delta_mrr']:+.3f}{no_mgat['mark_mrr']} "
        f"[{no_mgat['delta_mrr_ci_low']:+.3f}, {no_mgat['delta_mrr_ci_high']:+.3f}]"
    )
    assert no_mgat_text["Test"] == TWO_LEVEL and formatted.iloc[0]["Test"] == "-"
    assert formatted.iloc[0]["Δ MRR vs full [95% CI]"] == "reference"
    paths = write_table(table, formatted, tmp_path / "ablation", "Ablation (test, clean protocol)")
    assert [p.suffix for p in paths] == [".csv", ".md", ".tex"]
    assert "| full |" in paths[1].read_text() and r"$\pm$" in paths[2].read_text()
    assert r"\begin{tabular}" in paths[2].read_text() and "no-mgat" in paths[0].read_text()
    header = paths[0].read_text().splitlines()[0].split(",")
    for column in ("delta_mrr_ci_low", "delta_mrr_ci_high", "test_mrr", "delta_hits@1_ci_low"):
        assert column in header
    assert TWO_LEVEL in paths[1].read_text() and "Δ MRR vs full [95% CI]" in paths[1].read_text()
    assert (
        TWO_LEVEL in paths[2].read_text()
        and r"$\Delta$ MRR vs full [95\% CI]" in paths[2].read_text()
    )


def test_sensitivity_table_has_one_row_per_value_with_latency(sensitivity_experiment):
    frame = load_experiments([sensitivity_experiment]).frame
    table = sensitivity_table(frame)
    assert list(zip(table["axis"], table["value"], strict=True)) == [
        ("diffusion.steps", 5),
        ("diffusion.steps", 10),
    ]
    for value in (5, 10):
        row = table[table["value"] == value].iloc[0]
        values = [
            _test_metric(
                sensitivity_experiment, f"sensitivity/diffusion.steps={value}/seed-{s}", "hits@1"
            )
            for s in (0, 1)
        ]
        assert row["hits@1_mean"] == pytest.approx(statistics.mean(values))
        latencies = [
            json.loads((sensitivity_experiment / "runs" / run / "results.json").read_text())[
                "test"
            ]["inference_ms_per_query"]
            for run in (f"sensitivity/diffusion.steps={value}/seed-{s}" for s in (0, 1))
        ]
        assert row["ms_per_query_mean"] == pytest.approx(statistics.mean(latencies))


def test_protocol_audit_states_the_inflation(ablation_experiment):
    audit = protocol_audit(load_experiments([ablation_experiment]).frame)
    full = audit[audit["cell"] == "full"].iloc[0]
    clean = statistics.mean(
        _test_metric(ablation_experiment, f"ablation/full/seed-{s}", "mrr") for s in (0, 1)
    )
    official = statistics.mean(
        _test_metric(ablation_experiment, f"ablation/full/seed-{s}", "mrr", "official-min-of-2")
        for s in (0, 1)
    )
    assert full["protocol"] == "official-min-of-2"
    assert full["inflation_mrr"] == pytest.approx(official - clean)
    assert "no-diffusion" not in set(audit["cell"])  # stage 1 only: nothing to take a min over


def _seed_variance_ablation(root, shifts, queries=2000):
    """full and worse, ranks stored for every seed; ``(S, Q)`` reciprocal ranks of each arm.

    The full model ranks each query the same under every seed; worse moves every rank of seed
    ``s`` by ``shifts[s]``: queries agree within a seed, seeds may disagree.
    """
    experiment = write_experiment(root, "seedy", "ablation", ["full", "worse"])
    full = np.random.default_rng(0).integers(2, 6, queries).astype(float)
    arms = {"full": [], "worse": []}
    for seed, shift in enumerate(shifts):
        worse = np.clip(full + shift, 1, None)
        for variant, ranks in (("full", full), ("worse", worse)):
            write_run(experiment, f"ablation/{variant}/seed-{seed}", seed=seed, realistic=ranks)
            arms[variant].append(1 / ranks)
    return experiment, {k: np.stack(v) for k, v in arms.items()}


def test_ablation_stars_respect_seed_variance(tmp_path):
    # One seed better, one worse, one a little better: a small mean gain the seeds disagree on.
    experiment, arms = _seed_variance_ablation(tmp_path, shifts=(-0.5, 0.5, -0.1))
    table = ablation_table(load_experiments([experiment]).frame)
    worse = table[table["variant"] == "worse"].iloc[0]
    query_only = paired_bootstrap(arms["worse"].mean(axis=0), arms["full"].mean(axis=0))
    assert query_only.p_value < 0.01  # what the old table would have starred
    assert worse["test_mrr"] == TWO_LEVEL and worse["p_mrr"] > 0.05 and worse["mark_mrr"] == ""
    assert worse["delta_mrr_ci_low"] < 0 < worse["delta_mrr_ci_high"]
    assert worse["delta_mrr"] == pytest.approx((arms["worse"] - arms["full"]).mean())


def test_ablation_uses_the_ranked_seeds_and_falls_back_to_t_without_any(tmp_path):
    experiment, arms = _seed_variance_ablation(tmp_path, shifts=(1, 0.5, 1.5), queries=300)
    (experiment / "runs/ablation/worse/seed-1/ranks_test.npz").unlink()
    (experiment / "runs/ablation/full/seed-2/ranks_test.npz").unlink()
    table = ablation_table(load_experiments([experiment]).frame)
    worse = table[table["variant"] == "worse"].iloc[0]
    # Only seed 0 has ranks in both arms: a bootstrap over its queries, named as such.
    assert worse["test_mrr"] == "paired bootstrap over queries (1 seed)"
    assert worse["delta_mrr"] == pytest.approx((arms["worse"][0] - arms["full"][0]).mean())
    assert worse["p_mrr"] < 0.01 and worse["delta_mrr_ci_high"] < 0
    formatted = format_table(table, "ablation")
    assert formatted.iloc[1]["Test"] == "paired bootstrap over queries (1 seed)"

    (experiment / "runs/ablation/worse/seed-0/ranks_test.npz").unlink()
    table = ablation_table(load_experiments([experiment]).frame)
    worse = table[table["variant"] == "worse"].iloc[0]
    per_seed = (arms["worse"] - arms["full"]).mean(axis=1)  # each seed's MRR difference
    interval = summarize(per_seed)
    assert worse["test_mrr"] == "paired t over seeds"
    assert worse["delta_mrr"] == pytest.approx(per_seed.mean())
    assert worse["p_mrr"] == pytest.approx(stats.ttest_1samp(per_seed, 0).pvalue)
    assert (worse["delta_mrr_ci_low"], worse["delta_mrr_ci_high"]) == pytest.approx(
        (interval.ci_low, interval.ci_high)
    )


def test_ranks_of_different_queries_are_not_paired(tmp_path):
    experiment, _ = _seed_variance_ablation(tmp_path, shifts=(1, 1), queries=200)
    ranks_file = experiment / "runs/ablation/worse/seed-1/ranks_test.npz"
    with np.load(ranks_file) as ranks:
        queries, realistic = ranks["queries"][::-1], ranks["realistic"]
    np.savez(ranks_file, queries=queries, realistic=realistic)
    worse = ablation_table(load_experiments([experiment]).frame).iloc[1]
    assert worse["test_mrr"] == "paired t over seeds"


def test_ablation_deltas_are_against_the_reference_the_study_names(tmp_path):
    shifts = {"full": 0, "no-mgat": 2, "no-diffusion": 5}
    experiment, arms = write_ablation(tmp_path, "designs", shifts, reference="no-diffusion")
    loaded = load_experiments([experiment])
    metadata = loaded.experiments["designs"]
    assert metadata["reference"] == "no-diffusion" and not loaded.problems
    table = ablation_table(
        loaded.frame, reference=metadata["reference"], order=metadata["variant_order"]
    )
    assert list(table["variant"]) == ["no-diffusion", "full", "no-mgat"]  # the reference first
    assert set(table["reference"]) == {"no-diffusion"}
    assert math.isnan(table.iloc[0]["delta_mrr"])
    for variant in ("full", "no-mgat"):
        row = table[table["variant"] == variant].iloc[0]
        difference = arms[variant] - arms["no-diffusion"]  # (S, Q), paired by seed and query
        assert row["test_mrr"] == TWO_LEVEL
        assert row["delta_mrr"] == pytest.approx(difference.mean())
        assert row["delta_mrr"] > 0  # both rank better than no-diffusion
    formatted = format_table(table, "ablation")
    assert list(formatted.columns[7:9]) == [
        "Δ MRR vs no-diffusion [95% CI]",
        "Δ Hits@1 vs no-diffusion [95% CI]",
    ]
    assert formatted.iloc[0]["Δ MRR vs no-diffusion [95% CI]"] == "reference"
