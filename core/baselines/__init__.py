"""Classical KGC baselines trained as ordinary runs, compared with DiffusionCom under one protocol.

A config whose ``baseline.model`` names one of :data:`BASELINE_MODELS` trains that model instead of
DiffusionCom (``core.train.trainer.train`` hands the run here), and the protocol is DiffusionCom's:

* **Same data.** PyKEEN trains on exactly the run's graph: a ``TriplesFactory`` built from the
  graph's id tensors and vocabularies, so entity and relation ids are ours. It sees the training
  triples only (no text, no images), with inverse triples so head queries are learned as tail
  queries of ``r⁻¹``.
* **Same evaluator.** After every epoch :func:`core.evaluation.evaluate` ranks the valid split
  (filtered, both directions, ``eval.tie``); the best-valid weights are kept, and at the end they
  are ranked on valid and test by the same function. A head query ``(t, r + R, ?)`` is PyKEEN's
  ``predict_h`` on ``(r, t)``.
* **Same run folder.** ``config.json``, one ``metrics.jsonl`` record per epoch (as stage 1),
  ``checkpoints/last.pt`` after every epoch (a killed run resumes from it and ends as an
  uninterrupted one would), ``results.json`` with DiffusionCom's keys plus a ``baseline`` section,
  and ``ranks_valid.npz`` / ``ranks_test.npz`` in the same format and query order.
* **A budget.** ``baseline.epochs`` at most; ``baseline.budget_seconds`` of ``baseline.clock`` (the
  process's CPU time or the wall clock, from the start of the run and summed over resumes), checked
  after each epoch; ``baseline.patience`` epochs without a better valid MRR.

Training (LCWA, softmax cross entropy, Adam) is PyKEEN's own loop, see :mod:`core.baselines.pykeen`.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from core.config import ConfigError

if TYPE_CHECKING:
    from core.config import ExperimentConfig

__all__ = ["BASELINE_MODELS", "train_baseline"]

#: The models ``baseline.model`` may name (``core.config`` writes the same names out).
BASELINE_MODELS: tuple[str, ...] = (
    "pykeen:TransE",
    "pykeen:DistMult",
    "pykeen:ComplEx",
    "pykeen:RotatE",
    "pykeen:TuckER",
)


def train_baseline(
    config: ExperimentConfig,
    out_dir: str | Path,
    *,
    callback: Callable[[dict], None] | None = None,
    stage1_checkpoint: str | Path | None = None,
    progress: bool = True,
) -> dict:
    """Train and evaluate the baseline ``config.baseline.model``; resumes from
    ``out_dir/checkpoints/last.pt`` when present.

    Args:
        config: the run's config (saved as ``config.json``).
        out_dir: the run directory.
        callback: called with every epoch's metrics record.
        stage1_checkpoint: must be None: a baseline has no DiffusionCom stage 1 to reuse.
        progress: show a progress bar.

    Returns:
        The ``results.json`` content.

    Raises:
        ConfigError: ``baseline.model`` is not a baseline, or a stage-1 checkpoint was given.
    """
    if config.baseline.model not in BASELINE_MODELS:
        raise ConfigError(
            f"baseline.model: {config.baseline.model!r} is not a baseline; choose one of "
            f"{', '.join(BASELINE_MODELS)}"
        )
    if stage1_checkpoint is not None:
        raise ConfigError(
            f"baseline.model={config.baseline.model} trains no DiffusionCom stage 1, so it cannot "
            f"start from the stage-1 checkpoint {stage1_checkpoint}; leave it out"
        )
    # Imported here so that the names above load without torch or PyKEEN.
    from core.baselines.pykeen import train_pykeen

    return train_pykeen(config, out_dir, callback=callback, progress=progress)
