"""The structure branch of DiffusionCom: a training-only subgraph, the MGAT over it, and λ fusion.

Paper §2 items 2–3: extract a local subgraph around the query's ``(head, relation)``, pass messages
over it with a multimodal graph attention network (MGAT) into the ``[MASK]`` node, giving ``Z_mask``,
then fuse ``Z'_mask = λ·H_mask + (1 − λ)·Z_mask``.

Unlike the official code, which links the ``[MASK]`` states of the batch's queries through their
known answers (test answers included at test time, a label leak), the subgraph here comes from
**training triples only** and is fixed once the sampler is built:

* :class:`SubgraphSampler` keeps, per head entity, its training edges (forward and reciprocal) in
  compressed sparse rows. For a query ``(h, r)`` it returns up to ``max_nodes`` one-hop neighbours of
  ``h``, never through an edge of relation ``r`` out of ``h``. In a one-hop star the reciprocal
  ``(t, r⁻¹, h)`` of such an edge is the same fact seen from ``t``, so it is excluded with it. A
  training query therefore cannot copy its own answer from its input, and training and test queries
  see the same kind of subgraph (other known answers of ``(h, r)`` are hidden in both).
* :class:`MGATEncoder` runs relation-aware GAT / GATv2 layers (``torch_geometric``) over one batched
  graph of mask, head and neighbour nodes and returns the mask node's final state ``Z_mask``.
* :class:`AdaptiveFusion` is the λ gate: learned (scalar or per dimension) or fixed (the official
  code's 0.5).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from torch_geometric.nn import GATConv, GATv2Conv

from core.config import StructureConfig
from core.data.graph import KnowledgeGraph, with_reciprocals

__all__ = [
    "CONVOLUTIONS",
    "FUSION_MODES",
    "NEIGHBOUR_SELECTIONS",
    "AdaptiveFusion",
    "MGATEncoder",
    "Subgraph",
    "SubgraphSampler",
]

#: Neighbour ranking rules of :class:`SubgraphSampler`.
NEIGHBOUR_SELECTIONS: tuple[str, ...] = ("relation", "random")

#: Graph attention layers of :class:`MGATEncoder`, by name.
CONVOLUTIONS: dict[str, type[nn.Module]] = {"gat": GATConv, "gatv2": GATv2Conv}

#: Modes of :class:`AdaptiveFusion`.
FUSION_MODES: tuple[str, ...] = ("learned-scalar", "learned-vector", "fixed")

# Flattened (query, edge) candidates handled at once while filling the sampler's cache: bounds the
# memory of one fill (about 40 bytes per candidate) whatever the hub degrees are.
_CHUNK_CANDIDATES = 1 << 22

# Random keys have 31 bits: a product of two stays below 2**62 and a query index times 2**31 fits.
_KEY_BITS = 31


@dataclass(frozen=True)
class Subgraph:
    """One-hop subgraphs of a batch of queries, padded to ``M = max_nodes`` slots.

    Attributes:
        neighbours: ``(B, M)`` long entity ids; ``0`` in padded slots.
        edge_relations: ``(B, M)`` long relation ids in ``[0, 2R)``: the relation of the training
            edge ``(head, relation, neighbour)``; ``0`` in padded slots.
        mask: ``(B, M)`` bool, true for real neighbours. Real slots come first in each row.
    """

    neighbours: torch.Tensor
    edge_relations: torch.Tensor
    mask: torch.Tensor

    def to(self, device: torch.device | str) -> Subgraph:
        """The same subgraph with every tensor on ``device``."""
        return Subgraph(
            self.neighbours.to(device), self.edge_relations.to(device), self.mask.to(device)
        )


class SubgraphSampler:
    """One-hop training subgraphs of ``(head, relation)`` queries, computed once per key and cached.

    The sampler is built once from training triples; valid and test facts never enter it. For a
    query ``(h, r)``, the candidates are the training edges ``(h, e, n)`` with ``e ≠ r`` (forward and
    reciprocal relations, ``e`` in ``[0, 2R)``), ranked by one of :data:`NEIGHBOUR_SELECTIONS`:

    * ``"relation"``: by the Ochiai (cosine) co-occurrence of ``e`` with ``r`` over entities,
      ``C[r, e] / sqrt(C[r, r]·C[e, e])`` (ranked through its exact square) where ``C[a, b]`` counts the training entities that are the
      head of at least one ``a`` edge and one ``b`` edge. Ties go to the smaller relation id, then
      the smaller neighbour id.
    * ``"random"``: a uniform sample without replacement, a fixed function of ``(seed, h, r)``: the
      head's edges are put in a seeded random order once, and each relation reads them from its own
      seeded start, so one ``(h, r)`` always gets the same sample and another relation another.

    The first ``max_nodes`` candidates are kept. Results are cached: a dense table maps each key
    ``h·2R + r`` to a row of append-only padded buffers (``4·E·2R`` bytes for the table), so a key
    seen before costs one gather. Uncached keys of a batch are filled together with vectorised
    tensor ops in a few large chunks, never a Python loop per query or per neighbour.
    """

    def __init__(
        self,
        triples: torch.Tensor,
        num_entities: int,
        num_relations: int,
        max_nodes: int,
        selection: str = "relation",
        seed: int = 0,
        hops: int = 1,
    ) -> None:
        """Index the training edges.

        Args:
            triples: ``(n, 3)`` long tensor of forward **training** ``(head, relation, tail)``.
            num_entities: number of entities ``E``.
            num_relations: number of forward relations ``R``; queries use ``[0, 2R)``.
            max_nodes: ``M``, neighbours kept per query.
            selection: one of :data:`NEIGHBOUR_SELECTIONS`.
            seed: seed of the ``"random"`` selection (unused by ``"relation"``).
            hops: subgraph radius; only ``1`` is implemented.

        Raises:
            NotImplementedError: ``hops > 1``.
            ValueError: a bad shape, id, ``max_nodes`` or ``selection``.
        """
        if hops != 1:
            raise NotImplementedError(
                f"structure.hops={hops}: only one-hop subgraphs are implemented; use structure.hops=1"
            )
        if selection not in NEIGHBOUR_SELECTIONS:
            raise ValueError(
                f"structure.neighbour_selection: {selection!r} is not valid; "
                f"choose one of {', '.join(NEIGHBOUR_SELECTIONS)}"
            )
        if max_nodes < 1:
            raise ValueError(f"structure.max_nodes must be at least 1, got {max_nodes}")
        triples = torch.as_tensor(triples).long().cpu()
        if triples.ndim != 2 or triples.shape[1] != 3:
            raise ValueError(f"triples must be (n, 3), got {tuple(triples.shape)}")
        if len(triples) == 0:
            raise ValueError("SubgraphSampler needs at least one training triple")
        if (
            int(triples.min()) < 0
            or int(triples[:, [0, 2]].max()) >= num_entities
            or int(triples[:, 1].max()) >= num_relations
        ):
            raise ValueError(
                f"triples hold ids outside {num_entities} entities and {num_relations} relations"
            )
        self.num_entities = num_entities
        self.num_relations = num_relations
        self.num_query_relations = 2 * num_relations
        self.max_nodes = max_nodes
        self.selection = selection
        self.seed = seed
        self.hops = hops

        # CSR of unique training edges (head, relation, neighbour), sorted in that order.
        both = with_reciprocals(triples, num_relations)
        codes = torch.unique(
            (both[:, 0] * self.num_query_relations + both[:, 1]) * num_entities + both[:, 2]
        )
        edge_heads = codes // (self.num_query_relations * num_entities)
        self._edge_relations = (codes // num_entities) % self.num_query_relations  # (n_edges,)
        self._edge_neighbours = codes % num_entities  # (n_edges,)
        self._offsets = _offsets(edge_heads, num_entities)  # (E + 1,) head -> edges
        # Groups: the edges of one (head, relation) key, contiguous in the CSR.
        self._group_keys, group_sizes = torch.unique_consecutive(
            codes // num_entities, return_counts=True
        )  # (G,) sorted keys h·2R + e
        self._group_sizes = group_sizes  # (G,)
        self._group_starts = torch.cumsum(group_sizes, 0) - group_sizes  # (G,) first edge
        self._head_groups = _offsets(
            self._group_keys // self.num_query_relations, num_entities
        )  # (E + 1,) head -> groups

        if selection == "relation":
            scores = _cooccurrence_scores(
                edge_heads, self._edge_relations, num_entities, self.num_query_relations
            )
            # (2R, 2R) rank of edge relation e for query relation r: by score, then by id.
            order = torch.sort(scores, dim=1, descending=True, stable=True).indices
            self._relation_rank = torch.empty_like(order)
            self._relation_rank.scatter_(
                1, order, torch.arange(self.num_query_relations).expand_as(order).contiguous()
            )
        else:
            generator = torch.Generator().manual_seed(seed)
            high = 1 << _KEY_BITS
            # A uniform random permutation of each head's edges (CSR positions), ...
            edge_keys = torch.randint(high, (len(codes),), generator=generator)
            self._shuffled = torch.sort(edge_heads * high + edge_keys).indices  # (n_edges,)
            # ... read from a start that is a seeded hash of (head, relation).
            self._head_keys = torch.randint(high, (num_entities,), generator=generator)
            self._relation_xor = torch.randint(
                high, (self.num_query_relations,), generator=generator
            )
            self._relation_multiplier = (
                torch.randint(high, (self.num_query_relations,), generator=generator) | 1
            )

        # Cache: key -> row of the buffers (-1: not computed yet); buffers grow by doubling.
        self._row_of_key = torch.full(
            (num_entities * self.num_query_relations,), -1, dtype=torch.int32
        )
        self._stored = 0
        self._neighbours = torch.zeros(0, max_nodes, dtype=torch.int32)
        self._relations = torch.zeros(0, max_nodes, dtype=torch.int32)
        self._counts = torch.zeros(0, dtype=torch.int32)
        #: Number of distinct ``(head, relation)`` keys computed so far (each exactly once).
        self.num_computed = 0

    @classmethod
    def from_graph(
        cls, graph: KnowledgeGraph, config: StructureConfig, seed: int = 0
    ) -> SubgraphSampler:
        """A sampler over ``graph.train`` only, configured by ``config``."""
        return cls(
            graph.train,
            graph.num_entities,
            graph.num_relations,
            max_nodes=config.max_nodes,
            selection=config.neighbour_selection,
            seed=seed,
            hops=config.hops,
        )

    @property
    def num_edges(self) -> int:
        """Distinct training edges, reciprocals included."""
        return len(self._edge_neighbours)

    def __len__(self) -> int:
        """Number of cached ``(head, relation)`` keys."""
        return self._stored

    def sample(self, heads: torch.Tensor, relations: torch.Tensor) -> Subgraph:
        """The subgraphs of a batch of queries ``(heads[i], relations[i], ?)``.

        Args:
            heads: ``(B,)`` head entity ids in ``[0, E)``.
            relations: ``(B,)`` query relation ids in ``[0, 2R)``.

        Returns:
            A :class:`Subgraph` with ``(B, M)`` tensors on the device of ``heads``.
        """
        if heads.ndim != 1 or heads.shape != relations.shape:
            raise ValueError(
                f"heads and relations must be (B,) of equal length, got {tuple(heads.shape)} "
                f"and {tuple(relations.shape)}"
            )
        device = heads.device
        heads = heads.detach().to("cpu", torch.long)
        relations = relations.detach().to("cpu", torch.long)
        if len(heads) and (
            int(heads.min()) < 0
            or int(heads.max()) >= self.num_entities
            or int(relations.min()) < 0
            or int(relations.max()) >= self.num_query_relations
        ):
            raise ValueError(
                f"query ids outside [0, {self.num_entities}) entities or "
                f"[0, {self.num_query_relations}) relations"
            )
        keys = heads * self.num_query_relations + relations
        rows = self._row_of_key[keys]
        missing = rows < 0
        if bool(missing.any()):
            self._fill(torch.unique(keys[missing]))
            rows = self._row_of_key[keys]
        rows = rows.long()
        mask = torch.arange(self.max_nodes) < self._counts[rows].unsqueeze(1)
        return Subgraph(
            neighbours=self._neighbours[rows].long().to(device),
            edge_relations=self._relations[rows].long().to(device),
            mask=mask.to(device),
        )

    # ----------------------------------------------------------------------------------- filling

    def _fill(self, keys: torch.Tensor) -> None:
        """Compute and store the subgraphs of ``keys`` ``(U,)``, sorted and not cached yet."""
        heads = keys // self.num_query_relations
        relations = keys % self.num_query_relations
        if self.selection == "relation":
            # One candidate per relation group of the head, plus at most M expanded edges.
            costs = self._head_groups[heads + 1] - self._head_groups[heads] + self.max_nodes
        else:
            costs = self._window(heads, relations)[1]
        ends = torch.cumsum(costs, 0)
        start = 0
        while start < len(keys):
            before = int(ends[start - 1]) if start else 0
            stop = int(torch.searchsorted(ends, before + _CHUNK_CANDIDATES, right=True))
            stop = max(stop, start + 1)
            compute = self._ranked if self.selection == "relation" else self._random
            query, position, edge = compute(heads[start:stop], relations[start:stop])
            self._append(keys[start:stop], query, position, edge)
            start = stop

    def _ranked(
        self, heads: torch.Tensor, relations: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The ``"relation"`` selection of ``U`` queries.

        The head's relation groups other than the query relation are ranked by co-occurrence with
        it; whole groups are taken in that order (edges inside a group by neighbour id) until ``M``
        edges are kept. Work is per group, not per edge, so hubs stay cheap.

        Args:
            heads: ``(U,)`` head ids.
            relations: ``(U,)`` query relation ids.

        Returns:
            ``(query, position, edge)``: ``(n,)`` long tensors, slot ``position < M`` of query
            ``query`` holds CSR edge ``edge``.
        """
        first = self._head_groups[heads]
        query, group = _expand(first, self._head_groups[heads + 1] - first)
        edge_relation = self._group_keys[group] % self.num_query_relations
        # The rule: no edge of the query relation out of the head (nor, in a star, its reciprocal).
        allowed = edge_relation != relations[query]
        query, group, edge_relation = query[allowed], group[allowed], edge_relation[allowed]
        rank = self._relation_rank[relations[query], edge_relation]  # distinct within a query
        order = torch.sort(query * self.num_query_relations + rank).indices
        query, group = query[order], group[order]
        sizes = self._group_sizes[group]
        # Edges before each group within its query: exclusive cumulative sum, restarted per query.
        cumulative = torch.cumsum(sizes, 0) - sizes
        per_query = torch.bincount(query, minlength=len(heads))
        query_start = torch.cumsum(per_query, 0) - per_query
        before = cumulative - cumulative[query_start[query]]
        take = (self.max_nodes - before).clamp(min=0).minimum(sizes)
        owner, edge = _expand(self._group_starts[group], take)
        position = before[owner] + (edge - self._group_starts[group][owner])
        return query[owner], position, edge

    def _window(
        self, heads: torch.Tensor, relations: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Start and length of each query's window in its head's shuffled edges (``"random"``).

        A window of ``min(degree, M + c)`` shuffled edges, ``c`` the number of query-relation
        edges, holds ``min(M, degree − c)`` allowed edges: enough to fill the subgraph.

        Returns:
            ``(start, length)``: ``(U,)`` long tensors, ``start < degree`` (0 for isolated heads).
        """
        degrees = self._offsets[heads + 1] - self._offsets[heads]
        keys = heads * self.num_query_relations + relations
        found = torch.searchsorted(self._group_keys, keys).clamp(max=len(self._group_keys) - 1)
        excluded = torch.where(self._group_keys[found] == keys, self._group_sizes[found], 0)
        length = torch.minimum(degrees, excluded + self.max_nodes)
        mixed = (self._head_keys[heads] ^ self._relation_xor[relations]) * (
            self._relation_multiplier[relations]
        ) & ((1 << _KEY_BITS) - 1)
        return mixed % degrees.clamp(min=1), length

    def _random(
        self, heads: torch.Tensor, relations: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The ``"random"`` selection of ``U`` queries: see :meth:`_ranked` for the returns.

        Each head's edges are in a seeded uniform random order; a query reads them cyclically from
        a seeded start that depends on ``(head, relation)``, skips query-relation edges and keeps
        the first ``M``: a uniform sample without replacement of the allowed edges.
        """
        start, length = self._window(heads, relations)
        query, step = _expand(torch.zeros_like(start), length)
        degrees = self._offsets[heads + 1] - self._offsets[heads]
        edge = self._shuffled[
            self._offsets[heads][query] + (start[query] + step) % degrees[query].clamp(min=1)
        ]
        # The rule: no edge of the query relation out of the head (nor, in a star, its reciprocal).
        allowed = self._edge_relations[edge] != relations[query]
        query, edge = query[allowed], edge[allowed]
        per_query = torch.bincount(query, minlength=len(heads))
        position = torch.arange(len(query)) - torch.repeat_interleave(
            torch.cumsum(per_query, 0) - per_query, per_query
        )
        keep = position < self.max_nodes
        return query[keep], position[keep], edge[keep]

    def _append(
        self, keys: torch.Tensor, query: torch.Tensor, position: torch.Tensor, edge: torch.Tensor
    ) -> None:
        """Store the selected edges of ``keys`` ``(U,)`` and point the keys at their rows.

        Args:
            keys: ``(U,)`` query keys ``h·2R + r``.
            query, position, edge: ``(n,)`` slot ``position`` of ``keys[query]`` is CSR ``edge``.
        """
        needed = self._stored + len(keys)
        if needed > len(self._counts):
            capacity = max(needed, 2 * len(self._counts), 1024)
            self._neighbours = _grow(self._neighbours, capacity)
            self._relations = _grow(self._relations, capacity)
            self._counts = _grow(self._counts, capacity)
        rows = query + self._stored
        self._neighbours[rows, position] = self._edge_neighbours[edge].int()
        self._relations[rows, position] = self._edge_relations[edge].int()
        self._counts[self._stored : needed] = torch.bincount(query, minlength=len(keys)).int()
        self._row_of_key[keys] = torch.arange(self._stored, needed, dtype=torch.int32)
        self._stored = needed
        self.num_computed += len(keys)


def _offsets(owners: torch.Tensor, num_owners: int) -> torch.Tensor:
    """``(num_owners + 1,)`` CSR offsets of sorted ``owners`` ``(n,)``."""
    offsets = torch.zeros(num_owners + 1, dtype=torch.long)
    offsets[1:] = torch.cumsum(torch.bincount(owners, minlength=num_owners), 0)
    return offsets


def _expand(starts: torch.Tensor, counts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Ranges ``starts[i] + [0, counts[i])`` flattened.

    Returns:
        ``(owner, value)``: ``(sum(counts),)`` long tensors, ``owner`` the range index ``i``.
    """
    owner = torch.repeat_interleave(torch.arange(len(starts)), counts)
    run_starts = torch.repeat_interleave(torch.cumsum(counts, 0) - counts, counts)
    return owner, starts[owner] + torch.arange(len(owner)) - run_starts


def _grow(buffer: torch.Tensor, capacity: int) -> torch.Tensor:
    """``buffer`` copied into a zero tensor of ``capacity`` rows."""
    grown = buffer.new_zeros((capacity, *buffer.shape[1:]))
    grown[: len(buffer)] = buffer
    return grown


def _cooccurrence_scores(
    heads: torch.Tensor, relations: torch.Tensor, num_entities: int, num_query_relations: int
) -> torch.Tensor:
    """Squared Ochiai co-occurrence of relations over the entities they leave from.

    Args:
        heads: ``(n,)`` head of every training edge (reciprocals included).
        relations: ``(n,)`` relation of every edge, in ``[0, 2R)``.

    Returns:
        ``(2R, 2R)`` float64 tensor ``C[a, b]² / (C[a, a]·C[b, b])``, 0 where a relation is unused;
        ``C = AᵀA`` with ``A (E, 2R)`` the 0/1 incidence "entity is the head of an edge of relation".
        The square ranks like the Ochiai coefficient ``C[a, b] / sqrt(C[a, a]·C[b, b])`` but is one
        correctly rounded division of exact integers, so equal ratios tie exactly on any machine.
    """
    incidence = torch.zeros(num_entities, num_query_relations)
    incidence[heads, relations] = 1.0
    counts = (incidence.T @ incidence).double()  # integer sums, exact in float32 below 2**24
    sizes = counts.diagonal().clone()
    norm = sizes.unsqueeze(0) * sizes.unsqueeze(1)
    return torch.where(norm > 0, counts.square() / norm.clamp(min=1.0), 0.0)


# ---------------------------------------------------------------------------------------- MGAT

_NEIGHBOUR_TO_HEAD, _NEIGHBOUR_TO_MASK, _HEAD_TO_MASK, _SELF_LOOP = range(4)


class MGATEncoder(nn.Module):
    """Relation-aware multimodal graph attention over a batch of one-hop subgraphs.

    One batched graph holds, per query ``b``, a mask node (initialised with ``H_mask``), a head node
    and its valid neighbour nodes. Edges, each with a relation and a role:

    * neighbour → head and neighbour → mask, with the relation of the training edge
      ``(head, relation, neighbour)``;
    * head → mask, with the query relation ``r`` (the mask node stands for the answer of
      ``(head, r, ?)``);
    * a self loop on every node, with the special relation ``2R``.

    An edge's feature is ``relation_embedding[relation] + role_embedding[role]`` (``edge_dim``); it
    enters the attention scores of every layer. A neighbour's node state also gets a projection of
    its relation embedding, so that messages, not only attention weights, know the relation. Each
    layer is ``x ← LayerNorm(x + dropout(GELU(conv(x))))`` with ``heads`` attention heads averaged.
    A query without neighbours still has its head and self-loop edges, so its output is finite.
    """

    def __init__(
        self,
        hidden_dim: int,
        num_relations: int,
        conv: str = "gatv2",
        heads: int = 2,
        layers: int = 2,
        dropout: float = 0.0,
        edge_dim: int | None = None,
    ) -> None:
        """Build the layers.

        Args:
            hidden_dim: ``d``, the width of every node state.
            num_relations: number of forward relations ``R`` (edges use ``[0, 2R)``).
            conv: a key of :data:`CONVOLUTIONS`.
            heads: attention heads per layer (averaged, so ``d`` need not divide by them).
            layers: number of graph attention layers.
            dropout: dropout on attention weights and on each layer's update.
            edge_dim: width of relation embeddings; ``d`` when ``None``.
        """
        super().__init__()
        if conv not in CONVOLUTIONS:
            raise ValueError(
                f"structure.conv: {conv!r} is not valid; choose one of {', '.join(CONVOLUTIONS)}"
            )
        if layers < 1 or heads < 1:
            raise ValueError(
                f"structure.layers and structure.heads must be ≥ 1, got {layers}, {heads}"
            )
        edge_dim = edge_dim or hidden_dim
        self.hidden_dim = hidden_dim
        self.num_relations = num_relations
        self.self_relation = 2 * num_relations
        self.relation_embedding = nn.Embedding(2 * num_relations + 1, edge_dim)
        self.role_embedding = nn.Embedding(4, edge_dim)
        self.relation_to_node = nn.Linear(edge_dim, hidden_dim, bias=False)
        # Entity states come from the extractor's entity table (embeddings initialised at 0.02
        # scale, since the table is also the score head's output layer), while H_mask is
        # layer-normalised and relation embeddings start at unit scale: normalised first, an
        # entity's identity is not drowned by its edge's relation.
        self.entity_norm = nn.LayerNorm(hidden_dim)
        layer = CONVOLUTIONS[conv]
        self.convs = nn.ModuleList(
            layer(
                hidden_dim,
                hidden_dim,
                heads=heads,
                concat=False,
                dropout=dropout,
                add_self_loops=False,
                edge_dim=edge_dim,
            )
            for _ in range(layers)
        )
        self.norms = nn.ModuleList(nn.LayerNorm(hidden_dim) for _ in range(layers))
        self.activation = nn.GELU()
        self.dropout = nn.Dropout(dropout)
        # False runs the last layer over every edge too: the same mask states, slower (tests).
        self.last_layer_into_mask_only = True

    @classmethod
    def from_config(
        cls, config: StructureConfig, hidden_dim: int, num_relations: int, dropout: float = 0.0
    ) -> MGATEncoder:
        """An encoder with ``config.conv``, ``config.heads`` and ``config.layers``."""
        return cls(
            hidden_dim,
            num_relations,
            conv=config.conv,
            heads=config.heads,
            layers=config.layers,
            dropout=dropout,
        )

    def forward(
        self,
        mask_state: torch.Tensor,
        head_state: torch.Tensor,
        neighbour_states: torch.Tensor,
        edge_relations: torch.Tensor,
        query_relations: torch.Tensor,
        mask: torch.Tensor,
    ) -> torch.Tensor:
        """Message passing into the mask nodes.

        Args:
            mask_state: ``(B, d)`` the queries' ``H_mask``.
            head_state: ``(B, d)`` multimodal states of the head entities.
            neighbour_states: ``(B, M, d)`` multimodal states of the subgraph entities (padded
                slots are ignored).
            edge_relations: ``(B, M)`` relation of each neighbour's edge, in ``[0, 2R)``.
            query_relations: ``(B,)`` query relations, in ``[0, 2R)``.
            mask: ``(B, M)`` bool, true for real neighbours.

        Returns:
            ``Z_mask``: ``(B, d)`` final states of the mask nodes.
        """
        batch, dim = mask_state.shape
        if (
            head_state.shape != (batch, dim)
            or neighbour_states.ndim != 3
            or neighbour_states.shape[0] != batch
            or neighbour_states.shape[2] != dim
            or edge_relations.shape != neighbour_states.shape[:2]
            or mask.shape != neighbour_states.shape[:2]
            or query_relations.shape != (batch,)
        ):
            raise ValueError(
                "MGATEncoder expects mask_state, head_state (B, d), neighbour_states (B, M, d), "
                "edge_relations and mask (B, M), query_relations (B,); got "
                f"{tuple(mask_state.shape)}, {tuple(head_state.shape)}, "
                f"{tuple(neighbour_states.shape)}, {tuple(edge_relations.shape)}, "
                f"{tuple(mask.shape)}, {tuple(query_relations.shape)}"
            )
        device = mask_state.device
        query, slot = mask.bool().nonzero(as_tuple=True)  # (N,), (N,) valid neighbour slots
        neighbour_relation = edge_relations[query, slot].long()
        num_neighbours = len(query)
        num_nodes = 2 * batch + num_neighbours
        mask_nodes = torch.arange(batch, device=device)
        head_nodes = mask_nodes + batch
        neighbour_nodes = torch.arange(num_neighbours, device=device) + 2 * batch
        all_nodes = torch.arange(num_nodes, device=device)

        source = torch.cat([neighbour_nodes, neighbour_nodes, head_nodes, all_nodes])
        target = torch.cat([head_nodes[query], mask_nodes[query], mask_nodes, all_nodes])
        relation = torch.cat(
            [
                neighbour_relation,
                neighbour_relation,
                query_relations.long(),
                torch.full((num_nodes,), self.self_relation, device=device),
            ]
        )
        role = torch.cat(
            [
                torch.full((num_neighbours,), _NEIGHBOUR_TO_HEAD, device=device),
                torch.full((num_neighbours,), _NEIGHBOUR_TO_MASK, device=device),
                torch.full((batch,), _HEAD_TO_MASK, device=device),
                torch.full((num_nodes,), _SELF_LOOP, device=device),
            ]
        )
        edge_index = torch.stack([source, target])  # (2, n_edges)
        edge_attr = self.relation_embedding(relation) + self.role_embedding(role)

        neighbours = self.entity_norm(neighbour_states[query, slot]) + self.relation_to_node(
            self.relation_embedding(neighbour_relation)
        )
        x = torch.cat([mask_state, self.entity_norm(head_state), neighbours])  # (2B + N, d)
        # Only the mask nodes' final states are returned, so the last layer needs only the edges
        # into mask nodes (about a third of them): the attention of a node is a softmax over its
        # own incoming edges, so dropping the others leaves the mask states as they were.
        into_mask = target < batch
        last_index, last_attr = edge_index[:, into_mask], edge_attr[into_mask]
        for layer, (conv, norm) in enumerate(zip(self.convs, self.norms, strict=True)):
            if layer == len(self.convs) - 1 and self.last_layer_into_mask_only:
                update = conv(x, last_index, last_attr)
            else:
                update = conv(x, edge_index, edge_attr)
            x = norm(x + self.dropout(self.activation(update)))
        return x[:batch]


# -------------------------------------------------------------------------------------- fusion


class AdaptiveFusion(nn.Module):
    """``Z'_mask = λ·H_mask + (1 − λ)·Z_mask`` (paper §2 item 3).

    Modes (:data:`FUSION_MODES`):

    * ``"learned-scalar"``: ``λ = sigmoid(a)``, one parameter ``a``;
    * ``"learned-vector"``: ``λ = sigmoid(a)``, ``a`` of shape ``(d,)``, one gate per dimension;
    * ``"fixed"``: ``λ = lambda_fusion``, no parameter (the official code averages, λ = 0.5).

    Learned gates start at ``λ = lambda_fusion``: ``a = logit(clamp(lambda_fusion, ε, 1 − ε))`` with
    ``ε = 1e-3``, since a sigmoid never reaches 0 or 1 (and its gradient vanishes near them).
    """

    eps: float = 1e-3

    def __init__(self, dim: int, mode: str = "learned-scalar", lambda_fusion: float = 0.5) -> None:
        """Set the gate.

        Args:
            dim: ``d``, width of ``H_mask`` and ``Z_mask``.
            mode: one of :data:`FUSION_MODES`.
            lambda_fusion: λ in ``[0, 1]``: the fixed value, or the learned gate's start value.
        """
        super().__init__()
        if mode not in FUSION_MODES:
            raise ValueError(
                f"structure.fusion: {mode!r} is not valid; choose one of {', '.join(FUSION_MODES)}"
            )
        if not 0.0 <= lambda_fusion <= 1.0:
            raise ValueError(f"structure.lambda_fusion must be in [0, 1], got {lambda_fusion}")
        self.mode = mode
        self.dim = dim
        self.lambda_fusion = float(lambda_fusion)
        if mode == "fixed":
            self.logit = None
        else:
            start = min(max(self.lambda_fusion, self.eps), 1.0 - self.eps)
            shape = () if mode == "learned-scalar" else (dim,)
            self.logit = nn.Parameter(torch.full(shape, math.log(start / (1.0 - start))))

    @classmethod
    def from_config(cls, config: StructureConfig, dim: int) -> AdaptiveFusion:
        """A gate with ``config.fusion`` and ``config.lambda_fusion``."""
        return cls(dim, mode=config.fusion, lambda_fusion=config.lambda_fusion)

    def gate(self) -> torch.Tensor | float:
        """λ: a float (fixed), a 0-d tensor (learned-scalar) or a ``(d,)`` tensor (learned-vector)."""
        if self.logit is None:
            return self.lambda_fusion
        return torch.sigmoid(self.logit)

    def current_lambda(self) -> float:
        """λ for logging: the gate's value, or its mean over dimensions for ``learned-vector``."""
        gate = self.gate()
        return float(gate) if isinstance(gate, float) else float(gate.detach().mean())

    def forward(self, mask_state: torch.Tensor, structure_state: torch.Tensor) -> torch.Tensor:
        """Fuse.

        Args:
            mask_state: ``(B, d)`` ``H_mask`` from the extractor.
            structure_state: ``(B, d)`` ``Z_mask`` from the structure encoder.

        Returns:
            ``(B, d)`` ``Z'_mask``.
        """
        if mask_state.shape != structure_state.shape:
            raise ValueError(
                f"H_mask {tuple(mask_state.shape)} and Z_mask {tuple(structure_state.shape)} differ"
            )
        gate = self.gate()
        return gate * mask_state + (1 - gate) * structure_state

    def extra_repr(self) -> str:
        return f"dim={self.dim}, mode={self.mode!r}, lambda_fusion={self.lambda_fusion}"
