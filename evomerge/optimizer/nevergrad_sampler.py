"""An Optuna sampler backed by a nevergrad optimizer (CMA, NGOpt, TwoPointsDE, ...).

The Optuna study stays the single source of truth; the nevergrad optimizer is a cache rebuilt from it.

* **Search space.** The float parameters of the study's intersection search space (log-scaled ones too)
  are searched by nevergrad, each mapped to [0, 1] (in log space for ``log=True``; a ``step`` is
  applied when mapping back) and packed into one ``ng.p.Array(shape=(d,), lower=0, upper=1)``.
  A categorical parameter (the method gene) is chosen by a bandit over the study's trials
  (:mod:`evomerge.optimizer.method_choice`). Every other parameter (int, single-valued), and every
  float of a trial asked before the first trial completed, comes from an internal
  :class:`optuna.samplers.RandomSampler`.
* **Asynchronous.** Several trials may be asked before any is told: the sampler keeps the candidate it
  asked nevergrad for each running trial and tells it when the trial finishes. At most ``num_workers``
  candidates are outstanding at a time (nevergrad's sequential optimizers, e.g. the Cobyla that NGOpt
  picks for one worker, block on a second ask before a tell); a trial asked beyond that is sampled at
  random and told to nevergrad as a point it did not ask once it finishes.
* **Replay / resume.** On every ``sample_relative`` the finished trials of the storage that this sampler
  has not handled yet are told to nevergrad in trial-number order: trials another process or an earlier
  run asked, enqueued seed trials, trials sampled at random. nevergrad receives them as points it did
  not ask (``opt.parametrization.spawn_child(new_value=x)`` then ``opt.tell(child, loss)``); CMA, NGOpt
  and TwoPointsDE accept that in nevergrad 1.0.12 (NGOpt's sequential picks such as Cobyla only keep
  them as the current best, the start of their run). Some optimizers refuse such points
  (``TellNotAskedNotSupportedError``, e.g. EDA, TBPSA) and nevergrad has no way around it: a suggestion
  (``opt.suggest(x)`` before ``opt.ask()``) is told as a point not asked as well. Such an optimizer is
  rejected with a :class:`ConfigError` when the sampler is built (it could not resume from the study);
  should an NGOpt pick refuse them at run time, those trials are left out, with one warning. A new
  sampler on an existing study thus rebuilds its optimizer from the storage; so does a sampler whose
  search space changed. A trial missing a parameter of the space, or with a different distribution for
  it, is skipped.
* **Losses.** nevergrad minimizes: the loss is the objective value, negated for a maximized study. A
  PRUNED trial is told its last intermediate value (the score on the rung it was stopped at, as Optuna
  also stores it); one with no intermediate value is told nothing. A FAILED trial is told nothing (its
  candidate is just forgotten), except that a sequential optimizer that would otherwise wait for it
  forever is told the worst loss seen so far. A non-finite value is told nothing either.
* **Single objective only:** a multi-objective study raises :class:`ConfigError` at its first sample.
* **Determinism:** the same seed and the same sequence of tells give the same asks.

nevergrad is an optional dependency (``pip install 'evomerge[nevergrad]'``), imported when a sampler is
built. With numpy >= 2.4 the meta-models of nevergrad 1.0.12 (used by NGOpt with several workers) call
``float`` on one-element arrays, which numpy no longer allows; this module gives nevergrad's
``metamodel`` module a ``float`` that converts one-element arrays as numpy < 2.4 did.
"""

from __future__ import annotations

import builtins
import contextlib
import difflib
import math
import threading
import warnings
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import optuna
from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution
from optuna.study import Study, StudyDirection
from optuna.trial import FrozenTrial, TrialState

from evomerge.errors import ConfigError
from evomerge.optimizer.method_choice import choose_categorical

__all__ = ["RECOMMENDED_OPTIMIZERS", "NevergradSampler"]

RECOMMENDED_OPTIMIZERS: tuple[str, ...] = ("NGOpt", "CMA", "TwoPointsDE")
"""The optimizers this sampler is tested with; any name of ``nevergrad.optimizers.registry`` is accepted."""

_INSTALL_HINT = "nevergrad is not installed: pip install 'evomerge[nevergrad]'"
_FINISHED = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)
# optimizer attributes that hold sub-optimizers (NGOpt's pick, a meta-model's base, a portfolio's members)
_SUB_OPTIMIZER_ATTRS = ("optim", "_optim", "_optimizer", "optims", "optimizers")


def _import_nevergrad() -> Any:
    try:
        import nevergrad
    except ImportError:
        raise ConfigError(_INSTALL_HINT) from None
    _patch_metamodel_float()
    return nevergrad


def _scalar_float(x: Any = 0.0) -> float:
    """``float`` that also converts one-element arrays (numpy >= 2.4 refuses those)."""
    if isinstance(x, np.ndarray) and x.size == 1:
        return builtins.float(x.reshape(()))
    return builtins.float(x)


def _numpy_refuses_float_of_arrays() -> bool:
    """numpy >= 2.4 no longer converts a one-element array with ``float()``."""
    try:
        builtins.float(np.zeros(1))
    except TypeError:
        return True
    return False


def _patch_metamodel_float() -> None:
    if not _numpy_refuses_float_of_arrays():
        return  # nevergrad's meta-models work as they are
    from nevergrad.optimization import metamodel

    if getattr(metamodel, "float", None) is not _scalar_float:
        metamodel.float = _scalar_float  # looked up before the builtin by code in that module


def _check_optimizer_name(ng: Any, name: str) -> Any:
    registry = ng.optimizers.registry
    known = ", ".join(RECOMMENDED_OPTIMIZERS)
    hint = f"known: {known} (or any of the {len(registry)} names of nevergrad.optimizers.registry)"
    if not name or not name.strip():
        raise ConfigError(f"no nevergrad optimizer named; {hint}")
    if name not in registry:
        close = difflib.get_close_matches(name, list(registry), n=3)
        maybe = f"did you mean {', '.join(close)}? " if close else ""
        raise ConfigError(f"unknown nevergrad optimizer {name!r}; {maybe}{hint}")
    return registry[name]


class NevergradSampler(optuna.samplers.BaseSampler):
    """Samples the float parameters of a single-objective study with a nevergrad optimizer.

    Args:
        optimizer: a name of ``nevergrad.optimizers.registry``, e.g. ``"NGOpt"``, ``"CMA"``,
            ``"TwoPointsDE"``.
        seed: seeds nevergrad's parametrization and the random sampler of the other parameters.
        budget: the number of trials nevergrad plans for. NGOpt chooses its algorithm from it and needs
            it; CMA and TwoPointsDE run without one.
        num_workers: how many trials run at once (nevergrad adapts its algorithm to it); at most this
            many nevergrad candidates are outstanding, a trial asked beyond that is sampled at random.

    Raises:
        ConfigError: nevergrad is missing, the optimizer name is unknown, the optimizer cannot run
            with this budget / number of workers, or it cannot be told trials it did not ask (then it
            could not be rebuilt from the study).
    """

    def __init__(
        self,
        optimizer: str = "NGOpt",
        *,
        seed: int = 0,
        budget: int | None = None,
        num_workers: int = 1,
        learn_categoricals: bool = True,
    ) -> None:
        ng = _import_nevergrad()
        self._ng = ng
        self._optimizer_cls = _check_optimizer_name(ng, optimizer)
        if budget is not None and budget < 1:
            raise ConfigError(f"nevergrad budget must be a positive number of trials, got {budget}")
        if num_workers < 1:
            raise ConfigError(f"nevergrad num_workers must be at least 1, got {num_workers}")
        self._name = optimizer
        self._seed = seed
        self._learn_categoricals = learn_categoricals
        self._budget = budget
        self._num_workers = num_workers
        self._probe()

        self._lock = threading.RLock()
        self._independent = optuna.samplers.RandomSampler(seed=seed)
        self._intersection = optuna.search_space.IntersectionSearchSpace()
        self._intersection_study_id: int | None = None
        self._study_id: int | None = None
        self._opt: Any = None  # the nevergrad optimizer, built once the search space is known
        self._space: dict[str, FloatDistribution] = {}
        self._pending: dict[int, Any] = {}  # trial number -> candidate asked for it, not told yet
        self._handled: set[int] = set()  # finished trials already told (or deliberately not)
        self._num_told = 0
        self._num_asked = 0
        self._num_repeats = 0
        self._worst_loss: float | None = None
        self._warned_refusal = False

    # -- read-only state ------------------------------------------------------------------------

    @property
    def optimizer_name(self) -> str:
        return self._name

    @property
    def optimizer(self) -> Any:
        """The current nevergrad optimizer (``None`` until the first relative sample)."""
        return self._opt

    @property
    def search_space(self) -> dict[str, FloatDistribution]:
        """The float parameters nevergrad searches, in the order of its array."""
        return dict(self._space)

    @property
    def num_told(self) -> int:
        """How many finished trials the current nevergrad optimizer has been told."""
        return self._num_told

    @property
    def num_asked(self) -> int:
        """How many trials got their float parameters from the current nevergrad optimizer."""
        return self._num_asked

    @property
    def num_repeats(self) -> int:
        """Asked points that an earlier trial had already evaluated, answered from the storage."""
        return self._num_repeats

    @property
    def num_pending(self) -> int:
        """Candidates asked for running trials and not told yet."""
        return len(self._pending)

    # -- BaseSampler ----------------------------------------------------------------------------

    def reseed_rng(self) -> None:
        """Reseeds the random sampler of the non-float parameters (nevergrad keeps its seed)."""
        self._independent.reseed_rng()

    def infer_relative_search_space(self, study: Study, trial: FrozenTrial) -> dict[str, BaseDistribution]:
        if len(study.directions) != 1:
            raise ConfigError(
                f"the nevergrad sampler optimizes one objective; study {study.study_name!r} has "
                f"{len(study.directions)} (use nsga2 for a multi-objective sweep)"
            )
        with self._lock:
            if self._intersection_study_id != study._study_id:
                self._intersection = optuna.search_space.IntersectionSearchSpace()
                self._intersection_study_id = study._study_id
            space = self._intersection.calculate(study)
        return {
            name: dist
            for name, dist in space.items()
            if isinstance(dist, FloatDistribution) and not dist.single()
        }

    def sample_relative(
        self, study: Study, trial: FrozenTrial, search_space: dict[str, BaseDistribution]
    ) -> dict[str, Any]:
        if not search_space:
            return {}
        space = {name: dist for name, dist in search_space.items() if isinstance(dist, FloatDistribution)}
        with self._lock:
            self._sync(study, space)
            if any(name in space for name in trial.system_attrs.get("fixed_params", {})):
                return {}  # an enqueued trial: told to nevergrad as a point it did not ask, once finished
            if len(self._pending) >= self._num_workers:
                return {}  # no free worker slot in nevergrad: sampled at random, replayed when finished
            known = self._known_points(study)
            for _ in range(_MAX_REPEATS):
                candidate = self._opt.ask()
                params = self._decode(np.asarray(candidate.value, dtype=float))
                loss = known.get(_point_key(params))
                if loss is None:
                    self._pending[trial.number] = candidate
                    self._num_asked += 1
                    return params
                # A point already evaluated (e.g. a deterministic optimizer rebuilt after a restart
                # walking its path again): answer from the storage instead of running it twice.
                self._opt.tell(candidate, loss)
                self._num_repeats += 1
            return {}  # the optimizer keeps proposing known points: this trial is sampled at random

    def sample_independent(
        self,
        study: Study,
        trial: FrozenTrial,
        param_name: str,
        param_distribution: BaseDistribution,
    ) -> Any:
        if self._learn_categoricals and isinstance(param_distribution, CategoricalDistribution):
            return choose_categorical(study, trial, param_name, param_distribution, seed=self._seed)
        return self._independent.sample_independent(study, trial, param_name, param_distribution)

    def after_trial(
        self,
        study: Study,
        trial: FrozenTrial,
        state: TrialState,
        values: Sequence[float] | None,
    ) -> None:
        with self._lock:
            if self._opt is None or self._study_id != study._study_id:
                return  # replayed from the storage once the optimizer exists
            self._finish(study, trial, state, values)

    # -- internals ------------------------------------------------------------------------------

    def _probe(self) -> None:
        """Build the optimizer once on a 2-d space, so a budget / worker problem is a ConfigError now."""
        parametrization = self._ng.p.Array(shape=(2,), lower=0.0, upper=1.0)
        parametrization.random_state = np.random.RandomState(self._seed)
        try:
            probe = self._optimizer_cls(
                parametrization=parametrization, budget=self._budget, num_workers=self._num_workers
            )
            getattr(probe, "optim", None)  # NGOpt-style optimizers pick their algorithm here
            probe.tell(probe.parametrization.spawn_child(new_value=np.full(2, 0.5)), 0.0)
        except self._ng.errors.TellNotAskedNotSupportedError:
            raise ConfigError(
                f"nevergrad optimizer {self._name!r} cannot be told trials it did not ask (needed to resume "
                f"from the study, for enqueued trials and for trials run elsewhere); known: "
                f"{', '.join(RECOMMENDED_OPTIMIZERS)}"
            ) from None
        except Exception as err:
            detail = str(err) or type(err).__name__
            hint = ""
            if self._budget is None and isinstance(err, AssertionError):
                hint = " (it picks its algorithm from the budget: pass budget=<number of trials>)"
            raise ConfigError(
                f"nevergrad optimizer {self._name!r} cannot run with budget={self._budget}, "
                f"num_workers={self._num_workers}: {detail}{hint}"
            ) from None

    def _build(self, study: Study, space: dict[str, FloatDistribution]) -> None:
        self.close()
        parametrization = self._ng.p.Array(shape=(len(space),), lower=0.0, upper=1.0)
        parametrization.random_state = np.random.RandomState(self._seed)
        try:
            self._opt = self._optimizer_cls(
                parametrization=parametrization, budget=self._budget, num_workers=self._num_workers
            )
        except Exception as err:
            raise ConfigError(
                f"nevergrad optimizer {self._name!r} cannot run on {len(space)} parameters: {err}"
            ) from None
        self._study_id = study._study_id
        self._space = dict(space)
        self._pending.clear()
        self._handled.clear()
        self._num_told = 0
        self._num_asked = 0
        self._num_repeats = 0
        self._worst_loss = None

    def _sync(self, study: Study, space: dict[str, FloatDistribution]) -> None:
        """(Re)build the optimizer if needed, then tell it the finished trials it has not seen."""
        if self._opt is None or self._study_id != study._study_id or space != self._space:
            self._build(study, space)
        for trial in study.get_trials(deepcopy=False, states=_FINISHED):
            if trial.number not in self._handled:
                self._finish(study, trial, trial.state, trial.values)

    def _finish(
        self, study: Study, trial: FrozenTrial, state: TrialState, values: Sequence[float] | None
    ) -> None:
        if trial.number in self._handled:
            return
        self._handled.add(trial.number)
        candidate = self._pending.pop(trial.number, None)
        loss = self._loss(study, trial, state, values)
        x = self._encode(trial) if loss is not None else None
        if loss is not None and x is not None:
            if candidate is not None and self._same_point(candidate, trial):
                self._opt.tell(candidate, loss)
                candidate = None
                told = True
            else:
                told = self._tell_not_asked(x, loss)
            if told:
                self._num_told += 1
                self._worst_loss = loss if self._worst_loss is None else max(self._worst_loss, loss)
        if candidate is not None and self._is_sequential():
            # a sequential optimizer waits for this candidate's loss before its next ask
            release = loss if loss is not None else self._worst_loss
            self._opt.tell(candidate, release if release is not None else 0.0)

    def _known_points(self, study: Study) -> dict[tuple[tuple[str, float], ...], float]:
        """Loss of every finished trial's point in the space (COMPLETE, or PRUNED with a value)."""
        known: dict[tuple[tuple[str, float], ...], float] = {}
        for t in study.get_trials(deepcopy=False, states=_FINISHED):
            if any(name not in t.params for name in self._space):
                continue
            loss = self._loss(study, t, t.state, t.values)
            if loss is not None:
                known[_point_key({name: t.params[name] for name in self._space})] = loss
        return known

    def _loss(
        self, study: Study, trial: FrozenTrial, state: TrialState, values: Sequence[float] | None
    ) -> float | None:
        value: float | None = None
        if state == TrialState.COMPLETE and values:
            value = float(values[0])
        elif state == TrialState.PRUNED and trial.last_step is not None:
            value = float(trial.intermediate_values[trial.last_step])
        if value is None or not math.isfinite(value):
            return None
        return -value if study.direction == StudyDirection.MAXIMIZE else value

    def _tell_not_asked(self, x: np.ndarray, loss: float) -> bool:
        """Tell a point nevergrad did not ask; False where the optimizer refuses it."""
        child = self._opt.parametrization.spawn_child(new_value=x)
        try:
            self._opt.tell(child, loss)
        except self._ng.errors.TellNotAskedNotSupportedError:
            if not self._warned_refusal:
                self._warned_refusal = True
                warnings.warn(
                    f"nevergrad optimizer {self._name!r} ({self._leaf_name()}) refuses points it did not "
                    "ask: trials sampled elsewhere are not told to it",
                    stacklevel=2,
                )
            return False
        return True

    def close(self) -> None:
        """Stop the background threads some nevergrad optimizers run (the recast ones, e.g. the Cobyla
        NGOpt picks for small budgets): they are not daemons and would keep the process from exiting.
        The optimizer is dropped; the next sample rebuilds it by replaying the storage."""
        if self._opt is None:
            return
        for opt in self._optimizer_tree():
            thread = getattr(opt, "_messaging_thread", None)
            if thread is not None:
                with contextlib.suppress(Exception):
                    thread.stop()
        self._opt = None

    def _leaf_name(self) -> str:
        optim = getattr(self._opt, "optim", None)
        return str(getattr(optim, "name", type(self._opt).__name__))

    def _optimizer_tree(self) -> Iterator[Any]:
        """The optimizer and every (nested) sub-optimizer it delegates to, each once."""
        base = self._ng.optimizers.base.Optimizer
        stack: list[Any] = [self._opt]
        seen: set[int] = set()
        while stack:
            opt = stack.pop()
            if id(opt) in seen:
                continue
            seen.add(id(opt))
            yield opt
            for attr in _SUB_OPTIMIZER_ATTRS:
                sub = getattr(opt, attr, None)
                subs = sub if isinstance(sub, list | tuple) else [sub]
                stack.extend(x for x in subs if isinstance(x, base))

    def _is_sequential(self) -> bool:
        """Whether some (sub-)optimizer runs a sequential loop that blocks on an untold candidate."""
        return any(
            getattr(opt, "recast", False) and getattr(opt, "no_parallelization", False)
            for opt in self._optimizer_tree()
        )

    def _encode(self, trial: FrozenTrial) -> np.ndarray | None:
        """The trial's point in [0, 1]^d; None if it lacks a parameter of the space."""
        x = np.empty(len(self._space))
        for i, (name, dist) in enumerate(self._space.items()):
            if name not in trial.params or trial.distributions.get(name) != dist:
                return None
            value = float(trial.params[name])
            if dist.log:
                u = (math.log(value) - math.log(dist.low)) / (math.log(dist.high) - math.log(dist.low))
            else:
                u = (value - dist.low) / (dist.high - dist.low)
            x[i] = min(1.0, max(0.0, u))
        return x

    def _decode(self, x: np.ndarray) -> dict[str, float]:
        params: dict[str, float] = {}
        for u, (name, dist) in zip(np.clip(x, 0.0, 1.0), self._space.items(), strict=True):
            if dist.log:
                lo, hi = math.log(dist.low), math.log(dist.high)
                value = math.exp(lo + float(u) * (hi - lo))
            else:
                value = dist.low + float(u) * (dist.high - dist.low)
            if dist.step is not None:
                value = dist.low + round((value - dist.low) / dist.step) * dist.step
            params[name] = min(dist.high, max(dist.low, value))
        return params

    def _same_point(self, candidate: Any, trial: FrozenTrial) -> bool:
        """Whether the trial ran the parameters decoded from the candidate (not e.g. a fixed override)."""
        decoded = self._decode(np.asarray(candidate.value, dtype=float))
        return _close(decoded, trial.params)


_MAX_REPEATS = 100


def _point_key(params: Mapping[str, Any]) -> tuple[tuple[str, float], ...]:
    return tuple(sorted((name, round(float(v), 12)) for name, v in params.items()))


def _close(expected: Mapping[str, float], actual: Mapping[str, Any]) -> bool:
    return all(
        name in actual and math.isclose(value, float(actual[name]), rel_tol=1e-12, abs_tol=1e-12)
        for name, value in expected.items()
    )
