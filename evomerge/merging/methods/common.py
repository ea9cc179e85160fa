"""Helpers shared by merge kernels: sparsifiers, rescaling, seeded masks and the task-vector combiner.

Everything here is a pure function of tensors and scalars. Semantics follow mergekit's documented and
observed behaviour so that a recipe means the same in both tools (see docs/architecture.md, "Merge
methods"): ``k = int(density * numel)`` entries kept (at least one for a positive density), rescaling
keeps the L1 norm of the task vector, sign election counts a zero sum as positive.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from typing import Literal

import torch

from evomerge.merging.inputs import MergeInputs, divisor_or_one

__all__ = [
    "Sparsifier",
    "check_param_sets",
    "combine",
    "della_keep_probabilities",
    "flag",
    "keep_count",
    "magnitude_outliers",
    "model_generator",
    "model_values",
    "random_keep",
    "rescale_l1",
    "task_vector_merge",
    "trim_to_density",
]

RESCALE_EPS = 1e-7
"""Below this L1 norm (before or after masking) a masked task vector is not rescaled."""


def keep_count(numel: int, density: float) -> int:
    """How many entries a density keeps: ``int(density * numel)`` (floored, as mergekit does), at least 1
    for a non-empty tensor, everything for density >= 1."""
    if numel <= 0:
        return 0
    if density >= 1.0:
        return numel
    return max(1, min(numel, int(density * numel)))


def _kth_smallest(values: torch.Tensor, k: int) -> torch.Tensor:
    """The k-th smallest entry (1-based) of a flat tensor: linear-time selection, no full sort."""
    return torch.kthvalue(values, k).values


def trim_to_density(delta: torch.Tensor, density: float) -> torch.Tensor:
    """Keep exactly the ``keep_count(numel, density)`` largest-magnitude entries of ``delta``, zero the rest.

    The cut-off is the k-th largest magnitude found with ``torch.kthvalue`` (selection, no full sort).
    When several entries tie at the cut-off (common for task vectors of bf16 checkpoints), the ones that
    come first in storage order are kept, which is what a stable descending sort (mergekit's) keeps.
    Density >= 1 returns ``delta`` itself.
    """
    n = delta.numel()
    k = keep_count(n, density)
    if k >= n:
        return delta
    magnitude = delta.abs()
    threshold = _kth_smallest(magnitude.flatten(), n - k + 1)
    keep = magnitude >= threshold
    excess = int(keep.sum()) - k
    if excess > 0:  # ties at the threshold: keep only the first `needed` of them
        at = (magnitude == threshold).flatten()
        needed = int(at.sum()) - excess
        first = at & (torch.cumsum(at, dim=0) <= needed)
        keep = (magnitude > threshold) | first.reshape(delta.shape)
    return torch.where(keep, delta, 0.0)


def magnitude_outliers(delta: torch.Tensor, density: float, gamma: float) -> torch.Tensor:
    """Model Breadcrumbs: drop the largest ``int(gamma * numel)`` entries by magnitude and the smallest
    ones so that ``int(density * numel)`` remain (the outlier cut shrinks when both do not fit).

    With magnitudes sorted ascending, ranks ``[n_bot, n_bot + k)`` are kept, where
    ``n_bot = max(0, numel - k - int(gamma * numel))``; found with two ``kthvalue`` selections.
    """
    if density >= 1.0:
        return delta
    n = delta.numel()
    k = int(density * n)
    if k <= 0 or n == 0:
        return torch.zeros_like(delta)
    n_bot = max(0, n - k - int(gamma * n))
    magnitude = delta.abs()
    flat = magnitude.flatten()
    low = _kth_smallest(flat, n_bot + 1)
    high = _kth_smallest(flat, n_bot + k)
    keep = (magnitude >= low) & (magnitude <= high)
    return torch.where(keep, delta, 0.0)


def rescale_l1(original: torch.Tensor, masked: torch.Tensor) -> torch.Tensor:
    """``masked`` scaled so its L1 norm equals ``original``'s (unchanged when either norm is ~0)."""
    before = float(original.abs().sum())
    after = float(masked.abs().sum())
    if before < RESCALE_EPS or after < RESCALE_EPS:
        return masked
    return masked * (before / after)


def model_generator(seed: int, model_index: int) -> torch.Generator:
    """A CPU generator for model ``model_index`` of one tensor: depends only on the per-tensor ``seed`` and
    the model's position in the recipe, never on execution order, device or parallelism."""
    digest = hashlib.sha256(f"{seed}:{model_index}".encode()).digest()
    generator = torch.Generator(device="cpu")
    generator.manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))
    return generator


def _uniform_like(reference: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Uniform [0, 1) noise with ``reference``'s shape, drawn on CPU (so the same on every device)."""
    noise = torch.rand(reference.shape, generator=generator, dtype=torch.float32)
    return noise.to(reference.device)


def random_keep(delta: torch.Tensor, density: float, generator: torch.Generator) -> torch.Tensor:
    """DARE's drop: keep each entry independently with probability ``density`` (no rescaling here)."""
    if density >= 1.0:
        return delta
    keep = _uniform_like(delta, generator) < density
    return torch.where(keep, delta, 0.0)


def della_keep_probabilities(delta: torch.Tensor, density: float, epsilon: float) -> torch.Tensor:
    """DELLA's MagPrune keep probabilities, row by row (a 1-D tensor is one row; more dimensions are
    flattened to ``[shape[0], -1]``): entries ranked by magnitude within their row get probabilities spread
    linearly over ``[density - epsilon, density + epsilon]``, the largest magnitude the highest.

    Raises ValueError unless ``0 < density - epsilon`` and ``density + epsilon < 1``.
    """
    if not (density - epsilon > 0.0 and density + epsilon < 1.0):
        raise ValueError(
            f"della needs 0 < density - epsilon and density + epsilon < 1, got density {density:g} and "
            f"epsilon {epsilon:g}"
        )
    rows = delta.reshape(1, -1) if delta.dim() < 2 else delta.reshape(delta.shape[0], -1)
    cols = rows.shape[1]
    if cols <= 1:
        return torch.full_like(delta, density, dtype=torch.float32)
    order = torch.argsort(rows.abs(), dim=1)  # one sort; ranks are its inverse permutation
    ranks = torch.empty_like(rows, dtype=torch.float32)
    positions = torch.arange(cols, device=rows.device, dtype=torch.float32).expand_as(ranks)
    ranks.scatter_(1, order, positions)
    probabilities = ranks.mul_(2.0 * epsilon / (cols - 1)).add_(density - epsilon)
    return probabilities.reshape(delta.shape)


def combine(
    base: torch.Tensor,
    weighted: Sequence[torch.Tensor],
    weights: Sequence[float],
    *,
    consensus: bool,
    normalize: bool,
    lam: float,
) -> torch.Tensor:
    """``b + lambda * merged`` from weighted task vectors ``w_i d_i'`` (already sparsified).

    Without ``consensus``: ``merged = sum_i w_i d_i'``, divided by ``sum_i w_i`` when ``normalize`` (a sum
    below 1e-8 in magnitude divides by 1). With ``consensus`` (TIES sign election): the elected sign per
    entry is that of ``sum_i w_i d_i'`` (zero counts as +); ``m_i`` is 1 where ``w_i d_i'`` is non-zero and
    has the elected sign; ``merged = sum_i m_i w_i d_i'``, divided by ``sum_i w_i m_i`` when ``normalize``
    (a zero divisor becomes 1).
    """
    if not consensus:
        merged = torch.zeros_like(base, dtype=torch.float32)
        for wd in weighted:
            merged.add_(wd)
        if normalize:
            total = float(sum(weights))
            if abs(total) >= 1e-8:
                merged.div_(total)
        return torch.add(base, merged, alpha=lam)

    total_t = torch.zeros_like(base, dtype=torch.float32)
    for wd in weighted:
        total_t.add_(wd)
    elected_positive = total_t >= 0
    del total_t
    merged = torch.zeros_like(base, dtype=torch.float32)
    divisor = torch.zeros_like(base, dtype=torch.float32) if normalize else None
    for w, wd in zip(weights, weighted, strict=True):
        agree = torch.where(elected_positive, wd > 0, wd < 0)
        merged.add_(torch.where(agree, wd, 0.0))
        if divisor is not None and w != 0.0:
            divisor.add_(agree.to(torch.float32), alpha=w)
    if divisor is not None:
        merged.div_(divisor_or_one(divisor))
    return torch.add(base, merged, alpha=lam)


def check_param_sets(params: Sequence[Mapping[str, float]], inputs: MergeInputs) -> None:
    """ValueError unless there is one parameter set per input model."""
    if len(params) != inputs.count:
        raise ValueError(f"got {len(params)} parameter sets for {inputs.count} models")


def model_values(params: Sequence[Mapping[str, float]], key: str, inputs: MergeInputs) -> list[float]:
    """``params[i][key]`` for every model, checking there is one parameter set per input model."""
    check_param_sets(params, inputs)
    return [float(p[key]) for p in params]


def flag(global_params: Mapping[str, float], key: str) -> bool:
    """A boolean global parameter (stored as 1.0 / 0.0)."""
    return float(global_params[key]) != 0.0


Sparsifier = Literal["none", "magnitude", "random", "outliers", "della"]
"""How each task vector is thinned before combining (task arithmetic, TIES, DARE, Breadcrumbs, DELLA)."""


def sparsify(
    delta: torch.Tensor, how: Sparsifier, model_params: Mapping[str, float], generator_seed: tuple[int, int]
) -> torch.Tensor:
    """One task vector thinned by ``how`` with this model's ``density`` (and ``gamma`` / ``epsilon``)."""
    if how == "none":
        return delta
    density = float(model_params["density"])
    if density >= 1.0:
        return delta
    if how == "magnitude":
        return trim_to_density(delta, density)
    if how == "outliers":
        return magnitude_outliers(delta, density, float(model_params["gamma"]))
    generator = model_generator(*generator_seed)
    if how == "random":
        return random_keep(delta, density, generator)
    probabilities = della_keep_probabilities(delta, density, float(model_params["epsilon"]))
    keep = _uniform_like(delta, generator) < probabilities
    return torch.where(keep, delta, 0.0)


def task_vector_merge(
    inputs: MergeInputs,
    params: Sequence[Mapping[str, float]],
    global_params: Mapping[str, float],
    seed: int,
    *,
    how: Sparsifier,
    consensus: bool,
) -> torch.Tensor:
    """The task-vector family: thin each ``d_i`` (:func:`sparsify`), optionally rescale it to its original
    L1 norm (global ``rescale``), weight it by ``w_i`` and :func:`combine` (global ``lambda`` and
    ``normalize``). Random masks use :func:`model_generator` ``(seed, i)``."""
    base = inputs.require_base()
    weights = model_values(params, "weight", inputs)
    rescale = flag(global_params, "rescale") if "rescale" in global_params else False
    weighted: list[torch.Tensor] = []
    for i, w in enumerate(weights):
        delta = inputs.delta(i)
        thinned = sparsify(delta, how, params[i], (seed, i))
        if rescale and thinned is not delta:
            thinned = rescale_l1(delta, thinned)
        weighted.append(thinned * w)
    return combine(
        base,
        weighted,
        weights,
        consensus=consensus,
        normalize=flag(global_params, "normalize"),
        lam=float(global_params["lambda"]),
    )
