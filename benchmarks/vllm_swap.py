"""Per-candidate overhead with the vllm backend: in-place weight swap vs writing the candidate and
starting a fresh engine (what on-disk evolution does); and hf vs vllm generation on the same questions.

Usage (numbers in docs/benchmarks.md; needs the vllm venv):

    scripts/make_vllm_venv.sh
    .venv-vllm/bin/python benchmarks/vllm_swap.py --candidates 5

On the micro zoo: each candidate is a random task-arithmetic recipe. Swap path: ``InMemoryMerger.merge``
then ``VLLMBackend.load_state_dict`` (weights pushed into the live engine). Disk path: ``merge_streaming``
to a directory, close the engine, start a new one on that directory (in the same process; a new process
adds the vllm import). Then both backends generate greedy answers to the same 64 dev questions.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")

from evomerge.evaluators import HFBackend, evaluate
from evomerge.evaluators.vllm_backend import VLLMBackend
from evomerge.merging import InMemoryMerger, MergeRecipe, merge_streaming
from evomerge.zoo import build_zoo

KV_BYTES = 256 * 2**20


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--candidates", type=int, default=5)
    ap.add_argument("--work-dir", type=Path, default=Path(tempfile.gettempdir()) / "evomerge-vllm-swap")
    args = ap.parse_args()
    zoo = build_zoo("micro", args.work_dir / "zoo")
    experts = list(zoo.experts.values())
    merger = InMemoryMerger(zoo.base, experts)
    rng = random.Random(0)
    recipes = [
        MergeRecipe.model_validate(
            {
                "merge_method": "task_arithmetic",
                "base_model": zoo.base,
                "models": [
                    {"model": e, "parameters": {"weight": round(rng.uniform(0, 1), 3)}} for e in experts
                ],
                "dtype": "float32",
            }
        )
        for _ in range(args.candidates)
    ]
    backend = VLLMBackend.from_pretrained(zoo.base, kv_cache_memory_bytes=KV_BYTES)
    swap: list[float] = []
    for recipe in recipes:
        t0 = time.perf_counter()
        backend.load_state_dict(merger.merge(recipe))
        swap.append(time.perf_counter() - t0)
    disk: list[float] = []
    for i, recipe in enumerate(recipes):
        t0 = time.perf_counter()
        out = merge_streaming(recipe, args.work_dir / f"cand-{i}", overwrite=True)
        backend.close()
        backend = VLLMBackend.from_pretrained(out, kv_cache_memory_bytes=KV_BYTES)
        disk.append(time.perf_counter() - t0)

    tasks = [t.model_copy(update={"dev_size": n}) for t, n in zip(zoo.tasks, (22, 21, 21), strict=True)]
    t0 = time.perf_counter()
    vllm_result = evaluate(backend, tasks, "dev", zoo.root)  # type: ignore[arg-type]
    vllm_s = time.perf_counter() - t0
    hf = HFBackend.from_pretrained(out, batch_size=64)
    t0 = time.perf_counter()
    hf_result = evaluate(hf, tasks, "dev", zoo.root)  # type: ignore[arg-type]
    hf_s = time.perf_counter() - t0
    backend.close()

    swap_s, disk_s = statistics.median(swap), statistics.median(disk)
    print(f"micro zoo, {args.candidates} candidates, medians")
    print("| path | seconds per candidate |")
    print("|---|---|")
    print(f"| in-memory merge + in-place swap | {swap_s:.3f} |")
    print(f"| merge to disk + fresh engine | {disk_s:.3f} |")
    print(f"swap is {disk_s / swap_s:.0f}x faster; {100 * swap_s / vllm_s:.1f}% of evaluating 64 questions")
    print(f"64 dev questions: vllm {vllm_s:.3f} s (mean {vllm_result.mean:.3f})")
    print(f"64 dev questions: hf   {hf_s:.3f} s (mean {hf_result.mean:.3f})")


if __name__ == "__main__":
    main()
