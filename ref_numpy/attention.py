"""Scaled dot-product attention and the multi-head attention block, with grouped-query heads.

``softmax(Q K^T / sqrt(H) + mask) V`` computed for all heads at once. With grouped-query
attention the N query heads share K key/value heads, ``G = N // K`` queries per kv head: the
queries are viewed as ``[B, T, K, G, H]`` and each group meets its own kv head, so K and V
are never repeated in memory (``"BTKGH,BSKH->BKGTS"``).

Masks are boolean, True where a query may attend to a key, shaped ``[B, T, S]``.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from .config import ModelConfig
from .layers import (
    Cache,
    check_shape,
    rms_norm_backward,
    rms_norm_forward,
    softmax_backward,
    softmax_forward,
)
from .lora import dense_backward, dense_forward
from .positional import rope_attention_factor, rope_backward, rope_forward

Params = dict[str, Any]


def attention_mask(
    batch: int,
    n_queries: int,
    n_keys: int,
    *,
    causal: bool = True,
    padding: np.ndarray | None = None,
    segment_ids: np.ndarray | None = None,
    window: int | None = None,
) -> np.ndarray:
    """Which key each query may see. Returns bool [B, T, S].

    The T queries are the last T of the S key positions (T = S except when decoding with a
    KV cache), so query t sits at position ``S - T + t``.

    Args:
      causal: a query sees only keys at or before its own position.
      padding: [B, S] of 1 (real token) and 0 (padding), Hugging Face's ``attention_mask``;
        padded keys are hidden from every query.
      segment_ids: [B, S] ids of packed examples (needs T = S); a query sees only keys of its
        own segment, so packed examples never attend to each other.
      window: sliding-window attention (Mistral, Qwen2): query t sees key s only when
        ``t - s < window``, so ``window`` keys at most, itself included (as transformers'
        ``sliding_window_overlay``). Positions here are indices in the row, not ``positions``.
    """
    mask = np.ones((batch, n_queries, n_keys), dtype=bool)  # [B,T,S]
    q_pos = np.arange(n_keys - n_queries, n_keys)[:, None]  # [T,1]
    k_pos = np.arange(n_keys)[None, :]  # [1,S]
    if causal:
        mask &= k_pos <= q_pos  # [T,S] broadcast over B
    if window is not None:
        mask &= k_pos > q_pos - window  # [T,S]: the last `window` positions up to t
    if padding is not None:
        check_shape("attention_mask", padding, (batch, n_keys))
        mask &= padding.astype(bool)[:, None, :]  # [B,1,S]
    if segment_ids is not None:
        check_shape("segment_ids", segment_ids, (batch, n_keys))
        if n_queries != n_keys:
            raise ValueError("segment_ids: packing needs as many queries as keys")
        mask &= segment_ids[:, :, None] == segment_ids[:, None, :]  # [B,T,S]
    return mask


def sdpa_forward(
    q: np.ndarray, k: np.ndarray, v: np.ndarray, mask: np.ndarray
) -> tuple[np.ndarray, Cache]:
    """Scaled dot-product attention with grouped heads.

    Args:
      q: [B, T, N, H].
      k, v: [B, S, K, H] with K dividing N.
      mask: bool [B, T, S].
    Returns:
      [B, T, N, H]. A query that may see no key gets zeros.
    """
    b, t, n, h = q.shape
    kv = k.shape[2]
    check_shape("k", k, (b, None, None, h))
    check_shape("v", v, k.shape)
    check_shape("mask", mask, (b, t, k.shape[1]))
    if n % kv:
        raise ValueError(f"k: {kv} kv heads do not divide {n} query heads")
    qg = q.reshape(b, t, kv, n // kv, h)  # [B,T,N,H] -> [B,T,K,G,H]
    scale = 1.0 / math.sqrt(h)
    scores = np.einsum("BTKGH,BSKH->BKGTS", qg, k) * scale  # [B,K,G,T,S]
    probs, sm_cache = softmax_forward(scores, mask[:, None, None])  # [B,K,G,T,S]
    out = np.einsum("BKGTS,BSKH->BTKGH", probs, v)  # [B,T,K,G,H]
    return out.reshape(b, t, n, h), (qg, k, v, probs, sm_cache, scale)


def sdpa_backward(dout: np.ndarray, cache: Cache) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Returns ``(dq, dk, dv)``; each kv head sums the gradients of the G queries it served."""
    qg, k, v, probs, sm_cache, scale = cache
    dg = dout.reshape(qg.shape)  # [B,T,N,H] -> [B,T,K,G,H]
    dv = np.einsum("BKGTS,BTKGH->BSKH", probs, dg)  # [B,S,K,H]
    dprobs = np.einsum("BTKGH,BSKH->BKGTS", dg, v)  # [B,K,G,T,S]
    dscores = softmax_backward(dprobs, sm_cache) * scale  # [B,K,G,T,S]
    dq = np.einsum("BKGTS,BSKH->BTKGH", dscores, k)  # [B,T,K,G,H]
    dk = np.einsum("BKGTS,BTKGH->BSKH", dscores, qg)  # [B,S,K,H]
    return dq.reshape(dout.shape), dk, dv


def attention_forward(
    x: np.ndarray,
    p: Params,
    cfg: ModelConfig,
    positions: np.ndarray,
    mask: np.ndarray,
    *,
    inv_freq: np.ndarray | None = None,
    lora_scale: float = 0.0,
    dropout: dict[str, np.ndarray] | None = None,
    past_kv: tuple[np.ndarray, np.ndarray] | None = None,
) -> tuple[np.ndarray, Cache]:
    """Multi-head self-attention: project, normalise heads (Qwen3), rotate (RoPE), attend,
    merge heads, project.

    Args:
      x: [B, T, D].
      p: ``{q_proj, k_proj, v_proj, o_proj}``, or GPT-2's ``{c_attn, c_proj}`` (fused q/k/v);
        with ``cfg.qk_norm`` also ``q_norm`` and ``k_norm``, each ``{weight [H]}``.
      positions: [B, T] positions of the queries (used by RoPE).
      mask: bool [B, T, S].
      inv_freq: [H/2] RoPE frequencies, or None for models without RoPE.
      lora_scale, dropout: passed to each projection; ``dropout`` maps names such as
        ``q_proj`` to that projection's adapter dropout mask.
      past_kv: cached ``(k, v)`` [B, S - T, K, H] of earlier positions, or None.
    Returns:
      [B, T, D] and the cache; ``cache["kv"]`` is ``(k, v)`` [B, S, K, H] for the next step.
    """
    b, t, _ = x.shape
    n, kv, h = cfg.n_heads, cfg.n_kv, cfg.hd
    drop = dropout or {}
    caches: dict[str, Any] = {}
    if cfg.fused_qkv:
        qkv, caches["c_attn"] = dense_forward(x, p["c_attn"], lora_scale, drop.get("c_attn"))
        q, k, v = np.split(qkv, [n * h, (n + kv) * h], axis=-1)  # [B,T,(N+2K)H] -> 3 parts
    else:
        q, caches["q_proj"] = dense_forward(x, p["q_proj"], lora_scale, drop.get("q_proj"))
        k, caches["k_proj"] = dense_forward(x, p["k_proj"], lora_scale, drop.get("k_proj"))
        v, caches["v_proj"] = dense_forward(x, p["v_proj"], lora_scale, drop.get("v_proj"))
    q = q.reshape(b, t, n, h)  # [B,T,NH] -> [B,T,N,H]
    k = k.reshape(b, t, kv, h)  # [B,T,KH] -> [B,T,K,H]
    v = v.reshape(b, t, kv, h)  # [B,T,KH] -> [B,T,K,H]
    if cfg.qk_norm:  # RMSNorm over each head's H features, shared by all heads
        q, caches["q_norm"] = rms_norm_forward(q, p["q_norm"]["weight"], cfg.norm_eps)
        k, caches["k_norm"] = rms_norm_forward(k, p["k_norm"]["weight"], cfg.norm_eps)
    if inv_freq is not None:
        factor = rope_attention_factor(cfg.rope_scaling)
        q, caches["rope_q"] = rope_forward(q, positions, inv_freq, factor)  # [B,T,N,H]
        k, caches["rope_k"] = rope_forward(k, positions, inv_freq, factor)  # [B,T,K,H]
    if past_kv is not None:
        k = np.concatenate([past_kv[0], k], axis=1)  # [B,S-T,K,H] + [B,T,K,H] -> [B,S,K,H]
        v = np.concatenate([past_kv[1], v], axis=1)  # [B,S,K,H]
    caches["kv"] = (k, v)
    o, caches["sdpa"] = sdpa_forward(q, k, v, mask)  # [B,T,N,H]
    o = o.reshape(b, t, n * h)  # [B,T,N,H] -> [B,T,NH]
    out_name = "c_proj" if cfg.fused_qkv else "o_proj"
    y, caches[out_name] = dense_forward(o, p[out_name], lora_scale, drop.get(out_name))
    return y, caches  # [B,T,D]


def attention_backward(
    dout: np.ndarray, cache: Cache, train_base: bool
) -> tuple[np.ndarray, Params]:
    """Returns ``(dx, grads)`` with grads keyed like the block's params (trainable leaves only).

    Not defined when the forward used ``past_kv`` (decoding is inference only).
    """
    b, t, _ = dout.shape
    grads: Params = {}
    fused = "c_attn" in cache
    out_name = "c_proj" if fused else "o_proj"
    do, grads[out_name] = dense_backward(dout, cache[out_name], train_base)  # [B,T,NH]
    dq, dk, dv = sdpa_backward(do.reshape(b, t, -1, cache["kv"][0].shape[-1]), cache["sdpa"])
    if "rope_q" in cache:
        dq = rope_backward(dq, cache["rope_q"])  # [B,T,N,H]
        dk = rope_backward(dk, cache["rope_k"])  # [B,T,K,H]
    if "q_norm" in cache:
        dq, dwq = rms_norm_backward(dq, cache["q_norm"])  # [B,T,N,H], [H]
        dk, dwk = rms_norm_backward(dk, cache["k_norm"])  # [B,T,K,H], [H]
        if train_base:
            grads["q_norm"], grads["k_norm"] = {"weight": dwq}, {"weight": dwk}
    dq, dk, dv = (g.reshape(b, t, -1) for g in (dq, dk, dv))  # [B,T,*,H] -> [B,T,*H]
    if fused:
        dqkv = np.concatenate([dq, dk, dv], axis=-1)  # [B,T,(N+2K)H]
        dx, grads["c_attn"] = dense_backward(dqkv, cache["c_attn"], train_base)
    else:
        dx, grads["q_proj"] = dense_backward(dq, cache["q_proj"], train_base)
        dxk, grads["k_proj"] = dense_backward(dk, cache["k_proj"], train_base)
        dxv, grads["v_proj"] = dense_backward(dv, cache["v_proj"], train_base)
        dx = dx + dxk + dxv  # [B,T,D]
    return dx, {name: g for name, g in grads.items() if g}
