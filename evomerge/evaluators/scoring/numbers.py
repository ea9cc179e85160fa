"""Numbers in answers: reading one (:func:`parse_number`), its canonical form, the tolerance, and the
``numeric`` kind (the last number in the completion equals the number in the reference within ``1e-6``).
"""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation
from fractions import Fraction

NUMERIC_TOLERANCE = 1e-6
RELATIVE_TOLERANCE = 1e-9

# One number: optional sign, digits with optional comma thousands groups, optional decimals.
# The minus sign only counts when it does not follow a letter or a digit ("3-4" reads as 3 and 4).
_SIGN = r"(?:(?<![0-9A-Za-z])[-\u2212])?"
_NUMBER_RE = re.compile(_SIGN + r"(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?:\.\d+)?|" + _SIGN + r"\.\d+")
_FULL_NUMBER_RE = re.compile(r"[+\-\u2212]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|[+\-\u2212]?\.\d+")


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


def _close(a: Fraction, b: Fraction) -> bool:
    """Equal within ``NUMERIC_TOLERANCE``, or ``RELATIVE_TOLERANCE`` of the larger magnitude."""
    bound = max(Fraction(1, 10**6), Fraction(1, 10**9) * max(abs(a), abs(b)))
    return abs(a - b) <= bound
