"""Scoring candidates in this process: :class:`LocalEvaluator` keeps the base and the task vectors resident
(an :class:`~evomerge.merging.InMemoryMerger`) and one live model (the ``hf`` or ``vllm`` backend) whose
weights are replaced in place, so a recipe is merged and scored without disk I/O.

Each executor's :class:`~evomerge.optimizer.executors.TrialWorker` holds one; the final report and
``evomerge export``/``report`` score the baselines and the pick with one.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from typing import Any

import torch

from evomerge.checkpoints import ModelDir
from evomerge.evaluators import EvalResult, HFBackend, QuestionRecord, TaskConfig, evaluate
from evomerge.evaluators.tasks import Split
from evomerge.merging import DTYPES, InMemoryMerger, MergeRecipe
from evomerge.optimizer.sweep import ResolvedSweep

__all__ = ["EvalProgress", "LocalEvaluator"]

EvalProgress = Callable[[int, int], None]


class LocalEvaluator:
    """Holds the base + task vectors resident and one live model; scores recipes without disk I/O."""

    def __init__(self, sweep: ResolvedSweep) -> None:
        cfg = sweep.config.backend
        if cfg.threads is not None:
            torch.set_num_threads(cfg.threads)
        self.sweep = sweep
        self.merger = InMemoryMerger(
            sweep.base,
            sweep.experts,
            device=cfg.merge_device or cfg.device,
            dtype=DTYPES[cfg.resident_dtype],
        )
        self.backend: Any
        if cfg.kind == "vllm":
            from evomerge.evaluators.vllm_backend import VLLMBackend

            kv_bytes = None if cfg.kv_cache_gb is None else int(cfg.kv_cache_gb * 2**30)
            self.backend = VLLMBackend.from_pretrained(
                sweep.base,
                device=cfg.device,
                dtype=DTYPES[cfg.dtype],
                batch_size=cfg.batch_size,
                kv_cache_memory_bytes=kv_bytes,
            )
        else:
            self.backend = HFBackend.from_pretrained(
                sweep.base, device=cfg.device, dtype=DTYPES[cfg.dtype], batch_size=cfg.batch_size
            )
        self.base_state = self.backend.state_dict()

    def for_sweep(self, sweep: ResolvedSweep) -> LocalEvaluator:
        """This evaluator (the same merger, live model and base weights) scoring ``sweep``'s tasks: an
        evaluator made for one sweep serves another on the same models (e.g. with another val split)."""
        if sweep.tasks == self.sweep.tasks and sweep.data_dir == self.sweep.data_dir:
            return self
        other = copy.copy(self)
        other.sweep = sweep
        return other

    def score_state(
        self,
        state: Mapping[str, torch.Tensor],
        split: Split,
        progress: EvalProgress | None = None,
        *,
        questions: int | None = None,
        memo: dict[tuple[str, str, str], QuestionRecord] | None = None,
        loaded: bool = False,
        tasks: Sequence[TaskConfig] | None = None,
        ids: Mapping[str, Collection[str]] | None = None,
    ) -> EvalResult:
        """Load ``state`` into the live model (unless ``loaded``) and score it; ``questions`` keeps each
        task's first questions of its fixed nested order (a multi-fidelity rung); ``memo`` carries the
        questions already scored on this state (see :func:`evaluate`); ``tasks``: some of the sweep's
        tasks (default: all); ``ids``: only these questions of the tasks it names (anchors)."""
        if not loaded:
            self.backend.load_state_dict(state)
        return evaluate(
            self.backend,  # type: ignore[arg-type]
            self.sweep.tasks if tasks is None else tasks,
            split,
            self.sweep.data_dir,
            progress=progress,
            limit=questions,
            memo=memo,
            ids=ids,
        )

    def score_recipe(
        self,
        recipe: MergeRecipe,
        split: Split,
        progress: EvalProgress | None = None,
        *,
        tasks: Sequence[TaskConfig] | None = None,
    ) -> tuple[EvalResult, float, float]:
        """(result, merge seconds, eval seconds)."""
        t0 = time.perf_counter()
        state = self.merger.merge(recipe)
        t1 = time.perf_counter()
        result = self.score_state(state, split, progress, tasks=tasks)
        return result, t1 - t0, time.perf_counter() - t1

    def score_model_dir(
        self,
        path: str,
        split: Split,
        progress: EvalProgress | None = None,
        *,
        tasks: Sequence[TaskConfig] | None = None,
    ) -> EvalResult:
        with ModelDir(path) as md:
            state = {n: md.read(n).clone() for n in md.tensor_names()}
        return self.score_state(state, split, progress, tasks=tasks)
