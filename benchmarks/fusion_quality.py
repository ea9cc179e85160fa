"""Heterogeneous fusion on the zoo: does distilling a GPT-2 expert with another tokenizer into the merged
pivot teach the pivot the expert's task, without losing the pivot's own tasks?

Usage (numbers in docs/benchmarks.md):

    .venv/bin/python benchmarks/fusion_quality.py --preset tiny --pairs 3000

Pivot: uniform task arithmetic (w = 1/3) of the zoo's three experts, materialized (or ``--pivot DIR``,
e.g. a sweep's ``best_model``). Sources: the heterogeneous expert (GPT-2, SentencePiece-style tokenizer,
expert on ``sort``, a family the zoo lacks), the pivot itself (as in FuseLLM, so the fusion keeps the
pivot's own distribution where it is the best model) and the zoo's arith expert. Data: ``--pairs``
instruction-response pairs of the hetero build's fusion train split
(all four families). Rows: the pivot before fusion, unified fusion with each fusion function, pairwise
fusion (each source distilled into its own pivot copy, merged with SCE), and the sources alone; every
score on the **test** split, greedy exact match.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from evomerge.fusion.pipeline import FusionConfig, run_fusion, score_models
from evomerge.merging import MergeRecipe, merge_streaming
from evomerge.zoo import build_zoo, resolve_config
from evomerge.zoo.hetero import build_hetero


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--cache-dir", type=Path, default=None)
    ap.add_argument("--pivot", type=Path, default=None)
    ap.add_argument("--pairs", type=int, default=3000)
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--loss", default="kl")
    ap.add_argument("--lam", type=float, default=0.9)
    ap.add_argument("--lora", type=int, default=0, help="LoRA rank (0: full fine-tuning)")
    ap.add_argument("--fusions", default="min_ce,avg_ce,entropy")
    ap.add_argument("--work-dir", type=Path, default=None)
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
                "models": [{"model": e, "parameters": {"weight": 1 / 3}} for e in experts],
                "dtype": "float32",
            }
        )
        pivot = Path(merge_streaming(recipe, work / "pivot", overwrite=True))
    rows = [json.loads(line) for line in Path(hetero.fusion_files["train"]).read_text().splitlines()]
    data = work / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows[: args.pairs]))

    # FuseLLM's practice: the pivot is one of the distributions fused, so where it is the best model of a
    # sequence (lowest CE: its own tasks) min_ce keeps it as its own teacher
    sources = (hetero.model, str(pivot), zoo.experts["arith"])
    train: dict[str, object] = {
        "loss": args.loss,
        "lam": args.lam,
        "lr": args.lr,
        "epochs": args.epochs,
        "batch_size": 16,
        "lora": {"r": args.lora, "alpha": 2 * args.lora} if args.lora else None,
    }
    models: list[tuple[str, str | Path]] = [("pivot before fusion", pivot)]
    timings: dict[str, float] = {}
    for i, fusion in enumerate(args.fusions.split(",")):
        cfg = FusionConfig.model_validate(
            {
                "sources": list(sources),
                "data": str(data),
                "fusion": fusion,
                "template": "Q: {instruction}\nA:",
                "response_format": " {response}\n",
                "variants": ["unified", "pairwise"] if i == 0 else ["unified"],
                "distill": train,
            }
        )
        t0 = time.perf_counter()
        out = run_fusion(pivot, work / f"fusion-{fusion}", cfg, overwrite=True, say=print)
        timings[fusion] = time.perf_counter() - t0
        models.append((f"unified, {fusion}", out["unified"]))
        if "pairwise" in out:
            models.append(("pairwise (SCE of the 2 distilled copies)", out["pairwise"]))
    # the control: the same fine-tuning on the gold responses without any teacher (lambda = 1)
    clm = FusionConfig.model_validate(
        {
            "sources": list(sources),
            "data": str(data),
            "template": "Q: {instruction}\nA:",
            "response_format": " {response}\n",
            "distill": {
                "loss": args.loss,
                "lam": 1.0,
                "lr": args.lr,
                "epochs": args.epochs,
                "batch_size": 16,
            },
        }
    )
    out = run_fusion(pivot, work / "clm-only", clm, overwrite=True, say=print)
    models.append(("control: gold responses only, no teacher (lambda 1)", out["unified"]))
    models += [("source: hetero expert (GPT-2)", hetero.model), ("source: zoo arith expert", sources[2])]

    tasks = [*zoo.tasks, *hetero.tasks]
    names = [t.name for t in tasks]
    table = score_models(models, tasks, zoo.root)
    own = [t.name for t in zoo.tasks]
    print(
        f"zoo {args.preset}, {args.pairs} pairs, loss {args.loss}, lr {args.lr}, {args.epochs} epoch(s); test"
    )
    print("| model | " + " | ".join(names) + " | zoo-task mean |")
    print("|---|" + "---|" * (len(names) + 1))
    for name, scores, _ in table:
        own_mean = sum(scores[t] for t in own) / len(own)
        print(f"| {name} | " + " | ".join(f"{scores[t]:.3f}" for t in names) + f" | {own_mean:.3f} |")
    print(
        "seconds per fusion run (source passes + distillation):", {k: round(v, 1) for k, v in timings.items()}
    )


if __name__ == "__main__":
    main()
