"""CMA-ES started on the best seed (evomerge.optimizer.cmaes_start), with real Optuna studies."""

from __future__ import annotations

import math

import optuna
import pytest
from optuna.distributions import FloatDistribution
from optuna.study import StudyDirection

from evomerge.optimizer.cmaes_start import SeededCmaEsSampler, best_start
from evomerge.optimizer.config import SamplerConfig
from evomerge.optimizer.study import make_sampler

optuna.logging.set_verbosity(optuna.logging.WARNING)
SPACE = {"x": FloatDistribution(0.0, 10.0), "y": FloatDistribution(0.0, 10.0)}


def objective(trial: optuna.Trial) -> float:
    x, y = trial.suggest_float("x", 0.0, 10.0), trial.suggest_float("y", 0.0, 10.0)
    return -((x - 9.0) ** 2 + (y - 9.0) ** 2)


def _run(sampler: optuna.samplers.BaseSampler, n: int) -> optuna.Study:
    study = optuna.create_study(direction="maximize", sampler=sampler)
    study.enqueue_trial({"x": 1.0, "y": 1.0})
    study.enqueue_trial({"x": 9.0, "y": 8.5})  # the best seed
    study.enqueue_trial({"x": 5.0, "y": 5.0})
    study.optimize(objective, n_trials=n)
    return study


def test_best_start_picks_the_best_complete_trial_and_clips() -> None:
    study = optuna.create_study(direction="maximize")
    for params, value in (({"x": 1.0, "y": 1.0}, 0.1), ({"x": 12.0, "y": 3.0}, 0.9), ({"x": 2.0}, 5.0)):
        study.add_trial(
            optuna.trial.create_trial(
                params=params, distributions={k: FloatDistribution(0.0, 20.0) for k in params}, value=value
            )
        )
    trials = study.get_trials()
    # the trial with value 5.0 lacks y: not a start; x = 12 is clipped into [0, 10]
    assert best_start(trials, SPACE, StudyDirection.MAXIMIZE) == (1, {"x": 10.0, "y": 3.0})
    assert best_start(trials, SPACE, StudyDirection.MINIMIZE) == (0, {"x": 1.0, "y": 1.0})
    assert best_start([], SPACE, StudyDirection.MAXIMIZE) is None


def test_first_generation_is_centred_on_the_best_seed() -> None:
    seeded = SeededCmaEsSampler(seed=0, popsize=6, sigma0=0.05, warn_independent_sampling=False)
    study = _run(seeded, 3 + 6)
    assert seeded.started_from == 1
    first = study.trials[3:9]
    # sigma0 = 0.05 of the range = 0.5: every first-generation point lies near (9, 8.5), none near the centre
    for t in first:
        assert math.dist((t.params["x"], t.params["y"]), (9.0, 8.5)) < 2.5, t.params
    centre = optuna.samplers.CmaEsSampler(seed=0, popsize=6, warn_independent_sampling=False)
    plain = _run(centre, 3 + 6)
    mean_plain = [sum(t.params[k] for t in plain.trials[3:9]) / 6 for k in ("x", "y")]
    assert math.dist(mean_plain, (5.0, 5.0)) < math.dist(mean_plain, (9.0, 8.5))


def test_seeded_start_finds_the_optimum_sooner_than_the_centre_start() -> None:
    best_seeded = _run(SeededCmaEsSampler(seed=1, warn_independent_sampling=False), 30).best_value
    best_plain = _run(optuna.samplers.CmaEsSampler(seed=1, warn_independent_sampling=False), 30).best_value
    assert best_seeded > best_plain
    assert best_seeded > -0.25  # better than the best seed (9, 8.5) itself


def test_make_sampler_default_is_the_seeded_start() -> None:
    sampler = make_sampler(SamplerConfig(name="cmaes"))
    assert isinstance(sampler, SeededCmaEsSampler)
    assert not isinstance(make_sampler(SamplerConfig(name="cmaes", start="center")), SeededCmaEsSampler)
    with pytest.raises(ValueError):
        SamplerConfig(name="cmaes", sigma0=0.0)
