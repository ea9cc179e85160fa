"""della_linear: DELLA's MagPrune drop and rescale, then a weighted sum (no sign election).

Drop as ``della``, then ``b + lambda * sum_i w_i d_i'`` (divided by ``sum_i w_i`` when ``normalize``).

Parameters: per model ``weight`` (1), ``density`` (1), ``epsilon`` (0.15); global ``lambda`` (1),
``normalize`` (false), ``rescale`` (true), ``int8_mask`` (no effect).
"""

from __future__ import annotations

from evomerge.merging.methods.common import task_vector_kernel

MODEL_PARAMS: dict[str, float] = {"weight": 1.0, "density": 1.0, "epsilon": 0.15}
GLOBAL_PARAMS: dict[str, float] = {"lambda": 1.0, "normalize": 0.0, "rescale": 1.0, "int8_mask": 0.0}

merge = task_vector_kernel("della", consensus=False)
