"""The vLLM backend on CPU: one live engine, candidates swapped in place.

Runs only where vllm is importable (``scripts/make_vllm_venv.sh``, then
``.venv-vllm/bin/python -m pytest -q tests/vllm_backend``, or ``make test-vllm``); the main suite skips
this module.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
pytest.importorskip("vllm.sampling_params")

import torch

from evomerge.checkpoints import ModelDir
from evomerge.errors import ConfigError, EvaluationError
from evomerge.evaluators import HFBackend, evaluate, load_split
from evomerge.evaluators.tasks import load_fewshot
from evomerge.evaluators.vllm_backend import VLLMBackend
from evomerge.merging import InMemoryMerger, MergeRecipe, merge_streaming
from evomerge.zoo import Zoo

# The micro zoo's model needs about 1 KiB of KV cache per token: 64 MiB is plenty (vLLM's CPU default
# would take half the machine's RAM per engine).
KV_BYTES = 64 << 20


def start(path: str | Path) -> VLLMBackend:
    return VLLMBackend.from_pretrained(path, batch_size=16, kv_cache_memory_bytes=KV_BYTES)


# A fresh engine runs in a process of its own: vLLM allows one engine per process (shutting one down
# tears down process-wide state that the module's live engine still needs).
FRESH = """
import json, sys
from evomerge.evaluators.vllm_backend import VLLMBackend
job = json.loads(sys.stdin.read())
out = {}
for path in job["models"]:
    backend = VLLMBackend.from_pretrained(path, batch_size=16, kv_cache_memory_bytes=job["kv"])
    out[path] = backend.generate(job["prompts"], max_new_tokens=job["max_new_tokens"], stop=[])
    backend.close()
print("RESULT " + json.dumps(out))
"""


def fresh_outputs(models: list[str], prompts: list[str], max_new_tokens: int) -> dict[str, list[str]]:
    """Greedy completions of ``prompts`` by a freshly started engine on each model directory."""
    job = {"models": models, "prompts": prompts, "max_new_tokens": max_new_tokens, "kv": KV_BYTES}
    env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
    proc = subprocess.run(
        [sys.executable, "-c", FRESH],
        input=json.dumps(job),
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stderr[-3000:]
    result: dict[str, list[str]] = json.loads(lines[-1].removeprefix("RESULT "))
    return result


def read_state(path: str | Path) -> dict[str, torch.Tensor]:
    with ModelDir(path) as md:
        return {n: md.read(n).to(torch.float32) for n in md.tensor_names()}


@pytest.fixture(scope="module")
def live(micro_zoo: Zoo) -> Iterator[VLLMBackend]:
    """The one engine of this module, started on the zoo's base model."""
    backend = start(micro_zoo.base)
    yield backend
    backend.close()


@pytest.fixture(scope="module")
def base_state(live: VLLMBackend) -> dict[str, torch.Tensor]:
    return live.state_dict()


@pytest.fixture()
def on_base(live: VLLMBackend, base_state: dict[str, torch.Tensor]) -> Iterator[VLLMBackend]:
    """The live engine, holding the base weights before and after the test."""
    live.load_state_dict(base_state)
    yield live
    live.load_state_dict(base_state)


@pytest.fixture(scope="module")
def prompts(micro_zoo: Zoo) -> list[str]:
    """A few dev questions of every zoo task, as the evaluator prompts them."""
    out: list[str] = []
    for task in micro_zoo.tasks:
        shots = load_fewshot(task, micro_zoo.root)
        out += [task.prompt(ex.question, shots) for ex in load_split(task, "dev", micro_zoo.root)[:4]]
    return out


@pytest.fixture(scope="module")
def recipe(micro_zoo: Zoo) -> MergeRecipe:
    experts = list(micro_zoo.experts.values())
    return MergeRecipe.model_validate(
        {
            "merge_method": "task_arithmetic",
            "base_model": micro_zoo.base,
            "models": [
                {"model": e, "parameters": {"weight": w}}
                for e, w in zip(experts, (0.9, 0.6, 0.8), strict=True)
            ],
        }
    )


def test_one_engine_per_process(live: VLLMBackend, micro_zoo: Zoo) -> None:
    with pytest.raises(ConfigError, match="already runs a vLLM engine"):
        start(micro_zoo.experts["arith"])


def test_state_dict_is_the_checkpoint_in_float32(live: VLLMBackend, micro_zoo: Zoo) -> None:
    state = live.state_dict()
    with ModelDir(micro_zoo.base) as md:
        assert list(state) == md.tensor_names()
        for name, tensor in state.items():
            assert tensor.dtype == torch.float32 and tensor.device.type == "cpu"
            assert torch.equal(tensor, md.read(name).to(torch.float32))


def test_swapped_candidate_equals_a_fresh_engine_and_swapping_back_restores_the_base(
    on_base: VLLMBackend,
    base_state: dict[str, torch.Tensor],
    micro_zoo: Zoo,
    recipe: MergeRecipe,
    prompts: list[str],
    tmp_path: Path,
) -> None:
    live = on_base
    base_out = live.generate(prompts, max_new_tokens=12, stop=[])
    assert len(set(base_out)) > 1  # not a degenerate model

    merger = InMemoryMerger(micro_zoo.base, list(micro_zoo.experts.values()))
    candidate = merger.merge(recipe)
    live.load_state_dict(candidate)
    live_out = live.generate(prompts, max_new_tokens=12, stop=[])
    assert live_out != base_out  # the swap really changed the weights the engine computes with

    # An expert, too: another candidate for the same live engine.
    arith = micro_zoo.experts["arith"]
    live.load_state_dict(read_state(arith))
    live_arith = live.generate(prompts, max_new_tokens=12, stop=[])
    assert live_arith not in (base_out, live_out)

    merged_dir = str(merge_streaming(recipe, tmp_path / "merged"))
    fresh = fresh_outputs([merged_dir, arith], prompts, max_new_tokens=12)
    assert live_out == fresh[merged_dir]
    assert live_arith == fresh[arith]

    live.load_state_dict(base_state)
    assert live.generate(prompts, max_new_tokens=12, stop=[]) == base_out


def test_generation_equals_the_hf_backend(on_base: VLLMBackend, micro_zoo: Zoo, prompts: list[str]) -> None:
    hf = HFBackend.from_pretrained(micro_zoo.base, batch_size=8)
    expected = hf.generate(prompts, max_new_tokens=12, stop=[])
    assert on_base.generate(prompts, max_new_tokens=12, stop=[]) == expected
    expected = hf.generate(prompts, max_new_tokens=12, stop=["\n"])
    assert on_base.generate(prompts, max_new_tokens=12, stop=["\n"]) == expected


def test_stop_strings_cut_completions(on_base: VLLMBackend, prompts: list[str]) -> None:
    full = on_base.generate(prompts, max_new_tokens=12, stop=[])
    # Stop at the first character each completion actually produces after its first one.
    texts = [t for t in full if len(t) > 1]
    assert texts
    stop = sorted({t[1] for t in texts})
    cut = on_base.generate(prompts, max_new_tokens=12, stop=stop)
    for whole, part in zip(full, cut, strict=True):
        assert whole.startswith(part)
        assert not any(s in part for s in stop)
        ends = [whole.find(s) for s in stop if s in whole]
        assert len(part) == (min(ends) if ends else len(whole))
    assert any(len(part) < len(whole) for whole, part in zip(full, cut, strict=True))
    done: list[int] = []
    assert on_base.generate(prompts, max_new_tokens=12, stop=stop, progress=done.append) == cut
    assert sum(done) == len(prompts)
    assert on_base.generate([], max_new_tokens=4, stop=[]) == []


def test_non_finite_weights_are_refused(
    on_base: VLLMBackend, base_state: dict[str, torch.Tensor], prompts: list[str]
) -> None:
    before = on_base.generate(prompts[:3], max_new_tokens=8, stop=[])
    name = "model.layers.0.mlp.down_proj.weight"
    bad = dict(base_state)
    bad[name] = base_state[name].clone()
    bad[name][0, 0] = float("nan")
    with pytest.raises(EvaluationError, match=r"NaN in 'model\.layers\.0\.mlp\.down_proj\.weight'"):
        on_base.load_state_dict(bad)
    bad[name][0, 0] = float("inf")
    with pytest.raises(EvaluationError, match="Inf in"):
        on_base.load_state_dict(bad)
    missing = {k: v for k, v in base_state.items() if k != name}
    with pytest.raises(EvaluationError, match="missing from the candidate"):
        on_base.load_state_dict(missing)
    with pytest.raises(EvaluationError, match="unexpected weight name"):
        on_base.load_state_dict({**base_state, "model.extra.weight": torch.zeros(2)})
    with pytest.raises(EvaluationError, match="has shape"):
        on_base.load_state_dict({**base_state, name: base_state[name].t()})
    # Nothing was pushed: the engine still answers as before.
    assert on_base.generate(prompts[:3], max_new_tokens=8, stop=[]) == before


def test_evaluate_end_to_end(on_base: VLLMBackend, micro_zoo: Zoo) -> None:
    result = evaluate(on_base, micro_zoo.tasks, "dev", micro_zoo.root)
    assert set(result.tasks) == {t.name for t in micro_zoo.tasks}
    for task in micro_zoo.tasks:
        got = result.tasks[task.name]
        assert got.n == len(load_split(task, "dev", micro_zoo.root)) and 0.0 <= got.score <= 1.0
    hf = HFBackend.from_pretrained(micro_zoo.base, batch_size=24)
    expected = evaluate(hf, micro_zoo.tasks, "dev", micro_zoo.root)
    assert expected.scores == result.scores
    for name, task in result.tasks.items():
        assert [r.completion for r in task.records] == [r.completion for r in expected.tasks[name].records]
    print("vllm evaluate scores:", result.scores)


def test_chat_prompt_and_context_limits(on_base: VLLMBackend, prompts: list[str]) -> None:
    tokenizer = on_base.tokenizer
    assert not getattr(tokenizer, "chat_template", None)
    with pytest.raises(ConfigError, match="tokenizer has none"):
        on_base.chat_prompt("hi")
    tokenizer.chat_template = "{% for m in messages %}Q: {{ m['content'] }}\n{% endfor %}A:"
    try:
        assert on_base.chat_prompt("2 + 2") == "Q: 2 + 2\nA:"
    finally:
        tokenizer.chat_template = None
    with pytest.raises(EvaluationError, match="no room in the context"):
        on_base.generate(["1 + 1 = 2. " * on_base.max_model_len], max_new_tokens=4, stop=[])
    with pytest.raises(ValueError, match="max_new_tokens"):
        on_base.generate(prompts, max_new_tokens=0, stop=[])
    # The engine is still usable after a refused call.
    assert len(on_base.generate(prompts[:2], max_new_tokens=4, stop=[])) == 2


def test_stacked_model_loads_and_matches_the_hf_backend(
    micro_zoo: Zoo, prompts: list[str], tmp_path: Path
) -> None:
    """A frankenmerge (the base's layers, then the arith expert's from layer 1 on: a deeper model) loads in
    a fresh vLLM engine and generates what transformers generates from the same directory."""
    with ModelDir(micro_zoo.base) as md:
        layers = md.num_layers
    recipe = MergeRecipe.model_validate(
        {
            "merge_method": "passthrough",
            "slices": [
                {"sources": [{"model": micro_zoo.base, "layer_range": [0, layers]}]},
                {"sources": [{"model": micro_zoo.experts["arith"], "layer_range": [1, layers]}]},
            ],
        }
    )
    stacked = str(merge_streaming(recipe, tmp_path / "stacked"))
    assert json.loads((Path(stacked) / "config.json").read_text())["num_hidden_layers"] == 2 * layers - 1
    expected = HFBackend.from_pretrained(stacked, batch_size=8).generate(prompts, max_new_tokens=12, stop=[])
    assert fresh_outputs([stacked], prompts, max_new_tokens=12)[stacked] == expected
