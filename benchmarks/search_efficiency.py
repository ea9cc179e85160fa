"""Search efficiency on the zoo: best held-out test score against the number of evaluations, per searcher.

Usage (numbers in docs/benchmarks.md):

    .venv/bin/python benchmarks/search_efficiency.py --preset tiny --budget 60 --seeds 0,1,2

Every searcher (CMA-ES, the default; TPE; NSGA-II with one objective per task; nevergrad NGOpt; random)
runs the demo's search space (per-layer task-arithmetic weights, 3 experts x 4 layers = 12 genes, in
[0, 1.2]) for ``--budget`` complete trials per seed, with the same seeds and no seed genomes, so each
starts from nothing. After n evaluations the trial with the best dev mean so far is the searcher's pick;
the table reports its **test** mean (the split no searcher saw), averaged over seeds, at several n.
Baselines: uniform task arithmetic over a weight grid and a uniform TIES grid (weight x density), the
grid point chosen by dev, reported on test. A PNG of the curves goes to ``--plot``.
"""

from __future__ import annotations

import argparse
import atexit
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import optuna

from evomerge.evaluators import HFBackend, evaluate
from evomerge.merging import InMemoryMerger, MergeRecipe
from evomerge.optimizer import LocalEvaluator, SamplerConfig, SweepConfig, resolve_sweep, run_search
from evomerge.optimizer.export import trial_recipe
from evomerge.search_spaces import ParamRange, SearchSpaceConfig
from evomerge.zoo import build_zoo, resolve_config

SEARCHERS: dict[str, dict[str, Any]] = {
    "cmaes (default)": {"name": "cmaes"},
    "tpe": {"name": "tpe"},
    "nsga2": {"name": "nsga2"},
    "nevergrad NGOpt": {"name": "nevergrad", "optimizer": "NGOpt"},
    "random": {"name": "random"},
}
SPACE = SearchSpaceConfig(
    method="task_arithmetic",
    params=(ParamRange(name="weight", low=0.0, high=1.2),),
    granularity="layer",
    global_parameters={"lambda": 1.0},
)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--cache-dir", type=Path, default=None)
    ap.add_argument("--budget", type=int, default=60)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--checkpoints", default="10,20,40,60")
    ap.add_argument("--plot", type=Path, default=Path("docs/search_efficiency.png"))
    args = ap.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    checkpoints = [int(c) for c in args.checkpoints.split(",") if int(c) <= args.budget]

    zoo = build_zoo(resolve_config(args.preset), args.cache_dir)
    experts = list(zoo.experts.values())
    runs = Path(tempfile.mkdtemp(prefix="evomerge-search-eff-"))
    atexit.register(shutil.rmtree, runs, ignore_errors=True)  # models and studies: GBs
    first = resolve_sweep(
        SweepConfig(study_name="evaluator", runs_dir=str(runs), zoo=args.preset), zoo_cache=args.cache_dir
    )
    evaluator = LocalEvaluator(first)
    test_cache: dict[str, float] = {}

    def test_mean(recipe: MergeRecipe) -> float:
        key = recipe.model_dump_json()
        if key not in test_cache:
            evaluator.backend.load_state_dict(evaluator.merger.merge(recipe))
            test_cache[key] = evaluate(evaluator.backend, zoo.tasks, "test", zoo.root).mean  # type: ignore[arg-type]
        return test_cache[key]

    curves: dict[str, dict[int, list[float]]] = {}
    seconds: dict[str, float] = {}
    for label, sampler in SEARCHERS.items():
        curves[label] = {c: [] for c in checkpoints}
        t0 = time.perf_counter()
        for seed in seeds:
            cfg = SweepConfig(
                study_name=f"{sampler['name']}-{sampler.get('optimizer', '')}-{seed}",
                runs_dir=str(runs),
                zoo=args.preset,
                search_space=SPACE,
                sampler=SamplerConfig(**sampler, seed=seed),
                n_trials=args.budget,
                backend={"batch_size": 128},
            )
            study = run_search(resolve_sweep(cfg, zoo_cache=args.cache_dir), evaluator)
            complete = sorted(
                study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)),
                key=lambda t: t.number,
            )
            for c in checkpoints:
                pick = max(complete[:c], key=lambda t: (float(t.user_attrs["mean"]), -t.number))
                curves[label][c].append(test_mean(trial_recipe(pick)))
        seconds[label] = time.perf_counter() - t0

    # baselines: uniform grids, the point chosen by dev, reported on test
    backend: HFBackend = evaluator.backend
    merger: InMemoryMerger = evaluator.merger

    def grid(method: str, points: list[dict[str, float]]) -> tuple[float, float, dict[str, float]]:
        scored = []
        for params in points:
            recipe = MergeRecipe.model_validate(
                {
                    "merge_method": method,
                    "base_model": zoo.base,
                    "models": [{"model": e, "parameters": params} for e in experts],
                    "dtype": "float32",
                }
            )
            backend.load_state_dict(merger.merge(recipe))
            dev = evaluate(backend, zoo.tasks, "dev", zoo.root).mean  # type: ignore[arg-type]
            scored.append((dev, test_mean(recipe), params))
        best = max(scored, key=lambda s: s[0])
        return best[1], max(s[1] for s in scored), best[2]

    ta = grid("task_arithmetic", [{"weight": round(0.1 * k, 2)} for k in range(1, 13)])
    ties = grid(
        "ties",
        [{"weight": w, "density": d} for w in (0.3, 0.5, 0.7, 1.0) for d in (0.3, 0.5, 0.7, 1.0)],
    )

    print(f"zoo {zoo.config.name}, budget {args.budget}, seeds {seeds}: test mean of the best-by-dev trial")
    print("| searcher | " + " | ".join(f"after {c}" for c in checkpoints) + " | s per sweep |")
    print("|---|" + "---|" * (len(checkpoints) + 1))
    for label, by_c in curves.items():
        cells = []
        for c in checkpoints:
            vals = by_c[c]
            sd = statistics.stdev(vals) if len(vals) > 1 else 0.0
            cells.append(f"{statistics.mean(vals):.3f} ± {sd:.3f}")
        print(f"| {label} | " + " | ".join(cells) + f" | {seconds[label] / len(seeds):.0f} |")
    for name, (chosen, best_test, params) in (
        ("uniform task arithmetic grid (12 weights)", ta),
        ("uniform TIES grid (4 weights x 4 densities)", ties),
    ):
        print(f"| {name}, dev-chosen {params} | {chosen:.3f} (grid's best on test {best_test:.3f}) |")
    for label, by_c in curves.items():
        print(f"{label}: final per seed {[round(v, 3) for v in by_c[checkpoints[-1]]]}")

    if args.plot:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        fig = Figure(figsize=(7, 4.2), dpi=120)
        FigureCanvasAgg(fig)
        ax = fig.add_subplot()
        for label, by_c in curves.items():
            means = [statistics.mean(by_c[c]) for c in checkpoints]
            ax.plot(checkpoints, means, marker="o", label=label)
        ax.axhline(ta[0], color="grey", linestyle="--", label="uniform TA grid (dev-chosen)")
        ax.axhline(ties[0], color="black", linestyle=":", label="uniform TIES grid (dev-chosen)")
        ax.set_xlabel("evaluations (complete trials)")
        ax.set_ylabel(f"test mean of best-by-dev trial ({len(seeds)} seeds)")
        ax.set_title(f"Search efficiency on the {zoo.config.name} zoo")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        args.plot.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(args.plot)
        print(f"plot: {args.plot}")


if __name__ == "__main__":
    main()
