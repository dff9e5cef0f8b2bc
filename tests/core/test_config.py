import json

import pytest

from core.config import (
    ConfigError,
    ExperimentConfig,
    config_from_dict,
    config_to_dict,
    load_config,
    save_config,
)


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
    config = load_config(path, ["diffusion.steps=30", "loss.w_kl=0.5"])
    assert config.data.dataset == "nations"
    assert (config.diffusion.steps, config.diffusion.denoiser_width) == (30, 64)
    assert config.loss.w_kl == 0.5 and isinstance(config.loss.w_kl, float)


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
