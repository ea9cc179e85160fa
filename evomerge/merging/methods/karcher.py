"""karcher: the weighted Karcher (Riemannian) mean of the models' tensors on the unit hypersphere.

Every model takes part with weight 1/N, the base model too when the recipe has one (as in mergekit,
whose karcher averages all its inputs; task vectors are not used). Each tensor is split into its norm
and direction; directions of norm above ``tol`` are averaged on the sphere: start at their normalised
mean (the first direction when that mean is below ``tol``), then up to ``max_iter`` times step along the
weighted mean of the log maps ``theta / sin(theta) (u - cos(theta) m)`` by the exponential map, stopping
when the step's norm is below ``tol``. The result is that direction times ``sum_i n_i / N``. Computed in
float32.

Parameters: global ``max_iter`` (default 10) and ``tol`` (default 1e-5). The base model is optional.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch

from evomerge.merging.inputs import MergeInputs
from evomerge.merging.methods.common import check_param_sets

MODEL_PARAMS: dict[str, float] = {}
GLOBAL_PARAMS: dict[str, float] = {"max_iter": 10.0, "tol": 1e-5}


def karcher_mean(tensors: Sequence[torch.Tensor], max_iter: int, tol: float) -> torch.Tensor:
    n = len(tensors)
    if n == 1:
        return tensors[0].clone()
    norms = [float(torch.linalg.vector_norm(x)) for x in tensors]
    alphas = [1.0 / n] * n
    valid = [i for i, norm in enumerate(norms) if norm > tol]
    if not valid:
        return torch.zeros_like(tensors[0])
    total = sum(alphas[i] for i in valid)
    weights = [alphas[i] / total for i in valid]
    units = [tensors[i] / norms[i] for i in valid]
    mean = torch.zeros_like(units[0])
    for w, u in zip(weights, units, strict=True):
        mean += w * u
    mean_norm = float(torch.linalg.vector_norm(mean))
    mean = units[0].clone() if mean_norm < tol else mean / mean_norm
    for _ in range(max_iter):
        tangent = torch.zeros_like(mean)
        for w, u in zip(weights, units, strict=True):
            dot = torch.clamp(torch.dot(mean.flatten(), u.flatten()), -1.0, 1.0)
            theta = torch.arccos(dot)
            if float(theta) < tol:
                continue
            tangent += w * (theta / torch.sin(theta)) * (u - dot * mean)
        step = float(torch.linalg.vector_norm(tangent))
        if step < tol:
            break
        mean = math.cos(step) * mean + math.sin(step) * (tangent / step)
        unit_norm = float(torch.linalg.vector_norm(mean))
        if unit_norm > tol:
            mean = mean / unit_norm
    return mean * sum(a * norm for a, norm in zip(alphas, norms, strict=True))


def merge(
    inputs: MergeInputs,
    params: Sequence[Mapping[str, float]],
    global_params: Mapping[str, float],
    seed: int,
) -> torch.Tensor:
    check_param_sets(params, inputs)
    max_iter = int(global_params["max_iter"])
    tol = float(global_params["tol"])
    tensors = [inputs.expert(i) for i in range(inputs.count)]
    if inputs.base is not None:
        tensors = [inputs.base, *tensors]
    return karcher_mean([t.float() for t in tensors], max_iter, tol)
