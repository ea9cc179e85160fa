"""Write a Hugging Face model directory shard by shard, atomically."""

from __future__ import annotations

import contextlib
import json
import os
import queue
import shutil
import struct
import tempfile
import threading
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

import torch
from safetensors.torch import save_file

from evomerge.checkpoints.model_dir import INDEX_FILE, TOKENIZER_FILES, safetensors_dtype_name
from evomerge.errors import CheckpointError, OutputExistsError

__all__ = ["DEFAULT_MAX_SHARD_BYTES", "DTYPES", "EXTRA_FILES", "ModelWriter", "dtype_name", "shard_file_name"]

DEFAULT_MAX_SHARD_BYTES = 2**31
EXTRA_FILES: tuple[str, ...] = ("generation_config.json",)
"""Non-tokenizer files copied from the tokenizer source as well."""


DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}
"""The dtypes a model is written in, by the name config.json uses (:func:`dtype_name` is the inverse)."""


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
        self._stream: _ShardStream | None = None

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
    def plan(self, entries: Sequence[tuple[str, tuple[int, ...], torch.dtype]]) -> None:
        """Announce every tensor (name, shape, dtype) in the order they will be added.

        The shards and their safetensors headers are then fixed up front, and each :meth:`add` streams the
        tensor's bytes straight to its shard file on a background thread (at most two tensors queued), so
        memory does not grow with the shard size and writing overlaps the caller's computing.
        """
        if self._buffer or self._shards or self._stream is not None:
            raise ValueError("plan() must come before the first add()")
        self._stream = _ShardStream(self._ensure_tmp(), entries, self._max)
        self._total = self._stream.total_bytes

    def add(self, name: str, tensor: torch.Tensor) -> None:
        """Queue one tensor; writes a shard when the buffer reaches ``max_shard_bytes`` (or, after
        :meth:`plan`, hands it to the background shard stream)."""
        self._ensure_tmp()
        if self._stream is not None:
            self._stream.put(name, tensor, self._out)
            return
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
        try:
            save_file(self._buffer, str(path), metadata={"format": "pt"})
        except Exception as exc:  # safetensors reports I/O errors as its own exception type
            raise CheckpointError(_write_error(self._out, exc)) from None
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
        chat_template: str | None = None,
    ) -> Path:
        """Write the last shard, index, config, tokenizer files and README, then move into place.
        ``chat_template``: the output's chat template (chat_template.jinja and tokenizer_config.json's
        ``chat_template``) instead of the tokenizer source's."""
        tmp = self._ensure_tmp()
        try:
            weight_map = self._write_shards(tmp)
            self._write_metadata(tmp, weight_map, config, dtype, tokenizer_source, model_card)
            if chat_template is not None:
                _write_chat_template(tmp, chat_template)
        except OSError as exc:
            raise CheckpointError(_write_error(self._out, exc)) from None
        self._commit(tmp)
        return self._out

    def _write_shards(self, tmp: Path) -> dict[str, str]:
        if self._stream is not None:
            return self._stream.finish(self._out)
        self._flush()
        count = len(self._shards)
        if count == 0:
            raise CheckpointError(f"no tensors were written for {self._out}")
        names = [shard_file_name(i + 1, count) for i in range(count)]
        for src, dst in zip(self._shards, names, strict=True):
            src.rename(tmp / dst)
        return {name: names[idx] for name, idx in sorted(self._shard_of.items())}

    def _write_metadata(
        self,
        tmp: Path,
        weight_map: dict[str, str],
        config: dict[str, Any],
        dtype: torch.dtype,
        tokenizer_source: Path | None,
        model_card: str,
    ) -> None:
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
        if self._stream is not None:
            self._stream.stop()
            self._stream = None
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


def _write_error(out: Path, exc: BaseException) -> str:
    """One line for a failed write (disk full, file too large, permission...)."""
    if isinstance(exc, OSError):
        reason = exc.strerror or type(exc).__name__
    else:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return f"cannot write {out}: {reason}; nothing was left behind"


_ALIGN = 8
_STOP = object()


class _ShardStream:
    """Safetensors shards whose layout is fixed in advance, written tensor by tensor on a thread."""

    def __init__(
        self, tmp: Path, entries: Sequence[tuple[str, tuple[int, ...], torch.dtype]], max_bytes: int
    ) -> None:
        groups: list[list[tuple[str, tuple[int, ...], torch.dtype, int]]] = []
        current: list[tuple[str, tuple[int, ...], torch.dtype, int]] = []
        size = 0
        for name, shape, dtype in entries:
            numel = 1
            for dim in shape:
                numel *= int(dim)
            nbytes = numel * torch.empty((), dtype=dtype).element_size()
            if current and size + nbytes > max_bytes:
                groups.append(current)
                current, size = [], 0
            current.append((name, tuple(int(d) for d in shape), dtype, nbytes))
            size += nbytes
        if current:
            groups.append(current)
        if not groups:
            raise CheckpointError("nothing to write: no tensors were planned")
        count = len(groups)
        self.files = [shard_file_name(i + 1, count) for i in range(count)]
        self.order: list[tuple[str, tuple[int, ...], torch.dtype, int]] = []
        self.shard_of: dict[str, int] = {}
        self.headers: list[bytes] = []
        self.total_bytes = 0
        for index, group in enumerate(groups):
            header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
            offset = 0
            for name, shape, dtype, nbytes in group:
                header[name] = {
                    "dtype": safetensors_dtype_name(dtype),
                    "shape": list(shape),
                    "data_offsets": [offset, offset + nbytes],
                }
                offset += nbytes
                self.shard_of[name] = index
                self.order.append((name, shape, dtype, nbytes))
            text = json.dumps(header, separators=(",", ":")).encode()
            text += b" " * (-len(text) % _ALIGN)
            self.headers.append(struct.pack("<Q", len(text)) + text)
            self.total_bytes += offset
        self.tmp = tmp
        self.next = 0
        self.error: BaseException | None = None
        self.stopped = False
        self.queue: queue.Queue[Any] = queue.Queue(maxsize=2)
        self.thread = threading.Thread(target=self._run, name="evomerge-shard-writer", daemon=True)
        self.thread.start()

    def put(self, name: str, tensor: torch.Tensor, out: Path) -> None:
        if self.error is not None:
            raise CheckpointError(_write_error(out, self.error))
        if self.next >= len(self.order):
            raise ValueError(f"tensor {name!r} was not planned (all planned tensors were added)")
        want, shape, dtype, _ = self.order[self.next]
        if name != want:
            raise ValueError(f"tensors must be added in the planned order: expected {want!r}, got {name!r}")
        if tuple(tensor.shape) != shape or tensor.dtype != dtype:
            raise ValueError(
                f"tensor {name!r} is {tensor.dtype} {list(tensor.shape)}, planned {dtype} {list(shape)}"
            )
        self.next += 1
        t = tensor.detach()
        if t.device.type != "cpu":
            t = t.cpu()
        self.queue.put(t.contiguous())

    def _run(self) -> None:
        handle = None
        shard = -1
        try:
            for name, _, _, _ in self.order:
                item = self.queue.get()
                if item is _STOP or self.stopped:
                    return
                index = self.shard_of[name]
                if index != shard:
                    if handle is not None:
                        handle.close()
                    shard = index
                    handle = open(self.tmp / self.files[index], "wb")  # noqa: SIM115 (closed below)
                    handle.write(self.headers[index])
                tensor: torch.Tensor = item
                if tensor.numel() and handle is not None:
                    handle.write(tensor.reshape(-1).view(torch.uint8).numpy().data)
                del item, tensor
            if handle is not None:
                handle.close()
                handle = None
        except BaseException as exc:  # reported to the producer on its next put() or at finish()
            self.error = exc
            while True:  # unblock a producer waiting on a full queue
                try:
                    self.queue.get_nowait()
                except queue.Empty:
                    break
        finally:
            if handle is not None:
                with contextlib.suppress(OSError):  # the write error was recorded; closing may fail too
                    handle.close()

    def finish(self, out: Path) -> dict[str, str]:
        """Wait for the writes; the weight map. CheckpointError when a write failed."""
        if self.error is None and self.next != len(self.order):
            missing = self.order[self.next][0]
            self.stop()
            raise ValueError(f"planned tensor {missing!r} was never added")
        self.thread.join()
        if self.error is not None:
            raise CheckpointError(_write_error(out, self.error))
        return {name: self.files[index] for name, index in sorted(self.shard_of.items())}

    def stop(self) -> None:
        """Abandon the stream (the writer thread exits; files are removed with the temp directory)."""
        self.stopped = True
        while True:  # make room, then wake the thread if it waits for an item
            try:
                self.queue.get_nowait()
            except queue.Empty:
                break
        self.queue.put(_STOP)
        self.thread.join()


def _write_chat_template(root: Path, template: str) -> None:
    """Make ``template`` the chat template of the tokenizer files in ``root`` (transformers reads
    chat_template.jinja first; tokenizer_config.json's entry is kept in step for older readers)."""
    (root / "chat_template.jinja").write_text(template, encoding="utf-8")
    (root / "chat_template.json").unlink(missing_ok=True)
    config = root / "tokenizer_config.json"
    if config.is_file():
        data = json.loads(config.read_text(encoding="utf-8"))
        data["chat_template"] = template
        config.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
