"""Training the zoo's small models from scratch on CPU: examples encoded in the zoo's prompt format, a
plain AdamW loop, and the HF model directory it saves (the tiny zoo's Llama and the heterogeneous
expert's GPT-2 alike).
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

from evomerge.zoo.common import PROMPT

__all__ = ["encode_row", "save_model", "train"]


def encode_row(tok: PreTrainedTokenizerFast, q: str, a: str) -> tuple[list[int], list[int]]:
    """(input ids, labels) of one example in the zoo's prompt format, EOS last; labels -100 on the prompt."""
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


def save_model(model: LlamaForCausalLM, tok: PreTrainedTokenizerFast, out: Path) -> None:
    model.generation_config.do_sample = False
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
