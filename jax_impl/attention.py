"""Mirror of ``ref_numpy/attention.py``: masks, grouped-query attention and the block.

Two implementations of ``softmax(Q K^T / sqrt(H) + mask) V``, selectable per model:

* ``"einsum"`` spells out the spec's einsums (``"BTKGH,BSKH->BKGTS"``): the reference path,
  any backend, any dtype.
* ``"xla"`` / ``"cudnn"`` call ``jax.nn.dot_product_attention`` (cuDNN's fused flash kernel on
  GPUs with ``"cudnn"``). Both take K/V with fewer heads than Q directly.

Neither repeats K/V in memory. A query with no visible key gets zeros in both.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ref_numpy.config import ModelConfig
from ref_numpy.model import attn_shapes

from .layers import Norm, acc_dtype, softmax
from .lora import Dense
from .positional import attention_factor, rope

Array = jax.Array
AttnImpl = Literal["einsum", "xla", "cudnn"]


def attention_mask(
    batch: int,
    n_queries: int,
    n_keys: int,
    *,
    causal: bool = True,
    padding: Array | None = None,
    segment_ids: Array | None = None,
    window: int | Array | None = None,
) -> Array:
    """bool [B, T, S], True where query t (at position S - T + t) may see key s; with a
    sliding ``window`` (an int, or a traced scalar) only keys with ``t - s < window``."""
    mask = jnp.ones((batch, n_queries, n_keys), dtype=bool)
    q_pos = jnp.arange(n_keys - n_queries, n_keys)[:, None]  # [T,1]
    k_pos = jnp.arange(n_keys)[None, :]  # [1,S]
    if causal:
        mask &= k_pos <= q_pos
    if window is not None:
        mask &= k_pos > q_pos - window
    if padding is not None:
        mask &= padding.astype(bool)[:, None, :]  # [B,1,S]
    if segment_ids is not None:
        mask &= segment_ids[:, :, None] == segment_ids[:, None, :]  # [B,T,S]
    return mask


def layer_windows(cfg: ModelConfig) -> Array | None:
    """int32 [L]: each layer's sliding window, scanned with the stacked layers; a layer
    without one gets ``max_seq_len``, which every earlier key is within. None without
    sliding windows."""
    if cfg.sliding_window is None:
        return None
    windows = [cfg.layer_window(i) or cfg.max_seq_len for i in range(cfg.n_layers)]
    return jnp.asarray(windows, jnp.int32)


def sdpa(q: Array, k: Array, v: Array, mask: Array, impl: AttnImpl = "einsum") -> Array:
    """Scaled dot-product attention. q [B,T,N,H], k/v [B,S,K,H], mask [B,T,S] -> [B,T,N,H]."""
    b, t, n, h = q.shape
    kv = k.shape[2]
    if impl != "einsum":
        out = jax.nn.dot_product_attention(
            q, k, v, mask=mask[:, None], implementation=None if impl == "xla" else impl
        )
        return out * mask.any(axis=-1)[:, :, None, None].astype(out.dtype)  # empty rows -> 0
    acc = acc_dtype(q.dtype)  # scores, probabilities and their sums stay in float32 or wider
    qg = q.reshape(b, t, kv, n // kv, h)  # [B,T,K,G,H]
    scores = jnp.einsum("BTKGH,BSKH->BKGTS", qg, k, preferred_element_type=acc)
    probs = softmax(scores * (1.0 / math.sqrt(h)), mask[:, None, None])  # [B,K,G,T,S]
    out = jnp.einsum("BKGTS,BSKH->BTKGH", probs, v.astype(acc))
    return out.reshape(b, t, n, h).astype(q.dtype)


class Attention(nnx.Module):
    """Multi-head self-attention with grouped-query heads and RoPE, as the spec's
    ``attention_forward``. Projections are ``q_proj, k_proj, v_proj, o_proj`` or GPT-2's
    fused ``c_attn, c_proj``; Qwen3 adds the per-head RMSNorms ``q_norm`` and ``k_norm``."""

    def __init__(
        self,
        cfg: ModelConfig,
        make: Callable[[str, str, int, int], Dense],
        *,
        impl: AttnImpl,
        make_norm: Callable[[int], Norm] | None = None,
    ) -> None:
        """``make(group, name, in, out)`` builds each projection (the model decides bias,
        adapter, NF4 and dtypes); ``make_norm(width)`` builds ``q_norm`` / ``k_norm``."""
        self.n, self.kv, self.h, self.impl = cfg.n_heads, cfg.n_kv, cfg.hd, impl
        self.fused = cfg.fused_qkv
        self.rope_factor = attention_factor(cfg)
        for name, (d_in, d_out) in attn_shapes(cfg).items():
            setattr(self, name, make("attn", name, d_in, d_out))
        self.qk_norm = cfg.qk_norm
        if cfg.qk_norm:
            if make_norm is None:
                raise ValueError("Attention: qk_norm needs make_norm to build q_norm / k_norm")
            self.q_norm, self.k_norm = make_norm(cfg.hd), make_norm(cfg.hd)

    def __call__(
        self,
        x: Array,
        positions: Array,
        mask: Array,
        freqs: np.ndarray | None,
        keys: dict[str, Array] | None = None,
    ) -> Array:
        """[B, T, D] -> [B, T, D]; ``keys`` maps projection names to dropout keys."""
        q, k, v = self.qkv(x, positions, freqs, keys)
        return self.out(sdpa(q, k, v, mask, self.impl), keys)

    def _proj(self, name: str, x: Array, keys: dict[str, Array] | None) -> Array:
        dense: Dense = getattr(self, name)
        return dense(x, (keys or {}).get(name))

    def qkv(
        self,
        x: Array,
        positions: Array,
        freqs: np.ndarray | None,
        keys: dict[str, Array] | None = None,
    ) -> tuple[Array, Array, Array]:
        """Projected, rotated heads: x [B, T, D] -> q [B,T,N,H], k and v [B,T,K,H]."""
        b, t, _ = x.shape
        n, kv, h = self.n, self.kv, self.h
        if self.fused:
            q, k, v = jnp.split(self._proj("c_attn", x, keys), [n * h, (n + kv) * h], axis=-1)
        else:
            q, k, v = (self._proj(name, x, keys) for name in ("q_proj", "k_proj", "v_proj"))
        q, k, v = q.reshape(b, t, n, h), k.reshape(b, t, kv, h), v.reshape(b, t, kv, h)
        if self.qk_norm:  # RMSNorm over each head's H features
            q, k = self.q_norm(q), self.k_norm(k)
        if freqs is not None:
            q = rope(q, positions, freqs, self.rope_factor)
            k = rope(k, positions, freqs, self.rope_factor)
        return q, k, v

    def out(self, o: Array, keys: dict[str, Array] | None = None) -> Array:
        """Merged heads through the output projection: [B, T, N, H] -> [B, T, D]."""
        b, t, n, h = o.shape
        return self._proj("c_proj" if self.fused else "o_proj", o.reshape(b, t, n * h), keys)
