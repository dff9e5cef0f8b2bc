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
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from core.data.files import (
    DatasetError,
    path_problem,
    quote,
    read_columns,
    read_id_list,
    read_id_texts,
)
from core.data.graph import KnowledgeGraph
from core.data.images import IMAGE_SUFFIXES, SKIP_REASONS, ImageVerdictCache

__all__ = ["CANDIDATE_SETS", "LoadOptions", "entity_image_folder", "load_mkgformer"]

CANDIDATE_SETS = ("entities", "entity2text")
_SPLIT_FILES = {"train": ("train.tsv",), "valid": ("dev.tsv", "valid.tsv"), "test": ("test.tsv",)}
_VOCABULARY_FILES = {"entity": "entities.txt", "relation": "relations.txt"}
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


def _present(path: Path) -> bool:
    """Whether anything, even a broken link or a folder, sits at ``path``.

    Optional files are read when present at all, so a folder or a link loop where a file belongs is
    reported by the reader instead of being skipped as if the file were absent.
    """
    return os.path.lexists(path)


def _find_split(folder: Path, split: str) -> Path:
    for name in _SPLIT_FILES[split]:
        if _present(folder / name):
            return folder / name
    raise DatasetError(
        f"{folder}: no {split} split; expected one of {', '.join(_SPLIT_FILES[split])}"
    )


def _find_image_root(folder: Path, image_root: str | None) -> Path | None:
    if image_root is not None:
        if not image_root.strip():
            raise DatasetError("image_root is empty; expected a folder of per-entity image folders")
        root = Path(image_root).expanduser()
        problem = path_problem(root, folder=True)
        if problem:
            raise DatasetError(f"image_root {root} is not a folder: {problem}")
        return root.resolve()
    for relative in _IMAGE_ROOTS:
        candidate = folder / relative
        if _present(candidate):
            problem = path_problem(candidate, folder=True)
            if problem:
                raise DatasetError(
                    f"{candidate}: {problem} of per-entity image folders (or pass image_root)"
                )
            return candidate.resolve()
    return None


def _triples_to_ids(
    path: Path,
    entity_ids: dict[str, int],
    relation_ids: dict[str, int],
    drop_unknown: bool,
    is_train: bool,
) -> tuple[torch.Tensor, int]:
    """Map a split file to an ``(n, 3)`` id tensor; returns it and the number of dropped triples.

    ``drop_unknown`` is ignored for the training split: training facts define the graph.
    """
    ids, dropped = [], 0
    drop_unknown = drop_unknown and not is_train
    if is_train:
        advice = "fix the file (drop_unknown does not apply here: training facts define the graph)"
    else:
        advice = "fix the file or load with drop_unknown (--drop-unknown) to drop such triples"
    for number, (head, relation, tail) in read_columns(path, 3):
        unknown = [
            (kind, value)
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
            names = " and ".join(f"{kind} {quote(value)}" for kind, value in unknown)
            vocabularies = " / ".join(sorted({_VOCABULARY_FILES[kind] for kind, _ in unknown}))
            raise DatasetError(
                f"{path}:{number}: unknown {names} (not in {vocabularies}); {advice}"
            )
        ids.append((entity_ids[head], relation_ids[relation], entity_ids[tail]))
    if not ids:
        detail = f" ({dropped} dropped as unknown)" if dropped else ""
        raise DatasetError(f"{path}: the split is empty{detail}")
    return torch.tensor(ids, dtype=torch.long), dropped


def _image_files(folder: Path) -> tuple[list[Path], int]:
    """Image-named files of one entity folder, and how many of them cannot even be stat'ed.

    A link loop or dangling link named like an image is counted as unreadable right here, so it is
    skipped even when image checks are off.

    Raises:
        OSError: the folder itself cannot be listed (``NotADirectoryError`` for a plain file).
    """
    files, unreadable = [], 0
    with os.scandir(folder) as entries:
        for entry in entries:
            if Path(entry.name).suffix.lower() not in IMAGE_SUFFIXES:
                continue
            try:
                if entry.is_file():
                    files.append(Path(entry.path))
                elif entry.is_symlink():
                    unreadable += 1  # dangling link: is_file() is false without raising
            except OSError:
                unreadable += 1
    return sorted(files), unreadable


def _entity_images(
    entities: list[str], image_root: Path | None, options: LoadOptions, report: dict
) -> tuple[tuple[Path, ...], ...]:
    """Each entity's usable images; unreadable files and folders are skipped and counted.

    An entity folder that cannot be listed (a link loop, a dangling link, no permission) loses its
    images with a warning and a count in ``report["unreadable_image_folders"]``, as a bad image file
    does; it does not stop the load.
    """
    skipped = dict.fromkeys(SKIP_REASONS, 0)
    report["image_root"] = str(image_root) if image_root else None
    report["skipped_images"] = skipped
    report["unreadable_image_folders"] = 0
    if image_root is None:
        report["entities_without_image_folder"] = len(entities)
        return tuple(() for _ in entities)
    try:
        with os.scandir(image_root) as entries:
            names = {entry.name for entry in entries}
    except OSError as error:
        raise DatasetError(
            f"{image_root}: cannot list the image folders ({error.strerror or error})"
        ) from None
    verdicts = ImageVerdictCache(Path(options.cache_dir) if options.cache_dir else None, image_root)
    images, missing, unreadable_folders = [], 0, []
    for entity in entities:
        name = entity_image_folder(entity)
        if name not in names:
            missing += 1
            images.append(())
            continue
        try:
            files, unreadable = _image_files(image_root / name)
        except NotADirectoryError:  # a plain file of that name is no image folder
            missing += 1
            images.append(())
            continue
        except OSError:
            unreadable_folders.append(image_root / name)
            images.append(())
            continue
        skipped["unreadable"] += unreadable
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
    report["unreadable_image_folders"] = len(unreadable_folders)
    if unreadable_folders:
        reasons = "; ".join(
            f"{path}: {path_problem(path, folder=True) or 'cannot be listed'}"
            for path in unreadable_folders[:3]
        )
        more = f" (and {len(unreadable_folders) - 3} more)" if len(unreadable_folders) > 3 else ""
        warnings.warn(
            f"skipped the images of {len(unreadable_folders)} entities whose image folder cannot "
            f"be read: {reasons}{more}",
            stacklevel=3,
        )
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
    if not str(folder).strip():  # Path("") would silently mean the current directory
        raise DatasetError("the dataset folder is empty; expected the path of a dataset folder")
    folder = Path(folder).expanduser()
    problem = path_problem(folder, folder=True)
    if problem:
        raise DatasetError(f"{folder}: dataset {problem}")
    folder = folder.resolve()
    entities = read_id_list(folder / "entities.txt")
    relations = read_id_list(folder / "relations.txt")
    if not entities:
        raise DatasetError(f"{folder / 'entities.txt'}: no entities")
    if not relations:
        raise DatasetError(f"{folder / 'relations.txt'}: no relations")

    short_file = folder / "entity2text.txt"
    short_texts = read_id_texts(short_file) if _present(short_file) else {}
    long_file = folder / "entity2textlong.txt"
    long_texts = read_id_texts(long_file) if _present(long_file) else {}
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
        splits[split], dropped[split] = _triples_to_ids(
            path, entity_ids, relation_ids, options.drop_unknown, is_train=split == "train"
        )
    report["dropped_unknown"] = dropped

    relation_file = folder / "relation2text.txt"
    relation_texts = read_id_texts(relation_file) if _present(relation_file) else {}
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
