"""Multi-device training runs for ``test_sharding.py``, in a process of its own.

Run as ``python -m tests.sharding_worker OUT_DIR`` with
``XLA_FLAGS=--xla_force_host_platform_device_count=8`` (the test sets it, so the rest of the
suite keeps one device). For LoRA and QLoRA it trains one model on one device and on each mesh
of ``MESHES``, writes an orbax checkpoint on ``data=2,fsdp=4`` and resumes it on ``fsdp=8`` and
on one device, and prints one JSON object: loss curves, relative errors against the
one-device run, and where every array lives. The test asserts on it.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jax_impl.model import EngineConfig, Model
from jax_impl.train.orbax_state import TrainCheckpoints
from jax_impl.train.sharding import (
    make_mesh,
    parse_mesh,
    per_device_bytes,
    shard_batch,
    shard_trainer,
)
from jax_impl.train.trainer import OptimConfig, Trainer
from ref_numpy.config import LoraConfig, llama_config

MESHES = ("data=8", "fsdp=8", "data=2,fsdp=4", "data=2,fsdp=2,tensor=2")
SAVE_ON, RESUME_ON = "data=2,fsdp=4", "fsdp=8"
A, B, T, V = 2, 8, 11, 64  # micro-batches, rows (divisible by 8 devices), positions, vocab
STEPS, SAVED_AT = 5, 3  # the one-device run; the sharded runs stop and save at SAVED_AT

# Every width divides by 8 so the 8-way meshes really split it; an NF4 kernel holds at least
# 8 blocks of 64 (k_proj: 32 x 16 weights = 8 blocks).
CFG = llama_config(
    vocab_size=V, d_model=32, n_layers=2, d_ff=64, max_seq_len=16, n_heads=4, n_kv_heads=2,
    head_dim=8,
)  # fmt: skip
LORA = LoraConfig(
    rank=4,
    alpha=8.0,
    dropout=0.1,
    targets=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
)
OPT = OptimConfig(
    lr=1e-2, warmup_steps=1, total_steps=8, eps=1e-6, weight_decay=0.01, max_grad_norm=0.5
)


def data(seed: int) -> list[dict[str, np.ndarray]]:
    """``STEPS`` batches ``[A, B, T]`` with prompt tokens and padding that take no loss."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(STEPS):
        ids = rng.integers(0, V, size=(A, B, T))
        labels = ids.copy()
        labels[:, :, :3] = -100
        mask = np.ones_like(ids)
        mask[1, 5, 8:] = 0
        labels[1, 5, 8:] = -100
        out.append({"input_ids": ids, "labels": labels, "attention_mask": mask})
    return out


def flat(tree: Any) -> dict[str, np.ndarray]:
    """``{dotted path: host array}`` of a state tree."""
    out = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        out[jax.tree_util.keystr(path, simple=True, separator=".")] = np.asarray(leaf)
    return out


def rel_errs(got: Any, want: dict[str, np.ndarray]) -> dict[str, float]:
    """Relative norm error of every leaf of ``got`` against ``want``."""
    out = {}
    for name, g in flat(got).items():
        w = want[name].astype(np.float64)
        out[name] = float(np.linalg.norm(g - w) / max(np.linalg.norm(w), 1e-30))
    return out


def placement(tree: Any) -> dict[str, dict[str, Any]]:
    """Where each array of ``tree`` lives: spec, size, and bytes on each device."""
    out = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        spec = leaf.sharding.spec if hasattr(leaf.sharding, "spec") else None
        out[jax.tree_util.keystr(path, simple=True, separator=".")] = {
            "spec": None if spec is None else list(spec),
            "nbytes": int(leaf.nbytes),
            "device_bytes": sorted(per_device_bytes(leaf).values()),
        }
    return out


def fresh(graphdef: Any, state: Any) -> Trainer:
    """A trainer over a new copy of the initial model state."""
    model = nnx.merge(graphdef, jax.tree.map(jnp.asarray, state))
    return Trainer.create(model, OPT, dropout_seed=7)


def losses(trainer: Trainer, batches: list[dict[str, np.ndarray]]) -> list[float]:
    return [float(trainer.step(b)["loss"]) for b in batches]


def run_method(method: str, out_dir: Path) -> dict[str, Any]:
    eng = EngineConfig(quantize=method == "qlora")
    graphdef, state = nnx.split(Model(CFG, LORA, eng, rngs=nnx.Rngs(3)))
    state = jax.tree.map(np.asarray, state)  # host copy: every run starts from it
    batches = data(11)
    report: dict[str, Any] = {"meshes": {}}

    base = fresh(graphdef, state)
    report["base_losses"] = losses(base, batches[:SAVED_AT])
    at_save = flat(base.params)
    report["base_losses"] += losses(base, batches[SAVED_AT:])
    at_end = flat(base.params)

    # A one-token change of the data must show in the measure the meshes are held to.
    base.params = fresh(graphdef, state).params
    base.opt_state, base.step_count = base.tx.init(base.params), 0
    nudged = [dict(b) for b in batches[:SAVED_AT]]
    nudged[0]["labels"] = nudged[0]["labels"].copy()
    nudged[0]["labels"][0, 0, 5] = (nudged[0]["labels"][0, 0, 5] + 1) % V
    report["nudged_losses"] = losses(base, nudged)
    report["nudged_param_err"] = max(rel_errs(base.params, at_save).values())

    trainers = {}
    ckpt = TrainCheckpoints(out_dir / f"{method}-ckpt")
    for name in MESHES:
        mesh = make_mesh(parse_mesh(name))
        trainer = shard_trainer(fresh(graphdef, state), mesh)
        placed = {
            "params": placement(trainer.params),
            "opt_state": placement(trainer.opt_state),
            "rest": placement(trainer.rest),
        }
        run_losses = losses(trainer, batches[:SAVED_AT])
        report["meshes"][name] = {
            "devices": int(mesh.size),
            "placed": placed,
            "after": {
                "params": placement(trainer.params),
                "opt_state": placement(trainer.opt_state),
            },
            "batch": placement(shard_batch(batches[0], mesh))["input_ids"],
            "losses": run_losses,
            "param_errs": rel_errs(trainer.params, at_save),
        }
        if name == SAVE_ON:
            ckpt.save(SAVED_AT, trainer.params, trainer.opt_state, {"step": SAVED_AT})
            saved = (flat(trainer.params), flat(trainer.opt_state))
        trainers[name] = trainer

    resumed = {}
    for name, trainer in ((RESUME_ON, trainers[RESUME_ON]), ("one-device", base)):
        params, opt_state, meta = ckpt.restore(trainer.params, trainer.opt_state)
        exact = all(
            np.array_equal(flat(got)[k], want[k])
            for got, want in ((params, saved[0]), (opt_state, saved[1]))
            for k in want
        )
        trainer.params, trainer.opt_state, trainer.step_count = params, opt_state, meta["step"]
        resumed[name] = {
            "restored_exactly": exact,
            "spec": placement(trainer.params)["layers.attn.q_proj.lora_A.value"]["spec"],
            "losses": losses(trainer, batches[SAVED_AT:]),
            "param_errs": rel_errs(trainer.params, at_end),
        }
    ckpt.close()
    report["resumed"] = resumed
    report["saved_step"] = sorted(int(p.name) for p in (out_dir / f"{method}-ckpt").iterdir())
    return report


def main() -> None:
    out_dir = Path(sys.argv[1])
    assert jax.device_count() == 8, jax.devices()
    report = {m: run_method(m, out_dir) for m in ("lora", "qlora")}
    try:
        shard_batch({"input_ids": np.zeros((1, 6, 4), np.int32)}, make_mesh(parse_mesh("")))
        report["uneven_batch_error"] = None
    except ValueError as e:
        report["uneven_batch_error"] = str(e)
    print(json.dumps(report))


if __name__ == "__main__":
    main()
