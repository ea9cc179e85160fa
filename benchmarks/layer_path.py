"""Parameter space vs data-flow (layer-path) space vs both, at the same budget, on held-out test questions.

Usage (numbers in docs/benchmarks.md):

    .venv/bin/python benchmarks/layer_path.py --zoo-seed 0 --seeds 0,1,2,3,4 --budget 60

On the evidence benchmark's ``tiny`` zoo (seed 0: the demo's), for every search seed, CMA-ES searches with
``--budget`` complete trials and the product's honest pick chooses (top 5 by dev re-scored on val):

- ``param``: per-layer task-arithmetic weights, attention and MLP apart (the evidence benchmark's
  ``cmaes``);
- ``path``: the layer-path space over the base and the three experts (``repeats: 2``: 2 x 4 x 4 = 32
  inclusion genes);
- ``path-scale``: the same with a residual-scale gene per slot (64 genes): does scaling help?
- ``both``: ``param`` with half the budget, its pick written to disk, then the layer-path space over that
  merge, the base and the experts with the other half (sources 5 x 4 x 2 = 40 slots).

Every search enqueues its space's default seeds (uniform task arithmetic and the experts; for a layer
path each source model's own path). Reported: test mean per arm (mean ± sd across seeds), the best
expert and the best uniform task-arithmetic weight (both chosen on dev+val), and the mean depth of the
picked paths. A margin under two standard deviations is not a win.
"""

from __future__ import annotations

import argparse
import atexit
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import optuna
from search_evidence import LAYERWISE, Scorer, _uniform

from evomerge.merging import MergeRecipe, merge_streaming
from evomerge.optimizer import LocalEvaluator, SamplerConfig, SweepConfig, resolve_sweep, run_search
from evomerge.optimizer.export import trial_recipe
from evomerge.optimizer.pick import honest_pick
from evomerge.optimizer.sweep import ResolvedSweep
from evomerge.search_spaces import LayerPathConfig, SearchSpaceConfig

PATH = SearchSpaceConfig(layer_path=LayerPathConfig(repeats=2))
PATH_SCALE = SearchSpaceConfig(layer_path=LayerPathConfig(repeats=2, scale=True))


def _depth(recipe: MergeRecipe, num_layers: int) -> int:
    recipe = recipe.for_layers(num_layers)
    return sum(p.length for p in recipe.slices) if recipe.slices else num_layers


def _search(
    sweep: ResolvedSweep, evaluator: LocalEvaluator, score: Scorer, stats: dict[str, Any] | None = None
) -> tuple[MergeRecipe, dict[str, float], float]:
    t0 = time.perf_counter()
    study = run_search(sweep, evaluator)
    seconds = time.perf_counter() - t0
    pick = honest_pick(sweep, evaluator, study)
    assert pick is not None
    chosen = trial_recipe(study.trials[pick.picked])
    if stats is not None:  # what the search saw: distinct candidates, and the best that is not one model
        complete = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
        scored = [t for t in complete if "duplicate_of" not in t.user_attrs]
        mixed = [t for t in scored if trial_recipe(t).slices]
        stats["distinct"] = len(scored)
        stats["mixed"] = len(mixed)
        stats["best_dev"] = max(float(t.user_attrs["mean"]) for t in scored)
        stats["best_mixed_dev"] = max((float(t.user_attrs["mean"]) for t in mixed), default=None)
    return chosen, score(chosen, "test"), seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--zoo-seed", type=int, default=0)
    ap.add_argument("--seeds", default="0,1,2,3,4")
    ap.add_argument("--budget", type=int, default=60)
    ap.add_argument("--arms", default="param,path,path-scale,both")
    ap.add_argument("--cache-dir", type=Path, default=None)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    arms = args.arms.split(",")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    workdir = Path(tempfile.mkdtemp(prefix="evomerge-layer-path-"))
    atexit.register(shutil.rmtree, workdir, ignore_errors=True)
    spec = "tiny"
    if args.zoo_seed:
        from search_evidence import _zoo_spec

        spec = _zoo_spec(args.zoo_seed, workdir)
    runs = workdir / "runs"
    first = resolve_sweep(
        SweepConfig(study_name="evaluator", runs_dir=str(runs), zoo=spec, backend={"batch_size": 256}),
        zoo_cache=args.cache_dir,
    )
    evaluator = LocalEvaluator(first)
    score = Scorer(evaluator)
    num_layers = evaluator.merger.num_layers
    rows: dict[str, Any] = {}
    best_expert = max(first.experts, key=score.selection)
    rows["best expert (dev+val)"] = score(best_expert, "test")["mean"]
    uniform = [
        _uniform("task_arithmetic", first.base, first.experts, {"weight": 0.1 * k}) for k in range(1, 13)
    ]
    rows["uniform task arithmetic (grid, dev+val)"] = score(max(uniform, key=score.selection), "test")["mean"]

    def sweep_config(name: str, space: SearchSpaceConfig, seed: int, budget: int) -> SweepConfig:
        return SweepConfig(
            study_name=name,
            runs_dir=str(runs),
            zoo=spec,
            search_space=space,
            sampler=SamplerConfig(name="cmaes", seed=seed),
            n_trials=budget,
            backend={"batch_size": 256},
        )

    results: dict[str, list[dict[str, Any]]] = {a: [] for a in arms}
    for seed in seeds:
        for arm in arms:
            t0 = time.perf_counter()
            stats: dict[str, Any] = {}
            if arm in ("param", "path", "path-scale"):
                space = {"param": LAYERWISE, "path": PATH, "path-scale": PATH_SCALE}[arm]
                sweep = resolve_sweep(
                    sweep_config(f"{arm}-{seed}", space, seed, args.budget), zoo_cache=args.cache_dir
                )
                chosen, test, _ = _search(sweep, evaluator, score, stats if arm != "param" else None)
            else:  # both: a parameter-space merge, then a layer path over it
                half = args.budget // 2
                sweep = resolve_sweep(
                    sweep_config(f"both-param-{seed}", LAYERWISE, seed, half), zoo_cache=args.cache_dir
                )
                merged_recipe, _, _ = _search(sweep, evaluator, score)
                merged = str(merge_streaming(merged_recipe, workdir / f"merged-{seed}", overwrite=True))
                cfg = sweep_config(f"both-path-{seed}", PATH, seed, args.budget - half)
                both = ResolvedSweep(cfg, first.base, (merged, *first.experts), first.tasks, first.data_dir)
                both_evaluator = LocalEvaluator(both)
                chosen, test, _ = _search(both, both_evaluator, Scorer(both_evaluator), stats)
                del both_evaluator
            seconds = time.perf_counter() - t0
            depth = _depth(chosen, num_layers)
            results[arm].append(
                {"seed": seed, "test": test, "depth": depth, "seconds": round(seconds, 1), **stats}
            )
            print(
                f"seed {seed} {arm}: test {test['mean']:.3f} depth {depth} ({seconds:.0f} s) {stats}",
                flush=True,
            )

    print(f"\ntiny zoo seed {args.zoo_seed}, budget {args.budget}, seeds {seeds}: test mean")
    for label, value in rows.items():
        print(f"| {label} | {value:.3f} |")
    summary: dict[str, Any] = {}
    for arm, per_seed in results.items():
        means = [r["test"]["mean"] for r in per_seed]
        m = statistics.mean(means)
        sd = statistics.stdev(means) if len(means) > 1 else 0.0
        depth = statistics.mean(r["depth"] for r in per_seed)
        secs = statistics.mean(r["seconds"] for r in per_seed)
        summary[arm] = {"mean": m, "sd": sd, "depth": depth, "seconds": secs}
        print(f"| {arm} | {m:.3f} ± {sd:.3f} | mean depth {depth:.1f} | {secs:.0f} s per search |")
    if "param" in summary:
        base_m, base_sd = summary["param"]["mean"], summary["param"]["sd"]
        for arm, s in summary.items():
            if arm == "param":
                continue
            d = s["mean"] - base_m
            spread = max(base_sd, s["sd"])
            verdict = (
                "no spread: one seed" if spread == 0 else ("> 2 sd" if abs(d) > 2 * spread else "within 2 sd")
            )
            print(f"{arm} - param: {d:+.3f} ({verdict})")
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "arms": results, "summary": summary}, indent=2))


if __name__ == "__main__":
    main()
