"""Reading the line-oriented text files every dataset format uses, with errors that point at a line.

All readers share one notion of a line, and raise :class:`DatasetError` naming the file and the
1-based line number of bad input:

* A line ends with ``\\n`` or ``\\r\\n`` (the MKGformer FB15k-237 files use ``\\r\\n``). A carriage
  return anywhere else is an error: counting it as a line end would shift every later line number,
  and ignoring it would glue two records together.
* Files are UTF-8. A byte-order mark at the start of a file (Windows editors write one) is removed,
  so the first identifier reads as written; invalid UTF-8 is reported with its line and column.
* Blank lines are skipped but still counted.

Values quoted in messages are cut to :data:`QUOTE_LIMIT` characters, so a corrupt file with a
megabyte-long line still gives a one-line error.
"""

from __future__ import annotations

import errno
import stat
from collections.abc import Iterator
from pathlib import Path

__all__ = [
    "QUOTE_LIMIT",
    "DatasetError",
    "path_problem",
    "quote",
    "read_columns",
    "read_id_list",
    "read_id_texts",
]

QUOTE_LIMIT = 80
"""Characters of a value shown in an error message before it is cut."""

_UTF8_BOM = b"\xef\xbb\xbf"
_UTF16_BOMS = (b"\xff\xfe", b"\xfe\xff")


class DatasetError(ValueError):
    """Bad dataset input; the message names the file (and line) and what was expected."""


def quote(value: str, limit: int = QUOTE_LIMIT) -> str:
    """``repr`` of ``value`` for a message, cut after ``limit`` characters with its length noted."""
    if len(value) <= limit:
        return repr(value)
    return f"{value[:limit]!r}… ({len(value):,} characters)"


def path_problem(path: Path, folder: bool = False) -> str | None:
    """Why ``path`` cannot be read as a regular file (or, with ``folder``, a folder); ``None`` if it can.

    Symlinks are followed; a dangling link and a link loop are named as such, since both look like
    "not found" to most tools.
    """
    kind = "folder" if folder else "file"
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        if path.is_symlink():
            return f"broken symlink (its target does not exist), expected a {kind}"
        return f"{kind} not found"
    except OSError as error:
        if error.errno == errno.ELOOP:
            return f"symlink loop (the link leads back to itself), expected a {kind}"
        return f"cannot be read ({error.strerror or error})"
    if folder:
        return None if stat.S_ISDIR(mode) else "is a file, expected a folder"
    if stat.S_ISDIR(mode):
        return "is a directory, expected a file"
    if not stat.S_ISREG(mode):
        return "is not a regular file"
    return None


def _decode(path: Path, number: int, raw: bytes) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as error:
        if number == 1 and raw.startswith(_UTF16_BOMS):
            raise DatasetError(
                f"{path}:1: UTF-16 text; expected UTF-8 (save it as UTF-8)"
            ) from None
        # The prefix before the bad byte is valid UTF-8, so its length is the character column.
        column = len(raw[: error.start].decode("utf-8")) + 1
        raise DatasetError(
            f"{path}:{number}: not UTF-8 text: byte 0x{raw[error.start]:02x} at column {column} "
            f"({error.reason}); expected UTF-8"
        ) from None


def _lines(path: Path) -> Iterator[tuple[int, str]]:
    """Yield ``(line_number, text)`` for non-blank lines, without line endings (see module doc)."""
    problem = path_problem(path)
    if problem:
        raise DatasetError(f"{path}: {problem}")
    try:
        handle = path.open("rb")
    except OSError as error:
        raise DatasetError(f"{path}: cannot be read ({error.strerror or error})") from None
    with handle:
        # Binary lines split on b"\n" only, so a stray b"\r" cannot silently start a new line.
        for number, raw in enumerate(handle, start=1):
            if number == 1 and raw.startswith(_UTF8_BOM):
                raw = raw[len(_UTF8_BOM) :]
            if raw.endswith(b"\r\n"):
                raw = raw[:-2]
            elif raw.endswith(b"\n"):
                raw = raw[:-1]
            line = _decode(path, number, raw)
            carriage_return = line.find("\r")
            if carriage_return >= 0:
                raise DatasetError(
                    f"{path}:{number}: carriage return (\\r) not followed by a line feed at column "
                    f"{carriage_return + 1}; expected lines ending in \\n or \\r\\n"
                )
            if line.strip():
                yield number, line


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
                f"got {len(fields)}: {quote(line)}"
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
                f"{path}:{number}: expected one identifier per line, got {quote(line)}"
            )
        if identifier in seen:
            raise DatasetError(
                f"{path}:{number}: duplicate identifier {quote(identifier)} "
                f"(first on line {seen[identifier]})"
            )
        seen[identifier] = number
    return list(seen)


def read_id_texts(path: Path) -> dict[str, str]:
    """Read ``id<TAB>text`` lines (``entity2text.txt``); the text may be empty, the id may not.

    A repeated id is an error naming both lines: which of two texts is meant cannot be guessed.
    """
    texts: dict[str, str] = {}
    first_line: dict[str, int] = {}
    for number, line in _lines(path):
        identifier, tab, text = line.partition("\t")
        identifier = identifier.strip()
        if not tab or not identifier:
            raise DatasetError(f"{path}:{number}: expected 'id<TAB>text', got {quote(line)}")
        if identifier in first_line:
            raise DatasetError(
                f"{path}:{number}: duplicate id {quote(identifier)} (first on line "
                f"{first_line[identifier]}); expected one line per id"
            )
        first_line[identifier] = number
        texts[identifier] = text.strip()
    return texts
