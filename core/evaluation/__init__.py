"""Evaluation: filtered rank-based link-prediction metrics."""

from core.evaluation.ranking import (
    DIRECTIONS,
    TIE_POLICIES,
    QueryRanks,
    RankAccumulator,
    RankingResult,
    evaluate,
    filtered_ranks,
    shard_bounds,
)

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
