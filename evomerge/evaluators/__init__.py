"""evomerge.evaluators: tasks, scoring, a transformers generation backend and evaluation.

Fitness only ever uses the ``dev`` split of a task; ``test`` is for reports.
"""

from evomerge.evaluators.evaluate import Generator, evaluate
from evomerge.evaluators.hf_backend import HFBackend, check_finite
from evomerge.evaluators.results import EvalResult, QuestionRecord, TaskResult
from evomerge.evaluators.sandbox import (
    SandboxIsolation,
    SandboxLimits,
    SandboxResult,
    SandboxUnavailableError,
    check_completion,
    load_humaneval,
    run_program,
    sandbox_isolation,
)
from evomerge.evaluators.scoring import KINDS, extract_answer, score
from evomerge.evaluators.tasks import Example, TaskConfig, load_split

__all__ = [
    "KINDS",
    "EvalResult",
    "Example",
    "Generator",
    "HFBackend",
    "QuestionRecord",
    "SandboxIsolation",
    "SandboxLimits",
    "SandboxResult",
    "SandboxUnavailableError",
    "TaskConfig",
    "TaskResult",
    "check_completion",
    "check_finite",
    "evaluate",
    "extract_answer",
    "load_humaneval",
    "load_split",
    "run_program",
    "sandbox_isolation",
    "score",
]
