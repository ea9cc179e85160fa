"""Sweeps as Ray jobs: ``evomerge submit`` and ``evomerge sweeps list | status | logs | stop`` (see
:mod:`evomerge.optimizer.jobs`)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from evomerge.cli.display import console
from evomerge.errors import ConfigError

ADDRESS_HELP = "The Ray job server (default: $RAY_ADDRESS), e.g. http://127.0.0.1:8265."

sweeps_app = typer.Typer(
    help="Sweeps running as Ray jobs: list, status, logs, stop.",
    no_args_is_help=True,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def submit(
    config: Annotated[Path, typer.Argument(help="A sweep YAML.")],
    address: Annotated[str | None, typer.Option(help=ADDRESS_HELP)] = None,
    workers: Annotated[
        int | None, typer.Option(min=1, help="Ray workers for the sweep (sets executor: ray).")
    ] = None,
    n_trials: Annotated[
        int | None, typer.Option(min=1, help="Override the number of complete trials.")
    ] = None,
    env: Annotated[
        list[str] | None,
        typer.Option(help="KEY=VALUE for the driver's environment (e.g. PGHOST=db); repeatable."),
    ] = None,
    report: Annotated[
        bool, typer.Option(help="Score the test split after the search, in the driver.")
    ] = True,
    entrypoint_num_gpus: Annotated[
        float, typer.Option(min=0.0, help="GPUs reserved for the driver (its report scores models).")
    ] = 0.0,
) -> None:
    """Submit `evomerge search CONFIG` to a Ray cluster as a job (the sweep YAML and its task files travel
    with it; model paths must be on the cluster's storage). Submitting a sweep again resumes its study."""
    from evomerge.optimizer.jobs import submit_sweep

    variables: dict[str, str] = {}
    for item in env or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--env: {item!r} is not KEY=VALUE")
        variables[key] = value
    job_id, cfg = submit_sweep(
        config,
        address=address,
        workers=workers,
        n_trials=n_trials,
        env=variables,
        report=report,
        entrypoint_num_gpus=entrypoint_num_gpus,
    )
    console.print(f"submitted job {job_id} · study {cfg.study_name} · storage {escape(cfg.storage_url())}")


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}"


def _line(job: object) -> str:
    from evomerge.optimizer.jobs import SweepJob

    assert isinstance(job, SweepJob)
    done = "?" if job.complete is None else str(job.complete)
    best = "-" if job.best is None else f"{job.best:.3f}"
    started = job.started.strftime("%Y-%m-%d %H:%M:%S") if job.started else "-"
    return (
        f"{job.job_id}  {job.study}  {job.state}  trials {done}/{job.budget}  best dev {best}  "
        f"started {started}  eta {_duration(job.eta_s)}"
    )


@sweeps_app.command("list")
def list_cmd(address: Annotated[str | None, typer.Option(help=ADDRESS_HELP)] = None) -> None:
    """One line per sweep job: job id, study, state, complete/budget trials, best dev mean, start, ETA
    (progress read from each study's storage; '?' where this machine cannot open it)."""
    from evomerge.optimizer.jobs import list_sweeps

    jobs = list_sweeps(address)
    if not jobs:
        console.print("no sweep jobs on this cluster")
    for job in jobs:
        console.print(escape(_line(job)), highlight=False, soft_wrap=True)


@sweeps_app.command("status")
def status_cmd(
    job_id: Annotated[str, typer.Argument(help="The job id `evomerge submit` printed.")],
    address: Annotated[str | None, typer.Option(help=ADDRESS_HELP)] = None,
) -> None:
    """One sweep job: its line, where its study and run directory live, its last trials."""
    from evomerge.optimizer.jobs import sweep_job

    job = sweep_job(job_id, address)
    console.print(escape(_line(job)), highlight=False, soft_wrap=True)
    console.print(f"storage {escape(job.storage)}", highlight=False, soft_wrap=True)
    console.print(f"runs {escape(job.runs_dir)} (on the node the job's driver runs on)", highlight=False)
    for number, state, mean in job.last:
        score = "" if mean is None else f" · dev mean {mean:.3f}"
        console.print(f"  trial {number} {state.lower()}{score}", highlight=False)


@sweeps_app.command("logs")
def logs_cmd(
    job_id: Annotated[str, typer.Argument(help="The job id.")],
    follow: Annotated[bool, typer.Option("--follow", "-f", help="Keep printing until the job ends.")] = False,
    address: Annotated[str | None, typer.Option(help=ADDRESS_HELP)] = None,
) -> None:
    """The job's log (the sweep's progress lines)."""
    from evomerge.optimizer.jobs import sweep_logs

    for chunk in sweep_logs(job_id, address, follow=follow):
        sys.stdout.write(chunk)
        sys.stdout.flush()


@sweeps_app.command("stop")
def stop_cmd(
    job_id: Annotated[str, typer.Argument(help="The job id.")],
    address: Annotated[str | None, typer.Option(help=ADDRESS_HELP)] = None,
) -> None:
    """Stop the sweep: its unfinished trials are failed and queued again (the study stays exact); submit
    the same sweep again to resume it."""
    from evomerge.optimizer.jobs import stop_sweep

    state = stop_sweep(job_id, address)
    console.print(f"job {job_id}: {state.lower()}", highlight=False)
