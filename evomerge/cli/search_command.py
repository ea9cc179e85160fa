"""``evomerge search``: run or continue a sweep, then the final report on the test split (and the sweep's
``fusion:`` stage when it has one)."""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any

import typer

from evomerge.cli.checks import _check_output
from evomerge.cli.display import _rows_table, console, progress_bar
from evomerge.cli.fuse_command import _fusion_stage
from evomerge.cli.report_output import print_final_report, run_final_report
from evomerge.cli.run_dir import _sqlite_path


def search(
    config: Annotated[Path, typer.Argument(help="A sweep YAML (see experiments/).")],
    n_trials: Annotated[
        int | None, typer.Option(min=1, help="Override the number of complete trials.")
    ] = None,
    report: Annotated[bool, typer.Option(help="Evaluate on the test split and write report.md.")] = True,
    executor: Annotated[
        str | None, typer.Option(help="Override the executor: local, or ray (a pool of actors).")
    ] = None,
    workers: Annotated[int | None, typer.Option(min=1, help="Override the number of Ray workers.")] = None,
    ray_address: Annotated[
        str | None, typer.Option(help="Join this Ray cluster ('auto': the one this machine is in).")
    ] = None,
    allow_test_fitness: Annotated[
        bool, typer.Option(help="Accept a dev file that is also a test file (test questions in fitness).")
    ] = False,
) -> None:
    """Run (or continue) a sweep; then compare the best recipe on the test split and export it."""
    from evomerge.config_util import validate_model
    from evomerge.evaluators.task_check import check_task_files
    from evomerge.optimizer import (
        LocalEvaluator,
        load_sweep_config,
        resolve_sweep,
        run_search,
    )
    from evomerge.optimizer.executors import LocalExecutor, make_executor
    from evomerge.optimizer.study import complete_trials, pareto_front
    from evomerge.optimizer.sweep import check_held_out

    overrides: dict[str, Any] = {} if n_trials is None else {"n_trials": n_trials}
    cfg = load_sweep_config(config, overrides)
    if executor is not None or workers is not None or ray_address is not None:
        ex = cfg.executor.model_dump()
        ex.update({"kind": executor or ("ray" if ray_address or (workers or 1) > 1 else ex["kind"])})
        if workers is not None:
            ex["workers"] = workers
        cfg = validate_model(type(cfg), {**cfg.model_dump(), "executor": ex}, where=str(config))
    # Everything the sweep reads or writes is checked before the run directory or the study exists.
    _check_output(cfg.run_dir(), "runs_dir", directory=True)
    db = _sqlite_path(cfg.storage_url())
    if db is not None and not db.exists():
        _check_output(db, "storage", directory=False)
    if cfg.tasks:
        check_task_files(cfg.tasks, cfg.data_dir or ".", where=f"{config}: tasks")
    with progress_bar("zoo") as zoo_update:
        sweep = resolve_sweep(cfg, zoo_progress=zoo_update)
    if sweep.tasks != cfg.tasks:  # a zoo's own tasks
        check_task_files(sweep.tasks, sweep.data_dir, where="zoo tasks")
    check_held_out(sweep, allow_test_fitness=allow_test_fitness)
    console.print(
        f"study [bold]{cfg.study_name}[/] · {len(sweep.experts)} experts · {len(sweep.tasks)} tasks · "
        f"sampler {cfg.sampler.name} · executor {cfg.executor.kind} x{cfg.executor.workers} · "
        f"storage {cfg.storage_url()}"
    )
    pool = make_executor(sweep, address=ray_address)
    best = {"mean": -1.0}
    with progress_bar("search") as update:

        def on_trial(done: int, total: int, outcome: Any) -> None:
            if outcome.mean is not None and outcome.mean > best["mean"]:
                best["mean"] = outcome.mean
            label = f"trial {outcome.number} {outcome.state.lower()}"
            label += f" · dev mean {outcome.mean:.3f}" if outcome.mean is not None else f" · {outcome.error}"
            update(f"{label} · best {best['mean']:.3f}", done, total)

        try:
            with stop_on_sigterm():
                study = run_search(sweep, pool, on_trial=on_trial, allow_test_fitness=allow_test_fitness)
        finally:
            if not isinstance(pool, LocalExecutor):
                pool.close()
    tasks = [t.name for t in sweep.tasks]
    front = pareto_front(complete_trials(study), tasks)
    console.print(
        _rows_table(
            "Pareto front (dev split)",
            tasks,
            [(f"trial {t.number}", t.user_attrs["scores"], t.user_attrs["mean"]) for t in front],
        )
    )
    if not report:
        return
    evaluator = pool.evaluator if isinstance(pool, LocalExecutor) else LocalEvaluator(sweep)
    final = run_final_report(sweep, evaluator, study)
    print_final_report(final, tasks)
    if cfg.fusion is not None:
        _fusion_stage(cfg, sweep, Path(final.paths.get("best_model", "")), config)


class SweepStopped(KeyboardInterrupt):
    """SIGTERM (``evomerge sweeps stop``, ``ray job stop``, a scheduler's stop): the sweep stops like on
    Ctrl-C; its unfinished trials are failed and queued again (see ``run_search``)."""


@contextlib.contextmanager
def stop_on_sigterm() -> Iterator[None]:
    """Turn SIGTERM into :class:`SweepStopped` in this (the main) thread while the sweep runs."""
    from evomerge.optimizer.loop import stop_soon

    def stop(signum: int, frame: object) -> None:
        stop_soon(SweepStopped())  # never in the middle of a study write

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
