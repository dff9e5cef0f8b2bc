"""Stage 1 depends on ``core.config.stage1_relevant`` and on nothing else.

Sweeps share one stage-1 run between trials whose stage-1 values are equal (``sweeps.stage1``), and
``--stage1-checkpoint`` reuses one on the same check. For every config key that is *not* declared
stage-1 relevant, stage 1 is trained under another value of that key and its extractor weights must
be bitwise equal to the reference run's. A key that fails here changes stage 1: declare it with
``stage1=True`` in core/config.py (or, if it changes stage 1 only by accident, fix that).

Each run is one stage-1 epoch of one or two optimisation steps on Nations without text or image
features, stopped as soon as stage 1 reports, whatever the stage-2 settings are.
"""

import dataclasses
import typing

import pytest
import torch

from core.config import ExperimentConfig, load_config, stage1_relevant
from core.train.checkpoint import load_checkpoint
from core.train.trainer import train

TINY = [
    "data.dataset=nations",
    "features.text_encoder=none",
    "features.image_encoder=none",
    "model.hidden_dim=16",
    "model.num_heads=2",
    "model.num_layers=1",
    "structure.max_nodes=4",
    "diffusion.denoiser_width=16",
    "train.stage1_epochs=1",
    "train.batch_size=512",  # Nations has 909 training queries: two steps
    "eval.batch_size=1024",
]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Bitwise equality needs one reduction order: with several intra-op threads, CPU kernels may
    sum in another order from run to run (module scope: the reference run must use it too)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# Keys whose only other values break a rule across keys: what to set with them.
_ALTERNATIVES = {
    "diffusion.reverse": ["diffusion.reverse=residual", "diffusion.target=epsilon"],
}
# Keys whose other values need a stage-1 setting away from TINY's: the reference and the probe
# both run with it.
_BASES = {"train.stage2_queries": ["train.holdout_fraction=0.2"]}


def _leaves(cls=ExperimentConfig, prefix: str = ""):
    """``(dotted key, field, type)`` of every config value."""
    hints = typing.get_type_hints(cls)
    for spec in dataclasses.fields(cls):
        key = f"{prefix}{spec.name}"
        if dataclasses.is_dataclass(hints[spec.name]):
            yield from _leaves(hints[spec.name], f"{key}.")
        else:
            yield key, spec, hints[spec.name]


def _flat(tree: dict, prefix: str = "") -> set[str]:
    keys = set()
    for key, value in tree.items():
        keys |= _flat(value, f"{prefix}{key}.") if isinstance(value, dict) else {prefix + key}
    return keys


def _current(config, key: str):
    value = config
    for part in key.split("."):
        value = getattr(value, part)
    return value


def _alternative(spec: dataclasses.Field, annotation, value):
    """A second valid value, next to ``value`` so that the run stays as small."""
    if "choices" in spec.metadata:
        return next(choice for choice in spec.metadata["choices"] if choice != value)
    if annotation is bool:
        return not value
    low, high, _, high_open = spec.metadata["range"]
    if annotation is int:
        above = value + 1
        fits = high is None or above < high or (above == high and not high_open)
        return above if fits else value - 1
    return value / 2 if value > 0 and (low is None or value / 2 > low) else (value + high) / 2


BASE = load_config(overrides=TINY)
STAGE2_KEYS = [
    (
        key,
        _BASES.get(key, []),
        _ALTERNATIVES.get(key) or [f"{key}={_alternative(spec, hint, _current(BASE, key))}"],
    )
    for key, spec, hint in _leaves()
    # Any other baseline.model trains a PyKEEN model instead, which has no stage 1 to compare.
    if key not in _flat(stage1_relevant(BASE)) and key != "baseline.model"
]


class _StageOneDone(Exception):
    pass


def _stage1_weights(overrides: list[str], out) -> dict[str, torch.Tensor]:
    """The extractor after stage 1's single epoch, stopped before anything of stage 2 runs."""

    def stop(record):
        assert record["stage"] == 1
        raise _StageOneDone

    with pytest.raises(_StageOneDone):
        train(load_config(overrides=[*TINY, *overrides]), out, callback=stop, progress=False)
    weights = load_checkpoint(out / "checkpoints" / "last.pt")["model"]
    return {k: v for k, v in weights.items() if k.startswith("extractor.")}


@pytest.fixture(scope="module")
def references(tmp_path_factory):
    """The reference weights of each base (TINY, and TINY with a _BASES setting), trained once."""
    trained: dict[tuple[str, ...], dict] = {}

    def of(base: list[str]) -> dict:
        if tuple(base) not in trained:
            out = tmp_path_factory.mktemp("reference")
            trained[tuple(base)] = _stage1_weights(base, out)
        return trained[tuple(base)]

    return of


@pytest.fixture(scope="module")
def reference(references):
    return references([])


def _differing(reference: dict, weights: dict) -> list[str]:
    assert weights.keys() == reference.keys()
    return [name for name in reference if not torch.equal(reference[name], weights[name])]


def test_every_other_key_is_probed():
    """The probe covers the stage-2 and evaluation knobs, not a shrinking list."""
    probed = {key for key, _, _ in STAGE2_KEYS}
    assert {
        "diffusion.denoiser_width",
        "diffusion.enabled",
        "loss.w_kl",
        "eval.official_samples",
    } <= probed
    assert not probed & {"eval.tie", "seed", "train.lr_stage1"}


@pytest.mark.parametrize(
    ("key", "base", "overrides"), STAGE2_KEYS, ids=[key for key, _, _ in STAGE2_KEYS]
)
def test_stage1_ignores_keys_not_declared_stage1_relevant(
    key, base, overrides, references, tmp_path
):
    config = load_config(overrides=[*TINY, *base, *overrides])
    based = load_config(overrides=[*TINY, *base])
    assert _current(config, key) != _current(based, key)
    assert stage1_relevant(config) == stage1_relevant(based)
    differing = _differing(references(base), _stage1_weights([*base, *overrides], tmp_path))
    assert not differing, f"{key} changes stage 1 ({', '.join(differing[:3])}): declare it stage1"


def test_the_probe_sees_a_stage1_change(reference, tmp_path):
    """Bitwise comparison is sensitive enough: a stage-1 key one notch off changes the weights."""
    assert _differing(reference, _stage1_weights(["train.lr_stage1=0.004"], tmp_path))
