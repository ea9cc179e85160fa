"""Gradient polish (evomerge/optimizer/polish.py) on the micro zoo: each objective goes down, only the
coefficients change, the written recipe reproduces the polished weights, dev picks the step kept."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from evomerge.errors import ConfigError
from evomerge.evaluators import load_split
from evomerge.merging import InMemoryMerger, MergeRecipe
from evomerge.optimizer import LocalEvaluator, SweepConfig, resolve_sweep
from evomerge.optimizer.polish import PolishConfig, polish_recipe, slot_of
from evomerge.zoo import Zoo


@pytest.fixture(scope="module")
def evaluator(micro_zoo: Zoo, zoo_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> LocalEvaluator:
    runs = tmp_path_factory.mktemp("polish-runs")
    cfg = SweepConfig(study_name="polish", runs_dir=str(runs), zoo="micro", seed_recipes=())
    return LocalEvaluator(resolve_sweep(cfg, zoo_cache=zoo_cache))


def uniform(zoo: Zoo, weight: float = 0.5, method: str = "task_arithmetic") -> MergeRecipe:
    return MergeRecipe.model_validate(
        {
            "merge_method": method,
            "base_model": zoo.base,
            "models": [{"model": e, "parameters": {"weight": weight}} for e in zoo.experts.values()],
            "parameters": {"lambda": 2.0},  # folded into the coefficients: 0.5 x 2 = 1 each
            "dtype": "float32",
        }
    )


def losses(history: list[dict[str, float]]) -> list[float]:
    return [h["loss"] for h in history if "loss" in h]


@pytest.mark.parametrize("objective", ["ce", "kl", "entropy"])
def test_polish_lowers_its_objective_and_only_the_coefficients_move(
    objective: str, evaluator: LocalEvaluator, micro_zoo: Zoo
) -> None:
    before = {k: v.clone() for k, v in evaluator.backend.model.state_dict().items()}
    cfg = PolishConfig(objective=objective, steps=40, eval_every=20, patience=5, lr=0.05, batch_size=16)  # type: ignore[arg-type]
    result = polish_recipe(uniform(micro_zoo), evaluator, cfg)
    values = losses(result.history)
    assert len(values) == 40
    assert sum(values[-10:]) / 10 < sum(values[:10]) / 10  # the objective went down
    # the trainable part: experts x layers x (attention, MLP, rest)
    assert result.trainable == len(micro_zoo.experts) * 2 * 3
    # the recipe: lambda folded in, per-layer lists per part, reproduced by an independent merger
    recipe = result.recipe
    assert recipe.parameters["lambda"] == 1.0
    merger = InMemoryMerger(micro_zoo.base, list(micro_zoo.experts.values()))
    again = merger.merge(recipe)
    for name, tensor in result.state.items():
        assert torch.equal(again[name], tensor), name
    # the kept step is the best dev seen (the start counts), and it is reported as such
    devs = [h["dev"] for h in result.history if "dev" in h]
    assert result.start_dev == devs[0] and result.best_dev == max(devs)
    if result.best_step == 0:
        # nothing beat the start: the recipe is the start, 1.0 everywhere
        assert all(
            v == pytest.approx(1.0)
            for m in recipe.models
            for rule in m.parameters["weight"]  # type: ignore[union-attr]
            for v in rule.value  # type: ignore[union-attr]
        )
    # the live model's own weights were not trained (the evaluator may have loaded merges into it)
    evaluator.backend.load_state_dict(before)
    for name, tensor in evaluator.backend.model.state_dict().items():
        assert torch.equal(tensor, before[name])
        assert not tensor.requires_grad


def test_the_starting_point_is_the_searched_recipe(evaluator: LocalEvaluator, micro_zoo: Zoo) -> None:
    """Zero steps of change (lr tiny, one step): the polished weights equal the recipe's merge."""
    start = uniform(micro_zoo)
    cfg = PolishConfig(steps=1, eval_every=1, patience=1, lr=1e-12)
    result = polish_recipe(start, evaluator, cfg)
    reference = evaluator.merger.merge(start)
    for name, tensor in result.state.items():
        torch.testing.assert_close(tensor, reference[name], rtol=1e-6, atol=1e-6)


def test_polish_refuses_what_it_cannot_train(
    evaluator: LocalEvaluator, micro_zoo: Zoo, tmp_path: Path
) -> None:
    with pytest.raises(ConfigError, match="task-arithmetic"):
        polish_recipe(uniform(micro_zoo, method="ties"), evaluator, PolishConfig(steps=1))
    with pytest.raises(ConfigError, match=r"nope\.jsonl"):
        task = evaluator.sweep.tasks[0]
        missing = {task.name: str(tmp_path / "nope.jsonl")}
        polish_recipe(uniform(micro_zoo), evaluator, PolishConfig(steps=1, data=missing))
    with pytest.raises(ConfigError, match="domain"):
        wrong = {t.name: "no-such-expert" for t in evaluator.sweep.tasks}
        polish_recipe(uniform(micro_zoo), evaluator, PolishConfig(objective="kl", steps=1, domains=wrong))


def test_slots() -> None:
    assert slot_of("model.layers.3.self_attn.q_proj.weight", 4) == (3, 0)
    assert slot_of("model.layers.1.mlp.up_proj.weight", 4) == (1, 1)
    assert slot_of("model.layers.2.input_layernorm.weight", 4) == (2, 2)
    assert slot_of("model.embed_tokens.weight", 4) == (0, 2)
    assert slot_of("lm_head.weight", 4) == (0, 2)


def test_a_task_without_training_prompts_is_not_trained_on(evaluator: LocalEvaluator, tmp_path: Path) -> None:
    from evomerge.optimizer.polish import _training_examples

    task = evaluator.sweep.tasks[0]
    data_dir = evaluator.sweep.data_dir
    found = _training_examples(task, data_dir, PolishConfig())
    assert found is not None and len(found) > 0
    # training prompts are never dev questions
    dev_questions = {ex.question for ex in load_split(task, "dev", data_dir)}
    assert not dev_questions & {ex.question for ex in found}
    dev = tmp_path / "held.dev.jsonl"
    dev.write_text('{"question": "1+1", "answer": "2"}\n')
    held_out = task.model_copy(update={"name": "held", "data_files": {"dev": str(dev), "test": str(dev)}})
    assert _training_examples(held_out, data_dir, PolishConfig()) is None


def test_polish_of_a_model_with_tied_embeddings(micro_zoo: Zoo, tmp_path: Path) -> None:
    """SmolLM2 ties lm_head to the embeddings and stores them once: the dev evaluations load the merged
    embeddings for both names, and the tied output layer trains with them (a real bug on SmolLM2)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = AutoModelForCausalLM.from_pretrained(micro_zoo.base)
    tokenizer = AutoTokenizer.from_pretrained(micro_zoo.base)
    config = source.config
    config.tie_word_embeddings = True
    dirs = []
    for i in range(3):  # the base and two experts: the base plus seeded noise
        torch.manual_seed(i)
        model = AutoModelForCausalLM.from_config(config)
        model.load_state_dict(source.state_dict(), strict=False)
        model.tie_weights()
        if i:
            with torch.no_grad():
                for p in model.parameters():
                    p.add_(0.05 * p.std() * torch.randn_like(p))
        out = tmp_path / f"m{i}"
        model.save_pretrained(out)
        tokenizer.save_pretrained(out)
        dirs.append(str(out))
    zoo_sweep = resolve_sweep(SweepConfig(study_name="z", runs_dir=str(tmp_path), zoo="micro"))
    cfg = SweepConfig(
        study_name="tied",
        runs_dir=str(tmp_path / "runs"),
        models={"base": dirs[0], "experts": dirs[1:]},
        tasks=zoo_sweep.tasks,
        data_dir=zoo_sweep.data_dir,
    )
    evaluator = LocalEvaluator(resolve_sweep(cfg))
    assert evaluator.backend.model.lm_head.weight is evaluator.backend.model.model.embed_tokens.weight
    start = MergeRecipe.model_validate(
        {
            "merge_method": "task_arithmetic",
            "base_model": dirs[0],
            "models": [{"model": d, "parameters": {"weight": 0.5}} for d in dirs[1:]],
        }
    )
    result = polish_recipe(start, evaluator, PolishConfig(steps=4, eval_every=2, lr=0.05, batch_size=8))
    assert [h["step"] for h in result.history] == [0, 1, 2, 3, 4]
    assert "lm_head.weight" not in result.state  # stored once, as the checkpoints store it
    assert len(set(losses(result.history))) == 4  # it trained through the tied output layer
    # the kept coefficients: moved where a step beat the start on dev (slot of the embeddings: layer 0, rest)
    theta = result.recipe.expert_models()[0].parameters["weight"]
    assert isinstance(theta, tuple)
    rest = next(rule for rule in theta if rule.filter is None)
    assert isinstance(rest.value, tuple)
    assert (rest.value[0] == pytest.approx(0.5, abs=1e-6)) == (result.best_step == 0)
    evaluator.score_state(result.state, "dev")  # loads: the tied names agree
    assert torch.equal(evaluator.backend.model.lm_head.weight, result.state["model.embed_tokens.weight"])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_merge_function_and_its_gradient(dtype: torch.dtype) -> None:
    """``b + sum_i c_i d_i`` from resident tensors of either dtype: the value and ``dL/dc`` equal plain
    float32 autograd on float32 copies, and the residents are neither changed nor copied into the graph."""
    from evomerge.optimizer.polish import _Combine

    gen = torch.Generator().manual_seed(0)
    b = torch.randn(6, 5, generator=gen).to(dtype)
    deltas = [torch.randn(6, 5, generator=gen).to(dtype) for _ in range(3)]
    kept = [t.clone() for t in (b, *deltas)]
    weights = torch.randn(6, 5, generator=gen)
    c = torch.tensor([0.3, -1.2, 0.7], requires_grad=True)
    out = _Combine.apply(c, b, *deltas)  # type: ignore[no-untyped-call]
    assert out.dtype == torch.float32
    (out * weights).sum().backward()
    ref_c = c.detach().clone().requires_grad_(True)
    ref = b.float() + sum(ref_c[i] * d.float() for i, d in enumerate(deltas))
    (ref * weights).sum().backward()
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)
    assert c.grad is not None and ref_c.grad is not None
    torch.testing.assert_close(c.grad, ref_c.grad, rtol=1e-5, atol=1e-5)
    for before, after in zip(kept, (b, *deltas), strict=True):
        assert torch.equal(before, after)
