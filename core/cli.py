"""The ``diffcom`` command line: subcommands grouped by noun (``diffcom data check umls``)."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import time
from pathlib import Path

import runstore as store

__all__ = ["add_core_commands"]


def _load_options(args: argparse.Namespace):
    from core.data.mkgformer import LoadOptions
    from core.paths import default_cache_dir

    cache_dir = Path(args.cache_dir) if args.cache_dir else default_cache_dir()
    options = LoadOptions(
        candidates=args.candidates,
        drop_unknown=args.drop_unknown,
        image_root=args.image_root,
        check_images=not args.no_image_check,
        cache_dir=str(cache_dir),
    )
    return options, cache_dir


def _data_check(args: argparse.Namespace) -> int:
    from core.data.check import dataset_statistics, format_statistics
    from core.data.registry import load_dataset

    options, cache_dir = _load_options(args)
    started = time.perf_counter()
    graph = load_dataset(args.dataset, options, cache_dir)
    statistics = dataset_statistics(graph)
    statistics["load_seconds"] = round(time.perf_counter() - started, 3)
    if args.json:
        print(json.dumps(statistics, indent=2, default=str))
    else:
        print(format_statistics(statistics))
        print(f"loaded in   {statistics['load_seconds']:.2f} s")
    return 0


#: SyntheticSpec fields that `diffcom data synth` can override (flag: field without "num_").
_SYNTH_OVERRIDES = (
    ("num_entities", int),
    ("num_relations", int),
    ("num_train", int),
    ("num_valid", int),
    ("num_test", int),
    ("images_per_entity", int),
    ("text_informativeness", float),
    ("image_informativeness", float),
    ("seed", int),
)


def _data_synth(args: argparse.Namespace) -> int:
    import dataclasses

    from core.data.files import DatasetError
    from core.data.synthetic import SyntheticSpec, generate_synthetic

    if not args.out.strip():
        # Path("") is the current directory: an empty argument (an unset shell variable) must not
        # write a dataset there.
        raise DatasetError("diffcom data synth: the output folder is empty; name a folder")
    spec = SyntheticSpec.preset(args.preset)
    overrides = {
        field: getattr(args, field)
        for field, _ in _SYNTH_OVERRIDES
        if getattr(args, field) is not None
    }
    spec = dataclasses.replace(spec, **overrides)
    started = time.perf_counter()
    folder = generate_synthetic(spec, Path(args.out), overwrite=args.overwrite)
    print(f"wrote {folder} in {time.perf_counter() - started:.1f} s")
    return 0


def _data_features(args: argparse.Namespace) -> int:
    from core.config import load_config
    from core.data.registry import load_dataset
    from core.features import extract_features
    from core.train.trainer import feature_settings

    options, cache_dir = _load_options(args)
    config = load_config(args.config, [f"data.dataset={args.dataset}", *args.set])
    graph = load_dataset(args.dataset, options, cache_dir)
    started = time.perf_counter()
    features = extract_features(graph, feature_settings(config), cache_dir / "features")
    source = "cache hit" if features.from_cache else "computed"
    print(
        f"{graph.name}: text {tuple(features.text.shape)} ({features.text_encoder}), image "
        f"{tuple(features.image.shape)} ({features.image_encoder}); {source} in "
        f"{time.perf_counter() - started:.1f} s\n  {features.cache_path}"
    )
    return 0


#: What a run folder holds once ``train`` wrote into it (``config.json`` is checked on its own).
_RUN_ENTRIES = (store.METRICS.file, store.CHECKPOINT_DIR, store.RESULTS.file)
#: Sections of the ``config.json`` that ``train`` writes (``core.config.save_config``).
_RUN_CONFIG_SECTIONS = ("data", "model", "train")


def _is_run_config(path: Path) -> bool:
    try:
        saved = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError):
        return False
    return isinstance(saved, dict) and all(
        isinstance(saved.get(section), dict) for section in _RUN_CONFIG_SECTIONS
    )


def _check_out_folder(out: Path) -> None:
    """Refuse an ``--out`` that holds something other than a run: training writes its
    ``config.json`` there, over any file of that name. A run folder (to resume) and an empty or
    missing folder pass."""
    if not out.exists():
        return
    if not out.is_dir():
        raise FileExistsError(f"--out {out}: exists and is not a folder")
    entries = sorted(entry.name for entry in out.iterdir())
    if not entries:
        return
    if any((out / name).exists() for name in _RUN_ENTRIES) or _is_run_config(
        out / store.CONFIG.file
    ):
        return
    shown = ", ".join(entries[:5]) + (f" and {len(entries) - 5} more" if len(entries) > 5 else "")
    raise FileExistsError(
        f"--out {out}: not empty and not a diffcom run (it holds {shown}; a run has config.json "
        f"written by diffcom train, metrics.jsonl or checkpoints/); choose an empty or new folder, "
        f"or pass --force to train there anyway"
    )


def _train(args: argparse.Namespace) -> int:
    from core.config import load_config
    from core.train.trainer import train

    overrides = [*args.set]
    if args.dataset:
        overrides.insert(0, f"data.dataset={args.dataset}")
    # The config is checked before --out is looked at, so a refused run leaves no folder behind.
    config = load_config(args.config, overrides)
    out = Path(args.out)
    if not args.force:
        _check_out_folder(out)
    created = not out.exists()
    try:
        results = train(
            config, out, stage1_checkpoint=args.stage1_checkpoint, progress=not args.quiet
        )
    except BaseException:
        # The trainer creates --out before it loads the dataset and checkpoints; a run they refuse
        # has written nothing yet, so the folder it created goes again.
        if created:  # rmdir fails on a folder the run wrote into, or one another rank removed
            with contextlib.suppress(OSError):
                out.rmdir()
        raise
    if os.environ.get("RANK", "0") != "0":  # a multi-process launch: the main process reports
        return 0
    test = results["test"]["clean"]
    print(
        f"{results['dataset']} test (clean protocol): MRR {test['mrr']:.4f}  Hits@1 {test['hits@1']:.4f}  "
        f"Hits@3 {test['hits@3']:.4f}  Hits@10 {test['hits@10']:.4f}  MR {test['mr']:.1f}"
    )
    for name, metrics in results["test"].items():
        if name.startswith("official"):
            print(
                f"  {name} (label-using, reported only): MRR {metrics['mrr']:.4f}  Hits@1 {metrics['hits@1']:.4f}"
            )
    print(f"results: {Path(args.out).resolve() / store.RESULTS.file}")
    return 0


def _add_config_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="YAML config file (sections: data, features, model, ...)")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="dotted override, e.g. --set diffusion.steps=20 (repeatable)",
    )


def _add_load_arguments(parser: argparse.ArgumentParser) -> None:
    from core.data.mkgformer import CANDIDATE_SETS

    parser.add_argument(
        "--candidates",
        choices=CANDIDATE_SETS,
        default="entities",
        help="candidate set for folders: entities.txt (default) or every entity of entity2text.txt, "
        "the official MKGformer pipeline's vocabulary (14,951 for FB15k-237)",
    )
    parser.add_argument(
        "--drop-unknown",
        action="store_true",
        help="drop dev/test triples with an entity or relation missing from the vocabularies "
        "(the count is reported) instead of failing",
    )
    parser.add_argument(
        "--image-root",
        help="folder of per-entity image folders (found next to the data by default)",
    )
    parser.add_argument(
        "--no-image-check", action="store_true", help="do not decode images to skip bad ones"
    )
    parser.add_argument(
        "--cache-dir", help="cache folder (default: $DIFFCOM_CACHE_DIR or ~/.cache/diffcom)"
    )


def add_core_commands(nouns) -> None:
    """Add ``data check|synth|features`` and ``train`` to the ``diffcom`` parser's subcommands.

    The ``diffcom`` command itself (``diffcom.cli``) joins these with the sweep and report commands;
    ``core`` stays below ``sweeps`` and ``analysis`` and imports neither.
    """
    data = nouns.add_parser("data", help="inspect, generate and featurise datasets")
    data_verbs = data.add_subparsers(dest="verb", metavar="{check,synth,features}", required=True)

    check = data_verbs.add_parser(
        "check",
        help="load a dataset and print counts, coverage and leakage",
        description="Load a dataset (a name: nations, umls, kinships, synthetic[:preset]; or an "
        "MKGformer-layout folder) and print counts, text and image coverage, skipped images and "
        "test leakage against train.",
    )
    check.add_argument("dataset", help="dataset name or folder")
    check.add_argument("--json", action="store_true", help="print the statistics as JSON")
    _add_load_arguments(check)
    check.set_defaults(handler=_data_check)

    synth = data_verbs.add_parser(
        "synth",
        help="write a synthetic multimodal graph in the MKGformer layout",
        description="Generate a seeded synthetic multimodal knowledge graph with PNG images, in the "
        "MKGformer folder layout, from a preset with optional overrides.",
    )
    synth.add_argument("out", help="output folder (must be empty or absent)")
    synth.add_argument(
        "--preset", default="small", help="small, fb15k-237-img or wn18-img (default: small)"
    )
    for field, kind in _SYNTH_OVERRIDES:
        synth.add_argument(
            "--" + field.removeprefix("num_").replace("_", "-"), dest=field, type=kind
        )
    synth.add_argument("--overwrite", action="store_true", help="replace the folder's contents")
    synth.set_defaults(handler=_data_synth)

    features = data_verbs.add_parser(
        "features",
        help="compute (or reuse) the cached frozen text and image features",
        description="Extract the frozen per-entity text and image features a config asks for, or "
        "report the cache entry that already holds them.",
    )
    features.add_argument("dataset", help="dataset name or folder")
    _add_config_arguments(features)
    _add_load_arguments(features)
    features.set_defaults(handler=_data_features)

    train = nouns.add_parser(
        "train",
        help="train and evaluate one DiffusionCom run",
        description="Train stage 1 (extractor) and stage 2 (denoiser), evaluate valid and test under "
        "the clean protocol (and the official min-of-S protocol, labelled), and write config.json, "
        "metrics.jsonl, checkpoints/ and results.json into --out. An interrupted run resumes when "
        "started again with the same --out.",
    )
    train.add_argument("--dataset", help="shortcut for --set data.dataset=NAME")
    _add_config_arguments(train)
    train.add_argument("--out", required=True, help="run directory")
    train.add_argument("--stage1-checkpoint", help="reuse the stage-1 extractor of this checkpoint")
    train.add_argument("--quiet", action="store_true", help="no progress bars")
    train.add_argument(
        "--force",
        action="store_true",
        help="train into --out even when it holds files but is not a run (its config.json is "
        "overwritten)",
    )
    train.set_defaults(handler=_train)
