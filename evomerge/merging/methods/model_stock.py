"""model_stock (Model Stock): move from the base toward the experts' average by a ratio set by the angle
between their task vectors.

With ``N >= 2`` task vectors ``d_i`` (whole tensors flattened, or row by row when ``filter_wise``), ``cos``
is the mean pairwise cosine similarity (each clamped to [-1, 1], norms clamped below at 1e-6); the ratio is
``t = N cos / (1 + (N - 1) cos)`` (0 when the denominator is within 1e-6 of zero, keeping the base there)
and the result ``t * mean_i x_i + (1 - t) * b``.

Parameters: global ``filter_wise`` (default false). Needs a base model and at least two other models.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from evomerge.merging.inputs import MergeInputs
from evomerge.merging.methods.common import check_param_sets, flag

MODEL_PARAMS: dict[str, float] = {}
GLOBAL_PARAMS: dict[str, float] = {"filter_wise": 0.0}
MIN_MODELS = 2


def merge(
    inputs: MergeInputs,
    params: Sequence[Mapping[str, float]],
    global_params: Mapping[str, float],
    seed: int,
) -> torch.Tensor:
    check_param_sets(params, inputs)
    n = inputs.count
    if n < 2:
        raise ValueError(f"model_stock needs at least two models besides the base, got {n}")
    base = inputs.require_base()
    by_row = flag(global_params, "filter_wise") and base.dim() >= 2

    def rows(x: torch.Tensor) -> torch.Tensor:
        return x.reshape(x.shape[0], -1) if by_row else x.reshape(1, -1)

    deltas = [rows(inputs.delta(i)) for i in range(n)]
    norms = [torch.linalg.vector_norm(d, dim=-1) for d in deltas]
    cos_sum = torch.zeros_like(norms[0])
    pairs = 0
    for a in range(n):
        for b in range(a + 1, n):
            dot = (deltas[a] * deltas[b]).sum(dim=-1)
            cos_sum += (dot / (norms[a] * norms[b]).clamp(min=1e-6)).clamp(-1.0, 1.0)
            pairs += 1
    cos = (cos_sum / pairs).unsqueeze(-1)
    denominator = 1.0 + (n - 1) * cos
    singular = denominator.abs() < 1e-6
    ratio = torch.where(singular, torch.zeros_like(cos), n * cos / torch.where(singular, 1.0, denominator))
    mean_delta = torch.zeros_like(deltas[0])
    for d in deltas:
        mean_delta.add_(d)
    mean_delta.div_(n)
    # t * mean(x_i) + (1 - t) * b  ==  b + t * mean(d_i)
    return (rows(base) + ratio * mean_delta).reshape(base.shape)
