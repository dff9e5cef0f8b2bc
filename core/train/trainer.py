"""The DiffusionCom recipe, top to bottom: set-up → stage 1 → stage 2 → evaluation.

Stage 1 trains Structure-MKGformer with BCE over all candidates (training answers as multi-hot
labels). Stage 2 trains the conditional denoiser with ``w_kl·KL + w_bce·BCE``, the extractor frozen
(the paper) or fine-tuned (the released code). Model selection and early stopping use valid MRR under
the clean protocol only. Every epoch appends to ``metrics.jsonl`` and writes a full-state checkpoint,
so a killed run resumes where it stopped and continues the same curve.

Accelerate places the model, runs mixed precision and shards batches when launched on several
processes (``accelerate launch --num_processes N``); the recipe is the same on one CPU.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import set_seed
from tqdm.auto import tqdm

from core.config import (
    ConfigError,
    ExperimentConfig,
    config_from_dict,
    config_to_dict,
    save_config,
    stage1_relevant,
)
from core.data.graph import AnswerIndex, KnowledgeGraph, with_reciprocals
from core.data.mkgformer import LoadOptions
from core.data.registry import load_dataset
from core.evaluation import QueryRanks, RankingResult, evaluate
from core.features import FeatureSettings, extract_features
from core.model.diffusioncom import DiffusionCom
from core.model.extractor import StructureMKGformer
from core.model.structure import SubgraphSampler
from core.train.checkpoint import (
    CheckpointError,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from runstore import (
    CHECKPOINT_DIR,
    CONFIG,
    METRICS,
    RESULTS,
    append_jsonl,
    atomic_write,
    checkpoint_path,
    flatten,
    ranks_file,
    read_jsonl,
    write_json,
    write_jsonl,
)

__all__ = [
    "NonFiniteLossError",
    "TrainingRun",
    "TrainingSplit",
    "load_run_dataset",
    "stage1_loss",
    "train",
    "training_split",
    "write_ranks",
]

MetricsCallback = Callable[[dict], None]


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; the last checkpoint is kept for inspection or resume."""


@dataclass(frozen=True)
class TrainingSplit:
    """Which training triples each stage learns from (``train.holdout_fraction``,
    ``train.stage2_queries``); without a hold-out both stages learn from all of them.

    Filtered evaluation is not affected: it knows every training triple, held out or not.
    """

    fit: torch.Tensor  # (n_fit, 3) forward triples stage 1 learns labels and structure from
    held_out: torch.Tensor  # (n_held, 3) forward triples stage 1 never sees (n_held may be 0)
    stage1_answers: AnswerIndex  # stage 1's labels: the fit triples' answers
    stage2_answers: AnswerIndex  # stage 2's labels: see training_split
    stage1_queries: torch.Tensor  # (Q1, 2) unique (head, relation in [0, 2R)) fit queries
    stage2_queries: torch.Tensor  # (Q2, 2) the queries stage 2 trains on

    def queries(self, stage: int) -> torch.Tensor:
        return self.stage1_queries if stage == 1 else self.stage2_queries

    def answers(self, stage: int) -> AnswerIndex:
        return self.stage1_answers if stage == 1 else self.stage2_answers

    def summary(self, config: ExperimentConfig) -> dict:
        """What ``results.json`` records of a run with a hold-out."""
        return {
            "holdout_fraction": config.train.holdout_fraction,
            "stage1_triples": len(self.fit),
            "held_out_triples": len(self.held_out),
            "stage2_queries": config.train.stage2_queries,
            "stage2_query_count": len(self.stage2_queries),
        }


@dataclass
class TrainingRun:
    """What the set-up builds once and both stages use."""

    config: ExperimentConfig
    graph: KnowledgeGraph
    model: DiffusionCom
    split: TrainingSplit
    accelerator: Accelerator
    out_dir: Path
    cache_queries: bool  # a frozen stage 2 keeps per-query encodings (train.query_cache_mib)
    # time.process_time() at which this run's CPU clock reads 0: the start of this train() call
    # minus the CPU seconds that earlier calls (before a resume) saved in the checkpoint.
    cpu_origin: float = 0.0

    def cpu_seconds(self) -> float:
        """CPU seconds of this run so far, across resumes (the work a killed attempt did after its
        last checkpoint is not counted: the resumed attempt does it again and counts it)."""
        return time.process_time() - self.cpu_origin


# ------------------------------------------------------------------------------------------ set-up


def feature_settings(config: ExperimentConfig) -> FeatureSettings:
    """The feature extractor settings a config asks for (a modality switched off is not computed)."""
    features, model = config.features, config.model
    text = features.text_encoder if model.use_text else "none"
    image = features.image_encoder if model.use_image else "none"
    text_path = image_path = None
    if text not in ("minilm", "none"):
        text, text_path = "local", text
    if image.startswith("clip:"):
        image, image_path = "clip", image[len("clip:") :]
    return FeatureSettings(
        text_encoder=text,
        text_model_path=text_path,
        text_max_length=features.text_max_length,
        image_encoder=image,
        image_model_path=image_path,
        image_size=features.image_size,
        max_images_per_entity=features.max_images_per_entity,
    )


def load_run_dataset(config: ExperimentConfig) -> KnowledgeGraph:
    """The dataset a run trains on, loaded as its ``data`` section says."""
    graph = load_dataset(
        config.data.dataset,
        LoadOptions(
            candidates=config.data.candidates,
            drop_unknown=config.data.drop_unknown,
            image_root=config.data.image_root,
        ),
    )
    if config.data.entity_text == "anonymous":
        graph = graph.with_anonymous_entity_text()
    return graph


def _seed_for(seed: int, purpose: str) -> None:
    """Seed the global python, numpy, torch and CUDA RNGs for one purpose of a run.

    Model init, dropout and the diffusion noise of training draw from the global RNGs, which
    anything else in the process may have used before (encoder loading on a feature-cache miss,
    another trial in a reused sweep worker); seeding right before each use makes the run a function
    of its config alone. Each purpose gets its own stream derived from ``(seed, purpose)``, so
    training does not replay the numbers model init drew.
    """
    digest = hashlib.sha256(f"{seed}:{purpose}".encode()).digest()
    set_seed(int.from_bytes(digest[:4], "little"))


def build_model(
    config: ExperimentConfig,
    graph: KnowledgeGraph,
    progress: bool = True,
    structure_triples: torch.Tensor | None = None,
) -> DiffusionCom:
    """Extract (or reuse) frozen features and build the model for ``graph``; the initial weights
    depend on ``config.seed`` only. The structure encoder samples neighbourhoods from
    ``structure_triples`` (default: all of ``graph.train``; a hold-out's fit triples)."""
    features = extract_features(graph, feature_settings(config), progress=progress)
    _seed_for(config.seed, "model-init")
    sampler = None
    if config.structure.encoder == "mgat":
        sampler = SubgraphSampler(
            graph.train if structure_triples is None else structure_triples,
            graph.num_entities,
            graph.num_relations,
            max_nodes=config.structure.max_nodes,
            selection=config.structure.neighbour_selection,
            seed=config.seed,
            hops=config.structure.hops,
        )
    extractor = StructureMKGformer(
        graph.num_entities,
        graph.num_relations,
        features.text,
        features.text_mask,
        features.image,
        features.image_mask,
        config.model,
        config.structure,
        sampler,
    )
    return DiffusionCom(extractor, config.diffusion)


def _unique_queries(triples: torch.Tensor, num_relations: int) -> torch.Tensor:
    """``(Q, 2)`` unique (head, relation in [0, 2R)) queries of ``(n, 3)`` forward triples."""
    return torch.unique(with_reciprocals(triples, num_relations)[:, :2], dim=0)


def training_split(config: ExperimentConfig, graph: KnowledgeGraph) -> TrainingSplit:
    """The training triples of each stage, a function of the graph, ``train.holdout_fraction``,
    ``train.stage2_queries`` and the seed.

    With a hold-out, ``round(fraction · n)`` training triples drawn with the run's seed (at least
    one, and one fewer than all) are hidden from stage 1: from its labels, its queries and the
    structure encoder's neighbourhoods. Stage 2 then trains either on the queries of the held-out
    triples (``held-out``) with every training answer as its labels — the extractor's scores there
    are out of sample as a test query's are — or, the in-sample control, on stage 1's own queries
    and labels (``fit``).
    """
    train_triples = graph.train
    fraction = config.train.holdout_fraction
    if fraction > 0:
        digest = hashlib.sha256(f"{config.seed}:holdout".encode()).digest()
        generator = torch.Generator().manual_seed(int.from_bytes(digest[:4], "little"))
        order = torch.randperm(len(train_triples), generator=generator)
        count = min(max(1, round(fraction * len(train_triples))), len(train_triples) - 1)
        held = torch.zeros(len(train_triples), dtype=torch.bool)
        held[order[:count]] = True
        fit, held_out = train_triples[~held], train_triples[held]
        stage1_answers = AnswerIndex(fit, graph.num_entities, graph.num_relations)
    else:
        fit, held_out = train_triples, train_triples[:0]
        stage1_answers = graph.train_answers()
    stage1_queries = _unique_queries(fit, graph.num_relations)
    if config.train.stage2_queries == "held-out":
        stage2_answers = graph.train_answers()
        stage2_queries = _unique_queries(held_out, graph.num_relations)
    else:
        stage2_answers, stage2_queries = stage1_answers, stage1_queries
    return TrainingSplit(
        fit, held_out, stage1_answers, stage2_answers, stage1_queries, stage2_queries
    )


def _scheduler(optimizer: torch.optim.Optimizer, total_steps: int, warmup_fraction: float):
    """Linear warm-up over ``warmup_fraction`` of the steps, then cosine decay to zero."""
    warmup = max(1, int(warmup_fraction * total_steps))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total_steps - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def _epoch_batches(
    queries: torch.Tensor, config: ExperimentConfig, stage: int, epoch: int, accelerator
) -> list:
    """This process's batches of one epoch, in an order fixed by (seed, stage, epoch).

    Every process gets the same number of batches (the remainder is dropped on multi-process runs)
    so gradient synchronisation never waits on a process that ran out.
    """
    generator = torch.Generator().manual_seed(config.seed * 1_000_003 + stage * 10_007 + epoch)
    order = queries[torch.randperm(len(queries), generator=generator)]
    world, rank = accelerator.num_processes, accelerator.process_index
    if world > 1:
        per_process = len(order) // world
        order = order[rank * per_process : (rank + 1) * per_process]
    return list(order.split(config.train.batch_size))


def _labels(answers: AnswerIndex, batch: torch.Tensor, smoothing: float) -> torch.Tensor:
    """``(B, E)`` multi-hot training answers of the ``(B, 2)`` queries, smoothed towards ``1/E``."""
    labels = answers.multi_hot(batch[:, 0], batch[:, 1])
    return labels * (1.0 - smoothing) + smoothing / answers.num_entities


def stage1_loss(scores: torch.Tensor, labels: torch.Tensor, kind: str) -> torch.Tensor:
    """Stage 1's loss of ``(B, E)`` logits against ``(B, E)`` smoothed multi-hot answers.

    ``bce`` averages a binary cross entropy over every (query, entity) pair; ``cross-entropy`` is
    a softmax over the candidates with the answers' mass as target (``labels`` normalised per
    row), which cannot settle on "every entity is wrong" as BCE can with thousands of candidates.
    """
    if kind == "bce":
        return F.binary_cross_entropy_with_logits(scores, labels)
    targets = labels / labels.sum(dim=1, keepdim=True)
    return -(targets * F.log_softmax(scores, dim=1)).sum(dim=1).mean()


# ------------------------------------------------------------------------------------------ evaluation


def _clean_scorer(model: DiffusionCom, stage: int, config: ExperimentConfig):
    """Score function of the clean protocol: deterministic, no label use."""
    if stage == 1 or model.diffusion is None or config.loss.stage2_objective == "extractor-bce":
        return model.stage1_scores
    if config.eval.clean_inference == "zero-noise":
        return model.scores

    def mean_of_samples(heads, relations):
        generator = torch.Generator(device=heads.device).manual_seed(config.seed)
        samples = [
            model.scores(heads, relations, stochastic=True, generator=generator)
            for _ in range(config.eval.clean_samples)
        ]
        return torch.stack(samples).mean(dim=0)

    return mean_of_samples


def evaluate_sharded(
    score_fn,
    graph: KnowledgeGraph,
    split: str,
    config,
    accelerator: Accelerator | None = None,
    device: torch.device | None = None,
) -> RankingResult:
    """Filtered ranks of ``split``; under several processes each ranks its slice of the queries.

    Every process receives the whole result (``all_gather_object``, slices in process order), so
    early stopping decides the same way everywhere. The clean protocol gives the same ranks on any
    number of processes; the stochastic passes of the official protocol and of
    ``eval.clean_inference=mean-of-samples`` draw their noise per process and batch, so their
    values depend on the number of processes. Without an accelerator, one process ranks every
    query with the ids sent to ``device``.
    """
    world = 1 if accelerator is None else accelerator.num_processes
    index = 0 if accelerator is None else accelerator.process_index
    device = device if accelerator is None else accelerator.device
    part = evaluate(
        score_fn, graph, split, config.eval.batch_size, device=device, shard=(index, world)
    )
    if world == 1:
        return part
    parts: list = [None] * world
    torch.distributed.all_gather_object(parts, part)
    return RankingResult.concatenate(parts)


def evaluate_clean(
    model: DiffusionCom,
    graph: KnowledgeGraph,
    split: str,
    stage: int,
    config,
    accelerator: Accelerator | None = None,
) -> RankingResult:
    """Filtered ranks of ``split`` under the clean protocol."""
    model.eval()
    scorer = _clean_scorer(model, stage, config)
    device = next(model.parameters()).device
    return evaluate_sharded(scorer, graph, split, config, accelerator, device)


def evaluate_official(
    model: DiffusionCom,
    graph: KnowledgeGraph,
    split: str,
    config,
    accelerator: Accelerator | None = None,
) -> RankingResult:
    """The released code's protocol: S stochastic passes, the minimum gold rank kept per query.

    This uses the gold answer to pick among passes (an oracle), so it is reported beside the clean
    protocol only to measure how much it inflates the numbers, never used to select models.
    """
    model.eval()
    device = next(model.parameters()).device
    index = 0 if accelerator is None else accelerator.process_index
    generator = torch.Generator(device=device).manual_seed(config.seed + 1 + 1_000_003 * index)
    passes = [
        evaluate_sharded(
            lambda h, r: model.scores(h, r, stochastic=True, generator=generator),
            graph,
            split,
            config,
            accelerator,
            device,
        )
        for _ in range(config.eval.official_samples)
    ]
    ranks = QueryRanks(
        **{
            tie: torch.stack([p.ranks.get(tie) for p in passes]).min(dim=0).values
            for tie in ("optimistic", "pessimistic", "realistic")
        },
        num_options=passes[0].ranks.num_options,
    )
    return RankingResult(passes[0].queries, ranks, passes[0].num_relations, passes[0].ks)


# ------------------------------------------------------------------------------------------ the recipe


def _check_resume_config(saved: dict, config: ExperimentConfig, path: Path) -> None:
    """Resume continues the same run: any differing key is an error naming it.

    Keys added to the config since the checkpoint was written count as their defaults, so a
    checkpoint stays resumable when the code grows an option it did not use.
    """
    # A key since removed or renamed fails to build: compared as written, the difference names it.
    with contextlib.suppress(ConfigError):
        saved = config_to_dict(config_from_dict(saved))
    before, now = flatten(saved), flatten(config_to_dict(config))
    differences = [
        f"{key}: checkpoint {before.get(key)!r} vs now {now.get(key)!r}"
        for key in sorted(before.keys() | now.keys())
        if before.get(key) != now.get(key)
    ]
    if differences:
        raise CheckpointError(f"{path}: belongs to another config; " + "; ".join(differences[:5]))


def query_cache_mib(graph: KnowledgeGraph, hidden_dim: int) -> float:
    """MiB a frozen extractor's query cache reaches: ``2·d`` float32 per distinct query of every
    split (training queries are cached up front, valid and test ones when first evaluated)."""
    splits = [graph.queries(split)[:, :2] for split in ("train", "valid", "test")]
    distinct = len(torch.unique(torch.cat(splits), dim=0))
    return distinct * 2 * hidden_dim * 4 / 2**20


def _keeps_query_cache(config: ExperimentConfig, graph: KnowledgeGraph, is_main: bool) -> bool:
    """Whether a frozen extractor keeps query encodings (see ``train.query_cache_mib``)."""
    needed = query_cache_mib(graph, config.model.hidden_dim)
    if needed <= config.train.query_cache_mib:
        return True
    if is_main:
        print(
            f"stage 2: the query cache would take {needed:,.0f} MiB, above "
            f"train.query_cache_mib={config.train.query_cache_mib}; queries are re-encoded at "
            "every use instead (same results, slower)"
        )
    return False


def _extractor_trains_in_stage2(config: ExperimentConfig) -> bool:
    """Whether stage 2 changes the extractor (fine-tuned, or trained alone as a control)."""
    return (
        config.loss.stage2_extractor == "finetune"
        or config.loss.stage2_objective == "extractor-bce"
    )


def _new_stage_progress(
    run: TrainingRun, stage: int, state: dict, start_mrr: float | None = None
) -> dict:
    """The progress entry of a stage that has not run an epoch yet; ``start_mrr`` is stage 2's
    starting valid MRR when already known (the same extractor was evaluated for another run)."""
    config, model = run.config, run.model
    progress_state = {"epoch": 0, "best_mrr": -1.0, "best_epoch": -1, "stale": 0, "done": False}
    if stage == 2:
        # Stage 2 starts from its extractor alone: the identity a zero-initialised denoiser
        # gives under the clean protocol. It is a candidate like any stage-2 epoch (epoch 0),
        # so with include-stage1 a stage 2 that never beats it on valid is not kept.
        if "best_stage1" not in state:  # no stage-1 epoch ran: the extractor as it is
            state["best_stage1"] = {k: v.detach().clone() for k, v in model.state_dict().items()}
        if start_mrr is None:
            start = evaluate_clean(model, run.graph, "valid", 1, config, run.accelerator)
            start_mrr = start.metrics(config.eval.tie)["mrr"]
        progress_state["start_mrr"] = start_mrr
        progress_state["stage2_best_mrr"] = -1.0
        if config.train.stage2_selection == "include-stage1":
            progress_state.update(best_mrr=progress_state["start_mrr"], best_epoch=0)
    return progress_state


def _run_stage(
    run: TrainingRun,
    stage: int,
    state: dict,
    callback: MetricsCallback | None,
    progress: bool,
) -> None:
    """Train one stage epoch by epoch from ``state`` (fresh or resumed); keeps the best weights."""
    config, model, accelerator = run.config, run.model, run.accelerator
    stage_key = f"stage{stage}"
    epochs = config.train.stage1_epochs if stage == 1 else config.train.stage2_epochs
    # Stage 1, and the extractor-bce control in stage 2, train the extractor alone on its loss.
    extractor_alone = stage == 1 or config.loss.stage2_objective == "extractor-bce"
    if stage == 1:
        learning_rate = config.train.lr_stage1
    else:
        model.extractor.requires_grad_(_extractor_trains_in_stage2(config))
        learning_rate = config.train.lr_stage2
    # Otherwise the whole model is wrapped; with a frozen extractor only the denoiser has
    # trainable parameters, so only its gradients are synchronised across processes.
    trained = model.extractor if extractor_alone else model
    parameters = [p for p in trained.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(
        parameters, lr=learning_rate, weight_decay=config.train.weight_decay
    )
    queries = run.split.queries(stage)
    steps_per_epoch = len(_epoch_batches(queries, config, stage, 0, accelerator))
    scheduler = _scheduler(
        optimizer, max(1, epochs * steps_per_epoch), config.train.warmup_fraction
    )
    progress_state = state.get(stage_key)
    if progress_state is None:
        progress_state = _new_stage_progress(run, stage, state)
    else:
        optimizer.load_state_dict(progress_state["optimizer"])
        scheduler.load_state_dict(progress_state["scheduler"])
    trained_wrapped, optimizer = accelerator.prepare(trained, optimizer)
    frozen_extractor = stage == 2 and not _extractor_trains_in_stage2(config)
    model.extractor.freeze_entity_table(frozen_extractor, cache_queries=run.cache_queries)
    if frozen_extractor:
        model.extractor.eval()
        device_queries = queries.to(accelerator.device)
        model.extractor.warm_query_cache(
            device_queries[:, 0], device_queries[:, 1], config.eval.batch_size
        )

    while progress_state["epoch"] < epochs and not progress_state["done"]:
        epoch = progress_state["epoch"]
        model.train()
        if frozen_extractor:
            model.extractor.eval()  # frozen: no dropout either
        started, loss_sum, kl_sum, bce_sum, batches = time.perf_counter(), 0.0, 0.0, 0.0, 0
        batches_of_epoch = _epoch_batches(queries, config, stage, epoch, accelerator)
        bar = tqdm(
            batches_of_epoch,
            desc=f"stage {stage} epoch {epoch + 1}/{epochs}",
            disable=not progress,
            leave=False,
        )
        for batch in bar:
            batch = batch.to(accelerator.device)
            labels = _labels(run.split.answers(stage), batch.cpu(), config.loss.label_smoothing).to(
                accelerator.device
            )
            with accelerator.autocast():
                if extractor_alone:
                    scores = trained_wrapped(batch[:, 0], batch[:, 1]).scores
                    loss = stage1_loss(scores.float(), labels, config.loss.stage1)
                    parts = {}
                else:
                    parts = trained_wrapped(batch[:, 0], batch[:, 1], labels, config.loss)
                    loss = parts["loss"]
            if not torch.isfinite(loss):
                raise NonFiniteLossError(
                    f"stage {stage}, epoch {epoch + 1}, batch {batches + 1}: loss is {loss.item()}; "
                    f"the last checkpoint in {run.out_dir / CHECKPOINT_DIR} holds the state before this epoch"
                )
            optimizer.zero_grad(set_to_none=True)
            accelerator.backward(loss)
            if config.train.max_grad_norm > 0:
                accelerator.clip_grad_norm_(parameters, config.train.max_grad_norm)
            optimizer.step()
            scheduler.step()
            loss_sum += loss.item()
            kl_sum += float(parts.get("kl", 0.0))
            bce_sum += float(parts.get("bce", 0.0))
            batches += 1
            bar.set_postfix(loss=f"{loss_sum / batches:.4f}")
        record = _epoch_record(
            run,
            stage,
            epoch,
            scheduler,
            time.perf_counter() - started,
            batches,
            loss_sum,
            kl_sum,
            bce_sum,
        )
        _finish_epoch(run, stage, state, progress_state, record, optimizer, scheduler, started)
        if callback is not None:
            callback(record)
    # Continue from the best weights of this stage (best valid MRR under the clean protocol); a
    # stage 2 whose every epoch lost to its starting point leaves the stage-1 weights selected.
    model.extractor.freeze_entity_table(False)
    if f"best_{stage_key}" in state:
        model.load_state_dict(state[f"best_{stage_key}"])
    elif stage == 2 and "best_stage1" in state:
        _load_extractor(model, state["best_stage1"])
    accelerator.free_memory()


def _epoch_record(
    run: TrainingRun,
    stage: int,
    epoch: int,
    scheduler,
    train_seconds: float,
    batches: int,
    loss_sum: float,
    kl_sum: float,
    bce_sum: float,
) -> dict:
    """The ``metrics.jsonl`` record of 0-based ``epoch`` before validation: its mean losses."""
    record = {
        "stage": stage,
        "epoch": epoch + 1,
        "loss": loss_sum / max(batches, 1),
        "lr": scheduler.get_last_lr()[0],
        "train_seconds": round(train_seconds, 3),
    }
    if stage == 2:
        record.update(kl=kl_sum / max(batches, 1), bce=bce_sum / max(batches, 1))
    if run.model.extractor.fusion_lambda() is not None:
        record["lambda"] = run.model.extractor.fusion_lambda()
    return record


def _validates_after(config: ExperimentConfig, stage: int, epoch: int) -> bool:
    """Whether 0-based ``epoch`` of ``stage`` ends with a validation (every ``eval_every``-th
    epoch and the stage's last)."""
    epochs = config.train.stage1_epochs if stage == 1 else config.train.stage2_epochs
    return (epoch + 1) % config.train.eval_every == 0 or epoch + 1 == epochs


def _finish_epoch(
    run: TrainingRun,
    stage: int,
    state: dict,
    progress_state: dict,
    record: dict,
    optimizer,
    scheduler,
    started: float,
    rng: Callable[[], dict] = rng_state,
    valid_result: RankingResult | None = None,
    best_weights: Callable[[], dict] | None = None,
) -> None:
    """Validate the epoch ``record`` describes, keep the best weights, decide early stopping, then
    append the record and write the checkpoint (``rng`` gives the RNG states it saves).

    A caller that has already ranked ``valid`` with these weights (the fused pack ranks all its
    members at once) passes that ``valid_result``; ``best_weights`` returns the copy of the model's
    state kept as the stage's best (default: every tensor cloned).
    """
    config, model, accelerator = run.config, run.model, run.accelerator
    stage_key = f"stage{stage}"
    epoch = record["epoch"] - 1
    if _validates_after(config, stage, epoch):
        if valid_result is None:
            valid_result = evaluate_clean(model, run.graph, "valid", stage, config, accelerator)
        valid = valid_result.metrics(config.eval.tie)
        record.update({f"valid.clean.{name}": value for name, value in valid.items()})
        if "stage2_best_mrr" in progress_state:
            progress_state["stage2_best_mrr"] = max(progress_state["stage2_best_mrr"], valid["mrr"])
        if valid["mrr"] > progress_state["best_mrr"]:
            progress_state.update(best_mrr=valid["mrr"], best_epoch=epoch + 1, stale=0)
            state[f"best_{stage_key}"] = (
                {k: v.detach().clone() for k, v in model.state_dict().items()}
                if best_weights is None
                else best_weights()
            )
        else:
            progress_state["stale"] += config.train.eval_every
            if config.train.patience and progress_state["stale"] >= config.train.patience:
                if stage == 1 and progress_state.get("decays", 0) < config.train.plateau_decays:
                    _restart_from_best(model, state[f"best_{stage_key}"], optimizer)
                    _scale_learning_rate(optimizer, scheduler, config.train.plateau_lr_factor)
                    progress_state["decays"] = progress_state.get("decays", 0) + 1
                    progress_state["stale"] = 0
                    record["plateau_decay"] = progress_state["decays"]
                else:
                    progress_state["done"] = True
                    record["early_stopped"] = True
    progress_state["epoch"] = epoch + 1
    # Wall time of all epochs so far, across resumes (evaluation included).
    state["train_seconds"] = state.get("train_seconds", 0.0) + time.perf_counter() - started
    state["cpu_seconds"] = run.cpu_seconds()
    progress_state["optimizer"] = optimizer.state_dict()
    progress_state["scheduler"] = scheduler.state_dict()
    state[stage_key] = progress_state

    if accelerator.is_main_process:
        append_jsonl(run.out_dir / METRICS.file, record)
        state["model"] = model.state_dict()
        state["rng"] = rng()
        save_checkpoint(state, checkpoint_path(run.out_dir))


def train(
    config: ExperimentConfig,
    out_dir: str | Path,
    *,
    callback: MetricsCallback | None = None,
    stage1_checkpoint: str | Path | None = None,
    progress: bool = True,
) -> dict:
    """Train and evaluate one run; resumes from ``out_dir/checkpoints/last.pt`` when present.

    A config whose ``baseline.model`` is not ``none`` trains that baseline instead
    (:func:`core.baselines.train_baseline`: the same arguments, run files and results).

    Args:
        config: the run's config (saved as ``config.json``).
        out_dir: the run directory.
        callback: called with every epoch's metrics record (the hook sweeps report through).
        stage1_checkpoint: a finished run's ``last.pt`` whose stage-1 extractor is reused, so only
            stage 2 trains. Its stage-1 config must equal this run's.
        progress: show progress bars.

    Returns:
        The ``results.json`` content.
    """
    if config.baseline.model != "none":
        # Imported here: PyKEEN loads only for baseline runs.
        from core.baselines import train_baseline

        return train_baseline(
            config,
            out_dir,
            callback=callback,
            stage1_checkpoint=stage1_checkpoint,
            progress=progress,
        )
    cpu_started = time.process_time()
    out_dir = Path(out_dir).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    use_cpu = not torch.cuda.is_available()
    if use_cpu and config.train.mixed_precision == "fp16":
        raise ConfigError("train.mixed_precision=fp16 needs a GPU; on a CPU choose bf16 or no")
    # Accelerate keeps its settings in a process-wide singleton; a process that runs several
    # trainings (tests, a sweep worker) must start each from its own config. The process group
    # (PartialState) is kept.
    AcceleratorState._reset_state(reset_partial_state=False)
    accelerator = Accelerator(cpu=use_cpu, mixed_precision=config.train.mixed_precision)

    graph = load_run_dataset(config)
    split = training_split(config, graph)
    model = build_model(
        config,
        graph,
        progress=progress and accelerator.is_main_process,
        structure_triples=split.fit,
    ).to(accelerator.device)
    run = TrainingRun(
        config,
        graph,
        model,
        split,
        accelerator,
        out_dir,
        cache_queries=_keeps_query_cache(config, graph, accelerator.is_main_process),
    )

    last = checkpoint_path(out_dir)
    resuming = last.exists()
    state: dict = {"config": config_to_dict(config), "stage": 1}
    if resuming:
        state = load_checkpoint(last, required=("model", "rng"))
        _check_resume_config(state["config"], config, last)
        _load_weights(model, state["model"], last)
        if accelerator.is_main_process:
            _forget_epochs_after(out_dir / METRICS.file, state)
    elif stage1_checkpoint is not None:
        reused = load_checkpoint(Path(stage1_checkpoint), required=("model", "stage1"))
        _check_stage1_compatible(
            config_from_dict(reused["config"]), config, Path(stage1_checkpoint)
        )
        weights = reused.get("best_stage1") or reused["model"]
        _load_weights(
            model.extractor,
            {k[len("extractor.") :]: v for k, v in weights.items() if k.startswith("extractor.")},
            Path(stage1_checkpoint),
        )
        state.update(
            stage=2,
            stage1={**reused["stage1"], "done": True, "epoch": config.train.stage1_epochs},
            best_stage1=weights,
        )
    run.cpu_origin = cpu_started - state.get("cpu_seconds", 0.0)
    if accelerator.is_main_process:
        save_config(config, out_dir / CONFIG.file)
        if not resuming:
            # A run killed before its first checkpoint restarts from scratch: its old records go.
            (out_dir / METRICS.file).unlink(missing_ok=True)

    # Dropout and training's diffusion noise draw from the global RNGs: a resumed run continues the
    # streams its checkpoint saved, a fresh one starts the stream its seed fixes.
    if resuming:
        set_rng_state(state["rng"], last)
    else:
        _seed_for(config.seed, "training")
    if state["stage"] == 1:
        _run_stage(run, 1, state, callback, progress)
        state["stage"] = 2
    if model.diffusion is not None and config.train.stage2_epochs > 0:
        _run_stage(run, 2, state, callback, progress)
    results = _final_results(run, state, state.get("train_seconds", 0.0))
    # CPU time of the whole run, set-up and final evaluation included, across resumes; studies
    # give baselines this budget.
    results["timings"]["cpu_seconds"] = round(run.cpu_seconds(), 2)
    if accelerator.is_main_process:
        write_json(out_dir / RESULTS.file, results, RESULTS)
    return results


def _forget_epochs_after(metrics_file: Path, state: dict) -> None:
    """Drop ``metrics.jsonl`` records newer than the checkpoint being resumed.

    A run killed between writing an epoch's record and its checkpoint repeats that epoch; without
    this its record would appear twice. A record cut short by the kill is dropped too.

    Raises:
        CheckpointError: a line is JSON but not an epoch record (the file is not this run's).
    """
    if not metrics_file.is_file():
        return
    reached = {stage: state.get(f"stage{stage}", {}).get("epoch", 0) for stage in (1, 2)}
    kept = []
    for line in read_jsonl(metrics_file, METRICS).lines:
        if not line.complete:  # a kill while the record was being written cuts it
            continue
        record = line.value
        if (
            not isinstance(record, dict)
            or type(record.get("stage")) is not int
            or record["stage"] not in (1, 2)
            or type(record.get("epoch")) is not int
        ):
            raise CheckpointError(
                f"{metrics_file}:{line.number}: expected an epoch record (a JSON object with "
                f"stage 1 or 2 and an integer epoch), found {line.text[:80]}"
            )
        if record["epoch"] <= reached[record["stage"]]:
            kept.append(record)
    write_jsonl(metrics_file, kept)


def _load_extractor(model: DiffusionCom, weights: dict) -> None:
    """Put the extractor's part of a full model state back (the stage-1 weights).

    A stage 1 reused from another run (a sweep's shared stage-1 store, or ``--stage1-checkpoint``)
    may come from a model without a denoiser, so only the extractor's keys are read.
    """
    prefix = "extractor."
    model.extractor.load_state_dict(
        {k[len(prefix) :]: v for k, v in weights.items() if k.startswith(prefix)}
    )


def _load_weights(module: torch.nn.Module, weights: dict, path: Path) -> None:
    try:
        module.load_state_dict(weights)
    except (RuntimeError, TypeError, AttributeError) as error:
        raise CheckpointError(
            f"{path}: weights do not fit this model: {str(error).splitlines()[0]} ..."
        ) from None


def _check_stage1_compatible(
    reused: ExperimentConfig, config: ExperimentConfig, path: Path
) -> None:
    """Stage-1 reuse is only honest when everything stage 1 depends on is identical."""
    before, now = flatten(stage1_relevant(reused)), flatten(stage1_relevant(config))
    differing = [key for key in before if before[key] != now[key]]
    if differing:
        shown = ", ".join(f"{k} ({before[k]!r} there, {now[k]!r} here)" for k in differing[:5])
        raise CheckpointError(f"{path}: stage 1 was trained with another {shown}")


def _stage1_metrics(run: TrainingRun, state: dict, split: str) -> dict:
    """Clean metrics of the stage-1 extractor alone: under ``finetune`` stage 2 changed the
    extractor, so its stage-1 weights are put back for this evaluation and restored after."""
    config, model = run.config, run.model
    if not _extractor_trains_in_stage2(config) or "best_stage1" not in state:
        return evaluate_clean(model, run.graph, split, 1, config, run.accelerator).metrics(
            config.eval.tie
        )
    selected = {k: v.detach().clone() for k, v in model.extractor.state_dict().items()}
    _load_extractor(model, state["best_stage1"])
    try:
        return evaluate_clean(model, run.graph, split, 1, config, run.accelerator).metrics(
            config.eval.tie
        )
    finally:
        model.extractor.load_state_dict(selected)


def _restart_from_best(model: torch.nn.Module, best: dict, optimizer) -> None:
    """Back to the stage's best weights, with fresh optimizer moments (as a new optimizer would
    start): the moments of the plateau's steps describe another point of the loss surface."""
    model.load_state_dict(best)
    optimizer.state.clear()


def _scale_learning_rate(optimizer, scheduler, factor: float) -> None:
    """Multiply the learning rate of every remaining step by ``factor``: the schedule's base
    rates (saved with the scheduler, so a resumed run keeps them) and the current rates."""
    scheduler.base_lrs = [rate * factor for rate in scheduler.base_lrs]
    for group in optimizer.param_groups:
        group["lr"] *= factor


def write_ranks(out_dir: Path, split: str, result: RankingResult) -> None:
    """Write ``ranks_<split>.npz``: the ``(N, 3)`` queries and their ``(N,)`` realistic ranks.

    Numpy, so reports read them without torch: paired tests between runs on the same split
    compare them query by query.
    """
    with atomic_write(out_dir / ranks_file(split)) as stream:
        np.savez_compressed(
            stream,
            queries=result.queries.cpu().numpy(),
            realistic=result.ranks.realistic.cpu().numpy(),
        )


def _final_stage(run: TrainingRun, state: dict) -> int:
    """The stage whose weights are selected: stage 2's best epoch, unless no stage-2 epoch beat
    the extractor it started from on valid (train.stage2_selection=include-stage1)."""
    stage2_trained = run.model.diffusion is not None and run.config.train.stage2_epochs > 0
    return 2 if stage2_trained and "best_stage2" in state else 1


def _final_results(
    run: TrainingRun,
    state: dict,
    train_seconds: float,
    evaluated: dict[str, tuple[RankingResult, float, dict | None]] | None = None,
) -> dict:
    """Valid and test metrics of the selected weights under both protocols, and timings.

    ``evaluated`` holds, per split, what a caller has already computed with the selected weights
    (the fused pack ranks all its members at once): the clean ranks, their milliseconds per query
    and the stage-1 clean metrics; the caller has then also prepared the extractor (frozen, its
    query cache filled split by split as below) for the official passes.
    """
    config, model, graph = run.config, run.model, run.graph
    stage2_trained = model.diffusion is not None and config.train.stage2_epochs > 0
    final_stage = _final_stage(run, state)
    # Every evaluation below runs the same frozen extractor on the same queries: encode once.
    model.eval()
    if evaluated is None:
        model.extractor.freeze_entity_table(
            final_stage == 2 and not _extractor_trains_in_stage2(config),
            cache_queries=run.cache_queries,
        )
    results: dict = {
        "dataset": graph.name,
        "dataset_hash": graph.content_hash(),
        "final_stage": final_stage,
    }
    for split in ("valid", "test"):
        started = time.perf_counter()
        if evaluated is None:
            clean = evaluate_clean(model, graph, split, final_stage, config, run.accelerator)
            milliseconds = 1000 * (time.perf_counter() - started) / len(clean)
        else:
            clean, milliseconds, _ = evaluated[split]
        results[split] = {"clean": clean.metrics(config.eval.tie), "clean_all": clean.to_dict()}
        results[split]["inference_ms_per_query"] = milliseconds
        if stage2_trained:
            if final_stage == 1:
                results[split]["stage1_clean"] = results[split]["clean"]
            elif evaluated is not None and evaluated[split][2] is not None:
                results[split]["stage1_clean"] = evaluated[split][2]
            else:
                results[split]["stage1_clean"] = _stage1_metrics(run, state, split)
        if (
            final_stage == 2
            and config.eval.report_official
            and config.loss.stage2_objective == "diffusion"
        ):
            official = evaluate_official(model, graph, split, config, run.accelerator)
            results[split][f"official-min-of-{config.eval.official_samples}"] = official.metrics(
                config.eval.tie
            )
        if run.accelerator.is_main_process:
            write_ranks(run.out_dir, split, clean)
    if evaluated is None:
        model.extractor.freeze_entity_table(False)
    results["protocol_note"] = (
        "clean: one deterministic pass, no label use (model selection uses it); "
        "official-min-of-S: minimum gold rank over S stochastic passes, label-using, reported only"
    )
    results["best_epochs"] = {k: state[k]["best_epoch"] for k in ("stage1", "stage2") if k in state}
    if config.train.holdout_fraction > 0:
        results["training_split"] = run.split.summary(config)
    if stage2_trained and "start_mrr" in state.get("stage2", {}):
        stage2 = state["stage2"]
        results["selection"] = {
            "rule": config.train.stage2_selection,
            "selected": f"stage{final_stage}",
            "valid_mrr_stage1": stage2["start_mrr"],
            "valid_mrr_stage2_best": stage2["stage2_best_mrr"],
        }
    # Epochs of both stages with their validation, summed over resumes; excludes set-up and
    # the final evaluation.
    results["timings"] = {"train_seconds": round(train_seconds, 2)}
    results["environment"] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "device": str(run.accelerator.device),
        "processes": run.accelerator.num_processes,
    }
    return results
