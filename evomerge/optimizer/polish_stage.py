"""The sweep's ``polish:`` stage: gradient polish between the pick and the test report.

Each start of ``polish.starts`` (``pick``: the recipe picked on val; ``uniform``: task arithmetic with
weight 1/N, no search at all) is polished (:func:`~evomerge.optimizer.polish.polish_recipe`: the tasks'
training prompts, the step kept by the dev mean) and then scored on the ``val`` split, which neither the
search nor the polish saw. The result of the sweep is whichever of the unpolished pick and the polished
starts has the best val mean (ties: the unpolished pick, then the order of ``starts``), so the stage can
only replace the pick where held-out questions say it is better. The test split is not looked at here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from evomerge.merging import MergeRecipe
from evomerge.optimizer.config import PolishConfig
from evomerge.optimizer.evaluator import LocalEvaluator
from evomerge.optimizer.export import uniform_task_arithmetic
from evomerge.optimizer.pick import val_tasks
from evomerge.optimizer.polish import polish_recipe
from evomerge.optimizer.sweep import ResolvedSweep

__all__ = ["PolishStage", "PolishedStart", "polish_section", "run_polish_stage", "stage_json"]

StepProgress = Callable[[str, int, int], None]


@dataclass(frozen=True)
class PolishedStart:
    """One polished start: its row label, the polished recipe, dev before and after, and its val mean."""

    start: str
    label: str
    recipe: MergeRecipe
    start_dev: float
    best_dev: float
    best_step: int
    steps_run: int
    seconds: float
    val_mean: float
    val_scores: dict[str, float]
    history: list[dict[str, float]] = field(default_factory=list)


@dataclass(frozen=True)
class PolishStage:
    config: PolishConfig
    pick_label: str
    pick_val: float
    runs: list[PolishedStart]
    chosen: str | None
    """The label of the polished start that became the sweep's result; None: the unpolished pick."""
    trainable: int
    untrained: list[str]

    def chosen_run(self) -> PolishedStart | None:
        return next((r for r in self.runs if r.label == self.chosen), None)


def run_polish_stage(
    sweep: ResolvedSweep,
    evaluator: LocalEvaluator,
    pick_recipe: MergeRecipe,
    pick_label: str,
    pick_val: float,
    *,
    progress: StepProgress | None = None,
) -> PolishStage:
    """Polish each start of ``sweep.config.polish``, score each on val and choose (module docstring)."""
    cfg = sweep.config.polish
    assert cfg is not None
    vtasks = val_tasks(sweep)
    n = len(sweep.experts)
    runs: list[PolishedStart] = []
    trainable, untrained = 0, []
    for start in cfg.starts:
        if start == "pick":
            recipe, label = pick_recipe, f"{pick_label} + polished"
        else:
            recipe = uniform_task_arithmetic(sweep.base, sweep.experts, 1.0 / n)
            label = f"task arithmetic w=1/{n} + polished"

        def step(done: int, total: int, loss: float, dev: float | None, label: str = label) -> None:
            if progress is not None:
                progress(f"polish: {label} (loss {loss:.3f})", done, total)

        result = polish_recipe(recipe, evaluator, cfg, progress=step)
        trainable, untrained = result.trainable, result.untrained

        def vstep(done: int, total: int, label: str = label) -> None:
            if progress is not None:
                progress(f"val: {label}", done, total)

        val = evaluator.score_state(result.state, "val", vstep, tasks=vtasks)
        runs.append(
            PolishedStart(
                start=start,
                label=label,
                recipe=result.recipe,
                start_dev=result.start_dev,
                best_dev=result.best_dev,
                best_step=result.best_step,
                steps_run=len(result.history) - 1,
                seconds=round(result.seconds, 2),
                val_mean=float(val.mean),
                val_scores={k: float(v) for k, v in val.scores.items()},
                history=result.history,
            )
        )
    best = max(runs, key=lambda r: r.val_mean, default=None)
    chosen = best.label if best is not None and best.val_mean > pick_val else None
    return PolishStage(cfg, pick_label, pick_val, runs, chosen, trainable, untrained)


def polish_section(stage: PolishStage) -> list[str]:
    """The report's "Gradient polish" section (markdown lines)."""
    cfg = stage.config
    lines = [
        "## Gradient polish",
        "",
        f"Objective {cfg.objective}, at most {cfg.steps} Adam steps (lr {cfg.lr:g}, batch {cfg.batch_size}) "
        f"on the tasks' training prompts, {stage.trainable} coefficients; the step kept is the best dev mean "
        f"(scored every {cfg.eval_every} steps). Each polished start was then scored on the val split, and "
        "the best val mean among them and the unpolished pick is the sweep's result.",
        "",
        "| start | dev before | dev after (step) | steps run | seconds | val mean |",
        "|---|---|---|---|---|---|",
        f"| {stage.pick_label} (unpolished) | | | | | {stage.pick_val:.3f} |",
    ]
    for r in stage.runs:
        lines.append(
            f"| {r.label} | {r.start_dev:.3f} | {r.best_dev:.3f} ({r.best_step}) | {r.steps_run} | "
            f"{r.seconds:.1f} | {r.val_mean:.3f} |"
        )
    kept = stage.chosen or f"{stage.pick_label} (unpolished: no polished start beat it on val)"
    lines += ["", f"Result: {kept}."]
    if stage.untrained:
        lines[-1] += f" Not trained on (no training prompts): {', '.join(stage.untrained)}."
    return [*lines, ""]


def stage_json(stage: PolishStage) -> dict[str, Any]:
    return {
        "config": stage.config.model_dump(mode="json"),
        "pick": stage.pick_label,
        "pick_val": stage.pick_val,
        "chosen": stage.chosen,
        "trainable": stage.trainable,
        "untrained_tasks": stage.untrained,
        "runs": [
            {
                "start": r.start,
                "label": r.label,
                "recipe": r.recipe.to_dict(),
                "start_dev": r.start_dev,
                "best_dev": r.best_dev,
                "best_step": r.best_step,
                "steps_run": r.steps_run,
                "seconds": r.seconds,
                "val_mean": r.val_mean,
                "val_scores": r.val_scores,
                "history": r.history,
            }
            for r in stage.runs
        ],
    }
