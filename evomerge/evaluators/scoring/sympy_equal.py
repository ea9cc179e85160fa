r"""Equivalence of two MATH answers by sympy: a small LaTeX-to-sympy converter for a safe subset (numbers,
single-letter symbols, ``\pi``, ``\frac``, ``\sqrt``, ``^``, ``\cdot``, ``\times``, ``\div``, parentheses,
implicit multiplication) with size guards, a cheap probe at one rational point, then ``simplify``."""

from __future__ import annotations

import functools
import math
import re
from typing import Any


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
