"""Build-time gates of a zoo: are its experts fine-tunes a merge can add up?

A merge can only beat its experts when each expert is a small, specific change of a shared base (the
DARE and model-merging-at-scale findings): task vectors much smaller than the base, pointing in
different directions, each teaching its own skill without unlearning the others. :func:`measure`
computes these figures from the saved models and their test scores; :func:`failures` names each figure
that misses its gate. The figures are written into ``zoo.json`` (``gates``) whether or not they are
enforced.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field
from safetensors.torch import load_file

__all__ = ["ZooGates", "failures", "layer_group", "measure", "summary", "task_vector_stats"]

_LAYER = re.compile(r"\.layers\.(\d+)\.")


class ZooGates(BaseModel):
    """Thresholds a zoo build must meet (``tiny``'s defaults follow the evidence note)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    max_norm_ratio: float = Field(default=0.1, gt=0)
    """|task vector| / |base| per expert, over all weights."""
    max_cosine: float = Field(default=0.3, gt=-1, le=1)
    """Cosine between any two experts' task vectors."""
    min_own_gain: float = Field(default=0.15, ge=0)
    """Each expert's test score on its own family minus the base's."""
    max_other_loss: float = Field(default=0.03, ge=0)
    """How much an expert may lose against the base on another expert's family (test)."""


def layer_group(name: str) -> str:
    """``model.layers.3.mlp.up_proj.weight`` -> ``layer 3``; embeddings, final norm and head by name."""
    m = _LAYER.search(name)
    if m:
        return f"layer {int(m.group(1))}"
    if "embed" in name:
        return "embed"
    if "lm_head" in name:
        return "lm_head"
    return "norm"


def _state(path: str | Path) -> dict[str, torch.Tensor]:
    files = sorted(Path(path).glob("*.safetensors"))
    out: dict[str, torch.Tensor] = {}
    for f in files:
        out.update({k: v.to(torch.float64) for k, v in load_file(str(f)).items()})
    return out


def task_vector_stats(base: str | Path, experts: Mapping[str, str | Path]) -> dict[str, Any]:
    """Norm ratios (whole model and per layer group) and pairwise cosines of the experts' task vectors."""
    theta = _state(base)
    names = sorted(theta)
    groups = sorted({layer_group(n) for n in names}, key=_group_order)
    base_sq = {g: 0.0 for g in groups}
    for n in names:
        base_sq[layer_group(n)] += float(theta[n].square().sum())
    base_norm = math.sqrt(sum(base_sq.values()))
    taus: dict[str, torch.Tensor] = {}
    ratio: dict[str, float] = {}
    per_layer: dict[str, dict[str, float]] = {}
    for fam, path in experts.items():
        other = _state(path)
        if sorted(other) != names:
            raise ValueError(f"expert {fam}: its tensors differ from the base's")
        sq = {g: 0.0 for g in groups}
        parts = []
        for n in names:
            d = other[n] - theta[n]
            sq[layer_group(n)] += float(d.square().sum())
            parts.append(d.flatten())
        taus[fam] = torch.cat(parts)
        ratio[fam] = math.sqrt(sum(sq.values())) / base_norm
        per_layer[fam] = {g: math.sqrt(sq[g] / base_sq[g]) if base_sq[g] else 0.0 for g in groups}
    cosine: dict[str, float] = {}
    fams = list(experts)
    for i, a in enumerate(fams):
        for b in fams[i + 1 :]:
            ta, tb = taus[a], taus[b]
            cosine[f"{a}/{b}"] = float(ta @ tb / (ta.norm() * tb.norm()).clamp_min(1e-30))
    # How much the experts' per-layer profiles differ: 1 - cosine between the profile vectors.
    profile_distance: dict[str, float] = {}
    for i, a in enumerate(fams):
        for b in fams[i + 1 :]:
            pa = torch.tensor([per_layer[a][g] for g in groups], dtype=torch.float64)
            pb = torch.tensor([per_layer[b][g] for g in groups], dtype=torch.float64)
            profile_distance[f"{a}/{b}"] = float(1 - pa @ pb / (pa.norm() * pb.norm()).clamp_min(1e-30))
    return {
        "norm_ratio": ratio,
        "cosine": cosine,
        "layer_norm_ratio": per_layer,
        "profile_distance": profile_distance,
    }


def _group_order(g: str) -> tuple[int, int]:
    if g == "embed":
        return (0, 0)
    if g.startswith("layer "):
        return (1, int(g.split()[1]))
    return (2, 0 if g == "norm" else 1)


def measure(
    base: str | Path,
    experts: Mapping[str, str | Path],
    test_scores: Mapping[str, Mapping[str, float]],
) -> dict[str, Any]:
    """All gate figures: task-vector statistics plus each expert's own gain and worst loss elsewhere.

    ``test_scores`` maps ``base`` and each expert family to its per-task test scores."""
    stats = task_vector_stats(base, experts)
    base_scores = test_scores["base"]
    own_gain = {fam: test_scores[fam][fam] - base_scores[fam] for fam in experts}
    other_loss = {
        fam: max((base_scores[o] - test_scores[fam][o] for o in experts if o != fam), default=0.0)
        for fam in experts
    }
    return {**stats, "own_gain": own_gain, "other_loss": other_loss}


def failures(figures: Mapping[str, Any], gates: ZooGates) -> list[str]:
    """One message per figure that misses its gate (empty: the zoo passes)."""
    out: list[str] = []
    for fam, r in figures["norm_ratio"].items():
        if r >= gates.max_norm_ratio:
            out.append(f"task-vector norm ratio of {fam} is {r:.3f} (gate < {gates.max_norm_ratio:g})")
    for pair, c in figures["cosine"].items():
        if c >= gates.max_cosine:
            out.append(f"task-vector cosine {pair} is {c:.3f} (gate < {gates.max_cosine:g})")
    for fam, g in figures["own_gain"].items():
        if g < gates.min_own_gain:
            out.append(
                f"expert {fam} gains {g:+.3f} on its own task over the base (gate >= +{gates.min_own_gain:g})"
            )
    for fam, loss in figures["other_loss"].items():
        if loss > gates.max_other_loss:
            out.append(
                f"expert {fam} loses {loss:.3f} on another expert's task (gate <= {gates.max_other_loss:g})"
            )
    return out


def summary(figures: Mapping[str, Any], families: Sequence[str]) -> list[str]:
    """Human-readable lines of the figures (the build prints them)."""
    lines = []
    for fam in families:
        prof = " ".join(f"{v:.3f}" for v in figures["layer_norm_ratio"][fam].values())
        lines.append(
            f"{fam}: |tau|/|base| {figures['norm_ratio'][fam]:.3f}, "
            f"own gain {figures['own_gain'][fam]:+.3f}, "
            f"worst loss elsewhere {figures['other_loss'][fam]:+.3f}, per-layer {prof}"
        )
    lines.append("cosines: " + ", ".join(f"{k} {v:.3f}" for k, v in figures["cosine"].items()))
    return lines
