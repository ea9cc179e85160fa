"""Gradient polish: does training the searched coefficients move the held-out test score?

Usage (numbers in docs/benchmarks.md):

    .venv/bin/python benchmarks/polish_effect.py --seeds 0,1,2 --budget 60 --json /tmp/polish.json

On the ``tiny`` zoo, for each seed:

- ``search``: the demo's search (per-layer task-arithmetic weights, attention and MLP apart, CMA-ES
  from the best seed recipe, ``--budget`` complete trials) and the product's honest pick on val;
- ``search + polish (<objective>)``: that pick polished (``evomerge polish``: ``--steps`` Adam steps at
  most, dev every 25 steps picks the step kept) with each objective of ``--objectives``;
- ``search, more trials``: the same study continued for as many more trials as the slowest polish
  took seconds (at the search's own rate), then picked again: search alone at equal wall time;
- ``uniform + polish (ce)``: uniform task arithmetic (w = 1/3) polished, no search at all.

Everything is scored on the test split; spreads are standard deviations across seeds (the search seed,
and the polish's batch order).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import optuna
from search_evidence import LAYERWISE, Scorer, _uniform

from evomerge.optimizer import LocalEvaluator, SamplerConfig, SweepConfig, resolve_sweep, run_search
from evomerge.optimizer.export import trial_recipe
from evomerge.optimizer.pick import honest_pick
from evomerge.optimizer.polish import PolishConfig, polish_recipe


def _pick(sweep: Any, evaluator: LocalEvaluator, study: optuna.Study) -> Any:
    pick = honest_pick(sweep, evaluator, study)
    assert pick is not None
    trial = next(t for t in study.get_trials(deepcopy=False) if t.number == pick.picked)
    return trial_recipe(trial)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--budget", type=int, default=60)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--lr", type=float, default=0.02)
    ap.add_argument("--objectives", default="ce,kl,entropy")
    ap.add_argument("--cache-dir", type=Path, default=None)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    objectives = args.objectives.split(",")
    rows: dict[str, list[float]] = {}
    per_seed: list[dict[str, Any]] = []
    workdir = Path(tempfile.mkdtemp(prefix="polish-bench-"))

    def add(name: str, value: float) -> None:
        rows.setdefault(name, []).append(value)

    for seed in seeds:
        cfg = SweepConfig(
            study_name=f"polish-{seed}",
            runs_dir=str(workdir),
            zoo="tiny",
            search_space=LAYERWISE,
            sampler=SamplerConfig(name="cmaes", seed=seed),
            n_trials=args.budget,
            backend={"batch_size": 256},
        )
        sweep = resolve_sweep(cfg, zoo_cache=args.cache_dir)
        evaluator = LocalEvaluator(sweep)
        score = Scorer(evaluator)
        t0 = time.perf_counter()
        study = run_search(sweep, evaluator)
        search_s = time.perf_counter() - t0
        searched = _pick(sweep, evaluator, study)
        record: dict[str, Any] = {"seed": seed, "search_s": round(search_s, 1)}
        record["search"] = score(searched, "test")["mean"]
        add("search", record["search"])
        slowest = 0.0
        for objective in objectives:
            pcfg = PolishConfig(objective=objective, steps=args.steps, lr=args.lr, seed=seed)  # type: ignore[arg-type]
            result = polish_recipe(searched, evaluator, pcfg)
            slowest = max(slowest, result.seconds)
            test = evaluator.score_state(result.state, "test")
            name = f"search + polish ({objective})"
            record[name] = {
                "test": float(test.mean),
                "dev": [result.start_dev, result.best_dev],
                "best_step": result.best_step,
                "seconds": round(result.seconds, 1),
                "loss_first_last": [result.history[1]["loss"], result.history[-1]["loss"]],
            }
            add(name, float(test.mean))
            print(
                f"seed {seed} {name}: dev {result.start_dev:.3f} -> {result.best_dev:.3f} (step "
                f"{result.best_step}), test {record['search']:.3f} -> {test.mean:.3f}, "
                f"{result.seconds:.0f} s",
                flush=True,
            )
        # search alone at equal wall time: continue the study for the polish's seconds
        extra = max(1, round(slowest / (search_s / args.budget)))
        more = resolve_sweep(
            cfg.model_copy(update={"n_trials": args.budget + extra}), zoo_cache=args.cache_dir
        )
        study = run_search(more, evaluator)
        record["search, more trials"] = {
            "extra_trials": extra,
            "test": score(_pick(more, evaluator, study), "test")["mean"],
        }
        add("search, more trials", record["search, more trials"]["test"])
        uniform = _uniform("task_arithmetic", sweep.base, sweep.experts, {"weight": 1 / len(sweep.experts)})
        result = polish_recipe(
            uniform, evaluator, PolishConfig(objective="ce", steps=args.steps, lr=args.lr, seed=seed)
        )
        record["uniform"] = score(uniform, "test")["mean"]
        add("uniform task arithmetic 1/3", record["uniform"])
        record["uniform + polish (ce)"] = float(evaluator.score_state(result.state, "test").mean)
        add("uniform + polish (ce)", record["uniform + polish (ce)"])
        print(f"seed {seed}: {json.dumps(record)}", flush=True)
        per_seed.append(record)

    print("\n| arm | test mean ± sd across seeds | per seed |\n|---|---|---|")
    for name, values in rows.items():
        sd = statistics.stdev(values) if len(values) > 1 else 0.0
        each = " / ".join(f"{v:.3f}" for v in values)
        print(f"| {name} | {statistics.mean(values):.3f} ± {sd:.3f} | {each} |")
    if args.json is not None:
        args.json.write_text(json.dumps({"seeds": per_seed, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
