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

from evomerge.merging.inputs import Kernel, MergeInputs, divisor_or_one

__all__ = [
    "Sparsifier",
    "check_param_sets",
    "combine",
    "della_keep_probabilities",
    "flag",
    "keep_count",
    "l1_ratio",
    "magnitude_outliers",
    "model_generator",
    "model_values",
    "random_keep",
    "rescale_l1",
    "task_vector_kernel",
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


_RADIX_MIN = 1 << 16
"""Below this many entries a plain ``kthvalue`` is as fast as the radix pre-selection."""


def _kth_largest(values: torch.Tensor, k: int) -> torch.Tensor:
    """The k-th largest (1-based) entry of a flat, non-negative tensor, exactly, without a full sort."""
    return _select(values, k)[0]


def _select(values: torch.Tensor, k: int) -> tuple[torch.Tensor, int, torch.Tensor | None]:
    """``(threshold, greater, tied)`` for the k-th largest entry of a flat, non-negative tensor: the
    threshold value, how many entries are strictly greater, and the sorted positions of the entries equal
    to it (None when not computed: small tensors).

    For large float32 inputs, a radix pre-selection narrows the search: non-negative floats order like
    their bit patterns, so one ``bincount`` of the top 16 bits finds the bucket holding the k-th largest,
    and ``kthvalue`` then runs only on that bucket's entries (several times faster than ``kthvalue`` on
    the whole tensor, which is single-threaded).
    """
    n = values.numel()
    if n < _RADIX_MIN or values.dtype != torch.float32:
        threshold = torch.kthvalue(values, n - k + 1).values
        return threshold, -1, None
    high = values.view(torch.int32) >> 16  # the sign bit is 0: buckets 0..32767 in value order
    counts = torch.bincount(high, minlength=1 << 15)
    at_or_above = counts.flip(0).cumsum(0).flip(0)  # at_or_above[j]: entries in buckets >= j
    bucket = int(torch.nonzero(at_or_above >= k)[-1])
    above = int(at_or_above[bucket + 1]) if bucket + 1 < at_or_above.numel() else 0
    positions = torch.nonzero(high == bucket).squeeze(1)  # ascending
    candidates = values[positions]
    rank = k - above  # rank-th largest inside the bucket
    threshold = torch.kthvalue(candidates, candidates.numel() - rank + 1).values
    greater = above + int((candidates > threshold).sum())
    return threshold, greater, positions[candidates == threshold]


def _kth_smallest(values: torch.Tensor, k: int) -> torch.Tensor:
    """The k-th smallest entry (1-based) of a flat, non-negative tensor."""
    return _kth_largest(values, values.numel() - k + 1)


def trim_to_density(delta: torch.Tensor, density: float) -> torch.Tensor:
    """Keep exactly the ``keep_count(numel, density)`` largest-magnitude entries of ``delta``, zero the rest.

    The cut-off is the k-th largest magnitude (:func:`_select`: selection, no full sort). When several
    entries tie at the cut-off (common for task vectors of bf16 checkpoints), the ones that come first in
    storage order are kept. Returns a new tensor, or ``delta`` itself when density >= 1.
    """
    n = delta.numel()
    k = keep_count(n, density)
    if k >= n:
        return delta
    magnitude = delta.abs()
    flat = magnitude.view(-1)
    threshold, greater, tied = _select(flat, k)
    if tied is None:  # small tensor: count and locate ties directly
        greater = int((flat > threshold).sum())
        tied = torch.nonzero(flat == threshold).squeeze(1)
    needed = k - greater
    if needed >= tied.numel():
        keep = magnitude >= threshold
    else:  # more entries equal the threshold than fit: the first `needed` of them in storage order
        keep = magnitude > threshold
        keep.view(-1)[tied[:needed]] = True
    return delta * keep  # a multiply by the bool mask: 2.5x faster than torch.where


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
    return delta * keep  # a multiply by the bool mask: 2.5x faster than torch.where


def l1_ratio(original: torch.Tensor, masked: torch.Tensor) -> float:
    """The factor that gives ``masked`` the L1 norm of ``original`` (1 when either norm is ~0)."""
    before = float(original.abs().sum())
    after = float(masked.abs().sum())
    if before < RESCALE_EPS or after < RESCALE_EPS:
        return 1.0
    return before / after


def rescale_l1(original: torch.Tensor, masked: torch.Tensor) -> torch.Tensor:
    """``masked`` scaled in place so its L1 norm equals ``original``'s (unchanged when either norm is ~0).
    ``masked`` must be the caller's own tensor."""
    return masked.mul_(l1_ratio(original, masked))


def model_generator(seed: int, model_index: int) -> torch.Generator:
    """A CPU generator for model ``model_index`` of one tensor: depends only on the per-tensor ``seed`` and
    the model's position in the recipe, never on execution order, device or parallelism."""
    digest = hashlib.sha256(f"{seed}:{model_index}".encode()).digest()
    generator = torch.Generator(device="cpu")
    generator.manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))
    return generator


_LANE_SCALE = 65536.0
_LANE_OFFSET = 32768.0


def _random_lanes(reference: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Uniform 16-bit integers (int16, ``[-32768, 32767]``) with ``reference``'s shape, drawn on CPU (so
    the same on every device): each full-range 64-bit draw is split into four lanes, several times faster
    than drawing floats."""
    n = reference.numel()
    words = torch.empty((n + 3) // 4, dtype=torch.int64).random_(-(2**63), None, generator=generator)
    lanes = words.view(torch.int16)[:n]
    return lanes.reshape(reference.shape).to(reference.device)


def _lane_threshold(probability: float) -> float:
    """Lanes below this value occur with the given probability (quantised to 1/65536)."""
    return round(probability * _LANE_SCALE) - _LANE_OFFSET


def random_keep(delta: torch.Tensor, density: float, generator: torch.Generator) -> torch.Tensor:
    """DARE's drop: keep each entry independently with probability ``density`` (quantised to 1/65536;
    no rescaling here)."""
    if density >= 1.0:
        return delta
    keep = _random_lanes(delta, generator) < _lane_threshold(density)
    return delta * keep  # a multiply by the bool mask: 2.5x faster than torch.where


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
    """``b + lambda * merged`` from weighted task vectors ``w_i d_i'`` (already sparsified). The tensors in
    ``weighted`` are consumed: they must be the caller's own, and are overwritten.

    Without ``consensus``: ``merged = sum_i w_i d_i'``, divided by ``sum_i w_i`` when ``normalize`` (a sum
    below 1e-8 in magnitude divides by 1). With ``consensus`` (TIES sign election): the elected sign ``s``
    per entry is that of ``sum_i w_i d_i'`` (zero counts as +); ``m_i`` is 1 where ``w_i d_i'`` is non-zero
    and has the elected sign; ``merged = sum_i m_i w_i d_i'``, divided by ``sum_i w_i m_i`` when
    ``normalize`` (a zero divisor becomes 1). Computed in place as ``s * sum_i max(s w_i d_i', 0)``, which
    is exactly that sum (multiplying by +-1 is exact).
    """
    if not consensus:
        summed = weighted[0]
        for wd in weighted[1:]:
            summed.add_(wd)
        if normalize:
            total = float(sum(weights))
            if abs(total) >= 1e-8:
                summed.div_(total)
        return _add_base(base, summed, lam)

    sign = torch.add(weighted[0], weighted[1]) if len(weighted) > 1 else weighted[0].clone()
    for wd in weighted[2:]:
        sign.add_(wd)
    sign = sign.ge_(0).mul_(2).sub_(1)  # +1 where the sum is >= 0, else -1
    merged: torch.Tensor | None = None
    divisor = torch.zeros_like(base, dtype=torch.float32) if normalize else None
    for w, wd in zip(weights, weighted, strict=True):
        aligned = wd.mul_(sign)  # > 0 exactly where w_i d_i' is non-zero with the elected sign
        if divisor is not None and w != 0.0:
            divisor.add_(aligned > 0, alpha=w)
        aligned.clamp_(min=0.0)
        merged = aligned if merged is None else merged.add_(aligned)
    assert merged is not None
    merged.mul_(sign)
    if divisor is not None:
        merged.div_(divisor_or_one(divisor))
    return _add_base(base, merged, lam)


def _add_base(base: torch.Tensor, merged: torch.Tensor, lam: float) -> torch.Tensor:
    """``b + lambda * merged``, in place in ``merged`` (the caller's own), multiplying first as mergekit
    does."""
    if lam != 1.0:
        merged.mul_(lam)
    return merged.add_(base)


def check_param_sets(params: Sequence[Mapping[str, float]], inputs: MergeInputs) -> None:
    """ValueError unless there is one parameter set per input model."""
    if len(params) != inputs.count:
        raise ValueError(f"got {len(params)} parameter sets for {inputs.count} models")


def check_model_count(inputs: MergeInputs, method: str, count: int) -> None:
    """ValueError unless ``method`` got exactly ``count`` models besides the base (the recipe check has
    refused other counts already; this guards direct kernel calls)."""
    if inputs.count != count:
        word = "one model" if count == 1 else f"{count} models"
        raise ValueError(f"{method} needs exactly {word} besides the base, got {inputs.count}")


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
    keep = _random_lanes(delta, generator) < probabilities.mul_(_LANE_SCALE).sub_(_LANE_OFFSET)
    return delta * keep  # a multiply by the bool mask: 2.5x faster than torch.where


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
        if thinned is delta:
            weighted.append(delta * w)
        else:  # our own tensor: rescale and weight in one in-place pass
            weighted.append(thinned.mul_(w * l1_ratio(delta, thinned) if rescale else w))
    return combine(
        base,
        weighted,
        weights,
        consensus=consensus,
        normalize=flag(global_params, "normalize"),
        lam=float(global_params["lambda"]),
    )


def task_vector_kernel(how: Sparsifier, *, consensus: bool) -> Kernel:
    """The kernel of one task-vector method: :func:`task_vector_merge` with its sparsifier and consensus."""

    def merge(
        inputs: MergeInputs,
        params: Sequence[Mapping[str, float]],
        global_params: Mapping[str, float],
        seed: int,
    ) -> torch.Tensor:
        return task_vector_merge(inputs, params, global_params, seed, how=how, consensus=consensus)

    return merge


def ram_merge(inputs: MergeInputs, epsilon: float, r: float = 0.0, alpha: float = 0.0) -> torch.Tensor:
    """Reinforced Agent Merging (RAM; RAM+ tensor-local with ``r > 0``): per element, the task vectors
    larger than ``epsilon`` in magnitude contribute; where only one model contributes its value is kept as it
    is (times ``lambda_i = 1 + r * clamp(rho_i, 0, alpha)``, ``rho_i`` being model i's count of shared over
    unique contributing entries in this tensor), where several contribute their mean is taken, where none
    the base stays."""
    base = inputs.require_base()
    deltas = [inputs.delta(i) for i in range(inputs.count)]
    active = [d.abs() > epsilon for d in deltas]
    counts = torch.zeros_like(base, dtype=torch.int32)
    for mask in active:
        counts += mask
    unique = counts == 1
    shared = counts > 1
    mean_of_shared = torch.zeros_like(base, dtype=torch.float32)
    kept_alone = torch.zeros_like(base, dtype=torch.float32)
    for delta, mask in zip(deltas, active, strict=True):
        scale = 1.0
        if r != 0.0:
            n_unique = int((mask & unique).sum())
            n_shared = int((mask & shared).sum())
            rho = n_shared / max(float(n_unique), epsilon)
            scale = 1.0 + r * min(max(rho, 0.0), alpha)
        kept_alone += torch.where(mask & unique, delta, 0.0) * scale
        mean_of_shared += torch.where(mask & shared, delta, 0.0)
    mean_of_shared /= counts.clamp(min=1)
    return base + (kept_alone + mean_of_shared)
