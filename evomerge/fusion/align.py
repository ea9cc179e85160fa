"""Token alignment between two tokenizations of the same text, and source -> pivot vocabulary maps.

Heterogeneous fusion distils a *source* model that uses another tokenizer into the *pivot* model. This
module provides the three pieces that needs:

1. :func:`token_strings` / :func:`vocab_strings`: the surface text of each token, with the tokenizer's
   own space markers decoded (SentencePiece ``▁``, byte-level ``Ġ``/``Ċ``/other byte characters,
   WordPiece ``##``, ``<0xNN>`` byte-fallback pieces).
2. :func:`align`: a DTW alignment of two token-string sequences whose pairing cost is the Levenshtein
   distance of the whitespace-free strings (and :func:`align_spans` / ``align(method="auto")``, an
   exact O(n + m) character-span alignment when both sequences spell the same characters).
3. :class:`VocabMap`: source id -> pivot id, by exact string (``"exact"``), by minimum edit distance
   (``"min_ed"``) or by co-alignment statistics over a corpus (``"stats"``).

Normalisation rules (one place, used everywhere):

- *Surface string* (what :func:`token_strings` returns): the token's text exactly as the tokenizer's
  own decoder writes it in the middle of a text, so a word-initial token keeps its leading space
  (``"Ġthe"`` and ``"▁the"`` both become ``" the"``, WordPiece ``"the"`` becomes ``" the"`` and
  ``"##s"`` becomes ``"s"``); only the first token of a text is decoded as the decoder does at the start
  (a Metaspace ``"▁The"`` there is ``"The"``). Special tokens (BOS/EOS/PAD/UNK and every added token
  flagged special) are ``""``: they align with nothing. A character whose UTF-8 bytes are split over
  several tokens belongs to the token holding its last byte (the others get ``""`` for it), so the
  strings of a lossless tokenizer concatenate to the exact text. (WordPiece drops the original
  whitespace, so its strings rebuild the text only modulo whitespace.)
- *Alignment key* (:func:`text_key`): the surface string with **all** whitespace characters removed
  (``str.split()`` semantics), so ``" the"`` and ``"the"`` cost 0 and whitespace-only tokens have the
  empty key.
- Edit distance: plain Levenshtein (unit insert/delete/substitute) over Unicode code points.
"""

from __future__ import annotations

import codecs
import json
import re
import weakref
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
import torch
from transformers.convert_slow_tokenizer import bytes_to_unicode

Method = Literal["exact", "min_ed", "stats"]
AlignMethod = Literal["dtw", "spans", "auto"]
Fallback = Literal["exact", "min_ed"] | None

IntArray = npt.NDArray[np.int64]

# A plain letter decoded in front of a token, so that decoders which strip the space of the *first* token
# of a text (Metaspace, Llama's Strip) keep a word-initial token's leading space; its own decoding is
# removed again afterwards.
_ANCHOR = "a"
_BYTE_PIECE = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")
# Max cells of one work array in the vectorised Levenshtein (int8/int16 cells: a few MB per array).
_ED_CHUNK = 1 << 21


# --------------------------------------------------------------------------------------------------------
# Surface strings
# --------------------------------------------------------------------------------------------------------


def text_key(s: str) -> str:
    """The alignment key of a surface string: ``s`` with every whitespace character removed."""
    return "".join(s.split())


def _decoder_types(decoder: Any) -> set[str]:
    """The ``type`` names of a ``tokenizers`` decoder and, for a ``Sequence``, of all its children."""
    try:
        spec = json.loads(decoder.__getstate__())
    except Exception:  # pragma: no cover - decoders always pickle to JSON in tokenizers >= 0.13
        return {type(decoder).__name__}
    found: set[str] = set()
    stack: list[Any] = [spec]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            if isinstance(node.get("type"), str):
                found.add(node["type"])
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)
    return found


class _Codec:
    """Per-tokenizer helper that turns token ids into the UTF-8 bytes of their surface text.

    Three routes, chosen from the tokenizer's own decoder:

    - byte-level (a ``ByteLevel`` decoder, or a slow tokenizer with ``byte_decoder``): every character of
      the token is mapped to its byte with the GPT-2 byte<->unicode table that the tokenizer itself uses
      (``tokenizer.byte_decoder`` when present, else ``transformers``' ``bytes_to_unicode``); a character
      outside the table contributes its own UTF-8 bytes;
    - byte fallback (a ``ByteFallback`` decoder): a ``<0xNN>`` piece is the single byte ``NN``;
    - otherwise the tokenizer's decoder is run on ``[_ANCHOR, token]`` and the anchor's decoding is cut off
      (``[token]`` alone for the first token of a text), so ``▁`` -> space, ``##`` -> glued, etc.
    """

    def __init__(self, tokenizer: Any) -> None:
        special = {int(i) for i in getattr(tokenizer, "all_special_ids", [])}
        for idx, added in getattr(tokenizer, "added_tokens_decoder", {}).items():
            if getattr(added, "special", False):
                special.add(int(idx))
        self.special_ids = frozenset(special)
        # A weak reference: the codec is cached in a WeakKeyDictionary keyed by this tokenizer.
        try:
            ref = weakref.ref(tokenizer)
            self._tokenizer: Any = lambda: ref()
        except TypeError:
            self._tokenizer = lambda: tokenizer
        backend = getattr(tokenizer, "backend_tokenizer", None)
        self.decoder = backend.decoder if backend is not None else None
        kinds = _decoder_types(self.decoder) if self.decoder is not None else set()
        self.byte_level = "ByteLevel" in kinds or (backend is None and hasattr(tokenizer, "byte_decoder"))
        self.byte_fallback = "ByteFallback" in kinds
        table = getattr(tokenizer, "byte_decoder", None)
        if not isinstance(table, dict):
            table = {ch: b for b, ch in bytes_to_unicode().items()}  # type: ignore[no-untyped-call]
        self.byte_table: dict[str, int] = table
        self.vocab_size = len(tokenizer)
        self._anchor_prefix = self._decode([_ANCHOR])
        self._mid_cache: dict[int, bytes] = {}

    def _decode(self, pieces: list[str]) -> str:
        if self.decoder is not None:
            return str(self.decoder.decode(pieces))
        tokenizer = self._tokenizer()
        if getattr(tokenizer, "backend_tokenizer", None) is None:
            return str(tokenizer.convert_tokens_to_string(pieces))
        # A fast tokenizer without a decoder: apply the SentencePiece / WordPiece marker rules directly.
        return "".join(p[2:] if p.startswith("##") else p.replace("▁", " ") for p in pieces)

    def piece(self, token_id: int) -> str | None:
        """The raw vocabulary string of an id (``None`` when the id is out of range or unassigned)."""
        if token_id < 0 or token_id >= self.vocab_size:
            return None
        tok = self._tokenizer().convert_ids_to_tokens(token_id)
        return tok if isinstance(tok, str) else None

    def token_bytes(self, token_id: int, first: bool = False) -> bytes:
        """UTF-8 bytes of the surface text of one token; ``first``: as the first token of a text."""
        if token_id in self.special_ids:
            return b""
        if not first and token_id in self._mid_cache:
            return self._mid_cache[token_id]
        out = self._bytes_of(self.piece(token_id), first)
        if not first:
            self._mid_cache[token_id] = out
        return out

    def _bytes_of(self, tok: str | None, first: bool) -> bytes:
        if not tok:
            return b""
        if self.byte_level:
            table = self.byte_table
            return b"".join(bytes([table[c]]) if c in table else c.encode("utf-8") for c in tok)
        if self.byte_fallback:
            m = _BYTE_PIECE.match(tok)
            if m:
                return bytes([int(m.group(1), 16)])
        if first:
            return self._decode([tok]).encode("utf-8", "surrogatepass")
        text = self._decode([_ANCHOR, tok])
        if text.startswith(self._anchor_prefix):
            text = text[len(self._anchor_prefix) :]
        else:  # pragma: no cover - no known decoder rewrites a plain letter
            text = self._decode([tok])
        return text.encode("utf-8", "surrogatepass")


_CODECS: weakref.WeakKeyDictionary[Any, _Codec] = weakref.WeakKeyDictionary()


def _codec(tokenizer: Any) -> _Codec:
    try:
        codec = _CODECS.get(tokenizer)
    except TypeError:  # not weak-referenceable / hashable: build one per call
        return _Codec(tokenizer)
    if codec is None:
        codec = _Codec(tokenizer)
        _CODECS[tokenizer] = codec
    return codec


def special_ids(tokenizer: Any) -> frozenset[int]:
    """The ids :func:`token_strings` treats as special (all special ids + added tokens flagged special)."""
    return _codec(tokenizer).special_ids


def token_strings(tokenizer: Any, ids: Iterable[int]) -> list[str]:
    """The surface string of every token of one tokenized text (see the module docstring).

    Each token's UTF-8 bytes are produced by the tokenizer's own decoder (see :class:`_Codec`); the first
    non-special token is decoded as the first token of a text (so a Metaspace / Llama decoder drops its
    prepended space exactly as ``tokenizer.decode`` does), every later one as a mid-text token.

    Multi-byte UTF-8 characters split over several tokens: the byte stream of the whole sequence is fed
    through one incremental UTF-8 decoder (``errors="replace"``), and each token gets the characters
    *completed* by its bytes. A token holding only leading bytes of a character therefore gets ``""``
    (or just its complete characters, e.g. ``" "`` for ``"Ġæ"``), the token with the final byte gets the
    whole character, and bytes that never form a valid character become U+FFFD in the token where the
    decoder rejects them (anything still pending at the end goes to the last token with bytes). Hence,
    for a lossless tokenizer, ``"".join(token_strings(tok, ids)) == tok.decode(ids,
    skip_special_tokens=True)``. Special tokens and out-of-range ids give ``""``.
    """
    codec = _codec(tokenizer)
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    out: list[str] = []
    first = True
    last_with_bytes = -1
    for raw in ids:
        token_id = int(raw)
        if token_id in codec.special_ids:
            out.append("")
            continue
        data = codec.token_bytes(token_id, first=first)
        first = False
        if data:
            last_with_bytes = len(out)
        out.append(decoder.decode(data))
    tail = decoder.decode(b"", final=True)
    if tail and last_with_bytes >= 0:
        out[last_with_bytes] += tail
    return out


def vocab_strings(tokenizer: Any) -> list[str]:
    """The context-free surface string of every id ``0 .. len(tokenizer) - 1`` (mid-text form).

    A word-initial token keeps its leading space (``"Ġthe"``/``"▁the"``/WordPiece ``"the"`` -> ``" the"``).
    Bytes that are not valid UTF-8 on their own (a byte-level token or ``<0xNN>`` piece holding part of a
    multi-byte character) are decoded with ``errors="surrogateescape"``: each such byte ``b`` becomes the
    lone surrogate ``U+DC00 + b``. That keeps distinct byte tokens distinct, makes the same byte in two
    tokenizers the same string, and never equals a real character. Special and unassigned ids give ``""``.
    """
    codec = _codec(tokenizer)
    out: list[str] = []
    for token_id in range(codec.vocab_size):
        out.append(codec.token_bytes(token_id).decode("utf-8", "surrogateescape"))
    return out


# --------------------------------------------------------------------------------------------------------
# Vectorised Levenshtein
# --------------------------------------------------------------------------------------------------------


def _codes(strings: Sequence[str], width: int) -> npt.NDArray[np.int32]:
    """Code points of ``strings`` right-padded to ``width``, transposed to shape ``(width, len(strings))``."""
    if width == 0 or not strings:
        return np.zeros((width, len(strings)), dtype=np.int32)
    blob = "".join(s.ljust(width, "\0") for s in strings).encode("utf-32-le", "surrogatepass")
    arr = np.frombuffer(blob, dtype="<u4").astype(np.int32).reshape(len(strings), width)
    return np.ascontiguousarray(arr.T)


def _dense(*code_arrays: npt.NDArray[np.int32]) -> list[npt.NDArray[Any]]:
    """Re-code code-point arrays onto one shared dense alphabet (uint8 when it has < 256 symbols)."""
    alphabet = np.unique(np.concatenate([c.ravel() for c in code_arrays]))
    dtype = np.uint8 if len(alphabet) < 256 else np.int32
    return [np.searchsorted(alphabet, c).astype(dtype) for c in code_arrays]


def _ed_block(a: npt.NDArray[Any], a_len: IntArray, b: npt.NDArray[Any], b_len: IntArray) -> IntArray:
    """Levenshtein distances of every string of ``a`` with every string of ``b``: shape ``(na, nb)``.

    ``a``: ``(La, na)`` and ``b``: ``(Lb, nb)`` padded symbol codes, ``a_len`` / ``b_len`` true lengths.
    Wagner-Fischer row by row over ``a``'s characters, vectorised over all ``na * nb`` pairs and over
    ``b``'s positions: ``T[c] = min(D[r-1][c] + 1, D[r-1][c-1] + (a[r] != b[c]))`` for all columns at
    once, then the insertion chain ``D[r][c] = min(T[c], D[r][c-1] + 1)`` one column at a time. ``a`` is
    processed in order of decreasing length so row ``r`` only touches the strings with ``a_len >= r``
    (no work on ``a``'s padding); ``b``'s padding is computed but never read (a pair's distance is taken
    at row ``a_len``, column ``b_len``). Cells are int8 (int16 when a width reaches 120).
    """
    width_b, nb = b.shape
    width_a, na = a.shape
    if na == 0 or nb == 0:
        return np.zeros((na, nb), dtype=np.int64)
    order = np.argsort(-a_len, kind="stable")
    a, a_len = a[:, order], a_len[order]
    dtype = np.int8 if max(width_a, width_b) < 120 else np.int16
    prev = np.empty((width_b + 1, na, nb), dtype=dtype)
    prev[...] = np.arange(width_b + 1, dtype=dtype)[:, None, None]
    step = np.empty((na, nb), dtype=dtype)
    # active[r] = number of strings with a_len >= r (a prefix: a_len is sorted descending)
    active = np.searchsorted(-a_len, -np.arange(width_a + 2), side="right")
    res = np.empty((na, nb), dtype=np.int64)
    res[int(active[1]) :] = b_len[None, :]
    cols = np.arange(nb)[None, :]
    for r in range(1, width_a + 1):
        k = int(active[r])
        if k == 0:
            break
        cur = np.empty((width_b + 1, k, nb), dtype=dtype)
        cur[0] = r
        neq = a[r - 1, :k][None, :, None] != b[:, None, :]
        np.minimum(prev[1:, :k] + 1, prev[:-1, :k] + neq, out=cur[1:])
        for c in range(1, width_b + 1):  # insertion chain: one contiguous (k, nb) slab per column
            np.add(cur[c - 1], 1, out=step[:k])
            np.minimum(cur[c], step[:k], out=cur[c])
        prev = cur
        lo = int(active[r + 1])
        if lo < k:
            res[lo:k] = cur[b_len[None, :], np.arange(lo, k)[:, None], cols]
    out = np.empty((na, nb), dtype=np.int64)
    out[order] = res
    return out


def _length_class(n: int) -> int:
    """0 for the empty string, else ceil(log2(n)) + 1: lengths 1 | 2 | 3-4 | 5-8 | 9-16 | ..."""
    return 0 if n == 0 else (n - 1).bit_length() + 1


def edit_distance_matrix(a: Sequence[str], b: Sequence[str]) -> IntArray:
    """``M[i, j] = levenshtein(a[i], b[j])`` for all pairs, shape ``(len(a), len(b))``, int64.

    ``b`` is grouped by length class (powers of two, so padding at most doubles the work along ``b``);
    each class is one vectorised :func:`_ed_block` against all of ``a`` (chunked over ``a`` to bound
    memory). Total work O(sum(len(a)) * sum(len(b))) elementwise numpy operations.
    """
    out = np.zeros((len(a), len(b)), dtype=np.int64)
    if not a or not b:
        return out
    groups_b: dict[int, list[int]] = {}
    for j, s in enumerate(b):
        groups_b.setdefault(_length_class(len(s)), []).append(j)
    ca32 = _codes(a, max(len(s) for s in a))
    cb32 = _codes(b, max(len(s) for s in b))
    ca, cb = _dense(ca32, cb32)
    la = np.asarray([len(s) for s in a], dtype=np.int64)
    lb_all = np.asarray([len(s) for s in b], dtype=np.int64)
    for gb in sorted(groups_b):
        ib = np.asarray(groups_b[gb], dtype=np.int64)
        lb = lb_all[ib]
        wb = int(lb.max())
        block_b = cb[:wb, ib]
        per_chunk = max(1, _ED_CHUNK // ((wb + 1) * len(ib)))
        for start in range(0, len(a), per_chunk):
            stop = min(len(a), start + per_chunk)
            wa = int(la[start:stop].max())
            out[start:stop, ib] = _ed_block(ca[:wa, start:stop], la[start:stop], block_b, lb)
    return out


def levenshtein(a: str, b: str) -> int:
    """Levenshtein distance of two strings (unit costs, code points)."""
    return int(edit_distance_matrix([a], [b])[0, 0])


# --------------------------------------------------------------------------------------------------------
# Alignment
# --------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Alignment:
    """An alignment of a source token sequence with a pivot token sequence of the same text.

    ``pairs``: the alignment path as ``(source_position, pivot_position)`` steps, sorted, both coordinates
    non-decreasing and at least one strictly increasing per step. ``one_to_one``: pivot position ->
    source position for every pair whose two positions each occur in exactly one pair and whose surface
    strings are identical. ``cost``: the total DTW cost (sum of the key edit distances over ``pairs``).
    """

    pairs: list[tuple[int, int]]
    one_to_one: dict[int, int]
    cost: int

    def bijective(self) -> dict[int, int]:
        """Pivot position -> source position for every 1-to-1 pair, whether the strings match or not."""
        return _bijective(self.pairs)


def _bijective(pairs: Sequence[tuple[int, int]]) -> dict[int, int]:
    src_count = Counter(i for i, _ in pairs)
    tgt_count = Counter(j for _, j in pairs)
    return {j: i for i, j in pairs if src_count[i] == 1 and tgt_count[j] == 1}


def _dtw(cost: IntArray) -> tuple[list[tuple[int, int]], int]:
    """Min-cost monotone path from (0, 0) to (n-1, m-1) with diagonal / down / right steps.

    ``D[i, j] = C[i, j] + min(D[i-1, j-1], D[i-1, j], D[i, j-1])``, one numpy row at a time: with
    ``T[j] = C[i, j] + min(D[i-1, j-1], D[i-1, j])`` and ``S = cumsum(C[i])`` the in-row chain is
    ``D[i, j] = S[j] + cummin(T[k] - S[k])``. The path is traced back from the end choosing, among the
    predecessors with the minimal ``D``, the diagonal first, then ``(i-1, j)``, then ``(i, j-1)``.
    O(n * m) time and memory.
    """
    n, m = cost.shape
    acc = np.empty((n, m), dtype=np.int64)
    acc[0] = np.cumsum(cost[0])
    for i in range(1, n):
        c = cost[i]
        t = np.empty(m, dtype=np.int64)
        t[0] = c[0] + acc[i - 1, 0]
        if m > 1:
            t[1:] = c[1:] + np.minimum(acc[i - 1, 1:], acc[i - 1, :-1])
        s = np.cumsum(c)
        acc[i] = s + np.minimum.accumulate(t - s)
    i, j = n - 1, m - 1
    path = [(i, j)]
    while i > 0 or j > 0:
        if i > 0 and j > 0:
            best = acc[i - 1, j - 1]
            step = (i - 1, j - 1)
            if acc[i - 1, j] < best:
                best, step = acc[i - 1, j], (i - 1, j)
            if acc[i, j - 1] < best:
                step = (i, j - 1)
        elif i > 0:
            step = (i - 1, j)
        else:
            step = (i, j - 1)
        i, j = step
        path.append(step)
    path.reverse()
    return path, int(acc[n - 1, m - 1])


def _fill_whitespace(
    path: list[tuple[int, int]], src: Sequence[str], tgt: Sequence[str]
) -> list[tuple[int, int]]:
    """Insert 1-to-1 pairs for whitespace-only tokens between consecutive path steps.

    Whitespace-only tokens (non-empty surface, empty key) are not part of the DTW. Between two consecutive
    path steps (and before the first / after the last), if the source and the pivot hold the same number
    of such tokens, they are paired in order; otherwise they stay unaligned.
    """
    ws_src = [i for i, s in enumerate(src) if s and not text_key(s)]
    ws_tgt = [j for j, s in enumerate(tgt) if s and not text_key(s)]
    if not ws_src or not ws_tgt:
        return path
    bounds = [(-1, -1), *path, (len(src), len(tgt))]
    out: list[tuple[int, int]] = []
    a = b = 0  # cursors into ws_src / ws_tgt
    for k in range(len(bounds) - 1):
        (i0, j0), (i1, j1) = bounds[k], bounds[k + 1]
        while a < len(ws_src) and ws_src[a] <= i0:
            a += 1
        while b < len(ws_tgt) and ws_tgt[b] <= j0:
            b += 1
        gap_s = []
        while a < len(ws_src) and ws_src[a] < i1:
            gap_s.append(ws_src[a])
            a += 1
        gap_t = []
        while b < len(ws_tgt) and ws_tgt[b] < j1:
            gap_t.append(ws_tgt[b])
            b += 1
        if gap_s and len(gap_s) == len(gap_t):
            out.extend(zip(gap_s, gap_t, strict=True))
        if k + 1 < len(bounds) - 1:
            out.append(bounds[k + 1])
    return out


def _finish(path: list[tuple[int, int]], cost: int, src: Sequence[str], tgt: Sequence[str]) -> Alignment:
    pairs = _fill_whitespace(path, src, tgt)
    one = {j: i for j, i in _bijective(pairs).items() if src[i] == tgt[j]}
    return Alignment(pairs=pairs, one_to_one=dict(sorted(one.items())), cost=cost)


def align(src: Sequence[str], tgt: Sequence[str], method: AlignMethod = "dtw") -> Alignment:
    """Align source token strings ``src`` with pivot token strings ``tgt`` (surface strings).

    ``method``: ``"dtw"`` (default, below), ``"spans"`` (:func:`align_spans`; ``ValueError`` when the
    whitespace-free texts differ) or ``"auto"`` (spans when the whitespace-free texts are identical, else
    DTW). DTW with an edit-distance cost is the literature's method and works for any two sequences, but
    its optimum is known to pile short tokens onto cheap neighbours (``"n"`` of ``"ma"+"n"+"y"`` paired
    with the next word ``" now"``, because ``ed("n", "now") = 2 < ed("n", "many") = 3``); when both sides
    spell the same text the span alignment follows the characters exactly and is O(n + m).

    DTW:

    - Tokens with a non-empty key (:func:`text_key`) take part in the DTW: the cost of pairing source
      token ``i`` with pivot token ``j`` is ``levenshtein(key(src[i]), key(tgt[j]))``; the path runs from
      the first to the last such token on both sides with diagonal (1-to-1), source-advancing
      (many-to-1) and pivot-advancing (1-to-many) steps and minimal total cost (ties: see :func:`_dtw`).
    - Whitespace-only tokens are then paired 1-to-1 where both sides have the same number of them
      between the same two path steps (:func:`_fill_whitespace`); otherwise they stay unaligned.
    - Empty tokens (special tokens, pieces of an unfinished UTF-8 character) align with nothing.

    If either side has no non-empty key, the DTW path is empty (cost 0). Time O(n * m): one vectorised
    Levenshtein per *distinct* key pair (:func:`edit_distance_matrix`) and one numpy op sequence per DTW
    row; 300 x 300 tokens take a few milliseconds.
    """
    if method not in ("dtw", "spans", "auto"):
        raise ValueError(f"unknown alignment method {method!r}")
    if method != "dtw":
        spans = align_spans(src, tgt)
        if spans is not None:
            return spans
        if method == "spans":
            raise ValueError("align(method='spans') needs both sides to spell the same whitespace-free text")
    src_keys = [text_key(s) for s in src]
    tgt_keys = [text_key(s) for s in tgt]
    si = [i for i, k in enumerate(src_keys) if k]
    ti = [j for j, k in enumerate(tgt_keys) if k]
    if not si or not ti:
        return _finish([], 0, src, tgt)
    ua = sorted({src_keys[i] for i in si})
    ub = sorted({tgt_keys[j] for j in ti})
    pos_a = {k: n for n, k in enumerate(ua)}
    pos_b = {k: n for n, k in enumerate(ub)}
    ed = edit_distance_matrix(ua, ub)
    rows = np.asarray([pos_a[src_keys[i]] for i in si], dtype=np.int64)
    cols = np.asarray([pos_b[tgt_keys[j]] for j in ti], dtype=np.int64)
    path, cost = _dtw(ed[np.ix_(rows, cols)])
    return _finish([(si[a], ti[b]) for a, b in path], cost, src, tgt)


def align_spans(src: Sequence[str], tgt: Sequence[str]) -> Alignment | None:
    """Exact O(n + m) alignment by character spans, or ``None`` if the two sides spell different text.

    Applies when ``"".join(map(text_key, src)) == "".join(map(text_key, tgt))`` (the whitespace-free
    texts are identical). Every non-empty-key token covers a span of that text; ``pairs`` are all
    (source, pivot) token pairs whose spans overlap, in order (a sweep over both span lists), whitespace
    tokens are filled in as in :func:`align`, and ``cost`` is the sum of the key edit distances over the
    pairs. Unlike :func:`align` this does not minimise the cost; it follows the characters.
    """
    src_keys = [text_key(s) for s in src]
    tgt_keys = [text_key(s) for s in tgt]
    if "".join(src_keys) != "".join(tgt_keys):
        return None
    si = [i for i, k in enumerate(src_keys) if k]
    ti = [j for j, k in enumerate(tgt_keys) if k]
    ends_a = np.cumsum([len(src_keys[i]) for i in si]).tolist()
    ends_b = np.cumsum([len(tgt_keys[j]) for j in ti]).tolist()
    path: list[tuple[int, int]] = []
    a = b = 0
    while a < len(si) and b < len(ti):
        path.append((si[a], ti[b]))
        if ends_a[a] < ends_b[b]:
            a += 1
        elif ends_b[b] < ends_a[a]:
            b += 1
        else:
            a += 1
            b += 1
    # the cost: only pairs of different keys cost anything (same tokenizer: none, nothing to compute)
    differ = [(src_keys[i], tgt_keys[j]) for i, j in path if src_keys[i] != tgt_keys[j]]
    cost = 0
    if differ:
        ua = sorted({a for a, _ in differ})
        ub = sorted({b for _, b in differ})
        ed = edit_distance_matrix(ua, ub)
        pa = {k: n for n, k in enumerate(ua)}
        pb = {k: n for n, k in enumerate(ub)}
        cost = int(sum(ed[pa[a], pb[b]] for a, b in differ))
    return _finish(path, cost, src, tgt)


# --------------------------------------------------------------------------------------------------------
# Vocabulary maps
# --------------------------------------------------------------------------------------------------------


def _word_initial(s: str) -> bool:
    return s.startswith(" ")


class _PivotIndex:
    """The pivot vocabulary prepared for lookups: exact string -> lowest id, and exact-length buckets."""

    def __init__(self, strings: Sequence[str], special: frozenset[int]) -> None:
        self.strings = list(strings)
        self.exact: dict[str, int] = {}
        for i, s in enumerate(self.strings):
            if s and i not in special:
                self.exact.setdefault(s, i)
        self._buckets: dict[int, tuple[npt.NDArray[np.int32], IntArray, npt.NDArray[np.bool_]]] | None = None

    def buckets(self) -> dict[int, tuple[npt.NDArray[np.int32], IntArray, npt.NDArray[np.bool_]]]:
        """length -> (codes ``(length, n)``, ids ascending, word-initial flags); built on first use."""
        if self._buckets is None:
            by_len: dict[int, list[int]] = {}
            for s, i in self.exact.items():
                by_len.setdefault(len(s), []).append(i)
            self._buckets = {}
            for length, ids in sorted(by_len.items()):
                ids.sort()
                strs = [self.strings[i] for i in ids]
                self._buckets[length] = (
                    _codes(strs, length),
                    np.asarray(ids, dtype=np.int64),
                    np.asarray([_word_initial(s) for s in strs], dtype=np.bool_),
                )
        return self._buckets


def _special_map(src_tok: Any, pivot_tok: Any) -> dict[int, int]:
    """Source special id -> pivot special id: same token content first, else the same role (bos/eos/...)."""
    src_special = special_ids(src_tok)
    pivot_special = special_ids(pivot_tok)
    pivot_by_content: dict[str, int] = {}
    for i in sorted(pivot_special):
        content = _codec(pivot_tok).piece(i)
        if content is not None:
            pivot_by_content.setdefault(content, i)
    out: dict[int, int] = {}
    for i in sorted(src_special):
        content = _codec(src_tok).piece(i)
        if content is not None and content in pivot_by_content:
            out[i] = pivot_by_content[content]
    for role in ("bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id"):
        s, p = getattr(src_tok, role, None), getattr(pivot_tok, role, None)
        if isinstance(s, int) and isinstance(p, int) and s not in out:
            out[s] = p
    return out


class VocabMap:
    """Maps source token ids to pivot token ids.

    Strings compared are :func:`vocab_strings` (mid-text surface strings, leading space kept).

    - ``"exact"``: the pivot token with the identical string (lowest id if several), else ``None``.
      ``"Ġthe"``, ``"▁the"`` and WordPiece ``"the"`` are all ``" the"``; ``"the"`` is a different token.
    - ``"min_ed"``: the pivot token minimising ``levenshtein(src_string, pivot_string)`` (the strings
      *with* their spaces, so a space mismatch costs 1), ties broken by same word-initial-space status,
      then shorter string, then lower id; exact matches (distance 0) win. The search is exact but
      restricted: pivot tokens are bucketed by string length, and since ``ed >= |len difference|``
      buckets are visited in order of growing length difference ``d`` and the search stops once
      ``d`` exceeds the best distance found; each bucket is one vectorised Levenshtein over all its
      tokens and all pending queries of one length. Results are computed lazily, only for the ids
      actually asked for, and cached.
    - ``"stats"``: over a corpus, every text is tokenized by both tokenizers (no special tokens added) and
      aligned with :func:`align` (``align_method``, default ``"auto"``: character spans when both sides
      spell the same text, else DTW); every 1-to-1 pair of the path (:meth:`Alignment.bijective`, the
      strings need not match, e.g. a SentencePiece ``"x"`` after a lone ``"▁"`` against a pivot ``" x"``)
      counts once for (source id, pivot id). A source id maps to the partner with the identical
      vocabulary string if it was ever co-aligned with it (so frequent tokens agree with ``"exact"``;
      surface strings in context are not used for this because a text's first token and the token that
      completes a split UTF-8 character decode differently in context), else to its most frequent partner
      (ties: lower id); ids never co-aligned use ``fallback`` (``"min_ed"``, ``"exact"`` or ``None``).

    For every method, special tokens map by role: a source special token goes to the pivot special token
    with the same content, else to the pivot's token of the same role (bos/eos/pad/unk); other special
    tokens, empty strings and ids outside ``[0, source vocab size)`` are unmapped (``None`` / ``-1``).
    """

    def __init__(
        self,
        src_strings: Sequence[str],
        pivot_strings: Sequence[str],
        method: Method,
        *,
        src_special: frozenset[int] = frozenset(),
        pivot_special: frozenset[int] = frozenset(),
        special_map: Mapping[int, int] | None = None,
        co_counts: Mapping[int, Mapping[int, int]] | None = None,
        fallback: Fallback = "min_ed",
    ) -> None:
        """Build from precomputed string lists (``build`` / ``from_corpus`` are the usual entry points)."""
        if method not in ("exact", "min_ed", "stats"):
            raise ValueError(f"unknown vocabulary mapping method {method!r}")
        if fallback not in ("exact", "min_ed", None):
            raise ValueError(f"unknown fallback {fallback!r}")
        self.method: Method = method
        self.fallback: Fallback = fallback if method == "stats" else None
        self.src_strings = list(src_strings)
        self.pivot = _PivotIndex(pivot_strings, pivot_special)
        self.co_counts: dict[int, dict[int, int]] = {
            int(s): dict(sorted(c.items())) for s, c in sorted((co_counts or {}).items())
        }
        # table[i]: -2 not computed yet, -1 unmapped, else pivot id
        self._table = np.full(len(self.src_strings), -2, dtype=np.int64)
        for i in src_special:
            if 0 <= i < len(self._table):
                self._table[i] = -1
        for i, s in enumerate(self.src_strings):
            if not s:
                self._table[i] = -1
        for s_id, p_id in (special_map or {}).items():
            if 0 <= s_id < len(self._table):
                self._table[s_id] = p_id
        if method == "stats":
            for s_id, counts in self.co_counts.items():
                if 0 <= s_id < len(self._table) and self._table[s_id] == -2:
                    self._table[s_id] = self._most_co_aligned(s_id, counts)
        self._resolve_exact()

    def _most_co_aligned(self, s_id: int, counts: Mapping[int, int]) -> int:
        """Most frequent partner, preferring partners with the identical vocabulary string; ties: lower id."""
        s = self.src_strings[s_id]
        strings = self.pivot.strings

        def rank(item: tuple[int, int]) -> tuple[bool, int, int]:
            p_id, n = item
            same = 0 <= p_id < len(strings) and strings[p_id] == s
            return (not same, -n, p_id)

        return min(counts.items(), key=rank)[0]

    @property
    def src_size(self) -> int:
        return len(self.src_strings)

    def _lookup_method(self) -> Fallback:
        return self.method if self.method != "stats" else self.fallback

    def _resolve_exact(self) -> None:
        """Resolve pending ids: exact matches (also the min-ED answer), or unmapped when no lookup applies."""
        how = self._lookup_method()
        pending = np.flatnonzero(self._table == -2)
        for i in pending:
            hit = self.pivot.exact.get(self.src_strings[i]) if how is not None else None
            if hit is not None:
                self._table[i] = hit
            elif how != "min_ed":
                self._table[i] = -1

    @classmethod
    def build(
        cls,
        src_tokenizer: Any,
        pivot_tokenizer: Any,
        method: Method,
        *,
        texts: Iterable[str] | None = None,
        fallback: Fallback = "min_ed",
        align_method: AlignMethod = "auto",
    ) -> VocabMap:
        """A map between two tokenizers; ``method="stats"`` needs ``texts`` (see :meth:`from_corpus`)."""
        co_counts = None
        if method == "stats":
            if texts is None:
                raise ValueError('method "stats" needs a corpus: pass texts=... (or use from_corpus)')
            co_counts = co_alignment_counts(src_tokenizer, pivot_tokenizer, texts, align_method)
        return cls(
            vocab_strings(src_tokenizer),
            vocab_strings(pivot_tokenizer),
            method,
            src_special=special_ids(src_tokenizer),
            pivot_special=special_ids(pivot_tokenizer),
            special_map=_special_map(src_tokenizer, pivot_tokenizer),
            co_counts=co_counts,
            fallback=fallback,
        )

    @classmethod
    def from_corpus(
        cls,
        src_tokenizer: Any,
        pivot_tokenizer: Any,
        texts: Iterable[str],
        fallback: Fallback = "min_ed",
        align_method: AlignMethod = "auto",
    ) -> VocabMap:
        """The ``"stats"`` map learned from co-alignment counts over ``texts``."""
        return cls.build(
            src_tokenizer, pivot_tokenizer, "stats", texts=texts, fallback=fallback, align_method=align_method
        )

    def _ensure(self, ids: Iterable[int]) -> None:
        """Compute the min-ED answer for every listed in-range id that is still pending."""
        pending = sorted(
            {int(i) for i in ids if 0 <= int(i) < len(self._table) and self._table[int(i)] == -2}
        )
        if not pending:
            return
        by_len: dict[int, list[int]] = {}
        for i in pending:
            by_len.setdefault(len(self.src_strings[i]), []).append(i)
        buckets = self.pivot.buckets()
        max_len = max(buckets) if buckets else 0
        for qlen, qids in sorted(by_len.items()):
            self._min_ed_group(qlen, qids, buckets, max_len)

    def _min_ed_group(
        self,
        qlen: int,
        qids: list[int],
        buckets: Mapping[int, tuple[npt.NDArray[np.int32], IntArray, npt.NDArray[np.bool_]]],
        max_len: int,
    ) -> None:
        strs = [self.src_strings[i] for i in qids]
        q_codes = _codes(strs, qlen)
        q_space = np.asarray([_word_initial(s) for s in strs], dtype=np.bool_)
        # best[k] = (distance, space mismatch, length, id)
        best: list[tuple[int, int, int, int] | None] = [None] * len(qids)
        d = 0
        while d <= max(qlen, max_len):
            active = [k for k, b in enumerate(best) if b is None or b[0] >= d]
            if not active:
                break
            for length in sorted({qlen - d, qlen + d}):
                if length not in buckets:
                    continue
                p_codes, p_ids, p_space = buckets[length]
                act = np.asarray(active, dtype=np.int64)
                per_chunk = max(1, _ED_CHUNK // max(1, (length + 1) * len(p_ids)))
                for start in range(0, len(act), per_chunk):
                    ks = act[start : start + per_chunk]
                    dist = _ed_block(
                        q_codes[:, ks],
                        np.full(len(ks), qlen, dtype=np.int64),
                        p_codes,
                        np.full(len(p_ids), length, dtype=np.int64),
                    )
                    mismatch = (q_space[ks][:, None] != p_space[None, :]).astype(np.int64)
                    # within one bucket the length is constant and ids ascend: argmin = lexicographic min
                    pick = np.argmin(dist * 2 + mismatch, axis=1)
                    for row, k in enumerate(ks):
                        c = int(pick[row])
                        cand = (int(dist[row, c]), int(mismatch[row, c]), length, int(p_ids[c]))
                        cur = best[int(k)]
                        if cur is None or cand < cur:
                            best[int(k)] = cand
            d += 1
        for k, i in enumerate(qids):
            b = best[k]
            self._table[i] = -1 if b is None else b[3]

    def map(self, src_id: int) -> int | None:
        """The pivot id for one source id, or ``None`` when unmapped (see the class docstring)."""
        src_id = int(src_id)
        if not 0 <= src_id < len(self._table):
            return None
        self._ensure([src_id])
        out = int(self._table[src_id])
        return None if out < 0 else out

    def map_topk(self, ids: torch.Tensor) -> torch.Tensor:
        """Map a tensor of source ids (any shape) to pivot ids, ``-1`` where unmapped; same shape, int64.

        Negative or out-of-vocabulary source ids (e.g. padding ``-1`` or ids of padded embedding rows) give
        ``-1``. Lazily resolves (and caches) every distinct id in the tensor first.
        """
        flat = ids.detach().to("cpu", torch.int64).reshape(-1).numpy()
        inside = (flat >= 0) & (flat < len(self._table))
        self._ensure(np.unique(flat[inside]).tolist())
        out = np.full(flat.shape, -1, dtype=np.int64)
        out[inside] = self._table[flat[inside]]
        out[out < 0] = -1
        return torch.from_numpy(out).reshape(ids.shape).to(ids.device)

    def mapped_fraction(self, ids: Iterable[int]) -> float:
        """Fraction of the given source ids that map to some pivot id (resolves them if needed)."""
        lst = [int(i) for i in ids]
        if not lst:
            return 0.0
        return sum(self.map(i) is not None for i in lst) / len(lst)


def co_alignment_counts(
    src_tokenizer: Any, pivot_tokenizer: Any, texts: Iterable[str], align_method: AlignMethod = "auto"
) -> dict[int, dict[int, int]]:
    """``counts[src_id][pivot_id]``: how often the two ids form a 1-to-1 pair when ``texts`` are aligned.

    Each text is tokenized by both tokenizers without special tokens, turned into surface strings
    (:func:`token_strings`) and aligned with :func:`align`; every pair of :meth:`Alignment.bijective`
    counts once.
    """
    counts: dict[int, Counter[int]] = {}
    for text in texts:
        s_ids = list(src_tokenizer(text, add_special_tokens=False)["input_ids"])
        p_ids = list(pivot_tokenizer(text, add_special_tokens=False)["input_ids"])
        al = align(
            token_strings(src_tokenizer, s_ids), token_strings(pivot_tokenizer, p_ids), method=align_method
        )
        for j, i in al.bijective().items():
            counts.setdefault(int(s_ids[i]), Counter())[int(p_ids[j])] += 1
    return {s: dict(c) for s, c in sorted(counts.items())}
