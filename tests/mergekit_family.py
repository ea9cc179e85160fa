"""The tiny model family and helpers the mergekit equivalence tests share (tests/test_mergekit_equivalence.py,
tests/test_slices.py): a tiny Llama base and three experts, merged by mergekit in-process and by evomerge."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from string import Template
from typing import Any

import pytest
import torch
import yaml

from evomerge.checkpoints import ModelDir
from evomerge.merging import MergeRecipe, merge_streaming

mergekit_config = pytest.importorskip("mergekit.config")
mergekit_merge = pytest.importorskip("mergekit.merge")
mergekit_options = pytest.importorskip("mergekit.options")

NUM_LAYERS = 3
# Both sides compute in float32 with the same torch, in a different order of operations (a few roundings
# per value): 100 float32 epsilons relative, 10 absolute for values near zero. Derived from the dtype,
# not from one machine's results.
F32_EPS = torch.finfo(torch.float32).eps
RTOL = 100 * F32_EPS
ATOL = 10 * F32_EPS


# ============================================================================ the tiny model family
@dataclass(frozen=True)
class Family:
    """A tiny Llama base and three experts ``base + task vector`` (float32 safetensors)."""

    base: Path
    experts: tuple[Path, ...]

    def fill(self, template: str) -> str:
        """A recipe template with ``$base``, ``$e0``, ``$e1``, ``$e2`` replaced by the model paths."""
        names = {"base": str(self.base), **{f"e{i}": str(p) for i, p in enumerate(self.experts)}}
        return Template(template).substitute(names)


def tiny_llama_model(num_layers: int = NUM_LAYERS, hidden: int = 64, arch: str = "llama") -> Any:
    """A tiny Llama (or, ``arch="qwen2"``, Qwen2: biases on q/k/v) causal LM."""
    import transformers

    classes = {
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
    }
    config_class, model_class = classes[arch]
    config = config_class(
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=num_layers,
        num_attention_heads=2,
        num_key_value_heads=2,
        vocab_size=96,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model: Any = model_class(config)
    return model.eval()


def tiny_tokenizer() -> Any:
    """A 96-token word-level tokenizer (every model of the family gets the same one, as real models have)."""
    import transformers
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace

    backend = Tokenizer(WordLevel({f"t{i}": i for i in range(96)}, unk_token="t0"))
    backend.pre_tokenizer = Whitespace()
    fast: Any = transformers.PreTrainedTokenizerFast
    return fast(tokenizer_object=backend, unk_token="t0")


def make_family(
    root: Path, *, num_layers: int = NUM_LAYERS, hidden: int = 64, experts: int = 3, arch: str = "llama"
) -> Family:
    """Base: ``0.02 * randn`` weights, norms ``1 + 0.02 * randn``. Expert i: ``base + 0.01 * (0.6 s +
    0.8 n_i)`` with a shared direction ``s`` and own noise ``n_i``: two task vectors agree in sign on ~62%
    of entries, so TIES' sign election matters."""
    model = tiny_llama_model(num_layers, hidden, arch)
    gen = torch.Generator().manual_seed(1234)
    base: dict[str, torch.Tensor] = {}
    for name, value in model.state_dict().items():
        noise = torch.randn(value.shape, generator=gen)
        base[name] = 1.0 + 0.02 * noise if "norm" in name else 0.02 * noise
    model.load_state_dict(base)
    tokenizer = tiny_tokenizer()
    model.save_pretrained(root / "base")
    tokenizer.save_pretrained(root / "base")
    shared = {name: torch.randn(v.shape, generator=gen) for name, v in base.items()}
    paths: list[Path] = []
    for i in range(experts):
        own = torch.Generator().manual_seed(100 + i)
        state = {
            name: v + 0.01 * (0.6 * shared[name] + 0.8 * torch.randn(v.shape, generator=own))
            for name, v in base.items()
        }
        model.load_state_dict(state)
        model.save_pretrained(root / f"expert_{i}")
        tokenizer.save_pretrained(root / f"expert_{i}")
        paths.append(root / f"expert_{i}")
    return Family(base=root / "base", experts=tuple(paths))


# ============================================================================ helpers
def read_all(path: Path) -> dict[str, torch.Tensor]:
    with ModelDir(path) as md:
        return {n: md.read(n).clone() for n in md.tensor_names()}


def run_mergekit(
    text: str, out: Path, *, random_seed: int | None = None, tokenizer: bool = False
) -> dict[str, torch.Tensor]:
    """Merge with mergekit in-process (CPU, no model card; the tokenizer only with ``tokenizer``) and read
    the result back."""
    config = mergekit_config.MergeConfiguration.model_validate(yaml.safe_load(text))
    options = mergekit_options.MergeOptions(
        copy_tokenizer=tokenizer, write_model_card=False, quiet=True, random_seed=random_seed
    )
    mergekit_merge.run_merge(config, str(out), options=options)
    return read_all(out)


def run_evomerge(text: str, out: Path) -> dict[str, torch.Tensor]:
    return read_all(merge_streaming(MergeRecipe.from_yaml(text), out))
