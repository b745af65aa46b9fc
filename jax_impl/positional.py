"""Mirror of ``ref_numpy/positional.py``: sinusoidal, learned and rotary positions in jnp.

The RoPE frequencies are constants of the config and come from the spec itself
(``ref_numpy.positional.rope_frequencies``); angles are formed in ``acc_dtype``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from ref_numpy.config import ModelConfig
from ref_numpy.positional import rope_frequencies

from .layers import acc_dtype

Array = jax.Array


def sinusoidal(x: Array, positions: Array) -> Array:
    """``x + PE[positions]``; [B, T, D] -> [B, T, D]."""
    d = x.shape[-1]
    dt = acc_dtype(x.dtype)
    inv = 10000.0 ** (-jnp.arange(0, d, 2, dtype=dt) / d)  # [D/2]
    angle = positions[..., None].astype(dt) * inv  # [B,T,D/2]
    pe = jnp.stack([jnp.sin(angle), jnp.cos(angle)], axis=-1).reshape(*angle.shape[:-1], d)
    return x + pe.astype(x.dtype)  # interleaved: sin at even features, cos at odd


def learned(x: Array, positions: Array, table: Array) -> Array:
    """``x + table[positions]``; [B, T, D] -> [B, T, D]."""
    return x + jnp.take(table, positions, axis=0)


def inv_freq(cfg: ModelConfig) -> np.ndarray | None:
    """RoPE frequencies [H/2] (float64, from the spec), or None without RoPE."""
    if cfg.position != "rope":
        return None
    return rope_frequencies(cfg.hd, cfg.rope_theta, cfg.rope_scaling)


def _rotate_half(x: Array) -> Array:
    h = x.shape[-1] // 2
    return jnp.concatenate([-x[..., h:], x[..., :h]], axis=-1)


def rope(x: Array, positions: Array, freqs: np.ndarray) -> Array:
    """Rotate pairs ``(x[i], x[i + H/2])`` by ``position * freqs[i]``. [B,T,N,H] -> same."""
    dt = acc_dtype(x.dtype)
    angle = positions[..., None].astype(dt) * jnp.asarray(freqs, dt)  # [B,T,H/2]
    angle = jnp.concatenate([angle, angle], axis=-1)[:, :, None, :]  # [B,T,1,H]
    cos, sin = jnp.cos(angle).astype(x.dtype), jnp.sin(angle).astype(x.dtype)
    return x * cos + _rotate_half(x) * sin
