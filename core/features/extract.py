"""Frozen entity features, computed once per (dataset, encoders, settings) and cached on disk.

:func:`extract_features` first fingerprints the data and both encoders from files on disk, looks the
key up in the cache, and only on a miss loads the models. Disabling a modality (``"none"``) gives
zero-width features with an all-false mask, which is what the "−text" and "−image" ablations use.

Computing features leaves the process's global RNGs as they were: building an encoder draws random
numbers (EfficientNet initialises its layers before reading its weights) and only a miss builds one,
so otherwise whatever trains next in the process would depend on the state of the cache.
"""

from __future__ import annotations

import contextlib
import os
import random
import time
import warnings
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

from core.data.graph import KnowledgeGraph
from core.features import cache, image, text
from core.features.settings import FeatureSettings, default_cache_dir

__all__ = ["EntityFeatures", "extract_features"]


@dataclass(frozen=True, eq=False)
class EntityFeatures:
    """Frozen text and image features of every entity, with what produced them.

    Attributes:
        text: ``(E, Dt)`` float32; unit-norm rows for entities with text, zero rows otherwise.
            ``Dt = 0`` when the text encoder is ``"none"``.
        text_mask: ``(E,)`` bool, true where the entity had non-empty text.
        image: ``(E, Di)`` float32 mean of the entity's image features, zero rows without one.
            ``Di = 0`` when the image encoder is ``"none"``.
        image_mask: ``(E,)`` bool, true where at least one image was encoded.
        text_encoder: name of the text encoder (``"minilm"``, ``"local:<folder>"``, ``"none"``).
        image_encoder: name of the image encoder (``"efficientnet-lite0"``, ``"clip:<folder>"``,
            ``"none"``).
        settings: the settings used.
        key: the cache key (64 hex digits).
        graph_hash: ``content_hash()`` of the graph the features belong to.
        images_used: number of image files encoded.
        images_skipped: number of image files that could not be read.
        skipped_images: those files.
        cache_path: the cache entry folder ``<cache_dir>/<key>``.
        from_cache: whether this call read the features from the cache.
    """

    text: torch.Tensor
    text_mask: torch.Tensor
    image: torch.Tensor
    image_mask: torch.Tensor
    text_encoder: str
    image_encoder: str
    settings: FeatureSettings
    key: str
    graph_hash: str
    images_used: int
    images_skipped: int
    skipped_images: tuple[str, ...]
    cache_path: Path
    from_cache: bool

    @property
    def num_entities(self) -> int:
        """Number of entities ``E``."""
        return self.text.shape[0]

    @property
    def text_dim(self) -> int:
        """Text feature width ``Dt`` (0 when text is disabled)."""
        return self.text.shape[1]

    @property
    def image_dim(self) -> int:
        """Image feature width ``Di`` (0 when images are disabled)."""
        return self.image.shape[1]


def extract_features(
    graph: KnowledgeGraph,
    settings: FeatureSettings | None = None,
    cache_dir: str | os.PathLike | None = None,
    progress: bool = True,
    device: str | torch.device | None = None,
) -> EntityFeatures:
    """Text and image features of every entity of ``graph``, from the cache when possible.

    Args:
        graph: the knowledge graph; its ``entity_texts`` and ``entity_images`` are encoded.
        settings: encoders and their options; default :class:`FeatureSettings`.
        cache_dir: cache folder; default :func:`default_cache_dir`. Always used as an absolute path.
        progress: show tqdm bars while encoding.
        device: where the encoders run on a miss; default CUDA when available, else the CPU. The
            device is not part of the key (results agree to float rounding).

    Returns:
        The features. A miss computes and stores them; a hit loads no model at all.

    Raises:
        FileNotFoundError: a configured model folder is missing, is a hub id, or is incomplete.
    """
    settings = settings if settings is not None else FeatureSettings()
    root = Path(cache_dir).expanduser().resolve() if cache_dir is not None else default_cache_dir()
    graph_hash = graph.content_hash()
    text_identity = text.text_encoder_identity(settings)
    image_identity = image.image_encoder_identity(settings)
    key = cache.cache_key(graph_hash, text_identity, image_identity, settings.to_dict())
    folder = root / key

    entry = cache.load_entry(folder, key, graph.num_entities)
    if entry is not None:
        tensors, metadata = entry
        try:
            return _features(tensors, metadata, settings, folder, from_cache=True)
        except (KeyError, TypeError, ValueError) as error:
            warnings.warn(
                f"feature cache entry {folder} has an incomplete sidecar ({error!r}); recomputing it",
                RuntimeWarning,
                stacklevel=2,
            )

    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    with _global_rng_untouched(device):
        started = time.perf_counter()
        text_features, text_mask = _encode_texts(graph, settings, device, progress)
        text_seconds = time.perf_counter() - started
        started = time.perf_counter()
        encoding = _encode_images(graph, settings, device, progress)
        image_seconds = time.perf_counter() - started
    if encoding.skipped:
        warnings.warn(
            f"{graph.name}: skipped {len(encoding.skipped)} unreadable image file(s), "
            f"e.g. {encoding.skipped[0]}",
            RuntimeWarning,
            stacklevel=2,
        )

    tensors = {
        "text": text_features,
        "text_mask": text_mask,
        "image": encoding.features,
        "image_mask": encoding.mask,
    }
    metadata = {
        "format": cache.CACHE_FORMAT,
        "key": key,
        "graph": {"name": graph.name, "content_hash": graph_hash, "entities": graph.num_entities},
        "settings": settings.to_dict(),
        "text_encoder": text_identity,
        "image_encoder": image_identity,
        "text_dim": text_features.shape[1],
        "image_dim": encoding.features.shape[1],
        "entities_with_text": int(text_mask.sum()),
        "entities_with_images": int(encoding.mask.sum()),
        "images_used": encoding.images_used,
        "images_skipped": len(encoding.skipped),
        "skipped_images": list(encoding.skipped),
        "seconds": {"text": round(text_seconds, 3), "image": round(image_seconds, 3)},
        "device": str(device),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    try:
        cache.save_entry(folder, tensors, metadata)
    except OSError as error:  # a read-only or full disk must not throw the computed features away
        warnings.warn(
            f"could not write the feature cache entry {folder}: {error}",
            RuntimeWarning,
            stacklevel=2,
        )
    return _features(tensors, metadata, settings, folder, from_cache=False)


@contextlib.contextmanager
def _global_rng_untouched(device: str | torch.device):
    """Restore the python, numpy and torch RNG states (CPU, and the encoders' CUDA device) after
    the block, whatever it drew."""
    device = torch.device(device)
    cuda_devices = []
    if device.type == "cuda":
        cuda_devices = [device.index if device.index is not None else torch.cuda.current_device()]
    python_state, numpy_state = random.getstate(), np.random.get_state()
    try:
        with torch.random.fork_rng(devices=cuda_devices):
            yield
    finally:
        random.setstate(python_state)
        np.random.set_state(numpy_state)


def _encode_texts(
    graph: KnowledgeGraph, settings: FeatureSettings, device: str | torch.device, progress: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(E, Dt)`` features and ``(E,)`` mask; empty texts get zero rows and a false mask."""
    texts = [entity_text.strip() for entity_text in graph.entity_texts]
    mask = torch.tensor([bool(entity_text) for entity_text in texts], dtype=torch.bool)
    if not settings.uses_text:
        return torch.zeros(graph.num_entities, 0), torch.zeros(graph.num_entities, dtype=torch.bool)
    encoder = text.load_text_encoder(settings, device)
    features = torch.zeros(graph.num_entities, encoder.dim, dtype=torch.float32)
    present = [entity_text for entity_text in texts if entity_text]
    if present:
        features[mask] = encoder.encode(present, progress=progress)
    return features, mask


def _encode_images(
    graph: KnowledgeGraph, settings: FeatureSettings, device: str | torch.device, progress: bool
) -> image.ImageEncoding:
    """Per-entity image features; an empty ``(E, 0)`` encoding when images are disabled."""
    if not settings.uses_images:
        return image.ImageEncoding(
            torch.zeros(graph.num_entities, 0),
            torch.zeros(graph.num_entities, dtype=torch.bool),
            0,
            (),
        )
    encoder = image.load_image_encoder(settings, device)
    return image.encode_entity_images(
        encoder,
        graph.entity_images,
        settings.max_images_per_entity,
        settings.image_batch_size,
        progress=progress,
    )


def _features(
    tensors: dict[str, torch.Tensor],
    metadata: dict,
    settings: FeatureSettings,
    folder: Path,
    from_cache: bool,
) -> EntityFeatures:
    return EntityFeatures(
        text=tensors["text"],
        text_mask=tensors["text_mask"],
        image=tensors["image"],
        image_mask=tensors["image_mask"],
        text_encoder=metadata["text_encoder"]["name"],
        image_encoder=metadata["image_encoder"]["name"],
        settings=settings,
        key=metadata["key"],
        graph_hash=metadata["graph"]["content_hash"],
        images_used=int(metadata["images_used"]),
        images_skipped=int(metadata["images_skipped"]),
        skipped_images=tuple(metadata["skipped_images"]),
        cache_path=folder,
        from_cache=from_cache,
    )
