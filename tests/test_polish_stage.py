"""The sweep's ``polish:`` stage (evomerge/optimizer/polish_stage.py) on the micro zoo: each start is
polished and scored on val, the best val mean (or the unpolished pick) becomes the sweep's result, and
the report, ``best_recipe.yaml``, ``best_model/`` and the verdict all describe that result."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from pydantic import ValidationError

from evomerge.checkpoints import ModelDir
from evomerge.merging import InMemoryMerger, MergeRecipe
from evomerge.optimizer import (
    LocalEvaluator,
    ResolvedSweep,
    SamplerConfig,
    SweepConfig,
    final_report,
    resolve_sweep,
    run_search,
    verdict_line,
)
from evomerge.optimizer.config import PolishConfig
from evomerge.search_spaces import ParamRange, SearchSpaceConfig
from evomerge.zoo import Zoo

# A search space that can barely move off the base (weights <= 0.05): its pick is about the base, which
# the uniform merge polished beats on val on the micro zoo, so the stage replaces the pick.
NARROW = SearchSpaceConfig(
    method="task_arithmetic",
    params=(ParamRange(name="weight", low=0.0, high=0.05),),
    granularity="layer",
    split_attn_mlp=True,
)
POLISH = PolishConfig(steps=6, eval_every=2, lr=0.05, batch_size=8)


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("polish_stage_runs")


def micro_sweep(runs: Path, zoo_cache: Path, study: str, **fields: Any) -> ResolvedSweep:
    fields.setdefault("search_space", NARROW)
    fields.setdefault("sampler", SamplerConfig(name="random", seed=0))
    fields.setdefault("seed_recipes", ())
    fields.setdefault("n_trials", 3)
    cfg = SweepConfig(study_name=study, runs_dir=str(runs), zoo="micro", **fields)
    return resolve_sweep(cfg, zoo_cache=zoo_cache)


@pytest.fixture(scope="module")
def evaluator(micro_zoo: Zoo, zoo_cache: Path, runs: Path) -> LocalEvaluator:
    return LocalEvaluator(micro_sweep(runs, zoo_cache, "evaluator"))


def test_the_stage_polishes_each_start_and_keeps_the_best_on_val(
    runs: Path, zoo_cache: Path, evaluator: LocalEvaluator, micro_zoo: Zoo
) -> None:
    sweep = micro_sweep(runs, zoo_cache, "stage", polish=POLISH)
    study = run_search(sweep, evaluator)
    report = final_report(sweep, evaluator, study)
    stage = report.polish
    assert stage is not None and [r.start for r in stage.runs] == ["pick", "uniform"]
    assert stage.pick_label == f"searched (trial {report.best_number})"
    for r in stage.runs:
        assert r.best_dev >= r.start_dev and 1 <= r.steps_run <= POLISH.steps
        assert set(r.val_scores) == {"arith", "code", "logic"}
    pick_run, uniform_run = stage.runs
    assert pick_run.label == f"{stage.pick_label} + polished"
    assert uniform_run.label == "task arithmetic w=1/3 + polished"
    # the rule: the best val mean among the polished starts, if it beats the unpolished pick's
    best = max(stage.runs, key=lambda r: r.val_mean)
    assert stage.chosen == (best.label if best.val_mean > stage.pick_val else None)
    # on this narrow space the pick is about the base and the polished uniform merge beats it on val
    assert stage.chosen == uniform_run.label and uniform_run.val_mean > stage.pick_val + 0.05

    rows = {r.name: r for r in report.test}
    assert [r.name for r in report.test if r.kind == "searched"] == [uniform_run.label]
    assert rows[stage.pick_label].kind == "trial" and rows[pick_run.label].kind == "polished"
    for r in stage.runs:
        assert rows[r.label].val_mean == r.val_mean
    assert rows[stage.pick_label].val_mean == stage.pick_val
    assert report.verdict is not None and report.verdict.searched == uniform_run.label
    assert verdict_line(report).startswith(f"verdict on test (120 questions): {uniform_run.label} ")
    assert report.best_recipe == uniform_run.recipe and report.best_val == uniform_run.val_mean

    # the written result is the polished recipe: best_recipe.yaml, and best_model/ holds its weights
    run_dir = sweep.config.run_dir()
    written = MergeRecipe.from_yaml(run_dir / "best_recipe.yaml")
    assert written == uniform_run.recipe
    assert (
        (run_dir / "best_recipe.yaml")
        .read_text()
        .startswith(f"# evomerge: study stage, {uniform_run.label}, dev mean")
    )
    expected = InMemoryMerger(micro_zoo.base, list(micro_zoo.experts.values())).merge(uniform_run.recipe)
    with ModelDir(run_dir / "best_model") as model:
        for name in ("model.layers.0.self_attn.q_proj.weight", "model.layers.1.mlp.up_proj.weight"):
            assert torch.allclose(model.read(name), expected[name], atol=1e-6)
    # the polished recipe has one value per layer and part (not the start's one weight per expert)
    first = written.expert_models()[0].parameters["weight"]
    assert isinstance(first, tuple) and [rule.filter for rule in first] == ["self_attn", "mlp", None]
    assert any(isinstance(rule.value, tuple) and len(set(rule.value)) > 1 for rule in first)  # layers differ

    text = (run_dir / "report.md").read_text()
    assert "## Gradient polish" in text and f"Result: {uniform_run.label}." in text
    assert f"## Best recipe ({uniform_run.label}, dev mean" in text
    results = json.loads((run_dir / "results.json").read_text())
    assert results["polish"]["chosen"] == uniform_run.label
    assert [r["start"] for r in results["polish"]["runs"]] == ["pick", "uniform"]
    assert results["polish"]["runs"][1]["recipe"] == uniform_run.recipe.to_dict()
    assert results["best_recipe"] == uniform_run.recipe.to_dict()


def test_the_unpolished_pick_stays_when_no_polished_start_beats_it(
    runs: Path, zoo_cache: Path, evaluator: LocalEvaluator
) -> None:
    # a pick from the full space with the uniform merge enqueued; polish steps too small to move anything
    space = NARROW.model_copy(update={"params": (ParamRange(name="weight", low=0.0, high=1.2),)})
    still = PolishConfig(steps=1, eval_every=1, lr=1e-9, starts=("pick",))
    sweep = micro_sweep(
        runs, zoo_cache, "stage-kept", search_space=space, seed_recipes=("uniform",), polish=still
    )
    study = run_search(sweep, evaluator)
    report = final_report(sweep, evaluator, study)
    stage = report.polish
    assert stage is not None and len(stage.runs) == 1
    (run,) = stage.runs
    assert run.best_step == 0  # no step beat the start on dev: the start's coefficients are kept
    assert run.val_mean == pytest.approx(stage.pick_val, abs=1e-9)  # a tie keeps the unpolished pick
    assert stage.chosen is None
    searched = [r for r in report.test if r.kind == "searched"]
    assert [r.name for r in searched] == [stage.pick_label]
    assert MergeRecipe.from_yaml(sweep.config.run_dir() / "best_recipe.yaml") == report.best_recipe
    assert report.best_recipe.merge_method == "task_arithmetic" and report.best_number == report.pick.picked  # type: ignore[union-attr]
    assert (
        "unpolished: no polished start beat it on val" in (sweep.config.run_dir() / "report.md").read_text()
    )


def test_a_polish_stage_the_sweep_cannot_run_is_refused(runs: Path) -> None:
    ta = {"method": "task_arithmetic", "params": [{"name": "weight", "low": 0, "high": 1}]}
    common: dict[str, Any] = {
        "study_name": "x",
        "runs_dir": str(runs),
        "zoo": "micro",
        "polish": {"steps": 1},
        "search_space": ta,
    }
    SweepConfig.model_validate(common)  # fine
    ties = {**ta, "method": "ties"}
    with pytest.raises(ValidationError, match="start 'pick' trains task-arithmetic"):
        SweepConfig.model_validate({**common, "search_space": ties})
    SweepConfig.model_validate({**common, "search_space": ties, "polish": {"starts": ["uniform"]}})  # fine
    with pytest.raises(ValidationError, match="needs pick"):
        SweepConfig.model_validate({**common, "pick": None})
    with pytest.raises(ValidationError, match="transformers backend"):
        SweepConfig.model_validate({**common, "backend": {"kind": "vllm"}})
    with pytest.raises(ValidationError, match="names a start twice"):
        SweepConfig.model_validate({**common, "polish": {"starts": ["pick", "pick"]}})
