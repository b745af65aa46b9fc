"""Loading straight into shards: ``load_sharded`` equals ``load_pretrained`` placed by the rules,
leaf for leaf and bit for bit (LoRA, QLoRA, NF4 checkpoints), names the file and tensor of a
bad checkpoint, and keeps the host's peak memory to the placed arrays plus one device piece.

The multi-device runs happen in subprocesses (``tests/sharded_load_worker.py``) with 8
simulated CPU devices, so the rest of the suite keeps one device.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import jax
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file, save_file

from jax_impl.model import EngineConfig
from jax_impl.train import sharded_load
from jax_impl.train.checkpoint import load_pretrained
from jax_impl.train.sharded_load import BAND_BYTES, load_sharded
from jax_impl.train.sharding import MeshConfig, make_mesh
from ref_numpy.config import LoraConfig
from ref_numpy.formats import bnb
from ref_numpy.formats.hf import CheckpointError
from tests.helpers import simulated_devices_env
from tests.sharded_load_worker import CASES, MESHES, PERTURB, engine

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

ROOT = Path(__file__).resolve().parents[1]
MIB = 1 << 20
SLACK = 64 * MIB  # what a load may hold beyond its arrays and one device piece


def _tiny(kind: str) -> Any:
    """A small random transformers model; widths divide by 8 so fsdp=8 splits them (Qwen2's
    vocabulary of 97 does not divide: that dimension stays whole)."""
    if kind == "gpt2":
        cfg = transformers.GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=16)
        model = transformers.GPT2LMHeadModel(cfg)
    else:
        cls = transformers.LlamaConfig if kind == "llama" else transformers.Qwen2Config
        cfg = cls(
            vocab_size=64 if kind == "llama" else 97,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=16,
            tie_word_embeddings=kind == "qwen2",
        )
        model = transformers.AutoModelForCausalLM.from_config(cfg)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # every tensor random (biases too), so no comparison is of zeros
        for p in model.parameters():
            p.copy_(0.3 * torch.randn(p.shape, generator=g))
    return model


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """llama (sharded into several files with an index), qwen2 (tied, qkv biases), gpt2
    (Conv1D, fused c_attn), and NF4 checkpoints of llama (double quant) and gpt2 (without)."""
    root = tmp_path_factory.mktemp("sharded_load")
    _tiny("llama").save_pretrained(root / "llama", max_shard_size="20KB")
    _tiny("qwen2").save_pretrained(root / "qwen2")
    _tiny("gpt2").save_pretrained(root / "gpt2")
    bnb.quantize_model(root / "llama", root / "llama-nf4")
    bnb.quantize_model(root / "gpt2", root / "gpt2-nf4", double_quant=False)
    assert len(list((root / "llama").glob("model-*.safetensors"))) > 2
    return root


def one_device_mesh() -> jax.sharding.Mesh:
    return make_mesh(MeshConfig(data=jax.device_count()))


def flat(model: Any) -> dict[str, np.ndarray]:
    return {
        ".".join(map(str, p)): np.asarray(v.get_value())
        for p, v in nnx.to_flat_state(nnx.state(model))
    }


def assert_same(got: Any, want: Any) -> None:
    g, w = flat(got), flat(want)
    assert sorted(g) == sorted(w)
    for name in w:
        assert g[name].dtype == w[name].dtype, name
        assert g[name].shape == w[name].shape, name
        assert np.array_equal(g[name].view(np.uint8), w[name].view(np.uint8)), name
    assert nnx.graphdef(got) == nnx.graphdef(want)


# --- one device, in this process -------------------------------------------------------------


@pytest.mark.parametrize(("ckpt", "method", "lora"), CASES, ids=[f"{c}-{m}" for c, m, _ in CASES])
def test_equals_load_pretrained_on_one_device(
    checkpoints: Path, ckpt: str, method: str, lora: LoraConfig | None
) -> None:
    cfg, want = load_pretrained(checkpoints / ckpt, lora, engine(method))
    got_cfg, got = load_sharded(checkpoints / ckpt, lora, engine(method), one_device_mesh())
    assert got_cfg == cfg
    assert_same(got, want)
    if lora is not None:  # the adapters are really drawn (A) and zero (B)
        a = flat(got)[next(k for k in flat(got) if k.endswith("lora_A"))]
        assert np.abs(a).max() > 0
    if ckpt.endswith("nf4"):  # the NF4 checkpoint's settings win over eng's
        assert got.eng.quantize and got.eng.double_quant == (ckpt == "llama-nf4")


def test_other_nf4_settings_quantize_as_load_pretrained(checkpoints: Path) -> None:
    eng = EngineConfig(quantize=True, double_quant=False, nf4_blocksize=128)
    _, want = load_pretrained(checkpoints / "llama", None, eng)
    _, got = load_sharded(checkpoints / "llama", None, eng, one_device_mesh())
    assert "layers.attn.q_proj.kernel.offset" not in flat(got)
    assert flat(got)["layers.attn.q_proj.kernel.absmax"].shape == (2, 32 * 32 // 128)
    assert_same(got, want)


def test_bfloat16_params_cast_as_load_pretrained_casts(checkpoints: Path) -> None:
    eng = EngineConfig(param_dtype="bfloat16")
    _, want = load_pretrained(checkpoints / "qwen2", LoraConfig(rank=2), eng)
    _, got = load_sharded(checkpoints / "qwen2", LoraConfig(rank=2), eng, one_device_mesh())
    assert flat(got)["embed.embedding"].dtype.name == "bfloat16"
    assert_same(got, want)


def test_bands_of_one_row_read_the_same(checkpoints: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With ``BAND_BYTES`` below one row, every read opens the file for one row of the tensor
    (strided column slices included), and the model is the same."""
    rows: list[int] = []
    honest = sharded_load.read_slice

    def counted(file: Path, name: str, index: Any) -> np.ndarray:
        rows.append(index[0].stop - index[0].start)
        return honest(file, name, index)

    monkeypatch.setattr(sharded_load, "BAND_BYTES", 1)
    monkeypatch.setattr(sharded_load, "read_slice", counted)
    args = (checkpoints / "gpt2", LoraConfig(rank=2), engine("qlora"))
    _, got = load_sharded(*args, one_device_mesh())
    assert BAND_BYTES >= 1 << 20 and set(rows) == {1}
    assert_same(got, load_pretrained(*args)[1])


@pytest.mark.parametrize(
    ("transpose", "d_out", "d_in", "dtype", "blocksize", "double_quant"),
    [
        (True, 131, 97, "float32", 64, True),  # n odd: a padding nibble; 64 rows per block run
        (True, 70, 48, "bfloat16", 32, True),  # 2 rows per block run; cast through float32
        (False, 131, 97, "float16", 64, False),  # GPT-2's Conv1D: the file holds W^T
        (False, 600, 24, "float32", 128, True),  # 16 rows per run; > 256 blocks: 2 nested blocks
    ],
)
def test_quantizing_a_band_at_a_time_gives_the_spec_bytes(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    transpose: bool,
    d_out: int,
    d_in: int,
    dtype: str,
    blocksize: int,
    double_quant: bool,
) -> None:
    """Bands of a few rows, each a whole number of blocks (the last one excepted), give every
    field of the spec's ``quantize_nf4`` of the whole weight ``W [out, in]``, bit for bit."""
    from ref_numpy.formats.hf import HFTensor
    from ref_numpy.nf4 import quantize_nf4

    w = (np.random.default_rng(3).standard_normal((d_out, d_in)) * 0.02).astype(dtype)
    w[5] = 0.0  # an all-zero run of blocks
    stored = w if transpose else np.ascontiguousarray(w.T)
    save_file({"w": stored}, str(tmp_path / "model.safetensors"))
    entry = sharded_load.scan(tmp_path)["w"]
    t = HFTensor("w", ("layers", 0, "attn", "q_proj", "kernel"), stored.shape, transpose)

    bands: list[int] = []
    honest = sharded_load.read_slice

    def counted(file: Path, name: str, index: Any) -> np.ndarray:
        bands.append(index[0 if transpose else 1].stop)  # the last row of W it reaches
        return honest(file, name, index)

    monkeypatch.setattr(sharded_load, "QUANT_BAND_BYTES", 4 * d_in * 5)  # about 5 rows a band
    monkeypatch.setattr(sharded_load, "read_slice", counted)
    got = sharded_load._quantize_weight(t, entry, blocksize, double_quant)
    want = quantize_nf4(w.astype(np.float32), blocksize, double_quant)
    assert len(set(bands)) > 2  # several bands really ran
    assert got.shape == want.shape == (d_out, d_in)
    for field in ("packed", "absmax", "nested_absmax", "nested_code", "offset"):
        g, e = getattr(got, field), getattr(want, field)
        nested = field not in ("packed", "absmax")
        assert (g is None) == (e is None) == (nested and not double_quant), field
        if e is not None:
            g, e = np.atleast_1d(g), np.atleast_1d(e)  # the offset is a scalar
            assert g.dtype == e.dtype and g.shape == e.shape, field
            assert np.array_equal(g.view(np.uint8), e.view(np.uint8)), field
    w[-1, -1] = 1.0  # one value of the last band changed: the bytes differ (the check can fail)
    stored = w if transpose else np.ascontiguousarray(w.T)
    save_file({"w": stored}, str(tmp_path / "model.safetensors"))
    other = sharded_load._quantize_weight(t, entry, blocksize, double_quant)
    assert not np.array_equal(other.packed, want.packed)


# --- bad checkpoints: the same message as the host loader, naming file and tensor ------------


def _edit(src: Path, dst: Path, change: Any) -> Path:
    """A copy of the single-file checkpoint ``src`` with ``change(tensors)`` applied."""
    shutil.copytree(src, dst)
    tensors = load_file(src / "model.safetensors")
    change(tensors)
    save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


def _both_raise(model_dir: Path, method: str = "lora") -> str:
    """The message of load_sharded's error, after checking load_pretrained's is the same."""
    with pytest.raises((CheckpointError, ValueError)) as want:
        load_pretrained(model_dir, None, engine(method))
    with pytest.raises(type(want.value)) as got:
        load_sharded(model_dir, None, engine(method), one_device_mesh())
    assert str(got.value) == str(want.value)
    return str(got.value)


def test_a_missing_tensor_is_named(checkpoints: Path, tmp_path: Path) -> None:
    bad = _edit(checkpoints / "gpt2", tmp_path / "m", lambda t: t.pop("transformer.h.1.ln_2.bias"))
    assert "missing tensors ['transformer.h.1.ln_2.bias']" in _both_raise(bad)


def test_a_wrong_shape_is_named(checkpoints: Path, tmp_path: Path) -> None:
    def change(t: dict[str, np.ndarray]) -> None:
        t["transformer.h.0.mlp.c_fc.weight"] = t["transformer.h.0.mlp.c_fc.weight"][:, :127]

    bad = _edit(checkpoints / "gpt2", tmp_path / "s", change)
    msg = _both_raise(bad)
    assert msg == (
        f"{bad / 'model.safetensors'}: tensor 'transformer.h.0.mlp.c_fc.weight' has shape "
        "[32, 127], expected [32, 128]"
    )


def test_a_non_float_tensor_is_named(checkpoints: Path, tmp_path: Path) -> None:
    def change(t: dict[str, np.ndarray]) -> None:
        t["transformer.wpe.weight"] = t["transformer.wpe.weight"].astype(np.int32)

    bad = _edit(checkpoints / "gpt2", tmp_path / "d", change)
    assert "tensor 'transformer.wpe.weight' has dtype int32, expected a float" in _both_raise(bad)


def test_an_index_entry_its_file_lacks_is_named(checkpoints: Path, tmp_path: Path) -> None:
    bad = tmp_path / "index"
    shutil.copytree(checkpoints / "llama", bad)
    index = json.loads((bad / "model.safetensors.index.json").read_text())
    name = "model.layers.0.mlp.up_proj.weight"
    other = next(
        f for f in sorted(set(index["weight_map"].values())) if f != index["weight_map"][name]
    )
    index["weight_map"][name] = other
    (bad / "model.safetensors.index.json").write_text(json.dumps(index))
    msg = _both_raise(bad)
    assert msg == f"{bad / other}: tensor {name!r} listed in the index is absent"


def test_a_wrong_nf4_code_table_is_named(checkpoints: Path, tmp_path: Path) -> None:
    name = "model.layers.1.self_attn.o_proj.weight.quant_map"

    def change(t: dict[str, np.ndarray]) -> None:
        t[name] = t[name][::-1].copy()

    bad = _edit(checkpoints / "llama-nf4", tmp_path / "q", change)
    assert (
        _both_raise(bad)
        == f"{bad / 'model.safetensors'}: tensor {name!r} is not the NF4 code table"
    )


def test_a_wrong_nf4_absmax_is_named(checkpoints: Path, tmp_path: Path) -> None:
    name = "model.layers.0.mlp.down_proj.weight.absmax"

    def change(t: dict[str, np.ndarray]) -> None:
        t[name] = t[name].astype(np.float32)

    bad = _edit(checkpoints / "llama-nf4", tmp_path / "a", change)
    want = f"tensor {name!r} has float32 [32], expected uint8 [32]"
    assert want in _both_raise(bad)


def test_a_float_projection_in_an_nf4_checkpoint_is_refused(
    checkpoints: Path, tmp_path: Path
) -> None:
    name = "model.layers.0.self_attn.v_proj.weight"
    floats: dict[str, np.ndarray] = {}
    for f in (checkpoints / "llama").glob("model-*.safetensors"):
        floats |= load_file(f)

    def change(t: dict[str, np.ndarray]) -> None:
        for key in [k for k in t if k.startswith(name)]:
            del t[key]
        t[name] = floats[name]

    bad = _edit(checkpoints / "llama-nf4", tmp_path / "f", change)
    with pytest.raises(CheckpointError, match=f"tensor '{name}' is not quantized"):
        load_sharded(bad, None, engine("qlora"), one_device_mesh())


def test_nan_in_a_weight_to_quantize_is_named(checkpoints: Path, tmp_path: Path) -> None:
    name = "transformer.h.1.attn.c_proj.weight"

    def change(t: dict[str, np.ndarray]) -> None:
        t[name][3, 5] = np.nan

    bad = _edit(checkpoints / "gpt2", tmp_path / "n", change)
    with pytest.raises(ValueError, match="NaN or Inf"):
        load_pretrained(bad, None, engine("qlora"))
    with pytest.raises(CheckpointError, match=f"tensor '{name}' contains NaN or Inf"):
        load_sharded(bad, None, engine("qlora"), one_device_mesh())
    load_sharded(bad, None, engine("lora"), one_device_mesh())  # float: loads as it is


# --- 8 simulated devices, in subprocesses -------------------------------------------------


def worker(*args: str, timeout: int = 600) -> dict[str, Any]:
    env = simulated_devices_env(8)
    proc = subprocess.run(
        [sys.executable, "-m", "tests.sharded_load_worker", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    report: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return report


@pytest.fixture(scope="module")
def meshes(checkpoints: Path) -> dict[str, Any]:
    """The worker's report of every case on every mesh (see ``sharded_load_worker.py``)."""
    return worker("equality", str(checkpoints))


CASE_IDS = [f"{c}/{m}/{mesh}" for mesh in MESHES for c, m, _ in CASES]


@pytest.mark.slow
@pytest.mark.parametrize("case", CASE_IDS)
def test_every_leaf_equals_load_pretrained_placed_by_the_rules(
    meshes: dict[str, Any], case: str
) -> None:
    """Bytes, dtype, shape, sharding and every device's piece, against load_pretrained +
    shard_state; and the same module structure."""
    report = meshes["cases"][case]
    assert report["differ"] == []
    assert report["graphdef_equal"]


# Where a few arrays live, and into how many pieces they are cut.
LAYOUT = {
    "llama/lora/fsdp=8": {
        "embed.embedding": ([None, "fsdp"], 8),
        "lm_head.kernel": (["fsdp", None], 8),
        "layers.attn.q_proj.kernel": ([None, "fsdp", None], 8),
        "layers.attn.q_proj.lora_A": ([None, "fsdp", None], 8),
        "layers.mlp.down_proj.kernel": ([None, None, "fsdp"], 8),
        "layers.attn_norm.weight": ([None, "fsdp"], 8),
    },
    "llama/qlora/fsdp=8": {
        "layers.attn.k_proj.kernel.packed": ([None, "fsdp"], 8),
        "layers.attn.k_proj.kernel.absmax": ([None, "fsdp"], 8),
        "layers.attn.k_proj.kernel.nested_code": ([None, None], 1),
        "layers.attn.k_proj.kernel.offset": ([None], 1),
    },
    "llama-nf4/qlora/data=2,fsdp=2,tensor=2": {
        "layers.mlp.up_proj.kernel.packed": ([None, "fsdp"], 2),
        "lm_head.kernel": (["fsdp", "tensor"], 4),
    },
    "qwen2/lora/data=2,fsdp=2,tensor=2": {
        "embed.embedding": ([None, "fsdp"], 2),  # 97 rows do not divide over tensor
        "layers.attn.q_proj.bias": ([None, "tensor"], 2),
        "layers.attn.v_proj.lora_B": ([None, None, "tensor"], 2),
    },
    "gpt2/qlora/data=2,fsdp=2,tensor=2": {
        "pos_embed.embedding": ([None, "fsdp"], 2),
        "layers.attn.c_attn.kernel.packed": ([None, "fsdp"], 2),
        "layers.attn.c_attn.lora_B": ([None, None, "tensor"], 2),
    },
}


@pytest.mark.slow
@pytest.mark.parametrize("case", list(LAYOUT))
def test_arrays_are_really_sharded(meshes: dict[str, Any], case: str) -> None:
    placement = meshes["cases"][case]["placement"]
    for name, (spec, pieces) in LAYOUT[case].items():
        got = placement[name]
        assert got["spec"] == spec, name
        assert len(got["device_bytes"]) == 8, name
        assert set(got["device_bytes"]) == {got["nbytes"] // pieces}, name


@pytest.mark.slow
@pytest.mark.parametrize("perturb", PERTURB, ids=[p[0] + "/" + p[1] for p in PERTURB])
def test_a_wrong_slice_is_caught(meshes: dict[str, Any], perturb: tuple[str, ...]) -> None:
    """A reader that reverses the rows of one tensor's pieces makes exactly its leaf differ:
    the comparison above can fail."""
    ckpt, method, tensor, leaf = perturb
    assert meshes["perturbed"][f"{ckpt}/{method}/{tensor}"]["differ"] == [leaf]


# --- memory --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def big(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("big") / "model"
    worker("make", str(out))
    return out


@pytest.mark.slow
def test_peak_host_memory_stays_within_the_placed_arrays_and_one_piece(big: Path) -> None:
    """On CPU the devices' arrays live in host memory, so the bound counts them: the peak
    resident set may grow by the bytes the placed arrays hold, plus the largest single device
    piece, plus ``SLACK``. Loading on the host first and then placing (``load_pretrained`` +
    ``shard_state``) goes over the same bound."""
    sharded = worker("memory", "sharded", str(big))
    if "unsupported" in sharded:
        pytest.skip(sharded["unsupported"])
    naive = worker("memory", "naive", str(big))
    assert sharded["held"] == naive["held"] >= sharded["model_bytes"] > 120 * MIB
    bound = sharded["held"] + sharded["largest_piece"] + SLACK
    assert sharded["largest_piece"] <= sharded["model_bytes"] // 8
    assert sharded["held"] * 0.95 <= sharded["growth"] <= bound, sharded
    assert naive["growth"] > bound, naive


# Loading a float checkpoint for QLoRA may hold this much beyond loading its NF4 checkpoint:
# one projection's stacked NF4 state on the host before it is placed (3 MiB for ``deep``),
# the quantizer's temporaries of one band of rows (1.5 MiB) and the allocator's slack.
QLORA_SLACK = 10 * MIB


@pytest.fixture(scope="module")
def deep(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The float32 checkpoint of ``DEEP`` (about 110 MB) and its NF4 checkpoint (19 MB)."""
    root = tmp_path_factory.mktemp("deep")
    worker("make", str(root / "float"), "deep")
    bnb.quantize_model(root / "float", root / "nf4")
    return root / "float", root / "nf4"


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["sharded", "host"])
def test_qlora_from_a_float_checkpoint_peaks_as_low_as_from_its_nf4_checkpoint(
    deep: tuple[Path, Path], mode: str
) -> None:
    """Quantizing at load compiles nothing and holds no float copy of the model (nor its
    file's pages): the peak resident set grows by no more than loading the NF4 checkpoint
    does, plus ``QLORA_SLACK``, on ``fsdp=8`` (``load_sharded``) and on one device
    (``load_pretrained``). On the mesh that is the placed arrays (under a quarter of the
    float model) plus the slack; the host loader stays below the float model's size."""
    float_dir, nf4_dir = deep
    from_float = worker("memory", mode, str(float_dir), "qlora")
    if "unsupported" in from_float:
        pytest.skip(from_float["unsupported"])
    from_nf4 = worker("memory", mode, str(nf4_dir), "qlora")
    held, model_bytes = from_float["held"], from_float["model_bytes"]
    assert from_nf4["held"] == held and 4 * held < model_bytes > 100 * MIB
    assert from_nf4["growth"] >= 0.95 * held  # the measurement sees the arrays
    assert from_float["growth"] <= from_nf4["growth"] + QLORA_SLACK, (from_float, from_nf4)
    if mode == "sharded":
        assert from_float["growth"] <= held + QLORA_SLACK, from_float
    else:
        assert from_float["growth"] < model_bytes, from_float
