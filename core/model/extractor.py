"""Structure-MKGformer: the feature extractor that scores every candidate entity (x_0).

A query ``(head, relation, ?)`` becomes a short token sequence::

    [head entity] [relation] [MASK] [head text] | [visual_1] … [visual_m]

The first ``num_layers − fusion_layers`` transformer layers see the textual tokens only; the last
``fusion_layers`` layers also see the head's visual tokens, which is where MKGformer fuses the image
encoder into the text encoder. The hidden state at ``[MASK]`` is H_mask. The MGAT structure encoder
turns the head's training-only subgraph into Z_mask, adaptive fusion gives
Z' = λ·H_mask + (1−λ)·Z_mask, and the score head compares Z' with every entity's multimodal
representation: those scores are x_0, the conditional distribution the diffusion stage refines.

Text and image features are frozen (computed once by ``core.features``) and held as buffers; the
learned parts are the entity and relation embeddings, the projections, the transformer, MGAT and λ.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from core.config import ModelConfig, StructureConfig
from core.model.structure import AdaptiveFusion, MGATEncoder, SubgraphSampler

__all__ = ["ExtractorOutput", "StructureMKGformer"]

_VISUAL_TOKENS = 2  # image features are projected into this many visual tokens


@dataclass
class ExtractorOutput:
    """What one forward pass of the extractor returns.

    Attributes:
        scores: ``(B, E)`` logits over every entity: x_0.
        condition: ``(B, d)`` Z'_mask, the fused query state that conditions the denoiser.
        visual: ``(B, d)`` mean of the head's visual tokens (zeros without images).
    """

    scores: torch.Tensor
    condition: torch.Tensor
    visual: torch.Tensor


class StructureMKGformer(nn.Module):
    """Scores every entity for a batch of ``(head, relation)`` queries.

    Args:
        num_entities: ``E``.
        num_relations: ``R`` forward relations; queries use ``2R`` (reciprocals).
        text_features: ``(E, Dt)`` frozen text features (``Dt`` may be 0).
        text_mask: ``(E,)`` bool, entities that have text.
        image_features: ``(E, Di)`` frozen image features (``Di`` may be 0).
        image_mask: ``(E,)`` bool, entities that have at least one image.
        model: sizes and which modalities are used.
        structure: the structure encoder and fusion settings.
        sampler: the training-only subgraph sampler (required when ``structure.encoder == "mgat"``).
    """

    def __init__(
        self,
        num_entities: int,
        num_relations: int,
        text_features: torch.Tensor,
        text_mask: torch.Tensor,
        image_features: torch.Tensor,
        image_mask: torch.Tensor,
        model: ModelConfig,
        structure: StructureConfig,
        sampler: SubgraphSampler | None = None,
    ) -> None:
        super().__init__()
        width = model.hidden_dim
        self.num_entities = num_entities
        self.use_text = model.use_text and text_features.shape[1] > 0
        self.use_image = model.use_image and image_features.shape[1] > 0
        self.register_buffer("text_features", text_features.float(), persistent=False)
        self.register_buffer("text_mask", text_mask.float().unsqueeze(1), persistent=False)
        self.register_buffer("image_features", image_features.float(), persistent=False)
        self.register_buffer("image_mask", image_mask.float().unsqueeze(1), persistent=False)

        self.entity_embedding = nn.Embedding(num_entities, width)
        self.relation_embedding = nn.Embedding(2 * num_relations, width)
        self.mask_token = nn.Parameter(torch.zeros(width))
        # Token roles: head, relation, mask, text, visual.
        self.role_embedding = nn.Embedding(5, width)
        self.text_projection = nn.Linear(text_features.shape[1], width) if self.use_text else None
        self.image_projection = (
            nn.Linear(image_features.shape[1], width * _VISUAL_TOKENS) if self.use_image else None
        )
        # Every token embedding at the same 0.02 scale (as BERT's word, position and type
        # embeddings): a role embedding at nn.Embedding's default unit scale would dwarf the head
        # and relation embeddings, so the first layer's LayerNorm would see little but the role
        # and learning from the graph's structure would start from almost no signal.
        for embedding in (self.entity_embedding, self.relation_embedding, self.role_embedding):
            nn.init.normal_(embedding.weight, std=0.02)

        def layers(count: int) -> nn.ModuleList:
            return nn.ModuleList(
                nn.TransformerEncoderLayer(
                    width,
                    model.num_heads,
                    dim_feedforward=4 * width,
                    dropout=model.dropout,
                    activation="gelu",
                    batch_first=True,
                    norm_first=True,
                )
                for _ in range(count)
            )

        self.text_layers = layers(model.num_layers - model.fusion_layers)
        self.fusion_layers = layers(model.fusion_layers)
        self.sequence_norm = nn.LayerNorm(width)

        self.structure_encoder = None
        if structure.encoder == "mgat":
            if sampler is None:
                raise ValueError(
                    "structure.encoder=mgat needs a SubgraphSampler built from training triples"
                )
            self.sampler = sampler
            self.structure_encoder = MGATEncoder(
                hidden_dim=width,
                num_relations=num_relations,
                heads=structure.heads,
                layers=structure.layers,
                conv=structure.conv,
                dropout=model.dropout,
            )
            self.fusion = AdaptiveFusion(width, structure.fusion, structure.lambda_fusion)
        self.output_norm = nn.LayerNorm(width)
        self.entity_bias = nn.Parameter(torch.zeros(num_entities))
        self._frozen_table: torch.Tensor | None = None  # see freeze_entity_table
        self._query_cache: _QueryCache | None = None

    # ---------------------------------------------------------------------------------------------

    def _visual_tokens(self, entities: torch.Tensor) -> torch.Tensor:
        """``(..., m, d)`` visual tokens of entities (zero where an entity has no image)."""
        projected = self.image_projection(self.image_features[entities])
        projected = projected * self.image_mask[entities]
        return projected.view(*entities.shape, _VISUAL_TOKENS, -1)

    def entity_representations(self, entities: torch.Tensor | None = None) -> torch.Tensor:
        """Multimodal entity states: embedding + projected text + mean visual token.

        Args:
            entities: ids of any shape ``S``; ``None`` for all entities.

        Returns:
            ``(*S, d)`` (``(E, d)`` for all entities).
        """
        if self._frozen_table is not None:
            return self._frozen_table if entities is None else self._frozen_table[entities]
        if entities is None:
            entities = torch.arange(self.num_entities, device=self.entity_embedding.weight.device)
        states = self.entity_embedding(entities)
        if self.use_text:
            states = (
                states
                + self.text_projection(self.text_features[entities]) * self.text_mask[entities]
            )
        if self.use_image:
            states = states + self._visual_tokens(entities).mean(dim=-2)
        return states

    def freeze_entity_table(self, frozen: bool, *, cache_queries: bool = True) -> None:
        """Reuse what a frozen extractor computes: entity states and per-query encodings.

        Stage 2 with a frozen extractor would otherwise rebuild every entity's state at every step
        (a quarter of a step at 41k entities) and re-encode every ``(head, relation)`` query, the
        transformer and MGAT included, at every epoch and every evaluation. While frozen, the
        ``(E, d)`` entity table is computed once and, in eval mode (no dropout: the encoding of a
        query is then a fixed function of the weights), each query's condition and pooled visual
        token are computed once and kept (``2·d`` floats per distinct query) unless
        ``cache_queries`` is ``False``. Call with ``False`` before the extractor's weights change
        again.
        """
        self._frozen_table = None
        self._query_cache = None
        if frozen:
            with torch.no_grad():
                self._frozen_table = self.entity_representations().detach()
            if cache_queries:
                self._query_cache = _QueryCache(
                    self.num_entities, self.relation_embedding.num_embeddings
                )

    def warm_query_cache(
        self, heads: torch.Tensor, relations: torch.Tensor, batch_size: int
    ) -> None:
        """Encode ``(Q,)`` queries into the frozen cache in a fixed order and fixed batches.

        Filling the cache up front (sorted keys, fixed batches) makes every cached value
        independent of the order training happened to visit queries in, so a resumed run sees
        exactly the values an uninterrupted one does.
        """
        if self._query_cache is None or self.training:
            return
        with torch.no_grad():
            self._query_cache.fill(heads, relations, self._table_encoder(), batch_size)

    def forward(self, heads: torch.Tensor, relations: torch.Tensor) -> ExtractorOutput:
        """Score all entities for ``(B,)`` heads and ``(B,)`` relations in ``[0, 2R)``."""
        # (E, d) every entity's state, built once per call: the score head needs all of them, and
        # the head and its subgraph's neighbours (B·M rows, often more than E) are read from it.
        table = self.entity_representations()
        if self._query_cache is not None and not self.training:
            with torch.no_grad():
                condition, visual = self._query_cache.lookup(
                    heads, relations, self._table_encoder(table)
                )
        else:
            condition, visual = self._encode(heads, relations, table)
        scores = condition @ table.T + self.entity_bias  # (B, E)
        return ExtractorOutput(scores=scores, condition=condition, visual=visual)

    def _table_encoder(self, table: torch.Tensor | None = None):
        """:meth:`_encode` over ``table`` (all entity states; built now when ``None``)."""
        table = self.entity_representations() if table is None else table
        return lambda heads, relations: self._encode(heads, relations, table)

    def _encode(
        self, heads: torch.Tensor, relations: torch.Tensor, table: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(B, d)`` condition Z'_mask and ``(B, d)`` pooled visual token of each query.

        ``table`` is ``(E, d)``, every entity's multimodal state (:meth:`entity_representations`).
        """
        batch = heads.shape[0]
        roles = self.role_embedding.weight
        head_state = table[heads]  # (B, d)
        tokens = [
            self.entity_embedding(heads) + roles[0],
            self.relation_embedding(relations) + roles[1],
            self.mask_token.expand(batch, -1) + roles[2],
        ]
        if self.use_text:
            text = self.text_projection(self.text_features[heads]) * self.text_mask[heads]
            tokens.append(text + roles[3])
        sequence = torch.stack(tokens, dim=1)  # (B, T, d)
        for layer in self.text_layers:
            sequence = layer(sequence)
        if self.use_image:
            visual_tokens = self._visual_tokens(heads)  # (B, m, d)
            visual = visual_tokens.mean(dim=1)
            sequence = torch.cat([sequence, visual_tokens + roles[4]], dim=1)
        else:
            visual = torch.zeros_like(head_state)
        for layer in self.fusion_layers:
            sequence = layer(sequence)
        h_mask = self.sequence_norm(sequence[:, 2])  # (B, d)

        condition = h_mask
        if self.structure_encoder is not None:
            subgraph = self.sampler.sample(heads, relations)
            device = heads.device
            neighbours = subgraph.neighbours.to(device)
            z_mask = self.structure_encoder(
                mask_state=h_mask,
                head_state=head_state,
                neighbour_states=table[neighbours],  # (B, M, d)
                edge_relations=subgraph.edge_relations.to(device),
                query_relations=relations,
                mask=subgraph.mask.to(device),
            )
            condition = self.fusion(h_mask, z_mask)
        return self.output_norm(condition), visual

    def fusion_lambda(self) -> float | None:
        """Current λ (mean over dimensions for a per-dimension gate); ``None`` without MGAT."""
        return None if self.structure_encoder is None else float(self.fusion.current_lambda())


class _QueryCache:
    """Encodings of ``(head, relation)`` queries of a frozen extractor, looked up by key.

    ``slots`` maps ``head · 2R + relation`` to a row of ``condition``/``visual`` (``-1``: not yet
    encoded); rows grow by doubling. Lives on the device of the encodings; ``slots`` on the CPU.
    """

    def __init__(self, num_entities: int, num_query_relations: int) -> None:
        self.num_query_relations = num_query_relations
        self.slots = torch.full((num_entities * num_query_relations,), -1, dtype=torch.int64)
        self.size = 0
        self.condition: torch.Tensor | None = None  # (capacity, d)
        self.visual: torch.Tensor | None = None  # (capacity, d)

    def _keys(self, heads: torch.Tensor, relations: torch.Tensor) -> torch.Tensor:
        return heads.cpu().long() * self.num_query_relations + relations.cpu().long()

    def _store(self, keys: torch.Tensor, condition: torch.Tensor, visual: torch.Tensor) -> None:
        needed = self.size + len(keys)
        if self.condition is None or needed > len(self.condition):
            capacity = max(needed, 2 * (0 if self.condition is None else len(self.condition)), 1024)
            grown_condition = condition.new_empty((capacity, condition.shape[1]))
            grown_visual = visual.new_empty((capacity, visual.shape[1]))
            if self.condition is not None:
                grown_condition[: self.size] = self.condition[: self.size]
                grown_visual[: self.size] = self.visual[: self.size]
            self.condition, self.visual = grown_condition, grown_visual
        self.condition[self.size : needed] = condition
        self.visual[self.size : needed] = visual
        self.slots[keys] = torch.arange(self.size, needed)
        self.size = needed

    def _encode_keys(self, keys: torch.Tensor, encode, device, batch_size: int) -> None:
        for start in range(0, len(keys), batch_size):
            chunk = keys[start : start + batch_size]
            heads = (chunk // self.num_query_relations).to(device)
            relations = (chunk % self.num_query_relations).to(device)
            condition, visual = encode(heads, relations)
            self._store(chunk, condition.detach(), visual.detach())

    def fill(self, heads: torch.Tensor, relations: torch.Tensor, encode, batch_size: int) -> None:
        keys = torch.unique(self._keys(heads, relations))  # sorted
        missing = keys[self.slots[keys] < 0]
        self._encode_keys(missing, encode, heads.device, batch_size)

    def lookup(self, heads: torch.Tensor, relations: torch.Tensor, encode):
        keys = self._keys(heads, relations)
        missing = torch.unique(keys[self.slots[keys] < 0])
        if len(missing):
            self._encode_keys(missing, encode, heads.device, max(len(missing), 1))
        rows = self.slots[keys].to(self.condition.device)
        return self.condition[rows], self.visual[rows]
