"""Filtered rank-based evaluation for link prediction.

Every query is a tail query ``(head, relation, ?)`` with ``relation`` in ``[0, 2R)``: relations below
``R`` are forward queries (tail prediction), relations from ``R`` on are reciprocal ones, i.e. head
prediction ``(?, r, t)`` asked as ``(t, r + R, ?)``.

Filtered setting (Bordes et al., 2013): every *other* known answer of a query (from the train +
valid + test index) is removed from competition; the true answer itself stays. Entities outside the
candidate set are removed as well. Among the remaining competitors, the rank of the true answer is
reported under three tie policies, with ``s`` the score vector and ``t`` the true answer:

1. optimistic: ``1 + #{e : s[e] > s[t]}``
2. pessimistic: ``#{e : s[e] >= s[t]}`` (the true answer counts itself once)
3. realistic: the mean of both, the expected rank under a random order of tied entities.

These and the metrics below (MR, MRR, Hits@k) follow PyKEEN's ``RankBasedEvaluator`` definitions.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from core.data.graph import AnswerIndex, KnowledgeGraph

__all__ = [
    "DIRECTIONS",
    "TIE_POLICIES",
    "QueryRanks",
    "RankAccumulator",
    "RankingResult",
    "evaluate",
    "filtered_ranks",
    "shard_bounds",
]

TIE_POLICIES: tuple[str, ...] = ("optimistic", "pessimistic", "realistic")
DIRECTIONS: tuple[str, ...] = ("head", "tail", "both")


@dataclass(frozen=True)
class QueryRanks:
    """Filtered ranks of a batch of queries under the three tie policies.

    Attributes:
        optimistic: ``(B,)`` float64, ``1 + #competitors scoring strictly higher``.
        pessimistic: ``(B,)`` float64, ``#competitors scoring higher or equal``, answer included.
        realistic: ``(B,)`` float64, ``(optimistic + pessimistic) / 2``.
        num_options: ``(B,)`` long, number of entities in competition (the answer included).
    """

    optimistic: torch.Tensor
    pessimistic: torch.Tensor
    realistic: torch.Tensor
    num_options: torch.Tensor

    def get(self, tie: str) -> torch.Tensor:
        """The ``(B,)`` ranks of one tie policy."""
        return getattr(self, _check_tie(tie))

    def __len__(self) -> int:
        return len(self.optimistic)

    @staticmethod
    def concatenate(parts: Sequence[QueryRanks]) -> QueryRanks:
        """Join batches in order into one :class:`QueryRanks`."""
        if not parts:
            empty = torch.zeros(0, dtype=torch.float64)
            return QueryRanks(empty, empty, empty, torch.zeros(0, dtype=torch.long))
        return QueryRanks(
            optimistic=torch.cat([part.optimistic for part in parts]),
            pessimistic=torch.cat([part.pessimistic for part in parts]),
            realistic=torch.cat([part.realistic for part in parts]),
            num_options=torch.cat([part.num_options for part in parts]),
        )


def filtered_ranks(
    scores: torch.Tensor,
    heads: torch.Tensor,
    relations: torch.Tensor,
    answers: torch.Tensor,
    filter_index: AnswerIndex,
    candidate_mask: torch.Tensor | None = None,
) -> QueryRanks:
    """Filtered ranks of the true answers of a batch of queries, vectorised over the batch.

    The score matrix is only read, never modified (only the candidate columns are copied out when
    a candidate mask excludes most entities). Filtered entities are not masked densely: counts are
    taken over all candidates in one pass, then the few filtered positions, gathered sparsely from
    ``filter_index``, are subtracted.

    Args:
        scores: ``(B, E)`` scores, higher is better. ``±inf`` is allowed; NaN is an error.
        heads: ``(B,)`` long, query head entities.
        relations: ``(B,)`` long, query relations in ``[0, 2R)``.
        answers: ``(B,)`` long, the true answer of each query.
        filter_index: the known answers to filter out, usually ``graph.all_answers()``.
        candidate_mask: optional ``(E,)`` bool, true for entities that may be ranked.

    Returns:
        The ranks under the three tie policies, on ``scores.device``.

    Raises:
        ValueError: on shape mismatches, NaN scores, or a true answer outside the candidates.
    """
    num_queries, num_entities = _check_inputs(scores, heads, relations, answers, filter_index)
    device = scores.device
    heads, relations, answers = (
        x.to(device=device, dtype=torch.long) for x in (heads, relations, answers)
    )
    if candidate_mask is not None:
        candidate_mask = _check_candidate_mask(candidate_mask, num_entities).to(device)
        if bool(candidate_mask.all()):
            candidate_mask = None
    if candidate_mask is not None and not bool(candidate_mask[answers].all()):
        bad = (~candidate_mask[answers]).nonzero().squeeze(1)[:5].tolist()
        examples = [(int(heads[i]), int(relations[i]), int(answers[i])) for i in bad]
        raise ValueError(
            "true answers must be candidate entities; (head, relation, answer) queries with a "
            f"non-candidate answer include {examples}"
        )
    if num_queries == 0:
        empty = torch.zeros(0, dtype=torch.float64, device=device)
        return QueryRanks(empty, empty, empty, torch.zeros(0, dtype=torch.long, device=device))

    true_scores = scores.gather(1, answers.unsqueeze(1))  # (B, 1)

    # 1. Counts over every candidate entity, the true answer included.
    if candidate_mask is None:
        greater, at_least = _count_competitors(scores, true_scores)
        num_options = torch.full((num_queries,), num_entities, dtype=torch.long, device=device)
    else:
        candidate_ids = candidate_mask.nonzero().squeeze(1)
        outside_ids = (~candidate_mask).nonzero().squeeze(1)
        if len(outside_ids) <= len(candidate_ids):
            # Few non-candidates: count everything, then subtract the non-candidate columns.
            greater, at_least = _count_competitors(scores, true_scores)
            greater_out, at_least_out = _count_competitors(scores[:, outside_ids], true_scores)
            greater, at_least = greater - greater_out, at_least - at_least_out
        else:
            greater, at_least = _count_competitors(scores[:, candidate_ids], true_scores)
        num_options = torch.full(
            (num_queries,), len(candidate_ids), dtype=torch.long, device=device
        )

    # 2. Filter: remove the other known answers that are still in competition.
    rows, cols = filter_index.lookup(heads, relations)
    rows, cols = rows.to(device), cols.to(device)
    keep = cols != answers[rows]
    if candidate_mask is not None:
        keep &= candidate_mask[cols]
    rows, cols = rows[keep], cols[keep]
    filtered_scores = scores[rows, cols]
    row_true = true_scores.squeeze(1)[rows]
    greater -= torch.bincount(rows[filtered_scores > row_true], minlength=num_queries)
    at_least -= torch.bincount(rows[filtered_scores >= row_true], minlength=num_queries)
    num_options -= torch.bincount(rows, minlength=num_queries)

    optimistic = (greater + 1).double()
    pessimistic = at_least.double()
    return QueryRanks(
        optimistic=optimistic,
        pessimistic=pessimistic,
        realistic=0.5 * (optimistic + pessimistic),
        num_options=num_options,
    )


@dataclass(frozen=True)
class RankingResult:
    """Per-query ranks of one evaluation, and the metrics derived from them.

    The per-query ranks are kept (in query order) so that later analyses, such as paired bootstrap
    tests between two runs, can resample the same queries.

    Attributes:
        queries: ``(N, 3)`` long, ``(head, relation in [0, 2R), answer)`` per query, on CPU.
        ranks: the filtered ranks of every query, on CPU.
        num_relations: number of forward relations ``R``; ``relation >= R`` marks head prediction.
        ks: the ``k`` of the Hits@k metrics.
    """

    queries: torch.Tensor
    ranks: QueryRanks
    num_relations: int
    ks: tuple[int, ...] = (1, 3, 10)

    def __len__(self) -> int:
        return len(self.queries)

    @staticmethod
    def concatenate(parts: Sequence[RankingResult]) -> RankingResult:
        """One result from the results of consecutive query shards (see ``evaluate(shard=...)``)."""
        if not parts:
            raise ValueError("concatenate needs at least one result")
        first = parts[0]
        if any(p.num_relations != first.num_relations or p.ks != first.ks for p in parts):
            raise ValueError("results to concatenate differ in num_relations or ks")
        return RankingResult(
            queries=torch.cat([p.queries for p in parts]),
            ranks=QueryRanks.concatenate([p.ranks for p in parts]),
            num_relations=first.num_relations,
            ks=first.ks,
        )

    def direction_mask(self, direction: str) -> torch.Tensor:
        """``(N,)`` bool: queries of one direction (``"head"``, ``"tail"`` or ``"both"``)."""
        if direction not in DIRECTIONS:
            raise ValueError(
                f"unknown direction {direction!r}; expected one of {', '.join(DIRECTIONS)}"
            )
        if direction == "both":
            return torch.ones(len(self.queries), dtype=torch.bool)
        is_tail = self.queries[:, 1] < self.num_relations
        return is_tail if direction == "tail" else ~is_tail

    def metrics(self, tie: str = "realistic", direction: str = "both") -> dict[str, float]:
        """MR, MRR and Hits@k of one tie policy and direction.

        Returns:
            ``{"mr": ..., "mrr": ..., "hits@1": ..., ...}`` with one ``hits@k`` per ``k`` in
            :attr:`ks`. ``mr = mean(rank)``, ``mrr = mean(1 / rank)``,
            ``hits@k = mean(rank <= k)``; all NaN when the direction has no query.
        """
        ranks = self.ranks.get(tie)[self.direction_mask(direction)]
        if len(ranks) == 0:
            return {name: math.nan for name in _metric_names(self.ks)}
        values = {"mr": ranks.mean().item(), "mrr": ranks.reciprocal().mean().item()}
        for k in self.ks:
            values[f"hits@{k}"] = (ranks <= k).double().mean().item()
        return values

    def to_dict(self) -> dict[str, float]:
        """Every metric, flat: keys ``"{direction}.{tie}.{metric}"``, e.g. ``"both.realistic.mrr"``.

        Directions are ``head``, ``tail``, ``both``; ties ``optimistic``, ``pessimistic``,
        ``realistic``; metrics ``mr``, ``mrr``, ``hits@k``. JSON-serialisable.
        """
        flat = {}
        for direction in DIRECTIONS:
            for tie in TIE_POLICIES:
                for name, value in self.metrics(tie, direction).items():
                    flat[f"{direction}.{tie}.{name}"] = value
        return flat


class RankAccumulator:
    """Collects filtered ranks batch by batch and turns them into a :class:`RankingResult`."""

    def __init__(self, num_relations: int, ks: Sequence[int] = (1, 3, 10)) -> None:
        """Start an empty accumulation.

        Args:
            num_relations: number of forward relations ``R`` (queries use ``[0, 2R)``).
            ks: the ``k`` of the Hits@k metrics, positive integers.
        """
        ks = tuple(ks)
        if not ks or any(not isinstance(k, int) or isinstance(k, bool) or k < 1 for k in ks):
            raise ValueError(f"ks must be a non-empty sequence of positive integers, got {ks!r}")
        self.num_relations = num_relations
        self.ks = ks
        self._queries: list[torch.Tensor] = []
        self._ranks: list[QueryRanks] = []

    def __len__(self) -> int:
        return sum(len(part) for part in self._queries)

    def add(
        self,
        heads: torch.Tensor,
        relations: torch.Tensor,
        answers: torch.Tensor,
        ranks: QueryRanks,
    ) -> None:
        """Record the ranks of a batch of ``(B,)`` queries, computed by :func:`filtered_ranks`."""
        if not len(heads) == len(relations) == len(answers) == len(ranks):
            raise ValueError("heads, relations, answers and ranks must have the same length")
        queries = torch.stack([heads, relations, answers], dim=1).long().cpu()
        self._queries.append(queries)
        self._ranks.append(
            QueryRanks(
                optimistic=ranks.optimistic.cpu(),
                pessimistic=ranks.pessimistic.cpu(),
                realistic=ranks.realistic.cpu(),
                num_options=ranks.num_options.cpu(),
            )
        )

    def add_scores(
        self,
        scores: torch.Tensor,
        heads: torch.Tensor,
        relations: torch.Tensor,
        answers: torch.Tensor,
        filter_index: AnswerIndex,
        candidate_mask: torch.Tensor | None = None,
    ) -> QueryRanks:
        """Rank a ``(B, E)`` score batch with :func:`filtered_ranks`, record and return the ranks."""
        ranks = filtered_ranks(scores, heads, relations, answers, filter_index, candidate_mask)
        self.add(heads, relations, answers, ranks)
        return ranks

    def result(self) -> RankingResult:
        """All ranks recorded so far, in the order they were added."""
        queries = torch.cat(self._queries) if self._queries else torch.zeros(0, 3, dtype=torch.long)
        return RankingResult(
            queries=queries,
            ranks=QueryRanks.concatenate(self._ranks),
            num_relations=self.num_relations,
            ks=self.ks,
        )


def evaluate(
    score_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    graph: KnowledgeGraph,
    split: str,
    batch_size: int,
    *,
    ks: Sequence[int] = (1, 3, 10),
    device: torch.device | str | None = None,
    shard: tuple[int, int] = (0, 1),
) -> RankingResult:
    """Filtered evaluation of a scorer on both directions of a split.

    Args:
        score_fn: maps ``(B,)`` heads and ``(B,)`` relations in ``[0, 2R)`` to ``(B, E)`` scores
            over all entities, higher is better. Called under ``torch.no_grad()`` (not inference
            mode, so the returned ranks stay ordinary tensors that later code may modify).
        graph: the knowledge graph; filtering uses ``graph.all_answers()`` and
            ``graph.candidate_mask``.
        split: ``"train"``, ``"valid"`` or ``"test"``; its queries come from ``graph.queries``.
        batch_size: number of queries scored at once.
        ks: the ``k`` of the Hits@k metrics.
        device: where query ids are sent before calling ``score_fn``; CPU when ``None``.
        shard: ``(index, count)``: rank only the ``index``-th of ``count`` consecutive, near-equal
            slices of the queries (one per process); :meth:`RankingResult.concatenate` of the
            shards in index order equals the unsharded result.

    Returns:
        The per-query ranks and metrics, queries in ``graph.queries(split)`` order (the forward
        queries first, then the reciprocal ones).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    index, count = shard
    if not 0 <= index < count:
        raise ValueError(f"shard must be (index, count) with 0 <= index < count, got {shard}")
    queries = graph.queries(split)
    start, stop = shard_bounds(len(queries), index, count)
    queries = queries[start:stop]
    filter_index = graph.all_answers()
    candidate_mask = graph.candidate_mask
    accumulator = RankAccumulator(graph.num_relations, ks)
    with torch.no_grad():
        for batch in queries.split(batch_size):
            if device is not None:
                batch = batch.to(device)
            heads, relations, answers = batch.unbind(1)
            scores = score_fn(heads, relations)
            if scores.shape != (len(batch), graph.num_entities):
                raise ValueError(
                    f"score_fn returned shape {tuple(scores.shape)}, "
                    f"expected ({len(batch)}, {graph.num_entities})"
                )
            accumulator.add_scores(scores, heads, relations, answers, filter_index, candidate_mask)
    return accumulator.result()


def shard_bounds(num_queries: int, index: int, count: int) -> tuple[int, int]:
    """``[start, stop)`` of the ``index``-th of ``count`` consecutive slices of ``num_queries``.

    The first ``num_queries % count`` slices hold one query more than the others.
    """
    size, extra = divmod(num_queries, count)
    start = index * size + min(index, extra)
    return start, start + size + (1 if index < extra else 0)


def _count_competitors(
    scores: torch.Tensor, true_scores: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Row-wise counts of scores above and not below the true score.

    Both counts come from one comparison against two thresholds per row, ``t`` and the largest
    float below ``t``: for floats, ``s >= t`` holds exactly when ``s > nextafter(t, -inf)``. One
    broadcast comparison and one reduction read each score row twice while it is in cache, and keep
    the number of parallel kernels per batch small, which matters on a shared, busy CPU.

    Args:
        scores: ``(B, C)`` scores, free of NaN.
        true_scores: ``(B, 1)`` score of each row's true answer.

    Returns:
        ``(greater, at_least)``: two ``(B,)`` long tensors, ``#(scores > true)`` and
        ``#(scores >= true)``.
    """
    if not scores.is_floating_point():
        greater = (scores > true_scores).sum(dim=1, dtype=torch.int32)
        at_least = (scores >= true_scores).sum(dim=1, dtype=torch.int32)
        return greater.long(), at_least.long()
    # Thresholds in at least float32 so that nextafter exists; half-precision scores compare exactly
    # after promotion, as float32 holds every half and bfloat16 value.
    true = true_scores.to(torch.promote_types(scores.dtype, torch.float32))
    below = torch.nextafter(true, torch.full_like(true, -math.inf))
    thresholds = torch.stack([true, below], dim=1)  # (B, 2, 1)
    # Summing booleans into int32 is several times faster than into the default int64 on CPU.
    counts = (scores.unsqueeze(1) > thresholds).sum(dim=2, dtype=torch.int32).long()  # (B, 2)
    greater, at_least = counts[:, 0], counts[:, 1]
    # Two cases where ">" cannot stand for ">=": a true score of -inf (nothing lies below it; every
    # score is >= -inf), and a threshold in the subnormal range, which flush-to-zero modes may read
    # as zero. Both are rare: recount those rows directly.
    tiny = torch.finfo(true.dtype).tiny
    redo = (true.squeeze(1).abs() <= tiny).nonzero().squeeze(1)
    at_least = torch.where(true.squeeze(1) == -math.inf, scores.shape[1], at_least)
    if len(redo):
        at_least[redo] = (scores[redo] >= true_scores[redo]).sum(dim=1).long()
    return greater, at_least


def _check_inputs(
    scores: torch.Tensor,
    heads: torch.Tensor,
    relations: torch.Tensor,
    answers: torch.Tensor,
    filter_index: AnswerIndex,
) -> tuple[int, int]:
    """Validate shapes, id ranges and NaN; return ``(B, E)``."""
    if scores.ndim != 2:
        raise ValueError(f"scores must be (B, E), got shape {tuple(scores.shape)}")
    num_queries, num_entities = scores.shape
    for name, ids in (("heads", heads), ("relations", relations), ("answers", answers)):
        if ids.shape != (num_queries,):
            raise ValueError(f"{name} must have shape ({num_queries},), got {tuple(ids.shape)}")
    if filter_index.num_entities != num_entities:
        raise ValueError(
            f"scores cover {num_entities} entities but the filter index has {filter_index.num_entities}"
        )
    if num_queries == 0:
        return num_queries, num_entities
    for name, ids, high in (
        ("heads", heads, num_entities),
        ("answers", answers, num_entities),
        ("relations", relations, filter_index.num_query_relations),
    ):
        if int(ids.min()) < 0 or int(ids.max()) >= high:
            raise ValueError(f"{name} must lie in [0, {high})")
    # amax propagates NaN and is one cheap reduction; locate the rows only on failure.
    if scores.is_floating_point() and bool(torch.isnan(scores.amax())):
        rows = torch.isnan(scores).any(dim=1).nonzero().squeeze(1)
        raise ValueError(
            f"scores contain NaN in {len(rows)} of {num_queries} queries (first rows "
            f"{rows[:5].tolist()}); NaN compares false with everything and would silently "
            "corrupt the ranks"
        )
    return num_queries, num_entities


def _check_candidate_mask(candidate_mask: torch.Tensor, num_entities: int) -> torch.Tensor:
    if candidate_mask.dtype != torch.bool or candidate_mask.shape != (num_entities,):
        raise ValueError(
            f"candidate_mask must be a ({num_entities},) bool tensor, got "
            f"{candidate_mask.dtype} of shape {tuple(candidate_mask.shape)}"
        )
    return candidate_mask


def _check_tie(tie: str) -> str:
    if tie not in TIE_POLICIES:
        raise ValueError(f"unknown tie policy {tie!r}; expected one of {', '.join(TIE_POLICIES)}")
    return tie


def _metric_names(ks: Sequence[int]) -> list[str]:
    return ["mr", "mrr", *(f"hits@{k}" for k in ks)]
