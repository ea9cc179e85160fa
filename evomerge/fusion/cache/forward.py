"""The source model's side of the pass: loading its tokenizer and model, checking the tokenizer decodes,
running right-padded batches (top-k log-probs and the response cross-entropy per sequence) and laying
the results out as a shard's tensors."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from evomerge.errors import CheckpointError, ConfigError
from evomerge.fusion.cache.storage import _one_line
from evomerge.fusion.data import IGNORE_INDEX, Encoded, Pair


def _load_tokenizer(src: Path, trust_remote_code: bool) -> Any:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(src), trust_remote_code=trust_remote_code)
    except Exception as exc:  # transformers raises OSError, ValueError and others for a bad tokenizer
        raise CheckpointError(f"{src}: cannot load the source tokenizer ({_one_line(exc)})") from None


def _load_model(src: Path, dtype: torch.dtype, device: torch.device, trust_remote_code: bool) -> Any:
    from transformers import AutoModelForCausalLM

    try:
        model: Any = AutoModelForCausalLM.from_pretrained(
            str(src), dtype=dtype, use_safetensors=True, trust_remote_code=trust_remote_code
        )
    except (torch.OutOfMemoryError, MemoryError):
        raise ConfigError(f"out of memory loading the source model {src}") from None
    except Exception as exc:  # transformers raises OSError, ValueError, KeyError ... for a bad model
        raise CheckpointError(f"{src}: cannot load the source model ({_one_line(exc)})") from None
    try:
        model.to(device)
    except (torch.OutOfMemoryError, MemoryError):
        raise ConfigError(f"out of memory moving the source model to {device}") from None
    model.eval()
    return model


def _parse_device(device: str | torch.device) -> torch.device:
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError, TypeError) as exc:
        raise ConfigError(f"invalid device {device!r} ({_one_line(exc)})") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {device!r} asked for but CUDA is not available")
    return dev


def _check_decodes(tokenizer: Any, pairs: Sequence[Pair], encoded: Sequence[Encoded]) -> None:
    """ConfigError when the tokenizer cannot turn the ids of a pair back into non-empty text."""
    for pair, enc in zip(pairs, encoded, strict=True):
        if not any(e > s for s, e in enc.offsets):
            continue
        try:
            text = tokenizer.decode(enc.input_ids, skip_special_tokens=True)
        except Exception as exc:  # a broken decoder can raise anything
            raise ConfigError(
                f"the source tokenizer cannot decode token ids to text ({_one_line(exc)}); pair {pair.id!r}"
            ) from None
        if not isinstance(text, str) or not text.strip():
            raise ConfigError(
                f"the source tokenizer decodes the ids of pair {pair.id!r} to empty text; "
                "it cannot be used as a fusion source"
            )


def _is_oom(exc: BaseException) -> bool:
    if isinstance(exc, torch.OutOfMemoryError | MemoryError):
        return True
    return isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()


class _Computed:
    """One computed sequence, on CPU, in storage dtypes."""

    __slots__ = ("ce", "topk_ids", "topk_logprobs")

    def __init__(self, topk_ids: torch.Tensor, topk_logprobs: torch.Tensor, ce: float) -> None:
        self.topk_ids = topk_ids
        self.topk_logprobs = topk_logprobs
        self.ce = ce


def _forward_batch(
    model: Any,
    batch: Sequence[Encoded],
    *,
    top_k: int,
    pad_id: int,
    device: torch.device,
    logprob_dtype: torch.dtype,
) -> list[_Computed]:
    """Run one right-padded batch; every row's real tokens sit at positions 0..n-1 as when run alone."""
    lengths = [len(e) for e in batch]
    width = max(lengths)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for b, enc in enumerate(batch):
        ids[b, : lengths[b]] = torch.tensor(enc.input_ids, dtype=torch.long)
        mask[b, : lengths[b]] = 1
    with torch.inference_mode():
        out = model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False)
        logits = out.logits
        vocab = int(logits.shape[-1])
        if top_k > vocab:
            raise ConfigError(f"top_k {top_k} is larger than the source vocabulary ({vocab})")
        results: list[_Computed] = []
        for b, enc in enumerate(batch):
            n = lengths[b]
            if max(enc.input_ids) >= vocab:
                raise ConfigError(
                    f"token id {max(enc.input_ids)} is outside the source model's vocabulary ({vocab}); "
                    "the tokenizer does not belong to this model"
                )
            lg = logits[b, : n - 1].float()  # row j predicts token j + 1
            lse = torch.logsumexp(lg, dim=-1)
            values, indices = torch.topk(lg, top_k, dim=-1)
            topk_ids = torch.full((n, top_k), -1, dtype=torch.int32)
            topk_lp = torch.full((n, top_k), float("-inf"), dtype=torch.float32)
            topk_ids[1:] = indices.to("cpu", torch.int32)
            topk_lp[1:] = (values - lse[:, None]).cpu()
            gold = ids[b, 1:n].to(lg.device)
            gold_lp = lg.gather(-1, gold[:, None]).squeeze(-1) - lse
            resp = torch.tensor([lab != IGNORE_INDEX for lab in enc.labels[1:]], dtype=torch.bool)
            ce = float(-gold_lp.cpu()[resp].double().mean()) if bool(resp.any()) else math.nan
            results.append(_Computed(topk_ids, topk_lp.to(logprob_dtype), ce))
    return results


def _shard_tensors(
    encoded: Sequence[Encoded], computed: Sequence[_Computed], logprob_dtype: torch.dtype, top_k: int
) -> dict[str, torch.Tensor]:
    lengths = torch.tensor([0] + [len(e) for e in encoded], dtype=torch.int64)
    return {
        "offsets": torch.cumsum(lengths, 0),
        "input_ids": torch.tensor([i for e in encoded for i in e.input_ids], dtype=torch.int32),
        "labels": torch.tensor([lab for e in encoded for lab in e.labels], dtype=torch.int32),
        "char_offsets": torch.tensor(
            [list(o) for e in encoded for o in e.offsets], dtype=torch.int32
        ).reshape(-1, 2),
        "topk_ids": torch.cat([c.topk_ids for c in computed]).reshape(-1, top_k).contiguous(),
        "topk_logprobs": torch.cat([c.topk_logprobs for c in computed]).reshape(-1, top_k).to(logprob_dtype),
        "ce": torch.tensor([c.ce for c in computed], dtype=torch.float32),
    }
