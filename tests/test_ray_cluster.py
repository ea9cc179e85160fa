"""A sweep on a multi-node Ray cluster (``ray.cluster_utils.Cluster``: a head and three worker nodes on
this machine): the workers spread over nodes, a node is removed mid-sweep, and the sweep completes with
exactly its budget on the nodes that remain."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import optuna
import pytest
from optuna.trial import TrialState

from evomerge.optimizer import SamplerConfig, SweepConfig, resolve_sweep, run_search
from evomerge.optimizer.config import ExecutorConfig
from evomerge.optimizer.study import open_study
from evomerge.search_spaces import ParamRange, SearchSpaceConfig
from evomerge.zoo import Zoo

SPACE = SearchSpaceConfig(
    method="task_arithmetic", params=(ParamRange(name="weight", low=0.0, high=1.2),), granularity="layer"
)


def test_a_node_removed_mid_sweep(micro_zoo: Zoo, zoo_cache: Path, tmp_path: Path) -> None:
    ray = pytest.importorskip("ray")
    from ray.cluster_utils import Cluster

    from evomerge.optimizer.executors import RayExecutor

    if ray.is_initialized():
        ray.shutdown()
    store = 80 * 2**20
    # the head runs no worker (0 CPUs); each worker node has room for one sweep worker
    cluster = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 0, "object_store_memory": store, "include_dashboard": False},
    )
    nodes = [cluster.add_node(num_cpus=1, object_store_memory=store) for _ in range(3)]
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False)
    budget = 20
    cfg = SweepConfig(
        study_name="nodes",
        runs_dir=str(tmp_path),
        zoo="micro",
        search_space=SPACE,
        sampler=SamplerConfig(name="random", seed=6),
        n_trials=budget,
        executor=ExecutorConfig(kind="ray", workers=2, retries=1),
    )
    sweep = resolve_sweep(cfg, zoo_cache=zoo_cache)
    study = open_study(sweep.config, [t.name for t in sweep.tasks])
    pool = RayExecutor(sweep, num_workers=2)
    removed: list[str] = []
    stop = threading.Event()

    def remove_a_busy_node() -> None:
        """Once 5 trials are complete, remove the node worker 0 runs on."""
        watched = optuna.load_study(study_name="nodes", storage=sweep.config.storage_url())
        while not stop.is_set() and not removed:
            if len(watched.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))) >= 5:
                node_id = ray.get(pool._actors[0].node.remote())
                (node,) = [n for n in nodes if n.node_id == node_id]
                cluster.remove_node(node)
                removed.append(node_id)
                return
            time.sleep(0.05)

    try:
        first: list[Any] = ray.get([a.node.remote() for a in pool._actors])
        assert len(set(first)) == 2  # one worker per node
        watcher = threading.Thread(target=remove_a_busy_node)
        watcher.start()
        try:
            study = run_search(sweep, pool)
        finally:
            stop.set()
            watcher.join()
        assert len(removed) == 1
        trials = study.get_trials(deepcopy=False)
        assert len([t for t in trials if t.state == TrialState.COMPLETE]) == budget  # exactly the budget
        assert not [t for t in trials if t.state == TrialState.RUNNING]
        now: list[Any] = ray.get([a.node.remote() for a in pool._actors])
        assert removed[0] not in now and len(set(now)) == 2  # the lost worker was replaced on another node
        restarted = [t for t in trials if t.user_attrs.get("worker_restarts")]
        assert all(t.state == TrialState.COMPLETE for t in restarted)
    finally:
        pool.close()
        ray.shutdown()
        cluster.shutdown()
