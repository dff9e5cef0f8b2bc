"""A hold-out of training triples (``train.holdout_fraction``): stage 1 never sees them, and stage 2
may train on their queries (``train.stage2_queries=held-out``), whose extractor scores are out of
sample as a test query's are."""

import json

import pytest
import torch

from core.config import ConfigError, load_config, stage1_key_values, stage1_relevant
from core.data.builtin import load_builtin
from core.data.graph import AnswerIndex, with_reciprocals
from core.train import trainer as trainer_module
from core.train.fused import train_fused
from core.train.trainer import train, training_split
from sweeps.stage1 import stage1_key
from tests.smoke import SMOKE

NATIONS = load_builtin("nations")


def _rows(triples: torch.Tensor) -> list[tuple[int, int, int]]:
    return sorted(map(tuple, triples.tolist()))


def _split(*overrides):
    return training_split(load_config(overrides=list(overrides)), NATIONS)


def test_without_a_hold_out_both_stages_learn_from_all_of_train():
    split = _split()
    assert torch.equal(split.fit, NATIONS.train) and len(split.held_out) == 0
    everything = torch.unique(NATIONS.queries("train")[:, :2], dim=0)
    assert torch.equal(split.stage1_queries, everything)
    assert split.stage2_queries is split.stage1_queries
    assert split.stage1_answers is NATIONS.train_answers() is split.stage2_answers


def test_a_hold_out_partitions_train_per_seed():
    split = _split("train.holdout_fraction=0.2")
    assert len(split.held_out) == round(0.2 * len(NATIONS.train))
    assert _rows(torch.cat([split.fit, split.held_out])) == _rows(NATIONS.train)
    assert _split("train.holdout_fraction=0.2").held_out.tolist() == split.held_out.tolist()
    other_seed = _split("train.holdout_fraction=0.2", "seed=1").held_out
    assert _rows(other_seed) != _rows(split.held_out)
    # At least one triple is held out and at least one is kept, however small the fraction.
    assert len(_split("train.holdout_fraction=1e-9").held_out) == 1


def test_stage_1_never_sees_a_held_out_fact():
    split = _split("train.holdout_fraction=0.2")
    fit_facts = set(map(tuple, with_reciprocals(split.fit, NATIONS.num_relations).tolist()))
    held = with_reciprocals(split.held_out, NATIONS.num_relations)
    labels = split.stage1_answers.multi_hot(held[:, 0], held[:, 1])
    for (head, relation, tail), row in zip(held.tolist(), labels, strict=True):
        assert bool(row[tail]) == ((head, relation, tail) in fit_facts)
    assert not all(labels[range(len(held)), held[:, 2]])  # some facts are truly unseen
    fit_queries = torch.unique(with_reciprocals(split.fit, NATIONS.num_relations)[:, :2], dim=0)
    assert torch.equal(split.stage1_queries, fit_queries)
    # In sample (the control): stage 2 trains on what stage 1 trained on.
    assert split.stage2_queries is split.stage1_queries
    assert split.stage2_answers is split.stage1_answers


def test_held_out_stage_2_trains_on_the_held_out_queries_with_every_training_answer():
    split = _split("train.holdout_fraction=0.2", "train.stage2_queries=held-out")
    expected = torch.unique(with_reciprocals(split.held_out, NATIONS.num_relations)[:, :2], dim=0)
    assert torch.equal(split.stage2_queries, expected)
    assert split.stage2_answers is NATIONS.train_answers()
    full = AnswerIndex(NATIONS.train, NATIONS.num_entities, NATIONS.num_relations)
    heads, relations = split.stage2_queries[:, 0], split.stage2_queries[:, 1]
    assert torch.equal(
        split.stage2_answers.multi_hot(heads, relations), full.multi_hot(heads, relations)
    )


def test_held_out_stage_2_needs_a_hold_out_and_the_fraction_is_bounded():
    with pytest.raises(
        ConfigError, match=r"train\.stage2_queries=held-out .* train\.holdout_fraction > 0"
    ):
        load_config(overrides=["train.stage2_queries=held-out"])
    with pytest.raises(ConfigError, match=r"train\.holdout_fraction"):
        load_config(overrides=["train.holdout_fraction=0.95"])


def test_the_hold_out_is_stage_1_relevant_but_leaves_existing_store_keys_alone():
    default = load_config()
    held = load_config(overrides=["train.holdout_fraction=0.2"])
    assert stage1_relevant(default)["train"]["holdout_fraction"] == 0.0
    assert stage1_relevant(held) != stage1_relevant(default)
    assert stage1_key(held) != stage1_key(default)
    # The key of a config without a hold-out hashes what it hashed before the field existed.
    assert "holdout_fraction" not in stage1_key_values(default)["train"]
    assert stage1_key_values(held)["train"]["holdout_fraction"] == 0.2
    assert stage1_key(load_config(overrides=["train.stage2_queries=fit"])) == stage1_key(default)


def test_a_held_out_run_trains_each_stage_on_its_own_queries(tmp_path, monkeypatch):
    """Stage 1's batches and labels come from the fit triples only; stage 2's from the held-out
    queries with every training answer; results.json records the split."""
    config = load_config(
        overrides=[
            *SMOKE,
            "structure.encoder=mgat",
            "train.holdout_fraction=0.25",
            "train.stage2_queries=held-out",
        ]
    )
    seen: list[tuple[AnswerIndex, torch.Tensor]] = []
    labels = trainer_module._labels

    def spy(answers, batch, smoothing):
        seen.append((answers, batch.clone()))
        return labels(answers, batch, smoothing)

    monkeypatch.setattr(trainer_module, "_labels", spy)
    built = []
    build_model = trainer_module.build_model

    def spy_build(*args, **kwargs):
        built.append(kwargs.get("structure_triples"))
        return build_model(*args, **kwargs)

    monkeypatch.setattr(trainer_module, "build_model", spy_build)
    results = train(config, tmp_path / "run", progress=False)

    graph = trainer_module.load_run_dataset(config)
    split = training_split(config, graph)
    assert torch.equal(built[0], split.fit)  # the structure encoder samples the fit triples
    records = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    stage1_steps = sum(1 for r in records if r["stage"] == 1) * -(
        -len(split.stage1_queries) // config.train.batch_size
    )
    stage1_calls, stage2_calls = seen[:stage1_steps], seen[stage1_steps:]
    assert stage2_calls, "stage 2 trained no batch"
    as_set = lambda queries: set(map(tuple, queries.tolist()))  # noqa: E731
    for answers, batch in stage1_calls:
        assert answers.num_facts == split.stage1_answers.num_facts < graph.train_answers().num_facts
        assert as_set(batch) <= as_set(split.stage1_queries)
    stage2_batches = torch.cat([batch for _, batch in stage2_calls])
    full = graph.train_answers().num_facts
    assert all(answers.num_facts == full for answers, _ in stage2_calls)
    assert as_set(stage2_batches) == as_set(split.stage2_queries)
    assert results["training_split"] == {
        "holdout_fraction": 0.25,
        "stage1_triples": len(split.fit),
        "held_out_triples": len(split.held_out),
        "stage2_queries": "held-out",
        "stage2_query_count": len(split.stage2_queries),
    }
    assert "training_split" not in train(load_config(overrides=SMOKE), tmp_path / "plain")


def test_a_fused_held_out_member_equals_its_lone_twin(tmp_path):
    """The fused pack trains on the same held-out queries as a lone run (one member, one thread)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        held = [*SMOKE, "train.holdout_fraction=0.25", "train.stage2_queries=held-out"]
        train(load_config(overrides=[*held, "train.stage2_epochs=0"]), tmp_path / "stage1")
        stage1 = tmp_path / "stage1" / "checkpoints" / "last.pt"
        config = load_config(overrides=[*held, "eval.report_official=false"])
        lone = train(config, tmp_path / "lone", stage1_checkpoint=stage1, progress=False)
        [fused] = train_fused([config], [tmp_path / "fused"], stage1)
    finally:
        torch.set_num_threads(threads)
    for results in (lone, fused):
        results.pop("timings")
        for split in ("valid", "test"):
            results[split].pop("inference_ms_per_query")
    assert fused == lone
    assert (tmp_path / "fused" / "metrics.jsonl").read_text().count("\n") == (
        tmp_path / "lone" / "metrics.jsonl"
    ).read_text().count("\n")
