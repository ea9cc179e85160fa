"""The guard prelude: the in-process Python guard of the worker (layer 4 of the threat model in
:mod:`evomerge.evaluators.sandbox`).

:data:`GUARD_SOURCE` is program text, not code of this process: it is part of the harness program
(:mod:`evomerge.evaluators.sandbox.harness`), which runs inside the sandbox with ``python -I -S -c`` and
has ``sys`` imported. It defines ``_guard(workdir)``, which the worker calls after its seccomp filter and
before the untrusted program: process creation, signalling, the network, raising limits, ``ctypes`` and
writes outside the working directory raise ``PermissionError`` and leave an ``evomerge-sandbox: blocked
...`` line on stderr. It can be bypassed; the kernel layers are what stop an attack.
"""

GUARD_SOURCE = r'''
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
'''
