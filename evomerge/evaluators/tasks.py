"""Evaluation tasks: their configuration and their fixed dev/test question sets.

A task is a JSONL file per split; each line is ``{"id": str, "question": str, "answer": str}``. The
fitness of a candidate only ever uses the ``dev`` split; ``test`` is for reports. :func:`load_split`
returns a fixed subset for a given seed, so every candidate of a search sees the same questions.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from evomerge.errors import ConfigError
from evomerge.evaluators.scoring import KINDS, check_reference

__all__ = ["Example", "Split", "TaskConfig", "load_split"]

Split = Literal["dev", "test"]


class TaskConfig(BaseModel):
    """One evaluation task.

    ``data_files`` maps a split to a JSONL path (relative paths are resolved against the ``base_dir``
    given to :func:`load_split`). ``dev_size`` / ``test_size`` pick a fixed subset of that many
    questions for ``seed`` (None: all of them). ``weight`` is the task's weight in the mean fitness.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = Field(min_length=1)
    kind: str = "exact_match"
    data_files: dict[Split, str]
    prompt_template: str = "Q: {question}\nA:"
    max_new_tokens: int = Field(default=16, ge=1)
    stop: list[str] = Field(default_factory=lambda: ["\n"])
    dev_size: int | None = Field(default=None, ge=1)
    test_size: int | None = Field(default=None, ge=1)
    seed: int = 0
    weight: float = Field(default=1.0, gt=0.0, allow_inf_nan=False)

    @field_validator("kind")
    @classmethod
    def _known_kind(cls, value: str) -> str:
        if value not in KINDS:
            raise ValueError(f"unknown scoring kind {value!r} (known: {', '.join(sorted(KINDS))})")
        return value

    @field_validator("prompt_template")
    @classmethod
    def _template_has_question(cls, value: str) -> str:
        if "{question}" not in value:
            raise ValueError("prompt_template must contain '{question}'")
        try:
            value.format(question="")
        except (KeyError, IndexError, ValueError) as exc:
            raise ValueError(
                f"prompt_template may only use the field {{question}} (write '{{{{' for a brace): {exc}"
            ) from None
        return value

    @field_validator("stop")
    @classmethod
    def _stops_not_empty(cls, value: list[str]) -> list[str]:
        if any(s == "" for s in value):
            raise ValueError("stop strings must not be empty")
        return value

    @model_validator(mode="after")
    def _has_files(self) -> TaskConfig:
        if not self.data_files:
            raise ValueError("data_files must name at least one split ('dev' or 'test')")
        return self

    def size(self, split: Split) -> int | None:
        """The subset size asked for ``split`` (None: all questions)."""
        return self.dev_size if split == "dev" else self.test_size

    def prompt(self, question: str) -> str:
        """The prompt for ``question``."""
        return self.prompt_template.format(question=question)


@dataclass(frozen=True)
class Example:
    """One question of a task split."""

    id: str
    question: str
    answer: str


def _field(task: str, path: Path, lineno: int, record: dict[str, object], key: str) -> str:
    if key not in record:
        raise ConfigError(f"task {task!r}: {path} line {lineno}: missing field {key!r}")
    value = record[key]
    # ids and answers are often numbers in JSON; accept them as their text.
    if key != "question" and isinstance(value, int | float) and not isinstance(value, bool):
        return str(value)
    if not isinstance(value, str):
        raise ConfigError(
            f"task {task!r}: {path} line {lineno}: field {key!r} must be a string, got {type(value).__name__}"
        )
    return value


def _read_jsonl(task: TaskConfig, path: Path) -> list[Example]:
    name = task.name
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"task {name!r}: data file not found: {path}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"task {name!r}: cannot read data file {path}: {exc}") from None
    examples: list[Example] = []
    seen: dict[str, int] = {}
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"task {name!r}: {path} line {lineno}: invalid JSON: {exc.msg}") from None
        if not isinstance(record, dict):
            raise ConfigError(
                f"task {name!r}: {path} line {lineno}: expected a JSON object, got {type(record).__name__}"
            )
        example = Example(
            id=_field(name, path, lineno, record, "id"),
            question=_field(name, path, lineno, record, "question"),
            answer=_field(name, path, lineno, record, "answer"),
        )
        if example.id in seen:
            raise ConfigError(
                f"task {name!r}: {path} line {lineno}: duplicate id {example.id!r} "
                f"(first on line {seen[example.id]})"
            )
        seen[example.id] = lineno
        try:
            check_reference(task.kind, example.answer)
        except ValueError as exc:
            raise ConfigError(f"task {name!r}: {path} line {lineno}: {exc} (kind {task.kind!r})") from None
        examples.append(example)
    if not examples:
        raise ConfigError(f"task {name!r}: data file {path} has no examples")
    return examples


def resolve_path(task: TaskConfig, split: Split, base_dir: str | Path) -> Path:
    """The data file of ``split`` of ``task``, resolved against ``base_dir``."""
    if split not in task.data_files:
        raise ConfigError(f"task {task.name!r}: no data file for split {split!r}")
    path = Path(task.data_files[split]).expanduser()
    return path if path.is_absolute() else Path(base_dir) / path


def load_split(task: TaskConfig, split: Split, base_dir: str | Path) -> list[Example]:
    """The fixed question set of ``split`` of ``task``.

    With a subset size ``n`` (``dev_size`` / ``test_size``), ``n`` questions are drawn with
    ``random.Random(task.seed)`` and returned in file order, so the same seed always gives the same
    subset. Raises ConfigError for a missing file, a bad JSON line, a missing field, a duplicate id,
    a reference the task's scoring kind cannot read, an empty file, or a subset larger than the file.
    """
    path = resolve_path(task, split, base_dir)
    examples = _read_jsonl(task, path)
    n = task.size(split)
    if n is None or n == len(examples):
        return examples
    if n > len(examples):
        raise ConfigError(
            f"task {task.name!r}: {split}_size={n} but {path} has only {len(examples)} examples"
        )
    picked = sorted(random.Random(task.seed).sample(range(len(examples)), n))
    return [examples[i] for i in picked]
