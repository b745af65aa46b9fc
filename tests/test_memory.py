"""Memory: QLoRA stays 4-bit through the backward pass, under every rematerialisation policy,
and the loss over a large vocabulary never holds the whole logits.

Three measurements, none a timing:

* what each rematerialisation policy keeps for the backward pass (the saved residuals of the
  loss, stacked over the scanned layers): the policy's name says it;

* the residuals JAX saves from the forward pass for the backward pass of the QLoRA loss
  (``jax.ad_checkpoint.print_saved_residuals``) hold no float array of a projection kernel's
  shape: the backward dequantizes each NF4 kernel again (``jax_impl.nf4.nf4_linear``);
* XLA's compiled memory analysis of the gradient: QLoRA's arguments plus temporaries (what the
  step needs resident) are below LoRA's at the same shape, and QLoRA's temporaries exceed
  LoRA's by less than two layers' float kernels (one dequantized layer at a time, not a float
  copy of every layer kept for the backward pass).
"""

from __future__ import annotations

import contextlib
import io
import re
from collections import Counter
from typing import Any

import jax
import jax.ad_checkpoint
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jax_impl import layers
from jax_impl.layers import acc_dtype, cross_entropy, head_cross_entropy, matmul
from jax_impl.model import REMAT_POLICIES, EngineConfig, Model, causal_lm_loss
from jax_impl.nf4 import NF4Kernel, dequantize_kernel
from ref_numpy.config import LoraConfig, attn_shapes, llama_config, mlp_shapes
from tests.helpers import rel_err

CFG = llama_config(
    vocab_size=256, d_model=128, n_layers=4, n_heads=4, n_kv_heads=2, d_ff=352, max_seq_len=64
)
LORA = LoraConfig(
    rank=4,
    alpha=8.0,
    targets=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
)
B, T = 2, 40  # T matches no kernel dimension, so no activation looks like a kernel
REMATS = ["none", *REMAT_POLICIES]


def _kernel_shapes() -> set[tuple[int, int]]:
    shapes = {*attn_shapes(CFG).values(), *mlp_shapes(CFG).values()}
    return shapes | {(o, i) for i, o in shapes}


def _loss_parts(quantize: bool, remat: str) -> tuple[Any, Any, Any, jax.Array]:
    eng = EngineConfig(quantize=quantize, remat=remat)  # type: ignore[arg-type]
    model = Model(CFG, LORA, eng, rngs=nnx.Rngs(0))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    ids = jnp.asarray(np.random.default_rng(0).integers(0, CFG.vocab_size, size=(B, T)))

    def loss(p: Any, r: Any, ids: jax.Array) -> jax.Array:
        return causal_lm_loss(nnx.merge(graphdef, p, r)(ids), ids)

    return loss, params, rest, ids


def saved_float_residuals(f: Any, *args: Any) -> list[tuple[str, tuple[int, ...]]]:
    """``(dtype, shape)`` of each floating-point residual ``f``'s backward pass keeps, the
    dtype as JAX prints it (``bf16``, ``f16``, ``f32``, ``f64``)."""
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        jax.ad_checkpoint.print_saved_residuals(f, *args)
    found = (re.match(r"\s*(bf16|f16|f32|f64)\[([0-9,]*)\]", s) for s in buf.getvalue().split("\n"))
    return [(m[1], tuple(int(d) for d in m[2].split(",") if d)) for m in found if m]


def _saved_float_shapes(f: Any, *args: Any) -> list[tuple[int, ...]]:
    """Shapes of the floating-point residuals ``f``'s backward pass keeps."""
    return [shape for _, shape in saved_float_residuals(f, *args)]


def _holds_a_kernel(shapes: list[tuple[int, ...]]) -> list[tuple[int, ...]]:
    kernels = _kernel_shapes()
    return [s for s in shapes if len(s) >= 2 and tuple(s[-2:]) in kernels]


def _layer_activations(shapes: list[tuple[int, ...]]) -> Counter[tuple[int, ...]]:
    """The saved residuals stacked over layers from one batch: shape ``[L, B, ...]`` with T
    among the trailing axes, counted by shape."""
    per_layer = [s for s in shapes if s[:2] == (CFG.n_layers, B) and T in s[2:]]
    return Counter(per_layer)


def test_remat_policies_keep_what_they_say() -> None:
    """Per layer: none keeps every intermediate (the MLP hidden [B,T,F], the attention scores
    [B,K,G,T,S]); full only the block input [B,T,D]; dots the projections' outputs (the MLP
    hidden among them) but no scores; attn_out the block input and the attention output,
    two [B,T,D] arrays and nothing else."""
    d, f, kv = CFG.d_model, CFG.d_ff, CFG.n_kv
    hidden, io_ = (CFG.n_layers, B, T, f), (CFG.n_layers, B, T, d)
    heads = (CFG.n_layers, B, kv, CFG.n_heads // kv)  # [L,B,K,G] of scores [L,B,K,G,T',S]

    def scores(kept: Counter[tuple[int, ...]]) -> int:
        """Saved scores or probabilities of some queries against all T keys."""
        return sum(n for s, n in kept.items() if len(s) == 6 and s[:4] == heads and s[5] == T)

    kept = {}
    for remat in REMATS:
        loss, params, rest, ids = _loss_parts(False, remat)
        kept[remat] = _layer_activations(_saved_float_shapes(loss, params, rest, ids))
    assert kept["none"][hidden] >= 2 and scores(kept["none"]) >= 1, kept["none"]
    assert kept["full"] == Counter({io_: 1}), kept["full"]
    assert kept["dots"][hidden] >= 2 and scores(kept["dots"]) == 0, kept["dots"]
    assert kept["attn_out"] == Counter({io_: 2}), kept["attn_out"]


@pytest.mark.slow
@pytest.mark.parametrize("remat", REMATS)
def test_qlora_backward_keeps_no_float_kernel(remat: str) -> None:
    loss, params, rest, ids = _loss_parts(True, remat)
    shapes = _saved_float_shapes(loss, params, rest, ids)
    assert shapes, "no residuals seen: the measurement is broken"
    assert not _holds_a_kernel(shapes), _holds_a_kernel(shapes)


def test_the_residual_check_sees_a_float_kernel() -> None:
    """The check above can fail: differentiating the dequantized kernel keeps it."""
    q = NF4Kernel.from_kernel(jnp.ones((128, 352)) * 0.01, 64, True).tensor()
    x = jnp.ones((B, T, 128))

    def naive(x: jax.Array) -> jax.Array:
        return jnp.sum(jnp.sin(x @ dequantize_kernel(q)))

    assert _holds_a_kernel(_saved_float_shapes(naive, x))


def _memory(quantize: bool, remat: str) -> Any:
    loss, params, rest, ids = _loss_parts(quantize, remat)
    grad = jax.jit(jax.grad(loss))
    return grad.lower(params, rest, ids).compile().memory_analysis()


@pytest.mark.slow
@pytest.mark.parametrize("remat", REMATS)
def test_qlora_step_needs_less_memory_than_lora(remat: str) -> None:
    lora, qlora = _memory(False, remat), _memory(True, remat)
    if lora is None or qlora is None:
        pytest.skip(f"{jax.default_backend()}: no compiled memory analysis")
    resident = {
        name: m.argument_size_in_bytes + m.temp_size_in_bytes
        for name, m in (("lora", lora), ("qlora", qlora))
    }
    assert resident["qlora"] < resident["lora"], resident
    layer_kernels = 4 * sum(
        i * o for i, o in (*attn_shapes(CFG).values(), *mlp_shapes(CFG).values())
    )
    extra = qlora.temp_size_in_bytes - lora.temp_size_in_bytes
    assert extra < 2 * layer_kernels, (extra, layer_kernels)


def _head_case(v: int, t: int, d: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    rng = np.random.default_rng(3)
    x = jnp.asarray(rng.normal(size=(2, t, d)))
    w = jnp.asarray(rng.normal(size=(d, v)) / d**0.5)
    targets = rng.integers(0, v, size=(2, t))
    targets[0, :3] = -100  # a prompt
    targets[1, -2:] = -100  # padding
    return x, w, jnp.asarray(targets)


def _whole_loss(x: jax.Array, w: jax.Array, targets: jax.Array) -> jax.Array:
    """The summed loss on the whole logits, the head and the loss differentiated by JAX."""
    total, count = cross_entropy(matmul(x, w, acc_dtype(x.dtype)), targets)
    return total * count


@pytest.mark.slow
@pytest.mark.parametrize(("chunk", "cpu_rows"), [(0, 512), (1, 512), (4, 512), (11, 512), (0, 5)])
def test_head_loss_equals_the_whole_one(
    chunk: int, cpu_rows: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``head_cross_entropy``: loss, count and gradients (hidden states alone, and hidden
    states and head) equal autodiff of ``cross_entropy`` on the whole logits, in float64, for
    chunks that do and do not divide T = 11, and with a CPU's rows per chunk capped below the
    22 rows."""
    monkeypatch.setattr(layers, "CPU_LOSS_ROWS", cpu_rows)
    with jax.enable_x64(True):
        x, w, targets = _head_case(37, 11, 10)

        def fused(x: jax.Array, w: jax.Array) -> jax.Array:
            return head_cross_entropy(x, w, targets, chunk)[0]

        lw, gw = jax.value_and_grad(_whole_loss, (0, 1))(x, w, targets)
        lc, gc = jax.jit(jax.value_and_grad(fused, (0, 1)))(x, w)
        assert abs(float(lc) - float(lw)) <= 1e-12 * abs(float(lw))
        for a, b in zip(gc, gw, strict=True):
            assert rel_err(np.asarray(a), np.asarray(b)) <= 1e-10
        gx = jax.jit(jax.grad(fused))(x, w)  # the head frozen: no [D, V] gradient formed
        assert rel_err(np.asarray(gx), np.asarray(gw[0])) <= 1e-10
        total, count = head_cross_entropy(x, w, targets, chunk)  # no gradient wanted
        assert abs(float(total) - float(lw)) <= 1e-12 * abs(float(lw))
        assert int(count) == int((np.asarray(targets) != -100).sum())
        bad = targets.at[1, 0].set((targets[1, 0] + 1) % 37)
        moved = head_cross_entropy(x, w, bad, chunk)[0]
        assert abs(float(moved) - float(lw)) > 1e-6  # the check sees a changed target


def test_cpu_loss_rows_keep_a_chunk_of_logits_near_16_mb() -> None:
    """512 rows up to V = 8192, then about 4M logits a chunk, never fewer than 128 rows."""
    got = {v: layers.cpu_loss_rows(v) for v in (37, 8192, 16384, 32000, 49152, 128256)}
    assert got == {37: 512, 8192: 512, 16384: 256, 32000: 131, 49152: 128, 128256: 128}


@pytest.mark.parametrize("prompt", [8, 11])
def test_head_loss_skips_what_does_not_count(prompt: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """A long prompt: its positions are taken last and the chunks of nothing else make no
    logits. Loss and gradients (hidden states and head) still equal the whole loss's in
    float64; with nothing counted (every position a prompt) they are zero."""
    monkeypatch.setattr(layers, "CPU_LOSS_ROWS", 3)  # 22 rows: 8 chunks, the last ones skipped
    with jax.enable_x64(True):
        x, w, targets = _head_case(37, 11, 10)
        targets = targets.at[:, :prompt].set(-100)

        def fused(x: jax.Array, w: jax.Array) -> jax.Array:
            return head_cross_entropy(x, w, targets, 0)[0]

        lc, gc = jax.jit(jax.value_and_grad(fused, (0, 1)))(x, w)
        if prompt == x.shape[1]:
            assert float(lc) == 0.0 and int(head_cross_entropy(x, w, targets, 0)[1]) == 0
            assert all(not np.asarray(g).any() for g in gc)
            return
        lw, gw = jax.value_and_grad(_whole_loss, (0, 1))(x, w, targets)
        assert abs(float(lc) - float(lw)) <= 1e-12 * abs(float(lw))
        for a, b in zip(gc, gw, strict=True):
            assert rel_err(np.asarray(a), np.asarray(b)) <= 1e-10
        assert not np.asarray(gc[0])[:, :prompt].any()  # a prompt's hidden states: no gradient
        bad = targets.at[0, -1].set((targets[0, -1] + 1) % 37)  # a counted target
        moved = head_cross_entropy(x, w, bad, 0)[0]
        assert abs(float(moved) - float(lw)) > 1e-6


def test_head_loss_under_bf16() -> None:
    """Under bf16 compute the gradients are autodiff's through ``matmul`` (whose backward
    rounds the logits' cotangent to bf16) to bf16's precision: the unit cotangent is rounded
    before the loss's cotangent scales it, not after."""
    x, w, targets = _head_case(37, 11, 10)
    x, w = x.astype(jnp.bfloat16), w.astype(jnp.bfloat16)
    g = 1.0 / 19  # the trainer's 1 / counted tokens, not a power of two

    def fused(x: jax.Array, w: jax.Array) -> jax.Array:
        return g * head_cross_entropy(x, w, targets, 4)[0]

    lw, gw = jax.value_and_grad(lambda x, w: g * _whole_loss(x, w, targets), (0, 1))(x, w)
    lc, gc = jax.jit(jax.value_and_grad(fused, (0, 1)))(x, w)
    assert lc.dtype == jnp.float32 and abs(float(lc) - float(lw)) <= 1e-6 * abs(float(lw))
    for a, b in zip(gc, gw, strict=True):
        assert a.dtype == b.dtype == jnp.bfloat16
        assert rel_err(np.asarray(a.astype(jnp.float32)), np.asarray(b.astype(jnp.float32))) < 1e-2


def test_head_loss_never_holds_the_whole_logits() -> None:
    """XLA's temporaries for the gradient: a fraction of the whole [B, T, V] float32 logits."""
    x, w, targets = _head_case(8192, 256, 32)
    x, w = x.astype(jnp.float32), w.astype(jnp.float32)
    whole_logits = 4 * 2 * 256 * 8192

    def temp(f: Any) -> int:
        m = jax.jit(jax.grad(f, (0, 1))).lower(x, w).compile().memory_analysis()
        if m is None:
            pytest.skip(f"{jax.default_backend()}: no compiled memory analysis")
        return int(m.temp_size_in_bytes)

    whole = temp(lambda x, w: _whole_loss(x, w, targets))
    chunked = temp(lambda x, w: head_cross_entropy(x, w, targets, 32)[0])
    assert whole >= whole_logits, (whole, whole_logits)
    assert chunked < whole_logits / 2, (chunked, whole_logits)
