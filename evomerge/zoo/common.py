"""What every zoo builder shares: the prompt format, the task configs of a family, the instruction-response
files for fusion, the manifest of a built zoo (``zoo.json``) and where zoos are cached.
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Callable, Sequence
from pathlib import Path

from pydantic import BaseModel, ConfigDict

from evomerge.evaluators import TaskConfig
from evomerge.zoo.configs import AnyZooConfig
from evomerge.zoo.tasks import Example

__all__ = [
    "PROMPT",
    "Progress",
    "Zoo",
    "default_cache_dir",
    "family_tasks",
    "find_zoo",
    "read_examples",
    "write_fusion",
    "zoo_dir",
]

PROMPT = "Q: {question}\nA:"
Progress = Callable[[str, int, int], None]


class Zoo(BaseModel):
    """The manifest of a built zoo (``zoo.json``)."""

    model_config = ConfigDict(frozen=True)

    config: AnyZooConfig
    root: str
    base: str
    experts: dict[str, str]
    tasks: tuple[TaskConfig, ...]
    build_seconds: float

    @classmethod
    def load(cls, root: Path) -> Zoo:
        data = json.loads((root / "zoo.json").read_text())
        data["root"] = str(root)
        data["base"] = str(root / "base")
        data["experts"] = {k: str(root / "experts" / k) for k in data["experts"]}
        # zoo.json keeps data paths relative to the zoo, so a zoo can move; here they become absolute.
        for task in data["tasks"]:
            task["data_files"] = {s: str(root / p) for s, p in task["data_files"].items()}
        return cls.model_validate(data)


def default_cache_dir() -> Path:
    return Path(os.environ.get("EVOMERGE_HOME", Path.home() / ".cache" / "evomerge")) / "zoo"


def zoo_dir(config: AnyZooConfig, cache_dir: Path | None = None) -> Path:
    return (cache_dir or default_cache_dir()) / f"{config.name}-{config.digest()}"


def find_zoo(config: AnyZooConfig, cache_dir: Path | None = None) -> Zoo | None:
    root = zoo_dir(config, cache_dir)
    return Zoo.load(root) if (root / "zoo.json").is_file() else None


def family_tasks(
    families: Sequence[str],
    *,
    max_new_tokens: int,
    dev_size: int,
    test_size: int,
    seed: int,
    chat: bool = False,
) -> list[TaskConfig]:
    """One exact-match task per zoo family, in the zoo's prompt format, with data paths relative to the
    build root (so a zoo can be moved; ``load`` makes them absolute). Shared by every zoo builder."""
    return [
        TaskConfig(
            name=fam,
            kind="exact_match",
            data_files={"dev": f"data/{fam}.dev.jsonl", "test": f"data/{fam}.test.jsonl"},
            prompt_template=PROMPT,
            chat=chat,
            max_new_tokens=max_new_tokens,
            stop=["\n"],
            dev_size=dev_size,
            test_size=test_size,
            seed=seed,
        )
        for fam in families
    ]


def read_examples(path: Path) -> list[Example]:
    """The (question, answer) pairs of a task file in the zoo's format (``{"id", "question", "answer"}``)."""
    records = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return [(r["question"], r["answer"]) for r in records]


def write_fusion(path: Path, blocks: Sequence[tuple[str, list[Example]]], shuffle_seed: int | None) -> None:
    """``{"id": "<family>-<i>", "instruction": question, "response": answer}`` per example, shuffled with
    ``shuffle_seed`` (None: in order).

    The id is the example's id in its family's task file of the same split (``i`` its line there).
    """
    rows = [
        {"id": f"{fam}-{i}", "instruction": q, "response": a}
        for fam, exs in blocks
        for i, (q, a) in enumerate(exs)
    ]
    if shuffle_seed is not None:
        random.Random(shuffle_seed).shuffle(rows)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
