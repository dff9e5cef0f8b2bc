"""benchmarks/bench_quality.py: its tables from experiment folders, its options, and (``ray``) a
quick launch on Nations end to end.

The folders are written by hand (``tests/analysis/fake_runs.py``) in the layout a study with
baselines writes, with chosen numbers, so every cell of the tables is known in advance.
"""

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from benchmarks import bench_quality as bench
from sweeps.study import expand_trials, load_study, trial_config
from tests.analysis.fake_runs import (
    BASELINE_DEFAULTS,
    write_baseline_run,
    write_experiment,
    write_run,
    write_shared_stage1,
)
from tests.smoke import SMOKE

ROOT = Path(__file__).resolve().parents[2]


def _edit(path: Path, change) -> None:
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


def _stage1_records(valid: list[float], early_stop: bool = False) -> list[dict]:
    records = [
        {"stage": 1, "epoch": epoch, "loss": 1.0, "lr": 1e-3, "valid.clean.mrr": mrr}
        for epoch, mrr in enumerate(valid, start=1)
    ]
    if early_stop:
        records[-1]["early_stopped"] = True
    return records


def _ours_run(
    experiment: Path,
    seed: int,
    *,
    dataset: str,
    entity_text: str = "dataset",
    stage1_valid: list[float],
    early_stop: bool = False,
    run_cpu: float,
    stage1_cpu: float,
    test: float,
    test_stage1: float,
    valid: tuple[float, float],
    final_stage: int,
    stage2_best: int,
) -> None:
    """A full-model run of seed ``seed``: shared stage 1 (``stage1_valid`` curve, ``stage1_cpu``
    CPU seconds), 3 stage-2 epochs of its own; test MRRs of the final model and its stage 1,
    ``valid`` as (final, stage 1); Hits@1 = MRR - 0.1 and Hits@10 = 0.9 throughout."""
    key = f"key{seed}"
    stage1 = write_shared_stage1(experiment, key, _stage1_records(stage1_valid, early_stop))
    shared = experiment / "stage1" / key / "run"
    (shared / "results.json").write_text(
        json.dumps({"timings": {"train_seconds": 1.0, "cpu_seconds": stage1_cpu}})
    )
    stage2 = [
        {"stage": 2, "epoch": e, "loss": 0.5, "lr": 1e-3, "valid.clean.mrr": valid[0]}
        for e in (1, 2, 3)
    ]
    folder = write_run(
        experiment,
        f"ablation/full/seed-{seed}",
        seed=seed,
        records=stage2,
        stage1=stage1,
        timings={"train_seconds": 1.0, "cpu_seconds": run_cpu},
        baseline=BASELINE_DEFAULTS,
        final_stage=final_stage,
    )

    def measures(mrr):
        return {"mr": 3.0, "mrr": mrr, "hits@1": mrr - 0.1, "hits@3": 0.7, "hits@10": 0.9}

    def change(results):
        results["test"] = {"clean": measures(test), "stage1_clean": measures(test_stage1)}
        results["valid"] = {"clean": measures(valid[0]), "stage1_clean": measures(valid[1])}
        results["best_epochs"] = {"stage1": 99, "stage2": stage2_best}

    _edit(folder / "results.json", change)
    _set_data(folder, dataset, entity_text)


def _set_data(run: Path, dataset: str, entity_text: str = "dataset") -> None:
    def change(config):
        config["data"] = {"dataset": dataset, "entity_text": entity_text}

    _edit(run / "config.json", change)


def _baseline(experiment, seed, model, rank, budget, dataset, entity_text="dataset", cpu=None):
    cell = "pykeen-" + model.removeprefix("pykeen:").lower()
    run = write_baseline_run(
        experiment,
        f"ablation/{cell}/seed-{seed}",
        seed=seed,
        model=model,
        realistic=np.full(20, float(rank)),
        valid_mrr=1.0 / rank,
        budget_seconds=budget,
        epochs_run=40 + seed,
        cpu_seconds=budget + 1 if cpu is None else cpu,
        matched_to=f"ablation/full/seed-{seed}",
    )
    _set_data(run, dataset, entity_text)


@pytest.fixture
def umls(tmp_path):
    """quality-umls: full (seeds 0, 1; T = 100 and 110 CPU s) against TuckER (MRR 1.0) and
    DistMult (MRR 0.25); seed 1's stage 1 collapses once and stops on a plateau."""
    experiment = write_experiment(tmp_path, "quality-umls", "ablation", ["full"], "full")
    _ours_run(
        experiment,
        0,
        dataset="umls",
        stage1_valid=[0.1 + 0.02 * e for e in range(1, 41)],  # 0.12 ... 0.90, best at 40
        run_cpu=10.0,
        stage1_cpu=90.0,
        test=0.5,
        test_stage1=0.45,
        valid=(0.6, 0.55),
        final_stage=2,
        stage2_best=2,
    )
    _ours_run(
        experiment,
        1,
        dataset="umls",
        stage1_valid=[0.40, 0.42, 0.44, 0.10, 0.45, 0.45],  # epoch 4 < half of 0.44
        early_stop=True,
        run_cpu=12.0,
        stage1_cpu=98.0,
        test=0.6,
        test_stage1=0.6,
        valid=(0.7, 0.7),
        final_stage=1,
        stage2_best=0,
    )
    for seed, budget in ((0, 100.0), (1, 110.0)):
        _baseline(experiment, seed, "pykeen:TuckER", 1, budget, "umls")
        _baseline(experiment, seed, "pykeen:DistMult", 4, budget, "umls")
    return experiment


def test_tables_of_an_experiment_with_baselines(umls):
    collected = bench.collect([umls])
    assert collected.datasets == ["umls"] and collected.variants == ["full"]
    assert collected.models == ["PyKEEN DistMult", "PyKEEN TuckER"]  # BASELINE_MODELS order
    assert not collected.unfinished
    text = bench.render(collected)
    rows = {line.split(" | ")[1]: line for line in text.splitlines() if line.startswith("| umls |")}
    # T: the full run's CPU seconds with its shared stage 1 (10 + 90, 12 + 98).
    assert rows["**DiffusionCom full (ours)**"] == (
        "| umls | **DiffusionCom full (ours)** | 105 ± 7 | 105 ± 7 | best: s1 22.5, s2 1.0 "
        "| 0.550 ± 0.071 | 0.450 ± 0.071 | 0.900 ± 0.000 | 0.650 ± 0.071 |"
    )
    assert rows["ours full, stage 1 only (same runs)"] == (
        "| umls | ours full, stage 1 only (same runs) | 105 ± 7 | — | — "
        "| 0.525 ± 0.106 | 0.425 ± 0.106 | 0.900 ± 0.000 | 0.625 ± 0.106 |"
    )
    assert rows["PyKEEN TuckER"] == (
        "| umls | PyKEEN TuckER | 105 ± 7 | 106 ± 7 | 40 (40) "
        "| 1.000 ± 0.000 | 1.000 ± 0.000 | 1.000 ± 0.000 | 1.000 ± 0.000 |"
    )
    assert rows["PyKEEN DistMult"].startswith("| umls | PyKEEN DistMult | 105 ± 7 | 106 ± 7 |")
    assert (
        "| 0.250 ± 0.000 | 0.000 ± 0.000 | 1.000 ± 0.000 | 0.250 ± 0.000 |"
        in rows["PyKEEN DistMult"]
    )
    assert (
        "- umls, full: final model − its stage 1, test Hits@1 0.0250 ± 0.0354, MRR 0.0250 ± "
        "0.0354 (per seed Hits@1: +0.0500, +0.0000; selected: stage2, stage1)"
    ) in text
    assert "- umls mrr: ours full 0.550 vs best PyKEEN (TuckER) 1.000 → NOT met" in text
    assert "- umls hits@1: ours full 0.450 vs best PyKEEN (TuckER) 1.000 → NOT met" in text


def test_stability_table_per_run(umls):
    text = bench.render(bench.collect([umls]))
    rows = [line for line in text.splitlines() if line.startswith("| umls | full |")]
    assert rows == [
        "| umls | full | 0 | 100 | 40 | 0.900 (40) | 0.120 / 0.200 / 0.300 / 0.500 / 0.900 "
        "| 0 | False | stage2 | 0.550 → 0.600 |",
        # The first epoch of the best MRR; a collapse at epoch 4; an early stop that closed
        # 0.05 of the 0.60 gap to 1: a plateau stop.
        "| umls | full | 1 | 110 | 6 | 0.450 (5) | 0.400 / 0.450 / — / — / — "
        "| 1 | True | stage1 | 0.700 → 0.700 |",
    ]
    assert "- umls full: final ≥ stage 1 on valid in every run: True (2 seeds)" in text
    assert "  - seed 1: stage 1 epoch 4: 0.100 < half of 0.440" in text


def test_stability_rules_are_the_old_scripts():
    grows = _stage1_records([0.5, 0.6, 0.7, 0.8], early_stop=True)
    assert bench.stability(grows)["plateau_stop"] is False  # closed 0.3 of the 0.5 gap
    flat = _stage1_records([0.5, 0.55, 0.6], early_stop=True)
    assert bench.stability(flat)["plateau_stop"] is True  # 0.1 < a quarter of 0.5
    assert (
        bench.stability(flat[:2] + [{**flat[2], "early_stopped": False}])["plateau_stop"] is False
    )
    dip = _stage1_records([0.4, 0.19, 0.3])
    assert bench.stability(dip)["collapses"] == ["stage 1 epoch 2: 0.190 < half of 0.400"]
    assert bench.stability(dip)["stage1_valid_curve"] == {1: 0.4}


def test_graphs_merge_across_experiments_and_a_repeated_seed_is_refused(tmp_path, umls):
    anonymous = write_experiment(tmp_path, "quality-umls-anonymous", "ablation", ["full"])
    other_seed = write_experiment(tmp_path, "umls-seed-2", "ablation", ["full"])
    for experiment, seed, entity_text in ((anonymous, 0, "anonymous"), (other_seed, 2, "dataset")):
        _ours_run(
            experiment,
            seed,
            dataset="umls",
            entity_text=entity_text,
            stage1_valid=[0.3, 0.4],
            run_cpu=5.0,
            stage1_cpu=15.0,
            test=0.4,
            test_stage1=0.4,
            valid=(0.4, 0.4),
            final_stage=1,
            stage2_best=0,
        )
        _baseline(experiment, seed, "pykeen:TuckER", 2, 20.0, "umls", entity_text)
    collected = bench.collect([umls, anonymous, other_seed])
    assert collected.datasets == ["umls", "umls:anonymous"]
    assert sorted(collected.records["umls"]) == [0, 1, 2]
    assert "- umls:anonymous mrr: ours full 0.400 vs best PyKEEN (TuckER) 0.500 → NOT met" in (
        bench.render(collected)
    )
    again = write_experiment(tmp_path, "umls-again", "ablation", ["full"])
    _baseline(again, 1, "pykeen:TuckER", 2, 20.0, "umls")
    with pytest.raises(bench.BenchError, match="umls pykeen-tucker seed 1 is in two experiments"):
        bench.collect([umls, again])


def test_unfinished_runs_are_listed_and_fail_the_command(tmp_path, umls, capsys):
    run = umls / "runs" / "ablation" / "pykeen-tucker" / "seed-1"
    _edit(run / "status.json", lambda status: status.update(state="failed", error="boom"))
    out = tmp_path / "report"
    assert bench.main(["--from-experiments", str(umls), "--out", str(out)]) == 1
    printed = capsys.readouterr().out
    assert "Runs not finished (left out): quality-umls/ablation/pykeen-tucker/seed-1 (failed)" in (
        printed
    )
    # TuckER's mean is of the seed that finished: test MRR 1.0 and seed 0's 101 CPU seconds.
    assert "| umls | PyKEEN TuckER | 105 ± 7 | 101 ± 0 | 40 (40) |" in printed
    assert (out / "table.md").read_text() in printed


def test_from_experiments_needs_experiment_folders(tmp_path, capsys):
    assert bench.main(["--from-experiments", str(tmp_path)]) == 2
    assert f"error: {tmp_path}: no experiment.json" in capsys.readouterr().err


# ------------------------------------------------------------------------------ the command line


def test_defaults_are_the_shipped_study_on_five_graphs():
    args = bench.parse_args([])
    assert args.datasets == list(bench.DATASETS)
    assert args.seeds == [0, 1, 2] and args.variants == ["full"]
    assert args.models == ["pykeen:DistMult", "pykeen:RotatE", "pykeen:TuckER"]
    assert bench.study_for(args.seeds, args.models, args.variants, Path("unused")) == bench.STUDY


def test_options_are_read_and_checked():
    args = bench.parse_args(
        [
            "--quick",
            "--seeds",
            "3,1",
            "--models",
            "tucker, pykeen:TransE",
            "--variants",
            "full,mgat",
        ]
    )
    assert args.seeds == [3]  # --quick: the first seed
    assert args.models == ["pykeen:TuckER", "pykeen:TransE"]
    assert args.variants == ["full", "mgat"]
    bad = {
        ("--models", "TuckER,HolE"): "--models: unknown model 'HolE'; choose from TransE, DistMult",
        ("--seeds", "0,x"): "--seeds 0,x: expected comma-separated integers",
        ("--seeds", "1,1"): "--seeds 1,1: expected distinct seeds >= 0",
        ("--variants", "full,no-gat"): "--variants: unknown variant 'no-gat'; choose from full",
        ("--variants", "mgat"): "--variants: full is the reference",
        (
            "--set",
            "data.dataset=umls",
        ): "--set data.dataset=umls: data.dataset comes from --datasets",
        ("--set", "train.lr_stage1"): "--set train.lr_stage1: expected KEY=VALUE",
        ("--datasets", ","): "--datasets: give at least one graph",
    }
    for argv, message in bad.items():
        with pytest.raises(bench.BenchError) as error:
            bench.parse_args(list(argv))
        assert str(error.value).startswith(message), (argv, str(error.value))
    with pytest.raises(SystemExit):  # argparse: the two are exclusive
        bench.parse_args(["--resume", "--from-experiments", "x"])


def test_launch_overrides_name_the_graph_and_let_set_win_over_quick():
    assert bench.launch_overrides("umls", False, []) == ["data.dataset=umls"]
    assert bench.launch_overrides("nations:anonymous", True, ["train.stage2_epochs=3"]) == [
        "data.dataset=nations",
        "data.entity_text=anonymous",
        "train.stage1_epochs=2",
        "baseline.epochs=2",
        "train.stage2_epochs=3",
    ]
    assert bench.experiment_name("synthetic:small") == "quality-synthetic-small"
    assert bench.experiment_name("nations:anonymous") == "quality-nations-anonymous"


def test_the_shipped_study_on_an_anonymous_graph_is_the_old_benchmark():
    """What the benchmark launches by default: the recipe, 3 seeds, 3 baselines at match."""
    study = load_study(bench.STUDY, bench.launch_overrides("nations:anonymous", False, []))
    trials = expand_trials(study)
    cells = ["full", "pykeen-distmult", "pykeen-rotate", "pykeen-tucker"]
    assert [t.name for t in trials] == [
        f"ablation/{cell}/seed-{seed}" for cell in cells[:1] for seed in (0, 1, 2)
    ] + [f"ablation/{cell}/seed-{seed}" for seed in (0, 1, 2) for cell in cells[1:]]
    assert {t.match_to for t in trials[3:]} == {f"ablation/full/seed-{s}" for s in (0, 1, 2)}
    full = trial_config(study, trials[0])
    assert (full.data.dataset, full.data.entity_text) == ("nations", "anonymous")
    assert full.eval.report_official is False and full.structure.encoder == "none"
    tucker = trial_config(study, trials[-1])
    assert tucker.baseline.model == "pykeen:TuckER"
    # The old script's PyKEEN settings.
    assert (tucker.baseline.embedding_dim, tucker.baseline.lr, tucker.baseline.batch_size) == (
        200,
        0.01,
        256,
    )


def test_other_choices_launch_a_copy_of_the_study_named_by_its_content(tmp_path):
    path = bench.study_for([4], ["pykeen:TransE"], ["full", "mgat"], tmp_path)
    assert path.parent == tmp_path and path.read_text().startswith(f"# diffcom sweep launch {path}")
    study = load_study(path, ["data.dataset=nations"])
    assert [t.name for t in expand_trials(study)] == [
        "ablation/full/seed-4",
        "ablation/mgat/seed-4",
        "ablation/pykeen-transe/seed-4",
    ]
    assert study.overrides == load_study(bench.STUDY, ["data.dataset=nations"]).overrides
    before = path.stat().st_mtime_ns
    assert bench.study_for([4], ["pykeen:TransE"], ["full", "mgat"], tmp_path) == path
    assert path.stat().st_mtime_ns == before
    assert bench.study_for([5], ["pykeen:TransE"], ["full"], tmp_path) != path


def test_an_existing_experiment_is_resumed_only_when_asked_and_as_launched(tmp_path):
    folder = tmp_path / "quality-umls"
    folder.mkdir()
    overrides = ["data.dataset=umls"]
    with pytest.raises(bench.BenchError, match="exists: pass --resume"):
        bench.run_study("umls", bench.STUDY, overrides, tmp_path, resume=False)
    (folder / "experiment.json").write_text(
        json.dumps(
            {
                "name": "quality-umls",
                "study_file": str(bench.STUDY),
                "study_sha256": hashlib.sha256(bench.STUDY.read_bytes()).hexdigest(),
                "launch_overrides": ["data.dataset=umls", "train.stage1_epochs=2"],
                "metric": "valid.clean.mrr",
                "mode": "max",
                "kind": "ablation",
            }
        )
    )
    with pytest.raises(bench.BenchError, match="resume it with the options it was run with"):
        bench.run_study("umls", bench.STUDY, overrides, tmp_path, resume=True)


# ------------------------------------------------------------------------------ end to end (Ray)


@pytest.mark.ray
def test_quick_benchmark_on_nations_end_to_end(tmp_path):
    """--quick on Nations at smoke size with one baseline: launched, read back, and resumed."""
    smoke = [text for text in SMOKE if not text.startswith("data.dataset=")]
    command = [
        sys.executable,
        str(ROOT / "benchmarks" / "bench_quality.py"),
        "--quick",
        "--datasets",
        "nations",
        "--models",
        "DistMult",
        "--out",
        str(tmp_path),
        *(f"--set={text}" for text in [*smoke, "baseline.embedding_dim=16"]),
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    table = (tmp_path / "table.md").read_text()
    assert "| nations | **DiffusionCom full (ours)** |" in table
    assert "| nations | PyKEEN DistMult |" in table
    experiment = tmp_path / "quality-nations"
    baseline = json.loads(
        (experiment / "runs/ablation/pykeen-distmult/seed-0/config.json").read_text()
    )
    from sweeps.trial import matched_budget

    assert baseline["baseline"]["budget_seconds"] == matched_budget(
        experiment, "ablation/full/seed-0", "cpu"
    )
    assert baseline["baseline"]["epochs"] == 2  # --quick
    assert f"diffcom sweep launch {tmp_path}/studies/quality-" in done.stdout

    again = subprocess.run(
        [*command, "--resume"], capture_output=True, text=True, timeout=300, cwd=ROOT
    )
    assert again.returncode == 0, again.stderr[-3000:]
    assert "every run has finished" in again.stdout
    assert (tmp_path / "table.md").read_text() == table


def test_a_bad_set_is_refused_before_anything_trains(tmp_path, capsys):
    out = tmp_path / "out"
    assert (
        bench.main(["--datasets", "umls,nations", "--set", "train.lr_stage=1", "--out", str(out)])
        == 2
    )
    assert "--set train.lr_stage=1" in capsys.readouterr().err
    assert not list(out.glob("quality-*"))  # no experiment was started
