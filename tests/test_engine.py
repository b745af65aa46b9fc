"""Engine options held to the spec: attention paths, packed masks, remat policies, and the
logical axis names every variable carries."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jax_impl.model import EngineConfig, Model, from_spec, lora_targets
from ref_numpy.config import LoraConfig
from ref_numpy.model import model_forward
from tests.helpers import RTOL, rel_err
from tests.test_model import CONFIGS, V, random_params
from tests.test_parity import engine_loss_and_grads, make_case

B, T = 3, 7


def packed_inputs(rng: np.random.Generator) -> dict[str, np.ndarray]:
    ids = rng.integers(0, V, size=(B, T))
    seg = np.array([[0, 0, 0, 1, 1, 1, 1], [0, 0, 0, 0, 0, 0, 0], [0, 1, 1, 2, 2, 2, 3]])
    pos = np.array([[0, 1, 2, 0, 1, 2, 3], list(range(7)), [0, 0, 1, 0, 1, 2, 0]])
    pad = np.ones((B, T), dtype=int)
    pad[1, 5:] = 0
    pad[2, 6] = 0  # the last segment of row 2 is padding: its query sees nothing
    return {"ids": ids, "segment_ids": seg, "positions": pos, "attention_mask_2d": pad}


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
    model = from_spec(params, cfg, None, EngineConfig(attn_impl=impl))  # type: ignore[arg-type]
    out = model(
        jnp.asarray(data["ids"]), **{k: jnp.asarray(v) for k, v in data.items() if k != "ids"}
    )
    assert np.isfinite(np.asarray(out)).all()
    assert rel_err(np.asarray(out), ref) <= RTOL["float32"]


def test_remat_policies_give_the_same_gradients() -> None:
    params, cfg, lcfg = make_case("llama-gqa-rope3", "lora", np.random.default_rng(12))
    rng = np.random.default_rng(13)
    ids = rng.integers(0, V, size=(B, T))
    data = {"ids": ids, "labels": ids, "attention_mask_2d": np.ones((B, T), dtype=int)}
    results = {}
    for remat in ("none", "full", "dots"):
        model = from_spec(params, cfg, lcfg, EngineConfig(remat=remat))  # type: ignore[arg-type]
        results[remat] = engine_loss_and_grads(model, data, None, jax.jit)
    for remat in ("full", "dots"):
        assert results[remat][0] == pytest.approx(results["none"][0], rel=1e-6)
        for path, g in results["none"][1].items():
            assert rel_err(results[remat][1][path], g) <= RTOL["float32"], (remat, path)


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
    with pytest.raises(ValueError, match=r"EngineConfig.attn_impl: expected one of"):
        EngineConfig(attn_impl="flash")  # type: ignore[arg-type]
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
