"""nearswap: take the other model's value where it is near the base's, keep the base's elsewhere.

Per element, with ``a`` the base and ``b`` the one other model: ``w = clamp(t / max(|a - b|, 1e-6), 0, 1)``
and the result is ``w * b + (1 - w) * a``. Elements closer than ``t`` are swapped to ``b`` outright; far
apart ones move towards ``b`` by ``t / |a - b|``. Computed in float32.

Parameters: global ``t`` (the distance scale; mergekit requires it, evomerge defaults to 0.0001, the value
of the method's reference merge; within [0, 1] like every ``t``). Needs a base model and exactly one other
model.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from evomerge.merging.inputs import MergeInputs
from evomerge.merging.methods.common import check_model_count, check_param_sets

MODEL_PARAMS: dict[str, float] = {}
GLOBAL_PARAMS: dict[str, float] = {"t": 0.0001}
MIN_MODELS = 1
MAX_MODELS = 1

MIN_DISTANCE = 1e-6


def merge(
    inputs: MergeInputs,
    params: Sequence[Mapping[str, float]],
    global_params: Mapping[str, float],
    seed: int,
) -> torch.Tensor:
    check_param_sets(params, inputs)
    check_model_count(inputs, "nearswap", 1)
    t = float(global_params["t"])
    a = inputs.require_base()
    diff = inputs.delta(0)  # b - a
    w = (t / diff.abs().clamp(min=MIN_DISTANCE)).clamp(min=0.0, max=1.0)
    return torch.addcmul(a, w, diff)  # a + w (b - a) = w b + (1 - w) a
