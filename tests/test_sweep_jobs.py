"""Sweeps as Ray jobs against a real Ray head with its job server on 127.0.0.1 (started here with Ray's
token authentication, stopped by PID): submit, list, logs, status, stop mid-way, resubmit to exactly the
budget; bad input in one line. Every command runs as the user runs it: an ``evomerge`` process with the
token in its environment (Ray reads its authentication mode once per process)."""

from __future__ import annotations

import os
import re
import secrets
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import optuna
import pytest
import yaml
from optuna.trial import TrialState

from evomerge.zoo import Zoo

pytest.importorskip("ray.job_submission")
pytest.importorskip("aiohttp_cors")  # ray[default]: the job server

BIN = Path(sys.executable).parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def ray_head(evomerge_home: Path, micro_zoo: Zoo) -> Iterator[tuple[str, dict[str, str]]]:
    """A Ray head with its job server and token authentication (a fresh token), 2 CPUs; its address and
    the environment a user's shell would have (the token, EVOMERGE_HOME for the micro zoo)."""
    port, dash = _free_port(), _free_port()
    temp = Path(f"/tmp/evj{os.getpid()}")  # Ray's socket paths must stay short
    env = {
        **os.environ,
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        "OMP_NUM_THREADS": "1",
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN": secrets.token_hex(32),
        "EVOMERGE_HOME": str(evomerge_home),
    }
    head = subprocess.Popen(
        [
            str(BIN / "ray"),
            "start",
            "--head",
            "--block",
            f"--port={port}",
            "--dashboard-host=127.0.0.1",
            f"--dashboard-port={dash}",
            "--num-cpus=2",
            f"--temp-dir={temp}",
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    address = f"http://127.0.0.1:{dash}"
    try:
        deadline = time.monotonic() + 120
        while cli(["sweeps", "list", "--address", address], env)[0] != 0:
            if head.poll() is not None:
                raise AssertionError(f"ray start exited: {head.stderr.read().decode()[-800:]}")  # type: ignore[union-attr]
            assert time.monotonic() < deadline, "the job server never answered"
            time.sleep(1.0)
        yield address, env
    finally:
        head.terminate()  # `ray start --block` stops the processes it started on SIGTERM
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            head.kill()
            head.wait()
        shutil.rmtree(temp, ignore_errors=True)


def cli(args: list[Any], env: dict[str, str]) -> tuple[int, str, str]:
    """``evomerge ARGS`` as a process; (exit code, stdout, stderr)."""
    done = subprocess.run(
        [str(BIN / "evomerge"), *[str(a) for a in args]],
        env={**env, "COLUMNS": "300"},
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    return done.returncode, done.stdout, done.stderr


def _sweep(path: Path, runs: Path, n_trials: int) -> Path:
    path.write_text(
        yaml.safe_dump(
            {
                "study_name": "jobs",
                "runs_dir": str(runs),
                "zoo": "micro",
                "search_space": {
                    "method": "task_arithmetic",
                    "params": [{"name": "weight", "low": 0.0, "high": 1.2}],
                    "granularity": "layer",
                },
                "sampler": {"name": "random", "seed": 3},
                "n_trials": n_trials,
                "pick": None,
            }
        )
    )
    return path


def _study(runs: Path) -> optuna.Study | None:
    db = runs / "jobs" / "study.db"
    if not db.is_file():
        return None
    try:
        return optuna.load_study(study_name="jobs", storage=f"sqlite:///{db}")
    except Exception:
        return None


def _wait(what: Any, timeout: float, message: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = what()
        if value:
            return value
        time.sleep(0.5)
    raise AssertionError(message)


def _job_state(head: tuple[str, dict[str, str]], job_id: str) -> str:
    code, out, err = cli(["sweeps", "status", job_id, "--address", head[0]], head[1])
    assert code == 0, err
    return out.split()[2]  # JOB_ID STUDY STATE ...


def test_submit_watch_stop_and_resume(ray_head: tuple[str, dict[str, str]], tmp_path: Path) -> None:
    address, env = ray_head
    runs = tmp_path / "runs"
    # far more trials than can run before the stop, on any machine; the resumed sweep gets a small budget
    first_budget = 5000
    config = _sweep(tmp_path / "sweep.yaml", runs, first_budget)
    code, out, err = cli(["submit", config, "--address", address], env)
    assert code == 0, err
    match = re.search(r"submitted job (\S+) · study jobs", out)
    assert match, out
    job = match.group(1)

    def some_complete() -> bool:
        study = _study(runs)
        return study is not None and len(study.get_trials(states=(TrialState.COMPLETE,))) >= 4

    _wait(some_complete, 240, f"the job's sweep never completed a trial: {_job_state(ray_head, job)}")
    code, out, _ = cli(["sweeps", "list", "--address", address], env)
    assert code == 0
    (line,) = [ln for ln in out.splitlines() if ln.startswith(job)]
    assert " jobs " in line and "RUNNING" in line and re.search(rf"trials \d+/{first_budget}", line)
    code, out, _ = cli(["sweeps", "logs", job, "--address", address], env)
    assert code == 0 and "study jobs" in out  # the sweep's own first line, from the job's log

    code, out, err = cli(["sweeps", "stop", job, "--address", address], env)
    assert code == 0, err
    assert out.strip() == f"job {job}: stopped"
    study = _study(runs)
    assert study is not None
    trials = study.get_trials()
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    assert not [t for t in trials if t.state == TrialState.RUNNING]  # nothing left running
    assert len(complete) < first_budget  # stopped mid-way
    failed = [t for t in trials if t.state == TrialState.FAIL]
    for t in failed:  # each unfinished trial: failed with the reason and asked again
        assert t.user_attrs["error"].startswith(("the sweep was stopped", "the sweep process running it"))
    requeued = {int(t.user_attrs["requeued_from"]) for t in trials if "requeued_from" in t.user_attrs}
    assert requeued == {t.number for t in failed if t.user_attrs["error"].startswith("the sweep was stopped")}

    budget = len(complete) + 15  # resumed to exactly this many complete trials
    code, out, err = cli(["submit", config, "--n-trials", budget, "--address", address], env)
    assert code == 0, err
    second = re.search(r"submitted job (\S+)", out).group(1)  # type: ignore[union-attr]
    _wait(
        lambda: _job_state(ray_head, second) in ("SUCCEEDED", "FAILED", "STOPPED"),
        300,
        "the resumed sweep did not finish",
    )
    assert _job_state(ray_head, second) == "SUCCEEDED"
    study = _study(runs)
    assert study is not None
    trials = study.get_trials()
    assert len([t for t in trials if t.state == TrialState.COMPLETE]) == budget  # exactly the budget
    assert not [t for t in trials if t.state in (TrialState.RUNNING, TrialState.WAITING)]
    for number in requeued:  # every stopped candidate ran again and completed
        assert any(
            t.user_attrs.get("requeued_from") == number and t.state == TrialState.COMPLETE for t in trials
        )
    code, out, _ = cli(["sweeps", "status", second, "--address", address], env)
    assert code == 0
    assert f"trials {budget}/{budget}" in out and "SUCCEEDED" in out and "storage sqlite:///" in out
    code, out, _ = cli(["sweeps", "logs", second, "--follow", "--address", address], env)
    assert code == 0 and "study jobs" in out  # --follow on a finished job prints it all and returns


def test_bad_input_is_one_line(ray_head: tuple[str, dict[str, str]], tmp_path: Path) -> None:
    address, env = ray_head

    def one_line(args: list[Any], *fragments: str) -> None:
        code, out, err = cli(args, env)
        assert code == 2, out + err
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
        for fragment in fragments:
            assert fragment in lines[0], lines[0]

    one_line(["sweeps", "status", "raysubmit_nonexistent", "--address", address], "no job")
    one_line(["sweeps", "stop", "raysubmit_nonexistent", "--address", address], "no job")
    one_line(["sweeps", "list", "--address", f"http://127.0.0.1:{_free_port()}"], "no Ray job server")
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"study_name": "bad", "zoo": "micro", "n_trials": 0}))
    _, before, _ = cli(["sweeps", "list", "--address", address], env)
    one_line(["submit", bad, "--address", address], "n_trials")
    _, after, _ = cli(["sweeps", "list", "--address", address], env)
    assert after == before  # nothing was submitted
