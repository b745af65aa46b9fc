"""``qlora-spec train`` over several processes: the flags, each process's rows of a batch,
and two local processes joined by ``jax.distributed`` that train like one device, fail
cleanly when one of them dies, and resume from the last checkpoint on another mesh.

The two-process runs start ``python -m jax_impl.apps.cli train`` twice, with 4 simulated CPU
devices each (``XLA_FLAGS`` set for the subprocesses only, so the suite keeps one device),
the coordinator on a free localhost port. The CPU backend's cross-process collectives are
gloo's (JAX's default on CPU).
"""

from __future__ import annotations

import contextlib
import json
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from safetensors.numpy import load_file

from jax_impl.apps.cli import build_parser, main, train_config
from jax_impl.apps.train import check_batch_fits, check_unchanged, run_record
from jax_impl.train.data import Row, batches, save_byte_tokenizer
from jax_impl.train.sharding import MeshConfig, make_mesh, process_rows
from ref_numpy.formats.hf import save_model
from ref_numpy.model import init_params
from tests.helpers import RTOL, simulated_devices_env
from tests.test_train_cli import CFG, write_chat_data

ROOT = Path(__file__).resolve().parents[1]

# --- flags, batch shares, resume rules (one process) -------------------------------------


def test_distributed_flags_reach_the_config() -> None:
    base = ["train", "--model", "m", "--data", "d", "--out", "o"]
    tc = train_config(build_parser().parse_args(base))
    assert tc.distributed.mesh is None and tc.distributed.coordinator is None
    assert tc.distributed.heartbeat_timeout == 100
    flags = ["--mesh", "data=2,fsdp=4", "--coordinator", "10.0.0.1:1234"]
    flags += ["--num-processes", "2", "--process-id", "1", "--heartbeat-timeout", "30"]
    d = train_config(build_parser().parse_args([*base, *flags])).distributed
    assert (d.mesh, d.coordinator, d.num_processes, d.process_id, d.heartbeat_timeout) == (
        "data=2,fsdp=4",
        "10.0.0.1:1234",
        2,
        1,
        30,
    )
    with pytest.raises(ValueError, match="DistributedConfig.heartbeat_timeout: expected >= 1"):
        train_config(build_parser().parse_args([*base, "--heartbeat-timeout", "0"]))


def test_batch_size_must_divide_over_data_and_fsdp() -> None:
    check_batch_fits(8, MeshConfig(data=2, fsdp=4))
    check_batch_fits(4, MeshConfig(data=2, fsdp=2, tensor=2))  # tensor does not split rows
    with pytest.raises(ValueError) as err:
        check_batch_fits(6, MeshConfig(data=2, fsdp=4))
    assert str(err.value).startswith(
        "--batch-size 6: does not divide over the 8 devices of --mesh data=2,fsdp=4,tensor=1 "
        "that split a batch (data x fsdp); use a multiple of 8"
    )


def rows_of(lengths: list[int]) -> list[Row]:
    out = []
    for i, n in enumerate(lengths):
        ids = (np.arange(n, dtype=np.int32) + 7 * i) % 50
        out.append(Row(ids, ids, np.arange(n, dtype=np.int32), np.ones(n, np.int32)))
    return out


def test_process_shares_put_together_are_the_whole_batches() -> None:
    """Each process draws the same order and pads to the whole batch's length, so the shares
    of 3 processes, side by side, are the single-process batches (a share of padding rows
    only included), and each share holds other rows."""
    rows = rows_of([15, 40, 9, 33, 12, 17, 28, 10, 11, 36, 9, 20, 31, 14])
    kw: dict[str, Any] = {"seed": 5, "epoch": 2, "pad_id": 3}
    whole = list(batches(rows, 6, 2, [8, 16, 64], **kw))
    shares = [list(batches(rows, 6, 2, [8, 16, 64], **kw, part=(i, i + 2))) for i in (0, 2, 4)]
    assert len(whole) == 2 and all(len(s) == 2 for s in shares)  # 14 rows, 12 a batch
    for b, batch in enumerate(whole):
        for name, value in batch.items():
            assert value.shape[:2] == (2, 6)
            parts = [s[b][name] for s in shares]
            assert all(p.shape == (2, 2, value.shape[2]) for p in parts)
            np.testing.assert_array_equal(np.concatenate(parts, axis=1), value, err_msg=name)
    ids = [s[0]["input_ids"] for s in shares]
    assert not np.array_equal(ids[0], ids[1]) and not np.array_equal(ids[1], ids[2])
    assert shares[0][1]["attention_mask"].sum() > 0 == shares[2][1]["attention_mask"].sum()
    # a share of padding alone is padded to the whole batch's length, not the smallest bucket
    assert shares[2][1]["input_ids"].shape[2] == whole[1]["input_ids"].shape[2] > 8
    with pytest.raises(ValueError, match=r"part \(4, 8\): expected rows 0 <= lo < hi <= "):
        next(batches(rows, 6, 2, [64], seed=0, epoch=0, part=(4, 8)))


def test_one_process_reads_every_row() -> None:
    mesh = make_mesh(MeshConfig())
    assert process_rows(mesh, 5) == (0, 5)


def test_the_mesh_and_processes_may_change_on_resume(tmp_path: Path) -> None:
    model, data = tmp_path / "m", tmp_path / "d.jsonl"
    base = ["train", "--model", str(model), "--data", str(data), "--out", "o"]
    data.write_text('{"text": "x"}\n')
    model.mkdir()
    (model / "config.json").write_text("{}")
    first = train_config(build_parser().parse_args(base))
    for name, value in run_record(first).items():
        (tmp_path / name).write_text(json.dumps(value))
    moved = ["--mesh", "fsdp=8", "--coordinator", "h:1", "--num-processes", "2"]
    moved += ["--process-id", "1", "--heartbeat-timeout", "5"]
    check_unchanged(tmp_path, run_record(train_config(build_parser().parse_args(base + moved))))
    changed = train_config(build_parser().parse_args([*base, *moved, "--lr", "1e-3"]))
    with pytest.raises(ValueError, match=r"--resume: lr changed from 0.0002 to 0.001 since"):
        check_unchanged(tmp_path, run_record(changed))


# --- two processes ---------------------------------------------------------------------

STEPS = 16
FLAGS = ("--method", "lora", "--rank", "4", "--lr", "3e-2", "--batch-size", "8", "--seed", "3")
FLAGS += ("--dropout", "0.1", "--max-length", "128", "--steps", str(STEPS))
FLAGS += ("--eval-split", "0.25", "--checkpoint-interval", "2")
HEARTBEAT = 10  # seconds before the survivor takes a silent process for dead


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A small model with a byte-level tokenizer, and a chat file."""
    root = tmp_path_factory.mktemp("dist")
    save_model(init_params(CFG, np.random.default_rng(0), std=0.1), CFG, root / "base")
    save_byte_tokenizer(root / "base")
    return root / "base", write_chat_data(root / "chat.jsonl", n=20)


def train_args(inputs: tuple[Path, Path], out: Path, *extra: str) -> list[str]:
    model, data = inputs
    return ["train", "--model", str(model), "--data", str(data), "--out", str(out), *FLAGS, *extra]


@pytest.fixture(scope="module")
def reference(
    inputs: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Any]:
    """The same run in this process, on one device."""
    out = tmp_path_factory.mktemp("ref") / "run"
    assert main(train_args(inputs, out)) == 0
    return result(out)


def result(out: Path) -> dict[str, Any]:
    return {
        "adapter": load_file(out / "adapter_model.safetensors"),
        "metrics": [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()],
        "summary": json.loads((out / "summary.json").read_text()),
    }


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return int(s.getsockname()[1])


def launch(args: list[str], logs: Path) -> list[subprocess.Popen]:
    """Both processes of a run of two, 4 CPU devices each; their output goes to ``logs``."""
    env = simulated_devices_env(4) | {"PYTHONPATH": str(ROOT)}  # 4 devices per process
    flags = ["--coordinator", f"localhost:{free_port()}", "--num-processes", "2"]
    flags += ["--heartbeat-timeout", str(HEARTBEAT)]
    logs.mkdir(parents=True, exist_ok=True)
    return [
        subprocess.Popen(
            [sys.executable, "-m", "jax_impl.apps.cli", *args, *flags, "--process-id", str(i)],
            cwd=ROOT,
            env=env,
            stdout=(logs / f"{i}.out").open("w"),
            stderr=(logs / f"{i}.err").open("w"),
        )
        for i in range(2)
    ]


def finish(procs: list[subprocess.Popen], logs: Path, timeout: float) -> list[int]:
    """The exit statuses, each process given until ``timeout`` seconds from now (then
    killed: a hang fails the test rather than stalling it)."""
    deadline = time.monotonic() + timeout
    codes = []
    for p in procs:
        try:
            codes.append(p.wait(timeout=max(deadline - time.monotonic(), 0.1)))
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            tails = [(logs / f"{i}.err").read_text()[-3000:] for i in range(len(procs))]
            pytest.fail(f"a process still ran after {timeout} s; stderr tails: {tails}")
    return codes


def rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


ADAPTER_TOL = 2 * RTOL["float32"]


def assert_like_reference(got: dict[str, Any], want: dict[str, Any]) -> None:
    """Loss curve, token counts and eval loss within float32's tolerance of the one-device
    run, every adapter tensor within twice it.

    The adapters are the end of 16 AdamW steps, whose normalised updates carry a gradient's
    rounding (each process forms its rows' products in its own summation order) into
    components whose gradient is near zero. The worst tensor, layer 1's ``k_proj.lora_A``,
    is 1.06e-5 away (5.9e-6 before the attention backward was written out); a wrong shard
    or a lost row moves them by orders of magnitude more."""
    tol = RTOL["float32"]
    assert [m["step"] for m in got["metrics"]] == list(range(1, STEPS + 1))
    for g, w in zip(got["metrics"], want["metrics"], strict=True):
        assert abs(g["loss"] - w["loss"]) <= tol * abs(w["loss"]), (g, w)
        assert (g["tokens"], g["loss_tokens"]) == (w["tokens"], w["loss_tokens"])  # global
    s, r = got["summary"], want["summary"]
    assert abs(s["eval_loss"] - r["eval_loss"]) <= tol * r["eval_loss"]
    assert s["eval_tokens"] == r["eval_tokens"] > 0
    assert sorted(got["adapter"]) == sorted(want["adapter"]) and len(want["adapter"]) == 28
    worst = max((rel(got["adapter"][k], want["adapter"][k]), k) for k in want["adapter"])
    assert worst[0] <= ADAPTER_TOL, worst


@pytest.mark.slow
def test_two_processes_train_like_one_device(
    inputs: tuple[Path, Path], reference: dict[str, Any], tmp_path: Path
) -> None:
    out = tmp_path / "run"
    procs = launch(train_args(inputs, out, "--mesh", "data=2,fsdp=4"), tmp_path / "logs")
    codes = finish(procs, tmp_path / "logs", timeout=240)
    assert codes == [0, 0], [(tmp_path / "logs" / f"{i}.err").read_text()[-3000:] for i in (0, 1)]
    assert_like_reference(result(out), reference)
    # process 0 printed the summary; process 1 wrote nothing of its own
    assert json.loads((tmp_path / "logs" / "0.out").read_text().splitlines()[-1])["steps"] == STEPS
    assert "{" not in (tmp_path / "logs" / "1.out").read_text()  # (gloo logs to stdout)
    assert not (tmp_path / ".run.run").exists()
    losses = [m["loss"] for m in reference["metrics"]]
    assert losses[-1] < 0.8 * losses[0]  # the runs compared really trained


def committed(work: Path) -> list[int]:
    state = work / "state"
    return (
        sorted(int(p.name) for p in state.iterdir() if p.name.isdigit()) if state.exists() else []
    )


@pytest.mark.slow
def test_a_killed_process_stops_the_run_which_resumes_on_another_mesh(
    inputs: tuple[Path, Path], reference: dict[str, Any], tmp_path: Path
) -> None:
    """SIGKILL process 1 after a checkpoint: process 0 exits non-zero within the heartbeat
    timeout (no hang), --out is not written; both relaunched with --resume on fsdp=8 go on
    from the last checkpoint and end where the one-device run ends."""
    out, work, logs = tmp_path / "run", tmp_path / ".run.run", tmp_path / "logs"
    args = train_args(inputs, out, "--mesh", "data=2,fsdp=4")
    procs = launch(args, logs)
    metrics = work / "metrics.jsonl"
    deadline = time.monotonic() + 200
    while time.monotonic() < deadline and any(p.poll() is None for p in procs):
        lines = metrics.read_text().splitlines() if metrics.exists() else []
        if len(lines) >= 6 and committed(work):
            break
        with contextlib.suppress(subprocess.TimeoutExpired):
            procs[0].wait(timeout=0.05)
    assert all(p.poll() is None for p in procs), "the run ended before it could be killed"
    procs[1].send_signal(signal.SIGKILL)
    killed = time.monotonic()
    codes = finish(procs, logs, timeout=HEARTBEAT + 60)
    waited = time.monotonic() - killed
    err = (logs / "0.err").read_text()
    assert codes[0] != 0 and codes[1] == -signal.SIGKILL, (codes, err[-3000:])
    assert waited < HEARTBEAT + 60
    assert "distributed" in err.lower(), err[-3000:]  # JAX names its distributed service
    assert not out.exists()
    saved = committed(work)
    done = len(metrics.read_text().splitlines())
    assert saved and saved[-1] < STEPS and done < STEPS, (saved, done)

    procs = launch([*train_args(inputs, out, "--mesh", "fsdp=8"), "--resume"], logs / "resume")
    codes = finish(procs, logs / "resume", timeout=240)
    assert codes == [0, 0], (logs / "resume" / "0.err").read_text()[-3000:]
    assert_like_reference(result(out), reference)
    assert not work.exists()
