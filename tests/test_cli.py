"""The command line: merge, quantize and memory, and their errors; loading into the engine."""

from __future__ import annotations

from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

from jax_impl.apps.cli import main
from jax_impl.model import EngineConfig
from jax_impl.train.checkpoint import load_pretrained, save_adapter
from jax_impl.train.orbax_state import TrainCheckpoints
from jax_impl.train.trainer import OptimConfig, Trainer
from ref_numpy import lora as LR
from ref_numpy.config import LoraConfig, llama_config
from ref_numpy.formats.bnb import is_nf4_checkpoint, load_nf4_model
from ref_numpy.formats.hf import load_model, save_model
from ref_numpy.formats.peft import load_adapter
from ref_numpy.formats.peft import save_adapter as spec_save_adapter
from ref_numpy.model import init_params, model_forward
from ref_numpy.nf4 import NF4Tensor
from tests.helpers import rel_err

CFG = llama_config(
    vocab_size=61, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=48, max_seq_len=32
)
LORA = LoraConfig(rank=4, alpha=8.0, targets=("q_proj", "v_proj", "down_proj"))


@pytest.fixture
def base(tmp_path: Path) -> Path:
    save_model(init_params(CFG, np.random.default_rng(0), std=0.3), CFG, tmp_path / "base")
    return tmp_path / "base"


def test_merge(base: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg, params = load_model(base, dtype=np.float64)
    adapted = LR.add_lora(params, cfg, LORA)
    for _, p in LR.projections(adapted):
        if "lora_B" in p:
            p["lora_B"] += np.random.default_rng(1).normal(0, 0.2, p["lora_B"].shape)
    spec_save_adapter(adapted, cfg, LORA, tmp_path / "ad", base_model_name_or_path=str(base))
    args = ["merge", "--model", str(base), "--adapter", str(tmp_path / "ad"), "--out"]
    assert main([*args, str(tmp_path / "merged")]) == 0
    assert "wrote" in capsys.readouterr().out
    _, merged = load_model(tmp_path / "merged", dtype=np.float64)
    ids = np.random.default_rng(2).integers(0, 61, size=(2, 9))
    want, _ = model_forward(adapted, cfg, ids, lora_scale=LORA.scale)
    got, _ = model_forward(merged, cfg, ids)
    assert rel_err(got, want) <= 1e-6  # the merged file is float32
    assert main([*args, str(tmp_path / "merged")]) == 2  # exists, no --overwrite
    assert "exists" in capsys.readouterr().err
    assert main([*args, str(tmp_path / "merged"), "--overwrite"]) == 0


def test_merge_refuses_an_adapter_for_another_base(
    base: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    other = CFG.replace(d_ff=40)
    params = LR.add_lora(init_params(other, np.random.default_rng(3)), other, LORA)
    spec_save_adapter(params, other, LORA, tmp_path / "ad", base_model_name_or_path="x")
    code = main(
        [
            "merge",
            "--model",
            str(base),
            "--adapter",
            str(tmp_path / "ad"),
            "--out",
            str(tmp_path / "m"),
        ]
    )
    assert code == 2
    assert "different base" in capsys.readouterr().err
    assert not (tmp_path / "m").exists()


def test_quantize_then_qlora(base: Path, tmp_path: Path) -> None:
    assert main(["quantize", "--model", str(base), "--out", str(tmp_path / "q")]) == 0
    assert is_nf4_checkpoint(tmp_path / "q")
    _, qparams = load_nf4_model(tmp_path / "q")
    assert isinstance(qparams["layers"][1]["mlp"]["up_proj"]["kernel"], NF4Tensor)
    cfg, model = load_pretrained(tmp_path / "q", LORA)
    assert model.eng.quantize
    ids = np.random.default_rng(4).integers(0, 61, size=(2, 9))
    want, _ = model_forward(LR.add_lora(qparams, cfg, LORA), cfg, ids, lora_scale=LORA.scale)
    assert rel_err(np.asarray(model(jnp.asarray(ids))), want) <= 1e-5
    # a float checkpoint quantized while it streams in gives the same model
    _, streamed = load_pretrained(base, LORA, EngineConfig(quantize=True))
    assert rel_err(np.asarray(streamed(jnp.asarray(ids))), want) <= 1e-5


def test_adapter_and_train_state_round_trip(base: Path, tmp_path: Path) -> None:
    cfg, model = load_pretrained(base, LORA)
    trainer = Trainer.create(model, OptimConfig(lr=1e-2, total_steps=5))
    ids = np.random.default_rng(5).integers(0, 61, size=(1, 2, 9))
    trainer.step({"input_ids": ids, "labels": ids})
    with TrainCheckpoints(tmp_path / "st", async_save=False) as ckpt:
        ckpt.save(1, trainer.params, trainer.opt_state, {"step": 1})
    fresh = Trainer.create(load_pretrained(base, LORA)[1], OptimConfig(lr=1e-2, total_steps=5))
    with TrainCheckpoints(tmp_path / "st") as ckpt:
        params, opt_state, meta = ckpt.restore(fresh.params, fresh.opt_state)
    assert meta == {"step": 1}
    for a, b in zip(jnp_leaves(params), jnp_leaves(trainer.params), strict=True):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(jnp_leaves(opt_state), jnp_leaves(trainer.opt_state), strict=True):
        np.testing.assert_array_equal(a, b)
    save_adapter(trainer.model(), tmp_path / "ad", base_model=base)
    lcfg, adapters = load_adapter(tmp_path / "ad", cfg)
    assert lcfg.rank == 4 and len(adapters) == 2 * 3
    _, again = load_pretrained(base, adapter_dir=tmp_path / "ad")
    x = jnp.asarray(ids[0])
    np.testing.assert_allclose(np.asarray(again(x)), np.asarray(trainer.model()(x)), rtol=1e-6)


def jnp_leaves(tree: object) -> list[np.ndarray]:
    import jax

    return [np.asarray(x) for x in jax.tree.leaves(tree)]


def test_memory_table(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["memory", "--params", "1e9"]) == 0
    out = capsys.readouterr().out
    assert "NF4 + double quant" in out and "4.1270" in out and "4.5000" in out
