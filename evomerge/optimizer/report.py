"""The end of a sweep: the pick, held-out test comparison, best recipe, merged model and ``report.md``.

Fitness only ever saw the dev split. The searched recipe is picked among the top dev trials on the
``val`` split (:mod:`evomerge.optimizer.pick`), then compared on the **test** split with the base, each
expert alone and uniform task-arithmetic baselines. A ``polish:`` stage
(:mod:`evomerge.optimizer.polish_stage`) may replace the pick with a polished start that beats it on
val. The report ends with a verdict line: the sweep's result against the best expert and the best
uniform merge (each chosen by its val mean, or by its test mean when there is no val split), the
difference of test means and its standard error (paired over
the same test questions), and whether it is a win, a loss or within noise (:data:`WIN_SE`).
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from evomerge.atomic_io import write_text_atomic
from evomerge.evaluators import EvalResult
from evomerge.evaluators.tasks import Split
from evomerge.merging import MergeRecipe, merge_streaming
from evomerge.optimizer.evaluator import LocalEvaluator
from evomerge.optimizer.export import trial_recipe, uniform_task_arithmetic
from evomerge.optimizer.pick import PickResult, honest_pick, skipped_reason, val_tasks
from evomerge.optimizer.plots import write_report_plots
from evomerge.optimizer.polish_stage import PolishStage, polish_section, run_polish_stage, stage_json
from evomerge.optimizer.study import complete_trials, dev_best_trial, pareto_front
from evomerge.optimizer.sweep import ResolvedSweep
from evomerge.search_spaces import expert_aliases

StepProgress = Callable[[str, int, int], None]

WIN_SE = 2.0
"""A difference on test counts as a win (or a loss) beyond this many standard errors (about a 95 %
two-sided interval); closer than that it is within noise."""


@dataclass(frozen=True)
class Row:
    """One model's scores. ``kind``: ``base``, ``expert``, ``uniform`` (a uniform task-arithmetic
    baseline), ``searched`` (the sweep's result: the pick, or its ``polish:`` stage's choice), ``trial``
    (the unpolished pick when a polished start replaced it) or ``polished`` (a polished start that did
    not). ``val_mean``: its mean on the val split where scored (what the
    verdict chooses the best expert and uniform merge by). ``counts`` and ``questions`` (per task: the
    number of questions and each question's score, in the split's fixed order) give the verdict's
    standard errors; ``questions`` is left out of comparisons and of ``results.json``."""

    name: str
    scores: dict[str, float]
    mean: float
    kind: str = ""
    val_mean: float | None = None
    counts: dict[str, int] = field(default_factory=dict)
    questions: dict[str, list[float]] = field(default_factory=dict, compare=False, repr=False)


@dataclass(frozen=True)
class Comparison:
    """The searched recipe against one baseline on test: ``diff = ours - theirs`` with the standard error
    of that difference (``paired``: from per-question differences; else the binomial approximation)."""

    role: str
    name: str
    chosen_by: str
    ours: float
    theirs: float
    diff: float
    se: float | None
    paired: bool
    outcome: str
    """``win`` (more than WIN_SE standard errors better), ``LOSES`` (as much worse), ``within noise``, or
    ``no SE`` (no question counts to compute one from)."""


@dataclass(frozen=True)
class Verdict:
    searched: str
    mean: float
    questions: int
    comparisons: list[Comparison]


@dataclass
class FinalReport:
    study_name: str
    tasks: list[str]
    n_complete: int
    n_failed: int
    n_pruned: int
    best_number: int
    """The searched recipe's trial: the pick on val (or the best dev trial when there is no pick)."""
    best_dev: Row
    """Its dev scores."""
    best_recipe: MergeRecipe
    pareto: list[Row]
    test: list[Row]
    mean_merge_seconds: float
    mean_eval_seconds: float
    paths: dict[str, str] = field(default_factory=dict)
    weights: dict[str, float] = field(default_factory=dict)
    dev_best_number: int | None = None
    best_val: float | None = None
    pick: PickResult | None = None
    verdict: Verdict | None = None
    notes: list[str] = field(default_factory=list)
    polish: PolishStage | None = None
    """The ``polish:`` stage, where the sweep has one (``best_recipe`` is then its result)."""

    def to_json(self) -> dict[str, Any]:
        data = asdict(dataclasses.replace(self, polish=None))
        data["best_recipe"] = self.best_recipe.to_dict()
        data["polish"] = None if self.polish is None else stage_json(self.polish)
        for key in ("test", "pareto"):
            for row in data[key]:
                row.pop("questions", None)
        data["best_dev"].pop("questions", None)
        data["verdict_line"] = verdict_line(self)
        return data


def _trial_row(t: FrozenTrial, tasks: Sequence[str]) -> Row:
    scores = t.user_attrs["scores"]
    mean = float(t.user_attrs["mean"])
    return Row(f"trial {t.number}", {k: float(scores[k]) for k in tasks}, mean, "trial")


def result_row(name: str, kind: str, result: EvalResult) -> Row:
    """A row from an evaluation, with its per-question scores."""
    return Row(
        name,
        dict(result.scores),
        float(result.mean),
        kind,
        counts={t: r.n for t, r in result.tasks.items()},
        questions={t: [q.score for q in r.records] for t, r in result.tasks.items()},
    )


# ------------------------------------------------------------------------------------ verdict
def difference_se(ours: Row, theirs: Row, weights: Mapping[str, float]) -> tuple[float | None, bool]:
    """The standard error of ``ours.mean - theirs.mean`` over the test questions, and whether it is paired.

    The means are task-weighted means of per-task accuracies, so the difference is
    ``sum_t w_t (a_t - b_t) / sum_t w_t`` and its variance ``sum_t (w_t / W)^2 var_t``. Per task, paired
    (the same questions for both rows): ``var_t = sd(per-question differences)^2 / n_t``; where the rows
    hold no per-question scores, the unpaired binomial approximation
    ``(a_t (1 - a_t) + b_t (1 - b_t)) / n_t``. None when a task has no question count."""
    names = list(ours.scores)
    total = sum(weights.get(t, 1.0) for t in names)
    if not names or total <= 0:
        return None, False
    variance = 0.0
    paired = True
    for t in names:
        w = weights.get(t, 1.0) / total
        a, b = ours.questions.get(t), theirs.questions.get(t)
        if a is not None and b is not None and len(a) == len(b) >= 2:
            d = [x - y for x, y in zip(a, b, strict=True)]
            m = sum(d) / len(d)
            var_t = sum((x - m) ** 2 for x in d) / (len(d) - 1) / len(d)
        else:
            paired = False
            n = ours.counts.get(t) or theirs.counts.get(t) or (len(a) if a else 0)
            if not n:
                return None, False
            pa = min(max(ours.scores[t], 0.0), 1.0)
            pb = min(max(theirs.scores.get(t, 0.0), 0.0), 1.0)
            var_t = (pa * (1 - pa) + pb * (1 - pb)) / n
        variance += w * w * var_t
    return math.sqrt(variance), paired


def compare(ours: Row, theirs: Row, weights: Mapping[str, float], *, role: str, chosen_by: str) -> Comparison:
    diff = ours.mean - theirs.mean
    se, paired = difference_se(ours, theirs, weights)
    if se is None:
        outcome = "no SE"
    elif diff != 0 and abs(diff) > WIN_SE * se:
        outcome = "win" if diff > 0 else "LOSES"
    else:
        outcome = "within noise"
    return Comparison(role, theirs.name, chosen_by, ours.mean, theirs.mean, diff, se, paired, outcome)


def _best(rows: Sequence[Row]) -> tuple[Row, str]:
    """The strongest row: by val mean where every row has one (chosen without looking at test), else by
    test mean (which favours the baseline: its own winner's curse). Ties: the first."""
    if all(r.val_mean is not None for r in rows):
        return max(rows, key=lambda r: r.val_mean or 0.0), "val"
    return max(rows, key=lambda r: r.mean), "test"


def verdict_of(rows: Sequence[Row], weights: Mapping[str, float]) -> Verdict | None:
    """The searched row (kind ``searched``) against the best expert and the best uniform merge."""
    searched = next((r for r in rows if r.kind == "searched"), None)
    if searched is None:
        return None
    comparisons = []
    for role, kind in (("best expert", "expert"), ("best uniform merge", "uniform")):
        group = [r for r in rows if r.kind == kind]
        if group:
            best, chosen_by = _best(group)
            comparisons.append(compare(searched, best, weights, role=role, chosen_by=chosen_by))
    questions = sum(searched.counts.values())
    return Verdict(searched.name, searched.mean, questions, comparisons)


def format_verdict(verdict: Verdict | None) -> str:
    """One line: the searched recipe's test mean against each baseline's, the difference, its standard
    error and whether it is a win, a loss (``LOSES``) or within noise; a loss is said again at the end."""
    if verdict is None:
        return "verdict: none (no searched recipe on the test split)"
    parts = []
    for c in verdict.comparisons:
        if c.se is None:
            noise = "no SE"
        elif c.se > 0:
            noise = f"SE {c.se:.3f}, {abs(c.diff) / c.se:.1f} SE"
        else:
            noise = "SE 0.000"
        kind = "" if c.paired or c.se is None else ", unpaired"
        parts.append(
            f"vs {c.role} ({c.name}, chosen by {c.chosen_by}) {c.theirs:.3f}: "
            f"{c.diff:+.3f} ({noise}{kind}: {c.outcome})"
        )
    line = (
        f"verdict on test ({verdict.questions} questions): {verdict.searched} {verdict.mean:.3f} "
        + "; ".join(parts)
    )
    losses = [c.name for c in verdict.comparisons if c.outcome == "LOSES"]
    if losses:
        line += f". The searched recipe LOSES to {' and '.join(losses)} on test."
    return line


def verdict_line(report: FinalReport) -> str:
    """The report's verdict line (also the last line of ``report.md``)."""
    return format_verdict(report.verdict)


# ------------------------------------------------------------------------------------ the report
def final_report(
    sweep: ResolvedSweep,
    evaluator: LocalEvaluator,
    study: optuna.Study,
    *,
    progress: StepProgress | None = None,
    materialize_progress: Callable[[int, int, str], None] | None = None,
) -> FinalReport:
    """Pick the searched recipe (on val, :func:`~evomerge.optimizer.pick.honest_pick`), score it, the
    base, each expert and the uniform baselines on test, and write ``best_recipe.yaml``,
    ``best_model/``, the plots, ``report.md`` and ``results.json``."""
    config = sweep.config
    run_dir = config.run_dir()
    evaluator = evaluator.for_sweep(sweep)
    tasks = [t.name for t in sweep.tasks]
    weights = {t.name: t.weight for t in sweep.tasks}
    trials = complete_trials(study)
    dev_best = dev_best_trial(study)
    pick = honest_pick(sweep, evaluator, study, progress=progress)
    notes: list[str] = []
    if pick is None:
        best = dev_best
        notes.append(skipped_reason(sweep) or "")
    else:
        best = next(t for t in trials if t.number == pick.picked)
        missing = [t for t in tasks if t not in pick.val_tasks]
        if missing:
            notes.append(f"val covers {', '.join(pick.val_tasks)} only ({', '.join(missing)}: no val split)")
    recipe = trial_recipe(best)
    searched_label = f"searched (trial {best.number})"
    polish: PolishStage | None = None
    if config.polish is not None:
        if pick is None:
            notes.append(
                "polish: not run: it chooses among the polished starts on the val split, and there is none"
            )
        else:
            polish = run_polish_stage(
                sweep,
                evaluator,
                recipe,
                searched_label,
                pick.candidate(best.number).val_mean,
                progress=progress,
            )
    polished = None if polish is None else polish.chosen_run()

    n = len(sweep.experts)
    # (label, kind, what to score): None is the base, a str an expert directory, a recipe a merge.
    entries: list[tuple[str, str, str | MergeRecipe | None]] = [("base", "base", None)]
    for alias, path in zip(expert_aliases(sweep.experts), sweep.experts, strict=True):
        entries.append((f"expert {alias}", "expert", path))
    for w in config.baseline_weights:
        label = f"task arithmetic w=1/{n}" if w == 0 else f"task arithmetic w={w:g}"
        weight = 1.0 / n if w == 0 else w
        entries.append((label, "uniform", uniform_task_arithmetic(sweep.base, sweep.experts, weight)))
    entries.append((searched_label, "searched" if polished is None else "trial", recipe))
    for run in [] if polish is None else polish.runs:
        entries.append((run.label, "searched" if run is polished else "polished", run.recipe))

    def score(what: str | MergeRecipe | None, split: Split, step: Any, tasks: Any = None) -> EvalResult:
        if what is None:
            return evaluator.score_state(evaluator.base_state, split, step, tasks=tasks)
        if isinstance(what, str):
            return evaluator.score_model_dir(what, split, step, tasks=tasks)
        return evaluator.score_recipe(what, split, step, tasks=tasks)[0]

    test_rows: list[Row] = []
    for i, (label, kind, what) in enumerate(entries):

        def step(done: int, total: int, label: str = label, i: int = i) -> None:
            if progress is not None:
                progress(f"test: {label}", i * total + done, len(entries) * total)

        test_rows.append(result_row(label, kind, score(what, "test", step)))

    if pick is not None:  # the baselines the verdict compares with are chosen on val too
        vtasks = val_tasks(sweep)
        rivals = [i for i, (_, kind, _) in enumerate(entries) if kind in ("expert", "uniform")]
        for j, i in enumerate(rivals):
            label, _, what = entries[i]

            def vstep(done: int, total: int, label: str = label, j: int = j) -> None:
                if progress is not None:
                    progress(f"val: {label}", j * total + done, len(rivals) * total)

            val = score(what, "val", vstep, vtasks)
            test_rows[i] = dataclasses.replace(test_rows[i], val_mean=float(val.mean))
        val_means = {searched_label: pick.candidate(best.number).val_mean}
        val_means.update({run.label: run.val_mean for run in ([] if polish is None else polish.runs)})
        test_rows = [
            dataclasses.replace(r, val_mean=val_means[r.name]) if r.name in val_means else r
            for r in test_rows
        ]

    evaluated = [t for t in trials if "merge_seconds" in t.user_attrs]  # not the repeats (duplicate_of)
    merge_s = [float(t.user_attrs["merge_seconds"]) for t in evaluated]
    eval_s = [float(t.user_attrs.get("eval_seconds", 0.0)) for t in evaluated]
    repeats = sum("duplicate_of" in t.user_attrs for t in trials)
    if repeats:
        notes.append(
            f"{repeats} complete trial{'s' if repeats > 1 else ''} asked for a recipe the study had scored "
            "already and took its scores without being evaluated again (user attribute duplicate_of)"
        )
    report = FinalReport(
        study_name=config.study_name,
        tasks=tasks,
        n_complete=len(trials),
        n_failed=len(study.get_trials(deepcopy=False, states=(TrialState.FAIL,))),
        n_pruned=len(study.get_trials(deepcopy=False, states=(TrialState.PRUNED,))),
        best_number=best.number,
        best_dev=_trial_row(best, tasks),
        best_recipe=recipe if polished is None else polished.recipe,
        pareto=[_trial_row(t, tasks) for t in pareto_front(trials, tasks)],
        test=test_rows,
        mean_merge_seconds=sum(merge_s) / max(1, len(merge_s)),
        mean_eval_seconds=sum(eval_s) / max(1, len(eval_s)),
        weights=weights,
        dev_best_number=dev_best.number,
        best_val=(
            None
            if pick is None
            else pick.candidate(best.number).val_mean
            if polished is None
            else polished.val_mean
        ),
        pick=pick,
        polish=polish,
        verdict=verdict_of(test_rows, weights),
        notes=notes,
    )
    recipe_path = run_dir / "best_recipe.yaml"
    val_note = "" if report.best_val is None else f", val mean {report.best_val:.4f} (picked on val)"
    what = f"trial {best.number}, dev mean {report.best_dev.mean:.4f}"
    if polished is not None:
        what = f"{polished.label}, dev mean {polished.best_dev:.4f}"
    write_text_atomic(
        recipe_path,
        f"# evomerge: study {config.study_name}, {what}{val_note}\n" + report.best_recipe.to_yaml(),
    )
    report.paths["best_recipe"] = str(recipe_path)
    if config.materialize_best:
        model_dir = run_dir / "best_model"
        merge_streaming(report.best_recipe, model_dir, overwrite=True, progress=materialize_progress)
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


def _pick_section(report: FinalReport) -> list[str]:
    pick = report.pick
    if pick is None:
        return []
    picked, dev_best = pick.candidate(pick.picked), pick.candidate(pick.dev_best)
    lines = [
        "## Pick on the val split",
        "",
        "The best of many noisy dev scores is biased upward (winner's curse), so the top "
        f"{len(pick.candidates)} trials by dev mean were scored on {pick.val_questions} val questions "
        f"(tasks: {', '.join(pick.val_tasks)}) that the search never saw, and the best val mean was picked.",
        "",
        "| trial | dev mean | " + " | ".join(f"val {t}" for t in pick.val_tasks) + " | val mean |",
        "|" + "---|" * (len(pick.val_tasks) + 3),
    ]
    for c in pick.candidates:
        name = f"trial {c.number}" + (" (picked)" if c.number == pick.picked else "")
        cells = [name, f"{c.dev_mean:.3f}", *(f"{c.val_scores[t]:.3f}" for t in pick.val_tasks)]
        lines.append("| " + " | ".join([*cells, f"{c.val_mean:.3f}"]) + " |")
    lines += [
        "",
        f"Picked trial {picked.number}: dev {picked.dev_mean:.4f}, val {picked.val_mean:.4f}; dev-best trial "
        f"{dev_best.number}: dev {dev_best.dev_mean:.4f}, val {dev_best.val_mean:.4f}.",
        "",
    ]
    rivals = [r for r in report.test if r.kind in ("expert", "uniform") and r.val_mean is not None]
    if rivals:
        lines += ["Val means of the baselines (the verdict compares with the best of each kind on val): "]
        lines[-1] += ", ".join(f"{r.name} {r.val_mean:.3f}" for r in rivals) + "."
        lines.append("")
    return lines


def _best_what(report: FinalReport) -> str:
    polished = None if report.polish is None else report.polish.chosen_run()
    if polished is not None:
        return f"{polished.label}, dev mean {polished.best_dev:.4f}"
    return f"trial {report.best_number}, dev mean {report.best_dev.mean:.4f}"


def render_markdown(report: FinalReport) -> str:
    """The report; its last line is the verdict (:func:`verdict_line`)."""
    val = "" if report.best_val is None else f", val mean {report.best_val:.4f}"
    picked = (
        "the searched recipe was picked on the val split (see below); "
        if report.pick is not None
        else "the searched recipe is the best dev trial; "
    )
    lines = [
        f"# evomerge report: {report.study_name}",
        "",
        f"{report.n_complete} complete trials, {report.n_failed} failed, {report.n_pruned} pruned early. "
        "Mean seconds per candidate: "
        f"merge {report.mean_merge_seconds:.3f}, dev evaluation {report.mean_eval_seconds:.3f}.",
        "",
        *(f"Note: {note}." for note in report.notes),
        *([""] if report.notes else []),
        "## Held-out test split",
        "",
        "Fitness used the dev split only; " + picked + "these scores are on the test split.",
        "",
        *_table(report.test, report.tasks, "model"),
        "",
        *_pick_section(report),
        *([] if report.polish is None else polish_section(report.polish)),
        "## Pareto front (dev split)",
        "",
        *_table(report.pareto, report.tasks, "trial"),
        "",
        f"## Best recipe ({_best_what(report)}{val})",
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
    lines += [
        "## Verdict",
        "",
        "Test means; the difference's standard error is paired over the same test questions; beyond "
        f"{WIN_SE:g} standard errors a difference is a win (or a loss), closer it is within noise.",
        "",
        verdict_line(report),
        "",
    ]
    return "\n".join(lines)
