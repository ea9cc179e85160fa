"""Check a sweep's task files before anything is created: every file exists, parses, is not empty and has
the fields its scoring kind reads (the checks of :func:`~evomerge.evaluators.tasks.load_split`, run on
every split a task names), so a bad task file is reported at once instead of by the first trial."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from evomerge.errors import ConfigError
from evomerge.evaluators.tasks import TaskConfig, load_fewshot, load_split

__all__ = ["check_task_files"]


def check_task_files(tasks: Sequence[TaskConfig], base_dir: str | Path, *, where: str = "tasks") -> None:
    """Read every data file of every task (relative paths against ``base_dir``); ConfigError (one line
    naming the task and the file) for the first problem. ``lmeval`` tasks are checked for their
    ``include_path`` only (their data is lm-eval's)."""
    for i, task in enumerate(tasks):
        try:
            _check_task(task, base_dir)
        except ConfigError as err:
            message = str(err)
            prefix = f"{where}[{i}]"
            raise ConfigError(message if message.startswith(prefix) else f"{prefix}: {message}") from None


def _check_task(task: TaskConfig, base_dir: str | Path) -> None:
    if task.lmeval is not None:
        include = task.lmeval.include_path
        if include is not None:
            path = Path(include).expanduser()
            path = path if path.is_absolute() else Path(base_dir) / path
            if not path.is_dir():
                raise ConfigError(f"task {task.name!r}: lmeval.include_path {path} is not a directory")
        return
    for split in task.data_files:  # dev, test (val): exists, parses, not empty, fields, subset sizes
        if split != "train":
            load_split(task, split, base_dir)
    if "train" in task.data_files:
        # the whole train file is read (and checked) for one few-shot example, when none are asked for
        load_fewshot(task if task.fewshot else task.model_copy(update={"fewshot": 1}), base_dir)
