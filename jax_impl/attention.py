"""Mirror of ``ref_numpy/attention.py``: masks, grouped-query attention and the block.

Two implementations of ``softmax(Q K^T / sqrt(H) + mask) V``, selectable per model:

* ``"einsum"`` is the spec's ``sdpa_forward`` and ``sdpa_backward`` written out with the heads
  in front (``"BKGTH,BKSH->BKGTS"``): the reference path, any backend, any dtype.
* ``"xla"`` / ``"cudnn"`` call ``jax.nn.dot_product_attention`` (cuDNN's fused flash kernel on
  GPUs with ``"cudnn"``). Both take K/V with fewer heads than Q directly. A plain causal mask
  (no padding, packing, window or cache) is passed as ``is_causal`` rather than as a
  ``[B, T, S]`` mask, which cuDNN would otherwise turn into a dense additive bias.

Neither repeats K/V in memory. A query with no visible key gets zeros in both.

The output of attention (before ``o_proj``) is named ``ATTN_OUT`` with
``jax.ad_checkpoint.checkpoint_name``, so a rematerialisation policy can keep just it.

Decoding keeps a ``KVCache``: the spec's ``past_kv`` grows by concatenation; here the keys and
values of each layer live in preallocated buffers (``KVCache``) that each call writes at its
current length, so the decode loop runs with fixed shapes.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from ref_numpy.config import ModelConfig, attn_shapes

from .layers import Norm, acc_dtype, softmax, softmax_backward
from .lora import Dense
from .positional import RopeTables, rope

Array = jax.Array
AttnImpl = Literal["einsum", "xla", "cudnn"]
ATTN_OUT = "attn_out"  # checkpoint name of the attention output [B, T, N*H]


def attention_mask(
    batch: int,
    n_queries: int,
    n_keys: int,
    *,
    causal: bool = True,
    padding: Array | None = None,
    segment_ids: Array | None = None,
    window: int | Array | None = None,
    start: int | Array | None = None,
) -> Array:
    """Which key each query may see. Returns bool [B, T, S].

    Query t sits at position ``start + t``; by default ``start = S - T``, the spec's rule (the
    T queries are the last T of the S keys). A ``KVCache`` holds more slots than are filled
    and passes its length instead.

    Args:
      causal: a query sees only keys at or before its own position.
      padding: [B, S] of 1 (real token) and 0 (padding); padded keys are hidden.
      segment_ids: [B, S] ids of packed examples (needs T = S).
      window: sliding-window attention: query t sees key s only when ``t - s < window`` (an
        int, or a traced scalar under the layer ``scan``).
    """
    mask = jnp.ones((batch, n_queries, n_keys), dtype=bool)  # [B,T,S]
    if start is None:
        q_pos = jnp.arange(n_keys - n_queries, n_keys)[:, None]  # [T,1]
    else:
        q_pos = start + jnp.arange(n_queries)[:, None]  # [T,1]
    k_pos = jnp.arange(n_keys)[None, :]  # [1,S]
    if causal:
        mask &= k_pos <= q_pos  # [T,S] broadcast over B
    if window is not None:
        mask &= k_pos > q_pos - window  # [T,S]: the last `window` positions up to t
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


def cache_dtype(dtype: Any, platform: str) -> jnp.dtype:
    """The dtype a ``KVCache`` stores under compute ``dtype`` on ``platform`` (``"cpu"``,
    ``"gpu"``, ``"tpu"``): the compute dtype, except that a CPU stores a float narrower than
    float32 as float32.

    XLA's CPU backend has no bf16 or fp16 arithmetic and emulates such an update in float32:
    a ``dynamic_update_slice`` of one position into a bf16 buffer becomes a conversion of the
    whole buffer to float32 and back, every layer and every token. On a float32 buffer the
    update is in place. A decode step then attends in float32 as well (``Attention``), which
    converts nothing; the stored values are the compute dtype's, exactly.
    """
    dtype = jnp.dtype(dtype)
    narrow = jnp.issubdtype(dtype, jnp.floating) and dtype.itemsize < 4
    return jnp.dtype(jnp.float32) if platform == "cpu" and narrow else dtype


class KVCache(NamedTuple):
    """The keys and values of every layer for S preallocated positions (a pytree).

    Positions ``0 .. length - 1`` hold the keys and values of the tokens seen so far, the
    same count in every row; the next call writes its T tokens at ``length .. length + T - 1``
    and ``Model`` then advances ``length`` by T. Slots at or past ``length`` hold stale or
    zero entries that the causal mask hides from every query before them.

    Each layer has buffers of its own: a layer writes its new positions in place and attends
    over its whole buffer. Slices of one ``[L, ...]`` stack, written and read in the same
    step, made XLA copy the layer's slice and the whole stack on every decode step. The
    buffers are laid out as ``attend_cache``'s products take them, so that no decode step
    moves a whole buffer (each was measured on XLA:CPU, ``bench/RESULTS.md``):

    - head-major, the rows and kv heads flattened into one batch axis C = B * K: keys
      position-major were transposed whole on every token; with B and K as two batch axes,
      XLA squeezed a batch of one through a bitcast and wrote each buffer twice, once for
      the loop and once for the product, copying every buffer several times per token;
    - keys transposed, ``[C, H, S]``, so that ``q @ K^T`` is a plain product with the
      positions as its columns: ``[C, S, H]`` keys made it about five times slower.
    """

    k: tuple[Array, ...]  # L x [C,H,S] rotated keys, transposed (C = B*K, row-major)
    v: tuple[Array, ...]  # L x [C,S,H] values
    length: Array  # int32 []: positions filled

    @classmethod
    def zeros(cls, cfg: ModelConfig, batch: int, size: int, dtype: Any) -> KVCache:
        """An empty cache of ``size`` positions for ``batch`` rows of ``cfg``'s model, stored
        in ``dtype`` (``cache_dtype`` of the compute dtype and platform)."""
        c = batch * cfg.n_kv
        k = tuple(jnp.zeros((c, cfg.hd, size), dtype) for _ in range(cfg.n_layers))  # [C,H,S]
        v = tuple(jnp.zeros((c, size, cfg.hd), dtype) for _ in range(cfg.n_layers))  # [C,S,H]
        return cls(k, v, jnp.zeros((), jnp.int32))

    @property
    def size(self) -> int:
        """S, the positions each buffer holds."""
        return self.v[0].shape[1]

    def grow(self, size: int) -> KVCache:
        """The same cache with ``size`` >= ``self.size`` positions per buffer, the new slots
        zero: one copy of every buffer, made between decoding loops, never inside one."""
        extra = size - self.size
        if extra < 0:
            raise ValueError(f"KVCache.grow: size {size} is below the cache's {self.size}")
        k = tuple(jnp.pad(x, ((0, 0), (0, 0), (0, extra))) for x in self.k)  # [C,H,size]
        v = tuple(jnp.pad(x, ((0, 0), (0, extra), (0, 0))) for x in self.v)  # [C,size,H]
        return self._replace(k=k, v=v)

    def write(self, layer: int, k: Array, v: Array) -> KVCache:
        """``k`` and ``v`` [B, T, K, H] of ``layer`` written at positions ``length ..``.

        One in-place ``dynamic_update_slice`` per buffer: a decode step writes T positions,
        never copies the cache.
        """
        b, t, kv, h = k.shape
        kt = k.transpose(0, 2, 3, 1).reshape(b * kv, h, t)  # [B,T,K,H] -> [C,H,T]
        vh = v.transpose(0, 2, 1, 3).reshape(b * kv, t, h)  # [B,T,K,H] -> [C,T,H]
        zero = jnp.zeros((), jnp.int32)
        new_k = jax.lax.dynamic_update_slice(
            self.k[layer], kt.astype(self.k[layer].dtype), (zero, zero, self.length)
        )  # [C,H,S]
        new_v = jax.lax.dynamic_update_slice(
            self.v[layer], vh.astype(self.v[layer].dtype), (zero, self.length, zero)
        )  # [C,S,H]
        ks, vs = list(self.k), list(self.v)
        ks[layer], vs[layer] = new_k, new_v
        return self._replace(k=tuple(ks), v=tuple(vs))


def sdpa(
    q: Array,
    k: Array,
    v: Array,
    mask: Array,
    impl: AttnImpl = "einsum",
    *,
    causal_only: bool = False,
) -> Array:
    """Scaled dot-product attention with grouped heads, as the spec's ``sdpa_forward``.

    Args:
      q: [B, T, N, H].
      k, v: [B, S, K, H] with K dividing N.
      mask: bool [B, T, S].
      impl: ``"einsum"`` (the spec's lines), ``"xla"`` or ``"cudnn"``
        (``jax.nn.dot_product_attention``).
      causal_only: the caller vouches that ``mask`` is exactly the causal mask with T = S; the
        fused paths then pass ``is_causal=True`` instead of the mask (the einsum path always
        uses ``mask``). Otherwise ``"cudnn"`` with an odd T or S runs as ``"xla"``.
    Returns:
      [B, T, N, H] in q's dtype. A query that may see no key gets zeros.
    """
    if impl == "cudnn" and not causal_only and (q.shape[1] % 2 or k.shape[1] % 2):
        impl = "xla"  # cuDNN takes a mask as an additive bias, which needs even T and S
    if impl != "einsum":
        implementation = None if impl == "xla" else impl
        if causal_only:  # every query sees at least itself: no empty rows
            return jax.nn.dot_product_attention(
                q, k, v, is_causal=True, implementation=implementation
            )  # [B,T,N,H]
        out = jax.nn.dot_product_attention(
            q, k, v, mask=mask[:, None], implementation=implementation
        )  # [B,T,N,H]
        return out * mask.any(axis=-1)[:, :, None, None].astype(out.dtype)  # empty rows -> 0
    return _sdpa_heads(q, k, v, mask)  # [B,T,N,H]


def _heads(x: Array, kv: int) -> Array:
    """[B, T, N, H] -> head-major [B, K, G, T, H] (N = K * G)."""
    b, t, n, h = x.shape
    return x.reshape(b, t, kv, n // kv, h).transpose(0, 2, 3, 1, 4)  # [B,K,G,T,H]


def _unheads(x: Array) -> Array:
    """Head-major [B, K, G, T, H] -> [B, T, N, H]."""
    b, kv, g, t, h = x.shape
    return x.transpose(0, 3, 1, 2, 4).reshape(b, t, kv * g, h)  # [B,T,N,H]


def _sdpa_heads_fwd(
    q: Array, k: Array, v: Array, mask: Array
) -> tuple[Array, tuple[Array, Array, Array, Array]]:
    """The output [B, T, N, H] in q's dtype and the residuals ``(qh, kh, vh, probs)`` the
    backward keeps."""
    # Scores, the softmax and every sum stay in float32 or wider. The probabilities are
    # rounded to the compute dtype once, as bf16 flash-attention kernels round them for P V,
    # and the rounded copy is what the backward keeps: under bf16 the [B, K, G, T, S] array
    # written here and read twice by the backward is half the bytes, and the gradients' error
    # against the spec stays within its spread over seeds.
    acc = acc_dtype(q.dtype)
    qh = _heads(q, k.shape[2])  # [B,T,N,H] -> [B,K,G,T,H]
    kh = k.transpose(0, 2, 1, 3)  # [B,S,K,H] -> [B,K,S,H]
    vh = v.transpose(0, 2, 1, 3)  # [B,S,K,H] -> [B,K,S,H]
    scale = 1.0 / math.sqrt(q.shape[-1])
    scores = jnp.einsum("BKGTH,BKSH->BKGTS", qh, kh, preferred_element_type=acc)  # [B,K,G,T,S]
    probs = softmax(scores * scale, mask[:, None, None]).astype(q.dtype)  # [B,K,G,T,S]
    out = jnp.einsum("BKGTS,BKSH->BKGTH", probs, vh, preferred_element_type=acc)  # [B,K,G,T,H]
    return _unheads(out).astype(q.dtype), (qh, kh, vh, probs)  # [B,T,N,H]


def attend_cache(q: Array, kt: Array, vh: Array, mask: Array) -> Array:
    """Attention over one layer's ``KVCache`` buffers: the einsum path's forward sums.

    q [B, T, N, H], kt [C, H, S] (keys transposed, C = B * K), vh [C, S, H], mask bool
    [B, T, S] -> [B, T, N, H] in q's dtype.
    """
    b, t, n, h = q.shape
    c, _, s = kt.shape
    kv = c // b
    qh = _heads(q, kv).reshape(c, n // kv, t, h)  # [B,T,N,H] -> [B,K,G,T,H] -> [C,G,T,H]
    acc = acc_dtype(q.dtype)
    scores = jnp.einsum("CGTH,CHS->CGTS", qh, kt, preferred_element_type=acc)  # [C,G,T,S]
    scores = scores.reshape(b, kv, n // kv, t, s) / math.sqrt(h)  # [B,K,G,T,S]
    probs = softmax(scores, mask[:, None, None]).reshape(c, n // kv, t, s)  # [C,G,T,S]
    out = jnp.einsum(
        "CGTS,CSH->CGTH", probs.astype(q.dtype), vh, preferred_element_type=acc
    )  # [C,G,T,H]
    return _unheads(out.reshape(b, kv, n // kv, t, h)).astype(q.dtype)  # [B,T,N,H]


@jax.custom_vjp
def _sdpa_heads(q: Array, k: Array, v: Array, mask: Array) -> Array:
    """The spec's ``sdpa_forward`` with the heads moved in front of the positions.

    Every product is then a plain batched matrix product over (B, K) with the G query heads
    of a kv head stacked as rows: ``[G*T, H] @ [H, S]`` and ``[G*T, S] @ [S, H]``. The
    backward is the spec's ``sdpa_backward`` written out in the same layout, keeping only
    q, k, v and the probabilities. Autodiff of the ``"BTKGH,BSKH->BKGTS"`` einsums instead
    transposes the ``[B, K, G, T, S]`` probabilities and their cotangent in memory, several
    copies per layer and step on XLA's CPU backend.
    """
    return _sdpa_heads_fwd(q, k, v, mask)[0]


def _sdpa_heads_bwd(
    res: tuple[Array, Array, Array, Array], dout: Array
) -> tuple[Array, Array, Array, None]:
    """``(dq, dk, dv)`` as ``sdpa_backward``; each kv head sums the gradients of the G
    queries it served. The mask gets no cotangent."""
    qh, kh, vh, probs = res  # probs [B,K,G,T,S] in the compute dtype
    cd = qh.dtype
    acc = acc_dtype(cd)
    scale = 1.0 / math.sqrt(qh.shape[-1])
    dg = _heads(dout, kh.shape[1])  # [B,T,N,H] -> [B,K,G,T,H], in the compute dtype
    # Every product takes operands in the compute dtype, summed in ``acc``: the forward's
    # rounded probabilities, and the score gradients rounded as the forward rounds them.
    dv = jnp.einsum("BKGTS,BKGTH->BKSH", probs, dg, preferred_element_type=acc)  # [B,K,S,H]
    dprobs = jnp.einsum("BKGTH,BKSH->BKGTS", dg, vh, preferred_element_type=acc)  # [B,K,G,T,S]
    # The score scale goes on dq and dk, [., H], not on the [., S] score gradients: XLA's CPU
    # backend fuses the softmax backward into the product that makes dprobs, and a scalar
    # factor there became a whole [B, K, G, T, S] array of it in memory, read by every layer.
    dscores = softmax_backward(probs.astype(acc), dprobs).astype(cd)  # [B,K,G,T,S], unscaled
    dq = scale * jnp.einsum("BKGTS,BKSH->BKGTH", dscores, kh, preferred_element_type=acc)
    dk = scale * jnp.einsum("BKGTS,BKGTH->BKSH", dscores, qh, preferred_element_type=acc)
    return (
        _unheads(dq).astype(qh.dtype),  # [B,T,N,H]
        dk.transpose(0, 2, 1, 3).astype(kh.dtype),  # [B,S,K,H]
        dv.transpose(0, 2, 1, 3).astype(vh.dtype),  # [B,S,K,H]
        None,
    )


_sdpa_heads.defvjp(_sdpa_heads_fwd, _sdpa_heads_bwd)


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
        mask: Array,
        tables: RopeTables | None,
        keys: dict[str, Array] | None = None,
        *,
        cache: KVCache | None = None,
        layer: int = 0,
        causal_only: bool = False,
    ) -> tuple[Array, KVCache | None]:
        """Project, normalise heads (Qwen3), rotate (RoPE), attend, merge heads, project.

        Args:
          x: [B, T, D].
          mask: bool [B, T, S]; S = T without a cache, the cache's size with one. Without
            a cache it must hide every later key (``attention_mask`` with ``causal``).
          tables: RoPE's cos and sin [B, T, 1, H] at the queries' positions
            (``positional.rope_tables``), or None for models without RoPE.
          keys: projection name -> dropout key (training), or None.
          cache: the keys and values of earlier positions (the spec's ``past_kv``); this
            call's are written at its ``length`` in the buffers of layer ``layer``.
          causal_only: ``mask`` is the plain causal mask (see ``sdpa``).
        Returns:
          [B, T, D] and the cache with this layer's new keys and values (None without one).
        """
        b, t, _ = x.shape
        n, kv, h = self.n, self.kv, self.h
        if self.fused:
            qkv = self._proj("c_attn", x, keys)  # [B,T,D] -> [B,T,(N+2K)H]
            q, k, v = jnp.split(qkv, [n * h, (n + kv) * h], axis=-1)  # [B,T,(N+2K)H] -> 3 parts
        else:
            q = self._proj("q_proj", x, keys)  # [B,T,D] -> [B,T,NH]
            k = self._proj("k_proj", x, keys)  # [B,T,D] -> [B,T,KH]
            v = self._proj("v_proj", x, keys)  # [B,T,D] -> [B,T,KH]
        q = q.reshape(b, t, n, h)  # [B,T,NH] -> [B,T,N,H]
        k = k.reshape(b, t, kv, h)  # [B,T,KH] -> [B,T,K,H]
        v = v.reshape(b, t, kv, h)  # [B,T,KH] -> [B,T,K,H]
        if self.qk_norm:  # RMSNorm over each head's H features, shared by all heads
            q, k = self.q_norm(q), self.k_norm(k)
        if tables is not None:
            q = rope(q, tables)  # [B,T,N,H]
            k = rope(k, tables)  # [B,T,K,H]
        impl = self.impl
        if cache is not None:
            cache = cache.write(layer, k, v)  # the layer's buffers: T positions written
            # One new position attends in the buffers' dtype, wider than the compute dtype on
            # a CPU (``cache_dtype``), where converting the buffers would cost a pass over
            # them per token; a prompt converts them once for its larger products.
            cd = jnp.promote_types(q.dtype, cache.k[layer].dtype) if t == 1 else q.dtype
            kt = cache.k[layer].astype(cd)  # [C,H,S]
            vh = cache.v[layer].astype(cd)  # [C,S,H]
            # Every path attends with the einsum products on the buffers as they lie: cuDNN's
            # flash kernel wants T == S, and the XLA path takes keys and values position-major,
            # a transpose of the whole cache on every token.
            o = attend_cache(q.astype(cd), kt, vh, mask).astype(q.dtype)  # [B,T,N,H]
        elif impl == "einsum" and t > 1:
            # Without a cache every mask is causal (padding, packing and windows only take
            # keys away), so the first C queries see only the first C keys: a quarter of the
            # [T, S] scores are never formed. The same sums as one call, row by row.
            c = t // 2
            o = jnp.concatenate(
                [
                    sdpa(q[:, :c], k[:, :c], v[:, :c], mask[:, :c, :c], impl),  # [B,C,N,H]
                    sdpa(q[:, c:], k, v, mask[:, c:], impl),  # [B,T-C,N,H]
                ],
                axis=1,
            )  # [B,T,N,H]
        else:
            o = sdpa(q, k, v, mask, impl, causal_only=causal_only)  # [B,T,N,H]
        o = o.reshape(b, t, n * h)  # [B,T,N,H] -> [B,T,NH]
        o = checkpoint_name(o, ATTN_OUT)  # what remat "attn_out" keeps
        y = self._proj("c_proj" if self.fused else "o_proj", o, keys)  # [B,T,NH] -> [B,T,D]
        return y, cache

    def _proj(self, name: str, x: Array, keys: dict[str, Array] | None) -> Array:
        dense: Dense = getattr(self, name)
        return dense(x, (keys or {}).get(name))
