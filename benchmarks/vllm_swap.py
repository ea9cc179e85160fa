"""Per-candidate overhead with the vllm backend: in-place weight swap vs writing the candidate and
starting a fresh engine (what on-disk evolution does); and hf vs vllm generation on the same questions.

Usage (numbers in docs/benchmarks.md; needs the vllm venv):

    scripts/make_vllm_venv.sh
    .venv-vllm/bin/python benchmarks/vllm_swap.py --candidates 5
    .venv-vllm/bin/python benchmarks/vllm_swap.py --candidates 3 --model random-104m --new-tokens 32,128

``--model micro``: the micro zoo (2-layer Llama, hidden 64). ``--model random-104m``: a random Llama of
104 M parameters (8 layers, hidden 1024, the zoo's tokenizer) and two experts that are the base plus
small random deltas: the swap cost of a model whose weights are not negligible. A random model never
stops early, so ``--new-tokens`` sets how many tokens every answer gets (stop strings off): real
reasoning answers (GSM8K chain of thought) are 100-300 tokens. Each candidate is a random
task-arithmetic recipe. Swap path: ``InMemoryMerger.merge``
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
    ap.add_argument("--model", choices=("micro", "random-104m"), default="micro")
    ap.add_argument("--new-tokens", default="", help="comma-separated answer lengths (default: the tasks')")
    args = ap.parse_args()
    zoo = build_zoo("micro", args.work_dir / "zoo")
    base, experts = zoo.base, list(zoo.experts.values())
    if args.model == "random-104m":
        base, experts = random_llamas(zoo.base, args.work_dir / "random-104m")
    merger = InMemoryMerger(base, experts)
    rng = random.Random(0)
    recipes = [
        MergeRecipe.model_validate(
            {
                "merge_method": "task_arithmetic",
                "base_model": base,
                "models": [
                    {"model": e, "parameters": {"weight": round(rng.uniform(0, 1), 3)}} for e in experts
                ],
                "dtype": "float32",
            }
        )
        for _ in range(args.candidates)
    ]
    backend = VLLMBackend.from_pretrained(base, kv_cache_memory_bytes=KV_BYTES)
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

    swap_s, disk_s = statistics.median(swap), statistics.median(disk)
    print(f"{args.model}, {args.candidates} candidates, medians")
    print("| path | seconds per candidate |")
    print("|---|---|")
    print(f"| in-memory merge + in-place swap | {swap_s:.3f} |")
    print(f"| merge to disk + fresh engine | {disk_s:.3f} |")
    print(f"swap is {disk_s / swap_s:.1f}x faster")

    hf = HFBackend.from_pretrained(out, batch_size=64)
    lengths = [int(n) for n in args.new_tokens.split(",")] if args.new_tokens else [0]
    print("| new tokens | vllm 64 q (s) | hf 64 q (s) | vllm / hf time | swap / vllm eval | same scores |")
    print("|---|---|---|---|---|---|")
    for n in lengths:
        tasks = [t.model_copy(update={"dev_size": k}) for t, k in zip(zoo.tasks, (22, 21, 21), strict=True)]
        if n:
            tasks = [t.model_copy(update={"max_new_tokens": n, "stop": []}) for t in tasks]
        t0 = time.perf_counter()
        vllm_result = evaluate(backend, tasks, "dev", zoo.root)  # type: ignore[arg-type]
        vllm_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        hf_result = evaluate(hf, tasks, "dev", zoo.root)  # type: ignore[arg-type]
        hf_s = time.perf_counter() - t0
        print(
            f"| {n or 'task default'} | {vllm_s:.3f} | {hf_s:.3f} | {vllm_s / hf_s:.2f} | "
            f"{100 * swap_s / vllm_s:.1f}% | {vllm_result.scores == hf_result.scores} |"
        )
    backend.close()


def random_llamas(zoo_base: str, root: Path) -> tuple[str, list[str]]:
    """A random 104M-parameter Llama with the zoo's tokenizer, and two experts = base + small deltas."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    names = ["base", "expert-a", "expert-b"]
    if all((root / n / "config.json").exists() for n in names):
        return str(root / "base"), [str(root / n) for n in names[1:]]
    tokenizer = AutoTokenizer.from_pretrained(zoo_base)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=1024,
        intermediate_size=2816,
        num_hidden_layers=8,
        num_attention_heads=16,
        num_key_value_heads=16,
        max_position_embeddings=1024,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    base_state = {k: v.clone() for k, v in model.state_dict().items()}
    for i, name in enumerate(names):
        if i:
            gen = torch.Generator().manual_seed(i)
            model.load_state_dict(
                {k: v + 0.02 * v.std() * torch.randn(v.shape, generator=gen) for k, v in base_state.items()}
            )
        model.save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)
    return str(root / "base"), [str(root / n) for n in names[1:]]


if __name__ == "__main__":
    main()
