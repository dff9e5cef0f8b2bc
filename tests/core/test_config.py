import dataclasses
import importlib
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from core.config import (
    ConfigError,
    ExperimentConfig,
    config_from_dict,
    config_to_dict,
    load_config,
    read_yaml,
    save_config,
    stage1_relevant,
)

REPO = Path(__file__).resolve().parents[2]


def test_defaults_round_trip_through_json(tmp_path):
    config = load_config(overrides=["diffusion.steps=40", "structure.fusion=fixed", "seed=7"])
    save_config(config, tmp_path / "config.json")
    again = config_from_dict(json.loads((tmp_path / "config.json").read_text()))
    assert again == config
    assert (again.diffusion.steps, again.structure.fusion, again.seed) == (40, "fixed", 7)
    assert config_from_dict(config_to_dict(ExperimentConfig())) == ExperimentConfig()


def test_yaml_file_and_overrides_combine(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("data:\n  dataset: nations\ndiffusion:\n  steps: 10\n  denoiser_width: 64\n")
    config = load_config(path, ["diffusion.steps=30", "loss.w_kl=2"])
    assert config.data.dataset == "nations"
    assert (config.diffusion.steps, config.diffusion.denoiser_width) == (30, 64)
    # An integer given for a float field is stored as the float its type annotation declares.
    assert config.loss.w_kl == 2.0 and type(config.loss.w_kl) is float


@pytest.mark.parametrize(
    ("override", "message"),
    [
        (
            "diffusion.stepz=3",
            "unknown key diffusion.stepz; valid keys of diffusion: enabled, steps",
        ),
        ("nonsense=1", "unknown key nonsense; valid keys: data, features"),
        (
            "structure.fusion=mean",
            "structure.fusion: 'mean' is not valid; choose one of learned-scalar",
        ),
        ("diffusion.steps=0", r"diffusion.steps: 0 is outside \[1, 1000\]"),
        ("train.lr_stage1=0", r"train.lr_stage1: 0.0 is outside \(0.0, 10.0\]"),
        ("diffusion.beta_end=1.0", r"diffusion.beta_end: 1.0 is outside \(0.0, 1.0\)"),
        ("train.batch_size=1.5", "train.batch_size: expected int, got 1.5"),
        ("model.use_text=maybe", "model.use_text: expected bool, got 'maybe'"),
        ("model=3", "model: expected a mapping"),
        ("diffusion.steps", "expected KEY=VALUE"),
        ("model.hidden_dim=102", "must be divisible by model.num_heads"),
        ("diffusion.reverse=residual", "needs diffusion.target=epsilon"),
        # The feature extractor's own limits hold at config load, before any dataset loads.
        ("features.image_size=31", r"features\.image_size: 31 is outside \[32, 1024\]"),
        (
            "features.image_encoder=clip",
            r"features\.image_encoder: 'clip' is not valid; expected efficientnet-lite0, none "
            r"or clip:<model folder>",
        ),
        ("features.image_encoder=clip: ", r"features\.image_encoder: 'clip:' is not valid"),
        (
            "baseline.model=TuckER",
            "baseline.model: 'TuckER' is not valid; choose one of none, pykeen:TransE, "
            "pykeen:DistMult, pykeen:ComplEx, pykeen:RotatE, pykeen:TuckER",
        ),
        ("baseline.clock=gpu", "baseline.clock: 'gpu' is not valid; choose one of cpu, wall"),
        ("baseline.lr=0", r"baseline\.lr: 0.0 is outside \(0.0, 10.0\]"),
        ("baseline.embedding_dim=0", r"baseline\.embedding_dim: 0 is outside \[1, "),
        ("baseline.batch_size=0", r"baseline\.batch_size: 0 is outside \[1, "),
        ("baseline.epochs=0", r"baseline\.epochs: 0 is outside \[1, "),
        ("baseline.budget_seconds=-1", r"baseline\.budget_seconds: -1.0 is outside \[0.0, "),
        ("baseline.patience=-1", r"baseline\.patience: -1 is outside \[0, "),
        ("baseline.epochs=2.5", "baseline.epochs: expected int, got 2.5"),
        (
            'features.text_encoder=" "',
            r"features\.text_encoder: ' ' is not valid; expected minilm, none or a local model",
        ),
    ],
)
def test_bad_values_are_rejected_with_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(overrides=[override])


def test_yaml_errors_name_the_file_and_line(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("diffusion:\n  steps: 10\n  width: [1, 2\n")
    with pytest.raises(ConfigError, match=r"broken\.yaml:\d+: not valid YAML"):
        load_config(path)
    path.write_text("diffusion:\n  stepz: 10\n")
    with pytest.raises(ConfigError, match=r"broken\.yaml: unknown key diffusion\.stepz"):
        load_config(path)
    path.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="expected a mapping of sections"):
        load_config(path)


def test_yaml_is_read_safely(tmp_path):
    path = tmp_path / "evil.yaml"
    path.write_text("seed: !!python/object/apply:os.system ['echo hi']\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(path)


def test_override_values_read_as_a_person_means_them(tmp_path):
    config = load_config(
        overrides=["train.mixed_precision=no", "train.lr_stage1=1e-4", "model.use_text=false"]
    )
    assert config.train.mixed_precision == "no"
    assert config.train.lr_stage1 == 1e-4
    assert config.model.use_text is False
    path = tmp_path / "run.yaml"
    path.write_text("train:\n  lr_stage2: 5e-4\n  mixed_precision: no\n")
    with pytest.raises(ConfigError, match="expected str, got False .*quote the value"):
        load_config(path)
    path.write_text("train:\n  lr_stage2: 5e-4\n")
    assert load_config(path).train.lr_stage2 == 5e-4
    with pytest.raises(ConfigError, match=r"seed: -3 is outside"):
        load_config(overrides=["seed=-3"])


def test_the_shipped_recipe_file_is_the_config_defaults():
    """`core/configs/recipe.yaml` spells out every default: the two never drift apart."""
    from pathlib import Path

    import yaml

    from core.config import ExperimentConfig, config_to_dict

    recipe = Path(__file__).resolve().parents[2] / "core" / "configs" / "recipe.yaml"
    assert load_config(recipe) == ExperimentConfig()
    # Every key is written out, not left to the defaults.
    written = yaml.safe_load(recipe.read_text())
    defaults = config_to_dict(ExperimentConfig())
    assert {s: set(v) if isinstance(v, dict) else v for s, v in written.items()} == {
        s: set(v) if isinstance(v, dict) else v for s, v in defaults.items()
    }


# ------------------------------------------------------------------------- one source of truth


def _fields_with(name: str):
    """``(dotted key, field)`` of every config value whose metadata holds ``name``."""
    for section in dataclasses.fields(ExperimentConfig):
        inner = (
            dataclasses.fields(section.default_factory())
            if section.default_factory is not dataclasses.MISSING
            else ()
        )
        for spec in inner or (section,):
            key = f"{section.name}.{spec.name}" if inner else section.name
            if name in spec.metadata:
                yield key, spec


def test_choices_equal_the_registries_they_select_from():
    """core.config writes each choice tuple out (registries import torch); they cannot drift."""
    checked = []
    for key, spec in _fields_with("registry"):
        module, _, name = spec.metadata["registry"].rpartition(".")
        registry = getattr(importlib.import_module(module), name)
        assert set(spec.metadata["choices"]) == set(registry), key
        checked.append(key)
    assert {"structure.conv", "diffusion.schedule", "eval.tie", "data.candidates"} <= set(checked)


def test_encoder_values_reach_every_registered_encoder():
    from core.features.image import IMAGE_ENCODERS
    from core.features.text import TEXT_ENCODERS
    from core.train.trainer import feature_settings

    texts = {
        feature_settings(load_config(overrides=[f"features.text_encoder={value}"])).text_encoder
        for value in ("minilm", "none", "/models/bert")
    }
    images = {
        feature_settings(load_config(overrides=[f"features.image_encoder={value}"])).image_encoder
        for value in ("efficientnet-lite0", "none", "clip:/models/clip")
    }
    assert texts == set(TEXT_ENCODERS) and images == set(IMAGE_ENCODERS)


def test_config_module_stays_light():
    """Configs load on a sweep's head node and in analysis helpers without importing torch."""
    code = "import sys, core.config; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], cwd=REPO).returncode == 0


def test_every_accepted_feature_value_is_a_valid_feature_setting():
    """A value the config accepts must not fail later, once the dataset has loaded."""
    from core.train.trainer import feature_settings

    for key, spec in _fields_with("range"):
        if not key.startswith("features."):
            continue
        low, high, _, _ = spec.metadata["range"]
        for bound in (low, high):
            feature_settings(load_config(overrides=[f"{key}={bound}"]))


# ---------------------------------------------------------------------------------- bad inputs


def test_repeated_keys_in_a_config_file_name_the_file_line_and_key(tmp_path):
    path = tmp_path / "run.yaml"
    # PyYAML keeps the second train block, so batch_size 0 would never be checked.
    path.write_text("train:\n  batch_size: 0\nseed: 1\ntrain:\n  lr_stage1: 1.0e-3\n")
    with pytest.raises(ConfigError, match=r"run\.yaml:4: train: repeated key \(first on line 1\)"):
        load_config(path)
    path.write_text("diffusion:\n  steps: 10\n  schedule: linear\n  steps: 20\n")
    with pytest.raises(
        ConfigError, match=r"run\.yaml:4: diffusion\.steps: repeated key \(first on line 2\)"
    ):
        load_config(path)


@pytest.mark.parametrize(
    "override",
    ["train.lr_stage1=nan", "train.lr_stage1=inf", "loss.w_kl=-inf", "diffusion.beta_start=NaN"],
)
def test_non_finite_numbers_are_refused_with_the_key(override):
    key = override.partition("=")[0]
    message = rf"{re.escape(key)}: expected a finite number, got"
    with pytest.raises(ConfigError, match=message):
        load_config(overrides=[override])


def test_non_finite_numbers_in_a_file_are_refused(tmp_path):
    path = tmp_path / "run.yaml"
    for text in ("train:\n  lr_stage1: .nan\n", 'train:\n  lr_stage1: "nan"\n'):
        path.write_text(text)
        with pytest.raises(ConfigError, match=r"run\.yaml: train\.lr_stage1: expected a finite"):
            load_config(path)


def test_exponent_numbers_read_as_numbers_in_files_and_overrides(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("train: {lr_stage1: 1e-4, lr_stage2: 5E-3}\nloss: {w_kl: 1.0e-4, w_bce: 2e1}\n")
    config = load_config(path, ["diffusion.beta_end=2e-2"])
    assert (config.train.lr_stage1, config.train.lr_stage2) == (1e-4, 5e-3)
    assert (config.loss.w_kl, config.loss.w_bce, config.diffusion.beta_end) == (1e-4, 20.0, 0.02)
    assert read_yaml(path)["train"]["lr_stage1"] == 1e-4  # a float before any coercion
    # Text stays text: a dataset folder that merely starts with digits is not a number.
    path.write_text("data:\n  dataset: 1e-4x\n")
    assert load_config(path).data.dataset == "1e-4x"


def test_stage1_relevance_is_declared_per_field():
    default = ExperimentConfig()
    relevant = stage1_relevant(default)
    assert relevant["eval"] == {"tie": "realistic", "batch_size": 256}
    assert "diffusion" not in relevant and "lr_stage2" not in relevant["train"]
    declared = {key for key, spec in _fields_with("stage1") if spec.metadata["stage1"]}
    flat = {
        f"{section}.{key}" if isinstance(values, dict) else section
        for section, values in relevant.items()
        for key in (values if isinstance(values, dict) else (None,))
    }
    assert flat == declared
    assert stage1_relevant(load_config(overrides=["eval.tie=optimistic"])) != relevant


# ------------------------------------------------------------------------------------ baselines


def test_baseline_settings_round_trip_and_leave_stage1_alone(tmp_path):
    overrides = [
        "baseline.model=pykeen:TuckER",
        "baseline.embedding_dim=64",
        "baseline.lr=3e-3",
        "baseline.budget_seconds=120",
        "baseline.clock=wall",
        "baseline.patience=5",
    ]
    config = load_config(overrides=overrides)
    save_config(config, tmp_path / "config.json")
    again = config_from_dict(json.loads((tmp_path / "config.json").read_text()))
    assert again == config
    assert (again.baseline.model, again.baseline.lr, again.baseline.budget_seconds) == (
        "pykeen:TuckER",
        3e-3,
        120.0,
    )
    assert again.baseline.clock == "wall" and again.baseline.embedding_dim == 64
    # A DiffusionCom run's shared stage 1 does not depend on any baseline setting.
    assert "baseline" not in stage1_relevant(config)
    assert stage1_relevant(config) == stage1_relevant(ExperimentConfig())
    # A config written before the section existed reads as DiffusionCom.
    written = config_to_dict(ExperimentConfig())
    del written["baseline"]
    assert config_from_dict(written).baseline.model == "none"


def test_baseline_model_choices_are_none_and_the_baselines():
    from core.baselines import BASELINE_MODELS

    (spec,) = [spec for key, spec in _fields_with("choices") if key == "baseline.model"]
    assert spec.metadata["choices"] == ("none", *BASELINE_MODELS)
