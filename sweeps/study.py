"""Studies as data: searches, ablations and sensitivity sweeps read from YAML and checked up front.

A study file (``sweeps/studies/*.yaml``) names its launch command on its first line and describes
one of three kinds of study over the typed experiment config of :mod:`core.config`::

    # diffcom sweep launch sweeps/studies/paper-ablation.yaml
    name: paper-ablation            # optional; the file name without .yaml by default
    kind: ablation                  # search | ablation | sensitivity
    description: ...                # optional
    base_config: null               # optional core config YAML, relative to this file
    overrides:                      # dotted config keys set in every trial
      data.dataset: synthetic:small
    seeds: [0, 1, 2]                # every cell (or drawn point) trains once per seed
                                    # optional: [0] without it (launch prints a note)
    resources: {cpus: 1, gpus: 0, workers: 1}
    metric: valid.clean.mrr         # valid split, clean protocol only
    mode: max
    pack: 8                         # optional: stage-2 runs of one stage 1 and one denoiser
                                    # shape train as fused packs of up to N (sweeps.pack);
                                    # 1 (the default; 16 when every trial gets a whole
                                    # GPU) trains every run alone; packs are refused for
                                    # searches other than grid, ASHA, workers > 1
    tracking:                       # optional (sweeps.tracking); resume and extend keep it
      mlflow: http://127.0.0.1:5000 # an MLflow tracking URI (launch --mlflow overrides it)
      tensorboard: true             # event files in every run folder (the default)

    variants:                       # kind: ablation -- one cell per variant
      full: {}
      no-mgat: {structure.encoder: none}
    reference: full                 # kind: ablation, optional -- the variant each Δ is against;
                                    # full if there is one, else the first variant
    baselines:                      # kind: ablation, optional -- classical KGC baselines
      pykeen:TuckER: {}             # a list of names, or names mapped to baseline.* settings;
      pykeen:RotatE:                # a list of values makes one cell per value (a small search)
        baseline.lr: [0.003, 0.01]
    baseline_budget: match          # match (default) | {epochs: N} | {seconds: S, clock: cpu|wall}

    axes:                           # kind: sensitivity -- one axis at a time
      diffusion.steps: [5, 10, 20]
    defaults:                       # the value each axis key keeps while another axis moves
      diffusion.steps: 20

    search:                         # kind: search
      algorithm: optuna-tpe         # optuna-tpe | random | grid
      seed: 0                       # seeds the searcher
      num_samples: 32               # not for grid: a grid runs every point
      asha: {max_t: 30, grace_period: 5, reduction_factor: 3}   # or null
      space:
        diffusion.steps: {type: randint, low: 5, high: 100, q: 5}
        diffusion.denoiser_width: {type: choice, values: [256, 512, 1024]}
        train.lr_stage1: {type: loguniform, low: 1.0e-4, high: 1.0e-2}

:func:`load_study` checks everything before any work starts: each config key named anywhere
must exist in :class:`core.config.ExperimentConfig` and each concrete value (override, variant,
axis value, grid point, range bound) must build a valid config; every error is a
:class:`StudyError` naming the study file and the dotted study key. The ``KEY=VALUE`` texts of
``diffcom sweep launch --set`` (``load_study(path, overrides)``) are merged into the study's
``overrides`` and checked the same way, their errors naming the ``--set``; a key the study varies
is refused. :func:`expand_trials` turns an ablation, a sensitivity sweep or a grid search into
trials with stable, readable names such as ``ablation/no-mgat/seed-1``; optuna and random
searches draw their trials inside Ray Tune, from :attr:`Study.search`. This module never imports
Ray.

Baselines. An ablation's ``baselines`` are PyKEEN models (``core.baselines.BASELINE_MODELS``)
trained on the study's graph and ranked by the same evaluator, each one more cell named after
it (``pykeen:TuckER`` → ``pykeen-tucker``; ``pykeen-rotate-lr=0.003`` for one value of a listed
setting) whose trials set ``baseline.model`` and its settings, once per study seed. Their trials
come after every other trial. ``baseline_budget`` says what each baseline run may spend:
``match`` gives it what the reference variant's run of the same seed cost in all (its shared
stage 1, its stage 2 and its evaluations; CPU seconds, or wall seconds with ``baseline.clock:
wall``), resolved when the baseline trial starts (:mod:`sweeps.trial` waits for that run);
``{epochs: N}`` trains N epochs with no time budget; ``{seconds: S, clock: cpu|wall}`` a fixed
budget. The keys the budget sets (``baseline.budget_seconds``; ``baseline.epochs`` for
``epochs``; ``baseline.clock`` for ``seconds``) are not settings, nor overrides, of a study with
baselines; ``baseline.model`` is set by ``baselines`` only, never by an ablation's overrides or
variants.

Distributions (``low`` and ``high`` are both inclusive, unlike Ray's ``randint``):

* ``choice`` / ``grid``: ``values`` (non-empty, distinct); ``grid`` runs every value and only
  belongs to ``algorithm: grid``, which takes nothing else.
* ``uniform``, ``loguniform`` (``low > 0``), ``randint`` (integers): ``low < high``; optional
  ``q > 0`` quantises to multiples of ``q``, so ``low`` and ``high`` must be multiples of it.

A study file is read as a config file is (:func:`core.config.read_yaml`): ``1e-4`` is a number,
and a key repeated in a mapping is an error naming both lines. Each value a study gives a config
key is read as that key reads it (:func:`core.config.coerce_value`), so ``1e-4``, ``1.0e-4`` and
``"1e-4"`` are the same float in a study's overrides, variants, axes and search space as in a
config file or a ``--set``.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import difflib
import hashlib
import itertools
import json
import math
import re
import types
import typing
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from core.config import (
    ConfigError,
    ExperimentConfig,
    coerce_value,
    config_from_dict,
    config_to_dict,
    load_config,
    parse_override,
    read_yaml,
)
from sweeps.tracking import mlflow_uri_problem

__all__ = [
    "ALGORITHMS",
    "BASELINE_BUDGETS",
    "DEFAULT_GPU_PACK",
    "DEFAULT_PACK",
    "Baseline",
    "BaselineBudget",
    "point_config",
    "DISTRIBUTION_TYPES",
    "KINDS",
    "STUDIES_DIR",
    "Asha",
    "Axis",
    "Choice",
    "Distribution",
    "Grid",
    "LogUniform",
    "RandInt",
    "Resources",
    "Search",
    "Study",
    "StudyError",
    "Tracking",
    "Trial",
    "Uniform",
    "Variant",
    "expand_trials",
    "load_study",
    "shipped_studies",
    "study_config",
    "trial_config",
]

KINDS = ("search", "ablation", "sensitivity")
"""The kinds of study."""

ALGORITHMS = ("optuna-tpe", "random", "grid")
"""Search algorithms of a ``search`` study."""

BASELINE_BUDGETS = ("match", "epochs", "seconds")
"""The kinds of ``baseline_budget``."""

_CLOCKS = ("cpu", "wall")

DEFAULT_PACK = 1
"""Members per fused pack when a study does not say and its trials run on CPUs or on a share of a
GPU (see :mod:`sweeps.pack`). Measured (BENCHMARKS.md, "Fused trials in a sweep"): on CPU trials
with the default denoiser (width 1024) packs gained 15% over lone trials with stage-1 reuse, so
runs train alone unless a study asks."""

DEFAULT_GPU_PACK = 16
"""Members per fused pack when a study does not say and each trial gets one GPU or more
(``resources.gpus >= 1``). Measured (BENCHMARKS.md, "On a GPU"): on one H200 a pack of 16 trained
1.7-1.8x faster than its members one after the other, at 200 and at 14,541 entities. Trials on a
share of a GPU run side by side, which that comparison did not measure, so they keep
:data:`DEFAULT_PACK`. A pack above its share of the device's free memory trains in groups."""

STUDIES_DIR = Path(__file__).resolve().parent / "studies"
"""The folder of the studies that ship with the package."""

_NAME_PATTERN = re.compile(r"[a-z0-9][a-z0-9_-]*")
_NAME_RULE = "lowercase letters, digits, '-' and '_', starting with a letter or digit"
_METRIC_PATTERN = re.compile(r"valid\.clean\.(mr|mrr|hits@[1-9][0-9]*)")
_MAX_CELL_LENGTH = (
    120  # longer cell names are cut and end in a hash, to stay a valid directory name
)


class StudyError(ValueError):
    """A study file that is not valid; the message names the file and the dotted study key."""


# --------------------------------------------------------------------------------- distributions


@dataclass(frozen=True)
class Choice:
    """One of ``values``, drawn by the search algorithm."""

    values: tuple
    type: ClassVar[str] = "choice"


@dataclass(frozen=True)
class Grid:
    """Every one of ``values`` (``algorithm: grid`` only)."""

    values: tuple
    type: ClassVar[str] = "grid"


@dataclass(frozen=True)
class Uniform:
    """A float uniform in ``[low, high]``; with ``q``, a multiple of ``q`` there."""

    low: float
    high: float
    q: float | None = None
    type: ClassVar[str] = "uniform"


@dataclass(frozen=True)
class LogUniform:
    """A float whose log is uniform in ``[log low, log high]`` (``low > 0``); ``q`` quantises."""

    low: float
    high: float
    q: float | None = None
    type: ClassVar[str] = "loguniform"


@dataclass(frozen=True)
class RandInt:
    """An integer uniform in ``[low, high]``, both inclusive; with ``q``, a multiple of ``q`` there.

    Ray's ``tune.randint`` excludes ``high`` and ``tune.qrandint`` includes it: the Ray adapter
    passes ``high + 1`` to the former.
    """

    low: int
    high: int
    q: int | None = None
    type: ClassVar[str] = "randint"


Distribution = Choice | Grid | Uniform | LogUniform | RandInt
"""One entry of a search space."""

_DISTRIBUTIONS: dict[str, type] = {
    cls.type: cls for cls in (Choice, Grid, Uniform, LogUniform, RandInt)
}
DISTRIBUTION_TYPES = tuple(_DISTRIBUTIONS)
"""The ``type`` names a search-space entry can have."""


# ----------------------------------------------------------------------------------- the study


@dataclass(frozen=True)
class Resources:
    """What one trial asks Ray for: ``cpus`` and ``gpus`` for each of its ``workers`` processes."""

    cpus: float = 1
    gpus: float = 0
    workers: int = 1


@dataclass(frozen=True)
class Tracking:
    """What a study's runs are tracked with (:mod:`sweeps.tracking`).

    Attributes:
        mlflow: an MLflow tracking URI, or ``None`` for no MLflow.
        tensorboard: whether every run writes TensorBoard event files.
    """

    mlflow: str | None = None
    tensorboard: bool = True


@dataclass(frozen=True)
class Asha:
    """Asynchronous successive halving over the trial's reports (one per epoch)."""

    max_t: int
    grace_period: int = 1
    reduction_factor: float = 4


@dataclass(frozen=True)
class Search:
    """The search part of a ``search`` study.

    Attributes:
        algorithm: one of :data:`ALGORITHMS`.
        space: ``(config key, distribution)`` pairs in file order.
        seed: the searcher's seed.
        num_samples: points to draw (``None`` for a grid, which runs every point).
        asha: early stopping of poor trials, or ``None``.
    """

    algorithm: str
    space: tuple[tuple[str, Distribution], ...]
    seed: int = 0
    num_samples: int | None = None
    asha: Asha | None = None


@dataclass(frozen=True)
class Variant:
    """One ablation cell: a readable directory name and the config overrides it makes."""

    name: str
    overrides: tuple[tuple[str, Any], ...]


@dataclass(frozen=True)
class BaselineBudget:
    """What each baseline run of an ablation may spend (``baseline_budget``).

    Attributes:
        kind: one of :data:`BASELINE_BUDGETS`. ``match``: what the reference variant's run of the
            same seed cost in all, resolved when the baseline trial starts; ``epochs``: ``epochs``
            epochs and no time budget; ``seconds``: ``seconds`` of ``clock``.
        epochs: for ``epochs``.
        seconds: for ``seconds``.
        clock: for ``seconds``: ``cpu`` or ``wall``.
    """

    kind: str = "match"
    epochs: int | None = None
    seconds: float | None = None
    clock: str | None = None

    def owned_keys(self) -> tuple[str, ...]:
        """The config keys this budget sets: no setting or override may set them too."""
        if self.kind == "epochs":
            return ("baseline.epochs", "baseline.budget_seconds")
        if self.kind == "seconds":
            return ("baseline.budget_seconds", "baseline.clock")
        return ("baseline.budget_seconds",)  # resolved when the trial starts

    def overrides(self) -> tuple[tuple[str, Any], ...]:
        """The ``(config key, value)`` pairs every baseline trial gets from the budget."""
        if self.kind == "epochs":
            return (("baseline.epochs", self.epochs), ("baseline.budget_seconds", 0.0))
        if self.kind == "seconds":
            return (("baseline.budget_seconds", self.seconds), ("baseline.clock", self.clock))
        return ()


@dataclass(frozen=True)
class Baseline:
    """One baseline cell of an ablation: a PyKEEN model with its ``baseline.*`` settings.

    Attributes:
        name: the cell's directory name, e.g. ``pykeen-tucker`` or ``pykeen-rotate-lr=0.003``.
        model: one of ``core.baselines.BASELINE_MODELS``, e.g. ``pykeen:TuckER``.
        settings: ``(baseline.* key, value)`` pairs of this cell, in file order.
    """

    name: str
    model: str
    settings: tuple[tuple[str, Any], ...] = ()


@dataclass(frozen=True)
class Axis:
    """One sensitivity axis: a config key and the values it takes, one at a time."""

    key: str
    values: tuple


@dataclass(frozen=True)
class Study:
    """A validated study file; build it with :func:`load_study`.

    Attributes:
        path: the study file (absolute).
        name: a readable directory name.
        kind: one of :data:`KINDS`.
        description: free text.
        base_config: a core config YAML (absolute), or ``None`` for the config defaults.
        overrides: ``(dotted config key, value)`` pairs set in every trial, in file order.
        seeds: training seeds; every cell (or drawn point) trains once per seed.
        resources: per trial.
        metric: the metric trials are compared by (``valid.clean.*``).
        mode: ``"max"`` or ``"min"``.
        search: the search part (``search`` studies).
        variants: the ablation cells (``ablation`` studies).
        reference: the variant every other variant's difference is against (``ablation``
            studies: ``full`` if there is such a variant, else the first; ``None`` otherwise).
        baselines: the baseline cells (``ablation`` studies), in file order.
        baseline_budget: what each baseline run may spend; ``None`` without baselines.
        axes: the axes (``sensitivity`` studies).
        defaults: ``(axis key, value)`` pairs each axis key keeps while another axis moves.
        launch_overrides: the ``KEY=VALUE`` texts of ``--set`` given at launch, as given; their
            values are already merged into ``overrides``. An experiment records them, so that
            ``extend`` loads the same study.
        pack: the most runs trained as one fused pack (:mod:`sweeps.pack`); 1: every run alone.
        tracking: MLflow and TensorBoard (``tracking:``; launch flags override it).
    """

    path: Path
    name: str
    kind: str
    description: str = ""
    base_config: Path | None = None
    overrides: tuple[tuple[str, Any], ...] = ()
    seeds: tuple[int, ...] = (0,)
    resources: Resources = Resources()
    metric: str = "valid.clean.mrr"
    mode: str = "max"
    search: Search | None = None
    variants: tuple[Variant, ...] = ()
    reference: str | None = None
    baselines: tuple[Baseline, ...] = ()
    baseline_budget: BaselineBudget | None = None
    axes: tuple[Axis, ...] = ()
    defaults: tuple[tuple[str, Any], ...] = ()
    launch_overrides: tuple[str, ...] = ()
    pack: int = 1
    tracking: Tracking = Tracking()


@dataclass(frozen=True)
class Trial:
    """One run of an expanded study.

    Attributes:
        name: a stable relative directory, e.g. ``ablation/no-mgat/seed-1`` or
            ``sensitivity/diffusion.steps=40/seed-0``.
        cell: the part of the name that says what the cell changes (``no-mgat``).
        seed: the training seed (the config's ``seed``).
        changes: ``(dotted config key, value)`` pairs this cell sets.
        overrides: every pair of the trial: the study's overrides, a sensitivity study's defaults,
            then ``changes``, each key once with the last value set. The seed is not among them.
        baseline: the baseline model a baseline cell trains (``pykeen:TuckER``), else ``None``.
        match_to: for a baseline whose budget is ``match``: the name of the reference variant's
            trial of the same seed (its run folder under ``runs/``), whose cost is the budget.
    """

    name: str
    cell: str
    seed: int
    changes: tuple[tuple[str, Any], ...]
    overrides: tuple[tuple[str, Any], ...]
    baseline: str | None = None
    match_to: str | None = None

    def override_strings(self) -> list[str]:
        """``KEY=VALUE`` strings, seed last, for ``core.config.load_config(base_config, ...)``."""
        pairs = [*self.overrides, ("seed", self.seed)]
        return [f"{key}={_render_yaml(value)}" for key, value in pairs]


# ------------------------------------------------------------------------------------- loading


def load_study(path: str | Path, overrides: Iterable[str] = ()) -> Study:
    """Read a study file (:func:`core.config.read_yaml`) and check it completely.

    Args:
        path: the study YAML.
        overrides: ``KEY=VALUE`` texts (``diffcom sweep launch --set``), each read by
            :func:`core.config.parse_override` and merged into the study's ``overrides``:
            replacing the value the study gives a key there, or adding the key. The study file
            must be valid without them.

    Returns:
        The validated :class:`Study`.

    Raises:
        StudyError: naming the file and the dotted study key (and the line, for YAML errors):
            unknown study or config keys, bad values, empty or inverted ranges, unknown
            distributions, bad or repeated names, and anything the config rejects. An error that
            an override causes names its ``--set``: an unknown key, a bad value, a key given
            twice, a key the study varies (a variant, an axis or the search space sets it), or a
            value that makes some trial's config invalid.
    """
    path = Path(path)
    study = _read_study(path)
    overrides = tuple(overrides)
    if not overrides:
        return study
    # The file passed alone, so whatever fails from here on is caused by the overrides.
    return _read_study(path, overrides, _varied_keys(study))


def _varied_keys(study: Study) -> dict[str, str]:
    """Each config key the study varies, with the study key that varies it."""
    varied: dict[str, str] = {}
    for variant in study.variants:
        for key, _ in variant.overrides:
            varied.setdefault(key, f"variants.{variant.name}")
    if study.baselines:
        varied.setdefault("baseline.model", "baselines")
        for key in study.baseline_budget.owned_keys():
            varied.setdefault(key, "baseline_budget")
        for baseline in study.baselines:
            for key, _ in baseline.settings:
                varied.setdefault(key, f"baselines.{baseline.model}")
    for axis in study.axes:
        varied.setdefault(axis.key, f"axes.{axis.key}")
    for key, _ in study.search.space if study.search else ():
        varied.setdefault(key, f"search.space.{key}")
    return varied


def _read_study(
    path: Path, launch_overrides: tuple[str, ...] = (), varied: dict[str, str] | None = None
) -> Study:
    reader = _Reader(path)
    data = reader.read()
    kind = data.get("kind")
    if kind not in KINDS:
        what = "missing" if kind is None else f"{kind!r} is not a kind of study"
        raise reader.error("kind", f"{what}; choose one of {', '.join(KINDS)}")
    reader.check_keys(data, kind)

    name = data.get("name", path.stem)
    if not isinstance(name, str) or not _NAME_PATTERN.fullmatch(name):
        raise reader.error("name", f"{name!r} is not a readable directory name ({_NAME_RULE})")
    description = data.get("description") or ""
    if not isinstance(description, str):
        raise reader.error("description", "expected text")

    base_config, base_tree = reader.base_config(data.get("base_config"))
    overrides = reader.pairs(data.get("overrides"), "overrides")
    base_tree = reader.check_cell(base_tree, overrides, "overrides")
    if launch_overrides:
        pairs = reader.launch_overrides(launch_overrides, varied or {}, base_tree)
        overrides = _merge(overrides, pairs)
        base_tree = _apply(base_tree, pairs)
        reader.blame = " ".join(f"--set {text}" for text in launch_overrides)

    metric, mode = reader.metric(data.get("metric", "valid.clean.mrr"), data.get("mode", "max"))
    study = {
        "path": path.resolve(),
        "name": name,
        "kind": kind,
        "description": description,
        "base_config": base_config,
        "overrides": overrides,
        "seeds": reader.seeds(data.get("seeds", [0])),
        "resources": reader.resources(data.get("resources")),
        "metric": metric,
        "mode": mode,
        "launch_overrides": launch_overrides,
        "tracking": reader.tracking(data.get("tracking")),
    }
    if kind == "search":
        study["search"] = reader.search(data.get("search"), base_tree)
        if study["search"].asha is not None and len(study["seeds"]) > 1:
            raise reader.error(
                "search.asha",
                "ASHA compares trials epoch by epoch, which needs one seed per trial; use one "
                "seed here and replicate the best points over seeds in an ablation study",
            )
        asha = study["search"].asha
        swept = {key for key, _ in study["search"].space}
        if asha is not None and not swept & {"train.stage1_epochs", "train.stage2_epochs"}:
            epochs = base_tree["train"]["stage1_epochs"] + base_tree["train"]["stage2_epochs"]
            if asha.max_t < epochs:
                raise reader.error(
                    "search.asha.max_t",
                    f"{asha.max_t} is below the {epochs} epochs a trial runs (stage 1 + stage 2, "
                    f"the time axis ASHA counts): its rungs would end before trials do; "
                    f"set max_t to {epochs}",
                )
    elif kind == "ablation":
        study["variants"] = reader.variants(data.get("variants"), base_tree)
        study["reference"] = reader.reference(data.get("reference"), study["variants"])
        budget = reader.baseline_budget(data.get("baseline_budget"), data.get("baselines"))
        study["baseline_budget"] = budget
        if budget is not None:
            reader.no_baseline_keys(overrides, "overrides", budget.owned_keys())
            study["baselines"] = reader.baselines(
                data["baselines"], budget, study["variants"], base_tree
            )
        else:
            reader.no_baseline_keys(overrides, "overrides", ())
        for variant in study["variants"]:
            reader.no_baseline_keys(variant.overrides, f"variants.{variant.name}", ())
    else:
        study["axes"], study["defaults"] = reader.axes(
            data.get("axes"), data.get("defaults"), base_tree
        )
    study["pack"] = reader.pack(data.get("pack"), study)
    result = Study(**study)
    if kind != "search" or result.search.algorithm == "grid":
        _cells(result)  # names must be unique once made into directory names
    return result


def shipped_studies() -> list[Path]:
    """The study files that ship in ``sweeps/studies``, sorted by name."""
    return sorted(STUDIES_DIR.glob("*.yaml"))


# ------------------------------------------------------------------------------------ expanding


def expand_trials(study: Study) -> list[Trial]:
    """Every trial of an ablation, a sensitivity sweep or a grid search, seed by seed.

    The order is deterministic: all cells with the first seed, then all with the second, and so
    on, so a partial sweep already covers every cell. An ablation's baseline cells come after all
    other trials, in the same order: a baseline whose budget is ``match`` waits for its reference
    run, which has then been started before it. Names are stable across calls and runs.

    Raises:
        StudyError: for optuna and random searches, whose points Ray Tune draws.
    """
    cells = _cells(study)
    models = {baseline.name: baseline.model for baseline in study.baselines}
    match = study.baseline_budget is not None and study.baseline_budget.kind == "match"
    trials = [
        Trial(
            name=f"{study.kind}/{cell}/seed-{seed}",
            cell=cell,
            seed=seed,
            changes=changes,
            overrides=_merge(study.overrides, study.defaults, changes),
            baseline=models.get(cell),
            match_to=(
                f"{study.kind}/{study.reference}/seed-{seed}" if match and cell in models else None
            ),
        )
        for seed in study.seeds
        for cell, changes in cells
    ]
    return [t for t in trials if t.baseline is None] + [t for t in trials if t.baseline]


def study_config(
    study: Study, changes: Iterable[tuple[str, Any]] = (), seed: int | None = None
) -> ExperimentConfig:
    """The config of one point of a study: base config, overrides, defaults, then ``changes``.

    The Ray adapter calls this with the values a searcher drew (``sampled.items()``).

    Raises:
        StudyError: naming the study file when the result is not a valid config.
    """
    try:
        tree = _apply(
            _base_tree(study.base_config), _merge(study.overrides, study.defaults, tuple(changes))
        )
        if seed is not None:
            tree["seed"] = seed
        return config_from_dict(tree)
    except ConfigError as error:
        raise StudyError(f"{study.path}: {error}") from None


def point_config(base: dict, changes: Iterable[tuple[str, Any]], seed: int) -> ExperimentConfig:
    """The config of a drawn search point from the study's base tree (``study_config`` as a dict).

    Trials on other nodes build their configs from this saved tree instead of re-reading the
    study file and its base config, which may exist only where the study was launched.
    """
    return config_from_dict({**_apply(base, tuple(changes)), "seed": seed})


def trial_config(study: Study, trial: Trial) -> ExperimentConfig:
    """The full config of one expanded trial, seed included."""
    return study_config(study, trial.changes, trial.seed)


def _cells(study: Study) -> list[tuple[str, tuple[tuple[str, Any], ...]]]:
    """``(cell name, changes)`` of every cell of an expandable study, names checked unique."""
    if study.kind == "ablation":
        cells = [(variant.name, variant.overrides) for variant in study.variants]
        cells += [
            (baseline.name, _baseline_changes(baseline, study.baseline_budget))
            for baseline in study.baselines
        ]
    elif study.kind == "sensitivity":
        cells = [
            (_cell_name(((axis.key, value),)), ((axis.key, value),))
            for axis in study.axes
            for value in axis.values
        ]
    elif study.search is not None and study.search.algorithm == "grid":
        keys = [key for key, _ in study.search.space]
        points = itertools.product(*(distribution.values for _, distribution in study.search.space))
        changes = [tuple(zip(keys, point, strict=True)) for point in points]
        cells = [(_cell_name(pairs), pairs) for pairs in changes]
    else:
        algorithm = study.search.algorithm if study.search else None
        raise StudyError(
            f"{study.path}: search.algorithm: {algorithm} draws its trials inside Ray Tune; "
            "expand_trials covers ablation and sensitivity studies and grid searches"
        )
    seen: dict[str, tuple] = {}
    for cell, changes in cells:
        if cell in seen:
            raise StudyError(
                f"{study.path}: {_describe(changes)} and {_describe(seen[cell])} both make the "
                f"trial directory {cell!r}; make the values differ in their text"
            )
        seen[cell] = changes
    return cells


def _baseline_changes(baseline: Baseline, budget: BaselineBudget) -> tuple[tuple[str, Any], ...]:
    """What a baseline cell sets: its model, its settings, then what its budget sets."""
    return (("baseline.model", baseline.model), *baseline.settings, *budget.overrides())


def _baseline_cell_name(model: str) -> str:
    """``pykeen:TuckER`` → ``pykeen-tucker``."""
    return re.sub(r"[^a-z0-9_-]", "-", model.lower())


def _merge(*groups: tuple[tuple[str, Any], ...]) -> tuple[tuple[str, Any], ...]:
    """Pairs of several groups, each key once (where it first appears) with its last value."""
    merged: dict[str, Any] = {}
    for group in groups:
        merged.update(group)
    return tuple(merged.items())


def _cell_name(changes: tuple[tuple[str, Any], ...]) -> str:
    text = ",".join(f"{key}={_label(value)}" for key, value in changes)
    text = re.sub(r"[^A-Za-z0-9._+=,-]", "_", text)
    if len(text) > _MAX_CELL_LENGTH:
        digest = hashlib.sha1(text.encode()).hexdigest()[:10]
        text = f"{text[: _MAX_CELL_LENGTH - 11]}-{digest}"
    return text


def _label(value) -> str:
    if isinstance(value, bool) or value is None:
        return json.dumps(value)
    if isinstance(value, float):
        return repr(value)
    return str(value)


def _describe(changes) -> str:
    return ", ".join(f"{key}={value!r}" for key, value in changes)


# -------------------------------------------------------------------------- config-key helpers


def _leaf_keys(cls=ExperimentConfig, prefix: str = "") -> dict[str, Any]:
    keys: dict[str, Any] = {}
    hints = typing.get_type_hints(cls)
    for spec in dataclasses.fields(cls):
        key = f"{prefix}{spec.name}"
        if dataclasses.is_dataclass(hints[spec.name]):
            keys.update(_leaf_keys(hints[spec.name], f"{key}."))
        else:
            keys[key] = hints[spec.name]
    return keys


_CONFIG_KEYS = _leaf_keys()
_SECTIONS = list(dict.fromkeys(key.rpartition(".")[0] for key in _CONFIG_KEYS if "." in key))


def _value_type(key: str) -> type:
    """The Python type of a config key's values (``str | None`` → ``str``)."""
    annotation = _CONFIG_KEYS[key]
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        annotation = next(arg for arg in typing.get_args(annotation) if arg is not type(None))
    return annotation


def _check_config_key(key) -> None:
    """Raise ConfigError unless ``key`` names one config value that a study may set."""
    if not isinstance(key, str):
        raise ConfigError(f"config keys are dotted text such as diffusion.steps, got {key!r}")
    if key == "seed":
        raise ConfigError("seed is set for each trial from the study's seeds, not as an override")
    if key in _CONFIG_KEYS:
        return
    if key in _SECTIONS:
        keys = ", ".join(name for name in _CONFIG_KEYS if name.startswith(f"{key}."))
        raise ConfigError(f"{key} is a section, not a key; name one of its keys: {keys}")
    close = difflib.get_close_matches(key, list(_CONFIG_KEYS), n=1)
    hint = f"did you mean {close[0]}? " if close else ""
    section = key.rpartition(".")[0]
    if section in _SECTIONS:
        names = [name.rpartition(".")[2] for name in _CONFIG_KEYS if name.startswith(f"{section}.")]
        raise ConfigError(
            f"unknown config key {key}; {hint}valid keys of {section}: {', '.join(names)}"
        )
    raise ConfigError(
        f"unknown config key {key}; {hint}keys are SECTION.NAME with a section among "
        f"{', '.join(_SECTIONS)}"
    )


def _float_text(text: str) -> str | None:
    """``"1e-4"`` → ``"1.0e-4"`` (what PyYAML reads as a number), or None if it is no number."""
    try:
        number = float(text)
    except ValueError:
        return None
    if not math.isfinite(number):
        return None
    if re.fullmatch(r"[-+]?[0-9]+", text.strip()):
        return text.strip()
    mantissa, e, exponent = text.strip().lower().partition("e")
    if "." not in mantissa:
        mantissa += ".0"
    if e and exponent[:1] not in "+-":
        exponent = f"+{exponent}"
    return f"{mantissa}{e}{exponent}"


def _base_tree(base_config: Path | None) -> dict:
    return config_to_dict(load_config(base_config) if base_config else ExperimentConfig())


def _apply(tree: dict, pairs: Iterable[tuple[str, Any]]) -> dict:
    """A copy of the full config tree ``tree`` with each dotted key set."""
    tree = copy.deepcopy(tree)
    for key, value in pairs:
        node = tree
        *sections, name = key.split(".")
        for section in sections:
            node = node[section]
        node[name] = value
    return tree


def _render_yaml(value) -> str:
    """A value as YAML text that ``core.config.parse_override`` reads back as the same value."""
    if isinstance(value, float):
        if math.isnan(value):
            return ".nan"
        if math.isinf(value):
            return ".inf" if value > 0 else "-.inf"
        return _float_text(repr(value))
    if isinstance(value, str):
        with contextlib.suppress(ConfigError):
            if value and parse_override(f"key={value}")[1] == value:
                return value
        return json.dumps(value)
    return json.dumps(value)


# -------------------------------------------------------------------------------------- reader


class _Reader:
    """Reads the parts of one study file; every error names the file and the dotted study key."""

    _COMMON = (
        "name",
        "kind",
        "description",
        "base_config",
        "overrides",
        "seeds",
        "resources",
        "metric",
        "mode",
        "pack",
        "tracking",
    )
    _BY_KIND = {
        "search": ("search",),
        "ablation": ("variants", "reference", "baselines", "baseline_budget"),
        "sensitivity": ("axes", "defaults"),
    }

    def __init__(self, path: Path):
        self.path = path
        self.blame = ""  # "--set ..." once launch overrides are applied

    def error(self, location: str, message: str) -> StudyError:
        """``FILE: [--set ...: ]LOCATION: MESSAGE``.

        A config key that both ends LOCATION and starts MESSAGE is said once; ``--set ...`` names
        the launch overrides once they are applied (:attr:`blame`), as later errors are theirs.
        """
        parts = location.split(".")
        for start in range(len(parts)):
            repeated = ".".join(parts[start:]) + ": "
            if message.startswith(repeated):
                message = message[len(repeated) :]
                break
        where = ": ".join(part for part in (str(self.path), self.blame, location) if part)
        return StudyError(f"{where}: {message}")

    # --- the file

    def read(self) -> dict:
        try:
            data = read_yaml(self.path, "study")
        except ConfigError as error:
            raise StudyError(str(error)) from None
        if data is None:
            raise self.error("", "the study is empty; it needs at least kind")
        if not isinstance(data, dict):
            raise self.error("", f"expected a mapping of study keys, got {type(data).__name__}")
        return data

    def check_keys(self, data: dict, kind: str) -> None:
        valid = (*self._COMMON, *self._BY_KIND[kind])
        for key in data:
            if key in valid:
                continue
            for other, keys in self._BY_KIND.items():
                if key in keys:
                    raise self.error(key, f"belongs to {other} studies; this study is kind {kind}")
            raise self.error(
                str(key), f"unknown study key; valid keys of a {kind} study: {', '.join(valid)}"
            )
        main = self._BY_KIND[kind][0]
        if data.get(main) is None:
            raise self.error(main, f"missing; a {kind} study needs it")

    # --- common parts

    def base_config(self, value) -> tuple[Path | None, dict]:
        if value is None:
            return None, _base_tree(None)
        if not isinstance(value, str) or not value:
            raise self.error("base_config", f"expected a path relative to the study, got {value!r}")
        path = (self.path.parent / value).resolve()
        try:
            return path, _base_tree(path)
        except ConfigError as error:
            raise self.error("base_config", str(error)) from None

    def pairs(self, mapping, location: str) -> tuple[tuple[str, Any], ...]:
        """``{dotted key: value}`` → ``((key, value), ...)``, each key a settable config value."""
        if mapping is None:
            return ()
        if not isinstance(mapping, dict):
            raise self.error(
                location, f"expected a mapping of dotted config keys to values, got {mapping!r}"
            )
        pairs = []
        for key, value in mapping.items():
            try:
                _check_config_key(key)
                pairs.append((key, coerce_value(key, value)))
            except ConfigError as error:
                raise self.error(f"{location}.{key}", str(error)) from None
        return tuple(pairs)

    def launch_overrides(
        self, texts: tuple[str, ...], varied: dict[str, str], tree: dict
    ) -> tuple[tuple[str, Any], ...]:
        """``--set KEY=VALUE`` texts → ``(key, value)`` pairs, checked on ``tree`` (the base config
        with the study's overrides); every error names the ``--set`` it is due to."""
        pairs: dict[str, Any] = {}
        given: dict[str, str] = {}
        for text in texts:
            location = f"--set {text}"
            try:
                path, value = parse_override(text)
            except ConfigError as error:
                raise self.error(
                    location, str(error).removeprefix(f"override {text!r}: ")
                ) from None
            key = ".".join(path)
            try:
                _check_config_key(key)
                value = coerce_value(key, value)
            except ConfigError as error:
                raise self.error(location, str(error).removeprefix(f"{key}: ")) from None
            if key in varied:
                raise self.error(
                    location,
                    f"the study varies {key} ({varied[key]}); overriding it would silently change "
                    "the design: copy the study and edit it instead",
                )
            if key in given:
                raise self.error(location, f"{key} is already set by --set {given[key]}")
            pairs[key], given[key] = value, text
        try:
            config_from_dict(_apply(tree, pairs.items()))
        except ConfigError as error:
            message = str(error)
            key = next((key for key in pairs if message.startswith(f"{key}: ")), None)
            if key is None:  # a rule across keys: every --set may be part of it
                raise self.error(" ".join(f"--set {text}" for text in texts), message) from None
            raise self.error(f"--set {given[key]}", message.removeprefix(f"{key}: ")) from None
        return tuple(pairs.items())

    def check_cell(
        self, tree: dict, pairs: Iterable[tuple[str, Any]], location: str, keyed: bool = True
    ) -> dict:
        """Apply ``pairs`` to ``tree`` and build the config; return the new tree.

        With ``keyed``, ``location`` holds the pairs as keys, and an error about one key names it.
        """
        pairs = tuple(pairs)
        tree = _apply(tree, pairs)
        try:
            config_from_dict(tree)
        except ConfigError as error:
            message = str(error)
            where = next(
                (
                    f"{location}.{key}"
                    for key, _ in pairs
                    if keyed and message.startswith(f"{key}:")
                ),
                location,
            )
            raise self.error(where, message) from None
        return tree

    def seeds(self, value) -> tuple[int, ...]:
        if not isinstance(value, list) or not value:
            raise self.error("seeds", f"expected a non-empty list of integers, got {value!r}")
        for index, seed in enumerate(value):
            if not _is_int(seed) or seed < 0:
                raise self.error(f"seeds[{index}]", f"expected an integer >= 0, got {seed!r}")
        if len(set(value)) != len(value):
            raise self.error("seeds", f"repeated seeds in {value}")
        return tuple(value)

    def resources(self, value) -> Resources:
        if value is None:
            return Resources()
        values = self.mapping(value, "resources", ("cpus", "gpus", "workers"))
        cpus = values.get("cpus", 1)
        if not _is_number(cpus) or cpus <= 0:
            raise self.error("resources.cpus", f"expected a number > 0, got {cpus!r}")
        gpus = values.get("gpus", 0)
        if not _is_number(gpus) or gpus < 0 or (gpus > 1 and gpus != int(gpus)):
            raise self.error(
                "resources.gpus",
                f"expected 0, a fraction of one GPU or a whole number of GPUs, got {gpus!r}",
            )
        workers = values.get("workers", 1)
        if not _is_int(workers) or workers < 1:
            raise self.error("resources.workers", f"expected an integer >= 1, got {workers!r}")
        return Resources(cpus=cpus, gpus=gpus, workers=workers)

    def tracking(self, value) -> Tracking:
        if value is None:
            return Tracking()
        values = self.mapping(value, "tracking", ("mlflow", "tensorboard"))
        uri = values.get("mlflow")
        problem = mlflow_uri_problem(uri) if uri is not None else None
        if problem:
            raise self.error("tracking.mlflow", problem)
        tensorboard = values.get("tensorboard", True)
        if not isinstance(tensorboard, bool):
            raise self.error("tracking.tensorboard", f"expected true or false, got {tensorboard!r}")
        return Tracking(mlflow=uri, tensorboard=tensorboard)

    def pack(self, value, study: dict) -> int:
        """``pack``: an integer >= 1; without it :data:`DEFAULT_PACK` where packs can form."""
        search = study.get("search")
        if search is not None and search.algorithm != "grid":
            article = "an" if search.algorithm[0] in "aeiou" else "a"
            reason = f"{article} {search.algorithm} search draws its trials one at a time"
        elif search is not None and search.asha is not None:
            reason = "ASHA stops single trials, and a pack trains its members as one"
        elif study["resources"].workers > 1:
            reason = "a pack trains in one process, and resources.workers asks for several"
        else:
            reason = None
        if value is None:
            if reason:
                return 1
            return DEFAULT_GPU_PACK if study["resources"].gpus >= 1 else DEFAULT_PACK
        if not _is_int(value) or not 1 <= value <= 1024:
            raise self.error("pack", f"expected an integer from 1 to 1024, got {value!r}")
        if value > 1 and reason:
            raise self.error("pack", f"{value}: runs cannot be packed here ({reason}); use pack: 1")
        return value

    def metric(self, metric, mode) -> tuple[str, str]:
        if not isinstance(metric, str) or not _METRIC_PATTERN.fullmatch(metric):
            raise self.error(
                "metric",
                f"{metric!r} cannot select models: only valid-split metrics of the clean protocol "
                "can (the official min-of-S protocol uses the label); choose valid.clean.mrr, "
                "valid.clean.mr or valid.clean.hits@K",
            )
        if mode not in ("max", "min"):
            raise self.error("mode", f"{mode!r} is not valid; choose max or min")
        better = "min" if metric == "valid.clean.mr" else "max"
        if mode != better:
            raise self.error(
                "mode",
                f"{metric} is better when {'lower' if better == 'min' else 'higher'}; "
                f"use mode: {better}",
            )
        return metric, mode

    def mapping(self, value, location: str, keys: tuple[str, ...]) -> dict:
        if not isinstance(value, dict):
            raise self.error(
                location, f"expected a mapping with keys {', '.join(keys)}, got {value!r}"
            )
        for key in value:
            if key not in keys:
                raise self.error(f"{location}.{key}", f"unknown key; valid keys: {', '.join(keys)}")
        return value

    def values(self, value, location: str, key: str) -> tuple:
        """A non-empty list of distinct values for config key ``key``."""
        if not isinstance(value, list) or not value:
            raise self.error(location, f"expected a non-empty list of values, got {value!r}")
        values = []
        for index, item in enumerate(value):
            try:
                item = coerce_value(key, item)
            except ConfigError as error:
                raise self.error(f"{location}[{index}]", str(error)) from None
            if item in values:
                raise self.error(f"{location}[{index}]", f"{item!r} is repeated")
            values.append(item)
        return tuple(values)

    # --- kinds

    def variants(self, value, tree: dict) -> tuple[Variant, ...]:
        if not isinstance(value, dict) or not value:
            raise self.error(
                "variants", "expected a mapping of variant names to overrides, e.g. full: {}"
            )
        variants: list[Variant] = []
        configs: dict = {}
        for name, overrides in value.items():
            if not isinstance(name, str) or not _NAME_PATTERN.fullmatch(name):
                hint = (
                    " (YAML reads unquoted yes/no/on/off as booleans)"
                    if isinstance(name, bool)
                    else ""
                )
                raise self.error(
                    f"variants.{name}",
                    f"{name!r} is not a readable directory name ({_NAME_RULE}){hint}",
                )
            location = f"variants.{name}"
            pairs = self.pairs(overrides, location)
            config = config_from_dict(self.check_cell(tree, pairs, location))
            if config in configs:
                raise self.error(location, f"gives the same config as variants.{configs[config]}")
            configs[config] = name
            variants.append(Variant(name=name, overrides=pairs))
        return tuple(variants)

    def reference(self, value, variants: tuple[Variant, ...]) -> str:
        """The variant named by ``reference``; by default ``full`` if there is one, else the first."""
        names = [variant.name for variant in variants]
        if value is None:
            return "full" if "full" in names else names[0]
        if not isinstance(value, str) or value not in names:
            hint = (
                " (YAML reads unquoted yes/no/on/off as booleans)"
                if isinstance(value, bool)
                else ""
            )
            raise self.error(
                "reference",
                f"{value!r} is not a variant of this study{hint}; choose one of {', '.join(names)}",
            )
        return value

    def baseline_budget(self, value, baselines) -> BaselineBudget | None:
        """``baseline_budget`` (``match`` by default), or ``None`` for a study without baselines."""
        if baselines is None:
            if value is not None:
                raise self.error(
                    "baseline_budget", "the study has no baselines to budget; add baselines"
                )
            return None
        forms = "match, {epochs: N} or {seconds: S, clock: cpu|wall}"
        if value is None or value == "match":
            return BaselineBudget("match")
        if not isinstance(value, dict) or not value:
            raise self.error("baseline_budget", f"expected {forms}, got {value!r}")
        if "epochs" in value:
            self.mapping(value, "baseline_budget", ("epochs",))
            epochs = value["epochs"]
            if not _is_int(epochs) or epochs < 1:
                raise self.error(
                    "baseline_budget.epochs", f"expected an integer >= 1, got {epochs!r}"
                )
            return BaselineBudget("epochs", epochs=epochs)
        if "seconds" in value:
            self.mapping(value, "baseline_budget", ("seconds", "clock"))
            seconds, clock = value["seconds"], value.get("clock", "cpu")
            if not _is_number(seconds) or not math.isfinite(seconds) or seconds <= 0:
                raise self.error(
                    "baseline_budget.seconds", f"expected a number of seconds > 0, got {seconds!r}"
                )
            if clock not in _CLOCKS:
                raise self.error(
                    "baseline_budget.clock",
                    f"{clock!r} is not a clock; choose one of {', '.join(_CLOCKS)}",
                )
            return BaselineBudget("seconds", seconds=float(seconds), clock=clock)
        key = next(iter(value))
        raise self.error(f"baseline_budget.{key}", f"unknown budget; expected {forms}")

    def no_baseline_keys(self, pairs, location: str, owned: tuple[str, ...]) -> None:
        """Refuse ``baseline.model`` and the budget's keys (``owned``) among ``pairs``."""
        for key, _ in pairs:
            if key == "baseline.model":
                raise self.error(
                    f"{location}.{key}",
                    "an ablation's baselines are listed under baselines (which budgets them "
                    "and names their cells), e.g. baselines: [pykeen:TuckER]",
                )
            if key in owned:
                raise self.error(
                    f"{location}.{key}",
                    "baseline_budget sets it for every baseline; give the budget there",
                )

    def baselines(
        self, value, budget: BaselineBudget, variants: tuple[Variant, ...], tree: dict
    ) -> tuple[Baseline, ...]:
        """The baseline cells of ``baselines`` (a list of names or a mapping of names to
        ``baseline.*`` settings; a list of values makes one cell per value, or per combination)."""
        from core.baselines import BASELINE_MODELS  # PyKEEN's side is imported only when used

        if isinstance(value, list):
            names = value
            if not names:
                raise self.error("baselines", "expected at least one baseline")
            for index, name in enumerate(names):
                if names.index(name) != index:
                    raise self.error(f"baselines[{index}]", f"{name!r} is repeated")
            entries = [(name, None) for name in names]
        elif isinstance(value, dict) and value:
            entries = list(value.items())
        else:
            raise self.error(
                "baselines",
                "expected a list of baseline names, e.g. [pykeen:TuckER, pykeen:RotatE], or a "
                "mapping of names to baseline.* settings, e.g. pykeen:RotatE: {baseline.lr: 0.003}",
            )
        variant_names = {variant.name for variant in variants}
        baselines: list[Baseline] = []
        for model, settings in entries:
            location = f"baselines.{model}"
            if model not in BASELINE_MODELS:
                by_case = {name.lower(): name for name in BASELINE_MODELS}
                close = difflib.get_close_matches(str(model).lower(), by_case, n=1, cutoff=0.8)
                hint = f"did you mean {by_case[close[0]]}? " if close else ""
                raise self.error(
                    location,
                    f"unknown baseline; {hint}choose one of {', '.join(BASELINE_MODELS)}",
                )
            fixed, listed = self.baseline_settings(settings, location, budget)
            keys = [key for key, _ in listed]
            for point in itertools.product(*(values for _, values in listed)):
                chosen = tuple(zip(keys, point, strict=True))
                name = _baseline_cell_name(model)
                if chosen:
                    name += "-" + _cell_name(
                        tuple((key.removeprefix("baseline."), item) for key, item in chosen)
                    )
                if name in variant_names:
                    raise self.error(
                        location,
                        f"its cell {name!r} has the name of a variant; rename variants.{name}",
                    )
                settings_of_cell = _merge(fixed, chosen)
                baseline = Baseline(name=name, model=model, settings=settings_of_cell)
                self.check_cell(tree, _baseline_changes(baseline, budget), location)
                baselines.append(baseline)
        return tuple(baselines)

    def baseline_settings(self, value, location: str, budget: BaselineBudget):
        """``(fixed pairs, (key, values) of listed settings)`` of one baseline's settings."""
        if value is None:
            return (), ()
        if not isinstance(value, dict):
            raise self.error(
                location,
                f"expected a mapping of baseline.* settings, e.g. {{baseline.lr: 0.003}}, "
                f"got {value!r}",
            )
        fixed, listed = [], []
        for key, item in value.items():
            where = f"{location}.{key}"
            if not isinstance(key, str) or not key.startswith("baseline."):
                raise self.error(
                    where,
                    "only baseline.* settings belong to a baseline; settings of every trial go "
                    "under overrides",
                )
            try:
                _check_config_key(key)
            except ConfigError as error:
                raise self.error(where, str(error)) from None
            if key == "baseline.model":
                raise self.error(where, "the model is the entry's name")
            if key in budget.owned_keys():
                raise self.error(
                    where, "baseline_budget sets it for every baseline; give the budget there"
                )
            if isinstance(item, list):
                listed.append((key, self.values(item, where, key)))
                continue
            try:
                fixed.append((key, coerce_value(key, item)))
            except ConfigError as error:
                raise self.error(where, str(error)) from None
        return tuple(fixed), tuple(listed)

    def axes(self, value, defaults, tree: dict):
        if not isinstance(value, dict) or not value:
            raise self.error(
                "axes",
                "expected a mapping of config keys to value lists, e.g. diffusion.steps: [5, 10]",
            )
        axes = []
        for key, values in value.items():
            try:
                _check_config_key(key)
            except ConfigError as error:
                raise self.error(f"axes.{key}", str(error)) from None
            axes.append(Axis(key=key, values=self.values(values, f"axes.{key}", key)))
        default_pairs = self.pairs(defaults, "defaults")
        for key, _ in default_pairs:
            if key not in value:
                raise self.error(
                    f"defaults.{key}",
                    "not an axis; defaults give each axis key its value while another axis "
                    "moves, and settings for every trial go under overrides",
                )
        tree = self.check_cell(tree, default_pairs, "defaults")
        for axis in axes:
            for index, item in enumerate(axis.values):
                location = f"axes.{axis.key}[{index}]"
                self.check_cell(tree, [(axis.key, item)], location, keyed=False)
        return tuple(axes), default_pairs

    def search(self, value, tree: dict) -> Search:
        keys = ("algorithm", "seed", "num_samples", "asha", "space")
        value = self.mapping(value, "search", keys)
        algorithm = value.get("algorithm")
        if algorithm not in ALGORITHMS:
            what = "missing" if algorithm is None else f"{algorithm!r} is not a search algorithm"
            raise self.error("search.algorithm", f"{what}; choose one of {', '.join(ALGORITHMS)}")
        seed = value.get("seed", 0)
        if not _is_int(seed) or seed < 0:
            raise self.error("search.seed", f"expected an integer >= 0, got {seed!r}")
        num_samples = value.get("num_samples")
        if algorithm == "grid":
            if num_samples is not None:
                raise self.error(
                    "search.num_samples",
                    "a grid search runs every point once per seed; remove num_samples",
                )
        elif not _is_int(num_samples) or num_samples < 1:
            raise self.error(
                "search.num_samples",
                f"expected the number of points to draw (>= 1), got {num_samples!r}",
            )
        asha = self.asha(value.get("asha"))

        space = value.get("space")
        if not isinstance(space, dict) or not space:
            raise self.error(
                "search.space",
                "expected a mapping of config keys to distributions, e.g. "
                "diffusion.steps: {type: randint, low: 5, high: 100}",
            )
        pairs = []
        for key, spec in space.items():
            location = f"search.space.{key}"
            try:
                _check_config_key(key)
            except ConfigError as error:
                raise self.error(location, str(error)) from None
            distribution = self.distribution(key, spec, location, tree)
            if (distribution.type == "grid") != (algorithm == "grid"):
                message = (
                    "algorithm: grid runs grid entries only; make it {type: grid, values: [...]}"
                    if algorithm == "grid"
                    else f"grid entries need algorithm: grid; {algorithm} draws from choice, "
                    "uniform, loguniform or randint"
                )
                raise self.error(location, message)
            if algorithm == "optuna-tpe" and distribution.type == "loguniform" and distribution.q:
                raise self.error(f"{location}.q", "Optuna ignores q on a loguniform; remove it")
            pairs.append((key, distribution))
        if algorithm == "grid":
            keys = [key for key, _ in pairs]
            for point in itertools.product(*(d.values for _, d in pairs)):
                try:
                    config_from_dict(_apply(tree, zip(keys, point, strict=True)))
                except ConfigError as error:
                    raise self.error(
                        "search.space",
                        f"the grid point {_describe(zip(keys, point, strict=True))} fails: {error}",
                    ) from None
        return Search(
            algorithm=algorithm, space=tuple(pairs), seed=seed, num_samples=num_samples, asha=asha
        )

    def asha(self, value) -> Asha | None:
        if value is None:
            return None
        value = self.mapping(value, "search.asha", ("max_t", "grace_period", "reduction_factor"))
        max_t = value.get("max_t")
        if not _is_int(max_t) or max_t < 1:
            raise self.error(
                "search.asha.max_t", f"expected the most epochs a trial runs (>= 1), got {max_t!r}"
            )
        grace = value.get("grace_period", 1)
        if not _is_int(grace) or not 1 <= grace <= max_t:
            raise self.error(
                "search.asha.grace_period",
                f"expected an integer in [1, max_t={max_t}], got {grace!r}",
            )
        factor = value.get("reduction_factor", 4)
        if not _is_number(factor) or factor <= 1:
            raise self.error(
                "search.asha.reduction_factor", f"expected a number > 1, got {factor!r}"
            )
        return Asha(max_t=max_t, grace_period=grace, reduction_factor=factor)

    def distribution(self, key: str, spec, location: str, tree: dict) -> Distribution:
        if not isinstance(spec, dict):
            raise self.error(
                location,
                f"expected a distribution such as {{type: choice, values: [...]}}, got {spec!r}",
            )
        name = spec.get("type")
        if name not in _DISTRIBUTIONS:
            what = "missing distribution type" if name is None else f"unknown distribution {name!r}"
            raise self.error(
                f"{location}.type", f"{what}; choose one of {', '.join(DISTRIBUTION_TYPES)}"
            )
        cls = _DISTRIBUTIONS[name]
        params = [spec_field.name for spec_field in dataclasses.fields(cls)]
        for param in spec:
            if param != "type" and param not in params:
                raise self.error(f"{location}.{param}", f"{name} takes {', '.join(params)}")

        if cls in (Choice, Grid):
            values = self.values(spec.get("values"), f"{location}.values", key)
            for index, item in enumerate(values):
                self.check_cell(tree, [(key, item)], f"{location}.values[{index}]", keyed=False)
            return cls(values=values)

        integer = cls is RandInt
        expected = _value_type(key)
        if expected not in (int, float) or (expected is int and not integer):
            use = "use randint for an integer key" if expected is int else "use choice"
            raise self.error(
                location,
                f"{name} draws {'integers' if integer else 'floats'} but {key} takes "
                f"{expected.__name__} values; {use}",
            )
        bounds = {}
        for param in ("low", "high", "q"):
            item = spec.get(param)
            if item is None:
                if param == "q":
                    continue
                raise self.error(f"{location}.{param}", f"missing; {name} needs low and high")
            if integer:
                if not _is_int(item):
                    raise self.error(f"{location}.{param}", f"expected an integer, got {item!r}")
                bounds[param] = item
                continue
            try:  # as the float key reads it: number text such as "1e-4" is the number
                bounds[param] = coerce_value(key, item)
            except ConfigError:
                raise self.error(
                    f"{location}.{param}", f"expected a finite number, got {item!r}"
                ) from None
        low, high, q = bounds["low"], bounds["high"], bounds.get("q")
        if not low < high:
            raise self.error(location, f"empty range: low ({low}) must be below high ({high})")
        if cls is LogUniform and low <= 0:
            raise self.error(f"{location}.low", f"loguniform needs low > 0, got {low}")
        if q is not None:
            if q <= 0:
                raise self.error(f"{location}.q", f"expected q > 0, got {q}")
            for param in ("low", "high"):
                ratio = bounds[param] / q
                if not math.isclose(ratio, round(ratio), rel_tol=1e-9, abs_tol=1e-9):
                    raise self.error(
                        f"{location}.{param}",
                        f"{bounds[param]} is not a multiple of q={q}; every sampler must "
                        "draw the same values",
                    )
        for param in ("low", "high"):
            self.check_cell(tree, [(key, bounds[param])], f"{location}.{param}", keyed=False)
        return cls(low=low, high=high, q=q)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)
