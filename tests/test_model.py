"""The whole model: gradients against finite differences for every family, full and LoRA;
LoRA identities (B = 0, merge / unmerge) and the errors bad input gets."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from ref_numpy import lora as LR
from ref_numpy.config import (
    LoraConfig,
    ModelConfig,
    RopeScaling,
    classic_config,
    gpt2_config,
    llama_config,
)
from ref_numpy.model import init_params, loss_and_grads, model_forward
from tests.gradcheck import grad_rel_err, numerical_grad
from tests.helpers import FD_RTOL, leaves

B, T, V = 3, 7, 13
SMALL = dict(vocab_size=V, d_model=10, n_layers=2, d_ff=14, max_seq_len=16)

CONFIGS: dict[str, ModelConfig] = {
    "classic-post-relu": classic_config(**SMALL, n_heads=2),
    "classic-pre-gelu": classic_config(**SMALL, n_heads=2, norm_order="pre", activation="gelu"),
    "gpt2": gpt2_config(**SMALL, n_heads=2),
    "llama-gqa-rope3": llama_config(
        **SMALL,
        n_heads=4,
        n_kv_heads=2,
        head_dim=4,
        rope_scaling=RopeScaling("llama3", 8.0, 8, 1.0, 4.0),
        rope_theta=50.0,
    ),
    "qwen2-tied": llama_config(
        **SMALL, n_heads=3, n_kv_heads=1, head_dim=6, bias="qkv", tie_embeddings=True
    ),
    # Mistral v0.1: a sliding window (3 < T) on every layer; YaRN with a fractional ramp
    "mistral-window-yarn": llama_config(
        **SMALL,
        n_heads=2,
        n_kv_heads=1,
        head_dim=8,
        sliding_window=3,
        rope_scaling=RopeScaling("yarn", 4.0, 64, truncate=False),
    ),
    # Qwen3: per-head q/k RMSNorm, head_dim != D / N; the window on layer 1 only; linear RoPE
    "qwen3-window-linear": llama_config(
        **SMALL,
        n_heads=2,
        n_kv_heads=1,
        head_dim=6,
        qk_norm=True,
        tie_embeddings=True,
        sliding_window=3,
        sliding_layers=(1,),
        rope_scaling=RopeScaling("linear", 2.5),
    ),
}


def random_params(
    cfg: ModelConfig, rng: np.random.Generator, spread: float = 0.4
) -> dict[str, Any]:
    """Parameters with spread enough that every term of the gradient matters (matrices get
    ``normal(0, spread)`` on top of the init, norm weights a quarter of that)."""
    params = init_params(cfg, rng)
    for path, leaf in leaves(params):
        scale = spread / 4 if path.endswith("weight") else spread
        leaf += rng.normal(0.0, scale, size=leaf.shape)
    return params


def batch(rng: np.random.Generator) -> dict[str, np.ndarray]:
    ids = rng.integers(0, V, size=(B, T))
    labels = ids.copy()
    labels[0, :3] = -100  # a prompt that takes no loss
    pad = np.ones((B, T), dtype=int)
    pad[2, 5:] = 0  # right padding in the last row
    labels[2, 5:] = -100
    return {"ids": ids, "labels": labels, "attention_mask_2d": pad}


def check_model_grads(params: dict[str, Any], cfg: ModelConfig, data: dict, **kw: Any) -> set:
    fwd = {"attention_mask_2d": data["attention_mask_2d"], **kw}
    _, grads = loss_and_grads(params, cfg, data["ids"], data["labels"], **fwd)
    by_path = dict(leaves(params))
    rng = np.random.default_rng(1)
    for path, g in leaves(grads):

        def f() -> float:
            return loss_and_grads(params, cfg, data["ids"], data["labels"], **fwd)[0]

        numeric, idx = numerical_grad(f, by_path[path], max_entries=12, rng=rng)
        err = grad_rel_err(g.reshape(-1)[idx], numeric)
        assert err <= FD_RTOL, f"{path}: relative error {err:.2e}"
    return {path for path, _ in leaves(grads)}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(CONFIGS))
def test_full_gradients(name: str, rng: np.random.Generator) -> None:
    cfg = CONFIGS[name]
    params = random_params(cfg, rng)
    got = check_model_grads(params, cfg, batch(rng))
    assert got == {path for path, _ in leaves(params)}, "every parameter gets a gradient"


@pytest.mark.slow
@pytest.mark.parametrize("name", list(CONFIGS))
def test_lora_gradients_only_adapters(name: str, rng: np.random.Generator) -> None:
    cfg = CONFIGS[name]
    targets = ("c_attn", "c_fc") if cfg.family == "gpt2" else ("q_proj", "v_proj", "down_proj")
    lcfg = LoraConfig(rank=3, alpha=6.0, targets=targets, dropout=0.25)
    params = LR.add_lora(random_params(cfg, rng), cfg, lcfg)
    for _, p in LR.projections(params):
        if "lora_B" in p:
            p["lora_B"] += rng.normal(0.0, 0.3, size=p["lora_B"].shape)
    masks = LR.dropout_masks(params, lcfg.dropout, (B, T), rng)
    got = check_model_grads(params, cfg, batch(rng), lora_scale=lcfg.scale, dropout=masks)
    want = {
        f"{path}.{leaf}"
        for path, p in LR.projections(params)
        if "lora_A" in p
        for leaf in ("lora_A", "lora_B")
    }
    assert got == want, "only adapters get gradients"
    assert len(want) == 2 * cfg.n_layers * len(targets)


@pytest.mark.slow
def test_packed_segments_gradients(rng: np.random.Generator) -> None:
    cfg = CONFIGS["llama-gqa-rope3"]
    params = random_params(cfg, rng)
    seg = np.array([[0] * 4 + [1] * 3] * B)
    pos = np.array([list(range(4)) + list(range(3))] * B)
    check_model_grads(params, cfg, batch(rng), segment_ids=seg, positions=pos)


def test_packing_isolates_segments(rng: np.random.Generator) -> None:
    """Packed rows give each example exactly the logits it gets alone."""
    cfg = CONFIGS["gpt2"]
    params = random_params(cfg, rng)
    a, b = rng.integers(0, V, size=(1, 4)), rng.integers(0, V, size=(1, 3))
    packed = np.concatenate([a, b], axis=1)
    seg, pos = np.array([[0] * 4 + [1] * 3]), np.array([[0, 1, 2, 3, 0, 1, 2]])
    out, _ = model_forward(params, cfg, packed, segment_ids=seg, positions=pos)
    la, _ = model_forward(params, cfg, a)
    lb, _ = model_forward(params, cfg, b)
    np.testing.assert_allclose(out[:, :4], la, rtol=1e-12)
    np.testing.assert_allclose(out[:, 4:], lb, rtol=1e-12)
    leaky, _ = model_forward(params, cfg, packed, positions=pos)  # without the segment mask
    assert not np.allclose(leaky[:, 4:], lb, rtol=1e-6)


def test_padding_does_not_change_real_tokens(rng: np.random.Generator) -> None:
    cfg = CONFIGS["llama-gqa-rope3"]
    params = random_params(cfg, rng)
    ids = rng.integers(0, V, size=(1, 5))
    padded = np.concatenate([ids, [[0, 0]]], axis=1)
    out, _ = model_forward(params, cfg, padded, attention_mask_2d=np.array([[1] * 5 + [0] * 2]))
    ref, _ = model_forward(params, cfg, ids)
    np.testing.assert_allclose(out[:, :5], ref, rtol=1e-12)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_lora_identities(name: str, rng: np.random.Generator) -> None:
    cfg = CONFIGS[name]
    base = random_params(cfg, rng)
    targets = ("c_attn", "c_proj") if cfg.family == "gpt2" else ("q_proj", "up_proj")
    lcfg = LoraConfig(rank=3, alpha=5.0, targets=targets, use_rslora=True)
    ids = rng.integers(0, V, size=(B, T))
    ref, _ = model_forward(base, cfg, ids)
    adapted = LR.add_lora(base, cfg, lcfg)
    out, _ = model_forward(adapted, cfg, ids, lora_scale=lcfg.scale)
    np.testing.assert_array_equal(out, ref)  # B = 0: exactly the base
    for _, p in LR.projections(adapted):
        if "lora_B" in p:
            p["lora_B"] = rng.normal(0.0, 0.3, size=p["lora_B"].shape)
    unmerged, _ = model_forward(adapted, cfg, ids, lora_scale=lcfg.scale)
    assert not np.allclose(unmerged, ref, rtol=1e-3), "a non-zero adapter changes the logits"
    merged_params = LR.merge_lora(adapted, lcfg.scale)
    assert not LR.has_lora(merged_params)
    merged, _ = model_forward(merged_params, cfg, ids)
    np.testing.assert_allclose(merged, unmerged, rtol=1e-12, atol=1e-12)
    _, adapters = LR.split_lora(adapted)
    back = LR.unmerge_lora(merged_params, adapters, lcfg.scale)
    for (pa, a), (pb, b) in zip(leaves(back), leaves(adapted), strict=True):
        assert pa == pb
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-14)
    # a perturbation of A alone changes the output: the comparison above could fail
    path = next(p for p, _ in leaves(adapted) if p.endswith("lora_A"))
    dict(leaves(adapted))[path][0, 0] += 1e-3
    perturbed, _ = model_forward(adapted, cfg, ids, lora_scale=lcfg.scale)
    assert np.abs(perturbed - merged).max() > 1e-9


def test_lora_scale_and_dropout_semantics(rng: np.random.Generator) -> None:
    x = rng.normal(size=(2, 3, 6))
    p = {
        "kernel": rng.normal(size=(6, 4)),
        "lora_A": rng.normal(size=(6, 2)),
        "lora_B": rng.normal(size=(2, 4)),
    }
    mask = (rng.random(x.shape) > 0.5) / 0.5
    y, _ = LR.dense_forward(x, p, 1.5, mask)
    np.testing.assert_allclose(y, x @ p["kernel"] + 1.5 * (x * mask) @ p["lora_A"] @ p["lora_B"])
    assert LoraConfig(rank=4, alpha=8).scale == 2.0
    assert LoraConfig(rank=4, alpha=8, use_rslora=True).scale == 4.0


def test_peft_style_init(rng: np.random.Generator) -> None:
    cfg = llama_config(vocab_size=V, d_model=64, n_layers=1, n_heads=4, d_ff=96, max_seq_len=8)
    params = LR.add_lora(init_params(cfg, rng), cfg, LoraConfig(rank=8, targets=("down_proj",)))
    p = params["layers"][0]["mlp"]["down_proj"]
    assert not p["lora_B"].any()
    bound = 1 / np.sqrt(96)
    assert np.abs(p["lora_A"]).max() <= bound and np.abs(p["lora_A"]).max() > 0.9 * bound
    again = LR.add_lora(init_params(cfg, rng), cfg, LoraConfig(rank=8, targets=("down_proj",)))
    np.testing.assert_array_equal(again["layers"][0]["mlp"]["down_proj"]["lora_A"], p["lora_A"])


def test_lora_bad_input(rng: np.random.Generator) -> None:
    cfg = CONFIGS["llama-gqa-rope3"]
    params = init_params(cfg, rng)
    with pytest.raises(ValueError, match=r"'c_attn' matches no module .* available: \['down_proj'"):
        LR.add_lora(params, cfg, LoraConfig(targets=("c_attn",)))
    with pytest.raises(ValueError, match=r"rank: 11 exceeds min\(in, out\) = 8 of layers.0"):
        LR.add_lora(params, cfg, LoraConfig(rank=11, targets=("k_proj",)))
    with pytest.raises(ValueError, match="LoraConfig.rank"):
        LoraConfig(rank=0)
    with pytest.raises(ValueError, match="LoraConfig.dropout"):
        LoraConfig(dropout=1.0)
    adapters = {"layers.0.attn.q_proj": {"lora_A": np.zeros((10, 2)), "lora_B": np.zeros((3, 16))}}
    with pytest.raises(ValueError, match=r"layers.0.attn.q_proj.lora_B: expected shape \[2, 16\]"):
        LR.join_lora(params, adapters)


def test_config_validation_names_the_field() -> None:
    with pytest.raises(ValueError, match=r"ModelConfig.norm: expected one of .*got 'batchnorm'"):
        llama_config(**SMALL, n_heads=2, norm="batchnorm")
    with pytest.raises(ValueError, match="ModelConfig.n_kv_heads: must divide n_heads=4"):
        llama_config(**SMALL, n_heads=4, n_kv_heads=3, head_dim=4)
    with pytest.raises(ValueError, match="ModelConfig.d_model"):
        llama_config(**{**SMALL, "d_model": 0}, n_heads=2)
    with pytest.raises(ValueError, match="ModelConfig.head_dim: rope needs an even head_dim"):
        llama_config(**SMALL, n_heads=2, head_dim=5)
    with pytest.raises(ValueError, match="RopeScaling.high_freq_factor"):
        RopeScaling("llama3", 8.0, 8, 4.0, 1.0)
    with pytest.raises(ValueError, match="ModelConfig.sliding_window: expected a positive int"):
        llama_config(**SMALL, n_heads=2, head_dim=4, sliding_window=0)
    with pytest.raises(ValueError, match="ModelConfig.sliding_layers: set without a sliding"):
        llama_config(**SMALL, n_heads=2, head_dim=4, sliding_layers=(1,))
    with pytest.raises(ValueError, match=r"sliding_layers: .* in \[0, 2\), got \(0, 2\)"):
        llama_config(**SMALL, n_heads=2, head_dim=4, sliding_window=3, sliding_layers=(0, 2))
    with pytest.raises(ValueError, match=r"sliding_layers: .*increasing.*got \[1\]"):
        llama_config(**SMALL, n_heads=2, head_dim=4, sliding_window=3, sliding_layers=[1])
    with pytest.raises(ValueError, match="ModelConfig.qk_norm: not available with gpt2"):
        gpt2_config(**SMALL, n_heads=2, qk_norm=True)
    cfg = CONFIGS["qwen3-window-linear"]
    assert [cfg.layer_window(i) for i in range(2)] == [None, 3]


def test_model_input_errors(rng: np.random.Generator) -> None:
    cfg = CONFIGS["gpt2"]
    params = init_params(cfg, rng)
    with pytest.raises(ValueError, match="exceeds max_seq_len=16"):
        model_forward(params, cfg, np.zeros((1, 17), dtype=int))
    with pytest.raises(ValueError, match=r"attention_mask: expected shape \[1, 4\]"):
        model_forward(params, cfg, np.zeros((1, 4), dtype=int), attention_mask_2d=np.ones((1, 5)))
    with pytest.raises(ValueError, match=r"labels: expected shape \[1, 4\]"):
        loss_and_grads(params, cfg, np.zeros((1, 4), dtype=int), np.zeros((1, 3), dtype=int))
