"""``tokenizer_source: union``: merge models with different vocabularies over the union of their tokens.

As mergekit 0.1.5 does: the output tokenizer is the base's (the first model's without a base) with every
token another model has and the base lacks added, in the order the models list them (each model's special
tokens after its plain ones). Each model's embedding and lm_head rows are then laid out by token in the
output's order; a token a model lacks gets, for that model, the row of the one model that has it, else
the base's row when the base has it, else the mean of the rows of the models that have it (a token no
model has gets zeros). The merge then runs on these aligned rows as on any tensor, and the output's
``vocab_size`` is the union's size. Rows past a model's ``vocab_size`` (tokenizer entries without
weights) are ignored. The tokenizers are read with transformers (``trust_remote_code`` off).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from evomerge.errors import CheckpointError

__all__ = ["VocabAlignment", "union_vocab", "vocab_tensors"]


def _load_tokenizer(path: str) -> Any:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path, use_fast=True, trust_remote_code=False)
    except Exception as exc:  # transformers raises many kinds; one line for the user
        raise CheckpointError(
            f"tokenizer_source: union: cannot read the tokenizer of {path}: {exc}"
        ) from None


def _config_vocab_size(path: str, tokenizer: Any) -> int:
    try:
        size = json.loads((Path(path) / "config.json").read_text(encoding="utf-8")).get("vocab_size")
    except (OSError, json.JSONDecodeError):
        size = None
    return int(size) if isinstance(size, int) else len(tokenizer.get_vocab())


@dataclass
class VocabAlignment:
    """The union tokenizer and, per model, the row each output token takes (``-1``: the model lacks it)."""

    tokenizer: Any
    rows: dict[str, list[int]]
    """Model path -> for output token id ``i``, that model's row (or -1)."""
    base: str | None
    tensors: set[str] = field(default_factory=set)
    """The tensor names whose rows are tokens (embeddings, lm_head), filled in by the executor."""

    @property
    def size(self) -> int:
        return len(self.tokenizer.get_vocab())

    def align(self, tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Every model's vocabulary tensor (rows = tokens) laid out in the union's token order."""
        models = list(tensors)
        present = torch.stack([torch.tensor(self.rows[m]) >= 0 for m in models])  # [models, vocab]
        count = present.sum(0)
        first = tensors[models[0]]
        default = torch.zeros((self.size, *first.shape[1:]), dtype=first.dtype, device=first.device)
        missing_somewhere = (count < len(models)).nonzero().flatten().tolist()
        for token in missing_somewhere:
            have = [m for m, ok in zip(models, present[:, token].tolist(), strict=True) if ok]
            if not have:
                continue  # in no model: zeros
            if len(have) == 1:
                donor = have[0]
            elif self.base is not None and self.base in have:
                donor = self.base
            else:
                default[token] = torch.stack([tensors[m][self.rows[m][token]].float() for m in have]).mean(0)
                continue
            default[token] = tensors[donor][self.rows[donor][token]]
        out: dict[str, torch.Tensor] = {}
        for m in models:
            index = torch.tensor(self.rows[m])
            aligned = default.clone()
            ok = index >= 0
            aligned[ok] = tensors[m][index[ok]].to(aligned.dtype)
            out[m] = aligned
        return out


def union_vocab(base: str | None, models: Sequence[str]) -> VocabAlignment:
    """The union of the tokenizers of ``base`` (the first of ``models`` when None) and ``models``."""
    first = base if base is not None else models[0]
    order = [first, *[m for m in models if m != first]]
    tokenizers = {m: _load_tokenizer(m) for m in order}
    sizes = {m: _config_vocab_size(m, tokenizers[m]) for m in order}
    plain: dict[str, None] = {}
    special: dict[str, Any] = {}
    for m in order:
        tok = tokenizers[m]
        added = tok.added_tokens_decoder
        added_names = {info.content for info in added.values()}
        for token, index in tok.get_vocab().items():
            if index < sizes[m] and token not in added_names:
                plain.setdefault(token, None)
        for index, info in added.items():
            if index < sizes[m]:
                special.setdefault(info.content, info)
    out = _load_tokenizer(first)  # a fresh copy: adding tokens does not touch the base's
    base_vocab = tokenizers[first].get_vocab()
    for token in plain:
        if token not in special and token not in base_vocab:
            out.add_tokens(token)
    for info in special.values():
        out.add_tokens(info)
    vocab = out.get_vocab()
    rows: dict[str, list[int]] = {}
    for m in order:
        theirs = tokenizers[m].get_vocab()
        layout = [-1] * len(vocab)
        for token, index in vocab.items():
            row = theirs.get(token, -1)
            layout[index] = row if 0 <= row < sizes[m] else -1
        rows[m] = layout
    return VocabAlignment(out, rows, base)


def vocab_tensors(reference: Any, infos: Mapping[str, Any]) -> list[str]:
    """The float tensors whose rows are tokens: embeddings and lm_head with ``vocab_size`` rows (position
    embeddings and other tables are not)."""
    from evomerge.checkpoints.layers import tensor_group

    size = reference.config.get("vocab_size")
    return [
        name
        for name, info in infos.items()
        if info.is_float
        and tensor_group(name) in ("embed", "lm_head")
        and info.shape
        and (size is None or info.shape[0] == size)
    ]
