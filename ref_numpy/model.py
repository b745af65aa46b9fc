"""The decoder-only transformer: forward, full backward, and the causal language-model loss.

The param tree (names follow the checkpoints, see ``hf.py`` for the file names)::

    embed.embedding        [V, D]     token embeddings
    pos_embed.embedding    [P, D]     learned positions (gpt2 only)
    layers[i].attn_norm    {weight [D], bias? [D]}
    layers[i].attn         {q_proj, k_proj, v_proj, o_proj} or gpt2 {c_attn, c_proj};
                           qk_norm models add {q_norm, k_norm}: {weight [H]}
    layers[i].mlp_norm     {weight, bias?}
    layers[i].mlp          {gate_proj, up_proj, down_proj} (swiglu), {up_proj, down_proj},
                           or gpt2 {c_fc, c_proj}
    final_norm             {weight, bias?}  (pre-LN models only)
    lm_head.kernel         [D, V]     absent with tied embeddings (logits = x @ embed^T)

Each projection is ``{kernel [in, out], bias? [out], lora_A? [in, R], lora_B? [R, out]}``.

A block is pre-LN ``x + f(norm(x))`` (GPT-2, Llama) or post-LN ``norm(x + f(x))`` (2017).
When any projection carries a LoRA adapter the whole base is frozen: ``model_backward``
returns gradients for the adapters only, and never computes the others.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from . import layers as L
from .attention import attention_backward, attention_forward, attention_mask
from .config import ModelConfig, attn_shapes, has_bias, mlp_names, mlp_shapes
from .lora import dense_backward, dense_forward, has_lora
from .positional import (
    learned_backward,
    learned_forward,
    rope_frequencies,
    sinusoidal_forward,
)

Params = dict[str, Any]

ACTIVATIONS = {
    "relu": (L.relu_forward, L.relu_backward),
    "gelu": (L.gelu_forward, L.gelu_backward),
    "gelu_tanh": (L.gelu_tanh_forward, L.gelu_tanh_backward),
}


def init_params(cfg: ModelConfig, rng: np.random.Generator, std: float = 0.02) -> Params:
    """Fresh float64 parameters: normal(0, std) matrices, zero biases, unit norm weights."""

    def norm() -> dict[str, np.ndarray]:
        p = {"weight": np.ones(cfg.d_model)}
        if cfg.norm == "layernorm":
            p["bias"] = np.zeros(cfg.d_model)
        return p

    def proj(name: str, shape: tuple[int, int]) -> dict[str, np.ndarray]:
        p = {"kernel": rng.normal(0.0, std, size=shape)}
        if has_bias(cfg, name):
            p["bias"] = np.zeros(shape[1])
        return p

    def attn() -> Params:
        p: Params = {name: proj(name, s) for name, s in attn_shapes(cfg).items()}
        if cfg.qk_norm:  # RMSNorm weights over one head's H features
            p["q_norm"], p["k_norm"] = {"weight": np.ones(cfg.hd)}, {"weight": np.ones(cfg.hd)}
        return p

    params: Params = {"embed": {"embedding": rng.normal(0.0, std, (cfg.vocab_size, cfg.d_model))}}
    if cfg.position == "learned":
        params["pos_embed"] = {"embedding": rng.normal(0.0, std, (cfg.max_seq_len, cfg.d_model))}
    params["layers"] = [
        {
            "attn_norm": norm(),
            "attn": attn(),
            "mlp_norm": norm(),
            "mlp": {name: proj(name, s) for name, s in mlp_shapes(cfg).items()},
        }
        for _ in range(cfg.n_layers)
    ]
    if cfg.norm_order == "pre":
        params["final_norm"] = norm()
    if not cfg.tie_embeddings:
        params["lm_head"] = {"kernel": rng.normal(0.0, std, (cfg.d_model, cfg.vocab_size))}
    return params


# --- pieces of a block ----------------------------------------------------------------


def norm_forward(x: np.ndarray, p: Params, cfg: ModelConfig) -> tuple[np.ndarray, Any]:
    """LayerNorm or RMSNorm over the last axis, as the config says. [..., D] -> [..., D]."""
    if cfg.norm == "layernorm":
        return L.layer_norm_forward(x, p["weight"], p["bias"], cfg.norm_eps)
    return L.rms_norm_forward(x, p["weight"], cfg.norm_eps)


def norm_backward(
    dout: np.ndarray, cache: Any, cfg: ModelConfig
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Returns ``(dx, {weight, bias?})``."""
    if cfg.norm == "layernorm":
        dx, dw, db = L.layer_norm_backward(dout, cache)
        return dx, {"weight": dw, "bias": db}
    dx, dw = L.rms_norm_backward(dout, cache)
    return dx, {"weight": dw}


def mlp_forward(
    x: np.ndarray,
    p: Params,
    cfg: ModelConfig,
    lora_scale: float = 0.0,
    dropout: dict[str, np.ndarray] | None = None,
) -> tuple[np.ndarray, Any]:
    """``down(act(up(x)))``, or SwiGLU ``down(silu(gate(x)) * up(x))``. [B,T,D] -> [B,T,D]."""
    drop = dropout or {}
    names = mlp_names(cfg)
    caches: dict[str, Any] = {}
    up_name, down_name = names[-2], names[-1]
    u, caches[up_name] = dense_forward(x, p[up_name], lora_scale, drop.get(up_name))  # [B,T,F]
    if cfg.activation == "swiglu":
        g, caches["gate_proj"] = dense_forward(
            x, p["gate_proj"], lora_scale, drop.get("gate_proj")
        )  # [B,T,F]
        a, caches["act"] = L.swiglu_forward(g, u)  # [B,T,F]
    else:
        a, caches["act"] = ACTIVATIONS[cfg.activation][0](u)  # [B,T,F]
    y, caches[down_name] = dense_forward(a, p[down_name], lora_scale, drop.get(down_name))
    return y, caches  # [B,T,D]


def mlp_backward(
    dout: np.ndarray, cache: Any, cfg: ModelConfig, train_base: bool
) -> tuple[np.ndarray, Params]:
    """Returns ``(dx, grads)`` keyed like the MLP's params (trainable leaves only)."""
    names = mlp_names(cfg)
    up_name, down_name = names[-2], names[-1]
    grads: Params = {}
    da, grads[down_name] = dense_backward(dout, cache[down_name], train_base)  # [B,T,F]
    if cfg.activation != "swiglu":
        du = ACTIVATIONS[cfg.activation][1](da, cache["act"])  # [B,T,F]
        dx, grads[up_name] = dense_backward(du, cache[up_name], train_base)  # [B,T,D]
        return dx, {name: g for name, g in grads.items() if g}
    dg, du = L.swiglu_backward(da, cache["act"])  # [B,T,F] each
    dx, grads["gate_proj"] = dense_backward(dg, cache["gate_proj"], train_base)  # [B,T,D]
    dxu, grads[up_name] = dense_backward(du, cache[up_name], train_base)  # [B,T,D]
    return dx + dxu, {name: g for name, g in grads.items() if g}


def block_forward(
    x: np.ndarray,
    p: Params,
    cfg: ModelConfig,
    positions: np.ndarray,
    mask: np.ndarray,
    inv_freq: np.ndarray | None,
    lora_scale: float = 0.0,
    dropout: dict[str, dict[str, np.ndarray]] | None = None,
    past_kv: tuple[np.ndarray, np.ndarray] | None = None,
) -> tuple[np.ndarray, Any]:
    """One decoder block, pre-LN or post-LN. [B, T, D] -> [B, T, D].

    ``dropout`` is ``{"attn": {name: mask}, "mlp": {name: mask}}`` for adapter inputs.
    """
    drop = dropout or {}

    def attn(h: np.ndarray) -> tuple[np.ndarray, Any]:
        return attention_forward(
            h,
            p["attn"],
            cfg,
            positions,
            mask,
            inv_freq=inv_freq,
            lora_scale=lora_scale,
            dropout=drop.get("attn"),
            past_kv=past_kv,
        )

    def mlp(h: np.ndarray) -> tuple[np.ndarray, Any]:
        return mlp_forward(h, p["mlp"], cfg, lora_scale, drop.get("mlp"))

    c: dict[str, Any] = {}
    if cfg.norm_order == "pre":
        h, c["attn_norm"] = norm_forward(x, p["attn_norm"], cfg)  # [B,T,D]
        a, c["attn"] = attn(h)  # [B,T,D]
        x = x + a  # [B,T,D]
        h, c["mlp_norm"] = norm_forward(x, p["mlp_norm"], cfg)  # [B,T,D]
        m, c["mlp"] = mlp(h)  # [B,T,D]
        return x + m, c
    a, c["attn"] = attn(x)  # [B,T,D]
    x, c["attn_norm"] = norm_forward(x + a, p["attn_norm"], cfg)  # [B,T,D]
    m, c["mlp"] = mlp(x)  # [B,T,D]
    x, c["mlp_norm"] = norm_forward(x + m, p["mlp_norm"], cfg)  # [B,T,D]
    return x, c


def block_backward(
    dout: np.ndarray, c: Any, cfg: ModelConfig, train_base: bool
) -> tuple[np.ndarray, Params]:
    """Returns ``(dx, grads)`` for one block; norm weights train only when the base does."""
    g: Params = {}
    if cfg.norm_order == "pre":
        dh, g["mlp"] = mlp_backward(dout, c["mlp"], cfg, train_base)
        dx_norm, g["mlp_norm"] = norm_backward(dh, c["mlp_norm"], cfg)
        dx = dout + dx_norm  # [B,T,D]: residual plus the branch
        dh, g["attn"] = attention_backward(dx, c["attn"], train_base)
        dx_norm, g["attn_norm"] = norm_backward(dh, c["attn_norm"], cfg)
        dx = dx + dx_norm  # [B,T,D]
    else:
        dz, g["mlp_norm"] = norm_backward(dout, c["mlp_norm"], cfg)  # through norm(x + m)
        dm, g["mlp"] = mlp_backward(dz, c["mlp"], cfg, train_base)
        dz, g["attn_norm"] = norm_backward(dz + dm, c["attn_norm"], cfg)
        da, g["attn"] = attention_backward(dz, c["attn"], train_base)
        dx = dz + da  # [B,T,D]
    if not train_base:
        del g["attn_norm"], g["mlp_norm"]
    return dx, {name: grads for name, grads in g.items() if grads}


# --- the whole model ------------------------------------------------------------------


def default_positions(batch: int, length: int) -> np.ndarray:
    """``0..T-1`` for every row. Returns int [B, T]."""
    return np.broadcast_to(np.arange(length), (batch, length))  # [B,T]


def model_forward(
    params: Params,
    cfg: ModelConfig,
    ids: np.ndarray,
    *,
    positions: np.ndarray | None = None,
    attention_mask_2d: np.ndarray | None = None,
    segment_ids: np.ndarray | None = None,
    lora_scale: float = 0.0,
    dropout: dict[str, np.ndarray] | None = None,
) -> tuple[np.ndarray, Any]:
    """Logits for every position.

    Args:
      ids: int [B, T] token ids.
      positions: int [B, T]; default ``0..T-1`` per row (packing passes per-segment ones).
      attention_mask_2d: [B, T] of 1/0, Hugging Face's ``attention_mask`` (padding).
      segment_ids: [B, T] packed-example ids; attention stays within a segment.
      lora_scale: the adapters' scale (``LoraConfig.scale``).
      dropout: ``{projection path: mask [B, T, I]}`` from ``lora.dropout_masks``, or None.
    Returns:
      logits [B, T, V] and the cache for ``model_backward``.
    """
    b, t = ids.shape
    if t > cfg.max_seq_len:
        raise ValueError(f"ids: sequence length {t} exceeds max_seq_len={cfg.max_seq_len}")
    positions = default_positions(b, t) if positions is None else positions
    masks = {
        w: attention_mask(b, t, t, padding=attention_mask_2d, segment_ids=segment_ids, window=w)
        for w in {cfg.layer_window(i) for i in range(cfg.n_layers)}
    }  # {window: [B,T,T]}, one per distinct sliding window (None: full causal)
    inv_freq = rope_inv_freq(cfg)  # [H/2] or None
    x, c = embed_forward(params, cfg, ids, positions)  # [B,T,D]
    c["layers"] = []
    for i, p in enumerate(params["layers"]):
        drop = _layer_dropout(dropout, i)
        mask = masks[cfg.layer_window(i)]  # [B,T,T]
        x, lc = block_forward(x, p, cfg, positions, mask, inv_freq, lora_scale, drop)  # [B,T,D]
        c["layers"].append(lc)
    logits, c["head"] = head_forward(params, cfg, x)  # [B,T,V]
    c["train_base"] = not has_lora(params)
    return logits, c


def rope_inv_freq(cfg: ModelConfig) -> np.ndarray | None:
    """RoPE frequencies [H/2] for rotary models, None for the others."""
    if cfg.position != "rope":
        return None
    return rope_frequencies(cfg.hd, cfg.rope_theta, cfg.rope_scaling)


def embed_forward(
    params: Params, cfg: ModelConfig, ids: np.ndarray, positions: np.ndarray
) -> tuple[np.ndarray, dict[str, Any]]:
    """Token embeddings plus, for sinusoidal and learned models, position embeddings.

    Args: ids [B, T], positions [B, T]. Returns [B, T, D] and a cache dict.
    """
    c: dict[str, Any] = {}
    x, c["embed"] = L.embedding_forward(ids, params["embed"]["embedding"])  # [B,T,D]
    if cfg.scale_embeddings:
        x = x * math.sqrt(cfg.d_model)  # the 2017 paper scales embeddings by sqrt(D)
    if cfg.position == "sinusoidal":
        x, _ = sinusoidal_forward(x, positions)  # [B,T,D]
    elif cfg.position == "learned":
        x, c["pos_embed"] = learned_forward(x, positions, params["pos_embed"]["embedding"])
    return x, c


def head_forward(params: Params, cfg: ModelConfig, x: np.ndarray) -> tuple[np.ndarray, Any]:
    """Final norm (pre-LN models) and the output projection. [B, T, D] -> [B, T, V]."""
    c: dict[str, Any] = {}
    if cfg.norm_order == "pre":
        x, c["final_norm"] = norm_forward(x, params["final_norm"], cfg)  # [B,T,D]
    if cfg.tie_embeddings:
        head = params["embed"]["embedding"].T  # [V,D] -> [D,V]
    else:
        head = params["lm_head"]["kernel"]  # [D,V]
    logits, c["lm_head"] = L.linear_forward(x, head)  # [B,T,D] -> [B,T,V]
    return logits, c


def _layer_dropout(
    dropout: dict[str, np.ndarray] | None, i: int
) -> dict[str, dict[str, np.ndarray]] | None:
    """``{"layers.i.attn.q_proj": m}`` -> ``{"attn": {"q_proj": m}}`` for layer i."""
    if not dropout:
        return None
    out: dict[str, dict[str, np.ndarray]] = {}
    prefix = f"layers.{i}."
    for path, m in dropout.items():
        if path.startswith(prefix):
            group, name = path[len(prefix) :].split(".")
            out.setdefault(group, {})[name] = m
    return out


def model_backward(dlogits: np.ndarray, c: Any, cfg: ModelConfig) -> Params:
    """Gradients of the loss, in the shape of the param tree, trainable leaves only.

    Full fine-tuning (no adapters) returns every leaf; LoRA / QLoRA return only ``lora_A`` and
    ``lora_B`` leaves and skip the weight gradients of the frozen base entirely.
    """
    train_base = c["train_base"]
    grads: Params = {}
    head = c["head"]
    dx, dhead, _ = L.linear_backward(dlogits, head["lm_head"], weight_grads=train_base)  # [B,T,D]
    if cfg.norm_order == "pre":
        dx, dnorm = norm_backward(dx, head["final_norm"], cfg)
        if train_base:
            grads["final_norm"] = dnorm
    layer_grads = []
    for lc in reversed(c["layers"]):
        dx, g = block_backward(dx, lc, cfg, train_base)  # [B,T,D]
        layer_grads.append(g)
    grads["layers"] = layer_grads[::-1]
    if not train_base:
        return grads
    if cfg.position == "learned":
        dx, dpos = learned_backward(dx, c["pos_embed"])
        grads["pos_embed"] = {"embedding": dpos}
    if cfg.scale_embeddings:
        dx = dx * math.sqrt(cfg.d_model)
    dembed = L.embedding_backward(dx, c["embed"])  # [V,D]
    assert dhead is not None  # the base trains, so the head's gradient was computed
    if cfg.tie_embeddings:
        dembed = dembed + dhead.T  # the head used embed^T: its gradient adds, transposed
    else:
        grads["lm_head"] = {"kernel": dhead}
    grads["embed"] = {"embedding": dembed}
    return grads


def causal_lm_loss(logits: np.ndarray, labels: np.ndarray) -> tuple[float, Any]:
    """Next-token cross-entropy: position t predicts ``labels[t + 1]``, as Hugging Face does.

    Args:
      logits: [B, T, V].
      labels: int [B, T]; -100 where a token must not count (prompt, padding, other segment).
    Returns:
      The mean over counted tokens and the cache.
    """
    L.check_shape("labels", labels, logits.shape[:2])
    loss, cache = L.cross_entropy_forward(logits[:, :-1], labels[:, 1:])  # [B,T-1,V]
    return loss, (cache, logits.shape)


def causal_lm_loss_backward(dloss: float, cache: Any) -> np.ndarray:
    """Returns dlogits [B, T, V]; the last position predicts nothing and gets zero."""
    ce_cache, shape = cache
    dlogits = np.zeros(shape, dtype=ce_cache[0].dtype)  # [B,T,V]
    dlogits[:, :-1] = L.cross_entropy_backward(dloss, ce_cache)  # [B,T-1,V]
    return dlogits


def loss_and_grads(
    params: Params, cfg: ModelConfig, ids: np.ndarray, labels: np.ndarray, **forward_kwargs: Any
) -> tuple[float, Params]:
    """Forward, loss and backward in one call. Keyword arguments go to ``model_forward``."""
    logits, cache = model_forward(params, cfg, ids, **forward_kwargs)
    loss, loss_cache = causal_lm_loss(logits, labels)
    return loss, model_backward(causal_lm_loss_backward(1.0, loss_cache), cache, cfg)
