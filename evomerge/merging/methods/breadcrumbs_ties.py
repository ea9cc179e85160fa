"""breadcrumbs_ties: Model Breadcrumbs' outlier-and-small drop, then TIES sign election.

Sparsify as ``breadcrumbs``, then elect signs and merge disjointly as ``ties``.

Parameters: per model ``weight`` (1), ``density`` (1), ``gamma`` (0.01); global ``lambda`` (1),
``normalize`` (false), ``rescale`` (false), ``int8_mask`` (no effect).
"""

from __future__ import annotations

from evomerge.merging.methods.common import task_vector_kernel

MODEL_PARAMS: dict[str, float] = {"weight": 1.0, "density": 1.0, "gamma": 0.01}
GLOBAL_PARAMS: dict[str, float] = {"lambda": 1.0, "normalize": 0.0, "rescale": 0.0, "int8_mask": 0.0}

merge = task_vector_kernel("outliers", consensus=True)
