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

Modules
-------
- ``run``: :func:`run_program`, :func:`check_completion`, :class:`SandboxResult` and how a run is classified;
- ``limits``: :class:`SandboxLimits`;
- ``isolation``: :func:`sandbox_isolation` (the probe), :class:`SandboxIsolation`, strict mode;
- ``launch``: starting one run and collecting its verdict and output;
- ``bwrap``: the bubblewrap command line (layer 1);
- ``cleanup``: process containment in the parent (layer 5);
- ``harness``: the program that runs inside the sandbox (harness and worker), assembled from
  ``protocol`` (the plain-data protocol between them), ``seccomp`` (layer 3) and ``guard`` (layer 4);
- ``humaneval``: :func:`load_humaneval`.
"""

from evomerge.evaluators.sandbox.humaneval import HUMANEVAL_FIELDS, humaneval_data_path, load_humaneval
from evomerge.evaluators.sandbox.isolation import STRICT_ENV as STRICT_ENV
from evomerge.evaluators.sandbox.isolation import (
    SandboxIsolation,
    SandboxUnavailableError,
    sandbox_isolation,
)
from evomerge.evaluators.sandbox.limits import DEFAULT_LIMITS, SandboxLimits
from evomerge.evaluators.sandbox.run import SandboxResult, SandboxStatus, check_completion, run_program

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
