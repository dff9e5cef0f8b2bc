"""The report end to end, and opened in headless Chromium."""

import json
import re
import shutil
import subprocess

import numpy as np
import pytest
from PIL import Image

from analysis.report import build_report, find_chromium
from core.cli import main

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
    for section in ("Experiments", "Ablation", "Sensitivity", "Protocol audit", "Runs", "Problems"):
        assert f">{section}</h2>" in html
    # Self-contained: plotly.js is inlined, nothing is fetched (no external script or style).
    assert not re.search(r"<script[^>]*\bsrc=", html) and not re.search(r"<link[^>]*href=", html)
    assert "Plotly.newPlot" in html and len(html) > 1_000_000
    for name in ("ablation", "sensitivity", "protocol-audit"):
        for suffix in (".md", ".tex", ".csv"):
            assert (tmp_path / "tables" / f"{name}{suffix}").is_file()
    assert "tiny-ablation" in html and "nations" in html and "total compute" in html


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
    report = build_report([copy, empty], tmp_path / "out", png=False)
    html = report.html.read_text()
    assert "no runs yet (empty experiment)" in html and "1 running" in html


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
