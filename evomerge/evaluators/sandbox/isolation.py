"""What isolation this machine gives the sandbox: :class:`SandboxIsolation`, found once per process by
probe runs (:func:`sandbox_isolation`, one warning when it is incomplete), the names of a run's layers,
and strict mode (:data:`STRICT_ENV`, :class:`SandboxUnavailableError`)."""

from __future__ import annotations

import logging
import os
import shutil
import threading
from dataclasses import dataclass

from evomerge.errors import EvaluationError
from evomerge.evaluators.sandbox.bwrap import _bwrap_options
from evomerge.evaluators.sandbox.launch import _last_line, _launch
from evomerge.evaluators.sandbox.limits import SandboxLimits

STRICT_ENV = "EVOMERGE_SANDBOX_STRICT"
"""Set to ``1`` to make every run refuse to start without full isolation (bubblewrap and seccomp)."""

_log = logging.getLogger("evomerge.sandbox")


class SandboxUnavailableError(EvaluationError):
    """Strict mode was asked for and this machine cannot give full isolation (see the message)."""


@dataclass(frozen=True)
class SandboxIsolation:
    """What this machine gives the sandbox, found once per process by probe runs.

    ``bwrap``: the bubblewrap executable the runs use (None: not installed or not working here);
    ``seccomp``: the worker's seccomp filter and the non-dumpable harness work; ``detail``: what is
    missing and why (empty when isolation is complete)."""

    bwrap: str | None
    seccomp: bool
    detail: str = ""

    @property
    def complete(self) -> bool:
        return self.bwrap is not None and self.seccomp and not self.detail

    @property
    def label(self) -> str:
        """The layers a guarded run gets, e.g. ``bwrap+seccomp+guard``."""
        return _layers(self, guards=True)


def sandbox_isolation() -> SandboxIsolation:
    """The isolation this machine gives the sandbox (probed on the first call, then cached).

    Logs one warning when it is incomplete (no working bubblewrap, or no seccomp filter).
    """
    global _isolation
    with _isolation_lock:
        if _isolation is None:
            _isolation = _probe_isolation()
            if not _isolation.complete:
                hint = "" if _isolation.bwrap else "install bubblewrap (apt-get install bubblewrap) or "
                _log.warning(
                    "evomerge sandbox: %s; model-written code runs with %s only (%sset %s=1 to refuse)",
                    _isolation.detail,
                    _isolation.label,
                    hint,
                    STRICT_ENV,
                )
        return _isolation


_isolation: SandboxIsolation | None = None
_isolation_lock = threading.Lock()


def _probe_isolation() -> SandboxIsolation:
    problems: list[str] = []
    bwrap = shutil.which("bwrap")
    if bwrap is None:
        problems.append("bubblewrap (bwrap) is not installed")
    else:
        started, seccomp, detail = _probe(bwrap)
        if started:
            if not seccomp:
                problems.append(f"no seccomp filter ({detail})")
            if "--size" not in _bwrap_options(bwrap):
                problems.append("this bubblewrap is too old (< 0.7) to limit the size of the tmpfs")
            return SandboxIsolation(bwrap, seccomp, "; ".join(problems))
        problems.append(f"bubblewrap cannot create a sandbox here ({detail})")
    started, seccomp, detail = _probe(None)
    if not seccomp:
        problems.append(f"no seccomp filter ({detail})")
    return SandboxIsolation(None, seccomp, "; ".join(problems))


def _probe(bwrap: str | None) -> tuple[bool, bool, str]:
    """(the harness ran, seccomp and the non-dumpable harness work, what went wrong)."""
    limits = SandboxLimits(cpu_seconds=5, wall_seconds=20.0)
    try:
        run = _launch("probe", {"program": ""}, {}, limits, guards=False, bwrap=bwrap, harden=True)
    except EvaluationError as exc:
        return False, False, str(exc)
    verdict = run.verdict
    if verdict is None:
        return False, False, _last_line(run.stderr) or f"exit status {run.returncode}"
    if verdict["status"] != "probe":
        return True, False, verdict["reason"]
    return True, verdict.get("seccomp") is True, verdict["reason"]


def _strict(strict: bool | None) -> bool:
    if strict is not None:
        return strict
    return os.environ.get(STRICT_ENV, "").strip().lower() in ("1", "true", "yes", "on")


def _layers(isolation: SandboxIsolation, guards: bool) -> str:
    layers = [
        name
        for name, on in (
            ("bwrap", isolation.bwrap),
            ("seccomp", isolation.seccomp and guards),
            ("guard", guards),
        )
        if on
    ]
    return "+".join(layers) or "none"
