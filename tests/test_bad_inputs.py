"""Bad inputs to ``evomerge merge``: each gives one clear line and exit code 2 (or a named warning), and
never leaves a partial output behind."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from conftest_merging_helpers import entries, save_llama_family
from safetensors.torch import load_file, save_file

from evomerge.checkpoints import ModelDir
from evomerge.cli import main


@pytest.fixture(scope="module")
def family(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Path]]:
    _, base, experts = save_llama_family(tmp_path_factory.mktemp("bad-inputs"))
    return base, experts


def run(args: list[Any]) -> int:
    try:
        main([str(a) for a in args])
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else 1
    return 0


def one_error_line(err: str, *fragments: str) -> str:
    lines = [line for line in err.strip().splitlines() if not line.startswith("warning:")]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    assert lines[0].startswith("error: "), lines[0]
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


def recipe_file(tmp: Path, base: Path, experts: list[Path], **extra: Any) -> Path:
    data: dict[str, Any] = {
        "merge_method": "ties",
        "base_model": str(base),
        "models": [{"model": str(e), "parameters": {"weight": 0.5, "density": 0.6}} for e in experts],
        "dtype": "float32",
        **extra,
    }
    path = tmp / "recipe.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def copy_expert(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def read_all(path: Path) -> dict[str, torch.Tensor]:
    with ModelDir(path) as md:
        return {n: md.read(n) for n in md.tensor_names()}


def merge_fails(
    capsys: pytest.CaptureFixture[str], tmp: Path, recipe: Path, *fragments: str, flags: tuple[str, ...] = ()
) -> str:
    before = entries(tmp)
    assert run(["merge", recipe, "--output", tmp / "out", *flags]) == 2
    line = one_error_line(capsys.readouterr().err, *fragments)
    assert entries(tmp) == before, "a partial output or temporary directory was left behind"
    return line


def test_corrupt_safetensors_header(
    tmp_path: Path, family: tuple[Path, list[Path]], capsys: pytest.CaptureFixture[str]
) -> None:
    base, experts = family
    bad = copy_expert(experts[0], tmp_path / "bad")
    (bad / "model.safetensors").write_bytes(b"\xff\x00\x00\x00\x00\x00\x00\x00{not json")
    merge_fails(
        capsys, tmp_path, recipe_file(tmp_path, base, [bad, experts[1]]), "corrupt safetensors", "bad"
    )


def test_truncated_shard(
    tmp_path: Path, family: tuple[Path, list[Path]], capsys: pytest.CaptureFixture[str]
) -> None:
    base, experts = family
    bad = copy_expert(experts[0], tmp_path / "bad")
    data = (bad / "model.safetensors").read_bytes()
    (bad / "model.safetensors").write_bytes(data[: len(data) - 1000])
    merge_fails(capsys, tmp_path, recipe_file(tmp_path, base, [bad, experts[1]]), "bad/model.safetensors")


def test_missing_tensor_listed_in_index(
    tmp_path: Path, family: tuple[Path, list[Path]], capsys: pytest.CaptureFixture[str]
) -> None:
    base, experts = family
    bad = tmp_path / "bad"
    bad.mkdir()
    tensors = load_file(str(experts[0] / "model.safetensors"))
    shutil.copy(experts[0] / "config.json", bad / "config.json")
    names = sorted(tensors)
    save_file({n: tensors[n] for n in names[1:]}, str(bad / "model-00001-of-00001.safetensors"))
    index = {"metadata": {}, "weight_map": dict.fromkeys(names, "model-00001-of-00001.safetensors")}
    (bad / "model.safetensors.index.json").write_text(json.dumps(index))
    line = merge_fails(capsys, tmp_path, recipe_file(tmp_path, base, [bad, experts[1]]), "index names tensor")
    assert names[0] in line


def test_nan_in_expert_warns_and_strict_fails(
    tmp_path: Path, family: tuple[Path, list[Path]], capsys: pytest.CaptureFixture[str]
) -> None:
    base, experts = family
    bad = copy_expert(experts[0], tmp_path / "bad")
    tensors = load_file(str(bad / "model.safetensors"))
    name = "model.layers.1.mlp.up_proj.weight"
    tensors[name][0, :3] = torch.tensor([float("nan"), float("inf"), -float("inf")])
    save_file(tensors, str(bad / "model.safetensors"), metadata={"format": "pt"})
    recipe = recipe_file(tmp_path, base, [bad, experts[1]])

    assert run(["merge", recipe, "--output", tmp_path / "out"]) == 0
    err = capsys.readouterr().err
    warnings = [line for line in err.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and name in warnings[0] and "3 NaN/Inf" in warnings[0], err
    assert (tmp_path / "out" / "config.json").is_file()
    shutil.rmtree(tmp_path / "out")

    merge_fails(capsys, tmp_path, recipe, name, "NaN/Inf", "--strict", flags=("--strict",))


def test_experts_of_different_architectures(
    tmp_path: Path, family: tuple[Path, list[Path]], capsys: pytest.CaptureFixture[str]
) -> None:
    base, experts = family
    bad = copy_expert(experts[0], tmp_path / "bad")
    config = json.loads((bad / "config.json").read_text())
    config["architectures"] = ["Qwen2ForCausalLM"]
    config["model_type"] = "qwen2"
    (bad / "config.json").write_text(json.dumps(config))
    merge_fails(
        capsys, tmp_path, recipe_file(tmp_path, base, [bad, experts[1]]), "different architectures", "Qwen2"
    )


@pytest.mark.parametrize("rows", [96, 104])
def test_vocab_sizes_differ_merge_shared_rows(
    tmp_path: Path, family: tuple[Path, list[Path]], capsys: pytest.CaptureFixture[str], rows: int
) -> None:
    base, experts = family
    other = copy_expert(experts[0], tmp_path / "other")
    tensors = load_file(str(other / "model.safetensors"))
    vocab = ("model.embed_tokens.weight", "lm_head.weight")
    for name in vocab:
        t = tensors[name]
        tensors[name] = (
            t[:rows] if rows < t.shape[0] else torch.cat([t, torch.randn(rows - t.shape[0], t.shape[1])])
        )
    save_file(tensors, str(other / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((other / "config.json").read_text())
    config["vocab_size"] = rows
    (other / "config.json").write_text(json.dumps(config))
    recipe = recipe_file(tmp_path, base, [other, experts[1]], merge_method="task_arithmetic")
    data = yaml.safe_load(recipe.read_text())
    for m in data["models"]:
        m["parameters"] = {"weight": 0.5}
    recipe.write_text(yaml.safe_dump(data))

    assert run(["merge", recipe, "--output", tmp_path / "out"]) == 0
    err = capsys.readouterr().err
    warnings = [line for line in err.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 2 and all("vocabulary sizes differ" in w for w in warnings), err
    merged, b, x0, x1 = (read_all(p) for p in (tmp_path / "out", base, other, experts[1]))
    shared = min(rows, 100)
    for name in vocab:
        assert merged[name].shape == b[name].shape  # the base's vocabulary, like its tokenizer
        expect = b[name][:shared] + 0.5 * (x0[name][:shared] - b[name][:shared])
        expect = expect + 0.5 * (x1[name][:shared] - b[name][:shared])
        torch.testing.assert_close(merged[name][:shared], expect)
        assert torch.equal(merged[name][shared:], b[name][shared:])
    name = "model.layers.0.mlp.up_proj.weight"
    torch.testing.assert_close(
        merged[name], b[name] + 0.5 * (x0[name] - b[name]) + 0.5 * (x1[name] - b[name])
    )


def test_pickle_only_refused_unless_allowed(
    tmp_path: Path, family: tuple[Path, list[Path]], capsys: pytest.CaptureFixture[str]
) -> None:
    base, experts = family
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    shutil.copy(experts[0] / "config.json", pickled / "config.json")
    torch.save(load_file(str(experts[0] / "model.safetensors")), pickled / "pytorch_model.bin")
    recipe = recipe_file(tmp_path, base, [pickled, experts[1]])
    merge_fails(capsys, tmp_path, recipe, "pickle", "--allow-pickle")

    assert run(["merge", recipe, "--output", tmp_path / "out", "--allow-pickle"]) == 0
    assert "weights_only=True" in capsys.readouterr().err
    reference = recipe_file(tmp_path, base, [experts[0], experts[1]])
    assert run(["merge", reference, "--output", tmp_path / "ref"]) == 0
    ours, theirs = read_all(tmp_path / "out"), read_all(tmp_path / "ref")
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[n], theirs[n]) for n in ours)


def test_unsafe_pickle_is_refused_even_when_allowed(
    tmp_path: Path, family: tuple[Path, list[Path]], capsys: pytest.CaptureFixture[str]
) -> None:
    base, experts = family
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    shutil.copy(experts[0] / "config.json", pickled / "config.json")
    torch.save({"model.norm.weight": torch.ones(4), "evil": Path("x")}, pickled / "pytorch_model.bin")
    recipe = recipe_file(tmp_path, base, [pickled, experts[1]])
    merge_fails(capsys, tmp_path, recipe, "cannot load pickle weights safely", flags=("--allow-pickle",))


@pytest.mark.skipif(sys.platform != "linux", reason="uses RLIMIT_FSIZE")
def test_disk_full_during_write_leaves_nothing(tmp_path: Path, family: tuple[Path, list[Path]]) -> None:
    """A real failing write: the merge runs with a file-size limit (writes past it fail with EFBIG, as a
    full disk fails with ENOSPC)."""
    base, experts = family
    recipe = recipe_file(tmp_path, base, experts)
    out_parent = tmp_path / "outputs"
    out_parent.mkdir()
    script = textwrap.dedent(
        """
        import resource, sys
        resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000))
        from evomerge.cli import main
        main(sys.argv[1:])
        """
    )
    proc = subprocess.run(
        [sys.executable, "-c", script, "merge", str(recipe), "--output", str(out_parent / "out")],
        capture_output=True,
        text=True,
        env={**os.environ, "EVOMERGE_DEBUG": ""},
        timeout=300,
    )
    assert proc.returncode == 2, proc.stderr
    line = one_error_line(proc.stderr, "cannot write", "File too large", "nothing was left behind")
    assert str(out_parent / "out") in line
    assert entries(out_parent) == []
