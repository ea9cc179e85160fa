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

import copy
import hashlib
import json
import math
import random
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from evomerge.checkpoints.writer import atomic_dir
from evomerge.errors import ConfigError
from evomerge.evaluators import HFBackend, TaskConfig, evaluate
from evomerge.zoo.gates import ZooGates, failures, measure
from evomerge.zoo.smollm2 import SMOLLM2_PRESETS, SmolLM2Config
from evomerge.zoo.tasks import CAPACITY, TASK_FAMILIES, generate, write_jsonl
from evomerge.zoo.tokenizer import train_tokenizer

PROMPT = "Q: {question}\nA:"
# Bump when task generators, tokenizer or training change: cached zoos are then rebuilt.
ZOO_VERSION = 2
Progress = Callable[[str, int, int], None]


class ZooConfig(BaseModel):
    """Everything that determines the zoo's bytes; its hash names the cache directory."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = "tiny"
    seed: int = 0
    families: tuple[str, ...] = ("arith", "code", "logic")
    # What the base trains on; empty: the experts' own families (a base that already knows every task).
    base_families: tuple[str, ...] = ()
    # Families scored in every report but trained on by no model (the compositional ``comp``).
    held_out: tuple[str, ...] = ()
    hidden_size: int = Field(default=64, ge=1)
    num_layers: int = Field(default=4, ge=1)
    num_heads: int = Field(default=2, ge=1)
    intermediate_size: int = Field(default=192, ge=1)
    vocab_size: int = Field(default=384, ge=64)
    n_train: int = Field(default=5000, ge=1)
    n_dev: int = Field(default=200, ge=1)
    n_test: int = Field(default=300, ge=1)
    base_steps: int = Field(default=800, ge=1)
    expert_steps: int = Field(default=400, ge=1)
    batch_size: int = Field(default=64, ge=1)
    base_lr: float = Field(default=2e-3, gt=0, allow_inf_nan=False)
    expert_lr: float = Field(default=1e-3, gt=0, allow_inf_nan=False)
    # Share of an expert's fine-tuning rows replayed from the base's data (or, without base_families,
    # from the other experts' families).
    replay: float = Field(default=0.3, ge=0.0, lt=1.0)
    dev_size: int = Field(default=200, ge=1)
    test_size: int = Field(default=300, ge=1)
    # Weights the experts' fine-tuning leaves as they are (name prefixes), as LoRA-style fine-tunes leave
    # the embeddings and the output head: there every fine-tune moves the same way (sharper logits).
    expert_frozen: tuple[str, ...] = ()
    # Torch threads while training: one thread makes the build bit-identical on any machine and load.
    threads: int = Field(default=1, ge=1)
    # Enforced build gates (None: the figures are still measured and written into zoo.json).
    gates: ZooGates | None = None

    @model_validator(mode="after")
    def _check(self) -> ZooConfig:
        if len(set(self.families)) != len(self.families):
            raise ValueError(f"families: duplicate family in {list(self.families)}")
        for field in ("families", "base_families", "held_out"):
            for fam in getattr(self, field):
                if fam not in TASK_FAMILIES:
                    known = ", ".join(TASK_FAMILIES)
                    raise ValueError(f"{field}: unknown task family {fam!r} (known: {known})")
        if set(self.held_out) & set(self.families) or set(self.held_out) & set(self.base_families):
            raise ValueError("held_out: a held-out family cannot be trained on")
        if self.hidden_size % self.num_heads or self.hidden_size // self.num_heads < 32:
            raise ValueError("hidden_size / num_heads must be an integer >= 32 (vLLM needs head_dim >= 32)")
        if self.dev_size > self.n_dev or self.test_size > self.n_test:
            raise ValueError("dev_size/test_size cannot exceed n_dev/n_test")
        return self

    def digest(self) -> str:
        """Hash of the config and of the zoo code's version: a changed generator means a new zoo."""
        data = {"config": self.model_dump(mode="json"), "zoo_version": ZOO_VERSION}
        blob = json.dumps(data, sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:12]


AnyZooConfig = ZooConfig | SmolLM2Config
"""A tiny-zoo config (a Llama trained here) or a smollm2 one (a real base and LoRA experts)."""

PRESETS: dict[str, ZooConfig] = {
    # The demo's, tests' and benchmarks' zoo: a base that knows only the primitives of each skill (and
    # how to carry a code value into a word problem), experts that are small fine-tunes of it, and a
    # compositional family no model trains on. Its gates are enforced (docs/benchmarks.md, "zoo").
    "tiny": ZooConfig(
        families=("arith", "code", "order"),
        base_families=("arith1", "code1", "logic1", "bridge"),
        held_out=("comp",),
        base_steps=1500,
        expert_steps=400,
        batch_size=32,
        expert_lr=4.5e-4,
        replay=0.3,
        expert_frozen=("model.embed_tokens", "lm_head"),
        gates=ZooGates(),
    ),
    # A very small zoo for tests: same shapes of everything, a fraction of the training.
    "micro": ZooConfig(
        name="micro",
        num_layers=2,
        n_train=1500,
        n_dev=40,
        n_test=40,
        base_steps=60,
        expert_steps=40,
        batch_size=32,
        dev_size=24,
        test_size=40,
    ),
}


ALL_PRESETS: dict[str, AnyZooConfig] = {**PRESETS, **SMOLLM2_PRESETS}
"""Every preset ``evomerge zoo build --preset`` and a sweep's ``zoo:`` accept."""


class Zoo(BaseModel):
    """The manifest of a built zoo (``zoo.json``)."""

    model_config = ConfigDict(frozen=True)

    config: AnyZooConfig
    root: str
    base: str
    experts: dict[str, str]
    tasks: tuple[TaskConfig, ...]
    build_seconds: float

    @classmethod
    def load(cls, root: Path) -> Zoo:
        data = json.loads((root / "zoo.json").read_text())
        data["root"] = str(root)
        data["base"] = str(root / "base")
        data["experts"] = {k: str(root / "experts" / k) for k in data["experts"]}
        # zoo.json keeps data paths relative to the zoo, so a zoo can move; here they become absolute.
        for task in data["tasks"]:
            task["data_files"] = {s: str(root / p) for s, p in task["data_files"].items()}
        return cls.model_validate(data)


def default_cache_dir() -> Path:
    import os

    return Path(os.environ.get("EVOMERGE_HOME", Path.home() / ".cache" / "evomerge")) / "zoo"


def resolve_config(spec: str | AnyZooConfig) -> AnyZooConfig:
    """A preset name or a YAML file path -> ZooConfig (a YAML with ``base_gguf``: SmolLM2Config)."""
    if isinstance(spec, ZooConfig | SmolLM2Config):
        return spec
    if spec in ALL_PRESETS:
        return ALL_PRESETS[spec]
    path = Path(spec)
    if not path.is_file():
        raise ConfigError(f"zoo: {spec!r} is neither a preset ({', '.join(ALL_PRESETS)}) nor a YAML file")
    from evomerge.config_util import load_yaml, validate_model

    data = load_yaml(path, what="zoo config") or {}
    kind: type[ZooConfig] | type[SmolLM2Config] = (
        SmolLM2Config if isinstance(data, dict) and "base_gguf" in data else ZooConfig
    )
    return validate_model(kind, data, where=str(path))


def zoo_dir(config: AnyZooConfig, cache_dir: Path | None = None) -> Path:
    return (cache_dir or default_cache_dir()) / f"{config.name}-{config.digest()}"


def find_zoo(config: AnyZooConfig, cache_dir: Path | None = None) -> Zoo | None:
    root = zoo_dir(config, cache_dir)
    return Zoo.load(root) if (root / "zoo.json").is_file() else None


# -- training ---------------------------------------------------------------------------------------


def _encode(tok: PreTrainedTokenizerFast, q: str, a: str) -> tuple[list[int], list[int]]:
    prompt = tok(PROMPT.format(question=q)).input_ids
    full = [*tok(PROMPT.format(question=q) + f" {a}\n").input_ids, tok.eos_token_id]
    # Loss on the answer only (SFT style): the prompt's labels are masked.
    return full, [-100] * len(prompt) + full[len(prompt) :]


def _batch(rows: Sequence[tuple[list[int], list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    width = max(len(ids) for ids, _ in rows)
    ids_t = torch.full((len(rows), width), pad_id, dtype=torch.long)
    lab_t = torch.full((len(rows), width), -100, dtype=torch.long)
    att_t = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (ids, labels) in enumerate(rows):
        ids_t[i, : len(ids)] = torch.tensor(ids)
        lab_t[i, : len(labels)] = torch.tensor(labels)
        att_t[i, : len(ids)] = 1
    return {"input_ids": ids_t, "attention_mask": att_t, "labels": lab_t}


def train(
    model: LlamaForCausalLM,
    rows: Sequence[tuple[list[int], list[int]]],
    *,
    steps: int,
    lr: float,
    batch_size: int,
    seed: int,
    pad_id: int,
    on_step: Callable[[int, float], None] | None = None,
    frozen: Sequence[str] = (),
) -> float:
    """AdamW with linear warm-up and cosine decay; returns the mean loss of the last 10% of steps.
    Parameters whose names start with one of ``frozen`` are not trained."""
    torch.manual_seed(seed)
    rng = random.Random(seed)
    params = [p for n, p in model.named_parameters() if not n.startswith(tuple(frozen))]
    for n, p in model.named_parameters():
        p.requires_grad_(not n.startswith(tuple(frozen)))
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.98), weight_decay=0.0)
    model.train()
    warmup = max(1, steps // 20)
    tail: list[float] = []
    pool = list(rows)
    for step in range(steps):
        scale = min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * step / steps))
        for group in opt.param_groups:
            group["lr"] = lr * scale
        batch = _batch(rng.sample(pool, batch_size) if len(pool) > batch_size else pool, pad_id)
        loss = model(**batch).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if step >= steps * 0.9:
            tail.append(loss.item())
        if on_step is not None:
            on_step(step, loss.item())
    model.eval()  # type: ignore[no-untyped-call]
    return sum(tail) / max(1, len(tail))


def _save_model(model: LlamaForCausalLM, tok: PreTrainedTokenizerFast, out: Path) -> None:
    model.generation_config.do_sample = False
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)


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
        from evomerge.zoo.smollm2 import build_smollm2

        return build_smollm2(config, cache_dir, force=force, progress=progress)
    root = zoo_dir(config, cache_dir)
    if not force and (existing := find_zoo(config, cache_dir)) is not None:
        return existing
    t0 = time.perf_counter()
    with atomic_dir(root) as tmp:
        threads = torch.get_num_threads()
        torch.set_num_threads(config.threads)
        try:
            _build_into(config, tmp, progress)
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


def family_tasks(
    families: Sequence[str],
    *,
    max_new_tokens: int,
    dev_size: int,
    test_size: int,
    seed: int,
    chat: bool = False,
) -> list[TaskConfig]:
    """One exact-match task per zoo family, in the zoo's prompt format, with data paths relative to the
    build root (so a zoo can be moved; ``load`` makes them absolute). Shared by every zoo builder."""
    return [
        TaskConfig(
            name=fam,
            kind="exact_match",
            data_files={"dev": f"data/{fam}.dev.jsonl", "test": f"data/{fam}.test.jsonl"},
            prompt_template=PROMPT,
            chat=chat,
            max_new_tokens=max_new_tokens,
            stop=["\n"],
            dev_size=dev_size,
            test_size=test_size,
            seed=seed,
        )
        for fam in families
    ]


def _task_configs(config: ZooConfig) -> list[TaskConfig]:
    return family_tasks(
        [*config.families, *config.held_out],
        max_new_tokens=6,
        dev_size=config.dev_size,
        test_size=config.test_size,
        seed=config.seed,
    )


def _split_data(config: ZooConfig, out: Path) -> dict[str, dict[str, list[tuple[str, str]]]]:
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
        for split, exs in splits[fam].items():
            if exs:
                write_jsonl(out / "data" / f"{fam}.{split}.jsonl", fam, exs)
    return splits


def _build_into(config: ZooConfig, out: Path, progress: Progress | None) -> None:
    # 1. data: disjoint train/dev/test per family.
    splits = _split_data(config, out)
    base_families = config.base_families or config.families
    trained = list(dict.fromkeys([*base_families, *config.families]))

    # 2. tokenizer, trained on the training text only.
    texts = [PROMPT.format(question=q) + f" {a}\n" for fam in trained for q, a in splits[fam]["train"]]
    tok = train_tokenizer(texts, vocab_size=config.vocab_size)
    encoded = {fam: [_encode(tok, q, a) for q, a in splits[fam]["train"]] for fam in trained}
    pad_id = int(tok.pad_token_id)

    # 3. base on the mix, then one expert per family.
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
    total = config.base_steps + config.expert_steps * len(config.families)
    done = 0

    def stepper(label: str) -> Callable[[int, float], None]:
        def on_step(step: int, loss: float) -> None:
            nonlocal done
            done += 1
            if progress is not None:
                progress(f"{label} loss {loss:.3f}", done, total)

        return on_step

    mix = [row for fam in base_families for row in encoded[fam]]
    train(
        base,
        mix,
        steps=config.base_steps,
        lr=config.base_lr,
        batch_size=config.batch_size,
        seed=config.seed,
        pad_id=pad_id,
        on_step=stepper("base"),
    )
    _save_model(base, tok, out / "base")
    for i, fam in enumerate(config.families):
        expert = copy.deepcopy(base)
        # Replay: a share of the base's data (or of the other families') keeps the expert from forgetting
        # what it knew, as real fine-tunes of a large base mostly do; the task vector is then a
        # specialisation, not a rewrite.
        if config.base_families:
            others = [row for f in config.base_families for row in encoded[f]]
        else:
            others = [row for f in config.families if f != fam for row in encoded[f]]
        n_replay = min(len(others), round(len(encoded[fam]) * config.replay / (1 - config.replay)))
        replay_rows = random.Random(config.seed + 100 + i).sample(others, n_replay)
        train(
            expert,
            encoded[fam] + replay_rows,
            steps=config.expert_steps,
            lr=config.expert_lr,
            batch_size=config.batch_size,
            seed=config.seed + 1 + i,
            pad_id=pad_id,
            on_step=stepper(f"expert {fam}"),
            frozen=config.expert_frozen,
        )
        _save_model(expert, tok, out / "experts" / fam)
