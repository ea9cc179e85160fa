"""della (DELLA-merging): magnitude-ranked random drop (MagPrune), rescale, elect sign, merge.

Within each row of ``d_i``, entries ranked by magnitude get keep probabilities spread linearly over
``[density_i - epsilon_i, density_i + epsilon_i]`` (larger magnitude, higher probability); the mask is drawn
from a generator seeded per tensor and model. With ``rescale`` (default true) survivors keep ``d_i``'s L1
norm (mergekit's rule; the paper rescales each survivor by ``1/p``, equal in expectation). Then TIES' sign
election and disjoint merge, divided by ``sum_i w_i m_i`` when ``normalize`` (default true).
``density - epsilon`` must be > 0 and ``density + epsilon`` < 1.

Parameters: per model ``weight`` (1), ``density`` (1), ``epsilon`` (0.15); global ``lambda`` (1),
``normalize`` (true), ``rescale`` (true), ``int8_mask`` (no effect).
"""

from __future__ import annotations

from evomerge.merging.methods.common import task_vector_kernel

MODEL_PARAMS: dict[str, float] = {"weight": 1.0, "density": 1.0, "epsilon": 0.15}
GLOBAL_PARAMS: dict[str, float] = {"lambda": 1.0, "normalize": 1.0, "rescale": 1.0, "int8_mask": 0.0}

merge = task_vector_kernel("della", consensus=True)
