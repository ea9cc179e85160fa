"""Tests of evomerge.zoo: task generators, data splits, tokenizer, saved models and the build cache."""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import NANO
from pydantic import ValidationError
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from evomerge.evaluators import load_split
from evomerge.evaluators.tasks import resolve_path
from evomerge.zoo import PRESETS, TASK_FAMILIES, Zoo, ZooConfig, build_zoo, default_cache_dir, find_zoo
from evomerge.zoo.build import PROMPT, ZooGateError, zoo_dir
from evomerge.zoo.gates import ZooGates, failures, task_vector_stats
from evomerge.zoo.tasks import generate

FAMILIES = sorted(TASK_FAMILIES)


# ------------------------------------------------------------------------------- independent solvers
def solve_arith(question: str) -> str:
    m = re.fullmatch(r"[A-Z][a-z]+ has (\d) [a-z]+\. (\w+) (\d)\. (\w+) (\d)\. How many now\?", question)
    assert m, question
    total = int(m.group(1))
    for verb, k in ((m.group(2), int(m.group(3))), (m.group(4), int(m.group(5)))):
        if verb in ("Gives", "Loses", "Sells"):
            assert k <= total, f"{question}: loses more than it has"
            total -= k
        else:
            assert verb in ("Gets", "Finds", "Buys"), question
            total += k
    return str(total)


_CODE_BUILTINS = {"print": print, "len": len, "max": max, "min": min, "sum": sum, "sorted": sorted}


def solve_code(question: str) -> str:
    assert re.fullmatch(r"x = \[\d(,\d){2,4}\]; print\([a-z\[\]()0-9.\-]+\)", question), question
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(question, {"__builtins__": _CODE_BUILTINS})
    return out.getvalue().strip()


_SUPERLATIVES = {
    "tallest": ("taller", "first"),
    "shortest": ("taller", "last"),
    "oldest": ("older", "first"),
    "youngest": ("older", "last"),
    "fastest": ("faster", "first"),
    "slowest": ("faster", "last"),
}


def _solve_ordering(question: str) -> str | None:
    """``A is taller than B. B is taller than C. Who is shortest?`` -> ``C``."""
    m = re.fullmatch(r"(\w+) is (\w+) than (\w+)\. (\w+) is (\w+) than (\w+)\. Who is (\w+)\?", question)
    if not m:
        return None
    x1, adj1, y1, x2, adj2, y2, asked = m.groups()
    adjective, end = _SUPERLATIVES[asked]
    assert adj1 == adj2 == adjective, question
    people = {x1, y1, x2, y2}
    assert len(people) == 3, question
    lefts, rights = {x1, x2}, {y1, y2}
    tops, bottoms = lefts - rights, rights - lefts  # a chain a > b > c: a only left, c only right
    assert len(tops) == len(bottoms) == 1, f"not a chain: {question}"
    top, bottom = tops.pop(), bottoms.pop()
    return top if end == "first" else bottom


def _solve_boolean(question: str) -> str | None:
    """``q=T, r=F, s=T. not r and s; not r and r?`` -> ``T F`` (evaluated with Python booleans)."""
    if not re.fullmatch(r"(\w=[TF], ){2}\w=[TF]\. [a-z ]+; [a-z ]+\?", question):
        return None
    assign, rest = question.split(". ", 1)
    env = {}
    for item in assign.split(", "):
        name, value = item.split("=")
        env[name] = value == "T"
    values = [eval(e, {"__builtins__": {}}, env) for e in rest.removesuffix("?").split("; ")]
    return " ".join("T" if v else "F" for v in values)


def solve_logic(question: str) -> str:
    for solver in (_solve_ordering, _solve_boolean):
        answer = solver(question)
        if answer is not None:
            return answer
    raise AssertionError(f"unrecognised logic question: {question!r}")


def solve_arith1(question: str) -> str:
    m = re.fullmatch(r"[A-Z][a-z]+ has (\d) [a-z]+\. (\w+) (\d)\. How many now\?", question)
    assert m, question
    total, verb, k = int(m.group(1)), m.group(2), int(m.group(3))
    if verb in ("Gives", "Loses", "Sells"):
        assert k <= total, question
        return str(total - k)
    assert verb in ("Gets", "Finds", "Buys"), question
    return str(total + k)


def solve_code1(question: str) -> str:
    assert re.fullmatch(r"x = \[\d(,\d){2,4}\]; print\((len\(x\)|x\[0\]|x\[1\]|x\[-1\])\)", question), (
        question
    )
    return solve_code(question)


def solve_logic1(question: str) -> str:
    m = re.fullmatch(r"(\w+) is (\w+) than (\w+)\. Who is (\w+)\?", question)
    if m:
        x, adj, y, asked = m.groups()
        adjective, end = _SUPERLATIVES[asked]
        assert adj == adjective and x != y, question
        return x if end == "first" else y
    # two comparisons in chain order: the first name is the top
    m = re.fullmatch(r"(\w+) is (\w+) than (\w+)\. (\w+) is (\w+) than (\w+)\. Who is \w+\?", question)
    assert m and m.group(3) == m.group(4), question
    answer = solve_logic(question)
    assert answer in (m.group(1), m.group(6)), question
    return answer


def solve_order(question: str) -> str:
    m = re.fullmatch(r"(\w+) is (\w+) than (\w+)\. (\w+) is (\w+) than (\w+)\. Who is \w+\?", question)
    assert m and m.group(1) == m.group(6), f"not against the chain: {question}"
    return solve_logic(question)


def _solve_story(question: str, n_events: int | None, lookups_only: bool) -> str:
    """``x = [..]; NAME has EXPR ITEM. EVENTS How many now?``: the expression's value, then the events."""
    m = re.fullmatch(
        r"(x = \[\d(?:,\d){2,4}\]); [A-Z][a-z]+ has (\S+) [a-z]+\. (.*) How many now\?", question
    )
    assert m, question
    lst, expr, events = m.groups()
    if lookups_only:
        assert expr in ("len(x)", "x[0]", "x[1]", "x[-1]"), question
    total = int(solve_code(f"{lst}; print({expr})"))
    found = re.findall(r"(\w+) (\d)\.", events)
    assert len(found) == n_events if n_events is not None else len(found) in (1, 2), question
    assert " ".join(f"{v} {k}." for v, k in found) == events, question
    for verb, k in found:
        if verb in ("Gives", "Loses", "Sells"):
            assert int(k) <= total, question
            total -= int(k)
        else:
            assert verb in ("Gets", "Finds", "Buys"), question
            total += int(k)
    return str(total)


SOLVERS = {
    "arith": solve_arith,
    "code": solve_code,
    "logic": solve_logic,
    "arith1": solve_arith1,
    "code1": solve_code1,
    "logic1": solve_logic1,
    "bridge": lambda q: _solve_story(q, 1, lookups_only=True),
    "comp": lambda q: _solve_story(q, None, lookups_only=False),
    "order": solve_order,
}


def read_jsonl(path: Path) -> list[dict[str, str]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# ------------------------------------------------------------------------------- task generators
@pytest.mark.parametrize("family", FAMILIES)
def test_generators_are_deterministic_for_a_seed(family: str) -> None:
    a = generate(family, 60, seed=5)
    assert a == generate(family, 60, seed=5)
    assert a != generate(family, 60, seed=6)
    assert len({q for q, _ in a}) == 60  # distinct questions


@pytest.mark.parametrize("family", FAMILIES)
def test_generators_answer_correctly(family: str) -> None:
    for question, answer in generate(family, 300, seed=11):
        assert SOLVERS[family](question) == answer, question


def test_arith_answers_stay_in_range() -> None:
    answers = {int(a) for _, a in generate("arith", 400, seed=1)}
    assert min(answers) >= 0
    assert max(answers) <= 27


@pytest.mark.parametrize("family", FAMILIES)
def test_generate_honours_exclude(family: str) -> None:
    held = {q for q, _ in generate(family, 30, seed=1)}
    fresh = generate(family, 50, seed=1, exclude=held)
    assert not held & {q for q, _ in fresh}


# ------------------------------------------------------------------------------- config
def test_config_digest_depends_on_every_field() -> None:
    base = PRESETS["micro"]
    assert base.digest() == ZooConfig.model_validate(base.model_dump()).digest()
    for change in ({"seed": 1}, {"base_steps": 61}, {"families": ("arith", "code")}, {"dev_size": 23}):
        other = base.model_copy(update=change)
        assert other.digest() != base.digest(), change
        assert zoo_dir(other, Path("/c")) != zoo_dir(base, Path("/c"))


def test_config_requires_head_dim_of_at_least_32() -> None:
    with pytest.raises(ValidationError, match="head_dim"):
        ZooConfig(hidden_size=64, num_heads=4)
    with pytest.raises(ValidationError, match="hidden_size"):
        ZooConfig(hidden_size=100, num_heads=3)
    assert ZooConfig(hidden_size=128, num_heads=4).hidden_size == 128


def test_config_rejects_unknown_family_and_oversized_subsets() -> None:
    with pytest.raises(ValidationError, match="unknown task family 'poetry'"):
        ZooConfig(families=("arith", "poetry"))
    with pytest.raises(ValidationError, match="dev_size"):
        ZooConfig(n_dev=10, dev_size=11)
    with pytest.raises(ValidationError):
        ZooConfig(unknown_field=1)


def test_config_rejects_duplicate_families() -> None:
    # Two experts for one family would be written to the same directory and give two tasks of the
    # same name (every evaluation then fails with "duplicate task name").
    with pytest.raises(ValidationError):
        ZooConfig(families=("arith", "arith"))


def test_default_cache_dir_follows_evomerge_home(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("EVOMERGE_HOME", str(tmp_path))
    assert default_cache_dir() == tmp_path / "zoo"


# ------------------------------------------------------------------------------- the built micro zoo
def test_manifest_fields(micro_zoo: Zoo, zoo_cache: Path) -> None:
    config = PRESETS["micro"]
    root = Path(micro_zoo.root)
    assert root == zoo_cache / f"micro-{config.digest()}"
    manifest = json.loads((root / "zoo.json").read_text())
    assert manifest["config"] == config.model_dump(mode="json")
    assert manifest["experts"] == {f: f"experts/{f}" for f in config.families}
    assert manifest["build_seconds"] > 0
    assert micro_zoo.config == config
    assert micro_zoo.base == str(root / "base")
    assert micro_zoo.experts == {f: str(root / "experts" / f) for f in config.families}
    assert [t.name for t in micro_zoo.tasks] == list(config.families)
    for task in micro_zoo.tasks:
        assert task.kind == "exact_match"
        assert task.prompt_template == PROMPT
        assert task.dev_size == config.dev_size
        assert task.test_size == config.test_size
        assert task.seed == config.seed
        for split in ("dev", "test"):
            path = resolve_path(task, split, micro_zoo.root)
            assert path == root / "data" / f"{task.name}.{split}.jsonl"
            assert path.is_file()
    assert Zoo.load(root) == micro_zoo
    assert find_zoo(config, zoo_cache) == micro_zoo


def test_split_files_have_the_configured_sizes(micro_zoo: Zoo) -> None:
    config = micro_zoo.config
    data = Path(micro_zoo.root) / "data"
    sizes = {"train": config.n_train, "dev": config.n_dev, "test": config.n_test}
    for family in config.families:
        for split, n in sizes.items():
            rows = read_jsonl(data / f"{family}.{split}.jsonl")
            assert len(rows) == n
            assert len({r["id"] for r in rows}) == n
    for task in micro_zoo.tasks:
        assert len(load_split(task, "dev", micro_zoo.root)) == config.dev_size
        assert len(load_split(task, "test", micro_zoo.root)) == config.test_size


def test_splits_are_disjoint_and_answers_correct(micro_zoo: Zoo) -> None:
    data = Path(micro_zoo.root) / "data"
    for family in micro_zoo.config.families:
        split_rows = {s: read_jsonl(data / f"{family}.{s}.jsonl") for s in ("train", "dev", "test")}
        questions = {s: {r["question"] for r in rows} for s, rows in split_rows.items()}
        assert not questions["dev"] & questions["test"], family
        assert not questions["train"] & questions["test"], family
        assert not questions["train"] & questions["dev"], family
        for rows in split_rows.values():
            for r in rows:
                assert SOLVERS[family](r["question"]) == r["answer"], r


def test_tokenizer_round_trips_zoo_text(micro_zoo: Zoo) -> None:
    tok = AutoTokenizer.from_pretrained(micro_zoo.base)
    data = Path(micro_zoo.root) / "data"
    texts: list[str] = []
    for family in micro_zoo.config.families:
        for split in ("dev", "test"):
            for r in read_jsonl(data / f"{family}.{split}.jsonl"):
                texts.append(PROMPT.format(question=r["question"]))
                texts.append(PROMPT.format(question=r["question"]) + f" {r['answer']}\n")
    for text in texts:
        ids = tok(text).input_ids
        assert ids[0] == tok.bos_token_id
        assert tok.decode(ids, skip_special_tokens=True) == text
    # digits are single tokens, so numbers are spelled digit by digit
    for token in tok.tokenize("x = [9,0,4]; print(sum(x)) 1234 27"):
        assert sum(ch.isdigit() for ch in token) <= 1, token


def test_saved_models_load_with_transformers_and_generate(micro_zoo: Zoo) -> None:
    tok = AutoTokenizer.from_pretrained(micro_zoo.base)
    assert tok.pad_token_id is not None and tok.eos_token_id is not None
    model = AutoModelForCausalLM.from_pretrained(micro_zoo.base).eval()
    cfg = model.config
    assert cfg.num_hidden_layers == micro_zoo.config.num_layers
    assert cfg.hidden_size // cfg.num_attention_heads >= 32
    assert cfg.vocab_size == len(tok)
    prompt = PROMPT.format(question="x = [3,1,2]; print(max(x))")
    enc = tok(prompt, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=4, do_sample=False, pad_token_id=tok.pad_token_id)
    assert out.shape[1] > enc.input_ids.shape[1]
    assert isinstance(tok.decode(out[0, enc.input_ids.shape[1] :], skip_special_tokens=True), str)
    base_state = model.state_dict()
    for path in micro_zoo.experts.values():
        expert = AutoModelForCausalLM.from_pretrained(path)
        state = expert.state_dict()
        assert state.keys() == base_state.keys()
        assert all(state[k].shape == base_state[k].shape for k in state)
        # fine-tuned: the expert differs from the base
        assert any(not torch.equal(state[k], base_state[k]) for k in state)
        assert (Path(path) / "tokenizer.json").read_bytes() == (
            Path(micro_zoo.base) / "tokenizer.json"
        ).read_bytes()


def test_second_build_reuses_the_cached_zoo(micro_zoo: Zoo, zoo_cache: Path) -> None:
    root = Path(micro_zoo.root)
    mtime = (root / "base" / "model.safetensors").stat().st_mtime_ns
    calls: list[int] = []
    again = build_zoo("micro", zoo_cache, progress=lambda label, done, total: calls.append(done))
    assert again == micro_zoo
    assert calls == []  # nothing was trained
    assert (root / "base" / "model.safetensors").stat().st_mtime_ns == mtime
    # one micro zoo (other modules may add their heterogeneous expert next to it)
    assert [p.name for p in zoo_cache.iterdir() if p.name.startswith("micro-")] == [root.name]


def test_zoo_survives_being_moved(micro_zoo: Zoo, tmp_path: Path) -> None:
    # Zoo.load derives base and expert paths from where the zoo is now; task data must follow too,
    # or a moved cache (another EVOMERGE_HOME, a restored CI cache) silently reads the old location.
    moved_root = tmp_path / "elsewhere" / Path(micro_zoo.root).name
    shutil.copytree(micro_zoo.root, moved_root)
    moved = Zoo.load(moved_root)
    assert moved.base == str(moved_root / "base")
    for task in moved.tasks:
        for split in ("dev", "test"):
            path = resolve_path(task, split, moved.root)
            assert path.resolve().is_relative_to(moved_root.resolve()), path


# ------------------------------------------------------------------------------- build mechanics (nano)
def test_build_is_cached_by_config_hash(tmp_path: Path) -> None:
    zoo = build_zoo(NANO, tmp_path)
    assert Path(zoo.root) == tmp_path / f"nano-{NANO.digest()}"
    assert sorted(zoo.experts) == sorted(NANO.families)
    again = build_zoo(NANO, tmp_path)
    assert again == zoo  # same manifest, build_seconds included: nothing was rebuilt
    other_cfg = NANO.model_copy(update={"seed": 1})
    other = build_zoo(other_cfg, tmp_path)
    assert other.root != zoo.root
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [f"nano-{NANO.digest()}", f"nano-{other_cfg.digest()}"]
    )
    # a different seed gives different data
    q0 = read_jsonl(Path(zoo.root) / "data" / "arith.dev.jsonl")
    q1 = read_jsonl(Path(other.root) / "data" / "arith.dev.jsonl")
    assert q0 != q1


def test_build_is_deterministic(tmp_path: Path) -> None:
    a = Path(build_zoo(NANO, tmp_path / "a").root)
    b = Path(build_zoo(NANO, tmp_path / "b").root)
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file() and p.name != "zoo.json")
    assert files == sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file() and p.name != "zoo.json")
    assert Path("base/model.safetensors") in files
    for rel in files:
        assert (a / rel).read_bytes() == (b / rel).read_bytes(), rel


class Interrupt(Exception):
    pass


def _interrupt_after(n: int):  # type: ignore[no-untyped-def]
    seen: list[int] = []

    def progress(label: str, done: int, total: int) -> None:
        seen.append(done)
        assert total == NANO.base_steps + NANO.expert_steps * len(NANO.families)
        if done >= n:
            raise Interrupt(label)

    return progress, seen


@pytest.mark.parametrize("after", [1, 4])  # during the base, during the second expert
def test_interrupted_build_leaves_nothing_behind(tmp_path: Path, after: int) -> None:
    progress, seen = _interrupt_after(after)
    with pytest.raises(Interrupt):
        build_zoo(NANO, tmp_path, progress=progress)
    assert seen == list(range(1, after + 1))
    assert list(tmp_path.iterdir()) == []
    assert find_zoo(NANO, tmp_path) is None


def test_interrupted_forced_rebuild_keeps_the_old_zoo(tmp_path: Path) -> None:
    zoo = build_zoo(NANO, tmp_path)
    progress, _ = _interrupt_after(2)
    with pytest.raises(Interrupt):
        build_zoo(NANO, tmp_path, force=True, progress=progress)
    assert [p.name for p in tmp_path.iterdir()] == [Path(zoo.root).name]
    assert Zoo.load(Path(zoo.root)) == zoo
    assert (Path(zoo.root) / "base" / "model.safetensors").is_file()


def test_resolve_config_reads_a_yaml_file(tmp_path: Path) -> None:
    from evomerge.errors import ConfigError
    from evomerge.zoo import resolve_config

    path = tmp_path / "zoo.yaml"
    path.write_text(json.dumps(NANO.model_dump(mode="json")))  # JSON is YAML
    assert resolve_config(str(path)) == NANO
    assert resolve_config("micro") is PRESETS["micro"]
    with pytest.raises(ConfigError, match="neither a preset"):
        resolve_config(str(tmp_path / "missing.yaml"))
    path.write_text("name: x\nhidden_size: 64\nnum_heads: 4\n")
    with pytest.raises(ConfigError, match=str(path)):
        resolve_config(str(path))


# ------------------------------------------------------------------------------- gates
NANO_FT = NANO.model_copy(
    update={
        "name": "nanoft",
        "families": ("arith", "code"),
        "base_families": ("arith1", "code1", "bridge"),
        "held_out": ("comp",),
    }
)


def _save_state(path: Path, state: dict[str, torch.Tensor]) -> Path:
    path.mkdir(parents=True)
    save_file(state, str(path / "model.safetensors"))
    return path


def test_task_vector_figures_on_known_vectors(tmp_path: Path) -> None:
    ones = {
        "model.layers.0.w": torch.ones(4),
        "model.layers.1.w": torch.ones(4),
        "lm_head.weight": torch.ones(2),
    }
    e0 = torch.tensor([1.0, 0, 0, 0])
    e1 = torch.tensor([0, 1.0, 0, 0])
    base = _save_state(tmp_path / "base", ones)
    a = _save_state(tmp_path / "a", {**ones, "model.layers.0.w": ones["model.layers.0.w"] + e0})
    b = _save_state(tmp_path / "b", {**ones, "model.layers.1.w": ones["model.layers.1.w"] + e1})
    c = _save_state(tmp_path / "c", {**ones, "model.layers.0.w": ones["model.layers.0.w"] - 2 * e0})
    stats = task_vector_stats(base, {"a": a, "b": b, "c": c})
    # |base| = sqrt(4 + 4 + 2); |tau_a| = 1, |tau_c| = 2
    assert stats["norm_ratio"]["a"] == pytest.approx(1 / 10**0.5)
    assert stats["norm_ratio"]["c"] == pytest.approx(2 / 10**0.5)
    assert stats["layer_norm_ratio"]["a"] == pytest.approx({"layer 0": 0.5, "layer 1": 0.0, "lm_head": 0.0})
    assert list(stats["layer_norm_ratio"]["b"]) == ["layer 0", "layer 1", "lm_head"]
    assert stats["cosine"] == pytest.approx({"a/b": 0.0, "a/c": -1.0, "b/c": 0.0})
    assert stats["profile_distance"] == pytest.approx({"a/b": 1.0, "a/c": 0.0, "b/c": 1.0})


def test_gate_failures_name_each_figure() -> None:
    figures = {
        "norm_ratio": {"arith": 0.05, "code": 0.12},
        "cosine": {"arith/code": 0.31},
        "own_gain": {"arith": 0.2, "code": 0.1},
        "other_loss": {"arith": 0.04, "code": 0.0},
    }
    missed = failures(figures, ZooGates())
    assert missed == [
        "task-vector norm ratio of code is 0.120 (gate < 0.1)",
        "task-vector cosine arith/code is 0.310 (gate < 0.3)",
        "expert code gains +0.100 on its own task over the base (gate >= +0.15)",
        "expert arith loses 0.040 on another expert's task (gate <= 0.03)",
    ]
    relaxed = ZooGates(max_norm_ratio=0.2, max_cosine=0.5, min_own_gain=0.1, max_other_loss=0.05)
    assert failures(figures, relaxed) == []


def test_build_writes_scores_and_gate_figures(tmp_path: Path) -> None:
    zoo = build_zoo(NANO_FT, tmp_path)
    root = Path(zoo.root)
    manifest = json.loads((root / "zoo.json").read_text())
    assert [t.name for t in zoo.tasks] == ["arith", "code", "comp"]
    assert sorted(zoo.experts) == ["arith", "code"]
    # the held-out family has dev and test data but nothing trains on it; base-only families train only
    assert not (root / "data" / "comp.train.jsonl").exists()
    assert (root / "data" / "comp.test.jsonl").is_file()
    assert not (root / "data" / "bridge.dev.jsonl").exists()
    assert len(read_jsonl(root / "data" / "bridge.train.jsonl")) == NANO_FT.n_train
    assert set(manifest["scores"]) == {"base", "arith", "code"}
    for per_split in manifest["scores"].values():
        for split in ("dev", "test"):
            assert set(per_split[split]) == {"arith", "code", "comp"}
            assert all(0.0 <= v <= 1.0 for v in per_split[split].values())
    gates = manifest["gates"]
    assert gates["enforced"] is False
    assert set(gates["norm_ratio"]) == {"arith", "code"} and all(r > 0 for r in gates["norm_ratio"].values())
    assert set(gates["cosine"]) == {"arith/code"}
    assert list(gates["layer_norm_ratio"]["arith"]) == [
        "embed",
        "layer 0",
        "layer 1",
        "layer 2",
        "layer 3",
        "norm",
        "lm_head",
    ]
    test = manifest["scores"]
    assert gates["own_gain"]["code"] == pytest.approx(
        test["code"]["test"]["code"] - test["base"]["test"]["code"]
    )
    # the figures are those of the saved models
    again = task_vector_stats(zoo.base, zoo.experts)
    assert again["norm_ratio"] == pytest.approx(gates["norm_ratio"])


def test_a_build_that_misses_its_gates_fails_naming_the_figure(tmp_path: Path) -> None:
    impossible = NANO_FT.model_copy(update={"gates": ZooGates(min_own_gain=1.0)})
    with pytest.raises(ZooGateError, match=r"misses its gates: .*expert arith gains .* \(gate >= \+1\)"):
        build_zoo(impossible, tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_build_is_identical_whatever_the_thread_count(tmp_path: Path) -> None:
    """The same config gives the same bytes and scores with 1 or 2 torch threads and another process's
    OpenMP setting: training runs on ``threads`` (1) whatever the caller set."""
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        a = Path(build_zoo(NANO_FT, tmp_path / "a").root)
    finally:
        torch.set_num_threads(previous)
    assert torch.get_num_threads() == previous
    script = "import sys; from pathlib import Path; from conftest import NANO; from test_zoo import NANO_FT; "
    script += "from evomerge.zoo import build_zoo; build_zoo(NANO_FT, Path(sys.argv[1]))"
    env = {**os.environ, "OMP_NUM_THREADS": "2", "MKL_NUM_THREADS": "2"}
    subprocess.run(
        [sys.executable, "-c", script, str(tmp_path / "b")],
        check=True,
        env=env,
        cwd=Path(__file__).parent,
        capture_output=True,
    )
    b = Path(next((tmp_path / "b").iterdir()))
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file() and p.name != "zoo.json")
    assert files == sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file() and p.name != "zoo.json")
    for rel in files:
        assert (a / rel).read_bytes() == (b / rel).read_bytes(), rel
    ma, mb = (json.loads((d / "zoo.json").read_text()) for d in (a, b))
    assert ma["scores"] == mb["scores"] and ma["gates"] == mb["gates"]


def test_build_is_identical_on_a_cpu_with_other_instruction_sets(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Training runs in a child with CPU-independent kernels (evomerge/zoo/train_worker.py): a build
    whose MKL may use only SSE4.2 (as on an older CPU) and whose caller asked ATen for AVX2 gives the
    same bytes as a build that may use everything this CPU has."""
    a = Path(build_zoo(NANO, tmp_path / "a").root)
    monkeypatch.setenv("MKL_ENABLE_INSTRUCTIONS", "SSE4_2")
    monkeypatch.setenv("ATEN_CPU_CAPABILITY", "avx2")
    b = Path(build_zoo(NANO, tmp_path / "b").root)
    files = sorted(p.relative_to(a) for p in a.rglob("*.safetensors"))
    assert Path("base/model.safetensors") in files
    for rel in files:
        assert (a / rel).read_bytes() == (b / rel).read_bytes(), rel
