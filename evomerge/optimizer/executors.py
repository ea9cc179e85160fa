"""Where candidates are evaluated: in this process, or on a pool of Ray actors.

Both executors run :class:`TrialWorker` s. A worker holds what a candidate needs resident (the base and
the task vectors in an :class:`~evomerge.merging.InMemoryMerger`, one live model in a backend) and runs
one *step* of a trial at a time: merge the trial's recipe (the first time it sees the trial) and score
the merged model on the dev split, either on a multi-fidelity rung (the first ``questions`` of each
task) or on the whole set. Between the steps of one trial the worker keeps the merged weights and the
answers already scored, so climbing rungs scores every question once.

The search loop (:func:`evomerge.optimizer.loop.run_search`) hands steps to free workers and waits for
the next result from any of them: with N Ray workers, a new candidate is asked the moment one is free.
A step never raises for a bad candidate: NaN weights, out of memory or an exception become a
:class:`StepResult` with ``error`` set. A worker whose process dies surfaces as :class:`WorkerDied`, and
the executor replaces it.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Protocol

from evomerge.errors import ConfigError, UserError, one_line
from evomerge.evaluators import QuestionRecord
from evomerge.optimizer.evaluator import LocalEvaluator
from evomerge.optimizer.sweep import ResolvedSweep


@dataclass(frozen=True)
class StepJob:
    """One step of one trial: score ``recipe`` (a ``MergeRecipe.to_dict()``) on ``questions`` per task
    of dev (None: all of them)."""

    trial: int
    recipe: dict[str, Any]
    questions: int | None
    ids: dict[str, tuple[str, ...]] | None = None
    """Anchor questions: only these dev questions of the tasks named (the trial goes on afterwards)."""
    answers: bool = False
    """Return each scored dev question's score (``StepResult.answers``)."""


@dataclass(frozen=True)
class StepResult:
    trial: int
    scores: dict[str, float] = field(default_factory=dict)
    mean: float | None = None
    merge_seconds: float = 0.0
    eval_seconds: float = 0.0
    error: str | None = None
    user_error: bool = False
    """The error is the user's (a missing data file, an unreadable model): the sweep stops."""
    started: float = 0.0
    finished: float = 0.0
    """Wall-clock (``time.time()``) start and end of the step on the worker, for idle-time accounting."""
    worker_pid: int = 0
    answers: dict[str, dict[str, float]] | None = None
    """With ``StepJob.answers`` or ``ids``: task -> question id -> score, for every dev question this
    trial's model has answered so far."""


@dataclass(frozen=True)
class WorkerDied:
    """The worker's process died during the step (killed, out of host memory, a segfault)."""

    trial: int
    message: str
    generation: int = 0
    """Which incarnation of the worker died (steps queued on it all report the same one)."""


class TrialWorker:
    """One evaluator and the state of the trial it is working on (see the module docstring)."""

    def __init__(self, sweep: ResolvedSweep) -> None:
        self.evaluator = LocalEvaluator(sweep)
        self._trial: int | None = None
        self._state: Any = None
        self._memo: dict[tuple[str, str, str], QuestionRecord] = {}

    @classmethod
    def from_evaluator(cls, evaluator: LocalEvaluator) -> TrialWorker:
        """A worker around an existing :class:`~evomerge.optimizer.evaluator.LocalEvaluator`."""
        worker = cls.__new__(cls)
        worker.evaluator = evaluator
        worker._trial, worker._state, worker._memo = None, None, {}
        return worker

    def pid(self) -> int:
        return os.getpid()

    def run_step(self, job: StepJob) -> StepResult:
        from evomerge.merging import MergeRecipe

        started = time.time()
        merge_s = 0.0
        t0 = time.perf_counter()
        try:
            if job.trial != self._trial:
                self._trial, self._state, self._memo = None, None, {}
                recipe = MergeRecipe.model_validate(job.recipe)
                self._state = self.evaluator.merger.merge(recipe)
                self.evaluator.backend.load_state_dict(self._state)
                self._trial = job.trial
                merge_s = time.perf_counter() - t0
            t1 = time.perf_counter()
            result = self.evaluator.score_state(
                self._state, "dev", questions=job.questions, memo=self._memo, loaded=True, ids=job.ids
            )
            answers: dict[str, dict[str, float]] | None = None
            if job.answers or job.ids is not None:
                answers = {}
                for (task, split, qid), record in self._memo.items():
                    if split == "dev":
                        answers.setdefault(task, {})[qid] = float(record.score)
            if job.questions is None and job.ids is None:  # the trial is over: drop its weights
                self._trial, self._state, self._memo = None, None, {}
            return StepResult(
                job.trial,
                dict(result.scores),
                float(result.mean),
                merge_s,
                time.perf_counter() - t1,
                started=started,
                finished=time.time(),
                worker_pid=os.getpid(),
                answers=answers,
            )
        except Exception as err:  # failures are data: the trial fails, the sweep goes on
            self._trial, self._state, self._memo = None, None, {}
            return StepResult(
                job.trial,
                error=one_line(err),
                user_error=isinstance(err, UserError),
                started=started,
                finished=time.time(),
                worker_pid=os.getpid(),
            )


class Executor(Protocol):
    """A pool of workers; the search loop gives each free worker a step and waits for any result."""

    num_workers: int

    def submit(self, worker: int, job: StepJob) -> None: ...

    def pid_of(self, worker: int) -> int: ...

    def wait(self) -> tuple[int, StepResult | WorkerDied]: ...

    def replace(self, worker: int, generation: int) -> None: ...

    def close(self) -> None: ...


class LocalExecutor:
    """One worker in this process; a step runs when the loop waits for it."""

    num_workers = 1

    def __init__(self, sweep: ResolvedSweep, worker: TrialWorker | None = None) -> None:
        self.worker = worker or TrialWorker(sweep)
        self._queue: deque[tuple[int, StepJob]] = deque()

    @property
    def evaluator(self) -> Any:
        return self.worker.evaluator

    def submit(self, worker: int, job: StepJob) -> None:
        self._queue.append((worker, job))

    def pid_of(self, worker: int) -> int:
        return os.getpid()

    def wait(self) -> tuple[int, StepResult | WorkerDied]:
        worker, job = self._queue.popleft()
        return worker, self.worker.run_step(job)

    def replace(self, worker: int, generation: int) -> None:  # pragma: no cover - cannot die alone
        raise RuntimeError("the local worker cannot be replaced")

    def close(self) -> None:
        self._queue.clear()


class RayExecutor:
    """``num_workers`` Ray actors, each a :class:`TrialWorker` pinned to ``num_cpus`` / ``num_gpus``.

    ``ray.init()`` starts a local Ray unless Ray is already initialised or ``address`` is given
    (``auto`` joins a running cluster). Actors get the sweep (paths, tasks, config); models must be
    readable at the same paths on every node (a shared file system or the same local cache).
    """

    def __init__(
        self,
        sweep: ResolvedSweep,
        *,
        num_workers: int,
        num_cpus: float = 1.0,
        num_gpus: float = 0.0,
        address: str | None = None,
        ray_init: dict[str, Any] | None = None,
    ) -> None:
        try:
            import ray
        except ImportError:
            raise ConfigError("the ray executor needs Ray: pip install 'evomerge[ray]'") from None
        self._ray = ray
        self._owns_ray = False
        if not ray.is_initialized():
            kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False}
            if address is not None:
                kwargs["address"] = address
            else:  # a local Ray: steps pass only configs and scores, a small object store is plenty
                kwargs["object_store_memory"] = 256 * 2**20
            kwargs.update(ray_init or {})
            try:
                ray.init(**kwargs)
            except ConnectionError as err:
                raise ConfigError(f"cannot join the Ray cluster at {address!r}: {one_line(err)}") from None
            self._owns_ray = True
        self.sweep = sweep
        self.num_workers = num_workers
        # the actor's own torch threads follow its CPU share (at least one)
        self._actor_cls = ray.remote(num_cpus=num_cpus, num_gpus=num_gpus, max_restarts=0)(_RayTrialWorker)
        self._threads = max(1, int(num_cpus))
        self._actors: list[Any] = [self._start() for _ in range(num_workers)]
        self._pending: dict[Any, tuple[int, int, int]] = {}  # ObjectRef -> (worker, trial, generation)
        self._generation = [0] * num_workers
        self.replacement_delay_s = 0.0
        """Seconds a replacement worker waits before it loads the models (a chaos knob for tests)."""
        # wait until every actor has loaded its models, so start-up is not counted as idle time
        self._pids = [int(p) for p in ray.get([a.pid.remote() for a in self._actors])]
        self._pid_refs: list[Any] = [None] * num_workers

    def _start(self, delay_s: float = 0.0) -> Any:
        return self._actor_cls.remote(self.sweep, self._threads, delay_s)

    def pid_of(self, worker: int) -> int:
        """The worker's process id; 0 while a replacement is still starting (never waits for it)."""
        ref = self._pid_refs[worker]
        if ref is not None:
            ready, _ = self._ray.wait([ref], timeout=0)
            if ready:
                with contextlib.suppress(self._ray.exceptions.RayError):
                    self._pids[worker] = int(self._ray.get(ref))
                self._pid_refs[worker] = None
        return self._pids[worker]

    def submit(self, worker: int, job: StepJob) -> None:
        ref = self._actors[worker].run_step.remote(job)
        self._pending[ref] = (worker, job.trial, self._generation[worker])

    def wait(self) -> tuple[int, StepResult | WorkerDied]:
        ray = self._ray
        ready, _ = ray.wait(list(self._pending), num_returns=1)
        ref = ready[0]
        worker, trial, generation = self._pending.pop(ref)
        try:
            result: StepResult = ray.get(ref)
        except ray.exceptions.RayError as err:  # the actor died (killed, out of memory, a crash)
            return worker, WorkerDied(trial, one_line(err), generation)
        if generation == self._generation[worker] and result.worker_pid:
            self._pids[worker] = result.worker_pid
            self._pid_refs[worker] = None
        return worker, result

    def replace(self, worker: int, generation: int) -> None:
        """Start a new actor for ``worker`` unless the dead ``generation`` was already replaced. Does not
        wait for it: it loads the base and task vectors in the background while the driver goes on
        recording the other workers' results; steps submitted to it meanwhile queue in Ray until it is
        ready."""
        if generation != self._generation[worker]:
            return
        self._generation[worker] += 1
        old = self._actors[worker]
        with contextlib.suppress(Exception):  # already gone
            self._ray.kill(old, no_restart=True)
        self._actors[worker] = self._start(self.replacement_delay_s)
        self._pids[worker] = 0
        self._pid_refs[worker] = self._actors[worker].pid.remote()

    def close(self) -> None:
        for actor in self._actors:
            with contextlib.suppress(Exception):
                self._ray.kill(actor, no_restart=True)
        self._actors = []
        self._pending.clear()
        if self._owns_ray:
            self._ray.shutdown()


class _RayTrialWorker(TrialWorker):
    def __init__(self, sweep: ResolvedSweep, threads: int, delay_s: float = 0.0) -> None:
        import torch

        if delay_s > 0:
            time.sleep(delay_s)
        if sweep.config.backend.threads is None:
            torch.set_num_threads(threads)
        super().__init__(sweep)

    def node(self) -> str:
        """The id of the Ray node this worker runs on."""
        import ray

        return str(ray.get_runtime_context().get_node_id())


def make_executor(sweep: ResolvedSweep, *, address: str | None = None) -> LocalExecutor | RayExecutor:
    cfg = sweep.config.executor
    if cfg.kind == "ray":
        return RayExecutor(
            sweep,
            num_workers=cfg.workers,
            num_cpus=cfg.num_cpus,
            num_gpus=cfg.num_gpus,
            address=address if address is not None else cfg.address,
        )
    return LocalExecutor(sweep)
