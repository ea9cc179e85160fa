"""The distillation trainer: fine-tune the pivot on fused teacher targets (full fine-tuning or LoRA).

Inputs are :class:`TrainExample` s already in the pivot's tokenization: input ids, labels (-100 outside
the response) and, per position, the fused teacher target (top-K pivot ids and probabilities, row ``t``
the distribution for the token at ``t``, valid where a teacher was aligned). The loss is
:func:`evomerge.fusion.losses.distill_loss` (``lam * CLM + (1 - lam) * KL/CE``) or the tokenizer-free
:func:`evomerge.fusion.losses.uld_loss` added to the CLM term the same way.

Training state (model or adapter weights, optimizer, scheduler, step, RNG) is checkpointed every
``checkpoint_every`` steps into ``OUT.checkpoint/`` (written to a temporary sibling and renamed); a run
that finds a checkpoint resumes from it. The result is a normal Hugging Face model directory (LoRA
adapters merged into the weights), written to a temporary sibling and renamed: never a half output.
"""

from __future__ import annotations

import math
import random
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from evomerge.atomic_io import atomic_dir
from evomerge.errors import CheckpointError, ConfigError, OutputExistsError

Progress = Callable[[int, int, float], None]
"""Called as ``progress(step, total_steps, loss)``."""


class LoraSettings(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    r: int = Field(default=8, ge=1)
    alpha: int = Field(default=16, ge=1)
    dropout: float = Field(default=0.0, ge=0.0, lt=1.0)
    target_modules: tuple[str, ...] | None = None
    """None: every linear layer of the decoder (peft's ``all-linear``)."""


class DistillConfig(BaseModel):
    """How the pivot is trained on the fused targets."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    loss: Literal["kl", "ce", "uld"] = "kl"
    lam: float = Field(default=0.9, ge=0.0, le=1.0)
    """Weight of the plain language-modelling loss on the gold response (FuseLLM: 0.9)."""
    temperature: float = Field(default=1.0, gt=0.0)
    lr: float = Field(default=1e-3, gt=0.0)
    epochs: int = Field(default=1, ge=1)
    batch_size: int = Field(default=8, ge=1)
    warmup_ratio: float = Field(default=0.05, ge=0.0, lt=1.0)
    weight_decay: float = Field(default=0.0, ge=0.0)
    max_grad_norm: float = Field(default=1.0, gt=0.0)
    lora: LoraSettings | None = None
    checkpoint_every: int = Field(default=50, ge=1)
    seed: int = 0
    device: str = "cpu"
    threads: int | None = Field(default=None, ge=1)
    """CPU threads for training (None: torch's default). Small models train many times faster on one
    thread when other processes share the cores: torch's thread pool spins and waits for them."""


@dataclass(frozen=True)
class TrainExample:
    input_ids: list[int]
    labels: list[int]
    target_ids: torch.Tensor  # [T, K] long, -1 = empty slot
    target_probs: torch.Tensor  # [T, K] float
    target_valid: torch.Tensor  # [T] bool


def _batches(n: int, batch_size: int, epoch_seed: int) -> list[list[int]]:
    order = list(range(n))
    random.Random(epoch_seed).shuffle(order)
    return [order[i : i + batch_size] for i in range(0, n, batch_size)]


def _collate(examples: Sequence[TrainExample], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded batch: ids, attention mask, labels (-100 on padding) and padded targets."""
    t_max = max(len(e.input_ids) for e in examples)
    k = max(int(e.target_ids.shape[1]) for e in examples)
    b = len(examples)
    ids = torch.full((b, t_max), pad_id, dtype=torch.long)
    mask = torch.zeros((b, t_max), dtype=torch.long)
    labels = torch.full((b, t_max), -100, dtype=torch.long)
    tid = torch.full((b, t_max, k), -1, dtype=torch.long)
    tprob = torch.zeros((b, t_max, k), dtype=torch.float32)
    tvalid = torch.zeros((b, t_max), dtype=torch.bool)
    for i, e in enumerate(examples):
        n = len(e.input_ids)
        ids[i, :n] = torch.tensor(e.input_ids)
        mask[i, :n] = 1
        labels[i, :n] = torch.tensor(e.labels)
        kk = int(e.target_ids.shape[1])
        tid[i, :n, :kk] = e.target_ids[:n]
        tprob[i, :n, :kk] = e.target_probs[:n].float()
        tvalid[i, :n] = e.target_valid[:n]
    return {
        "input_ids": ids,
        "attention_mask": mask,
        "labels": labels,
        "tid": tid,
        "tprob": tprob,
        "tvalid": tvalid,
    }


def _loss(logits: torch.Tensor, batch: dict[str, torch.Tensor], config: DistillConfig) -> torch.Tensor:
    from evomerge.fusion.losses import distill_loss, uld_loss

    if config.loss == "uld":
        clm, _ = distill_loss(
            logits, batch["labels"], batch["tid"], batch["tprob"], batch["tvalid"], lam=1.0, kind="kl"
        )
        uld = uld_loss(logits, batch["tprob"], batch["tvalid"], batch["labels"])
        return config.lam * clm + (1.0 - config.lam) * uld
    loss, _ = distill_loss(
        logits,
        batch["labels"],
        batch["tid"],
        batch["tprob"],
        batch["tvalid"],
        lam=config.lam,
        kind=config.loss,
        temperature=config.temperature,
    )
    return loss


def _load_pivot(pivot_dir: Path, config: DistillConfig) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model: Any
    try:
        tokenizer = AutoTokenizer.from_pretrained(pivot_dir)
        model = AutoModelForCausalLM.from_pretrained(
            pivot_dir, torch_dtype=torch.float32, use_safetensors=True
        )
    except (OSError, ValueError) as err:
        raise CheckpointError(f"cannot load the pivot {pivot_dir}: {str(err).splitlines()[0]}") from None
    if config.lora is not None:
        try:
            from peft import LoraConfig, get_peft_model
        except ImportError:
            raise ConfigError("LoRA needs peft: pip install 'evomerge[fusion]'") from None
        targets: Any = list(config.lora.target_modules) if config.lora.target_modules else "all-linear"
        model = get_peft_model(
            model,
            LoraConfig(
                r=config.lora.r,
                lora_alpha=config.lora.alpha,
                lora_dropout=config.lora.dropout,
                target_modules=targets,
                task_type="CAUSAL_LM",
            ),
        )
    return model.to(config.device), tokenizer  # type: ignore[arg-type]


def _save_checkpoint(ckpt: Path, model: Any, optimizer: Any, scheduler: Any, step: int) -> None:
    with atomic_dir(ckpt) as tmp:
        trainable = {n: p.detach().cpu() for n, p in model.named_parameters() if p.requires_grad}
        torch.save(
            {
                "step": step,
                "trainable": trainable,
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "rng": torch.get_rng_state(),
            },
            tmp / "state.pt",
        )


def _load_checkpoint(ckpt: Path, model: Any, optimizer: Any, scheduler: Any) -> int:
    # our own file, written by _save_checkpoint: tensors and plain containers only
    state = torch.load(ckpt / "state.pt", map_location="cpu", weights_only=True)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in state["trainable"].items():
            if name not in params:
                raise CheckpointError(
                    f"{ckpt}: parameter {name!r} is not in this model; delete the checkpoint"
                )
            params[name].copy_(value)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["rng"])
    return int(state["step"])


def distill(
    pivot_dir: str | Path,
    examples: Sequence[TrainExample],
    out_dir: str | Path,
    config: DistillConfig,
    *,
    overwrite: bool = False,
    progress: Progress | None = None,
) -> Path:
    """Train the pivot on ``examples`` and write the result to ``out_dir`` (a HF model directory)."""
    pivot, out = Path(pivot_dir), Path(out_dir)
    if out.exists() and not overwrite:
        raise OutputExistsError(f"{out} exists; pass --overwrite to replace it")
    if not examples:
        raise ConfigError("no training examples: the data has no response tokens to distil on")
    threads = torch.get_num_threads()
    if config.threads is not None:
        torch.set_num_threads(config.threads)
    try:
        return _distill(pivot, out, examples, config, progress)
    finally:
        torch.set_num_threads(threads)


def _distill(
    pivot: Path,
    out: Path,
    examples: Sequence[TrainExample],
    config: DistillConfig,
    progress: Progress | None,
) -> Path:
    torch.manual_seed(config.seed)
    model, tokenizer = _load_pivot(pivot, config)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id or 0
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    steps_per_epoch = math.ceil(len(examples) / config.batch_size)
    total = steps_per_epoch * config.epochs
    warmup = int(total * config.warmup_ratio)

    def schedule(step: int) -> float:  # linear warm-up, then cosine to zero
        if step < warmup:
            return (step + 1) / max(1, warmup)
        return 0.5 * (1.0 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    out.parent.mkdir(parents=True, exist_ok=True)
    ckpt = out.parent / f"{out.name}.checkpoint"
    step = _load_checkpoint(ckpt, model, optimizer, scheduler) if (ckpt / "state.pt").exists() else 0
    model.train()
    for epoch in range(config.epochs):
        for b, index in enumerate(_batches(len(examples), config.batch_size, config.seed * 1000 + epoch)):
            if epoch * steps_per_epoch + b < step:
                continue  # done before the checkpoint this run resumed from
            batch = {
                k: v.to(config.device) for k, v in _collate([examples[i] for i in index], pad_id).items()
            }
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            loss = _loss(logits.float(), batch, config)
            if not torch.isfinite(loss):
                raise ConfigError(f"the distillation loss is {loss.item()} at step {step}; lower the lr")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()  # type: ignore[no-untyped-call]
            torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
            optimizer.step()
            scheduler.step()
            step += 1
            if progress is not None:
                progress(step, total, float(loss.item()))
            if step % config.checkpoint_every == 0 and step < total:
                _save_checkpoint(ckpt, model, optimizer, scheduler, step)
    model.eval()
    if config.lora is not None:
        model = model.merge_and_unload()
    with atomic_dir(out) as tmp:
        model.to("cpu").save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
    shutil.rmtree(ckpt, ignore_errors=True)
    return out
