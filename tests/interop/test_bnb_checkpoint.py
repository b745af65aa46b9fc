"""Our NF4 checkpoints against what transformers + bitsandbytes save for a 4-bit model.

A tiny random Llama (GQA) and GPT-2 are saved by transformers, then quantized twice: by
transformers (``from_pretrained(..., quantization_config=BitsAndBytesConfig(load_in_4bit=True,
bnb_4bit_quant_type="nf4", ...), device_map="cpu")`` + ``save_pretrained``; 4-bit loading runs on
CPU with bnb 0.50) and by ``bnb_io.quantize_model``. The two files hold the same tensors, names,
dtypes, shapes and bytes, except where bnb's CPU arithmetic differs from the spec:

* the double-quant ``offset`` is torch's float32 mean (another summation order than our float64
  mean rounded once): up to 2 float32 ulps apart, and where it differs the nested absmax
  differs in the last bits and an 8-bit absmax code may move by one step;
* the 8-bit codes themselves come, on CPU, from bnb's C++ ``quantize_blockwise``, whose table
  search sometimes misses the nearest code (see test_nf4_bnb.py). Where offsets are equal, every
  code that differs from ours is checked to be such a miss (bnb's strictly farther from the
  value), and all our codes are checked exactly against bnb's PyTorch reference kernel.

Everything else (packed NF4 bytes, fp32 absmax without double quant, code tables, quant-state
JSON) is equal byte for byte. Then both files are read both ways: ``load_nf4_model`` on
transformers' file dequantizes exactly as bnb's PyTorch reference, bnb's ``QuantState.from_dict``
parses ours, and transformers' 4-bit model gives our logits (float32, 1e-4 relative).
"""

from __future__ import annotations

import json
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import load_file

from ref_numpy.formats import bnb as bnb_io
from ref_numpy.formats.hf import load_config, module_name
from ref_numpy.lora import projections
from ref_numpy.model import model_forward
from ref_numpy.nf4 import DYNAMIC_MAP, NF4_CODE, NF4Tensor, dequantize_nf4, quantize_blockwise
from tests.helpers import HF_RTOL, RTOL, rel_err

torch = pytest.importorskip("torch")
bnb = pytest.importorskip("bitsandbytes")
transformers = pytest.importorskip("transformers")
default_ops = pytest.importorskip("bitsandbytes.backends.default.ops")

from tests.interop.bnb_reference import (  # noqa: E402  (needs bitsandbytes)
    find_reference_quantize_blockwise,
    reference_dequantize_4bit,
)

pytestmark = pytest.mark.interop

F = bnb.functional
F32 = np.float32
QS = ".quant_state.bitsandbytes__nf4"
OFFSET_ULPS = 2  # torch's float32 mean vs our float64 mean rounded once
CPU_MISS_FRACTION = 0.02  # bnb's C++ 8-bit kernel: codes that are not the nearest (measured ~0.5%)

# (family, model dtype, double quant). Odd sizes: Llama d_ff 701 gives 263 blocks per MLP weight
# (two nested blocks); GPT-2 head_dim 5 gives odd value counts (a padding nibble). These compare
# bytes and never run bnb's 4-bit matmul.
CASES = [
    ("llama", "float32", True),
    ("llama", "float32", False),
    ("llama", "bfloat16", True),
    ("gpt2", "float32", True),
    ("gpt2", "float32", False),
]


# Shapes of the models that transformers' 4-bit forward runs on. bitsandbytes' CPU kernel (used
# where the CPU has AVX-512 BF16 or AMX) repacks each 4-bit weight in tiles of 32 output rows
# and keeps one absmax per 64 inputs, so every projection's input and output width here is a
# multiple of 64: Llama q/o 128, k/v 2 x 32 = 64, MLP 192; GPT-2 c_attn 192, c_fc 128.
KERNEL_SHAPES = {
    "llama": dict(hidden_size=128, num_attention_heads=4, intermediate_size=192),
    "gpt2": dict(n_embd=64, n_head=4, n_inner=128),
}
ODD_SHAPES = {
    "llama": dict(hidden_size=24, num_attention_heads=4, intermediate_size=701),
    "gpt2": dict(n_embd=15, n_head=3, n_inner=33),
}


def _hf_model(family: str, shapes: str = "odd"):
    """A tiny random model: ``shapes`` "odd" for byte-level checks, "kernel" for bnb's matmul."""
    torch.manual_seed(0)
    sizes = (KERNEL_SHAPES if shapes == "kernel" else ODD_SHAPES)[family]
    if family == "llama":
        cfg = transformers.LlamaConfig(
            vocab_size=37,
            num_hidden_layers=2,
            num_key_value_heads=2,
            max_position_embeddings=16,
            bos_token_id=1,
            eos_token_id=2,
            **sizes,
        )
        return transformers.LlamaForCausalLM(cfg)
    cfg = transformers.GPT2Config(
        vocab_size=37, n_layer=2, n_positions=16, bos_token_id=1, eos_token_id=2, **sizes
    )
    return transformers.GPT2LMHeadModel(cfg)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """``get(family, dtype, dq, shapes="odd") -> (float dir, transformers' NF4 dir, our NF4
    dir)``, cached."""
    root = tmp_path_factory.mktemp("bnb_ckpt")
    cache: dict[tuple, tuple[Path, Path, Path]] = {}

    def get(family: str, dtype: str, dq: bool, shapes: str = "odd") -> tuple[Path, Path, Path]:
        key = (family, dtype, dq, shapes)
        if key not in cache:
            name = f"{family}_{shapes}_{dtype}"
            fp = root / name
            if not fp.exists():
                _hf_model(family, shapes).to(getattr(torch, dtype)).save_pretrained(fp)
            theirs = root / f"{name}_{dq}_theirs"
            qc = transformers.BitsAndBytesConfig(
                load_in_4bit=True,
                bnb_4bit_quant_type="nf4",
                bnb_4bit_use_double_quant=dq,
                bnb_4bit_compute_dtype=torch.float32,
            )
            model = transformers.AutoModelForCausalLM.from_pretrained(
                fp, quantization_config=qc, device_map="cpu"
            )
            model.save_pretrained(theirs)
            ours = bnb_io.quantize_model(fp, root / f"{name}_{dq}_ours", double_quant=dq)
            cache[key] = (fp, theirs, ours)
        return cache[key]

    return get


@pytest.fixture(scope="module")
def reference_quantize_blockwise():
    """bnb's PyTorch ``quantize_blockwise`` reference (see bnb_reference.py)."""
    fn = find_reference_quantize_blockwise()
    if fn is None:
        pytest.skip("bnb's PyTorch quantize_blockwise reference not found")
    return fn


def _quant_states(path: Path) -> dict[str, tuple]:
    """``{weight name: (packed, QuantState)}`` of a checkpoint, parsed by bnb itself."""
    from safetensors.torch import load_file as load_torch

    state = load_torch(str(path / "model.safetensors"))
    out = {}
    for key in state:
        if key.endswith(QS):
            name = key.removesuffix(QS)
            parts = {k: v for k, v in state.items() if k.startswith(name + ".")}
            out[name] = (state[name], F.QuantState.from_dict(parts, device="cpu"))
    return out


def _ulps(a: float, b: float) -> int:
    ia, ib = (int(np.array(x, F32).view(np.int32)) for x in (a, b))
    return abs(ia - ib)


def _bnb_absmax(fp: Path, name: str, family: str) -> np.ndarray:
    """bnb's fp32 block absmax of the float weight ``name``, as transformers quantizes it."""
    from safetensors.torch import load_file as load_torch

    w = load_torch(str(fp / "model.safetensors"))[name]
    if family == "gpt2":  # Conv1D [in, out] -> the [out, in] weight bnb's Linear4bit holds
        w = w.T.contiguous()
    _, state = F.quantize_4bit(w, blocksize=64, compress_statistics=False, quant_type="nf4")
    return state.absmax.numpy()


# ---------------------------------------------------------------- the bytes


@pytest.mark.parametrize("family, dtype, dq", CASES)
def test_quantize_model_writes_what_transformers_writes(
    checkpoints, reference_quantize_blockwise, family, dtype, dq
):
    fp, theirs_dir, ours_dir = checkpoints(family, dtype, dq)
    ours = load_file(str(ours_dir / "model.safetensors"))
    theirs = load_file(str(theirs_dir / "model.safetensors"))
    assert sorted(ours) == sorted(theirs)
    for name in theirs:  # the JSON's length follows the offset's repr: compared below
        shape_of = (lambda a: a.ndim) if name.endswith(QS) else (lambda a: a.shape)
        assert ours[name].dtype == theirs[name].dtype, name
        assert shape_of(ours[name]) == shape_of(theirs[name]), name

    weights = sorted(k.removesuffix(QS) for k in theirs if k.endswith(QS))
    n_linear = 7 if family == "llama" else 4
    assert len(weights) == 2 * n_linear and all(".layers." in w or ".h." in w for w in weights)
    state_parts = {w + s for w in weights for s in ("", *bnb_io.PARTS.values())}
    for name in theirs:  # embeddings, norms, biases, lm_head: untouched, in the model dtype
        if name not in state_parts:
            assert theirs[name].dtype == np.dtype(getattr(ml_dtypes, dtype, dtype)), name
            assert ours[name].tobytes() == theirs[name].tobytes(), name

    n_codes = n_missed = n_offsets_differ = 0
    for w in weights:
        assert ours[w].tobytes() == theirs[w].tobytes(), w  # packed NF4 indices
        assert ours[w + ".quant_map"].tobytes() == theirs[w + ".quant_map"].tobytes(), w
        js_ours, js_theirs = (
            json.loads(ours[w + QS].tobytes()),
            json.loads(theirs[w + QS].tobytes()),
        )
        assert list(js_ours) == list(js_theirs), w  # same keys, same order
        for key in js_theirs:
            if key != "nested_offset":
                assert js_ours[key] == js_theirs[key], (w, key)
        assert js_theirs["dtype"] == dtype
        if not dq:
            assert ours[w + ".absmax"].tobytes() == theirs[w + ".absmax"].tobytes(), w
            assert ours[w + QS].tobytes() == theirs[w + QS].tobytes(), w
            continue

        nested = w + ".nested_quant_map"
        assert ours[nested].tobytes() == theirs[nested].tobytes(), w
        offset, their_offset = js_ours["nested_offset"], js_theirs["nested_offset"]
        ulps = _ulps(offset, their_offset)
        assert ulps <= OFFSET_ULPS, (w, offset, their_offset)
        codes, their_codes = ours[w + ".absmax"], theirs[w + ".absmax"]
        absmax = _bnb_absmax(fp, w, family)  # bnb's fp32 absmax before double quantization
        n_codes += codes.size

        # Exact: our codes and nested absmax are bnb's PyTorch reference kernel's on our offset.
        ref_codes, ref_nested = reference_quantize_blockwise(
            torch.from_numpy(absmax - F32(offset)), torch.from_numpy(DYNAMIC_MAP.copy()), 256
        )
        np.testing.assert_array_equal(codes, ref_codes.numpy(), err_msg=w)
        np.testing.assert_array_equal(ours[w + ".nested_absmax"], ref_nested.numpy(), err_msg=w)

        if ulps == 0:
            assert ours[w + QS].tobytes() == theirs[w + QS].tobytes(), w
            assert ours[w + ".nested_absmax"].tobytes() == theirs[w + ".nested_absmax"].tobytes()
            # Codes equal, except where bnb's C++ kernel missed the nearest one: its code is then
            # strictly farther from the value than ours.
            diff = np.flatnonzero(codes != their_codes)
            s = np.repeat(ours[w + ".nested_absmax"], 256)[: codes.size][diff].astype(np.float64)
            y = (absmax[diff].astype(np.float64) - offset) / s
            ours_dist = np.abs(DYNAMIC_MAP[codes[diff]] - y)
            their_dist = np.abs(DYNAMIC_MAP[their_codes[diff]] - y)
            assert np.all(their_dist > ours_dist), (w, diff)
            n_missed += diff.size
        else:  # a last-bit shift of every centred value moves a code one step at most
            n_offsets_differ += 1
            np.testing.assert_allclose(
                ours[w + ".nested_absmax"], theirs[w + ".nested_absmax"], rtol=1e-6, err_msg=w
            )
            step = np.abs(codes.astype(int) - their_codes.astype(int))
            assert step.max() <= 1, w
            n_missed += int(np.count_nonzero(step))
    assert n_missed <= max(1, CPU_MISS_FRACTION * n_codes), (n_missed, n_codes)
    if dq:  # the exact branch ran: measured 7 of 14 (Llama f32), 4 of 8 (GPT-2), 0 (bf16) differ
        assert n_offsets_differ < len(weights)


@pytest.mark.parametrize("family, dtype, dq", CASES)
def test_config_and_files_match_transformers(checkpoints, family, dtype, dq):
    _, theirs_dir, ours_dir = checkpoints(family, dtype, dq)
    theirs = json.loads((theirs_dir / "config.json").read_text())
    ours = json.loads((ours_dir / "config.json").read_text())
    assert ours["quantization_config"] == theirs["quantization_config"]
    assert theirs["quantization_config"]["bnb_4bit_use_double_quant"] is dq
    assert ours["torch_dtype"] == theirs["dtype"] == dtype
    assert bnb_io.is_nf4_checkpoint(theirs_dir) and bnb_io.is_nf4_checkpoint(ours_dir)
    assert (ours_dir / "generation_config.json").exists()  # copied from the source
    # Every other field we write agrees with transformers' own config.json.
    for key in ours.keys() - {"quantization_config", "torch_dtype", "rope_theta"}:
        assert ours[key] == theirs[key], key


# ---------------------------------------------------------------- reading both ways


@pytest.mark.parametrize("family, dtype, dq", CASES)
def test_load_transformers_checkpoint_dequantizes_like_bnb(checkpoints, family, dtype, dq):
    _, theirs_dir, ours_dir = checkpoints(family, dtype, dq)
    cfg, params = bnb_io.load_nf4_model(theirs_dir)
    assert cfg == load_config(ours_dir)
    states = _quant_states(theirs_dir)
    kernels = {module_name(cfg, path) + ".weight": p["kernel"] for path, p in projections(params)}
    assert sorted(kernels) == sorted(states)
    for name, (packed, state) in states.items():
        q = kernels[name]
        assert isinstance(q, NF4Tensor) and q.double_quant == dq
        np.testing.assert_array_equal(dequantize_nf4(q), reference_dequantize_4bit(packed, state))


@pytest.mark.parametrize("family, dtype, dq", CASES)
def test_bnb_parses_our_checkpoint(checkpoints, family, dtype, dq):
    _, _, ours_dir = checkpoints(family, dtype, dq)
    cfg, params = bnb_io.load_nf4_model(ours_dir)
    states = _quant_states(ours_dir)
    assert len(states) == len(list(projections(params)))
    for path, p in projections(params):
        packed, state = states[module_name(cfg, path) + ".weight"]
        assert state.quant_type == "nf4" and state.blocksize == 64 and state.nested == dq
        assert state.dtype == getattr(torch, dtype)
        assert tuple(state.shape) == p["kernel"].shape
        np.testing.assert_array_equal(
            dequantize_nf4(p["kernel"]), reference_dequantize_4bit(packed, state)
        )


# bnb's two CPU paths for a 4-bit linear. "fused": the module in eval mode without autograd, as
# for inference; on CPUs with AVX-512 BF16 bnb repacks the weight and runs its fused kernel, which
# rounds activations and absmax to bfloat16 (bf16 tolerance there; elsewhere this is the float32
# path). "dequantize": the 4-bit modules alone in train mode (dropout stays off), where bnb
# dequantizes to float32 and multiplies.
KERNELS = ["fused", "dequantize"]


def _fused_kernel_is_bf16() -> bool:
    return bool(bnb.functional.has_avx512bf16())


def _hf_logits(model_dir: Path, ids: np.ndarray, kernel: str) -> np.ndarray:
    model, info = transformers.AutoModelForCausalLM.from_pretrained(
        model_dir, device_map="cpu", output_loading_info=True
    )
    assert not any(info.get(k) for k in ("missing_keys", "unexpected_keys", "mismatched_keys"))
    linear4bit = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert linear4bit and all(m.weight.quant_state is not None for m in linear4bit)
    model.eval()
    for m in linear4bit:
        m.train(kernel == "dequantize")
    # No skip: whichever CPU kernel bitsandbytes picks must run these shapes, and an error from
    # inside it is a failure to look at, not a pass.
    with torch.no_grad():
        logits = model(torch.from_numpy(ids)).logits.float().numpy()
    packed = [getattr(m.weight.quant_state, "packing_format_for_cpu", False) for m in linear4bit]
    assert all(packed) == (kernel == "fused" and _fused_kernel_is_bf16()), packed
    return logits


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("family, dq", [("llama", True), ("llama", False), ("gpt2", True)])
@pytest.mark.parametrize("which", ["theirs", "ours"])
def test_logits_match_transformers_4bit_model(checkpoints, family, dq, which, kernel):
    """transformers' 4-bit model on either file vs our float32 forward on it."""
    _, theirs_dir, ours_dir = checkpoints(family, "float32", dq, shapes="kernel")
    model_dir = theirs_dir if which == "theirs" else ours_dir
    cfg, params = bnb_io.load_nf4_model(model_dir)
    ids = np.random.default_rng(0).integers(0, cfg.vocab_size, size=(3, 7))
    want = _hf_logits(model_dir, ids, kernel)
    got, _ = model_forward(params, cfg, ids)
    assert got.dtype == np.float32
    bf16 = kernel == "fused" and _fused_kernel_is_bf16()
    assert rel_err(got, want) <= (RTOL["bfloat16"] if bf16 else HF_RTOL)


def test_cpu_absmax_agrees_with_spec_quantize_blockwise(checkpoints):
    """The fp32 absmax bnb computes on CPU is the spec's block max (double quant's input)."""
    fp, _, _ = checkpoints("llama", "float32", True)
    w = load_file(str(fp / "model.safetensors"))["model.layers.0.mlp.down_proj.weight"]
    _, absmax = quantize_blockwise(w.reshape(-1), NF4_CODE, 64)
    np.testing.assert_array_equal(
        absmax, _bnb_absmax(fp, "model.layers.0.mlp.down_proj.weight", "llama")
    )


def test_load_sharded_transformers_checkpoint(checkpoints, tmp_path):
    """transformers' sharded save (5 shards here) reads as its single-file save does."""
    fp, theirs_dir, _ = checkpoints("llama", "float32", True)
    # Quantized afresh: transformers 5.24 cannot save a model it loaded pre-quantized
    # (Bnb4bitDeserialize.reverse_op raises NotImplementedError).
    qc = transformers.BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True
    )
    model = transformers.AutoModelForCausalLM.from_pretrained(
        fp, quantization_config=qc, device_map="cpu"
    )
    model.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").exists()
    _, single = bnb_io.load_nf4_model(theirs_dir)
    _, sharded = bnb_io.load_nf4_model(tmp_path / "sharded")
    for (path, a), (_, b) in zip(projections(single), projections(sharded), strict=True):
        for field in ("packed", "absmax", "nested_absmax", "nested_code"):
            np.testing.assert_array_equal(getattr(a["kernel"], field), getattr(b["kernel"], field))
        assert a["kernel"].offset == b["kernel"].offset, path
    np.testing.assert_array_equal(single["lm_head"]["kernel"], sharded["lm_head"]["kernel"])
