"""Genome <-> recipe mappings: granularity, bounds, Optuna distributions; the layer-path space."""

from evomerge.search_spaces.layer_path import LayerPathConfig, LayerPathSpace
from evomerge.search_spaces.space import (
    AnySpace,
    ParamRange,
    SearchSpace,
    SearchSpaceConfig,
    build_space,
    expert_aliases,
)

__all__ = [
    "AnySpace",
    "LayerPathConfig",
    "LayerPathSpace",
    "ParamRange",
    "SearchSpace",
    "SearchSpaceConfig",
    "build_space",
    "expert_aliases",
]
