"""PEFT adapter files against PEFT itself: ours load in PEFT, PEFT's load in ours, merges load
in transformers, and all give the same float32 logits as the spec.

Each base is a tiny random transformers model (Llama with GQA and untied head, Qwen2 with
q/k/v biases and tied head, GPT-2 with Conv1D and tied head) with weights spread wider than
transformers' default (std 0.3) so logits are far from uniform and an adapter's effect shows.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np
import pytest

from jax_impl.train.checkpoint import load_pretrained
from jax_impl.train.checkpoint import save_adapter as engine_save_adapter
from jax_impl.train.trainer import OptimConfig, Trainer
from ref_numpy.config import LoraConfig
from ref_numpy.formats import hf as hf_io
from ref_numpy.formats.peft import load_adapter, merge_adapter, save_adapter
from ref_numpy.lora import add_lora, join_lora, projections
from ref_numpy.model import model_forward
from tests.helpers import HF_RTOL, rel_err

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.interop

KINDS = ("llama", "qwen2", "gpt2")
SPREAD = 0.3  # std of the random weights; transformers' default 0.02 gives near-uniform logits
IDS = np.random.default_rng(7).integers(0, 53, (3, 7))  # [B,T], B=3, T=7, V=53


def _hf_model(kind: str, n_layers: int = 2) -> Any:
    """A tiny random transformers model of ``kind`` (float32, eval mode)."""
    if kind == "gpt2":
        config: Any = transformers.GPT2Config(
            vocab_size=53, n_embd=15, n_layer=2, n_head=3, n_positions=16, n_inner=37
        )
        model = transformers.GPT2LMHeadModel(config)
    else:
        shape = dict(
            vocab_size=53,
            hidden_size=18,
            num_hidden_layers=n_layers,
            num_attention_heads=3,
            num_key_value_heads=1,  # GQA: G = 3 queries per kv head
            intermediate_size=29,
            max_position_embeddings=32,
        )
        if kind == "llama":
            config = transformers.LlamaConfig(**shape, tie_word_embeddings=False)
            model = transformers.LlamaForCausalLM(config)
        else:
            config = transformers.Qwen2Config(**shape, tie_word_embeddings=True)
            model = transformers.Qwen2ForCausalLM(config)
    gen = torch.Generator().manual_seed(KINDS.index(kind))
    with torch.no_grad():
        for name, p in model.named_parameters():  # tied weights appear once
            if p.ndim == 1 and name.endswith("weight"):  # norm gains around 1
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=gen))
            else:  # matrices, embeddings and biases
                p.copy_(SPREAD * torch.randn(p.shape, generator=gen))
    return model.eval()


@pytest.fixture(scope="module")
def base_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """``{kind: checkpoint dir}`` written by transformers' save_pretrained."""
    root = tmp_path_factory.mktemp("bases")
    out = {}
    for kind in KINDS:
        out[kind] = root / kind
        _hf_model(kind).save_pretrained(out[kind], safe_serialization=True)
    return out


def _logits(model: Any) -> np.ndarray:
    with torch.no_grad():
        return model(input_ids=torch.tensor(IDS)).logits.float().numpy()  # [B,T,V]


def _load_hf(model_dir: Path) -> Any:
    return transformers.AutoModelForCausalLM.from_pretrained(model_dir).float().eval()


def _ours(params: dict[str, Any], cfg: Any, scale: float = 0.0) -> np.ndarray:
    logits, _ = model_forward(params, cfg, IDS, lora_scale=scale)  # [B,T,V]
    return logits


# --- (1) an adapter written by save_adapter loads in PEFT -------------------------------

LLAMA_ALL = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
OUR_CASES = {
    "llama": ("llama", LoraConfig(rank=3, alpha=7.0, targets=LLAMA_ALL)),
    "qwen2-rslora": (
        "qwen2",
        LoraConfig(rank=2, alpha=5.5, targets=("q_proj", "v_proj", "down_proj"), use_rslora=True),
    ),
    "gpt2": ("gpt2", LoraConfig(rank=3, alpha=6.0, targets=("c_attn", "c_proj", "c_fc"))),
    # c_proj of attn only: written as full module names, since "c_proj" would also pick mlp's.
    "gpt2-attn-c_proj": (
        "gpt2",
        LoraConfig(rank=2, alpha=4.0, targets=(r"layers\.\d+\.attn\.c_proj",)),
    ),
}


@pytest.mark.parametrize("case", sorted(OUR_CASES))
def test_our_adapter_in_peft(tmp_path: Path, base_dirs: dict[str, Path], case: str) -> None:
    kind, lora = OUR_CASES[case]
    cfg, base = hf_io.load_model(base_dirs[kind], dtype=np.float64)
    rng = np.random.default_rng(11)
    params = add_lora(base, cfg, lora, rng)
    for _, p in projections(params):
        if "lora_B" in p:
            p["lora_B"] = rng.normal(0.0, SPREAD, p["lora_B"].shape)  # [R,O], non-zero
    ad = save_adapter(
        params, cfg, lora, tmp_path / "ad", base_model_name_or_path=str(base_dirs[kind])
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pm = peft.PeftModel.from_pretrained(_load_hf(base_dirs[kind]), ad).eval()
    complaints = ("unexpected keys", "missing", "fan_in_fan_out")
    assert not [str(w.message) for w in caught if any(c in str(w.message) for c in complaints)]
    # PEFT wrapped exactly the adapted projections and loaded every tensor.
    wrapped = {n for n, m in pm.named_modules() if isinstance(m, peft.tuners.lora.LoraLayer)}
    adapted = {hf_io.module_name(cfg, path) for path, p in projections(params) if "lora_A" in p}
    assert {n.removeprefix("base_model.model.") for n in wrapped} == adapted
    want = _logits(pm)
    got = _ours(params, cfg, lora.scale)
    assert rel_err(got, want) <= HF_RTOL
    assert rel_err(_ours(base, cfg), want) > 100 * HF_RTOL  # the adapter matters
    # A perturbation of one element of one lora_B is seen.
    first = next(p for _, p in projections(params) if "lora_B" in p)
    first["lora_B"][0, 0] += 0.5
    assert rel_err(_ours(params, cfg, lora.scale), want) > HF_RTOL


# --- (2)-(4) an adapter written by PEFT loads in ours; merged checkpoints load in transformers

PEFT_CASES: dict[str, dict[str, Any]] = {
    "llama": dict(r=3, lora_alpha=7, target_modules="all-linear"),
    # A regex over whole module names, one layer only, and rsLoRA.
    "qwen2": dict(
        r=2,
        lora_alpha=5,
        target_modules=r"model\.layers\.1\.self_attn\.(q|v)_proj",
        use_rslora=True,
    ),
    "gpt2": dict(
        r=3, lora_alpha=6, target_modules=["c_attn", "c_proj", "c_fc"], fan_in_fan_out=True
    ),
}


@pytest.fixture(scope="module", params=sorted(PEFT_CASES))
def peft_adapter(
    request: pytest.FixtureRequest,
    base_dirs: dict[str, Path],
    tmp_path_factory: pytest.TempPathFactory,
) -> tuple[str, Path, np.ndarray]:
    """``(kind, adapter dir, PEFT's float32 logits)`` for an adapter PEFT itself saved."""
    kind = request.param
    pconf = peft.LoraConfig(task_type="CAUSAL_LM", **PEFT_CASES[kind])
    pm = peft.get_peft_model(_load_hf(base_dirs[kind]), pconf)
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_B" in name:
                p.copy_(SPREAD * torch.randn(p.shape, generator=gen))  # [O,R], non-zero
    pm.eval()
    ad = tmp_path_factory.mktemp(f"peft_{kind}") / "adapter"
    pm.save_pretrained(ad, safe_serialization=True)
    return kind, ad, _logits(pm)


def test_peft_adapter_in_ours(
    peft_adapter: tuple[str, Path, np.ndarray], base_dirs: dict[str, Path]
) -> None:
    kind, ad, want = peft_adapter
    cfg, base = hf_io.load_model(base_dirs[kind], dtype=np.float64)
    lora, adapters = load_adapter(ad, cfg, dtype=np.float64)
    assert lora.rank == PEFT_CASES[kind]["r"]
    assert lora.use_rslora == PEFT_CASES[kind].get("use_rslora", False)
    params = join_lora(base, adapters)
    got = _ours(params, cfg, lora.scale)
    assert rel_err(got, want) <= HF_RTOL
    assert rel_err(_ours(base, cfg), want) > 100 * HF_RTOL  # the adapter matters
    # (4) a perturbation of one element of one lora_B is detected.
    first = next(iter(adapters))
    adapters[first]["lora_B"][0, 0] += 0.5
    assert rel_err(_ours(join_lora(base, adapters), cfg, lora.scale), want) > HF_RTOL


def test_merged_in_transformers(
    tmp_path: Path, peft_adapter: tuple[str, Path, np.ndarray], base_dirs: dict[str, Path]
) -> None:
    kind, ad, want = peft_adapter
    out = merge_adapter(base_dirs[kind], ad, tmp_path / "merged")
    merged = _load_hf(out)
    assert not any("lora" in name for name, _ in merged.named_parameters())
    got = _logits(merged)
    assert rel_err(got, want) <= HF_RTOL
    base_logits = _logits(_load_hf(base_dirs[kind]))
    assert rel_err(base_logits, want) > 100 * HF_RTOL  # the merge really changed weights


# --- (5) adapters on some layers only, in the engine: PEFT's load, ours train and load in PEFT

PARTIAL_PEFT = {
    "layers_to_transform": dict(target_modules=["q_proj", "v_proj"], layers_to_transform=[0, 2]),
    "regex": dict(target_modules=r".*\.layers\.[02]\.self_attn\.(q_proj|v_proj)"),
}
PARTIAL_OURS = {
    "layers_to_transform": LoraConfig(
        rank=3, alpha=7.0, targets=("q_proj", "v_proj"), layers_to_transform=(0, 2)
    ),
    "regex": LoraConfig(rank=3, alpha=7.0, targets=(r"layers\.[02]\.attn\.(q_proj|v_proj)",)),
}
PARTIAL_MODULES = {f"model.layers.{i}.self_attn.{n}" for i in (0, 2) for n in ("q_proj", "v_proj")}


@pytest.mark.parametrize(
    "fields",
    [
        dict(target_modules=["q_proj", "c_attn"], layers_to_transform=[0, 2]),
        dict(target_modules=["q_proj", "c_proj"], layers_to_transform=1),
        dict(target_modules=["q_proj", "c_attn"], layers_to_transform=[1], layers_pattern="h"),
        dict(
            target_modules=["v_proj", "c_fc"],
            layers_to_transform=[2],
            layers_pattern=["x", "layers"],
        ),
        dict(target_modules=["model.layers.1.self_attn.q_proj", "v_proj"], layers_to_transform=[0]),
        dict(target_modules=["q_proj", "c_proj"], exclude_modules=["layers.1.mlp.c_proj"]),
        dict(target_modules=r".*\.(layers|h)\.[02]\.(self_attn|attn)\.(q_proj|c_attn)"),
    ],
)
def test_peft_selects_is_peft(fields: dict[str, Any]) -> None:
    """Our reading of target_modules / layers_to_transform / layers_pattern / exclude_modules
    against PEFT's own ``check_target_module_exists``, on Llama and GPT-2 module names."""
    from peft.tuners.tuners_utils import check_target_module_exists

    from ref_numpy.config import gpt2_config, llama_config
    from ref_numpy.formats.peft import peft_selects, projection_shapes

    pconf = peft.LoraConfig(**fields)
    shape = dict(vocab_size=11, d_model=8, n_layers=3, n_heads=2, d_ff=7, max_seq_len=8)
    names = [
        hf_io.module_name(cfg, path)
        for cfg in (llama_config(**shape), gpt2_config(**shape))
        for path in projection_shapes(cfg)
    ]
    want = {n for n in names if bool(check_target_module_exists(pconf, n))}
    got = {
        n
        for n in names
        if peft_selects(
            n,
            fields["target_modules"],
            fields.get("exclude_modules"),
            fields.get("layers_to_transform"),
            fields.get("layers_pattern"),
        )
    }
    assert got == want
    assert 0 < len(want) < len(names)


@pytest.fixture(scope="module")
def deep_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A three-layer Llama checkpoint, so a selection can skip a middle layer."""
    out = tmp_path_factory.mktemp("deep") / "llama3layers"
    _hf_model("llama", n_layers=3).save_pretrained(out, safe_serialization=True)
    return out


def _wrapped(pm: Any) -> set[str]:
    """The module names PEFT wrapped with a LoRA layer."""
    names = {n for n, m in pm.named_modules() if isinstance(m, peft.tuners.lora.LoraLayer)}
    return {n.removeprefix("base_model.model.") for n in names}


@pytest.mark.parametrize("case", sorted(PARTIAL_PEFT))
def test_peft_partial_adapter_in_engine(tmp_path: Path, deep_llama: Path, case: str) -> None:
    pconf = peft.LoraConfig(task_type="CAUSAL_LM", r=3, lora_alpha=7, **PARTIAL_PEFT[case])
    pm = peft.get_peft_model(_load_hf(deep_llama), pconf)
    assert _wrapped(pm) == PARTIAL_MODULES
    gen = torch.Generator().manual_seed(6)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_B" in name:
                p.copy_(SPREAD * torch.randn(p.shape, generator=gen))  # [O,R], non-zero
    pm.eval()
    pm.save_pretrained(tmp_path / "ad", safe_serialization=True)
    want = _logits(pm)
    _, model = load_pretrained(deep_llama, adapter_dir=tmp_path / "ad")
    assert model.lora is not None and model.lora.layers_to_transform == (0, 2)
    got = np.asarray(model(jnp.asarray(IDS)))
    assert rel_err(got, want) <= HF_RTOL
    _, base = load_pretrained(deep_llama)
    assert rel_err(np.asarray(base(jnp.asarray(IDS))), want) > 100 * HF_RTOL  # adapters matter
    # A perturbation of one element of layer 2's adapter is seen.
    slot = model.layers.attn.v_proj.lora_B
    slot.set_value(slot.get_value().at[2, 0, 0].add(0.5))
    assert rel_err(np.asarray(model(jnp.asarray(IDS))), want) > HF_RTOL


@pytest.mark.parametrize("case", sorted(PARTIAL_OURS))
def test_engine_trained_partial_adapter_in_peft(
    tmp_path: Path, deep_llama: Path, case: str
) -> None:
    """Train with a layer selection: only the selected adapters move, and the saved adapter
    loads in PEFT with the same selection and the engine's logits."""
    lora = PARTIAL_OURS[case]
    _, model = load_pretrained(deep_llama, lora)
    trainer = Trainer.create(model, OptimConfig(lr=5e-2, total_steps=4, weight_decay=0.1))
    ids = np.asarray(IDS)[None]  # [A,B,T], one micro-batch
    for _ in range(4):
        trainer.step({"input_ids": ids, "labels": ids})
    trained = trainer.model()
    for group, name in (("attn", "q_proj"), ("attn", "v_proj")):
        dense = getattr(getattr(trained.layers, group), name)
        for leaf in ("lora_A", "lora_B"):
            rows = np.asarray(getattr(dense, leaf).get_value())  # [L,.,.]
            assert np.all(rows[1] == 0.0), (name, leaf)  # layer 1 is not selected
            assert np.all(np.any(rows[[0, 2]] != 0.0, axis=(1, 2))), (name, leaf)
    ad = engine_save_adapter(trained, tmp_path / "ad", base_model=deep_llama)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pm = peft.PeftModel.from_pretrained(_load_hf(deep_llama), ad).eval()
    assert not [str(w.message) for w in caught if "missing" in str(w.message).lower()]
    assert pm.peft_config["default"].layers_to_transform == [0, 2]
    assert _wrapped(pm) == PARTIAL_MODULES
    want = _logits(pm)
    got = np.asarray(trained(jnp.asarray(IDS)))
    assert rel_err(got, want) <= HF_RTOL
    _, base = load_pretrained(deep_llama)
    assert rel_err(np.asarray(base(jnp.asarray(IDS))), want) > 10 * HF_RTOL  # training mattered
