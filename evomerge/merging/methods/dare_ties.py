"""dare_ties (DARE + TIES sign election): random drop and rescale, elect sign, disjoint merge.

Drop as in ``dare_linear`` (seeded per tensor and model, L1 rescale when ``rescale``), then TIES' sign
election and disjoint merge: ``b + lambda * sum_i w_i m_i d_i'`` (divided by ``sum_i w_i m_i`` when
``normalize``).

Parameters: per model ``weight`` (1) and ``density`` (1); global ``lambda`` (1), ``normalize`` (false),
``rescale`` (true), ``int8_mask`` (no effect).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from evomerge.merging.inputs import MergeInputs
from evomerge.merging.methods.common import task_vector_merge

MODEL_PARAMS: dict[str, float] = {"weight": 1.0, "density": 1.0}
GLOBAL_PARAMS: dict[str, float] = {"lambda": 1.0, "normalize": 0.0, "rescale": 1.0, "int8_mask": 0.0}


def merge(
    inputs: MergeInputs,
    params: Sequence[Mapping[str, float]],
    global_params: Mapping[str, float],
    seed: int,
) -> torch.Tensor:
    return task_vector_merge(inputs, params, global_params, seed, how="random", consensus=True)
