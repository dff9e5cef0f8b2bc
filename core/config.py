"""One typed experiment config: frozen dataclasses built from YAML and dotted overrides.

Every run and trial directory, and every checkpoint, holds the config as JSON. Unknown keys and bad
values are rejected before any work starts, naming the key and listing what is valid::

    config = load_config("run.yaml", overrides=["diffusion.steps=20", "structure.fusion=fixed"])

The defaults are the shipped recipe, what ``diffcom train --dataset X`` runs with no config file;
``core/configs/recipe.yaml`` spells every value out for users to start from (a test keeps the two
equal). They were chosen on valid MRR across datasets, never per dataset (BENCHMARKS.md).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from runstore import CONFIG, write_json

__all__ = [
    "BaselineConfig",
    "ConfigError",
    "DataConfig",
    "DiffusionConfig",
    "EvalConfig",
    "ExperimentConfig",
    "FeaturesConfig",
    "LossConfig",
    "ModelConfig",
    "StructureConfig",
    "TrainConfig",
    "config_from_dict",
    "config_to_dict",
    "load_config",
    "coerce_value",
    "parse_override",
    "read_yaml",
    "save_config",
    "stage1_key_values",
    "stage1_relevant",
]


class ConfigError(ValueError):
    """A config key or value that is not valid; the message names the key and the valid choices."""


# Field metadata: "choices" and "range" are checked when a config is built; "check" is a function
# of the value giving what was expected, or None when the value is valid; "stage1" marks a value
# stage 1 depends on (see stage1_relevant); "registry" names the "module.NAME" whose names
# "choices" must equal. Registries import torch, which this module must not, so the choices are
# written here and tests/core/test_config.py checks every one against its registry.


def _value(default, *, stage1: bool = False, check=None):
    metadata = {"stage1": stage1} if check is None else {"stage1": stage1, "check": check}
    return field(default=default, metadata=metadata)


def _choice(default: str, choices: tuple[str, ...], *, stage1: bool = False, registry=None):
    metadata = {"choices": choices, "stage1": stage1}
    if registry is not None:
        metadata["registry"] = registry
    return field(default=default, metadata=metadata)


def _range(
    default,
    low=None,
    high=None,
    *,
    low_open=False,
    high_open=False,
    stage1=False,
    keyed_at_default=True,
):
    # keyed_at_default=False: a stage-1 field added after stage-1 stores existed, left out of
    # the store key (sweeps.stage1.stage1_key) while at its default, so those stores stay valid.
    return field(
        default=default,
        metadata={
            "range": (low, high, low_open, high_open),
            "stage1": stage1,
            "keyed_at_default": keyed_at_default,
        },
    )


# Encoder names taken as they are; any other text encoder is a local model folder and an image
# encoder may also be "clip:<folder>". core.train.trainer.feature_settings maps these onto
# core.features (TEXT_ENCODERS / IMAGE_ENCODERS), whose "local" and "clip" take the folder.
_TEXT_ENCODER_NAMES = ("minilm", "none")
_IMAGE_ENCODER_NAMES = ("efficientnet-lite0", "none")
_CLIP_PREFIX = "clip:"


def _check_text_encoder(value: str) -> str | None:
    if value in _TEXT_ENCODER_NAMES or value.strip():
        return None
    return f"expected {', '.join(_TEXT_ENCODER_NAMES)} or a local model folder"


def _check_image_encoder(value: str) -> str | None:
    if value in _IMAGE_ENCODER_NAMES:
        return None
    if value.startswith(_CLIP_PREFIX) and value[len(_CLIP_PREFIX) :].strip():
        return None
    return f"expected {', '.join(_IMAGE_ENCODER_NAMES)} or {_CLIP_PREFIX}<model folder>"


@dataclass(frozen=True)
class DataConfig:
    """Which dataset and how to read it (see ``core.data``)."""

    # A built-in name, synthetic[:preset], or an MKGformer-layout folder.
    dataset: str = _value("umls", stage1=True)
    candidates: str = _choice(
        "entities",
        ("entities", "entity2text"),
        stage1=True,
        registry="core.data.mkgformer.CANDIDATE_SETS",
    )
    drop_unknown: bool = _value(False, stage1=True)
    image_root: str | None = _value(None, stage1=True)
    # "anonymous" replaces every entity's text by an opaque id (e0042): structure must carry it.
    entity_text: str = _choice("dataset", ("dataset", "anonymous"), stage1=True)


@dataclass(frozen=True)
class FeaturesConfig:
    """Frozen text and image encoders whose features are computed once and cached."""

    text_encoder: str = _value("minilm", stage1=True, check=_check_text_encoder)
    image_encoder: str = _value("efficientnet-lite0", stage1=True, check=_check_image_encoder)
    text_max_length: int = _range(64, 1, 512, stage1=True)
    # FeatureSettings' own minimum: EfficientNet-Lite0 downsamples by 32, smaller inputs have no
    # feature map (tests/core/test_config.py builds FeatureSettings at both bounds).
    image_size: int = _range(224, 32, 1024, stage1=True)
    max_images_per_entity: int = _range(4, 1, 64, stage1=True)


@dataclass(frozen=True)
class ModelConfig:
    """Structure-MKGformer, the feature extractor that scores every candidate (x_0)."""

    hidden_dim: int = _range(128, 8, 8192, stage1=True)
    num_layers: int = _range(2, 1, 48, stage1=True)
    num_heads: int = _range(4, 1, 64, stage1=True)
    # The last layers, where visual tokens join the text tokens.
    fusion_layers: int = _range(1, 0, 48, stage1=True)
    dropout: float = _range(0.1, 0.0, 0.9, stage1=True)
    use_text: bool = _value(True, stage1=True)
    use_image: bool = _value(True, stage1=True)


@dataclass(frozen=True)
class StructureConfig:
    """The MGAT structure encoder over a training-only subgraph, and the adaptive λ fusion."""

    # "none" in the default recipe: without MGAT the extractor's mean valid MRR over the graphs it
    # was chosen on was higher (level on umls, +0.009 with opaque ids, +0.030 on nations, -0.004
    # on synthetic:small; BENCHMARKS.md, "Choosing the default recipe") at a fraction of the cost;
    # "mgat" is the paper's model, which the paper-ablation, sensitivity, demo studies set.
    encoder: str = _choice("none", ("mgat", "none"), stage1=True)
    conv: str = _choice(
        "gatv2", ("gat", "gatv2"), stage1=True, registry="core.model.structure.CONVOLUTIONS"
    )
    hops: int = _range(1, 1, 1, stage1=True)  # 1-hop subgraphs only for now
    max_nodes: int = _range(16, 2, 4096, stage1=True)
    neighbour_selection: str = _choice(
        "relation",
        ("relation", "random"),
        stage1=True,
        registry="core.model.structure.NEIGHBOUR_SELECTIONS",
    )
    heads: int = _range(2, 1, 16, stage1=True)
    layers: int = _range(2, 1, 8, stage1=True)
    fusion: str = _choice(
        "learned-scalar",
        ("learned-scalar", "learned-vector", "fixed"),
        stage1=True,
        registry="core.model.structure.FUSION_MODES",
    )
    # The fixed λ, or the learned gate's start value.
    lambda_fusion: float = _range(0.5, 0.0, 1.0, stage1=True)


@dataclass(frozen=True)
class DiffusionConfig:
    """The diffusion process over candidate scores and the conditional denoiser (CDenoiser)."""

    enabled: bool = True  # False: stage 1 only (the "−diffusion" ablation)
    steps: int = _range(5, 1, 1000)
    schedule: str = _choice(
        "linear", ("linear", "cosine"), registry="core.model.diffusion.BETA_SCHEDULES"
    )
    beta_start: float = _range(1e-4, 0.0, 1.0, low_open=True, high_open=True)
    beta_end: float = _range(0.02, 0.0, 1.0, low_open=True, high_open=True)
    target: str = _choice("x0", ("x0", "epsilon"), registry="core.model.diffusion.TARGETS")
    reverse: str = _choice(
        "ddpm", ("ddpm", "residual"), registry="core.model.diffusion.REVERSE_PROCESSES"
    )
    diffuse: str = _choice("full", ("full", "top-k"))
    top_k: int = _range(1024, 1, 1_000_000)
    top_k_order: str = _choice(
        "score", ("score", "id"), registry="core.model.diffusion.TOP_K_ORDERS"
    )
    # Outside the top-k: below every kept candidate, or the extractor's own score (released code,
    # where a dropped entity may then outrank denoised ones).
    top_k_fill: str = _choice("below-kept", ("below-kept", "extractor"))
    # x_0 as diffused: the extractor's scores standardised per query (the noise schedule then
    # means the same at any logit scale) or raw logits (the released code).
    x0: str = _choice("standardised", ("standardised", "raw"))
    denoiser_width: int = _range(1024, 8, 16384)
    denoiser_depth: int = _range(1, 1, 32)
    denoiser_dropout: float = _range(0.1, 0.0, 0.9)


@dataclass(frozen=True)
class LossConfig:
    """Stage 1: BCE. Stage 2: w_kl·KL + w_bce·BCE, extractor frozen (paper) or fine-tuned (code)."""

    label_smoothing: float = _range(0.1, 0.0, 0.5, stage1=True)
    # Stage 1's loss over all candidates: per-entity BCE (the released code) or softmax cross
    # entropy against the normalised multi-hot answers (MKGformer's masked-entity prediction).
    stage1: str = _choice("bce", ("bce", "cross-entropy"), stage1=True)
    w_kl: float = _range(1.0, 0.0, 1e6)  # the released code uses 1e-4 on raw logits
    # KL(softmax x_0 ‖ softmax x̂_0) summed over the N diffused entities ("sum", so its weight
    # against the per-entity mean BCE grows with N) or averaged over them ("mean": w_kl then means
    # the same at 14 and at 14,541 entities). Both average over the batch.
    kl_reduction: str = _choice("sum", ("sum", "mean"))
    w_bce: float = _range(1.0, 0.0, 1e6)
    stage2_extractor: str = _choice("frozen", ("frozen", "finetune"))
    # What stage 2 trains: the denoiser through the diffusion loss, or (a control for studies)
    # the extractor alone with its stage-1 loss for the same epochs at lr_stage2, which separates
    # "more extractor training" from "diffusion" when compared with stage2_extractor=finetune.
    stage2_objective: str = _choice("diffusion", ("diffusion", "extractor-bce"))


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation for both stages; early stopping watches valid MRR under the clean protocol."""

    stage1_epochs: int = _range(200, 0, 100_000, stage1=True)
    stage2_epochs: int = _range(10, 0, 100_000)
    batch_size: int = _range(128, 1, 1_000_000, stage1=True)  # both stages
    lr_stage1: float = _range(3e-3, 0.0, 10.0, low_open=True, stage1=True)
    lr_stage2: float = _range(1e-3, 0.0, 10.0, low_open=True)
    weight_decay: float = _range(0.01, 0.0, 10.0, stage1=True)
    warmup_fraction: float = _range(0.1, 0.0, 1.0, stage1=True)
    # Epochs without valid MRR gain; 0 disables.
    patience: int = _range(20, 0, 100_000, stage1=True)
    # When stage 1's patience runs out, it restarts from its best weights at plateau_lr_factor
    # times its learning rate, with fresh optimizer moments, up to plateau_decays times before it
    # stops: a plateau at a high learning rate is often not the best the extractor can reach.
    plateau_decays: int = _range(2, 0, 100, stage1=True)
    plateau_lr_factor: float = _range(0.2, 0.0, 1.0, low_open=True, stage1=True)
    mixed_precision: str = _choice("no", ("no", "bf16", "fp16"), stage1=True)
    eval_every: int = _range(1, 1, 100_000, stage1=True)
    max_grad_norm: float = _range(1.0, 0.0, 1e6, stage1=True)
    # Stage-2 model selection: "include-stage1" also keeps the extractor alone (evaluated before
    # the first stage-2 epoch, the identity a zero-initialised denoiser gives) as a candidate, so
    # the final model is never worse on valid than its stage 1; "stage2-only" keeps stage 2's best
    # epoch whatever it scores, to measure the diffusion stage's own effect in a study.
    stage2_selection: str = _choice("include-stage1", ("include-stage1", "stage2-only"))
    # Memory a frozen stage 2 may spend keeping each query's encoding (2·hidden_dim floats per
    # distinct (head, relation) query); above it queries are re-encoded at every use. 0: never keep.
    query_cache_mib: int = _range(4096, 0, 10_000_000)
    # Fraction of the training triples stage 1 never sees, drawn per seed (0: it sees them all).
    # Stage 1 learns its labels and its structure from the rest; filtered evaluation still knows
    # every training triple.
    holdout_fraction: float = _range(0.0, 0.0, 0.9, stage1=True, keyed_at_default=False)
    # What stage 2 trains on: "fit", the queries stage 1 trained on (its scores are in sample);
    # "held-out", the queries of the held-out triples, whose scores are out of sample as a test
    # query's are, in the extractor's own hidden space (needs holdout_fraction > 0).
    stage2_queries: str = _choice("fit", ("fit", "held-out"))


@dataclass(frozen=True)
class EvalConfig:
    """Evaluation protocols: ``clean`` (no label use, the only one for model selection) and
    ``official-min-of-S`` (minimum gold rank over S stochastic passes; label-using, reported only)."""

    # Stage 1 picks its best epoch on valid ranks computed in batches of this size, and batched
    # float maths need not give bitwise equal scores at another size.
    batch_size: int = _range(256, 1, 1_000_000, stage1=True)
    clean_inference: str = _choice("zero-noise", ("zero-noise", "mean-of-samples"))
    clean_samples: int = _range(1, 1, 1000)
    official_samples: int = _range(20, 1, 1000)
    report_official: bool = True
    # Stage 1's early stopping and best epoch compare valid MRR under this tie policy.
    tie: str = _choice(
        "realistic",
        ("realistic", "optimistic", "pessimistic"),
        stage1=True,
        registry="core.evaluation.ranking.TIE_POLICIES",
    )


# core.baselines.BASELINE_MODELS, written out as the registries above are (tests/core/test_config.py
# checks the two are equal): core.baselines imports PyKEEN, which this module must not.
_BASELINE_MODELS = (
    "pykeen:TransE",
    "pykeen:DistMult",
    "pykeen:ComplEx",
    "pykeen:RotatE",
    "pykeen:TuckER",
)


@dataclass(frozen=True)
class BaselineConfig:
    """A classical KGC model trained through PyKEEN in place of DiffusionCom (``core.baselines``),
    ranked by the same evaluator on the same splits. A DiffusionCom run (model none) ignores the
    other settings."""

    # none: DiffusionCom itself. A baseline reads, besides this section, only data, eval.tie,
    # eval.batch_size and seed.
    model: str = _choice("none", ("none", *_BASELINE_MODELS))
    # Real dimensions for TransE, DistMult and TuckER; complex ones (2x the reals) for ComplEx
    # and RotatE, as PyKEEN counts them.
    embedding_dim: int = _range(200, 1, 100_000)
    lr: float = _range(0.01, 0.0, 10.0, low_open=True)  # Adam
    batch_size: int = _range(256, 1, 1_000_000)
    # The most epochs it trains, each followed by a valid evaluation.
    epochs: int = _range(1000, 1, 1_000_000)
    # 0: no time budget; else it stops after the epoch at which the clock reaches it.
    budget_seconds: float = _range(0.0, 0.0, 1e9)
    # What budget_seconds counts: this process's CPU time or the wall clock, from the start of
    # the run (set-up included) and summed over resumes.
    clock: str = _choice("cpu", ("cpu", "wall"))
    # Epochs without a better valid MRR before it stops; 0 disables.
    patience: int = _range(0, 0, 100_000)


@dataclass(frozen=True)
class ExperimentConfig:
    """Everything that defines one run."""

    data: DataConfig = field(default_factory=DataConfig)
    features: FeaturesConfig = field(default_factory=FeaturesConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    structure: StructureConfig = field(default_factory=StructureConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    baseline: BaselineConfig = field(default_factory=BaselineConfig)
    seed: int = _range(0, 0, 2**31 - 1, stage1=True)

    def __post_init__(self) -> None:
        if self.model.hidden_dim % self.model.num_heads:
            raise ConfigError(
                f"model.hidden_dim={self.model.hidden_dim} must be divisible by "
                f"model.num_heads={self.model.num_heads}"
            )
        if self.model.fusion_layers > self.model.num_layers:
            raise ConfigError(
                f"model.fusion_layers={self.model.fusion_layers} exceeds model.num_layers={self.model.num_layers}"
            )
        if self.diffusion.beta_start > self.diffusion.beta_end:
            raise ConfigError(
                f"diffusion.beta_start={self.diffusion.beta_start} exceeds diffusion.beta_end={self.diffusion.beta_end}"
            )
        if self.train.stage2_queries == "held-out" and self.train.holdout_fraction == 0:
            raise ConfigError(
                "train.stage2_queries=held-out trains stage 2 on triples stage 1 never saw, so it "
                "needs train.holdout_fraction > 0"
            )
        if self.diffusion.reverse == "residual" and self.diffusion.target != "epsilon":
            raise ConfigError(
                "diffusion.reverse=residual subtracts the predicted noise, so it needs diffusion.target=epsilon"
            )


# --------------------------------------------------------------------------------------- building


def _coerce(value, annotation, key: str):
    """Check ``value`` against a field's type; ints are accepted where floats are expected."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(annotation)
        if value is None and type(None) in options:
            return None
        annotation = next(option for option in options if option is not type(None))
    if annotation is bool:
        if isinstance(value, bool):
            return value
    elif annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif annotation is float:
        number = None
        if isinstance(value, int | float) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):  # a quoted number, e.g. "1e-4"
            with contextlib.suppress(ValueError):
                number = float(value)
        if number is not None:
            # NaN passes every range check (each comparison is False); infinity is no setting.
            if not math.isfinite(number):
                raise ConfigError(f"{key}: expected a finite number, got {value!r}")
            return number
    elif annotation is str:
        if isinstance(value, str):
            return value
    else:  # pragma: no cover - every field is one of the types above
        return value
    hint = ""
    if annotation is str and isinstance(value, bool):
        hint = " (YAML reads yes/no/on/off/true/false as booleans: quote the value)"
    raise ConfigError(f"{key}: expected {annotation.__name__}, got {value!r}{hint}")


def _check_field(spec: dataclasses.Field, value, key: str) -> None:
    choices = spec.metadata.get("choices")
    if choices is not None and value not in choices:
        raise ConfigError(f"{key}: {value!r} is not valid; choose one of {', '.join(choices)}")
    bounds = spec.metadata.get("range")
    if bounds is not None and value is not None:
        low, high, low_open, high_open = bounds
        if (low is not None and (value <= low if low_open else value < low)) or (
            high is not None and (value >= high if high_open else value > high)
        ):
            interval = f"{'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
            raise ConfigError(f"{key}: {value!r} is outside {interval}")
    check = spec.metadata.get("check")
    if check is not None and value is not None and (expected := check(value)) is not None:
        raise ConfigError(f"{key}: {value!r} is not valid; {expected}")


def _build(cls, data: dict, prefix: str):
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {spec.name: spec for spec in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        where = f"{prefix}." if prefix else ""
        raise ConfigError(
            f"unknown key {where}{unknown[0]}; valid keys{' of ' + prefix if prefix else ''}: "
            f"{', '.join(fields)}"
        )
    values = {}
    for name, value in data.items():
        key = f"{prefix}.{name}" if prefix else name
        annotation = hints[name]
        if dataclasses.is_dataclass(annotation):
            values[name] = _build(annotation, value, key)
        else:
            values[name] = _coerce(value, annotation, key)
            _check_field(fields[name], values[name], key)
    return cls(**values)


def config_from_dict(data: dict) -> ExperimentConfig:
    """Build and validate a config from a nested dict (missing keys take their defaults)."""
    return _build(ExperimentConfig, data, "")


def config_to_dict(config: ExperimentConfig) -> dict:
    """The nested dict of a config; ``config_from_dict(config_to_dict(c)) == c``."""
    return dataclasses.asdict(config)


def coerce_value(key: str, value):
    """``value`` as the dotted config key ``key`` holds it, read as a config file's value is.

    Ints become floats where floats are expected, and so does number text (``"1e-4"``); NaN,
    infinity and values of the wrong type are refused. Choices and ranges are checked when the
    config is built.

    Raises:
        ConfigError: naming ``key``.
    """
    cls = ExperimentConfig
    *sections, name = key.split(".")
    for section in sections:
        cls = typing.get_type_hints(cls).get(section) if dataclasses.is_dataclass(cls) else None
    hints = typing.get_type_hints(cls) if dataclasses.is_dataclass(cls) else {}
    if name not in hints or dataclasses.is_dataclass(hints[name]):
        raise ConfigError(f"{key} is not a config value")
    return _coerce(value, hints[name], key)


# ------------------------------------------------------------------------------------------- YAML


class _YamlLoader(yaml.SafeLoader):
    """PyYAML's safe loader, reading numbers as YAML 1.2 does.

    YAML 1.1, which PyYAML follows, reads ``1e-4``, ``5e3`` and ``1.0e4`` (a mantissa without a
    dot, or an exponent without a sign) as text; a config or study file means the number.
    """


_YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+.0123456789"),
)


def _refuse_repeated_keys(node: yaml.Node, location: str, source: Path, visited: set) -> None:
    """PyYAML keeps the last of a mapping's repeated keys silently: refuse them instead."""
    if id(node) in visited:  # an alias of a node already checked
        return
    visited.add(id(node))
    if isinstance(node, yaml.MappingNode):
        first_lines: dict[str, int] = {}
        for key_node, value_node in node.value:
            scalar = isinstance(key_node, yaml.ScalarNode)
            key = key_node.value if scalar else "?"
            child = f"{location}.{key}" if location else key
            line = key_node.start_mark.line + 1
            if scalar and key in first_lines:
                raise ConfigError(
                    f"{source}:{line}: {child}: repeated key (first on line {first_lines[key]})"
                )
            first_lines[key] = line
            _refuse_repeated_keys(value_node, child, source, visited)
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            _refuse_repeated_keys(item, f"{location}[{index}]", source, visited)


def read_yaml(path: str | Path, what: str = "config"):
    """Read a YAML file of this project (a config or a study): the one policy for both.

    Safe tags only; ``1e-4`` is a number (:class:`_YamlLoader`); a key repeated in a mapping is
    an error, not the silent last-one-wins of PyYAML.

    Args:
        path: the file.
        what: what the file is, for the message when it cannot be read.

    Returns:
        The document (``None`` for an empty file).

    Raises:
        ConfigError: ``FILE: cannot read ...``, ``FILE:LINE: not valid YAML (...)`` or
            ``FILE:LINE: dotted.key: repeated key (first on line N)``.
    """
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as error:
        raise ConfigError(f"{path}: cannot read {what} ({error.strerror})") from None
    loader = _YamlLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _refuse_repeated_keys(node, "", path, set())
        return loader.construct_document(node)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f":{mark.line + 1}" if mark else ""
        problem = getattr(error, "problem", None) or error
        raise ConfigError(f"{path}{where}: not valid YAML ({problem})") from None
    finally:
        loader.dispose()


def _override_value(raw: str):
    """Read an override value as YAML 1.2's core schema would.

    PyYAML follows YAML 1.1, where ``no`` is ``False`` and ``1e-4`` is a string; on a command line
    both surprise (``--set train.mixed_precision=no``), so plain words stay strings, numbers in any
    notation are numbers and only ``true``/``false``/``null`` are special.
    """
    text = raw.strip()
    lowered = text.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    if lowered in ("null", "~", ""):
        return None if lowered else ""
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    if text[:1] in "[{\"'":
        try:
            return yaml.load(text, Loader=_YamlLoader)  # a SafeLoader: safe tags only
        except yaml.YAMLError as error:
            raise ConfigError(f"value {raw!r} is not valid YAML ({error})") from None
    return text


def parse_override(text: str) -> tuple[list[str], object]:
    """``"diffusion.steps=20"`` → ``(["diffusion", "steps"], 20)`` (see :func:`_override_value`)."""
    key, equals, raw = text.partition("=")
    if not equals or not key.strip():
        raise ConfigError(f"override {text!r}: expected KEY=VALUE, e.g. diffusion.steps=20")
    try:
        value = _override_value(raw)
    except ConfigError as error:
        raise ConfigError(f"override {text!r}: {error}") from None
    return key.strip().split("."), value


def _set_dotted(tree: dict, path: list[str], value, text: str) -> None:
    node = tree
    for part in path[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {text!r}: {part} is a value, not a section")
        node = child
    node[path[-1]] = value


def load_config(
    path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()
) -> ExperimentConfig:
    """Read a YAML config (:func:`read_yaml`), apply ``KEY=VALUE`` overrides, validate.

    Errors name the file, and for YAML errors (syntax, a repeated key) the line.
    """
    tree: dict = {}
    if path is not None:
        path = Path(path)
        loaded = read_yaml(path, "config")
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(
                f"{path}: expected a mapping of sections, got {type(loaded).__name__}"
            )
        tree = loaded or {}
    for text in overrides:
        keys, value = parse_override(text)
        _set_dotted(tree, keys, value, text)
    try:
        return config_from_dict(tree)
    except ConfigError as error:
        raise ConfigError(f"{path}: {error}" if path is not None else str(error)) from None


def save_config(config: ExperimentConfig, path: str | Path) -> None:
    """Write the config as indented JSON, atomically (``config.json`` carries no
    ``format_version``: the config's schema is its version, see :mod:`runstore`)."""
    write_json(path, config_to_dict(config), CONFIG)


def stage1_key_values(config: ExperimentConfig) -> dict:
    """:func:`stage1_relevant` without the fields declared ``keyed_at_default=False`` that are at
    their default: what a stage-1 store key hashes. A stage-1 field added later leaves the keys
    of every config that does not use it, and so every existing store, unchanged."""
    relevant = stage1_relevant(config)
    for spec in dataclasses.fields(config):
        value = getattr(config, spec.name)
        if not dataclasses.is_dataclass(value):
            continue
        for inner in dataclasses.fields(value):
            if (
                inner.metadata.get("stage1")
                and inner.metadata.get("keyed_at_default") is False
                and getattr(value, inner.name) == inner.default
            ):
                del relevant[spec.name][inner.name]
    return relevant


def stage1_relevant(config: ExperimentConfig) -> dict:
    """The config values a stage-1 run depends on, as a nested dict.

    These are the fields declared with ``stage1=True`` (the data, the features, the extractor and
    its structure encoder, the stage-1 optimisation with its early stopping and best-epoch choice,
    the stage-1 loss and the seed), in sections as in :func:`config_to_dict`. Two configs with equal
    values here train the same stage 1: a stage-2-only run may start from the other's stage-1
    checkpoint (the trainer checks it) and sweeps share one stage-1 run between them
    (``sweeps.stage1`` keys its store by a hash of this). tests/core/train/test_stage1_relevance.py
    trains stage 1 under another value of every other key and checks the weights stay equal.
    """
    tree = config_to_dict(config)
    relevant: dict = {}
    for spec in dataclasses.fields(config):
        value = getattr(config, spec.name)
        if dataclasses.is_dataclass(value):
            keys = {
                inner.name: tree[spec.name][inner.name]
                for inner in dataclasses.fields(value)
                if inner.metadata.get("stage1")
            }
            if keys:
                relevant[spec.name] = keys
        elif spec.metadata.get("stage1"):
            relevant[spec.name] = tree[spec.name]
    return relevant
