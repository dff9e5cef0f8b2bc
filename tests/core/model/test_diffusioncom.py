"""DiffusionCom wiring: what an untrained denoiser does to the extractor's ranking, and the losses."""

import pytest
import torch

from core.config import LossConfig, load_config
from core.data.builtin import load_builtin
from core.model.diffusioncom import stacked_stage2_loss, stage2_loss, standardise
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
    only_bce = load_config(overrides=["loss.w_kl=0"]).loss
    torch.manual_seed(1)
    assert torch.isclose(model(heads, relations, labels, only_bce)["loss"], parts["bce"])


def test_stage2_kl_and_bce_equal_their_closed_forms_on_three_entities(monkeypatch):
    """KL(softmax(x_0) ‖ softmax(x̂_0)) and BCE(x̂_0, labels) written out by hand for N = 3."""
    import math

    model, config = _model()
    x0_values, x0_hat_values, label_values = (0.0, 1.0, 2.0), (1.0, 0.0, 0.0), (0.0, 0.0, 1.0)
    x0, x0_hat = torch.tensor([x0_values]), torch.tensor([x0_hat_values])
    labels = torch.tensor([label_values])
    monkeypatch.setattr(
        type(model), "_x0", lambda self, output: (x0, None, torch.cat([output.condition] * 2, 1))
    )
    monkeypatch.setattr(model.diffusion, "training_losses", lambda *a, **k: {"x0_pred": x0_hat})
    parts = model(torch.tensor([0]), torch.tensor([0]), labels, config.loss)

    def softmax(values):
        return [math.exp(v) / sum(math.exp(w) for w in values) for v in values]

    p, q = softmax(x0_values), softmax(x0_hat_values)
    kl = sum(p_i * math.log(p_i / q_i) for p_i, q_i in zip(p, q, strict=True))
    reverse_kl = sum(q_i * math.log(q_i / p_i) for p_i, q_i in zip(p, q, strict=True))
    assert abs(kl - reverse_kl) > 0.05  # so the direction of the KL is checked too
    bce = (
        -sum(
            y * math.log(1 / (1 + math.exp(-v))) + (1 - y) * math.log(1 - 1 / (1 + math.exp(-v)))
            for v, y in zip(x0_hat_values, label_values, strict=True)
        )
        / 3
    )
    assert parts["kl"].item() == pytest.approx(kl, rel=1e-5)
    assert parts["bce"].item() == pytest.approx(bce, rel=1e-5)
    assert parts["loss"].item() == pytest.approx(
        config.loss.w_kl * kl + config.loss.w_bce * bce, rel=1e-5
    )
    mean_loss = load_config(overrides=["loss.kl_reduction=mean"]).loss
    averaged = model(torch.tensor([0]), torch.tensor([0]), labels, mean_loss)["kl"]
    assert averaged.item() == pytest.approx(kl / 3, rel=1e-5)


def test_kl_mean_reduction_divides_the_summed_kl_by_the_diffused_entities():
    model, config = _model()
    torch.nn.init.normal_(model.denoiser.output.weight, std=0.5)  # x̂_0 ≠ x_0, so KL > 0
    heads, relations = torch.tensor([0, 1, 2]), torch.tensor([0, 1, 2])
    labels = torch.zeros(3, 14)
    torch.manual_seed(2)
    summed = model(heads, relations, labels, config.loss)["kl"]
    mean_loss = load_config(overrides=["loss.kl_reduction=mean"]).loss
    torch.manual_seed(2)
    averaged = model(heads, relations, labels, mean_loss)["kl"]
    assert summed > 1e-3
    assert torch.isclose(averaged, summed / 14)


def test_raw_x0_diffuses_the_extractor_logits_unchanged():
    model, _ = _model("diffusion.x0=raw")
    heads, relations = torch.tensor([0, 3]), torch.tensor([1, 2])
    with torch.no_grad():
        stage1 = model.stage1_scores(heads, relations)
        final = model.scores(heads, relations)
    assert torch.allclose(final, stage1, atol=1e-4)
    assert not torch.allclose(final, standardise(stage1), atol=1e-2)


def test_top_k_extractor_fill_keeps_the_extractor_score_outside_the_top_k():
    model, _ = _model(
        "diffusion.diffuse=top-k", "diffusion.top_k=5", "diffusion.top_k_fill=extractor"
    )
    heads, relations = torch.tensor([0, 1]), torch.tensor([0, 4])
    with torch.no_grad():
        stage1 = model.stage1_scores(heads, relations)
        final = model.scores(heads, relations)
    outside = torch.ones_like(stage1, dtype=torch.bool).scatter(1, stage1.topk(5).indices, False)
    assert torch.equal(final[outside], stage1[outside])


def test_kl_target_is_detached_so_it_never_trains_the_extractor():
    """Under finetune the KL pulls x̂_0 towards x_0, never x_0 towards x̂_0 (the released code)."""
    import torch.nn.functional as F

    model, config = _model("loss.stage2_extractor=finetune", "loss.w_bce=0")
    torch.nn.init.normal_(model.denoiser.output.weight, std=0.5)  # x̂_0 ≠ x_0
    heads, relations = torch.tensor([0, 1, 2]), torch.tensor([0, 1, 2])
    captured = {}
    real_x0, real_losses = type(model)._x0, model.diffusion.training_losses

    def keep_x0(self, output):
        captured["x0"], indices, condition = real_x0(self, output)
        return captured["x0"], indices, condition

    def keep_x0_hat(*args, **kwargs):
        captured["losses"] = real_losses(*args, **kwargs)
        return captured["losses"]

    model.diffusion.training_losses = keep_x0_hat
    type(model)._x0 = keep_x0
    try:
        torch.manual_seed(3)
        loss = model(heads, relations, torch.zeros(3, 14), config.loss)["loss"]
    finally:
        type(model)._x0 = real_x0
    x0, x0_hat = captured["x0"], captured["losses"]["x0_pred"]

    def kl(target):
        return F.kl_div(
            F.log_softmax(x0_hat, 1),
            F.log_softmax(target, 1),
            log_target=True,
            reduction="batchmean",
        )

    (model_gradient,) = torch.autograd.grad(loss, x0, retain_graph=True)
    (detached,) = torch.autograd.grad(kl(x0.detach()), x0, retain_graph=True)
    (live,) = torch.autograd.grad(kl(x0), x0, retain_graph=True)
    assert torch.allclose(model_gradient, detached, atol=1e-6)
    assert not torch.allclose(model_gradient, live, atol=1e-4)


@pytest.mark.parametrize("batch, entities", [(256, 14), (64, 135)])
def test_the_stacked_stage2_loss_is_each_models_loss_bitwise(batch, entities):
    """A fused pack's loss: row i and its gradient equal stage2_loss of model i on one thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        generator = torch.Generator().manual_seed(3)
        x0 = torch.randn(batch, entities, generator=generator)
        x0_hat = torch.randn(3, batch, entities, generator=generator).requires_grad_()
        targets = (torch.rand(batch, entities, generator=generator) < 0.2).float() * 0.9 + 0.05
        losses = [
            LossConfig(),
            LossConfig(w_kl=0.3, kl_reduction="mean"),
            LossConfig(w_kl=2.0, w_bce=0.5),
        ]
        stacked = stacked_stage2_loss(x0, x0_hat, targets, losses)
        stacked["loss"].sum().backward()
        for row, loss in enumerate(losses):
            alone = x0_hat[row].detach().clone().requires_grad_()
            parts = stage2_loss(x0, alone, targets, loss)
            parts["loss"].backward()
            for key in ("loss", "kl", "bce"):
                assert torch.equal(stacked[key][row], parts[key]), (row, key)
            assert torch.equal(x0_hat.grad[row], alone.grad), row
    finally:
        torch.set_num_threads(threads)
