"""Adaptive (rsaf) against fixed-density sparsification (ties, dare_ties, breadcrumbs_ties, della) and sce,
on the tiny zoo: held-out test scores of the same uniform recipes.

Usage (numbers in docs/benchmarks.md):

    .venv/bin/python benchmarks/sparsifiers.py --preset tiny

Every method merges the zoo's three experts into its base with the same per-expert weight (1.0; sce has
no weights), the same density and TIES sign election with ``normalize: true`` (the default of ties, rsaf
and della; set explicitly for dare_ties and breadcrumbs_ties, whose mergekit default would sum the three
task vectors instead), so only the sparsifier differs. Random methods use recipe seeds 0, 1 and 2 and
report the mean. Scores are on the test split, which no search has looked at.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from evomerge.evaluators import HFBackend, evaluate
from evomerge.merging import InMemoryMerger, MergeRecipe
from evomerge.zoo import build_zoo, resolve_config

DENSITY_METHODS = ("ties", "rsaf", "dare_ties", "breadcrumbs_ties", "della")
RANDOM = {"dare_ties", "della"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--cache-dir", type=Path, default=None)
    ap.add_argument("--densities", default="0.2,0.35,0.5,0.7")
    args = ap.parse_args()

    zoo = build_zoo(resolve_config(args.preset), args.cache_dir)
    experts = list(zoo.experts.values())
    backend = HFBackend.from_pretrained(zoo.base, batch_size=128)
    merger = InMemoryMerger(zoo.base, experts)

    def score(
        method: str, per_model: dict[str, Any], seed: int = 0, parameters: dict[str, Any] | None = None
    ) -> tuple[float, dict[str, float]]:
        recipe = MergeRecipe.model_validate(
            {
                "merge_method": method,
                "base_model": zoo.base,
                "models": [{"model": e, "parameters": per_model} for e in experts],
                "parameters": parameters or {},
                "seed": seed,
            }
        )
        backend.load_state_dict(merger.merge(recipe))
        result = evaluate(backend, zoo.tasks, "test", zoo.root)  # type: ignore[arg-type]
        return result.mean, result.scores

    densities = [float(d) for d in args.densities.split(",")]
    print(f"zoo {zoo.config.name}, test split, mean over tasks")
    print("| method | " + " | ".join(f"density {d:g}" for d in densities) + " |")
    print("|---|" + "---|" * len(densities))
    for method in DENSITY_METHODS:
        cells: list[str] = []
        for density in densities:
            params: dict[str, Any] = {"weight": 1.0, "density": density}
            if method == "della":
                params["epsilon"] = round(min(0.15, density / 2, (1 - density) / 2), 4)
            seeds = (0, 1, 2) if method in RANDOM else (0,)
            means = [score(method, params, seed, {"normalize": True})[0] for seed in seeds]
            cells.append(f"{sum(means) / len(means):.3f}")
        print(f"| {method} | " + " | ".join(cells) + " |")
    for topk in (0.1, 0.5, 1.0):
        mean, scores = score("sce", {}, parameters={"select_topk": topk})
        detail = ", ".join(f"{k} {v:.3f}" for k, v in scores.items())
        print(f"sce select_topk={topk:g}: {mean:.3f} ({detail})")


if __name__ == "__main__":
    main()
