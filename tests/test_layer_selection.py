"""Adapters on some layers only (PEFT's ``layers_to_transform``, or targets that name layers).

The engine stacks its layers, so a projection adapted in any layer has an adapter slot in
every layer; the slots of the other layers hold zeros. These tests hold that engine to the
spec (which has adapters in the selected layers only): logits, gradients, training steps with
weight decay and dropout, the trainable-parameter count, and the adapter files it writes.
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors import safe_open

from jax_impl.model import EngineConfig, Model, from_spec, lora_targets, to_spec, trainable_params
from jax_impl.train.checkpoint import load_pretrained, save_adapter
from jax_impl.train.trainer import OptimConfig, Trainer
from ref_numpy import lora as LR
from ref_numpy.config import LoraConfig, llama_config
from ref_numpy.formats.hf import save_model
from ref_numpy.formats.peft import CONFIG_FILE, WEIGHTS_FILE, load_adapter
from ref_numpy.formats.peft import save_adapter as spec_save_adapter
from ref_numpy.model import init_params, loss_and_grads, model_forward
from ref_numpy.optim import adamw_init, adamw_update, clip_by_global_norm, warmup_cosine
from tests.helpers import RTOL, grad_rel_errs, leaves, rel_err
from tests.test_model import CONFIGS, batch, random_params
from tests.test_parity import engine_loss_and_grads, spec_masks
from tests.test_train import A, B, T, batches, put_tree, step_masks, sub_tree

CFG = CONFIGS["llama-gqa-rope3"].replace(n_layers=3)
SELECTIONS = {
    # PEFT's layers_to_transform: the same projections in layers 0 and 2.
    "layers_to_transform": LoraConfig(
        rank=3, alpha=6.0, targets=("q_proj", "v_proj", "down_proj"), layers_to_transform=(0, 2)
    ),
    # Targets that name layers: q and v in layers 0 and 2, down_proj in layer 1 only.
    "regex": LoraConfig(
        rank=3,
        alpha=6.0,
        targets=(r"layers\.[02]\.attn\.(q_proj|v_proj)", r"layers\.1\.mlp\.down_proj"),
    ),
}
X64 = EngineConfig(param_dtype=jnp.float64, dtype=jnp.float64)


def adapted(lora: LoraConfig, rng: np.random.Generator) -> dict[str, Any]:
    """Random spec params with adapters whose B is random too (so every adapter matters)."""
    params = LR.add_lora(random_params(CFG, rng, 0.4), CFG, lora, rng)
    for _, p in LR.projections(params):
        if "lora_B" in p:
            p["lora_B"] += rng.normal(0.0, 0.3, size=p["lora_B"].shape)  # [R,O]
    return params


def selected(lora: LoraConfig) -> set[str]:
    """Every projection path ``lora`` adapts, spelled out by hand for the two selections."""
    if lora.layers_to_transform is not None:
        names = [("attn", "q_proj"), ("attn", "v_proj"), ("mlp", "down_proj")]
        return {f"layers.{i}.{g}.{n}" for i in (0, 2) for g, n in names}
    return {f"layers.{i}.attn.{n}" for i in (0, 2) for n in ("q_proj", "v_proj")} | {
        "layers.1.mlp.down_proj"
    }


def slots(model: Model) -> dict[str, np.ndarray]:
    """``{"layers.i.group.name.lora_X": row i}`` of every stacked adapter leaf of ``model``."""
    out = {}
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.LoRAParam)):
        for i, row in enumerate(np.asarray(var.get_value())):
            out[".".join(map(str, ("layers", i, *path[1:])))] = row
    return out


@pytest.mark.slow
@pytest.mark.parametrize("kind", sorted(SELECTIONS))
def test_engine_equals_spec(kind: str) -> None:
    """float64: logits and gradients (with dropout) equal the spec's; the unused slots get
    exactly zero gradient; to_spec gives back adapters in the selected layers only."""
    lora = dataclasses.replace(SELECTIONS[kind], dropout=0.25)
    rng = np.random.default_rng(31)
    with jax.enable_x64(True):
        params = adapted(lora, rng)
        assert {p for p, d in LR.projections(params) if "lora_A" in d} == selected(lora)
        model = from_spec(params, CFG, lora, X64)
        data = batch(rng)
        ids = jnp.asarray(data["ids"])
        want, _ = model_forward(params, CFG, data["ids"], lora_scale=lora.scale)
        got = np.asarray(model(ids))
        assert rel_err(got, want) <= RTOL["float64"]

        key = jax.random.key(4)
        loss, grads = engine_loss_and_grads(model, data, key, jax.jit)
        want_loss, want_grads = loss_and_grads(
            params,
            CFG,
            data["ids"],
            data["labels"],
            attention_mask_2d=data["attention_mask_2d"],
            lora_scale=lora.scale,
            dropout=spec_masks(key, params, CFG, 0.25),
        )
        assert loss == pytest.approx(want_loss, rel=RTOL["float64"])
        flat = dict(leaves(want_grads))
        unused = {k: g for k, g in grads.items() if k not in flat}
        assert {k.rsplit(".", 1)[0] for k in unused} == {
            f"layers.{i}.{g}.{n}"
            for (g, n), on in lora_targets(CFG, lora).items()
            for i in range(CFG.n_layers)
            if not on[i]
        }
        assert all(np.all(g == 0.0) for g in unused.values()), unused
        errs = grad_rel_errs({k: grads[k] for k in flat}, flat)
        assert max(errs.values()) <= RTOL["float64"], errs

        back = dict(leaves(to_spec(model)))
        for path, leaf in leaves(params):
            np.testing.assert_array_equal(back.pop(path), leaf, err_msg=path)
        assert not back  # no zero slot came back as an adapter

        # A perturbation of one element of the last layer's adapter is seen.
        last = max(selected(lora), key=lambda path: int(path.split(".")[1]))
        dict(LR.projections(params))[last]["lora_B"][0, 0] += 0.1
        moved = np.asarray(from_spec(params, CFG, lora, X64)(ids))
        assert rel_err(moved, got) > 1e3 * RTOL["float64"]


def test_fresh_model_and_trainable_count() -> None:
    """A fresh engine model: PEFT-random A in the selected layers, zero A and B elsewhere, and
    only the selected adapters counted as trainable."""
    lora = SELECTIONS["layers_to_transform"]
    model = Model(CFG, lora, rngs=nnx.Rngs(0))
    rows = slots(model)
    for path, row in rows.items():
        used = path.rsplit(".", 1)[0] in selected(lora)
        if path.endswith("lora_A") and used:
            assert np.all(row != 0.0) and np.all(np.abs(row) <= 1.0 / np.sqrt(row.shape[0]))
        else:
            assert np.all(row == 0.0), path
    want = sum(r.size for p, r in rows.items() if p.rsplit(".", 1)[0] in selected(lora))
    assert trainable_params(model) == want == 2 * 3 * (2 * 10 + 16 + 8 + 14 + 10)
    assert trainable_params(Model(CFG, None, rngs=nnx.Rngs(0))) == sum(
        int(np.prod(np.shape(x))) for _, x in leaves(init_params(CFG, np.random.default_rng(0)))
    )
    assert set(LR.split_lora(to_spec(model))[1]) == selected(lora)


def test_refuses_adapters_outside_the_selection() -> None:
    lora = SELECTIONS["layers_to_transform"]
    params = adapted(lora, np.random.default_rng(32))
    every_layer = dataclasses.replace(lora, layers_to_transform=None)
    everywhere = LR.add_lora(LR.split_lora(params)[0], CFG, every_layer)
    with pytest.raises(ValueError, match=r"layers.1.attn.q_proj: carries an adapter that "):
        from_spec(everywhere, CFG, lora)
    with pytest.raises(
        ValueError, match=r"layers.0.attn.q_proj: carries an adapter that lora=None"
    ):
        from_spec(params, CFG, None)
    model = from_spec(params, CFG, lora)
    slot = model.layers.attn.q_proj.lora_B
    slot.set_value(slot.get_value().at[1, 0, 0].set(1.0))
    with pytest.raises(ValueError, match=r"layers.1.attn.q_proj.lora_B: non-zero, but Lora"):
        to_spec(model)


@pytest.mark.slow
@pytest.mark.parametrize("kind", sorted(SELECTIONS))
def test_training_moves_only_the_selected_adapters(kind: str) -> None:
    """Two Trainer steps (accumulation, clipping, weight decay, dropout) equal the spec's in
    float64; the unused slots and their AdamW moments stay exactly zero, the base is frozen."""
    lora = dataclasses.replace(SELECTIONS[kind], dropout=0.25)
    with jax.enable_x64(True):
        rng = np.random.default_rng(33)
        params = adapted(lora, rng)
        before = {p: d["lora_A"].copy() for p, d in LR.projections(params) if "lora_A" in d}
        opt = OptimConfig(
            lr=3e-2, warmup_steps=1, total_steps=3, weight_decay=0.1, max_grad_norm=0.5
        )
        trainer = Trainer.create(from_spec(params, CFG, lora, X64), opt, dropout_seed=5)
        state = None
        for step, data in enumerate(batches(rng, 2)):
            metrics = trainer.step(data)
            whole = {k: v.reshape(A * B, T) for k, v in data.items()}
            loss, grads = loss_and_grads(
                params,
                CFG,
                whole["input_ids"],
                whole["labels"],
                attention_mask_2d=whole["attention_mask"],
                lora_scale=lora.scale,
                dropout=step_masks(params, CFG, 0.25, 5, step),
            )
            assert float(metrics["loss"]) == pytest.approx(loss, rel=1e-10)
            grads, norm = clip_by_global_norm(grads, opt.max_grad_norm)
            assert float(metrics["grad_norm"]) == pytest.approx(norm, rel=1e-10)
            trainable = sub_tree(params, grads)
            state = adamw_init(trainable) if state is None else state
            lr = warmup_cosine(step, opt.lr, opt.warmup_steps, opt.total_steps)
            trainable, state = adamw_update(grads, state, trainable, lr, weight_decay=0.1)
            put_tree(params, trainable)
        model = trainer.model()
        for path, row in slots(model).items():
            if path.rsplit(".", 1)[0] not in selected(lora):
                assert np.all(row == 0.0), path
        moments = jax.tree_util.tree_flatten_with_path(trainer.opt_state)[0]
        names = r"\['(attn|mlp)'\]\['(\w+)'\]\['lora_[AB]'\]"
        seen = 0
        for key, moment in moments:  # AdamW's mu and nu of every stacked adapter leaf [L,.,.]
            m = re.search(names, jax.tree_util.keystr(key))
            if m is not None:
                for i, on in enumerate(lora_targets(CFG, lora)[(m[1], m[2])]):
                    seen += not on
                    assert on or np.all(np.asarray(moment)[i] == 0.0), (key, i)
        assert seen > 0
        got = dict(leaves(to_spec(model)))
        for path, want in leaves(params):
            assert rel_err(got.pop(path), want) <= 1e-9, path
        assert not got
        for path, a0 in before.items():  # the selected adapters moved
            assert rel_err(dict(LR.projections(params))[path]["lora_A"], a0) > 1e-4, path


def test_adapter_files_hold_the_selected_layers_only(tmp_path: Path) -> None:
    """A partial adapter loads into the engine (load_pretrained) with the spec's logits, and
    the engine writes back only the selected layers' tensors with layers_to_transform."""
    cfg = llama_config(
        vocab_size=31, d_model=12, n_layers=3, n_heads=3, n_kv_heads=1, d_ff=13, max_seq_len=16
    )
    lora = LoraConfig(rank=2, alpha=5.0, targets=("q_proj", "v_proj"), layers_to_transform=(0, 2))
    rng = np.random.default_rng(34)
    base = init_params(cfg, rng, std=0.3)
    save_model(base, cfg, tmp_path / "base")
    params = LR.add_lora(base, cfg, lora, rng)
    for _, p in LR.projections(params):
        if "lora_B" in p:
            p["lora_B"] = rng.normal(0.0, 0.5, p["lora_B"].shape)  # [R,O]
    spec_save_adapter(params, cfg, lora, tmp_path / "ad", base_model_name_or_path="base")
    _, model = load_pretrained(tmp_path / "base", adapter_dir=tmp_path / "ad")
    assert model.lora == lora
    ids = rng.integers(0, cfg.vocab_size, (3, 7))
    want, _ = model_forward(params, cfg, ids, lora_scale=lora.scale)
    assert rel_err(np.asarray(model(jnp.asarray(ids))), want) <= RTOL["float32"]

    out = save_adapter(model, tmp_path / "again", base_model=tmp_path / "base")
    conf = json.loads((out / CONFIG_FILE).read_text())
    assert (conf["target_modules"], conf["layers_to_transform"]) == (["q_proj", "v_proj"], [0, 2])
    with safe_open(str(out / WEIGHTS_FILE), framework="numpy") as f:
        names = sorted(f.keys())
    assert names == sorted(
        f"base_model.model.model.layers.{i}.self_attn.{n}.lora_{x}.weight"
        for i in (0, 2)
        for n in ("q_proj", "v_proj")
        for x in "AB"
    )
    again_lora, again = load_adapter(out, cfg, dtype=np.float64)
    assert again_lora == lora
    for path, ad in LR.split_lora(params)[1].items():
        for leaf in LR.LORA_LEAVES:
            assert rel_err(again[path][leaf], ad[leaf]) <= RTOL["float32"], path
