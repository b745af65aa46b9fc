"""Position information: sinusoidal (Vaswani et al. 2017), learned (GPT-2), rotary (RoFormer,
as in Llama), each a forward returning ``(out, cache)`` beside its backward.

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

    With Llama-3 scaling, long wavelengths (low frequencies) are divided by ``factor``, short
    ones are kept, and the band between is interpolated smoothly in ``context / wavelength``.
    """
    inv_freq = theta ** (-np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)  # [H/2]
    if scaling is None:
        return inv_freq
    ctx = scaling.original_max_position_embeddings
    wavelen = 2.0 * math.pi / inv_freq  # [H/2]
    smooth = (ctx / wavelen - scaling.low_freq_factor) / (
        scaling.high_freq_factor - scaling.low_freq_factor
    )  # [H/2]; 0 at the low-frequency edge of the band, 1 at the high one
    blended = (1.0 - smooth) * inv_freq / scaling.factor + smooth * inv_freq  # [H/2]
    out = np.where(wavelen > ctx / scaling.low_freq_factor, inv_freq / scaling.factor, blended)
    return np.where(wavelen < ctx / scaling.high_freq_factor, inv_freq, out)  # [H/2]


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
    x: np.ndarray, positions: np.ndarray, inv_freq: np.ndarray
) -> tuple[np.ndarray, Cache]:
    """Rotate each pair ``(x[i], x[i + H/2])`` by the angle ``position * inv_freq[i]``.

    Args:
      x: [B, T, N, H] (queries or keys; any head count).
      positions: [B, T].
      inv_freq: [H/2] from ``rope_frequencies``.
    Returns:
      [B, T, N, H]: ``x * cos + rotate_half(x) * sin``.
    """
    _check_positions(positions, x)
    check_shape("inv_freq", inv_freq, (x.shape[-1] // 2,))
    angle = positions[..., None].astype(np.float64) * inv_freq  # [B,T,1] * [H/2] -> [B,T,H/2]
    angle = np.concatenate([angle, angle], axis=-1)[:, :, None, :]  # [B,T,1,H]
    cos, sin = np.cos(angle).astype(x.dtype), np.sin(angle).astype(x.dtype)  # [B,T,1,H]
    return x * cos + _rotate_half(x) * sin, (cos, sin)  # [B,T,N,H]


def rope_backward(dout: np.ndarray, cache: Cache) -> np.ndarray:
    """A rotation's gradient is the inverse rotation: ``dout*cos + rotate_half^T(dout*sin)``."""
    cos, sin = cache
    return dout * cos + _rotate_half_transpose(dout * sin)  # [B,T,N,H]
