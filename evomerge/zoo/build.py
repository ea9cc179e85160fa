"""Build the local expert zoo: a tiny Llama base and one fine-tuned expert per task family.

``build_zoo`` trains, with fixed seeds, a base model on a mix of all task families, then fine-tunes one
expert per family from that base. Everything lands in ``<cache>/<name>-<config hash>/``:

```
zoo.json                       manifest (config, paths, task configs, build seconds)
base/                          HF model directory (safetensors + tokenizer)
experts/<family>/              HF model directories
data/<family>.{train,dev,test}.jsonl
```

The directory is written under a temporary name and renamed when complete, so an interrupted build
never leaves a half zoo behind; a finished zoo with the same config hash is reused.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import random
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO, Any

import torch
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from evomerge.atomic_io import atomic_dir
from evomerge.errors import ConfigError
from evomerge.evaluators import HFBackend, TaskConfig, evaluate
from evomerge.zoo.common import PROMPT, Progress, Zoo, family_tasks, find_zoo, zoo_dir
from evomerge.zoo.common import default_cache_dir as default_cache_dir  # where evomerge.cli reads it
from evomerge.zoo.configs import AnyZooConfig, SmolLM2Config, ZooConfig, resolve_config
from evomerge.zoo.gates import failures, measure
from evomerge.zoo.smollm2 import build_smollm2
from evomerge.zoo.tasks import CAPACITY, generate, write_jsonl
from evomerge.zoo.tokenizer import train_tokenizer
from evomerge.zoo.training import encode_row, save_model, train

DETERMINISTIC_ENV = {
    "ATEN_CPU_CAPABILITY": "avx2",
    "MKL_CBWR": "COMPATIBLE",
    "OMP_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
}
"""The training children's kernels: the same bits on any x86-64 CPU with AVX2 (evomerge.zoo.train_worker)."""


def build_zoo(
    spec: str | AnyZooConfig = "tiny",
    cache_dir: Path | None = None,
    *,
    force: bool = False,
    progress: Progress | None = None,
) -> Zoo:
    """Build (or reuse) the zoo described by ``spec``; returns its manifest.

    Raises ZooGateError, naming each figure, when the config has ``gates`` and the build misses one
    (nothing is left behind)."""
    config = resolve_config(spec)
    if isinstance(config, SmolLM2Config):
        return build_smollm2(config, cache_dir, force=force, progress=progress)
    root = zoo_dir(config, cache_dir)
    if not force and (existing := find_zoo(config, cache_dir)) is not None:
        return existing
    t0 = time.perf_counter()
    with atomic_dir(root) as tmp:
        train_isolated(config, tmp, progress)
        threads = torch.get_num_threads()
        torch.set_num_threads(config.threads)
        try:
            tasks = _task_configs(config)
            scores = _scores(config, tmp, tasks)
        finally:
            torch.set_num_threads(threads)
        experts = {fam: str(tmp / "experts" / fam) for fam in config.families}
        figures = measure(tmp / "base", experts, {k: v["test"] for k, v in scores.items()})
        missed = failures(figures, config.gates) if config.gates is not None else []
        if missed:
            raise ZooGateError(f"zoo {config.name}: the build misses its gates: " + "; ".join(missed))
        manifest: dict[str, Any] = {
            "config": config.model_dump(mode="json"),
            "experts": {fam: f"experts/{fam}" for fam in config.families},
            "tasks": [t.model_dump(mode="json") for t in tasks],
            "build_seconds": round(time.perf_counter() - t0, 2),
            "scores": scores,
            "gates": {"enforced": config.gates is not None, **figures},
        }
        (tmp / "zoo.json").write_text(json.dumps(manifest, indent=2))
    return Zoo.load(root)


def train_isolated(config: ZooConfig, out: Path, progress: Progress | None) -> None:
    """Write the zoo's data, tokenizer, base and experts into ``out`` from child processes with
    CPU-independent kernels (:mod:`evomerge.zoo.train_worker`): the same weights on any x86-64 machine
    with AVX2. The base trains first; then the experts, each on one thread, as many at a time as the
    machine has cores (they do not depend on each other)."""
    # the children import this very evomerge (not another install that a working directory may shadow)
    root = str(Path(__file__).resolve().parents[2])
    path = os.environ.get("PYTHONPATH")
    env = {**os.environ, **DETERMINISTIC_ENV, "PYTHONPATH": root + (os.pathsep + path if path else "")}
    total = total_steps(config)
    done: dict[str, int] = {}

    def command(*args: str) -> list[str]:
        return [sys.executable, "-m", "evomerge.zoo.train_worker", config.model_dump_json(), str(out), *args]

    def run_all(commands: list[list[str]], width: int) -> None:
        """Run ``commands`` at most ``width`` at a time; their progress lines reach ``progress`` in the
        order they arrive (a reader thread per child: no pipe fills while another child is read)."""
        lines: queue.Queue[tuple[int, str | None]] = queue.Queue()
        waiting = list(enumerate(commands))
        running: dict[int, subprocess.Popen[str]] = {}
        with contextlib.ExitStack() as stack:
            errs: dict[int, IO[str]] = {}
            try:
                while waiting or running:
                    while waiting and len(running) < width:
                        k, cmd = waiting.pop(0)
                        errs[k] = stack.enter_context(tempfile.TemporaryFile("w+"))
                        proc = subprocess.Popen(
                            cmd, env=env, stdout=subprocess.PIPE, stderr=errs[k], text=True
                        )
                        running[k] = proc
                        threading.Thread(target=_pump, args=(k, proc, lines), daemon=True).start()
                    k, line = lines.get()
                    if line is not None:
                        parts = line.rstrip("\n").split("\t", 3)
                        if len(parts) == 4 and parts[0] == "progress":
                            done[parts[3].split(" loss ")[0]] = int(parts[1])
                            if progress is not None:
                                progress(parts[3], sum(done.values()), total)
                        continue
                    code = running.pop(k).wait()  # its stdout closed: it ended
                    if code != 0:
                        errs[k].seek(0)
                        text = [ln for ln in errs[k].read().splitlines() if ln.strip()]
                        last = text[-1] if text else f"exit status {code}"
                        raise ConfigError(f"zoo {config.name}: training failed: {last}")
            finally:
                for proc in running.values():
                    proc.kill()
                    proc.wait()

    run_all([command("base")], 1)
    width = max(1, min(len(config.families), os.cpu_count() or 1))
    run_all([command("expert", fam) for fam in config.families], width)


def _pump(key: int, proc: subprocess.Popen[str], lines: queue.Queue[tuple[int, str | None]]) -> None:
    """Forward a child's stdout lines, then None once it is closed."""
    assert proc.stdout is not None
    for line in proc.stdout:
        lines.put((key, line))
    lines.put((key, None))


class ZooGateError(ConfigError):
    """A zoo build missed one of its gates (the message names each figure)."""


def _scores(config: ZooConfig, root: Path, tasks: Sequence[TaskConfig]) -> dict[str, dict[str, Any]]:
    """Dev and test scores of the base and of each expert on every task of the zoo."""
    out: dict[str, dict[str, Any]] = {}
    for label in ("base", *config.families):
        path = root / "base" if label == "base" else root / "experts" / label
        backend = HFBackend.from_pretrained(path, batch_size=256)
        out[label] = {}
        for split in ("dev", "test"):
            result = evaluate(backend, tasks, split, root)
            out[label][split] = {k: round(float(v), 4) for k, v in result.scores.items()}
    return out


def _task_configs(config: ZooConfig) -> list[TaskConfig]:
    return family_tasks(
        [*config.families, *config.held_out],
        max_new_tokens=6,
        dev_size=config.dev_size,
        test_size=config.test_size,
        seed=config.seed,
    )


def _split_data(
    config: ZooConfig, out: Path, *, write: bool = True
) -> dict[str, dict[str, list[tuple[str, str]]]]:
    """Disjoint train/dev/test per family, written under ``out/data`` (held-out families: no train;
    base-only families: train only)."""
    splits: dict[str, dict[str, list[tuple[str, str]]]] = {}
    evaluated = [*config.families, *config.held_out]
    for fam in dict.fromkeys([*evaluated, *config.base_families]):
        test, dev, train_ex = [], [], []
        if fam in evaluated:
            test = generate(fam, config.n_test, seed=config.seed * 1000 + 1)
            dev = generate(fam, config.n_dev, seed=config.seed * 1000 + 2, exclude={q for q, _ in test})
        if fam not in config.held_out:
            n = min(config.n_train, CAPACITY.get(fam, config.n_train))
            train_ex = generate(fam, n, seed=config.seed * 1000 + 3, exclude={q for q, _ in test + dev})
        splits[fam] = {"train": train_ex, "dev": dev, "test": test}
        if write:
            for split, exs in splits[fam].items():
                if exs:
                    write_jsonl(out / "data" / f"{fam}.{split}.jsonl", fam, exs)
    return splits


def total_steps(config: ZooConfig) -> int:
    return config.base_steps + config.expert_steps * len(config.families)


def _stepper(label: str, progress: Progress | None, total: int) -> Callable[[int, float], None]:
    def on_step(step: int, loss: float) -> None:
        if progress is not None:
            progress(f"{label} loss {loss:.3f}", step + 1, total)

    return on_step


def build_base(config: ZooConfig, out: Path, progress: Progress | None = None) -> None:
    """Data files, tokenizer and base model into ``out`` (progress: steps of the base, of ``base_steps``)."""
    # 1. data: disjoint train/dev/test per family.
    splits = _split_data(config, out)
    base_families = config.base_families or config.families
    trained = list(dict.fromkeys([*base_families, *config.families]))

    # 2. tokenizer, trained on the training text only.
    texts = [PROMPT.format(question=q) + f" {a}\n" for fam in trained for q, a in splits[fam]["train"]]
    tok = train_tokenizer(texts, vocab_size=config.vocab_size)
    encoded = {fam: [encode_row(tok, q, a) for q, a in splits[fam]["train"]] for fam in base_families}

    # 3. the base on the mix of its families.
    torch.manual_seed(config.seed)
    llama = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_layers,
        num_attention_heads=config.num_heads,
        num_key_value_heads=config.num_heads,
        max_position_embeddings=256,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        tie_word_embeddings=False,
    )
    base = LlamaForCausalLM(llama)
    mix = [row for fam in base_families for row in encoded[fam]]
    train(
        base,
        mix,
        steps=config.base_steps,
        lr=config.base_lr,
        batch_size=config.batch_size,
        seed=config.seed,
        pad_id=int(tok.pad_token_id),
        on_step=_stepper("base", progress, config.base_steps),
    )
    save_model(base, tok, out / "base")


def build_expert(config: ZooConfig, out: Path, family: str, progress: Progress | None = None) -> None:
    """Fine-tune the expert of ``family`` from ``out/base`` into ``out/experts/<family>`` (progress: its
    steps, of ``expert_steps``). Experts are independent of each other: any order, any process."""
    i = config.families.index(family)
    splits = _split_data(config, out, write=False)
    tok = PreTrainedTokenizerFast.from_pretrained(out / "base")
    rows = {f: [encode_row(tok, q, a) for q, a in splits[f]["train"]] for f in splits if splits[f]["train"]}
    expert = LlamaForCausalLM.from_pretrained(out / "base", dtype=torch.float32)
    # Replay: a share of the base's data (or of the other families') keeps the expert from forgetting
    # what it knew, as real fine-tunes of a large base mostly do; the task vector is then a
    # specialisation, not a rewrite.
    if config.base_families:
        others = [row for f in config.base_families for row in rows[f]]
    else:
        others = [row for f in config.families if f != family for row in rows[f]]
    n_replay = min(len(others), round(len(rows[family]) * config.replay / (1 - config.replay)))
    replay_rows = random.Random(config.seed + 100 + i).sample(others, n_replay)
    train(
        expert,
        rows[family] + replay_rows,
        steps=config.expert_steps,
        lr=config.expert_lr,
        batch_size=config.batch_size,
        seed=config.seed + 1 + i,
        pad_id=int(tok.pad_token_id),
        on_step=_stepper(f"expert {family}", progress, config.expert_steps),
        frozen=config.expert_frozen,
    )
    save_model(expert, tok, out / "experts" / family)
