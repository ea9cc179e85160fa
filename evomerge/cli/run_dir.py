"""A sweep's run directory opened for ``export``, ``report`` and ``dashboard``: ``sweep.json`` checked, the
recorded sweep resolved, the study loaded; a missing, empty or corrupt file is a one-line error and no
database is ever created."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from evomerge.errors import ConfigError


def _load_run(run_dir: Path, *, full: bool = True) -> Any:
    """``load_run`` (optimizer.export) after checking ``sweep.json``: a truncated or corrupt file is a
    one-line error naming it. ``full=False`` (the dashboard) needs only the study's name and storage."""
    from evomerge.config_util import load_json
    from evomerge.optimizer import load_run

    meta = run_dir / "sweep.json"
    if meta.is_file():
        data = load_json(meta, what="run file")
        problem = _sweep_json_problem(data, full=full)
        if problem is not None:
            raise ConfigError(f"run file {meta} is corrupt: {problem}")
    return load_run(run_dir)


def _sweep_json_problem(data: Any, *, full: bool = True) -> str | None:
    if not isinstance(data, dict):
        return f"expected a JSON object, got {type(data).__name__}"
    config = data.get("config")
    if not isinstance(config, dict) or not isinstance(config.get("study_name"), str):
        return "no 'config' with a 'study_name'"
    needed = (("storage", str), ("base", str), ("data_dir", str), ("experts", list), ("tasks", list))
    for key, kind in needed if full else needed[:1]:
        if not isinstance(data.get(key), kind):
            return f"'{key}' is missing or not a {'string' if kind is str else 'list'}"
    return None


def _resolved_from_run(info: Any) -> Any:
    """The sweep a run recorded; errors name the run file."""
    from evomerge.optimizer.sweep import resolved_from_run

    try:
        return resolved_from_run(info.data)
    except ConfigError as err:
        message = str(err).removeprefix("sweep.json: ")
        raise ConfigError(f"run file {Path(info.run_dir) / 'sweep.json'}: {message}") from None


def _sqlite_path(storage: str) -> Path | None:
    """The database file of a ``sqlite:///`` storage URL (None for other storages and in-memory)."""
    if not storage.startswith("sqlite"):
        return None
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        database = make_url(storage).database
    except ArgumentError:
        return None
    return None if not database or database == ":memory:" else Path(database)


def _check_study_db(storage: str) -> None:
    """Refuse a SQLite study database that does not exist (opening it would create an empty one) or that
    is empty."""
    path = _sqlite_path(storage)
    if path is None:
        return
    if not path.is_file():
        raise ConfigError(f"study database {path} does not exist (the sweep never started its study)")
    if path.stat().st_size == 0:
        raise ConfigError(f"study database {path} is empty")


def _load_run_study(info: Any) -> Any:
    """The run's Optuna study, without ever creating a database: a missing, empty or corrupt SQLite file
    is a one-line error."""
    from sqlalchemy.exc import SQLAlchemyError

    from evomerge.optimizer import load_study

    _check_study_db(info.storage)
    try:
        return load_study(info.storage, info.study_name)
    except SQLAlchemyError as err:
        reason = str(getattr(err, "orig", None) or err).strip().splitlines()
        raise ConfigError(
            f"cannot open the study database {info.storage}: {reason[0] if reason else type(err).__name__}"
        ) from None
