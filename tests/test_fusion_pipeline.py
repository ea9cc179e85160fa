"""The fusion pipeline end to end on the micro zoo: a GPT-2 source with another tokenizer and a same-tokenizer
source distilled into the zoo base (unified and pairwise), the trainer's resume, and bad input."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from evomerge.errors import ConfigError
from evomerge.fusion.align import VocabMap
from evomerge.fusion.cache import source_pass
from evomerge.fusion.data import load_pairs
from evomerge.fusion.distill import DistillConfig, distill
from evomerge.fusion.losses import distill_loss
from evomerge.fusion.pipeline import (
    FusionConfig,
    build_examples,
    merge_copies,
    run_fusion,
    target_coverage,
)
from evomerge.zoo import Zoo
from evomerge.zoo.hetero import HeteroExpert, build_hetero

TEMPLATE = "Q: {instruction}\nA:"


@pytest.fixture(scope="module")
def hetero(micro_zoo: Zoo, zoo_cache: Path) -> HeteroExpert:
    return build_hetero(micro_zoo, zoo_cache)


@pytest.fixture(scope="module")
def data(hetero: HeteroExpert, tmp_path_factory: pytest.TempPathFactory) -> Path:
    rows = [json.loads(line) for line in Path(hetero.fusion_files["train"]).read_text().splitlines()]
    path = tmp_path_factory.mktemp("fusion-data") / "train.jsonl"
    path.write_text("".join(json.dumps({**r, "response": f" {r['response']}\n"}) + "\n" for r in rows[:96]))
    return path


def _config(sources: list[str], data: Path, **extra: Any) -> FusionConfig:
    return FusionConfig.model_validate(
        {
            "sources": sources,
            "data": str(data),
            "template": TEMPLATE,
            "distill": {"epochs": 1, "batch_size": 16, "lr": 3e-3, "checkpoint_every": 2},
            **extra,
        }
    )


def _examples(
    micro_zoo: Zoo, sources: list[str], data: Path, tmp: Path, **extra: Any
) -> tuple[Any, list[float]]:
    cfg = _config(sources, data, **extra)
    pairs = load_pairs(data)
    pivot_tok = AutoTokenizer.from_pretrained(micro_zoo.base)
    prepared = []
    for i, src in enumerate(sources):
        cache = source_pass(src, pairs, tmp / f"cache{i}", template=TEMPLATE, max_len=cfg.max_len)
        tok = AutoTokenizer.from_pretrained(src)
        prepared.append((cache, tok, VocabMap.build(tok, pivot_tok, "min_ed")))
    coverage: list[float] = []
    return build_examples(pivot_tok, pairs, prepared, cfg, coverage), coverage


def test_same_tokenizer_source_targets_are_its_own_distributions(
    micro_zoo: Zoo, data: Path, tmp_path: Path
) -> None:
    source = micro_zoo.experts["arith"]
    examples, coverage = _examples(micro_zoo, [source], data, tmp_path)
    assert coverage == [pytest.approx(1.0)]  # identical tokenizations: every response token aligned
    model = AutoModelForCausalLM.from_pretrained(source)
    ex = examples[0]
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([ex.input_ids])).logits[0].float(), -1)
    for t in range(1, len(ex.input_ids)):
        if ex.labels[t] == -100:
            assert not bool(ex.target_valid[t])
            continue
        assert bool(ex.target_valid[t])
        top = torch.topk(logp[t - 1], ex.target_ids.shape[1])  # row t predicts token t from logits t-1
        assert ex.target_ids[t].tolist() == top.indices.tolist()
        expected = torch.softmax(top.values, -1)  # the top-k renormalised
        # the cache ran these rows in a right-padded float32 batch, this check one sequence alone: the same
        # sums in another order through every layer, so float32 roundings, not bits, may differ
        tol = 1000 * torch.finfo(torch.float32).eps
        torch.testing.assert_close(ex.target_probs[t].float(), expected, atol=tol, rtol=tol)


def test_other_tokenizer_source_is_aligned_and_distillation_moves_the_pivot_towards_it(
    micro_zoo: Zoo, hetero: HeteroExpert, data: Path, tmp_path: Path
) -> None:
    examples, coverage = _examples(micro_zoo, [hetero.model, micro_zoo.experts["arith"]], data, tmp_path)
    # different tokenizers: 1-to-1 tokens of equal strings (digits, newlines) plus split tokens (the
    # SentencePiece-style " e" spans the byte-level " ", "e") cover the responses here
    assert coverage[0] > 0.9
    assert coverage[1] == pytest.approx(1.0)
    assert target_coverage(examples) == pytest.approx(1.0)  # fused: the union of the sources

    def teacher_loss(model_dir: str | Path) -> float:
        model = AutoModelForCausalLM.from_pretrained(model_dir)
        total = 0.0
        with torch.no_grad():
            for ex in examples[:32]:
                logits = model(torch.tensor([ex.input_ids])).logits
                _, parts = distill_loss(
                    logits,
                    torch.tensor([ex.labels]),
                    ex.target_ids[None],
                    ex.target_probs[None],
                    ex.target_valid[None],
                    lam=0.0,
                    kind="kl",
                )
                total += float(parts["distill"])
        return total / 32

    out = distill(
        micro_zoo.base,
        examples,
        tmp_path / "student",
        DistillConfig(epochs=4, lr=5e-3, batch_size=16, lam=0.0),
    )
    assert teacher_loss(out) < 0.8 * teacher_loss(micro_zoo.base)
    reloaded = AutoModelForCausalLM.from_pretrained(out)  # a normal HF directory, tokenizer included
    assert reloaded.config.model_type == "llama" and AutoTokenizer.from_pretrained(out) is not None
    assert not (tmp_path / "student.checkpoint").exists()


def test_trainer_resumes_from_its_checkpoint_to_the_same_weights(
    micro_zoo: Zoo, data: Path, tmp_path: Path
) -> None:
    examples, _ = _examples(micro_zoo, [micro_zoo.experts["arith"]], data, tmp_path)
    cfg = DistillConfig(epochs=1, lr=3e-3, batch_size=16, checkpoint_every=2)
    straight = distill(micro_zoo.base, examples, tmp_path / "straight", cfg)

    class Crash(Exception):
        pass

    def crash_at_3(step: int, total: int, loss: float) -> None:
        if step == 3:
            raise Crash

    with pytest.raises(Crash):
        distill(micro_zoo.base, examples, tmp_path / "resumed", cfg, progress=crash_at_3)
    assert (tmp_path / "resumed.checkpoint" / "state.pt").exists() and not (tmp_path / "resumed").exists()
    steps: list[int] = []
    resumed = distill(
        micro_zoo.base, examples, tmp_path / "resumed", cfg, progress=lambda s, t, loss: steps.append(s)
    )
    assert steps[0] == 3  # steps 1-2 came from the checkpoint, not recomputed
    a, b = load_file(str(straight / "model.safetensors")), load_file(str(resumed / "model.safetensors"))
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=0)


def test_lora_distillation_writes_merged_weights(micro_zoo: Zoo, data: Path, tmp_path: Path) -> None:
    pytest.importorskip("peft")
    examples, _ = _examples(micro_zoo, [micro_zoo.experts["arith"]], data, tmp_path)
    cfg = DistillConfig(epochs=1, lr=1e-2, batch_size=16, lora={"r": 4, "alpha": 8})
    out = distill(micro_zoo.base, examples, tmp_path / "lora", cfg)
    merged = load_file(str(out / "model.safetensors"))
    base = load_file(str(Path(micro_zoo.base) / "model.safetensors"))
    assert set(merged) == set(base)  # plain weights, no adapter tensors
    changed = [n for n in base if not torch.equal(base[n], merged[n])]
    assert changed and all("proj" in n for n in changed)  # only the adapted linear layers moved


def test_unified_and_pairwise_variants(
    micro_zoo: Zoo, hetero: HeteroExpert, data: Path, tmp_path: Path
) -> None:
    cfg = _config(
        [hetero.model, micro_zoo.experts["arith"]], data, variants=["unified", "pairwise"], fusion="avg_ce"
    )
    said: list[str] = []
    out = run_fusion(micro_zoo.base, tmp_path / "fusion", cfg, say=said.append)
    assert set(out) == {"unified", "pairwise", f"pairwise-{Path(hetero.model).name}", "pairwise-arith"}
    base = load_file(str(Path(micro_zoo.base) / "model.safetensors"))
    for path in out.values():
        model = AutoModelForCausalLM.from_pretrained(path)
        assert model.config.model_type == "llama"
    merged = {
        n: t for f in sorted(out["pairwise"].glob("*.safetensors")) for n, t in load_file(str(f)).items()
    }
    assert set(merged) == set(base)
    assert any("aligned and mapped" in line for line in said)
    # the source passes are cached: a second run reuses them (no model load for the sources)
    again = run_fusion(
        micro_zoo.base, tmp_path / "fusion", cfg.model_copy(update={"variants": ("unified",)}), overwrite=True
    )
    assert again["unified"].exists()


def test_runs_sharing_a_cache_dir_reuse_the_source_passes(
    micro_zoo: Zoo, hetero: HeteroExpert, data: Path, tmp_path: Path
) -> None:
    shared = tmp_path / "passes"
    cfg = _config([hetero.model], data, cache_dir=str(shared))
    run_fusion(micro_zoo.base, tmp_path / "first", cfg)
    shards = sorted(shared.rglob("*.safetensors"))
    assert shards and not (tmp_path / "first" / "cache").exists()  # the passes went to cache_dir
    stamps = [f.stat().st_mtime_ns for f in shards]
    other = cfg.model_copy(
        update={"fusion": "entropy", "distill": cfg.distill.model_copy(update={"lr": 1e-3})}
    )
    run_fusion(micro_zoo.base, tmp_path / "second", other)
    assert sorted(shared.rglob("*.safetensors")) == shards  # nothing recomputed or rewritten
    assert [f.stat().st_mtime_ns for f in shards] == stamps


def test_linear_pairwise_merge_is_the_average_of_the_copies(micro_zoo: Zoo, tmp_path: Path) -> None:
    copies = [Path(micro_zoo.experts["arith"]), Path(micro_zoo.experts["code"])]
    merged = merge_copies(micro_zoo.base, copies, tmp_path / "avg", "linear", overwrite=False)
    a, b = (load_file(str(c / "model.safetensors")) for c in copies)
    out = {n: t for f in sorted(merged.glob("*.safetensors")) for n, t in load_file(str(f)).items()}
    assert set(out) == set(a)
    for name in a:
        eps = torch.finfo(torch.float32).eps  # a weighted sum vs (a + b) / 2: a rounding or two apart
        torch.testing.assert_close(out[name], (a[name] + b[name]) / 2, rtol=8 * eps, atol=8 * eps)


def test_distillation_threads_apply_during_training_only(micro_zoo: Zoo, data: Path, tmp_path: Path) -> None:
    examples, _ = _examples(micro_zoo, [micro_zoo.experts["arith"]], data, tmp_path)
    before = torch.get_num_threads()
    seen: list[int] = []
    cfg = DistillConfig(epochs=1, batch_size=32, threads=1)
    distill(
        micro_zoo.base,
        examples,
        tmp_path / "one",
        cfg,
        progress=lambda *_: seen.append(torch.get_num_threads()),
    )
    assert seen and set(seen) == {1} and torch.get_num_threads() == before


def test_bad_fusion_input_is_one_line(micro_zoo: Zoo, tmp_path: Path) -> None:
    no_response = tmp_path / "bad.jsonl"
    no_response.write_text(json.dumps({"id": "a", "instruction": "Sort: b a"}) + "\n")
    cmd = [
        sys.executable,
        "-m",
        "evomerge.cli",
        "fuse",
        "--pivot",
        micro_zoo.base,
        "--source",
        micro_zoo.experts["arith"],
        "--data",
        str(no_response),
        "-o",
        str(tmp_path / "out"),
    ]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    lines = [line for line in run.stderr.splitlines() if line.strip()]
    assert run.returncode == 2 and len(lines) == 1 and "without responses" in lines[0], run.stderr[-500:]
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="fusion"):
        FusionConfig.model_validate({"sources": ["x"], "data": "y", "fusion": "max"})
    with pytest.raises(ValidationError, match="response_format"):
        _config([micro_zoo.experts["arith"]], no_response, response_format="x")
    with pytest.raises(ConfigError, match="unknown fusion"):
        from evomerge.fusion.fuse import get_fusion

        get_fusion("max")


def test_split_tokens_transfer_the_teacher_where_one_source_token_spans_several(
    micro_zoo: Zoo, hetero: HeteroExpert, data: Path, tmp_path: Path
) -> None:
    split, cov_split = _examples(micro_zoo, [hetero.model], data, tmp_path / "a", split_tokens=True)
    plain, cov_plain = _examples(micro_zoo, [hetero.model], data, tmp_path / "b", split_tokens=False)
    assert cov_split[0] > cov_plain[0] + 0.2  # " e" (source) vs " ", "e" (pivot) now get targets
    pairs = load_pairs(data)
    agree = total = 0
    for pair, e_s, e_p in zip(pairs, split, plain, strict=True):
        if not pair.id.startswith("sort"):
            continue
        for t in range(1, len(e_s.input_ids)):
            if bool(e_s.target_valid[t]) and not bool(e_p.target_valid[t]):
                total += 1  # a split-token target; the teacher sorts perfectly, so its best is the gold
                agree += int(int(e_s.target_ids[t, 0]) == e_s.input_ids[t])
                assert float(e_s.target_probs[t].sum()) == pytest.approx(1.0, abs=1e-5)
    assert total > 50 and agree / total > 0.95, (agree, total)
