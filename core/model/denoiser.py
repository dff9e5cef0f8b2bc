"""CDenoiser: the conditional denoiser network of DiffusionCom.

A residual MLP over a noised score vector x_t ``(B, N)``, conditioned on the timestep t ``(B,)`` and
the query representation ``condition`` ``(B, Dc)`` (Z'_mask from the extractor, optionally
concatenated with pooled visual tokens by the caller). It is a plain network: it knows nothing of
the noise schedule, and what its output means (x0 or ε) is decided by the diffusion module, which
this file does not import.

Design (the paper describes "an MLP block conditioned on Z'_mask and the timestep"; the released
code's blocks reduce to ``x + Linear(c + τ_t)`` with the MLP defined but never called):

* input projection N → width;
* embedding e = MLP(sinusoidal(t)) + Linear(condition), both of size ``width``;
* ``depth`` residual blocks: h ← h + Linear(Dropout(SiLU(Linear(FiLM_e(LayerNorm(h)))))), where
  FiLM_e(z) = z · (1 + scale(e)) + shift(e) with (scale, shift) = Linear(SiLU(e)) per block;
* output head Linear(LayerNorm(h)) : width → N, zero-initialised.

Why FiLM rather than adding e: the condition is the only carrier of the query, and x_t is a noisy
score vector whose features should be weighted differently per query and per noise level. A scale
can gate features multiplicatively, which an added bias cannot; with ``1 + scale`` and the shift it
contains the additive variant as the special case scale = 0. This is improved-diffusion's
``use_scale_shift_norm``, which its authors found to help.

Why the zero-initialised head: at initialisation the denoiser outputs exactly 0. Under an ε target
every reverse step then starts as the identity (the residual chain returns x_T unchanged, so the
untrained model keeps the encoder's ranking instead of subtracting K random vectors from it), and
the loss starts at a known value (E‖ε‖² = 1). improved-diffusion zero-initialises its output layer
for the same reason. Consequence: on the very first backward pass only the head gets a gradient
(∂output/∂h = W_head = 0); from the second step on every parameter does.
"""

from __future__ import annotations

import math

import torch
from torch import nn

__all__ = ["CDenoiser", "timestep_embedding"]


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal timestep embedding, as improved-diffusion's ``timestep_embedding``.

    Args:
        t: ``(B,)`` timesteps (integer or float).
        dim: embedding size; an odd size gets a zero last column.
        max_period: the longest period of the sinusoids.

    Returns:
        ``(B, dim)`` float32 ``[cos(t · f_i), sin(t · f_i)]`` with f_i = max_period^(−i / half).
    """
    half = dim // 2
    freqs = torch.exp(
        -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half
    )
    args = t.to(torch.float32)[:, None] * freqs[None, :]
    embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        embedding = torch.cat([embedding, torch.zeros_like(embedding[:, :1])], dim=-1)
    return embedding


class _DenoiserBlock(nn.Module):
    """h ← h + Linear(Dropout(SiLU(Linear(FiLM_e(LayerNorm(h)))))); h ``(B, W)``, e ``(B, W)``."""

    def __init__(self, width: int, mlp_ratio: int, dropout: float) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.film = nn.Sequential(nn.SiLU(), nn.Linear(width, 2 * width))
        self.mlp = nn.Sequential(
            nn.Linear(width, width * mlp_ratio),
            nn.SiLU(),
            nn.Dropout(dropout),
            nn.Linear(width * mlp_ratio, width),
        )

    def forward(self, h: torch.Tensor, embedding: torch.Tensor) -> torch.Tensor:
        scale, shift = self.film(embedding).chunk(2, dim=-1)
        return h + self.mlp(self.norm(h) * (1 + scale) + shift)


class CDenoiser(nn.Module):
    """Conditional denoiser: ``forward(x_t (B, N), t (B,), condition (B, Dc)) -> (B, N)``.

    Args:
        num_outputs: N, the length of the diffused score vector (e.g. the top-k size).
        condition_dim: Dc, the size of the condition vector.
        width: hidden width of the residual stream.
        depth: number of residual blocks, ``>= 1`` (the paper finds one block best).
        dropout: dropout inside each block's MLP, in [0, 1).
        time_embedding_dim: size of the sinusoidal timestep embedding, ``>= 2``.
        mlp_ratio: each block's MLP hidden size is ``width * mlp_ratio`` (the released code's
            unused MLP has 1024 → 2048, i.e. 2).
    """

    def __init__(
        self,
        num_outputs: int,
        condition_dim: int,
        width: int,
        depth: int,
        dropout: float = 0.0,
        time_embedding_dim: int = 128,
        mlp_ratio: int = 2,
    ) -> None:
        super().__init__()
        for name, value, minimum in (
            ("num_outputs", num_outputs, 1),
            ("condition_dim", condition_dim, 1),
            ("width", width, 1),
            ("depth", depth, 1),
            ("time_embedding_dim", time_embedding_dim, 2),
            ("mlp_ratio", mlp_ratio, 1),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must lie in [0, 1), got {dropout!r}")
        self.num_outputs = num_outputs
        self.condition_dim = condition_dim
        self.time_embedding_dim = time_embedding_dim

        self.input_projection = nn.Linear(num_outputs, width)
        self.time_mlp = nn.Sequential(
            nn.Linear(time_embedding_dim, width), nn.SiLU(), nn.Linear(width, width)
        )
        self.condition_projection = nn.Linear(condition_dim, width)
        self.blocks = nn.ModuleList(_DenoiserBlock(width, mlp_ratio, dropout) for _ in range(depth))
        self.output_norm = nn.LayerNorm(width)
        self.output = nn.Linear(width, num_outputs)
        nn.init.zeros_(self.output.weight)  # predicts 0 at init: see the module docstring
        nn.init.zeros_(self.output.bias)

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, condition: torch.Tensor) -> torch.Tensor:
        """Predict x0 or ε (as the diffusion's ``target`` says) for a batch.

        Args:
            x_t: ``(B, N)`` noised scores.
            t: ``(B,)`` long timesteps.
            condition: ``(B, Dc)`` query representation.

        Returns:
            ``(B, N)``.
        """
        if x_t.dim() != 2 or x_t.shape[1] != self.num_outputs:
            raise ValueError(f"x_t must be (B, {self.num_outputs}), got {tuple(x_t.shape)}")
        batch = x_t.shape[0]
        if t.shape != (batch,):
            raise ValueError(f"t must be ({batch},), got {tuple(t.shape)}")
        if condition.shape != (batch, self.condition_dim):
            raise ValueError(
                f"condition must be ({batch}, {self.condition_dim}), got {tuple(condition.shape)}"
            )
        h = self.input_projection(x_t)
        time = timestep_embedding(t, self.time_embedding_dim).to(h.dtype)
        embedding = self.time_mlp(time) + self.condition_projection(condition)
        for block in self.blocks:
            h = block(h, embedding)
        return self.output(self.output_norm(h))
