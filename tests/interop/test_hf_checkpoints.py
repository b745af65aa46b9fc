"""Hugging Face checkpoints: tiny random transformers models saved here, loaded by the spec
and the engine, give transformers' logits; sharded and transformers-4 style files load."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from ref_numpy.formats.hf import CheckpointError, load_config, load_model, save_model
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
    # Mistral v0.1: a window of 4 on every layer, shorter than the 11-token test sequences
    "mistral-window": dict(
        cls="MistralConfig",
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        sliding_window=4,
    ),
    # Qwen2 with use_sliding_window: the window on layers >= max_window_layers only
    "qwen2-window-layers": dict(
        cls="Qwen2Config",
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        use_sliding_window=True,
        sliding_window=4,
        max_window_layers=1,
    ),
    # Qwen3: per-head q_norm / k_norm, head_dim 12 != hidden / heads = 8, tied embeddings
    "qwen3": dict(
        cls="Qwen3Config",
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=12,
        max_position_embeddings=64,
        tie_word_embeddings=True,
    ),
    "llama-linear-rope": dict(
        cls="LlamaConfig",
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        rope_theta=500.0,
        rope_scaling={"rope_type": "linear", "factor": 4.0},
    ),
    "qwen2-yarn-rope": dict(
        cls="Qwen2Config",
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        rope_theta=500.0,
        rope_scaling={
            "rope_type": "yarn",
            "factor": 4.0,
            "original_max_position_embeddings": 16,
            "beta_fast": 8.0,
        },
    ),
}
SCALED_ROPE = ("llama3-rope-tied", "llama-linear-rope", "qwen2-yarn-rope")


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


def test_a_wrong_llama3_rope_setting_is_caught(tmp_path: Path) -> None:
    hf = make_hf_model("llama3-rope-tied", tmp_path)
    ids = np.random.default_rng(1).integers(0, V, size=(1, 40))
    cfg, params = load_model(tmp_path)
    good, _ = model_forward(params, cfg, ids)
    assert rel_err(good, hf_logits(hf, ids)) <= HF_RTOL
    bad, _ = model_forward(params, cfg.replace(rope_scaling=None), ids)
    assert rel_err(bad, hf_logits(hf, ids)) > 100 * HF_RTOL


@pytest.mark.parametrize("name", SCALED_ROPE)
def test_transformers4_and_5_rope_forms_load_alike(name: str, tmp_path: Path) -> None:
    """transformers 5 writes ``rope_parameters``; the same checkpoint spelled the
    transformers-4 way (``rope_theta`` + ``rope_scaling`` with ``type``) loads to the same
    config, and transformers reads it to the same logits."""
    hf = make_hf_model(name, tmp_path / "5")
    cfg5, params = load_model(tmp_path / "5")
    raw = json.loads((tmp_path / "5" / "config.json").read_text())
    rope = dict(raw.pop("rope_parameters"))
    old = {**raw, "rope_theta": rope.pop("rope_theta")}
    old["rope_scaling"] = {"type": rope.pop("rope_type"), **rope}
    hf.save_pretrained(tmp_path / "4", safe_serialization=True)
    (tmp_path / "4" / "config.json").write_text(json.dumps(old))
    assert load_config(tmp_path / "4") == cfg5
    assert cfg5.rope_scaling is not None and cfg5.rope_theta == 500.0
    assert cfg5.rope_scaling.rope_type == old["rope_scaling"]["type"]
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "4").float().eval()
    ids = np.random.default_rng(4).integers(0, V, size=(1, 40))
    assert rel_err(model_forward(params, cfg5, ids)[0], hf_logits(back, ids)) <= HF_RTOL


@pytest.mark.parametrize("name", [*SCALED_ROPE[1:], "mistral-window", "qwen2-window-layers"])
def test_a_wrong_setting_is_caught(name: str, tmp_path: Path) -> None:
    """Dropping the RoPE scaling or the sliding window moves the logits far off
    transformers': the comparisons above could fail."""
    hf = make_hf_model(name, tmp_path)
    ids = np.random.default_rng(1).integers(0, V, size=(1, 40))
    cfg, params = load_model(tmp_path)
    assert rel_err(model_forward(params, cfg, ids)[0], hf_logits(hf, ids)) <= HF_RTOL
    if cfg.rope_scaling is not None:
        wrong = cfg.replace(rope_scaling=None)
    else:
        assert cfg.sliding_window == 4
        wrong = cfg.replace(sliding_window=None, sliding_layers=None)
    bad, _ = model_forward(params, wrong, ids)
    assert rel_err(bad, hf_logits(hf, ids)) > 100 * HF_RTOL


def test_sliding_windows_load_per_layer(tmp_path: Path) -> None:
    make_hf_model("qwen2-window-layers", tmp_path / "qwen2")
    cfg = load_config(tmp_path / "qwen2")
    assert (cfg.sliding_window, cfg.sliding_layers) == (4, (1,))
    assert [cfg.layer_window(i) for i in range(2)] == [None, 4]
    make_hf_model("mistral-window", tmp_path / "mistral")
    cfg = load_config(tmp_path / "mistral")
    assert (cfg.sliding_window, cfg.sliding_layers) == (4, None)
    raw = json.loads((tmp_path / "qwen2" / "config.json").read_text())
    # transformers 4 wrote no layer_types: max_window_layers decides
    del raw["layer_types"]
    (tmp_path / "qwen2" / "config.json").write_text(json.dumps({**raw, "max_window_layers": 0}))
    assert load_config(tmp_path / "qwen2").sliding_layers is None  # every layer
    (tmp_path / "qwen2" / "config.json").write_text(
        json.dumps({**raw, "use_sliding_window": False})
    )
    assert load_config(tmp_path / "qwen2").sliding_window is None


def test_yarn_frequencies_match_transformers() -> None:
    """``rope_frequencies`` and ``rope_attention_factor`` against transformers' own
    ``_compute_yarn_parameters``, across its options."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from ref_numpy.formats.hf import config_from_hf
    from ref_numpy.positional import rope_attention_factor, rope_frequencies

    base = dict(
        vocab_size=V,
        hidden_size=64,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        rope_theta=10000.0,
    )
    cases = [
        {"factor": 4.0, "original_max_position_embeddings": 1024},
        {"factor": 4.0, "original_max_position_embeddings": 1024, "truncate": False},
        {"factor": 8.0, "original_max_position_embeddings": 512, "beta_fast": 16, "beta_slow": 2},
        {"factor": 4.0, "original_max_position_embeddings": 1024, "attention_factor": 0.9},
        {
            "factor": 40.0,
            "original_max_position_embeddings": 4096,
            "mscale": 1.0,
            "mscale_all_dim": 0.707,
        },
        {"factor": None, "original_max_position_embeddings": 512},  # factor = 4096 / 512
    ]
    for case in cases:
        rope = {"rope_type": "yarn", **case}
        hf_cfg = transformers.LlamaConfig(**base, rope_scaling=dict(rope))
        want_freq, want_factor = ROPE_INIT_FUNCTIONS["yarn"](hf_cfg, "cpu")
        cfg = config_from_hf(
            {
                **base,
                "model_type": "llama",
                "num_hidden_layers": 1,
                "intermediate_size": 8,
                "rope_scaling": rope,
            }
        )
        got = rope_frequencies(cfg.hd, cfg.rope_theta, cfg.rope_scaling)
        np.testing.assert_allclose(got, want_freq.double().numpy(), rtol=1e-6, err_msg=str(case))
        assert rope_attention_factor(cfg.rope_scaling) == pytest.approx(want_factor, rel=1e-12)


def test_unknown_rope_types_are_named(tmp_path: Path) -> None:
    make_hf_model("llama-gqa", tmp_path)
    raw = json.loads((tmp_path / "config.json").read_text())
    for field, value in (
        ("rope_scaling", {"type": "dynamic", "factor": 2.0}),
        ("rope_parameters", {"rope_type": "longrope", "rope_theta": 1e4}),
    ):
        (tmp_path / "config.json").write_text(json.dumps({**raw, field: value}))
        kind = value.get("type", value.get("rope_type"))
        with pytest.raises(CheckpointError, match=rf"unsupported {field}.rope_type='{kind}'"):
            load_config(tmp_path)
    bad = {"rope_type": "yarn", "factor": "big", "original_max_position_embeddings": 16}
    (tmp_path / "config.json").write_text(json.dumps({**raw, "rope_parameters": bad}))
    with pytest.raises(CheckpointError, match=r"rope_parameters.factor must be a number"):
        load_config(tmp_path)


@pytest.mark.parametrize("name", ["mistral-window", "qwen2-window-layers", "qwen3"])
def test_greedy_decoding_matches_transformers(name: str, tmp_path: Path) -> None:
    """KV-cache decoding past the sliding window: the engine's greedy tokens and the spec's
    are transformers' (``generate`` with its cache)."""
    from jax_impl.generate import generate
    from jax_impl.model import from_spec
    from ref_numpy.generate import generate as spec_generate

    hf = make_hf_model(name, tmp_path)
    cfg, params = load_model(tmp_path)
    prompt = np.random.default_rng(5).integers(0, V, size=(2, 6))
    with torch.no_grad():
        want = hf.generate(
            torch.tensor(prompt), max_new_tokens=8, do_sample=False, pad_token_id=0
        ).numpy()
    np.testing.assert_array_equal(spec_generate(params, cfg, prompt, 8), want)
    np.testing.assert_array_equal(generate(from_spec(params, cfg), prompt, 8), want)


def test_save_model_writes_what_transformers_reads(tmp_path: Path) -> None:
    """Windows, q/k norms and yarn scaling survive save_model: transformers loads the
    written checkpoint to the same logits, and so do we."""
    for name in ("qwen2-window-layers", "qwen3", "mistral-window", "qwen2-yarn-rope"):
        make_hf_model(name, tmp_path / name)
        cfg, params = load_model(tmp_path / name)
        save_model(params, cfg, tmp_path / f"{name}-out")
        assert load_config(tmp_path / f"{name}-out") == cfg
        back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / f"{name}-out")
        ids = np.random.default_rng(6).integers(0, V, size=(1, 12))
        got = model_forward(params, cfg, ids)[0]
        assert rel_err(got, hf_logits(back.float().eval(), ids)) <= HF_RTOL, name


def test_gpt2_special_ids_outside_a_small_vocab_are_absent(tmp_path: Path) -> None:
    """GPT2Config(vocab_size=97) keeps bos / eos 50256: transformers loads it, and so do we,
    with a warning naming the field, the special tokens treated as absent."""
    import tokenizers

    from jax_impl.train.data import load_tokenizer

    hf = make_hf_model("gpt2", tmp_path)
    raw = json.loads((tmp_path / "config.json").read_text())
    assert (raw["bos_token_id"], raw["eos_token_id"], raw["vocab_size"]) == (50256, 50256, V)
    vocab = {f"w{i}": i for i in range(V)}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="w0"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tok.save(str(tmp_path / "tokenizer.json"))
    with pytest.warns(UserWarning, match=r"config.json: field 'bos_token_id' = 50256 is outside"):
        ours = load_tokenizer(tmp_path)
    assert (ours.bos_id, ours.eos_id, ours.pad_id) == (None, None, None)
    assert ours.encode("w3 w5") == [3, 5]
    cfg, params = load_model(tmp_path)
    ids = np.random.default_rng(7).integers(0, V, size=(1, 9))
    assert rel_err(model_forward(params, cfg, ids)[0], hf_logits(hf, ids)) <= HF_RTOL
    # a Llama-3 style list keeps its first id inside the vocabulary
    (tmp_path / "config.json").write_text(json.dumps({**raw, "eos_token_id": [50256, 7, 9]}))
    with pytest.warns(UserWarning, match=r"field 'eos_token_id' = 50256"):
        assert load_tokenizer(tmp_path).eos_id == 7


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
    with pytest.raises(CheckpointError, match=r"model.safetensors: tensor '.+' ends at .+ trunc"):
        load_model(tmp_path)  # the first tensor the file lacks bytes of
    weights.write_bytes(data)
    raw = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**raw, "model_type": "bert"}))
    with pytest.raises(CheckpointError, match=r"unsupported model_type 'bert'"):
        load_model(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({**raw, "reorder_and_upcast_attn": True}))
    with pytest.raises(CheckpointError, match=r"unsupported reorder_and_upcast_attn=True"):
        load_model(tmp_path)
