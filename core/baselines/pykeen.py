"""PyKEEN models trained on a run's graph, epoch by epoch, under the project's protocol.

The loop is PyKEEN's ``LCWATrainingLoop`` (1-vs-all over tails with inverse triples, softmax cross
entropy, Adam), as ``benchmarks/bench_quality.py`` ran it; one PyKEEN callback after every epoch
ranks the valid split with :func:`core.evaluation.evaluate`, keeps the best weights, writes the
epoch's record and checkpoint, and decides whether to stop (see :mod:`core.baselines`).

Randomness: model init and training (batch order, TuckER's dropout) draw from the global python,
numpy and torch RNGs. They are seeded from ``(config.seed, purpose)`` right before each use, so a
run depends on its config alone; a resumed run restores the states its checkpoint saved.
"""

from __future__ import annotations

import gc
import hashlib
import platform
import time
from collections.abc import Callable
from pathlib import Path

import torch
from pykeen.losses import CrossEntropyLoss
from pykeen.models import ComplEx, DistMult, RotatE, TransE, TuckER
from pykeen.models.base import Model
from pykeen.training import LCWATrainingLoop
from pykeen.training.callbacks import TrainingCallback
from pykeen.training.training_loop import NoTrainingBatchError
from pykeen.triples import TriplesFactory
from pykeen.utils import set_random_seed
from pykeen.version import get_version

from core.config import BaselineConfig, ConfigError, ExperimentConfig, config_to_dict, save_config
from core.data.graph import KnowledgeGraph
from core.evaluation import evaluate
from core.train.checkpoint import (
    CheckpointError,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
)

# The trainer's own resume checks and metrics clean-up, so a baseline run folder resumes, and
# refuses a foreign checkpoint, exactly as a DiffusionCom one does.
from core.train.trainer import (
    _check_resume_config,
    _forget_epochs_after,
    _load_weights,
    load_run_dataset,
    write_ranks,
)
from runstore import CONFIG, METRICS, RESULTS, append_jsonl, checkpoint_path, write_json

__all__ = ["PYKEEN_MODELS", "build_model", "score_function", "train_pykeen", "triples_factory"]

#: ``baseline.model`` → (PyKEEN class, constructor arguments besides ``embedding_dim``).
#: Regularizers are the models' defaults.
PYKEEN_MODELS: dict[str, tuple[type[Model], dict]] = {
    "pykeen:TransE": (TransE, {}),
    "pykeen:DistMult": (DistMult, {}),
    "pykeen:ComplEx": (ComplEx, {}),
    "pykeen:RotatE": (RotatE, {}),
    # TuckER's relation side as benchmarks/bench_quality.py measured it.
    "pykeen:TuckER": (TuckER, {"relation_dim": 30}),
}

_CLOCKS: dict[str, Callable[[], float]] = {"cpu": time.process_time, "wall": time.perf_counter}


def _seed(seed: int, purpose: str) -> int:
    """A seed for one purpose of a run: its own stream per ``(seed, purpose)``, as the trainer's
    ``_seed_for`` derives them."""
    digest = hashlib.sha256(f"{seed}:baseline-{purpose}".encode()).digest()
    return int.from_bytes(digest[:4], "little")


def triples_factory(graph: KnowledgeGraph) -> TriplesFactory:
    """The graph's training triples for PyKEEN, with our ids (its vocabularies in id order) and
    inverse triples."""
    return TriplesFactory(
        mapped_triples=graph.train,
        entity_to_id={entity: index for index, entity in enumerate(graph.entities)},
        relation_to_id={relation: index for index, relation in enumerate(graph.relations)},
        create_inverse_triples=True,
    )


def build_model(config: ExperimentConfig, factory: TriplesFactory) -> Model:
    """The untrained ``config.baseline.model``; its weights depend on ``config.seed`` only."""
    model_class, arguments = PYKEEN_MODELS[config.baseline.model]
    return model_class(
        triples_factory=factory,
        embedding_dim=config.baseline.embedding_dim,
        loss=CrossEntropyLoss(),
        random_seed=_seed(config.seed, "model-init"),
        **arguments,
    )


def score_function(model: Model, num_relations: int):
    """Our ``score_fn(heads, relations in [0, 2R)) -> (B, E)`` on top of a PyKEEN model.

    A tail query ``(h, r, ?)`` is ``predict_t`` on ``(h, r)``; a head query of ``(?, r, t)``, which
    our evaluator asks as ``(t, r + R, ?)``, is ``predict_h`` on ``(r, t)`` (``rt_batch`` columns
    are relation, tail), which scores it as the tail query ``(t, r⁻¹, ?)`` the model learned.
    ``predict_*`` switch the model to eval mode.
    """

    def score(heads: torch.Tensor, relations: torch.Tensor) -> torch.Tensor:
        forward = relations < num_relations
        scores = torch.empty(len(heads), model.num_entities, device=heads.device)
        if forward.any():
            pairs = torch.stack([heads[forward], relations[forward]], dim=1)
            scores[forward] = model.predict_t(pairs).float().to(heads.device)
        if (~forward).any():
            pairs = torch.stack([relations[~forward] - num_relations, heads[~forward]], dim=1)
            scores[~forward] = model.predict_h(pairs).float().to(heads.device)
        return scores

    return score


class _AfterEveryEpoch(TrainingCallback):
    """Hands every finished epoch to ``handler(epoch, loss, seconds)`` and stops PyKEEN's loop once
    it returns True (``seconds``: the epoch's training time)."""

    def __init__(self, handler: Callable[[int, float, float], bool]) -> None:
        super().__init__()
        self.handler = handler
        self.epoch_started = time.perf_counter()

    def post_epoch(self, epoch: int, epoch_loss: float, **kwargs) -> None:
        if self.handler(epoch, epoch_loss, time.perf_counter() - self.epoch_started):
            self.training_loop._should_stop = True  # PyKEEN's own stop flag, read after this call
        self.epoch_started = time.perf_counter()


def _stop_reason(baseline: BaselineConfig, epoch: int, stale: int, used: float) -> str | None:
    """Why training ends after ``epoch`` (``used``: seconds of ``baseline.clock`` so far)."""
    if epoch >= baseline.epochs:
        return "epochs"
    if baseline.budget_seconds and used >= baseline.budget_seconds:
        return "budget"
    if baseline.patience and stale >= baseline.patience:
        return "patience"
    return None


def _fresh_state(config: ExperimentConfig) -> dict:
    return {
        "config": config_to_dict(config),
        "stage": 1,
        "stage1": {
            "epoch": 0,
            "best_mrr": -1.0,
            "best_epoch": 0,
            "stale": 0,
            "done": False,
            "stopped_by": None,
        },
        "used_seconds": {name: 0.0 for name in _CLOCKS},
        "train_seconds": 0.0,
    }


def _resume_state(path: Path, config: ExperimentConfig, model: Model, optimizer) -> dict:
    """The state of ``path`` with its weights and optimizer state loaded; a checkpoint of another
    config or model, or a damaged one, is a :class:`CheckpointError` naming the file."""
    state = load_checkpoint(path, required=("model", "rng", "stage1", "optimizer", "used_seconds"))
    _check_resume_config(state["config"], config, path)
    fresh = _fresh_state(config)
    for entry in ("stage1", "used_seconds"):
        missing = sorted(set(fresh[entry]) - set(state[entry]))
        if missing:
            raise CheckpointError(
                f"{path}: damaged baseline checkpoint: its {entry!r} entry lacks "
                f"{', '.join(missing)}"
            )
    if "best_stage1" not in state or not isinstance(state.get("train_seconds"), float):
        raise CheckpointError(
            f"{path}: damaged baseline checkpoint: expected the best weights (best_stage1) and "
            "train_seconds beside the model"
        )
    _load_weights(model, state["model"], path)
    try:
        optimizer.load_state_dict(state["optimizer"])
    except (ValueError, KeyError, TypeError) as error:
        raise CheckpointError(
            f"{path}: the optimizer state does not fit this model: {error}"
        ) from None
    return state


def train_pykeen(
    config: ExperimentConfig,
    out_dir: str | Path,
    *,
    callback: Callable[[dict], None] | None = None,
    progress: bool = True,
) -> dict:
    """Train ``config.baseline.model`` through PyKEEN and evaluate it as a DiffusionCom run is
    (see :func:`core.baselines.train_baseline`, which checks the arguments)."""
    call_started = {name: clock() for name, clock in _CLOCKS.items()}
    baseline = config.baseline
    out_dir = Path(out_dir).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)

    graph = load_run_dataset(config)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    factory = triples_factory(graph)
    model = build_model(config, factory).to(device)
    loop = LCWATrainingLoop(
        model=model,
        triples_factory=factory,
        optimizer="adam",
        optimizer_kwargs={"lr": baseline.lr},
        # PyKEEN's default probes memory with trial batches before the first epoch, and may then
        # split batches by what this machine has free: whole batches, the same on any machine.
        automatic_memory_optimization=False,
    )
    score = score_function(model, graph.num_relations)

    last = checkpoint_path(out_dir)
    resuming = last.exists()
    if resuming:
        state = _resume_state(last, config, model, loop.optimizer)
        _forget_epochs_after(out_dir / METRICS.file, state)
    else:
        state = _fresh_state(config)
    save_config(config, out_dir / CONFIG.file)
    if not resuming:
        # A run killed before its first checkpoint restarts from scratch: its old records go.
        (out_dir / METRICS.file).unlink(missing_ok=True)
    progress_state = state["stage1"]
    used_before = dict(state["used_seconds"])

    def used_seconds() -> dict[str, float]:
        """Seconds of both clocks since the run began, earlier calls included."""
        return {
            name: used_before[name] + clock() - call_started[name]
            for name, clock in _CLOCKS.items()
        }

    def after_epoch(epoch: int, loss: float, epoch_seconds: float) -> bool:
        started = time.perf_counter()
        valid = evaluate(score, graph, "valid", config.eval.batch_size, device=device)
        metrics = valid.metrics(config.eval.tie)
        record = {
            "stage": 1,
            "epoch": epoch,
            "loss": loss,
            "lr": baseline.lr,
            "train_seconds": round(epoch_seconds, 3),
            **{f"valid.clean.{name}": value for name, value in metrics.items()},
        }
        if metrics["mrr"] > progress_state["best_mrr"]:
            progress_state.update(best_mrr=metrics["mrr"], best_epoch=epoch, stale=0)
            state["best_stage1"] = {k: v.detach().clone() for k, v in model.state_dict().items()}
        else:
            progress_state["stale"] += 1
        used = used_seconds()
        stopped_by = _stop_reason(baseline, epoch, progress_state["stale"], used[baseline.clock])
        if stopped_by == "patience":
            record["early_stopped"] = True
        progress_state.update(epoch=epoch, done=stopped_by is not None, stopped_by=stopped_by)
        # Wall time of all epochs so far, across resumes (valid evaluation included).
        state["train_seconds"] += epoch_seconds + time.perf_counter() - started
        state.update(
            model=model.state_dict(),
            optimizer=loop.optimizer.state_dict(),
            rng=rng_state(),
            used_seconds=used,
        )
        append_jsonl(out_dir / METRICS.file, record)
        save_checkpoint(state, last)
        if callback is not None:
            callback(record)
            # The next epoch continues the streams the checkpoint holds, as a resumed run does,
            # whatever the callback drew from the global RNGs.
            set_rng_state(state["rng"], last)
        return progress_state["done"]

    if not progress_state["done"]:
        if resuming:
            set_rng_state(state["rng"], last)
            # PyKEEN numbers the next epoch from here; continue_training keeps weights and Adam.
            loop._epoch = progress_state["epoch"]
        else:
            # PyKEEN re-initialises the weights when training starts: from this stream too.
            set_random_seed(_seed(config.seed, "training"))
        # PyKEEN runs gc.collect() after every epoch, which walks every object of the process
        # (torch's and the dataset's included): on a small graph most of an epoch's time, spent
        # from the baseline's budget. Objects older than training are left out of those walks.
        gc.freeze()
        try:
            loop.train(
                triples_factory=factory,
                num_epochs=baseline.epochs,
                batch_size=baseline.batch_size,
                label_smoothing=0.0,
                continue_training=resuming,
                use_tqdm=progress,
                pin_memory=device.type == "cuda",
                checkpoint_directory=last.parent,  # PyKEEN creates it; it writes nothing there
                callbacks=[_AfterEveryEpoch(after_epoch)],
            )
        except NoTrainingBatchError:
            raise ConfigError(
                f"baseline.batch_size={baseline.batch_size} exceeds the number of training "
                f"(head, relation) pairs, and {baseline.model} drops every incomplete batch (batch "
                "norm); choose a smaller baseline.batch_size"
            ) from None
        finally:
            gc.unfreeze()

    model.load_state_dict(state["best_stage1"])
    results = _final_results(config, graph, score, device, state, out_dir)
    cpu_seconds = used_seconds()["cpu"]
    results["timings"] = {
        "train_seconds": round(state["train_seconds"], 2),
        # All calls of this run (a resumed one's earlier calls up to its checkpoint), set-up and
        # final evaluation included.
        "cpu_seconds": round(cpu_seconds, 2),
    }
    results["baseline"] = {
        "model": baseline.model,
        "epochs_run": progress_state["epoch"],
        "best_epoch": progress_state["best_epoch"],
        "budget_seconds": baseline.budget_seconds or None,
        "clock": baseline.clock,
        "stopped_by": progress_state["stopped_by"],
    }
    results["environment"] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "pykeen": get_version(),
        "device": str(device),
        "processes": 1,
    }
    write_json(out_dir / RESULTS.file, results, RESULTS)
    return results


def _final_results(
    config: ExperimentConfig,
    graph: KnowledgeGraph,
    score,
    device: torch.device,
    state: dict,
    out_dir: Path,
) -> dict:
    """Valid and test metrics of the selected weights, in DiffusionCom's results layout, and the
    per-query ranks files."""
    results: dict = {
        "dataset": graph.name,
        "dataset_hash": graph.content_hash(),
        "final_stage": 1,
    }
    for split in ("valid", "test"):
        started = time.perf_counter()
        clean = evaluate(score, graph, split, config.eval.batch_size, device=device)
        milliseconds = 1000 * (time.perf_counter() - started) / len(clean)
        results[split] = {
            "clean": clean.metrics(config.eval.tie),
            "clean_all": clean.to_dict(),
            "inference_ms_per_query": milliseconds,
        }
        write_ranks(out_dir, split, clean)
    results["protocol_note"] = (
        "clean: one deterministic pass, no label use (model selection uses it); a baseline has no "
        "stochastic protocol"
    )
    results["best_epochs"] = {"stage1": state["stage1"]["best_epoch"]}
    return results
