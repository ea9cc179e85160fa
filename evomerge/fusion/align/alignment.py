"""Aligning two token-string sequences of the same text: :class:`Alignment`, :func:`align` (DTW with an
edit-distance cost, or ``auto``/``spans``) and :func:`align_spans` (exact character spans)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

from evomerge.fusion.align.edit_distance import IntArray, edit_distance_matrix
from evomerge.fusion.align.surface import text_key

AlignMethod = Literal["dtw", "spans", "auto"]


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
