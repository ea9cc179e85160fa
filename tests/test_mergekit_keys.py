"""mergekit's top-level keys: each one is taken or refused by name, never ignored; ``chat_template`` and
``tokenizer: {source}`` are written into the output's tokenizer files."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from evomerge.errors import RecipeError
from evomerge.merging import MergeRecipe, merge_streaming
from evomerge.merging.chat_templates import NAMED

mergekit_config = pytest.importorskip("mergekit.config")

from mergekit_family import Family, make_family  # noqa: E402  (after the skip: the helpers import mergekit)


@pytest.fixture(scope="module")
def family(tmp_path_factory: pytest.TempPathFactory) -> Family:
    return make_family(tmp_path_factory.mktemp("keys_family"))


TAKEN = {
    "merge_method",
    "base_model",
    "models",
    "slices",
    "parameters",
    "dtype",
    "out_dtype",
    "tokenizer_source",
    "tokenizer",
    "chat_template",
}
REFUSED = {"modules"}


def test_every_mergekit_top_level_key_is_taken_or_refused() -> None:
    """mergekit 0.1.5's MergeConfiguration has exactly these keys (a new mergekit with another key fails
    here, so that it gets handled)."""
    assert set(mergekit_config.MergeConfiguration.model_fields) == TAKEN | REFUSED


def _linear(family: Family, extra: str = "") -> str:
    return (
        family.fill("merge_method: linear\nmodels:\n  - model: $e0\n  - model: $e1\ndtype: float32\n") + extra
    )


def _one_line(exc: pytest.ExceptionInfo[RecipeError]) -> str:
    text = str(exc.value)
    assert text and "\n" not in text
    return text


@pytest.mark.parametrize(
    ("extra", "start"),
    [
        ("modules: {decoder: {models: [{model: x}]}}\n", "modules"),
        ("tokenizer: {source: base, tokens: {'<x>': {source: {kind: one}}}}\n", "tokens"),
        ("tokenizer: {source: base, pad_to_multiple_of: 64}\n", "tokenizer.pad_to_multiple_of"),
        ("tokenizer: {source: base, colour: red}\n", "tokenizer.colour"),
        ("tokenizer: {source: base}\ntokenizer_source: base\n", "tokenizer"),
        ("chat_template: vicuna\n", "chat_template"),
        ("merge_options: {cuda: true}\n", "merge_options"),
    ],
)
def test_refused_by_name(extra: str, start: str, family: Family) -> None:
    with pytest.raises(RecipeError) as exc:
        MergeRecipe.from_yaml(_linear(family, extra))
    assert _one_line(exc).startswith(start)


def test_named_chat_template_is_written_and_renders(tmp_path: Path, family: Family) -> None:
    import transformers

    out = merge_streaming(MergeRecipe.from_yaml(_linear(family, "chat_template: chatml\n")), tmp_path / "out")
    assert (out / "chat_template.jinja").read_text() == NAMED["chatml"]
    assert json.loads((out / "tokenizer_config.json").read_text())["chat_template"] == NAMED["chatml"]
    tok = transformers.AutoTokenizer.from_pretrained(out)
    text = tok.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


def test_auto_picks_the_template_most_models_share(tmp_path: Path, family: Family) -> None:
    models = []
    for i, template in enumerate(["{{ 'A' }}", "{{ 'B' }}", "{{ 'B' }}"]):
        copy = shutil.copytree(family.experts[i], tmp_path / f"m{i}")
        (copy / "chat_template.jinja").write_text(template)
        models.append(copy)
    text = "merge_method: linear\nmodels:\n" + "".join(f"  - model: {m}\n" for m in models)
    out = merge_streaming(MergeRecipe.from_yaml(text + "chat_template: auto\n"), tmp_path / "auto")
    assert (out / "chat_template.jinja").read_text() == "{{ 'B' }}"
    inline = merge_streaming(
        MergeRecipe.from_yaml(text + "chat_template: \"{{ 'C' }}\"\n"), tmp_path / "inline"
    )
    assert (inline / "chat_template.jinja").read_text() == "{{ 'C' }}"
    kept = merge_streaming(MergeRecipe.from_yaml(text), tmp_path / "kept")
    assert (
        kept / "chat_template.jinja"
    ).read_text() == "{{ 'A' }}"  # the tokenizer source's (the first model)


def test_tokenizer_source_union_key(family: Family) -> None:
    assert MergeRecipe.from_yaml(_linear(family, "tokenizer: {source: union}\n")).tokenizer_source == "union"


def test_tokenizer_source_key(tmp_path: Path, family: Family) -> None:
    source = shutil.copytree(family.experts[1], tmp_path / "marked")
    (source / "chat_template.jinja").write_text("{{ 'marked' }}")
    recipe = MergeRecipe.from_yaml(_linear(family, f"tokenizer: {{source: {source}}}\n"))
    assert recipe.tokenizer_source == str(source)
    out = merge_streaming(recipe, tmp_path / "out")
    assert (out / "chat_template.jinja").read_text() == "{{ 'marked' }}"
