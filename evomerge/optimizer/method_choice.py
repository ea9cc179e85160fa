"""The method gene, learned: a bandit over the choices of a categorical parameter.

CMA-ES and nevergrad search floats only; a categorical gene (the ``method`` of a ``methods:`` space)
reaches them as an *independent* parameter, which Optuna samples uniformly at random for the whole
sweep: the search never learns which method works. :func:`choose_categorical` replaces that draw.
It looks at the study's finished trials and picks a choice by Thompson sampling:

* each choice is first tried ``MIN_TRIES`` times (trials still running count, so parallel workers
  spread over the untried choices instead of all taking the first; failed trials count too, as the
  worst score seen, so a method that breaks the merge is not tried for ever);
* then each choice's score is drawn from a normal around the mean of its better half of complete
  trials (a method is judged by the recipes it makes possible, not by its average bad sample), with the
  study's spread of values divided by the square root of its count as the standard error; the highest
  draw wins. A clearly better method thus takes a growing share of the trials, and a method that is
  only unlucky keeps a chance in proportion to how little it was tried.

The draw is seeded by the sampler's seed and the trial's number, so a sweep is reproducible and any
process of a shared study makes the same choice for the same trial. Enqueued seeds are not sampled.
TPE (a density per choice) and NSGA-II (selection and crossover) learn categoricals themselves; random
search samples every gene uniformly by design.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import optuna
from optuna.distributions import BaseDistribution, CategoricalDistribution
from optuna.study import StudyDirection
from optuna.trial import FrozenTrial, TrialState

__all__ = ["MIN_TRIES", "LearnedChoiceCmaEsSampler", "choose_categorical", "thompson_pick"]

MIN_TRIES = 2
"""Finished or running trials each choice gets before the bandit starts to prefer one."""


def _draw_rng(seed: int | None, trial_number: int, name: str) -> np.random.Generator:
    key = sum(ord(c) * (i + 1) for i, c in enumerate(name))
    return np.random.default_rng([seed or 0, trial_number, key])


def choose_categorical(
    study: optuna.Study,
    trial: FrozenTrial,
    name: str,
    distribution: CategoricalDistribution,
    *,
    seed: int | None,
) -> Any:
    """The value of categorical parameter ``name`` for ``trial``, chosen by Thompson sampling over
    the study's trials (see the module's docstring). Multi-objective studies fall back to a seeded
    uniform draw: there is no single score to learn from."""
    choices = list(distribution.choices)
    rng = _draw_rng(seed, trial.number, name)
    if len(study.directions) != 1:
        return choices[int(rng.integers(len(choices)))]
    sign = 1.0 if study.direction == StudyDirection.MAXIMIZE else -1.0
    states = (TrialState.COMPLETE, TrialState.RUNNING, TrialState.FAIL)
    trials = study.get_trials(deepcopy=False, states=states)
    values: list[list[float]] = [[] for _ in choices]
    failed = [0] * len(choices)
    tried = [0] * len(choices)
    for t in trials:
        if t.number == trial.number or name not in t.params:
            continue
        try:
            i = choices.index(t.params[name])
        except ValueError:
            continue  # a choice of an earlier space
        tried[i] += 1
        if t.state == TrialState.COMPLETE and t.value is not None and math.isfinite(t.value):
            values[i].append(sign * float(t.value))
        elif t.state != TrialState.RUNNING:
            failed[i] += 1  # a failed merge (NaN model, OOM, ...) or a non-finite score
    least = min(tried)
    if least < MIN_TRIES:
        under = [i for i, n in enumerate(tried) if n == least]
        return choices[under[int(rng.integers(len(under)))]]
    # A failure counts as the worst score seen: a method that breaks is not tried for ever.
    pooled = [v for arm in values for v in arm]
    worst = min(pooled) if pooled else 0.0
    for i, n in enumerate(failed):
        values[i].extend([worst] * n)
    return choices[thompson_pick(values, rng)]


def thompson_pick(values: Sequence[Sequence[float]], rng: np.random.Generator) -> int:
    """The index of the arm whose draw is highest (larger values are better). Each arm's draw is
    normal around the mean of its better half, with standard error spread / sqrt(count); an arm with
    no value yet is drawn first (it must be tried)."""
    pooled = [v for arm in values for v in arm]
    spread = float(np.std(pooled)) if len(pooled) > 1 else 0.0
    spread = max(spread, 1e-9)
    means: list[float | None] = []
    for arm in values:
        if not arm:
            means.append(None)
            continue
        top = sorted(arm, reverse=True)[: max(1, math.ceil(len(arm) / 2))]
        means.append(float(np.mean(top)))
    draws = []
    for arm, mean in zip(values, means, strict=True):
        if mean is None:
            draws.append(math.inf)
        else:
            draws.append(float(rng.normal(mean, spread / math.sqrt(len(arm)))))
    return int(np.argmax(draws))


class LearnedChoiceCmaEsSampler(optuna.samplers.CmaEsSampler):
    """:class:`optuna.samplers.CmaEsSampler` whose categorical parameters (which CMA-ES cannot search)
    are chosen by :func:`choose_categorical` instead of uniformly at random."""

    def __init__(self, *, learn_categoricals: bool = True, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._choice_seed: int | None = kwargs.get("seed")
        self.learn_categoricals = learn_categoricals

    def sample_independent(
        self,
        study: optuna.Study,
        trial: FrozenTrial,
        param_name: str,
        param_distribution: BaseDistribution,
    ) -> Any:
        if self.learn_categoricals and isinstance(param_distribution, CategoricalDistribution):
            return choose_categorical(study, trial, param_name, param_distribution, seed=self._choice_seed)
        return super().sample_independent(study, trial, param_name, param_distribution)
