"""Heterogeneous fusion, source side: instruction-response data and the cached source pass.

Real tiny models (a random Llama and a random GPT-2) with a byte-level BPE trained here; the cached
top-k log-probs and cross-entropies are checked against a direct, unbatched forward pass.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    AutoModelForCausalLM,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)

from evomerge.errors import CheckpointError, ConfigError
from evomerge.fusion.cache import MANIFEST, PassProgress, SourceCache, shard_name, source_pass
from evomerge.fusion.data import IGNORE_INDEX, Pair, encode, load_pairs, render
from evomerge.zoo.tokenizer import train_tokenizer

TOP_K = 6
N_PAIRS = 20
SHARD = 8  # 20 pairs -> shards of 8, 8 and 4 sequences
EPS32 = torch.finfo(torch.float32).eps


def reorder_tol(model_dir: Path) -> dict[str, float]:
    """``rtol``/``atol`` for float32 values the same model computed with other tensor shapes.

    Another batch size, other padding or an unbatched forward change no maths, only the order in which
    float32 sums are added up (GEMM blocking over a different number of rows, attention over a different
    number of masked keys): the values then differ by rounding alone. A sum of K terms taken in another
    order differs by at most about K * eps relative to the terms (Higham's gamma_K), so the tolerance is
    K * eps * (1 + |value|) with K the model's widest dot product (its MLP inner width: 64 for the Llama,
    128 for the GPT-2 here). Measured on these models: at most 8 * eps * (1 + |value|).
    """
    config = json.loads((model_dir / "config.json").read_text())
    widths = [config.get("hidden_size"), config.get("intermediate_size"), config.get("n_embd")]
    if config.get("n_embd"):
        widths.append(config.get("n_inner") or 4 * config["n_embd"])  # GPT-2: n_inner None is 4 * n_embd
    k = max(int(w) for w in widths if w)
    return {"rtol": k * EPS32, "atol": k * EPS32}


def close(a: float, b: float, tol: dict[str, float]) -> bool:
    """``a`` equals ``b`` within ``tol`` (as torch.testing.assert_close: atol + rtol * |b|)."""
    return abs(a - b) <= tol["atol"] + tol["rtol"] * abs(b)


def _records() -> list[dict[str, Any]]:
    records: list[dict[str, Any]] = []
    for i in range(N_PAIRS):
        a, b = i % 7 + 1, (3 * i) % 5 + 2
        instruction = f"What is {a} plus {b}?" + (" Explain step by step." if i % 3 == 0 else "")
        response = f"{a} plus {b} is {a + b}." + (" First add the units, then check." * (i % 4))
        if i % 5 == 4:
            records.append(
                {
                    "id": f"m{i}",
                    "messages": [
                        {"role": "system", "content": "Be brief."},
                        {"role": "user", "content": instruction},
                        {"role": "assistant", "content": response},
                    ],
                }
            )
        else:
            records.append({"id": f"p{i}", "instruction": instruction, "response": response})
    return records


def _write_jsonl(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def data_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("fusion_data") / "pairs.jsonl"
    return _write_jsonl(path, [json.dumps(r) for r in _records()])


@pytest.fixture(scope="module")
def pairs(data_file: Path) -> list[Pair]:
    return load_pairs(data_file)


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    texts = [r.get("instruction", "") + "\n" + r.get("response", "") for r in _records()]
    texts += [m["content"] for r in _records() for m in r.get("messages", [])]
    return train_tokenizer(texts * 4, vocab_size=320)


def _save(model: Any, tok: PreTrainedTokenizerFast, path: Path) -> Path:
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory: pytest.TempPathFactory, tokenizer: PreTrainedTokenizerFast) -> Path:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=256,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        initializer_range=0.3,
    )
    return _save(LlamaForCausalLM(config), tokenizer, tmp_path_factory.mktemp("llama_src"))


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory: pytest.TempPathFactory, tokenizer: PreTrainedTokenizerFast) -> Path:
    torch.manual_seed(1)
    config = GPT2Config(
        vocab_size=len(tokenizer),
        n_embd=32,
        n_layer=2,
        n_head=2,
        n_positions=256,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        initializer_range=0.3,
    )
    return _save(GPT2LMHeadModel(config), tokenizer, tmp_path_factory.mktemp("gpt2_src"))


@pytest.fixture(scope="module")
def llama_cache(tmp_path_factory: pytest.TempPathFactory, llama_dir: Path, pairs: list[Pair]) -> SourceCache:
    out = tmp_path_factory.mktemp("llama_cache") / "cache"
    return source_pass(llama_dir, pairs, out, top_k=TOP_K, batch_size=8, shard_size=SHARD)


@pytest.fixture
def count_forward(monkeypatch: pytest.MonkeyPatch) -> Callable[..., list[int]]:
    """Patch a model class's forward to record the batch size of every call (and run it normally)."""

    def install(cls: type[Any], fail_on_call: int | None = None) -> list[int]:
        calls: list[int] = []
        original = cls.forward

        def forward(self: Any, *args: Any, **kwargs: Any) -> Any:
            calls.append(int(kwargs["input_ids"].shape[0]))
            if fail_on_call is not None and len(calls) == fail_on_call:
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
            return original(self, *args, **kwargs)

        monkeypatch.setattr(cls, "forward", forward)
        return calls

    return install


def _stop_after_first_shard(event: PassProgress) -> None:
    if event.shards_written >= 1:
        raise KeyboardInterrupt("stopped on purpose")


# ---------------------------------------------------------------------------------------------- data
def test_load_pairs_reads_both_formats(pairs: list[Pair], data_file: Path) -> None:
    assert len(pairs) == N_PAIRS
    first = pairs[0]
    assert first.id == "p0"
    assert first.instruction == "What is 1 plus 2? Explain step by step."
    assert first.response == "1 plus 2 is 3."
    assert first.origin == f"{data_file}:1"
    chat = pairs[4]
    assert chat.id == "m4"
    assert chat.prompt_messages == (("system", "Be brief."), ("user", "What is 5 plus 4?"))
    assert chat.instruction == "What is 5 plus 4?"
    assert chat.response.startswith("5 plus 4 is 9.")


def test_load_pairs_takes_last_assistant_message_and_default_ids(tmp_path: Path) -> None:
    msgs = [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello"},
        {"role": "user", "content": "and?"},
        {"role": "assistant", "content": "bye"},
    ]
    path = _write_jsonl(tmp_path / "d.jsonl", ["", json.dumps({"messages": msgs})])
    (pair,) = load_pairs(path)
    assert pair.id == "line2"
    assert pair.response == "bye"
    assert pair.prompt_messages == (("user", "hi"), ("assistant", "hello"), ("user", "and?"))


@pytest.mark.parametrize(
    ("bad_line", "needle"),
    [
        (json.dumps({"instruction": "q"}), "data without responses"),
        (json.dumps({"instruction": "q", "response": "  "}), "data without responses"),
        (json.dumps({"messages": [{"role": "user", "content": "q"}]}), "data without responses"),
        ('{"instruction": "q", "response": ', "invalid JSON"),
        ("[1, 2]", "expected a JSON object"),
        (json.dumps({"instruction": "q", "response": 3}), "'response' must be a string"),
        (json.dumps({"prompt": "q"}), "expected 'instruction' and 'response' or 'messages'"),
        (json.dumps({"id": "a", "instruction": "q", "response": "r"}), "duplicate id 'a'"),
    ],
)
def test_data_errors_name_file_and_line(tmp_path: Path, bad_line: str, needle: str) -> None:
    good = json.dumps({"id": "a", "instruction": "What?", "response": "This."})
    path = _write_jsonl(tmp_path / "bad.jsonl", [good, "", bad_line])
    with pytest.raises(ConfigError) as info:
        load_pairs(path)
    message = str(info.value)
    assert message.startswith(f"{path}:3: ")
    assert needle in message
    assert "\n" not in message


def test_empty_and_missing_data_files(tmp_path: Path) -> None:
    empty = _write_jsonl(tmp_path / "empty.jsonl", ["", "  "])
    with pytest.raises(ConfigError, match=r"empty\.jsonl:1: empty data file"):
        load_pairs(empty)
    with pytest.raises(ConfigError, match="data file does not exist"):
        load_pairs(tmp_path / "nope.jsonl")


def _labelled_chars(enc: Any, text: str) -> tuple[str, set[int]]:
    chars: set[int] = set()
    for label, (s, e) in zip(enc.labels, enc.offsets, strict=True):
        if label != IGNORE_INDEX:
            chars.update(range(s, e))
    return "".join(text[i] for i in sorted(chars)), chars


def test_labels_mask_exactly_the_response(pairs: list[Pair], tokenizer: PreTrainedTokenizerFast) -> None:
    for pair in pairs:
        rendered = render(pair, tokenizer, template=None, chat=False)
        assert rendered.text == pair.instruction + "\n" + pair.response
        assert rendered.response == pair.response
        enc = encode(rendered, tokenizer, max_len=512)
        assert enc.input_ids[0] == tokenizer.bos_token_id  # the tokenizer's BOS handling
        assert enc.labels[0] == IGNORE_INDEX
        text, chars = _labelled_chars(enc, rendered.text)
        assert text == pair.response
        assert chars == set(range(rendered.response_start, rendered.response_end))
        assert all(lab in (IGNORE_INDEX, tid) for lab, tid in zip(enc.labels, enc.input_ids, strict=True))
        assert enc.tokens == tokenizer.convert_ids_to_tokens(enc.input_ids)
        assert not enc.truncated


def test_custom_template_and_truncation(pairs: list[Pair], tokenizer: PreTrainedTokenizerFast) -> None:
    pair = pairs[3]
    rendered = render(pair, tokenizer, template="### Q: {instruction} {not a field}\n### A: ", chat=False)
    assert rendered.prompt == f"### Q: {pair.instruction} {{not a field}}\n### A: "
    full = encode(rendered, tokenizer, max_len=512)
    cut = encode(rendered, tokenizer, max_len=len(full) - 3)
    assert cut.truncated and len(cut) == len(full) - 3
    assert cut.input_ids == full.input_ids[:-3] and cut.labels == full.labels[:-3]
    with pytest.raises(ConfigError, match=r"no \{instruction\} placeholder"):
        render(pair, tokenizer, template="Q:\n", chat=False)


def _metaspace_tokenizer(texts: list[str]) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    trainer = trainers.BpeTrainer(
        vocab_size=200, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False
    )
    tok.train_from_iterator(texts, trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", tok.token_to_id("<s>"))]
    )
    return PreTrainedTokenizerFast(  # type: ignore[no-untyped-call]
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )


def test_labels_with_a_metaspace_tokenizer(pairs: list[Pair]) -> None:
    tok = _metaspace_tokenizer([p.instruction + " " + p.response for p in pairs] * 3)
    for pair in pairs:
        rendered = render(pair, tok, template="{instruction} ", chat=False)
        enc = encode(rendered, tok, max_len=512)
        assert enc.tokens[0] == "<s>" and any(t.startswith("▁") for t in enc.tokens)
        start, end = rendered.response_start, rendered.response_end
        _, chars = _labelled_chars(enc, rendered.text)
        # Every response character is labelled; a label reaches outside only through a token that
        # straddles the boundary (here "▁" + first word, whose space belongs to the prompt).
        assert set(range(start, end)) <= chars
        for label, (s, e) in zip(enc.labels, enc.offsets, strict=True):
            overlaps = s < end and e > start
            assert (label != IGNORE_INDEX) == overlaps
        assert chars - set(range(start, end)) <= {start - 1}


def test_chat_rendering(pairs: list[Pair], tokenizer: PreTrainedTokenizerFast) -> None:
    with pytest.raises(ConfigError, match="has no chat template"):
        render(pairs[0], tokenizer, template=None, chat=True)
    chat_tok = PreTrainedTokenizerFast(  # type: ignore[no-untyped-call]
        tokenizer_object=tokenizer.backend_tokenizer, bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )
    chat_tok.chat_template = (
        "{{ bos_token }}{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}[assistant] {% endif %}"
    )
    rendered = render(pairs[4], chat_tok, template=None, chat=True)
    assert rendered.prompt == "<s>[system] Be brief.\n[user] What is 5 plus 4?\n[assistant] "
    enc = encode(rendered, chat_tok, max_len=512)
    assert enc.input_ids.count(tokenizer.bos_token_id) == 1  # the template's BOS is not doubled
    assert _labelled_chars(enc, rendered.text)[0] == pairs[4].response


# ---------------------------------------------------------------------------------------------- source pass
def _direct(model: Any, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return torch.log_softmax(model(input_ids=ids[None]).logits[0].float(), dim=-1)


def test_source_pass_matches_a_direct_forward(
    llama_cache: SourceCache, llama_dir: Path, pairs: list[Pair], tokenizer: PreTrainedTokenizerFast
) -> None:
    model: Any = AutoModelForCausalLM.from_pretrained(llama_dir, dtype=torch.float32)
    model.eval()
    tol = reorder_tol(llama_dir)  # batched and padded here, one unpadded sequence there
    cache = llama_cache
    assert len(cache) == N_PAIRS and cache.ids == [p.id for p in pairs] and cache.top_k == TOP_K
    ce_all = cache.ce
    assert ce_all.shape == (N_PAIRS,) and ce_all.dtype == torch.float32
    for i, pair in enumerate(pairs):
        seq = cache[i]
        enc = encode(render(pair, tokenizer, template=None, chat=False), tokenizer, 512)
        assert seq.id == pair.id
        assert seq.input_ids.tolist() == enc.input_ids and seq.labels.tolist() == enc.labels
        assert seq.tokens == enc.tokens
        assert [tuple(o) for o in seq.char_offsets.tolist()] == enc.offsets
        n = len(enc)
        assert seq.topk_ids.shape == (n, TOP_K) and seq.topk_logprobs.shape == (n, TOP_K)
        # row 0 predicts nothing
        assert (seq.topk_ids[0] == -1).all() and torch.isneginf(seq.topk_logprobs[0]).all()
        logp = _direct(model, seq.input_ids)  # [n, V], row j predicts token j + 1
        ref_lp, ref_ids = torch.topk(logp[:-1], TOP_K, dim=-1)
        assert torch.equal(seq.topk_ids[1:], ref_ids)
        torch.testing.assert_close(seq.topk_logprobs[1:], ref_lp, **tol)
        # manual CE on the response tokens
        gold = [-float(logp[t - 1, enc.input_ids[t]]) for t in range(1, n) if enc.labels[t] != IGNORE_INDEX]
        assert len(gold) > 0
        assert close(seq.ce, sum(gold) / len(gold), tol)
        assert float(ce_all[i]) == seq.ce  # the same stored float32
    assert cache[-1].id == pairs[-1].id
    with pytest.raises(IndexError):
        cache[N_PAIRS]


def test_manifest_and_shards_on_disk(llama_cache: SourceCache, llama_dir: Path, data_file: Path) -> None:
    root = llama_cache.path
    manifest = json.loads((root / MANIFEST).read_text())
    assert manifest["source"] == str(llama_dir.resolve())
    assert manifest["top_k"] == TOP_K and manifest["tokenizer_vocab_size"] > 0
    assert manifest["data_files"] == [str(data_file)]
    assert manifest["complete_shards"] == [shard_name(0), shard_name(1), shard_name(2)]
    assert [(s["start"], s["stop"]) for s in manifest["shards"]] == [(0, 8), (8, 16), (16, 20)]
    assert sorted(p.name for p in root.iterdir()) == sorted([MANIFEST, *manifest["complete_shards"]])
    reopened = SourceCache.open(root)
    assert torch.equal(reopened[13].topk_logprobs, llama_cache[13].topk_logprobs)


def test_batching_and_padding_do_not_change_values(tmp_path: Path, gpt2_dir: Path, pairs: list[Pair]) -> None:
    one = source_pass(gpt2_dir, pairs, tmp_path / "b1", top_k=TOP_K, batch_size=1, shard_size=SHARD)
    eight = source_pass(gpt2_dir, pairs, tmp_path / "b8", top_k=TOP_K, batch_size=8, shard_size=SHARD)
    half = source_pass(
        gpt2_dir, pairs, tmp_path / "f16", top_k=TOP_K, batch_size=5, logprob_dtype=torch.float16
    )
    assert json.loads((tmp_path / "f16" / MANIFEST).read_text())["logprob_dtype"] == "float16"
    tol = reorder_tol(gpt2_dir)
    # float16 storage adds one rounding: at most half of float16's eps, relative
    half_tol = {"rtol": torch.finfo(torch.float16).eps / 2 + tol["rtol"], "atol": tol["atol"]}
    for i in range(N_PAIRS):
        a, b, h = one[i], eight[i], half[i]
        assert torch.equal(a.input_ids, b.input_ids) and torch.equal(a.topk_ids, b.topk_ids)
        torch.testing.assert_close(a.topk_logprobs, b.topk_logprobs, **tol)
        assert close(a.ce, b.ce, tol)
        assert torch.equal(a.topk_ids, h.topk_ids) and h.topk_logprobs.dtype == torch.float32
        torch.testing.assert_close(h.topk_logprobs, a.topk_logprobs, **half_tol)
        assert close(h.ce, a.ce, tol)  # CE is stored in float32 either way


def test_resume_after_interruption_recomputes_nothing_finished(
    tmp_path: Path,
    llama_dir: Path,
    pairs: list[Pair],
    count_forward: Callable[..., list[int]],
) -> None:
    # The uninterrupted pass to compare with runs the same batches (same batch_size and shards, so the
    # same sequences padded to the same width): its values are bit-identical, not merely close. Another
    # batch size would pad sequences differently and change float32 rounding (see reorder_tol).
    reference = source_pass(
        llama_dir, pairs, tmp_path / "reference", top_k=TOP_K, batch_size=4, shard_size=SHARD
    )
    out = tmp_path / "cache"
    calls = count_forward(LlamaForCausalLM)
    with pytest.raises(KeyboardInterrupt):
        source_pass(
            llama_dir,
            pairs,
            out,
            top_k=TOP_K,
            batch_size=4,
            shard_size=SHARD,
            progress=_stop_after_first_shard,
        )
    assert sum(calls) == SHARD  # two batches of 4: the first shard only
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["complete_shards"] == [shard_name(0)]
    assert sorted(p.name for p in out.iterdir()) == [MANIFEST, shard_name(0)]  # no temporary leftovers
    with pytest.raises(CheckpointError, match=r"incomplete source cache \(1 of 3 shards done\)"):
        SourceCache.open(out)
    first = (out / shard_name(0)).stat()

    calls.clear()
    events: list[PassProgress] = []
    cache = source_pass(
        llama_dir, pairs, out, top_k=TOP_K, batch_size=4, shard_size=SHARD, progress=events.append
    )
    assert sum(calls) == N_PAIRS - SHARD  # only the unfinished sequences
    assert events[-1] == PassProgress(computed=12, done=20, total=20, shards_written=3, shards_total=3)
    again = (out / shard_name(0)).stat()
    assert (again.st_ino, again.st_mtime_ns) == (first.st_ino, first.st_mtime_ns)  # kept, not rewritten
    for i in range(N_PAIRS):  # the same values as one uninterrupted pass, bit for bit
        assert torch.equal(cache[i].topk_ids, reference[i].topk_ids)
        assert torch.equal(cache[i].topk_logprobs, reference[i].topk_logprobs)
        assert cache[i].ce == reference[i].ce or (math.isnan(cache[i].ce) and math.isnan(reference[i].ce))

    calls.clear()
    source_pass(llama_dir, pairs, out, top_k=TOP_K, batch_size=4, shard_size=SHARD)
    assert calls == []  # a complete cache is reopened without running the model


def test_out_of_memory_is_one_clear_line_and_resume_redoes_only_unfinished(
    tmp_path: Path, llama_dir: Path, pairs: list[Pair], count_forward: Callable[..., list[int]]
) -> None:
    out = tmp_path / "cache"
    calls = count_forward(LlamaForCausalLM, fail_on_call=3)  # shard 0 is batches 1-2; batch 3 fails
    with pytest.raises(ConfigError) as info:
        source_pass(llama_dir, pairs, out, top_k=TOP_K, batch_size=4, shard_size=SHARD)
    message = str(info.value)
    assert "out of memory" in message and "smaller batch_size" in message and "\n" not in message
    assert json.loads((out / MANIFEST).read_text())["complete_shards"] == [shard_name(0)]
    calls = count_forward(LlamaForCausalLM)
    cache = source_pass(llama_dir, pairs, out, top_k=TOP_K, batch_size=4, shard_size=SHARD)
    assert sum(calls) == N_PAIRS - SHARD and len(cache) == N_PAIRS


def test_mismatched_manifest_is_refused(
    tmp_path: Path, llama_dir: Path, pairs: list[Pair], llama_cache: SourceCache
) -> None:
    root = llama_cache.path
    with pytest.raises(ConfigError, match=r"other settings \(top_k differ\).*overwrite=True"):
        source_pass(llama_dir, pairs, root, top_k=3, shard_size=SHARD)
    with pytest.raises(ConfigError, match=r"data_hash, token_hash, pair_ids differ"):
        source_pass(llama_dir, pairs[:-1], root, top_k=TOP_K, shard_size=SHARD)
    fresh = tmp_path / "copy"
    source_pass(llama_dir, pairs, fresh, top_k=TOP_K, shard_size=SHARD)
    replaced = source_pass(llama_dir, pairs[:5], fresh, top_k=3, shard_size=SHARD, overwrite=True)
    assert len(replaced) == 5 and replaced.top_k == 3 and replaced[2].topk_ids.shape[1] == 3
    assert sorted(p.name for p in fresh.iterdir()) == [MANIFEST, shard_name(0)]
    other = tmp_path / "not_a_cache"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="is not a source cache"):
        source_pass(llama_dir, pairs, other, top_k=TOP_K)


def test_empty_or_corrupt_cache_files(tmp_path: Path, llama_dir: Path, pairs: list[Pair]) -> None:
    out = tmp_path / "cache"
    source_pass(llama_dir, pairs[:10], out, top_k=TOP_K, shard_size=4)
    shard = out / shard_name(1)
    good = shard.read_bytes()

    shard.write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"shard-00001\.safetensors: empty cache file$"):
        SourceCache.open(out)
    shard.write_bytes(good[: len(good) // 2])
    with pytest.raises(CheckpointError, match="corrupt cache file"):
        SourceCache.open(out)
    shard.write_bytes(good)
    manifest = (out / MANIFEST).read_text()
    (out / MANIFEST).write_text("")
    with pytest.raises(CheckpointError, match=r"manifest\.json: empty cache file"):
        SourceCache.open(out)
    (out / MANIFEST).write_text(manifest[:40])
    with pytest.raises(CheckpointError, match="corrupt cache file"):
        SourceCache.open(out)
    (out / MANIFEST).write_text(manifest)
    assert len(SourceCache.open(out)) == 10
    with pytest.raises(CheckpointError, match="source cache does not exist"):
        SourceCache.open(tmp_path / "missing")

    # a shard damaged on disk is recomputed on the next pass (nothing else is)
    shard.write_bytes(b"")
    calls: list[int] = []
    cache = source_pass(
        llama_dir, pairs[:10], out, top_k=TOP_K, shard_size=4, progress=lambda e: calls.append(e.computed)
    )
    assert calls[-1] == 4 and len(cache) == 10


@pytest.mark.parametrize("broken", ["raises", "empty"])
def test_tokenizer_that_cannot_decode_is_refused(
    tmp_path: Path, llama_dir: Path, pairs: list[Pair], monkeypatch: pytest.MonkeyPatch, broken: str
) -> None:
    def decode(self: Any, *args: Any, **kwargs: Any) -> str:
        if broken == "raises":
            raise TypeError("no decoder")
        return ""

    monkeypatch.setattr(PreTrainedTokenizerFast, "decode", decode)
    with pytest.raises(
        ConfigError, match=r"source tokenizer (cannot decode|decodes the ids of pair 'p0' to empty)"
    ):
        source_pass(llama_dir, pairs, tmp_path / "c", top_k=TOP_K)
    assert not (tmp_path / "c").exists()


def test_chat_without_template_and_bad_sources(tmp_path: Path, llama_dir: Path, pairs: list[Pair]) -> None:
    with pytest.raises(ConfigError, match="has no chat template"):
        source_pass(llama_dir, pairs, tmp_path / "c", chat=True)
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text("{}")
    (pickled / "pytorch_model.bin").write_bytes(b"\x80\x04")
    with pytest.raises(CheckpointError, match="only pickle weights"):
        source_pass(pickled, pairs, tmp_path / "c")
    with pytest.raises(ConfigError, match="top_k must be"):
        source_pass(llama_dir, pairs, tmp_path / "c", top_k=0)


def _iter_ids(cache: SourceCache) -> Iterator[str]:
    for seq in cache:
        yield seq.id


def test_cache_lookup_by_id(llama_cache: SourceCache, pairs: list[Pair]) -> None:
    assert list(_iter_ids(llama_cache)) == [p.id for p in pairs]
    assert llama_cache.index("m9") == 9
    assert math.isfinite(llama_cache[llama_cache.index("m9")].ce)
