"""``evomerge eval``: a model scored on tasks (a tasks YAML or a zoo preset)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from evomerge.cli.checks import _check_device, _check_output
from evomerge.cli.display import console, progress_bar
from evomerge.errors import ConfigError


def eval_cmd(
    model: Annotated[Path, typer.Argument(help="A Hugging Face model directory (safetensors).")],
    tasks: Annotated[str, typer.Option(help="A tasks YAML (list of task configs) or a zoo preset.")] = "tiny",
    split: Annotated[str, typer.Option(help="dev or test.")] = "dev",
    device: Annotated[str, typer.Option(help="cpu or cuda.")] = "cpu",
    batch_size: Annotated[int, typer.Option(min=1, help="Generation batch size.")] = 64,
) -> None:
    """Score a model on tasks (greedy generation, exact match)."""
    from evomerge.evaluators import HFBackend, evaluate

    if split not in ("dev", "test"):
        raise ConfigError(f"--split must be dev or test, got {split!r}")
    _check_device(device)
    from evomerge.checkpoints import ModelDir

    ModelDir(model).close()  # clear errors for a missing dir or pickle-only weights, before any work
    task_list, base_dir = _load_tasks(tasks)
    backend = HFBackend.from_pretrained(model, device=device, batch_size=batch_size)
    with progress_bar(f"evaluating ({split})") as update:
        result = evaluate(backend, task_list, split, base_dir, progress=lambda d, t: update("", d, t))  # type: ignore[arg-type]
    table = Table(title=f"{model} ({split} split)")
    table.add_column("task")
    table.add_column("score", justify="right")
    table.add_column("n", justify="right")
    for name, r in result.tasks.items():
        table.add_row(name, f"{r.score:.3f}", str(r.n))
    table.add_row("[bold]mean", f"[bold]{result.mean:.3f}", "")
    console.print(table)


def _load_tasks(spec: str) -> tuple[list[Any], str]:
    from evomerge.config_util import load_yaml, validate_model
    from evomerge.evaluators import TaskConfig
    from evomerge.evaluators.task_check import check_task_files
    from evomerge.zoo import ALL_PRESETS, build_zoo, find_zoo, resolve_config
    from evomerge.zoo.build import default_cache_dir

    if spec in ALL_PRESETS:
        if find_zoo(resolve_config(spec)) is None:
            _check_output(default_cache_dir(), "the zoo cache (EVOMERGE_HOME)", directory=True)
        zoo = build_zoo(spec)
        return list(zoo.tasks), zoo.root
    data = load_yaml(spec, what="tasks file")
    items = data.get("tasks") if isinstance(data, dict) else data
    if not isinstance(items, list) or not items:
        raise ConfigError(f"{spec}: expected a list of task configs (or a mapping with 'tasks')")
    tasks = [validate_model(TaskConfig, item, where=f"{spec}: tasks[{i}]") for i, item in enumerate(items)]
    base_dir = str(Path(spec).resolve().parent)
    check_task_files(tasks, base_dir, where=f"{spec}: tasks")
    return tasks, base_dir
