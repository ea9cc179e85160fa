"""scripts/gpu_check.sh and scripts/gpu_check.py on a CPU: what can be checked without a GPU.

Argument handling (one line, exit 2, nothing installed or written), ``--dry-run``, the markdown summary
(every value equal to the JSON's), and a real run of the driver whose CUDA step fails on this machine:
one line, exit 1, and the earlier step's results kept. The steps themselves run only on a device
(docs/gpu.md).
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
DRIVER = REPO / "scripts" / "gpu_check.py"
WRAPPER = REPO / "scripts" / "gpu_check.sh"
STEPS = ["env", "models", "merge", "vllm-swap", "vllm-equal", "sweep", "polish"]


def _load_driver() -> ModuleType:
    spec = importlib.util.spec_from_file_location("gpu_check", DRIVER)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = module  # dataclasses look their module up while the class is created
    spec.loader.exec_module(module)
    return module


gpu_check = _load_driver()


def run(cmd: list[str], tmp_path: Path, **env: str) -> subprocess.CompletedProcess[str]:
    full_env = {
        **os.environ,
        "PYTHON": sys.executable,
        "GPU_CHECK_VENV": str(tmp_path / "venv"),  # never built by these tests
        "GPU_CHECK_WORK": str(tmp_path / "work"),
        "EVOMERGE_HOME": str(tmp_path / "home"),
        **env,
    }
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=full_env, cwd=tmp_path)


def driver(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return run([sys.executable, str(DRIVER), *args], tmp_path)


def one_error_line(proc: subprocess.CompletedProcess[str]) -> str:
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("gpu_check: ")
    return lines[0]


# ---------------------------------------------------------------------------------------------- arguments


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        ([], "OUT_DIR"),
        (["OUT", "--steps", "env,bogus"], "unknown step 'bogus'"),
        (["OUT", "--steps", " , "], "no step named"),
        (["OUT", "--trials", "0"], "--trials: must be positive"),
        (["OUT", "--swaps", "two"], "--swaps: not a number"),
        (["OUT", "--budget-s", "nan"], "--budget-s: must be positive"),
        (["OUT", "--device", "tpu"], "--device: invalid choice"),
        (["OUT", "--size", "7b"], "--size: invalid choice"),
        (["OUT", "--frobnicate"], "unrecognized arguments: --frobnicate"),
        (["a-file"], "exists and is not a directory"),
    ],
)
def test_bad_arguments_are_one_line_and_exit_2(tmp_path: Path, args: list[str], needle: str) -> None:
    (tmp_path / "a-file").write_text("not a folder")
    proc = driver(tmp_path, *args)
    assert proc.returncode == 2
    assert needle in one_error_line(proc)
    assert proc.stdout == ""
    assert not (tmp_path / "OUT").exists() and not (tmp_path / "work").exists()


@pytest.mark.parametrize(
    ("args", "env", "needle"),
    [
        ([], {}, "missing OUT_DIR"),
        (["OUT", "--steps", "bogus"], {}, "unknown step 'bogus'"),
        (["OUT", "--trials", "-3"], {}, "--trials: must be positive"),
        (["OUT"], {"GPU_CHECK_BUDGET_S": "ten"}, "GPU_CHECK_BUDGET_S must be a whole number"),
    ],
)
def test_wrapper_checks_arguments_before_installing(
    tmp_path: Path, args: list[str], env: dict[str, str], needle: str
) -> None:
    proc = run(["bash", str(WRAPPER), *args], tmp_path, **env)
    assert proc.returncode == 2
    assert needle in one_error_line(proc)
    assert not (tmp_path / "venv").exists() and not (tmp_path / "OUT").exists()


def test_wrapper_is_valid_bash_and_passes_shellcheck() -> None:
    assert subprocess.run(["bash", "-n", str(WRAPPER)], capture_output=True).returncode == 0
    if shutil.which("shellcheck") is None:
        pytest.skip("shellcheck is not installed")
    proc = subprocess.run(["shellcheck", str(WRAPPER)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout


# ---------------------------------------------------------------------------------------------- dry run


def _listed(stdout: str) -> list[tuple[str, bool]]:
    """(step, selected) for each step line of a dry run, in the order printed."""
    out = []
    for line in stdout.splitlines():
        mark, _, rest = line.partition(" ")
        name = rest.split()[0] if rest.split() else ""
        if mark in ("", "-") and name in STEPS:
            out.append((name, mark == ""))
    return out


def test_dry_run_lists_the_steps_and_writes_nothing(tmp_path: Path) -> None:
    proc = driver(tmp_path, "OUT", "--dry-run")
    assert proc.returncode == 0, proc.stderr
    assert _listed(proc.stdout) == [(s, True) for s in STEPS]
    assert "install" in proc.stdout and "scripts/gpu_check.sh" in proc.stdout
    assert "device cuda, models 1.1b, sweep trials 12" in proc.stdout
    assert not (tmp_path / "OUT").exists() and not (tmp_path / "work").exists()

    # --steps picks a subset, always run in the canonical order; the wrapper answers without installing
    proc = run(["bash", str(WRAPPER), "OUT", "--steps", "sweep,env", "--dry-run", "--trials", "15"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert _listed(proc.stdout) == [(s, s in ("env", "sweep")) for s in STEPS]
    assert "sweep trials 15" in proc.stdout
    assert not (tmp_path / "OUT").exists() and not (tmp_path / "venv").exists()


# ---------------------------------------------------------------------------------------------- summary


def _flatten(metrics: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in metrics.items():
        if isinstance(value, dict) and value:
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _cells(line: str) -> list[str]:
    """The cells of a markdown table row, with ``\\|`` and ``\\\\`` unescaped."""
    cells, current, i = [], "", 0
    body = line.strip()[1:-1]
    while i < len(body):
        if body[i] == "\\" and i + 1 < len(body):
            current += body[i + 1]
            i += 2
            continue
        if body[i] == "|":
            cells.append(current.strip())
            current = ""
        else:
            current += body[i]
        i += 1
    cells.append(current.strip())
    return cells


def _tables(markdown: str) -> tuple[dict[str, list[str]], dict[str, dict[str, str]]]:
    """The step table (step -> cells) and each step's metric table (key -> cell) of a summary."""
    steps: dict[str, list[str]] = {}
    metrics: dict[str, dict[str, str]] = {}
    section = None
    for line in markdown.splitlines():
        if line.startswith("### "):
            section = line[4:].strip()
            metrics[section] = {}
            continue
        if not line.startswith("| ") or line.startswith("|---"):
            continue
        cells = _cells(line)
        if cells[0] in ("step", "metric", "check"):
            header = cells[0]
            continue
        if section is None:
            steps[cells[0]] = cells
        elif header == "metric":
            metrics[section][cells[0]] = cells[1]
    return steps, metrics


def _same(cell: str, value: Any) -> bool:
    return cell == value if isinstance(value, str) else json.loads(cell) == value


def assert_summary_matches(results: dict[str, Any], markdown: str) -> None:
    steps, metrics = _tables(markdown)
    assert list(steps) == list(results["steps"])
    for name, record in results["steps"].items():
        row = steps[name]
        assert row[1] == record["status"]
        assert _same(row[2], record.get("seconds"))
        flat = _flatten(record.get("metrics") or {})
        assert metrics.get(name, {}).keys() == flat.keys()
        for key, value in flat.items():
            assert _same(metrics[name][key], value), (name, key, metrics[name][key], value)


def test_summary_shows_every_value_as_the_json_holds_it(tmp_path: Path) -> None:
    metrics = {
        "seconds": gpu_check.clean(12.345678),
        "tokens_per_s": gpu_check.clean(123456.7),
        "tiny": gpu_check.clean(3.0517578125e-05),
        "count": 1130000000,
        "ok": True,
        "missing": None,
        "text": "a | b \\ c",
        "empty": "",
        "numeric_text": "64/64",
        "pids": [101, 202],
        "ties": {"gpu_wall_s": 9.1, "cmp": {"max_ulps": 1.0, "worst": "model.layers.0.mlp.up_proj.weight"}},
    }
    results = gpu_check.new_results(gpu_check.parse_args([str(tmp_path / "OUT")]), [])
    results["steps"]["merge"] = {
        "status": "ok",
        "seconds": 41.2,
        "headline": "ties | dare",
        "metrics": metrics,
        "checks": {"ties_gpu_equals_cpu": {"ok": True, "detail": "0 of 9 differ"}},
    }
    results["steps"]["polish"] = {"status": "skipped", "seconds": 0.2, "reason": "no polish stage"}
    assert (
        metrics["seconds"] == 12.35 and metrics["tokens_per_s"] == 123500.0 and metrics["tiny"] == 3.052e-05
    )
    gpu_check.save(tmp_path, results)
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved == results
    markdown = (tmp_path / "summary.md").read_text()
    assert_summary_matches(saved, markdown)
    assert "| ties_gpu_equals_cpu | pass | 0 of 9 differ |" in markdown
    assert "| polish | skipped | 0.2 | no polish stage |" in markdown


# ---------------------------------------------------------------------------------------------- real runs


needs_no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="the CUDA step would not fail here")


@needs_no_cuda
def test_a_failing_step_stops_the_run_and_keeps_what_was_measured(tmp_path: Path) -> None:
    out = tmp_path / "out"
    proc = driver(tmp_path, str(out), "--steps", "env,merge,polish", "--work-dir", str(tmp_path / "work"))
    assert proc.returncode == 1, proc.stdout + proc.stderr
    line = one_error_line(proc)
    assert line.startswith("gpu_check: FAILED merge: no CUDA device: torch ")
    results = json.loads((out / "results.json").read_text())
    assert results["status"] == "failed" and results["first_failure"] == line.removeprefix(
        "gpu_check: FAILED "
    )
    assert results["finished"] is not None
    assert list(results["steps"]) == ["env", "merge"]  # polish never started
    env = results["steps"]["env"]
    assert env["status"] == "ok" and env["seconds"] > 0
    assert env["metrics"]["torch"] == torch.__version__ and env["metrics"]["cuda_available"] is False
    assert env["metrics"]["python"] == ".".join(map(str, sys.version_info[:3]))
    merge = results["steps"]["merge"]
    assert merge["status"] == "failed" and merge["error"].startswith("no CUDA device")
    assert (out / "logs" / "env.log").is_file() and (out / "logs" / "merge.log").is_file()
    markdown = (out / "summary.md").read_text()
    assert_summary_matches(results, markdown)
    assert "status **failed**; first failure: merge: no CUDA device" in markdown

    # --keep-going: the later steps still run; the first failure is still the one line, exit 1
    again = driver(
        tmp_path, str(out), "--steps", "merge,polish", "--keep-going", "--work-dir", str(tmp_path / "w")
    )
    assert again.returncode == 1
    assert one_error_line(again).startswith("gpu_check: FAILED merge: no CUDA device")
    results = json.loads((out / "results.json").read_text())
    assert [(n, s["status"]) for n, s in results["steps"].items()] == [
        ("merge", "failed"),
        ("polish", "failed"),
    ]
    assert results["steps"]["polish"]["error"].startswith("no CUDA device")
    assert_summary_matches(results, (out / "summary.md").read_text())


def test_out_of_time_and_a_failed_install_are_recorded_without_running_anything(tmp_path: Path) -> None:
    out = tmp_path / "out"
    work = str(tmp_path / "work")
    proc = driver(tmp_path, str(out), "--steps", "env", "--budget-s", "0.001", "--work-dir", work)
    assert proc.returncode == 1
    assert one_error_line(proc) == "gpu_check: FAILED env: out of time (0 s left)"
    assert json.loads((out / "results.json").read_text())["steps"]["env"]["status"] == "failed"
    assert not (out / "logs").exists()  # no step process was started

    # what scripts/gpu_check.sh runs when pip fails: the install's one line becomes the failure
    proc = driver(
        tmp_path, str(out), "--work-dir", work, "--install-status", "failed", "--install-seconds", "12",
        "--install-error=ERROR: No matching distribution found for vllm==9",
    )  # fmt: skip
    assert proc.returncode == 1
    assert (
        one_error_line(proc) == "gpu_check: FAILED install: ERROR: No matching distribution found for vllm==9"
    )
    results = json.loads((out / "results.json").read_text())
    assert results["steps"] == {
        "install": {
            "status": "failed",
            "seconds": 12.0,
            "error": "ERROR: No matching distribution found for vllm==9",
        }
    }
    assert_summary_matches(results, (out / "summary.md").read_text())


def _children_of_run(out: Path) -> list[int]:
    """Pids of processes whose command line names ``out`` (the driver's step processes)."""
    pids = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                cmdline = (proc / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if str(out).encode() in cmdline and b"--child" in cmdline:
                pids.append(int(proc.name))
    return pids


def test_sigterm_stops_the_running_step_and_closes_the_record(tmp_path: Path) -> None:
    out = tmp_path / "out"
    # the models step first builds the micro zoo (tens of seconds on a CPU): long enough to be stopped
    cmd = [
        sys.executable,
        str(DRIVER),
        str(out),
        "--steps",
        "env,models",
        "--device",
        "cpu",
        "--size",
        "tiny",
    ]
    cmd += ["--work-dir", str(tmp_path / "work")]
    env = {**os.environ, "EVOMERGE_HOME": str(tmp_path / "home")}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                steps = json.loads((out / "results.json").read_text())["steps"]
            except (OSError, ValueError):
                steps = {}
            if steps.get("models", {}).get("status") == "running" and _children_of_run(out):
                break
            time.sleep(0.2)
        else:
            pytest.fail("the models step never started")
        proc.send_signal(signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 1, stdout + stderr
    assert (
        stderr.strip() == "gpu_check: FAILED models: interrupted by SIGTERM (what it measured so far is kept)"
    )
    results = json.loads((out / "results.json").read_text())
    assert results["status"] == "failed" and results["finished"] is not None
    assert results["steps"]["env"]["status"] == "ok"
    assert results["steps"]["models"]["status"] == "failed"
    assert_summary_matches(results, (out / "summary.md").read_text())
    assert _children_of_run(out) == []  # the step's process group was killed with it
