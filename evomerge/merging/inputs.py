"""What a merge kernel receives for one tensor, and the kernel signature every method implements."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

__all__ = ["Kernel", "MergeInputs", "divisor_or_one", "tensor_seed"]


@dataclass(frozen=True)
class MergeInputs:
    """The float32 tensors of one parameter across the models being merged.

    Holds either ``base`` plus task vectors ``deltas`` (``d_i = x_i - b``; the canonical form whenever a
    base model is present, so that every executor feeds kernels identical inputs), or ``experts`` alone (no
    base: only for methods that do not need one). The other form is derived on demand.

    Kernels must treat every tensor here as read-only: the in-memory executor passes its resident tensors.
    """

    base: torch.Tensor | None
    deltas: tuple[torch.Tensor, ...] | None = None
    experts: tuple[torch.Tensor, ...] | None = None

    def __post_init__(self) -> None:
        if (self.deltas is None) == (self.experts is None):
            raise ValueError("MergeInputs needs exactly one of deltas or experts")
        if self.deltas is not None and self.base is None:
            raise ValueError("MergeInputs with deltas needs a base tensor")
        if self.count == 0:
            raise ValueError("MergeInputs needs at least one model")

    @classmethod
    def from_tensors(cls, base: torch.Tensor | None, experts: Sequence[torch.Tensor]) -> MergeInputs:
        """Canonical inputs from raw tensors: with a base, task vectors are computed (in float32)."""
        if base is None:
            return cls(base=None, experts=tuple(x.float() for x in experts))
        b = base.float()
        return cls(base=b, deltas=tuple(torch.sub(x, b) for x in experts))  # one pass, promoted to float32

    @property
    def count(self) -> int:
        """Number of expert models."""
        seq = self.deltas if self.deltas is not None else self.experts
        return len(seq) if seq is not None else 0

    @property
    def reference(self) -> torch.Tensor:
        """Any input tensor (for shape, device and dtype)."""
        if self.base is not None:
            return self.base
        assert self.experts is not None
        return self.experts[0]

    def delta(self, i: int) -> torch.Tensor:
        """Task vector ``d_i = x_i - b`` (resident when given, else computed)."""
        if self.deltas is not None:
            return self.deltas[i]
        if self.base is None:
            raise ValueError("task vectors need a base tensor")
        assert self.experts is not None
        return self.experts[i] - self.base

    def expert(self, i: int) -> torch.Tensor:
        """Expert tensor ``x_i`` (resident when given, else ``b + d_i``)."""
        if self.experts is not None:
            return self.experts[i]
        assert self.base is not None and self.deltas is not None
        return self.base + self.deltas[i]

    def in_compute_dtype(self, dtype: torch.dtype) -> MergeInputs:
        """These inputs as mergekit computes them in ``dtype`` (its ``dtype:`` key): every model's tensor
        rounded to ``dtype`` and task vectors taken between the rounded tensors, in ``dtype``; handed back in
        float32 for the kernels, which accumulate in float32. Unchanged for float32."""
        if dtype == torch.float32:
            return self
        if self.base is None:
            assert self.experts is not None
            return MergeInputs(base=None, experts=tuple(x.to(dtype).float() for x in self.experts))
        b = self.base.to(dtype)
        deltas = tuple(((self.base + d).to(dtype) - b).float() for d in self.deltas or ())
        return MergeInputs(base=b.float(), deltas=deltas)

    def require_base(self) -> torch.Tensor:
        if self.base is None:
            raise ValueError("this merge method needs a base tensor")
        return self.base


class Kernel(Protocol):
    """A merge method: a pure function of tensors and scalars.

    ``params[i]`` holds model ``i``'s parameters and ``global_params`` the method-wide ones, all resolved
    to plain floats for this tensor with defaults filled in (booleans are 1.0/0.0). ``seed`` is already
    specific to the tensor (see :func:`tensor_seed`); random methods build their own generator from it.
    The result is a new float32 tensor with the inputs' shape, on their device.
    """

    def __call__(
        self,
        inputs: MergeInputs,
        params: Sequence[Mapping[str, float]],
        global_params: Mapping[str, float],
        seed: int,
    ) -> torch.Tensor: ...


def tensor_seed(seed: int, tensor_name: str) -> int:
    """A per-tensor seed that depends only on the recipe seed and the tensor name (not on order/device)."""
    digest = hashlib.sha256(f"{seed}:{tensor_name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def divisor_or_one(value: torch.Tensor) -> torch.Tensor:
    """``value`` with exact zeros replaced by 1 (the usual guard for normalising divisors)."""
    return torch.add(value, value == 0)  # adds 1 exactly where value is 0
