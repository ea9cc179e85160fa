"""arcee_fusion: keep the other model's change only where it matters most, by a data-free importance.

With ``a`` the base tensor and ``b`` the one other model's: per element, importance ``|b - a|`` times the
KL divergence ``KL(softmax(b) || softmax(a))`` of its row (softmax over the last dimension, 1e-8 added
to both distributions). The threshold is ``median + 1.5 (q3 - q1)`` of the importances (quantile ``q`` is
the sorted value at index ``floor(q (n - 1))``; a tensor of more than 1,000,000 elements is summarised by a
sample of 1,000,000 drawn with replacement, seeded per tensor here, from torch's global generator in
mergekit), and the result is ``a + (b - a) * [importance >= threshold]``. Computed in float32.

Parameters: none. Needs a base model and exactly one other model.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from evomerge.merging.inputs import MergeInputs
from evomerge.merging.methods.common import check_model_count, check_param_sets

MODEL_PARAMS: dict[str, float] = {}
GLOBAL_PARAMS: dict[str, float] = {}
MIN_MODELS = 1
MAX_MODELS = 1

SAMPLE_SIZE = 1_000_000
EPS = 1e-8


def importance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    p = torch.softmax(b, dim=-1) + EPS
    q = torch.softmax(a, dim=-1) + EPS
    kl = (p * torch.log(p / q)).sum(-1, keepdim=True)
    return (b - a).abs() * kl


def threshold(scores: torch.Tensor, seed: int) -> torch.Tensor:
    flat = scores.reshape(-1)
    if flat.numel() > SAMPLE_SIZE:
        gen = torch.Generator(device=flat.device).manual_seed(seed)
        flat = flat[torch.randint(flat.numel(), (SAMPLE_SIZE,), generator=gen, device=flat.device)]
    ordered = torch.sort(flat).values
    q = (torch.tensor([0.25, 0.5, 0.75]) * (ordered.numel() - 1)).long().to(ordered.device)
    q1, median, q3 = ordered[q]
    out: torch.Tensor = median + 1.5 * (q3 - q1)
    return out


def merge(
    inputs: MergeInputs,
    params: Sequence[Mapping[str, float]],
    global_params: Mapping[str, float],
    seed: int,
) -> torch.Tensor:
    check_param_sets(params, inputs)
    check_model_count(inputs, "arcee_fusion", 1)
    a = inputs.require_base()
    diff = inputs.delta(0)
    scores = importance(a, a + diff)
    mask = (scores >= threshold(scores, seed)).to(diff.dtype)
    return a + diff * mask
