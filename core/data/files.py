"""Reading the line-oriented text files every dataset format uses, with errors that point at a line.

All readers are CRLF tolerant (the MKGformer FB15k-237 files end lines with ``\\r\\n``), skip blank
lines, and raise :class:`DatasetError` naming the file and the 1-based line number of bad input.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

__all__ = ["DatasetError", "read_columns", "read_id_list", "read_id_texts"]


class DatasetError(ValueError):
    """Bad dataset input; the message names the file (and line) and what was expected."""


def _lines(path: Path) -> Iterator[tuple[int, str]]:
    """Yield ``(line_number, text)`` for non-blank lines, without line endings."""
    try:
        handle = path.open("r", encoding="utf-8", newline="")
    except FileNotFoundError:
        raise DatasetError(f"{path}: file not found") from None
    with handle:
        try:
            for number, raw in enumerate(handle, start=1):
                line = raw.rstrip("\r\n")
                if line.strip():
                    yield number, line
        except UnicodeDecodeError as error:
            raise DatasetError(
                f"{path}: not UTF-8 text ({error.reason} at byte {error.start})"
            ) from None


def read_columns(path: Path, columns: int) -> list[tuple[int, tuple[str, ...]]]:
    """Read a tab-separated file with exactly ``columns`` non-empty fields per line.

    Returns:
        ``(line_number, fields)`` for every non-blank line, line numbers 1-based.

    Raises:
        DatasetError: a line with another number of fields, or an empty field, naming file and line.
    """
    rows = []
    for number, line in _lines(path):
        fields = tuple(field.strip() for field in line.split("\t"))
        if len(fields) != columns or not all(fields):
            raise DatasetError(
                f"{path}:{number}: expected {columns} non-empty tab-separated fields, "
                f"got {len(fields)}: {line[:120]!r}"
            )
        rows.append((number, fields))
    return rows


def read_id_list(path: Path) -> list[str]:
    """Read one identifier per line (``entities.txt``, ``relations.txt``); duplicates are an error."""
    seen: dict[str, int] = {}
    for number, line in _lines(path):
        identifier = line.strip()
        if "\t" in identifier:
            raise DatasetError(
                f"{path}:{number}: expected one identifier per line, got {line[:120]!r}"
            )
        if identifier in seen:
            raise DatasetError(
                f"{path}:{number}: duplicate identifier {identifier!r} (first on line {seen[identifier]})"
            )
        seen[identifier] = number
    return list(seen)


def read_id_texts(path: Path) -> dict[str, str]:
    """Read ``id<TAB>text`` lines (``entity2text.txt``); the text may be empty, the id may not."""
    texts: dict[str, str] = {}
    for number, line in _lines(path):
        identifier, tab, text = line.partition("\t")
        if not tab or not identifier.strip():
            raise DatasetError(f"{path}:{number}: expected 'id<TAB>text', got {line[:120]!r}")
        texts[identifier.strip()] = text.strip()
    return texts
