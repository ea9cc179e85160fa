"""Scoring of model completions against reference answers.

A *scoring kind* says how the answer is read out of a completion and how it is compared to the
reference. Kinds live in the small registry :data:`KINDS`; later kinds (gsm8k, math, humaneval) are added
there. Every kind maps ``(completion, reference)`` to a score in ``[0, 1]``.

- ``exact_match``: the completion up to its first newline, normalized (stripped, whitespace collapsed,
  lower case, trailing periods dropped), equals the normalized reference. When both sides read as numbers
  they are compared as numbers: ``"12" == "12.0"``, ``"1,234" == "1234"``.
- ``numeric``: the last number in the completion (negative numbers and thousands separators allowed)
  equals the number in the reference within ``1e-6``.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation

from evomerge.errors import ConfigError

__all__ = [
    "KINDS",
    "ScoringKind",
    "check_reference",
    "extract_answer",
    "get_kind",
    "parse_number",
    "score",
]

NUMERIC_TOLERANCE = 1e-6

# One number: optional sign, digits with optional comma thousands groups, optional decimals.
# The minus sign only counts when it does not follow a letter or a digit ("3-4" reads as 3 and 4).
_SIGN = r"(?:(?<![0-9A-Za-z])[-\u2212])?"
_NUMBER_RE = re.compile(_SIGN + r"(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?:\.\d+)?|" + _SIGN + r"\.\d+")
_FULL_NUMBER_RE = re.compile(r"[+\-\u2212]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|[+\-\u2212]?\.\d+")
_WHITESPACE_RE = re.compile(r"\s+")


def parse_number(text: str) -> Decimal | None:
    """``text`` as an exact decimal when the whole of it is one number, else None.

    Accepts a sign (``-``, ``+`` or the Unicode minus), comma thousands separators and decimals:
    ``"-1,234.5"`` reads as ``Decimal("-1234.5")``; ``"12 apples"`` and ``"1,23"`` do not parse.
    """
    text = text.strip()
    if not _FULL_NUMBER_RE.fullmatch(text):
        return None
    try:
        return Decimal(text.replace(",", "").replace("\u2212", "-"))
    except InvalidOperation:  # pragma: no cover - the regex only lets valid decimals through
        return None


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


def _last_number(text: str) -> str | None:
    matches = _NUMBER_RE.findall(text)
    if not matches:
        return None
    number = parse_number(matches[-1])
    return None if number is None else _canonical(number)


def _canonical(number: Decimal) -> str:
    """A plain string for a decimal: no exponent, no trailing zeros after the point."""
    text = format(number, "f")
    if "." in text:
        text = text.rstrip("0").rstrip(".")
    return "0" if text in ("-0", "") else text


def _numeric_reference(reference: str) -> str:
    number = _last_number(reference)
    if number is None:
        raise ValueError(f"the reference answer {reference!r} holds no number")
    return number


def _numeric_compare(extracted: str, reference: str) -> bool:
    return abs(float(extracted) - float(reference)) <= NUMERIC_TOLERANCE


@dataclass(frozen=True)
class ScoringKind:
    """How one kind of task reads and compares answers.

    ``extract`` reads the answer out of a completion (None: no answer found, score 0).
    ``reference`` reads the reference answer into the same form, raising ValueError when it is unusable.
    ``compare`` says whether an extracted answer matches a read reference.
    """

    name: str
    extract: Callable[[str], str | None]
    reference: Callable[[str], str]
    compare: Callable[[str, str], bool]


KINDS: dict[str, ScoringKind] = {
    "exact_match": ScoringKind("exact_match", _exact_extract, _exact_reference, _exact_compare),
    "numeric": ScoringKind("numeric", _last_number, _numeric_reference, _numeric_compare),
}


def get_kind(task_kind: str) -> ScoringKind:
    """The registered scoring kind ``task_kind``; ConfigError naming the known kinds otherwise."""
    try:
        return KINDS[task_kind]
    except KeyError:
        known = ", ".join(sorted(KINDS))
        raise ConfigError(f"unknown scoring kind {task_kind!r} (known: {known})") from None


def extract_answer(kind: str, completion: str) -> str | None:
    """The answer that scoring kind ``kind`` reads from ``completion``; None when there is none."""
    return get_kind(kind).extract(completion)


def check_reference(kind: str, reference: str) -> str:
    """The reference as kind ``kind`` reads it; ValueError with the reason when it is unusable."""
    return get_kind(kind).reference(reference)


def score(task_kind: str, completion: str, reference: str) -> float:
    """1.0 when ``completion`` answers ``reference`` under scoring kind ``task_kind``, else 0.0.

    Raises ConfigError for an unknown kind or a reference the kind cannot read (e.g. no number for
    ``numeric``).
    """
    kind = get_kind(task_kind)
    try:
        ref = kind.reference(reference)
    except ValueError as exc:
        raise ConfigError(f"scoring kind {task_kind!r}: {exc}") from None
    extracted = kind.extract(completion)
    if extracted is None:
        return 0.0
    return 1.0 if kind.compare(extracted, ref) else 0.0
