"""Evaluate one live model on a set of tasks.

:func:`evaluate` loads each task's fixed question set, builds the prompts, generates greedy completions
with a backend (anything with :class:`Generator`'s ``generate``, e.g. :class:`HFBackend`), and scores
every question. Tasks that share ``max_new_tokens`` and ``stop`` are generated together, so batches
stay full.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Collection, Mapping, MutableMapping, Sequence
from pathlib import Path
from typing import Protocol

from evomerge.errors import ConfigError, EvaluationError
from evomerge.evaluators.lmeval_backend import run_lmeval
from evomerge.evaluators.results import EvalResult, QuestionRecord, TaskResult
from evomerge.evaluators.scoring import extract_answer, score
from evomerge.evaluators.tasks import Example, Split, TaskConfig, load_fewshot, load_split

__all__ = ["EvalResult", "Generator", "ProgressFn", "QuestionRecord", "TaskResult", "evaluate"]

ProgressFn = Callable[[int, int], None]
"""Called as ``progress(done, total)`` with the number of questions generated so far."""


class Generator(Protocol):
    """What :func:`evaluate` needs from a backend."""

    def generate(
        self,
        prompts: list[str],
        *,
        max_new_tokens: int,
        stop: list[str],
        progress: Callable[[int], None] | None = None,
    ) -> list[str]: ...


def _chat_prompts(backend: Generator, task: TaskConfig, prompts: list[str]) -> list[str]:
    chat = getattr(backend, "chat_prompt", None)
    if chat is None:
        raise ConfigError(f"task {task.name!r} asks for a chat template but this backend cannot apply one")
    try:
        return [chat(p) for p in prompts]
    except ConfigError as exc:
        raise ConfigError(f"task {task.name!r}: {exc}") from None


def evaluate(
    backend: Generator,
    tasks: Sequence[TaskConfig],
    split: Split,
    base_dir: str | Path,
    *,
    progress: ProgressFn | None = None,
    limit: int | None = None,
    memo: MutableMapping[tuple[str, str, str], QuestionRecord] | None = None,
    ids: Mapping[str, Collection[str]] | None = None,
) -> EvalResult:
    """Generate and score every question of ``split`` of every task with ``backend``.

    ``ids`` keeps, for each task it names, only the questions with those ids (anchor questions); tasks
    it does not name are scored whole.

    ``limit`` keeps each task's first ``limit`` questions of its nested order (a multi-fidelity rung,
    see :func:`load_split`). ``memo`` maps ``(task name, split, question id)`` to records already scored on
    *this same model*: those questions are not generated again, and new records are added to it, so
    climbing rungs and then the full set scores every question once.

    Raises ConfigError for no tasks, duplicate task names or bad task data (see :func:`load_split`),
    and EvaluationError when the backend returns the wrong number of completions. A task's ``seconds``
    is its share (by question count) of the time spent generating its group, plus its own scoring time.
    """
    if not tasks:
        raise ConfigError("no tasks to evaluate")
    names = [t.name for t in tasks]
    all_names = list(names)
    weights = {t.name: t.weight for t in tasks}
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ConfigError(f"duplicate task name(s): {', '.join(duplicates)}")

    lmeval_results: dict[str, TaskResult] = {}
    for task in tasks:
        if task.kind == "lmeval":
            if split == "val":  # lm-eval names a dev and a test task only
                raise ConfigError(f"task {task.name!r}: an lmeval task has no val split")

            size = task.size(split)
            if limit is not None and (size is None or limit < size):  # lm-eval's own limit: no reuse
                task = task.model_copy(update={f"{split}_size": limit})
            lmeval_results[task.name] = run_lmeval(backend, task, split, base_dir)
    tasks = [t for t in tasks if t.kind != "lmeval"]
    memo = {} if memo is None else memo
    examples: dict[str, list[Example]] = {}
    prompts: dict[str, list[str]] = {}
    seconds: dict[str, float] = {}
    for task in tasks:
        t0 = time.perf_counter()
        examples[task.name] = load_split(task, split, base_dir, limit=limit)
        if ids is not None and task.name in ids:
            keep = set(ids[task.name])
            examples[task.name] = [ex for ex in examples[task.name] if ex.id in keep]
        shots = load_fewshot(task, base_dir)
        prompts[task.name] = [task.prompt(ex.question, shots) for ex in examples[task.name]]
        if task.chat:
            prompts[task.name] = _chat_prompts(backend, task, prompts[task.name])
        seconds[task.name] = time.perf_counter() - t0
    # only the questions this model has not answered yet are generated
    todo = {
        task.name: [i for i, ex in enumerate(examples[task.name]) if (task.name, split, ex.id) not in memo]
        for task in tasks
    }

    groups: dict[tuple[int, tuple[str, ...]], list[TaskConfig]] = {}
    for task in tasks:
        groups.setdefault((task.max_new_tokens, tuple(task.stop)), []).append(task)

    total = sum(len(t) for t in todo.values())
    if not tasks:
        return EvalResult(split=split, tasks={n: lmeval_results[n] for n in all_names}, weights=weights)
    done = 0

    def advance(k: int) -> None:
        nonlocal done
        done += k
        if progress is not None:
            progress(done, total)

    if progress is not None:
        progress(0, total)
    completions: dict[str, list[str]] = {}
    for (max_new_tokens, stop), members in groups.items():
        batch = [prompts[task.name][i] for task in members for i in todo[task.name]]
        if not batch:
            continue
        t0 = time.perf_counter()
        outputs = backend.generate(batch, max_new_tokens=max_new_tokens, stop=list(stop), progress=advance)
        elapsed = time.perf_counter() - t0
        if len(outputs) != len(batch):
            raise EvaluationError(f"the backend returned {len(outputs)} completions for {len(batch)} prompts")
        offset = 0
        for task in members:
            k = len(todo[task.name])
            completions[task.name] = outputs[offset : offset + k]
            offset += k
            seconds[task.name] += elapsed * k / len(batch)

    results: dict[str, TaskResult] = {}
    for task in tasks:
        t0 = time.perf_counter()
        for i, completion in zip(todo[task.name], completions.get(task.name, []), strict=True):
            ex = examples[task.name][i]
            memo[(task.name, split, ex.id)] = QuestionRecord(
                id=ex.id,
                prompt=prompts[task.name][i],
                completion=completion,
                reference=ex.answer,
                extracted=extract_answer(task.kind, completion),
                score=score(task.kind, completion, ex.answer),
            )
        records = [memo[(task.name, split, ex.id)] for ex in examples[task.name]]
        mean = sum(r.score for r in records) / len(records)
        seconds[task.name] += time.perf_counter() - t0
        results[task.name] = TaskResult(
            task=task.name,
            split=split,
            score=mean,
            n=len(records),
            records=records,
            seconds=seconds[task.name],
        )
    results = {name: lmeval_results.get(name) or results[name] for name in all_names}
    return EvalResult(split=split, tasks=results, weights=weights)
