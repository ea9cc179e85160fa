"""linear (model soup): ``sum_i w_i x_i / sum_i w_i``; no base model needed.

Parameters: per model ``weight`` (default 1); global ``normalize`` (default true; false gives
``sum_i w_i x_i``). A zero weight sum divides by 1.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from evomerge.merging.inputs import MergeInputs
from evomerge.merging.methods.common import flag, model_values

MODEL_PARAMS: dict[str, float] = {"weight": 1.0}
GLOBAL_PARAMS: dict[str, float] = {"normalize": 1.0}


def merge(
    inputs: MergeInputs,
    params: Sequence[Mapping[str, float]],
    global_params: Mapping[str, float],
    seed: int,
) -> torch.Tensor:
    weights = model_values(params, "weight", inputs)
    acc = torch.zeros_like(inputs.reference, dtype=torch.float32)
    if flag(global_params, "normalize"):
        total = sum(weights)
        if total != 0.0:  # normalise the weights first: a one-hot weighting is then exact
            weights = [w / total for w in weights]
    for i, w in enumerate(weights):
        if w != 0.0:
            acc.add_(inputs.expert(i), alpha=w)
    return acc
