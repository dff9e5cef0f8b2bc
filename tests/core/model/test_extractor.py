"""Structure-MKGformer at smoke size: modalities, entities without images, MGAT on and off."""

import pytest
import torch

from core.config import ModelConfig, StructureConfig
from core.data.builtin import load_builtin
from core.model.extractor import StructureMKGformer
from core.model.structure import SubgraphSampler

GRAPH = load_builtin("nations")
E, R = GRAPH.num_entities, GRAPH.num_relations


def _extractor(use_text=True, use_image=True, encoder="mgat", text_dim=6, image_dim=10):
    torch.manual_seed(0)
    image_mask = torch.arange(E) % 3 != 0  # a third of the entities have no image
    model = ModelConfig(
        hidden_dim=16,
        num_heads=2,
        num_layers=2,
        fusion_layers=1,
        dropout=0.0,
        use_text=use_text,
        use_image=use_image,
    )
    structure = StructureConfig(encoder=encoder, max_nodes=4)
    sampler = SubgraphSampler(GRAPH.train, E, R, max_nodes=4) if encoder == "mgat" else None
    return StructureMKGformer(
        E,
        R,
        torch.randn(E, text_dim),
        torch.ones(E, dtype=torch.bool),
        torch.randn(E, image_dim) * image_mask.unsqueeze(1),
        image_mask,
        model,
        structure,
        sampler,
    )


@pytest.mark.parametrize("encoder", ["mgat", "none"])
@pytest.mark.parametrize(("use_text", "use_image"), [(True, True), (True, False), (False, True)])
def test_forward_shapes_and_gradients(encoder, use_text, use_image):
    extractor = _extractor(use_text, use_image, encoder)
    heads, relations = torch.tensor([0, 1, 3, 6]), torch.tensor([0, 5, R + 2, 2 * R - 1])
    output = extractor(heads, relations)
    assert output.scores.shape == (4, E)
    assert output.condition.shape == output.visual.shape == (4, 16)
    assert torch.isfinite(output.scores).all()
    output.scores.sum().backward()
    assert extractor.entity_embedding.weight.grad.abs().sum() > 0
    assert (extractor.text_projection is not None) == use_text
    assert (extractor.image_projection is not None) == use_image
    if use_image:
        assert extractor.image_projection.weight.grad.abs().sum() > 0
    assert (extractor.fusion_lambda() is not None) == (encoder == "mgat")


def test_entities_without_images_get_no_visual_signal():
    extractor = _extractor()
    no_image, with_image = torch.tensor([0, 3]), torch.tensor([1, 2])
    assert extractor._visual_tokens(no_image).abs().sum() == 0
    assert extractor._visual_tokens(with_image).abs().sum() > 0


def test_zero_width_features_disable_a_modality():
    extractor = _extractor(image_dim=0)
    assert extractor.image_projection is None
    assert extractor(torch.tensor([0]), torch.tensor([0])).visual.abs().sum() == 0


def test_frozen_entity_table_gives_the_same_scores():
    extractor = _extractor().eval()
    heads, relations = torch.tensor([0, 1, 3]), torch.tensor([0, 5, R + 2])
    with torch.no_grad():
        fresh = extractor(heads, relations).scores
        extractor.freeze_entity_table(True)
        cached = extractor(heads, relations).scores
        extractor.freeze_entity_table(False)
    assert torch.allclose(fresh, cached, atol=1e-6)
    assert extractor._frozen_table is None


def test_frozen_query_cache_encodes_each_query_once_and_matches():
    extractor = _extractor().eval()
    heads, relations = torch.tensor([0, 1, 3, 1]), torch.tensor([0, 5, R + 2, 5])
    with torch.no_grad():
        fresh = extractor(heads, relations)
        extractor.freeze_entity_table(True)
        calls = []
        encode = extractor._encode

        def counting(h, r, table):
            calls.append(len(h))
            return encode(h, r, table)

        extractor._encode = counting
        extractor.warm_query_cache(heads[:2], relations[:2], batch_size=1)
        first = extractor(heads, relations)  # (3, R+2) is new; the rest come from the cache
        second = extractor(heads, relations)
        extractor.freeze_entity_table(False)
    assert calls == [1, 1, 1]
    for output in (first, second):
        assert torch.allclose(fresh.scores, output.scores, atol=1e-6)
        assert torch.allclose(fresh.condition, output.condition, atol=1e-6)
        assert torch.allclose(fresh.visual, output.visual, atol=1e-6)
    assert extractor._query_cache is None


def test_the_query_cache_is_not_used_in_training_mode():
    extractor = _extractor()
    extractor.freeze_entity_table(True)
    extractor.train()
    extractor(torch.tensor([0]), torch.tensor([0]))
    assert extractor._query_cache.size == 0  # dropout is on: nothing to reuse
