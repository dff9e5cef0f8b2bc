"""Stage-2 (and stage-1) training throughput and peak memory against the number of entities.

Run from the repository root::

    .venv/bin/python benchmarks/bench_scale.py [--quick] [--sizes 1k,15k,41k]

Sizes are synthetic graphs from :class:`core.data.synthetic.SyntheticSpec` presets, without images
(``images_per_entity=0``):

* ``1k``: the ``fb15k-237-img`` preset shrunk to 1,000 entities (237 relations, triple counts
  scaled by 1000/14541);
* ``15k``: ``fb15k-237-img`` (14,541 entities, 237 relations, FB15k-237-IMG size);
* ``41k``: ``wn18-img`` (40,943 entities, 18 relations, WN18-IMG size).

Each graph is generated once into ``$DIFFCOM_CACHE_DIR/datasets`` (untimed). Feature extraction is
not what is measured, so the config says ``features.text_encoder=none`` and
``features.image_encoder=none`` and *random frozen features of the usual widths* are injected
instead: 384 (MiniLM) text and 1280 (EfficientNet-Lite0) image features for every entity, through
``build_model`` with ``core.train.trainer.extract_features`` replaced by a stub in the child
process. The model is the default :class:`~core.config.ExperimentConfig` (extractor width 256, two
transformer layers, MGAT over up to 32 neighbours) with a denoiser of width 1024 and depth 1,
K = 20 diffusion steps (DDPM chain, x0 target, full-entity diffusion), batch 128.

Every (size, stage) runs in a fresh subprocess, so that neither memory nor allocator state carries
over. The subprocess loads the graph, builds the model, fills the subgraph sampler's cache for all
training queries (as after the first epoch of a real run), then runs optimisation steps exactly as
``core.train.trainer`` does for that stage, on shuffled training queries:

* stage 2: extractor frozen (``requires_grad_(False)``, eval mode, ``freeze_entity_table(True)``:
  the entity table computed once and each query's encoding cached, filled beforehand for the
  queries of the measured steps as the trainer fills it for all training queries), ``model(heads,
  relations, labels, loss)`` = ``denoising_loss`` + backward + grad-norm clipping (1.0) + AdamW
  (denoiser parameters only); the cache's size for all training queries is reported apart;
* stage 1: extractor scores + BCE over all entities + backward + clipping + AdamW.

The first ``--warmup`` steps are not timed; the median of the timed per-step times gives
queries/s. Memory: resident set size (``psutil``) sampled every 2 ms by a thread during the timed
steps (peak), the RSS just before the steps, and the process's ``ru_maxrss`` high-water mark (the
whole subprocess: imports, data, model and steps). The time per query is compared with the entity
count: cost must grow no worse than linearly (time-per-query ratio ≤ entity ratio).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime, timezone
from pathlib import Path
from types import SimpleNamespace

os.environ.setdefault("DIFFCOM_CACHE_DIR", tempfile.mkdtemp(prefix="bench-scale-cache-"))

_REPO = Path(__file__).resolve().parents[1]
if str(_REPO) not in sys.path:
    sys.path.insert(0, str(_REPO))

TEXT_WIDTH = 384  # all-MiniLM-L6-v2
IMAGE_WIDTH = 1280  # EfficientNet-Lite0 pooled features
SIZES = ("1k", "15k", "41k")
_FB_ENTITIES = 14541


def _spec(size: str):
    from core.data.synthetic import SyntheticSpec

    if size == "15k":
        return SyntheticSpec.preset("fb15k-237-img", images_per_entity=0)
    if size == "41k":
        return SyntheticSpec.preset("wn18-img", images_per_entity=0)
    if size == "1k":
        scale = 1000 / _FB_ENTITIES
        spec = SyntheticSpec.preset(
            "fb15k-237-img",
            num_entities=1000,
            num_train=round(272115 * scale),
            num_valid=round(17535 * scale),
            num_test=round(20466 * scale),
            images_per_entity=0,
        )
        return dataclasses.replace(spec, name="synthetic-fb15k-237-img-1k")
    raise SystemExit(f"unknown size {size!r}; choose from {', '.join(SIZES)}")


def _overrides(args) -> list[str]:
    return [
        "features.text_encoder=none",
        "features.image_encoder=none",
        "diffusion.enabled=true",
        f"diffusion.steps={args.k}",
        f"diffusion.denoiser_width={args.width}",
        f"diffusion.denoiser_depth={args.depth}",
        f"train.batch_size={args.batch}",
        f"seed={args.seed}",
    ]


# ------------------------------------------------------------------------------ child process


class _PeakRSS:
    """Samples this process's RSS every ``interval`` seconds in a thread; keeps the maximum."""

    def __init__(self, interval: float = 0.002) -> None:
        import psutil

        self._process = psutil.Process()
        self._interval = interval
        self._stop = threading.Event()
        self.peak = self._process.memory_info().rss
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._process.memory_info().rss)
            time.sleep(self._interval)

    def __enter__(self) -> _PeakRSS:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._process.memory_info().rss)


def _child(args) -> None:
    import psutil
    import torch
    import torch.nn.functional as F

    import core.train.trainer as trainer
    from core.config import load_config
    from core.data.mkgformer import LoadOptions, load_mkgformer
    from core.data.registry import synthetic_dataset_folder

    if args.threads:
        torch.set_num_threads(args.threads)
    process = psutil.Process()
    rss_start = process.memory_info().rss
    folder = synthetic_dataset_folder(_spec(args.child))
    graph = load_mkgformer(folder, LoadOptions(check_images=False))
    config = load_config(None, [*_overrides(args), f"data.dataset={folder}"])

    generator = torch.Generator().manual_seed(args.seed)
    num_entities = graph.num_entities
    if args.features == "random":
        text = torch.nn.functional.normalize(
            torch.randn(num_entities, TEXT_WIDTH, generator=generator), dim=1
        )
        image = torch.randn(num_entities, IMAGE_WIDTH, generator=generator).abs()
        mask = torch.ones(num_entities, dtype=torch.bool)
    else:
        text = image = torch.zeros(num_entities, 0)
        mask = torch.zeros(num_entities, dtype=torch.bool)
    features = SimpleNamespace(text=text, text_mask=mask, image=image, image_mask=mask)
    trainer.extract_features = lambda graph, settings, progress=True: features
    model = trainer.build_model(config, graph, progress=False)
    rss_data_model = process.memory_info().rss

    queries = torch.unique(graph.queries("train")[:, :2], dim=0)
    sampler = model.extractor.sampler
    for chunk in queries.split(65536):  # as after one epoch: every training key is cached
        sampler.sample(chunk[:, 0], chunk[:, 1])
    order = queries[torch.randperm(len(queries), generator=generator)]
    total = args.warmup + args.steps
    batches = [order[i * args.batch : (i + 1) * args.batch] for i in range(total)]
    answers = graph.train_answers()
    smoothing = config.loss.label_smoothing

    cache_mib = 0.0
    if args.stage == 2:
        model.extractor.requires_grad_(False)
        model.train()
        model.extractor.eval()
        # As the trainer runs a frozen stage 2: the entity table computed once and every query
        # encoded once. After the first epoch the cache holds every training query; here it is
        # filled with the queries of the measured steps, and its full size is reported apart.
        model.extractor.freeze_entity_table(True)
        used = torch.cat(batches)
        model.extractor.warm_query_cache(used[:, 0], used[:, 1], args.batch)
        cache_mib = len(queries) * 2 * config.model.hidden_dim * 4 / 2**20
        parameters = [p for p in model.parameters() if p.requires_grad]
        lr = config.train.lr_stage2
    else:
        model.train()
        parameters = [p for p in model.extractor.parameters() if p.requires_grad]
        lr = config.train.lr_stage1
    optimizer = torch.optim.AdamW(parameters, lr=lr, weight_decay=config.train.weight_decay)

    def step(batch: torch.Tensor) -> float:
        labels = answers.multi_hot(batch[:, 0], batch[:, 1])
        labels = labels * (1.0 - smoothing) + smoothing / num_entities
        if args.stage == 2:
            loss = model(batch[:, 0], batch[:, 1], labels, config.loss)["loss"]
        else:
            scores = model.extractor(batch[:, 0], batch[:, 1]).scores
            loss = F.binary_cross_entropy_with_logits(scores, labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, config.train.max_grad_norm)
        optimizer.step()
        return loss.item()

    for batch in batches[: args.warmup]:
        step(batch)
    rss_before = process.memory_info().rss
    times, losses = [], []
    with _PeakRSS() as peak:
        for batch in batches[args.warmup :]:
            started = time.perf_counter()
            losses.append(step(batch))
            times.append(time.perf_counter() - started)
    denoiser = model.denoiser
    result = {
        "size": args.child,
        "stage": args.stage,
        "entities": num_entities,
        "relations": graph.num_relations,
        "train_triples": len(graph.train),
        "train_queries": len(queries),
        "threads": torch.get_num_threads(),
        "features": args.features,
        "trained_parameters": sum(p.numel() for p in parameters),
        "query_cache_mib_all_training_queries": round(cache_mib, 1),
        "denoiser_parameters": sum(p.numel() for p in denoiser.parameters()),
        "extractor_parameters": sum(p.numel() for p in model.extractor.parameters()),
        "step_seconds": times,
        "median_step_seconds": statistics.median(times),
        "losses": losses,
        "rss_start": rss_start,
        "rss_data_model": rss_data_model,
        "rss_before_steps": rss_before,
        "rss_peak_steps": peak.peak,
        "ru_maxrss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "loadavg": os.getloadavg(),
    }
    print("RESULT " + json.dumps(result), flush=True)


# ------------------------------------------------------------------------------ parent


def _run_child(size: str, stage: int, args) -> dict:
    command = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--child",
        size,
        "--stage",
        str(stage),
        "--steps",
        str(args.steps if stage == 2 else args.stage1_steps),
        "--warmup",
        str(args.warmup),
        "--features",
        args.features,
        "--k",
        str(args.k),
        "--width",
        str(args.width),
        "--depth",
        str(args.depth),
        "--batch",
        str(args.batch),
        "--seed",
        str(args.seed),
    ]
    if args.threads:
        command += ["--threads", str(args.threads)]
    started = time.perf_counter()
    completed = subprocess.run(command, capture_output=True, text=True, cwd=_REPO, check=False)
    if completed.returncode != 0:
        raise SystemExit(
            f"size {size} stage {stage} failed (exit {completed.returncode}):\n"
            f"{completed.stderr[-4000:]}"
        )
    line = next(x for x in completed.stdout.splitlines() if x.startswith("RESULT "))
    result = json.loads(line[len("RESULT ") :])
    result["wall_seconds"] = time.perf_counter() - started
    return result


def _mib(value: float) -> str:
    return f"{value / 2**20:,.0f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="1 warm-up and 2 timed steps")
    parser.add_argument("--sizes", default=",".join(SIZES), help=f"from {','.join(SIZES)}")
    parser.add_argument("--steps", type=int, default=None, help="timed stage-2 steps (default 20)")
    parser.add_argument(
        "--stage1-steps", type=int, default=None, help="timed stage-1 steps (default 8; 0 skips)"
    )
    parser.add_argument(
        "--warmup", type=int, default=None, help="untimed warm-up steps (default 3)"
    )
    parser.add_argument("--features", choices=("random", "none"), default="random")
    parser.add_argument("--k", type=int, default=20)
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--depth", type=int, default=1)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default torch's)")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--stage", type=int, default=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        _child(args)
        return
    args.steps = args.steps if args.steps is not None else (2 if args.quick else 20)
    args.stage1_steps = (
        args.stage1_steps if args.stage1_steps is not None else (2 if args.quick else 8)
    )
    args.warmup = args.warmup if args.warmup is not None else (1 if args.quick else 3)
    sizes = [s.strip() for s in args.sizes.split(",") if s.strip()]

    from core.data.registry import synthetic_dataset_folder

    print(
        f"# bench_scale: sizes={sizes}, stage-2 steps={args.steps}, stage-1 steps="
        f"{args.stage1_steps}, warm-up={args.warmup}, features={args.features}, K={args.k}, "
        f"denoiser {args.width}x{args.depth}, batch {args.batch}, threads="
        f"{args.threads or 'torch default'}, python {platform.python_version()}",
        flush=True,
    )
    for size in sizes:  # generate (untimed, cached) before any measurement
        started = time.perf_counter()
        folder = synthetic_dataset_folder(_spec(size))
        print(f"# {size}: {folder} ({time.perf_counter() - started:.1f}s)", flush=True)
    load_start = os.getloadavg()
    print(f"# start {datetime.now(timezone.utc):%Y-%m-%d %H:%M:%S} UTC, load {load_start}")

    results: dict[tuple[str, int], dict] = {}
    for size in sizes:
        for stage in (2, 1) if args.stage1_steps > 0 else (2,):
            result = _run_child(size, stage, args)
            results[size, stage] = result
            print(
                f"{size} stage {stage}: {result['entities']} entities, median step "
                f"{result['median_step_seconds']:.3f}s, peak RSS {_mib(result['rss_peak_steps'])}"
                f" MiB, ru_maxrss {_mib(result['ru_maxrss'])} MiB, wall "
                f"{result['wall_seconds']:.0f}s, load {result['loadavg']}"
                + (
                    f", query cache for all training queries "
                    f"{result['query_cache_mib_all_training_queries']:.0f} MiB"
                    if stage == 2
                    else ""
                ),
                flush=True,
            )
    load_end = os.getloadavg()
    print(
        f"\n# load {load_start} -> {load_end}; end {datetime.now(timezone.utc):%Y-%m-%d %H:%M:%S}"
        f" UTC; threads {results[sizes[0], 2]['threads']}\n"
    )

    base = results[sizes[0], 2]
    per_query = {s: results[s, 2]["median_step_seconds"] / args.batch for s in sizes}
    print(
        "| size | entities | relations | train queries | trained params | queries/s |"
        " s / 1k queries | step s (min–max) | time/query ×"
        f" {sizes[0]} | entities × {sizes[0]} | peak RSS (MiB) | peak − baseline (MiB) |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    linear_ok = True
    for stage in (2, 1):
        for size in sizes:
            r = results.get((size, stage))
            if r is None:
                continue
            entity_ratio = r["entities"] / base["entities"]
            time_ratio = r["median_step_seconds"] / results[sizes[0], stage]["median_step_seconds"]
            if stage == 2:
                linear_ok &= time_ratio <= entity_ratio
            steps = r["step_seconds"]
            print(
                f"| {size}, stage {stage} | {r['entities']:,} | {r['relations']} | "
                f"{r['train_queries']:,} | {r['trained_parameters'] / 1e6:.1f}M | "
                f"{args.batch / r['median_step_seconds']:,.1f} | "
                f"{1000 * r['median_step_seconds'] / args.batch:.2f} | "
                f"{r['median_step_seconds']:.2f} ({min(steps):.2f}–{max(steps):.2f}) | "
                f"{time_ratio:.2f} | {entity_ratio:.1f} | {_mib(r['rss_peak_steps'])} | "
                f"{_mib(r['rss_peak_steps'] - r['rss_start'])} |"
            )
    print(
        "\nbaseline = RSS of the child after importing torch and the project, before loading"
        f" data ({_mib(base['rss_start'])} MiB at {sizes[0]}); ru_maxrss equals the sampled peak"
        " within "
        + ", ".join(
            f"{abs(r['ru_maxrss'] - r['rss_peak_steps']) / 2**20:.0f}" for r in results.values()
        )
        + " MiB."
    )
    for a, b in zip(sizes, sizes[1:], strict=False):
        print(
            f"{a} -> {b}: entities × {results[b, 2]['entities'] / results[a, 2]['entities']:.2f}, "
            f"stage-2 time/query × {per_query[b] / per_query[a]:.2f}"
        )
    print(
        f"\nLinear-growth check (stage-2 time/query ratio ≤ entity ratio vs {sizes[0]}): ", end=""
    )
    print("MET" if linear_ok else "NOT MET")
    import torch

    if torch.cuda.is_available():
        print("GPU figures: not measured (this benchmark trains on the CPU).")
    else:
        print("GPU figures: pending (no GPU on this machine).")
    handle, name = tempfile.mkstemp(prefix="bench_scale-", suffix=".json")
    os.close(handle)
    out = Path(name)
    out.write_text(json.dumps({f"{s}/stage{t}": r for (s, t), r in results.items()}, indent=2))
    print(f"raw results: {out}")


if __name__ == "__main__":
    main()
