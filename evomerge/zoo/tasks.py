"""Synthetic reasoning task families for the local expert zoo.

Each family is a generator of (question, answer) pairs drawn from a seeded ``random.Random``. The
families are deliberately different skills, so that an expert fine-tuned on one is clearly better at it
than the others, while sharing one prompt format (``Q: ...\\nA: ...``) so that merging is meaningful:

- ``arith``: two-step arithmetic word problems (keep a running count through two events).
- ``code``: evaluate a short Python snippet over a list (indexing, len, max, min, sum, sorted).
- ``logic``: transitive ordering puzzles (who is tallest/youngest given two comparisons).
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


def gen_arith(rng: random.Random) -> Example:
    """A running count through two gain/loss events with single-digit amounts (answer in 0..27)."""
    name = rng.choice(_NAMES)
    item = rng.choice(_ITEMS)
    total = rng.randint(1, 9)
    parts = [f"{name} has {total} {item}."]
    for _ in range(2):
        if total > 1 and rng.random() < 0.5:
            k = rng.randint(1, min(total, 9))
            parts.append(f"{rng.choice(['Gives', 'Loses', 'Sells'])} {k}.")
            total -= k
        else:
            k = rng.randint(1, 9)
            parts.append(f"{rng.choice(['Gets', 'Finds', 'Buys'])} {k}.")
            total += k
    parts.append("How many now?")
    return " ".join(parts), str(total)


def gen_code(rng: random.Random) -> Example:
    """What a one-line Python expression over a short list prints."""
    xs = [rng.randint(0, 9) for _ in range(rng.randint(3, 5))]
    ops: list[tuple[str, Callable[[list[int]], object]]] = [
        ("len(x)", len),
        ("max(x)", max),
        ("min(x)", min),
        ("sum(x)", sum),
        ("x[0]", lambda v: v[0]),
        ("x[-1]", lambda v: v[-1]),
        ("x[1]", lambda v: v[1]),
        ("sorted(x)[0]", lambda v: sorted(v)[0]),
        ("sorted(x)[-1]", lambda v: sorted(v)[-1]),
        ("x.count(x[0])", lambda v: v.count(v[0])),
    ]
    expr, fn = rng.choice(ops)
    lst = "[" + ",".join(str(v) for v in xs) + "]"
    return f"x = {lst}; print({expr})", str(fn(xs))


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


TASK_FAMILIES: dict[str, Generator] = {"arith": gen_arith, "code": gen_code, "logic": gen_logic}


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


def write_jsonl(path: Path, family: str, examples: Iterable[Example]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for i, (q, a) in enumerate(examples):
            f.write(json.dumps({"id": f"{family}-{i}", "question": q, "answer": a}) + "\n")
