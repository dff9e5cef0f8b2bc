"""Fused stage 2 (core.train.fused): each member of a pack is its lone twin, bitwise on one thread.

One stage-1 run is trained per module; every test trains packs of stage-2 members from its
checkpoint and compares them with ``train(config, out, stage1_checkpoint=...)`` from the same
checkpoint. The fused forward runs each member's slice through the same GEMM and LayerNorm kernels
as a lone run and draws each member's noise from a generator that continues the lone run's global
RNG stream, so the comparison is exact equality (tolerance 0), not approximate.
"""

import json

import pytest
import torch

import runstore as store
from core.config import ConfigError, load_config
from core.model.denoiser import CDenoiser
from core.train import fused as fused_module
from core.train.checkpoint import load_checkpoint
from core.train.fused import train_fused
from core.train.trainer import NonFiniteLossError, build_model, load_run_dataset, train

TINY = [
    "data.dataset=nations",
    "features.text_encoder=none",
    "features.image_encoder=none",
    "model.hidden_dim=16",
    "model.num_heads=2",
    "model.num_layers=1",
    "structure.max_nodes=4",
    "diffusion.denoiser_width=16",
    "train.stage1_epochs=1",
    "train.stage2_epochs=2",
    "train.batch_size=256",  # Nations has 909 training queries: four steps an epoch
    "eval.batch_size=1024",
    "eval.official_samples=2",
    "train.stage2_selection=stage2-only",
    "seed=5",
]

# Three members differing in K, schedule, loss weights, KL reduction, target, dropout and lr.
MEMBERS = [
    ["diffusion.steps=5", "loss.w_kl=1.0", "train.lr_stage2=1e-3"],
    [
        "diffusion.steps=3",
        "diffusion.schedule=cosine",
        "loss.w_kl=0.3",
        "loss.kl_reduction=mean",
        "train.lr_stage2=3e-3",
        "diffusion.denoiser_dropout=0.0",
    ],
    [
        "diffusion.steps=8",
        "diffusion.target=epsilon",
        "diffusion.beta_end=0.05",
        "loss.w_kl=2.0",
        "loss.w_bce=0.5",
        "train.lr_stage2=5e-4",
        "diffusion.denoiser_dropout=0.3",
        "train.stage2_epochs=3",
    ],
]


def config(*extra):
    return load_config(overrides=[*TINY, *extra])


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Bitwise equality needs one reduction order (as in test_stage1_relevance.py)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def stage1(tmp_path_factory):
    out = tmp_path_factory.mktemp("stage1")
    train(config("train.stage2_epochs=0"), out, progress=False)
    return out / "checkpoints" / "last.pt"


@pytest.fixture(scope="module")
def lone(stage1, tmp_path_factory):
    """Each member trained alone from the same stage-1 checkpoint."""
    root = tmp_path_factory.mktemp("lone")
    for index, extra in enumerate(MEMBERS):
        train(config(*extra), root / str(index), stage1_checkpoint=stage1, progress=False)
    return root


def _records(run):
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    for record in records:
        record.pop("train_seconds")  # wall time, the only value allowed to differ
    return records


def _results(run):
    results = json.loads((run / "results.json").read_text())
    results.pop("timings")
    for split in ("valid", "test"):
        results[split].pop("inference_ms_per_query")
    return results


def _assert_same_run(fused_run, lone_run):
    assert _records(fused_run) == _records(lone_run)
    assert _results(fused_run) == _results(lone_run)
    for split in ("valid", "test"):
        assert (fused_run / f"ranks_{split}.npz").read_bytes() == (
            lone_run / f"ranks_{split}.npz"
        ).read_bytes()
    fused_state = load_checkpoint(fused_run / "checkpoints" / "last.pt")
    lone_state = load_checkpoint(lone_run / "checkpoints" / "last.pt")
    for key, value in lone_state["model"].items():
        assert torch.equal(fused_state["model"][key], value), key
    assert torch.equal(fused_state["rng"]["torch"], lone_state["rng"]["torch"])
    fused_moments = fused_state["stage2"]["optimizer"]["state"]
    for index, moments in lone_state["stage2"]["optimizer"]["state"].items():
        assert torch.equal(fused_moments[index]["exp_avg"], moments["exp_avg"])


def test_members_equal_their_lone_twins(stage1, lone, tmp_path):
    outs = [tmp_path / str(index) for index in range(len(MEMBERS))]
    results = train_fused([config(*extra) for extra in MEMBERS], outs, stage1)
    for index, out in enumerate(outs):
        _assert_same_run(out, lone / str(index))
        on_disk = json.loads((out / "results.json").read_text())
        assert {"format_version": on_disk.pop("format_version"), **results[index]} == {
            "format_version": store.RESULTS.version,
            **on_disk,
        }
    # The members really differ: equal curves would make the comparison above vacuous.
    losses = {_records(out)[0]["loss"] for out in outs}
    assert len(losses) == len(MEMBERS)


def test_a_non_finite_member_fails_alone(stage1, lone, tmp_path, monkeypatch):
    calls = {"count": 0}
    real_loss = fused_module._stacked_loss

    def nan_in_second_epoch_of_member_1(members, *tensors):
        parts = real_loss(members, *tensors)
        factors = torch.ones_like(parts["loss"])
        for row, member in enumerate(members):
            if member.config.loss.w_kl == 0.3:  # member 1 only; its epoch 1 has four batches
                calls["count"] += 1
                if calls["count"] > 4:
                    factors[row] = float("nan")
        parts["loss"] = parts["loss"] * factors  # x 1 leaves the others' losses unchanged
        return parts

    monkeypatch.setattr(fused_module, "_stacked_loss", nan_in_second_epoch_of_member_1)
    outs = [tmp_path / str(index) for index in range(len(MEMBERS))]
    results = train_fused([config(*extra) for extra in MEMBERS], outs, stage1)
    assert isinstance(results[1], NonFiniteLossError)
    assert "stage 2, epoch 2, batch 1: loss is nan" in str(results[1])
    # Member 1's folder is what a lone run that raised there leaves: epoch 1, no results.
    assert not (outs[1] / "results.json").exists()
    assert _records(outs[1]) == _records(lone / "1")[:1]
    assert load_checkpoint(outs[1] / "checkpoints" / "last.pt")["stage2"]["epoch"] == 1
    for index in (0, 2):
        _assert_same_run(outs[index], lone / str(index))


def test_an_early_stopped_member_stops_changing(stage1, lone, tmp_path, monkeypatch):
    """The early-stopping decision is the lone trainer's; what the pack adds is the mask, so the
    decision is forced here for member 0 after its first epoch."""
    real_finish = fused_module._finish_epoch
    saved = {}

    def stop_member_0(run, stage, state, progress, record, *args, **kwargs):
        if run.out_dir.name == "0":
            progress["done"], record["early_stopped"] = True, True
        real_finish(run, stage, state, progress, record, *args, **kwargs)
        if run.out_dir.name == "0":
            saved.update(torch.load(run.out_dir / "checkpoints" / "last.pt", weights_only=True))

    monkeypatch.setattr(fused_module, "_finish_epoch", stop_member_0)
    outs = [tmp_path / str(index) for index in range(len(MEMBERS))]
    train_fused([config(*extra) for extra in MEMBERS], outs, stage1)
    assert [r["epoch"] for r in _records(outs[0])] == [1]
    after = load_checkpoint(outs[0] / "checkpoints" / "last.pt")
    assert after["stage2"]["epoch"] == 1
    for key, value in saved["model"].items():
        assert torch.equal(after["model"][key], value), key
    for index, moments in saved["stage2"]["optimizer"]["state"].items():
        assert torch.equal(
            after["stage2"]["optimizer"]["state"][index]["exp_avg"], moments["exp_avg"]
        )
    assert torch.equal(after["rng"]["torch"], saved["rng"]["torch"])
    # Its lone twin's first epoch is its only epoch; the others are untouched by the mask.
    assert _records(outs[0]) == [_records(lone / "0")[0] | {"early_stopped": True}]
    for index in (1, 2):
        _assert_same_run(outs[index], lone / str(index))


class Stop(Exception):
    pass


def test_an_interrupted_pack_resumes_to_the_same_runs(stage1, lone, tmp_path):
    outs = [tmp_path / str(index) for index in range(len(MEMBERS))]
    configs = [config(*extra) for extra in MEMBERS]
    seen = []

    def stop_after_two_records(member, record):
        seen.append((member, record["epoch"]))
        if len(seen) == 2:
            raise Stop

    with pytest.raises(Stop):
        train_fused(configs, outs, stage1, callback=stop_after_two_records)
    # Killed mid-way: members 0 and 1 have finished epoch 1, member 2 has nothing yet.
    assert seen == [(0, 1), (1, 1)]
    assert not (outs[2] / "checkpoints" / "last.pt").exists()
    # A member's folder is a lone run's: the lone trainer resumes member 0 on its own.
    train(configs[0], outs[0], stage1_checkpoint=stage1, progress=False)
    results = train_fused(configs[1:], outs[1:], stage1)
    assert all(isinstance(result, dict) for result in results)
    for index, out in enumerate(outs):
        _assert_same_run(out, lone / str(index))


def test_a_pack_shares_stage_1_and_the_denoiser_shape(stage1, tmp_path):
    outs = [tmp_path / "a", tmp_path / "b"]
    with pytest.raises(
        ConfigError, match=r"train\.batch_size \(256 in member 0, 128 in member 1\)"
    ):
        train_fused([config(), config("train.batch_size=128")], outs, stage1)
    with pytest.raises(ConfigError, match=r"diffusion\.denoiser_width"):
        train_fused([config(), config("diffusion.denoiser_width=32")], outs, stage1)
    with pytest.raises(ConfigError, match=r"loss\.stage2_extractor='finetune'"):
        train_fused([config(), config("loss.stage2_extractor=finetune")], outs, stage1)
    with pytest.raises(ConfigError, match=r"own out_dir"):
        train_fused([config(), config()], [outs[0], outs[0]], stage1)


def test_a_stacked_silu_equals_each_members(one_thread):
    """One SiLU over the stack only where a member's slice has no scalar tail (64-float blocks);
    elsewhere per member. Either way each slice is bitwise the lone call's."""
    generator = torch.Generator().manual_seed(0)
    for shape in [(3, 8, 16), (3, 7, 17), (2, 141, 16), (4, 1, 5)]:
        x = torch.randn(shape, generator=generator) * 4
        stacked = fused_module._silu(x)
        for i in range(shape[0]):
            assert torch.equal(stacked[i], torch.nn.functional.silu(x[i])), shape


def test_the_accelerator_layer_norm_is_each_members_up_to_rounding():
    """The batched LayerNorm a pack uses off the CPU (no GPU here: run on the CPU) against
    per-member F.layer_norm, forward and backward."""
    generator = torch.Generator().manual_seed(0)
    h = torch.randn(4, 32, 48, generator=generator, dtype=torch.float64) * 3 + 1
    weight = torch.randn(4, 48, generator=generator, dtype=torch.float64)
    bias = torch.randn(4, 48, generator=generator, dtype=torch.float64)
    grad = torch.randn(4, 32, 48, generator=generator, dtype=torch.float64)
    batched_inputs = [t.clone().requires_grad_() for t in (h, weight, bias)]
    each_inputs = [t.clone().requires_grad_() for t in (h, weight, bias)]
    batched = fused_module._batched_layer_norm(*batched_inputs, 1e-5)
    each = torch.stack(
        [
            torch.nn.functional.layer_norm(
                each_inputs[0][i], (48,), each_inputs[1][i], each_inputs[2][i], 1e-5
            )
            for i in range(4)
        ]
    )
    torch.testing.assert_close(batched, each, rtol=1e-12, atol=1e-12)
    (batched * grad).sum().backward()
    (each * grad).sum().backward()
    for got, expected in zip(batched_inputs, each_inputs, strict=True):
        torch.testing.assert_close(got.grad, expected.grad, rtol=1e-10, atol=1e-10)
    # In float32 the two differ by rounding only.
    single = fused_module._batched_layer_norm(h.float(), weight.float(), bias.float(), 1e-5)
    torch.testing.assert_close(single, each.detach().float(), rtol=1e-5, atol=1e-5)


def test_protocols_the_pack_leaves_to_the_lone_code(stage1, tmp_path):
    """A member whose clean protocol draws noise (mean-of-samples) is ranked by the lone code,
    and a member whose stage 2 never beats its extractor on valid (include-stage1, a learning
    rate too small to move it) is evaluated as a stage-1 selection; both equal their lone twins,
    beside a batched member."""
    members = [
        MEMBERS[0],
        [*MEMBERS[1], "eval.clean_inference=mean-of-samples", "eval.clean_samples=2"],
        [*MEMBERS[2], "train.stage2_selection=include-stage1", "train.lr_stage2=1e-12"],
    ]
    lone_root, outs = tmp_path / "lone", [tmp_path / "fused" / str(i) for i in range(3)]
    for index, extra in enumerate(members):
        train(config(*extra), lone_root / str(index), stage1_checkpoint=stage1, progress=False)
    results = train_fused([config(*extra) for extra in members], outs, stage1)
    assert [r["final_stage"] for r in results] == [2, 2, 1]
    for index, out in enumerate(outs):
        _assert_same_run(out, lone_root / str(index))


def test_member_checkpoints_hold_the_extractor_once(stage1, lone, tmp_path):
    out = tmp_path / "0"
    train_fused([config(*MEMBERS[0])], [out], stage1)
    state = load_checkpoint(out / "checkpoints" / "last.pt")
    extractor_keys = [key for key in state["model"] if key.startswith("extractor.")]
    assert extractor_keys
    for key in extractor_keys:
        pointer = state["model"][key].untyped_storage().data_ptr()
        for entry in ("best_stage1", "best_stage2"):
            assert state[entry][key].untyped_storage().data_ptr() == pointer, (entry, key)
    lone_file = lone / "0" / "checkpoints" / "last.pt"
    assert (out / "checkpoints" / "last.pt").stat().st_size < lone_file.stat().st_size
    # That the lone trainer resumes such a file: test_an_interrupted_pack_resumes_to_the_same_runs.


def test_a_pack_above_its_memory_limit_trains_in_groups_with_the_same_results(
    stage1, lone, tmp_path, monkeypatch
):
    configs = [config(*extra) for extra in MEMBERS]
    template = build_model(configs[0], load_run_dataset(configs[0]), progress=False).denoiser
    member_mib = max(fused_module.member_memory_mib(c, template) for c in configs)
    groups_seen = []
    train_group = fused_module._train_group

    def spy(group, *args, **kwargs):
        groups_seen.append([index for index, _, _ in group])
        return train_group(group, *args, **kwargs)

    monkeypatch.setattr(fused_module, "_train_group", spy)
    outs = [tmp_path / str(index) for index in range(len(MEMBERS))]
    records = []
    train_fused(
        configs,
        outs,
        stage1,
        callback=lambda index, record: records.append(index),
        memory_limit_mib=2.5 * member_mib,  # room for two members at a time
    )
    assert groups_seen == [[0, 1], [2]]
    for index, out in enumerate(outs):
        _assert_same_run(out, lone / str(index))
    assert sorted(set(records)) == [0, 1, 2]  # callbacks keep the members' own indices


def test_member_memory_grows_with_the_denoiser_and_the_batch():
    base = config()
    small = CDenoiser(num_outputs=100, condition_dim=16, width=16, depth=1)
    wide = CDenoiser(num_outputs=100, condition_dim=16, width=64, depth=1)
    parameters = sum(p.numel() for p in small.parameters())
    mib = fused_module.member_memory_mib(base, small)
    assert mib * 2**20 >= 4 * 8 * parameters  # at least eight float32 copies of its weights
    assert fused_module.member_memory_mib(base, wide) > mib
    bigger_batch = config("train.batch_size=4096")
    assert fused_module.member_memory_mib(bigger_batch, small) > mib


def test_pack_groups_split_consecutively_and_refuse_a_member_above_the_limit():
    assert fused_module.pack_groups(10.0, 5, None) == [range(5)]
    assert fused_module.pack_groups(10.0, 5, 25.0) == [range(0, 2), range(2, 4), range(4, 5)]
    assert fused_module.pack_groups(10.0, 3, 1000.0) == [range(3)]
    with pytest.raises(ConfigError, match=r"one fused member needs about 10 MiB.*limit of 5 MiB"):
        fused_module.pack_groups(10.0, 3, 5.0)


def test_a_member_that_is_done_gets_its_results_while_the_others_train(stage1, tmp_path):
    outs = [tmp_path / str(index) for index in range(len(MEMBERS))]
    seen = []

    def on_epoch(index, record):
        if index == 2 and record["epoch"] == 3:  # only member 2 trains a third epoch
            seen.append([(out / "results.json").is_file() for out in outs])

    train_fused([config(*extra) for extra in MEMBERS], outs, stage1, callback=on_epoch)
    assert seen == [[True, True, False]]
    assert all((out / "results.json").is_file() for out in outs)


def test_bf16_members_follow_their_lone_bf16_twins(tmp_path, monkeypatch):
    """train.mixed_precision=bf16 fuses: the training forward runs under autocast as a lone run's
    does. Batched and single bf16 GEMMs may round differently, so curves are close, not equal;
    fp16 (a loss scaler per member) is refused."""
    bf16 = "train.mixed_precision=bf16"
    train(config(bf16, "train.stage2_epochs=0"), tmp_path / "stage1", progress=False)
    checkpoint = tmp_path / "stage1" / "checkpoints" / "last.pt"
    members = [config(bf16, *extra) for extra in MEMBERS[:2]]
    for index, member in enumerate(members):
        train(member, tmp_path / "lone" / str(index), stage1_checkpoint=checkpoint, progress=False)
    precisions, accelerator = [], fused_module.Accelerator

    def recording(*args, **kwargs):
        made = accelerator(*args, **kwargs)
        precisions.append(made.mixed_precision)
        return made

    monkeypatch.setattr(fused_module, "Accelerator", recording)
    outs = [tmp_path / "fused" / str(index) for index in range(len(members))]
    results = train_fused(members, outs, checkpoint)
    assert not any(isinstance(result, BaseException) for result in results)
    for index, out in enumerate(outs):
        fused_curve, lone_curve = _records(out), _records(tmp_path / "lone" / str(index))
        assert [r["epoch"] for r in fused_curve] == [r["epoch"] for r in lone_curve]
        for fused_record, lone_record in zip(fused_curve, lone_curve, strict=True):
            assert fused_record["loss"] == pytest.approx(lone_record["loss"], rel=0.05)
        fused_test = _results(out)["test"]["clean"]
        lone_test = _results(tmp_path / "lone" / str(index))["test"]["clean"]
        assert fused_test["mrr"] == pytest.approx(lone_test["mrr"], abs=0.02)
    assert precisions == ["bf16"]

    with pytest.raises(ConfigError, match="mixed_precision"):
        train_fused(
            [config("train.mixed_precision=fp16", *MEMBERS[0])], [tmp_path / "x"], checkpoint
        )
