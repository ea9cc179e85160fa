"""PNG plots of a sweep for ``evomerge report``: optimization history, Pareto front, best-recipe heatmap.

Figures are drawn with :class:`matplotlib.figure.Figure` on a :class:`FigureCanvasAgg` directly (never
``pyplot``), so nothing here touches matplotlib's global backend or figure registry, and every PNG is
written to a temporary sibling first and renamed into place (a reader never sees a half-written file).

- ``history.png``: the dev mean of every complete trial in trial-number order, the running best, pruned
  trials at their last reported (rung) value and failed trials along the bottom.
- ``pareto.png``: per-task dev scores of the complete trials with the Pareto front highlighted (one panel
  for two tasks, a panel per task pair for three or more; with one task, score against trial number).
- ``heatmap.png``: the best recipe's per-model parameters resolved for every layer (rows: experts, or
  expert/part when a parameter has ``{filter, value}`` rules; columns: layers).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from itertools import combinations
from pathlib import Path

import optuna
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import Normalize
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from optuna.trial import FrozenTrial, TrialState

from evomerge.atomic_io import atomic_file
from evomerge.errors import ConfigError
from evomerge.merging import FilterRule, MergeRecipe, ParamValue, resolve_params
from evomerge.optimizer.export import trial_recipe
from evomerge.optimizer.path_plot import plot_layer_path
from evomerge.optimizer.study import best_trial, complete_trials, pareto_front
from evomerge.search_spaces import expert_aliases

__all__ = [
    "HistorySeries",
    "history_series",
    "plot_history",
    "plot_pareto",
    "plot_recipe_heatmap",
    "recipe_layer_values",
    "write_report_plots",
]

_DPI = 110
_POINT = "#1f77b4"  # complete trials
_BEST = "#ff7f0e"  # running best / best trial
_FRONT = "#d62728"  # Pareto front
_PRUNED = "#9467bd"
_FAILED = "#444444"
_OTHER = "#9aa5b1"  # dominated trials
_PART_LABELS = {"self_attn": "attn"}


# ------------------------------------------------------------------------------------ shared helpers
def _new_figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), dpi=_DPI, layout="constrained")
    FigureCanvasAgg(fig)  # attaches itself as fig.canvas: Agg rendering, no GUI, no pyplot state
    return fig


def _save_atomic(fig: Figure, path: Path) -> Path:
    """Render ``fig`` as PNG to a temporary sibling of ``path``, then rename it into place."""
    path = Path(path)
    with atomic_file(path, "wb", suffix=".png") as f:
        fig.savefig(f, format="png", dpi=_DPI, facecolor="white")
    return path


def _trial_mean(t: FrozenTrial) -> float | None:
    """The dev mean of a complete trial (its ``mean`` attribute, else a single objective's value)."""
    if "mean" in t.user_attrs:
        return float(t.user_attrs["mean"])
    if t.values is not None and len(t.values) == 1:
        return float(t.values[0])
    return None


def _empty_note(ax: Axes, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, fontsize=11, color="#555555")
    ax.set_xticks([])
    ax.set_yticks([])


# ------------------------------------------------------------------------------------ history
@dataclass(frozen=True)
class HistorySeries:
    """What :func:`plot_history` draws, by trial number."""

    complete: list[tuple[int, float]]
    """(trial, dev mean) of each complete trial."""
    running_best: list[tuple[int, float]]
    """(trial, best dev mean so far) at each complete trial."""
    pruned: list[tuple[int, float | None]]
    """(trial, last reported intermediate value, None when it reported none) of each pruned trial."""
    failed: list[int]
    """Failed trials."""


def history_series(trials: Sequence[FrozenTrial]) -> HistorySeries:
    """The points of the optimization history (running trials are left out)."""
    complete: list[tuple[int, float]] = []
    pruned: list[tuple[int, float | None]] = []
    failed: list[int] = []
    for t in sorted(trials, key=lambda t: t.number):
        if t.state == TrialState.COMPLETE:
            mean = _trial_mean(t)
            if mean is not None:
                complete.append((t.number, mean))
        elif t.state == TrialState.PRUNED:
            steps = t.intermediate_values
            pruned.append((t.number, float(steps[max(steps)]) if steps else None))
        elif t.state == TrialState.FAIL:
            failed.append(t.number)
    running: list[tuple[int, float]] = []
    for n, v in complete:
        running.append((n, v if not running else max(running[-1][1], v)))
    return HistorySeries(complete, running, pruned, failed)


def plot_history(trials: Sequence[FrozenTrial], path: str | Path, *, title: str | None = None) -> Path:
    """Optimization history: the dev mean of each complete trial (points, by trial number), the running
    best (a step line), the best trial (a star), pruned trials (``x``) at their last reported intermediate
    value (the mean on the last rung they reached; along the bottom when they reported none) and failed
    trials (``x``) along the bottom. Running trials are left out. Returns ``path``."""
    series = history_series(trials)
    done = series.complete
    pruned_at = [(n, v) for n, v in series.pruned if v is not None]
    bottom_pruned = [n for n, v in series.pruned if v is None]
    failed = series.failed

    fig = _new_figure(8.0, 4.6)
    ax = fig.add_subplot()
    heading = title or "Optimization history (dev split)"
    ax.set_title(
        f"{heading}\n{len(done)} complete, {len(series.pruned)} pruned, {len(failed)} failed", fontsize=11
    )
    ax.set_xlabel("trial number")
    ax.set_ylabel("dev mean score")
    if not (done or series.pruned or failed):
        _empty_note(ax, "no trials yet")
        return _save_atomic(fig, Path(path))

    if done:
        xs = [n for n, _ in done]
        ax.scatter(xs, [v for _, v in done], s=28, color=_POINT, zorder=3, label="complete trial")
        best = [v for _, v in series.running_best]
        last = max([xs[-1], *(n for n, _ in series.pruned), *failed])
        ax.plot(
            [*xs, last],
            [*best, best[-1]],
            drawstyle="steps-post",
            color=_BEST,
            lw=2,
            zorder=2,
            label="running best",
        )
        best_n, best_v = max(done, key=lambda p: (p[1], -p[0]))
        ax.scatter([best_n], [best_v], s=170, marker="*", color=_BEST, edgecolor="black", lw=0.6, zorder=4)
        ax.annotate(
            f"best: trial {best_n} ({best_v:.3f})",
            (best_n, best_v),
            xytext=(0, 9),
            textcoords="offset points",
            ha="center",
            fontsize=9,
        )
    if pruned_at:
        ax.scatter(
            [n for n, _ in pruned_at],
            [v for _, v in pruned_at],
            marker="x",
            s=40,
            color=_PRUNED,
            zorder=3,
            label="pruned (last rung mean)",
        )
    # x in data coordinates, y in axes coordinates: along the bottom whatever the score range
    along_bottom = ax.get_xaxis_transform()
    if bottom_pruned:
        ax.scatter(
            bottom_pruned,
            [0.03] * len(bottom_pruned),
            marker="x",
            s=40,
            color=_PRUNED,
            transform=along_bottom,
            zorder=3,
            label="pruned (no rung reported)" if pruned_at else "pruned",
        )
    if failed:
        ax.scatter(
            failed,
            [0.03] * len(failed),
            marker="x",
            s=40,
            color=_FAILED,
            lw=1.6,
            transform=along_bottom,
            zorder=3,
            label="failed",
        )
    values = [v for _, v in done] + [v for _, v in pruned_at]
    if values:
        lo, hi = min(values), max(values)
        pad = max(0.05 * (hi - lo), 0.02)
        # room below for the markers along the bottom and above for the best-trial label
        below = 0.12 * (hi - lo) + 0.02 if failed or bottom_pruned else 0.0
        ax.set_ylim(lo - pad - below, hi + 3 * pad)
    numbers = [n for n, _ in done] + [n for n, _ in series.pruned] + failed
    # explicit x limits: markers along the bottom do not take part in autoscaling
    pad_x = max(0.6, 0.03 * (max(numbers) - min(numbers)))
    ax.set_xlim(min(numbers) - pad_x, max(numbers) + pad_x)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize=8, framealpha=0.85)
    return _save_atomic(fig, Path(path))


# ------------------------------------------------------------------------------------ Pareto front
def _scores(t: FrozenTrial, tasks: Sequence[str]) -> tuple[float, ...]:
    return tuple(float(t.user_attrs["scores"][k]) for k in tasks)


def _grouped(trials: Sequence[FrozenTrial], tasks: Sequence[str]) -> dict[tuple[float, ...], list[int]]:
    """Distinct score points -> the numbers of the trials at that point (many trials share a point when
    scores are fractions of a small dev set)."""
    groups: dict[tuple[float, ...], list[int]] = {}
    for t in trials:
        groups.setdefault(_scores(t, tasks), []).append(t.number)
    return groups


def _point_label(numbers: Sequence[int]) -> str:
    """``#3`` for one trial, ``#3, 5, 9`` for trials sharing a point, ``#3, 5, 9 +4`` for more."""
    shown = ", ".join(str(n) for n in numbers[:3])
    return f"#{shown}" + (f" +{len(numbers) - 3}" if len(numbers) > 3 else "")


def _score_limits(values: Sequence[float]) -> tuple[float, float]:
    """Axis limits around scores in [0, 1]: padded, at least 0.05 wide, barely outside [0, 1]."""
    vmin, vmax = min(values), max(values)
    lo, hi = vmin, vmax
    if hi - lo < 0.05:
        mid = (lo + hi) / 2
        lo = min(vmin, max(0.0, mid - 0.025) if vmin >= 0 else mid - 0.025)
        hi = max(vmax, lo + 0.05)
    pad = 0.14 * (hi - lo)
    low, high = lo - pad, hi + pad
    if vmin >= 0 and low < 0:  # a score of 0 sits just above the frame, no negative ticks
        low = -0.04 * (hi - lo)
    if vmax <= 1 and high > 1:
        high = 1 + 0.04 * (hi - lo)
    return low, high


def _pareto_panel(
    ax: Axes,
    groups: Mapping[tuple[float, ...], Sequence[int]],
    front: set[tuple[float, ...]],
    i: int,
    j: int,
    *,
    connect: bool,
    max_labels: int,
) -> None:
    """Scatter of tasks ``i`` (x) and ``j`` (y). Trials landing on the same spot of this projection are
    one marker, larger with their count; front markers are labelled with their trial numbers when there
    are at most ``max_labels`` of them in the panel."""

    def size(n: int) -> float:
        return 26.0 + 16.0 * (n - 1)

    spots: dict[tuple[float, float], list[int]] = {}
    front_spots: dict[tuple[float, float], list[int]] = {}
    for p, numbers in groups.items():
        (front_spots if p in front else spots).setdefault((p[i], p[j]), []).extend(numbers)
    if spots:
        ax.scatter(
            [x for x, _ in spots],
            [y for _, y in spots],
            s=[size(len(ns)) for ns in spots.values()],
            color=_OTHER,
            alpha=0.75,
            edgecolor="white",
            lw=0.5,
            zorder=2,
            label="dominated trial",
        )
    ordered = sorted(front_spots.items(), key=lambda q: (q[0][0], -q[0][1]))
    if connect and len(ordered) > 1:
        # the boundary of the dominated region (maximisation): down, then right, from point to point
        ax.plot(
            [x for (x, _), _ in ordered],
            [y for (_, y), _ in ordered],
            drawstyle="steps-pre",
            color=_FRONT,
            lw=1.4,
            ls="--",
            alpha=0.8,
            zorder=2,
        )
    ax.scatter(
        [x for (x, _), _ in ordered],
        [y for (_, y), _ in ordered],
        s=[size(len(ns)) + 14 for _, ns in ordered],
        color=_FRONT,
        edgecolor="black",
        lw=0.6,
        zorder=3,
        label="Pareto front",
    )
    xlim = _score_limits([p[i] for p in groups])
    ax.set_xlim(*xlim)
    ax.set_ylim(*_score_limits([p[j] for p in groups]))
    if len(ordered) <= max_labels:
        for (x, y), numbers in ordered:
            right = x > (xlim[0] + xlim[1]) / 2  # labels point inwards, away from the frame
            ax.annotate(
                _point_label(sorted(numbers)),
                (x, y),
                xytext=(-7 if right else 7, 6),
                textcoords="offset points",
                ha="right" if right else "left",
                fontsize=8,
                color="#222222",
                zorder=4,
            )
    ax.grid(alpha=0.3)


def plot_pareto(
    trials: Sequence[FrozenTrial], tasks: Sequence[str], path: str | Path, *, title: str | None = None
) -> Path:
    """The Pareto front of the per-task dev scores (all tasks maximised).

    Only complete trials with a recorded score for every task are drawn (others are ignored). Trials
    sharing a point are drawn once, larger, and front points are labelled with their trial numbers
    (``#3, 5, 9 +2``).

    - 2 tasks: one scatter, front highlighted and joined by the boundary of the region it dominates.
    - 3+ tasks: one panel per pair of tasks; the front is the set of trials non-dominated over *all*
      tasks (:func:`~evomerge.optimizer.study.pareto_front`), so in a 2-D projection a front point can sit
      below another point.
    - 1 task: the score against trial number, the best trial(s) being the (one-dimensional) front.
    """
    tasks = list(tasks)
    if not tasks:
        raise ConfigError("plot_pareto: no task names given")
    scored = [
        t
        for t in trials
        if t.state == TrialState.COMPLETE and all(k in t.user_attrs.get("scores", {}) for k in tasks)
    ]
    heading = title or "Pareto front (dev split)"
    groups = _grouped(scored, tasks)
    front = {_scores(t, tasks) for t in pareto_front(scored, tasks)} if scored else set()
    summary = f"{len(front)} non-dominated of {len(groups)} distinct points ({len(scored)} complete trials)"

    if not scored or len(tasks) <= 2:
        fig = _new_figure(7.0, 5.6)
        ax = fig.add_subplot()
        fig.suptitle(f"{heading}\n{summary}", fontsize=11)
        if not scored:
            _empty_note(ax, "no complete trials yet")
        elif len(tasks) == 2:
            _pareto_panel(ax, groups, front, 0, 1, connect=True, max_labels=16)
            ax.set_xlabel(f"{tasks[0]} (dev score)")
            ax.set_ylabel(f"{tasks[1]} (dev score)")
            ax.legend(loc="lower left", fontsize=8, framealpha=0.85)
        else:
            by_number = sorted(scored, key=lambda t: t.number)
            xs = [t.number for t in by_number]
            ys = [_scores(t, tasks)[0] for t in by_number]
            top = max(ys)
            rest = [(x, y) for x, y in zip(xs, ys, strict=True) if y != top]
            if rest:
                ax.scatter(
                    [x for x, _ in rest],
                    [y for _, y in rest],
                    s=30,
                    color=_OTHER,
                    edgecolor="white",
                    lw=0.5,
                    zorder=2,
                    label="dominated trial",
                )
            best = [x for x, y in zip(xs, ys, strict=True) if y == top]
            ax.scatter(
                best,
                [top] * len(best),
                s=44,
                color=_FRONT,
                edgecolor="black",
                lw=0.6,
                zorder=3,
                label="best (the one-task front)",
            )
            ax.set_ylim(*_score_limits(ys))
            ax.legend(loc="lower left", fontsize=8, framealpha=0.85)
            ax.set_xlabel("trial number")
            ax.set_ylabel(f"{tasks[0]} (dev score)")
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.grid(alpha=0.3)
        return _save_atomic(fig, Path(path))

    pairs = list(combinations(range(len(tasks)), 2))
    ncols = min(3, len(pairs))
    nrows = math.ceil(len(pairs) / ncols)
    fig = _new_figure(4.3 * ncols, 3.9 * nrows + 0.6)
    fig.suptitle(f"{heading}: front non-dominated over all {len(tasks)} tasks\n{summary}", fontsize=11)
    axes = fig.subplots(nrows, ncols, squeeze=False)
    for k, ax in enumerate(axes.flat):
        if k >= len(pairs):
            ax.set_axis_off()
            continue
        i, j = pairs[k]
        _pareto_panel(ax, groups, front, i, j, connect=False, max_labels=8)
        ax.set_xlabel(f"{tasks[i]} (dev)")
        ax.set_ylabel(f"{tasks[j]} (dev)")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncols=len(labels), fontsize=9)
    return _save_atomic(fig, Path(path))


# ------------------------------------------------------------------------------------ recipe heatmap
def _filters(value: ParamValue | None) -> list[str]:
    if isinstance(value, tuple) and value and isinstance(value[0], FilterRule):
        return [r.filter for r in value if isinstance(r, FilterRule) and r.filter is not None]
    return []


def recipe_layer_values(
    recipe: MergeRecipe, num_layers: int, aliases: Sequence[str] | None = None
) -> dict[str, tuple[list[str], list[list[float]]]]:
    """The recipe's per-model parameters resolved for each layer ``0..num_layers-1``, exactly as the merge
    engine resolves them (:func:`~evomerge.merging.resolve_params`: filter rules, per-layer lists
    interpolated over the layer stack, top-level and method defaults).

    Returns ``param -> (row labels, rows)``, one row of ``num_layers`` values per expert (the recipe's
    :meth:`~MergeRecipe.expert_models`, in order). When some expert's (or the top-level) value of a
    parameter is a list of ``{filter, value}`` rules, each expert gets one row per filter, in rule order,
    labelled ``<alias>/<part>`` (``self_attn`` shows as ``attn``), resolved for a tensor of that layer whose
    name contains the filter; tensors no filter matches (norms) are not shown. Parameters shown: those the
    recipe sets (per model or top level), else all the method's per-model parameters."""
    if num_layers < 1:
        raise ConfigError(f"num_layers must be >= 1, got {num_layers}")
    experts = recipe.expert_models()
    names = list(aliases) if aliases is not None else expert_aliases([m.model for m in experts])
    if len(names) != len(experts):
        raise ConfigError(f"{len(names)} aliases for {len(experts)} expert models")
    method = recipe.method
    params = [
        p for p in method.model_params if p in recipe.parameters or any(p in m.parameters for m in experts)
    ] or list(method.model_params)
    cache: dict[str, list[dict[str, float]]] = {}

    def resolved(tensor: str) -> list[dict[str, float]]:
        if tensor not in cache:
            cache[tensor] = resolve_params(recipe, tensor, num_layers)[0]
        return cache[tensor]

    out: dict[str, tuple[list[str], list[list[float]]]] = {}
    for p in params:
        parts: list[str] = []
        for value in [recipe.parameters.get(p), *(m.parameters.get(p) for m in experts)]:
            parts += [f for f in _filters(value) if f not in parts]
        labels: list[str] = []
        rows: list[list[float]] = []
        for e, alias in enumerate(names):
            if not parts:
                labels.append(alias)
                rows.append([resolved(f"model.layers.{layer}.weight")[e][p] for layer in range(num_layers)])
            for part in parts:
                labels.append(f"{alias}/{_PART_LABELS.get(part, part)}")
                rows.append(
                    [resolved(f"model.layers.{layer}.{part}.weight")[e][p] for layer in range(num_layers)]
                )
        out[p] = (labels, rows)
    return out


def _text_color(rgba: tuple[float, float, float, float]) -> str:
    r, g, b, _ = rgba
    return "black" if 0.299 * r + 0.587 * g + 0.114 * b > 0.55 else "white"


def plot_recipe_heatmap(
    recipe: MergeRecipe,
    num_layers: int,
    path: str | Path,
    aliases: Sequence[str] | None = None,
    *,
    title: str | None = None,
) -> dict[str, list[list[float]]]:
    """Per-layer heatmap of a recipe: one panel per per-model parameter (``weight``, ``density``, ...),
    rows = experts (or ``<expert>/<part>`` for filter rules, see :func:`recipe_layer_values`), columns =
    layers, each panel with its own colour scale and colorbar; values are written in the cells when the
    cells are large enough to read them. Returns the plotted matrices (``param -> rows``)."""
    data = recipe_layer_values(recipe, num_layers, aliases)
    n_rows = [len(rows) for _, rows in data.values()]
    label_chars = max((len(s) for labels, _ in data.values() for s in labels), default=4)
    left = 0.6 + 0.075 * label_chars  # inches for the row labels
    width = min(16.0, max(6.5, left + 1.6 + 0.62 * num_layers))
    cell_w_pt = (width - left - 1.6) / num_layers * 72
    font = min(9.0, cell_w_pt * 0.85 / 2.6)  # "0.95" is about 2.6 em wide
    annotate = font >= 5.5 and max(n_rows) <= 24
    heights = [0.75 + 0.34 * max(n, 1) for n in n_rows]
    fig = _new_figure(width, sum(heights) + 0.7)
    method = recipe.merge_method
    fig.suptitle(title or f"Recipe parameters per layer ({method})", fontsize=11)
    axes = fig.subplots(len(data), 1, squeeze=False, height_ratios=heights)[:, 0]
    step = max(1, math.ceil(num_layers / 24))
    for ax, (param, (labels, rows)) in zip(axes, data.items(), strict=True):
        flat = [v for row in rows for v in row]
        lo, hi = min(flat), max(flat)
        if hi - lo < 1e-9:  # a constant parameter: centre it in a visible range
            lo, hi = lo - 0.5, hi + 0.5
        norm = Normalize(vmin=lo, vmax=hi)
        image = ax.imshow(rows, aspect="auto", cmap="viridis", norm=norm, interpolation="nearest")
        ax.set_yticks(range(len(labels)), labels, fontsize=9)
        ax.set_xticks(range(0, num_layers, step))
        ax.tick_params(axis="x", labelsize=8)
        ax.set_title(param, fontsize=10, loc="left")
        bar = fig.colorbar(image, ax=ax, pad=0.015, fraction=0.05, aspect=max(8, 6 * len(rows)))
        bar.set_label(param, fontsize=9)
        bar.ax.tick_params(labelsize=8)
        if annotate:
            cmap = image.get_cmap()
            for r, row in enumerate(rows):
                for c, v in enumerate(row):
                    ax.text(
                        c,
                        r,
                        f"{v:.2f}",
                        ha="center",
                        va="center",
                        fontsize=font,
                        color=_text_color(cmap(norm(v))),
                    )
    axes[-1].set_xlabel("layer")
    _save_atomic(fig, Path(path))
    return {p: rows for p, (_, rows) in data.items()}


# ------------------------------------------------------------------------------------ report
def write_report_plots(
    study: optuna.Study, tasks: Sequence[str], out_dir: str | Path, *, num_layers: int
) -> dict[str, Path]:
    """Write ``history.png``, ``pareto.png`` and ``heatmap.png`` (the best trial's recipe,
    :func:`~evomerge.optimizer.study.best_trial`) into ``out_dir``; returns ``name -> path`` (names
    ``history``, ``pareto``, ``heatmap``). A study without a complete trial gets no heatmap (the other two
    plots say so)."""
    out = Path(out_dir)
    trials = study.get_trials(deepcopy=False)
    paths = {
        "history": plot_history(
            trials, out / "history.png", title=f"Optimization history: {study.study_name}"
        ),
        "pareto": plot_pareto(
            complete_trials(study), tasks, out / "pareto.png", title=f"Pareto front (dev): {study.study_name}"
        ),
    }
    try:
        best = best_trial(study)
    except ConfigError:
        return paths
    recipe = trial_recipe(best)
    title = f"{study.study_name}, trial {best.number} (dev mean {float(best.user_attrs['mean']):.3f})"
    if recipe.slices or recipe.merge_method == "passthrough":  # a layer path
        plot_layer_path(recipe, num_layers, out / "heatmap.png", title=f"Best layer path: {title}")
        paths["heatmap"] = out / "heatmap.png"
        return paths
    plot_recipe_heatmap(
        recipe,
        num_layers,
        out / "heatmap.png",
        title=(
            f"Best recipe per layer: {study.study_name}, trial {best.number} "
            f"(dev mean {float(best.user_attrs['mean']):.3f})"
        ),
    )
    paths["heatmap"] = out / "heatmap.png"
    return paths
