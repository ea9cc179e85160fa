"""The registry of merge methods: one explicit entry per method module in ``evomerge.merging.methods``.

To add a method: write ``methods/<name>.py`` with ``merge`` (a :class:`~evomerge.merging.inputs.Kernel`),
``MODEL_PARAMS`` and ``GLOBAL_PARAMS`` (name -> default, booleans as 1.0/0.0), add one entry to
:data:`METHODS`, and a :data:`PARAM_DOMAINS` entry for any new parameter name.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from types import ModuleType
from typing import Literal

from evomerge.errors import RecipeError
from evomerge.merging.inputs import Kernel
from evomerge.merging.methods import linear, task_arithmetic, ties

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


PARAM_DOMAINS: dict[str, ParamDomain] = {
    "weight": ParamDomain(),
    "density": ParamDomain(low=0.0, high=1.0, low_open=True),
    "lambda": ParamDomain(),
    "normalize": ParamDomain(kind="bool"),
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
    )


METHODS: dict[str, MergeMethod] = {
    "linear": _from_module("linear", linear, needs_base=False),
    "task_arithmetic": _from_module("task_arithmetic", task_arithmetic, needs_base=True),
    "ties": _from_module("ties", ties, needs_base=True),
}
"""All merge methods by registry name."""


def get_method(name: str) -> MergeMethod:
    """The method registered as ``name``; RecipeError listing the known names otherwise."""
    try:
        return METHODS[name]
    except KeyError:
        known = ", ".join(sorted(METHODS))
        raise RecipeError(f"unknown merge method {name!r}; known: {known}") from None
