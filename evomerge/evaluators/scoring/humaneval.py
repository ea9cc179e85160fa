"""The ``humaneval`` kind: the completion's code (its first fenced block, else the text) passes the
problem's tests in the sandbox."""

from __future__ import annotations

import json
import re

_FENCE_RE = re.compile(r"```(?:python|py|Python)?[ \t]*\n(.*?)(?:```|\Z)", re.S)
_PROBLEM_KEYS = ("prompt", "test", "entry_point")


def _code_extract(completion: str) -> str | None:
    """The code of a completion: the first fenced block when there is one, else the text itself."""
    fenced = _FENCE_RE.search(completion)
    code = fenced.group(1) if fenced else completion
    return code if code.strip() else None


def _code_reference(reference: str) -> str:
    try:
        problem = json.loads(reference)
    except ValueError:
        raise ValueError("a humaneval reference must be JSON with prompt, test and entry_point") from None
    if not isinstance(problem, dict) or not all(
        isinstance(problem.get(k), str) and problem.get(k) for k in _PROBLEM_KEYS
    ):
        raise ValueError("a humaneval reference must be JSON with non-empty prompt, test and entry_point")
    return reference


def _code_compare(code: str, reference: str) -> bool:
    from evomerge.evaluators.sandbox import check_completion

    problem = json.loads(reference)
    result = check_completion(problem["prompt"], code, problem["test"], problem["entry_point"])
    return result.passed
