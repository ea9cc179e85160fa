"""Merge parameters as recipes write them: a scalar, a per-layer list (gradient), or ``{filter, value}``
rules, validated and checked against each parameter's domain (see :mod:`evomerge.merging.recipe`)."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Annotated, Any

import torch
from pydantic import BaseModel, BeforeValidator, ConfigDict, StrictBool

from evomerge.errors import RecipeError
from evomerge.merging.registry import ParamDomain, param_domain

__all__ = ["FilterRule", "ModelEntry", "ParamValue", "Params", "check_domain", "dump_params"]

_SHAPE_HINT = "a number, true/false, a list of numbers, or a list of {filter, value} rules"


# YAML 1.1 (PyYAML) reads ``1e-3`` and ``1e39`` as strings (its floats need a dot and a signed
# exponent); YAML 1.2, JSON and mergekit's users mean numbers. Such strings are taken as numbers.
_NUMBER_RE = re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)(?:[eE][-+]?[0-9]+)$")


def _numeric_string(v: object) -> object:
    """``v``, or the float an exponent-notation string like ``"1e-3"`` spells."""
    if isinstance(v, str) and _NUMBER_RE.match(v.strip()):
        return float(v.strip().replace("_", ""))
    return v


def _is_number(v: object) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def _to_float(v: object) -> float:
    """A number as a float; ValueError for an integer too large for a float (10**400)."""
    try:
        return float(v)  # type: ignore[arg-type]
    except OverflowError:
        raise ValueError(f"{str(v)[:12]}... overflows float32") from None


def _coerce_leaf(v: object) -> bool | float | tuple[float, ...]:
    """A rule value: a bool, a number or a non-empty list of numbers."""
    v = _numeric_string(v)
    if isinstance(v, bool):
        return v
    if _is_number(v):
        return _to_float(v)
    if isinstance(v, list | tuple):
        if not v:
            raise ValueError("empty list")
        v = [_numeric_string(x) for x in v]
        if all(_is_number(x) for x in v):
            return tuple(_to_float(x) for x in v)
        raise ValueError("a per-layer list must hold only numbers")
    raise ValueError(f"must be a number, true/false or a list of numbers, got {type(v).__name__}")


def _coerce_rule(rule: object, j: int) -> FilterRule:
    if isinstance(rule, FilterRule):
        return rule
    if not isinstance(rule, Mapping):
        raise ValueError(f"[{j}]: a rule must be a mapping with 'value' and optional 'filter'")
    unknown = sorted(str(k) for k in rule if k not in ("filter", "value"))
    if unknown:
        raise ValueError(f"[{j}]: unknown rule key {unknown[0]!r} (allowed: filter, value)")
    if "value" not in rule:
        raise ValueError(f"[{j}]: rule has no 'value'")
    flt = rule.get("filter")
    if flt is not None and not isinstance(flt, str):
        raise ValueError(f"[{j}].filter: must be a string, got {type(flt).__name__}")
    if flt == "*":  # mergekit's spelling of "every tensor"
        flt = None
    try:
        value = _coerce_leaf(rule["value"])
    except ValueError as exc:
        raise ValueError(f"[{j}].value: {exc}") from None
    return FilterRule(filter=flt, value=value)


def _coerce_param_value(v: object) -> object:
    """Normalise a parameter value before pydantic checks its type (ints -> floats, lists -> tuples)."""
    v = _numeric_string(v)
    if isinstance(v, bool):
        return v
    if _is_number(v):
        return _to_float(v)
    if isinstance(v, list | tuple):
        if not v:
            raise ValueError("empty list")
        if all(_is_number(_numeric_string(x)) for x in v):
            v = [_numeric_string(x) for x in v]
            return tuple(_to_float(x) for x in v)
        if all(isinstance(x, Mapping | FilterRule) for x in v):
            return tuple(_coerce_rule(x, j) for j, x in enumerate(v))
        raise ValueError("a list must hold only numbers or only {filter, value} rules")
    raise ValueError(f"must be {_SHAPE_HINT}, got {type(v).__name__}")


class FilterRule(BaseModel):
    """One entry of a filtered parameter: applies to tensors whose name contains ``filter``."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    filter: str | None = None
    value: StrictBool | float | tuple[float, ...]


ParamValue = Annotated[
    StrictBool | float | tuple[float, ...] | tuple[FilterRule, ...],
    BeforeValidator(_coerce_param_value),
]
"""A parameter: scalar, per-layer list, or filter rules (each with a scalar or per-layer list value)."""


def _none_to_empty(v: object) -> object:
    return {} if v is None else v


Params = Annotated[dict[str, ParamValue], BeforeValidator(_none_to_empty)]


class ModelEntry(BaseModel):
    """One model of the recipe and its per-model parameters."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    model: str
    parameters: Params = {}


_FLOAT32_MAX = float(torch.finfo(torch.float32).max)


def _value_problem(domain: ParamDomain, value: bool | float) -> str | None:
    """Why ``value`` is not allowed: outside the parameter's domain, not finite, or too large for the
    float32 the kernels compute in (1e39 would become inf there)."""
    problem = domain.problem(value)
    if problem is None and not isinstance(value, bool) and abs(value) > _FLOAT32_MAX:
        problem = f"{value:g} overflows float32 (largest magnitude {_FLOAT32_MAX:.4g})"
    return problem


def check_domain(path: str, key: str, value: ParamValue) -> None:
    domain = param_domain(key)

    def leaf(p: str, v: bool | float | tuple[float, ...]) -> None:
        if isinstance(v, tuple):
            if domain.kind == "bool":
                raise RecipeError(f"{p}: must be true or false, not a list")
            for j, x in enumerate(v):
                problem = _value_problem(domain, x)
                if problem:
                    raise RecipeError(f"{p}[{j}]: {problem}")
            return
        problem = _value_problem(domain, v)
        if problem:
            raise RecipeError(f"{p}: {problem}")

    if isinstance(value, tuple) and value and isinstance(value[0], FilterRule):
        for j, rule in enumerate(value):
            assert isinstance(rule, FilterRule)
            leaf(f"{path}[{j}].value", rule.value)
    else:
        leaf(path, value)  # type: ignore[arg-type]


def _dump_leaf(v: bool | float | tuple[float, ...]) -> Any:
    return list(v) if isinstance(v, tuple) else v


def dump_params(params: Mapping[str, ParamValue]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in params.items():
        if isinstance(value, tuple) and value and isinstance(value[0], FilterRule):
            rules: list[dict[str, Any]] = []
            for rule in value:
                assert isinstance(rule, FilterRule)
                item: dict[str, Any] = {} if rule.filter is None else {"filter": rule.filter}
                item["value"] = _dump_leaf(rule.value)
                rules.append(item)
            out[key] = rules
        else:
            out[key] = _dump_leaf(value)  # type: ignore[arg-type]
    return out
