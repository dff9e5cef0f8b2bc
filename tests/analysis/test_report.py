"""The report end to end, and opened in headless Chromium."""

import json
import re
import shutil
import subprocess
from html import escape as html_escape

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from analysis.load import load_experiments
from analysis.report import build_report, find_chromium
from diffcom.cli import main
from tests.analysis.fake_runs import (
    epochs,
    write_ablation,
    write_baseline_run,
    write_experiment,
    write_run,
)

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


# Two graphs of one study file: `--set data.dataset=umls` and, with it,
# `--set data.entity_text=anonymous`, each with the content hash its runs record.
UMLS = {"data": {"dataset": "umls", "entity_text": "dataset"}, "dataset_hash": "aa11" * 4}
ANONYMOUS = {"data": {"dataset": "umls", "entity_text": "anonymous"}, "dataset_hash": "bb22" * 4}
ANONYMOUS_SLUG = "umls-entity_text-anonymous"


def _quality(root, with_dataset: bool = True):
    """quality-umls (seeds 0, 1), its extension quality-umls-ext1 (seed 2) and, ranked worse
    throughout, quality-umls-anonymous (seeds 0, 1, 2); the variants' reciprocal ranks, by graph."""
    umls, anonymous = (UMLS, ANONYMOUS) if with_dataset else ({}, {})
    shifts = {"full": 0, "no-mgat": 2}
    first, arms = write_ablation(root, "quality-umls", shifts, **umls)
    extension, more = write_ablation(root, "quality-umls-ext1", shifts, seeds=(2,), **umls)
    worse = {"full": 6, "no-mgat": 9}
    other, other_arms = write_ablation(
        root, "quality-umls-anonymous", worse, seeds=(0, 1, 2), **anonymous
    )
    umls_arms = {v: np.concatenate([arms[v], more[v]]) for v in shifts}  # seeds 0, 1, 2
    return [first, other, extension], umls_arms, other_arms


def test_experiments_of_different_datasets_never_pool(tmp_path):
    experiments, umls_arms, anonymous_arms = _quality(tmp_path)
    out = tmp_path / "out"
    html = build_report(experiments, out, png=False).html.read_text()
    tables = out / "tables"
    assert not (tables / "ablation.csv").exists()
    for slug, arms, names in (
        ("umls", umls_arms, "quality-umls, quality-umls-ext1"),  # more seeds: pooled
        (ANONYMOUS_SLUG, anonymous_arms, "quality-umls-anonymous"),
    ):
        table = pd.read_csv(tables / f"ablation-{slug}.csv")
        assert list(table["variant"]) == ["full", "no-mgat"]
        assert set(table["experiment"]) == {names}
        assert list(table["seeds"]) == [3, 3]
        for variant in ("full", "no-mgat"):
            row = table[table["variant"] == variant].iloc[0]
            per_seed = arms[variant].mean(axis=1)
            assert row["mrr_mean"] == pytest.approx(per_seed.mean())
            assert row["mrr_std"] == pytest.approx(per_seed.std(ddof=1))
        row = table[table["variant"] == "no-mgat"].iloc[0]
        assert row["delta_mrr"] == pytest.approx((arms["no-mgat"] - arms["full"]).mean())
    caption = (tables / f"ablation-{ANONYMOUS_SLUG}.md").read_text().splitlines()[0]
    assert caption == "Ablation on umls (entity_text=anonymous) (test, clean protocol; Δ vs full)"
    assert "<h3>umls</h3>" in html and "<h3>umls (entity_text=anonymous)</h3>" in html
    assert html.index("<h3>umls</h3>") < html.index("<h3>umls (entity_text=anonymous)</h3>")
    assert "These runs are of different datasets" in html
    for figure in ("ablation-forest-umls", f"ablation-forest-{ANONYMOUS_SLUG}"):
        assert f'id="figure-{figure}"' in html
    assert "with 95% intervals \\u2014 umls (entity_text=anonymous)" in html  # its title


def test_a_report_of_one_dataset_names_none(tmp_path):
    experiments, _, _ = _quality(tmp_path / "recorded")
    plain, _, _ = _quality(tmp_path / "unrecorded", with_dataset=False)
    for folders, out in ((experiments[::2], "recorded-out"), (plain[::2], "plain-out")):
        build_report(folders, tmp_path / out, png=False)  # quality-umls and its extension
    for suffix in (".csv", ".md", ".tex"):
        recorded = (tmp_path / "recorded-out" / "tables" / f"ablation{suffix}").read_bytes()
        assert recorded == (tmp_path / "plain-out" / "tables" / f"ablation{suffix}").read_bytes()
    html = (tmp_path / "recorded-out" / "report.html").read_text()
    assert 'id="figure-ablation-forest"' in html and "different datasets" not in html


def test_baselines_and_sensitivity_are_split_by_dataset_too(tmp_path):
    base = np.random.default_rng(0).integers(1, 20, 200).astype(float)
    for name, dataset, shift in (("tucker-umls", UMLS, 0), ("tucker-anonymous", ANONYMOUS, 4)):
        experiment, _ = write_ablation(tmp_path, name, {"full": shift}, seeds=(0,), **dataset)
        write_baseline_run(
            experiment,
            "ablation/pykeen-tucker/seed-0",
            seed=0,
            model="pykeen:TuckER",
            realistic=base + shift + 1,
            **dataset,
        )
        sweep = write_experiment(tmp_path, f"k-{name}", "sensitivity")
        for steps in (5, 10):
            run = write_run(
                sweep,
                f"sensitivity/diffusion.steps={steps}/seed-0",
                seed=0,
                realistic=base + shift + steps,
                data=dataset["data"],
                results_extra={"dataset_hash": dataset["dataset_hash"]},
            )
            config = json.loads((run / "config.json").read_text())
            (run / "config.json").write_text(json.dumps({**config, "diffusion": {"steps": steps}}))
    out = tmp_path / "out"
    folders = sorted(p for p in tmp_path.iterdir() if p.name != "out")
    html = build_report(folders, out, png=False).html.read_text()
    tables = out / "tables"
    for slug, shift in (("umls", 0), (ANONYMOUS_SLUG, 4)):
        baselines = pd.read_csv(tables / f"baselines-{slug}.csv")
        assert list(baselines["cell"]) == ["full", "pykeen-tucker"]
        expected = (1 / (base + shift + 1)).mean()
        assert baselines.loc[1, "mrr_mean"] == pytest.approx(expected)
        sensitivity = pd.read_csv(tables / f"sensitivity-{slug}.csv")
        assert list(sensitivity["value"]) == [5, 10] and list(sensitivity["seeds"]) == [1, 1]
        assert sensitivity.loc[0, "mrr_mean"] == pytest.approx((1 / (base + shift + 5)).mean())
        for figure in (f"mrr-vs-time-{slug}", f"sensitivity-diffusion.steps-{slug}"):
            assert f'id="figure-{figure}"' in html
    assert not (tables / "baselines.csv").exists() and not (tables / "sensitivity.csv").exists()


def test_a_reference_without_finished_runs_says_so(tmp_path):
    designs, _ = write_ablation(tmp_path, "designs", SHIFTS, reference="no-diffusion")
    for seed in (0, 1):
        (designs / f"runs/ablation/no-diffusion/seed-{seed}/results.json").unlink()
        status = designs / f"runs/ablation/no-diffusion/seed-{seed}/status.json"
        status.write_text(json.dumps({**json.loads(status.read_text()), "state": "running"}))
    html = build_report([designs], tmp_path / "out", png=False).html.read_text()
    assert "The reference no-diffusion has no finished run yet, so no Δ is shown." in html
    assert 'id="figure-ablation-forest"' not in html


@pytest.mark.browser
@pytest.mark.skipif(
    find_chromium() is None, reason="no Chromium: `make test-all` installs it where it can"
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


# ------------------------------------------------------------------------ bad inputs and --out


def _report(capsys, *argv) -> tuple[int, str, str]:
    status = main(["report", *map(str, argv), "--no-png"])
    captured = capsys.readouterr()
    return status, captured.out, captured.err


@pytest.mark.parametrize(
    ("text", "found"), [("[1, 2]", "found a list"), ('"finished"', "found the string 'finished'")]
)
def test_a_damaged_run_is_a_warning_listed_in_the_report(tmp_path, capsys, text, found):
    designs, _ = write_ablation(tmp_path, "designs", SHIFTS, seeds=(0,))
    damaged = designs / "runs" / "ablation" / "no-mgat" / "seed-0" / "results.json"
    damaged.write_text(text)
    status, out, err = _report(capsys, designs, "--out", tmp_path / "out")
    assert status == 0 and "report: " in out  # the other variants still make a table
    assert f"warning: {damaged}: unreadable: expected a JSON object {{...}}, {found}" in err
    html = (tmp_path / "out" / "report.html").read_text()
    problems = html[html.index(">Problems</h2>") :]
    assert str(damaged) in problems and html_escape(found) in problems
    assert "1 damaged" in html
    table = pd.read_csv(tmp_path / "out" / "tables" / "ablation.csv")
    assert list(table["variant"]) == ["full", "no-diffusion"]
    manifest = json.loads((tmp_path / "out" / "report-manifest.json").read_text())
    assert {
        "path": str(damaged),
        "reason": f"unreadable: expected a JSON object {{...}}, {found}",
    } in (manifest["problems"])


@pytest.mark.parametrize("file", ["results.json", "status.json"])
def test_a_report_with_no_usable_run_exits_1(tmp_path, capsys, file):
    designs, _ = write_ablation(tmp_path, "designs", {"full": 0}, seeds=(0, 1))
    for seed in (0, 1):
        (designs / "runs" / "ablation" / "full" / f"seed-{seed}" / file).write_text("[1, 2]")
    status, out, err = _report(capsys, designs, "--out", tmp_path / "out")
    assert status == 1
    assert err.count("warning: ") == 2 and "diffcom: error: no run has a result" in err
    assert (tmp_path / "out" / "report.html").is_file()  # it still says what went wrong


def test_an_empty_experiment_exits_1(tmp_path, capsys):
    empty = write_experiment(tmp_path, "empty", "search")
    status, _, err = _report(capsys, empty, "--out", tmp_path / "out")
    assert status == 1 and f"warning: {empty}: no runs yet (empty experiment)" in err


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("42", "unreadable: expected a JSON object {...}, found the number 42"),
        ("[]", "unreadable: expected a JSON object {...}, found a list"),
        ("{", "unreadable: Expecting property name enclosed in double quotes"),
    ],
)
def test_an_unreadable_experiment_json_is_an_error_naming_it(tmp_path, capsys, text, reason):
    designs, _ = write_ablation(tmp_path, "designs", {"full": 0}, seeds=(0,))
    (designs / "experiment.json").write_text(text)
    status, out, err = _report(capsys, designs, "--out", tmp_path / "out")
    assert status == 2 and out == ""
    assert err.startswith("diffcom: error: no experiment could be read")
    assert f"{designs / 'experiment.json'}: {reason}" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "out").exists()  # nothing written


def test_one_unreadable_experiment_among_good_ones_is_a_warning(tmp_path, capsys):
    good, _ = write_ablation(tmp_path, "good", {"full": 0}, seeds=(0,))
    bad, _ = write_ablation(tmp_path, "bad", {"full": 0}, seeds=(0,))
    (bad / "experiment.json").write_text("42")
    status, _, err = _report(capsys, good, bad, "--out", tmp_path / "out")
    assert status == 0
    assert f"warning: {bad / 'experiment.json'}: unreadable: expected a JSON object" in err


def test_out_must_not_be_a_file(tmp_path, capsys):
    designs, _ = write_ablation(tmp_path, "designs", {"full": 0}, seeds=(0,))
    file = tmp_path / "report.txt"
    file.write_text("mine")
    status, _, err = _report(capsys, designs, "--out", file)
    assert status == 2 and f"--out {file}: a file, not a folder" in err
    assert file.read_text() == "mine"


def test_out_refuses_a_folder_no_report_wrote_unless_forced(tmp_path, capsys):
    designs, _ = write_ablation(tmp_path, "designs", {"full": 0}, seeds=(0,))
    out = tmp_path / "thesis"
    out.mkdir()
    (out / "chapter.tex").write_text("mine")
    (out / "report.html").write_text("mine too")  # a report.html alone is not a report folder
    status, _, err = _report(capsys, designs, "--out", out)
    assert status == 2 and "is not empty and no earlier report wrote it" in err
    assert "--force" in err and sorted(p.name for p in out.iterdir()) == [
        "chapter.tex",
        "report.html",
    ]
    assert (out / "report.html").read_text() == "mine too"

    status, _, _ = _report(capsys, designs, "--out", out, "--force")
    assert status == 0
    assert (out / "chapter.tex").read_text() == "mine"  # kept
    assert (out / "report.html").read_text().startswith("<!DOCTYPE html>")  # replaced


def test_a_previous_report_folder_is_rewritten_without_stale_files(tmp_path, capsys):
    designs, _ = write_ablation(tmp_path, "designs", SHIFTS, seeds=(0,))
    search = write_experiment(tmp_path, "tiny-search", "search")
    write_run(search, "search/a1/seed-0", seed=0, records=epochs(2, 2))
    out = tmp_path / "out"
    assert _report(capsys, designs, "--out", out)[0] == 0
    assert (out / "tables" / "ablation.csv").is_file()
    (out / "notes.txt").write_text("mine")  # not the report's: left alone
    assert _report(capsys, search, "--out", out)[0] == 0  # no --force needed
    assert not (out / "tables" / "ablation.csv").exists()  # the earlier report's, gone
    assert (out / "tables" / "search-points.csv").is_file()
    assert (out / "notes.txt").read_text() == "mine"
    manifest = json.loads((out / "report-manifest.json").read_text())
    assert manifest["written_by"] == "diffcom report"
    assert manifest["experiments"] == [str(search.resolve())]
    assert "tables/search-points.csv" in manifest["files"]


def test_an_empty_storage_is_refused(tmp_path, capsys):
    designs, _ = write_ablation(tmp_path, "designs", {"full": 0}, seeds=(0,))
    status, _, err = _report(capsys, designs, "--out", tmp_path / "out", "--storage", "")
    assert status == 2 and "--storage '': empty" in err
