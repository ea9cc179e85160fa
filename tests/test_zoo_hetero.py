"""Tests of evomerge.zoo.hetero: the heterogeneous (GPT-2, Metaspace tokenizer, ``sort``) expert."""

from __future__ import annotations

import json
import random
import re
import time
from pathlib import Path

import pytest
from conftest import siblings_named_like
from pydantic import ValidationError
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from evomerge.evaluators import HFBackend, evaluate, load_split
from evomerge.evaluators.tasks import Split
from evomerge.zoo import TASK_FAMILIES, Zoo
from evomerge.zoo.build import PROMPT
from evomerge.zoo.hetero import (
    FAMILY,
    HETERO_PRESETS,
    HeteroConfig,
    HeteroExpert,
    build_hetero,
    find_hetero,
    gen_sort,
    generate_examples,
    hetero_dir,
    read_fusion,
)
from evomerge.zoo.tasks import generate

# A build of a few steps: for determinism and interruption (the scores mean nothing).
PICO = HeteroConfig(
    name="pico", n_train=60, n_dev=8, n_test=8, dev_size=4, test_size=4, steps=3, batch_size=8
)


@pytest.fixture(scope="module")
def built(micro_zoo: Zoo) -> tuple[HeteroExpert, float, int]:
    """The micro hetero expert next to the micro zoo: (manifest, CPU seconds, progress calls)."""
    calls = 0

    def progress(_msg: str, _done: int, _total: int) -> None:
        nonlocal calls
        calls += 1

    t0 = time.process_time()  # CPU time of this process: other jobs on the machine do not count
    # force: other test modules (fusion, CLI) may have built it into the session cache already
    hetero = build_hetero(micro_zoo, progress=progress, force=True)
    return hetero, time.process_time() - t0, calls


@pytest.fixture(scope="module")
def hetero(built: tuple[HeteroExpert, float, int]) -> HeteroExpert:
    return built[0]


# ------------------------------------------------------------------------------------- the family
def solve_sort(question: str) -> str:
    m = re.fullmatch(r"Sort the letters: ([a-h](?: [a-h]){2,4})", question)
    assert m, question
    letters = m.group(1).split(" ")
    assert len(set(letters)) == len(letters), question
    return " ".join(sorted(letters))


def test_sort_family_is_new_seeded_and_correct() -> None:
    assert FAMILY == "sort" and FAMILY not in TASK_FAMILIES
    exs = generate_examples(FAMILY, 300, seed=5)
    assert exs == generate_examples(FAMILY, 300, seed=5)
    assert exs != generate_examples(FAMILY, 300, seed=6)
    assert len({q for q, _ in exs}) == 300
    for q, a in exs:
        assert a == solve_sort(q)
    assert {len(a.split()) for _, a in exs} == {3, 4, 5}
    q, a = gen_sort(random.Random(0))
    assert a == solve_sort(q)
    # excluded questions never come back; the zoo's families go to the zoo's generator unchanged
    held = {q for q, _ in exs[:100]}
    assert not held & {q for q, _ in generate_examples(FAMILY, 200, seed=7, exclude=held)}
    assert generate_examples("arith", 20, seed=1) == generate("arith", 20, seed=1)


# ------------------------------------------------------------------------------------- the build
def test_builds_next_to_the_micro_zoo(
    built: tuple[HeteroExpert, float, int], micro_zoo: Zoo, zoo_cache: Path
) -> None:
    hetero, seconds, calls = built
    assert hetero.config == HETERO_PRESETS["micro"]
    assert hetero.zoo_digest == micro_zoo.config.digest()
    root = Path(hetero.root)
    assert root.parent == zoo_cache and root == hetero_dir(micro_zoo, hetero.config)
    assert root.name.startswith("hetero-micro-")
    assert (root / "hetero.json").is_file()
    assert (Path(hetero.model) / "model.safetensors").is_file()
    assert (Path(hetero.tokenizer) / "tokenizer.json").is_file()
    for path in [*hetero.data_files.values(), *hetero.fusion_files.values()]:
        assert Path(path).is_file()
    assert seconds < 30 and calls == hetero.config.steps
    assert siblings_named_like(root) == [root.name]  # no temporary directory left behind
    # the manifest's measured scores: an expert on the new family, the zoo base is not
    scores = hetero.scores
    assert set(scores["expert"]["test"]) == {FAMILY, *micro_zoo.config.families}
    assert scores["expert"]["test"][FAMILY] >= 0.9
    assert scores["zoo_base"]["test"][FAMILY] <= 0.1


def test_cache_hit_does_not_retrain(hetero: HeteroExpert, micro_zoo: Zoo) -> None:
    weights = Path(hetero.model) / "model.safetensors"
    mtime = weights.stat().st_mtime_ns

    def progress(_msg: str, _done: int, _total: int) -> None:
        raise AssertionError("a cached build must not train")

    again = build_hetero(Path(micro_zoo.root), progress=progress)  # a zoo directory works as well
    assert again == hetero
    assert weights.stat().st_mtime_ns == mtime
    assert find_hetero(micro_zoo) == hetero
    assert find_hetero(micro_zoo, "tiny") is None


def test_tokenizer_differs_from_the_zoos(hetero: HeteroExpert, micro_zoo: Zoo) -> None:
    tok = AutoTokenizer.from_pretrained(hetero.model)
    own = AutoTokenizer.from_pretrained(hetero.tokenizer)
    zoo_tok = AutoTokenizer.from_pretrained(micro_zoo.base)
    assert own.get_vocab() == tok.get_vocab()
    assert len(tok) != len(zoo_tok) and len(tok) <= hetero.config.vocab_size
    spec = json.loads((Path(hetero.tokenizer) / "tokenizer.json").read_text())
    pre = json.dumps(spec["pre_tokenizer"])
    assert "Metaspace" in pre and "Digits" in pre
    assert "Metaspace" not in json.dumps(
        json.loads((Path(micro_zoo.base) / "tokenizer.json").read_text())["pre_tokenizer"]
    )
    text = PROMPT.format(question="Ana has 12 pens. Gets 3. How many now?") + " 15"
    pieces = tok.tokenize(text)
    assert pieces[0].startswith("\u2581") and sum(p.startswith("\u2581") for p in pieces) >= 8
    assert not any(p.startswith("\u0120") for p in pieces)  # no byte-level "Ġ"
    assert "1" in pieces and "2" in pieces and "12" not in pieces and "\u258112" not in pieces
    ids = tok(text).input_ids
    assert ids[0] == tok.bos_token_id and tok.unk_token_id not in ids
    assert tok.decode(ids, skip_special_tokens=True) == text
    assert tok.padding_side == "left" and tok.pad_token == "<pad>" and tok.eos_token == "</s>"
    # the prompt encodes to a prefix of prompt + answer (what answer-only training assumes)
    for q, a in generate_examples(FAMILY, 20, seed=0) + generate("code", 20, seed=0):
        prompt = tok(PROMPT.format(question=q)).input_ids
        full = tok(PROMPT.format(question=q) + f" {a}\n").input_ids
        assert full[: len(prompt)] == prompt and tok.unk_token_id not in full


def test_architecture_is_gpt2_and_loads_with_auto_classes(hetero: HeteroExpert, micro_zoo: Zoo) -> None:
    assert AutoConfig.from_pretrained(hetero.model).model_type == "gpt2"
    assert AutoConfig.from_pretrained(micro_zoo.base).model_type == "llama"
    model = AutoModelForCausalLM.from_pretrained(hetero.model)
    assert type(model).__name__ == "GPT2LMHeadModel"
    cfg = model.config
    assert (cfg.n_embd, cfg.n_layer, cfg.n_head) == (64, 3, 2)
    assert cfg.vocab_size == len(AutoTokenizer.from_pretrained(hetero.model))


def test_expert_beats_the_zoo_on_the_new_family(hetero: HeteroExpert, micro_zoo: Zoo) -> None:
    """Measured on micro: expert 1.00, zoo base 0.00, each zoo expert 0.00 (40 test questions)."""
    (task,) = hetero.tasks
    assert task.name == FAMILY and task.kind == "exact_match" and task.prompt_template == PROMPT
    assert len(load_split(task, "test", hetero.root)) == hetero.config.test_size

    def score(path: str) -> float:
        return evaluate(HFBackend.from_pretrained(path), [task], "test", hetero.root).scores[FAMILY]

    expert = score(hetero.model)
    base = score(micro_zoo.base)
    assert expert >= 0.9, expert
    assert base <= 0.1, base
    assert expert - base >= 0.8
    for path in micro_zoo.experts.values():
        assert score(path) <= 0.1
    assert hetero.scores["expert"]["test"][FAMILY] == pytest.approx(expert, abs=1e-4)
    assert hetero.scores["zoo_base"]["test"][FAMILY] == pytest.approx(base, abs=1e-4)


def test_fusion_data(hetero: HeteroExpert, micro_zoo: Zoo) -> None:
    families = {FAMILY, *micro_zoo.config.families}
    splits = {s: read_fusion(p) for s, p in hetero.fusion_files.items()}
    assert set(splits) == {"train", "dev", "test"}
    for split, rows in splits.items():
        assert rows, split
        for row in rows:
            assert set(row) == {"id", "instruction", "response"}
            assert all(isinstance(v, str) and v for v in row.values())
        assert len({r["id"] for r in rows}) == len(rows)
        assert {r["id"].rsplit("-", 1)[0] for r in rows} == families
        for row in rows:
            if row["id"].startswith(f"{FAMILY}-"):
                assert row["response"] == solve_sort(row["instruction"])
    instructions = {s: {r["instruction"] for r in rows} for s, rows in splits.items()}
    assert not instructions["train"] & instructions["test"]
    assert not instructions["train"] & instructions["dev"]
    assert not instructions["dev"] & instructions["test"]
    # dev/test hold exactly the task files' questions: the zoo's and the new family's
    held_out: tuple[Split, Split] = ("dev", "test")
    for split in held_out:
        expected: set[str] = set()
        for task in (*micro_zoo.tasks, *hetero.tasks):
            path = Path(task.data_files[split])
            expected |= {json.loads(line)["question"] for line in path.read_text().splitlines()}
        assert instructions[split] == expected
    # no zoo test question (and no new-family test question) is in the expert's training data
    train_file = Path(hetero.data_files["train"]).read_text().splitlines()
    sort_train = {json.loads(line)["question"] for line in train_file}
    assert len(sort_train) == hetero.config.n_train and not sort_train & instructions["test"]


def test_config_validation_and_presets(micro_zoo: Zoo) -> None:
    with pytest.raises(ValidationError, match="head_dim"):
        HeteroConfig(n_embd=64, n_head=4)
    with pytest.raises(ValidationError, match="dev_size"):
        HeteroConfig(n_dev=10)
    with pytest.raises(ValidationError):
        HeteroConfig(family="reverse")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="unknown hetero preset"):
        find_hetero(micro_zoo, "huge")
    assert HETERO_PRESETS["tiny"].digest("a") != HETERO_PRESETS["micro"].digest("a")
    assert HETERO_PRESETS["tiny"].digest("a") != HETERO_PRESETS["tiny"].digest("b")


def test_deterministic_and_interrupted_builds_leave_nothing(micro_zoo: Zoo, tmp_path: Path) -> None:
    a = build_hetero(micro_zoo, tmp_path / "a", config=PICO)
    b = build_hetero(micro_zoo, tmp_path / "b", config=PICO)
    for rel in ("model/model.safetensors", "tokenizer/tokenizer.json", "fusion/train.jsonl"):
        assert (Path(a.root) / rel).read_bytes() == (Path(b.root) / rel).read_bytes(), rel

    def interrupt(_msg: str, done: int, _total: int) -> None:
        if done == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        build_hetero(micro_zoo, tmp_path / "c", config=PICO, progress=interrupt)
    assert list((tmp_path / "c").iterdir()) == []
