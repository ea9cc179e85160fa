"""The end of a sweep: held-out test comparison, best recipe, merged model and ``report.md``.

Fitness only ever saw the dev split. Here the searched recipe is compared on the **test** split with
the base, each expert alone and uniform task-arithmetic baselines.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from evomerge.merging import MergeRecipe, merge_streaming
from evomerge.optimizer.export import trial_recipe, write_text_atomic
from evomerge.optimizer.loop import LocalEvaluator, ResolvedSweep
from evomerge.optimizer.plots import write_report_plots
from evomerge.optimizer.study import best_trial, complete_trials, pareto_front
from evomerge.search_spaces import expert_aliases

StepProgress = Callable[[str, int, int], None]


@dataclass(frozen=True)
class Row:
    name: str
    scores: dict[str, float]
    mean: float


@dataclass
class FinalReport:
    study_name: str
    tasks: list[str]
    n_complete: int
    n_failed: int
    n_pruned: int
    best_number: int
    best_dev: Row
    best_recipe: MergeRecipe
    pareto: list[Row]
    test: list[Row]
    mean_merge_seconds: float
    mean_eval_seconds: float
    paths: dict[str, str] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["best_recipe"] = self.best_recipe.to_dict()
        return data


def uniform_task_arithmetic(base: str, experts: Sequence[str], weight: float) -> MergeRecipe:
    return MergeRecipe.model_validate(
        {
            "merge_method": "task_arithmetic",
            "base_model": base,
            "models": [{"model": e, "parameters": {"weight": weight}} for e in experts],
            "dtype": "float32",
        }
    )


def _trial_row(t: FrozenTrial, tasks: Sequence[str]) -> Row:
    scores = t.user_attrs["scores"]
    return Row(f"trial {t.number}", {k: float(scores[k]) for k in tasks}, float(t.user_attrs["mean"]))


def final_report(
    sweep: ResolvedSweep,
    evaluator: LocalEvaluator,
    study: optuna.Study,
    *,
    progress: StepProgress | None = None,
    materialize_progress: Callable[[int, int, str], None] | None = None,
) -> FinalReport:
    config = sweep.config
    run_dir = config.run_dir()
    tasks = [t.name for t in sweep.tasks]
    trials = complete_trials(study)
    best = best_trial(study)
    recipe = trial_recipe(best)

    n = len(sweep.experts)
    # (label, what to score): None is the base, a str an expert directory, a recipe a merge.
    entries: list[tuple[str, str | MergeRecipe | None]] = [("base", None)]
    for alias, path in zip(expert_aliases(sweep.experts), sweep.experts, strict=True):
        entries.append((f"expert {alias}", path))
    for w in config.baseline_weights:
        label = f"task arithmetic w=1/{n}" if w == 0 else f"task arithmetic w={w:g}"
        entries.append((label, uniform_task_arithmetic(sweep.base, sweep.experts, 1.0 / n if w == 0 else w)))
    entries.append((f"searched (trial {best.number})", recipe))

    test_rows: list[Row] = []
    for i, (label, what) in enumerate(entries):

        def step(done: int, total: int, label: str = label, i: int = i) -> None:
            if progress is not None:
                progress(f"test: {label}", i * total + done, len(entries) * total)

        if what is None:
            result = evaluator.score_state(evaluator.base_state, "test", step)
        elif isinstance(what, str):
            result = evaluator.score_model_dir(what, "test", step)
        else:
            result = evaluator.score_recipe(what, "test", step)[0]
        test_rows.append(Row(label, dict(result.scores), float(result.mean)))

    merge_s = [float(t.user_attrs.get("merge_seconds", 0.0)) for t in trials]
    eval_s = [float(t.user_attrs.get("eval_seconds", 0.0)) for t in trials]
    report = FinalReport(
        study_name=config.study_name,
        tasks=tasks,
        n_complete=len(trials),
        n_failed=len(study.get_trials(deepcopy=False, states=(TrialState.FAIL,))),
        n_pruned=len(study.get_trials(deepcopy=False, states=(TrialState.PRUNED,))),
        best_number=best.number,
        best_dev=_trial_row(best, tasks),
        best_recipe=recipe,
        pareto=[_trial_row(t, tasks) for t in pareto_front(trials, tasks)],
        test=test_rows,
        mean_merge_seconds=sum(merge_s) / max(1, len(merge_s)),
        mean_eval_seconds=sum(eval_s) / max(1, len(eval_s)),
    )
    recipe_path = run_dir / "best_recipe.yaml"
    write_text_atomic(
        recipe_path,
        f"# evomerge: study {config.study_name}, trial {best.number}, dev mean {report.best_dev.mean:.4f}\n"
        + recipe.to_yaml(),
    )
    report.paths["best_recipe"] = str(recipe_path)
    if config.materialize_best:
        model_dir = run_dir / "best_model"
        merge_streaming(recipe, model_dir, overwrite=True, progress=materialize_progress)
        report.paths["best_model"] = str(model_dir)
    plots = write_report_plots(study, tasks, run_dir, num_layers=evaluator.merger.num_layers)
    report.paths.update({name: str(path) for name, path in plots.items()})
    report.paths["report"] = str(run_dir / "report.md")
    report.paths["study"] = config.storage_url()
    write_text_atomic(run_dir / "report.md", render_markdown(report))
    write_text_atomic(run_dir / "results.json", json.dumps(report.to_json(), indent=2))
    return report


def _table(rows: Sequence[Row], tasks: Sequence[str], first: str) -> list[str]:
    lines = [
        "| " + " | ".join([first, *tasks, "mean"]) + " |",
        "|" + "---|" * (len(tasks) + 2),
    ]
    for r in rows:
        cells = [r.name, *(f"{r.scores[t]:.3f}" for t in tasks), f"{r.mean:.3f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def render_markdown(report: FinalReport) -> str:
    lines = [
        f"# evomerge report: {report.study_name}",
        "",
        f"{report.n_complete} complete trials, {report.n_failed} failed, {report.n_pruned} pruned early. "
        "Mean seconds per candidate: "
        f"merge {report.mean_merge_seconds:.3f}, dev evaluation {report.mean_eval_seconds:.3f}.",
        "",
        "## Held-out test split",
        "",
        "Fitness used the dev split only; these scores are on the test split.",
        "",
        *_table(report.test, report.tasks, "model"),
        "",
        "## Pareto front (dev split)",
        "",
        *_table(report.pareto, report.tasks, "trial"),
        "",
        f"## Best recipe (trial {report.best_number}, dev mean {report.best_dev.mean:.4f})",
        "",
        "```yaml",
        report.best_recipe.to_yaml().rstrip(),
        "```",
        "",
    ]
    if "best_model" in report.paths:
        lines += [f"Merged model: `{report.paths['best_model']}`", ""]
    figures = [
        ("history", "Optimization history (dev mean per trial, running best)"),
        ("pareto", "Pareto front on the dev split"),
        ("heatmap", "The best recipe's parameters per layer and expert"),
    ]
    for key, caption in figures:
        if key in report.paths:
            lines += [f"## {caption}", "", f"![{key}]({Path(report.paths[key]).name})", ""]
    return "\n".join(lines)
