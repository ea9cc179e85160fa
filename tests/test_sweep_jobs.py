"""Sweeps as Ray jobs against a real Ray head with its job server on 127.0.0.1 (started here, stopped by
PID): submit, list, logs, status, stop mid-way, resubmit to exactly the budget; bad input in one line."""

from __future__ import annotations

import os
import re
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

from evomerge.cli import main
from evomerge.zoo import Zoo

pytest.importorskip("ray.job_submission")
pytest.importorskip("aiohttp_cors")  # ray[default]: the job server

BIN = Path(sys.executable).parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def ray_head(evomerge_home: Path, micro_zoo: Zoo) -> Iterator[str]:
    """A Ray head with its job server, 2 CPUs; its address. Ray's token authentication is off here: Ray
    reads its mode once per process, when it is imported, which this test process did at collection
    (docker/compose.yaml's head runs with tokens; tests/test_deploy_files.py covers that)."""
    port, dash = _free_port(), _free_port()
    temp = Path(f"/tmp/evj{os.getpid()}")  # Ray's socket paths must stay short
    saved = {k: os.environ.get(k) for k in ("RAY_AUTH_MODE", "EVOMERGE_HOME")}
    os.environ.update(RAY_AUTH_MODE="disabled", EVOMERGE_HOME=str(evomerge_home))
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", "OMP_NUM_THREADS": "1"}
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
        from ray.job_submission import JobSubmissionClient

        deadline = time.monotonic() + 120
        while True:
            if head.poll() is not None:
                raise AssertionError(f"ray start exited: {head.stderr.read().decode()[-800:]}")  # type: ignore[union-attr]
            try:
                JobSubmissionClient(address).list_jobs()
                break
            except Exception:
                assert time.monotonic() < deadline, "the job server never answered"
                time.sleep(1.0)
        yield address
    finally:
        head.terminate()  # `ray start --block` stops the processes it started on SIGTERM
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            head.kill()
            head.wait()
        shutil.rmtree(temp, ignore_errors=True)
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def run(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    try:
        main([str(a) for a in args])
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    out, err = capsys.readouterr()
    return code, out, err


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


def _job_state(address: str, job_id: str) -> str:
    from ray.job_submission import JobSubmissionClient

    status = JobSubmissionClient(address).get_job_status(job_id)
    return str(getattr(status, "value", status))


def test_submit_watch_stop_and_resume(
    ray_head: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    runs = tmp_path / "runs"
    budget = 40
    config = _sweep(tmp_path / "sweep.yaml", runs, budget)
    code, out, err = run(["submit", config, "--address", ray_head], capsys)
    assert code == 0, err
    match = re.search(r"submitted job (\S+) · study jobs", out)
    assert match, out
    job = match.group(1)

    def some_complete() -> bool:
        study = _study(runs)
        return study is not None and len(study.get_trials(states=(TrialState.COMPLETE,))) >= 4

    _wait(some_complete, 240, f"the job's sweep never completed a trial: {_job_state(ray_head, job)}")
    code, out, _ = run(["sweeps", "list", "--address", ray_head], capsys)
    assert code == 0
    (line,) = [ln for ln in out.splitlines() if ln.startswith(job)]
    assert " jobs " in line and "RUNNING" in line and re.search(rf"trials \d+/{budget}", line)
    code, out, _ = run(["sweeps", "logs", job, "--address", ray_head], capsys)
    assert code == 0 and "study jobs" in out  # the sweep's own first line, from the job's log

    code, out, err = run(["sweeps", "stop", job, "--address", ray_head], capsys)
    assert code == 0, err
    assert out.strip() == f"job {job}: stopped"
    study = _study(runs)
    assert study is not None
    trials = study.get_trials()
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    assert not [t for t in trials if t.state == TrialState.RUNNING]  # nothing left running
    assert len(complete) < budget  # stopped mid-way
    failed = [t for t in trials if t.state == TrialState.FAIL]
    for t in failed:  # each unfinished trial: failed with the reason and asked again
        assert t.user_attrs["error"].startswith(("the sweep was stopped", "the sweep process running it"))
    requeued = {int(t.user_attrs["requeued_from"]) for t in trials if "requeued_from" in t.user_attrs}
    assert requeued == {t.number for t in failed if t.user_attrs["error"].startswith("the sweep was stopped")}

    code, out, err = run(["submit", config, "--address", ray_head], capsys)
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
    code, out, _ = run(["sweeps", "status", second, "--address", ray_head], capsys)
    assert code == 0
    assert f"trials {budget}/{budget}" in out and "SUCCEEDED" in out and "storage sqlite:///" in out
    code, out, _ = run(["sweeps", "logs", second, "--follow", "--address", ray_head], capsys)
    assert code == 0 and "study jobs" in out  # --follow on a finished job prints it all and returns


def test_bad_input_is_one_line(ray_head: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    def one_line(args: list[Any], *fragments: str) -> None:
        code, out, err = run(args, capsys)
        assert code == 2, out + err
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
        for fragment in fragments:
            assert fragment in lines[0], lines[0]

    one_line(["sweeps", "status", "raysubmit_nonexistent", "--address", ray_head], "no job")
    one_line(["sweeps", "stop", "raysubmit_nonexistent", "--address", ray_head], "no job")
    one_line(["sweeps", "list", "--address", f"http://127.0.0.1:{_free_port()}"], "no Ray job server")
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"study_name": "bad", "zoo": "micro", "n_trials": 0}))
    _, before, _ = run(["sweeps", "list", "--address", ray_head], capsys)
    one_line(["submit", bad, "--address", ray_head], "n_trials")
    _, after, _ = run(["sweeps", "list", "--address", ray_head], capsys)
    assert after == before  # nothing was submitted
