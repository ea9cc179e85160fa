"""Search throughput: trials per minute with the local executor and with 1 and 2 Ray workers, same budget;
and the workers' idle fraction while trials remain.

Usage (numbers in docs/benchmarks.md):

    .venv/bin/python benchmarks/search_throughput.py --preset tiny --trials 40

Each configuration runs the demo's search space (per-layer task-arithmetic weights) with random search
(so the sampler costs the same everywhere) for ``--trials`` complete trials in a fresh study. Ray runs
on this machine (``ray.init(num_cpus=...)``), each worker an actor with one CPU and one torch thread.
The local executor runs in this process with ``--local-threads`` torch threads. Idle fraction: on each
worker, the gaps between the end of one step and the start of the next (the time the driver takes to
tell the result, ask a new candidate and send it) over the span from its first step to its last.
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

# the demo's search space, as in search_efficiency.py (this folder is on sys.path when run as a script)
from search_efficiency import SPACE

from evomerge.optimizer import SamplerConfig, SweepConfig, resolve_sweep, run_search
from evomerge.optimizer.config import BackendConfig, ExecutorConfig
from evomerge.optimizer.executors import LocalExecutor, RayExecutor
from evomerge.zoo import build_zoo, resolve_config


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--cache-dir", type=Path, default=None)
    ap.add_argument("--trials", type=int, default=40)
    ap.add_argument("--local-threads", type=int, default=os.cpu_count() or 1)
    args = ap.parse_args()
    build_zoo(resolve_config(args.preset), args.cache_dir)
    runs = Path(tempfile.mkdtemp(prefix="evomerge-throughput-"))
    atexit.register(shutil.rmtree, runs, ignore_errors=True)  # models and studies: GBs

    def sweep(name: str, executor: ExecutorConfig, threads: int | None) -> Any:
        cfg = SweepConfig(
            study_name=name,
            runs_dir=str(runs),
            zoo=args.preset,
            search_space=SPACE,
            sampler=SamplerConfig(name="random", seed=0),
            n_trials=args.trials,
            executor=executor,
            backend=BackendConfig(batch_size=128, threads=threads),
        )
        return resolve_sweep(cfg, zoo_cache=args.cache_dir)

    rows: list[tuple[str, dict[str, Any], float]] = []
    torch.set_num_threads(args.local_threads)
    s = sweep("local", ExecutorConfig(), args.local_threads)
    t0 = time.perf_counter()
    pool: Any = LocalExecutor(s)
    start_s = time.perf_counter() - t0
    run_search(s, pool)
    rows.append((f"local ({args.local_threads} torch threads)", _stats(s), start_s))

    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, object_store_memory=128 * 2**20)
    try:
        for workers in (1, 2):
            s = sweep(f"ray{workers}", ExecutorConfig(kind="ray", workers=workers), None)
            t0 = time.perf_counter()
            pool = RayExecutor(s, num_workers=workers)
            start_s = time.perf_counter() - t0
            try:
                run_search(s, pool)
            finally:
                pool.close()
            rows.append(
                (
                    f"ray, {workers} worker{'s' if workers > 1 else ''} (1 CPU, 1 thread each)",
                    _stats(s),
                    start_s,
                )
            )
    finally:
        ray.shutdown()

    base = rows[0][1]["trials_per_minute"]
    print(f"zoo {args.preset}, {args.trials} trials, random search, {os.cpu_count()} CPU cores")
    print("| executor | trials / min | vs local | worker idle fraction | start-up s |")
    print("|---|---|---|---|---|")
    for label, st, start_s in rows:
        print(
            f"| {label} | {st['trials_per_minute']:.1f} | {st['trials_per_minute'] / base:.2f}x | "
            f"{100 * st['idle_fraction']:.2f}% | {start_s:.1f} |"
        )


def _stats(sweep: Any) -> dict[str, Any]:
    path = sweep.config.run_dir() / "search_stats.json"
    stats: dict[str, Any] = json.loads(path.read_text())[-1]
    return stats


if __name__ == "__main__":
    main()
