"""Tests for evomerge.merging: recipes, parameter resolution, kernels, registry and both executors."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest_merging_helpers import TOKENIZER_STUBS, entries, save_llama_family, write_model

from evomerge.checkpoints import ModelDir
from evomerge.errors import CheckpointError, OutputExistsError, RecipeError, UserError
from evomerge.merging import (
    METHODS,
    PARAM_DOMAINS,
    FilterRule,
    InMemoryMerger,
    MergeInputs,
    MergeRecipe,
    check_layer_lists,
    get_method,
    merge_streaming,
    resolve,
    resolve_params,
    tensor_seed,
)
from evomerge.merging.methods.common import keep_count, trim_to_density

ALL_METHODS = sorted(METHODS)


# ============================================================================ helpers
def _count(method: str, wanted: int = 2) -> int:
    """How many experts to give ``method`` in generic tests (slerp takes exactly one)."""
    spec = METHODS[method]
    top = wanted if spec.max_models is None else min(wanted, spec.max_models)
    return max(top, spec.min_models)


def _defaults(method: str, n: int, **overrides: float) -> tuple[list[dict[str, float]], dict[str, float]]:
    spec = METHODS[method]
    per_model = [{**spec.model_params, **overrides} for _ in range(n)]
    return per_model, dict(spec.global_params)


def _run(method: str, inputs: MergeInputs, params: Any, global_params: Any, seed: int = 0) -> torch.Tensor:
    return METHODS[method].kernel(inputs, params, global_params, seed)


def _recipe(method: str, base: Path | None, experts: list[Path], **extra: Any) -> MergeRecipe:
    """A valid recipe for any registered method: weights 0.7/0.3, density 0.5 where the method has them."""
    spec = METHODS[method]
    models = []
    if spec.max_models is not None:
        experts = experts[: spec.max_models]
    for i, expert in enumerate(experts):
        params: dict[str, Any] = {}
        if "weight" in spec.model_params:
            params["weight"] = [0.7, 0.3, 0.5][i]
        if "density" in spec.model_params:
            params["density"] = 0.5
        models.append({"model": str(expert), "parameters": params})
    data: dict[str, Any] = {"merge_method": method, "models": models, "dtype": "float32", **extra}
    if base is not None:
        data["base_model"] = str(base)
    return MergeRecipe.model_validate(data)


def _one_line(exc: pytest.ExceptionInfo[BaseException]) -> str:
    text = str(exc.value)
    assert "\n" not in text
    assert isinstance(exc.value, UserError)
    return text


# ============================================================================ registry
def test_registry_contents() -> None:
    assert {"linear", "task_arithmetic", "ties"} <= set(METHODS)
    for name, method in METHODS.items():
        assert method.name == name
        assert get_method(name) is method
        assert method.doc
        for param in (*method.model_params, *method.global_params):
            assert param in PARAM_DOMAINS, f"{name}.{param} has no domain"
    assert not METHODS["linear"].needs_base
    assert METHODS["ties"].needs_base and METHODS["task_arithmetic"].needs_base
    assert METHODS["linear"].global_params["normalize"] == 1.0
    assert METHODS["task_arithmetic"].global_params["normalize"] == 0.0
    assert METHODS["ties"].global_params == {
        "lambda": 1.0,
        "normalize": 1.0,
        "rescale": 0.0,
        "int8_mask": 0.0,
    }
    assert METHODS["ties"].model_params == {"weight": 1.0, "density": 1.0}
    expected = {
        "linear", "task_arithmetic", "ties", "dare_linear", "dare_ties", "breadcrumbs", "breadcrumbs_ties",
        "della", "della_linear", "slerp", "sce", "model_stock", "rsaf", "nearswap", "multislerp",
        "nuslerp", "karcher", "arcee_fusion", "passthrough", "ram", "ramplus_tl",
    }  # fmt: skip
    assert set(METHODS) == expected
    # mergekit's defaults for the flags users rely on
    assert METHODS["dare_ties"].global_params["normalize"] == 0.0
    assert METHODS["dare_ties"].global_params["rescale"] == 1.0
    assert METHODS["della"].global_params["normalize"] == 1.0
    assert METHODS["breadcrumbs"].model_params["gamma"] == 0.01
    assert METHODS["della"].model_params["epsilon"] == 0.15
    assert (METHODS["slerp"].min_models, METHODS["slerp"].max_models) == (1, 1)
    assert METHODS["model_stock"].min_models == 2
    assert (METHODS["nearswap"].min_models, METHODS["nearswap"].max_models) == (1, 1)
    assert METHODS["multislerp"].global_params == {"normalize_weights": 1.0, "eps": 1e-8}
    assert not METHODS["multislerp"].needs_base


def test_get_method_unknown() -> None:
    with pytest.raises(RecipeError) as exc:
        get_method("foo")
    assert _one_line(exc) == "unknown merge method 'foo'; known: " + ", ".join(sorted(METHODS))


# ============================================================================ kernels: generic
@pytest.fixture
def random_inputs() -> tuple[torch.Tensor, list[torch.Tensor]]:
    gen = torch.Generator().manual_seed(0)
    base = torch.randn(6, 5, generator=gen)
    experts = [base + 0.1 * torch.randn(6, 5, generator=gen) for _ in range(3)]
    return base, experts


@pytest.mark.parametrize("method", ALL_METHODS)
def test_kernel_shape_dtype_determinism_purity(
    method: str, random_inputs: tuple[torch.Tensor, list[torch.Tensor]]
) -> None:
    base, experts = random_inputs
    n = _count(method)
    inputs = MergeInputs.from_tensors(base, experts[:n])
    snapshot = [t.clone() for t in (inputs.require_base(), *(inputs.delta(i) for i in range(n)))]
    params, global_params = _defaults(method, n)
    if "density" in params[0]:
        for p in params:
            p["density"] = 0.5
    first = _run(method, inputs, params, global_params, seed=7)
    second = _run(method, inputs, params, global_params, seed=7)
    assert first.shape == base.shape
    assert first.dtype == torch.float32
    assert torch.equal(first, second)
    assert torch.isfinite(first).all()
    assert not torch.equal(first, base), "the merge did nothing"
    after = [inputs.require_base(), *(inputs.delta(i) for i in range(n))]
    assert all(torch.equal(a, b) for a, b in zip(snapshot, after, strict=True)), "kernel modified its inputs"


@pytest.mark.parametrize("method", ALL_METHODS)
def test_kernel_experts_equal_to_base_give_base(method: str) -> None:
    base = torch.tensor([[1.5, -2.0, 0.25], [3.0, 0.0, -1.0]])
    n = _count(method)
    inputs = MergeInputs.from_tensors(base, [base.clone() for _ in range(n)])
    params, global_params = _defaults(method, n)
    torch.testing.assert_close(_run(method, inputs, params, global_params), base)


@pytest.mark.parametrize("method", ALL_METHODS)
def test_kernel_rejects_wrong_param_count(method: str) -> None:
    base = torch.zeros(3)
    n = _count(method)
    inputs = MergeInputs.from_tensors(base, [base + i + 1 for i in range(n)])
    params, global_params = _defaults(method, n + 1)
    with pytest.raises(ValueError, match="parameter sets"):
        _run(method, inputs, params, global_params)


def test_merge_inputs_forms() -> None:
    b = torch.tensor([1.0, 2.0])
    x = torch.tensor([1.5, 1.0])
    with_base = MergeInputs.from_tensors(b, [x])
    assert with_base.experts is None and with_base.deltas is not None
    assert torch.equal(with_base.delta(0), torch.tensor([0.5, -1.0]))
    assert torch.equal(with_base.expert(0), x)
    no_base = MergeInputs.from_tensors(None, [x.to(torch.bfloat16)])
    assert no_base.experts is not None and no_base.experts[0].dtype == torch.float32
    with pytest.raises(ValueError, match="base"):
        no_base.delta(0)
    with pytest.raises(ValueError, match="exactly one"):
        MergeInputs(base=b)
    with pytest.raises(ValueError, match="needs a base"):
        MergeInputs(base=None, deltas=(x,))


# ============================================================================ kernels: formulas
def test_linear_formula() -> None:
    x1 = torch.tensor([1.0, 2.0, 3.0])
    x2 = torch.tensor([3.0, 6.0, 9.0])
    inputs = MergeInputs(base=None, experts=(x1, x2))
    params = [{"weight": 1.0}, {"weight": 3.0}]
    out = _run("linear", inputs, params, {"normalize": 1.0})
    assert torch.equal(out, torch.tensor([2.5, 5.0, 7.5]))  # (1*x1 + 3*x2) / 4
    out = _run("linear", inputs, params, {"normalize": 0.0})
    assert torch.equal(out, torch.tensor([10.0, 20.0, 30.0]))  # 1*x1 + 3*x2
    zero = _run("linear", inputs, [{"weight": 0.0}, {"weight": 0.0}], {"normalize": 1.0})
    assert torch.equal(zero, torch.zeros(3))  # zero weight sum divides by 1


def test_linear_all_weight_on_one_expert_is_that_expert() -> None:
    gen = torch.Generator().manual_seed(3)
    xs = tuple(torch.randn(4, 4, generator=gen) for _ in range(3))
    params = [{"weight": 0.0}, {"weight": 2.5}, {"weight": 0.0}]
    out = _run("linear", MergeInputs(base=None, experts=xs), params, {"normalize": 1.0})
    assert torch.equal(out, xs[1])


def test_task_arithmetic_formula() -> None:
    b = torch.tensor([1.0, 1.0, 1.0, 1.0])
    x1 = torch.tensor([2.0, 0.0, 1.0, 3.0])  # d1 = [1, -1, 0, 2]
    x2 = torch.tensor([1.0, 3.0, 1.0, 0.0])  # d2 = [0, 2, 0, -1]
    inputs = MergeInputs.from_tensors(b, [x1, x2])
    params = [{"weight": 0.5}, {"weight": 2.0}]
    # sum w d = [0.5, 3.5, 0, -1]
    out = _run("task_arithmetic", inputs, params, {"lambda": 0.5, "normalize": 0.0})
    assert torch.equal(out, torch.tensor([1.25, 2.75, 1.0, 0.5]))
    out = _run("task_arithmetic", inputs, params, {"lambda": 0.5, "normalize": 1.0})  # / 2.5
    torch.testing.assert_close(out, torch.tensor([1.1, 1.7, 1.0, 0.8]))


def test_task_arithmetic_zero_weights_give_base() -> None:
    gen = torch.Generator().manual_seed(4)
    b = torch.randn(5, 3, generator=gen)
    inputs = MergeInputs.from_tensors(b, [torch.randn(5, 3, generator=gen) for _ in range(2)])
    out = _run(
        "task_arithmetic", inputs, [{"weight": 0.0}, {"weight": 0.0}], {"lambda": 3.0, "normalize": 0.0}
    )
    assert torch.equal(out, b)


def _ties_example() -> tuple[MergeInputs, list[dict[str, float]]]:
    b = torch.ones(6)
    d1 = torch.tensor([3.0, -2.0, 1.0, 0.5, -4.0, 0.0])
    d2 = torch.tensor([-1.0, -3.0, 2.0, -0.2, 1.0, 0.0])
    inputs = MergeInputs(base=b, deltas=(d1, d2))
    params = [{"weight": 1.0, "density": 0.5}, {"weight": 2.0, "density": 1.0}]
    return inputs, params


def test_ties_formula_normalized() -> None:
    inputs, params = _ties_example()
    # trim d1 to its top 3 magnitudes (4, 3, 2): d1' = [3, -2, 0, 0, -4, 0]; d2' = d2
    # weighted: [3, -2, 0, 0, -4, 0] and [-2, -6, 4, -0.4, 2, 0]; sum = [1, -8, 4, -0.4, -2, 0]
    # elected signs: + - + - - +(zero)
    # agreeing:  e0: 3 (w 1) | e1: -2, -6 (w 1+2) | e2: 4 (w 2) | e3: -0.4 (w 2) | e4: -4 (w 1) | e5: none
    expected = 1.0 + torch.tensor([3.0, -8.0 / 3.0, 2.0, -0.2, -4.0, 0.0])
    out = _run("ties", inputs, params, {"lambda": 1.0, "normalize": 1.0})
    torch.testing.assert_close(out, expected)


def test_ties_formula_unnormalized_with_lambda() -> None:
    inputs, params = _ties_example()
    expected = 1.0 + 0.5 * torch.tensor([3.0, -8.0, 4.0, -0.4, -4.0, 0.0])
    out = _run("ties", inputs, params, {"lambda": 0.5, "normalize": 0.0})
    torch.testing.assert_close(out, expected)


def test_ties_negative_weight_flips_contribution() -> None:
    b = torch.zeros(2)
    inputs = MergeInputs(base=b, deltas=(torch.tensor([1.0, -2.0]),))
    out = _run("ties", inputs, [{"weight": -1.0, "density": 1.0}], {"lambda": 1.0, "normalize": 0.0})
    assert torch.equal(out, torch.tensor([-1.0, 2.0]))


@pytest.mark.parametrize("normalize", [0.0, 1.0])
@pytest.mark.parametrize("weight", [1.0, 0.4])
def test_ties_density_one_single_expert_is_task_arithmetic(normalize: float, weight: float) -> None:
    gen = torch.Generator().manual_seed(5)
    b = torch.randn(7, 3, generator=gen)
    inputs = MergeInputs.from_tensors(b, [b + torch.randn(7, 3, generator=gen)])
    global_params = {"lambda": 0.8, "normalize": normalize}
    ties = _run("ties", inputs, [{"weight": weight, "density": 1.0}], global_params)
    ta = _run("task_arithmetic", inputs, [{"weight": weight}], global_params)
    torch.testing.assert_close(ties, ta)


def test_keep_count_and_trim() -> None:
    assert keep_count(10, 0.25) == 2  # floored, as mergekit does
    assert keep_count(10, 0.29) == 2
    assert keep_count(10, 0.01) == 1  # never zero
    assert keep_count(10, 1.0) == 10
    d = torch.tensor([[0.1, -5.0, 2.0], [-3.0, 0.0, 1.0]])
    assert trim_to_density(d, 1.0) is d
    assert torch.equal(trim_to_density(d, 0.5), torch.tensor([[0.0, -5.0, 2.0], [-3.0, 0.0, 0.0]]))
    assert torch.equal(trim_to_density(d, 0.1), torch.tensor([[0.0, -5.0, 0.0], [0.0, 0.0, 0.0]]))
    tied = torch.tensor([1.0, -1.0, 1.0, 0.5])
    # exactly k kept; among entries tied at the cut-off, the first in storage order (a stable sort's pick)
    assert torch.equal(trim_to_density(tied, 0.5), tied * torch.tensor([1.0, 1.0, 0.0, 0.0]))
    assert torch.equal(trim_to_density(tied, 0.75), tied * torch.tensor([1.0, 1.0, 1.0, 0.0]))


def test_tensor_seed_is_stable_and_per_tensor() -> None:
    assert tensor_seed(0, "a") == tensor_seed(0, "a")
    assert tensor_seed(0, "a") != tensor_seed(0, "b")
    assert tensor_seed(0, "a") != tensor_seed(1, "a")
    assert 0 <= tensor_seed(123, "model.layers.0.mlp.up_proj.weight") < 2**63


# ============================================================================ recipes
EXAMPLE = """\
merge_method: ties
base_model: /path/base
models:
  - model: /path/expert_a
    parameters: {weight: 0.7, density: [0.3, 0.5, 0.9]}
  - model: /path/expert_b
    parameters:
      weight: [{filter: self_attn, value: 0.2}, {filter: mlp, value: [0.1, 0.9]}, {value: 0.5}]
parameters: {lambda: 1.0, normalize: true}
dtype: float32
tokenizer_source: base
seed: 0
"""


def test_recipe_yaml_round_trip(tmp_path: Path) -> None:
    recipe = MergeRecipe.from_yaml(EXAMPLE)
    assert recipe.merge_method == "ties"
    assert recipe.models[0].parameters["density"] == (0.3, 0.5, 0.9)
    rules = recipe.models[1].parameters["weight"]
    assert rules == (
        FilterRule(filter="self_attn", value=0.2),
        FilterRule(filter="mlp", value=(0.1, 0.9)),
        FilterRule(filter=None, value=0.5),
    )
    assert recipe.parameters == {"lambda": 1.0, "normalize": True}
    text = recipe.to_yaml()
    again = MergeRecipe.from_yaml(text)
    assert again == recipe
    assert again.to_yaml() == text
    assert MergeRecipe.model_validate(recipe.to_dict()) == recipe
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    assert MergeRecipe.from_yaml(path) == recipe
    assert MergeRecipe.from_yaml(str(path)) == recipe


def test_recipe_defaults_and_ints() -> None:
    recipe = MergeRecipe.from_yaml(
        "merge_method: linear\nmodels: [{model: a, parameters: {weight: 2}}, {model: b}]"
    )
    assert recipe.base_model is None and recipe.dtype is None and recipe.seed == 0
    assert recipe.models[0].parameters["weight"] == 2.0
    assert isinstance(recipe.models[0].parameters["weight"], float)
    assert recipe.models[1].parameters == {}
    assert recipe.tokenizer_path() == "a"
    assert recipe.torch_dtype(torch.bfloat16) == torch.bfloat16
    assert recipe.torch_dtype(torch.int8) == torch.float32
    assert MergeRecipe.from_yaml(recipe.to_yaml()) == recipe


def test_recipe_skips_base_listed_among_models() -> None:
    recipe = MergeRecipe.from_yaml("merge_method: ties\nbase_model: b\nmodels: [{model: b}, {model: a}]")
    assert [m.model for m in recipe.expert_models()] == ["a"]
    linear = MergeRecipe.from_yaml("merge_method: linear\nbase_model: b\nmodels: [{model: b}, {model: a}]")
    assert [m.model for m in linear.expert_models()] == ["b", "a"]


_BASE = "merge_method: ties\nbase_model: b\n"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            "merge_method: foo\nmodels: [{model: a}]",
            "unknown merge method 'foo'; known: arcee_fusion, breadcrumbs, ",
        ),
        ("merge_method: ties\nmodels: [{model: a}]", "base_model: merge method 'ties' needs a base model"),
        (
            _BASE + "models: [{model: a}, {model: c, parameters: {density: 1.5}}]",
            "models[1].parameters.density: 1.5 is outside (0, 1]",
        ),
        (
            _BASE + "models: [{model: a, parameters: {density: 0}}]",
            "models[0].parameters.density: 0 is outside",
        ),
        (
            _BASE + "models: [{model: a, parameters: {weight: .nan}}]",
            "models[0].parameters.weight: nan is not finite",
        ),
        (
            _BASE + "models: [{model: a, parameters: {weight: .inf}}]",
            "models[0].parameters.weight: inf is not finite",
        ),
        (_BASE + "models: [{model: a, parameters: {weight: []}}]", "models[0].parameters.weight: empty list"),
        (_BASE + "models: []", "models: empty list"),
        (
            _BASE + "models: [{model: a, parameters: {gamma: 1}}]",
            "models[0].parameters.gamma: unknown parameter 'gamma' for merge method 'ties'; "
            "known: density, weight",
        ),
        (_BASE + "models: [{model: a, parameters: {lambda: 1}}]", "'lambda' is a global parameter"),
        (_BASE + "models: [{model: a}]\nparameters: {foo: 1}", "parameters.foo: unknown parameter 'foo'"),
        (
            _BASE + "models: [{model: a}]\nparameters: {normalize: 3}",
            "parameters.normalize: 3 is not true or false",
        ),
        (
            _BASE + "models: [{model: a, parameters: {weight: true}}]",
            "models[0].parameters.weight: true is not a number",
        ),
        (
            _BASE + "models: [{model: a}]\ndtype: fp8",
            "dtype: input should be 'float32', 'bfloat16' or 'float16'",
        ),
        (_BASE + "models: [{modle: a}]", "models[0].model: required field is missing"),
        (_BASE + "models: [{model: a}]\nfoo: 1", "foo: unknown field"),
        (
            _BASE + "models: [{model: a, parameters: {weight: [{filter: x}]}}]",
            "models[0].parameters.weight[0]: rule has no 'value'",
        ),
        (
            _BASE + "models: [{model: a, parameters: {density: [{filter: x, value: [0.5, 2]}]}}]",
            "models[0].parameters.density[0].value[1]: 2 is outside (0, 1]",
        ),
        (
            _BASE + "models: [{model: a, parameters: {weight: abc}}]",
            "models[0].parameters.weight: must be a number",
        ),
        (
            _BASE + "models: [{model: a, parameters: {weight: [1, {value: 2}]}}]",
            "models[0].parameters.weight: a list",
        ),
        (_BASE + "models: [{model: b}]", "models: no model besides the base model 'b'"),
        ("merge_method: [ties\n", "invalid recipe YAML"),
        ("- just a list", "a recipe must be a YAML mapping"),
        ("missing_recipe.yaml", "recipe file not found: missing_recipe.yaml"),
    ],
)
def test_recipe_validation_errors(text: str, message: str) -> None:
    with pytest.raises(RecipeError) as exc:
        MergeRecipe.from_yaml(text)
    assert message in _one_line(exc)


def test_recipe_constructor_and_validate_raise_recipe_error() -> None:
    with pytest.raises(RecipeError, match=r"^models: empty list"):
        MergeRecipe(merge_method="linear", models=[])
    with pytest.raises(RecipeError, match=r"^merge_method: required field is missing"):
        MergeRecipe.model_validate({"models": [{"model": "a"}]})


# ============================================================================ resolution
def test_resolve_scalars_lists_and_filters() -> None:
    q0 = "model.layers.0.self_attn.q_proj.weight"
    m1 = "model.layers.1.mlp.up_proj.weight"
    m3 = "model.layers.3.mlp.up_proj.weight"
    assert resolve(0.3, m1, 5) == 0.3
    assert resolve(True, m1, 5) == 1.0 and resolve(False, m1, 5) == 0.0
    assert resolve((0.4,), m1, 5) == 0.4  # one-element list = scalar
    assert resolve((0.0, 1.0), m1, 5) == pytest.approx(0.25)  # position 1/4
    assert resolve((0.0, 1.0, 0.0), m1, 5) == pytest.approx(0.5)  # index 0.5 between 0 and 1
    assert resolve((0.0, 1.0, 0.0), m3, 5) == pytest.approx(0.5)  # index 1.5 between 1 and 0
    assert resolve((0.2, 0.4, 0.8), "model.embed_tokens.weight", 5) == 0.2  # embeddings: first
    assert resolve((0.2, 0.4, 0.8), "model.norm.weight", 5) == 0.2  # final norm: t = 0, as in mergekit
    assert resolve((0.2, 0.4, 0.8), "lm_head.weight", 5) == 0.2
    rules = (
        FilterRule(filter="self_attn", value=0.2),
        FilterRule(filter="mlp", value=(0.1, 0.9)),
        FilterRule(filter="mlp", value=7.0),  # shadowed: the first match wins
        FilterRule(value=0.5),
    )
    assert resolve(rules, q0, 5) == 0.2
    assert resolve(rules, m1, 5) == pytest.approx(0.3)
    assert resolve(rules, "model.norm.weight", 5) == 0.5
    only_mlp = (FilterRule(filter="mlp", value=1.0),)
    assert resolve(only_mlp, q0, 5, default=0.25) == 0.25
    with pytest.raises(RecipeError, match="no filter rule matches"):
        resolve(only_mlp, q0, 5)
    # a gradient longer than the layer stack is interpolated over it, as mergekit does (no refusal):
    # 6 points on 5 layers, layer 1 sits at depth 1/4, i.e. at 1.25 of the 5 gaps
    six = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)
    assert resolve(six, m1, 5, param="w") == pytest.approx(0.25)
    assert resolve((0.1, 0.9, 0.3, 0.7, 0.5), "model.layers.1.mlp.up_proj.weight", 3) == pytest.approx(0.3)


def test_resolve_params_fills_defaults_and_global_fallbacks() -> None:
    recipe = MergeRecipe.from_yaml(
        EXAMPLE.replace("parameters: {lambda: 1.0", "parameters: {density: 0.4, lambda: 2")
    )
    per_model, global_params = resolve_params(recipe, "model.layers.0.self_attn.q_proj.weight", 3)
    assert global_params == {"lambda": 2.0, "normalize": 1.0, "rescale": 0.0, "int8_mask": 0.0}
    assert per_model == [{"weight": 0.7, "density": 0.3}, {"weight": 0.2, "density": 0.4}]
    per_model, _ = resolve_params(recipe, "model.layers.1.mlp.down_proj.weight", 3)
    assert per_model[0] == {"weight": 0.7, "density": 0.5}
    assert per_model[1]["weight"] == pytest.approx(0.5)
    per_model, _ = resolve_params(recipe, "lm_head.weight", 3)  # outside the layers: t = 0 (mergekit)
    assert per_model == [{"weight": 0.7, "density": 0.3}, {"weight": 0.5, "density": 0.4}]
    bare = MergeRecipe.from_yaml("merge_method: ties\nbase_model: b\nmodels: [{model: a}]")
    assert resolve_params(bare, "x", 3) == (
        [{"weight": 1.0, "density": 1.0}],
        {"lambda": 1.0, "normalize": 1.0, "rescale": 0.0, "int8_mask": 0.0},
    )


def test_check_layer_lists() -> None:
    recipe = MergeRecipe.from_yaml(EXAMPLE)
    check_layer_lists(recipe, 3)
    check_layer_lists(recipe, 2)  # a 3-point gradient on 2 layers is interpolated, as in mergekit


# ============================================================================ executors
@pytest.fixture(scope="module")
def family(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, Path, list[Path]]:
    return save_llama_family(tmp_path_factory.mktemp("family"))


@pytest.fixture(scope="module")
def merger(family: tuple[Any, Path, list[Path]]) -> InMemoryMerger:
    _, base, experts = family
    return InMemoryMerger(base, experts)


def _read_all(path: Path) -> dict[str, torch.Tensor]:
    with ModelDir(path) as md:
        return {n: md.read(n).clone() for n in md.tensor_names()}


@pytest.mark.parametrize("method", ALL_METHODS)
def test_streaming_equals_in_memory(
    method: str, tmp_path: Path, family: tuple[Any, Path, list[Path]], merger: InMemoryMerger
) -> None:
    _, base, experts = family
    recipe = _recipe(method, base, experts)
    out = merge_streaming(recipe, tmp_path / "out", max_shard_bytes=60_000)
    written = _read_all(out)
    in_memory = merger.merge(recipe)
    assert list(in_memory) == merger.tensor_names
    assert set(written) == set(in_memory)
    for name, tensor in in_memory.items():
        assert tensor.dtype == torch.float32
        assert torch.equal(written[name], tensor), name
    base_tensors = _read_all(base)
    assert any(not torch.equal(base_tensors[n], t) for n, t in in_memory.items())
    assert entries(tmp_path) == ["out"]


def test_merged_model_loads_and_generates(tmp_path: Path, family: tuple[Any, Path, list[Path]]) -> None:
    import transformers

    _, base, experts = family
    recipe = _recipe("ties", base, experts, seed=3)
    calls: list[tuple[int, int, str]] = []
    out = merge_streaming(
        recipe, tmp_path / "merged", max_shard_bytes=50_000, progress=lambda *a: calls.append(a)
    )
    assert out == (tmp_path / "merged").absolute()
    total = len(calls)
    assert total == len(_read_all(base)) and [c[0] for c in calls] == list(range(1, total + 1))
    assert all(c[1] == total for c in calls)
    assert len(list(out.glob("model-*-of-*.safetensors"))) > 1
    for name, text in TOKENIZER_STUBS.items():
        assert (out / name).read_text() == text
    assert json.loads((out / "config.json").read_text())["dtype"] == "float32"
    card = (out / "README.md").read_text()
    assert "`ties`" in card
    yaml_block = card.split("```yaml\n", 1)[1].split("```", 1)[0]
    assert MergeRecipe.from_yaml(yaml_block) == recipe

    model: Any = transformers.AutoModelForCausalLM.from_pretrained(out)
    ids = torch.tensor([[1, 7, 42]])
    generated: Any = model.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert generated.shape == (1, 7)
    assert torch.equal(generated[:, :3], ids)


def test_streaming_resolves_per_layer_lists_and_filters(
    tmp_path: Path, family: tuple[Any, Path, list[Path]]
) -> None:
    _, base, experts = family
    text = f"""
merge_method: task_arithmetic
base_model: {base}
models:
  - model: {experts[0]}
    parameters: {{weight: [0.0, 1.0]}}
  - model: {experts[1]}
    parameters:
      weight: [{{filter: mlp, value: 0.5}}, {{value: 0.0}}]
dtype: float32
"""
    out = merge_streaming(MergeRecipe.from_yaml(text), tmp_path / "out")
    merged = _read_all(out)
    b, x0, x1 = _read_all(base), _read_all(experts[0]), _read_all(experts[1])

    def expect(name: str, w0: float, w1: float) -> torch.Tensor:
        return b[name] + w0 * (x0[name] - b[name]) + w1 * (x1[name] - b[name])

    cases = {
        "model.layers.0.self_attn.q_proj.weight": (0.0, 0.0),
        "model.layers.0.mlp.up_proj.weight": (0.0, 0.5),
        "model.layers.1.mlp.down_proj.weight": (0.5, 0.5),
        "model.layers.1.input_layernorm.weight": (0.5, 0.0),
        "model.layers.2.self_attn.o_proj.weight": (1.0, 0.0),
        "model.embed_tokens.weight": (0.0, 0.0),
        "model.norm.weight": (0.0, 0.0),  # outside the layer stack: t = 0, as in mergekit
        "lm_head.weight": (0.0, 0.0),
    }
    for name, (w0, w1) in cases.items():
        torch.testing.assert_close(merged[name], expect(name, w0, w1), msg=name)
    assert torch.equal(
        merged["model.layers.0.self_attn.q_proj.weight"], b["model.layers.0.self_attn.q_proj.weight"]
    )


def test_bfloat16_output(
    tmp_path: Path, family: tuple[Any, Path, list[Path]], merger: InMemoryMerger
) -> None:
    _, base, experts = family
    recipe = _recipe("task_arithmetic", base, experts, dtype="bfloat16")
    out = merge_streaming(recipe, tmp_path / "bf16")
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    written = _read_all(out)
    in_memory = merger.merge(recipe)
    for name, tensor in in_memory.items():
        assert tensor.dtype == torch.bfloat16
        assert torch.equal(written[name], tensor)


def test_in_memory_subset_reordered_and_base_listed(
    tmp_path: Path, family: tuple[Any, Path, list[Path]], merger: InMemoryMerger
) -> None:
    _, base, experts = family
    recipe = MergeRecipe.model_validate(
        {
            "merge_method": "linear",
            "base_model": str(base),
            "models": [
                {"model": str(experts[1]), "parameters": {"weight": 0.2}},
                {"model": str(base), "parameters": {"weight": 0.5}},
            ],
            "dtype": "float32",
        }
    )
    written = _read_all(merge_streaming(recipe, tmp_path / "out"))
    in_memory = merger.merge(recipe)
    assert all(torch.equal(written[n], t) for n, t in in_memory.items())


@pytest.mark.parametrize("method", ["dare_ties", "della_linear"])
def test_random_masks_do_not_depend_on_order_or_executor(
    method: str, tmp_path: Path, family: tuple[Any, Path, list[Path]], merger: InMemoryMerger
) -> None:
    """Masks are seeded by (recipe seed, tensor name, position in the recipe): the streaming executor, a
    merger that loaded the experts in the other order, and tensors merged in reverse order all agree."""
    _, base, experts = family
    recipe = _recipe(method, base, experts, seed=11)
    streamed = _read_all(merge_streaming(recipe, tmp_path / "out"))
    swapped = InMemoryMerger(base, list(reversed(experts))).merge(recipe)
    forward = merger.merge(recipe)
    assert streamed.keys() == forward.keys() == swapped.keys()
    for name in forward:
        assert torch.equal(streamed[name], forward[name]) and torch.equal(swapped[name], forward[name]), name
    # one tensor on its own, whatever came before it: its kernel seed depends on its name only
    name = "model.layers.1.mlp.up_proj.weight"
    params, global_params = resolve_params(recipe, name, merger.num_layers)
    with ModelDir(base) as b, ModelDir(experts[0]) as x0, ModelDir(experts[1]) as x1:
        inputs = MergeInputs.from_tensors(b.read(name), [x0.read(name), x1.read(name)])
    alone = METHODS[method].kernel(inputs, params, global_params, tensor_seed(recipe.seed, name))
    assert torch.equal(alone, forward[name])
    other = _recipe(method, base, experts, seed=12)
    assert not torch.equal(merger.merge(other)[name], forward[name])


def test_linear_without_base(tmp_path: Path, family: tuple[Any, Path, list[Path]]) -> None:
    _, _, experts = family
    recipe = MergeRecipe.model_validate(
        {
            "merge_method": "linear",
            "models": [
                {"model": str(experts[0]), "parameters": {"weight": 0.0}},
                {"model": str(experts[1]), "parameters": {"weight": 1.0}},
            ],
        }
    )
    out = merge_streaming(recipe, tmp_path / "out")
    written = _read_all(out)
    expert = _read_all(experts[1])
    assert all(torch.equal(written[n], expert[n]) for n in expert)  # all weight on one expert
    assert not (out / "tokenizer_config.json").exists()  # the tokenizer comes from the first model
    no_base = InMemoryMerger(None, experts)
    assert all(torch.equal(t, written[n]) for n, t in no_base.merge(recipe).items())


def test_int_buffers_copied_from_base(tmp_path: Path) -> None:
    def model(path: Path, shift: float) -> Path:
        tensors = {
            "model.layers.0.mlp.up_proj.weight": torch.full((2, 2), 1.0 + shift),
            "model.position_ids": torch.arange(4) + int(10 * shift),
        }
        return write_model(path, tensors, config={"num_hidden_layers": 1})

    base, a = model(tmp_path / "base", 0.0), model(tmp_path / "a", 1.0)
    recipe = MergeRecipe.model_validate(
        {"merge_method": "task_arithmetic", "base_model": str(base), "models": [{"model": str(a)}]}
    )
    merged = _read_all(merge_streaming(recipe, tmp_path / "out"))
    assert torch.equal(merged["model.position_ids"], torch.arange(4))
    assert torch.equal(merged["model.layers.0.mlp.up_proj.weight"], torch.full((2, 2), 2.0))
    in_memory = InMemoryMerger(base, [a]).merge(recipe)
    assert torch.equal(in_memory["model.position_ids"], torch.arange(4))


# ============================================================================ executor errors
def _assert_untouched(parent: Path, expected: list[str]) -> None:
    assert entries(parent) == expected


def test_output_exists(tmp_path: Path, family: tuple[Any, Path, list[Path]]) -> None:
    _, base, experts = family
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "mine.txt").write_text("keep")
    with pytest.raises(OutputExistsError) as exc:
        merge_streaming(_recipe("ties", base, experts), tmp_path / "out")
    assert "already exists" in _one_line(exc)
    assert (tmp_path / "out" / "mine.txt").read_text() == "keep"
    _assert_untouched(tmp_path, ["out"])
    merge_streaming(_recipe("ties", base, experts), tmp_path / "out", overwrite=True)
    assert not (tmp_path / "out" / "mine.txt").exists()
    _assert_untouched(tmp_path, ["out"])


def test_missing_expert_dir(tmp_path: Path, family: tuple[Any, Path, list[Path]]) -> None:
    _, base, experts = family
    ghost = tmp_path / "ghost"
    with pytest.raises(CheckpointError) as exc:
        merge_streaming(_recipe("ties", base, [experts[0], ghost]), tmp_path / "out")
    assert str(ghost) in _one_line(exc) and "does not exist" in _one_line(exc)
    _assert_untouched(tmp_path, [])


def test_a_gradient_longer_than_the_layers_is_interpolated(
    tmp_path: Path, family: tuple[Any, Path, list[Path]]
) -> None:
    """4 points on 3 layers: layer l takes the gradient at depth l / 2, as mergekit evaluates it."""
    _, base, experts = family
    recipe = MergeRecipe.model_validate(
        {
            "merge_method": "task_arithmetic",
            "base_model": str(base),
            "models": [{"model": str(experts[0]), "parameters": {"weight": [0.1, 0.2, 0.3, 0.4]}}],
        }
    )
    merge_streaming(recipe, tmp_path / "out")
    merged = InMemoryMerger(base, experts).merge(recipe)
    with ModelDir(base) as b, ModelDir(experts[0]) as e, ModelDir(tmp_path / "out") as out:
        for layer, weight in ((0, 0.1), (1, 0.25), (2, 0.4)):
            name = f"model.layers.{layer}.mlp.up_proj.weight"
            expected = b.read(name) + weight * (e.read(name) - b.read(name))
            torch.testing.assert_close(out.read(name), expected, rtol=1e-6, atol=1e-6)
            torch.testing.assert_close(merged[name], expected, rtol=1e-6, atol=1e-6)


def test_tokenizer_source_missing(tmp_path: Path, family: tuple[Any, Path, list[Path]]) -> None:
    _, base, experts = family
    recipe = _recipe("ties", base, experts, tokenizer_source=str(tmp_path / "tok"))
    with pytest.raises(CheckpointError) as exc:
        merge_streaming(recipe, tmp_path / "out")
    assert "tokenizer_source" in _one_line(exc)
    _assert_untouched(tmp_path, [])


@pytest.fixture
def small_models(tmp_path: Path) -> tuple[Path, Path, Path]:
    tensors = {"model.layers.0.mlp.up_proj.weight": torch.ones(2, 2), "model.norm.weight": torch.ones(2)}
    base = write_model(tmp_path / "models" / "base", tensors)
    wrong_shape = write_model(
        tmp_path / "models" / "wrong_shape",
        {**tensors, "model.layers.0.mlp.up_proj.weight": torch.ones(2, 3)},
    )
    missing = write_model(tmp_path / "models" / "missing", {"model.norm.weight": torch.ones(2)})
    return base, wrong_shape, missing


def test_incompatible_shapes(tmp_path: Path, small_models: tuple[Path, Path, Path]) -> None:
    base, wrong_shape, _ = small_models
    recipe = _recipe("task_arithmetic", base, [wrong_shape])
    with pytest.raises(RecipeError) as exc:
        merge_streaming(recipe, tmp_path / "out")
    msg = _one_line(exc)
    assert "'model.layers.0.mlp.up_proj.weight'" in msg and str(wrong_shape) in msg and "[2, 3]" in msg
    _assert_untouched(tmp_path, ["models"])
    with pytest.raises(RecipeError, match=r"model\.layers\.0\.mlp\.up_proj\.weight"):
        InMemoryMerger(base, [wrong_shape])


def test_missing_and_extra_tensors(tmp_path: Path, small_models: tuple[Path, Path, Path]) -> None:
    base, _, missing = small_models
    with pytest.raises(RecipeError) as exc:
        merge_streaming(_recipe("task_arithmetic", base, [missing]), tmp_path / "out")
    assert f"model {missing} lacks tensor 'model.layers.0.mlp.up_proj.weight'" in _one_line(exc)
    with pytest.raises(RecipeError) as exc:
        merge_streaming(_recipe("task_arithmetic", missing, [base]), tmp_path / "out")
    assert f"model {base} has tensor 'model.layers.0.mlp.up_proj.weight'" in _one_line(exc)
    _assert_untouched(tmp_path, ["models"])


def test_in_memory_recipe_mismatch(family: tuple[Any, Path, list[Path]], merger: InMemoryMerger) -> None:
    _, base, experts = family
    other = base.parent / "elsewhere"
    with pytest.raises(RecipeError, match="is not among the loaded experts"):
        merger.merge(_recipe("ties", base, [experts[0], other]))
    with pytest.raises(RecipeError, match="is not the loaded base model"):
        merger.merge(_recipe("ties", other, experts))
    no_base = InMemoryMerger(None, experts[:1])
    with pytest.raises(RecipeError, match="holds no base model"):
        no_base.merge(_recipe("ties", base, experts[:1]))
    # paths are compared after resolving
    relative = _recipe("linear", None, [Path(str(experts[0]) + "/../" + experts[0].name)])
    assert set(no_base.merge(relative)) == set(merger.tensor_names)


def test_in_memory_properties(family: tuple[Any, Path, list[Path]], merger: InMemoryMerger) -> None:
    _, base, experts = family
    assert merger.num_layers == 3
    assert merger.device == torch.device("cpu")
    assert merger.config["num_hidden_layers"] == 3
    assert merger.base_path == base and merger.expert_paths == experts
    with ModelDir(base) as md:
        assert merger.tensor_names == md.tensor_names()


@pytest.mark.parametrize("method", ["task_arithmetic", "ties", "linear"])
def test_bfloat16_resident_merger_is_half_the_memory_and_rounds_only_the_task_vectors(
    method: str, family: tuple[Any, Path, list[Path]], merger: InMemoryMerger
) -> None:
    _, base, experts = family
    half = InMemoryMerger(base, experts, dtype=torch.bfloat16)

    def resident_bytes(m: InMemoryMerger) -> int:
        tensors = [*(m._base or {}).values(), *(t for v in m._vectors for t in v.values())]
        return sum(t.numel() * t.element_size() for t in tensors)

    assert resident_bytes(half) * 2 == resident_bytes(merger)
    recipe = _recipe(method, None if method == "linear" else base, experts)
    exact, rounded = merger.merge(recipe), half.merge(recipe)
    assert list(rounded) == list(exact)
    for name, tensor in exact.items():
        assert rounded[name].dtype == tensor.dtype == torch.float32  # merged in float32, as asked
        scale = float(tensor.abs().max()) or 1.0
        off = int(((rounded[name] - tensor).abs() > 2**-6 * scale).sum())
        # bf16 keeps 8 significant bits of each input; ties' top-k trim may flip an entry at its threshold
        assert off == 0 if method != "ties" else off <= max(2, tensor.numel() // 100), (name, off)
    assert any(not torch.equal(rounded[n], exact[n]) for n in exact)  # it really was rounded
    with pytest.raises(RecipeError, match=r"not torch\.int8"):
        InMemoryMerger(base, experts, dtype=torch.int8)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("method", ALL_METHODS)
def test_in_memory_on_cuda_matches_cpu(
    method: str, family: tuple[Any, Path, list[Path]], merger: InMemoryMerger
) -> None:
    _, base, experts = family
    recipe = _recipe(method, base, experts)
    on_gpu = InMemoryMerger(base, experts, device="cuda").merge(recipe)
    on_cpu = merger.merge(recipe)
    for name, tensor in on_gpu.items():
        assert tensor.device.type == "cuda"
        torch.testing.assert_close(tensor.cpu(), on_cpu[name], msg=name)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("method", ["ties", "dare_ties", "della"])
def test_streaming_on_cuda_matches_cpu(
    method: str, tmp_path: Path, family: tuple[Any, Path, list[Path]]
) -> None:
    """--device cuda: same masks (drawn on CPU), same selections, equal up to float32 rounding."""
    _, base, experts = family
    recipe = _recipe(method, base, experts)
    on_gpu = _read_all(merge_streaming(recipe, tmp_path / "gpu", device="cuda"))
    on_cpu = _read_all(merge_streaming(recipe, tmp_path / "cpu"))
    for name, tensor in on_cpu.items():
        torch.testing.assert_close(on_gpu[name], tensor, msg=name)


# ============================================================================ rsaf
def test_rsaf_keep_ratio_rule() -> None:
    from evomerge.merging.methods.rsaf import HALF_NORMAL_SKEWNESS, keep_ratios

    same = keep_ratios(
        [0.1, 0.1], [HALF_NORMAL_SKEWNESS] * 2, [0.4, 0.4], rate_gain=0.5, skew_gain=0.5, min_density=0.01
    )
    assert same == pytest.approx([0.4, 0.4])  # equal rates, Gaussian-like skew: the base density
    rates = keep_ratios(
        [0.2, 0.05], [HALF_NORMAL_SKEWNESS] * 2, [0.4, 0.4], rate_gain=0.5, skew_gain=0.0, min_density=0.01
    )
    assert rates[0] > 0.4 > rates[1]  # the model that changed the tensor more keeps more
    assert rates[0] == pytest.approx(0.4 * (1 + 0.5 * math.tanh(math.log(2.0))))
    skew = keep_ratios(
        [0.1, 0.1], [4.0, HALF_NORMAL_SKEWNESS], [0.4, 0.4], rate_gain=0.0, skew_gain=0.5, min_density=0.01
    )
    assert skew[0] == pytest.approx(0.4 * math.sqrt(HALF_NORMAL_SKEWNESS / 4.0)) and skew[1] == pytest.approx(
        0.4
    )
    clamped = keep_ratios(
        [1.0, 1e-9], [0.01, 50.0], [0.9, 0.9], rate_gain=1.0, skew_gain=4.0, min_density=0.05
    )
    assert clamped == [1.0, 0.05]


def test_rsaf_with_zero_gains_is_ties(random_inputs: tuple[torch.Tensor, list[torch.Tensor]]) -> None:
    base, experts = random_inputs
    inputs = MergeInputs.from_tensors(base, experts[:2])
    params = [{"weight": 0.6, "density": 0.4}, {"weight": 0.8, "density": 0.7}]
    rsaf_globals = {**METHODS["rsaf"].global_params, "rate_gain": 0.0, "skew_gain": 0.0}
    ties_globals = dict(METHODS["ties"].global_params)
    torch.testing.assert_close(
        _run("rsaf", inputs, params, rsaf_globals), _run("ties", inputs, params, ties_globals)
    )
    # with the default gains, the keep ratio adapts: a heavy-tailed task vector keeps fewer entries
    heavy = torch.zeros(1000)
    heavy[:10] = 5.0
    heavy += 0.01 * torch.randn(1000, generator=torch.Generator().manual_seed(1))
    flat = torch.randn(1000, generator=torch.Generator().manual_seed(2)) * 0.5
    zero = torch.zeros(1000)
    for delta, fewer in ((heavy, True), (flat, False)):
        merged = _run(
            "rsaf", MergeInputs.from_tensors(zero + 1.0, [1.0 + delta]), [{"weight": 1.0, "density": 0.4}],
            METHODS["rsaf"].global_params,
        )  # fmt: skip
        kept = int(((merged - 1.0) != 0).sum())
        assert (kept < 400) if fewer else (kept >= 390), kept


# ============================================================================ nearswap, multislerp
def test_nearswap_formula() -> None:
    a = torch.tensor([0.0, 0.0, 0.0, 1.0])
    b = torch.tensor([0.05, -0.2, 1.0, 1.0])
    out = _run("nearswap", MergeInputs.from_tensors(a, [b]), [{}], {"t": 0.1})
    # |a - b| = 0.05 < t: swapped; 0.2: halfway (t / 0.2); 1.0: a tenth of the way; equal: unchanged
    torch.testing.assert_close(out, torch.tensor([0.05, -0.1, 0.1, 1.0]))


def test_multislerp_two_orthogonal_unit_vectors_and_degenerate_cases() -> None:
    x = torch.tensor([1.0, 0.0])
    y = torch.tensor([0.0, 1.0])
    out = _run(
        "multislerp",
        MergeInputs(base=None, experts=(x, y)),
        [{"weight": 1.0}] * 2,
        dict(METHODS["multislerp"].global_params),
    )
    # the geodesic midpoint of two orthogonal unit vectors, at their mean norm 1
    torch.testing.assert_close(out, torch.tensor([0.5**0.5, 0.5**0.5]))
    # with a base, the task vectors are interpolated and the base added back
    base = torch.tensor([2.0, -1.0])
    inputs = MergeInputs.from_tensors(base, [base + x, base + y])
    torch.testing.assert_close(
        _run("multislerp", inputs, [{"weight": 1.0}] * 2, dict(METHODS["multislerp"].global_params)),
        base + out,
    )
    # every model equals the base (a layer no fine-tune touched): the base, for any number of models
    same = MergeInputs.from_tensors(base, [base.clone() for _ in range(3)])
    torch.testing.assert_close(
        _run("multislerp", same, [{"weight": 1.0}] * 3, dict(METHODS["multislerp"].global_params)), base
    )
    # antipodal directions that cancel, three models: an error as in mergekit
    cancel = MergeInputs(base=None, experts=(x, -x, x))
    with pytest.raises(ValueError, match="weighted sum"):
        _run(
            "multislerp",
            cancel,
            [{"weight": 1.0}, {"weight": 2.0}, {"weight": 1.0}],
            dict(METHODS["multislerp"].global_params),
        )


def test_arcee_fusion_threshold_of_a_large_tensor_is_seeded_and_close_to_the_exact_one() -> None:
    from evomerge.merging.methods.arcee_fusion import SAMPLE_SIZE, threshold

    scores = torch.rand(1200, 1000, generator=torch.Generator().manual_seed(1))  # 1.2 M elements: sampled
    assert scores.numel() > SAMPLE_SIZE
    first, again, other = threshold(scores, 5), threshold(scores, 5), threshold(scores, 6)
    assert torch.equal(first, again) and not torch.equal(first, other)
    # uniform on [0, 1): median 0.5, IQR 0.5, threshold 1.25 (a sample of a million is within 0.01)
    assert abs(float(first) - 1.25) < 0.01
