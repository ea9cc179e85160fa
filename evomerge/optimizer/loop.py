"""The search loop: ask the sampler for a genome, merge in memory, score on dev, tell the fitness.

The Optuna study is the single source of truth: every trial stores its recipe, per-task dev scores and
merge/eval seconds as user attributes, and ``evomerge search`` on an existing study continues it
(trials left RUNNING by a crash are marked FAILED first). A candidate that fails (NaN weights, out of
memory, an exception in a kernel) becomes a FAILED trial with its error recorded; the sweep goes on.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
import torch

from evomerge.checkpoints import ModelDir
from evomerge.errors import EvomergeError, UserError
from evomerge.evaluators import EvalResult, HFBackend, QuestionRecord, TaskConfig, evaluate
from evomerge.evaluators.tasks import Split
from evomerge.merging import InMemoryMerger, MergeRecipe
from evomerge.optimizer.config import SweepConfig
from evomerge.optimizer.study import open_study, recover_stale_trials
from evomerge.search_spaces import SearchSpace

TrialCallback = Callable[[int, int, "TrialOutcome"], None]
EvalProgress = Callable[[int, int], None]

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class ResolvedSweep:
    """A sweep config with its models and tasks made concrete (a zoo resolved to paths)."""

    config: SweepConfig
    base: str
    experts: tuple[str, ...]
    tasks: tuple[TaskConfig, ...]
    data_dir: str


@dataclass(frozen=True)
class TrialOutcome:
    number: int
    state: str
    mean: float | None
    scores: dict[str, float]
    error: str | None


def resolve_sweep(
    config: SweepConfig, *, zoo_cache: Path | None = None, zoo_progress: Any = None
) -> ResolvedSweep:
    """Fill in models and tasks; a ``zoo`` sweep builds its zoo first if it is not cached."""
    data_dir = config.data_dir or "."
    if config.zoo is not None:
        from evomerge.zoo import build_zoo

        zoo = build_zoo(config.zoo, zoo_cache, progress=zoo_progress)
        experts = tuple(zoo.experts.values())
        if config.tasks:  # the sweep's own tasks: data paths relative to the sweep YAML
            return ResolvedSweep(config, zoo.base, experts, config.tasks, data_dir)
        return ResolvedSweep(config, zoo.base, experts, zoo.tasks, zoo.root)
    assert config.models is not None  # the config validator guarantees it
    root = Path(data_dir)  # joining an absolute path keeps it as it is
    base = str((root / config.models.base).resolve())
    experts = tuple(str((root / e).resolve()) for e in config.models.experts)
    return ResolvedSweep(config, base, experts, config.tasks, data_dir)


class LocalEvaluator:
    """Holds the base + task vectors resident and one live model; scores recipes without disk I/O."""

    def __init__(self, sweep: ResolvedSweep) -> None:
        cfg = sweep.config.backend
        if cfg.threads is not None:
            torch.set_num_threads(cfg.threads)
        self.sweep = sweep
        self.merger = InMemoryMerger(sweep.base, sweep.experts, device=cfg.device)
        self.backend: Any
        if cfg.kind == "vllm":
            from evomerge.evaluators.vllm_backend import VLLMBackend

            kv_bytes = None if cfg.kv_cache_gb is None else int(cfg.kv_cache_gb * 2**30)
            self.backend = VLLMBackend.from_pretrained(
                sweep.base,
                device=cfg.device,
                dtype=_DTYPES[cfg.dtype],
                batch_size=cfg.batch_size,
                kv_cache_memory_bytes=kv_bytes,
            )
        else:
            self.backend = HFBackend.from_pretrained(
                sweep.base, device=cfg.device, dtype=_DTYPES[cfg.dtype], batch_size=cfg.batch_size
            )
        self.base_state = self.backend.state_dict()

    def score_state(
        self,
        state: Mapping[str, torch.Tensor],
        split: Split,
        progress: EvalProgress | None = None,
        *,
        questions: int | None = None,
        memo: dict[tuple[str, str, str], QuestionRecord] | None = None,
        loaded: bool = False,
    ) -> EvalResult:
        """Load ``state`` into the live model (unless ``loaded``) and score it; ``questions`` keeps each
        task's first questions of its fixed nested order (a multi-fidelity rung); ``memo`` carries the
        questions already scored on this state (see :func:`evaluate`)."""
        if not loaded:
            self.backend.load_state_dict(state)
        return evaluate(
            self.backend,  # type: ignore[arg-type]
            self.sweep.tasks,
            split,
            self.sweep.data_dir,
            progress=progress,
            limit=questions,
            memo=memo,
        )

    def score_recipe(
        self, recipe: MergeRecipe, split: Split, progress: EvalProgress | None = None
    ) -> tuple[EvalResult, float, float]:
        """(result, merge seconds, eval seconds)."""
        t0 = time.perf_counter()
        state = self.merger.merge(recipe)
        t1 = time.perf_counter()
        result = self.score_state(state, split, progress)
        return result, t1 - t0, time.perf_counter() - t1

    def score_model_dir(self, path: str, split: Split, progress: EvalProgress | None = None) -> EvalResult:
        with ModelDir(path) as md:
            state = {n: md.read(n).clone() for n in md.tensor_names()}
        return self.score_state(state, split, progress)


def _one_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}".strip()


def objective_values(config: SweepConfig, result: EvalResult) -> float | list[float]:
    if config.multi_objective:
        return [result.scores[t] for t in result.tasks]
    return result.mean


def build_space(sweep: ResolvedSweep, num_layers: int) -> SearchSpace:
    return SearchSpace(sweep.config.search_space, sweep.base, sweep.experts, num_layers)


def run_search(
    sweep: ResolvedSweep,
    evaluator: LocalEvaluator,
    *,
    on_trial: TrialCallback | None = None,
    max_consecutive_failures: int = 10,
) -> optuna.Study:
    """Run trials until the study holds ``n_trials`` complete ones; returns the study."""
    config = sweep.config
    run_dir = config.run_dir()
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "sweep.json").write_text(
        json.dumps(
            {
                "config": config.model_dump(mode="json"),
                "storage": config.storage_url(),
                "base": sweep.base,
                "experts": list(sweep.experts),
                "tasks": [t.model_dump(mode="json") for t in sweep.tasks],
                "data_dir": sweep.data_dir,
            },
            indent=2,
        )
    )
    study = open_study(config, [t.name for t in sweep.tasks])
    recover_stale_trials(study)
    space = build_space(sweep, evaluator.merger.num_layers)
    distributions = space.distributions()
    if not study.trials:
        for values in config.seed_genomes:
            study.enqueue_trial(space.uniform_genome(values), skip_if_exists=True)

    def complete() -> int:
        return len(study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)))

    done = complete()
    failures = 0
    last_error = ""
    while done < config.n_trials:
        trial = study.ask(distributions)
        outcome = _run_trial(config, space, evaluator, study, trial)
        if outcome.state == "COMPLETE":
            done += 1
            failures = 0
        elif (
            outcome.state == "PRUNED"
        ):  # a cheap early stop, not a failure; the budget counts complete trials
            failures = 0
        else:
            failures += 1
            last_error = outcome.error or ""
            if failures >= max_consecutive_failures:
                raise EvomergeError(
                    f"sweep stopped after {failures} failed trials in a row; last error: {last_error}"
                )
        if on_trial is not None:
            on_trial(done, config.n_trials, outcome)
    return study


def _climb_rungs(
    rungs: Sequence[int], evaluator: LocalEvaluator, recipe: MergeRecipe, trial: optuna.Trial
) -> tuple[TrialOutcome | None, EvalResult | None, float, float]:
    """Score ``recipe`` on each rung's subset in turn, reporting to Optuna, then on the full dev set.

    Rung subsets are nested (each the first questions of a fixed order), and every question is generated
    once: a later rung and the full set only score the questions earlier rungs did not. Returns (the
    outcome of a pruned trial with its last rung's scores, or None; the full dev result, or None when
    pruned; merge seconds; eval seconds).
    """
    t0 = time.perf_counter()
    state = evaluator.merger.merge(recipe)
    merge_s = time.perf_counter() - t0
    memo: dict[tuple[str, str, str], QuestionRecord] = {}
    loaded = False
    for rung in rungs:
        result = evaluator.score_state(state, "dev", questions=rung, memo=memo, loaded=loaded)
        loaded = True
        trial.report(result.mean, step=rung)
        trial.set_user_attr(f"rung_{rung}", result.scores)
        if trial.should_prune():
            trial.set_user_attr("pruned_at", rung)
            outcome = TrialOutcome(trial.number, "PRUNED", result.mean, result.scores, None)
            return outcome, None, merge_s, time.perf_counter() - t0 - merge_s
    result = evaluator.score_state(state, "dev", memo=memo, loaded=loaded)
    return None, result, merge_s, time.perf_counter() - t0 - merge_s


def _run_trial(
    config: SweepConfig,
    space: SearchSpace,
    evaluator: LocalEvaluator,
    study: optuna.Study,
    trial: optuna.Trial,
) -> TrialOutcome:
    try:
        recipe = space.to_recipe(trial.params)
        trial.set_user_attr("recipe", recipe.to_dict())
        if config.fidelity is None:
            result, merge_s, eval_s = evaluator.score_recipe(recipe, "dev")
        else:
            pruned, full, merge_s, eval_s = _climb_rungs(config.fidelity.rungs, evaluator, recipe, trial)
            if pruned is not None:
                study.tell(trial, state=optuna.trial.TrialState.PRUNED)
                return pruned
            assert full is not None
            result = full
    except (KeyboardInterrupt, UserError):
        # An interrupt or a bad config (missing task data, unreadable model) stops the sweep with one
        # clear line; the trial is recorded as failed and a rerun continues the study.
        study.tell(trial, state=optuna.trial.TrialState.FAIL)
        raise
    except Exception as err:  # failures are data: the trial fails, the sweep goes on
        message = _one_line(err)
        trial.set_user_attr("error", message)
        study.tell(trial, state=optuna.trial.TrialState.FAIL)
        return TrialOutcome(trial.number, "FAIL", None, {}, message)
    trial.set_user_attr("scores", result.scores)
    trial.set_user_attr("mean", result.mean)
    trial.set_user_attr("merge_seconds", round(merge_s, 4))
    trial.set_user_attr("eval_seconds", round(eval_s, 4))
    study.tell(trial, objective_values(config, result))
    return TrialOutcome(trial.number, "COMPLETE", result.mean, result.scores, None)
