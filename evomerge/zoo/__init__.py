"""The small local expert zoo used by the demo and the tests."""

from evomerge.zoo.build import build_zoo
from evomerge.zoo.common import Zoo, default_cache_dir, find_zoo
from evomerge.zoo.configs import ALL_PRESETS, PRESETS, SmolLM2Config, ZooConfig, resolve_config
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
