"""Validation helpers shared by every config loader: pydantic errors become one-line ConfigErrors."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

from evomerge.errors import ConfigError, EvomergeError

M = TypeVar("M", bound=BaseModel)


def _loc_to_path(loc: Sequence[int | str]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + part
    return out


def format_validation_error(exc: ValidationError) -> str:
    """One line naming the first problem of a pydantic ValidationError (and how many more there are)."""
    errors = exc.errors(include_url=False)
    if not errors:
        return "invalid value"
    err = errors[0]
    path = _loc_to_path(err["loc"])
    kind = err["type"]
    if kind == "missing":
        msg = "required field is missing"
    elif kind == "extra_forbidden":
        msg = "unknown field"
    else:
        msg = err["msg"].removeprefix("Value error, ")
        msg = msg[:1].lower() + msg[1:]
        value = err.get("input")
        if kind != "value_error" and isinstance(value, str | int | float | bool) and len(repr(value)) < 60:
            msg += f" (got {value!r})"
    # a validator's message may start with a sub-location, e.g. "[0].value: ..."
    line = (path + msg if msg.startswith("[") else f"{path}: {msg}") if path else msg
    if len(errors) > 1:
        line += f" (and {len(errors) - 1} more problem{'s' if len(errors) > 2 else ''})"
    return " ".join(line.split())


def validate_model(cls: type[M], data: Any, *, where: str) -> M:
    """``cls.model_validate(data)`` with errors turned into one ConfigError line naming the field."""
    try:
        return cls.model_validate(data)
    except ValidationError as err:
        raise ConfigError(f"{where}: {format_validation_error(err)}") from None
    except EvomergeError as err:
        raise ConfigError(f"{where}: {err}") from None


def load_yaml(path: str | Path, *, what: str = "config file") -> Any:
    """The YAML file ``path`` parsed; ConfigError (one line naming the file) when it is missing, not a
    regular file, unreadable, not UTF-8 text or not valid YAML. Every config reader goes through here."""
    p = Path(path).expanduser()
    if not p.exists():
        raise ConfigError(f"{what} {str(p)!r} does not exist")
    if not p.is_file():
        raise ConfigError(f"{what} {str(p)!r} is not a file")
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as err:
        raise ConfigError(f"cannot read {what} {p}: {err.strerror or err}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{what} {p} is not UTF-8 text") from None
    return parse_yaml(text, where=str(p))


def parse_yaml(text: str, *, where: str) -> Any:
    """YAML text parsed; ConfigError ``WHERE line N: not valid YAML (problem)`` on a syntax error."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        line = f" line {mark.line + 1}" if mark is not None else ""
        problem = getattr(err, "problem", None)
        detail = f" ({' '.join(str(problem).split())})" if problem else ""
        raise ConfigError(f"{where}:{line} is not valid YAML{detail}") from None
    except RecursionError:  # deeply nested flow collections
        raise ConfigError(f"{where}: is not valid YAML (nested too deeply)") from None


def load_json(path: str | Path, *, what: str) -> Any:
    """A JSON file written by evomerge (a run's ``sweep.json``, ``results.json``); ConfigError naming the
    file when it is missing, unreadable, truncated or corrupt."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{what} {p} does not exist")
    try:
        return json.loads(p.read_text(encoding="utf-8"))
    except OSError as err:
        raise ConfigError(f"cannot read {what} {p}: {err.strerror or err}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{what} {p} is corrupt (not UTF-8 text)") from None
    except json.JSONDecodeError as err:
        raise ConfigError(
            f"{what} {p} is truncated or corrupt (line {err.lineno}, column {err.colno}: {err.msg})"
        ) from None
