"""The small local expert zoo used by the demo and the tests."""

from evomerge.zoo.build import (
    ALL_PRESETS,
    PRESETS,
    Zoo,
    ZooConfig,
    build_zoo,
    default_cache_dir,
    find_zoo,
    resolve_config,
)
from evomerge.zoo.smollm2 import SmolLM2Config
from evomerge.zoo.tasks import TASK_FAMILIES

__all__ = [
    "ALL_PRESETS",
    "PRESETS",
    "TASK_FAMILIES",
    "SmolLM2Config",
    "Zoo",
    "ZooConfig",
    "build_zoo",
    "default_cache_dir",
    "find_zoo",
    "resolve_config",
]
