"""Helpers shared by merge kernels (pure tensor functions)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from evomerge.merging.inputs import MergeInputs

__all__ = ["flag", "keep_count", "model_values", "trim_to_density"]


def keep_count(numel: int, density: float) -> int:
    """How many entries a density keeps: ``round(density * numel)`` (halves round up), clamped to
    ``[1, numel]``, so a tiny density still keeps the largest entry and density 1 keeps everything."""
    if numel <= 0:
        return 0
    k = int(density * numel + 0.5)
    return max(1, min(numel, k))


def trim_to_density(delta: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the ``keep_count(numel, density)`` largest-magnitude entries of ``delta``, zero the rest.

    The cut-off is the k-th largest magnitude found with ``torch.kthvalue`` (linear-time selection, no
    full sort). Entries whose magnitude equals the cut-off are all kept, so ties at the threshold can keep
    a few more than k entries. Density >= 1 returns ``delta`` itself (no copy).
    """
    n = delta.numel()
    if density >= 1.0 or n == 0:
        return delta
    k = keep_count(n, density)
    if k >= n:
        return delta
    magnitude = delta.abs()
    threshold = torch.kthvalue(magnitude.flatten(), n - k + 1).values
    return torch.where(magnitude >= threshold, delta, torch.zeros_like(delta))


def model_values(params: Sequence[Mapping[str, float]], key: str, inputs: MergeInputs) -> list[float]:
    """``params[i][key]`` for every model, checking there is one parameter set per input model."""
    if len(params) != inputs.count:
        raise ValueError(f"got {len(params)} parameter sets for {inputs.count} models")
    return [float(p[key]) for p in params]


def flag(global_params: Mapping[str, float], key: str) -> bool:
    """A boolean global parameter (stored as 1.0 / 0.0)."""
    return float(global_params[key]) != 0.0
