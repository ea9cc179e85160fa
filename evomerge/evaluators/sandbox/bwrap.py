"""The bubblewrap command line of a sandboxed run (layer 1 of the threat model in
:mod:`evomerge.evaluators.sandbox`): the real Python interpreter and the directories outside ``/usr`` it
needs, the options this bubblewrap knows, and the namespaces, read-only binds and private tmpfs."""

from __future__ import annotations

import functools
import os
import subprocess
import sys

from evomerge.evaluators.sandbox.limits import SandboxLimits

_SANDBOX_WORKDIR = "/tmp"


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
