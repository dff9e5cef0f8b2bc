"""On-disk cache of entity features: one safetensors file and a JSON sidecar per key.

Layout: ``<cache_dir>/<key>/features.safetensors`` and ``<cache_dir>/<key>/features.json``. Both are
written atomically (:func:`runstore.atomic_write_bytes`: a temporary file in the same folder,
renamed into place), so a reader never sees a half-written file, whatever other processes do at the same time. The sidecar is
written last and records the size and SHA-256 of the tensor file: an entry whose tensor file does not
match it (truncated, corrupted, or replaced by a concurrent writer) is reported and recomputed.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from pathlib import Path

import torch
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors

from runstore import atomic_write_bytes

__all__ = [
    "CACHE_FORMAT",
    "METADATA_FILE",
    "TENSOR_FILE",
    "cache_key",
    "load_entry",
    "save_entry",
]

CACHE_FORMAT = 1
"""Bumped whenever the way features are computed or stored changes; part of every key."""
TENSOR_FILE = "features.safetensors"
METADATA_FILE = "features.json"
_TENSORS = {
    "text": torch.float32,
    "text_mask": torch.bool,
    "image": torch.float32,
    "image_mask": torch.bool,
}


def cache_key(graph_hash: str, text_identity: dict, image_identity: dict, settings: dict) -> str:
    """The cache key: SHA-256 over the data, both encoders' identities and every setting.

    Args:
        graph_hash: ``KnowledgeGraph.content_hash()``.
        text_identity: from :func:`core.features.text.text_encoder_identity`.
        image_identity: from :func:`core.features.image.image_encoder_identity`.
        settings: ``FeatureSettings.to_dict()``.

    Returns:
        64 hex digits.
    """
    payload = {
        "format": CACHE_FORMAT,
        "graph": graph_hash,
        "text_encoder": text_identity,
        "image_encoder": image_identity,
        "settings": settings,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def save_entry(folder: Path, tensors: dict[str, torch.Tensor], metadata: dict) -> None:
    """Write one cache entry atomically: the tensor file first, then the sidecar that vouches for it.

    Args:
        folder: ``<cache_dir>/<key>``; created if missing.
        tensors: ``text (E, Dt)``, ``text_mask (E,)``, ``image (E, Di)``, ``image_mask (E,)``.
        metadata: JSON-serialisable; the tensor file's size and SHA-256 are added under
            ``"tensor_file"``.
    """
    folder.mkdir(parents=True, exist_ok=True)
    payload = save_tensors({name: tensor.contiguous() for name, tensor in tensors.items()})
    record = dict(metadata)
    record["tensor_file"] = {
        "name": TENSOR_FILE,
        "bytes": len(payload),
        "sha256": hashlib.sha256(payload).hexdigest(),
    }
    atomic_write_bytes(folder / TENSOR_FILE, payload)
    atomic_write_bytes(
        folder / METADATA_FILE, json.dumps(record, indent=2, sort_keys=True).encode()
    )


def load_entry(
    folder: Path, key: str, num_entities: int
) -> tuple[dict[str, torch.Tensor], dict] | None:
    """Read a cache entry if it is complete and intact.

    A missing entry returns ``None`` silently; an entry that exists but is incomplete, corrupted or
    inconsistent warns (``RuntimeWarning``) and returns ``None`` so the caller recomputes it.

    Args:
        folder: ``<cache_dir>/<key>``.
        key: the expected key, checked against the sidecar.
        num_entities: the expected number of rows ``E``.

    Returns:
        ``(tensors, metadata)`` or ``None``.
    """
    metadata_path, tensor_path = folder / METADATA_FILE, folder / TENSOR_FILE
    if not metadata_path.exists() and not tensor_path.exists():
        return None
    try:
        metadata = json.loads(metadata_path.read_text())
        payload = tensor_path.read_bytes()
        problem = _check(metadata, payload, key)
        tensors = load_tensors(payload) if problem is None else {}
    except Exception as error:  # any unreadable file: report it, recompute, never crash
        problem = f"{type(error).__name__}: {error}"
    if problem is None:
        problem = _check_tensors(tensors, metadata, num_entities)
    if problem is not None:
        warnings.warn(
            f"feature cache entry {folder} is unusable ({problem}); recomputing it",
            RuntimeWarning,
            stacklevel=3,
        )
        return None
    return tensors, metadata


def _check(metadata: object, payload: bytes, key: str) -> str | None:
    if not isinstance(metadata, dict):
        return "the sidecar is not a JSON object"
    if metadata.get("format") != CACHE_FORMAT or metadata.get("key") != key:
        return "the sidecar belongs to another key or cache format"
    expected = metadata.get("tensor_file") or {}
    if expected.get("bytes") != len(payload):
        return f"tensor file has {len(payload)} bytes, the sidecar says {expected.get('bytes')}"
    if expected.get("sha256") != hashlib.sha256(payload).hexdigest():
        return "tensor file checksum does not match the sidecar"
    return None


def _check_tensors(
    tensors: dict[str, torch.Tensor], metadata: dict, num_entities: int
) -> str | None:
    if set(tensors) != set(_TENSORS):
        return f"tensor file holds {sorted(tensors)}, expected {sorted(_TENSORS)}"
    widths = {"text": metadata.get("text_dim"), "image": metadata.get("image_dim")}
    for name, dtype in _TENSORS.items():
        tensor = tensors[name]
        shape = (num_entities,) if name.endswith("_mask") else (num_entities, widths[name])
        if tensor.dtype != dtype or tuple(tensor.shape) != shape:
            return f"{name} is {tensor.dtype} {tuple(tensor.shape)}, expected {dtype} {shape}"
    return None
