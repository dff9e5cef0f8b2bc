"""Image file checks: unreadable, all-black and 1-pixel images are skipped and counted, never a crash.

The MKGformer image folders hold ~10 web images per entity; some are black or 1×1 placeholders that
break preprocessing. Checking ~150k images on every load would dominate start-up, so verdicts are kept
in a small JSON cache keyed by the file's size and modification time: only new or changed files are
decoded again.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import warnings
from collections.abc import Iterable
from pathlib import Path

from PIL import Image

from runstore import atomic_write_bytes

__all__ = ["IMAGE_SUFFIXES", "ImageVerdictCache", "check_image"]

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".gif", ".bmp", ".webp"})

#: Verdicts besides "ok"; each names a reason an image is skipped.
SKIP_REASONS = ("unreadable", "black", "tiny")


def check_image(path: Path) -> str:
    """Return ``"ok"`` or the reason to skip: ``"unreadable"``, ``"black"`` or ``"tiny"`` (≤ 1 pixel).

    JPEGs are decoded at reduced scale (``draft``) so a check costs a fraction of a full decode.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter(
                "ignore"
            )  # PIL warns on odd EXIF/ICC data; that is not our concern
            with Image.open(path) as image:
                if image.width * image.height <= 1:
                    return "tiny"
                image.draft("RGB", (64, 64))
                extrema = image.convert("L").getextrema()
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
        return "unreadable"
    return "black" if extrema[1] == 0 else "ok"


class ImageVerdictCache:
    """Check verdicts of image files, remembered across loads by ``(path, size, mtime)``.

    Args:
        cache_dir: folder for the verdict files, or ``None`` to keep verdicts in memory only.
        image_root: the dataset's image folder; one verdict file per root.
    """

    def __init__(self, cache_dir: Path | None, image_root: Path) -> None:
        self._file = None
        self._verdicts: dict[str, list] = {}
        self._dirty = False
        if cache_dir is not None:
            key = hashlib.sha256(str(image_root.resolve()).encode()).hexdigest()[:16]
            self._file = Path(cache_dir) / "image-checks" / f"{key}.json"
            with contextlib.suppress(OSError, ValueError):
                loaded = json.loads(self._file.read_text())
                if isinstance(loaded, dict):
                    self._verdicts = loaded

    def verdicts(self, paths: Iterable[Path]) -> list[str]:
        """Verdict for each path, decoding only files not seen before with this size and mtime."""
        results = []
        for path in paths:
            try:
                stat = path.stat()
            except OSError:
                results.append("unreadable")
                continue
            key = str(path)
            known = self._verdicts.get(key)
            if known and known[0] == stat.st_size and known[1] == stat.st_mtime_ns:
                results.append(known[2])
                continue
            verdict = check_image(path)
            self._verdicts[key] = [stat.st_size, stat.st_mtime_ns, verdict]
            self._dirty = True
            results.append(verdict)
        return results

    def save(self) -> None:
        """Write the verdicts atomically; a failure to write only costs a re-check next time."""
        if self._file is None or not self._dirty:
            return
        try:
            atomic_write_bytes(self._file, json.dumps(self._verdicts).encode())
            self._dirty = False
        except OSError as error:
            warnings.warn(f"could not save image check cache {self._file}: {error}", stacklevel=2)
