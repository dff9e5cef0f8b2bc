"""The report end to end, and opened in headless Chromium."""

import json
import re
import shutil
import subprocess

import numpy as np
import pytest
from PIL import Image

from analysis.load import load_experiments
from analysis.report import build_report, find_chromium
from core.cli import main
from tests.analysis.fake_runs import epochs, write_experiment, write_run

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
    assert "two-level bootstrap over seeds and queries" in html and "Δ MRR [95% CI]" in html
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
