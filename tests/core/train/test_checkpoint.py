"""Checkpoint files and RNG states: what is saved comes back, and bad files are named, on any machine."""

import random

import numpy as np
import pytest
import torch

from core.train.checkpoint import (
    CheckpointError,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
)


def _draws() -> tuple:
    return torch.rand(4).tolist(), random.random(), float(np.random.rand())


def _without_cuda(monkeypatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


class _FakeCuda:
    """Two CUDA devices' generator states, without a GPU."""

    def __init__(self, monkeypatch, devices: int) -> None:
        self.restored: dict[int, torch.Tensor] = {}
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: devices)
        monkeypatch.setattr(
            torch.cuda,
            "get_rng_state_all",
            lambda: [torch.full((16,), index, dtype=torch.uint8) for index in range(devices)],
        )
        monkeypatch.setattr(torch.cuda, "set_rng_state", self._set)

    def _set(self, state: torch.Tensor, device: int) -> None:
        self.restored[device] = state


def test_saved_rng_states_continue_the_same_draws_after_a_file_round_trip(tmp_path, monkeypatch):
    _without_cuda(monkeypatch)
    torch.manual_seed(1), random.seed(1), np.random.seed(1)
    _draws()
    state = {"config": {}, "stage": 1, "rng": rng_state()}
    assert "cuda" not in state["rng"]
    expected = _draws()
    save_checkpoint(state, tmp_path / "last.pt")
    set_rng_state(load_checkpoint(tmp_path / "last.pt", required=("rng",))["rng"])
    assert _draws() == expected


def test_cuda_states_are_saved_per_device_and_restored_where_there_are_devices(
    tmp_path, monkeypatch
):
    _FakeCuda(monkeypatch, devices=2)
    state = {"config": {}, "stage": 1, "rng": rng_state()}
    assert [s[0].item() for s in state["rng"]["cuda"]] == [0, 1]
    save_checkpoint(state, tmp_path / "last.pt")  # byte tensors load under weights_only
    saved = load_checkpoint(tmp_path / "last.pt")["rng"]

    two = _FakeCuda(monkeypatch, devices=2)
    set_rng_state(saved)
    assert {device: s[0].item() for device, s in two.restored.items()} == {0: 0, 1: 1}
    # A machine with fewer devices restores those it has.
    one = _FakeCuda(monkeypatch, devices=1)
    set_rng_state(saved)
    assert list(one.restored) == [0]


@pytest.mark.parametrize("written_on", ["gpu", "cpu"])
def test_a_cpu_only_machine_restores_checkpoints_with_or_without_cuda_states(
    monkeypatch, written_on
):
    if written_on == "gpu":
        _FakeCuda(monkeypatch, devices=1)
    else:
        _without_cuda(monkeypatch)
    state = rng_state()
    assert ("cuda" in state) == (written_on == "gpu")
    expected = _draws()
    _without_cuda(monkeypatch)  # resumed on a CPU-only machine
    monkeypatch.setattr(torch.cuda, "set_rng_state", _no_gpu_here)
    set_rng_state(state)
    assert _draws() == expected


def _no_gpu_here(*args, **kwargs):
    raise AssertionError("a CPU-only machine must not touch CUDA RNG states")


def test_damaged_rng_states_are_named_and_change_nothing(tmp_path, monkeypatch):
    _without_cuda(monkeypatch)
    good = rng_state()
    damaged = [
        {**good, "python": "not a state"},
        {**good, "numpy": {"keys": good["numpy"]["keys"]}},
        {**good, "torch": torch.zeros(3)},
        {**good, "cuda": ["not a tensor"]},
    ]
    for state in damaged:
        before = torch.get_rng_state()
        with pytest.raises(CheckpointError, match=r"last\.pt: the RNG states are damaged"):
            set_rng_state(state, tmp_path / "last.pt")
        assert torch.equal(torch.get_rng_state(), before)


def test_files_of_the_wrong_shape_are_named(tmp_path):
    path = tmp_path / "last.pt"
    torch.save([1, 2, 3], path)
    with pytest.raises(CheckpointError, match=r"last\.pt: not a diffcom checkpoint: .* a list"):
        load_checkpoint(path)
    torch.save({"model": {}}, path)
    with pytest.raises(CheckpointError, match=r"last\.pt: not a diffcom checkpoint \(no config"):
        load_checkpoint(path)
    torch.save({"config": {}, "stage": 3}, path)
    with pytest.raises(CheckpointError, match=r"last\.pt: damaged checkpoint: .*stage 3"):
        load_checkpoint(path)
    torch.save({"config": {}, "stage": 1, "model": [1]}, path)
    assert load_checkpoint(path)["stage"] == 1  # nothing required: the caller reads no weights
    with pytest.raises(
        CheckpointError, match=r"'model' entry should hold the model's weights, found a list"
    ):
        load_checkpoint(path, required=("model",))
    with pytest.raises(
        CheckpointError, match=r"'rng' entry should hold the RNG states, found none"
    ):
        load_checkpoint(path, required=("rng",))


class _Arbitrary:
    """An object ``weights_only`` loading refuses."""


@pytest.mark.parametrize(
    "content",
    [b"\x80\x04not a pickle at all", b"plain text", None],
    ids=["bad-pickle", "text", "arbitrary-object"],
)
def test_unreadable_files_never_suggest_weights_only_false(tmp_path, content):
    path = tmp_path / "last.pt"
    if content is None:
        torch.save({"config": {}, "stage": 1, "model": _Arbitrary()}, path)
    else:
        path.write_bytes(content)
    with pytest.raises(CheckpointError, match=r"last\.pt: not a") as error:
        load_checkpoint(path)
    assert "weights_only" not in str(error.value)
    with pytest.raises(CheckpointError, match=r"missing\.pt: checkpoint not found"):
        load_checkpoint(tmp_path / "missing.pt")
