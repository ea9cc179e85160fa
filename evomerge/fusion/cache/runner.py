"""The source pass: :func:`source_pass` checks its arguments, renders and encodes the pairs, plans the
shards and the manifest, keeps what an earlier run finished, runs the model on the rest and writes each
shard as it completes, reporting :class:`PassProgress`."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from evomerge.checkpoints import ModelDir
from evomerge.errors import ConfigError
from evomerge.fusion.cache.forward import (
    _check_decodes,
    _Computed,
    _forward_batch,
    _is_oom,
    _load_model,
    _load_tokenizer,
    _parse_device,
    _shard_tensors,
)
from evomerge.fusion.cache.reader import SourceCache
from evomerge.fusion.cache.resume import _prepare_out_dir
from evomerge.fusion.cache.storage import (
    _LOGPROB_DTYPES,
    CACHE_FORMAT,
    FORMAT_VERSION,
    MANIFEST,
    ROW_CONVENTION,
    _save_shard_atomic,
    _write_json_atomic,
    shard_name,
)
from evomerge.fusion.data import IGNORE_INDEX, Encoded, Pair, RenderedText, encode, render


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


def _hash(data: Any) -> str:
    return hashlib.sha256(json.dumps(data, separators=(",", ":")).encode("utf-8")).hexdigest()


def _source_fingerprint(model: ModelDir) -> str:
    """Hash of config.json and the weight files' names, sizes and modification times."""
    parts: list[Any] = [model.config]
    for file in sorted(model.files):
        st = (model.path / file).stat()
        parts.append([file, st.st_size, st.st_mtime_ns])
    return _hash(parts)


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
