"""Read a Hugging Face model directory (safetensors only), one tensor at a time."""

from __future__ import annotations

import contextlib
import json
import os
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from evomerge.checkpoints.layers import layer_index
from evomerge.errors import CheckpointError, first_line

__all__ = [
    "INDEX_FILE",
    "PICKLE_SUFFIXES",
    "SINGLE_FILE",
    "TOKENIZER_FILES",
    "ModelDir",
    "TensorInfo",
    "safetensors_dtype_name",
    "torch_dtype_from_safetensors",
]

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")

TOKENIZER_FILES: tuple[str, ...] = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "spiece.model",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
)
"""Tokenizer files copied next to a merged model when they exist in the tokenizer source."""

_ST_TO_TORCH: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
_TORCH_TO_ST = {v: k for k, v in _ST_TO_TORCH.items()}


def torch_dtype_from_safetensors(name: str) -> torch.dtype:
    """The torch dtype for a safetensors dtype string such as ``"BF16"``."""
    try:
        return _ST_TO_TORCH[name]
    except KeyError:
        raise CheckpointError(f"unsupported safetensors dtype {name!r}") from None


def safetensors_dtype_name(dtype: torch.dtype) -> str:
    """The safetensors spelling (``"F32"``, ``"BF16"``, ...) of a torch dtype."""
    try:
        return _TORCH_TO_ST[dtype]
    except KeyError:
        raise CheckpointError(f"unsupported tensor dtype {dtype}") from None


@dataclass(frozen=True)
class TensorInfo:
    """What a checkpoint says about one tensor, read from the file header without loading data."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    """The dtype as safetensors spells it, e.g. ``"BF16"`` or ``"F32"``."""
    file: str
    """The file name (relative to the model directory) that holds the tensor."""

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    @property
    def is_float(self) -> bool:
        return self.dtype in ("F64", "F32", "F16", "BF16") or self.dtype.startswith("F8")


class ModelDir:
    """A Hugging Face model directory holding ``model.safetensors`` or an indexed set of shards.

    Opening validates the layout and every file header (no tensor data is read). Tensors are read one at
    a time with :meth:`read`; file handles stay open until :meth:`close` (or the end of a ``with`` block).
    Every problem raises :class:`~evomerge.errors.CheckpointError` with a one-line message.
    """

    def __init__(self, path: str | Path, *, allow_pickle: bool = False) -> None:
        self._path = Path(path).expanduser()
        self._allow_pickle = allow_pickle
        self._fds: dict[str, int] = {}
        self._offsets: dict[str, tuple[int, int]] = {}
        self._pickled: dict[str, dict[str, torch.Tensor]] = {}
        p = self._path
        if not p.exists():
            raise CheckpointError(f"model directory does not exist: {p}")
        if not p.is_dir():
            raise CheckpointError(f"model path is not a directory: {p}")
        self._config = self._read_config()
        self._handles: dict[str, Any] = {}
        self._closed = False
        try:
            self._weight_map, self._order = self._open_files()
        except BaseException:
            self.close()
            raise

    # ------------------------------------------------------------------ layout
    def _read_config(self) -> dict[str, Any]:
        cfg_path = self._path / "config.json"
        if not cfg_path.is_file():
            return {}
        try:
            data = json.loads(cfg_path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise CheckpointError(f"{cfg_path}: unreadable config.json ({first_line(exc)})") from None
        if not isinstance(data, dict):
            raise CheckpointError(f"{cfg_path}: config.json is not a JSON object")
        return data

    def _files_from_index(self) -> dict[str, list[str]]:
        index_path = self._path / INDEX_FILE
        try:
            index = json.loads(index_path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise CheckpointError(f"{index_path}: unreadable index ({first_line(exc)})") from None
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(weight_map, dict) or not weight_map:
            raise CheckpointError(f"{index_path}: index has no weight_map")
        files: dict[str, list[str]] = {}
        for name, file in weight_map.items():
            if not isinstance(file, str) or not file:
                raise CheckpointError(f"{index_path}: weight_map entry for {name!r} is not a file name")
            files.setdefault(file, []).append(name)
        for file in files:
            if not (self._path / file).is_file():
                raise CheckpointError(f"{index_path}: index lists {file} but that file is missing")
        return files

    def _no_weights_error(self) -> CheckpointError:
        def listing(names: list[str]) -> str:
            return ", ".join(names[:3]) + (f", ... ({len(names)} files)" if len(names) > 3 else "")

        shards = sorted(f.name for f in self._path.glob("*.safetensors"))
        if shards:
            return CheckpointError(
                f"{self._path} holds safetensors files ({listing(shards)}) but neither {SINGLE_FILE} "
                f"nor {INDEX_FILE}"
            )
        pickles = sorted(f.name for f in self._path.iterdir() if f.suffix in PICKLE_SUFFIXES)
        if pickles:
            return CheckpointError(
                f"{self._path} holds only pickle weights ({listing(pickles)}); they are refused unless "
                "you allow pickle (--allow-pickle loads them with weights_only=True)"
            )
        return CheckpointError(f"{self._path} holds no safetensors weights ({SINGLE_FILE} or {INDEX_FILE})")

    def _index_offsets(self, file: str) -> None:
        """Absolute byte ranges of every tensor in ``file`` (the header was validated by safe_open)."""
        full = self._path / file
        fd = os.open(full, os.O_RDONLY)
        self._fds[file] = fd
        (length,) = struct.unpack("<Q", os.pread(fd, 8, 0))
        header = json.loads(os.pread(fd, length, 8))
        start = 8 + length
        for name, entry in header.items():
            if name != "__metadata__":
                begin, end = entry["data_offsets"]
                self._offsets[name] = (start + int(begin), start + int(end))

    # ------------------------------------------------------------------ pickle (opt-in only)
    def _pickle_files(self) -> list[str]:
        index = self._path / "pytorch_model.bin.index.json"
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            except (OSError, ValueError, KeyError, TypeError) as exc:
                raise CheckpointError(f"{index}: unreadable index ({first_line(exc)})") from None
            return sorted(set(weight_map.values()))
        return sorted(f.name for f in self._path.iterdir() if f.suffix in PICKLE_SUFFIXES)

    def _open_pickles(self) -> tuple[dict[str, str], list[str]]:
        """Load pickle weights with ``torch.load(weights_only=True)``: plain tensors only, no code runs."""
        weight_map: dict[str, str] = {}
        order: list[str] = []
        for file in self._pickle_files():
            full = self._path / file
            try:
                state = torch.load(full, map_location="cpu", weights_only=True, mmap=True)
            except Exception as exc:  # torch raises many types for bad or unsafe pickles
                raise CheckpointError(
                    f"{full}: cannot load pickle weights safely ({first_line(exc)})"
                ) from None
            if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
                state = state["state_dict"]
            if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
                raise CheckpointError(f"{full}: not a state dict of tensors")
            self._pickled[file] = state
            self._register(weight_map, order, state, file)
        return weight_map, order

    def _register(self, weight_map: dict[str, str], order: list[str], keys: Iterable[str], file: str) -> None:
        """Record that ``file`` holds ``keys`` (in order); a tensor in two files is an error."""
        for key in keys:
            if key in weight_map:
                raise CheckpointError(f"{self._path}: tensor {key!r} appears in several files")
            weight_map[key] = file
            order.append(key)

    @property
    def is_pickle(self) -> bool:
        """Whether the weights came from pickle files (only with ``allow_pickle``)."""
        return bool(self._pickled)

    def _open(self, file: str) -> Any:
        full = self._path / file
        try:
            handle = safe_open(str(full), framework="pt")
        except (SafetensorError, OSError) as exc:
            raise CheckpointError(f"{full}: corrupt safetensors file ({first_line(exc)})") from None
        self._handles[file] = handle
        return handle

    def _open_files(self) -> tuple[dict[str, str], list[str]]:
        if (self._path / INDEX_FILE).is_file():
            expected: dict[str, list[str]] | None = self._files_from_index()
            files = sorted(expected) if expected else []
        elif (self._path / SINGLE_FILE).is_file():
            expected = None
            files = [SINGLE_FILE]
        elif self._allow_pickle and self._pickle_files():
            return self._open_pickles()
        else:
            raise self._no_weights_error()
        weight_map: dict[str, str] = {}
        order: list[str] = []
        for file in files:
            handle = self._open(file)
            self._index_offsets(file)
            offset_keys = getattr(handle, "offset_keys", None)
            keys: list[str] = list(offset_keys() if offset_keys is not None else handle.keys())
            if expected is not None:
                present = set(keys)
                for name in expected[file]:
                    if name not in present:
                        raise CheckpointError(
                            f"{self._path / INDEX_FILE}: index names tensor {name!r} but {file} lacks it"
                        )
                wanted = set(expected[file])
                keys = [k for k in keys if k in wanted]
            self._register(weight_map, order, keys, file)
        return weight_map, order

    # ------------------------------------------------------------------ public API
    @property
    def path(self) -> Path:
        return self._path

    @property
    def config(self) -> dict[str, Any]:
        """The parsed ``config.json`` ({} when the directory has none)."""
        return self._config

    @property
    def files(self) -> list[str]:
        """The safetensors files (relative names) holding the weights."""
        return list(self._handles)

    def tensor_names(self) -> list[str]:
        """All tensor names, in a stable order: file by file, in storage order within each file."""
        return list(self._order)

    def __contains__(self, name: object) -> bool:
        return name in self._weight_map

    def __len__(self) -> int:
        return len(self._order)

    def _file_of(self, name: str) -> str:
        if self._closed:
            raise CheckpointError(f"{self._path}: model directory was closed")
        try:
            return self._weight_map[name]
        except KeyError:
            raise CheckpointError(f"{self._path}: no tensor named {name!r}") from None

    def _handle(self, name: str) -> Any:
        if self._closed:
            raise CheckpointError(f"{self._path}: model directory was closed")
        try:
            file = self._weight_map[name]
        except KeyError:
            raise CheckpointError(f"{self._path}: no tensor named {name!r}") from None
        return self._handles[file]

    def info(self, name: str) -> TensorInfo:
        """Shape, dtype and file of one tensor, from the header only."""
        if self._pickled:
            t = self._pickled[self._file_of(name)][name]
            return TensorInfo(
                name=name,
                shape=tuple(int(s) for s in t.shape),
                dtype=safetensors_dtype_name(t.dtype),
                file=self._weight_map[name],
            )
        sl = self._handle(name).get_slice(name)
        return TensorInfo(
            name=name,
            shape=tuple(int(s) for s in sl.get_shape()),
            dtype=str(sl.get_dtype()),
            file=self._weight_map[name],
        )

    def infos(self) -> dict[str, TensorInfo]:
        """:class:`TensorInfo` for every tensor (in :meth:`tensor_names` order), without loading data."""
        return {name: self.info(name) for name in self._order}

    def read(self, name: str) -> torch.Tensor:
        """Load one tensor (on CPU, in its stored dtype) into memory of its own.

        Safetensors data is read with ``pread`` straight into the tensor's buffer (no memory map stays
        behind, so reading a whole model does not grow the process's resident memory).
        """
        file = self._file_of(name)
        if self._pickled:
            return self._pickled[file][name]
        info = self.info(name)
        begin, end = self._offsets[name]
        dtype = torch_dtype_from_safetensors(info.dtype)
        buffer = torch.empty(end - begin, dtype=torch.uint8)
        if end > begin:
            view = buffer.numpy().data
            got = 0
            fd = self._fds[file]
            while got < end - begin:
                n = os.preadv(fd, [view[got:]], begin + got)
                if n <= 0:
                    raise CheckpointError(
                        f"{self._path / file}: truncated file, cannot read tensor {name!r} "
                        f"({end - begin - got} bytes missing)"
                    )
                got += n
        return buffer.view(dtype).reshape(info.shape)

    @property
    def num_layers(self) -> int:
        """``num_hidden_layers`` from the config (also a nested ``text_config``), else inferred from names."""
        for cfg in (self._config, self._config.get("text_config")):
            if isinstance(cfg, dict):
                for key in ("num_hidden_layers", "n_layer", "num_layers"):
                    value = cfg.get(key)
                    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                        return value
        indices = [i for i in (layer_index(n) for n in self._order) if i is not None]
        return max(indices) + 1 if indices else 0

    @property
    def tokenizer_files(self) -> list[str]:
        """Tokenizer files present in the directory (names from :data:`TOKENIZER_FILES`)."""
        return [f for f in TOKENIZER_FILES if (self._path / f).is_file()]

    @property
    def has_tokenizer(self) -> bool:
        return any(f in self.tokenizer_files for f in ("tokenizer.json", "tokenizer.model", "vocab.json"))

    @property
    def torch_dtype(self) -> torch.dtype | None:
        """The dtype the config declares (``dtype`` or ``torch_dtype``), if it is a known float dtype."""
        for key in ("dtype", "torch_dtype"):
            value = self._config.get(key)
            if isinstance(value, str):
                dtype = getattr(torch, value.removeprefix("torch."), None)
                if isinstance(dtype, torch.dtype) and dtype.is_floating_point:
                    return dtype
        return None

    def close(self) -> None:
        """Close all file handles (idempotent)."""
        for handle in self._handles.values():
            with contextlib.suppress(Exception):  # closing is best effort
                handle.__exit__(None, None, None)
        for fd in self._fds.values():
            with contextlib.suppress(OSError):
                os.close(fd)
        self._fds = {}
        self._pickled = {}
        self._closed = True

    def __enter__(self) -> ModelDir:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"ModelDir({str(self._path)!r}, tensors={len(self._order)})"
