"""Synthetic reasoning task families for the local expert zoo.

Each family is a generator of (question, answer) pairs drawn from a seeded ``random.Random``. The
families are deliberately different skills, so that an expert fine-tuned on one is clearly better at it
than the others, while sharing one prompt format (``Q: ...\\nA: ...``) so that merging is meaningful:

- ``arith``: two-step arithmetic word problems (keep a running count through two events).
- ``code``: evaluate a short Python snippet over a list (indexing, len, max, min, sum, sorted).
- ``logic``: transitive ordering puzzles (who is tallest/youngest given two comparisons).

The ``tiny`` zoo's base learns only the *primitives* of these skills, so that each expert is a small
fine-tune that teaches a skill the base lacks (room for a merge to add skills up):

- ``arith1``: one gain/loss event; ``code1``: a lookup (``len(x)``, ``x[0]``, ``x[1]``, ``x[-1]``);
  ``logic1``: one comparison, or two in chain order; ``bridge``: a lookup's value used inside a
  one-event word problem. Its experts: ``arith``, ``code`` and ``order`` (two comparisons given against
  the chain, ``B > C. A > B.``: ``logic`` without the case the base knows).
- ``comp`` (compositional, held out: no model trains on it): a code expression's value used inside a
  word problem of one or two events, e.g. ``x = [7,7,1,6,8]; Cai has min(x) pens. Finds 2. Sells 1. How
  many now?``; a reduction needs the code expert's skill, two events the arith expert's, and the
  questions with both need both at once.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

Example = tuple[str, str]
Generator = Callable[[random.Random], Example]

_NAMES = ["Ana", "Ben", "Cai", "Dee", "Eli", "Fay", "Gus", "Hal", "Ivy", "Jon"]
_ITEMS = ["apples", "books", "coins", "pens", "cards", "shells"]


def _events(rng: random.Random, start: int, n: int) -> tuple[list[str], int]:
    """``n`` gain/loss events with single-digit amounts from ``start``; never below zero."""
    total = start
    parts: list[str] = []
    for _ in range(n):
        if total > 1 and rng.random() < 0.5:
            k = rng.randint(1, min(total, 9))
            parts.append(f"{rng.choice(['Gives', 'Loses', 'Sells'])} {k}.")
            total -= k
        else:
            k = rng.randint(1, 9)
            parts.append(f"{rng.choice(['Gets', 'Finds', 'Buys'])} {k}.")
            total += k
    return parts, total


def _word_problem(rng: random.Random, n_events: int) -> Example:
    name = rng.choice(_NAMES)
    item = rng.choice(_ITEMS)
    start = rng.randint(1, 9)
    events, total = _events(rng, start, n_events)
    return " ".join([f"{name} has {start} {item}.", *events, "How many now?"]), str(total)


def gen_arith(rng: random.Random) -> Example:
    """A running count through two gain/loss events with single-digit amounts (answer in 0..27)."""
    return _word_problem(rng, 2)


def gen_arith1(rng: random.Random) -> Example:
    """The primitive of ``arith``: one gain/loss event (answer in 0..18)."""
    return _word_problem(rng, 1)


CodeOp = tuple[str, Callable[[list[int]], int]]
_LOOKUPS: list[CodeOp] = [
    ("len(x)", len),
    ("x[0]", lambda v: v[0]),
    ("x[-1]", lambda v: v[-1]),
    ("x[1]", lambda v: v[1]),
]
_REDUCTIONS: list[CodeOp] = [
    ("max(x)", max),
    ("min(x)", min),
    ("sum(x)", sum),
    ("sorted(x)[0]", lambda v: sorted(v)[0]),
    ("sorted(x)[-1]", lambda v: sorted(v)[-1]),
    ("x.count(x[0])", lambda v: v.count(v[0])),
]
_CODE_OPS = [_LOOKUPS[0], _REDUCTIONS[0], _REDUCTIONS[1], _REDUCTIONS[2], *_LOOKUPS[1:], *_REDUCTIONS[3:]]


def _code_value(rng: random.Random, ops: list[CodeOp]) -> tuple[str, str, int]:
    xs = [rng.randint(0, 9) for _ in range(rng.randint(3, 5))]
    expr, fn = rng.choice(ops)
    return "[" + ",".join(str(v) for v in xs) + "]", expr, fn(xs)


def gen_code(rng: random.Random) -> Example:
    """What a one-line Python expression over a short list prints."""
    lst, expr, value = _code_value(rng, _CODE_OPS)
    return f"x = {lst}; print({expr})", str(value)


def gen_code1(rng: random.Random) -> Example:
    """The primitive of ``code``: a lookup (length or one element)."""
    lst, expr, value = _code_value(rng, _LOOKUPS)
    return f"x = {lst}; print({expr})", str(value)


def _code_in_story(rng: random.Random, ops: list[CodeOp], n_events: int) -> Example:
    lst, expr, value = _code_value(rng, ops)
    name = rng.choice(_NAMES)
    item = rng.choice(_ITEMS)
    events, total = _events(rng, value, n_events)
    return " ".join([f"x = {lst}; {name} has {expr} {item}.", *events, "How many now?"]), str(total)


def gen_bridge(rng: random.Random) -> Example:
    """A lookup's value used inside a one-event word problem (the base learns to carry a value over)."""
    return _code_in_story(rng, _LOOKUPS, 1)


def gen_comp(rng: random.Random) -> Example:
    """Compositional: any code expression's value inside a word problem of one or two events (held out).
    A reduction (``max(x)``, ``sum(x)``, ...) needs the code expert, two events the arith expert; the
    questions with both need both."""
    return _code_in_story(rng, _CODE_OPS, rng.randint(1, 2))


_COMPARATIVES = [
    ("taller", "tallest", "shortest"),
    ("older", "oldest", "youngest"),
    ("faster", "fastest", "slowest"),
]


def gen_logic(rng: random.Random) -> Example:
    """Transitive ordering: two comparisons in random order, ask for the first or the last of three."""
    a, b, c = rng.sample(_NAMES, 3)  # a > b > c
    facts = [(a, b), (b, c)]
    rng.shuffle(facts)
    adj, top, bottom = rng.choice(_COMPARATIVES)
    text = " ".join(f"{x} is {adj} than {y}." for x, y in facts)
    if rng.random() < 0.5:
        return f"{text} Who is {top}?", a
    return f"{text} Who is {bottom}?", c


def gen_logic1(rng: random.Random) -> Example:
    """The primitive of ``logic``: one comparison, or two given in chain order (the first name is the
    top, the last the bottom); ``logic`` also gives them the other way round."""
    adj, top, bottom = rng.choice(_COMPARATIVES)
    if rng.random() < 0.5:
        a, b = rng.sample(_NAMES, 2)  # a > b
        text = f"{a} is {adj} than {b}."
    else:
        a, m, b = rng.sample(_NAMES, 3)  # a > m > b
        text = f"{a} is {adj} than {m}. {m} is {adj} than {b}."
    if rng.random() < 0.5:
        return f"{text} Who is {top}?", a
    return f"{text} Who is {bottom}?", b


def gen_order(rng: random.Random) -> Example:
    """Transitive ordering with the two comparisons given against the chain (``B > C. A > B.``): the
    top is the second fact's first name, the bottom the first fact's last name (``logic1`` teaches the
    base the chain-order case only)."""
    a, b, c = rng.sample(_NAMES, 3)  # a > b > c
    adj, top, bottom = rng.choice(_COMPARATIVES)
    text = f"{b} is {adj} than {c}. {a} is {adj} than {b}."
    if rng.random() < 0.5:
        return f"{text} Who is {top}?", a
    return f"{text} Who is {bottom}?", c


TASK_FAMILIES: dict[str, Generator] = {
    "arith": gen_arith,
    "code": gen_code,
    "logic": gen_logic,
    "arith1": gen_arith1,
    "code1": gen_code1,
    "logic1": gen_logic1,
    "bridge": gen_bridge,
    "comp": gen_comp,
    "order": gen_order,
}


_LETTERS = "abcdefgh"


def gen_sort(rng: random.Random) -> Example:
    """Sort 3 to 5 distinct letters of a..h: ``Sort the letters: d a c b`` -> ``a b c d``."""
    letters = rng.sample(_LETTERS, rng.randint(3, 5))
    return "Sort the letters: " + " ".join(letters), " ".join(sorted(letters))


HETERO_FAMILIES: dict[str, Generator] = {"sort": gen_sort}
"""The heterogeneous experts' family (:mod:`evomerge.zoo.hetero`, :mod:`evomerge.zoo.smollm2`): a skill
none of the zoo's own experts has."""


CAPACITY: dict[str, int] = {"logic1": 3000, "order": 3000}
"""Families with few distinct questions (``logic1``: 4860, ``order``: 4320): at most this many train."""


def generate(
    family: str,
    n: int,
    seed: int,
    exclude: set[str] | None = None,
    *,
    families: Mapping[str, Generator] = TASK_FAMILIES,
) -> list[Example]:
    """``n`` distinct examples of a family (questions in ``exclude`` are skipped: no split leakage);
    ``families`` lets other family tables (the heterogeneous expert's) share the same seeding."""
    gen = families[family]
    rng = random.Random(f"{family}:{seed}")
    seen = set(exclude or ())
    out: list[Example] = []
    attempts = 0
    while len(out) < n:
        q, a = gen(rng)
        attempts += 1
        if q in seen:
            if attempts > 50 * n:
                raise RuntimeError(f"task family {family!r} cannot produce {n} distinct examples")
            continue
        seen.add(q)
        out.append((q, a))
    return out


def generate_examples(family: str, n: int, seed: int, exclude: set[str] | None = None) -> list[Example]:
    """``n`` distinct examples of ``family`` (a zoo family or a hetero one), seeded like the zoo's.

    The same algorithm as :func:`generate` (``random.Random(f"{family}:{seed}")``, questions in
    ``exclude`` skipped), which serves the zoo's own families.
    """
    return generate(family, n, seed, exclude, families={**TASK_FAMILIES, **HETERO_FAMILIES})


def write_jsonl(path: Path, family: str, examples: Iterable[Example]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for i, (q, a) in enumerate(examples):
            f.write(json.dumps({"id": f"{family}-{i}", "question": q, "answer": a}) + "\n")
