"""Anchor questions: a few dev questions whose answers predict a candidate's full dev mean.

Candidates of one sweep are close relatives: most questions are answered right by the same models and
wrong by the same models. Questions with the same *correctness pattern* (the vector of 0/1 scores of
the candidates scored so far) carry the same information, so one of them can stand for all (the
anchor-point estimator of tinyBenchmarks, Polo et al. 2024; Mergenetic ships the IRT variant).

:func:`fit_anchors` clusters a task's questions by their patterns over the already-scored models
(k-means, seeded, on the columns of the 0/1 matrix), takes in each cluster the question nearest its
centre as the anchor and the cluster's share of the questions as its weight. A new candidate is scored
on the anchors only, and ``sum_c weight_c * score(anchor_c)`` estimates its score on the whole task;
the task estimates are combined with the task weights, as the fitness is.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

__all__ = ["Anchors", "estimate_mean", "fit_anchors"]


@dataclass(frozen=True)
class Anchors:
    """One task's anchors: question indices (into the columns it was fit on) and their weights (sum 1)."""

    indices: tuple[int, ...]
    weights: tuple[float, ...]

    def estimate(self, scores: Sequence[float]) -> float:
        """The task score estimated from the scores of the anchors (in the order of ``indices``)."""
        if len(scores) != len(self.indices):
            raise ValueError(f"expected {len(self.indices)} anchor scores, got {len(scores)}")
        return float(sum(w * s for w, s in zip(self.weights, scores, strict=True)))


def _kmeans(points: np.ndarray, k: int, rng: np.random.Generator, iterations: int = 50) -> np.ndarray:
    """Cluster labels of ``points`` (rows): k-means++ start, then Lloyd's iterations."""
    n = len(points)
    centres = [points[int(rng.integers(n))]]
    for _ in range(1, k):
        d2 = np.min([((points - c) ** 2).sum(1) for c in centres], axis=0)
        total = float(d2.sum())
        if total <= 0.0:  # fewer distinct points than clusters: the rest start on existing ones
            centres.append(points[int(rng.integers(n))])
            continue
        centres.append(points[int(rng.choice(n, p=d2 / total))])
    c = np.array(centres, dtype=float)
    labels = np.zeros(n, dtype=int)
    for step in range(iterations):
        d = ((points[:, None, :] - c[None, :, :]) ** 2).sum(-1)
        new = d.argmin(1)
        if step > 0 and np.array_equal(new, labels):
            break
        labels = new
        for j in range(k):
            members = points[labels == j]
            if len(members):
                c[j] = members.mean(0)
    return labels


def fit_anchors(patterns: Sequence[Sequence[float]] | np.ndarray, k: int, *, seed: int = 0) -> Anchors:
    """Anchors for one task from ``patterns`` (rows: models already scored; columns: the task's
    questions; entries: question scores in [0, 1]). ``k`` anchors at most (fewer when fewer distinct
    patterns exist: identical questions need no second anchor)."""
    matrix = np.asarray(patterns, dtype=float)
    if matrix.ndim != 2 or matrix.shape[1] == 0:
        raise ValueError("patterns must be a models x questions matrix with at least one question")
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    points = matrix.T  # one row per question
    n = len(points)
    distinct = len({tuple(row) for row in points.tolist()})
    k = min(k, n, distinct)
    labels = _kmeans(points, k, np.random.default_rng(seed))
    indices: list[int] = []
    weights: list[float] = []
    for j in sorted(set(labels.tolist())):
        members = np.flatnonzero(labels == j)
        centre = points[members].mean(0)
        nearest = members[int(((points[members] - centre) ** 2).sum(1).argmin())]
        indices.append(int(nearest))
        weights.append(len(members) / n)
    order = np.argsort(indices)
    return Anchors(tuple(indices[i] for i in order), tuple(weights[i] for i in order))


def estimate_mean(estimates: Mapping[str, float], task_weights: Mapping[str, float] | None = None) -> float:
    """The fitness estimate: per-task estimates combined with the task weights (default equal)."""
    weights = {t: (task_weights or {}).get(t, 1.0) for t in estimates}
    total = sum(weights.values())
    return float(sum(weights[t] * v for t, v in estimates.items()) / total) if total > 0 else 0.0
