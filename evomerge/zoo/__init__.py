"""The small local expert zoo used by the demo and the tests."""

from evomerge.zoo.build import PRESETS, Zoo, ZooConfig, build_zoo, default_cache_dir, find_zoo, resolve_config
from evomerge.zoo.tasks import TASK_FAMILIES

__all__ = [
    "PRESETS",
    "TASK_FAMILIES",
    "Zoo",
    "ZooConfig",
    "build_zoo",
    "default_cache_dir",
    "find_zoo",
    "resolve_config",
]
