"""``heatmap.png`` for a layer-path recipe: which layer of which model sits at each depth of the output."""

from __future__ import annotations

from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from evomerge.atomic_io import atomic_file
from evomerge.merging import MergeRecipe

__all__ = ["layer_path", "plot_layer_path"]


def layer_path(recipe: MergeRecipe, num_layers: int) -> list[tuple[str, int]]:
    """The output's layers as ``(source model, source layer)``, in order."""
    recipe = recipe.for_layers(num_layers)
    if not recipe.slices:  # one model's own stack
        model = recipe.expert_models()[0].model
        return [(model, layer) for layer in range(num_layers)]
    out: list[tuple[str, int]] = []
    for piece in recipe.slices:
        first = piece.sources[0]
        out += [(first.model, layer) for layer in range(*first.layer_range)]
    return out


def plot_layer_path(recipe: MergeRecipe, num_layers: int, path: str | Path, *, title: str) -> Path:
    """One row per source model, one column per output layer; a cell names the source layer copied
    there."""
    steps = layer_path(recipe, num_layers)
    models = list(dict.fromkeys(m for m, _ in steps))
    names = [Path(m).name or m for m in models]
    fig = Figure(figsize=(max(4.0, 0.45 * len(steps) + 2.0), 0.5 * len(models) + 1.4), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for x, (model, layer) in enumerate(steps):
        y = models.index(model)
        ax.add_patch(Rectangle((x - 0.45, y - 0.4), 0.9, 0.8, color="tab:blue"))
        ax.text(x, y, str(layer), ha="center", va="center", fontsize=8, color="white")
    ax.set_xticks(range(len(steps)))
    ax.set_xlim(-0.5, len(steps) - 0.5)
    ax.set_ylim(len(models) - 0.5, -0.5)
    ax.set_yticks(range(len(models)), names)
    ax.set_xlabel("output layer (cell: the source layer copied there)")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    out = Path(path)
    with atomic_file(out, "wb", suffix=".png") as f:
        fig.savefig(f, format="png", facecolor="white")
    return out
