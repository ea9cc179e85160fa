"""dare_linear (DARE + task arithmetic): random drop and rescale, then a weighted sum.

Each entry of ``d_i`` is kept with probability ``density_i`` (a mask drawn from a generator seeded by the
recipe seed, the tensor name and the model's position: same recipe, same bytes). With ``rescale`` (default
true) the survivors are scaled so the masked vector keeps ``d_i``'s L1 norm (mergekit's rule; the paper's
``1 / density`` has the same expectation). Result ``b + lambda * sum_i w_i d_i'``, divided by ``sum_i w_i``
when ``normalize``.

Parameters: per model ``weight`` (1) and ``density`` (1); global ``lambda`` (1), ``normalize`` (false),
``rescale`` (true), ``int8_mask`` (no effect).
"""

from __future__ import annotations

from evomerge.merging.methods.common import task_vector_kernel

MODEL_PARAMS: dict[str, float] = {"weight": 1.0, "density": 1.0}
GLOBAL_PARAMS: dict[str, float] = {"lambda": 1.0, "normalize": 0.0, "rescale": 1.0, "int8_mask": 0.0}

merge = task_vector_kernel("random", consensus=False)
