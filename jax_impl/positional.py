"""Mirror of ``ref_numpy/positional.py``: sinusoidal, learned and rotary positions in jnp.

The RoPE frequencies (linear / llama3 / yarn scaling included) and YaRN's attention factor
are constants of the config and come from the spec itself (``rope_frequencies``,
``rope_attention_factor``); angles are formed in ``acc_dtype``.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ref_numpy.config import ModelConfig
from ref_numpy.positional import rope_frequencies

from .layers import acc_dtype

Array = jax.Array


def sinusoidal(x: Array, positions: Array) -> Array:
    """``x + PE[positions]``, ``PE[p, 2i] = sin(p / 10000^(2i/D))``, ``PE[p, 2i+1] = cos(...)``.

    Args: x [B, T, D], positions [B, T]. Returns [B, T, D].
    """
    d = x.shape[-1]
    dt = acc_dtype(x.dtype)
    inv = 10000.0 ** (-jnp.arange(0, d, 2, dtype=dt) / d)  # [D/2]
    angle = positions[..., None].astype(dt) * inv  # [B,T,1] * [D/2] -> [B,T,D/2]
    pe = jnp.stack([jnp.sin(angle), jnp.cos(angle)], axis=-1)  # [B,T,D/2,2]
    pe = pe.reshape(*angle.shape[:-1], d)  # [B,T,D/2,2] -> [B,T,D]: sin even, cos odd
    return x + pe.astype(x.dtype)  # [B,T,D]


def learned(x: Array, positions: Array, table: Array) -> Array:
    """Add a trained row per position. Args: x [B, T, D], positions [B, T], table [P, D]."""
    return x + jnp.take(table, positions, axis=0)  # [B,T,D] + [B,T,D]


def rope_inv_freq(cfg: ModelConfig) -> np.ndarray | None:
    """RoPE frequencies [H/2] for rotary models (float64, from the spec), None for the others."""
    if cfg.position != "rope":
        return None
    return rope_frequencies(cfg.hd, cfg.rope_theta, cfg.rope_scaling)


def _rotate_half(x: Array) -> Array:
    """``[x1, x2] -> [-x2, x1]`` over the last axis (halves, the Hugging Face Llama layout)."""
    h = x.shape[-1] // 2
    return jnp.concatenate([-x[..., h:], x[..., :h]], axis=-1)  # [...,H]


def _rotate_half_transpose(g: Array) -> Array:
    """The adjoint of ``_rotate_half``: ``[g1, g2] -> [g2, -g1]``."""
    h = g.shape[-1] // 2
    return jnp.concatenate([g[..., h:], -g[..., :h]], axis=-1)  # [...,H]


RopeTables = tuple[Array, Array]  # cos, sin [B, T, 1, H]


def rope_tables(
    positions: Array, inv_freq: np.ndarray, attention_factor: float, dtype: Any
) -> RopeTables:
    """The cosines and sines of every position's angles, once for all layers.

    Args:
      positions: [B, T].
      inv_freq: [H/2] from ``rope_frequencies``.
      attention_factor: multiplies cos and sin (``rope_attention_factor``; 1 but for YaRN).
      dtype: the angles' and tables' dtype (``acc_dtype`` of the compute dtype).
    Returns:
      cos and sin [B, T, 1, H] of ``position * inv_freq[i]``, each half of H repeating
      the H/2 angles (the Hugging Face Llama layout), times ``attention_factor``.

    On a CPU the tables are formed row by row in a loop (``jax.lax.map``), which XLA cannot
    fuse into the rotations that read them. Formed in place, XLA's CPU backend fused the
    sines and cosines into every rotation, forward and backward, and recomputed them for each
    head; with the blocks unrolled (bf16 on a CPU) that was about a tenth of a training step.
    Elsewhere they are formed in place (``jax.lax.platform_dependent``): a GPU would run the
    loop as B launches of small kernels, at every decoded token too.
    """
    inv = jnp.asarray(inv_freq, dtype)  # [H/2], the float64 constants rounded to dtype

    def tables(p: Array) -> RopeTables:
        angle = p[..., None].astype(dtype) * inv  # [...,T,1] * [H/2] -> [...,T,H/2]
        return jnp.cos(angle) * attention_factor, jnp.sin(angle) * attention_factor

    cos, sin = jax.lax.platform_dependent(
        positions, cpu=lambda p: jax.lax.map(tables, p), default=tables
    )  # [B,T,H/2] each

    def full(t: Array) -> Array:
        return jnp.concatenate([t, t], axis=-1)[:, :, None, :]  # [B,T,H/2] -> [B,T,1,H]

    return full(cos), full(sin)


@jax.custom_vjp
def rope(x: Array, tables: RopeTables) -> Array:
    """Rotate each pair ``(x[i], x[i + H/2])`` by its position's angle ``position * inv_freq[i]``.

    Args:
      x: [B, T, N, H] (queries or keys; any head count).
      tables: cos and sin [B, T, 1, H] of the positions (``rope_tables``).
    Returns:
      [B, T, N, H] in x's dtype: ``x * cos + rotate_half(x) * sin``.

    The rotation runs in the tables' dtype (``acc_dtype``) and rounds once, at the end:
    under bf16 compute a bf16 product and sum would each round (and XLA's CPU backend
    emulates every bf16 operation in float32 with a conversion on each side, so the bf16
    lines, and their backward, also cost several times the float32 ones).
    """
    cos, sin = tables
    xf = x.astype(cos.dtype)  # [B,T,N,H]
    return (xf * cos + _rotate_half(xf) * sin).astype(x.dtype)  # [B,T,N,H]


def _rope_fwd(x: Array, tables: RopeTables) -> tuple[Array, RopeTables]:
    return rope(x, tables), tables


def _rope_bwd(tables: RopeTables, dout: Array) -> tuple[Array, None]:
    """The spec's ``rope_backward``: the inverse rotation, ``dout*cos + rotate_half^T(dout*sin)``.

    Autodiff of ``rope`` transposes ``rotate_half``'s slices into pads of zeros and adds
    them, which XLA's CPU backend fused into loops several times slower than the forward's
    concatenation: ``bench/profile_cpu.py --dtype bfloat16`` put the rotations at 39 ms of
    operations per step with autodiff's backward, 17 ms with this one. The tables get no
    cotangent: they are functions of integer positions.
    """
    cos, sin = tables
    g = dout.astype(cos.dtype)  # [B,T,N,H]
    return (g * cos + _rotate_half_transpose(g * sin)).astype(dout.dtype), None  # [B,T,N,H]


rope.defvjp(_rope_fwd, _rope_bwd)
