"""Resuming a source pass: what an existing output directory holds. A cache of the same settings keeps its
complete shards; one of other settings (or a corrupt one) is refused unless ``overwrite``, which clears
only the cache's own files."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from evomerge.errors import CheckpointError, ConfigError
from evomerge.fusion.cache.storage import _MATCH_KEYS, MANIFEST, _read_manifest, _shard_is_complete


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
