"""The zoo's training, run in a child process whose torch gives the same bits on every x86-64 CPU.

Floating-point kernels are chosen per CPU: ATen vectorizes for the widest instruction set it finds
(AVX2, AVX-512) and MKL's GEMM picks a code path per CPU, and each sums in another order. Training a
few thousand steps amplifies those last-bit differences into other weights and other scores: the same
config built on two machines gave experts whose scores differed by several points (and a gate missed on
one of them). Both libraries can be pinned, but only before torch is imported, so the build trains in
a child started with :data:`evomerge.zoo.build.DETERMINISTIC_ENV`:

* ``ATEN_CPU_CAPABILITY=avx2``: ATen's AVX2 kernels, also on CPUs with AVX-512 (every x86-64 server
  CPU since 2013 has AVX2; on one without it ATen falls back to plain kernels and the bits differ);
* ``MKL_CBWR=COMPATIBLE``: MKL's conditional bitwise reproducibility, one code path on every CPU;
* one thread (``OMP_NUM_THREADS``, ``MKL_NUM_THREADS``), and oneDNN off in the child.

Training is then about 1.5x slower than with the native kernels. Checked on the micro zoo: builds whose
MKL was told to use AVX-512, AVX2 only or SSE4.2 only (``MKL_ENABLE_INSTRUCTIONS``, as on newer and
older CPUs) give bit-identical weights, which the native kernels do not (tests/test_zoo.py). Not
checked: AMD CPUs and other operating systems.

Usage (by :func:`evomerge.zoo.build.train_isolated`): ``python -m evomerge.zoo.train_worker CONFIG_JSON
OUT_DIR base`` (data, tokenizer, base) or ``... expert FAMILY`` (one expert, from the saved base; the
experts train in parallel children); progress goes to stdout as ``progress<TAB>done<TAB>total<TAB>label``
lines.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def main(argv: list[str]) -> int:
    """``CONFIG_JSON OUT_DIR base`` or ``CONFIG_JSON OUT_DIR expert FAMILY``."""
    import torch

    from evomerge.zoo.build import build_base, build_expert
    from evomerge.zoo.configs import ZooConfig

    config = ZooConfig.model_validate(json.loads(argv[0]))
    out = Path(argv[1])
    torch.set_num_threads(config.threads)
    torch.backends.mkldnn.enabled = False  # type: ignore[assignment]

    def progress(label: str, done: int, total: int) -> None:
        print(f"progress\t{done}\t{total}\t{label}", flush=True)

    if argv[2] == "base":
        build_base(config, out, progress)
    else:
        build_expert(config, out, argv[3], progress)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
