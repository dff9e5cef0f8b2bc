"""Fused trials without Ray: which runs pack together, and a pack's run folders, reports, failures
and restarts."""

import pytest

from core.config import load_config
from sweeps import pack as pack_module
from sweeps.experiment import read_json, read_statuses, write_json
from sweeps.pack import plan_packs, run_pack
from sweeps.stage1 import Stage1Store
from sweeps.trial import NON_FINITE, RunSpec, TrialFailed, run_trial
from tests.smoke import SMOKE

MEMBERS = {
    "sensitivity/k=3/seed-0": ["diffusion.steps=3"],
    "sensitivity/k=5/seed-0": ["diffusion.steps=5", "loss.w_kl=0.5"],
    "sensitivity/k=8/seed-0": ["diffusion.steps=8", "train.lr_stage2=3e-3"],
}


@pytest.fixture
def experiment(tmp_path):
    write_json(
        tmp_path / "experiment.json",
        {"name": "unit", "kind": "sensitivity", "metric": "valid.clean.mrr", "mode": "max"},
    )
    return tmp_path


def _specs():
    return [
        RunSpec(name, load_config(overrides=[*SMOKE, *extra])) for name, extra in MEMBERS.items()
    ]


def test_runs_pack_by_stage1_and_denoiser_shape_in_order():
    def config(*extra):
        return load_config(overrides=[*SMOKE, *extra])

    configs = {
        "a": config("diffusion.steps=3"),
        "alone": config("diffusion.enabled=false"),  # no stage 2: nothing to fuse
        "b": config("diffusion.steps=5"),
        "wide": config("diffusion.denoiser_width=64"),  # its own shape, and no one shares it
        "other-seed": config("seed=7"),  # another stage 1: no one shares it either
        "c": config("loss.w_kl=0.3"),
        "control": config("loss.stage2_objective=extractor-bce"),
        "d": config("train.lr_stage2=3e-3"),
        "e": config("diffusion.steps=8"),
    }
    assert plan_packs(configs, 8) == {"pack/0": ["a", "b", "c", "d", "e"]}
    assert plan_packs(configs, 1) == {}
    # Dealt in turn into as few packs as fit: each pack gets a share of the study's order (a
    # K axis, say) and sizes differ by one at most; 5 runs in packs of up to 4 are 3 + 2.
    assert plan_packs(configs, 4) == {"pack/0": ["a", "c", "e"], "pack/1": ["b", "d"]}
    # Packs of up to 2: three of them, the third ("c") a single run, which trains alone.
    assert plan_packs(configs, 2) == {"pack/0": ["a", "d"], "pack/1": ["b", "e"]}
    # Two trials at once: packs of up to ceil(7 fusable runs / 2) = 4 fill both slots.
    assert plan_packs(configs, 8, slots=2) == {"pack/0": ["a", "c", "e"], "pack/1": ["b", "d"]}


def test_a_pack_trains_every_member_in_its_own_folder(experiment):
    reports = []
    summary = run_pack(experiment, "pack/0", _specs(), reports.append, memory_limit_mib=1e6)
    names = list(MEMBERS)
    statuses = {s.name: s for s in read_statuses(experiment, "valid.clean.mrr")}
    assert set(statuses) == set(names)
    for name in names:
        status = read_json(experiment / "runs" / name / "status.json")
        assert status["state"] == "finished"
        assert status["fused"] == {"pack": "pack/0", "members": names}
        assert read_json(experiment / "runs" / name / "trial.json")["run"] == name
        assert (experiment / "runs" / name / "results.json").is_file()
        # Every member reported its stage-2 epochs, on the global epoch axis, and its final.
        own = [r for r in reports if r["run"] == name and not r.get("stage1_shared")]
        assert [(r["stage"], r["epoch"], r["global_epoch"]) for r in own[:-1]] == [
            (2, 1, 3),
            (2, 2, 4),
        ]
        assert own[-1]["final"]
    # One stage 1 for the pack, trained once.
    assert [e["event"] for e in Stage1Store(experiment / "stage1").events()] == [
        "training",
        "trained",
    ]
    assert summary["runs_finished"] == 3 and summary["final"]
    mrrs = [
        read_json(experiment / "runs" / n / "results.json")["valid"]["clean"]["mrr"] for n in names
    ]
    assert summary["valid.clean.mrr"] == pytest.approx(sum(mrrs) / 3)
    # Asked again (a restarted trial), finished members are read back, not retrained.
    reports.clear()
    run_pack(experiment, "pack/0", _specs(), reports.append, memory_limit_mib=1e6)
    assert reports == []


def test_a_member_equals_its_run_as_a_lone_trial(experiment, tmp_path_factory):
    lone = tmp_path_factory.mktemp("lone")
    write_json(lone / "experiment.json", read_json(experiment / "experiment.json"))
    run_pack(experiment, "pack/0", _specs(), lambda record: None, memory_limit_mib=1e6)
    for spec in _specs():
        run_trial(lone, spec.name, [spec], lambda record: None)
        fused = read_json(experiment / "runs" / spec.name / "results.json")["test"]["clean"]
        alone = read_json(lone / "runs" / spec.name / "results.json")["test"]["clean"]
        # Several intra-op threads may sum in another order: equal within float32 rounding
        # (tests/core/train/test_fused.py checks bitwise equality on one thread).
        assert fused == pytest.approx(alone, rel=1e-4, abs=1e-4)


def test_a_killed_pack_resumes_each_member_from_its_checkpoint(experiment):
    class Stop(Exception):
        pass

    def stop_after_first_stage2_epochs(record):
        if record.get("stage") == 2 and record["run"] == list(MEMBERS)[-1]:
            raise Stop  # every member has finished stage-2 epoch 1 (a pack steps them together)

    with pytest.raises(TrialFailed, match=r"3 of 3 members failed"):
        run_pack(
            experiment, "pack/0", _specs(), stop_after_first_stage2_epochs, memory_limit_mib=1e6
        )
    reports = []
    run_pack(experiment, "pack/0", _specs(), reports.append, memory_limit_mib=1e6)
    for name in MEMBERS:
        status = read_json(experiment / "runs" / name / "status.json")
        assert status["state"] == "finished"
        assert [a["resumed_from"] for a in status["attempts"]] == [None, [2, 1]]
        own = [(r["stage"], r["epoch"]) for r in reports if r["run"] == name and not r["final"]]
        assert own == [(2, 2)]


def test_a_non_finite_member_fails_alone_and_is_not_retried(experiment, monkeypatch):
    from core.train import fused as fused_module

    real_loss = fused_module.stage2_loss

    def nan_for_the_second_member(x0, x0_hat, targets, loss):
        parts = real_loss(x0, x0_hat, targets, loss)
        if loss.w_kl == 0.5:  # sensitivity/k=5 only
            parts["loss"] = parts["loss"] * float("nan")
        return parts

    monkeypatch.setattr(fused_module, "stage2_loss", nan_for_the_second_member)
    with pytest.raises(TrialFailed, match=r"1 of 3 members failed: sensitivity/k=5/seed-0"):
        run_pack(experiment, "pack/0", _specs(), lambda record: None, memory_limit_mib=1e6)
    states = {
        name: read_json(experiment / "runs" / name / "status.json")["state"] for name in MEMBERS
    }
    assert states == {
        "sensitivity/k=3/seed-0": "finished",
        "sensitivity/k=5/seed-0": "failed",
        "sensitivity/k=8/seed-0": "finished",
    }
    diverged = read_json(experiment / "runs" / "sensitivity/k=5/seed-0" / "status.json")
    assert diverged["failure"] == NON_FINITE

    def must_not_train(*args, **kwargs):
        raise AssertionError("the pack trained again")

    monkeypatch.setattr(pack_module, "train_fused", must_not_train)
    with pytest.raises(TrialFailed, match=r"not retried: it would repeat"):
        run_pack(experiment, "pack/0", _specs(), lambda record: None, memory_limit_mib=1e6)


def test_a_member_that_is_done_is_finished_while_the_others_train(experiment):
    specs = [
        RunSpec("ablation/short/seed-0", load_config(overrides=SMOKE)),
        RunSpec("ablation/long/seed-0", load_config(overrides=[*SMOKE, "train.stage2_epochs=3"])),
    ]
    seen = []

    def report(record):
        if record["run"] == "ablation/long/seed-0" and record.get("epoch") == 3:
            short = experiment / "runs" / "ablation/short/seed-0"
            seen.append(
                (
                    read_json(short / "status.json")["state"],
                    short.joinpath("results.json").is_file(),
                )
            )

    run_pack(experiment, "pack/0", specs, report, memory_limit_mib=1e6)
    assert seen == [("finished", True)]


def test_a_packs_memory_limit_is_a_share_of_what_the_node_has_free(monkeypatch):
    import psutil
    import torch

    class Memory:
        available = 16 * 2**30

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(psutil, "virtual_memory", lambda: Memory())
    monkeypatch.setattr(pack_module.os, "cpu_count", lambda: 8)
    # 0.8 of 16 GiB, over the 4 two-CPU trials the 8 cores hold at once.
    assert pack_module._memory_limit_mib({"cpus": 2}) == pytest.approx(0.8 * 16 * 1024 / 4)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda: (40 * 2**30, 80 * 2**30))
    # On a GPU: its free memory, over the trials sharing it (half a GPU each: two).
    assert pack_module._memory_limit_mib({"cpus": 2, "gpus": 0.5}) == pytest.approx(
        0.8 * 40 * 1024 / 2
    )
