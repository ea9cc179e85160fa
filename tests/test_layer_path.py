"""The data-flow (layer-path) search space: genome -> sliced recipe, the live model following candidates
of other depths, and a sweep end to end (search, resume, report, export as mergekit slices)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from conftest import run_cli

from evomerge.checkpoints import ModelDir
from evomerge.errors import EvaluationError
from evomerge.evaluators import HFBackend, load_split
from evomerge.evaluators.tasks import load_fewshot
from evomerge.merging import InMemoryMerger, MergeRecipe, merge_streaming
from evomerge.search_spaces import LayerPathConfig, LayerPathSpace
from evomerge.zoo import Zoo


def _space(scale: bool = False, **kw: object) -> LayerPathSpace:
    return LayerPathSpace(LayerPathConfig(scale=scale, **kw), "/m/base", ["/m/a", "/m/b"], 4)  # type: ignore[arg-type]


def test_genome_to_path_and_recipe() -> None:
    space = _space()
    assert len(space.slots) == 2 * 3 * 4 and space.dimension == 24
    genome = {space.include_gene(t): 0.0 for t in range(24)}
    # base layers 0, 1; a's layer 2; b's layer 3; then (repeat 2) base layer 1 again
    for t in (0, 1, 6, 11, 13):
        genome[space.include_gene(t)] = 0.9
    assert space.path(genome) == [(0, 0, 1.0), (0, 1, 1.0), (1, 2, 1.0), (2, 3, 1.0), (0, 1, 1.0)]
    recipe = space.to_recipe(genome)
    assert recipe.merge_method == "passthrough"
    assert [(s.sources[0].model, s.sources[0].layer_range) for s in recipe.slices] == [
        ("/m/base", (0, 2)),
        ("/m/a", (2, 3)),
        ("/m/b", (3, 4)),
        ("/m/base", (1, 2)),
    ]
    exported = yaml.safe_load(recipe.to_mergekit_yaml())
    assert exported["merge_method"] == "passthrough" and len(exported["slices"]) == 4


def test_empty_and_overlong_paths() -> None:
    space = _space(max_layers=3)
    genome = {space.include_gene(t): 0.1 for t in range(24)}
    genome[space.include_gene(5)] = 0.3
    assert space.path(genome) == [(1, 1, 1.0)]  # nothing included: the largest gene
    for t, v in ((0, 0.6), (3, 0.9), (9, 0.8), (20, 0.7)):
        genome[space.include_gene(t)] = v
    assert [(k, layer) for k, layer, _ in space.path(genome)] == [(0, 3), (2, 1), (2, 0)]  # top 3, in order


def test_seeds_are_each_source_alone() -> None:
    space = _space(scale=True)
    (uniform,) = space.seed_genomes(["uniform"])
    assert space.path(uniform) == [(0, layer, 1.0) for layer in range(4)]
    experts = space.seed_genomes(["experts"])
    assert [space.path(g)[0][0] for g in experts] == [1, 2]
    recipe = space.to_recipe(experts[0])
    # one model's whole stack: mergekit's single full-range slice, read as that model alone
    assert [m.model for m in recipe.models] == ["/m/a"] and recipe.num_layers == 4
    scaled = dict(experts[0], **{space.scale_gene(5): 0.5})  # slot 5: layer 1 of the first expert
    slices = space.to_recipe(scaled).slices
    assert [s.sources[0].layer_range for s in slices] == [(0, 1), (1, 2), (2, 4)]
    assert "scale" in slices[1].sources[0].parameters


def test_live_model_follows_candidate_depth(micro_zoo: Zoo, tmp_path: Path) -> None:
    """A deeper candidate loaded into the live model generates what the same model loaded from disk does,
    and a candidate of the original depth afterwards generates what the original did."""
    with ModelDir(micro_zoo.base) as md:
        layers = md.num_layers
    recipe = MergeRecipe.model_validate(
        {
            "merge_method": "passthrough",
            "slices": [
                {"sources": [{"model": micro_zoo.base, "layer_range": [0, layers]}]},
                {"sources": [{"model": micro_zoo.experts["arith"], "layer_range": [1, layers]}]},
            ],
        }
    )
    merger = InMemoryMerger(micro_zoo.base, list(micro_zoo.experts.values()))
    prompts = [
        task.prompt(ex.question, load_fewshot(task, micro_zoo.root))
        for task in micro_zoo.tasks
        for ex in load_split(task, "dev", micro_zoo.root)[:3]
    ]
    live = HFBackend.from_pretrained(micro_zoo.base, batch_size=4)
    original = live.generate(prompts, max_new_tokens=8, stop=[])
    base_state = live.state_dict()
    live.load_state_dict(merger.merge(recipe))
    assert live.model.config.num_hidden_layers == 2 * layers - 1
    deep = live.generate(prompts, max_new_tokens=8, stop=[])
    on_disk = HFBackend.from_pretrained(merge_streaming(recipe, tmp_path / "deep"), batch_size=4)
    assert deep == on_disk.generate(prompts, max_new_tokens=8, stop=[])
    assert deep != original
    live.load_state_dict(base_state)
    assert live.generate(prompts, max_new_tokens=8, stop=[]) == original
    with pytest.raises(EvaluationError):
        live.load_state_dict({k: v for k, v in base_state.items() if ".layers.0." not in k})


def test_layer_path_sweep_end_to_end(home: Zoo, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    runs = tmp_path / "runs"
    cfg = tmp_path / "sweep.yaml"
    sweep = {
        "study_name": "path",
        "zoo": "micro",
        "runs_dir": str(runs),
        "n_trials": 6,
        "sampler": {"name": "cmaes", "seed": 3},
        "search_space": {"layer_path": {"repeats": 2, "scale": True}},
    }
    cfg.write_text(yaml.safe_dump(sweep))
    assert run_cli(["search", cfg]) == 0
    out = capsys.readouterr().out
    assert "verdict on test (" in out
    results = json.loads((runs / "path" / "results.json").read_text())
    assert results["verdict_line"]
    # resume: more trials on the same study
    sweep["n_trials"] = 9
    cfg.write_text(yaml.safe_dump(sweep))
    assert run_cli(["search", cfg]) == 0
    study_db = runs / "path" / "study.db"
    import optuna

    study = optuna.load_study(study_name="path", storage=f"sqlite:///{study_db}")
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(complete) == 9
    depths = {len(MergeRecipe.model_validate(t.user_attrs["recipe"]).slices) for t in complete}
    assert len(depths) > 1  # the search tried paths of several shapes
    assert (runs / "path" / "heatmap.png").stat().st_size > 0  # the best path, drawn
    exported = yaml.safe_load((runs / "path" / "best_recipe.yaml").read_text())
    assert exported["merge_method"] == "passthrough"
    best = MergeRecipe.model_validate(exported)
    layers = len(best.slices and [1 for s in best.slices for _ in range(s.length)]) or best.num_layers
    config = json.loads((runs / "path" / "best_model" / "config.json").read_text())
    assert config["num_hidden_layers"] == layers


@pytest.fixture(scope="module")
def micro_evaluator(zoo_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> object:
    """One evaluator (live model and merger) for the micro zoo, shared by the sampler tests."""
    from evomerge.optimizer import LocalEvaluator, SweepConfig, resolve_sweep

    runs = tmp_path_factory.mktemp("ev")
    sweep = resolve_sweep(SweepConfig(study_name="ev", runs_dir=str(runs), zoo="micro"), zoo_cache=zoo_cache)
    return LocalEvaluator(sweep)


@pytest.mark.parametrize("sampler", ["tpe", "random", "nsga2", "nevergrad", "cmaes"])
def test_every_sampler_searches_layer_paths(
    sampler: str, zoo_cache: Path, tmp_path: Path, micro_evaluator: object
) -> None:
    """The layer-path genes are plain floats in [0, 1]: every sampler proposes them."""
    from optuna.trial import TrialState

    from evomerge.optimizer import SamplerConfig, SweepConfig, resolve_sweep, run_search
    from evomerge.search_spaces import SearchSpaceConfig

    cfg = SweepConfig(
        study_name=f"path-{sampler}",
        runs_dir=str(tmp_path),
        zoo="micro",
        search_space=SearchSpaceConfig(layer_path=LayerPathConfig(repeats=1)),
        sampler=SamplerConfig(name=sampler, seed=2, n_startup_trials=2 if sampler == "tpe" else None),
        n_trials=5,
        seed_recipes=("uniform",),
    )
    study = run_search(resolve_sweep(cfg, zoo_cache=zoo_cache), micro_evaluator)  # type: ignore[arg-type]
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    assert len(complete) == 5
    proposed = [t for t in complete if "fixed_params" not in t.system_attrs]  # not the seed
    assert proposed and all(
        set(t.params) == {f"path.s{i}.on" for i in range(len(t.params))} for t in proposed
    )


@pytest.mark.parametrize(
    ("extra", "fragment"),
    [
        ({"backend": {"kind": "vllm"}}, "layer_path"),
        ({"polish": {"starts": ["uniform"]}}, "polish"),
        ({"seed_genomes": [{"weight": 0.5}]}, "seed_genomes"),
    ],
)
def test_sweep_refuses_what_a_layer_path_cannot_do(extra: dict[str, object], fragment: str) -> None:
    from evomerge.config_util import validate_model
    from evomerge.errors import ConfigError
    from evomerge.optimizer import SweepConfig

    data = {"study_name": "p", "zoo": "micro", "search_space": {"layer_path": {}}, **extra}
    with pytest.raises(ConfigError) as exc:
        validate_model(SweepConfig, data, where="sweep.yaml")
    assert fragment in str(exc.value) and "\n" not in str(exc.value)
