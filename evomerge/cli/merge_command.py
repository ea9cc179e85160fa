"""``evomerge merge``: a recipe merged into a model directory, tensor by tensor."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from evomerge.cli.checks import _check_device, _check_output
from evomerge.cli.display import console, err_console, progress_bar
from evomerge.errors import ConfigError


def merge(
    recipe: Annotated[Path, typer.Argument(help="A recipe YAML (evomerge or mergekit format).")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Output model directory.")],
    overwrite: Annotated[bool, typer.Option(help="Replace the output directory if it exists.")] = False,
    shard_size: Annotated[str, typer.Option(help="Maximum shard size, e.g. 2GB, 500MB.")] = "2GB",
    device: Annotated[str, typer.Option(help="Where kernels run: cpu, cuda or cuda:N.")] = "cpu",
    strict: Annotated[bool, typer.Option(help="Make NaN/Inf in an input model an error.")] = False,
    allow_pickle: Annotated[
        bool, typer.Option(help="Load pickle-only checkpoints (with weights_only=True).")
    ] = False,
) -> None:
    """Merge models by a recipe (evomerge or mergekit YAML), streaming tensor by tensor to OUTPUT."""
    from evomerge.merging import MergeRecipe, merge_streaming

    _check_output(output, "--output", directory=True)
    if output.exists() and not overwrite:
        raise ConfigError(f"output directory {output} exists; pass --overwrite to replace it")
    max_shard_bytes = _parse_size(shard_size)
    parsed = MergeRecipe.from_yaml(recipe)
    torch_device = _check_device(device)
    with progress_bar("merging") as update:
        merge_streaming(
            parsed,
            output,
            overwrite=overwrite,
            max_shard_bytes=max_shard_bytes,
            progress=lambda done, total, name: update(name, done, total),
            device=torch_device,
            strict=strict,
            allow_pickle=allow_pickle,
            warn=lambda message: err_console.print(
                f"[yellow]warning:[/] {escape(message)}", highlight=False, soft_wrap=True
            ),
        )
    console.print(f"merged model written to {escape(str(output))}")


def _parse_size(text: str) -> int:
    units = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}
    t = text.strip().upper()
    num = t.rstrip("KMGIB")
    unit = t[len(num) :]
    try:
        value = float(num) * units[unit]
    except (ValueError, KeyError):
        raise ConfigError(f"--shard-size: cannot read {text!r} (examples: 2GB, 500MB)") from None
    if not value >= 1:  # also nan
        raise ConfigError(f"--shard-size: must be positive, got {text!r}")
    if not math.isfinite(value) or value > 2**62:
        raise ConfigError(f"--shard-size: {text!r} is too large")
    return int(value)
