"""Tests of evomerge.search_spaces: gene layout per granularity, genome -> recipe, bounds, distributions."""

from __future__ import annotations

import math
import random
from typing import Any

import optuna
import pytest
import torch
from optuna.distributions import FloatDistribution
from pydantic import ValidationError

from evomerge.config_util import validate_model
from evomerge.errors import ConfigError, UserError
from evomerge.merging import MergeRecipe, resolve_params
from evomerge.search_spaces import ParamRange, SearchSpace, SearchSpaceConfig, expert_aliases

BASE = "/models/base"
EXPERTS = ["/models/arith", "/models/code", "/models/logic"]
ALIASES = ["arith", "code", "logic"]
TIES_PARAMS = (
    ParamRange(name="weight", low=0.0, high=1.5),
    ParamRange(name="density", low=0.1, high=1.0),
)


def space(num_layers: int = 5, **cfg: Any) -> SearchSpace:
    cfg.setdefault("params", TIES_PARAMS)
    return SearchSpace(SearchSpaceConfig(**cfg), BASE, EXPERTS, num_layers)


def layer_tensors(layer: int) -> dict[str, str]:
    """Llama tensor names of one decoder layer, keyed by the part a split search space gives them."""
    p = f"model.layers.{layer}"
    return {
        "attn": f"{p}.self_attn.q_proj.weight",
        "attn_o": f"{p}.self_attn.o_proj.weight",
        "mlp": f"{p}.mlp.down_proj.weight",
        "mlp_up": f"{p}.mlp.up_proj.weight",
        "norm": f"{p}.input_layernorm.weight",
        "post_norm": f"{p}.post_attention_layernorm.weight",
    }


def distinct_genome(sp: SearchSpace, seed: int = 0) -> dict[str, float]:
    """Every gene a different value inside its bounds (4 decimals, so recipe rounding is exact)."""
    rng = random.Random(seed)
    out: dict[str, float] = {}
    for name, dist in sp.distributions().items():
        assert isinstance(dist, FloatDistribution)
        value = round(rng.uniform(dist.low, dist.high), 4)
        while value in out.values():
            value = round(rng.uniform(dist.low, dist.high), 4)
        out[name] = value
    return out


def group_of(granularity: str, group_size: int, layer: int) -> int:
    return {"global": 0, "layer_group": layer // group_size, "layer": layer}[granularity]


def per_model(recipe: MergeRecipe, tensor: str, num_layers: int) -> list[dict[str, float]]:
    return resolve_params(recipe, tensor, num_layers)[0]


# ------------------------------------------------------------------------------------ gene layout
@pytest.mark.parametrize(
    ("granularity", "group_size", "num_layers", "groups"),
    [
        ("global", 2, 5, 1),
        ("layer_group", 2, 5, 3),
        ("layer_group", 2, 4, 2),
        ("layer_group", 3, 5, 2),
        ("layer_group", 8, 5, 1),
        ("layer", 2, 5, 5),
        ("layer", 2, 1, 1),
    ],
)
@pytest.mark.parametrize("split", [False, True])
def test_gene_counts_and_names(
    granularity: str, group_size: int, num_layers: int, groups: int, split: bool
) -> None:
    sp = space(num_layers, granularity=granularity, group_size=group_size, split_attn_mlp=split)
    parts = ["attn", "mlp"] if split else [""]
    expected = {
        f"{alias}.{param}{'.' + part if part else ''}.g{g}"
        for alias in ALIASES
        for param in ("weight", "density")
        for part in parts
        for g in range(groups)
    }
    assert sp.num_groups == groups
    assert sp.dimension == 2 * len(EXPERTS) * len(parts) * groups
    assert set(sp.distributions()) == expected
    assert len(sp.distributions()) == sp.dimension
    assert list(sp.distributions()) == list(sp.distributions())  # stable order


def test_gene_counts_for_a_one_parameter_method() -> None:
    sp = SearchSpace(
        SearchSpaceConfig(method="task_arithmetic", params=(ParamRange(name="weight", low=0, high=1),)),
        BASE,
        EXPERTS[:2],
        4,
    )
    assert set(sp.distributions()) == {f"{a}.weight.g{g}" for a in ("arith", "code") for g in (0, 1)}


def test_distributions_match_bounds() -> None:
    params = (
        ParamRange(name="weight", low=0.01, high=2.0, log=True),
        ParamRange(name="density", low=0.2, high=0.9),
    )
    sp = space(4, params=params, granularity="layer", split_attn_mlp=True)
    for name, dist in sp.distributions().items():
        assert isinstance(dist, FloatDistribution)
        bounds = params[0] if ".weight." in name else params[1]
        assert (dist.low, dist.high, dist.log) == (bounds.low, bounds.high, bounds.log), name
        assert dist.step is None


# ------------------------------------------------------------------------------------ genome -> recipe
@pytest.mark.parametrize(
    ("granularity", "group_size", "num_layers"),
    [("global", 2, 5), ("layer_group", 2, 5), ("layer_group", 3, 7), ("layer", 2, 5), ("layer", 2, 2)],
)
def test_to_recipe_puts_each_group_value_on_its_layers(
    granularity: str, group_size: int, num_layers: int
) -> None:
    sp = space(num_layers, granularity=granularity, group_size=group_size)
    genome = distinct_genome(sp)
    recipe = sp.to_recipe(genome)
    assert recipe.merge_method == "ties"
    assert recipe.base_model == BASE
    assert [m.model for m in recipe.models] == EXPERTS

    def gene(i: int, param: str, layer: int) -> float:
        return genome[f"{ALIASES[i]}.{param}.g{group_of(granularity, group_size, layer)}"]

    for layer in range(num_layers):
        for tensor in layer_tensors(layer).values():
            resolved = per_model(recipe, tensor, num_layers)
            for i in range(len(EXPERTS)):
                for param in ("weight", "density"):
                    assert resolved[i][param] == pytest.approx(gene(i, param, layer), abs=1e-9), (tensor, i)
    # outside the layer stack (embeddings, final norm, lm_head): the first layer's value, as in mergekit
    for tensor in ("model.embed_tokens.weight", "model.norm.weight"):
        resolved = per_model(recipe, tensor, num_layers)
        for i in range(len(EXPERTS)):
            assert resolved[i]["weight"] == pytest.approx(gene(i, "weight", 0), abs=1e-9)
    resolved = per_model(recipe, "lm_head.weight", num_layers)
    assert resolved[2]["density"] == pytest.approx(gene(2, "density", 0), abs=1e-9)


@pytest.mark.parametrize("granularity", ["global", "layer_group", "layer"])
def test_split_attn_mlp_gives_attention_and_mlp_their_own_values(granularity: str) -> None:
    n, gs = 5, 2
    sp = space(n, granularity=granularity, group_size=gs, split_attn_mlp=True)
    genome = distinct_genome(sp, seed=1)
    recipe = sp.to_recipe(genome)

    def gene(i: int, param: str, part: str, layer: int) -> float:
        return genome[f"{ALIASES[i]}.{param}.{part}.g{group_of(granularity, gs, layer)}"]

    for layer in range(n):
        names = layer_tensors(layer)
        for key, tensor in names.items():
            resolved = per_model(recipe, tensor, n)
            for i in range(len(EXPERTS)):
                for param in ("weight", "density"):
                    attn, mlp = gene(i, param, "attn", layer), gene(i, param, "mlp", layer)
                    want = (
                        attn if key.startswith("attn") else mlp if key.startswith("mlp") else (attn + mlp) / 2
                    )
                    assert resolved[i][param] == pytest.approx(want, abs=1e-6), (tensor, i, param)
    embed = per_model(recipe, "model.embed_tokens.weight", n)
    head = per_model(recipe, "lm_head.weight", n)
    for i in range(len(EXPERTS)):
        first = (gene(i, "weight", "attn", 0) + gene(i, "weight", "mlp", 0)) / 2
        assert embed[i]["weight"] == pytest.approx(first, abs=1e-6)
        assert head[i]["weight"] == pytest.approx(first, abs=1e-6)  # outside the layers: t = 0 (mergekit)


def test_global_granularity_writes_readable_scalars() -> None:
    sp = space(4, granularity="global")
    recipe = sp.to_recipe(distinct_genome(sp))
    for entry in recipe.models:
        assert isinstance(entry.parameters["weight"], float)
        assert isinstance(entry.parameters["density"], float)
    layered = space(4, granularity="layer")
    recipe = layered.to_recipe(distinct_genome(layered))
    assert all(len(e.parameters["weight"]) == 4 for e in recipe.models)  # type: ignore[arg-type]


def test_to_recipe_carries_global_parameters_dtype_and_seed() -> None:
    sp = space(3, global_parameters={"lambda": 0.7}, dtype="bfloat16", seed=9)
    recipe = sp.to_recipe(sp.uniform_genome({"weight": 1.0, "density": 0.5}))
    assert recipe.out_dtype == "bfloat16" and recipe.dtype is None  # computed in float32, written in bf16
    assert recipe.compute_torch_dtype() == torch.float32
    assert recipe.seed == 9
    params, global_params = resolve_params(recipe, "model.layers.1.mlp.up_proj.weight", 3)
    assert global_params["lambda"] == pytest.approx(0.7)
    assert global_params["normalize"] == 1.0  # ties' default
    assert params == [{"weight": 1.0, "density": 0.5}] * 3


def test_boolean_global_parameter_reaches_the_recipe() -> None:
    # `normalize` is a documented global parameter of ties; a sweep YAML says `normalize: false`.
    cfg = validate_model(
        SearchSpaceConfig,
        {"method": "ties", "global_parameters": {"normalize": False, "lambda": 1.0}},
        where="search_space",
    )
    sp = SearchSpace(cfg, BASE, EXPERTS, 2)
    recipe = sp.to_recipe(sp.uniform_genome({"weight": 1.0, "density": 0.5}))
    _, global_params = resolve_params(recipe, "model.layers.0.mlp.up_proj.weight", 2)
    assert global_params["normalize"] == 0.0


def test_recipe_yaml_round_trip() -> None:
    sp = space(5, granularity="layer_group", split_attn_mlp=True, global_parameters={"lambda": 1.2})
    recipe = sp.to_recipe(distinct_genome(sp, seed=3))
    assert MergeRecipe.from_yaml(recipe.to_yaml()) == recipe


def test_optuna_samples_map_to_valid_recipes() -> None:
    sp = space(4, granularity="layer", split_attn_mlp=True)
    dists = sp.distributions()
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    for _ in range(5):
        trial = study.ask(dists)
        recipe = sp.to_recipe(trial.params)
        for layer in range(4):
            for tensor in layer_tensors(layer).values():
                for values in per_model(recipe, tensor, 4):
                    assert 0.0 <= values["weight"] <= 1.5
                    assert 0.1 <= values["density"] <= 1.0
        study.tell(trial, 0.0)


def test_to_recipe_names_a_missing_gene() -> None:
    sp = space(4)
    genome = sp.uniform_genome({"weight": 1.0, "density": 0.5})
    del genome["code.density.g1"]
    with pytest.raises(ConfigError, match=r"code\.density\.g1"):
        sp.to_recipe(genome)


# ------------------------------------------------------------------------------------ uniform genomes
def test_uniform_genome_scalar_and_per_expert_values() -> None:
    sp = space(5, granularity="layer", split_attn_mlp=True)
    genome = sp.uniform_genome({"weight": 0.8, "density": [0.3, 0.6, 0.9]})
    assert set(genome) == set(sp.distributions())
    for name, value in genome.items():
        alias, param = name.split(".")[:2]
        want = 0.8 if param == "weight" else {"arith": 0.3, "code": 0.6, "logic": 0.9}[alias]
        assert value == want, name
    recipe = sp.to_recipe(genome)
    for tensor in (*layer_tensors(0).values(), *layer_tensors(4).values(), "model.embed_tokens.weight"):
        resolved = per_model(recipe, tensor, 5)
        assert [r["density"] for r in resolved] == pytest.approx([0.3, 0.6, 0.9])
        assert [r["weight"] for r in resolved] == pytest.approx([0.8] * 3)


def test_uniform_genome_clips_into_bounds() -> None:
    sp = space(2, granularity="global")
    genome = sp.uniform_genome({"weight": [5.0, -1.0, 1.0], "density": 0.0})
    assert genome["arith.weight.g0"] == 1.5
    assert genome["code.weight.g0"] == 0.0
    assert genome["logic.weight.g0"] == 1.0
    assert all(genome[f"{a}.density.g0"] == 0.1 for a in ALIASES)


def test_uniform_genome_needs_every_parameter() -> None:
    with pytest.raises(ConfigError, match="density"):
        space(2).uniform_genome({"weight": 1.0})


@pytest.mark.parametrize("weights", [[1.0, 0.5], [1.0, 0.5, 0.2, 0.1]])
def test_uniform_genome_rejects_a_per_expert_list_of_the_wrong_length(weights: list[float]) -> None:
    # "a sequence with one value per expert": 2 or 4 values for 3 experts is a user error
    # (a seed_genomes typo), not an IndexError or a silently ignored value.
    with pytest.raises(ConfigError, match="weight"):
        space(2).uniform_genome({"weight": weights, "density": 0.5})


# ------------------------------------------------------------------------------------ validation
@pytest.mark.parametrize(
    ("bounds", "message"),
    [
        ({"name": "density", "low": 0.0, "high": 1.0}, r"\(0, 1\]"),
        ({"name": "density", "low": -0.5, "high": 0.5}, r"\(0, 1\]"),
        ({"name": "density", "low": 0.5, "high": 1.2}, r"\(0, 1\]"),
        ({"name": "weight", "low": 1.0, "high": 1.0}, "must be below"),
        ({"name": "weight", "low": 2.0, "high": 1.0}, "must be below"),
        ({"name": "weight", "low": -math.inf, "high": 1.0}, "must be below"),
        ({"name": "weight", "low": 0.0, "high": 1.0, "log": True}, "log"),
    ],
)
def test_param_range_rejects_bad_bounds(bounds: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        ParamRange(**bounds)
    with pytest.raises(ConfigError, match=message):
        validate_model(SearchSpaceConfig, {"params": [bounds]}, where="search_space")


def test_param_range_accepts_edge_bounds() -> None:
    assert ParamRange(name="density", low=1e-6, high=1.0).high == 1.0
    assert ParamRange(name="weight", low=-1.0, high=0.0).low == -1.0


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"method": "task_arithmetic", "params": [{"name": "density", "low": 0.1, "high": 1}]}, "density"),
        ({"method": "ties", "params": [{"name": "lambda", "low": 0.1, "high": 1}]}, "lambda"),
        ({"method": "ties", "params": [{"name": "wieght", "low": 0.1, "high": 1}]}, "wieght"),
        (
            {
                "method": "ties",
                "params": [{"name": "weight", "low": 0, "high": 1}, {"name": "weight", "low": 0, "high": 2}],
            },
            "duplicate",
        ),
        ({"method": "ties", "global_parameters": {"density": 0.5}}, "density"),
        (
            {
                "method": "linear",
                "params": [{"name": "weight", "low": 0, "high": 1}],
                "global_parameters": {"lambda": 0.5},
            },
            "lambda",
        ),
        ({"method": "slerp"}, "slerp"),
        ({"method": "slerp", "params": []}, "nothing to search"),
        ({"method": "ties", "global_params": [{"name": "t", "low": 0, "high": 1}]}, "no parameter 't'"),
        ({"method": "ties", "global_params": [{"name": "normalize", "low": 0, "high": 1}]}, "true or false"),
        ({"method": "slerp", "params": [], "global_params": [{"name": "t", "low": 0.2, "high": 1.5}]}, "1.5"),
        (
            {"method": "sce", "params": [], "global_params": [{"name": "select_topk", "low": 0, "high": 1}]},
            "select_topk: bound 0",
        ),
        (
            {
                "method": "task_arithmetic",
                "params": [],
                "global_params": [{"name": "lambda", "low": 0.5, "high": 2}],
                "global_parameters": {"lambda": 1.0},
            },
            "both searched",
        ),
        (
            {
                "method": "task_arithmetic",
                "params": [],
                "global_params": [
                    {"name": "lambda", "low": 0, "high": 1},
                    {"name": "lambda", "low": 0, "high": 2},
                ],
            },
            "duplicate",
        ),
        ({"method": "ties", "group_size": 0}, "group_size"),
        ({"method": "ties", "granularity": "per_tensor"}, "granularity"),
        ({"method": "ties", "bogus": 1}, "bogus"),
    ],
)
def test_search_space_config_rejects_bad_input(data: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message) as info:
        validate_model(SearchSpaceConfig, data, where="search_space")
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("granularity", ["global", "layer_group", "layer", "control_points"])
def test_searched_global_parameter_reaches_every_layer_of_the_recipe(granularity: str) -> None:
    """``global_params``: one shared gene per layer group, written into the recipe's top-level parameters
    and resolved per layer like any per-layer list."""
    num_layers = 5
    sp = space(
        num_layers,
        method="task_arithmetic",
        params=(ParamRange(name="weight", low=0.0, high=1.5),),
        global_params=(ParamRange(name="lambda", low=0.5, high=2.0),),
        granularity=granularity,
        group_size=2,
        control_points=3,
    )
    dists = sp.distributions()
    lam = [k for k in dists if k.startswith("(global).")]
    assert lam == [f"(global).lambda.g{g}" for g in range(sp.num_groups)]
    assert all(dists[k] == FloatDistribution(0.5, 2.0) for k in lam)
    assert sp.dimension == len(dists) == (len(EXPERTS) + 1) * sp.num_groups
    genome = distinct_genome(sp, seed=3)
    recipe = sp.to_recipe(genome)
    points = [genome[k] for k in lam]
    for layer in range(num_layers):
        if granularity == "control_points":
            x = layer / (num_layers - 1) * (len(points) - 1)
            k = min(int(x), len(points) - 2)
            want = points[k] + (points[k + 1] - points[k]) * (x - k)
        else:
            want = points[group_of(granularity, 2, layer)]
        for tensor in layer_tensors(layer).values():
            _, glob = resolve_params(recipe, tensor, num_layers)
            assert glob["lambda"] == pytest.approx(want, abs=1e-6), (layer, tensor)
            assert glob["normalize"] == 0.0  # the fixed ones keep their defaults
    assert MergeRecipe.from_yaml(recipe.to_yaml()) == recipe


def test_slerp_is_searchable_through_its_t() -> None:
    one = SearchSpace(
        SearchSpaceConfig(
            method="slerp",
            params=(),
            global_params=(ParamRange(name="t", low=0.0, high=1.0),),
            granularity="layer",
        ),
        BASE,
        EXPERTS[:1],
        3,
    )
    assert list(one.distributions()) == ["(global).t.g0", "(global).t.g1", "(global).t.g2"]
    recipe = one.to_recipe({"(global).t.g0": 0.1, "(global).t.g1": 0.5, "(global).t.g2": 0.9})
    assert recipe.merge_method == "slerp" and recipe.models[0].parameters == {}
    assert [resolve_params(recipe, f"model.layers.{i}.mlp.up_proj.weight", 3)[1]["t"] for i in range(3)] == [
        pytest.approx(0.1),
        pytest.approx(0.5),
        pytest.approx(0.9),
    ]
    # seeds: the method's default t (0.5); "experts" is the same genome, so it is not repeated
    assert one.seed_genomes(["uniform"]) == [{f"(global).t.g{g}": 0.5 for g in range(3)}]
    with pytest.raises(ConfigError, match="slerp merges at least 1, at most 1 model"):
        SearchSpace(one.config, BASE, EXPERTS, 3)


def test_seed_genomes_give_searched_globals_their_default_clipped_or_the_seed_value() -> None:
    sp = space(
        4,
        method="ties",
        global_params=(ParamRange(name="lambda", low=1.2, high=2.0),),
        granularity="global",
    )
    uniform = sp.seed_genomes(["uniform"])[0]
    assert uniform["(global).lambda.g0"] == 1.2  # ties' default 1.0, clipped into [1.2, 2]
    assert sp.uniform_genome({"weight": 0.5, "density": 1.0, "lambda": 1.7})["(global).lambda.g0"] == 1.7
    with pytest.raises(ConfigError, match="method-wide"):
        sp.uniform_genome({"weight": 0.5, "density": 1.0, "lambda": [1.3, 1.4, 1.5]})


def test_search_space_config_rejects_non_finite_global_parameters() -> None:
    # Caught when the sweep is read, not as a failure of every single trial.
    with pytest.raises(ConfigError, match="lambda"):
        validate_model(
            SearchSpaceConfig,
            {"method": "ties", "global_parameters": {"lambda": math.nan}},
            where="search_space",
        )


def test_search_space_needs_experts_and_layers() -> None:
    cfg = SearchSpaceConfig()
    with pytest.raises(UserError, match="expert"):
        SearchSpace(cfg, BASE, [], 4)
    with pytest.raises(UserError, match="num_layers"):
        SearchSpace(cfg, BASE, EXPERTS, 0)


def test_expert_aliases_are_unique_and_gene_safe() -> None:
    paths = ["/z/arith", "/y/arith/", "/x/my.model v2", "/w/arith", "/v/arith_2"]
    aliases = expert_aliases(paths)
    assert aliases[:3] == ["arith", "arith_2", "my_model_v2"]
    assert len(set(aliases)) == len(aliases)
    assert all("." not in a for a in aliases)
    sp = SearchSpace(SearchSpaceConfig(granularity="global"), BASE, paths, 2)
    assert sp.dimension == 2 * len(paths)
    recipe = sp.to_recipe(sp.uniform_genome({"weight": list(range(5)), "density": 1.0}))
    assert [float(e.parameters["weight"]) for e in recipe.models] == [0.0, 1.0, 1.5, 1.5, 1.5]  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------ issue 6 additions
@pytest.mark.parametrize("num_layers", [1, 2, 5, 9])
def test_control_points_interpolate_linearly_over_the_layers(num_layers: int) -> None:
    sp = space(num_layers, granularity="control_points", control_points=3)
    assert sp.dimension == 2 * 3 * 3  # (weight, density) x experts x points
    genome = distinct_genome(sp, seed=num_layers)
    recipe = sp.to_recipe(genome)
    for i, alias in enumerate(ALIASES):
        p0, p1, p2 = (genome[f"{alias}.weight.g{k}"] for k in range(3))
        for layer in range(num_layers):
            x = 0.0 if num_layers == 1 else layer / (num_layers - 1)  # the layer's place in the stack
            expected = p0 + (p1 - p0) * (x / 0.5) if x <= 0.5 else p1 + (p2 - p1) * ((x - 0.5) / 0.5)
            if num_layers == 1:
                expected = p0
            params, _ = resolve_params(recipe, layer_tensors(layer)["attn"], num_layers)
            assert params[i]["weight"] == pytest.approx(expected, abs=1e-6)
    with pytest.raises(ValidationError, match="control_points"):
        SearchSpaceConfig(params=TIES_PARAMS, granularity="control_points", control_points=1)


def test_method_choice_is_a_categorical_gene() -> None:
    params = TIES_PARAMS
    sp = space(4, params=params, granularity="global", methods=("ties", "task_arithmetic", "dare_ties"))
    dists = sp.distributions()
    assert next(iter(dists)) == "method"
    assert dists["method"] == optuna.distributions.CategoricalDistribution(
        ("ties", "task_arithmetic", "dare_ties")
    )
    assert sp.dimension == 1 + 2 * 3
    genome: dict[str, Any] = distinct_genome_floats(sp)
    for method in ("ties", "task_arithmetic", "dare_ties"):
        recipe = sp.to_recipe({**genome, "method": method})
        assert recipe.merge_method == method
        for m in recipe.models:
            # task arithmetic has no density: only the parameters each method knows are passed
            assert ("density" in m.parameters) == (method != "task_arithmetic")
    with pytest.raises(ValidationError, match="two or more"):
        SearchSpaceConfig(params=params, methods=("ties",))
    with pytest.raises(ValidationError, match="no per-model parameter 'epsilon'"):
        SearchSpaceConfig(params=(ParamRange(name="epsilon", low=0.0, high=0.1),), methods=("ties", "linear"))
    # a study samples the categorical and the floats together
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    seen = {sp.to_recipe(study.ask(dists).params).merge_method for _ in range(30)}
    assert seen == {"ties", "task_arithmetic", "dare_ties"}


def distinct_genome_floats(sp: SearchSpace) -> dict[str, float]:
    rng = random.Random(1)
    return {
        name: round(rng.uniform(d.low, d.high), 4)
        for name, d in sp.distributions().items()
        if isinstance(d, FloatDistribution)
    }


def test_seed_recipes_uniform_and_each_expert() -> None:
    sp = space(4, granularity="layer")
    uniform, *experts = sp.seed_genomes(["uniform", "experts"])
    assert len(experts) == 3
    for name, value in uniform.items():
        assert value == pytest.approx(1 / 3 if ".weight." in name else 1.0)
    for i, genome in enumerate(experts):
        recipe = sp.to_recipe(genome)
        for j, m in enumerate(recipe.models):
            assert m.parameters["weight"] == (1.0 if i == j else 0.0)
            assert m.parameters["density"] == 1.0
    clipped = space(2, params=(ParamRange(name="weight", low=0.2, high=0.8),), method="task_arithmetic")
    assert set(clipped.seed_genomes(["experts"])[0].values()) == {0.8, 0.2}  # clipped into the bounds
    with pytest.raises(ConfigError, match="unknown kind 'best'"):
        sp.seed_genomes(["best"])


def test_every_experiment_config_loads() -> None:
    from pathlib import Path

    from evomerge.optimizer import load_sweep_config

    root = Path(__file__).resolve().parents[1] / "experiments"
    configs = sorted(root.glob("*.yaml"))
    assert configs
    for path in configs:
        if "fusion" in path.read_text().split("\n", 1)[0]:
            continue
        cfg = load_sweep_config(path)
        assert cfg.study_name
