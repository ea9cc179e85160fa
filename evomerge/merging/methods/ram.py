"""ram: Reinforced Agent Merging, for models fine-tuned by reinforcement learning (sparse task vectors).

Per element, the task vectors larger than ``epsilon`` in magnitude contribute: a value only one model changed
is kept whole, values several models changed are averaged over those models (not diluted by the ones that
left it alone), untouched values stay the base's. Parameters: global ``epsilon`` (default 1e-5, mergekit's).
Needs a base model. mergekit 0.1.5's ``ram``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from evomerge.merging.inputs import MergeInputs
from evomerge.merging.methods.common import check_param_sets, ram_merge

MODEL_PARAMS: dict[str, float] = {}
GLOBAL_PARAMS: dict[str, float] = {"epsilon": 1e-5}


def merge(
    inputs: MergeInputs,
    params: Sequence[Mapping[str, float]],
    global_params: Mapping[str, float],
    seed: int,
) -> torch.Tensor:
    check_param_sets(params, inputs)
    return ram_merge(inputs, float(global_params["epsilon"]))
