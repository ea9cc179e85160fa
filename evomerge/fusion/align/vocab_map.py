"""Source -> pivot vocabulary maps (:class:`VocabMap`: ``exact``, ``min_ed``, ``stats``) and the
co-alignment counts over a corpus that ``stats`` learns from (:func:`co_alignment_counts`)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
import torch

from evomerge.fusion.align.alignment import AlignMethod, align
from evomerge.fusion.align.edit_distance import _ED_CHUNK, IntArray, _codes, _ed_block
from evomerge.fusion.align.surface import _codec, special_ids, token_strings, vocab_strings

Method = Literal["exact", "min_ed", "stats"]
Fallback = Literal["exact", "min_ed"] | None


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
