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
from evomerge.merging.chat_templates import check_chat_template
from evomerge.merging.mergekit_shape import MERGEKIT_METHODS, from_mergekit
from evomerge.merging.params import FilterRule, ModelEntry, Params, ParamValue, check_domain, dump_params
from evomerge.merging.registry import MergeMethod, get_method
from evomerge.merging.slices import OutputSlice, SliceSource
from evomerge.merging.vocab import TokenSource

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
    models: list[ModelEntry] = []
    slices: tuple[OutputSlice, ...] = ()
    """Layer slices (stacking, splicing, repeating layers; see :mod:`evomerge.merging.slices`); a recipe
    gives either ``models`` or ``slices``."""
    parameters: Params = {}
    dtype: DtypeName | None = None
    out_dtype: DtypeName | None = None
    compute_dtype: DtypeName | None = None
    """The dtype the merge computes in when it differs from ``dtype`` (evomerge; default: ``dtype``, else
    float32)."""
    tokenizer_source: str = "base"
    tokens: dict[str, TokenSource] = {}
    """Where chosen tokens' embedding rows come from (mergekit's ``tokenizer.tokens``; see
    :mod:`evomerge.merging.vocab`)."""
    chat_template: str | None = None
    """The output's chat template: ``auto``, a name or a Jinja template (see
    :mod:`evomerge.merging.chat_templates`); None keeps the tokenizer source's."""
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
        if self.chat_template is not None:
            check_chat_template(self.chat_template)
        if self.slices:
            return self._check_slices()
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
        count = len(self.expert_indices())
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

    def _check_slices(self) -> Self:
        if self.models:
            raise RecipeError("slices: give either models or slices, not both")
        if self.num_layers is not None:
            raise RecipeError("num_layers: not used with slices (each slice names its layer_range)")
        method = get_method(self.merge_method)
        for i, piece in enumerate(self.slices):
            base = piece.base_model or self.base_model
            if (
                method.needs_base
                and base is not None
                and not any(same_path(s.model, base) for s in piece.sources)
            ):
                raise RecipeError(
                    f"slices[{i}].sources: the base model {base!r} is not among them (merge method "
                    f"{method.name!r} merges against the base's layers, which a source names)"
                )
            try:
                self.slice_recipe(i)
            except RecipeError as exc:
                raise RecipeError(f"slices[{i}]: {exc}") from None
        return self

    def slice_recipe(self, i: int) -> MergeRecipe:
        """Slice ``i`` as an ordinary ``models`` recipe (its sources in order, the slice's base model and
        parameters over the recipe's), which merges that slice's layers."""
        piece = self.slices[i]
        return MergeRecipe(
            merge_method=self.merge_method,
            base_model=piece.base_model or self.base_model,
            models=[ModelEntry(model=s.model, parameters=s.parameters) for s in piece.sources],
            parameters={**self.parameters, **piece.parameters},  # mergekit: the slice's take precedence
            dtype=self.dtype,
            out_dtype=self.out_dtype,
            compute_dtype=self.compute_dtype,
            tokenizer_source=self.tokenizer_source,
            tokens=self.tokens,
            chat_template=self.chat_template,
            seed=self.seed,
        )

    def for_layers(self, num_layers: int) -> MergeRecipe:
        """This recipe for models of ``num_layers`` layers: itself, or, when it was written for another layer
        count (a mergekit slice ``layer_range: [0, n]`` over part of the stack), the sliced recipe that
        takes those layers (RecipeError at merge time when the range goes past the last layer)."""
        if self.slices or self.num_layers is None or self.num_layers == num_layers:
            return self
        sources = [
            SliceSource(model=m.model, layer_range=(0, self.num_layers), parameters=m.parameters)
            for m in self.models
        ]
        base = self.base_model
        if self.method.needs_base and base and not any(same_path(m.model, base) for m in self.models):
            sources.append(SliceSource(model=base, layer_range=(0, self.num_layers)))
        data = {k: v for k, v in self.__dict__.items() if k not in ("models", "num_layers", "slices")}
        return MergeRecipe(**data, slices=(OutputSlice(sources=tuple(sources)),))

    def referenced_models(self) -> tuple[str, ...]:
        """Every model path the recipe reads, each once, in order of first mention (the base first)."""
        paths = [self.base_model] if self.base_model else []
        paths += [m.model for m in self.models]
        for piece in self.slices:
            if piece.base_model:
                paths.append(piece.base_model)
            paths += [s.model for s in piece.sources]
        out: list[str] = []
        for path in paths:
            if not any(same_path(path, seen) for seen in out):
                out.append(path)
        return tuple(out)

    def expert_indices(self) -> list[int]:
        method = get_method(self.merge_method)
        if method.needs_base and self.base_model:
            return [i for i, m in enumerate(self.models) if not same_path(m.model, self.base_model)]
        return list(range(len(self.models)))

    # ------------------------------------------------------------------ accessors
    @property
    def method(self) -> MergeMethod:
        return get_method(self.merge_method)

    def expert_models(self) -> tuple[ModelEntry, ...]:
        """The models that take part (for base-needing methods, entries naming the base are skipped)."""
        return tuple(self.models[i] for i in self.expert_indices())

    def tokenizer_path(self) -> str:
        """The directory to copy the tokenizer from (``base`` -> the base model, or the first model)."""
        if self.tokenizer_source == "base":
            return self.base_model or self.referenced_models()[0]
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
        if self.slices:
            out["slices"] = [piece.to_dict() for piece in self.slices]
        else:
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
        if self.tokens:
            out["tokens"] = {t: spec.model_dump(exclude_defaults=True) for t, spec in self.tokens.items()}
        if self.chat_template is not None:
            out["chat_template"] = self.chat_template
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
        tokens = data.pop("tokens", None)
        if tokens:  # mergekit's spelling: tokenizer: {source, tokens}
            data["tokenizer"] = {"source": data.pop("tokenizer_source"), "tokens": tokens}
        elif data.get("tokenizer_source") == "base":
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


def same_path(a: str, b: str) -> bool:
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
def _interpolate(values: tuple[float, ...], t: float) -> float:
    m = len(values)
    if m == 1:
        return values[0]
    # A gradient of any length spans the layer stack, as in mergekit: its m points sit at depths
    # 0, 1/(m-1), ..., 1 and each layer takes the linear interpolation at its own depth.
    x = t * (m - 1)
    lo = min(math.floor(x), m - 1)
    hi = min(lo + 1, m - 1)
    frac = x - lo
    return values[lo] * (1.0 - frac) + values[hi] * frac


def _resolve_leaf(v: bool | float | tuple[float, ...], t: float) -> float:
    if isinstance(v, bool):
        return 1.0 if v else 0.0
    if isinstance(v, tuple):
        return _interpolate(v, t)
    return float(v)


def _resolve_optional(value: ParamValue, tensor_name: str, t: float) -> float | None:
    if isinstance(value, tuple) and value and isinstance(value[0], FilterRule):
        for rule in value:
            assert isinstance(rule, FilterRule)
            if rule.filter is None or rule.filter in tensor_name:
                return _resolve_leaf(rule.value, t)
        return None
    return _resolve_leaf(value, t)  # type: ignore[arg-type]


def resolve(
    value: ParamValue,
    tensor_name: str,
    num_layers: int,
    *,
    default: float | None = None,
    param: str = "parameter",
    t: float | None = None,
) -> float:
    """The value of one parameter for tensor ``tensor_name`` of a model with ``num_layers`` layers.

    ``default`` applies when no filter rule matches (RecipeError without one). ``param`` names the
    parameter in error messages (e.g. no filter rule matching the tensor). ``t``: where per-layer lists
    are evaluated (default: the tensor's relative depth, :func:`layer_position`; a slice gives its own).
    """
    where = layer_position(tensor_name, num_layers) if t is None else t
    result = _resolve_optional(value, tensor_name, where)
    if result is None:
        if default is None:
            raise RecipeError(f"{param}: no filter rule matches tensor {tensor_name!r}")
        return default
    return result


def resolve_params(
    recipe: MergeRecipe, tensor_name: str, num_layers: int, *, t: float | None = None
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
            else resolve(value, tensor_name, num_layers, default=default, param=f"parameters.{key}", t=t)
        )
    shared: dict[str, float] = {}
    for key, default in method.model_params.items():
        value = top.get(key)
        shared[key] = (
            default
            if value is None
            else resolve(value, tensor_name, num_layers, default=default, param=f"parameters.{key}", t=t)
        )
    per_model: list[dict[str, float]] = []
    for i in recipe.expert_indices():
        own = recipe.models[i].parameters
        resolved: dict[str, float] = {}
        for key in method.model_params:
            value = own.get(key)
            resolved[key] = (
                shared[key]
                if value is None
                else resolve(
                    value,
                    tensor_name,
                    num_layers,
                    default=shared[key],
                    param=f"models[{i}].parameters.{key}",
                    t=t,
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
