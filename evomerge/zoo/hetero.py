"""A heterogeneous expert for the zoo: another architecture, another tokenizer, another skill.

The zoo's base and experts all share one Llama architecture and one byte-level BPE tokenizer, so they
can be merged weight by weight. Fusion of *heterogeneous* models needs an expert that shares neither:
:func:`build_hetero` trains, with fixed seeds and on CPU, a small GPT-2 (``GPT2LMHeadModel``) with its
own SentencePiece-style tokenizer (Metaspace ``▁`` BPE, individual digits, a different vocabulary) on a
task family that none of the zoo's experts covers:

- ``sort``: sort 3 to 5 distinct letters (``Sort the letters: d a c b`` -> ``a b c d``).

The expert is trained mostly on ``sort`` plus a share of the zoo's own training data (arith, code,
logic), in the zoo's prompt format (``Q: ...\\nA: ...``), so any zoo model (the base, a merge) can be
scored on ``sort`` with :func:`evomerge.evaluators.evaluate` and the task configs of the manifest.
It also writes instruction-response JSONL files (``{"id", "instruction", "response"}``) over all four
families, for distilling a pivot. Everything lands in ``<cache>/hetero-<name>-<hash>/``:

```
hetero.json                     manifest (config, paths, task configs, scores, build seconds)
model/                          HF model directory (GPT-2 safetensors + tokenizer)
tokenizer/                      the tokenizer alone (tokenizer.json, PreTrainedTokenizerFast)
data/sort.{train,dev,test}.jsonl   the new family in the zoo's task format {"id", "question", "answer"}
fusion/{train,dev,test}.jsonl   instruction-response data of all four families
```

The hash covers the config, the zoo's config hash (the expert trains on the zoo's data) and
:data:`HETERO_VERSION`. Like :func:`evomerge.zoo.build_zoo`, the directory is built under a temporary
name and renamed when complete, and a finished build with the same hash is reused. By default it lives
next to the zoo (in the zoo's cache directory).
"""

from __future__ import annotations

import hashlib
import json
import random
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

from evomerge.atomic_io import atomic_dir
from evomerge.evaluators import HFBackend, TaskConfig, evaluate
from evomerge.zoo.common import PROMPT, Progress, Zoo, family_tasks, read_examples, write_fusion
from evomerge.zoo.tasks import HETERO_FAMILIES, Example, gen_sort, generate_examples, write_jsonl
from evomerge.zoo.training import encode_row, save_model, train

__all__ = [
    "FAMILY",
    "HETERO_FAMILIES",
    "HETERO_PRESETS",
    "HETERO_VERSION",
    "HeteroConfig",
    "HeteroExpert",
    "build_hetero",
    "find_hetero",
    "gen_sort",
    "generate_examples",
    "hetero_dir",
    "read_fusion",
    "train_metaspace_tokenizer",
]

# Bump when the generator, the tokenizer or the training change: cached builds are then rebuilt.
HETERO_VERSION = 1
FAMILY = "sort"
"""The task family of the heterogeneous expert (none of the zoo's families)."""

# -- tokenizer --------------------------------------------------------------------------------------

BOS, EOS, PAD, UNK = "<s>", "</s>", "<pad>", "<unk>"
META = "\u2581"  # "▁", SentencePiece's word-boundary marker


def train_metaspace_tokenizer(texts: Iterable[str], vocab_size: int = 320) -> PreTrainedTokenizerFast:
    """A SentencePiece-style BPE: NFKC, spaces as ``▁`` (prepended to the text), one token per digit.

    BOS is prepended to every encoded text; PAD/UNK are specials; padding is on the left. The vocabulary
    is at most ``vocab_size`` (a small corpus may have fewer merges to learn).
    """
    tok = Tokenizer(models.BPE(unk_token=UNK))
    tok.normalizer = normalizers.NFKC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Metaspace(replacement=META, prepend_scheme="always", split=True),
            pre_tokenizers.Digits(individual_digits=True),
        ]
    )
    tok.decoder = decoders.Metaspace(replacement=META, prepend_scheme="always", split=True)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[PAD, BOS, EOS, UNK], show_progress=False
    )
    tok.train_from_iterator(texts, trainer=trainer)
    bos_id = tok.token_to_id(BOS)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)]
    )
    fast = PreTrainedTokenizerFast(  # type: ignore[no-untyped-call]
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD, unk_token=UNK, padding_side="left"
    )
    return fast


# -- config and manifest ----------------------------------------------------------------------------


class HeteroConfig(BaseModel):
    """Everything that determines the heterogeneous expert's bytes (with the zoo's config hash)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = "tiny"
    seed: int = 0
    family: Literal["sort"] = "sort"
    n_embd: int = 64
    n_layer: int = 3
    n_head: int = 2
    vocab_size: int = 320
    n_train: int = 3000
    n_dev: int = 200
    n_test: int = 300
    dev_size: int = Field(default=200, ge=1)
    test_size: int = Field(default=300, ge=1)
    steps: int = Field(default=1200, ge=1)
    batch_size: int = Field(default=64, ge=1)
    lr: float = Field(default=3e-3, gt=0.0)
    mix: float = Field(default=0.5, ge=0.0, lt=1.0)
    """The share of the training rows drawn from the zoo's families (the rest is the new family)."""
    fusion_per_family: int = Field(default=3000, ge=1)
    """At most this many training examples per family in ``fusion/train.jsonl``."""
    max_new_tokens: int = Field(default=12, ge=1)
    """The generation budget of the new family's task configs (the answer is up to 5 letters)."""

    @model_validator(mode="after")
    def _check(self) -> HeteroConfig:
        if self.n_embd % self.n_head or self.n_embd // self.n_head < 32:
            raise ValueError("n_embd / n_head must be an integer >= 32 (vLLM needs head_dim >= 32)")
        if self.dev_size > self.n_dev or self.test_size > self.n_test:
            raise ValueError("dev_size/test_size cannot exceed n_dev/n_test")
        return self

    def digest(self, zoo_digest: str) -> str:
        """Hash of the config, the zoo's config hash and the hetero code's version."""
        data = {"config": self.model_dump(mode="json"), "zoo": zoo_digest, "version": HETERO_VERSION}
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:12]


HETERO_PRESETS: dict[str, HeteroConfig] = {
    "tiny": HeteroConfig(),
    # next to the micro zoo (tests): same architecture, a quarter of the training
    "micro": HeteroConfig(
        name="micro",
        n_train=1500,
        n_dev=40,
        n_test=40,
        dev_size=24,
        test_size=40,
        steps=300,
        batch_size=32,
        mix=0.3,
        fusion_per_family=1500,
    ),
}

Scores = dict[str, dict[str, dict[str, float]]]
"""model ("expert", "zoo_base") -> split -> task -> greedy exact-match accuracy."""


class HeteroExpert(BaseModel):
    """The manifest of a built heterogeneous expert (``hetero.json``); paths are absolute once loaded."""

    model_config = ConfigDict(frozen=True)

    config: HeteroConfig
    zoo_digest: str
    root: str
    model: str
    """HF model directory (GPT-2 weights and the tokenizer): loads with the Auto classes."""
    tokenizer: str
    """The tokenizer's own directory (``tokenizer.json``)."""
    family: str
    data_files: dict[str, str]
    """The new family's splits in the zoo's task format ``{"id", "question", "answer"}``."""
    fusion_files: dict[str, str]
    """Instruction-response JSONL ``{"id", "instruction", "response"}`` of all families, per split."""
    tasks: tuple[TaskConfig, ...]
    """The new family's task config (the zoo's prompt format): scores any model with ``evaluate``."""
    scores: Scores
    build_seconds: float

    @classmethod
    def load(cls, root: Path) -> HeteroExpert:
        data = json.loads((root / "hetero.json").read_text())
        data["root"] = str(root)
        for key in ("model", "tokenizer"):
            data[key] = str(root / data[key])
        for key in ("data_files", "fusion_files"):
            data[key] = {s: str(root / p) for s, p in data[key].items()}
        for task in data["tasks"]:
            task["data_files"] = {s: str(root / p) for s, p in task["data_files"].items()}
        return cls.model_validate(data)


def _zoo(zoo: Zoo | str | Path) -> Zoo:
    return zoo if isinstance(zoo, Zoo) else Zoo.load(Path(zoo))


def _config(zoo: Zoo, config: HeteroConfig | str | None) -> HeteroConfig:
    if isinstance(config, HeteroConfig):
        return config
    name = config if config is not None else zoo.config.name
    if name not in HETERO_PRESETS:
        if config is not None:
            raise ValueError(f"unknown hetero preset {name!r} (known: {', '.join(HETERO_PRESETS)})")
        name = "tiny"  # a custom zoo: the full-size expert
    return HETERO_PRESETS[name]


def hetero_dir(zoo: Zoo, config: HeteroConfig, cache_dir: Path | None = None) -> Path:
    """Where the build for ``zoo`` and ``config`` lives (default: the zoo's cache directory)."""
    parent = cache_dir if cache_dir is not None else Path(zoo.root).parent
    return parent / f"hetero-{config.name}-{config.digest(zoo.config.digest())}"


def find_hetero(
    zoo: Zoo | str | Path, config: HeteroConfig | str | None = None, cache_dir: Path | None = None
) -> HeteroExpert | None:
    """The finished build for ``zoo`` and ``config``, or None."""
    z = _zoo(zoo)
    root = hetero_dir(z, _config(z, config), cache_dir)
    return HeteroExpert.load(root) if (root / "hetero.json").is_file() else None


def read_fusion(path: str | Path) -> list[dict[str, str]]:
    """The records of one fusion JSONL file."""
    with Path(path).open(encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


# -- build ------------------------------------------------------------------------------------------


def build_hetero(
    zoo: Zoo | str | Path,
    cache_dir: Path | None = None,
    progress: Progress | None = None,
    *,
    config: HeteroConfig | str | None = None,
    force: bool = False,
) -> HeteroExpert:
    """Build (or reuse) the heterogeneous expert for ``zoo`` (a manifest or a zoo directory).

    ``config`` is a :class:`HeteroConfig` or a preset name; by default the preset named like the zoo's
    (``micro`` next to the micro zoo), else ``tiny``.
    """
    z = _zoo(zoo)
    cfg = _config(z, config)
    root = hetero_dir(z, cfg, cache_dir)
    if not force and (root / "hetero.json").is_file():
        return HeteroExpert.load(root)
    t0 = time.perf_counter()
    with atomic_dir(root) as tmp:
        _build_into(z, cfg, tmp, progress)
        tasks = _task_configs(cfg)
        scores = _measure(z, tmp, tasks)
        manifest: dict[str, Any] = {
            "config": cfg.model_dump(mode="json"),
            "zoo_digest": z.config.digest(),
            "model": "model",
            "tokenizer": "tokenizer",
            "family": cfg.family,
            "data_files": {s: f"data/{cfg.family}.{s}.jsonl" for s in ("train", "dev", "test")},
            "fusion_files": {s: f"fusion/{s}.jsonl" for s in ("train", "dev", "test")},
            "tasks": [t.model_dump(mode="json") for t in tasks],
            "scores": scores,
            "build_seconds": round(time.perf_counter() - t0, 2),
        }
        (tmp / "hetero.json").write_text(json.dumps(manifest, indent=2))
    return HeteroExpert.load(root)


def _task_configs(config: HeteroConfig) -> list[TaskConfig]:
    """The new family's task."""
    return family_tasks(
        [config.family],
        max_new_tokens=config.max_new_tokens,
        dev_size=config.dev_size,
        test_size=config.test_size,
        seed=config.seed,
    )


def _build_into(zoo: Zoo, config: HeteroConfig, out: Path, progress: Progress | None) -> None:
    fam = config.family
    # 1. the new family: disjoint train/dev/test, seeded like the zoo's splits.
    base_seed = config.seed * 1000
    test = generate_examples(fam, config.n_test, seed=base_seed + 1)
    dev = generate_examples(fam, config.n_dev, seed=base_seed + 2, exclude={q for q, _ in test})
    held = {q for q, _ in test + dev}
    train_ex = generate_examples(fam, config.n_train, seed=base_seed + 3, exclude=held)
    splits: dict[str, dict[str, list[Example]]] = {fam: {"train": train_ex, "dev": dev, "test": test}}
    for split, exs in splits[fam].items():
        write_jsonl(out / "data" / f"{fam}.{split}.jsonl", fam, exs)
    # the zoo's families: the zoo's own splits, so no zoo test question is ever trained on.
    zoo_families = list(zoo.config.families)
    for zf in zoo_families:
        splits[zf] = {
            s: read_examples(Path(zoo.root) / "data" / f"{zf}.{s}.jsonl") for s in ("train", "dev", "test")
        }
    families = [fam, *zoo_families]

    # 2. fusion data: instruction = the zoo's question, response = the answer.
    write_fusion(
        out / "fusion" / "train.jsonl",
        [(f, splits[f]["train"][: config.fusion_per_family]) for f in families],
        shuffle_seed=config.seed,
    )
    for split in ("dev", "test"):
        write_fusion(out / "fusion" / f"{split}.jsonl", [(f, splits[f][split]) for f in families], None)

    # 3. tokenizer: on the training text of every family.
    texts = [PROMPT.format(question=q) + f" {a}\n" for f in families for q, a in splits[f]["train"]]
    tok = train_metaspace_tokenizer(texts, vocab_size=config.vocab_size)
    tok.save_pretrained(out / "tokenizer")
    pad_id = int(tok.pad_token_id)

    # 4. GPT-2 on the new family plus a share of the zoo's families, in a fixed order.
    rows = [encode_row(tok, q, a) for q, a in train_ex]
    others = [ex for zf in zoo_families for ex in splits[zf]["train"]]
    n_other = min(len(others), round(len(rows) * config.mix / (1 - config.mix)))
    rows += [encode_row(tok, q, a) for q, a in random.Random(config.seed + 7).sample(others, n_other)]
    torch.manual_seed(config.seed)
    gpt2 = GPT2Config(
        vocab_size=len(tok),
        n_embd=config.n_embd,
        n_layer=config.n_layer,
        n_head=config.n_head,
        n_positions=128,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=pad_id,
    )
    model: Any = GPT2LMHeadModel(gpt2)  # ``train`` is typed for the zoo's Llama; any causal LM does

    def on_step(step: int, loss: float) -> None:
        if progress is not None:
            progress(f"hetero {fam} loss {loss:.3f}", step + 1, config.steps)

    train(
        model,
        rows,
        steps=config.steps,
        lr=config.lr,
        batch_size=config.batch_size,
        seed=config.seed,
        pad_id=pad_id,
        on_step=on_step,
    )
    save_model(model, tok, out / "model")


def _measure(zoo: Zoo, out: Path, tasks: list[TaskConfig]) -> Scores:
    """Greedy exact match of the expert on every family and of the zoo's base on the new family."""
    scores: Scores = {"expert": {}, "zoo_base": {}}
    expert = HFBackend.from_pretrained(out / "model")
    base = HFBackend.from_pretrained(zoo.base)
    for split in ("dev", "test"):
        # the zoo's tasks carry absolute data paths; the new family's are relative to ``out``
        result = evaluate(expert, [*tasks, *zoo.tasks], split, out)
        scores["expert"][split] = {k: round(v, 4) for k, v in result.scores.items()}
        result = evaluate(base, tasks, split, out)
        scores["zoo_base"][split] = {k: round(v, 4) for k, v in result.scores.items()}
    return scores
