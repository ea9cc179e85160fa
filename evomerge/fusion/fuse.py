"""Fusing several source models' aligned top-K distributions into one sparse target per position.

Input, for one sequence of ``T`` pivot positions, one :class:`SourceTargets` per source model (already
aligned to the pivot's token positions and vocabulary by the alignment code):

- ``ids``      LongTensor ``[T, K]``: pivot-vocabulary ids of the source's top-K tokens, ``-1`` (any negative
  value) for a slot whose token has no pivot counterpart;
- ``logprobs`` FloatTensor ``[T, K]``: the source's log-probabilities of those tokens;
- ``valid``    BoolTensor ``[T]``: positions where the source has an aligned distribution;
- ``ce``       float: the source's cross-entropy on the gold response of this sequence (lower is better).

A source's distribution at a position is ``exp(logprobs)`` renormalised over its *mapped* slots
(``id >= 0``); slots sharing one pivot id (several source tokens mapped onto one pivot token) are summed.
A position whose mapped slots hold no probability mass (all unmapped, or non-finite log-probs) counts as
invalid for that source, whatever ``valid`` says.

Output: a :class:`FusedTarget` with ``ids`` ``[T, k_out]`` (unique pivot ids per row, sorted by descending
probability, ``-1`` padding at the end), ``probs`` ``[T, k_out]`` (``0`` on padding; every valid row sums
to 1) and ``valid`` ``[T]``. Rows that are not valid hold only padding.

Fusion methods (registry :data:`FUSIONS`, look-up :func:`get_fusion`), all pure tensor functions:

- ``min_ce``: the distribution of the source with the lowest CE (FuseLLM's MinCE);
- ``avg_ce``: the average weighted by ``softmax_i(exp(-CE_i))`` (FuseLLM's AvgCE);
- ``entropy``: per-position uncertainty weighting ``softmax_i(-H_i(t) / tau)`` (our reading of InfiFusion).

Every fusion takes ``k_out`` (keyword, default: the largest source K), the width of the fused target; the
mixtures keep the ``k_out`` most probable ids of the union and renormalise. Extra options (``tau`` of
``entropy``) are bound by ``get_fusion(name, tau=...)``.
"""

from __future__ import annotations

import functools
import inspect
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol, cast

import torch
from torch import Tensor

from evomerge.errors import ConfigError

__all__ = [
    "FUSIONS",
    "FusedTarget",
    "FusionFn",
    "SourceTargets",
    "fuse_avg_ce",
    "fuse_entropy",
    "fuse_min_ce",
    "get_fusion",
    "source_distribution",
]


@dataclass(frozen=True, eq=False)
class SourceTargets:
    """One source model's aligned top-K distributions over one sequence (see the module docstring)."""

    ids: Tensor
    logprobs: Tensor
    valid: Tensor
    ce: float

    def __post_init__(self) -> None:
        if self.ids.dim() != 2:
            raise ValueError(f"SourceTargets.ids must be [T, K], got shape {tuple(self.ids.shape)}")
        if self.ids.dtype.is_floating_point or self.ids.dtype.is_complex or self.ids.dtype == torch.bool:
            raise ValueError(f"SourceTargets.ids must be an integer tensor, got {self.ids.dtype}")
        if self.logprobs.shape != self.ids.shape:
            raise ValueError(
                f"SourceTargets.logprobs has shape {tuple(self.logprobs.shape)}, ids {tuple(self.ids.shape)}"
            )
        if not self.logprobs.is_floating_point():
            raise ValueError(f"SourceTargets.logprobs must be floating point, got {self.logprobs.dtype}")
        if self.valid.dtype != torch.bool or self.valid.shape != self.ids.shape[:1]:
            raise ValueError(
                f"SourceTargets.valid must be a bool tensor of shape [{self.ids.shape[0]}], "
                f"got {self.valid.dtype} {tuple(self.valid.shape)}"
            )
        ce = float(self.ce)
        if math.isnan(ce) or ce < 0:
            raise ValueError(f"SourceTargets.ce must be a cross-entropy in [0, inf], got {self.ce}")

    @property
    def num_positions(self) -> int:
        return int(self.ids.shape[0])

    @property
    def k(self) -> int:
        return int(self.ids.shape[1])


@dataclass(frozen=True, eq=False)
class FusedTarget:
    """The fused sparse target of one sequence: ``ids``/``probs`` ``[T, K']``, ``valid`` ``[T]``."""

    ids: Tensor
    probs: Tensor
    valid: Tensor


class FusionFn(Protocol):
    """A fusion method: sources of one sequence in, one fused target out."""

    def __call__(self, sources: Sequence[SourceTargets], /, *, k_out: int | None = None) -> FusedTarget: ...


def _work_dtype(sources: Sequence[SourceTargets]) -> torch.dtype:
    dtype = torch.float32
    for src in sources:
        dtype = torch.promote_types(dtype, src.logprobs.dtype)
    return dtype


def source_distribution(
    src: SourceTargets, dtype: torch.dtype = torch.float32
) -> tuple[Tensor, Tensor, Tensor]:
    """``(ids, probs, valid)`` of one source: probabilities renormalised over the mapped slots.

    ``ids`` is ``-1`` on unmapped slots and ``probs`` ``0`` there; ``valid`` is the source's ``valid``
    restricted to positions whose mapped slots hold positive, finite mass. Duplicate ids are left as they
    are (the fusions merge them).
    """
    ids = src.ids.long()
    mapped = ids >= 0
    lp = src.logprobs.to(dtype).masked_fill(~mapped, -math.inf)
    lse = torch.logsumexp(lp, dim=-1, keepdim=True)
    ok = torch.isfinite(lse)
    keep = mapped & ok
    probs = torch.where(keep, torch.exp(lp - lse), 0.0)
    return torch.where(keep, ids, -1), probs, src.valid & ok.squeeze(-1)


def _check_sources(sources: Sequence[SourceTargets], k_out: int | None) -> int:
    """Validate a fusion's inputs; the effective ``k_out``."""
    if len(sources) == 0:
        raise ValueError("fusion needs at least one source")
    lengths = {src.num_positions for src in sources}
    if len(lengths) != 1:
        raise ValueError(f"sources disagree on the number of positions: {sorted(lengths)}")
    if k_out is None:
        return max(max(src.k for src in sources), 1)
    if isinstance(k_out, bool) or not isinstance(k_out, int) or k_out < 1:
        raise ConfigError(f"fusion k_out must be a positive integer, got {k_out!r}")
    return k_out


def _merge_top(ids: Tensor, probs: Tensor, valid: Tensor, k_out: int) -> FusedTarget:
    """Sum the probabilities of equal ids per row, keep the ``k_out`` most probable, renormalise.

    ``ids``/``probs`` ``[T, N]`` (negative id or zero probability = empty slot), ``valid`` ``[T]``.
    """
    num_pos, width = ids.shape
    ids = torch.where(probs > 0, ids, -1)
    if width == 0:
        merged_ids, merged_p = ids, probs
    else:
        sorted_ids, order = ids.sort(dim=1)
        sorted_p = probs.gather(1, order)
        starts = torch.ones_like(sorted_ids, dtype=torch.bool)
        starts[:, 1:] = sorted_ids[:, 1:] != sorted_ids[:, :-1]
        group = starts.long().cumsum(dim=1) - 1
        merged_p = torch.zeros_like(sorted_p).scatter_add(1, group, sorted_p)
        # every member of a group carries the same id, so the scatter is deterministic in value
        merged_ids = torch.full_like(sorted_ids, -1).scatter(1, group, sorted_ids)
        merged_p = torch.where(merged_ids >= 0, merged_p, 0.0)
    keep = min(k_out, width)
    top_p, idx = merged_p.topk(keep, dim=1)
    top_ids = merged_ids.gather(1, idx)
    if keep < k_out:
        top_p = torch.cat([top_p, top_p.new_zeros(num_pos, k_out - keep)], dim=1)
        top_ids = torch.cat([top_ids, top_ids.new_full((num_pos, k_out - keep), -1)], dim=1)
    filled = (top_p > 0) & (top_ids >= 0)
    top_p = torch.where(filled, top_p, 0.0)
    mass = top_p.sum(dim=1)
    valid = valid & (mass > 0)
    top_p = torch.where(valid[:, None], top_p / mass.clamp_min(torch.finfo(mass.dtype).tiny)[:, None], 0.0)
    top_ids = torch.where(valid[:, None] & filled, top_ids, -1)
    return FusedTarget(ids=top_ids, probs=top_p, valid=valid)


def _mix(dists: list[tuple[Tensor, Tensor, Tensor]], scores: Tensor, k_out: int) -> FusedTarget:
    """Mix per-position source distributions with weights ``softmax`` over the valid sources.

    ``scores`` ``[S, T]``: the weight logits; the softmax at each position runs over the sources valid
    there only (so the weights are renormalised per position).
    """
    valid = torch.stack([v for _, _, v in dists])  # [S, T]
    masked = scores.masked_fill(~valid, -math.inf)
    weights = torch.softmax(masked, dim=0)
    weights = torch.where(valid, weights, 0.0)  # NaN where none valid
    ids = torch.cat([i for i, _, _ in dists], dim=1)
    probs = torch.cat([p * weights[s, :, None] for s, (_, p, _) in enumerate(dists)], dim=1)
    return _merge_top(ids, probs, valid.any(dim=0), k_out)


def fuse_min_ce(sources: Sequence[SourceTargets], *, k_out: int | None = None) -> FusedTarget:
    """MinCE: at each position, the distribution of the lowest-CE source valid there.

    Sources are ranked once per sequence by CE (ties: the earlier source wins). At a position where the
    best source is invalid (not aligned, or nothing mapped) we fall back to the next-best source that is
    valid there, and so on; a position where no source is valid is invalid in the result.
    """
    k = _check_sources(sources, k_out)
    dtype = _work_dtype(sources)
    dists = [source_distribution(src, dtype) for src in sources]
    width = max(src.k for src in sources)
    num_pos = sources[0].num_positions
    device = sources[0].ids.device
    out_ids = torch.full((num_pos, width), -1, dtype=torch.long, device=device)
    out_p = torch.zeros((num_pos, width), dtype=dtype, device=device)
    chosen = torch.zeros(num_pos, dtype=torch.bool, device=device)
    ranking = sorted(range(len(sources)), key=lambda i: (float(sources[i].ce), i))
    for i in reversed(ranking):  # worst first: a better valid source overwrites
        ids, probs, valid = dists[i]
        pad = width - ids.shape[1]
        if pad:
            ids = torch.cat([ids, ids.new_full((num_pos, pad), -1)], dim=1)
            probs = torch.cat([probs, probs.new_zeros(num_pos, pad)], dim=1)
        out_ids = torch.where(valid[:, None], ids, out_ids)
        out_p = torch.where(valid[:, None], probs, out_p)
        chosen = chosen | valid
    return _merge_top(out_ids, out_p, chosen, k)


def fuse_avg_ce(sources: Sequence[SourceTargets], *, k_out: int | None = None) -> FusedTarget:
    """AvgCE: ``sum_i w_i p_i`` with ``w = softmax_i(exp(-CE_i))`` over the sources valid at each position.

    The union of the sources' ids is taken (equal ids merged), the ``k_out`` most probable are kept and
    renormalised.
    """
    k = _check_sources(sources, k_out)
    dtype = _work_dtype(sources)
    dists = [source_distribution(src, dtype) for src in sources]
    ce = torch.tensor([float(src.ce) for src in sources], dtype=dtype, device=sources[0].ids.device)
    scores = torch.exp(-ce)[:, None].expand(len(sources), sources[0].num_positions)
    return _mix(dists, scores, k)


def fuse_entropy(
    sources: Sequence[SourceTargets], *, k_out: int | None = None, tau: float = 1.0
) -> FusedTarget:
    """Uncertainty weighting: ``w_i(t) = softmax_i(-H_i(t) / tau)`` over the sources valid at ``t``.

    ``H_i(t)`` is the entropy (nats) of source ``i``'s renormalised top-K distribution at ``t``: the more
    confident a source is at a position, the more it counts there. InfiFusion weights sources by their
    confidence but its exact formula is not public; this per-token softmax of negative entropy with
    temperature ``tau`` is our choice (``tau -> 0``: the most confident source only; ``tau -> inf``: the
    plain average). Union, truncation to ``k_out`` and renormalisation as in :func:`fuse_avg_ce`.
    """
    if not (isinstance(tau, int | float) and math.isfinite(tau) and tau > 0):
        raise ConfigError(f"entropy fusion tau must be a positive number, got {tau!r}")
    k = _check_sources(sources, k_out)
    dtype = _work_dtype(sources)
    dists = [source_distribution(src, dtype) for src in sources]
    entropies = torch.stack([-torch.special.xlogy(p, p).sum(dim=1) for _, p, _ in dists])  # [S, T]
    return _mix(dists, -entropies / tau, k)


FUSIONS: dict[str, FusionFn] = {
    "min_ce": fuse_min_ce,
    "avg_ce": fuse_avg_ce,
    "entropy": fuse_entropy,
}


def get_fusion(name: str, **options: float) -> FusionFn:
    """The fusion registered as ``name``, with ``options`` (e.g. ``tau`` of ``entropy``) bound.

    ConfigError for an unknown name (listing the known ones) or an option the method does not take.
    """
    try:
        fn = FUSIONS[name]
    except KeyError:
        known = ", ".join(sorted(FUSIONS))
        raise ConfigError(f"unknown fusion {name!r}; known: {known}") from None
    if not options:
        return fn
    accepted = {
        p.name
        for p in inspect.signature(fn).parameters.values()
        if p.kind is inspect.Parameter.KEYWORD_ONLY and p.name != "k_out"
    }
    unknown = sorted(set(options) - accepted)
    if unknown:
        takes = ", ".join(sorted(accepted)) or "none"
        raise ConfigError(f"fusion {name!r} has no option {unknown[0]!r} (options: {takes})")
    bound: Callable[..., FusedTarget] = fn
    return cast(FusionFn, functools.partial(bound, **options))
