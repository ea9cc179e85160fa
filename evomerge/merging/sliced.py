"""Merging a sliced recipe (layer stacking, splicing, repeating; see :mod:`evomerge.merging.slices`) to disk.

Tensors are read one output tensor at a time (a sliced merge reads each input layer once per output layer
that uses it), merged with the slice's own ``models`` recipe at the slice's ``t`` and streamed into the
output's shards; the output's config.json gets the new layer count and per-layer lists.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import torch

from evomerge.checkpoints.layers import layer_index, with_layer
from evomerge.checkpoints.model_dir import ModelDir, torch_dtype_from_safetensors
from evomerge.checkpoints.writer import DEFAULT_MAX_SHARD_BYTES, ModelWriter
from evomerge.errors import CheckpointError, RecipeError
from evomerge.merging.chat_templates import resolve_chat_template
from evomerge.merging.execution import architecture, check_disk_space, model_card, run_kernel
from evomerge.merging.inputs import MergeInputs
from evomerge.merging.recipe import MergeRecipe, same_path
from evomerge.merging.slices import PlannedTensor, plan_slices, sliced_config

__all__ = ["merge_sliced_streaming", "slice_inputs"]


def slice_inputs(
    recipe: MergeRecipe,
    parts: Sequence[MergeRecipe],
    planned: PlannedTensor,
    read: Callable[[str, str], torch.Tensor],
) -> tuple[MergeRecipe, MergeInputs]:
    """The slice's own recipe (``parts``: :meth:`MergeRecipe.slice_recipe` of every slice, built once per
    merge) and the kernel inputs for one planned tensor; ``read(model, name)`` gives a float tensor of one
    source model. The slice's base model, when one of its sources, supplies the base tensor; the other
    sources (those the slice recipe merges) the experts, in order."""
    part = parts[planned.part]
    sources = recipe.slices[planned.part].sources
    base = None
    if part.base_model is not None:
        for j, source in enumerate(sources):
            if same_path(source.model, part.base_model):
                base = read(source.model, planned.inputs[j])
                break
    experts = [read(sources[j].model, planned.inputs[j]) for j in part.expert_indices()]
    return part, MergeInputs.from_tensors(base, experts)


def _reference_path(recipe: MergeRecipe) -> str:
    """The model whose config and non-layer tensor names the output takes (mergekit: the base, else the
    first model named)."""
    return recipe.base_model or recipe.slices[0].sources[0].model


def merge_sliced_streaming(
    recipe: MergeRecipe,
    out_dir: str | Path,
    *,
    overwrite: bool = False,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    progress: Callable[[int, int, str], None] | None = None,
    device: str | torch.device = "cpu",
    allow_pickle: bool = False,
    warn: Callable[[str], None] | None = None,
) -> Path:
    """Merge a sliced recipe into ``out_dir`` (see :func:`~evomerge.merging.executor.merge_streaming` for
    the guarantees: everything is checked before anything is written, and a failure leaves nothing)."""
    if recipe.tokenizer_source == "union" or recipe.tokens:
        raise RecipeError("tokenizer_source: union and tokens are not supported with slices")
    device = torch.device(device)
    writer = ModelWriter(out_dir, max_shard_bytes=max_shard_bytes, overwrite=overwrite)
    with ExitStack() as stack:
        models: dict[str, ModelDir] = {}
        for path in recipe.referenced_models():
            model = stack.enter_context(ModelDir(path, allow_pickle=allow_pickle))
            if model.is_pickle and warn is not None:
                warn(f"{model.path}: loaded pickle weights with weights_only=True (--allow-pickle)")
            models[path] = model

        def model_of(path: str) -> ModelDir:
            return next(m for p, m in models.items() if same_path(p, path))

        reference = model_of(_reference_path(recipe))
        ref_arch = architecture(reference)
        for model in models.values():
            arch = architecture(model)
            if ref_arch is not None and arch is not None and arch != ref_arch:
                raise RecipeError(
                    f"models have different architectures: {reference.path} is {ref_arch}, "
                    f"{model.path} is {arch}"
                )
        infos = reference.infos()
        plan, source_layers = plan_slices(
            recipe.slices, list(infos), {p: model_of(p).num_layers for p in models}
        )
        _check_inputs(recipe, plan, infos, model_of)
        tokenizer_dir = Path(recipe.tokenizer_path()).expanduser()
        if not tokenizer_dir.is_dir():
            raise CheckpointError(f"tokenizer_source is not a directory: {tokenizer_dir}")
        out_dtype = recipe.torch_dtype(reference.torch_dtype)
        config = sliced_config(reference.config, source_layers)
        templates = {p.out_name: _template(p) for p in plan}
        parts = [recipe.slice_recipe(i) for i in range(len(recipe.slices))]
        shapes = [
            (
                p.out_name,
                infos[templates[p.out_name]].shape,
                out_dtype
                if infos[templates[p.out_name]].is_float
                else torch_dtype_from_safetensors(infos[templates[p.out_name]].dtype),
            )
            for p in plan
        ]

        def read(path: str, name: str) -> torch.Tensor:
            return model_of(path).read(name).to(device, torch.float32)

        with writer:
            writer.plan(shapes)
            check_disk_space(writer.out_dir, writer.total_bytes)
            for done, planned in enumerate(plan, start=1):
                first = recipe.slices[planned.part].sources[0]
                if not infos[templates[planned.out_name]].is_float:
                    writer.add(planned.out_name, model_of(first.model).read(planned.inputs[0]))
                else:
                    part, inputs = slice_inputs(recipe, parts, planned, read)
                    merged = run_kernel(
                        part.method, part, planned.out_name, len(source_layers), inputs, t=planned.t
                    )
                    writer.add(planned.out_name, merged.to(out_dtype))
                if progress is not None:
                    progress(done, len(plan), planned.out_name)
            return writer.finalize(
                config,
                dtype=out_dtype,
                tokenizer_source=tokenizer_dir,
                model_card=model_card(recipe, title=writer.out_dir.name),
                chat_template=resolve_chat_template(recipe.chat_template, recipe.referenced_models()),
            )
    raise AssertionError("unreachable")  # pragma: no cover


def _template(planned: PlannedTensor) -> str:
    """The reference tensor an output tensor has the shape and dtype of (layer tensors: layer 0's)."""
    name = planned.out_name
    return with_layer(name, 0) if layer_index(name) is not None else name


def _check_inputs(
    recipe: MergeRecipe,
    plan: Sequence[PlannedTensor],
    infos: Mapping[str, Any],
    model_of: Callable[[str], ModelDir],
) -> None:
    """Every input tensor exists in its model with the shape of the tensor it stands for (headers only)."""
    for planned in plan:
        want = infos[_template(planned)]
        for source, name in zip(recipe.slices[planned.part].sources, planned.inputs, strict=True):
            model = model_of(source.model)
            have = model.infos().get(name)
            if have is None:
                raise RecipeError(f"model {model.path} lacks tensor {name!r}")
            if have.shape != want.shape:
                raise RecipeError(
                    f"tensor {name!r} has shape {list(have.shape)} in {model.path} but the output's "
                    f"{planned.out_name!r} needs {list(want.shape)}"
                )
