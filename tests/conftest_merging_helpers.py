"""Helpers for tests/test_checkpoints.py and tests/test_merging.py: tiny checkpoints built on the fly."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

TINY_LLAMA: dict[str, Any] = {
    "hidden_size": 64,
    "num_attention_heads": 2,
    "num_key_value_heads": 2,
    "num_hidden_layers": 3,
    "intermediate_size": 128,
    "vocab_size": 100,
}

TOKENIZER_STUBS: dict[str, str] = {
    "tokenizer_config.json": '{"model_max_length": 128}\n',
    "special_tokens_map.json": '{"bos_token": "<s>"}\n',
    "chat_template.jinja": "{{ messages }}\n",
}


def tiny_llama(seed: int = 0) -> Any:
    """A freshly initialised tiny ``LlamaForCausalLM`` (deterministic for a seed)."""
    import transformers

    torch.manual_seed(seed)
    model: Any = transformers.LlamaForCausalLM(transformers.LlamaConfig(**TINY_LLAMA))
    return model.eval()


def save_llama_family(
    root: Path, *, num_experts: int = 2, scale: float = 0.02
) -> tuple[Any, Path, list[Path]]:
    """Save a tiny Llama base (with stub tokenizer files) and experts made by perturbing it.

    Returns ``(base_model, base_dir, expert_dirs)``.
    """
    base = tiny_llama(0)
    base_dir = root / "base"
    base.save_pretrained(base_dir)
    for name, text in TOKENIZER_STUBS.items():
        (base_dir / name).write_text(text)
    expert_dirs: list[Path] = []
    state = {k: v.detach().clone() for k, v in base.state_dict().items()}
    for i in range(num_experts):
        gen = torch.Generator().manual_seed(100 + i)
        expert = tiny_llama(0)
        perturbed = {k: v + scale * torch.randn(v.shape, generator=gen) for k, v in state.items()}
        expert.load_state_dict(perturbed)
        out = root / f"expert_{i}"
        expert.save_pretrained(out)
        expert_dirs.append(out)
    return base, base_dir, expert_dirs


def write_model(
    path: Path,
    tensors: Mapping[str, torch.Tensor],
    *,
    config: dict[str, Any] | None = None,
    shards: list[list[str]] | None = None,
) -> Path:
    """Write a hand-made model directory: one ``model.safetensors``, or indexed shards listing names."""
    path.mkdir(parents=True, exist_ok=True)
    if config is not None:
        (path / "config.json").write_text(json.dumps(config))
    if shards is None:
        save_file(dict(tensors), str(path / "model.safetensors"), metadata={"format": "pt"})
        return path
    weight_map: dict[str, str] = {}
    for i, names in enumerate(shards):
        file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file({n: tensors[n] for n in names}, str(path / file), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(names, file))
    index = {"metadata": {"total_size": 0}, "weight_map": weight_map}
    (path / "model.safetensors.index.json").write_text(json.dumps(index))
    return path


def entries(parent: Path) -> list[str]:
    """Names in ``parent`` (to check no temporary directory was left behind)."""
    return sorted(p.name for p in parent.iterdir())
