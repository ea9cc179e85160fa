"""How much do the zoo's experts interfere? Dev scores of a grid of task-arithmetic and TIES recipes.

Usage (numbers in docs/benchmarks.md):

    .venv/bin/python benchmarks/interference_grid.py --preset tiny --cache-dir /tmp/zoo-bench
    .venv/bin/python benchmarks/interference_grid.py --weights "0,0,1;0.3,0.3,1;1,1,1" --top 0

Weights are given in the zoo's expert order (``tiny``: arith, code, order). Prints the best recipes
first (``--top 0``: every recipe, in the order given). ``--weights`` scores only those task-arithmetic
weight vectors (``;`` between recipes).
"""

from __future__ import annotations

import argparse
import itertools
from pathlib import Path

from evomerge.evaluators import HFBackend, evaluate
from evomerge.merging import InMemoryMerger, MergeRecipe
from evomerge.zoo import build_zoo, resolve_config


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--cache-dir", type=Path, default=None)
    ap.add_argument("--top", type=int, default=8)
    ap.add_argument("--weights", default=None, help='task-arithmetic weight vectors, e.g. "0,0,1;1,1,1"')
    args = ap.parse_args()

    zoo = build_zoo(resolve_config(args.preset), args.cache_dir)
    experts = list(zoo.experts.values())
    backend = HFBackend.from_pretrained(zoo.base, batch_size=128)
    merger = InMemoryMerger(zoo.base, experts)

    def score(
        method: str, weights: tuple[float, ...], density: float | None
    ) -> tuple[float, dict[str, float]]:
        params = [{"weight": w} if density is None else {"weight": w, "density": density} for w in weights]
        recipe = MergeRecipe.model_validate(
            {
                "merge_method": method,
                "base_model": zoo.base,
                "models": [{"model": e, "parameters": p} for e, p in zip(experts, params, strict=True)],
            }
        )
        backend.load_state_dict(merger.merge(recipe))
        result = evaluate(backend, zoo.tasks, "dev", zoo.root)  # type: ignore[arg-type]
        return result.mean, result.scores

    rows: list[tuple[float, str, dict[str, float]]] = []
    if args.weights:
        for text in args.weights.split(";"):
            ws = tuple(float(w) for w in text.split(","))
            mean, scores = score("task_arithmetic", ws, None)
            rows.append((mean, f"task_arithmetic w={ws}", scores))
    else:
        for ws in itertools.product([0.6, 1.0], [0.3, 0.6, 1.0], [0.3, 0.6, 1.0]):
            mean, scores = score("task_arithmetic", ws, None)
            rows.append((mean, f"task_arithmetic w={ws}", scores))
        for ws in [(1.0, 1.0, 1.0), (1.0, 0.5, 0.5), (1.0, 0.7, 0.7)]:
            for d in (0.2, 0.3):
                mean, scores = score("ties", ws, d)
                rows.append((mean, f"ties w={ws} density={d}", scores))
    if args.top > 0:
        rows.sort(key=lambda r: -r[0])
    shown = rows[: args.top] if args.top > 0 else rows
    print(f"{len(rows)} recipes on the dev split of zoo {zoo.config.name}:")
    for mean, label, scores in shown:
        detail = ", ".join(f"{k} {v:.3f}" for k, v in scores.items())
        print(f"  {mean:.3f}  {label}  ({detail})")


if __name__ == "__main__":
    main()
