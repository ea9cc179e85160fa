"""The data-flow (layer-path) search space: which layer of which model sits at each depth of the output.

After Sakana's evolutionary model merge (data-flow space): the candidate layers are laid out as slots, the
layers of every source model in order, the whole sequence repeated ``repeats`` times (slot ``t`` is layer
``l`` of source ``k`` in repeat ``r``). The genome holds one inclusion gene per slot in [0, 1]; the output
is the included slots in slot order (gene >= 0.5), so a path can skip layers, interleave models and
repeat layers. With ``scale: true`` every slot also gets a gene that scales the layer's contribution to
the residual stream (its ``o_proj`` and ``down_proj`` outputs), which can keep a repeated layer from
overshooting; both are continuous genes, so CMA-ES, TPE, random search, NSGA-II and nevergrad all search
them (no categorical genes).

Sources: the base model (unless ``include_base: false``) and the sweep's experts, in that order. A
parameter-space merge found earlier joins the path as one more expert (its exported model directory
listed among the sweep's experts): "both" is a layer path over a merge.

A genome with no included slot takes the slot with the largest gene; a path longer than ``max_layers``
keeps the ``max_layers`` largest genes (in slot order). The recipe is mergekit's ``slices`` with
``passthrough`` (consecutive layers of one model in one slice), which mergekit 0.1.5 reproduces.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from optuna.distributions import BaseDistribution, FloatDistribution
from pydantic import BaseModel, ConfigDict, Field, model_validator

from evomerge.errors import ConfigError
from evomerge.merging import MergeRecipe

__all__ = ["LayerPathConfig", "LayerPathSpace"]

INCLUDE = 0.5
"""An inclusion gene at or above this includes its slot."""
SEED_ON = 0.7
SEED_OFF = 0.3
"""Inclusion genes of the seed paths (see :meth:`LayerPathSpace.path_genome`)."""


class LayerPathConfig(BaseModel):
    """What the layer-path space searches (``search_space.layer_path`` in a sweep)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    repeats: int = Field(default=2, ge=1, le=8)
    """How many times the sources' layers are laid out (2 lets a path repeat a layer once)."""
    include_base: bool = True
    """The base model's layers are candidates too."""
    max_layers: int | None = Field(default=None, ge=1)
    """Longest path (default: twice the models' layer count)."""
    scale: bool = False
    """A residual-scale gene per slot (the layer's o_proj and down_proj outputs times the gene)."""
    scale_low: float = Field(default=0.5, gt=0.0)
    scale_high: float = Field(default=1.0, gt=0.0)

    @model_validator(mode="after")
    def _check(self) -> LayerPathConfig:
        if self.scale_low >= self.scale_high:
            raise ValueError(f"scale_low ({self.scale_low}) must be below scale_high ({self.scale_high})")
        return self


class LayerPathSpace:
    """Maps layer-path genomes to sliced ``passthrough`` recipes (see the module docstring)."""

    def __init__(
        self,
        config: LayerPathConfig,
        base_model: str,
        experts: Sequence[str],
        num_layers: int,
        *,
        dtype: str = "float32",
    ) -> None:
        if num_layers < 1:
            raise ConfigError(f"search space: num_layers must be >= 1, got {num_layers}")
        self.path_config = config
        self.base_model = base_model
        self.sources = ([base_model] if config.include_base else []) + list(experts)
        if not self.sources:
            raise ConfigError("search_space.layer_path: no source model (no experts and include_base: false)")
        self.num_layers = num_layers
        self.max_layers = config.max_layers or 2 * num_layers
        self.dtype = dtype
        self.slots = [
            (k, layer)
            for _ in range(config.repeats)
            for k in range(len(self.sources))
            for layer in range(num_layers)
        ]

    # -- genes ---------------------------------------------------------------------------------
    @staticmethod
    def include_gene(t: int) -> str:
        return f"path.s{t}.on"

    @staticmethod
    def scale_gene(t: int) -> str:
        return f"path.s{t}.scale"

    def distributions(self) -> dict[str, BaseDistribution]:
        out: dict[str, BaseDistribution] = {}
        for t in range(len(self.slots)):
            out[self.include_gene(t)] = FloatDistribution(0.0, 1.0)
        if self.path_config.scale:
            c = self.path_config
            for t in range(len(self.slots)):
                out[self.scale_gene(t)] = FloatDistribution(c.scale_low, c.scale_high)
        return out

    @property
    def dimension(self) -> int:
        return len(self.slots) * (2 if self.path_config.scale else 1)

    def path_genome(self, model: int, *, on: float = SEED_ON, off: float = SEED_OFF) -> dict[str, float]:
        """The genome of source ``model`` alone: its layers in order, once (scale genes at 1 or the
        nearest bound). Inclusion genes sit at :data:`SEED_ON` / :data:`SEED_OFF`, two CMA-ES start steps
        (0.1 of the range) from the threshold: at 1 and 0, the search around a seed would never flip a
        slot, at 0.5 every candidate would be a different path."""
        genome = {
            self.include_gene(t): on if (k == model and t < len(self.sources) * self.num_layers) else off
            for t, (k, _) in enumerate(self.slots)
        }
        if self.path_config.scale:
            c = self.path_config
            one = min(max(1.0, c.scale_low), c.scale_high)
            genome.update({self.scale_gene(t): one for t in range(len(self.slots))})
        return genome

    def seed_genomes(self, kinds: Sequence[str]) -> list[dict[str, float]]:
        """``uniform``: the base model's own path (the first source's without the base); ``experts``: each
        source model's own path."""
        genomes: list[dict[str, float]] = []
        for kind in kinds:
            if kind == "uniform":
                genomes.append(self.path_genome(0))
            elif kind == "experts":
                first = 1 if self.path_config.include_base else 0
                genomes += [self.path_genome(k) for k in range(first, len(self.sources))]
            else:
                raise ConfigError(f"seed_recipes: unknown kind {kind!r} (known: uniform, experts)")
        return genomes

    # -- genome -> recipe -----------------------------------------------------------------------
    def path(self, genome: Mapping[str, Any]) -> list[tuple[int, int, float]]:
        """The output's layers as ``(source, layer, scale)``, in order."""
        values = [float(genome[self.include_gene(t)]) for t in range(len(self.slots))]
        chosen = [t for t, v in enumerate(values) if v >= INCLUDE]
        if not chosen:
            chosen = [max(range(len(values)), key=lambda t: (values[t], -t))]
        if len(chosen) > self.max_layers:
            keep = sorted(chosen, key=lambda t: (-values[t], t))[: self.max_layers]
            chosen = sorted(keep)
        out = []
        for t in chosen:
            k, layer = self.slots[t]
            scale = float(genome[self.scale_gene(t)]) if self.path_config.scale else 1.0
            out.append((k, layer, scale))
        return out

    def to_recipe(self, genome: Mapping[str, Any]) -> MergeRecipe:
        missing = [k for k in self.distributions() if k not in genome]
        if missing:
            raise ConfigError(f"genome is missing gene {missing[0]!r}")
        slices: list[dict[str, Any]] = []
        run: list[tuple[int, int, float]] = []

        def close() -> None:
            if not run:
                return
            k, start, scale = run[0]
            source: dict[str, Any] = {"model": self.sources[k], "layer_range": [start, start + len(run)]}
            if scale != 1.0:
                source["parameters"] = {
                    "scale": [
                        {"filter": "o_proj", "value": scale},
                        {"filter": "down_proj", "value": scale},
                        {"value": 1.0},
                    ]
                }
            slices.append({"sources": [source]})
            run.clear()

        for k, layer, scale in self.path(genome):
            if run and not (run[-1][0] == k and run[-1][1] + 1 == layer and run[-1][2] == scale):
                close()
            run.append((k, layer, scale))
        close()
        return MergeRecipe.model_validate(
            {"merge_method": "passthrough", "slices": slices, "out_dtype": self.dtype}
        )
