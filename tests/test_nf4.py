"""NF4 and double quantization: hand-checked vectors and property tests (NumPy only).

The byte-for-byte comparison with bitsandbytes lives in tests/interop/test_nf4_bnb.py; here each
rule of the spec is pinned by a small case built so that the usual mistakes (ties to the upper
index, swapped nibbles, padding with index 0, division instead of the reciprocal, absmax over
the wrong span) change the answer.
"""

from __future__ import annotations

import hashlib
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from ref_numpy.nf4 import (
    DYNAMIC_MAP,
    NESTED_BLOCKSIZE,
    NF4_CODE,
    NF4_ZERO_INDEX,
    NF4Tensor,
    _linspace_f32,
    dequantize_absmax,
    dequantize_blockwise,
    dequantize_kernel,
    dequantize_nf4,
    dynamic_map,
    nf4_bits_per_param,
    pack_nibbles,
    quantize_blockwise,
    quantize_kernel,
    quantize_nf4,
    unpack_nibbles,
)

F32 = np.float32
THRESHOLDS = (NF4_CODE[:-1] + NF4_CODE[1:]) / F32(2)  # float32 midpoints between NF4 codes
# The same 15 thresholds as float literals in bnb's CUDA decision tree (dQuantizeNF4).
CUDA_NF4_THRESHOLDS = [
    -0.8480964004993439,
    -0.6106329262256622,
    -0.4599952697753906,
    -0.33967943489551544,
    -0.23460740596055984,
    -0.13791173323988914,
    -0.045525018125772476,
    0.03979014977812767,
    0.1202552504837513,
    0.2035212516784668,
    0.2920137718319893,
    0.3893125355243683,
    0.5016634166240692,
    0.6427869200706482,
    0.8614784181118011,
]
# sha256 of the float32 bytes of bnb 0.50.2's create_dynamic_map(signed) (torch 2.13, CPU); the
# interop test compares the arrays themselves, this pins them where torch is absent.
DYNAMIC_MAP_SHA256 = {
    True: "e732639a65f497b4ad684bb166a4467708255edd5207757de8b8f0c7e1fda89c",
    False: "305f002cc11278fb769d13b25b9fd0c7c83c8402c40a878fe086f4039fde6398",
}
HALF_GAP_NF4 = float(np.max(np.diff(NF4_CODE))) / 2  # 0.1385: between 0.7230 and 1.0
HALF_GAP_8BIT = float(np.max(np.diff(DYNAMIC_MAP))) / 2  # 0.00703: the top decade's cells


def _indices(q: NF4Tensor) -> np.ndarray:
    return unpack_nibbles(q.packed, math.prod(q.shape))


def _up(x: float, k: int = 1) -> np.float32:
    v = F32(x)
    for _ in range(k):
        v = np.nextafter(v, F32(np.inf))
    return v


def _down(x: float, k: int = 1) -> np.float32:
    v = F32(x)
    for _ in range(k):
        v = np.nextafter(v, F32(-np.inf))
    return v


# ---------------------------------------------------------------- tables


def test_nf4_code_table():
    assert NF4_CODE.dtype == np.float32 and NF4_CODE.shape == (16,)
    assert np.all(np.diff(NF4_CODE) > 0)
    assert NF4_CODE[0] == -1.0 and NF4_CODE[NF4_ZERO_INDEX] == 0.0 and NF4_CODE[15] == 1.0
    assert (NF4_CODE < 0).sum() == 7 and (NF4_CODE > 0).sum() == 8
    assert not NF4_CODE.flags.writeable


def test_nf4_thresholds_are_bnb_cuda_literals():
    # float32 (a + b) / 2 gives, bit for bit, the thresholds bnb's CUDA kernel hard-codes.
    np.testing.assert_array_equal(THRESHOLDS, np.array(CUDA_NF4_THRESHOLDS, dtype=F32))


def test_linspace_f32_hand_values():
    np.testing.assert_array_equal(_linspace_f32(0.1, 1.0, 2), F32([0.1, 1.0]))
    np.testing.assert_array_equal(_linspace_f32(0.1, 1.0, 3), F32([0.1, 0.55, 1.0]))
    grid = _linspace_f32(0.1, 1.0, 65)
    assert grid[0] == F32(0.1) and grid[-1] == 1.0  # both ends exact: filled from each side
    np.testing.assert_allclose(np.diff(grid), 0.9 / 64, rtol=1e-5)


@pytest.mark.parametrize("signed", [True, False])
def test_dynamic_map_matches_bnb_fingerprint(signed):
    digest = hashlib.sha256(dynamic_map(signed).tobytes()).hexdigest()
    assert digest == DYNAMIC_MAP_SHA256[signed]


def test_dynamic_map_signed():
    m = dynamic_map(signed=True)
    assert m.dtype == np.float32 and m.shape == (256,)
    assert np.all(np.diff(m) > 0)  # sorted, no duplicates
    assert m[127] == 0.0 and m[255] == 1.0 and (m < 0).sum() == 127
    np.testing.assert_array_equal(m[:127], -m[128:255][::-1])  # mirrored decades
    # Decade 1e-6 holds one value, the midpoint of [0.1, 1]; the top decade 64 cells of 0.9/64.
    assert m[128] == F32(1e-6) * F32(0.55)
    np.testing.assert_allclose(m[254], 1.0 - 0.9 / 128, rtol=1e-6)
    np.testing.assert_allclose(np.diff(m[191:255]), 0.9 / 64, rtol=1e-4)
    np.testing.assert_array_equal(DYNAMIC_MAP, m)
    assert not DYNAMIC_MAP.flags.writeable


def test_dynamic_map_unsigned():
    m = dynamic_map(signed=False)
    assert m.shape == (256,) and np.all(np.diff(m) > 0)
    assert m[0] == 0.0 and m[255] == 1.0
    # Decade 1e-6 has 2 cells, grid [0.1, 0.55, 1]: midpoints (0.1 + 0.55) / 2 and (0.55 + 1) / 2.
    assert m[1] == F32(1e-6) * ((F32(0.1) + F32(0.55)) / F32(2))
    assert m[2] == F32(1e-6) * ((F32(0.55) + F32(1.0)) / F32(2))


# ---------------------------------------------------------------- rounding rules


def test_nf4_ties_go_to_lower_index():
    # absmax 1 (the leading 1.0), so the normalised value is the input itself.
    t = THRESHOLDS
    w = np.concatenate([[F32(1.0)], t, [_up(x) for x in t], [_down(x) for x in t]]).astype(F32)
    idx = _indices(quantize_nf4(w, double_quant=False))
    k = np.arange(15)
    np.testing.assert_array_equal(idx[1:16], k)  # exactly on a threshold: the lower index
    np.testing.assert_array_equal(idx[16:31], k + 1)  # one ulp above: the upper
    np.testing.assert_array_equal(idx[31:46], k)  # one ulp below: the lower


def test_nf4_threshold_is_float32_midpoint_not_exact_midpoint():
    # Where float32 rounded the midpoint up, values just under it are nearer the upper code in
    # exact arithmetic, yet bnb (and the spec) compare with the float32 threshold.
    exact = (NF4_CODE[:-1].astype(np.float64) + NF4_CODE[1:]) / 2
    rounded_up = np.flatnonzero(THRESHOLDS.astype(np.float64) > exact)
    assert rounded_up.size > 0
    w = np.concatenate([[F32(1.0)], THRESHOLDS[rounded_up]]).astype(F32)
    idx = _indices(quantize_nf4(w, double_quant=False))
    np.testing.assert_array_equal(idx[1:], rounded_up)


def test_8bit_ties_go_to_lower_index():
    t = (DYNAMIC_MAP[:-1] + DYNAMIC_MAP[1:]) / F32(2)
    x = np.concatenate([[F32(1.0)], t[:200], [_up(v) for v in t[:200]]]).astype(F32)
    x2 = np.concatenate([[F32(1.0)], t[200:], [_up(v) for v in t[200:]]]).astype(F32)
    for chunk, k in ((x, np.arange(200)), (x2, np.arange(200, 255))):
        idx, absmax = quantize_blockwise(chunk, DYNAMIC_MAP, 512)
        assert absmax.tolist() == [1.0]
        np.testing.assert_array_equal(idx[1 : 1 + k.size], k)
        np.testing.assert_array_equal(idx[1 + k.size :], k + 1)


def test_normalisation_uses_reciprocal_not_division():
    # Find x near a threshold times a = 3 where x * (1/a) and x / a round to different sides.
    # Put it in a trailing partial block, where bnb's PyTorch reference divides and its CUDA
    # kernel multiplies: the spec follows the CUDA kernel.
    a = F32(3.0)
    inv = F32(1) / a
    x = _down(THRESHOLDS[7] * a, 6)
    for _ in range(12):
        by_recip = np.searchsorted(THRESHOLDS, x * inv, side="left")
        by_div = np.searchsorted(THRESHOLDS, x / a, side="left")
        if by_recip != by_div:
            break
        x = _up(x)
    assert by_recip != by_div, "no straddling value found"
    w = np.concatenate([np.full(64, 0.5, F32), [a, x]]).astype(F32)  # block 1 = [a, x]
    idx = _indices(quantize_nf4(w, double_quant=False))
    assert idx[65] == by_recip


def test_argmin_nearest_on_random_data(rng):
    # Away from exact ties, the thresholds give the plain nearest code (an independent check).
    w = rng.normal(size=(37, 53)).astype(F32)
    q = quantize_nf4(w, blocksize=64, double_quant=False)
    flat = w.reshape(-1)
    a = np.repeat(q.absmax, 64)[: flat.size].astype(np.float64)
    dist = np.abs(flat[:, None] / a[:, None] - NF4_CODE[None, :].astype(np.float64))
    np.testing.assert_array_equal(_indices(q), np.argmin(dist, axis=1))


# ---------------------------------------------------------------- hand vectors


def test_zero_block():
    w = np.concatenate([np.zeros(64, F32), np.linspace(-1, 2, 64, dtype=F32)])
    for dq in (False, True):
        q = quantize_nf4(w, blocksize=64, double_quant=dq)
        assert np.all(_indices(q)[:64] == NF4_ZERO_INDEX)
        assert np.all(q.packed[:32] == 0x77)
        out = dequantize_nf4(q)
        assert np.all(out[:64] == 0.0) and not np.any(np.signbit(out[:64]))
    assert quantize_nf4(w, double_quant=False).absmax[0] == 0.0


def test_all_zero_tensor():
    for dq in (False, True):
        q = quantize_nf4(np.zeros((3, 100), F32), blocksize=64, double_quant=dq)
        assert np.all(q.packed == 0x77)
        np.testing.assert_array_equal(q.absmax_f32, np.zeros(5, F32))
        np.testing.assert_array_equal(dequantize_nf4(q), np.zeros((3, 100), F32))
    q = quantize_nf4(np.zeros((3, 100), F32), double_quant=True)
    assert q.offset == 0.0 and q.nested_absmax.tolist() == [0.0]
    assert np.all(q.absmax == 127)  # the dynamic map's 0.0


@pytest.mark.parametrize("a", [2.0, 3.7, 1e-3, 12345.0])
def test_each_code_value_times_absmax_round_trips_exactly(a):
    a = F32(a)
    order = np.array([3, 15, 0, 7, 8, 1, 14, 2, 9, 13, 4, 12, 5, 11, 6, 10])
    w = (NF4_CODE[order] * a).astype(F32)  # contains +-a, so the block's absmax is a
    q = quantize_nf4(w, blocksize=32, double_quant=False)
    assert q.absmax.tolist() == [a]
    np.testing.assert_array_equal(_indices(q), order)
    np.testing.assert_array_equal(dequantize_nf4(q), w)


@pytest.mark.parametrize("c", [0.3, -2.5, 7e-5])
def test_block_of_one_repeated_value(c):
    w = np.full((2, 64), c, F32)
    q = quantize_nf4(w, blocksize=64, double_quant=False)
    assert np.all(_indices(q) == (15 if c > 0 else 0))
    np.testing.assert_array_equal(q.absmax, np.full(2, abs(F32(c))))
    np.testing.assert_array_equal(dequantize_nf4(q), w)


@pytest.mark.parametrize("n", [1, 2, 31, 63, 64, 65, 127, 129, 201])
def test_partial_trailing_block(n):
    rng = np.random.default_rng(n)
    w = rng.normal(size=n).astype(F32)
    w[-(n % 64 or 64) :] *= F32(0.01)  # the last block much smaller than the rest
    q = quantize_nf4(w, blocksize=64, double_quant=False)
    n_blocks = -(-n // 64)
    assert q.packed.shape == ((n + 1) // 2,) and q.absmax.shape == (n_blocks,)
    expected = [np.abs(w[i : i + 64]).max() for i in range(0, n, 64)]
    np.testing.assert_array_equal(q.absmax, np.array(expected, F32))
    out = dequantize_nf4(q)
    assert out.shape == (n,) and out.dtype == np.float32
    scale = np.repeat(q.absmax, 64)[:n]
    assert np.all(np.abs(out - w) <= scale * (HALF_GAP_NF4 + 1e-6))
    if n % 2:
        assert q.packed[-1] & 0x0F == NF4_ZERO_INDEX  # padding nibble: the code of 0.0


def test_packing_hand_example():
    # Indices 15, 0, 3: even elements in the high nibble, odd tail padded with 7 (not 0).
    w = NF4_CODE[[15, 0, 3]].copy()
    q = quantize_nf4(w, double_quant=False)
    assert q.packed.tolist() == [0xF0, 0x37]
    assert pack_nibbles(np.array([1, 2, 3, 4], np.uint8)).tolist() == [0x12, 0x34]
    np.testing.assert_array_equal(dequantize_nf4(q), w)


@pytest.mark.parametrize("n", [1, 2, 7, 64, 1001])
def test_pack_unpack_round_trip(n):
    idx = np.random.default_rng(n).integers(0, 16, size=n).astype(np.uint8)
    packed = pack_nibbles(idx)
    assert packed.dtype == np.uint8 and packed.shape == ((n + 1) // 2,)
    np.testing.assert_array_equal(packed >> 4, idx[0::2])
    np.testing.assert_array_equal(unpack_nibbles(packed, n), idx)


def test_scalar_and_nd_shapes():
    for shape in [(), (5,), (3, 7), (2, 3, 11)]:
        w = np.random.default_rng(1).normal(size=shape).astype(F32)
        out = dequantize_nf4(quantize_nf4(w))
        assert out.shape == shape and out.dtype == np.float32


# ---------------------------------------------------------------- double quantization


def test_double_quant_state(rng):
    # 301 NF4 blocks -> 2 nested blocks (256 + a partial 45), with varied block scales.
    w = (rng.normal(size=(301, 64)) * rng.uniform(0.1, 3.0, size=(301, 1))).astype(F32)
    w = w.reshape(-1)[:-5]  # and a partial trailing NF4 block
    plain = quantize_nf4(w, blocksize=64, double_quant=False)
    q = quantize_nf4(w, blocksize=64, double_quant=True)
    assert q.double_quant and not plain.double_quant
    np.testing.assert_array_equal(q.packed, plain.packed)  # the 4-bit step is unchanged
    assert q.absmax.dtype == np.uint8 and q.absmax.shape == (301,)
    assert q.nested_blocksize == NESTED_BLOCKSIZE and q.nested_code is DYNAMIC_MAP
    assert isinstance(q.offset, np.float32)
    assert q.offset == F32(np.mean(plain.absmax.astype(np.float64)))
    centred = (plain.absmax - q.offset).astype(np.float64)
    expected_nested = [np.abs(centred[:256]).max(), np.abs(centred[256:]).max()]
    np.testing.assert_array_equal(q.nested_absmax, np.array(expected_nested, F32))
    # Codes are the nearest entries of the map to centred / nested_absmax (independent argmin).
    s = np.repeat(q.nested_absmax, 256)[:301].astype(np.float64)
    dist = np.abs((centred / s)[:, None] - DYNAMIC_MAP[None, :].astype(np.float64))
    np.testing.assert_array_equal(q.absmax, np.argmin(dist, axis=1))
    # Dequantized absmax: code * nested_absmax + offset, within half a map gap of the truth.
    a = dequantize_absmax(q)
    assert a.dtype == np.float32
    np.testing.assert_array_equal(
        a, DYNAMIC_MAP[q.absmax] * q.nested_absmax[np.arange(301) // 256] + q.offset
    )
    assert np.all(np.abs(a - plain.absmax) <= s * (HALF_GAP_8BIT + 1e-6))
    np.testing.assert_array_equal(q.absmax_f32, a)


def test_double_quant_dequant_uses_dequantized_absmax(rng):
    w = rng.normal(size=(40, 96)).astype(F32)
    q = quantize_nf4(w, blocksize=64)
    idx = _indices(q)
    expected = NF4_CODE[idx] * np.repeat(dequantize_absmax(q), 64)
    np.testing.assert_array_equal(dequantize_nf4(q), expected.reshape(40, 96))


def test_blockwise_round_trip_8bit(rng):
    x = rng.normal(size=700).astype(F32)
    idx, absmax = quantize_blockwise(x, DYNAMIC_MAP, 256)
    assert idx.dtype == np.uint8 and absmax.shape == (3,)
    out = dequantize_blockwise(idx, absmax, DYNAMIC_MAP, 256)
    assert np.all(np.abs(out - x) <= np.repeat(absmax, 256)[:700] * (HALF_GAP_8BIT + 1e-6))


# ---------------------------------------------------------------- inputs, layout, memory


def test_input_dtypes_cast_to_float32(rng):
    w64 = rng.normal(size=(9, 70))
    for w in (w64, w64.astype(np.float16)):
        q, ref = quantize_nf4(w), quantize_nf4(w.astype(F32))
        np.testing.assert_array_equal(q.packed, ref.packed)
        np.testing.assert_array_equal(q.absmax, ref.absmax)
        assert q.offset == ref.offset
    ml_dtypes = pytest.importorskip("ml_dtypes")
    wb = w64.astype(ml_dtypes.bfloat16)
    q, ref = quantize_nf4(wb), quantize_nf4(wb.astype(F32))
    np.testing.assert_array_equal(q.packed, ref.packed)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf, 1e39])
def test_non_finite_input_raises(bad):
    w = np.ones(100)
    w[37] = bad
    with pytest.raises(ValueError, match="w: contains NaN or Inf"):
        quantize_nf4(w)


@pytest.mark.parametrize("blocksize", [48, 16, 8192, 0, -64, 64.0, True])
def test_bad_blocksize_raises(blocksize):
    with pytest.raises(ValueError, match=rf"blocksize.*{blocksize!r}"):
        quantize_nf4(np.ones(128, F32), blocksize=blocksize)
    with pytest.raises(ValueError, match="blocksize"):
        nf4_bits_per_param(blocksize)


def test_other_bad_inputs_raise():
    with pytest.raises(ValueError, match="w: expected a float array"):
        quantize_nf4(np.arange(64))
    with pytest.raises(ValueError, match="w: expected at least one value"):
        quantize_nf4(np.zeros((0, 4), F32))
    with pytest.raises(ValueError, match="kernel"):
        quantize_kernel(np.ones(64, F32))


def test_nf4tensor_validation():
    q = quantize_nf4(np.ones((4, 64), F32))
    with pytest.raises(ValueError, match="packed"):
        NF4Tensor(packed=q.packed[:-1], absmax=q.absmax, shape=q.shape, blocksize=64)
    with pytest.raises(ValueError, match="absmax"):  # uint8 codes without the nested state
        NF4Tensor(packed=q.packed, absmax=q.absmax, shape=q.shape, blocksize=64)
    with pytest.raises(ValueError, match="all set or all None"):
        NF4Tensor(q.packed, q.absmax, q.shape, 64, nested_absmax=q.nested_absmax)
    with pytest.raises(ValueError, match="blocksize"):
        NF4Tensor(q.packed, q.absmax, q.shape, 48)
    with pytest.raises(AttributeError):
        q.blocksize = 128  # type: ignore[misc]


def test_kernel_layout(rng):
    k = rng.normal(size=(96, 80)).astype(F32)  # [in, out]
    q = quantize_kernel(k, blocksize=64)
    assert q.shape == (80, 96)  # W = k.T, PyTorch [out, in]
    ref = quantize_nf4(np.ascontiguousarray(k.T), blocksize=64)
    np.testing.assert_array_equal(q.packed, ref.packed)
    assert not np.array_equal(q.packed, quantize_nf4(k, blocksize=64).packed)  # layout matters
    out = dequantize_kernel(q)
    assert out.shape == (96, 80) and out.flags.c_contiguous
    np.testing.assert_array_equal(out, dequantize_nf4(ref).T)
    with pytest.raises(ValueError, match="q.shape"):
        dequantize_kernel(quantize_nf4(np.ones(64, F32)))


def test_bits_per_param():
    assert nf4_bits_per_param(64, double_quant=False) == 4.5
    assert nf4_bits_per_param(64, double_quant=True) == 4 + 8 / 64 + 32 / (64 * 256)
    assert abs(nf4_bits_per_param() - 4.127) < 1e-3
    assert nf4_bits_per_param(128, double_quant=False) == 4.25


# ---------------------------------------------------------------- properties

_shapes = hnp.array_shapes(min_dims=1, max_dims=3, min_side=1, max_side=40)
# Finite float32 without subnormals: a nonzero block's absmax is then >= 1.2e-38, above the
# 1e-38 floor, so every block normalises to [-1, 1] with its own absmax.
_elements = st.floats(-1e4, 1e4, width=32, allow_subnormal=False)
_weights = hnp.arrays(np.float32, _shapes, elements=_elements)
_blocksizes = st.sampled_from([32, 64, 128])


def _bound(w: np.ndarray, blocksize: int, double_quant: bool) -> np.ndarray:
    """Per-value bound on |dequant - w|, from quantities computed here from w alone.

    NF4 step: the normalised value is within 2 float32 roundings of w/a, and the nearest code is
    within half the largest code gap, HALF_GAP_NF4 = 0.1385, so |c a - w| <= a (0.1385 + 4e-7),
    plus one rounding of the product. Double quant replaces a by a' with
    |a' - a| <= s * HALF_GAP_8BIT (+ roundings), s the nested block's max |a_j - offset|; the
    value error grows by |c| |a' - a| <= |a' - a|. Slack 1e-6 relative covers all roundings.
    """
    flat = w.reshape(-1).astype(np.float64)
    n = flat.size
    n_blocks = -(-n // blocksize)
    a = np.array([np.abs(flat[i * blocksize : (i + 1) * blocksize]).max() for i in range(n_blocks)])
    bound = a * (HALF_GAP_NF4 + 1e-6)
    if double_quant:
        offset = a.mean()
        s = np.array([np.abs(a[j : j + 256] - offset).max() for j in range(0, n_blocks, 256)])
        s = np.repeat(s, 256)[:n_blocks]
        bound = bound + s * (HALF_GAP_8BIT + 1e-6) + 1e-6 * abs(offset)
    return np.repeat(bound, blocksize)[:n].reshape(w.shape)


@settings(deadline=None, max_examples=150)
@given(w=_weights, blocksize=_blocksizes, double_quant=st.booleans())
def test_property_error_bound_and_shape(w, blocksize, double_quant):
    q = quantize_nf4(w, blocksize=blocksize, double_quant=double_quant)
    out = dequantize_nf4(q)
    assert out.shape == w.shape and out.dtype == np.float32
    err = np.abs(out.astype(np.float64) - w)
    assert np.all(err <= _bound(w, blocksize, double_quant))


@settings(deadline=None, max_examples=150)
@given(w=_weights, blocksize=_blocksizes)
def test_property_requantize_is_idempotent(w, blocksize):
    q = quantize_nf4(w, blocksize=blocksize, double_quant=False)
    q2 = quantize_nf4(dequantize_nf4(q), blocksize=blocksize, double_quant=False)
    np.testing.assert_array_equal(q2.packed, q.packed)
    np.testing.assert_array_equal(q2.absmax, q.absmax)


@settings(deadline=None, max_examples=150)
@given(w=_weights, blocksize=_blocksizes)
def test_property_requantize_is_idempotent_double_quant(w, blocksize):
    # Each block's largest value lands on code +-1, so re-quantizing finds absmax a' again and
    # the same indices. That needs a' > 0: a block far smaller than the spread of the others can
    # get a' <= 0 from the 8-bit error, and then its values (not their indices) flip sign.
    q = quantize_nf4(w, blocksize=blocksize, double_quant=True)
    q2 = quantize_nf4(dequantize_nf4(q), blocksize=blocksize, double_quant=True)
    n = w.size
    keep = np.repeat(dequantize_absmax(q) > 1e-30, blocksize)[:n]
    np.testing.assert_array_equal(_indices(q2)[keep], _indices(q)[keep])
    zero = np.repeat(quantize_nf4(w, blocksize, False).absmax == 0, blocksize)[:n]
    assert np.all(_indices(q2)[zero] == NF4_ZERO_INDEX)
