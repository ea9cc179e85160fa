"""A sweep made concrete: its models and tasks resolved (a ``zoo:`` built), the pick's val split held back,
and the checks that its fitness never reads held-out questions.

:class:`ResolvedSweep` is what every part of a search works from (the loop, the executors' workers, the
pick, the report); ``sweep.json`` in the run directory records it, and :func:`resolved_from_run` reads it
back, so a later report scores the same questions.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from evomerge.config_util import validate_model
from evomerge.errors import ConfigError
from evomerge.evaluators import TaskConfig
from evomerge.evaluators.tasks import Split, load_split, resolve_path
from evomerge.optimizer.config import SweepConfig

__all__ = [
    "ResolvedSweep",
    "check_held_out",
    "question_key",
    "resolve_sweep",
    "resolved_from_run",
    "with_val",
]


@dataclass(frozen=True)
class ResolvedSweep:
    """A sweep config with its models and tasks made concrete (a zoo resolved to paths)."""

    config: SweepConfig
    base: str
    experts: tuple[str, ...]
    tasks: tuple[TaskConfig, ...]
    data_dir: str


def resolve_sweep(
    config: SweepConfig, *, zoo_cache: Path | None = None, zoo_progress: Any = None
) -> ResolvedSweep:
    """Fill in models and tasks; a ``zoo`` sweep builds its zoo first if it is not cached."""
    data_dir = config.data_dir or "."
    if config.zoo is not None:
        from evomerge.zoo import build_zoo  # only a zoo sweep needs the zoo's builders

        zoo = build_zoo(config.zoo, zoo_cache, progress=zoo_progress)
        experts = tuple(zoo.experts.values())
        if config.tasks:  # the sweep's own tasks: data paths relative to the sweep YAML
            return ResolvedSweep(config, zoo.base, experts, with_val(config, config.tasks), data_dir)
        return ResolvedSweep(config, zoo.base, experts, with_val(config, zoo.tasks), zoo.root)
    assert config.models is not None  # the config validator guarantees it
    root = Path(data_dir)  # joining an absolute path keeps it as it is
    base = str((root / config.models.base).resolve())
    experts = tuple(str((root / e).resolve()) for e in config.models.experts)
    return ResolvedSweep(config, base, experts, with_val(config, config.tasks), data_dir)


def with_val(config: SweepConfig, tasks: Sequence[TaskConfig]) -> tuple[TaskConfig, ...]:
    """The tasks with the pick's val split: a task without a ``val`` file or its own ``val_fraction``
    holds ``pick.val_fraction`` of its dev questions back (lmeval tasks have no val split). The resolved
    tasks are what ``sweep.json`` records, so a run's report reads the same split later."""
    if config.pick is None or not config.pick.enabled:
        return tuple(tasks)
    fraction = config.pick.val_fraction
    return tuple(
        t
        if t.kind == "lmeval" or "val" in t.data_files or "dev" not in t.data_files or t.val_fraction
        else t.model_copy(update={"val_fraction": fraction})
        for t in tasks
    )


def question_key(tasks: Sequence[TaskConfig], split: Split, data_dir: str) -> str:
    """A digest naming the questions ``tasks`` ask on ``split`` (task names, weights and question ids,
    or an lmeval task's spec): two runs scored the same questions when their keys are equal."""
    parts: list[Any] = []
    for task in tasks:
        if task.kind == "lmeval":
            assert task.lmeval is not None
            parts.append([task.name, task.weight, task.lmeval.model_dump(mode="json"), task.size(split)])
        elif task.has_split(split):
            ids = [ex.id for ex in load_split(task, split, data_dir)]
            parts.append([task.name, task.weight, ids])
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:16]


def resolved_from_run(data: Mapping[str, Any]) -> ResolvedSweep:
    """The sweep a run directory's ``sweep.json`` records (models and tasks as they were resolved)."""
    config = validate_model(SweepConfig, data["config"], where="sweep.json: config")
    tasks = tuple(
        validate_model(TaskConfig, t, where=f"sweep.json: tasks[{i}]") for i, t in enumerate(data["tasks"])
    )
    return ResolvedSweep(config, data["base"], tuple(data["experts"]), tasks, data["data_dir"])


def check_held_out(sweep: ResolvedSweep, *, allow_test_fitness: bool = False) -> None:
    """Refuse a sweep whose fitness (dev split) would read a file that some task uses as its test split,
    or whose ``val`` file (the pick's held-back questions) is some task's dev or test file.

    One file named for both splits of the *same* task is fine: it is split in two disjoint halves. Any
    other overlap (a dev file that is another task's test file, or the same content under another
    name) puts held-out questions into the fitness; ``allow_test_fitness`` accepts it on purpose. A val
    file the search saw (a dev file) or one that is a test file is always refused.
    """
    val_files: dict[str, tuple[str, str]] = {}
    for task in sweep.tasks:
        if task.kind != "lmeval" and "val" in task.data_files:
            path = resolve_path(task, "val", sweep.data_dir)
            if path.is_file():
                val_files[_digest(path)] = (task.name, str(path))
    for task in sweep.tasks:
        for split in ("dev", "test"):
            if task.kind == "lmeval" or split not in task.data_files:
                continue
            path = resolve_path(task, split, sweep.data_dir)
            owner = val_files.get(_digest(path)) if path.is_file() else None
            if owner is not None:
                raise ConfigError(
                    f"task {owner[0]!r}: its val file {owner[1]} is the {split} split of task {task.name!r} "
                    f"({path}); val questions must be unseen by the search and apart from test"
                )
    if allow_test_fitness:
        return
    test_files: dict[str, tuple[str, str]] = {}  # content digest -> (task, path)
    for task in sweep.tasks:
        if task.kind == "lmeval" or "test" not in task.data_files:
            continue
        path = resolve_path(task, "test", sweep.data_dir)
        if path.is_file():
            test_files[_digest(path)] = (task.name, str(path))
    for task in sweep.tasks:
        if task.kind == "lmeval" or "dev" not in task.data_files:
            continue
        path = resolve_path(task, "dev", sweep.data_dir)
        if not path.is_file():
            continue
        owner = test_files.get(_digest(path))
        if owner is None:
            continue
        same_task_split = owner[0] == task.name and task.data_files.get("dev") == task.data_files.get("test")
        if not same_task_split:
            raise ConfigError(
                f"task {task.name!r}: its dev file {path} is the test split of task {owner[0]!r} "
                f"({owner[1]}); fitness must not see test questions (--allow-test-fitness overrides)"
            )


def _digest(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
