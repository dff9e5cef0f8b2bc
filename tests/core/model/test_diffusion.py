"""Seeded numeric checks of the diffusion math against closed forms computed here independently."""

import math

import numpy as np
import pytest
import torch

from core.model.diffusion import (
    BETA_SCHEDULES,
    GaussianDiffusion,
    make_betas,
    scatter_top_k,
    select_top_k,
)

K = 10


def _linear_betas_py(steps, start=1e-4, end=0.02):
    return [start + (end - start) * i / (steps - 1) for i in range(steps)]


def _cosine_alpha_bar_py(u, s=0.008):
    return math.cos((u + s) / (1 + s) * math.pi / 2) ** 2


def _diffusion(target="epsilon", reverse="ddpm", schedule="linear", steps=K):
    return GaussianDiffusion(make_betas(schedule, steps), target=target, reverse=reverse)


def _full_t(step, batch):
    return torch.full((batch,), step, dtype=torch.long)


# ------------------------------------------------------------------------------------- schedules


def test_linear_schedule_matches_closed_form():
    betas = make_betas("linear", K, 1e-4, 0.02)
    betas_py = _linear_betas_py(K)
    assert betas.dtype == np.float64
    np.testing.assert_allclose(betas, betas_py, rtol=0, atol=1e-15)

    alpha_bar_K = math.prod(1.0 - b for b in betas_py)
    diffusion = GaussianDiffusion(betas, target="epsilon", reverse="ddpm")
    assert diffusion.alphas_cumprod[-1] == pytest.approx(alpha_bar_K, abs=1e-14)
    assert alpha_bar_K == pytest.approx(0.903739, abs=1e-6)
    # paper.md: at K = 10, x_K ≈ 0.95·x_0 + 0.31·ε.
    assert diffusion.sqrt_alphas_cumprod[-1] == pytest.approx(0.95, abs=0.005)
    assert diffusion.sqrt_one_minus_alphas_cumprod[-1] == pytest.approx(0.31, abs=0.005)
    for t in range(K):
        expected = math.prod(1.0 - b for b in betas_py[: t + 1])
        assert diffusion.alphas_cumprod[t] == pytest.approx(expected, abs=1e-14)


def test_cosine_schedule_matches_closed_form():
    betas = make_betas("cosine", K, 1e-4, 0.02)
    diffusion = GaussianDiffusion(betas, target="epsilon", reverse="ddpm")
    f0 = _cosine_alpha_bar_py(0.0)
    # Nichol & Dhariwal eq. 17: ᾱ_t = f(t/K) / f(0) while no β is clipped ...
    for t in range(1, K):
        assert diffusion.alphas_cumprod[t - 1] == pytest.approx(
            _cosine_alpha_bar_py(t / K) / f0, abs=1e-12
        )
    # ... and f(1) ≈ 0 makes the last β ≈ 1, which is clipped to 0.999.
    assert betas[-1] == 0.999
    assert diffusion.alphas_cumprod[-1] == pytest.approx(
        _cosine_alpha_bar_py((K - 1) / K) / f0 * 0.001, abs=1e-14
    )
    assert np.all(betas <= 0.999) and np.all(np.diff(betas) > 0)

    many = make_betas("cosine", 1000, 1e-4, 0.02)
    alpha_bar = np.cumprod(1.0 - many)
    assert alpha_bar[499] == pytest.approx(_cosine_alpha_bar_py(0.5) / f0, abs=1e-12)


def test_single_step_schedules():
    for name in BETA_SCHEDULES:
        diffusion = GaussianDiffusion(make_betas(name, 1), target="x0", reverse="ddpm")
        assert diffusion.num_timesteps == 1
        assert np.all(np.isfinite(diffusion.posterior_log_variance_clipped))


def test_schedule_errors():
    with pytest.raises(ValueError, match="cosine, linear"):
        make_betas("quadratic", K)
    with pytest.raises(ValueError, match="steps"):
        make_betas("linear", 0)
    with pytest.raises(ValueError, match=r"\(0, 1\)"):
        make_betas("linear", K, 1e-4, 1.5)
    with pytest.raises(ValueError, match=r"\(0, 1\)"):
        make_betas("linear", K, 0.0, 0.02)
    with pytest.raises(ValueError, match=r"\(0, 1\)"):
        GaussianDiffusion([0.1, 1.0], target="x0", reverse="ddpm")
    with pytest.raises(ValueError, match="1-D"):
        GaussianDiffusion(np.full((2, 2), 0.1), target="x0", reverse="ddpm")


def test_option_errors():
    betas = make_betas("linear", K)
    with pytest.raises(ValueError, match="x0, epsilon"):
        GaussianDiffusion(betas, target="v", reverse="ddpm")
    with pytest.raises(ValueError, match="ddpm, residual"):
        GaussianDiffusion(betas, target="x0", reverse="ddim")
    with pytest.raises(ValueError, match="epsilon"):
        GaussianDiffusion(betas, target="x0", reverse="residual")
    diffusion = GaussianDiffusion(betas, target="x0", reverse="ddpm")
    x0 = torch.zeros(2, 3)
    with pytest.raises(ValueError, match=r"\[0, 10\)"):
        diffusion.q_sample(x0, torch.tensor([0, K]))
    with pytest.raises(ValueError, match=r"\[0, 10\)"):
        diffusion.q_sample(x0, torch.tensor([-1, 0]))
    with pytest.raises(ValueError, match="shape"):
        diffusion.q_sample(x0, torch.tensor([0]))


def test_precomputed_arrays_are_float64_and_named_like_improved_diffusion():
    diffusion = _diffusion()
    for name in (
        "betas",
        "alphas",
        "alphas_cumprod",
        "alphas_cumprod_prev",
        "alphas_cumprod_next",
        "sqrt_alphas_cumprod",
        "sqrt_one_minus_alphas_cumprod",
        "log_one_minus_alphas_cumprod",
        "sqrt_recip_alphas_cumprod",
        "sqrt_recipm1_alphas_cumprod",
        "posterior_variance",
        "posterior_log_variance_clipped",
        "posterior_mean_coef1",
        "posterior_mean_coef2",
    ):
        array = getattr(diffusion, name)
        assert array.dtype == np.float64 and array.shape == (K,), name
    assert diffusion.alphas_cumprod_prev[0] == 1.0
    assert diffusion.posterior_variance[0] == 0.0
    assert diffusion.posterior_log_variance_clipped[0] == math.log(diffusion.posterior_variance[1])


# ------------------------------------------------------------------------------ forward process


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_q_sample_empirical_mean_and_variance(schedule):
    diffusion = _diffusion(schedule=schedule)
    torch.manual_seed(0)
    n, t_index = 200_000, 5
    x0 = torch.tensor([1.5, -2.0], dtype=torch.float64).expand(n, 2)
    x_t = diffusion.q_sample(x0, _full_t(t_index, n))
    alpha_bar = math.prod(1.0 - b for b in diffusion.betas[: t_index + 1])
    expected_mean = math.sqrt(alpha_bar) * x0[0]
    expected_var = 1.0 - alpha_bar
    # Standard errors: sd/sqrt(n) for the mean, var·sqrt(2/n) for the variance; allow 5 of them.
    assert torch.allclose(x_t.mean(0), expected_mean, atol=5 * math.sqrt(expected_var / n))
    assert torch.allclose(
        x_t.var(0), torch.full((2,), expected_var, dtype=torch.float64), rtol=5 * math.sqrt(2 / n)
    )

    mean, variance, log_variance = diffusion.q_mean_variance(x0[:3], _full_t(t_index, 3))
    assert torch.allclose(mean, expected_mean.expand(3, 2))
    assert torch.allclose(variance, torch.full((3, 2), expected_var, dtype=torch.float64))
    assert torch.allclose(log_variance, variance.log())


def test_sequential_noising_of_the_released_code_matches_closed_form():
    """The released code applies eq. 2 K times; its x_K has the law of q_sample at t = K−1."""
    diffusion = _diffusion()
    generator = torch.Generator().manual_seed(1)
    n = 200_000
    x = torch.full((n, 1), 3.0, dtype=torch.float64)
    for beta in diffusion.betas:
        noise = torch.randn(x.shape, generator=generator, dtype=x.dtype)
        x = math.sqrt(1 - beta) * x + math.sqrt(beta) * noise
    alpha_bar = diffusion.alphas_cumprod[-1]
    assert x.mean().item() == pytest.approx(3.0 * math.sqrt(alpha_bar), abs=5 * 0.31 / n**0.5)
    assert x.var().item() == pytest.approx(1 - alpha_bar, rel=5 * math.sqrt(2 / n))


def test_q_sample_with_given_noise_is_the_closed_form_and_keeps_dtype():
    diffusion = _diffusion()
    x0 = torch.randn(4, 7, generator=torch.Generator().manual_seed(2))
    noise = torch.randn(4, 7, generator=torch.Generator().manual_seed(3))
    t = torch.tensor([0, 3, 6, 9])
    x_t = diffusion.q_sample(x0, t, noise)
    assert x_t.dtype == torch.float32
    for row, step in enumerate(t.tolist()):
        alpha_bar = math.prod(1.0 - b for b in _linear_betas_py(K)[: step + 1])
        expected = math.sqrt(alpha_bar) * x0[row] + math.sqrt(1 - alpha_bar) * noise[row]
        assert torch.allclose(x_t[row], expected, atol=1e-6)
    recovered = diffusion.predict_x0_from_eps(x_t, t, noise)
    assert torch.allclose(recovered, x0, atol=1e-5)
    assert diffusion.q_sample(x0.double(), t, noise.double()).dtype == torch.float64


def test_posterior_mean_and_variance_match_textbook_formulas():
    diffusion = _diffusion(schedule="cosine")
    generator = torch.Generator().manual_seed(4)
    x0 = torch.randn(4, 5, generator=generator, dtype=torch.float64)
    x_t = torch.randn(4, 5, generator=generator, dtype=torch.float64)
    t = torch.tensor([0, 1, 5, 9])
    mean, variance, log_variance = diffusion.q_posterior_mean_variance(x0, x_t, t)
    betas = [float(b) for b in diffusion.betas]
    for row, step in enumerate(t.tolist()):
        beta = betas[step]
        alpha_bar = math.prod(1.0 - b for b in betas[: step + 1])
        alpha_bar_prev = math.prod(1.0 - b for b in betas[:step])  # 1 for step 0
        coef_x0 = math.sqrt(alpha_bar_prev) * beta / (1 - alpha_bar)
        coef_xt = math.sqrt(1 - beta) * (1 - alpha_bar_prev) / (1 - alpha_bar)
        expected_var = (1 - alpha_bar_prev) / (1 - alpha_bar) * beta
        assert torch.allclose(mean[row], coef_x0 * x0[row] + coef_xt * x_t[row], atol=1e-10)
        assert torch.allclose(variance[row], torch.full((5,), expected_var, dtype=torch.float64))
        if step > 0:
            assert torch.allclose(log_variance[row], variance[row].log())
    assert torch.allclose(mean[0], x0[0])  # t = 0: the posterior collapses onto x0
    assert torch.all(variance[0] == 0)


# ------------------------------------------------------------------------------ reverse process


def test_one_ddpm_step_epsilon_matches_eq_11():
    diffusion = _diffusion(target="epsilon")
    generator = torch.Generator().manual_seed(5)
    x_t = torch.randn(3, 4, generator=generator, dtype=torch.float64)
    z = torch.randn(3, 4, generator=generator, dtype=torch.float64)
    condition = torch.zeros(3, 2, dtype=torch.float64)
    step = 4
    out = diffusion.p_sample(
        lambda x, t, c: torch.full_like(x, 0.3), x_t, _full_t(step, 3), condition, noise=z
    )
    betas = _linear_betas_py(K)
    beta = betas[step]
    alpha_bar = math.prod(1.0 - b for b in betas[: step + 1])
    alpha_bar_prev = math.prod(1.0 - b for b in betas[:step])
    mean = (x_t - beta / math.sqrt(1 - alpha_bar) * 0.3) / math.sqrt(1 - beta)
    sigma = math.sqrt((1 - alpha_bar_prev) / (1 - alpha_bar) * beta)
    assert torch.allclose(out["sample"], mean + sigma * z, atol=1e-10)
    expected_x0 = (x_t - math.sqrt(1 - alpha_bar) * 0.3) / math.sqrt(alpha_bar)
    assert torch.allclose(out["x0_pred"], expected_x0, atol=1e-10)


def test_one_ddpm_step_x0_target_and_no_noise_at_t0():
    diffusion = _diffusion(target="x0")
    generator = torch.Generator().manual_seed(6)
    x_t = torch.randn(2, 3, generator=generator, dtype=torch.float64)
    z = torch.randn(2, 3, generator=generator, dtype=torch.float64)
    condition = torch.zeros(2, 1, dtype=torch.float64)

    def model(x, t, c):
        return torch.full_like(x, -1.25)

    step = 7
    out = diffusion.p_sample(model, x_t, _full_t(step, 2), condition, noise=z)
    betas = _linear_betas_py(K)
    beta = betas[step]
    alpha_bar = math.prod(1.0 - b for b in betas[: step + 1])
    alpha_bar_prev = math.prod(1.0 - b for b in betas[:step])
    mean = (
        math.sqrt(alpha_bar_prev) * beta / (1 - alpha_bar) * -1.25
        + math.sqrt(1 - beta) * (1 - alpha_bar_prev) / (1 - alpha_bar) * x_t
    )
    sigma = math.sqrt((1 - alpha_bar_prev) / (1 - alpha_bar) * beta)
    assert torch.allclose(out["sample"], mean + sigma * z, atol=1e-10)

    last = diffusion.p_sample(model, x_t, _full_t(0, 2), condition, noise=z)
    assert torch.allclose(last["sample"], torch.full_like(x_t, -1.25))
    mean_only = diffusion.p_sample(model, x_t, _full_t(step, 2), condition, deterministic=True)
    assert torch.allclose(mean_only["sample"], mean, atol=1e-10)
    with pytest.raises(ValueError, match="noise"):
        diffusion.p_sample(model, x_t, _full_t(step, 2), condition, noise=z, deterministic=True)


def test_residual_reverse_loop_is_x_T_minus_sum_of_outputs():
    diffusion = _diffusion(target="epsilon", reverse="residual")
    generator = torch.Generator().manual_seed(7)
    x_T = torch.randn(3, 6, generator=generator, dtype=torch.float64)
    condition = torch.randn(3, 2, generator=generator, dtype=torch.float64)
    outputs, steps = [], []

    def model(x, t, c):
        output = 0.1 * torch.tanh(x) + 0.01 * t[:, None].to(x.dtype) + c.sum(1, keepdim=True)
        outputs.append(output)
        steps.append(t.tolist())
        return output

    x0_hat = diffusion.sample(model, (3, 6), condition, x_T=x_T)
    assert steps == [[step] * 3 for step in range(K - 1, -1, -1)]
    assert torch.allclose(x0_hat, x_T - torch.stack(outputs).sum(0), atol=1e-12)
    with pytest.raises(ValueError, match="noise"):
        diffusion.p_sample(model, x_T, _full_t(0, 3), condition, noise=torch.zeros_like(x_T))


@pytest.mark.parametrize("reverse", ["ddpm", "residual"])
def test_deterministic_sampling_is_repeatable_and_draws_no_random_numbers(reverse):
    diffusion = _diffusion(target="epsilon", reverse=reverse)
    condition = torch.randn(4, 3, generator=torch.Generator().manual_seed(8))

    def model(x, t, c):
        return 0.2 * x + 0.05 * c.mean(1, keepdim=True) + 0.01 * t[:, None].float() + 0.1

    torch.manual_seed(123)
    global_state = torch.get_rng_state()
    generator = torch.Generator().manual_seed(9)
    generator_state = generator.get_state()
    first = diffusion.sample(model, (4, 5), condition, generator=generator, deterministic=True)
    second = diffusion.sample(model, (4, 5), condition, generator=generator, deterministic=True)
    assert torch.equal(first, second)
    assert torch.equal(torch.get_rng_state(), global_state)
    assert torch.equal(generator.get_state(), generator_state)
    assert torch.isfinite(first).all() and first.abs().sum() > 0

    # Starting from zeros: a model that outputs 0 under an ε target leaves the chain at 0 exactly.
    zeros = diffusion.sample(
        lambda x, t, c: torch.zeros_like(x), (4, 5), condition, deterministic=True
    )
    assert torch.equal(zeros, torch.zeros(4, 5))


def test_stochastic_sampling_follows_the_generator():
    diffusion = _diffusion(target="x0")
    condition = torch.zeros(2, 1)

    def model(x, t, c):
        return 0.5 * x

    global_state = torch.get_rng_state()
    a = diffusion.sample(model, (2, 8), condition, generator=torch.Generator().manual_seed(10))
    b = diffusion.sample(model, (2, 8), condition, generator=torch.Generator().manual_seed(10))
    c = diffusion.sample(model, (2, 8), condition, generator=torch.Generator().manual_seed(11))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert torch.equal(torch.get_rng_state(), global_state)


# ---------------------------------------------------------------------------------- training


def test_training_losses_are_zero_for_a_perfect_model():
    generator = torch.Generator().manual_seed(12)
    x0 = torch.randn(5, 4, generator=generator, dtype=torch.float64)
    noise = torch.randn(5, 4, generator=generator, dtype=torch.float64)
    condition = torch.zeros(5, 2, dtype=torch.float64)
    t = torch.tensor([0, 2, 4, 6, 9])

    eps_diffusion = _diffusion(target="epsilon")
    out = eps_diffusion.training_losses(lambda x, s, c: noise, x0, t, condition, noise=noise)
    assert out["x0_pred"].shape == (5, 4) and out["mse"].shape == (5,)
    assert torch.allclose(out["x0_pred"], x0, atol=1e-10)
    assert torch.allclose(out["mse"], torch.zeros(5, dtype=torch.float64))
    assert torch.allclose(out["x_t"], eps_diffusion.q_sample(x0, t, noise))

    x0_diffusion = _diffusion(target="x0")
    out = x0_diffusion.training_losses(lambda x, s, c: x0, x0, t, condition, noise=noise)
    assert torch.allclose(out["x0_pred"], x0) and torch.all(out["mse"] == 0)

    wrong = x0_diffusion.training_losses(lambda x, s, c: x0 + 2.0, x0, t, condition, noise=noise)
    assert torch.allclose(wrong["mse"], torch.full((5,), 4.0, dtype=torch.float64))


def test_residual_training_runs_the_chain_from_each_t():
    diffusion = _diffusion(target="epsilon", reverse="residual")
    generator = torch.Generator().manual_seed(13)
    x0 = torch.randn(3, 4, generator=generator, dtype=torch.float64)
    noise = torch.randn(3, 4, generator=generator, dtype=torch.float64)
    condition = torch.zeros(3, 1, dtype=torch.float64)
    t = torch.tensor([K - 1, 0, 4])
    out = diffusion.training_losses(
        lambda x, s, c: torch.full_like(x, 0.1), x0, t, condition, noise=noise
    )
    steps_run = (t + 1).to(torch.float64)[:, None]
    assert torch.allclose(out["x0_pred"], out["x_t"] - 0.1 * steps_run)
    assert torch.allclose(out["mse"], ((out["x0_pred"] - x0) ** 2).mean(1))

    # Gradients reach a parameter used in every step of the chain.
    weight = torch.tensor(0.5, dtype=torch.float64, requires_grad=True)
    out = diffusion.training_losses(
        lambda x, s, c: weight * x, x0, _full_t(K - 1, 3), condition, noise=noise
    )
    out["x0_pred"].sum().backward()
    assert weight.grad is not None and weight.grad != 0


# ---------------------------------------------------------------------------------- top-k


def test_select_top_k_orders_by_score_or_id():
    scores = torch.tensor([[0.1, 0.9, -0.3, 0.5, 0.7, 0.0], [2.0, -1.0, 3.0, 0.0, 1.0, -2.0]])
    values, indices = select_top_k(scores, 3, order="score")
    assert indices.tolist() == [[1, 4, 3], [2, 0, 4]]
    assert torch.equal(values, torch.tensor([[0.9, 0.7, 0.5], [3.0, 2.0, 1.0]]))

    values, indices = select_top_k(scores, 3, order="id")
    assert indices.tolist() == [[1, 3, 4], [0, 2, 4]]
    assert torch.equal(values, torch.gather(scores, 1, indices))

    with pytest.raises(ValueError, match="score, id"):
        select_top_k(scores, 3, order="random")
    with pytest.raises(ValueError, match=r"\[1, 6\]"):
        select_top_k(scores, 7)
    with pytest.raises(ValueError, match=r"\[1, 6\]"):
        select_top_k(scores, 0)


@pytest.mark.parametrize("order", ["score", "id"])
def test_scatter_top_k_round_trip(order):
    scores = torch.randn(4, 20, generator=torch.Generator().manual_seed(14), requires_grad=True)
    values, indices = select_top_k(scores, 5, order=order)

    full = scatter_top_k(values, indices, 20, fill=scores)  # base = the scores themselves
    assert torch.equal(full, scores)

    full = scatter_top_k(values, indices, 20)  # default fill: min of kept values − 1
    kept = torch.zeros(4, 20, dtype=torch.bool).scatter(1, indices, True)
    assert torch.equal(full[kept], scores[kept])
    expected_fill = values.detach().min(1, keepdim=True).values - 1
    assert torch.equal(full[~kept].reshape(4, 15), expected_fill.expand(4, 15))
    # every dropped entity ranks below every kept one
    assert torch.all(
        full.masked_fill(~kept, math.inf).min(1).values
        > full.masked_fill(kept, -math.inf).max(1).values
    )
    top_by_full = torch.topk(full, 5, dim=1).indices.sort(1).values
    assert torch.equal(top_by_full, indices.sort(1).values)

    full.sum().backward()  # gradients flow back to the kept scores only
    assert torch.equal(scores.grad, kept.float())

    constant = scatter_top_k(values.detach(), indices, 20, fill=-7.0)
    assert torch.all(constant[~kept] == -7.0)
    with pytest.raises(ValueError, match="fill"):
        scatter_top_k(values, indices, 20, fill=torch.zeros(4))
