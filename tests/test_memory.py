"""QLoRA stays 4-bit through the backward pass, under every rematerialisation policy.

Two measurements, neither a timing:

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
from typing import Any

import jax
import jax.ad_checkpoint
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jax_impl.model import EngineConfig, Model, causal_lm_loss
from jax_impl.nf4 import NF4Kernel, dequantize_kernel
from ref_numpy.config import LoraConfig, attn_shapes, llama_config, mlp_shapes

CFG = llama_config(
    vocab_size=256, d_model=128, n_layers=4, n_heads=4, n_kv_heads=2, d_ff=352, max_seq_len=64
)
LORA = LoraConfig(
    rank=4,
    alpha=8.0,
    targets=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
)
B, T = 2, 40  # T matches no kernel dimension, so no activation looks like a kernel
REMATS = ["none", "dots", "full"]


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


def _saved_float_shapes(f: Any, *args: Any) -> list[tuple[int, ...]]:
    """Shapes of the floating-point residuals ``f``'s backward pass keeps."""
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        jax.ad_checkpoint.print_saved_residuals(f, *args)
    shapes = []
    for line in buf.getvalue().splitlines():
        m = re.match(r"\s*(bf16|f16|f32|f64)\[([0-9,]*)\]", line)
        if m:
            shapes.append(tuple(int(d) for d in m.group(2).split(",") if d))
    return shapes


def _holds_a_kernel(shapes: list[tuple[int, ...]]) -> list[tuple[int, ...]]:
    kernels = _kernel_shapes()
    return [s for s in shapes if len(s) >= 2 and tuple(s[-2:]) in kernels]


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
