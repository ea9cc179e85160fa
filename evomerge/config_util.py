"""Validation helpers shared by every config loader: pydantic errors become one-line ConfigErrors."""

from __future__ import annotations

from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

from evomerge.errors import ConfigError, EvomergeError

M = TypeVar("M", bound=BaseModel)


def format_validation_error(err: ValidationError) -> str:
    """The first problem of a pydantic error as ``field.path: message``."""
    first = err.errors()[0]
    loc = ""
    for part in first.get("loc", ()):
        loc += f"[{part}]" if isinstance(part, int) else (f".{part}" if loc else str(part))
    msg = str(first.get("msg", "invalid value")).removeprefix("Value error, ")
    extra = f" (and {len(err.errors()) - 1} more problems)" if len(err.errors()) > 1 else ""
    return f"{loc}: {msg}{extra}" if loc else f"{msg}{extra}"


def validate_model(cls: type[M], data: Any, *, where: str) -> M:
    """``cls.model_validate(data)`` with errors turned into one ConfigError line naming the field."""
    try:
        return cls.model_validate(data)
    except ValidationError as err:
        raise ConfigError(f"{where}: {format_validation_error(err)}") from None
    except EvomergeError as err:
        raise ConfigError(f"{where}: {err}") from None


def load_yaml(path: str | Path) -> Any:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {str(p)!r} does not exist")
    try:
        return yaml.safe_load(p.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        line = f" line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{p}:{line} is not valid YAML") from None
