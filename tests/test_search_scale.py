"""Search at scale: Ray workers (a real local Ray with 2 CPUs), a worker killed mid-trial, SIGKILLed sweeps
that resume, the held-out guard, and the asynchronous loop's statistics."""

from __future__ import annotations

import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import optuna
import pytest
import yaml
from optuna.trial import TrialState

from evomerge.errors import ConfigError
from evomerge.optimizer import ResolvedSweep, SamplerConfig, SweepConfig, resolve_sweep, run_search
from evomerge.optimizer.config import ExecutorConfig
from evomerge.optimizer.study import candidate_params, open_study
from evomerge.optimizer.sweep import check_held_out
from evomerge.search_spaces import ParamRange, SearchSpaceConfig
from evomerge.zoo import Zoo

SPACE = SearchSpaceConfig(
    method="task_arithmetic", params=(ParamRange(name="weight", low=0.0, high=1.2),), granularity="global"
)


def sweep_of(runs: Path, zoo_cache: Path, study: str, **fields: Any) -> ResolvedSweep:
    cfg = SweepConfig(study_name=study, runs_dir=str(runs), zoo="micro", search_space=SPACE, **fields)
    return resolve_sweep(cfg, zoo_cache=zoo_cache)


def trials_in(study: optuna.Study, *states: TrialState) -> list[optuna.trial.FrozenTrial]:
    return study.get_trials(deepcopy=False, states=states)


# ------------------------------------------------------------------------------------------ Ray
@pytest.fixture(scope="module")
def ray_local() -> Iterator[Any]:
    ray = pytest.importorskip("ray")
    ray.init(
        num_cpus=2,
        include_dashboard=False,
        log_to_driver=False,
        object_store_memory=128 * 2**20,
        _temp_dir=None,
    )
    yield ray
    ray.shutdown()


def test_ray_workers_run_a_sweep_asynchronously(
    ray_local: Any, micro_zoo: Zoo, zoo_cache: Path, tmp_path: Path
) -> None:
    from evomerge.optimizer.executors import RayExecutor

    sweep = sweep_of(
        tmp_path,
        zoo_cache,
        "ray2",
        sampler=SamplerConfig(name="tpe", seed=0),
        n_trials=8,
        executor=ExecutorConfig(kind="ray", workers=2),
    )
    pool = RayExecutor(sweep, num_workers=2)
    try:
        assert len(set(pool._pids)) == 2 and os.getpid() not in pool._pids  # two separate actor processes
        study = run_search(sweep, pool)
    finally:
        pool.close()
    assert ray_local.is_initialized()  # the executor did not shut down a Ray it did not start
    complete = trials_in(study, TrialState.COMPLETE)
    assert len(complete) == 8 and len(study.trials) == 8
    assert {t.user_attrs["worker_pid"] for t in complete} == set(pool._pids)  # both workers got trials
    for t in complete:  # the scores a worker reported are a real evaluation: every task, in [0, 1]
        assert set(t.user_attrs["scores"]) == {"arith", "code", "logic"}
        assert t.value == pytest.approx(t.user_attrs["mean"])
    params = [tuple(sorted(t.params.items())) for t in complete]
    assert len(set(params)) == len(params)
    stats = json.loads((sweep.config.run_dir() / "search_stats.json").read_text())[-1]
    assert stats["workers"] == 2 and stats["complete"] == 8
    assert 0.0 <= stats["idle_fraction"] < 1.0 and stats["trials_per_minute"] > 0


def test_ray_workers_run_a_layer_path_sweep(ray_local: Any, zoo_cache: Path, tmp_path: Path) -> None:
    """Candidates of several depths, each merged and scored in memory on a Ray worker."""
    from evomerge.merging import MergeRecipe
    from evomerge.optimizer.executors import RayExecutor
    from evomerge.search_spaces import LayerPathConfig

    cfg = SweepConfig(
        study_name="ray-path",
        runs_dir=str(tmp_path),
        zoo="micro",
        search_space=SearchSpaceConfig(layer_path=LayerPathConfig(repeats=2)),
        sampler=SamplerConfig(name="random", seed=4),
        n_trials=8,
        executor=ExecutorConfig(kind="ray", workers=2),
    )
    sweep = resolve_sweep(cfg, zoo_cache=zoo_cache)
    pool = RayExecutor(sweep, num_workers=2)
    try:
        study = run_search(sweep, pool)
    finally:
        pool.close()
    complete = trials_in(study, TrialState.COMPLETE)
    assert len(complete) == 8 and not trials_in(study, TrialState.FAIL)
    depths = set()
    for t in complete:
        recipe = MergeRecipe.model_validate(t.user_attrs["recipe"])
        depths.add(sum(piece.length for piece in recipe.slices) or recipe.num_layers)
        assert set(t.user_attrs["scores"]) == {"arith", "code", "logic"}
    assert len(depths) > 1  # the workers' live models followed candidates of several depths


def _kill_first_running(study_name: str, storage: str, killed: list[int], stop: threading.Event) -> None:
    """Watch the study; SIGKILL the worker of the first RUNNING trial once (its pid goes in ``killed``).

    The trial seen RUNNING need not be the one that is lost: its result may already be on its way to the
    driver, and with prefetch a second candidate is queued on that worker. The test therefore asks the
    study which trials the driver saw die."""
    study = None
    while study is None and not stop.is_set():
        try:
            study = optuna.load_study(study_name=study_name, storage=storage)
        except Exception:  # the sweep has not created it (or its tables) yet
            time.sleep(0.05)
    while study is not None and not stop.is_set() and not killed:
        for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            pid = t.user_attrs.get("worker_pid")
            if pid is not None and pid != os.getpid():
                os.kill(int(pid), signal.SIGKILL)
                killed.append(int(pid))
                return
        time.sleep(0.005)


@pytest.mark.parametrize("retries", [1, 0])
def test_a_worker_killed_mid_trial_is_replaced_and_the_sweep_goes_on(
    ray_local: Any, micro_zoo: Zoo, zoo_cache: Path, tmp_path: Path, retries: int
) -> None:
    from evomerge.optimizer.executors import RayExecutor

    sweep = sweep_of(
        tmp_path,
        zoo_cache,
        f"kill{retries}",
        sampler=SamplerConfig(name="random", seed=1),
        n_trials=6,
        executor=ExecutorConfig(kind="ray", workers=2, retries=retries),
    )
    open_study(sweep.config, [t.name for t in sweep.tasks])  # the watcher below loads it, never creates it
    pool = RayExecutor(sweep, num_workers=2)
    before = set(pool._pids)
    killed: list[int] = []
    stop = threading.Event()
    watcher = threading.Thread(
        target=_kill_first_running, args=("kill" + str(retries), sweep.config.storage_url(), killed, stop)
    )
    try:
        watcher.start()
        study = run_search(sweep, pool)
    finally:
        stop.set()
        watcher.join()
        pool.close()
    assert len(killed) == 1
    assert len(trials_in(study, TrialState.COMPLETE)) == 6  # the sweep went on to its budget
    assert set(pool._pids) != before and killed[0] not in pool._pids  # the dead worker was replaced
    if retries:  # the candidates lost with the worker ran again on its replacement and completed
        restarted = [t for t in study.trials if t.user_attrs.get("worker_restarts")]
        assert 1 <= len(restarted) <= 2
        assert all(t.state == TrialState.COMPLETE and t.user_attrs["worker_restarts"] == 1 for t in restarted)
        assert all(t.user_attrs["worker_pid"] in pool._pids for t in restarted)  # re-run on the new worker
        assert trials_in(study, TrialState.FAIL) == []
    else:  # the running trial fails, and so does any candidate queued behind it on that worker
        failed = trials_in(study, TrialState.FAIL)
        assert 1 <= len(failed) <= 2
        assert all(t.user_attrs["error"].startswith("worker died") for t in failed)
        assert all(t.user_attrs["worker_pid"] == killed[0] for t in failed)


def test_a_slow_replacement_does_not_stall_the_driver(
    ray_local: Any, micro_zoo: Zoo, zoo_cache: Path, tmp_path: Path
) -> None:
    """One of three workers is killed and its replacement takes DELAY seconds to start: meanwhile the other
    two workers' trials keep completing (the driver records them), and the lost trial completes on the
    replacement afterwards."""
    from evomerge.optimizer.executors import RayExecutor

    delay = 10.0
    sweep = sweep_of(
        tmp_path,
        zoo_cache,
        "slow-replacement",
        sampler=SamplerConfig(name="random", seed=5),
        n_trials=24,
        executor=ExecutorConfig(kind="ray", workers=2, retries=1, prefetch=0),
    )
    open_study(sweep.config, [t.name for t in sweep.tasks])
    pool = RayExecutor(sweep, num_workers=2)
    pool.replacement_delay_s = delay
    killed: list[int] = []
    stop = threading.Event()
    watcher = threading.Thread(
        target=_kill_first_running, args=("slow-replacement", sweep.config.storage_url(), killed, stop)
    )
    try:
        watcher.start()
        t0 = time.time()
        study = run_search(sweep, pool)
    finally:
        stop.set()
        watcher.join()
        pool.close()
    assert len(killed) == 1
    complete = trials_in(study, TrialState.COMPLETE)
    assert len(complete) == 24 and not trials_in(study, TrialState.FAIL)
    (restarted,) = [t for t in complete if t.user_attrs.get("worker_restarts")]
    assert restarted.datetime_complete is not None
    kill_time = min(t.datetime_start for t in complete if t.number == restarted.number).timestamp()
    # trials the surviving worker finished while the replacement was still starting
    during = [
        t
        for t in complete
        if t.number != restarted.number
        and t.datetime_complete is not None
        and kill_time < t.datetime_complete.timestamp() < kill_time + delay
        and t.user_attrs["worker_pid"] != killed[0]
    ]
    assert len(during) >= 2, f"the driver stalled: {len(during)} trials completed during the {delay} s start"
    assert restarted.datetime_complete.timestamp() - kill_time >= delay  # it waited for its replacement
    assert time.time() - t0 > delay


# ------------------------------------------------------------------------------------------ kill + resume
def _sweep_yaml(path: Path, runs: Path, study: str, sampler: dict[str, Any], n_trials: int) -> Path:
    path.write_text(
        yaml.safe_dump(
            {
                "study_name": study,
                "runs_dir": str(runs),
                "zoo": "micro",
                "search_space": SPACE.model_dump(mode="json"),
                "sampler": sampler,
                "n_trials": n_trials,
                "seed_recipes": ["uniform"],
                "fidelity": {"rungs": [8], "n_startup_trials": 3},
            }
        )
    )
    return path


def _complete_count(db: Path) -> int:
    """Complete trials, read without ever creating the database (the sweep process creates it)."""
    if not db.exists():
        return 0
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=1) as con:
            return int(con.execute("SELECT count(*) FROM trials WHERE state = 'COMPLETE'").fetchone()[0])
    except sqlite3.Error:  # tables not created yet, or locked for a moment
        return 0


def _running_candidates(db: Path, *, peek: bool = False) -> int:
    """RUNNING trials whose candidate was complete (``recipe`` recorded): a kill landed inside them.
    ``peek``: read-only, while the sweep process runs (0 when the database is busy or not there yet)."""
    if not db.exists():
        return 0
    query = (
        "SELECT count(*) FROM trials t JOIN trial_user_attributes a ON a.trial_id = t.trial_id "
        "WHERE t.state = 'RUNNING' AND a.key = 'recipe'"
    )
    if peek:
        try:
            with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=1) as con:
                return int(con.execute(query).fetchone()[0])
        except sqlite3.Error:
            return 0
    with sqlite3.connect(db, timeout=5) as con:  # read-write: a killed writer's journal is rolled back
        return int(con.execute(query).fetchone()[0])


@pytest.mark.parametrize(
    "sampler", [{"name": "cmaes", "seed": 0}, {"name": "nevergrad", "optimizer": "NGOpt", "seed": 0}]
)
def test_sigkilled_sweeps_resume_to_exactly_the_budget(
    micro_zoo: Zoo, evomerge_home: Path, tmp_path: Path, sampler: dict[str, Any]
) -> None:
    if sampler["name"] == "nevergrad":
        pytest.importorskip("nevergrad")
    n_trials = 16
    study_name = f"killed-{sampler['name']}"
    cfg = _sweep_yaml(tmp_path / "sweep.yaml", tmp_path / "runs", study_name, sampler, n_trials)
    env = {**os.environ, "EVOMERGE_HOME": str(evomerge_home), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "evomerge.cli", "search", str(cfg), "--no-report"]
    storage = f"sqlite:///{tmp_path / 'runs' / study_name / 'study.db'}"
    rng = random.Random(sampler["name"])
    kills = inside = 0
    db = tmp_path / "runs" / study_name / "study.db"
    for _ in range(6):  # start, wait until some trials ran, SIGKILL
        if kills >= 3 and inside:
            break
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 60
        target = rng.randint(1, 3)
        # until a kill has landed inside a trial, kill as soon as a candidate runs (on a loaded machine
        # the sampler's share of the time grows); after that, at a random moment (inside the sampler too)
        precise = inside == 0
        while time.monotonic() < deadline and proc.poll() is None:
            if _complete_count(db) >= kills * 3 + target and (
                not precise or _running_candidates(db, peek=True)
            ):
                break
            time.sleep(0.02)
        if not precise:
            time.sleep(rng.uniform(0.0, 0.3))
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            kills += 1
        proc.wait()
        inside += _running_candidates(db)
    assert kills >= 2
    final = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert final.returncode == 0, final.stderr[-2000:]

    study = optuna.load_study(study_name=study_name, storage=storage)
    complete = trials_in(study, TrialState.COMPLETE)
    assert len(complete) == n_trials  # exactly the budget, not one more
    assert trials_in(study, TrialState.RUNNING) == []
    assert [t.number for t in study.trials] == list(range(len(study.trials)))
    # no candidate evaluated twice: a recipe scored before is told its scores (duplicate_of), not re-run
    by_number = {t.number: t for t in complete}
    for t in complete:
        if "duplicate_of" in t.user_attrs:
            original = by_number[t.user_attrs["duplicate_of"]]
            assert (t.params, t.value) == (original.params, original.value)
    params = [tuple(sorted(t.params.items())) for t in complete if "duplicate_of" not in t.user_attrs]
    assert len(set(params)) == len(params)
    for t in complete:
        assert set(t.user_attrs) >= {"recipe", "scores", "mean"}
    # every trial a kill interrupted was failed and its candidate asked again
    requeued = {t.user_attrs["requeued_from"]: t for t in study.trials if "requeued_from" in t.user_attrs}
    interrupted = [t for t in trials_in(study, TrialState.FAIL) if "stopped" in t.user_attrs.get("error", "")]
    assert any(candidate_params(t) for t in interrupted), "no kill landed inside a trial"
    for t in interrupted:  # (a kill inside the sampler leaves a trial with no candidate to ask again)
        if candidate_params(t):
            assert t.number in requeued and requeued[t.number].params == candidate_params(t)
        else:
            assert t.number not in requeued and "recipe" not in t.user_attrs
    sessions = json.loads((tmp_path / "runs" / study_name / "search_stats.json").read_text())
    assert len(sessions) >= 1  # the killed sessions never wrote theirs; the last one did


# ------------------------------------------------------------------------------------------ held-out guard
def test_fitness_on_a_test_file_is_refused_unless_allowed(
    micro_zoo: Zoo, zoo_cache: Path, tmp_path: Path
) -> None:
    rows = [{"id": str(i), "question": f"{i}+1=", "answer": str(i + 1)} for i in range(12)]
    for name in ("a_dev", "a_test", "b_dev"):
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:6]))
    (tmp_path / "b_test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[6:]))
    (tmp_path / "a_dev.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[3:9]))
    tasks = [
        {"name": "a", "data_files": {"dev": "a_dev.jsonl", "test": "a_test.jsonl"}},
        # b's dev file has a's test questions (the same content under another name)
        {"name": "b", "data_files": {"dev": "b_dev.jsonl", "test": "b_test.jsonl"}},
    ]
    cfg = SweepConfig.model_validate(
        {
            "study_name": "guard",
            "models": {"base": micro_zoo.base, "experts": list(micro_zoo.experts.values())},
            "tasks": tasks,
            "data_dir": str(tmp_path),
        }
    )
    sweep = resolve_sweep(cfg)
    with pytest.raises(
        ConfigError, match=r"task 'b': its dev file .*b_dev.jsonl is the test split of task 'a'"
    ):
        check_held_out(sweep)
    check_held_out(sweep, allow_test_fitness=True)
    # one file for both splits of one task is split disjointly: allowed
    same = cfg.model_copy(
        update={
            "tasks": (
                cfg.tasks[0].model_copy(
                    update={"data_files": {"dev": "b_test.jsonl", "test": "b_test.jsonl"}}
                ),
            )
        }
    )
    check_held_out(resolve_sweep(same))


def test_cli_refuses_test_fitness_with_one_line(micro_zoo: Zoo, tmp_path: Path) -> None:
    (tmp_path / "t.jsonl").write_text(
        "".join(json.dumps({"id": str(i), "question": "q", "answer": "1"}) + "\n" for i in range(4))
    )
    (tmp_path / "t2.jsonl").write_text((tmp_path / "t.jsonl").read_text())
    cfg = tmp_path / "sweep.yaml"
    cfg.write_text(
        yaml.safe_dump(
            {
                "study_name": "guard-cli",
                "runs_dir": str(tmp_path / "runs"),
                "models": {"base": micro_zoo.base, "experts": list(micro_zoo.experts.values())},
                "tasks": [
                    {"name": "x", "data_files": {"dev": "t2.jsonl", "test": "t.jsonl"}},
                ],
                "search_space": SPACE.model_dump(mode="json"),
                "n_trials": 1,
            }
        )
    )
    run = subprocess.run(
        [sys.executable, "-m", "evomerge.cli", "search", str(cfg), "--no-report"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 2
    lines = [line for line in run.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and "fitness must not see test questions" in lines[0]
    assert "Traceback" not in run.stderr
