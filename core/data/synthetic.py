"""A seeded synthetic multimodal knowledge graph, written to disk in the MKGformer FB15k-237 layout.

The generator exists so that every part of the platform (loader, encoders, training, sweeps,
ablations) can run on data of any size, from a 200-entity smoke test up to FB15k-237-IMG and
WN18-IMG scale, without the real datasets. The data has a known latent structure, and each
modality reveals a different part of it, so removing text, images or the graph measurably hurts a
model:

* Every entity ``e`` has a **type** ``a(e) ∈ [A]`` and a **style** ``b(e) ∈ [B]``; its latent
  class is the pair ``(a, b)``. Every class holds at least one entity.
* **Text** reveals the type: the long description names the type word of ``a(e)`` with probability
  ``text_informativeness``, otherwise a distractor word from a shared pool, among filler words.
  The short name is a plain pseudo-word that carries no signal.
* **Images** reveal the style: each image has the colour and stripe pattern of ``b(e)`` with
  probability ``image_informativeness``, otherwise those of a uniformly random style, plus pixel
  noise so that no two images are identical.
* **The graph** reveals regularities across both factors: relation ``r`` maps the head class
  ``(a, b)`` to the tail class ``(σ_r(a), τ_r(b))`` and draws the tail inside that class with
  Zipf-like popularity (skewed degrees as in real KGs); a ``graph_noise`` fraction of tails is
  uniform. Relations differ in cardinality: ``one_to_one`` relations use permutations and a
  deterministic within-class mapping, ``many_to_one`` relations use arbitrary maps and a steep
  popularity, ``many_to_many`` relations use permutations and a mild popularity.

Triples are sampled vectorised (no Python loop per triple), deduplicated, and split so that every
entity and relation of the valid and test splits occurs in train: one triple per entity and per
relation is pinned to train, valid and test are drawn from the rest.

Layout written into ``out_dir`` (what :mod:`core.data` 's MKGformer loader reads)::

    train.tsv, dev.tsv, test.tsv   head \\t relation \\t tail, CRLF line ends
    entities.txt                   /m/0s0001 ...              (Freebase-like mids)
    relations.txt                  /synthetic/r017/link ...
    entity2text.txt                mid \\t short name
    entity2textlong.txt            mid \\t long description
    relation2text.txt              relation \\t text
    images/m.0s0001/0.png ...      images_per_entity PNGs for image_coverage of the entities
    synthetic.json                 spec, seed, format version, counts; written last

A folder without ``synthetic.json`` is a half-written one; while it is being written it holds
``synthetic.partial.json`` (the spec), removed once ``synthetic.json`` is in place. One of the two
marks a folder as the generator's own: ``overwrite`` empties only such a folder, never a real dataset
that happens to use the same file names.
"""

from __future__ import annotations

import colorsys
import dataclasses
import io
import json
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from core.data.files import DatasetError
from runstore import atomic_write_bytes, is_temporary

__all__ = [
    "FORMAT_VERSION",
    "PRESETS",
    "RELATION_KINDS",
    "SyntheticSpec",
    "generate_synthetic",
    "synthetic_entity_folder",
]

FORMAT_VERSION = 1
"""Version of the on-disk format written by :func:`generate_synthetic` (in ``synthetic.json``)."""

RELATION_KINDS = ("one_to_one", "many_to_one", "many_to_many")
"""Cardinality kinds a synthetic relation can have."""

_MID_PREFIX = "/m/0s"
_BASE36 = "0123456789abcdefghijklmnopqrstuvwxyz"
_METADATA_FILE = "synthetic.json"
_PARTIAL_FILE = "synthetic.partial.json"
_GENERATOR = "core.data.synthetic"
_TEXT_FILES = (
    "train.tsv",
    "dev.tsv",
    "test.tsv",
    "entities.txt",
    "relations.txt",
    "entity2text.txt",
    "entity2textlong.txt",
    "relation2text.txt",
)
_IMAGES_DIR = "images"


def _words(text: str) -> tuple[str, ...]:
    """The whitespace-separated words of ``text`` (keeps long word lists compact)."""
    return tuple(text.split())


# Words are lowercase letters only and the three pools are disjoint, so a reader can tell which
# pool a description word came from.
_TYPE_WORDS = _words(
    "river castle violin falcon glacier orchard lantern harbor meadow comet cathedral "
    "tortoise volcano compass lighthouse canyon beetle monastery trumpet prairie nebula "
    "windmill coral fortress lagoon sparrow quarry telescope bamboo glacis dolphin vineyard"
)
_DISTRACTOR_WORDS = _words(
    "thing item entry object subject entity record element unit piece instance matter "
    "article specimen token sample"
)
_FILLER_WORDS = _words(
    "often noted for its quiet history and many local people describe with some care early "
    "later widely known in the region during several years records mention this as part of "
    "a broader set that remains studied by scholars visitors today although sources differ "
    "on details most agree about origin name"
)
_SYLLABLES = _words(
    "ka lo mi ne su ta vo ri be da fu gi ho ju ke la mo nu pa qi ro se ti ve wa xo yu ze "
    "bra cle dro fle gra kri plo sta tre vla shi tho"
)

# Relation kind → (popularity exponent inside the tail class, σ/τ are permutations).
_KIND_SETTINGS = {
    "one_to_one": (0.0, True),
    "many_to_one": (2.0, False),
    "many_to_many": (1.0, True),
}
_KIND_PROBABILITIES = (0.25, 0.35, 0.40)
_HEAD_POPULARITY_EXPONENT = 0.8
_RELATION_POPULARITY_EXPONENT = 0.7
_PATTERN_AMPLITUDE = 36
_PIXEL_NOISE = 14
_IMAGE_CHUNK = 1024
_MAX_SAMPLING_ROUNDS = 200
_MAX_COVERAGE_ROUNDS = 20


@dataclass(frozen=True)
class SyntheticSpec:
    """Everything that defines a synthetic dataset; the same spec always writes the same bytes.

    Attributes:
        num_entities: number of entities ``E`` (at least ``num_types * num_styles``).
        num_relations: number of relations ``R``.
        num_train: training triples (at least ``E + R``, so every entity and relation can be
            pinned to train).
        num_valid: validation triples (written to ``dev.tsv``).
        num_test: test triples.
        images_per_entity: PNG files per entity that has images (0 writes no images).
        image_coverage: fraction of entities that have an image folder at all.
        text_informativeness: probability that an entity's description names its type word.
        image_informativeness: probability that an image shows its entity's style.
        image_size: side of the square RGB images, in pixels.
        num_types: number of latent types ``A`` (revealed by text).
        num_styles: number of latent styles ``B`` (revealed by images).
        graph_noise: fraction of triples whose tail is a uniformly random entity.
        corrupt_image_fraction: fraction of image files replaced by broken ones (all black,
            1×1 or truncated), cycling through the three kinds; at least one when positive.
        seed: root seed of every random stream.
        name: dataset name recorded in ``synthetic.json``.
    """

    num_entities: int = 200
    num_relations: int = 12
    num_train: int = 3000
    num_valid: int = 300
    num_test: int = 300
    images_per_entity: int = 2
    image_coverage: float = 1.0
    text_informativeness: float = 0.8
    image_informativeness: float = 0.8
    image_size: int = 32
    num_types: int = 6
    num_styles: int = 4
    graph_noise: float = 0.05
    corrupt_image_fraction: float = 0.0
    seed: int = 0
    name: str = "synthetic"

    def __post_init__(self) -> None:
        for field_name, low in (
            ("num_entities", 2),
            ("num_relations", 1),
            ("num_train", 1),
            ("num_valid", 1),
            ("num_test", 1),
            ("images_per_entity", 0),
            ("image_size", 2),
            ("num_types", 2),
            ("num_styles", 2),
            ("seed", 0),
        ):
            value = getattr(self, field_name)
            if not isinstance(value, int) or isinstance(value, bool):
                raise TypeError(f"SyntheticSpec.{field_name} must be an int, got {value!r}")
            if value < low:
                raise ValueError(f"SyntheticSpec.{field_name} must be >= {low}, got {value}")
        for field_name in (
            "image_coverage",
            "text_informativeness",
            "image_informativeness",
            "graph_noise",
            "corrupt_image_fraction",
        ):
            value = getattr(self, field_name)
            if not isinstance(value, (int, float)) or isinstance(value, bool):
                raise TypeError(f"SyntheticSpec.{field_name} must be a number, got {value!r}")
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"SyntheticSpec.{field_name} must be in [0, 1], got {value}")
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"SyntheticSpec.name must be a non-empty string, got {self.name!r}")
        if self.image_size > 1024:
            raise ValueError(f"SyntheticSpec.image_size must be <= 1024, got {self.image_size}")
        classes = self.num_types * self.num_styles
        if self.num_entities < classes:
            raise ValueError(
                f"SyntheticSpec.num_entities ({self.num_entities}) must be >= num_types * "
                f"num_styles ({classes}) so that every latent class holds an entity"
            )
        if self.num_train < self.num_entities + self.num_relations:
            raise ValueError(
                f"SyntheticSpec.num_train ({self.num_train}) must be >= num_entities + "
                f"num_relations ({self.num_entities + self.num_relations}) so that every entity "
                "and relation can occur in train"
            )
        total = self.num_train + self.num_valid + self.num_test
        capacity = self.num_entities * (self.num_entities - 1) * self.num_relations
        if total > capacity // 4:
            raise ValueError(
                f"SyntheticSpec asks for {total} distinct triples but {self.num_entities} entities "
                f"and {self.num_relations} relations allow only {capacity} (at most a quarter of "
                "them can be sampled with the latent structure); lower the triple counts"
            )

    @property
    def num_triples(self) -> int:
        """Triples over all three splits."""
        return self.num_train + self.num_valid + self.num_test

    @classmethod
    def preset(cls, name: str, **overrides: object) -> SyntheticSpec:
        """A named spec, optionally with some fields replaced.

        Args:
            name: one of :data:`PRESETS` (``"small"``, ``"fb15k-237-img"``, ``"wn18-img"``).
            **overrides: fields to replace, e.g. ``seed=3`` or ``images_per_entity=0``.

        Raises:
            ValueError: on an unknown preset name or field.
        """
        if name not in PRESETS:
            raise ValueError(
                f"unknown synthetic preset {name!r}; expected one of {sorted(PRESETS)}"
            )
        valid_fields = {field.name for field in dataclasses.fields(cls)}
        unknown = sorted(set(overrides) - valid_fields)
        if unknown:
            raise ValueError(
                f"unknown SyntheticSpec field(s) {unknown}; valid fields: {sorted(valid_fields)}"
            )
        return cls(**{**PRESETS[name], **overrides})

    def to_dict(self) -> dict:
        """The spec as a JSON-ready dict (field name → value)."""
        return dataclasses.asdict(self)


PRESETS: dict[str, dict] = {
    "small": {
        "name": "synthetic-small",
        "num_entities": 200,
        "num_relations": 12,
        "num_train": 3000,
        "num_valid": 300,
        "num_test": 300,
        "images_per_entity": 2,
        "num_types": 6,
        "num_styles": 4,
    },
    "fb15k-237-img": {
        "name": "synthetic-fb15k-237-img",
        "num_entities": 14541,
        "num_relations": 237,
        "num_train": 272115,
        "num_valid": 17535,
        "num_test": 20466,
        "images_per_entity": 10,
        "num_types": 24,
        "num_styles": 12,
    },
    "wn18-img": {
        "name": "synthetic-wn18-img",
        "num_entities": 40943,
        "num_relations": 18,
        "num_train": 141442,
        "num_valid": 5000,
        "num_test": 5000,
        "images_per_entity": 10,
        "image_coverage": 7801 / 40943,
        "num_types": 16,
        "num_styles": 8,
    },
}
"""Field values of the named specs; see :meth:`SyntheticSpec.preset`."""


def synthetic_entity_folder(mid: str) -> str:
    """Image folder name of an entity: ``"/m/0s0001"`` → ``"m.0s0001"`` (MKGformer convention).

    Raises:
        ValueError: when ``mid`` is not a Freebase-style ``/m/...`` id.
    """
    if not mid.startswith("/m/") or len(mid) <= 3 or "/" in mid[3:]:
        raise ValueError(f"expected a Freebase-style mid like '/m/0s0001', got {mid!r}")
    return "m." + mid[3:]


def generate_synthetic(
    spec: SyntheticSpec, out_dir: Path, overwrite: bool = False, progress: bool = True
) -> Path:
    """Write a synthetic dataset described by ``spec`` into ``out_dir``.

    Args:
        spec: what to generate.
        out_dir: target folder; created when missing.
        overwrite: allow a non-empty ``out_dir`` that this generator wrote (it holds
            ``synthetic.json`` or ``synthetic.partial.json``). Only files and folders this
            generator writes are removed first; anything else in the folder makes the call fail.
        progress: show a tqdm bar over the entities while images are written.

    Returns:
        ``out_dir`` as a :class:`Path`.

    Raises:
        FileExistsError: ``out_dir`` is not empty and ``overwrite`` is false, or it holds files
            the generator did not write.
        DatasetError: ``overwrite`` is true but ``out_dir`` is a non-empty folder without the
            generator's marker file (for example a real MKGformer dataset).
    """
    out_dir = Path(out_dir)
    _prepare_folder(out_dir, overwrite, spec)
    streams = np.random.SeedSequence(spec.seed).spawn(5)
    latent_rng, graph_rng, split_rng, text_rng, image_rng = (
        np.random.default_rng(stream) for stream in streams
    )

    latent = _sample_latent(spec, latent_rng)
    triples = _sample_triples(spec, latent, graph_rng)
    splits = _split_triples(spec, triples, split_rng)

    entity_ids = _entity_ids(spec.num_entities)
    relation_ids = _relation_ids(spec.num_relations)
    for file_name, split in zip(("train.tsv", "dev.tsv", "test.tsv"), splits, strict=True):
        _write_triples(out_dir / file_name, split, entity_ids, relation_ids)
    _write_lines(out_dir / "entities.txt", entity_ids)
    _write_lines(out_dir / "relations.txt", relation_ids)
    names = _entity_names(spec.num_entities, text_rng)
    descriptions, revealed_types = _entity_descriptions(spec, names, latent["types"], text_rng)
    _write_lines(
        out_dir / "entity2text.txt", [f"{e}\t{n}" for e, n in zip(entity_ids, names, strict=True)]
    )
    _write_lines(
        out_dir / "entity2textlong.txt",
        [f"{e}\t{d}" for e, d in zip(entity_ids, descriptions, strict=True)],
    )
    relation_texts = [
        f"synthetic relation {index} ({kind.replace('_', ' ')})"
        for index, kind in enumerate(latent["relation_kinds"])
    ]
    _write_lines(
        out_dir / "relation2text.txt",
        [f"{r}\t{text}" for r, text in zip(relation_ids, relation_texts, strict=True)],
    )
    palette = _style_palette(spec.num_styles)
    image_report = _write_images(
        spec, out_dir / _IMAGES_DIR, entity_ids, latent["styles"], palette, image_rng, progress
    )

    train, valid, test = splits
    in_train = np.unique(np.concatenate([train[:, 0], train[:, 2]]))
    metadata = {
        "format_version": FORMAT_VERSION,
        "generator": _GENERATOR,
        "name": spec.name,
        "seed": spec.seed,
        "spec": spec.to_dict(),
        "counts": {
            "entities": spec.num_entities,
            "relations": spec.num_relations,
            "train": len(train),
            "valid": len(valid),
            "test": len(test),
            "entities_in_train": len(in_train),
            "entities_with_type_word": int(revealed_types.sum()),
            **image_report["counts"],
            "relation_kinds": {
                kind: int(sum(k == kind for k in latent["relation_kinds"]))
                for kind in RELATION_KINDS
            },
        },
        "corrupt_images": image_report["corrupt"],
        "vocabulary": {
            "type_words": list(_type_words(spec.num_types)),
            "distractor_words": list(_DISTRACTOR_WORDS),
            "style_colours": palette.tolist(),
        },
        "files": {"splits": ["train.tsv", "dev.tsv", "test.tsv"], "images": _IMAGES_DIR},
    }
    text = json.dumps(metadata, indent=2, sort_keys=True) + "\n"
    atomic_write_bytes(out_dir / _METADATA_FILE, text.encode("utf-8"))
    (out_dir / _PARTIAL_FILE).unlink(missing_ok=True)
    return out_dir


# --------------------------------------------------------------------------------------------------
# Folder handling
# --------------------------------------------------------------------------------------------------


def _written_by_generator(out_dir: Path) -> bool:
    """Whether ``out_dir`` holds this generator's finished or in-progress marker file."""
    for name in (_METADATA_FILE, _PARTIAL_FILE):
        try:
            marker = json.loads((out_dir / name).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if isinstance(marker, dict) and marker.get("generator") == _GENERATOR:
            return True
    return False


def _prepare_folder(out_dir: Path, overwrite: bool, spec: SyntheticSpec) -> None:
    """Create ``out_dir`` or, with ``overwrite``, clear what an earlier generation left in it.

    Either way the in-progress marker is written before anything else, so that a folder this
    generator started, even one interrupted half-way, can be overwritten again.
    """
    if os.path.lexists(out_dir) and not out_dir.is_dir():
        raise FileExistsError(f"{out_dir} exists and is not a folder")
    out_dir.mkdir(parents=True, exist_ok=True)
    existing = sorted(path.name for path in out_dir.iterdir())
    if existing and not overwrite:
        raise FileExistsError(
            f"{out_dir} is not empty ({len(existing)} entries); pass overwrite=True "
            "(--overwrite) to replace an earlier synthetic dataset"
        )
    if existing and not _written_by_generator(out_dir):
        raise DatasetError(
            f"{out_dir} was not written by `diffcom data synth` (it holds no {_METADATA_FILE} "
            "from the generator); refusing to overwrite it: choose an empty or new folder"
        )
    # ``<metadata>.tmp``: the fixed temporary name earlier generators wrote the metadata under.
    ours = {*_TEXT_FILES, _IMAGES_DIR, _METADATA_FILE, _METADATA_FILE + ".tmp", _PARTIAL_FILE}
    foreign = [name for name in existing if name not in ours and not is_temporary(name)]
    if foreign:
        raise FileExistsError(
            f"{out_dir} holds entries the synthetic generator did not write: {foreign[:10]}; "
            "refusing to overwrite it"
        )
    partial = {"generator": _GENERATOR, "format_version": FORMAT_VERSION, "spec": spec.to_dict()}
    (out_dir / _PARTIAL_FILE).write_text(json.dumps(partial, indent=2) + "\n", encoding="utf-8")
    # Metadata first, so an interrupted overwrite leaves a folder that reads as half-written.
    for name in (_METADATA_FILE, _METADATA_FILE + ".tmp", *_TEXT_FILES):
        (out_dir / name).unlink(missing_ok=True)
    images = out_dir / _IMAGES_DIR
    if images.is_dir() and not images.is_symlink():
        _remove_tree(images)
    elif os.path.lexists(images):  # a link is removed, never what it points to
        images.unlink()


def _remove_tree(root: Path) -> None:
    """Delete a folder tree bottom-up (what ``shutil.rmtree`` does, without following links)."""
    for directory, folders, files in os.walk(root, topdown=False):
        for file_name in files:
            os.unlink(os.path.join(directory, file_name))
        for folder in folders:
            path = os.path.join(directory, folder)
            if os.path.islink(path):
                os.unlink(path)
            else:
                os.rmdir(path)
    os.rmdir(root)


# --------------------------------------------------------------------------------------------------
# Latent structure and triples
# --------------------------------------------------------------------------------------------------


def _sample_latent(spec: SyntheticSpec, rng: np.random.Generator) -> dict:
    """Entity classes, popularity and per-relation class maps.

    Returns:
        A dict with ``types``, ``styles`` and ``classes`` (``(E,)`` ints), ``popularity_rank``
        (``(E,)``, 0 = most popular), ``relations_by_popularity`` (``(R,)``), ``class_members``
        (entity ids sorted by class then popularity), ``class_offsets`` (``(A·B + 1,)``),
        ``rank_in_class`` (``(E,)``), ``type_maps`` (``(R, A)``), ``style_maps`` (``(R, B)``),
        ``relation_kinds`` (``R`` names),
        ``tail_exponents``, ``one_to_one`` and ``relation_shifts`` (each ``(R,)``).
    """
    num_types, num_styles = spec.num_types, spec.num_styles
    num_classes = num_types * num_styles
    # Every class gets one entity, the rest are uniform; then shuffle which entity gets which.
    classes = np.concatenate(
        [np.arange(num_classes), rng.integers(0, num_classes, spec.num_entities - num_classes)]
    )
    classes = rng.permutation(classes)
    popularity_rank = rng.permutation(spec.num_entities)
    relations_by_popularity = rng.permutation(spec.num_relations)
    class_members = np.lexsort((popularity_rank, classes))
    class_offsets = np.zeros(num_classes + 1, dtype=np.int64)
    class_offsets[1:] = np.cumsum(np.bincount(classes, minlength=num_classes))
    rank_in_class = np.empty(spec.num_entities, dtype=np.int64)
    rank_in_class[class_members] = (
        np.arange(spec.num_entities) - class_offsets[classes[class_members]]
    )

    kind_index = rng.choice(len(RELATION_KINDS), size=spec.num_relations, p=_KIND_PROBABILITIES)
    relation_kinds = [RELATION_KINDS[k] for k in kind_index]
    type_maps = np.empty((spec.num_relations, num_types), dtype=np.int64)
    style_maps = np.empty((spec.num_relations, num_styles), dtype=np.int64)
    tail_exponents = np.empty(spec.num_relations)
    for relation, kind in enumerate(relation_kinds):
        exponent, bijective = _KIND_SETTINGS[kind]
        tail_exponents[relation] = exponent
        if bijective:
            type_maps[relation] = rng.permutation(num_types)
            style_maps[relation] = rng.permutation(num_styles)
        else:
            type_maps[relation] = rng.integers(0, num_types, num_types)
            style_maps[relation] = rng.integers(0, num_styles, num_styles)
    return {
        "types": classes // num_styles,
        "styles": classes % num_styles,
        "classes": classes,
        "popularity_rank": popularity_rank,
        "relations_by_popularity": relations_by_popularity,
        "class_members": class_members,
        "class_offsets": class_offsets,
        "rank_in_class": rank_in_class,
        "type_maps": type_maps,
        "style_maps": style_maps,
        "relation_kinds": relation_kinds,
        "tail_exponents": tail_exponents,
        "one_to_one": np.asarray([kind == "one_to_one" for kind in relation_kinds], dtype=bool),
        "relation_shifts": rng.integers(0, spec.num_entities, spec.num_relations),
    }


def _power_law_index(uniform: np.ndarray, size: np.ndarray, exponent: np.ndarray) -> np.ndarray:
    """Zipf-like indices in ``[0, size)``: inverse CDF of a power law ``x^-s`` on ``[1, n + 1)``.

    Args:
        uniform: ``(n,)`` draws from ``U[0, 1)``.
        size: ``(n,)`` or scalar range sizes, ``>= 1``.
        exponent: ``(n,)`` or scalar exponents ``s >= 0`` (``0`` is uniform, larger is steeper).

    Returns:
        ``(n,)`` int64 indices; index 0 is the most likely.
    """
    size = np.asarray(size, dtype=np.float64)
    exponent = np.broadcast_to(np.asarray(exponent, dtype=np.float64), uniform.shape)
    upper = size + 1.0
    near_one = np.abs(exponent - 1.0) < 1e-9
    safe = np.where(near_one, 2.0, exponent)
    general = (1.0 + uniform * (upper ** (1.0 - safe) - 1.0)) ** (1.0 / (1.0 - safe))
    harmonic = upper**uniform
    x = np.where(near_one, harmonic, general)
    return np.minimum(np.floor(x).astype(np.int64) - 1, size.astype(np.int64) - 1).clip(min=0)


def _draw_candidates(
    spec: SyntheticSpec,
    latent: dict,
    rng: np.random.Generator,
    count: int,
    first_heads: np.ndarray,
    first_relations: np.ndarray,
) -> np.ndarray:
    """Draw ``count`` candidate triples (duplicates and self-loops possible).

    The first heads and relations are forced (to cover entities and relations not yet seen); the
    rest follow the global popularity.

    Returns:
        ``(count, 3)`` int64 array of ``(head, relation, tail)``.
    """
    num_entities, num_relations = spec.num_entities, spec.num_relations
    by_popularity = np.argsort(latent["popularity_rank"])
    heads = by_popularity[
        _power_law_index(rng.random(count), num_entities, _HEAD_POPULARITY_EXPONENT)
    ]
    relations = latent["relations_by_popularity"][
        _power_law_index(rng.random(count), num_relations, _RELATION_POPULARITY_EXPONENT)
    ]
    heads[: len(first_heads)] = first_heads[:count]
    relation_slots = rng.permutation(count)[: len(first_relations)]
    relations[relation_slots] = first_relations[: len(relation_slots)]

    target_types = latent["type_maps"][relations, latent["types"][heads]]
    target_styles = latent["style_maps"][relations, latent["styles"][heads]]
    target_class = target_types * spec.num_styles + target_styles
    start = latent["class_offsets"][target_class]
    size = latent["class_offsets"][target_class + 1] - start
    within = _power_law_index(rng.random(count), size, latent["tail_exponents"][relations])
    # One-to-one relations map the head's rank in its class to a fixed rank in the tail class.
    one_to_one = latent["one_to_one"][relations]
    deterministic = (latent["rank_in_class"][heads] + latent["relation_shifts"][relations]) % size
    within = np.where(one_to_one, deterministic, within)
    tails = latent["class_members"][start + within]
    noisy = rng.random(count) < spec.graph_noise
    tails[noisy] = rng.integers(0, num_entities, int(noisy.sum()))
    return np.stack([heads, relations, tails], axis=1)


def _sample_triples(spec: SyntheticSpec, latent: dict, rng: np.random.Generator) -> np.ndarray:
    """Exactly ``spec.num_triples`` distinct triples without self-loops, in sampling order.

    Entities and relations that have not occurred yet are forced into each round's candidates, so
    the result holds every entity and relation whenever the counts allow it.

    Returns:
        ``(num_triples, 3)`` int64 array of ``(head, relation, tail)``.

    Raises:
        RuntimeError: when the latent structure cannot yield enough distinct triples.
    """
    num_entities, num_relations, total = spec.num_entities, spec.num_relations, spec.num_triples
    stride = np.int64(num_relations) * num_entities
    keys = np.empty(0, dtype=np.int64)
    coverage_rounds = 0
    for _ in range(_MAX_SAMPLING_ROUNDS):
        seen_entities = np.zeros(num_entities, dtype=bool)
        seen_entities[keys // stride] = True
        seen_entities[keys % num_entities] = True
        seen_relations = np.zeros(num_relations, dtype=bool)
        seen_relations[(keys // num_entities) % num_relations] = True
        missing = total - len(keys)
        if missing <= 0:
            covered = seen_entities.all() and seen_relations.all()
            if covered or coverage_rounds >= _MAX_COVERAGE_ROUNDS:
                break
            coverage_rounds += 1
        first_heads = rng.permutation(np.flatnonzero(~seen_entities))
        first_relations = rng.permutation(np.flatnonzero(~seen_relations))
        count = max(int(1.25 * max(missing, 0)), 2 * len(first_heads), len(first_relations), 1024)
        candidates = _draw_candidates(spec, latent, rng, count, first_heads, first_relations)
        candidates = candidates[candidates[:, 0] != candidates[:, 2]]
        new_keys = candidates[:, 0] * stride + candidates[:, 1] * num_entities + candidates[:, 2]
        merged = np.concatenate([keys, new_keys])
        _, first = np.unique(merged, return_index=True)
        keys = merged[np.sort(first)]
    else:
        raise RuntimeError(
            f"could not sample {total} distinct triples from {spec} in {_MAX_SAMPLING_ROUNDS} "
            "rounds; lower the triple counts or raise num_entities / graph_noise"
        )
    heads, tails = keys // stride, keys % num_entities
    relations = (keys // num_entities) % num_relations
    # Trim to the requested count, keeping one triple per entity and relation plus the earliest.
    keep = np.zeros(len(keys), dtype=bool)
    keep[_covering_rows(heads, relations, tails)] = True
    keep[np.flatnonzero(~keep)[: total - int(keep.sum())]] = True
    return np.stack([heads, relations, tails], axis=1)[keep]


def _covering_rows(heads: np.ndarray, relations: np.ndarray, tails: np.ndarray) -> np.ndarray:
    """Row indices that hold every entity and relation at least once (their first occurrences)."""
    count = len(heads)
    _, first_entity = np.unique(np.concatenate([heads, tails]), return_index=True)
    _, first_relation = np.unique(relations, return_index=True)
    return np.unique(np.concatenate([first_entity % count, first_relation]))


def _split_triples(
    spec: SyntheticSpec, triples: np.ndarray, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Split into train / valid / test with every valid and test entity and relation in train.

    One triple per entity and relation is pinned to train; valid and test are drawn uniformly from
    the other triples. Each split comes back in random order.
    """
    pinned = np.zeros(len(triples), dtype=bool)
    pinned[_covering_rows(triples[:, 0], triples[:, 1], triples[:, 2])] = True
    free = rng.permutation(np.flatnonzero(~pinned))
    valid_rows = free[: spec.num_valid]
    test_rows = free[spec.num_valid : spec.num_valid + spec.num_test]
    train_rows = np.concatenate([np.flatnonzero(pinned), free[spec.num_valid + spec.num_test :]])
    return tuple(triples[rng.permutation(rows)] for rows in (train_rows, valid_rows, test_rows))


# --------------------------------------------------------------------------------------------------
# Identifiers and text
# --------------------------------------------------------------------------------------------------


def _base36(value: int, width: int) -> str:
    digits = []
    while value:
        value, remainder = divmod(value, 36)
        digits.append(_BASE36[remainder])
    return "".join(reversed(digits)).rjust(width, "0")


def _entity_ids(num_entities: int) -> list[str]:
    """``/m/0s0001``, ``/m/0s0002``, …: base-36 counters from 1, zero-padded to at least 4."""
    width = max(4, len(_base36(num_entities, 1)))
    return [_MID_PREFIX + _base36(index + 1, width) for index in range(num_entities)]


def _relation_ids(num_relations: int) -> list[str]:
    """``/synthetic/r000/link``, … (zero-padded to at least 3 digits)."""
    width = max(3, len(str(num_relations - 1)))
    return [f"/synthetic/r{index:0{width}d}/link" for index in range(num_relations)]


def _type_words(num_types: int) -> tuple[str, ...]:
    """One distinct lowercase word per type; beyond the base list, words get a letter suffix."""
    words = []
    for index in range(num_types):
        base = _TYPE_WORDS[index % len(_TYPE_WORDS)]
        round_ = index // len(_TYPE_WORDS)
        words.append(base if round_ == 0 else base + _base36(round_ + 9, 1))
    return tuple(words)


def _entity_names(num_entities: int, rng: np.random.Generator) -> list[str]:
    """Unique capitalised pseudo-words (``"Kaloroi"``), assigned in random order; no signal."""
    digits = max(3, math.ceil(math.log(max(num_entities, 2), len(_SYLLABLES))))
    codes = rng.choice(len(_SYLLABLES) ** digits, size=num_entities, replace=False)
    names = []
    for code in codes.tolist():
        syllables = []
        for _ in range(digits):
            code, remainder = divmod(code, len(_SYLLABLES))
            syllables.append(_SYLLABLES[remainder])
        names.append("".join(syllables).capitalize())
    return names


def _entity_descriptions(
    spec: SyntheticSpec, names: list[str], types: np.ndarray, rng: np.random.Generator
) -> tuple[list[str], np.ndarray]:
    """Long descriptions ``"<Name> is a(n) <word>. It is <filler words>."``.

    ``<word>`` is the entity's type word with probability ``text_informativeness``, otherwise a
    distractor drawn uniformly from the shared pool.

    Returns:
        The descriptions and a ``(E,)`` bool array, true where the type word was written.
    """
    num_entities = spec.num_entities
    type_words = _type_words(spec.num_types)
    revealed = rng.random(num_entities) < spec.text_informativeness
    distractors = rng.integers(0, len(_DISTRACTOR_WORDS), num_entities)
    filler_lengths = rng.integers(8, 16, num_entities)
    filler = rng.integers(0, len(_FILLER_WORDS), (num_entities, 15))
    descriptions = []
    for entity in range(num_entities):
        word = (
            type_words[types[entity]]
            if revealed[entity]
            else _DISTRACTOR_WORDS[distractors[entity]]
        )
        words = " ".join(_FILLER_WORDS[i] for i in filler[entity, : filler_lengths[entity]])
        article = "an" if word[0] in "aeiou" else "a"
        descriptions.append(f"{names[entity]} is {article} {word}. It is {words}.")
    return descriptions, revealed


def _write_lines(path: Path, lines: list[str]) -> None:
    """Write ``lines`` with LF line ends (UTF-8)."""
    with open(path, "w", encoding="utf-8", newline="") as handle:
        handle.write("".join(line + "\n" for line in lines))


def _write_triples(
    path: Path, triples: np.ndarray, entity_ids: list[str], relation_ids: list[str]
) -> None:
    """Write ``head\\trelation\\ttail`` rows with CRLF line ends, as the real FB15k-237 files."""
    entities = np.asarray(entity_ids, dtype=object)
    relations = np.asarray(relation_ids, dtype=object)
    heads, rels, tails = entities[triples[:, 0]], relations[triples[:, 1]], entities[triples[:, 2]]
    with open(path, "w", encoding="utf-8", newline="") as handle:
        handle.write(
            "".join(f"{h}\t{r}\t{t}\r\n" for h, r, t in zip(heads, rels, tails, strict=True))
        )


# --------------------------------------------------------------------------------------------------
# Images
# --------------------------------------------------------------------------------------------------


def _style_palette(num_styles: int) -> np.ndarray:
    """``(B, 3)`` uint8 base colours: evenly spaced hues, kept inside ``[50, 205]`` per channel.

    The margin leaves room for the stripe pattern and the noise without clipping, so an image's
    mean colour stays close to its style's base colour.
    """
    colours = []
    for style in range(num_styles):
        hue = style / num_styles
        value = 0.9 if style % 2 == 0 else 0.7
        red, green, blue = colorsys.hsv_to_rgb(hue, 0.85, value)
        colours.append([50 + round(155 * channel) for channel in (red, green, blue)])
    return np.asarray(colours, dtype=np.uint8)


def _style_patterns(num_styles: int, size: int) -> np.ndarray:
    """``(B, size, size)`` int16 stripes in ``{-1, +1}``, orientation and period set by style."""
    rows, cols = np.mgrid[0:size, 0:size]
    patterns = np.empty((num_styles, size, size), dtype=np.int16)
    for style in range(num_styles):
        period = 2 + (style // 4) % 4
        coordinate = (rows, cols, rows + cols, rows - cols + size)[style % 4]
        patterns[style] = np.where((coordinate // period) % 2 == 0, 1, -1)
    return patterns


def _encode_png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG", optimize=False, compress_level=1)
    return buffer.getvalue()


def _corrupt_bytes(kind: str, image: np.ndarray) -> bytes:
    """A broken image of ``kind``: ``black`` (all zero), ``one_pixel`` (1×1) or ``truncated``."""
    if kind == "black":
        return _encode_png(np.zeros_like(image))
    if kind == "one_pixel":
        return _encode_png(np.ascontiguousarray(image[:1, :1]))
    data = _encode_png(image)
    return data[: max(16, len(data) // 3)]


def _chunks(length: int, size: int) -> Iterator[tuple[int, int]]:
    for start in range(0, length, size):
        yield start, min(start + size, length)


def _write_images(
    spec: SyntheticSpec,
    images_dir: Path,
    entity_ids: list[str],
    styles: np.ndarray,
    palette: np.ndarray,
    rng: np.random.Generator,
    progress: bool,
) -> dict:
    """Write the PNG files and return their counts and the list of corrupted files.

    Each image is ``palette[s] + amplitude · pattern[s] + noise`` with ``s`` the entity's style
    (probability ``image_informativeness``) or a uniform random style.

    Returns:
        ``{"counts": {...}, "corrupt": {kind: [relative paths]}}``.
    """
    images_dir.mkdir()
    per_entity, size = spec.images_per_entity, spec.image_size
    corrupt: dict[str, list[str]] = {"black": [], "one_pixel": [], "truncated": []}
    with_images = round(spec.image_coverage * spec.num_entities) if per_entity else 0
    owners = np.sort(rng.choice(spec.num_entities, size=with_images, replace=False))
    num_images = with_images * per_entity
    counts = {"entities_with_images": int(with_images), "images": int(num_images)}
    if num_images == 0:
        counts.update({f"corrupt_{kind}": 0 for kind in corrupt})
        return {"counts": counts, "corrupt": corrupt}

    shown = np.where(
        rng.random(num_images) < spec.image_informativeness,
        np.repeat(styles[owners], per_entity),
        rng.integers(0, spec.num_styles, num_images),
    )
    num_corrupt = 0
    if spec.corrupt_image_fraction > 0:
        num_corrupt = max(1, round(spec.corrupt_image_fraction * num_images))
    corrupt_kind = np.full(num_images, -1, dtype=np.int64)
    corrupt_kind[rng.choice(num_images, size=num_corrupt, replace=False)] = (
        np.arange(num_corrupt) % 3
    )
    kinds = tuple(corrupt)
    patterns = _style_patterns(spec.num_styles, size)
    base = palette.astype(np.int16)

    bar = tqdm(total=with_images, desc="synthetic images", unit="entity", disable=not progress)
    entities_per_chunk = max(1, _IMAGE_CHUNK // per_entity)
    for first, last in _chunks(with_images, entities_per_chunk):
        slot_first, slot_last = first * per_entity, last * per_entity
        chunk_styles = shown[slot_first:slot_last]
        shape = (len(chunk_styles), size, size, 3)
        noise = rng.integers(-_PIXEL_NOISE, _PIXEL_NOISE + 1, shape, dtype=np.int16)
        pixels = (
            base[chunk_styles][:, None, None, :]
            + _PATTERN_AMPLITUDE * patterns[chunk_styles][..., None]
            + noise
        )
        pixels = pixels.clip(0, 255).astype(np.uint8)
        for offset, entity in enumerate(owners[first:last].tolist()):
            folder_name = synthetic_entity_folder(entity_ids[entity])
            folder = images_dir / folder_name
            folder.mkdir()
            for k in range(per_entity):
                slot = (first + offset) * per_entity + k
                image = pixels[slot - slot_first]
                path = folder / f"{k}.png"
                if corrupt_kind[slot] >= 0:
                    kind = kinds[corrupt_kind[slot]]
                    path.write_bytes(_corrupt_bytes(kind, image))
                    corrupt[kind].append(f"{_IMAGES_DIR}/{folder_name}/{k}.png")
                else:
                    Image.fromarray(image).save(
                        path, format="PNG", optimize=False, compress_level=1
                    )
        bar.update(last - first)
    bar.close()
    counts.update({f"corrupt_{kind}": len(paths) for kind, paths in corrupt.items()})
    return {"counts": counts, "corrupt": corrupt}
