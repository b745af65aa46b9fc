"""Mirror of ``ref_numpy/positional.py``: sinusoidal, learned and rotary positions in jnp.

The RoPE frequencies (linear / llama3 / yarn scaling included) and YaRN's attention factor
are constants of the config and come from the spec itself (``rope_frequencies``,
``rope_attention_factor``); angles are formed in ``acc_dtype``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from ref_numpy.config import ModelConfig
from ref_numpy.positional import rope_attention_factor, rope_frequencies

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


def attention_factor(cfg: ModelConfig) -> float:
    """The cos / sin multiplier of RoPE (YaRN's; 1.0 otherwise)."""
    return rope_attention_factor(cfg.rope_scaling)


def _rotate_half(x: Array) -> Array:
    h = x.shape[-1] // 2
    return jnp.concatenate([-x[..., h:], x[..., :h]], axis=-1)


def rope(x: Array, positions: Array, freqs: np.ndarray, attention_factor: float = 1.0) -> Array:
    """Rotate pairs ``(x[i], x[i + H/2])`` by ``position * freqs[i]``, cos and sin scaled by
    ``attention_factor``. [B,T,N,H] -> same."""
    dt = acc_dtype(x.dtype)
    angle = positions[..., None].astype(dt) * jnp.asarray(freqs, dt)  # [B,T,H/2]
    angle = jnp.concatenate([angle, angle], axis=-1)[:, :, None, :]  # [B,T,1,H]
    cos = (jnp.cos(angle) * attention_factor).astype(x.dtype)
    sin = (jnp.sin(angle) * attention_factor).astype(x.dtype)
    return x * cos + _rotate_half(x) * sin
