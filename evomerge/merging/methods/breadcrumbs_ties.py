"""breadcrumbs_ties: Model Breadcrumbs' outlier-and-small drop, then TIES sign election.

Sparsify as ``breadcrumbs``, then elect signs and merge disjointly as ``ties``.

Parameters: per model ``weight`` (1), ``density`` (1), ``gamma`` (0.01); global ``lambda`` (1),
``normalize`` (false), ``rescale`` (false), ``int8_mask`` (no effect).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from evomerge.merging.inputs import MergeInputs
from evomerge.merging.methods.common import task_vector_merge

MODEL_PARAMS: dict[str, float] = {"weight": 1.0, "density": 1.0, "gamma": 0.01}
GLOBAL_PARAMS: dict[str, float] = {"lambda": 1.0, "normalize": 0.0, "rescale": 0.0, "int8_mask": 0.0}


def merge(
    inputs: MergeInputs,
    params: Sequence[Mapping[str, float]],
    global_params: Mapping[str, float],
    seed: int,
) -> torch.Tensor:
    return task_vector_merge(inputs, params, global_params, seed, how="outliers", consensus=True)
