"""The search loop: ask the sampler for a genome, merge in memory, score on dev, tell the fitness.

The Optuna study is the single source of truth: every trial stores its recipe, per-task dev scores and
merge/eval seconds as user attributes, and ``evomerge search`` on an existing study continues it
(trials left RUNNING by a crash are marked FAILED first). A candidate that fails (NaN weights, out of
memory, an exception in a kernel) becomes a FAILED trial with its error recorded; the sweep goes on.
A candidate whose recipe the study already scored (CMA-ES clipped at a bound, a sampler repeating
itself) is not merged or scored again: its trial completes at once with the earlier trial's scores
and records ``duplicate_of`` (scoring is deterministic, so a second evaluation would only cost time).

Cheap fitness. With ``fidelity.rungs`` a trial climbs nested dev subsets and Optuna's pruner may stop it
after each. With ``fidelity.anchors`` the complete trials record their per-question dev answers
(``dev_answers``); once ``n_startup_trials`` have, each new trial is scored first on anchor questions fit
on those answers (:mod:`evomerge.optimizer.anchors`), its estimated dev mean is reported (step 0,
``anchor_estimate``), and it is promoted to the full dev set (the anchors' answers reused) only if the
estimate reaches the median (``pruner: percentile``: that percentile) of the complete trials' dev means;
otherwise it is PRUNED.
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import optuna
from optuna.trial import FrozenTrial, TrialState

from evomerge.atomic_io import write_text_atomic
from evomerge.checkpoints import ModelDir
from evomerge.errors import ConfigError, EvomergeError, one_line
from evomerge.evaluators import EvalResult, load_split
from evomerge.optimizer.anchors import Anchors, estimate_mean, fit_anchors
from evomerge.optimizer.config import SweepConfig
from evomerge.optimizer.evaluator import LocalEvaluator
from evomerge.optimizer.executors import Executor, LocalExecutor, StepJob, StepResult, TrialWorker, WorkerDied
from evomerge.optimizer.study import (
    DEV_KEY_ATTR,
    RECOVERY_INTERVAL_S,
    Heartbeat,
    candidate_params,
    count_trials,
    open_study,
    owner_id,
    quiet_heartbeat,
    recipe_key,
    recover_stale_trials,
    study_lock,
)
from evomerge.optimizer.sweep import ResolvedSweep, check_held_out, question_key
from evomerge.search_spaces import AnySpace, LayerPathSpace
from evomerge.search_spaces import build_space as _build_space

TrialCallback = Callable[[int, int, "TrialOutcome"], None]


@dataclass(frozen=True)
class TrialOutcome:
    number: int
    state: str
    mean: float | None
    scores: dict[str, float]
    error: str | None


def objective_values(config: SweepConfig, result: EvalResult) -> float | list[float]:
    if config.multi_objective:
        return [result.scores[t] for t in result.tasks]
    return result.mean


def build_space(sweep: ResolvedSweep, num_layers: int) -> AnySpace:
    return _build_space(sweep.config.search_space, sweep.base, sweep.experts, num_layers)


def seed_genomes(config: SweepConfig, space: AnySpace) -> list[dict[str, Any]]:
    """The genomes enqueued before the sampler takes over, each once, in order: ``seed_recipes`` (with
    ``uniform``, also uniform weights at each of the report's ``baseline_weights``, so the search holds
    the baselines it is compared with), then ``seed_genomes``. A layer-path space: its ``seed_recipes``
    (each source model's own path) only."""
    genomes: list[dict[str, Any]] = list(space.seed_genomes(config.seed_recipes))
    if isinstance(space, LayerPathSpace):
        return [g for i, g in enumerate(genomes) if g not in genomes[:i]]
    params = space.config.params
    if "uniform" in config.seed_recipes and any(p.name == "weight" for p in params):
        for w in config.baseline_weights:
            if w == 0:  # 1/N: the uniform seed itself
                continue
            genomes.append(space.uniform_genome(space.seed_values(w)))
    genomes += [space.uniform_genome(values) for values in config.seed_genomes]
    unique: list[dict[str, Any]] = []
    for genome in genomes:
        if genome not in unique:
            unique.append(genome)
    return unique


SEEDED_ATTR = "seeded"


def _seed_study(study: optuna.Study, seeds: Sequence[dict[str, Any]]) -> None:
    """Enqueue the seeds into a new study, once. Under the study's lock; a process killed midway left
    ``seeded: started``, and the next one enqueues the rest (``skip_if_exists``: none twice)."""
    if study.trials and study.user_attrs.get(SEEDED_ATTR) != "started":
        return
    study.set_user_attr(SEEDED_ATTR, "started")
    for genome in seeds:
        study.enqueue_trial(genome, skip_if_exists=True)
    study.set_user_attr(SEEDED_ATTR, "done")


def _check_dev_questions(study: optuna.Study, sweep: ResolvedSweep) -> None:
    """A study's fitness is on one fixed question set: record it (``dev_questions``) and refuse to go
    on with another (tasks, ``dev_size``, seeds or ``pick.val_fraction`` changed)."""
    key = question_key(sweep.tasks, "dev", sweep.data_dir)
    recorded = study.user_attrs.get(DEV_KEY_ATTR)
    name = study.study_name
    if recorded is None:
        if count_trials(study, TrialState.COMPLETE) and any(t.carves_val for t in sweep.tasks):
            raise ConfigError(
                f"study {name!r} was scored on the whole dev split (it predates val splits); continue it "
                "with 'pick: null', or start a new study_name"
            )
        study.set_user_attr(DEV_KEY_ATTR, key)
    elif recorded != key:
        raise ConfigError(
            f"study {name!r}: its trials were scored on other dev questions (tasks, dev_size, seed or "
            "pick.val_fraction changed); use the settings it was started with, or a new study_name"
        )


def run_search(
    sweep: ResolvedSweep,
    executor: Executor | LocalEvaluator,
    *,
    on_trial: TrialCallback | None = None,
    max_consecutive_failures: int = 10,
    allow_test_fitness: bool = False,
) -> optuna.Study:
    """Run trials until the study holds ``n_trials`` complete ones; returns the study.

    Asynchronous: every free worker of ``executor`` gets a new candidate at once (a ``LocalEvaluator``
    is run as the local executor's one worker). A multi-fidelity trial climbs its rungs on the worker
    that merged it; after each rung the study's pruner decides whether it goes on. Trials left RUNNING
    by a sweep process that died are failed and their candidates asked again first. Statistics of this
    session (trials per minute, worker idle fraction) go to ``RUN_DIR/search_stats.json``.
    """
    if isinstance(executor, LocalEvaluator):  # it scores this sweep's tasks, whatever sweep it was made for
        executor = LocalExecutor(sweep, TrialWorker.from_evaluator(executor.for_sweep(sweep)))
    check_held_out(sweep, allow_test_fitness=allow_test_fitness)
    config = sweep.config
    run_dir = config.run_dir()
    run_dir.mkdir(parents=True, exist_ok=True)
    study = open_study(config, [t.name for t in sweep.tasks], workers=executor.num_workers)
    recover_stale_trials(study)
    with ModelDir(sweep.base) as md:
        num_layers = md.num_layers
    space = build_space(sweep, num_layers)
    seeds = seed_genomes(config, space)
    with study_lock(study):  # sweeps started together on a new study: one of them seeds it
        _check_dev_questions(study, sweep)
        _seed_study(study, seeds)
    # recorded once the study accepted this sweep: a refused resume (other dev questions) leaves the run's
    # record, which `evomerge report` reads the tasks and their val split from, as it was
    write_text_atomic(
        run_dir / "sweep.json",
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
        ),
    )
    driver = _Driver(sweep, space, study, executor, on_trial, max_consecutive_failures)
    try:
        driver.run()
    except BaseException:  # stopped (Ctrl-C, SIGTERM from `evomerge sweeps stop`) or failed
        driver.release("the sweep was stopped before this trial finished")
        raise
    finally:
        driver.stop_heartbeat()
        close = getattr(study.sampler, "close", None)
        if close is not None:  # e.g. nevergrad's recast optimizers run non-daemon threads
            close()
        _append_stats(run_dir / "search_stats.json", driver.stats())
    return study


@dataclass
class _Active:
    trial: optuna.Trial
    recipe: dict[str, Any]
    rung: int  # index into the rungs; len(rungs) is the full dev set
    attempts: int = 0
    merge_seconds: float = 0.0
    eval_seconds: float = 0.0
    anchors: dict[str, tuple[tuple[str, ...], Anchors]] | None = None
    """With ``fidelity.anchors``: the anchors this trial is first scored on (None: full dev at once)."""
    pid_recorded: bool = False


class _Driver:
    """The asynchronous ask / evaluate / tell loop of :func:`run_search`."""

    def __init__(
        self,
        sweep: ResolvedSweep,
        space: AnySpace,
        study: optuna.Study,
        executor: Executor,
        on_trial: TrialCallback | None,
        max_consecutive_failures: int,
    ) -> None:
        self.config = sweep.config
        self.space = space
        self.study = study
        self.executor = executor
        self.on_trial = on_trial
        self.max_failures = max_consecutive_failures
        self.distributions = space.distributions()
        self.rungs: tuple[int, ...] = self.config.fidelity.rungs if self.config.fidelity else ()
        self.anchor_k = self.config.fidelity.anchors if self.config.fidelity else None
        self.dev_ids: dict[str, list[str]] = {}
        self.task_weights = {t.name: t.weight for t in sweep.tasks}
        if self.anchor_k is not None:
            lmeval = [t.name for t in sweep.tasks if t.kind == "lmeval"]
            if lmeval:
                raise ConfigError(
                    f"fidelity.anchors: task {lmeval[0]!r} is an lm-eval task, whose questions evomerge "
                    "does not see one by one; use rungs"
                )
            self.dev_ids = {
                t.name: [ex.id for ex in load_split(t, "dev", sweep.data_dir)] for t in sweep.tasks
            }
        self._anchor_fit: tuple[int, dict[str, tuple[tuple[str, ...], Anchors]]] | None = None
        self.slots: dict[int, list[_Active]] = {w: [] for w in range(executor.num_workers)}
        # candidates per worker: the running one, plus `prefetch` queued behind it so the worker never
        # waits for the driver's tell/ask (not with fidelity rungs: a trial's steps stay together)
        staged = bool(self.rungs) or self.anchor_k is not None
        prefetch = sweep.config.executor.prefetch if not staged else 0
        self.depth = 1 + (prefetch if sweep.config.executor.kind == "ray" else 0)
        self.owner = owner_id()
        self.failures = 0
        self.done = count_trials(study, TrialState.COMPLETE)
        self.started = time.time()
        self.spans: dict[int, list[tuple[float, float]]] = {}  # worker pid -> step (start, end)
        self.finished = {"COMPLETE": 0, "PRUNED": 0, "FAIL": 0}
        self.last_recovery = time.monotonic()
        self._heartbeat = Heartbeat(study, lambda: [a.trial for a in self._active()])
        self._scored: dict[str, FrozenTrial] = {}  # recipe key -> the first complete trial with it
        self._scored_seen: set[int] = set()

    def stop_heartbeat(self) -> None:
        self._heartbeat.stop()

    # -- asking ---------------------------------------------------------------------------------
    def _budget_left(self) -> bool:
        """Another trial may start: complete trials + trials running anywhere stay under n_trials."""
        taken = count_trials(self.study, TrialState.COMPLETE, TrialState.RUNNING)
        return taken < self.config.n_trials

    def _ask(self, worker: int) -> None:
        # count and ask under the study's lock: sweep processes sharing the study take slots one at a time
        with study_lock(self.study):
            if not self._budget_left():
                return
            with quiet_heartbeat():
                trial = self.study.ask(self.distributions)
        trial.set_user_attr("owner", self.owner)
        try:
            recipe = self.space.to_recipe(trial.params).to_dict()
        except EvomergeError as err:  # a genome the space cannot turn into a recipe: a failed trial
            self._finish(trial, "FAIL", error=one_line(err))
            return
        trial.set_user_attr("recipe", recipe)
        original = self._scored_before(recipe)
        if original is not None:
            self._finish_duplicate(trial, original)
            return
        a = _Active(trial, recipe, 0)
        self.slots[worker].append(a)
        self._submit(worker, a)

    def _scored_before(self, recipe: dict[str, Any]) -> FrozenTrial | None:
        """The earliest complete trial of the study (any process's) that scored this recipe, if any."""
        for t in self.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
            if t.number in self._scored_seen:
                continue
            self._scored_seen.add(t.number)
            if "recipe" not in t.user_attrs or "scores" not in t.user_attrs:
                continue
            key = recipe_key(t.user_attrs["recipe"])
            if key not in self._scored or t.number < self._scored[key].number:
                self._scored[key] = t
        return self._scored.get(recipe_key(recipe))

    def _finish_duplicate(self, trial: optuna.Trial, original: FrozenTrial) -> None:
        scores = {k: float(v) for k, v in original.user_attrs["scores"].items()}
        mean = float(original.user_attrs["mean"])
        trial.set_user_attr("duplicate_of", original.number)
        trial.set_user_attr("scores", scores)
        trial.set_user_attr("mean", mean)
        self._finish(trial, "COMPLETE", mean=mean, scores=scores)

    def _submit(self, worker: int, a: _Active) -> None:
        questions = self.rungs[a.rung] if a.rung < len(self.rungs) else None
        if a.rung == 0:
            pid = self.executor.pid_of(worker)  # 0 while a replacement worker is still starting
            a.pid_recorded = pid != 0
            if pid:
                a.trial.set_user_attr("worker_pid", pid)
        if self.anchor_k is not None:
            a.anchors = self._anchors() if a.rung == 0 else None
            if a.anchors is None:  # not enough answers to fit anchors yet: the full dev set at once
                a.rung = 1
                self.executor.submit(worker, StepJob(a.trial.number, a.recipe, None, answers=True))
                return
            ids = {task: anchor_ids for task, (anchor_ids, _) in a.anchors.items()}
            self.executor.submit(worker, StepJob(a.trial.number, a.recipe, None, ids=ids))
            return
        self.executor.submit(worker, StepJob(a.trial.number, a.recipe, questions))

    def _anchors(self) -> dict[str, tuple[tuple[str, ...], Anchors]] | None:
        """Anchors fit on the per-question dev answers of the study's complete trials (refit when more
        are known), or None before ``fidelity.n_startup_trials`` (at least 2) of them."""
        assert self.config.fidelity is not None and self.anchor_k is not None
        done = [
            t
            for t in self.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
            if "dev_answers" in t.user_attrs
        ]
        if len(done) < max(2, self.config.fidelity.n_startup_trials):
            return None
        if self._anchor_fit is not None and self._anchor_fit[0] == len(done):
            return self._anchor_fit[1]
        fitted: dict[str, tuple[tuple[str, ...], Anchors]] = {}
        for task, ids in self.dev_ids.items():
            rows = [t.user_attrs["dev_answers"][task] for t in done]
            anchors = fit_anchors(rows, self.anchor_k, seed=self.config.sampler.seed)
            fitted[task] = (tuple(ids[i] for i in anchors.indices), anchors)
        self._anchor_fit = (len(done), fitted)
        return fitted

    def _promotion_bar(self) -> float:
        """The full-dev mean an anchor estimate must reach to be promoted: the median (or the pruner's
        ``percentile``) of the complete trials' dev means."""
        assert self.config.fidelity is not None
        values = sorted(
            float(t.value)
            for t in self.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
            if t.value is not None
        )
        if not values:
            return float("-inf")
        q = 50.0 if self.config.fidelity.pruner == "median" else self.config.fidelity.percentile
        return float(np.percentile(values, q))

    def _estimate(self, a: _Active, answers: dict[str, dict[str, float]]) -> float:
        assert a.anchors is not None
        per_task = {
            task: anchors.estimate([answers[task][qid] for qid in anchor_ids])
            for task, (anchor_ids, anchors) in a.anchors.items()
        }
        return estimate_mean(per_task, self.task_weights)

    def _active(self) -> list[_Active]:
        return [a for queue in self.slots.values() for a in queue]

    def release(self, reason: str) -> list[int]:
        """Fail this process's unfinished trials with ``reason`` and enqueue their candidates again, so
        the study stays exact and the next ``evomerge search`` on it runs them first; returns their
        numbers. Never raises (it runs while the sweep is being stopped)."""
        released: list[int] = []
        for a in self._active():
            try:
                with quiet_heartbeat():
                    a.trial.set_user_attr("error", reason)
                    self.study.tell(a.trial, state=TrialState.FAIL)
                    params = candidate_params(self.study._storage.get_trial(a.trial._trial_id))
                    if params:
                        self.study.enqueue_trial(params, user_attrs={"requeued_from": a.trial.number})
                released.append(a.trial.number)
            except Exception:
                continue
        for queue in self.slots.values():
            queue.clear()
        return released

    # -- the loop -------------------------------------------------------------------------------
    def run(self) -> None:
        while True:
            if time.monotonic() - self.last_recovery > RECOVERY_INTERVAL_S:
                self.last_recovery = time.monotonic()
                recover_stale_trials(self.study)
            # keep every worker busy, and with prefetch a next candidate queued behind its current one
            for depth in range(1, self.depth + 1):
                for worker in range(self.executor.num_workers):
                    if len(self.slots[worker]) < depth and self._budget_left():
                        with _study_write():  # a trial is asked and taken into a slot, or not at all
                            self._ask(worker)
            if not self._active():
                if count_trials(self.study, TrialState.COMPLETE) >= self.config.n_trials:
                    return
                if count_trials(self.study, TrialState.RUNNING) == 0:
                    continue  # e.g. every ask failed at once; ask again
                time.sleep(1.0)  # other processes hold the remaining budget: wait for them
                recover_stale_trials(self.study)
                continue
            worker, result = self.executor.wait()
            with _study_write():  # a result is recorded whole
                self._handle(worker, result)

    def _take(self, worker: int, trial: int) -> _Active:
        queue = self.slots[worker]
        for i, a in enumerate(queue):
            if a.trial.number == trial:
                return queue.pop(i)
        raise RuntimeError(f"no active trial {trial} on worker {worker}")  # pragma: no cover

    def _handle(self, worker: int, result: StepResult | WorkerDied) -> None:
        a = self._take(worker, result.trial)
        if isinstance(result, WorkerDied):
            self.executor.replace(worker, result.generation)
            if a.attempts < self.config.executor.retries:
                a.attempts += 1
                a.rung = 0
                a.trial.set_user_attr("worker_restarts", a.attempts)
                self.slots[worker].append(a)
                self._submit(worker, a)
                return
            self._finish(a.trial, "FAIL", error=f"worker died: {result.message}")
            return
        self.spans.setdefault(result.worker_pid, []).append((result.started, result.finished))
        if not a.pid_recorded and result.worker_pid:
            a.trial.set_user_attr("worker_pid", result.worker_pid)
            a.pid_recorded = True
        if result.error is not None:
            self._finish(a.trial, "FAIL", error=result.error)
            if result.user_error:  # a bad config (missing task data, unreadable model) stops the sweep
                raise ConfigError(result.error.split(": ", 1)[-1])
            return
        assert result.mean is not None
        a.merge_seconds += result.merge_seconds
        a.eval_seconds += result.eval_seconds
        if a.anchors is not None and a.rung == 0:  # scored on the anchors: promote or prune
            assert result.answers is not None
            estimate = self._estimate(a, result.answers)
            a.trial.report(estimate, step=0)
            a.trial.set_user_attr("anchor_estimate", estimate)
            a.trial.set_user_attr("anchor_questions", sum(len(ids) for ids, _ in a.anchors.values()))
            if estimate < self._promotion_bar():
                a.trial.set_user_attr("pruned_at", "anchors")
                self._timings(a)
                self._finish(a.trial, "PRUNED", mean=estimate, scores=result.scores)
                return
            a.rung = 1
            self.slots[worker].insert(0, a)  # the worker holds its weights and the anchors' answers
            self._submit(worker, a)
            return
        if a.rung < len(self.rungs):
            rung = self.rungs[a.rung]
            a.trial.report(result.mean, step=rung)
            a.trial.set_user_attr(f"rung_{rung}", result.scores)
            if a.trial.should_prune():
                a.trial.set_user_attr("pruned_at", rung)
                self._timings(a)
                self._finish(a.trial, "PRUNED", mean=result.mean, scores=result.scores)
                return
            a.rung += 1
            self.slots[worker].insert(0, a)  # the worker holds its weights: it goes on with it
            self._submit(worker, a)
            return
        self._timings(a)
        if self.anchor_k is not None and result.answers is not None:
            # this trial's answers, in each task's dev order: the material later anchors are fit on
            a.trial.set_user_attr(
                "dev_answers",
                {task: [result.answers[task][qid] for qid in ids] for task, ids in self.dev_ids.items()},
            )
        a.trial.set_user_attr("scores", result.scores)
        a.trial.set_user_attr("mean", result.mean)
        self._finish(a.trial, "COMPLETE", mean=result.mean, scores=result.scores)

    def _timings(self, a: _Active) -> None:
        a.trial.set_user_attr("merge_seconds", round(a.merge_seconds, 4))
        a.trial.set_user_attr("eval_seconds", round(a.eval_seconds, 4))

    def _finish(
        self,
        trial: optuna.Trial,
        state: str,
        *,
        mean: float | None = None,
        scores: dict[str, float] | None = None,
        error: str | None = None,
    ) -> None:
        try:
            with quiet_heartbeat():
                if state == "COMPLETE":
                    assert scores is not None and mean is not None
                    multi = self.config.multi_objective
                    values = [scores[t] for t in self.space_tasks] if multi else mean
                    self.study.tell(trial, values)
                else:
                    if error is not None:
                        trial.set_user_attr("error", error)
                    self.study.tell(trial, state=TrialState.PRUNED if state == "PRUNED" else TrialState.FAIL)
        except (RuntimeError, ValueError) as err:
            if "finished" not in str(err).lower() and "already" not in str(err).lower():
                raise
            state = "FAIL"  # another process failed it as stale meanwhile; it was asked again there
            error = "failed as stale by another sweep process"
        self.finished[state] += 1
        if state == "COMPLETE":
            self.done += 1
            self.failures = 0
        elif state == "PRUNED":  # a cheap early stop, not a failure; the budget counts complete trials
            self.failures = 0
        else:
            self.failures += 1
        if self.on_trial is not None:
            self.on_trial(
                count_trials(self.study, TrialState.COMPLETE),
                self.config.n_trials,
                TrialOutcome(trial.number, state, mean, scores or {}, error),
            )
        if state == "FAIL" and self.failures >= self.max_failures:
            raise EvomergeError(
                f"sweep stopped after {self.failures} failed trials in a row; last error: {error}"
            )

    @property
    def space_tasks(self) -> list[str]:
        return list(self.study.metric_names or [])

    def stats(self) -> dict[str, Any]:
        """This session's trials per minute and the workers' idle fraction between their steps (while
        trials remained: the gaps between one step's end and the next step's start on each worker)."""
        wall = time.time() - self.started
        busy = sum(end - start for spans in self.spans.values() for start, end in spans)
        span = 0.0
        for spans in self.spans.values():
            spans.sort()
            span += spans[-1][1] - spans[0][0]
        return {
            "started": self.started,
            "wall_seconds": round(wall, 3),
            "workers": self.executor.num_workers,
            "executor": self.config.executor.kind,
            "complete": self.finished["COMPLETE"],
            "pruned": self.finished["PRUNED"],
            "failed": self.finished["FAIL"],
            "trials_per_minute": round(60 * sum(self.finished.values()) / wall, 3) if wall > 0 else None,
            "busy_seconds": round(busy, 3),
            "idle_fraction": round(1 - busy / span, 4) if span > 0 else None,
        }


def _append_stats(path: Path, stats: dict[str, Any]) -> None:
    sessions: list[Any] = []
    if path.exists():
        try:
            sessions = json.loads(path.read_text())
        except json.JSONDecodeError:
            sessions = []
    sessions.append(stats)
    write_text_atomic(path, json.dumps(sessions, indent=2))


_CRITICAL = [0]
"""How deep the main thread is in a study write (see :func:`_study_write`)."""
_DEFERRED: list[BaseException] = []


@contextlib.contextmanager
def _study_write() -> Iterator[None]:
    """A stop requested meanwhile (:func:`stop_soon`) waits until this write is whole: a trial is asked
    and taken into a slot, or a result recorded, or neither."""
    _CRITICAL[0] += 1
    try:
        yield
    finally:
        _CRITICAL[0] -= 1
    if _CRITICAL[0] == 0 and _DEFERRED:
        raise _DEFERRED.pop()


def stop_soon(stop: BaseException) -> None:
    """For a signal handler in the main thread: raise ``stop`` now, or, inside a study write, as soon as
    that write is whole (the loop then fails and requeues its unfinished trials)."""
    if threading.current_thread() is threading.main_thread() and _CRITICAL[0]:
        _DEFERRED[:] = [stop]
        return
    raise stop
