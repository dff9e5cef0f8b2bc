"""The structure branch: training-only subgraphs (no leakage), the MGAT encoder, the λ fusion."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from core.config import StructureConfig
from core.data.builtin import load_builtin
from core.model.structure import AdaptiveFusion, MGATEncoder, Subgraph, SubgraphSampler

# ------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def umls():
    return load_builtin("umls")


def _rows(subgraph: Subgraph, index: int) -> list[tuple[int, int]]:
    """The ``(edge_relation, neighbour)`` pairs of one query, in slot order."""
    valid = subgraph.mask[index]
    assert not valid[valid.sum() :].any(), "real slots must come first"
    return list(
        zip(
            subgraph.edge_relations[index][valid].tolist(),
            subgraph.neighbours[index][valid].tolist(),
            strict=True,
        )
    )


def _tiny_sampler(max_nodes: int = 8, selection: str = "relation") -> SubgraphSampler:
    # R = 3 (reciprocals 3, 4, 5). Entity 0: (0,0,1) (0,1,2) (0,2,3) (0,0,4), and (5,1,0) seen from
    # 0 as (0, 1 + 3, 5).
    triples = torch.tensor([[0, 0, 1], [0, 1, 2], [0, 2, 3], [0, 0, 4], [5, 1, 0]])
    return SubgraphSampler(triples, 6, 3, max_nodes=max_nodes, selection=selection)


# ------------------------------------------------------------------------------------- sampler


def test_tiny_graph_neighbours_exactly():
    sampler = _tiny_sampler()
    heads = torch.tensor([0, 0, 0, 1, 5, 3])
    relations = torch.tensor([0, 1, 4, 3, 1, 0])
    subgraph = sampler.sample(heads, relations)
    assert subgraph.neighbours.shape == subgraph.edge_relations.shape == (6, 8)
    assert subgraph.mask.dtype == torch.bool
    assert subgraph.neighbours.dtype == subgraph.edge_relations.dtype == torch.long
    # (0, 0, ?): both relation-0 edges (answers 1 and 4) are hidden.
    assert set(_rows(subgraph, 0)) == {(1, 2), (2, 3), (4, 5)}
    # (0, 1, ?): the relation-1 edge to 2 is hidden; the reciprocal edge (0, 4, 5) is a different fact.
    assert set(_rows(subgraph, 1)) == {(0, 1), (0, 4), (2, 3), (4, 5)}
    # (0, 1⁻¹, ?) = (?, 1, 0): the answer 5 is hidden.
    assert set(_rows(subgraph, 2)) == {(0, 1), (0, 4), (1, 2), (2, 3)}
    # (1, 0⁻¹, ?): entity 1's only edge is the reciprocal of (0, 0, 1): empty subgraph.
    assert _rows(subgraph, 3) == []
    # (5, 1, ?): its only edge is of the query relation.
    assert _rows(subgraph, 4) == []
    # (3, 0, ?): entity 3 has only (3, 2⁻¹ = 5, 0).
    assert _rows(subgraph, 5) == [(5, 0)]


def test_max_nodes_cuts_and_pads():
    sampler = _tiny_sampler(max_nodes=2)
    subgraph = sampler.sample(torch.tensor([0, 1]), torch.tensor([1, 3]))
    assert subgraph.mask.tolist() == [[True, True], [False, False]]
    assert subgraph.neighbours[1].tolist() == [0, 0]  # padding is a safe index


def _correlated_graph() -> torch.Tensor:
    # Relations 2 and 3 co-occur on heads 0, 1, 2, 3; relation 0 is on heads 0, 4, 5 only.
    return torch.tensor(
        [
            [0, 0, 6],
            [0, 3, 7],
            [0, 2, 8],
            [1, 2, 9],
            [1, 3, 9],
            [2, 2, 8],
            [2, 3, 6],
            [3, 2, 7],
            [3, 3, 8],
            [4, 0, 9],
            [5, 0, 7],
        ]
    )


def test_relation_selection_prefers_correlated_relations():
    triples = _correlated_graph()
    sampler = SubgraphSampler(triples, 10, 4, max_nodes=1, selection="relation")
    subgraph = sampler.sample(torch.tensor([0]), torch.tensor([2]))
    # Relation 0 has the smaller id, but relation 3 co-occurs with the query relation 2.
    assert _rows(subgraph, 0) == [(3, 7)]
    wide = SubgraphSampler(triples, 10, 4, max_nodes=4, selection="relation")
    assert _rows(wide.sample(torch.tensor([0]), torch.tensor([2])), 0) == [(3, 7), (0, 6)]


def test_relation_selection_breaks_ties_by_id():
    # Entity 0 has five relation-1 edges; all tie, so the smallest neighbour ids win.
    triples = torch.tensor([[0, 1, t] for t in (9, 3, 7, 5, 2)] + [[0, 0, 4]])
    sampler = SubgraphSampler(triples, 10, 2, max_nodes=3, selection="relation")
    assert _rows(sampler.sample(torch.tensor([0]), torch.tensor([0])), 0) == [
        (1, 2),
        (1, 3),
        (1, 5),
    ]


def test_random_selection_is_seeded_and_uniform_per_key():
    triples = torch.tensor([[0, t % 3, t] for t in range(1, 61)])
    heads, relations = torch.tensor([0, 0, 0]), torch.tensor([0, 1, 3])

    def picks(seed: int) -> Subgraph:
        sampler = SubgraphSampler(triples, 61, 3, max_nodes=5, selection="random", seed=seed)
        return sampler.sample(heads, relations)

    first, again = picks(1), picks(1)
    assert torch.equal(first.neighbours, again.neighbours)
    assert torch.equal(first.edge_relations, again.edge_relations)
    assert first.mask.all()
    for index, relation in enumerate(relations.tolist()):
        for edge_relation, neighbour in _rows(first, index):
            assert edge_relation != relation
            assert edge_relation == neighbour % 3
    # Another relation of the same head gets another order; another seed another sample.
    assert set(first.neighbours[0].tolist()) != set(first.neighbours[2].tolist())
    others = [picks(seed).neighbours for seed in (2, 3, 4)]
    assert any(not torch.equal(first.neighbours, other) for other in others)


def test_random_selection_is_uniform_over_allowed_edges():
    # Head 0: eight relation-1 edges (allowed) and four relation-0 edges (hidden for (0, 0, ?)).
    triples = torch.tensor([[0, 1, t] for t in range(1, 9)] + [[0, 0, t] for t in range(9, 13)])
    counts = torch.zeros(13)
    seeds = 400
    for seed in range(seeds):
        sampler = SubgraphSampler(triples, 13, 2, max_nodes=2, selection="random", seed=seed)
        subgraph = sampler.sample(torch.tensor([0]), torch.tensor([0]))
        assert subgraph.mask.all()
        neighbours = subgraph.neighbours[0]
        assert neighbours[0] != neighbours[1]
        counts[neighbours] += 1
    assert counts[9:].sum() == 0
    expected = seeds * 2 / 8  # 100 picks each; binomial standard deviation ≈ 9
    assert (counts[1:9] - expected).abs().max() < 40


def test_cache_computes_each_key_once(monkeypatch):
    sampler = _tiny_sampler()
    heads, relations = torch.tensor([0, 0, 3, 0]), torch.tensor([0, 1, 0, 0])
    first = sampler.sample(heads, relations)
    assert sampler.num_computed == 3 and len(sampler) == 3  # duplicates share one key

    def fail(*args, **kwargs):
        raise AssertionError("a cached key was recomputed")

    monkeypatch.setattr(sampler, "_fill", fail)
    second = sampler.sample(heads, relations)
    for name in ("neighbours", "edge_relations", "mask"):
        assert torch.equal(getattr(first, name), getattr(second, name))
    monkeypatch.undo()
    sampler.sample(torch.tensor([0, 5]), torch.tensor([0, 1]))
    assert sampler.num_computed == 4


def test_cached_and_fresh_results_agree_in_any_batch_order(umls):
    queries = umls.queries("train")[::7]
    cached = SubgraphSampler.from_graph(umls, StructureConfig(max_nodes=16))
    cached.sample(queries[:, 0], queries[:, 1])
    permutation = torch.randperm(len(queries), generator=torch.Generator().manual_seed(0))
    shuffled = queries[permutation]
    fresh = SubgraphSampler.from_graph(umls, StructureConfig(max_nodes=16))
    expected = fresh.sample(shuffled[:, 0], shuffled[:, 1])
    got = cached.sample(shuffled[:, 0], shuffled[:, 1])
    for name in ("neighbours", "edge_relations", "mask"):
        assert torch.equal(getattr(expected, name), getattr(got, name))


def test_bad_input_is_rejected():
    with pytest.raises(NotImplementedError, match="structure.hops"):
        SubgraphSampler(torch.tensor([[0, 0, 1]]), 2, 1, max_nodes=4, hops=2)
    with pytest.raises(ValueError, match="neighbour_selection"):
        SubgraphSampler(torch.tensor([[0, 0, 1]]), 2, 1, max_nodes=4, selection="degree")
    sampler = _tiny_sampler()
    with pytest.raises(ValueError, match="relations"):
        sampler.sample(torch.tensor([0]), torch.tensor([6]))
    with pytest.raises(ValueError, match="entities"):
        sampler.sample(torch.tensor([6]), torch.tensor([0]))


# ------------------------------------------------------------------------------------- leakage


@pytest.mark.parametrize("selection", ["relation", "random"])
def test_no_leakage_valid_and_test_queries(umls, selection):
    """Every sampled edge is a training fact and never one of the query's own relation."""
    config = StructureConfig(max_nodes=64, neighbour_selection=selection)
    sampler = SubgraphSampler.from_graph(umls, config, seed=3)
    num_query_relations = 2 * umls.num_relations

    def codes(heads, relations, tails):
        return (heads * num_query_relations + relations) * umls.num_entities + tails

    train = umls.queries("train")  # training facts, forward and reciprocal
    train_codes = codes(train[:, 0], train[:, 1], train[:, 2])
    # Sanity: some valid/test facts are not training facts, so the check below can fail.
    held_out = torch.cat([umls.queries("valid"), umls.queries("test")])
    assert not torch.isin(codes(held_out[:, 0], held_out[:, 1], held_out[:, 2]), train_codes).all()

    for split in ("valid", "test", "train"):
        queries = umls.queries(split)
        subgraph = sampler.sample(queries[:, 0], queries[:, 1])
        query, slot = subgraph.mask.nonzero(as_tuple=True)
        heads, relations = queries[query, 0], subgraph.edge_relations[query, slot]
        sampled = codes(heads, relations, subgraph.neighbours[query, slot])
        assert len(sampled) > 0
        assert torch.isin(sampled, train_codes).all(), (
            f"{split}: a sampled edge is not a training fact"
        )
        assert not (relations == queries[query, 1]).any(), f"{split}: an edge of the query relation"


def test_sampler_ignores_valid_and_test(umls):
    """The same train with other valid/test splits gives the same subgraphs."""
    swapped = dataclasses.replace(umls, valid=umls.test, test=umls.valid[:5])
    config = StructureConfig(max_nodes=8)
    queries = torch.cat([umls.queries("valid"), umls.queries("test")])
    first = SubgraphSampler.from_graph(umls, config).sample(queries[:, 0], queries[:, 1])
    second = SubgraphSampler.from_graph(swapped, config).sample(queries[:, 0], queries[:, 1])
    assert torch.equal(first.neighbours, second.neighbours)
    assert torch.equal(first.edge_relations, second.edge_relations)


def test_large_budget_returns_all_training_edges_but_the_query_relation(umls):
    answers = umls.train_answers()
    max_degree = max(len(answers.neighbours(entity)[0]) for entity in range(umls.num_entities))
    sampler = SubgraphSampler.from_graph(umls, StructureConfig(max_nodes=max_degree))
    queries = umls.queries("test")[:40]
    subgraph = sampler.sample(queries[:, 0], queries[:, 1])
    for index, (head, relation, _) in enumerate(queries.tolist()):
        edge_relations, neighbours = answers.neighbours(head)
        expected = {
            (r, n)
            for r, n in zip(edge_relations.tolist(), neighbours.tolist(), strict=True)
            if r != relation
        }
        assert set(_rows(subgraph, index)) == expected
        assert len(_rows(subgraph, index)) == len(expected)


# ---------------------------------------------------------------------------------------- MGAT


def _mgat_inputs(batch: int = 4, slots: int = 5, dim: int = 12, num_relations: int = 3):
    generator = torch.Generator().manual_seed(0)
    mask = torch.ones(batch, slots, dtype=torch.bool)
    mask[1, 2:] = False
    mask[2] = False  # a query without neighbours
    return {
        "mask_state": torch.randn(batch, dim, generator=generator, requires_grad=True),
        "head_state": torch.randn(batch, dim, generator=generator, requires_grad=True),
        "neighbour_states": torch.randn(batch, slots, dim, generator=generator, requires_grad=True),
        "edge_relations": torch.randint(2 * num_relations, (batch, slots), generator=generator),
        "query_relations": torch.randint(2 * num_relations, (batch,), generator=generator),
        "mask": mask,
    }


@pytest.mark.parametrize("conv", ["gat", "gatv2"])
def test_mgat_shapes_and_gradients(conv):
    torch.manual_seed(0)
    encoder = MGATEncoder(12, 3, conv=conv, heads=3, layers=2)
    inputs = _mgat_inputs()
    output = encoder(**inputs)
    assert output.shape == (4, 12)
    assert torch.isfinite(output).all()
    output.square().sum().backward()
    for name in ("mask_state", "head_state", "neighbour_states"):
        gradient = inputs[name].grad
        assert gradient is not None and gradient.abs().sum() > 0, name
    # Padded neighbour slots get no gradient.
    assert inputs["neighbour_states"].grad[~inputs["mask"]].abs().sum() == 0
    assert encoder.relation_embedding.weight.grad.abs().sum() > 0
    assert encoder.role_embedding.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("conv", ["gat", "gatv2"])
@pytest.mark.parametrize("layers", [1, 2, 3])
def test_last_layer_over_mask_edges_only_gives_the_same_mask_states(conv, layers):
    torch.manual_seed(1)
    encoder = MGATEncoder(12, 3, conv=conv, heads=2, layers=layers).eval()
    inputs = _mgat_inputs()
    pruned = encoder(**inputs)
    encoder.last_layer_into_mask_only = False
    torch.testing.assert_close(pruned, encoder(**inputs))


def test_mgat_ignores_padded_slots_and_handles_empty_subgraphs():
    torch.manual_seed(0)
    encoder = MGATEncoder(12, 3).eval()
    inputs = _mgat_inputs()
    output = encoder(**inputs)
    changed = dict(inputs)
    changed["neighbour_states"] = inputs["neighbour_states"].detach().clone()
    changed["neighbour_states"][~inputs["mask"]] = 1e6
    changed["edge_relations"] = inputs["edge_relations"].masked_fill(~inputs["mask"], 5)
    torch.testing.assert_close(encoder(**changed), output)
    empty = dict(inputs, mask=torch.zeros(4, 5, dtype=torch.bool))
    assert torch.isfinite(encoder(**empty)).all()
    # Each query's output depends on its own inputs only.
    single = {name: value[:1] for name, value in inputs.items()}
    torch.testing.assert_close(encoder(**single), output[:1])


def test_mgat_rejects_bad_shapes_and_names():
    with pytest.raises(ValueError, match="structure.conv"):
        MGATEncoder(8, 2, conv="gcn")
    encoder = MGATEncoder(12, 3)
    inputs = _mgat_inputs()
    inputs["mask"] = inputs["mask"][:, :3]
    with pytest.raises(ValueError, match="neighbour_states"):
        encoder(**inputs)


def test_sampler_feeds_mgat(umls):
    config = StructureConfig(max_nodes=8, layers=1)
    sampler = SubgraphSampler.from_graph(umls, config)
    queries = umls.queries("valid")[:16]
    subgraph = sampler.sample(queries[:, 0], queries[:, 1])
    entities = torch.nn.Embedding(umls.num_entities, 16)
    encoder = MGATEncoder.from_config(config, 16, umls.num_relations)
    output = encoder(
        torch.randn(16, 16),
        entities(queries[:, 0]),
        entities(subgraph.neighbours),
        subgraph.edge_relations,
        queries[:, 1],
        subgraph.mask,
    )
    assert output.shape == (16, 16) and torch.isfinite(output).all()


# -------------------------------------------------------------------------------------- fusion


@pytest.mark.parametrize("mode", ["learned-scalar", "learned-vector"])
@pytest.mark.parametrize("start", [0.5, 0.2, 0.9])
def test_learned_lambda_starts_at_lambda_fusion(mode, start):
    fusion = AdaptiveFusion(6, mode=mode, lambda_fusion=start)
    assert fusion.current_lambda() == pytest.approx(start, abs=1e-6)
    gate = fusion.gate()
    assert gate.shape == (() if mode == "learned-scalar" else (6,))


def test_fixed_fusion_has_no_parameters_and_averages():
    fusion = AdaptiveFusion(6, mode="fixed", lambda_fusion=0.5)
    assert list(fusion.parameters()) == []
    mask_state, structure_state = torch.randn(3, 6), torch.randn(3, 6)
    assert torch.equal(
        fusion(mask_state, structure_state), 0.5 * mask_state + 0.5 * structure_state
    )
    assert fusion.current_lambda() == 0.5


@pytest.mark.parametrize("mode", ["learned-scalar", "learned-vector"])
def test_learned_lambda_moves_under_a_gradient_step(mode):
    fusion = AdaptiveFusion(6, mode=mode, lambda_fusion=0.5)
    mask_state, structure_state = torch.ones(3, 6), torch.zeros(3, 6)
    optimizer = torch.optim.SGD(fusion.parameters(), lr=1.0)
    # Pull Z' towards H_mask: λ must grow.
    loss = (fusion(mask_state, structure_state) - mask_state).square().mean()
    loss.backward()
    optimizer.step()
    assert fusion.current_lambda() > 0.5


def test_fusion_edges_and_errors():
    # λ at the ends of [0, 1] cannot be a sigmoid: the learned gate starts ε inside.
    assert AdaptiveFusion(4, lambda_fusion=0.0).current_lambda() == pytest.approx(1e-3)
    assert AdaptiveFusion(4, lambda_fusion=1.0).current_lambda() == pytest.approx(1 - 1e-3)
    with pytest.raises(ValueError, match="structure.fusion"):
        AdaptiveFusion(4, mode="gated")
    with pytest.raises(ValueError, match="lambda_fusion"):
        AdaptiveFusion(4, lambda_fusion=1.5)
    fusion = AdaptiveFusion.from_config(StructureConfig(fusion="learned-vector"), 4)
    assert fusion.gate().shape == (4,)
