"""lm-eval tasks scored on the live, in-memory model (``kind: lmeval``), fully offline.

lm-eval's ``HFLM`` wraps the backend's model object itself, so a candidate's weights, loaded in place by
the search loop, are what lm-eval scores: no checkpoint is written and nothing is reloaded. Only the
task YAMLs under ``include_path`` are indexed (``include_defaults=False``: indexing lm-eval's 14k
built-in tasks takes seconds), and the run is offline (``HF_DATASETS_OFFLINE``, ``HF_HUB_OFFLINE``), so
a task must read local ``data_files``; relative paths in its YAML are read relative to ``include_path``.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from evomerge.errors import ConfigError, EvaluationError
from evomerge.evaluators.results import QuestionRecord, TaskResult
from evomerge.evaluators.tasks import Split, TaskConfig

__all__ = ["run_lmeval"]

_NOT_INSTALLED = "lm-eval is not installed (pip install 'evomerge[lmeval]')"


@contextlib.contextmanager
def _working_directory(path: Path | None) -> Iterator[None]:
    """lm-eval resolves relative data_files against the working directory: run inside the task folder."""
    if path is None:
        yield
        return
    before = Path.cwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(before)


def _metric(results: dict[str, Any], wanted: str | None, task: str) -> tuple[str, float]:
    values = {
        key.split(",")[0]: value
        for key, value in results.items()
        if "," in key and "_stderr" not in key and isinstance(value, int | float)
    }
    if not values:
        raise EvaluationError(f"lm-eval task {task!r} reported no metric")
    name = wanted or next(iter(values))
    if name not in values:
        raise ConfigError(f"lm-eval task {task!r} has no metric {name!r} (it reports {', '.join(values)})")
    return name, float(values[name])


def run_lmeval(backend: Any, task: TaskConfig, split: Split, base_dir: str | Path) -> TaskResult:
    """Score ``task`` (``kind: lmeval``) on ``split`` with the backend's live model.

    ``dev_size`` / ``test_size`` become lm-eval's ``limit``. ConfigError (one line) when lm-eval is not
    installed, the backend has no transformers model (lm-eval needs the ``hf`` backend), the task or the
    metric is unknown, or the split has no task.
    """
    spec = task.lmeval
    assert spec is not None
    name = spec.dev if split == "dev" else spec.test
    if name is None:
        raise ConfigError(f"task {task.name!r}: no lm-eval task for split {split!r} (set lmeval.test)")
    model, tokenizer = getattr(backend, "model", None), getattr(backend, "tokenizer", None)
    if model is None or tokenizer is None:
        raise ConfigError(f"task {task.name!r}: lm-eval tasks need the hf backend")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise ConfigError(f"task {task.name!r}: {_NOT_INSTALLED}") from None

    include = None
    if spec.include_path is not None:
        include = Path(spec.include_path).expanduser()
        include = include if include.is_absolute() else Path(base_dir) / include
        if not include.is_dir():
            raise ConfigError(f"task {task.name!r}: lmeval.include_path is not a folder: {include}")
    t0 = time.perf_counter()
    manager = TaskManager(include_path=str(include) if include else None, include_defaults=include is None)
    if name not in manager.all_tasks:
        raise ConfigError(f"task {task.name!r}: lm-eval has no task {name!r} under {include}")
    device = str(getattr(backend, "device", "cpu"))
    lm = HFLM(
        pretrained=model, tokenizer=tokenizer, batch_size=getattr(backend, "batch_size", 8), device=device
    )
    with _working_directory(include):
        out = lm_eval.simple_evaluate(
            model=lm,
            tasks=[name],
            task_manager=manager,
            limit=task.size(split),
            bootstrap_iters=0,
            log_samples=True,
            random_seed=task.seed,
            numpy_random_seed=task.seed,
            torch_random_seed=task.seed,
            fewshot_random_seed=task.seed,
            verbosity="ERROR",
        )
    if out is None:
        raise EvaluationError(f"lm-eval returned no results for task {name!r}")
    metric, value = _metric(out["results"][name], spec.metric, name)
    records = [
        QuestionRecord(
            id=str(sample["doc_id"]),
            prompt=str(sample["arguments"][0][0]) if sample.get("arguments") else "",
            completion=str(sample.get("filtered_resps", ""))[:500],
            reference=str(sample.get("target", "")),
            extracted=None,
            score=float(sample.get(metric, 0.0)),
        )
        for sample in out.get("samples", {}).get(name, [])
    ]
    return TaskResult(
        task=task.name,
        split=split,
        score=value,
        n=len(records),
        records=records,
        seconds=time.perf_counter() - t0,
    )
