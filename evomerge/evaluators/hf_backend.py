"""A generation backend holding one live transformers causal LM.

The search loop builds many candidate weight sets for one architecture. :class:`HFBackend` loads the
model once and :meth:`HFBackend.load_state_dict` copies each candidate's weights into the existing
parameters, so no candidate is ever reloaded from disk.

Generation is batched greedy decoding with left padding: prompts are sorted by token length, batched,
decoded step by step with the KV cache, and returned in the order they were given. A completion ends at
EOS, at the first stop string, or after ``max_new_tokens`` tokens.
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import torch

from evomerge.checkpoints.layers import layer_index
from evomerge.errors import CheckpointError, ConfigError, EvaluationError

__all__ = ["HFBackend", "check_finite", "cut_at_stop"]


def check_finite(state: Mapping[str, torch.Tensor]) -> None:
    """Raise EvaluationError naming the first floating tensor of ``state`` with a NaN or Inf.

    A tensor's sum is finite when all its entries are (NaN and Inf propagate), and summing reads the
    tensor once without a mask the size of the tensor (10x faster); only a non-finite sum, which may
    also be an overflow of large finite entries, gets the exact entry-wise check.
    """
    for name, tensor in state.items():
        if tensor.is_floating_point() or tensor.is_complex():
            with torch.no_grad():
                if not bool(torch.isfinite(tensor.sum())) and not bool(torch.isfinite(tensor).all()):
                    kind = "NaN" if bool(torch.isnan(tensor).any()) else "Inf"
                    raise EvaluationError(f"candidate weights are not finite: {kind} in {name!r}")


def apply_chat_template(tokenizer: Any, prompt: str) -> str:
    """``prompt`` as one user turn in ``tokenizer``'s chat template, ready for the assistant's answer.

    ConfigError when the tokenizer has no chat template.
    """
    if not getattr(tokenizer, "chat_template", None):
        raise ConfigError("the task asks for a chat template but the model's tokenizer has none")
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
    )
    return str(text)


def cut_at_stop(text: str, stop: Iterable[str]) -> str:
    """``text`` up to (not including) the earliest occurrence of any stop string."""
    end = len(text)
    for s in stop:
        i = text.find(s)
        if i != -1 and i < end:
            end = i
    return text[:end]


def _depth(state: Mapping[str, torch.Tensor]) -> int | None:
    """How many decoder layers ``state`` holds (None: no layer tensors)."""
    layers = [layer_index(name) for name in state]
    known = [i for i in layers if i is not None]
    return max(known) + 1 if known else None


def _ids(value: object) -> set[int]:
    if value is None:
        return set()
    if isinstance(value, int):
        return {value}
    if isinstance(value, list | tuple | set):
        return {int(v) for v in value}
    return set()


class HFBackend:
    """One live causal LM and its tokenizer, for greedy batched generation.

    Build it with :meth:`from_pretrained`, or directly from an already loaded model and tokenizer.
    """

    def __init__(self, model: Any, tokenizer: Any, *, batch_size: int = 64) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.model: Any = model
        self.tokenizer: Any = tokenizer
        self.batch_size = batch_size
        self.model.eval()
        tokenizer.padding_side = "left"
        if tokenizer.pad_token_id is None:
            if tokenizer.eos_token is None:
                raise CheckpointError("the tokenizer has neither a pad token nor an eos token")
            tokenizer.pad_token = tokenizer.eos_token
        self.pad_token_id: int = int(tokenizer.pad_token_id)
        eos = _ids(tokenizer.eos_token_id)
        generation_config = getattr(model, "generation_config", None)
        if generation_config is not None:
            eos |= _ids(getattr(generation_config, "eos_token_id", None))
        self.eos_token_ids: frozenset[int] = frozenset(eos)
        self._logits_to_keep = "logits_to_keep" in inspect.signature(model.forward).parameters
        self._param_groups = self._tied_groups()
        self._layer_pool: list[Any] | None = None  # every decoder layer built so far (see fit_layers)

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        *,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        batch_size: int = 64,
        trust_remote_code: bool = False,
    ) -> HFBackend:
        """Load the model and tokenizer in ``path`` onto ``device`` in ``dtype``, in eval mode.

        Raises CheckpointError when either cannot be loaded.
        """
        from transformers import AutoModelForCausalLM, AutoTokenizer

        try:
            tokenizer: Any = AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust_remote_code)
            model: Any = AutoModelForCausalLM.from_pretrained(
                str(path), dtype=dtype, trust_remote_code=trust_remote_code
            )
        except (OSError, ValueError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise CheckpointError(f"cannot load model from {path}: {first}") from exc
        model.to(device)
        return cls(model, tokenizer, batch_size=batch_size)

    @property
    def device(self) -> torch.device:
        """The device of the model's parameters."""
        return next(iter(self.model.parameters())).device  # type: ignore[no-any-return]

    # ------------------------------------------------------------------ generation

    def chat_prompt(self, prompt: str) -> str:
        """``prompt`` as one user turn in the tokenizer's chat template, ready for the assistant's answer.

        ConfigError when the tokenizer has no chat template.
        """
        return apply_chat_template(self.tokenizer, prompt)

    def generate(
        self,
        prompts: list[str],
        *,
        max_new_tokens: int,
        stop: list[str],
        progress: Callable[[int], None] | None = None,
    ) -> list[str]:
        """Greedy completions of ``prompts``, in the order given.

        Each completion is cut at EOS and at the first stop string (which is not included).
        ``progress``, when given, is called with the number of prompts finished after each batch.
        """
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        if not prompts:
            return []
        encoded: list[list[int]] = self.tokenizer(list(prompts), add_special_tokens=True)["input_ids"]
        # Longest first: a batch that does not fit in memory fails at once, not at the end.
        order = sorted(range(len(prompts)), key=lambda i: -len(encoded[i]))
        completions: list[str] = [""] * len(prompts)
        for start in range(0, len(order), self.batch_size):
            batch = order[start : start + self.batch_size]
            texts = self._generate_batch([encoded[i] for i in batch], max_new_tokens, stop)
            for i, text in zip(batch, texts, strict=True):
                completions[i] = text
            if progress is not None:
                progress(len(batch))
        return completions

    def _decode(self, ids: list[int]) -> str:
        cut = len(ids)
        for j, token in enumerate(ids):
            if token in self.eos_token_ids:
                cut = j
                break
        text: str = self.tokenizer.decode(
            ids[:cut], skip_special_tokens=True, clean_up_tokenization_spaces=False
        )
        return text

    def _generate_batch(self, batch: list[list[int]], max_new_tokens: int, stop: list[str]) -> list[str]:
        device = self.device
        width = max(len(ids) for ids in batch)
        if width == 0:
            raise EvaluationError("a prompt encodes to no tokens (and the tokenizer adds no BOS)")
        input_ids = torch.full((len(batch), width), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, ids in enumerate(batch):
            if ids:
                input_ids[row, width - len(ids) :] = torch.tensor(ids, dtype=torch.long)
                attention_mask[row, width - len(ids) :] = 1
        input_ids = input_ids.to(device)
        attention_mask = attention_mask.to(device)
        # Positions count real tokens only, so a left-padded prompt sees the same positions as alone.
        position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)

        generated: list[list[int]] = [[] for _ in batch]
        done = [False] * len(batch)
        past: Any = None
        step_ids, step_positions = input_ids, position_ids
        extra: dict[str, Any] = {"logits_to_keep": 1} if self._logits_to_keep else {}
        with torch.inference_mode():
            for _ in range(max_new_tokens):
                out = self.model(
                    input_ids=step_ids,
                    attention_mask=attention_mask,
                    position_ids=step_positions,
                    past_key_values=past,
                    use_cache=True,
                    **extra,
                )
                past = out.past_key_values
                next_ids = out.logits[:, -1, :].argmax(dim=-1)
                if not bool(torch.isfinite(out.logits[:, -1, :]).all()):
                    raise EvaluationError("the model produced non-finite logits")
                tokens = next_ids.tolist()
                for row, token in enumerate(tokens):
                    if done[row]:
                        continue
                    generated[row].append(int(token))
                    if token in self.eos_token_ids:
                        done[row] = True
                if stop:
                    for row in range(len(batch)):
                        if not done[row] and any(s in self._decode(generated[row]) for s in stop):
                            done[row] = True
                if all(done):
                    break
                fed = torch.tensor(
                    [self.pad_token_id if d else t for d, t in zip(done, tokens, strict=True)],
                    dtype=torch.long,
                    device=device,
                )
                step_ids = fed[:, None]
                step_positions = step_positions[:, -1:] + 1
                attention_mask = torch.cat(
                    [attention_mask, torch.ones((len(batch), 1), dtype=attention_mask.dtype, device=device)],
                    dim=-1,
                )
        return [cut_at_stop(self._decode(ids), stop) for ids in generated]

    # ------------------------------------------------------------------ weights

    def _tied_groups(self) -> list[list[str]]:
        """State-dict names grouped by the tensor they share (tied weights share one group)."""
        by_tensor: dict[int, list[str]] = {}
        keys = list(self.model.state_dict(keep_vars=True).items())
        for name, tensor in keys:
            by_tensor.setdefault(id(tensor), []).append(name)
        return list(by_tensor.values())

    def state_dict(self) -> dict[str, torch.Tensor]:
        """A detached copy of the live weights (one entry per state-dict name, tied names included)."""
        return {name: t.detach().clone() for name, t in self.model.state_dict().items()}

    def with_live(self, state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The live weights with ``state`` over them: a complete state for :meth:`load_state_dict`. A tied
        group (``lm_head.weight`` and ``model.embed_tokens.weight``) named in ``state`` takes its value
        from ``state`` alone, so the live copy of the other name cannot contradict it."""
        # the live tensors themselves, not copies: load_state_dict copies them onto themselves
        out = {name: t.detach() for name, t in self.model.state_dict().items()}
        for group in self._param_groups:
            if any(name in state for name in group):
                for name in group:
                    out.pop(name, None)
        out.update(state)
        return out

    def _layer_list(self) -> tuple[Any, str, Any] | None:
        """``(parent module, attribute, ModuleList)`` of the decoder layers, or None."""
        for name, module in self.model.named_modules():
            if isinstance(module, torch.nn.ModuleList) and name.split(".")[-1] in ("layers", "h"):
                parent_name, _, attr = name.rpartition(".")
                parent = self.model.get_submodule(parent_name) if parent_name else self.model
                return parent, attr, module
        return None

    def fit_layers(self, count: int) -> None:
        """Give the live model ``count`` decoder layers (a layer-path candidate's depth): layers beyond the
        ones built so far are copies of the last one (their weights come with the candidate), and every
        layer learns its new index (the KV cache is indexed by it). EvaluationError for a model whose
        layers are not all of one kind (``layer_types``) or whose layer list is not found."""
        found = self._layer_list()
        if found is None:
            raise EvaluationError("this model's decoder layer list was not found; its depth cannot change")
        parent, attr, layers = found
        if len(layers) == count:
            return
        config = self.model.config
        kinds = getattr(config, "layer_types", None)
        if kinds is not None and len(set(kinds)) > 1:
            raise EvaluationError(
                "candidates of another depth need one kind of decoder layer; this model mixes "
                f"{sorted(set(kinds))}"
            )
        if self._layer_pool is None:
            self._layer_pool = list(layers)
        while len(self._layer_pool) < count:
            self._layer_pool.append(copy.deepcopy(self._layer_pool[-1]))
        chosen = torch.nn.ModuleList(self._layer_pool[:count])
        for index, layer in enumerate(chosen):
            for module in layer.modules():
                if hasattr(module, "layer_idx"):
                    setattr(module, "layer_idx", index)  # noqa: B010 (a plain attribute, not a tensor)
        setattr(parent, attr, chosen)
        config.num_hidden_layers = count
        if kinds is not None:
            config.layer_types = [kinds[0]] * count
        self._param_groups = self._tied_groups()

    def load_state_dict(self, state: Mapping[str, torch.Tensor], *, check: bool = True) -> None:
        """Copy ``state`` into the live model's parameters and buffers, in place.

        For tied weights (e.g. ``lm_head.weight`` sharing ``model.embed_tokens.weight``) giving any one
        of the names is enough; giving several with different values is an error. Raises
        EvaluationError, before anything is copied, for missing or unexpected names, a wrong shape,
        or (with ``check``) a NaN or Inf.
        """
        depth = _depth(state)
        if depth is not None and depth != getattr(self.model.config, "num_hidden_layers", depth):
            self.fit_layers(depth)  # a candidate of another depth (a layer path)
        live = self.model.state_dict(keep_vars=True)
        unexpected = sorted(set(state) - set(live))
        if unexpected:
            raise EvaluationError(
                f"{len(unexpected)} unexpected weight name(s) for this model: {', '.join(unexpected[:5])}"
            )
        plan: list[tuple[torch.Tensor, torch.Tensor]] = []
        missing: list[str] = []
        for group in self._param_groups:
            given = [name for name in group if name in state]
            if not given:
                missing.append(group[0])
                continue
            source = state[given[0]]
            for other in given[1:]:
                if state[other] is not source and not torch.equal(state[other], source):
                    raise EvaluationError(f"tied weights {given[0]!r} and {other!r} differ")
            target = live[given[0]]
            if tuple(source.shape) != tuple(target.shape):
                raise EvaluationError(
                    f"weight {given[0]!r} has shape {tuple(source.shape)}, "
                    f"the model expects {tuple(target.shape)}"
                )
            plan.append((target, source))
        if missing:
            raise EvaluationError(
                f"{len(missing)} weight name(s) missing from the candidate: {', '.join(missing[:5])}"
            )
        if check:
            check_finite(state)
        with torch.no_grad():
            for target, source in plan:
                target.copy_(source)
