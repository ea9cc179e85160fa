"""slerp: spherical linear interpolation between the base tensor and one other model's, by factor ``t``.

The two tensors are treated as whole vectors: with ``cos = <b/|b|, x/|x|>`` (a norm below 1e-8 counts as
1), ``theta = acos(cos)``, the result is ``sin((1-t) theta)/sin(theta) * b + sin(t theta)/sin(theta) * x``;
when ``|cos| > 0.9995`` it falls back to ``(1-t) b + t x``. Computed in float32. ``t = 0`` gives the base,
``t = 1`` the other model; ``t`` is usually a per-layer list with filters, e.g. ``self_attn`` and ``mlp``.

Parameters: global ``t`` (default 0.5). Needs a base model and exactly one other model.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch

from evomerge.merging.inputs import MergeInputs
from evomerge.merging.methods.common import check_model_count, check_param_sets

MODEL_PARAMS: dict[str, float] = {}
GLOBAL_PARAMS: dict[str, float] = {"t": 0.5}
MIN_MODELS = 1
MAX_MODELS = 1

DOT_THRESHOLD = 0.9995
NORM_EPS = 1e-8


def merge(
    inputs: MergeInputs,
    params: Sequence[Mapping[str, float]],
    global_params: Mapping[str, float],
    seed: int,
) -> torch.Tensor:
    check_param_sets(params, inputs)
    check_model_count(inputs, "slerp", 1)
    t = float(global_params["t"])
    v0 = inputs.require_base()
    v1 = inputs.expert(0)
    norm0 = float(torch.linalg.vector_norm(v0))
    norm1 = float(torch.linalg.vector_norm(v1))
    norm0 = norm0 if norm0 > NORM_EPS else 1.0
    norm1 = norm1 if norm1 > NORM_EPS else 1.0
    dot = float(torch.dot(v0.flatten(), v1.flatten())) / (norm0 * norm1)
    dot = max(-1.0, min(1.0, dot))
    if abs(dot) > DOT_THRESHOLD:
        coef0, coef1 = 1.0 - t, t
    else:
        theta = math.acos(dot)
        sin_theta = math.sin(theta)
        coef0 = math.sin((1.0 - t) * theta) / sin_theta
        coef1 = math.sin(t * theta) / sin_theta
    return torch.add(v0 * coef0, v1, alpha=coef1)
