"""Write a Hugging Face model directory shard by shard, atomically."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from types import TracebackType
from typing import Any

import torch
from safetensors.torch import save_file

from evomerge.checkpoints.model_dir import INDEX_FILE, TOKENIZER_FILES
from evomerge.errors import CheckpointError, OutputExistsError

__all__ = ["DEFAULT_MAX_SHARD_BYTES", "EXTRA_FILES", "ModelWriter", "dtype_name", "shard_file_name"]

DEFAULT_MAX_SHARD_BYTES = 2**31
EXTRA_FILES: tuple[str, ...] = ("generation_config.json",)
"""Non-tokenizer files copied from the tokenizer source as well."""


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` -> ``"bfloat16"`` (the spelling config.json uses)."""
    return str(dtype).removeprefix("torch.")


def _exists_message(out: Path) -> str:
    return f"output directory already exists: {out} (pass overwrite to replace it)"


def shard_file_name(index: int, count: int) -> str:
    """The Hugging Face shard name ``model-0000i-of-0000N.safetensors`` (``index`` starts at 1)."""
    return f"model-{index:05d}-of-{count:05d}.safetensors"


class ModelWriter:
    """Writes tensors into ``out_dir`` as safetensors shards plus index, config, tokenizer and model card.

    Everything goes into a temporary sibling directory (``.<name>.tmp-<random>``) that is renamed onto
    ``out_dir`` only by :meth:`finalize`; an exception inside the ``with`` block (or leaving it without
    finalizing) removes the temporary directory and leaves ``out_dir`` untouched. Buffered tensors are
    written out as a shard as soon as they reach ``max_shard_bytes``, so memory stays bounded by about one
    shard. A shard never exceeds ``max_shard_bytes`` unless a single tensor does.

    Raises :class:`~evomerge.errors.OutputExistsError` at construction when ``out_dir`` exists and
    ``overwrite`` is false; with ``overwrite`` the old directory is removed only when the new one is
    complete.
    """

    def __init__(
        self,
        out_dir: str | Path,
        *,
        max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
        overwrite: bool = False,
    ) -> None:
        self._out = Path(os.path.abspath(Path(out_dir).expanduser()))
        if max_shard_bytes <= 0:
            raise CheckpointError(f"max_shard_bytes must be positive, got {max_shard_bytes}")
        if (self._out.exists() or self._out.is_symlink()) and not overwrite:
            raise OutputExistsError(_exists_message(self._out))
        self._max = max_shard_bytes
        self._overwrite = overwrite
        self._tmp: Path | None = None
        self._buffer: dict[str, torch.Tensor] = {}
        self._buffered = 0
        self._total = 0
        self._shards: list[Path] = []
        self._shard_of: dict[str, int] = {}
        self._done = False

    # ------------------------------------------------------------------ state
    @property
    def out_dir(self) -> Path:
        return self._out

    @property
    def temp_dir(self) -> Path | None:
        """The temporary directory being written (None before the first write or after the end)."""
        return self._tmp

    @property
    def total_bytes(self) -> int:
        return self._total

    @property
    def num_shards_written(self) -> int:
        return len(self._shards)

    def _ensure_tmp(self) -> Path:
        if self._done:
            raise ValueError("ModelWriter was already finalized or aborted")
        if self._tmp is None:
            self._out.parent.mkdir(parents=True, exist_ok=True)
            self._tmp = Path(tempfile.mkdtemp(prefix=f".{self._out.name}.tmp-", dir=self._out.parent))
        return self._tmp

    # ------------------------------------------------------------------ writing
    def add(self, name: str, tensor: torch.Tensor) -> None:
        """Queue one tensor; writes a shard when the buffer reaches ``max_shard_bytes``."""
        self._ensure_tmp()
        if name in self._shard_of or name in self._buffer:
            raise ValueError(f"tensor {name!r} was already added")
        t = tensor.detach()
        if t.device.type != "cpu":
            t = t.cpu()
        t = t.contiguous()
        nbytes = t.numel() * t.element_size()
        if t.untyped_storage().nbytes() != nbytes:
            t = t.clone()  # a view into a larger storage: write only what belongs to this tensor
        if self._buffer and self._buffered + nbytes > self._max:
            self._flush()
        self._buffer[name] = t
        self._buffered += nbytes
        self._total += nbytes
        if self._buffered >= self._max:
            self._flush()

    def _flush(self) -> None:
        if not self._buffer:
            return
        tmp = self._ensure_tmp()
        index = len(self._shards)
        path = tmp / f"shard-{index:05d}.safetensors"
        save_file(self._buffer, str(path), metadata={"format": "pt"})
        self._shards.append(path)
        for name in self._buffer:
            self._shard_of[name] = index
        self._buffer = {}
        self._buffered = 0

    def finalize(
        self,
        config: dict[str, Any],
        *,
        dtype: torch.dtype,
        tokenizer_source: Path | None,
        model_card: str,
    ) -> Path:
        """Write the last shard, index, config, tokenizer files and README, then move into place."""
        tmp = self._ensure_tmp()
        self._flush()
        count = len(self._shards)
        if count == 0:
            raise CheckpointError(f"no tensors were written for {self._out}")
        names = [shard_file_name(i + 1, count) for i in range(count)]
        for src, dst in zip(self._shards, names, strict=True):
            src.rename(tmp / dst)
        weight_map = {name: names[idx] for name, idx in sorted(self._shard_of.items())}
        index = {"metadata": {"total_size": self._total}, "weight_map": weight_map}
        (tmp / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")

        cfg = dict(config)
        keys = [k for k in ("dtype", "torch_dtype") if k in cfg] or ["dtype", "torch_dtype"]
        for key in keys:
            cfg[key] = dtype_name(dtype)
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n", encoding="utf-8")

        if tokenizer_source is not None:
            src_dir = Path(tokenizer_source)
            if not src_dir.is_dir():
                raise CheckpointError(f"tokenizer source is not a directory: {src_dir}")
            for file in (*TOKENIZER_FILES, *EXTRA_FILES):
                if (src_dir / file).is_file():
                    shutil.copyfile(src_dir / file, tmp / file)

        (tmp / "README.md").write_text(model_card if model_card.endswith("\n") else model_card + "\n")
        self._commit(tmp)
        return self._out

    def _commit(self, tmp: Path) -> None:
        out = self._out
        _make_readable(tmp)
        old: Path | None = None
        if out.exists() or out.is_symlink():
            if not self._overwrite:
                raise OutputExistsError(_exists_message(out))
            if out.is_dir() and not out.is_symlink():
                old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
                out.rename(old / out.name)
            else:
                out.unlink()
        try:
            tmp.rename(out)
        except BaseException:
            if old is not None:  # put the previous output back
                (old / out.name).rename(out)
                shutil.rmtree(old, ignore_errors=True)
            raise
        self._tmp = None
        self._done = True
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)

    def abort(self) -> None:
        """Drop everything written so far (idempotent); ``out_dir`` is left untouched."""
        self._buffer = {}
        self._buffered = 0
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None
        self._done = True

    # ------------------------------------------------------------------ context manager
    def __enter__(self) -> ModelWriter:
        self._ensure_tmp()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._tmp is not None:
            self.abort()


def _make_readable(root: Path) -> None:
    """mkdtemp creates 0700: give the finished output the usual 0755 / 0644 modes."""
    root.chmod(0o755)
    for p in root.rglob("*"):
        p.chmod(0o755 if p.is_dir() else 0o644)
