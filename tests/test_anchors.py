"""The anchor-question estimator (evomerge/optimizer/anchors.py)."""

from __future__ import annotations

import numpy as np
import pytest

from evomerge.optimizer.anchors import Anchors, estimate_mean, fit_anchors


def grouped(groups: list[tuple[int, list[float]]]) -> np.ndarray:
    """A models x questions matrix: each group is (question count, the scores of every model on it)."""
    cols = [pattern for count, pattern in groups for _ in range(count)]
    return np.array(cols, dtype=float).T


def test_one_anchor_per_pattern_weighted_by_its_share() -> None:
    groups = [(10, [1, 1, 0, 0]), (5, [0, 1, 1, 0]), (25, [0, 0, 0, 1])]
    anchors = fit_anchors(grouped(groups), k=3, seed=0)
    assert len(anchors.indices) == 3
    # one anchor in each group, weight = the group's share of the 40 questions
    starts = [0, 10, 15, 40]
    by_group = {}
    for idx, w in zip(anchors.indices, anchors.weights, strict=True):
        g = next(j for j in range(3) if starts[j] <= idx < starts[j + 1])
        by_group[g] = w
    assert by_group == {0: pytest.approx(10 / 40), 1: pytest.approx(5 / 40), 2: pytest.approx(25 / 40)}
    # a new model that answers by group is estimated exactly from three questions
    new = [1.0] * 10 + [0.0] * 5 + [1.0] * 25
    estimate = anchors.estimate([new[i] for i in anchors.indices])
    assert estimate == pytest.approx(np.mean(new))


def test_no_more_anchors_than_distinct_patterns_and_reproducible() -> None:
    matrix = grouped([(7, [1, 0, 1]), (3, [0, 0, 1])])
    anchors = fit_anchors(matrix, k=10, seed=3)
    assert len(anchors.indices) == 2 and sum(anchors.weights) == pytest.approx(1.0)
    rng = np.random.default_rng(0)
    noisy = (rng.random((12, 60)) < 0.4).astype(float)
    assert fit_anchors(noisy, 8, seed=1) == fit_anchors(noisy, 8, seed=1)
    assert len(fit_anchors(noisy, 8, seed=1).indices) == 8


def test_anchors_rank_like_the_full_set_better_than_chance() -> None:
    """Models of one family: questions have difficulties, models abilities (a Rasch-like world). Anchors
    fit on 20 models rank 40 new ones closer to their full means than a random subset of equal size."""
    rng = np.random.default_rng(7)
    difficulty = rng.normal(0, 1.5, size=200)

    def models(n: int) -> np.ndarray:
        ability = rng.normal(0, 1, size=(n, 1))
        p = 1 / (1 + np.exp(-(ability - difficulty)))
        return (rng.random((n, 200)) < p).astype(float)

    fit, new = models(20), models(40)
    full = new.mean(1)
    anchors = fit_anchors(fit, 10, seed=0)
    est = np.array([anchors.estimate(row[list(anchors.indices)]) for row in new])

    def rank_corr(a: np.ndarray, b: np.ndarray) -> float:
        ra, rb = a.argsort().argsort(), b.argsort().argsort()
        return float(np.corrcoef(ra, rb)[0, 1])

    randoms = [rank_corr(new[:, rng.choice(200, 10, replace=False)].mean(1), full) for _ in range(50)]
    assert rank_corr(est, full) > float(np.mean(randoms))


def test_bad_inputs_and_the_mean() -> None:
    with pytest.raises(ValueError):
        fit_anchors(np.zeros((3, 0)), 2)
    with pytest.raises(ValueError):
        fit_anchors(np.zeros((3, 4)), 0)
    with pytest.raises(ValueError):
        Anchors((1, 2), (0.5, 0.5)).estimate([1.0])
    assert estimate_mean({"a": 0.2, "b": 0.6}) == pytest.approx(0.4)
    assert estimate_mean({"a": 0.2, "b": 0.6}, {"a": 3.0, "b": 1.0}) == pytest.approx(0.3)
