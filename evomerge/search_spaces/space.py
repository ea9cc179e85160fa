"""Genome <-> recipe: which merge parameters are searched, at which granularity, within which bounds.

A genome is a flat ``dict[str, float]`` (what an Optuna trial's ``params`` holds). Gene names read
``<expert>.<param>[.<part>].g<k>``: expert alias, parameter (``weight``, ``density``, ...), optional part
(``attn``/``mlp`` when attention and MLP get their own values) and layer group ``k``.

Granularity:
- ``global``: one value per expert and parameter.
- ``layer_group``: one value per group of ``group_size`` consecutive layers.
- ``layer``: one value per layer.
- ``control_points``: ``control_points`` values per expert and parameter, evenly spaced over the layer
  stack (first and last layer included) and linearly interpolated between: a smooth per-layer profile
  with a few genes (gene ``g<k>`` is control point ``k``).

``global_params`` searches method-wide parameters too (``lambda``, slerp's ``t``, sce's ``select_topk``,
...): genes ``(global).<param>[.<part>].g<k>``, one per layer group at the same granularity, shared by
every expert; a seed genome gives them the method's default (clipped into the bounds) unless it names
them. ``params`` may then be empty (slerp and model_stock have no per-model parameter).

``methods`` (two or more) adds a categorical gene ``method`` that picks the merge method per candidate;
each method takes the searched parameters it knows (``density`` is ignored by ``task_arithmetic``) and
its own ``global_parameters``.

Group values become a per-layer list of length ``num_layers`` in the recipe, so the recipe's linear
interpolation (position ``l/(n-1)`` over ``n`` entries) lands exactly on layer ``l``'s value; tensors
outside the layer stack (embeddings, final norm, lm_head) take the first layer's value, as for any
per-layer list (mergekit's rule).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from typing import Any, Literal

from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution
from pydantic import BaseModel, ConfigDict, Field, StrictBool, model_validator

from evomerge.errors import ConfigError
from evomerge.merging import MergeRecipe, get_method, param_domain
from evomerge.search_spaces.layer_path import LayerPathConfig, LayerPathSpace

Granularity = Literal["global", "layer_group", "layer", "control_points"]
GLOBAL_GENES = "(global)"
"""The alias part of a searched global parameter's gene names (no expert alias has parentheses)."""
_ALIAS_RE = re.compile(r"[^A-Za-z0-9_-]+")


class ParamRange(BaseModel):
    """Bounds of one searched per-model parameter."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str
    low: float
    high: float
    log: bool = False

    @model_validator(mode="after")
    def _check(self) -> ParamRange:
        if not (math.isfinite(self.low) and math.isfinite(self.high)) or self.low >= self.high:
            raise ValueError(f"{self.name}: low ({self.low}) must be below high ({self.high})")
        if self.name == "density" and (self.low <= 0 or self.high > 1):
            raise ValueError(f"density bounds must lie in (0, 1], got [{self.low}, {self.high}]")
        if self.log and self.low <= 0:
            raise ValueError(f"{self.name}: a log-scaled range needs low > 0")
        return self


class SearchSpaceConfig(BaseModel):
    """What is searched: the merge method, the per-model parameters and their granularity."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    method: str = "ties"
    params: tuple[ParamRange, ...] = Field(
        default=(
            ParamRange(name="weight", low=0.0, high=1.5),
            ParamRange(name="density", low=0.1, high=1.0),
        )
    )
    granularity: Granularity = "layer_group"
    group_size: int = Field(default=2, ge=1)
    control_points: int = Field(default=3, ge=2)
    """For ``granularity: control_points``: points per expert and parameter (2 is a linear ramp)."""
    methods: tuple[str, ...] = ()
    """Two or more methods: the method becomes a searched categorical (``method`` is then ignored)."""
    split_attn_mlp: bool = False
    global_parameters: dict[str, StrictBool | float] = Field(default_factory=dict)
    """Method-wide parameters held fixed."""
    global_params: tuple[ParamRange, ...] = ()
    """Method-wide parameters searched (bounds inside the parameter's domain), shared by all experts."""
    layer_path: LayerPathConfig | None = None
    """Search the data-flow space instead (which layer of which model at each depth; see
    :mod:`evomerge.search_spaces.layer_path`): the merge method and parameters above are then unused."""
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """The candidates' output dtype (their recipes' ``out_dtype``); merges compute in float32."""
    seed: int = 0

    @model_validator(mode="after")
    def _check(self) -> SearchSpaceConfig:
        if len(self.methods) == 1 or len(set(self.methods)) != len(self.methods):
            raise ValueError("methods: give two or more different methods (or just 'method')")
        methods = [get_method(m) for m in self.candidate_methods]
        names = [p.name for p in self.params]
        if len(set(names)) != len(names):
            raise ValueError(f"params: duplicate parameter in {names}")
        for n in names:
            if not any(n in m.model_params for m in methods):
                known = ", ".join(sorted({k for m in methods for k in m.model_params})) or "none"
                which = " / ".join(self.candidate_methods)
                raise ValueError(f"params: {which} has no per-model parameter {n!r} (known: {known})")
        searched = [p.name for p in self.global_params]
        if len(set(searched)) != len(searched):
            raise ValueError(f"global_params: duplicate parameter in {searched}")
        for r in self.global_params:
            if not any(r.name in m.global_params for m in methods):
                known = ", ".join(sorted({k for m in methods for k in m.global_params})) or "none"
                which = " / ".join(self.candidate_methods)
                raise ValueError(f"global_params: {which} has no parameter {r.name!r} (known: {known})")
            domain = param_domain(r.name)
            if domain.kind == "bool":
                raise ValueError(
                    f"global_params: {r.name} is true or false, not searched; set it in global_parameters"
                )
            for end in (r.low, r.high):
                problem = domain.problem(end)
                if problem is not None:
                    raise ValueError(f"global_params.{r.name}: bound {problem}")
            if r.name in self.global_parameters:
                raise ValueError(f"{r.name} is both searched (global_params) and fixed (global_parameters)")
        if not self.params and not self.global_params:
            raise ValueError("nothing to search: give params (per model) or global_params (method-wide)")
        for n, v in self.global_parameters.items():
            if not any(n in m.global_params for m in methods):
                known = ", ".join(sorted({k for m in methods for k in m.global_params})) or "none"
                which = " / ".join(self.candidate_methods)
                raise ValueError(f"global_parameters: {which} has no parameter {n!r} (known: {known})")
            problem = param_domain(n).problem(v)
            if problem is not None:
                raise ValueError(f"global_parameters.{n}: {problem}")
        return self

    @property
    def candidate_methods(self) -> tuple[str, ...]:
        return self.methods or (self.method,)


def expert_aliases(expert_paths: Sequence[str]) -> list[str]:
    """Short unique names for experts (their directory names), used in gene names and reports."""
    aliases: list[str] = []
    for p in expert_paths:
        stem = _ALIAS_RE.sub("_", p.rstrip("/").split("/")[-1]) or "expert"
        alias, k = stem, 2
        while alias in aliases:
            alias, k = f"{stem}_{k}", k + 1
        aliases.append(alias)
    return aliases


class SearchSpace:
    """Maps genomes to recipes for one base model, a list of experts and a layer count."""

    def __init__(
        self, config: SearchSpaceConfig, base_model: str, experts: Sequence[str], num_layers: int
    ) -> None:
        if not experts:
            raise ConfigError("search space: at least one expert model is needed")
        if num_layers < 1:
            raise ConfigError(f"search space: num_layers must be >= 1, got {num_layers}")
        for name in config.candidate_methods:
            method = get_method(name)
            n = len(experts)
            if n < method.min_models or (method.max_models is not None and n > method.max_models):
                most = "" if method.max_models is None else f", at most {method.max_models}"
                raise ConfigError(
                    f"search space: {name} merges at least {method.min_models}{most} model(s) besides the "
                    f"base; this sweep has {n} experts"
                )
        self.config = config
        self.base_model = base_model
        self.experts = list(experts)
        self.aliases = expert_aliases(self.experts)
        self.num_layers = num_layers
        if config.granularity == "global":
            self.num_groups = 1
        elif config.granularity == "layer":
            self.num_groups = num_layers
        elif config.granularity == "control_points":
            self.num_groups = config.control_points
        else:
            self.num_groups = math.ceil(num_layers / config.group_size)
        self.parts: tuple[str, ...] = ("attn", "mlp") if config.split_attn_mlp else ("",)

    # -- genes ---------------------------------------------------------------------------------
    def gene_name(self, alias: str, param: str, part: str, group: int) -> str:
        mid = f".{part}" if part else ""
        return f"{alias}.{param}{mid}.g{group}"

    def distributions(self) -> dict[str, BaseDistribution]:
        """One Optuna distribution per gene, in a stable order (``method`` first when it is searched)."""
        out: dict[str, BaseDistribution] = {}
        if self.config.methods:
            out["method"] = CategoricalDistribution(self.config.methods)
        for alias in self.aliases:
            for p in self.config.params:
                for part in self.parts:
                    for g in range(self.num_groups):
                        out[self.gene_name(alias, p.name, part, g)] = FloatDistribution(
                            p.low, p.high, log=p.log
                        )
        for p in self.config.global_params:
            for part in self.parts:
                for g in range(self.num_groups):
                    out[self.gene_name(GLOBAL_GENES, p.name, part, g)] = FloatDistribution(
                        p.low, p.high, log=p.log
                    )
        return out

    @property
    def dimension(self) -> int:
        per_group = len(self.config.params) * len(self.aliases) + len(self.config.global_params)
        return per_group * len(self.parts) * self.num_groups + (1 if self.config.methods else 0)

    def uniform_genome(self, values: Mapping[str, float | Sequence[float] | str]) -> dict[str, float]:
        """A genome with the same value for every layer and part: ``values[param]`` is a scalar for all
        experts or a sequence with one value per expert; a searched global parameter takes
        ``values[name]`` when given, else its method's default. Values are clipped into the bounds."""
        genome: dict[str, float] = {}
        for i, alias in enumerate(self.aliases):
            for p in self.config.params:
                if p.name not in values:
                    raise ConfigError(f"seed recipe: no value for parameter {p.name!r}")
                raw = values[p.name]
                if isinstance(raw, str):
                    raise ConfigError(f"seed recipe: {p.name} must be a number or a list, not {raw!r}")
                if not isinstance(raw, int | float) and len(raw) != len(self.aliases):
                    raise ConfigError(
                        f"seed recipe: {p.name} has {len(raw)} values for {len(self.aliases)} experts"
                    )
                v = float(raw) if isinstance(raw, int | float) else float(raw[i])
                v = min(max(v, p.low), p.high)
                for part in self.parts:
                    for g in range(self.num_groups):
                        genome[self.gene_name(alias, p.name, part, g)] = v
        for p in self.config.global_params:
            raw = values.get(p.name, self.global_default(p.name))
            if isinstance(raw, str) or not isinstance(raw, int | float):
                raise ConfigError(f"seed recipe: {p.name} is method-wide: give one number, not {raw!r}")
            v = min(max(float(raw), p.low), p.high)
            for part in self.parts:
                for g in range(self.num_groups):
                    genome[self.gene_name(GLOBAL_GENES, p.name, part, g)] = v
        if self.config.methods:
            method = values.get("method", self.config.methods[0])
            if method not in self.config.methods:
                raise ConfigError(f"seed recipe: method {method!r} is not one of {list(self.config.methods)}")
            genome["method"] = method  # type: ignore[assignment]
        return genome

    def global_default(self, name: str) -> float:
        """The default of method-wide parameter ``name`` in the first searched method that has it."""
        for m in self.config.candidate_methods:
            method = get_method(m)
            if name in method.global_params:
                return float(method.global_params[name])
        raise ConfigError(f"no searched method has the parameter {name!r}")  # the config refuses this

    def seed_values(self, weight: float | list[float]) -> dict[str, float | list[float]]:
        """The values of a seed genome (for :meth:`uniform_genome`): ``weight`` (one for all experts or
        one per expert), density 1, any other parameter at the middle of its range (log scale: the
        geometric middle)."""
        out: dict[str, float | list[float]] = {}
        for p in self.config.params:
            if p.name == "weight":
                out[p.name] = weight
            elif p.name == "density":
                out[p.name] = 1.0
            else:
                out[p.name] = (p.low * p.high) ** 0.5 if p.log else (p.low + p.high) / 2
        return out

    def seed_genomes(self, kinds: Sequence[str]) -> list[dict[str, float]]:
        """Known-good starting points: ``uniform`` (every expert at weight 1/N, density 1: uniform task
        arithmetic, or its method's nearest equivalent) and ``experts`` (one genome per expert: weight 1
        for it, 0 for the others, density 1: the expert itself). Parameters other than weight and density
        start at the middle of their range; values are clipped into the bounds."""
        n = len(self.aliases)
        genomes: list[dict[str, float]] = []
        for kind in kinds:
            if kind == "uniform":
                genomes.append(self.uniform_genome(self.seed_values([1.0 / n] * n)))
            elif kind == "experts":
                genomes += [
                    self.uniform_genome(self.seed_values([1.0 if j == i else 0.0 for j in range(n)]))
                    for i in range(n)
                ]
            else:
                raise ConfigError(f"seed_recipes: unknown kind {kind!r} (known: uniform, experts)")
        return genomes

    # -- genome -> recipe -------------------------------------------------------------------------
    def _layer_list(self, genome: Mapping[str, float], alias: str, param: str, part: str) -> list[float]:
        if self.config.granularity == "global":
            return [genome[self.gene_name(alias, param, part, 0)]]
        if self.config.granularity == "control_points":
            points = [genome[self.gene_name(alias, param, part, k)] for k in range(self.num_groups)]
            return [_interpolate(points, layer, self.num_layers) for layer in range(self.num_layers)]
        size = 1 if self.config.granularity == "layer" else self.config.group_size
        return [genome[self.gene_name(alias, param, part, layer // size)] for layer in range(self.num_layers)]

    def _param_value(self, genome: Mapping[str, float], alias: str, param: str) -> Any:
        if not self.config.split_attn_mlp:
            return _compact(self._layer_list(genome, alias, param, ""))
        attn = self._layer_list(genome, alias, param, "attn")
        mlp = self._layer_list(genome, alias, param, "mlp")
        rest = [(a + m) / 2 for a, m in zip(attn, mlp, strict=True)]
        return [
            {"filter": "self_attn", "value": _compact(attn)},
            {"filter": "mlp", "value": _compact(mlp)},
            {"value": _compact(rest)},
        ]

    def to_recipe(self, genome: Mapping[str, Any]) -> MergeRecipe:
        missing = [k for k in self.distributions() if k not in genome]
        if missing:
            raise ConfigError(f"genome is missing gene {missing[0]!r}")
        method_name = str(genome["method"]) if self.config.methods else self.config.method
        method = get_method(method_name)
        params = [p for p in self.config.params if p.name in method.model_params]
        models = [
            {
                "model": path,
                "parameters": {p.name: self._param_value(genome, alias, p.name) for p in params},
            }
            for alias, path in zip(self.aliases, self.experts, strict=True)
        ]
        global_parameters: dict[str, Any] = {
            k: v for k, v in self.config.global_parameters.items() if k in method.global_params
        }
        for p in self.config.global_params:
            if p.name in method.global_params:
                global_parameters[p.name] = self._param_value(genome, GLOBAL_GENES, p.name)
        return MergeRecipe.model_validate(
            {
                "merge_method": method_name,
                "base_model": self.base_model,
                "models": models,
                "parameters": global_parameters,
                "out_dtype": self.config.dtype,  # the output; candidates are computed in float32
                "seed": self.config.seed,
            }
        )


def _interpolate(points: Sequence[float], layer: int, num_layers: int) -> float:
    """The value at ``layer`` of control ``points`` evenly spaced from the first to the last layer."""
    if num_layers == 1:
        return float(points[0])
    x = layer / (num_layers - 1) * (len(points) - 1)
    k = min(int(x), len(points) - 2)
    frac = x - k
    return float(points[k] + (points[k + 1] - points[k]) * frac)


def _compact(values: list[float]) -> float | list[float]:
    """A list whose entries are all equal becomes a scalar (easier to read in exported recipes)."""
    rounded = [round(v, 6) for v in values]
    if all(v == rounded[0] for v in rounded):
        return rounded[0]
    return rounded


AnySpace = SearchSpace | LayerPathSpace
"""Either kind of search space: both map a genome of Optuna floats to a recipe."""


def build_space(
    config: SearchSpaceConfig, base_model: str, experts: Sequence[str], num_layers: int
) -> AnySpace:
    """The parameter-space :class:`SearchSpace`, or the :class:`LayerPathSpace` with ``layer_path``."""
    if config.layer_path is not None:
        return LayerPathSpace(config.layer_path, base_model, experts, num_layers, dtype=config.dtype)
    return SearchSpace(config, base_model, experts, num_layers)
