"""The engine's jitted KV-cache decoding against the spec's ``ref_numpy.generate``: greedy
tokens identical in float64 for every family, LoRA / QLoRA and merged; one compilation per
shape bucket; eos and stop handling; sampling filters and seeds."""

from __future__ import annotations

import copy
import re
from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax_impl import generate as G
from jax_impl.attention import KVCache, cache_dtype
from jax_impl.model import EngineConfig, Model, from_spec
from ref_numpy import generate as R
from ref_numpy import lora as LR
from ref_numpy.config import LoraConfig, projection_names
from ref_numpy.lora import merge_lora
from ref_numpy.model import model_forward
from ref_numpy.nf4 import NF4Tensor, dequantize_kernel
from tests.helpers import RTOL, rel_err
from tests.test_model import CONFIGS, V, random_params
from tests.test_parity import engine as parity_engine
from tests.test_parity import make_case, round_floats


@pytest.fixture
def x64() -> Iterator[None]:
    with jax.enable_x64(True):
        yield


def engine(params: dict, name: str, lcfg: LoraConfig | None = None, qlora: bool = False) -> Model:
    eng = EngineConfig(param_dtype=jnp.float64, dtype=jnp.float64, quantize=qlora)
    return from_spec(params, CONFIGS[name], lcfg, eng)


@pytest.mark.slow
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


@pytest.mark.slow
@pytest.mark.parametrize(
    ("name", "method"),
    [
        ("llama-gqa-rope3", "lora"),
        ("gpt2", "lora"),
        ("qwen2-tied", "qlora"),
        ("mistral-window-yarn", "lora"),
        ("qwen3-window-linear", "qlora"),
    ],
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


def test_cache_sizes(rng: np.random.Generator) -> None:
    assert G.MAX_PHASES == 2
    assert G.cache_sizes(32, 256) == (128, 256)  # bench/decode.py: 32 + 128 tokens
    assert G.cache_sizes(8, 16) == (16,)  # too small for a loop of its own
    assert G.cache_sizes(128, 512) == (256, 512)  # the first holds two prompt buckets
    assert G.cache_sizes(128, 256) == (256,)  # room for fewer than P steps: one loop
    assert G.cache_sizes(8, 1000) == (500, 1000)  # max_seq_len need not be a power of 2
    cfg = CONFIGS["llama-gqa-rope3"]
    k, v = jnp.asarray(rng.normal(size=(2, 2, 3, cfg.n_kv, cfg.hd)), jnp.float32)  # [B,T,K,H]
    cache = KVCache.zeros(cfg, 2, 16, jnp.float32).write(1, k, v)._replace(length=3)
    grown = cache.grow(40)  # the written slots kept, the new ones zero
    assert grown.size == 40 and int(grown.length) == 3
    for old, new in zip(cache.k + cache.v, grown.k + grown.v, strict=True):
        axis = 2 if new.shape[2] == 40 else 1  # keys [C,H,S], values [C,S,H]
        kept, added = jnp.split(new, [16], axis=axis)
        np.testing.assert_array_equal(kept, old)
        assert not added.any()
    assert np.abs(np.asarray(grown.k[1])).sum() > 0
    with pytest.raises(ValueError, match="size 8 is below the cache's 16"):
        cache.grow(8)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["llama-gqa-rope3", "mistral-window-yarn"])
def test_growing_cache_equals_spec(
    name: str, rng: np.random.Generator, x64: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """100 new tokens after a prompt of 5: the cache starts at 64 slots and grows to 128 at
    the 64th position; the tokens are the spec's. A growth that loses the cached keys and
    values is caught."""
    cfg = CONFIGS[name].replace(max_seq_len=160)
    params = random_params(cfg, rng)
    prompt = rng.integers(0, V, size=(2, 5))
    assert G.cache_sizes(8, 128) == (64, 128)
    model = from_spec(params, cfg, None, EngineConfig(param_dtype=jnp.float64, dtype=jnp.float64))
    want = R.generate(params, cfg, prompt, 100)
    np.testing.assert_array_equal(G.generate(model, prompt, 100), want)

    def forgetful(cache: KVCache, size: int) -> KVCache:  # new buffers, nothing carried over
        if size == cache.size:
            return cache
        return KVCache.zeros(cfg, 2, size, jnp.float64)._replace(length=cache.length)

    monkeypatch.setattr(KVCache, "grow", forgetful)
    G._decode.clear_cache()  # trace again with the faulty growth
    try:
        bad = G.generate(model, prompt, 100)
    finally:
        G._decode.clear_cache()
    np.testing.assert_array_equal(bad[:, :65], want[:, :65])  # the 64-slot loop: same tokens
    assert (bad[:, 65:] != want[:, 65:]).any()


def test_cache_dtype() -> None:
    """A CPU stores the cache of bf16 and fp16 compute in float32; other platforms, and float32
    and float64 compute, store the compute dtype."""
    assert cache_dtype(jnp.bfloat16, "cpu") == jnp.float32
    assert cache_dtype("float16", "cpu") == jnp.float32
    assert cache_dtype(jnp.float32, "cpu") == jnp.float32
    assert cache_dtype(jnp.float64, "cpu") == jnp.float64
    for platform in ("gpu", "tpu"):
        assert cache_dtype(jnp.bfloat16, platform) == jnp.bfloat16
        assert cache_dtype(jnp.float32, platform) == jnp.float32


def compiled_decode(model: Model, prompt: np.ndarray, new: int) -> str:
    """The compiled text of the decode program ``generate`` runs for these arguments."""
    calls: list[tuple[Any, Any]] = []
    decode = G._decode

    def spy(*args: Any, **kwargs: Any) -> Any:
        calls.append((args, kwargs))
        return decode(*args, **kwargs)

    G._decode = spy  # type: ignore[assignment]
    try:
        G.generate(model, prompt, new)
    finally:
        G._decode = decode
    args, kwargs = calls[0]
    return decode.lower(*args, **kwargs).compile().as_text()


@pytest.mark.slow
@pytest.mark.parametrize("name", ["llama-gqa-rope3", "gpt2"])
def test_bfloat16_decoding_on_cpu(name: str) -> None:
    """bf16 compute on a CPU, grouped (Llama) and one kv head per query head (GPT-2).

    A decode step, attending in float32 over the float32 cache, gives the spec's logits to
    the bf16 tolerance; the cache holds the bf16 keys and values exactly. The compiled decode
    program writes the cache in place: a bf16 cache got a ``dynamic_update_slice`` of a
    converted buffer from XLA's CPU backend, the whole buffer widened to float32 and back for
    each layer, buffer and token.
    """
    rng = np.random.default_rng(3)
    params, cfg, _ = make_case(name, "full", rng, spread=0.3)
    params = round_floats(params, jnp.bfloat16)
    model = parity_engine(params, cfg, None, jnp.float32, "full", compute=jnp.bfloat16)
    ids = rng.integers(0, V, size=(2, 9))
    want, _ = model_forward(params, cfg, ids)  # [B,9,V]
    store = cache_dtype(jnp.bfloat16, "cpu")
    _, cache = model(jnp.asarray(ids[:, :8]), cache=KVCache.zeros(cfg, 2, 16, store))
    k = np.asarray(cache.k[0])  # [C,H,S] float32
    assert k.dtype == np.float32 and np.abs(k).max() > 0
    np.testing.assert_array_equal(k, np.asarray(cache.k[0].astype(jnp.bfloat16), np.float32))
    step, _ = model(jnp.asarray(ids[:, 8:]), cache=cache)  # [B,1,V]
    assert rel_err(np.asarray(step[:, 0], np.float64), want[:, -1]) <= RTOL["bfloat16"]

    if jax.default_backend() != "cpu":
        return
    text = compiled_decode(model, ids[:, :8], cfg.max_seq_len - 8)
    updates = re.findall(r"dynamic-update-slice\((%[\w.-]+)", text)  # each one's buffer
    assert len(updates) >= 2 * cfg.n_layers  # keys and values of every layer
    widened = [u for u in updates if u.startswith("%convert")]
    assert not widened, f"cache updates on converted buffers: {widened}"


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


WINDOWED = ["mistral-window-yarn", "qwen3-window-linear"]


@pytest.mark.slow
@pytest.mark.parametrize("name", WINDOWED)
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
    cache = KVCache.zeros(cfg, 2, 16, jnp.float64)
    logits, cache = model(jnp.asarray(ids[:, :4]), cache=cache)  # [B,4,V]
    got = [np.asarray(logits)[:, 3]]
    for t in range(4, 9):
        logits, cache = model(jnp.asarray(ids[:, t : t + 1]), cache=cache)  # [B,1,V]
        got.append(np.asarray(logits)[:, 0])
    assert int(cache.length) == 9
    np.testing.assert_allclose(np.stack(got, axis=1), want[:, 3:], rtol=1e-10, atol=1e-12)
    unwindowed, _ = model_forward(
        params, cfg.replace(sliding_window=None, sliding_layers=None), ids
    )
    assert np.abs(unwindowed[:, 3:] - want[:, 3:]).max() > 1e-3  # the window matters
    np.testing.assert_allclose(unwindowed[:, :3], want[:, :3], rtol=1e-12)  # not before it


@pytest.mark.slow
@pytest.mark.parametrize("method", ["full", "lora", "qlora"])
@pytest.mark.parametrize("name", WINDOWED)
def test_cached_step_equals_full_forward(
    name: str, method: str, rng: np.random.Generator, x64: None
) -> None:
    """Prompt (8) then one token through a KVCache of 16 slots: the step's logits are the
    uncached forward's last ones. Overwriting a cached key outside every window changes
    nothing; one inside a window changes the step."""
    params, cfg, lcfg = make_case(name, method, rng, lora_spread=1.0)
    model = engine(params, name, lcfg, qlora=method == "qlora")
    ids = jnp.asarray(rng.integers(0, V, size=(3, 9)))
    full = np.asarray(model(ids))[:, -1]  # [B,V]
    _, cache = model(ids[:, :8], cache=KVCache.zeros(cfg, 3, 16, jnp.float64))
    assert int(cache.length) == 8

    def step(cache: KVCache) -> np.ndarray:
        logits, _ = model(ids[:, 8:], cache=cache)  # [B,1,V], at position 8
        return np.asarray(logits)[:, 0]

    np.testing.assert_allclose(step(cache), full, rtol=1e-10, atol=1e-12)
    want, _ = model_forward(params, cfg, np.asarray(ids), lora_scale=lcfg.scale if lcfg else 0.0)
    np.testing.assert_allclose(full, want[:, -1], rtol=1e-10, atol=1e-12)  # and the spec's

    def corrupt(layer: int, slot: int) -> KVCache:
        ks = list(cache.k)
        ks[layer] = ks[layer].at[..., slot].add(1.0)  # [C,H,S]
        return cache._replace(k=tuple(ks))

    windowed = [i for i in range(cfg.n_layers) if cfg.layer_window(i) is not None]
    for i in windowed:  # slot 5 is 3 back from position 8: outside a window of 3
        np.testing.assert_allclose(step(corrupt(i, 5)), full, rtol=1e-10, atol=1e-12)
    assert np.abs(step(corrupt(windowed[0], 6)) - full).max() > 1e-6  # inside the window
    if len(windowed) < cfg.n_layers:  # a layer without a window sees every earlier key
        plain = next(i for i in range(cfg.n_layers) if i not in windowed)
        assert np.abs(step(corrupt(plain, 0)) - full).max() > 1e-6


def test_cached_padding_and_positions_equal_spec(rng: np.random.Generator, x64: None) -> None:
    """Left-padded rows with their own positions, decoded through a cache (padding given
    over the cache's slots), give the spec's full forward with the same padding."""
    name = "mistral-window-yarn"
    cfg = CONFIGS[name]
    params = random_params(cfg, rng)
    model = engine(params, name)
    ids = rng.integers(0, V, size=(2, 7))
    pad = np.ones((2, 7), np.int32)
    pad[0, :2] = 0  # row 0: two pads on the left
    positions = np.maximum(np.cumsum(pad, axis=1) - 1, 0)  # [B,T]: row 0 starts at 0 after them
    want, _ = model_forward(params, cfg, ids, positions=positions, attention_mask_2d=pad)
    slots = np.concatenate([pad, np.ones((2, 1), np.int32)], axis=1)  # [B,S=8]
    cache = KVCache.zeros(cfg, 2, 8, jnp.float64)
    kw = dict(attention_mask_2d=jnp.asarray(slots))
    logits, cache = model(
        jnp.asarray(ids[:, :5]), positions=jnp.asarray(positions[:, :5]), cache=cache, **kw
    )
    got = [np.asarray(logits)]
    for t in (5, 6):
        logits, cache = model(
            jnp.asarray(ids[:, t : t + 1]),
            positions=jnp.asarray(positions[:, t : t + 1]),
            cache=cache,
            **kw,
        )
        got.append(np.asarray(logits))
    np.testing.assert_allclose(np.concatenate(got, axis=1), want, rtol=1e-10, atol=1e-12)
    unpadded, _ = model_forward(params, cfg, ids, positions=positions)
    assert np.abs(unpadded[0] - want[0]).max() > 1e-3  # the padding matters
    with pytest.raises(ValueError, match="segment_ids"):
        model(jnp.asarray(ids), segment_ids=jnp.zeros((2, 7), jnp.int32), cache=cache)


@pytest.mark.parametrize(
    ("name", "method"), [("llama-gqa-rope3", "lora"), ("qwen2-tied", "qlora"), ("gpt2", "full")]
)
def test_float32_loop_reads_kernels_transposed(
    name: str, method: str, rng: np.random.Generator, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Under float32 compute the decode loop reads each float32 kernel from an [O, I] copy:
    the stored tree holds every projection's kernel transposed and nothing else changed (NF4
    pieces, adapters, norms), reading it back gives the model's own arrays, the tokens are
    those of the loop reading the [I, O] kernels, and the compiled program holds one copy of
    the head. A copy read back wrongly (its input axis reversed) changes the tokens."""
    assert G.reads_transposed(jnp.float32, "cpu")  # the copy is made on a CPU under float32 only
    assert not any(G.reads_transposed(d, "cpu") for d in (jnp.bfloat16, jnp.float16))
    assert not any(G.reads_transposed(jnp.float32, p) for p in ("gpu", "cuda", "tpu"))
    params, cfg, lcfg = make_case(name, method, rng, lora_spread=1.0)
    model = parity_engine(params, cfg, lcfg, jnp.float32, method)
    tree = {"layers": model.layer_states(), "head": {"kernel": model.head_kernel()}}
    stored = G._kernels_transposed(tree, stored=True)
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    flipped = 0
    for (path, a), b, c in zip(
        flat,
        jax.tree.leaves(stored),
        jax.tree.leaves(G._kernels_transposed(stored, stored=False)),
        strict=True,
    ):
        np.testing.assert_array_equal(np.asarray(c), np.asarray(a))
        if a.ndim == 2 and a.dtype == jnp.float32 and "kernel" in jax.tree_util.keystr(path):
            np.testing.assert_array_equal(np.asarray(b), np.asarray(a).T)
            flipped += 1
        else:
            np.testing.assert_array_equal(np.asarray(b), np.asarray(a))
    float_projections = 0 if method == "qlora" else len(projection_names(cfg))
    assert flipped == cfg.n_layers * float_projections + 1  # and the head
    prompt = rng.integers(0, V, size=(3, 5))
    got = G.generate(model, prompt, 8)
    # The program makes the head's [V, D] copy once (a tied head reads the embedding as it
    # is): XLA made it twice while the prompt's pass read the copy as well as the loops.
    if jax.default_backend() == "cpu":
        text = compiled_decode(model, prompt, 8)
        entry = text[text.index("\nENTRY") :]
        entry = entry[: entry.index("\n}")]
        shape = re.escape(f"f32[{V},{cfg.d_model}]{{1,0}}")
        made = re.findall(rf"^\s*(?:ROOT )?(%\S+) = {shape} (?!parameter)\S+\(", entry, re.M)
        assert len(made) == (0 if cfg.tie_embeddings else 1), made
    transposed = G._kernels_transposed
    monkeypatch.setattr(G, "_kernels_transposed", lambda tree, stored: tree)
    G._decode.clear_cache()
    np.testing.assert_array_equal(G.generate(model, prompt, 8), got)

    def misread(tree: Any, stored: bool) -> Any:  # each kernel's input axis read reversed
        back = transposed(tree, stored)
        return back if stored else jax.tree.map(lambda a, b: b if b is a else b[::-1], tree, back)

    monkeypatch.setattr(G, "_kernels_transposed", misread)
    G._decode.clear_cache()
    assert (G.generate(model, prompt, 8) != got).any()
    G._decode.clear_cache()
