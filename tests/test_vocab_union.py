"""``tokenizer_source: union``: experts with extended vocabularies merge over the union of the tokens, with
the embedding and lm_head rows mapped by token, as mergekit 0.1.5 does."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from evomerge.errors import RecipeError
from evomerge.merging import InMemoryMerger, MergeRecipe, merge_streaming

pytest.importorskip("mergekit.merge")

from mergekit_family import ATOL, RTOL, Family, make_family, read_all, run_mergekit

VOCAB_TENSORS = ("model.embed_tokens.weight", "lm_head.weight")


def _extend(src: Path, dst: Path, tokens: list[str], seed: int) -> Path:
    """A copy of model ``src`` whose tokenizer gains ``tokens`` and whose embedding and lm_head gain one
    random row each (as a fine-tune that added tokens has)."""
    import transformers

    shutil.copytree(src, dst)
    tok = transformers.AutoTokenizer.from_pretrained(dst)
    tok.add_tokens(tokens)
    tok.save_pretrained(dst)
    model = transformers.AutoModelForCausalLM.from_pretrained(dst)
    size = len(tok)
    model.resize_token_embeddings(size, mean_resizing=False)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for weight in (model.get_input_embeddings().weight, model.get_output_embeddings().weight):
            weight[size - len(tokens) :] = 0.02 * torch.randn(len(tokens), weight.shape[1], generator=gen)
    model.save_pretrained(dst)
    return dst


@pytest.fixture(scope="module")
def family(tmp_path_factory: pytest.TempPathFactory) -> tuple[Family, Path, Path]:
    root = tmp_path_factory.mktemp("union_family")
    fam = make_family(root)
    e1x = _extend(fam.experts[1], root / "e1x", ["x1", "x2", "x3", "x4"], 7)
    e2x = _extend(fam.experts[2], root / "e2x", ["x3", "y1"], 8)
    return fam, e1x, e2x


RECIPES = {
    "task_arithmetic": """merge_method: task_arithmetic
base_model: {base}
models:
  - model: {e0}
    parameters: {{weight: 0.6}}
  - model: {e1x}
    parameters: {{weight: [0.2, 0.8]}}
  - model: {e2x}
    parameters: {{weight: 0.5}}
tokenizer_source: union
dtype: float32
""",
    "linear": """merge_method: linear
models:
  - model: {e1x}
    parameters: {{weight: 0.7}}
  - model: {e2x}
    parameters: {{weight: 0.3}}
tokenizer_source: union
dtype: float32
""",
    "tokens": """merge_method: task_arithmetic
base_model: {base}
models:
  - model: {e0}
    parameters: {{weight: 0.6}}
  - model: {e1x}
    parameters: {{weight: 0.5}}
tokenizer:
  source: union
  tokens:
    x1: {{source: {e1x}}}
    x2: {{source: {{kind: model_token, model: {e1x}, token: x3}}}}
    t5: {{source: {{kind: zero}}, force: true}}
    t7: {{source: {e0}, force: true}}
dtype: float32
""",
}


def _text(case: str, family: tuple[Family, Path, Path]) -> str:
    fam, e1x, e2x = family
    return RECIPES[case].format(base=fam.base, e0=fam.experts[0], e1x=e1x, e2x=e2x)


@pytest.mark.parametrize("case", sorted(RECIPES))
def test_union_matches_mergekit(case: str, tmp_path: Path, family: tuple[Family, Path, Path]) -> None:
    import transformers

    text = _text(case, family)
    out = merge_streaming(MergeRecipe.from_yaml(text), tmp_path / "ours")
    ours = read_all(out)
    theirs = run_mergekit(text, tmp_path / "theirs", tokenizer=True)
    # mergekit orders the added tokens by a set of models (no fixed order): compare rows by token
    our_vocab = transformers.AutoTokenizer.from_pretrained(out).get_vocab()
    their_vocab = transformers.AutoTokenizer.from_pretrained(tmp_path / "theirs").get_vocab()
    assert our_vocab.keys() == their_vocab.keys()
    tokens = sorted(our_vocab)
    assert sorted(ours) == sorted(theirs)
    for name, tensor in ours.items():
        other = theirs[name]
        if name in VOCAB_TENSORS:
            tensor = tensor[[our_vocab[t] for t in tokens]]
            other = other[[their_vocab[t] for t in tokens]]
        assert tensor.shape == other.shape, name
        torch.testing.assert_close(tensor, other, rtol=RTOL, atol=ATOL, msg=lambda m, n=name: f"{n}: {m}")
    expected = 96 + (4 if case == "tokens" else 5)  # x1..x4 (and y1 with e2x; x3 once)
    assert len(our_vocab) == expected == json.loads((out / "config.json").read_text())["vocab_size"]
    assert ours["model.embed_tokens.weight"].shape[0] == expected
    tok = transformers.AutoTokenizer.from_pretrained(out)
    model = transformers.AutoModelForCausalLM.from_pretrained(out)
    ids = tok("t5 x3 y1 t7", return_tensors="pt")["input_ids"]
    assert int(ids.max()) >= 96  # the added tokens are in the vocabulary
    with torch.no_grad():
        assert model(ids).logits.shape[-1] == expected


def test_rows_follow_tokens(tmp_path: Path, family: tuple[Family, Path, Path]) -> None:
    """A token only one model has keeps that model's row (every model takes it, so task vectors cancel);
    a shared base token is merged as usual."""
    import transformers

    fam, _, e2x = family
    out = merge_streaming(MergeRecipe.from_yaml(_text("task_arithmetic", family)), tmp_path / "out")
    vocab = transformers.AutoTokenizer.from_pretrained(out).get_vocab()
    ours = read_all(out)["model.embed_tokens.weight"]
    e2 = read_all(e2x)["model.embed_tokens.weight"]
    e2_vocab = transformers.AutoTokenizer.from_pretrained(e2x).get_vocab()
    assert torch.equal(ours[vocab["y1"]], e2[e2_vocab["y1"]])
    base = read_all(fam.base)["model.embed_tokens.weight"]
    assert not torch.equal(ours[vocab["t5"]], base[5])


def test_token_overrides_with_the_base_tokenizer(tmp_path: Path, family: tuple[Family, Path, Path]) -> None:
    """``tokenizer: {source: base, tokens}``: the base's vocabulary plus the configured tokens (mergekit
    0.1.5 fails on this one: it adds the tokens to the base's own tokenizer object, then finds their ids
    past the base's rows)."""
    import transformers

    fam, e1x, _ = family
    text = (
        _text("tokens", family)
        .replace("source: union", "source: base")
        .replace("    t7:", "    z9: {source: {kind: zero}}\n    t7:")
    )
    out = merge_streaming(MergeRecipe.from_yaml(text), tmp_path / "out")
    vocab = transformers.AutoTokenizer.from_pretrained(out).get_vocab()
    assert len(vocab) == 96 + 3  # the base's tokens, x1, x2 and z9
    ours = read_all(out)["model.embed_tokens.weight"]
    e1 = read_all(e1x)["model.embed_tokens.weight"]
    e1_vocab = transformers.AutoTokenizer.from_pretrained(e1x).get_vocab()
    e0 = read_all(fam.experts[0])["model.embed_tokens.weight"]
    assert torch.equal(ours[vocab["x1"]], e1[e1_vocab["x1"]])  # only e1x has it: its row for all
    # model_token: the models without x2 take e1x's row of x3; e1x keeps its own (no force), weight 0.5
    x3, x2 = e1[e1_vocab["x3"]], e1[e1_vocab["x2"]]
    torch.testing.assert_close(ours[vocab["x2"]], x3 + 0.5 * (x2 - x3))
    assert torch.equal(ours[vocab["z9"]], torch.zeros(ours.shape[1]))  # zero, in no model
    assert torch.equal(ours[vocab["t5"]], torch.zeros(ours.shape[1]))  # forced zero
    assert torch.equal(ours[vocab["t7"]], e0[7])  # forced to e0's row for every model


def test_in_memory_refuses_union(family: tuple[Family, Path, Path]) -> None:
    fam, _, _ = family
    recipe = MergeRecipe.model_validate(
        {
            "merge_method": "task_arithmetic",
            "base_model": str(fam.base),
            "models": [{"model": str(fam.experts[0])}],
            "tokenizer_source": "union",
        }
    )
    with pytest.raises(RecipeError, match="union"):
        InMemoryMerger(fam.base, list(fam.experts)).merge(recipe)
