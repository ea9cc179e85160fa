"""What both executors share: compatibility checks, the model card, the disk-space check and running one
tensor's kernel with the recipe's parameters resolved for it."""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from pathlib import Path

import torch

from evomerge.checkpoints.layers import tensor_group
from evomerge.checkpoints.model_dir import ModelDir, TensorInfo
from evomerge.errors import CheckpointError, RecipeError
from evomerge.merging.inputs import MergeInputs, tensor_seed
from evomerge.merging.recipe import MergeRecipe, resolve_params
from evomerge.merging.registry import MergeMethod

__all__ = ["check_compatible", "check_disk_space", "model_card", "run_kernel"]


def architecture(model: ModelDir) -> str | None:
    archs = model.config.get("architectures")
    if isinstance(archs, list) and archs and isinstance(archs[0], str):
        return archs[0]
    model_type = model.config.get("model_type")
    return model_type if isinstance(model_type, str) else None


def _is_vocab_tensor(name: str) -> bool:
    return tensor_group(name) in ("embed", "lm_head")


def check_compatible(
    reference: ModelDir, others: Sequence[ModelDir], *, shared_rows: dict[str, int] | None = None
) -> dict[str, TensorInfo]:
    """Check that every model has the reference's architecture and tensors with the same shapes (headers
    only). Returns the reference's tensor infos; raises RecipeError naming the first differing tensor and
    model.

    With ``shared_rows`` (a dict to fill), embedding and lm_head tensors may differ in their first dimension
    (vocabulary size): the number of rows all models share is recorded there instead of raising.
    """
    ref_arch = architecture(reference)
    ref_infos = reference.infos()
    for other in others:
        arch = architecture(other)
        if ref_arch is not None and arch is not None and arch != ref_arch:
            raise RecipeError(
                f"models have different architectures: {reference.path} is {ref_arch}, {other.path} is {arch}"
            )
        infos = other.infos()
        for name, info in ref_infos.items():
            theirs = infos.get(name)
            if theirs is None:
                raise RecipeError(f"model {other.path} lacks tensor {name!r} that {reference.path} has")
            if (
                shared_rows is not None
                and theirs.shape != info.shape
                and _is_vocab_tensor(name)
                and len(info.shape) == len(theirs.shape) >= 1
                and info.shape[1:] == theirs.shape[1:]
            ):
                rows = min(shared_rows.get(name, info.shape[0]), theirs.shape[0])
                shared_rows[name] = rows
            elif theirs.shape != info.shape:
                raise RecipeError(
                    f"tensor {name!r} has shape {list(theirs.shape)} in {other.path} "
                    f"but {list(info.shape)} in {reference.path}"
                )
            if theirs.is_float != info.is_float:
                raise RecipeError(
                    f"tensor {name!r} is {theirs.dtype} in {other.path} but {info.dtype} in {reference.path}"
                )
        for name in infos:
            if name not in ref_infos:
                raise RecipeError(f"model {other.path} has tensor {name!r} that {reference.path} lacks")
    return ref_infos


def model_card(recipe: MergeRecipe, title: str | None = None) -> str:
    """A README model card that states the recipe."""
    method = recipe.method
    lines = [
        "---",
        "library_name: transformers",
        "tags:",
        "- merge",
        "- evomerge",
        "---",
        "",
        f"# {title or 'Merged model'}",
        "",
        f"This model was merged with evomerge using the `{method.name}` method: {method.doc}",
        "",
    ]
    if recipe.base_model:
        lines += [f"Base model: `{recipe.base_model}`", ""]
    lines.append("Models merged:")
    models = recipe.referenced_models() if recipe.slices else [e.model for e in recipe.expert_models()]
    lines += [f"- `{path}`" for path in models if path != recipe.base_model]
    lines += ["", "## Recipe", "", "```yaml", recipe.to_yaml().rstrip("\n"), "```", ""]
    return "\n".join(lines)


def merge_one(
    method: MergeMethod,
    recipe: MergeRecipe,
    name: str,
    num_layers: int,
    inputs: MergeInputs,
    out_dtype: torch.dtype,
    t: float | None = None,
) -> torch.Tensor:
    return run_kernel(method, recipe, name, num_layers, inputs, t=t).to(out_dtype)


def check_disk_space(out_dir: Path, needed: int) -> None:
    parent = out_dir.expanduser().absolute().parent
    while not parent.exists():
        parent = parent.parent
    free = shutil.disk_usage(parent).free
    if free < needed:
        raise CheckpointError(
            f"not enough disk space for {out_dir}: the merged model needs {needed / 1e9:.2f} GB, "
            f"{free / 1e9:.2f} GB are free"
        )


def run_kernel(
    method: MergeMethod,
    recipe: MergeRecipe,
    name: str,
    num_layers: int,
    inputs: MergeInputs,
    *,
    t: float | None = None,
) -> torch.Tensor:
    """The kernel's result for tensor ``name`` (float32), parameters resolved for it (at ``t`` when given,
    see :func:`~evomerge.merging.recipe.resolve`) and inputs rounded to the recipe's compute dtype."""
    try:
        params, global_params = resolve_params(recipe, name, num_layers, t=t)
        compute = inputs.in_compute_dtype(recipe.compute_torch_dtype())
        return method.kernel(compute, params, global_params, tensor_seed(recipe.seed, name))
    except ValueError as exc:
        raise RecipeError(f"tensor {name!r}: {exc}") from None
