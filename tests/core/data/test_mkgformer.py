"""The MKGformer-layout loader on small hand-written folders, including every bad-input case."""

import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from core.data.check import dataset_statistics, format_statistics
from core.data.files import DatasetError
from core.data.mkgformer import LoadOptions, entity_image_folder, load_mkgformer

ENTITIES = ["/m/0a", "/m/0b", "/m/0c", "/m/0d"]
RELATIONS = ["/r/likes", "/r/knows"]
TRAIN = [
    ("/m/0a", "/r/likes", "/m/0b"),
    ("/m/0b", "/r/knows", "/m/0c"),
    ("/m/0c", "/r/likes", "/m/0d"),
]
DEV = [("/m/0a", "/r/knows", "/m/0c")]
TEST = [("/m/0d", "/r/likes", "/m/0a")]


def _write_lines(path: Path, lines, crlf=True):
    ending = "\r\n" if crlf else "\n"
    path.write_text("".join(line + ending for line in lines), encoding="utf-8", newline="")


def _write_image(path: Path, array: np.ndarray):
    Image.fromarray(array.astype(np.uint8)).save(path)


def make_dataset(root: Path, *, dev=DEV, test=TEST, long_texts=True, images=True) -> Path:
    folder = root / "FB15k-237"
    folder.mkdir(parents=True)
    _write_lines(folder / "train.tsv", ["\t".join(t) for t in TRAIN])
    _write_lines(folder / "dev.tsv", ["\t".join(t) for t in dev])
    _write_lines(folder / "test.tsv", ["\t".join(t) for t in test])
    _write_lines(folder / "entities.txt", ENTITIES)
    _write_lines(folder / "relations.txt", RELATIONS)
    # entity2text also names an entity that is in no triple, as the real FB15k-237 file does.
    _write_lines(folder / "entity2text.txt", [f"{e}\tshort {e[-1]}" for e in [*ENTITIES, "/m/0z"]])
    if long_texts:
        _write_lines(
            folder / "entity2textlong.txt",
            [f"{e}\tlong description of {e[-1]}" for e in ENTITIES[:3]],
        )
    _write_lines(folder / "relation2text.txt", [f"{r}\t{r[3:]}" for r in RELATIONS])
    if images:
        image_root = root / "FB15k-images"
        rng = np.random.default_rng(0)
        for entity in ENTITIES[:3]:  # /m/0d has no image folder at all
            (image_root / entity_image_folder(entity)).mkdir(parents=True)
            _write_image(
                image_root / entity_image_folder(entity) / "0.png", rng.integers(0, 255, (8, 8, 3))
            )
        bad = image_root / "m.0c"
        _write_image(bad / "1.png", np.zeros((8, 8, 3)))  # black
        _write_image(bad / "2.png", np.full((1, 1, 3), 200))  # 1 pixel
        (bad / "3.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")  # unreadable
        (bad / "notes.txt").write_text("not an image")
    return folder


def test_reads_layout_with_crlf_texts_and_images(tmp_path):
    graph = load_mkgformer(make_dataset(tmp_path))
    assert graph.name == "FB15k-237"
    assert graph.entities == tuple(ENTITIES)
    assert graph.relations == tuple(RELATIONS)
    assert (len(graph.train), len(graph.valid), len(graph.test)) == (3, 1, 1)
    assert graph.train[0].tolist() == [0, 0, 1]
    # Long descriptions win; an entity missing from the long file falls back to its short name.
    assert graph.entity_texts[0] == "long description of a"
    assert graph.entity_texts[3] == "short d"
    assert graph.relation_texts == ("likes", "knows")
    assert [len(images) for images in graph.entity_images] == [1, 1, 1, 0]
    assert graph.report["skipped_images"] == {"unreadable": 1, "black": 1, "tiny": 1}
    assert graph.report["entities_without_image_folder"] == 1
    assert graph.report["text_file"] == "entity2textlong.txt"
    assert len(graph.candidates) == 4


def test_short_texts_used_without_long_file(tmp_path):
    graph = load_mkgformer(make_dataset(tmp_path, long_texts=False))
    assert graph.entity_texts[0] == "short a"
    assert graph.report["text_file"] == "entity2text.txt"


def test_candidate_set_of_the_official_vocabulary(tmp_path):
    graph = load_mkgformer(make_dataset(tmp_path), LoadOptions(candidates="entity2text"))
    assert graph.entities[-1] == "/m/0z"
    assert len(graph.candidates) == 5
    assert graph.report["entities_only_in_entity2text"] == 1


def test_no_image_folder_means_no_images(tmp_path):
    graph = load_mkgformer(make_dataset(tmp_path, images=False))
    assert all(images == () for images in graph.entity_images)
    assert graph.report["entities_without_image_folder"] == 4


def test_image_verdicts_are_cached_between_loads(tmp_path, cache_dir, monkeypatch):
    folder = make_dataset(tmp_path)
    first = load_mkgformer(folder, LoadOptions(cache_dir=str(cache_dir)))
    import core.data.images as images

    def fail(path):
        raise AssertionError(f"{path} decoded again")

    monkeypatch.setattr(images, "check_image", fail)
    second = load_mkgformer(folder, LoadOptions(cache_dir=str(cache_dir)))
    assert second.entity_images == first.entity_images
    assert second.report["skipped_images"] == first.report["skipped_images"]


def test_malformed_line_names_file_and_line(tmp_path):
    folder = make_dataset(tmp_path)
    _write_lines(folder / "train.tsv", ["\t".join(TRAIN[0]), "", "/m/0a\t/r/likes"])
    with pytest.raises(
        DatasetError, match=r"train\.tsv:3: expected 3 non-empty tab-separated fields"
    ):
        load_mkgformer(folder)


def test_unknown_entity_in_test_is_an_error_naming_the_line(tmp_path):
    folder = make_dataset(tmp_path, test=[*TEST, ("/m/0a", "/r/likes", "/m/0q")])
    with pytest.raises(DatasetError, match=r"test\.tsv:2: unknown entity '/m/0q'.*drop_unknown"):
        load_mkgformer(folder)


def test_unknown_relation_in_dev_is_an_error(tmp_path):
    folder = make_dataset(tmp_path, dev=[("/m/0a", "/r/hates", "/m/0b")])
    with pytest.raises(DatasetError, match=r"dev\.tsv:1: unknown relation '/r/hates'"):
        load_mkgformer(folder)


def test_drop_unknown_drops_and_counts(tmp_path):
    folder = make_dataset(
        tmp_path, test=[*TEST, ("/m/0a", "/r/likes", "/m/0q"), ("/m/0q", "/r/x", "/m/0a")]
    )
    graph = load_mkgformer(folder, LoadOptions(drop_unknown=True))
    assert len(graph.test) == 1
    assert graph.report["dropped_unknown"] == {"train": 0, "valid": 0, "test": 2}


def test_unknown_entity_in_train_is_an_error_even_with_drop_unknown(tmp_path):
    folder = make_dataset(tmp_path)
    _write_lines(folder / "train.tsv", ["/m/0a\t/r/likes\t/m/0q"])
    with pytest.raises(DatasetError, match=r"train\.tsv:1: unknown entity '/m/0q'"):
        load_mkgformer(folder, LoadOptions(drop_unknown=True))


def test_empty_split_is_an_error(tmp_path):
    folder = make_dataset(tmp_path)
    _write_lines(folder / "dev.tsv", [])
    with pytest.raises(DatasetError, match=r"dev\.tsv: the split is empty"):
        load_mkgformer(folder)


def test_split_emptied_by_dropping_is_an_error(tmp_path):
    folder = make_dataset(tmp_path, dev=[("/m/0a", "/r/likes", "/m/0q")])
    with pytest.raises(
        DatasetError, match=r"dev\.tsv: the split is empty \(1 dropped as unknown\)"
    ):
        load_mkgformer(folder, LoadOptions(drop_unknown=True))


def test_missing_files_are_named(tmp_path):
    folder = make_dataset(tmp_path)
    (folder / "entities.txt").unlink()
    with pytest.raises(DatasetError, match=r"entities\.txt: file not found"):
        load_mkgformer(folder)
    folder = make_dataset(tmp_path / "second")
    (folder / "dev.tsv").unlink()
    with pytest.raises(DatasetError, match="no valid split; expected one of dev.tsv, valid.tsv"):
        load_mkgformer(folder)


def test_duplicate_entity_line_is_named(tmp_path):
    folder = make_dataset(tmp_path)
    _write_lines(folder / "entities.txt", [*ENTITIES, "/m/0b"])
    with pytest.raises(
        DatasetError, match=r"entities\.txt:5: duplicate identifier '/m/0b' \(first on line 2\)"
    ):
        load_mkgformer(folder)


def test_bad_options_are_rejected(tmp_path):
    with pytest.raises(DatasetError, match="choose one of entities, entity2text"):
        LoadOptions(candidates="vocab")
    with pytest.raises(DatasetError, match="is not a folder"):
        load_mkgformer(make_dataset(tmp_path), LoadOptions(image_root=str(tmp_path / "nope")))
    with pytest.raises(DatasetError, match="dataset folder not found"):
        load_mkgformer(tmp_path / "missing")


@pytest.mark.parametrize(
    ("entity", "folder"),
    [("/m/0abc", "m.0abc"), ("01234567", "n01234567"), ("n01234567", "n01234567")],
)
def test_entity_image_folder(entity, folder):
    assert entity_image_folder(entity) == folder


@pytest.mark.parametrize("file", ["entities.txt", "relations.txt", "train.tsv", "entity2text.txt"])
def test_leading_bom_does_not_hide_the_first_line(tmp_path, file):
    folder = make_dataset(tmp_path)
    path = folder / file
    path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes())
    graph = load_mkgformer(folder, LoadOptions(candidates="entity2text"))
    assert graph.entities[0] == "/m/0a" and graph.relations[0] == "/r/likes"
    assert graph.train[0].tolist() == [0, 0, 1]
    assert len(graph.entities) == 5  # entity2text's ids are read without the mark, no extra entity


def _as_directory(path: Path) -> None:
    path.unlink()
    path.mkdir()


def _as_symlink_loop(path: Path) -> None:
    path.unlink()
    os.symlink(path.name, path)


# The optional text files used to be skipped silently when they were not regular files.
@pytest.mark.parametrize(
    "file",
    [
        "entities.txt",
        "train.tsv",
        "dev.tsv",
        "entity2text.txt",
        "entity2textlong.txt",
        "relation2text.txt",
    ],
)
@pytest.mark.parametrize(
    ("make", "expected"),
    [(_as_directory, "is a directory, expected a file"), (_as_symlink_loop, "symlink loop")],
    ids=["directory", "symlink-loop"],
)
def test_no_file_where_a_file_belongs_is_named(tmp_path, file, make, expected):
    folder = make_dataset(tmp_path, images=False)
    make(folder / file)
    with pytest.raises(DatasetError, match=re.escape(f"{folder / file}: {expected}")):
        load_mkgformer(folder)


def test_image_folder_symlink_loop_skips_that_entity_with_a_warning(tmp_path):
    folder = make_dataset(tmp_path)
    image_root = tmp_path / "FB15k-images"
    shutil.rmtree(image_root / "m.0b")
    os.symlink("m.0b", image_root / "m.0b")
    os.symlink("loop.png", image_root / "m.0a" / "loop.png")
    with pytest.warns(UserWarning, match=r"1 entities whose image folder cannot be read.*m\.0b"):
        graph = load_mkgformer(folder, LoadOptions(check_images=False))
    assert [len(images) for images in graph.entity_images] == [1, 0, 4, 0]
    assert graph.report["unreadable_image_folders"] == 1
    assert graph.report["skipped_images"]["unreadable"] == 1  # the looping loop.png
    assert "1 entities whose image folder cannot be read" in format_statistics(
        dataset_statistics(graph)
    )


def test_image_root_symlink_loop_is_an_error(tmp_path):
    folder = make_dataset(tmp_path)
    shutil.rmtree(tmp_path / "FB15k-images")
    os.symlink("FB15k-images", tmp_path / "FB15k-images")
    with pytest.raises(DatasetError, match=r"FB15k-images: symlink loop"):
        load_mkgformer(folder)
    with pytest.raises(DatasetError, match=r"image_root .* is not a folder: symlink loop"):
        load_mkgformer(folder, LoadOptions(image_root=str(tmp_path / "FB15k-images")))


def test_unknown_value_is_cut_in_the_message(tmp_path):
    folder = make_dataset(tmp_path, images=False)
    huge = "/m/" + "x" * 5_000_000
    _write_lines(folder / "train.tsv", [f"/m/0a\t/r/likes\t{huge}"])
    with pytest.raises(DatasetError) as error:
        load_mkgformer(folder)
    message = str(error.value)
    assert "train.tsv:1: unknown entity '/m/xxx" in message
    assert "(5,000,003 characters)" in message and len(message) < 400


@pytest.mark.parametrize("drop_unknown", [False, True])
def test_unknown_id_in_train_does_not_advise_drop_unknown(tmp_path, drop_unknown):
    folder = make_dataset(tmp_path, images=False)
    _write_lines(folder / "train.tsv", ["/m/0a\t/r/hates\t/m/0b"])
    with pytest.raises(DatasetError) as error:
        load_mkgformer(folder, LoadOptions(drop_unknown=drop_unknown))
    message = str(error.value)
    assert "unknown relation '/r/hates' (not in relations.txt)" in message
    assert "load with drop_unknown" not in message
    assert "does not apply here" in message


def test_duplicate_id_in_entity2text_names_both_lines(tmp_path):
    folder = make_dataset(tmp_path, images=False)
    _write_lines(folder / "entity2text.txt", ["/m/0a\tone", "/m/0b\ttwo", "/m/0a\tthree"])
    with pytest.raises(
        DatasetError, match=r"entity2text\.txt:3: duplicate id '/m/0a' \(first on line 1\)"
    ):
        load_mkgformer(folder)


@pytest.mark.parametrize("folder", ["", "   "])
def test_empty_folder_name_is_an_error(folder):
    with pytest.raises(DatasetError, match="dataset folder is empty"):
        load_mkgformer(folder)
