"""Mirror of ``ref_numpy/nf4.py``: NF4 with double quantization in jnp, bit-identical to the spec.

The public API is the spec's: ``quantize_nf4(w, blocksize, double_quant)`` returns an
``NF4Tensor`` with the spec's fields (here a pytree of device arrays, its shape and block sizes
static), ``dequantize_nf4(q)`` inverts it, and ``quantize_kernel`` / ``dequantize_kernel`` do
the same for a ``[in, out]`` kernel in bitsandbytes' ``[out, in]`` layout. The code tables
(``NF4_CODE``, ``DYNAMIC_MAP``) are the spec's constants. Three numerics need care to stay
bit-identical under XLA:

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

``NF4Kernel`` holds a projection's ``NF4Tensor`` fields as frozen device arrays (``NF4State``,
never an ``nnx.Param``) and dequantizes inside the jitted computation; ``nf4_linear`` is its
4-bit matmul, which dequantizes again in the backward pass instead of keeping the float weight.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ref_numpy import nf4 as spec
from ref_numpy.nf4 import (
    DEFAULT_BLOCKSIZE,
    DYNAMIC_MAP,
    NESTED_BLOCKSIZE,
    NF4_CODE,
    NF4_ZERO_INDEX,
    _check_blocksize,
)

from .layers import variable

Array = jax.Array


def quantize_blockwise(x: Array, code: np.ndarray, blocksize: int) -> tuple[Array, Array]:
    """Blockwise absmax quantization of a flat float32 vector to indices into a sorted code.

    Args:
        x: float32 [n].
        code: float32 [C], sorted ascending, within [-1, 1] (NF4_CODE or DYNAMIC_MAP).
        blocksize: values per block; the last block holds the remaining ``n % blocksize``.

    Returns:
        idx: uint8 [n], index of the nearest code value to ``x / absmax`` (ties to the lower).
        absmax: float32 [ceil(n / blocksize)], max |x| over each block.
    """
    n = x.shape[0]
    n_blocks = -(-n // blocksize)
    padded = jnp.pad(x, (0, n_blocks * blocksize - n))  # [n] -> [n_blocks * blocksize]
    blocks = padded.reshape(n_blocks, blocksize)  # [n] -> [n_blocks, blocksize]
    absmax = jnp.abs(blocks).max(axis=1)  # [n_blocks, blocksize] -> [n_blocks]
    # A zero block gets a zero reciprocal: the spec's 1e-38 floor is subnormal, flushed by XLA.
    inv = jnp.where(absmax > 0, 1.0 / jnp.where(absmax > 0, absmax, 1.0), 0.0)  # [n_blocks]
    normed = blocks * inv[:, None].astype(jnp.float32)  # [n_blocks, blocksize], float32
    thresholds = jnp.asarray((code[:-1] + code[1:]) / np.float32(2))  # [C] -> [C-1], midpoints
    # side="left" gives the first i with normed <= thresholds[i]: a tie takes the lower index.
    idx = jnp.searchsorted(thresholds, normed.reshape(-1), side="left")  # [n_blocks * blocksize]
    return idx[:n].astype(jnp.uint8), absmax


def dequantize_blockwise(idx: Array, absmax: Array, code: Array, blocksize: int) -> Array:
    """Inverse of ``quantize_blockwise``: ``code[idx] * absmax`` of each value's block.

    Args:
        idx: uint8 [n]. absmax: float32 [ceil(n / blocksize)]. code: float32 [C].

    Returns:
        float32 [n]; one float32 product per value, the rounding bnb does.
    """
    n = idx.shape[0]
    n_blocks = absmax.shape[0]
    vals = jnp.take(code, idx.astype(jnp.int32))  # [n]
    blocks = jnp.pad(vals, (0, n_blocks * blocksize - n)).reshape(n_blocks, blocksize)
    return (blocks * absmax[:, None]).reshape(-1)[:n]  # [n_blocks, blocksize] -> [n]


def pack_nibbles(idx: Array) -> Array:
    """Two 4-bit indices per byte, the even element in the high nibble: uint8 [n] -> [ceil(n/2)].

    An odd trailing element is paired with NF4_ZERO_INDEX (the code of 0.0), as bnb pads.
    """
    if idx.shape[0] % 2:
        idx = jnp.concatenate([idx, jnp.full((1,), NF4_ZERO_INDEX, jnp.uint8)])  # [n] -> [n + 1]
    pairs = idx.reshape(-1, 2)  # [n] -> [n/2, 2]
    return (pairs[:, 0] << 4) | pairs[:, 1]  # [n/2, 2] -> [n/2]


def unpack_nibbles(packed: Array, n: int) -> Array:
    """Inverse of ``pack_nibbles``: uint8 [ceil(n/2)] -> uint8 [n] (drops a padding nibble)."""
    pairs = jnp.stack([packed >> 4, packed & 0x0F], axis=1)  # [n/2, 2]
    return pairs.reshape(-1)[:n]  # [n/2, 2] -> [n]


@dataclasses.dataclass(frozen=True, eq=False)
class NF4Tensor:
    """A tensor quantized to NF4: the spec's ``NF4Tensor`` fields as device arrays.

    A pytree: the arrays are its leaves, ``shape``, ``blocksize`` and ``nested_blocksize`` its
    static data, so it passes through ``jit``, ``scan`` and ``custom_vjp`` as it is. Shapes are
    not checked here (a tensor sliced from a stack of layers carries a leading axis); the
    spec checks them in ``to_spec``. With ``n = prod(shape)`` and ``n_blocks =
    ceil(n / blocksize)``, the nested fields all None without double quantization:
    """

    packed: Array  # uint8 [ceil(n/2)]: two NF4 indices per byte, even element high nibble
    absmax: Array  # float32 [n_blocks]; uint8 [n_blocks] 8-bit codes with double quant
    shape: tuple[int, ...]  # original shape; values flattened row-major (C order)
    blocksize: int  # values per NF4 block, a power of two in 32..4096
    nested_absmax: Array | None = None  # float32 [ceil(n_blocks/256)], per 8-bit block
    nested_code: Array | None = None  # float32 [256], the signed dynamic map
    offset: Array | None = None  # float32 []: mean of the float32 absmax, subtracted before 8-bit
    nested_blocksize: int | None = None  # absmax values per 8-bit block: 256

    @property
    def double_quant(self) -> bool:
        """Whether ``absmax`` holds 8-bit codes (double quantization)."""
        return self.nested_absmax is not None

    def to_spec(self) -> spec.NF4Tensor:
        """The spec's ``NF4Tensor`` (NumPy, checked) holding the same bytes and state."""
        offset = self.offset
        return spec.NF4Tensor(
            packed=np.asarray(self.packed),
            absmax=np.asarray(self.absmax),
            shape=self.shape,
            blocksize=self.blocksize,
            nested_absmax=None if self.nested_absmax is None else np.asarray(self.nested_absmax),
            nested_code=None if self.nested_code is None else np.asarray(self.nested_code),
            offset=None if offset is None else np.float32(offset),
            nested_blocksize=self.nested_blocksize,
        )


jax.tree_util.register_dataclass(
    NF4Tensor,
    data_fields=["packed", "absmax", "nested_absmax", "nested_code", "offset"],
    meta_fields=["shape", "blocksize", "nested_blocksize"],
)


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
    """``float32(mean(float64(x)))`` for a float32 vector [n], without needing float64. -> []"""
    if jax.dtypes.canonicalize_dtype(jnp.float64) == jnp.float64:  # x64 is on
        return jnp.mean(x.astype(jnp.float64)).astype(jnp.float32)
    n = x.shape[0]
    size = 1 << max(n - 1, 0).bit_length()
    hi = jnp.pad(x.astype(jnp.float32), (0, size - n))  # [n] -> [size], a power of two
    lo = jnp.zeros_like(hi)  # [size]: the rounding error carried beside each partial sum
    while hi.shape[0] > 1:  # pairwise tree: log2(n) vector steps
        h = hi.shape[0] // 2
        s, e = _two_sum(hi[:h], hi[h:])  # [h]
        hi, lo = _two_sum(s, e + lo[:h] + lo[h:])  # [2h] -> [h]
    q = hi[0] / np.float32(n)  # first quotient
    p, pe = _two_prod(q, jnp.float32(n))
    r = ((hi[0] - p) - pe) + lo[0]  # the remainder (hi + lo) - q n, to ~24 more bits
    return q + r / np.float32(n)


def quantize_nf4(
    w: Array, blocksize: int = DEFAULT_BLOCKSIZE, double_quant: bool = True
) -> NF4Tensor:
    """Quantize ``w`` to NF4 in blocks of ``blocksize``, optionally double-quantizing the absmax.

    Args:
        w: float16 / bfloat16 / float32 / float64, any shape. Cast to float32 first.
        blocksize: values per block, a power of two in 32..4096 (bnb's default 64).
        double_quant: store the absmax as 8-bit codes (bnb's ``compress_statistics=True``).

    Returns:
        NF4Tensor with packed uint8 [ceil(n/2)] and absmax [ceil(n/blocksize)]. Jit-friendly:
        shapes depend only on ``w.shape`` and ``blocksize``.

    Raises:
        ValueError: bad blocksize, non-float or empty ``w``. NaN / Inf are not checked here
        (that would need a host sync); loaders check with the spec.
    """
    _check_blocksize(blocksize)
    w = jnp.asarray(w)
    if not jnp.issubdtype(w.dtype, jnp.floating):
        raise ValueError(f"w: expected a float array, got dtype {w.dtype}")
    if w.size == 0:
        raise ValueError(f"w: expected at least one value, got shape {w.shape}")
    flat = w.astype(jnp.float32).reshape(-1)  # [*shape] -> [n], row-major

    idx, absmax = quantize_blockwise(flat, NF4_CODE, blocksize)  # [n], [n_blocks]
    packed = pack_nibbles(idx)  # [n] -> [ceil(n/2)]
    shape = tuple(int(d) for d in w.shape)
    if not double_quant:
        return NF4Tensor(packed=packed, absmax=absmax, shape=shape, blocksize=blocksize)

    # Double quantization: centre the absmax on its mean (absmax > 0, so centring halves the
    # range the 8-bit code has to cover), then quantize blockwise to the signed dynamic map.
    offset = mean_f64_rounded(absmax)  # one rounding of the float64 mean, as the spec
    centred = absmax - offset  # [n_blocks], float32
    codes, nested_absmax = quantize_blockwise(centred, DYNAMIC_MAP, NESTED_BLOCKSIZE)
    return NF4Tensor(
        packed=packed,
        absmax=codes,  # uint8 [n_blocks]
        shape=shape,
        blocksize=blocksize,
        nested_absmax=nested_absmax,  # float32 [ceil(n_blocks/256)]
        nested_code=jnp.asarray(DYNAMIC_MAP),
        offset=offset,
        nested_blocksize=NESTED_BLOCKSIZE,
    )


def dequantize_absmax(q: NF4Tensor) -> Array:
    """float32 [n_blocks]: the block absmax; with double quant ``code[c] * nested_absmax + offset``.

    Two float32 roundings, product then sum, in the order bnb dequantizes the statistics.
    """
    if not q.double_quant:
        return q.absmax
    assert q.nested_absmax is not None and q.nested_code is not None and q.offset is not None
    assert q.nested_blocksize is not None
    centred = dequantize_blockwise(q.absmax, q.nested_absmax, q.nested_code, q.nested_blocksize)
    return _rounded(centred) + q.offset  # [n_blocks], float32; two roundings: no FMA


def dequantize_nf4(q: NF4Tensor) -> Array:
    """float32 array of ``q.shape``: ``NF4_CODE[index] * absmax`` of each value's block."""
    n = math.prod(q.shape)
    idx = unpack_nibbles(q.packed, n)  # [ceil(n/2)] -> [n]
    code = jnp.asarray(NF4_CODE)
    out = dequantize_blockwise(idx, dequantize_absmax(q), code, q.blocksize)  # [n]
    return out.reshape(q.shape)  # [n] -> [*shape]


def quantize_kernel(
    kernel: Array, blocksize: int = DEFAULT_BLOCKSIZE, double_quant: bool = True
) -> NF4Tensor:
    """Quantize a ``[in, out]`` kernel as bnb quantizes the PyTorch weight ``W = kernel.T``.

    bnb's blocks run over the ``[out, in]`` row-major order, so the result holds W^T: its shape
    is ``(out, in)`` and its bytes are the ones bnb stores for the matching ``nn.Linear``.
    """
    if kernel.ndim != 2:
        raise ValueError(f"kernel: expected a 2-D [in, out] array, got shape {kernel.shape}")
    return quantize_nf4(kernel.T, blocksize, double_quant)  # [in, out] -> W [out, in]


def dequantize_kernel(q: NF4Tensor) -> Array:
    """Inverse of ``quantize_kernel``: NF4Tensor of W ``[out, in]`` -> float32 ``[in, out]``."""
    if len(q.shape) != 2:
        raise ValueError(f"q.shape: expected a 2-D (out, in) weight, got {q.shape}")
    return dequantize_nf4(q).T  # [out, in] -> [in, out]


# --- the 4-bit linear -----------------------------------------------------------------


def _no_cotangent(a: Array) -> Array:
    """The zero cotangent of a frozen state array (``float0`` for integer arrays)."""
    if jnp.issubdtype(a.dtype, jnp.floating):
        return jnp.zeros_like(a)
    return np.zeros(a.shape, jax.dtypes.float0)  # type: ignore[return-value]


@jax.custom_vjp
def nf4_linear(x: Array, q: NF4Tensor) -> Array:
    """``x @ kernel`` for the NF4 tensor ``q`` of ``W = kernel.T`` [O, I]: [..., I] -> [..., O]
    in x's dtype.

    QLoRA's memory saving holds through the backward pass: the only residual kept for it is
    the NF4 tensor itself (half a byte per weight); the backward dequantizes ``W`` again to
    form ``dx = dy @ W``. Differentiating the plain ``x @ dequantize_kernel(q)`` would keep the
    float32 ``W`` of every layer alive from the forward to the backward pass, 8x the NF4
    bytes, whatever the rematerialisation policy of the surrounding block. A program XLA sees
    whole (layers unrolled, ``EngineConfig.layer_loop``) may still share one dequantization
    between the forward and the backward pass and hold ``W`` between them; a scanned layer
    cannot. ``W`` is frozen: its fields get zero cotangents. Products are summed in at least
    float32.
    """
    w = dequantize_nf4(q).astype(x.dtype)  # [O,I]
    acc = jnp.promote_types(x.dtype, jnp.float32)
    return jnp.einsum("...I,OI->...O", x, w, preferred_element_type=acc).astype(x.dtype)


def _nf4_linear_fwd(x: Array, q: NF4Tensor) -> tuple[Array, tuple[NF4Tensor, Array]]:
    return nf4_linear(x, q), (q, jnp.zeros((), x.dtype))


def _nf4_linear_bwd(res: tuple[NF4Tensor, Array], dy: Array) -> tuple[Array, NF4Tensor]:
    q, like_x = res
    w = dequantize_nf4(q).astype(dy.dtype)  # [O,I], again
    acc = jnp.promote_types(dy.dtype, jnp.float32)
    dx = jnp.einsum("...O,OI->...I", dy, w, preferred_element_type=acc)  # [...,O] -> [...,I]
    return dx.astype(like_x.dtype), jax.tree.map(_no_cotangent, q)


nf4_linear.defvjp(_nf4_linear_fwd, _nf4_linear_bwd)


# --- the module -----------------------------------------------------------------------


class NF4State(nnx.Variable):
    """A field of an NF4 tensor: frozen, never differentiated or optimised."""


_FIELD_AXES: dict[str, tuple[str | None, ...]] = {
    "packed": ("nf4_bytes",),
    "absmax": ("nf4_blocks",),
    "nested_absmax": (None,),
    "nested_code": (None,),
    "offset": (),
}


class NF4Kernel(nnx.Module):
    """A frozen ``[in, out]`` kernel held as the NF4 tensor of ``W = kernel.T`` (bnb's layout).

    Attributes are ``NF4State`` variables named as the ``NF4Tensor`` fields (the nested ones
    only with double quantization); ``shape`` (``(out, in)``) and ``blocksize`` are static.
    """

    def __init__(self, q: NF4Tensor) -> None:
        self.shape, self.blocksize = q.shape, q.blocksize
        for name, axes in _FIELD_AXES.items():
            value = getattr(q, name)
            if value is not None:
                setattr(self, name, variable(NF4State, value, axes))

    @classmethod
    def from_kernel(
        cls, kernel: Array, blocksize: int = DEFAULT_BLOCKSIZE, double_quant: bool = True
    ) -> NF4Kernel:
        """Quantize a ``[in, out]`` kernel (``quantize_kernel``)."""
        return cls(quantize_kernel(kernel, blocksize, double_quant))

    def tensor(self) -> NF4Tensor:
        """The ``NF4Tensor`` of the variables' current values."""
        fields = {name: getattr(self, name)[...] for name in _FIELD_AXES if hasattr(self, name)}
        nested = NESTED_BLOCKSIZE if "nested_absmax" in fields else None
        return NF4Tensor(
            shape=self.shape, blocksize=self.blocksize, nested_blocksize=nested, **fields
        )

    def __call__(self, x: Array) -> Array:
        """``x @ kernel``: [..., I] -> [..., O] in x's dtype, 4-bit through the backward
        pass (``nf4_linear``)."""
        return nf4_linear(x, self.tensor())

    def spec_tensor(self, fields: dict[str, np.ndarray]) -> spec.NF4Tensor:
        """The spec's ``NF4Tensor`` from one layer's field values (NumPy)."""
        nested = NESTED_BLOCKSIZE if "nested_absmax" in fields else None
        values: dict[str, Any] = dict(fields)  # NumPy rows in the array fields; to_spec keeps them
        q = NF4Tensor(shape=self.shape, blocksize=self.blocksize, nested_blocksize=nested, **values)
        return q.to_spec()
