"""breadcrumbs (Model Breadcrumbs): drop the largest outliers and the smallest entries, then sum.

Per task vector, the ``int(gamma_i * numel)`` largest magnitudes and enough of the smallest are dropped so
that ``int(density_i * numel)`` entries remain (the outlier cut shrinks when both do not fit); two
``kthvalue`` selections, no sort. Result ``b + lambda * sum_i w_i d_i'`` (divided by ``sum_i w_i`` when
``normalize``; L1 rescale when ``rescale``).

Parameters: per model ``weight`` (1), ``density`` (1), ``gamma`` (0.01); global ``lambda`` (1),
``normalize`` (false), ``rescale`` (false), ``int8_mask`` (no effect).
"""

from __future__ import annotations

from evomerge.merging.methods.common import task_vector_kernel

MODEL_PARAMS: dict[str, float] = {"weight": 1.0, "density": 1.0, "gamma": 0.01}
GLOBAL_PARAMS: dict[str, float] = {"lambda": 1.0, "normalize": 0.0, "rescale": 0.0, "int8_mask": 0.0}

merge = task_vector_kernel("outliers", consensus=False)
