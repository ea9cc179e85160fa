"""evomerge.merging: merge recipes, merge-method kernels and the executors that run them."""

from evomerge.merging.executor import (
    InMemoryMerger,
    ProgressCallback,
    check_compatible,
    merge_streaming,
    model_card,
)
from evomerge.merging.inputs import Kernel, MergeInputs, tensor_seed
from evomerge.merging.recipe import (
    DTYPES,
    FilterRule,
    MergeRecipe,
    ModelEntry,
    ParamValue,
    check_layer_lists,
    format_validation_error,
    resolve,
    resolve_params,
)
from evomerge.merging.registry import (
    METHODS,
    PARAM_DOMAINS,
    MergeMethod,
    ParamDomain,
    get_method,
    param_domain,
)

__all__ = [
    "DTYPES",
    "METHODS",
    "PARAM_DOMAINS",
    "FilterRule",
    "InMemoryMerger",
    "Kernel",
    "MergeInputs",
    "MergeMethod",
    "MergeRecipe",
    "ModelEntry",
    "ParamDomain",
    "ParamValue",
    "ProgressCallback",
    "check_compatible",
    "check_layer_lists",
    "format_validation_error",
    "get_method",
    "merge_streaming",
    "model_card",
    "param_domain",
    "resolve",
    "resolve_params",
    "tensor_seed",
]
