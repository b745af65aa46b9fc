"""The engine (jax_impl) against the spec (ref_numpy): logits, loss and gradients for every
family, in full, LoRA and QLoRA mode, in float64 / float32 / bfloat16, with and without jit."""

from __future__ import annotations

import copy
import zlib
from collections.abc import Callable, Iterator
from typing import Any

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jax_impl.model import EngineConfig, Model, causal_lm_loss, from_spec, module_keys, to_spec
from jax_impl.positional import rope, rope_tables
from ref_numpy import lora as LR
from ref_numpy.config import LoraConfig, ModelConfig
from ref_numpy.model import init_params, loss_and_grads, model_forward
from ref_numpy.nf4 import NF4Tensor, quantize_kernel
from ref_numpy.positional import rope_backward, rope_forward, rope_frequencies
from tests.helpers import BF16_LEAF_RTOL, RTOL, grad_rel_errs, leaves, rel_err
from tests.test_model import CONFIGS, V, batch, random_params

B, T = 3, 7
METHODS = ("full", "lora", "qlora")


@pytest.fixture
def x64() -> Iterator[None]:
    """float64 in JAX for one test (restored afterwards)."""
    with jax.enable_x64(True):
        yield


def targets_for(cfg: ModelConfig) -> tuple[str, ...]:
    return ("c_attn", "c_fc") if cfg.family == "gpt2" else ("q_proj", "v_proj", "down_proj")


def make_case(
    name: str,
    method: str,
    rng: np.random.Generator,
    dropout: float = 0.0,
    spread: float = 0.4,
    lora_spread: float = 0.3,
) -> tuple[dict[str, Any], ModelConfig, LoraConfig | None]:
    """Spec params for a family and method: random base (``spread``), adapters with
    ``B ~ normal(0, lora_spread)``, and NF4 kernels on every projection for QLoRA."""
    cfg = CONFIGS[name]
    params = random_params(cfg, rng, spread)
    if method == "full":
        return params, cfg, None
    lcfg = LoraConfig(rank=3, alpha=6.0, targets=targets_for(cfg), dropout=dropout)
    if method == "qlora":
        for _, p in LR.projections(params):
            p["kernel"] = quantize_kernel(p["kernel"])
    params = LR.add_lora(params, cfg, lcfg)
    for _, p in LR.projections(params):
        if "lora_B" in p:
            p["lora_B"] += rng.normal(0.0, lora_spread, size=p["lora_B"].shape)
    return params, cfg, lcfg


def round_floats(params: dict, dtype: Any) -> dict:
    """The params rounded to ``dtype`` and back to float64 (NF4 tensors untouched)."""
    return jax.tree.map(
        lambda a: (
            a
            if isinstance(a, NF4Tensor)
            else np.asarray(
                jnp.asarray(a, jnp.float32).astype(dtype).astype(jnp.float32), np.float64
            )
        ),
        params,
        is_leaf=lambda a: isinstance(a, NF4Tensor),
    )


def engine(
    params: dict,
    cfg: ModelConfig,
    lcfg: LoraConfig | None,
    dtype: Any,
    method: str,
    compute: Any = None,
) -> Model:
    eng = EngineConfig(param_dtype=dtype, dtype=compute or dtype, quantize=method == "qlora")
    return from_spec(params, cfg, lcfg, eng)


def loss_fn(graphdef: Any, params: Any, rest: Any, data: dict, key: Any) -> jax.Array:
    model = nnx.merge(graphdef, params, rest)
    logits = model(data["ids"], attention_mask_2d=data["attention_mask_2d"], dropout_key=key)
    return causal_lm_loss(logits, data["labels"])


def engine_loss_and_grads(
    model: Model, data: dict, key: Any, wrap: Callable[[Callable], Callable]
) -> tuple[float, dict[str, np.ndarray]]:
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    fn = wrap(jax.value_and_grad(lambda p, r, d, k: loss_fn(graphdef, p, r, d, k)))
    loss, grads = fn(params, rest, {k: jnp.asarray(v) for k, v in data.items()}, key)
    flat = {}
    for path, var in nnx.to_flat_state(grads):
        value = np.asarray(var.get_value(), dtype=np.float64)
        if path[0] == "layers":
            for i, row in enumerate(value):
                flat[".".join(map(str, ("layers", i, *path[1:])))] = row
        else:
            flat[".".join(map(str, path))] = value
    return float(loss), flat


def spec_masks(
    key: Any, params: dict, cfg: ModelConfig, rate: float, shape: tuple[int, int] = (B, T)
) -> dict[str, np.ndarray]:
    """The spec's adapter dropout masks (``ref_numpy.lora.dropout_mask``) for the inputs the
    engine keeps under ``key``: the draw is JAX's Bernoulli(1 - rate) on each projection's key,
    the mask values are the spec's, so an engine that scales its mask wrongly is caught."""
    layer_keys = jax.random.split(key, cfg.n_layers)
    masks = {}
    for path, p in LR.projections(params):
        if "lora_A" in p:
            _, i, group, name = path.split(".")
            k = module_keys(layer_keys[int(i)])[group][name]
            d_in = p["lora_A"].shape[0]
            keep = np.asarray(jax.random.bernoulli(k, 1.0 - rate, (*shape, d_in)))  # [B,T,I]
            masks[path] = LR.dropout_mask(keep, rate)  # [B,T,I]
    return masks


WRAPS = {"jit": jax.jit, "no-jit": lambda f: f}


@pytest.mark.slow
@pytest.mark.parametrize("wrap", list(WRAPS))
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("name", list(CONFIGS))
def test_float64(name: str, method: str, wrap: str, x64: None) -> None:
    """1e-10 relative on logits, loss and every gradient, jitted and not."""
    rng = np.random.default_rng(zlib.crc32(f"{name}/{method}".encode()))
    rate = 0.0 if method == "full" else 0.3
    params, cfg, lcfg = make_case(name, method, rng, dropout=rate)
    data = batch(rng)
    key = None if lcfg is None else jax.random.key(7)
    masks = None if key is None else spec_masks(key, params, cfg, rate)
    scale = 0.0 if lcfg is None else lcfg.scale
    fwd = dict(attention_mask_2d=data["attention_mask_2d"], lora_scale=scale, dropout=masks)
    ref_logits, _ = model_forward(params, cfg, data["ids"], **fwd)
    ref_loss, ref_grads = loss_and_grads(params, cfg, data["ids"], data["labels"], **fwd)

    model = engine(params, cfg, lcfg, jnp.float64, method)
    graphdef = nnx.graphdef(model)

    def forward(state: Any, ids: jax.Array, pad: jax.Array, key: Any) -> jax.Array:
        return nnx.merge(graphdef, state)(ids, attention_mask_2d=pad, dropout_key=key)

    ids, pad = jnp.asarray(data["ids"]), jnp.asarray(data["attention_mask_2d"])
    logits = WRAPS[wrap](forward)(nnx.state(model), ids, pad, key)
    chex.assert_shape(logits, ref_logits.shape)
    chex.assert_type(logits, jnp.float64)
    assert rel_err(np.asarray(logits), ref_logits) <= RTOL["float64"]
    loss, grads = engine_loss_and_grads(model, data, key, WRAPS[wrap])
    assert abs(loss - ref_loss) <= RTOL["float64"] * abs(ref_loss)
    for path, err in grad_rel_errs(grads, dict(leaves(ref_grads))).items():
        assert err <= RTOL["float64"], f"{path}: {err:.2e}"


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("name", list(CONFIGS))
def test_float32(name: str, method: str) -> None:
    """float32 engine vs the float64 spec on the same (float32-representable) params, with
    adapter dropout on (the spec's masks, see ``spec_masks``)."""
    rng = np.random.default_rng(5)
    rate = 0.0 if method == "full" else 0.2
    params, cfg, lcfg = make_case(name, method, rng, dropout=rate)
    params = round_floats(params, np.float32)
    data = batch(rng)
    key = None if lcfg is None else jax.random.key(11)
    masks = None if key is None else spec_masks(key, params, cfg, rate)
    scale = 0.0 if lcfg is None else lcfg.scale
    fwd = dict(attention_mask_2d=data["attention_mask_2d"], lora_scale=scale, dropout=masks)
    ref_loss, ref_grads = loss_and_grads(params, cfg, data["ids"], data["labels"], **fwd)
    model = engine(params, cfg, lcfg, jnp.float32, method)
    loss, grads = engine_loss_and_grads(model, data, key, jax.jit)
    assert abs(loss - ref_loss) <= RTOL["float32"] * abs(ref_loss)
    for path, err in grad_rel_errs(grads, dict(leaves(ref_grads))).items():
        assert err <= RTOL["float32"], f"{path}: {err:.2e}"


@pytest.mark.slow
@pytest.mark.parametrize("rows", [3, 2])
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("name", ["gpt2", "llama-gqa-rope3"])
def test_bfloat16_compute(name: str, method: str, rows: int) -> None:
    """bf16 matmuls (float32 params, norms, softmax, loss): 2e-2 relative norm error.

    ``rows`` of the batch: 3 x 7 tokens, or 2 x 7, an even count, with which the weight
    gradients take their CPU form (``token_sum_product``).

    The spec runs on the bf16-rounded weights, so what is measured is the error of bf16
    compute, not that of storing weights in bf16. The weights have the 1/sqrt(fan_in) scale
    of a trained model and the adapters a tenth of it: the sharper random models of the
    float64 tests amplify each bf16 rounding through the backward pass to a few percent in
    the first layer's gradients.
    """
    rng = np.random.default_rng(6)
    params, cfg, lcfg = make_case(name, method, rng, spread=0.3, lora_spread=0.03)
    params = round_floats(params, jnp.bfloat16)
    data = {k: v[:rows] for k, v in batch(rng).items()}
    scale = 0.0 if lcfg is None else lcfg.scale
    ref, _ = model_forward(params, cfg, data["ids"], lora_scale=scale)
    ref_loss, ref_grads = loss_and_grads(params, cfg, data["ids"], data["labels"], lora_scale=scale)
    model = engine(params, cfg, lcfg, jnp.float32, method, compute=jnp.bfloat16)
    logits = model(jnp.asarray(data["ids"]))
    assert logits.dtype == jnp.float32
    assert rel_err(np.asarray(logits.astype(jnp.float32)), ref) <= RTOL["bfloat16"]
    loss, grads = engine_loss_and_grads(model, data, None, jax.jit)
    assert abs(loss - ref_loss) <= RTOL["bfloat16"] * abs(ref_loss)
    want = dict(leaves(ref_grads))
    assert set(grads) == set(want)
    # Leaf by leaf, each against its own norm, so a wrong small leaf cannot hide in the whole
    # gradient; and the whole gradient as one vector at the bf16 tolerance.
    errs = {path: rel_err(grads[path], w) for path, w in want.items()}
    assert max(errs.values()) <= BF16_LEAF_RTOL, errs
    got_vec = np.concatenate([grads[p].ravel() for p in sorted(want)])
    want_vec = np.concatenate([want[p].ravel() for p in sorted(want)])
    assert rel_err(got_vec, want_vec) <= RTOL["bfloat16"]


def test_perturbations_are_caught(x64: None) -> None:
    """A perturbed weight, or a swapped mask, makes the parity check fail."""
    rng = np.random.default_rng(8)
    params, cfg, lcfg = make_case("llama-gqa-rope3", "lora", rng)
    data = batch(rng)
    fwd = dict(attention_mask_2d=data["attention_mask_2d"], lora_scale=lcfg.scale)
    ref, _ = model_forward(params, cfg, data["ids"], **fwd)
    ids, pad = jnp.asarray(data["ids"]), jnp.asarray(data["attention_mask_2d"])
    eng64 = EngineConfig(param_dtype=jnp.float64, dtype=jnp.float64)
    good = from_spec(params, cfg, lcfg, eng64)(ids, attention_mask_2d=pad)
    assert rel_err(np.asarray(good), ref) <= RTOL["float64"]
    bumped = copy.deepcopy(params)
    bumped["layers"][1]["mlp"]["up_proj"]["kernel"][2, 3] += 1e-6
    bad = from_spec(bumped, cfg, lcfg, eng64)(ids, attention_mask_2d=pad)
    assert rel_err(np.asarray(bad), ref) > RTOL["float64"]
    swapped = from_spec(params, cfg, lcfg, eng64)(ids, attention_mask_2d=pad[::-1])
    assert rel_err(np.asarray(swapped), ref) > RTOL["float64"]


def test_rope_vjp_is_the_spec_backward(x64: None) -> None:
    """The engine's hand-written RoPE backward equals the spec's ``rope_backward`` (YaRN's
    attention factor included); a backward that rotates the wrong way is caught."""
    rng = np.random.default_rng(14)
    b, t, n, h = 2, 5, 3, 8
    x, g = rng.normal(size=(2, b, t, n, h))
    positions = rng.integers(0, 40, size=(b, t))
    inv = rope_frequencies(h, 10000.0)
    want, cache = rope_forward(x, positions, inv, 1.3)
    tables = rope_tables(jnp.asarray(positions), inv, 1.3, jnp.float64)
    got, vjp = jax.vjp(lambda v: rope(v, tables), jnp.asarray(x))
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-12, atol=1e-12)
    (dx,) = vjp(jnp.asarray(g))
    np.testing.assert_allclose(np.asarray(dx), rope_backward(g, cache), rtol=1e-12, atol=1e-12)
    cos, sin = cache
    forward_again = g * cos + np.concatenate([-g[..., h // 2 :], g[..., : h // 2]], -1) * sin
    assert rel_err(forward_again, rope_backward(g, cache)) > 0.1


@pytest.mark.slow
@pytest.mark.parametrize("method", METHODS)
def test_only_adapters_get_gradients(method: str) -> None:
    rng = np.random.default_rng(9)
    params, cfg, lcfg = make_case("qwen2-tied", method, rng)
    model = engine(params, cfg, lcfg, jnp.float32, method)
    _, grads = engine_loss_and_grads(model, batch(rng), None, jax.jit)
    names = {path.rsplit(".", 1)[-1] for path in grads}
    if method == "full":
        assert "kernel" in names and "embedding" in names
    else:
        assert names == {"lora_A", "lora_B"}, names
        assert len(grads) == 2 * cfg.n_layers * len(targets_for(cfg))


def test_one_compile_per_shape() -> None:
    cfg = CONFIGS["llama-gqa-rope3"]
    params, cfg, lcfg = make_case("llama-gqa-rope3", "lora", np.random.default_rng(1))
    model = engine(params, cfg, lcfg, jnp.float32, "lora")
    graphdef, trainable, rest = nnx.split(model, nnx.Param, ...)

    @jax.jit
    @chex.assert_max_traces(n=1)
    def forward(rest: Any, ids: jax.Array) -> jax.Array:
        return nnx.merge(graphdef, trainable, rest)(ids)

    @jax.jit
    @chex.assert_max_traces(n=1)
    def grad(p: Any, ids: jax.Array) -> Any:
        return jax.grad(lambda p: causal_lm_loss(nnx.merge(graphdef, p, rest)(ids), ids))(p)

    for seed in range(3):
        ids = jnp.asarray(np.random.default_rng(seed).integers(0, V, size=(B, T)))
        forward(rest, ids)
        grad(trainable, ids)
    with pytest.raises(AssertionError, match="traced > 1 times"):
        forward(rest, jnp.zeros((B, T + 1), jnp.int32))  # a new shape is a new trace
    chex.clear_trace_counter()


def test_spec_state_round_trip() -> None:
    """spec -> engine -> spec is the identity, NF4 tensors and adapters included."""
    rng = np.random.default_rng(10)
    for method in METHODS:
        params, cfg, lcfg = make_case("gpt2", method, rng)
        back = to_spec(engine(params, cfg, lcfg, jnp.float32, method))
        got, want = dict(leaves(back)), dict(leaves(params))
        assert set(got) == set(want)
        for path, w in want.items():
            if isinstance(w, NF4Tensor):
                for field in ("packed", "absmax", "nested_absmax", "nested_code", "offset"):
                    np.testing.assert_array_equal(getattr(got[path], field), getattr(w, field))
            else:
                np.testing.assert_array_equal(got[path], w.astype(np.float32))


def test_from_spec_names_a_wrong_shape() -> None:
    cfg = CONFIGS["gpt2"]
    params = init_params(cfg, np.random.default_rng(0))
    params["layers"][0]["mlp"]["c_fc"]["kernel"] = np.zeros((10, 15))
    with pytest.raises(
        ValueError, match=r"layers.0.mlp.c_fc.kernel: expected shape \[10, 14\], got \[10, 15\]"
    ):
        from_spec(params, cfg)
