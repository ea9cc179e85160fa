"""Merge recipes: a superset of mergekit's YAML shape, validated, with per-tensor parameter resolution.

.. code-block:: yaml

    merge_method: ties
    base_model: /path/base
    models:
      - model: /path/expert_a
        parameters: {weight: 0.7, density: [0.3, 0.5, 0.9]}      # scalar or per-layer list
      - model: /path/expert_b
        parameters:
          weight: [{filter: self_attn, value: 0.2}, {filter: mlp, value: [0.1, 0.9]}, {value: 0.5}]
    parameters: {lambda: 1.0, normalize: true}   # method-wide; per-model names here are defaults for all
    dtype: float32                               # mergekit's compute dtype (float32 | bfloat16 | float16)
    out_dtype: bfloat16                          # optional; the output dtype (default: dtype, else base's)
    compute_dtype: float32                       # optional; overrides dtype's compute part (evomerge)
    tokenizer_source: base                       # "base" or a model directory
    seed: 0                                      # seeds DARE/DELLA masks (per tensor and model)

mergekit recipes are read as they are: ``slices`` with one slice whose sources all span the same full
``layer_range: [0, n]`` become ``models`` (with ``num_layers: n`` checked against the models); slice-level
``base_model`` and ``parameters`` apply as in mergekit; a filter ``"*"`` matches every tensor;
``tokenizer_source: null`` means ``base``.

``dtype`` means what it means in mergekit: the dtype the merge computes in (every model's tensor is rounded
to it and task vectors are taken between the rounded tensors, as mergekit does; the kernels then accumulate
in float32, so results agree with mergekit's within ``dtype`` rounding) and the output dtype unless
``out_dtype`` says otherwise. Without ``dtype``, evomerge computes in float32 (mergekit would compute in each
checkpoint's stored dtype) and writes the base's dtype. ``compute_dtype: float32`` keeps float32 compute
with ``dtype: bfloat16`` (an evomerge key; mergekit has no such choice).

Resolution of one parameter for one tensor: a list of ``{filter, value}`` rules picks the first rule whose
``filter`` is a substring of the tensor name (a rule without filter matches everything; when none
matches, the top-level ``parameters`` entry, then the method default apply); a list of ``m`` numbers is
interpolated linearly at index ``p * (m - 1)`` where ``p = layer_position(name, num_layers)``; a one-element
list is a scalar; booleans resolve to 1.0 / 0.0.

For methods that need a base model, a ``models`` entry naming the base model itself is skipped (its
task vector is zero), as in mergekit.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, Self

import torch
import yaml
from pydantic import BaseModel, ConfigDict, ValidationError, model_validator

from evomerge.checkpoints.layers import layer_position
from evomerge.checkpoints.writer import DTYPES
from evomerge.config_util import format_validation_error
from evomerge.errors import RecipeError
from evomerge.merging.mergekit_shape import MERGEKIT_METHODS, from_mergekit
from evomerge.merging.params import FilterRule, ModelEntry, Params, ParamValue, check_domain, dump_params
from evomerge.merging.registry import MergeMethod, get_method

__all__ = [
    "DTYPES",
    "FilterRule",
    "MergeRecipe",
    "ModelEntry",
    "ParamValue",
    "check_layer_lists",
    "format_validation_error",
    "resolve",
    "resolve_params",
]

DtypeName = Literal["float32", "bfloat16", "float16"]


# ---------------------------------------------------------------------------------------- recipe
class MergeRecipe(BaseModel):
    """A validated merge recipe. Construction raises :class:`~evomerge.errors.RecipeError` (one line)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    merge_method: str
    base_model: str | None = None
    models: list[ModelEntry]
    parameters: Params = {}
    dtype: DtypeName | None = None
    out_dtype: DtypeName | None = None
    compute_dtype: DtypeName | None = None
    """The dtype the merge computes in when it differs from ``dtype`` (evomerge; default: ``dtype``, else
    float32)."""
    tokenizer_source: str = "base"
    seed: int = 0
    num_layers: int | None = None
    """Layer count the recipe was written for (from a mergekit slice's ``layer_range``); checked on merge."""

    def __init__(self, **data: Any) -> None:
        try:
            super().__init__(**data)
        except ValidationError as exc:
            raise RecipeError(format_validation_error(exc)) from None

    @classmethod
    def model_validate(cls, obj: Any, **kwargs: Any) -> Self:
        """Validate a mapping; RecipeError (one line naming the field) instead of ValidationError."""
        try:
            return super().model_validate(obj, **kwargs)
        except ValidationError as exc:
            raise RecipeError(format_validation_error(exc)) from None

    # ------------------------------------------------------------------ mergekit shape
    @model_validator(mode="before")
    @classmethod
    def _mergekit_shape(cls, data: Any) -> Any:
        return from_mergekit(data) if isinstance(data, Mapping) else data

    # ------------------------------------------------------------------ semantic checks
    @model_validator(mode="after")
    def _check(self) -> Self:
        method = get_method(self.merge_method)
        if not self.models:
            raise RecipeError("models: empty list; a recipe needs at least one model")
        if method.needs_base and not self.base_model:
            raise RecipeError(f"base_model: merge method {method.name!r} needs a base model")
        if self.num_layers is not None and self.num_layers < 1:
            raise RecipeError(f"num_layers: must be positive, got {self.num_layers}")
        for i, entry in enumerate(self.models):
            if not entry.model:
                raise RecipeError(f"models[{i}].model: empty path")
            for key, value in entry.parameters.items():
                path = f"models[{i}].parameters.{key}"
                if key not in method.model_params:
                    if key in method.global_params:
                        raise RecipeError(
                            f"{path}: {key!r} is a global parameter of {method.name!r}; "
                            "put it under the top-level parameters"
                        )
                    raise RecipeError(f"{path}: {_unknown_param(key, method, method.model_params)}")
                check_domain(path, key, value)
        for key, value in self.parameters.items():
            path = f"parameters.{key}"
            if key not in method.global_params and key not in method.model_params:
                known = {**method.global_params, **method.model_params}
                raise RecipeError(f"{path}: {_unknown_param(key, method, known)}")
            check_domain(path, key, value)
        count = len(self._expert_indices())
        if not count:
            raise RecipeError(f"models: no model besides the base model {self.base_model!r}")
        besides = " besides the base" if method.needs_base else ""
        if count < method.min_models:
            raise RecipeError(
                f"models: merge method {method.name!r} needs at least {method.min_models} models{besides}, "
                f"got {count}"
            )
        if method.max_models is not None and count > method.max_models:
            raise RecipeError(
                f"models: merge method {method.name!r} takes at most {method.max_models} "
                f"model{'' if method.max_models == 1 else 's'}{besides}, got {count}"
            )
        return self

    def _expert_indices(self) -> list[int]:
        method = get_method(self.merge_method)
        if method.needs_base and self.base_model:
            return [i for i, m in enumerate(self.models) if not _same_path(m.model, self.base_model)]
        return list(range(len(self.models)))

    # ------------------------------------------------------------------ accessors
    @property
    def method(self) -> MergeMethod:
        return get_method(self.merge_method)

    def expert_models(self) -> tuple[ModelEntry, ...]:
        """The models that take part (for base-needing methods, entries naming the base are skipped)."""
        return tuple(self.models[i] for i in self._expert_indices())

    def tokenizer_path(self) -> str:
        """The directory to copy the tokenizer from (``base`` -> the base model, or the first model)."""
        if self.tokenizer_source == "base":
            return self.base_model or self.models[0].model
        return self.tokenizer_source

    def compute_torch_dtype(self) -> torch.dtype:
        """The dtype inputs are rounded to before the kernels run: ``compute_dtype``, else ``dtype``, else
        float32."""
        return DTYPES[self.compute_dtype or self.dtype or "float32"]

    def torch_dtype(self, default: torch.dtype | None = None) -> torch.dtype:
        """The output dtype: ``out_dtype``, else ``dtype``, else ``default`` when it is float32/bfloat16/
        float16, else float32."""
        if self.out_dtype is not None:
            return DTYPES[self.out_dtype]
        if self.dtype is not None:
            return DTYPES[self.dtype]
        if default in DTYPES.values():
            assert default is not None
            return default
        return torch.float32

    # ------------------------------------------------------------------ YAML
    @classmethod
    def from_yaml(cls, source: str | Path) -> MergeRecipe:
        """Parse a recipe from a YAML file path or from YAML text."""
        if isinstance(source, Path) or (
            "\n" not in source
            and (source.strip().endswith((".yaml", ".yml")) or Path(source).expanduser().is_file())
        ):
            path = Path(source).expanduser()
            try:
                text = path.read_text(encoding="utf-8")
            except FileNotFoundError:
                raise RecipeError(f"recipe file not found: {path}") from None
            except OSError as exc:
                raise RecipeError(f"cannot read recipe file {path}: {exc.strerror or exc}") from None
        else:
            text = source
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            where = ""
            mark = getattr(exc, "problem_mark", None)
            if mark is not None:
                where = f" at line {mark.line + 1}, column {mark.column + 1}"
            problem = getattr(exc, "problem", None) or type(exc).__name__
            raise RecipeError(f"invalid recipe YAML: {problem}{where}") from None
        if not isinstance(data, dict):
            raise RecipeError("a recipe must be a YAML mapping with merge_method and models")
        return cls.model_validate(data)

    def to_dict(self) -> dict[str, Any]:
        """Plain data in mergekit's shape (empty/None fields left out); ``model_validate`` reads it back."""
        out: dict[str, Any] = {"merge_method": self.merge_method}
        if self.base_model is not None:
            out["base_model"] = self.base_model
        models: list[dict[str, Any]] = []
        for entry in self.models:
            item: dict[str, Any] = {"model": entry.model}
            if entry.parameters:
                item["parameters"] = dump_params(entry.parameters)
            models.append(item)
        out["models"] = models
        if self.parameters:
            out["parameters"] = dump_params(self.parameters)
        if self.dtype is not None:
            out["dtype"] = self.dtype
        if self.out_dtype is not None:
            out["out_dtype"] = self.out_dtype
        if self.compute_dtype is not None:
            out["compute_dtype"] = self.compute_dtype
        out["tokenizer_source"] = self.tokenizer_source
        out["seed"] = self.seed
        if self.num_layers is not None:
            out["num_layers"] = self.num_layers
        return out

    def to_mergekit(self) -> dict[str, Any]:
        """The recipe as a mergekit configuration (``mergekit-yaml`` reads it and merges the same tensors).

        mergekit computes in ``dtype``, so the compute dtype is written there (float32 unless the recipe
        says otherwise) and the output dtype goes to ``out_dtype``. RecipeError when the recipe uses something
        mergekit lacks (the ``rsaf`` method, per-model ``weight`` for ``sce``); DARE/DELLA masks come from
        mergekit's own random generator there, so those merges match only in distribution.
        """
        if self.merge_method not in MERGEKIT_METHODS:
            raise RecipeError(f"merge_method: {self.merge_method!r} has no mergekit equivalent")
        if self.merge_method == "sce" and any("weight" in m.parameters for m in self.models):
            raise RecipeError("models: per-model weight for sce is an evomerge extension mergekit lacks")
        data = self.to_dict()
        for key in ("seed", "num_layers", "dtype", "out_dtype", "compute_dtype"):
            data.pop(key, None)
        if data.get("tokenizer_source") == "base":
            # mergekit copies the base tokenizer by default; an explicit tokenizer_source would switch it
            # to its tokenizer-merging path, which needs every model's tokenizer
            data.pop("tokenizer_source")
        compute = self.compute_dtype or self.dtype or "float32"
        data["dtype"] = compute
        output = self.out_dtype or self.dtype
        if output is not None and output != compute:
            data["out_dtype"] = output
        return data

    def to_mergekit_yaml(self) -> str:
        """:meth:`to_mergekit` as YAML text."""
        return yaml.safe_dump(
            self.to_mergekit(), sort_keys=False, default_flow_style=None, allow_unicode=True
        )

    def to_yaml(self) -> str:
        """YAML text; ``MergeRecipe.from_yaml(r.to_yaml()) == r``."""
        return yaml.safe_dump(self.to_dict(), sort_keys=False, default_flow_style=None, allow_unicode=True)


def _same_path(a: str, b: str) -> bool:
    """Same model path after normalising (no filesystem access: this runs once per tensor)."""
    if a == b:
        return True
    return os.path.normpath(os.path.abspath(os.path.expanduser(a))) == os.path.normpath(
        os.path.abspath(os.path.expanduser(b))
    )


def _unknown_param(key: str, method: MergeMethod, known: Mapping[str, float]) -> str:
    names = ", ".join(sorted(known)) or "none"
    return f"unknown parameter {key!r} for merge method {method.name!r}; known: {names}"


# ---------------------------------------------------------------------------------------- resolution
def _interpolate(values: tuple[float, ...], tensor_name: str, num_layers: int, param: str) -> float:
    m = len(values)
    if m == 1:
        return values[0]
    # A gradient of any length spans the layer stack, as in mergekit: its m points sit at depths
    # 0, 1/(m-1), ..., 1 and each layer takes the linear interpolation at its own depth.
    x = layer_position(tensor_name, num_layers) * (m - 1)
    lo = min(math.floor(x), m - 1)
    hi = min(lo + 1, m - 1)
    frac = x - lo
    return values[lo] * (1.0 - frac) + values[hi] * frac


def _resolve_leaf(
    v: bool | float | tuple[float, ...], tensor_name: str, num_layers: int, param: str
) -> float:
    if isinstance(v, bool):
        return 1.0 if v else 0.0
    if isinstance(v, tuple):
        return _interpolate(v, tensor_name, num_layers, param)
    return float(v)


def _resolve_optional(value: ParamValue, tensor_name: str, num_layers: int, param: str) -> float | None:
    if isinstance(value, tuple) and value and isinstance(value[0], FilterRule):
        for j, rule in enumerate(value):
            assert isinstance(rule, FilterRule)
            if rule.filter is None or rule.filter in tensor_name:
                return _resolve_leaf(rule.value, tensor_name, num_layers, f"{param}[{j}].value")
        return None
    return _resolve_leaf(value, tensor_name, num_layers, param)  # type: ignore[arg-type]


def resolve(
    value: ParamValue,
    tensor_name: str,
    num_layers: int,
    *,
    default: float | None = None,
    param: str = "parameter",
) -> float:
    """The value of one parameter for tensor ``tensor_name`` of a model with ``num_layers`` layers.

    ``default`` applies when no filter rule matches (RecipeError without one). ``param`` names the
    parameter in error messages (e.g. no filter rule matching the tensor).
    """
    result = _resolve_optional(value, tensor_name, num_layers, param)
    if result is None:
        if default is None:
            raise RecipeError(f"{param}: no filter rule matches tensor {tensor_name!r}")
        return default
    return result


def resolve_params(
    recipe: MergeRecipe, tensor_name: str, num_layers: int
) -> tuple[list[dict[str, float]], dict[str, float]]:
    """Per-model parameter dicts (one per :meth:`MergeRecipe.expert_models` entry, in order) and the
    global parameter dict for one tensor, as plain floats with the method's defaults filled in."""
    method = recipe.method
    top = recipe.parameters
    global_params: dict[str, float] = {}
    for key, default in method.global_params.items():
        value = top.get(key)
        global_params[key] = (
            default
            if value is None
            else resolve(value, tensor_name, num_layers, default=default, param=f"parameters.{key}")
        )
    shared: dict[str, float] = {}
    for key, default in method.model_params.items():
        value = top.get(key)
        shared[key] = (
            default
            if value is None
            else resolve(value, tensor_name, num_layers, default=default, param=f"parameters.{key}")
        )
    per_model: list[dict[str, float]] = []
    for i in recipe._expert_indices():
        own = recipe.models[i].parameters
        resolved: dict[str, float] = {}
        for key in method.model_params:
            value = own.get(key)
            resolved[key] = (
                shared[key]
                if value is None
                else resolve(
                    value, tensor_name, num_layers, default=shared[key], param=f"models[{i}].parameters.{key}"
                )
            )
        per_model.append(resolved)
    return per_model, global_params


def check_layer_lists(recipe: MergeRecipe, num_layers: int) -> None:
    """RecipeError where the recipe's ``slices`` span another number of layers than the models have
    (checked before merging). Per-layer lists (gradients) of any length are valid: they are interpolated
    over the layer stack, as mergekit does."""
    if recipe.num_layers is not None and recipe.num_layers != num_layers:
        raise RecipeError(
            f"slices: the recipe's layer_range spans {recipe.num_layers} layers, the models have {num_layers}"
        )
