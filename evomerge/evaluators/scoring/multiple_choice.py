"""The ``multiple_choice`` kind: the answer letter A-J after the answer phrase, opening the completion, or
the last standalone capital (see the package docstring)."""

from __future__ import annotations

import re

from evomerge.evaluators.scoring.answer_text import _show

_MC_PHRASE_RE = re.compile(r"\b(?:answer|option|choice)(?:\s+is\b|\s*\**\s*:)", re.IGNORECASE)
_MC_AFTER_PHRASE_RE = re.compile(
    r"[\s:*$(\[{]*(?:\\(?:boxed|text|textbf|mathrm)\s*\{\s*\(?\s*)?(?:(?i:option|choice)\s+\(?)?"
    r"([A-J])(?![A-Za-z0-9'’])"
)
_MC_START_RE = re.compile(r"[\s*_#>(\[]*([A-J])")
_MC_STANDALONE_RE = re.compile(r"(?<![A-Za-z0-9'’\\])[A-J]")
_MC_REFERENCE_RE = re.compile(r"\(?\s*([A-Ja-j])\s*\)?\.?")


def _mc_standalone(text: str, end: int) -> bool:
    """Whether the capital letter ending at ``end`` stands alone and is not the word "A" or "I"."""
    rest = text[end:]
    if rest and (rest[0].isalnum() or rest[0] in "'’_"):
        return False
    return not (text[end - 1] in "AI" and re.match(r"\s+[a-z]", rest))


def _mc_extract(completion: str) -> str | None:
    for phrase in reversed(list(_MC_PHRASE_RE.finditer(completion))):
        match = _MC_AFTER_PHRASE_RE.match(completion, phrase.end())
        if match is not None:
            return match[1]
    start = _MC_START_RE.match(completion)
    if start is not None and _mc_standalone(completion, start.end()):
        return start[1]
    for match in reversed(list(_MC_STANDALONE_RE.finditer(completion))):
        if _mc_standalone(completion, match.end()):
            return match.group()
    return None


def _mc_reference(reference: str) -> str:
    match = _MC_REFERENCE_RE.fullmatch(reference.strip())
    if match is None:
        raise ValueError(f"the multiple_choice reference {_show(reference)} is not a single letter A-J")
    return match[1].upper()


def _mc_compare(extracted: str, reference: str) -> bool:
    return extracted == reference
