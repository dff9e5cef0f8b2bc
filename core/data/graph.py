"""The knowledge graph container shared by every dataset, model and evaluation.

A :class:`KnowledgeGraph` holds vocabularies, id triples for the three splits, per-entity text and
image files, and the candidate set. Two :class:`AnswerIndex` objects are derived from it:

* ``train_answers``: built from training triples only. It gives training labels and the structure
  the subgraph extractor may see. It never contains a valid or test fact.
* ``all_answers``: built from train + valid + test. It is used for filtered evaluation only.

Both indexes include reciprocal relations: relation ``r + num_relations`` is the inverse of ``r``, so
head prediction (?, r, t) is asked as the tail query (t, r⁻¹, ?).
"""

from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import torch

__all__ = ["AnswerIndex", "KnowledgeGraph", "with_reciprocals"]


def with_reciprocals(triples: torch.Tensor, num_relations: int) -> torch.Tensor:
    """Return the triples followed by their inverses.

    Args:
        triples: ``(n, 3)`` long tensor of ``(head, relation, tail)``.
        num_relations: number of forward relations ``R``; inverse of ``r`` is ``r + R``.

    Returns:
        ``(2n, 3)`` long tensor: the ``n`` forward triples, then ``(tail, r + R, head)``.
    """
    inverse = torch.stack([triples[:, 2], triples[:, 1] + num_relations, triples[:, 0]], dim=1)
    return torch.cat([triples, inverse], dim=0)


class AnswerIndex:
    """Known answers for every ``(head, relation)`` query, stored in compressed sparse rows.

    Queries are keyed as ``head * num_query_relations + relation`` where ``num_query_relations`` is
    ``2R`` (forward and reciprocal). Lookups are vectorised: a batch of queries costs one
    ``searchsorted`` and one gather, never a Python loop per query.
    """

    def __init__(self, triples: torch.Tensor, num_entities: int, num_relations: int) -> None:
        """Build the index from forward triples.

        Args:
            triples: ``(n, 3)`` long tensor of forward ``(head, relation, tail)`` triples.
            num_entities: number of entities ``E``.
            num_relations: number of forward relations ``R``.
        """
        self.num_entities = num_entities
        self.num_relations = num_relations
        self.num_query_relations = 2 * num_relations
        both = with_reciprocals(triples.long(), num_relations)
        keys = both[:, 0] * self.num_query_relations + both[:, 1]
        # Deduplicate (key, answer) pairs, then sort by key so each query's answers are contiguous.
        pair = torch.unique(keys * num_entities + both[:, 2])
        pair_keys = pair // num_entities
        self.answers = pair % num_entities  # (nnz,) answer entity ids, grouped by query key
        self.query_keys, counts = torch.unique_consecutive(pair_keys, return_counts=True)
        self.offsets = torch.zeros(len(counts) + 1, dtype=torch.long)
        self.offsets[1:] = torch.cumsum(counts, dim=0)

    def __len__(self) -> int:
        """Number of distinct queries with at least one answer."""
        return len(self.query_keys)

    @property
    def num_facts(self) -> int:
        """Number of distinct (query, answer) pairs, reciprocals included."""
        return len(self.answers)

    def _keys(self, heads: torch.Tensor, relations: torch.Tensor) -> torch.Tensor:
        return heads.long() * self.num_query_relations + relations.long()

    def lookup(
        self, heads: torch.Tensor, relations: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Answers of a batch of queries as sparse coordinates.

        Args:
            heads: ``(B,)`` head entity ids.
            relations: ``(B,)`` relation ids in ``[0, 2R)``.

        Returns:
            ``(rows, cols)``: two ``(nnz,)`` long tensors; ``cols[i]`` is a known answer of query
            ``rows[i]``. Queries with no known answer contribute nothing.
        """
        keys = self._keys(heads, relations).cpu()
        if len(self.query_keys) == 0:  # an index without facts answers nothing
            empty = torch.zeros(0, dtype=torch.long)
            return empty, empty.clone()
        position = torch.searchsorted(self.query_keys, keys).clamp(
            max=max(len(self.query_keys) - 1, 0)
        )
        found = (
            self.query_keys[position] == keys
            if len(self.query_keys)
            else torch.zeros_like(keys, dtype=torch.bool)
        )
        starts = torch.where(found, self.offsets[position], 0)
        counts = torch.where(found, self.offsets[position + 1] - self.offsets[position], 0)
        rows = torch.repeat_interleave(torch.arange(len(keys)), counts)
        # Offset of each entry inside its query's run: global index minus the run's first index.
        run_starts = torch.repeat_interleave(torch.cumsum(counts, 0) - counts, counts)
        within = torch.arange(int(counts.sum())) - run_starts
        cols = self.answers[torch.repeat_interleave(starts, counts) + within]
        return rows, cols

    def multi_hot(self, heads: torch.Tensor, relations: torch.Tensor) -> torch.Tensor:
        """Dense ``(B, E)`` float tensor with 1 at every known answer of each query."""
        rows, cols = self.lookup(heads, relations)
        labels = torch.zeros(len(heads), self.num_entities)
        labels[rows, cols] = 1.0
        return labels

    def neighbours(self, entity: int) -> tuple[torch.Tensor, torch.Tensor]:
        """All ``(relation, neighbour)`` pairs of one entity, over forward and inverse relations.

        Returns:
            ``(relations, entities)``: two ``(d,)`` long tensors.
        """
        low = entity * self.num_query_relations
        high = low + self.num_query_relations
        first = int(torch.searchsorted(self.query_keys, torch.tensor(low)))
        last = int(torch.searchsorted(self.query_keys, torch.tensor(high)))
        counts = self.offsets[first + 1 : last + 1] - self.offsets[first:last]
        relations = torch.repeat_interleave(self.query_keys[first:last] - low, counts)
        entities = self.answers[self.offsets[first] : self.offsets[last]]
        return relations, entities


@dataclass(frozen=True)
class KnowledgeGraph:
    """A multimodal knowledge graph with its splits, as every part of the project sees it.

    Attributes:
        name: dataset name (``"umls"``, ``"FB15k-237-IMG"``, ``"synthetic-…"``).
        entities: raw entity identifiers, index = entity id (``"/m/0abc"``, ``"n01234567"``).
        relations: raw relation identifiers, index = relation id.
        entity_texts: one text per entity (``""`` when the dataset has none).
        relation_texts: one text per relation.
        entity_images: per entity, the image files that passed validation (may be empty).
        train, valid, test: ``(n, 3)`` long tensors of forward ``(head, relation, tail)`` ids.
        candidates: ``(C,)`` long tensor of entity ids that may be ranked as answers.
        source: where the data was read from (a folder or a package resource).
        report: counts gathered while loading (skipped images, dropped triples, …).
    """

    name: str
    entities: tuple[str, ...]
    relations: tuple[str, ...]
    entity_texts: tuple[str, ...]
    relation_texts: tuple[str, ...]
    entity_images: tuple[tuple[Path, ...], ...]
    train: torch.Tensor
    valid: torch.Tensor
    test: torch.Tensor
    candidates: torch.Tensor
    source: str = ""
    report: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        num_entities, num_relations = len(self.entities), len(self.relations)
        for label, column in (
            ("entity_texts", self.entity_texts),
            ("entity_images", self.entity_images),
        ):
            if len(column) != num_entities:
                raise ValueError(
                    f"{self.name}: {label} has {len(column)} rows, expected {num_entities}"
                )
        if len(self.relation_texts) != num_relations:
            raise ValueError(
                f"{self.name}: relation_texts has {len(self.relation_texts)} rows, "
                f"expected {num_relations}"
            )
        for split in ("train", "valid", "test"):
            triples = getattr(self, split)
            if triples.ndim != 2 or triples.shape[1] != 3:
                raise ValueError(f"{self.name}: {split} must be (n, 3), got {tuple(triples.shape)}")
            if len(triples) == 0:
                raise ValueError(f"{self.name}: the {split} split is empty")
            if int(triples[:, [0, 2]].max()) >= num_entities or int(triples.min()) < 0:
                raise ValueError(
                    f"{self.name}: {split} holds an entity id outside [0, {num_entities})"
                )
            if int(triples[:, 1].max()) >= num_relations:
                raise ValueError(
                    f"{self.name}: {split} holds a relation id outside [0, {num_relations})"
                )

    @property
    def num_entities(self) -> int:
        return len(self.entities)

    @property
    def num_relations(self) -> int:
        """Number of forward relations ``R`` (queries use ``2R`` with reciprocals)."""
        return len(self.relations)

    @property
    def candidate_mask(self) -> torch.Tensor:
        """``(E,)`` bool tensor, true for entities that may be ranked as answers."""
        mask = torch.zeros(self.num_entities, dtype=torch.bool)
        mask[self.candidates] = True
        return mask

    def split(self, name: str) -> torch.Tensor:
        """The ``(n, 3)`` triples of ``"train"``, ``"valid"`` or ``"test"``."""
        if name not in ("train", "valid", "test"):
            raise ValueError(f"unknown split {name!r}; expected one of train, valid, test")
        return getattr(self, name)

    def queries(self, name: str) -> torch.Tensor:
        """Both-direction queries of a split: ``(2n, 3)`` rows ``(head, relation in [0, 2R), answer)``."""
        return with_reciprocals(self.split(name), self.num_relations)

    def train_answers(self) -> AnswerIndex:
        """Answer index over training triples only: labels and subgraph structure."""
        return _cached(
            self,
            "train_answers",
            lambda: AnswerIndex(self.train, self.num_entities, self.num_relations),
        )

    def all_answers(self) -> AnswerIndex:
        """Answer index over train + valid + test: for filtered evaluation only."""
        return _cached(
            self,
            "all_answers",
            lambda: AnswerIndex(
                torch.cat([self.train, self.valid, self.test]),
                self.num_entities,
                self.num_relations,
            ),
        )

    def with_anonymous_entity_text(self) -> KnowledgeGraph:
        """The same graph with every entity's text replaced by an opaque id string (``e0042``).

        Real graphs often name entities by ids that carry no meaning (Freebase mids, anonymised
        data, benchmarks built from ids); with this text a model can only learn from the graph's
        structure (and images, which are kept). Every entity gets a text, so text coverage is
        unchanged or complete; the content hash, and so every feature cache key, differs from the
        original graph's. Relation texts are kept: the model reads entity texts only.
        """
        width = len(str(max(self.num_entities - 1, 0)))
        return dataclasses.replace(
            self,
            name=f"{self.name}-anonymous",
            entity_texts=tuple(f"e{index:0{width}d}" for index in range(self.num_entities)),
            report={**self.report, "entity_text": "anonymous"},
        )

    def content_hash(self) -> str:
        """A stable hash of everything that defines the data: ids, splits, texts and image files.

        Image files are hashed by path, size and modification time, not content, so hashing a large
        image folder stays cheap; a changed image file changes the hash.
        """
        return _cached(self, "content_hash", self._compute_content_hash)

    def _compute_content_hash(self) -> str:
        digest = hashlib.sha256()
        for column in (self.entities, self.relations, self.entity_texts, self.relation_texts):
            digest.update("\x1f".join(column).encode())
            digest.update(b"\x1e")
        for split in (self.train, self.valid, self.test, self.candidates):
            digest.update(split.numpy().tobytes())
        for images in self.entity_images:
            for path in images:
                try:
                    stat = path.stat()
                    digest.update(f"{path}|{stat.st_size}|{stat.st_mtime_ns}".encode())
                except OSError:
                    digest.update(f"{path}|missing".encode())
            digest.update(b"\x1d")
        return digest.hexdigest()[:16]

    def summary(self) -> dict:
        """Counts for logs and ``diffcom data check``."""
        with_images = sum(1 for images in self.entity_images if images)
        with_text = sum(1 for text in self.entity_texts if text.strip())
        return {
            "name": self.name,
            "entities": self.num_entities,
            "relations": self.num_relations,
            "train": len(self.train),
            "valid": len(self.valid),
            "test": len(self.test),
            "candidates": len(self.candidates),
            "entities_with_images": with_images,
            "images": sum(len(images) for images in self.entity_images),
            "entities_with_text": with_text,
        }


def _cached(graph: KnowledgeGraph, key: str, build):
    """Memoise derived objects on a frozen dataclass without making them fields."""
    cache = graph.__dict__.setdefault("_derived", {})
    if key not in cache:
        cache[key] = build()
    return cache[key]
