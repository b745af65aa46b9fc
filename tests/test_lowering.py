"""Every program the engine runs on an accelerator lowers for CUDA GPUs and TPUs, on a CPU.

JAX lowers a jitted function for a platform it has no device of:
``jax.export.export(jitted, platforms=("cuda",))(*args)`` traces it on abstract arguments
(``jax.ShapeDtypeStruct``s, which may carry a sharding and a memory kind) and lowers it to
StableHLO with that platform's lowering rules. Here that is done, for ``cuda`` and for
``tpu`` separately, to:

* the training step as ``Trainer`` jits it (what ``fit`` steps), for LoRA and QLoRA under
  every remat policy, on the train command's batches (padding mask, positions, packed
  segments) and on plain ones (the benchmark's: the causal fast path of the fused attention),
  with the XLA and the einsum attention path, and with ``offload_optimizer`` (AdamW's moments
  in ``"pinned_host"`` memory);
* the step as ``MeshTrainer`` jits it (its outputs pinned to the rules' shardings) over a
  2 x 2 ``jax.sharding.AbstractMesh`` (``fsdp=2, tensor=2``), with and without the offload:
  abstract devices need no devices, so the 4-device program lowers in this 1-device process;
* the held-out loss of ``eval_loss`` and the decode program of ``generate``.

Models are built with ``nnx.eval_shape`` (no weights exist; the optimizer state is the only
thing allocated, a few thousand floats, because ``Trainer`` places it) and compute in bfloat16
with float32 adapters, as ``dtype="auto"`` resolves on a GPU or TPU
(``EngineConfig.resolve(cfg, backend=...)``). The loss is chunked (``loss_chunk`` below T), as
it is for the long rows of a GPU run.

What a lowering proves: every operation has a lowering rule for the platform, every custom
call is one JAX will serialize for it, no host callback is left in a program, the shardings
fit the mesh, and every memory kind is one the platform's devices have. That last check is made
here (``lower``): JAX checks memory kinds against the devices it has, and a CPU has
``"unpinned_host"``, which a GPU does not. What it does not prove: nothing is compiled for the
platform and no kernel runs, so XLA's GPU and TPU compilers (fusion, layouts, the SPMD
partitioning of the mesh programs, memory limits) and the numbers they produce are not
covered. The cuDNN attention path (``attention="cudnn"``, which ``"auto"`` picks on a GPU for
a head dim that is a multiple of 8) is not covered at all: ``jax.nn.dot_product_attention``
looks for cuDNN when it is traced with ``implementation="cudnn"`` and raises without a GPU.

RoPE's tables are checked to take their CPU-only loop on the CPU alone. The last tests seed
errors that a CPU run never shows and check that each is caught: a host callback in the step,
an operation with no TPU lowering, and optimizer state in a memory kind CUDA devices lack.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import pytest
from flax import nnx
from jax.sharding import AbstractMesh, NamedSharding, PartitionSpec
from jax.stages import Wrapped

from jax_impl import generate
from jax_impl.attention import cache_dtype
from jax_impl.layers import head_cross_entropy
from jax_impl.model import REMAT_POLICIES, EngineConfig, Model
from jax_impl.positional import rope_tables
from jax_impl.train import trainer as trainer_module
from jax_impl.train.sharding import MESH_AXES, batch_spec, state_shardings
from jax_impl.train.trainer import DPOConfig, OptimConfig, Trainer, _eval_step
from ref_numpy.config import LoraConfig
from ref_numpy.positional import rope_frequencies
from tests.test_model import CONFIGS

PLATFORMS = ("cuda", "tpu")
BACKEND = {"cuda": "gpu", "tpu": "tpu"}  # jax.default_backend()'s name for each platform

# Memory kinds of each platform's devices, which JAX cannot ask a device it does not have: XLA's
# GPU client gives a GPU its HBM and pinned host memory, a TPU also has unpinned host memory
# (JAX's own memory tests skip "unpinned_host" on GPUs). The CPU's are asked of the CPU.
MEMORY_KINDS = {
    "cuda": frozenset({"device", "pinned_host"}),
    "tpu": frozenset({"device", "pinned_host", "unpinned_host"}),
    "cpu": frozenset(m.kind for m in jax.devices("cpu")[0].addressable_memories()),
}

CFG = CONFIGS["llama-gqa-rope3"]  # V=13, D=10, L=2, F=14, N=4, K=2, H=4; Llama-3 RoPE scaling
LORA = LoraConfig(rank=3, alpha=6.0, dropout=0.1, targets=(r"layers\.\d+\..*",))  # all seven
A, B, T = 2, 3, 7  # micro-batches, rows, positions
MESH_B = 6  # rows on the mesh: a multiple of data x fsdp, 3 per shard
LOSS_CHUNK = 4  # the 6 predicted positions in 2 chunks, the last one padded
ROW_KEYS = ("input_ids", "labels", "attention_mask", "positions", "segment_ids")


@dataclasses.dataclass(frozen=True)
class Step:
    """One training program: its options, and its name in test ids."""

    method: str  # "lora" or "qlora"
    remat: str  # EngineConfig.remat
    attention: str = "xla"  # EngineConfig.attention
    batch: str = "rows"  # "rows": the train command's batch keys; "plain": ids and labels only
    offload: bool = False  # OptimConfig.offload_optimizer
    mesh: tuple[int, int, int] | None = None  # (data, fsdp, tensor): the MeshTrainer step
    objective: str = "sft"  # "dpo": pairs of rows, the reference with the adapters off

    def __str__(self) -> str:
        parts = [self.method, f"remat={self.remat}", f"attention={self.attention}", self.batch]
        if self.objective != "sft":
            parts.append(self.objective)
        if self.offload:
            parts.append("offload")
        if self.mesh is not None:
            parts.append("mesh=" + "x".join(map(str, self.mesh)))
        return "-".join(parts)


METHODS = ("lora", "qlora")
REMATS = ("none", *REMAT_POLICIES)
STEPS = [
    *(Step(m, r) for m in METHODS for r in REMATS),
    *(Step(m, "dots", batch="plain") for m in METHODS),
    *(Step(m, "none", attention="einsum") for m in METHODS),
    *(Step(m, "full", offload=True) for m in METHODS),
    *(Step(m, "dots", offload=o, mesh=(1, 2, 2)) for m in METHODS for o in (False, True)),
    *(Step(m, r, objective="dpo") for m in METHODS for r in ("none", "full")),
    *(Step(m, "dots", mesh=(1, 2, 2), objective="dpo") for m in METHODS),
]


@dataclasses.dataclass
class Program:
    """A jitted training step, the abstract arguments to lower it on, the trainer it steps and
    the mesh of its shardings (None: one device)."""

    fn: Wrapped
    args: tuple[Any, ...]
    trainer: Trainer
    mesh: AbstractMesh | None = None


def lower(fn: Wrapped, args: tuple[Any, ...], platform: str, **static: Any) -> jax.export.Exported:
    """``fn`` (jitted) lowered for ``platform`` on ``args`` (and static keyword arguments).

    Raises what the lowering raises, and ValueError when the program places an argument, a
    result or an intermediate in a memory kind the platform's devices do not have.
    """
    exported = jax.export.export(fn, platforms=(platform,))(*args, **static)
    found = set(
        re.findall(r'(?:mhlo\.memory_kind|_xla_buffer_placement) = "(\w+)"', text(exported))
    )
    missing = found - MEMORY_KINDS[platform]
    if missing:
        raise ValueError(
            f"{exported.fun_name} lowered for {platform}: memory kinds {sorted(missing)}, which "
            f"{platform} devices do not have (they have {sorted(MEMORY_KINDS[platform])})"
        )
    return exported


def text(exported: jax.export.Exported) -> str:
    """The lowered program as StableHLO text."""
    return exported.mlir_module()


def host_kinds(exported: jax.export.Exported) -> list[str]:
    """The host memory kinds the entry function's arguments and results are placed in, in
    order (device memory left out)."""
    (main,) = re.findall(r"^\s*func\.func public @main\(.*$", text(exported), re.MULTILINE)
    return [k for k in re.findall(r'mhlo\.memory_kind = "(\w+)"', main) if k != "device"]


def engine(method: str, remat: str, attention: str, platform: str) -> EngineConfig:
    """The engine config as a run on ``platform`` resolves ``dtype="auto"``."""
    eng = EngineConfig(
        attention=attention,  # type: ignore[arg-type]
        remat=remat,  # type: ignore[arg-type]
        quantize=method == "qlora",
        loss_chunk=LOSS_CHUNK,
    ).resolve(CFG, backend=BACKEND[platform])
    assert (eng.dtype, eng.param_dtype) == ("bfloat16", "float32")
    return eng


def abstract_model(eng: EngineConfig) -> Model:
    return nnx.eval_shape(lambda: Model(CFG, LORA, eng, rngs=nnx.Rngs(0)))


def make_trainer(step: Step, eng: EngineConfig) -> Trainer:
    """``Trainer.create`` on an abstract model: abstract params and frozen state, the
    optimizer state real (and offloaded to the CPU's pinned host memory with ``offload``)."""
    optim = OptimConfig(
        lr=1e-3, warmup_steps=2, total_steps=10, weight_decay=0.1, offload_optimizer=step.offload
    )
    objective = DPOConfig(beta=0.2) if step.objective == "dpo" else None
    return Trainer.create(abstract_model(eng), optim, dropout_seed=5, objective=objective)


def like(x: Any, sharding: Any = None) -> jax.ShapeDtypeStruct:
    """The abstract value of ``x`` (an array or a ShapeDtypeStruct), placed by ``sharding``,
    else where ``x`` is."""
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding or getattr(x, "sharding", None))


def train_program(step: Step, platform: str) -> Program:
    """``build_train_program`` for ``step`` as it resolves on ``platform``; built once per
    resolved config, so platforms that resolve alike share the program and its trace."""
    return _cached_program(step, engine(step.method, step.remat, step.attention, platform))


def build_train_program(step: Step, eng: EngineConfig) -> Program:
    """The jitted training step of ``step`` and abstract ``(params, opt_state, rest, batch,
    step)`` to call it on, as ``Trainer.step`` passes them."""
    trainer = make_trainer(step, eng)
    keys = ROW_KEYS if step.batch == "rows" else ROW_KEYS[:2]
    rows, mesh_rows = B, MESH_B
    if step.objective == "dpo":  # pairs as adjacent rows, whole pairs on each mesh shard
        keys, rows, mesh_rows = ROW_KEYS[:3], 2 * B, 2 * MESH_B
    count = jax.ShapeDtypeStruct((), jnp.int32)
    if step.mesh is None:  # Trainer's own jitted step, on the trainer's own state
        batch = {k: jax.ShapeDtypeStruct((A, rows, T), jnp.int32) for k in keys}
        state = (trainer.params, trainer.opt_state, trainer.rest)
        args = (*jax.tree.map(like, state), batch, count)
        return Program(trainer._step, args, trainer)
    # MeshTrainer's step on an abstract mesh: MeshTrainer itself places arrays on devices
    mesh = AbstractMesh(step.mesh, MESH_AXES)
    params = state_shardings(trainer.params, mesh)
    rest = state_shardings(trainer.rest, mesh)
    opt = trainer.opt_state_shardings(state_shardings(trainer.opt_state, mesh))
    replicated = NamedSharding(mesh, PartitionSpec())
    fn = jax.jit(trainer._step_impl, donate_argnums=(0, 1), out_shardings=(params, opt, replicated))
    split = NamedSharding(mesh, batch_spec(mesh))  # type: ignore[arg-type]
    batch = {k: jax.ShapeDtypeStruct((A, mesh_rows, T), jnp.int32, sharding=split) for k in keys}
    args = (
        jax.tree.map(like, trainer.params, params),
        jax.tree.map(like, trainer.opt_state, opt),
        jax.tree.map(like, trainer.rest, rest),
        batch,
        like(count, replicated),
    )
    return Program(fn, args, trainer, mesh)


_cached_program = functools.cache(build_train_program)


def n_moments(trainer: Trainer) -> int:
    """AdamW's moment arrays (the leaves offloading moves: all but the step counts)."""
    return sum(x.ndim > 0 for x in jax.tree.leaves(trainer.opt_state))


def spec_of(sharding: Any, ndim: int) -> tuple[Any, ...]:
    """A NamedSharding's spec over all ``ndim`` dimensions, and its memory kind."""
    spec = tuple(sharding.spec) + (None,) * (ndim - len(sharding.spec))
    return spec, sharding.memory_kind or "device"


@pytest.mark.parametrize("platform", PLATFORMS)
@pytest.mark.parametrize("step", STEPS, ids=str)
def test_training_step_lowers(step: Step, platform: str) -> None:
    program = train_program(step, platform)
    exported = lower(program.fn, program.args, platform)
    assert exported.platforms == (platform,)
    devices = 1 if step.mesh is None else AbstractMesh(step.mesh, MESH_AXES).size
    assert exported.nr_devices == devices
    moments = n_moments(program.trainer)
    assert moments == 2 * len(jax.tree.leaves(program.trainer.params))  # mu and nu per adapter
    # offloaded: every moment arrives in pinned host memory and leaves in it; else none do
    assert host_kinds(exported) == ["pinned_host"] * (2 * moments if step.offload else 0)
    if program.mesh is not None:  # the program carries the rules' shardings of every input
        given = [x.sharding for x in jax.tree.leaves(program.args)]
        lowered = exported.in_shardings_jax(program.mesh)
        ndims = [len(a.shape) for a in exported.in_avals]
        assert [spec_of(s, n) for s, n in zip(lowered, ndims, strict=True)] == [
            spec_of(s, n) for s, n in zip(given, ndims, strict=True)
        ]
        assert any("tensor" in spec for spec, _ in map(spec_of, given, ndims))  # split weights


@pytest.mark.parametrize("platform", PLATFORMS)
@pytest.mark.parametrize("method", METHODS)
def test_eval_loss_lowers(method: str, platform: str) -> None:
    model = abstract_model(engine(method, "none", "xla", platform))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)  # type: ignore[misc]
    batch = {k: jax.ShapeDtypeStruct((B, T), jnp.int32) for k in ROW_KEYS}  # one micro-batch
    exported = lower(_eval_step, (graphdef, params, rest, batch), platform)
    assert exported.platforms == (platform,)
    assert [a.shape for a in exported.out_avals] == [(), ()]  # loss sum and token count


@pytest.mark.parametrize("platform", PLATFORMS)
@pytest.mark.parametrize("method", METHODS)
def test_decode_lowers(method: str, platform: str) -> None:
    """``generate``'s program for 3 prompts of 3 tokens and up to 125 new ones (prompt bucket
    4, cache bucket 128: a loop on 64 slots, then one on 128), sampling with top-k and top-p,
    with up to 4 stop sequences of 4 tokens."""
    model = abstract_model(engine(method, "none", "xla", platform))
    graphdef, state = nnx.split(model)
    i32 = jax.ShapeDtypeStruct((), jnp.int32)
    f32 = jax.ShapeDtypeStruct((), jnp.float32)
    args = (
        graphdef,
        state,
        jax.ShapeDtypeStruct((B, 4), jnp.int32),  # the prompts, padded to the bucket
        i32,  # prompt length
        i32,  # new tokens
        jax.eval_shape(jax.random.key, 0),
        f32,  # temperature
        i32,  # top_k
        f32,  # top_p
        i32,  # eos id
        i32,  # pad id
        jax.ShapeDtypeStruct((4, 4), jnp.int32),  # stop sequences
        jax.ShapeDtypeStruct((4, 4), jnp.bool_),  # their real entries
    )
    assert generate.cache_sizes(4, 128) == (64, 128)
    static = dict(
        cache_len=128,
        cache_dtype=cache_dtype(model.eng.dtype, platform),
        transposed=generate.reads_transposed(model.eng.dtype, platform),
        greedy=False,
        use_top_k=True,
        use_top_p=True,
    )
    exported = lower(generate._decode, args, platform, **static)
    assert exported.platforms == (platform,)
    assert [a.shape for a in exported.out_avals] == [(B, 129), ()]  # tokens [B, S + 1], count
    assert text(exported).count("stablehlo.while") == 2  # both decode loops in one program


# --- the checks catch what a CPU run does not show -------------------------------------------


def seeded(trainer: Trainer, extra: Callable[[jax.Array], jax.Array]) -> Wrapped:
    """The trainer's step with one more metric, ``extra(loss)``, jitted as ``Trainer`` jits it."""

    def step(params: Any, opt_state: Any, rest: Any, batch: Any, count: Any) -> Any:
        params, opt_state, metrics = trainer._step_impl(params, opt_state, rest, batch, count)
        return params, opt_state, {**metrics, "seeded": extra(metrics["loss"])}

    return jax.jit(step, donate_argnums=(0, 1))


def print_loss(loss: jax.Array) -> jax.Array:
    """A debugging print left in the step: a host callback."""
    jax.debug.callback(lambda v: None, loss)
    return loss


def eigenvalues(loss: jax.Array) -> jax.Array:
    """A nonsymmetric eigendecomposition (``jnp.linalg.eig``): CPU and GPU only."""
    m = loss * jnp.asarray([[1.0, 2.0, 0.0], [0.0, 1.0, 3.0], [1.0, 0.0, 1.0]])  # [3,3]
    return jnp.abs(jnp.linalg.eigvals(m)).sum()


def test_rope_tables_loop_only_on_a_cpu() -> None:
    """RoPE's tables are formed in a loop over the rows on a CPU (where XLA would otherwise
    fuse the sines into every rotation) and in place on a GPU or TPU (where the loop would be
    B kernel launches per forward pass)."""
    inv = rope_frequencies(CFG.hd, CFG.rope_theta, CFG.rope_scaling)
    tables = jax.jit(lambda p: rope_tables(p, inv, 1.0, jnp.float32))
    positions = jax.ShapeDtypeStruct((B, T), jnp.int32)
    for platform in ("cpu", *PLATFORMS):
        module = jax.export.export(tables, platforms=(platform,))(positions).mlir_module()
        assert ("stablehlo.while" in module) == (platform == "cpu"), platform


def test_loss_reorders_its_rows_only_on_a_cpu() -> None:
    """The training loss takes counted targets first and skips chunks of prompts and padding
    on a CPU alone (the sort that orders them); on a GPU or TPU the rows of a batch sharded
    over devices stay where they are."""
    x = jax.ShapeDtypeStruct((B, T, CFG.d_model), jnp.bfloat16)
    w = jax.ShapeDtypeStruct((CFG.d_model, CFG.vocab_size), jnp.bfloat16)
    targets = jax.ShapeDtypeStruct((B, T), jnp.int32)
    grad = jax.jit(jax.grad(lambda x, w, t: head_cross_entropy(x, w, t, 0)[0]))
    for platform in ("cpu", *PLATFORMS):
        module = jax.export.export(grad, platforms=(platform,))(x, w, targets).mlir_module()
        assert ("stablehlo.sort" in module) == (platform == "cpu"), platform


@pytest.mark.parametrize("platform", PLATFORMS)
def test_a_host_callback_in_the_step_is_caught(platform: str) -> None:
    """It lowers and runs on a CPU, but a serialized program cannot call back into Python, and
    the callback has no lowering for a platform this process has no device of."""
    program = train_program(Step("lora", "none"), platform)
    fn = seeded(program.trainer, print_loss)
    assert "callback" in fn.lower(*program.args).as_text()  # on this CPU: fine
    with pytest.raises((ValueError, NotImplementedError), match=r"callback|lowering platform"):
        lower(fn, program.args, platform)


def test_an_operation_without_a_tpu_lowering_is_caught() -> None:
    """``eig`` lowers (and exports) for a CPU, and has no lowering rule for a TPU."""
    program = train_program(Step("lora", "none"), "tpu")
    fn = seeded(program.trainer, eigenvalues)
    assert lower(fn, program.args, "cpu").platforms == ("cpu",)
    with pytest.raises(NotImplementedError, match=r"'eig' not found for platform tpu"):
        lower(fn, program.args, "tpu")


@pytest.mark.parametrize("platform", PLATFORMS)
def test_optimizer_state_in_a_memory_kind_the_platform_lacks_is_caught(
    platform: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Offloading to ``"unpinned_host"`` works on a CPU and lowers for a TPU, but a GPU has no
    such memory; JAX lowers it for CUDA all the same, and ``lower`` refuses it. A kind no
    device has is refused when the trainer places its state."""
    step = Step("lora", "none", offload=True)
    eng = engine(step.method, step.remat, step.attention, platform)
    monkeypatch.setattr(trainer_module, "HOST", "unpinned_host")
    program = build_train_program(step, eng)
    moments = n_moments(program.trainer)
    if platform == "cuda":
        with pytest.raises(ValueError, match=r"lowered for cuda: memory kinds \['unpinned_host'\]"):
            lower(program.fn, program.args, platform)
    else:  # moments arrive unpinned; the step moves them back to pinned host memory
        kinds = host_kinds(lower(program.fn, program.args, platform))
        assert sorted(kinds) == sorted(["unpinned_host", "pinned_host"] * moments)
    monkeypatch.setattr(trainer_module, "HOST", "bogus")
    with pytest.raises(ValueError, match=r"--offload-optimizer.*no 'bogus' memory"):
        make_trainer(step, eng)
