"""The engine's jitted KV-cache decoding against the spec's ``ref_numpy.generate``: greedy
tokens identical in float64 for every family, LoRA / QLoRA and merged; one compilation per
shape bucket; eos and stop handling; sampling filters and seeds."""

from __future__ import annotations

import copy
import functools
from collections.abc import Iterator

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax_impl import generate as G
from jax_impl.model import EngineConfig, Model, from_spec
from ref_numpy import generate as R
from ref_numpy import lora as LR
from ref_numpy.config import LoraConfig
from ref_numpy.lora import merge_lora
from ref_numpy.model import model_forward
from ref_numpy.nf4 import NF4Tensor, dequantize_kernel
from tests.test_model import CONFIGS, V, random_params
from tests.test_parity import make_case


@pytest.fixture
def x64() -> Iterator[None]:
    with jax.enable_x64(True):
        yield


def engine(params: dict, name: str, lcfg: LoraConfig | None = None, qlora: bool = False) -> Model:
    eng = EngineConfig(param_dtype=jnp.float64, dtype=jnp.float64, quantize=qlora)
    return from_spec(params, CONFIGS[name], lcfg, eng)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_greedy_equals_spec(name: str, rng: np.random.Generator, x64: None) -> None:
    cfg = CONFIGS[name]
    params = random_params(cfg, rng)
    prompt = rng.integers(0, V, size=(3, 5))  # T0 = 5: padded to a prompt bucket of 8
    got = G.generate(engine(params, name), prompt, 8)
    want = R.generate(params, cfg, prompt, 8)
    assert got.shape == (3, 13)
    np.testing.assert_array_equal(got, want)
    assert len(np.unique(got[:, 5:])) > 1  # not a degenerate constant continuation


@pytest.mark.parametrize(
    ("name", "method"),
    [("llama-gqa-rope3", "lora"), ("gpt2", "lora"), ("qwen2-tied", "qlora")],
)
def test_lora_greedy_equals_spec_and_merged(
    name: str, method: str, rng: np.random.Generator, x64: None
) -> None:
    params, cfg, lcfg = make_case(name, method, rng, lora_spread=1.0)
    assert lcfg is not None
    prompt = rng.integers(0, V, size=(3, 5))  # the shapes above: the merged model reuses them
    got = G.generate(engine(params, name, lcfg, qlora=method == "qlora"), prompt, 8)
    want = R.generate(params, cfg, prompt, 8, lora_scale=lcfg.scale)
    np.testing.assert_array_equal(got, want)
    merged = merge_lora(copy.deepcopy(params), lcfg.scale)
    for _, p in LR.projections(merged):  # QLoRA: the kernels without an adapter are NF4 too
        if isinstance(p["kernel"], NF4Tensor):
            p["kernel"] = dequantize_kernel(p["kernel"])
    np.testing.assert_array_equal(G.generate(engine(merged, name), prompt, 8), got)
    base = copy.deepcopy(params)  # the adapters must matter: with B = 0 the tokens differ
    for _, p in LR.projections(base):
        if "lora_B" in p:
            p["lora_B"] = np.zeros_like(p["lora_B"])
    plain = G.generate(engine(base, name, lcfg, qlora=method == "qlora"), prompt, 8)
    assert (plain != got).any()


def test_compiles_once_per_bucket(rng: np.random.Generator) -> None:
    cfg = CONFIGS["llama-gqa-rope3"]
    model = from_spec(random_params(cfg, rng), cfg)
    prompt = rng.integers(0, V, size=(2, 6))
    G.TRACES.clear()
    five = G.generate(model, prompt, 5)  # 10 positions: cache bucket 16, prompt bucket 8
    nine = G.generate(model, prompt, 9)  # 14 positions: the same buckets
    assert G.TRACES == {(2, 8, 16): 1}
    np.testing.assert_array_equal(nine[:, :11], five)
    G.generate(model, prompt[:, :5], 7, eos_id=3)  # T0 = 5 and an eos id: still traced
    other = from_spec(random_params(cfg, rng), cfg)  # other weights, same structure
    G.generate(other, prompt, 4)
    assert G.TRACES == {(2, 8, 16): 1}
    G.generate(model, prompt[:, :3], 4)  # prompt bucket 4, cache bucket 8: a new program
    assert G.TRACES == {(2, 8, 16): 1, (2, 4, 8): 1}


def test_generate_many_equals_one_by_one(rng: np.random.Generator, x64: None) -> None:
    name = "llama-gqa-rope3"
    cfg = CONFIGS[name]
    params = random_params(cfg, rng)
    model = engine(params, name)
    prompts = [[int(t) for t in rng.integers(0, V, size=n)] for n in (5, 3, 5, 7, 5, 3)]
    free = [R.generate(params, cfg, np.asarray([p]), 6)[0, len(p) :] for p in prompts]
    eos = int(free[0][2])  # prompt 0 stops at its third token
    G.TRACES.clear()
    got = G.generate_many(model, prompts, 6, batch_size=2, eos_id=eos)
    for p, g in zip(prompts, got, strict=True):
        want = R.generate(params, cfg, np.asarray([p]), 6, eos_id=eos)[0, len(p) :].tolist()
        assert g == (want[: want.index(eos)] if eos in want else want)
    assert len(got[0]) <= 2  # stopped at the eos, which is not returned
    assert set(G.TRACES) <= {(2, 4, 8), (2, 8, 16)}  # the group of three: 2 + 1 padded rows
    with pytest.raises(ValueError, match="batch_size"):
        G.generate_many(model, prompts, 6, batch_size=0)


def test_eos_equals_spec(rng: np.random.Generator, x64: None) -> None:
    name = "gpt2"
    cfg = CONFIGS[name]
    params = random_params(cfg, rng)
    model = engine(params, name)
    prompt = rng.integers(0, V, size=(3, 5))
    free = R.generate(params, cfg, prompt, 8)
    eos = int(free[0, 6])  # row 0's second token: row 0 stops, the others may run on
    got = G.generate(model, prompt, 8, eos_id=eos)
    np.testing.assert_array_equal(got, R.generate(params, cfg, prompt, 8, eos_id=eos))
    first = 5 + list(free[0, 5:]).index(eos)
    assert (got[0, first:] == eos).all()
    # every row done: generation stops early, fewer than 8 tokens come back
    rows = np.repeat(prompt[:1], 3, axis=0)
    short = G.generate(model, rows, 8, eos_id=eos)
    np.testing.assert_array_equal(short, np.repeat(free[:1, : first + 1], 3, axis=0))
    assert short.shape[1] < 13


def stopped(free: np.ndarray, t0: int, stops: list[list[int]]) -> np.ndarray:
    """The documented stop semantics in plain Python, for one row: cut after the first
    generated token at which the generated tokens end with a stop sequence."""
    gen = list(free[0, t0:])
    for n in range(1, len(gen) + 1):
        if any(len(s) <= n and gen[n - len(s) : n] == s for s in stops):
            return free[:, : t0 + n]
    return free


def test_stop_sequences(rng: np.random.Generator) -> None:
    cfg = CONFIGS["qwen2-tied"]
    model = from_spec(random_params(cfg, rng), cfg)
    prompt = rng.integers(0, V, size=(1, 4))
    free = G.generate(model, prompt, 8)
    seq = [int(t) for t in free[0, 6:8]]  # generated tokens 3 and 4
    stops = [[V + 5, V + 6, V + 7], seq]
    got = G.generate(model, prompt, 8, stop=stops)
    np.testing.assert_array_equal(got, stopped(free, 4, stops))
    assert got.shape[1] <= 8
    # the prompt's tail (and a sequence spanning prompt and output) does not count
    spans = [[int(t) for t in prompt[0, -2:]], [int(prompt[0, -1]), int(free[0, 4])]]
    got = G.generate(model, prompt, 8, stop=spans)
    np.testing.assert_array_equal(got, stopped(free, 4, spans))


def test_sample_token_filters() -> None:
    logits = jnp.log(jnp.tile(jnp.array([[0.5, 0.3, 0.15, 0.05]]), (400, 1)))
    sample = jax.jit(G.sample_token, static_argnames=("greedy", "use_top_k", "use_top_p"))

    def draws(top_k: int, top_p: float) -> set[int]:
        toks = sample(
            logits,
            jax.random.key(1),
            jnp.asarray(1.0),
            jnp.asarray(top_k),
            jnp.asarray(top_p),
            greedy=False,
            use_top_k=True,
            use_top_p=True,
        )
        return {int(t) for t in toks}

    assert draws(2, 1.0) == {0, 1}
    assert draws(4, 0.7) == {0, 1}  # 0.5 < 0.7 needs token 1; 0.8 >= 0.7 stops
    assert draws(4, 0.5) == {0}
    assert draws(3, 0.9) == {0, 1, 2}
    assert draws(4, 1.0) == {0, 1, 2, 3}


def test_sampling_reproducible_and_top_k1_is_greedy(rng: np.random.Generator) -> None:
    cfg = CONFIGS["classic-post-relu"]
    model = from_spec(random_params(cfg, rng, spread=0.2), cfg)
    prompt = rng.integers(0, V, size=(2, 2))  # the shapes of test_errors_and_edges
    kw = dict(temperature=1.5, top_k=V, top_p=0.95)
    a = G.generate(model, prompt, 15, seed=3, **kw)
    np.testing.assert_array_equal(a, G.generate(model, prompt, 15, seed=3, **kw))
    assert any((G.generate(model, prompt, 15, seed=s, **kw) != a).any() for s in (4, 5, 6))
    greedy = G.generate(model, prompt, 15)
    one = G.generate(model, prompt, 15, temperature=0.7, top_k=1, top_p=0.95)
    np.testing.assert_array_equal(one, greedy)


def test_errors_and_edges(rng: np.random.Generator) -> None:
    cfg = CONFIGS["classic-post-relu"]
    model = from_spec(random_params(cfg, rng), cfg)
    prompt = rng.integers(0, V, size=(2, 2))
    with pytest.raises(ValueError, match="exceeds max_seq_len=16"):
        G.generate(model, prompt, 20)
    with pytest.raises(ValueError, match="temperature"):
        G.generate(model, prompt, 2, temperature=-1.0)
    with pytest.raises(ValueError, match="top_p"):
        G.generate(model, prompt, 2, temperature=1.0, top_p=0.0)
    with pytest.raises(ValueError, match="prompt"):
        G.generate(model, prompt[0], 2)
    np.testing.assert_array_equal(G.generate(model, prompt, 0), prompt)
    assert G.generate(model, prompt, 15).shape == (2, 17)  # the spec's longest: T0 + n - 1 = 16


@pytest.mark.parametrize("name", ["mistral-window-yarn", "qwen3-window-linear"])
def test_sliding_window_holds_in_cached_decoding(
    name: str, rng: np.random.Generator, x64: None
) -> None:
    """Past the window (3 < 9 positions), each cached decode step of the engine gives the
    spec's full-forward logits; the same model without its window gives other logits."""
    cfg = CONFIGS[name]
    params = random_params(cfg, rng)
    ids = rng.integers(0, V, size=(2, 9))
    want, _ = model_forward(params, cfg, ids)  # [B,T,V]
    model = engine(params, name)
    shape = (cfg.n_layers, 2, 16, cfg.n_kv, cfg.hd)
    cache = (jnp.zeros(shape, jnp.float64), jnp.zeros(shape, jnp.float64))
    i32 = functools.partial(jnp.asarray, dtype=jnp.int32)
    logits, cache = G.forward_cached(model, jnp.asarray(ids[:, :4]), i32(0), cache, i32(3))
    got = [np.asarray(logits)]
    for t in range(4, 9):
        logits, cache = G.forward_cached(
            model, jnp.asarray(ids[:, t : t + 1]), i32(t), cache, i32(0)
        )
        got.append(np.asarray(logits))
    np.testing.assert_allclose(np.stack(got, axis=1), want[:, 3:], rtol=1e-10, atol=1e-12)
    unwindowed, _ = model_forward(
        params, cfg.replace(sliding_window=None, sliding_layers=None), ids
    )
    assert np.abs(unwindowed[:, 3:] - want[:, 3:]).max() > 1e-3  # the window matters
    np.testing.assert_allclose(unwindowed[:, :3], want[:, :3], rtol=1e-12)  # not before it
