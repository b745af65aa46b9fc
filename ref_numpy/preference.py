"""Preference tuning: Direct Preference Optimization (Rafailov et al., 2023), its IPO variant
(Azar et al., 2023) and the conservative, label-smoothed one, each beside its backward.

A preference batch holds P pairs: one prompt, a chosen and a rejected completion. Both
sequences of a pair are rows of one batch ``[R, T]`` (``R = 2P``), adjacent: row ``2i`` is pair
i's chosen sequence, row ``2i + 1`` its rejected one, each ``prompt + completion`` with the
prompt's labels (and padding) at ``IGNORE_INDEX``. Per pair::

    pi_c, pi_r    log pi(completion | prompt) under the policy, summed over the completion's
                  tokens (``sequence_logps_forward``)
    ref_c, ref_r  the same under the reference policy (``reference_logps``)
    h = beta * ((pi_c - ref_c) - (pi_r - ref_r))
    sigmoid:  -(1 - eps) * log sigmoid(h) - eps * log sigmoid(-h)      (eps = label smoothing;
                                                                         0 is DPO itself)
    ipo:      (u - 1 / (2 beta))^2,   u = (pi_c - ref_c) / n_c - (pi_r - ref_r) / n_r

where ``n_c``, ``n_r`` count the completion tokens (IPO compares log-ratios per token, as its
authors and TRL do). The loss is the mean over pairs. A pair whose rows count no token is the
padding that fills a last batch and takes no part.

The reference is the starting policy. Under LoRA / QLoRA it is the same parameters with the
adapters off (``lora_scale = 0``), so no second model exists; under full fine-tuning it is a
frozen copy of the starting weights, or log-probabilities computed once before training.

Rewards are reported as TRL reports them: ``beta * (pi - ref)`` for chosen and rejected,
their margin, and the share of pairs whose chosen reward is the larger (``rewards``).
"""

from __future__ import annotations

from typing import Any, Literal

import numpy as np

from .layers import IGNORE_INDEX, check_shape
from .lora import has_lora
from .model import Params, model_backward, model_forward

LossType = Literal["sigmoid", "ipo"]
LOSS_TYPES: tuple[LossType, ...] = ("sigmoid", "ipo")


# --- log-probability of a completion --------------------------------------------------


def sequence_logps_forward(
    logits: np.ndarray, labels: np.ndarray
) -> tuple[np.ndarray, np.ndarray, Any]:
    """Summed log-probabilities of each row's counted tokens, and how many were counted.

    Position t predicts ``labels[t + 1]`` (as ``causal_lm_loss``), so the prompt's tokens and
    the padding, labelled ``IGNORE_INDEX``, add nothing.

    Args:
      logits: [R, T, V].
      labels: int [R, T]; ``IGNORE_INDEX`` (-100) where a token is not part of the completion.
    Returns:
      ``logps`` [R], ``counts`` int [R], and the cache.
    """
    check_shape("labels", labels, logits.shape[:2])
    z, targets = logits[:, :-1], labels[:, 1:]  # [R,T-1,V], [R,T-1]
    valid = targets != IGNORE_INDEX  # [R,T-1]
    if np.any(valid & ((targets < 0) | (targets >= logits.shape[-1]))):
        raise ValueError(f"labels: expected ids in [0, {logits.shape[-1]}) or {IGNORE_INDEX}")
    safe = np.where(valid, targets, 0)  # [R,T-1]
    m = z.max(axis=-1, keepdims=True)  # [R,T-1,1]
    lse = m[..., 0] + np.log(np.exp(z - m).sum(axis=-1))  # [R,T-1]
    picked = np.take_along_axis(z, safe[..., None], axis=-1)[..., 0]  # [R,T-1]
    logps = ((picked - lse) * valid).sum(axis=1)  # [R,T-1] -> [R]
    return logps, valid.sum(axis=1), (logits.shape, lse, safe, valid, z)


def sequence_logps_backward(dlogps: np.ndarray, cache: Any) -> np.ndarray:
    """``dlogits[r, t] = dlogps[r] * valid[r, t] * (onehot(target) - softmax(logits[r, t]))``;
    the last position predicts nothing and gets zero. [R] -> [R, T, V]."""
    shape, lse, safe, valid, z = cache
    d = -np.exp(z - lse[..., None])  # -softmax, [R,T-1,V]
    np.put_along_axis(d, safe[..., None], np.take_along_axis(d, safe[..., None], -1) + 1.0, -1)
    dlogits = np.zeros(shape, dtype=z.dtype)  # [R,T,V]
    dlogits[:, :-1] = d * (valid * dlogps[:, None])[..., None]  # [R,T-1,V]
    return dlogits


# --- the preference loss over pairs ---------------------------------------------------


def _log_sigmoid(h: np.ndarray) -> np.ndarray:
    """``log sigmoid(h) = -log(1 + exp(-h))``, without overflow for large ``|h|``."""
    return -np.logaddexp(0.0, -h)


def _sigmoid(h: np.ndarray) -> np.ndarray:
    return np.exp(_log_sigmoid(h))


def check_preference_args(beta: float, loss_type: str, label_smoothing: float) -> None:
    """Raise ValueError naming the argument when ``beta``, ``loss_type`` or
    ``label_smoothing`` is out of range."""
    if not beta > 0:
        raise ValueError(f"beta: expected > 0, got {beta}")
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type: expected one of {', '.join(LOSS_TYPES)}, got {loss_type!r}")
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing: expected 0 <= eps < 0.5, got {label_smoothing}")
    if label_smoothing and loss_type != "sigmoid":
        raise ValueError(f"label_smoothing: applies to the sigmoid loss, not {loss_type!r}")


def preference_loss_forward(
    logps: np.ndarray,
    ref_logps: np.ndarray,
    counts: np.ndarray,
    *,
    beta: float,
    loss_type: LossType = "sigmoid",
    label_smoothing: float = 0.0,
) -> tuple[float, Any]:
    """The mean preference loss over the pairs of a batch.

    Args:
      logps: [R] policy log-probabilities, rows ``2i`` chosen and ``2i + 1`` rejected.
      ref_logps: [R] the reference policy's.
      counts: int [R] completion tokens per row; a pair with a row of 0 is padding.
      beta: the strength of the KL penalty to the reference (DPO's beta, IPO's tau).
      loss_type: ``"sigmoid"`` (DPO, conservative with ``label_smoothing``) or ``"ipo"``.
      label_smoothing: eps, the assumed probability that a pair's labels are flipped.
    Returns:
      The mean loss over real pairs (0.0 when there is none) and the cache.
    """
    check_preference_args(beta, loss_type, label_smoothing)
    ratio = logps - ref_logps  # [R] log pi / pi_ref per sequence
    valid = (counts[0::2] > 0) & (counts[1::2] > 0)  # [P]
    n = max(int(valid.sum()), 1)
    if loss_type == "sigmoid":
        h = beta * (ratio[0::2] - ratio[1::2])  # [P]
        eps = label_smoothing
        per_pair = -(1 - eps) * _log_sigmoid(h) - eps * _log_sigmoid(-h)  # [P]
        dh = -(1 - eps) * _sigmoid(-h) + eps * _sigmoid(h)  # [P] d per_pair / dh
        dchosen, drejected = beta * dh, -beta * dh  # [P] d per_pair / d ratio
    else:
        nc, nr = np.maximum(counts[0::2], 1), np.maximum(counts[1::2], 1)  # [P]
        u = ratio[0::2] / nc - ratio[1::2] / nr  # [P] per-token log-ratio difference
        per_pair = (u - 1 / (2 * beta)) ** 2  # [P]
        du = 2 * (u - 1 / (2 * beta))  # [P]
        dchosen, drejected = du / nc, -du / nr  # [P]
    loss = float((per_pair * valid).sum() / n)
    return loss, (dchosen * valid / n, drejected * valid / n)


def preference_loss_backward(dloss: float, cache: Any) -> np.ndarray:
    """d loss / d logps [R] (rows interleaved as the input); ``ref_logps`` gets none."""
    dchosen, drejected = cache
    dlogps = np.empty(2 * dchosen.shape[0], dtype=dchosen.dtype)  # [R]
    dlogps[0::2], dlogps[1::2] = dloss * dchosen, dloss * drejected
    return dlogps


def rewards(
    logps: np.ndarray, ref_logps: np.ndarray, counts: np.ndarray, beta: float
) -> dict[str, float]:
    """TRL's metrics, means over real pairs: ``rewards/chosen`` and ``rewards/rejected``
    (``beta * (pi - ref)``), ``rewards/margins`` (chosen minus rejected),
    ``rewards/accuracies`` (chosen reward strictly larger), ``logps/chosen`` and
    ``logps/rejected`` (the policy's summed log-probabilities)."""
    valid = (counts[0::2] > 0) & (counts[1::2] > 0)  # [P]
    n = max(int(valid.sum()), 1)
    reward = beta * (logps - ref_logps)  # [R]
    chosen, rejected = reward[0::2], reward[1::2]  # [P]

    def mean(x: np.ndarray) -> float:
        return float((x * valid).sum() / n)

    return {
        "rewards/chosen": mean(chosen),
        "rewards/rejected": mean(rejected),
        "rewards/accuracies": mean((chosen > rejected).astype(np.float64)),
        "rewards/margins": mean(chosen - rejected),
        "logps/chosen": mean(logps[0::2]),
        "logps/rejected": mean(logps[1::2]),
    }


# --- the whole model ------------------------------------------------------------------


def reference_logps(
    params: Params,
    cfg: Any,
    ids: np.ndarray,
    labels: np.ndarray,
    *,
    ref_params: Params | None = None,
    attention_mask_2d: np.ndarray | None = None,
) -> np.ndarray:
    """The reference policy's ``logps`` [R] of rows ``ids`` [R, T].

    With adapters in ``params`` the reference is ``params`` with the adapters off
    (``lora_scale = 0``: each adapted projection is its base ``x @ W + b``). Without adapters
    (full fine-tuning) it is ``ref_params``, a frozen copy of the starting weights.
    """
    if has_lora(params):
        ref, scale = params, 0.0
    elif ref_params is not None:
        ref, scale = ref_params, 0.0
    else:
        raise ValueError(
            "ref_params: full fine-tuning needs the starting weights as the reference "
            "(or reference log-probabilities computed before training)"
        )
    logits, _ = model_forward(
        ref, cfg, ids, attention_mask_2d=attention_mask_2d, lora_scale=scale
    )  # [R,T,V]
    return sequence_logps_forward(logits, labels)[0]  # [R]


def preference_loss_and_grads(
    params: Params,
    cfg: Any,
    ids: np.ndarray,
    labels: np.ndarray,
    *,
    beta: float,
    loss_type: LossType = "sigmoid",
    label_smoothing: float = 0.0,
    lora_scale: float = 0.0,
    ref_params: Params | None = None,
    ref_logps: np.ndarray | None = None,
    attention_mask_2d: np.ndarray | None = None,
    dropout: dict[str, np.ndarray] | None = None,
) -> tuple[float, dict[str, float], Params]:
    """The preference loss of a batch of pairs, TRL's metrics, and the gradients.

    Args:
      params: the policy (adapters, if any, are what trains).
      ids, labels: int [R, T], pairs as adjacent rows (see the module docstring).
      ref_logps: [R] reference log-probabilities computed before; default: computed here
        (``reference_logps``, without dropout).
      lora_scale, dropout, attention_mask_2d: as ``model_forward``, for the policy.
    Returns:
      ``(loss, metrics, grads)``: grads of the trainable leaves, as ``model_backward``.
    """
    if ids.shape[0] % 2:
        raise ValueError(f"ids: expected rows in pairs (chosen, rejected), got {ids.shape[0]}")
    if ref_logps is None:
        ref_logps = reference_logps(
            params, cfg, ids, labels, ref_params=ref_params, attention_mask_2d=attention_mask_2d
        )  # [R]
    logits, cache = model_forward(
        params,
        cfg,
        ids,
        attention_mask_2d=attention_mask_2d,
        lora_scale=lora_scale,
        dropout=dropout,
    )  # [R,T,V]
    logps, counts, lcache = sequence_logps_forward(logits, labels)  # [R], [R]
    loss, pcache = preference_loss_forward(
        logps,
        ref_logps,
        counts,
        beta=beta,
        loss_type=loss_type,
        label_smoothing=label_smoothing,
    )
    dlogits = sequence_logps_backward(preference_loss_backward(1.0, pcache), lcache)  # [R,T,V]
    metrics = rewards(logps, ref_logps, counts, beta)
    return loss, metrics, model_backward(dlogits, cache, cfg)
