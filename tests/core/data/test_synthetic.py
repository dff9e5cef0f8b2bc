"""Tests of the synthetic multimodal KG generator (:mod:`core.data.synthetic`)."""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from core.data import synthetic
from core.data.files import DatasetError
from core.data.synthetic import (
    FORMAT_VERSION,
    SyntheticSpec,
    generate_synthetic,
    synthetic_entity_folder,
)

SPLIT_FILES = ("train.tsv", "dev.tsv", "test.tsv")
TEXT_FILES = ("entities.txt", "relations.txt", "entity2text.txt", "entity2textlong.txt")


def _tiny(**overrides: object) -> SyntheticSpec:
    """A spec smaller than the ``small`` preset, for tests that only need the layout."""
    fields = {
        "num_entities": 60,
        "num_relations": 5,
        "num_train": 400,
        "num_valid": 40,
        "num_test": 40,
        "images_per_entity": 2,
        "image_size": 16,
        "num_types": 3,
        "num_styles": 3,
        "name": "synthetic-tiny",
    }
    return SyntheticSpec(**{**fields, **overrides})


def _rows(path: Path) -> list[list[str]]:
    return [line.split("\t") for line in path.read_text(encoding="utf-8").splitlines()]


def _all_files(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The ``small`` preset written once for the read-only layout checks."""
    return generate_synthetic(
        SyntheticSpec.preset("small"), tmp_path_factory.mktemp("small"), progress=False
    )


def test_layout_files_and_line_ends(small: Path) -> None:
    for name in (*SPLIT_FILES, *TEXT_FILES, "relation2text.txt", "synthetic.json"):
        assert (small / name).is_file(), name
    for name in SPLIT_FILES:
        data = (small / name).read_bytes()
        assert data.endswith(b"\r\n")
        assert data.count(b"\r\n") == data.count(b"\n"), f"{name} has a bare LF"
    for name in (*TEXT_FILES, "relation2text.txt"):
        assert b"\r" not in (small / name).read_bytes(), name
    assert not list(small.glob("*.tmp"))


def test_counts_match_spec(small: Path) -> None:
    spec = SyntheticSpec.preset("small")
    counts = {name: len(_rows(small / name)) for name in SPLIT_FILES}
    assert counts == {"train.tsv": 3000, "dev.tsv": 300, "test.tsv": 300}
    entities = (small / "entities.txt").read_text().splitlines()
    relations = (small / "relations.txt").read_text().splitlines()
    assert len(entities) == len(set(entities)) == spec.num_entities
    assert len(relations) == len(set(relations)) == spec.num_relations
    assert all(re.fullmatch(r"/m/0s[0-9a-z]{4}", e) for e in entities)
    assert entities[0] == "/m/0s0001"
    assert all(re.fullmatch(r"/synthetic/r\d{3}/link", r) for r in relations)
    for name, ids in (
        ("entity2text.txt", entities),
        ("entity2textlong.txt", entities),
        ("relation2text.txt", relations),
    ):
        rows = _rows(small / name)
        assert [row[0] for row in rows] == ids
        assert all(len(row) == 2 and row[1].strip() for row in rows)
    names = [row[1] for row in _rows(small / "entity2text.txt")]
    assert all(re.fullmatch(r"[A-Z][a-z]+", n) for n in names)
    assert len(set(names)) == len(names)

    meta = json.loads((small / "synthetic.json").read_text())
    assert meta["format_version"] == FORMAT_VERSION
    assert meta["seed"] == spec.seed
    assert SyntheticSpec(**meta["spec"]) == spec
    assert meta["counts"]["train"] == 3000
    assert meta["counts"]["entities"] == 200
    assert meta["counts"]["images"] == 400
    assert meta["counts"]["entities_in_train"] == 200


def test_splits_are_well_formed(small: Path) -> None:
    splits = {name: [tuple(row) for row in _rows(small / name)] for name in SPLIT_FILES}
    entities = set((small / "entities.txt").read_text().splitlines())
    relations = set((small / "relations.txt").read_text().splitlines())
    everything = [triple for rows in splits.values() for triple in rows]
    assert len(everything) == len(set(everything)), "duplicate triple within or across splits"
    assert all(h != t for h, _, t in everything)
    train = splits["train.tsv"]
    train_entities = {h for h, _, _ in train} | {t for _, _, t in train}
    train_relations = {r for _, r, _ in train}
    assert train_entities == entities
    assert train_relations == relations
    for name in ("dev.tsv", "test.tsv"):
        for h, r, t in splits[name]:
            assert h in train_entities and t in train_entities and r in train_relations


def test_degrees_are_skewed(small: Path) -> None:
    degree = Counter()
    for h, _, t in _rows(small / "train.tsv"):
        degree.update([h, t])
    values = np.array(sorted(degree.values()))
    assert values.max() > 3 * np.median(values)


def test_images_open_with_the_right_size(small: Path) -> None:
    entities = (small / "entities.txt").read_text().splitlines()
    folders = sorted(p.name for p in (small / "images").iterdir())
    assert folders == sorted(synthetic_entity_folder(e) for e in entities)
    arrays = []
    for folder in folders:
        files = sorted(p.name for p in (small / "images" / folder).iterdir())
        assert files == ["0.png", "1.png"]
        for name in files:
            with Image.open(small / "images" / folder / name) as image:
                assert image.format == "PNG"
                assert image.size == (32, 32)
                assert image.mode == "RGB"
                arrays.append(np.asarray(image))
    stacked = np.stack(arrays)
    assert stacked.reshape(len(arrays), -1).max(axis=1).min() > 0, "an unrequested black image"
    assert len({a.tobytes() for a in arrays}) == len(arrays), "identical images"


def test_same_seed_same_bytes_other_seed_differs(tmp_path: Path) -> None:
    spec = _tiny(seed=7, corrupt_image_fraction=0.05)
    first = _all_files(generate_synthetic(spec, tmp_path / "a", progress=False))
    second = _all_files(generate_synthetic(spec, tmp_path / "b", progress=False))
    assert first == second
    other = _all_files(generate_synthetic(_tiny(seed=8), tmp_path / "c", progress=False))
    for name in (*SPLIT_FILES, "entity2textlong.txt", "images/m.0s0001/0.png"):
        assert first[name] != other[name], name


def test_triples_do_not_depend_on_image_settings(tmp_path: Path) -> None:
    with_images = generate_synthetic(_tiny(), tmp_path / "a", progress=False)
    without = generate_synthetic(_tiny(images_per_entity=0), tmp_path / "b", progress=False)
    for name in (*SPLIT_FILES, *TEXT_FILES):
        assert (with_images / name).read_bytes() == (without / name).read_bytes()
    assert not any((without / "images").iterdir())
    assert json.loads((without / "synthetic.json").read_text())["counts"]["images"] == 0


def test_image_coverage_and_size(tmp_path: Path) -> None:
    out = generate_synthetic(
        _tiny(image_coverage=0.25, images_per_entity=3, image_size=8), tmp_path, progress=False
    )
    folders = list((out / "images").iterdir())
    assert len(folders) == 15
    for folder in folders:
        assert len(list(folder.iterdir())) == 3
        with Image.open(folder / "2.png") as image:
            assert image.size == (8, 8)


def _image_problem(path: Path) -> str | None:
    """What a careful loader would say about an image file: None when it is usable."""
    try:
        with Image.open(path) as image:
            image.load()
            array = np.asarray(image)
    except (OSError, SyntaxError, ValueError):
        return "truncated"
    if array.shape[:2] == (1, 1):
        return "one_pixel"
    if not array.any():
        return "black"
    return None


def test_corrupt_images_when_requested(tmp_path: Path) -> None:
    out = generate_synthetic(_tiny(corrupt_image_fraction=0.1), tmp_path, progress=False)
    meta = json.loads((out / "synthetic.json").read_text())
    listed = meta["corrupt_images"]
    assert sum(len(paths) for paths in listed.values()) == 12  # 10 % of 120 images
    assert all(len(paths) == 4 for paths in listed.values())
    found = defaultdict(list)
    for path in sorted((out / "images").rglob("*.png")):
        problem = _image_problem(path)
        if problem:
            found[problem].append(str(path.relative_to(out)))
    assert dict(found) == {kind: sorted(paths) for kind, paths in listed.items()}
    assert meta["counts"]["corrupt_truncated"] == 4


def test_no_corrupt_images_by_default(tmp_path: Path) -> None:
    out = generate_synthetic(_tiny(), tmp_path, progress=False)
    meta = json.loads((out / "synthetic.json").read_text())
    assert all(not paths for paths in meta["corrupt_images"].values())
    assert all(_image_problem(p) is None for p in (out / "images").rglob("*.png"))


def test_one_corrupt_image_at_least_when_fraction_is_positive(tmp_path: Path) -> None:
    out = generate_synthetic(_tiny(corrupt_image_fraction=1e-6), tmp_path, progress=False)
    meta = json.loads((out / "synthetic.json").read_text())
    assert meta["corrupt_images"]["black"] and not meta["corrupt_images"]["truncated"]


@pytest.mark.parametrize(
    ("overrides", "error", "message"),
    [
        ({"num_entities": 5}, ValueError, "num_types \\* num_styles"),
        ({"num_train": 50}, ValueError, "num_train"),
        ({"num_valid": 0}, ValueError, "num_valid must be >= 1"),
        ({"images_per_entity": -1}, ValueError, "images_per_entity"),
        ({"image_size": 1}, ValueError, "image_size"),
        ({"image_size": 4096}, ValueError, "image_size"),
        ({"text_informativeness": 1.5}, ValueError, "text_informativeness must be in"),
        ({"image_informativeness": -0.1}, ValueError, "image_informativeness"),
        ({"image_coverage": 2.0}, ValueError, "image_coverage"),
        ({"corrupt_image_fraction": -1.0}, ValueError, "corrupt_image_fraction"),
        ({"graph_noise": 1.1}, ValueError, "graph_noise"),
        ({"seed": -1}, ValueError, "seed"),
        ({"num_entities": 60.0}, TypeError, "num_entities must be an int"),
        ({"num_relations": True}, TypeError, "num_relations must be an int"),
        ({"text_informativeness": "high"}, TypeError, "must be a number"),
        ({"name": ""}, ValueError, "name"),
        (
            {"num_train": 5000, "num_entities": 20, "num_types": 2, "num_styles": 2},
            ValueError,
            "distinct triples",
        ),
    ],
)
def test_spec_validation(overrides: dict, error: type[Exception], message: str) -> None:
    with pytest.raises(error, match=message):
        _tiny(**overrides)


def test_spec_is_frozen_and_presets() -> None:
    spec = SyntheticSpec.preset("small")
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.seed = 1  # type: ignore[misc]
    assert SyntheticSpec.preset("small", seed=3).seed == 3
    fb = SyntheticSpec.preset("fb15k-237-img")
    assert (fb.num_entities, fb.num_relations) == (14541, 237)
    assert (fb.num_train, fb.num_valid, fb.num_test) == (272115, 17535, 20466)
    wn = SyntheticSpec.preset("wn18-img")
    assert (wn.num_entities, wn.num_relations) == (40943, 18)
    assert (wn.num_train, wn.num_valid, wn.num_test) == (141442, 5000, 5000)
    assert round(wn.image_coverage * wn.num_entities) == 7801
    with pytest.raises(ValueError, match="expected one of"):
        SyntheticSpec.preset("fb15k")
    with pytest.raises(ValueError, match="unknown SyntheticSpec field"):
        SyntheticSpec.preset("small", num_entites=10)


def test_entity_folder_names() -> None:
    assert synthetic_entity_folder("/m/0s0001") == "m.0s0001"
    assert synthetic_entity_folder("/m/0abc") == "m.0abc"
    for bad in ("m.0s0001", "/m/", "/m/a/b", "n01234567"):
        with pytest.raises(ValueError, match="Freebase-style"):
            synthetic_entity_folder(bad)


def test_refuses_non_empty_folder(tmp_path: Path) -> None:
    out = generate_synthetic(_tiny(), tmp_path / "data", progress=False)
    before = (out / "train.tsv").read_bytes()
    with pytest.raises(FileExistsError, match="not empty"):
        generate_synthetic(_tiny(seed=1), out, progress=False)
    assert (out / "train.tsv").read_bytes() == before
    generate_synthetic(_tiny(seed=1, image_coverage=0.5), out, overwrite=True, progress=False)
    assert (out / "train.tsv").read_bytes() != before
    assert len(list((out / "images").iterdir())) == 30, "stale image folders were kept"
    (out / "notes.md").write_text("mine")
    with pytest.raises(FileExistsError, match="did not write"):
        generate_synthetic(_tiny(), out, overwrite=True, progress=False)
    assert (out / "notes.md").read_text() == "mine"
    (tmp_path / "file").write_text("x")
    with pytest.raises(FileExistsError, match="not a folder"):
        generate_synthetic(_tiny(), tmp_path / "file", progress=False)


def test_interrupted_generation_is_detectable(tmp_path: Path, monkeypatch) -> None:
    def fail(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt

    out = generate_synthetic(_tiny(), tmp_path, progress=False)
    monkeypatch.setattr(synthetic, "_write_images", fail)
    with pytest.raises(KeyboardInterrupt):
        generate_synthetic(_tiny(seed=2), out, overwrite=True, progress=False)
    assert (out / "train.tsv").exists()
    assert not (out / "synthetic.json").exists()
    monkeypatch.undo()
    # The in-progress marker keeps the half-written folder the generator's own, so it can be redone.
    generate_synthetic(_tiny(seed=2), out, overwrite=True, progress=False)
    assert (out / "synthetic.json").exists()
    assert not (out / "synthetic.partial.json").exists()


@pytest.mark.parametrize(
    "marker",
    [None, '{"generator": "someone else"}', "not json", '["core.data.synthetic"]'],
    ids=["no-marker", "other-generator", "not-json", "not-an-object"],
)
def test_overwrite_refuses_a_folder_the_generator_did_not_write(tmp_path: Path, marker) -> None:
    out = tmp_path / "data"
    out.mkdir()
    (out / "train.tsv").write_text("a real split\n")
    if marker is not None:
        (out / "synthetic.json").write_text(marker)
    with pytest.raises(DatasetError, match=r"data was not written by `diffcom data synth`"):
        generate_synthetic(_tiny(), out, overwrite=True, progress=False)
    assert (out / "train.tsv").read_text() == "a real split\n"


def test_overwrite_removes_an_images_link_not_its_target(tmp_path: Path) -> None:
    out = generate_synthetic(_tiny(images_per_entity=0), tmp_path / "data", progress=False)
    elsewhere = tmp_path / "real-images" / "m.0a"
    elsewhere.mkdir(parents=True)
    (elsewhere / "0.png").write_bytes(b"keep me")
    (out / "images").rmdir()
    os.symlink(tmp_path / "real-images", out / "images")
    generate_synthetic(_tiny(), out, overwrite=True, progress=False)
    assert (elsewhere / "0.png").read_bytes() == b"keep me"
    assert not (out / "images").is_symlink()


# --------------------------------------------------------------------------------------------------
# The latent structure: each modality carries signal through the graph.
# --------------------------------------------------------------------------------------------------


def _text_feature(out: Path) -> dict[str, str]:
    """The word each long description names (a type word or a distractor)."""
    return {
        entity: re.search(r" is an? (\w+)\.", text).group(1)
        for entity, text in _rows(out / "entity2textlong.txt")
    }


def _image_feature(out: Path) -> dict[str, int]:
    """Nearest style colour of each entity's first image."""
    palette = np.array(
        json.loads((out / "synthetic.json").read_text())["vocabulary"]["style_colours"]
    )
    feature = {}
    for entity in (out / "entities.txt").read_text().splitlines():
        with Image.open(out / "images" / synthetic_entity_folder(entity) / "0.png") as image:
            mean = np.asarray(image, dtype=np.float64).reshape(-1, 3).mean(axis=0)
        feature[entity] = int(((palette - mean) ** 2).sum(axis=1).argmin())
    return feature


def _held_out_accuracy(out: Path, feature: dict) -> tuple[float, float]:
    """Accuracy of predicting the tail's feature from (head feature, relation), fitted on train.

    Returns:
        ``(accuracy, baseline)`` on dev + test; the baseline always guesses the most frequent
        tail feature of train.
    """
    table: dict[tuple, Counter] = defaultdict(Counter)
    overall = Counter()
    for h, r, t in _rows(out / "train.tsv"):
        table[(feature[h], r)][feature[t]] += 1
        overall[feature[t]] += 1
    fallback = overall.most_common(1)[0][0]
    held_out = _rows(out / "dev.tsv") + _rows(out / "test.tsv")
    hits = baseline = 0
    for h, r, t in held_out:
        votes = table.get((feature[h], r))
        guess = votes.most_common(1)[0][0] if votes else fallback
        hits += guess == feature[t]
        baseline += fallback == feature[t]
    return hits / len(held_out), baseline / len(held_out)


@pytest.mark.parametrize("seed", [0, 1])
def test_text_and_images_reveal_the_latent_structure(tmp_path: Path, seed: int) -> None:
    out = generate_synthetic(SyntheticSpec.preset("small", seed=seed), tmp_path, progress=False)
    accuracy, baseline = _held_out_accuracy(out, _text_feature(out))
    assert accuracy > baseline + 0.35, (accuracy, baseline)
    accuracy, baseline = _held_out_accuracy(out, _image_feature(out))
    assert accuracy > baseline + 0.2, (accuracy, baseline)


def test_uninformative_modalities_carry_no_signal(tmp_path: Path) -> None:
    spec = SyntheticSpec.preset("small", text_informativeness=0.0, image_informativeness=0.0)
    out = generate_synthetic(spec, tmp_path, progress=False)
    text = _text_feature(out)
    assert not set(text.values()) & set(synthetic._TYPE_WORDS)
    accuracy, baseline = _held_out_accuracy(out, text)
    assert accuracy < baseline + 0.08, (accuracy, baseline)
    accuracy, baseline = _held_out_accuracy(out, _image_feature(out))
    assert accuracy < baseline + 0.08, (accuracy, baseline)
