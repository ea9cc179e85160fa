"""The method gene is learned: every sampler that takes a ``methods:`` space moves its trials to the
method that scores better on dev (evomerge/optimizer/method_choice.py for CMA-ES and nevergrad; TPE
and NSGA-II natively), on a synthetic objective and in a real sweep of the micro zoo."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import optuna
import pytest
from optuna.distributions import CategoricalDistribution
from optuna.trial import TrialState

from evomerge.optimizer import LocalEvaluator, SamplerConfig, SweepConfig, resolve_sweep, run_search
from evomerge.optimizer.method_choice import MIN_TRIES, choose_categorical, thompson_pick
from evomerge.optimizer.study import make_sampler
from evomerge.search_spaces import ParamRange, SearchSpaceConfig
from evomerge.zoo import Zoo

METHODS = ("plain", "good", "bad")
N_TRIALS = 60


def objective(trial: optuna.Trial) -> float:
    """``good`` reaches 1.0 at x = 0.3, ``plain`` 0.7, ``bad`` 0.4: the method matters more than x."""
    method = trial.suggest_categorical("method", METHODS)
    xs = [trial.suggest_float(f"x{i}", 0.0, 1.0) for i in range(3)]
    scale = {"good": 1.0, "plain": 0.7, "bad": 0.4}[method]
    return scale * (1.0 - sum((x - 0.3) ** 2 for x in xs) / 3)


def share_of_good(sampler_cfg: SamplerConfig) -> tuple[float, float]:
    sampler = make_sampler(sampler_cfg, budget=N_TRIALS)
    study = optuna.create_study(direction="maximize", sampler=sampler)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study.optimize(objective, n_trials=N_TRIALS)
    methods = [t.params["method"] for t in study.trials]
    half = N_TRIALS // 2
    first = methods[:half].count("good") / half
    second = methods[half:].count("good") / half
    return first, second


@pytest.mark.parametrize(
    "sampler_cfg",
    [
        SamplerConfig(name="cmaes", seed=0),
        SamplerConfig(name="cmaes", seed=1, start="center"),
        SamplerConfig(name="tpe", seed=0),
        pytest.param(SamplerConfig(name="nevergrad", seed=0, optimizer="CMA"), id="nevergrad-CMA"),
        pytest.param(SamplerConfig(name="nevergrad", seed=0), id="nevergrad-NGOpt"),
    ],
    ids=lambda c: f"{c.name}-{c.start}" if c.name == "cmaes" else c.name,
)
def test_the_share_of_the_better_method_rises(sampler_cfg: SamplerConfig) -> None:
    if sampler_cfg.name == "nevergrad":
        pytest.importorskip("nevergrad")
    first, second = share_of_good(sampler_cfg)
    # uniform sampling gives 1/3 in both halves; learning gives most of the second half
    assert second > first
    assert second >= 0.6


def test_nsga2_learns_the_method_by_selection() -> None:
    """NSGA-II (multi-objective) keeps categoricals in its genome: selection raises the better method."""

    def two(trial: optuna.Trial) -> tuple[float, float]:
        v = objective(trial)
        return v, v

    sampler = make_sampler(SamplerConfig(name="nsga2", seed=0, population_size=10))
    study = optuna.create_study(directions=["maximize", "maximize"], sampler=sampler)
    study.optimize(two, n_trials=80)
    methods = [t.params["method"] for t in study.trials]
    assert methods[:20].count("good") < methods[-20:].count("good")
    assert methods[-20:].count("good") >= 12


@pytest.mark.parametrize(
    "sampler_cfg",
    [SamplerConfig(name="random", seed=0), SamplerConfig(name="cmaes", seed=0, method_choice="uniform")],
    ids=["random", "cmaes-uniform"],
)
def test_random_search_and_method_choice_uniform_stay_uniform(sampler_cfg: SamplerConfig) -> None:
    first, second = share_of_good(sampler_cfg)
    assert 0.1 < first < 0.6 and 0.1 < second < 0.6


def test_each_method_is_tried_first_and_failures_count_as_the_worst_score() -> None:
    study = optuna.create_study(direction="maximize")
    dist = CategoricalDistribution(METHODS)

    def add(method: str, value: float | None) -> None:
        state = TrialState.COMPLETE if value is not None else TrialState.FAIL
        study.add_trial(
            optuna.trial.create_trial(
                params={"method": method}, distributions={"method": dist}, value=value, state=state
            )
        )

    for _ in range(MIN_TRIES):
        add("plain", 0.5)
        add("good", 0.9)
    nxt = study.ask()
    # "bad" was never tried: it is chosen whatever its prior
    assert choose_categorical(study, study._storage.get_trial(nxt._trial_id), "method", dist, seed=0) == "bad"
    study.tell(nxt, state=TrialState.FAIL)
    for _ in range(MIN_TRIES):
        add("bad", None)  # it only ever fails
    picks = []
    for n in range(40):
        t = study.ask()
        picks.append(choose_categorical(study, study._storage.get_trial(t._trial_id), "method", dist, seed=n))
        study.tell(t, state=TrialState.FAIL)  # told failed without the param: does not count
    assert picks.count("good") >= 34 and picks.count("bad") <= 3


def test_the_draw_is_reproducible_per_trial() -> None:
    values = [[0.5, 0.52, 0.49], [0.51, 0.5], []]
    a = [thompson_pick(values, np.random.default_rng([3, n])) for n in range(20)]
    b = [thompson_pick(values, np.random.default_rng([3, n])) for n in range(20)]
    assert a == b
    assert set(a) == {2}  # the untried arm is drawn above every tried one
    assert thompson_pick([[1.0], [math.nextafter(1.0, 2.0)]], np.random.default_rng(0)) in (0, 1)


def test_a_sweep_moves_to_the_method_that_merges_well(
    micro_zoo: Zoo, zoo_cache: Path, tmp_path: Path
) -> None:
    """Real models: DARE at density 1-2 % rescales the 1-2 % of each task vector it keeps by 50-100x and
    breaks the model; task arithmetic at weights 0-1 does not. The default CMA-ES moves its trials
    to task arithmetic."""
    space = SearchSpaceConfig(
        methods=("dare_linear", "task_arithmetic"),
        params=(
            ParamRange(name="weight", low=0.0, high=1.0),
            ParamRange(name="density", low=0.01, high=0.02),
        ),
        granularity="global",
    )
    cfg = SweepConfig(
        study_name="methods",
        runs_dir=str(tmp_path),
        zoo="micro",
        search_space=space,
        sampler=SamplerConfig(name="cmaes", seed=0),
        n_trials=24,
        seed_recipes=(),
        pick=None,
    )
    sweep = resolve_sweep(cfg, zoo_cache=zoo_cache)
    study = run_search(sweep, LocalEvaluator(sweep))
    trials = sorted(study.get_trials(states=(TrialState.COMPLETE,)), key=lambda t: t.number)
    assert len(trials) == 24
    by_method: dict[str, list[float]] = {"dare_linear": [], "task_arithmetic": []}
    for t in trials:
        by_method[t.params["method"]].append(float(t.value or 0.0))
    # the premise: task arithmetic merges better here
    assert max(by_method["dare_linear"]) < min(by_method["task_arithmetic"][:2])
    methods = [t.params["method"] for t in trials]
    assert methods[-12:].count("task_arithmetic") > methods[:12].count("task_arithmetic")
    assert methods[-12:].count("task_arithmetic") >= 9
