"""DiffusionCom: the extractor's scores x_0 refined by a conditional diffusion over candidates.

This module wires the parts together; the diffusion math stays in :mod:`core.model.diffusion`, the
network pieces in :mod:`core.model.extractor` and :mod:`core.model.denoiser`.

What is diffused: the extractor's scores over all entities (``diffuse="full"``) or over its top-k
candidates (``"top-k"``, ordered by score or, as the released code does, by entity id), by default
standardised per query (zero mean, unit variance) so that the noise schedule means the same thing
whatever the scale of the logits (``x0="raw"`` diffuses the raw logits, as the released code does).
Ranking is unchanged by that standardisation.

Inference starts the reverse chain from the noised x_0, ``x_K = sqrt(ᾱ_K)·x_0 + sqrt(1−ᾱ_K)·ε``, as
the released code does: with the released linear schedule ᾱ_K is near 0.9, so a chain started from
pure noise would not match the forward process. The ``clean`` protocol uses ε = 0 and a deterministic
chain; the ``official`` passes draw ε and step noise at random.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from core.config import DiffusionConfig, LossConfig
from core.model.denoiser import CDenoiser
from core.model.diffusion import GaussianDiffusion, scatter_top_k, select_top_k
from core.model.extractor import ExtractorOutput, StructureMKGformer

__all__ = [
    "DiffusionCom",
    "StackedLossWeights",
    "stacked_stage2_loss",
    "stage2_loss",
    "standardise",
]


def standardise(scores: torch.Tensor) -> torch.Tensor:
    """``(B, N)`` scores → zero mean, unit standard deviation per row."""
    centred = scores - scores.mean(dim=1, keepdim=True)
    return centred / (centred.std(dim=1, keepdim=True) + 1e-6)


class DiffusionCom(nn.Module):
    """The extractor (stage 1) and the denoiser (stage 2) with the diffusion process.

    Args:
        extractor: Structure-MKGformer.
        diffusion: the diffusion settings; ``enabled=False`` builds no denoiser (stage 1 only).
    """

    def __init__(self, extractor: StructureMKGformer, diffusion: DiffusionConfig) -> None:
        super().__init__()
        self.extractor = extractor
        self.settings = diffusion
        self.num_entities = extractor.num_entities
        self.num_diffused = (
            min(diffusion.top_k, self.num_entities)
            if diffusion.diffuse == "top-k"
            else self.num_entities
        )
        self.denoiser = None
        self.diffusion = None
        if diffusion.enabled:
            width = extractor.entity_embedding.embedding_dim
            self.denoiser = CDenoiser(
                num_outputs=self.num_diffused,
                condition_dim=2 * width,  # Z'_mask and the pooled visual tokens
                width=diffusion.denoiser_width,
                depth=diffusion.denoiser_depth,
                dropout=diffusion.denoiser_dropout,
            )
            self.diffusion = GaussianDiffusion.from_schedule(
                diffusion.schedule,
                diffusion.steps,
                target=diffusion.target,
                reverse=diffusion.reverse,
                beta_start=diffusion.beta_start,
                beta_end=diffusion.beta_end,
            )

    # ------------------------------------------------------------------------------ pieces

    def _x0(
        self, output: ExtractorOutput
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """x_0 ``(B, N)``, the kept entity ids ``(B, N)`` (``None`` for all) and the condition."""
        scores = output.scores
        indices = None
        if self.settings.diffuse == "top-k":
            scores, indices = select_top_k(
                scores, self.num_diffused, order=self.settings.top_k_order
            )
        condition = torch.cat([output.condition, output.visual], dim=1)
        x0 = standardise(scores) if self.settings.x0 == "standardised" else scores
        return x0, indices, condition

    def _full_scores(
        self, x0_hat: torch.Tensor, indices: torch.Tensor | None, extractor_scores: torch.Tensor
    ) -> torch.Tensor:
        """Put diffused values back over all ``E`` entities.

        Outside the top-k an entity ranks below every kept one (``top_k_fill="below-kept"``) or
        keeps the extractor's ``(B, E)`` score (``"extractor"``, as the released code does).
        """
        if indices is None:
            return x0_hat
        fill = extractor_scores if self.settings.top_k_fill == "extractor" else None
        return scatter_top_k(x0_hat, indices, self.num_entities, fill=fill)

    def _denoiser_output(
        self, x_t: torch.Tensor, t: torch.Tensor, condition: torch.Tensor
    ) -> torch.Tensor:
        """The denoiser as the diffusion sees it: ``(B, N)`` x̂_0 or ε̂ for ``(B, N)`` x_t.

        Under ``target="x0"`` the network predicts a correction to the skip estimate
        ``x_t / sqrt(ᾱ_t)`` (the x_0 that x_t implies with ε = 0), so an untrained, zero-initialised
        denoiser returns the extractor's ranking unchanged and training only has to learn how to
        improve it. Under ``target="epsilon"`` a zero ε̂ already implies that same estimate.
        """
        output = self.denoiser(x_t, t, condition)
        if self.settings.target != "x0":
            return output
        skip = torch.as_tensor(
            self.diffusion.sqrt_recip_alphas_cumprod, dtype=x_t.dtype, device=x_t.device
        )[t].unsqueeze(1)
        return skip * x_t + output

    # ------------------------------------------------------------------------------ inference

    def stage1_scores(self, heads: torch.Tensor, relations: torch.Tensor) -> torch.Tensor:
        """``(B, E)`` extractor scores (the model without diffusion)."""
        return self.extractor(heads, relations).scores

    def scores(
        self,
        heads: torch.Tensor,
        relations: torch.Tensor,
        *,
        stochastic: bool = False,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """``(B, E)`` final scores: x̂_0 from the reverse chain (or stage-1 scores without diffusion).

        ``stochastic=False`` is the clean protocol (ε = 0, no step noise, no random draw);
        ``stochastic=True`` draws the start noise and step noise from ``generator``.
        """
        output = self.extractor(heads, relations)
        if self.diffusion is None:
            return output.scores
        x0, indices, condition = self._x0(output)
        last = torch.full(
            (len(heads),), self.diffusion.num_timesteps - 1, dtype=torch.long, device=x0.device
        )
        noise = (
            torch.randn(x0.shape, generator=generator, device=x0.device)
            if stochastic
            else torch.zeros_like(x0)
        )
        x_T = self.diffusion.q_sample(x0, last, noise)
        x0_hat = self.diffusion.sample(
            self._denoiser_output,
            x0.shape,
            condition,
            generator=generator,
            deterministic=not stochastic,
            x_T=x_T,
        )
        return self._full_scores(x0_hat, indices, output.scores)

    # ------------------------------------------------------------------------------ losses

    def forward(
        self, heads: torch.Tensor, relations: torch.Tensor, labels: torch.Tensor, loss: LossConfig
    ) -> dict[str, torch.Tensor]:
        """The stage-2 training loss (see :meth:`denoising_loss`).

        Training goes through ``forward`` so that a distributed wrapper (DDP under Accelerate)
        sees the call and synchronises gradients; inference uses :meth:`scores`.
        """
        return self.denoising_loss(heads, relations, labels, loss)

    def denoising_loss(
        self, heads: torch.Tensor, relations: torch.Tensor, labels: torch.Tensor, loss: LossConfig
    ) -> dict[str, torch.Tensor]:
        """Stage-2 loss: ``w_kl·KL(softmax(x_0) ‖ softmax(x̂_0)) + w_bce·BCE(x̂_0, labels)``.

        The KL is summed over the ``N`` diffused entities (``loss.kl_reduction="sum"``) or averaged
        over them (``"mean"``); the BCE is averaged over them; both are averaged over the batch.

        Args:
            labels: ``(B, E)`` multi-hot training answers (already smoothed).

        Returns:
            ``{"loss", "kl", "bce"}`` scalars.
        """
        output = self.extractor(heads, relations)
        x0, indices, condition = self._x0(output)
        if self.settings.reverse == "residual":
            t = torch.full(
                (len(heads),), self.diffusion.num_timesteps - 1, dtype=torch.long, device=x0.device
            )
        else:
            t = torch.randint(0, self.diffusion.num_timesteps, (len(heads),), device=x0.device)
        x0_hat = self.diffusion.training_losses(self._denoiser_output, x0, t, condition)["x0_pred"]
        targets = labels if indices is None else labels.gather(1, indices)
        return stage2_loss(x0, x0_hat, targets, loss)


def stage2_loss(
    x0: torch.Tensor, x0_hat: torch.Tensor, targets: torch.Tensor, loss: LossConfig
) -> dict[str, torch.Tensor]:
    """``w_kl·KL(softmax(x_0) ‖ softmax(x̂_0)) + w_bce·BCE(x̂_0, targets)`` of ``(B, N)`` tensors
    (see :meth:`DiffusionCom.denoising_loss`); ``{"loss", "kl", "bce"}`` scalars."""
    # The target distribution is detached, as in the released code: under
    # stage2_extractor=finetune the KL then trains the denoiser towards the extractor, never
    # the extractor towards the denoiser's reconstruction.
    kl = F.kl_div(
        F.log_softmax(x0_hat, dim=1),
        F.log_softmax(x0.detach(), dim=1),
        log_target=True,
        reduction="batchmean",
    )
    if loss.kl_reduction == "mean":
        kl = kl / x0.shape[1]
    bce = F.binary_cross_entropy_with_logits(x0_hat, targets)
    return {"loss": loss.w_kl * kl + loss.w_bce * bce, "kl": kl.detach(), "bce": bce.detach()}


@dataclass(frozen=True)
class StackedLossWeights:
    """The loss settings of A models as ``(A,)`` device tensors (:func:`stacked_stage2_loss`);
    built once, since each tensor made from host values is a copy a GPU stream waits on."""

    w_kl: torch.Tensor  # float32
    w_bce: torch.Tensor  # float32
    kl_per_entity: torch.Tensor  # bool: loss.kl_reduction == "mean"

    @classmethod
    def of(cls, losses: Sequence[LossConfig], device: torch.device | str) -> StackedLossWeights:
        return cls(
            w_kl=torch.tensor([loss.w_kl for loss in losses], dtype=torch.float32, device=device),
            w_bce=torch.tensor([loss.w_bce for loss in losses], dtype=torch.float32, device=device),
            kl_per_entity=torch.tensor(
                [loss.kl_reduction == "mean" for loss in losses], device=device
            ),
        )


def stacked_stage2_loss(
    x0: torch.Tensor,
    x0_hat: torch.Tensor,
    targets: torch.Tensor,
    losses: StackedLossWeights | Sequence[LossConfig],
) -> dict[str, torch.Tensor]:
    """:func:`stage2_loss` of A models at once (a fused pack, ``core.train.fused``).

    Args:
        x0: ``(B, N)`` the shared target scores.
        x0_hat: ``(A, B, N)`` each model's reconstruction.
        targets: ``(B, N)`` the shared labels.
        losses: each model's loss settings (its ``w_kl``, ``w_bce``, ``kl_reduction``), or
            them as :class:`StackedLossWeights`.

    Returns:
        ``{"loss", "kl", "bce"}``, each ``(A,)``: row ``i`` is ``stage2_loss(x0, x0_hat[i],
        targets, losses[i])``. The same element-wise ops, each row's sums over its own
        ``(B, N)`` block and the weights as float32 factors, as a Python float multiplies a
        float32 tensor: on one CPU thread each row equals the lone value bitwise.
    """
    if not isinstance(losses, StackedLossWeights):
        losses = StackedLossWeights.of(losses, x0_hat.device)
    batch, entities = x0.shape
    # F.kl_div(input, target, log_target=True) is exp(target) · (target − input), summed and
    # divided by B under "batchmean"; exp(target) is the shared (B, N) one, computed once.
    log_target = F.log_softmax(x0.detach(), dim=1)
    kl = (log_target.exp() * (log_target - F.log_softmax(x0_hat, dim=2))).sum(dim=(1, 2)) / batch
    kl = torch.where(losses.kl_per_entity, kl / entities, kl)
    bce = _RowMeanBCEWithLogits.apply(x0_hat, targets)
    return {
        "loss": losses.w_kl * kl + losses.w_bce * bce,
        "kl": kl.detach(),
        "bce": bce.detach(),
    }


class _RowMeanBCEWithLogits(torch.autograd.Function):
    """``(A,)`` each row's ``F.binary_cross_entropy_with_logits(logits[i], targets)`` (mean
    reduction) for ``(A, B, N)`` logits and shared ``(B, N)`` targets.

    The backward is the one ``reduction="mean"`` has, ((σ(x) − y) · g) / (B·N), per row; the
    mean of ``reduction="none"`` would scale first, g / (B·N), and round differently.
    """

    @staticmethod
    def forward(ctx, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(logits, targets)
        elementwise = F.binary_cross_entropy_with_logits(
            logits, targets.expand_as(logits), reduction="none"
        )
        return elementwise.mean(dim=(1, 2))

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        logits, targets = ctx.saved_tensors
        grad_logits = (logits.sigmoid() - targets) * grad.reshape(-1, 1, 1)
        return grad_logits.div_(targets.numel()), None
