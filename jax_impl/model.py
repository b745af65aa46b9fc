"""Mirror of ``ref_numpy/model.py``: the decoder as Flax NNX modules, layers stacked and scanned.

The NNX state has the spec's param names; the blocks are stacked on a leading ``layers`` axis
and run under ``nnx.scan``, so compile time does not grow with depth. The one mapping between
the two trees (``from_spec`` / ``to_spec``)::

    spec  params["layers"][i]["attn"]["q_proj"]["kernel"]       [D, N*H]
    nnx   model.layers.attn.q_proj.kernel                       [L, D, N*H]   (row i)
    spec  params["embed"]["embedding"]                          [V, D]
    nnx   model.embed.embedding                                 [V, D]

and an NF4 kernel (``ref_numpy.nf4.NF4Tensor``) maps field by field onto
``.../kernel/{packed, absmax, nested_absmax, nested_code, offset}``.

Variable types say what trains (see ``lora.py``): full fine-tuning makes every base weight an
``nnx.Param``; with a LoRA config the base is ``Frozen`` and only ``nnx.LoRAParam`` adapters
are Params; QLoRA additionally holds the projection kernels as NF4 state.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Sequence
from dataclasses import field
from typing import Any, Literal, overload

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ref_numpy.config import (
    LoraConfig,
    ModelConfig,
    check_fields,
    has_bias,
    mlp_names,
    mlp_shapes,
    projection_names,
    projection_paths,
)
from ref_numpy.lora import LORA_LEAVES, projections, selected_paths, selects
from ref_numpy.nf4 import BLOCKSIZES, DEFAULT_BLOCKSIZE, NF4Tensor
from ref_numpy.positional import rope_attention_factor

from .attention import ATTN_OUT, Attention, KVCache, attention_mask, layer_windows
from .cpu import CPUINFO, bf16_units, cpu_flags
from .layers import (
    ACTIVATIONS,
    Frozen,
    Norm,
    acc_dtype,
    cross_entropy,
    embedding,
    matmul,
    proj_axes,
    swiglu,
    variable,
)
from .lora import Dense
from .nf4 import NF4State
from .positional import RopeTables, learned, rope_inv_freq, rope_tables, sinusoidal

Array = jax.Array
Remat = Literal["auto", "none", "full", "dots", "attn_out"]
AttentionChoice = Literal["auto", "cudnn", "xla", "einsum"]
LayerLoop = Literal["auto", "scan", "unroll"]

REMAT_POLICIES: dict[str, Callable[..., Any] | None] = {
    "full": None,  # save nothing inside a block: recompute it all in the backward pass
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,  # keep matmul outputs
    "attn_out": jax.checkpoint_policies.save_only_these_names(ATTN_OUT),  # keep attention's
}


DType = Literal["float32", "bfloat16", "float64"]
ComputeDType = Literal["auto", "float32", "bfloat16", "float64"]

# Accelerators where "auto" computes in bfloat16 (their matrix units are built for it).
BF16_BACKENDS = ("gpu", "tpu")
# "0" or "1" overrides what cpu_bf16_units() reads from the CPU; the test suite sets "0", so
# its float32 expectations of dtype="auto" hold on every machine.
CPU_BF16_ENV = "QLORA_SPEC_CPU_BF16"


def cpu_bf16_units(path: str = CPUINFO) -> bool:
    """Whether this machine's CPU multiplies bf16 in hardware (one of ``BF16_CPU_FLAGS`` among
    the flags ``path`` lists); False where the file cannot be read (not Linux). The
    environment variable ``QLORA_SPEC_CPU_BF16`` set to ``0`` or ``1`` decides instead (any
    other non-empty value is a ValueError)."""
    env = os.environ.get(CPU_BF16_ENV, "").strip()
    if env in ("0", "1"):
        return env == "1"
    if env:
        raise ValueError(f"{CPU_BF16_ENV}={env!r}: expected 0 or 1 (or unset, to read {path})")
    return bf16_units(cpu_flags(path))


def bf16_widened(dtype: str, backend: str | None = None) -> bool:
    """Whether compute ``dtype`` is bfloat16 on a CPU without bf16 matrix units
    (``cpu_bf16_units()`` false; ``backend`` defaults to JAX's default). There XLA widens
    every bf16 product to float32 and rounds it back, so the step is slower than under
    float32 (``bench/RESULTS.md``: on a 2-core AMD EPYC, Zen 3, a LoRA step of
    ``bench/cpu_train.py``'s default shape ran 1,006-1,024 tokens/s against 1,285-1,291),
    which is why ``dtype="auto"`` computes in float32 there."""
    backend = jax.default_backend() if backend is None else backend
    return dtype == "bfloat16" and backend == "cpu" and not cpu_bf16_units()


@dataclasses.dataclass(frozen=True)
class EngineConfig:
    """How the engine runs a model (the spec has no counterpart: it is float64 NumPy).

    The dtypes are held by name; a dtype object (``jnp.bfloat16``) is accepted and stored as
    its name, so the config is plain data (JSON, flags). ``"auto"`` choices are resolved once,
    when a ``Model`` is built (``resolve``); ``model.eng`` holds the resolved config.

    Storage: trainable weights (the adapters; every weight in full fine-tuning), and with them
    their gradients and AdamW's moments, are ``param_dtype``. Frozen float base weights
    (LoRA / QLoRA: embeddings, norms, the head, the projection kernels under LoRA) are stored
    in the narrower of ``param_dtype`` and ``dtype``: bfloat16 under bfloat16 compute, since
    every use casts them to the compute dtype anyway. QLoRA's projection kernels are NF4.
    Logits, the loss and every reduction stay float32 whatever the compute dtype.
    """

    param_dtype: DType = field(
        default="float32",
        metadata={"help": "dtype of the trainable weights (adapters), gradients and AdamW state"},
    )
    dtype: ComputeDType = field(
        default="auto",
        metadata={
            "help": "compute dtype of matmuls and activations (auto: bfloat16 on GPU and TPU "
            "and on CPUs with bf16 matrix units, AMX or AVX512-BF16; float32 on other CPUs); "
            "frozen base weights are stored in it when it is narrower than "
            "--param-dtype; float64 runs JAX in x64"
        },
    )
    attention: AttentionChoice = field(
        default="auto",
        metadata={
            "help": "attention path: einsum (the spec's lines), xla "
            "(jax.nn.dot_product_attention), cudnn (cuDNN flash attention, NVIDIA GPUs with "
            "bfloat16 compute); auto picks cudnn where it applies and einsum elsewhere"
        },
    )
    remat: Remat = field(
        default="auto",
        metadata={
            "help": "rematerialisation per block: none keeps every activation, full "
            "recomputes the block in the backward pass, dots keeps the projections' outputs, "
            "attn_out keeps only the attention output; auto is full for QLoRA (--method "
            "qlora), trained for memory as PEFT's QLoRA preparation does, and none otherwise"
        },
    )
    layer_loop: LayerLoop = field(
        default="auto",
        metadata={
            "help": "how training and scoring run the blocks: scan (one block's program, "
            "compiled once) or unroll (each block its own code: a longer compile, 3-4x at 30 "
            "layers); auto unrolls under bfloat16 compute on a CPU where --remat is none, "
            "where XLA's scan widens the stacked bf16 weights and saved activations to "
            "float32 on every step, and scans elsewhere"
        },
    )
    quantize: bool = field(
        default=False,
        metadata={"help": "hold projection kernels as NF4 (QLoRA)", "set_by": "--method qlora"},
    )
    nf4_blocksize: int = field(
        default=DEFAULT_BLOCKSIZE,
        metadata={"help": "NF4 weights per absmax block", "choices": BLOCKSIZES},
    )
    double_quant: bool = field(
        default=True, metadata={"help": "quantize the NF4 absmax too (8-bit, blocks of 256)"}
    )
    loss_chunk: int = field(
        default=512,
        metadata={
            "help": "positions per chunk of the training loss: longer rows make their float32 "
            "[B, chunk, V] logits one chunk at a time (0: the whole row at once)"
        },
    )

    def __post_init__(self) -> None:
        for name in ("param_dtype", "dtype"):  # jnp.bfloat16 -> "bfloat16"
            if not isinstance(getattr(self, name), str):
                object.__setattr__(self, name, jnp.dtype(getattr(self, name)).name)
        check_fields(self)
        if isinstance(self.loss_chunk, bool) or not self.loss_chunk >= 0:
            raise ValueError(f"EngineConfig.loss_chunk: expected >= 0, got {self.loss_chunk!r}")

    def resolve(
        self, cfg: ModelConfig, backend: str | None = None, cpu_bf16: bool | None = None
    ) -> EngineConfig:
        """This config with ``dtype``, ``attention``, ``remat`` and ``layer_loop`` made
        concrete for ``cfg`` on ``backend`` (default: JAX's default backend, ``"cpu"``,
        ``"gpu"`` or ``"tpu"``); ``cpu_bf16`` says whether the CPU has bf16 matrix units
        (default: ``cpu_bf16_units()``).

        ``dtype="auto"`` becomes bfloat16 on GPU and TPU and on a CPU with bf16 matrix units
        (AMX or AVX512-BF16: on a Xeon with AMX a LoRA step of ``bench/cpu_train.py``'s
        default shape takes 0.54x the CPU time of the float32 one), float32 elsewhere.
        ``attention="auto"`` becomes ``"cudnn"`` on a GPU with bfloat16 compute and a head dim
        cuDNN's flash kernel takes on every supported GPU (a multiple of 8, at most 128), and
        ``"einsum"`` otherwise. ``remat="auto"`` becomes ``"full"`` for QLoRA (``quantize``)
        and ``"none"`` otherwise: QLoRA is the method chosen for memory, and PEFT's QLoRA
        preparation (``prepare_model_for_kbit_training``) turns gradient checkpointing on by
        default. ``layer_loop="auto"`` becomes ``"unroll"`` on a CPU with bfloat16 compute
        and (resolved) ``remat="none"``, and ``"scan"`` otherwise: XLA's CPU backend slices
        and updates bf16 stacks through float32, so a scanned bf16 step converts every
        trained stacked kernel (the frozen ones pass as their bits, ``hidden_states``) and
        saved activation twice (unrolled, ``bench/cpu_train.py``'s
        SmolLM2-135M shape steps 1.03-1.57x faster for LoRA, 1.57-1.75x for QLoRA, and
        compiles 3-4x longer; QLoRA's dequantized kernels are then held through the step,
        about LoRA's peak memory; under float32 unrolling gains nothing). A remat policy asks
        for memory, and the scan serves it: at that shape under bf16, unrolled with one the
        step was no faster and its process peaked 0.9-1.4 GB higher; scanned with
        ``remat="full"`` QLoRA trains in less than half the memory of the unrolled step
        without remat, for a step 1.3x as long. An explicit ``"cudnn"`` off a GPU, or without
        bfloat16 compute, raises ValueError. Resolving a resolved config returns it unchanged.
        """
        backend = jax.default_backend() if backend is None else backend
        dtype = self.dtype
        if dtype == "auto":
            if backend == "cpu" and cpu_bf16 is None:
                cpu_bf16 = cpu_bf16_units()
            bf16 = backend in BF16_BACKENDS or (backend == "cpu" and bool(cpu_bf16))
            dtype = "bfloat16" if bf16 else "float32"
        attention = self.attention
        if attention == "cudnn" and backend != "gpu":
            raise ValueError(
                f"EngineConfig.attention (--attention) cudnn: cuDNN flash attention needs an "
                f"NVIDIA GPU, and JAX's backend is {backend!r}; use auto, xla or einsum"
            )
        if attention == "cudnn" and dtype != "bfloat16":
            raise ValueError(
                f"EngineConfig.attention (--attention) cudnn: cuDNN flash attention computes "
                f"in bfloat16, and the compute dtype (--dtype) is {dtype!r}"
            )
        if attention == "auto":
            takes = cfg.hd % 8 == 0 and cfg.hd <= 128
            attention = "cudnn" if backend == "gpu" and dtype == "bfloat16" and takes else "einsum"
        remat = self.remat
        if remat == "auto":
            remat = "full" if self.quantize else "none"
        loop = self.layer_loop
        if loop == "auto":
            unroll = backend == "cpu" and dtype == "bfloat16" and remat == "none"
            loop = "unroll" if unroll else "scan"
        return dataclasses.replace(
            self, dtype=dtype, attention=attention, remat=remat, layer_loop=loop
        )

    @property
    def frozen_dtype(self) -> str:
        """Storage dtype of frozen float base weights: the narrower of ``param_dtype`` and the
        (resolved) compute ``dtype``."""
        if self.dtype == "auto":
            raise ValueError("EngineConfig.dtype: 'auto' is resolved when the model is built")
        narrower = jnp.dtype(self.dtype).itemsize < jnp.dtype(self.param_dtype).itemsize
        return self.dtype if narrower else self.param_dtype


def lora_targets(
    cfg: ModelConfig, lora: LoraConfig | None
) -> dict[tuple[str, str], tuple[bool, ...]]:
    """``{(group, name): (adapted in layer 0, adapted in layer 1, ...)}`` for every projection
    that ``lora`` adapts in at least one layer.

    The blocks are stacked, so every layer holds the same adapter slots. The slots of a layer
    that ``lora`` leaves out (``layers_to_transform``, or a target regex naming some layers)
    hold zeros: they add nothing to the output, their gradients are exactly zero, and AdamW
    leaves them at zero (zero moments give a zero step, and weight decay of zero is zero).
    Raises ValueError as ``ref_numpy.lora.selected_paths``.
    """
    if lora is None:
        return {}
    names = projection_names(cfg)
    chosen = set(selected_paths(projection_paths(cfg), cfg, lora))
    per_layer = {
        (g, n): tuple(f"layers.{i}.{g}.{n}" in chosen for i in range(cfg.n_layers))
        for g, n in names
    }
    return {gn: on for gn, on in per_layer.items() if any(on)}


def trainable_params(model: Model) -> int:
    """How many parameters train: every ``nnx.Param`` element, less the zero adapter slots of
    the layers the LoRA config leaves out."""
    targets = lora_targets(model.cfg, model.lora)
    n = 0
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        size = int(np.prod(var.get_value().shape))
        if path[0] == "layers" and path[-1] in LORA_LEAVES:
            on = targets[(str(path[1]), str(path[2]))]
            size = size // len(on) * sum(on)
        n += size
    return n


class MLP(nnx.Module):
    """``down(act(up(x)))`` or SwiGLU ``down(silu(gate(x)) * up(x))``, as ``mlp_forward``."""

    def __init__(self, cfg: ModelConfig, make: Callable[[str, str, int, int], Dense]) -> None:
        self.names = mlp_names(cfg)
        self.activation = cfg.activation
        for name, (d_in, d_out) in mlp_shapes(cfg).items():
            setattr(self, name, make("mlp", name, d_in, d_out))

    def __call__(self, x: Array, keys: dict[str, Array]) -> Array:
        """[B, T, D] -> [B, T, D]; ``keys`` maps projection names to dropout keys."""

        def proj(name: str, inp: Array) -> Array:
            dense: Dense = getattr(self, name)
            return dense(inp, keys.get(name))

        up_name, down_name = self.names[-2], self.names[-1]
        if self.activation == "swiglu":
            g = proj("gate_proj", x)  # [B,T,F]
            u = proj(up_name, x)  # [B,T,F]
            a = swiglu(g, u)  # [B,T,F]
        else:
            a = ACTIVATIONS[self.activation](proj(up_name, x))  # [B,T,F]
        return proj(down_name, a)  # [B,T,D]


class Block(nnx.Module):
    """One decoder block, pre-LN or post-LN, as ``block_forward``."""

    def __init__(
        self, cfg: ModelConfig, lora: LoraConfig | None, eng: EngineConfig, rngs: nnx.Rngs
    ) -> None:
        base = nnx.Param if lora is None and not eng.quantize else Frozen
        targets = lora_targets(cfg, lora)

        def make(group: str, name: str, d_in: int, d_out: int) -> Dense:
            return Dense(
                d_in,
                d_out,
                axes=proj_axes(group, name),
                bias=has_bias(cfg, name),
                base=base,
                lora=lora if (group, name) in targets else None,
                quantized=eng.quantize,
                blocksize=eng.nf4_blocksize,
                double_quant=eng.double_quant,
                param_dtype=jnp.dtype(eng.param_dtype),
                dtype=jnp.dtype(eng.dtype),
                rngs=rngs,
            )

        self.pre = cfg.norm_order == "pre"
        self.attn_norm = Norm(cfg.d_model, cfg.norm, cfg.norm_eps, base, jnp.dtype(eng.param_dtype))
        self.attn = Attention(
            cfg,
            make,
            impl=eng.attention,  # type: ignore[arg-type]  # resolved by Model
            make_norm=lambda d: Norm(
                d, "rmsnorm", cfg.norm_eps, base, jnp.dtype(eng.param_dtype), "head_dim"
            ),
        )
        self.mlp_norm = Norm(cfg.d_model, cfg.norm, cfg.norm_eps, base, jnp.dtype(eng.param_dtype))
        self.mlp = MLP(cfg, make)

    def __call__(
        self,
        x: Array,
        mask: Array,
        tables: RopeTables | None,
        key: Array | None,
        *,
        cache: KVCache | None = None,
        layer: int = 0,
        causal_only: bool = False,
    ) -> tuple[Array, KVCache | None]:
        """[B, T, D] -> [B, T, D], and the cache with this layer's keys and values written
        (see ``Attention.__call__``); ``key`` is the layer's dropout key, or None;
        ``causal_only``: ``mask`` is the plain causal mask (see ``attention.sdpa``)."""
        keys = module_keys(key)

        def attn(h: Array) -> tuple[Array, KVCache | None]:
            return self.attn(
                h,
                mask,
                tables,
                keys["attn"],
                cache=cache,
                layer=layer,
                causal_only=causal_only,
            )

        if self.pre:
            h = self.attn_norm(x)  # [B,T,D]
            a, new_cache = attn(h)  # [B,T,D]
            x = x + a  # [B,T,D]
            h = self.mlp_norm(x)  # [B,T,D]
            m = self.mlp(h, keys["mlp"])  # [B,T,D]
            return x + m, new_cache
        a, new_cache = attn(x)  # [B,T,D]
        x = self.attn_norm(x + a)  # [B,T,D]
        m = self.mlp(x, keys["mlp"])  # [B,T,D]
        return self.mlp_norm(x + m), new_cache  # [B,T,D]


_MODULE_IDS = {
    "attn": ("q_proj", "k_proj", "v_proj", "o_proj", "c_attn", "c_proj"),
    "mlp": ("gate_proj", "up_proj", "down_proj", "c_fc", "c_proj"),
}


def module_keys(layer_key: Array | None) -> dict[str, dict[str, Array]]:
    """The dropout key of every projection of a layer: ``fold_in(layer_key, id)``, with ids
    fixed by ``_MODULE_IDS`` (attn 0..5, mlp 100..104). Empty without a key."""
    if layer_key is None:
        return {"attn": {}, "mlp": {}}
    return {
        group: {name: jax.random.fold_in(layer_key, 100 * g + j) for j, name in enumerate(names)}
        for g, (group, names) in enumerate(_MODULE_IDS.items())
    }


class Table(nnx.Module):
    """An embedding table ``[rows, D]`` (token or learned-position embeddings)."""

    def __init__(
        self,
        rows: int,
        d: int,
        axes: tuple[str, str],
        base: type[nnx.Variable],
        param_dtype: Any,
        rngs: nnx.Rngs,
    ) -> None:
        w = jax.random.normal(rngs.params(), (rows, d), jnp.float32) * 0.02
        self.embedding = variable(base, w.astype(param_dtype), axes)


def _to_bits(a: Array, wide: bool) -> Array:
    """A bf16 array as its uint16 bits (``wide``), anything else as it is."""
    return jax.lax.bitcast_convert_type(a, jnp.uint16) if wide else a


def _from_bits(a: Array, wide: bool) -> Array:
    """Inverse of ``_to_bits``."""
    return jax.lax.bitcast_convert_type(a, jnp.bfloat16) if wide else a


class Model(nnx.Module):
    """The decoder: ``Model(cfg, lora, eng, rngs=...)(ids) -> logits [B, T, V]``.

    Args:
      cfg: architecture (shared with the spec).
      lora: adapter config, or None for full fine-tuning.
      eng: dtypes, attention path, remat policy, NF4 settings; its ``"auto"`` choices are
        resolved here for JAX's default backend (``EngineConfig.resolve``), and ``self.eng``
        holds the resolved config, so ``model.eng.attention`` says which path runs.
    """

    def __init__(
        self,
        cfg: ModelConfig,
        lora: LoraConfig | None = None,
        eng: EngineConfig | None = None,
        *,
        rngs: nnx.Rngs,
    ) -> None:
        eng = (EngineConfig() if eng is None else eng).resolve(cfg)
        base = nnx.Param if lora is None and not eng.quantize else Frozen
        self.cfg, self.lora, self.eng = cfg, lora, eng
        self.embed = Table(
            cfg.vocab_size, cfg.d_model, ("vocab", "embed"), base, eng.param_dtype, rngs
        )
        if cfg.position == "learned":
            self.pos_embed = Table(
                cfg.max_seq_len, cfg.d_model, ("positions", "embed"), base, eng.param_dtype, rngs
            )

        @nnx.split_rngs(splits=cfg.n_layers)
        @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
        def stack(rngs: nnx.Rngs) -> Block:
            return Block(cfg, lora, eng, rngs)

        self.layers = stack(rngs)
        for (group, name), on in lora_targets(cfg, lora).items():  # zero the unused slots
            if not all(on):
                slot = getattr(getattr(self.layers, group), name).lora_A
                keep = jnp.asarray(on, slot.get_value().dtype)[:, None, None]  # [L,1,1]
                slot.set_value(slot.get_value() * keep)  # [L,I,R]
        for _, var in nnx.iter_graph(self.layers):  # flax skips empty axis names (NF4 offset)
            if isinstance(var, nnx.Variable):
                axes = var.get_metadata().get("out_sharding")
                if axes is not None and len(axes) < var.get_value().ndim:
                    var.set_metadata(out_sharding=("layers", *axes))
        if cfg.norm_order == "pre":
            self.final_norm = Norm(
                cfg.d_model, cfg.norm, cfg.norm_eps, base, jnp.dtype(eng.param_dtype)
            )
        if not cfg.tie_embeddings:
            self.lm_head = Dense(
                cfg.d_model,
                cfg.vocab_size,
                axes=("embed", "vocab"),
                bias=False,
                base=base,
                lora=None,
                quantized=False,
                blocksize=eng.nf4_blocksize,
                double_quant=eng.double_quant,
                param_dtype=jnp.dtype(eng.param_dtype),
                dtype=jnp.dtype(eng.dtype),
                rngs=rngs,
            )
        if eng.frozen_dtype != eng.param_dtype:
            self._store_frozen(jnp.dtype(eng.frozen_dtype))

    def _store_frozen(self, dtype: jnp.dtype) -> None:
        """Frozen float base weights (the norms, embeddings and head too) stored in
        ``dtype``; NF4 state and trainable weights keep theirs."""
        for _, var in nnx.iter_graph(self):
            if isinstance(var, Frozen) and jnp.issubdtype(var.get_value().dtype, jnp.floating):
                var.set_value(var.get_value().astype(dtype))

    @overload
    def __call__(
        self,
        ids: Array,
        *,
        positions: Array | None = None,
        attention_mask_2d: Array | None = None,
        segment_ids: Array | None = None,
        dropout_key: Array | None = None,
        cache: None = None,
        layer_states: Sequence[Any] | None = None,
    ) -> Array: ...

    @overload
    def __call__(
        self,
        ids: Array,
        *,
        positions: Array | None = None,
        attention_mask_2d: Array | None = None,
        segment_ids: Array | None = None,
        dropout_key: Array | None = None,
        cache: KVCache,
        layer_states: Sequence[Any] | None = None,
    ) -> tuple[Array, KVCache]: ...

    def __call__(
        self,
        ids: Array,
        *,
        positions: Array | None = None,
        attention_mask_2d: Array | None = None,
        segment_ids: Array | None = None,
        dropout_key: Array | None = None,
        cache: KVCache | None = None,
        layer_states: Sequence[Any] | None = None,
    ) -> Array | tuple[Array, KVCache]:
        """Logits [B, T, V] (float32, or float64 in x64) for ids [B, T]; as ``model_forward``.

        With a ``cache`` the ids continue the cached positions (as the spec's
        ``forward_cached``) and the call returns ``(logits, cache)``; see ``hidden_states``.
        """
        x, new_cache = self.hidden_states(
            ids,
            positions=positions,
            attention_mask_2d=attention_mask_2d,
            segment_ids=segment_ids,
            dropout_key=dropout_key,
            cache=cache,
            layer_states=layer_states,
        )  # [B,T,D]
        logits = self.logits(x)  # [B,T,D] -> [B,T,V]
        return logits if new_cache is None else (logits, new_cache)

    def hidden_states(
        self,
        ids: Array,
        *,
        positions: Array | None = None,
        attention_mask_2d: Array | None = None,
        segment_ids: Array | None = None,
        dropout_key: Array | None = None,
        cache: KVCache | None = None,
        layer_states: Sequence[Any] | None = None,
    ) -> tuple[Array, KVCache | None]:
        """The last block's output [B, T, D] (before the final norm and the head).

        Args:
          ids: int [B, T] token ids.
          positions: int [B, T]; default ``0..T-1`` per row, or ``length..length+T-1`` after
            a cache's ``length`` filled positions (packing passes per-segment ones).
          attention_mask_2d: 1 (real) / 0 (padding) per key: [B, T], or [B, S] over the
            cache's S slots with a cache.
          segment_ids: [B, T] packed-example ids (training; not with a cache).
          dropout_key: turns LoRA dropout on: layer i uses ``split(dropout_key, L)[i]``, each
            projection ``module_keys`` of that.
          cache: keys and values of the earlier positions; the ids' own are written after
            them (at ``cache.length``) and ``length`` grows by T.
          layer_states: with a cache, each layer's state as ``layer_states()`` gives it;
            the decode loop takes them once, outside the loop (see below).
        Returns:
          [B, T, D] and the updated cache (None without one).
        """
        cfg, eng = self.cfg, self.eng
        b, t = ids.shape
        if cache is None:
            if positions is None:
                positions = jnp.broadcast_to(jnp.arange(t), (b, t))  # [B,T]
            s, start = t, None  # keys: the T ids themselves
        else:
            if segment_ids is not None:
                raise ValueError("segment_ids: packed examples are for training, not a KVCache")
            s, start = cache.size, cache.length  # keys: the cache's S slots
            if positions is None:
                positions = start + jnp.broadcast_to(jnp.arange(t), (b, t))  # [B,T]
        mask = attention_mask(
            b, t, s, padding=attention_mask_2d, segment_ids=segment_ids, start=start
        )  # [B,T,S]
        x = self.embed_tokens(ids, positions)  # [B,T,D]
        inv_freq = rope_inv_freq(cfg)  # [H/2] or None
        tables = None
        if inv_freq is not None:  # cos and sin [B,T,1,H], shared by every layer
            factor = rope_attention_factor(cfg.rope_scaling)
            tables = rope_tables(positions, inv_freq, factor, acc_dtype(x.dtype))
        keys = None if dropout_key is None else jax.random.split(dropout_key, cfg.n_layers)
        windows = layer_windows(cfg)  # [L] sliding windows, scanned with the layers, or None
        plain = cache is None and attention_mask_2d is None and segment_ids is None
        causal_only = plain and windows is None  # the fused attention paths take is_causal

        # Scan over the stacked blocks: one block's program, traced and compiled once, or
        # unrolled (``EngineConfig.layer_loop``); with a cache the blocks are unrolled on
        # per-layer states instead, below.
        graphdef, stacked = nnx.split(self.layers)
        Carry = tuple[Array, KVCache | None]

        def body(
            carry: Carry, xs: tuple[Any, Array | None, Array | None, int | None]
        ) -> tuple[Carry, None]:
            x, cache = carry
            layer_state, key, window, layer = xs
            m = mask  # [B,T,S]
            if window is not None:  # this layer's sliding window
                m = mask & attention_mask(b, t, s, window=window, start=start)
            block = nnx.merge(graphdef, layer_state)
            if layer is None:
                return block(x, m, tables, key, causal_only=causal_only), None
            return block(x, m, tables, key, cache=cache, layer=layer), None

        carry: Carry = (x, cache)
        if cache is None:
            unroll = eng.layer_loop == "unroll"
            step: Callable[..., tuple[Carry, None]] = body
            scanned: Any = stacked
            as_bits = not unroll and eng.remat != "none" and x.dtype == jnp.bfloat16
            if as_bits and jax.default_backend() == "cpu":
                # XLA's CPU backend slices a bf16 stack through a float32 copy of the whole
                # stack, made once per step. The frozen stacks go through the scan as their
                # bits instead (uint16, exact; a bitcast has no gradient, so never the trained
                # ones), each layer's slice turned back into bf16 inside the checkpointed body.
                # Without a remat policy the backward pass would keep every layer's bf16
                # slices, stacked through float32: the scan then takes the stacks as they are.
                trained, frozen = nnx.split_state(stacked, nnx.Param, ...)
                wide = jax.tree.map(lambda a: a.dtype == jnp.bfloat16, frozen)

                def step(carry: Carry, xs: tuple[Any, ...]) -> tuple[Carry, None]:
                    (tr, bits), *rest = xs
                    fr = jax.tree.map(_from_bits, bits, wide)
                    return body(carry, (nnx.merge_state(tr, fr), *rest))

                scanned = (trained, jax.tree.map(_to_bits, frozen, wide))
            if eng.remat != "none":
                step = jax.checkpoint(step, policy=REMAT_POLICIES[eng.remat])
            (x, _), _ = jax.lax.scan(step, carry, (scanned, keys, windows, None), unroll=unroll)
            return x, None  # [B,T,D]
        # With a cache (decoding) the layers run one after the other on their own states. A
        # scan over the stack would slice (copy) every weight of the model on each call: at
        # one token per call, more than half of a decode step on a CPU. The decode loop takes
        # the states out of the stack once (``layer_states``), before it starts.
        states = self.layer_states() if layer_states is None else layer_states
        for i, state in enumerate(states):
            key, window = jax.tree.map(lambda a, i=i: a[i], (keys, windows))
            carry, _ = body(carry, (state, key, window, i))
        x, new_cache = carry
        assert new_cache is not None
        return x, new_cache._replace(length=new_cache.length + t)  # [B,T,D]

    def layer_states(self) -> list[Any]:
        """Each block's state (an ``nnx.State`` of layer i's rows of the stacked variables),
        for ``hidden_states(..., layer_states=...)``."""
        stacked = nnx.split(self.layers)[1]
        return [jax.tree.map(lambda a, i=i: a[i], stacked) for i in range(self.cfg.n_layers)]

    def embed_tokens(self, ids: Array, positions: Array) -> Array:
        """Token (and sinusoidal / learned position) embeddings: [B, T] -> [B, T, D]."""
        cfg, eng = self.cfg, self.eng
        x = embedding(ids, self.embed.embedding[...]).astype(eng.dtype)  # [B,T] -> [B,T,D]
        if cfg.scale_embeddings:  # the 2017 paper scales embeddings by sqrt(D)
            x = x * jnp.asarray(cfg.d_model**0.5, eng.dtype)
        if cfg.position == "sinusoidal":
            x = sinusoidal(x, positions)  # [B,T,D]
        elif cfg.position == "learned":
            x = learned(x, positions, self.pos_embed.embedding[...].astype(eng.dtype))  # [B,T,D]
        return x

    def logits(self, x: Array, kernel: Array | None = None) -> Array:
        """Final norm (pre-LN models) and the head: [B, T, D] -> [B, T, V] in acc_dtype.

        ``kernel`` [D, V] stands in for ``head_kernel()`` where the caller holds it already
        (the decode program reads it from its own copy).

        Logits stay in acc_dtype: they can be large, and a bf16 logit of 10 is off by up to
        0.03, which moves its softmax probability by 3%. Their gradient is rounded to the
        compute dtype for the head's two backward products (``matmul``), as every activation
        gradient is under bf16 compute.
        """
        dt = jnp.dtype(self.eng.dtype)
        head = self.head_kernel() if kernel is None else kernel  # [D,V]
        return matmul(self.head_input(x), head, acc_dtype(dt))  # [B,T,V]

    def head_input(self, x: Array) -> Array:
        """The final norm of pre-LN models (the identity otherwise): [B, T, D] -> [B, T, D]."""
        return self.final_norm(x) if self.cfg.norm_order == "pre" else x

    def head_kernel(self) -> Array:
        """The head's kernel [D, V] in the compute dtype (the embedding table's transpose when
        tied)."""
        if self.cfg.tie_embeddings:
            head = self.embed.embedding[...].T  # [V,D] -> [D,V]
        else:
            head = self.lm_head.weight()  # [D,V]
        return head.astype(jnp.dtype(self.eng.dtype))


def causal_lm_loss(logits: Array, labels: Array) -> Array:
    """Next-token cross-entropy, mean over counted tokens (as the spec's ``causal_lm_loss``)."""
    loss, _ = cross_entropy(logits[:, :-1], labels[:, 1:])
    return loss


# --- the one mapping between the spec's param dict and the NNX state ------------------


def _spec_leaf(params: Any, path: tuple[Any, ...]) -> Any:
    node = params
    for key in path:
        node = getattr(node, str(key)) if isinstance(node, NF4Tensor) else node[key]
    return node


def _choice(lora: LoraConfig | None) -> str:
    """The selection of ``lora`` in words, for error messages."""
    if lora is None:
        return "lora=None"
    return f"LoraConfig(targets={lora.targets}, layers_to_transform={lora.layers_to_transform})"


def from_spec(
    params: dict[str, Any],
    cfg: ModelConfig,
    lora: LoraConfig | None = None,
    eng: EngineConfig | None = None,
) -> Model:
    """An engine model holding exactly the spec's parameters (adapters and NF4 included).

    Every variable of the model must be found in ``params`` with the same shape; layer
    leaves are stacked along the leading ``layers`` axis. The adapters in ``params`` must be
    exactly those ``lora`` selects; the slots of layers it leaves out are filled with zeros.
    """
    for proj, p in projections(params):
        if "lora_A" in p and (lora is None or not selects(proj, lora)):
            raise ValueError(f"{proj}: carries an adapter that {_choice(lora)} skips")
    targets = lora_targets(cfg, lora)
    abstract = nnx.eval_shape(lambda: Model(cfg, lora, eng, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    flat = []
    for path, var in nnx.to_flat_state(state):
        stacked = path[0] == "layers"
        want = tuple(var.get_value().shape)[1:] if stacked else tuple(var.get_value().shape)
        rows = []
        for i, layer in enumerate(params["layers"] if stacked else []):
            unused = path[-1] in LORA_LEAVES and not targets[(str(path[1]), str(path[2]))][i]
            rows.append(np.zeros(want) if unused else _spec_leaf(layer, path[1:]))
        for i, row in enumerate(rows if stacked else [_spec_leaf(params, path)]):
            if np.shape(row) != want:
                name = ".".join(map(str, ("layers", i, *path[1:]) if stacked else path))
                raise ValueError(f"{name}: expected shape {list(want)}, got {list(np.shape(row))}")
        value = np.stack([np.asarray(r) for r in rows]) if stacked else _spec_leaf(params, path)
        flat.append((path, var.replace(jnp.asarray(value, var.get_value().dtype))))
    return nnx.merge(graphdef, nnx.from_flat_state(flat))


def to_spec(model: Model) -> dict[str, Any]:
    """The spec's param dict (NumPy) of an engine model; NF4 kernels become ``NF4Tensor``.

    Adapters appear only where the LoRA config selects them; the zero slots of the other
    layers are dropped (ValueError if one is not zero).
    """
    params: dict[str, Any] = {"layers": [{} for _ in range(model.cfg.n_layers)]}
    nf4: dict[tuple[Any, ...], dict[str, np.ndarray]] = {}
    for path, var in nnx.to_flat_state(nnx.state(model)):
        stacked = path[0] == "layers"
        rows = list(np.asarray(var.get_value())) if stacked else [np.asarray(var.get_value())]
        trees = params["layers"] if stacked else [params]
        rel = path[1:] if stacked else path
        for i, (row, tree) in enumerate(zip(rows, trees, strict=True)):
            if isinstance(var, NF4State):  # one field of an NF4 kernel: gathered below
                nf4.setdefault((path[:-1], i), {})[str(path[-1])] = row
                continue
            node = tree
            for key in rel[:-1]:
                node = node.setdefault(key, {})
            node[rel[-1]] = row
    for (kernel_path, i), fields in nf4.items():
        module: Any = model
        for key in kernel_path:
            module = getattr(module, str(key))
        stacked = kernel_path[0] == "layers"
        node = params["layers"][i] if stacked else params
        rel = kernel_path[1:] if stacked else kernel_path
        for key in rel[:-1]:
            node = node.setdefault(key, {})
        node[rel[-1]] = module.spec_tensor(fields)
    if model.lora is not None:
        for proj, p in projections(params):
            if "lora_A" in p and not selects(proj, model.lora):
                for leaf in LORA_LEAVES:
                    if np.any(p[leaf]):
                        raise ValueError(
                            f"{proj}.{leaf}: non-zero, but {_choice(model.lora)} leaves this "
                            "layer out, so its slot must stay zero"
                        )
                    del p[leaf]
    return params
