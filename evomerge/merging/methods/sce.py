"""sce (Select, Calculate, Erase): variance-selected positions, energy-based model weights, sign erase.

1. Select: with ``select_topk < 1``, keep only the ``int(select_topk * nnz)`` positions with the largest
   variance of ``d_i`` across models (``nnz`` = positions with non-zero variance; a variance threshold by
   ``kthvalue``), zeroing all task vectors elsewhere.
2. Calculate: model weight ``w_i = mean(d_i^2) / sum_j mean(d_j^2)`` over the masked task vectors (uniform
   when the total is below 1e-6), times the optional per-model ``weight``.
3. Erase: per entry, elect the sign of ``sum_i d_i``; ``m_i`` is 1 where ``d_i`` is non-zero with that sign.
   Result ``b + sum_i w_i m_i d_i / max(sum_i w_i m_i, 1e-6)``.

Parameters: per model ``weight`` (default 1, an evomerge extension; mergekit has none); global
``select_topk`` (default 1: mergekit's default, no selection) and ``int8_mask`` (no effect).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from evomerge.merging.inputs import MergeInputs
from evomerge.merging.methods.common import model_values

MODEL_PARAMS: dict[str, float] = {"weight": 1.0}
GLOBAL_PARAMS: dict[str, float] = {"select_topk": 1.0, "int8_mask": 0.0}


def _variance_mask(deltas: Sequence[torch.Tensor], topk: float) -> torch.Tensor | None:
    """Bool mask of the highest-variance positions (None: keep everything)."""
    if topk >= 1.0:
        return None
    stacked = torch.stack(list(deltas))
    variance = stacked.var(dim=0, unbiased=False)
    del stacked
    nonzero = int(torch.count_nonzero(variance))
    k = int(nonzero * topk)
    if k <= 0:
        return torch.zeros_like(variance, dtype=torch.bool)
    flat = variance.flatten()
    threshold = torch.kthvalue(flat, flat.numel() - k + 1).values
    return variance >= threshold


def merge(
    inputs: MergeInputs,
    params: Sequence[Mapping[str, float]],
    global_params: Mapping[str, float],
    seed: int,
) -> torch.Tensor:
    base = inputs.require_base()
    extra = model_values(params, "weight", inputs)
    deltas = [inputs.delta(i) for i in range(inputs.count)]
    mask = _variance_mask(deltas, float(global_params["select_topk"]))
    if mask is not None:
        deltas = [d * mask for d in deltas]
    energy = [float(d.square().mean()) for d in deltas]
    total = sum(energy)
    weights = [1.0 / len(deltas)] * len(deltas) if abs(total) < 1e-6 else [e / total for e in energy]
    weights = [w * x for w, x in zip(weights, extra, strict=True)]

    total_t = torch.zeros_like(base)
    for d in deltas:
        total_t.add_(d)
    elected_positive = total_t >= 0
    del total_t
    merged = torch.zeros_like(base)
    divisor = torch.zeros_like(base)
    for w, d in zip(weights, deltas, strict=True):
        agree = torch.where(elected_positive, d > 0, d < 0)
        merged.add_(torch.where(agree, d, 0.0), alpha=w)
        divisor.add_(agree.to(torch.float32), alpha=w)
    return base + merged / divisor.clamp(min=1e-6)
