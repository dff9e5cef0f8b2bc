"""DiffusionCom wiring: what an untrained denoiser does to the extractor's ranking, and the losses."""

import pytest
import torch

from core.config import load_config
from core.data.builtin import load_builtin
from core.model.diffusioncom import standardise
from core.train.trainer import build_model


def _model(*overrides):
    config = load_config(
        overrides=[
            "data.dataset=nations",
            "features.text_encoder=none",
            "features.image_encoder=none",
            "model.hidden_dim=16",
            "model.num_heads=2",
            "structure.max_nodes=4",
            "diffusion.steps=10",
            "diffusion.denoiser_width=16",
            *overrides,
        ]
    )
    torch.manual_seed(0)
    model = build_model(config, load_builtin("nations"), progress=False).eval()
    return model, config


@pytest.mark.parametrize(
    "overrides",
    [
        [],
        ["diffusion.target=epsilon"],
        ["diffusion.target=epsilon", "diffusion.reverse=residual"],
        ["diffusion.schedule=cosine"],
    ],
)
def test_untrained_denoiser_keeps_the_extractor_ranking_under_the_clean_protocol(overrides):
    model, _ = _model(*overrides)
    heads, relations = torch.tensor([0, 3, 5, 7]), torch.tensor([1, 2, 60, 100])
    with torch.no_grad():
        stage1 = model.stage1_scores(heads, relations)
        final = model.scores(heads, relations)
    assert torch.equal(final.argsort(dim=1), stage1.argsort(dim=1))
    if "diffusion.reverse=residual" not in overrides:
        # x_K = sqrt(ᾱ_K)·x_0 and the chain with a zero correction returns x_0 itself.
        assert torch.allclose(final, standardise(stage1), atol=1e-4)


def test_top_k_diffusion_keeps_kept_candidates_above_the_rest():
    model, _ = _model("diffusion.diffuse=top-k", "diffusion.top_k=5", "diffusion.top_k_order=id")
    heads, relations = torch.tensor([0, 1]), torch.tensor([0, 4])
    with torch.no_grad():
        stage1 = model.stage1_scores(heads, relations)
        final = model.scores(heads, relations)
    top = stage1.topk(5, dim=1).indices
    for row in range(2):
        kept = final[row, top[row]]
        others = final[row][~torch.isin(torch.arange(14), top[row])]
        assert kept.min() > others.max()
        assert torch.equal(kept.argsort(), stage1[row, top[row]].argsort())


def test_stochastic_passes_differ_and_clean_inference_draws_no_random_number():
    model, _ = _model()
    # Give the denoiser a non-zero output layer so noise reaches the scores.
    torch.nn.init.normal_(model.denoiser.output.weight, std=0.5)
    heads, relations = torch.tensor([0, 1, 2]), torch.tensor([0, 1, 2])
    with torch.no_grad():
        state = torch.get_rng_state()
        clean_a = model.scores(heads, relations)
        clean_b = model.scores(heads, relations)
        assert torch.equal(torch.get_rng_state(), state)
        generator = torch.Generator().manual_seed(0)
        noisy_a = model.scores(heads, relations, stochastic=True, generator=generator)
        noisy_b = model.scores(heads, relations, stochastic=True, generator=generator)
    assert torch.equal(clean_a, clean_b)
    assert not torch.equal(noisy_a, noisy_b)


def test_stage2_loss_weights(monkeypatch):
    model, config = _model()
    heads, relations = torch.tensor([0, 1]), torch.tensor([0, 1])
    labels = torch.zeros(2, 14)
    labels[0, 3] = labels[1, 5] = 1.0
    torch.manual_seed(1)
    parts = model(heads, relations, labels, config.loss)
    assert torch.isclose(
        parts["loss"], config.loss.w_kl * parts["kl"] + config.loss.w_bce * parts["bce"]
    )
    assert parts["kl"] >= 0
    only_bce = load_config(overrides=["loss.w_kl=0"]).loss
    torch.manual_seed(1)
    assert torch.isclose(model(heads, relations, labels, only_bce)["loss"], parts["bce"])
