"""Small experiments made by the real pipeline (the sweep trial runner and core training).

They are built once per test session with :func:`sweeps.trial.run_trial`, the code every Ray
trial runs, at smoke size on Nations: an ablation (full, no-mgat, no-diffusion x seeds 0 and 1)
and a sensitivity sweep over K (5 and 10 x seeds 0 and 1).
"""

import pytest

from core.config import load_config
from sweeps.experiment import write_json
from sweeps.trial import RunSpec, run_trial
from tests.smoke import SMOKE


def _experiment(root, name, kind, cells: dict, seeds=(0, 1)):
    folder = root / name
    write_json(
        folder / "experiment.json",
        {
            "name": name,
            "kind": kind,
            "metric": "valid.clean.mrr",
            "mode": "max",
            "seeds": list(seeds),
            "code": {"revision": "test", "dirty": False},
            "packages": {"torch": "test"},
            "cluster_resources": {"CPU": 2.0},
        },
    )
    for seed in seeds:
        for cell, overrides in cells.items():
            run = f"{kind}/{cell}/seed-{seed}"
            config = load_config(overrides=[*SMOKE, *overrides, f"seed={seed}"])
            run_trial(folder, run, [RunSpec(run, config)], lambda metrics: None)
    return folder


@pytest.fixture(scope="session")
def ablation_experiment(tmp_path_factory):
    return _experiment(
        tmp_path_factory.mktemp("experiments"),
        "tiny-ablation",
        "ablation",
        {
            "full": [],
            "no-mgat": ["structure.encoder=none"],
            "no-diffusion": ["diffusion.enabled=false"],
        },
    )


@pytest.fixture(scope="session")
def sensitivity_experiment(tmp_path_factory):
    return _experiment(
        tmp_path_factory.mktemp("experiments"),
        "tiny-sensitivity",
        "sensitivity",
        {"diffusion.steps=5": ["diffusion.steps=5"], "diffusion.steps=10": ["diffusion.steps=10"]},
    )
