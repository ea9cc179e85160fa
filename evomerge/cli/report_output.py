"""The end of ``search`` and ``report``: the final report with its progress, then what the console shows
(the best recipe as written to ``best_recipe.yaml``, the test table, the files and the verdict line)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rich.markup import escape
from rich.syntax import Syntax

from evomerge.cli.display import _rows_table, console, progress_bar


def run_final_report(sweep: Any, evaluator: Any, study: Any) -> Any:
    """``final_report`` with a progress bar (pick on val, test scores, materialized model)."""
    from evomerge.optimizer import final_report

    with progress_bar("report") as update:
        return final_report(
            sweep,
            evaluator,
            study,
            progress=update,
            materialize_progress=lambda d, t, name: update(f"materialize {name}", d, t),
        )


def print_final_report(final: Any, tasks: list[str], *, recipe: bool = True) -> None:
    """The best recipe (as written), the held-out test table, the files written and the verdict line."""
    from evomerge.optimizer import verdict_line

    stage = final.polish
    if stage is not None:
        for run in stage.runs:
            console.print(
                f"polish: {escape(run.label)}: dev {run.start_dev:.3f} -> {run.best_dev:.3f} (step "
                f"{run.best_step}), val {run.val_mean:.3f} ({run.seconds:.0f} s)"
            )
        console.print(
            f"polish: unpolished pick val {stage.pick_val:.3f}; result: "
            + escape(stage.chosen or "the unpolished pick")
        )
    if recipe:
        picked = "" if final.best_val is None else f", val mean {final.best_val:.3f} (picked on val)"
        polished = None if stage is None else stage.chosen_run()
        what = (
            f"trial {final.best_number}, dev mean {final.best_dev.mean:.3f}"
            if polished is None
            else f"{escape(polished.label)}, dev mean {polished.best_dev:.3f}"
        )
        console.print(f"[bold]Best recipe[/] ({what}{picked}):")
        recipe_file = final.paths.get("best_recipe")
        recipe_text = Path(recipe_file).read_text() if recipe_file else final.best_recipe.to_yaml()
        console.print(Syntax(recipe_text, "yaml"))
    console.print(_rows_table("Held-out test split", tasks, [(r.name, r.scores, r.mean) for r in final.test]))
    for key, path in final.paths.items():
        console.print(f"{key}: {escape(str(path))}")
    console.print(escape(verdict_line(final)))
