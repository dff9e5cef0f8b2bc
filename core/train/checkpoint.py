"""Full-state checkpoints: model, optimizer, scheduler, counters, RNG states and the config.

Saved with ``torch.save`` and loaded with ``torch.load(..., weights_only=True)``: a checkpoint a user
was handed can hold tensors and plain containers only, never arbitrary pickled code. Writes go to a
temporary file that is renamed into place, so a crash mid-write leaves the previous checkpoint.
"""

from __future__ import annotations

import os
import pickle
import random
import tempfile
import zipfile
from pathlib import Path

import numpy as np
import torch

__all__ = ["CheckpointError", "load_checkpoint", "rng_state", "save_checkpoint", "set_rng_state"]


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not belong to this run; names the file."""


def rng_state() -> dict:
    """Python, numpy and torch RNG states as tensors and plain values (``weights_only``-safe)."""
    numpy_state = np.random.get_state()
    return {
        "python": repr(random.getstate()),
        "numpy": {
            "keys": torch.from_numpy(numpy_state[1].astype(np.int64)),
            "pos": int(numpy_state[2]),
            "has_gauss": int(numpy_state[3]),
            "cached_gaussian": float(numpy_state[4]),
        },
        "torch": torch.get_rng_state(),
    }


def set_rng_state(state: dict) -> None:
    """Restore what :func:`rng_state` captured."""
    import ast

    version, internal, gauss = ast.literal_eval(state["python"])
    random.setstate((version, tuple(internal), gauss))
    numpy_state = state["numpy"]
    np.random.set_state(
        (
            "MT19937",
            numpy_state["keys"].numpy().astype(np.uint32),
            numpy_state["pos"],
            numpy_state["has_gauss"],
            numpy_state["cached_gaussian"],
        )
    )
    torch.set_rng_state(state["torch"])


def save_checkpoint(state: dict, path: Path) -> None:
    """Write ``state`` atomically to ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    os.close(handle)
    try:
        torch.save(state, temporary)
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.unlink(temporary)


def load_checkpoint(path: Path) -> dict:
    """Read a checkpoint safely; a truncated or foreign file gives a :class:`CheckpointError`."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: checkpoint not found") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, pickle.UnpicklingError, OSError) as error:
        raise CheckpointError(
            f"{path}: not a readable checkpoint (truncated, or not written by diffcom): {error}"
        ) from None
    if not isinstance(state, dict) or "config" not in state or "stage" not in state:
        raise CheckpointError(f"{path}: not a diffcom checkpoint (no config or stage inside)")
    return state
