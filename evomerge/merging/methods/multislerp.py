"""multislerp: barycentric interpolation of several models on a hypersphere.

Each model's tensor (minus the base's, when the recipe has a base model) is flattened to a vector ``v_i``
with norm ``n_i``. With weights ``w_i`` (normalised to sum 1 by default) and unit vectors ``u_i = v_i /
(n_i + eps)``: the weighted mean direction ``m = sum w_i u_i / |sum w_i u_i|``; each ``u_i`` is projected to
the tangent space at ``m`` (``u_i - <u_i, m> m``), the tangents are averaged with the weights into ``s``, and
the result is mapped back with the exponential map, ``m cos|s| + s sin|s| / |s|`` (``|s|`` plus ``eps``),
scaled by ``sum w_i n_i`` (and the base added back). One model: that model's tensor. When the weighted
mean direction vanishes (below ``eps``): for two models their weighted sum, else an error, except where
every vector is zero (every model equals the base, as in layers a LoRA fine-tune did not touch): then
the base (mergekit raises there for three or more models). Computed in
float32, as mergekit does with ``dtype: float32``.

Parameters: per model ``weight`` (default 1); global ``normalize_weights`` (default true) and ``eps``
(default 1e-8). The base model is optional.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from evomerge.merging.inputs import MergeInputs
from evomerge.merging.methods.common import flag, model_values

MODEL_PARAMS: dict[str, float] = {"weight": 1.0}
GLOBAL_PARAMS: dict[str, float] = {"normalize_weights": 1.0, "eps": 1e-8}


def merge(
    inputs: MergeInputs,
    params: Sequence[Mapping[str, float]],
    global_params: Mapping[str, float],
    seed: int,
) -> torch.Tensor:
    weights_list = model_values(params, "weight", inputs)
    if inputs.count == 1:
        return inputs.expert(0).clone()
    eps = float(global_params["eps"])
    has_base = inputs.base is not None
    vectors = [inputs.delta(i) if has_base else inputs.expert(i) for i in range(inputs.count)]
    shape = vectors[0].shape
    flat = torch.stack([v.reshape(-1) for v in vectors]).float()
    weights = torch.tensor(weights_list, dtype=torch.float32, device=flat.device)
    if flag(global_params, "normalize_weights"):
        weights = weights / weights.sum()
    norms = torch.linalg.vector_norm(flat, dim=-1, keepdim=True)
    units = flat / (norms + eps)
    mean = (units * weights.view(-1, 1)).sum(0)
    mean_norm = torch.linalg.vector_norm(mean)
    if bool((norms < eps).all()):
        # every model equals the base here (e.g. a layer no expert's fine-tune touched): the base. mergekit
        # raises for three or more such models; that would fail every merge of partial fine-tunes.
        result = torch.zeros(shape, dtype=torch.float32, device=flat.device)
    elif mean_norm < eps:
        if inputs.count != 2:
            raise ValueError(
                "multislerp: the weighted sum of the models' directions is zero (antipodal tensors with "
                "balancing weights); use other weights"
            )
        result = (flat[0] * weights[0] + flat[1] * weights[1]).view(shape)
    else:
        mean = mean / mean_norm
        dots = (units * mean).sum(-1, keepdim=True)
        tangent = ((units - dots * mean) * weights.view(-1, 1)).sum(0)
        tangent_norm = torch.linalg.vector_norm(tangent) + eps
        result = mean * torch.cos(tangent_norm) + tangent * (torch.sin(tangent_norm) / tangent_norm)
        result = (result * (norms.squeeze(-1) * weights).sum()).view(shape)
    if has_base:
        result = result + inputs.require_base()
    return result
