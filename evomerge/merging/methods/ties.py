"""ties (TIES-merging): trim, elect sign, disjoint merge.

1. Trim: each task vector ``d_i`` keeps its top ``density_i`` fraction of entries by magnitude
   (:func:`~evomerge.merging.methods.common.trim_to_density`: ``k = round(density * numel)`` clamped to
   ``[1, numel]``, ties at the cut-off kept; density 1 keeps all) -> ``d_i'``.
2. Elect: per entry, the sign of ``sum_i w_i d_i'``; a zero sum counts as +.
3. Disjoint merge: ``m_i`` is 1 where ``w_i d_i'`` is non-zero and has the elected sign, else 0;
   result ``b + lambda * sum_i w_i m_i d_i' / sum_i w_i m_i`` (a zero divisor becomes 1) when
   ``normalize`` (default true), else ``b + lambda * sum_i w_i m_i d_i'``.

Parameters: per model ``weight`` (default 1) and ``density`` (default 1); global ``lambda`` (default 1)
and ``normalize`` (default true).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from evomerge.merging.inputs import MergeInputs, divisor_or_one
from evomerge.merging.methods.common import flag, model_values, trim_to_density

MODEL_PARAMS: dict[str, float] = {"weight": 1.0, "density": 1.0}
GLOBAL_PARAMS: dict[str, float] = {"lambda": 1.0, "normalize": 1.0}


def merge(
    inputs: MergeInputs,
    params: Sequence[Mapping[str, float]],
    global_params: Mapping[str, float],
    seed: int,
) -> torch.Tensor:
    base = inputs.require_base()
    weights = model_values(params, "weight", inputs)
    densities = model_values(params, "density", inputs)

    weighted: list[torch.Tensor] = []
    total = torch.zeros_like(base, dtype=torch.float32)
    for i, (w, density) in enumerate(zip(weights, densities, strict=True)):
        wd = trim_to_density(inputs.delta(i), density) * w
        total.add_(wd)
        weighted.append(wd)
    elected_positive = total >= 0
    del total

    numerator = torch.zeros_like(base, dtype=torch.float32)
    divisor = torch.zeros_like(base, dtype=torch.float32)
    for w, wd in zip(weights, weighted, strict=True):
        agree = torch.where(elected_positive, wd > 0, wd < 0)
        numerator.add_(torch.where(agree, wd, 0.0))
        if w != 0.0:
            divisor.add_(agree.to(torch.float32), alpha=w)
    if flag(global_params, "normalize"):
        numerator.div_(divisor_or_one(divisor))
    return torch.add(base, numerator, alpha=float(global_params["lambda"]))
