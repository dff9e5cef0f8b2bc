"""Fused stage 2: N denoisers trained over one frozen extractor in one loop (horizontal fusion).

A stage-2 study (K, noise schedule, loss weights, dropout, learning rate) trains many denoisers of
one shape on the same frozen stage-1 extractor. Run alone, each trial encodes the same queries and
runs its own small matrix multiplies. Here one extractor scores each batch once, the N denoisers'
parameters are stacked along a leading member axis and run as one batched network
(``torch.baddbmm``), and each member keeps what makes it a run of its own:

* its config, its learning-rate schedule and its early stopping, and its optimizer state:
  AdamW's moments and step count are its row of the pack's one stacked AdamW
  (:class:`_StackedAdamW`, one step of all members per batch), checkpointed as its own
  ``AdamW``'s state;
* its own noise: the timesteps, diffusion noise and dropout masks a lone run draws from the global
  RNG are drawn from a per-member generator started exactly where the lone run's global RNG starts,
  in the same order, so a member continues the same random streams as its lone twin;
* its own run folder, written by the lone trainer's own functions (``config.json``,
  ``metrics.jsonl``, ``checkpoints/last.pt``, ``results.json``, ``ranks_*.npz``): a member's folder
  is a lone run's folder, resumable alone with :func:`core.train.trainer.train`.

Per batch the pack does one extractor pass, one batched denoiser forward, one batched loss
(:func:`core.model.diffusioncom.stacked_stage2_loss`), one backward and one optimizer step; only
the random draws (and, on a CPU, LayerNorm: below) are per member. On a GPU the operators
launched and the waits on the device bound a pack more than its arithmetic does
(``benchmarks/bench_fused.py --count-ops`` counts both per training batch).

Equivalence with the lone trainer: ``baddbmm`` runs each member's slice through the same GEMM as
``F.linear``'s ``addmm``, LayerNorm runs per member (on a CPU), and the stacked loss and optimizer
repeat the lone code's element-wise ops in its order and reduce each member's own block, so on one
CPU thread a member's losses, weights, moments and metrics are bitwise those of its lone twin
(tests/core/train/test_fused.py checks it); transcendental element-wise kernels (SiLU, the loss's
exp and log) run per member too when a member's slice does not start where a lone tensor's would
in the vector loop.

Evaluation is fused the same way (:func:`_rank_pack`): each batch of valid or test queries goes
through the frozen extractor once for the whole pack, and the members' deterministic reverse chains
(the clean protocol) run stacked, each member's chain its own length K; a lone chain's per-step
recomputation of the condition's projection, and of the time MLP in every batch, is done once
(same inputs, same kernels: same values). Per-epoch validation ranks all members at once; the final
evaluation ranks them at once into one fresh query cache (filled split by split as each lone run
fills its own) and computes the stage-1 metrics, which depend on the extractor only, once. The
official protocol's passes and ``eval.clean_inference=mean-of-samples`` draw noise per member and
stay the lone code's.

Checkpoints keep the lone format (a member's ``last.pt`` resumes with ``train``), but the frozen
extractor's tensors in a member's ``model``, ``best_stage1`` and ``best_stage2`` entries are the
pack's one extractor rather than copies, so memory holds it once and ``torch.save`` writes it once
per file.

A member whose loss turns NaN or infinite fails alone (its folder is left as the lone trainer's
:class:`~core.train.trainer.NonFiniteLossError` leaves it: the last epoch's checkpoint, no
results); an early-stopped or failed member leaves the batched step, so it neither changes nor
costs the others time.
"""

from __future__ import annotations

import hashlib
import json
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from tqdm.auto import tqdm

from core.config import (
    ConfigError,
    ExperimentConfig,
    config_from_dict,
    config_to_dict,
    save_config,
    stage1_relevant,
)
from core.data.graph import KnowledgeGraph
from core.evaluation import RankAccumulator, RankingResult
from core.model.denoiser import CDenoiser, timestep_embedding
from core.model.diffusioncom import (
    DiffusionCom,
    StackedLossWeights,
    stacked_stage2_loss,
    stage2_loss,
)
from core.train.checkpoint import CheckpointError, load_checkpoint, rng_state
from core.train.trainer import (
    NonFiniteLossError,
    TrainingRun,
    TrainingSplit,
    _check_resume_config,
    _check_stage1_compatible,
    _epoch_batches,
    _epoch_record,
    _final_results,
    _final_stage,
    _finish_epoch,
    _forget_epochs_after,
    _keeps_query_cache,
    _labels,
    _load_extractor,
    _load_weights,
    _new_stage_progress,
    _scheduler,
    _seed_for,
    _stage1_metrics,
    _validates_after,
    build_model,
    evaluate_clean,
    load_run_dataset,
    training_split,
)
from runstore import CHECKPOINT_DIR, CONFIG, METRICS, RESULTS, checkpoint_path, flatten, write_json

__all__ = [
    "FUSED_SHARED_DIFFUSION_KEYS",
    "DoneCallback",
    "PackCallback",
    "member_memory_mib",
    "pack_groups",
    "pack_key",
    "train_fused",
]

PackCallback = Callable[[int, dict], None]
"""Called with a member's index in the pack and each of its epoch records."""

DoneCallback = Callable[[int, "dict | BaseException"], None]
"""Called once per member, as soon as it is done: its index and its results (or what failed it)."""

FUSED_SHARED_DIFFUSION_KEYS = (
    "enabled",
    "denoiser_width",
    "denoiser_depth",
    "diffuse",
    "top_k",
    "top_k_order",
    "x0",
    "reverse",
)
"""``diffusion`` keys every member of a pack shares besides the stage-1 ones: the denoiser's
parameter shapes (width, depth, and the diffused length N that ``diffuse``/``top_k`` fix) and the
x_0 the pack computes once per batch (``top_k_order``, ``x0``); ``reverse`` must be ``ddpm``."""

_PARAMETERS_USED = {
    "input_projection.weight",
    "input_projection.bias",
    "time_mlp.0.weight",
    "time_mlp.0.bias",
    "time_mlp.2.weight",
    "time_mlp.2.bias",
    "condition_projection.weight",
    "condition_projection.bias",
    "output_norm.weight",
    "output_norm.bias",
    "output.weight",
    "output.bias",
}
_BLOCK_PARAMETERS_USED = ("norm", "film.1", "mlp.0", "mlp.3")


# ------------------------------------------------------------------------------------------ checks


def _check_pack(configs: Sequence[ExperimentConfig], out_dirs: Sequence[Path]) -> None:
    """A pack is N stage-2 runs of one stage 1 and one denoiser shape; anything else is an error
    naming the key and the members that differ."""
    if not configs:
        raise ConfigError("train_fused needs at least one config")
    if len(configs) != len(out_dirs):
        raise ConfigError(f"train_fused got {len(configs)} configs but {len(out_dirs)} out_dirs")
    if len(set(out_dirs)) != len(out_dirs):
        raise ConfigError("train_fused: every member needs its own out_dir; some are the same")
    for index, config in enumerate(configs):
        where = f"fused member {index} ({out_dirs[index]})"
        for key, value, expected in _unfusable(config):
            raise ConfigError(
                f"{where}: {key}={value!r}, but fused stage 2 trains only {key}={expected!r} "
                "(a frozen extractor's diffusion denoiser, DDPM training, float32); train "
                "this config alone"
            )
    first = _shared_values(configs[0])
    for index, config in enumerate(configs[1:], start=1):
        values = _shared_values(config)
        differing = [key for key in first if first[key] != values[key]]
        if differing:
            shown = ", ".join(
                f"{key} ({first[key]!r} in member 0, {values[key]!r} in member {index})"
                for key in differing[:5]
            )
            raise ConfigError(
                f"fused members 0 ({out_dirs[0]}) and {index} ({out_dirs[index]}) differ in "
                f"{shown}; a pack shares every stage-1 key and the denoiser's shape "
                f"(diffusion.{', diffusion.'.join(FUSED_SHARED_DIFFUSION_KEYS)})"
            )


def _unfusable(config: ExperimentConfig) -> list[tuple[str, object, object]]:
    """``(key, value, expected)`` of every setting that keeps ``config`` out of a pack."""
    required = {
        "baseline.model": (config.baseline.model, "none"),
        "loss.stage2_extractor": (config.loss.stage2_extractor, "frozen"),
        "loss.stage2_objective": (config.loss.stage2_objective, "diffusion"),
        "diffusion.enabled": (config.diffusion.enabled, True),
        "diffusion.reverse": (config.diffusion.reverse, "ddpm"),
    }
    unfit = [
        (key, value, expected) for key, (value, expected) in required.items() if value != expected
    ]
    if config.train.stage2_epochs == 0:
        unfit.append(("train.stage2_epochs", 0, "> 0"))
    if config.train.mixed_precision == "fp16":
        # fp16 needs a loss scaler per member; bf16 (no scaler) fuses.
        unfit.append(("train.mixed_precision", "fp16", "no or bf16"))
    return unfit


def pack_key(config: ExperimentConfig) -> str | None:
    """What a config must share with the others of a pack (its stage 1, the denoiser's shape, the
    stage-2 queries), as a short hash; None when it cannot be fused (see :func:`train_fused`)."""
    if _unfusable(config):
        return None
    text = json.dumps(_shared_values(config), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _shared_values(config: ExperimentConfig) -> dict:
    values = flatten(stage1_relevant(config))
    values.update(
        {f"diffusion.{key}": getattr(config.diffusion, key) for key in FUSED_SHARED_DIFFUSION_KEYS}
    )
    # One pass over one set of training queries feeds every member.
    values["train.stage2_queries"] = config.train.stage2_queries
    return values


# ------------------------------------------------------------------------------------------ the network


def _linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """Per-member ``F.linear``: ``(A, B, I)`` (or one ``(B, I)`` for all) → ``(A, B, O)``.

    ``baddbmm`` runs each member's slice through the GEMM ``addmm`` runs for a lone ``F.linear``
    (bias as the accumulator's start), so each slice is bitwise the lone result, backward too.
    """
    if x.dim() == 2:
        x = x.expand(weight.shape[0], *x.shape)
    return torch.baddbmm(bias.unsqueeze(1), x, weight.transpose(1, 2))


def _layer_norm(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float):
    """Per-member LayerNorm of ``(A, B, W)``: on a CPU one call per member, since a batched
    affine (normalise, then scale) rounds differently from the fused kernel a lone run uses; on
    an accelerator, whose members differ from their lone twins in rounding anyway (batched GEMMs
    sum in other orders), :func:`_batched_layer_norm`, two kernels for the whole pack where
    per-member calls launch 2·A."""
    if h.device.type != "cpu":
        return _batched_layer_norm(h, weight, bias, eps)
    # unbind, not h[i]: its backward stacks the members' gradients once, where A selects would
    # each scatter into a zero (A, B, W) tensor.
    width = h.shape[-1]
    return torch.stack(
        [
            F.layer_norm(slice_, (width,), w, b, eps)
            for slice_, w, b in zip(h.unbind(0), weight.unbind(0), bias.unbind(0), strict=True)
        ]
    )


def _batched_layer_norm(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float):
    """LayerNorm of ``(A, B, W)`` with each member's ``(A, W)`` affine: one normalisation over
    the stack, then ``bias + normed · weight`` per member (equal to per-member LayerNorm up to
    float32 rounding; tests/core/train/test_fused.py bounds the difference)."""
    normed = F.layer_norm(h, (h.shape[-1],), None, None, eps)
    return torch.addcmul(bias.unsqueeze(1), normed, weight.unsqueeze(1))


def _silu(x: torch.Tensor) -> torch.Tensor:
    """Per-member SiLU of ``(A, B, W)``, forward and backward.

    CPU element-wise kernels run whole vectors (2 x 16 floats under AVX-512) and finish the tail
    with scalar code whose ``exp`` rounds differently; on the stacked tensor a member's last
    elements can fall in a vector where its lone run had them in the tail (whenever ``B·W`` is
    not a multiple of 32), so SiLU runs on each member's slice as a lone run does. When a slice
    is a whole number of 64-float blocks every member's elements meet the vector code at the same
    offsets as alone and no tail exists, so one call over the stack computes the same values.
    """
    aligned = x[0].numel() % _ALIGNED_FLOATS == 0 and x.is_contiguous()
    if aligned or x.device.type != "cpu":  # GPU kernels have no scalar tail
        return F.silu(x)
    return torch.stack([F.silu(slice_) for slice_ in x.unbind(0)])


_ALIGNED_FLOATS = 64
"""A slice of this many floats (a multiple of every CPU vector loop's block) has no scalar tail."""


def _check_denoiser(denoiser: CDenoiser) -> None:
    """The fused forward below mirrors ``CDenoiser.forward`` by hand; a parameter it does not
    know means the two have drifted apart."""
    known = set(_PARAMETERS_USED)
    for index in range(len(denoiser.blocks)):
        for part in _BLOCK_PARAMETERS_USED:
            known |= {f"blocks.{index}.{part}.weight", f"blocks.{index}.{part}.bias"}
    names = {name for name, _ in denoiser.named_parameters()}
    if names != known:
        raise RuntimeError(
            f"core.train.fused does not mirror CDenoiser any more: parameters "
            f"{sorted(names ^ known)} are new or gone; update _stacked_denoiser"
        )


def _condition_embedding(params: dict[str, torch.Tensor], condition: torch.Tensor) -> torch.Tensor:
    """``(A, B, width)`` each member's projection of the ``(B, Dc)`` condition all share."""
    return _linear(
        condition, params["condition_projection.weight"], params["condition_projection.bias"]
    )


def _time_embedding(
    template: CDenoiser, params: dict[str, torch.Tensor], t: torch.Tensor
) -> torch.Tensor:
    """``(A, B, width)`` each member's time MLP of its ``(A, B)`` timesteps."""
    members, batch = t.shape
    dtype = params["time_mlp.0.weight"].dtype
    time = timestep_embedding(t.reshape(-1), template.time_embedding_dim).to(dtype)
    time = time.reshape(members, batch, -1)
    time = _linear(time, params["time_mlp.0.weight"], params["time_mlp.0.bias"])
    return _linear(_silu(time), params["time_mlp.2.weight"], params["time_mlp.2.bias"])


def _stacked_denoiser(
    template: CDenoiser,
    params: dict[str, torch.Tensor],
    x_t: torch.Tensor,
    embedding: torch.Tensor,
    masks: list[torch.Tensor] | None,
) -> torch.Tensor:
    """``CDenoiser.forward`` for A members at once.

    Args:
        template: one member's network (its sizes and LayerNorm eps; its weights are not used).
        params: ``(A, ...)`` stacked parameters, named as ``template.named_parameters()``.
        x_t: ``(A, B, N)`` each member's noised scores.
        embedding: ``(A, B, width)`` each member's time embedding plus condition embedding
            (:func:`_time_embedding` + :func:`_condition_embedding`, added in that order as
            ``CDenoiser.forward`` adds them); split out because a reverse chain reuses the
            condition's part at every step and the time's part in every batch.
        masks: per block, ``(A, B, width·mlp_ratio)`` dropout multipliers (0 or ``1/(1−p)``; 1 for
            a member without dropout), or ``None`` when no member drops out.

    Returns:
        ``(A, B, N)`` each member's denoiser output.
    """
    h = _linear(x_t, params["input_projection.weight"], params["input_projection.bias"])
    for index, block in enumerate(template.blocks):
        name = f"blocks.{index}."
        film = _linear(
            _silu(embedding), params[name + "film.1.weight"], params[name + "film.1.bias"]
        )
        scale, shift = film.chunk(2, dim=-1)
        normed = _layer_norm(
            h, params[name + "norm.weight"], params[name + "norm.bias"], block.norm.eps
        )
        inner = _linear(
            normed * (1 + scale) + shift, params[name + "mlp.0.weight"], params[name + "mlp.0.bias"]
        )
        inner = _silu(inner)
        if masks is not None:
            inner = inner * masks[index]
        h = h + _linear(inner, params[name + "mlp.3.weight"], params[name + "mlp.3.bias"])
    normed = _layer_norm(
        h, params["output_norm.weight"], params["output_norm.bias"], template.output_norm.eps
    )
    return _linear(normed, params["output.weight"], params["output.bias"])


# ------------------------------------------------------------------------------------------ evaluation

_TIME_CACHE_BYTES = 256 * 2**20
"""Most bytes one pack evaluation keeps of time embeddings (reused by every batch of a size)."""


def _schedules(models: Sequence[DiffusionCom], names: Sequence[str]) -> np.ndarray:
    """``(A, len(names), K_max)`` float64: each model's ``GaussianDiffusion`` arrays ``names``,
    zero past its own K. Cast to a device dtype from here, as ``core.model.diffusion._extract``
    casts them, they are the values a lone run multiplies by."""
    longest = max(model.diffusion.num_timesteps for model in models)
    table = np.zeros((len(models), len(names), longest))
    for position, model in enumerate(models):
        for row, name in enumerate(names):
            values = getattr(model.diffusion, name)
            table[position, row, : len(values)] = values
    return table


def _schedule_table(model: DiffusionCom, device: torch.device) -> torch.Tensor:
    """The ``(4, K)`` float32 schedule values a member's deterministic reverse step multiplies by
    (rows: ``sqrt_recip_alphas_cumprod``, ``sqrt_recipm1_alphas_cumprod``,
    ``posterior_mean_coef1``, ``posterior_mean_coef2``)."""
    names = (
        "sqrt_recip_alphas_cumprod",
        "sqrt_recipm1_alphas_cumprod",
        "posterior_mean_coef1",
        "posterior_mean_coef2",
    )
    return torch.from_numpy(_schedules([model], names)[0]).to(device=device, dtype=torch.float32)


def _reverse_step(
    x_t: torch.Tensor, raw: torch.Tensor, coefficients: torch.Tensor, is_x0: torch.Tensor
) -> torch.Tensor:
    """The deterministic DDPM step (``GaussianDiffusion.p_sample(..., deterministic=True)``) of
    A members at once: x_{t−1} = coef1_t · x̂_0 + coef2_t · x_t, with x̂_0 = skip_t · x_t + output
    for an x_0 target (``DiffusionCom._denoiser_output``) and x̂_0 = sqrt(1/ᾱ_t) · x_t −
    sqrt(1/ᾱ_t − 1) · ε̂ for an ε target (``predict_x0_from_eps``).

    The same float32 products and sums in the same order as the lone code, each member with its
    own coefficients (element-wise and correctly rounded, so stacking changes no value).

    Args:
        x_t: ``(A, B, N)`` each member's state.
        raw: ``(A, B, N)`` each member's denoiser output at its step.
        coefficients: ``(A, 4, 1)`` each member's :func:`_schedule_table` column at its step.
        is_x0: ``(A, 1, 1)`` bool, members whose denoiser predicts x_0.

    Returns:
        ``(A, B, N)`` x_{t−1}.
    """
    recip, recipm1, coef1, coef2 = (coefficients[:, row : row + 1] for row in range(4))
    x0_from_skip = recip * x_t + raw
    x0_from_eps = recip * x_t - recipm1 * raw
    x0_hat = torch.where(is_x0, x0_from_skip, x0_from_eps)
    return coef1 * x0_hat + coef2 * x_t


def _rank_pack(
    shared: DiffusionCom,
    models: Sequence[DiffusionCom],
    params: dict[str, torch.Tensor],
    graph: KnowledgeGraph,
    split: str,
    batch_size: int,
) -> list[RankingResult]:
    """Filtered clean ranks of ``split`` for A members at once: what ``evaluate_clean(models[i],
    graph, split, 2, config)`` gives each under ``eval.clean_inference=zero-noise``.

    Each batch of queries goes through the shared extractor once (a lone run's evaluation calls it
    with the same batch, so its scores and condition are the same); the members' deterministic
    reverse chains (``DiffusionCom.scores``) then run stacked, member ``i`` stepping
    t = K_i − 1 … 0, the members with the longest chains first so that the ones still stepping
    are a prefix of the stack (a view, not a copy of the weights). The condition's projection is
    computed once per batch and the time MLP once per step and batch size: the same inputs
    through the same kernels as a lone chain recomputes at every step, so the same values.

    Args:
        shared: the pack's model whose extractor and ``_x0`` (shared settings) all members use.
        models: each member's model (its diffusion, target and ``top_k_fill``).
        params: ``(A, ...)`` the members' denoiser weights, in the order of ``models``.

    Returns:
        One :class:`RankingResult` per member, in the order of ``models``.
    """
    template = shared.denoiser
    order = sorted(range(len(models)), key=lambda i: -models[i].diffusion.num_timesteps)
    if order != list(range(len(models))):
        rows = torch.tensor(order, device=next(iter(params.values())).device)
        params = {name: value.index_select(0, rows) for name, value in params.items()}
    ordered = [models[i] for i in order]
    steps = [model.diffusion.num_timesteps for model in ordered]
    device = next(shared.extractor.parameters()).device
    targets = torch.tensor(
        [model.settings.target == "x0" for model in ordered], device=device
    ).reshape(-1, 1, 1)
    tables = [_schedule_table(model, device) for model in ordered]
    # (A, 2, 1) each chain's sqrt(ᾱ_K−1) and sqrt(1 − ᾱ_K−1) in float64, cast to x_0's dtype
    # as q_sample casts them (on the device once per dtype: not every device has float64).
    start_table = _schedules(ordered, ("sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod"))
    starts = torch.from_numpy(start_table[np.arange(len(ordered)), :, np.array(steps) - 1])
    starts = starts.unsqueeze(-1)
    starts_as: dict[torch.dtype, torch.Tensor] = {}
    filter_index, candidate_mask = graph.all_answers(), graph.candidate_mask
    accumulators = [RankAccumulator(graph.num_relations) for _ in ordered]
    time_cache: dict[tuple[int, int], torch.Tensor] = {}
    cached_bytes = 0
    with torch.no_grad():
        for batch in graph.queries(split).split(batch_size):
            batch = batch.to(device)
            heads, relations, answers = batch.unbind(1)
            size = len(batch)
            output = shared.extractor(heads, relations)
            x0, indices, condition = shared._x0(output)
            conditioned = _condition_embedding(params, condition)
            # DiffusionCom.scores: each chain starts from x_K = q_sample(x_0, K − 1, ε = 0).
            start = starts_as.get(x0.dtype)
            if start is None:
                start = starts_as[x0.dtype] = starts.to(device=device, dtype=x0.dtype)
            x_t = start[:, 0:1] * x0 + start[:, 1:2] * torch.zeros_like(x0)
            finals: list = [None] * len(ordered)
            for iteration in range(steps[0]):
                active = sum(1 for k in steps if k > iteration)
                view = {name: value[:active] for name, value in params.items()}
                time = time_cache.get((iteration, size))
                if time is None:
                    t = torch.tensor([k - 1 - iteration for k in steps[:active]], device=device)
                    time = _time_embedding(template, view, t.unsqueeze(1).expand(active, size))
                    if cached_bytes + time.numel() * time.element_size() <= _TIME_CACHE_BYTES:
                        time_cache[(iteration, size)] = time
                        cached_bytes += time.numel() * time.element_size()
                raw = _stacked_denoiser(template, view, x_t, time + conditioned[:active], None)
                columns = [tables[i][:, steps[i] - 1 - iteration] for i in range(active)]
                x_t = _reverse_step(x_t, raw, torch.stack(columns).unsqueeze(-1), targets[:active])
                for i in range(active):
                    if steps[i] - 1 - iteration == 0:
                        finals[i] = x_t[i]
                x_t = x_t[: sum(1 for k in steps if k > iteration + 1)]
            for i, model in enumerate(ordered):
                scores = model._full_scores(finals[i], indices, output.scores)
                accumulators[i].add_scores(
                    scores, heads, relations, answers, filter_index, candidate_mask
                )
    results: list = [None] * len(models)
    for position, index in enumerate(order):
        results[index] = accumulators[position].result()
    return results


# ------------------------------------------------------------------------------------------ the optimizer


class _StackedAdamW:
    """Gradient clipping and AdamW of every member at once, over one buffer.

    The members' denoiser weights live in one ``(A, T)`` buffer, row ``i`` member ``i``'s, each
    parameter a segment of a row starting at a multiple of :data:`_ALIGNED_FLOATS`; their
    gradients and AdamW's two moments live in three more of that shape. One step of the whole
    pack is then a fixed handful of element-wise kernels whatever A is (per-member steps launch
    A times as many, and on a GPU that launch work, not the arithmetic, bounds a pack). The
    arithmetic is ``clip_grad_norm_``'s and ``torch.optim.AdamW``'s single-tensor step, op for
    op, with each member's learning rate and bias corrections as a per-row factor, so on one CPU
    thread a member's weights and moments are bitwise what its own ``AdamW`` would give
    (tests/core/train/test_fused.py compares them with lone runs').

    :attr:`stacked` holds each parameter as an ``(A, ...)`` leaf tensor over its segments (what
    the batched network reads); its ``.grad`` is bound to the gradient buffer, so backward
    accumulates into it in place. Each member keeps its own ``AdamW`` over its row: its learning
    rate schedule sets the rate read here, and its ``state_dict()`` (in every checkpoint) gets
    the member's row of the moments from :meth:`write_state`. Weight decay and the clipping norm
    are stage-1 keys, so one value for the whole pack; AdamW's betas and eps are its defaults, as
    in a lone run.
    """

    def __init__(self, members: list[_Member], names: list[str]):
        denoisers = [dict(m.run.model.denoiser.named_parameters()) for m in members]
        first = denoisers[0]
        self.names = names
        self.segments: dict[str, tuple[int, torch.Size]] = {}
        offset = 0
        for name in names:
            self.segments[name] = (offset, first[name].shape)
            offset += -(-first[name].numel() // _ALIGNED_FLOATS) * _ALIGNED_FLOATS
        rows, like = len(members), first[names[0]]
        self.weights = torch.zeros((rows, offset), dtype=like.dtype, device=like.device)
        self.grads = torch.zeros_like(self.weights)
        self.exp_avg = torch.zeros_like(self.weights)
        self.exp_avg_sq = torch.zeros_like(self.weights)
        self.steps = [0] * rows
        self.stacked: dict[str, torch.Tensor] = {}
        with torch.no_grad():
            for name in names:
                self.segment(self.weights, name).copy_(torch.stack([d[name] for d in denoisers]))
                leaf = self.segment(self.weights, name).detach().requires_grad_()
                leaf.grad = self.segment(self.grads, name)
                self.stacked[name] = leaf
        self.beta1 = self.beta2 = self.eps = self.weight_decay = self.max_grad_norm = 0.0

    def adopt(self, members: list[_Member]) -> None:
        """Take over the members' ``AdamW`` (built over :meth:`row_parameters`): its
        hyperparameters, and each member's moments and step count when it resumes."""
        defaults = members[0].optimizer.defaults
        self.beta1, self.beta2 = defaults["betas"]
        self.eps, self.weight_decay = defaults["eps"], defaults["weight_decay"]
        self.max_grad_norm = members[0].config.train.max_grad_norm
        for member in members:
            self.read_state(member.row, member.optimizer)

    def segment(self, buffer: torch.Tensor, name: str, row: int | None = None) -> torch.Tensor:
        """``(A, ...)`` (or one row's ``(...)``) view of parameter ``name`` in ``buffer``."""
        offset, shape = self.segments[name]
        columns = buffer[:, offset : offset + shape.numel()]
        if row is None:
            return columns.view(len(buffer), *shape)
        return columns[row].view(shape)

    def row_parameters(self, row: int) -> list[torch.Tensor]:
        """A member's parameters as the plain tensors its own ``AdamW`` holds (its row)."""
        return [self.segment(self.weights, name, row) for name in self.names]

    def read_state(self, row: int, optimizer: torch.optim.AdamW) -> None:
        """Take a member's moments and step count from its ``AdamW`` (empty when it is new)."""
        for name, parameter in zip(self.names, optimizer.param_groups[0]["params"], strict=True):
            state = optimizer.state.get(parameter)
            if not state:
                continue
            self.segment(self.exp_avg, name, row).copy_(state["exp_avg"])
            self.segment(self.exp_avg_sq, name, row).copy_(state["exp_avg_sq"])
            self.steps[row] = int(state["step"].item())

    def write_state(self, row: int, optimizer: torch.optim.AdamW) -> None:
        """Put a member's moments and step count into its ``AdamW`` (for its checkpoint)."""
        if self.steps[row] == 0:
            return
        for name, parameter in zip(self.names, optimizer.param_groups[0]["params"], strict=True):
            optimizer.state[parameter] = {
                "step": torch.tensor(float(self.steps[row]), dtype=torch.float32),
                "exp_avg": self.segment(self.exp_avg, name, row).clone(),
                "exp_avg_sq": self.segment(self.exp_avg_sq, name, row).clone(),
            }

    def zero_grad(self) -> None:
        self.grads.zero_()

    @torch.no_grad()
    def step(self, rows: list[int], learning_rates: list[float]) -> None:
        """Clip and step the members in ``rows`` (each at its learning rate); the others' rows
        do not change."""
        for row in rows:
            self.steps[row] += 1
        if len(rows) == len(self.weights):
            self._step(slice(None), rows, learning_rates)
            return
        # Some members have stopped or failed: step the others' rows one by one, in place (a
        # gathered copy of the active rows would cost four buffers' memory).
        for row, rate in zip(rows, learning_rates, strict=True):
            self._step(slice(row, row + 1), [row], [rate])

    def _step(self, rows: slice, members: list[int], learning_rates: list[float]) -> None:
        weights, grads = self.weights[rows], self.grads[rows]
        exp_avg, exp_avg_sq = self.exp_avg[rows], self.exp_avg_sq[rows]
        device, dtype = weights.device, weights.dtype
        if self.max_grad_norm > 0:
            # clip_grad_norm_: the norm of the per-parameter norms; max_norm / (norm + 1e-6)
            # is Python's reflected division, a reciprocal times max_norm.
            norms = torch.stack(
                [
                    torch.linalg.vector_norm(self.segment(grads, name).flatten(1), dim=1)
                    for name in self.names
                ],
                dim=1,
            )  # (A, P)
            total = torch.linalg.vector_norm(norms, dim=1)
            coefficient = torch.clamp((total + 1e-6).reciprocal() * self.max_grad_norm, max=1.0)
            grads.mul_(coefficient.unsqueeze(1))
        # AdamW's single-tensor step: its scalars in float64, cast per row as a kernel casts a
        # Python scalar.
        decay, step_size, correction = [], [], []
        for member, rate in zip(members, learning_rates, strict=True):
            decay.append(1 - rate * self.weight_decay)
            step_size.append(-(rate / (1 - self.beta1 ** self.steps[member])))
            correction.append((1 - self.beta2 ** self.steps[member]) ** 0.5)
        factors = torch.tensor([decay, step_size, correction], dtype=torch.float64)
        if device.type == "cuda":  # from pinned memory the copy need not wait for the stream
            factors = factors.pin_memory()
        decay, step_size, correction = factors.to(device, dtype, non_blocking=True).unsqueeze(-1)
        if self.weight_decay != 0:
            weights.mul_(decay)
        exp_avg.lerp_(grads, 1 - self.beta1)
        exp_avg_sq.mul_(self.beta2).addcmul_(grads, grads, value=1 - self.beta2)
        denominator = exp_avg_sq.sqrt().div_(correction).add_(self.eps)
        # param.addcdiv_(exp_avg, denom, value=-step_size) computes param + (value · exp_avg) /
        # denom; the gradients are spent, so their buffer holds the update.
        update = torch.mul(step_size, exp_avg, out=grads)
        weights.add_(update.div_(denominator))


# ------------------------------------------------------------------------------------------ members


class _Member:
    """One run of the pack: its config, folder, model (sharing the extractor), state and RNG."""

    def __init__(self, index: int, run: TrainingRun, state: dict, generator, rng_rest: dict):
        self.index = index
        self.run = run
        self.state = state
        self.generator = generator  # continues the lone run's global torch RNG stream
        self.rng_rest = rng_rest  # the python and numpy states a lone run saves beside it
        self.optimizer = None
        self.scheduler = None
        self.progress: dict = {}
        self.parameters: list[torch.Tensor] = []
        self.error: BaseException | None = None
        self.row = -1  # its row in the stacked parameters
        self.epoch_record: dict = {}  # the record of the epoch just trained, before validation
        self.epoch_started = 0.0  # time.perf_counter() when that epoch started

    @property
    def config(self) -> ExperimentConfig:
        return self.run.config

    def rng(self) -> dict:
        """The RNG states a lone run's checkpoint would hold at this point."""
        device = self.generator.device
        state = dict(self.rng_rest)
        if device.type == "cuda":
            cuda = list(state.get("cuda", ()))
            cuda[device.index or 0] = self.generator.get_state()
            state["cuda"] = cuda
        else:
            state["torch"] = self.generator.get_state()
        return state

    def trained_out(self) -> bool:
        """Whether its stage 2 has no epoch left (all trained, or stopped early)."""
        return self.progress.get("done", False) or (
            self.progress.get("epoch", 0) >= self.config.train.stage2_epochs
        )

    def trains_in(self, epoch: int) -> bool:
        return (
            self.error is None
            and not self.progress.get("done", False)
            and self.progress.get("epoch", 0) == epoch
            and epoch < self.config.train.stage2_epochs
        )


def _generator(rng: dict, device: torch.device, path: Path | None) -> torch.Generator:
    generator = torch.Generator(device=device)
    try:
        if device.type == "cuda":
            generator.set_state(rng["cuda"][device.index or 0])
        else:
            generator.set_state(rng["torch"])
    except (KeyError, IndexError, TypeError, RuntimeError) as error:
        raise CheckpointError(
            f"{path}: the RNG states are damaged ({type(error).__name__}: {error}); expected the "
            "torch state this project writes"
        ) from None
    return generator


def _open_member(
    index: int,
    config: ExperimentConfig,
    out_dir: Path,
    model: DiffusionCom,
    graph: KnowledgeGraph,
    split: TrainingSplit,
    accelerator: Accelerator,
    cache_queries: bool,
    reused: dict,
    cpu_started: float,
) -> _Member:
    """Set a member up as ``train(config, out_dir, stage1_checkpoint=...)`` does: fresh from the
    stage-1 checkpoint, or resumed from its own ``last.pt``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    run = TrainingRun(config, graph, model, split, accelerator, out_dir, cache_queries)
    last = checkpoint_path(out_dir)
    resuming = last.exists()
    if resuming:
        state = load_checkpoint(last, required=("model", "rng"))
        _check_resume_config(state["config"], config, last)
        if state["stage"] != 2:
            raise CheckpointError(f"{last}: stopped in stage 1; a fused pack resumes stage 2 only")
        weights = state["model"]
        shared = model.extractor.state_dict()
        for key, value in shared.items():
            saved = weights.get(f"extractor.{key}")
            if saved is None or not torch.equal(saved.to(value.device), value):
                raise CheckpointError(
                    f"{last}: its extractor ({key}) is not the pack's stage-1 extractor; "
                    "resume this run alone"
                )
        denoiser = {
            k[len("denoiser.") :]: v for k, v in weights.items() if k.startswith("denoiser.")
        }
        _load_weights(model.denoiser, denoiser, last)
        for key in ("best_stage1", "best_stage2"):
            if isinstance(state.get(key), dict):
                state[key] = _share_extractor(state[key], model.extractor)
        _forget_epochs_after(out_dir / METRICS.file, state)
        rng_rest = state["rng"]
        generator = _generator(rng_rest, accelerator.device, last)
    else:
        weights = reused.get("best_stage1") or reused["model"]
        state = {
            "config": config_to_dict(config),
            "stage": 2,
            "stage1": {**reused["stage1"], "done": True, "epoch": config.train.stage1_epochs},
            "best_stage1": weights,
        }
        # The lone run seeds the global RNGs here and draws its training noise from them.
        _seed_for(config.seed, "training")
        rng_rest = rng_state()
        generator = _generator(rng_rest, accelerator.device, None)
    run.cpu_origin = cpu_started - state.get("cpu_seconds", 0.0)
    save_config(config, out_dir / CONFIG.file)
    if not resuming:
        (out_dir / METRICS.file).unlink(missing_ok=True)
    return _Member(index, run, state, generator, rng_rest)


def _start_stage2(member: _Member, parameters: list[torch.Tensor], start: dict) -> None:
    """The member's optimizer, schedule and progress, as ``_run_stage`` builds them for stage 2.

    ``start`` holds the pack's stage-2 starting valid MRR once a member has evaluated it: every
    member starts from the same extractor under the same (stage-1) evaluation keys.
    """
    run, config = member.run, member.config
    optimizer = torch.optim.AdamW(
        parameters, lr=config.train.lr_stage2, weight_decay=config.train.weight_decay
    )
    steps_per_epoch = len(_epoch_batches(run.split.stage2_queries, config, 2, 0, run.accelerator))
    scheduler = _scheduler(
        optimizer,
        max(1, config.train.stage2_epochs * steps_per_epoch),
        config.train.warmup_fraction,
    )
    progress = member.state.get("stage2")
    if progress is None:
        progress = _new_stage_progress(run, 2, member.state, start.get("mrr"))
        start["mrr"] = progress["start_mrr"]
    else:
        optimizer.load_state_dict(progress["optimizer"])
        scheduler.load_state_dict(progress["scheduler"])
    member.optimizer, member.scheduler = optimizer, scheduler
    member.progress, member.parameters = progress, parameters


# ------------------------------------------------------------------------------------------ the recipe


def member_memory_mib(config: ExperimentConfig, denoiser: CDenoiser) -> float:
    """MiB one member adds to a pack while it trains and is evaluated (float32), an upper estimate.

    Its denoiser's ``P`` parameters are held eight times over: its own module, its row of the
    stacked training copy, that row's gradient, AdamW's two moments and the temporaries of its
    step, the copy of its best epoch, and the buffer of a checkpoint being written. Per training batch of ``B`` queries and ``N``
    diffused entities it holds about ten ``(B, N)`` tensors (x_0, its noised copy, the noise, the
    prediction, the loss's softmax and sigmoid terms and their gradients) and the residual
    stream's ``(B, W)`` activations (input, FiLM, MLP of width ``W·r`` per block); evaluation
    holds four ``(B_eval, N)`` tensors of its reverse chain. Training and evaluation do not
    overlap, so the larger of the two counts. The extractor and its query cache are the pack's,
    held once whatever its size; benchmarks/bench_fused.py compares this with measured peak RSS.
    """
    parameters = sum(p.numel() for p in denoiser.parameters())
    diffused, width = denoiser.num_outputs, denoiser.input_projection.out_features
    batch, eval_batch = config.train.batch_size, config.eval.batch_size
    ratio = denoiser.blocks[0].mlp[0].out_features // width
    training = 10 * batch * diffused + batch * width * (4 + 8 * len(denoiser.blocks) * ratio)
    evaluation = 4 * eval_batch * diffused
    return 4 * (8 * parameters + max(training, evaluation)) / 2**20


def pack_groups(member_mib: float, count: int, memory_limit_mib: float | None) -> list[range]:
    """Consecutive groups of a pack's ``count`` members, each within ``memory_limit_mib``.

    Members are independent (see the module docstring), so a pack that would not fit trains as
    several smaller packs one after another, over the same extractor, with the same results.

    Raises:
        ConfigError: a single member needs more than the limit.
    """
    if memory_limit_mib is None:
        return [range(count)]
    size = int(memory_limit_mib // member_mib)
    if size < 1:
        raise ConfigError(
            f"one fused member needs about {member_mib:,.0f} MiB, more than the pack's memory "
            f"limit of {memory_limit_mib:,.0f} MiB; raise the limit, or lower "
            "diffusion.denoiser_width, train.batch_size or eval.batch_size"
        )
    return [range(first, min(first + size, count)) for first in range(0, count, size)]


def train_fused(
    configs: Sequence[ExperimentConfig],
    out_dirs: Sequence[str | Path],
    stage1_checkpoint: str | Path,
    callback: PackCallback | None = None,
    progress: bool = False,
    memory_limit_mib: float | None = None,
    done_callback: DoneCallback | None = None,
) -> list[dict | BaseException]:
    """Train N stage-2 runs from one stage-1 checkpoint as one fused pack.

    Each member ends as ``train(configs[i], out_dirs[i], stage1_checkpoint=...)`` would have ended
    it (same files, same curve; see the module docstring); calling this again on the same folders
    resumes every member from its own ``last.pt``.

    Args:
        configs: the members' configs: equal in every stage-1 key and in
            :data:`FUSED_SHARED_DIFFUSION_KEYS`, with a frozen extractor and the diffusion objective.
        out_dirs: one run folder per member.
        stage1_checkpoint: a finished run's ``last.pt`` whose stage-1 extractor all members reuse.
        callback: ``callback(member_index, record)`` for every epoch record of every member.
        progress: show a progress bar per epoch.
        memory_limit_mib: the most the members may add to this process at once (estimated by
            :func:`member_memory_mib`); a pack above it trains in consecutive groups that fit
            (:func:`pack_groups`). None: one group.
        done_callback: ``done_callback(member_index, outcome)`` once per member as soon as it is
            done (its results written, or the error that failed it), while others may train on.

    Returns:
        Per member, its ``results.json`` content, or the exception that failed it
        (:class:`NonFiniteLossError` for a non-finite loss, :class:`CheckpointError` for a folder
        that cannot be resumed in this pack).

    Raises:
        ConfigError: the configs cannot form a pack (the message names the key and members), or
            one member alone exceeds ``memory_limit_mib``.
    """
    cpu_started = time.process_time()
    out_dirs = [Path(out_dir).resolve() for out_dir in out_dirs]
    configs = list(configs)
    _check_pack(configs, out_dirs)
    AcceleratorState._reset_state(reset_partial_state=False)
    use_cpu = not torch.cuda.is_available()
    # train.mixed_precision is a stage-1 key, so every member shares it; as in a lone run, it
    # applies to the training forward (extractor, denoiser, loss) only, not to ranking.
    accelerator = Accelerator(cpu=use_cpu, mixed_precision=configs[0].train.mixed_precision)
    if accelerator.num_processes > 1:
        raise ConfigError("train_fused runs in one process; launch it without accelerate launch")
    device = accelerator.device

    first = configs[0]
    graph = load_run_dataset(first)
    # Every member shares the seed and the denoiser's shape, so build_model gives every member
    # the initial denoiser its lone run starts from; the extractor is the pack's one extractor.
    split = training_split(first, graph)  # shared: stage-1 keys and train.stage2_queries agree
    base = build_model(first, graph, progress=progress, structure_triples=split.fit).to(device)
    path = Path(stage1_checkpoint)
    reused = load_checkpoint(path, required=("model", "stage1"))
    _check_stage1_compatible(config_from_dict(reused["config"]), first, path)
    _load_extractor(base, reused.get("best_stage1") or reused["model"])
    extractor = base.extractor
    # Every fresh member starts with these as its stage-1 weights: one dict, the extractor's own
    # tensors in it (see _share_extractor).
    reused = {
        **reused,
        "best_stage1": _share_extractor(reused.get("best_stage1") or reused["model"], extractor),
    }
    extractor.requires_grad_(False)
    _check_denoiser(base.denoiser)
    cache_queries = all(_keeps_query_cache(config, graph, True) for config in configs)
    member_mib = max(member_memory_mib(config, base.denoiser) for config in configs)
    groups = pack_groups(member_mib, len(configs), memory_limit_mib)

    results: list = [None] * len(configs)
    start: dict = {}  # the stage-2 starting valid MRR, evaluated once for every group
    for group in groups:
        _train_group(
            [(index, configs[index], out_dirs[index]) for index in group],
            base,
            graph,
            split,
            accelerator,
            cache_queries,
            reused,
            cpu_started,
            start,
            _Outcomes(results, done_callback),
            callback,
            progress,
        )
    accelerator.free_memory()
    return results


class _Outcomes:
    """Each member's results or error, at its index in the pack, announced once as it comes."""

    def __init__(self, results: list, done_callback: DoneCallback | None) -> None:
        self.results, self.done_callback = results, done_callback

    def __setitem__(self, index: int, outcome) -> None:
        self.results[index] = outcome
        if self.done_callback is not None:
            self.done_callback(index, outcome)


def _train_group(
    group: list[tuple[int, ExperimentConfig, Path]],
    base: DiffusionCom,
    graph: KnowledgeGraph,
    split: TrainingSplit,
    accelerator: Accelerator,
    cache_queries: bool,
    reused: dict,
    cpu_started: float,
    start: dict,
    results: _Outcomes,
    callback: PackCallback | None,
    progress: bool,
) -> None:
    """Train one group of a pack to the end and put each member's results (or the exception
    that failed it) at its index in ``results``."""
    extractor, device, queries = base.extractor, accelerator.device, split.stage2_queries
    first = group[0][1]
    members: list[_Member] = []
    failures: dict[int, BaseException] = {}
    for index, config, out_dir in group:
        model = DiffusionCom(extractor, config.diffusion).to(device)
        model.denoiser.load_state_dict(base.denoiser.state_dict())
        try:
            member = _open_member(
                index,
                config,
                out_dir,
                model,
                graph,
                split,
                accelerator,
                cache_queries,
                reused,
                cpu_started,
            )
        except CheckpointError as error:
            failures[index] = error
            continue
        members.append(member)
    for index, error in failures.items():
        results[index] = error
    if not members:  # none could be opened: nothing to train
        return

    # The stacked parameters (the members' training copies) and their one optimizer; each
    # member's own AdamW holds its row (its schedule and its checkpointed state).
    names = [name for name, _ in base.denoiser.named_parameters()]
    optimizer = _StackedAdamW(members, names)
    stacked = optimizer.stacked
    for row, member in enumerate(members):
        member.row = row
        _start_stage2(member, optimizer.row_parameters(row), start)
    optimizer.adopt(members)

    def freeze_for_training() -> None:
        extractor.freeze_entity_table(True, cache_queries=cache_queries)
        extractor.eval()
        device_queries = queries.to(device)
        extractor.warm_query_cache(
            device_queries[:, 0], device_queries[:, 1], first.eval.batch_size
        )

    evaluated: set[int] = set()

    def evaluate(finished: list[_Member]) -> None:
        extractor.freeze_entity_table(False)
        for member, member_results in _final_evaluation(base, finished, cache_queries):
            results[member.index] = member_results
        evaluated.update(member.index for member in finished)

    freeze_for_training()
    last_epoch = max((m.config.train.stage2_epochs for m in members), default=0)
    for epoch in range(last_epoch):
        active = [m for m in members if m.trains_in(epoch)]
        if not active:
            continue
        _train_epoch(active, optimizer, base.denoiser, epoch, graph, queries, progress)
        for member in active:
            if member.error is not None:
                results[member.index] = member.error
        trained = [m for m in active if m.error is None]
        valid = _validate(
            base, [m for m in trained if _validates_after(m.config, 2, epoch)], stacked
        )
        for member in trained:
            _finish_member_epoch(member, optimizer, callback, valid.get(member.index))
        # A member that is done (its epochs, or early stopping) gets its results now, as its lone
        # run would, instead of when the pack's longest member ends.
        done = [
            m for m in members if m.error is None and m.index not in evaluated and m.trained_out()
        ]
        if done and any(m.error is None and not m.trained_out() for m in members):
            evaluate(done)
            freeze_for_training()

    extractor.freeze_entity_table(False)
    evaluate([m for m in members if m.error is None and m.index not in evaluated])


def _train_epoch(
    active: list[_Member],
    optimizer: _StackedAdamW,
    template: CDenoiser,
    epoch: int,
    graph: KnowledgeGraph,
    queries: torch.Tensor,
    progress: bool,
) -> None:
    """One epoch of every active member: per batch one extractor pass, one batched denoiser
    forward and loss, one backward and one optimizer step for the whole pack; only the members'
    random draws (and their learning rates) are per member."""
    config = active[0].config  # batches, labels and x_0 depend on stage-1 keys only: shared
    extractor = active[0].run.model.extractor
    shared = active[0].run.model
    accelerator = active[0].run.accelerator
    device = accelerator.device
    stacked = optimizer.stacked
    started = time.perf_counter()
    # Each member's sums of its batch losses (total, KL, BCE), kept on the device so that no
    # batch waits on the device for them; float64, as a lone run sums the ``.item()`` values.
    sums = torch.zeros((len(active), 3), dtype=torch.float64, device=device)
    counts = [0] * len(active)
    batches = _epoch_batches(queries, config, 2, epoch, accelerator)
    bar = tqdm(batches, desc=f"fused stage 2 epoch {epoch + 1}", disable=not progress, leave=False)
    hidden = template.blocks[0].mlp[0].out_features
    position = {m.index: i for i, m in enumerate(active)}  # a member's row of ``sums``
    training = list(active)
    tables: _StepTables | None = None  # built at the first batch, again when members drop out
    for number, batch in enumerate(bar, start=1):
        if not training:
            break
        batch = batch.to(device)
        labels = _labels(
            training[0].run.split.stage2_answers, batch.cpu(), config.loss.label_smoothing
        ).to(device)
        # As in a lone run, train.mixed_precision applies to this forward and its loss only.
        with accelerator.autocast():
            with torch.no_grad():  # the frozen extractor: scores and condition once for the pack
                x0, indices, condition = shared._x0(extractor(batch[:, 0], batch[:, 1]))
            targets = labels if indices is None else labels.gather(1, indices)
            size = len(batch)

            # Each member's draws, in a lone run's order: timesteps, diffusion noise, dropout masks.
            timesteps, noises, masks = [], [], []
            for member in training:
                diffusion, generator = member.run.model.diffusion, member.generator
                timesteps.append(
                    torch.randint(
                        0, diffusion.num_timesteps, (size,), device=device, generator=generator
                    )
                )
                noises.append(
                    torch.randn(x0.shape, generator=generator, dtype=x0.dtype, device=device)
                )
                dropout = member.config.diffusion.denoiser_dropout
                member_masks = []
                for _ in template.blocks:
                    if dropout > 0:
                        mask = torch.empty((size, hidden), dtype=x0.dtype, device=device)
                        member_masks.append(
                            mask.bernoulli_(1 - dropout, generator=generator).div_(1 - dropout)
                        )
                    else:
                        member_masks.append(
                            torch.ones((size, hidden), dtype=x0.dtype, device=device)
                        )
                masks.append(member_masks)
            any_dropout = any(m.config.diffusion.denoiser_dropout > 0 for m in training)
            block_masks = (
                [
                    torch.stack([masks[i][b] for i in range(len(training))])
                    for b in range(len(masks[0]))
                ]
                if any_dropout
                else None
            )

            if tables is None:
                tables = _StepTables(training, position, len(optimizer.weights), x0.dtype, device)
            params = (
                stacked
                if tables.rows is None
                else {name: value.index_select(0, tables.rows) for name, value in stacked.items()}
            )
            t_all = torch.stack(timesteps)  # (A, B)
            # Each member's schedule at each query's timestep: (A, B, 1) each.
            at_t = [tables.schedules[tables.members, row, t_all].unsqueeze(-1) for row in range(4)]
            # GaussianDiffusion.q_sample per member: sqrt(ᾱ_t) · x_0 + sqrt(1 − ᾱ_t) · ε.
            x_t_all = at_t[0] * x0 + at_t[1] * torch.stack(noises)  # (A, B, N)
            embedding = _time_embedding(template, params, t_all) + _condition_embedding(
                params, condition
            )
            output = _stacked_denoiser(template, params, x_t_all, embedding, block_masks)
            # DiffusionCom._denoiser_output per member: skip_t · x_t + output for an x_0
            # target, GaussianDiffusion.predict_x0_from_eps for ε.
            x0_hat = torch.where(
                tables.is_x0, at_t[2] * x_t_all + output, at_t[2] * x_t_all - at_t[3] * output
            )
            parts = _stacked_loss(training, tables, x0, x0_hat, targets)

        losses = parts["loss"]  # (A,)
        finite = torch.isfinite(losses).tolist()  # the batch's one wait on the device
        for member, ok in zip(training, finite, strict=True):
            if not ok:
                member.error = NonFiniteLossError(
                    f"stage 2, epoch {epoch + 1}, batch {number}: loss is "
                    f"{losses[training.index(member)].item()}; the last checkpoint in "
                    f"{member.run.out_dir / CHECKPOINT_DIR} holds the state before this epoch"
                )
        kept = [i for i, ok in enumerate(finite) if ok]
        if not kept:
            training = []
            break
        if len(kept) < len(training):
            losses = losses[kept]
            parts = {key: value[kept] for key, value in parts.items()}
            training = [training[i] for i in kept]
            tables = _StepTables(training, position, len(optimizer.weights), x0.dtype, device)

        optimizer.zero_grad()
        with warnings.catch_warnings():
            # The stacked weights are strided views of one buffer and so are their gradients;
            # autograd warns about the layout, then accumulates into them in place as meant.
            warnings.filterwarnings("ignore", message="grad and param do not obey")
            losses.sum().backward()
        optimizer.step(
            [m.row for m in training], [m.optimizer.param_groups[0]["lr"] for m in training]
        )
        with warnings.catch_warnings():
            # The members' schedules follow the pack's optimizer step, not their own AdamW's.
            warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step")
            for member in training:
                member.scheduler.step()
        sums.index_add_(
            0,
            tables.positions,
            torch.stack([parts["loss"], parts["kl"], parts["bce"]], dim=1).double(),
        )
        for member in training:
            counts[position[member.index]] += 1
    totals = sums.tolist()
    for member in active:
        if member.error is not None:
            continue
        loss_sum, kl_sum, bce_sum = totals[position[member.index]]
        member.epoch_record = _epoch_record(
            member.run,
            2,
            epoch,
            member.scheduler,
            time.perf_counter() - started,
            counts[position[member.index]],
            loss_sum,
            kl_sum,
            bce_sum,
        )
        member.epoch_started = started


class _StepTables:
    """What a training step needs of each training member as device tensors, made once per
    epoch (again when a member drops out): each tensor made from host values is a copy that a
    GPU stream waits on, and a per-batch one would make every batch wait."""

    def __init__(
        self,
        training: list[_Member],
        position: dict[int, int],
        pack_size: int,
        dtype: torch.dtype,
        device: torch.device,
    ):
        # (A, 4, K_max) the members' schedules (see _training_schedules) and (A, 1) their rows.
        self.schedules = _training_schedules(training, device, dtype)
        self.members = torch.arange(len(training), device=device).unsqueeze(1)
        targets = [m.config.diffusion.target == "x0" for m in training]
        self.is_x0 = torch.tensor(targets, device=device).reshape(-1, 1, 1)
        self.loss = StackedLossWeights.of([m.config.loss for m in training], device)
        # Their rows of the stacked weights (None: all of them) and of the epoch's loss sums.
        rows = [m.row for m in training]
        self.rows = None if len(rows) == pack_size else torch.tensor(rows, device=device)
        self.positions = torch.tensor([position[m.index] for m in training], device=device)


def _stacked_loss(
    members: list[_Member],
    tables: _StepTables,
    x0: torch.Tensor,
    x0_hat: torch.Tensor,
    targets: torch.Tensor,
) -> dict[str, torch.Tensor]:
    """Each member's ``stage2_loss`` of its ``(A, B, N)`` x̂_0 at once: ``{"loss", "kl",
    "bce"}``, each ``(A,)`` (:func:`core.model.diffusioncom.stacked_stage2_loss`)."""
    if x0_hat.device.type == "cpu" and x0.numel() % _ALIGNED_FLOATS:
        # The loss's exp and log kernels split a stacked tensor into vectors and a scalar tail
        # elsewhere than a lone (B, N) tensor (see _silu): per member, as a lone run.
        each = [stage2_loss(x0, x0_hat[i], targets, m.config.loss) for i, m in enumerate(members)]
        return {key: torch.stack([parts[key] for parts in each]) for key in each[0]}
    return stacked_stage2_loss(x0, x0_hat, targets, tables.loss)


def _training_schedules(
    members: list[_Member], device: torch.device, dtype: torch.dtype
) -> torch.Tensor:
    """``(A, 4, K_max)`` the members' schedule arrays a training step reads (rows:
    ``sqrt_alphas_cumprod``, ``sqrt_one_minus_alphas_cumprod``, ``sqrt_recip_alphas_cumprod``,
    ``sqrt_recipm1_alphas_cumprod``; see :func:`_schedules`), as ``dtype``."""
    names = (
        "sqrt_alphas_cumprod",
        "sqrt_one_minus_alphas_cumprod",
        "sqrt_recip_alphas_cumprod",
        "sqrt_recipm1_alphas_cumprod",
    )
    table = _schedules([m.run.model for m in members], names)
    return torch.from_numpy(table).to(device=device, dtype=dtype)


def _copy_weights(member: _Member, stacked: dict[str, torch.Tensor]) -> None:
    """Put the member's trained slice into its own model (evaluated and saved as a lone run's).

    Each epoch's weights are new tensors, never written into the previous ones, so the best
    weights can hold this epoch's tensors themselves (see :func:`_best_weights`).
    """
    with torch.no_grad():
        for name, parameter in member.run.model.denoiser.named_parameters():
            parameter.data = stacked[name][member.row].detach().clone()


def _batched_clean(member: _Member) -> bool:
    """Whether the member's clean protocol is the deterministic chain the pack ranks batched
    (``mean-of-samples`` draws per member: such a member is evaluated by the lone code)."""
    return member.config.eval.clean_inference == "zero-noise"


def _validate(
    shared: DiffusionCom, members: list[_Member], stacked: dict[str, torch.Tensor]
) -> dict[int, RankingResult]:
    """Valid ranks of the members' current weights, ranked together (see :func:`_rank_pack`);
    by member index."""
    batched = [m for m in members if _batched_clean(m)]
    if not batched:
        return {}
    rows = torch.tensor([m.row for m in batched], device=next(iter(stacked.values())).device)
    params = {name: value.detach().index_select(0, rows) for name, value in stacked.items()}
    config = batched[0].config  # eval.batch_size is a stage-1 key: shared
    for member in batched:
        member.run.model.eval()  # as evaluate_clean does
    ranked = _rank_pack(
        shared,
        [m.run.model for m in batched],
        params,
        batched[0].run.graph,
        "valid",
        config.eval.batch_size,
    )
    return {member.index: result for member, result in zip(batched, ranked, strict=True)}


def _best_weights(member: _Member) -> Callable[[], dict]:
    """The stage's best weights as the lone trainer keeps them, without its copies: the frozen
    extractor's tensors are the pack's own, and the denoiser's are this epoch's, which no later
    epoch writes into (:func:`_copy_weights`). The checkpoint's ``model`` and ``best_stage2``
    then share them, and ``torch.save`` writes each once per file."""

    def snapshot() -> dict:
        return dict(member.run.model.state_dict())

    return snapshot


def _share_extractor(weights: dict, extractor: torch.nn.Module) -> dict:
    """``weights`` with each ``extractor.*`` tensor equal to the pack's extractor replaced by the
    extractor's own tensor (same values; stored once in memory and in a checkpoint)."""
    live = extractor.state_dict()
    shared = {}
    for key, value in weights.items():
        own = live.get(key[len("extractor.") :]) if key.startswith("extractor.") else None
        same = own is not None and own.shape == value.shape and own.dtype == value.dtype
        shared[key] = own if same and torch.equal(own, value.to(own.device)) else value
    return shared


def _finish_member_epoch(
    member: _Member,
    optimizer: _StackedAdamW,
    callback: PackCallback | None,
    valid: RankingResult | None,
) -> None:
    """Validate, select, early-stop and checkpoint the member's epoch with the lone trainer's
    code; ``valid`` is the member's valid ranks when the pack has ranked them."""
    _copy_weights(member, optimizer.stacked)
    optimizer.write_state(member.row, member.optimizer)
    record = member.epoch_record
    _finish_epoch(
        member.run,
        2,
        member.state,
        member.progress,
        record,
        member.optimizer,
        member.scheduler,
        member.epoch_started,
        rng=member.rng,
        valid_result=valid,
        best_weights=_best_weights(member),
    )
    # The checkpoint is written: drop the moments' copies (the pack's buffer holds them), which
    # would otherwise double a member's optimizer memory until its next epoch.
    member.optimizer.state.clear()
    member.progress.pop("optimizer", None)
    if callback is not None:
        callback(member.index, record)


def _final_evaluation(shared: DiffusionCom, members: list[_Member], cache_queries: bool):
    """The end of ``train`` for every finishing member: its selected weights evaluated, its
    ``results.json`` written; yields ``(member, results)``.

    What a lone run's ``_final_results`` computes per member is computed here once where it is
    the same for all: the clean ranks of the members whose selected weights are stage 2's run
    through :func:`_rank_pack` (valid, then test, into one fresh query cache filled split by
    split as each lone run fills its own), and the stage-1 clean metrics, which depend on the
    shared extractor only. The official passes (label-using, stochastic per member) stay the
    lone code's, run on that same frozen extractor.
    """
    extractor = shared.extractor
    names = [name for name, _ in shared.denoiser.named_parameters()]
    for member in members:
        denoiser = member.state.get("best_stage2")
        if denoiser is not None:
            # The selected weights (the tensors themselves, as _copy_weights puts them); the
            # extractor is the pack's frozen one throughout.
            for name, parameter in member.run.model.denoiser.named_parameters():
                parameter.data = denoiser["denoiser." + name]
        member.run.model.eval()
    stage2 = [m for m in members if _final_stage(m.run, m.state) == 2 and _batched_clean(m)]
    stage1 = [m for m in members if _final_stage(m.run, m.state) == 1]
    alone = [m for m in members if m not in stage2 and m not in stage1]

    if stage2:
        # As _final_results does for a frozen extractor: a fresh table and query cache.
        extractor.freeze_entity_table(True, cache_queries=cache_queries)
        params = {
            name: torch.stack([m.state["best_stage2"]["denoiser." + name] for m in stage2])
            for name in names
        }
        evaluated: dict[str, list] = {}
        for split in ("valid", "test"):
            started = time.perf_counter()
            config = stage2[0].config
            ranked = _rank_pack(
                shared,
                [m.run.model for m in stage2],
                params,
                stage2[0].run.graph,
                split,
                config.eval.batch_size,
            )
            # The pack's evaluation time, shared out evenly among its members.
            milliseconds = 1000 * (time.perf_counter() - started) / len(ranked[0]) / len(stage2)
            stage1_metrics = _stage1_metrics(stage2[0].run, stage2[0].state, split)
            evaluated[split] = [(result, milliseconds, stage1_metrics) for result in ranked]
        for position, member in enumerate(stage2):
            per_split = {
                split: (result, ms, dict(metrics))
                for split, (result, ms, metrics) in (
                    (split, evaluated[split][position]) for split in ("valid", "test")
                )
            }
            yield member, _write_results(member, per_split)
        extractor.freeze_entity_table(False)

    if stage1:
        # The extractor alone, unfrozen, as _final_results evaluates a stage-1 selection: the
        # same ranks for every such member.
        evaluated_stage1 = {}
        for split in ("valid", "test"):
            started = time.perf_counter()
            first = stage1[0]
            result = evaluate_clean(first.run.model, first.run.graph, split, 1, first.config)
            milliseconds = 1000 * (time.perf_counter() - started) / len(result) / len(stage1)
            evaluated_stage1[split] = (result, milliseconds, None)
        for member in stage1:
            yield member, _write_results(member, evaluated_stage1)

    for member in alone:  # evaluated by the lone code, which freezes and unfreezes on its own
        yield member, _write_results(member, None)


def _write_results(member: _Member, evaluated: dict | None) -> dict:
    """``_final_results`` of the member (with what the pack evaluated for it) to ``results.json``."""
    state = member.state
    results = _final_results(member.run, state, state.get("train_seconds", 0.0), evaluated)
    results["timings"]["cpu_seconds"] = round(member.run.cpu_seconds(), 2)
    write_json(member.run.out_dir / RESULTS.file, results, RESULTS)
    return results
