"""Tests for evomerge.checkpoints: reading model directories, the layer map and the atomic writer."""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest_merging_helpers import TOKENIZER_STUBS, entries, save_llama_family, write_model
from safetensors import safe_open
from safetensors.torch import load_file

from evomerge.checkpoints import (
    ModelDir,
    ModelWriter,
    TensorInfo,
    layer_index,
    layer_position,
    shard_file_name,
    tensor_group,
)
from evomerge.errors import CheckpointError, OutputExistsError, UserError


def _tensors() -> dict[str, torch.Tensor]:
    return {
        "model.embed_tokens.weight": torch.arange(12, dtype=torch.float32).reshape(4, 3),
        "model.layers.0.self_attn.q_proj.weight": torch.full((3, 3), 0.5, dtype=torch.bfloat16),
        "model.layers.1.mlp.up_proj.weight": -torch.ones(2, 3),
        "model.norm.weight": torch.tensor([1.0, 2.0, 3.0]),
        "model.position_ids": torch.arange(5, dtype=torch.int64),
    }


# ---------------------------------------------------------------------------------------- reading
def test_single_file_reading(tmp_path: Path) -> None:
    tensors = _tensors()
    path = write_model(tmp_path / "m", tensors, config={"num_hidden_layers": 7, "dtype": "bfloat16"})
    with ModelDir(path) as md:
        assert md.path == path
        assert md.config["num_hidden_layers"] == 7
        assert md.num_layers == 7
        assert md.torch_dtype == torch.bfloat16
        assert sorted(md.tensor_names()) == sorted(tensors)
        assert md.tensor_names() == md.tensor_names()  # stable
        assert len(md) == 5 and "model.norm.weight" in md and "nope" not in md
        infos = md.infos()
        assert list(infos) == md.tensor_names()
        assert infos["model.layers.0.self_attn.q_proj.weight"] == TensorInfo(
            name="model.layers.0.self_attn.q_proj.weight",
            shape=(3, 3),
            dtype="BF16",
            file="model.safetensors",
        )
        assert infos["model.position_ids"].dtype == "I64"
        assert not infos["model.position_ids"].is_float
        assert infos["model.embed_tokens.weight"].numel == 12
        for name, expected in tensors.items():
            got = md.read(name)
            assert got.dtype == expected.dtype
            assert torch.equal(got, expected)


def test_tensor_names_follow_storage_order(tmp_path: Path) -> None:
    tensors = _tensors()
    path = write_model(tmp_path / "m", tensors)
    raw = (path / "model.safetensors").read_bytes()
    (header_len,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + header_len])
    header.pop("__metadata__")
    by_offset = sorted(header, key=lambda n: header[n]["data_offsets"][0])
    with ModelDir(path) as md:
        assert md.tensor_names() == by_offset


def test_config_absent_and_layers_inferred(tmp_path: Path) -> None:
    path = write_model(tmp_path / "m", _tensors())
    with ModelDir(path) as md:
        assert md.config == {}
        assert md.num_layers == 2  # layers 0 and 1 appear in the names
        assert md.torch_dtype is None
        assert not md.has_tokenizer


def test_sharded_reading(tmp_path: Path) -> None:
    tensors = _tensors()
    names = list(tensors)
    path = write_model(tmp_path / "m", tensors, shards=[names[:2], names[2:]])
    with ModelDir(path) as md:
        assert set(md.tensor_names()[:2]) == set(names[:2])  # file by file
        assert set(md.tensor_names()) == set(names)
        infos = md.infos()
        assert infos[names[0]].file == "model-00001-of-00002.safetensors"
        assert infos[names[4]].file == "model-00002-of-00002.safetensors"
        for name, expected in tensors.items():
            assert torch.equal(md.read(name), expected)
        assert sorted(md.files) == ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]


class _NoDataHandle:
    """Wraps a safe_open handle and refuses to load tensor data."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner

    def get_slice(self, name: str) -> Any:
        return self.inner.get_slice(name)

    def get_tensor(self, name: str) -> torch.Tensor:
        raise AssertionError(f"infos() loaded tensor data for {name}")

    def __exit__(self, *args: object) -> None:
        self.inner.__exit__(*args)


def test_infos_do_not_load_tensor_data(tmp_path: Path) -> None:
    path = write_model(tmp_path / "m", _tensors())
    md = ModelDir(path)
    md._handles = {f: _NoDataHandle(h) for f, h in md._handles.items()}
    infos = md.infos()
    assert infos["model.layers.1.mlp.up_proj.weight"].shape == (2, 3)
    assert infos["model.layers.1.mlp.up_proj.weight"].dtype == "F32"
    # reads go through pread on the file, not the safetensors handle, and return owned memory
    reference = load_file(str(path / "model.safetensors"))
    for name, tensor in reference.items():
        got = md.read(name)
        assert torch.equal(got, tensor) and got.dtype == tensor.dtype
        got.add_(1)  # owned: writing to it changes nothing on disk or in later reads
        assert torch.equal(md.read(name), tensor)
    md.close()


def test_read_errors(tmp_path: Path) -> None:
    path = write_model(tmp_path / "m", _tensors())
    md = ModelDir(path)
    with pytest.raises(CheckpointError, match="no tensor named 'missing'"):
        md.read("missing")
    md.close()
    with pytest.raises(CheckpointError, match="closed"):
        md.read("model.norm.weight")


# ---------------------------------------------------------------------------------------- bad inputs
def _message(exc: pytest.ExceptionInfo[BaseException]) -> str:
    text = str(exc.value)
    assert "\n" not in text
    assert isinstance(exc.value, UserError)
    return text


def test_missing_path(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError) as exc:
        ModelDir(tmp_path / "nope")
    assert "does not exist" in _message(exc) and "nope" in _message(exc)


def test_path_is_a_file(tmp_path: Path) -> None:
    f = tmp_path / "file.safetensors"
    f.write_text("x")
    with pytest.raises(CheckpointError) as exc:
        ModelDir(f)
    assert "not a directory" in _message(exc)


def test_no_weights(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError) as exc:
        ModelDir(tmp_path / "empty")
    assert "no safetensors" in _message(exc)


def test_only_pickle_weights(tmp_path: Path) -> None:
    d = tmp_path / "pickled"
    d.mkdir()
    (d / "pytorch_model.bin").write_bytes(b"\x80\x02}q\x00.")
    with pytest.raises(CheckpointError) as exc:
        ModelDir(d)
    msg = _message(exc)
    assert "pytorch_model.bin" in msg and "refused unless you allow pickle" in msg


def test_shards_without_index(tmp_path: Path) -> None:
    tensors = _tensors()
    path = write_model(tmp_path / "m", tensors, shards=[list(tensors)])
    (path / "model.safetensors.index.json").unlink()
    with pytest.raises(CheckpointError) as exc:
        ModelDir(path)
    assert "model.safetensors.index.json" in _message(exc)


def test_index_lists_missing_file(tmp_path: Path) -> None:
    tensors = _tensors()
    names = list(tensors)
    path = write_model(tmp_path / "m", tensors, shards=[names[:2], names[2:]])
    (path / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError) as exc:
        ModelDir(path)
    msg = _message(exc)
    assert "model-00002-of-00002.safetensors" in msg and "missing" in msg


def test_index_names_tensor_missing_from_shard(tmp_path: Path) -> None:
    tensors = _tensors()
    names = list(tensors)
    path = write_model(tmp_path / "m", tensors, shards=[names[:2], names[2:]])
    index = json.loads((path / "model.safetensors.index.json").read_text())
    index["weight_map"]["model.layers.9.ghost.weight"] = "model-00001-of-00002.safetensors"
    (path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError) as exc:
        ModelDir(path)
    msg = _message(exc)
    assert "model.layers.9.ghost.weight" in msg and "model-00001-of-00002.safetensors" in msg


def test_corrupt_index(tmp_path: Path) -> None:
    path = write_model(tmp_path / "m", _tensors(), shards=[list(_tensors())])
    (path / "model.safetensors.index.json").write_text("{not json")
    with pytest.raises(CheckpointError) as exc:
        ModelDir(path)
    assert "index" in _message(exc)


@pytest.mark.parametrize(
    "payload",
    [
        b"\x01",  # too short for the header length
        struct.pack("<Q", 16) + b"{not json}      ",
        struct.pack("<Q", 10**9) + b"{}",  # header length beyond the file
    ],
)
def test_corrupt_header(tmp_path: Path, payload: bytes) -> None:
    d = tmp_path / "corrupt"
    d.mkdir()
    (d / "model.safetensors").write_bytes(payload)
    with pytest.raises(CheckpointError) as exc:
        ModelDir(d)
    msg = _message(exc)
    assert "corrupt" in msg and "model.safetensors" in msg


def test_corrupt_config(tmp_path: Path) -> None:
    path = write_model(tmp_path / "m", _tensors())
    (path / "config.json").write_text("[1, 2")
    with pytest.raises(CheckpointError) as exc:
        ModelDir(path)
    assert "config.json" in _message(exc)


# ---------------------------------------------------------------------------------------- layer map
@pytest.mark.parametrize(
    ("name", "index", "group"),
    [
        # Llama / Mistral
        ("model.layers.0.self_attn.q_proj.weight", 0, "self_attn"),
        ("model.layers.12.mlp.gate_proj.weight", 12, "mlp"),
        ("model.layers.3.input_layernorm.weight", 3, "norm"),
        ("model.layers.3.post_attention_layernorm.weight", 3, "norm"),
        ("model.embed_tokens.weight", None, "embed"),
        ("model.norm.weight", None, "norm"),
        ("lm_head.weight", None, "lm_head"),
        # Qwen2 (attention biases) / Qwen3 (q_norm inside attention)
        ("model.layers.5.self_attn.k_proj.bias", 5, "self_attn"),
        ("model.layers.5.self_attn.q_norm.weight", 5, "self_attn"),
        # Gemma (extra norms; multimodal wrapper)
        ("model.layers.2.pre_feedforward_layernorm.weight", 2, "norm"),
        ("model.language_model.layers.7.mlp.down_proj.weight", 7, "mlp"),
        ("model.language_model.embed_tokens.weight", None, "embed"),
        # GPT-2 style
        ("transformer.h.4.attn.c_attn.weight", 4, "self_attn"),
        ("transformer.h.4.mlp.c_fc.weight", 4, "mlp"),
        ("transformer.h.4.ln_1.weight", 4, "norm"),
        ("transformer.wte.weight", None, "embed"),
        ("transformer.ln_f.weight", None, "norm"),
        ("model.rotary_emb.inv_freq", None, "other"),
    ],
)
def test_layer_map(name: str, index: int | None, group: str) -> None:
    assert layer_index(name) == index
    assert tensor_group(name) == group


def test_layer_position() -> None:
    assert layer_position("model.layers.0.mlp.up_proj.weight", 5) == 0.0
    assert layer_position("model.layers.1.mlp.up_proj.weight", 5) == 0.25
    assert layer_position("model.language_model.layers.3.self_attn.o_proj.weight", 5) == 0.75
    assert layer_position("transformer.h.4.attn.c_proj.weight", 5) == 1.0
    assert layer_position("model.layers.0.mlp.up_proj.weight", 1) == 1.0  # mergekit: t = 1 for one layer
    assert layer_position("model.embed_tokens.weight", 5) == 0.0
    assert layer_position("transformer.wte.weight", 5) == 0.0
    assert layer_position("model.norm.weight", 5) == 0.0  # mergekit evaluates post-layer weights at t = 0
    assert layer_position("lm_head.weight", 5) == 0.0
    assert layer_position("model.layers.9.mlp.up_proj.weight", 5) == 1.0  # clamped


# ---------------------------------------------------------------------------------------- writer
@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, Path]:
    root = tmp_path_factory.mktemp("llama")
    base, base_dir, _ = save_llama_family(root, num_experts=0)
    return base, base_dir


def test_writer_shards_and_loads_with_transformers(tmp_path: Path, llama: tuple[Any, Path]) -> None:
    import transformers

    model, src = llama
    max_bytes = 40_000
    out = tmp_path / "written"
    with ModelDir(src) as md, ModelWriter(out, max_shard_bytes=max_bytes) as writer:
        sizes = {}
        for name in md.tensor_names():
            t = md.read(name)
            sizes[name] = t.numel() * t.element_size()
            writer.add(name, t)
        result = writer.finalize(md.config, dtype=torch.float32, tokenizer_source=src, model_card="# card")
    assert result == out.absolute()
    assert entries(tmp_path) == ["written"]

    index = json.loads((out / "model.safetensors.index.json").read_text())
    files = sorted({f for f in index["weight_map"].values()})
    count = len(files)
    assert count > 2
    assert files == [shard_file_name(i + 1, count) for i in range(count)]
    assert set(index["weight_map"]) == set(sizes)
    assert index["metadata"]["total_size"] == sum(sizes.values())
    for file in files:
        with safe_open(str(out / file), framework="pt") as f:
            assert f.metadata() == {"format": "pt"}
            keys = list(f.keys())
            assert all(index["weight_map"][k] == file for k in keys)
            shard_bytes = sum(sizes[k] for k in keys)
            assert shard_bytes <= max_bytes or len(keys) == 1

    config = json.loads((out / "config.json").read_text())
    assert config["dtype"] == "float32"
    for name, text in TOKENIZER_STUBS.items():
        assert (out / name).read_text() == text
    assert (out / "generation_config.json").is_file()
    assert (out / "README.md").read_text() == "# card\n"

    loaded = transformers.AutoModelForCausalLM.from_pretrained(out)
    ids = torch.tensor([[1, 5, 9, 3]])
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)


def test_writer_updates_dtype_and_single_shard(tmp_path: Path) -> None:
    out = tmp_path / "o"
    with ModelWriter(out) as writer:
        writer.add("a", torch.ones(3, dtype=torch.bfloat16))
        writer.add("b", torch.zeros(2, 2, dtype=torch.bfloat16)[:, 0])  # a strided view
        writer.finalize(
            {"torch_dtype": "float32"}, dtype=torch.bfloat16, tokenizer_source=None, model_card="c"
        )
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"
    assert sorted(p.name for p in out.glob("*.safetensors")) == ["model-00001-of-00001.safetensors"]
    with ModelDir(out) as md:
        assert torch.equal(md.read("b"), torch.zeros(2, dtype=torch.bfloat16))
        assert md.infos()["a"].dtype == "BF16"


def test_writer_exception_leaves_nothing(tmp_path: Path) -> None:
    out = tmp_path / "out"
    with pytest.raises(RuntimeError, match="boom"), ModelWriter(out, max_shard_bytes=16) as writer:
        writer.add("a", torch.ones(8))
        writer.add("b", torch.ones(8))
        assert writer.num_shards_written == 2
        assert writer.temp_dir is not None and writer.temp_dir.name.startswith(".out.tmp-")
        raise RuntimeError("boom")
    assert entries(tmp_path) == []


def test_writer_failed_finalize_leaves_nothing(tmp_path: Path) -> None:
    out = tmp_path / "out"
    with pytest.raises(CheckpointError, match="tokenizer source"), ModelWriter(out) as writer:
        writer.add("a", torch.ones(8))
        writer.finalize({}, dtype=torch.float32, tokenizer_source=tmp_path / "missing", model_card="")
    assert entries(tmp_path) == []


def test_writer_without_finalize_leaves_nothing(tmp_path: Path) -> None:
    with ModelWriter(tmp_path / "out") as writer:
        writer.add("a", torch.ones(8))
    assert entries(tmp_path) == []


def test_writer_output_exists(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("old")
    with pytest.raises(OutputExistsError) as exc:
        ModelWriter(out)
    assert "already exists" in _message(exc) and str(out) in _message(exc)
    assert entries(tmp_path) == ["out"]
    assert (out / "keep.txt").read_text() == "old"


def test_writer_overwrite_replaces_only_at_the_end(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("old")
    # a failing overwrite keeps the old directory untouched
    with pytest.raises(RuntimeError), ModelWriter(out, overwrite=True) as writer:
        writer.add("a", torch.ones(2))
        raise RuntimeError("fail")
    assert (out / "keep.txt").read_text() == "old"
    assert entries(tmp_path) == ["out"]
    with ModelWriter(out, overwrite=True) as writer:
        writer.add("a", torch.ones(2))
        writer.finalize({}, dtype=torch.float32, tokenizer_source=None, model_card="new")
    assert not (out / "keep.txt").exists()
    assert (out / "README.md").read_text() == "new\n"
    assert entries(tmp_path) == ["out"]


def test_writer_rejects_bad_use(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="max_shard_bytes"):
        ModelWriter(tmp_path / "x", max_shard_bytes=0)
    with ModelWriter(tmp_path / "x") as writer:
        writer.add("a", torch.ones(1))
        with pytest.raises(ValueError, match="already added"):
            writer.add("a", torch.ones(1))
    with pytest.raises(CheckpointError, match="no tensors"), ModelWriter(tmp_path / "y") as writer:
        writer.finalize({}, dtype=torch.float32, tokenizer_source=None, model_card="")
    assert entries(tmp_path) == []
