"""The Optuna study: storage, samplers, objective names, crash recovery, Pareto fronts."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Literal

import optuna
from optuna.trial import FrozenTrial, TrialState

from evomerge.errors import ConfigError
from evomerge.optimizer.config import SamplerConfig, SweepConfig


def make_sampler(cfg: SamplerConfig) -> optuna.samplers.BaseSampler:
    if cfg.name == "tpe":
        return optuna.samplers.TPESampler(
            seed=cfg.seed, n_startup_trials=cfg.n_startup_trials if cfg.n_startup_trials is not None else 8
        )
    if cfg.name == "cmaes":
        return optuna.samplers.CmaEsSampler(
            seed=cfg.seed,
            n_startup_trials=cfg.n_startup_trials or 0,
            popsize=cfg.population_size,
            warn_independent_sampling=False,
        )
    if cfg.name == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=cfg.seed, population_size=cfg.population_size or 12)
    return optuna.samplers.RandomSampler(seed=cfg.seed)


def make_pruner(config: SweepConfig) -> optuna.pruners.BasePruner:
    """The pruner of a multi-fidelity sweep (steps are the rungs' question counts); none otherwise."""
    fidelity = config.fidelity
    if fidelity is None:
        return optuna.pruners.NopPruner()
    if fidelity.pruner == "percentile":
        return optuna.pruners.PercentilePruner(
            fidelity.percentile, n_startup_trials=fidelity.n_startup_trials
        )
    return optuna.pruners.MedianPruner(n_startup_trials=fidelity.n_startup_trials)


def open_study(config: SweepConfig, task_names: Sequence[str]) -> optuna.Study:
    """Create the study, or load it when it exists (a sweep continues where it stopped)."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    n_obj = len(task_names) if config.multi_objective else 1
    directions: list[Literal["minimize", "maximize"]] = ["maximize"] * n_obj
    if config.storage is None:
        config.run_dir().mkdir(parents=True, exist_ok=True)
    try:
        study = optuna.create_study(
            study_name=config.study_name,
            storage=config.storage_url(),
            sampler=make_sampler(config.sampler),
            pruner=make_pruner(config),
            directions=directions,
            load_if_exists=True,
        )
    except ValueError as err:
        raise ConfigError(f"study {config.study_name!r}: {err}") from None
    if len(study.directions) != len(directions):
        raise ConfigError(
            f"study {config.study_name!r} exists with {len(study.directions)} objective(s); this config "
            f"asks for {len(directions)} (sampler {config.sampler.name}); use another study_name"
        )
    names = list(task_names) if config.multi_objective else ["dev_mean"]
    if study.metric_names != names:
        with warnings.catch_warnings():  # experimental in optuna, stable in practice
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            study.set_metric_names(names)  # optuna-dashboard labels objectives with these
    return study


def recover_stale_trials(study: optuna.Study) -> int:
    """Mark trials left RUNNING by a crashed sweep as FAILED; returns how many."""
    stale = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
    for t in stale:
        study.tell(t.number, state=TrialState.FAIL)
    return len(stale)


def complete_trials(study: optuna.Study) -> list[FrozenTrial]:
    return [
        t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)) if "scores" in t.user_attrs
    ]


def best_trial(study: optuna.Study) -> FrozenTrial:
    """The complete trial with the highest weighted mean dev score (ties: the earliest)."""
    trials = complete_trials(study)
    if not trials:
        raise ConfigError(f"study {study.study_name!r} has no complete trial yet")
    return max(trials, key=lambda t: (float(t.user_attrs["mean"]), -t.number))


def pareto_front(trials: Sequence[FrozenTrial], tasks: Sequence[str]) -> list[FrozenTrial]:
    """Trials whose per-task dev scores no other trial dominates (duplicates of a point kept once)."""
    points = [(t, tuple(float(t.user_attrs["scores"][k]) for k in tasks)) for t in trials]
    front: list[FrozenTrial] = []
    seen: set[tuple[float, ...]] = set()
    for t, p in points:
        dominated = any(all(a >= b for a, b in zip(q, p, strict=True)) and q != p for _, q in points)
        if not dominated and p not in seen:
            seen.add(p)
            front.append(t)
    return sorted(front, key=lambda t: -float(t.user_attrs["mean"]))
