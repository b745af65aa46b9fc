"""Engine options held to the spec: attention paths and how "auto" picks one, compute and
storage dtypes, packed masks, remat policies, optimizer offload, and the logical axis names
every variable carries."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jax_impl.attention import attention_mask, sdpa
from jax_impl.layers import linear, token_sum_product
from jax_impl.lora import adapter
from jax_impl.model import (
    CPU_BF16_ENV,
    REMAT_POLICIES,
    EngineConfig,
    Model,
    bf16_widened,
    cpu_bf16_units,
    from_spec,
    lora_targets,
)
from jax_impl.train.trainer import (
    OptimConfig,
    Trainer,
    check_host_offload,
    fit,
)
from ref_numpy.attention import attention_mask as spec_attention_mask
from ref_numpy.attention import sdpa_backward, sdpa_forward
from ref_numpy.config import LoraConfig, ModelConfig, llama_config
from ref_numpy.lora import dense_backward as spec_dense_backward
from ref_numpy.lora import dense_forward as spec_dense_forward
from ref_numpy.model import model_forward
from tests.helpers import RTOL, rel_err
from tests.test_memory import saved_float_residuals
from tests.test_model import CONFIGS, V, random_params
from tests.test_parity import engine_loss_and_grads, loss_fn, make_case

B, T = 3, 7


def packed_inputs(rng: np.random.Generator) -> dict[str, np.ndarray]:
    ids = rng.integers(0, V, size=(B, T))
    seg = np.array([[0, 0, 0, 1, 1, 1, 1], [0, 0, 0, 0, 0, 0, 0], [0, 1, 1, 2, 2, 2, 3]])
    pos = np.array([[0, 1, 2, 0, 1, 2, 3], list(range(7)), [0, 0, 1, 0, 1, 2, 0]])
    pad = np.ones((B, T), dtype=int)
    pad[1, 5:] = 0
    pad[2, 6] = 0  # the last segment of row 2 is padding: its query sees nothing
    return {"ids": ids, "segment_ids": seg, "positions": pos, "attention_mask_2d": pad}


def test_einsum_attention_backward_is_the_specs() -> None:
    """The einsum path's written-out backward (head-major ``_sdpa_heads``) gives the spec's
    ``sdpa_backward``: grouped heads, a packed and padded mask and a query that sees no key
    (zero output, zero gradient). A cotangent through another mask is caught."""
    rng = np.random.default_rng(4)
    b, t, n, kv, h = 3, 7, 4, 2, 8
    q = rng.normal(size=(b, t, n, h)).astype(np.float32)  # [B,T,N,H]
    k, v = (rng.normal(size=(b, t, kv, h)).astype(np.float32) for _ in range(2))  # [B,S,K,H]
    dout = rng.normal(size=(b, t, n, h)).astype(np.float32)  # [B,T,N,H]
    data = packed_inputs(rng)
    mask = spec_attention_mask(
        b, t, t, padding=data["attention_mask_2d"], segment_ids=data["segment_ids"]
    )  # [B,T,S]
    assert not mask[2, 6].any()  # row 2's last query sees nothing
    out_ref, cache = sdpa_forward(q, k, v, mask)
    want = sdpa_backward(dout, cache)  # dq, dk, dv

    def grads(m: np.ndarray) -> tuple[jax.Array, tuple[jax.Array, ...]]:
        out, vjp = jax.vjp(lambda q, k, v: sdpa(q, k, v, jnp.asarray(m), "einsum"), q, k, v)
        return out, vjp(jnp.asarray(dout))

    out, got = grads(mask)
    assert rel_err(np.asarray(out), out_ref) <= RTOL["float32"]
    for name, g, w in zip(("dq", "dk", "dv"), got, want, strict=True):
        assert rel_err(np.asarray(g), w) <= RTOL["float32"], name
    assert not np.asarray(out)[2, 6].any() and not np.asarray(got[0])[2, 6].any()
    causal = spec_attention_mask(b, t, t)  # [B,T,S]: forgets the packing and padding
    _, other = grads(causal)
    assert rel_err(np.asarray(other[1]), want[1]) > 100 * RTOL["float32"]


def test_einsum_attention_products_take_the_compute_dtype() -> None:
    """Each of attention's six products, forward and backward, takes operands in the compute
    dtype and sums in float32: under bf16 the probabilities and the score gradients are
    rounded for their products, the backward keeps the rounded probabilities, and the results
    are the spec's to bf16 accuracy."""
    rng = np.random.default_rng(6)
    b, t, n, kv, h = 2, 16, 4, 2, 8
    q = rng.normal(size=(b, t, n, h))  # [B,T,N,H]
    k, v = (rng.normal(size=(b, t, kv, h)) for _ in range(2))  # [B,S,K,H]
    dout = rng.normal(size=(b, t, n, h))  # [B,T,N,H]
    mask = spec_attention_mask(b, t, t)  # [B,T,S]
    out_ref, cache = sdpa_forward(q, k, v, mask)
    want = (out_ref, *sdpa_backward(dout, cache))  # out, dq, dk, dv

    def out_and_grads(q: jax.Array, k: jax.Array, v: jax.Array, d: jax.Array) -> Any:
        out, vjp = jax.vjp(lambda q, k, v: sdpa(q, k, v, jnp.asarray(mask), "einsum"), q, k, v)
        return (out, *vjp(d))

    for dtype in (jnp.float32, jnp.bfloat16):
        args = [jnp.asarray(a, dtype) for a in (q, k, v, dout)]
        assert _products(out_and_grads, *args) == [(jnp.dtype(dtype).name, "float32")] * 6
        got = jax.jit(out_and_grads)(*args)
        for name, g, w in zip(("out", "dq", "dk", "dv"), got, want, strict=True):
            assert rel_err(np.asarray(g, np.float64), w) <= RTOL[jnp.dtype(dtype).name], name
        # The backward keeps q, k, v and the probabilities, all in the compute dtype: under
        # bf16 the [B, K, G, T, S] probabilities are the rounded ones, half a float32 copy.
        saved = saved_float_residuals(lambda q, k, v: sdpa(q, k, v, jnp.asarray(mask)), *args[:3])
        short = {"float32": "f32", "bfloat16": "bf16"}[jnp.dtype(dtype).name]
        probs = (b, kv, n // kv, t, t)  # [B,K,G,T,S]
        assert (short, probs) in saved and {d for d, _ in saved} == {short}, saved


def test_adapter_products_take_the_compute_dtype() -> None:
    """The adapter's two forward and four backward products take operands in the compute
    dtype and sum in float32, and give the spec's ``dense_forward`` and
    ``dense_backward`` to the dtype's accuracy. A product left in bf16 sums would be widened
    to float32 by XLA's CPU backend, the rate the adapters ran at before."""
    rng = np.random.default_rng(7)
    x = rng.normal(size=(2, 24, 40))  # [B,T,I]
    kernel = rng.normal(size=(40, 56)) / 6  # [I,O]
    a, b = rng.normal(size=(40, 4)) / 6, rng.normal(size=(4, 56))  # [I,R], [R,O]
    dout = rng.normal(size=(2, 24, 56))  # [B,T,O]
    scale = 2.0
    y_ref, cache = spec_dense_forward(x, {"kernel": kernel, "lora_A": a, "lora_B": b}, scale)
    dx_ref, grads_ref = spec_dense_backward(dout, cache, train_base=False)
    want = (y_ref, dx_ref, grads_ref["lora_A"], grads_ref["lora_B"])

    def out_and_grads(x: jax.Array, w: jax.Array, a: jax.Array, b: jax.Array, d: jax.Array) -> Any:
        y, vjp = jax.vjp(lambda x, a, b: linear(x, w) + adapter(x, a, b, scale), x, a, b)
        return (y, *vjp(d))

    for dtype in (jnp.float32, jnp.bfloat16):
        args = [jnp.asarray(t, dtype) for t in (x, kernel, a, b, dout)]
        # the base's forward and input gradient, the adapter's two forward and four backward
        assert _products(out_and_grads, *args) == [(jnp.dtype(dtype).name, "float32")] * 8
        got = jax.jit(out_and_grads)(*args)
        for name, g, w in zip(("y", "dx", "dA", "dB"), got, want, strict=True):
            assert rel_err(np.asarray(g, np.float64), w) <= RTOL[jnp.dtype(dtype).name], name


@pytest.mark.parametrize("m", [48, 47])
def test_weight_gradient_products_keep_bf16_operands(
    m: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``token_sum_product`` (every weight gradient's ``a^T b`` over the tokens) equals the
    float64 product to the dtype's accuracy, and on a CPU with bf16 units no product of bf16
    inputs in XLA's compiled program runs on float32 copies of them (the plain
    ``"MP,MQ->PQ"`` form does, at a fifth of the bf16 rate). An odd token count keeps the
    plain form. Either operand may be the narrower, the one the CPU form transposes."""
    rng = np.random.default_rng(3)
    monkeypatch.delenv(CPU_BF16_ENV)  # the suite's float32 default aside: this CPU's flags
    for p, q in ((40, 24), (24, 40)):  # either operand the narrower
        a, b = rng.normal(size=(m, p)), rng.normal(size=(m, q))  # [M,P], [M,Q]
        want = a.T @ b  # [P,Q]
        for dtype in (jnp.float32, jnp.bfloat16):
            args = [jnp.asarray(t, dtype) for t in (a, b)]
            exact = [np.asarray(t, np.float64) for t in args]
            got = jax.jit(token_sum_product)(*args)
            assert got.dtype == jnp.float32 and got.shape == (p, q)
            assert rel_err(np.asarray(got, np.float64), exact[0].T @ exact[1]) <= 1e-6
            assert rel_err(np.asarray(got, np.float64), want) <= RTOL[jnp.dtype(dtype).name]
        if cpu_bf16_units():  # where YNNPACK takes bf16 products at all (args: bf16)
            compiled = jax.jit(token_sum_product).lower(*args).compile().as_text() or ""
            assert _compiled_products(compiled) == ["float32" if m % 2 else "bfloat16"], compiled


DTYPE_NAMES = {"f32": "float32", "bf16": "bfloat16", "f64": "float64"}  # HLO -> NumPy


def _compiled_products(text: str) -> list[str]:
    """The operands' dtype of each matrix product in an XLA-compiled (optimised) program."""
    kinds = dict(re.findall(r"%([\w.-]+) = (f32|bf16|f64)\[", text))  # value -> its dtype
    found = []
    for operands in re.findall(r"= \w+\[[^\]]*\]\S* dot\(([^)]*)\)", text):
        dtypes = {DTYPE_NAMES[kinds[name]] for name in re.findall(r"%([\w.-]+)", operands)}
        assert len(dtypes) == 1, operands  # both operands in one dtype
        found.append(dtypes.pop())
    return found


def _products(fn: Any, *args: jax.Array) -> list[tuple[str, str]]:
    """Each matrix product in ``fn``'s lowered program: (its operands' dtype, its result's)."""
    text = jax.jit(fn).lower(*args).as_text()
    dtype = re.compile(r"x(f32|bf16|f64)>")
    found = []
    for operands, result in re.findall(
        r"stablehlo\.dot_general.*:\s*\((.*)\)\s*->\s*(\S+)$", text, re.M
    ):
        kinds = {DTYPE_NAMES[k] for k in dtype.findall(operands)}
        assert len(kinds) == 1, operands  # both operands in one dtype
        found.append((kinds.pop(), DTYPE_NAMES[dtype.findall(result)[0]]))
    return found


@pytest.mark.parametrize("impl", ["einsum", "xla"])
@pytest.mark.parametrize("name", ["gpt2", "llama-gqa-rope3", "classic-post-relu"])
def test_attention_paths_with_packed_and_padded_rows(name: str, impl: str) -> None:
    rng = np.random.default_rng(11)
    cfg = CONFIGS[name]
    params = random_params(cfg, rng)
    data = packed_inputs(rng)
    ref, _ = model_forward(
        params, cfg, data["ids"], **{k: v for k, v in data.items() if k != "ids"}
    )
    model = from_spec(params, cfg, None, EngineConfig(attention=impl))  # type: ignore[arg-type]
    out = model(
        jnp.asarray(data["ids"]), **{k: jnp.asarray(v) for k, v in data.items() if k != "ids"}
    )
    assert np.isfinite(np.asarray(out)).all()
    assert rel_err(np.asarray(out), ref) <= RTOL["float32"]


@pytest.mark.slow
def test_remat_policies_and_layer_loops_give_the_same_gradients() -> None:
    """Every policy, scanned and unrolled, LoRA and QLoRA, in float64: the loss and every
    gradient leaf equal those of the scan without rematerialisation (the recomputed forward
    and the unrolled blocks are the same arithmetic) to 1e-10."""
    rng = np.random.default_rng(13)
    ids = rng.integers(0, V, size=(B, T))
    data = {"ids": ids, "labels": ids, "attention_mask_2d": np.ones((B, T), dtype=int)}
    with jax.enable_x64(True):
        _remat_case(data)


def _remat_case(data: dict[str, np.ndarray]) -> None:
    for method in ("lora", "qlora"):
        params, cfg, lcfg = make_case("llama-gqa-rope3", method, np.random.default_rng(12))
        results = {}
        for remat in ("none", *REMAT_POLICIES):
            for loop in ("scan", "unroll"):
                eng = EngineConfig(
                    param_dtype="float64",
                    dtype="float64",
                    remat=remat,
                    layer_loop=loop,
                    quantize=method == "qlora",
                )
                results[remat, loop] = engine_loss_and_grads(
                    from_spec(params, cfg, lcfg, eng), data, None, jax.jit
                )
        assert {r for r, _ in results} == {"none", "full", "dots", "attn_out"}
        want_loss, want = results["none", "scan"]
        for case, (loss, grads) in results.items():
            assert loss == pytest.approx(want_loss, rel=RTOL["float64"]), case
            for path, g in want.items():
                assert rel_err(grads[path], g) <= RTOL["float64"], (method, case, path)
    assert len(results) == 8


@pytest.mark.slow
@pytest.mark.parametrize("method", ["full", "lora", "qlora"])
def test_bf16_scan_on_cpu_takes_frozen_stacks_as_bits(method: str) -> None:
    """Under bf16 compute on a CPU and a remat policy the scan takes the frozen bf16 stacks as
    their uint16 bits (``Model.hidden_states``), never the trained ones (full fine-tuning's
    bf16 weights): the loss and every gradient leaf equal the unrolled blocks' bit for bit,
    and the scanned program bitcasts exactly when something frozen is bf16."""
    rng = np.random.default_rng(21)
    ids = rng.integers(0, V, size=(B, T))
    data = {"ids": ids, "labels": ids, "attention_mask_2d": np.ones((B, T), dtype=int)}
    params, cfg, lcfg = make_case("llama-gqa-rope3", method, np.random.default_rng(22))

    def model_of(**engine: Any) -> Model:
        eng = EngineConfig(param_dtype="bfloat16", dtype="bfloat16", **engine)
        return from_spec(params, cfg, lcfg, dataclasses.replace(eng, quantize=method == "qlora"))

    def gradient_program(model: Model) -> str:
        graphdef, trained, rest = nnx.split(model, nnx.Param, ...)
        grad = jax.grad(lambda p, r: loss_fn(graphdef, p, r, data, None))
        return str(jax.make_jaxpr(grad)(trained, rest))

    results, programs = {}, {}
    for loop in ("scan", "unroll"):
        model = model_of(remat="full", layer_loop=loop)
        results[loop] = engine_loss_and_grads(model, data, None, jax.jit)
        programs[loop] = gradient_program(model)
    (loss, grads), (want_loss, want) = results["scan"], results["unroll"]
    assert loss == want_loss
    assert grads.keys() == want.keys() and len(want) > 0
    for path, g in want.items():
        assert np.abs(g).max() > 0 or "bias" in path, path  # the gradients flow
        np.testing.assert_array_equal(grads[path], g, err_msg=path)
    # full fine-tuning trains every bf16 weight (no frozen stack is bf16); LoRA's base is
    # frozen bf16; QLoRA's frozen bf16 stacks are its norms
    assert ("bitcast_convert_type" in programs["scan"]) == (method != "full")
    assert "bitcast_convert_type" not in programs["unroll"]
    # without a remat policy the backward pass would keep the slices: no bits
    assert "bitcast_convert_type" not in gradient_program(model_of(remat="none", layer_loop="scan"))


@pytest.mark.parametrize("method", ["full", "lora", "qlora"])
def test_every_variable_carries_logical_axes(method: str) -> None:
    cfg = CONFIGS["llama-gqa-rope3"]
    lcfg = None if method == "full" else LoraConfig(rank=2, targets=("q_proj", "down_proj"))
    eng = EngineConfig(quantize=method == "qlora")
    model = nnx.eval_shape(lambda: Model(cfg, lcfg, eng, rngs=nnx.Rngs(0)))
    seen = set()
    for path, var in nnx.to_flat_state(nnx.state(model)):
        axes = var.get_metadata()["out_sharding"]
        assert len(axes) == len(var.get_value().shape), (path, axes, var.get_value().shape)
        assert (path[0] == "layers") == (axes[0] == "layers"), (path, axes)
        seen.update(a for a in axes if a)
    assert {"layers", "vocab", "embed"} <= seen
    if method != "qlora":  # NF4 kernels are flat bytes and blocks
        assert {"q_heads", "kv_heads", "mlp"} <= seen
    if method != "full":
        assert "lora_rank" in seen
    if method == "qlora":
        assert {"nf4_bytes", "nf4_blocks"} <= seen


def test_variable_types_say_what_trains() -> None:
    cfg = CONFIGS["gpt2"]
    for lcfg, quantize, trainable in [
        (None, False, "every base weight"),
        (LoraConfig(rank=2, targets=("c_attn",)), False, "adapters only"),
        (LoraConfig(rank=2, targets=("c_attn",)), True, "adapters only"),
    ]:
        model = Model(cfg, lcfg, EngineConfig(quantize=quantize), rngs=nnx.Rngs(0))
        params = nnx.state(model, nnx.Param)
        names = {str(path[-1]) for path, _ in nnx.to_flat_state(params)}
        if trainable == "adapters only":
            assert names == {"lora_A", "lora_B"}
            assert all(isinstance(v, nnx.LoRAParam) for _, v in nnx.to_flat_state(params))
        else:
            assert {"kernel", "bias", "embedding", "weight"} <= names


def test_lora_targets_per_layer() -> None:
    """Every layer gets a slot for a projection adapted in any layer, with a per-layer flag."""
    cfg = CONFIGS["llama-gqa-rope3"]
    assert cfg.n_layers == 2
    assert lora_targets(cfg, LoraConfig(targets=(r"layers\.\d+\.attn\.q_proj",))) == {
        ("attn", "q_proj"): (True, True)
    }
    some = LoraConfig(targets=(r"layers\.0\.attn\.q_proj", r"layers\.1\.mlp\.up_proj"))
    assert lora_targets(cfg, some) == {
        ("attn", "q_proj"): (True, False),
        ("mlp", "up_proj"): (False, True),
    }
    by_index = LoraConfig(targets=("q_proj", "v_proj"), layers_to_transform=(1,))
    assert lora_targets(cfg, by_index) == {
        ("attn", "q_proj"): (False, True),
        ("attn", "v_proj"): (False, True),
    }
    with pytest.raises(ValueError, match=r"'c_fc' matches no module .* available"):
        lora_targets(cfg, LoraConfig(targets=("c_fc",)))
    with pytest.raises(ValueError, match=r"layers_to_transform: layer 2 does not exist .* 2-layer"):
        lora_targets(cfg, LoraConfig(targets=("q_proj",), layers_to_transform=(0, 2)))
    with pytest.raises(ValueError, match=r"layers_to_transform: layers \[1\] hold none"):
        lora_targets(
            cfg, LoraConfig(targets=(r"layers\.0\.attn\.q_proj",), layers_to_transform=(1,))
        )


def test_engine_config_validation() -> None:
    with pytest.raises(ValueError, match=r"EngineConfig.dtype: expected one of"):
        EngineConfig(dtype="float16")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"EngineConfig.param_dtype: expected one of"):
        EngineConfig(param_dtype="auto")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"EngineConfig.attention: expected one of"):
        EngineConfig(attention="flash")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"EngineConfig.remat"):
        EngineConfig(remat="some")  # type: ignore[arg-type]


@pytest.mark.parametrize("rate", [0.1, 0.3, 0.75])
def test_dropout_mask_is_inverted_dropout(rate: float) -> None:
    """The engine's mask holds 0 and 1/(1-rate) only, keeps about 1 - rate of the inputs, and
    has mean 1 within four standard errors on a large draw (so E[dropout(x)] = x)."""
    from jax_impl.lora import dropout_keep, dropout_mask

    n = 400_000
    keep = dropout_keep(jax.random.key(3), (n,), rate)
    mask = np.asarray(dropout_mask(keep, rate, jnp.float32), np.float64)
    values = np.unique(mask)
    np.testing.assert_allclose(values, [0.0, 1.0 / (1.0 - rate)], rtol=1e-6)
    kept = np.mean(mask > 0)
    assert abs(kept - (1 - rate)) <= 4 * np.sqrt(rate * (1 - rate) / n), kept
    std_err = np.sqrt(rate / (1 - rate) / n)  # the mask's std is sqrt(rate / (1 - rate))
    assert abs(mask.mean() - 1.0) <= 4 * std_err, mask.mean()


# --- "auto": what runs where --------------------------------------------------------------

LLAMA = CONFIGS["llama-gqa-rope3"]  # head dim 4: not a width cuDNN's flash kernel takes
WIDE = llama_config(
    vocab_size=V, d_model=64, n_layers=2, d_ff=96, n_heads=4, n_kv_heads=2, max_seq_len=128
)


def test_auto_resolves_to_float32_einsum_on_cpu() -> None:
    model = Model(LLAMA, None, EngineConfig(), rngs=nnx.Rngs(0))
    assert (model.eng.dtype, model.eng.attention) == ("float32", "einsum")
    assert jax.default_backend() != "cpu" or EngineConfig().resolve(WIDE) == EngineConfig(
        dtype="float32", attention="einsum", remat="none", layer_loop="scan"
    )
    assert model(jnp.zeros((1, 3), jnp.int32)).dtype == jnp.float32


@pytest.mark.parametrize(
    ("backend", "dtype", "cfg", "want"),
    [
        ("gpu", "auto", WIDE, ("bfloat16", "cudnn")),  # head dim 16
        ("gpu", "auto", LLAMA, ("bfloat16", "einsum")),  # head dim 4
        ("gpu", "float32", WIDE, ("float32", "einsum")),  # cuDNN's kernel is 16-bit
        ("gpu", "bfloat16", WIDE, ("bfloat16", "cudnn")),
        ("tpu", "auto", WIDE, ("bfloat16", "einsum")),
        ("cpu", "auto", WIDE, ("float32", "einsum")),
        ("cpu", "bfloat16", WIDE, ("bfloat16", "einsum")),
        ("cpu+bf16", "auto", WIDE, ("bfloat16", "einsum")),  # AMX or AVX512-BF16
        ("cpu+bf16", "float32", WIDE, ("float32", "einsum")),
    ],
)
def test_auto_choices(backend: str, dtype: str, cfg: ModelConfig, want: tuple[str, str]) -> None:
    backend, _, units = backend.partition("+")
    cpu_bf16 = units == "bf16"
    eng = EngineConfig(dtype=dtype).resolve(cfg, backend, cpu_bf16)  # type: ignore[arg-type]
    assert (eng.dtype, eng.attention) == want
    # XLA's CPU backend handles bf16 stacks through float32: the blocks run unrolled there
    assert eng.remat == "none"
    assert eng.layer_loop == ("unroll" if (backend, want[0]) == ("cpu", "bfloat16") else "scan")
    for remat in ("full", "dots", "attn_out"):  # asked for memory: scanned everywhere
        with_remat = EngineConfig(dtype=dtype, remat=remat).resolve(cfg, backend, cpu_bf16)  # type: ignore[arg-type]
        assert (with_remat.dtype, with_remat.remat, with_remat.layer_loop) == (
            want[0],
            remat,
            "scan",
        )
    # QLoRA trains for memory unless told otherwise: every block recomputed, scanned
    qlora = EngineConfig(dtype=dtype, quantize=True).resolve(cfg, backend, cpu_bf16)  # type: ignore[arg-type]
    assert (qlora.dtype, qlora.remat, qlora.layer_loop) == (want[0], "full", "scan")
    fast = EngineConfig(dtype=dtype, quantize=True, remat="none").resolve(cfg, backend, cpu_bf16)  # type: ignore[arg-type]
    assert (fast.remat, fast.layer_loop) == ("none", eng.layer_loop)
    assert eng.resolve(cfg, backend, cpu_bf16) == eng  # resolving again changes nothing
    for explicit in ("xla", "einsum"):  # an explicit path is kept
        got = EngineConfig(dtype=dtype, attention=explicit).resolve(cfg, backend, cpu_bf16)  # type: ignore[arg-type]
        assert got.attention == explicit


@pytest.mark.parametrize(
    ("flags", "env", "want"),
    [
        ("fpu avx512f avx512_bf16 amx_tile", None, True),  # AVX512-BF16 (AMD Zen 4)
        ("fpu avx512f amx_bf16 amx_tile", None, True),  # AMX
        ("fpu avx512f avx512_vnni", None, False),
        ("fpu avx512f avx512_bf16", "0", False),
        ("fpu avx2", "1", True),
    ],
)
def test_cpu_bf16_units_read_the_cpu_flags(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, flags: str, env: str | None, want: bool
) -> None:
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(f"processor\t: 0\nflags\t\t: {flags}\n")
    monkeypatch.delenv(CPU_BF16_ENV)
    if env is not None:
        monkeypatch.setenv(CPU_BF16_ENV, env)
    assert cpu_bf16_units(str(cpuinfo)) is want
    if env is None:
        assert cpu_bf16_units(str(tmp_path / "missing")) is False


def test_cpu_bf16_env_takes_only_0_or_1(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A misspelt override is an error naming the variable, not a silent read of the CPU."""
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nflags\t\t: fpu amx_bf16\n")
    for value in ("true", "yes", "2"):
        monkeypatch.setenv(CPU_BF16_ENV, value)
        with pytest.raises(ValueError, match=f"{CPU_BF16_ENV}='{value}': expected 0 or 1"):
            cpu_bf16_units(str(cpuinfo))
    monkeypatch.setenv(CPU_BF16_ENV, "")  # empty is unset: the CPU's flags decide
    assert cpu_bf16_units(str(cpuinfo)) is True


def test_bf16_widened_only_on_a_cpu_without_bf16_units(monkeypatch: pytest.MonkeyPatch) -> None:
    """The train command's note on an explicit --dtype bfloat16 fires on a CPU without the
    units, never for float32, never where the units are, never on an accelerator."""
    monkeypatch.setenv(CPU_BF16_ENV, "0")
    assert bf16_widened("bfloat16", "cpu")
    assert not bf16_widened("float32", "cpu")
    assert not bf16_widened("bfloat16", "gpu") and not bf16_widened("bfloat16", "tpu")
    monkeypatch.setenv(CPU_BF16_ENV, "1")
    assert not bf16_widened("bfloat16", "cpu")


def test_explicit_cudnn_needs_a_gpu_and_bfloat16() -> None:
    with pytest.raises(ValueError, match=r"--attention\) cudnn: .* backend is 'cpu'"):
        EngineConfig(attention="cudnn").resolve(WIDE, "cpu")
    with pytest.raises(ValueError, match=r"--attention\) cudnn: .*\(--dtype\) is 'float32'"):
        EngineConfig(attention="cudnn", dtype="float32").resolve(WIDE, "gpu")
    if jax.default_backend() != "gpu":
        with pytest.raises(ValueError, match=r"--attention"):
            Model(WIDE, None, EngineConfig(attention="cudnn"), rngs=nnx.Rngs(0))


def _qkv(cfg: ModelConfig, dtype: Any, t: int = 64) -> tuple[jax.Array, jax.Array, jax.Array]:
    rng = np.random.default_rng(5)
    q = rng.normal(size=(2, t, cfg.n_heads, cfg.hd))
    k, v = (rng.normal(size=(2, t, cfg.n_kv, cfg.hd)) for _ in range(2))
    return tuple(jnp.asarray(a, dtype) for a in (q, k, v))  # type: ignore[return-value]


def test_plain_causal_mask_goes_to_the_fused_path_as_is_causal() -> None:
    """``causal_only`` (no padding, packing, window or cache) gives what the mask gives."""
    q, k, v = _qkv(WIDE, jnp.float32)
    mask = attention_mask(2, 64, 64)
    want = sdpa(q, k, v, mask, "einsum")
    for impl in ("xla", "einsum"):
        got = sdpa(q, k, v, mask, impl, causal_only=True)
        assert rel_err(np.asarray(got), np.asarray(want)) <= RTOL["float32"], impl
    wrong = sdpa(q, k, v, attention_mask(2, 64, 64, causal=False), "xla")
    assert rel_err(np.asarray(wrong), np.asarray(want)) > 0.1  # the mask matters here


def test_cudnn_with_a_mask_and_odd_length_runs_as_xla() -> None:
    """cuDNN takes a mask as a bias, which needs even lengths: odd ones go to the XLA path
    (which runs on any backend, so this holds on a CPU too)."""
    q, k, v = (a[:, :63] for a in _qkv(WIDE, jnp.float32))
    pad = np.ones((2, 63), dtype=int)
    pad[0, 50:] = 0
    mask = attention_mask(2, 63, 63, padding=jnp.asarray(pad))
    got = sdpa(q, k, v, mask, "cudnn")
    assert rel_err(np.asarray(got), np.asarray(sdpa(q, k, v, mask, "einsum"))) <= RTOL["float32"]


@pytest.mark.skipif(
    jax.default_backend() != "gpu",
    reason=f"cuDNN flash attention needs an NVIDIA GPU; JAX's backend is {jax.default_backend()}",
)
def test_cudnn_attention_matches_einsum_in_bfloat16() -> None:
    q, k, v = _qkv(WIDE, jnp.bfloat16, t=128)
    mask = attention_mask(2, 128, 128)
    want = np.asarray(sdpa(q, k, v, mask, "einsum"), np.float32)
    for causal_only in (True, False):
        got = sdpa(q, k, v, mask, "cudnn", causal_only=causal_only)
        assert rel_err(np.asarray(got, np.float32), want) <= RTOL["bfloat16"], causal_only
    model = Model(WIDE, None, EngineConfig(), rngs=nnx.Rngs(0))
    assert model.eng.attention == "cudnn"


# --- bfloat16 compute, float32 adapters, optimizer state and loss --------------------------


@pytest.mark.slow
def test_bfloat16_compute_keeps_adapters_state_and_loss_in_float32() -> None:
    """Frozen base weights are stored bf16, adapters float32; the adapters' gradients, AdamW's
    moments and the loss are float32, and the loss is the float32 model's to bf16 accuracy."""
    lcfg = LoraConfig(rank=3, targets=("q_proj", "v_proj", "down_proj"))
    ids = np.random.default_rng(2).integers(0, V, size=(1, B, T))
    batch = {"input_ids": ids, "labels": ids}
    losses = {}
    for dtype in ("float32", "bfloat16"):
        model = Model(WIDE, lcfg, EngineConfig(dtype=dtype), rngs=nnx.Rngs(0))
        kinds = {
            (type(var).__name__, str(var.get_value().dtype))
            for _, var in nnx.to_flat_state(nnx.state(model))
        }
        assert kinds == {("Frozen", dtype), ("LoRAParam", "float32")}, kinds
        trainer = Trainer.create(model, OptimConfig(lr=1e-2, total_steps=4))
        (loss, _), grads = jax.jit(trainer._sum_and_grad)(
            trainer.params, trainer.rest, _micro(batch), KEY, None
        )
        assert loss.dtype == jnp.float32
        assert {g.dtype for g in jax.tree.leaves(grads)} == {jnp.dtype("float32")}
        metrics = trainer.step(batch)
        assert metrics["loss"].dtype == jnp.float32
        assert {x.dtype for x in jax.tree.leaves(trainer.params)} == {jnp.dtype("float32")}
        moments = [x for x in jax.tree.leaves(trainer.opt_state) if x.ndim > 0]
        assert moments and {x.dtype for x in moments} == {jnp.dtype("float32")}
        losses[dtype] = float(metrics["loss"])
    assert losses["bfloat16"] == pytest.approx(losses["float32"], rel=RTOL["bfloat16"])
    assert losses["bfloat16"] != losses["float32"]  # bf16 really ran


def test_full_fine_tuning_stores_every_weight_in_param_dtype() -> None:
    model = Model(WIDE, None, EngineConfig(dtype="bfloat16"), rngs=nnx.Rngs(0))
    dtypes = {str(v.get_value().dtype) for _, v in nnx.to_flat_state(nnx.state(model))}
    assert dtypes == {"float32"}


KEY = jax.random.key(0)


def _micro(batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
    return {k: jnp.asarray(v[0]) for k, v in batch.items()}  # [1,B,T] -> [B,T]


# --- optimizer state in host memory --------------------------------------------------------

HAS_PINNED_HOST = "pinned_host" in [m.kind for m in jax.devices()[0].addressable_memories()]


@pytest.mark.slow
@pytest.mark.skipif(
    not HAS_PINNED_HOST,
    reason=f"{jax.devices()[0].platform} device {jax.devices()[0]} has no pinned_host memory",
)
def test_offloaded_optimizer_lives_on_the_host_and_trains_the_same() -> None:
    lcfg = LoraConfig(rank=3, targets=("q_proj", "k_proj", "up_proj"))
    rng = np.random.default_rng(4)
    batches = [
        {"input_ids": ids, "labels": ids} for ids in rng.integers(0, V, size=(3, 2, B, T))
    ]  # 3 steps of 2 micro-batches
    runs = {}
    for offload in (False, True):
        model = Model(WIDE, lcfg, EngineConfig(quantize=True), rngs=nnx.Rngs(1))
        optim = OptimConfig(lr=1e-2, total_steps=3, offload_optimizer=offload)
        trainer = Trainer.create(model, optim)
        history = fit(trainer, batches)
        kinds = [x.sharding.memory_kind for x in jax.tree.leaves(trainer.opt_state) if x.ndim > 0]
        assert set(kinds) == {"pinned_host" if offload else "device"}, kinds
        counts = [x.sharding.memory_kind for x in jax.tree.leaves(trainer.opt_state) if x.ndim == 0]
        assert set(counts) == {"device"}  # the step counts stay put
        params = {x.sharding.memory_kind for x in jax.tree.leaves(trainer.params)}
        assert params == {"device"}
        runs[offload] = history, jax.tree.leaves(trainer.params), jax.tree.leaves(trainer.opt_state)
    assert runs[True][0] == runs[False][0]  # every step's loss, norm, lr and tokens
    for a, b in zip(runs[True][1] + runs[True][2], runs[False][1] + runs[False][2], strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert runs[True][0][-1]["loss"] != runs[True][0][0]["loss"]  # it trained


def test_offload_shardings_for_a_pinned_step() -> None:
    """What a subclass that pins its outputs asks for: its shardings, the moments on the host."""
    model = Model(WIDE, LoraConfig(rank=2, targets=("q_proj",)), EngineConfig(), rngs=nnx.Rngs(0))
    plain = Trainer.create(model, OptimConfig(total_steps=2))
    base = jax.tree.map(lambda x: x.sharding, plain.opt_state)
    assert plain.opt_state_shardings(base) is base
    offload = dataclasses.replace(plain, offload_optimizer=True) if HAS_PINNED_HOST else None
    if offload is not None:
        got = offload.opt_state_shardings(base)
        kinds = [
            (x.ndim, s.memory_kind)
            for x, s in zip(jax.tree.leaves(plain.opt_state), jax.tree.leaves(got), strict=True)
        ]
        assert {k for n, k in kinds if n > 0} == {"pinned_host"}
        assert {k for n, k in kinds if n == 0} == {"device"}


def test_offload_on_a_backend_without_host_memory_names_the_flag(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    class Memory:
        kind = "device"

    class Device:
        platform = "gpu"

        def addressable_memories(self) -> list[Memory]:
            return [Memory()]

    monkeypatch.setattr(jax, "devices", lambda *a: [Device()])
    with pytest.raises(ValueError, match=r"--offload-optimizer\): gpu device .* no 'pinned_host'"):
        check_host_offload()
