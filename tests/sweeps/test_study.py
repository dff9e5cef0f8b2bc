import json
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from core.config import config_to_dict, load_config
from sweeps.study import (
    STUDIES_DIR,
    Choice,
    Grid,
    LogUniform,
    StudyError,
    Uniform,
    expand_trials,
    load_study,
    shipped_studies,
    study_config,
    trial_config,
)

REPO = Path(__file__).resolve().parents[2]


def write_study(tmp_path, text: str) -> Path:
    path = tmp_path / "bad.yaml"
    path.write_text(textwrap.dedent(text))
    return path


def expandable(study) -> bool:
    return study.kind != "search" or study.search.algorithm == "grid"


# ------------------------------------------------------------------------------ shipped studies


@pytest.mark.parametrize("path", shipped_studies(), ids=lambda path: path.stem)
def test_every_shipped_study_loads_and_names_its_launch_command(path):
    study = load_study(path)
    first_line = path.read_text().splitlines()[0]
    assert first_line == f"# diffcom sweep launch sweeps/studies/{path.name}"
    assert study.name == path.stem
    assert study.metric == "valid.clean.mrr" and study.mode == "max"
    if expandable(study):
        trials = expand_trials(study)
        names = [trial.name for trial in trials]
        assert len(set(names)) == len(names)
        assert all(re.fullmatch(r"[a-z]+/[A-Za-z0-9._+=,-]+/seed-\d+", name) for name in names)
        for trial in trials:
            config = trial_config(study, trial)
            assert config.seed == trial.seed
            # The override strings rebuild the same config through core.config's own parser.
            assert load_config(study.base_config, trial.override_strings()) == config


def test_every_study_the_docs_name_is_shipped():
    """The commands in the README, Makefile, cluster.yaml and docs point at real study files."""
    documents = [REPO / name for name in ("README.md", "BENCHMARKS.md", "Makefile", "cluster.yaml")]
    documents += sorted((REPO / "docs").rglob("*.md"))
    named = {
        (document.name, REPO / "sweeps" / "studies" / name)
        for document in documents
        for name in re.findall(r"(?<![\w/])sweeps/studies/([\w.-]+\.yaml)", document.read_text())
    }
    assert {"Makefile", "README.md", "cluster.yaml"} <= {document for document, _ in named}
    missing = sorted(f"{document}: {path.name}" for document, path in named if not path.is_file())
    assert not missing, missing
    assert {path for _, path in named} <= set(shipped_studies())


def test_stage2_designs_share_one_stage1_per_seed_against_stage1_only():
    """The study's cost is three stage-1 runs: every design is a stage-2 change only."""
    from sweeps.stage1 import stage1_key

    study = load_study(STUDIES_DIR / "stage2-designs.yaml")
    assert study.reference == "stage1-only"
    configs = [trial_config(study, trial) for trial in expand_trials(study)]
    assert len(configs) == len(study.variants) * len(study.seeds)
    assert len({stage1_key(config) for config in configs}) == len(study.seeds)
    assert {c.train.stage2_selection for c in configs} == {"stage2-only"}


def test_paper_ablation_expands_to_stable_trials_seed_by_seed():
    study = load_study(STUDIES_DIR / "paper-ablation.yaml")
    trials = expand_trials(study)
    cells = len(study.variants)
    assert len(trials) == cells * len(study.seeds)
    assert trials[0].name == f"ablation/{study.variants[0].name}/seed-0"
    # Seed by seed, cells in file order.
    assert trials[cells + 1].name == f"ablation/{study.variants[1].name}/seed-1"
    again = expand_trials(load_study(STUDIES_DIR / "paper-ablation.yaml"))
    assert [trial.name for trial in again] == [trial.name for trial in trials]
    assert again == trials


def test_each_ablation_cell_changes_only_what_it_declares_and_no_two_cells_are_equal():
    """A cell whose override leaked into another, or that trains the same model as another,
    would put two labels on one result in the ablation table."""
    ablations = [load_study(path) for path in shipped_studies()]
    ablations = [study for study in ablations if study.kind == "ablation"]
    assert ablations
    for study in ablations:
        base = config_to_dict(study_config(study, seed=study.seeds[0]))
        declared = {
            variant.name: {key for key, _ in variant.overrides} for variant in study.variants
        }
        for baseline in study.baselines:
            budget = study.baseline_budget.overrides()
            declared[baseline.name] = {"baseline.model"} | {
                key for key, _ in (*baseline.settings, *budget)
            }
        configs = {
            trial.cell: config_to_dict(trial_config(study, trial))
            for trial in expand_trials(study)
            if trial.seed == study.seeds[0]
        }
        for cell, config in configs.items():
            assert _differences(config, base) <= declared[cell], f"{study.name}/{cell}"
        distinct = {json.dumps(config, sort_keys=True) for config in configs.values()}
        assert len(distinct) == len(configs), study.name


@pytest.mark.parametrize(
    ("name", "key"),
    [
        ("sensitivity-steps", "diffusion.steps"),
        ("sensitivity-width", "diffusion.denoiser_width"),
        ("sensitivity-depth", "diffusion.denoiser_depth"),
        ("sensitivity-lambda", "structure.lambda_fusion"),
    ],
)
def test_sensitivity_studies_sweep_one_axis_through_the_full_model(name, key):
    study = load_study(STUDIES_DIR / f"{name}.yaml")
    assert [axis.key for axis in study.axes] == [key]
    values = list(study.axes[0].values)
    # The curve passes through the ablation's full model, so one of its points is that model.
    full = config_to_dict(study_config(load_study(STUDIES_DIR / "paper-ablation.yaml")))
    section, field = key.split(".")
    assert full[section][field] in values
    expanded = expand_trials(study)
    assert len(expanded) == len(values) * len(study.seeds)
    assert expanded[1].name == f"sensitivity/{key}={values[1]}/seed-0"


def test_sensitivity_lambda_fixes_the_fusion_and_loss_moves_one_weight_at_a_time():
    lambda_study = load_study(STUDIES_DIR / "sensitivity-lambda.yaml")
    for trial in expand_trials(lambda_study):
        config = trial_config(lambda_study, trial)
        assert config.structure.fusion == "fixed"
        assert config.structure.lambda_fusion == trial.changes[0][1]

    loss = load_study(STUDIES_DIR / "sensitivity-loss.yaml")
    trials = [trial for trial in expand_trials(loss) if trial.seed == 0]
    # One trial per value of each axis: the centre point shared by both axes runs twice.
    assert len(trials) == sum(len(axis.values) for axis in loss.axes)
    for trial in trials:
        config = trial_config(loss, trial)
        moved, value = trial.changes[0]
        other = "loss.w_bce" if moved == "loss.w_kl" else "loss.w_kl"
        assert getattr(config.loss, moved.split(".")[1]) == value
        assert getattr(config.loss, other.split(".")[1]) == 1.0
        assert sum(1 for key, _ in trial.overrides if key == moved) == 1  # each key once


def _differences(left, right, prefix=""):
    keys = set()
    for name, value in left.items():
        key = f"{prefix}{name}"
        if isinstance(value, dict):
            keys |= _differences(value, right[name], f"{key}.")
        elif value != right[name]:
            keys.add(key)
    return keys


def test_sensitivity_centres_match_the_full_model_of_the_ablation():
    ablation = load_study(STUDIES_DIR / "paper-ablation.yaml")
    full = config_to_dict(study_config(ablation))
    for name in ("steps", "width", "depth", "lambda", "loss"):
        study = load_study(STUDIES_DIR / f"sensitivity-{name}.yaml")
        centre = config_to_dict(study_config(study))
        # Only the lambda study fixes the gate (its axis is the fixed lambda).
        assert _differences(centre, full) <= {"structure.fusion"}, name


def test_search_umls_draws_only_valid_configs_and_asha_spans_the_whole_run():
    study = load_study(STUDIES_DIR / "search-umls.yaml")
    search = study.search
    centre = study_config(study)
    # ASHA counts one report per epoch of both stages; a larger max_t never stops a trial at the
    # end, a smaller one stops every trial before its last epochs.
    assert search.asha.max_t == centre.train.stage1_epochs + centre.train.stage2_epochs
    # Every extreme the searcher can draw is a config core accepts (study_config raises if not).
    for key, distribution in search.space:
        extremes = (
            distribution.values
            if isinstance(distribution, Choice)
            else (distribution.low, distribution.high)
        )
        for value in extremes:
            study_config(study, [(key, value)], seed=0)
    with pytest.raises(StudyError, match=r"search-umls\.yaml: search\.algorithm: optuna-tpe draws"):
        expand_trials(study)
    sampled = study_config(study, [("diffusion.steps", 35), ("loss.w_kl", 0.3)], seed=4)
    assert (sampled.diffusion.steps, sampled.loss.w_kl, sampled.seed) == (35, 0.3, 4)


def test_demo_trains_two_stage1_runs_for_its_three_cells():
    """make demo's budget rests on stage-1 reuse: full and no-diffusion share one stage 1."""
    from sweeps.stage1 import stage1_key

    study = load_study(STUDIES_DIR / "demo.yaml")
    assert study.base_config == REPO / "core" / "configs" / "demo.yaml"
    configs = {trial.name: trial_config(study, trial) for trial in expand_trials(study)}
    assert len(configs) == 3 and {c.data.dataset for c in configs.values()} == {"umls"}
    keys = {name.split("/")[1]: stage1_key(config) for name, config in configs.items()}
    assert keys["full"] == keys["no-diffusion"] != keys["no-mgat"]


def test_an_ablation_names_the_variant_its_differences_are_against(tmp_path):
    designs = (
        "kind: ablation\nvariants:\n  ddpm: {}\n  stage1-only: {diffusion.enabled: false}\n"
        "  mgat: {structure.encoder: mgat}\n"
    )
    named = load_study(write_study(tmp_path, designs + "reference: stage1-only\n"))
    assert named.reference == "stage1-only"
    assert [trial.cell for trial in expand_trials(named)] == ["ddpm", "stage1-only", "mgat"]
    # By default: the variant called full if there is one, else the first variant.
    assert load_study(write_study(tmp_path, designs)).reference == "ddpm"
    with_full = designs.replace("  mgat:", "  full: {diffusion.steps: 20}\n  mgat:")
    assert load_study(write_study(tmp_path, with_full)).reference == "full"
    assert load_study(STUDIES_DIR / "paper-ablation.yaml").reference == "full"
    assert load_study(STUDIES_DIR / "sensitivity-steps.yaml").reference is None


# --------------------------------------------------------------------------------- grid search


def test_grid_search_expands_the_cartesian_product_times_seeds(tmp_path):
    path = write_study(
        tmp_path,
        """\
        kind: search
        seeds: [0, 1]
        search:
          algorithm: grid
          space:
            diffusion.schedule: {type: grid, values: [linear, cosine]}
            diffusion.steps: {type: grid, values: [5, 10, 20]}
        """,
    )
    study = load_study(path)
    assert study.name == "bad" and isinstance(dict(study.search.space)["diffusion.steps"], Grid)
    trials = expand_trials(study)
    assert len(trials) == 12
    assert trials[0].name == "search/diffusion.schedule=linear,diffusion.steps=5/seed-0"
    assert trials[-1].name == "search/diffusion.schedule=cosine,diffusion.steps=20/seed-1"
    assert trial_config(study, trials[-1]).diffusion.schedule == "cosine"


def test_random_search_is_expanded_by_ray_not_here(tmp_path):
    path = write_study(
        tmp_path,
        """\
        kind: search
        search:
          algorithm: random
          num_samples: 4
          space:
            loss.w_kl: {type: uniform, low: 0, high: 2, q: 0.5}
        """,
    )
    study = load_study(path)
    assert dict(study.search.space)["loss.w_kl"] == Uniform(low=0.0, high=2.0, q=0.5)
    with pytest.raises(StudyError, match=r"bad\.yaml: search\.algorithm: random draws"):
        expand_trials(study)


def test_override_strings_survive_yaml_surprises(tmp_path):
    path = write_study(
        tmp_path,
        """\
        kind: ablation
        overrides:
          data.dataset: "no"
          data.image_root: "/data/a #b: c"
          train.lr_stage1: 1.0e-5
          train.mixed_precision: "no"
        variants:
          tiny-lr:
            train.lr_stage2: 1.0e-7
            data.image_root: null
        """,
    )
    study = load_study(path)
    (trial,) = expand_trials(study)
    assert load_config(None, trial.override_strings()) == trial_config(study, trial)
    assert trial_config(study, trial).train.lr_stage2 == 1e-7


def test_numbers_in_a_study_read_as_in_a_config_file(tmp_path):
    """YAML 1.1 reads 1e-4 (no dot) as text; studies and configs both mean the number."""
    base = tmp_path / "base.yaml"
    base.write_text("train:\n  lr_stage1: 1e-4\n  lr_stage2: 5e-3\n")
    study_file = write_study(
        tmp_path,
        """\
        kind: ablation
        base_config: base.yaml
        overrides:
          loss.w_kl: 1e-4
          loss.w_bce: "5e-3"
        variants:
          full: {}
          small-lr: {train.lr_stage2: 1e-4}
          dotted-lr: {train.lr_stage2: 1.0e-3}
        """,
    )
    study = load_study(study_file)
    assert dict(study.overrides) == {"loss.w_kl": 1e-4, "loss.w_bce": 5e-3}
    assert [dict(v.overrides).get("train.lr_stage2") for v in study.variants] == [
        None,
        1e-4,
        1e-3,
    ]
    configs = {trial.cell: trial_config(study, trial) for trial in expand_trials(study)}
    assert configs["full"].train.lr_stage1 == 1e-4 and configs["full"].train.lr_stage2 == 5e-3
    assert configs["small-lr"].train.lr_stage2 == 1e-4
    assert configs["full"].loss.w_kl == 1e-4 and configs["full"].loss.w_bce == 5e-3
    # The same values in a config file and through --set build the same config.
    config_file = tmp_path / "same.yaml"
    config_file.write_text(
        "train: {lr_stage1: 1.0e-4, lr_stage2: 1e-4}\nloss: {w_kl: 1e-4, w_bce: 5e-3}\n"
    )
    for trial in expand_trials(study):
        if trial.cell == "small-lr":
            assert load_config(config_file) == trial_config(study, trial)
            assert load_config(base, trial.override_strings()) == trial_config(study, trial)

    searched = write_study(
        tmp_path,
        """\
        kind: search
        search:
          algorithm: optuna-tpe
          num_samples: 2
          space:
            train.lr_stage1: {type: loguniform, low: 1e-4, high: 5e-3}
            train.lr_stage2: {type: loguniform, low: 1.0e-4, high: "5e-3"}
            loss.w_kl: {type: choice, values: [1e-4, 1.0e-3, 5e-3]}
        """,
    )
    space = dict(load_study(searched).search.space)
    assert space["train.lr_stage1"] == LogUniform(low=1e-4, high=5e-3)
    assert space["train.lr_stage2"] == LogUniform(low=1e-4, high=5e-3)
    assert space["loss.w_kl"] == Choice(values=(1e-4, 1e-3, 5e-3))


def test_a_repeated_key_in_the_base_config_is_refused(tmp_path):
    # PyYAML keeps the second train block: batch_size 0 would never be checked.
    base = tmp_path / "base.yaml"
    base.write_text("train:\n  batch_size: 0\nseed: 1\ntrain:\n  lr_stage1: 1.0e-3\n")
    path = write_study(tmp_path, "base_config: base.yaml\n" + ABLATION)
    with pytest.raises(
        StudyError,
        match=rf"^{re.escape(str(path))}: base_config: {re.escape(str(base))}:4: train: "
        r"repeated key \(first on line 1\)",
    ):
        load_study(path)


# ------------------------------------------------------------------------------------- errors

ABLATION = "kind: ablation\nvariants:\n  full: {}\n"
SEARCH = "kind: search\nsearch:\n  algorithm: optuna-tpe\n  num_samples: 4\n  space:\n"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        # unknown keys
        (
            ABLATION + "  x:\n    diffusion.stepz: 3\n",
            r"variants\.x\.diffusion\.stepz: unknown config key diffusion\.stepz; did you mean "
            r"diffusion\.steps\? valid keys of diffusion: enabled, steps",
        ),
        (
            SEARCH + "    nonsense.key: {type: choice, values: [1]}\n",
            r"search\.space\.nonsense\.key: unknown config key nonsense\.key",
        ),
        (ABLATION + "sedes: [0]\n", r"sedes: unknown study key; valid keys of a ablation study"),
        (ABLATION + "axes: {diffusion.steps: [1]}\n", r"axes: belongs to sensitivity studies"),
        (
            "kind: sensitivity\naxes: {diffusion.steps: [5, 10]}\nreference: full\n",
            r"reference: belongs to ablation studies; this study is kind sensitivity",
        ),
        (
            SEARCH + "    diffusion.steps: {type: choice, values: [5]}\nreference: full\n",
            r"reference: belongs to ablation studies; this study is kind search",
        ),
        (
            ABLATION + "  mgat: {structure.encoder: mgat}\nreference: no-diffusion\n",
            r"reference: 'no-diffusion' is not a variant of this study; choose one of full, mgat",
        ),
        (
            ABLATION + "reference: no\n",
            r"reference: False is not a variant of this study \(YAML reads unquoted yes/no.*\); "
            r"choose one of full",
        ),
        (
            "kind: ablation\noverrides:\n  diffusion: {steps: 3}\nvariants: {full: {}}\n",
            r"overrides\.diffusion: diffusion is a section, not a key",
        ),
        (ABLATION + "  x: {seed: 3}\n", r"variants\.x\.seed: seed is set for each trial"),
        ("kind: ablations\n", r"kind: 'ablations' is not a kind of study; choose one of search"),
        ("name: x\n", r"kind: missing"),
        ("kind: sensitivity\n", r"axes: missing; a sensitivity study needs it"),
        # bad values for a key
        (
            ABLATION + "  x:\n    structure.fusion: mean\n",
            r"variants\.x\.structure\.fusion: 'mean' is not valid; "
            r"choose one of learned-scalar, learned-vector, fixed",
        ),
        (
            ABLATION + "  x:\n    diffusion.reverse: residual\n",
            r"variants\.x: diffusion\.reverse=residual .* needs diffusion\.target=epsilon",
        ),
        (
            ABLATION + "  x:\n    train.lr_stage1: .nan\n",
            r"variants\.x\.train\.lr_stage1: expected a finite number, got nan",
        ),
        (
            ABLATION + "  x:\n    train.mixed_precision: no\n",
            r"variants\.x\.train\.mixed_precision: expected str, got False \(YAML reads "
            r"yes/no/on/off/true/false as booleans",
        ),
        (
            "kind: ablation\noverrides: {structure.max_nodes: 1}\nvariants: {full: {}}\n",
            r"overrides\.structure\.max_nodes: 1 is outside \[2, 4096\]",
        ),
        (
            ABLATION + "  x: {structure.encoder: mgat}\n  y: {structure.encoder: mgat}\n",
            r"variants\.y: gives the same config as variants\.x",
        ),
        # distributions
        (
            SEARCH + "    diffusion.steps: {type: choice, values: []}\n",
            r"search\.space\.diffusion\.steps\.values: expected a non-empty list",
        ),
        (
            SEARCH + "    diffusion.steps: {type: choice, values: [5, 5]}\n",
            r"search\.space\.diffusion\.steps\.values\[1\]: 5 is repeated",
        ),
        (
            SEARCH + "    diffusion.steps: {type: randint, low: 10, high: 10}\n",
            r"search\.space\.diffusion\.steps: empty range: low \(10\) must be below high \(10\)",
        ),
        (
            SEARCH + "    loss.w_kl: {type: uniform, low: 2, high: 1}\n",
            r"search\.space\.loss\.w_kl: empty range: low \(2\.0\) must be below high \(1\.0\)",
        ),
        (
            SEARCH + "    loss.w_kl: {type: loguniform, low: 0, high: 1}\n",
            r"search\.space\.loss\.w_kl\.low: loguniform needs low > 0, got 0\.0",
        ),
        (
            SEARCH + "    loss.w_kl: {type: normal, mean: 1}\n",
            r"search\.space\.loss\.w_kl\.type: unknown distribution 'normal'; "
            r"choose one of choice, grid, uniform, loguniform, randint",
        ),
        (
            SEARCH + "    loss.w_kl: {low: 0.1, high: 1.0}\n",
            r"search\.space\.loss\.w_kl\.type: missing distribution type",
        ),
        (
            SEARCH + "    loss.w_kl: {type: uniform, low: 0.1, high: 1.0, step: 2}\n",
            r"search\.space\.loss\.w_kl\.step: uniform takes low, high, q",
        ),
        (
            SEARCH + "    diffusion.steps: {type: randint, low: 1, high: 5000}\n",
            r"search\.space\.diffusion\.steps\.high: diffusion\.steps: 5000 is outside \[1, 1000\]",
        ),
        (
            SEARCH + "    diffusion.steps: {type: uniform, low: 1, high: 50}\n",
            r"search\.space\.diffusion\.steps: uniform draws floats but diffusion\.steps takes "
            r"int values; use randint",
        ),
        (
            SEARCH + "    diffusion.steps: {type: randint, low: 1.5, high: 50}\n",
            r"search\.space\.diffusion\.steps\.low: expected an integer, got 1\.5",
        ),
        (
            SEARCH + "    train.lr_stage1: {type: loguniform, low: .inf, high: 1.0e-2}\n",
            r"search\.space\.train\.lr_stage1\.low: expected a finite number, got inf",
        ),
        (
            SEARCH + "    train.lr_stage1: {type: loguniform, low: small, high: 1.0e-2}\n",
            r"search\.space\.train\.lr_stage1\.low: expected a finite number, got 'small'",
        ),
        (
            SEARCH + "    diffusion.steps: {type: randint, low: 5, high: 98, q: 5}\n",
            r"search\.space\.diffusion\.steps\.high: 98 is not a multiple of q=5",
        ),
        (
            SEARCH + "    diffusion.steps: {type: randint, low: 5, high: 10, q: 0}\n",
            r"search\.space\.diffusion\.steps\.q: expected q > 0",
        ),
        (
            SEARCH + "    loss.w_kl: {type: loguniform, low: 0.1, high: 1.0, q: 0.1}\n",
            r"search\.space\.loss\.w_kl\.q: Optuna ignores q on a loguniform",
        ),
        (
            SEARCH + "    diffusion.steps: {type: grid, values: [5, 10]}\n",
            r"search\.space\.diffusion\.steps: grid entries need algorithm: grid",
        ),
        (
            "kind: search\nsearch:\n  algorithm: grid\n  space:\n"
            "    diffusion.steps: {type: choice, values: [5, 10]}\n",
            r"search\.space\.diffusion\.steps: algorithm: grid runs grid entries only",
        ),
        (
            "kind: search\nsearch:\n  algorithm: grid\n  num_samples: 3\n  space:\n"
            "    diffusion.steps: {type: grid, values: [5, 10]}\n",
            r"search\.num_samples: a grid search runs every point once per seed",
        ),
        (
            "kind: search\nsearch:\n  algorithm: grid\n  space:\n"
            "    diffusion.reverse: {type: grid, values: [ddpm, residual]}\n",
            r"search\.space\.diffusion\.reverse\.values\[1\]: .* needs diffusion\.target=epsilon",
        ),
        (
            "kind: search\nsearch:\n  algorithm: bayes\n",
            r"search\.algorithm: 'bayes' is not a search algorithm; choose one of optuna-tpe",
        ),
        (
            SEARCH.replace("num_samples: 4", "num_samples: 0")
            + "    loss.w_kl: {type: uniform, low: 0.1, high: 1.0}\n",
            r"search\.num_samples: expected the number of points to draw",
        ),
        (
            SEARCH.replace("  space:\n", "  asha: {max_t: 10, grace_period: 20}\n  space:\n")
            + "    loss.w_kl: {type: uniform, low: 0.1, high: 1.0}\n",
            r"search\.asha\.grace_period: expected an integer in \[1, max_t=10\]",
        ),
        (
            "seeds: [0, 1]\n"
            + SEARCH.replace("  space:\n", "  asha: {max_t: 10}\n  space:\n")
            + "    loss.w_kl: {type: uniform, low: 0.1, high: 1.0}\n",
            r"search\.asha: ASHA compares trials epoch by epoch, which needs one seed per trial",
        ),
        (
            "overrides: {train.stage1_epochs: 4, train.stage2_epochs: 3}\n"
            + SEARCH.replace("  space:\n", "  asha: {max_t: 6}\n  space:\n")
            + "    loss.w_kl: {type: uniform, low: 0.1, high: 1.0}\n",
            r"search\.asha\.max_t: 6 is below the 7 epochs a trial runs",
        ),
        # names
        (
            ABLATION + "  No-MGAT: {structure.encoder: mgat}\n",
            r"variants\.No-MGAT: 'No-MGAT' is not",
        ),
        (ABLATION + "  ../up: {structure.encoder: mgat}\n", r"variants\.\.\./up: '\.\./up' is not"),
        (
            ABLATION + "  a/b: {structure.encoder: mgat}\n",
            r"variants\.a/b: 'a/b' is not a readable",
        ),
        (ABLATION + "  no: {structure.encoder: mgat}\n", r"variants\.False: False is not.*yes/no"),
        ("name: My Study\n" + ABLATION, r"name: 'My Study' is not a readable directory name"),
        # common parts
        (ABLATION + "seeds: []\n", r"seeds: expected a non-empty list of integers"),
        (ABLATION + "seeds: [0, 0]\n", r"seeds: repeated seeds"),
        (ABLATION + "seeds: [0, -1]\n", r"seeds\[1\]: expected an integer >= 0"),
        (ABLATION + "resources: {cpus: 0}\n", r"resources\.cpus: expected a number > 0"),
        (ABLATION + "resources: {gpus: 1.5}\n", r"resources\.gpus: expected 0, a fraction"),
        (ABLATION + "resources: {memory: 4}\n", r"resources\.memory: unknown key"),
        (
            ABLATION + "metric: test.official-min-of-20.mrr\n",
            r"metric: 'test\.official-min-of-20\.mrr' cannot select models",
        ),
        (ABLATION + "metric: valid.clean.mr\n", r"mode: valid\.clean\.mr is better when lower"),
        (ABLATION + "base_config: missing.yaml\n", r"base_config: .*missing\.yaml: cannot read"),
        (
            "kind: sensitivity\naxes: {diffusion.steps: [5, 10]}\ndefaults: {loss.w_kl: 1.0}\n",
            r"defaults\.loss\.w_kl: not an axis",
        ),
        (
            "kind: sensitivity\naxes: {diffusion.steps: [5, 10, 5]}\n",
            r"axes\.diffusion\.steps\[2\]: 5 is repeated",
        ),
        (
            "kind: sensitivity\naxes: {diffusion.steps: [5, 0]}\n",
            r"axes\.diffusion\.steps\[1\]: diffusion\.steps: 0 is outside \[1, 1000\]",
        ),
        ("", r"the study is empty"),
        ("- kind\n", r"expected a mapping of study keys, got list"),
    ],
)
def test_bad_studies_name_the_file_and_the_key(tmp_path, text, message):
    path = write_study(tmp_path, text)
    with pytest.raises(StudyError, match=rf"^{re.escape(str(path))}(:\d+)?: {message}"):
        load_study(path)


def test_repeated_variants_are_refused_with_both_lines(tmp_path):
    # PyYAML would silently keep the last of two equal keys.
    path = write_study(
        tmp_path, ABLATION + "  mgat: {structure.encoder: mgat}\n  mgat: {loss.w_kl: 0.0}\n"
    )
    with pytest.raises(
        StudyError,
        match=rf"^{re.escape(str(path))}:5: variants\.mgat: repeated key \(first on line 4\)",
    ):
        load_study(path)


def test_yaml_syntax_errors_give_the_line(tmp_path):
    path = write_study(tmp_path, "name: x\nkind: ablation\nvariants: full: {}\n")
    with pytest.raises(StudyError, match=rf"^{re.escape(str(path))}:3: not valid YAML"):
        load_study(path)
    path.write_text("kind: ablation\nvariants:\n  full: !!python/object/apply:os.system [ls]\n")
    with pytest.raises(StudyError, match=rf"^{re.escape(str(path))}:3: not valid YAML"):
        load_study(path)


def test_a_missing_study_file_is_named(tmp_path):
    with pytest.raises(StudyError, match=r"nowhere\.yaml: cannot read study"):
        load_study(tmp_path / "nowhere.yaml")


def test_cells_that_make_the_same_directory_name_are_refused(tmp_path):
    path = write_study(
        tmp_path,
        """\
        kind: sensitivity
        axes:
          data.dataset: ["a/b", "a:b"]
        """,
    )
    with pytest.raises(StudyError, match=r"bad\.yaml: .*both make the trial directory"):
        load_study(path)


def test_study_module_does_not_import_ray():
    code = "import sys, sweeps.study; print(sorted(m for m in sys.modules if m.split('.')[0] == 'ray'))"
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "[]"
    assert not re.search(
        r"^\s*(import|from)\s+ray\b", (REPO / "sweeps" / "study.py").read_text(), re.M
    )


def test_long_cell_names_are_cut_and_stay_distinct(tmp_path):
    long = "x" * 200
    path = write_study(
        tmp_path,
        f"""\
        kind: sensitivity
        axes:
          data.dataset: [{long}a, {long}b]
        """,
    )
    names = [trial.cell for trial in expand_trials(load_study(path))]
    assert len(set(names)) == 2
    assert all(len(name) <= 120 and name.startswith("data.dataset=xxx") for name in names)


# ------------------------------------------------------------------ launch overrides (--set)

LAUNCHED = """\
kind: ablation
overrides:
  data.dataset: synthetic:small
  model.hidden_dim: 32
variants:
  full: {}
  mgat: {structure.encoder: mgat}
"""


def test_launch_overrides_replace_and_add_study_overrides(tmp_path):
    path = write_study(tmp_path, LAUNCHED)
    sets = ("data.dataset=nations", "train.lr_stage1=1", "data.image_root=null")
    study = load_study(path, sets)
    assert study.overrides == (
        ("data.dataset", "nations"),  # replaced where the study sets it
        ("model.hidden_dim", 32),
        ("train.lr_stage1", 1.0),  # added, and a float as the config expects
        ("data.image_root", None),
    )
    assert study.launch_overrides == sets
    assert load_study(path).launch_overrides == ()
    for trial in expand_trials(study):
        config = trial_config(study, trial)
        assert (config.data.dataset, config.train.lr_stage1) == ("nations", 1.0)
        assert config.model.hidden_dim == 32
        assert load_config(None, trial.override_strings()) == config
    assert trial_config(study, expand_trials(study)[1]).structure.encoder == "mgat"


@pytest.mark.parametrize(
    ("text", "sets", "message"),
    [
        (
            LAUNCHED,
            ["model.hidden_dim=16", "diffusion.stepz=3"],
            r"--set diffusion\.stepz=3: unknown config key diffusion\.stepz; did you mean "
            r"diffusion\.steps\? valid keys of diffusion: enabled, steps",
        ),
        (
            LAUNCHED,
            ["structure.fusion=mean"],
            r"--set structure\.fusion=mean: 'mean' is not valid; choose one of learned-scalar",
        ),
        (LAUNCHED, ["structure.max_nodes=1"], r"--set structure\.max_nodes=1: 1 is outside"),
        (
            LAUNCHED,
            ["model.hidden_dim=wide"],
            r"--set model\.hidden_dim=wide: expected int, got 'wide'",
        ),
        (LAUNCHED, ["data.dataset=true"], r"--set data\.dataset=true: expected str, got True"),
        (LAUNCHED, ["diffusion=3"], r"--set diffusion=3: diffusion is a section, not a key"),
        (LAUNCHED, ["seed=3"], r"--set seed=3: seed is set for each trial from the study's seeds"),
        (LAUNCHED, ["data.dataset"], r"--set data\.dataset: expected KEY=VALUE"),
        (LAUNCHED, ["data.dataset=[a"], r"--set data\.dataset=\[a: value '\[a' is not valid YAML"),
        (
            LAUNCHED,
            ["diffusion.steps=5", "diffusion.steps=10"],
            r"--set diffusion\.steps=10: diffusion\.steps is already set by "
            r"--set diffusion\.steps=5",
        ),
        (
            LAUNCHED,
            ["model.hidden_dim=16", "diffusion.reverse=residual"],
            r"--set model\.hidden_dim=16 --set diffusion\.reverse=residual: "
            r"diffusion\.reverse=residual .* needs diffusion\.target=epsilon",
        ),
        # a key the study varies
        (
            LAUNCHED,
            ["structure.encoder=none"],
            r"--set structure\.encoder=none: the study varies structure\.encoder "
            r"\(variants\.mgat\); overriding it would silently change the design",
        ),
        (
            "kind: sensitivity\naxes: {diffusion.steps: [5, 10]}\ndefaults: {diffusion.steps: 5}\n",
            ["diffusion.steps=20"],
            r"--set diffusion\.steps=20: the study varies diffusion\.steps "
            r"\(axes\.diffusion\.steps\)",
        ),
        (
            SEARCH + "    loss.w_kl: {type: uniform, low: 0.1, high: 1.0}\n",
            ["loss.w_kl=0.5"],
            r"--set loss\.w_kl=0\.5: the study varies loss\.w_kl \(search\.space\.loss\.w_kl\)",
        ),
        # fine on its own, not with a cell of the study
        (
            "kind: ablation\noverrides: {diffusion.target: epsilon}\nvariants:\n"
            "  full: {}\n  residual: {diffusion.reverse: residual}\n",
            ["diffusion.target=x0"],
            r"--set diffusion\.target=x0: variants\.residual: diffusion\.reverse=residual .* "
            r"needs diffusion\.target=epsilon",
        ),
        (
            "overrides: {train.stage1_epochs: 2, train.stage2_epochs: 3}\n"
            + SEARCH.replace("  space:\n", "  asha: {max_t: 5}\n  space:\n")
            + "    loss.w_kl: {type: uniform, low: 0.1, high: 1.0}\n",
            ["train.stage2_epochs=30"],
            r"--set train\.stage2_epochs=30: search\.asha\.max_t: 5 is below the 32 epochs",
        ),
    ],
)
def test_bad_launch_overrides_name_the_file_and_the_set(tmp_path, text, sets, message):
    path = write_study(tmp_path, text)
    load_study(path)  # the study itself is fine
    with pytest.raises(StudyError, match=rf"^{re.escape(str(path))}: {message}"):
        load_study(path, sets)


def test_a_bad_study_is_the_files_fault_not_the_sets(tmp_path):
    path = write_study(tmp_path, ABLATION + "  x:\n    diffusion.stepz: 3\n")
    with pytest.raises(StudyError) as refused:
        load_study(path, ["data.dataset=nations"])
    assert str(refused.value).startswith(f"{path}: variants.x.diffusion.stepz: unknown config key")
    assert "--set" not in str(refused.value)


def test_pack_defaults_where_runs_can_pack_and_is_refused_where_they_cannot(tmp_path):
    from sweeps.study import DEFAULT_GPU_PACK, DEFAULT_PACK

    ablation = "kind: ablation\nvariants:\n  full: {}\n"
    assert load_study(write_study(tmp_path, ablation)).pack == DEFAULT_PACK == 1
    # A trial with a whole GPU packs by default (measured there); a share of a GPU does not.
    on_gpus = {
        gpus: ablation + f"resources: {{cpus: 1, gpus: {gpus}, workers: 1}}\n"
        for gpus in (1, 2, 0.5)
    }
    assert load_study(write_study(tmp_path, on_gpus[1])).pack == DEFAULT_GPU_PACK == 16
    assert load_study(write_study(tmp_path, on_gpus[2])).pack == DEFAULT_GPU_PACK
    assert load_study(write_study(tmp_path, on_gpus[0.5])).pack == DEFAULT_PACK
    assert load_study(write_study(tmp_path, on_gpus[1] + "pack: 1\n")).pack == 1
    assert load_study(write_study(tmp_path, ablation + "pack: 1\n")).pack == 1
    assert load_study(write_study(tmp_path, ablation + "pack: 16\n")).pack == 16
    for bad in ("0", "2.5", "yes", "2000"):
        with pytest.raises(StudyError, match=r"pack: expected an integer from 1 to 1024"):
            load_study(write_study(tmp_path, ablation + f"pack: {bad}\n"))
    search = """\
        kind: search
        search:
          algorithm: optuna-tpe
          num_samples: 4
          space:
            diffusion.steps: {type: randint, low: 5, high: 20}
        """
    assert load_study(write_study(tmp_path, search)).pack == 1  # drawn one at a time
    with pytest.raises(StudyError, match=r"pack: 4: runs cannot be packed here \(an optuna-tpe"):
        load_study(write_study(tmp_path, textwrap.dedent(search) + "pack: 4\n"))
    workers = ablation + "resources: {cpus: 1, gpus: 0, workers: 2}\n"
    assert load_study(write_study(tmp_path, workers)).pack == 1
    with pytest.raises(StudyError, match=r"resources\.workers asks for several"):
        load_study(write_study(tmp_path, workers + "pack: 2\n"))
