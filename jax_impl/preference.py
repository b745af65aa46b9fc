"""Mirror of ``ref_numpy/preference.py``: the DPO / IPO / conservative losses in jnp.

The engine differentiates these with JAX; the spec writes each backward out. Pairs are
adjacent rows of one batch ``[R, T]`` (row ``2i`` chosen, ``2i + 1`` rejected), so a device
that holds a pair's chosen sequence holds its rejected one too, under any split of the rows.

For gradient accumulation the loss comes back as a sum over the real pairs of a micro-batch
and their count (``preference_loss_sum``), and the reported metrics as sums
(``reward_sums``): the step divides both by the pairs of the whole batch, so the gradient is
exactly that of the mean over all its pairs.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from ref_numpy.preference import LossType, check_preference_args

from .layers import row_cross_entropy

Array = jax.Array


def sequence_logps(
    x: Array, head: Callable[[Array], Array], labels: Array, chunk: int
) -> tuple[Array, Array]:
    """Summed completion log-probabilities per row and the tokens counted, as the spec's
    ``sequence_logps_forward``: position t predicts ``labels[t + 1]``.

    Args:
      x: [R, T, D] final hidden states.
      head: the final norm and LM head, [R, C, D] -> [R, C, V].
      labels: int [R, T], -100 on the prompt and padding.
      chunk: positions per chunk of logits (``EngineConfig.loss_chunk``; 0: all at once).
    Returns:
      ``logps`` [R] in ``acc_dtype`` and ``counts`` int [R].
    """
    nll, counts = row_cross_entropy(x[:, :-1], head, labels[:, 1:], chunk)  # [R], [R]
    return -nll, counts


def _pairs(v: Array) -> tuple[Array, Array]:
    """[R] -> chosen [P], rejected [P] (rows 2i and 2i + 1)."""
    p = v.reshape(-1, 2)  # [R] -> [P,2]
    return p[:, 0], p[:, 1]


def real_pairs(counts: Array) -> Array:
    """Pairs both of whose rows count tokens (the rest pad a last batch): bool [P]."""
    c, r = _pairs(counts)
    return (c > 0) & (r > 0)


def preference_loss_sum(
    logps: Array,
    ref_logps: Array,
    counts: Array,
    *,
    beta: float,
    loss_type: LossType,
    label_smoothing: float,
) -> tuple[Array, Array]:
    """``(sum of per-pair losses over real pairs, their count)``, as the spec's
    ``preference_loss_forward`` before its mean. logps, ref_logps [R], counts int [R]."""
    check_preference_args(beta, loss_type, label_smoothing)
    ratio = logps - jax.lax.stop_gradient(ref_logps)  # [R] log pi / pi_ref
    rc, rr = _pairs(ratio)  # [P], [P]
    if loss_type == "sigmoid":
        h = beta * (rc - rr)  # [P]
        eps = label_smoothing
        per_pair = -(1 - eps) * jax.nn.log_sigmoid(h) - eps * jax.nn.log_sigmoid(-h)  # [P]
    else:
        nc, nr = _pairs(jnp.maximum(counts, 1).astype(ratio.dtype))  # [P], [P]
        u = rc / nc - rr / nr  # [P] per-token log-ratio difference
        per_pair = (u - 1 / (2 * beta)) ** 2  # [P]
    valid = real_pairs(counts)  # [P]
    return jnp.where(valid, per_pair, 0.0).sum(), valid.sum()


REWARD_METRICS = (
    "rewards/chosen",
    "rewards/rejected",
    "rewards/accuracies",
    "rewards/margins",
    "logps/chosen",
    "logps/rejected",
)


def reward_sums(logps: Array, ref_logps: Array, counts: Array, beta: float) -> dict[str, Array]:
    """TRL's metrics (the spec's ``rewards``) as sums over real pairs, to be divided by the
    batch's pair count. logps, ref_logps [R]; counts int [R]."""
    valid = real_pairs(counts)  # [P]
    chosen, rejected = _pairs(beta * (logps - ref_logps))  # [P], [P]
    lc, lr = _pairs(logps)  # [P], [P]
    values = (chosen, rejected, (chosen > rejected).astype(logps.dtype), chosen - rejected, lc, lr)
    return {
        name: jnp.where(valid, v, 0.0).sum() for name, v in zip(REWARD_METRICS, values, strict=True)
    }
