"""Multi-device loads for ``test_sharded_load.py``, in a process of its own.

Run with ``XLA_FLAGS=--xla_force_host_platform_device_count=8`` (the test sets it):

* ``python -m tests.sharded_load_worker equality ROOT``: loads the checkpoints under ROOT
  (written by the test) with ``load_sharded`` and with ``load_pretrained`` + ``shard_state``
  on each mesh of ``MESHES``, LoRA and QLoRA, and again with a reader that returns one wrong
  slice; prints one JSON object: per case, the leaves that differ and where each array lives.
* ``python -m tests.sharded_load_worker make DIR [big|deep]``: writes the random float32
  checkpoint of ``BIG`` (about 150 MB) or ``DEEP`` (about 110 MB) to DIR.
* ``python -m tests.sharded_load_worker memory {sharded,naive,host} DIR [lora|qlora]``: loads
  DIR on ``fsdp=8`` (LoRA by default; ``host``: ``load_pretrained`` alone, on one device) and
  prints the growth of the peak resident set during the
  load (``VmHWM`` after resetting it), the bytes the placed arrays hold, the largest single
  device piece and the float32 bytes of the model.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from jax_impl.model import EngineConfig, Model
from jax_impl.train import sharded_load
from jax_impl.train.checkpoint import load_pretrained
from jax_impl.train.sharded_load import load_sharded
from jax_impl.train.sharding import make_mesh, parse_mesh, shard_state
from ref_numpy.config import LoraConfig, ModelConfig, llama_config
from ref_numpy.formats import hf

MESHES = ("fsdp=8", "data=2,fsdp=2,tensor=2")
LORA = LoraConfig(rank=4, alpha=8.0, seed=5)
# Adapters on some projections of layer 1 only: the other slots are zeros.
SOME = LoraConfig(rank=3, targets=("q_proj", "v_proj"), layers_to_transform=(1,))
SOME_GPT2 = LoraConfig(rank=3, targets=("c_attn",), layers_to_transform=(1,))
# (checkpoint, method, LoRA config): the checkpoints test_sharded_load.py writes.
CASES: tuple[tuple[str, str, LoraConfig | None], ...] = (
    ("llama", "lora", LORA),
    ("llama", "qlora", LORA),
    ("qwen2", "lora", SOME),
    ("qwen2", "qlora", LORA),
    ("gpt2", "lora", LORA),
    ("gpt2", "qlora", SOME_GPT2),
    ("llama-nf4", "qlora", LORA),
    ("gpt2-nf4", "qlora", None),
)
# A reader that reverses the rows it returns for one tensor, and the leaf that must then differ.
PERTURB = (
    ("llama", "lora", "model.layers.1.self_attn.q_proj.weight", "layers.attn.q_proj.kernel"),
    ("gpt2", "qlora", "transformer.h.0.mlp.c_fc.weight", "layers.mlp.c_fc.kernel.packed"),
    ("llama-nf4", "qlora", "model.layers.1.mlp.up_proj.weight", "layers.mlp.up_proj.kernel.packed"),
)

# ~150 MB of float32 weights; every width divides by 8, so fsdp=8 splits every matrix.
BIG = llama_config(
    vocab_size=8192, d_model=768, n_layers=4, d_ff=2048, max_seq_len=64, n_heads=12,
    n_kv_heads=4, head_dim=64, tie_embeddings=False,
)  # fmt: skip
# ~110 MB of float32 weights, 94% of them in the projections: QLoRA holds a fifth of it.
DEEP = llama_config(
    vocab_size=2048, d_model=768, n_layers=4, d_ff=2048, max_seq_len=64, n_heads=12,
    n_kv_heads=4, head_dim=64, tie_embeddings=True,
)  # fmt: skip
MODELS = {"big": BIG, "deep": DEEP}


def engine(method: str) -> EngineConfig:
    return EngineConfig(quantize=method == "qlora")


def leaves(model: Model, mesh: Any = None) -> dict[str, jax.Array]:
    """``{dotted path: array}`` of a model's state, placed on ``mesh`` by the rules if given."""
    state = nnx.state(model)
    if mesh is not None:
        state = shard_state(state, mesh)
    return {".".join(map(str, path)): var.get_value() for path, var in nnx.to_flat_state(state)}


def differences(got: dict[str, jax.Array], want: dict[str, jax.Array]) -> list[str]:
    """The leaves whose bytes, dtype, shape, sharding or device pieces differ."""
    if sorted(got) != sorted(want):
        return [f"leaf names differ: {sorted(set(got) ^ set(want))}"]
    out = []
    for name, g in got.items():
        w = want[name]
        wn, gn = np.asarray(w), np.asarray(g)
        same = (
            gn.dtype == wn.dtype
            and gn.shape == wn.shape
            and np.array_equal(gn.view(np.uint8), wn.view(np.uint8))
            and g.sharding == w.sharding
            and all(
                np.array_equal(np.asarray(s.data).view(np.uint8), wn[s.index].view(np.uint8))
                for s in g.addressable_shards
            )
        )
        if not same:
            out.append(name)
    return out


def placement(arrays: dict[str, jax.Array]) -> dict[str, Any]:
    """Spec, total bytes and per-device bytes of each array."""
    out = {}
    for name, a in arrays.items():
        per_device: dict[int, int] = {}
        for s in a.addressable_shards:
            per_device[s.device.id] = per_device.get(s.device.id, 0) + s.data.nbytes
        assert isinstance(a.sharding, NamedSharding)
        out[name] = {
            "spec": [list(p) if isinstance(p, tuple) else p for p in a.sharding.spec],
            "nbytes": int(a.nbytes),
            "device_bytes": sorted(per_device.values()),
        }
    return out


def equality(root: Path) -> dict[str, Any]:
    report: dict[str, Any] = {"cases": {}, "perturbed": {}}
    for mesh_text in MESHES:
        mesh = make_mesh(parse_mesh(mesh_text))
        for ckpt, method, lora in CASES:
            _, ref = load_pretrained(root / ckpt, lora, engine(method))
            want, graphdef = leaves(ref, mesh), nnx.graphdef(ref)
            del ref
            _, model = load_sharded(root / ckpt, lora, engine(method), mesh)
            got = leaves(model)
            report["cases"][f"{ckpt}/{method}/{mesh_text}"] = {
                "differ": differences(got, want),
                "placement": placement(got),
                "graphdef_equal": nnx.graphdef(model) == graphdef,
            }
    mesh = make_mesh(parse_mesh(MESHES[0]))
    honest = sharded_load.read_slice
    for ckpt, method, tensor, leaf in PERTURB:
        lora = next(lo for c, m, lo in CASES if (c, m) == (ckpt, method))

        def wrong(file: Path, name: str, index: Any, tensor: str = tensor) -> np.ndarray:
            piece = honest(file, name, index)
            return piece[::-1] if name == tensor else piece

        _, ref = load_pretrained(root / ckpt, lora, engine(method))
        want = leaves(ref, mesh)
        sharded_load.read_slice = wrong
        try:
            _, model = load_sharded(root / ckpt, lora, engine(method), mesh)
        finally:
            sharded_load.read_slice = honest
        report["perturbed"][f"{ckpt}/{method}/{tensor}"] = {
            "expected": leaf,
            "differ": differences(leaves(model), want),
        }
    return report


def make(out: Path, cfg: ModelConfig) -> None:
    """Write ``cfg`` with random float32 weights (std 0.02, norms 1) as a checkpoint."""
    rng = np.random.default_rng(0)
    params: dict[str, Any] = {}
    for t in hf.hf_tensors(cfg):
        shape = t.shape[::-1] if t.transpose else t.shape
        if t.path[-1] == "weight" and len(shape) == 1:
            value = np.ones(shape, np.float32)
        else:
            value = rng.standard_normal(shape, np.float32) * np.float32(0.02)
        hf.set_leaf(params, t.path, value)
    hf.save_model(params, cfg, out)


def _status(key: str) -> int:
    """A ``/proc/self/status`` field in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(key)


def memory(mode: str, model_dir: Path, method: str = "lora") -> dict[str, Any]:
    mesh = make_mesh(parse_mesh("fsdp=8"))
    lora = LoraConfig(rank=4)
    eng = engine(method)
    cfg = hf.load_config(model_dir)
    # Warm up: the runtime's own buffers and an abstract model trace, before the baseline.
    jax.block_until_ready(jax.device_put(np.zeros(8), NamedSharding(mesh, PartitionSpec("fsdp"))))
    nnx.eval_shape(lambda: Model(cfg, lora, eng, rngs=nnx.Rngs(0)))
    try:
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    except OSError as e:
        return {"unsupported": f"cannot reset the peak resident set ({e})"}
    base = _status("VmRSS")
    if mode == "sharded":
        _, model = load_sharded(model_dir, lora, eng, mesh)
        arrays = list(leaves(model).values())
    elif mode == "host":  # on one device, as the host loader leaves it
        _, model = load_pretrained(model_dir, lora, eng)
        arrays = list(leaves(model).values())
    else:
        _, model = load_pretrained(model_dir, lora, eng)
        arrays = list(leaves(model, mesh).values())
        del model
    jax.block_until_ready(arrays)
    peak = _status("VmHWM")
    pieces = [s.data.nbytes for a in arrays for s in a.addressable_shards]
    return {
        "growth": peak - base,
        "held": sum(pieces),
        "largest_piece": max(pieces),
        "model_bytes": 4 * hf.n_params(cfg),
    }


def main(argv: list[str]) -> None:
    kind = argv[0]
    if kind == "equality":
        report = equality(Path(argv[1]))
    elif kind == "make":
        make(Path(argv[1]), MODELS[argv[2] if len(argv) > 2 else "big"])
        report = {"written": argv[1]}
    elif kind == "memory":
        report = memory(argv[1], Path(argv[2]), *argv[3:])
    else:
        raise SystemExit(f"unknown mode {kind!r}: expected equality, make or memory")
    print(json.dumps(report))


if __name__ == "__main__":
    main(sys.argv[1:])
