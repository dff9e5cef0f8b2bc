"""The trainer end to end at smoke size: results, determinism, kill-and-resume, NaN, bad checkpoints."""

import json
import random

import numpy as np
import pytest
import torch

import runstore as store
from core.config import load_config
from core.features import image as image_module
from core.model.diffusioncom import DiffusionCom
from core.train import trainer as trainer_module
from core.train.checkpoint import CheckpointError
from core.train.trainer import NonFiniteLossError, train
from diffcom.cli import main
from tests.smoke import SMOKE as SMOKE_RUN

SMOKE = [*SMOKE_RUN, "seed=3"]


def smoke_config(*extra):
    return load_config(overrides=[*SMOKE, *extra])


class Stop(Exception):
    pass


def train_until_interrupted(config, out, epochs: int = 1) -> None:
    """Train until ``epochs`` epoch records were reported, then stop as a kill would."""
    seen = []

    def stop(record):
        seen.append(record)
        if len(seen) == epochs:
            raise Stop

    with pytest.raises(Stop):
        train(config, out, callback=stop, progress=False)


def test_run_writes_results_under_both_protocols(tmp_path):
    results = train(smoke_config(), tmp_path / "run", progress=False)
    run = tmp_path / "run"
    assert json.loads((run / "config.json").read_text())["diffusion"]["steps"] == 5
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [(r["stage"], r["epoch"]) for r in records] == [(1, 1), (1, 2), (2, 1), (2, 2)]
    assert all("valid.clean.mrr" in r for r in records)
    # Stage 2's best epoch is the one whose valid MRR is highest in the log.
    stage2 = [r for r in records if r["stage"] == 2]
    best = max(stage2, key=lambda r: r["valid.clean.mrr"])
    assert results["best_epochs"]["stage2"] == best["epoch"]
    assert results["valid"]["clean"] == pytest.approx(
        {k.removeprefix("valid.clean."): v for k, v in best.items() if k.startswith("valid.clean.")}
    )
    for split in ("valid", "test"):
        clean = results[split]["clean"]
        # The reported metrics are those of the saved per-query ranks (realistic ties).
        ranks = np.load(run / f"ranks_{split}.npz")["realistic"]
        assert clean["mr"] == pytest.approx(ranks.mean())
        assert clean["mrr"] == pytest.approx(np.mean(1 / ranks))
        for k in (1, 3, 10):
            assert clean[f"hits@{k}"] == pytest.approx(np.mean(ranks <= k))
        assert "official-min-of-2" in results[split]
        assert "stage1_clean" in results[split]
        assert results[split]["clean"]["mrr"] != results[split]["stage1_clean"]["mrr"]
    ranks = np.load(run / "ranks_test.npz")
    assert ranks["realistic"].shape == (2 * 201,) and len(ranks["queries"]) == 2 * 201
    on_disk = json.loads((run / "results.json").read_text())
    assert on_disk == {"format_version": store.RESULTS.version, **results}


def test_official_protocol_keeps_the_best_of_its_passes_per_query():
    """min-of-2 ranks are at most the first pass's, which is the min-of-1 pass (same seed)."""
    from core.train.trainer import build_model, evaluate_official

    one_pass = smoke_config("eval.official_samples=1")
    graph = trainer_module.load_run_dataset(one_pass)
    torch.manual_seed(0)
    model = build_model(one_pass, graph, progress=False)
    # A non-zero denoiser, so that the noise of each pass reaches the scores.
    torch.nn.init.normal_(model.denoiser.output.weight, std=0.5)
    single = evaluate_official(model, graph, "valid", one_pass).ranks.get("realistic")
    two = smoke_config("eval.official_samples=2")
    best_of_two = evaluate_official(model, graph, "valid", two).ranks.get("realistic")
    assert torch.all(best_of_two <= single)
    assert torch.any(best_of_two < single)


def test_stage2_selection_keeps_stage1_when_stage2_is_worse(tmp_path, monkeypatch):
    """With include-stage1 the final model is never worse on valid than its own stage 1."""
    # A stage 2 that reverses its extractor's ranking loses to it on valid at every epoch.
    real_scores = DiffusionCom.scores
    monkeypatch.setattr(
        DiffusionCom, "scores", lambda self, *args, **kwargs: -real_scores(self, *args, **kwargs)
    )
    kept = train(
        smoke_config("train.stage2_selection=include-stage1"), tmp_path / "kept", progress=False
    )
    selection = kept["selection"]
    assert kept["final_stage"] == 1 and kept["best_epochs"]["stage2"] == 0
    assert selection["rule"] == "include-stage1" and selection["selected"] == "stage1"
    assert selection["valid_mrr_stage2_best"] < selection["valid_mrr_stage1"] - 0.1
    assert kept["valid"]["clean"]["mrr"] == pytest.approx(selection["valid_mrr_stage1"])
    for split in ("valid", "test"):
        assert kept[split]["clean"] == kept[split]["stage1_clean"]
        assert "official-min-of-2" not in kept[split]  # no stage-2 model was kept to sample from
    # stage2-only keeps stage 2's best epoch whatever it scores: the diffusion stage's own effect.
    forced = train(smoke_config(), tmp_path / "forced", progress=False)
    assert forced["final_stage"] == 2 and forced["selection"]["selected"] == "stage2"
    stage2_records = [
        json.loads(line)
        for line in (tmp_path / "forced" / "metrics.jsonl").read_text().splitlines()
        if json.loads(line)["stage"] == 2
    ]
    best = max(stage2_records, key=lambda record: record["valid.clean.mrr"])
    assert forced["best_epochs"]["stage2"] == best["epoch"]
    assert forced["valid"]["clean"]["mrr"] == pytest.approx(
        forced["selection"]["valid_mrr_stage2_best"]
    )
    assert forced["valid"]["clean"]["mrr"] < forced["valid"]["stage1_clean"]["mrr"] - 0.1
    assert forced["valid"]["stage1_clean"] == kept["valid"]["stage1_clean"]  # the same stage 1


def test_stage2_selection_keeps_a_better_stage2(tmp_path, monkeypatch):
    """When stage 2 beats its start on valid, include-stage1 keeps stage 2's best epoch."""

    real_scores = DiffusionCom.scores

    def sharpened_truth(self, heads, relations, **kwargs):
        # Stage 2 "knows" the filtered answers of every split: better than stage 1 by far.
        scores = real_scores(self, heads, relations, **kwargs)
        answers = graph.all_answers().multi_hot(heads.cpu(), relations.cpu()).to(scores.device)
        return scores + 100 * answers

    graph = trainer_module.load_run_dataset(smoke_config())
    monkeypatch.setattr(DiffusionCom, "scores", sharpened_truth)
    results = train(
        smoke_config("train.stage2_selection=include-stage1"), tmp_path / "run", progress=False
    )
    assert results["final_stage"] == 2 and results["selection"]["selected"] == "stage2"
    assert results["valid"]["clean"]["mrr"] > results["valid"]["stage1_clean"]["mrr"]


def test_seeded_runs_are_identical(tmp_path):
    first = train(smoke_config(), tmp_path / "a", progress=False)
    second = train(smoke_config(), tmp_path / "b", progress=False)
    assert first["test"]["clean_all"] == second["test"]["clean_all"]
    assert first["valid"]["official-min-of-2"] == second["valid"]["official-min-of-2"]


ONE_EPOCH_EACH = [
    *SMOKE,
    "train.stage1_epochs=1",
    "train.stage2_epochs=1",
    "eval.report_official=false",
]
# The default image encoder (EfficientNet-Lite0) is loaded even for Nations, which has no
# images: building it draws random numbers, and only a feature-cache miss builds it.
WITH_ENCODER_LOADING = [s for s in ONE_EPOCH_EACH if not s.startswith("features.image_encoder")]


def _run_numbers(results: dict, run_dir) -> dict:
    """What a seed must fix: every metric and loss, without wall-clock timings."""
    records = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {
        "results": {
            split: {k: v for k, v in results[split].items() if k != "inference_ms_per_query"}
            for split in ("valid", "test")
        },
        "records": [{k: v for k, v in r.items() if k != "train_seconds"} for r in records],
    }


def test_a_cold_feature_cache_gives_the_same_run_as_a_warm_one(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    monkeypatch.setenv("DIFFCOM_CACHE_DIR", str(cache))
    config = load_config(overrides=WITH_ENCODER_LOADING)
    cold = train(config, tmp_path / "cold", progress=False)
    assert len(list(cache.rglob("features.safetensors"))) == 1  # this run computed its features

    def no_encoder(*args, **kwargs):
        raise AssertionError("the second run should read its features from the cache")

    monkeypatch.setattr(image_module, "load_image_encoder", no_encoder)
    warm = train(config, tmp_path / "warm", progress=False)
    assert _run_numbers(cold, tmp_path / "cold") == _run_numbers(warm, tmp_path / "warm")


def _drawing_first(function):
    """``function`` preceded by random draws from every global RNG, as other code could make."""

    def wrapped(*args, **kwargs):
        torch.rand(1000), random.random(), np.random.rand()
        return function(*args, **kwargs)

    return wrapped


def test_the_seed_alone_fixes_the_run_whatever_else_drew_random_numbers(tmp_path, monkeypatch):
    """A reused sweep worker, or any set-up step, may consume the global RNGs before a trial."""
    config = load_config(overrides=ONE_EPOCH_EACH)
    reference = train(config, tmp_path / "reference", progress=False)
    _drawing_first(lambda: None)()  # another trial ran in this process
    after_other_work = train(config, tmp_path / "after", progress=False)
    # Draws between the start of a run and its model construction, and before its training.
    monkeypatch.setattr(
        trainer_module, "load_run_dataset", _drawing_first(trainer_module.load_run_dataset)
    )
    monkeypatch.setattr(
        trainer_module, "training_split", _drawing_first(trainer_module.training_split)
    )
    during_set_up = train(config, tmp_path / "during", progress=False)
    expected = _run_numbers(reference, tmp_path / "reference")
    assert _run_numbers(after_other_work, tmp_path / "after") == expected
    assert _run_numbers(during_set_up, tmp_path / "during") == expected


def test_kill_and_resume_matches_an_uninterrupted_run(tmp_path):
    uninterrupted = train(smoke_config(), tmp_path / "full", progress=False)
    # After stage 1 (two epochs) and one epoch of stage 2.
    train_until_interrupted(smoke_config(), tmp_path / "killed", epochs=3)
    assert not (tmp_path / "killed" / "results.json").exists()
    # A kill between an epoch's record and its checkpoint leaves a record the checkpoint lacks.
    with (tmp_path / "killed" / "metrics.jsonl").open("a") as stream:
        stream.write(json.dumps({"stage": 2, "epoch": 2, "loss": 0.0}) + "\n")
        stream.write('{"stage": 2, "epoch": 3, "lo')  # and a record the kill cut short
    resumed = train(smoke_config(), tmp_path / "killed", progress=False)
    assert resumed["test"]["clean_all"] == uninterrupted["test"]["clean_all"]
    lines = (tmp_path / "killed" / "metrics.jsonl").read_text().splitlines()
    full_lines = (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()
    strip = [{k: v for k, v in json.loads(x).items() if k != "train_seconds"} for x in lines]
    full = [{k: v for k, v in json.loads(x).items() if k != "train_seconds"} for x in full_lines]
    assert strip == full
    # The reported training time covers the epochs before the kill too.
    epoch_seconds = sum(json.loads(x)["train_seconds"] for x in lines)
    assert resumed["timings"]["train_seconds"] >= epoch_seconds


def test_cpu_seconds_cover_the_attempts_before_a_resume(tmp_path):
    """A study gives a baseline the CPU time its reference run took: a resumed reference run
    must count the CPU its earlier attempt spent up to its last checkpoint, once."""
    import time

    from core.train.checkpoint import load_checkpoint

    out = tmp_path / "run"
    train_until_interrupted(smoke_config(), out, epochs=4)  # every epoch, then the "kill"
    before = load_checkpoint(out / "checkpoints" / "last.pt")["cpu_seconds"]
    assert before > 0
    started = time.process_time()
    resumed = train(smoke_config(), out, progress=False)  # set-up and the final evaluation only
    this_call = time.process_time() - started
    assert before <= resumed["timings"]["cpu_seconds"] <= before + this_call + 0.01


def _plateau_config(*extra):
    # A learning rate so small that no valid rank moves: with patience 1 every epoch after the
    # first is a plateau.
    return smoke_config(
        "train.lr_stage1=1e-9",
        "train.stage1_epochs=6",
        "train.stage2_epochs=0",
        "train.patience=1",
        "train.plateau_decays=2",
        "train.plateau_lr_factor=0.5",
        *extra,
    )


def test_a_plateau_restarts_stage1_from_its_best_weights_at_a_lower_rate(tmp_path):
    records = []
    train(_plateau_config(), tmp_path / "run", callback=records.append, progress=False)
    stage1 = [r for r in records if r["stage"] == 1]
    decays = [(r["epoch"], r["plateau_decay"]) for r in stage1 if "plateau_decay" in r]
    stops = [r["epoch"] for r in stage1 if r.get("early_stopped")]
    # Every time patience runs out a decay comes first; the third time, the stage stops.
    assert [n for _, n in decays] == [1, 2][: len(decays)]
    if len(decays) == 2:
        assert stops and stops[0] > decays[1][0]
    assert decays, "patience 1 over 6 epochs must run out at least once"
    # The epoch after a decay trains at plateau_lr_factor of the rate the schedule would give.
    undecayed = []
    train(
        _plateau_config("train.plateau_decays=0", "train.patience=0"),
        tmp_path / "plain",
        callback=undecayed.append,
        progress=False,
    )
    first_decay = decays[0][0]
    after = next(r for r in stage1 if r["epoch"] == first_decay + 1)
    plain = next(r for r in undecayed if r["stage"] == 1 and r["epoch"] == first_decay + 1)
    assert after["lr"] == pytest.approx(0.5 * plain["lr"], rel=1e-6)
    # It restarts from the best weights: their valid MRR is the best so far, so the epoch after
    # the decay starts where the best epoch was (one epoch of training at a lower rate away).
    best_before = max(r["valid.clean.mrr"] for r in stage1 if r["epoch"] <= first_decay)
    assert after["valid.clean.mrr"] >= best_before - 0.05


def test_kill_and_resume_across_a_plateau_decay_matches_an_uninterrupted_run(tmp_path):
    uninterrupted = []
    full = train(
        _plateau_config(), tmp_path / "full", callback=uninterrupted.append, progress=False
    )
    first_decay = next(r["epoch"] for r in uninterrupted if "plateau_decay" in r)
    train_until_interrupted(_plateau_config(), tmp_path / "killed", epochs=first_decay)
    resumed = train(_plateau_config(), tmp_path / "killed", progress=False)
    assert resumed["test"]["clean_all"] == full["test"]["clean_all"]
    strip = lambda path: [  # noqa: E731
        {k: v for k, v in json.loads(x).items() if k != "train_seconds"}
        for x in (path / "metrics.jsonl").read_text().splitlines()
    ]
    assert strip(tmp_path / "killed") == strip(tmp_path / "full")


def test_a_run_killed_before_its_first_checkpoint_restarts_with_a_clean_log(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    # What such a kill leaves: a record (and a cut one) but no checkpoint to resume from.
    (out / "metrics.jsonl").write_text(
        json.dumps({"stage": 1, "epoch": 1, "loss": 9.0}) + '\n{"stage": 1, "ep'
    )
    train(smoke_config(), out, progress=False)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [(r["stage"], r["epoch"]) for r in records] == [(1, 1), (1, 2), (2, 1), (2, 2)]
    assert records[0]["loss"] != 9.0


def test_a_checkpoint_without_a_newer_config_key_still_resumes(tmp_path):
    """A key added to the config after a checkpoint was written counts as its default."""
    from core.train.checkpoint import load_checkpoint, save_checkpoint

    train_until_interrupted(smoke_config(), tmp_path / "run")
    last = tmp_path / "run" / "checkpoints" / "last.pt"
    state = load_checkpoint(last)
    del state["config"]["train"]["query_cache_mib"]  # as written before the key existed
    save_checkpoint(state, last)
    resumed = train(smoke_config(), tmp_path / "run", progress=False)
    assert resumed["final_stage"] == 2
    with pytest.raises(CheckpointError, match=r"train\.query_cache_mib: checkpoint 4096 vs now 1"):
        train(smoke_config("train.query_cache_mib=1"), tmp_path / "run", progress=False)


def test_query_cache_bound_changes_speed_not_results(tmp_path, capsys):
    cached = train(smoke_config(), tmp_path / "cached", progress=False)
    assert "query cache would take" not in capsys.readouterr().out
    uncached = train(smoke_config("train.query_cache_mib=0"), tmp_path / "uncached", progress=False)
    assert "re-encoded at every use" in capsys.readouterr().out
    for split in ("valid", "test"):
        assert uncached[split]["clean_all"] == pytest.approx(cached[split]["clean_all"], abs=1e-9)
        assert uncached[split]["official-min-of-2"] == pytest.approx(
            cached[split]["official-min-of-2"], abs=1e-9
        )


def test_query_cache_size_counts_distinct_queries_of_every_split():
    graph = trainer_module.load_run_dataset(smoke_config())
    queries = torch.cat([graph.queries(s)[:, :2] for s in ("train", "valid", "test")])
    distinct = len({tuple(q) for q in queries.tolist()})
    assert trainer_module.query_cache_mib(graph, 64) == distinct * 2 * 64 * 4 / 2**20


def test_stage2_only_run_from_a_stage1_checkpoint(tmp_path):
    train(smoke_config(), tmp_path / "first", progress=False)
    reused = train(
        smoke_config("diffusion.steps=3"),
        tmp_path / "second",
        stage1_checkpoint=tmp_path / "first" / "checkpoints" / "last.pt",
        progress=False,
    )
    records = (tmp_path / "second" / "metrics.jsonl").read_text().splitlines()
    assert {json.loads(r)["stage"] for r in records} == {2}
    assert reused["final_stage"] == 2
    with pytest.raises(
        CheckpointError, match=r"stage 1 was trained with another model\.hidden_dim \(32 there, 16"
    ):
        train(
            smoke_config("model.hidden_dim=16"),
            tmp_path / "third",
            stage1_checkpoint=tmp_path / "first" / "checkpoints" / "last.pt",
            progress=False,
        )
    # Early stopping chooses which stage-1 weights are kept, so it is part of stage 1 too.
    with pytest.raises(CheckpointError, match=r"another train\.patience"):
        train(
            smoke_config("train.patience=1"),
            tmp_path / "fourth",
            stage1_checkpoint=tmp_path / "first" / "checkpoints" / "last.pt",
            progress=False,
        )


def test_nan_loss_stops_with_a_clear_error(tmp_path, monkeypatch):
    def nan_loss(scores, labels):
        return (scores * float("nan")).mean()

    monkeypatch.setattr(trainer_module.F, "binary_cross_entropy_with_logits", nan_loss)
    with pytest.raises(NonFiniteLossError, match=r"stage 1, epoch 1, batch 1: loss is nan"):
        train(smoke_config(), tmp_path / "nan", progress=False)


class _NotATensor:
    """Something ``weights_only`` loading refuses to unpickle."""


def test_truncated_and_foreign_checkpoints_are_named(tmp_path):
    from core.train.checkpoint import load_checkpoint, save_checkpoint

    train_until_interrupted(smoke_config(), tmp_path / "run")
    last = tmp_path / "run" / "checkpoints" / "last.pt"
    written = last.read_bytes()
    with pytest.raises(
        CheckpointError, match=r"last\.pt: belongs to another config; diffusion\.steps"
    ):
        train(smoke_config("diffusion.steps=7"), tmp_path / "run", progress=False)

    metrics = tmp_path / "run" / "metrics.jsonl"
    with metrics.open("a") as stream:
        stream.write("[1, 2, 3]\n")  # valid JSON, but not an epoch record
    with pytest.raises(
        CheckpointError, match=r"metrics\.jsonl:2: expected an epoch record .*found \[1, 2, 3\]"
    ):
        train(smoke_config(), tmp_path / "run", progress=False)
    metrics.write_text(metrics.read_text().splitlines()[0] + "\n")

    state = load_checkpoint(last)
    del state["model"]
    save_checkpoint(state, last)
    with pytest.raises(CheckpointError, match=r"last\.pt: .*'model' entry should hold the model"):
        train(smoke_config(), tmp_path / "run", progress=False)
    torch.save([state["config"]], last)
    with pytest.raises(CheckpointError, match=r"last\.pt: not a diffcom checkpoint: .* a list"):
        train(smoke_config(), tmp_path / "run", progress=False)
    # torch's own message advises loading with weights_only=False, which runs the file's code.
    torch.save({**state, "model": _NotATensor()}, last)
    with pytest.raises(
        CheckpointError, match=r"last\.pt: not a checkpoint this project wrote"
    ) as error:
        train(smoke_config(), tmp_path / "run", progress=False)
    assert "weights_only" not in str(error.value)

    last.write_bytes(written[:1000])
    with pytest.raises(CheckpointError, match=r"last\.pt: not a readable checkpoint"):
        train(smoke_config(), tmp_path / "run", progress=False)


def test_train_command(tmp_path, capsys):
    argv = [
        "train",
        "--quiet",
        "--out",
        str(tmp_path / "cli"),
        *sum([["--set", s] for s in SMOKE], []),
    ]
    assert main([*argv, "--set", "diffusion.enabled=false"]) == 0
    out = capsys.readouterr().out
    assert "test (clean protocol): MRR" in out
    assert main([*argv, "--set", "diffusion.stepz=1"]) == 2
    assert "unknown key diffusion.stepz" in capsys.readouterr().err


@pytest.mark.torchrun
def test_two_process_run_on_cpu(tmp_path):
    """Two CPU processes (gloo) under torchrun: Accelerate shards batches, DDP syncs gradients."""
    import os
    import socket
    import subprocess
    import sys

    with socket.socket() as probe:  # a free port for the process group's rendezvous
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(port),
        "-m",
        "diffcom",
        "train",
        "--quiet",
        "--out",
        str(tmp_path / "two"),
        *sum([["--set", s] for s in SMOKE], []),
    ]
    finished = subprocess.run(
        command, capture_output=True, text=True, timeout=600, env=os.environ.copy()
    )
    assert finished.returncode == 0, finished.stderr[-3000:]
    assert finished.stdout.count("test (clean protocol)") == 1  # only the main process reports
    results = json.loads((tmp_path / "two" / "results.json").read_text())
    assert results["environment"]["processes"] == 2
    records = (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()
    assert len(records) == 4  # written once, by the main process
    # Each process ranked half of the test queries; the gathered ranks cover all of them, in the
    # split's order, and the reported metrics are computed from them.
    graph = trainer_module.load_run_dataset(smoke_config())
    ranks = np.load(tmp_path / "two" / "ranks_test.npz")
    assert np.array_equal(ranks["queries"], graph.queries("test").numpy())
    assert results["test"]["clean"]["mrr"] == pytest.approx(float(np.mean(1 / ranks["realistic"])))


def test_bf16_mixed_precision_on_cpu_and_fp16_refused(tmp_path):
    reference = train(smoke_config(), tmp_path / "reference", progress=False)
    results = train(smoke_config("train.mixed_precision=bf16"), tmp_path / "bf16", progress=False)
    # bf16 autocast really ran (the numbers moved) and trained the same model to within rounding:
    # on CPU the MRR moves by about 0.003.
    assert results["test"]["clean_all"] != reference["test"]["clean_all"]
    assert results["test"]["clean"]["mrr"] == pytest.approx(
        reference["test"]["clean"]["mrr"], abs=0.02
    )
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="fp16 needs a GPU"):
            train(smoke_config("train.mixed_precision=fp16"), tmp_path / "fp16", progress=False)
    # A plain run after a mixed-precision one in the same process is unaffected.
    again = train(smoke_config(), tmp_path / "plain", progress=False)
    assert again["test"]["clean_all"] == reference["test"]["clean_all"]


def test_extractor_bce_control_trains_the_extractor_alone_in_stage2(tmp_path):
    """The control for "more extractor training vs diffusion": stage 2 leaves the denoiser as
    initialised and continues the extractor with its stage-1 loss."""
    from core.train.checkpoint import load_checkpoint

    results = train(
        smoke_config("loss.stage2_objective=extractor-bce", "eval.report_official=true"),
        tmp_path / "control",
        progress=False,
    )
    state = load_checkpoint(tmp_path / "control" / "checkpoints" / "last.pt")
    weights, stage1 = state["best_stage2"], state["best_stage1"]
    assert torch.count_nonzero(weights["denoiser.output.weight"]) == 0  # never trained
    changed = [
        k for k in stage1 if k.startswith("extractor.") and not torch.equal(stage1[k], weights[k])
    ]
    assert "extractor.entity_embedding.weight" in changed
    records = [
        json.loads(x) for x in (tmp_path / "control" / "metrics.jsonl").read_text().splitlines()
    ]
    assert [r["kl"] for r in records if r["stage"] == 2] == [0.0, 0.0]
    # stage1_clean is the extractor before stage 2, not the one stage 2 trained.
    assert results["valid"]["stage1_clean"]["mrr"] == pytest.approx(
        results["selection"]["valid_mrr_stage1"]
    )
    assert results["valid"]["clean"]["mrr"] != results["valid"]["stage1_clean"]["mrr"]
    assert "official-min-of-2" not in results["test"]  # no diffusion to sample from


@pytest.mark.parametrize(
    "stage2", ["loss.stage2_extractor=frozen", "loss.stage2_extractor=finetune"]
)
def test_stage1_fallback_and_stage1_metrics_work_on_a_reused_stage1_without_denoiser(
    tmp_path, monkeypatch, stage2
):
    """A sweep's shared stage 1 is a stage-1-only run: its weights have no denoiser keys."""
    train(smoke_config("diffusion.enabled=false"), tmp_path / "stage1", progress=False)
    real_scores = DiffusionCom.scores
    monkeypatch.setattr(
        DiffusionCom, "scores", lambda self, *args, **kwargs: -real_scores(self, *args, **kwargs)
    )
    results = train(
        smoke_config("train.stage2_selection=include-stage1", stage2),
        tmp_path / "reused",
        stage1_checkpoint=tmp_path / "stage1" / "checkpoints" / "last.pt",
        progress=False,
    )
    stage1 = json.loads((tmp_path / "stage1" / "results.json").read_text())
    assert results["final_stage"] == 1
    # The selected model is exactly the reused stage 1, whatever stage 2 did to the extractor.
    assert results["test"]["clean_all"] == stage1["test"]["clean_all"]
