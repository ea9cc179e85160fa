"""What one sandboxed run may use: :class:`SandboxLimits` (CPU, wall clock, memory, output, file size, open
files, processes, disk) and :data:`DEFAULT_LIMITS`."""

from __future__ import annotations

from dataclasses import dataclass

from evomerge.errors import ConfigError


@dataclass(frozen=True)
class SandboxLimits:
    """Limits of one sandboxed run.

    ``max_processes`` sets ``RLIMIT_NPROC`` in the program's process when not None; Linux counts every
    process and thread of the (namespaced) user and does not enforce it for root, so it is off by default:
    the seccomp filter already forbids new processes. ``disk_mb`` is the size of the private tmpfs that
    is the working directory (bubblewrap only; without it the working directory is on the host's disk).
    """

    cpu_seconds: int = 5
    wall_seconds: float = 10.0
    memory_mb: int = 512
    max_output_bytes: int = 64 * 1024
    file_size_mb: int = 10
    max_open_files: int = 64
    max_processes: int | None = None
    disk_mb: int = 64

    def __post_init__(self) -> None:
        for name in (
            "cpu_seconds",
            "wall_seconds",
            "memory_mb",
            "max_output_bytes",
            "file_size_mb",
            "disk_mb",
        ):
            if not getattr(self, name) > 0:
                raise ConfigError(f"SandboxLimits.{name} must be positive, got {getattr(self, name)!r}")
        if self.max_open_files < 16:
            raise ConfigError(f"SandboxLimits.max_open_files must be at least 16, got {self.max_open_files}")
        if self.max_processes is not None and self.max_processes < 1:
            raise ConfigError(f"SandboxLimits.max_processes must be positive, got {self.max_processes}")


DEFAULT_LIMITS = SandboxLimits()
