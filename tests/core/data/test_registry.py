"""Datasets by name, the synthetic graph read back through the MKGformer loader, and `data check`."""

import json

import pytest

from core.data.files import DatasetError
from core.data.mkgformer import LoadOptions, load_mkgformer
from core.data.registry import load_dataset, synthetic_dataset_folder
from core.data.synthetic import SyntheticSpec, generate_synthetic
from core.features.cache import cache_key
from diffcom.cli import main


def test_synthetic_dataset_reads_back_through_the_mkgformer_loader(tmp_path):
    spec = SyntheticSpec.preset("small", corrupt_image_fraction=0.05, image_coverage=0.9)
    folder = generate_synthetic(spec, tmp_path / "syn", progress=False)
    graph = load_mkgformer(folder, LoadOptions(cache_dir=str(tmp_path / "cache")))
    written = json.loads((folder / "synthetic.json").read_text())

    assert (graph.num_entities, graph.num_relations) == (spec.num_entities, spec.num_relations)
    assert (len(graph.train), len(graph.valid), len(graph.test)) == (
        spec.num_train,
        spec.num_valid,
        spec.num_test,
    )
    assert all(text for text in graph.entity_texts)  # long descriptions carry the text signal
    assert graph.report["text_file"] == "entity2textlong.txt"
    # Every corrupted file the generator wrote is skipped and counted under its reason.
    corrupt = written["corrupt_images"]
    assert graph.report["skipped_images"] == {
        "black": len(corrupt["black"]),
        "tiny": len(corrupt["one_pixel"]),
        "unreadable": len(corrupt["truncated"]),
    }
    entities_without_folder = graph.report["entities_without_image_folder"]
    written_files = spec.images_per_entity * (spec.num_entities - entities_without_folder)
    kept = sum(len(images) for images in graph.entity_images)
    assert kept + sum(graph.report["skipped_images"].values()) == written_files
    assert entities_without_folder == spec.num_entities - round(0.9 * spec.num_entities)


def test_synthetic_name_generates_once_into_the_cache(tmp_path):
    first = load_dataset("synthetic", cache_dir=tmp_path)
    folder = synthetic_dataset_folder(SyntheticSpec.preset("small"), tmp_path)
    stamp = (folder / "synthetic.json").stat().st_mtime_ns
    second = load_dataset("synthetic:small", cache_dir=tmp_path)
    assert (folder / "synthetic.json").stat().st_mtime_ns == stamp
    assert first.content_hash() == second.content_hash()
    assert first.name == "synthetic-small"
    assert [p.name for p in (tmp_path / "datasets").iterdir()] == [folder.name]  # no staging left


def test_builtin_and_unknown_names(tmp_path):
    assert load_dataset("nations", cache_dir=tmp_path).num_entities == 14
    with pytest.raises(DatasetError, match="neither a known name .*umls.* nor a folder"):
        load_dataset("fb15k-237", cache_dir=tmp_path)
    with pytest.raises(DatasetError, match="synthetic:huge"):
        load_dataset("synthetic:huge", cache_dir=tmp_path)


def test_data_check_prints_counts_and_leakage(capsys):
    assert main(["data", "check", "umls"]) == 0
    out = capsys.readouterr().out
    assert "entities     135" in out
    assert "train 5,216 / valid 652 / test 661" in out
    assert "leakage      test:" in out


def test_data_check_json_and_errors(capsys, tmp_path):
    assert main(["data", "check", "nations", "--json"]) == 0
    statistics = json.loads(capsys.readouterr().out)
    assert statistics["relations"] == 55
    assert statistics["leakage"]["test"]["triples"] == 201
    assert main(["data", "check", str(tmp_path / "missing")]) == 2
    assert "neither a known name" in capsys.readouterr().err


def test_every_command_has_help(capsys):
    for argv in (
        ["--help"],
        ["data", "--help"],
        ["data", "check", "--help"],
        ["data", "synth", "--help"],
    ):
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        assert exit_info.value.code == 0
    assert "usage: diffcom data synth" in capsys.readouterr().out


def test_data_synth_command_writes_a_loadable_dataset(tmp_path, capsys):
    out = tmp_path / "syn"
    argv = ["data", "synth", str(out), "--entities", "60", "--relations", "4", "--train", "400"]
    assert main([*argv, "--valid", "30", "--test", "30", "--images-per-entity", "1"]) == 0
    graph = load_mkgformer(out)
    assert (graph.num_entities, graph.num_relations, len(graph.train)) == (60, 4, 400)
    assert main(["data", "synth", str(out)]) == 2  # never writes into a non-empty folder
    assert "diffcom: error:" in capsys.readouterr().err


def test_data_synth_refuses_an_empty_output_folder_name(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # an empty folder: Path("") would be it
    assert main(["data", "synth", "", "--entities", "60"]) == 2
    assert "output folder is empty" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_data_features_command_computes_then_hits_the_cache(tmp_path, capsys):
    argv = [
        "data",
        "features",
        "nations",
        "--cache-dir",
        str(tmp_path),
        "--set",
        "features.image_encoder=none",
    ]
    assert main(argv) == 0
    first = capsys.readouterr().out
    assert "text (14, 384) (minilm)" in first and "computed" in first
    assert main(argv) == 0
    assert "cache hit" in capsys.readouterr().out


def test_anonymous_entity_text_replaces_every_text_and_keeps_the_graph():
    from core.config import load_config
    from core.train.trainer import load_run_dataset

    named = load_run_dataset(load_config(overrides=["data.dataset=umls"]))
    anonymous = load_run_dataset(
        load_config(overrides=["data.dataset=umls", "data.entity_text=anonymous"])
    )
    assert anonymous.num_entities == named.num_entities == 135
    assert anonymous.entities == named.entities and anonymous.relations == named.relations
    for split in ("train", "valid", "test"):
        assert anonymous.split(split).equal(named.split(split))
    assert anonymous.entity_texts[0] == "e000" and anonymous.entity_texts[134] == "e134"
    assert len(set(anonymous.entity_texts)) == 135
    # No original word survives: each text is only an id.
    assert not set(anonymous.entity_texts) & set(named.entity_texts)
    assert anonymous.summary()["entities_with_text"] == 135
    assert anonymous.name == "umls-anonymous" and anonymous.report["entity_text"] == "anonymous"
    # The text is part of the data's identity, so features are cached apart.
    assert anonymous.content_hash() != named.content_hash()
    identity = ({"name": "minilm"}, {"name": "none"}, {})
    assert cache_key(anonymous.content_hash(), *identity) != cache_key(
        named.content_hash(), *identity
    )


@pytest.mark.parametrize("name", ["", "  "])
def test_empty_dataset_name_is_an_error_not_the_current_folder(name, capsys, tmp_path, monkeypatch):
    # The current folder is a valid-looking dataset, so only the empty-name check can stop the load.
    generate_synthetic(SyntheticSpec.preset("small", images_per_entity=0), tmp_path, progress=False)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DatasetError, match="dataset name is empty"):
        load_dataset(name, cache_dir=tmp_path / "cache")
    assert main(["data", "check", name, "--cache-dir", str(tmp_path / "cache")]) == 2
    assert "diffcom: error: the dataset name is empty" in capsys.readouterr().err


def test_a_file_given_as_dataset_folder_is_named(tmp_path):
    (tmp_path / "train.tsv").write_text("a\tb\tc\n")
    with pytest.raises(DatasetError, match=r"train\.tsv: is a file, expected a folder"):
        load_dataset(tmp_path / "train.tsv", cache_dir=tmp_path)


def test_data_synth_overwrite_refuses_a_real_dataset(tmp_path, capsys):
    # A hand-made MKGformer folder: the generator's own file names, but no generator marker.
    real = tmp_path / "FB15k-237"
    real.mkdir()
    names = ["train.tsv", "dev.tsv", "test.tsv", "entities.txt", "relations.txt", "entity2text.txt"]
    for name in names:
        (real / name).write_text(f"real {name}\n")
    (real / "images" / "m.0a").mkdir(parents=True)
    (real / "images" / "m.0a" / "0.png").write_bytes(b"real image")
    before = {path: path.read_bytes() for path in real.rglob("*") if path.is_file()}
    assert main(["data", "synth", str(real), "--overwrite"]) == 2
    error = capsys.readouterr().err
    assert f"{real} was not written by `diffcom data synth`" in error
    assert {path: path.read_bytes() for path in real.rglob("*") if path.is_file()} == before
