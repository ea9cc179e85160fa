"""Commands on a finished run: ``evomerge export`` (a trial's recipe, scored on the test split),
``evomerge report`` (the final report) and ``evomerge dashboard`` (optuna-dashboard on its study)."""

from __future__ import annotations

import dataclasses
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from evomerge.cli.checks import _check_output
from evomerge.cli.display import _rows_table, console, progress_bar
from evomerge.cli.report_output import print_final_report, run_final_report
from evomerge.cli.run_dir import _check_study_db, _load_run, _load_run_study, _resolved_from_run
from evomerge.errors import ConfigError


def export(
    run_dir: Annotated[Path, typer.Argument(help="A sweep's run directory (runs/<study>).")],
    trial: Annotated[int | None, typer.Option(min=0, help="Trial number (default: the best).")] = None,
    output: Annotated[Path | None, typer.Option("--output", "-o", help="Recipe YAML to write.")] = None,
    materialize: Annotated[
        Path | None, typer.Option(help="Also merge the recipe into this directory.")
    ] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace existing outputs.")] = False,
    fmt: Annotated[
        str, typer.Option("--format", help="Recipe format: evomerge, or mergekit (for mergekit-yaml).")
    ] = "evomerge",
    test: Annotated[
        bool, typer.Option(help="Score the exported recipe and the base on the held-out test split.")
    ] = True,
) -> None:
    """Write a trial's recipe (the best by default) as YAML, optionally merging it; then score it on the
    test split (fitness only ever saw dev)."""
    from evomerge.optimizer import LocalEvaluator, export_trial, trial_recipe

    if fmt not in ("evomerge", "mergekit"):
        raise ConfigError(f"--format must be evomerge or mergekit, got {fmt!r}")
    if output is not None:
        _check_output(output, "--output", directory=False)
    if materialize is not None:
        _check_output(materialize, "--materialize", directory=True)
    info = _load_run(run_dir)
    study = _load_run_study(info)
    out = output or run_dir / "exported_recipe.yaml"
    if output is None:
        _check_output(out, "--output", directory=False)
    if materialize is not None:
        with progress_bar("merging") as update:
            chosen, _ = export_trial(
                study,
                out,
                trial=trial,
                materialize=materialize,
                overwrite=overwrite,
                progress=lambda d, t, name: update(name, d, t),
                fmt=fmt,
            )
    else:
        chosen, _ = export_trial(study, out, trial=trial, overwrite=overwrite, fmt=fmt)
    console.print(
        f"trial {chosen.number} (dev mean {chosen.user_attrs['mean']:.4f}) written to {escape(str(out))}"
    )
    if materialize is not None:
        console.print(f"merged model written to {escape(str(materialize))}")
    if not test:
        return
    sweep = _resolved_from_run(info)
    evaluator = LocalEvaluator(sweep)
    tasks = [t.name for t in sweep.tasks]
    with progress_bar("test split") as update:
        base = evaluator.score_state(evaluator.base_state, "test", lambda d, t: update("base", d, t))
        ours = evaluator.score_recipe(
            trial_recipe(chosen), "test", lambda d, t: update(f"trial {chosen.number}", d, t)
        )[0]
    rows = [("base", base.scores, base.mean), (f"trial {chosen.number}", ours.scores, ours.mean)]
    console.print(_rows_table("Held-out test split", tasks, rows))


def report(
    run_dir: Annotated[Path, typer.Argument(help="A sweep's run directory (runs/<study>).")],
    materialize: Annotated[
        bool, typer.Option(help="Also merge the best recipe into RUN_DIR/best_model.")
    ] = False,
) -> None:
    """Score the base, the experts, uniform baselines and the best recipe on the test split; write
    report.md, results.json, best_recipe.yaml and the PNG plots (history, Pareto front, per-layer heatmap)."""
    from evomerge.optimizer import LocalEvaluator

    info = _load_run(run_dir)
    sweep = _resolved_from_run(info)
    sweep = dataclasses.replace(
        sweep, config=sweep.config.model_copy(update={"materialize_best": materialize})
    )
    study = _load_run_study(info)
    _check_output(sweep.config.run_dir(), "the run directory", directory=True)
    final = run_final_report(sweep, LocalEvaluator(sweep), study)
    print_final_report(final, [t.name for t in sweep.tasks], recipe=False)


def dashboard(
    run_dir: Annotated[Path | None, typer.Argument(help="A sweep's run directory.")] = None,
    storage: Annotated[str | None, typer.Option(help="An Optuna storage URL instead of RUN_DIR.")] = None,
    port: Annotated[int, typer.Option(min=1, max=65535, help="Port on 127.0.0.1.")] = 8080,
) -> None:
    """Start optuna-dashboard for the study's storage on 127.0.0.1."""
    if storage is None:
        if run_dir is None:
            raise ConfigError("give a run directory or --storage")
        storage = _load_run(run_dir, full=False).storage
    _check_study_db(storage)  # optuna-dashboard would create an empty database
    exe = shutil.which("optuna-dashboard") or str(Path(sys.executable).parent / "optuna-dashboard")
    if not Path(exe).exists():
        raise ConfigError("optuna-dashboard is not installed (pip install optuna-dashboard)")
    console.print(f"optuna-dashboard on http://127.0.0.1:{port} for {escape(str(storage))} (Ctrl-C stops it)")
    raise typer.Exit(subprocess.call([exe, storage, "--host", "127.0.0.1", "--port", str(port)]))
