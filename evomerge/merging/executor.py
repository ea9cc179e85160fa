"""Executors: run a recipe's kernels over whole models, streaming to disk or in memory.

Both executors feed kernels identical inputs (see :class:`~evomerge.merging.inputs.MergeInputs`: with a
base model, ``base + task vectors`` computed in float32; without one, the experts in float32), resolve
parameters the same way and seed kernels per tensor with :func:`~evomerge.merging.inputs.tensor_seed`, so
for the same recipe they produce bit-identical tensors.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import torch

from evomerge.checkpoints.model_dir import ModelDir, TensorInfo
from evomerge.checkpoints.writer import DEFAULT_MAX_SHARD_BYTES, ModelWriter
from evomerge.errors import CheckpointError, RecipeError
from evomerge.merging.inputs import MergeInputs, tensor_seed
from evomerge.merging.recipe import MergeRecipe, check_layer_lists, resolve_params
from evomerge.merging.registry import MergeMethod

__all__ = [
    "InMemoryMerger",
    "ProgressCallback",
    "check_compatible",
    "merge_streaming",
    "model_card",
]

ProgressCallback = Callable[[int, int, str], None]
"""Called after each tensor as ``progress(done, total, tensor_name)``."""


def check_compatible(reference: ModelDir, others: Sequence[ModelDir]) -> dict[str, TensorInfo]:
    """Check that every model has the reference's tensors with the same shapes (headers only).

    Returns the reference's tensor infos; raises RecipeError naming the first differing tensor and model.
    """
    ref_infos = reference.infos()
    for other in others:
        infos = other.infos()
        for name, info in ref_infos.items():
            theirs = infos.get(name)
            if theirs is None:
                raise RecipeError(f"model {other.path} lacks tensor {name!r} that {reference.path} has")
            if theirs.shape != info.shape:
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
    lines += [f"- `{entry.model}`" for entry in recipe.expert_models()]
    lines += ["", "## Recipe", "", "```yaml", recipe.to_yaml().rstrip("\n"), "```", ""]
    return "\n".join(lines)


def _merge_one(
    method: MergeMethod,
    recipe: MergeRecipe,
    name: str,
    num_layers: int,
    inputs: MergeInputs,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    params, global_params = resolve_params(recipe, name, num_layers)
    merged = method.kernel(inputs, params, global_params, tensor_seed(recipe.seed, name))
    return merged.to(out_dtype)


def merge_streaming(
    recipe: MergeRecipe,
    out_dir: str | Path,
    *,
    overwrite: bool = False,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    progress: ProgressCallback | None = None,
) -> Path:
    """Merge tensor by tensor into ``out_dir``; returns the written directory.

    Memory stays bounded by a few tensors plus one shard. Everything that can be checked is checked
    before anything is written: the output path (OutputExistsError), the model directories
    (CheckpointError), tensor names and shapes across models and per-layer list lengths (RecipeError).
    On any failure ``out_dir`` is left untouched and no temporary directory remains.
    """
    method = recipe.method
    writer = ModelWriter(out_dir, max_shard_bytes=max_shard_bytes, overwrite=overwrite)
    with ExitStack() as stack:
        base = stack.enter_context(ModelDir(recipe.base_model)) if recipe.base_model else None
        experts = [stack.enter_context(ModelDir(entry.model)) for entry in recipe.expert_models()]
        reference = base if base is not None else experts[0]
        infos = check_compatible(reference, [m for m in experts if m is not reference])
        num_layers = reference.num_layers
        check_layer_lists(recipe, num_layers)
        tokenizer_dir = Path(recipe.tokenizer_path()).expanduser()
        if not tokenizer_dir.is_dir():
            raise CheckpointError(f"tokenizer_source is not a directory: {tokenizer_dir}")
        out_dtype = recipe.torch_dtype(reference.torch_dtype)

        names = list(infos)
        with writer:
            for done, name in enumerate(names, start=1):
                if not infos[name].is_float:
                    writer.add(name, reference.read(name))  # integer/bool buffers: copied from the reference
                else:
                    inputs = MergeInputs.from_tensors(
                        base.read(name) if base is not None else None, [m.read(name) for m in experts]
                    )
                    writer.add(name, _merge_one(method, recipe, name, num_layers, inputs, out_dtype))
                if progress is not None:
                    progress(done, len(names), name)
            return writer.finalize(
                reference.config,
                dtype=out_dtype,
                tokenizer_source=tokenizer_dir,
                model_card=model_card(recipe, title=writer.out_dir.name),
            )


def _path_key(path: str | Path) -> str:
    return str(Path(path).expanduser().resolve())


class InMemoryMerger:
    """Keeps a base model and task vectors resident (float32 on ``device``) and builds merged state dicts.

    Loading reads each model once: the base ``b`` and, per expert, ``d_i = x_i - b`` (the experts
    themselves when there is no base, which only base-free methods such as ``linear`` accept). Each
    :meth:`merge` then runs the kernels over resident tensors without touching disk. Recipes refer to the
    loaded models by path (compared after resolving, so ``./a`` and ``/abs/a`` match); a recipe may use a
    subset of the loaded experts, in any order.

    For the same recipe the tensors equal those :func:`merge_streaming` writes, bit for bit, provided the
    recipe names the same base (a ``linear`` recipe without ``base_model`` run on a merger with a base sees
    experts as ``b + d_i``, equal up to float32 rounding).
    """

    def __init__(
        self,
        base_dir: str | Path | None,
        expert_dirs: Sequence[str | Path],
        device: str | torch.device = "cpu",
    ) -> None:
        if not expert_dirs:
            raise RecipeError("InMemoryMerger needs at least one expert model")
        self._device = torch.device(device)
        self._base_key = _path_key(base_dir) if base_dir is not None else None
        self._expert_keys = [_path_key(p) for p in expert_dirs]
        self._base_path = Path(base_dir) if base_dir is not None else None
        self._expert_paths = [Path(p) for p in expert_dirs]
        with ExitStack() as stack:
            base = stack.enter_context(ModelDir(base_dir)) if base_dir is not None else None
            experts = [stack.enter_context(ModelDir(p)) for p in expert_dirs]
            reference = base if base is not None else experts[0]
            infos = check_compatible(reference, [m for m in experts if m is not reference])
            self._names = list(infos)
            self._num_layers = reference.num_layers
            self._config: dict[str, Any] = dict(reference.config)
            self._ref_dtype = reference.torch_dtype
            self._fixed: dict[str, torch.Tensor] = {}
            self._float_names = [n for n in self._names if infos[n].is_float]
            for name in self._names:
                if not infos[name].is_float:
                    self._fixed[name] = reference.read(name).to(self._device, copy=True)
            self._base: dict[str, torch.Tensor] | None = None
            if base is not None:
                self._base = {
                    n: base.read(n).to(self._device, torch.float32, copy=True) for n in self._float_names
                }
            self._vectors: list[dict[str, torch.Tensor]] = []
            for model in experts:
                vector: dict[str, torch.Tensor] = {}
                for n in self._float_names:
                    x = model.read(n).to(self._device, torch.float32)
                    vector[n] = x - self._base[n] if self._base is not None else x.clone()
                self._vectors.append(vector)

    # ------------------------------------------------------------------ properties
    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def tensor_names(self) -> list[str]:
        return list(self._names)

    @property
    def num_layers(self) -> int:
        return self._num_layers

    @property
    def config(self) -> dict[str, Any]:
        """config.json of the base model (or the first expert without base)."""
        return dict(self._config)

    @property
    def base_path(self) -> Path | None:
        return self._base_path

    @property
    def expert_paths(self) -> list[Path]:
        return list(self._expert_paths)

    # ------------------------------------------------------------------ merging
    def _select(self, recipe: MergeRecipe) -> list[int | None]:
        """Index of the loaded expert for each recipe model (None: the base itself, a zero task vector)."""
        method = recipe.method
        if recipe.base_model is not None:
            if self._base_key is None:
                raise RecipeError(
                    f"base_model: recipe names {recipe.base_model!r} but this merger holds no base model"
                )
            if _path_key(recipe.base_model) != self._base_key:
                raise RecipeError(
                    f"base_model: {recipe.base_model!r} is not the loaded base model ({self._base_path})"
                )
        elif method.needs_base:
            raise RecipeError(f"base_model: merge method {method.name!r} needs a base model")
        selected: list[int | None] = []
        for entry in recipe.expert_models():
            key = _path_key(entry.model)
            if key in self._expert_keys:
                selected.append(self._expert_keys.index(key))
            elif key == self._base_key:
                selected.append(None)
            else:
                loaded = ", ".join(str(p) for p in self._expert_paths)
                raise RecipeError(f"models: {entry.model!r} is not among the loaded experts ({loaded})")
        return selected

    def _inputs(self, name: str, selected: Sequence[int | None]) -> MergeInputs:
        if self._base is None:
            experts = tuple(self._vectors[j][name] for j in selected if j is not None)
            return MergeInputs(base=None, experts=experts)
        base = self._base[name]
        deltas = tuple(torch.zeros_like(base) if j is None else self._vectors[j][name] for j in selected)
        return MergeInputs(base=base, deltas=deltas)

    def iter_merged(self, recipe: MergeRecipe) -> Iterator[tuple[str, torch.Tensor]]:
        """Yield ``(name, tensor)`` for every tensor of the merged model, in checkpoint order.

        Float tensors come out in the recipe's dtype (default: the base config's dtype) on the merger's
        device; integer buffers are copies of the reference model's.
        """
        selected = self._select(recipe)  # errors surface here, before the first tensor is asked for
        check_layer_lists(recipe, self._num_layers)
        return self._generate(recipe, selected)

    def _generate(
        self, recipe: MergeRecipe, selected: Sequence[int | None]
    ) -> Iterator[tuple[str, torch.Tensor]]:
        method = recipe.method
        out_dtype = recipe.torch_dtype(self._ref_dtype)
        for name in self._names:
            fixed = self._fixed.get(name)
            if fixed is not None:
                yield name, fixed.clone()
                continue
            inputs = self._inputs(name, selected)
            yield name, _merge_one(method, recipe, name, self._num_layers, inputs, out_dtype)

    def merge(self, recipe: MergeRecipe) -> dict[str, torch.Tensor]:
        """The merged state dict for ``recipe`` (see :meth:`iter_merged`)."""
        return dict(self.iter_merged(recipe))
