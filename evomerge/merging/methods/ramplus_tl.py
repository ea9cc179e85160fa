"""ramplus_tl: RAM+ (tensor-local), RAM with each model's unique values scaled up by how much it shares.

As ``ram``, except that model i's values no other model changed are multiplied by ``1 + r * clamp(rho_i,
0, alpha)``, where ``rho_i`` is, within the tensor, the number of model i's contributing entries that other
models also changed over the number only it changed. Parameters: global ``r`` (default 0.1), ``alpha``
(default 0.2) and ``epsilon`` (default 1e-5), mergekit's defaults. Needs a base model. mergekit 0.1.5's
``ramplus_tl``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from evomerge.merging.inputs import MergeInputs
from evomerge.merging.methods.common import check_param_sets, ram_merge

MODEL_PARAMS: dict[str, float] = {}
GLOBAL_PARAMS: dict[str, float] = {"r": 0.1, "alpha": 0.2, "epsilon": 1e-5}


def merge(
    inputs: MergeInputs,
    params: Sequence[Mapping[str, float]],
    global_params: Mapping[str, float],
    seed: int,
) -> torch.Tensor:
    check_param_sets(params, inputs)
    g = global_params
    return ram_merge(inputs, float(g["epsilon"]), r=float(g["r"]), alpha=float(g["alpha"]))
