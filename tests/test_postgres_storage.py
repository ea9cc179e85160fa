"""Studies in PostgreSQL, for real: a throw-away server (tests/pg_server.py) on 127.0.0.1, a fresh database
per test. A sweep in PostgreSQL resumes to its budget; heartbeats let another host's sweep recover a dead
one's trial; two `evomerge search` processes share one study without duplicated or lost trials; a
SIGKILLed one's RUNNING trial is recovered by the survivor."""

from __future__ import annotations

import itertools
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import optuna
import pg_server
import pytest
import yaml
from optuna.trial import FrozenTrial, TrialState

from evomerge.optimizer import SweepConfig, resolve_sweep, run_search
from evomerge.optimizer import study as study_mod
from evomerge.optimizer.evaluator import LocalEvaluator
from evomerge.optimizer.export import load_run, load_study
from evomerge.optimizer.study import Heartbeat, open_study, recover_stale_trials, study_lock
from evomerge.search_spaces import ParamRange, SearchSpaceConfig
from evomerge.zoo import Zoo

SPACE = SearchSpaceConfig(
    method="task_arithmetic", params=(ParamRange(name="weight", low=0.0, high=1.2),), granularity="global"
)


@pytest.fixture(scope="module")
def pg() -> Iterator[pg_server.PgServer]:
    reason = pg_server.unavailable_reason()
    if reason is not None:
        if os.environ.get("EVOMERGE_REQUIRE_POSTGRES") == "1":  # .ci/run: must run there, never skip
            pytest.fail(f"EVOMERGE_REQUIRE_POSTGRES=1 but {reason}")
        pytest.skip(reason)
    with pg_server.running() as server:
        yield server


@pytest.fixture
def pg_db(pg: pg_server.PgServer, request: pytest.FixtureRequest) -> tuple[pg_server.PgServer, str, str]:
    """(server, database name, SQLAlchemy URL) of a fresh database for this test."""
    name = re.sub(r"[^a-z0-9_]", "_", request.node.name.lower())[:60]
    return pg, name, pg.create_database(name)


def trials_in(study: optuna.Study, *states: TrialState) -> list[FrozenTrial]:
    return study.get_trials(deepcopy=False, states=states)


def owner_pid(t: FrozenTrial) -> int:
    return int(str(t.user_attrs["owner"]).split(":")[1])


def sweep_dict(runs: Path, study: str, storage: str, n_trials: int) -> dict[str, Any]:
    return {
        "study_name": study,
        "storage": storage,
        "runs_dir": str(runs),
        "zoo": "micro",
        "search_space": SPACE.model_dump(mode="json"),
        "sampler": {"name": "cmaes", "seed": 0},
        "seed_recipes": ["uniform"],
        "n_trials": n_trials,
    }


def assert_no_candidate_twice(complete: list[FrozenTrial]) -> None:
    """No candidate was evaluated twice when it could have been known: a trial whose recipe an earlier
    complete trial had scored is marked ``duplicate_of`` it, with its scores, and was not evaluated; two
    evaluated trials share a recipe only when both ran at once (sampled identically by two processes)."""
    by_number = {t.number: t for t in complete}
    evaluated: dict[str, list[FrozenTrial]] = {}
    for t in complete:
        key = json.dumps(t.user_attrs["recipe"], sort_keys=True)
        if "duplicate_of" in t.user_attrs:
            original = by_number[t.user_attrs["duplicate_of"]]
            assert json.dumps(original.user_attrs["recipe"], sort_keys=True) == key
            assert "duplicate_of" not in original.user_attrs
            assert (t.value, t.user_attrs["scores"]) == (original.value, original.user_attrs["scores"])
            assert original.datetime_complete is not None and t.datetime_start is not None
            assert original.datetime_complete <= t.datetime_start
            assert "merge_seconds" not in t.user_attrs  # told at once, never merged
        else:
            evaluated.setdefault(key, []).append(t)
    for same in evaluated.values():
        for earlier, later in itertools.combinations(same, 2):
            assert earlier.datetime_complete is not None and later.datetime_start is not None
            assert later.datetime_start < earlier.datetime_complete  # they overlapped


# ------------------------------------------------------------------------------------------ one sweep
def test_a_sweep_in_postgresql_resumes_to_its_budget(
    pg_db: tuple[pg_server.PgServer, str, str], micro_zoo: Zoo, zoo_cache: Path, tmp_path: Path
) -> None:
    server, db, url = pg_db
    cfg = SweepConfig.model_validate(sweep_dict(tmp_path / "runs", "pg1", url, 5))
    sweep = resolve_sweep(cfg, zoo_cache=zoo_cache)
    evaluator = LocalEvaluator(sweep)
    study = run_search(sweep, evaluator)

    backend: Any = study._storage._backend  # type: ignore[attr-defined]
    assert isinstance(backend, optuna.storages.RDBStorage)
    assert backend.engine.dialect.name == "postgresql"
    assert study_mod.heartbeat_enabled(study._storage)
    assert backend.heartbeat_interval == study_mod.HEARTBEAT_INTERVAL_S
    assert backend.grace_period == study_mod.GRACE_PERIOD_S

    # the trials are in PostgreSQL: read back by another storage object, and with plain SQL
    loaded = optuna.load_study(study_name="pg1", storage=url)
    complete = trials_in(loaded, TrialState.COMPLETE)
    assert len(complete) == 5 and len(loaded.trials) == 5
    assert complete[0].params == {f"{e}.weight.g0": pytest.approx(1 / 3) for e in ("arith", "code", "logic")}
    for t in complete:
        assert set(t.user_attrs) >= {"owner", "recipe", "scores", "mean"}
        assert owner_pid(t) == os.getpid()
        assert t.value == pytest.approx(t.user_attrs["mean"])
    rows = server.query(
        db,
        "SELECT t.number, v.value FROM trials t JOIN studies s USING (study_id) "
        "JOIN trial_values v USING (trial_id) WHERE s.study_name = %s AND t.state = 'COMPLETE' "
        "ORDER BY t.number",
        ("pg1",),
    )
    assert [(n, pytest.approx(v)) for n, v in rows] == [(t.number, t.value) for t in complete]
    assert_no_candidate_twice(complete)

    # run again: the budget is met, nothing more runs; a larger budget continues the same study
    again = run_search(sweep, evaluator)
    assert len(again.trials) == 5
    bigger = resolve_sweep(cfg.model_copy(update={"n_trials": 7}), zoo_cache=zoo_cache)
    study = run_search(bigger, evaluator)
    assert [t.number for t in study.trials] == list(range(7))
    assert len(trials_in(study, TrialState.COMPLETE)) == 7
    assert server.query(db, "SELECT count(*) FROM trials WHERE state = 'COMPLETE'") == [(7,)]
    assert_no_candidate_twice(trials_in(study, TrialState.COMPLETE))

    # the run directory points at the PostgreSQL study: export and the dashboard read it from there
    run = load_run(cfg.run_dir())
    assert run.storage == url
    assert len(load_study(run.storage, run.study_name).trials) == 7
    port = pg_server.free_port()
    dash = subprocess.Popen(
        [str(Path(sys.executable).parent / "evomerge"), "dashboard", str(cfg.run_dir()), "--port", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        body = None
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and body is None and dash.poll() is None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/studies/1", timeout=2) as r:
                    body = json.loads(r.read())
            except OSError:
                time.sleep(0.3)
        assert body is not None, f"dashboard did not answer (exit code {dash.poll()})"
        assert len(body["trials"]) == 7 and body["objective_names"] == ["dev_mean"]
    finally:
        os.killpg(dash.pid, signal.SIGTERM)
        dash.wait(timeout=10)


def test_sweeps_starting_together_on_an_empty_database_all_open_the_study(
    pg: pg_server.PgServer, tmp_path: Path
) -> None:
    """Every sweep process creates optuna's tables on first use; on PostgreSQL, concurrent CREATE TABLEs
    fail all but one ("duplicate key value violates unique constraint pg_type_typname_nsp_index")."""
    for round_ in range(3):
        url = pg.create_database(f"together_{round_}")
        cfg = SweepConfig.model_validate(sweep_dict(tmp_path / "runs", "together", url, 5))
        errors, ids = _open_together(cfg, 4)
        assert errors == [] and len(ids) == 4 and len(set(ids)) == 1
        assert [s.study_name for s in optuna.get_all_study_summaries(url)] == ["together"]


def _open_together(cfg: SweepConfig, n: int) -> tuple[list[BaseException], list[int]]:
    """``open_study`` in ``n`` threads released at once: (errors, study ids)."""
    start = threading.Barrier(n)
    errors: list[BaseException] = []
    ids: list[int] = []

    def open_it() -> None:
        start.wait()
        try:
            ids.append(open_study(cfg, ["arith"])._study_id)
        except BaseException as err:
            errors.append(err)

    threads = [threading.Thread(target=open_it) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return errors, ids


_HOLD_LOCK = """
import sys, time
from evomerge.optimizer.config import SweepConfig
from evomerge.optimizer.study import open_study, study_lock
cfg = SweepConfig.model_validate_json(sys.argv[1])
with study_lock(open_study(cfg, ["arith"])):
    print("held", flush=True)
    time.sleep(120)
"""


def test_the_study_lock_serializes_processes_and_dies_with_its_holder(
    pg_db: tuple[pg_server.PgServer, str, str], tmp_path: Path
) -> None:
    """Counting the budget and asking a trial happen under ``study_lock``: an advisory lock that another
    process waits for, and that a SIGKILLed holder does not leave behind."""
    _, _, url = pg_db
    cfg = SweepConfig.model_validate(sweep_dict(tmp_path / "runs", "locked", url, 5))
    study = open_study(cfg, ["arith"])
    holder = subprocess.Popen(
        [sys.executable, "-c", _HOLD_LOCK, cfg.model_dump_json()], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        acquired = threading.Event()

        def take() -> None:
            with study_lock(study):
                acquired.set()

        waiter = threading.Thread(target=take)
        waiter.start()
        assert not acquired.wait(1.5)  # the other process holds it
        holder.kill()
        holder.wait()
        killed = time.monotonic()
        assert acquired.wait(10)  # PostgreSQL released it with the dead holder's connection
        print(f"lock free {time.monotonic() - killed:.2f} s after the kill")
        waiter.join()
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait()


# ------------------------------------------------------------------------------------------ heartbeats
def test_heartbeats_let_another_host_recover_a_dead_sweeps_trial(
    pg_db: tuple[pg_server.PgServer, str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A trial whose owner is on another host cannot be checked by pid: only its heartbeat, recorded in
    PostgreSQL by the running sweep, tells whether that sweep lives. Short intervals make it quick."""
    server, db, url = pg_db
    monkeypatch.setattr(study_mod, "HEARTBEAT_INTERVAL_S", 1)  # a beat every 0.5 s
    monkeypatch.setattr(study_mod, "GRACE_PERIOD_S", 3)
    cfg = SweepConfig.model_validate(sweep_dict(tmp_path / "runs", "hb", url, 5))
    study = open_study(cfg, ["arith"])
    with study_mod.quiet_heartbeat():
        trial = study.ask({"x": optuna.distributions.FloatDistribution(0.0, 1.0)})
    trial.set_user_attr("owner", "another-host:4242:123")  # pid checks do not apply to it
    trial.set_user_attr("recipe", {"x": trial.params["x"]})  # as a sweep records it once sampling is done
    beats = Heartbeat(study, lambda: [trial])
    sql = "SELECT count(*) FROM trial_heartbeats h JOIN trials t USING (trial_id) WHERE t.number = %s"
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and server.query(db, sql, (trial.number,)) == [(0,)]:
            time.sleep(0.1)
        assert server.query(db, sql, (trial.number,)) == [(1,)], "no heartbeat recorded"
        time.sleep(3.5)  # past the grace period, while it still beats: alive
        assert recover_stale_trials(study) == []
    finally:
        beats.stop()
    stopped = time.monotonic()
    recovered: list[int] = []
    while not recovered and time.monotonic() - stopped < 15:
        recovered = recover_stale_trials(study)
        time.sleep(0.2)
    assert recovered == [trial.number]
    assert time.monotonic() - stopped >= 2.0  # not before its last beat is older than the grace period
    failed = optuna.load_study(study_name="hb", storage=url).trials[trial.number]
    assert failed.state == TrialState.FAIL and "stopped" in failed.user_attrs["error"]
    waiting = trials_in(study, TrialState.WAITING)
    assert len(waiting) == 1 and waiting[0].user_attrs["requeued_from"] == trial.number
    assert waiting[0].system_attrs["fixed_params"] == trial.params


# ------------------------------------------------------------------------------------------ two processes
def _write_sweep(tmp_path: Path, name: str, url: str, n_trials: int) -> Path:
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(sweep_dict(tmp_path / "runs", name, url, n_trials)))
    return path


def _search(cfg: Path, evomerge_home: Path, log: Path) -> subprocess.Popen[bytes]:
    env = {**os.environ, "EVOMERGE_HOME": str(evomerge_home), "OMP_NUM_THREADS": "1"}
    with log.open("wb") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "evomerge.cli", "search", str(cfg), "--no-report"],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=out,
        )


def _finish(procs: list[subprocess.Popen[bytes]], logs: list[Path], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    try:
        for proc, log in zip(procs, logs, strict=True):
            rc = proc.wait(timeout=max(1.0, deadline - time.monotonic()))
            assert rc == 0, log.read_text(errors="replace")[-3000:]
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def test_two_search_processes_share_one_study(
    pg_db: tuple[pg_server.PgServer, str, str], micro_zoo: Zoo, evomerge_home: Path, tmp_path: Path
) -> None:
    """Both start together on an empty database (both create optuna's tables, both find the study empty):
    the study ends with exactly the budget, every candidate once, and both processes ran trials."""
    _, _, url = pg_db
    n_trials = 40  # both get trials even when one starts a few seconds after the other
    cfg = _write_sweep(tmp_path, "shared", url, n_trials)
    logs = [tmp_path / "a.log", tmp_path / "b.log"]
    procs = [_search(cfg, evomerge_home, log) for log in logs]
    _finish(procs, logs, timeout=150)

    study = optuna.load_study(study_name="shared", storage=url)
    complete = trials_in(study, TrialState.COMPLETE)
    assert len(complete) == n_trials
    assert len(study.trials) == n_trials  # nothing failed, nothing is left running or waiting
    assert [t.number for t in study.trials] == list(range(n_trials))
    assert_no_candidate_twice(complete)
    uniform = [t for t in complete if t.system_attrs.get("fixed_params")]
    # the seed recipes (uniform task arithmetic at 1/N and at the report's other baseline weight, 1) were
    # enqueued once each, though both processes found an empty study
    assert len(uniform) == 2
    by_process = {p.pid: sum(owner_pid(t) == p.pid for t in complete) for p in procs}
    assert sum(by_process.values()) == n_trials
    assert all(n >= 1 for n in by_process.values()), by_process


def test_a_killed_process_running_trial_is_recovered_by_the_other(
    pg_db: tuple[pg_server.PgServer, str, str], micro_zoo: Zoo, evomerge_home: Path, tmp_path: Path
) -> None:
    """SIGKILL one of two sweeps while it holds a RUNNING trial (it is stopped first, so the trial seen
    RUNNING is the one it dies with); the survivor fails that trial, asks its candidate again, and
    finishes the budget."""
    _, _, url = pg_db
    n_trials = 40  # enough that the first sweep up cannot finish before the other has started
    cfg = _write_sweep(tmp_path, "killed", url, n_trials)
    logs = [tmp_path / "victim.log", tmp_path / "survivor.log"]
    victim, survivor = procs = [_search(cfg, evomerge_home, log) for log in logs]
    try:
        study = None
        lost: FrozenTrial | None = None
        deadline = time.monotonic() + 90
        while lost is None and time.monotonic() < deadline:
            assert victim.poll() is None and survivor.poll() is None, "a sweep ended before the kill"
            if study is None:
                try:
                    study = optuna.load_study(study_name="killed", storage=url)
                except Exception:  # not created yet
                    time.sleep(0.2)
                    continue
            trials = study.get_trials(deepcopy=False)
            owners = {owner_pid(t) for t in trials if t.user_attrs.get("owner")}
            done_by = {owner_pid(t) for t in trials_in(study, TrialState.COMPLETE)}
            if owners == {victim.pid, survivor.pid} and victim.pid in done_by:  # both in their loops
                complete = len(trials_in(study, TrialState.COMPLETE))
                assert complete <= n_trials - 3, "the sweeps ran too fast to kill one mid-sweep"
                victim.send_signal(signal.SIGSTOP)
                time.sleep(0.2)  # a write it sent just before it stopped has landed
                held = [
                    t
                    for t in trials_in(study, TrialState.RUNNING)
                    if t.user_attrs.get("owner") and owner_pid(t) == victim.pid and "recipe" in t.user_attrs
                ]
                if held:
                    victim.kill()
                    victim.wait()
                    lost = held[0]
                else:  # between two trials: let it go on and try again
                    victim.send_signal(signal.SIGCONT)
            time.sleep(0.05)
        assert lost is not None, "the victim never held a RUNNING trial"
        killed_at = time.monotonic()
        _finish([survivor], [logs[1]], timeout=120)
        print(f"survivor finished {time.monotonic() - killed_at:.1f} s after the kill")
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()

    study = optuna.load_study(study_name="killed", storage=url)
    assert trials_in(study, TrialState.RUNNING) == [] and trials_in(study, TrialState.WAITING) == []
    complete = trials_in(study, TrialState.COMPLETE)
    assert len(complete) == n_trials
    assert_no_candidate_twice(complete)
    failed = trials_in(study, TrialState.FAIL)
    assert [t.number for t in failed] == [lost.number]  # the one trial the kill interrupted
    assert "stopped" in failed[0].user_attrs["error"] and owner_pid(failed[0]) == victim.pid
    again = [t for t in study.trials if t.user_attrs.get("requeued_from") == lost.number]
    assert len(again) == 1  # asked again once, by the survivor, and completed
    assert again[0].state == TrialState.COMPLETE and again[0].params == lost.params
    assert owner_pid(again[0]) == survivor.pid
    assert {owner_pid(t) for t in complete} == {victim.pid, survivor.pid}
