"""``qlora-spec plan``: the device memory one training step needs, term by term.

A user asks before every run: will an 8B QLoRA at 2 x 2048 fit on my 24 GB card? The plan
answers for a model directory or a named shape, a method, a batch, a length, a remat policy,
a dtype, the optimizer offload and a mesh, per device of the mesh, without a device of that
kind and without allocating anything (the model is built with ``nnx.eval_shape``).

The step's memory is split as users reason about it:

* **resident**, held for the whole step: the base weights in their storage format (bf16 or
  float32 floats, NF4 codes and scales), the adapters (every weight under full fine-tuning),
  AdamW's two moments (none on the device with ``--offload-optimizer``), the batch, RoPE's
  tables and the causal mask;
* **saved activations**: what each block keeps for its backward pass under the remat policy
  (``block_saved``), times the L blocks the layer ``scan`` stacks, live from the forward pass
  to the backward pass;
* **working sets**, live in one phase only: the forward pass (one block's products and, for
  QLoRA, its kernels dequantized), the loss (one chunk of float32 logits and their cotangent:
  ``EngineConfig.loss_chunk``, at most ``cpu_loss_rows(V)`` rows on a CPU; and the gradients
  it forms ahead of the backward pass), the backward pass (the top block's saved arrays
  sliced from the stack, what the remat policy recomputes, the cotangents), and the gradients
  of the trainable weights from the backward pass to the update.

The peak is the resident bytes plus the largest phase. Every term is a formula over the shape
(``Dims``) written beside the code it counts: ``attention_saved`` follows
``jax_impl/attention.py``, ``block_parts`` the block's backward, ``working_sets`` the step.

Where JAX's backend is the platform planned for (a CPU plan on a CPU; a GPU plan on a GPU),
``compiled_step`` compiles the real step on abstract arguments and reads XLA's own memory
analysis (arguments, outputs, temporaries), and that figure is the answer; the formula is
shown beside it. ``tests/test_plan.py`` holds the formula to XLA's analysis within 10% on
three shapes, every method and every remat policy (float32 on the CPU: XLA:CPU computes bf16
elementwise work in float32, so its bf16 figures are not a GPU's). On a mesh the weights,
gradients and moments are divided as ``RULES`` shards them and the batch over data x fsdp;
FSDP adds one gathered block.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from collections.abc import Iterable
from dataclasses import field
from pathlib import Path
from typing import Any, Literal

import jax
import jax.numpy as jnp
from flax import nnx

from ref_numpy.config import LoraConfig, ModelConfig, check_fields, llama_config
from ref_numpy.formats import hf

from ..layers import Frozen, cpu_loss_rows
from ..model import EngineConfig, Model, lora_targets
from ..nf4 import NF4State
from ..train.sharding import MESH_AXES, RULES, MeshConfig, logical_spec, parse_mesh

Method = Literal["full", "lora", "qlora"]
Platform = Literal["gpu", "tpu", "cpu"]

# Named shapes (Llama family): V vocabulary, D width, F MLP width, L layers, N heads, K kv
# heads, and RoPE's base. bench/gpu_train.py trains the same shapes.
MODEL_SIZES: dict[str, dict[str, Any]] = {
    "tiny": dict(V=512, D=128, F=352, L=2, N=4, K=2, theta=10000.0),  # runs anywhere
    "1b": dict(V=32000, D=2048, F=5632, L=22, N=32, K=4, theta=10000.0),  # TinyLlama-1.1B
    "8b": dict(V=128256, D=4096, F=14336, L=32, N=32, K=8, theta=500000.0),  # Llama-3-8B
    "70b": dict(V=128256, D=8192, F=28672, L=80, N=64, K=8, theta=500000.0),  # Llama-3-70B
}

GiB = 2**30


def size_config(name: str, seq_len: int) -> ModelConfig:
    """The ``ModelConfig`` of a named shape (``MODEL_SIZES``), positions up to ``seq_len``."""
    if name not in MODEL_SIZES:
        raise ValueError(f"--model-size: unknown shape {name!r}; known: {', '.join(MODEL_SIZES)}")
    s = MODEL_SIZES[name]
    return llama_config(
        vocab_size=s["V"],
        d_model=s["D"],
        n_layers=s["L"],
        n_heads=s["N"],
        n_kv_heads=s["K"],
        d_ff=s["F"],
        max_seq_len=max(seq_len, 2048),
        rope_theta=s["theta"],
    )


_UNITS = {
    "": 1,
    "b": 1,
    "bytes": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}


def parse_bytes(text: str, flag: str = "--device-memory") -> int:
    """``"24GiB"``, ``"80GB"``, ``"512MiB"``, ``"1e9"`` or ``"1000000 bytes"`` as bytes.

    Raises ValueError naming ``flag`` and the units it takes."""
    m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]*)?(?:[eE][0-9]+)?)\s*([A-Za-z]*)\s*", text)
    unit = m.group(2).lower() if m else None
    if m is None or unit not in _UNITS or float(m.group(1)) <= 0:
        raise ValueError(
            f"{flag}: {text!r} is not a size (expected a positive number with an optional "
            "unit: GiB, GB, MiB, MB, KiB, KB, TiB, TB or bytes, e.g. 24GiB)"
        )
    return int(float(m.group(1)) * _UNITS[unit])


# --- the shapes a step works on, per device ------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Dims:
    """Sizes one device works on: its rows of the batch, the heads, MLP width and vocabulary
    of its ``tensor`` shard, and the byte widths of the engine's dtypes."""

    b: int  # rows of the batch on one device: B / (data x fsdp)
    t: int  # T, positions per row
    d: int  # D
    f: int  # F on one device (F / tensor where it divides)
    n: int  # query heads on one device
    k: int  # key / value heads on one device
    h: int  # H
    v: int  # V on one device
    layers: int  # L
    c: int  # bytes of the compute dtype
    a: int  # bytes of the accumulation dtype (float32; float64 under x64)
    p: int  # bytes of param_dtype (adapters, gradients, AdamW moments)

    @property
    def m(self) -> int:
        """Tokens on one device, b * t."""
        return self.b * self.t


def dims(cfg: ModelConfig, eng: EngineConfig, batch: int, seq: int, mesh: MeshConfig) -> Dims:
    """``Dims`` of ``cfg`` at ``batch`` x ``seq`` on one device of ``mesh`` (rows over data x
    fsdp; heads, F and V over tensor where they divide, as ``RULES`` splits the weights)."""
    t = mesh.tensor

    def split(x: int) -> int:
        return x // t if x % t == 0 else x

    c = jnp.dtype(eng.dtype).itemsize
    return Dims(
        b=batch // (mesh.data * mesh.fsdp),
        t=seq,
        d=cfg.d_model,
        f=split(cfg.d_ff),
        n=split(cfg.n_heads) if cfg.n_kv % t == 0 else cfg.n_heads,
        k=split(cfg.n_kv),
        h=cfg.hd,
        v=split(cfg.vocab_size),
        layers=cfg.n_layers,
        c=c,
        a=max(c, 4),
        p=jnp.dtype(eng.param_dtype).itemsize,
    )


Array = tuple[str, int]  # a named array and its bytes


def _proj_out(cfg: ModelConfig, g: Dims) -> dict[str, int]:
    """Output width of each projection on one device."""
    return {
        "q_proj": g.n * g.h,
        "k_proj": g.k * g.h,
        "v_proj": g.k * g.h,
        "o_proj": g.d,
        "gate_proj": g.f,
        "up_proj": g.f,
        "down_proj": g.d,
    }


def _proj_in(cfg: ModelConfig, g: Dims) -> dict[str, int]:
    return {
        "q_proj": g.d,
        "k_proj": g.d,
        "v_proj": g.d,
        "o_proj": g.n * g.h,
        "gate_proj": g.d,
        "up_proj": g.d,
        "down_proj": g.f,
    }


def _adapted(cfg: ModelConfig, lora: LoraConfig | None) -> set[str]:
    """Projections with an adapter slot in the stacked blocks (every layer holds the slots of
    a projection any layer adapts; a slot a layer leaves out computes zeros all the same)."""
    return {name for (_, name) in lora_targets(cfg, lora)}


def attention_saved(g: Dims, impl: str) -> list[Array]:
    """What attention keeps for its backward pass, per layer (``attention.py``).

    einsum (``_sdpa_heads``): for each causal half (the first C = T // 2 queries against the
    first C keys, the other T - C queries against all T keys) the head-major q, k, v and
    the probabilities, all in the compute dtype.
    cudnn (flash attention): q, k, v and its output (compute dtype) and the softmax
    statistics, float32 [B, N, T].
    """
    b, t, n, k, h, c = g.b, g.t, g.n, g.k, g.h, g.c
    if impl == "cudnn":
        return [
            ("q", b * t * n * h * c),
            ("k, v", 2 * b * t * k * h * c),
            ("output", b * t * n * h * c),
            ("softmax statistics", b * n * t * 4),
        ]
    halves = [(t // 2, t // 2), (t - t // 2, t)] if t > 1 else [(t, t)]
    out: list[Array] = []
    for tq, s in halves:
        out += [
            ("q (head-major)", b * tq * n * h * c),
            ("k, v (head-major)", 2 * b * s * k * h * c),
            ("probabilities", b * n * tq * s * g.c),
        ]
    return out


def block_saved(
    cfg: ModelConfig, lora: LoraConfig | None, eng: EngineConfig, g: Dims
) -> list[Array]:
    """The arrays one block keeps for the backward pass under ``eng.remat``: per layer,
    summed over the L stacked layers by the scan. See the module docstring."""
    m, d, c, r = g.m, g.d, g.c, (lora.rank if lora else 0)
    adapted = _adapted(cfg, lora)
    outs = _proj_out(cfg, g)
    x = ("block input", m * d * c)
    if eng.remat == "full":
        return [x]
    if eng.remat == "attn_out":
        return [x, ("attention output", m * g.n * g.h * c)]
    if eng.remat == "dots":  # dots_with_no_batch_dims_saveable: the adapters' products
        # A base kernel's product is not a dot the policy sees: it runs inside a custom VJP
        # (layers.matmul for float kernels, nf4_linear for NF4 ones), so it is recomputed.
        kept = [x]
        for name, o in outs.items():
            last = name == "down_proj"  # its product only joins the residual stream
            if name in adapted:
                kept.append((f"{name} adapter x A", m * r * c))
                if not last:
                    kept.append((f"{name} adapter product", m * o * c))
        return kept
    attn, mlp = block_parts(cfg, lora, eng, g)
    return attn + mlp


def block_parts(
    cfg: ModelConfig, lora: LoraConfig | None, eng: EngineConfig, g: Dims
) -> tuple[list[Array], list[Array]]:
    """What remat "none" keeps of one block, as (attention half, MLP half): every array the
    block's backward pass reads."""
    m, d, c, a, r = g.m, g.d, g.c, g.a, (lora.rank if lora else 0)
    full_ft = lora is None
    adapted = _adapted(cfg, lora)
    outs, ins = _proj_out(cfg, g), _proj_in(cfg, g)
    needs_input = {name: full_ft or name in adapted for name in outs}

    def norm(where: str, consumers: Iterable[str]) -> list[Array]:
        kept = [(f"{where} norm input", m * d * a), (f"{where} norm statistics", 2 * m * a + d * a)]
        if full_ft:
            kept.append((f"{where} norm x-hat", m * d * a))
        if any(needs_input[p] for p in consumers):
            kept.append((f"{where} norm output", m * d * c))
        return kept

    def adapters(names: Iterable[str]) -> list[Array]:
        kept = []
        for name in names:
            if name in adapted:
                kept.append((f"{name} adapter x A", m * r * c))
                if c != g.p:  # A and B cast to the compute dtype
                    kept.append((f"{name} A, B cast", r * (ins[name] + outs[name]) * c))
        return kept

    attn: list[Array] = []
    if full_ft and c != g.p:  # trainable kernels cast to the compute dtype
        attn.append(("kernels cast", sum(ins[n] * o for n, o in outs.items()) * c))
    attn += norm("attention", ("q_proj", "k_proj", "v_proj"))
    attn += adapters(("q_proj", "k_proj", "v_proj"))
    attn += attention_saved(g, eng.attention)
    if needs_input["o_proj"] and eng.attention != "cudnn":  # cudnn's output is the same array
        attn.append(("attention output", m * g.n * g.h * c))
    attn += adapters(("o_proj",))
    mlp = norm("MLP", ("gate_proj", "up_proj"))
    mlp += adapters(("gate_proj", "up_proj"))
    mlp.append(("gate, up outputs", 2 * m * g.f * c))
    if needs_input["down_proj"]:
        mlp.append(("SwiGLU output", m * g.f * c))
    mlp += adapters(("down_proj",))
    return attn, mlp


# --- the state: what every step holds ------------------------------------------------------


def abstract_model(cfg: ModelConfig, lora: LoraConfig | None, eng: EngineConfig) -> Model:
    """The model's variables as shapes and dtypes only (``nnx.eval_shape``): nothing is
    allocated, so any size can be planned. ``eng`` is resolved already; the attention path
    does not change the variables, so it is built with the einsum path on every backend."""
    build = dataclasses.replace(eng, attention="einsum")
    return nnx.eval_shape(lambda: Model(cfg, lora, build, rngs=nnx.Rngs(0)))


def _shard_divisor(var: nnx.Variable, mesh: MeshConfig) -> int:
    """How many devices share ``var``'s array: the product of the mesh axes its logical
    names map to by ``RULES`` (where they divide the dimension)."""
    value = var.get_value()
    names = var.get_metadata().get("out_sharding") or (None,) * len(value.shape)
    abstract = jax.sharding.AbstractMesh(mesh.shape, MESH_AXES)
    spec = logical_spec(names, value.shape, abstract, RULES)
    n = 1
    for entry in spec:
        for axis in (entry,) if isinstance(entry, str) else (entry or ()):
            n *= dict(zip(MESH_AXES, mesh.shape, strict=True))[axis]
    return n


@dataclasses.dataclass(frozen=True)
class State:
    """Bytes of the model's variables on one device, by kind."""

    base_float: int  # frozen float weights (embeddings, norms, head; kernels under LoRA)
    nf4_packed: int  # NF4 codes, two per byte
    nf4_scales: int  # NF4 absmax (8-bit with double quantization) and the nested state
    trainable: int  # nnx.Param: the adapters (every weight under full fine-tuning)
    layer_weights: int  # one block's base weights whole (what FSDP gathers per layer)
    base_dtype: str  # dtype of the frozen float weights


def state_bytes(model: Model, mesh: MeshConfig) -> State:
    """``State`` of an (abstract) model on one device of ``mesh``."""
    sums = dict(base_float=0, nf4_packed=0, nf4_scales=0, trainable=0, layer_weights=0)
    dtype = ""
    for path, var in nnx.to_flat_state(nnx.state(model)):
        value = var.get_value()
        nbytes = math.prod(value.shape) * value.dtype.itemsize
        per_device = nbytes // _shard_divisor(var, mesh)
        if isinstance(var, nnx.Param):
            kind = "trainable"
        elif isinstance(var, NF4State):
            kind = "nf4_packed" if path[-1] == "packed" else "nf4_scales"
        else:
            assert isinstance(var, Frozen), path
            kind, dtype = "base_float", str(value.dtype)
        sums[kind] += per_device
        if path[0] == "layers" and not isinstance(var, nnx.LoRAParam):
            sums["layer_weights"] += nbytes // value.shape[0] // max(1, mesh.tensor)
    return State(**sums, base_dtype=dtype)


# --- the plan -------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Term:
    """One line of the plan: bytes on one device and the formula they come from."""

    name: str
    bytes: int
    formula: str
    phase: str = "resident"  # resident, or the phase of the step it is live in


@dataclasses.dataclass(frozen=True)
class Plan:
    """The device memory of one training step, per device of the mesh."""

    terms: tuple[Term, ...]
    peak_phase: str  # the phase of the step where the peak is
    peak: int  # bytes on one device at the peak
    host: int  # bytes in host memory (offloaded AdamW moments)
    devices: int
    engine: EngineConfig

    def phase_bytes(self) -> dict[str, int]:
        """Bytes on one device in each phase of the step (resident terms included)."""
        resident = sum(t.bytes for t in self.terms if t.phase == "resident")
        phases: dict[str, int] = {}
        for t in self.terms:
            if t.phase != "resident":
                for ph in t.phase.split("+"):
                    phases[ph] = phases.get(ph, resident) + t.bytes
        return phases


def make_plan(
    cfg: ModelConfig,
    lora: LoraConfig | None,
    eng: EngineConfig,
    batch_size: int,
    seq_len: int,
    *,
    offload_optimizer: bool = False,
    mesh: MeshConfig | None = None,
    platform: str = "gpu",
) -> Plan:
    """The plan of one step of ``Trainer`` at ``batch_size`` x ``seq_len``; ``eng`` resolved
    for the target platform (``EngineConfig.resolve``)."""
    mesh = MeshConfig() if mesh is None else mesh
    if batch_size % (mesh.data * mesh.fsdp):
        raise ValueError(
            f"--batch-size {batch_size}: does not divide over the {mesh.data * mesh.fsdp} "
            f"devices of --mesh {mesh} that split a batch (data x fsdp)"
        )
    if eng.dtype == "auto" or eng.attention == "auto":
        raise ValueError("make_plan: resolve the EngineConfig for the platform first")
    if batch_size < 1 or seq_len < 2:
        raise ValueError(f"batch {batch_size} x {seq_len}: expected >= 1 rows of >= 2 tokens")
    st = state_bytes(abstract_model(cfg, lora, eng), mesh)
    g = dims(cfg, eng, batch_size, seq_len, mesh)
    m, c = g.m, g.c
    per_layer = sum(b for _, b in block_saved(cfg, lora, eng, g))
    terms: list[Term] = []
    if lora is None:
        terms.append(Term("weights (trainable)", st.trainable, f"every weight, {eng.param_dtype}"))
    else:
        terms.append(Term("base weights", st.base_float, f"frozen floats, {st.base_dtype}"))
        if eng.quantize:
            terms.append(Term("NF4 codes", st.nf4_packed, "half a byte per kernel weight"))
            terms.append(Term("NF4 scales", st.nf4_scales, "absmax per block (+ nested state)"))
        terms.append(Term("adapters", st.trainable, f"L x sum R (in + out), {eng.param_dtype}"))
    moments = 2 * st.trainable
    where = "in host memory" if offload_optimizer else "2 x trainable"
    terms.append(Term("AdamW moments", 0 if offload_optimizer else moments, where))
    other = 2 * g.b * g.t * 4  # input ids and labels
    if cfg.position == "rope":
        other += 4 * m * g.h * c  # cos and sin of q and k, computed once for every layer
    if eng.attention == "einsum":
        other += g.b * g.t * g.t  # the boolean causal mask [B, T, S]
    terms.append(Term("batch, RoPE tables, mask", other, "2 B T 4 + 4 B T H c + B T T"))
    terms.append(
        Term(
            "saved activations",
            g.layers * per_layer,
            f"L x {per_layer / 2**20:.1f} MiB per block (remat {eng.remat})",
            "forward+loss+backward",
        )
    )
    terms.append(Term("gradients", st.trainable, "as the trainable weights", "backward+update"))
    titles = {
        "forward": "forward: one block's temporaries",
        "loss": "loss: logits chunk and cotangents",
        "backward": "backward: one block's temporaries",
    }
    for phase, arrays in working_sets(cfg, lora, eng, g, st.layer_weights, platform).items():
        big = sorted((b, name) for name, b in arrays if b)[::-1]
        names = ", ".join(name for _, name in big[:3]) + (", ..." if len(big) > 3 else "")
        terms.append(Term(titles[phase], sum(b for _, b in arrays), names, phase))
    if mesh.fsdp > 1:
        terms.append(
            Term(
                "gathered block", st.layer_weights, "one block's weights whole", "forward+backward"
            )
        )
    plan = Plan(tuple(terms), "", 0, moments if offload_optimizer else 0, mesh.size, eng)
    phases = plan.phase_bytes()
    peak_phase = max(phases, key=lambda k: phases[k])
    return dataclasses.replace(plan, peak_phase=peak_phase, peak=phases[peak_phase])


def working_sets(
    cfg: ModelConfig,
    lora: LoraConfig | None,
    eng: EngineConfig,
    g: Dims,
    layer_weights: int,
    platform: str,
) -> dict[str, list[Array]]:
    """The transient arrays of each phase of the step beside the saved activations (the
    module docstring's "working sets")."""
    m, c, a, t = g.m, g.c, g.a, g.t
    adapted = _adapted(cfg, lora)
    n_up = sum(1 + (name in adapted) for name in ("gate_proj", "up_proj"))
    n_down = 1 + ("down_proj" in adapted)
    weights = [("one layer's weights", layer_weights)]
    if eng.quantize:  # the block's kernels dequantized (float32, then the compute dtype)
        kernels = sum(_proj_in(cfg, g)[n] * o for n, o in _proj_out(cfg, g).items())
        weights.append(("one layer's kernels dequantized", kernels * (4 + (c if c < 4 else 0))))
    fwd = [("gate, up products", n_up * m * g.f * c), ("SwiGLU input, output", 2 * m * g.f * c)]
    # head_cross_entropy: one chunk of rows at a time, its logits and their cotangent, and
    # the gradients it forms ahead of the backward pass
    chunk = eng.loss_chunk if 0 < eng.loss_chunk < t - 1 else t - 1
    rows = g.b * chunk
    if platform == "cpu":
        rows = min(rows, cpu_loss_rows(g.v))
    loss = [("logits and their cotangent", 2 * rows * g.v * 4)]
    loss.append(("final hidden state and its cotangent", 2 * m * g.d * c))
    loss.append(("the final hidden state's gradient, float32", m * g.d * a))
    if lora is None:  # the trained head's
        loss.append(("the head's gradient, float32", g.d * g.v * a))
    # the backward of the top block
    attn_part, mlp_part = block_parts(cfg, lora, eng, g)
    attn_res, mlp_res = sum(b for _, b in attn_part), sum(b for _, b in mlp_part)
    mlp_cot = (n_down + 2) * m * g.f * c  # dL/d(SwiGLU output) as its products; dgate, dup
    if eng.attention == "einsum":
        tq = t - t // 2
        attn_cot = 2 * g.b * g.n * tq * t * a  # dprobabilities, dscores of the larger half
        if platform == "cpu" and eng.remat != "none":  # XLA:CPU transposes them for dV
            attn_res += sum(b for n, b in attention_saved(g, "einsum") if n == "probabilities")
    else:
        attn_cot = m * (g.n + 2 * g.k) * g.h * c  # dq, dk, dv
    saved = sum(b for _, b in block_saved(cfg, lora, eng, g))
    bwd = [("the layer's saved activations, sliced from the stack", saved)]
    bwd.append(("block input and output cotangents", 2 * m * g.d * a))
    if eng.remat == "none":
        bwd.append(("MLP or attention cotangents", max(mlp_cot, attn_cot)))
    elif eng.remat == "dots" and lora is not None:  # recomputed from the adapters' products
        adapters_h = sum(b for n, b in attn_part + mlp_part if n.endswith("adapter x A"))
        bwd.append(
            (
                "recomputed MLP or attention, and its cotangents",
                max(mlp_res + mlp_cot, attn_res + attn_cot) - adapters_h,
            )
        )
    else:  # full, attn_out (and dots without adapters, which saves only the block input):
        # the whole block recomputed from its input, then differentiated
        kept = m * g.n * g.h * c if eng.remat == "attn_out" else 0
        up_products = (n_up - 2) * m * g.f * c  # gate, up held as their products
        bwd.append(("recomputed block", attn_res + mlp_res - kept + up_products))
        bwd.append(("MLP or attention cotangents", max(mlp_cot, attn_cot)))
    if lora is None:  # full fine-tuning: the layer's weight gradients, before the stack takes them
        bwd.append(("one layer's weight gradients", layer_weights))
    return {"forward": fwd + weights, "loss": loss, "backward": bwd + weights}


# --- XLA's own figures --------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Compiled:
    """XLA's compiled memory analysis of the train step (one device of JAX's backend)."""

    backend: str
    arguments: int  # parameters, frozen state, optimizer state and the batch
    outputs: int  # outputs not aliased to a donated argument
    temporaries: int  # XLA's temporary allocation
    host: int  # host-memory arguments (offloaded moments)

    @property
    def total(self) -> int:
        return self.arguments + self.outputs + self.temporaries


def compiled_step(
    cfg: ModelConfig,
    lora: LoraConfig | None,
    eng: EngineConfig,
    batch_size: int,
    seq_len: int,
    *,
    offload_optimizer: bool = False,
) -> Compiled:
    """Compile ``Trainer``'s step on abstract arguments (nothing allocated) for JAX's default
    backend and read XLA's memory analysis. ``eng`` must be resolved for that backend."""
    from ..train.trainer import HOST, OptimConfig, Trainer, optimizer, schedule

    model = nnx.eval_shape(lambda: Model(cfg, lora, eng, rngs=nnx.Rngs(0)))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)  # type: ignore[misc]
    optim = OptimConfig(total_steps=2)
    tx = optimizer(optim)
    opt_state = jax.eval_shape(tx.init, params)
    trainer = Trainer(
        graphdef=graphdef,
        params=params,
        rest=rest,
        opt_state=opt_state,
        tx=tx,
        lr_at=schedule(optim),
    )
    if offload_optimizer:  # as Trainer places them, without allocating
        trainer.offload_optimizer = True
        host = jax.sharding.SingleDeviceSharding(jax.devices()[0], memory_kind=HOST)
        opt_state = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=host) if x.ndim else x,
            opt_state,
        )
    ids = jax.ShapeDtypeStruct((1, batch_size, seq_len), jnp.int32)
    step = jax.ShapeDtypeStruct((), jnp.int32)
    lowered = trainer._step.lower(params, opt_state, rest, {"input_ids": ids, "labels": ids}, step)
    ma = lowered.compile().memory_analysis()
    if ma is None:
        raise ValueError(f"{jax.default_backend()}: XLA gives no memory analysis on this backend")
    return Compiled(
        backend=jax.default_backend(),
        arguments=int(ma.argument_size_in_bytes),
        outputs=int(ma.output_size_in_bytes - ma.alias_size_in_bytes),
        temporaries=int(ma.temp_size_in_bytes),
        host=int(ma.host_argument_size_in_bytes),
    )


# --- the command ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class PlanConfig:
    """Everything ``qlora-spec plan`` takes; the leaf field names are the flags, as in
    ``TrainConfig`` (the LoRA and engine flags are train's)."""

    model: str | None = field(
        default=None,
        metadata={
            "help": "Hugging Face model directory, or its config.json (no weights are read)",
            "metavar": "PATH",
            "default_text": "--model-size",
        },
    )
    model_size: str | None = field(
        default=None,
        metadata={
            "help": "a named Llama shape instead of --model: tiny, 1b (TinyLlama-1.1B), "
            "8b (Llama-3-8B), 70b (Llama-3-70B)",
            "default_text": "8b without --model",
        },
    )
    method: Method = field(
        default="qlora",
        metadata={"help": "what trains: every weight (full), adapters (lora, qlora: NF4 base)"},
    )
    platform: Platform = field(
        default="gpu",
        metadata={
            "help": "the device kind planned for: the dtype and attention resolve for it, and "
            "XLA's compiled analysis is read where it is JAX's backend here"
        },
    )
    batch_size: int = field(default=4, metadata={"help": "rows per micro-batch (whole mesh)"})
    max_length: int = field(default=2048, metadata={"help": "tokens per row"})
    offload_optimizer: bool = field(
        default=False, metadata={"help": "AdamW's moments in host memory (as train's flag)"}
    )
    mesh: str = field(
        default="",
        metadata={
            "help": "the device mesh, e.g. fsdp=8 or data=2,tensor=4 (as train's --mesh)",
            "default_text": "one device",
        },
    )
    device_memory: str | None = field(
        default=None,
        metadata={
            "help": "memory of one device (24GiB, 80GB, 141GB): says whether the step fits, "
            "and the command exits 1 when it does not",
            "metavar": "SIZE",
            "default_text": "no verdict",
        },
    )
    json: bool = field(default=False, metadata={"help": "print the plan as one JSON object"})
    lora: LoraConfig = field(
        default_factory=LoraConfig, metadata={"help": "LoRA adapters (lora, qlora)"}
    )
    engine: EngineConfig = field(
        default_factory=EngineConfig, metadata={"help": "dtypes, attention, remat, NF4"}
    )

    def __post_init__(self) -> None:
        check_fields(self)
        if self.engine.quantize != (self.method == "qlora"):
            eng = dataclasses.replace(self.engine, quantize=self.method == "qlora")
            object.__setattr__(self, "engine", eng)
        for name in ("batch_size", "max_length"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(
                    f"--{name.replace('_', '-')}: expected an integer >= 1, got {value!r}"
                )
        if self.model_size is not None and self.model_size not in MODEL_SIZES:
            raise ValueError(
                f"--model-size: unknown shape {self.model_size!r}; known: "
                f"{', '.join(MODEL_SIZES)} (or --model DIR for any other)"
            )
        if self.model is not None and self.model_size is not None:
            raise ValueError("--model and --model-size: give one of them, not both")
        if self.device_memory is not None:
            parse_bytes(self.device_memory)


def plan_model_config(pc: PlanConfig) -> tuple[str, ModelConfig]:
    """``(name, config)`` of the model planned for: ``--model`` (a directory or its
    config.json) or ``--model-size`` (default 8b)."""
    if pc.model is None:
        size = pc.model_size or "8b"
        return size, size_config(size, pc.max_length)
    path = Path(pc.model)
    if path.is_file() and path.name == "config.json":
        path = path.parent
    elif path.is_file():
        raise ValueError(f"--model {pc.model}: expected a model directory or its config.json")
    cfg = hf.load_config(path)
    if pc.max_length > cfg.max_seq_len:
        raise ValueError(
            f"--max-length {pc.max_length}: longer than {path / 'config.json'}'s context "
            f"({cfg.max_seq_len} positions)"
        )
    return str(pc.model), cfg


def plan_mesh(text: str) -> MeshConfig:
    """``--mesh`` as the plan reads it: an axis left out has size 1 (``data`` too: there are
    no devices here for it to take)."""
    spec = text.strip()
    if "data" not in {part.partition("=")[0].strip() for part in spec.split(",")}:
        spec = f"data=1,{spec}" if spec else "data=1"
    return parse_mesh(spec)


def run_plan(pc: PlanConfig) -> dict[str, Any]:
    """The plan of ``pc`` as plain data: the model, the resolved engine, each term in bytes,
    the phases, the peak (XLA's compiled figure where JAX's backend is ``pc.platform``, the
    formula's otherwise), host memory and, with ``--device-memory``, whether it fits."""
    name, cfg = plan_model_config(pc)
    lora = None if pc.method == "full" else pc.lora
    if lora is not None:
        lora_targets(cfg, lora)  # a target that matches nothing is an error here, as in train
    mesh = plan_mesh(pc.mesh)
    eng = pc.engine.resolve(cfg, backend=pc.platform)
    plan = make_plan(
        cfg,
        lora,
        eng,
        pc.batch_size,
        pc.max_length,
        offload_optimizer=pc.offload_optimizer,
        mesh=mesh,
        platform=pc.platform,
    )
    out: dict[str, Any] = {
        "model": name,
        "shape": dict(
            V=cfg.vocab_size, D=cfg.d_model, F=cfg.d_ff, L=cfg.n_layers, N=cfg.n_heads, K=cfg.n_kv
        ),
        "method": pc.method,
        "batch": [pc.batch_size, pc.max_length],
        "platform": pc.platform,
        "mesh": str(mesh),
        "devices": mesh.size,
        "engine": dataclasses.asdict(eng),
        "offload_optimizer": pc.offload_optimizer,
        "terms": [dataclasses.asdict(t) for t in plan.terms],
        "phases": plan.phase_bytes(),
        "formula_peak": plan.peak,
        "peak_phase": plan.peak_phase,
        "host_bytes": plan.host,
        "compiled": None,
        "peak": plan.peak,
        "source": "formula",
    }
    if BACKENDS.get(jax.default_backend()) == pc.platform and mesh.size == 1:
        c = compiled_step(
            cfg, lora, eng, pc.batch_size, pc.max_length, offload_optimizer=pc.offload_optimizer
        )
        out["compiled"] = dataclasses.asdict(c) | {"total": c.total}
        out["peak"], out["source"] = c.total, f"XLA's compiled memory analysis ({c.backend})"
    if pc.device_memory is not None:
        limit = parse_bytes(pc.device_memory)
        out["device_memory"] = limit
        out["fits"] = out["peak"] <= limit
    return out


BACKENDS = {"cpu": "cpu", "gpu": "gpu", "cuda": "gpu", "rocm": "gpu", "tpu": "tpu"}


def _gib(n: int) -> str:
    return f"{n / GiB:.2f}"


def render(report: dict[str, Any]) -> str:
    """The plan as the text ``qlora-spec plan`` prints: a header, one line per term (GiB on
    one device and what it counts), the phases, the peak and the verdict."""
    eng, s = report["engine"], report["shape"]
    shape = " ".join(f"{k}={v}" for k, v in s.items())
    head = [
        f"{report['model']} ({shape}), {report['method']}, batch {report['batch'][0]} x "
        f"{report['batch'][1]}, remat {eng['remat']}, {eng['dtype']} compute, "
        f"{eng['param_dtype']} {'weights' if report['method'] == 'full' else 'adapters'}, "
        f"attention {eng['attention']}, on {report['platform']}"
        + (f", mesh {report['mesh']}" if report["devices"] > 1 else ""),
        f"per device ({report['devices']} device{'s' if report['devices'] > 1 else ''}), GiB:",
    ]
    width = max(len(t["name"]) for t in report["terms"]) + 2
    lines = [
        f"  {t['name']:<{width}}{_gib(t['bytes']):>8}   {t['formula']}" for t in report["terms"]
    ]
    phases = ", ".join(f"{k} {_gib(v)}" for k, v in report["phases"].items())
    tail = [f"  step by phase (resident included): {phases}"]
    tail.append(f"  formula's peak: {_gib(report['formula_peak'])} GiB ({report['peak_phase']})")
    if report["compiled"] is not None:
        c = report["compiled"]
        tail.append(
            f"  XLA's compiled analysis ({c['backend']}): {_gib(c['total'])} GiB (arguments "
            f"{_gib(c['arguments'])}, outputs {_gib(c['outputs'])}, temporaries "
            f"{_gib(c['temporaries'])})"
        )
    if report["host_bytes"]:
        tail.append(f"  host memory: {_gib(report['host_bytes'])} GiB (AdamW moments)")
    verdict = f"peak {_gib(report['peak'])} GiB per device, from the {report['source']}"
    if "fits" in report:
        limit = report["device_memory"]
        verdict += (
            f": fits in {_gib(limit)} GiB ({_gib(limit - report['peak'])} GiB to spare)"
            if report["fits"]
            else f": does NOT fit in {_gib(limit)} GiB ({_gib(report['peak'] - limit)} GiB over)"
        )
    return "\n".join([*head, *lines, *tail, verdict])


def main(pc: PlanConfig) -> int:
    """``qlora-spec plan``: print the plan (text, or JSON with ``--json``); 1 when
    ``--device-memory`` is given and the step does not fit, else 0."""
    report = run_plan(pc)
    print(json.dumps(report) if pc.json else render(report))
    return 0 if report.get("fits", True) else 1
