"""``tokenizer_source: union`` and ``tokens``: merge models with different vocabularies by token.

As mergekit 0.1.5 does: the output tokenizer is the base's (the first model's without a base) with every
token another model has and the base lacks added, in the order the models list them (each model's special
tokens after its plain ones). Each model's embedding and lm_head rows are then laid out by token in the
output's order; a token a model lacks gets, for that model, the row of the one model that has it, else
the base's row when the base has it, else the mean of the rows of the models that have it (a token no
model has gets zeros). The merge then runs on these aligned rows as on any tensor, and the output's
``vocab_size`` is the union's size. Rows past a model's ``vocab_size`` (tokenizer entries without
weights) are ignored. The tokenizers are read with transformers (``trust_remote_code`` off).

``tokens`` (mergekit's ``tokenizer.tokens``) sets where chosen tokens' rows come from, with any tokenizer
source: ``source: MODEL`` (that model's row of the token), ``{kind: model_token, model, token | token_id}``
(that model's row of another token), ``{kind: zero}``; a token the output tokenizer lacks is added. A
model that has the token keeps its own row unless ``force: true``; the others take the given row.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, model_validator

from evomerge.errors import CheckpointError, RecipeError

__all__ = ["ModelToken", "TokenSource", "VocabAlignment", "ZeroRow", "union_vocab", "vocab_tensors"]


class ZeroRow(BaseModel):
    """``{kind: zero}``: a row of zeros."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    kind: str = "zero"

    @model_validator(mode="after")
    def _kind(self) -> ZeroRow:
        if self.kind != "zero":
            raise ValueError("kind: 'zero'")
        return self


class ModelToken(BaseModel):
    """``{kind: model_token, model, token | token_id}``: a model's row of some token."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    kind: str = "model_token"
    model: str
    token: str | None = None
    token_id: int | None = None

    @model_validator(mode="after")
    def _one(self) -> ModelToken:
        if self.kind != "model_token":
            raise ValueError("kind: 'model_token'")
        if (self.token is None) == (self.token_id is None):
            raise ValueError("give exactly one of token and token_id")
        return self


class TokenSource(BaseModel):
    """Where one token's rows come from (``tokens: {TOKEN: {source: ..., force: ...}}``)."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    source: ZeroRow | ModelToken | str
    force: bool = False


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
    tokens: dict[str, TokenSource] = field(default_factory=dict)
    original: dict[str, dict[str, int]] = field(default_factory=dict)
    """Each model's own vocabulary (token -> row)."""
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
        vocab = self.tokenizer.get_vocab()
        configured = {vocab[t]: spec for t, spec in self.tokens.items()}
        for token in missing_somewhere:
            if token in configured:
                continue
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
        forced: list[int] = []
        for token, spec in configured.items():
            default[token] = self._configured_row(spec, token, tensors, default)
            if spec.force:
                forced.append(token)
        out: dict[str, torch.Tensor] = {}
        for m in models:
            index = torch.tensor(self.rows[m])
            aligned = default.clone()
            ok = index >= 0
            ok[forced] = False
            aligned[ok] = tensors[m][index[ok]].to(aligned.dtype)
            out[m] = aligned
        return out

    def _configured_row(
        self, spec: TokenSource, token: int, tensors: Mapping[str, torch.Tensor], like: torch.Tensor
    ) -> torch.Tensor:
        if isinstance(spec.source, ZeroRow):
            return torch.zeros_like(like[0])
        model = spec.source.model if isinstance(spec.source, ModelToken) else spec.source
        key = next((m for m in tensors if _same(m, model)), None)
        if key is None:
            raise RecipeError(f"tokens: {model!r} is not one of the merged models")
        if isinstance(spec.source, ModelToken):
            row = spec.source.token_id
            if row is None:
                row = self.original[key].get(str(spec.source.token), -1)
            if not 0 <= row < tensors[key].shape[0]:
                raise RecipeError(f"tokens: {model!r} has no row for {spec.source.token or row!r}")
        else:
            row = self.rows[key][token]
            if row < 0:
                raise RecipeError(f"tokens: {model!r} lacks the token it should give a row for")
        return tensors[key][row].to(like.dtype)


def _same(a: str, b: str) -> bool:
    return Path(a).expanduser().resolve() == Path(b).expanduser().resolve()


def union_vocab(
    base: str | None,
    models: Sequence[str],
    source: str = "union",
    tokens: Mapping[str, TokenSource] | None = None,
) -> VocabAlignment:
    """The output vocabulary and every model's rows in it: the union of the tokenizers of ``base`` (the
    first of ``models`` when None) and ``models`` (``source: union``), or the base's (``base``) or a
    model's tokenizer (a path), each with ``tokens`` added."""
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
    if source == "union":
        out = _load_tokenizer(first)  # a fresh copy: adding tokens does not touch the base's
        base_vocab = tokenizers[first].get_vocab()
        for token in plain:
            if token not in special and token not in base_vocab:
                out.add_tokens(token)
        for info in special.values():
            out.add_tokens(info)
    else:
        out = _load_tokenizer(first if source == "base" else source)
    have = set(out.get_vocab())
    for token in tokens or {}:
        if token not in have:
            out.add_tokens(token)
            have.add(token)
    vocab = out.get_vocab()
    rows: dict[str, list[int]] = {}
    for m in order:
        theirs = tokenizers[m].get_vocab()
        layout = [-1] * len(vocab)
        for token, index in vocab.items():
            row = theirs.get(token, -1)
            layout[index] = row if 0 <= row < sizes[m] else -1
        rows[m] = layout
    original = {m: tokenizers[m].get_vocab() for m in order}
    return VocabAlignment(out, rows, base, dict(tokens or {}), original)


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
