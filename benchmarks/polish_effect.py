"""Gradient polish as the product runs it: does the sweep's ``polish:`` stage move the held-out test score?

Usage (numbers in docs/benchmarks.md):

    .venv/bin/python benchmarks/polish_effect.py --seeds 0,1,2,3,4 --budget 60 --steps 100 \\
        --json /tmp/polish.json

On the ``tiny`` zoo, for each seed, the demo's sweep (per-layer task-arithmetic weights, attention and MLP
apart, ``--budget`` complete trials, the default seeds and the honest pick on val) is run with a
``polish:`` stage (cross-entropy, ``--steps`` Adam steps at most, dev every 25 steps picks the step kept,
starts: the pick and uniform task arithmetic w = 1/3) through ``final_report``, exactly as ``evomerge
search`` runs it. From that one report (the same test questions for every row):

- ``search``: the pick, unpolished;
- ``search + polish``: the pick polished;
- ``uniform + polish``: uniform task arithmetic w = 1/3 polished (no search at all);
- ``product``: the sweep's result (the best val mean among the three above), what the verdict reports;
- ``best expert`` and ``best uniform merge``: chosen on val, as the verdict chooses them; the paired
  differences ``product - best expert`` and ``product - best uniform`` per seed;
- ``search, more trials``: the same study continued for as many trials as the polish stage took
  seconds (at the search's own rate), picked again: search alone at equal wall time;
- with ``--random``, the same sweep with random search instead of CMA-ES (its product and its pick).

``--sweep YAML`` runs that sweep instead (its search space, backend and ``polish:``; the seed, budget and
study name from here), e.g. on SmolLM2:

    .venv/bin/python benchmarks/polish_effect.py --sweep experiments/smollm2-polish.yaml --budget 8 \
        --seeds 1,2 --no-more-trials --json /tmp/polish-smollm2.json

Spreads are standard deviations across seeds (the search seed and the polish's batch order).
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

from search_evidence import LAYERWISE, Scorer

from evomerge.optimizer import (
    LocalEvaluator,
    SamplerConfig,
    SweepConfig,
    final_report,
    load_sweep_config,
    resolve_sweep,
    run_search,
)
from evomerge.optimizer.config import PolishConfig
from evomerge.optimizer.export import trial_recipe
from evomerge.optimizer.pick import honest_pick
from evomerge.optimizer.report import FinalReport, Row


def _best_by_val(rows: list[Row], kind: str) -> Row:
    return max((r for r in rows if r.kind == kind), key=lambda r: r.val_mean or 0.0)


def product_run(
    name: str, sampler: str, seed: int, args: argparse.Namespace, workdir: Path
) -> tuple[dict[str, Any], FinalReport, Any, LocalEvaluator, float]:
    polish = PolishConfig(objective=args.objective, steps=args.steps, lr=args.lr, seed=seed)
    if args.sweep is not None:  # a sweep YAML (e.g. experiments/smollm2-polish.yaml): its space and polish
        base = load_sweep_config(args.sweep)
        polish = (base.polish or polish).model_copy(update={"seed": seed})
        cfg = base.model_copy(
            update={
                "study_name": f"{name}-{seed}",
                "runs_dir": str(workdir),
                "sampler": base.sampler.model_copy(update={"name": sampler, "seed": seed}),
                "n_trials": args.budget,
                "materialize_best": False,
                "polish": polish,
            }
        )
    else:
        cfg = SweepConfig(
            study_name=f"{name}-{seed}",
            runs_dir=str(workdir),
            zoo="tiny",
            search_space=LAYERWISE,
            sampler=SamplerConfig(name=sampler, seed=seed),  # type: ignore[arg-type]
            n_trials=args.budget,
            backend={"batch_size": 256},
            materialize_best=False,
            polish=polish,
        )
    sweep = resolve_sweep(cfg, zoo_cache=args.cache_dir)
    evaluator = LocalEvaluator(sweep)
    t0 = time.perf_counter()
    study = run_search(sweep, evaluator)
    search_s = time.perf_counter() - t0
    report = final_report(sweep, evaluator, study)
    stage = report.polish
    assert stage is not None
    rows = {r.name: r for r in report.test}
    pick_run, uniform_run = stage.runs
    expert = _best_by_val(report.test, "expert")
    uniform = _best_by_val(report.test, "uniform")
    product = next(r for r in report.test if r.kind == "searched")
    assert report.verdict is not None
    diffs = {c.role: {"diff": c.diff, "se": c.se, "outcome": c.outcome} for c in report.verdict.comparisons}
    record = {
        "search_s": round(search_s, 1),
        "polish_s": round(sum(r.seconds for r in stage.runs), 1),
        "search": rows[stage.pick_label].mean,
        "search + polish": rows[pick_run.label].mean,
        "uniform + polish": rows[uniform_run.label].mean,
        "product": product.mean,
        "product is": product.name,
        "best expert": [expert.name, expert.mean],
        "best uniform merge": [uniform.name, uniform.mean],
        "verdict": diffs,
        "val": {"pick": stage.pick_val, **{r.label: r.val_mean for r in stage.runs}},
        "dev": {r.label: [r.start_dev, r.best_dev, r.best_step] for r in stage.runs},
    }
    return record, report, sweep, evaluator, search_s


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--seeds", default="0,1,2,3,4")
    ap.add_argument("--budget", type=int, default=60)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--lr", type=float, default=0.02)
    ap.add_argument("--objective", default="ce", choices=["ce", "kl", "entropy"])
    ap.add_argument("--random", action="store_true", help="Also run the sweep with random search.")
    ap.add_argument(
        "--sweep",
        type=Path,
        default=None,
        help="A sweep YAML instead of the tiny zoo's (its polish: is used).",
    )
    ap.add_argument(
        "--no-more-trials", action="store_true", help="Skip the search continued for the stage's wall time."
    )
    ap.add_argument("--cache-dir", type=Path, default=None)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    rows: dict[str, list[float]] = {}
    per_seed: list[dict[str, Any]] = []
    workdir = Path(tempfile.mkdtemp(prefix="polish-bench-"))
    atexit.register(shutil.rmtree, workdir, ignore_errors=True)  # models and studies: GBs

    def add(name: str, value: float) -> None:
        rows.setdefault(name, []).append(value)

    for seed in seeds:
        record, _, sweep, evaluator, search_s = product_run("polish", "cmaes", seed, args, workdir)
        record["seed"] = seed
        for key in ("search", "search + polish", "uniform + polish", "product"):
            add(key, record[key])
        add("best expert (val-chosen)", record["best expert"][1])
        add("best uniform merge (val-chosen)", record["best uniform merge"][1])
        add("product - best expert", record["verdict"]["best expert"]["diff"])
        add("product - best uniform merge", record["verdict"]["best uniform merge"]["diff"])
        if args.no_more_trials:
            print(f"seed {seed}: {json.dumps(record)}", flush=True)
            per_seed.append(record)
            continue
        # search alone at equal wall time: continue the study for the polish stage's seconds
        extra = max(1, round(record["polish_s"] / (search_s / args.budget)))
        more = resolve_sweep(
            sweep.config.model_copy(update={"n_trials": args.budget + extra, "polish": None}),
            zoo_cache=args.cache_dir,
        )
        study = run_search(more, evaluator)
        pick = honest_pick(more, evaluator, study)
        assert pick is not None
        trial = next(t for t in study.get_trials(deepcopy=False) if t.number == pick.picked)
        record["search, more trials"] = {
            "extra_trials": extra,
            "test": Scorer(evaluator)(trial_recipe(trial), "test")["mean"],
        }
        add("search, more trials (equal wall time)", record["search, more trials"]["test"])
        if args.random:
            rnd, _, _, _, _ = product_run("polish-random", "random", seed, args, workdir)
            record["random"] = rnd
            add("random search", rnd["search"])
            add("random search + polish stage (product)", rnd["product"])
        print(f"seed {seed}: {json.dumps(record)}", flush=True)
        per_seed.append(record)

    print("\n| arm | test mean ± sd across seeds | per seed |\n|---|---|---|")
    for name, values in rows.items():
        sd = statistics.stdev(values) if len(values) > 1 else 0.0
        each = " / ".join(f"{v:+.3f}" if name.startswith("product -") else f"{v:.3f}" for v in values)
        print(f"| {name} | {statistics.mean(values):.3f} ± {sd:.3f} | {each} |")
    if args.json is not None:
        args.json.write_text(json.dumps({"seeds": per_seed, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
