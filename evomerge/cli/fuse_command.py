"""``evomerge fuse`` (heterogeneous sources distilled into a pivot) and a sweep's ``fusion:`` stage."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape

from evomerge.cli.checks import _check_output, _positive_finite
from evomerge.cli.display import _rows_table, console, progress_bar
from evomerge.errors import ConfigError


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


def _fusion_stage(cfg: Any, sweep: Any, pivot: Path, config_path: Path) -> None:
    """The sweep's ``fusion:`` stage: distil the sources into the best model, score on the test split.

    In a zoo sweep, ``zoo:hetero`` names the zoo's heterogeneous expert (built if needed) as a source or,
    as ``data``, its fusion training data, and ``zoo:<family>`` one of the zoo's experts; the hetero
    expert's own task is then scored too. In a ``smollm2`` zoo the heterogeneous expert is the imported
    Gemma 3 270M fine-tuned on ``sort`` (:func:`evomerge.zoo.smollm2.build_smollm2_hetero`), elsewhere the
    zoo's GPT-2 expert (:func:`evomerge.zoo.hetero.build_hetero`).
    """
    import json

    from evomerge.atomic_io import write_text_atomic
    from evomerge.config_util import validate_model
    from evomerge.fusion.pipeline import FusionConfig, run_fusion, score_models

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
