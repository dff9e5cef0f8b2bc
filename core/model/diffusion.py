"""Gaussian diffusion over candidate-score vectors: schedules, forward process, reverse chains.

All diffusion math of DiffusionCom lives here, in the manner of openai/improved-diffusion's
``gaussian_diffusion.py``: a plain class (not an ``nn.Module``) that precomputes the noise schedule
in float64 and exposes paper-named methods. The denoiser network is passed in as ``model``; this
module knows nothing about it, and the network module never imports this one.

Conventions
-----------
* ``K`` is the number of diffusion steps. Timesteps are 0-based, ``t ∈ [0, K)``: index ``t`` is DDPM's
  step ``t + 1``, so ``alphas_cumprod[t]`` is Ho et al.'s ᾱ_{t+1} and ``alphas_cumprod[K - 1]`` is ᾱ_K.
* ``x0`` ``(B, N)`` is the clean vector being diffused: the extractor's scores for ``N`` candidates
  (see :func:`select_top_k`). ``x_t`` ``(B, N)`` is its noised version. ``condition`` ``(B, Dc)`` is the
  query representation (Z'_mask, optionally with pooled visual tokens).
* ``model`` is any callable ``model(x_t (B, N), t (B,) long, condition (B, Dc)) -> (B, N)``; what its
  output means is the ``target`` option ("x0" or "epsilon").

Two reverse processes, chosen by name (``reverse``):

* ``"ddpm"`` — the paper's chain: DDPM ancestral sampling through the Gaussian posterior
  q(x_{t-1} | x_t, x̂0) with the fixed "small" variance β̃_t (Ho et al. 2020, Algorithm 2).
* ``"residual"`` — what the released DiffusionCom code does instead: starting from x_T it applies K
  plain subtractions ``x ← x − model(x, t, c)`` for ``t = K−1 … 0``, with no posterior and no noise.
  The model output is read as a noise estimate ε̂ (so ``target`` must be "epsilon"), but the code never
  trains it against ε: the whole chain is run with gradients and only BCE + KL on its result are used.

Two numeric cautions (checked on toy data, see the tests' closed forms):

* Starting the chain from N(0, I) (or from zeros) matches the forward process only when ᾱ_K ≈ 0.
  With the released linear 1e-4 … 0.02 schedule at K = 10, ᾱ_K ≈ 0.904 (x_K ≈ 0.95·x0 + 0.31·ε),
  so x_K is mostly x0; there the chain has to start from ``q_sample(x0, K−1)`` as the released code
  does, or the schedule must reach ᾱ_K ≈ 0 (cosine, or linear with many steps).
* Under ``target="epsilon"`` the x0 estimate is x_t·sqrt(1/ᾱ_t) − ε̂·sqrt(1/ᾱ_t − 1) (eq. 4
  inverted); when ᾱ_t is tiny (cosine's last step: sqrt(1/ᾱ_K − 1) ≈ 200 at K = 10) every error in
  ε̂ is amplified that much. improved-diffusion clips x̂0 to the image range; scores have no natural
  range, so no clipping is done here and ``target="x0"`` is the safer choice for such schedules.

The released code noises x0 step by step (eq. 2, K times, fresh noise each step); that has exactly
the distribution of one closed-form draw (eq. 4), which is what :meth:`GaussianDiffusion.q_sample`
does. Equation numbers are those of Ho et al. 2020 ("DDPM") unless another paper is named.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
import torch

__all__ = [
    "BETA_SCHEDULES",
    "REVERSE_PROCESSES",
    "TARGETS",
    "TOP_K_ORDERS",
    "GaussianDiffusion",
    "make_betas",
    "scatter_top_k",
    "select_top_k",
]

Model = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]

TARGETS = ("x0", "epsilon")
REVERSE_PROCESSES = ("ddpm", "residual")
TOP_K_ORDERS = ("score", "id")

_COSINE_OFFSET = 0.008  # s in Nichol & Dhariwal 2021, eq. 17
_COSINE_MAX_BETA = 0.999  # their clip, so that β_K < 1 and the chain stays invertible


# --------------------------------------------------------------------------------------------------
# Noise schedules
# --------------------------------------------------------------------------------------------------


def _linear_betas(steps: int, beta_start: float, beta_end: float) -> np.ndarray:
    """β_t evenly spaced from ``beta_start`` to ``beta_end`` (Ho et al. §4; the released code)."""
    return np.linspace(beta_start, beta_end, steps, dtype=np.float64)


def _cosine_betas(steps: int, beta_start: float, beta_end: float) -> np.ndarray:
    """Cosine schedule, Nichol & Dhariwal 2021 eq. 17; ``beta_start``/``beta_end`` are not used.

    ᾱ(u) = f(u) / f(0) with f(u) = cos²(((u + s) / (1 + s)) · π/2), u = t/K, and
    β_t = 1 − ᾱ(t/K) / ᾱ((t−1)/K), clipped at 0.999.
    """
    del beta_start, beta_end

    def f(u: float) -> float:
        return math.cos((u + _COSINE_OFFSET) / (1 + _COSINE_OFFSET) * math.pi / 2) ** 2

    betas = [min(1.0 - f((i + 1) / steps) / f(i / steps), _COSINE_MAX_BETA) for i in range(steps)]
    return np.asarray(betas, dtype=np.float64)


BETA_SCHEDULES: dict[str, Callable[[int, float, float], np.ndarray]] = {
    "linear": _linear_betas,
    "cosine": _cosine_betas,
}


def make_betas(
    schedule: str, steps: int, beta_start: float = 1e-4, beta_end: float = 0.02
) -> np.ndarray:
    """The noise schedule β_1 … β_K, chosen by name.

    Args:
        schedule: a key of :data:`BETA_SCHEDULES`: ``"linear"`` (β = linspace(beta_start, beta_end,
            K); the released code uses 1e-4 … 0.02) or ``"cosine"`` (Nichol & Dhariwal 2021, max β
            clipped at 0.999; ignores ``beta_start`` and ``beta_end``).
        steps: K, the number of diffusion steps, ``>= 1``.
        beta_start: β_1 of the linear schedule.
        beta_end: β_K of the linear schedule.

    Returns:
        ``(K,)`` float64 array with every β in (0, 1).

    Raises:
        ValueError: unknown schedule name, ``steps < 1``, or any β outside (0, 1).
    """
    if schedule not in BETA_SCHEDULES:
        valid = ", ".join(sorted(BETA_SCHEDULES))
        raise ValueError(f"unknown noise schedule {schedule!r}; valid schedules: {valid}")
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 1:
        raise ValueError(f"steps must be an integer >= 1, got {steps!r}")
    betas = BETA_SCHEDULES[schedule](int(steps), float(beta_start), float(beta_end))
    _check_betas(betas)
    return betas


def _check_betas(betas: np.ndarray) -> None:
    if betas.ndim != 1 or betas.size == 0:
        raise ValueError(f"betas must be a non-empty 1-D array, got shape {betas.shape}")
    if not np.all(np.isfinite(betas)) or not np.all((betas > 0) & (betas < 1)):
        raise ValueError(
            f"every beta must lie in (0, 1); got min {betas.min()!r}, max {betas.max()!r}"
        )


# --------------------------------------------------------------------------------------------------
# The diffusion process
# --------------------------------------------------------------------------------------------------


class GaussianDiffusion:
    """Forward noising, posterior and reverse chains for a fixed schedule β_1 … β_K.

    Not an ``nn.Module``: it holds no parameters, only float64 numpy arrays of length K, which are
    cast to the input's dtype and device when indexed (see :func:`_extract`).

    Args:
        betas: ``(K,)`` the noise schedule (see :func:`make_betas`), every β in (0, 1).
        target: what the model predicts: ``"x0"`` (the clean scores) or ``"epsilon"`` (the noise).
        reverse: ``"ddpm"`` (the paper's ancestral chain) or ``"residual"`` (the released code's K
            plain subtractions; requires ``target="epsilon"``). See the module docstring.

    Attributes (all ``(K,)`` float64, named as in improved-diffusion; index t is DDPM step t + 1):
        betas, alphas (1 − β_t), alphas_cumprod (ᾱ_t), alphas_cumprod_prev (ᾱ_{t−1}, 1 at t = 0),
        alphas_cumprod_next, sqrt_alphas_cumprod, sqrt_one_minus_alphas_cumprod,
        log_one_minus_alphas_cumprod, sqrt_recip_alphas_cumprod, sqrt_recipm1_alphas_cumprod,
        posterior_variance (β̃_t), posterior_log_variance_clipped, posterior_mean_coef1 (on x0),
        posterior_mean_coef2 (on x_t).
    """

    def __init__(self, betas: Sequence[float] | np.ndarray, *, target: str, reverse: str) -> None:
        if target not in TARGETS:
            raise ValueError(f"unknown target {target!r}; valid targets: {', '.join(TARGETS)}")
        if reverse not in REVERSE_PROCESSES:
            valid = ", ".join(REVERSE_PROCESSES)
            raise ValueError(f"unknown reverse process {reverse!r}; valid: {valid}")
        if reverse == "residual" and target != "epsilon":
            raise ValueError(
                "reverse='residual' subtracts the model output as a noise estimate; "
                "it needs target='epsilon'"
            )
        betas = np.asarray(betas, dtype=np.float64)
        _check_betas(betas)
        self.target = target
        self.reverse = reverse
        self.num_timesteps = int(betas.shape[0])

        self.betas = betas
        self.alphas = 1.0 - betas
        self.alphas_cumprod = np.cumprod(self.alphas)  # ᾱ_t = Π_{s≤t} α_s
        self.alphas_cumprod_prev = np.append(1.0, self.alphas_cumprod[:-1])
        self.alphas_cumprod_next = np.append(self.alphas_cumprod[1:], 0.0)

        # Eq. 4: q(x_t | x_0) = N(sqrt(ᾱ_t) x_0, (1 − ᾱ_t) I).
        self.sqrt_alphas_cumprod = np.sqrt(self.alphas_cumprod)
        self.sqrt_one_minus_alphas_cumprod = np.sqrt(1.0 - self.alphas_cumprod)
        self.log_one_minus_alphas_cumprod = np.log(1.0 - self.alphas_cumprod)
        self.sqrt_recip_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod)
        self.sqrt_recipm1_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod - 1.0)

        # Eq. 7: β̃_t = (1 − ᾱ_{t−1}) / (1 − ᾱ_t) · β_t  (0 at the first step).
        self.posterior_variance = (
            betas * (1.0 - self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        )
        # log β̃ with the first entry (log 0) replaced by β̃ of the second step, as in
        # improved-diffusion. With K = 1 there is no second step; β_1 stands in. The value at
        # t = 0 is never used for sampling (no noise is added at the last step).
        first = self.posterior_variance[1] if self.num_timesteps > 1 else betas[0]
        self.posterior_log_variance_clipped = np.log(np.append(first, self.posterior_variance[1:]))
        # Eq. 7: μ̃_t(x_t, x_0) = coef1 · x_0 + coef2 · x_t.
        self.posterior_mean_coef1 = (
            betas * np.sqrt(self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        )
        self.posterior_mean_coef2 = (
            (1.0 - self.alphas_cumprod_prev) * np.sqrt(self.alphas) / (1.0 - self.alphas_cumprod)
        )

    @classmethod
    def from_schedule(
        cls,
        schedule: str,
        steps: int,
        *,
        target: str,
        reverse: str,
        beta_start: float = 1e-4,
        beta_end: float = 0.02,
    ) -> GaussianDiffusion:
        """Build from a schedule name (see :func:`make_betas`) and the two options."""
        betas = make_betas(schedule, steps, beta_start, beta_end)
        return cls(betas, target=target, reverse=reverse)

    # ---------------------------------------------------------------------------- forward process

    def q_mean_variance(
        self, x0: torch.Tensor, t: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Mean, variance and log-variance of q(x_t | x_0) (eq. 4).

        Args:
            x0: ``(B, N)`` clean scores.
            t: ``(B,)`` long timesteps in [0, K).

        Returns:
            ``(mean, variance, log_variance)``, each ``(B, N)``.
        """
        self._check_timesteps(t, x0)
        mean = _extract(self.sqrt_alphas_cumprod, t, x0.shape, x0.dtype) * x0
        variance = _extract(1.0 - self.alphas_cumprod, t, x0.shape, x0.dtype)
        log_variance = _extract(self.log_one_minus_alphas_cumprod, t, x0.shape, x0.dtype)
        return mean, variance, log_variance

    def q_sample(
        self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Draw x_t ~ q(x_t | x_0) in closed form (eq. 4): sqrt(ᾱ_t) · x0 + sqrt(1 − ᾱ_t) · ε.

        Args:
            x0: ``(B, N)`` clean scores.
            t: ``(B,)`` long timesteps in [0, K).
            noise: ``(B, N)`` ε ~ N(0, I); drawn from the global torch RNG when ``None``.

        Returns:
            ``(B, N)`` x_t.
        """
        self._check_timesteps(t, x0)
        if noise is None:
            noise = torch.randn_like(x0)
        elif noise.shape != x0.shape:
            raise ValueError(f"noise shape {tuple(noise.shape)} != x0 shape {tuple(x0.shape)}")
        return (
            _extract(self.sqrt_alphas_cumprod, t, x0.shape, x0.dtype) * x0
            + _extract(self.sqrt_one_minus_alphas_cumprod, t, x0.shape, x0.dtype) * noise
        )

    def q_posterior_mean_variance(
        self, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Mean, variance and clipped log-variance of the posterior q(x_{t−1} | x_t, x_0) (eq. 6–7).

        Args:
            x0: ``(B, N)`` clean scores (or the model's estimate of them).
            x_t: ``(B, N)`` noised scores at step t.
            t: ``(B,)`` long timesteps in [0, K).

        Returns:
            ``(mean, variance, log_variance_clipped)``, each ``(B, N)``. At t = 0 the mean is x0 and
            the variance 0.
        """
        if x0.shape != x_t.shape:
            raise ValueError(f"x0 shape {tuple(x0.shape)} != x_t shape {tuple(x_t.shape)}")
        self._check_timesteps(t, x_t)
        shape, dtype = x_t.shape, x_t.dtype
        mean = (
            _extract(self.posterior_mean_coef1, t, shape, dtype) * x0
            + _extract(self.posterior_mean_coef2, t, shape, dtype) * x_t
        )
        variance = _extract(self.posterior_variance, t, shape, dtype)
        log_variance = _extract(self.posterior_log_variance_clipped, t, shape, dtype)
        return mean, variance, log_variance

    def predict_x0_from_eps(
        self, x_t: torch.Tensor, t: torch.Tensor, eps: torch.Tensor
    ) -> torch.Tensor:
        """Invert eq. 4 for x0: x0 = sqrt(1/ᾱ_t) · x_t − sqrt(1/ᾱ_t − 1) · ε.

        Args:
            x_t: ``(B, N)`` noised scores.
            t: ``(B,)`` long timesteps in [0, K).
            eps: ``(B, N)`` (predicted) noise.

        Returns:
            ``(B, N)`` the implied x0.
        """
        self._check_timesteps(t, x_t)
        return (
            _extract(self.sqrt_recip_alphas_cumprod, t, x_t.shape, x_t.dtype) * x_t
            - _extract(self.sqrt_recipm1_alphas_cumprod, t, x_t.shape, x_t.dtype) * eps
        )

    # ---------------------------------------------------------------------------- reverse process

    def p_mean_variance(
        self, model: Model, x_t: torch.Tensor, t: torch.Tensor, condition: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """The DDPM reverse step p_θ(x_{t−1} | x_t) = N(μ_θ, β̃_t I) (eq. 1, Σ fixed to β̃_t).

        The model's x0 estimate x̂0 (its output under ``target="x0"``, or eq. 4 inverted under
        ``target="epsilon"``) is put into the posterior mean of eq. 7; with an ε prediction this
        equals eq. 11, μ_θ = (x_t − β_t / sqrt(1 − ᾱ_t) · ε̂) / sqrt(α_t).

        Args:
            model: ``model(x_t (B, N), t (B,), condition (B, Dc)) -> (B, N)``.
            x_t: ``(B, N)`` noised scores at step t.
            t: ``(B,)`` long timesteps in [0, K).
            condition: ``(B, Dc)`` query representation.

        Returns:
            dict with ``mean``, ``variance``, ``log_variance`` (``(B, N)`` each), ``x0_pred``
            ``(B, N)`` and ``model_output`` ``(B, N)``.
        """
        self._check_timesteps(t, x_t)
        model_output = _call_model(model, x_t, t, condition)
        if self.target == "epsilon":
            x0_pred = self.predict_x0_from_eps(x_t, t, model_output)
        else:
            x0_pred = model_output
        mean, variance, log_variance = self.q_posterior_mean_variance(x0_pred, x_t, t)
        return {
            "mean": mean,
            "variance": variance,
            "log_variance": log_variance,
            "x0_pred": x0_pred,
            "model_output": model_output,
        }

    def p_sample(
        self,
        model: Model,
        x_t: torch.Tensor,
        t: torch.Tensor,
        condition: torch.Tensor,
        noise: torch.Tensor | None = None,
        deterministic: bool = False,
    ) -> dict[str, torch.Tensor]:
        """One reverse step x_t → x_{t−1}, by the configured ``reverse`` process.

        * ``"ddpm"`` (Algorithm 2, line 4): x_{t−1} = μ_θ(x_t, t) + sqrt(β̃_t) · z, with z = 0 at
          t = 0 and when ``deterministic``.
        * ``"residual"`` (the released code): x_{t−1} = x_t − model(x_t, t, c); never adds noise.

        Args:
            model: ``model(x_t (B, N), t (B,), condition (B, Dc)) -> (B, N)``.
            x_t: ``(B, N)`` current state.
            t: ``(B,)`` long timesteps in [0, K).
            condition: ``(B, Dc)`` query representation.
            noise: ``(B, N)`` z for the DDPM step; drawn from the global torch RNG when ``None``
                (and not ``deterministic``). Not allowed with ``deterministic`` or ``"residual"``.
            deterministic: add no noise (the mean of the reverse step).

        Returns:
            dict with ``sample`` ``(B, N)`` (x_{t−1}) and ``model_output`` ``(B, N)``; under
            ``"ddpm"`` also ``x0_pred`` ``(B, N)``.
        """
        if self.reverse == "residual":
            if noise is not None:
                raise ValueError("reverse='residual' adds no noise; do not pass noise")
            self._check_timesteps(t, x_t)
            model_output = _call_model(model, x_t, t, condition)
            return {"sample": x_t - model_output, "model_output": model_output}

        if deterministic and noise is not None:
            raise ValueError("deterministic=True adds no noise; do not pass noise")
        out = self.p_mean_variance(model, x_t, t, condition)
        if deterministic:
            return {
                "sample": out["mean"],
                "x0_pred": out["x0_pred"],
                "model_output": out["model_output"],
            }
        if noise is None:
            noise = torch.randn_like(x_t)
        elif noise.shape != x_t.shape:
            raise ValueError(f"noise shape {tuple(noise.shape)} != x_t shape {tuple(x_t.shape)}")
        # No noise at the last step (t = 0): x0 is the mean of p(x_0 | x_1).
        nonzero = (t != 0).to(x_t.dtype).reshape(-1, *([1] * (x_t.dim() - 1)))
        sample = out["mean"] + nonzero * torch.exp(0.5 * out["log_variance"]) * noise
        return {"sample": sample, "x0_pred": out["x0_pred"], "model_output": out["model_output"]}

    def sample(
        self,
        model: Model,
        shape: tuple[int, int],
        condition: torch.Tensor,
        generator: torch.Generator | None = None,
        deterministic: bool = False,
        x_T: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Run the reverse chain from t = K−1 down to 0 and return x̂0.

        Gradients are not switched off here (the released code trains through the whole residual
        chain); wrap the call in ``torch.no_grad()`` for inference.

        Protocols:
            * ``deterministic=True`` ("clean" evaluation): no noise in any step, and x_T starts from
              zeros unless given, so the result is a deterministic function of the condition (and
              x_T). No random number is drawn.
            * ``deterministic=False``: x_T ~ N(0, I) unless given, and fresh noise in every DDPM
              step, drawn from ``generator`` (the global torch RNG when ``None``).

        For ``reverse="residual"`` the chain is x ← x − model(x, t, c) for t = K−1 … 0; the
        released code starts it from the noised encoder scores, so pass
        ``x_T = q_sample(x0, full(K−1))`` to reproduce it.

        Args:
            model: ``model(x_t (B, N), t (B,), condition (B, Dc)) -> (B, N)``.
            shape: ``(B, N)`` the shape of x̂0.
            condition: ``(B, Dc)`` query representation; gives the device and dtype of x_T.
            generator: RNG for x_T and the per-step noise, on ``condition``'s device.
            deterministic: see above.
            x_T: ``(B, N)`` the starting state, overriding the default.

        Returns:
            ``(B, N)`` x̂0.
        """
        shape = tuple(int(size) for size in shape)
        if len(shape) != 2 or shape[0] != condition.shape[0]:
            raise ValueError(
                f"shape must be (B, N) with B = condition batch {condition.shape[0]}, got {shape}"
            )
        device, dtype = condition.device, condition.dtype
        if x_T is not None:
            if tuple(x_T.shape) != shape:
                raise ValueError(f"x_T shape {tuple(x_T.shape)} != shape {shape}")
            x = x_T
        elif deterministic:
            x = torch.zeros(shape, device=device, dtype=dtype)
        else:
            x = torch.randn(shape, generator=generator, device=device, dtype=dtype)

        draw_noise = self.reverse == "ddpm" and not deterministic
        for step in range(self.num_timesteps - 1, -1, -1):
            t = torch.full((shape[0],), step, device=x.device, dtype=torch.long)
            noise = None
            if draw_noise and step > 0:
                noise = torch.randn(shape, generator=generator, device=x.device, dtype=x.dtype)
            elif draw_noise:
                noise = torch.zeros_like(x)  # unused at t = 0; avoids touching the global RNG
            out = self.p_sample(model, x, t, condition, noise=noise, deterministic=deterministic)
            x = out["sample"]
        return x

    # ---------------------------------------------------------------------------- training

    def training_losses(
        self,
        model: Model,
        x0: torch.Tensor,
        t: torch.Tensor,
        condition: torch.Tensor,
        noise: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """Noise x0 to x_t (eq. 4), run the denoiser, and return its x0 estimate and MSE.

        The caller adds the paper's KL and BCE terms on ``x0_pred``.

        * ``"ddpm"``: one model call at step t. ``mse`` is ‖ε − ε̂‖² (eq. 14, ``target="epsilon"``)
          or ‖x0 − x̂0‖² (``target="x0"``), averaged over N.
        * ``"residual"``: the released code's training: the residual chain is run with gradients
          from x_t for t+1 steps (s = t … 0; the released code always uses t = K−1), and
          ``x0_pred`` is its result. There is no per-step ε target in this chain; ``mse`` is
          ‖x0 − x̂0‖² averaged over N (equal to the error of the summed ε̂ against x_t − x0). The
          released code does not use it (weight 0 reproduces it).

        Args:
            model: ``model(x_t (B, N), t (B,), condition (B, Dc)) -> (B, N)``.
            x0: ``(B, N)`` clean scores.
            t: ``(B,)`` long timesteps in [0, K).
            condition: ``(B, Dc)`` query representation.
            noise: ``(B, N)`` ε; drawn from the global torch RNG when ``None``.

        Returns:
            dict with ``x_t`` ``(B, N)``, ``model_output`` ``(B, N)`` (under ``"residual"``: the sum
            of the subtracted outputs, x_t − x0_pred), ``x0_pred`` ``(B, N)`` and ``mse`` ``(B,)``.
        """
        if noise is None:
            noise = torch.randn_like(x0)
        x_t = self.q_sample(x0, t, noise)

        if self.reverse == "residual":
            x0_pred = self._residual_chain(model, x_t, t, condition)
            mse = ((x0_pred - x0) ** 2).mean(dim=1)
            return {"x_t": x_t, "model_output": x_t - x0_pred, "x0_pred": x0_pred, "mse": mse}

        model_output = _call_model(model, x_t, t, condition)
        if self.target == "epsilon":
            x0_pred = self.predict_x0_from_eps(x_t, t, model_output)
            target = noise
        else:
            x0_pred = model_output
            target = x0
        mse = ((model_output - target) ** 2).mean(dim=1)  # eq. 14 (mean over N, not sum)
        return {"x_t": x_t, "model_output": model_output, "x0_pred": x0_pred, "mse": mse}

    def _residual_chain(
        self, model: Model, x_t: torch.Tensor, t: torch.Tensor, condition: torch.Tensor
    ) -> torch.Tensor:
        """x ← x − model(x, s, c) for s = t_i … 0 per row; rows with a smaller t_i wait unchanged."""
        x = x_t
        for step in range(int(t.max()), -1, -1):
            s = torch.full_like(t, step)
            update = x - _call_model(model, x, s, condition)
            active = (t >= step).reshape(-1, *([1] * (x.dim() - 1)))
            x = torch.where(active, update, x)
        return x

    # ---------------------------------------------------------------------------- checks

    def _check_timesteps(self, t: torch.Tensor, x: torch.Tensor) -> None:
        if t.dim() != 1 or t.shape[0] != x.shape[0]:
            raise ValueError(f"t must have shape ({x.shape[0]},), got {tuple(t.shape)}")
        if t.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"t must be an integer tensor, got {t.dtype}")
        if t.numel() and (int(t.min()) < 0 or int(t.max()) >= self.num_timesteps):
            raise ValueError(f"timesteps must lie in [0, {self.num_timesteps}), got {t.tolist()}")


def _extract(
    arr: np.ndarray, t: torch.Tensor, shape: torch.Size, dtype: torch.dtype
) -> torch.Tensor:
    """``arr[t]`` as a tensor of ``dtype`` on ``t``'s device, broadcast to ``shape``.

    Args:
        arr: ``(K,)`` float64 schedule array.
        t: ``(B,)`` long timesteps.
        shape: ``(B, ...)`` the shape to broadcast to.
        dtype: the dtype of the input the values multiply.

    Returns:
        ``(B, ...)`` tensor (a broadcast view).
    """
    values = torch.from_numpy(arr).to(device=t.device, dtype=dtype)[t]
    return values.reshape(-1, *([1] * (len(shape) - 1))).expand(shape)


def _call_model(
    model: Model, x_t: torch.Tensor, t: torch.Tensor, condition: torch.Tensor
) -> torch.Tensor:
    output = model(x_t, t, condition)
    if output.shape != x_t.shape:
        raise ValueError(
            f"model output shape {tuple(output.shape)} != x_t shape {tuple(x_t.shape)}"
        )
    return output


# --------------------------------------------------------------------------------------------------
# What is diffused: the top-k candidate scores
# --------------------------------------------------------------------------------------------------


def select_top_k(
    scores: torch.Tensor, k: int, order: str = "score"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Keep the k highest-scoring candidates of each query: the vector x0 that is diffused.

    The released code keeps the top 1024 of the encoder's scores re-sorted by entity id
    (``order="id"``). Note that in neither order does a position stand for a fixed entity: with
    ``"score"`` position j is the j-th best candidate, with ``"id"`` it is the j-th smallest id among
    the kept ones (a fixed entity only when k equals the number of entities).

    Args:
        scores: ``(B, E)`` scores of every candidate entity.
        k: how many to keep, ``1 <= k <= E``.
        order: ``"score"`` (descending score) or ``"id"`` (ascending entity id).

    Returns:
        ``(values, indices)``, both ``(B, k)``: the kept scores (gradients flow to ``scores``) and
        their entity ids (long).
    """
    if scores.dim() != 2:
        raise ValueError(f"scores must be (B, E), got shape {tuple(scores.shape)}")
    if order not in TOP_K_ORDERS:
        raise ValueError(f"unknown top-k order {order!r}; valid orders: {', '.join(TOP_K_ORDERS)}")
    num_entities = scores.shape[1]
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= num_entities:
        raise ValueError(f"k must be an integer in [1, {num_entities}], got {k!r}")
    values, indices = torch.topk(scores, k, dim=1)
    if order == "id":
        indices = torch.sort(indices, dim=1).values
        values = torch.gather(scores, 1, indices)
    return values, indices


def scatter_top_k(
    values: torch.Tensor,
    indices: torch.Tensor,
    num_entities: int,
    fill: float | torch.Tensor | None = None,
) -> torch.Tensor:
    """Put (denoised) top-k values back into full score vectors: the inverse of :func:`select_top_k`.

    Entities outside the top-k get ``fill``:

    * ``None`` (default): per query, the minimum of the kept values minus 1 (detached, so it is a
      constant for any loss). Every dropped entity then ranks strictly below every kept one, and
      the score stays finite so softmax, BCE and KL stay finite.
    * a float: that constant for every query (``-inf`` works for ranking but not for losses).
    * a tensor ``(B, 1)`` (one value per query) or ``(B, E)`` (base scores; passing the encoder's
      own scores reproduces the released code, where a dropped entity keeps its raw score and may
      then outrank denoised ones).

    Args:
        values: ``(B, k)`` scores of the kept candidates.
        indices: ``(B, k)`` their entity ids, distinct per row.
        num_entities: E.
        fill: see above.

    Returns:
        ``(B, E)`` full score vectors; gradients flow to ``values`` (and to a tensor ``fill``).
    """
    if values.dim() != 2 or values.shape != indices.shape:
        raise ValueError(
            f"values and indices must both be (B, k); got {tuple(values.shape)} "
            f"and {tuple(indices.shape)}"
        )
    batch, k = values.shape
    if num_entities < k:
        raise ValueError(f"num_entities ({num_entities}) must be >= k ({k})")
    if fill is None:
        fill = values.detach().min(dim=1, keepdim=True).values - 1.0
    if isinstance(fill, torch.Tensor):
        if fill.dim() != 2 or fill.shape[0] != batch or fill.shape[1] not in (1, num_entities):
            raise ValueError(
                f"a tensor fill must be ({batch}, 1) or ({batch}, {num_entities}), "
                f"got {tuple(fill.shape)}"
            )
        base = fill.to(values.dtype).expand(batch, num_entities).contiguous()
    else:
        base = values.new_full((batch, num_entities), float(fill))
    return base.scatter(1, indices, values)
