"""PyKEEN baselines as runs: dispatch from ``train``, run files, stops, resume, learning, and our
evaluator against PyKEEN's own on the same model.

Every run is Nations (14 entities) with small embeddings and a few epochs, one torch thread (equal
runs must sum in one order).
"""

import json

import numpy as np
import pytest
import torch

from core.baselines import BASELINE_MODELS, train_baseline
from core.baselines.pykeen import PYKEEN_MODELS, build_model, score_function, triples_factory
from core.config import ConfigError, load_config
from core.evaluation import evaluate
from core.train.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from core.train.trainer import load_run_dataset, train

TINY = [
    "data.dataset=nations",
    "baseline.embedding_dim=16",
    "baseline.epochs=4",
]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _config(*overrides: str):
    return load_config(overrides=[*TINY, *overrides])


def _final(results: dict) -> dict:
    """What a run ends with, without its timings."""
    final = {k: v for k, v in results.items() if k not in ("timings", "environment")}
    for split in ("valid", "test"):
        final[split] = {k: v for k, v in final[split].items() if k != "inference_ms_per_query"}
    return final


@pytest.fixture(scope="module")
def distmult_run(tmp_path_factory):
    """One DistMult run through ``train``, shared by the tests that only read its folder."""
    out = tmp_path_factory.mktemp("distmult")
    config = _config("baseline.model=pykeen:DistMult")
    records = []
    results = train(config, out, callback=records.append, progress=False)
    return config, out, results, records


def test_every_baseline_name_has_a_pykeen_model():
    assert tuple(PYKEEN_MODELS) == BASELINE_MODELS


def test_an_unknown_model_is_refused_with_the_available_ones():
    with pytest.raises(ConfigError, match="baseline.model: 'pykeen:TuckR' is not valid") as error:
        load_config(overrides=["baseline.model=pykeen:TuckR"])
    assert all(name in str(error.value) for name in BASELINE_MODELS)


def test_a_baseline_refuses_a_stage1_checkpoint(tmp_path):
    with pytest.raises(ConfigError, match="trains no DiffusionCom stage 1"):
        train(_config("baseline.model=pykeen:TransE"), tmp_path, stage1_checkpoint=tmp_path / "x")


def test_train_dispatches_and_writes_a_run_folder_like_diffcom(distmult_run):
    config, out, results, records = distmult_run
    assert results["baseline"] == {
        "model": "pykeen:DistMult",
        "epochs_run": 4,
        "best_epoch": results["best_epochs"]["stage1"],
        "budget_seconds": None,
        "clock": "cpu",
        "stopped_by": "epochs",
    }
    assert json.loads((out / "results.json").read_text()) == json.loads(json.dumps(results)) | {
        "format_version": "1.1"
    }
    assert json.loads((out / "config.json").read_text())["baseline"]["model"] == "pykeen:DistMult"
    for split in ("valid", "test"):
        assert set(results[split]["clean"]) == {"mr", "mrr", "hits@1", "hits@3", "hits@10"}
        assert results[split]["clean_all"]["both.realistic.mrr"] == results[split]["clean"]["mrr"]
    assert results["final_stage"] == 1 and set(results["timings"]) == {
        "train_seconds",
        "cpu_seconds",
    }
    assert {"dataset", "dataset_hash", "environment"} <= set(results)

    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert lines == records and [r["epoch"] for r in lines] == [1, 2, 3, 4]
    assert all(r["stage"] == 1 and "valid.clean.mrr" in r and "loss" in r for r in lines)
    best = max(lines, key=lambda r: r["valid.clean.mrr"])
    assert results["valid"]["clean"]["mrr"] == pytest.approx(best["valid.clean.mrr"], abs=1e-9)

    # Ranks as DiffusionCom writes them: the split's queries in evaluator order, realistic ranks.
    graph = load_run_dataset(config)
    for split in ("valid", "test"):
        with np.load(out / f"ranks_{split}.npz") as ranks:
            assert set(ranks.files) == {"queries", "realistic"}
            assert np.array_equal(ranks["queries"], graph.queries(split).numpy())
            assert np.mean(1 / ranks["realistic"]) == pytest.approx(results[split]["clean"]["mrr"])


def test_a_tiny_budget_stops_after_the_first_epoch(tmp_path):
    config = _config(
        "baseline.model=pykeen:DistMult", "baseline.epochs=50", "baseline.budget_seconds=1e-6"
    )
    results = train(config, tmp_path, progress=False)
    assert results["baseline"]["stopped_by"] == "budget"
    assert results["baseline"]["epochs_run"] == 1
    assert results["baseline"]["budget_seconds"] == 1e-6


def test_patience_stops_a_run_that_no_longer_improves(tmp_path):
    # Adam steps of 1e-12 leave float32 weights as they are: every epoch ranks as the first did.
    config = _config(
        "baseline.model=pykeen:DistMult",
        "baseline.epochs=50",
        "baseline.lr=1e-12",
        "baseline.patience=2",
    )
    results = train(config, tmp_path, progress=False)
    assert results["baseline"]["stopped_by"] == "patience"
    assert (results["baseline"]["epochs_run"], results["baseline"]["best_epoch"]) == (3, 1)


class _Killed(Exception):
    pass


def test_an_interrupted_run_resumes_to_the_uninterrupted_result(tmp_path):
    # TuckER draws dropout and batch order from the RNGs: resume must restore them, Adam's
    # moments, batch norm statistics and the best weights so far.
    config = _config("baseline.model=pykeen:TuckER", "baseline.embedding_dim=8")
    whole = train(config, tmp_path / "whole", progress=False)

    def kill_after_epoch_2(record):
        if record["epoch"] == 2:
            raise _Killed

    with pytest.raises(_Killed):
        train(config, tmp_path / "cut", callback=kill_after_epoch_2, progress=False)
    assert load_checkpoint(tmp_path / "cut" / "checkpoints" / "last.pt")["stage1"]["epoch"] == 2
    resumed = train(config, tmp_path / "cut", progress=False)

    assert _final(resumed) == _final(whole)
    for run in ("whole", "cut"):
        assert (tmp_path / run / "ranks_test.npz").is_file()
    records = [
        [
            {k: v for k, v in json.loads(line).items() if k != "train_seconds"}
            for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()
        ]
        for run in ("whole", "cut")
    ]
    assert records[0] == records[1] and len(records[0]) == 4


def test_the_budget_counts_the_time_used_before_a_resume(tmp_path):
    config = _config("baseline.model=pykeen:DistMult", "baseline.budget_seconds=1000")

    def kill(record):
        raise _Killed

    with pytest.raises(_Killed):
        train(config, tmp_path, callback=kill, progress=False)
    # As if the first call had spent the budget before it was killed.
    last = tmp_path / "checkpoints" / "last.pt"
    state = load_checkpoint(last)
    state["used_seconds"]["cpu"] = 1000.0
    save_checkpoint(state, last)
    results = train(config, tmp_path, progress=False)
    assert (results["baseline"]["stopped_by"], results["baseline"]["epochs_run"]) == ("budget", 2)


def test_resume_refuses_another_config_or_a_damaged_checkpoint(tmp_path):
    config = _config("baseline.model=pykeen:DistMult", "baseline.epochs=1")
    train(config, tmp_path, progress=False)
    last = tmp_path / "checkpoints" / "last.pt"
    with pytest.raises(CheckpointError, match=r"last\.pt: belongs to another config; baseline\.lr"):
        train(
            _config("baseline.model=pykeen:DistMult", "baseline.epochs=1", "baseline.lr=0.1"),
            tmp_path,
            progress=False,
        )
    last.write_bytes(last.read_bytes()[:100])
    with pytest.raises(CheckpointError, match=r"last\.pt: not a readable checkpoint"):
        train(config, tmp_path, progress=False)


def test_a_diffcom_checkpoint_is_not_resumed_as_a_baseline(tmp_path):
    config = _config("baseline.model=pykeen:DistMult", "baseline.epochs=1")
    train(config, tmp_path, progress=False)
    diffcom = _config(
        "baseline.epochs=1",
        "features.text_encoder=none",
        "features.image_encoder=none",
        "model.hidden_dim=16",
        "structure.max_nodes=4",
    )
    with pytest.raises(
        CheckpointError, match="baseline.model: checkpoint 'pykeen:DistMult' vs now 'none'"
    ):
        train(diffcom, tmp_path, progress=False)


def test_training_beats_the_untrained_model(tmp_path):
    config = _config(
        "baseline.model=pykeen:DistMult", "baseline.epochs=10", "baseline.embedding_dim=32"
    )
    graph = load_run_dataset(config)
    untrained = build_model(config, triples_factory(graph))
    before = evaluate(score_function(untrained, graph.num_relations), graph, "valid", 256)
    after = train(config, tmp_path, progress=False)["valid"]["clean"]["mrr"]
    # Measured (seed 0): 0.378 untrained, 0.593 after 10 epochs; seeds 1 and 2 gain 0.20 and 0.13.
    assert after - before.metrics("realistic")["mrr"] > 0.15


def test_our_evaluator_equals_pykeens_on_a_trained_model_with_ties(distmult_run):
    from pykeen.evaluation import RankBasedEvaluator

    config, out, _, _ = distmult_run
    graph = load_run_dataset(config)
    model = build_model(config, triples_factory(graph))
    model.load_state_dict(load_checkpoint(out / "checkpoints" / "last.pt")["best_stage1"])
    # Entities with equal embeddings score equally in every query: ties for both evaluators.
    with torch.no_grad():
        entities = model.entity_representations[0]._embeddings.weight
        entities[1], entities[2], entities[5] = entities[0], entities[0], entities[4]
    ours = evaluate(score_function(model, graph.num_relations), graph, "test", 64)
    assert (ours.ranks.optimistic != ours.ranks.pessimistic).sum() > 20
    assert ours.metrics("optimistic")["mrr"] - ours.metrics("realistic")["mrr"] > 0.01

    theirs = RankBasedEvaluator(filtered=True).evaluate(
        model,
        graph.test,
        batch_size=64,
        additional_filter_triples=[graph.train, graph.valid],
        use_tqdm=False,
    )
    for direction in ("head", "tail", "both"):
        metrics = ours.metrics("realistic", direction)
        assert metrics["mrr"] == pytest.approx(
            theirs.get_metric(f"{direction}.realistic.inverse_harmonic_mean_rank"), abs=1e-6
        )
        assert metrics["hits@1"] == pytest.approx(
            theirs.get_metric(f"{direction}.realistic.hits_at_1"), abs=1e-6
        )


def test_train_baseline_refuses_a_config_without_a_baseline(tmp_path):
    with pytest.raises(ConfigError, match="'none' is not a baseline; choose one of pykeen:TransE"):
        train_baseline(load_config(), tmp_path)


def test_diffcom_train_trains_a_baseline_from_the_command_line(tmp_path, capsys):
    from diffcom.cli import main

    out = tmp_path / "run"
    sets = ["baseline.model=pykeen:TuckER", "baseline.embedding_dim=8", "baseline.epochs=2"]
    argv = ["train", "--quiet", "--dataset", "nations", "--out", str(out)]
    assert main([*argv, *[f"--set={s}" for s in sets]]) == 0
    assert "nations test (clean protocol): MRR" in capsys.readouterr().out
    results = json.loads((out / "results.json").read_text())
    assert results["baseline"]["model"] == "pykeen:TuckER"
    assert results["baseline"]["epochs_run"] == 2


def test_a_diffcom_run_records_its_cpu_seconds(tmp_path):
    config = load_config(
        overrides=[
            "data.dataset=nations",
            "features.text_encoder=none",
            "features.image_encoder=none",
            "model.hidden_dim=16",
            "model.num_heads=2",
            "model.num_layers=1",
            "structure.max_nodes=4",
            "train.stage1_epochs=1",
            "train.stage2_epochs=0",
            "train.batch_size=512",
        ]
    )
    results = train(config, tmp_path, progress=False)
    assert "baseline" not in results and results["final_stage"] == 1
    assert set(results["timings"]) == {"train_seconds", "cpu_seconds"}
    assert isinstance(results["timings"]["cpu_seconds"], float)
