"""Genome <-> recipe mappings: granularity, bounds, Optuna distributions."""

from evomerge.search_spaces.space import ParamRange, SearchSpace, SearchSpaceConfig, expert_aliases

__all__ = ["ParamRange", "SearchSpace", "SearchSpaceConfig", "expert_aliases"]
