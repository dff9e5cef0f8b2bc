"""The ``diffcom`` command line: subcommands grouped by noun (``diffcom data check umls``)."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

__all__ = ["build_parser", "main"]


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

    from core.data.synthetic import SyntheticSpec, generate_synthetic

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


def _train(args: argparse.Namespace) -> int:
    from core.config import load_config
    from core.train.trainer import train

    overrides = [*args.set]
    if args.dataset:
        overrides.insert(0, f"data.dataset={args.dataset}")
    config = load_config(args.config, overrides)
    results = train(
        config, args.out, stage1_checkpoint=args.stage1_checkpoint, progress=not args.quiet
    )
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
    print(f"results: {Path(args.out).resolve() / 'results.json'}")
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


def build_parser() -> argparse.ArgumentParser:
    """The full argument parser; every command and subcommand has ``--help``."""
    parser = argparse.ArgumentParser(
        prog="diffcom",
        description="Train DiffusionCom, sweep and ablate it, and report the results.",
    )
    nouns = parser.add_subparsers(dest="noun", metavar="{data,train,sweep,report}", required=True)

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
    train.set_defaults(handler=_train)

    # One `diffcom` command for the whole project: the sweep and report commands live with their
    # packages (sweeps loads Ray only when a sweep starts; analysis never loads core or Ray).
    from analysis.cli import add_report_command
    from sweeps.cli import add_sweep_commands

    add_sweep_commands(nouns)
    add_report_command(nouns)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``diffcom`` console script; returns the exit status."""
    from core.data.files import DatasetError
    from core.train.checkpoint import CheckpointError
    from core.train.trainer import NonFiniteLossError

    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except (
        DatasetError,
        CheckpointError,
        NonFiniteLossError,
        ValueError,
        FileExistsError,
    ) as error:
        print(f"diffcom: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
