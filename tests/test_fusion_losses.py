"""Fusion of aligned source distributions (evomerge.fusion.fuse) and the distillation losses.

Expected values are computed independently with plain Python floats (``math``) or dense tensors.
"""

from __future__ import annotations

import itertools
import math
from typing import Literal

import pytest
import torch

from evomerge.errors import ConfigError
from evomerge.fusion.fuse import (
    FUSIONS,
    FusedTarget,
    SourceTargets,
    fuse_avg_ce,
    fuse_entropy,
    fuse_min_ce,
    get_fusion,
)
from evomerge.fusion.losses import distill_loss, uld_loss

TOL = 1e-6


def backward(loss: torch.Tensor) -> None:
    torch.autograd.backward(loss)


def src(rows: list[list[tuple[int, float]]], valid: list[bool], ce: float) -> SourceTargets:
    """A source from per-position ``(pivot id, unnormalised probability)`` slots (log taken here)."""
    ids = torch.tensor([[i for i, _ in row] for row in rows], dtype=torch.long)
    logprobs = torch.tensor([[math.log(p) for _, p in row] for row in rows], dtype=torch.float64)
    return SourceTargets(ids=ids, logprobs=logprobs, valid=torch.tensor(valid), ce=ce)


def row(fused: FusedTarget, t: int) -> dict[int, float]:
    """Position ``t`` of a fused target as ``{id: prob}`` (padding dropped)."""
    return {
        int(i): float(p)
        for i, p in zip(fused.ids[t].tolist(), fused.probs[t].tolist(), strict=True)
        if i >= 0
    }


def assert_row(fused: FusedTarget, t: int, expected: dict[int, float]) -> None:
    got = row(fused, t)
    assert set(got) == set(expected), (got, expected)
    for k, v in expected.items():
        assert got[k] == pytest.approx(v, abs=TOL), (k, got, expected)


def normalise(d: dict[int, float]) -> dict[int, float]:
    total = sum(d.values())
    return {k: v / total for k, v in d.items()}


def softmax(xs: list[float]) -> list[float]:
    m = max(xs)
    es = [math.exp(x - m) for x in xs]
    return [e / sum(es) for e in es]


def check_invariants(fused: FusedTarget) -> None:
    """Valid rows sum to 1 with unique ids sorted by descending probability; others are pure padding."""
    for t in range(fused.ids.shape[0]):
        ids = fused.ids[t].tolist()
        probs = fused.probs[t].tolist()
        if bool(fused.valid[t]):
            real = [i for i in ids if i >= 0]
            assert len(real) == len(set(real))
            assert sum(probs) == pytest.approx(1.0, abs=TOL)
            assert probs == sorted(probs, reverse=True)
            assert all(p == 0 for i, p in zip(ids, probs, strict=True) if i < 0)
        else:
            assert all(i == -1 for i in ids) and all(p == 0 for p in probs)


# ---------------------------------------------------------------------------------------------- fusion


def test_min_ce_picks_lowest_ce_with_fallback_and_invalid_positions() -> None:
    # 4 positions: the better source (ce 1.0) is invalid at t=1; nobody is valid at t=3
    good = src([[(1, 0.6), (2, 0.2)]] * 4, [True, False, True, False], ce=1.0)
    bad = src([[(3, 0.3), (4, 0.1)]] * 4, [True, True, False, False], ce=2.0)
    for order in ([good, bad], [bad, good]):
        fused = fuse_min_ce(order)
        assert fused.valid.tolist() == [True, True, True, False]
        assert_row(fused, 0, {1: 0.75, 2: 0.25})
        assert_row(fused, 1, {3: 0.75, 4: 0.25})  # fallback to the next-best valid source
        assert_row(fused, 2, {1: 0.75, 2: 0.25})
        assert fused.ids.shape == (4, 2)
        check_invariants(fused)


def test_unmapped_slots_duplicates_and_all_unmapped_rows() -> None:
    # t=0: slot 1 unmapped -> renormalise over ids 4 and 6; t=1: two source tokens map to pivot id 3;
    # t=2: nothing mapped although valid -> treated as invalid, min_ce falls back to the other source
    a = src(
        [[(4, 0.2), (-1, 0.5), (6, 0.3)], [(3, 0.5), (3, 0.3), (5, 0.2)], [(-1, 0.5), (-1, 0.3), (-1, 0.2)]],
        [True, True, True],
        ce=0.5,
    )
    b = src([[(7, 1.0)], [(7, 1.0)], [(8, 0.5)]], [True, True, True], ce=3.0)
    fused = fuse_min_ce([a, b])
    assert_row(fused, 0, {4: 0.4, 6: 0.6})
    assert_row(fused, 1, {3: 0.8, 5: 0.2})
    assert_row(fused, 2, {8: 1.0})
    assert fused.ids.shape == (3, 3)  # k_out defaults to the largest K
    check_invariants(fused)
    only_a = fuse_min_ce([a])
    assert only_a.valid.tolist() == [True, True, False]
    check_invariants(only_a)


def test_avg_ce_weights_union_truncation_and_per_position_renormalisation() -> None:
    ce0, ce1 = 1.0, 2.0
    s0 = src([[(1, 0.7), (2, 0.3)]] * 3, [True, True, False], ce=ce0)
    s1 = src([[(2, 0.4), (3, 0.6)]] * 3, [True, False, False], ce=ce1)
    w0, w1 = softmax([math.exp(-ce0), math.exp(-ce1)])
    union = {1: w0 * 0.7, 2: w0 * 0.3 + w1 * 0.4, 3: w1 * 0.6}

    wide = fuse_avg_ce([s0, s1], k_out=4)
    assert wide.ids.shape == (3, 4)
    assert_row(wide, 0, union)  # weights already sum to 1: no renormalisation needed
    assert_row(wide, 1, {1: 0.7, 2: 0.3})  # only s0 valid: its weight is renormalised to 1
    assert wide.valid.tolist() == [True, True, False]
    check_invariants(wide)

    fused = fuse_avg_ce([s0, s1])  # default k_out = K = 2: keep the 2 most probable, renormalise
    top2 = dict(sorted(union.items(), key=lambda kv: -kv[1])[:2])
    assert fused.ids.shape == (3, 2)
    assert_row(fused, 0, normalise(top2))
    check_invariants(fused)


def test_entropy_weighting_favours_the_confident_source_per_position() -> None:
    # t=0: s0 confident, s1 uniform; t=1: the reverse
    s0 = src([[(1, 0.9), (2, 0.1)], [(1, 0.5), (2, 0.5)]], [True, True], ce=0.0)
    s1 = src([[(2, 0.5), (3, 0.5)], [(2, 0.95), (3, 0.05)]], [True, True], ce=0.0)

    def entropy(ps: list[float]) -> float:
        return -sum(p * math.log(p) for p in ps)

    for tau in (1.0, 0.5):
        fused = fuse_entropy([s0, s1], k_out=3, tau=tau)
        w = softmax([-entropy([0.9, 0.1]) / tau, -entropy([0.5, 0.5]) / tau])
        assert w[0] > w[1]
        assert_row(fused, 0, {1: w[0] * 0.9, 2: w[0] * 0.1 + w[1] * 0.5, 3: w[1] * 0.5})
        w = softmax([-entropy([0.5, 0.5]) / tau, -entropy([0.95, 0.05]) / tau])
        assert w[1] > w[0]
        assert_row(fused, 1, {1: w[0] * 0.5, 2: w[0] * 0.5 + w[1] * 0.95, 3: w[1] * 0.05})
        check_invariants(fused)
    # through the registry, tau bound by get_fusion
    sharp = get_fusion("entropy", tau=1e-3)([s0, s1], k_out=3)
    assert row(sharp, 0) == pytest.approx({1: 0.9, 2: 0.1, 3: 0.0}, abs=1e-12)  # the other source: ~e^-400
    assert row(sharp, 1) == pytest.approx({1: 0.0, 2: 0.95, 3: 0.05}, abs=1e-12)
    with pytest.raises(ConfigError, match="tau"):
        fuse_entropy([s0, s1], tau=0.0)
    with pytest.raises(ConfigError, match="tau"):
        get_fusion("avg_ce", tau=1.0)


def test_registry_and_input_checks() -> None:
    assert set(FUSIONS) == {"min_ce", "avg_ce", "entropy"}
    assert get_fusion("avg_ce") is fuse_avg_ce
    with pytest.raises(ConfigError, match=r"unknown fusion 'nope'; known: avg_ce, entropy, min_ce"):
        get_fusion("nope")
    a = src([[(1, 1.0)]], [True], ce=1.0)
    b = src([[(1, 1.0)], [(2, 1.0)]], [True, True], ce=1.0)
    with pytest.raises(ValueError, match="number of positions"):
        fuse_avg_ce([a, b])
    with pytest.raises(ValueError, match="at least one source"):
        fuse_min_ce([])
    with pytest.raises(ConfigError, match="k_out"):
        fuse_min_ce([a], k_out=0)
    with pytest.raises(ValueError, match="logprobs"):
        SourceTargets(
            ids=torch.zeros(2, 3, dtype=torch.long),
            logprobs=torch.zeros(2, 2),
            valid=torch.ones(2, dtype=torch.bool),
            ce=1.0,
        )
    with pytest.raises(ValueError, match="ce"):
        SourceTargets(ids=a.ids, logprobs=a.logprobs, valid=a.valid, ce=float("nan"))


# ---------------------------------------------------------------------------------------------- losses


def make_batch(
    seed: int = 0, b: int = 2, t: int = 6, v: int = 7, k: int = 3
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random logits, labels with masked prompts, sparse targets with unique ids and some invalid rows."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(b, t, v, generator=g, dtype=torch.float64)
    labels = torch.randint(0, v, (b, t), generator=g)
    labels[0, :2] = -100
    labels[1, :3] = -100
    labels[1, -1] = -100
    ids = torch.stack([torch.randperm(v, generator=g)[:k] for _ in range(b * t)]).view(b, t, k)
    probs = torch.rand(b, t, k, generator=g, dtype=torch.float64) + 0.05
    ids[0, 3, -1] = -1  # an empty slot
    probs[0, 3, -1] = 0.0
    probs = probs / probs.sum(-1, keepdim=True)
    valid = torch.ones(b, t, dtype=torch.bool)
    valid[0, 4] = False
    return logits, labels, ids, probs, valid


def dense_reference(
    logits: torch.Tensor,
    labels: torch.Tensor,
    ids: torch.Tensor,
    probs: torch.Tensor,
    valid: torch.Tensor,
    kind: str,
    temperature: float,
) -> tuple[float, float]:
    """(CLM, D) with explicit loops and a dense target vector per position."""
    b, t, v = logits.shape
    clm_terms, d_terms = [], []
    for i in range(b):
        for j in range(1, t):
            if int(labels[i, j]) == -100:
                continue
            logp = torch.log_softmax(logits[i, j - 1], -1)
            clm_terms.append(-float(logp[int(labels[i, j])]))
            if not bool(valid[i, j]):
                continue
            dense = torch.zeros(v, dtype=torch.float64)
            for slot in range(ids.shape[-1]):
                if int(ids[i, j, slot]) >= 0:
                    dense[int(ids[i, j, slot])] += probs[i, j, slot]
            dense = dense / dense.sum()
            logq = torch.log_softmax(logits[i, j - 1] / temperature, -1)
            ce = -float((dense * logq).sum())
            ent = -float(sum(p * math.log(p) for p in dense.tolist() if p > 0))
            d_terms.append(temperature**2 * (ce - ent if kind == "kl" else ce))
    return sum(clm_terms) / len(clm_terms), sum(d_terms) / len(d_terms)


def test_distill_loss_lam1_equals_clm() -> None:
    logits, labels, ids, probs, valid = make_batch()
    loss, parts = distill_loss(logits, labels, ids, probs, valid, lam=1.0)
    expected = torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=-100
    )
    assert float(loss) == pytest.approx(float(expected), abs=1e-10)
    assert float(parts["clm"]) == pytest.approx(float(expected), abs=1e-10)
    assert int(parts["n_response"]) == int((labels[:, 1:] != -100).sum())


@pytest.mark.parametrize("kind", ["ce", "kl"])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_distill_loss_matches_dense_reference(kind: Literal["kl", "ce"], temperature: float) -> None:
    logits, labels, ids, probs, valid = make_batch()
    ref_clm, ref_d = dense_reference(logits, labels, ids, probs, valid, kind, temperature)
    loss0, parts = distill_loss(
        logits, labels, ids, probs, valid, lam=0.0, kind=kind, temperature=temperature
    )
    assert float(loss0) == pytest.approx(ref_d, abs=1e-10)
    assert float(parts["clm"]) == pytest.approx(ref_clm, abs=1e-10)
    # response positions 1..T-1 with a valid target: 4 + 2 in row 0 minus the invalid t=4 -> 3 + 2
    assert int(parts["n_distill"]) == int(((labels[:, 1:] != -100) & valid[:, 1:]).sum())
    mixed, _ = distill_loss(logits, labels, ids, probs, valid, lam=0.9, kind=kind, temperature=temperature)
    assert float(mixed) == pytest.approx(0.9 * ref_clm + 0.1 * ref_d, abs=1e-10)


def test_distill_loss_ignores_masked_positions_and_grads_only_at_response() -> None:
    logits, labels, ids, probs, valid = make_batch()
    base, _ = distill_loss(logits, labels, ids, probs, valid, lam=0.5)
    # change everything the loss must not see: targets/logits feeding masked tokens, the last logits
    logits2, ids2, probs2 = logits.clone(), ids.clone(), probs.clone()
    masked = labels == -100
    ids2[masked] = torch.arange(ids.shape[-1])
    probs2[masked] = 1.0 / ids.shape[-1]
    feeds_masked = torch.zeros_like(masked)
    feeds_masked[:, :-1] = masked[:, 1:]
    feeds_masked[:, -1] = True
    logits2[feeds_masked] = 5.0 * torch.randn(int(feeds_masked.sum()), logits.shape[-1], dtype=torch.float64)
    again, _ = distill_loss(logits2, labels, ids2, probs2, valid, lam=0.5)
    assert float(again) == pytest.approx(float(base), abs=1e-12)

    x = logits.clone().requires_grad_(True)
    loss, _ = distill_loss(x, labels, ids, probs, valid, lam=0.5, kind="kl")
    backward(loss)
    assert x.grad is not None
    per_position = x.grad.abs().sum(-1)  # [B, T]
    assert bool((per_position[feeds_masked] == 0).all())
    assert bool((per_position[~feeds_masked] > 0).all())


def test_kl_zero_when_student_equals_full_support_target() -> None:
    v = 4
    target = torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=torch.float64)
    logits = torch.zeros(1, 3, v, dtype=torch.float64)
    logits[0, :2] = torch.log(target) + 1.7  # shift-invariant
    labels = torch.tensor([[-100, 2, 3]])
    perm = torch.tensor([2, 0, 3, 1])  # slot order is irrelevant
    ids = perm.expand(1, 3, v).clone()
    probs = target[perm].expand(1, 3, v).clone()
    valid = torch.ones(1, 3, dtype=torch.bool)
    loss, parts = distill_loss(logits, labels, ids, probs, valid, lam=0.0, kind="kl")
    assert abs(float(loss)) < 1e-12
    ce_loss, _ = distill_loss(logits, labels, ids, probs, valid, lam=0.0, kind="ce")
    entropy = -sum(p * math.log(p) for p in target.tolist())
    assert float(ce_loss) == pytest.approx(entropy, abs=1e-12)
    assert int(parts["n_distill"]) == 2


def test_distill_loss_edge_cases_and_bad_options() -> None:
    logits, labels, ids, probs, valid = make_batch()
    x = logits.clone().requires_grad_(True)
    loss, parts = distill_loss(x, labels, ids, probs, torch.zeros_like(valid), lam=0.0)
    assert float(loss.detach()) == 0.0 and int(parts["n_distill"]) == 0
    backward(loss)  # connected to the graph even with nothing selected
    none = torch.full_like(labels, -100)
    loss, parts = distill_loss(logits, none, ids, probs, valid)
    assert float(loss) == 0.0 and not math.isnan(float(parts["clm"]))
    with pytest.raises(ConfigError, match="lam"):
        distill_loss(logits, labels, ids, probs, valid, lam=1.5)
    with pytest.raises(ConfigError, match="kind"):
        distill_loss(logits, labels, ids, probs, valid, kind="js")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="temperature"):
        distill_loss(logits, labels, ids, probs, valid, temperature=0.0)
    bad_ids = ids.clone()
    bad_ids[1, 4, 0] = logits.shape[-1]
    with pytest.raises(ValueError, match="vocabulary"):
        distill_loss(logits, labels, bad_ids, probs, valid)


def test_distill_loss_optimisation_reduces_loss() -> None:
    logits, labels, ids, probs, valid = make_batch(seed=3)
    x = logits.clone().float().requires_grad_(True)
    opt = torch.optim.Adam([x], lr=0.1)
    losses = []
    for _ in range(15):
        opt.zero_grad()
        loss, _ = distill_loss(x, labels, ids, probs.float(), valid, lam=0.5, kind="kl")
        backward(loss)
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.7 * losses[0]
    assert all(b <= a + 1e-6 for a, b in itertools.pairwise(losses))


def test_uld_zero_for_equal_sorted_distributions_and_hand_value() -> None:
    student = torch.tensor([0.2, 0.5, 0.3], dtype=torch.float64)
    logits = torch.log(student).expand(1, 2, 3).clone()
    labels = torch.tensor([[-100, 1]])
    valid = torch.ones(1, 2, dtype=torch.bool)
    # the teacher holds the same sorted values over a different "vocabulary" (K=4, one empty slot)
    same = torch.tensor([0.0, 0.3, 0.5, 0.2], dtype=torch.float64).expand(1, 2, 4)
    assert abs(float(uld_loss(logits, same, valid, labels))) < 1e-12
    # hand value: sorted student (0.5, 0.3, 0.2), sorted teacher (0.6, 0.1, 0) after zero-padding
    teacher = torch.tensor([0.1, 0.6], dtype=torch.float64).expand(1, 2, 2)
    assert float(uld_loss(logits, teacher, valid, labels, top=3)) == pytest.approx(0.1 + 0.2 + 0.2, abs=1e-12)
    assert float(uld_loss(logits, teacher, valid, labels, top=2)) == pytest.approx(0.1 + 0.2, abs=1e-12)
    # top larger than both sides: both zero-padded to 10, same value
    assert float(uld_loss(logits, teacher, valid, labels)) == pytest.approx(0.5, abs=1e-12)


def test_uld_permutation_invariance_masking_and_gradient() -> None:
    logits, labels, _, probs, valid = make_batch(seed=1, k=5)
    base = uld_loss(logits, probs, valid, labels, top=4)
    perm_k = torch.randperm(probs.shape[-1], generator=torch.Generator().manual_seed(0))
    assert float(uld_loss(logits, probs[..., perm_k], valid, labels, top=4)) == pytest.approx(float(base))
    perm_v = torch.randperm(logits.shape[-1], generator=torch.Generator().manual_seed(1))
    assert float(uld_loss(logits[..., perm_v], probs, valid, labels, top=4)) == pytest.approx(float(base))
    # hand loop: mean over response positions with a valid teacher
    terms = []
    for i in range(labels.shape[0]):
        for j in range(1, labels.shape[1]):
            if int(labels[i, j]) == -100 or not bool(valid[i, j]):
                continue
            s = sorted(torch.softmax(logits[i, j - 1], -1).tolist(), reverse=True)[:4]
            t = sorted(probs[i, j].tolist(), reverse=True)[:4]
            terms.append(sum(abs(a - b) for a, b in zip(s, t, strict=True)))
    assert float(base) == pytest.approx(sum(terms) / len(terms), abs=1e-12)

    x = logits.clone().requires_grad_(True)
    backward(uld_loss(x, probs, valid, labels, top=4))
    assert x.grad is not None and float(x.grad.abs().sum()) > 0
    assert float(x.grad[:, -1].abs().sum()) == 0.0
    x = logits.clone().requires_grad_(True)
    zero = uld_loss(x, probs, torch.zeros_like(valid), labels)
    backward(zero)
    assert float(zero.detach()) == 0.0
    with pytest.raises(ConfigError, match="top"):
        uld_loss(logits, probs, valid, labels, top=0)
