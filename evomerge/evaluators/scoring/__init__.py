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

Modules
-------
- ``numbers``: reading numbers (:func:`parse_number`), their canonical form and tolerance, and the
  ``numeric`` kind;
- ``answer_text``: where answers sit in a completion (the answer phrase, sentence ends, ``\boxed{}``
  contents), shared by ``gsm8k`` and ``math``, and how a reference is shown in an error;
- ``exact``: the ``exact_match`` kind;
- ``gsm8k``: the ``gsm8k`` kind;
- ``math_answers``: the ``math`` kind (answer extraction, LaTeX normal form, tuples, lists, numbers);
- ``sympy_equal``: the small LaTeX-to-sympy converter with its size guards, and sympy equivalence;
- ``multiple_choice``: the ``multiple_choice`` kind;
- ``humaneval``: the ``humaneval`` kind (code extraction; the sandbox runs the tests).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from evomerge.errors import ConfigError
from evomerge.evaluators.scoring.exact import _exact_compare, _exact_extract, _exact_reference, normalize
from evomerge.evaluators.scoring.gsm8k import _gsm_compare, _gsm_extract, _gsm_reference
from evomerge.evaluators.scoring.humaneval import _code_compare, _code_extract, _code_reference
from evomerge.evaluators.scoring.math_answers import _math_compare, _math_extract, _math_reference
from evomerge.evaluators.scoring.multiple_choice import _mc_compare, _mc_extract, _mc_reference
from evomerge.evaluators.scoring.numbers import (
    NUMERIC_TOLERANCE,
    RELATIVE_TOLERANCE,
    _last_number,
    _numeric_compare,
    _numeric_reference,
    parse_number,
)

__all__ = [
    "KINDS",
    "NUMERIC_TOLERANCE",
    "RELATIVE_TOLERANCE",
    "ScoringKind",
    "check_reference",
    "extract_answer",
    "get_kind",
    "normalize",
    "parse_number",
    "score",
]


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
