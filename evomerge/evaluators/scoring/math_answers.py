r"""The ``math`` kind: the answer read from ``\boxed{}``, "the answer is" or the last line, the normal form
of a MATH answer, and the comparison of strings, tuples, lists, numbers and (``sympy_equal``) expressions
(see the package docstring)."""

from __future__ import annotations

import re
from fractions import Fraction

from evomerge.evaluators.scoring.answer_text import (
    _ANSWER_PHRASE_RE,
    _BOXED_RE,
    _SENTENCE_END_RE,
    _boxed_contents,
    _brace_pairs,
    _show,
)
from evomerge.evaluators.scoring.numbers import _close
from evomerge.evaluators.scoring.sympy_equal import _sympy_equal

_MATH_SPAN_RE = re.compile(r"\$\$(.+?)\$\$|\$(.+?)\$|\\\((.+?)\\\)|\\\[(.+?)\\\]", re.DOTALL)
_TEXT_UNIT_RE = re.compile(r"\\(?:text|textrm|mbox|mathrm|textnormal)\s*\{([^{}]*)\}(?:\^\{?\d\}?)?")
_TEXT_CONTENT_RE = re.compile(r"\\(?:text|textrm|mbox|mathrm|textnormal)\s*\{([^{}]*)\}")
_FORMAT_RE = re.compile(r"\\(?:textbf|mathbf|textit|mathit|emph|boldsymbol)\s*\{([^{}]*)\}")
_DEGREE_RE = re.compile(r"\^\s*\{?\s*\\circ\s*\}?|°|\\degree(?![A-Za-z])")
_WORD_UNIT_RE = re.compile(r"(\d)\s+(?!pi\b)[A-Za-z]{2,}(?:\s+[A-Za-z]{2,})*(?:\^\{?\d\}?)?\s*\.?\s*$")
_LEADING_VAR_RE = re.compile(r"(?:[A-Za-z]|\\[A-Za-z]+)=(.+)")
_THOUSANDS_RE = re.compile(r"-?\d{1,3}(?:,\d{3})+(?:\.\d+)?")
_MATH_NUMBER_RE = re.compile(r"(-?)((?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|\.\d+)")
_MATH_FRAC_RE = re.compile(r"(-?)\\frac\{(\d+)\}\{(\d+)\}|(-?)(\d+)/(\d+)")
_PROSE_RE = re.compile(r"(?<![\\A-Za-z])[A-Za-z]{3,}[,.;:]?\s+[A-Za-z]{3,}(?![A-Za-z])")
_BARE_LIMIT = 100
_OPEN, _CLOSE = "([{", ")]}"


def _brace_end(text: str, start: int) -> int | None:
    """Index of the ``}`` closing the ``{`` at ``start`` (escaped braces skipped); None if unbalanced."""
    depth = 0
    i = start
    while i < len(text):
        char = text[i]
        if char == "\\":
            i += 2
            continue
        if char == "{":
            depth += 1
        elif char == "}":
            depth -= 1
            if depth == 0:
                return i
        i += 1
    return None


def _fix_fracs(text: str) -> str:
    r"""``\frac12`` -> ``\frac{1}{2}``, ``\frac{1}2`` -> ``\frac{1}{2}``, ``\frac1{2}`` -> ``\frac{1}{2}``."""
    parts = text.split("\\frac")
    out = parts[0]
    for part in parts[1:]:
        out += "\\frac"
        part = part.lstrip(" ")
        if part.startswith("{"):
            end = _brace_end(part, 0)
            if end is None:
                out += part
                continue
            first, rest = part[: end + 1], part[end + 1 :].lstrip(" ")
        elif part and not part[0].isalpha():
            first, rest = "{" + part[0] + "}", part[1:].lstrip(" ")
        else:
            out += part
            continue
        if rest and rest[0] != "{" and rest[0] not in _CLOSE:
            rest = "{" + rest[0] + "}" + rest[1:]
        out += first + rest
    return out


def _strip_outer_braces(text: str) -> str:
    """``{{5}}`` -> ``5``: drop braces that wrap the whole text."""
    pairs = _brace_pairs(text)
    lo, hi = 0, len(text) - 1
    while lo < hi and text[lo] == "{" and pairs.get(lo) == hi:
        lo, hi = lo + 1, hi - 1
    return text[lo : hi + 1]


def _normalize_math(text: str) -> str:
    """The normal form of a MATH answer (see the package docstring)."""
    s = text.strip().replace("\n", " ")
    s = s.replace("\\$", "")
    s = re.sub(r"\\(?:displaystyle|textstyle)(?![A-Za-z])", "", s)
    s = re.sub(r"\\(?:left|right|bigl|bigr|Bigl|Bigr|big|Big)(?![A-Za-z])", "", s)
    s = re.sub(r"\\[()\[\]]", "", s).replace("$", "")
    s = _FORMAT_RE.sub(r"\1", s)
    without_units = _TEXT_UNIT_RE.sub(lambda m: "," if m[1].strip() in ("and", "or") else " ", s)
    s = without_units if without_units.strip(" ,") else _TEXT_CONTENT_RE.sub(r"\1", s)
    s = re.sub(r"\\[!,;:]|\\q?quad(?![A-Za-z])|\\ ", " ", s).replace("{,}", ",")
    s = re.sub(r"\\[dt]frac(?![A-Za-z])", r"\\frac", s)
    s = re.sub(r"\\leq(?![A-Za-z])", r"\\le", s)
    s = re.sub(r"\\geq(?![A-Za-z])", r"\\ge", s)
    s = _DEGREE_RE.sub("", s).replace("\\%", "").replace("%", "")
    s = _WORD_UNIT_RE.sub(r"\1", s.strip())
    # Drop whitespace, keeping one space where it ends a command before a letter ("\pi x").
    s = re.sub(r"(\\[A-Za-z]+)\s+(?=[A-Za-z])", lambda m: m[1] + "\0", s)
    s = re.sub(r"\s+", "", s).replace("\0", " ")
    s = _fix_fracs(s)
    s = re.sub(r"\\sqrt\s?([0-9A-Za-z])", r"\\sqrt{\1}", s)
    s = s.rstrip(".")
    leading = _LEADING_VAR_RE.fullmatch(s)
    if leading is not None and s.count("=") == 1:
        s = leading[1]
    return _strip_outer_braces(s).rstrip(".")


def _first_sentence(segment: str) -> str:
    segment = segment.lstrip()
    span = _MATH_SPAN_RE.search(segment.split("\n", 1)[0])
    if span is not None:
        return next(g for g in span.groups() if g is not None)
    return _SENTENCE_END_RE.split(segment, maxsplit=1)[0].strip(" *")


def _last_line_answer(completion: str) -> str | None:
    lines = [line for line in completion.splitlines() if line.strip()]
    if not lines:
        return None
    last = lines[-1]
    if last.strip() in ("\\]", "$$"):
        spans = list(_MATH_SPAN_RE.finditer(completion))
        last = spans[-1].group() if spans else last
    spans = list(_MATH_SPAN_RE.finditer(last))
    if spans:
        return next(g for g in spans[-1].groups() if g is not None)
    for token in reversed(last.split()):
        token = token.strip(".,;:!?*")
        if re.search(r"[\d\\]", token):
            return token
    return None


def _math_extract(completion: str) -> str | None:
    candidates: list[str] = list(reversed(_boxed_contents(completion)))
    phrases = list(_ANSWER_PHRASE_RE.finditer(completion))
    if phrases:
        candidates.append(_first_sentence(completion[phrases[-1].end() :]))
    last = _last_line_answer(completion)
    if last is not None:
        candidates.append(last)
    for candidate in candidates:
        answer = _normalize_math(candidate)
        if answer:
            return answer
    return None


def _looks_bare(reference: str) -> bool:
    text = reference.strip()
    if not text or "\n" in text or len(text) > _BARE_LIMIT:
        return False
    without_text = _TEXT_CONTENT_RE.sub(" ", _FORMAT_RE.sub(" ", text))
    return _PROSE_RE.search(without_text) is None


def _math_reference(reference: str) -> str:
    if _BOXED_RE.search(reference):
        contents = _boxed_contents(reference)
        answer = _normalize_math(contents[-1]) if contents else ""
        if not answer:
            raise ValueError(f"the math reference {_show(reference)} has no complete, non-empty \\boxed{{}}")
        return answer
    if not _looks_bare(reference):
        raise ValueError(
            f"the math reference {_show(reference)} has no \\boxed{{}} answer and is not a bare answer"
        )
    answer = _normalize_math(reference)
    if not answer:
        raise ValueError(f"the math reference {_show(reference)} is empty once normalized")
    return answer


def _top_level_split(text: str, depth_of_items: int) -> list[str] | None:
    """``text`` split at the commas at bracket depth ``depth_of_items``; None when brackets do not nest."""
    items: list[str] = []
    depth, start = 0, 0
    for i, char in enumerate(text):
        if char in _OPEN:
            depth += 1
        elif char in _CLOSE:
            depth -= 1
            if depth < 0:
                return None
        elif char == "," and depth == depth_of_items:
            items.append(text[start:i])
            start = i + 1
    if depth != 0:
        return None
    items.append(text[start:])
    return items


def _split_tuple(text: str) -> tuple[str, list[str], str] | None:
    """``(opening, elements, closing)`` for a bracketed tuple or interval with a top-level comma."""
    if len(text) < 2 or text[0] not in "([" or text[-1] not in ")]":
        return None
    depth = 0
    for i, char in enumerate(text):
        if char in _OPEN:
            depth += 1
        elif char in _CLOSE:
            depth -= 1
            if depth == 0 and i != len(text) - 1:
                return None  # "(x+1)(x-2)": the first bracket closes early
    items = _top_level_split(text[1:-1], 0)
    if items is None or len(items) < 2:
        return None
    return text[0], items, text[-1]


def _split_list(text: str) -> list[str] | None:
    if _THOUSANDS_RE.fullmatch(text):
        return None
    items = _top_level_split(text, 0)
    return items if items is not None and len(items) >= 2 else None


def _math_number(text: str) -> Fraction | None:
    match = _MATH_NUMBER_RE.fullmatch(text)
    if match is not None:
        value = Fraction(match[2].replace(",", ""))
        return -value if match[1] else value
    match = _MATH_FRAC_RE.fullmatch(text)
    if match is not None:
        sign, num, den = (match[1], match[2], match[3]) if match[2] is not None else match.group(4, 5, 6)
        if int(den) == 0:
            return None
        value = Fraction(int(num), int(den))
        return -value if sign else value
    return None


def _math_scalar_equal(a: str, b: str) -> bool:
    if a == b:
        return True
    na, nb = _math_number(a), _math_number(b)
    if na is not None and nb is not None:
        return _close(na, nb)
    return _sympy_equal(a, b)


def _math_compare(extracted: str, reference: str) -> bool:
    if extracted == reference:
        return True
    ta, tb = _split_tuple(extracted), _split_tuple(reference)
    if ta is not None or tb is not None:
        if ta is None or tb is None or (ta[0], ta[2]) != (tb[0], tb[2]) or len(ta[1]) != len(tb[1]):
            return False
        return all(_math_scalar_equal(x, y) for x, y in zip(ta[1], tb[1], strict=True))
    la, lb = _split_list(extracted), _split_list(reference)
    if la is not None or lb is not None:
        if la is None or lb is None or len(la) != len(lb):
            return False
        unused = list(lb)
        for item in la:
            match = next((j for j, other in enumerate(unused) if _math_scalar_equal(item, other)), None)
            if match is None:
                return False
            unused.pop(match)
        return True
    return _math_scalar_equal(extracted, reference)
