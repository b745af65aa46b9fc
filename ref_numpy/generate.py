"""Autoregressive decoding with a KV cache: greedy and sampled (temperature, top-k, top-p).

The prompt is run once through the model, keeping every layer's keys and values; each new
token then costs one position: its queries attend to the cached keys and values of all
earlier positions plus its own. A plain Python loop, one token per step.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .attention import attention_mask
from .config import ModelConfig
from .model import block_forward, default_positions, embed_forward, head_forward, rope_inv_freq

Params = dict[str, Any]
KVCache = list[tuple[np.ndarray, np.ndarray]]


def forward_cached(
    params: Params,
    cfg: ModelConfig,
    ids: np.ndarray,
    past: KVCache | None = None,
    lora_scale: float = 0.0,
) -> tuple[np.ndarray, KVCache]:
    """Logits of ``ids`` placed after the cached positions, and the grown cache.

    Args:
      ids: int [B, T] new tokens.
      past: per layer ``(k, v)`` [B, P, K, H] of the P earlier positions, or None.
    Returns:
      logits [B, T, V] and per layer ``(k, v)`` [B, P + T, K, H].
    """
    b, t = ids.shape
    start = 0 if past is None else past[0][0].shape[1]
    if start + t > cfg.max_seq_len:
        raise ValueError(f"ids: position {start + t - 1} exceeds max_seq_len={cfg.max_seq_len}")
    positions = start + default_positions(b, t)  # [B,T]
    x, _ = embed_forward(params, cfg, ids, positions)  # [B,T,D]
    new_past: KVCache = []
    for i, p in enumerate(params["layers"]):
        layer_past = None if past is None else past[i]
        # [B,T,P+T]: causal over cache and new tokens, within the layer's sliding window
        mask = attention_mask(b, t, start + t, window=cfg.layer_window(i))
        x, c = block_forward(
            x, p, cfg, positions, mask, rope_inv_freq(cfg), lora_scale, past_kv=layer_past
        )  # [B,T,D]
        new_past.append(c["attn"]["kv"])
    logits, _ = head_forward(params, cfg, x)  # [B,T,V]
    return logits, new_past


def sample_token(
    logits: np.ndarray,
    rng: np.random.Generator | None = None,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
) -> np.ndarray:
    """Pick one token per row. Args: logits [B, V]. Returns int [B].

    ``temperature == 0`` is greedy (argmax; ties to the lowest id). Otherwise the logits are
    divided by the temperature, cut to the ``top_k`` largest, then to the smallest set whose
    probability reaches ``top_p`` (the most likely token always stays), and sampled.
    """
    if temperature < 0:
        raise ValueError(f"temperature: expected >= 0, got {temperature}")
    if temperature == 0:
        return logits.argmax(axis=-1)  # [B,V] -> [B]
    if rng is None:
        raise ValueError("rng: sampling (temperature > 0) needs a random generator")
    z = logits / temperature  # [B,V]
    if top_k is not None:
        if top_k < 1:
            raise ValueError(f"top_k: expected >= 1, got {top_k}")
        kth = np.sort(z, axis=-1)[:, -min(top_k, z.shape[-1])][:, None]  # [B,1]
        z = np.where(z < kth, -np.inf, z)  # [B,V]
    p = np.exp(z - z.max(axis=-1, keepdims=True))  # [B,V]
    p /= p.sum(axis=-1, keepdims=True)
    if top_p is not None:
        if not 0.0 < top_p <= 1.0:
            raise ValueError(f"top_p: expected 0 < top_p <= 1, got {top_p}")
        order = np.argsort(-p, axis=-1, kind="stable")  # [B,V] most likely first
        sorted_p = np.take_along_axis(p, order, axis=-1)  # [B,V]
        before = np.cumsum(sorted_p, axis=-1) - sorted_p  # [B,V] mass of the likelier tokens
        keep_sorted = before < top_p  # [B,V]; the first token always has before = 0
        keep = np.zeros_like(keep_sorted)
        np.put_along_axis(keep, order, keep_sorted, axis=-1)  # back to vocabulary order
        p = np.where(keep, p, 0.0)
        p /= p.sum(axis=-1, keepdims=True)
    return np.array([rng.choice(p.shape[-1], p=row) for row in p])  # [B]


def generate(
    params: Params,
    cfg: ModelConfig,
    prompt: np.ndarray,
    max_new_tokens: int,
    *,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    rng: np.random.Generator | None = None,
    eos_id: int | None = None,
    lora_scale: float = 0.0,
) -> np.ndarray:
    """Continue each prompt row by up to ``max_new_tokens`` tokens.

    Args:
      prompt: int [B, T0], rows of equal length.
      eos_id: a row that produced it keeps producing it (so rows stay aligned); generation
        stops early when every row has.
    Returns:
      int [B, T0 + n], the prompt followed by the n generated tokens.
    """
    if prompt.ndim != 2 or prompt.shape[1] == 0:
        raise ValueError(f"prompt: expected int [B, T0] with T0 >= 1, got shape {prompt.shape}")
    logits, past = forward_cached(params, cfg, prompt, None, lora_scale)  # [B,T0,V]
    out = [prompt]
    done = np.zeros(prompt.shape[0], dtype=bool)  # [B]
    for step in range(max_new_tokens):
        tok = sample_token(logits[:, -1], rng, temperature, top_k, top_p)  # [B]
        if eos_id is not None:
            tok = np.where(done, eos_id, tok)
            done |= tok == eos_id
        out.append(tok[:, None])
        if done.all() or step == max_new_tokens - 1:
            break
        logits, past = forward_cached(params, cfg, tok[:, None], past, lora_scale)  # [B,1,V]
    return np.concatenate(out, axis=1)  # [B,T0+n]
