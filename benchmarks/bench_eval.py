"""Filtered evaluation throughput: ``core.evaluation`` against PyKEEN's ``RankBasedEvaluator``.

Run from the repository root::

    .venv/bin/python benchmarks/bench_eval.py [--quick] [--threads N]

Both evaluators rank the *same* random score matrices (one matrix per batch and direction, drawn
from a per-batch seed, so the full ``queries x entities`` matrix is never held at once) under the
same filtered setting, at two sizes: UMLS (135 entities, 661 test triples) and FB15k-237-IMG
(14,541 entities, 20,466 test triples, ~310k known triples over 237 relations, synthetic). Only
evaluation is timed, not score generation. PyKEEN is timed two ways:

* ``PyKEEN evaluator``: its own per-batch path (``_evaluate_batch``: sparse filter from all known
  triples, NaN-masking, ``RankBasedEvaluator.process_scores_``), plus ``finalize``, with a stub
  model that returns the prepared scores.
* ``PyKEEN, filter given``: the same without building the filter, whose coordinates are looked up
  beforehand, untimed; this isolates the ranking itself.

Ours is ``RankAccumulator.add_scores`` per batch (index lookup included) plus ``result().to_dict()``.
Medians over repeats are reported; the script asserts that per-query ranks are identical and that
the metrics agree (Hits@k exactly; MR/MRR to float32 precision, because PyKEEN keeps realistic
ranks in float32).
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from dataclasses import dataclass

import numpy as np
import torch

os.environ.setdefault("PYSTOW_HOME", tempfile.mkdtemp(prefix="bench-eval-pystow-"))

from pykeen.evaluation import RankBasedEvaluator  # noqa: E402
from pykeen.evaluation.evaluator import _evaluate_batch, filter_scores_  # noqa: E402

from core.data.graph import AnswerIndex  # noqa: E402
from core.evaluation import DIRECTIONS, TIE_POLICIES, RankAccumulator  # noqa: E402

_PYKEEN_METRICS = {
    "mr": "arithmetic_mean_rank",
    "mrr": "inverse_harmonic_mean_rank",
    "hits@1": "hits_at_1",
    "hits@3": "hits_at_3",
    "hits@10": "hits_at_10",
}


@dataclass(frozen=True)
class _Size:
    name: str
    num_entities: int
    num_relations: int
    num_known: int  # train + valid + test triples
    num_test: int


_SIZES = (
    _Size("UMLS", 135, 46, 6529, 661),
    _Size("FB15k-237-IMG", 14541, 237, 310116, 20466),
)


class _StubModel:
    """Stands in for a PyKEEN model: ``predict`` returns the scores prepared for this call."""

    scores: torch.Tensor

    def predict(self, hrt_batch, target, slice_size=None, mode=None) -> torch.Tensor:
        return self.scores


def _known_triples(size: _Size, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Random distinct triples with skewed entity and relation popularity; ``(all, test)``."""
    generator = torch.Generator().manual_seed(seed)
    entity_weights = 1.0 / (torch.arange(size.num_entities, dtype=torch.float64) + 10.0) ** 0.9
    relation_weights = 1.0 / (torch.arange(size.num_relations, dtype=torch.float64) + 2.0) ** 0.7
    unique = torch.zeros(0, 3, dtype=torch.long)
    while len(unique) < size.num_known:
        count = 2 * (size.num_known - len(unique)) + 100
        heads = torch.multinomial(entity_weights, count, replacement=True, generator=generator)
        relations = torch.multinomial(
            relation_weights, count, replacement=True, generator=generator
        )
        tails = torch.multinomial(entity_weights, count, replacement=True, generator=generator)
        drawn = torch.stack([heads, relations, tails], dim=1)
        unique = torch.unique(torch.cat([unique, drawn]), dim=0)
    order = torch.randperm(len(unique), generator=generator)[: size.num_known]
    known = unique[order]
    return known, known[: size.num_test]


def _scores(batch_index: int, target: str, rows: int, num_entities: int, seed: int) -> torch.Tensor:
    """Deterministic ``(rows, E)`` scores of one batch and direction, rounded so ties occur."""
    generator = torch.Generator().manual_seed(
        seed * 1_000_003 + 2 * batch_index + (target == "head")
    )
    return torch.randn(rows, num_entities, generator=generator).mul_(100).round_().div_(100)


def _run_once(size: _Size, known: torch.Tensor, test: torch.Tensor, batch_size: int, seed: int):
    """One full pass of all three evaluators; returns timings (s) and the results."""
    index = AnswerIndex(known, size.num_entities, size.num_relations)
    candidate_mask = torch.ones(size.num_entities, dtype=torch.bool)
    accumulator = RankAccumulator(size.num_relations, ks=(1, 3, 10))
    evaluator = RankBasedEvaluator(filtered=True, clear_on_finalize=False)
    given = RankBasedEvaluator(filtered=True, clear_on_finalize=False)
    model = _StubModel()
    seconds = {"ours": 0.0, "pykeen": 0.0, "pykeen_given": 0.0}
    for batch_index, batch in enumerate(test.split(batch_size)):
        relation_filter = None
        rows = torch.arange(len(batch))
        for target in ("head", "tail"):  # PyKEEN's default order
            column = 0 if target == "head" else 2
            if target == "tail":
                heads, relations, answers = batch[:, 0], batch[:, 1], batch[:, 2]
            else:
                heads, relations, answers = (
                    batch[:, 2],
                    batch[:, 1] + size.num_relations,
                    batch[:, 0],
                )
            scores = _scores(batch_index, target, len(batch), size.num_entities, seed)
            model.scores = scores.clone()  # PyKEEN overwrites its input in place
            given_scores = scores.clone()
            filter_rows, filter_cols = index.lookup(heads, relations)
            given_filter = torch.stack([filter_rows, filter_cols], dim=1)

            start = time.perf_counter()
            accumulator.add_scores(scores, heads, relations, answers, index, candidate_mask)
            seconds["ours"] += time.perf_counter() - start

            start = time.perf_counter()
            relation_filter = _evaluate_batch(
                batch=batch,
                model=model,
                target=target,
                evaluator=evaluator,
                slice_size=None,
                all_pos_triples=known,
                relation_filter=relation_filter,
                restrict_entities_to=None,
                mode=None,
            )
            seconds["pykeen"] += time.perf_counter() - start

            start = time.perf_counter()
            true_scores = given_scores[rows, batch[:, column]]
            given_scores = filter_scores_(scores=given_scores, filter_batch=given_filter)
            given_scores[rows, batch[:, column]] = true_scores
            given.process_scores_(
                hrt_batch=batch,
                target=target,
                scores=given_scores,
                true_scores=true_scores.unsqueeze(1),
            )
            seconds["pykeen_given"] += time.perf_counter() - start

    pykeen_ranks = {key: np.concatenate(value) for key, value in evaluator.ranks.items()}
    given_ranks = {key: np.concatenate(value) for key, value in given.ranks.items()}
    start = time.perf_counter()
    ours = accumulator.result()
    ours_metrics = ours.to_dict()
    seconds["ours"] += time.perf_counter() - start
    start = time.perf_counter()
    pykeen_result = evaluator.finalize()
    seconds["pykeen"] += time.perf_counter() - start
    start = time.perf_counter()
    given_result = given.finalize()
    seconds["pykeen_given"] += time.perf_counter() - start
    return seconds, ours, ours_metrics, (pykeen_result, pykeen_ranks), (given_result, given_ranks)


def _compare(ours, ours_metrics, pykeen_result, pykeen_ranks) -> tuple[bool, float, float]:
    """Check ranks bitwise and metrics; return (ranks identical, max MR/MRR rel diff, max Hits diff)."""
    identical = True
    for tie in TIE_POLICIES:
        for direction in ("head", "tail"):
            mine = ours.ranks.get(tie)[ours.direction_mask(direction)].numpy()
            theirs = pykeen_ranks[direction, tie].astype(np.float64)
            identical &= bool(np.array_equal(mine, theirs))
    worst_relative, worst_hits = 0.0, 0.0
    for direction in DIRECTIONS:
        for tie in TIE_POLICIES:
            for name, pykeen_name in _PYKEEN_METRICS.items():
                mine = ours_metrics[f"{direction}.{tie}.{name}"]
                theirs = pykeen_result.get_metric(f"{direction}.{tie}.{pykeen_name}")
                if name.startswith("hits"):
                    worst_hits = max(worst_hits, abs(mine - theirs))
                else:
                    worst_relative = max(worst_relative, abs(mine - theirs) / abs(theirs))
    return identical, worst_relative, worst_hits


def _load() -> str:
    """The 1/5/15-minute load averages: other work on a shared machine skews every timing."""
    return " / ".join(f"{value:.1f}" for value in os.getloadavg())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats")
    parser.add_argument("--batch-size", type=int, default=256, help="queries per score matrix")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--threads", type=int, default=None, help="torch threads (default: leave torch's default)"
    )
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    repeats = {"UMLS": 5, "FB15k-237-IMG": 2} if args.quick else {"UMLS": 15, "FB15k-237-IMG": 5}

    print(
        f"torch {torch.__version__}, threads: {torch.get_num_threads()}, batch size "
        f"{args.batch_size}, load average at start: {_load()}"
    )
    table = []
    for size in _SIZES:
        known, test = _known_triples(size, args.seed)
        index = AnswerIndex(known, size.num_entities, size.num_relations)
        tail_rows, _ = index.lookup(test[:, 0], test[:, 1])
        head_rows, _ = index.lookup(test[:, 2], test[:, 1] + size.num_relations)
        per_query = torch.cat(
            [
                torch.bincount(tail_rows, minlength=len(test)),
                torch.bincount(head_rows, minlength=len(test)),
            ]
        ).double()
        print(
            f"\n{size.name}: {size.num_entities} entities, {size.num_relations} relations, "
            f"{len(known)} known triples, {2 * len(test)} queries; known answers per query: "
            f"mean {per_query.mean():.1f}, max {int(per_query.max())}"
        )
        timings: dict[str, list[float]] = {"ours": [], "pykeen": [], "pykeen_given": []}
        for repeat in range(repeats[size.name]):
            seconds, ours, ours_metrics, pykeen, given = _run_once(
                size, known, test, args.batch_size, args.seed
            )
            for key, value in seconds.items():
                timings[key].append(value)
            if repeat == 0:
                checks = [
                    _compare(ours, ours_metrics, *pykeen),
                    _compare(ours, ours_metrics, *given),
                ]
                identical = all(check[0] for check in checks)
                relative = max(check[1] for check in checks)
                hits = max(check[2] for check in checks)
                assert identical, "per-query ranks differ from PyKEEN's"
                assert hits == 0.0, f"Hits@k differ from PyKEEN's by {hits}"
                assert relative < 1e-6, f"MR/MRR differ from PyKEEN's by {relative:.2e} (relative)"
                print(
                    f"  ranks identical: {identical}; Hits@k max diff {hits}; MR/MRR max rel diff "
                    f"{relative:.1e}; both.realistic.mrr = {ours_metrics['both.realistic.mrr']:.6f}"
                )
            print(
                f"  repeat {repeat + 1}: ours {seconds['ours']:.3f}s, PyKEEN {seconds['pykeen']:.3f}s, "
                f"PyKEEN filter given {seconds['pykeen_given']:.3f}s"
            )
        medians = {key: statistics.median(values) for key, values in timings.items()}
        num_queries = 2 * len(test)
        table.append((size, num_queries, repeats[size.name], medians, relative))

    print(f"\nload average at end: {_load()}")
    print(
        "\n| size | candidates | queries | repeats | ours (q/s) | PyKEEN evaluator (q/s) "
        "| ours / PyKEEN | PyKEEN, filter given (q/s) | ours / filter given "
        "| ranks identical, MR/MRR max rel diff |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    for size, num_queries, count, medians, relative in table:
        rate = {key: num_queries / value for key, value in medians.items()}
        print(
            f"| {size.name} | {size.num_entities:,} | {num_queries:,} | {count} "
            f"| {rate['ours']:,.0f} | {rate['pykeen']:,.0f} | {rate['ours'] / rate['pykeen']:.1f}x "
            f"| {rate['pykeen_given']:,.0f} | {rate['ours'] / rate['pykeen_given']:.1f}x "
            f"| yes, {relative:.0e} |"
        )


if __name__ == "__main__":
    main()
