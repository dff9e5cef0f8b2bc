"""One typed experiment config: frozen dataclasses built from YAML and dotted overrides.

Every run and trial directory, and every checkpoint, holds the config as JSON. Unknown keys and bad
values are rejected before any work starts, naming the key and listing what is valid::

    config = load_config("run.yaml", overrides=["diffusion.steps=20", "structure.fusion=fixed"])

The defaults are the shipped recipe, what ``diffcom train --dataset X`` runs with no config file;
``core/configs/recipe.yaml`` spells every value out for users to start from (a test keeps the two
equal). They were chosen on valid MRR across datasets, never per dataset (BENCHMARKS.md).
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

__all__ = [
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
    "parse_override",
    "save_config",
    "stage1_relevant",
]


class ConfigError(ValueError):
    """A config key or value that is not valid; the message names the key and the valid choices."""


def _choice(default: str, choices: tuple[str, ...]):
    return field(default=default, metadata={"choices": choices})


def _range(default, low=None, high=None, *, low_open=False, high_open=False):
    return field(default=default, metadata={"range": (low, high, low_open, high_open)})


@dataclass(frozen=True)
class DataConfig:
    """Which dataset and how to read it (see ``core.data``)."""

    dataset: str = "umls"  # a built-in name, synthetic[:preset], or an MKGformer-layout folder
    candidates: str = _choice("entities", ("entities", "entity2text"))
    drop_unknown: bool = False
    image_root: str | None = None
    # "anonymous" replaces every entity's text by an opaque id (e0042): structure must carry it.
    entity_text: str = _choice("dataset", ("dataset", "anonymous"))


@dataclass(frozen=True)
class FeaturesConfig:
    """Frozen text and image encoders whose features are computed once and cached."""

    text_encoder: str = "minilm"  # "minilm", "none", or a local model folder
    image_encoder: str = "efficientnet-lite0"  # "efficientnet-lite0", "none", or "clip:<folder>"
    text_max_length: int = _range(64, 1, 512)
    image_size: int = _range(224, 16, 1024)
    max_images_per_entity: int = _range(4, 1, 64)


@dataclass(frozen=True)
class ModelConfig:
    """Structure-MKGformer, the feature extractor that scores every candidate (x_0)."""

    hidden_dim: int = _range(128, 8, 8192)
    num_layers: int = _range(2, 1, 48)
    num_heads: int = _range(4, 1, 64)
    fusion_layers: int = _range(1, 0, 48)  # last layers where visual tokens join the text tokens
    dropout: float = _range(0.1, 0.0, 0.9)
    use_text: bool = True
    use_image: bool = True


@dataclass(frozen=True)
class StructureConfig:
    """The MGAT structure encoder over a training-only subgraph, and the adaptive λ fusion."""

    encoder: str = _choice("mgat", ("mgat", "none"))
    conv: str = _choice("gatv2", ("gat", "gatv2"))
    hops: int = _range(1, 1, 1)  # 1-hop subgraphs only for now
    max_nodes: int = _range(16, 2, 4096)
    neighbour_selection: str = _choice("relation", ("relation", "random"))
    heads: int = _range(2, 1, 16)
    layers: int = _range(2, 1, 8)
    fusion: str = _choice("learned-scalar", ("learned-scalar", "learned-vector", "fixed"))
    lambda_fusion: float = _range(0.5, 0.0, 1.0)  # the fixed λ, or the learned gate's start value


@dataclass(frozen=True)
class DiffusionConfig:
    """The diffusion process over candidate scores and the conditional denoiser (CDenoiser)."""

    enabled: bool = True  # False: stage 1 only (the "−diffusion" ablation)
    steps: int = _range(5, 1, 1000)
    schedule: str = _choice("linear", ("linear", "cosine"))
    beta_start: float = _range(1e-4, 0.0, 1.0, low_open=True, high_open=True)
    beta_end: float = _range(0.02, 0.0, 1.0, low_open=True, high_open=True)
    target: str = _choice("x0", ("x0", "epsilon"))
    reverse: str = _choice("ddpm", ("ddpm", "residual"))
    diffuse: str = _choice("full", ("full", "top-k"))
    top_k: int = _range(1024, 1, 1_000_000)
    top_k_order: str = _choice("score", ("score", "id"))
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

    label_smoothing: float = _range(0.1, 0.0, 0.5)
    # Stage 1's loss over all candidates: per-entity BCE (the released code) or softmax cross
    # entropy against the normalised multi-hot answers (MKGformer's masked-entity prediction).
    stage1: str = _choice("bce", ("bce", "cross-entropy"))
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

    stage1_epochs: int = _range(200, 0, 100_000)
    stage2_epochs: int = _range(10, 0, 100_000)
    batch_size: int = _range(128, 1, 1_000_000)
    lr_stage1: float = _range(5e-3, 0.0, 10.0, low_open=True)
    lr_stage2: float = _range(1e-3, 0.0, 10.0, low_open=True)
    weight_decay: float = _range(0.01, 0.0, 10.0)
    warmup_fraction: float = _range(0.1, 0.0, 1.0)
    patience: int = _range(20, 0, 100_000)  # epochs without valid MRR gain; 0 disables
    mixed_precision: str = _choice("no", ("no", "bf16", "fp16"))
    eval_every: int = _range(1, 1, 100_000)
    max_grad_norm: float = _range(1.0, 0.0, 1e6)
    # Stage-2 model selection: "include-stage1" also keeps the extractor alone (evaluated before
    # the first stage-2 epoch, the identity a zero-initialised denoiser gives) as a candidate, so
    # the final model is never worse on valid than its stage 1; "stage2-only" keeps stage 2's best
    # epoch whatever it scores, to measure the diffusion stage's own effect in a study.
    stage2_selection: str = _choice("include-stage1", ("include-stage1", "stage2-only"))
    # Memory a frozen stage 2 may spend keeping each query's encoding (2·hidden_dim floats per
    # distinct (head, relation) query); above it queries are re-encoded at every use. 0: never keep.
    query_cache_mib: int = _range(4096, 0, 10_000_000)


@dataclass(frozen=True)
class EvalConfig:
    """Evaluation protocols: ``clean`` (no label use, the only one for model selection) and
    ``official-min-of-S`` (minimum gold rank over S stochastic passes; label-using, reported only)."""

    batch_size: int = _range(256, 1, 1_000_000)
    clean_inference: str = _choice("zero-noise", ("zero-noise", "mean-of-samples"))
    clean_samples: int = _range(1, 1, 1000)
    official_samples: int = _range(20, 1, 1000)
    report_official: bool = True
    tie: str = _choice("realistic", ("realistic", "optimistic", "pessimistic"))


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
    seed: int = _range(0, 0, 2**31 - 1)

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
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads 1e-4 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif annotation is str:
        if isinstance(value, str):
            return value
    else:  # pragma: no cover - every field is one of the types above
        return value
    hint = ""
    if annotation is str and isinstance(value, bool):
        hint = " (YAML reads yes/no/on/off as booleans: quote the value)"
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
            return yaml.safe_load(text)
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
    """Read a YAML config (``yaml.safe_load``), apply ``KEY=VALUE`` overrides, validate.

    Errors name the file, and for YAML syntax errors the line.
    """
    tree: dict = {}
    if path is not None:
        path = Path(path)
        try:
            text = path.read_text()
        except OSError as error:
            raise ConfigError(f"{path}: cannot read config ({error.strerror})") from None
        try:
            loaded = yaml.safe_load(text)
        except yaml.YAMLError as error:
            mark = getattr(error, "problem_mark", None)
            where = f":{mark.line + 1}" if mark else ""
            raise ConfigError(
                f"{path}{where}: not valid YAML ({getattr(error, 'problem', error)})"
            ) from None
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
    """Write the config as indented JSON."""
    Path(path).write_text(json.dumps(config_to_dict(config), indent=2) + "\n")


# Everything stage 1 reads: the data, the features, the extractor and its structure encoder, the
# stage-1 optimisation (early stopping and clipping included), the label smoothing and the seed.
_STAGE1_SECTIONS = ("data", "features", "model", "structure")
_STAGE1_TRAIN_KEYS = (
    "stage1_epochs",
    "batch_size",
    "lr_stage1",
    "weight_decay",
    "warmup_fraction",
    "eval_every",
    "patience",
    "max_grad_norm",
    "mixed_precision",
)


def stage1_relevant(config: ExperimentConfig) -> dict:
    """The config values a stage-1 run depends on, as a nested dict.

    Two configs with equal values here train the same stage 1: a stage-2-only run may start from
    the other's stage-1 checkpoint (the trainer checks it) and sweeps share one stage-1 run between
    them (``sweeps.stage1`` keys its store by a hash of this).
    """
    tree = config_to_dict(config)
    return {
        **{section: tree[section] for section in _STAGE1_SECTIONS},
        "train": {key: tree["train"][key] for key in _STAGE1_TRAIN_KEYS},
        "loss": {key: tree["loss"][key] for key in ("label_smoothing", "stage1")},
        "seed": tree["seed"],
    }
