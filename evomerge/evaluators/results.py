"""What an evaluation returns: per-question records, per-task results and their weighted mean.

Shared by every scorer (:func:`evomerge.evaluators.evaluate` and the lm-eval tasks of
:mod:`evomerge.evaluators.lmeval_backend`) and read by the search and the reports.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, computed_field

from evomerge.evaluators.tasks import Split

__all__ = ["EvalResult", "QuestionRecord", "TaskResult"]


class QuestionRecord(BaseModel):
    """One scored question."""

    model_config = ConfigDict(frozen=True)

    id: str
    prompt: str
    completion: str
    reference: str
    extracted: str | None
    score: float


class TaskResult(BaseModel):
    """The result of one task on one split; ``score`` is the mean of the question scores."""

    model_config = ConfigDict(frozen=True)

    task: str
    split: Split
    score: float
    n: int
    records: list[QuestionRecord]
    seconds: float


class EvalResult(BaseModel):
    """The results of all tasks; ``mean`` is their mean weighted by task weight."""

    model_config = ConfigDict(frozen=True)

    split: Split
    tasks: dict[str, TaskResult]
    weights: dict[str, float]

    @computed_field  # type: ignore[prop-decorator]
    @property
    def mean(self) -> float:
        total = sum(self.weights[name] for name in self.tasks)
        if total <= 0:
            return 0.0
        return sum(self.weights[name] * result.score for name, result in self.tasks.items()) / total

    @computed_field  # type: ignore[prop-decorator]
    @property
    def scores(self) -> dict[str, float]:
        return {name: result.score for name, result in self.tasks.items()}
