"""Tests of the ``evomerge`` command line: user errors (exit 2, one line, no traceback, no partial
output) and the happy paths of merge, eval, search, export and zoo build."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import optuna
import pytest
import torch
import yaml
from conftest import copy_model_with, run_cli, siblings_named_like
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from evomerge.checkpoints import ModelDir
from evomerge.evaluators import HFBackend, evaluate
from evomerge.merging import InMemoryMerger, MergeRecipe
from evomerge.optimizer import best_trial, trial_recipe
from evomerge.zoo import Zoo

TASKS = ["arith", "code", "logic"]


run = run_cli


def assert_one_error_line(err: str, *fragments: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "Traceback" not in err
    line = lines[0]
    assert line.startswith("error: "), line
    for fragment in fragments:
        assert fragment in line, (fragment, line)
    return line


def write_recipe(path: Path, data: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(data))
    return path


def ties_recipe(zoo: Zoo, **changes: Any) -> dict[str, Any]:
    data: dict[str, Any] = {
        "merge_method": "ties",
        "base_model": zoo.base,
        "models": [
            {"model": zoo.experts["arith"], "parameters": {"weight": [0.3, 0.9], "density": 0.5}},
            {"model": zoo.experts["code"], "parameters": {"weight": 0.6, "density": 0.8}},
        ],
        "dtype": "float32",
    }
    data.update(changes)
    return data


def one_expert(zoo: Zoo, model: str, **params: Any) -> dict[str, Any]:
    return ties_recipe(zoo, models=[{"model": model, "parameters": params}])


def pickle_only(tmp: Path, zoo: Zoo) -> str:
    d = tmp / "pickled"
    d.mkdir()
    shutil.copy(Path(zoo.base) / "config.json", d)
    torch.save(load_file(str(Path(zoo.base) / "model.safetensors")), d / "pytorch_model.bin")
    return str(d)


def edited_expert(tmp: Path, zoo: Zoo, edit: Callable[[dict[str, torch.Tensor]], None]) -> str:
    def apply(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        edit(state)
        return state

    return str(copy_model_with(zoo.experts["logic"], tmp / "edited", apply))


UP = "model.layers.1.mlp.up_proj.weight"

# name -> (recipe builder, fragments the error line must contain)
BAD_RECIPES: dict[str, tuple[Callable[[Path, Zoo], dict[str, Any]], tuple[str, ...]]] = {
    "unknown method": (lambda t, z: ties_recipe(z, merge_method="frobnicate"), ("frobnicate", "ties")),
    "unknown parameter": (
        lambda t, z: one_expert(z, z.experts["arith"], wieght=1.0),
        ("models[0].parameters.wieght", "unknown parameter"),
    ),
    "density above 1": (lambda t, z: one_expert(z, z.experts["arith"], density=1.5), ("density", "(0, 1]")),
    "density 0": (lambda t, z: one_expert(z, z.experts["arith"], density=0.0), ("density", "(0, 1]")),
    "missing model": (
        lambda t, z: one_expert(z, str(t / "no-such-model")),
        ("does not exist", "no-such-model"),
    ),
    "missing base": (
        lambda t, z: ties_recipe(z, base_model=str(t / "no-base")),
        ("does not exist", "no-base"),
    ),
    "pickle weights only": (lambda t, z: one_expert(z, pickle_only(t, z)), ("pickle", "pytorch_model.bin")),
    "tensor shape differs": (
        lambda t, z: one_expert(z, edited_expert(t, z, lambda s: s.__setitem__(UP, s[UP][:-1].clone()))),
        (UP, "shape", "edited"),
    ),
    "tensor missing": (
        lambda t, z: one_expert(z, edited_expert(t, z, lambda s: s.pop(UP))),
        (UP, "lacks", "edited"),
    ),
    "extra tensor": (
        lambda t, z: one_expert(
            z, edited_expert(t, z, lambda s: s.__setitem__("model.extra.weight", torch.ones(2)))
        ),
        ("model.extra.weight", "edited"),
    ),
}


# ------------------------------------------------------------------------------------ user errors
@pytest.mark.parametrize("case", list(BAD_RECIPES))
def test_merge_user_errors(case: str, home: Zoo, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    build, fragments = BAD_RECIPES[case]
    recipe = write_recipe(tmp_path / "recipe.yaml", build(tmp_path, home))
    out = tmp_path / "merged"
    assert run(["merge", recipe, "-o", out]) == 2
    captured = capsys.readouterr()
    assert_one_error_line(captured.err, *fragments)
    assert not out.exists()
    assert siblings_named_like(out) == []


def test_merge_refuses_existing_output(home: Zoo, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    recipe = write_recipe(tmp_path / "recipe.yaml", ties_recipe(home))
    out = tmp_path / "merged"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert run(["merge", recipe, "-o", out]) == 2
    assert_one_error_line(capsys.readouterr().err, str(out), "--overwrite")
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    assert siblings_named_like(out) == ["merged"]


@pytest.mark.parametrize("name", ["r[/x].yaml", "r[red]x.yaml"])
def test_error_messages_are_printed_verbatim(
    name: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Paths are user text: square brackets in them must not be read as console markup.
    missing = tmp_path / name
    assert run(["merge", missing, "-o", tmp_path / "out"]) == 2
    assert_one_error_line(capsys.readouterr().err, str(missing))


def test_eval_missing_model(home: Zoo, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run(["eval", tmp_path / "nope", "--tasks", "micro"]) == 2
    assert_one_error_line(capsys.readouterr().err, "does not exist", str(tmp_path / "nope"))


def test_eval_pickle_only_model(home: Zoo, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run(["eval", pickle_only(tmp_path, home), "--tasks", "micro"]) == 2
    assert_one_error_line(capsys.readouterr().err, "pickle")


def test_eval_checks_the_model_before_building_a_zoo(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # A typo in the model path must be reported at once, not after training a zoo for the tasks.
    monkeypatch.setenv("EVOMERGE_HOME", str(tmp_path / "home"))
    assert run(["eval", tmp_path / "nope", "--tasks", "micro"]) == 2
    assert not (tmp_path / "home").exists()
    assert_one_error_line(capsys.readouterr().err, "does not exist")


def test_eval_bad_split(home: Zoo, capsys: pytest.CaptureFixture[str]) -> None:
    assert run(["eval", home.base, "--tasks", "micro", "--split", "train"]) == 2
    assert_one_error_line(capsys.readouterr().err, "--split", "train")


def test_search_bad_sweep_yaml(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    runs = tmp_path / "runs"
    cfg = tmp_path / "sweep.yaml"
    cfg.write_text(yaml.safe_dump({"study_name": "s", "zoo": "micro", "runs_dir": str(runs), "n_trails": 3}))
    assert run(["search", cfg]) == 2
    assert_one_error_line(capsys.readouterr().err, str(cfg), "n_trails")
    assert not runs.exists()


def test_search_missing_sweep_yaml(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run(["search", tmp_path / "nope.yaml"]) == 2
    assert_one_error_line(capsys.readouterr().err, "nope.yaml", "does not exist")


def test_search_with_a_missing_model(tmp_path: Path, home: Zoo, capsys: pytest.CaptureFixture[str]) -> None:
    runs = tmp_path / "runs"
    cfg = tmp_path / "sweep.yaml"
    cfg.write_text(
        yaml.safe_dump(
            {
                "study_name": "s",
                "runs_dir": str(runs),
                "models": {"base": home.base, "experts": ["missing-expert"]},
                "tasks": [t.model_dump(mode="json") for t in home.tasks],
            }
        )
    )
    assert run(["search", cfg]) == 2
    assert_one_error_line(capsys.readouterr().err, str(tmp_path / "missing-expert"), "does not exist")
    assert not runs.exists()


def test_search_with_a_task_without_dev(
    tmp_path: Path, home: Zoo, capsys: pytest.CaptureFixture[str]
) -> None:
    tasks = [t.model_dump(mode="json") for t in home.tasks]
    tasks[1]["data_files"] = {"test": tasks[1]["data_files"]["test"]}
    cfg = tmp_path / "sweep.yaml"
    cfg.write_text(
        yaml.safe_dump(
            {
                "study_name": "s",
                "runs_dir": str(tmp_path / "runs"),
                "models": {"base": home.base, "experts": list(home.experts.values())},
                "tasks": tasks,
            }
        )
    )
    assert run(["search", cfg]) == 2
    assert_one_error_line(capsys.readouterr().err, "tasks[1]", tasks[1]["name"], "no 'dev' data file")
    assert not (tmp_path / "runs").exists()


def test_search_with_vllm_backend_but_no_vllm(
    tmp_path: Path, home: Zoo, capsys: pytest.CaptureFixture[str]
) -> None:
    try:
        import vllm  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("vllm is installed in this environment")
    cfg = tmp_path / "sweep.yaml"
    cfg.write_text(
        yaml.safe_dump(
            {
                "study_name": "s",
                "runs_dir": str(tmp_path / "runs"),
                "zoo": "micro",
                "backend": {"kind": "vllm"},
                "n_trials": 1,
            }
        )
    )
    assert run(["search", cfg]) == 2
    assert_one_error_line(capsys.readouterr().err, "backend vllm", "not installed")


def test_export_of_a_directory_without_a_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run(["export", tmp_path]) == 2
    assert_one_error_line(capsys.readouterr().err, "sweep.json")
    assert list(tmp_path.iterdir()) == []


def evomerge_command() -> list[str]:
    script = Path(sys.executable).parent / "evomerge"
    return [str(script)] if script.is_file() else [sys.executable, "-m", "evomerge.cli"]


def test_installed_command_reports_user_errors(home: Zoo, tmp_path: Path, evomerge_home: Path) -> None:
    env = {**os.environ, "EVOMERGE_HOME": str(evomerge_home), "OMP_NUM_THREADS": "1"}
    recipe = write_recipe(tmp_path / "recipe.yaml", ties_recipe(home, merge_method="frobnicate"))
    out = tmp_path / "merged"
    proc = subprocess.run(
        [*evomerge_command(), "merge", str(recipe), "-o", str(out)], capture_output=True, text=True, env=env
    )
    assert proc.returncode == 2
    assert_one_error_line(proc.stderr, "frobnicate")
    assert not out.exists()

    out.mkdir()
    recipe = write_recipe(tmp_path / "recipe.yaml", ties_recipe(home))
    proc = subprocess.run(
        [*evomerge_command(), "merge", str(recipe), "-o", str(out)], capture_output=True, text=True, env=env
    )
    assert proc.returncode == 2
    assert_one_error_line(proc.stderr, "exists")
    assert list(out.iterdir()) == []


# ------------------------------------------------------------------------------------ happy paths
def assert_model_equals_merge(model_dir: Path, recipe: MergeRecipe, zoo: Zoo) -> None:
    expected = InMemoryMerger(zoo.base, list(zoo.experts.values())).merge(recipe)
    with ModelDir(model_dir) as md:
        assert sorted(md.tensor_names()) == sorted(expected)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    state = model.state_dict()
    assert set(state) == set(expected)
    for name, tensor in expected.items():
        assert torch.equal(state[name], tensor), name


def test_merge_writes_a_loadable_model(home: Zoo, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    recipe_path = write_recipe(tmp_path / "recipe.yaml", ties_recipe(home))
    out = tmp_path / "merged"
    assert run(["merge", recipe_path, "-o", out, "--shard-size", "200KB"]) == 0
    assert "merged model written to" in capsys.readouterr().out
    recipe = MergeRecipe.from_yaml(recipe_path)
    assert_model_equals_merge(out, recipe, home)
    assert len(list(out.glob("model-*.safetensors"))) > 1  # --shard-size took effect
    assert (out / "tokenizer.json").read_bytes() == (Path(home.base) / "tokenizer.json").read_bytes()

    # --overwrite replaces it with another merge
    other = write_recipe(tmp_path / "other.yaml", ties_recipe(home, parameters={"lambda": 0.5}))
    assert run(["merge", other, "-o", out]) == 2
    capsys.readouterr()
    assert run(["merge", other, "-o", out, "--overwrite"]) == 0
    assert_model_equals_merge(out, MergeRecipe.from_yaml(other), home)
    assert siblings_named_like(out) == ["merged"]


def parse_score_rows(text: str) -> dict[str, tuple[float, int]]:
    rows = {}
    for line in text.splitlines():
        m = re.search(r"\b(arith|code|logic|mini)\W+([01]\.\d{3})\W+(\d+)", line)
        if m:
            rows[m.group(1)] = (float(m.group(2)), int(m.group(3)))
    return rows


@pytest.mark.parametrize("split", ["dev", "test"])
def test_eval_prints_scores(split: str, home: Zoo, capsys: pytest.CaptureFixture[str]) -> None:
    model = home.experts["code"]
    assert run(["eval", model, "--tasks", "micro", "--split", split]) == 0
    rows = parse_score_rows(capsys.readouterr().out)
    result = evaluate(HFBackend.from_pretrained(model), home.tasks, split, home.root)  # type: ignore[arg-type]
    size = home.config.dev_size if split == "dev" else home.config.test_size
    # the table prints scores with 3 decimals: half a unit of the last printed digit
    assert rows == {name: (pytest.approx(r.score, abs=5e-4), size) for name, r in result.tasks.items()}


def test_eval_with_a_tasks_yaml(home: Zoo, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    lines = (Path(home.root) / "data" / "arith.dev.jsonl").read_text().splitlines()[:7]
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "mini.jsonl").write_text("\n".join(lines) + "\n")
    tasks = tmp_path / "tasks.yaml"
    tasks.write_text(
        yaml.safe_dump([{"name": "mini", "data_files": {"dev": "data/mini.jsonl"}, "max_new_tokens": 6}])
    )
    assert run(["eval", home.experts["arith"], "--tasks", tasks]) == 0
    rows = parse_score_rows(capsys.readouterr().out)
    assert list(rows) == ["mini"]
    assert rows["mini"][1] == 7


def test_search_then_export(home: Zoo, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    runs = tmp_path / "runs"
    cfg = tmp_path / "sweep.yaml"
    cfg.write_text(
        yaml.safe_dump(
            {
                "study_name": "cli-sweep",
                "zoo": "micro",
                "runs_dir": str(runs),
                "n_trials": 5,
                "sampler": {"name": "random", "seed": 1},
                "search_space": {"method": "ties", "granularity": "global"},
            }
        )
    )
    assert run(["search", cfg, "--n-trials", "3"]) == 0
    out = capsys.readouterr().out
    run_dir = runs / "cli-sweep"
    for name in ("study.db", "sweep.json", "best_recipe.yaml", "report.md", "results.json", "best_model"):
        assert (run_dir / name).exists(), name
    study = optuna.load_study(study_name="cli-sweep", storage=f"sqlite:///{run_dir / 'study.db'}")
    assert len(study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))) == 3  # --n-trials won
    best = best_trial(study)
    recipe = trial_recipe(best)
    assert recipe.base_model == home.base
    assert MergeRecipe.from_yaml(run_dir / "best_recipe.yaml") == recipe
    assert_model_equals_merge(run_dir / "best_model", recipe, home)
    report = (run_dir / "report.md").read_text()
    assert "## Held-out test split" in report
    assert f"| searched (trial {best.number}) |" in report
    assert "Held-out test split" in out

    for name in ("history.png", "pareto.png", "heatmap.png"):  # the plots, linked from report.md
        assert (run_dir / name).stat().st_size > 10_000 and f"]({name})" in report

    exported = tmp_path / "exported.yaml"
    assert run(["export", run_dir, "-o", exported]) == 0
    out = capsys.readouterr().out
    assert f"trial {best.number}" in out
    assert MergeRecipe.from_yaml(exported) == recipe
    # export scores the recipe on the held-out test split, next to the base
    results = json.loads((run_dir / "results.json").read_text())
    searched_test = next(r for r in results["test"] if r["name"].startswith("searched"))
    assert "Held-out test split" in out and f"{searched_test['mean']:.3f}" in out

    # `evomerge report` rewrites the report of a finished run (no search)
    for name in ("report.md", "history.png", "pareto.png", "heatmap.png"):
        (run_dir / name).unlink()
    assert run(["report", run_dir]) == 0
    assert f"{searched_test['mean']:.3f}" in capsys.readouterr().out
    for name in ("report.md", "history.png", "pareto.png", "heatmap.png"):
        assert (run_dir / name).exists(), name
    assert len(study.get_trials()) == len(
        optuna.load_study(study_name="cli-sweep", storage=f"sqlite:///{run_dir / 'study.db'}").get_trials()
    )

    capsys.readouterr()
    assert run(["export", run_dir, "-o", exported]) == 2
    assert_one_error_line(capsys.readouterr().err, "exists", "--overwrite")

    other = next(t for t in study.trials if t.number != best.number)
    model_dir = tmp_path / "exported-model"
    args = [
        "export",
        run_dir,
        "-o",
        exported,
        "--trial",
        other.number,
        "--materialize",
        model_dir,
        "--overwrite",
    ]
    assert run(args) == 0
    assert MergeRecipe.from_yaml(exported) == trial_recipe(other)
    assert_model_equals_merge(model_dir, trial_recipe(other), home)

    # --format mergekit: a configuration mergekit reads, merging the same tensors
    mk_file = tmp_path / "mergekit.yaml"
    assert run(["export", run_dir, "-o", mk_file, "--format", "mergekit"]) == 0
    mk = yaml.safe_load(mk_file.read_text())
    assert mk["dtype"] == "float32" and "seed" not in mk and mk["merge_method"] == recipe.merge_method
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    run_merge(MergeConfiguration.model_validate(mk), str(tmp_path / "mk-out"), options=MergeOptions())
    theirs = load_file(str(next((tmp_path / "mk-out").glob("*.safetensors"))))
    ours = InMemoryMerger(home.base, list(home.experts.values())).merge(recipe)
    for name, tensor in ours.items():
        eps = torch.finfo(torch.float32).eps  # float32 on both sides, another order of operations
        torch.testing.assert_close(tensor.float(), theirs[name].float(), rtol=100 * eps, atol=10 * eps)
    capsys.readouterr()
    assert run(["export", run_dir, "-o", mk_file, "--overwrite", "--format", "safetensors"]) == 2
    assert_one_error_line(capsys.readouterr().err, "--format")

    capsys.readouterr()
    assert run(["export", run_dir, "--trial", 42]) == 2
    assert_one_error_line(capsys.readouterr().err, "no trial 42")
    assert not (run_dir / "exported_recipe.yaml").exists()


def test_zoo_build_reports_the_cached_zoo(
    home: Zoo, zoo_cache: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run(["zoo", "build", "--preset", "micro", "--cache-dir", zoo_cache]) == 0
    out = capsys.readouterr().out
    assert "cached" in out
    assert Path(home.root).name in out.replace("\n", "")


def test_search_with_a_fusion_stage(home: Zoo, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The sweep's fusion: section distils the zoo's heterogeneous expert into the best model."""
    runs = tmp_path / "runs"
    cfg = tmp_path / "sweep.yaml"
    cfg.write_text(
        yaml.safe_dump(
            {
                "study_name": "cli-fusion",
                "zoo": "micro",
                "runs_dir": str(runs),
                "n_trials": 2,
                "sampler": {"name": "random", "seed": 0},
                "search_space": {
                    "method": "task_arithmetic",
                    "params": [{"name": "weight", "low": 0, "high": 1}],
                    "granularity": "global",
                },
                "fusion": {
                    "sources": ["zoo:hetero", "pivot"],
                    "data": "zoo:hetero",
                    "max_pairs": 64,
                    "template": "Q: {instruction}\nA:",
                    "response_format": " {response}\n",
                    "distill": {"epochs": 1, "batch_size": 16},
                },
            }
        )
    )
    assert run(["search", cfg]) == 0
    out = capsys.readouterr().out
    run_dir = runs / "cli-fusion"
    assert "Fusion: held-out test split" in out
    result = json.loads((run_dir / "fusion.json").read_text())
    rows = {name: scores for name, scores, _ in result["test"]}
    assert set(rows) >= {"pivot (best merge)", "unified"}
    source_row = next(name for name in rows if name.startswith("source"))
    assert rows[source_row]["sort"] >= 0.9 and rows["pivot (best merge)"]["sort"] <= 0.1  # the source's task
    assert set(rows["unified"]) == {"arith", "code", "logic", "sort"}
    assert (run_dir / "fusion" / "unified" / "config.json").exists() and (run_dir / "fusion.md").exists()


def test_search_then_polish(home: Zoo, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    runs = tmp_path / "runs"
    cfg = tmp_path / "sweep.yaml"
    cfg.write_text(
        yaml.safe_dump(
            {
                "study_name": "cli-polish",
                "zoo": "micro",
                "runs_dir": str(runs),
                "n_trials": 3,
                "sampler": {"name": "random", "seed": 1},
                "seed_recipes": [],
                "search_space": {
                    "method": "task_arithmetic",
                    "params": [{"name": "weight", "low": 0.0, "high": 1.5}],
                    "granularity": "layer",
                    "split_attn_mlp": True,
                },
            }
        )
    )
    assert run(["search", cfg]) == 0
    run_dir = runs / "cli-polish"
    capsys.readouterr()
    assert run(["polish", run_dir, "--steps", "4", "--eval-every", "2"]) == 0
    out = capsys.readouterr().out
    polished = run_dir / "polish"
    for name in ("recipe.yaml", "mergekit.yaml", "polish.json", "report.md"):
        assert (polished / name).is_file(), name
    summary = json.loads((polished / "polish.json").read_text())
    assert [h["step"] for h in summary["history"]] == [0, 1, 2, 3, 4]
    # the start row is the sweep's pick, scored on the same test questions as the search's report
    results = json.loads((run_dir / "results.json").read_text())
    searched = next(r for r in results["test"] if r["name"].startswith("searched"))
    start_label = next(iter(summary["test"]))
    assert start_label == searched["name"]
    assert summary["test"][start_label]["mean"] == pytest.approx(searched["mean"], abs=1e-12)
    recipe = MergeRecipe.from_yaml(polished / "recipe.yaml")
    assert recipe.merge_method == "task_arithmetic" and recipe.parameters["lambda"] == 1.0
    assert "searched + polished" in (polished / "report.md").read_text() and "written to" in out
    # a second run does not overwrite silently; a bad objective is a usage error; nothing is left behind
    assert run(["polish", run_dir, "--steps", "1"]) == 2
    assert_one_error_line(capsys.readouterr().err, "exists")
    assert run(["polish", run_dir, "--objective", "mse", "-o", tmp_path / "p2"]) == 2
    assert_one_error_line(capsys.readouterr().err, "--objective")
    assert not (tmp_path / "p2").exists()
    assert sorted(p.name for p in run_dir.iterdir() if p.name.startswith(".")) == []


def test_search_with_a_polish_stage(home: Zoo, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    runs = tmp_path / "runs"
    cfg = tmp_path / "sweep.yaml"
    sweep = {
        "study_name": "cli-stage",
        "zoo": "micro",
        "runs_dir": str(runs),
        "n_trials": 2,
        "sampler": {"name": "random", "seed": 1},
        "seed_recipes": [],
        "search_space": {
            "method": "task_arithmetic",
            "params": [{"name": "weight", "low": 0.0, "high": 1.5}],
            "granularity": "layer",
        },
        "polish": {"steps": 2, "eval_every": 1, "starts": ["uniform"]},
    }
    cfg.write_text(yaml.safe_dump(sweep))
    assert run(["search", cfg]) == 0
    out = capsys.readouterr().out
    results = json.loads((runs / "cli-stage" / "results.json").read_text())
    stage = results["polish"]
    (polished,) = stage["runs"]
    assert f"polish: {polished['label']}: dev " in out and "polish: unpolished pick val" in out
    result = stage["chosen"] or stage["pick"]
    assert (
        results["verdict_line"].startswith("verdict on test (") and f"): {result} " in results["verdict_line"]
    )
    assert "verdict on test (" in out
    # a stage the sweep cannot run is a usage error before anything is written
    sweep.update(study_name="cli-stage-bad", pick=None)
    cfg.write_text(yaml.safe_dump(sweep))
    assert run(["search", cfg]) == 2
    assert_one_error_line(capsys.readouterr().err, "polish", "needs pick")
    assert not (runs / "cli-stage-bad").exists()
