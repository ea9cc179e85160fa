"""The vectorised Levenshtein distance: all pairs of two string lists at once in numpy
(:func:`edit_distance_matrix`), and :func:`levenshtein` for one pair."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

IntArray = npt.NDArray[np.int64]

# Max cells of one work array in the vectorised Levenshtein (int8/int16 cells: a few MB per array).
_ED_CHUNK = 1 << 21


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
