"""Elementary layers, each a forward returning ``(out, cache)`` beside its backward.

Every ``*_backward(dout, cache)`` returns the gradient of a scalar loss with respect to each
input of the forward, given ``dout``, the gradient with respect to its output. All of them are
checked against central finite differences in float64 (``tests/test_layers.py``).

Shapes use the axis letters of ``config.py``; ``...`` stands for any leading axes.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

Cache = Any

_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
_GELU_TANH_C = 0.044715  # the cubic coefficient of the tanh approximation (Hendrycks & Gimpel)
_erf = np.vectorize(math.erf, otypes=[np.float64])  # NumPy has no erf; exact to float64


def check_shape(name: str, x: np.ndarray, shape: tuple[int | None, ...]) -> None:
    """Raise ValueError unless ``x.shape`` matches ``shape`` (``None`` matches any size)."""
    ok = x.ndim == len(shape) and all(
        e is None or e == g for e, g in zip(shape, x.shape, strict=False)
    )
    if not ok:
        want = "[" + ", ".join("*" if e is None else str(e) for e in shape) + "]"
        raise ValueError(f"{name}: expected shape {want}, got {list(x.shape)}")


# --- embedding ------------------------------------------------------------------------


def embedding_forward(ids: np.ndarray, table: np.ndarray) -> tuple[np.ndarray, Cache]:
    """Look up rows of ``table``.

    Args:
      ids: int [B, T], each in ``[0, V)``.
      table: [V, D].
    Returns:
      [B, T, D] and the cache.
    """
    if not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"ids: expected an integer array, got dtype {ids.dtype}")
    if ids.size and (ids.min() < 0 or ids.max() >= table.shape[0]):
        raise ValueError(
            f"ids: expected token ids in [0, {table.shape[0]}), "
            f"got values in [{ids.min()}, {ids.max()}]"
        )
    out = table[ids]  # [B,T] -> [B,T,D]
    return out, (ids, table.shape)


def embedding_backward(dout: np.ndarray, cache: Cache) -> np.ndarray:
    """Gradient of the table: rows scatter-add the gradients of every place they were used."""
    ids, table_shape = cache
    dtable = np.zeros(table_shape, dtype=dout.dtype)  # [V,D]
    np.add.at(dtable, ids, dout)  # [B,T,D] summed into the rows named by ids -> [V,D]
    return dtable


# --- linear ---------------------------------------------------------------------------


def linear_forward(
    x: np.ndarray, kernel: np.ndarray, bias: np.ndarray | None = None
) -> tuple[np.ndarray, Cache]:
    """``y = x @ W + b`` with the kernel stored ``[in, out]``.

    Args:
      x: [..., I].
      kernel: [I, O].
      bias: [O] or None.
    Returns:
      [..., O] and the cache.
    """
    if x.shape[-1] != kernel.shape[0]:
        raise ValueError(
            f"linear input: expected last axis {kernel.shape[0]} (kernel [in, out] = "
            f"{list(kernel.shape)}), got shape {list(x.shape)}"
        )
    y = x @ kernel  # [...,I] @ [I,O] -> [...,O]
    if bias is not None:
        y = y + bias  # [...,O] + [O]
    return y, (x, kernel, bias is not None)


def linear_backward(
    dout: np.ndarray, cache: Cache, weight_grads: bool = True
) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
    """Returns ``(dx, dkernel, dbias)``; the last two are None when ``weight_grads`` is off
    (a frozen base under LoRA) or, for ``dbias``, when the layer has no bias."""
    x, kernel, has_bias = cache
    dx = dout @ kernel.T  # [...,O] @ [O,I] -> [...,I]
    if not weight_grads:
        return dx, None, None
    x2 = x.reshape(-1, x.shape[-1])  # [...,I] -> [M,I]
    d2 = dout.reshape(-1, dout.shape[-1])  # [...,O] -> [M,O]
    dkernel = x2.T @ d2  # [I,M] @ [M,O] -> [I,O]
    dbias = d2.sum(axis=0) if has_bias else None  # [M,O] -> [O]
    return dx, dkernel, dbias


# --- normalisation --------------------------------------------------------------------


def layer_norm_forward(
    x: np.ndarray, weight: np.ndarray, bias: np.ndarray, eps: float
) -> tuple[np.ndarray, Cache]:
    """LayerNorm over the last axis: ``(x - mean) / sqrt(var + eps) * weight + bias``.

    The variance is the biased (population) one, as in PyTorch. Args: x [..., D], weight
    [D], bias [D]. Returns [..., D].
    """
    mu = x.mean(axis=-1, keepdims=True)  # [...,D] -> [...,1]
    xc = x - mu  # [...,D]
    inv_std = 1.0 / np.sqrt((xc * xc).mean(axis=-1, keepdims=True) + eps)  # [...,1]
    xhat = xc * inv_std  # [...,D]
    return xhat * weight + bias, (xhat, inv_std, weight)


def layer_norm_backward(
    dout: np.ndarray, cache: Cache
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Returns ``(dx, dweight, dbias)``.

    With ``g = dout * weight``: ``dx = inv_std * (g - mean(g) - xhat * mean(g * xhat))``.
    """
    xhat, inv_std, weight = cache
    lead = tuple(range(dout.ndim - 1))
    dweight = (dout * xhat).sum(axis=lead)  # [...,D] -> [D]
    dbias = dout.sum(axis=lead)  # [...,D] -> [D]
    g = dout * weight  # [...,D]
    dx = inv_std * (
        g - g.mean(axis=-1, keepdims=True) - xhat * (g * xhat).mean(axis=-1, keepdims=True)
    )  # [...,D]
    return dx, dweight, dbias


def rms_norm_forward(x: np.ndarray, weight: np.ndarray, eps: float) -> tuple[np.ndarray, Cache]:
    """RMSNorm over the last axis: ``x / sqrt(mean(x^2) + eps) * weight`` (no centring, no bias).

    Args: x [..., D], weight [D]. Returns [..., D].
    """
    inv_rms = 1.0 / np.sqrt((x * x).mean(axis=-1, keepdims=True) + eps)  # [...,D] -> [...,1]
    xhat = x * inv_rms  # [...,D]
    return xhat * weight, (xhat, inv_rms, weight)


def rms_norm_backward(dout: np.ndarray, cache: Cache) -> tuple[np.ndarray, np.ndarray]:
    """Returns ``(dx, dweight)``; ``dx = inv_rms * (g - xhat * mean(g * xhat))``, g = dout*w."""
    xhat, inv_rms, weight = cache
    dweight = (dout * xhat).sum(axis=tuple(range(dout.ndim - 1)))  # [...,D] -> [D]
    g = dout * weight  # [...,D]
    dx = inv_rms * (g - xhat * (g * xhat).mean(axis=-1, keepdims=True))  # [...,D]
    return dx, dweight


# --- activations ----------------------------------------------------------------------


def relu_forward(x: np.ndarray) -> tuple[np.ndarray, Cache]:
    """``max(x, 0)``, elementwise."""
    return np.maximum(x, 0.0), x


def relu_backward(dout: np.ndarray, cache: Cache) -> np.ndarray:
    """The derivative is 1 where x > 0 and 0 elsewhere (0 at the kink, as in PyTorch)."""
    return dout * (cache > 0)


def gelu_forward(x: np.ndarray) -> tuple[np.ndarray, Cache]:
    """Exact GELU: ``x * Phi(x)`` with Phi the standard normal CDF."""
    cdf = 0.5 * (1.0 + _erf(x / math.sqrt(2.0)))  # [...]
    return x * cdf, (x, cdf)


def gelu_backward(dout: np.ndarray, cache: Cache) -> np.ndarray:
    """``d/dx x Phi(x) = Phi(x) + x phi(x)``."""
    x, cdf = cache
    pdf = np.exp(-0.5 * x * x) / math.sqrt(2.0 * math.pi)  # [...]
    return dout * (cdf + x * pdf)


def gelu_tanh_forward(x: np.ndarray) -> tuple[np.ndarray, Cache]:
    """GELU, tanh approximation (GPT-2's ``gelu_new``):
    ``0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))``."""
    t = np.tanh(_SQRT_2_OVER_PI * (x + _GELU_TANH_C * x**3))  # [...]
    return 0.5 * x * (1.0 + t), (x, t)


def gelu_tanh_backward(dout: np.ndarray, cache: Cache) -> np.ndarray:
    """Product rule, with ``d tanh(u) = (1 - tanh^2) du``."""
    x, t = cache
    du = _SQRT_2_OVER_PI * (1.0 + 3.0 * _GELU_TANH_C * x * x)  # [...]
    return dout * (0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * du)


def _sigmoid(x: np.ndarray) -> np.ndarray:
    # exp of a non-positive number only, so no overflow warning for large |x|
    e = np.exp(-np.abs(x))
    return np.where(x >= 0, 1.0 / (1.0 + e), e / (1.0 + e))


def silu_forward(x: np.ndarray) -> tuple[np.ndarray, Cache]:
    """SiLU (swish): ``x * sigmoid(x)``."""
    s = _sigmoid(x)
    return x * s, (x, s)


def silu_backward(dout: np.ndarray, cache: Cache) -> np.ndarray:
    """``d/dx x s(x) = s (1 + x (1 - s))``."""
    x, s = cache
    return dout * s * (1.0 + x * (1.0 - s))


def swiglu_forward(gate: np.ndarray, up: np.ndarray) -> tuple[np.ndarray, Cache]:
    """SwiGLU's gating: ``silu(gate) * up``. Args: gate, up [..., F]. Returns [..., F]."""
    act, silu_cache = silu_forward(gate)  # [...,F]
    return act * up, (act, up, silu_cache)


def swiglu_backward(dout: np.ndarray, cache: Cache) -> tuple[np.ndarray, np.ndarray]:
    """Returns ``(dgate, dup)``."""
    act, up, silu_cache = cache
    return silu_backward(dout * up, silu_cache), dout * act


# --- softmax and the loss -------------------------------------------------------------


def softmax_forward(x: np.ndarray, mask: np.ndarray | None = None) -> tuple[np.ndarray, Cache]:
    """Softmax over the last axis, max-subtracted; entries where ``mask`` is False get 0.

    A row whose entries are all masked gives all zeros (not NaN): nothing to attend to means
    no contribution. Args: x [..., S]; mask bool, broadcastable to x, or None.
    """
    if mask is not None:
        x = np.where(mask, x, -np.inf)  # [...,S]
    m = x.max(axis=-1, keepdims=True)  # [...,1]
    m = np.where(np.isfinite(m), m, 0.0)  # a fully masked row has max -inf
    e = np.exp(x - m)  # [...,S]; exp(-inf) = 0 at masked entries
    z = e.sum(axis=-1, keepdims=True)  # [...,1]
    p = e / np.where(z > 0, z, 1.0)  # [...,S]
    return p, p


def softmax_backward(dout: np.ndarray, cache: Cache) -> np.ndarray:
    """``dx = p * (dout - sum(dout * p))``; zero at masked entries since p is zero there."""
    p = cache
    return p * (dout - (dout * p).sum(axis=-1, keepdims=True))  # [...,S]


IGNORE_INDEX = -100  # label value that takes no part in the loss (PyTorch's default)


def cross_entropy_forward(logits: np.ndarray, targets: np.ndarray) -> tuple[float, Cache]:
    """Mean token cross-entropy over the counted targets.

    Args:
      logits: [B, T, V].
      targets: int [B, T]; ``IGNORE_INDEX`` (-100) marks positions that do not count.
    Returns:
      The mean over counted positions of ``logsumexp(logits) - logits[target]``; 0.0 when no
      position counts (so an all-prompt batch adds nothing instead of NaN).
    """
    check_shape("targets", targets, logits.shape[:-1])
    valid = targets != IGNORE_INDEX  # [B,T]
    if np.any(valid & ((targets < 0) | (targets >= logits.shape[-1]))):
        raise ValueError(f"targets: expected ids in [0, {logits.shape[-1]}) or {IGNORE_INDEX}")
    safe = np.where(valid, targets, 0)  # [B,T]
    m = logits.max(axis=-1, keepdims=True)  # [B,T,1]
    lse = m[..., 0] + np.log(np.exp(logits - m).sum(axis=-1))  # [B,T]
    picked = np.take_along_axis(logits, safe[..., None], axis=-1)[..., 0]  # [B,T]
    count = max(int(valid.sum()), 1)
    loss = float(((lse - picked) * valid).sum() / count)
    return loss, (logits, lse, safe, valid, count)


def cross_entropy_backward(dloss: float, cache: Cache) -> np.ndarray:
    """``dlogits = (softmax(logits) - onehot(target)) * valid / count * dloss``."""
    logits, lse, safe, valid, count = cache
    d = np.exp(logits - lse[..., None])  # softmax, [B,T,V]
    np.put_along_axis(d, safe[..., None], np.take_along_axis(d, safe[..., None], -1) - 1.0, -1)
    return d * (valid[..., None] * (dloss / count))  # [B,T,V]
