"""dare_ties (DARE + TIES sign election): random drop and rescale, elect sign, disjoint merge.

Drop as in ``dare_linear`` (seeded per tensor and model, L1 rescale when ``rescale``), then TIES' sign
election and disjoint merge: ``b + lambda * sum_i w_i m_i d_i'`` (divided by ``sum_i w_i m_i`` when
``normalize``).

Parameters: per model ``weight`` (1) and ``density`` (1); global ``lambda`` (1), ``normalize`` (false),
``rescale`` (true), ``int8_mask`` (no effect).
"""

from __future__ import annotations

from evomerge.merging.methods.common import task_vector_kernel

MODEL_PARAMS: dict[str, float] = {"weight": 1.0, "density": 1.0}
GLOBAL_PARAMS: dict[str, float] = {"lambda": 1.0, "normalize": 0.0, "rescale": 1.0, "int8_mask": 0.0}

merge = task_vector_kernel("random", consensus=True)
