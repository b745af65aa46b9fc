"""Decoding with a KV cache equals decoding without one; sampling filters do what they say."""

from __future__ import annotations

import numpy as np
import pytest

from ref_numpy.generate import forward_cached, generate, sample_token
from ref_numpy.model import model_forward
from tests.test_model import CONFIGS, V, random_params


@pytest.mark.parametrize("name", list(CONFIGS))
def test_cached_logits_equal_full_forward(name: str, rng: np.random.Generator) -> None:
    cfg = CONFIGS[name]
    params = random_params(cfg, rng)
    ids = rng.integers(0, V, size=(2, 9))
    full, _ = model_forward(params, cfg, ids)
    logits, past = forward_cached(params, cfg, ids[:, :5])
    steps = [logits]
    for t in range(5, 9):
        logits, past = forward_cached(params, cfg, ids[:, t : t + 1], past)
        steps.append(logits)
    np.testing.assert_allclose(np.concatenate(steps, axis=1), full, rtol=1e-12, atol=1e-12)
    assert past[0][0].shape == (2, 9, cfg.n_kv, cfg.hd)


def test_greedy_equals_argmax_loop_without_cache(rng: np.random.Generator) -> None:
    cfg = CONFIGS["llama-gqa-rope3"]
    params = random_params(cfg, rng)
    prompt = rng.integers(0, V, size=(2, 3))
    out = generate(params, cfg, prompt, 6)
    seq = prompt
    for _ in range(6):
        logits, _ = model_forward(params, cfg, seq)
        seq = np.concatenate([seq, logits[:, -1].argmax(-1)[:, None]], axis=1)
    np.testing.assert_array_equal(out, seq)


def test_eos_stops_and_pads_rows(rng: np.random.Generator) -> None:
    cfg = CONFIGS["gpt2"]
    params = random_params(cfg, rng)
    prompt = rng.integers(0, V, size=(1, 3))
    free = generate(params, cfg, prompt, 6)
    eos = int(free[0, 4])  # the second generated token
    out = generate(params, cfg, prompt, 6, eos_id=eos)
    first = 3 + list(free[0, 3:]).index(eos)
    np.testing.assert_array_equal(out[0], free[0, : first + 1])


def test_sampling_filters(rng: np.random.Generator) -> None:
    logits = np.log(np.array([[0.5, 0.3, 0.15, 0.05]]))
    draws = [int(sample_token(logits, rng, 1.0, top_k=2)[0]) for _ in range(300)]
    assert set(draws) == {0, 1}
    draws = [int(sample_token(logits, rng, 1.0, top_p=0.7)[0]) for _ in range(300)]
    assert set(draws) == {0, 1}  # 0.5 < 0.7 so token 1 is needed; 0.8 >= 0.7 so not token 2
    draws = [int(sample_token(logits, rng, 1.0, top_p=0.5)[0]) for _ in range(50)]
    assert set(draws) == {0}
    counts = np.bincount([int(sample_token(logits, rng, 1.0)[0]) for _ in range(4000)], None, 4)
    np.testing.assert_allclose(counts / 4000, [0.5, 0.3, 0.15, 0.05], atol=0.03)
    assert sample_token(logits, None, 0.0)[0] == 0
    with pytest.raises(ValueError, match="rng"):
        sample_token(logits, None, 1.0)
    with pytest.raises(ValueError, match="top_p"):
        sample_token(logits, rng, 1.0, top_p=0.0)


def test_sampled_generation_is_reproducible(rng: np.random.Generator) -> None:
    cfg = CONFIGS["classic-pre-gelu"]
    params = random_params(cfg, rng)
    prompt = rng.integers(0, V, size=(2, 2))
    a = generate(params, cfg, prompt, 5, temperature=0.8, rng=np.random.default_rng(3))
    b = generate(params, cfg, prompt, 5, temperature=0.8, rng=np.random.default_rng(3))
    np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match="exceeds max_seq_len=16"):
        generate(params, cfg, prompt, 20)
