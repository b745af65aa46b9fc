"""Checkpoint I/O without torch: round trips, streaming memory, atomic writes."""

from __future__ import annotations

import json
import tracemalloc
from pathlib import Path

import numpy as np
import pytest

from ref_numpy.config import RopeScaling, classic_config, gpt2_config, llama_config
from ref_numpy.formats.hf import (
    CheckpointError,
    config_to_hf,
    hf_state,
    hf_tensors,
    load_config,
    load_model,
    save_model,
)
from ref_numpy.model import init_params
from ref_numpy.nf4 import NF4Tensor, dequantize_kernel
from tests.helpers import leaves

CONFIGS = {
    "llama": llama_config(
        vocab_size=50, d_model=16, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=24, max_seq_len=32
    ),
    "qwen2": llama_config(
        vocab_size=50,
        d_model=16,
        n_layers=2,
        n_heads=4,
        n_kv_heads=2,
        d_ff=24,
        max_seq_len=32,
        bias="qkv",
        tie_embeddings=True,
    ),
    "gpt2": gpt2_config(vocab_size=50, d_model=16, n_layers=2, n_heads=4, d_ff=24, max_seq_len=32),
    "classic": classic_config(
        vocab_size=50, d_model=16, n_layers=2, n_heads=4, d_ff=24, max_seq_len=32
    ),
    "qwen3-yarn-window": llama_config(
        vocab_size=50,
        d_model=16,
        n_layers=3,
        n_heads=4,
        n_kv_heads=2,
        head_dim=6,
        d_ff=24,
        max_seq_len=32,
        qk_norm=True,
        sliding_window=5,
        sliding_layers=(1, 2),
        rope_scaling=RopeScaling("yarn", 4.0, 8, beta_fast=16.0, truncate=False),
    ),
    "mistral-linear": llama_config(
        vocab_size=50,
        d_model=16,
        n_layers=2,
        n_heads=4,
        n_kv_heads=2,
        d_ff=24,
        max_seq_len=32,
        sliding_window=5,
        rope_scaling=RopeScaling("linear", 2.0),
    ),
    "classic-rope-window": classic_config(
        vocab_size=50,
        d_model=16,
        n_layers=2,
        n_heads=4,
        d_ff=24,
        max_seq_len=32,
        position="rope",
        sliding_window=3,
        sliding_layers=(0,),
        rope_scaling=RopeScaling("llama3", 8.0, 8, 1.0, 4.0),
    ),
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_round_trip(name: str, tmp_path: Path) -> None:
    cfg = CONFIGS[name]
    params = init_params(cfg, np.random.default_rng(0), std=0.5)
    save_model(params, cfg, tmp_path / "m")
    assert load_config(tmp_path / "m") == cfg
    _, back = load_model(tmp_path / "m", dtype=np.float64)
    want, got = dict(leaves(params)), dict(leaves(back))
    assert set(got) == set(want)
    for k, v in want.items():
        np.testing.assert_array_equal(got[k], np.asarray(v, np.float32).astype(np.float64))


def test_names_follow_the_checkpoints() -> None:
    names = [t.name for t in hf_tensors(CONFIGS["qwen2"])]
    assert "model.layers.1.self_attn.k_proj.bias" in names
    assert "model.layers.1.self_attn.o_proj.bias" not in names
    assert "lm_head.weight" not in names  # tied
    g = {t.name: t for t in hf_tensors(CONFIGS["gpt2"])}
    assert g["transformer.h.0.attn.c_attn.weight"].shape == (16, 48)  # Conv1D: [in, out]
    assert not g["transformer.h.0.attn.c_attn.weight"].transpose
    lm = {t.name: t for t in hf_tensors(CONFIGS["llama"])}["lm_head.weight"]
    assert lm.transpose and lm.shape == (50, 16)
    q3 = {t.name: t for t in hf_tensors(CONFIGS["qwen3-yarn-window"])}
    norm = q3["model.layers.2.self_attn.k_norm.weight"]
    assert norm.shape == (6,) and norm.path == ("layers", 2, "attn", "k_norm", "weight")
    assert "model.layers.0.self_attn.q_norm.weight" in q3
    assert "model.layers.0.self_attn.q_norm.weight" not in names  # qwen2 has none


def test_config_to_hf_spells_each_family() -> None:
    q3 = config_to_hf(CONFIGS["qwen3-yarn-window"])
    assert (q3["model_type"], q3["head_dim"], q3["sliding_window"]) == ("qwen3", 6, 5)
    assert q3["layer_types"] == ["full_attention", "sliding_attention", "sliding_attention"]
    assert (q3["use_sliding_window"], q3["max_window_layers"]) == (True, 1)
    assert q3["rope_scaling"] == {
        "rope_type": "yarn",
        "factor": 4.0,
        "original_max_position_embeddings": 8,
        "beta_fast": 16.0,
        "beta_slow": 1.0,
        "truncate": False,
    }
    mistral = config_to_hf(CONFIGS["mistral-linear"])
    assert (mistral["model_type"], mistral["sliding_window"]) == ("mistral", 5)
    assert mistral["rope_scaling"] == {"rope_type": "linear", "factor": 2.0}
    partial = CONFIGS["llama"].replace(sliding_window=4, sliding_layers=(1,))
    with pytest.raises(ValueError, match=r"sliding_layers: a window on layers \(1,\) only"):
        config_to_hf(partial)
    with pytest.raises(ValueError, match="GPT-2 in transformers has no window"):
        config_to_hf(CONFIGS["gpt2"].replace(sliding_window=4))


def test_quantize_while_loading(tmp_path: Path) -> None:
    cfg = CONFIGS["llama"]
    params = init_params(cfg, np.random.default_rng(1), std=0.5)
    save_model(params, cfg, tmp_path / "m")
    _, q = load_model(tmp_path / "m", quantize=lambda path: path[2] == "mlp")
    k = q["layers"][0]["mlp"]["up_proj"]["kernel"]
    assert isinstance(k, NF4Tensor) and k.shape == (24, 16)  # W: [out, in]
    assert isinstance(q["layers"][0]["attn"]["q_proj"]["kernel"], np.ndarray)
    err = np.abs(dequantize_kernel(k) - params["layers"][0]["mlp"]["up_proj"]["kernel"]).max()
    assert 0 < err < 0.2 * np.abs(params["layers"][0]["mlp"]["up_proj"]["kernel"]).max()


def test_peak_memory_of_a_streaming_load(tmp_path: Path) -> None:
    """Peak host memory stays under 1.3 x the largest tensor plus the output."""
    cfg = llama_config(
        vocab_size=4096, d_model=256, n_layers=4, n_heads=4, d_ff=512, max_seq_len=64
    )
    params = init_params(cfg, np.random.default_rng(2))
    save_model(params, cfg, tmp_path / "m")
    state = hf_state(params, cfg)
    largest = max(a.nbytes for a in state.values())
    output = sum(a.nbytes for a in state.values())
    del params, state
    tracemalloc.start()
    base, _ = tracemalloc.get_traced_memory()
    _, loaded = load_model(tmp_path / "m")
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert sum(a.nbytes for _, a in leaves(loaded)) == output  # type: ignore[attr-defined]
    assert peak - base <= 1.3 * largest + output, (peak - base, largest, output)
    assert peak - base >= output  # the measurement sees the arrays


def test_write_is_atomic(tmp_path: Path) -> None:
    cfg = CONFIGS["gpt2"]
    params = init_params(cfg, np.random.default_rng(3))
    params["layers"][1]["attn"]["c_attn"]["kernel"] = NF4Tensor  # not an array: fails mid-way
    with pytest.raises((AttributeError, ValueError)):
        save_model(params, cfg, tmp_path / "m")
    assert list(tmp_path.iterdir()) == []


def test_config_errors_name_the_file_and_field(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text('{"model_type": "llama",\n "hidden_size": }')
    with pytest.raises(CheckpointError, match=r"config.json:2: not valid JSON"):
        load_config(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "vocab_size": 5}))
    with pytest.raises(CheckpointError, match=r"config.json: missing field 'num_attention_heads'"):
        load_config(tmp_path)
    hf = {
        "model_type": "mistral",
        "vocab_size": 5,
        "hidden_size": 8,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "intermediate_size": 8,
        "max_position_embeddings": 8,
        "sliding_window": 4,
    }
    (tmp_path / "config.json").write_text(json.dumps({**hf, "sliding_window": 0}))
    with pytest.raises(CheckpointError, match=r"sliding_window must be a positive int, got 0"):
        load_config(tmp_path)
    qwen2 = {**hf, "model_type": "qwen2", "use_sliding_window": True, "layer_types": ["x"]}
    (tmp_path / "config.json").write_text(json.dumps(qwen2))
    with pytest.raises(CheckpointError, match=r"layer_types must list 1 of \['full_attention'"):
        load_config(tmp_path)
    with pytest.raises(CheckpointError, match="no such file"):
        load_config(tmp_path / "nowhere")
    (tmp_path / "config.json").write_text(json.dumps({**hf, "sliding_window": None}))
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        load_model(tmp_path)
