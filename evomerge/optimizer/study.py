"""The Optuna study: storage, samplers, objective names, crash recovery, Pareto fronts.

Crash recovery. Each trial records its ``owner`` (host, pid and the process start time) when it is
asked, and RDB storages get heartbeats for running trials. A RUNNING trial is stale when its owner is a
process of this host that no longer exists, when it has no owner and started over 15 s ago, or
(any host) when its heartbeat is older than the grace period. Stale trials are failed with an ``error``
and their parameters enqueued again, so the candidate a crash interrupted is evaluated first.

Sharing a study. Several sweep processes (hosts, with PostgreSQL or MySQL) may run one study: seeding an
empty study and taking a slot of the budget (count, then ask) happen under :func:`study_lock`, so the
study ends with exactly ``n_trials`` complete trials and its seeds enqueued once.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import socket
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from datetime import datetime, timedelta
from typing import Any, Literal

import optuna
from optuna.trial import FrozenTrial, TrialState

from evomerge.errors import ConfigError
from evomerge.optimizer.config import SamplerConfig, SweepConfig

HEARTBEAT_INTERVAL_S = 30
GRACE_PERIOD_S = 120
NO_OWNER_GRACE_S = 15
"""A RUNNING trial without an owner is a process killed between asking it and recording itself (a
single storage write apart): stale once it is this old."""
RECOVERY_INTERVAL_S = 30.0
"""How often a running sweep looks for stale trials of other (dead) processes sharing its study."""
STORAGE_INIT_ATTEMPTS = 8


def make_sampler(
    cfg: SamplerConfig, *, workers: int = 1, budget: int | None = None
) -> optuna.samplers.BaseSampler:
    """The sampler; with several workers TPE uses the constant liar (running trials count as bad)."""
    if cfg.name == "tpe":
        return optuna.samplers.TPESampler(
            seed=cfg.seed,
            n_startup_trials=cfg.n_startup_trials if cfg.n_startup_trials is not None else 8,
            constant_liar=workers > 1,
        )
    if cfg.name == "nevergrad":
        from evomerge.optimizer.nevergrad_sampler import NevergradSampler

        return NevergradSampler(
            cfg.optimizer,
            seed=cfg.seed,
            budget=budget,
            num_workers=workers,
            learn_categoricals=cfg.method_choice == "learned",
        )
    if cfg.name == "cmaes":
        kwargs: dict[str, Any] = {
            "seed": cfg.seed,
            "n_startup_trials": cfg.n_startup_trials or 0,
            "popsize": cfg.population_size,
            # only the method gene is sampled independently, and it is learned (method_choice.py)
            "warn_independent_sampling": False,
            "learn_categoricals": cfg.method_choice == "learned",
        }
        if cfg.start == "best_seed":
            from evomerge.optimizer.cmaes_start import SeededCmaEsSampler

            return SeededCmaEsSampler(sigma0=cfg.sigma0 if cfg.sigma0 is not None else 0.1, **kwargs)
        from evomerge.optimizer.method_choice import LearnedChoiceCmaEsSampler

        plain = LearnedChoiceCmaEsSampler(**kwargs)
        if cfg.sigma0 is not None:
            plain._sigma0 = (
                cfg.sigma0
            )  # the argument is deprecated (Optuna 4.9), the attribute is what it sets
        return plain
    if cfg.name == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=cfg.seed, population_size=cfg.population_size or 12)
    return optuna.samplers.RandomSampler(seed=cfg.seed)


def make_pruner(config: SweepConfig) -> optuna.pruners.BasePruner:
    """The pruner of a multi-fidelity sweep (steps are the rungs' question counts); none otherwise."""
    fidelity = config.fidelity
    if fidelity is None:
        return optuna.pruners.NopPruner()
    if fidelity.pruner == "percentile":
        return optuna.pruners.PercentilePruner(
            fidelity.percentile, n_startup_trials=fidelity.n_startup_trials
        )
    return optuna.pruners.MedianPruner(n_startup_trials=fidelity.n_startup_trials)


def make_storage(url: str) -> optuna.storages.BaseStorage | str:
    """RDB URLs (sqlite, postgresql, ...) get heartbeats, so other hosts can tell a dead sweep's trials."""
    if "://" not in url or url.startswith(("journal", "redis")):
        return url
    from sqlalchemy import exc

    for attempt in range(STORAGE_INIT_ATTEMPTS):
        try:
            with warnings.catch_warnings():  # heartbeats are "experimental" in optuna, stable in practice
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                return optuna.storages.RDBStorage(
                    url, heartbeat_interval=HEARTBEAT_INTERVAL_S, grace_period=GRACE_PERIOD_S
                )
        except (exc.IntegrityError, exc.ProgrammingError):
            # Sweeps started together on an empty database all create optuna's tables; PostgreSQL
            # fails all but one ("duplicate key ... pg_type_typname_nsp_index", "already exists").
            # Once the winner's tables exist, creating them again finds them and does nothing.
            if attempt == STORAGE_INIT_ATTEMPTS - 1:
                raise
            time.sleep(random.uniform(0.1, 0.5))
    raise AssertionError("unreachable")  # pragma: no cover


def _lock_key(study: optuna.Study) -> int:
    """A signed 64-bit key for the study (PostgreSQL advisory locks take a bigint)."""
    digest = hashlib.sha256(f"evomerge:{study.study_name}".encode()).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


@contextlib.contextmanager
def study_lock(study: optuna.Study) -> Iterator[None]:
    """Hold a lock on the study, across all processes sharing it, for a read-then-write decision: seeding
    an empty study, or counting the budget and asking a trial (two sweeps that both count one free slot
    and both ask would run one trial too many).

    PostgreSQL: a transaction-level advisory lock (released when the holder commits or its connection
    drops: a killed process never leaves it held); MySQL: ``GET_LOCK``; SQLite: ``flock`` on a sibling
    ``.lock`` file. Other storages (journal files, in-memory) are not locked.
    """
    backend: Any = getattr(study._storage, "_backend", study._storage)
    engine: Any = getattr(backend, "engine", None)
    dialect = getattr(getattr(engine, "dialect", None), "name", None)
    if dialect == "postgresql":
        from sqlalchemy import text

        with engine.begin() as conn:
            conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _lock_key(study)})
            yield
        return
    if dialect in ("mysql", "mariadb"):
        from sqlalchemy import text

        name = f"evomerge:{_lock_key(study):x}"
        with engine.connect() as conn:
            conn.execute(text("SELECT GET_LOCK(:name, -1)"), {"name": name})
            try:
                yield
            finally:
                conn.execute(text("SELECT RELEASE_LOCK(:name)"), {"name": name})
        return
    database = getattr(getattr(engine, "url", None), "database", None)
    if dialect == "sqlite" and database and database != ":memory:":
        import fcntl

        with open(f"{database}.lock", "a") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)
        return
    yield


@contextlib.contextmanager
def quiet_heartbeat() -> Iterator[None]:
    """Silence optuna's warning that heartbeats are meant for ``Study.optimize``: our ask/tell loop
    records them itself (:class:`Heartbeat`)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used")
        yield


def open_study(config: SweepConfig, task_names: Sequence[str], *, workers: int = 1) -> optuna.Study:
    """Create the study, or load it when it exists (a sweep continues where it stopped)."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    n_obj = len(task_names) if config.multi_objective else 1
    directions: list[Literal["minimize", "maximize"]] = ["maximize"] * n_obj
    if config.storage is None:
        config.run_dir().mkdir(parents=True, exist_ok=True)
    try:
        study = optuna.create_study(
            study_name=config.study_name,
            storage=make_storage(config.storage_url()),
            sampler=make_sampler(config.sampler, workers=workers, budget=config.n_trials),
            pruner=make_pruner(config),
            directions=directions,
            load_if_exists=True,
        )
    except ValueError as err:
        raise ConfigError(f"study {config.study_name!r}: {err}") from None
    if len(study.directions) != len(directions):
        raise ConfigError(
            f"study {config.study_name!r} exists with {len(study.directions)} objective(s); this config "
            f"asks for {len(directions)} (sampler {config.sampler.name}); use another study_name"
        )
    names = list(task_names) if config.multi_objective else ["dev_mean"]
    if study.metric_names != names:
        with warnings.catch_warnings():  # experimental in optuna, stable in practice
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            study.set_metric_names(names)  # optuna-dashboard labels objectives with these
    return study


def owner_id() -> str:
    """This process, as recorded on the trials it runs: ``host:pid:start time``."""
    pid = os.getpid()
    return f"{socket.gethostname()}:{pid}:{_process_start(pid)}"


def _process_start(pid: int) -> str:
    """The start time of ``pid`` (clock ticks since boot, from /proc), or "" where unknown or gone."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
            stat = f.read()
    except OSError:
        return ""
    return stat.rsplit(")", 1)[-1].split()[19]


def owner_alive(owner: str) -> bool | None:
    """Whether the process that recorded ``owner`` still runs; None for another host (unknown here)."""
    host, _, rest = owner.partition(":")
    pid_text, _, start = rest.partition(":")
    if host != socket.gethostname():
        return None
    try:
        pid = int(pid_text)
    except ValueError:
        return False
    if not start:  # no /proc: fall back to whether the pid exists
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True
    return _process_start(pid) == start


def heartbeat_enabled(storage: Any) -> bool:
    """Whether ``storage`` records heartbeats (an RDB storage made by :func:`make_storage`). optuna has
    this as a module function (``optuna.storages._heartbeat.is_heartbeat_enabled``), not as a method of
    the storage: asking the storage for an ``is_heartbeat_enabled`` method always found none."""
    interval = getattr(storage, "get_heartbeat_interval", None)
    return callable(interval) and interval() is not None


def candidate_params(trial: optuna.trial.FrozenTrial) -> dict[str, Any]:
    """The whole candidate a stopped trial stood for, to ask again; empty when there is none.

    The parameters it was enqueued with (whole, even when the process died while writing them to the
    trial one by one); else its sampled parameters, but only once sampling finished (the sweep records
    the ``recipe`` before a worker sees the candidate). A process that died inside the sampler, or between
    two sampled parameters, left no candidate that ever ran: nothing to ask again."""
    fixed = trial.system_attrs.get("fixed_params")
    if fixed:
        return dict(fixed)
    return dict(trial.params) if "recipe" in trial.user_attrs else {}


def _heartbeat_stale_ids(study: optuna.Study) -> set[int]:
    storage: Any = study._storage
    get = getattr(storage, "_get_stale_trial_ids", None)
    if get is None or not heartbeat_enabled(storage):
        return set()
    try:
        return set(get(study._study_id))
    except Exception:  # an optuna that changed this private helper: fall back to owner checks only
        return set()


def recover_stale_trials(study: optuna.Study, *, requeue: bool = True) -> list[int]:
    """Fail the RUNNING trials of sweep processes that died (see the module docstring) and, with
    ``requeue``, enqueue their parameters again; returns the failed trial numbers."""
    stale_by_heartbeat = _heartbeat_stale_ids(study)
    now = datetime.now()
    recovered: list[int] = []
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        owner = t.user_attrs.get("owner")
        if t._trial_id in stale_by_heartbeat:
            stale = True
        elif owner is None:
            started = t.datetime_start or now
            stale = now - started > timedelta(seconds=NO_OWNER_GRACE_S)
        else:
            stale = owner_alive(str(owner)) is False
        if not stale:
            continue
        try:
            study._storage.set_trial_user_attr(
                t._trial_id, "error", "the sweep process running it stopped (crash or kill)"
            )
            study.tell(t.number, state=TrialState.FAIL)
        except (RuntimeError, ValueError):  # another process recovered it first
            continue
        recovered.append(t.number)
        params = candidate_params(t)
        if requeue and params:
            study.enqueue_trial(params, user_attrs={"requeued_from": t.number})
    return recovered


def count_trials(study: optuna.Study, *states: TrialState) -> int:
    """Trials in any of ``states``, counted from one read of the storage (a trial that finishes meanwhile
    is counted once, in one state or the other)."""
    return len(study.get_trials(deepcopy=False, states=states))


class Heartbeat:
    """Records heartbeats of the running trials (RDB storages) every HEARTBEAT_INTERVAL_S seconds."""

    def __init__(self, study: optuna.Study, running: Callable[[], list[optuna.Trial]]) -> None:
        self._storage: Any = study._storage
        self._running = running
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        if heartbeat_enabled(self._storage):
            self._thread = threading.Thread(target=self._beat, name="evomerge-heartbeat", daemon=True)
            self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_INTERVAL_S / 2):
            for trial in list(self._running()):
                # a trial that just finished, a storage hiccup: try again next beat
                with contextlib.suppress(Exception):
                    self._storage.record_heartbeat(trial._trial_id)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)


def complete_trials(study: optuna.Study) -> list[FrozenTrial]:
    return [
        t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)) if "scores" in t.user_attrs
    ]


def recipe_key(recipe: dict[str, Any]) -> str:
    """Equal for equal recipes (a trial's ``recipe`` attribute)."""
    return json.dumps(recipe, sort_keys=True)


def distinct_recipes(trials: list[FrozenTrial]) -> list[FrozenTrial]:
    """``trials`` with each recipe once: its earliest trial (the later ones scored the same candidate)."""
    first: dict[str, FrozenTrial] = {}
    for t in sorted(trials, key=lambda t: t.number):
        first.setdefault(recipe_key(t.user_attrs.get("recipe", {"trial": t.number})), t)
    return [t for t in trials if first.get(recipe_key(t.user_attrs.get("recipe", {"trial": t.number}))) is t]


PICK_ATTR = "pick"
"""The study user attribute where the final report records its pick (see :func:`best_trial`)."""

DEV_KEY_ATTR = "dev_questions"
"""The study user attribute naming the dev questions its trials were scored on
(:func:`evomerge.optimizer.sweep.question_key`): a resume with other questions is refused."""


def val_attr(number: int) -> str:
    """The study user attribute holding trial ``number``'s val scores (a finished trial's own attributes
    cannot be written any more): ``{"scores", "mean", "key"}``, ``key`` naming the val questions."""
    return f"val:{number}"


def dev_best_trial(study: optuna.Study) -> FrozenTrial:
    """The complete trial with the highest weighted mean dev score (ties: the earliest)."""
    trials = complete_trials(study)
    if not trials:
        raise ConfigError(f"study {study.study_name!r} has no complete trial yet")
    return max(trials, key=lambda t: (float(t.user_attrs["mean"]), -t.number))


def best_trial(study: optuna.Study) -> FrozenTrial:
    """The sweep's chosen trial: the final report's pick (the best val score among the top dev trials,
    :mod:`evomerge.optimizer.pick`) while it is current (no trial completed since it was made), else the
    complete trial with the highest weighted mean dev score (ties: the earliest)."""
    trials = complete_trials(study)
    if not trials:
        raise ConfigError(f"study {study.study_name!r} has no complete trial yet")
    pick = study.user_attrs.get(PICK_ATTR)
    if isinstance(pick, dict) and pick.get("n_complete") == len(trials):
        for t in trials:
            if t.number == pick.get("trial"):
                return t
    return dev_best_trial(study)


def pareto_front(trials: Sequence[FrozenTrial], tasks: Sequence[str]) -> list[FrozenTrial]:
    """Trials whose per-task dev scores no other trial dominates (duplicates of a point kept once)."""
    points = [(t, tuple(float(t.user_attrs["scores"][k]) for k in tasks)) for t in trials]
    front: list[FrozenTrial] = []
    seen: set[tuple[float, ...]] = set()
    for t, p in points:
        dominated = any(all(a >= b for a, b in zip(q, p, strict=True)) and q != p for _, q in points)
        if not dominated and p not in seen:
            seen.add(p)
            front.append(t)
    return sorted(front, key=lambda t: -float(t.user_attrs["mean"]))
