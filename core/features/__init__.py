"""Frozen entity features: text and image encoders run once per dataset, cached on disk.

Typical use::

    from core.features import FeatureSettings, extract_features

    features = extract_features(graph, FeatureSettings(image_encoder="none"))
    features.text  # (E, 384) unit-norm MiniLM sentence vectors; features.text_mask (E,)
"""

from core.features.extract import EntityFeatures, extract_features
from core.features.image import IMAGE_ENCODERS, load_image_encoder
from core.features.settings import CACHE_DIR_ENV, FeatureSettings, default_cache_dir
from core.features.text import TEXT_ENCODERS, load_text_encoder

__all__ = [
    "CACHE_DIR_ENV",
    "IMAGE_ENCODERS",
    "TEXT_ENCODERS",
    "EntityFeatures",
    "FeatureSettings",
    "default_cache_dir",
    "extract_features",
    "load_image_encoder",
    "load_text_encoder",
]
