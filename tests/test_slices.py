"""mergekit's ``slices``: layer stacking, splicing and repeating, against mergekit 0.1.5 on the tiny family;
the stacked model loads and runs in transformers; the in-memory executor builds the same tensors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from evomerge.errors import RecipeError
from evomerge.merging import InMemoryMerger, MergeRecipe, merge_streaming

pytest.importorskip("mergekit.merge")

from mergekit_family import (
    ATOL,
    RTOL,
    Family,
    make_family,
    read_all,
    run_evomerge,
    run_mergekit,
)


@pytest.fixture(scope="module")
def family(tmp_path_factory: pytest.TempPathFactory) -> Family:
    return make_family(tmp_path_factory.mktemp("slices_family"))


# A frankenmerge: 5 layers from 3 (layer 1 of e1 repeated as layers 2 and 3), passthrough per slice.
STACK = """
merge_method: passthrough
slices:
  - sources: [{model: $e0, layer_range: [0, 2]}]
  - sources: [{model: $e1, layer_range: [1, 2]}]
  - sources: [{model: $e1, layer_range: [1, 3]}]
dtype: float32
"""

# Damped repeats: mergekit's scale with filters on the residual writers (o_proj, down_proj).
STACK_SCALED = """
merge_method: passthrough
slices:
  - sources: [{model: $e0, layer_range: [0, 3]}]
  - sources:
      - model: $e0
        layer_range: [1, 3]
        parameters:
          scale: [{filter: o_proj, value: 0.5}, {filter: down_proj, value: [0.25, 0.75]}, {value: 1.0}]
dtype: float32
"""

# Per-slice merges with offset sources and a gradient evaluated within each slice.
SPLICE_SLERP = """
merge_method: slerp
base_model: $base
slices:
  - sources:
      - {model: $base, layer_range: [0, 2]}
      - {model: $e0, layer_range: [1, 3]}
    parameters: {t: [0.1, 0.9]}
  - sources:
      - {model: $base, layer_range: [2, 3]}
      - {model: $e0, layer_range: [2, 3]}
    parameters: {t: [0.2, 0.7, 0.4]}
  - sources:
      - {model: $base, layer_range: [1, 3]}
      - {model: $e0, layer_range: [0, 2]}
parameters:
  t: [{filter: self_attn, value: 0.3}, {value: [0.6, 0.2]}]
dtype: float32
"""

SPLICE_TIES = """
merge_method: ties
base_model: $base
slices:
  - sources:
      - {model: $base, layer_range: [0, 2]}
      - {model: $e0, layer_range: [0, 2], parameters: {weight: 0.7, density: 0.5}}
      - {model: $e1, layer_range: [1, 3], parameters: {weight: [0.3, 0.9], density: [0.4, 0.8]}}
  - sources:
      - {model: $base, layer_range: [1, 3]}
      - {model: $e2, layer_range: [1, 3], parameters: {weight: 1.0, density: 0.6}}
      - {model: $e1, layer_range: [0, 2], parameters: {weight: 0.5, density: 0.7}}
    parameters: {lambda: 0.8}
dtype: float32
"""

# One slice over part of the stack: the first two layers of every model, merged.
TRUNCATE = """
merge_method: task_arithmetic
base_model: $base
slices:
  - sources:
      - {model: $base, layer_range: [0, 2]}
      - {model: $e0, layer_range: [0, 2], parameters: {weight: 0.6}}
      - {model: $e1, layer_range: [0, 2], parameters: {weight: [0.2, 0.8]}}
dtype: float32
"""

CASES = {
    "stack": (STACK, 5),
    "stack_scaled": (STACK_SCALED, 5),
    "splice_slerp": (SPLICE_SLERP, 5),
    "splice_ties": (SPLICE_TIES, 4),
    "truncate": (TRUNCATE, 2),
}


def _assert_close_all(ours: dict[str, torch.Tensor], theirs: dict[str, torch.Tensor]) -> None:
    assert sorted(ours) == sorted(theirs)
    for name, tensor in ours.items():
        assert tensor.shape == theirs[name].shape, name
        torch.testing.assert_close(
            tensor, theirs[name], rtol=RTOL, atol=ATOL, msg=lambda m, n=name: f"{n}: {m}"
        )


@pytest.mark.parametrize("case", sorted(CASES))
def test_slices_match_mergekit(case: str, tmp_path: Path, family: Family) -> None:
    text, layers = CASES[case]
    text = family.fill(text)
    ours = run_evomerge(text, tmp_path / "ours")
    theirs = run_mergekit(text, tmp_path / "theirs")
    _assert_close_all(ours, theirs)
    config = json.loads((tmp_path / "ours" / "config.json").read_text())
    assert config["num_hidden_layers"] == layers
    assert max(int(n.split(".")[2]) for n in ours if n.startswith("model.layers.")) == layers - 1


def test_stacked_layers_are_the_source_layers(tmp_path: Path, family: Family) -> None:
    """The definition, checked without mergekit: output layer k is the named source layer, copied."""
    ours = run_evomerge(family.fill(STACK), tmp_path / "ours")
    e0, e1 = read_all(family.experts[0]), read_all(family.experts[1])
    where = [(e0, 0), (e0, 1), (e1, 1), (e1, 1), (e1, 2)]
    for k, (source, layer) in enumerate(where):
        for suffix in ("self_attn.q_proj.weight", "mlp.down_proj.weight", "input_layernorm.weight"):
            assert torch.equal(ours[f"model.layers.{k}.{suffix}"], source[f"model.layers.{layer}.{suffix}"])
    assert torch.equal(ours["model.embed_tokens.weight"], e0["model.embed_tokens.weight"])  # first slice
    assert torch.equal(ours["lm_head.weight"], e1["lm_head.weight"])  # last slice
    scaled = run_evomerge(family.fill(STACK_SCALED), tmp_path / "scaled")
    # second slice, output layers 3 and 4 = e0 layers 1 and 2; down_proj's gradient within the slice: t = 0, 1
    torch.testing.assert_close(
        scaled["model.layers.3.self_attn.o_proj.weight"], 0.5 * e0["model.layers.1.self_attn.o_proj.weight"]
    )
    torch.testing.assert_close(
        scaled["model.layers.3.mlp.down_proj.weight"], 0.25 * e0["model.layers.1.mlp.down_proj.weight"]
    )
    torch.testing.assert_close(
        scaled["model.layers.4.mlp.down_proj.weight"], 0.75 * e0["model.layers.2.mlp.down_proj.weight"]
    )
    assert torch.equal(scaled["model.layers.4.mlp.up_proj.weight"], e0["model.layers.2.mlp.up_proj.weight"])


def test_stacked_model_loads_and_runs_in_transformers(tmp_path: Path, family: Family) -> None:
    import transformers

    out = merge_streaming(MergeRecipe.from_yaml(family.fill(STACK)), tmp_path / "stacked")
    model = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert model.config.num_hidden_layers == 5 and len(model.model.layers) == 5
    ids = torch.tensor([[1, 5, 9, 3]])
    with torch.no_grad():
        logits = model(ids).logits
        generated = model.generate(ids, max_new_tokens=4, do_sample=False)
    assert logits.shape == (1, 4, 96) and bool(torch.isfinite(logits).all())
    assert generated.shape == (1, 8)


def test_per_layer_config_lists_follow_the_layers(tmp_path: Path) -> None:
    """A Qwen2 config lists each layer's attention type; the stacked model's list is taken at the copied
    layers, so transformers (which checks its length) loads it."""
    import transformers

    config = transformers.Qwen2Config(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=2,
        num_key_value_heads=1,
        vocab_size=64,
        use_sliding_window=True,
        sliding_window=16,
        max_window_layers=2,
    )
    torch.manual_seed(0)
    transformers.Qwen2ForCausalLM(config).save_pretrained(tmp_path / "q")
    source_types = json.loads((tmp_path / "q" / "config.json").read_text())["layer_types"]
    assert len(set(source_types)) == 2  # both kinds, so the mapping is visible
    recipe = MergeRecipe.model_validate(
        {
            "merge_method": "passthrough",
            "slices": [
                {"sources": [{"model": str(tmp_path / "q"), "layer_range": [2, 3]}]},
                {"sources": [{"model": str(tmp_path / "q"), "layer_range": [0, 3]}]},
            ],
        }
    )
    out = merge_streaming(recipe, tmp_path / "out")
    written = json.loads((out / "config.json").read_text())
    assert written["num_hidden_layers"] == 4
    assert written["layer_types"] == [source_types[i] for i in (2, 0, 1, 2)]
    model = transformers.AutoModelForCausalLM.from_pretrained(out)
    with torch.no_grad():
        assert model(torch.tensor([[1, 2, 3]])).logits.shape == (1, 3, 64)


@pytest.mark.parametrize("case", ["stack_scaled", "splice_ties", "truncate"])
def test_in_memory_matches_streaming(case: str, tmp_path: Path, family: Family) -> None:
    recipe = MergeRecipe.from_yaml(family.fill(CASES[case][0]))
    merger = InMemoryMerger(family.base, family.experts)
    merged = merger.merge(recipe)
    written = read_all(merge_streaming(recipe, tmp_path / "out"))
    _assert_close_all(merged, written)
    assert merger.output_config(recipe)["num_hidden_layers"] == CASES[case][1]


def test_to_mergekit_round_trip(tmp_path: Path, family: Family) -> None:
    recipe = MergeRecipe.from_yaml(family.fill(SPLICE_SLERP))
    assert MergeRecipe.from_yaml(recipe.to_yaml()) == recipe
    exported = recipe.to_mergekit_yaml()
    assert len(yaml.safe_load(exported)["slices"]) == 3
    _assert_close_all(
        read_all(merge_streaming(recipe, tmp_path / "ours")), run_mergekit(exported, tmp_path / "mk")
    )


def _one_line(exc: pytest.ExceptionInfo[RecipeError]) -> str:
    text = str(exc.value)
    assert text and "\n" not in text
    return text


def test_layer_range_past_the_last_layer_is_refused(tmp_path: Path, family: Family) -> None:
    text = family.fill(STACK).replace("[1, 3]", "[1, 4]")
    with pytest.raises(RecipeError) as exc:
        merge_streaming(MergeRecipe.from_yaml(text), tmp_path / "out")
    assert _one_line(exc).startswith("slices[2].sources[0].layer_range")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("edit", "start"),
    [
        (lambda t: t.replace("      - {model: $base, layer_range: [2, 3]}\n", ""), "slices[1].sources"),
        (
            lambda t: t.replace(
                "layer_range: [2, 3]}\n      - {model: $e0, layer_range: [2, 3]}",
                "layer_range: [2, 3]}\n      - {model: $e0, layer_range: [1, 3]}",
            ),
            "slices[1]: sources: every source",
        ),
        (
            lambda t: t.replace("    parameters: {t: [0.1, 0.9]}", "    residual_weight: 0.5"),
            "slices[0].residual_weight",
        ),
        (lambda t: t.replace("parameters: {t: [0.1, 0.9]}", "parameters: {weight: 0.5}"), "slices[0]"),
    ],
)
def test_bad_slices_are_refused_by_name(edit: object, start: str, family: Family) -> None:
    assert callable(edit)
    with pytest.raises(RecipeError) as exc:
        MergeRecipe.from_yaml(family.fill(edit(SPLICE_SLERP)))
    assert _one_line(exc).startswith(start)


def test_a_searched_layer_path_exports_as_slices_mergekit_reproduces(tmp_path: Path, family: Family) -> None:
    """A layer-path genome (with residual-scale genes) -> recipe -> mergekit YAML: mergekit 0.1.5 builds
    the same tensors from it."""
    from evomerge.search_spaces import LayerPathConfig, LayerPathSpace

    space = LayerPathSpace(
        LayerPathConfig(repeats=2, scale=True, max_layers=8),
        str(family.base),
        [str(e) for e in family.experts[:2]],
        3,
    )
    genome = {space.include_gene(t): 0.2 for t in range(len(space.slots))}
    genome.update({space.scale_gene(t): 1.0 for t in range(len(space.slots))})
    for t in (0, 1, 5, 7, 8, 10, 11):  # base 0-1, e0 layer 2, e1 layers 1-2, then (repeat 2) base 1-2
        genome[space.include_gene(t)] = 0.9
    genome[space.scale_gene(8)] = 0.6
    recipe = space.to_recipe(genome)
    assert len(recipe.slices) >= 4
    exported = recipe.to_mergekit_yaml()
    ours = read_all(merge_streaming(recipe, tmp_path / "ours"))
    assert json.loads((tmp_path / "ours" / "config.json").read_text())["num_hidden_layers"] == 7
    _assert_close_all(ours, run_mergekit(exported, tmp_path / "mk"))
