"""Process containment in the parent (layer 5 of the threat model in :mod:`evomerge.evaluators.sandbox`):
wait for the sandbox without reaping it, then kill its PID namespace, its process group and, without
bubblewrap, every process that carries the run's private environment marker."""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import time

_MARKER_VAR = "EVOMERGE_SANDBOX_RUN"


def _wait_for_exit(pid: int, timeout: float) -> bool:
    """Wait up to ``timeout`` seconds for ``pid`` to exit *without reaping it*; True if it exited."""
    try:
        pidfd = os.pidfd_open(pid)
    except (AttributeError, OSError):  # kernel < 5.3: poll without reaping
        deadline = time.monotonic() + timeout
        while os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is None:
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.01)
        return True
    try:
        poller = select.poll()
        poller.register(pidfd, select.POLLIN)
        return bool(poller.poll(max(0.0, timeout) * 1000))
    finally:
        os.close(pidfd)


def _kill_namespace(info: bytes, bwrap_pid: int) -> None:
    """Kill the sandbox's PID 1 (named in bwrap's ``--info-fd`` JSON) and wait until it is gone: when
    the first process of a PID namespace exits, the kernel kills every other process in it first."""
    try:
        pid = int(json.loads(info)["child-pid"])
    except (ValueError, KeyError, TypeError):
        return
    try:
        pidfd = os.pidfd_open(pid)
    except OSError:
        return
    try:
        # The pidfd pins the pid, so this reads the process it refers to: still bwrap's child, or the
        # number was reused after bwrap reaped it (and it is not ours to kill).
        if _parent_pid(pid) != bwrap_pid:
            return
        with contextlib.suppress(OSError):
            signal.pidfd_send_signal(pidfd, signal.SIGKILL)
        select.select([pidfd], [], [], 5.0)
    finally:
        os.close(pidfd)


def _parent_pid(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return int(f.read().rsplit(b")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return None


def _kill_group(pgid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)


def _kill_marked(marker: str, rounds: int = 50) -> int:
    """Kill every process whose initial environment holds this run's marker (descendants that left the
    process group with ``setsid`` and kept the environment). Returns how many were signalled."""
    needle = f"\0{_MARKER_VAR}={marker}\0".encode()
    killed = 0
    for _ in range(rounds):
        found = 0
        for entry in os.scandir("/proc"):
            if not entry.name.isdigit() or int(entry.name) == os.getpid():
                continue
            if _kill_if_marked(int(entry.name), needle):
                found += 1
        killed += found
        if not found:
            break
        time.sleep(0.01)
    return killed


def _kill_if_marked(pid: int, needle: bytes) -> bool:
    def marked() -> bool:
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                return needle in b"\0" + f.read()
        except OSError:  # gone, or another user's process
            return False

    if not marked():
        return False
    try:
        pidfd = os.pidfd_open(pid)
    except OSError:
        return False
    try:
        # Still running after the second read: the environment read was this process's, not a reuse.
        if not marked() or select.select([pidfd], [], [], 0)[0]:
            return False
        signal.pidfd_send_signal(pidfd, signal.SIGKILL)
        return True
    except OSError:
        return False
    finally:
        os.close(pidfd)
