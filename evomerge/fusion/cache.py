"""The source pass of heterogeneous fusion and its on-disk cache.

:func:`source_pass` runs a source model once over instruction-response pairs and stores, per sequence,
what distillation needs, so the distillation pass never loads the source again:

* ``input_ids`` [T] and ``labels`` [T] (the id on response tokens, -100 elsewhere) of the source's own
  tokenization (see :func:`evomerge.fusion.data.encode`), the tokens' character ``offsets`` [T, 2] in the
  rendered text and their token strings;
* ``topk_ids`` [T, k] and ``topk_logprobs`` [T, k]: **row t is the source's distribution predicting the
  token at position t**, computed from the logits at position t-1 (top-k of ``log_softmax``, sorted
  descending). Row 0 predicts nothing: its ids are -1 and its log-probs ``-inf``;
* ``ce``: the cross-entropy of the source on the gold response, the mean of ``-log p(token_t)`` over the
  response tokens at positions t >= 1 (nats). A sequence with no response token left after truncation
  has ``ce = NaN`` (listed under ``no_response_tokens`` in the manifest).

On-disk format (``FORMAT_VERSION`` 1), a directory holding:

* ``manifest.json``: the settings the cache was made with (source path and fingerprint, tokenizer class
  and vocab size, top_k, max_len, template, chat, dtypes, data and token hashes, pair ids, the shard plan)
  and ``complete_shards``, the shards already written;
* ``shard-00000.safetensors`` ...: shard j holds sequences ``[j * shard_size, (j + 1) * shard_size)``,
  concatenated along the token axis: ``offsets`` int64 [n+1] (sequence i is rows
  ``offsets[i]:offsets[i+1]``), ``input_ids``/``labels`` int32 [N], ``char_offsets`` int32 [N, 2],
  ``topk_ids`` int32 [N, k], ``topk_logprobs`` float32 (or float16 with ``logprob_dtype``) [N, k] and
  ``ce`` float32 [n]; the header metadata holds the pair ids and the token strings (JSON).

Every shard and every manifest update is written to a temporary sibling and renamed into place, so a
pass that stops (an error, an interrupt, a progress callback that raises) leaves only whole shards;
running it again with the same settings keeps them and computes only the missing sequences.
"""

from __future__ import annotations

import bisect
import contextlib
import hashlib
import json
import math
import os
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from evomerge.checkpoints import ModelDir
from evomerge.errors import CheckpointError, ConfigError
from evomerge.fusion.data import IGNORE_INDEX, Encoded, Pair, RenderedText, encode, render

__all__ = [
    "CACHE_FORMAT",
    "FORMAT_VERSION",
    "MANIFEST",
    "CachedSequence",
    "PassProgress",
    "SourceCache",
    "shard_name",
    "source_pass",
]

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


# ---------------------------------------------------------------------------------------------- records
@dataclass(frozen=True)
class PassProgress:
    """Reported to the ``progress`` callback after every batch of the source pass."""

    computed: int
    """Sequences computed by this call so far."""
    done: int
    """Sequences finished, including those kept from an earlier run."""
    total: int
    shards_written: int
    """Shards complete on disk (kept ones included)."""
    shards_total: int


@dataclass(frozen=True)
class CachedSequence:
    """One cached sequence (see the module docstring for the conventions)."""

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


# ---------------------------------------------------------------------------------------------- atomic files
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


# ---------------------------------------------------------------------------------------------- the cache
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


# ---------------------------------------------------------------------------------------------- the pass
def _hash(data: Any) -> str:
    return hashlib.sha256(json.dumps(data, separators=(",", ":")).encode("utf-8")).hexdigest()


def _source_fingerprint(model: ModelDir) -> str:
    """Hash of config.json and the weight files' names, sizes and modification times."""
    parts: list[Any] = [model.config]
    for file in sorted(model.files):
        st = (model.path / file).stat()
        parts.append([file, st.st_size, st.st_mtime_ns])
    return _hash(parts)


def _load_tokenizer(src: Path, trust_remote_code: bool) -> Any:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(src), trust_remote_code=trust_remote_code)
    except Exception as exc:  # transformers raises OSError, ValueError and others for a bad tokenizer
        raise CheckpointError(f"{src}: cannot load the source tokenizer ({_one_line(exc)})") from None


def _load_model(src: Path, dtype: torch.dtype, device: torch.device, trust_remote_code: bool) -> Any:
    from transformers import AutoModelForCausalLM

    try:
        model: Any = AutoModelForCausalLM.from_pretrained(
            str(src), dtype=dtype, use_safetensors=True, trust_remote_code=trust_remote_code
        )
    except (torch.OutOfMemoryError, MemoryError):
        raise ConfigError(f"out of memory loading the source model {src}") from None
    except Exception as exc:  # transformers raises OSError, ValueError, KeyError ... for a bad model
        raise CheckpointError(f"{src}: cannot load the source model ({_one_line(exc)})") from None
    try:
        model.to(device)
    except (torch.OutOfMemoryError, MemoryError):
        raise ConfigError(f"out of memory moving the source model to {device}") from None
    model.eval()
    return model


def _parse_device(device: str | torch.device) -> torch.device:
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError, TypeError) as exc:
        raise ConfigError(f"invalid device {device!r} ({_one_line(exc)})") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {device!r} asked for but CUDA is not available")
    return dev


def _check_decodes(tokenizer: Any, pairs: Sequence[Pair], encoded: Sequence[Encoded]) -> None:
    """ConfigError when the tokenizer cannot turn the ids of a pair back into non-empty text."""
    for pair, enc in zip(pairs, encoded, strict=True):
        if not any(e > s for s, e in enc.offsets):
            continue
        try:
            text = tokenizer.decode(enc.input_ids, skip_special_tokens=True)
        except Exception as exc:  # a broken decoder can raise anything
            raise ConfigError(
                f"the source tokenizer cannot decode token ids to text ({_one_line(exc)}); pair {pair.id!r}"
            ) from None
        if not isinstance(text, str) or not text.strip():
            raise ConfigError(
                f"the source tokenizer decodes the ids of pair {pair.id!r} to empty text; "
                "it cannot be used as a fusion source"
            )


def _is_oom(exc: BaseException) -> bool:
    if isinstance(exc, torch.OutOfMemoryError | MemoryError):
        return True
    return isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()


class _Computed:
    """One computed sequence, on CPU, in storage dtypes."""

    __slots__ = ("ce", "topk_ids", "topk_logprobs")

    def __init__(self, topk_ids: torch.Tensor, topk_logprobs: torch.Tensor, ce: float) -> None:
        self.topk_ids = topk_ids
        self.topk_logprobs = topk_logprobs
        self.ce = ce


def _forward_batch(
    model: Any,
    batch: Sequence[Encoded],
    *,
    top_k: int,
    pad_id: int,
    device: torch.device,
    logprob_dtype: torch.dtype,
) -> list[_Computed]:
    """Run one right-padded batch; every row's real tokens sit at positions 0..n-1 as when run alone."""
    lengths = [len(e) for e in batch]
    width = max(lengths)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for b, enc in enumerate(batch):
        ids[b, : lengths[b]] = torch.tensor(enc.input_ids, dtype=torch.long)
        mask[b, : lengths[b]] = 1
    with torch.inference_mode():
        out = model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False)
        logits = out.logits
        vocab = int(logits.shape[-1])
        if top_k > vocab:
            raise ConfigError(f"top_k {top_k} is larger than the source vocabulary ({vocab})")
        results: list[_Computed] = []
        for b, enc in enumerate(batch):
            n = lengths[b]
            if max(enc.input_ids) >= vocab:
                raise ConfigError(
                    f"token id {max(enc.input_ids)} is outside the source model's vocabulary ({vocab}); "
                    "the tokenizer does not belong to this model"
                )
            lg = logits[b, : n - 1].float()  # row j predicts token j + 1
            lse = torch.logsumexp(lg, dim=-1)
            values, indices = torch.topk(lg, top_k, dim=-1)
            topk_ids = torch.full((n, top_k), -1, dtype=torch.int32)
            topk_lp = torch.full((n, top_k), float("-inf"), dtype=torch.float32)
            topk_ids[1:] = indices.to("cpu", torch.int32)
            topk_lp[1:] = (values - lse[:, None]).cpu()
            gold = ids[b, 1:n].to(lg.device)
            gold_lp = lg.gather(-1, gold[:, None]).squeeze(-1) - lse
            resp = torch.tensor([lab != IGNORE_INDEX for lab in enc.labels[1:]], dtype=torch.bool)
            ce = float(-gold_lp.cpu()[resp].double().mean()) if bool(resp.any()) else math.nan
            results.append(_Computed(topk_ids, topk_lp.to(logprob_dtype), ce))
    return results


def _shard_tensors(
    encoded: Sequence[Encoded], computed: Sequence[_Computed], logprob_dtype: torch.dtype, top_k: int
) -> dict[str, torch.Tensor]:
    lengths = torch.tensor([0] + [len(e) for e in encoded], dtype=torch.int64)
    return {
        "offsets": torch.cumsum(lengths, 0),
        "input_ids": torch.tensor([i for e in encoded for i in e.input_ids], dtype=torch.int32),
        "labels": torch.tensor([lab for e in encoded for lab in e.labels], dtype=torch.int32),
        "char_offsets": torch.tensor(
            [list(o) for e in encoded for o in e.offsets], dtype=torch.int32
        ).reshape(-1, 2),
        "topk_ids": torch.cat([c.topk_ids for c in computed]).reshape(-1, top_k).contiguous(),
        "topk_logprobs": torch.cat([c.topk_logprobs for c in computed]).reshape(-1, top_k).to(logprob_dtype),
        "ce": torch.tensor([c.ce for c in computed], dtype=torch.float32),
    }


def _clear_cache_dir(out: Path) -> None:
    """Remove the files a source cache consists of (and temporary leftovers); nothing else."""
    for p in out.iterdir():
        name = p.name
        ours = name == MANIFEST or (name.startswith("shard-") and name.endswith(".safetensors"))
        leftover = name.startswith((f".{MANIFEST}.tmp-", ".shard-"))
        if (ours or leftover) and p.is_file():
            p.unlink()


def _prepare_out_dir(out: Path, manifest: dict[str, Any], overwrite: bool) -> set[str]:
    """Create or check ``out``; the names of the shards already complete there (to be kept)."""
    if out.exists() and not out.is_dir():
        raise ConfigError(f"cache path exists and is not a directory: {out}")
    out.mkdir(parents=True, exist_ok=True)
    manifest_path = out / MANIFEST
    if not manifest_path.exists():
        if any(not p.name.startswith((".shard-", f".{MANIFEST}.tmp-")) for p in out.iterdir()):
            raise ConfigError(
                f"{out} exists and is not a source cache (no {MANIFEST}); choose a new or empty directory"
            )
        _clear_cache_dir(out)
        return set()
    try:
        old = _read_manifest(manifest_path)
    except CheckpointError as exc:
        if not overwrite:
            raise ConfigError(f"{exc} (pass overwrite=True to replace the cache)") from None
        _clear_cache_dir(out)
        return set()
    differ = [key for key in _MATCH_KEYS if old.get(key) != manifest[key]]
    if differ:
        if not overwrite:
            raise ConfigError(
                f"{out} holds a source cache made with other settings ({', '.join(differ)} differ); "
                "pass overwrite=True to replace it or choose another directory"
            )
        _clear_cache_dir(out)
        return set()
    # Same settings: keep every shard the old manifest calls complete and that is still whole.
    listed = set(old.get("complete_shards") or [])
    keep: set[str] = set()
    for entry in manifest["shards"]:
        file = entry["file"]
        count = int(entry["stop"]) - int(entry["start"])
        if file in listed and _shard_is_complete(out / file, count, int(manifest["top_k"])):
            keep.add(file)
    for p in out.iterdir():  # temporary leftovers of an interrupted write
        if p.name.startswith(".shard-") and p.is_file():
            p.unlink()
    return keep


def source_pass(
    model_dir: str | Path,
    pairs: Sequence[Pair],
    out_dir: str | Path,
    *,
    top_k: int = 10,
    batch_size: int = 8,
    max_len: int = 512,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    template: str | None = None,
    chat: bool = False,
    progress: Callable[[PassProgress], None] | None = None,
    trust_remote_code: bool = False,
    shard_size: int = 256,
    logprob_dtype: torch.dtype = torch.float32,
    overwrite: bool = False,
) -> SourceCache:
    """Run the source model in ``model_dir`` over ``pairs`` once and cache what distillation needs.

    The model and tokenizer are loaded with transformers (safetensors weights only; remote code only
    with ``trust_remote_code``); the model runs in ``dtype`` on ``device``, log-probs are computed in
    float32 and stored in ``logprob_dtype`` (float32 or float16). Sequences are run in right-padded
    batches of ``batch_size`` (sorted by length within a shard) and written ``shard_size`` per shard.

    When ``out_dir`` already holds a cache with the same settings (see ``_MATCH_KEYS``), its complete
    shards are kept and only the missing sequences are computed; a complete cache is opened without
    loading the model. A cache with other settings is refused (ConfigError) unless ``overwrite``.
    ``progress`` gets a :class:`PassProgress` after every batch; an exception it raises stops the pass
    with the shards written so far kept. Out of memory is a ConfigError suggesting a smaller batch size.
    """
    for name, value, low in (("top_k", top_k, 1), ("batch_size", batch_size, 1), ("max_len", max_len, 2)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ConfigError(f"{name} must be an integer >= {low}, got {value!r}")
    if isinstance(shard_size, bool) or not isinstance(shard_size, int) or shard_size < 1:
        raise ConfigError(f"shard_size must be an integer >= 1, got {shard_size!r}")
    if logprob_dtype not in _LOGPROB_DTYPES:
        raise ConfigError(f"logprob_dtype must be torch.float32 or torch.float16, got {logprob_dtype}")
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ConfigError(f"dtype must be a floating-point torch dtype, got {dtype!r}")
    pairs = list(pairs)
    if not pairs:
        raise ConfigError("no instruction-response pairs to run the source on")
    seen: set[str] = set()
    for pair in pairs:
        if pair.id in seen:
            raise ConfigError(f"duplicate pair id {pair.id!r} ({pair.origin or 'given in code'})")
        seen.add(pair.id)
    dev = _parse_device(device)

    src = Path(model_dir).expanduser().resolve()
    with ModelDir(src) as md:  # validates the directory: safetensors weights, readable headers
        fingerprint = _source_fingerprint(md)
    tokenizer = _load_tokenizer(src, trust_remote_code)
    rendered: list[RenderedText] = [render(p, tokenizer, template=template, chat=chat) for p in pairs]
    encoded: list[Encoded] = [encode(r, tokenizer, max_len) for r in rendered]
    _check_decodes(tokenizer, pairs, encoded)

    n = len(pairs)
    plan: list[tuple[str, int, int]] = [
        (shard_name(j), start, min(start + shard_size, n)) for j, start in enumerate(range(0, n, shard_size))
    ]
    manifest: dict[str, Any] = {
        "format": CACHE_FORMAT,
        "version": FORMAT_VERSION,
        "row_convention": ROW_CONVENTION,
        "source": str(src),
        "source_fingerprint": fingerprint,
        "tokenizer_class": type(tokenizer).__name__,
        "tokenizer_vocab_size": len(tokenizer),
        "top_k": top_k,
        "max_len": max_len,
        "template": template,
        "chat": chat,
        "compute_dtype": str(dtype).removeprefix("torch."),
        "logprob_dtype": _LOGPROB_DTYPES[logprob_dtype],
        "data_files": sorted({p.origin.rsplit(":", 1)[0] for p in pairs if p.origin}),
        "data_hash": _hash(
            [[p.id, r.text, r.response_start, r.response_end] for p, r in zip(pairs, rendered, strict=True)]
        ),
        "token_hash": _hash([[e.input_ids, e.labels] for e in encoded]),
        "num_sequences": n,
        "truncated": [p.id for p, e in zip(pairs, encoded, strict=True) if e.truncated],
        "no_response_tokens": [
            p.id
            for p, e in zip(pairs, encoded, strict=True)
            if all(lab == IGNORE_INDEX for lab in e.labels[1:])
        ],
        "pair_ids": [p.id for p in pairs],
        "shard_size": shard_size,
        "shards": [{"file": file, "start": a, "stop": b} for file, a, b in plan],
        "complete_shards": [],
    }
    manifest = json.loads(json.dumps(manifest))  # JSON-normalised, so it compares equal to a re-read one

    out = Path(out_dir).expanduser()
    complete = _prepare_out_dir(out, manifest, overwrite)
    manifest["complete_shards"] = [file for file, _, _ in plan if file in complete]
    manifest_path = out / MANIFEST
    _write_json_atomic(manifest_path, manifest)

    todo = [entry for entry in plan if entry[0] not in complete]
    if todo:
        model = _load_model(src, dtype, dev, trust_remote_code)
        pad_id = tokenizer.pad_token_id
        if not isinstance(pad_id, int):
            pad_id = 0  # any valid id: padded positions are masked and never read
        done = sum(b - a for file, a, b in plan if file in complete)
        computed_now = 0
        written = len(complete)
        for file, start, stop in todo:
            order = sorted(range(start, stop), key=lambda i: -len(encoded[i]))
            results: dict[int, _Computed] = {}
            for b0 in range(0, len(order), batch_size):
                idx = order[b0 : b0 + batch_size]
                batch = [encoded[i] for i in idx]
                try:
                    outs = _forward_batch(
                        model, batch, top_k=top_k, pad_id=pad_id, device=dev, logprob_dtype=logprob_dtype
                    )
                except Exception as exc:
                    if not _is_oom(exc):
                        raise
                    if dev.type == "cuda":
                        torch.cuda.empty_cache()
                    raise ConfigError(
                        f"out of memory running the source on {len(batch)} sequences of up to "
                        f"{max(len(e) for e in batch)} tokens on {dev}; rerun with a smaller batch_size "
                        f"(now {batch_size}) or max_len (finished shards are kept)"
                    ) from None
                results.update(zip(idx, outs, strict=True))
                computed_now += len(idx)
                done += len(idx)
                if len(results) == stop - start:
                    seqs = range(start, stop)
                    tensors = _shard_tensors(
                        [encoded[i] for i in seqs], [results[i] for i in seqs], logprob_dtype, top_k
                    )
                    metadata = {
                        "format": CACHE_FORMAT,
                        "start": str(start),
                        "pair_ids": json.dumps([pairs[i].id for i in seqs]),
                        "tokens": json.dumps([encoded[i].tokens for i in seqs]),
                    }
                    _save_shard_atomic(out / file, tensors, metadata)
                    complete.add(file)
                    manifest["complete_shards"] = [f for f, _, _ in plan if f in complete]
                    _write_json_atomic(manifest_path, manifest)
                    written += 1
                if progress is not None:
                    progress(PassProgress(computed_now, done, n, written, len(plan)))
        del model
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    return SourceCache.open(out)
