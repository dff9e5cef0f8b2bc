"""Full-state checkpoints: model, optimizer, scheduler, counters, RNG states and the config.

Saved with ``torch.save`` and loaded with ``torch.load(..., weights_only=True)``: a checkpoint a user
was handed can hold tensors and plain containers only, never arbitrary pickled code. Writes go to a
temporary file that is renamed into place, so a crash mid-write leaves the previous checkpoint.
"""

from __future__ import annotations

import ast
import pickle
import random
import zipfile
from pathlib import Path

import numpy as np
import torch

from runstore import atomic_write

__all__ = ["CheckpointError", "load_checkpoint", "rng_state", "save_checkpoint", "set_rng_state"]

_ENTRIES = {
    "config": "the run's config",
    "stage": "the stage it stopped in",
    "model": "the model's weights",
    "rng": "the RNG states",
    "stage1": "stage 1's progress",
}
"""What each entry a reader may require holds, for the error that names a missing one."""


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not belong to this run; names the file."""


def rng_state() -> dict:
    """Python, numpy, torch and (when present) every CUDA device's RNG states as tensors and plain
    values (``weights_only``-safe)."""
    numpy_state = np.random.get_state()
    state = {
        "python": repr(random.getstate()),
        "numpy": {
            "keys": torch.from_numpy(numpy_state[1].astype(np.int64)),
            "pos": int(numpy_state[2]),
            "has_gauss": int(numpy_state[3]),
            "cached_gaussian": float(numpy_state[4]),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():  # dropout and diffusion noise of a GPU run draw from these
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict, path: Path | None = None) -> None:
    """Restore what :func:`rng_state` captured.

    CUDA states are restored on as many devices as both the checkpoint and this machine have; a
    checkpoint without them (written on a CPU) or a machine without CUDA restores the rest.

    Args:
        state: the ``rng`` entry of a checkpoint.
        path: the checkpoint it came from, named in the error.

    Raises:
        CheckpointError: the states are incomplete or damaged.
    """
    try:
        version, internal, gauss = ast.literal_eval(state["python"])
        numpy_state = state["numpy"]
        numpy_tuple = (
            "MT19937",
            numpy_state["keys"].numpy().astype(np.uint32),
            numpy_state["pos"],
            numpy_state["has_gauss"],
            numpy_state["cached_gaussian"],
        )
        torch_state = state["torch"]
        cuda_states = list(state.get("cuda", ()))
        if not all(isinstance(s, torch.Tensor) and s.dtype == torch.uint8 for s in cuda_states):
            raise TypeError("the CUDA states are not byte tensors")
        # Everything is checked before anything is set, so a damaged entry changes nothing.
        random.Random().setstate((version, tuple(internal), gauss))
        np.random.RandomState().set_state(numpy_tuple)
        torch.Generator().set_state(torch_state)
    except (KeyError, TypeError, ValueError, SyntaxError, AttributeError, RuntimeError) as error:
        where = f"{path}: " if path is not None else ""
        raise CheckpointError(
            f"{where}the RNG states are damaged ({type(error).__name__}: {error}); expected the "
            "python, numpy and torch states this project writes"
        ) from None
    random.setstate((version, tuple(internal), gauss))
    np.random.set_state(numpy_tuple)
    torch.set_rng_state(torch_state)
    if cuda_states and torch.cuda.is_available():
        # Another number of devices cannot continue the same noise on the missing ones anyway.
        for device, cuda_state in enumerate(cuda_states[: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(cuda_state, device)


def save_checkpoint(state: dict, path: Path) -> None:
    """Write ``state`` atomically to ``path`` (its folder is created if missing)."""
    with atomic_write(path) as stream:
        torch.save(state, stream)


def load_checkpoint(path: Path, required: tuple[str, ...] = ()) -> dict:
    """Read a checkpoint safely; a truncated, foreign or incomplete file gives a
    :class:`CheckpointError` naming it.

    Args:
        path: the checkpoint file.
        required: entries the caller reads besides ``config`` and ``stage`` (``"model"``,
            ``"rng"``, ``"stage1"``); each must be present and a dict.

    Returns:
        The checkpoint's state dict.
    """
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: checkpoint not found") from None
    except pickle.UnpicklingError:
        # torch's text suggests loading with weights_only=False, which would run whatever code
        # the file holds: never pass that on.
        raise CheckpointError(
            f"{path}: not a checkpoint this project wrote, or a damaged one (it does not unpickle "
            "to tensors and plain containers only)"
        ) from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError) as error:
        first_line = str(error).splitlines()[0] if str(error) else type(error).__name__
        detail = "" if "weights_only" in str(error) else f": {first_line}"
        raise CheckpointError(
            f"{path}: not a readable checkpoint (truncated, or not written by diffcom){detail}"
        ) from None
    if not isinstance(state, dict):
        raise CheckpointError(
            f"{path}: not a diffcom checkpoint: it holds a {type(state).__name__}, expected a dict "
            "of the model, optimizer and RNG states and the config"
        )
    if "config" not in state or "stage" not in state:
        raise CheckpointError(f"{path}: not a diffcom checkpoint (no config or stage inside)")
    stage = state["stage"]
    if not isinstance(state["config"], dict) or type(stage) is not int or stage not in (1, 2):
        raise CheckpointError(
            f"{path}: damaged checkpoint: expected a config dict and stage 1 or 2, found a "
            f"{type(state['config']).__name__} and stage {stage!r}"
        )
    for name in required:
        if not isinstance(state.get(name), dict):
            found = "none" if name not in state else f"a {type(state[name]).__name__}"
            raise CheckpointError(
                f"{path}: damaged or not a diffcom checkpoint: its {name!r} entry should hold "
                f"{_ENTRIES.get(name, 'a dict')}, found {found}"
            )
    return state
