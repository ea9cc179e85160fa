"""evomerge: search merge recipes for large language models."""

from evomerge.errors import EvomergeError, UserError

__version__ = "0.1.0"

__all__ = ["EvomergeError", "UserError", "__version__"]
