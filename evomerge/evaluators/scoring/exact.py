"""The ``exact_match`` kind: the completion's first line, normalized, equals the normalized reference (as
numbers when both sides read as numbers)."""

from __future__ import annotations

import re

from evomerge.evaluators.scoring.numbers import parse_number

_WHITESPACE_RE = re.compile(r"\s+")


def _first_line(completion: str) -> str:
    return completion.split("\n", 1)[0]


def normalize(text: str) -> str:
    """Strip, collapse whitespace, lower-case and drop trailing periods."""
    text = _WHITESPACE_RE.sub(" ", text).strip().lower()
    return text.rstrip(".").rstrip()


def _exact_extract(completion: str) -> str | None:
    answer = normalize(_first_line(completion))
    return answer or None


def _exact_reference(reference: str) -> str:
    answer = normalize(reference)
    if not answer:
        raise ValueError("the reference answer is empty")
    return answer


def _exact_compare(extracted: str, reference: str) -> bool:
    if extracted == reference:
        return True
    a, b = parse_number(extracted), parse_number(reference)
    return a is not None and b is not None and a == b
