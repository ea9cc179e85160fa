"""Heterogeneous fusion end to end: source passes, alignment, fused targets, distillation, pairwise merge.

``run_fusion(pivot, out, config)``:

1. every source model runs once over the instruction-response data (:func:`~evomerge.fusion.cache.
   source_pass`, cached and resumable under ``OUT/cache/<source>``);
2. each source's tokens are aligned to the pivot's tokens of the same text (:func:`~evomerge.fusion.
   align.align`), and the source's top-k ids are mapped into the pivot vocabulary (:class:`~evomerge.
   fusion.align.VocabMap`: exact, min_ed or corpus statistics); at each pivot response position aligned
   1-to-1 with a source token of the same string, that source's distribution is the source's target;
3. the sources' targets are fused per sequence (``min_ce``, ``avg_ce``, ``entropy``);
4. ``unified``: the pivot is distilled on the fused targets into ``OUT/unified``; ``pairwise``: each
   source is distilled into its own copy of the pivot (``OUT/pairwise-<source>``), and the copies are
   weight-merged onto the pivot with SCE or RSAF into ``OUT/pairwise`` (the homogeneous merge engine).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator

from evomerge.errors import ConfigError
from evomerge.evaluators import TaskConfig
from evomerge.fusion.distill import DistillConfig, TrainExample, distill

Variant = Literal["unified", "pairwise"]
Say = Callable[[str], None]


class FusionConfig(BaseModel):
    """The ``fusion:`` section of a sweep, or ``evomerge fuse``'s options."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    sources: tuple[str, ...] = Field(min_length=1)
    """Source model directories; ``pivot`` adds the pivot's own distribution (FuseLLM fuses the target
    model with the sources, so where the pivot is the best model min_ce keeps its own distribution)."""
    data: str
    """Instruction-response JSONL (``instruction``/``response`` or ``messages``) to distil on."""
    fusion: Literal["min_ce", "avg_ce", "entropy"] = "min_ce"
    vocab_map: Literal["exact", "min_ed", "stats"] = "min_ed"
    variants: tuple[Variant, ...] = ("unified",)
    pairwise_method: Literal["sce", "rsaf", "linear"] = "sce"
    """How the distilled copies are merged: SCE, RSAF, or ``linear`` (their plain average)."""
    top_k: int = Field(default=10, ge=1)
    max_len: int = Field(default=256, ge=8)
    source_batch_size: int = Field(default=8, ge=1)
    template: str | None = None
    """Plain prompt template with ``{instruction}`` (default ``"{instruction}\n"``); or ``chat: true``."""
    response_format: str = "{response}"
    """How the response follows the prompt, e.g. ``" {response}\n"`` to end answers with a newline."""
    max_pairs: int | None = Field(default=None, ge=1)
    """Distil on the first ``max_pairs`` pairs of ``data`` only."""
    chat: bool = False
    split_tokens: bool = True
    """Also give targets where one source token spans several pivot tokens (prefix-conditioned, see
    ``_split_targets``); off: only 1-to-1 aligned tokens of equal strings, as in FuseLLM."""
    cache_dir: str | None = None
    """Where the source passes are cached (default ``OUT/cache``): runs that share it (other fusion
    functions, losses, learning rates on the same data) reuse the passes instead of redoing them."""
    device: str = "cpu"
    """Where the source passes and the scoring of the fused models run (``distill.device`` trains)."""
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """The sources' and scored models' weight dtype (log-probs are always computed in float32)."""
    distill: DistillConfig = Field(default_factory=DistillConfig)

    @field_validator("response_format")
    @classmethod
    def _has_response(cls, value: str) -> str:
        if "{response}" not in value:
            raise ValueError("must contain {response}")
        return value

    tasks: tuple[TaskConfig, ...] = ()
    """Extra tasks to score the fused models on (e.g. the sources' own task), next to the sweep's."""


def _name(path: str) -> str:
    return Path(path).resolve().name or "source"


def _load_tokenizer(path: str | Path) -> Any:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as err:
        raise ConfigError(f"cannot load the tokenizer of {path}: {str(err).splitlines()[0]}") from None


def build_examples(
    pivot_tokenizer: Any,
    pairs: Sequence[Any],
    sources: Sequence[tuple[Any, Any, Any]],
    config: FusionConfig,
    coverage: list[float] | None = None,
) -> list[TrainExample]:
    """Fused training examples in the pivot's tokenization. ``sources``: (SourceCache, source tokenizer,
    VocabMap) per source. ``coverage``, when given, receives each source's share of response tokens
    with an aligned, mapped distribution."""
    from evomerge.fusion.align import align, token_strings
    from evomerge.fusion.data import encode, render
    from evomerge.fusion.fuse import SourceTargets, get_fusion

    fuse = get_fusion(config.fusion)
    split_maps = [_SplitMap(tok, pivot_tokenizer) for _, tok, _ in sources] if config.split_tokens else []
    examples: list[TrainExample] = []
    covered = [0] * len(sources)
    response_tokens = 0
    for pair in pairs:
        enc = encode(
            render(pair, pivot_tokenizer, template=config.template, chat=config.chat),
            pivot_tokenizer,
            config.max_len,
        )
        labels = list(enc.labels)
        if all(label == -100 for label in labels):
            continue  # truncated away: no response token to learn from
        pivot_strings = token_strings(pivot_tokenizer, list(enc.input_ids))
        n = len(enc.input_ids)
        response_tokens += sum(1 for label in labels[1:] if label != -100)
        targets: list[SourceTargets] = []
        for j, (cache, tokenizer, vocab) in enumerate(sources):
            seq = cache[cache.index(pair.id)]
            src_strings = token_strings(tokenizer, [int(i) for i in seq.input_ids])
            alignment = align(src_strings, pivot_strings, method="auto")  # exact spans when texts match
            k = int(seq.topk_ids.shape[1])
            ids = torch.full((n, k), -1, dtype=torch.long)
            logprobs = torch.full((n, k), -math.inf)
            valid = torch.zeros(n, dtype=torch.bool)
            for t, s in alignment.one_to_one.items():
                if t < 1 or s < 1 or labels[t] == -100 or s >= len(seq.input_ids):
                    continue  # row 0 predicts nothing; only response positions are distilled
                ids[t] = vocab.map_topk(seq.topk_ids[s].long())
                logprobs[t] = seq.topk_logprobs[s].float()
                valid[t] = bool((ids[t] >= 0).any())
            if config.split_tokens:
                _split_targets(
                    alignment.pairs,
                    src_strings,
                    pivot_strings,
                    seq,
                    labels,
                    split_maps[j],
                    ids,
                    logprobs,
                    valid,
                )
            covered[j] += int(valid.sum())
            ce = float(seq.ce)
            targets.append(SourceTargets(ids, logprobs, valid, ce if math.isfinite(ce) else math.inf))
        fused = fuse(targets)
        examples.append(TrainExample(list(enc.input_ids), labels, fused.ids, fused.probs, fused.valid))
    if coverage is not None:
        coverage[:] = [c / response_tokens if response_tokens else 0.0 for c in covered]
    return examples


class _SplitMap:
    """Source vocabulary strings and the pivot's string -> id table, for split-token targets."""

    def __init__(self, src_tokenizer: Any, pivot_tokenizer: Any) -> None:
        from evomerge.fusion.align import vocab_strings

        self.src = vocab_strings(src_tokenizer)
        self.pivot: dict[str, int] = {}
        for i, text in enumerate(vocab_strings(pivot_tokenizer)):
            if text and text not in self.pivot:
                self.pivot[text] = i
        self.longest = max((len(t) for t in self.pivot), default=1)

    def first_pivot_token(self, text: str) -> int | None:
        """The pivot token that is the longest prefix of ``text`` (how a greedy tokenizer starts)."""
        for length in range(min(len(text), self.longest), 0, -1):
            token = self.pivot.get(text[:length])
            if token is not None:
                return token
        return None


def _split_targets(
    pairs: Sequence[tuple[int, int]],
    src_strings: Sequence[str],
    pivot_strings: Sequence[str],
    seq: Any,
    labels: Sequence[int],
    table: _SplitMap,
    ids: torch.Tensor,
    logprobs: torch.Tensor,
    valid: torch.Tensor,
) -> None:
    """Targets where one source token spans several pivot tokens (``" e"`` vs ``" "``, ``"e"``).

    For the ``j``-th pivot token of the group, the prefix is what the group's earlier pivot tokens spell.
    Each of the source's top-k candidates that starts with that prefix (and goes on) votes, with its
    probability, for the pivot token that begins the rest of its string (the longest pivot token that
    is a prefix of it); candidates that contradict the prefix are dropped and the rest renormalised by
    the fusion step. This is the source's distribution over the next pivot token given the text so far,
    restricted to its top-k.
    """
    by_src: dict[int, list[int]] = {}
    by_pivot: dict[int, list[int]] = {}
    for s, t in pairs:
        by_src.setdefault(s, []).append(t)
        by_pivot.setdefault(t, []).append(s)
    for s, paired in by_src.items():
        if s < 1 or s >= len(seq.input_ids) or any(by_pivot.get(t) != [s] for t in paired):
            continue  # not a clean many-to-1 span
        group = sorted(paired)
        # the alignment leaves whitespace-only tokens unpaired: take back those around the span
        while group[0] - 1 >= 0 and group[0] - 1 not in by_pivot and not pivot_strings[group[0] - 1].strip():
            if "".join(pivot_strings[t] for t in group) == src_strings[s]:
                break
            group.insert(0, group[0] - 1)
        while "".join(pivot_strings[t] for t in group) != src_strings[s]:
            nxt = group[-1] + 1
            if nxt >= len(pivot_strings) or nxt in by_pivot or pivot_strings[nxt].strip():
                break
            group.append(nxt)
        if len(group) < 2 or "".join(pivot_strings[t] for t in group) != src_strings[s]:
            continue
        cand_ids = [int(i) for i in seq.topk_ids[s]]
        cand_lp = [float(x) for x in seq.topk_logprobs[s]]
        prefix = ""
        for t in group:
            if t >= 1 and labels[t] != -100 and not bool(valid[t]):
                votes: dict[int, float] = {}
                for cid, lp in zip(cand_ids, cand_lp, strict=True):
                    text = table.src[cid] if 0 <= cid < len(table.src) else ""
                    if len(text) > len(prefix) and text.startswith(prefix) and math.isfinite(lp):
                        pivot_id = table.first_pivot_token(text[len(prefix) :])
                        if pivot_id is not None:
                            votes[pivot_id] = votes.get(pivot_id, 0.0) + math.exp(lp)
                if votes:
                    top = sorted(votes.items(), key=lambda kv: -kv[1])[: ids.shape[1]]
                    ids[t] = -1
                    logprobs[t] = -math.inf
                    for slot, (pivot_id, prob) in enumerate(top):
                        ids[t, slot] = pivot_id
                        logprobs[t, slot] = math.log(prob)
                    valid[t] = True
            prefix += pivot_strings[t]


def target_coverage(examples: Sequence[TrainExample]) -> float:
    """The share of response tokens (after the first position) that have a teacher target."""
    response = sum(sum(1 for label in e.labels[1:] if label != -100) for e in examples)
    covered = sum(
        int(sum(1 for t in range(1, len(e.labels)) if e.labels[t] != -100 and bool(e.target_valid[t])))
        for e in examples
    )
    return covered / response if response else 0.0


def run_fusion(
    pivot: str | Path,
    out_dir: str | Path,
    config: FusionConfig,
    *,
    data_dir: str | Path = ".",
    overwrite: bool = False,
    say: Say | None = None,
) -> dict[str, Path]:
    """Run the fusion stage; returns ``variant -> model directory`` (plus ``pairwise-<source>`` copies)."""
    from evomerge.fusion.align import VocabMap
    from evomerge.fusion.cache import source_pass
    from evomerge.fusion.data import load_pairs

    out = Path(out_dir)
    root = Path(data_dir)
    log = say or (lambda _msg: None)
    pairs = load_pairs(root / config.data)[: config.max_pairs]
    pairs = [
        dataclasses.replace(p, response=config.response_format.replace("{response}", p.response))
        for p in pairs
    ]
    pivot_tok = _load_tokenizer(pivot)
    sources: list[tuple[str, Any, Any, Any]] = []
    for src in config.sources:
        path = Path(pivot) if src == "pivot" else root / src
        name = "pivot" if src == "pivot" else _name(str(path))
        log(f"source pass: {name} over {len(pairs)} sequences")
        cache = source_pass(
            path,
            pairs,
            (root / config.cache_dir if config.cache_dir else out / "cache") / name,
            top_k=config.top_k,
            device=config.device,
            dtype=getattr(torch, config.dtype),
            batch_size=config.source_batch_size,
            max_len=config.max_len,
            template=config.template,
            chat=config.chat,
        )
        tokenizer = _load_tokenizer(path)
        if config.vocab_map == "stats":
            texts = [p.instruction + "\n" + p.response for p in pairs]
            vocab = VocabMap.from_corpus(tokenizer, pivot_tok, texts, fallback="min_ed")
        else:
            vocab = VocabMap.build(tokenizer, pivot_tok, config.vocab_map)
        sources.append((name, cache, tokenizer, vocab))

    results: dict[str, Path] = {}
    coverage: list[float] = []
    examples = build_examples(pivot_tok, pairs, [s[1:] for s in sources], config, coverage)
    for (name, *_), share in zip(sources, coverage, strict=True):
        log(f"source {name}: {100 * share:.0f}% of the pivot's response tokens aligned and mapped")
        if share == 0.0:
            raise ConfigError(
                f"source {name} shares no aligned token with the pivot on this data (no common strings "
                "between the two tokenizations): nothing to distil"
            )
    if "unified" in config.variants:
        log(
            f"unified distillation: {len(examples)} sequences, {config.fusion}, {config.distill.loss}, "
            f"{100 * target_coverage(examples):.0f}% of response tokens with a fused target"
        )
        results["unified"] = distill(pivot, examples, out / "unified", config.distill, overwrite=overwrite)
    if "pairwise" in config.variants:
        copies: list[Path] = []
        single = config.model_copy(update={"fusion": "min_ce"})
        for name, cache, tokenizer, vocab in sources:
            examples = build_examples(pivot_tok, pairs, [(cache, tokenizer, vocab)], single)
            log(
                f"pairwise distillation: {name}, {len(examples)} sequences, "
                f"{100 * target_coverage(examples):.0f}% of response tokens with a target"
            )
            copy = distill(pivot, examples, out / f"pairwise-{name}", config.distill, overwrite=overwrite)
            results[f"pairwise-{name}"] = copy
            copies.append(copy)
        results["pairwise"] = merge_copies(pivot, copies, out / "pairwise", config.pairwise_method, overwrite)
    return results


def merge_copies(pivot: str | Path, copies: Sequence[Path], out: Path, method: str, overwrite: bool) -> Path:
    """Weight-merge the pivot's distilled copies onto the pivot (the homogeneous merge engine)."""
    from evomerge.merging import MergeRecipe, merge_streaming

    if len(copies) == 1:  # nothing to merge: the one copy is the result
        models: list[dict[str, Any]] = [{"model": str(copies[0]), "parameters": {"weight": 1.0}}]
        recipe = MergeRecipe.model_validate(
            {
                "merge_method": "task_arithmetic",
                "base_model": str(pivot),
                "models": models,
                "dtype": "float32",
            }
        )
    else:
        params: dict[str, Any] = {"sce": {}, "linear": {"weight": 1.0}}.get(
            method, {"weight": 1.0, "density": 0.7}
        )
        recipe = MergeRecipe.model_validate(
            {
                "merge_method": method,
                "base_model": str(pivot),
                "models": [{"model": str(c), "parameters": params} for c in copies],
                "dtype": "float32",
            }
        )
    return Path(merge_streaming(recipe, out, overwrite=overwrite))


def score_models(
    models: Sequence[tuple[str, str | Path]],
    tasks: Sequence[TaskConfig],
    data_dir: str | Path,
    *,
    split: Literal["dev", "test"] = "test",
    batch_size: int = 64,
    device: str = "cpu",
    dtype: str = "float32",
) -> list[tuple[str, dict[str, float], float]]:
    """(name, per-task scores, mean) of each model directory on ``split`` (any architecture/tokenizer)."""
    from evomerge.evaluators import HFBackend, evaluate

    rows: list[tuple[str, dict[str, float], float]] = []
    for name, path in models:
        backend = HFBackend.from_pretrained(
            path, batch_size=batch_size, device=device, dtype=getattr(torch, dtype)
        )
        result = evaluate(backend, tasks, split, data_dir)  # type: ignore[arg-type]
        rows.append((name, dict(result.scores), float(result.mean)))
    return rows
