"""Heterogeneous fusion on the zoo: does distilling a GPT-2 expert with another tokenizer into the merged
pivot teach the pivot the expert's task, without losing the pivot's own tasks?

Usage (numbers in docs/benchmarks.md):

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/fusion_quality.py --preset tiny

Pivot: uniform task arithmetic (w = 1/3) of the zoo's three experts, materialized (or ``--pivot DIR``,
e.g. a sweep's ``best_model``). Sources (``--sources``): the heterogeneous expert (GPT-2, SentencePiece-
style tokenizer, expert on ``sort``, a family the zoo lacks) and the zoo's own experts, which the merge
only partly kept (FuseChat fuses every expert it has; ``pivot`` adds the pivot's own distribution as in
FuseLLM). Data: ``--pairs`` instruction-response pairs of the hetero build's fusion train split (all four
families). Rows, every score on ``--split`` (test by default), greedy exact match:

- the pivot before fusion, and each source alone;
- unified fusion with each fusion function (``--fusions``);
- pairwise fusion: each source distilled into its own copy of the pivot, the copies merged with each
  method of ``--pairwise`` (SCE, RSAF, ``linear``: their plain average);
- ``--extras``: ``uld`` (the tokenizer-free ULD loss instead of KL), ``lora`` (LoRA rank 8 instead of full
  fine-tuning), ``control`` (the same training on the gold responses alone: lambda 1, no teacher).

The source passes are computed once and shared by every run (``cache_dir``).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

from evomerge.fusion.pipeline import FusionConfig, merge_copies, run_fusion, score_models
from evomerge.merging import MergeRecipe, merge_streaming
from evomerge.zoo import build_zoo, resolve_config
from evomerge.zoo.hetero import build_hetero


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--cache-dir", type=Path, default=None, help="the zoo cache")
    ap.add_argument("--pivot", type=Path, default=None)
    ap.add_argument("--sources", default="hetero,arith,code,logic", help="hetero, pivot, zoo expert names")
    ap.add_argument("--pairs", type=int, default=12000)
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--lam", type=float, default=0.5)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--threads", type=int, default=1, help="torch threads for training (0: torch's default)")
    ap.add_argument("--fusions", default="min_ce,avg_ce,entropy")
    ap.add_argument("--pairwise", default="sce,rsaf,linear", help="merge methods for the pairwise copies")
    ap.add_argument("--extras", default="uld,lora,control")
    ap.add_argument("--split", choices=["dev", "test"], default="test")
    ap.add_argument("--work-dir", type=Path, default=None)
    ap.add_argument("--json", type=Path, default=None, help="also write the table as JSON here")
    args = ap.parse_args()

    zoo = build_zoo(resolve_config(args.preset), args.cache_dir)
    hetero = build_hetero(zoo, args.cache_dir)
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="evomerge-fusion-"))
    pivot = args.pivot
    if pivot is None:
        experts = list(zoo.experts.values())
        recipe = MergeRecipe.model_validate(
            {
                "merge_method": "task_arithmetic",
                "base_model": zoo.base,
                "models": [{"model": e, "parameters": {"weight": 1 / len(experts)}} for e in experts],
                "dtype": "float32",
            }
        )
        pivot = Path(merge_streaming(recipe, work / "pivot", overwrite=True))
    paths: dict[str, str] = {"hetero": str(hetero.model), "pivot": "pivot", **zoo.experts}
    sources = [paths[name] for name in args.sources.split(",")]
    rows = [json.loads(line) for line in Path(hetero.fusion_files["train"]).read_text().splitlines()]
    data = work / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows[: args.pairs]))

    train: dict[str, Any] = {
        "loss": "kl",
        "lam": args.lam,
        "lr": args.lr,
        "epochs": args.epochs,
        "batch_size": args.batch_size,
        "threads": args.threads or None,
    }
    base: dict[str, Any] = {
        "sources": sources,
        "data": str(data),
        "template": "Q: {instruction}\nA:",
        "response_format": " {response}\n",
        "cache_dir": str(work / "cache"),
        "distill": train,
    }

    def fuse(tag: str, **update: Any) -> dict[str, Path]:
        cfg = FusionConfig.model_validate({**base, **update})
        t0 = time.perf_counter()
        out = run_fusion(pivot, work / tag, cfg, overwrite=True, say=lambda m: print(f"[{tag}] {m}"))
        timings[tag] = time.perf_counter() - t0
        return out

    models: list[tuple[str, str | Path]] = [("pivot before fusion", pivot)]
    timings: dict[str, float] = {}
    for fusion in args.fusions.split(","):
        out = fuse(f"unified-{fusion}", fusion=fusion)
        models.append((f"unified, {fusion}", out["unified"]))
    if args.pairwise:
        methods = args.pairwise.split(",")
        out = fuse("pairwise", variants=["pairwise"], pairwise_method="sce" if "sce" in methods else "rsaf")
        copies = [out[k] for k in sorted(out) if k.startswith("pairwise-")]
        for method in methods:
            merged = merge_copies(pivot, copies, work / f"pairwise-{method}", method, overwrite=True)
            models.append((f"pairwise, {len(copies)} copies merged with {method}", merged))
    extras = [e for e in args.extras.split(",") if e]
    if "uld" in extras:
        out = fuse("uld", distill={**train, "loss": "uld"})
        models.append(("unified, min_ce, ULD loss", out["unified"]))
    if "lora" in extras:
        out = fuse("lora", distill={**train, "lr": 5 * args.lr, "lora": {"r": 8, "alpha": 16}})
        models.append((f"unified, min_ce, LoRA r=8 (lr {5 * args.lr:g})", out["unified"]))
    if "control" in extras:
        out = fuse("control", distill={**train, "lam": 1.0})
        models.append(("control: gold responses only, no teacher (lambda 1)", out["unified"]))
    models += [(f"source: {name}", paths[name]) for name in args.sources.split(",") if name != "pivot"]

    tasks = [*zoo.tasks, *hetero.tasks]
    names = [t.name for t in tasks]
    own = [t.name for t in zoo.tasks]
    table = score_models(models, tasks, zoo.root, split=args.split)
    print(
        f"zoo {args.preset}, {args.pairs} pairs, sources {args.sources}, lambda {args.lam}, lr {args.lr}, "
        f"batch {args.batch_size}, {args.epochs} epoch(s); {args.split} split"
    )
    print("| model | " + " | ".join(names) + " | zoo-task mean |")
    print("|---|" + "---|" * (len(names) + 1))
    results = []
    for name, scores, _ in table:
        own_mean = sum(scores[t] for t in own) / len(own)
        print(f"| {name} | " + " | ".join(f"{scores[t]:.3f}" for t in names) + f" | {own_mean:.3f} |")
        results.append({"model": name, **scores, "zoo_mean": own_mean})
    print("seconds per fusion run (source passes + distillation):", {k: round(v) for k, v in timings.items()})
    if args.json is not None:
        report = {"args": vars(args), "rows": results, "seconds": timings}
        args.json.write_text(json.dumps(report, default=str, indent=1))


if __name__ == "__main__":
    main()
