"""Tests of evomerge.optimizer: the search loop on the micro zoo, resume, failures, objectives, Pareto
fronts, export and the final report."""

from __future__ import annotations

import dataclasses
import json
import random
import socket
import subprocess
from pathlib import Path
from typing import Any

import optuna
import pytest
import torch
import yaml
from conftest import copy_model_with, siblings_named_like
from optuna.distributions import FloatDistribution
from optuna.trial import FrozenTrial, TrialState
from transformers import AutoModelForCausalLM

from evomerge.checkpoints import ModelDir
from evomerge.errors import ConfigError, EvomergeError, OutputExistsError
from evomerge.evaluators import HFBackend, evaluate, load_split
from evomerge.merging import InMemoryMerger, MergeRecipe
from evomerge.optimizer import (
    BackendConfig,
    LocalEvaluator,
    ModelsConfig,
    ResolvedSweep,
    SamplerConfig,
    SweepConfig,
    TrialOutcome,
    best_trial,
    complete_trials,
    export_trial,
    final_report,
    load_run,
    load_study,
    load_sweep_config,
    pareto_front,
    pick_trial,
    resolve_sweep,
    run_search,
    trial_recipe,
    uniform_task_arithmetic,
)
from evomerge.optimizer.study import distinct_recipes, open_study
from evomerge.search_spaces import ParamRange, SearchSpace, SearchSpaceConfig
from evomerge.zoo import Zoo

TASKS = ["arith", "code", "logic"]
TIES_LAYER = SearchSpaceConfig(method="ties", granularity="layer")
SEED_GENOME = {"weight": 1.0, "density": 0.5}


# ------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def runs_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("runs")


def zoo_sweep(runs_dir: Path, zoo_cache: Path, study: str, **fields: Any) -> ResolvedSweep:
    # no default seed recipes here: these tests place their own seeds first (the defaults, uniform task
    # arithmetic and each expert, are tested in test_honest_pick.py); the pick on val is on by default
    fields.setdefault("seed_recipes", ())
    cfg = SweepConfig(study_name=study, runs_dir=str(runs_dir), zoo="micro", **fields)
    return resolve_sweep(cfg, zoo_cache=zoo_cache)


@pytest.fixture(scope="module")
def evaluator(micro_zoo: Zoo, zoo_cache: Path, runs_dir: Path) -> LocalEvaluator:
    return LocalEvaluator(zoo_sweep(runs_dir, zoo_cache, "evaluator"))


@pytest.fixture(scope="module")
def short_search(
    runs_dir: Path, zoo_cache: Path, evaluator: LocalEvaluator
) -> tuple[ResolvedSweep, optuna.Study, list[tuple[int, int, TrialOutcome]]]:
    sweep = zoo_sweep(
        runs_dir,
        zoo_cache,
        "short",
        search_space=TIES_LAYER,
        sampler=SamplerConfig(name="tpe", seed=0),
        n_trials=4,
        seed_genomes=(SEED_GENOME,),
    )
    calls: list[tuple[int, int, TrialOutcome]] = []
    study = run_search(sweep, evaluator, on_trial=lambda d, t, o: calls.append((d, t, o)))
    return sweep, study, calls


class Reference:
    """An independent scorer: its own merger and its own live model."""

    def __init__(self, zoo: Zoo, experts: list[str] | None = None) -> None:
        self.zoo = zoo
        self.merger = InMemoryMerger(zoo.base, experts or list(zoo.experts.values()))
        self.backend = HFBackend.from_pretrained(zoo.base, batch_size=64)

    def scores(self, recipe: MergeRecipe, split: str, tasks: Any = None) -> dict[str, float]:
        """Scores of the merged ``recipe`` on ``split`` of ``tasks`` (default: the zoo's own tasks, whose
        dev split is whole; pass a sweep's tasks for its dev split, the rest after its val split)."""
        self.backend.load_state_dict(self.merger.merge(recipe))
        tasks = self.zoo.tasks if tasks is None else tasks
        return evaluate(self.backend, tasks, split, self.zoo.root).scores  # type: ignore[arg-type]

    def model_scores(self, path: str, split: str) -> dict[str, float]:
        backend = HFBackend.from_pretrained(path, batch_size=64)
        return evaluate(backend, self.zoo.tasks, split, self.zoo.root).scores  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def reference(micro_zoo: Zoo) -> Reference:
    return Reference(micro_zoo)


def trials_in(study: optuna.Study, state: TrialState) -> list[FrozenTrial]:
    return study.get_trials(deepcopy=False, states=(state,))


# ------------------------------------------------------------------------------------ the search loop
def test_search_records_complete_trials(short_search: Any, micro_zoo: Zoo, evaluator: LocalEvaluator) -> None:
    sweep, study, calls = short_search
    trials = study.get_trials()
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 4
    assert [t.number for t in trials] == [0, 1, 2, 3]
    num_layers = micro_zoo.config.num_layers
    space = SearchSpace(TIES_LAYER, micro_zoo.base, list(micro_zoo.experts.values()), num_layers)
    assert space.dimension == 2 * 3 * num_layers  # (weight, density) x experts x layers
    # the fitness questions: the zoo's dev subset less the val split held back for the pick
    dev_size = len(load_split(sweep.tasks[0], "dev", sweep.data_dir))
    val_size = len(load_split(sweep.tasks[0], "val", sweep.data_dir))
    assert (dev_size, val_size) == (17, 7) and dev_size + val_size == micro_zoo.config.dev_size
    for t in trials:
        attrs = t.user_attrs
        assert set(attrs) >= {"recipe", "scores", "mean", "merge_seconds", "eval_seconds"}
        assert MergeRecipe.model_validate(attrs["recipe"]) == space.to_recipe(t.params)
        assert set(t.params) == set(space.distributions())
        scores = attrs["scores"]
        assert list(scores) == TASKS
        for s in scores.values():
            assert 0.0 <= s <= 1.0
            assert s * dev_size == pytest.approx(round(s * dev_size), abs=1e-9)  # k correct of 17
        assert attrs["mean"] == pytest.approx(sum(scores.values()) / 3)
        assert t.value == pytest.approx(attrs["mean"])
        assert attrs["merge_seconds"] >= 0 and attrs["eval_seconds"] > 0
    # the seed genome is the first trial
    assert trials[0].params == space.uniform_genome(SEED_GENOME)
    # one callback per trial, counting complete trials
    assert [(d, t) for d, t, _ in calls] == [(1, 4), (2, 4), (3, 4), (4, 4)]
    assert [o.number for _, _, o in calls] == [0, 1, 2, 3]
    assert all(o.state == "COMPLETE" and o.error is None for _, _, o in calls)
    assert [o.scores for _, _, o in calls] == [t.user_attrs["scores"] for t in trials]
    meta = json.loads((sweep.config.run_dir() / "sweep.json").read_text())
    assert meta["storage"] == sweep.config.storage_url()
    assert meta["base"] == micro_zoo.base
    assert meta["experts"] == list(micro_zoo.experts.values())
    assert (sweep.config.run_dir() / "study.db").is_file()
    assert study.metric_names == ["dev_mean"]


def test_stored_scores_are_reproduced_independently(short_search: Any, reference: Reference) -> None:
    sweep, study, _ = short_search
    for t in study.get_trials()[:3]:
        scores = reference.scores(trial_recipe(t), "dev", sweep.tasks)
        assert scores == pytest.approx(t.user_attrs["scores"], abs=1e-12)


def test_a_searched_global_parameter_is_a_gene_of_the_sweep(
    runs_dir: Path, zoo_cache: Path, evaluator: LocalEvaluator, reference: Reference
) -> None:
    """``global_params``: lambda is sampled per trial, reaches the recipe, and the merge scored is that
    recipe's (an independent merger and model give the same dev scores; lambda moves them)."""
    space_cfg = SearchSpaceConfig(
        method="task_arithmetic",
        params=(ParamRange(name="weight", low=0.2, high=1.0),),
        global_params=(ParamRange(name="lambda", low=0.3, high=3.0),),
        granularity="global",
    )
    sweep = zoo_sweep(
        runs_dir,
        zoo_cache,
        "global-genes",
        search_space=space_cfg,
        sampler=SamplerConfig(name="random", seed=2),
        n_trials=3,
        seed_genomes=({"weight": 1.0, "lambda": 3.0},),
    )
    study = run_search(sweep, evaluator)
    trials = trials_in(study, TrialState.COMPLETE)
    assert len(trials) == 3
    lambdas = [t.params["(global).lambda.g0"] for t in trials]
    assert lambdas[0] == 3.0 and len(set(lambdas)) == 3
    for t, lam in zip(trials, lambdas, strict=True):
        recipe = trial_recipe(t)
        assert recipe.parameters["lambda"] == pytest.approx(lam, abs=1e-6)
        assert reference.scores(recipe, "dev", sweep.tasks) == pytest.approx(
            t.user_attrs["scores"], abs=1e-12
        )
    # the same weights at lambda 1 merge another model (lambda is not dropped on the way)
    scaled = trial_recipe(trials[0])
    plain = scaled.model_copy(update={"parameters": {**scaled.parameters, "lambda": 1.0}})
    merged = reference.merger.merge(scaled)
    unscaled = reference.merger.merge(plain)
    assert any(not torch.equal(merged[k], unscaled[k]) for k in merged)


def test_resume_continues_and_fails_stale_trials(
    runs_dir: Path, zoo_cache: Path, evaluator: LocalEvaluator
) -> None:
    fields: dict[str, Any] = {
        "search_space": SearchSpaceConfig(method="ties", granularity="global"),
        "sampler": SamplerConfig(name="random", seed=3),
        "seed_genomes": (SEED_GENOME,),
    }
    first = zoo_sweep(runs_dir, zoo_cache, "resume", n_trials=2, **fields)
    run_search(first, evaluator)
    storage = first.config.storage_url()
    before = {
        t.number: (t.params, t.user_attrs)
        for t in optuna.load_study(study_name="resume", storage=storage).trials
    }
    assert sorted(before) == [0, 1]

    crashed = optuna.load_study(study_name="resume", storage=storage)
    stale = crashed.ask()  # a sweep process that died mid-trial
    dead = subprocess.Popen(["true"])
    dead.wait()
    stale.set_user_attr("owner", f"{socket.gethostname()}:{dead.pid}:1")
    assert crashed.trials[stale.number].state == TrialState.RUNNING

    second = dataclasses.replace(first, config=first.config.model_copy(update={"n_trials": 4}))
    study = run_search(second, evaluator)
    trials = study.get_trials()
    numbers = [t.number for t in trials]
    assert numbers == list(range(len(trials)))
    assert study.trials[stale.number].state == TrialState.FAIL
    assert len(trials_in(study, TrialState.COMPLETE)) == 4
    assert len(trials_in(study, TrialState.RUNNING)) == 0
    assert len(trials) == 5
    for number, (params, attrs) in before.items():  # the first run's trials are kept as they were
        assert trials[number].params == params
        assert trials[number].user_attrs == attrs
    # the seed genome was not enqueued a second time
    uniform = [t for t in trials if len(set(t.params.values()) - {1.0, 0.5}) == 0 and t.params]
    assert len(uniform) == 1

    # nothing left to do: no new trial
    again = run_search(second, evaluator)
    assert len(again.get_trials()) == 5


def test_a_recipe_scored_before_is_not_evaluated_again(
    runs_dir: Path, zoo_cache: Path, evaluator: LocalEvaluator
) -> None:
    """A sampler that asks for a scored recipe again (CMA-ES clipped at a bound) gets the earlier scores at
    once: the trial records ``duplicate_of``, is never merged, and the pick counts the recipe once."""
    fields: dict[str, Any] = {
        "search_space": SearchSpaceConfig(method="ties", granularity="global"),
        "sampler": SamplerConfig(name="random", seed=5),
        "seed_genomes": (SEED_GENOME,),
    }
    first = zoo_sweep(runs_dir, zoo_cache, "repeat", n_trials=1, **fields)
    run_search(first, evaluator)
    storage = first.config.storage_url()
    study = optuna.load_study(study_name="repeat", storage=storage)
    original = study.trials[0]
    assert "duplicate_of" not in original.user_attrs and "merge_seconds" in original.user_attrs
    study.enqueue_trial(original.params)  # the sampler repeating itself, twice
    study.enqueue_trial(original.params)

    outcomes: list[TrialOutcome] = []
    second = dataclasses.replace(first, config=first.config.model_copy(update={"n_trials": 4}))
    study = run_search(second, evaluator, on_trial=lambda d, t, o: outcomes.append(o))
    trials = trials_in(study, TrialState.COMPLETE)
    assert [t.number for t in trials] == [0, 1, 2, 3]
    for t in trials[1:3]:
        assert t.user_attrs["duplicate_of"] == 0
        assert t.user_attrs["recipe"] == original.user_attrs["recipe"]
        assert t.user_attrs["scores"] == original.user_attrs["scores"]
        assert t.value == original.value
        assert "merge_seconds" not in t.user_attrs  # told at once, never merged or scored
    assert "duplicate_of" not in trials[3].user_attrs  # a new candidate is evaluated as usual
    assert trials[3].user_attrs["recipe"] != original.user_attrs["recipe"]
    assert "merge_seconds" in trials[3].user_attrs
    assert [(o.number, o.state, o.scores) for o in outcomes[:2]] == [
        (n, "COMPLETE", original.user_attrs["scores"]) for n in (1, 2)
    ]
    assert [t.number for t in distinct_recipes(trials)] == [0, 3]


def test_study_with_other_objective_count_is_refused(short_search: Any) -> None:
    sweep, _, _ = short_search
    multi = sweep.config.model_copy(update={"sampler": SamplerConfig(name="nsga2")})
    with pytest.raises(ConfigError, match="objective"):
        open_study(multi, TASKS)


# ------------------------------------------------------------------------------------ failing candidates
@pytest.fixture(scope="module")
def nan_models(micro_zoo: Zoo, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, list[str]]:
    """The base and two experts, the first a copy of the arith expert with one NaN weight."""

    def poison(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        w = state["model.layers.0.mlp.down_proj.weight"].clone()
        w[0, 0] = float("nan")
        state["model.layers.0.mlp.down_proj.weight"] = w
        return state

    nan_dir = copy_model_with(
        micro_zoo.experts["arith"], tmp_path_factory.mktemp("nan") / "arith_nan", poison
    )
    return micro_zoo.base, [str(nan_dir), micro_zoo.experts["code"]]


def nan_sweep(runs_dir: Path, micro_zoo: Zoo, nan_models: Any, study: str, **fields: Any) -> ResolvedSweep:
    base, experts = nan_models
    cfg = SweepConfig(
        study_name=study,
        runs_dir=str(runs_dir),
        models=ModelsConfig(base=base, experts=tuple(experts)),
        tasks=micro_zoo.tasks,
        sampler=SamplerConfig(name="random", seed=0),
        materialize_best=False,
        seed_recipes=(),  # the uniform seed would use the NaN expert first
        **fields,
    )
    return resolve_sweep(cfg)


@pytest.fixture(scope="module")
def nan_evaluator(runs_dir: Path, micro_zoo: Zoo, nan_models: Any) -> LocalEvaluator:
    return LocalEvaluator(nan_sweep(runs_dir, micro_zoo, nan_models, "nan-evaluator"))


def test_failing_candidate_becomes_a_failed_trial(
    runs_dir: Path, micro_zoo: Zoo, nan_models: Any, nan_evaluator: LocalEvaluator
) -> None:
    space = SearchSpaceConfig(
        method="task_arithmetic", params=(ParamRange(name="weight", low=0.0, high=1.0),), granularity="global"
    )
    sweep = nan_sweep(
        runs_dir,
        micro_zoo,
        nan_models,
        "nan",
        search_space=space,
        n_trials=1,
        # first a candidate that uses the NaN expert, then one that gives it weight 0
        seed_genomes=({"weight": [0.5, 0.5]}, {"weight": [0.0, 0.5]}),
    )
    outcomes: list[TrialOutcome] = []
    study = run_search(sweep, nan_evaluator, on_trial=lambda d, t, o: outcomes.append(o))
    failed, done = study.get_trials()
    assert failed.state == TrialState.FAIL
    assert "NaN" in failed.user_attrs["error"]
    assert "model.layers.0.mlp.down_proj.weight" in failed.user_attrs["error"]
    assert "\n" not in failed.user_attrs["error"]
    assert "scores" not in failed.user_attrs
    assert done.state == TrialState.COMPLETE
    assert [o.state for o in outcomes] == ["FAIL", "COMPLETE"]
    assert outcomes[0].error == failed.user_attrs["error"]
    assert outcomes[0].mean is None
    # the failure did not leave its weights in the live model: the next candidate scores as it should
    ref = Reference(micro_zoo, nan_models[1])
    scores = ref.scores(trial_recipe(done), "dev", sweep.tasks)
    assert scores == pytest.approx(done.user_attrs["scores"], abs=1e-12)
    assert complete_trials(study) == [study.trials[1]]
    with pytest.raises(ConfigError, match="FAIL"):
        pick_trial(study, failed.number)


def test_sweep_stops_after_too_many_failures_in_a_row(
    runs_dir: Path, micro_zoo: Zoo, nan_models: Any, nan_evaluator: LocalEvaluator
) -> None:
    space = SearchSpaceConfig(
        method="task_arithmetic", params=(ParamRange(name="weight", low=0.5, high=1.0),), granularity="global"
    )
    sweep = nan_sweep(runs_dir, micro_zoo, nan_models, "allfail", search_space=space, n_trials=2)
    with pytest.raises(EvomergeError, match=r"3 failed trials in a row.*NaN"):
        run_search(sweep, nan_evaluator, max_consecutive_failures=3)
    study = load_study(sweep.config.storage_url(), "allfail")
    assert [t.state for t in study.trials] == [TrialState.FAIL] * 3
    assert all("NaN" in t.user_attrs["error"] for t in study.trials)
    with pytest.raises(ConfigError, match="no complete trial"):
        best_trial(study)


# ------------------------------------------------------------------------------------ multi-objective
@pytest.fixture(scope="module")
def multi_search(
    runs_dir: Path, zoo_cache: Path, evaluator: LocalEvaluator
) -> tuple[ResolvedSweep, optuna.Study]:
    sweep = zoo_sweep(
        runs_dir,
        zoo_cache,
        "multi",
        search_space=SearchSpaceConfig(method="ties", granularity="global"),
        sampler=SamplerConfig(name="nsga2", seed=0, population_size=2),
        n_trials=3,
        materialize_best=False,
        baseline_weights=(0.5,),
    )
    return sweep, run_search(sweep, evaluator)


def test_nsga2_has_one_objective_per_task(multi_search: Any) -> None:
    _, study = multi_search
    assert study.directions == [optuna.study.StudyDirection.MAXIMIZE] * 3
    assert study.metric_names == TASKS
    trials = trials_in(study, TrialState.COMPLETE)
    assert len(trials) == 3
    for t in trials:
        assert t.values == [t.user_attrs["scores"][k] for k in TASKS]


def test_report_without_materialized_model(multi_search: Any, evaluator: LocalEvaluator) -> None:
    sweep, study = multi_search
    report = final_report(sweep, evaluator, study)
    run_dir = sweep.config.run_dir()
    assert "best_model" not in report.paths
    assert not (run_dir / "best_model").exists()
    assert [r.name for r in report.test][-2:] == [
        "task arithmetic w=0.5",
        f"searched (trial {report.best_number})",
    ]
    assert (run_dir / "report.md").is_file()


# ------------------------------------------------------------------------------------ Pareto front and best
RECIPE = {"merge_method": "linear", "models": [{"model": "/m/a"}, {"model": "/m/b"}]}


def make_trial(scores: dict[str, float], state: TrialState = TrialState.COMPLETE) -> FrozenTrial:
    mean = sum(scores.values()) / len(scores)
    if state != TrialState.COMPLETE:
        return optuna.trial.create_trial(state=state, user_attrs={"scores": scores, "mean": mean})
    return optuna.trial.create_trial(
        value=mean,
        params={"x": 0.5},
        distributions={"x": FloatDistribution(0, 1)},
        user_attrs={"scores": scores, "mean": mean, "recipe": RECIPE},
    )


def hand_made_study(points: list[tuple[float, ...]]) -> optuna.Study:
    study = optuna.create_study(direction="maximize")
    for p in points:
        study.add_trial(make_trial(dict(zip(TASKS, p, strict=True))))
    return study


def test_pareto_front_of_hand_made_trials() -> None:
    points = [
        (0.5, 0.5, 0.5),  # 0: front
        (0.6, 0.4, 0.5),  # 1: front (better arith than 0)
        (0.4, 0.4, 0.4),  # 2: dominated by 0
        (0.5, 0.5, 0.5),  # 3: the same point as 0: kept once
        (0.5, 0.5, 0.4),  # 4: weakly dominated by 0
        (0.0, 0.0, 0.9),  # 5: front (best logic)
        (0.6, 0.4, 0.45),  # 6: dominated by 1
    ]
    study = hand_made_study(points)
    front = pareto_front(complete_trials(study), TASKS)
    assert sorted(t.number for t in front) == [0, 1, 5]
    means = [t.user_attrs["mean"] for t in front]
    assert means == sorted(means, reverse=True)
    assert front[-1].number == 5


def test_pareto_front_matches_brute_force() -> None:
    rng = random.Random(7)
    points = [tuple(rng.choice([0.0, 0.25, 0.5, 0.75, 1.0]) for _ in TASKS) for _ in range(40)]
    study = hand_made_study(points)
    front = pareto_front(complete_trials(study), TASKS)

    def dominates(a: tuple[float, ...], b: tuple[float, ...]) -> bool:
        return all(x >= y for x, y in zip(a, b, strict=True)) and any(
            x > y for x, y in zip(a, b, strict=True)
        )

    expected_points = {p for p in points if not any(dominates(q, p) for q in points)}
    got_points = [points[t.number] for t in front]
    assert set(got_points) == expected_points
    assert len(got_points) == len(expected_points)  # each point once
    for t in front:  # the first trial holding each point is the one kept
        assert points.index(points[t.number]) == t.number


def test_best_trial_is_highest_mean_earliest_on_ties() -> None:
    study = hand_made_study([(0.2, 0.2, 0.2), (0.6, 0.3, 0.3), (0.3, 0.3, 0.6), (0.1, 0.1, 0.1)])
    study.add_trial(make_trial({"arith": 1.0, "code": 1.0, "logic": 1.0}, state=TrialState.FAIL))
    # a complete trial without scores (e.g. added by hand) does not count
    study.add_trial(optuna.trial.create_trial(value=5.0))
    assert best_trial(study).number == 1
    assert [t.number for t in complete_trials(study)] == [0, 1, 2, 3]
    assert pick_trial(study, None).number == 1
    assert pick_trial(study, 2).number == 2
    with pytest.raises(ConfigError, match="no trial 99"):
        pick_trial(study, 99)


def test_best_trial_of_an_empty_study() -> None:
    with pytest.raises(ConfigError, match="no complete trial"):
        best_trial(optuna.create_study())


# ------------------------------------------------------------------------------------ export
def test_export_round_trip(short_search: Any, tmp_path: Path) -> None:
    _, study, _ = short_search
    out = tmp_path / "recipes" / "best.yaml"
    chosen, recipe = export_trial(study, out)
    best = best_trial(study)
    assert chosen.number == best.number
    assert recipe == trial_recipe(best)
    assert MergeRecipe.from_yaml(out) == recipe
    assert out.read_text().startswith(f"# evomerge: study short, trial {best.number}, dev mean ")
    assert yaml.safe_load(out.read_text()) == recipe.to_dict()


def test_export_materializes_the_merged_model(short_search: Any, micro_zoo: Zoo, tmp_path: Path) -> None:
    _, study, _ = short_search
    number = study.get_trials()[2].number
    out, model_dir = tmp_path / "t2.yaml", tmp_path / "t2-model"
    chosen, recipe = export_trial(study, out, trial=number, materialize=model_dir)
    assert chosen.number == number
    assert MergeRecipe.from_yaml(out) == trial_recipe(study.trials[number])
    expected = InMemoryMerger(micro_zoo.base, list(micro_zoo.experts.values())).merge(recipe)
    with ModelDir(model_dir) as md:
        assert sorted(md.tensor_names()) == sorted(expected)
        for name, tensor in expected.items():
            assert torch.equal(md.read(name), tensor), name
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, expected[name]), name
    assert siblings_named_like(model_dir) == [model_dir.name]


def test_export_refuses_to_overwrite(short_search: Any, tmp_path: Path) -> None:
    _, study, _ = short_search
    out = tmp_path / "r.yaml"
    out.write_text("keep me\n")
    with pytest.raises(OutputExistsError, match=r"r\.yaml"):
        export_trial(study, out)
    assert out.read_text() == "keep me\n"

    fresh, model_dir = tmp_path / "fresh.yaml", tmp_path / "model"
    model_dir.mkdir()
    (model_dir / "marker").write_text("x")
    with pytest.raises(OutputExistsError, match="model"):
        export_trial(study, fresh, materialize=model_dir)
    assert not fresh.exists()  # nothing written when any output is refused
    assert [p.name for p in model_dir.iterdir()] == ["marker"]

    export_trial(study, out, overwrite=True)
    assert MergeRecipe.from_yaml(out) == trial_recipe(best_trial(study))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model", "r.yaml"]


def test_load_run_and_study(short_search: Any, tmp_path: Path) -> None:
    sweep, study, _ = short_search
    info = load_run(sweep.config.run_dir())
    assert info.study_name == "short"
    assert info.storage == sweep.config.storage_url()
    loaded = load_study(info.storage, info.study_name)
    assert [t.number for t in loaded.trials] == [t.number for t in study.trials]
    with pytest.raises(ConfigError, match="no study 'nope'"):
        load_study(info.storage, "nope")
    with pytest.raises(ConfigError, match=r"sweep\.json"):
        load_run(tmp_path)


# ------------------------------------------------------------------------------------ final report
def test_final_report(
    short_search: Any, evaluator: LocalEvaluator, micro_zoo: Zoo, reference: Reference
) -> None:
    sweep, study, _ = short_search
    progress: list[tuple[str, int, int]] = []
    report = final_report(sweep, evaluator, study, progress=lambda *a: progress.append(a))
    run_dir = sweep.config.run_dir()
    dev_best = max(complete_trials(study), key=lambda t: (t.user_attrs["mean"], -t.number))
    assert report.dev_best_number == dev_best.number
    # the searched recipe is the pick: the best val mean among the (4 <= top_k) complete trials
    assert report.pick is not None and {c.number for c in report.pick.candidates} == {0, 1, 2, 3}
    best = study.trials[max(report.pick.candidates, key=lambda c: (c.val_mean, c.dev_mean, -c.number)).number]
    assert best_trial(study).number == best.number
    recipe = trial_recipe(best)
    assert report.best_number == best.number
    assert report.best_recipe == recipe
    assert report.best_dev.scores == best.user_attrs["scores"]
    assert (report.n_complete, report.n_failed) == (4, 0)
    assert report.tasks == TASKS
    names = [r.name for r in report.test]
    assert names == [
        "base",
        "expert arith",
        "expert code",
        "expert logic",
        "task arithmetic w=1/3",
        "task arithmetic w=1",
        f"searched (trial {best.number})",
    ]
    rows = {r.name: r for r in report.test}
    # the test rows are test-split scores, recomputed here from other code paths
    assert rows["base"].scores == pytest.approx(reference.model_scores(micro_zoo.base, "test"), abs=1e-12)
    code = micro_zoo.experts["code"]
    assert rows["expert code"].scores == pytest.approx(reference.model_scores(code, "test"), abs=1e-12)
    third = uniform_task_arithmetic(micro_zoo.base, list(micro_zoo.experts.values()), 1 / 3)
    assert rows["task arithmetic w=1/3"].scores == pytest.approx(reference.scores(third, "test"), abs=1e-12)
    searched = rows[f"searched (trial {best.number})"]
    assert searched.scores == pytest.approx(
        reference.model_scores(str(run_dir / "best_model"), "test"), abs=1e-12
    )
    for row in report.test:
        assert row.mean == pytest.approx(sum(row.scores.values()) / 3)
    assert progress and progress[-1][1] == progress[-1][2]

    # files
    assert report.paths["best_recipe"] == str(run_dir / "best_recipe.yaml")
    assert MergeRecipe.from_yaml(run_dir / "best_recipe.yaml") == recipe
    markdown = (run_dir / "report.md").read_text()
    assert "## Held-out test split" in markdown
    test_section = markdown.split("## Held-out test split")[1].split("## ")[0]
    assert "| model | arith | code | logic | mean |" in test_section
    for row in report.test:
        cells = " | ".join([row.name, *(f"{row.scores[t]:.3f}" for t in TASKS), f"{row.mean:.3f}"])
        assert f"| {cells} |" in test_section
    results = json.loads((run_dir / "results.json").read_text())
    assert results["best_number"] == best.number
    assert MergeRecipe.model_validate(results["best_recipe"]) == recipe
    assert [r["name"] for r in results["test"]] == names
    assert results["test"][0]["scores"] == rows["base"].scores
    model_dir = run_dir / "best_model"
    assert report.paths["best_model"] == str(model_dir)
    expected = InMemoryMerger(micro_zoo.base, list(micro_zoo.experts.values())).merge(recipe)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, expected[name]), name

    # a second report replaces the outputs (the merged model included)
    again = final_report(sweep, evaluator, study)
    assert again.test == report.test
    assert siblings_named_like(model_dir) == ["best_model"]


# ------------------------------------------------------------------------------------ sweep configs
def write_yaml(path: Path, data: Any) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(data))
    return path


def test_load_sweep_config(tmp_path: Path) -> None:
    path = write_yaml(
        tmp_path / "cfg" / "sweep.yaml",
        {
            "study_name": "s1",
            "models": {"base": "m/base", "experts": ["m/a", "/abs/b"]},
            "tasks": [{"name": "t", "data_files": {"dev": "d/t.jsonl"}}],
            "search_space": {
                "method": "task_arithmetic",
                "params": [{"name": "weight", "low": 0, "high": 1}],
            },
            "sampler": {"name": "random"},
        },
    )
    cfg = load_sweep_config(path, {"n_trials": 3})
    assert cfg.n_trials == 3
    assert cfg.data_dir == str(path.parent.resolve())
    assert not cfg.multi_objective
    sweep = resolve_sweep(cfg)
    assert sweep.base == str(path.parent.resolve() / "m" / "base")
    assert sweep.experts == (str(path.parent.resolve() / "m" / "a"), "/abs/b")


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"study_name": "s", "zoo": "micro", "n_trails": 3}, "n_trails"),
        ({"study_name": "s"}, "zoo"),
        ({"study_name": "s", "zoo": "micro", "models": {"base": "b", "experts": ["e"]}}, "not both"),
        ({"study_name": "../escape", "zoo": "micro"}, "study_name"),
        ({"study_name": "s", "zoo": "micro", "n_trials": 0}, "n_trials"),
        ({"study_name": "s", "zoo": "micro", "sampler": {"name": "grid"}}, "sampler"),
        ({"study_name": "s", "zoo": "micro", "search_space": {"method": "nope"}}, "nope"),
    ],
)
def test_bad_sweep_configs(tmp_path: Path, data: dict[str, Any], message: str) -> None:
    path = write_yaml(tmp_path / "sweep.yaml", data)
    with pytest.raises(ConfigError, match=message) as info:
        load_sweep_config(path)
    assert "\n" not in str(info.value)
    assert str(path) in str(info.value)


def test_bad_sweep_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_sweep_config(tmp_path / "missing.yaml")
    (tmp_path / "list.yaml").write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_sweep_config(tmp_path / "list.yaml")
    (tmp_path / "broken.yaml").write_text("study_name: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_sweep_config(tmp_path / "broken.yaml")


def test_zoo_sweep_with_its_own_tasks_reads_them_next_to_the_yaml(
    tmp_path: Path, micro_zoo: Zoo, zoo_cache: Path
) -> None:
    # A sweep may take models from the zoo but bring its own tasks; their relative data files are
    # relative to the YAML's folder, as for a models+tasks sweep.
    rows = (Path(micro_zoo.root) / "data" / "arith.dev.jsonl").read_text().splitlines()[:6]
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "mini.dev.jsonl").write_text("\n".join(rows) + "\n")
    path = write_yaml(
        tmp_path / "sweep.yaml",
        {
            "study_name": "mini",
            "zoo": "micro",
            "runs_dir": str(tmp_path / "runs"),
            "tasks": [{"name": "mini", "data_files": {"dev": "data/mini.dev.jsonl"}, "max_new_tokens": 6}],
        },
    )
    sweep = resolve_sweep(load_sweep_config(path), zoo_cache=zoo_cache)
    assert [t.name for t in sweep.tasks] == ["mini"]
    assert sweep.base == micro_zoo.base
    # the sweep holds pick.val_fraction of the dev questions back as its val split: dev and val share
    # the file's 6 questions
    assert sweep.tasks[0].val_fraction == 0.3
    dev = load_split(sweep.tasks[0], "dev", sweep.data_dir)
    val = load_split(sweep.tasks[0], "val", sweep.data_dir)
    assert (len(dev), len(val)) == (4, 2)
    assert sorted(e.question for e in dev + val) == sorted(json.loads(r)["question"] for r in rows)


# ------------------------------------------------------------------------------------ multi-fidelity
def test_multi_fidelity_prunes_a_bad_candidate_on_the_small_rung(
    runs_dir: Path, zoo_cache: Path, evaluator: LocalEvaluator, micro_zoo: Zoo
) -> None:
    from evomerge.optimizer.config import FidelityConfig

    space = SearchSpaceConfig(
        method="task_arithmetic", params=(ParamRange(name="weight", low=0.0, high=4.0),), granularity="global"
    )
    sweep = zoo_sweep(
        runs_dir,
        zoo_cache,
        "fidelity",
        search_space=space,
        sampler=SamplerConfig(name="random", seed=0),
        n_trials=3,
        fidelity=FidelityConfig(rungs=(6,), n_startup_trials=2),
        pick=None,  # the whole dev split is fitness (the rung's 6 questions are those of the old test)
        # two sensible merges, then one that drowns the base in 4x task vectors, then sampled ones
        seed_genomes=({"weight": 0.3}, {"weight": 0.4}, {"weight": 4.0}),
    )
    study = run_search(sweep, evaluator)
    trials = study.get_trials(deepcopy=False)
    bad = trials[2]
    assert set(bad.params.values()) == {4.0}
    assert bad.state == optuna.trial.TrialState.PRUNED
    assert bad.user_attrs["pruned_at"] == 6
    assert set(bad.intermediate_values) == {6}
    assert len(study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))) == 3
    for t in trials[:2]:  # the sensible ones reported their rung, then were scored on the full dev set
        assert t.state == optuna.trial.TrialState.COMPLETE and set(t.intermediate_values) == {6}
        assert set(t.user_attrs["rung_6"]) == set(TASKS)
    # the rung score is the mean on the first 6 questions of each task's nested dev order, and the
    # full-dev fitness after the rung equals a fresh full-dev evaluation (rung answers reused)
    recipe = trial_recipe(trials[0])
    ref = Reference(micro_zoo)
    ref.backend.load_state_dict(ref.merger.merge(recipe))
    rung = evaluate(ref.backend, sweep.tasks, "dev", micro_zoo.root, limit=6)  # type: ignore[arg-type]
    assert all(r.n == 6 for r in rung.tasks.values())
    assert trials[0].intermediate_values[6] == pytest.approx(rung.mean)
    full = evaluate(ref.backend, sweep.tasks, "dev", micro_zoo.root)  # type: ignore[arg-type]
    assert trials[0].value == pytest.approx(full.mean)
    assert bad.intermediate_values[6] < min(
        trials[0].intermediate_values[6], trials[1].intermediate_values[6]
    )


def test_fidelity_config_validation() -> None:
    from pydantic import ValidationError

    from evomerge.optimizer.config import FidelityConfig

    with pytest.raises(ValidationError, match="strictly increasing"):
        FidelityConfig(rungs=(50, 20))
    for bad in ({}, {"rungs": (5,), "anchors": 10}):
        with pytest.raises(ValidationError, match="one of them"):
            FidelityConfig(**bad)  # type: ignore[arg-type]
    with pytest.raises(ValidationError, match="greater than or equal to 1"):
        FidelityConfig(anchors=0)
    with pytest.raises(ValidationError, match="single-objective"):
        SweepConfig(
            study_name="x",
            zoo="micro",
            sampler=SamplerConfig(name="nsga2"),
            fidelity=FidelityConfig(rungs=(5,)),
        )


def test_a_bfloat16_resident_merger_scores_like_the_float32_one(
    runs_dir: Path, zoo_cache: Path, evaluator: LocalEvaluator, micro_zoo: Zoo
) -> None:
    backend = BackendConfig(merge_device="cpu", resident_dtype="bfloat16")
    half = LocalEvaluator(zoo_sweep(runs_dir, zoo_cache, "bf16-resident", backend=backend))
    assert {t.dtype for v in half.merger._vectors for t in v.values()} == {torch.bfloat16}
    recipe = uniform_task_arithmetic(micro_zoo.base, list(micro_zoo.experts.values()), 0.5)
    merged = half.merger.merge(recipe)
    exact = evaluator.merger.merge(recipe)
    assert all(merged[n].dtype == exact[n].dtype for n in exact)
    assert max(float((merged[n] - exact[n]).abs().max()) for n in exact) < 1e-2


def test_anchor_fitness_promotes_or_prunes_on_an_estimate_from_anchor_questions(
    runs_dir: Path, zoo_cache: Path, evaluator: LocalEvaluator, micro_zoo: Zoo
) -> None:
    """``fidelity.anchors``: the first trials record their per-question answers; later ones are scored
    on anchors fit on those answers, and the estimate decides (here: a drowned merge is pruned)."""
    from evomerge.optimizer.anchors import estimate_mean, fit_anchors
    from evomerge.optimizer.config import FidelityConfig

    space = SearchSpaceConfig(
        method="task_arithmetic", params=(ParamRange(name="weight", low=0.0, high=4.0),), granularity="global"
    )
    sweep = zoo_sweep(
        runs_dir,
        zoo_cache,
        "anchors",
        search_space=space,
        sampler=SamplerConfig(name="random", seed=0),
        n_trials=3,
        fidelity=FidelityConfig(anchors=4, n_startup_trials=2),
        pick=None,
        seed_genomes=({"weight": 0.3}, {"weight": 0.5}, {"weight": 4.0}),
    )
    study = run_search(sweep, evaluator)
    trials = study.get_trials(deepcopy=False)
    dev_ids = {t.name: [ex.id for ex in load_split(t, "dev", sweep.data_dir)] for t in sweep.tasks}
    for t in trials[:2]:  # before anchors: the full dev set at once, answers recorded
        assert t.state == TrialState.COMPLETE and not t.intermediate_values
        answers = t.user_attrs["dev_answers"]
        assert {k: len(v) for k, v in answers.items()} == {k: len(v) for k, v in dev_ids.items()}
        assert t.user_attrs["scores"] == pytest.approx(
            {k: sum(v) / len(v) for k, v in answers.items()}, abs=1e-12
        )
    bad = trials[2]
    assert set(bad.params.values()) == {4.0}
    assert bad.state == TrialState.PRUNED and bad.user_attrs["pruned_at"] == "anchors"
    assert 3 <= bad.user_attrs["anchor_questions"] <= 4 * len(TASKS)
    estimate = bad.user_attrs["anchor_estimate"]
    assert bad.intermediate_values == {0: pytest.approx(estimate)}
    assert estimate < (trials[0].value + trials[1].value) / 2  # the bar: the median of the complete trials
    # the estimate, recomputed independently: anchors fit on the two trials' answers, the drowned
    # merge's answers from a fresh model
    ref = Reference(micro_zoo)
    ref.backend.load_state_dict(ref.merger.merge(trial_recipe(bad)))
    memo: dict[Any, Any] = {}
    evaluate(ref.backend, sweep.tasks, "dev", micro_zoo.root, memo=memo)  # type: ignore[arg-type]
    per_task = {}
    for task, ids in dev_ids.items():
        anchors = fit_anchors([t.user_attrs["dev_answers"][task] for t in trials[:2]], 4, seed=0)
        per_task[task] = anchors.estimate([memo[(task, "dev", ids[i])].score for i in anchors.indices])
    assert estimate == pytest.approx(estimate_mean(per_task), abs=1e-12)
    assert len(study.get_trials(states=(TrialState.COMPLETE,))) == 3
