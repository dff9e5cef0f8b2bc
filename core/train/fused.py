"""Fused stage 2: N denoisers trained over one frozen extractor in one loop (horizontal fusion).

A stage-2 study (K, noise schedule, loss weights, dropout, learning rate) trains many denoisers of
one shape on the same frozen stage-1 extractor. Run alone, each trial encodes the same queries and
runs its own small matrix multiplies. Here one extractor scores each batch once, the N denoisers'
parameters are stacked along a leading member axis and run as one batched network
(``torch.baddbmm``), and each member keeps what makes it a run of its own:

* its config, its optimizer (an ``AdamW`` over its slice of the stacked parameters, with its own
  learning-rate schedule) and its early stopping;
* its own noise: the timesteps, diffusion noise and dropout masks a lone run draws from the global
  RNG are drawn from a per-member generator started exactly where the lone run's global RNG starts,
  in the same order, so a member continues the same random streams as its lone twin;
* its own run folder, written by the lone trainer's own functions (``config.json``,
  ``metrics.jsonl``, ``checkpoints/last.pt``, ``results.json``, ``ranks_*.npz``): a member's folder
  is a lone run's folder, resumable alone with :func:`core.train.trainer.train`.

Equivalence with the lone trainer: ``baddbmm`` runs each member's slice through the same GEMM as
``F.linear``'s ``addmm`` and LayerNorm runs per member, so on one CPU thread a member's losses,
weights and metrics are bitwise those of its lone twin (tests/core/train/test_fused.py checks it);
transcendental element-wise kernels (SiLU) run per member too, since their vector/tail split
depends on where a member's slice starts.

A member whose loss turns NaN or infinite fails alone (its folder is left as the lone trainer's
:class:`~core.train.trainer.NonFiniteLossError` leaves it: the last epoch's checkpoint, no
results); an early-stopped or failed member leaves the batched step, so it neither changes nor
costs the others time.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path

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
from core.model.denoiser import CDenoiser, timestep_embedding
from core.model.diffusioncom import DiffusionCom, stage2_loss
from core.train.checkpoint import CheckpointError, load_checkpoint, rng_state
from core.train.trainer import (
    NonFiniteLossError,
    TrainingRun,
    _check_resume_config,
    _check_stage1_compatible,
    _epoch_batches,
    _epoch_record,
    _final_results,
    _finish_epoch,
    _forget_epochs_after,
    _keeps_query_cache,
    _labels,
    _load_extractor,
    _load_weights,
    _new_stage_progress,
    _scheduler,
    _seed_for,
    _training_queries,
    build_model,
    load_run_dataset,
)
from runstore import CHECKPOINT_DIR, CONFIG, METRICS, RESULTS, checkpoint_path, flatten, write_json

__all__ = ["FUSED_SHARED_DIFFUSION_KEYS", "PackCallback", "train_fused"]

PackCallback = Callable[[int, dict], None]
"""Called with a member's index in the pack and each of its epoch records."""

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
        required = {
            "baseline.model": (config.baseline.model, "none"),
            "loss.stage2_extractor": (config.loss.stage2_extractor, "frozen"),
            "loss.stage2_objective": (config.loss.stage2_objective, "diffusion"),
            "diffusion.enabled": (config.diffusion.enabled, True),
            "diffusion.reverse": (config.diffusion.reverse, "ddpm"),
            "train.mixed_precision": (config.train.mixed_precision, "no"),
        }
        for key, (value, expected) in required.items():
            if value != expected:
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


def _shared_values(config: ExperimentConfig) -> dict:
    values = flatten(stage1_relevant(config))
    values.update(
        {f"diffusion.{key}": getattr(config.diffusion, key) for key in FUSED_SHARED_DIFFUSION_KEYS}
    )
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
    """Per-member LayerNorm of ``(A, B, W)``: one call per member, since a batched affine
    (normalise, then scale) rounds differently from the fused kernel a lone run uses."""
    width = h.shape[-1]
    return torch.stack(
        [F.layer_norm(h[i], (width,), weight[i], bias[i], eps) for i in range(h.shape[0])]
    )


def _silu(x: torch.Tensor) -> torch.Tensor:
    """Per-member SiLU of ``(A, B, W)``, forward and backward.

    CPU element-wise kernels run whole vectors (2 x 16 floats under AVX-512) and finish the tail
    with scalar code whose ``exp`` rounds differently; on the stacked tensor a member's last
    elements can fall in a vector where its lone run had them in the tail (whenever ``B·W`` is
    not a multiple of 32), so SiLU runs on each member's slice as a lone run does.
    """
    return torch.stack([F.silu(x[i]) for i in range(x.shape[0])])


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


def _stacked_denoiser(
    template: CDenoiser,
    params: dict[str, torch.Tensor],
    x_t: torch.Tensor,
    t: torch.Tensor,
    condition: torch.Tensor,
    masks: list[torch.Tensor] | None,
) -> torch.Tensor:
    """``CDenoiser.forward`` for A members at once.

    Args:
        template: one member's network (its sizes and LayerNorm eps; its weights are not used).
        params: ``(A, ...)`` stacked parameters, named as ``template.named_parameters()``.
        x_t: ``(A, B, N)`` each member's noised scores.
        t: ``(A, B)`` each member's timesteps.
        condition: ``(B, Dc)`` the query representation all members share.
        masks: per block, ``(A, B, width·mlp_ratio)`` dropout multipliers (0 or ``1/(1−p)``; 1 for
            a member without dropout), or ``None`` when no member drops out.

    Returns:
        ``(A, B, N)`` each member's denoiser output.
    """
    members, batch = t.shape
    h = _linear(x_t, params["input_projection.weight"], params["input_projection.bias"])
    time = timestep_embedding(t.reshape(-1), template.time_embedding_dim).to(h.dtype)
    time = time.reshape(members, batch, -1)
    time = _linear(time, params["time_mlp.0.weight"], params["time_mlp.0.bias"])
    time = _linear(_silu(time), params["time_mlp.2.weight"], params["time_mlp.2.bias"])
    embedding = time + _linear(
        condition, params["condition_projection.weight"], params["condition_projection.bias"]
    )
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
    queries: torch.Tensor,
    accelerator: Accelerator,
    cache_queries: bool,
    reused: dict,
    cpu_started: float,
) -> _Member:
    """Set a member up as ``train(config, out_dir, stage1_checkpoint=...)`` does: fresh from the
    stage-1 checkpoint, or resumed from its own ``last.pt``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    run = TrainingRun(config, graph, model, queries, accelerator, out_dir, cache_queries)
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
            if saved is None or not torch.equal(saved, value):
                raise CheckpointError(
                    f"{last}: its extractor ({key}) is not the pack's stage-1 extractor; "
                    "resume this run alone"
                )
        denoiser = {
            k[len("denoiser.") :]: v for k, v in weights.items() if k.startswith("denoiser.")
        }
        _load_weights(model.denoiser, denoiser, last)
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
    steps_per_epoch = len(_epoch_batches(run.queries, config, 2, 0, run.accelerator))
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


def train_fused(
    configs: Sequence[ExperimentConfig],
    out_dirs: Sequence[str | Path],
    stage1_checkpoint: str | Path,
    callback: PackCallback | None = None,
    progress: bool = False,
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

    Returns:
        Per member, its ``results.json`` content, or the exception that failed it
        (:class:`NonFiniteLossError` for a non-finite loss, :class:`CheckpointError` for a folder
        that cannot be resumed in this pack).

    Raises:
        ConfigError: the configs cannot form a pack (the message names the key and members).
    """
    cpu_started = time.process_time()
    out_dirs = [Path(out_dir).resolve() for out_dir in out_dirs]
    configs = list(configs)
    _check_pack(configs, out_dirs)
    AcceleratorState._reset_state(reset_partial_state=False)
    accelerator = Accelerator(cpu=not torch.cuda.is_available(), mixed_precision="no")
    if accelerator.num_processes > 1:
        raise ConfigError("train_fused runs in one process; launch it without accelerate launch")
    device = accelerator.device

    first = configs[0]
    graph = load_run_dataset(first)
    # Every member shares the seed and the denoiser's shape, so build_model gives every member
    # the initial denoiser its lone run starts from; the extractor is the pack's one extractor.
    base = build_model(first, graph, progress=progress).to(device)
    path = Path(stage1_checkpoint)
    reused = load_checkpoint(path, required=("model", "stage1"))
    _check_stage1_compatible(config_from_dict(reused["config"]), first, path)
    _load_extractor(base, reused.get("best_stage1") or reused["model"])
    extractor = base.extractor
    extractor.requires_grad_(False)
    _check_denoiser(base.denoiser)
    queries = _training_queries(graph)
    cache_queries = all(_keeps_query_cache(config, graph, True) for config in configs)

    members: list[_Member] = []
    failures: dict[int, BaseException] = {}
    for index, (config, out_dir) in enumerate(zip(configs, out_dirs, strict=True)):
        model = DiffusionCom(extractor, config.diffusion).to(device)
        model.denoiser.load_state_dict(base.denoiser.state_dict())
        try:
            member = _open_member(
                index,
                config,
                out_dir,
                model,
                graph,
                queries,
                accelerator,
                cache_queries,
                reused,
                cpu_started,
            )
        except CheckpointError as error:
            failures[index] = error
            continue
        members.append(member)

    # The stacked parameters (the members' training copies) and each member's slice of them as
    # the plain leaf tensors its own AdamW updates in place.
    names = [name for name, _ in base.denoiser.named_parameters()]
    stacked = {
        name: torch.stack(
            [dict(m.run.model.denoiser.named_parameters())[name].detach() for m in members]
        ).requires_grad_()
        for name in names
    }
    start: dict = {}
    for row, member in enumerate(members):
        member.row = row
        _start_stage2(member, [stacked[name].detach()[row] for name in names], start)

    extractor.freeze_entity_table(True, cache_queries=cache_queries)
    extractor.eval()
    device_queries = queries.to(device)
    extractor.warm_query_cache(device_queries[:, 0], device_queries[:, 1], first.eval.batch_size)

    last_epoch = max((m.config.train.stage2_epochs for m in members), default=0)
    for epoch in range(last_epoch):
        active = [m for m in members if m.trains_in(epoch)]
        if active:
            _train_epoch(active, stacked, names, base.denoiser, epoch, graph, queries, progress)
            for member in active:
                if member.error is not None:
                    continue
                _finish_member_epoch(member, stacked, callback)

    extractor.freeze_entity_table(False)
    results: list = [None] * len(configs)
    for index, error in failures.items():
        results[index] = error
    for member in members:
        if member.error is not None:
            results[member.index] = member.error
            continue
        results[member.index] = _finish_member(member, stacked)
    accelerator.free_memory()
    return results


def _train_epoch(
    active: list[_Member],
    stacked: dict[str, torch.Tensor],
    names: list[str],
    template: CDenoiser,
    epoch: int,
    graph: KnowledgeGraph,
    queries: torch.Tensor,
    progress: bool,
) -> None:
    """One epoch of every active member, each batch's extractor pass and denoiser step fused."""
    config = active[0].config  # batches, labels and x_0 depend on stage-1 keys only: shared
    extractor = active[0].run.model.extractor
    shared = active[0].run.model
    device = active[0].run.accelerator.device
    started = time.perf_counter()
    sums = {m.index: [0.0, 0.0, 0.0, 0] for m in active}
    batches = _epoch_batches(queries, config, 2, epoch, active[0].run.accelerator)
    bar = tqdm(batches, desc=f"fused stage 2 epoch {epoch + 1}", disable=not progress, leave=False)
    hidden = template.blocks[0].mlp[0].out_features
    for number, batch in enumerate(bar, start=1):
        if not active:
            break
        batch = batch.to(device)
        labels = _labels(graph, batch.cpu(), config.loss.label_smoothing).to(device)
        with torch.no_grad():  # the frozen extractor: scores and condition once for the pack
            x0, indices, condition = shared._x0(extractor(batch[:, 0], batch[:, 1]))
        targets = labels if indices is None else labels.gather(1, indices)
        size = len(batch)

        # Each member's draws, in a lone run's order: timesteps, diffusion noise, dropout masks.
        timesteps, x_ts, masks = [], [], []
        for member in active:
            diffusion, generator = member.run.model.diffusion, member.generator
            t = torch.randint(
                0, diffusion.num_timesteps, (size,), device=device, generator=generator
            )
            noise = torch.randn(x0.shape, generator=generator, dtype=x0.dtype, device=device)
            timesteps.append(t)
            x_ts.append(diffusion.q_sample(x0, t, noise))
            dropout = member.config.diffusion.denoiser_dropout
            member_masks = []
            for _ in template.blocks:
                if dropout > 0:
                    mask = torch.empty((size, hidden), dtype=x0.dtype, device=device)
                    member_masks.append(
                        mask.bernoulli_(1 - dropout, generator=generator).div_(1 - dropout)
                    )
                else:
                    member_masks.append(torch.ones((size, hidden), dtype=x0.dtype, device=device))
            masks.append(member_masks)
        any_dropout = any(m.config.diffusion.denoiser_dropout > 0 for m in active)
        block_masks = (
            [torch.stack([masks[i][b] for i in range(len(active))]) for b in range(len(masks[0]))]
            if any_dropout
            else None
        )

        rows = [m.row for m in active]
        if len(rows) == len(next(iter(stacked.values()))):
            params = stacked
        else:
            selected = torch.tensor(rows, device=device)
            params = {name: value.index_select(0, selected) for name, value in stacked.items()}
        t_all = torch.stack(timesteps)
        x_t_all = torch.stack(x_ts)
        output = _stacked_denoiser(template, params, x_t_all, t_all, condition, block_masks)

        losses, finite = [], []
        for i, member in enumerate(active):
            diffusion, x_t, t = member.run.model.diffusion, x_ts[i], timesteps[i]
            # DiffusionCom._denoiser_output and GaussianDiffusion.training_losses, per member.
            if member.config.diffusion.target == "x0":
                skip = torch.as_tensor(
                    diffusion.sqrt_recip_alphas_cumprod, dtype=x_t.dtype, device=x_t.device
                )[t].unsqueeze(1)
                x0_hat = skip * x_t + output[i]
            else:
                x0_hat = diffusion.predict_x0_from_eps(x_t, t, output[i])
            parts = stage2_loss(x0, x0_hat, targets, member.config.loss)
            loss = parts["loss"]
            if not torch.isfinite(loss):
                member.error = NonFiniteLossError(
                    f"stage 2, epoch {epoch + 1}, batch {number}: loss is {loss.item()}; the "
                    f"last checkpoint in {member.run.out_dir / CHECKPOINT_DIR} holds the state "
                    "before this epoch"
                )
                continue
            losses.append(loss)
            finite.append((member, parts))
        if not finite:
            active = []
            break

        for value in stacked.values():
            value.grad = None
        torch.stack(losses).sum().backward()
        for member, parts in finite:
            member.optimizer.zero_grad(set_to_none=True)
            for parameter, name in zip(member.parameters, names, strict=True):
                parameter.grad = stacked[name].grad[member.row]
            if member.config.train.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(member.parameters, member.config.train.max_grad_norm)
            member.optimizer.step()
            member.scheduler.step()
            total = sums[member.index]
            total[0] += parts["loss"].item()
            total[1] += float(parts["kl"])
            total[2] += float(parts["bce"])
            total[3] += 1
        active = [m for m in active if m.error is None]
    for member in active:
        loss_sum, kl_sum, bce_sum, count = sums[member.index]
        member.epoch_record = _epoch_record(
            member.run,
            2,
            epoch,
            member.scheduler,
            time.perf_counter() - started,
            count,
            loss_sum,
            kl_sum,
            bce_sum,
        )
        member.epoch_started = started


def _copy_weights(member: _Member, stacked: dict[str, torch.Tensor]) -> None:
    """Put the member's trained slice into its own model (evaluated and saved as a lone run's)."""
    with torch.no_grad():
        for name, parameter in member.run.model.denoiser.named_parameters():
            parameter.copy_(stacked[name][member.row])


def _finish_member_epoch(
    member: _Member, stacked: dict[str, torch.Tensor], callback: PackCallback | None
) -> None:
    """Validate, select, early-stop and checkpoint the member's epoch with the lone trainer's code."""
    _copy_weights(member, stacked)
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
    )
    if callback is not None:
        callback(member.index, record)


def _finish_member(member: _Member, stacked: dict[str, torch.Tensor]) -> dict:
    """The end of ``_run_stage`` and ``train`` for one member: best weights, evaluation, results."""
    _copy_weights(member, stacked)
    model, state = member.run.model, member.state
    if "best_stage2" in state:
        model.load_state_dict(state["best_stage2"])
    elif "best_stage1" in state:
        _load_extractor(model, state["best_stage1"])
    results = _final_results(member.run, state, state.get("train_seconds", 0.0))
    results["timings"]["cpu_seconds"] = round(member.run.cpu_seconds(), 2)
    write_json(member.run.out_dir / RESULTS.file, results, RESULTS)
    return results
