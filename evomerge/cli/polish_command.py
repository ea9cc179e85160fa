"""``evomerge polish RUN_DIR``: gradient polish of a finished sweep's pick (evomerge.optimizer.polish)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from evomerge.cli.checks import _check_output
from evomerge.cli.display import console
from evomerge.cli.run_dir import _load_run, _load_run_study, _resolved_from_run


def polish(
    run_dir: Annotated[Path, typer.Argument(help="A sweep's run directory (runs/<study>).")],
    objective: Annotated[
        str, typer.Option(help="ce (train answers), kl (to each expert on its domain) or entropy.")
    ] = "ce",
    steps: Annotated[int, typer.Option(min=1, help="Optimizer steps at most.")] = 200,
    lr: Annotated[float, typer.Option(help="Adam learning rate (> 0).")] = 0.02,
    eval_every: Annotated[int, typer.Option(min=1, help="Score dev every this many steps.")] = 25,
    trial: Annotated[
        int | None, typer.Option(min=0, help="Start from this trial (default: the pick).")
    ] = None,
    output: Annotated[
        Path | None, typer.Option("--output", "-o", help="Output directory (default: RUN_DIR/polish).")
    ] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing output directory.")] = False,
) -> None:
    """Train the picked recipe's per-layer task-arithmetic coefficients (nothing else) on the tasks'
    training prompts, keep the step with the best dev mean, and compare both on the test split."""
    from evomerge.config_util import validate_model
    from evomerge.errors import ConfigError
    from evomerge.optimizer import LocalEvaluator, pick_trial, trial_recipe
    from evomerge.optimizer.polish import PolishConfig, polish_recipe, write_polish

    if objective not in ("ce", "kl", "entropy"):
        raise ConfigError(f"--objective must be ce, kl or entropy, got {objective!r}")
    cfg = validate_model(
        PolishConfig,
        {"objective": objective, "steps": steps, "lr": lr, "eval_every": eval_every},
        where="polish",
    )
    out = output or run_dir / "polish"
    _check_output(out, "--output", directory=True)
    if out.exists() and not overwrite:
        raise ConfigError(f"{out} exists (use --overwrite to replace it)")
    info = _load_run(run_dir)
    study = _load_run_study(info)
    chosen = pick_trial(study, trial)
    start = trial_recipe(chosen)
    evaluator = LocalEvaluator(_resolved_from_run(info))

    def progress(step: int, total: int, loss: float, dev: float | None) -> None:
        if dev is not None:
            console.print(f"polish step {step}/{total}  loss {loss:.4f}  dev {dev:.4f}")

    result = polish_recipe(start, evaluator, cfg, progress=progress)
    label = f"searched (trial {chosen.number})"
    searched = evaluator.score_recipe(start, "test")[0]
    polished = evaluator.score_state(result.state, "test")
    test = {
        label: {**{k: float(v) for k, v in searched.scores.items()}, "mean": float(searched.mean)},
        "searched + polished": {
            **{k: float(v) for k, v in polished.scores.items()},
            "mean": float(polished.mean),
        },
    }
    write_polish(out, start, result, cfg, test)
    before, after = test[label]["mean"], test["searched + polished"]["mean"]
    console.print(
        f"dev {result.start_dev:.4f} -> {result.best_dev:.4f} (step {result.best_step}); "
        f"test {before:.4f} -> {after:.4f}; written to {escape(str(out))}"
    )
