"""Datasets chosen by name: built-in graphs, generated synthetic graphs, or a folder on disk.

``load_dataset`` accepts
* ``nations``, ``umls``, ``kinships``: read from the pykeen wheel (no download);
* ``synthetic`` or ``synthetic:<preset>``: a seeded synthetic multimodal graph, generated once into
  the cache folder and read back through the MKGformer loader like any user dataset;
* a path to an MKGformer-layout folder (FB15k-237-IMG, WN18-IMG, or a generated graph).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

from core.data.builtin import BUILTIN_DATASETS, load_builtin
from core.data.files import DatasetError, path_problem, quote
from core.data.graph import KnowledgeGraph
from core.data.mkgformer import LoadOptions, load_mkgformer
from core.data.synthetic import SyntheticSpec, generate_synthetic
from core.paths import default_cache_dir

__all__ = ["dataset_names", "load_dataset", "synthetic_dataset_folder"]


def dataset_names() -> list[str]:
    """Names ``load_dataset`` accepts besides a folder path."""
    return [*sorted(BUILTIN_DATASETS), "synthetic", "synthetic:<preset>"]


def synthetic_dataset_folder(spec: SyntheticSpec, cache_dir: Path | None = None) -> Path:
    """Generate ``spec`` once under ``cache_dir/datasets`` and return its folder.

    The folder name carries a hash of the spec, so every run and trial asking for the same graph reads
    the same files. Generation goes to a temporary sibling folder that is renamed into place, so two
    processes asking at once never read a half-written graph.
    """
    cache_dir = Path(cache_dir) if cache_dir else default_cache_dir()
    spec_json = json.dumps(dataclasses.asdict(spec), sort_keys=True)
    key = hashlib.sha256(spec_json.encode()).hexdigest()[:12]
    folder = cache_dir / "datasets" / f"synthetic-{key}"
    if (folder / "synthetic.json").is_file():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}-"))
    try:
        generate_synthetic(spec, staging, overwrite=True)
        try:
            staging.rename(folder)
        except OSError:
            if not (folder / "synthetic.json").is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return folder


def load_dataset(
    name_or_path: str | Path,
    options: LoadOptions | None = None,
    cache_dir: Path | None = None,
) -> KnowledgeGraph:
    """Load a dataset by name or folder path (see the module docstring)."""
    cache_dir = Path(cache_dir) if cache_dir else default_cache_dir()
    if options is None:
        options = LoadOptions(cache_dir=str(cache_dir))
    text = str(name_or_path)
    if not text.strip():  # Path("") is the current directory: never what an empty name meant
        raise DatasetError(
            f"the dataset name is empty; expected one of {', '.join(dataset_names())} or a folder"
        )
    if text in BUILTIN_DATASETS:
        return load_builtin(text)
    if text == "synthetic" or text.startswith("synthetic:"):
        preset = text.partition(":")[2] or "small"
        try:
            spec = SyntheticSpec.preset(preset)
        except ValueError as error:
            raise DatasetError(f"dataset {text!r}: {error}") from None
        folder = synthetic_dataset_folder(spec, cache_dir)
        return load_mkgformer(folder, options, name=f"synthetic-{preset}")
    path = Path(text).expanduser()
    if path.is_dir():
        return load_mkgformer(path, options)
    if os.path.lexists(path):  # a file or a bad link where a folder was meant: say which
        problem = path_problem(path, folder=True) or "is not a folder"
        raise DatasetError(f"{path}: {problem} (a dataset folder)")
    raise DatasetError(
        f"dataset {quote(text)} is neither a known name ({', '.join(dataset_names())}) nor a folder"
    )
