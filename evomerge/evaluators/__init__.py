"""evomerge.evaluators: tasks, scoring, a transformers generation backend and evaluation.

Fitness only ever uses the ``dev`` split of a task; ``test`` is for reports.
"""

from evomerge.evaluators.evaluate import EvalResult, Generator, QuestionRecord, TaskResult, evaluate
from evomerge.evaluators.hf_backend import HFBackend, check_finite
from evomerge.evaluators.scoring import KINDS, extract_answer, score
from evomerge.evaluators.tasks import Example, TaskConfig, load_split

__all__ = [
    "KINDS",
    "EvalResult",
    "Example",
    "Generator",
    "HFBackend",
    "QuestionRecord",
    "TaskConfig",
    "TaskResult",
    "check_finite",
    "evaluate",
    "extract_answer",
    "load_split",
    "score",
]
