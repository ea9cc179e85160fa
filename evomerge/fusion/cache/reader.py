"""A finished source cache read lazily: :class:`SourceCache` (shard headers checked on opening) and
:class:`CachedSequence` (one sequence's tensors, read on access)."""

from __future__ import annotations

import bisect
import contextlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import torch
from safetensors import SafetensorError

from evomerge.errors import CheckpointError
from evomerge.fusion.cache.storage import (
    FORMAT_VERSION,
    MANIFEST,
    _one_line,
    _read_manifest,
    _read_shard_header,
    _shard_plan,
)
from evomerge.fusion.data import IGNORE_INDEX


@dataclass(frozen=True)
class CachedSequence:
    """One cached sequence (see the package docstring for the conventions)."""

    id: str
    input_ids: torch.Tensor
    """[T] int64, the source's token ids."""
    labels: torch.Tensor
    """[T] int64, the id on response tokens and -100 elsewhere."""
    char_offsets: torch.Tensor
    """[T, 2] int64, each token's character span in the rendered text ((0, 0) for added specials)."""
    topk_ids: torch.Tensor
    """[T, k] int64; row t is predicting token t; row 0 is -1."""
    topk_logprobs: torch.Tensor
    """[T, k] float32, sorted descending per row; row 0 is -inf."""
    ce: float
    """Mean cross-entropy (nats) on the response tokens; NaN if there are none."""
    tokens: list[str]
    """The source tokenizer's token strings (with its space markers)."""

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def response_mask(self) -> torch.Tensor:
        """[T] bool, True on response tokens."""
        return self.labels != IGNORE_INDEX


class _Shard:
    def __init__(self, path: Path, start: int, stop: int, k: int) -> None:
        self.path = path
        self.start = start
        self.stop = stop
        handle, meta, n, rows = _read_shard_header(path, k)
        self.handle: Any = handle
        if n != stop - start:
            self.close()
            raise CheckpointError(
                f"{path}: corrupt cache file (holds {n} sequences, expected {stop - start})"
            )
        try:
            offsets = handle.get_tensor("offsets").to(torch.int64)
        except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
            self.close()
            raise CheckpointError(f"{path}: corrupt cache file ({_one_line(exc)})") from None
        if int(offsets[0]) != 0 or int(offsets[-1]) != rows or bool((offsets[1:] < offsets[:-1]).any()):
            self.close()
            raise CheckpointError(f"{path}: corrupt cache file (bad sequence offsets)")
        self.offsets = offsets
        self._meta = meta
        self._ids: list[str] | None = None
        self._tokens: list[list[str]] | None = None
        self._ce: torch.Tensor | None = None

    def _json_meta(self, key: str) -> Any:
        try:
            return json.loads(self._meta[key])
        except (KeyError, ValueError) as exc:
            raise CheckpointError(
                f"{self.path}: corrupt cache file (metadata {key!r}: {_one_line(exc)})"
            ) from None

    def ids(self) -> list[str]:
        if self._ids is None:
            ids = self._json_meta("pair_ids")
            if not isinstance(ids, list) or len(ids) != self.stop - self.start:
                raise CheckpointError(f"{self.path}: corrupt cache file (metadata 'pair_ids')")
            self._ids = [str(i) for i in ids]
        return self._ids

    def tokens(self, local: int) -> list[str]:
        if self._tokens is None:
            tokens = self._json_meta("tokens")
            if not isinstance(tokens, list) or len(tokens) != self.stop - self.start:
                raise CheckpointError(f"{self.path}: corrupt cache file (metadata 'tokens')")
            self._tokens = tokens
        row = self._tokens[local]
        if not isinstance(row, list) or len(row) != int(self.offsets[local + 1] - self.offsets[local]):
            raise CheckpointError(f"{self.path}: corrupt cache file (token strings of sequence {local})")
        return [str(t) for t in row]

    def read(self, name: str, a: int, b: int) -> torch.Tensor:
        try:
            out: torch.Tensor = self.handle.get_slice(name)[a:b]
        except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
            raise CheckpointError(f"{self.path}: corrupt cache file ({_one_line(exc)})") from None
        return out

    def ce(self) -> torch.Tensor:
        if self._ce is None:
            self._ce = self.read("ce", 0, self.stop - self.start).to(torch.float32)
        return self._ce

    def sequence(self, local: int) -> CachedSequence:
        a, b = int(self.offsets[local]), int(self.offsets[local + 1])
        return CachedSequence(
            id=self.ids()[local],
            input_ids=self.read("input_ids", a, b).to(torch.int64),
            labels=self.read("labels", a, b).to(torch.int64),
            char_offsets=self.read("char_offsets", a, b).to(torch.int64),
            topk_ids=self.read("topk_ids", a, b).to(torch.int64),
            topk_logprobs=self.read("topk_logprobs", a, b).to(torch.float32),
            ce=float(self.ce()[local]),
            tokens=self.tokens(local),
        )

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.handle.__exit__(None, None, None)


class SourceCache:
    """A finished source cache, read lazily: shard headers are checked on opening, tensors are read per
    sequence on :meth:`__getitem__`. Problems raise :class:`~evomerge.errors.CheckpointError` (one line)."""

    def __init__(self, path: Path, manifest: dict[str, Any], shards: list[_Shard]) -> None:
        self._path = path
        self._manifest = manifest
        self._shards = shards
        self._starts = [s.start for s in shards]
        self._ids: list[str] = [str(i) for i in manifest["pair_ids"]]
        self._index: dict[str, int] | None = None

    @classmethod
    def open(cls, path: str | Path) -> SourceCache:
        root = Path(path).expanduser()
        if not root.exists():
            raise CheckpointError(f"source cache does not exist: {root}")
        if not root.is_dir():
            raise CheckpointError(f"source cache is not a directory: {root}")
        manifest_path = root / MANIFEST
        if not manifest_path.is_file():
            raise CheckpointError(f"{root} is not a source cache (no {MANIFEST})")
        manifest = _read_manifest(manifest_path)
        if manifest.get("version") != FORMAT_VERSION:
            raise CheckpointError(
                f"{manifest_path}: cache format version {manifest.get('version')!r} is not {FORMAT_VERSION}"
            )
        plan = _shard_plan(manifest, manifest_path)
        ids = manifest.get("pair_ids")
        k = manifest.get("top_k")
        if not isinstance(ids, list) or not isinstance(k, int) or (plan and plan[-1][2] != len(ids)):
            raise CheckpointError(f"{manifest_path}: corrupt cache file (pair ids do not match the shards)")
        complete = set(manifest.get("complete_shards") or [])
        missing = [file for file, _, _ in plan if file not in complete]
        if missing or not plan:
            raise CheckpointError(
                f"{root}: incomplete source cache ({len(plan) - len(missing)} of {len(plan)} shards done); "
                "run the source pass again with the same settings to finish it"
            )
        shards: list[_Shard] = []
        try:
            for file, start, stop in plan:
                shards.append(_Shard(root / file, start, stop, k))
        except BaseException:
            for shard in shards:
                shard.close()
            raise
        return cls(root, manifest, shards)

    # ------------------------------------------------------------------ access
    @property
    def path(self) -> Path:
        return self._path

    @property
    def manifest(self) -> dict[str, Any]:
        return dict(self._manifest)

    @property
    def top_k(self) -> int:
        return int(self._manifest["top_k"])

    @property
    def ids(self) -> list[str]:
        """The pair ids, in cache order."""
        return list(self._ids)

    def index(self, pair_id: str) -> int:
        """The position of the pair with id ``pair_id`` (KeyError when absent)."""
        if self._index is None:
            self._index = {pid: i for i, pid in enumerate(self._ids)}
        return self._index[pair_id]

    def __len__(self) -> int:
        return len(self._ids)

    def __getitem__(self, i: int) -> CachedSequence:
        n = len(self._ids)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"sequence {i} out of range for a cache of {n}")
        shard = self._shards[bisect.bisect_right(self._starts, i) - 1]
        return shard.sequence(i - shard.start)

    def __iter__(self) -> Iterator[CachedSequence]:
        for i in range(len(self)):
            yield self[i]

    @property
    def ce(self) -> torch.Tensor:
        """[n] float32: every sequence's cross-entropy on its response (NaN where it has none)."""
        return torch.cat([s.ce() for s in self._shards])

    def close(self) -> None:
        for shard in self._shards:
            shard.close()

    def __enter__(self) -> SourceCache:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"SourceCache({str(self._path)!r}, sequences={len(self)}, top_k={self.top_k})"
