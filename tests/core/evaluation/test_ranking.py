"""Filtered ranking: hand-computed cases, exact agreement with PyKEEN, and a slow reference."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from pykeen.evaluation import RankBasedEvaluator
from pykeen.evaluation.evaluator import create_sparse_positive_filter_, filter_scores_
from pykeen.metrics.ranking import ArithmeticMeanRank, HitsAtK, InverseHarmonicMeanRank

from core.data.graph import AnswerIndex, KnowledgeGraph
from core.evaluation import (
    DIRECTIONS,
    TIE_POLICIES,
    RankAccumulator,
    RankingResult,
    evaluate,
    filtered_ranks,
)
from core.evaluation import ranking as ranking_module

# --------------------------------------------------------------------------------------------------
# Helpers


def _graph(
    num_entities: int,
    num_relations: int,
    seed: int,
    num_candidates: int | None = None,
    sizes: tuple[int, int, int] = (300, 40, 60),
) -> KnowledgeGraph:
    """A random graph; valid/test triples only use candidate entities, train uses all."""
    generator = torch.Generator().manual_seed(seed)
    num_candidates = num_entities if num_candidates is None else num_candidates

    def triples(count: int, entity_high: int) -> torch.Tensor:
        heads = torch.randint(entity_high, (count,), generator=generator)
        relations = torch.randint(num_relations, (count,), generator=generator)
        tails = torch.randint(entity_high, (count,), generator=generator)
        return torch.unique(torch.stack([heads, relations, tails], dim=1), dim=0)

    train, valid, test = (
        triples(sizes[0], num_entities),
        triples(sizes[1], num_candidates),
        triples(sizes[2], num_candidates),
    )
    return KnowledgeGraph(
        name=f"synthetic-{seed}",
        entities=tuple(f"e{i}" for i in range(num_entities)),
        relations=tuple(f"r{i}" for i in range(num_relations)),
        entity_texts=("",) * num_entities,
        relation_texts=("",) * num_relations,
        entity_images=((),) * num_entities,
        train=train,
        valid=valid,
        test=test,
        candidates=torch.arange(num_candidates),
    )


def _ranks(scores, heads, relations, answers, index, mask=None):
    return filtered_ranks(
        torch.tensor(scores, dtype=torch.float32),
        torch.tensor(heads),
        torch.tensor(relations),
        torch.tensor(answers),
        index,
        mask,
    )


# --------------------------------------------------------------------------------------------------
# Hand-computed cases


def test_ties_give_the_three_tie_policies():
    # One known fact that does not concern the query (0, r0, ?): nothing is filtered.
    index = AnswerIndex(torch.tensor([[5, 0, 4]]), num_entities=6, num_relations=1)
    # True answer 2 scores 3; one entity scores higher (5), two others tie with it (3, 3).
    ranks = _ranks([[1.0, 5.0, 3.0, 3.0, 3.0, 0.0]], [0], [0], [2], index)
    assert ranks.optimistic.tolist() == [2.0]
    assert ranks.pessimistic.tolist() == [4.0]
    assert ranks.realistic.tolist() == [3.0]
    assert ranks.num_options.tolist() == [6]
    # Without ties all three agree; realistic can be a half-integer.
    ranks = _ranks([[1.0, 5.0, 3.0, 2.0, 4.0, 3.0]], [0], [0], [4], index)
    assert ranks.optimistic.tolist() == ranks.pessimistic.tolist() == [2.0]
    ranks = _ranks([[3.0, 3.0, 0.0, 0.0, 0.0, 0.0]], [0], [0], [0], index)
    assert ranks.realistic.tolist() == [1.5]
    assert ranks.realistic.dtype == torch.float64


def test_filter_removes_other_answers_but_keeps_the_true_one():
    # Query (0, r0, ?) has known answers {1, 2, 3}; its reciprocal (2, r1, ?) has {0}.
    triples = torch.tensor([[0, 0, 1], [0, 0, 2], [0, 0, 3]])
    index = AnswerIndex(triples, num_entities=6, num_relations=1)
    scores = [[0.0, 9.0, 8.0, 7.0, 7.5, 1.0]] * 2
    ranks = _ranks(scores, [0, 0], [0, 0], [3, 1], index)
    # Answer 3 (7.0): 1 and 2 are filtered, 4 (7.5) beats it -> rank 2. Answer 1: rank 1.
    assert ranks.optimistic.tolist() == [2.0, 1.0]
    assert ranks.pessimistic.tolist() == [2.0, 1.0]
    assert ranks.num_options.tolist() == [4, 4]
    # A tie with a filtered answer does not count; a tie with an unknown entity does.
    ranks = _ranks([[0.0, 7.0, 7.0, 7.0, 7.0, 1.0]], [0], [0], [3], index)
    assert (ranks.optimistic.item(), ranks.pessimistic.item()) == (1.0, 2.0)
    # The reciprocal query uses its own answers: nothing but the true answer 0 is known.
    ranks = _ranks([[5.0, 9.0, 8.0, 0.0, 0.0, 0.0]], [2], [1], [0], index)
    assert ranks.optimistic.tolist() == [3.0]


def test_candidate_mask_removes_non_candidates_from_competition():
    triples = torch.tensor([[0, 0, 1]])
    index = AnswerIndex(triples, num_entities=6, num_relations=1)
    scores = [[0.0, 9.0, 5.0, 6.0, 7.0, 5.0]]
    mask = torch.tensor([True, True, True, False, True, False])
    ranks = _ranks(scores, [0], [0], [2], index, mask)
    # Competitors of answer 2 (5.0): 0 (0.0), 4 (7.0); 1 filtered, 3 and 5 not candidates.
    assert ranks.optimistic.tolist() == [2.0]
    assert ranks.pessimistic.tolist() == [2.0]
    assert ranks.num_options.tolist() == [3]
    # The same with few candidates (the other counting strategy) agrees.
    few = torch.tensor([False, False, True, False, True, False])
    ranks = _ranks(scores, [0], [0], [2], index, few)
    assert ranks.optimistic.tolist() == [2.0] and ranks.num_options.tolist() == [2]


def test_nan_scores_are_an_error():
    index = AnswerIndex(torch.tensor([[0, 0, 1]]), num_entities=4, num_relations=1)
    with pytest.raises(ValueError, match="NaN"):
        _ranks([[0.0, 1.0, 2.0, 3.0], [0.0, float("nan"), 2.0, 3.0]], [0, 0], [0, 0], [2, 2], index)


def test_infinite_scores_are_ranked_not_rejected():
    index = AnswerIndex(torch.tensor([[0, 0, 1]]), num_entities=4, num_relations=1)
    inf = float("inf")
    ranks = _ranks([[-inf, inf, 2.0, inf]], [0], [0], [2], index)
    assert ranks.optimistic.tolist() == [2.0]


def test_non_candidate_answer_is_an_error():
    index = AnswerIndex(torch.tensor([[0, 0, 1]]), num_entities=4, num_relations=1)
    mask = torch.tensor([True, True, False, True])
    with pytest.raises(ValueError, match="non-candidate answer"):
        _ranks([[0.0, 1.0, 2.0, 3.0]], [0], [0], [2], index, mask)


def test_bad_shapes_and_ids_are_errors():
    index = AnswerIndex(torch.tensor([[0, 0, 1]]), num_entities=4, num_relations=1)
    with pytest.raises(ValueError, match="relations must lie"):
        _ranks([[0.0, 1.0, 2.0, 3.0]], [0], [2], [1], index)
    with pytest.raises(ValueError, match="filter index"):
        _ranks([[0.0, 1.0, 2.0]], [0], [0], [1], index)
    with pytest.raises(ValueError, match="answers must have shape"):
        _ranks([[0.0, 1.0, 2.0, 3.0]], [0], [0], [1, 2], index)


@pytest.mark.parametrize(
    "dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int64]
)
def test_counts_equal_direct_comparisons_at_edge_values(dtype):
    # The counting compares once against t and nextafter(t, -inf); check it against plain > / >=
    # where that trick is delicate: infinities, zeros of both signs, subnormals, the extremes.
    generator = torch.Generator().manual_seed(0)
    if dtype.is_floating_point:
        info = torch.finfo(dtype)
        special = [
            -math.inf,
            math.inf,
            0.0,
            -0.0,
            info.tiny,
            -info.tiny,
            info.tiny / 4,
            -info.tiny / 4,
            info.max,
            -info.max,
            1.0,
        ]
        pool = torch.tensor(special, dtype=dtype)
    else:
        pool = torch.tensor([-(2**63), 2**63 - 1, 0, 1, -1], dtype=dtype)
    scores = pool[torch.randint(len(pool), (300, 25), generator=generator)]
    answers = torch.randint(25, (300,), generator=generator)
    true_scores = scores.gather(1, answers.unsqueeze(1))
    greater, at_least = ranking_module._count_competitors(scores, true_scores)
    assert torch.equal(greater, (scores > true_scores).sum(1))
    assert torch.equal(at_least, (scores >= true_scores).sum(1))


def test_metrics_and_flat_dict():
    ranks = ranking_module.QueryRanks(
        optimistic=torch.tensor([1.0, 2.0, 4.0, 11.0], dtype=torch.float64),
        pessimistic=torch.tensor([1.0, 3.0, 4.0, 12.0], dtype=torch.float64),
        realistic=torch.tensor([1.0, 2.5, 4.0, 11.5], dtype=torch.float64),
        num_options=torch.tensor([20, 20, 20, 20]),
    )
    # Relations 0, 1 are forward (tail prediction) with R = 2; 2, 3 are reciprocal (head).
    queries = torch.tensor([[0, 0, 1], [0, 1, 2], [1, 2, 0], [2, 3, 0]])
    result = RankingResult(queries=queries, ranks=ranks, num_relations=2, ks=(1, 3, 10))
    both = result.metrics("realistic")
    assert both["mr"] == pytest.approx((1 + 2.5 + 4 + 11.5) / 4)
    assert both["mrr"] == pytest.approx((1 + 1 / 2.5 + 1 / 4 + 1 / 11.5) / 4)
    assert (both["hits@1"], both["hits@3"], both["hits@10"]) == (0.25, 0.5, 0.75)
    assert result.metrics("pessimistic", "tail") == {
        "mr": 2.0,
        "mrr": pytest.approx((1 + 1 / 3) / 2),
        "hits@1": 0.5,
        "hits@3": 1.0,
        "hits@10": 1.0,
    }
    assert result.metrics("optimistic", "head")["mr"] == 7.5
    flat = result.to_dict()
    assert len(flat) == len(DIRECTIONS) * len(TIE_POLICIES) * 5
    assert flat["both.realistic.mrr"] == both["mrr"]
    assert flat["head.optimistic.hits@10"] == 0.5
    with pytest.raises(ValueError, match="tie policy"):
        result.metrics("average")
    with pytest.raises(ValueError, match="direction"):
        result.metrics("realistic", "left")
    with pytest.raises(ValueError, match="ks"):
        RankAccumulator(2, ks=(0, 3))


# --------------------------------------------------------------------------------------------------
# Exact agreement with PyKEEN's RankBasedEvaluator

_PYKEEN_METRICS = {
    "mr": "arithmetic_mean_rank",
    "mrr": "inverse_harmonic_mean_rank",
    "hits@1": "hits_at_1",
    "hits@3": "hits_at_3",
    "hits@10": "hits_at_10",
}


def _pykeen_metric_objects() -> dict:
    return {
        "mr": ArithmeticMeanRank(),
        "mrr": InverseHarmonicMeanRank(),
        **{f"hits@{k}": HitsAtK(k) for k in (1, 3, 10)},
    }


def _pykeen_evaluate(graph: KnowledgeGraph, scores: torch.Tensor, batch_size: int):
    """Run PyKEEN's filtered evaluation on precomputed scores, as its ``_evaluate_batch`` does.

    ``scores`` is aligned with ``graph.queries("test")``: the first ``n`` rows are tail prediction
    for the ``n`` test triples, the last ``n`` rows head prediction for the same triples.
    """
    test = graph.test
    all_positive = torch.cat([graph.train, graph.valid, graph.test])
    candidates = graph.candidates if len(graph.candidates) < graph.num_entities else None
    evaluator = RankBasedEvaluator(filtered=True, clear_on_finalize=False)
    for start in range(0, len(test), batch_size):
        batch = test[start : start + batch_size]
        rows = torch.arange(len(batch))
        for target, offset, column in (("head", len(test), 0), ("tail", 0, 2)):
            batch_scores = scores[offset + start : offset + start + len(batch)].clone()
            positive_filter, _ = create_sparse_positive_filter_(
                hrt_batch=batch, all_pos_triples=all_positive, filter_col=column
            )
            true_scores = batch_scores[rows, batch[:, column]]
            batch_scores = filter_scores_(scores=batch_scores, filter_batch=positive_filter)
            batch_scores[rows, batch[:, column]] = true_scores
            if candidates is not None:
                batch_scores = batch_scores[:, candidates]
            evaluator.process_scores_(
                hrt_batch=batch,
                target=target,
                scores=batch_scores,
                true_scores=true_scores.unsqueeze(1),
            )
    ranks = {key: np.concatenate(value) for key, value in evaluator.ranks.items()}
    return evaluator.finalize(), ranks


@pytest.mark.parametrize(
    ("num_candidates", "score_levels"), [(None, 4), (None, 1000), (45, 3), (12, 5)]
)
def test_metrics_equal_pykeen_rank_based_evaluator(num_candidates, score_levels):
    graph = _graph(60, 5, seed=11, num_candidates=num_candidates, sizes=(900, 60, 150))
    queries = graph.queries("test")
    generator = torch.Generator().manual_seed(score_levels)
    # A score table indexed by (head, relation): any deterministic scorer will do. Integer values:
    # with few levels nearly every true answer is tied with other entities.
    shape = (graph.num_entities, 2 * graph.num_relations, graph.num_entities)
    table = torch.randint(0, score_levels, shape, generator=generator).float()
    result = evaluate(lambda h, r: table[h, r], graph, "test", batch_size=37)
    scores = table[queries[:, 0], queries[:, 1]]
    pykeen_result, pykeen_ranks = _pykeen_evaluate(graph, scores, batch_size=32)

    num_test = len(graph.test)
    for tie in TIE_POLICIES:
        ours = result.ranks.get(tie)
        # Per-query ranks are identical, value for value, in both directions.
        tail = torch.from_numpy(pykeen_ranks["tail", tie].astype(np.float64))
        head = torch.from_numpy(pykeen_ranks["head", tie].astype(np.float64))
        assert torch.equal(ours[:num_test], tail)
        assert torch.equal(ours[num_test:], head)
        for direction in DIRECTIONS:
            metrics = result.metrics(tie, direction)
            for name, pykeen_name in _PYKEEN_METRICS.items():
                expected = pykeen_result.get_metric(f"{direction}.{tie}.{pykeen_name}")
                if name.startswith("hits"):
                    assert metrics[name] == expected, (direction, tie, name)
                elif tie != "realistic":
                    # Integer ranks: only PyKEEN's 1 / harmonic_mean round-trip differs (an ulp).
                    assert metrics[name] == pytest.approx(expected, rel=1e-12, abs=0)
                else:
                    # PyKEEN keeps realistic ranks in float32 and averages them in float32 ...
                    assert metrics[name] == pytest.approx(expected, rel=1e-6, abs=0)
                    # ... its own metric on the same ranks in float64 agrees to an ulp.
                    sides = ("head", "tail") if direction == "both" else (direction,)
                    ranks64 = np.concatenate([pykeen_ranks[side, tie] for side in sides])
                    metric = _pykeen_metric_objects()[name]
                    assert metrics[name] == pytest.approx(
                        metric(ranks64.astype(np.float64)), rel=1e-12, abs=0
                    )
    # The setting is not degenerate: ties and filtering both change the ranks.
    assert (result.ranks.optimistic != result.ranks.pessimistic).any()
    assert (result.ranks.num_options < len(graph.candidates)).any()


# --------------------------------------------------------------------------------------------------
# evaluate() against a plain, one-query-at-a-time reference


def _slow_reference_ranks(scores: torch.Tensor, graph: KnowledgeGraph) -> dict[str, list[float]]:
    """Filtered ranks computed one query at a time with Python sets and loops."""
    known: dict[tuple[int, int], set[int]] = {}
    num_relations = graph.num_relations
    for split in (graph.train, graph.valid, graph.test):
        for head, relation, tail in split.tolist():
            known.setdefault((head, relation), set()).add(tail)
            known.setdefault((tail, relation + num_relations), set()).add(head)
    candidates = set(graph.candidates.tolist())
    out: dict[str, list[float]] = {tie: [] for tie in TIE_POLICIES}
    for row, (head, relation, answer) in enumerate(graph.queries("test").tolist()):
        row_scores = scores[row].tolist()
        true_score = row_scores[answer]
        competitors = [
            entity
            for entity in range(graph.num_entities)
            if entity in candidates
            and (entity == answer or entity not in known.get((head, relation), set()))
        ]
        optimistic = 1 + sum(1 for entity in competitors if row_scores[entity] > true_score)
        pessimistic = sum(1 for entity in competitors if row_scores[entity] >= true_score)
        out["optimistic"].append(float(optimistic))
        out["pessimistic"].append(float(pessimistic))
        out["realistic"].append((optimistic + pessimistic) / 2)
    return out


def test_evaluate_matches_slow_reference():
    graph = _graph(50, 4, seed=5, num_candidates=42, sizes=(500, 50, 80))
    generator = torch.Generator().manual_seed(1)
    entity_embeddings = torch.randn(graph.num_entities, 8, generator=generator)
    relation_embeddings = torch.randn(2 * graph.num_relations, 8, generator=generator)

    def score_fn(heads: torch.Tensor, relations: torch.Tensor) -> torch.Tensor:
        # DistMult, rounded so that ties occur.
        scores = (entity_embeddings[heads] * relation_embeddings[relations]) @ entity_embeddings.T
        return scores.round()

    result = evaluate(score_fn, graph, "test", batch_size=17, ks=(1, 3, 10, 20))
    queries = graph.queries("test")
    assert torch.equal(result.queries, queries)
    all_scores = score_fn(queries[:, 0], queries[:, 1])
    reference = _slow_reference_ranks(all_scores, graph)
    for tie in TIE_POLICIES:
        assert result.ranks.get(tie).tolist() == reference[tie]
        values = reference[tie]
        metrics = result.metrics(tie)
        assert metrics["mr"] == pytest.approx(sum(values) / len(values), rel=1e-12)
        assert metrics["mrr"] == pytest.approx(sum(1 / v for v in values) / len(values), rel=1e-12)
        for k in (1, 3, 10, 20):
            assert metrics[f"hits@{k}"] == sum(v <= k for v in values) / len(values)
        tail = reference[tie][: len(graph.test)]
        assert result.metrics(tie, "tail")["mr"] == pytest.approx(sum(tail) / len(tail))
    assert not math.isnan(result.to_dict()["head.realistic.mrr"])
    assert (result.ranks.optimistic != result.ranks.pessimistic).any()


def test_evaluate_rejects_wrong_score_shape():
    graph = _graph(20, 2, seed=2, sizes=(60, 10, 10))
    with pytest.raises(ValueError, match="score_fn returned shape"):
        evaluate(lambda h, r: torch.zeros(len(h), 3), graph, "test", batch_size=4)


@pytest.mark.parametrize("count", [1, 2, 3, 7])
def test_sharded_evaluation_concatenates_to_the_unsharded_result(count):
    graph = _graph(30, 3, seed=9, sizes=(200, 30, 41))
    generator = torch.Generator().manual_seed(2)
    table = torch.randn(graph.num_entities, 4, generator=generator)

    def score_fn(heads: torch.Tensor, relations: torch.Tensor) -> torch.Tensor:
        return (table[heads] + relations.unsqueeze(1).float()) @ table.T

    whole = evaluate(score_fn, graph, "test", batch_size=5)
    parts = [
        evaluate(score_fn, graph, "test", batch_size=5, shard=(index, count))
        for index in range(count)
    ]
    sizes = [len(part) for part in parts]
    assert sum(sizes) == len(whole) and max(sizes) - min(sizes) <= 1
    joined = RankingResult.concatenate(parts)
    assert torch.equal(joined.queries, whole.queries)
    for tie in TIE_POLICIES:
        assert torch.equal(joined.ranks.get(tie), whole.ranks.get(tie))
    assert joined.to_dict() == whole.to_dict()


def test_shard_bounds_cover_every_query_once_and_bad_shards_are_refused():
    from core.evaluation import shard_bounds

    assert [shard_bounds(10, i, 3) for i in range(3)] == [(0, 4), (4, 7), (7, 10)]
    assert [shard_bounds(2, i, 4) for i in range(4)] == [(0, 1), (1, 2), (2, 2), (2, 2)]
    graph = _graph(20, 2, seed=2, sizes=(60, 10, 10))
    with pytest.raises(ValueError, match="shard must be"):
        evaluate(lambda h, r: torch.zeros(len(h), 20), graph, "test", batch_size=4, shard=(2, 2))
    with pytest.raises(ValueError, match="at least one"):
        RankingResult.concatenate([])
