r"""Scoring of model completions against reference answers.

A *scoring kind* says how the answer is read out of a completion and how it is compared to the
reference. Kinds live in the small registry :data:`KINDS`. Every kind maps ``(completion, reference)`` to
a score in ``[0, 1]``; a reference the kind cannot read raises ValueError from :func:`check_reference`
and ConfigError from :func:`score`.

- ``exact_match``: the completion up to its first newline, normalized (stripped, whitespace collapsed,
  lower case, trailing periods dropped), equals the normalized reference. When both sides read as numbers
  they are compared as numbers: ``"12" == "12.0"``, ``"1,234" == "1234"``.
- ``numeric``: the last number in the completion (negative numbers and thousands separators allowed)
  equals the number in the reference within ``1e-6``.
- ``gsm8k``: the reference is a GSM8K answer field (a worked solution ending in ``#### 1,234``; the
  number after its last ``####`` counts) or a bare number. The completion's answer is, in order of
  preference: the number after the last ``####``; the first number after the last "the (final|correct)
  answer is" / "Answer:" (case-insensitive; within one sentence, and after the last ``=`` of that
  sentence when it holds one); the first number in the last ``\boxed{...}``; else the last number in the
  text. When a place holds no number the one before it, then the next kind of place, is tried. A number
  may carry a sign (``-`` or the Unicode minus, also before a ``$``: ``-$5``), a ``$``, thousands
  separators, decimals, a trailing ``%`` (ignored: ``50%`` == 50) or unit, and may be a fraction ``3/4``
  (== 0.75; ``\frac{3}{4}`` too). Numbers compare within ``1e-6``, or a relative ``1e-9`` for large
  numbers. Not read: mixed numbers (``1 1/2``), number words ("five"), scientific notation, spaces as
  thousands separators.
- ``math``: the reference is a MATH ``solution`` (the content of its last complete ``\boxed{...}`` or
  ``\fbox{...}``, braces balanced) or a bare answer (one line of at most 100 characters that is not
  prose: no two consecutive words of three or more letters outside LaTeX commands and ``\text{}``).
  The completion's answer is its last complete ``\boxed{}``; else what follows the last "the answer is" /
  "Answer:" (its first ``$...$`` span, else up to the end of the sentence); else the last math span, or
  the last math-looking token (one holding a digit or a backslash), of its last non-empty line. Both
  sides are normalized: ``$``, ``\left``/``\right``, spacing commands (``\! \, \; \: \quad``),
  whitespace, degrees (``^\circ``, ``^{\circ}``, ``°``), percent signs, units (``\text{ cm}``,
  ``\mbox{...}``, ``\mathrm{...}`` beside other content; plain words after a number: ``12 cm``), a
  leading ``x =`` (one ``=`` and a single-letter or command left side), trailing periods and outer braces
  are dropped; ``\dfrac``/``\tfrac`` become ``\frac``, ``\frac12`` becomes ``\frac{1}{2}``, ``\sqrt2``
  becomes ``\sqrt{2}``; a ``\text{...}`` that is the whole answer keeps its content. Equal strings
  match. Otherwise tuples and intervals (``(1, 2)``, ``[0, 1)``) match when their brackets are the same
  and their elements match in order; unbracketed comma lists (``1, 2``) match as multisets; single values
  match when both read as numbers (decimals, thousands separators, ``\frac{a}{b}``, ``a/b``) equal within
  the gsm8k tolerance, or when a small LaTeX-to-sympy converter (numbers, single-letter symbols, ``\pi``,
  ``\frac``, ``\sqrt``, ``^``, ``\cdot``, ``\times``, ``\div``, parentheses, implicit multiplication)
  reads both and ``sympy.simplify(a - b) == 0`` (decimals read exactly, single letters are plain
  symbols: ``E`` is not ``e``). Anything outside that subset (``\infty``, ``\log``, ``!``, relations,
  answers over 120 characters, stacked exponents whose product exceeds 1000...) is left to the string
  comparison; sympy errors count as "not equal"; a value at one rational point that clearly differs
  settles "not equal" before simplify runs. ``50\%`` matches ``50``, not ``0.5``; ``0.3333333``
  matches ``\frac13`` (the tolerance), ``0.333`` does not.
- ``multiple_choice``: the reference is one letter A-J (case-insensitive, optionally in parentheses or
  with a trailing period). The completion's letter is, in order: the capital letter right after the last
  "answer/option/choice is" or "answer:" that is followed by one (case-insensitive; markup such as
  ``**``, ``(``, ``$\boxed{`` may come between); a capital letter opening the completion (``B``, ``B)``,
  ``(B)``, ``**B**``, ``B. Paris``); else the last standalone capital A-J in the text. Outside the answer
  phrase, "A" and "I" followed by a space and a lower-case letter are words ("A cat", "I think"), never
  answers. Lower-case letters are never answers ("answer: (c)" reads none). No negation is understood:
  "Not C but B" reads B (the last letter) and "The answer is B, not C" reads B (the phrase), but "It is
  B, not C." reads C (the last letter).
"""

from __future__ import annotations

import functools
import json
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from fractions import Fraction
from typing import Any

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
RELATIVE_TOLERANCE = 1e-9

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


def _show(text: str, limit: int = 60) -> str:
    """A short one-line rendering of ``text`` for error messages."""
    text = text.strip()
    if len(text) > limit:
        text = text[: limit - 3] + "..."
    return repr(text)


# ----------------------------------------------------------------------------------------- exact_match


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


# --------------------------------------------------------------------------------------------- numeric


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


# ----------------------------------------------------------------------------------------------- gsm8k

# A number as GSM8K answers write it: sign (not after a letter or digit), optional "$", digits with
# optional thousands groups and decimals, optionally "/ denominator" (a fraction).
_GSM_TOKEN_RE = re.compile(
    r"(?P<sign>(?<![0-9A-Za-z])[-\u2212])?\$?"
    r"(?P<num>(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?:\.\d+)?|\.\d+)"
    r"(?:\s*/\s*(?P<den>\d+)(?![\d/]|\.\d))?"
)
_ANSWER_PHRASE_RE = re.compile(
    r"\b(?:the\s+(?:final\s+|correct\s+)?answer\s+is\b\s*:?|answer\s*\**\s*:)", re.IGNORECASE
)
_GSM_MARK = "####"
_LATEX_FRAC_RE = re.compile(r"\\[dt]?frac\s*\{\s*([^{}]*?)\s*\}\s*\{\s*([^{}]*?)\s*\}")
_LATEX_TEXT_RE = re.compile(r"\\(?:text|textrm|textbf|mbox|mathrm)\s*\{([^{}]*)\}")
_SENTENCE_END_RE = re.compile(r"\.(?!\d)|;|\n")


def _gsm_clean(text: str) -> str:
    """Light LaTeX clean-up so GSM8K numbers written in LaTeX read as plain numbers."""
    text = _LATEX_FRAC_RE.sub(r"\1/\2", text)
    text = _LATEX_TEXT_RE.sub(r" \1 ", text)
    text = text.replace("{,}", ",").replace("\\$", "$").replace("\\%", "%")
    return re.sub(r"\\[!,;:]", "", text)


def _token_value(match: re.Match[str]) -> Fraction:
    value = Fraction(match["num"].replace(",", ""))
    if match["den"] is not None and int(match["den"]) != 0:
        value /= int(match["den"])
    return -value if match["sign"] else value


def _gsm_from_segment(segment: str) -> Fraction | None:
    """The answer at the start of ``segment``: its first sentence, after that sentence's last ``=``."""
    sentence = _SENTENCE_END_RE.split(segment.lstrip(), maxsplit=1)[0]
    if "=" in sentence:
        sentence = sentence.rsplit("=", 1)[1]
    match = _GSM_TOKEN_RE.search(sentence)
    return None if match is None else _token_value(match)


def _gsm_after_marks(text: str, positions: list[int]) -> Fraction | None:
    """The first answer found after one of ``positions``, trying the last position first."""
    for pos in reversed(positions):
        value = _gsm_from_segment(text[pos:])
        if value is not None:
            return value
    return None


def _gsm_value(completion: str) -> Fraction | None:
    text = _gsm_clean(completion)
    marks = [m.end() for m in re.finditer(re.escape(_GSM_MARK), text)]
    value = _gsm_after_marks(text, marks)
    if value is None:
        value = _gsm_after_marks(text, [m.end() for m in _ANSWER_PHRASE_RE.finditer(text)])
    if value is None:
        for content in reversed(_boxed_contents(text)):
            value = _gsm_from_segment(content)
            if value is not None:
                break
    if value is None:
        tokens = list(_GSM_TOKEN_RE.finditer(text))
        value = _token_value(tokens[-1]) if tokens else None
    return value


def _fraction_text(value: Fraction) -> str:
    """An exact string for ``value``: an integer, a terminating decimal, or ``p/q``."""
    if value.denominator == 1:
        return str(value.numerator)
    rest, twos, fives = value.denominator, 0, 0
    while rest % 2 == 0:
        rest, twos = rest // 2, twos + 1
    while rest % 5 == 0:
        rest, fives = rest // 5, fives + 1
    if rest != 1:
        return f"{value.numerator}/{value.denominator}"
    places = max(twos, fives)
    scaled = value.numerator * (10**places // value.denominator)
    return _canonical(Decimal(scaled).scaleb(-places))


def _gsm_extract(completion: str) -> str | None:
    value = _gsm_value(completion)
    return None if value is None else _fraction_text(value)


def _gsm_reference(reference: str) -> str:
    text = _gsm_clean(reference)
    if _GSM_MARK in text:
        value = _gsm_after_marks(text, [text.rindex(_GSM_MARK) + len(_GSM_MARK)])
        if value is None:
            raise ValueError(
                f"nothing after the last '####' of the gsm8k reference {_show(reference)} is a number"
            )
        return _fraction_text(value)
    bare = text.strip().rstrip(".").rstrip("%").strip()
    match = _GSM_TOKEN_RE.fullmatch(bare)
    if match is None:
        raise ValueError(
            f"the gsm8k reference {_show(reference)} has no '#### <number>' line and is not a bare number"
        )
    return _fraction_text(_token_value(match))


def _close(a: Fraction, b: Fraction) -> bool:
    """Equal within ``NUMERIC_TOLERANCE``, or ``RELATIVE_TOLERANCE`` of the larger magnitude."""
    bound = max(Fraction(1, 10**6), Fraction(1, 10**9) * max(abs(a), abs(b)))
    return abs(a - b) <= bound


def _gsm_compare(extracted: str, reference: str) -> bool:
    return _close(Fraction(extracted), Fraction(reference))


# ------------------------------------------------------------------------------------------------ math

_BOXED_RE = re.compile(r"\\(?:boxed|fbox)(?![A-Za-z])")
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
    """The normal form of a MATH answer (see the module docstring)."""
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


class _Unsupported(Exception):
    """The LaTeX is outside the subset the sympy converter reads."""


_MAX_SYMPY_INPUT = 120
_MAX_EXPONENT = 1000  # bound on the product of the exponents stacked in one expression
_MAX_LITERAL_DIGITS = 30
_SAFE_EXPR_RE = re.compile(r"(?:[0-9+\-*/()]|sqrt|pi|(?<![A-Za-z])[A-Za-z](?![A-Za-z]))*")


def _matching_close(text: str, start: int) -> int:
    """Index closing the ``(`` or ``{`` at ``start``; _Unsupported when missing or mismatched."""
    stack: list[str] = []
    for i in range(start, len(text)):
        char = text[i]
        if char in "({":
            stack.append(")" if char == "(" else "}")
        elif char in ")}":
            if not stack or stack.pop() != char:
                raise _Unsupported(text)
            if not stack:
                return i
    raise _Unsupported(text)


def _brace_arg(text: str, i: int) -> tuple[str, int, int]:
    """The ``{...}`` argument at ``i`` (or one character) converted, its growth, and the index after it."""
    if i < len(text) and text[i] == "{":
        end = _matching_close(text, i)
        return (*_latex_to_expr(text[i + 1 : end]), end + 1)
    if i < len(text) and (text[i].isdigit() or text[i].isalpha()):
        return (*_latex_to_expr(text[i]), i + 1)
    raise _Unsupported(text)


def _number_expr(literal: str) -> str:
    """An exact integer expression for a decimal literal: ``0.75`` -> ``(75/100)``."""
    if len(literal) > _MAX_LITERAL_DIGITS:
        raise _Unsupported(literal)
    if "." not in literal:
        return str(int(literal))
    whole, frac = literal.split(".")
    return f"({int(whole + frac)}/{10 ** len(frac)})"


def _exponent_size(expr: str) -> int:
    """A bound on how much raising to ``expr`` multiplies sizes: the product of its literals."""
    if "**" in expr or len(expr) > 20:
        raise _Unsupported(expr)
    return max(1, math.prod(int(n) for n in re.findall(r"\d+", expr)))


def _latex_to_expr(text: str) -> tuple[str, int]:
    """A Python/sympy expression (safe alphabet only) for the LaTeX subset, and its growth.

    The growth bounds the product of the exponents stacked in the expression (``(x^2+1)^3``: 6); a
    growth above ``_MAX_EXPONENT`` (``2^{9}^{9}``, ``(2^{100})^{100}``) is refused, as is everything
    outside the subset (_Unsupported).
    """
    items: list[tuple[str, str, int]] = []  # (kind, text, growth): kind "value" or "op"
    i = 0
    while i < len(text):
        char = text[i]
        if char == " ":
            i += 1
        elif char.isdigit() or (char == "." and text[i + 1 : i + 2].isdigit()):
            match = re.compile(r"\d*\.\d+|\d+").match(text, i)
            assert match is not None
            items.append(("value", _number_expr(match.group()), 1))
            i = match.end()
        elif char.isascii() and char.isalpha():
            items.append(("value", char, 1))
            i += 1
        elif char in "+-*/":
            items.append(("op", char, 1))
            i += 1
        elif char in "({":
            end = _matching_close(text, i)
            inner, growth = _latex_to_expr(text[i + 1 : end])
            items.append(("value", f"({inner})", growth))
            i = end + 1
        elif char == "^":
            if not items or items[-1][0] != "value":
                raise _Unsupported(text)
            if text[i + 1 : i + 2].isdigit():
                match = re.compile(r"\d+").match(text, i + 1)
                assert match is not None
                exponent, i = _number_expr(match.group()), match.end()
            else:
                exponent, _, i = _brace_arg(text, i + 1)
            _, base, growth = items.pop()
            growth *= _exponent_size(exponent)
            if growth > _MAX_EXPONENT:
                raise _Unsupported(text)
            items.append(("value", f"({base})**({exponent})", growth))
        elif char == "\\":
            command = re.compile(r"\\([A-Za-z]+)").match(text, i)
            if command is None:
                raise _Unsupported(text)
            name, i = command[1], command.end()
            if name == "frac":
                numerator, top, i = _brace_arg(text, i)
                denominator, bottom, i = _brace_arg(text, i)
                items.append(("value", f"(({numerator})/({denominator}))", max(top, bottom)))
            elif name == "sqrt":
                index = "2"
                if text[i : i + 1] == "[":
                    close = text.find("]", i)
                    index = text[i + 1 : close].strip() if close > 0 else ""
                    if not index.isdigit() or not 0 < int(index) <= _MAX_EXPONENT:
                        raise _Unsupported(text)
                    i = close + 1
                radicand, growth, i = _brace_arg(text, i)
                root = f"sqrt({radicand})" if index == "2" else f"(({radicand})**(1/({int(index)})))"
                items.append(("value", root, growth))
            elif name == "pi":
                items.append(("value", "pi", 1))
            elif name in ("cdot", "times"):
                items.append(("op", "*", 1))
            elif name == "div":
                items.append(("op", "/", 1))
            else:
                raise _Unsupported(name)
        else:
            raise _Unsupported(char)
    if not items:
        raise _Unsupported(text)
    out: list[str] = []
    for n, (kind, piece, _) in enumerate(items):
        if n and kind == "value" and items[n - 1][0] == "value":
            out.append("*")  # implicit multiplication: "2\pi", "2x", "(x+1)(x-1)"
        out.append(piece)
    return "".join(out), max(growth for _, _, growth in items)


@functools.cache
def _sympy_namespace() -> tuple[Any, dict[str, Any]]:
    """The sympy module and the only globals parsed expressions may see (imported on first use)."""
    import sympy  # type: ignore[import-untyped]

    names = {
        "Integer": sympy.Integer,
        "Float": sympy.Float,
        "Rational": sympy.Rational,
        "Symbol": sympy.Symbol,
        "sqrt": sympy.sqrt,
        "pi": sympy.pi,
        "__builtins__": {},
    }
    return sympy, names


def _to_sympy(latex: str) -> Any:
    from sympy.parsing.sympy_parser import parse_expr, standard_transformations  # type: ignore[import-untyped]

    expr, _ = _latex_to_expr(latex)
    if not _SAFE_EXPR_RE.fullmatch(expr):  # pragma: no cover - the converter only emits the safe alphabet
        raise _Unsupported(expr)
    sympy, names = _sympy_namespace()
    letters = {c: sympy.Symbol(c) for c in set(re.sub(r"sqrt|pi", "", expr)) if c.isalpha()}
    return parse_expr(
        expr, local_dict=letters, global_dict=dict(names), transformations=standard_transformations
    )


def _probe_nonzero(sympy: Any, left: Any, right: Any) -> bool:
    """Whether ``left - right`` is clearly nonzero at one rational point (cheap; spares simplify the work).

    Symbols get distinct rational values and the exact value is evaluated to 30 digits. A probe that
    fails, or meets an undefined or non-finite value, says nothing (False), and simplify decides.
    """
    symbols = sorted(left.free_symbols | right.free_symbols, key=str)
    point = {s: sympy.Rational(2 * n + 7, n + 3) for n, s in enumerate(symbols)}
    try:
        value = complex((left - right).subs(point).evalf(30))
        scale = complex(left.subs(point).evalf(30))
    except Exception:  # e.g. a value that is not a number at this point
        return False
    if not all(math.isfinite(x) for x in (value.real, value.imag, scale.real, scale.imag)):
        return False
    return abs(value) > 1e-12 * max(1.0, abs(scale))


def _sympy_equal(a: str, b: str) -> bool:
    """Whether sympy shows ``a - b`` simplifies to 0; False for anything it cannot read or decide."""
    if len(a) > _MAX_SYMPY_INPUT or len(b) > _MAX_SYMPY_INPUT:
        return False
    try:
        left, right = _to_sympy(a), _to_sympy(b)
        sympy, _ = _sympy_namespace()
        if _probe_nonzero(sympy, left, right):
            return False
        return bool(sympy.simplify(left - right) == 0)
    except Exception:  # any failure to read or decide counts as "not equal"
        return False


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


# ------------------------------------------------------------------------------------- multiple_choice

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


# ---------------------------------------------------------------------------------------------- registry


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


KINDS: dict[str, ScoringKind] = {
    "exact_match": ScoringKind("exact_match", _exact_extract, _exact_reference, _exact_compare),
    "numeric": ScoringKind("numeric", _last_number, _numeric_reference, _numeric_compare),
    "gsm8k": ScoringKind("gsm8k", _gsm_extract, _gsm_reference, _gsm_compare),
    "math": ScoringKind("math", _math_extract, _math_reference, _math_compare),
    "multiple_choice": ScoringKind("multiple_choice", _mc_extract, _mc_reference, _mc_compare),
    "humaneval": ScoringKind("humaneval", _code_extract, _code_reference, _code_compare),
}


def get_kind(task_kind: str) -> ScoringKind:
    """The registered scoring kind ``task_kind``; ConfigError naming the known kinds otherwise.

    The known kinds are listed in registration order (the basic kinds first).
    """
    try:
        return KINDS[task_kind]
    except KeyError:
        known = ", ".join(KINDS)
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
    ``numeric``, no ``\\boxed{}`` answer for ``math``, not a letter A-J for ``multiple_choice``).
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
