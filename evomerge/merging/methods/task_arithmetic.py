"""task_arithmetic: ``b + lambda * sum_i w_i d_i`` with task vectors ``d_i = x_i - b``.

Parameters: per model ``weight`` (default 1); global ``lambda`` (default 1) and ``normalize`` (default
false; true divides the weighted sum by ``sum_i w_i``, a zero sum by 1); ``int8_mask`` is accepted for
mergekit recipes and has no effect.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from evomerge.merging.inputs import MergeInputs
from evomerge.merging.methods.common import flag, model_values

MODEL_PARAMS: dict[str, float] = {"weight": 1.0}
GLOBAL_PARAMS: dict[str, float] = {"lambda": 1.0, "normalize": 0.0, "int8_mask": 0.0}


def merge(
    inputs: MergeInputs,
    params: Sequence[Mapping[str, float]],
    global_params: Mapping[str, float],
    seed: int,
) -> torch.Tensor:
    base = inputs.require_base()
    weights = model_values(params, "weight", inputs)
    acc = torch.zeros_like(base, dtype=torch.float32)
    if flag(global_params, "normalize"):
        total = sum(weights)
        if total != 0.0:  # normalise the weights first: a one-hot weighting is then exact
            weights = [w / total for w in weights]
    for i, w in enumerate(weights):
        if w != 0.0:
            acc.add_(inputs.delta(i), alpha=w)
    return torch.add(base, acc, alpha=float(global_params["lambda"]))
