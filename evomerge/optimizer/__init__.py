"""Searchers, the search loop, the study store, export and reports."""

from evomerge.optimizer.config import (
    BackendConfig,
    ModelsConfig,
    SamplerConfig,
    SweepConfig,
    load_sweep_config,
)
from evomerge.optimizer.export import export_trial, load_run, load_study, pick_trial, trial_recipe
from evomerge.optimizer.loop import LocalEvaluator, ResolvedSweep, TrialOutcome, resolve_sweep, run_search
from evomerge.optimizer.report import FinalReport, Row, final_report, uniform_task_arithmetic
from evomerge.optimizer.study import best_trial, complete_trials, make_sampler, open_study, pareto_front

__all__ = [
    "BackendConfig",
    "FinalReport",
    "LocalEvaluator",
    "ModelsConfig",
    "ResolvedSweep",
    "Row",
    "SamplerConfig",
    "SweepConfig",
    "TrialOutcome",
    "best_trial",
    "complete_trials",
    "export_trial",
    "final_report",
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
]
