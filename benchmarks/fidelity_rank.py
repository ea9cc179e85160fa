"""How well does a small dev subset rank candidates, compared with the full dev set?

Usage (numbers in docs/benchmarks.md):

    .venv/bin/python benchmarks/fidelity_rank.py --preset tiny --recipes 100 --orders 5

Draws ``--recipes`` random task-arithmetic recipes (one weight per expert and per layer, uniform in
[0, 1.2], the demo's search space) on the zoo, scores each on the full dev split and on the
multi-fidelity rungs of each size in ``--sizes`` (the first questions per task of each task's fixed
nested order, exactly what a sweep's ``fidelity: rungs`` scores), and prints the Spearman rank correlation
between each subset's mean score and the full dev mean, with the evaluation time per candidate.

``--anchors`` adds the anchor-question estimator (evomerge/optimizer/anchors.py): anchors are fit on the
per-question scores of the base, the experts and the first ``--fit`` recipes (the candidates a sweep
has already scored), and the remaining recipes are ranked by the anchor estimate, against the mean of
equally many random questions per task (``--draws`` draws) and the nested rung of the same size, all
on those remaining recipes.
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
from pathlib import Path

import numpy as np

from evomerge.evaluators import HFBackend, QuestionRecord, evaluate, load_split
from evomerge.merging import InMemoryMerger, MergeRecipe
from evomerge.optimizer.anchors import estimate_mean, fit_anchors
from evomerge.zoo import build_zoo, resolve_config


def ranks(values: list[float]) -> list[float]:
    """Average ranks (ties share the mean of their positions)."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    out = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):
            out[order[k]] = (i + j) / 2
        i = j + 1
    return out


def spearman(a: list[float], b: list[float]) -> float:
    ra, rb = ranks(a), ranks(b)
    ma, mb = sum(ra) / len(ra), sum(rb) / len(rb)
    cov = sum((x - ma) * (y - mb) for x, y in zip(ra, rb, strict=True))
    va = sum((x - ma) ** 2 for x in ra) ** 0.5
    vb = sum((y - mb) ** 2 for y in rb) ** 0.5
    return cov / (va * vb) if va and vb else float("nan")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--cache-dir", type=Path, default=None)
    ap.add_argument("--recipes", type=int, default=30)
    ap.add_argument("--sizes", default="10,25,50,100")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--orders", type=int, default=1, help="rung orders (task seeds) to average the Spearman over"
    )
    ap.add_argument("--anchors", action="store_true", help="compare the anchor estimator (see above)")
    ap.add_argument("--fit", type=int, default=20, help="recipes whose answers fit the anchors")
    ap.add_argument("--draws", type=int, default=20, help="random subsets per size")
    args = ap.parse_args()

    zoo = build_zoo(resolve_config(args.preset), args.cache_dir)
    experts = list(zoo.experts.values())
    backend = HFBackend.from_pretrained(zoo.base, batch_size=128)
    merger = InMemoryMerger(zoo.base, experts)
    layers = merger.num_layers
    rng = random.Random(args.seed)
    sizes = [int(s) for s in args.sizes.split(",")]
    full_tasks = list(zoo.tasks)

    full: list[float] = []
    patterns: list[dict[str, list[float]]] = []  # per recipe: per task, the dev question scores
    questions = {t.name: [ex.id for ex in load_split(t, "dev", zoo.root)] for t in full_tasks}

    def pattern(memo: dict[tuple[str, str, str], QuestionRecord]) -> dict[str, list[float]]:
        return {t: [memo[(t, "dev", q)].score for q in ids] for t, ids in questions.items()}

    reference: list[dict[str, list[float]]] = []
    if args.anchors:  # the sweep's seeds: base and experts
        for path in [zoo.base, *experts]:
            ref = HFBackend.from_pretrained(path, batch_size=128)
            memo0: dict[tuple[str, str, str], QuestionRecord] = {}
            evaluate(ref, full_tasks, "dev", zoo.root, memo=memo0)  # type: ignore[arg-type]
            reference.append(pattern(memo0))
    small: dict[tuple[int, int], list[float]] = {(n, o): [] for n in sizes for o in range(args.orders)}
    reordered = [[t.model_copy(update={"seed": t.seed + o}) for t in full_tasks] for o in range(args.orders)]
    seconds: dict[int, float] = {n: 0.0 for n in [*sizes, 0]}
    for _ in range(args.recipes):
        models = [
            {"model": e, "parameters": {"weight": [round(rng.uniform(0.0, 1.2), 4) for _ in range(layers)]}}
            for e in experts
        ]
        recipe = MergeRecipe.model_validate(
            {"merge_method": "task_arithmetic", "base_model": zoo.base, "models": models}
        )
        backend.load_state_dict(merger.merge(recipe))
        t0 = time.perf_counter()
        memo: dict[tuple[str, str, str], QuestionRecord] = {}
        full.append(evaluate(backend, full_tasks, "dev", zoo.root, memo=memo).mean)  # type: ignore[arg-type]
        patterns.append(pattern(memo))
        seconds[0] += time.perf_counter() - t0
        for n in sizes:
            t0 = time.perf_counter()
            small[n, 0].append(evaluate(backend, full_tasks, "dev", zoo.root, limit=n).mean)  # type: ignore[arg-type]
            seconds[n] += time.perf_counter() - t0
            for o in range(1, args.orders):  # other orders of the same questions: answers reused
                rung = evaluate(backend, reordered[o], "dev", zoo.root, limit=n, memo=memo)  # type: ignore[arg-type]
                small[n, o].append(rung.mean)

    per_task = len(zoo.tasks)
    print(
        f"{args.recipes} random per-layer task-arithmetic recipes on zoo {zoo.config.name} ({per_task} tasks)"
    )
    print(f"Spearman over {args.orders} rung order(s): mean (min-max)")
    print("| questions per task | Spearman vs full dev | eval s per candidate |")
    print("|---|---|---|")
    for n in sizes:
        rhos = [spearman(small[n, o], full) for o in range(args.orders)]
        spread = f" ({min(rhos):.3f}-{max(rhos):.3f})" if len(rhos) > 1 else ""
        print(f"| {n} | {sum(rhos) / len(rhos):.3f}{spread} | {seconds[n] / args.recipes:.3f} |")
    full_n = zoo.config.dev_size
    print(f"| {full_n} (full dev) | 1.000 | {seconds[0] / args.recipes:.3f} |")
    if args.anchors:
        anchor_table(args, sizes, full, small, patterns, reference, questions)


def anchor_table(
    args: argparse.Namespace,
    sizes: list[int],
    full: list[float],
    small: dict[tuple[int, int], list[float]],
    patterns: list[dict[str, list[float]]],
    reference: list[dict[str, list[float]]],
    questions: dict[str, list[str]],
) -> None:
    fit_rows = reference + patterns[: args.fit]
    rest = range(args.fit, len(full))
    target = [full[i] for i in rest]
    rng = np.random.default_rng(args.seed)
    print(
        f"\nAnchors fit on base + experts + {args.fit} recipes; Spearman vs full dev on the other "
        f"{len(target)} recipes (random subsets: mean and sd over {args.draws} draws)"
    )
    print("| questions per task | anchors | random subset | nested rung |")
    print("|---|---|---|---|")
    for n in sizes:
        estimates = []
        anchors = {t: fit_anchors([row[t] for row in fit_rows], n, seed=args.seed) for t in questions}
        for i in rest:
            per_task = {t: a.estimate([patterns[i][t][j] for j in a.indices]) for t, a in anchors.items()}
            estimates.append(estimate_mean(per_task))
        rho_anchor = spearman(estimates, target)
        rhos = []
        for _ in range(args.draws):
            picks = {
                t: rng.choice(len(ids), size=min(n, len(ids)), replace=False) for t, ids in questions.items()
            }
            means = [
                float(np.mean([np.mean([patterns[i][t][j] for j in picks[t]]) for t in questions]))
                for i in rest
            ]
            rhos.append(spearman(means, target))
        rho_nested = spearman([small[n, 0][i] for i in rest], target)
        used = statistics.mean(len(a.indices) for a in anchors.values())
        print(
            f"| {n} | {rho_anchor:.3f} ({used:.0f} used) | {float(np.nanmean(rhos)):.3f} ± "
            f"{float(np.nanstd(rhos, ddof=1)) if len(rhos) > 1 else 0.0:.3f} | {rho_nested:.3f} |"
        )


if __name__ == "__main__":
    main()
