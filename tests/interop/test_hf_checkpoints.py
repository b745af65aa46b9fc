"""Hugging Face checkpoints: tiny random transformers models saved here, loaded by the spec
and the engine, give transformers' logits; sharded and transformers-4 style files load."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from ref_numpy.hf_io import CheckpointError, load_config, load_model, save_model
from ref_numpy.model import model_forward
from tests.helpers import HF_RTOL, rel_err

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.interop

V = 97


def _spread(model: Any, std: float = 0.3) -> Any:
    """Re-draw every parameter with a larger spread than the default init, so the logits are
    far from uniform and a wrong transpose or rotation cannot hide."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or ".ln_" in name or "layernorm" in name:
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(std * torch.randn(p.shape, generator=g))
    return model.eval()


FAMILIES: dict[str, dict[str, Any]] = {
    "llama-gqa": dict(
        cls="LlamaConfig",
        hidden_size=48,
        intermediate_size=80,
        num_hidden_layers=2,
        num_attention_heads=6,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=False,
    ),
    "llama3-rope-tied": dict(
        cls="LlamaConfig",
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=64,
        tie_word_embeddings=True,
        rope_theta=500.0,
        rope_scaling={
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 16,
        },
    ),
    "mistral": dict(
        cls="MistralConfig",
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        sliding_window=None,
    ),
    "qwen2-bias": dict(
        cls="Qwen2Config",
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=True,
    ),
    "gpt2": dict(cls="GPT2Config", n_embd=32, n_layer=2, n_head=4, n_positions=64),
}


def make_hf_model(name: str, out: Path, **save_kwargs: Any) -> Any:
    spec = dict(FAMILIES[name])
    cfg = getattr(transformers, spec.pop("cls"))(vocab_size=V, **spec)
    torch.manual_seed(0)
    model = _spread(transformers.AutoModelForCausalLM.from_config(cfg).float())
    model.save_pretrained(out, safe_serialization=True, **save_kwargs)
    return model


def hf_logits(model: Any, ids: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
    with torch.no_grad():
        kw = {} if mask is None else {"attention_mask": torch.tensor(mask)}
        return model(torch.tensor(ids), **kw).logits.double().numpy()


@pytest.mark.parametrize("name", list(FAMILIES))
def test_spec_and_engine_match_transformers(name: str, tmp_path: Path) -> None:
    import jax.numpy as jnp

    from jax_impl.model import from_spec

    hf = make_hf_model(name, tmp_path)
    ids = np.random.default_rng(0).integers(0, V, size=(2, 11))
    pad = np.ones_like(ids)
    pad[1, 8:] = 0  # right padding in the second row
    want = hf_logits(hf, ids, pad)
    cfg, params = load_model(tmp_path, dtype=np.float32)
    assert cfg.n_layers == 2
    assert np.abs(want).max() > 1.0, "logits far from uniform"
    got, _ = model_forward(params, cfg, ids, attention_mask_2d=pad)
    keep = pad.astype(bool)  # padded positions' logits are arbitrary in transformers
    assert rel_err(got[keep], want[keep]) <= HF_RTOL
    engine = from_spec(params, cfg)
    out = np.asarray(engine(jnp.asarray(ids), attention_mask_2d=jnp.asarray(pad)))
    assert rel_err(out[keep], want[keep]) <= HF_RTOL


def test_a_wrong_rope_setting_is_caught(tmp_path: Path) -> None:
    hf = make_hf_model("llama3-rope-tied", tmp_path)
    ids = np.random.default_rng(1).integers(0, V, size=(1, 40))
    cfg, params = load_model(tmp_path)
    good, _ = model_forward(params, cfg, ids)
    assert rel_err(good, hf_logits(hf, ids)) <= HF_RTOL
    bad, _ = model_forward(params, cfg.replace(rope_scaling=None), ids)
    assert rel_err(bad, hf_logits(hf, ids)) > 100 * HF_RTOL


def test_transformers4_and_5_rope_forms_load_alike(tmp_path: Path) -> None:
    make_hf_model("llama3-rope-tied", tmp_path)
    cfg5 = load_config(tmp_path)
    raw = json.loads((tmp_path / "config.json").read_text())
    params = raw.pop("rope_parameters", None) or {}
    old = {**raw, "rope_theta": params.get("rope_theta", raw.get("rope_theta"))}
    if params.get("rope_type") == "llama3":
        old["rope_scaling"] = {k: v for k, v in params.items() if k != "rope_theta"}
    (tmp_path / "config.json").write_text(json.dumps(old))
    assert load_config(tmp_path) == cfg5
    assert cfg5.rope_scaling is not None and cfg5.rope_theta == 500.0


def test_sharded_checkpoint_and_bf16(tmp_path: Path) -> None:
    hf = make_hf_model("llama-gqa", tmp_path / "sharded", max_shard_size="20KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").exists()
    cfg, params = load_model(tmp_path / "sharded")
    ids = np.random.default_rng(2).integers(0, V, size=(1, 9))
    assert rel_err(model_forward(params, cfg, ids)[0], hf_logits(hf, ids)) <= HF_RTOL
    hf.to(torch.bfloat16).save_pretrained(tmp_path / "bf16", safe_serialization=True)
    _, p16 = load_model(tmp_path / "bf16")
    q = p16["layers"][0]["attn"]["q_proj"]["kernel"]
    assert q.dtype == np.float32
    want = hf.model.layers[0].self_attn.q_proj.weight.detach().float().T.numpy()
    np.testing.assert_array_equal(q, want)


def test_save_model_round_trips_through_transformers(tmp_path: Path) -> None:
    make_hf_model("qwen2-bias", tmp_path / "in")
    cfg, params = load_model(tmp_path / "in")
    save_model(params, cfg, tmp_path / "out")
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").float().eval()
    ids = np.random.default_rng(3).integers(0, V, size=(1, 9))
    assert rel_err(model_forward(params, cfg, ids)[0], hf_logits(back, ids)) <= HF_RTOL
    with pytest.raises(FileExistsError, match="exists"):
        save_model(params, cfg, tmp_path / "out")


def test_bad_checkpoints_are_named(tmp_path: Path) -> None:
    from safetensors.numpy import load_file, save_file

    make_hf_model("gpt2", tmp_path)
    weights = tmp_path / "model.safetensors"
    state = load_file(weights)
    name = "transformer.h.1.mlp.c_fc.weight"

    def rewrite(**change: Any) -> None:
        s = dict(state)
        for k, v in change.items():
            if v is None:
                del s[k.replace("__", ".")]
            else:
                s[k.replace("__", ".")] = v
        save_file(s, weights)

    rewrite(**{name.replace(".", "__"): None})
    with pytest.raises(CheckpointError, match=r"missing tensors \['transformer.h.1.mlp.c_fc"):
        load_model(tmp_path)
    rewrite(**{name.replace(".", "__"): np.zeros((32, 100), np.float32)})
    with pytest.raises(CheckpointError, match=r"c_fc.weight' has shape \[32, 100\], expected"):
        load_model(tmp_path)
    rewrite(**{"transformer__h__9__ln_1__weight": np.zeros(32, np.float32)})
    with pytest.raises(CheckpointError, match=r"unexpected tensors \['transformer.h.9.ln_1"):
        load_model(tmp_path)
    save_file(state, weights)
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])  # truncated
    with pytest.raises(CheckpointError, match="model.safetensors: not a readable safetensors"):
        load_model(tmp_path)
    weights.write_bytes(data)
    raw = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**raw, "model_type": "bert"}))
    with pytest.raises(CheckpointError, match=r"unsupported model_type 'bert'"):
        load_model(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({**raw, "reorder_and_upcast_attn": True}))
    with pytest.raises(CheckpointError, match=r"unsupported reorder_and_upcast_attn=True"):
        load_model(tmp_path)
