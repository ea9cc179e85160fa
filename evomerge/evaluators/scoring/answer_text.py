r"""Where an answer sits in a completion, shared by the ``gsm8k`` and ``math`` kinds: the "the answer is"
phrase, sentence ends and the contents of ``\boxed{}``; and how a reference is shown in an error."""

from __future__ import annotations

import re

_ANSWER_PHRASE_RE = re.compile(
    r"\b(?:the\s+(?:final\s+|correct\s+)?answer\s+is\b\s*:?|answer\s*\**\s*:)", re.IGNORECASE
)
_SENTENCE_END_RE = re.compile(r"\.(?!\d)|;|\n")
_BOXED_RE = re.compile(r"\\(?:boxed|fbox)(?![A-Za-z])")


def _show(text: str, limit: int = 60) -> str:
    """A short one-line rendering of ``text`` for error messages."""
    text = text.strip()
    if len(text) > limit:
        text = text[: limit - 3] + "..."
    return repr(text)


def _brace_pairs(text: str) -> dict[int, int]:
    """For every balanced ``{`` in ``text``, the index of its ``}`` (escaped braces skipped); one pass."""
    pairs: dict[int, int] = {}
    opened: list[int] = []
    i = 0
    while i < len(text):
        char = text[i]
        if char == "\\":
            i += 2
            continue
        if char == "{":
            opened.append(i)
        elif char == "}" and opened:
            pairs[opened.pop()] = i
        i += 1
    return pairs


def _boxed_contents(text: str) -> list[str]:
    """The contents of every complete ``\\boxed{...}``/``\\fbox{...}`` (and ``\\boxed 5``) in order."""
    contents: list[str] = []
    pairs: dict[int, int] | None = None
    for match in _BOXED_RE.finditer(text):
        i = match.end()
        while i < len(text) and text[i] in " \t":
            i += 1
        if i < len(text) and text[i] == "{":
            pairs = _brace_pairs(text) if pairs is None else pairs
            end = pairs.get(i)
            if end is not None and text[i + 1 : end].strip():
                contents.append(text[i + 1 : end])
        elif i > match.end():
            bare = re.match(r"[^\s$]+", text[i:])
            if bare is not None:
                contents.append(bare.group())
    return contents
