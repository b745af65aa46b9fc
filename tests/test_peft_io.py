"""PEFT adapter files without torch: round trips, the layout PEFT expects, refusals, merging.

The interop tests (``tests/interop/test_peft.py``) hold the same files to PEFT itself; these
check the file format and every refusal on tiny random models, fast.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

from ref_numpy.config import LoraConfig, ModelConfig, gpt2_config, llama_config
from ref_numpy.formats import hf as hf_io
from ref_numpy.formats.peft import (
    CONFIG_FILE,
    PICKLE_FILE,
    WEIGHTS_FILE,
    AdapterError,
    load_adapter,
    merge_adapter,
    save_adapter,
)
from ref_numpy.lora import add_lora, join_lora, merge_lora, projections, split_lora
from ref_numpy.model import init_params, model_forward
from tests.helpers import RTOL, rel_err

LLAMA = llama_config(
    vocab_size=29, d_model=12, n_layers=2, n_heads=3, n_kv_heads=1, d_ff=13, max_seq_len=16
)
QWEN = LLAMA.replace(bias="qkv", tie_embeddings=True)
GPT2 = gpt2_config(vocab_size=29, d_model=15, n_layers=2, n_heads=3, d_ff=17, max_seq_len=16)
LLAMA_ALL = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
GPT2_ALL = ("c_attn", "c_proj", "c_fc")
CASES = {
    "llama": (LLAMA, LoraConfig(rank=3, alpha=7.0, targets=LLAMA_ALL)),
    "qwen2-rslora": (
        QWEN,
        LoraConfig(rank=2, alpha=5.5, targets=("q_proj", "v_proj"), use_rslora=True),
    ),
    "gpt2": (GPT2, LoraConfig(rank=3, alpha=6.0, targets=GPT2_ALL, dropout=0.1)),
}


def _adapted(cfg: ModelConfig, lora: LoraConfig, seed: int = 0) -> dict[str, Any]:
    """Random base with an adapter whose B is random (so the adapter changes the output)."""
    rng = np.random.default_rng(seed)
    params = add_lora(init_params(cfg, rng, std=0.3), cfg, lora, rng)
    for _, p in projections(params):
        if "lora_B" in p:
            p["lora_B"] = rng.normal(0.0, 0.5, p["lora_B"].shape)  # [R,O]
    return params


def _save(tmp_path: Path, case: str, name: str = "adapter") -> tuple[ModelConfig, Any, Path]:
    cfg, lora = CASES[case]
    params = _adapted(cfg, lora)
    out = save_adapter(
        params, cfg, lora, tmp_path / name, base_model_name_or_path="tiny", dtype=np.float64
    )
    return cfg, params, out


def _listing(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


# --- round trips and layout -----------------------------------------------------------


@pytest.mark.parametrize("case", sorted(CASES))
def test_round_trip_identical(tmp_path: Path, case: str) -> None:
    cfg, lora = CASES[case]
    cfg, params, out = _save(tmp_path, case)
    got_lora, got = load_adapter(out, cfg, dtype=np.float64)
    _, want = split_lora(params)
    assert list(got) == list(want)  # same paths, layer order
    for path, ad in want.items():
        for leaf in ("lora_A", "lora_B"):
            assert got[path][leaf].dtype == np.float64
            np.testing.assert_array_equal(got[path][leaf], ad[leaf], err_msg=f"{path}.{leaf}")
    assert got_lora.rank == lora.rank
    assert got_lora.alpha == lora.alpha
    assert got_lora.dropout == lora.dropout
    assert got_lora.use_rslora == lora.use_rslora
    assert got_lora.scale == lora.scale
    assert got_lora.targets == tuple(sorted(lora.targets))


@pytest.mark.parametrize("case", sorted(CASES))
def test_layout_is_peft(tmp_path: Path, case: str) -> None:
    """The names, shapes and config fields PEFT 0.21's save_pretrained writes."""
    cfg, lora = CASES[case]
    cfg, params, out = _save(tmp_path, case)
    assert sorted(p.name for p in out.iterdir()) == [CONFIG_FILE, WEIGHTS_FILE]
    conf = json.loads((out / CONFIG_FILE).read_text())
    assert conf["peft_type"] == "LORA" and conf["task_type"] == "CAUSAL_LM"
    assert conf["r"] == lora.rank and conf["lora_alpha"] == lora.alpha
    assert conf["target_modules"] == sorted(lora.targets)
    assert conf["fan_in_fan_out"] is (cfg.family == "gpt2")
    assert conf["use_rslora"] is lora.use_rslora and conf["bias"] == "none"
    assert conf["inference_mode"] is True and conf["base_model_name_or_path"] == "tiny"
    with safe_open(str(out / WEIGHTS_FILE), framework="numpy") as f:
        assert f.metadata()["format"] == "pt"  # and each tensor's checksum (tensorfile)
        assert set(json.loads(f.metadata()["sha256"])) == set(f.keys())
        names = set(f.keys())
        for path, p in projections(params):
            mod = hf_io.module_name(cfg, path)
            a, b = f"base_model.model.{mod}.lora_A.weight", f"base_model.model.{mod}.lora_B.weight"
            if "lora_A" not in p:
                assert a not in names and b not in names
                continue
            np.testing.assert_array_equal(f.get_tensor(a), p["lora_A"].T)  # [R,I]
            np.testing.assert_array_equal(f.get_tensor(b), p["lora_B"].T)  # [O,R]
            names -= {a, b}
        assert not names


def test_gpt2_fused_qkv_names(tmp_path: Path) -> None:
    cfg, _, out = _save(tmp_path, "gpt2")
    with safe_open(str(out / WEIGHTS_FILE), framework="numpy") as f:
        a = f.get_tensor("base_model.model.transformer.h.1.attn.c_attn.lora_A.weight")
        b = f.get_tensor("base_model.model.transformer.h.1.attn.c_attn.lora_B.weight")
    assert a.shape == (3, cfg.d_model) and b.shape == (3 * cfg.d_model, 3)


def test_float32_default(tmp_path: Path) -> None:
    cfg, lora = CASES["llama"]
    params = _adapted(cfg, lora)
    out = save_adapter(params, cfg, lora, tmp_path / "ad", base_model_name_or_path="x")
    _, got = load_adapter(out, cfg)
    _, want = split_lora(params)
    for path, ad in want.items():
        assert got[path]["lora_B"].dtype == np.float32
        np.testing.assert_array_equal(got[path]["lora_B"], ad["lora_B"].astype(np.float32))


@pytest.mark.parametrize(
    ("cfg", "targets", "layers", "written", "written_layers"),
    [
        # GPT-2's c_proj is in attn and mlp: a name alone would select both.
        (
            GPT2,
            (r"layers\.\d+\.attn\.c_proj",),
            None,
            ["transformer.h.0.attn.c_proj", "transformer.h.1.attn.c_proj"],
            None,
        ),
        # Some layers, by regex or by layers_to_transform: short names and the layers.
        (LLAMA, (r"layers\.0\.attn\.[qv]_proj",), None, ["q_proj", "v_proj"], [0]),
        (LLAMA, ("q_proj", "v_proj"), (1,), ["q_proj", "v_proj"], [1]),
        (GPT2, ("c_proj",), (1,), ["c_proj"], [1]),
        # Different projections in different layers: only full names say it.
        (
            LLAMA,
            (r"layers\.0\.attn\.q_proj", r"layers\.1\.mlp\.up_proj"),
            None,
            ["model.layers.0.self_attn.q_proj", "model.layers.1.mlp.up_proj"],
            None,
        ),
    ],
)
def test_subset_written_precisely(
    tmp_path: Path,
    cfg: ModelConfig,
    targets: tuple[str, ...],
    layers: tuple[int, ...] | None,
    written: list[str],
    written_layers: list[int] | None,
) -> None:
    lora = LoraConfig(rank=2, alpha=4.0, targets=targets, layers_to_transform=layers)
    params = _adapted(cfg, lora)
    out = save_adapter(params, cfg, lora, tmp_path / "ad", base_model_name_or_path="x")
    conf = json.loads((out / CONFIG_FILE).read_text())
    assert (conf["target_modules"], conf["layers_to_transform"]) == (written, written_layers)
    got_lora, got = load_adapter(out, cfg, dtype=np.float64)
    assert set(got) == {path for path, p in projections(params) if "lora_A" in p}
    assert got_lora.layers_to_transform == (None if written_layers is None else (*written_layers,))
    base, _ = split_lora(params)
    ids = np.random.default_rng(1).integers(0, cfg.vocab_size, (3, 7))
    want, _ = model_forward(params, cfg, ids, lora_scale=lora.scale)
    logits, _ = model_forward(join_lora(base, got), cfg, ids, lora_scale=got_lora.scale)
    assert rel_err(logits, want) < RTOL["float32"]
    # Saving what was loaded gives the same file selection again.
    again = save_adapter(
        join_lora(base, got), cfg, got_lora, tmp_path / "again", base_model_name_or_path="x"
    )
    conf = json.loads((again / CONFIG_FILE).read_text())
    assert (conf["target_modules"], conf["layers_to_transform"]) == (written, written_layers)


def test_round_trip_forward_and_perturbation(tmp_path: Path) -> None:
    cfg, params, out = _save(tmp_path, "llama")
    lora, adapters = load_adapter(out, cfg, dtype=np.float64)
    base, _ = split_lora(params)
    ids = np.random.default_rng(2).integers(0, cfg.vocab_size, (3, 7))
    want, _ = model_forward(params, cfg, ids, lora_scale=lora.scale)
    got, _ = model_forward(join_lora(base, adapters), cfg, ids, lora_scale=lora.scale)
    assert rel_err(got, want) < RTOL["float64"]
    adapters["layers.1.attn.v_proj"]["lora_B"][0, 0] += 0.1
    moved, _ = model_forward(join_lora(base, adapters), cfg, ids, lora_scale=lora.scale)
    assert rel_err(moved, want) > 1e3 * RTOL["float64"]


# --- refusals: each names the thing, and nothing is written ----------------------------


def test_existing_out_dir(tmp_path: Path) -> None:
    cfg, lora = CASES["llama"]
    params = _adapted(cfg, lora)
    out = tmp_path / "ad"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="ad: exists"):
        save_adapter(params, cfg, lora, out, base_model_name_or_path="x")
    assert _listing(tmp_path) == ["ad", "ad/keep.txt"]
    save_adapter(params, cfg, lora, out, base_model_name_or_path="x", overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == [CONFIG_FILE, WEIGHTS_FILE]


@pytest.mark.parametrize(
    ("change", "match"),
    [
        (
            lambda lora: LoraConfig(rank=lora.rank, targets=("q_proj",)),
            "k_proj: carries an adapter that LoraConfig.targets=.* skips",
        ),
        (lambda lora: LoraConfig(rank=lora.rank, targets=(*LLAMA_ALL, r"layers\.0\..*")), None),
        (
            lambda lora: LoraConfig(rank=4, targets=LLAMA_ALL),
            r"layers\.0\.attn\.q_proj\.lora_A: shape \[12, 3\], expected \[12, 4\]",
        ),
    ],
)
def test_save_refuses_mismatched_lora_config(
    tmp_path: Path, change: Any, match: str | None
) -> None:
    cfg, lora = CASES["llama"]
    params = _adapted(cfg, lora)
    other = change(lora)
    if match is None:  # a redundant target that selects nothing new is fine
        save_adapter(params, cfg, other, tmp_path / "ad", base_model_name_or_path="x")
        return
    with pytest.raises(ValueError, match=match):
        save_adapter(params, cfg, other, tmp_path / "ad", base_model_name_or_path="x")
    assert _listing(tmp_path) == []


def test_save_refuses_no_adapter(tmp_path: Path) -> None:
    params = init_params(LLAMA, np.random.default_rng(0))
    with pytest.raises(ValueError, match="no projection carries a LoRA adapter"):
        save_adapter(
            params,
            LLAMA,
            LoraConfig(targets=LLAMA_ALL),
            tmp_path / "ad",
            base_model_name_or_path="x",
        )
    assert _listing(tmp_path) == []


def test_save_refuses_params_of_another_config(tmp_path: Path) -> None:
    cfg, lora = CASES["llama"]
    params = _adapted(cfg, lora)
    with pytest.raises(ValueError, match="do not match this llama config"):
        save_adapter(
            params, cfg.replace(n_layers=3), lora, tmp_path / "ad", base_model_name_or_path="x"
        )
    assert _listing(tmp_path) == []


def test_different_base_shape(tmp_path: Path) -> None:
    cfg, _, out = _save(tmp_path, "llama")
    name = "base_model.model.model.layers.0.mlp.down_proj.lora_A.weight"
    msg = rf"different base: tensor '{name}' has shape \[3, 13\], expected \[3, 14\]"
    with pytest.raises(AdapterError, match=msg):
        load_adapter(out, cfg.replace(d_ff=14))


@pytest.mark.parametrize(
    ("case", "other", "name"),
    [
        (
            "llama",
            LLAMA.replace(n_layers=1),
            "base_model.model.model.layers.1.mlp.down_proj.lora_A.weight",
        ),
        ("gpt2", LLAMA, "base_model.model.transformer.h.0.attn.c_attn.lora_A.weight"),
    ],
)
def test_different_base_module(tmp_path: Path, case: str, other: ModelConfig, name: str) -> None:
    _, _, out = _save(tmp_path, case)
    if case == "gpt2":  # get past the target_modules check: a list that names no llama module
        _edit_config(out, target_modules=["c_attn", "c_proj", "c_fc", "q_proj"])
    with pytest.raises(AdapterError, match=f"adapter for a different base: {name}"):
        load_adapter(out, other)


def _edit_config(out: Path, **fields: Any) -> None:
    conf = json.loads((out / CONFIG_FILE).read_text())
    (out / CONFIG_FILE).write_text(json.dumps({**conf, **fields}))


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("use_dora", True),
        ("modules_to_save", ["lm_head"]),
        ("bias", "all"),
        ("lora_bias", True),
        ("layers_to_transform", "0"),
        ("layers_to_transform", [True]),
        ("layers_pattern", 3),
        ("layers_pattern", "layers"),  # without layers_to_transform
        ("rank_pattern", {"q_proj": 4}),
        ("alpha_pattern", {"q_proj": 4}),
        ("trainable_token_indices", [1, 2]),
        ("peft_type", "IA3"),
        ("task_type", "SEQ_CLS"),
        ("init_lora_weights", "pissa"),
        ("r", 0),
        ("lora_alpha", None),
        ("target_modules", None),
        ("target_modules", [1]),
    ],
)
def test_unsupported_option(tmp_path: Path, field: str, value: Any) -> None:
    cfg, _, out = _save(tmp_path, "llama")
    _edit_config(out, **{field: value})
    with pytest.raises(
        AdapterError, match=rf"{CONFIG_FILE}: .*{field}={value!r}".replace("[", r"\[")
    ):
        load_adapter(out, cfg)


def test_layers_to_transform_followed(tmp_path: Path) -> None:
    """PEFT's layer selection: an int or a list, the index read after ``layers_pattern`` (or
    the first ``.<word>.<digits>.``), only with a list of names; tensors outside it refused."""
    cfg = LLAMA
    lora = LoraConfig(rank=2, alpha=4.0, targets=("q_proj", "v_proj"), layers_to_transform=(1,))
    out = save_adapter(_adapted(cfg, lora), cfg, lora, tmp_path / "ad", base_model_name_or_path="x")
    for layers, pattern in ((1, "layers"), ([1], ["h", "layers"]), ([1, 5], None)):
        _edit_config(out, layers_to_transform=layers, layers_pattern=pattern)
        got_lora, got = load_adapter(out, cfg)
        assert sorted(got) == ["layers.1.attn.q_proj", "layers.1.attn.v_proj"]
        assert got_lora.layers_to_transform == (1,)
    _edit_config(out, layers_to_transform=[0], layers_pattern=None)  # tensors of layer 1
    with pytest.raises(
        AdapterError,
        match=r"q_proj.lora_A.weight' is for a module that "
        r"target_modules=\['q_proj', 'v_proj'\] with layers_to_transform=\[0\]",
    ):
        load_adapter(out, cfg)
    _edit_config(out, layers_to_transform=[1], layers_pattern="h")  # no "h.<i>." in the names
    with pytest.raises(AdapterError, match="does not select"):
        load_adapter(out, cfg)
    regex = r"model\.layers\.1\.self_attn\.(q|v)_proj"
    _edit_config(out, target_modules=regex, layers_to_transform=[1], layers_pattern=None)
    with pytest.raises(AdapterError, match=r"layers_to_transform=\[1\] with a regex target_mod"):
        load_adapter(out, cfg)
    _edit_config(out, layers_to_transform=None)  # the regex alone selects the same modules
    assert sorted(load_adapter(out, cfg)[1]) == ["layers.1.attn.q_proj", "layers.1.attn.v_proj"]


def test_bad_dropout(tmp_path: Path) -> None:
    cfg, _, out = _save(tmp_path, "llama")
    _edit_config(out, lora_dropout=1.5)
    with pytest.raises(AdapterError, match=f"{CONFIG_FILE}: LoraConfig.dropout: .* got 1.5"):
        load_adapter(out, cfg)


def test_harmless_options_accepted(tmp_path: Path) -> None:
    """What PEFT writes by default (empty patterns, null configs, loftq_config {}) loads."""
    cfg, _, out = _save(tmp_path, "llama")
    defaults = {
        **{"loftq_config": {}, "eva_config": None, "use_dora": False, "task_type": None},
        **{"init_lora_weights": "gaussian", "peft_version": "0.21.2", "rank_pattern": {}},
    }
    _edit_config(out, **defaults)
    load_adapter(out, cfg)


def _drop_tensors(out: Path, *names: str) -> None:
    state = load_file(str(out / WEIGHTS_FILE))
    for name in names:
        del state[name]
    save_file(state, str(out / WEIGHTS_FILE))


def test_missing_tensor(tmp_path: Path) -> None:
    cfg, _, out = _save(tmp_path, "llama")
    name = "base_model.model.model.layers.1.self_attn.o_proj.lora_B.weight"
    _drop_tensors(out, name)
    with pytest.raises(AdapterError, match=f"missing tensor '{name}'"):
        load_adapter(out, cfg)


def test_selected_module_without_tensors(tmp_path: Path) -> None:
    cfg, _, out = _save(tmp_path, "llama")
    mod = "base_model.model.model.layers.0.mlp.up_proj"
    _drop_tensors(out, f"{mod}.lora_A.weight", f"{mod}.lora_B.weight")
    with pytest.raises(AdapterError, match=f"missing tensors '{mod}.lora_A.weight'"):
        load_adapter(out, cfg)


def test_tensor_not_selected_by_target_modules(tmp_path: Path) -> None:
    cfg, _, out = _save(tmp_path, "llama")
    _edit_config(out, target_modules=["q_proj"])
    with pytest.raises(AdapterError, match="target_modules=\\['q_proj'\\] does not select"):
        load_adapter(out, cfg)


def test_exclude_modules_followed(tmp_path: Path) -> None:
    cfg, _, out = _save(tmp_path, "llama")
    _edit_config(out, exclude_modules=["layers.1.mlp.down_proj"])  # PEFT: suffix after a "."
    with pytest.raises(AdapterError, match="layers.1.mlp.down_proj.lora_A.weight' is for a module"):
        load_adapter(out, cfg)


def test_adapter_name_in_tensor_names(tmp_path: Path) -> None:
    cfg, _, out = _save(tmp_path, "llama")
    state = load_file(str(out / WEIGHTS_FILE))
    state = {k.replace(".lora_A.weight", ".lora_A.default.weight"): v for k, v in state.items()}
    save_file(state, str(out / WEIGHTS_FILE))
    with pytest.raises(AdapterError, match="carries the adapter name 'default'"):
        load_adapter(out, cfg)


def test_empty_weights(tmp_path: Path) -> None:
    cfg, _, out = _save(tmp_path, "llama")
    save_file({}, str(out / WEIGHTS_FILE))
    with pytest.raises(AdapterError, match=f"{WEIGHTS_FILE}: holds no LoRA tensors"):
        load_adapter(out, cfg)


def test_pickle_only(tmp_path: Path) -> None:
    cfg, _, out = _save(tmp_path, "llama")
    (out / WEIGHTS_FILE).unlink()
    (out / PICKLE_FILE).write_bytes(b"not read")  # never unpickled, so any bytes will do
    with pytest.raises(AdapterError, match=rf"{PICKLE_FILE}: \.bin .* not read"):
        load_adapter(out, cfg)


def test_missing_files(tmp_path: Path) -> None:
    cfg, _, out = _save(tmp_path, "llama")
    (out / WEIGHTS_FILE).unlink()
    with pytest.raises(AdapterError, match=f"{WEIGHTS_FILE}: no such file"):
        load_adapter(out, cfg)
    with pytest.raises(AdapterError, match=f"{CONFIG_FILE}: no such file"):
        load_adapter(tmp_path / "nowhere", cfg)


# --- merging --------------------------------------------------------------------------


@pytest.mark.parametrize("case", sorted(CASES))
def test_merge_adapter(tmp_path: Path, case: str) -> None:
    cfg, lora = CASES[case]
    params = _adapted(cfg, lora)
    base, _ = split_lora(params)
    hf_io.save_model(base, cfg, tmp_path / "base", dtype=np.float64)
    ad = save_adapter(
        params, cfg, lora, tmp_path / "ad", base_model_name_or_path="base", dtype=np.float64
    )
    out = merge_adapter(tmp_path / "base", ad, tmp_path / "merged", dtype=np.float64)
    got_cfg, merged = hf_io.load_model(out, dtype=np.float64)
    assert got_cfg == cfg
    ids = np.random.default_rng(3).integers(0, cfg.vocab_size, (3, 7))
    want, _ = model_forward(params, cfg, ids, lora_scale=lora.scale)
    got, _ = model_forward(merged, cfg, ids)
    assert rel_err(got, want) < RTOL["float64"] * 1e2  # merged vs unmerged: rounding only
    plain, _ = model_forward(base, cfg, ids)
    assert rel_err(plain, want) > 1e-3  # the adapter really changes the model
    want_merged = dict(projections(merge_lora(params, lora.scale)))
    for path, p in projections(merged):
        np.testing.assert_allclose(p["kernel"], want_merged[path]["kernel"], rtol=1e-12)


def test_merge_refuses(tmp_path: Path) -> None:
    cfg, lora = CASES["llama"]
    params = _adapted(cfg, lora)
    hf_io.save_model(split_lora(params)[0], cfg, tmp_path / "base")
    ad = save_adapter(params, cfg, lora, tmp_path / "ad", base_model_name_or_path="base")
    (tmp_path / "merged").mkdir()
    before = _listing(tmp_path)
    with pytest.raises(FileExistsError, match="merged: exists"):
        merge_adapter(tmp_path / "base", ad, tmp_path / "merged")
    with pytest.raises(ValueError, match="is the model_dir"):
        merge_adapter(tmp_path / "base", ad, tmp_path / "base", overwrite=True)
    _edit_config(ad, r=4)
    with pytest.raises(AdapterError, match="different base"):
        merge_adapter(tmp_path / "base", ad, tmp_path / "m2")
    assert _listing(tmp_path) == before
