"""rsaf (Rate-Skewness Adaptive Fusion): TIES with a keep ratio chosen per tensor and per model.

The InfiFusion paper adapts the top-K keep ratio of each task vector from its update rate and the skewness
of its magnitudes, but its exact formula could not be verified, so evomerge uses this documented rule:

* update rate ``r_i = ||d_i||_2 / ||b||_2`` (``||b||`` below 1e-12 counts as 1), and ``r_bar`` the geometric
  mean of the ``r_i`` over the models merged for this tensor;
* skewness ``s_i`` of the magnitudes ``|d_i|`` (third standardised moment; 0 when they are constant);
  ``S0 = 0.995`` is the skewness of a half-normal, i.e. of a task vector with Gaussian entries;
* keep ratio ``k_i = clamp(density_i * (1 + rate_gain * tanh(ln(r_i / r_bar))) * (S0 / max(s_i, 0.05))
  ** skew_gain, min_density, 1)``.

So a model that changed this tensor more than the others keeps more of it (at most ``1 + rate_gain``
times), and a heavy-tailed task vector, whose information sits in few large entries, keeps fewer entries
than a Gaussian-like one. Each ``d_i`` is then trimmed to its top ``k_i`` by magnitude and merged with TIES'
sign election and disjoint mean: ``b + lambda * sum_i w_i m_i d_i' / sum_i w_i m_i``.

Parameters: per model ``weight`` (1) and ``density`` (0.5); global ``lambda`` (1), ``normalize`` (true),
``rate_gain`` (0.5), ``skew_gain`` (0.5) and ``min_density`` (0.01). With both gains 0, rsaf is ties.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch

from evomerge.merging.inputs import MergeInputs
from evomerge.merging.methods.common import combine, flag, model_values, trim_to_density

MODEL_PARAMS: dict[str, float] = {"weight": 1.0, "density": 0.5}
GLOBAL_PARAMS: dict[str, float] = {
    "lambda": 1.0,
    "normalize": 1.0,
    "rate_gain": 0.5,
    "skew_gain": 0.5,
    "min_density": 0.01,
}

HALF_NORMAL_SKEWNESS = 0.995


def magnitude_skewness(delta: torch.Tensor) -> float:
    """Skewness (third standardised moment) of ``|delta|``; 0 when the magnitudes are constant."""
    magnitude = delta.abs().flatten().double()
    centred = magnitude - magnitude.mean()
    variance = float(centred.square().mean())
    if variance <= 0.0:
        return 0.0
    return float(centred.pow(3).mean()) / float(variance**1.5)


def keep_ratios(
    rates: Sequence[float],
    skews: Sequence[float],
    densities: Sequence[float],
    *,
    rate_gain: float,
    skew_gain: float,
    min_density: float,
) -> list[float]:
    """The per-model keep ratios of the rule in this module's docstring."""
    positive = [r for r in rates if r > 0.0]
    log_mean = sum(math.log(r) for r in positive) / len(positive) if positive else 0.0
    ratios: list[float] = []
    for rate, skew, density in zip(rates, skews, densities, strict=True):
        rate_term = math.tanh(math.log(rate) - log_mean) if rate > 0.0 else -1.0
        factor = (1.0 + rate_gain * rate_term) * (HALF_NORMAL_SKEWNESS / max(skew, 0.05)) ** skew_gain
        ratios.append(min(1.0, max(min_density, density * factor)))
    return ratios


def merge(
    inputs: MergeInputs,
    params: Sequence[Mapping[str, float]],
    global_params: Mapping[str, float],
    seed: int,
) -> torch.Tensor:
    base = inputs.require_base()
    weights = model_values(params, "weight", inputs)
    densities = model_values(params, "density", inputs)
    base_norm = float(torch.linalg.vector_norm(base))
    base_norm = base_norm if base_norm > 1e-12 else 1.0
    deltas = [inputs.delta(i) for i in range(inputs.count)]
    rates = [float(torch.linalg.vector_norm(d)) / base_norm for d in deltas]
    skews = [magnitude_skewness(d) for d in deltas]
    ratios = keep_ratios(
        rates,
        skews,
        densities,
        rate_gain=float(global_params["rate_gain"]),
        skew_gain=float(global_params["skew_gain"]),
        min_density=float(global_params["min_density"]),
    )
    weighted = [trim_to_density(d, k) * w for d, k, w in zip(deltas, ratios, weights, strict=True)]
    return combine(
        base,
        weighted,
        weights,
        consensus=True,
        normalize=flag(global_params, "normalize"),
        lam=float(global_params["lambda"]),
    )
