"""The registry of merge methods: one explicit entry per method module in ``evomerge.merging.methods``.

To add a method: write ``methods/<name>.py`` with ``merge`` (a :class:`~evomerge.merging.inputs.Kernel`),
``MODEL_PARAMS`` and ``GLOBAL_PARAMS`` (name -> default, booleans as 1.0/0.0), optionally ``MIN_MODELS`` /
``MAX_MODELS`` (how many models besides the base it takes), add one entry to :data:`METHODS`, and a
:data:`PARAM_DOMAINS` entry for any new parameter name.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from types import ModuleType
from typing import Literal

from evomerge.errors import RecipeError
from evomerge.merging.inputs import Kernel
from evomerge.merging.methods import (
    arcee_fusion,
    breadcrumbs,
    breadcrumbs_ties,
    dare_linear,
    dare_ties,
    della,
    della_linear,
    karcher,
    linear,
    model_stock,
    multislerp,
    nearswap,
    nuslerp,
    passthrough,
    ram,
    ramplus_tl,
    rsaf,
    sce,
    slerp,
    task_arithmetic,
    ties,
)

__all__ = ["METHODS", "PARAM_DOMAINS", "MergeMethod", "ParamDomain", "get_method", "param_domain"]


@dataclass(frozen=True)
class ParamDomain:
    """The values a parameter may take: a (possibly bounded) real number, or a boolean."""

    kind: Literal["real", "bool"] = "real"
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False

    def describe(self) -> str:
        if self.kind == "bool":
            return "true or false"
        lo = "(-inf" if self.low is None else ("(" if self.low_open else "[") + _fmt(self.low)
        hi = "inf)" if self.high is None else _fmt(self.high) + (")" if self.high_open else "]")
        return f"{lo}, {hi}"

    def problem(self, value: float | bool) -> str | None:
        """Why ``value`` is not allowed (a message fragment), or None when it is."""
        if self.kind == "bool":
            return None if isinstance(value, bool) else f"{_fmt(value)} is not true or false"
        if isinstance(value, bool):
            return f"{str(value).lower()} is not a number"
        if not math.isfinite(value):
            return f"{_fmt(value)} is not finite"
        below = self.low is not None and (value <= self.low if self.low_open else value < self.low)
        above = self.high is not None and (value >= self.high if self.high_open else value > self.high)
        if below or above:
            return f"{_fmt(value)} is outside {self.describe()}"
        return None


def _fmt(value: float | bool) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    return f"{value:g}"


_UNIT = ParamDomain(low=0.0, high=1.0)
_BOOL = ParamDomain(kind="bool")

PARAM_DOMAINS: dict[str, ParamDomain] = {
    "weight": ParamDomain(),
    "density": ParamDomain(low=0.0, high=1.0, low_open=True),
    "lambda": ParamDomain(),
    "normalize": _BOOL,
    "rescale": _BOOL,
    "int8_mask": _BOOL,
    "filter_wise": _BOOL,
    "gamma": ParamDomain(low=0.0, high=1.0, high_open=True),
    "epsilon": ParamDomain(low=0.0, high=0.5, high_open=True),
    "t": _UNIT,
    "select_topk": ParamDomain(low=0.0, high=1.0, low_open=True),
    "rate_gain": ParamDomain(low=0.0, high=1.0),
    "skew_gain": ParamDomain(low=0.0, high=4.0),
    "min_density": ParamDomain(low=0.0, high=1.0, low_open=True),
    "normalize_weights": _BOOL,
    "eps": ParamDomain(low=0.0),
    "nuslerp_flatten": _BOOL,
    "nuslerp_row_wise": _BOOL,
    "max_iter": ParamDomain(low=1.0),
    "tol": ParamDomain(low=0.0),
    "scale": ParamDomain(),
    "r": ParamDomain(low=0.0),
    "alpha": ParamDomain(low=0.0),
}
"""Allowed values per parameter name (a name means the same thing in every method)."""


def param_domain(name: str) -> ParamDomain:
    """The domain of parameter ``name`` (any finite real when not listed)."""
    return PARAM_DOMAINS.get(name, ParamDomain())


@dataclass(frozen=True)
class MergeMethod:
    """A registered merge method."""

    name: str
    kernel: Kernel
    needs_base: bool
    model_params: Mapping[str, float]
    """Per-model parameter names -> defaults."""
    global_params: Mapping[str, float]
    """Method-wide parameter names -> defaults (booleans as 1.0 / 0.0)."""
    doc: str
    min_models: int = 1
    """Fewest models besides the base."""
    max_models: int | None = None
    """Most models besides the base (None: no limit)."""

    def default(self, param: str) -> float:
        if param in self.model_params:
            return self.model_params[param]
        return self.global_params[param]


def _from_module(name: str, module: ModuleType, *, needs_base: bool) -> MergeMethod:
    doc = (module.__doc__ or name).strip().split("\n\n")[0]
    return MergeMethod(
        name=name,
        kernel=module.merge,
        needs_base=needs_base,
        model_params=dict(module.MODEL_PARAMS),
        global_params=dict(module.GLOBAL_PARAMS),
        doc=" ".join(doc.split()),
        min_models=int(getattr(module, "MIN_MODELS", 1)),
        max_models=getattr(module, "MAX_MODELS", None),
    )


METHODS: dict[str, MergeMethod] = {
    "linear": _from_module("linear", linear, needs_base=False),
    "task_arithmetic": _from_module("task_arithmetic", task_arithmetic, needs_base=True),
    "ties": _from_module("ties", ties, needs_base=True),
    "dare_linear": _from_module("dare_linear", dare_linear, needs_base=True),
    "dare_ties": _from_module("dare_ties", dare_ties, needs_base=True),
    "breadcrumbs": _from_module("breadcrumbs", breadcrumbs, needs_base=True),
    "breadcrumbs_ties": _from_module("breadcrumbs_ties", breadcrumbs_ties, needs_base=True),
    "della": _from_module("della", della, needs_base=True),
    "della_linear": _from_module("della_linear", della_linear, needs_base=True),
    "slerp": _from_module("slerp", slerp, needs_base=True),
    "sce": _from_module("sce", sce, needs_base=True),
    "model_stock": _from_module("model_stock", model_stock, needs_base=True),
    "rsaf": _from_module("rsaf", rsaf, needs_base=True),
    "nearswap": _from_module("nearswap", nearswap, needs_base=True),
    "multislerp": _from_module("multislerp", multislerp, needs_base=False),
    "nuslerp": _from_module("nuslerp", nuslerp, needs_base=False),
    "karcher": _from_module("karcher", karcher, needs_base=False),
    "arcee_fusion": _from_module("arcee_fusion", arcee_fusion, needs_base=True),
    "passthrough": _from_module("passthrough", passthrough, needs_base=False),
    "ram": _from_module("ram", ram, needs_base=True),
    "ramplus_tl": _from_module("ramplus_tl", ramplus_tl, needs_base=True),
}
"""All merge methods by registry name."""


def get_method(name: str) -> MergeMethod:
    """The method registered as ``name``; RecipeError listing the known names otherwise."""
    try:
        return METHODS[name]
    except KeyError:
        known = ", ".join(sorted(METHODS))
        raise RecipeError(f"unknown merge method {name!r}; known: {known}") from None
