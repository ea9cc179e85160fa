"""CMA-ES that starts where the sweep's seeds say it should, not at the centre of the box.

Optuna's CMA-ES starts its search distribution at the centre of the search space unless told an ``x0``.
In a merge search the centre (every weight halfway, every expert mixed in) is often the worst region:
tiny and small models interfere, and the good recipes sit near an expert or a uniform merge, which the
sweep enqueues as seeds. :class:`SeededCmaEsSampler` waits for them: when CMA-ES first needs its
distribution (the first trial that is not an enqueued seed, so with one worker after every seed has
been scored), it centres it on the best complete trial so far, with a step size of ``sigma0`` (a share of
each parameter's range; Optuna's default is 1/6). Later generations, and a resumed sweep, continue from
the optimizer state Optuna stores in the study, as before. With no complete trial yet (a Ray pool whose
seeds are all still running) it starts at the centre, as plain CMA-ES does.
"""

from __future__ import annotations

import math
from typing import Any

import optuna
from optuna.distributions import BaseDistribution, FloatDistribution, IntDistribution
from optuna.study import StudyDirection
from optuna.trial import FrozenTrial, TrialState

from evomerge.optimizer.method_choice import LearnedChoiceCmaEsSampler

__all__ = ["SeededCmaEsSampler", "best_start"]


def best_start(
    trials: list[FrozenTrial], search_space: dict[str, BaseDistribution], direction: StudyDirection
) -> tuple[int, dict[str, Any]] | None:
    """The number and params of the best complete trial that set every parameter of ``search_space``
    (numeric ones clipped into their bounds), or None when there is none."""
    candidates = [
        t
        for t in trials
        if t.state == TrialState.COMPLETE
        and t.value is not None
        and math.isfinite(t.value)
        and all(k in t.params for k in search_space)
    ]
    if not candidates:
        return None
    sign = 1.0 if direction == StudyDirection.MAXIMIZE else -1.0
    best = max(candidates, key=lambda t: (sign * float(t.value or 0.0), -t.number))
    start: dict[str, Any] = {}
    for k, d in search_space.items():
        v = best.params[k]
        if isinstance(d, FloatDistribution | IntDistribution):
            v = min(max(v, d.low), d.high)
        start[k] = v
    return best.number, start


class SeededCmaEsSampler(LearnedChoiceCmaEsSampler):
    """:class:`optuna.samplers.CmaEsSampler` whose first distribution is centred on the best complete
    trial (the best seed); ``sigma0`` is the initial step size as a share of each parameter's range.
    Categorical parameters (the method) are learned (:mod:`evomerge.optimizer.method_choice`)."""

    def __init__(self, *, sigma0: float = 0.1, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.start_sigma = sigma0
        self._study: optuna.Study | None = None
        self.started_from: int | None = None
        """The trial the distribution was centred on (None: not yet, or the centre of the box)."""

    def sample_relative(
        self, study: optuna.Study, trial: FrozenTrial, search_space: dict[str, BaseDistribution]
    ) -> dict[str, Any]:
        self._study = study
        try:
            return super().sample_relative(study, trial, search_space)
        finally:
            self._study = None

    def _init_optimizer(self, trans: Any, direction: StudyDirection, *args: Any, **kwargs: Any) -> Any:
        # Called only when the study holds no optimizer state yet: the first generation.
        # Optuna stores the optimizer only once the first generation is told, so this runs for every
        # trial of that generation: the start is chosen once (per process) and kept.
        study = self._study
        if study is not None and self.started_from is None:
            trials = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
            found = best_start(list(trials), dict(trans._search_space), direction)
            if found is not None:
                self.started_from, self._x0 = found
                # (Optuna 4.9 deprecated the sigma0 argument, not the attribute the optimizer reads)
                self._sigma0 = self.start_sigma
        return super()._init_optimizer(trans, direction, *args, **kwargs)
