"""Frozen feature extraction: encoders, masks, unreadable images, and the on-disk cache.

Small graphs and tiny randomly initialised models saved into ``tmp_path`` keep this fast; one test
runs the shipped defaults (MiniLM + EfficientNet-Lite0 at 224 px) end to end.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import threading
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from core.data.graph import KnowledgeGraph
from core.features import (
    CACHE_DIR_ENV,
    IMAGE_ENCODERS,
    TEXT_ENCODERS,
    FeatureSettings,
    default_cache_dir,
    extract_features,
    load_text_encoder,
)
from core.features import cache as cache_module
from core.features import image as image_module
from core.features import text as text_module
from core.features.text import minilm_folder

_TOKENIZER_FILES = (
    "vocab.txt",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
)


# --------------------------------------------------------------------------------------- helpers


def _graph(texts: list[str], images: list[list[Path]], name: str = "tiny") -> KnowledgeGraph:
    """A graph with one relation, a ring of training triples, and the given texts and images."""
    count = len(texts)
    return KnowledgeGraph(
        name=name,
        entities=tuple(f"e{index}" for index in range(count)),
        relations=("r0",),
        entity_texts=tuple(texts),
        relation_texts=("related to",),
        entity_images=tuple(tuple(paths) for paths in images),
        train=torch.tensor([[index, 0, (index + 1) % count] for index in range(count)]),
        valid=torch.tensor([[0, 0, 2]]),
        test=torch.tensor([[1, 0, 2]]),
        candidates=torch.arange(count),
    )


def _draw(
    path: Path, colour: str, shape: str = "ellipse", size: tuple[int, int] = (120, 90)
) -> Path:
    """Write a real PNG or JPEG (by suffix): a coloured background with a shape on it."""
    picture = Image.new("RGB", size, colour)
    pen = ImageDraw.Draw(picture)
    box = (size[0] // 4, size[1] // 4, 3 * size[0] // 4, 3 * size[1] // 4)
    if shape == "ellipse":
        pen.ellipse(box, fill="white")
    else:
        pen.rectangle(box, fill="black")
    picture.save(path)
    return path


def _truncated_jpeg(path: Path) -> Path:
    """A JPEG whose header is fine but whose data stops half way."""
    _draw(path.with_suffix(".full.jpg"), "orange", size=(200, 160))
    data = path.with_suffix(".full.jpg").read_bytes()
    path.write_bytes(data[: len(data) // 2])
    path.with_suffix(".full.jpg").unlink()
    return path


def _fail(*args, **kwargs):
    raise AssertionError("a model was loaded on what should be a cache hit")


@pytest.fixture(scope="session")
def bert_folder(tmp_path_factory) -> Path:
    """A tiny random BertModel with the MiniLM tokenizer, saved with save_pretrained."""
    from transformers import BertConfig, BertModel

    folder = tmp_path_factory.mktemp("tiny-bert")
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=30522,
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=37,
        max_position_embeddings=128,
    )
    BertModel(config).save_pretrained(folder)
    for name in _TOKENIZER_FILES:
        shutil.copy(minilm_folder() / name, folder / name)
    return folder


@pytest.fixture(scope="session")
def clip_folder(tmp_path_factory) -> Path:
    """A tiny random CLIPVisionModel and its image processor, saved with save_pretrained."""
    from transformers import CLIPVisionConfig, CLIPVisionModel

    try:
        from transformers import CLIPImageProcessorPil as processor_class
    except ImportError:
        from transformers import CLIPImageProcessor as processor_class

    folder = tmp_path_factory.mktemp("tiny-clip")
    torch.manual_seed(0)
    config = CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=37,
        projection_dim=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        image_size=32,
        patch_size=8,
    )
    CLIPVisionModel(config).save_pretrained(folder)
    processor_class(
        size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}
    ).save_pretrained(folder)
    return folder


@pytest.fixture
def pictures(tmp_path) -> dict[str, Path]:
    """Three readable images (PNG and JPEG) and two unreadable ones."""
    folder = tmp_path / "images"
    folder.mkdir()
    return {
        "red": _draw(folder / "a_red.png", "red"),
        "green": _draw(folder / "b_green.jpg", "green", "rectangle"),
        "blue": _draw(folder / "c_blue.png", "blue", size=(64, 128)),
        "not_an_image": _write(folder / "0_not_an_image.png", b"this is not a PNG"),
        "truncated": _truncated_jpeg(folder / "1_truncated.jpg"),
    }


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def _local_settings(bert_folder: Path, **overrides) -> FeatureSettings:
    """Tiny local text model, no images: the fastest path through a real model."""
    values = {"text_encoder": "local", "text_model_path": str(bert_folder), "image_encoder": "none"}
    values.update(overrides)
    return FeatureSettings(**values)


# ----------------------------------------------------------------------- shipped default encoders


def test_default_encoders_give_masked_unit_norm_text_and_pooled_image_features(tmp_path, pictures):
    graph = _graph(
        ["heart", "", "lung disease", "  "],
        [[pictures["red"], pictures["green"]], [pictures["blue"]], [], []],
    )
    features = extract_features(
        graph, FeatureSettings(), cache_dir=tmp_path / "cache", progress=False
    )

    assert features.text.shape == (4, 384) and features.text.dtype == torch.float32
    assert features.image.shape == (4, 1280) and features.image.dtype == torch.float32
    assert features.text_mask.dtype == torch.bool and features.image_mask.dtype == torch.bool
    assert features.text_mask.tolist() == [True, False, True, False]
    assert features.image_mask.tolist() == [True, True, False, False]
    norms = features.text.norm(dim=1)
    assert torch.allclose(norms[features.text_mask], torch.ones(2), atol=1e-5)
    assert torch.count_nonzero(features.text[~features.text_mask]) == 0
    assert torch.count_nonzero(features.image[~features.image_mask]) == 0
    assert features.image[features.image_mask].abs().sum(dim=1).min() > 0
    assert (features.text_encoder, features.image_encoder) == ("minilm", "efficientnet-lite0")
    assert (features.images_used, features.images_skipped) == (3, 0)
    assert features.graph_hash == graph.content_hash() and len(features.key) == 64
    assert not features.from_cache


def test_mean_pooling_ignores_padding(bert_folder):
    encoder = load_text_encoder(_local_settings(bert_folder))
    alone = encoder.encode(["short text"])
    batched = encoder.encode(["short text", "a much longer text that forces padding on the first"])
    assert encoder.dim == 32
    assert torch.allclose(alone[0], batched[0], atol=1e-5)
    assert torch.allclose(batched.norm(dim=1), torch.ones(2), atol=1e-5)


# --------------------------------------------------------------------------------- images


def test_unreadable_images_are_skipped_and_counted(tmp_path, pictures):
    graph = _graph(
        ["a", "b", "c"],
        [
            [pictures["not_an_image"], pictures["truncated"]],  # nothing readable
            [pictures["truncated"], pictures["red"]],  # falls through to the readable one
            [pictures["red"]],
        ],
    )
    settings = FeatureSettings(text_encoder="none", image_size=64, max_images_per_entity=1)
    with pytest.warns(RuntimeWarning, match="skipped 3 unreadable"):
        features = extract_features(graph, settings, cache_dir=tmp_path / "cache", progress=False)

    assert features.image_mask.tolist() == [False, True, True]
    assert torch.count_nonzero(features.image[0]) == 0
    assert torch.allclose(features.image[1], features.image[2], atol=1e-5)
    assert features.images_skipped == 3 and features.images_used == 2
    assert set(features.skipped_images) == {
        str(pictures["not_an_image"]),
        str(pictures["truncated"]),
    }

    again = extract_features(graph, settings, cache_dir=tmp_path / "cache", progress=False)
    assert again.from_cache and again.images_skipped == 3


def test_clip_tower_from_local_folder_averages_up_to_max_images(tmp_path, pictures, clip_folder):
    graph = _graph(
        ["a", "b", "c", "d"],
        [
            [pictures["green"], pictures["red"]],  # sorted: red (a_), then green (b_)
            [pictures["red"]],
            [pictures["green"]],
            [pictures["blue"], pictures["green"], pictures["red"]],
        ],
    )
    settings = FeatureSettings(
        text_encoder="none",
        image_encoder="clip",
        image_model_path=str(clip_folder),
        max_images_per_entity=2,
        image_batch_size=3,
    )
    features = extract_features(graph, settings, cache_dir=tmp_path / "cache", progress=False)

    assert features.image.shape == (4, 32) and features.image_mask.all()
    assert features.image_encoder == f"clip:{clip_folder.resolve()}"
    assert features.text.shape == (4, 0) and not features.text_mask.any()
    mean_of_two = (features.image[1] + features.image[2]) / 2
    assert torch.allclose(features.image[0], mean_of_two, atol=1e-5)
    assert torch.allclose(features.image[3], mean_of_two, atol=1e-5)  # blue is third in order
    assert features.images_used == 6


def test_disabled_modalities_give_zero_width_features(tmp_path, monkeypatch):
    monkeypatch.setenv(CACHE_DIR_ENV, str(tmp_path / "env-cache"))
    monkeypatch.setattr(text_module, "load_text_encoder", _fail)
    monkeypatch.setattr(image_module, "load_image_encoder", _fail)
    graph = _graph(["a", "b", "c"], [[], [], []])

    features = extract_features(
        graph, FeatureSettings(text_encoder="none", image_encoder="none"), progress=False
    )

    assert features.text.shape == (3, 0) and features.image.shape == (3, 0)
    assert not features.text_mask.any() and not features.image_mask.any()
    assert features.cache_path.parent == tmp_path / "env-cache" / "features"


# ---------------------------------------------------------------------------------- cache


def test_second_call_is_a_hit_that_loads_no_model(
    tmp_path, pictures, bert_folder, clip_folder, monkeypatch
):
    graph = _graph(["heart", "lung", ""], [[pictures["red"]], [], [pictures["blue"]]])
    settings = FeatureSettings(
        text_encoder="local",
        text_model_path=str(bert_folder),
        image_encoder="clip",
        image_model_path=str(clip_folder),
    )
    first = extract_features(graph, settings, cache_dir=tmp_path / "cache", progress=False)

    import transformers

    monkeypatch.setattr(text_module, "load_text_encoder", _fail)
    monkeypatch.setattr(image_module, "load_image_encoder", _fail)
    monkeypatch.setattr(transformers.AutoModel, "from_pretrained", _fail)
    monkeypatch.setattr(transformers.CLIPVisionModel, "from_pretrained", _fail)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        second = extract_features(graph, settings, cache_dir=tmp_path / "cache", progress=False)

    assert second.from_cache and not first.from_cache
    assert second.key == first.key and second.cache_path == first.cache_path
    for name in ("text", "text_mask", "image", "image_mask"):
        assert torch.equal(getattr(first, name), getattr(second, name))
    assert sorted(path.name for path in first.cache_path.iterdir()) == [
        cache_module.METADATA_FILE,
        cache_module.TENSOR_FILE,
    ]
    sidecar = json.loads((first.cache_path / cache_module.METADATA_FILE).read_text())
    assert sidecar["settings"] == settings.to_dict() and sidecar["images_used"] == 2


def _seed_globals(seed: int) -> None:
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed)


def test_a_miss_leaves_the_global_rngs_as_they_were(tmp_path, pictures):
    """Building EfficientNet draws random numbers before reading its weights; a miss must not
    change what the process draws next (a model initialised after extraction, say)."""
    graph = _graph(["heart", "lung", "liver"], [[pictures["red"]], [], []])
    _seed_globals(5)
    expected = (torch.rand(3), random.random(), np.random.rand())
    _seed_globals(5)
    features = extract_features(
        graph, FeatureSettings(text_encoder="none"), cache_dir=tmp_path / "cache", progress=False
    )
    assert not features.from_cache and features.images_used == 1
    assert torch.equal(torch.rand(3), expected[0])
    assert (random.random(), np.random.rand()) == expected[1:]


def _counting_loader(monkeypatch) -> list[int]:
    calls: list[int] = []
    original = text_module.load_text_encoder

    def counted(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(text_module, "load_text_encoder", counted)
    return calls


def test_changed_text_or_settings_is_a_miss(tmp_path, bert_folder, monkeypatch):
    calls = _counting_loader(monkeypatch)
    cache_dir = tmp_path / "cache"
    base = _graph(["heart", "lung", "kidney"], [[], [], []])
    changed = _graph(["heart", "lung", "liver"], [[], [], []])
    settings = _local_settings(bert_folder)

    keys = [extract_features(base, settings, cache_dir, progress=False).key]
    assert extract_features(base, settings, cache_dir, progress=False).from_cache
    assert len(calls) == 1
    other_text = extract_features(changed, settings, cache_dir, progress=False)
    keys.append(other_text.key)
    shorter = _local_settings(bert_folder, text_max_length=8)
    keys.append(extract_features(base, shorter, cache_dir, progress=False).key)
    batch = _local_settings(bert_folder, text_batch_size=2)
    keys.append(extract_features(base, batch, cache_dir, progress=False).key)

    assert not other_text.from_cache and len(calls) == 4
    assert len(set(keys)) == 4
    assert len(list(Path(cache_dir).iterdir())) == 4


def test_swapped_model_in_same_folder_is_a_miss(tmp_path, bert_folder):
    folder = tmp_path / "model"
    shutil.copytree(bert_folder, folder)
    graph = _graph(["heart", "lung", "kidney"], [[], [], []])
    settings = _local_settings(folder)
    before = extract_features(graph, settings, tmp_path / "cache", progress=False)

    weights = next(folder.glob("*.safetensors"))
    stat = weights.stat()
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    after = extract_features(graph, settings, tmp_path / "cache", progress=False)

    assert after.key != before.key and not after.from_cache


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:50])


def _flip_last_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize(
    "damage",
    [
        lambda entry: _truncate(entry / cache_module.TENSOR_FILE),
        lambda entry: _flip_last_byte(entry / cache_module.TENSOR_FILE),
        lambda entry: (entry / cache_module.TENSOR_FILE).write_bytes(b"garbage"),
        lambda entry: (entry / cache_module.METADATA_FILE).write_text("{not json"),
        lambda entry: (entry / cache_module.METADATA_FILE).unlink(),
        lambda entry: (entry / cache_module.TENSOR_FILE).unlink(),
    ],
    ids=["truncated", "bit-flip", "garbage", "bad-json", "no-sidecar", "no-tensors"],
)
def test_damaged_cache_entry_is_recomputed(tmp_path, bert_folder, damage):
    graph = _graph(["heart", "lung", ""], [[], [], []])
    settings = _local_settings(bert_folder)
    original = extract_features(graph, settings, tmp_path / "cache", progress=False)
    damage(original.cache_path)

    with pytest.warns(RuntimeWarning, match="unusable"):
        recomputed = extract_features(graph, settings, tmp_path / "cache", progress=False)
    assert not recomputed.from_cache
    assert torch.allclose(recomputed.text, original.text, atol=1e-6)
    assert torch.equal(recomputed.text_mask, original.text_mask)

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert extract_features(graph, settings, tmp_path / "cache", progress=False).from_cache


def test_concurrent_writers_never_expose_a_partial_entry(tmp_path):
    entry = tmp_path / "entry"
    key = "k" * 64
    tensors = {
        "text": torch.randn(500, 64),
        "text_mask": torch.ones(500, dtype=torch.bool),
        "image": torch.randn(500, 128),
        "image_mask": torch.zeros(500, dtype=torch.bool),
    }
    metadata = {"format": cache_module.CACHE_FORMAT, "key": key, "text_dim": 64, "image_dim": 128}
    cache_module.save_entry(entry, tensors, metadata)
    errors: list[BaseException] = []

    def write() -> None:
        try:
            for _ in range(15):
                cache_module.save_entry(entry, tensors, metadata)
        except BaseException as error:  # pragma: no cover - reported below
            errors.append(error)

    writers = [threading.Thread(target=write) for _ in range(2)]
    for writer in writers:
        writer.start()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        while any(writer.is_alive() for writer in writers):
            loaded = cache_module.load_entry(entry, key, 500)
            assert loaded is not None and torch.equal(loaded[0]["image"], tensors["image"])
    for writer in writers:
        writer.join()
    assert not errors
    assert not list(entry.glob("*.tmp")) and not list(entry.glob(".*"))


# ------------------------------------------------------------------------- settings and paths


def test_model_path_errors_are_clear(tmp_path, monkeypatch, bert_folder):
    monkeypatch.chdir(tmp_path)
    graph = _graph(["a", "b", "c"], [[], [], []])
    missing = tmp_path / "no-such-model"
    with pytest.raises(FileNotFoundError, match=re.escape(str(missing))):
        extract_features(graph, _local_settings(missing), tmp_path / "cache", progress=False)
    with pytest.raises(FileNotFoundError, match="local folders only"):
        extract_features(
            graph, _local_settings(Path("bert-base-uncased")), tmp_path / "cache", progress=False
        )
    with pytest.raises(FileNotFoundError, match="local folders only"):
        extract_features(
            graph,
            FeatureSettings(
                text_encoder="none",
                image_encoder="clip",
                image_model_path="openai/clip-vit-base-patch32",
            ),
            tmp_path / "cache",
            progress=False,
        )
    empty = tmp_path / "empty-model"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="no config.json"):
        extract_features(graph, _local_settings(empty), tmp_path / "cache", progress=False)
    with pytest.raises(FileNotFoundError, match="preprocessor_config.json"):
        extract_features(
            graph,
            FeatureSettings(
                text_encoder="none", image_encoder="clip", image_model_path=str(bert_folder)
            ),
            tmp_path / "cache",
            progress=False,
        )
    assert not (tmp_path / "cache").exists()


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"text_encoder": "bert"}, "text_encoder must be one of local, minilm, none"),
        (
            {"image_encoder": "resnet"},
            "image_encoder must be one of clip, efficientnet-lite0, none",
        ),
        ({"text_encoder": "local"}, "needs text_model_path"),
        ({"image_encoder": "clip"}, "needs image_model_path"),
        ({"text_model_path": "/models/bert"}, "only used with text_encoder='local'"),
        ({"text_max_length": 0}, "text_max_length must be a positive integer"),
        ({"image_batch_size": 2.5}, "image_batch_size must be a positive integer"),
        ({"max_images_per_entity": -1}, "max_images_per_entity must be a positive integer"),
        ({"image_size": 16}, "image_size must be at least 32"),
    ],
)
def test_bad_settings_are_rejected(values, message):
    with pytest.raises(ValueError, match=message):
        FeatureSettings(**values)


def test_settings_round_trip_and_unknown_keys():
    settings = FeatureSettings(image_encoder="none", text_max_length=32)
    assert FeatureSettings.from_dict(settings.to_dict()) == settings
    with pytest.raises(ValueError, match="unknown feature setting.*valid settings: text_encoder"):
        FeatureSettings.from_dict({"text_encodr": "minilm"})
    assert set(TEXT_ENCODERS) == {"minilm", "local", "none"}
    assert set(IMAGE_ENCODERS) == {"efficientnet-lite0", "clip", "none"}


def test_default_cache_dir_is_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv(CACHE_DIR_ENV, "relative/cache")
    assert default_cache_dir() == tmp_path / "relative" / "cache" / "features"
    monkeypatch.delenv(CACHE_DIR_ENV)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_cache_dir() == tmp_path / "home" / ".cache" / "diffcom" / "features"
