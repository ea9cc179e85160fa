"""Tests of evomerge.optimizer.plots: the PNGs of ``evomerge report`` drawn from real sweeps on the micro
zoo (one single-objective TPE sweep, one NSGA-II sweep), and the values behind them."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import optuna
import pytest
from optuna.distributions import FloatDistribution
from optuna.trial import FrozenTrial, TrialState, create_trial
from PIL import Image
from test_optimizer import zoo_sweep

from evomerge.merging import MergeRecipe
from evomerge.optimizer import (
    LocalEvaluator,
    SamplerConfig,
    best_trial,
    pareto_front,
    run_search,
    trial_recipe,
)
from evomerge.optimizer.plots import (
    history_series,
    plot_history,
    plot_pareto,
    plot_recipe_heatmap,
    recipe_layer_values,
    write_report_plots,
)
from evomerge.search_spaces import SearchSpace, SearchSpaceConfig, expert_aliases
from evomerge.zoo import Zoo

TASKS = ["arith", "code", "logic"]
FRONT_RED = (0xD6, 0x27, 0x28)  # the Pareto-front colour of plots.py
BEST_ORANGE = (0xFF, 0x7F, 0x0E)  # the running-best colour


# ------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def plot_runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("plot_runs")


@pytest.fixture(scope="module")
def plot_evaluator(micro_zoo: Zoo, zoo_cache: Path, plot_runs: Path) -> LocalEvaluator:
    return LocalEvaluator(zoo_sweep(plot_runs, zoo_cache, "evaluator"))


@pytest.fixture(scope="module")
def single_study(plot_runs: Path, zoo_cache: Path, plot_evaluator: LocalEvaluator) -> optuna.Study:
    """8 complete TPE trials of a per-layer ties search (weight and density per expert and layer)."""
    sweep = zoo_sweep(
        plot_runs,
        zoo_cache,
        "plots-single",
        search_space=SearchSpaceConfig(method="ties", granularity="layer"),
        sampler=SamplerConfig(name="tpe", seed=0, n_startup_trials=4),
        n_trials=8,
        seed_genomes=({"weight": 1.0, "density": 0.5},),
    )
    return run_search(sweep, plot_evaluator)


@pytest.fixture(scope="module")
def multi_study(plot_runs: Path, zoo_cache: Path, plot_evaluator: LocalEvaluator) -> optuna.Study:
    """8 complete NSGA-II trials: one objective per task."""
    sweep = zoo_sweep(
        plot_runs,
        zoo_cache,
        "plots-multi",
        search_space=SearchSpaceConfig(method="ties", granularity="global"),
        sampler=SamplerConfig(name="nsga2", seed=0, population_size=4),
        n_trials=8,
    )
    return run_search(sweep, plot_evaluator)


# ------------------------------------------------------------------------------------ helpers
def read_png(path: Path) -> np.ndarray:
    """The image as an RGB uint8 array, after checking it is a well-formed PNG."""
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(path) as img:
        img.verify()
    with Image.open(path) as img:
        assert img.format == "PNG"
        return np.asarray(img.convert("RGB"))


def assert_non_trivial(pixels: np.ndarray, *, min_w: int = 500, min_h: int = 300) -> None:
    h, w, _ = pixels.shape
    assert w >= min_w and h >= min_h, (w, h)
    assert w <= 4000 and h <= 4000, (w, h)
    assert float(pixels.std()) > 12.0
    colours = np.unique(pixels.reshape(-1, 3), axis=0)
    assert len(colours) > 50  # text, markers, antialiasing: far from one flat colour
    white = np.all(pixels == 255, axis=-1).mean()
    assert 0.2 < white < 0.995  # a white background with something drawn on it


def colour_pixels(pixels: np.ndarray, rgb: tuple[int, int, int], tol: int = 6) -> int:
    return int(np.all(np.abs(pixels.astype(int) - np.array(rgb)) <= tol, axis=-1).sum())


def interp_layers(value: float | list[float], num_layers: int) -> list[float]:
    """Independent per-layer expansion: a scalar for every layer, a list of m values linearly
    interpolated at position l / (n - 1) of the stack."""
    if isinstance(value, int | float):
        return [float(value)] * num_layers
    m = len(value)
    if m == 1 or num_layers == 1:
        return [float(value[-1] if num_layers == 1 and m > 1 else value[0])] * num_layers
    return [
        float(np.interp(layer / (num_layers - 1) * (m - 1), range(m), value)) for layer in range(num_layers)
    ]


def temp_leftovers(out_dir: Path) -> list[str]:
    return sorted(p.name for p in out_dir.iterdir() if p.name.startswith("."))


# ------------------------------------------------------------------------------------ report plots
def test_report_plots_of_a_single_objective_sweep(
    single_study: optuna.Study, micro_zoo: Zoo, tmp_path: Path
) -> None:
    num_layers = micro_zoo.config.num_layers
    paths = write_report_plots(single_study, TASKS, tmp_path / "plots", num_layers=num_layers)
    assert set(paths) == {"history", "pareto", "heatmap"}
    assert {p.name for p in paths.values()} == {"history.png", "pareto.png", "heatmap.png"}
    assert sorted(p.name for p in (tmp_path / "plots").iterdir()) == [
        "heatmap.png",
        "history.png",
        "pareto.png",
    ]
    for p in paths.values():
        assert p.parent == tmp_path / "plots"
        assert_non_trivial(read_png(p))
    history = read_png(paths["history"])
    assert colour_pixels(history, BEST_ORANGE) > 200  # the running-best line
    assert colour_pixels(read_png(paths["pareto"]), FRONT_RED) > 100  # the front is highlighted

    # the history's values are the study's: every complete trial's dev mean and its running maximum
    series = history_series(single_study.get_trials())
    trials = single_study.get_trials(states=(TrialState.COMPLETE,))
    assert len(trials) == 8
    assert series.complete == [(t.number, pytest.approx(t.user_attrs["mean"])) for t in trials]
    assert series.complete == [(t.number, pytest.approx(t.value)) for t in trials]
    best = np.maximum.accumulate([t.user_attrs["mean"] for t in trials])
    assert [v for _, v in series.running_best] == pytest.approx(list(best))
    assert series.running_best[-1][1] == pytest.approx(best_trial(single_study).user_attrs["mean"])
    assert series.pruned == [] and series.failed == []

    # rewriting replaces the files in place and leaves no temporary sibling behind
    before = {k: p.stat().st_mtime_ns for k, p in paths.items()}
    again = write_report_plots(single_study, TASKS, tmp_path / "plots", num_layers=num_layers)
    assert again == paths
    assert all(p.stat().st_mtime_ns >= before[k] for k, p in again.items())
    assert temp_leftovers(tmp_path / "plots") == []


def test_heatmap_is_the_best_recipe_per_layer(
    single_study: optuna.Study, micro_zoo: Zoo, tmp_path: Path
) -> None:
    num_layers = micro_zoo.config.num_layers
    best = best_trial(single_study)
    recipe = trial_recipe(best)
    matrices = plot_recipe_heatmap(recipe, num_layers, tmp_path / "heatmap.png")
    assert_non_trivial(read_png(tmp_path / "heatmap.png"), min_w=400, min_h=250)
    assert list(matrices) == ["weight", "density"]
    raw = best.user_attrs["recipe"]["models"]  # the stored dict, not the parsed recipe
    experts = list(micro_zoo.experts.values())
    assert [m["model"] for m in raw] == experts
    for param, rows in matrices.items():
        assert len(rows) == len(experts)
        for row, model in zip(rows, raw, strict=True):
            expected = interp_layers(model["parameters"][param], num_layers)
            assert row == pytest.approx(expected, abs=1e-9)
            assert len(row) == num_layers
    # and from the trial's genome directly: layer granularity means gene g<l> is layer l's value
    aliases = expert_aliases(experts)
    for param, rows in matrices.items():
        for alias, row in zip(aliases, rows, strict=True):
            genes = [best.params[f"{alias}.{param}.g{layer}"] for layer in range(num_layers)]
            assert row == pytest.approx(genes, abs=1e-6)  # recipes round genes to 6 decimals


def test_heatmap_interpolates_short_lists_and_fills_defaults(tmp_path: Path) -> None:
    recipe = MergeRecipe.model_validate(
        {
            "merge_method": "ties",
            "base_model": "/zoo/base",
            "models": [
                {"model": "/zoo/base"},  # the base itself is skipped, as in a merge
                {"model": "/zoo/math", "parameters": {"weight": [0.0, 1.0, 0.4], "density": 0.3}},
                {"model": "/zoo/code", "parameters": {"weight": 0.7}},  # density: the method default
            ],
        }
    )
    values = recipe_layer_values(recipe, 7)
    assert list(values) == ["weight", "density"]
    labels, weight = values["weight"]
    assert labels == ["math", "code"]
    assert weight[0] == pytest.approx(interp_layers([0.0, 1.0, 0.4], 7))
    assert weight[0] == pytest.approx([0.0, 1 / 3, 2 / 3, 1.0, 0.8, 0.6, 0.4])
    assert weight[1] == pytest.approx([0.7] * 7)
    density = values["density"][1]
    assert density[0] == pytest.approx([0.3] * 7)
    assert density[1] == pytest.approx([recipe.method.model_params["density"]] * 7)
    matrices = plot_recipe_heatmap(recipe, 7, tmp_path / "h.png", aliases=["M", "C"])
    assert matrices == {"weight": weight, "density": density}
    assert recipe_layer_values(recipe, 7, ["M", "C"])["weight"][0] == ["M", "C"]
    assert_non_trivial(read_png(tmp_path / "h.png"), min_w=400, min_h=250)
    with pytest.raises(Exception, match="aliases"):
        recipe_layer_values(recipe, 7, ["only-one"])


def test_filter_rules_give_one_row_per_expert_and_part(tmp_path: Path) -> None:
    num_layers = 6
    cfg = SearchSpaceConfig(method="ties", granularity="layer_group", group_size=2, split_attn_mlp=True)
    experts = ["/zoo/experts/math", "/zoo/experts/code", "/zoo/experts/logic"]
    space = SearchSpace(cfg, "/zoo/base", experts, num_layers)
    rng = np.random.default_rng(0)
    dists = space.distributions()
    assert all(isinstance(d, FloatDistribution) for d in dists.values())
    genome = {
        k: float(rng.uniform(d.low, d.high)) for k, d in dists.items() if isinstance(d, FloatDistribution)
    }
    recipe = space.to_recipe(genome)
    values = recipe_layer_values(recipe, num_layers)
    for param in ("weight", "density"):
        labels, rows = values[param]
        assert labels == ["math/attn", "math/mlp", "code/attn", "code/mlp", "logic/attn", "logic/mlp"]
        for label, row in zip(labels, rows, strict=True):
            alias, part = label.split("/")
            expected = [
                genome[space.gene_name(alias, param, part, layer // 2)] for layer in range(num_layers)
            ]
            assert row == pytest.approx(expected, abs=1e-6)
        # attention and MLP really differ somewhere: the rows are not copies of each other
        assert rows[0] != rows[1]
    matrices = plot_recipe_heatmap(recipe, num_layers, tmp_path / "parts.png")
    assert matrices == {p: rows for p, (_, rows) in values.items()}
    assert_non_trivial(read_png(tmp_path / "parts.png"))


def test_nsga2_sweep_pareto_plots(multi_study: optuna.Study, micro_zoo: Zoo, tmp_path: Path) -> None:
    assert multi_study.metric_names == TASKS
    paths = write_report_plots(multi_study, TASKS, tmp_path, num_layers=micro_zoo.config.num_layers)
    assert set(paths) == {"history", "pareto", "heatmap"}
    for p in paths.values():
        assert_non_trivial(read_png(p))
    pareto = read_png(paths["pareto"])
    assert colour_pixels(pareto, FRONT_RED) > 100
    assert pareto.shape[1] > pareto.shape[0]  # three pair panels side by side
    trials = multi_study.get_trials(states=(TrialState.COMPLETE,))
    assert len(trials) == 8
    assert pareto_front(trials, TASKS)  # something to highlight
    # two tasks: one panel; one task: score against trial number; both drawn from the same trials
    two = read_png(plot_pareto(trials, TASKS[:2], tmp_path / "two.png"))
    one = read_png(plot_pareto(trials, TASKS[:1], tmp_path / "one.png"))
    for pixels in (two, one):
        assert_non_trivial(pixels)
        assert colour_pixels(pixels, FRONT_RED) > 30
    assert temp_leftovers(tmp_path) == []


# ------------------------------------------------------------------------------------ pruned, failed, empty
def test_history_with_pruned_and_failed_trials(single_study: optuna.Study, tmp_path: Path) -> None:
    trials = list(single_study.get_trials())
    n = len(trials)
    extra: list[FrozenTrial] = [
        create_trial(state=TrialState.PRUNED, intermediate_values={6: 0.02, 12: 0.03}),
        create_trial(state=TrialState.PRUNED),  # pruned before reporting anything
        create_trial(state=TrialState.FAIL, user_attrs={"error": "ValueError: NaN"}),
        create_trial(state=TrialState.RUNNING),
    ]
    for k, t in enumerate(extra):
        t.number = n + k
    series = history_series(trials + extra)
    assert series.pruned == [(n, 0.03), (n + 1, None)]
    assert series.failed == [n + 2]
    assert [k for k, _ in series.complete] == list(range(n))
    path = plot_history(trials + extra, tmp_path / "history.png")
    assert_non_trivial(read_png(path))
    # the same trials stored in a real study (as the loop records them) plot the same way
    study = optuna.create_study(
        storage=f"sqlite:///{tmp_path / 'copy.db'}", study_name="copy", direction="maximize"
    )
    study.add_trials([t for t in trials + extra if t.state != TrialState.RUNNING])
    paths = write_report_plots(study, TASKS, tmp_path / "out", num_layers=2)
    assert set(paths) == {"history", "pareto", "heatmap"}
    assert history_series(study.get_trials()).pruned == [(n, 0.03), (n + 1, None)]
    for p in paths.values():
        assert_non_trivial(read_png(p))


def test_study_without_complete_trials(tmp_path: Path) -> None:
    study = optuna.create_study(direction="maximize")
    assert write_report_plots(study, TASKS, tmp_path / "empty", num_layers=2).keys() == {"history", "pareto"}
    study.add_trial(create_trial(state=TrialState.FAIL))
    study.add_trial(create_trial(state=TrialState.PRUNED, intermediate_values={5: 0.1}))
    paths = write_report_plots(study, TASKS, tmp_path / "failed", num_layers=2)
    assert set(paths) == {"history", "pareto"}  # no best recipe, no heatmap
    assert not (tmp_path / "failed" / "heatmap.png").exists()
    for p in paths.values():
        read_png(p)
    assert_non_trivial(read_png(paths["history"]))


def test_plots_leave_pyplot_alone(tmp_path: Path) -> None:
    """Drawing goes through Figure + FigureCanvasAgg: pyplot is never imported, the backend is untouched."""
    code = (
        "import sys, matplotlib\n"
        "before = dict.__getitem__(matplotlib.rcParams, 'backend')\n"
        "from optuna.trial import create_trial\n"
        "from evomerge.optimizer.plots import plot_history\n"
        f"plot_history([create_trial(value=0.5, user_attrs={{'mean': 0.5}})], {str(tmp_path / 'h.png')!r})\n"
        "assert 'matplotlib.pyplot' not in sys.modules, 'pyplot imported'\n"
        "assert dict.__getitem__(matplotlib.rcParams, 'backend') == before, 'backend changed'\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "ok"
    assert (tmp_path / "h.png").is_file()
