"""The on-disk format of a source cache: file names and constants, the manifest and shard headers read
and checked (one-line CheckpointError for anything corrupt), and atomic writes (see the package
docstring for the layout)."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from evomerge.errors import CheckpointError

CACHE_FORMAT = "evomerge-source-cache"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
ROW_CONVENTION = "row t is the distribution predicting token t (from logits at t-1); row 0 is invalid"

_LOGPROB_DTYPES: dict[torch.dtype, str] = {torch.float32: "float32", torch.float16: "float16"}
_TENSORS = ("offsets", "input_ids", "labels", "char_offsets", "topk_ids", "topk_logprobs", "ce")
_MATCH_KEYS = (
    "format",
    "version",
    "source",
    "source_fingerprint",
    "tokenizer_vocab_size",
    "top_k",
    "max_len",
    "template",
    "chat",
    "compute_dtype",
    "logprob_dtype",
    "data_hash",
    "token_hash",
    "pair_ids",
    "shard_size",
)
"""Manifest fields that must be equal for an existing cache to be resumed."""


def shard_name(index: int) -> str:
    """The file name of shard ``index`` (from 0)."""
    return f"shard-{index:05d}.safetensors"


def _one_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


def _fsync(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=1)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _save_shard_atomic(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=metadata)
        _fsync(Path(tmp))
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# ---------------------------------------------------------------------------------------------- shards
def _read_shard_header(path: Path, k: int | None = None) -> tuple[Any, dict[str, str], int, int]:
    """Open a shard and check its layout: (handle, metadata, sequences, rows). CheckpointError if bad."""
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise CheckpointError(f"{path}: missing cache file ({_one_line(exc)})") from None
    if size == 0:
        raise CheckpointError(f"{path}: empty cache file")
    try:
        handle: Any = safe_open(str(path), framework="pt")
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: corrupt cache file ({_one_line(exc)})") from None
    try:
        meta = handle.metadata() or {}
        if meta.get("format") != CACHE_FORMAT:
            raise CheckpointError(f"{path}: not a source cache shard")
        missing = [name for name in _TENSORS if name not in set(handle.keys())]
        if missing:
            raise CheckpointError(f"{path}: corrupt cache file (tensors missing: {', '.join(missing)})")
        shapes = {name: tuple(handle.get_slice(name).get_shape()) for name in _TENSORS}
        n = shapes["ce"][0] if len(shapes["ce"]) == 1 else -1
        rows = shapes["input_ids"][0] if len(shapes["input_ids"]) == 1 else -1
        top = shapes["topk_ids"][1] if len(shapes["topk_ids"]) == 2 else -1
        expected = {
            "offsets": (n + 1,),
            "labels": (rows,),
            "char_offsets": (rows, 2),
            "topk_ids": (rows, top),
            "topk_logprobs": (rows, top),
        }
        bad = [name for name, shape in expected.items() if shapes[name] != shape]
        if n < 0 or rows < 0 or top < 1 or bad or (k is not None and top != k):
            raise CheckpointError(f"{path}: corrupt cache file (inconsistent tensor shapes)")
    except BaseException:
        with contextlib.suppress(Exception):
            handle.__exit__(None, None, None)
        raise
    return handle, meta, n, rows


def _shard_is_complete(path: Path, count: int, k: int) -> bool:
    """Whether ``path`` is a readable shard of ``count`` sequences with top-k ``k``."""
    try:
        handle, _, n, _ = _read_shard_header(path, k)
    except CheckpointError:
        return False
    with contextlib.suppress(Exception):
        handle.__exit__(None, None, None)
    return n == count


def _read_manifest(path: Path) -> dict[str, Any]:
    """The parsed manifest; CheckpointError for an empty, unreadable or non-object file."""
    try:
        raw = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path}: unreadable cache manifest ({_one_line(exc)})") from None
    if not raw.strip():
        raise CheckpointError(f"{path}: empty cache file")
    try:
        data = json.loads(raw)
    except ValueError as exc:
        raise CheckpointError(f"{path}: corrupt cache file ({_one_line(exc)})") from None
    if not isinstance(data, dict) or data.get("format") != CACHE_FORMAT:
        raise CheckpointError(f"{path}: not a source cache manifest")
    return data


def _shard_plan(manifest: dict[str, Any], path: Path) -> list[tuple[str, int, int]]:
    plan = manifest.get("shards")
    if not isinstance(plan, list):
        raise CheckpointError(f"{path}: corrupt cache file (no shard list)")
    out: list[tuple[str, int, int]] = []
    expected_start = 0
    for entry in plan:
        try:
            file, start, stop = str(entry["file"]), int(entry["start"]), int(entry["stop"])
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{path}: corrupt cache file (bad shard entry)") from None
        if start != expected_start or stop <= start or "/" in file or file.startswith("."):
            raise CheckpointError(f"{path}: corrupt cache file (bad shard entry {file!r})")
        out.append((file, start, stop))
        expected_start = stop
    return out
