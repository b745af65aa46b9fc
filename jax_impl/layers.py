"""Mirror of ``ref_numpy/layers.py``: the same ops in jnp, differentiated by JAX.

Each op is named as the spec's forward without its ``_forward`` suffix (``linear`` for
``linear_forward``): the engine has no hand-written backward to pair it with.

Mixed precision: inputs arrive in the compute dtype; norms, softmax and the loss accumulate
in at least float32 (``acc_dtype``) and cast back, because a bfloat16 mean over a few
thousand features loses most of its bits. Variables carry logical axis names
(``out_sharding``) so a mesh can be laid over them without touching this code.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from ref_numpy.layers import IGNORE_INDEX

Array = jax.Array


class Frozen(nnx.Variable):
    """A base weight that does not train (LoRA / QLoRA): not an ``nnx.Param``, so an optimizer
    or ``nnx.grad`` filtered on ``nnx.Param`` never sees it."""


def acc_dtype(dtype: jnp.dtype) -> jnp.dtype:
    """The dtype reductions run in: float32, or float64 when the input is float64."""
    return jnp.promote_types(dtype, jnp.float32)


def variable(kind: type[nnx.Variable], value: Array, axes: tuple[str | None, ...]) -> nnx.Variable:
    """A variable of ``kind`` with logical axis names (no mesh needed to create it)."""
    return kind(value, out_sharding=axes, eager_sharding=False)


_PROJ_AXES = {
    ("attn", "q_proj"): ("embed", "q_heads"),
    ("attn", "k_proj"): ("embed", "kv_heads"),
    ("attn", "v_proj"): ("embed", "kv_heads"),
    ("attn", "o_proj"): ("q_heads", "embed"),
    ("attn", "c_attn"): ("embed", "qkv_heads"),
    ("attn", "c_proj"): ("q_heads", "embed"),
    ("mlp", "gate_proj"): ("embed", "mlp"),
    ("mlp", "up_proj"): ("embed", "mlp"),
    ("mlp", "c_fc"): ("embed", "mlp"),
    ("mlp", "down_proj"): ("mlp", "embed"),
    ("mlp", "c_proj"): ("mlp", "embed"),
}


def proj_axes(group: str, name: str) -> tuple[str, str]:
    """Logical names of a projection kernel's ``[in, out]`` axes, e.g. ``("embed", "mlp")``.

    The full vocabulary: ``layers`` (stacked blocks), ``vocab``, ``embed``, ``q_heads``,
    ``kv_heads``, ``qkv_heads``, ``head_dim``, ``mlp``, ``lora_rank``, ``positions``, ``nf4_bytes``,
    ``nf4_blocks``. A device mesh is laid over them by mapping these names to mesh axes.
    """
    return _PROJ_AXES[(group, name)]


# --- the ops --------------------------------------------------------------------------


def embedding(ids: Array, table: Array) -> Array:
    """[B, T] ids, [V, D] table -> [B, T, D]."""
    return jnp.take(table, ids, axis=0)  # [B,T] -> [B,T,D]


def linear(x: Array, kernel: Array, bias: Array | None = None) -> Array:
    """``x @ W + b``, kernel ``[in, out]``. [..., I] -> [..., O] in x's dtype.

    The products are summed in ``acc_dtype`` (what GPU and TPU matrix units do for bf16), the
    backward's too (``matmul``).
    """
    y = matmul(x, kernel, acc_dtype(x.dtype))  # [...,I] -> [...,O]
    if bias is not None:
        y = y + bias  # [...,O] + [O]
    return y.astype(x.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def matmul(x: Array, w: Array, out_dtype: Any) -> Array:
    """``x @ w`` summed in ``acc_dtype``: [..., I], [I, O] -> [..., O] in ``out_dtype``.

    Its backward takes the cotangent in x's (compute) dtype and sums each product in
    ``acc_dtype`` too: under bf16 compute every product of the step, forward and backward, is
    bf16 x bf16 summed in float32, the one form CPU matrix units (AMX, AVX512-BF16, through
    XLA's YNNPACK dots) and GPU tensor cores run at their bf16 rate. Autodiff of the forward
    line would form the backward products from the float32 cotangent of the float32 sums, and
    XLA would widen the bf16 operand to float32: on a CPU with AMX those products ran at a
    fifth of the bf16 rate. Rounding the cotangent to bf16 is what bf16 compute does to every
    other activation gradient (and what ``torch.autocast`` does). Under float32 and float64
    compute the cast is the identity and this is autodiff's backward.
    """
    acc = acc_dtype(x.dtype)
    return jnp.einsum("...I,IO->...O", x, w, preferred_element_type=acc).astype(out_dtype)


def _matmul_fwd(x: Array, w: Array, out_dtype: Any) -> tuple[Array, tuple[Array, Array]]:
    return matmul(x, w, out_dtype), (x, w)


def _matmul_bwd(out_dtype: Any, res: tuple[Array, Array], dy: Array) -> tuple[Array, Array]:
    """``(dx, dw)``: ``dy @ w^T`` and ``x^T @ dy`` over the flattened token axis."""
    x, w = res
    acc = acc_dtype(x.dtype)
    dy = dy.astype(x.dtype)  # [...,O] in the compute dtype
    dx = jnp.einsum("...O,IO->...I", dy, w, preferred_element_type=acc)  # [...,O] -> [...,I]
    xm, dym = x.reshape(-1, x.shape[-1]), dy.reshape(-1, dy.shape[-1])  # [M,I], [M,O]
    dw = token_sum_product(xm, dym)  # [I,O]
    return dx.astype(x.dtype), dw.astype(w.dtype)


def token_sum_product(a: Array, b: Array) -> Array:
    """``a^T @ b`` summed over the token axis M in ``acc_dtype``: [M, P], [M, Q] -> [P, Q].

    Every weight gradient is this product. XLA's CPU backend gives YNNPACK (and so AMX) only
    products whose left operand has the summed axis last in memory; it computes a bf16
    ``einsum("MP,MQ->PQ")`` from float32 copies at about a fifth of the bf16 rate, and folds
    an explicit ``a.T`` back into that form. Summing over the tokens as two axes,
    ``[P, M/2, 2] x [M/2, 2, Q]``, makes XLA lay out the left operand transposed in memory
    and hand the product to YNNPACK: 1.6-6.5x faster for bf16 operands on a CPU with AMX.
    The narrower operand is the one transposed: with P > Q the product is ``(b^T a)^T``, the
    last transpose behind an optimization barrier (XLA folds it into the product otherwise,
    back to a form no CPU runtime takes). An adapter's ``dA``, ``x^T dh`` with rank-16
    ``dh``, then transposes ``dh`` instead of ``x``: 2.6-2.7x faster. Float32, odd M and
    other backends keep the plain product.
    """
    acc = acc_dtype(a.dtype)
    m = a.shape[0]

    def plain() -> Array:
        return jnp.einsum("MP,MQ->PQ", a, b, preferred_element_type=acc)  # [P,Q]

    if a.dtype != jnp.bfloat16 or m % 2:
        return plain()

    def two_axes(left: Array, right: Array) -> Array:
        lt = left.reshape(m // 2, 2, -1).transpose(2, 0, 1)  # [M,L] -> [L,M/2,2]
        rr = right.reshape(m // 2, 2, -1)  # [M,R] -> [M/2,2,R]
        return jnp.einsum("LAB,ABR->LR", lt, rr, preferred_element_type=acc)  # [L,R]

    def narrower_transposed() -> Array:
        if a.shape[1] <= b.shape[1]:
            return two_axes(a, b)  # [P,Q]
        return jax.lax.optimization_barrier(two_axes(b, a)).T  # [Q,P] -> [P,Q]

    return jax.lax.platform_dependent(cpu=narrower_transposed, default=plain)


matmul.defvjp(_matmul_fwd, _matmul_bwd)


def layer_norm(x: Array, weight: Array, bias: Array, eps: float) -> Array:
    """LayerNorm over the last axis, accumulated in ``acc_dtype``. [..., D] -> [..., D]."""
    xf = x.astype(acc_dtype(x.dtype))  # [...,D]
    mu = xf.mean(axis=-1, keepdims=True)  # [...,D] -> [...,1]
    xc = xf - mu  # [...,D]
    inv_std = jax.lax.rsqrt((xc * xc).mean(axis=-1, keepdims=True) + eps)  # [...,1]
    xhat = xc * inv_std  # [...,D]
    return (xhat * weight + bias).astype(x.dtype)  # [...,D]


def rms_norm(x: Array, weight: Array, eps: float) -> Array:
    """RMSNorm over the last axis, accumulated in ``acc_dtype``. [..., D] -> [..., D]."""
    xf = x.astype(acc_dtype(x.dtype))  # [...,D]
    inv_rms = jax.lax.rsqrt((xf * xf).mean(axis=-1, keepdims=True) + eps)  # [...,D] -> [...,1]
    xhat = xf * inv_rms  # [...,D]
    return (xhat * weight).astype(x.dtype)  # [...,D]


def relu(x: Array) -> Array:
    return jnp.maximum(x, 0)


def gelu(x: Array) -> Array:
    """Exact GELU, ``x * Phi(x)``."""
    return x * 0.5 * (1.0 + jax.lax.erf(x / math.sqrt(2.0)))


def gelu_tanh(x: Array) -> Array:
    """GELU, tanh approximation (GPT-2)."""
    return 0.5 * x * (1.0 + jnp.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def silu(x: Array) -> Array:
    return x * jax.nn.sigmoid(x)


@jax.custom_vjp
def swiglu(gate: Array, up: Array) -> Array:
    """``silu(gate) * up``. [..., F] -> [..., F].

    The backward is the spec's ``swiglu_backward`` and keeps only ``gate`` and ``up``:
    ``sigmoid(gate)`` is recomputed inside the one pass that forms both cotangents, where
    autodiff of ``gate * sigmoid(gate) * up`` would keep the sigmoid and the products too,
    more ``[B, T, F]`` arrays than any other part of a block.

    Both directions run in ``acc_dtype`` and round once per output, as the
    norms do: under bf16 compute each bf16 operation would round, and XLA's CPU backend runs
    each as float32 with a conversion on both sides.
    """
    acc = acc_dtype(gate.dtype)
    g, u = gate.astype(acc), up.astype(acc)  # [...,F]
    return (silu(g) * u).astype(gate.dtype)  # [...,F]


def _swiglu_fwd(gate: Array, up: Array) -> tuple[Array, tuple[Array, Array]]:
    return swiglu(gate, up), (gate, up)


def _swiglu_bwd(res: tuple[Array, Array], dout: Array) -> tuple[Array, Array]:
    """``(dgate, dup)``: ``dout * up * s * (1 + gate * (1 - s))`` and ``dout * gate * s``."""
    gate, up = res
    acc = acc_dtype(gate.dtype)
    g, u, d = gate.astype(acc), up.astype(acc), dout.astype(acc)  # [...,F]
    s = jax.nn.sigmoid(g)  # [...,F], again
    dgate = d * u * s * (1.0 + g * (1.0 - s))  # [...,F]
    return dgate.astype(gate.dtype), (d * (g * s)).astype(up.dtype)  # [...,F], [...,F]


swiglu.defvjp(_swiglu_fwd, _swiglu_bwd)


ACTIVATIONS = {"relu": relu, "gelu": gelu, "gelu_tanh": gelu_tanh}


def softmax(x: Array, mask: Array | None = None) -> Array:
    """Masked softmax over the last axis, accumulated in ``acc_dtype``; a fully masked row
    gives zeros. [..., S] -> [..., S] in x's dtype; ``mask`` bool, broadcastable to x."""
    xf = x.astype(acc_dtype(x.dtype))  # [...,S]
    p = _masked_softmax(xf, jnp.ones((), bool) if mask is None else mask)  # [...,S]
    return p.astype(x.dtype)


@jax.custom_vjp
def _masked_softmax(xf: Array, mask: Array) -> Array:
    """The spec's ``softmax_forward`` on ``xf`` [..., S]; masked entries get 0.

    The backward is the spec's ``softmax_backward``, ``p * (dp - sum(dp * p))``: it keeps
    only ``p`` for the backward pass and reads it twice. Autodiff of the forward's lines
    would keep the exponentials, their sums and the mask, and spend several passes over
    the ``[B, K, G, T, S]`` attention scores.
    """
    xf = jnp.where(mask, xf, -jnp.inf)  # [...,S]
    m = xf.max(axis=-1, keepdims=True)  # [...,1]
    m = jnp.where(jnp.isfinite(m), m, 0.0)  # a fully masked row has max -inf
    e = jnp.exp(xf - m)  # [...,S]; exp(-inf) = 0 at masked entries
    z = e.sum(axis=-1, keepdims=True)  # [...,1]
    return e / jnp.where(z > 0, z, 1.0)  # [...,S]


def _masked_softmax_fwd(xf: Array, mask: Array) -> tuple[Array, Array]:
    p = _masked_softmax(xf, mask)  # [...,S]
    return p, p


def softmax_backward(p: Array, dp: Array) -> Array:
    """The spec's ``softmax_backward``: ``dx = p * (dp - sum(dp * p))`` over the last axis,
    zero at masked entries, where p is zero. [..., S], [..., S] -> [..., S]."""
    return p * (dp - (dp * p).sum(axis=-1, keepdims=True))  # [...,S]


def _masked_softmax_bwd(p: Array, dp: Array) -> tuple[Array, None]:
    """``softmax_backward``; the mask gets no cotangent."""
    return softmax_backward(p, dp), None  # [...,S]


_masked_softmax.defvjp(_masked_softmax_fwd, _masked_softmax_bwd)


def _row_loss_sums(logits: Array, targets: Array) -> tuple[Array, Array]:
    """``(sum of token cross-entropies over targets != -100, their count)`` per row, in
    ``acc_dtype``. logits [B, T, V], targets int [B, T] -> [B], [B]."""
    lf = logits.astype(acc_dtype(logits.dtype))  # [B,T,V]
    valid = targets != IGNORE_INDEX  # [B,T]
    safe = jnp.where(valid, targets, 0)  # [B,T]
    lse = jax.nn.logsumexp(lf, axis=-1)  # [B,T,V] -> [B,T]
    picked = jnp.take_along_axis(lf, safe[..., None], axis=-1)[..., 0]  # [B,T]
    return jnp.where(valid, lse - picked, 0.0).sum(-1), valid.sum(-1)  # [B,T] -> [B], [B]


def _loss_sum(logits: Array, targets: Array) -> tuple[Array, Array]:
    """``(sum of token cross-entropies over targets != -100, their count)``, in
    ``acc_dtype``. logits [B, T, V], targets int [B, T] -> [], []."""
    sums, counts = _row_loss_sums(logits, targets)  # [B], [B]
    return sums.sum(), counts.sum()


def cross_entropy(logits: Array, targets: Array) -> tuple[Array, Array]:
    """Mean token cross-entropy over targets != -100, and the count of those targets.

    Args: logits [B, T, V]; targets int [B, T]. Returns (scalar loss in ``acc_dtype``, int
    count). The loss is 0 when nothing counts.
    """
    total, count = _loss_sum(logits, targets)  # [], []
    return total / jnp.maximum(count, 1), count


# Rows of logits a CPU makes at a time in ``head_cross_entropy`` (``cpu_loss_rows``): at most
# CPU_LOSS_ROWS, fewer where the vocabulary is wide, so that a chunk's float32 logits, their
# exponentials and their cotangent stay near CPU_LOSS_LOGITS elements each (16 MB) instead of
# streaming [B * T, V] arrays through memory five times; never fewer than 128 rows, below
# which the head's products lose more than the caches give (bench/RESULTS.md).
CPU_LOSS_ROWS = 512
CPU_LOSS_LOGITS = 512 * 8192


def cpu_loss_rows(v: int) -> int:
    """Rows of ``[rows, V]`` logits a CPU makes at a time in ``head_cross_entropy``: 512 up to
    V = 8192, then ``CPU_LOSS_LOGITS // V``, at least 128 (SmolLM2's V = 49152 and Llama 3's
    128256 take 128)."""
    return min(CPU_LOSS_ROWS, max(128, CPU_LOSS_LOGITS // v))


def head_cross_entropy(x: Array, w: Array, targets: Array, chunk: int) -> tuple[Array, Array]:
    """``(sum of the token cross-entropies of x @ w over targets != -100, their count)``.

    The LM head and the loss in one pass, a chunk of rows at a time: each chunk makes its
    logits (summed in ``acc_dtype``), its loss, and its loss's gradient with respect to x
    (``dlogits @ w^T``, dlogits ``softmax - onehot`` rounded to the compute dtype as
    ``matmul``'s backward rounds it) and, where w trains, with respect to w (``x^T dlogits``).
    The backward pass only scales those gradients by the loss's cotangent: the cross-entropy is
    a sum, so its gradient is linear in that cotangent. The ``[B, T, V]`` logits never exist
    at once, nothing is recomputed, and no pass over them is left for the backward pass.
    On a CPU, positions whose target is ignored (prompts, padding) are taken last, and a
    chunk of nothing else makes no logits at all. A trained head (full fine-tuning, tied
    embeddings) keeps its ``[D, V]`` gradient, in ``acc_dtype``, from the loss to the
    backward pass.

    Args:
      x: [B, T, D] final hidden states (after the final norm), in the compute dtype.
      w: [D, V] the head's kernel, in the compute dtype.
      targets: int [B, T], -100 where nothing counts.
      chunk: positions per chunk (``EngineConfig.loss_chunk``): at most ``[B, chunk, V]``
        logits at once; 0, or at least T, takes every row at once. A CPU takes at most
        ``cpu_loss_rows(V)`` rows at a time either way.
    Returns:
      (summed loss in ``acc_dtype``, int count); the mean is ``sum / max(count, 1)``.
    """
    return _head_ce(chunk, x, w, targets)


def _head_rows(x: Array, chunk: int) -> int:
    """Rows of logits per chunk of ``head_cross_entropy`` on any backend."""
    b, t, _ = x.shape
    return b * chunk if 0 < chunk < t else b * t


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _head_ce(chunk: int, x: Array, w: Array, targets: Array) -> tuple[Array, Array]:
    """The loss alone (evaluation, no gradient): ``_head_ce_chunks`` without gradients."""
    total, count, _, _ = _head_ce_platforms(chunk, x, w, targets, False, False)
    return total, count


def _head_ce_fwd(
    chunk: int, x: Any, w: Any, targets: Any
) -> tuple[tuple[Array, Array], tuple[Array | None, Array | None, Array, Array]]:
    """With ``symbolic_zeros``: x, w and targets arrive as ``CustomVJPPrimal``; w's
    ``perturbed`` says whether its gradient is wanted. The residuals carry x's and w's dtypes
    as empty arrays."""
    xv, wv = x.value, w.value
    total, count, dx, dw = _head_ce_platforms(chunk, xv, wv, targets.value, True, w.perturbed)
    return (total, count), (dx, dw, jnp.zeros((0,), xv.dtype), jnp.zeros((0,), wv.dtype))


def _head_ce_bwd(
    chunk: int, res: tuple[Array, Array | None, Array, Array], cts: tuple[Any, Any]
) -> tuple[Array | None, Array | None, None]:
    """The forward's gradients of the summed loss, times its cotangent."""
    dx, dw, x_like, w_like = res
    g = cts[0]
    if isinstance(g, jax.custom_derivatives.SymbolicZero):
        return None, None, None
    g = g.astype(dx.dtype)
    dwg = None if dw is None else (g * dw).astype(w_like.dtype)  # [D,V]
    return (g * dx).astype(x_like.dtype), dwg, None  # [B,T,D]


_head_ce.defvjp(_head_ce_fwd, _head_ce_bwd, symbolic_zeros=True)


def _head_ce_platforms(
    chunk: int, x: Array, w: Array, targets: Array, grad_x: bool, grad_w: bool
) -> tuple[Array, Array, Array | None, Array | None]:
    """``_head_ce_chunks`` with a CPU's rows per chunk capped at ``cpu_loss_rows(V)``, and on a
    CPU alone the positions without a counted target skipped: elsewhere the rows of a batch
    sharded over devices stay where they are, since reordering them would move the hidden
    states across devices."""
    rows, cap = _head_rows(x, chunk), cpu_loss_rows(w.shape[1])

    def run(r: int, skip: bool) -> Callable[[], tuple[Array, Array, Array | None, Array | None]]:
        return lambda: _head_ce_chunks(x, w, targets, r, grad_x, grad_w, skip)

    out = jax.lax.platform_dependent(cpu=run(min(rows, cap), True), default=run(rows, False))
    return tuple(out)


def _head_ce_chunks(
    x: Array, w: Array, targets: Array, rows: int, grad_x: bool, grad_w: bool, skip: bool
) -> tuple[Array, Array, Array | None, Array | None]:
    """``(loss sum, count, dsum/dx [B, T, D] or None, dsum/dw [D, V] or None)``, the rows
    of x [B, T, D] taken ``rows`` at a time (the last chunk padded with ignored targets);
    the gradients in ``acc_dtype``. With ``skip`` the rows are taken counted targets first,
    so a chunk of ignored ones only (a prompt, padding) skips its products: with half of
    every row a prompt, half the head's work is left out."""
    b, t, d = x.shape
    acc = acc_dtype(x.dtype)
    m = b * t
    n = -(-m // rows)
    pad = n * rows - m
    xf, flat = x.reshape(m, d), targets.reshape(m)  # [M,D], [M]
    order = None
    if skip:  # counted positions first (in order): the ignored ones fill the last chunks
        order = jnp.argsort(flat == IGNORE_INDEX, stable=True)  # [M]
        xf, flat = xf[order], flat[order]  # [M,D], [M]
    xs = jnp.pad(xf, ((0, pad), (0, 0))).reshape(n, rows, d)  # [n,C,D]
    ts = jnp.pad(flat, (0, pad), constant_values=IGNORE_INDEX).reshape(n, rows)  # [n,C]

    def piece(dw: Array | None, xt: tuple[Array, Array]) -> tuple[Any, Any]:
        xc, tc = xt  # [C,D], [C]
        if not skip:
            return counted(dw, xc, tc)
        none = (dw, (jnp.zeros((), acc), jnp.zeros(xc.shape, acc) if grad_x else None))
        return jax.lax.cond((tc != IGNORE_INDEX).any(), counted, lambda *_: none, dw, xc, tc)

    def counted(dw: Array | None, xc: Array, tc: Array) -> tuple[Any, Any]:
        logits = jnp.einsum("CD,DV->CV", xc, w, preferred_element_type=acc)  # [C,V]
        valid = tc != IGNORE_INDEX  # [C]
        safe = jnp.where(valid, tc, 0)  # [C]
        top = logits.max(axis=-1, keepdims=True)  # [C,1]
        e = jnp.exp(logits - top)  # [C,V]
        z = e.sum(axis=-1, keepdims=True)  # [C,1]
        picked = jnp.take_along_axis(logits, safe[:, None], axis=-1)  # [C,1]
        loss = jnp.where(valid, (jnp.log(z) + top - picked)[:, 0], 0.0).sum()  # []
        if not grad_x:
            return dw, (loss, None)
        onehot = jnp.arange(logits.shape[-1]) == safe[:, None]  # [C,V]
        dlogits = jnp.where(valid[:, None], e / z - onehot, 0.0).astype(x.dtype)  # [C,V]
        dxc = jnp.einsum("CV,DV->CD", dlogits, w, preferred_element_type=acc)  # [C,D]
        if dw is not None:
            dw = dw + token_sum_product(xc, dlogits)  # [D,V]
        return dw, (loss, dxc)

    dw0 = jnp.zeros(w.shape, acc) if grad_w else None  # [D,V]
    dw, (losses, dxs) = jax.lax.scan(piece, dw0, (xs, ts))  # [n], [n,C,D]
    count = (targets != IGNORE_INDEX).sum()
    if dxs is None:
        return losses.sum(), count, None, dw
    dx = dxs.reshape(n * rows, d)  # [nC,D]
    dx = dx[:m] if order is None else dx[jnp.argsort(order)]  # [M,D]: back where each came from
    return losses.sum(), count, dx.reshape(b, t, d), dw


def row_cross_entropy(
    x: Array, head: Callable[[Array], Array], targets: Array, chunk: int
) -> tuple[Array, Array]:
    """Per row: the summed token cross-entropy of ``head(x)`` over targets != -100 and their
    count, the logits made ``chunk`` positions at a time, each chunk's recomputed for its
    gradient (``chunk`` 0, or at least T: all at once). Each row's sum has a cotangent of its
    own (a preference loss), so the gradients cannot be formed ahead as ``head_cross_entropy``
    forms them.

    Args: x [B, T, D]; head [B, C, D] -> [B, C, V]; targets int [B, T]. Returns ([B] in
    ``acc_dtype``, int [B]).
    """
    b, t, d = x.shape
    if not 0 < chunk < t:
        return _row_loss_sums(head(x), targets)  # [B], [B]
    n = -(-t // chunk)
    pad = n * chunk - t
    xs = jnp.pad(x, ((0, 0), (0, pad), (0, 0))).reshape(b, n, chunk, d)  # [B,nC,D] -> [B,n,C,D]
    ts = jnp.pad(targets, ((0, 0), (0, pad)), constant_values=IGNORE_INDEX).reshape(b, n, chunk)

    @jax.checkpoint
    def piece(xc: Array, tc: Array) -> tuple[Array, Array]:
        return _row_loss_sums(head(xc), tc)  # [B,C,D] -> [B,C,V] -> [B], [B]

    def body(carry: tuple[Array, Array], xt: tuple[Array, Array]) -> tuple[Any, None]:
        total, count = piece(*xt)
        return (carry[0] + total, carry[1] + count.astype(carry[1].dtype)), None

    init = (jnp.zeros((b,), acc_dtype(x.dtype)), jnp.zeros((b,), jnp.int32))
    (total, count), _ = jax.lax.scan(body, init, (xs.swapaxes(0, 1), ts.swapaxes(0, 1)))
    return total, count


# --- modules --------------------------------------------------------------------------


class Norm(nnx.Module):
    """LayerNorm (``weight``, ``bias``) or RMSNorm (``weight``), as ``cfg.norm`` says."""

    def __init__(
        self,
        d: int,
        kind: str,
        eps: float,
        base: type[nnx.Variable],
        param_dtype: jnp.dtype,
        axis: str = "embed",
    ) -> None:
        """``axis`` is the logical name of the normalised axis (``head_dim`` for Qwen3's
        per-head ``q_norm`` / ``k_norm``)."""
        self.kind, self.eps = kind, eps
        self.weight = variable(base, jnp.ones((d,), param_dtype), (axis,))
        if kind == "layernorm":
            self.bias = variable(base, jnp.zeros((d,), param_dtype), (axis,))

    def __call__(self, x: Array) -> Array:
        if self.kind == "layernorm":
            return layer_norm(x, self.weight[...], self.bias[...], self.eps)
        return rms_norm(x, self.weight[...], self.eps)
