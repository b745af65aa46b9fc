"""Mirror of ``ref_numpy/lora.py``: the projection every linear layer goes through.

``y = x @ W + b + scale * (dropout(x) @ A) @ B``. Which leaves train is expressed by variable
type: adapters are ``nnx.LoRAParam`` (a subclass of ``nnx.Param``); in LoRA / QLoRA mode the
base weights are ``Frozen`` (not a Param) or NF4 state, so ``nnx.grad`` and the optimizer,
filtered on ``nnx.Param``, only ever see the adapters. In full fine-tuning the base weights
are plain ``nnx.Param``. The base weight keeps its path (``.../q_proj/kernel``) either way.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from ref_numpy.config import LoraConfig
from ref_numpy.lora import lora_a_bound

from .layers import acc_dtype, linear, token_sum_product, variable
from .nf4 import NF4Kernel, dequantize_kernel

Array = jax.Array


def dropout_keep(key: Array, shape: tuple[int, ...], rate: float) -> Array:
    """Which adapter inputs dropout keeps: boolean ``shape`` [..., I], True w.p. ``1 - rate``."""
    return jax.random.bernoulli(key, 1.0 - rate, shape)  # [...,I]


def dropout_mask(keep: Array, rate: float, dtype: jnp.dtype) -> Array:
    """Inverted dropout, as the spec's ``dropout_mask``: [..., I] of 0 and ``1/(1-rate)``."""
    return keep.astype(dtype) / (1.0 - rate)  # [...,I]


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def adapter(xd: Array, a: Array, b: Array, scale: float) -> Array:
    """The adapter's term ``scale * (xd @ A) @ B``: [..., I], [I, R], [R, O] -> [..., O].

    Its backward is the spec's ``dense_backward`` written out (``_adapter_bwd``) instead of
    left to autodiff. JAX differentiates ``h @ B`` into a product that XLA's CPU backend
    serves by transposing the whole ``[..., O]`` cotangent in memory first, once per adapted
    projection and step: a quarter of a LoRA training step on CPU, for two rank-R weight
    gradients. Written out, each weight gradient is one product over the flattened token
    axis (``h^T dy``, ``xd^T dh``) that no backend needs to transpose a large operand for.
    Every product sums in ``acc_dtype`` and rounds once to the compute dtype: a bf16 product
    with a bf16 result is one XLA's CPU backend widens to float32 first.
    """
    return _adapter_fwd(xd, a, b, scale)[0]


def _adapter_fwd(
    xd: Array, a: Array, b: Array, scale: float
) -> tuple[Array, tuple[Array, Array, Array, Array]]:
    acc = acc_dtype(xd.dtype)
    h = jnp.einsum("...I,IR->...R", xd, a, preferred_element_type=acc).astype(xd.dtype)
    y = scale * jnp.einsum("...R,RO->...O", h, b, preferred_element_type=acc)  # [...,O]
    return y.astype(xd.dtype), (xd, h, a, b)  # residuals: the input and the rank-R h


def _adapter_bwd(
    scale: float, res: tuple[Array, Array, Array, Array], dy: Array
) -> tuple[Array, Array, Array]:
    """``(dxd, dA, dB)`` of ``adapter`` for the cotangent ``dy`` [..., O].

    The weight gradients sum over every token, so they accumulate in ``acc_dtype``.
    """
    xd, h, a, b = res
    acc = acc_dtype(dy.dtype)
    dh = scale * jnp.einsum("...O,RO->...R", dy, b, preferred_element_type=acc)  # [...,R]
    dh = dh.astype(dy.dtype)
    hm, dym = h.reshape(-1, h.shape[-1]), dy.reshape(-1, dy.shape[-1])  # [M,R], [M,O]
    db = scale * token_sum_product(hm, dym)  # [R,O]
    xm, dhm = xd.reshape(-1, xd.shape[-1]), dh.reshape(-1, dh.shape[-1])  # [M,I], [M,R]
    da = token_sum_product(xm, dhm)  # [I,R]
    dxd = jnp.einsum("...R,IR->...I", dh, a, preferred_element_type=acc)  # [...,R] -> [...,I]
    return dxd.astype(xd.dtype), da.astype(a.dtype), db.astype(b.dtype)


adapter.defvjp(_adapter_fwd, _adapter_bwd)


class Dense(nnx.Module):
    """A projection ``[in, out]`` with an optional bias, LoRA adapter and NF4 base.

    Args:
      d_in, d_out: I and O.
      axes: logical names of the kernel's two axes, e.g. ``("embed", "q_heads")``.
      bias: whether there is a bias ``[O]``.
      base: variable type of the base weights (``nnx.Param`` or ``Frozen``).
      lora: adapter config, or None for no adapter.
      quantized: hold the kernel as NF4 (QLoRA); it is dequantized inside the computation,
        forward and backward (``nf4_linear``), and no float copy outlives one projection.
      blocksize, double_quant: NF4 settings.
      param_dtype: storage dtype of float weights and adapters.
      dtype: compute dtype.
    """

    def __init__(
        self,
        d_in: int,
        d_out: int,
        *,
        axes: tuple[str, str],
        bias: bool,
        base: type[nnx.Variable],
        lora: LoraConfig | None,
        quantized: bool,
        blocksize: int,
        double_quant: bool,
        param_dtype: jnp.dtype,
        dtype: jnp.dtype,
        rngs: nnx.Rngs,
    ) -> None:
        self.dtype = dtype
        w = jax.random.normal(rngs.params(), (d_in, d_out), jnp.float32) * 0.02  # [I,O]
        if quantized:
            self.kernel: nnx.Module | nnx.Variable = NF4Kernel.from_kernel(
                w, blocksize, double_quant
            )
        else:
            self.kernel = variable(base, w.astype(param_dtype), axes)
        if bias:
            self.bias = variable(base, jnp.zeros((d_out,), param_dtype), (axes[1],))
        self.scale = 0.0
        self.rate = 0.0
        if lora is not None:
            bound = lora_a_bound(d_in)  # the spec's init range, as PEFT's
            a = jax.random.uniform(rngs.params(), (d_in, lora.rank), param_dtype, -bound, bound)
            b = jnp.zeros((lora.rank, d_out), param_dtype)  # [R,O]
            self.lora_A = variable(nnx.LoRAParam, a, (axes[0], "lora_rank"))  # [I,R]
            self.lora_B = variable(nnx.LoRAParam, b, ("lora_rank", axes[1]))  # [R,O]
            self.scale, self.rate = lora.scale, lora.dropout

    def weight(self) -> Array:
        """The base kernel ``[I, O]`` in the compute dtype (dequantized if NF4)."""
        kernel = self.kernel
        if isinstance(kernel, NF4Kernel):
            return dequantize_kernel(kernel.tensor()).astype(self.dtype)  # NF4 -> [I,O]
        assert isinstance(kernel, nnx.Variable)
        return kernel[...].astype(self.dtype)  # [I,O]

    def __call__(self, x: Array, dropout_key: Array | None = None) -> Array:
        """[..., I] -> [..., O]. ``dropout_key`` switches adapter dropout on (training).

        The spec's ``dense_forward`` line for line; every operand is in the compute dtype and
        the base product is summed in ``acc_dtype`` (``linear``).
        """
        x = x.astype(self.dtype)
        bias = self.bias[...].astype(self.dtype) if hasattr(self, "bias") else None
        if isinstance(self.kernel, NF4Kernel):  # 4-bit through the backward pass too
            y = self.kernel(x)  # [...,I] -> [...,O]
            y = y if bias is None else y + bias  # [...,O]
        else:
            y = linear(x, self.weight(), bias)  # [...,I] -> [...,O]
        if not hasattr(self, "lora_A"):
            return y
        a = self.lora_A[...].astype(self.dtype)  # [I,R]
        b = self.lora_B[...].astype(self.dtype)  # [R,O]
        xd = x
        if dropout_key is not None and self.rate > 0:
            keep = dropout_keep(dropout_key, x.shape, self.rate)  # [...,I]
            xd = x * dropout_mask(keep, self.rate, x.dtype)  # [...,I]
        return y + adapter(xd, a, b, self.scale)  # [...,O]: scale * (xd @ A) @ B
