"""Where a tensor sits in a transformer: its layer, its relative depth and its functional group.

These helpers work on tensor names only, for the naming schemes of Llama, Qwen2, Mistral, Gemma (also the
multimodal ``model.language_model.layers.N.`` variant) and GPT-2-style ``transformer.h.N.`` checkpoints.
"""

from __future__ import annotations

import re

__all__ = [
    "EMBEDDING_MARKERS",
    "TENSOR_GROUPS",
    "layer_index",
    "layer_position",
    "tensor_group",
    "with_layer",
]

# A decoder block: ``...layers.N.`` (Llama, Qwen2, Mistral, Gemma, GPT-NeoX) or ``...h.N.`` (GPT-2, Falcon).
_LAYER_RE = re.compile(r"((?:^|\.)(?:layers|h)\.)(\d+)(\.|$)")

EMBEDDING_MARKERS: tuple[str, ...] = ("embed_tokens", "wte", "wpe", "word_embeddings", "embed_in")
"""Name components of input embeddings."""

TENSOR_GROUPS: tuple[str, ...] = ("self_attn", "mlp", "norm", "embed", "lm_head", "other")
"""Every value :func:`tensor_group` can return."""

_ATTN_PARTS = frozenset({"self_attn", "attn", "attention", "self_attention"})
_MLP_PARTS = frozenset({"mlp", "feed_forward", "ffn", "block_sparse_moe"})
_LM_HEAD_PARTS = frozenset({"lm_head", "embed_out"})


def layer_index(name: str) -> int | None:
    """The decoder-layer number of tensor ``name``, or None for tensors outside the layer stack."""
    match = _LAYER_RE.search(name)
    return int(match.group(2)) if match else None


def with_layer(name: str, layer: int) -> str:
    """Tensor ``name`` renamed to decoder layer ``layer`` (unchanged outside the layer stack)."""
    return _LAYER_RE.sub(lambda m: f"{m.group(1)}{layer}{m.group(3)}", name, count=1)


def layer_position(name: str, num_layers: int) -> float:
    """Relative depth of tensor ``name`` in [0, 1], where per-layer parameter lists are interpolated.

    Layer ``l`` of ``n`` maps to ``l / (n - 1)`` (clamped to [0, 1]; 1 when ``n <= 1``). Every tensor outside
    the layer stack (embeddings, final norm, lm_head) maps to 0. This is what mergekit does (it evaluates
    gradients for pre- and post-layer weights at t = 0), so a mergekit recipe with per-layer lists gives the
    same tensors here.
    """
    index = layer_index(name)
    if index is None:
        return 0.0
    if num_layers <= 1:
        return 1.0
    return min(1.0, max(0.0, index / (num_layers - 1)))


def tensor_group(name: str) -> str:
    """Functional group of tensor ``name``: one of :data:`TENSOR_GROUPS`.

    Attention and MLP sub-modules win over norms inside them (``self_attn.q_norm`` is ``self_attn``);
    ``post_attention_layernorm`` is a ``norm``.
    """
    parts = name.split(".")
    for part in parts:
        if part in _ATTN_PARTS:
            return "self_attn"
        if part in _MLP_PARTS:
            return "mlp"
    for part in parts:
        if part in _LM_HEAD_PARTS:
            return "lm_head"
        if part in EMBEDDING_MARKERS:
            return "embed"
    for part in parts:
        if "norm" in part or re.fullmatch(r"ln_?(\d+|f)?", part):
            return "norm"
    return "other"
