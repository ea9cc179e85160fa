"""mergekit's configuration shape read as an evomerge recipe (see :mod:`evomerge.merging.recipe`).

mergekit recipes are read as they are: ``slices`` with one slice whose sources all span the same full
``layer_range: [0, n]`` become ``models`` (with ``num_layers: n`` checked against the models); slice-level
``base_model`` and ``parameters`` apply as in mergekit; other ``slices`` (stacking, splicing, partial
ranges) stay slices (:mod:`evomerge.merging.slices`). ``tokenizer_source: null`` means ``base``.
``tokenizer: {source, tokens}`` is read as ``tokenizer_source`` and ``tokens``; ``chat_template`` is
kept (written into the output's tokenizer files); ``tokenizer_source: union`` merges over the union of
the vocabularies (:mod:`evomerge.merging.vocab`). ``modules``, ``tokenizer.pad_to_multiple_of`` and a
slice's ``residual_weight`` are refused by name with a one-line RecipeError; any other unknown key is
refused by the recipe's validation, naming it.
:data:`MERGEKIT_METHODS` names the methods a recipe can be written back to mergekit with
(:meth:`MergeRecipe.to_mergekit`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from evomerge.errors import RecipeError

__all__ = ["MERGEKIT_METHODS", "from_mergekit"]


MERGEKIT_METHODS: frozenset[str] = frozenset(
    {
        "linear",
        "task_arithmetic",
        "ties",
        "dare_linear",
        "dare_ties",
        "breadcrumbs",
        "breadcrumbs_ties",
        "della",
        "della_linear",
        "slerp",
        "sce",
        "model_stock",
        "nearswap",
        "multislerp",
        "nuslerp",
        "karcher",
        "arcee_fusion",
        "passthrough",
        "ram",
        "ramplus_tl",
    }
)
"""Registered methods that mergekit also has, with the same name and parameters."""

_UNSUPPORTED_MERGEKIT_KEYS: dict[str, str] = {
    "modules": "multi-module merges are not supported; use models or slices",
}


def from_mergekit(data: Mapping[str, Any]) -> dict[str, Any]:
    """mergekit's configuration shape mapped onto ours (see the module docstring); our own recipes pass
    through unchanged. RecipeError (naming the field) for what does not map."""
    out = dict(data)
    for key, why in _UNSUPPORTED_MERGEKIT_KEYS.items():
        if out.get(key) is not None:
            raise RecipeError(f"{key}: {why}")
        out.pop(key, None)
    tokenizer = out.pop("tokenizer", None)
    if tokenizer is not None:
        out["tokenizer_source"] = _tokenizer_source(tokenizer, out.get("tokenizer_source"))
        if isinstance(tokenizer, Mapping) and tokenizer.get("tokens"):
            out["tokens"] = tokenizer["tokens"]
    if "tokenizer_source" in out and out["tokenizer_source"] is None:
        out["tokenizer_source"] = "base"
    for key in ("dtype", "out_dtype"):
        if out.get(key) is None:
            out.pop(key, None)
    if out.get("parameters") is None:
        out.pop("parameters", None)
    slices = out.pop("slices", None)
    if slices is None:
        return out
    if out.get("models"):
        raise RecipeError("slices: give either models or slices, not both")
    if not isinstance(slices, list | tuple) or not slices:
        raise RecipeError("slices: a non-empty list of {sources: [{model, layer_range}, ...]}")
    if not all(isinstance(p, Mapping) for p in slices):
        out["slices"] = slices  # already validated slices (or not slices at all: validation says so)
        return out
    for i, piece in enumerate(slices):
        if piece.get("residual_weight") is not None:
            raise RecipeError(
                f"slices[{i}].residual_weight: mergekit 0.1.5 reads it but never applies it; remove it"
            )
    if len(slices) == 1 and _full_range(slices[0]):
        return _single_slice(out, slices[0])
    out["slices"] = [{k: v for k, v in p.items() if k != "residual_weight"} for p in slices]
    return out


def _full_range(piece: Mapping[str, Any]) -> bool:
    """Whether every source spans the same ``[0, n]`` (a plain ``models`` merge)."""
    sources = piece.get("sources")
    if not isinstance(sources, list) or not sources:
        return False
    spans = {tuple(s.get("layer_range") or ()) for s in sources if isinstance(s, Mapping)}
    return len(spans) == 1 and len(next(iter(spans))) == 2 and next(iter(spans))[0] == 0


def _single_slice(out: dict[str, Any], piece: Mapping[str, Any]) -> dict[str, Any]:
    unknown = sorted(str(k) for k in piece if k not in ("sources", "base_model", "parameters"))
    if unknown:
        raise RecipeError(f"slices[0].{unknown[0]}: not supported")
    sources = piece.get("sources")
    if not isinstance(sources, list) or not sources:
        raise RecipeError("slices[0].sources: a non-empty list of {model, layer_range} is required")
    models: list[dict[str, Any]] = []
    ranges: set[tuple[int, int]] = set()
    for j, source in enumerate(sources):
        where = f"slices[0].sources[{j}]"
        if not isinstance(source, Mapping) or "model" not in source:
            raise RecipeError(f"{where}: needs model and layer_range")
        extra = sorted(str(k) for k in source if k not in ("model", "layer_range", "parameters"))
        if extra:
            raise RecipeError(f"{where}.{extra[0]}: not supported")
        span = source.get("layer_range")
        if not (isinstance(span, list | tuple) and len(span) == 2 and all(isinstance(v, int) for v in span)):
            raise RecipeError(f"{where}.layer_range: must be [start, end]")
        ranges.add((int(span[0]), int(span[1])))
        entry: dict[str, Any] = {"model": source["model"]}
        if source.get("parameters"):
            entry["parameters"] = source["parameters"]
        models.append(entry)
    if len(ranges) != 1 or next(iter(ranges))[0] != 0 or next(iter(ranges))[1] <= 0:
        shown = ", ".join(f"[{a}, {b}]" for a, b in sorted(ranges))
        raise RecipeError(
            f"slices[0].sources: layer_range must be the same [0, n] for every source, got {shown} "
            "(partial ranges select or stack layers, which is not supported)"
        )
    out["models"] = models
    out["num_layers"] = next(iter(ranges))[1]
    slice_base = piece.get("base_model")
    if slice_base is not None:
        if out.get("base_model") not in (None, slice_base):
            raise RecipeError("slices[0].base_model: differs from the top-level base_model")
        out["base_model"] = slice_base
    if piece.get("parameters"):
        merged = dict(out.get("parameters") or {})
        merged.update(piece["parameters"])  # mergekit: slice parameters take precedence
        out["parameters"] = merged
    return out


def _tokenizer_source(tokenizer: object, tokenizer_source: object) -> object:
    """The ``tokenizer_source`` of mergekit's ``tokenizer: {source, tokens, pad_to_multiple_of}`` (its
    ``tokens`` are read by the caller); RecipeError (naming the key) for what evomerge does not build."""
    if tokenizer_source is not None:
        raise RecipeError("tokenizer: give tokenizer or tokenizer_source, not both (as in mergekit)")
    if not isinstance(tokenizer, Mapping):
        raise RecipeError("tokenizer: a mapping with source (base or a model directory)")
    unknown = sorted(str(k) for k in tokenizer if k not in ("source", "tokens", "pad_to_multiple_of"))
    if unknown:
        raise RecipeError(
            f"tokenizer.{unknown[0]}: unknown key (mergekit has source, tokens, pad_to_multiple_of)"
        )
    if tokenizer.get("pad_to_multiple_of"):
        raise RecipeError("tokenizer.pad_to_multiple_of: padding the vocabulary is not supported; remove it")
    return tokenizer.get("source", "union")  # mergekit's default source for a tokenizer section
