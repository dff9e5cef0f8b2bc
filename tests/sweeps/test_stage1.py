"""Shared stage-1 runs: the content key, one training per key under concurrency, crash recovery."""

import dataclasses
import json
import multiprocessing
import time
from pathlib import Path

import pytest

from core.config import load_config
from sweeps.stage1 import Stage1Store, interleave_by_stage1, stage1_key, stage1_only


def _config(*overrides):
    return load_config(overrides=["data.dataset=nations", *overrides])


def test_the_key_ignores_stage2_knobs_and_follows_stage1_ones():
    base = stage1_key(_config())
    for stage2_only in (
        "diffusion.steps=40",
        "diffusion.denoiser_width=1024",
        "diffusion.denoiser_depth=3",
        "loss.w_kl=0.5",
        "loss.w_bce=2.0",
        "train.stage2_epochs=7",
        "train.lr_stage2=0.01",
    ):
        assert stage1_key(_config(stage2_only)) == base, stage2_only
    for stage1_knob in (
        "seed=1",
        "model.hidden_dim=64",
        "structure.encoder=mgat",
        "structure.lambda_fusion=0.3",
        "train.stage1_epochs=3",
        "train.lr_stage1=0.01",
        "loss.label_smoothing=0.2",
        "features.text_encoder=none",
    ):
        assert stage1_key(_config(stage1_knob)) != base, stage1_knob
    assert stage1_only(_config()).train.stage2_epochs == 0


def _fake_stage1(config, folder: Path) -> dict:
    """Stands in for core training: takes a while, writes the checkpoint, counts itself."""
    with (folder.parent.parent / "trainings.log").open("a") as log:
        log.write(f"{config.seed}\n")
    time.sleep(0.5)
    (folder / "checkpoints").mkdir(parents=True, exist_ok=True)
    (folder / "checkpoints" / "last.pt").write_bytes(b"weights")
    return {"timings": {"train_seconds": 0.5}}


def _ask(root: str, seed: int, trial: str) -> bool:
    store = Stage1Store(Path(root))
    return store.obtain(_config(f"seed={seed}"), _fake_stage1, trial=trial).trained_here


def test_trials_asking_at_once_train_each_key_once(tmp_path):
    context = multiprocessing.get_context("spawn")
    asks = [(str(tmp_path), seed, f"trial-{i}-seed-{seed}") for i in range(3) for seed in (0, 1)]
    with context.Pool(6) as pool:
        trained = pool.starmap(_ask, asks)
    assert sum(trained) == 2  # one per seed, whatever the interleaving
    assert sorted((tmp_path / "trainings.log").read_text().split()) == ["0", "1"]
    events = Stage1Store(tmp_path).events()
    assert [e["event"] for e in events].count("trained") == 2
    assert [e["event"] for e in events].count("reused") == 4


def test_a_crash_while_training_leaves_the_key_to_the_next_trial(tmp_path):
    store = Stage1Store(tmp_path)

    def crash(config, folder):
        (folder / "checkpoints").mkdir(parents=True)
        (folder / "checkpoints" / "last.pt").write_bytes(b"half")
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError):
        store.obtain(_config(), crash, trial="first")
    resumed_from = []

    def resume(config, folder):
        resumed_from.append((folder / "checkpoints" / "last.pt").read_bytes())
        return _fake_stage1(config, folder)

    got = store.obtain(_config(), resume, trial="second")
    assert got.trained_here and resumed_from == [b"half"]  # the partial run is continued
    assert not store.obtain(_config(), resume, trial="third").trained_here


def test_parent_stores_are_read_and_never_written(tmp_path):
    parent = Stage1Store(tmp_path / "parent")
    parent.obtain(_config(), _fake_stage1, trial="old")
    before = sorted(p.relative_to(tmp_path) for p in (tmp_path / "parent").rglob("*"))
    child = Stage1Store(tmp_path / "child", read_only_roots=(tmp_path / "parent",))
    got = child.obtain(_config(), _fake_stage1, trial="new")
    assert not got.trained_here and got.checkpoint.is_relative_to(tmp_path / "parent")
    assert sorted(p.relative_to(tmp_path) for p in (tmp_path / "parent").rglob("*")) == before
    done = json.loads((tmp_path / "parent" / stage1_key(_config()) / "done.json").read_text())
    assert done["trained_by"] == "old"
    assert dataclasses.asdict(_config())["seed"] == done["stage1_config"]["seed"]


def test_trials_are_submitted_one_stage1_key_at_a_time():
    configs = {
        f"k{k}/seed-{seed}": _config(f"diffusion.steps={k}", f"seed={seed}")
        for seed in (0, 1)
        for k in (5, 10, 20)
    }
    assert interleave_by_stage1(configs) == [
        "k5/seed-0",
        "k5/seed-1",
        "k10/seed-0",
        "k10/seed-1",
        "k20/seed-0",
        "k20/seed-1",
    ]
