"""Checks made before any work, so a bad option fails at once and leaves nothing behind: output paths
that cannot be written, devices that are not there, option values out of range."""

from __future__ import annotations

import math
import os
from pathlib import Path

import typer

from evomerge.errors import ConfigError


def _positive_finite(value: float | None) -> float | None:
    """A click callback: a positive, finite float (FloatRange lets nan and inf through)."""
    if value is not None and not (math.isfinite(value) and value > 0):
        raise typer.BadParameter(f"must be a positive finite number, got {value:g}")
    return value


def _check_output(path: Path, option: str, *, directory: bool) -> None:
    """Refuse an output path that cannot be written before any work is done, so nothing is left behind:
    an existing file where a directory goes (or the reverse), a path under a file, or a place where no
    file can be created (a read-only file system, /proc). Writability is probed by creating and removing
    a temporary directory in the nearest existing ancestor (permission bits do not stop root)."""
    import tempfile

    where = f"{option} {path}"
    if path.exists():
        if directory and not path.is_dir():
            raise ConfigError(f"{where}: is an existing file, not a directory")
        if not directory and path.is_dir():
            raise ConfigError(f"{where}: is a directory, not a file")
    elif path.is_symlink():
        raise ConfigError(f"{where}: is a broken symbolic link")
    ancestor = path.absolute().parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise ConfigError(f"{where}: {ancestor} is a file, not a directory")
    # outputs are written next to their final path (then renamed), and a directory's files inside it
    for place in (ancestor, path) if directory and path.is_dir() else (ancestor,):
        try:
            os.rmdir(tempfile.mkdtemp(prefix=".evomerge-probe-", dir=place))
        except OSError as err:
            raise ConfigError(f"{where}: cannot create files in {place} ({err.strerror or err})") from None


def _check_device(device: str) -> str:
    import torch

    try:
        parsed = torch.device(device)
    except RuntimeError:
        raise ConfigError(f"--device: unknown device {device!r} (cpu, cuda, cuda:N)") from None
    if parsed.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {device}: no CUDA device is available")
    if parsed.type not in ("cpu", "cuda"):
        raise ConfigError(f"--device: {device!r} is not supported (cpu, cuda, cuda:N)")
    return device
