"""Run a program or score a completion in the sandbox: :func:`run_program`, :func:`check_completion`, the
statuses (:data:`SandboxStatus`) and results (:class:`SandboxResult`), and how a run is classified from the
harness's verdict and what the parent saw."""

from __future__ import annotations

import signal
from dataclasses import dataclass
from typing import Any, Literal

from evomerge.errors import ConfigError
from evomerge.evaluators.sandbox.isolation import (
    SandboxUnavailableError,
    _layers,
    _strict,
    sandbox_isolation,
)
from evomerge.evaluators.sandbox.launch import _last_line, _Launch, _launch
from evomerge.evaluators.sandbox.limits import DEFAULT_LIMITS, SandboxLimits

SandboxStatus = Literal["passed", "failed", "error", "timeout", "memory", "output", "blocked"]
"""``passed``; ``failed``: an assertion failed, or the program exited before its end / before the tests
finished; ``error``: another exception or a crash; ``timeout``: the CPU or wall-clock limit; ``memory``:
a ``MemoryError`` under the address-space limit; ``output``: the file-size limit was hit; ``blocked``:
the guard prelude refused something (fork, exec, network, a write outside the working directory)."""

_BLOCKED_TAG = "evomerge-sandbox: blocked"
_STATUSES = frozenset(("passed", "failed", "error", "timeout", "memory", "output", "blocked"))


@dataclass(frozen=True)
class SandboxResult:
    """The outcome of one run. ``stdout``/``stderr`` are the last ``max_output_bytes`` of each stream
    (decoded as UTF-8 with replacement); ``returncode`` is the sandbox's exit status (negative for a
    signal); ``isolation`` names the layers the run had (see :class:`SandboxIsolation`)."""

    passed: bool
    status: SandboxStatus
    reason: str
    returncode: int
    stdout: str
    stderr: str
    output_truncated: bool
    seconds: float
    cpu_seconds: float
    pid: int
    """The host pid of the sandbox's first process (bwrap, or the harness), which is also its process-group
    and session id (every process of the run is dead now)."""
    isolation: str = "guard"


def run_program(
    source: str,
    limits: SandboxLimits = DEFAULT_LIMITS,
    *,
    guards: bool = True,
    strict: bool | None = None,
) -> SandboxResult:
    """Run ``source`` as ``__main__`` in the sandbox (see the module docstring); it passes when it runs to
    its end. The program reports that itself, so a hostile program can fake it: score untrusted code with
    :func:`check_completion`, whose verdict it cannot touch.

    ``guards=False`` leaves out the guard prelude and the seccomp filter (the namespaces, the resource
    limits, the minimal environment, the working directory and the process kill stay): only for testing
    the process containment on its own. ``strict`` (default: the ``EVOMERGE_SANDBOX_STRICT`` variable)
    refuses to run without full isolation (:class:`SandboxUnavailableError`). Raises
    :class:`~evomerge.errors.EvaluationError` when the sandbox cannot be started at all.
    """
    return _run("program", {"program": source, "entry_point": None}, {}, limits, guards, strict)


def check_completion(
    prompt: str,
    completion: str,
    test: str,
    entry_point: str,
    limits: SandboxLimits = DEFAULT_LIMITS,
    *,
    guards: bool = True,
    strict: bool | None = None,
) -> SandboxResult:
    """Score a HumanEval-style completion: the worker runs ``prompt + completion``; the harness runs the
    prompt alone (for its imports and helpers), then ``test`` (defining ``check(candidate)``), then
    ``check(entry_point)`` with the entry point calling into the worker. It passes when that returns.

    Arguments and return values cross between the two processes as plain data (see the module
    docstring): a function that returns anything else (a generator, a ``Fraction``, an object) fails.
    """
    if not entry_point.isidentifier():
        raise ConfigError(f"entry_point must be a Python identifier, got {entry_point!r}")
    program = {"program": prompt + completion + "\n", "entry_point": entry_point}
    tests = {"prompt": prompt, "test": test, "entry_point": entry_point}
    return _run("check", program, tests, limits, guards, strict)


def _run(
    mode: str,
    program: dict[str, Any],
    tests: dict[str, Any],
    limits: SandboxLimits,
    guards: bool,
    strict: bool | None,
) -> SandboxResult:
    isolation = sandbox_isolation()
    if _strict(strict) and not isolation.complete:
        raise SandboxUnavailableError(
            f"the code sandbox refuses to run without full isolation (strict mode): {isolation.detail}"
        )
    run = _launch(
        mode, program, tests, limits, guards=guards, bwrap=isolation.bwrap, harden=isolation.seccomp
    )
    status, reason = _classify(run, limits)
    stdout, stderr = run.stdout, run.stderr
    return SandboxResult(
        passed=status == "passed",
        status=status,
        reason=reason,
        returncode=run.returncode,
        stdout=stdout.decode("utf-8", "replace"),
        stderr=stderr.decode("utf-8", "replace"),
        output_truncated=max(run.stdout_size, run.stderr_size) > limits.max_output_bytes,
        seconds=run.seconds,
        cpu_seconds=run.cpu_seconds,
        pid=run.pid,
        isolation=_layers(isolation, guards),
    )


def _classify(run: _Launch, limits: SandboxLimits) -> tuple[SandboxStatus, str]:
    """The status of a run: the harness's verdict when there is one (only it can say ``passed``), else
    what the parent saw; a failure that left a guard or file-size trace is reported as such."""
    cpu_reason = f"CPU time limit of {limits.cpu_seconds} s exceeded"
    if run.timed_out:
        return "timeout", f"wall-clock limit of {limits.wall_seconds:g} s exceeded"
    verdict = run.verdict
    status: SandboxStatus
    if verdict is None:
        if run.cpu_seconds >= limits.cpu_seconds or run.returncode in (-signal.SIGXCPU, 128 + signal.SIGXCPU):
            return "timeout", cpu_reason
        status, reason = "error", f"the sandbox ended without a verdict (exit status {run.returncode})"
    elif verdict["status"] in _STATUSES:
        status, reason = verdict["status"], verdict["reason"]
    else:
        status, reason = "error", f"unexpected verdict {verdict['status']!r}"
    if status == "passed":
        return status, reason
    if status == "timeout":
        return status, cpu_reason
    if status == "memory" or _last_line(run.stderr).startswith("MemoryError"):
        return "memory", f"MemoryError under the {limits.memory_mb} MB memory limit"
    if _BLOCKED_TAG.encode() in run.stderr:
        lines = run.stderr.decode("utf-8", "replace").splitlines()
        what = next((line for line in lines if line.startswith(_BLOCKED_TAG)), _BLOCKED_TAG)
        return "blocked", what.removeprefix("evomerge-sandbox: ")
    file_limit = limits.file_size_mb * 1024 * 1024
    if max(run.stdout_size, run.stderr_size) >= file_limit or "File too large" in reason:
        return "output", f"output exceeded the {limits.file_size_mb} MB file-size limit"
    return status, reason
