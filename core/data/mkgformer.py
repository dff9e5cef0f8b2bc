"""Loader for FB15k-237-IMG and WN18-IMG in the on-disk layout MKGformer and DiffusionCom use.

A dataset folder holds ``train.tsv``, ``dev.tsv`` (or ``valid.tsv``), ``test.tsv`` (head, relation,
tail; tab separated; CRLF tolerated), ``entities.txt``, ``relations.txt``, ``entity2text.txt``
(id → short name), optionally ``entity2textlong.txt`` (long descriptions, preferred when present) and
``relation2text.txt``. Images live in one folder per entity: Freebase ``/m/0abc`` → ``m.0abc/``,
WordNet synset ``01234567`` → ``n01234567/``, under an image root that is found next to the dataset
(``images/``, ``../FB15k-images/``, ``../wn18-images/``) or named explicitly.

Candidate set: by default the entities of ``entities.txt`` (14,541 for FB15k-237-IMG). The official
MKGformer pipeline instead ranks over its entity-token vocabulary, which holds every entity of
``entity2text.txt`` (14,951 for FB15k-237, including entities that occur in no triple); choose it with
``candidates="entity2text"`` to reproduce that pipeline's numbers. The larger set only adds
never-correct candidates, so it can only make ranks worse.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from core.data.files import DatasetError, read_columns, read_id_list, read_id_texts
from core.data.graph import KnowledgeGraph
from core.data.images import IMAGE_SUFFIXES, SKIP_REASONS, ImageVerdictCache

__all__ = ["CANDIDATE_SETS", "LoadOptions", "entity_image_folder", "load_mkgformer"]

CANDIDATE_SETS = ("entities", "entity2text")
_SPLIT_FILES = {"train": ("train.tsv",), "valid": ("dev.tsv", "valid.tsv"), "test": ("test.tsv",)}
_IMAGE_ROOTS = ("images", "../FB15k-images", "../wn18-images", "FB15k-images", "wn18-images")


@dataclass(frozen=True)
class LoadOptions:
    """How to read an MKGformer-layout folder.

    Attributes:
        candidates: ``"entities"`` (``entities.txt``, default) or ``"entity2text"`` (the official
            pipeline's entity-token vocabulary).
        drop_unknown: drop dev/test triples whose entity or relation is not in the vocabularies
            (counted in the report) instead of failing.
        image_root: the folder holding one sub-folder per entity; found next to the data when unset.
        check_images: decode each image once to skip unreadable, black and 1-pixel files.
        cache_dir: where image check verdicts are remembered between loads (``None``: in memory).
    """

    candidates: str = "entities"
    drop_unknown: bool = False
    image_root: str | None = None
    check_images: bool = True
    cache_dir: str | None = None

    def __post_init__(self) -> None:
        if self.candidates not in CANDIDATE_SETS:
            raise DatasetError(
                f"candidates={self.candidates!r} is not a candidate set; "
                f"choose one of {', '.join(CANDIDATE_SETS)}"
            )


def entity_image_folder(entity: str) -> str:
    """Image folder name of an entity: ``/m/0abc`` → ``m.0abc``, ``01234567`` → ``n01234567``."""
    if entity.startswith("/m/"):
        return "m." + entity[3:]
    if entity.isdigit():
        return "n" + entity
    return entity.strip("/").replace("/", ".")


def _find_split(folder: Path, split: str) -> Path:
    for name in _SPLIT_FILES[split]:
        if (folder / name).is_file():
            return folder / name
    raise DatasetError(
        f"{folder}: no {split} split; expected one of {', '.join(_SPLIT_FILES[split])}"
    )


def _find_image_root(folder: Path, image_root: str | None) -> Path | None:
    if image_root is not None:
        root = Path(image_root).expanduser()
        if not root.is_dir():
            raise DatasetError(f"image_root {root} is not a folder")
        return root.resolve()
    for relative in _IMAGE_ROOTS:
        if (folder / relative).is_dir():
            return (folder / relative).resolve()
    return None


def _triples_to_ids(
    path: Path,
    entity_ids: dict[str, int],
    relation_ids: dict[str, int],
    drop_unknown: bool,
) -> tuple[torch.Tensor, int]:
    """Map a split file to an ``(n, 3)`` id tensor; returns it and the number of dropped triples."""
    ids, dropped = [], 0
    for number, (head, relation, tail) in read_columns(path, 3):
        unknown = [
            f"{kind} {value!r}"
            for kind, value, known in (
                ("entity", head, entity_ids),
                ("relation", relation, relation_ids),
                ("entity", tail, entity_ids),
            )
            if value not in known
        ]
        if unknown:
            if drop_unknown:
                dropped += 1
                continue
            raise DatasetError(
                f"{path}:{number}: unknown {' and '.join(unknown)} (not in entities.txt / "
                f"relations.txt); fix the file or load with drop_unknown to drop such triples"
            )
        ids.append((entity_ids[head], relation_ids[relation], entity_ids[tail]))
    if not ids:
        detail = f" ({dropped} dropped as unknown)" if dropped else ""
        raise DatasetError(f"{path}: the split is empty{detail}")
    return torch.tensor(ids, dtype=torch.long), dropped


def _entity_images(
    entities: list[str], image_root: Path | None, options: LoadOptions, report: dict
) -> tuple[tuple[Path, ...], ...]:
    skipped = dict.fromkeys(SKIP_REASONS, 0)
    report["image_root"] = str(image_root) if image_root else None
    report["skipped_images"] = skipped
    if image_root is None:
        report["entities_without_image_folder"] = len(entities)
        return tuple(() for _ in entities)
    folders = {entry.name for entry in os.scandir(image_root) if entry.is_dir()}
    verdicts = ImageVerdictCache(Path(options.cache_dir) if options.cache_dir else None, image_root)
    images, missing = [], 0
    for entity in entities:
        name = entity_image_folder(entity)
        if name not in folders:
            missing += 1
            images.append(())
            continue
        files = sorted(
            Path(entry.path)
            for entry in os.scandir(image_root / name)
            if entry.is_file() and Path(entry.name).suffix.lower() in IMAGE_SUFFIXES
        )
        if options.check_images:
            kept = []
            for path, verdict in zip(files, verdicts.verdicts(files), strict=True):
                if verdict == "ok":
                    kept.append(path)
                else:
                    skipped[verdict] += 1
            files = kept
        images.append(tuple(files))
    verdicts.save()
    report["entities_without_image_folder"] = missing
    return tuple(images)


def load_mkgformer(
    folder: str | Path, options: LoadOptions | None = None, name: str | None = None
) -> KnowledgeGraph:
    """Read an MKGformer-layout dataset folder into a :class:`KnowledgeGraph`.

    Raises:
        DatasetError: a missing file, a malformed line (file and line named), an unknown entity or
            relation in a split (unless ``drop_unknown`` for dev/test), or an empty split.
    """
    options = options or LoadOptions()
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise DatasetError(f"{folder}: dataset folder not found")
    folder = folder.resolve()
    entities = read_id_list(folder / "entities.txt")
    relations = read_id_list(folder / "relations.txt")
    if not entities:
        raise DatasetError(f"{folder / 'entities.txt'}: no entities")
    if not relations:
        raise DatasetError(f"{folder / 'relations.txt'}: no relations")

    short_texts = (
        read_id_texts(folder / "entity2text.txt") if (folder / "entity2text.txt").is_file() else {}
    )
    long_file = folder / "entity2textlong.txt"
    long_texts = read_id_texts(long_file) if long_file.is_file() else {}
    report: dict = {
        "text_file": long_file.name if long_texts else "entity2text.txt" if short_texts else None
    }

    num_listed = len(entities)
    if options.candidates == "entity2text":
        if not short_texts:
            raise DatasetError(f"{folder}: candidates='entity2text' needs entity2text.txt")
        listed = set(entities)
        entities += [entity for entity in short_texts if entity not in listed]
        candidates = torch.arange(len(entities))
    else:
        candidates = torch.arange(num_listed)
    report["entities_only_in_entity2text"] = len(entities) - num_listed

    entity_ids = {entity: index for index, entity in enumerate(entities[:num_listed])}
    relation_ids = {relation: index for index, relation in enumerate(relations)}
    splits, dropped = {}, {}
    for split in ("train", "valid", "test"):
        path = _find_split(folder, split)
        # Training facts define the graph: an unknown id there is always an error.
        drop = options.drop_unknown and split != "train"
        splits[split], dropped[split] = _triples_to_ids(path, entity_ids, relation_ids, drop)
    report["dropped_unknown"] = dropped

    relation_file = folder / "relation2text.txt"
    relation_texts = read_id_texts(relation_file) if relation_file.is_file() else {}
    entity_texts = tuple(long_texts.get(e) or short_texts.get(e, "") for e in entities)
    image_root = _find_image_root(folder, options.image_root)
    return KnowledgeGraph(
        name=name or folder.name,
        entities=tuple(entities),
        relations=tuple(relations),
        entity_texts=entity_texts,
        relation_texts=tuple(relation_texts.get(r, "") for r in relations),
        entity_images=_entity_images(entities, image_root, options, report),
        train=splits["train"],
        valid=splits["valid"],
        test=splits["test"],
        candidates=candidates,
        source=str(folder),
        report=report,
    )
