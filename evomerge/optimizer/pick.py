"""The honest pick: choose among the search's best trials on questions it never saw.

The maximum of many noisy dev scores is biased upward (the winner's curse): the trial with the best dev
mean is partly the luckiest one. After the search, the ``pick.top_k`` complete trials by dev mean (nsga2:
the members of the Pareto front, by dev mean) are scored on the ``val`` split, questions held out of the
fitness (a task's ``val`` file, or ``pick.val_fraction`` of its dev questions; never test), and the one
with the best val mean is the pick (ties: the better dev mean, then the earlier trial). Each trial's val
scores are recorded in the study (the study user attribute ``val:<trial>``, with a key naming the val
questions), so a report run again scores no trial twice; the pick is recorded as ``pick``, and
:func:`~evomerge.optimizer.study.best_trial` (export, ``best_recipe.yaml``, the heatmap) returns it while
no trial completed since.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import optuna

from evomerge.errors import ConfigError
from evomerge.evaluators import TaskConfig
from evomerge.evaluators.tasks import load_split
from evomerge.optimizer.evaluator import LocalEvaluator
from evomerge.optimizer.export import trial_recipe
from evomerge.optimizer.study import (
    DEV_KEY_ATTR,
    PICK_ATTR,
    complete_trials,
    distinct_recipes,
    pareto_front,
    val_attr,
)
from evomerge.optimizer.sweep import ResolvedSweep, question_key

StepProgress = Callable[[str, int, int], None]


@dataclass(frozen=True)
class Candidate:
    """One of the top trials by dev mean, with its val scores."""

    number: int
    dev_mean: float
    dev_scores: dict[str, float]
    val_mean: float
    val_scores: dict[str, float]
    rescored: bool
    """Scored on val by this call (False: the scores recorded in the study were reused)."""


@dataclass(frozen=True)
class PickResult:
    top_k: int
    val_tasks: list[str]
    val_questions: int
    candidates: list[Candidate]
    """In dev order (best dev mean first)."""
    picked: int
    dev_best: int

    def candidate(self, number: int) -> Candidate:
        return next(c for c in self.candidates if c.number == number)


def val_tasks(sweep: ResolvedSweep) -> list[TaskConfig]:
    return [t for t in sweep.tasks if t.has_split("val")]


def skipped_reason(sweep: ResolvedSweep) -> str | None:
    """Why there is no pick on val (None when there is one)."""
    if not sweep.config.pick_enabled:
        return "pick: off (pick: null or top_k: 0); the searched recipe is the best dev trial"
    if not val_tasks(sweep):
        return (
            "pick: no task has a val split (a run from before val splits, or lmeval tasks only); the "
            "searched recipe is the best dev trial"
        )
    return None


def choose(candidates: list[Candidate]) -> Candidate:
    """The best val mean; ties: the better dev mean, then the earlier trial."""
    return max(candidates, key=lambda c: (c.val_mean, c.dev_mean, -c.number))


def honest_pick(
    sweep: ResolvedSweep,
    evaluator: LocalEvaluator,
    study: optuna.Study,
    *,
    progress: StepProgress | None = None,
) -> PickResult | None:
    """Score the top trials on val (those not scored on these val questions before), pick the best, and
    record it in the study; None when there is no pick (:func:`skipped_reason`), and then any earlier pick
    is cleared from the study."""
    config = sweep.config
    evaluator = evaluator.for_sweep(sweep)
    tasks = [t.name for t in sweep.tasks]
    vtasks = val_tasks(sweep)
    attrs: dict[str, Any] = dict(study.user_attrs)
    if skipped_reason(sweep) is not None or config.pick is None:
        if attrs.get(PICK_ATTR) is not None:
            study.set_user_attr(PICK_ATTR, None)
        return None
    recorded = attrs.get(DEV_KEY_ATTR)
    if recorded is not None and recorded != question_key(sweep.tasks, "dev", sweep.data_dir):
        raise ConfigError(
            f"study {study.study_name!r} was searched on other dev questions than these tasks ask; their val "
            "split would not be held out of its fitness"
        )
    trials = distinct_recipes(complete_trials(study))  # a recipe scored twice takes one place
    pool = pareto_front(trials, tasks) if config.multi_objective else trials
    ranked = sorted(pool, key=lambda t: (-float(t.user_attrs["mean"]), t.number))[: config.pick.top_k]
    if not ranked:
        raise ConfigError(f"study {study.study_name!r} has no complete trial yet")
    key = question_key(vtasks, "val", sweep.data_dir)
    n_val = sum(len(load_split(t, "val", sweep.data_dir)) for t in vtasks)
    candidates: list[Candidate] = []
    for i, t in enumerate(ranked):
        record = attrs.get(val_attr(t.number))
        rescored = not (isinstance(record, dict) and record.get("key") == key)
        if rescored:

            def step(done: int, total: int, i: int = i, number: int = t.number) -> None:
                if progress is not None:
                    progress(f"val: trial {number}", i * total + done, len(ranked) * total)

            result = evaluator.score_recipe(trial_recipe(t), "val", step, tasks=vtasks)[0]
            record = {"scores": dict(result.scores), "mean": float(result.mean), "key": key}
            study.set_user_attr(val_attr(t.number), record)
        assert isinstance(record, dict)
        candidates.append(
            Candidate(
                number=t.number,
                dev_mean=float(t.user_attrs["mean"]),
                dev_scores={k: float(t.user_attrs["scores"][k]) for k in tasks},
                val_mean=float(record["mean"]),
                val_scores={k: float(v) for k, v in record["scores"].items()},
                rescored=rescored,
            )
        )
    picked = choose(candidates)
    pick = PickResult(
        top_k=config.pick.top_k,
        val_tasks=[t.name for t in vtasks],
        val_questions=n_val,
        candidates=candidates,
        picked=picked.number,
        dev_best=candidates[0].number,
    )
    study.set_user_attr(
        PICK_ATTR,
        {
            "trial": picked.number,
            "dev_best": pick.dev_best,
            "candidates": [c.number for c in candidates],
            "n_complete": len(trials),
            "top_k": config.pick.top_k,
            "key": key,
        },
    )
    return pick
