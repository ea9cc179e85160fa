"""Gradient polish: train the searched recipe's coefficients, nothing else.

A task-arithmetic merge is ``b + sum_i c_i(slot) d_i`` with one coefficient per expert and *slot*: a
layer's attention tensors, its MLP tensors, or the rest of the layer (norms; the tensors outside the
layer stack share layer 0's, as a per-layer list resolves them). The searched recipe gives the starting
coefficients (its ``lambda`` folded in); they become trainable parameters over the frozen base and task
vectors, and the merged weights a differentiable function of them, run through the live model with
:func:`torch.func.functional_call`. A few hundred scalars train; no weight of any model does.

Objectives (``PolishConfig.objective``), on training prompts only (a task's ``train`` file, or the
``<task>.train.jsonl`` next to its dev file as a zoo writes it; never dev, val or test):

* ``ce``: cross-entropy of the merge on the training answers;
* ``kl``: DAM-style, ``KL(expert || merge)`` on each expert's own domain (the task of the same name as
  the expert's directory, or ``domains``), prompt and answer tokens; no label is scored;
* ``entropy``: AdaMerging-style, the entropy of the merge's next-token distribution where the answer
  starts, on unlabeled prompts.

A task without training prompts (the zoo's held-out ``comp``) is not trained on; it is still scored on
dev with the others.

Every ``eval_every`` steps the merge is scored on the sweep's dev split (its fitness questions); the
best dev mean so far is kept (the start counts), and training stops after ``patience`` evaluations
without a gain. The result is a task-arithmetic recipe with per-layer lists for attention, MLP and the
rest (``lambda`` 1), which any merge of evomerge reproduces and mergekit reads.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from evomerge.checkpoints.layers import layer_index
from evomerge.errors import ConfigError
from evomerge.evaluators.tasks import Example, TaskConfig, load_train
from evomerge.merging import MergeRecipe
from evomerge.merging.recipe import resolve_params
from evomerge.optimizer.config import PolishConfig

__all__ = ["PolishConfig", "PolishResult", "polish_recipe", "slot_of"]

PARTS = ("self_attn", "mlp", "rest")


@dataclass
class PolishResult:
    recipe: MergeRecipe
    state: dict[str, torch.Tensor]
    start_dev: float
    best_dev: float
    best_step: int
    history: list[dict[str, float]] = field(default_factory=list)
    """One entry per step: ``step``, ``loss``; with ``dev`` where the merge was scored."""
    seconds: float = 0.0
    trainable: int = 0
    untrained: list[str] = field(default_factory=list)
    """Tasks without training prompts (e.g. a held-out family): scored on dev, not trained on."""


def slot_of(name: str, num_layers: int) -> tuple[int, int]:
    """(layer, part) of a tensor: the coefficient it uses. Parts follow the written recipe's filter
    rules in order (``self_attn``, ``mlp``, anything else); tensors outside the layer stack resolve at
    position 0 like every per-layer list, so they share layer 0's slot."""
    layer = layer_index(name)
    layer = 0 if layer is None else min(layer, num_layers - 1)
    part = 0 if "self_attn" in name else 1 if "mlp" in name else 2
    return layer, part


def _training_examples(task: TaskConfig, data_dir: str, cfg: PolishConfig) -> list[Example] | None:
    """The task's training prompts, or None when it has none (a held-out task: not trained on)."""
    path = cfg.data.get(task.name)
    if path is None and "train" in task.data_files:
        source = task
    else:
        if path is None:
            dev = task.data_files.get("dev")
            guess = Path(dev.replace(".dev.", ".train.")) if dev and ".dev." in dev else None
            if guess is None or not (Path(data_dir) / guess).is_file():
                return None
            path = str(guess)
        source = task.model_copy(update={"data_files": {"train": path}})
    examples = load_train(source, data_dir)
    if len(examples) > cfg.max_examples:
        examples = random.Random(cfg.seed).sample(examples, cfg.max_examples)
    return examples


class _Coefficients:
    """The trainable coefficients and the map from tensors to them."""

    def __init__(self, recipe: MergeRecipe, names: Sequence[str], num_layers: int, n_experts: int) -> None:
        if recipe.merge_method != "task_arithmetic":
            raise ConfigError(
                f"polish: the recipe's method is {recipe.merge_method!r}; polish trains task-arithmetic "
                "coefficients (search with method: task_arithmetic)"
            )
        self.num_layers = num_layers
        init = torch.zeros(n_experts, num_layers, len(PARTS), dtype=torch.float64)
        seen: dict[tuple[int, int, int], float] = {}
        self.slots: dict[str, tuple[int, int]] = {}
        for name in names:
            per_model, global_params = resolve_params(recipe, name, num_layers)
            if global_params.get("normalize", 0.0):
                raise ConfigError("polish: a task-arithmetic recipe with normalize: true is not supported")
            slot = slot_of(name, num_layers)
            self.slots[name] = slot
            for i, params in enumerate(per_model):
                value = float(global_params["lambda"]) * float(params["weight"])
                key = (i, *slot)
                if key in seen and not math.isclose(seen[key], value, rel_tol=1e-6, abs_tol=1e-9):
                    raise ConfigError(
                        f"polish: model {i}'s weight differs inside layer {slot[0]}'s {PARTS[slot[1]]} "
                        f"tensors ({seen[key]} vs {value} at {name}); polish needs one value per layer "
                        "and part"
                    )
                seen[key] = value
                init[key] = value
        self.theta = torch.nn.Parameter(init.to(torch.float32))

    def recipe(self, template: MergeRecipe) -> MergeRecipe:
        values = self.theta.detach().to(torch.float64)
        models = []
        for i, entry in enumerate(template.expert_models()):
            rules: list[dict[str, Any]] = []
            for p, part in enumerate(PARTS):
                layers = [round(float(values[i, layer, p]), 6) for layer in range(self.num_layers)]
                rule: dict[str, Any] = {"value": layers}
                if part != "rest":
                    rule["filter"] = part
                rules.append(rule)
            models.append({"model": entry.model, "parameters": {"weight": rules}})
        data = template.to_dict()
        data["models"] = models
        data["parameters"] = {"lambda": 1.0}
        return MergeRecipe.model_validate(data)


class _Combine(torch.autograd.Function):
    """``b + sum_i c_i d_i`` in float32 from the resident tensors (float32 or bfloat16), differentiable in
    ``c`` only. Autograd keeps references to the resident tensors, never a float32 copy of them: the
    gradient ``dL/dc_i = sum(dL/dW * d_i)`` is computed one task vector at a time."""

    @staticmethod
    def forward(ctx: Any, c: torch.Tensor, b: torch.Tensor, *deltas: torch.Tensor) -> torch.Tensor:
        ctx.deltas = deltas
        ctx.c_device = c.device
        out = b.float()  # a copy where b is not float32; cloned below otherwise (b is read-only)
        if out is b:
            out = out.clone()
        for i, d in enumerate(deltas):
            out.add_(d, alpha=float(c[i]))
        return out

    @staticmethod
    def backward(ctx: Any, *grads: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        (grad,) = grads
        grad = grad.float()
        gc = torch.stack([(grad * d).sum(dtype=torch.float32) for d in ctx.deltas]).to(ctx.c_device)
        return (gc, None, *(None for _ in ctx.deltas))


def _batches(
    examples: Sequence[tuple[str, str, int]], batch_size: int, steps: int, seed: int
) -> list[list[tuple[str, str, int]]]:
    """``steps`` batches, drawn without replacement within each pass over the examples."""
    rng = random.Random(seed)
    order: list[int] = []
    out = []
    for _ in range(steps):
        batch = []
        for _ in range(batch_size):
            if not order:
                order = list(range(len(examples)))
                rng.shuffle(order)
            batch.append(examples[order.pop()])
        out.append(batch)
    return out


def polish_recipe(
    recipe: MergeRecipe,
    evaluator: Any,
    cfg: PolishConfig,
    *,
    progress: Callable[[int, int, float, float | None], None] | None = None,
) -> PolishResult:
    """Polish ``recipe`` on ``evaluator``'s models (a :class:`~evomerge.optimizer.LocalEvaluator`:
    its resident base and task vectors, its live model, its sweep's tasks and dev split)."""
    from torch.func import functional_call

    t_start = time.perf_counter()
    merger = evaluator.merger
    backend = evaluator.backend
    if not hasattr(backend, "model"):
        raise ConfigError("polish: needs the transformers backend (backend: {kind: hf})")
    model = backend.model
    tok = backend.tokenizer
    sweep = evaluator.sweep
    base = merger.resident_tensors(recipe)
    float_names = list(base)
    coeffs = _Coefficients(recipe, float_names, merger.num_layers, len(recipe.expert_models()))
    device = backend.device
    dtype = next(iter(model.parameters())).dtype

    def merged(theta: torch.Tensor) -> dict[str, torch.Tensor]:
        out = {}
        for name in float_names:
            b, deltas = base[name]
            layer, part = coeffs.slots[name]
            out[name] = _Combine.apply(theta[:, layer, part], b, *deltas).to(device, dtype)  # type: ignore[no-untyped-call]
        return out

    # training rows: (prompt, answer, task index)
    tasks = list(sweep.tasks)
    rows: list[tuple[str, str, int]] = []
    untrained: list[str] = []
    for k, task in enumerate(tasks):
        examples = None if task.kind == "lmeval" else _training_examples(task, sweep.data_dir, cfg)
        if examples is None:
            untrained.append(task.name)
            continue
        for ex in examples:
            rows.append((task.prompt(ex.question), " " + ex.answer, k))
    if not rows:
        raise ConfigError(
            "polish: no task has training prompts (give a task data_files.train, or polish.data: {task: "
            "a JSONL of question/answer records}); dev, val and test are never trained on"
        )
    teachers: dict[int, int] = {}
    if cfg.objective == "kl":
        names = [Path(e.model).name for e in recipe.expert_models()]
        paths = [str(Path(e.model).resolve()) for e in recipe.expert_models()]
        for k, task in enumerate(tasks):
            want = cfg.domains.get(task.name, task.name)
            for i, (n, p) in enumerate(zip(names, paths, strict=True)):
                if want in (n, p) or str(Path(want).resolve()) == p:
                    teachers[k] = i
        rows = [r for r in rows if r[2] in teachers]
        if not rows:
            raise ConfigError(
                "polish: objective kl needs each expert's domain: no task is named like an expert "
                "directory; give polish.domains {task: expert}"
            )

    for p in model.parameters():
        p.requires_grad_(False)
    optimizer = torch.optim.Adam([coeffs.theta], lr=cfg.lr)

    def encode(batch: Sequence[tuple[str, str, int]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        ids, answer_mask = [], []
        for prompt, answer, _ in batch:
            p = tok(prompt, add_special_tokens=True)["input_ids"]
            a = tok(answer, add_special_tokens=False)["input_ids"]
            seq = (p + a)[: cfg.max_len]
            ids.append(seq)
            answer_mask.append([0] * len(p) + [1] * len(a))
        width = max(len(s) for s in ids)
        pad = backend.pad_token_id
        x = torch.full((len(ids), width), pad, dtype=torch.long)
        att = torch.zeros((len(ids), width), dtype=torch.long)
        ans = torch.zeros((len(ids), width), dtype=torch.bool)
        for r, (seq, m) in enumerate(zip(ids, answer_mask, strict=True)):  # right padding for training
            x[r, : len(seq)] = torch.tensor(seq)
            att[r, : len(seq)] = 1
            ans[r, : len(seq)] = torch.tensor(m[: len(seq)], dtype=torch.bool)
        return x.to(device), att.to(device), ans.to(device)

    def logits_of(params: Mapping[str, torch.Tensor], x: torch.Tensor, att: torch.Tensor) -> torch.Tensor:
        out = functional_call(model, dict(params), args=(), kwargs={"input_ids": x, "attention_mask": att})
        return out.logits.float()  # type: ignore[no-any-return]

    def loss_of(batch: Sequence[tuple[str, str, int]]) -> torch.Tensor:
        x, att, ans = encode(batch)
        logits = logits_of(merged(coeffs.theta), x, att)[:, :-1]
        target = x[:, 1:]
        ans_pos = ans[:, 1:]  # position t predicts token t+1
        if cfg.objective == "ce":
            ce = torch.nn.functional.cross_entropy(logits.transpose(1, 2), target, reduction="none")
            return (ce * ans_pos).sum() / ans_pos.sum().clamp(min=1)
        if cfg.objective == "entropy":
            # the first answer token: the position before it
            first = ans_pos & ~torch.nn.functional.pad(ans_pos[:, :-1], (1, 0))
            logp = torch.log_softmax(logits, dim=-1)
            ent = -(logp.exp() * logp).sum(-1)
            return (ent * first).sum() / first.sum().clamp(min=1)
        valid = att[:, 1:].bool()
        logq = torch.log_softmax(logits, dim=-1)
        loss = torch.zeros((), device=device)
        for i in sorted({teachers[r[2]] for r in batch}):
            rows_i = torch.tensor([teachers[r[2]] == i for r in batch], device=device)
            one_hot = torch.zeros_like(coeffs.theta)
            one_hot[i] = 1.0
            with torch.no_grad():
                logp = torch.log_softmax(logits_of(merged(one_hot), x, att)[:, :-1], dim=-1)
            kl = (logp.exp() * (logp - logq)).sum(-1)
            mask = valid & rows_i[:, None]
            loss = loss + (kl * mask).sum()
        return loss / valid.sum().clamp(min=1)

    def dev_mean() -> float:
        with torch.no_grad():
            state = {k: v.detach() for k, v in merged(coeffs.theta).items()}
        result = evaluator.score_state(backend.with_live(state), "dev")
        return float(result.mean)

    generator_state = torch.random.get_rng_state()
    torch.manual_seed(cfg.seed)
    best_theta = coeffs.theta.detach().clone()
    start = best = dev_mean()
    best_step = 0
    stale = 0
    history: list[dict[str, float]] = [{"step": 0, "dev": start}]
    batches = _batches(rows, cfg.batch_size, cfg.steps, cfg.seed)
    try:
        for step, batch in enumerate(batches, start=1):
            optimizer.zero_grad()
            loss = loss_of(batch)
            loss.backward()  # type: ignore[no-untyped-call]
            optimizer.step()
            entry: dict[str, float] = {"step": step, "loss": float(loss.detach())}
            if step % cfg.eval_every == 0 or step == cfg.steps:
                dev = dev_mean()
                entry["dev"] = dev
                if dev > best:
                    best, best_step, stale = dev, step, 0
                    best_theta = coeffs.theta.detach().clone()
                else:
                    stale += 1
            history.append(entry)
            if progress is not None:
                progress(step, cfg.steps, entry["loss"], entry.get("dev"))
            if stale >= cfg.patience:
                break
    finally:
        torch.random.set_rng_state(generator_state)
    with torch.no_grad():
        coeffs.theta.copy_(best_theta)
    out_recipe = coeffs.recipe(recipe)
    state = merger.merge(out_recipe)
    return PolishResult(
        recipe=out_recipe,
        state=state,
        start_dev=start,
        best_dev=best,
        best_step=best_step,
        history=history,
        seconds=time.perf_counter() - t_start,
        trainable=coeffs.theta.numel(),
        untrained=untrained,
    )


def write_polish(
    out_dir: Path,
    start: MergeRecipe,
    result: PolishResult,
    cfg: PolishConfig,
    test: Mapping[str, Mapping[str, float]],
) -> None:
    """``out_dir`` (replaced as a whole, never half written): ``recipe.yaml`` (evomerge), ``mergekit.yaml``,
    ``polish.json`` (settings, history, dev and test figures) and ``report.md``; ``test`` maps a row label
    (the start, then ``searched + polished``) to its test scores with ``mean``."""
    import json

    from evomerge.atomic_io import atomic_dir

    with atomic_dir(out_dir) as tmp:
        (tmp / "recipe.yaml").write_text(result.recipe.to_yaml())
        (tmp / "mergekit.yaml").write_text(result.recipe.to_mergekit_yaml())
        summary = {
            "config": cfg.model_dump(mode="json"),
            "start_recipe": start.to_dict(),
            "start_dev": result.start_dev,
            "best_dev": result.best_dev,
            "best_step": result.best_step,
            "trainable": result.trainable,
            "untrained_tasks": result.untrained,
            "seconds": round(result.seconds, 2),
            "test": {k: dict(v) for k, v in test.items()},
            "history": result.history,
        }
        (tmp / "polish.json").write_text(json.dumps(summary, indent=2) + "\n")
        tasks = [k for k in next(iter(test.values())) if k != "mean"]
        lines = [
            f"# Gradient polish ({cfg.objective}, {result.trainable} coefficients, "
            f"{len(result.history) - 1} steps, kept step {result.best_step})",
            "",
            f"Dev mean: start {result.start_dev:.4f}, polished {result.best_dev:.4f}. Test split:",
            "",
            "| model | " + " | ".join(tasks) + " | mean |",
            "|---" * (len(tasks) + 2) + "|",
        ]
        for label, scores in test.items():
            lines.append(f"| {label} | " + " | ".join(f"{scores[t]:.3f}" for t in [*tasks, "mean"]) + " |")
        (tmp / "report.md").write_text("\n".join(lines) + "\n")
