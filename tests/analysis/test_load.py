"""The tidy frame against the files it was read from; damaged, partial and empty folders."""

import ast
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import analysis
from analysis.load import (
    CURVE_COLUMNS,
    MEASURES,
    AnalysisError,
    dataset_labels,
    load_experiments,
    read_json_object,
)
from tests.analysis.fake_runs import (
    epochs,
    write_ablation,
    write_experiment,
    write_run,
    write_shared_stage1,
)


def _results(run_dir):
    return json.loads((run_dir / "results.json").read_text())


def test_one_row_per_run_split_and_protocol_with_the_files_values(ablation_experiment):
    loaded = load_experiments([ablation_experiment])
    frame = loaded.frame
    assert loaded.problems == []
    runs = sorted(p.parent for p in (ablation_experiment / "runs").glob("**/results.json"))
    assert len(runs) == 6 and frame["run"].nunique() == 6
    for run_dir in runs:
        results = _results(run_dir)
        name = run_dir.relative_to(ablation_experiment / "runs").as_posix()
        for split in ("valid", "test"):
            protocols = [
                p for p, v in results[split].items() if isinstance(v, dict) and p != "clean_all"
            ]
            rows = frame[(frame["run"] == name) & (frame["split"] == split)]
            assert sorted(rows["protocol"]) == sorted(protocols)
            for protocol in protocols:
                row = rows[rows["protocol"] == protocol].iloc[0]
                for measure in MEASURES:
                    assert row[measure] == pytest.approx(results[split][protocol][measure])
    full = frame[(frame["cell"] == "full") & (frame["seed"] == 1)].iloc[0]
    assert full["config.seed"] == 1 and full["config.diffusion.steps"] == 5
    assert full["finished"] and full["state"] == "finished" and full["dataset"] == "nations"
    assert set(frame[frame["protocol"].str.startswith("official")]["protocol_kind"]) == {
        "label-using"
    }
    no_diffusion = frame[frame["cell"] == "no-diffusion"]
    assert not no_diffusion["protocol"].str.startswith("official").any()  # stage 1 only: no chain


def test_best_and_last_epochs_are_both_explicit(ablation_experiment):
    frame = load_experiments([ablation_experiment]).frame
    run_dir = ablation_experiment / "runs" / "ablation" / "full" / "seed-0"
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    last = records[-1]
    final = [r for r in records if r["stage"] == last["stage"]]
    best = max(final, key=lambda r: r["valid.clean.mrr"])
    row = frame[(frame["run"] == "ablation/full/seed-0")].iloc[0]
    assert (row["last_stage"], row["last_epoch"]) == (last["stage"], last["epoch"])
    assert row["best_epoch"] == best["epoch"]
    assert row["valid_mrr_best_epoch"] == pytest.approx(best["valid.clean.mrr"])
    assert row["valid_mrr_last_epoch"] == pytest.approx(last["valid.clean.mrr"])
    assert _results(run_dir)["best_epochs"]["stage2"] == best["epoch"]


def test_partial_damaged_and_empty_folders_are_reported_not_fatal(ablation_experiment, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(ablation_experiment, copy)
    running = copy / "runs" / "ablation" / "full" / "seed-1"
    (running / "results.json").unlink()
    status = json.loads((running / "status.json").read_text())
    (running / "status.json").write_text(json.dumps({**status, "state": "running"}))
    (copy / "runs" / "ablation" / "no-mgat" / "seed-0" / "status.json").write_text("{broken")
    gone = copy / "runs" / "ablation" / "no-mgat" / "seed-1"
    (gone / "results.json").write_text("")
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "experiment.json").write_text(json.dumps({"name": "empty", "kind": "ablation"}))
    not_an_experiment = tmp_path / "nothing"
    not_an_experiment.mkdir()

    loaded = load_experiments([copy, empty, not_an_experiment])
    frame = loaded.frame
    reasons = dict(loaded.problems)
    assert "unreadable" in reasons[str(copy / "runs/ablation/no-mgat/seed-0/status.json")]
    assert "unreadable" in reasons[str(gone / "results.json")]
    assert reasons[str(empty)] == "no runs yet (empty experiment)"
    assert reasons[str(not_an_experiment / "experiment.json")] == "missing"
    unfinished = frame[frame["run"] == "ablation/full/seed-1"]
    assert len(unfinished) == 1 and not unfinished["finished"].iloc[0]
    assert unfinished["state"].iloc[0] == "running" and unfinished["split"].iloc[0] == "valid"
    assert frame[frame["run"] == "ablation/no-mgat/seed-1"]["state"].iloc[0] == "damaged"
    assert "ablation/no-mgat/seed-0" not in set(frame["run"])


def test_nothing_readable_gives_an_empty_frame_with_columns(tmp_path):
    loaded = load_experiments([tmp_path])
    assert loaded.frame.empty and "mrr" in loaded.frame.columns and loaded.problems


def test_analysis_imports_only_the_format_and_never_core_torch_or_ray():
    # The files' format is runstore's (standard library only): any of core would bring torch to a
    # machine that only reads experiment folders.
    code = (
        "import sys, analysis.report, analysis.cli; "
        "bad = [m for m in sys.modules if m.split('.')[0] in ('core', 'ray', 'sweeps', 'torch')]; "
        "print(bad); sys.exit(1 if bad else 0)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    assert (
        "runstore"
        in subprocess.run(
            [sys.executable, "-c", "import sys, analysis.load; print(sorted(sys.modules))"],
            capture_output=True,
            text=True,
        ).stdout
    )  # the check above looked at a process that did load the format


def _imported(tree: ast.AST):
    """(line, module) of every import; ``from core import x`` counts as ``core.x``."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from ((node.lineno, alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if node.module == "core":
                yield from ((node.lineno, f"core.{alias.name}") for alias in node.names)
            else:
                yield node.lineno, node.module


def _allowed_for_analysis(module: str) -> bool:
    return module.split(".")[0] not in ("core", "ray", "sweeps", "torch")


def test_no_analysis_source_imports_core():
    sources = sorted(Path(analysis.__file__).parent.rglob("*.py"))
    assert len(sources) > 5  # the walk found the package
    offending = [
        f"{path.name}:{line}: imports {module}"
        for path in sources
        for line, module in _imported(ast.parse(path.read_text()))
        if not _allowed_for_analysis(module)
    ]
    assert offending == []
    # The check itself: it sees what it must refuse, and lets the format through.
    bad = "from core import config\nimport torch\nfrom core.train import trainer\nimport runstore\n"
    assert [m for _, m in _imported(ast.parse(bad)) if not _allowed_for_analysis(m)] == [
        "core.config",
        "torch",
        "core.train",
    ]


def test_a_run_on_a_shared_stage1_takes_its_best_epoch_from_the_trainer(ablation_experiment):
    frame = load_experiments([ablation_experiment]).frame
    run_dir = ablation_experiment / "runs" / "ablation" / "no-diffusion" / "seed-0"
    row = frame[frame["run"] == "ablation/no-diffusion/seed-0"].iloc[0]
    assert row["final_stage"] == 1
    assert row["best_epoch"] == _results(run_dir)["best_epochs"]["stage1"]


# ------------------------------------------------------------------------------ learning curves


def _lines(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_curves_follow_every_runs_epochs_across_both_stages(ablation_experiment):
    loaded = load_experiments([ablation_experiment])
    curves = loaded.curves
    assert list(curves.columns) == CURVE_COLUMNS
    assert set(curves["run"]) == set(loaded.frame["run"])
    for run, rows in curves.groupby("run"):
        run_dir = ablation_experiment / "runs" / run
        status = json.loads((run_dir / "status.json").read_text())
        shared = ablation_experiment / "stage1" / status["stage1"]["key"] / "run" / "metrics.jsonl"
        own = _lines(run_dir / "metrics.jsonl") if (run_dir / "metrics.jsonl").is_file() else []
        expected = [("shared stage 1", r) for r in _lines(shared)] + [("run", r) for r in own]
        assert len(rows) == len(expected), run
        stage1_last = max(r["epoch"] for _, r in expected if r["stage"] == 1)
        for (_, row), (source, record) in zip(rows.iterrows(), expected, strict=True):
            assert (row["source"], row["stage"], row["epoch"]) == (
                source,
                record["stage"],
                record["epoch"],
            )
            offset = stage1_last if record["stage"] == 2 else 0
            assert row["global_epoch"] == offset + record["epoch"]
            assert row["loss"] == pytest.approx(record["loss"])
            assert row["valid_mrr"] == pytest.approx(record["valid.clean.mrr"])
        assert list(rows["global_epoch"]) == list(range(1, len(rows) + 1))
        assert rows["cell"].iloc[0] == run.split("/")[1] and rows["seed"].iloc[0] == int(run[-1])
    # A stage-1-only variant reused the shared stage 1: its curve is that run's, nothing else.
    no_diffusion = curves[curves["run"] == "ablation/no-diffusion/seed-0"]
    assert set(no_diffusion["source"]) == {"shared stage 1"} and set(no_diffusion["stage"]) == {1}
    assert (curves[curves["stage"] == 2]["source"] == "run").all()


def test_stage2_continues_after_stage1s_last_epoch_wherever_stage1_is(tmp_path):
    experiment = write_experiment(tmp_path, "curves", "ablation")
    # Stage 1 early-stopped at epoch 3 of the 5 configured: stage 2 starts at global epoch 4.
    write_run(
        experiment,
        "ablation/full/seed-0",
        seed=0,
        records=epochs(1, 3, early_stop=True) + epochs(2, 2),
    )
    # No stage-1 epoch anywhere (a copied experiment without its stage1/ folder): after the
    # configured 5.
    write_run(
        experiment,
        "ablation/full/seed-1",
        seed=1,
        records=epochs(2, 2),
        stage1={"key": "gone", "checkpoint": str(tmp_path / "nowhere" / "last.pt")},
    )
    # A stage 1 shared through a parent experiment: found beside the checkpoint it loaded.
    parent = write_experiment(tmp_path, "parent", "ablation")
    stage1 = write_shared_stage1(parent, "k1", epochs(1, 4))
    write_run(experiment, "ablation/lean/seed-0", seed=0, records=epochs(2, 2), stage1=stage1)
    # An epoch recorded twice (killed between its record and its checkpoint): the later counts.
    repeated = epochs(1, 2) + [{**epochs(1, 2)[1], "loss": 9.0}] + epochs(2, 1)
    write_run(experiment, "ablation/lean/seed-1", seed=1, records=repeated)

    loaded = load_experiments([experiment])
    assert loaded.problems == []
    curves = loaded.curves.set_index(["run", "stage", "epoch"])

    def global_epochs(run):
        return list(loaded.curves[loaded.curves["run"] == run]["global_epoch"])

    assert global_epochs("ablation/full/seed-0") == [1, 2, 3, 4, 5]
    assert curves.loc[("ablation/full/seed-0", 1, 3), "early_stopped"]
    assert not curves.loc[("ablation/full/seed-0", 1, 2), "early_stopped"]
    assert global_epochs("ablation/full/seed-1") == [6, 7]
    assert global_epochs("ablation/lean/seed-0") == [1, 2, 3, 4, 5, 6]
    shared_rows = loaded.curves[loaded.curves["run"] == "ablation/lean/seed-0"]
    assert list(shared_rows["source"]) == ["shared stage 1"] * 4 + ["run"] * 2
    assert global_epochs("ablation/lean/seed-1") == [1, 2, 3]
    assert curves.loc[("ablation/lean/seed-1", 1, 2), "loss"] == 9.0
    assert curves.loc[("ablation/lean/seed-1", 2, 1), "kl"] == 0.01
    assert np.isnan(curves.loc[("ablation/lean/seed-1", 1, 1), "kl"])  # stage 1 has no KL


def test_a_cut_metrics_line_is_skipped_and_reported_once(tmp_path):
    experiment = write_experiment(tmp_path, "cut", "ablation")
    good = "".join(json.dumps(r) + "\n" for r in epochs(2, 2))
    cut = good + '{"stage": 2, "epoch": 3, "loss": 0.4, "valid.cl'
    run_dir = write_run(experiment, "ablation/full/seed-0", seed=0, metrics_text=cut)
    shared = write_shared_stage1(experiment, "k1", epochs(1, 3))
    shared_file = experiment / "stage1" / "k1" / "run" / "metrics.jsonl"
    shared_file.write_text(shared_file.read_text() + "not json\n")
    for seed in (0, 1):  # two trials reuse the damaged shared stage 1
        write_run(
            experiment, f"ablation/lean/seed-{seed}", seed=seed, records=epochs(2, 1), stage1=shared
        )

    loaded = load_experiments([experiment])
    reasons = dict(loaded.problems)
    assert len(loaded.problems) == 2
    assert reasons[str(run_dir / "metrics.jsonl")].startswith("line 3 of 3 not a complete epoch")
    assert reasons[str(shared_file)].startswith("line 4 of 4 not a complete epoch")
    cut_rows = loaded.curves[loaded.curves["run"] == "ablation/full/seed-0"]
    assert list(cut_rows["epoch"]) == [1, 2]
    row = loaded.frame[loaded.frame["run"] == "ablation/full/seed-0"].iloc[0]
    assert row["last_epoch"] == 2 and row["finished"]
    lean = loaded.curves[loaded.curves["run"] == "ablation/lean/seed-1"]
    assert list(lean["global_epoch"]) == [1, 2, 3, 4]


def test_the_reference_variant_follows_the_study_file_with_the_sweeps_default(tmp_path):
    variants = ["ddpm", "stage1-only"]
    paths = [
        write_experiment(tmp_path, "named", "ablation", variants, reference="stage1-only"),
        write_experiment(tmp_path, "first", "ablation", variants),
        write_experiment(tmp_path, "with-full", "ablation", ["ddpm", "full"]),
        write_experiment(tmp_path, "unknown", "ablation", ["ddpm", "full"], reference="gone"),
        write_experiment(tmp_path, "bare", "ablation"),  # no study.yaml: from its runs
        write_experiment(tmp_path, "axes", "sensitivity"),
    ]
    for cell in ("b", "a"):
        write_run(paths[4], f"ablation/{cell}/seed-0", seed=0)
    loaded = load_experiments(paths)
    references = {name: m["reference"] for name, m in loaded.experiments.items()}
    assert references == {
        "named": "stage1-only",
        "first": "ddpm",
        "with-full": "full",
        "unknown": "gone",
        "bare": "a",
        "axes": None,
    }
    assert loaded.experiments["named"]["variant_order"] == variants
    study_file = str(paths[3] / "study.yaml")
    assert (
        study_file,
        "reference 'gone' is not one of its variants (ddpm, full): no variant has a difference "
        "to show",
    ) in loaded.problems


# --------------------------------------------------------------------- files of the wrong shape

WRONG_SHAPES = [
    ("[1, 2]", "found a list"),
    ('"finished"', "found the string 'finished'"),
    ("42", "found the number 42"),
    ("null", "found null"),
]


@pytest.mark.parametrize(("text", "found"), WRONG_SHAPES)
def test_read_json_object_names_the_file_and_the_shape(tmp_path, text, found):
    (tmp_path / "x.json").write_text(text)
    with pytest.raises(
        AnalysisError, match=rf"x.json: unreadable: expected a JSON object.*{found}"
    ):
        read_json_object(tmp_path / "x.json")


@pytest.mark.parametrize(("text", "found"), WRONG_SHAPES)
@pytest.mark.parametrize("file", ["results.json", "status.json", "config.json"])
def test_a_run_file_of_the_wrong_shape_is_listed_not_fatal(tmp_path, file, text, found):
    experiment, _ = write_ablation(tmp_path, "shapes", {"full": 0, "lean": 1}, seeds=(0,))
    damaged = experiment / "runs" / "ablation" / "lean" / "seed-0" / file
    damaged.write_text(text)
    loaded = load_experiments([experiment])
    reasons = dict(loaded.problems)
    assert reasons[str(damaged)].startswith("unreadable: expected a JSON object {...}, ")
    assert reasons[str(damaged)].endswith(found)
    runs = loaded.frame.drop_duplicates("run").set_index("run")["state"].to_dict()
    expected = {
        "results.json": {"ablation/full/seed-0": "finished", "ablation/lean/seed-0": "damaged"},
        # No status: nothing says what the run is, so it is skipped.
        "status.json": {"ablation/full/seed-0": "finished"},
        # Without its config the run still has its results.
        "config.json": {"ablation/full/seed-0": "finished", "ablation/lean/seed-0": "finished"},
    }[file]
    assert runs == expected


@pytest.mark.parametrize(("text", "found"), WRONG_SHAPES)
def test_an_experiment_json_of_the_wrong_shape_is_listed(tmp_path, text, found):
    experiment = write_experiment(tmp_path, "bad", "ablation")
    (experiment / "experiment.json").write_text(text)
    loaded = load_experiments([experiment])
    assert loaded.experiments == {} and loaded.frame.empty
    assert dict(loaded.problems)[str(experiment / "experiment.json")].endswith(found)


def test_keys_of_the_wrong_type_are_ignored_and_listed(tmp_path):
    experiment, _ = write_ablation(tmp_path, "typed", {"full": 0, "lean": 1}, seeds=(0,))
    meta = json.loads((experiment / "experiment.json").read_text())
    (experiment / "experiment.json").write_text(json.dumps({**meta, "seeds": 3, "code": [1]}))
    run = experiment / "runs" / "ablation" / "lean" / "seed-0"
    status = json.loads((run / "status.json").read_text())
    (run / "status.json").write_text(json.dumps({**status, "attempts": 2, "stage1": "k"}))
    results = json.loads((run / "results.json").read_text())
    results["timings"] = [1.0]
    results["test"]["clean"]["mrr"] = "high"
    results["best_epochs"] = {"stage2": "one"}
    (run / "results.json").write_text(json.dumps(results))
    (run / "metrics.jsonl").write_text(
        json.dumps({"stage": 2, "epoch": 1, "valid.clean.mrr": "?"}) + "\n"
    )

    loaded = load_experiments([experiment])
    problems = set(loaded.problems)
    assert (
        str(experiment / "experiment.json"),
        "seeds: expected a list, found the number 3; ignored",
    ) in problems
    assert (
        str(experiment / "experiment.json"),
        "code: expected an object, found a list; ignored",
    ) in problems
    assert (
        str(run / "status.json"),
        "attempts: expected a list, found the number 2; ignored",
    ) in problems
    assert (
        str(run / "results.json"),
        "timings: expected an object, found a list; ignored",
    ) in problems
    lean = loaded.frame[(loaded.frame["run"] == "ablation/lean/seed-0")]
    test = lean[(lean["split"] == "test") & (lean["protocol"] == "clean")].iloc[0]
    assert test["state"] == "finished" and np.isnan(test["mrr"])  # text is no measure
    assert test["hits@1"] == pytest.approx(results["test"]["clean"]["hits@1"])
    assert np.isnan(test["best_epoch"]) and test["attempts"] == 0


def test_a_results_json_without_any_split_is_damaged(tmp_path):
    experiment, _ = write_ablation(tmp_path, "empty-results", {"full": 0}, seeds=(0,))
    results = experiment / "runs" / "ablation" / "full" / "seed-0" / "results.json"
    results.write_text("{}")
    loaded = load_experiments([experiment])
    (row,) = loaded.frame.to_dict("records")
    assert row["state"] == "damaged" and not row["finished"]
    assert (str(results), "no test section") in loaded.problems


def test_dataset_labels_tell_datasets_apart_by_hash_then_by_name():
    frame = pd.DataFrame(
        [
            # config.data.dataset, config.data.entity_text, recorded dataset, dataset_hash
            ("umls", "dataset", "umls", "aaaa1111aaaa1111"),
            ("umls", "dataset", "umls", None),  # no hash: the one hashed umls
            ("umls", "anonymous", "umls-anonymous", "bbbb2222bbbb2222"),
            ("data/kg", "dataset", "kg", "cccc3333cccc3333"),
            ("data/kg", "dataset", "kg", "dddd4444dddd4444"),  # the folder, changed
            (None, None, "nations", None),  # no config: its recorded name
            (None, None, None, None),
        ],
        columns=["config.data.dataset", "config.data.entity_text", "dataset", "dataset_hash"],
        index=[10, 11, 12, 13, 14, 15, 16],
    )
    labels = dataset_labels(frame)
    assert list(labels.index) == list(frame.index)
    assert list(labels) == [
        "umls",
        "umls",
        "umls (entity_text=anonymous)",
        "data/kg [cccc3333]",
        "data/kg [dddd4444]",
        "nations",
        "unknown dataset",
    ]
    # Runs that say nothing of their dataset (written before it was recorded) are one dataset.
    assert set(dataset_labels(pd.DataFrame({"run": ["a", "b"]}))) == {"unknown dataset"}
