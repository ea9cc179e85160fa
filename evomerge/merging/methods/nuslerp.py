"""nuslerp: spherical interpolation between exactly two models, of their task vectors when there is a base.

``t = w_2 / (w_1 + w_2)`` from the two models' weights (0.5 when they sum to about zero). With a base
model the two task vectors are interpolated and the base added back; without, the two tensors. By
default the tensors are flattened into one vector each (``nuslerp_flatten``); with ``nuslerp_flatten:
false`` each row is interpolated on its own (each column with ``nuslerp_row_wise: true``). Per vector
pair: unit vectors (norms clamped at 1e-7), ``theta = acos(cos)``, and ``(sin((1-t) theta) v0 + sin(t
theta) v1) / sin(theta)``, linear where the pair is colinear (``1 - cos^2 <= 1e-16``). Computed in float32.

Parameters: per model ``weight`` (default 1); global ``nuslerp_flatten`` (default true) and
``nuslerp_row_wise`` (default false). The base model is optional; exactly two other models.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from evomerge.merging.inputs import MergeInputs
from evomerge.merging.methods.common import check_model_count, flag, model_values

MODEL_PARAMS: dict[str, float] = {"weight": 1.0}
GLOBAL_PARAMS: dict[str, float] = {"nuslerp_flatten": 1.0, "nuslerp_row_wise": 0.0}
MIN_MODELS = 2
MAX_MODELS = 2

NORM_CLAMP = 1e-7
COLINEAR_EPS = 1e-8


def _slerp(t: float, v0: torch.Tensor, v1: torch.Tensor) -> torch.Tensor:
    """Row by row along the last dimension."""
    u0 = v0 / torch.linalg.vector_norm(v0, dim=-1, keepdim=True).clamp(min=NORM_CLAMP)
    u1 = v1 / torch.linalg.vector_norm(v1, dim=-1, keepdim=True).clamp(min=NORM_CLAMP)
    cos = (u0 * u1).sum(-1, keepdim=True).clamp(-1.0, 1.0)
    colinear = (1 - cos.square()) <= COLINEAR_EPS**2
    theta = torch.acos(torch.where(colinear, torch.zeros_like(cos), cos))
    spherical = (torch.sin((1 - t) * theta) * v0 + torch.sin(t * theta) * v1) / torch.sin(theta)
    return torch.where(colinear, (1 - t) * v0 + t * v1, spherical)


def merge(
    inputs: MergeInputs,
    params: Sequence[Mapping[str, float]],
    global_params: Mapping[str, float],
    seed: int,
) -> torch.Tensor:
    weights = model_values(params, "weight", inputs)
    check_model_count(inputs, "nuslerp", 2)
    total = sum(weights)
    t = 0.5 if abs(total) < 1e-6 else weights[1] / total
    has_base = inputs.base is not None
    v0, v1 = (inputs.delta(i) if has_base else inputs.expert(i) for i in range(2))
    shape = v0.shape
    if flag(global_params, "nuslerp_flatten"):
        out = _slerp(t, v0.reshape(-1), v1.reshape(-1))
    elif flag(global_params, "nuslerp_row_wise") and v0.dim() > 1:
        out = _slerp(t, v0.transpose(0, -1), v1.transpose(0, -1)).transpose(0, -1)
    else:
        out = _slerp(t, v0, v1)
    out = out.reshape(shape)
    return out + inputs.require_base() if has_base else out
