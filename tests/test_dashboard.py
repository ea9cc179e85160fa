"""`evomerge dashboard` serves the study on 127.0.0.1 with named objectives."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import optuna

from evomerge.optimizer.config import SweepConfig
from evomerge.optimizer.study import open_study


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_dashboard_serves_study_with_metric_names(tmp_path: Path) -> None:
    config = SweepConfig.model_validate(
        {
            "study_name": "dash",
            "runs_dir": str(tmp_path / "runs"),
            "models": {"base": "b", "experts": ["e"]},
            "tasks": [{"name": "arith", "data_files": {"dev": "d.jsonl"}}],
            "sampler": {"name": "nsga2"},
        }
    )
    study = open_study(config, ["arith", "code"])
    study.add_trial(
        optuna.trial.create_trial(
            values=[0.5, 0.25],
            params={"x": 0.1},
            distributions={"x": optuna.distributions.FloatDistribution(0, 1)},
        )
    )
    run_dir = config.run_dir()
    (run_dir / "sweep.json").write_text(
        json.dumps({"config": {"study_name": "dash"}, "storage": config.storage_url()})
    )
    port = _free_port()
    exe = Path(sys.executable).parent / "evomerge"
    proc = subprocess.Popen(
        [str(exe), "dashboard", str(run_dir), "--port", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        body = None
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and body is None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/studies/1", timeout=2) as r:
                    body = json.loads(r.read())
            except OSError:
                time.sleep(0.5)
        assert body is not None, "dashboard did not answer within 60 s"
        assert body["objective_names"] == ["arith", "code"]
        assert len(body["trials"]) == 1
        assert body["trials"][0]["values"] == [0.5, 0.25]
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=10)
