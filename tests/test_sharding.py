"""Training on a device mesh: the mesh flag, the logical-axis rules, placement, sharded steps
that equal one device, and orbax checkpoints that resume on another mesh.

The multi-device runs happen in one subprocess (``tests/sharding_worker.py``) with 8 simulated
CPU devices, so the rest of the suite keeps one device.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import AbstractMesh, PartitionSpec

from jax_impl.model import EngineConfig, Model
from jax_impl.train.orbax_state import TrainCheckpoints
from jax_impl.train.sharding import (
    MESH_AXES,
    RULES,
    MeshConfig,
    distributed_args,
    logical_spec,
    make_mesh,
    parse_mesh,
    shard_batch,
    shard_trainer,
    state_shardings,
)
from jax_impl.train.trainer import OptimConfig, Trainer, optimizer
from ref_numpy.config import LoraConfig
from tests.helpers import RTOL, simulated_devices_env
from tests.sharding_worker import MESHES, SAVED_AT
from tests.test_model import CONFIGS

ROOT = Path(__file__).resolve().parents[1]


def abstract_mesh(data: int, fsdp: int, tensor: int) -> AbstractMesh:
    return AbstractMesh((data, fsdp, tensor), MESH_AXES)


# --- the --mesh flag and the mesh --------------------------------------------------------


def test_parse_mesh() -> None:
    assert parse_mesh("data=2,fsdp=4", 8) == MeshConfig(data=2, fsdp=4, tensor=1)
    assert parse_mesh(" tensor=2 , fsdp=2, data=2 ", 8) == MeshConfig(2, 2, 2)
    assert parse_mesh(None, 8) == MeshConfig(data=8)  # every device on data
    assert parse_mesh("", 3) == MeshConfig(data=3)
    assert parse_mesh("fsdp=4", 8) == MeshConfig(data=2, fsdp=4)  # data takes the rest
    assert parse_mesh("data=1,fsdp=2", 8) == MeshConfig(data=1, fsdp=2)  # data given: kept
    assert str(MeshConfig(2, 4, 1)) == "data=2,fsdp=4,tensor=1"
    assert parse_mesh(str(MeshConfig(2, 2, 2)), 8) == MeshConfig(2, 2, 2)
    assert parse_mesh(None) == MeshConfig(data=jax.device_count())


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("data2", "'data2' is not axis=size"),
        ("data=", "'data=' is not axis=size"),
        ("model=2", "unknown axis 'model'"),
        ("data=2,data=2", "axis 'data' given twice"),
        ("fsdp=0", "'fsdp=0': the size must be an integer >= 1"),
        ("fsdp=-1", "'fsdp=-1': the size must be an integer >= 1"),
        ("tensor=two", "'tensor=two': the size must be an integer >= 1"),
        ("fsdp=3", "3 devices per replica, which does not divide the 8 devices"),
    ],
)
def test_parse_mesh_errors_name_the_flag_and_the_part(text: str, words: str) -> None:
    with pytest.raises(ValueError, match="--mesh") as err:
        parse_mesh(text, 8)
    assert words in str(err.value)


@pytest.mark.parametrize(("field", "value"), [("data", 0), ("fsdp", -2), ("tensor", True)])
def test_mesh_config_validation_names_the_field(field: str, value: Any) -> None:
    with pytest.raises(ValueError, match=f"MeshConfig.{field}: expected an integer >= 1"):
        MeshConfig(**{field: value})


def test_make_mesh() -> None:
    mesh = make_mesh(MeshConfig())
    assert mesh.axis_names == MESH_AXES
    assert dict(mesh.shape) == {"data": 1, "fsdp": 1, "tensor": 1}
    assert mesh.axis_types == (jax.sharding.AxisType.Auto,) * 3
    n = jax.device_count()
    with pytest.raises(ValueError, match=rf"--mesh data=2,fsdp=4,tensor=1: covers 8 devices, "
                       rf"but there are {n}"):  # fmt: skip
        make_mesh(MeshConfig(data=2, fsdp=4))


@pytest.mark.parametrize(
    ("flags", "env", "want"),
    [
        ({}, {}, None),  # one process
        ({}, {"SLURM_NTASKS": "1"}, None),
        ({}, {"SLURM_NTASKS": "4"}, {}),  # JAX reads Slurm itself
        ({"coordinator": "auto"}, {}, {}),
        (
            {},
            {"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234", "JAX_NUM_PROCESSES": "4",
             "JAX_PROCESS_ID": "3"},
            {"coordinator_address": "10.0.0.1:1234", "num_processes": 4, "process_id": 3},
        ),
        (
            {"coordinator": "h:1", "num_processes": 2, "process_id": 0},
            {"JAX_NUM_PROCESSES": "8", "JAX_PROCESS_ID": "5"},  # flags win
            {"coordinator_address": "h:1", "num_processes": 2, "process_id": 0},
        ),
    ],
)  # fmt: skip
def test_distributed_args(flags: dict, env: dict, want: dict | None) -> None:
    assert distributed_args(**flags, environ=env) == want


@pytest.mark.parametrize(
    ("flags", "env", "words"),
    [
        ({"coordinator": "h:1"}, {}, "--num-processes: needed with coordinator 'h:1' (or set "
         "JAX_NUM_PROCESSES)"),
        ({"coordinator": "h:1", "num_processes": 2}, {}, "--process-id: needed with"),
        ({}, {"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "two"},
         "--num-processes: JAX_NUM_PROCESSES='two' is not a non-negative integer"),
        ({"coordinator": "h:1", "num_processes": 2, "process_id": 2}, {},
         "--process-id: expected 0 <= id < 2 (--num-processes), got 2"),
        ({"coordinator": "h:1", "num_processes": 0, "process_id": 0}, {},
         "--num-processes: expected >= 1, got 0"),
    ],
)  # fmt: skip
def test_distributed_args_errors_name_the_flag(flags: dict, env: dict, words: str) -> None:
    with pytest.raises(ValueError) as err:
        distributed_args(**flags, environ=env)
    assert str(err.value).startswith(words), str(err.value)


# --- the rules ---------------------------------------------------------------------------


def test_logical_spec_maps_names_and_keeps_what_does_not_divide_whole() -> None:
    mesh = abstract_mesh(2, 4, 2)
    assert logical_spec(("embed", "q_heads"), (32, 16), mesh) == PartitionSpec("fsdp", "tensor")
    assert logical_spec(("mlp", "embed"), (64, 32), mesh) == PartitionSpec("tensor", "fsdp")
    assert logical_spec(("layers", "embed", "lora_rank"), (2, 32, 4), mesh) == PartitionSpec(
        None, "fsdp", None
    )
    assert logical_spec((None, "batch", None), (2, 8, 7), mesh) == PartitionSpec(
        None, ("data", "fsdp"), None
    )
    # 10 does not divide over fsdp=4; 13 not over tensor=2: those dimensions stay whole
    assert logical_spec(("embed", "q_heads"), (10, 16), mesh) == PartitionSpec(None, "tensor")
    assert logical_spec(("vocab", "embed"), (13, 32), mesh) == PartitionSpec(None, "fsdp")
    # a mesh axis of size 1 is left out; a mesh axis is used once per array
    assert logical_spec(("embed", "mlp"), (32, 64), abstract_mesh(8, 1, 1)) == PartitionSpec(
        None, None
    )
    assert logical_spec(("nf4_bytes", "embed"), (64, 32), mesh) == PartitionSpec("fsdp", None)
    assert logical_spec((), (), mesh) == PartitionSpec()


def test_logical_spec_errors_name_the_array() -> None:
    mesh = abstract_mesh(1, 2, 1)
    with pytest.raises(ValueError, match=r"w: logical axis 'heads' has no rule; known: \["):
        logical_spec(("embed", "heads"), (4, 4), mesh, what="w")
    with pytest.raises(ValueError, match=r"w: 1 axis names \('embed',\) for shape \(4, 4\)"):
        logical_spec(("embed",), (4, 4), mesh, what="w")


def test_every_logical_name_of_every_family_has_a_rule() -> None:
    """The table covers every name the engine's variables carry (all families, LoRA and
    QLoRA), so a new name cannot slip through unsharded by accident."""
    lora = LoraConfig(rank=3, alpha=6.0, targets=(r"layers\.\d+\..*",))  # every projection
    names: set[str] = set()
    for cfg in CONFIGS.values():
        for quantize in (False, True):
            eng = EngineConfig(quantize=quantize)
            model = nnx.eval_shape(lambda c=cfg, e=eng: Model(c, lora, e, rngs=nnx.Rngs(0)))
            for _, var in nnx.to_flat_state(nnx.state(model)):
                names.update(n for n in var.get_metadata()["out_sharding"] if n is not None)
    assert names == {n for n, _ in RULES} - {"batch"}, names ^ {n for n, _ in RULES}


def test_state_shardings_of_a_qlora_model_and_its_optimizer_state() -> None:
    cfg = CONFIGS["llama-gqa-rope3"]  # V=13, D=10, N*H=16, K*H=8, F=14
    lora = LoraConfig(rank=3, alpha=6.0, targets=("q_proj", "down_proj"))
    model = nnx.eval_shape(lambda: Model(cfg, lora, EngineConfig(quantize=True), rngs=nnx.Rngs(0)))
    _, params, rest = nnx.split(model, nnx.Param, ...)
    mesh = abstract_mesh(1, 2, 2)

    def spec(tree: Any, *path: str) -> PartitionSpec:
        node = state_shardings(tree, mesh)
        for key in path:
            node = node[key]
        return node.get_value().spec

    assert spec(params, "layers", "attn", "q_proj", "lora_A") == PartitionSpec(None, "fsdp", None)
    assert spec(params, "layers", "attn", "q_proj", "lora_B") == PartitionSpec(None, None, "tensor")
    assert spec(params, "layers", "mlp", "down_proj", "lora_A") == PartitionSpec(
        None, "tensor", None
    )
    assert spec(rest, "embed", "embedding") == PartitionSpec(None, "fsdp")  # 13 rows stay whole
    kernel = ("layers", "attn", "q_proj", "kernel")
    assert spec(rest, *kernel, "packed") == PartitionSpec(None, "fsdp")  # [L, 80] bytes
    assert spec(rest, *kernel, "absmax") == PartitionSpec(None, None)  # [L, 3] blocks: whole
    assert spec(rest, *kernel, "offset") == PartitionSpec(None)
    opt = jax.eval_shape(optimizer(OptimConfig(total_steps=100)).init, params)  # clip, then AdamW
    shardings = state_shardings(opt, mesh)
    adam = shardings[1][0]
    assert adam.mu["layers"]["attn"]["q_proj"]["lora_B"].get_value().spec == PartitionSpec(
        None, None, "tensor"
    )
    assert adam.count.spec == PartitionSpec()


def test_shard_batch_takes_rows_of_tokens_or_of_values() -> None:
    mesh = make_mesh(MeshConfig())
    out = shard_batch({"input_ids": np.arange(6).reshape(1, 2, 3)}, mesh)
    np.testing.assert_array_equal(out["input_ids"], np.arange(6).reshape(1, 2, 3))
    out = shard_batch({"ref_logps": np.arange(2.0).reshape(1, 2)}, mesh)  # one value per row
    np.testing.assert_array_equal(out["ref_logps"], np.arange(2.0).reshape(1, 2))
    for shape in ((3,), (1, 2, 3, 1)):
        with pytest.raises(ValueError, match=r"batch\['labels'\]: expected \[A, B, T\] \(or"):
            shard_batch({"labels": np.zeros(shape)}, mesh)


@pytest.mark.slow
def test_mesh_trainer_keeps_an_offloaded_optimizer_on_the_host(tmp_path: Path) -> None:
    """With ``offload_optimizer`` AdamW's moments stay in pinned host memory through the
    sharded step and an orbax round trip, and the losses equal those kept on the device."""
    from tests.sharding_worker import CFG, LORA, data

    mesh = make_mesh(MeshConfig())
    losses, kinds = {}, {}
    for offload in (False, True):
        model = Model(CFG, LORA, EngineConfig(quantize=True), rngs=nnx.Rngs(3))
        optim = OptimConfig(lr=1e-2, total_steps=5, offload_optimizer=offload)
        trainer = shard_trainer(Trainer.create(model, optim), mesh)
        losses[offload] = [float(trainer.step(b)["loss"]) for b in data(1)[:2]]
        moments = [x for x in jax.tree.leaves(trainer.opt_state) if x.ndim]
        kinds[offload] = {x.sharding.memory_kind for x in moments}
    assert kinds == {False: {"device"}, True: {"pinned_host"}}
    assert losses[True] == losses[False]
    with TrainCheckpoints(tmp_path / "ck") as ck:
        ck.save(2, trainer.params, trainer.opt_state, {"step": 2})
        _, opt, _ = ck.restore(trainer.params, trainer.opt_state)
    for got, want in zip(jax.tree.leaves(opt), jax.tree.leaves(trainer.opt_state), strict=True):
        assert got.sharding.memory_kind == want.sharding.memory_kind
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


# --- orbax checkpoints (one device) -----------------------------------------------------


def tree(seed: int, rows: int = 4) -> dict[str, Any]:
    rng = np.random.default_rng(seed)
    return {
        "w": jnp.asarray(rng.normal(size=(rows, 3)), jnp.float32),
        "n": {"count": jnp.asarray(seed, jnp.int32)},
    }


def test_checkpoints_round_trip_keep_the_newest_and_refuse_a_misfit(tmp_path: Path) -> None:
    with TrainCheckpoints(tmp_path / "ck", keep=2) as ck:
        with pytest.raises(FileNotFoundError, match="no training-state checkpoint"):
            ck.restore(tree(0), tree(0))
        for step in (1, 2, 3):
            ck.save(step, tree(step), tree(10 + step), {"step": step, "epoch": 0})
        ck.wait()
        assert sorted(p.name for p in (tmp_path / "ck").iterdir()) == ["2", "3"]  # no temp dirs
        params, opt, meta = ck.restore(tree(0), tree(0))
        assert meta == {"step": 3, "epoch": 0}
        np.testing.assert_array_equal(params["w"], tree(3)["w"])
        np.testing.assert_array_equal(opt["w"], tree(13)["w"])
        assert int(opt["n"]["count"]) == 13
        params, _, meta = ck.restore(tree(0), tree(0), step=2)
        assert meta["step"] == 2
        np.testing.assert_array_equal(params["w"], tree(2)["w"])
        assert not np.array_equal(params["w"], tree(3)["w"])
        with pytest.raises(FileNotFoundError, match=r"for step 1 \(steps present: \[2, 3\]\)"):
            ck.restore(tree(0), tree(0), step=1)
        with pytest.raises(ValueError, match=r"3/params: w is float32\[4, 3\], expected float32"):
            ck.restore(tree(0, rows=5), tree(0))
        with pytest.raises(ValueError, match=r"3/opt_state: does not hold .*\(missing \['extra'\]"):
            ck.restore(tree(0), {**tree(0), "extra": jnp.zeros(2)})
    with TrainCheckpoints(tmp_path / "ck") as again:  # a new run reads what another wrote
        params, opt, meta = again.restore(tree(0), tree(0))
        assert meta == {"step": 3, "epoch": 0}
        np.testing.assert_array_equal(opt["w"], tree(13)["w"])
    with pytest.raises(ValueError, match="TrainCheckpoints.keep: expected >= 1, got 0"):
        TrainCheckpoints(tmp_path / "other", keep=0)


# --- 8 simulated devices, in a subprocess ------------------------------------------------


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The worker's report (see ``tests/sharding_worker.py``)."""
    out = tmp_path_factory.mktemp("mesh")
    env = simulated_devices_env(8)
    proc = subprocess.run(
        [sys.executable, "-m", "tests.sharding_worker", str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    report: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return report


def rel(a: list[float], b: list[float]) -> float:
    return max(abs(x - y) / abs(y) for x, y in zip(a, b, strict=True))


# The logical layout the rules give a few arrays on each mesh (None: every device, whole).
EXPECTED = {
    "data=8": {
        "params:layers.attn.q_proj.lora_A.value": [None, None, None],
        "rest:embed.embedding.value": [None, None],
    },
    "fsdp=8": {
        "params:layers.attn.q_proj.lora_A.value": [None, "fsdp", None],
        "params:layers.attn.q_proj.lora_B.value": [None, None, None],
        "params:layers.mlp.down_proj.lora_B.value": [None, None, "fsdp"],
        "opt_state:1.0.mu.layers.attn.k_proj.lora_A.value": [None, "fsdp", None],
        "opt_state:1.0.count": [],
        "rest:embed.embedding.value": [None, "fsdp"],
        "rest:final_norm.weight.value": ["fsdp"],
    },
    "data=2,fsdp=4": {
        "params:layers.attn.q_proj.lora_A.value": [None, "fsdp", None],
        "opt_state:1.0.nu.layers.mlp.up_proj.lora_A.value": [None, "fsdp", None],
        "rest:embed.embedding.value": [None, "fsdp"],
    },
    "data=2,fsdp=2,tensor=2": {
        "params:layers.attn.q_proj.lora_A.value": [None, "fsdp", None],
        "params:layers.attn.q_proj.lora_B.value": [None, None, "tensor"],
        "params:layers.mlp.down_proj.lora_A.value": [None, "tensor", None],
        "opt_state:1.0.mu.layers.attn.v_proj.lora_B.value": [None, None, "tensor"],
        "rest:embed.embedding.value": ["tensor", "fsdp"],
        "rest:lm_head.kernel.value": ["fsdp", "tensor"],
    },
}
NF4 = {  # QLoRA: NF4 bytes and block scales split over fsdp, whole blocks per device
    "rest:layers.attn.k_proj.kernel.packed.value": [None, "fsdp"],
    "rest:layers.attn.k_proj.kernel.absmax.value": [None, "fsdp"],
    "rest:layers.mlp.down_proj.kernel.packed.value": [None, "fsdp"],
    "rest:layers.attn.k_proj.kernel.nested_code.value": [None, None],
}


def split_of(spec: list[Any] | None, mesh: str) -> int:
    """How many pieces ``spec`` cuts an array into on ``mesh``."""
    sizes = {name: int(size) for name, size in (p.split("=") for p in mesh.split(","))}
    axes = [a for p in spec or [] if p is not None for a in ([p] if isinstance(p, str) else p)]
    return math.prod(sizes.get(a, 1) for a in axes)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["lora", "qlora"])
def test_meshes_train_like_one_device(runs: dict[str, Any], method: str) -> None:
    """Loss curve and every adapter leaf after 3 steps (dropout, accumulation, clipping,
    weight decay) match the one-device run within float32's tolerance on every mesh."""
    report = runs[method]
    base = report["base_losses"][:SAVED_AT]
    assert set(report["meshes"]) == set(MESHES)
    for mesh, run in report["meshes"].items():
        assert rel(run["losses"], base) <= RTOL["float32"], (mesh, run["losses"], base)
        worst = max(run["param_errs"].items(), key=lambda kv: kv[1])
        assert worst[1] <= RTOL["float32"], (mesh, worst)
        assert len(run["param_errs"]) == 14  # 7 projections x (lora_A, lora_B)
    # the measure catches a one-token change of the data
    assert rel(report["nudged_losses"], base) > 5 * RTOL["float32"]
    assert report["nudged_param_err"] > 100 * RTOL["float32"]


@pytest.mark.slow
@pytest.mark.parametrize("method", ["lora", "qlora"])
def test_state_is_really_sharded(runs: dict[str, Any], method: str) -> None:
    """Each device holds exactly its 1/k of every array (k from the array's spec), the specs
    are the rules', the step keeps them, and the batch is split over data x fsdp."""
    sharded = 0
    for mesh, run in runs[method]["meshes"].items():
        assert run["devices"] == 8
        specs = {}
        for group, arrays in run["placed"].items():
            for name, a in arrays.items():
                specs[f"{group}:{name}"] = a["spec"]
                k = split_of(a["spec"], mesh)
                assert a["device_bytes"] == [a["nbytes"] // k] * 8, (mesh, group, name, a)
                sharded += k > 1
                if group in run["after"]:  # the step returns the state as it came in
                    assert run["after"][group][name] == a, (mesh, group, name)
        want = EXPECTED[mesh] | (NF4 if method == "qlora" and mesh != "data=8" else {})
        for name, spec in want.items():
            assert specs[name] == spec, (mesh, name, specs[name])
        if mesh == "data=8":
            assert all(split_of(s, mesh) == 1 for s in specs.values())  # replicas
        batch = run["batch"]
        assert split_of(batch["spec"], mesh) == math.prod(
            int(p.split("=")[1]) for p in mesh.split(",") if p.split("=")[0] != "tensor"
        )
        assert batch["device_bytes"] == [batch["nbytes"] // split_of(batch["spec"], mesh)] * 8
    assert sharded > (60 if method == "qlora" else 30)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["lora", "qlora"])
def test_checkpoint_from_one_mesh_resumes_on_another_and_on_one_device(
    runs: dict[str, Any], method: str
) -> None:
    """Written on data=2 x fsdp=4 after 3 steps; read back bit for bit onto fsdp=8 and onto
    one device; 2 more steps there equal 5 uninterrupted steps on one device."""
    report = runs[method]
    assert report["saved_step"] == [SAVED_AT]  # one committed step directory, no temp dirs
    rest = report["base_losses"][SAVED_AT:]
    for where, run in report["resumed"].items():
        assert run["restored_exactly"], where
        assert rel(run["losses"], rest) <= RTOL["float32"], (where, run["losses"], rest)
        assert max(run["param_errs"].values()) <= RTOL["float32"], where
    assert report["resumed"]["fsdp=8"]["spec"] == [None, "fsdp", None]
    assert report["resumed"]["one-device"]["spec"] is None  # a single-device array


@pytest.mark.slow
def test_a_batch_that_does_not_divide_is_refused(runs: dict[str, Any]) -> None:
    assert runs["uneven_batch_error"] == (
        "batch['input_ids']: 6 rows per micro-batch do not divide over the 8 devices of mesh "
        "axes data; use a batch size that is a multiple of 8"
    )
