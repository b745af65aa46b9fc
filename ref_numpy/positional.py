"""Position information: sinusoidal (Vaswani et al. 2017), learned (GPT-2), rotary (RoFormer,
as in Llama, with linear / Llama-3 / YaRN frequency scaling), each a forward returning
``(out, cache)`` beside its backward.

``positions`` is an int array [B, T] of absolute positions; packed sequences restart it at
zero for every segment, so each example sees the positions it would see alone.
"""

from __future__ import annotations

import math

import numpy as np

from .config import RopeScaling
from .layers import Cache, check_shape


def _check_positions(positions: np.ndarray, x: np.ndarray, limit: int | None = None) -> None:
    check_shape("positions", positions, x.shape[:2])
    if limit is not None and positions.size and (positions.min() < 0 or positions.max() >= limit):
        raise ValueError(
            f"positions: expected values in [0, {limit}), "
            f"got [{positions.min()}, {positions.max()}]"
        )


# --- sinusoidal -----------------------------------------------------------------------


def sinusoidal_table(n_positions: int, d_model: int) -> np.ndarray:
    """``PE[p, 2i] = sin(p / 10000^(2i/D))``, ``PE[p, 2i+1] = cos(p / 10000^(2i/D))``.

    Returns [P, D]; D must be even.
    """
    pos = np.arange(n_positions, dtype=np.float64)[:, None]  # [P,1]
    inv = 10000.0 ** (-np.arange(0, d_model, 2, dtype=np.float64) / d_model)  # [D/2]
    table = np.empty((n_positions, d_model))  # [P,D]
    table[:, 0::2] = np.sin(pos * inv)  # [P,D/2]
    table[:, 1::2] = np.cos(pos * inv)  # [P,D/2]
    return table


def sinusoidal_forward(x: np.ndarray, positions: np.ndarray) -> tuple[np.ndarray, Cache]:
    """Add the fixed table's rows. Args: x [B, T, D], positions [B, T]. Returns [B, T, D]."""
    _check_positions(positions, x)
    pe = sinusoidal_table(int(positions.max()) + 1, x.shape[-1])[positions]  # [B,T,D]
    return x + pe.astype(x.dtype), None


def sinusoidal_backward(dout: np.ndarray, cache: Cache) -> np.ndarray:
    """The table is a constant: the gradient passes through unchanged."""
    return dout


# --- learned --------------------------------------------------------------------------


def learned_forward(
    x: np.ndarray, positions: np.ndarray, table: np.ndarray
) -> tuple[np.ndarray, Cache]:
    """Add a trained row per position. Args: x [B, T, D], positions [B, T], table [P, D]."""
    _check_positions(positions, x, limit=table.shape[0])
    return x + table[positions], (positions, table.shape)  # [B,T,D] + [B,T,D]


def learned_backward(dout: np.ndarray, cache: Cache) -> tuple[np.ndarray, np.ndarray]:
    """Returns ``(dx, dtable)``; each table row collects the gradients of its positions."""
    positions, table_shape = cache
    dtable = np.zeros(table_shape, dtype=dout.dtype)  # [P,D]
    np.add.at(dtable, positions, dout)  # [B,T,D] -> [P,D]
    return dout, dtable


# --- rotary ---------------------------------------------------------------------------


def rope_frequencies(
    head_dim: int, theta: float = 10000.0, scaling: RopeScaling | None = None
) -> np.ndarray:
    """Angular frequency of each rotated pair: ``theta^(-2i/H)``, i < H/2. Returns [H/2].

    ``scaling`` stretches the context the frequencies were trained on (``RopeScaling``):
    linear divides every frequency by ``factor``; llama3 and yarn divide the low frequencies
    (pairs that turn less than once over the original context) by ``factor``, keep the high
    ones, and blend linearly in between.
    """
    inv_freq = theta ** (-np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)  # [H/2]
    if scaling is None:
        return inv_freq
    if scaling.rope_type == "linear":
        return inv_freq / scaling.factor  # [H/2]; the same as dividing positions by factor
    ctx = scaling.original_max_position_embeddings
    assert ctx is not None  # RopeScaling checks it for llama3 and yarn
    if scaling.rope_type == "yarn":
        ramp = _yarn_ramp(head_dim, theta, ctx, scaling)  # [H/2]; 0 keeps a pair, 1 scales it
        return inv_freq / scaling.factor * ramp + inv_freq * (1.0 - ramp)  # [H/2]
    low, high = scaling.low_freq_factor, scaling.high_freq_factor
    assert low is not None and high is not None
    wavelen = 2.0 * math.pi / inv_freq  # [H/2]
    smooth = (ctx / wavelen - low) / (high - low)  # [H/2]; 0 at the band's low edge, 1 at high
    blended = (1.0 - smooth) * inv_freq / scaling.factor + smooth * inv_freq  # [H/2]
    out = np.where(wavelen > ctx / low, inv_freq / scaling.factor, blended)
    return np.where(wavelen < ctx / high, inv_freq, out)  # [H/2]


def _yarn_ramp(head_dim: int, theta: float, ctx: int, scaling: RopeScaling) -> np.ndarray:
    """YaRN's ramp over the pairs: 0 for pairs turning more than ``beta_fast`` times over the
    original context ``ctx`` (kept), 1 for those turning fewer than ``beta_slow`` times
    (scaled), linear between. As transformers' ``_compute_yarn_parameters``. Returns [H/2]."""

    def pair_turning(rotations: float) -> float:  # the (fractional) pair index i whose
        # wavelength 2 pi theta^(2i/H) fits ``rotations`` times into ctx
        return head_dim * math.log(ctx / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low, high = pair_turning(scaling.beta_fast), pair_turning(scaling.beta_slow)
    if scaling.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, head_dim - 1)
    if low == high:
        high += 0.001  # as transformers: avoids dividing by zero
    return np.clip((np.arange(head_dim // 2) - low) / (high - low), 0.0, 1.0)  # [H/2]


def rope_attention_factor(scaling: RopeScaling | None) -> float:
    """The factor YaRN multiplies cos and sin by (so attention logits by its square); 1.0
    for the other schemes. Default ``0.1 ln(factor) + 1`` (the YaRN paper's temperature)."""
    if scaling is None or scaling.rope_type != "yarn":
        return 1.0
    if scaling.attention_factor is not None:
        return float(scaling.attention_factor)
    return 1.0 if scaling.factor <= 1 else 0.1 * math.log(scaling.factor) + 1.0


def _rotate_half(x: np.ndarray) -> np.ndarray:
    """``[x1, x2] -> [-x2, x1]`` over the last axis (halves, not interleaved pairs: the
    Hugging Face Llama layout, so checkpoints need no permutation)."""
    h = x.shape[-1] // 2
    return np.concatenate([-x[..., h:], x[..., :h]], axis=-1)  # [...,H]


def _rotate_half_transpose(g: np.ndarray) -> np.ndarray:
    """The adjoint of ``_rotate_half``: ``[g1, g2] -> [g2, -g1]``."""
    h = g.shape[-1] // 2
    return np.concatenate([g[..., h:], -g[..., :h]], axis=-1)  # [...,H]


def rope_forward(
    x: np.ndarray, positions: np.ndarray, inv_freq: np.ndarray, attention_factor: float = 1.0
) -> tuple[np.ndarray, Cache]:
    """Rotate each pair ``(x[i], x[i + H/2])`` by the angle ``position * inv_freq[i]``.

    Args:
      x: [B, T, N, H] (queries or keys; any head count).
      positions: [B, T].
      inv_freq: [H/2] from ``rope_frequencies``.
      attention_factor: multiplies cos and sin (``rope_attention_factor``; 1 but for YaRN).
    Returns:
      [B, T, N, H]: ``x * cos + rotate_half(x) * sin``.
    """
    _check_positions(positions, x)
    check_shape("inv_freq", inv_freq, (x.shape[-1] // 2,))
    angle = positions[..., None].astype(np.float64) * inv_freq  # [B,T,1] * [H/2] -> [B,T,H/2]
    angle = np.concatenate([angle, angle], axis=-1)[:, :, None, :]  # [B,T,1,H]
    cos = (np.cos(angle) * attention_factor).astype(x.dtype)  # [B,T,1,H]
    sin = (np.sin(angle) * attention_factor).astype(x.dtype)  # [B,T,1,H]
    return x * cos + _rotate_half(x) * sin, (cos, sin)  # [B,T,N,H]


def rope_backward(dout: np.ndarray, cache: Cache) -> np.ndarray:
    """A rotation's gradient is the inverse rotation: ``dout*cos + rotate_half^T(dout*sin)``
    (a scaled rotation, with YaRN's factor, scales its gradient the same way)."""
    cos, sin = cache
    return dout * cos + _rotate_half_transpose(dout * sin)  # [B,T,N,H]
