"""The report end to end, and opened in headless Chromium."""

import json
import re
import shutil
import subprocess

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from analysis.load import load_experiments
from analysis.report import build_report, find_chromium
from core.cli import main
from tests.analysis.fake_runs import epochs, write_ablation, write_experiment, write_run

CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def test_report_command_writes_html_and_tables(
    ablation_experiment, sensitivity_experiment, tmp_path, capsys
):
    assert (
        main(
            [
                "report",
                str(ablation_experiment),
                str(sensitivity_experiment),
                "--out",
                str(tmp_path),
                "--no-png",
            ]
        )
        == 0
    )
    assert "report: " in capsys.readouterr().out
    html = (tmp_path / "report.html").read_text()
    sections = ["Experiments", "Ablation", "Sensitivity", "Learning curves", "Runs", "Problems"]
    positions = [html.index(f">{section}</h2>") for section in sections]
    assert positions == sorted(positions)  # the curves come after the tables
    assert html.index(">Protocol audit</h2>") < html.index(">Learning curves</h2>")
    for figure in ("ablation-forest", "curves-tiny-ablation", "curves-tiny-sensitivity"):
        assert f'id="figure-{figure}"' in html
    assert html.index('id="figure-ablation-forest"') < html.index(">Sensitivity</h2>")
    assert "two-level bootstrap over seeds and queries" in html and "Δ MRR vs full [95% CI]" in html
    # Self-contained: plotly.js is inlined, nothing is fetched (no external script or style).
    assert not re.search(r"<script[^>]*\bsrc=", html) and not re.search(r"<link[^>]*href=", html)
    assert "Plotly.newPlot" in html and len(html) > 1_000_000
    for name in ("ablation", "sensitivity", "protocol-audit"):
        for suffix in (".md", ".tex", ".csv"):
            assert (tmp_path / "tables" / f"{name}{suffix}").is_file()
    assert "tiny-ablation" in html and "nations" in html and "total compute" in html
    curves = (tmp_path / "tables" / "curves.csv").read_text().splitlines()
    loaded = load_experiments([ablation_experiment, sensitivity_experiment])
    assert len(curves) == 1 + len(loaded.curves)


def test_a_running_and_an_empty_experiment_still_report(ablation_experiment, tmp_path):
    copy = tmp_path / "running"
    shutil.copytree(ablation_experiment, copy)
    run = copy / "runs" / "ablation" / "no-mgat" / "seed-1"
    (run / "results.json").unlink()
    status = json.loads((run / "status.json").read_text())
    (run / "status.json").write_text(json.dumps({**status, "state": "running"}))
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "experiment.json").write_text(json.dumps({"name": "empty", "kind": "search"}))
    metrics = copy / "runs" / "ablation" / "full" / "seed-0" / "metrics.jsonl"
    metrics.write_text(metrics.read_text() + '{"stage": 2, "epoch": 9, "lo')  # cut by a kill
    report = build_report([copy, empty], tmp_path / "out", png=False)
    html = report.html.read_text()
    assert "no runs yet (empty experiment)" in html and "1 running" in html
    problems = html[html.index(">Problems</h2>") :]
    assert str(metrics) in problems and "not a complete epoch record" in problems
    assert 'id="figure-curves-tiny-ablation"' in html


def test_a_search_report_has_its_learning_curves(tmp_path):
    search = write_experiment(tmp_path, "tiny-search", "search")
    for trial, start in (("a1", 0.2), ("b2", 0.3), ("c3", 0.25)):
        write_run(
            search,
            f"search/{trial}/seed-0",
            seed=0,
            records=epochs(1, 3, start_mrr=start) + epochs(2, 2, start_mrr=start + 0.05),
        )
    html = build_report([search], tmp_path / "out", png=False).html.read_text()
    assert html.index(">Search</h2>") < html.index(">Learning curves</h2>")
    assert 'id="figure-curves-tiny-search"' in html and ">Ablation</h2>" not in html


SHIFTS = {"full": 0, "no-mgat": 2, "no-diffusion": 5}


def test_the_ablation_is_against_the_reference_its_study_names(tmp_path):
    designs, arms = write_ablation(tmp_path, "designs", SHIFTS, reference="no-diffusion")
    out = tmp_path / "out"
    html = build_report([designs], out, png=False).html.read_text()
    table = pd.read_csv(out / "tables" / "ablation.csv")
    assert list(table["variant"]) == ["no-diffusion", "full", "no-mgat"]
    assert set(table["reference"]) == {"no-diffusion"}
    full = table[table["variant"] == "full"].iloc[0]
    assert full["delta_mrr"] == pytest.approx((arms["full"] - arms["no-diffusion"]).mean())
    markdown = (out / "tables" / "ablation.md").read_text()
    assert markdown.startswith("Ablation (test, clean protocol; Δ vs no-diffusion)")
    assert "Δ MRR vs no-diffusion [95% CI]" in markdown and "| no-diffusion |" in markdown
    assert "Δ MRR vs no-diffusion [95% CI]" in html
    assert "Δ against <b>no-diffusion</b>, the reference variant of designs" in html
    assert "Ablation: difference against no-diffusion" in html  # the forest plot's title
    assert "no-diffusion (every Δ is against it)" in html  # the overview says it too


def test_experiments_with_different_references_get_a_table_each(tmp_path):
    designs, design_arms = write_ablation(tmp_path, "designs", SHIFTS, reference="no-diffusion")
    paper, paper_arms = write_ablation(tmp_path, "paper", SHIFTS)  # full, by default
    more, _ = write_ablation(tmp_path, "paper-ext1", SHIFTS, seeds=(2,))  # more seeds of paper
    out = tmp_path / "out"
    html = build_report([paper, designs, more], out, png=False).html.read_text()
    tables = out / "tables"
    assert not (tables / "ablation.csv").exists()
    against_full = pd.read_csv(tables / "ablation-vs-full.csv")
    against_none = pd.read_csv(tables / "ablation-vs-no-diffusion.csv")
    assert list(against_full["variant"]) == ["full", "no-mgat", "no-diffusion"]
    assert set(against_full["experiment"]) == {"paper, paper-ext1"}  # the same reference: pooled
    assert list(against_full["seeds"]) == [3, 3, 3]
    assert set(against_none["experiment"]) == {"designs"}
    row = against_none[against_none["variant"] == "no-mgat"].iloc[0]
    expected = (design_arms["no-mgat"] - design_arms["no-diffusion"]).mean()
    assert row["delta_mrr"] == pytest.approx(expected)
    row = against_full[against_full["variant"] == "no-diffusion"].iloc[0]
    assert row["delta_mrr"] < 0  # no-diffusion against full, not the other way round
    assert "<h3>Δ vs full</h3>" in html and "<h3>Δ vs no-diffusion</h3>" in html
    assert html.index("<h3>Δ vs full</h3>") < html.index("<h3>Δ vs no-diffusion</h3>")
    for figure in ("ablation-forest-vs-full", "ablation-forest-vs-no-diffusion"):
        assert f'id="figure-{figure}"' in html
    assert "name different reference variants" in html


def test_a_reference_without_finished_runs_says_so(tmp_path):
    designs, _ = write_ablation(tmp_path, "designs", SHIFTS, reference="no-diffusion")
    for seed in (0, 1):
        (designs / f"runs/ablation/no-diffusion/seed-{seed}/results.json").unlink()
        status = designs / f"runs/ablation/no-diffusion/seed-{seed}/status.json"
        status.write_text(json.dumps({**json.loads(status.read_text()), "state": "running"}))
    html = build_report([designs], tmp_path / "out", png=False).html.read_text()
    assert "The reference no-diffusion has no finished run yet, so no Δ is shown." in html
    assert 'id="figure-ablation-forest"' not in html


@pytest.mark.skipif(
    find_chromium() is None, reason="no Chromium: `make test` installs it where it can"
)
def test_report_renders_in_headless_chromium(ablation_experiment, sensitivity_experiment, tmp_path):
    report = build_report([ablation_experiment, sensitivity_experiment], tmp_path / "out")
    chromium = find_chromium()
    url = report.html.resolve().as_uri()
    flags = [*CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile'}"]
    dom = subprocess.run(
        [
            chromium,
            *flags,
            "--enable-logging=stderr",
            "--v=0",
            "--virtual-time-budget=15000",
            "--dump-dom",
            url,
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    console = [line for line in dom.stderr.splitlines() if "CONSOLE" in line or "Uncaught" in line]
    assert console == [], console  # the page logs nothing: no errors, no warnings
    figure_ids = re.findall(r'<div id="(figure-[^"]+)"', report.html.read_text())
    assert len(figure_ids) >= 2
    for figure_id in figure_ids:
        start = dom.stdout.index(f'id="{figure_id}"')
        following = dom.stdout[start : start + 20000]
        assert re.search(r'<svg class="main-svg"[^>]*>.*?<(path|g)\b', following, re.S), figure_id

    screenshot = tmp_path / "page.png"
    subprocess.run(
        [
            chromium,
            *flags,
            "--window-size=1280,2400",
            "--virtual-time-budget=15000",
            f"--screenshot={screenshot}",
            url,
        ],
        capture_output=True,
        timeout=120,
        check=True,
    )
    pixels = np.asarray(Image.open(screenshot).convert("L"), dtype=float)
    assert pixels.std() > 10  # not a blank page
    pngs = sorted(p.name for p in (tmp_path / "out" / "figures").glob("*.png"))
    assert "sensitivity-diffusion.steps.png" in pngs and "pareto-k.png" in pngs
    assert "ablation-forest.png" in pngs and "curves-tiny-ablation.png" in pngs
