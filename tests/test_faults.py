"""Faults a run survives: a kill at any point, a full or read-only disk, torn and corrupted
files, two runs on one directory, SIGINT and SIGTERM.

The crash harness kills ``qlora-spec train`` (LoRA, QLoRA, DPO) and ``qlora-spec merge`` with
SIGKILL at points drawn from the fault points an uninterrupted run passes
(``files.fault_point``): while the step compiles, mid-step, inside a checkpoint save, before a
checkpoint's checksums, inside the export, at the commit of an output, before the work
directory goes, inside a merge. Each killed run is resumed with ``--resume`` (a merge run
again) and must end with the adapter (merged model) of the uninterrupted run, byte for byte,
its loss history equal, and no temporary left. The points come from a seed the test prints
(``QLORA_SPEC_CRASH_SEED`` sets it); the default suite runs 3 points, ``-m crash`` the full
harness.

The fault tests hold a run at a fault point with SIGSTOP (``QLORA_SPEC_FAULT=phase:n:SIGSTOP``),
wait for the process to stop (``waitpid`` with ``WUNTRACED``), act (fill the disk, send a
signal), and let it go on with SIGCONT: nothing waits on time.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import fcntl
import hashlib
import json
import os
import random
import resource
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from jax_impl.apps.cli import main
from jax_impl.train.data import save_byte_tokenizer
from jax_impl.train.orbax_state import CHECKSUMS, TMP_SUFFIX, CorruptCheckpoint, TrainCheckpoints
from ref_numpy.config import LoraConfig
from ref_numpy.formats import bnb, files, hf, peft
from ref_numpy.formats.hf import CheckpointError, save_model
from ref_numpy.lora import add_lora
from ref_numpy.model import init_params
from tests.test_dpo_cli import dpo_args, write_pairs
from tests.test_train_cli import CFG, checkpoint_steps, train_args, write_chat_data

ROOT = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-m", "jax_impl.apps.cli"]
STEPS = ("--steps", "6", "--checkpoint-interval", "2")


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory every xdist worker of this session shares (the base temporary directory
    without one): the model, the data, the compilation cache and the uninterrupted runs are
    made once, by whichever worker needs them first."""
    base = tmp_path_factory.getbasetemp()
    root = (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / "faults-shared"
    root.mkdir(exist_ok=True)
    return root


@contextlib.contextmanager
def made_once(path: Path) -> Iterator[Path | None]:
    """Build ``path`` once across processes: yields a temporary directory to build it in
    (renamed to ``path`` after the block), or None when another process built it; a second
    process waits on the lock (``flock``) while the first builds."""
    with (path.parent / f".{path.name}.lock").open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if path.exists():
            yield None
            return
        with files.atomic_dir(path) as tmp:
            yield tmp


@pytest.fixture(scope="module")
def model_dir(shared: Path) -> Path:
    out = shared / "base"
    with made_once(out) as tmp:
        if tmp is not None:
            save_model(
                init_params(CFG, np.random.default_rng(0), std=0.1), CFG, tmp, overwrite=True
            )
            save_byte_tokenizer(tmp)
    return out


@pytest.fixture(scope="module")
def env(shared: Path) -> dict[str, str]:
    """The environment of the command-line runs: this checkout, the CPU, a compilation cache
    shared by the runs, and XLA's cheaper passes (small programs)."""
    out = {k: v for k, v in os.environ.items() if not k.startswith(("QLORA_SPEC_", "JAX_"))}
    out.update(
        PYTHONPATH=str(ROOT),
        JAX_PLATFORMS="cpu",
        JAX_COMPILATION_CACHE_DIR=str(shared / "jax-cache"),
        JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
        JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
        XLA_FLAGS="--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true",
    )
    return out


@pytest.fixture(scope="module")
def data(shared: Path) -> dict[str, Path]:
    d = shared / "data"
    with made_once(d) as tmp:
        if tmp is not None:
            write_chat_data(tmp / "chat.jsonl", n=12)
            write_pairs(tmp / "pairs.jsonl")
    return {"chat": d / "chat.jsonl", "pairs": d / "pairs.jsonl"}


def run_args(method: str, model: Path, data: dict[str, Path], out: Path) -> list[str]:
    """The command line of the harness's run for ``method`` (lora, qlora, dpo)."""
    if method == "dpo":
        return dpo_args(model, data["pairs"], out, "lora", *STEPS)
    return train_args(model, data["chat"], out, "--method", method, *STEPS)


# --- running the command line ---------------------------------------------------------


def start(
    args: list[str], env: dict[str, str], log: Path, fault: str = "", **kw: Any
) -> subprocess.Popen[bytes]:
    """``qlora-spec ARGS`` in a process of its own, stdout and stderr into ``log`` (unless
    ``kw`` says otherwise)."""
    env = {**env, "QLORA_SPEC_FAULT": fault} if fault else env
    with log.open("ab") as f:
        kw = {"stdout": f, "stderr": f, **kw}
        return subprocess.Popen([*CLI, *args], env=env, **kw)


def run(args: list[str], env: dict[str, str], log: Path, fault: str = "", **kw: Any) -> int:
    """``start`` and wait; the exit status (``-N``: killed by signal N)."""
    return start(args, env, log, fault, **kw).wait(timeout=600)


def wait_stopped(proc: subprocess.Popen[bytes], log: Path) -> None:
    """Wait for ``proc`` to stop at its fault point (it sends itself SIGSTOP)."""
    _, status = os.waitpid(proc.pid, os.WUNTRACED)
    if not os.WIFSTOPPED(status):
        proc.returncode = os.waitstatus_to_exitcode(status)
        raise AssertionError(f"ended ({proc.returncode}) before its fault point:\n{tail(log)}")


def tail(log: Path, n: int = 15) -> str:
    return "\n".join(log.read_text(errors="replace").splitlines()[-n:])


def errors(log: Path, command: str = "train") -> list[str]:
    """The error lines a command printed."""
    return [
        x for x in log.read_text().splitlines() if x.startswith(f"qlora-spec {command}: error:")
    ]


def history(run: Path) -> list[dict[str, Any]]:
    """The loss history of a run: every field of metrics.jsonl but the wall-clock rates
    (``tokens_per_s``, ``loss_tokens_per_s``), which no two runs share."""
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(x).items() if not k.endswith("_per_s")} for x in lines]


def assert_same_run(run: Path, ref: Path, what: str = "") -> None:
    """The adapter of ``run`` is the one of ``ref`` byte for byte, and its loss history the
    same (the message shows the first step that differs)."""
    a = (run / "adapter_model.safetensors").read_bytes()
    assert a == (ref / "adapter_model.safetensors").read_bytes(), f"adapter differs {what}"
    got, want = history(run), history(ref)
    differ = [(g, w) for g, w in zip(got, want, strict=False) if g != w][:1]
    assert len(got) == len(want) and not differ, f"loss history differs {what}: {differ}"


def leftovers(root: Path) -> list[str]:
    """Temporaries, work directories and locks under ``root``: what a finished command must
    not leave."""
    return sorted(
        str(p.relative_to(root))
        for p in root.rglob("*")
        if ".tmp-" in p.name or TMP_SUFFIX in p.name or p.name.endswith((".lock", ".run"))
    )


def snapshot(root: Path) -> dict[str, str]:
    """``{path: sha256}`` of every file under ``root``."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


# --- the crash harness ----------------------------------------------------------------


@dataclasses.dataclass
class Reference:
    """An uninterrupted run, its merge, and the fault points each passed, in order."""

    out: Path
    merged: Path | None
    trace: list[tuple[str, str]]  # (command, phase)


def reference(method: str, model: Path, data: dict[str, Path], env: dict, root: Path) -> Reference:
    """The uninterrupted run of ``method``, made once in ``root`` (``shared``)."""
    where = root / f"ref-{method}"
    with made_once(where) as tmp:
        if tmp is not None:
            log = tmp / "log"
            fenv = {**env, "QLORA_SPEC_FAULT_TRACE": str(tmp / "train.trace")}
            status = run(run_args(method, model, data, tmp / "run"), fenv, log)
            assert status == 0, tail(log)
            if method != "dpo":
                fenv = {**env, "QLORA_SPEC_FAULT_TRACE": str(tmp / "merge.trace")}
                margs = ["merge", "--model", str(model), "--adapter", str(tmp / "run")]
                assert run([*margs, "--out", str(tmp / "merged")], fenv, log) == 0, tail(log)
    trace = [("train", p) for p in (where / "train.trace").read_text().split()]
    if (where / "merge.trace").exists():
        trace += [("merge", p) for p in (where / "merge.trace").read_text().split()]
    merged = where / "merged"
    return Reference(where / "run", merged if merged.exists() else None, trace)


def _session_seed() -> int:
    """``QLORA_SPEC_CRASH_SEED``, else one seed per test session (the same on every xdist
    worker), else a fresh one."""
    if "QLORA_SPEC_CRASH_SEED" in os.environ:
        return int(os.environ["QLORA_SPEC_CRASH_SEED"])
    uid = os.environ.get("PYTEST_XDIST_TESTRUNUID")
    if uid:
        return int(hashlib.sha256(uid.encode()).hexdigest()[:8], 16)
    return random.randrange(2**32)


SEED = _session_seed()


def draw_points(
    trace: list[tuple[str, str]], n: int, rng: random.Random
) -> list[tuple[str, str, int]]:
    """``n`` points ``(command, phase, occurrence)`` of ``trace``: first distinct phases (so
    compilation, steps, checkpoints, the export and the merge all get their turn), each at a
    random occurrence, then any point at random."""
    counts: dict[tuple[str, str], int] = {}
    for key in trace:
        counts[key] = counts.get(key, 0) + 1
    phases = rng.sample(sorted(counts), min(n, len(counts)))
    points = [(c, p, rng.randint(1, counts[(c, p)])) for c, p in phases]
    everything = sorted({(c, p, k) for (c, p), m in counts.items() for k in range(1, m + 1)})
    left = [x for x in everything if x not in points]
    return points + rng.sample(left, min(n - len(points), len(left)))


def crash_harness(
    method: str,
    n: int,
    seed: int,
    model: Path,
    data: dict[str, Path],
    env: dict,
    shared: Path,
    root: Path,
) -> None:
    """Kill ``n`` runs of ``method`` at points drawn with ``seed``; each, resumed, must equal
    the uninterrupted run byte for byte and leave nothing behind."""
    ref = reference(method, model, data, env, shared)
    points = draw_points(ref.trace, n, random.Random(f"{seed}:{method}"))
    print(f"crash harness: {method}, seed {seed} (QLORA_SPEC_CRASH_SEED={seed} repeats it)")
    for i, (command, phase, k) in enumerate(points):
        where = root / f"{method}-{i}"
        where.mkdir()
        log = where / "log"
        print(f"  point {i}: SIGKILL in {command} at fault point {phase}:{k}")
        note = f"(seed {seed}, point {i}: {command} {phase}:{k}; log {log})"
        if command == "train":
            args = run_args(method, model, data, where / "run")
            status = run(args, env, log, fault=f"{phase}:{k}")
            assert status == -signal.SIGKILL, f"not killed {note}: {status}\n{tail(log)}"
            status = run([*args, "--resume"], env, log)
            assert status == 0, f"resume failed {note}\n{tail(log)}"
            assert_same_run(where / "run", ref.out, note)
        else:
            assert ref.merged is not None
            args = ["merge", "--model", str(model), "--adapter", str(ref.out)]
            args += ["--out", str(where / "merged")]
            status = run(args, env, log, fault=f"{phase}:{k}")
            assert status == -signal.SIGKILL, f"not killed {note}: {status}\n{tail(log)}"
            assert not (where / "merged").exists(), note  # nothing half-written in place
            assert run(args, env, log) == 0, f"merge failed again {note}\n{tail(log)}"
            assert snapshot(where / "merged") == snapshot(ref.merged), note
        assert leftovers(where) == [], note


@pytest.mark.slow
def test_kill_anywhere_resumes_bitwise(
    model_dir: Path, data: dict[str, Path], env: dict, shared: Path, tmp_path: Path
) -> None:
    """Three kill points of distinct phases, on a method the seed picks: each run, resumed,
    ends with the uninterrupted run's adapter and loss history."""
    method = ("lora", "qlora", "dpo")[SEED % 3]
    crash_harness(method, 3, SEED, model_dir, data, env, shared, tmp_path)


@pytest.mark.slow
@pytest.mark.crash
@pytest.mark.parametrize(("method", "n"), [("lora", 10), ("qlora", 10), ("dpo", 4)])
def test_kill_anywhere_full(
    model_dir: Path,
    data: dict[str, Path],
    env: dict,
    shared: Path,
    tmp_path: Path,
    method: str,
    n: int,
) -> None:
    """The full harness: every phase of the run and of the merge, then random points."""
    crash_harness(method, n, SEED, model_dir, data, env, shared, tmp_path)


# --- one run per directory ------------------------------------------------------------


@pytest.mark.slow
def test_a_second_run_is_refused_and_a_stale_lock_taken_over(
    model_dir: Path,
    data: dict[str, Path],
    env: dict,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A second run on the same --out is refused within a second, naming the lock and the
    first run's pid; once the first is killed, its lock is taken over."""
    out = tmp_path / "run"
    lock = tmp_path / ".run.lock"
    args = train_args(model_dir, data["chat"], out, "--steps", "3", "--checkpoint-interval", "1")
    first = start(args, env, tmp_path / "log", fault="step:3:SIGSTOP")
    try:
        wait_stopped(first, tmp_path / "log")  # holding the lock, mid-step 3
        assert lock.read_text() == f"{first.pid}\n"
        began = time.monotonic()
        assert main(args) == 2
        assert time.monotonic() - began < 1.0  # refused before any loading
        err = capsys.readouterr().err
        assert f"qlora-spec train: error: {lock}: held by process {first.pid}" in err
        assert main([*args, "--resume"]) == 2  # also when resuming the same run
        assert f"held by process {first.pid}" in capsys.readouterr().err
    finally:
        first.kill()  # SIGKILL: the stale lock of a killed run
        first.wait()
    assert lock.read_text() == f"{first.pid}\n" and not out.exists()
    # the kernel released it: the next run takes it over (here one refused past the lock, for
    # a changed config; the crash harness resumes every killed run over its stale lock)
    assert main([*args, "--resume", "--lr", "1e-3"]) == 2
    err = capsys.readouterr().err
    assert "held by" not in err and "--resume: lr changed from 0.03 to 0.001" in err
    assert not lock.exists()


# --- signals --------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize(
    "signals",
    [
        ["SIGINT"],
        pytest.param(["SIGTERM"], marks=pytest.mark.crash),
        pytest.param(["SIGINT", "SIGINT"], marks=pytest.mark.crash),
    ],
)
def test_signals_checkpoint_at_the_step_boundary(
    model_dir: Path,
    data: dict[str, Path],
    env: dict,
    shared: Path,
    tmp_path: Path,
    signals: list[str],
) -> None:
    """SIGINT or SIGTERM mid-step: a checkpoint of that step, exit 130 or 143, and --resume
    ends as the uninterrupted run. A second SIGINT, sent while that checkpoint is being
    written, ends the process at once; the checkpoint before it is whole."""
    out, work, log = tmp_path / "run", tmp_path / ".run.run", tmp_path / "log"
    args = run_args("lora", model_dir, data, out)  # checkpoints after steps 2, 4, 6
    fault = "step:3:SIGSTOP" + (",saving:2:SIGSTOP" if len(signals) == 2 else "")
    proc = start(args, env, log, fault=fault)
    for name in signals:
        wait_stopped(proc, log)  # mid-step 3, then inside the save of step 3's checkpoint
        os.kill(proc.pid, signal.Signals[name])
        os.kill(proc.pid, signal.SIGCONT)
    status = proc.wait(timeout=600)
    if len(signals) == 2:
        assert status == -signal.SIGINT, tail(log)  # at once, by the signal itself
        assert (work / "state" / f"3{TMP_SUFFIX}").is_dir()  # torn
        assert checkpoint_steps(work) == [2] and not out.exists()
        with TrainCheckpoints(work / "state") as ckpts:
            ckpts.verify(2)  # whole
        return
    assert status == 128 + signal.Signals[signals[0]], tail(log)
    assert errors(log) == []
    assert f"stopped by {signals[0]} after step 3; its checkpoint is in {work}" in tail(log)
    assert checkpoint_steps(work) == [2, 3]
    assert (work / "state" / "3" / CHECKSUMS).is_file()
    assert [r["step"] for r in history(work)] == [1, 2, 3]
    if signals == ["SIGINT"]:
        assert run([*args, "--resume"], env, log) == 0, tail(log)
        assert_same_run(out, reference("lora", model_dir, data, env, shared).out)
        assert leftovers(tmp_path) == []


# --- full and read-only disks, files in the way -----------------------------------------


@contextlib.contextmanager
def small_disk(path: Path, size: int) -> Iterator[bool]:
    """``path`` as a tmpfs of ``size`` bytes where this process may mount one (yields True);
    else a plain directory (False), and the test limits its commands' file size instead
    (RLIMIT_FSIZE)."""
    path.mkdir()
    mounted = False
    if os.geteuid() == 0 and shutil.which("mount"):
        cmd = ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)]
        mounted = subprocess.run(cmd, capture_output=True).returncode == 0
    try:
        yield mounted
    finally:
        if mounted:
            subprocess.run(["umount", "-l", str(path)], check=True)


def fill(path: Path, leave: int = 0) -> None:
    """Fill the file system of ``path`` to the last byte, but ``leave`` bytes."""
    spare = path / "spare"
    if leave:
        spare.write_bytes(b"\0" * leave)
    fd = os.open(path / "filler", os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    try:
        for size in (1 << 16, 1 << 12, 1):
            with contextlib.suppress(OSError):
                while True:
                    os.write(fd, b"\0" * size)
    finally:
        os.close(fd)
    with pytest.raises(OSError) as full:
        (path / "probe").write_bytes(b"\0" * 4096)
    assert full.value.errno == errno.ENOSPC
    (path / "probe").unlink(missing_ok=True)
    spare.unlink(missing_ok=True)


def limit_file_size(limit: int) -> Any:
    """A ``preexec_fn`` that caps the size of any file the command writes (EFBIG past it)."""
    return lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))


@pytest.mark.slow
@pytest.mark.crash
def test_train_on_a_disk_that_fills(
    model_dir: Path, data: dict[str, Path], env: dict, shared: Path, tmp_path: Path
) -> None:
    """The disk fills before a checkpoint, then inside the export: each time one line naming
    the path and the cause, the checkpoint before it and an earlier output byte for byte
    intact, no temporary left; with space again, --resume ends as the uninterrupted run."""
    ref = reference("lora", model_dir, data, env, shared)
    fs = tmp_path / "fs"
    with small_disk(fs, 16 << 20) as mounted:
        cause = "No space left on device" if mounted else "File too large"
        shutil.copytree(ref.out, fs / "earlier")
        earlier = snapshot(fs / "earlier")
        out, work, log = fs / "run", fs / ".run.run", tmp_path / "log"
        args = run_args("lora", model_dir, data, out)
        for fault, kept in (("save:2:SIGSTOP", 2), ("export:1:SIGSTOP", 6)):
            # under a file-size limit the run's own log could not grow: it goes to a pipe
            pipe = {} if mounted else {"stdout": subprocess.PIPE, "stderr": subprocess.STDOUT}
            proc = start([*args, "--resume"], env, log, fault=fault, **pipe)
            wait_stopped(proc, log)  # the checkpoint of step `kept` complete
            state = snapshot(work / "state" / str(kept))
            if mounted:
                fill(fs)
            else:
                resource.prlimit(proc.pid, resource.RLIMIT_FSIZE, (1, 1))
            os.kill(proc.pid, signal.SIGCONT)
            output, _ = proc.communicate(timeout=600)
            if output is not None:
                log.write_bytes(output)
            assert proc.returncode == 1, tail(log)
            (line,) = errors(log)
            assert f"error: {fs}/" in line and cause in line, line
            assert snapshot(work / "state" / str(kept)) == state
            assert snapshot(fs / "earlier") == earlier
            assert not out.exists() and leftovers(fs) == [".run.run"], leftovers(fs)
            (fs / "filler").unlink(missing_ok=True)
            log.write_text("")
        assert run([*args, "--resume"], env, log) == 0, tail(log)
        assert_same_run(out, ref.out)
        assert leftovers(fs) == []


@pytest.fixture
def adapter(model_dir: Path, tmp_path: Path) -> Path:
    """A PEFT adapter for the test model, non-zero so a merge changes the weights."""
    lora = LoraConfig(rank=4, alpha=8, targets=("q_proj", "v_proj"))
    params = add_lora(init_params(CFG, np.random.default_rng(1), std=0.1), CFG, lora)
    for layer in params["layers"]:
        for name in ("q_proj", "v_proj"):
            p = layer["attn"][name]
            p["lora_B"] = np.random.default_rng(2).normal(size=p["lora_B"].shape) * 0.1
    out = tmp_path / "adapter"
    peft.save_adapter(params, CFG, lora, out, base_model_name_or_path=str(model_dir))
    return out


def test_merge_and_quantize_on_a_disk_that_fills(
    model_dir: Path,
    adapter: Path,
    env: dict,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A merge and a quantize that run out of space part-way through their weights, new or
    replacing an earlier output: one line naming the file and the cause, the earlier output
    byte for byte intact, nothing new in place, no temporary left."""
    fs, log = tmp_path / "fs", tmp_path / "log"
    jobs = {
        "merge": ["merge", "--model", str(model_dir), "--adapter", str(adapter)],
        "quantize": ["quantize", "--model", str(model_dir)],
    }
    with small_disk(fs, 4 << 20) as mounted:
        cause = "No space left on device" if mounted else "File too large"
        for command, args in jobs.items():
            assert main([*args, "--out", str(fs / command)]) == 0
        earlier = snapshot(fs)
        if mounted:  # the file system is full: the commands can run in this process
            fill(fs, leave=64 << 10)  # less than either command's model.safetensors

        def attempt(args: list[str]) -> tuple[int, str]:
            if mounted:
                status = main(args)
                return status, capsys.readouterr().err
            log.write_text("")  # else a command of its own, its files limited in size
            status = run(args, env, log, preexec_fn=limit_file_size(64 << 10))
            return status, log.read_text()

        for command, args in jobs.items():
            for out, extra in ((fs / command, ["--overwrite"]), (fs / f"{command}-new", [])):
                status, err = attempt([*args, "--out", str(out), *extra])
                assert status == 1, err
                (line,) = [x for x in err.splitlines() if "error:" in x]
                assert line == f"qlora-spec {command}: error: {out}/model.safetensors: {cause}"
                assert not (fs / f"{command}-new").exists()
        (fs / "filler").unlink(missing_ok=True)
        assert snapshot(fs) == earlier
        assert leftovers(fs) == []


def make_read_only(path: Path, mounted: bool) -> None:
    """Make ``path`` read-only: remount its tmpfs read-only where ``small_disk`` mounted one,
    else take away its write permission (which a root process ignores: the test is skipped
    then)."""
    if mounted:
        subprocess.run(["mount", "-o", "remount,ro", str(path)], check=True)
    elif os.geteuid() != 0:
        path.chmod(0o555)
    else:
        pytest.skip("root without mount: no read-only directory to test against")


def test_read_only_and_file_outputs_are_refused(
    model_dir: Path,
    adapter: Path,
    data: dict[str, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """train, merge and quantize with --out in a read-only directory, or --out a file (or
    under one): a non-zero status and one line naming the path and the cause; what was there
    is untouched."""
    file = tmp_path / "notes.txt"
    file.write_text("keep me\n")
    jobs = {
        "train": ["train", "--model", str(model_dir), "--data", str(data["chat"]), "--steps", "1"],
        "merge": ["merge", "--model", str(model_dir), "--adapter", str(adapter)],
        "quantize": ["quantize", "--model", str(model_dir)],
    }
    for command, args in jobs.items():
        for out, why in ((file, " (the output directory goes here)"), (file / "run", "")):
            for extra in ([], ["--overwrite"]):
                assert main([*args, "--out", str(out), *extra]) == 2
                line = capsys.readouterr().err.strip().splitlines()[-1]
                want = f"qlora-spec {command}: error: {file}: a file, not a directory{why}"
                assert line == want, line
        assert file.read_text() == "keep me\n"
    ro = tmp_path / "ro"
    with small_disk(ro, 1 << 20) as mounted:
        shutil.copytree(adapter, ro / "earlier")
        earlier = snapshot(ro)
        make_read_only(ro, mounted)
        try:
            for command, args in jobs.items():
                out = ro / command
                status = main([*args, "--out", str(out)])
                line = capsys.readouterr().err.strip().splitlines()[-1]
                assert status == 1, line
                assert line.startswith(f"qlora-spec {command}: error: {ro}/"), line
                assert line.endswith(("Read-only file system", "Permission denied")), line
                assert snapshot(ro) == earlier and not out.exists()
        finally:
            if not mounted:
                ro.chmod(0o755)


# --- torn and corrupted files ---------------------------------------------------------


def flip(path: Path, at: int) -> None:
    """Flip one bit of the byte at offset ``at`` (negative: from the end)."""
    raw = bytearray(path.read_bytes())
    raw[at] ^= 0x10
    path.write_bytes(bytes(raw))


def truncate(path: Path, n: int) -> None:
    """Cut the last ``n`` bytes off ``path``."""
    path.write_bytes(path.read_bytes()[:-n])


def rewrite_header(path: Path, change: Any) -> None:
    """Rewrite the safetensors header of ``path`` through ``change(header)``, keeping the data."""
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + n])
    change(header)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(len(text).to_bytes(8, "little") + text + raw[8 + n :])


def last_tensor(path: Path) -> tuple[str, int]:
    """The name and the byte size of the tensor stored last in a safetensors file."""
    raw = path.read_bytes()
    header = json.loads(raw[8 : 8 + int.from_bytes(raw[:8], "little")])
    header.pop("__metadata__", None)
    name = max(header, key=lambda k: header[k]["data_offsets"][1])
    begin, end = header[name]["data_offsets"]
    return name, end - begin


@pytest.mark.parametrize("kind", ["checkpoint", "adapter", "nf4"])
def test_damaged_weights_are_refused_naming_file_and_tensor(
    model_dir: Path, adapter: Path, tmp_path: Path, kind: str
) -> None:
    """A truncated file, a flipped bit in the data, a header that lies about offsets or
    dtypes: each refused, the message naming the file and the tensor."""
    if kind == "checkpoint":
        src, weights = model_dir, "model.safetensors"

        def load(d: Path) -> Any:
            return hf.load_model(d)

    elif kind == "adapter":
        src, weights = adapter, peft.WEIGHTS_FILE

        def load(d: Path) -> Any:
            return peft.load_adapter(d, CFG)

    else:
        src, weights = bnb.quantize_model(model_dir, tmp_path / "nf4"), "model.safetensors"

        def load(d: Path) -> Any:
            return bnb.load_nf4_model(d)

    name, size = last_tensor(src / weights)

    def lie_offsets(h: dict) -> None:
        h[name]["data_offsets"][0] += 2

    def lie_dtype_size(h: dict) -> None:  # a dtype of another width: the offsets disagree
        h[name]["dtype"] = {"F32": "F16", "U8": "U16"}.get(h[name]["dtype"], "F32")

    def lie_dtype_kind(h: dict) -> None:  # a dtype of the same width: the checksum disagrees
        h[name]["dtype"] = {"F32": "I32", "U8": "I8"}.get(h[name]["dtype"], "U8")

    cases = {
        "truncated": (lambda p: truncate(p, 3), name, "truncated"),
        "bit flip": (lambda p: flip(p, -size // 2), name, "corrupted"),
        "offsets lie": (lambda p: rewrite_header(p, lie_offsets), name, "data_offsets"),
        "dtype lies (size)": (lambda p: rewrite_header(p, lie_dtype_size), name, "lies about"),
        "dtype lies (kind)": (lambda p: rewrite_header(p, lie_dtype_kind), name, "was written as"),
    }
    load(src)  # intact: reads
    for case, (damage, tensor, why) in cases.items():
        bad = tmp_path / case.replace(" ", "-")
        shutil.copytree(src, bad)
        damage(bad / weights)
        with pytest.raises(CheckpointError) as refused:
            load(bad)
        message = str(refused.value)
        assert str(bad / weights) in message and repr(tensor) in message, (case, message)
        assert why in message, (case, message)


def test_training_refuses_a_corrupted_base(
    model_dir: Path, data: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A float or NF4 base with a flipped bit in a weight is refused before training, naming
    the file and the tensor; nothing is written."""
    nf4 = bnb.quantize_model(model_dir, tmp_path / "nf4")
    for base, method in ((model_dir, "lora"), (nf4, "qlora")):
        bad = tmp_path / f"bad-{method}"
        shutil.copytree(base, bad)
        name, size = last_tensor(bad / "model.safetensors")
        flip(bad / "model.safetensors", -size // 2)
        out = tmp_path / f"run-{method}"
        assert main(train_args(bad, data["chat"], out, "--method", method, "--steps", "1")) == 2
        err = capsys.readouterr().err
        assert f"{bad / 'model.safetensors'}: tensor {name!r}" in err and "corrupted" in err
        assert not out.exists() and leftovers(tmp_path) == []


@pytest.mark.slow
@pytest.mark.crash
def test_resume_skips_a_torn_or_corrupted_checkpoint(
    model_dir: Path, data: dict[str, Path], env: dict, shared: Path, tmp_path: Path
) -> None:
    """The newest checkpoint with a data file changed, truncated, or without its checksums:
    --resume says which it skips and why (naming the file and the arrays it holds),
    continues from the one before it, and ends as the uninterrupted run."""
    ref = reference("lora", model_dir, data, env, shared)
    out, work, log = tmp_path / "run", tmp_path / ".run.run", tmp_path / "log"
    args = run_args("lora", model_dir, data, out)
    assert run(args, env, log, fault="export:1") == -signal.SIGKILL, tail(log)
    assert checkpoint_steps(work) == [4, 6]
    pristine = tmp_path / "pristine"
    shutil.copytree(work, pristine)
    step6 = work / "state" / "6"
    recorded = json.loads((step6 / CHECKSUMS).read_text())
    data_file = max(  # the one data file of the params' store that holds the arrays
        (k for k in recorded["files"] if k.startswith("params/")),
        key=lambda k: recorded["files"][k]["bytes"],
    )
    size = recorded["files"][data_file]["bytes"]
    damages = {
        "bit flip": (lambda: flip(step6 / data_file, size // 2), "sha256 differs"),
        "truncated": (lambda: truncate(step6 / data_file, 7), "bytes, "),
        "torn": (lambda: (step6 / CHECKSUMS).unlink(), f"no {CHECKSUMS}"),  # killed before it
    }
    for damage, (act, why) in damages.items():
        shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(out, ignore_errors=True)
        shutil.copytree(pristine, work)
        act()
        log.write_text("")
        assert run([*args, "--resume"], env, log) == 0, tail(log)
        text = log.read_text()
        skipped = next(x for x in text.splitlines() if "skipping the checkpoint of step 6" in x)
        assert why in skipped, skipped
        if damage != "torn":
            assert str(step6 / data_file) in skipped and "params" in skipped, skipped
        assert "continuing from the checkpoint of step 4" in text
        assert_same_run(out, ref.out, damage)
        assert leftovers(tmp_path) == []


SIZES = (("lora_A", 2000), ("lora_B", 3000))  # noise: chunks that compress to about their size


def changed_arrays(before: Path, after: Path) -> list[str]:
    """The arrays of an orbax item whose stored chunks differ byte for byte between two copies
    of it (read through tensorstore's OCDBT store): the oracle for a damaged data file, which
    may hold one array's chunks or several, in the order tensorstore wrote them."""
    import tensorstore as ts

    def chunks(item: Path) -> dict[bytes, bytes]:
        kv = ts.KvStore.open({"driver": "ocdbt", "base": f"file://{item}/"}).result()
        return {key: bytes(kv.read(key).result().value) for key in kv.list().result()}

    a, b = chunks(before), chunks(after)
    return sorted(
        {key.decode().split("/")[0] for key in a.keys() | b.keys() if a.get(key) != b.get(key)}
    )


def test_a_damaged_checkpoint_is_named_and_skipped(tmp_path: Path) -> None:
    """A checkpoint with a flipped bit, a truncated file or no checksums fails ``verify``,
    naming the file (and, for the arrays' data, the arrays whose chunks changed);
    ``restore_intact`` says so, falls back to the one before and removes the damaged one."""
    import jax.numpy as jnp

    rng = np.random.default_rng(0)  # noise: stored apart from the b-tree, in a data file each
    params = {"layer": {n: jnp.asarray(rng.normal(size=k), jnp.float32) for n, k in SIZES}}
    opt = {"mu": jnp.zeros(3)}
    pristine = tmp_path / "pristine"
    with TrainCheckpoints(pristine) as ckpts:
        for step in (1, 2):
            ckpts.save(step, {"layer": {k: v + step for k, v in params["layer"].items()}}, opt, {})
    recorded = json.loads((pristine / "2" / CHECKSUMS).read_text())["files"]
    data_file = max(
        (k for k in recorded if k.startswith("params/")), key=lambda k: recorded[k]["bytes"]
    )
    damages = {
        "bit flip": (lambda d: flip(d / data_file, -recorded[data_file]["bytes"] // 3), "sha256"),
        "truncated": (lambda d: truncate(d / data_file, 5), "bytes, "),
        "torn": (lambda d: (d / CHECKSUMS).unlink(), f"no {CHECKSUMS}"),
        "lost file": (lambda d: (d / data_file).unlink(), "missing"),
    }
    for damage, (act, why) in damages.items():
        where = tmp_path / damage.replace(" ", "-")
        shutil.copytree(pristine, where)
        act(where / "2")
        notes: list[str] = []
        with TrainCheckpoints(where) as ckpts:
            ckpts.verify(1)
            with pytest.raises(CorruptCheckpoint) as refused:
                ckpts.verify(2)
            message = str(refused.value)
            assert why in message, (damage, message)
            if damage != "torn":
                assert message.startswith(f"{where / '2' / data_file}: "), message
            if damage == "bit flip":
                changed = changed_arrays(pristine / "2" / "params", where / "2" / "params")
                assert len(changed) == 1, changed  # the flipped bit lies in one array's chunk
                assert message.endswith(f"; tensors changed: params {changed[0]}"), message
            restored = ckpts.restore_intact(params, opt, notes.append)
        assert restored is not None and restored[2] == {}
        np.testing.assert_array_equal(restored[0]["layer"]["lora_B"], params["layer"]["lora_B"] + 1)
        assert notes == [f"skipping the checkpoint of step 2: {message}"]
        assert sorted(p.name for p in where.iterdir() if p.name.isdigit()) == ["1"]
