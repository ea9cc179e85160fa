"""ties (TIES-merging): trim, elect sign, disjoint merge.

1. Trim: each task vector ``d_i`` keeps its ``int(density_i * numel)`` largest-magnitude entries (at least
   one; a ``kthvalue`` threshold, no sort; entries tied with the threshold are kept) -> ``d_i'``; with
   ``rescale`` the kept entries are scaled back to ``d_i``'s L1 norm.
2. Elect: per entry, the sign of ``sum_i w_i d_i'``; a zero sum counts as +.
3. Disjoint merge: ``m_i`` is 1 where ``w_i d_i'`` is non-zero and has the elected sign, else 0; result
   ``b + lambda * sum_i w_i m_i d_i' / sum_i w_i m_i`` (a zero divisor becomes 1) when ``normalize``, else
   ``b + lambda * sum_i w_i m_i d_i'``.

Parameters: per model ``weight`` (default 1) and ``density`` (default 1); global ``lambda`` (1),
``normalize`` (true), ``rescale`` (false) and ``int8_mask`` (accepted for mergekit recipes; no effect).
"""

from __future__ import annotations

from evomerge.merging.methods.common import task_vector_kernel

MODEL_PARAMS: dict[str, float] = {"weight": 1.0, "density": 1.0}
GLOBAL_PARAMS: dict[str, float] = {"lambda": 1.0, "normalize": 1.0, "rescale": 0.0, "int8_mask": 0.0}

merge = task_vector_kernel("magnitude", consensus=True)
