"""Measure the expert zoo: build time, dev/test scores of the base, each expert and uniform merges.

Usage (numbers recorded in docs/benchmarks.md):

    .venv/bin/python benchmarks/zoo_quality.py --preset tiny --cache-dir /tmp/zoo-bench --force

Prints a markdown table; with ``--json FILE`` also writes the numbers.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from evomerge.checkpoints import ModelDir
from evomerge.evaluators import HFBackend, evaluate
from evomerge.merging import InMemoryMerger, MergeRecipe
from evomerge.zoo import build_zoo, resolve_config


def uniform(method: str, base: str, experts: list[str], **params: float) -> MergeRecipe:
    return MergeRecipe.model_validate(
        {
            "merge_method": method,
            "base_model": base,
            "models": [{"model": e, "parameters": dict(params)} for e in experts],
        }
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--cache-dir", type=Path, default=None)
    ap.add_argument("--force", action="store_true", help="rebuild the zoo to time the build")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()

    t0 = time.perf_counter()
    zoo = build_zoo(resolve_config(args.preset), args.cache_dir, force=args.force)
    wall = time.perf_counter() - t0
    experts = list(zoo.experts.values())
    n = len(experts)
    backend = HFBackend.from_pretrained(zoo.base, batch_size=128)
    merger = InMemoryMerger(zoo.base, experts)

    states: dict[str, dict] = {"base": backend.state_dict()}  # type: ignore[type-arg]
    for name, path in zoo.experts.items():
        with ModelDir(path) as md:
            states[f"expert {name}"] = {k: md.read(k).clone() for k in md.tensor_names()}
    recipes = {
        f"task arithmetic w=1/{n}": uniform("task_arithmetic", zoo.base, experts, weight=1 / n),
        "task arithmetic w=1": uniform("task_arithmetic", zoo.base, experts, weight=1.0),
        "ties w=1 density=0.5": uniform("ties", zoo.base, experts, weight=1.0, density=0.5),
    }
    for label, recipe in recipes.items():
        states[label] = merger.merge(recipe)

    tasks = [t.name for t in zoo.tasks]
    results: dict[str, dict[str, dict[str, float]]] = {}
    for label, state in states.items():
        backend.load_state_dict(state)
        results[label] = {}
        for split in ("dev", "test"):
            r = evaluate(backend, zoo.tasks, split, zoo.root)  # type: ignore[arg-type]
            results[label][split] = {**r.scores, "mean": r.mean}

    print(f"zoo {zoo.config.name} at {zoo.root}")
    print(f"build time: {zoo.build_seconds:.1f} s (this call: {wall:.1f} s)\n")
    header = " | ".join(f"{t} dev / test" for t in [*tasks, "mean"])
    print(f"| model | {header} |")
    print("|---" * (len(tasks) + 2) + "|")
    for label, res in results.items():
        cells = " | ".join(f"{res['dev'][t]:.3f} / {res['test'][t]:.3f}" for t in [*tasks, "mean"])
        print(f"| {label} | {cells} |")
    if args.json is not None:
        args.json.write_text(json.dumps({"build_seconds": zoo.build_seconds, "results": results}, indent=2))


if __name__ == "__main__":
    main()
