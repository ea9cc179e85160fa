"""Distillation losses for heterogeneous fusion: the pivot (student) learns from fused source targets.

Position convention (shared by ``labels``, the target tensors and ``valid`` masks): index ``t`` of every
``[B, T, ...]`` tensor other than the logits refers to the *token at position t*. The student predicts
that token from its logits at ``t - 1`` (the standard causal shift, as in Hugging Face's causal-LM loss):

    logits[:, t - 1]  -->  labels[:, t], target_ids[:, t], target_probs[:, t], target_valid[:, t]

so ``labels[:, 0]``, the targets at position 0 and the logits at ``T - 1`` are never used. A position
takes part when ``labels[:, t] != -100`` (a response token); for the distillation term it must also have
``target_valid[:, t]``.

Both losses upcast the student logits to at least float32, select the response positions first, and never
build a tensor larger than ``[B, T, V]`` (no dense ``[B, T, V]`` target, no full softmax in ULD: top-k of
the logits and a log-sum-exp suffice). Targets and teacher probabilities are constants (detached).
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor

from evomerge.errors import ConfigError

__all__ = ["IGNORE_INDEX", "distill_loss", "uld_loss"]

IGNORE_INDEX = -100


def _check_logits_labels(student_logits: Tensor, labels: Tensor) -> tuple[int, int, int]:
    if student_logits.dim() != 3:
        raise ValueError(f"student_logits must be [B, T, V], got shape {tuple(student_logits.shape)}")
    batch, length, vocab = student_logits.shape
    if labels.shape != (batch, length):
        raise ValueError(f"labels must be [{batch}, {length}], got shape {tuple(labels.shape)}")
    return batch, length, vocab


def _work_dtype(t: Tensor) -> torch.dtype:
    return torch.promote_types(t.dtype, torch.float32)


def _zero_like_graph(x: Tensor) -> Tensor:
    """A 0 that stays connected to ``x``'s graph (so ``backward`` works on an empty selection)."""
    return x.sum() * 0.0


def distill_loss(
    student_logits: Tensor,
    labels: Tensor,
    target_ids: Tensor,
    target_probs: Tensor,
    target_valid: Tensor,
    *,
    lam: float = 0.9,
    kind: Literal["kl", "ce"] = "kl",
    temperature: float = 1.0,
) -> tuple[Tensor, dict[str, Tensor]]:
    """``lam * CLM + (1 - lam) * D``: gold next-token loss plus distillation on a sparse fused target.

    Shapes: ``student_logits`` ``[B, T, V]``, ``labels`` ``[B, T]`` (``-100``: not a response token),
    ``target_ids`` ``[B, T, K]`` (pivot ids, negative: empty slot), ``target_probs`` ``[B, T, K]``,
    ``target_valid`` ``[B, T]``; positions follow the module's convention (target at ``t`` is the
    distribution of the token at ``t``, predicted from the logits at ``t - 1``).

    - ``CLM``: mean cross-entropy of the gold label over all response positions.
    - ``D``: mean over the response positions with a valid target (others only feed ``CLM``) of
      ``kind="ce"``: ``-sum_k p_k log q(id_k)``, or ``kind="kl"``: ``sum_k p_k (log p_k - log q(id_k))``
      (KL(target || student) on the target's support, i.e. the CE minus the target entropy), where ``p``
      is the target renormalised over its non-empty slots and ``q = softmax(logits / temperature)``.
      Target ids should be unique per row (the fusion functions guarantee it); the temperature applies to
      the student only (the target is used as given) and ``D`` is multiplied by ``temperature**2`` to
      keep gradient magnitudes comparable across temperatures (Hinton et al., 2015).

    Returns ``(loss, parts)`` with detached ``parts``: ``clm``, ``distill`` (``D``, already scaled),
    ``n_response`` and ``n_distill`` (position counts). Empty selections give 0, not NaN.
    """
    if not (isinstance(lam, int | float) and 0.0 <= lam <= 1.0):
        raise ConfigError(f"distill_loss lam must be in [0, 1], got {lam!r}")
    if kind not in ("kl", "ce"):
        raise ConfigError(f"distill_loss kind must be 'kl' or 'ce', got {kind!r}")
    if not (isinstance(temperature, int | float) and math.isfinite(temperature) and temperature > 0):
        raise ConfigError(f"distill_loss temperature must be a positive number, got {temperature!r}")
    batch, length, vocab = _check_logits_labels(student_logits, labels)
    if target_ids.dim() != 3 or target_ids.shape[:2] != (batch, length):
        raise ValueError(f"target_ids must be [{batch}, {length}, K], got shape {tuple(target_ids.shape)}")
    if target_probs.shape != target_ids.shape:
        raise ValueError(
            f"target_probs has shape {tuple(target_probs.shape)}, target_ids {tuple(target_ids.shape)}"
        )
    if target_valid.shape != (batch, length):
        raise ValueError(f"target_valid must be [{batch}, {length}], got shape {tuple(target_valid.shape)}")

    dtype = _work_dtype(student_logits)
    response = labels[:, 1:] != IGNORE_INDEX  # [B, T-1]: token t+1 is a response token
    x = student_logits[:, :-1][response].to(dtype)  # [N, V]: logits predicting response tokens
    gold = labels[:, 1:][response].long()  # [N]
    ids = target_ids[:, 1:][response].long()  # [N, K]
    probs = target_probs[:, 1:][response].detach().to(dtype)  # [N, K]
    has_target = target_valid[:, 1:][response].bool()  # [N]
    n_response = gold.numel()
    if n_response and bool(((gold < 0) | (gold >= vocab)).any() | (ids >= vocab).any()):
        raise ValueError(f"labels or target ids outside the student vocabulary [0, {vocab})")

    # CLM: -log softmax(x)[gold] = logsumexp(x) - x[gold]
    lse = torch.logsumexp(x, dim=-1)  # [N]
    clm = (lse - x.gather(1, gold[:, None]).squeeze(1)).mean() if n_response else _zero_like_graph(x)

    # D on the sparse target
    filled = ids >= 0
    probs = torch.where(filled, probs, 0.0)
    mass = probs.sum(dim=-1)
    use = has_target & torch.isfinite(mass) & (mass > 0)  # [N]
    probs = torch.where(use[:, None], probs / mass.clamp_min(torch.finfo(dtype).tiny)[:, None], 0.0)
    if temperature == 1.0:
        xs, lse_s = x, lse
    else:
        xs = x / temperature
        lse_s = torch.logsumexp(xs, dim=-1)
    student_logp = xs.gather(1, ids.clamp_min(0)) - lse_s[:, None]  # [N, K]
    positive = probs > 0
    cross = torch.where(positive, probs * student_logp, 0.0)  # 0 * -inf guarded
    per_position = -cross.sum(dim=-1)
    if kind == "kl":
        per_position = per_position + torch.special.xlogy(probs, probs).sum(dim=-1)
    per_position = torch.where(use, per_position, 0.0)
    n_distill = use.sum()
    distill = (temperature**2) * per_position.sum() / n_distill.clamp_min(1).to(dtype)

    loss = lam * clm + (1.0 - lam) * distill
    parts = {
        "clm": clm.detach(),
        "distill": distill.detach(),
        "n_response": torch.tensor(n_response, device=x.device),
        "n_distill": n_distill.detach(),
    }
    return loss, parts


def uld_loss(
    student_logits: Tensor,
    teacher_probs: Tensor,
    valid: Tensor,
    labels: Tensor,
    *,
    top: int = 10,
) -> Tensor:
    """Universal Logit Distillation (Boizard et al., 2024): a tokenizer-free distribution distance.

    At every response position ``t`` with ``valid[:, t]`` (module convention: teacher distribution of the
    token at ``t``, student logits at ``t - 1``), sort the student's probabilities and the teacher's
    ``[K]`` probabilities descending, keep the first ``top`` of each, zero-pad both to ``top`` and sum the
    absolute differences (the closed-form Wasserstein-1 distance between sorted distributions); the loss
    is the mean over those positions (0 when there are none).

    Token identities are never used, so no vocabulary mapping is needed. Neither side is renormalised
    after truncation: the student's values are its full-softmax probabilities, the teacher's are used as
    given (empty teacher slots must hold 0). InfiFusion v3 also z-score standardises logits first; that is
    not done here. ``teacher_probs`` ``[B, T, K]`` is treated as a constant.
    """
    if isinstance(top, bool) or not isinstance(top, int) or top < 1:
        raise ConfigError(f"uld_loss top must be a positive integer, got {top!r}")
    batch, length, vocab = _check_logits_labels(student_logits, labels)
    if teacher_probs.dim() != 3 or teacher_probs.shape[:2] != (batch, length):
        raise ValueError(
            f"teacher_probs must be [{batch}, {length}, K], got shape {tuple(teacher_probs.shape)}"
        )
    if valid.shape != (batch, length):
        raise ValueError(f"valid must be [{batch}, {length}], got shape {tuple(valid.shape)}")

    dtype = _work_dtype(student_logits)
    use = (labels[:, 1:] != IGNORE_INDEX) & valid[:, 1:].bool()  # [B, T-1]
    x = student_logits[:, :-1][use].to(dtype)  # [N, V]
    n = x.shape[0]
    if n == 0:
        return _zero_like_graph(x)
    k_student = min(top, vocab)
    # softmax is monotone: the top probabilities are exp(top logits - logsumexp), no [N, V] softmax
    student = torch.exp(x.topk(k_student, dim=-1).values - torch.logsumexp(x, dim=-1, keepdim=True))
    teacher = teacher_probs[:, 1:][use].detach().to(dtype)  # [N, K]
    teacher = teacher.sort(dim=-1, descending=True).values[:, :top]
    student = torch.nn.functional.pad(student, (0, top - student.shape[1]))
    teacher = torch.nn.functional.pad(teacher, (0, top - teacher.shape[1]))
    return (student - teacher).abs().sum(dim=-1).mean()
