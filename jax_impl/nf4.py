"""Mirror of ``ref_numpy/nf4.py``: NF4 with double quantization in jnp, bit-identical to the spec.

The code tables (``NF4_CODE``, ``DYNAMIC_MAP``) are the spec's constants. Two numerics need
care to stay bit-identical under XLA:

* XLA flushes float32 subnormals to zero, so the spec's floor of 1e-38 (a subnormal) on a
  zero absmax would vanish; a zero block is instead given a zero reciprocal directly, which
  gives the same indices (every value normalises to 0).
* XLA's CPU and GPU backends contract a fused ``a * b + c`` into one fused multiply-add,
  which rounds once instead of twice. Where the spec rounds twice (the absmax is
  ``code * nested_absmax``, rounded, ``+ offset``, rounded; Dekker's split below),
  ``_rounded`` makes the product a value of its own.
* The double-quantization offset is the spec's float64 mean rounded once to float32. Without
  ``jax_enable_x64`` there is no float64, so the sum is carried as an unevaluated pair of
  float32 numbers (error-free two-sums in a pairwise tree, about 48 bits), divided by ``n``
  with one correction step, and rounded once; with x64 it is a float64 mean.

``NF4Kernel`` holds a projection's packed bytes and quant state as frozen device arrays
(``NF4State``, never an ``nnx.Param``) and dequantizes inside the jitted computation.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ref_numpy.nf4 import (
    BLOCKSIZES,
    DYNAMIC_MAP,
    NESTED_BLOCKSIZE,
    NF4_CODE,
    NF4_ZERO_INDEX,
    NF4Tensor,
)

Array = jax.Array


class NF4State(nnx.Variable):
    """Packed NF4 bytes or quantization state: frozen, never differentiated or optimised."""


def _quantize_blockwise(x: Array, code: np.ndarray, blocksize: int) -> tuple[Array, Array]:
    """float32 [n] -> (uint8 [n] nearest-code indices, float32 [n_blocks] absmax)."""
    n = x.shape[0]
    n_blocks = -(-n // blocksize)
    blocks = jnp.pad(x, (0, n_blocks * blocksize - n)).reshape(n_blocks, blocksize)
    absmax = jnp.abs(blocks).max(axis=1)
    inv = jnp.where(absmax > 0, 1.0 / jnp.where(absmax > 0, absmax, 1.0), 0.0)
    normed = blocks * inv[:, None].astype(jnp.float32)
    thresholds = jnp.asarray((code[:-1] + code[1:]) / np.float32(2))  # float32 midpoints
    idx = jnp.searchsorted(thresholds, normed.reshape(-1), side="left")  # ties -> lower
    return idx[:n].astype(jnp.uint8), absmax


def _dequantize_blockwise(idx: Array, absmax: Array, code: Array, blocksize: int) -> Array:
    """``code[idx] * absmax`` of each value's block, float32 [n]."""
    n = idx.shape[0]
    n_blocks = absmax.shape[0]
    vals = jnp.pad(jnp.take(code, idx.astype(jnp.int32)), (0, n_blocks * blocksize - n))
    return (vals.reshape(n_blocks, blocksize) * absmax[:, None]).reshape(-1)[:n]


def pack_nibbles(idx: Array) -> Array:
    """uint8 [n] -> [ceil(n/2)], even element in the high nibble, pad nibble 7."""
    if idx.shape[0] % 2:
        idx = jnp.concatenate([idx, jnp.full((1,), NF4_ZERO_INDEX, jnp.uint8)])
    pairs = idx.reshape(-1, 2)
    return (pairs[:, 0] << 4) | pairs[:, 1]


def unpack_nibbles(packed: Array, n: int) -> Array:
    """uint8 [ceil(n/2)] -> [n]."""
    return jnp.stack([packed >> 4, packed & 0x0F], axis=1).reshape(-1)[:n]


def _rounded(x: Array) -> Array:
    """``x`` itself, as a value the compiler cannot fuse into a following add.

    XLA contracts ``a * b + c`` into a fused multiply-add (one rounding) and drops
    optimization barriers before fusion; a select on a runtime condition stands between
    the multiply and the add, so the product is rounded to float32 first. Finite inputs
    only (the select maps non-finite values to 0; NF4 state is always finite).
    """
    return jnp.where(jnp.isfinite(x), x, 0.0).astype(x.dtype)


def _two_sum(a: Array, b: Array) -> tuple[Array, Array]:
    """Knuth's error-free sum: ``a + b = s + e`` exactly, in float32."""
    s = a + b
    bb = s - a
    return s, (a - (s - bb)) + (b - bb)


def _split(a: Array) -> tuple[Array, Array]:
    """Dekker's split of a float32 into two halves of 12 bits each."""
    t = _rounded(a * np.float32(4097.0))
    hi = t - (t - a)
    return hi, a - hi


def _two_prod(a: Array, b: Array) -> tuple[Array, Array]:
    """Error-free product ``a * b = p + e`` in float32 without FMA."""
    p = a * b
    ah, al = _split(a)
    bh, bl = _split(b)
    hh, hl, lh, ll = (_rounded(v) for v in (ah * bh, ah * bl, al * bh, al * bl))
    return p, (((hh - p) + hl) + lh) + ll


def mean_f64_rounded(x: Array) -> Array:
    """``float32(mean(float64(x)))`` for a float32 vector, without needing float64."""
    if jax.dtypes.canonicalize_dtype(jnp.float64) == jnp.float64:  # x64 is on
        return jnp.mean(x.astype(jnp.float64)).astype(jnp.float32)
    n = x.shape[0]
    size = 1 << max(n - 1, 0).bit_length()
    hi = jnp.pad(x.astype(jnp.float32), (0, size - n))
    lo = jnp.zeros_like(hi)
    while hi.shape[0] > 1:  # pairwise tree: log2(n) vector steps
        h = hi.shape[0] // 2
        s, e = _two_sum(hi[:h], hi[h:])
        hi, lo = _two_sum(s, e + lo[:h] + lo[h:])
    q = hi[0] / np.float32(n)  # first quotient
    p, pe = _two_prod(q, jnp.float32(n))
    r = ((hi[0] - p) - pe) + lo[0]  # the remainder (hi + lo) - q n, to ~24 more bits
    return q + r / np.float32(n)


def quantize_nf4(w: Array, blocksize: int = 64, double_quant: bool = True) -> dict[str, Array]:
    """NF4 state of ``w`` (any shape, flattened row-major), as the spec's ``quantize_nf4``.

    Returns a dict with ``packed`` uint8 [ceil(n/2)], ``absmax`` (float32, or uint8 with
    double quant) [n_blocks], and with double quant ``nested_absmax`` float32
    [ceil(n_blocks/256)], ``nested_code`` float32 [256], ``offset`` float32 []. Jit-friendly:
    shapes depend only on ``w.shape`` and ``blocksize``. Non-finite input is not checked here
    (no host sync); loaders check with the spec.
    """
    if blocksize not in BLOCKSIZES:
        raise ValueError(f"blocksize: expected a power of two in 32..4096, got {blocksize!r}")
    flat = jnp.asarray(w).astype(jnp.float32).reshape(-1)
    idx, absmax = _quantize_blockwise(flat, NF4_CODE, blocksize)
    out = {"packed": pack_nibbles(idx), "absmax": absmax}
    if double_quant:
        offset = mean_f64_rounded(absmax)
        codes, nested = _quantize_blockwise(absmax - offset, DYNAMIC_MAP, NESTED_BLOCKSIZE)
        out.update(
            absmax=codes, nested_absmax=nested, nested_code=jnp.asarray(DYNAMIC_MAP), offset=offset
        )
    return out


def dequantize_absmax(state: dict[str, Array]) -> Array:
    """float32 [n_blocks] absmax; with double quant ``code[c] * nested_absmax + offset``."""
    if "nested_absmax" not in state:
        return state["absmax"]
    centred = _dequantize_blockwise(
        state["absmax"], state["nested_absmax"], state["nested_code"], NESTED_BLOCKSIZE
    )
    return _rounded(centred) + state["offset"]  # two roundings, as the spec: no FMA


def dequantize_nf4(state: dict[str, Array], shape: tuple[int, ...], blocksize: int) -> Array:
    """float32 array of ``shape`` from the state ``quantize_nf4`` returns."""
    n = math.prod(shape)
    idx = unpack_nibbles(state["packed"], n)
    vals = _dequantize_blockwise(idx, dequantize_absmax(state), jnp.asarray(NF4_CODE), blocksize)
    return vals.reshape(shape)


_FIELD_AXES = {
    "packed": ("nf4_bytes",),
    "absmax": ("nf4_blocks",),
    "nested_absmax": (None,),
    "nested_code": (None,),
    "offset": (),
}


class NF4Kernel(nnx.Module):
    """A frozen ``[in, out]`` kernel held as the NF4 state of ``W = kernel.T`` (bnb's layout).

    Attributes are ``NF4State`` variables named as the spec's ``NF4Tensor`` fields; ``shape``
    (``(out, in)``) and ``blocksize`` are static.
    """

    def __init__(self, state: dict[str, Array], shape: tuple[int, int], blocksize: int) -> None:
        self.shape, self.blocksize = shape, blocksize
        for name, value in state.items():
            setattr(
                self, name, NF4State(value, sharding_names=_FIELD_AXES[name], eager_sharding=False)
            )

    @classmethod
    def from_kernel(
        cls, kernel: Array, blocksize: int = 64, double_quant: bool = True
    ) -> NF4Kernel:
        """Quantize a ``[in, out]`` kernel (as the spec's ``quantize_kernel``)."""
        d_in, d_out = kernel.shape
        return cls(quantize_nf4(kernel.T, blocksize, double_quant), (d_out, d_in), blocksize)

    def state(self) -> dict[str, Array]:
        return {name: getattr(self, name)[...] for name in _FIELD_AXES if hasattr(self, name)}

    def dequantize(self, dtype: Any) -> Array:
        """The kernel ``[in, out]`` in ``dtype``, dequantized in float32 then cast."""
        w = dequantize_nf4(self.state(), self.shape, self.blocksize)
        return w.T.astype(dtype)

    def spec_tensor(self, fields: dict[str, np.ndarray]) -> NF4Tensor:
        """The spec's ``NF4Tensor`` from one layer's field values (NumPy)."""
        double = "nested_absmax" in fields
        return NF4Tensor(
            packed=fields["packed"],
            absmax=fields["absmax"],
            shape=self.shape,
            blocksize=self.blocksize,
            nested_absmax=fields.get("nested_absmax"),
            nested_code=fields.get("nested_code"),
            offset=np.float32(fields["offset"]) if double else None,
            nested_blocksize=NESTED_BLOCKSIZE if double else None,
        )
