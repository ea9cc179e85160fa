"""The one error hierarchy of evomerge.

Every error evomerge raises on purpose derives from :class:`EvomergeError`. Errors caused by what the
user gave us (a config, a path, a recipe) derive from :class:`UserError`; the CLI prints their message
as one line and exits with code 2.
"""

from __future__ import annotations


class EvomergeError(Exception):
    """Base class of all evomerge errors."""

    exit_code: int = 1


class UserError(EvomergeError):
    """Bad input from the user: the message names the problem; the CLI exits 2."""

    exit_code = 2


class ConfigError(UserError):
    """A configuration file or value is invalid."""


class CheckpointError(UserError):
    """A model directory is missing, unreadable or inconsistent."""


class RecipeError(UserError):
    """A merge recipe is invalid (unknown method or parameter, bad value, incompatible models)."""


class OutputExistsError(UserError):
    """The output path exists and overwriting was not asked for."""


class EvaluationError(EvomergeError):
    """A candidate could not be evaluated (NaN weights, generation failure)."""


def one_line(err: BaseException) -> str:
    """``Type: first line of the message``: an error as a failed trial or a dead worker records it."""
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}".strip()


def first_line(exc: BaseException) -> str:
    """The first line of the message (the type's name when there is none), to quote inside another one."""
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
