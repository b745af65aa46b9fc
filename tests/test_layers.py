"""Every elementary backward against central finite differences (float64, odd sizes)."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import pytest

from ref_numpy import attention as A
from ref_numpy import layers as L
from ref_numpy import positional as P
from ref_numpy.config import RopeScaling
from tests.gradcheck import grad_rel_err, numerical_grad
from tests.helpers import FD_RTOL

B, T, S, D, N, K, H, V = 3, 7, 7, 10, 4, 2, 6, 11


def check_backward(
    forward: Callable[..., tuple[Any, Any]],
    backward: Callable[[Any, Any], Any],
    inputs: Sequence[np.ndarray],
    wrt: Sequence[int],
    rng: np.random.Generator,
) -> None:
    """f(inputs) = sum(forward(*inputs) * g) for a random g; compare d f / d inputs[i]."""
    out, cache = forward(*inputs)
    g = rng.normal(size=np.shape(out))
    grads = backward(g, cache)
    grads = grads if isinstance(grads, tuple) else (grads,)

    def f() -> float:
        return float(np.sum(forward(*inputs)[0] * g))

    for i, analytic in zip(wrt, grads, strict=True):
        numeric, idx = numerical_grad(f, inputs[i])
        err = grad_rel_err(analytic.reshape(-1)[idx], numeric)
        assert err <= FD_RTOL, f"input {i}: relative error {err:.2e}"


def test_linear(rng: np.random.Generator) -> None:
    x, w, b = rng.normal(size=(B, T, D)), rng.normal(size=(D, 5)), rng.normal(size=5)
    check_backward(L.linear_forward, L.linear_backward, [x, w, b], [0, 1, 2], rng)


def test_linear_frozen_weights_give_no_weight_grads(rng: np.random.Generator) -> None:
    x, w = rng.normal(size=(B, D)), rng.normal(size=(D, 5))
    _, cache = L.linear_forward(x, w)
    dx, dw, db = L.linear_backward(np.ones((B, 5)), cache, weight_grads=False)
    assert dw is None and db is None
    np.testing.assert_allclose(dx, np.ones((B, 5)) @ w.T)


def test_embedding(rng: np.random.Generator) -> None:
    ids = rng.integers(0, V, size=(B, T))
    ids[0, :3] = 4  # a repeated id must accumulate, not overwrite
    table = rng.normal(size=(V, D))

    def fwd(t: np.ndarray) -> tuple[np.ndarray, Any]:
        return L.embedding_forward(ids, t)

    check_backward(fwd, L.embedding_backward, [table], [0], rng)


def test_embedding_rejects_out_of_range_ids() -> None:
    with pytest.raises(ValueError, match=r"ids: expected token ids in \[0, 11\)"):
        L.embedding_forward(np.array([[0, 11]]), np.zeros((V, D)))


def test_layer_norm(rng: np.random.Generator) -> None:
    x, w, b = rng.normal(size=(B, T, D)), rng.normal(size=D), rng.normal(size=D)

    def fwd(x: np.ndarray, w: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, Any]:
        return L.layer_norm_forward(x, w, b, 1e-5)

    check_backward(fwd, L.layer_norm_backward, [x, w, b], [0, 1, 2], rng)


def test_layer_norm_matches_definition(rng: np.random.Generator) -> None:
    x = rng.normal(size=(B, D)) * 3 + 1
    y, _ = L.layer_norm_forward(x, np.ones(D), np.zeros(D), 0.0)
    np.testing.assert_allclose(y.mean(-1), 0, atol=1e-12)
    np.testing.assert_allclose(y.var(-1), 1, rtol=1e-12)


def test_rms_norm(rng: np.random.Generator) -> None:
    x, w = rng.normal(size=(B, T, D)), rng.normal(size=D)

    def fwd(x: np.ndarray, w: np.ndarray) -> tuple[np.ndarray, Any]:
        return L.rms_norm_forward(x, w, 1e-6)

    check_backward(fwd, L.rms_norm_backward, [x, w], [0, 1], rng)
    y, _ = L.rms_norm_forward(x, np.ones(D), 0.0)
    np.testing.assert_allclose((y * y).mean(-1), 1, rtol=1e-12)


@pytest.mark.parametrize(
    "name", ["relu", "gelu", "gelu_tanh", "silu"], ids=["relu", "gelu", "gelu_tanh", "silu"]
)
def test_activation(name: str, rng: np.random.Generator) -> None:
    x = rng.normal(size=(B, T, D)) * 2
    x[np.abs(x) < 1e-3] = 0.5  # keep finite differences away from relu's kink
    fwd, bwd = getattr(L, f"{name}_forward"), getattr(L, f"{name}_backward")
    check_backward(fwd, bwd, [x], [0], rng)


def test_activation_values() -> None:
    x = np.array([-2.0, 0.0, 1.0])
    np.testing.assert_allclose(L.relu_forward(x)[0], [0, 0, 1])
    # GELU(1) = Phi(1) = 0.8413447460685429 (standard normal CDF at 1)
    np.testing.assert_allclose(L.gelu_forward(x)[0][2], 0.8413447460685429, rtol=1e-15)
    np.testing.assert_allclose(L.gelu_tanh_forward(x)[0][2], 0.8411919906082768, rtol=1e-15)
    np.testing.assert_allclose(L.silu_forward(x)[0][2], 1 / (1 + math.exp(-1)), rtol=1e-15)
    # silu must not overflow for large negative inputs
    assert np.isfinite(L.silu_forward(np.array([-1000.0, 1000.0]))[0]).all()


def test_swiglu(rng: np.random.Generator) -> None:
    g, u = rng.normal(size=(B, T, 5)), rng.normal(size=(B, T, 5))
    check_backward(L.swiglu_forward, L.swiglu_backward, [g, u], [0, 1], rng)


def test_softmax_masked_and_fully_masked_rows(rng: np.random.Generator) -> None:
    x = rng.normal(size=(B, T, S)) * 4
    mask = rng.random((B, T, S)) > 0.3
    mask[1, 2] = False  # a row with nothing to attend to

    def fwd(x: np.ndarray) -> tuple[np.ndarray, Any]:
        return L.softmax_forward(x, mask)

    check_backward(fwd, L.softmax_backward, [x], [0], rng)
    p, _ = fwd(x)
    assert np.all(p[~mask] == 0)
    np.testing.assert_array_equal(p[1, 2], np.zeros(S))
    rows = mask.any(-1)
    np.testing.assert_allclose(p.sum(-1)[rows], 1.0, rtol=1e-14)
    # max subtraction: huge logits stay finite
    big, _ = L.softmax_forward(np.array([1000.0, 1001.0]))
    np.testing.assert_allclose(big, [1 / (1 + math.e), math.e / (1 + math.e)])


def test_cross_entropy(rng: np.random.Generator) -> None:
    logits = rng.normal(size=(B, T, V))
    targets = rng.integers(0, V, size=(B, T))
    targets[0, :4] = L.IGNORE_INDEX

    def fwd(z: np.ndarray) -> tuple[float, Any]:
        return L.cross_entropy_forward(z, targets)

    check_backward(fwd, L.cross_entropy_backward, [logits], [0], rng)
    # by hand: mean of -log softmax at the target over the counted tokens
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    keep = targets != L.IGNORE_INDEX
    want = -np.take_along_axis(logp, np.where(keep, targets, 0)[..., None], -1)[..., 0][keep]
    assert fwd(logits)[0] == pytest.approx(want.mean(), rel=1e-14)


def test_cross_entropy_all_ignored_is_zero_not_nan() -> None:
    loss, cache = L.cross_entropy_forward(np.zeros((1, 3, V)), np.full((1, 3), -100))
    assert loss == 0.0
    assert not L.cross_entropy_backward(1.0, cache).any()


def test_sinusoidal_table_values() -> None:
    table = P.sinusoidal_table(5, 6)
    np.testing.assert_allclose(table[0], [0, 1, 0, 1, 0, 1])
    # PE[3, 2] = sin(3 / 10000^(2/6)), PE[3, 3] = cos(3 / 10000^(2/6))
    np.testing.assert_allclose(
        table[3, 2:4], [math.sin(3 / 10000 ** (1 / 3)), math.cos(3 / 10000 ** (1 / 3))]
    )


def test_learned_positions(rng: np.random.Generator) -> None:
    x, table = rng.normal(size=(B, T, D)), rng.normal(size=(9, D))
    pos = np.stack([np.arange(T), np.arange(T)[::-1], np.r_[0:4, 0:3]])  # packed row: restarts

    def fwd(x: np.ndarray, t: np.ndarray) -> tuple[np.ndarray, Any]:
        return P.learned_forward(x, pos, t)

    check_backward(fwd, P.learned_backward, [x, table], [0, 1], rng)
    with pytest.raises(ValueError, match="positions: expected values in"):
        P.learned_forward(x, pos + 5, table)


def test_rope(rng: np.random.Generator) -> None:
    x = rng.normal(size=(B, T, N, H))
    pos = rng.integers(0, 50, size=(B, T))
    inv = P.rope_frequencies(H, 10000.0)

    def fwd(x: np.ndarray) -> tuple[np.ndarray, Any]:
        return P.rope_forward(x, pos, inv)

    check_backward(fwd, P.rope_backward, [x], [0], rng)
    y, _ = fwd(x)
    np.testing.assert_allclose(np.linalg.norm(y, axis=-1), np.linalg.norm(x, axis=-1))


def test_rope_relative_property(rng: np.random.Generator) -> None:
    """<rope(q, m), rope(k, n)> depends only on m - n."""
    q, k = rng.normal(size=(1, 1, 1, H)), rng.normal(size=(1, 1, 1, H))
    inv = P.rope_frequencies(H, 500.0)

    def dot(m: int, n: int) -> float:
        qm = P.rope_forward(q, np.array([[m]]), inv)[0]
        kn = P.rope_forward(k, np.array([[n]]), inv)[0]
        return float((qm * kn).sum())

    assert dot(7, 3) == pytest.approx(dot(14, 10), rel=1e-12)
    assert dot(7, 3) != pytest.approx(dot(7, 4), rel=1e-6)


def test_llama3_rope_scaling_bands() -> None:
    sc = RopeScaling(
        "llama3",
        factor=8.0,
        low_freq_factor=1.0,
        high_freq_factor=4.0,
        original_max_position_embeddings=64,
    )
    base = P.rope_frequencies(32, 10000.0)
    scaled = P.rope_frequencies(32, 10000.0, sc)
    wavelen = 2 * math.pi / base
    high = wavelen < 64 / 4
    low = wavelen > 64 / 1
    assert high.any() and low.any() and (~high & ~low).any()
    np.testing.assert_array_equal(scaled[high], base[high])
    np.testing.assert_allclose(scaled[low], base[low] / 8)
    mid = ~high & ~low
    assert np.all(scaled[mid] < base[mid]) and np.all(scaled[mid] > base[mid] / 8)


def test_sdpa_gqa(rng: np.random.Generator) -> None:
    q = rng.normal(size=(B, T, N, H))
    k, v = rng.normal(size=(B, S, K, H)), rng.normal(size=(B, S, K, H))
    mask = A.attention_mask(B, T, S, padding=(rng.random((B, S)) > 0.2).astype(int))
    check_backward(
        lambda q, k, v: A.sdpa_forward(q, k, v, mask), A.sdpa_backward, [q, k, v], [0, 1, 2], rng
    )


def test_sdpa_equals_repeated_kv_reference(rng: np.random.Generator) -> None:
    """GQA equals ordinary multi-head attention with each kv head repeated G times."""
    q = rng.normal(size=(B, T, N, H))
    k, v = rng.normal(size=(B, S, K, H)), rng.normal(size=(B, S, K, H))
    mask = A.attention_mask(B, T, S)
    out, _ = A.sdpa_forward(q, k, v, mask)
    kr, vr = np.repeat(k, N // K, axis=2), np.repeat(v, N // K, axis=2)  # [B,S,N,H]
    want = np.zeros_like(q)
    for b in range(B):
        for n in range(N):
            s = q[b, :, n] @ kr[b, :, n].T / math.sqrt(H)  # [T,S]
            s = np.where(mask[b], s, -np.inf)
            p = np.exp(s - s.max(-1, keepdims=True))
            want[b, :, n] = (p / p.sum(-1, keepdims=True)) @ vr[b, :, n]
    np.testing.assert_allclose(out, want, rtol=1e-12, atol=1e-14)


def test_attention_mask_causal_padding_segments() -> None:
    pad = np.array([[1, 1, 1, 0]])
    seg = np.array([[0, 0, 1, 1]])
    m = A.attention_mask(1, 4, 4, padding=pad, segment_ids=seg)[0]
    want = np.array([[1, 0, 0, 0], [1, 1, 0, 0], [0, 0, 1, 0], [0, 0, 1, 0]], dtype=bool)
    np.testing.assert_array_equal(m, want)
    # decoding: 2 new queries over 5 keys sit at positions 3 and 4
    np.testing.assert_array_equal(A.attention_mask(1, 2, 5)[0], np.tril(np.ones((5, 5)))[3:] > 0)


def test_fully_masked_query_gives_zeros_not_nan(rng: np.random.Generator) -> None:
    q, k, v = (rng.normal(size=(1, 3, 2, 4)) for _ in range(3))
    mask = np.zeros((1, 3, 3), dtype=bool)
    mask[0, 1, 0] = True
    out, _ = A.sdpa_forward(q, k, v, mask)
    assert np.isfinite(out).all()
    np.testing.assert_array_equal(out[0, [0, 2]], 0.0)
    np.testing.assert_allclose(out[0, 1], v[0, 0])


def test_attention_mask_sliding_window() -> None:
    """Query t sees key s when ``0 <= t - s < window`` (transformers' sliding_window_overlay)."""
    m = A.attention_mask(1, 5, 5, window=2)[0]
    want = np.array(
        [[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [0, 1, 1, 0, 0], [0, 0, 1, 1, 0], [0, 0, 0, 1, 1]],
        dtype=bool,
    )
    np.testing.assert_array_equal(m, want)
    # decoding: 2 new queries at positions 4 and 5 over 6 keys, window 3
    np.testing.assert_array_equal(
        A.attention_mask(1, 2, 6, window=3)[0],
        np.array([[0, 0, 1, 1, 1, 0], [0, 0, 0, 1, 1, 1]], dtype=bool),
    )
    np.testing.assert_array_equal(A.attention_mask(2, 5, 5, window=5), A.attention_mask(2, 5, 5))


def test_sdpa_with_window_backward(rng: np.random.Generator) -> None:
    q = rng.normal(size=(B, T, N, H))
    k, v = rng.normal(size=(B, S, K, H)), rng.normal(size=(B, S, K, H))
    mask = A.attention_mask(B, T, S, window=3)
    check_backward(
        lambda q, k, v: A.sdpa_forward(q, k, v, mask), A.sdpa_backward, [q, k, v], [0, 1, 2], rng
    )
    out, _ = A.sdpa_forward(q, k, v, mask)
    full, _ = A.sdpa_forward(q, k, v, A.attention_mask(B, T, S))
    np.testing.assert_allclose(out[:, :3], full[:, :3], rtol=1e-12)  # within the window
    assert np.abs(out[:, 3:] - full[:, 3:]).min() > 0  # beyond it every query changes


def test_rope_with_attention_factor(rng: np.random.Generator) -> None:
    x = rng.normal(size=(B, T, N, H))
    pos = rng.integers(0, 50, size=(B, T))
    inv = P.rope_frequencies(H, 10000.0)

    def fwd(x: np.ndarray) -> tuple[np.ndarray, Any]:
        return P.rope_forward(x, pos, inv, 1.3)

    check_backward(fwd, P.rope_backward, [x], [0], rng)
    np.testing.assert_allclose(fwd(x)[0], 1.3 * P.rope_forward(x, pos, inv)[0], rtol=1e-12)


def test_linear_and_yarn_frequencies() -> None:
    base = P.rope_frequencies(16, 10000.0)
    linear = P.rope_frequencies(16, 10000.0, RopeScaling("linear", 4.0))
    np.testing.assert_allclose(linear, base / 4.0, rtol=1e-15)
    assert P.rope_attention_factor(RopeScaling("linear", 4.0)) == 1.0
    # YaRN by hand: the pair index at which a pair turns r times over the context 512 is
    # 16 ln(512 / (2 pi r)) / (2 ln 10000): 0.81 for r = 32 and 3.82 for r = 1; truncated
    # to [0, 4], the ramp is (i - 0) / (4 - 0), clipped.
    yarn = RopeScaling("yarn", 8.0, 512)
    ramp = np.clip(np.arange(8) / 4.0, 0.0, 1.0)
    want = base / 8.0 * ramp + base * (1.0 - ramp)
    np.testing.assert_allclose(P.rope_frequencies(16, 10000.0, yarn), want, rtol=1e-15)
    assert P.rope_attention_factor(yarn) == pytest.approx(0.1 * math.log(8.0) + 1.0)
    assert P.rope_attention_factor(RopeScaling("yarn", 8.0, 512, attention_factor=0.7)) == 0.7
    # without truncation the ramp runs between the fractional ends 0.81 and 3.82
    lo = 16 * math.log(512 / (2 * math.pi * 32)) / (2 * math.log(10000.0))
    hi = 16 * math.log(512 / (2 * math.pi)) / (2 * math.log(10000.0))
    ramp = np.clip((np.arange(8) - lo) / (hi - lo), 0.0, 1.0)
    np.testing.assert_allclose(
        P.rope_frequencies(16, 10000.0, RopeScaling("yarn", 8.0, 512, truncate=False)),
        base / 8.0 * ramp + base * (1.0 - ramp),
        rtol=1e-14,
    )


def test_rope_scaling_validation_names_the_field() -> None:
    with pytest.raises(ValueError, match=r"RopeScaling.rope_type: expected one of .*'dynamic'"):
        RopeScaling("dynamic", 2.0)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="RopeScaling.original_max_position_embeddings"):
        RopeScaling("yarn", 2.0)
    with pytest.raises(ValueError, match=r"RopeScaling.low_freq_factor: not used by .*'linear'"):
        RopeScaling("linear", 2.0, low_freq_factor=1.0)
    with pytest.raises(ValueError, match=r"RopeScaling.beta_fast: not used by .*'llama3'"):
        RopeScaling("llama3", 8.0, 8, 1.0, 4.0, beta_fast=16.0)
    with pytest.raises(ValueError, match="RopeScaling.factor: expected a positive number"):
        RopeScaling("linear", 0.0)
    with pytest.raises(ValueError, match="RopeScaling.attention_factor: expected a positive"):
        RopeScaling("yarn", 2.0, 8, attention_factor=-1.0)
