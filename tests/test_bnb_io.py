"""NF4 checkpoints in the transformers + bitsandbytes layout, without torch.

Round trips (save_nf4_model -> load_nf4_model gives back the very NF4 state and params), the
layout written (names, dtypes, shapes, the packed quant-state JSON, config.json), streaming
quantization of a float checkpoint, and refusals with messages that name file and tensor.
The byte-for-byte comparison with what transformers + bitsandbytes save is in
tests/interop/test_bnb_checkpoint.py.
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from ref_numpy.config import ModelConfig, gpt2_config, llama_config
from ref_numpy.formats import bnb as bnb_io
from ref_numpy.formats import hf as hf_io
from ref_numpy.formats.hf import CheckpointError
from ref_numpy.lora import projections
from ref_numpy.model import init_params, model_forward
from ref_numpy.nf4 import DYNAMIC_MAP, NF4_CODE, NF4Tensor, quantize_kernel
from tests.helpers import leaves

# Odd, prime-ish sizes. Llama: GQA, and a d_ff of 701 puts 263 blocks in each MLP weight, so the
# double quantization has two nested blocks, the second partial. GPT-2: head_dim 5 makes every
# weight hold an odd number of values (a padding nibble), and Conv1D kernels are not transposed.
CONFIGS = {
    "llama": llama_config(
        vocab_size=37, d_model=24, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=701, max_seq_len=16
    ),
    "qwen2_tied": llama_config(
        vocab_size=37,
        d_model=24,
        n_layers=1,
        n_heads=4,
        n_kv_heads=1,
        d_ff=40,
        max_seq_len=16,
        bias="qkv",
        tie_embeddings=True,
    ),
    "gpt2": gpt2_config(vocab_size=37, d_model=15, n_layers=2, n_heads=3, d_ff=33, max_seq_len=16),
}
NF4_FIELDS = ("packed", "absmax", "nested_absmax", "nested_code", "offset")


def _params(cfg: ModelConfig, seed: int = 0) -> dict:
    return init_params(cfg, np.random.default_rng(seed))


def _assert_nf4_equal(a: NF4Tensor, b: NF4Tensor) -> None:
    assert (a.shape, a.blocksize, a.nested_blocksize) == (b.shape, b.blocksize, b.nested_blocksize)
    for field in NF4_FIELDS:
        x, y = getattr(a, field), getattr(b, field)
        assert (x is None) == (y is None), field
        if x is not None:
            assert np.asarray(x).dtype == np.asarray(y).dtype, field
            np.testing.assert_array_equal(x, y, err_msg=field)


def _edit(model_dir: Path, fn) -> None:
    """Rewrite model.safetensors through ``fn(state)`` (which edits the dict in place)."""
    path = model_dir / "model.safetensors"
    state = load_file(str(path))
    fn(state)
    save_file(state, str(path), metadata={"format": "pt"})


def _state_json(state: dict, name: str) -> dict:
    return json.loads(state[name + bnb_io.PARTS["quant_state"]].tobytes())


def _set_state_json(state: dict, name: str, obj: dict) -> None:
    raw = json.dumps(obj).encode()
    state[name + bnb_io.PARTS["quant_state"]] = np.frombuffer(raw, np.uint8).copy()


# ---------------------------------------------------------------- round trips


@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize("family", list(CONFIGS))
def test_round_trip_gives_identical_state(tmp_path, family, double_quant):
    cfg = CONFIGS[family]
    params = _params(cfg)
    out = bnb_io.save_nf4_model(params, cfg, tmp_path / "q", double_quant=double_quant)
    assert bnb_io.is_nf4_checkpoint(out)
    cfg2, loaded = bnb_io.load_nf4_model(out)
    assert cfg2 == cfg

    want = dict(projections(params))
    got = dict(projections(loaded))
    assert set(got) == set(want)
    for path, p in want.items():
        q = got[path]["kernel"]
        assert isinstance(q, NF4Tensor), path
        assert q.double_quant == double_quant
        _assert_nf4_equal(q, quantize_kernel(p["kernel"], 64, double_quant))
    # Everything else comes back as float32 (init_params is float64).
    flat = dict(leaves(loaded))
    assert set(flat) == set(dict(leaves(params)))
    for path, value in leaves(params):
        if path.endswith(".kernel") and path.startswith("layers."):
            continue
        assert flat[path].dtype == np.float32, path
        np.testing.assert_array_equal(flat[path], value.astype(np.float32), err_msg=path)
    assert sum(isinstance(v, NF4Tensor) for v in flat.values()) == len(want)

    # The loaded model computes what the in-memory quantized model computes, bit for bit.
    ids = np.random.default_rng(1).integers(0, cfg.vocab_size, size=(3, 7))
    want_logits, _ = model_forward(_quantized(params, double_quant), cfg, ids)
    logits, _ = model_forward(loaded, cfg, ids)
    assert logits.dtype == np.float32
    np.testing.assert_array_equal(logits, want_logits)


def _quantized(params: dict, double_quant: bool) -> dict:
    """float32 params with every block projection quantized in memory."""
    out = copy.deepcopy(params)
    for path, value in leaves(params):
        node = out
        *keys, last = [int(k) if k.isdigit() else k for k in path.split(".")]
        for k in keys:
            node = node[k]
        if path.startswith("layers.") and last == "kernel":
            node[last] = quantize_kernel(value, 64, double_quant)
        else:
            node[last] = value.astype(np.float32)
    return out


def test_resave_is_byte_identical(tmp_path):
    cfg = CONFIGS["llama"]
    first = bnb_io.save_nf4_model(_params(cfg), cfg, tmp_path / "a")
    _, loaded = bnb_io.load_nf4_model(first)  # NF4 kernels are written back as they are
    second = bnb_io.save_nf4_model(loaded, cfg, tmp_path / "b")
    for name in ("model.safetensors", "config.json"):
        assert (first / name).read_bytes() == (second / name).read_bytes(), name


def test_nf4_forward_is_close_to_float_and_differs_from_it(tmp_path):
    cfg = CONFIGS["gpt2"]
    params = _params(cfg)
    _, loaded = bnb_io.load_nf4_model(bnb_io.save_nf4_model(params, cfg, tmp_path / "q"))
    ids = np.random.default_rng(2).integers(0, cfg.vocab_size, size=(3, 7))
    ref, _ = model_forward(params, cfg, ids)
    got, _ = model_forward(loaded, cfg, ids)
    err = np.linalg.norm(got - ref) / np.linalg.norm(ref)
    assert 0 < err < 0.05  # quantized for real, and still the same model


def test_sharded_checkpoint_reads_as_single_file(tmp_path):
    """Each weight's state split over two shards (alternate tensors) still assembles."""
    cfg = CONFIGS["llama"]
    single = bnb_io.save_nf4_model(_params(cfg), cfg, tmp_path / "q")
    state = load_file(str(single / "model.safetensors"))
    sharded = tmp_path / "sharded"
    sharded.mkdir()
    (sharded / "config.json").write_bytes((single / "config.json").read_bytes())
    names = sorted(state)
    weight_map = {}
    for k, file in enumerate(
        ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors")
    ):
        part = {n: state[n] for n in names[k::2]}
        save_file(part, str(sharded / file), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, file))
    index = {"metadata": {}, "weight_map": weight_map}
    (sharded / "model.safetensors.index.json").write_text(json.dumps(index))
    _, a = bnb_io.load_nf4_model(single)
    _, b = bnb_io.load_nf4_model(sharded)
    for (_, pa), (_, pb) in zip(projections(a), projections(b), strict=True):
        _assert_nf4_equal(pa["kernel"], pb["kernel"])
    np.testing.assert_array_equal(a["lm_head"]["kernel"], b["lm_head"]["kernel"])


# ---------------------------------------------------------------- layout


def test_layout_names_dtypes_shapes(tmp_path):
    cfg = CONFIGS["llama"]
    params = _params(cfg)
    out = bnb_io.save_nf4_model(params, cfg, tmp_path / "q", double_quant=True)
    state = load_file(str(out / "model.safetensors"))

    name = "model.layers.1.mlp.down_proj.weight"  # kernel [701, 24]: W [24, 701]
    q = quantize_kernel(params["layers"][1]["mlp"]["down_proj"]["kernel"])
    n_blocks = -(-24 * 701 // 64)
    expect = {
        name: ("uint8", (24 * 701 // 2, 1)),
        name + ".absmax": ("uint8", (n_blocks,)),
        name + ".quant_map": ("float32", (16,)),
        name + ".nested_absmax": ("float32", (2,)),
        name + ".nested_quant_map": ("float32", (256,)),
    }
    for key, (dtype, shape) in expect.items():
        assert (state[key].dtype.name, state[key].shape) == (dtype, shape), key
    np.testing.assert_array_equal(state[name].reshape(-1), q.packed)
    np.testing.assert_array_equal(state[name + ".quant_map"], NF4_CODE)
    np.testing.assert_array_equal(state[name + ".nested_quant_map"], DYNAMIC_MAP)
    raw = state[name + ".quant_state.bitsandbytes__nf4"]
    assert raw.dtype == np.uint8 and raw.ndim == 1
    assert raw.tobytes() == (
        b'{"quant_type": "nf4", "blocksize": 64, "dtype": "float32", "shape": [24, 701], '
        b'"nested_blocksize": 256, "nested_dtype": "float32", "nested_offset": '
        + repr(float(q.offset)).encode()
        + b"}"
    )
    # Not quantized: embeddings, norms and lm_head, in the model dtype and PyTorch layout.
    assert state["model.embed_tokens.weight"].dtype == np.float32
    np.testing.assert_array_equal(
        state["lm_head.weight"], params["lm_head"]["kernel"].T.astype(np.float32)
    )
    assert state["model.norm.weight"].shape == (24,)
    quantized = {k.removesuffix(".quant_state.bitsandbytes__nf4") for k in state if "quant_" in k}
    quantized = {k for k in quantized if not k.endswith((".quant_map", ".nested_quant_map"))}
    assert len(quantized) == 2 * 7 and all(".layers." in k for k in quantized)
    assert len(state) == 2 * 7 * 6 + 2 * 2 + 3  # 6 entries per weight, 2 norms, embed/norm/head

    hf = json.loads((out / "config.json").read_text())
    assert hf["model_type"] == "llama" and hf["torch_dtype"] == "float32"
    assert hf["quantization_config"] == {
        "_load_in_4bit": True,
        "_load_in_8bit": False,
        "bnb_4bit_compute_dtype": "float32",
        "bnb_4bit_quant_storage": "uint8",
        "bnb_4bit_quant_type": "nf4",
        "bnb_4bit_use_double_quant": True,
        "llm_int8_enable_fp32_cpu_offload": False,
        "llm_int8_has_fp16_weight": False,
        "llm_int8_skip_modules": None,
        "llm_int8_threshold": 6.0,
        "load_in_4bit": True,
        "load_in_8bit": False,
        "quant_method": "bitsandbytes",
    }


def test_layout_without_double_quant_gpt2(tmp_path):
    cfg = CONFIGS["gpt2"]
    params = _params(cfg)
    out = bnb_io.save_nf4_model(
        params, cfg, tmp_path / "q", double_quant=False, compute_dtype="bfloat16"
    )
    state = load_file(str(out / "model.safetensors"))
    name = "transformer.h.0.attn.c_attn.weight"  # Conv1D [15, 45]; quantized as W [45, 15]
    n = 45 * 15  # odd: the last byte carries a padding nibble
    assert state[name].shape == ((n + 1) // 2, 1) and state[name].dtype == np.uint8
    assert state[name + ".absmax"].dtype == np.float32
    assert state[name + ".absmax"].shape == (-(-n // 64),)
    assert not any("nested" in k for k in state)
    assert state[name + ".quant_state.bitsandbytes__nf4"].tobytes() == (
        b'{"quant_type": "nf4", "blocksize": 64, "dtype": "float32", "shape": [45, 15]}'
    )
    assert "transformer.h.0.attn.c_attn.bias" in state and "lm_head.weight" not in state
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["bnb_4bit_use_double_quant"] is False
    assert qc["bnb_4bit_compute_dtype"] == "bfloat16"


def test_bfloat16_model_dtype(tmp_path):
    cfg = CONFIGS["llama"]
    params = _params(cfg)
    out = bnb_io.save_nf4_model(params, cfg, tmp_path / "q", dtype=ml_dtypes.bfloat16)
    state = load_file(str(out / "model.safetensors"))
    assert state["model.embed_tokens.weight"].dtype == ml_dtypes.bfloat16
    assert _state_json(state, "model.layers.0.self_attn.q_proj.weight")["dtype"] == "bfloat16"
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"
    _, loaded = bnb_io.load_nf4_model(out)
    want = params["embed"]["embedding"].astype(ml_dtypes.bfloat16).astype(np.float32)
    np.testing.assert_array_equal(loaded["embed"]["embedding"], want)


# ---------------------------------------------------------------- quantize_model


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_quantize_model_equals_save_of_loaded_params(tmp_path, dtype):
    cfg = CONFIGS["llama"]
    src = hf_io.save_model(_params(cfg), cfg, tmp_path / "fp", dtype=np.dtype(dtype))
    (src / "tokenizer.json").write_text('{"model": "tiny"}')
    out = bnb_io.quantize_model(src, tmp_path / "q")
    assert (out / "tokenizer.json").read_text() == '{"model": "tiny"}'
    _, params = hf_io.load_model(src)
    want = bnb_io.save_nf4_model(params, cfg, tmp_path / "want", dtype=np.dtype(dtype))
    assert (out / "model.safetensors").read_bytes() == (want / "model.safetensors").read_bytes()
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == dtype
    assert not bnb_io.is_nf4_checkpoint(src)


def test_quantize_model_fails_fast_on_existing_output(tmp_path):
    cfg = CONFIGS["gpt2"]
    src = hf_io.save_model(_params(cfg), cfg, tmp_path / "fp")
    (tmp_path / "q").mkdir()
    (tmp_path / "q" / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="exists"):
        bnb_io.quantize_model(src, tmp_path / "q")
    assert os.listdir(tmp_path / "q") == ["keep.txt"]
    out = bnb_io.quantize_model(src, tmp_path / "q", overwrite=True)
    assert sorted(os.listdir(out)) == ["config.json", "model.safetensors"]


# ---------------------------------------------------------------- refusals when reading


@pytest.fixture
def saved(tmp_path):
    cfg = CONFIGS["llama"]
    return bnb_io.save_nf4_model(_params(cfg), cfg, tmp_path / "q")


Q = "model.layers.0.self_attn.q_proj.weight"


def test_refuses_fp4_quant_state(saved):
    def to_fp4(state):
        _set_state_json(state, Q, {**_state_json(state, Q), "quant_type": "fp4"})

    _edit(saved, to_fp4)
    with pytest.raises(CheckpointError, match=r"model\.safetensors: tensor .*q_proj.*'fp4'"):
        bnb_io.load_nf4_model(saved)


def test_refuses_fp4_tensor_key(saved):
    def rename(state):
        raw = state.pop(Q + ".quant_state.bitsandbytes__nf4")
        state[Q + ".quant_state.bitsandbytes__fp4"] = raw

    _edit(saved, rename)
    with pytest.raises(CheckpointError, match=r"bitsandbytes__fp4.*only quant_type 'nf4'"):
        bnb_io.load_nf4_model(saved)


def test_refuses_fp4_config(saved):
    path = saved / "config.json"
    hf = json.loads(path.read_text())
    hf["quantization_config"]["bnb_4bit_quant_type"] = "fp4"
    path.write_text(json.dumps(hf))
    assert bnb_io.is_nf4_checkpoint(saved)  # a bnb 4-bit config, refused with a reason below
    with pytest.raises(CheckpointError, match=r"config\.json: unsupported bnb_4bit_quant_type"):
        bnb_io.load_nf4_model(saved)


def test_refuses_misshaped_absmax(saved):
    def cut(state):
        state[Q + ".absmax"] = state[Q + ".absmax"][:-1]

    _edit(saved, cut)
    with pytest.raises(CheckpointError, match=r"q_proj\.weight\.absmax' has uint8 \[8\], expected"):
        bnb_io.load_nf4_model(saved)


def test_refuses_absmax_dtype_that_contradicts_the_state(saved):
    def widen(state):
        state[Q + ".absmax"] = state[Q + ".absmax"].astype(np.float32)

    _edit(saved, widen)
    with pytest.raises(CheckpointError, match=r"absmax' has float32 \[9\], expected uint8"):
        bnb_io.load_nf4_model(saved)


@pytest.mark.parametrize(
    "suffix, match",
    [
        (".quant_map", r"missing tensor '.*q_proj\.weight\.quant_map'"),
        (".nested_absmax", r"q_proj\.weight\.nested_absmax'.*lacks.*double quantization is on"),
        ("", r"missing tensors \['model\.layers\.0\.self_attn\.q_proj\.weight'\]"),
    ],
)
def test_refuses_missing_tensor(saved, suffix, match):
    _edit(saved, lambda state: state.pop(Q + suffix))
    with pytest.raises(CheckpointError, match=match):
        bnb_io.load_nf4_model(saved)


def test_refuses_missing_float_tensor(saved):
    _edit(saved, lambda state: state.pop("model.norm.weight"))
    with pytest.raises(CheckpointError, match=r"missing tensors \['model\.norm\.weight'\]"):
        bnb_io.load_nf4_model(saved)


def test_refuses_weight_without_quant_state(saved):
    _edit(saved, lambda state: state.pop(Q + ".quant_state.bitsandbytes__nf4"))
    with pytest.raises(CheckpointError, match=r"unexpected tensors"):
        bnb_io.load_nf4_model(saved)


def test_refuses_extra_tensor(saved):
    def add(state):
        state["model.layers.0.mlp.extra.weight"] = np.zeros(3, np.float32)

    _edit(saved, add)
    with pytest.raises(
        CheckpointError, match=r"unexpected tensors \['model\.layers\.0\.mlp\.extra"
    ):
        bnb_io.load_nf4_model(saved)


@pytest.mark.parametrize(
    "change, match",
    [
        ({"shape": [24, 23]}, r"has shape \[24, 23\], expected \[24, 24\]"),
        ({"blocksize": 48}, r"has blocksize 48"),
        ({"dtype": "int8"}, r"has dtype 'int8'"),
        ({"nested_blocksize": 128}, r"nested_blocksize 128"),
        ({"surprise": 1}, r"has keys \[.*'surprise'"),
    ],
)
def test_refuses_bad_quant_state_fields(saved, change, match):
    _edit(saved, lambda state: _set_state_json(state, Q, {**_state_json(state, Q), **change}))
    with pytest.raises(CheckpointError, match=r"model\.safetensors: tensor .*q_proj.*" + match):
        bnb_io.load_nf4_model(saved)


def test_refuses_quant_state_that_is_not_json(saved):
    def garble(state):
        state[Q + ".quant_state.bitsandbytes__nf4"] = np.frombuffer(b"{nope", np.uint8).copy()

    _edit(saved, garble)
    with pytest.raises(CheckpointError, match=r"is not UTF-8 JSON"):
        bnb_io.load_nf4_model(saved)


def test_refuses_wrong_code_table(saved):
    def fp4_table(state):
        state[Q + ".quant_map"] = np.linspace(-1, 1, 16, dtype=np.float32)

    _edit(saved, fp4_table)
    with pytest.raises(CheckpointError, match=r"quant_map' is not the NF4 code table"):
        bnb_io.load_nf4_model(saved)


def test_refuses_float_checkpoint(tmp_path):
    cfg = CONFIGS["gpt2"]
    src = hf_io.save_model(_params(cfg), cfg, tmp_path / "fp")
    with pytest.raises(CheckpointError, match=r"config\.json: no bitsandbytes 4-bit"):
        bnb_io.load_nf4_model(src)
    assert not bnb_io.is_nf4_checkpoint(tmp_path / "nowhere")


def test_reads_projection_left_float(saved):
    """transformers can skip modules (llm_int8_skip_modules): those stay float and load."""
    rng = np.random.default_rng(3)
    w = rng.normal(size=(24, 24)).astype(np.float32)  # [out, in]

    def unquantize(state):
        for suffix in ("", *bnb_io.PARTS.values()):
            state.pop(Q + suffix)
        state[Q] = w

    _edit(saved, unquantize)
    _, params = bnb_io.load_nf4_model(saved)
    np.testing.assert_array_equal(params["layers"][0]["attn"]["q_proj"]["kernel"], w.T)
    assert isinstance(params["layers"][0]["attn"]["k_proj"]["kernel"], NF4Tensor)


# ---------------------------------------------------------------- refusals when writing


def _no_leftovers(parent: Path, name: str) -> None:
    assert not any(p.name.startswith((name, f".{name}")) for p in parent.iterdir())


def test_existing_out_dir_is_refused_and_untouched(tmp_path):
    cfg = CONFIGS["gpt2"]
    out = tmp_path / "q"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match=r"q: exists \(pass overwrite"):
        bnb_io.save_nf4_model(_params(cfg), cfg, out)
    assert os.listdir(out) == ["keep.txt"]
    bnb_io.save_nf4_model(_params(cfg), cfg, out, overwrite=True)
    assert sorted(os.listdir(out)) == ["config.json", "model.safetensors"]


def test_nan_kernel_writes_nothing(tmp_path):
    cfg = CONFIGS["llama"]
    params = _params(cfg)
    params["layers"][1]["mlp"]["up_proj"]["kernel"][3, 4] = np.nan
    with pytest.raises(ValueError, match=r"model\.layers\.1\.mlp\.up_proj\.weight: w: .*NaN"):
        bnb_io.save_nf4_model(params, cfg, tmp_path / "q")
    _no_leftovers(tmp_path, "q")


def test_overwrite_failure_keeps_the_old_checkpoint(tmp_path):
    cfg = CONFIGS["gpt2"]
    out = bnb_io.save_nf4_model(_params(cfg), cfg, tmp_path / "q")
    before = (out / "model.safetensors").read_bytes()
    params = _params(cfg, seed=1)
    params["layers"][0]["attn"]["c_attn"]["kernel"][0, 0] = np.inf
    with pytest.raises(ValueError, match="NaN or Inf"):
        bnb_io.save_nf4_model(params, cfg, out, overwrite=True)
    assert (out / "model.safetensors").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q"]


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"dtype": np.float64}, r"dtype: expected one of \['float32', 'float16', 'bfloat16'\]"),
        ({"compute_dtype": "float64"}, r"compute_dtype: expected one of"),
        ({"blocksize": 48}, r"blocksize: expected a power of two"),
    ],
)
def test_bad_settings_write_nothing(tmp_path, kwargs, match):
    cfg = CONFIGS["gpt2"]
    with pytest.raises(ValueError, match=match):
        bnb_io.save_nf4_model(_params(cfg), cfg, tmp_path / "q", **kwargs)
    _no_leftovers(tmp_path, "q")


def test_refuses_lora_adapter_and_mismatched_nf4(tmp_path):
    cfg = CONFIGS["gpt2"]
    params = _params(cfg)
    params["layers"][0]["attn"]["c_attn"]["lora_A"] = np.zeros((15, 2))
    with pytest.raises(ValueError, match=r"layers\.0\.attn\.c_attn: carries a LoRA adapter"):
        bnb_io.save_nf4_model(params, cfg, tmp_path / "q")
    params = _params(cfg)
    mlp = params["layers"][1]["mlp"]
    mlp["c_fc"]["kernel"] = quantize_kernel(mlp["c_fc"]["kernel"], double_quant=False)
    with pytest.raises(ValueError, match=r"h\.1\.mlp\.c_fc\.weight: NF4 kernel .*double_quant"):
        bnb_io.save_nf4_model(params, cfg, tmp_path / "q", double_quant=True)
    _no_leftovers(tmp_path, "q")
    out = bnb_io.save_nf4_model(params, cfg, tmp_path / "q", double_quant=False)
    _, loaded = bnb_io.load_nf4_model(out)
    _assert_nf4_equal(loaded["layers"][1]["mlp"]["c_fc"]["kernel"], mlp["c_fc"]["kernel"])
