r"""The ``gsm8k`` kind: the number after ``####``, "the answer is", ``\boxed{}`` or the last number,
compared within the tolerance (see the package docstring)."""

from __future__ import annotations

import re
from decimal import Decimal
from fractions import Fraction

from evomerge.evaluators.scoring.answer_text import (
    _ANSWER_PHRASE_RE,
    _SENTENCE_END_RE,
    _boxed_contents,
    _show,
)
from evomerge.evaluators.scoring.numbers import _canonical, _close

# A number as GSM8K answers write it: sign (not after a letter or digit), optional "$", digits with
# optional thousands groups and decimals, optionally "/ denominator" (a fraction).
_GSM_TOKEN_RE = re.compile(
    r"(?P<sign>(?<![0-9A-Za-z])[-\u2212])?\$?"
    r"(?P<num>(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?:\.\d+)?|\.\d+)"
    r"(?:\s*/\s*(?P<den>\d+)(?![\d/]|\.\d))?"
)
_GSM_MARK = "####"
_LATEX_FRAC_RE = re.compile(r"\\[dt]?frac\s*\{\s*([^{}]*?)\s*\}\s*\{\s*([^{}]*?)\s*\}")
_LATEX_TEXT_RE = re.compile(r"\\(?:text|textrm|textbf|mbox|mathrm)\s*\{([^{}]*)\}")


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


def _gsm_compare(extracted: str, reference: str) -> bool:
    return _close(Fraction(extracted), Fraction(reference))
