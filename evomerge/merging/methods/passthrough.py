"""passthrough: one model's tensor as it is, optionally scaled (mergekit's layer-stacking method).

With ``slices`` (:mod:`evomerge.merging.slices`), each slice names one source and its layers are copied
into the output: stacking, splicing and repeating layers (frankenmerges). Parameter: per-model ``scale``
(default 1.0: unchanged; mergekit's ``scale``, usually given with a filter such as ``o_proj`` or
``down_proj`` to damp a repeated layer's contribution to the residual stream). Takes exactly one model and
no base.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from evomerge.merging.inputs import MergeInputs
from evomerge.merging.methods.common import check_model_count, check_param_sets

MODEL_PARAMS: dict[str, float] = {"scale": 1.0}
GLOBAL_PARAMS: dict[str, float] = {}
MIN_MODELS = 1
MAX_MODELS = 1


def merge(
    inputs: MergeInputs,
    params: Sequence[Mapping[str, float]],
    global_params: Mapping[str, float],
    seed: int,
) -> torch.Tensor:
    check_param_sets(params, inputs)
    check_model_count(inputs, "passthrough", 1)
    scale = float(params[0]["scale"])
    x = inputs.expert(0)
    return x.clone() if scale == 1.0 else x * scale
