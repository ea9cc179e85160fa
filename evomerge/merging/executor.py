"""Executors: run a recipe's kernels over whole models, streaming to disk or in memory.

Both executors feed kernels identical inputs (see :class:`~evomerge.merging.inputs.MergeInputs`: with a
base model, ``base + task vectors`` computed in float32; without one, the experts in float32), resolve
parameters the same way and seed kernels per tensor with :func:`~evomerge.merging.inputs.tensor_seed`, so
for the same recipe they produce bit-identical tensors.
"""

from __future__ import annotations

import logging
import tempfile
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from evomerge.checkpoints.model_dir import ModelDir, TensorInfo, torch_dtype_from_safetensors
from evomerge.checkpoints.writer import DEFAULT_MAX_SHARD_BYTES, ModelWriter
from evomerge.errors import CheckpointError, RecipeError
from evomerge.merging.chat_templates import resolve_chat_template
from evomerge.merging.execution import check_compatible, check_disk_space, merge_one, model_card, run_kernel
from evomerge.merging.inputs import MergeInputs
from evomerge.merging.recipe import MergeRecipe
from evomerge.merging.sliced import merge_sliced_streaming, slice_inputs
from evomerge.merging.slices import PlannedTensor, plan_slices, sliced_config
from evomerge.merging.vocab import VocabAlignment, union_vocab, vocab_tensors

__all__ = [
    "InMemoryMerger",
    "ProgressCallback",
    "check_compatible",
    "merge_streaming",
    "model_card",
]

ProgressCallback = Callable[[int, int, str], None]
"""Called after each tensor as ``progress(done, total, tensor_name)``."""

WarningCallback = Callable[[str], None]
"""Receives one-line warnings (non-finite inputs, differing vocabulary sizes)."""

_log = logging.getLogger("evomerge.merge")

PREFETCH = 3
"""Tensors read ahead of the one being merged (reading overlaps computing and writing)."""

READERS = 2
"""Reader threads (reading and converting is the bottleneck of the cheap methods)."""


@dataclass(frozen=True)
class _Job:
    """What the reader hands the merger for one tensor."""

    name: str
    inputs: MergeInputs | None
    fixed: torch.Tensor | None
    tail: torch.Tensor | None
    """Reference rows beyond the vocabulary rows all models share (copied as they are)."""
    warnings: list[str]


class _Reader:
    """Reads and prepares one tensor of every model (runs on the prefetch thread)."""

    def __init__(
        self,
        base: ModelDir | None,
        experts: Sequence[ModelDir],
        infos: dict[str, TensorInfo],
        shared_rows: dict[str, int],
        device: torch.device,
        strict: bool,
        vocab: tuple[VocabAlignment, dict[ModelDir, str]] | None = None,
    ) -> None:
        self.vocab = vocab
        """``tokenizer_source: union``: the alignment and each model's path in it."""
        self.base = base
        self.experts = experts
        self.reference = base if base is not None else experts[0]
        self.infos = infos
        self.shared_rows = shared_rows
        self.device = device
        self.strict = strict

    def _check(
        self, model: ModelDir, name: str, tensor: torch.Tensor, source: torch.Tensor, warnings: list[str]
    ) -> None:
        """Warn (or, strict, fail) when ``source`` holds NaN/Inf; ``tensor`` is a float32 tensor derived
        from it elementwise, whose sum (one read-only pass) is non-finite whenever ``source`` is."""
        if bool(torch.isfinite(tensor.sum())):
            return
        bad = int((~torch.isfinite(source)).sum())
        if bad == 0:  # the sum overflowed on large finite values
            return
        message = f"{model.path}: tensor {name!r} has {bad} NaN/Inf values"
        if self.strict:
            raise CheckpointError(message + " (--strict)")
        warnings.append(message + "; they propagate into the merge")

    def _raws(self, name: str) -> dict[ModelDir, torch.Tensor]:
        """Every model's tensor ``name`` as the merge takes it: the shared vocabulary rows, or with
        ``tokenizer_source: union`` the rows laid out in the union's token order."""
        models = ([self.base] if self.base is not None else []) + list(self.experts)
        if self.vocab is not None and name in self.vocab[0].tensors:
            alignment, paths = self.vocab
            aligned = alignment.align({paths[m]: m.read(name) for m in paths})
            return {m: aligned[paths[m]] for m in models}
        rows = self.shared_rows.get(name)
        return {m: m.read(name)[:rows] if rows is not None else m.read(name) for m in models}

    def __call__(self, name: str) -> _Job:
        if not self.infos[name].is_float:
            return _Job(name, None, self.reference.read(name), None, [])
        raws = self._raws(name)
        warnings: list[str] = []
        if self.base is None:
            experts: list[torch.Tensor] = []
            for model in self.experts:
                raw = raws[model]
                x = raw.to(self.device, torch.float32)
                self._check(model, name, x, raw, warnings)
                experts.append(x)
            inputs = MergeInputs(base=None, experts=tuple(experts))
        else:
            raw_base = raws[self.base]
            base = raw_base.to(self.device, torch.float32)
            self._check(self.base, name, base, raw_base, warnings)
            deltas: list[torch.Tensor] = []
            for model in self.experts:
                raw = raws[model].to(self.device)
                delta = torch.sub(raw, base)  # promoted to float32 in one pass: x_i - b
                self._check(model, name, delta, raw, warnings)
                deltas.append(delta)
            inputs = MergeInputs(base=base, deltas=tuple(deltas))
        tail = None
        rows = self.shared_rows.get(name)
        if rows is not None and self.infos[name].shape[0] > rows:
            tail = self.reference.read(name)[rows:]
        return _Job(name, inputs, None, tail, warnings)


def merge_streaming(
    recipe: MergeRecipe,
    out_dir: str | Path,
    *,
    overwrite: bool = False,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    progress: ProgressCallback | None = None,
    device: str | torch.device = "cpu",
    strict: bool = False,
    allow_pickle: bool = False,
    warn: WarningCallback | None = None,
) -> Path:
    """Merge tensor by tensor into ``out_dir``; returns the written directory.

    Pipeline: :data:`READERS` reader threads read each input tensor once (``pread``, no memory map) up to
    :data:`PREFETCH` tensors ahead and converts it to float32 on ``device``; the caller's thread runs the
    kernel; a writer thread streams each result straight into its pre-planned safetensors shard. Peak
    memory is a few tensors per model, whatever the model or shard size.

    Everything that can be checked is checked before anything is written: the output path
    (OutputExistsError), the model directories (CheckpointError; pickle-only weights are refused unless
    ``allow_pickle``, then loaded with ``weights_only=True``), architectures, tensor names and shapes
    across models, the recipe's layer range (RecipeError), and free disk space. Embedding/lm_head tensors
    whose vocabulary sizes differ are merged over the rows all models share, the base's extra rows are
    kept, and a warning says so (mergekit truncates the same way). NaN/Inf in an input tensor is a
    warning naming it (``strict``: a CheckpointError). On any failure, including a full disk, ``out_dir``
    is left untouched and no temporary directory remains.
    """
    say = warn if warn is not None else _log.warning
    if recipe.num_layers is not None:
        with ModelDir(recipe.base_model or recipe.models[0].model, allow_pickle=allow_pickle) as first:
            recipe = recipe.for_layers(first.num_layers)
    if recipe.slices:
        return merge_sliced_streaming(
            recipe,
            out_dir,
            overwrite=overwrite,
            max_shard_bytes=max_shard_bytes,
            progress=progress,
            device=device,
            allow_pickle=allow_pickle,
            warn=say,
        )
    method = recipe.method
    device = torch.device(device)
    writer = ModelWriter(out_dir, max_shard_bytes=max_shard_bytes, overwrite=overwrite)
    with ExitStack() as stack:

        def open_model(path: str) -> ModelDir:
            model = stack.enter_context(ModelDir(path, allow_pickle=allow_pickle))
            if model.is_pickle:
                say(f"{model.path}: loaded pickle weights with weights_only=True (--allow-pickle)")
            return model

        base = open_model(recipe.base_model) if recipe.base_model else None
        experts = [open_model(entry.model) for entry in recipe.expert_models()]
        reference = base if base is not None else experts[0]
        shared_rows: dict[str, int] = {}
        infos = check_compatible(
            reference, [m for m in experts if m is not reference], shared_rows=shared_rows
        )
        vocab = None
        tokenizer_tmp = stack.enter_context(tempfile.TemporaryDirectory(prefix="evomerge-union-"))
        if recipe.tokenizer_source == "union" or recipe.tokens:
            alignment = union_vocab(
                recipe.base_model,
                [e.model for e in recipe.expert_models()],
                recipe.tokenizer_source,
                recipe.tokens,
            )
            models = ([base] if base is not None else []) + experts
            paths = dict(zip(models, _recipe_paths(recipe), strict=True))
            vocab = (alignment, paths)
            infos = dict(infos)
            for name in vocab_tensors(reference, infos):
                alignment.tensors.add(name)
                shared_rows.pop(name, None)
                infos[name] = replace(infos[name], shape=(alignment.size, *infos[name].shape[1:]))
            alignment.tokenizer.save_pretrained(tokenizer_tmp)
        for name, rows in shared_rows.items():
            say(
                f"vocabulary sizes differ for {name!r}: merged the {rows} rows all models share; rows "
                f"{rows}..{infos[name].shape[0] - 1} are copied from {reference.path}"
            )
        num_layers = reference.num_layers
        tokenizer_dir = Path(tokenizer_tmp) if vocab else Path(recipe.tokenizer_path()).expanduser()
        if not tokenizer_dir.is_dir():
            raise CheckpointError(f"tokenizer_source is not a directory: {tokenizer_dir}")
        out_dtype = recipe.torch_dtype(reference.torch_dtype)
        config = dict(reference.config)
        if vocab is not None:
            config["vocab_size"] = vocab[0].size
        names = list(infos)
        plan = [
            (
                n,
                infos[n].shape,
                out_dtype if infos[n].is_float else torch_dtype_from_safetensors(infos[n].dtype),
            )
            for n in names
        ]
        reader = _Reader(base, experts, infos, shared_rows, device, strict, vocab)
        with writer, ThreadPoolExecutor(max_workers=READERS, thread_name_prefix="evomerge-read") as pool:
            writer.plan(plan)
            check_disk_space(writer.out_dir, writer.total_bytes)
            pending: deque[Future[_Job]] = deque(pool.submit(reader, n) for n in names[:PREFETCH])
            for done, name in enumerate(names, start=1):
                job = pending.popleft().result()
                if done - 1 + PREFETCH < len(names):
                    pending.append(pool.submit(reader, names[done - 1 + PREFETCH]))
                for message in job.warnings:
                    say(message)
                if job.inputs is None:
                    assert job.fixed is not None
                    writer.add(name, job.fixed)  # integer/bool buffers: copied from the reference
                else:
                    merged = run_kernel(method, recipe, name, num_layers, job.inputs).to(out_dtype)
                    if job.tail is not None:
                        merged = torch.cat([merged, job.tail.to(merged.device, out_dtype)])
                    writer.add(name, merged)
                del job
                if progress is not None:
                    progress(done, len(names), name)
            return writer.finalize(
                config,
                dtype=out_dtype,
                tokenizer_source=tokenizer_dir,
                model_card=model_card(recipe, title=writer.out_dir.name),
                chat_template=resolve_chat_template(recipe.chat_template, recipe.referenced_models()),
            )
    raise AssertionError("unreachable")  # pragma: no cover


def _recipe_paths(recipe: MergeRecipe) -> list[str]:
    """The recipe's model paths in the order merge_streaming opens them (the base first)."""
    return ([recipe.base_model] if recipe.base_model else []) + [e.model for e in recipe.expert_models()]


def _path_key(path: str | Path) -> str:
    return str(Path(path).expanduser().resolve())


class InMemoryMerger:
    """Keeps a base model and task vectors resident (float32 on ``device``) and builds merged state dicts.

    ``dtype`` bfloat16 (or float16) keeps them in half the memory (a 7B base and two task vectors: 46 GB
    instead of 91 GB): the task vectors are computed in float32 and rounded once, and each tensor is
    computed in float32 when merged; the merged weights then differ from :func:`merge_streaming`'s by that
    rounding of the task vectors (and of the base, when its checkpoint is float32).

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
        dtype: torch.dtype = torch.float32,
    ) -> None:
        if not expert_dirs:
            raise RecipeError("InMemoryMerger needs at least one expert model")
        if dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise RecipeError(f"InMemoryMerger keeps float32, bfloat16 or float16 tensors, not {dtype}")
        self._device = torch.device(device)
        self._dtype = dtype
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
                    d = x - self._base[n] if self._base is not None else x.clone()
                    vector[n] = d if dtype == torch.float32 else d.to(dtype)  # rounded once, kept small
                self._vectors.append(vector)
            if self._base is not None and dtype != torch.float32:
                self._base = {n: b.to(dtype) for n, b in self._base.items()}

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
        def f32(t: torch.Tensor) -> torch.Tensor:  # the kernels compute in float32
            return t if t.dtype == torch.float32 else t.float()

        if self._base is None:
            experts = tuple(f32(self._vectors[j][name]) for j in selected if j is not None)
            return MergeInputs(base=None, experts=experts)
        base = f32(self._base[name])
        deltas = tuple(torch.zeros_like(base) if j is None else f32(self._vectors[j][name]) for j in selected)
        return MergeInputs(base=base, deltas=deltas)

    def resident_tensors(
        self, recipe: MergeRecipe
    ) -> dict[str, tuple[torch.Tensor, tuple[torch.Tensor, ...]]]:
        """The resident float tensors ``recipe`` merges, per tensor name in checkpoint order: the base and
        one task vector per recipe model, as they are kept (``resident_dtype``: no float32 copy is made;
        for gradient polish, which merges them itself). Read-only."""
        selected = self._select(recipe)
        if self._base is None:
            raise RecipeError("resident_tensors: needs a base model (task vectors are taken against it)")
        out = {}
        for name in self._float_names:
            base = self._base[name]
            deltas = tuple(torch.zeros_like(base) if j is None else self._vectors[j][name] for j in selected)
            out[name] = (base, deltas)
        return out

    def iter_merged(self, recipe: MergeRecipe) -> Iterator[tuple[str, torch.Tensor]]:
        """Yield ``(name, tensor)`` for every tensor of the merged model, in checkpoint order.

        Float tensors come out in the recipe's dtype (default: the base config's dtype) on the merger's
        device; integer buffers are copies of the reference model's.
        """
        recipe = recipe.for_layers(self._num_layers)
        if recipe.tokenizer_source == "union" or recipe.tokens:
            raise RecipeError(
                "tokenizer_source: union and tokens build a new vocabulary; in-memory candidates share the "
                "loaded models' (merge it with `evomerge merge`)"
            )
        if recipe.slices:
            return self._generate_sliced(recipe)
        selected = self._select(recipe)  # errors surface here, before the first tensor is asked for
        return self._generate(recipe, selected)

    def output_config(self, recipe: MergeRecipe) -> dict[str, Any]:
        """config.json of the model ``recipe`` builds (a sliced recipe changes the layer count)."""
        recipe = recipe.for_layers(self._num_layers)
        if not recipe.slices:
            return self.config
        _, source_layers = self._plan(recipe)
        return sliced_config(self._config, source_layers)

    def _plan(self, recipe: MergeRecipe) -> tuple[list[PlannedTensor], list[int]]:
        """The sliced recipe's tensor plan over the loaded models (RecipeError for a model not loaded)."""
        for path in recipe.referenced_models():
            if self._key_of(path) is None:
                loaded = ", ".join(str(p) for p in [self._base_path, *self._expert_paths] if p is not None)
                raise RecipeError(f"slices: {path!r} is not among the loaded models ({loaded})")
        layers = {path: self._num_layers for path in recipe.referenced_models()}
        return plan_slices(recipe.slices, self._names, layers)

    def _key_of(self, path: str) -> int | str | None:
        """``"base"`` for the loaded base, the expert's index, or None when ``path`` is not loaded."""
        key = _path_key(path)
        if key == self._base_key:
            return "base"
        return self._expert_keys.index(key) if key in self._expert_keys else None

    def _resident(self, path: str, name: str) -> torch.Tensor:
        """Model ``path``'s tensor ``name`` in float32, rebuilt from the resident base and task vector."""
        which = self._key_of(path)
        if which == "base":
            assert self._base is not None
            return self._base[name].float()
        assert isinstance(which, int)
        vector = self._vectors[which][name].float()
        return vector if self._base is None else self._base[name].float() + vector

    def _generate_sliced(self, recipe: MergeRecipe) -> Iterator[tuple[str, torch.Tensor]]:
        plan, source_layers = self._plan(recipe)  # errors surface before the first tensor
        out_dtype = recipe.torch_dtype(self._ref_dtype)
        return self._sliced_tensors(recipe, plan, len(source_layers), out_dtype)

    def _sliced_tensors(
        self, recipe: MergeRecipe, plan: Sequence[PlannedTensor], num_layers: int, out_dtype: torch.dtype
    ) -> Iterator[tuple[str, torch.Tensor]]:
        parts = [recipe.slice_recipe(i) for i in range(len(recipe.slices))]
        for planned in plan:
            fixed = self._fixed.get(planned.inputs[0])
            if fixed is not None:
                yield planned.out_name, fixed.clone()
                continue
            part, inputs = slice_inputs(recipe, parts, planned, self._resident)
            merged = run_kernel(part.method, part, planned.out_name, num_layers, inputs, t=planned.t)
            yield planned.out_name, merged.to(out_dtype)

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
            yield name, merge_one(method, recipe, name, self._num_layers, inputs, out_dtype)

    def merge(self, recipe: MergeRecipe) -> dict[str, torch.Tensor]:
        """The merged state dict for ``recipe`` (see :meth:`iter_merged`)."""
        return dict(self.iter_merged(recipe))
