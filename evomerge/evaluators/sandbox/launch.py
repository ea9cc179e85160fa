"""Start one sandboxed run and collect what it left: the harness (under bubblewrap when it works here)
with the program and the tests in unlinked files, the keyed verdict pipe, the wall-clock wait, the
cleanup of every process of the run, and the tails of its output."""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from evomerge.errors import EvaluationError
from evomerge.evaluators.sandbox.bwrap import _SANDBOX_WORKDIR, _bwrap_command, _interpreter
from evomerge.evaluators.sandbox.cleanup import (
    _MARKER_VAR,
    _kill_group,
    _kill_marked,
    _kill_namespace,
    _wait_for_exit,
)
from evomerge.evaluators.sandbox.harness import _HARNESS
from evomerge.evaluators.sandbox.limits import SandboxLimits


@dataclass(frozen=True)
class _Launch:
    verdict: dict[str, Any] | None
    returncode: int
    timed_out: bool
    seconds: float
    cpu_seconds: float
    stdout: bytes
    stderr: bytes
    stdout_size: int
    stderr_size: int
    pid: int


def _launch(
    mode: str,
    program: dict[str, Any],
    tests: dict[str, Any],
    limits: SandboxLimits,
    *,
    guards: bool,
    bwrap: str | None,
    harden: bool,
) -> _Launch:
    """Start the harness (under bubblewrap when ``bwrap`` is given), wait, kill what is left, collect."""
    key = secrets.token_hex(16)
    marker = secrets.token_hex(16)
    python, python_dirs = _interpreter()
    with contextlib.ExitStack() as stack:
        outer = stack.enter_context(tempfile.TemporaryDirectory(prefix="evomerge-sandbox-"))
        root = Path(outer)
        work = root / "work"
        work.mkdir()
        # The program and the tests travel in unlinked files (no path anyone could open), the verdict and
        # bwrap's info on pipes; the parent keeps only the read ends.
        program_file = stack.enter_context(tempfile.TemporaryFile(dir=outer))
        program_file.write(json.dumps(program).encode())
        program_file.seek(0)
        tests_file = stack.enter_context(tempfile.TemporaryFile(dir=outer))
        tests_file.write(json.dumps({**tests, "key": key}).encode())
        tests_file.seek(0)
        verdict_r, verdict_w = os.pipe()
        stack.callback(os.close, verdict_r)
        info_r, info_w = os.pipe()
        stack.callback(os.close, info_r)
        child_fds = [verdict_w, info_w]
        config = {
            "mode": mode,
            "workdir": _SANDBOX_WORKDIR if bwrap else str(work),
            "cpu_seconds": limits.cpu_seconds,
            "memory_bytes": limits.memory_mb * 1024 * 1024,
            "file_size_bytes": limits.file_size_mb * 1024 * 1024,
            "max_open_files": limits.max_open_files,
            "max_processes": limits.max_processes,
            "guards": guards,
            "harden": harden,
            "seccomp": harden and (guards or mode == "probe"),
            "tests_fd": tests_file.fileno(),
            "verdict_fd": verdict_w,
        }
        harness = [python, "-I", "-S", "-c", _HARNESS, json.dumps(config)]
        if bwrap:
            command = [*_bwrap_command(bwrap, python_dirs, limits, info_w), "--", *harness]
            env = {"PATH": "/usr/bin:/bin", "HOME": _SANDBOX_WORKDIR, "TMPDIR": _SANDBOX_WORKDIR}
            cwd = root
        else:
            command = harness
            env = {"PATH": "/usr/bin:/bin", "HOME": str(work), "TMPDIR": str(work), _MARKER_VAR: marker}
            cwd = work
        env["LANG"] = "C.UTF-8"
        stdout_path, stderr_path = root / "stdout", root / "stderr"
        start = time.monotonic()
        try:
            with open(stdout_path, "wb") as out, open(stderr_path, "wb") as err:
                proc = subprocess.Popen(
                    command,
                    cwd=cwd,
                    env=env,
                    stdin=program_file,
                    stdout=out,
                    stderr=err,
                    start_new_session=True,
                    close_fds=True,
                    pass_fds=(tests_file.fileno(), *child_fds),
                )
        except OSError as exc:
            raise EvaluationError(f"could not start the sandbox process: {exc}") from exc
        finally:
            for fd in child_fds:
                os.close(fd)
            program_file.close()
            tests_file.close()
        timed_out = True
        try:
            timed_out = not _wait_for_exit(proc.pid, limits.wall_seconds)
        finally:
            info = _read_available(info_r, 1 << 16)
            if bwrap:
                _kill_namespace(info, proc.pid)
            # The leader is alive or an unreaped zombie here, so its group id is still ours to kill.
            _kill_group(proc.pid)
            _, wait_status, usage = os.wait4(proc.pid, 0)
            proc.returncode = os.waitstatus_to_exitcode(wait_status)
            if not bwrap:
                _kill_marked(marker)
        seconds = time.monotonic() - start
        verdict = _parse_verdict(_read_available(verdict_r, 1 << 16), key)
        stdout, out_size = _tail(stdout_path, limits.max_output_bytes)
        stderr, err_size = _tail(stderr_path, limits.max_output_bytes)
    if bwrap and not info and verdict is None and not timed_out:
        why = _last_line(stderr) or f"exit status {proc.returncode}"
        raise EvaluationError(f"bubblewrap could not start the sandbox: {why}")
    return _Launch(
        verdict=verdict,
        returncode=proc.returncode,
        timed_out=timed_out,
        seconds=seconds,
        cpu_seconds=usage.ru_utime + usage.ru_stime,
        stdout=stdout,
        stderr=stderr,
        stdout_size=out_size,
        stderr_size=err_size,
        pid=proc.pid,
    )


def _parse_verdict(data: bytes, key: str) -> dict[str, Any] | None:
    """The harness's verdict if it is well-formed and carries this run's key (else None)."""
    try:
        verdict = json.loads(data)
    except ValueError:
        return None
    if not isinstance(verdict, dict) or not isinstance(verdict.get("key"), str):
        return None
    if not secrets.compare_digest(verdict["key"], key):
        return None
    if not isinstance(verdict.get("status"), str) or not isinstance(verdict.get("reason"), str):
        return None
    return verdict


def _read_available(fd: int, limit: int) -> bytes:
    """What can be read from a pipe now, without blocking (at most ``limit`` bytes)."""
    os.set_blocking(fd, False)
    chunks: list[bytes] = []
    size = 0
    while size < limit:
        try:
            chunk = os.read(fd, limit - size)
        except BlockingIOError:
            break
        if not chunk:
            break
        chunks.append(chunk)
        size += len(chunk)
    return b"".join(chunks)


def _tail(path: Path, limit: int) -> tuple[bytes, int]:
    """The last ``limit`` bytes of a file and its size (never reads more than ``limit`` bytes)."""
    with open(path, "rb") as f:
        size = f.seek(0, os.SEEK_END)
        f.seek(max(0, size - limit))
        return f.read(limit), size


def _last_line(text: bytes) -> str:
    lines = [line for line in text.decode("utf-8", "replace").splitlines() if line.strip()]
    return lines[-1].strip() if lines else ""
