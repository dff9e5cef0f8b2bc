"""The shared line readers of :mod:`core.data.files`: line ends, encodings and bad paths."""

import os
import re
from pathlib import Path

import pytest

from core.data.files import DatasetError, quote, read_columns, read_id_list, read_id_texts

# Each reader with two well-formed lines and a line it must reject.
READERS = {
    "columns": (lambda path: read_columns(path, 2), "a\tb", "c\td", "x"),
    "id_list": (read_id_list, "a", "c", "x\ty"),
    "id_texts": (read_id_texts, "a\tb", "c\td", "x"),
}


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


@pytest.fixture(params=sorted(READERS))
def reader(request):
    """``(read, first_line, second_line, bad_line)`` for each reader."""
    return READERS[request.param]


def test_crlf_and_lf_are_line_ends_and_blank_lines_are_counted(tmp_path, reader):
    read, first, second, bad = reader
    # Line 3 is blank; the bad line is the 4th whichever line end precedes it.
    path = _write(tmp_path / "f.txt", f"{first}\r\n{second}\n\r\n{bad}\r\n".encode())
    with pytest.raises(DatasetError, match=re.escape(f"{path}:4:")):
        read(path)


@pytest.mark.parametrize(
    "body",
    [b"LINE1\nLINE2-with\rinside\n", b"LINE1\r\nLINE2\r\r\n", b"LINE1\nLINE2\rrest"],
    ids=["inside-a-line", "cr-cr-lf", "cr-only-line-end"],
)
def test_lone_carriage_return_is_an_error_naming_the_line(tmp_path, reader, body):
    read, first, second, _ = reader
    body = body.replace(b"LINE1", first.encode()).replace(b"LINE2", second.encode())
    path = _write(tmp_path / "f.txt", body)
    with pytest.raises(DatasetError, match=re.escape(f"{path}:2: carriage return (\\r) not")):
        read(path)


def test_invalid_utf8_names_line_and_column(tmp_path, reader):
    read, first, _, _ = reader
    # "é" before the bad byte: the column counts characters, not bytes.
    path = _write(tmp_path / "f.txt", f"{first}\n".encode() + "é".encode() + b"\xff" + b"\n")
    with pytest.raises(
        DatasetError, match=re.escape(f"{path}:2: not UTF-8 text: byte 0xff at column 2")
    ):
        read(path)


def test_utf16_file_is_named_as_such(tmp_path, reader):
    read, first, second, _ = reader
    path = _write(tmp_path / "f.txt", f"{first}\n{second}\n".encode("utf-16"))
    with pytest.raises(DatasetError, match=re.escape(f"{path}:1: UTF-16 text; expected UTF-8")):
        read(path)


@pytest.mark.parametrize("ending", ["\n", "\r\n"])
def test_leading_bom_is_removed(tmp_path, ending):
    path = _write(tmp_path / "f.txt", ("\ufeffa\tb" + ending + "c\td" + ending).encode())
    assert read_columns(path, 2)[0] == (1, ("a", "b"))
    assert read_id_texts(path) == {"a": "b", "c": "d"}
    path = _write(tmp_path / "ids.txt", ("\ufeff/m/0a" + ending).encode())
    assert read_id_list(path) == ["/m/0a"]


def test_bom_after_the_start_is_kept(tmp_path):
    # Only the file's first bytes can be a byte-order mark; elsewhere U+FEFF is content.
    path = _write(tmp_path / "f.txt", "a\n\ufeffb\n".encode())
    assert read_id_list(path) == ["a", "\ufeffb"]


def _directory(path: Path) -> None:
    path.mkdir()


def _loop(path: Path) -> None:
    os.symlink(path.name, path)


def _dangling(path: Path) -> None:
    os.symlink(path.name + ".missing", path)


@pytest.mark.parametrize(
    ("make", "expected"),
    [
        (_directory, "is a directory, expected a file"),
        (_loop, "symlink loop"),
        (_dangling, "broken symlink"),
        (lambda path: None, "file not found"),
    ],
    ids=["directory", "symlink-loop", "dangling-symlink", "missing"],
)
def test_a_path_that_is_no_file_is_named(tmp_path, reader, make, expected):
    read = reader[0]
    path = tmp_path / "f.txt"
    make(path)
    with pytest.raises(DatasetError, match=re.escape(f"{path}: {expected}")):
        read(path)


def test_long_values_are_cut_in_messages(tmp_path):
    huge = "x" * 1_000_000
    path = _write(tmp_path / "f.txt", f"a\tb\n{huge}\n".encode())
    for read in (lambda p: read_columns(p, 2), read_id_texts):
        with pytest.raises(DatasetError) as error:
            read(path)
        assert len(str(error.value)) < 300
        assert "(1,000,000 characters)" in str(error.value)
    assert quote("short") == "'short'"


def test_duplicate_id_in_a_text_file_names_both_lines(tmp_path):
    path = _write(tmp_path / "entity2text.txt", b"/m/0a\tfirst\n/m/0b\tb\n\n/m/0a\tsecond\n")
    with pytest.raises(
        DatasetError, match=re.escape(f"{path}:4: duplicate id '/m/0a' (first on line 1)")
    ):
        read_id_texts(path)
