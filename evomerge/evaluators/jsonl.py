"""Reading JSONL data files (plain or gzip-compressed), line by line, for tasks and HumanEval."""

from __future__ import annotations

import gzip
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

__all__ = ["JSONLError", "read_records", "read_text"]


class JSONLError(ValueError):
    """A bad line: its number, the reason, and for invalid JSON the column."""

    def __init__(self, lineno: int, reason: str, column: int | None = None) -> None:
        super().__init__(f"line {lineno}: {reason}")
        self.lineno = lineno
        self.reason = reason
        self.column = column


def read_text(path: Path) -> str:
    """The file's text, gunzipped when it starts with the gzip magic bytes. Raises OSError, EOFError,
    zlib.error or UnicodeDecodeError for an unreadable file."""
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        raw = gzip.decompress(raw)
    return raw.decode("utf-8")


def read_records(text: str) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, JSON object) for every non-blank line; JSONLError for a line that is not one."""
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise JSONLError(lineno, f"invalid JSON: {exc.msg}", exc.colno) from None
        if not isinstance(record, dict):
            raise JSONLError(lineno, f"expected a JSON object, got {type(record).__name__}")
        yield lineno, record
