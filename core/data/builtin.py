"""The classic knowledge graphs that ship inside the pykeen wheel, read straight from its files.

``nations``, ``umls`` and ``kinships`` are headerless ``head<TAB>relation<TAB>tail`` files under
``pykeen/datasets/<name>/``. They are read without importing pykeen (whose import is slow and writes a
cache into the home folder) and without any download.
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import torch

from core.data.files import DatasetError, read_columns
from core.data.graph import KnowledgeGraph

__all__ = ["BUILTIN_DATASETS", "builtin_dataset_folder", "load_builtin"]

#: name → whether its identifiers are English words usable as entity text.
BUILTIN_DATASETS: dict[str, bool] = {"nations": True, "umls": True, "kinships": False}

_SPLIT_FILES = {"train": "train.txt", "valid": "valid.txt", "test": "test.txt"}


def builtin_dataset_folder(name: str) -> Path:
    """The folder inside the installed pykeen package that holds ``name``'s split files."""
    if name not in BUILTIN_DATASETS:
        raise DatasetError(
            f"unknown built-in dataset {name!r}; choose one of {', '.join(sorted(BUILTIN_DATASETS))}"
        )
    spec = importlib.util.find_spec("pykeen")
    if spec is None or not spec.submodule_search_locations:
        raise DatasetError(
            f"built-in dataset {name!r} needs the 'pykeen' package, which is not installed"
        )
    folder = Path(next(iter(spec.submodule_search_locations))) / "datasets" / name
    if not folder.is_dir():
        raise DatasetError(
            f"built-in dataset {name!r}: {folder} is missing from the pykeen install"
        )
    return folder


def _as_text(identifier: str) -> str:
    """``acquired_abnormality`` → ``acquired abnormality``; camel case is split too."""
    spaced = re.sub(r"(?<=[a-z])(?=[A-Z])", " ", identifier)
    return re.sub(r"[_\-]+", " ", spaced).strip().lower()


def load_builtin(name: str) -> KnowledgeGraph:
    """Load a pykeen-shipped dataset with vocabularies built from all three splits (sorted)."""
    folder = builtin_dataset_folder(name)
    rows = {
        split: [fields for _, fields in read_columns(folder / file, 3)]
        for split, file in _SPLIT_FILES.items()
    }
    entities = sorted(
        {row[i] for split_rows in rows.values() for row in split_rows for i in (0, 2)}
    )
    relations = sorted({row[1] for split_rows in rows.values() for row in split_rows})
    entity_ids = {entity: index for index, entity in enumerate(entities)}
    relation_ids = {relation: index for index, relation in enumerate(relations)}
    tensors = {
        split: torch.tensor(
            [(entity_ids[h], relation_ids[r], entity_ids[t]) for h, r, t in split_rows],
            dtype=torch.long,
        )
        for split, split_rows in rows.items()
    }
    words = BUILTIN_DATASETS[name]
    return KnowledgeGraph(
        name=name,
        entities=tuple(entities),
        relations=tuple(relations),
        entity_texts=tuple(_as_text(e) if words else "" for e in entities),
        relation_texts=tuple(_as_text(r) if words else "" for r in relations),
        entity_images=tuple(() for _ in entities),
        train=tensors["train"],
        valid=tensors["valid"],
        test=tensors["test"],
        candidates=torch.arange(len(entities)),
        source=str(folder),
    )
