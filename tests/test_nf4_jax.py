"""The engine's NF4 (jnp) against the spec's: identical bytes, state and values, one API."""

from __future__ import annotations

import dataclasses

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax_impl import nf4 as J
from ref_numpy import nf4 as S

SHAPES = [(1,), (7,), (63,), (64,), (65,), (3, 21), (128, 96), (17, 300), (256 * 64 + 3,)]


def assert_same_state(got: J.NF4Tensor, want: S.NF4Tensor) -> None:
    assert isinstance(got, J.NF4Tensor)
    assert (got.shape, got.blocksize, got.nested_blocksize) == (
        want.shape,
        want.blocksize,
        want.nested_blocksize,
    )
    np.testing.assert_array_equal(np.asarray(got.packed), want.packed)
    np.testing.assert_array_equal(np.asarray(got.absmax), want.absmax)
    assert np.asarray(got.absmax).dtype == want.absmax.dtype
    assert got.double_quant == want.double_quant
    if want.double_quant:
        np.testing.assert_array_equal(np.asarray(got.nested_absmax), want.nested_absmax)
        np.testing.assert_array_equal(np.asarray(got.nested_code), want.nested_code)
        assert np.float32(got.offset) == want.offset
    else:
        assert got.nested_absmax is None and got.nested_code is None and got.offset is None


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
                        deq = self.variant(J.dequantize_nf4)(got)
                        np.testing.assert_array_equal(np.asarray(deq), S.dequantize_nf4(want))
                        np.testing.assert_array_equal(
                            np.asarray(J.dequantize_absmax(got)), S.dequantize_absmax(want)
                        )


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
    want = S.quantize_kernel(kernel)
    got = J.quantize_kernel(jnp.asarray(kernel))
    assert got.shape == want.shape == (40, 96)
    assert_same_state(got, want)
    np.testing.assert_array_equal(np.asarray(J.dequantize_kernel(got)), S.dequantize_kernel(want))
    mod = J.NF4Kernel.from_kernel(jnp.asarray(kernel))
    assert (mod.shape, mod.blocksize) == ((40, 96), 64)
    assert_same_state(mod.tensor(), want)
    with pytest.raises(ValueError, match=r"kernel: expected a 2-D \[in, out\] array"):
        J.quantize_kernel(jnp.ones(64))
    with pytest.raises(ValueError, match=r"q.shape: expected a 2-D \(out, in\) weight"):
        J.dequantize_kernel(J.quantize_nf4(jnp.ones(64)))


def test_to_spec_round_trip_and_spec_checks() -> None:
    """``to_spec`` gives the spec's own tensor (checked by it); the engine module rebuilt from
    one layer's fields gives the same one."""
    w = np.random.default_rng(4).normal(size=(5, 200)).astype(np.float32)
    for double in (True, False):
        got = J.quantize_nf4(jnp.asarray(w), 32, double)
        want = S.quantize_nf4(w, 32, double)
        back = got.to_spec()
        assert isinstance(back, S.NF4Tensor)
        np.testing.assert_array_equal(S.dequantize_nf4(back), S.dequantize_nf4(want))
        mod = J.NF4Kernel(got)
        fields = {k: np.asarray(v) for k, v in vars(mod).items() if isinstance(v, J.NF4State)}
        assert sorted(fields) == sorted(
            k
            for k in ("packed", "absmax", "nested_absmax", "nested_code", "offset")
            if getattr(want, k) is not None
        )
    np.testing.assert_array_equal(S.dequantize_nf4(mod.spec_tensor(fields)), S.dequantize_nf4(want))
    short = dataclasses.replace(got, packed=got.packed[:-1])
    with pytest.raises(ValueError, match=r"NF4Tensor.packed: expected uint8 \(500,\)"):
        short.to_spec()


def test_pytree_leaves_and_static_fields() -> None:
    q = J.quantize_nf4(jnp.ones((4, 64)), 64, True)
    leaves, treedef = jax.tree.flatten(q)
    assert len(leaves) == 5  # packed, absmax, nested_absmax, nested_code, offset
    assert len(jax.tree.leaves(J.quantize_nf4(jnp.ones((4, 64)), 64, False))) == 2
    again = jax.tree.unflatten(treedef, leaves)
    assert (again.shape, again.blocksize, again.nested_blocksize) == ((4, 64), 64, 256)
    # A stack of layers slices back into per-layer tensors under scan.
    stack = jax.tree.map(lambda *a: jnp.stack(a), q, q)

    def body(c: jax.Array, layer: J.NF4Tensor) -> tuple[jax.Array, jax.Array]:
        return c + J.dequantize_nf4(layer).sum(), layer.packed

    total, _ = jax.lax.scan(body, jnp.float32(0), stack)
    assert float(total) == 2 * 4 * 64


def test_nf4_linear_values_and_gradient() -> None:
    """The 4-bit linear equals ``x @ dequantize_kernel(q)``; its input gradient is
    ``dy @ W``, formed by dequantizing again; the NF4 fields get zero cotangents."""
    rng = np.random.default_rng(5)
    kernel = rng.normal(size=(24, 10)).astype(np.float32)  # [I, O]
    x = jnp.asarray(rng.normal(size=(3, 7, 24)).astype(np.float32))  # [B, T, I]
    dy = jnp.asarray(rng.normal(size=(3, 7, 10)).astype(np.float32))  # [B, T, O]
    q = J.quantize_kernel(jnp.asarray(kernel), 32)
    w = J.dequantize_kernel(q)  # [I, O]
    np.testing.assert_allclose(
        np.asarray(jax.jit(J.nf4_linear)(x, q)), np.asarray(x @ w), rtol=1e-6, atol=1e-6
    )
    y, vjp = jax.vjp(J.nf4_linear, x, q)
    dx, dq = vjp(dy)
    np.testing.assert_allclose(np.asarray(dx), np.asarray(dy @ w.T), rtol=1e-6, atol=1e-6)
    assert dq.packed.dtype == jax.dtypes.float0 and dq.absmax.dtype == jax.dtypes.float0
    assert not np.any(np.asarray(dq.nested_absmax)) and not np.any(np.asarray(dq.offset))
    # A changed weight changes the output: the product is not with some other kernel.
    other = J.quantize_kernel(jnp.asarray(kernel[:, ::-1].copy()), 32)
    assert not np.allclose(np.asarray(J.nf4_linear(x, other)), np.asarray(y))
    # NF4Kernel's call is this product.
    mod = J.NF4Kernel(q)
    np.testing.assert_array_equal(np.asarray(mod(x)), np.asarray(J.nf4_linear(x, q)))


def test_a_wrong_byte_is_seen() -> None:
    w = np.random.default_rng(3).normal(size=(8, 64)).astype(np.float32)
    got = J.quantize_nf4(jnp.asarray(w))
    bad = dataclasses.replace(got, packed=got.packed.at[5].set(got.packed[5] ^ 0x10))
    with pytest.raises(AssertionError):
        assert_same_state(bad, S.quantize_nf4(w))


def test_bad_input() -> None:
    with pytest.raises(ValueError, match="blocksize: expected a power of two"):
        J.quantize_nf4(jnp.zeros(8), blocksize=48)
    with pytest.raises(ValueError, match="w: expected a float array, got dtype int32"):
        J.quantize_nf4(jnp.arange(64))
    with pytest.raises(ValueError, match=r"w: expected at least one value, got shape \(0, 4\)"):
        J.quantize_nf4(jnp.zeros((0, 4)))
