"""The program that runs inside the sandbox: the harness (PID 1 under bubblewrap), which forks the worker.

The worker runs the untrusted program; the harness runs the tests against a proxy ``candidate`` that
calls into the worker, and writes the verdict, with the run's key, on a pipe the worker never holds (see
"How the verdict is protected" in :mod:`evomerge.evaluators.sandbox`).

:data:`_HARNESS` is ordinary Python kept in a string because it never runs in this process; it is started
with ``python -I -S -c _HARNESS CONFIG`` and reads the program on fd 0 and the tests on ``tests_fd``. It is
assembled from the protocol (:mod:`.protocol`), the seccomp filter (:mod:`.seccomp`), the guard prelude
(:mod:`.guard`) and the part defined here: the resource limits, the worker (``_worker``, ``_probe``,
``_run_program``), the supervisor (``_reap``, ``_gone``, ``_candidate``, ``_run_tests``, ``_supervise``)
and ``_main``, which is called last.
"""

from evomerge.evaluators.sandbox.guard import GUARD_SOURCE
from evomerge.evaluators.sandbox.protocol import PROTOCOL_SOURCE
from evomerge.evaluators.sandbox.seccomp import SECCOMP_SOURCE

_HARNESS_SOURCE = r'''
# --- resource limits (the harness and the worker) --------------------------------------------------

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

_HARNESS = "\n".join(("\nimport sys\n", PROTOCOL_SOURCE, SECCOMP_SOURCE, GUARD_SOURCE, _HARNESS_SOURCE))
