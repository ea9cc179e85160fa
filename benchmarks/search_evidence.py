"""Evidence: does the searched merge beat what a user gets for free, on held-out test questions?

Usage (numbers in docs/benchmarks.md):

    .venv/bin/python benchmarks/search_evidence.py --zoo-seeds 0,1 --seeds 0,1,2,3,4 --budget 60

For each zoo seed the ``tiny`` zoo is built (seed 0 is the demo's zoo; other seeds change its data and
initialisation, the same recipe otherwise). Then, at the same budget of complete trials per search and
for every search seed, each arm searches and makes the product's honest pick (the top 5 trials by dev
mean re-scored on the val questions the search never saw; the best val mean is the pick):

- ``cmaes`` (the default: its first distribution centred on the best seed, step 0.1 of each range),
  ``cmaes-centre`` (Optuna's start: the centre of the box, step 1/6), ``tpe`` and ``random``: per-layer
  task-arithmetic weights with attention and MLP apart (3 experts x 4 layers x 2 parts = 24 genes in
  [0, 1.5]);
- ``mergekit-evolve-style``: CMA-ES over TIES weights and densities per group of 2 layers (the genome
  mergekit-evolve searches);
- ``methods-learned`` and ``methods-uniform``: CMA-ES over per-layer weights and densities with the
  method (task arithmetic, TIES, DARE) as a gene, chosen by the bandit of
  ``evomerge/optimizer/method_choice.py`` (the default) or uniformly for every trial; the JSON records
  each trial's method;
- ``cmaes-anchors``: ``cmaes`` with anchor-question fitness (``fidelity: {anchors: 10}``): its search
  seconds and pruned trials against ``cmaes``'s at the same number of complete trials;
- ``cmaes-lambda``: ``cmaes`` with task arithmetic's ``lambda`` searched (in [0.5, 2]) instead of fixed
  at 1: a global parameter as a gene.

Every search enqueues the product's default seeds first (uniform task arithmetic, each expert alone).
Baselines, each chosen by its mean over dev and val (every non-test question, more than any search
uses for its choice): the best single expert, a uniform task-arithmetic grid (12 weights) and a uniform
TIES grid (4 weights x 4 densities). Everything is reported on **test**, per task and as the mean over
all tasks, ``comp`` (the compositional family no model trains on) included. Spreads are standard
deviations across search seeds; a margin under two of them is not a win. A PNG of the test score of the
dev-best trial against the number of evaluations goes to ``--plot``; all raw figures to ``--json``.
"""

from __future__ import annotations

import argparse
import atexit
import json
import shutil
import statistics
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import optuna
import yaml

from evomerge.merging import MergeRecipe
from evomerge.optimizer import LocalEvaluator, SamplerConfig, SweepConfig, resolve_sweep, run_search
from evomerge.optimizer.export import trial_recipe
from evomerge.optimizer.pick import honest_pick
from evomerge.search_spaces import ParamRange, SearchSpaceConfig
from evomerge.zoo import PRESETS, build_zoo

LAYERWISE = SearchSpaceConfig(
    method="task_arithmetic",
    params=(ParamRange(name="weight", low=0.0, high=1.5),),
    granularity="layer",
    split_attn_mlp=True,
    global_parameters={"lambda": 1.0},
)
EVOLVE = SearchSpaceConfig(
    method="ties",
    params=(ParamRange(name="weight", low=0.0, high=1.5), ParamRange(name="density", low=0.1, high=1.0)),
    granularity="layer_group",
    group_size=2,
)
METHODS = SearchSpaceConfig(
    methods=("task_arithmetic", "ties", "dare_linear"),
    params=(ParamRange(name="weight", low=0.0, high=1.5), ParamRange(name="density", low=0.1, high=1.0)),
    granularity="layer",
    global_parameters={"lambda": 1.0},
)
ARMS: dict[str, tuple[SearchSpaceConfig, dict[str, Any]]] = {
    "cmaes": (LAYERWISE, {"name": "cmaes"}),
    "cmaes-centre": (LAYERWISE, {"name": "cmaes", "start": "center"}),
    "tpe": (LAYERWISE, {"name": "tpe"}),
    "random": (LAYERWISE, {"name": "random"}),
    "mergekit-evolve-style": (EVOLVE, {"name": "cmaes"}),
    # issue 14: the method gene learned by a bandit (the default) vs drawn uniformly for every trial
    "methods-learned": (METHODS, {"name": "cmaes"}),
    "methods-uniform": (METHODS, {"name": "cmaes", "method_choice": "uniform"}),
    # issue 14: the default search with anchor-question fitness (10 anchors per task; the rest of dev only
    # for candidates whose estimate reaches the median); the budget still counts complete trials
    "cmaes-anchors": (LAYERWISE, {"name": "cmaes"}),
    # issue 14: a method-wide parameter as a gene (task arithmetic's lambda searched in [0.5, 2], not fixed)
    "cmaes-lambda": (
        LAYERWISE.model_copy(
            update={"global_parameters": {}, "global_params": (ParamRange(name="lambda", low=0.5, high=2.0),)}
        ),
        {"name": "cmaes"},
    ),
}
# Sweep settings an arm adds to the default sweep.
ARM_SWEEP: dict[str, dict[str, Any]] = {
    "cmaes-anchors": {"fidelity": {"anchors": 10, "n_startup_trials": 10}}
}


def _mean_sd(values: Sequence[float]) -> tuple[float, float]:
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def _uniform(method: str, base: str, experts: Sequence[str], params: dict[str, float]) -> MergeRecipe:
    return MergeRecipe.model_validate(
        {
            "merge_method": method,
            "base_model": base,
            "models": [{"model": e, "parameters": params} for e in experts],
            "dtype": "float32",
        }
    )


class Scorer:
    """Scores recipes and model directories on a split, once each (the same questions every time)."""

    def __init__(self, evaluator: LocalEvaluator) -> None:
        self.evaluator = evaluator
        self.cache: dict[tuple[str, str], dict[str, float]] = {}

    def __call__(self, what: MergeRecipe | str, split: str) -> dict[str, float]:
        key = (what if isinstance(what, str) else what.model_dump_json(), split)
        if key not in self.cache:
            if isinstance(what, str):
                result = self.evaluator.score_model_dir(what, split)  # type: ignore[arg-type]
            else:
                result = self.evaluator.score_recipe(what, split)[0]  # type: ignore[arg-type]
            self.cache[key] = {**{k: float(v) for k, v in result.scores.items()}, "mean": float(result.mean)}
        return self.cache[key]

    def selection(self, what: MergeRecipe | str) -> float:
        """The mean over dev and val (weighted by question count is not needed: same tasks, fixed sizes)."""
        return (self(what, "dev")["mean"] + self(what, "val")["mean"]) / 2


def _zoo_spec(seed: int, workdir: Path) -> str:
    if seed == 0:
        return "tiny"
    path = workdir / f"tiny-seed{seed}.yaml"
    path.write_text(yaml.safe_dump(PRESETS["tiny"].model_copy(update={"seed": seed}).model_dump(mode="json")))
    return str(path)


def run_zoo(zoo_seed: int, args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    spec = _zoo_spec(zoo_seed, workdir)
    t0 = time.perf_counter()
    zoo = build_zoo(spec, args.cache_dir)
    build_s = time.perf_counter() - t0
    runs = workdir / f"runs-z{zoo_seed}"
    first = resolve_sweep(
        SweepConfig(study_name="evaluator", runs_dir=str(runs), zoo=spec, backend={"batch_size": 256}),
        zoo_cache=args.cache_dir,
    )
    evaluator = LocalEvaluator(first)
    score = Scorer(evaluator)
    tasks = [t.name for t in first.tasks]
    out: dict[str, Any] = {"zoo_seed": zoo_seed, "tasks": tasks, "build_s": round(build_s, 1), "rows": {}}
    rows: dict[str, dict[str, float]] = out["rows"]

    rows["base"] = score(first.base, "test")
    experts = dict(zip(zoo.experts, first.experts, strict=True))
    for fam, path in experts.items():
        rows[f"expert {fam}"] = score(path, "test")
    best_fam = max(experts, key=lambda f: score.selection(experts[f]))
    rows["best expert (chosen on dev+val)"] = {**rows[f"expert {best_fam}"], "choice": best_fam}  # type: ignore[dict-item]

    def grid(method: str, points: list[dict[str, float]]) -> tuple[dict[str, float], dict[str, float]]:
        recipes = [(p, _uniform(method, first.base, first.experts, p)) for p in points]
        params, recipe = max(recipes, key=lambda pr: score.selection(pr[1]))
        return params, score(recipe, "test")

    ta_params, rows["uniform task arithmetic (grid, chosen on dev+val)"] = grid(
        "task_arithmetic", [{"weight": round(0.1 * k, 2)} for k in range(1, 13)]
    )
    ties_params, rows["uniform TIES (grid, chosen on dev+val)"] = grid(
        "ties", [{"weight": w, "density": d} for w in (0.3, 0.5, 0.7, 1.0) for d in (0.3, 0.5, 0.7, 1.0)]
    )
    out["grid_choice"] = {"task_arithmetic": ta_params, "ties": ties_params}

    checkpoints = [c for c in (10, 20, 40, 60, 100, 150) if c < args.budget] + [args.budget]
    out["checkpoints"] = checkpoints
    out["arms"] = {}
    for arm in args.arms:
        space, sampler = ARMS[arm]
        per_seed = []
        t_arm = time.perf_counter()
        for seed in args.seeds:
            cfg = SweepConfig(
                study_name=f"z{zoo_seed}-{arm}-{seed}",
                runs_dir=str(runs),
                zoo=spec,
                search_space=space,
                sampler=SamplerConfig(**sampler, seed=seed),
                n_trials=args.budget,
                backend={"batch_size": 256},
                **ARM_SWEEP.get(arm, {}),
            )
            sweep = resolve_sweep(cfg, zoo_cache=args.cache_dir)
            t_search = time.perf_counter()
            study = run_search(sweep, evaluator)
            search_s = time.perf_counter() - t_search
            complete = sorted(
                study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)),
                key=lambda t: t.number,
            )
            curve = {}
            for c in checkpoints:
                best = max(complete[:c], key=lambda t: (float(t.user_attrs["mean"]), -t.number))
                curve[c] = score(trial_recipe(best), "test")["mean"]
            pick = honest_pick(sweep, evaluator, study)
            assert pick is not None
            by_number = {t.number: t for t in complete}
            picked = score(trial_recipe(by_number[pick.picked]), "test")
            dev_best = score(trial_recipe(by_number[pick.dev_best]), "test")
            per_seed.append(
                {
                    "seed": seed,
                    "picked": pick.picked,
                    "dev_best": pick.dev_best,
                    "test": picked,
                    "dev_best_test": dev_best,
                    "curve": curve,
                    "search_s": round(search_s, 2),
                    "pruned": len(study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.PRUNED,))),
                    # the method of each trial the sampler chose (seeds excluded), in trial order
                    "methods": [
                        t.params["method"]
                        for t in complete
                        if "method" in t.params and "fixed_params" not in t.system_attrs
                    ],
                }
            )
            print(
                f"zoo {zoo_seed} {arm} seed {seed}: pick trial {pick.picked} test {picked['mean']:.3f} "
                f"(dev-best trial {pick.dev_best} test {dev_best['mean']:.3f}); search {search_s:.1f} s",
                flush=True,
            )
        out["arms"][arm] = {
            "seeds": per_seed,
            "seconds_per_search": (time.perf_counter() - t_arm) / len(args.seeds),
        }
    return out


def _table(result: dict[str, Any]) -> list[str]:
    tasks = result["tasks"]
    lines = [
        f"zoo seed {result['zoo_seed']} (build {result['build_s']:.0f} s): test scores",
        "| model | " + " | ".join(tasks) + " | mean |",
        "|---|" + "---|" * (len(tasks) + 1),
    ]
    for label, row in result["rows"].items():
        extra = f" ({row['choice']})" if "choice" in row else ""
        lines.append(
            f"| {label}{extra} | " + " | ".join(f"{row[t]:.3f}" for t in tasks) + f" | {row['mean']:.3f} |"
        )
    for arm, data in result["arms"].items():
        seeds = data["seeds"]
        cells = []
        for t in [*tasks, "mean"]:
            m, sd = _mean_sd([s["test"][t] for s in seeds])
            cells.append(f"{m:.3f} ± {sd:.3f}")
        lines.append(f"| searched: {arm}, honest pick ({len(seeds)} seeds) | " + " | ".join(cells) + " |")
        m, sd = _mean_sd([s["dev_best_test"]["mean"] for s in seeds])
        lines.append(f"| searched: {arm}, dev-best trial | " + " | " * len(tasks) + f"{m:.3f} ± {sd:.3f} |")
    return lines


def _verdicts(result: dict[str, Any]) -> list[str]:
    rows = result["rows"]
    lines = []
    if "cmaes" not in result["arms"]:
        return lines
    searched = [s["test"]["mean"] for s in result["arms"]["cmaes"]["seeds"]]
    comp = [s["test"].get("comp", float("nan")) for s in result["arms"]["cmaes"]["seeds"]]
    m, sd = _mean_sd(searched)
    best_expert = rows["best expert (chosen on dev+val)"]["mean"]
    lines.append(f"searched (cmaes) - best expert: {m - best_expert:+.3f} (target >= +0.02; sd {sd:.3f})")
    for label in (
        "uniform task arithmetic (grid, chosen on dev+val)",
        "uniform TIES (grid, chosen on dev+val)",
    ):
        d = m - rows[label]["mean"]
        lines.append(
            f"searched (cmaes) - {label}: {d:+.3f} ({'> 2 sd' if d > 2 * sd else 'NOT > 2 sd'}, sd {sd:.3f})"
        )
    for arm in result["arms"]:
        if arm == "cmaes":
            continue
        other = [s["test"]["mean"] for s in result["arms"][arm]["seeds"]]
        om, osd = _mean_sd(other)
        spread = max(sd, osd)
        verdict = "> 2 sd" if m - om > 2 * spread else "NOT > 2 sd"
        lines.append(f"searched (cmaes) - {arm}: {m - om:+.3f} ({verdict}, sd {sd:.3f} / {osd:.3f})")
    if "comp" in result["tasks"]:
        experts = {k: v["comp"] for k, v in rows.items() if k.startswith("expert ")}
        cm, csd = _mean_sd(comp)
        beats = all(cm > v for v in experts.values())
        lines.append(
            f"comp: searched {cm:.3f} ± {csd:.3f} vs experts "
            + ", ".join(f"{k.split()[1]} {v:.3f}" for k, v in experts.items())
            + (" (beats every expert)" if beats else " (does NOT beat every expert)")
        )
    return lines


def _plot(results: list[dict[str, Any]], path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.5 * len(results), 4.2), dpi=110)
    FigureCanvasAgg(fig)
    for i, result in enumerate(results):
        ax = fig.add_subplot(1, len(results), i + 1)
        cps = result["checkpoints"]
        for arm, data in result["arms"].items():
            means = [statistics.mean(s["curve"][c] for s in data["seeds"]) for c in cps]
            ax.plot(cps, means, marker="o", label=arm)
        styles = {
            "best expert (chosen on dev+val)": ("red", "-."),
            "uniform task arithmetic (grid, chosen on dev+val)": ("grey", "--"),
            "uniform TIES (grid, chosen on dev+val)": ("black", ":"),
        }
        for label, (color, style) in styles.items():
            ax.axhline(result["rows"][label]["mean"], color=color, linestyle=style, label=label)
        ax.set_xlabel("evaluations (complete trials)")
        ax.set_ylabel("test mean of the dev-best trial (mean over seeds)")
        ax.set_title(f"tiny zoo, seed {result['zoo_seed']}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--zoo-seeds", default="0,1")
    ap.add_argument("--seeds", default="0,1,2,3,4")
    ap.add_argument("--budget", type=int, default=60)
    ap.add_argument("--arms", default=",".join(ARMS), help=f"comma-separated, of {', '.join(ARMS)}")
    ap.add_argument("--cache-dir", type=Path, default=None)
    ap.add_argument("--plot", type=Path, default=Path("docs/search_evidence.png"))
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    args.seeds = [int(s) for s in args.seeds.split(",")]
    args.arms = [a for a in args.arms.split(",") if a]
    for arm in args.arms:
        if arm not in ARMS:
            ap.error(f"unknown arm {arm!r}")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    workdir = Path(tempfile.mkdtemp(prefix="evomerge-evidence-"))
    atexit.register(shutil.rmtree, workdir, ignore_errors=True)  # models and studies: GBs
    results = []
    for z in (int(s) for s in args.zoo_seeds.split(",")):
        result = run_zoo(z, args, workdir)
        results.append(result)
        print("\n".join(["", *_table(result), "", *_verdicts(result), ""]), flush=True)
        if args.json:
            args.json.write_text(json.dumps(results, indent=1))
    if args.plot:
        _plot(results, args.plot)
        print(f"plot: {args.plot}")


if __name__ == "__main__":
    main()
