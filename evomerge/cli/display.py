"""Where the command line writes: the stdout and stderr consoles, a progress bar (rich on a terminal, plain
lines elsewhere) and the table of per-task scores the commands print."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

console = Console()
err_console = Console(stderr=True)


@contextmanager
def progress_bar(description: str) -> Iterator[Callable[[str, int, int], None]]:
    """A rich progress bar with an ETA on a terminal, plain lines at a steady interval elsewhere (CI, a
    log file, ``ray job logs``: :mod:`evomerge.progress`); yields ``update(label, done, total)``."""
    if not console.is_terminal:
        from evomerge.progress import plain_progress

        with plain_progress(description, console.file) as update:
            yield update
        return
    with Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        TextColumn("{task.fields[label]}"),
        console=console,
        transient=False,
    ) as progress:
        task = progress.add_task(description, total=None, label="")

        def update(label: str, done: int, total: int) -> None:
            progress.update(task, completed=done, total=total, label=label)

        yield update


def _rows_table(
    title: str, tasks: Sequence[str], rows: Sequence[tuple[str, dict[str, float], float]]
) -> Table:
    table = Table(title=title)
    table.add_column("")
    for t in tasks:
        table.add_column(t, justify="right")
    table.add_column("mean", justify="right")
    for name, scores, mean in rows:
        table.add_row(name, *(f"{scores[t]:.3f}" for t in tasks), f"{mean:.3f}")
    return table
