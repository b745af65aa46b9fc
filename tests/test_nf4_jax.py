"""The engine's NF4 (jnp) against the spec's: identical bytes, state and values."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax_impl import nf4 as J
from ref_numpy import nf4 as S

SHAPES = [(1,), (7,), (63,), (64,), (65,), (3, 21), (128, 96), (17, 300), (256 * 64 + 3,)]


def assert_same_state(got: dict, want: S.NF4Tensor) -> None:
    np.testing.assert_array_equal(np.asarray(got["packed"]), want.packed)
    np.testing.assert_array_equal(np.asarray(got["absmax"]), want.absmax)
    assert np.asarray(got["absmax"]).dtype == want.absmax.dtype
    if want.double_quant:
        np.testing.assert_array_equal(np.asarray(got["nested_absmax"]), want.nested_absmax)
        np.testing.assert_array_equal(np.asarray(got["nested_code"]), want.nested_code)
        assert np.float32(got["offset"]) == want.offset
    else:
        assert "nested_absmax" not in got


class TestAgainstSpec(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_random_shapes(self) -> None:
        rng = np.random.default_rng(0)
        for shape in SHAPES:
            for blocksize in (32, 64, 256):
                for double in (True, False):
                    w = (rng.standard_t(4, size=shape) * rng.uniform(0.01, 3)).astype(np.float32)
                    w.reshape(-1)[: min(w.size, 64)] = 0.0  # an all-zero first block

                    def q(w, blocksize=blocksize, double=double):
                        return J.quantize_nf4(w, blocksize, double)

                    got = self.variant(q)(jnp.asarray(w))
                    want = S.quantize_nf4(w, blocksize, double)
                    with self.subTest(shape=shape, blocksize=blocksize, double=double):
                        assert_same_state(got, want)
                        deq = self.variant(
                            lambda s, bs=blocksize, sh=shape: J.dequantize_nf4(s, sh, bs)
                        )(got)
                        np.testing.assert_array_equal(np.asarray(deq), S.dequantize_nf4(want))


def test_offset_is_the_rounded_float64_mean() -> None:
    """The double-float mean equals float32(mean(float64(x))) where float32 sums drift."""
    rng = np.random.default_rng(1)
    for n in (1, 2, 3, 255, 256, 257, 4097, 100_003):
        x = np.abs(rng.normal(size=n)).astype(np.float32) * np.float32(10 ** rng.uniform(-3, 3))
        want = np.float32(np.mean(x, dtype=np.float64))
        got = np.float32(jax.jit(J.mean_f64_rounded)(jnp.asarray(x)))
        assert got == want, (n, got, want)
    naive = np.float32(jnp.mean(jnp.asarray(x)))  # plain float32 mean of the last case
    assert abs(naive - want) <= 4 * np.spacing(want)  # close, and usually not equal


def test_kernel_layout_matches_spec_and_bnb_order() -> None:
    rng = np.random.default_rng(2)
    kernel = rng.normal(size=(96, 40)).astype(np.float32)  # [in, out]
    mod = J.NF4Kernel.from_kernel(jnp.asarray(kernel))
    want = S.quantize_kernel(kernel)
    assert mod.shape == want.shape == (40, 96)
    assert_same_state(mod.state(), want)
    np.testing.assert_array_equal(
        np.asarray(mod.dequantize(jnp.float32)), S.dequantize_kernel(want)
    )
    assert mod.dequantize(jnp.bfloat16).dtype == jnp.bfloat16


def test_a_wrong_byte_is_seen() -> None:
    w = np.random.default_rng(3).normal(size=(8, 64)).astype(np.float32)
    got = J.quantize_nf4(jnp.asarray(w))
    got["packed"] = got["packed"].at[5].set(got["packed"][5] ^ 0x10)
    with pytest.raises(AssertionError):
        assert_same_state(got, S.quantize_nf4(w))


def test_bad_blocksize() -> None:
    with pytest.raises(ValueError, match="blocksize: expected a power of two"):
        J.quantize_nf4(jnp.zeros(8), blocksize=48)
