"""Searchers, the search loop, the study store, export and reports."""

from evomerge.optimizer.config import (
    BackendConfig,
    ModelsConfig,
    PickConfig,
    SamplerConfig,
    SweepConfig,
    load_sweep_config,
)
from evomerge.optimizer.evaluator import LocalEvaluator
from evomerge.optimizer.export import (
    export_trial,
    load_run,
    load_study,
    pick_trial,
    trial_recipe,
    uniform_task_arithmetic,
)
from evomerge.optimizer.loop import TrialOutcome, run_search
from evomerge.optimizer.pick import PickResult, honest_pick
from evomerge.optimizer.report import FinalReport, Row, final_report, verdict_line
from evomerge.optimizer.study import (
    best_trial,
    complete_trials,
    dev_best_trial,
    make_sampler,
    open_study,
    pareto_front,
)
from evomerge.optimizer.sweep import ResolvedSweep, resolve_sweep

__all__ = [
    "BackendConfig",
    "FinalReport",
    "LocalEvaluator",
    "ModelsConfig",
    "PickConfig",
    "PickResult",
    "ResolvedSweep",
    "Row",
    "SamplerConfig",
    "SweepConfig",
    "TrialOutcome",
    "best_trial",
    "complete_trials",
    "dev_best_trial",
    "export_trial",
    "final_report",
    "honest_pick",
    "load_run",
    "load_study",
    "load_sweep_config",
    "make_sampler",
    "open_study",
    "pareto_front",
    "pick_trial",
    "resolve_sweep",
    "run_search",
    "trial_recipe",
    "uniform_task_arithmetic",
    "verdict_line",
]
