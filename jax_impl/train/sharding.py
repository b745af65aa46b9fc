"""Training on a device mesh: the mesh, the one table of logical-axis rules, and placement.

The engine's variables carry logical axis names (``layers.variable``; NF4 fields in
``nf4._FIELD_AXES``), never mesh axes. This module lays a mesh with the named axes
``("data", "fsdp", "tensor")`` over them with one table, ``RULES``:

* ``data``: replicas. Every data-parallel group holds the whole state and a slice of the batch;
  the gradients are all-reduced over it.
* ``fsdp``: fully sharded data parallelism. The batch is split over it too, and so are the
  parameters, gradients, optimizer state and the NF4 bytes and block scales (along whole
  blocks); each layer's weights are all-gathered when the layer runs.
* ``tensor``: heads, MLP width and vocabulary are split, so each device computes part of
  every projection; partial sums are all-reduced per block.

Placement is plain ``jax.device_put`` with ``NamedSharding``s; the jitted train step then runs
SPMD: XLA inserts the collectives and propagates the shardings to the activations. The
result is the same model whatever the mesh, up to the order of floating-point sums.

A dimension that its mesh axes do not divide stays whole (replicated) on that dimension, so
any model runs on any mesh; a mesh axis of size 1 is left out of the spec. A batch must
divide over ``data`` x ``fsdp``: anything else would silently waste devices.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import field
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import AbstractMesh, Mesh, NamedSharding, PartitionSpec

from .trainer import Trainer

Array = jax.Array
MeshAxes = str | tuple[str, ...] | None
Rules = tuple[tuple[str, MeshAxes], ...]

MESH_AXES = ("data", "fsdp", "tensor")

# The one table: logical axis name -> mesh axis (or axes, or None: never split). The pairs
# are Flax's ``LogicalRules`` format, so ``nnx.logical_axis_rules(RULES)`` reads them too.
RULES: Rules = (
    ("batch", ("data", "fsdp")),  # rows of a batch (activations, inputs, labels)
    ("layers", None),  # the stacked blocks: every device runs every layer
    ("vocab", "tensor"),  # embedding rows, output-head columns, logits
    ("embed", "fsdp"),  # the model width D of every weight (and norm scales)
    ("q_heads", "tensor"),  # N*H: query heads
    ("kv_heads", "tensor"),  # K*H: key / value heads
    ("qkv_heads", "tensor"),  # GPT-2's fused q, k, v projection
    ("head_dim", None),  # H (Qwen3's per-head q / k norms)
    ("mlp", "tensor"),  # F: MLP hidden width
    ("lora_rank", None),  # R: small, kept whole
    ("positions", None),  # learned position embeddings' rows
    ("nf4_bytes", "fsdp"),  # packed NF4 bytes, row-major over the PyTorch [out, in] weight
    ("nf4_blocks", "fsdp"),  # NF4 block scales: one per block of weights, whole blocks per shard
)


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """The device mesh's shape; the product is the number of devices."""

    data: int = 1  # data-parallel replicas
    fsdp: int = 1  # shards of parameters, gradients and optimizer state (and of the batch)
    tensor: int = 1  # shards of heads, MLP width and vocabulary

    def __post_init__(self) -> None:
        for name in MESH_AXES:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"MeshConfig.{name}: expected an integer >= 1, got {value!r}")

    @property
    def shape(self) -> tuple[int, int, int]:
        """Sizes of ``("data", "fsdp", "tensor")``."""
        return (self.data, self.fsdp, self.tensor)

    @property
    def size(self) -> int:
        """Devices the mesh covers."""
        return math.prod(self.shape)

    def __str__(self) -> str:
        return ",".join(f"{name}={size}" for name, size in zip(MESH_AXES, self.shape, strict=True))


def parse_mesh(text: str | None, device_count: int | None = None) -> MeshConfig:
    """The ``--mesh`` flag, e.g. ``"data=2,fsdp=4"``, as a ``MeshConfig``.

    Axes left out have size 1, except ``data``, which takes the devices the others leave:
    ``None`` or ``""`` puts every device (``jax.device_count()`` unless ``device_count`` is
    given) on ``data``, and ``"fsdp=4"`` on 8 devices is ``data=2,fsdp=4``. Raises
    ValueError naming the flag and the bad part.
    """
    sizes: dict[str, int] = {}
    for part in (text or "").split(","):
        if not part.strip():
            continue
        name, eq, value = (s.strip() for s in part.partition("="))
        if not eq or not name or not value:
            raise ValueError(
                f"--mesh: {part.strip()!r} is not axis=size (expected e.g. data=2,fsdp=4)"
            )
        if name not in MESH_AXES:
            raise ValueError(
                f"--mesh: unknown axis {name!r} in {part.strip()!r}; axes: {MESH_AXES}"
            )
        if name in sizes:
            raise ValueError(f"--mesh: axis {name!r} given twice in {text!r}")
        if not value.isdigit() or int(value) < 1:
            raise ValueError(f"--mesh: {part.strip()!r}: the size must be an integer >= 1")
        sizes[name] = int(value)
    if "data" not in sizes:
        n = jax.device_count() if device_count is None else device_count
        rest = sizes.get("fsdp", 1) * sizes.get("tensor", 1)
        if n % rest:
            raise ValueError(
                f"--mesh: {text!r} uses {rest} devices per replica, which does not divide the "
                f"{n} devices; give data= too, or sizes whose product divides {n}"
            )
        sizes["data"] = n // rest
    return MeshConfig(**sizes)


def make_mesh(cfg: MeshConfig, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A ``jax.sharding.Mesh`` of shape ``cfg.shape`` with axes ``("data", "fsdp", "tensor")``
    over ``devices`` (default: every device of every process), laid out for the physical
    topology by ``jax.make_mesh``. The axes are ``Auto``: jit propagates shardings."""
    devices = list(jax.devices() if devices is None else devices)
    if cfg.size != len(devices):
        raise ValueError(
            f"--mesh {cfg}: covers {cfg.size} devices, but there are {len(devices)} "
            f"({devices[0].platform if devices else 'none'}); make the sizes multiply to "
            f"{len(devices)}"
        )
    auto = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
    return jax.make_mesh(cfg.shape, MESH_AXES, axis_types=auto, devices=devices)


def logical_spec(
    names: Sequence[str | None],
    shape: Sequence[int],
    mesh: Mesh | AbstractMesh,
    rules: Rules = RULES,
    what: str = "array",
) -> PartitionSpec:
    """The ``PartitionSpec`` of an array with logical axis ``names`` on ``mesh``.

    Each name maps to mesh axes by ``rules``; axes of size 1, axes an earlier dimension
    already uses, and a mapping whose mesh size does not divide the dimension are dropped
    (that dimension stays whole). ``mesh`` may be an ``AbstractMesh`` (no devices needed).
    ``what`` names the array in errors.
    """
    if len(names) != len(shape):
        raise ValueError(f"{what}: {len(names)} axis names {tuple(names)} for shape {tuple(shape)}")
    table = dict(rules)
    used: set[str] = set()
    out: list[MeshAxes] = []
    for name, dim in zip(names, shape, strict=True):
        if name is None:
            out.append(None)
            continue
        if name not in table:
            raise ValueError(f"{what}: logical axis {name!r} has no rule; known: {sorted(table)}")
        target = table[name]
        axes = (target,) if isinstance(target, str) else tuple(target or ())
        axes = tuple(a for a in axes if mesh.shape[a] > 1 and a not in used)
        if not axes or dim % math.prod(mesh.shape[a] for a in axes):
            out.append(None)
            continue
        used.update(axes)
        out.append(axes[0] if len(axes) == 1 else axes)
    return PartitionSpec(*out)


def _is_var(x: Any) -> bool:
    return isinstance(x, nnx.Variable)


def state_shardings(tree: Any, mesh: Mesh | AbstractMesh, rules: Rules = RULES) -> Any:
    """The ``NamedSharding`` of every array of ``tree``, in its structure.

    ``tree`` is an ``nnx.State`` (the ``params`` or ``rest`` of ``nnx.split``) or any pytree
    holding ``nnx.Variable``s, such as optax's state of such params (its moments keep the
    variables' metadata); a variable is sharded by its logical names (``out_sharding``
    metadata), any other array (a step count) is replicated. Leaves may be arrays or
    ``jax.ShapeDtypeStruct``s.
    """

    def one(path: Any, x: Any) -> Any:
        what = jax.tree_util.keystr(path)
        if isinstance(x, nnx.Variable):
            value = x.get_value()
            names = x.get_metadata().get("out_sharding") or (None,) * len(value.shape)
            spec = logical_spec(names, value.shape, mesh, rules, what)
            return x.replace(NamedSharding(mesh, spec))
        return NamedSharding(mesh, PartitionSpec())

    return jax.tree_util.tree_map_with_path(one, tree, is_leaf=_is_var)


def shard_state(tree: Any, mesh: Mesh, rules: Rules = RULES) -> Any:
    """``tree`` (see ``state_shardings``) placed on ``mesh`` by the rules."""
    return jax.device_put(tree, state_shardings(tree, mesh, rules))


def batch_spec(mesh: Mesh, rules: Rules = RULES) -> PartitionSpec:
    """``PartitionSpec`` of a batch array ``[A, B, T]``: rows B over ``data`` x ``fsdp``."""
    axes = dict(rules)["batch"]
    axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
    kept = tuple(a for a in axes if mesh.shape[a] > 1)
    return PartitionSpec(None, kept or None, None)


def _row_blocks(mesh: Mesh, rules: Rules = RULES) -> tuple[int, int]:
    """``(blocks, held)``: the pieces a batch's rows are cut into on ``mesh``, and how many of
    them this process's devices hold (all of them in a single-process run)."""
    rows = batch_spec(mesh, rules)[1]
    axes = (rows,) if isinstance(rows, str) else tuple(rows or ())
    where = [mesh.axis_names.index(a) for a in axes]
    held = {
        tuple(index[i] for i in where)
        for index, device in np.ndenumerate(mesh.devices)
        if device.process_index == jax.process_index()
    }
    return math.prod(mesh.shape[a] for a in axes), len(held)


def process_rows(mesh: Mesh, batch_size: int, rules: Rules = RULES) -> tuple[int, int]:
    """``(lo, hi)``: the rows ``[lo, hi)`` of each micro-batch of ``batch_size`` rows that
    this process's devices hold, so the process reads only those.

    That is every row in a single-process run, and ``[i * B / P, (i + 1) * B / P)`` for
    process ``i`` of ``P`` when ``data`` x ``fsdp`` is laid over the processes in order (as
    ``make_mesh`` does); processes that differ only along ``tensor`` read the same rows.
    Raises ValueError when the rows do not divide over ``data`` x ``fsdp``.
    """
    blocks, _ = _row_blocks(mesh, rules)
    if batch_size % blocks:
        raise ValueError(
            f"batch_size {batch_size}: does not divide over the {blocks} devices of mesh axes "
            f"data x fsdp; use a multiple of {blocks}"
        )
    sharding = NamedSharding(mesh, batch_spec(mesh, rules))
    held = sharding.addressable_devices_indices_map((1, batch_size, 1)).values()
    spans = sorted({index[1].indices(batch_size)[:2] for index in held if index is not None})
    if any(a[1] != b[0] for a, b in itertools.pairwise(spans)):
        raise ValueError(
            f"mesh {dict(mesh.shape)}: this process's devices hold the rows {spans} of a batch, "
            "which are not one contiguous block"
        )
    return spans[0][0], spans[-1][1]


def shard_batch(batch: dict[str, Any], mesh: Mesh, rules: Rules = RULES) -> dict[str, Array]:
    """A batch of arrays ``[A, B, T]`` (or ``[A, B]``, one value per row) placed with rows B
    split over ``data`` x ``fsdp``.

    ``batch`` holds this process's rows (``process_rows``; all of them in a single-process
    run); the global array is assembled with ``jax.make_array_from_process_local_data``.
    Raises ValueError if an array is not 2-D or 3-D or its rows do not divide over the devices.
    """
    spec = batch_spec(mesh, rules)
    rows = spec[1]
    split, held = _row_blocks(mesh, rules)
    out = {}
    for name, value in batch.items():
        value = np.asarray(value)
        if value.ndim not in (2, 3):
            raise ValueError(
                f"batch[{name!r}]: expected [A, B, T] (or [A, B], one value per row), got shape "
                f"{value.shape}"
            )
        sharding = NamedSharding(mesh, PartitionSpec(*spec[: value.ndim]))
        if value.shape[1] % held:
            rows_global = value.shape[1] * split // held
            raise ValueError(
                f"batch[{name!r}]: {rows_global} rows per micro-batch do not divide over "
                f"the {split} devices of mesh axes {rows}; use a batch size that is a "
                f"multiple of {split}"
            )
        out[name] = jax.make_array_from_process_local_data(sharding, value)
    return out


def process_sum(value: int) -> int:
    """The sum of ``value`` over the processes of the run (a collective: every process must
    call it, in the same order); ``value`` itself in a single-process run."""
    if jax.process_count() == 1:
        return value
    from jax.experimental import multihost_utils

    return int(np.sum(multihost_utils.process_allgather(np.asarray(value, np.int32))))


def to_host(tree: Any) -> Any:
    """``tree`` with every array as a whole NumPy array on this process, the shards other
    processes hold gathered in (a collective: every process of the run must call it, in the
    same order)."""
    from jax.experimental import multihost_utils

    def one(x: Any) -> Any:
        if not isinstance(x, jax.Array):
            return x
        if x.is_fully_addressable:
            return np.asarray(x)
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))

    return jax.tree.map(one, tree)


def per_device_bytes(x: Array) -> dict[int, int]:
    """``{device id: bytes}`` of the shards of ``x`` this process holds."""
    out: dict[int, int] = {}
    for shard in x.addressable_shards:
        out[shard.device.id] = out.get(shard.device.id, 0) + shard.data.nbytes
    return out


@dataclasses.dataclass(kw_only=True)
class MeshTrainer(Trainer):
    """A ``Trainer`` whose state lives on ``mesh``, sharded by ``rules``.

    Construction places ``params``, ``rest`` and ``opt_state`` on the mesh; the step is the
    same jitted function with its outputs pinned to those shardings (so the donated buffers
    are reused and the state never drifts to another layout); ``step`` splits the batch's
    rows over ``data`` x ``fsdp``. Build one from a trainer with ``shard_trainer``.
    """

    mesh: Mesh
    rules: Rules = RULES

    def __post_init__(self) -> None:
        super().__post_init__()
        self.params = shard_state(self.params, self.mesh, self.rules)
        self.rest = shard_state(self.rest, self.mesh, self.rules)
        if self.ref_params is not None:  # full DPO's frozen reference, laid out as params
            self.ref_params = shard_state(self.ref_params, self.mesh, self.rules)
        # AdamW's moments in host memory with --offload-optimizer, sharded all the same
        opt = self.opt_state_shardings(state_shardings(self.opt_state, self.mesh, self.rules))
        self.opt_state = jax.device_put(self.opt_state, opt)
        out = (
            state_shardings(self.params, self.mesh, self.rules),
            opt,
            NamedSharding(self.mesh, PartitionSpec()),  # the metrics, replicated
        )
        self._step = jax.jit(self._step_impl, donate_argnums=(0, 1), out_shardings=out)

    def step(self, batch: dict[str, Any]) -> dict[str, Array]:
        """One optimizer step on ``batch`` (arrays ``[A, B, T]``, rows split over the mesh)."""
        return super().step(shard_batch(batch, self.mesh, self.rules))


def shard_trainer(trainer: Trainer, mesh: Mesh, rules: Rules = RULES) -> MeshTrainer:
    """A ``MeshTrainer`` with ``trainer``'s state and settings, placed on ``mesh``."""
    fields = {f.name: getattr(trainer, f.name) for f in dataclasses.fields(trainer) if f.init}
    return MeshTrainer(**fields, mesh=mesh, rules=rules)


# --- several processes --------------------------------------------------------------------

DISTRIBUTED_ENV = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID")


def distributed_args(
    coordinator: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    environ: Mapping[str, str] | None = None,
) -> dict[str, Any] | None:
    """The keyword arguments of ``jax.distributed.initialize`` for this process, or None for
    a single-process run.

    The arguments come from the flags (``--coordinator host:port``, ``--num-processes``,
    ``--process-id``), else from the environment (``JAX_COORDINATOR_ADDRESS``,
    ``JAX_NUM_PROCESSES``, ``JAX_PROCESS_ID``). A coordinator of ``auto``, or a Slurm job of
    more than one task (``SLURM_NTASKS``), gives ``{}``: JAX detects the cluster itself (Slurm,
    Cloud TPU, Open MPI). Raises ValueError naming the flag and variable that is missing or
    not an integer in range.
    """
    env = os.environ if environ is None else environ
    coordinator = coordinator or env.get("JAX_COORDINATOR_ADDRESS") or None
    if coordinator is None:
        return {} if int(env.get("SLURM_NTASKS", "1") or 1) > 1 else None
    if coordinator == "auto":
        return {}
    given = {"num_processes": num_processes, "process_id": process_id}
    for (name, value), var in zip(given.items(), DISTRIBUTED_ENV[1:], strict=True):
        flag = "--" + name.replace("_", "-")
        if value is None:
            text = env.get(var)
            if text is None:
                raise ValueError(f"{flag}: needed with coordinator {coordinator!r} (or set {var})")
            if not text.strip().isdigit():
                raise ValueError(f"{flag}: {var}={text!r} is not a non-negative integer")
            value = int(text)
        given[name] = value
    n, i = given["num_processes"], given["process_id"]
    assert n is not None and i is not None
    if n < 1:
        raise ValueError(f"--num-processes: expected >= 1, got {n}")
    if not 0 <= i < n:
        raise ValueError(f"--process-id: expected 0 <= id < {n} (--num-processes), got {i}")
    return {"coordinator_address": coordinator, "num_processes": n, "process_id": i}


@dataclasses.dataclass(frozen=True)
class DistributedConfig:
    """The devices a run trains on: the mesh over them and, for a run of several processes,
    how the processes find each other (``jax.distributed``). A run setting: it may change
    when a run resumes, since checkpoints restore onto any mesh."""

    mesh: str | None = field(
        default=None,
        metadata={
            "help": "device mesh as axis=size over data, fsdp and tensor (data=2,fsdp=4); the "
            "sizes multiply to the devices of all processes",
            "default_text": "every device on data",
            "metavar": "AXES",
        },
    )
    coordinator: str | None = field(
        default=None,
        metadata={
            "help": "HOST:PORT of process 0 of a run of several processes, or auto (JAX "
            "detects Slurm, Cloud TPU, Open MPI)",
            "default_text": "$JAX_COORDINATOR_ADDRESS, else one process (or Slurm's tasks)",
            "metavar": "HOST:PORT",
        },
    )
    num_processes: int | None = field(
        default=None,
        metadata={
            "help": "processes of the run, with --coordinator",
            "default_text": "$JAX_NUM_PROCESSES",
        },
    )
    process_id: int | None = field(
        default=None,
        metadata={
            "help": "this process's index, 0 to --num-processes - 1",
            "default_text": "$JAX_PROCESS_ID",
        },
    )
    heartbeat_timeout: int = field(
        default=100,
        metadata={
            "help": "seconds a process of a multi-process run may go silent before the others "
            "take it for dead and stop"
        },
    )

    def __post_init__(self) -> None:
        if isinstance(self.heartbeat_timeout, bool) or not self.heartbeat_timeout >= 1:
            raise ValueError(
                f"DistributedConfig.heartbeat_timeout: expected >= 1, got {self.heartbeat_timeout}"
            )


def initialize_distributed(cfg: DistributedConfig) -> bool:
    """Join a multi-process run (``jax.distributed.initialize``) when ``distributed_args``
    says this is one; must run before anything touches a device. True if this process is
    part of one (joined now, or before)."""
    if jax.distributed.is_initialized():
        return True
    args = distributed_args(cfg.coordinator, cfg.num_processes, cfg.process_id)
    if args is None:
        return False
    jax.distributed.initialize(**args, heartbeat_timeout_seconds=cfg.heartbeat_timeout)
    return True
