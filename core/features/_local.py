"""Local model folders: checking them, fingerprinting them, and keeping transformers offline.

Models are only ever loaded from folders on disk (``save_pretrained`` output or a package that ships
one). A name that looks like a hub id is refused with a message saying so, never downloaded.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
from collections.abc import Iterator
from pathlib import Path

__all__ = [
    "file_fingerprint",
    "folder_identity",
    "force_offline",
    "quiet_weight_loading",
    "resolve_model_folder",
]

# Small files whose content defines the model: hashed byte for byte.
_CONTENT_FILES = (
    "config.json",
    "preprocessor_config.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
)
# Large files (weights, vocabularies): fingerprinted by size and modification time.
_STAT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack")
_STAT_NAMES = ("tokenizer.json", "vocab.txt", "vocab.json", "merges.txt", "spiece.model")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def force_offline() -> None:
    """Tell huggingface_hub and transformers never to reach the network in this process."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"


@contextlib.contextmanager
def quiet_weight_loading() -> Iterator[None]:
    """Hide transformers' own per-load "Loading weights" bar; feature extraction shows its own."""
    from transformers.utils import logging as transformers_logging

    enabled = transformers_logging.is_progress_bar_enabled()
    transformers_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            transformers_logging.enable_progress_bar()


def resolve_model_folder(path: str | os.PathLike, setting: str) -> Path:
    """Check that ``path`` is a local model folder and return it absolute.

    Args:
        path: a folder written by ``save_pretrained`` (``~`` and relative paths allowed).
        setting: the settings field that named it, quoted in error messages.

    Raises:
        FileNotFoundError: the folder does not exist (the message says when the value looks like
            a hub id, since models are loaded from local folders only), is not a folder, or has
            no ``config.json``.
    """
    raw = str(path)
    folder = Path(raw).expanduser().resolve()
    if not folder.exists():
        if _HUB_ID.match(raw) and not raw.startswith((".", "~")):
            raise FileNotFoundError(
                f"{setting}={raw!r} is not a local folder (looked for {folder}). Models are loaded "
                "from local folders only, never downloaded: save the model with save_pretrained "
                "(or copy its files) into a folder and give that folder's path."
            )
        raise FileNotFoundError(f"{setting}: model folder {folder} does not exist")
    if not folder.is_dir():
        raise FileNotFoundError(f"{setting}: {folder} is a file, expected a model folder")
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(
            f"{setting}: model folder {folder} has no config.json; expected a folder written by "
            "save_pretrained"
        )
    return folder


def folder_identity(folder: Path) -> dict:
    """What identifies a model folder for the feature cache.

    Returns:
        ``{"folder": absolute path, "files": {name: fingerprint}}`` where small config files are
        fingerprinted by a hash of their content and weights/vocabularies by size and mtime, so a
        model swapped in the same folder gives a different identity.
    """
    files = {}
    for entry in sorted(folder.iterdir()):
        if not entry.is_file():
            continue
        if entry.name in _CONTENT_FILES:
            files[entry.name] = "sha256:" + hashlib.sha256(entry.read_bytes()).hexdigest()
        elif entry.suffix in _STAT_SUFFIXES or entry.name in _STAT_NAMES:
            files[entry.name] = file_fingerprint(entry)
    return {"folder": str(folder), "files": files}


def file_fingerprint(path: Path) -> str:
    """``"<size>:<mtime_ns>"`` of a file: cheap and changes whenever the file is rewritten."""
    stat = path.stat()
    return f"{stat.st_size}:{stat.st_mtime_ns}"
