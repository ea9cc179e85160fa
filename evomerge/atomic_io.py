"""Atomic writes: a reader sees the old file or directory, or the complete new one, never a half one.

Each output is written to a temporary sibling (same directory, so the same file system) and renamed
into place; on failure the temporary is removed. Files come out readable by all (``mkstemp`` and
``mkdtemp`` create them private).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from evomerge.errors import OutputExistsError

__all__ = ["atomic_dir", "atomic_file", "write_text_atomic"]


@contextlib.contextmanager
def atomic_dir(root: Path) -> Iterator[Path]:
    """Build into a temporary sibling of ``root``; when the block succeeds it replaces ``root`` (files
    made readable by all: mkdtemp creates 0700), when it fails it is removed: never a half output."""
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.tmp-", dir=root.parent))
    try:
        yield tmp
        for path in [tmp, *tmp.rglob("*")]:
            path.chmod(0o755 if path.is_dir() else 0o644)
        if root.exists():
            shutil.rmtree(root)
        tmp.rename(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextlib.contextmanager
def atomic_file(path: Path, mode: str = "w", *, suffix: str = "") -> Iterator[IO[Any]]:
    """An open file (``mode`` ``"w"``: text in UTF-8, ``"wb"``: bytes) on a temporary sibling of ``path``
    (named ``.<name>.<random><suffix>``), renamed to ``path`` when the block succeeds."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    try:
        with os.fdopen(fd, mode, encoding=None if "b" in mode else "utf-8") as f:
            yield f
        os.chmod(tmp, 0o644)  # mkstemp creates 0600
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text_atomic(path: Path, text: str, *, overwrite: bool = True) -> None:
    """Write to a temporary sibling and rename: readers never see a half file."""
    if path.exists() and not overwrite:
        raise OutputExistsError(f"{path} exists; pass --overwrite to replace it")
    with atomic_file(path) as f:
        f.write(text)
