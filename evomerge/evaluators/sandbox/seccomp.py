"""The worker's seccomp filter and the kernel hardening around it (layer 3 of the threat model in
:mod:`evomerge.evaluators.sandbox`).

:data:`SECCOMP_SOURCE` is program text, not code of this process: it is part of the harness program
(:mod:`evomerge.evaluators.sandbox.harness`), which runs inside the sandbox with ``python -I -S -c`` and
has ``sys`` imported. It defines ``_SECCOMP`` (the system call numbers per machine), ``_DENIED`` (the
calls refused outright), ``_prctl``, ``_drop_capabilities`` (the worker's capabilities, cleared before the
filter) and ``_seccomp`` (builds the BPF program and installs it with ``PR_SET_NO_NEW_PRIVS``): a deny-list
of new processes, ``exec``, signals to other processes, ``ptrace``, sockets, namespaces, mounts and
limit changes, with ``clone`` allowed for threads only.
"""

SECCOMP_SOURCE = r'''
# --- kernel hardening -----------------------------------------------------------------------------

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
'''
