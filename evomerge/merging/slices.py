"""Layer slices: mergekit's ``slices`` (stacking, splicing and repeating layers) and the tensor plan they
give.

A sliced recipe lists output slices; each slice names sources (a model and a ``layer_range: [start, end)``,
all of one length) and is merged with the recipe's method as an ordinary ``models`` recipe would be, layer by
layer: output layer ``k`` of a slice of ``n`` layers takes layer ``start + k`` of every source, and per-layer
lists (gradients) are evaluated at ``t = k / (n - 1)`` within the slice (``t = 1`` for a one-layer slice).
The output stacks the slices' layers in order. Tensors outside the layer stack follow mergekit too: the
embeddings come from the first slice's sources, the final norm, the lm_head and anything else from the
last slice's, at ``t = 0``. ``passthrough`` with one source per slice copies layers (a frankenmerge).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Self

from pydantic import BaseModel, ConfigDict, model_validator

from evomerge.checkpoints.layers import layer_index, tensor_group, with_layer
from evomerge.errors import RecipeError
from evomerge.merging.params import Params, dump_params

__all__ = ["OutputSlice", "PlannedTensor", "SliceSource", "plan_slices", "sliced_config"]


class SliceSource(BaseModel):
    """One source of a slice: layers ``[start, end)`` of ``model``, with per-model parameters."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    model: str
    layer_range: tuple[int, int]
    parameters: Params = {}

    @model_validator(mode="after")
    def _check(self) -> Self:
        start, end = self.layer_range
        if start < 0 or end <= start:
            raise ValueError(f"layer_range: must be [start, end] with 0 <= start < end, got [{start}, {end}]")
        return self

    @property
    def length(self) -> int:
        return self.layer_range[1] - self.layer_range[0]


class OutputSlice(BaseModel):
    """One output slice: its sources (of equal length), an optional own base model and parameters."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    sources: tuple[SliceSource, ...]
    base_model: str | None = None
    parameters: Params = {}

    @model_validator(mode="after")
    def _check(self) -> Self:
        if not self.sources:
            raise ValueError("sources: a slice needs at least one source")
        lengths = sorted({s.length for s in self.sources})
        if len(lengths) > 1:
            raise ValueError(f"sources: every source of a slice spans as many layers, got lengths {lengths}")
        return self

    @property
    def length(self) -> int:
        return self.sources[0].length

    def to_dict(self) -> dict[str, Any]:
        sources: list[dict[str, Any]] = []
        for s in self.sources:
            item: dict[str, Any] = {"model": s.model, "layer_range": list(s.layer_range)}
            if s.parameters:
                item["parameters"] = dump_params(s.parameters)
            sources.append(item)
        out: dict[str, Any] = {"sources": sources}
        if self.base_model is not None:
            out["base_model"] = self.base_model
        if self.parameters:
            out["parameters"] = dump_params(self.parameters)
        return out


@dataclass(frozen=True)
class PlannedTensor:
    """One output tensor of a sliced merge."""

    out_name: str
    part: int
    """The slice it comes from."""
    inputs: tuple[str, ...]
    """The tensor read from each of the slice's sources, in source order."""
    t: float
    """Where per-layer lists are evaluated (see the module docstring)."""


def plan_slices(
    slices: Sequence[OutputSlice], names: Sequence[str], layers_of: Mapping[str, int]
) -> tuple[list[PlannedTensor], list[int]]:
    """The output tensors of ``slices`` in checkpoint order, and for each output layer the layer it copies
    from the first source of its slice.

    ``names``: the reference model's tensor names in checkpoint order (its layer 0 gives the names of every
    layer); ``layers_of``: each source model's layer count. RecipeError for a layer range past a model's
    last layer.
    """
    for i, piece in enumerate(slices):
        for j, source in enumerate(piece.sources):
            have = layers_of[source.model]
            if source.layer_range[1] > have:
                start, end = source.layer_range
                raise RecipeError(
                    f"slices[{i}].sources[{j}].layer_range: [{start}, {end}] goes past the last layer of "
                    f"{source.model} ({have} layers)"
                )
    per_layer = [n for n in names if layer_index(n) == 0]
    pre = [n for n in names if layer_index(n) is None and tensor_group(n) == "embed"]
    post = [n for n in names if layer_index(n) is None and tensor_group(n) != "embed"]
    first, last = slices[0], slices[-1]
    plan = [PlannedTensor(n, 0, (n,) * len(first.sources), 0.0) for n in pre]
    source_layers: list[int] = []
    out_layer = 0
    for i, piece in enumerate(slices):
        for k in range(piece.length):
            t = k / (piece.length - 1) if piece.length > 1 else 1.0
            for name in per_layer:
                inputs = tuple(with_layer(name, s.layer_range[0] + k) for s in piece.sources)
                plan.append(PlannedTensor(with_layer(name, out_layer), i, inputs, t))
            source_layers.append(piece.sources[0].layer_range[0] + k)
            out_layer += 1
    plan += [PlannedTensor(n, len(slices) - 1, (n,) * len(last.sources), 0.0) for n in post]
    return plan, source_layers


LAYER_COUNT_KEYS: tuple[str, ...] = ("num_hidden_layers", "n_layer", "num_layers")
"""config.json keys that hold the decoder's layer count (the first one present is used)."""


def sliced_config(config: Mapping[str, Any], source_layers: Sequence[int]) -> dict[str, Any]:
    """``config`` for the stacked model: the new layer count, and every per-layer list (such as
    ``layer_types``) taken at the layers the output copies (mergekit sets only the count, which leaves
    per-layer lists of the wrong length that transformers refuses)."""
    out = dict(config)
    key = next((k for k in LAYER_COUNT_KEYS if isinstance(out.get(k), int)), None)
    if key is None:
        raise RecipeError("slices: the model's config.json has no layer count (num_hidden_layers)")
    old = int(out[key])
    out[key] = len(source_layers)
    for name, value in config.items():
        if isinstance(value, list) and len(value) == old and old > 0:
            out[name] = [value[layer] for layer in source_layers]
    return out
