"""The honest pick: the val split held out of dev, the top dev trials rescored on val and the pick among
them, the default seeds (enqueued once across resumes), and the report's verdict line."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

import optuna
import pytest
import torch
from optuna.trial import TrialState
from pydantic import ValidationError

from evomerge.checkpoints import ModelDir
from evomerge.errors import ConfigError
from evomerge.evaluators import HFBackend, TaskConfig, evaluate, load_split
from evomerge.merging import InMemoryMerger, MergeRecipe
from evomerge.optimizer import (
    LocalEvaluator,
    ModelsConfig,
    PickConfig,
    ResolvedSweep,
    SamplerConfig,
    SweepConfig,
    best_trial,
    dev_best_trial,
    export_trial,
    final_report,
    resolve_sweep,
    run_search,
    trial_recipe,
    verdict_line,
)
from evomerge.optimizer.loop import build_space, seed_genomes
from evomerge.optimizer.report import Row, difference_se, format_verdict, verdict_of
from evomerge.optimizer.study import PICK_ATTR, open_study, pareto_front, val_attr
from evomerge.optimizer.sweep import check_held_out
from evomerge.search_spaces import ParamRange, SearchSpaceConfig
from evomerge.zoo import Zoo

TASKS = ["arith", "code", "logic"]
SPACE = SearchSpaceConfig(
    method="task_arithmetic", params=(ParamRange(name="weight", low=0.0, high=1.2),), granularity="global"
)


def write_rows(path: Path, n: int, *, prefix: str = "q", level: Any = None) -> Path:
    """``n`` zoo-format questions (``id``, ``question``, ``answer``), optionally with a ``level`` field."""
    rows = []
    for i in range(n):
        row: dict[str, Any] = {"id": f"{prefix}{i}", "question": f"{prefix} {i}?", "answer": str(i)}
        if level is not None:
            row["level"] = level(i)
        rows.append(json.dumps(row))
    path.write_text("\n".join(rows) + "\n")
    return path


def ids(examples: list[Any]) -> list[str]:
    return [e.id for e in examples]


# ------------------------------------------------------------------------------------ the val split
def test_val_is_carved_from_dev_disjointly_and_deterministically(tmp_path: Path) -> None:
    write_rows(tmp_path / "dev.jsonl", 40)
    write_rows(tmp_path / "test.jsonl", 20, prefix="t")
    files = {"dev": "dev.jsonl", "test": "test.jsonl"}
    task = TaskConfig(name="t", data_files=files, dev_size=30, test_size=10, val_fraction=0.3, seed=5)
    whole_task = task.model_copy(update={"val_fraction": None})
    whole = load_split(whole_task, "dev", tmp_path)
    dev, val = load_split(task, "dev", tmp_path), load_split(task, "val", tmp_path)
    assert (len(whole), len(dev), len(val)) == (30, 21, 9)  # round(0.3 * 30) held back
    assert not set(ids(dev)) & set(ids(val))  # disjoint
    assert sorted(ids(dev) + ids(val)) == sorted(ids(whole))  # together: the dev subset of dev_size
    assert dev == [e for e in whole if e.id in set(ids(dev))]  # file order kept
    assert val == [e for e in whole if e.id in set(ids(val))]
    # deterministic: the same config (or a fresh equal one) gives the same split
    again = TaskConfig.model_validate(task.model_dump())
    assert load_split(again, "val", tmp_path) == val and load_split(again, "dev", tmp_path) == dev
    # the val draw has a seed of its own: another seed holds other questions back
    other = task.model_copy(update={"seed": 6})
    assert ids(load_split(other, "val", tmp_path)) != ids(val)
    # test is untouched
    assert load_split(task, "test", tmp_path) == load_split(whole_task, "test", tmp_path)
    assert not set(ids(load_split(task, "test", tmp_path))) & set(ids(whole))
    # multi-fidelity rungs are drawn from what is left of dev
    rung = load_split(task, "dev", tmp_path, limit=5)
    assert len(rung) == 5 and set(ids(rung)) <= set(ids(dev))


def test_val_of_a_file_shared_by_dev_and_test(tmp_path: Path) -> None:
    write_rows(tmp_path / "all.jsonl", 40)
    files = {"dev": "all.jsonl", "test": "all.jsonl"}
    task = TaskConfig(name="t", data_files=files, dev_fraction=0.5, val_fraction=0.25)
    dev, val, test = (load_split(task, s, tmp_path) for s in ("dev", "val", "test"))  # type: ignore[arg-type]
    assert (len(dev), len(val), len(test)) == (15, 5, 20)
    assert len(set(ids(dev)) | set(ids(val)) | set(ids(test))) == 40  # three disjoint parts


def test_a_carved_val_split_keeps_each_stratum_share(tmp_path: Path) -> None:
    write_rows(tmp_path / "dev.jsonl", 40, level=lambda i: "A" if i < 30 else "B")
    task = TaskConfig(name="t", data_files={"dev": "dev.jsonl"}, stratify="level", val_fraction=0.2)
    val = load_split(task, "val", tmp_path)
    assert sorted(e.stratum for e in val) == ["A"] * 6 + ["B"] * 2


def test_a_val_file(tmp_path: Path) -> None:
    write_rows(tmp_path / "dev.jsonl", 10)
    write_rows(tmp_path / "val.jsonl", 12, prefix="v")
    task = TaskConfig(name="t", data_files={"dev": "dev.jsonl", "val": "val.jsonl"}, val_size=5)
    assert task.has_split("val") and not task.carves_val
    val = load_split(task, "val", tmp_path)
    assert len(val) == 5 and all(e.id.startswith("v") for e in val)
    assert len(load_split(task, "dev", tmp_path)) == 10  # dev is whole


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"data_files": {"dev": "d", "val": "v"}, "val_fraction": 0.2}, "not both"),
        ({"data_files": {"dev": "d"}, "val_size": 3}, "val_size needs a val file"),
        ({"data_files": {"dev": "d", "val": "d"}}, "file of its own"),
        ({"data_files": {"test": "t"}, "val_fraction": 0.2}, "needs a dev file"),
        ({"data_files": {"dev": "d"}, "val_fraction": 1.0}, "val_fraction"),
        ({"kind": "lmeval", "lmeval": {"dev": "x"}, "val_fraction": 0.2}, "no val split"),
    ],
)
def test_bad_val_settings(fields: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        TaskConfig(name="t", **fields)


def test_val_split_errors(tmp_path: Path) -> None:
    write_rows(tmp_path / "dev.jsonl", 1)
    with pytest.raises(ConfigError, match="no val split"):
        load_split(TaskConfig(name="t", data_files={"dev": "dev.jsonl"}), "val", tmp_path)
    one = TaskConfig(name="t", data_files={"dev": "dev.jsonl"}, val_fraction=0.5)
    with pytest.raises(ConfigError, match="at least 2 dev questions"):
        load_split(one, "dev", tmp_path)


# ------------------------------------------------------------------------------------ sweep config
def test_a_sweep_holds_val_back_from_its_tasks_by_default(tmp_path: Path) -> None:
    cfg = SweepConfig(
        study_name="s",
        models=ModelsConfig(base="b", experts=("e",)),
        tasks=(
            TaskConfig(name="a", data_files={"dev": "a.jsonl", "test": "at.jsonl"}),
            TaskConfig(name="b", data_files={"dev": "b.jsonl", "val": "bv.jsonl"}),
            TaskConfig(name="c", data_files={"dev": "c.jsonl"}, val_fraction=0.5),
        ),
    )
    assert cfg.pick == PickConfig(top_k=5, val_fraction=0.3) and cfg.pick_enabled
    assert cfg.seed_recipes == ("uniform", "experts")
    a, b, c = resolve_sweep(cfg).tasks
    assert (a.val_fraction, b.val_fraction, c.val_fraction) == (0.3, None, 0.5)  # a val file or its own
    assert a.carves_val and not b.carves_val and b.has_split("val")
    for off in ({"pick": None}, {"pick": PickConfig(top_k=0)}):
        tasks = resolve_sweep(cfg.model_copy(update=off)).tasks
        assert tasks[0].val_fraction is None and not tasks[0].has_split("val")


def test_val_files_must_be_unseen_and_apart_from_test(tmp_path: Path) -> None:
    write_rows(tmp_path / "dev.jsonl", 10)
    write_rows(tmp_path / "test.jsonl", 10, prefix="t")
    (tmp_path / "copy-of-test.jsonl").write_text((tmp_path / "test.jsonl").read_text())
    (tmp_path / "copy-of-dev.jsonl").write_text((tmp_path / "dev.jsonl").read_text())

    def sweep(val: str) -> ResolvedSweep:
        task = TaskConfig(name="t", data_files={"dev": "dev.jsonl", "test": "test.jsonl", "val": val})
        cfg = SweepConfig(study_name="g", models=ModelsConfig(base="b", experts=("e",)), tasks=(task,))
        return ResolvedSweep(cfg, "b", ("e",), (task,), str(tmp_path))

    for val, split in (("copy-of-test.jsonl", "test"), ("copy-of-dev.jsonl", "dev")):
        for allow in (False, True):
            with pytest.raises(ConfigError, match=f"val file .* is the {split} split"):
                check_held_out(sweep(val), allow_test_fitness=allow)
    write_rows(tmp_path / "val.jsonl", 10, prefix="v")
    check_held_out(sweep("val.jsonl"))


# ------------------------------------------------------------------------------------ the verdict
def row(name: str, kind: str, questions: dict[str, list[float]], val: float | None = None) -> Row:
    scores = {t: sum(q) / len(q) for t, q in questions.items()}
    counts = {t: len(q) for t, q in questions.items()}
    mean = sum(scores.values()) / len(scores)
    return Row(name, scores, mean, kind, val, counts, questions)


def test_paired_standard_error_from_known_numbers() -> None:
    ours = row("ours", "searched", {"x": [1, 1, 0, 1], "y": [1, 0, 1, 1, 0, 1]})
    theirs = row("theirs", "expert", {"x": [0, 1, 0, 0], "y": [1, 1, 0, 1, 0, 0]})
    # x: d = [1, 0, 0, 1], sample variance 1/3, over n = 4: 1/12; y: d = [0, -1, 1, 0, 0, 1], mean 1/6,
    # sample variance (4 * (1/6)^2 + (7/6)^2 + 2 * (5/6)^2) / 5 = 17/30, over n = 6: 17/180
    se, paired = difference_se(ours, theirs, {"x": 1.0, "y": 1.0})
    assert paired and se == pytest.approx(math.sqrt((1 / 12 + 17 / 180) / 4))
    # task weights weigh the variances as they weigh the means
    se, _ = difference_se(ours, theirs, {"x": 1.0, "y": 3.0})
    assert se == pytest.approx(math.sqrt((1 / 4) ** 2 / 12 + (3 / 4) ** 2 * 17 / 180))
    # without per-question scores: the unpaired binomial approximation from the question counts
    bare = [Row(r.name, r.scores, r.mean, r.kind, None, r.counts) for r in (ours, theirs)]
    se, paired = difference_se(bare[0], bare[1], {"x": 1.0, "y": 1.0})
    px, qx, py, qy = 0.75, 0.25, 4 / 6, 3 / 6
    expected = (px * (1 - px) / 4 + qx * (1 - qx) / 4 + py * (1 - py) / 6 + qy * (1 - qy) / 6) / 4
    assert not paired and se == pytest.approx(math.sqrt(expected))


def ones(k: int, n: int = 100) -> list[float]:
    return [1.0] * k + [0.0] * (n - k)


def test_verdict_line_win_and_within_noise() -> None:
    rows = [
        row("base", "base", {"x": ones(10)}),
        row("expert a", "expert", {"x": ones(50)}, val=0.6),
        row("expert b", "expert", {"x": ones(60)}, val=0.4),  # better on test, worse on val
        row("task arithmetic w=1/2", "uniform", {"x": ones(78)}, val=0.5),
        row("searched (trial 3)", "searched", {"x": ones(80)}, val=0.7),
    ]
    verdict = verdict_of(rows, {"x": 1.0})
    assert verdict is not None
    expert, uniform = verdict.comparisons
    assert (expert.name, expert.chosen_by) == ("expert a", "val")  # chosen on val, not on test
    # d = 1 on 30 of 100 questions: sd^2 = 0.3 * 0.7 * 100 / 99, SE = sd / 10
    assert expert.se == pytest.approx(math.sqrt(0.21 / 99)) and expert.outcome == "win"
    assert uniform.se == pytest.approx(math.sqrt(0.02 * 0.98 / 99)) and uniform.outcome == "within noise"
    assert format_verdict(verdict) == (
        "verdict on test (100 questions): searched (trial 3) 0.800 "
        "vs best expert (expert a, chosen by val) 0.500: +0.300 (SE 0.046, 6.5 SE: win); "
        "vs best uniform merge (task arithmetic w=1/2, chosen by val) 0.780: +0.020 (SE 0.014, 1.4 SE: "
        "within noise)"
    )


def test_verdict_line_says_plainly_when_the_pick_loses() -> None:
    rows = [
        row("expert a", "expert", {"x": ones(70)}),
        row("expert b", "expert", {"x": ones(80)}),
        row("task arithmetic w=1", "uniform", {"x": ones(50)}),
        row("searched (trial 0)", "searched", {"x": ones(52)}),
    ]
    verdict = verdict_of(rows, {"x": 1.0})
    assert verdict is not None
    expert, uniform = verdict.comparisons
    # no val scores: the strongest rival on test (which favours the rival)
    assert (expert.name, expert.chosen_by, expert.outcome) == ("expert b", "test", "LOSES")
    assert uniform.outcome == "within noise"
    line = format_verdict(verdict)
    assert "vs best expert (expert b, chosen by test) 0.800: -0.280 (SE 0.045, 6.2 SE: LOSES)" in line
    assert line.endswith(". The searched recipe LOSES to expert b on test.")
    # the same scores, a difference of zero: within noise, whatever the SE
    tie = [row("expert a", "expert", {"x": ones(52)}), row("searched (trial 0)", "searched", {"x": ones(52)})]
    assert verdict_of(tie, {"x": 1.0}).comparisons[0].outcome == "within noise"  # type: ignore[union-attr]


# ------------------------------------------------------------------------------------ sweeps on the micro zoo
@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("pick_runs")


def micro_sweep(runs: Path, zoo_cache: Path, study: str, **fields: Any) -> ResolvedSweep:
    fields.setdefault("search_space", SPACE)
    fields.setdefault("sampler", SamplerConfig(name="random", seed=0))
    cfg = SweepConfig(study_name=study, runs_dir=str(runs), zoo="micro", **fields)
    return resolve_sweep(cfg, zoo_cache=zoo_cache)


@pytest.fixture(scope="module")
def evaluator(micro_zoo: Zoo, zoo_cache: Path, runs: Path) -> LocalEvaluator:
    return LocalEvaluator(micro_sweep(runs, zoo_cache, "evaluator"))


def the_seeds(sweep: ResolvedSweep, micro_zoo: Zoo) -> list[dict[str, Any]]:
    return seed_genomes(sweep.config, build_space(sweep, micro_zoo.config.num_layers))


def test_default_seeds_are_enqueued_once_across_resumes(
    runs: Path, zoo_cache: Path, evaluator: LocalEvaluator, micro_zoo: Zoo
) -> None:
    sweep = micro_sweep(runs, zoo_cache, "seeds", n_trials=2)
    seeds = the_seeds(sweep, micro_zoo)
    third = 1 / 3
    assert seeds == [
        {"arith.weight.g0": third, "code.weight.g0": third, "logic.weight.g0": third},  # uniform 1/N
        {"arith.weight.g0": 1.0, "code.weight.g0": 0.0, "logic.weight.g0": 0.0},  # each expert alone
        {"arith.weight.g0": 0.0, "code.weight.g0": 1.0, "logic.weight.g0": 0.0},
        {"arith.weight.g0": 0.0, "code.weight.g0": 0.0, "logic.weight.g0": 1.0},
        {"arith.weight.g0": 1.0, "code.weight.g0": 1.0, "logic.weight.g0": 1.0},  # baseline w=1
    ]
    study = run_search(sweep, evaluator)
    complete = study.get_trials(states=(TrialState.COMPLETE,))
    assert [t.params for t in complete] == seeds[:2]
    assert len(study.get_trials(states=(TrialState.WAITING,))) == 3
    # resume with a larger budget: the waiting seeds run, none is enqueued again
    bigger = micro_sweep(runs, zoo_cache, "seeds", n_trials=7)
    study = run_search(bigger, evaluator)
    trials = study.get_trials()
    assert len(trials) == 7 and all(t.state == TrialState.COMPLETE for t in trials)
    params = [t.params for t in trials]
    assert all(params.count(seed) == 1 for seed in seeds)
    assert params[:5] == seeds and params[5] not in seeds  # then the sampler's own
    assert study.user_attrs["seeded"] == "done"

    # a process killed while seeding a new study: the next one enqueues the rest, none twice
    killed = micro_sweep(runs, zoo_cache, "seeds-killed", n_trials=1)
    first = open_study(killed.config, TASKS)
    first.set_user_attr("seeded", "started")
    first.enqueue_trial(seeds[0])
    study = run_search(killed, evaluator)
    params = [t.system_attrs.get("fixed_params", t.params) for t in study.get_trials()]
    assert len(params) == 5 and all(params.count(seed) == 1 for seed in seeds)


def test_a_study_goes_on_with_its_own_dev_questions_only(
    runs: Path, zoo_cache: Path, evaluator: LocalEvaluator
) -> None:
    sweep = micro_sweep(runs, zoo_cache, "dev-key", n_trials=1, seed_recipes=())
    study = run_search(sweep, evaluator)
    record = (sweep.config.run_dir() / "sweep.json").read_text()
    other_val = micro_sweep(runs, zoo_cache, "dev-key", n_trials=2, pick=PickConfig(val_fraction=0.5))
    with pytest.raises(ConfigError, match="other dev questions"):
        run_search(other_val, evaluator)
    assert (sweep.config.run_dir() / "sweep.json").read_text() == record  # the run's record is kept
    # nor is a report's val split one that overlaps the questions the search scored on
    with pytest.raises(ConfigError, match="other dev questions"):
        final_report(other_val, evaluator, study)

    # a study from before val splits (complete trials, no record of its dev questions): scored on the
    # whole dev split, it cannot go on with val held out of it, but can without
    legacy = micro_sweep(runs, zoo_cache, "legacy", n_trials=1, seed_recipes=())
    study = open_study(legacy.config, TASKS)
    recipe = {"merge_method": "linear", "models": [{"model": "/m/a"}]}
    study.add_trial(
        optuna.trial.create_trial(
            value=0.5, user_attrs={"scores": dict.fromkeys(TASKS, 0.5), "mean": 0.5, "recipe": recipe}
        )
    )
    with pytest.raises(ConfigError, match="predates val splits"):
        run_search(legacy, evaluator)
    whole = micro_sweep(runs, zoo_cache, "legacy", n_trials=1, seed_recipes=(), pick=None)
    assert len(run_search(whole, evaluator).trials) == 1  # the budget is met: nothing ran


def val_scores(micro_zoo: Zoo, sweep: ResolvedSweep, recipe: MergeRecipe) -> dict[str, float]:
    """An independent scorer: its own merger and live model, the sweep's val split."""
    backend = HFBackend.from_pretrained(micro_zoo.base, batch_size=64)
    backend.load_state_dict(InMemoryMerger(micro_zoo.base, list(micro_zoo.experts.values())).merge(recipe))
    return evaluate(backend, sweep.tasks, "val", sweep.data_dir).scores  # type: ignore[arg-type]


def test_the_pick_is_the_best_val_mean_among_the_top_dev_trials(
    runs: Path,
    zoo_cache: Path,
    evaluator: LocalEvaluator,
    micro_zoo: Zoo,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    sweep = micro_sweep(runs, zoo_cache, "pick", n_trials=6, pick=PickConfig(top_k=8))
    study = run_search(sweep, evaluator)
    # a lucky trial: the best dev mean by far, but its recipe (4x every task vector) breaks the model.
    # The dev-best trial is then not the val-best one, as when a trial's dev score is mostly noise.
    real = study.trials[0]
    models = [{"model": e, "parameters": {"weight": 4.0}} for e in micro_zoo.experts.values()]
    broken = MergeRecipe.model_validate({**real.user_attrs["recipe"], "models": models})
    study.add_trial(
        optuna.trial.create_trial(
            value=0.99,
            params=real.params,
            distributions=real.distributions,
            user_attrs={"recipe": broken.to_dict(), "scores": dict.fromkeys(TASKS, 0.99), "mean": 0.99},
        )
    )
    lucky = study.trials[-1].number
    report = final_report(sweep, evaluator, study)
    pick = report.pick
    assert pick is not None
    assert report.dev_best_number == lucky == dev_best_trial(study).number == pick.dev_best
    assert pick.candidates[0].number == lucky and len(pick.candidates) == 7
    assert pick.val_tasks == TASKS
    assert pick.val_questions == sum(len(load_split(t, "val", sweep.data_dir)) for t in sweep.tasks) == 21

    # every candidate's val scores, recomputed independently and recorded in the study
    attrs = study.user_attrs
    for c in pick.candidates:
        expected = val_scores(micro_zoo, sweep, trial_recipe(study.trials[c.number]))
        assert c.val_scores == pytest.approx(expected, abs=1e-12)
        assert c.val_mean == pytest.approx(sum(expected.values()) / 3)
        assert c.dev_mean == study.trials[c.number].user_attrs["mean"] and c.rescored
        assert attrs[val_attr(c.number)]["scores"] == c.val_scores
    lucky_val = pick.candidate(lucky).val_mean
    assert max(c.val_mean for c in pick.candidates) > lucky_val, "the zoo's models answer no val question"
    picked = max(pick.candidates, key=lambda c: (c.val_mean, c.dev_mean, -c.number))
    assert pick.picked == picked.number != lucky
    assert report.best_number == picked.number and report.best_val == picked.val_mean
    assert attrs[PICK_ATTR]["trial"] == picked.number and attrs[PICK_ATTR]["dev_best"] == lucky

    # the pick is what the sweep exports, materializes and compares on test
    recipe = trial_recipe(study.trials[picked.number])
    assert best_trial(study).number == picked.number and report.best_recipe == recipe
    run_dir = sweep.config.run_dir()
    text = (run_dir / "best_recipe.yaml").read_text()
    assert MergeRecipe.from_yaml(run_dir / "best_recipe.yaml") == recipe
    assert (
        f"trial {picked.number}, dev mean" in text
        and f"val mean {picked.val_mean:.4f} (picked on val)" in text
    )
    merged = InMemoryMerger(micro_zoo.base, list(micro_zoo.experts.values())).merge(recipe)
    with ModelDir(run_dir / "best_model") as md:
        assert sorted(md.tensor_names()) == sorted(merged)
        assert all(torch.equal(md.read(n), t) for n, t in merged.items())
    chosen, exported = export_trial(study, tmp_path / "exported.yaml")
    assert chosen.number == picked.number and exported == recipe
    assert "(picked on val)" in (tmp_path / "exported.yaml").read_text().splitlines()[0]
    searched = report.test[-1]
    assert searched.name == f"searched (trial {picked.number})" and searched.val_mean == picked.val_mean

    # both scores recorded in report.md and results.json; the verdict is the last line
    markdown = (run_dir / "report.md").read_text()
    assert (
        f"Picked trial {picked.number}: dev {picked.dev_mean:.4f}, val {picked.val_mean:.4f}; dev-best trial "
        f"{lucky}: dev 0.9900, val {lucky_val:.4f}."
    ) in markdown
    assert markdown.rstrip("\n").splitlines()[-1] == verdict_line(report)
    assert verdict_line(report).startswith(
        f"verdict on test (120 questions): searched (trial {picked.number}) "
    )
    results = json.loads((run_dir / "results.json").read_text())
    assert results["pick"]["picked"] == picked.number and results["dev_best_number"] == lucky
    assert results["verdict_line"] == verdict_line(report)
    assert all("questions" not in r for r in results["test"])
    # the verdict's rivals are chosen on val: the expert and the uniform merge with the best val mean
    assert report.verdict is not None
    expert, uniform = report.verdict.comparisons
    experts = [r for r in report.test if r.kind == "expert"]
    assert all(r.val_mean is not None for r in experts)
    assert expert.chosen_by == "val" and expert.name == max(experts, key=lambda r: r.val_mean or 0).name
    assert expert.theirs == next(r.mean for r in experts if r.name == expert.name)
    assert uniform.name.startswith("task arithmetic") and expert.ours == searched.mean

    # a second report scores no trial on val again (only the baselines), and picks the same
    calls: list[tuple[MergeRecipe, str]] = []
    original = evaluator.score_recipe

    def spy(recipe: MergeRecipe, split: Any, *args: Any, **kwargs: Any) -> Any:
        calls.append((recipe, split))
        return original(recipe, split, *args, **kwargs)

    monkeypatch.setattr(evaluator, "score_recipe", spy)
    quick = dataclasses.replace(sweep, config=sweep.config.model_copy(update={"materialize_best": False}))
    again = final_report(quick, evaluator, study)
    assert again.pick is not None and again.pick.picked == picked.number
    assert not any(c.rescored for c in again.pick.candidates)
    val_calls = [r for r, split in calls if split == "val"]
    assert len(val_calls) == len(sweep.config.baseline_weights)  # the uniform baselines, no trial
    assert again.test == report.test

    # a trial completed since the pick: the pick is stale until the next report, export falls back to dev
    study.add_trial(
        optuna.trial.create_trial(
            value=0.1,
            params=real.params,
            distributions=real.distributions,
            user_attrs={
                "recipe": real.user_attrs["recipe"],
                "scores": dict.fromkeys(TASKS, 0.1),
                "mean": 0.1,
            },
        )
    )
    assert best_trial(study).number == lucky


def test_nsga2_picks_among_the_pareto_front_and_pick_off_keeps_the_dev_best(
    runs: Path, zoo_cache: Path, evaluator: LocalEvaluator
) -> None:
    multi = micro_sweep(
        runs,
        zoo_cache,
        "pick-multi",
        sampler=SamplerConfig(name="nsga2", seed=0, population_size=2),
        n_trials=5,
        materialize_best=False,
    )
    study = run_search(multi, evaluator)
    report = final_report(multi, evaluator, study)
    assert report.pick is not None
    front = pareto_front(study.get_trials(states=(TrialState.COMPLETE,)), TASKS)
    ranked = sorted(front, key=lambda t: (-t.user_attrs["mean"], t.number))[:5]
    assert [c.number for c in report.pick.candidates] == [t.number for t in ranked]
    assert report.best_number == report.pick.picked

    off = micro_sweep(runs, zoo_cache, "pick-off", n_trials=2, pick=None, materialize_best=False)
    assert all(t.val_fraction is None for t in off.tasks)
    study = run_search(off, evaluator)
    report = final_report(off, evaluator, study)
    assert report.pick is None and report.best_val is None
    assert report.best_number == dev_best_trial(study).number == best_trial(study).number
    assert report.notes and report.notes[0].startswith("pick: off")
    assert study.user_attrs.get(PICK_ATTR) is None
    assert "chosen by test" in verdict_line(report)
    markdown = (off.config.run_dir() / "report.md").read_text()
    assert "## Pick on the val split" not in markdown
    assert markdown.rstrip("\n").splitlines()[-1] == verdict_line(report)
