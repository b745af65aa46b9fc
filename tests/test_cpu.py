"""The console script runs again under the settings XLA's CPU runtime wants (``jax_impl/cpu.py``):
``glibc.malloc.hugetlb=1``, and 512-bit vectors on a CPU with bf16 matrix units; and it returns
the heap XLA's compiler frees to the kernel after each long compilation."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from pathlib import Path

import jax
import jax.monitoring
import jax.numpy as jnp
import pytest

import jax_impl.cpu as cpu
from jax_impl.cpu import cpu_flags, huge_pages_env, runtime_env, thp_mode, vector_width_env

ROOT = Path(__file__).resolve().parents[1]


def test_the_tunable_is_added_once_and_only_where_it_works() -> None:
    assert huge_pages_env({}, "glibc", "madvise") == "glibc.malloc.hugetlb=1"
    assert huge_pages_env({}, "glibc", "always") == "glibc.malloc.hugetlb=1"
    other = {"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}
    assert huge_pages_env(other, "glibc", "madvise") == (
        "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1"
    )
    # Already chosen (to any value), another libc, huge pages off: nothing to add.
    assert huge_pages_env({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}, "glibc", "always") is None
    both = {"GLIBC_TUNABLES": "a=1:glibc.malloc.hugetlb=1"}
    assert huge_pages_env(both, "glibc", "madvise") is None
    assert huge_pages_env({}, "", "madvise") is None
    assert huge_pages_env({}, "glibc", "never") is None
    assert huge_pages_env({}, "glibc", None) is None


def test_thp_mode_reads_the_bracketed_choice(tmp_path: Path) -> None:
    f = tmp_path / "enabled"
    f.write_text("always [madvise] never\n")
    assert thp_mode(str(f)) == "madvise"
    f.write_text("[always] madvise never\n")
    assert thp_mode(str(f)) == "always"
    assert thp_mode(str(tmp_path / "missing")) is None


AMX = frozenset({"fpu", "avx512f", "amx_tile", "amx_bf16"})
WIDE = "--xla_cpu_prefer_vector_width=512"


def test_the_vector_width_is_added_once_and_only_with_bf16_units() -> None:
    assert vector_width_env({}, AMX) == WIDE
    assert vector_width_env({}, frozenset({"avx512f", "avx512_bf16"})) == WIDE
    assert vector_width_env({"XLA_FLAGS": "  "}, AMX) == WIDE
    other = {"XLA_FLAGS": "--xla_cpu_enable_fast_math=false"}
    assert vector_width_env(other, AMX) == f"--xla_cpu_enable_fast_math=false {WIDE}"
    # Chosen already (to any width), or no bf16 matrix units (AVX-512 alone, AVX2, unread).
    chosen = {"XLA_FLAGS": "--a=1 --xla_cpu_prefer_vector_width=256"}
    assert vector_width_env(chosen, AMX) is None
    assert vector_width_env({}, frozenset({"avx512f", "avx2"})) is None
    assert vector_width_env({}, frozenset()) is None


def test_cpu_flags_are_the_words_of_cpuinfo(tmp_path: Path) -> None:
    f = tmp_path / "cpuinfo"
    f.write_text("processor\t: 0\nflags\t\t: fpu avx512f amx_bf16\n")
    assert {"fpu", "avx512f", "amx_bf16"} <= cpu_flags(str(f))
    assert cpu_flags(str(tmp_path / "missing")) == frozenset()


def test_runtime_env_adds_what_the_machine_allows(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cpu.platform, "libc_ver", lambda: ("glibc", "2.39"))
    monkeypatch.setattr(cpu, "thp_mode", lambda: "madvise")
    monkeypatch.setattr(cpu, "cpu_flags", lambda: AMX)
    env = {"HOME": "/h", "XLA_FLAGS": "--x=1"}
    assert runtime_env(env) == {
        "HOME": "/h",
        "XLA_FLAGS": f"--x=1 {WIDE}",
        "GLIBC_TUNABLES": "glibc.malloc.hugetlb=1",
    }
    assert env == {"HOME": "/h", "XLA_FLAGS": "--x=1"}  # a copy; the caller's is untouched
    monkeypatch.setattr(cpu, "cpu_flags", lambda: frozenset({"avx2"}))
    assert runtime_env({}) == {"GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}
    monkeypatch.setattr(cpu, "thp_mode", lambda: "never")
    assert runtime_env({}) is None


def _clean_env() -> dict[str, str]:
    drop = ("GLIBC_TUNABLES", "XLA_FLAGS", cpu.REEXEC_MARK)
    return {k: v for k, v in os.environ.items() if k not in drop}


@pytest.mark.skipif(runtime_env(_clean_env()) is None, reason="nothing to add on this machine")
def test_the_process_runs_again_with_the_settings_and_the_same_pid() -> None:
    env = _clean_env()
    added = runtime_env(env)
    assert added is not None
    code = (
        "import os\n"
        "from jax_impl.cpu import reexec_with_runtime_env\n"
        "def show(): return os.environ.get('GLIBC_TUNABLES'), os.environ.get('XLA_FLAGS')\n"
        "print('start', os.getpid(), *show(), flush=True)\n"
        "reexec_with_runtime_env()\n"
        "print('go on', os.getpid(), *show())\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, env=env, check=True
    ).stdout.split("\n")
    pid = out[0].split()[1]
    now = f"{added.get('GLIBC_TUNABLES')} {added.get('XLA_FLAGS')}"
    assert out[:3] == [
        f"start {pid} None None",
        f"start {pid} {now}",  # the same process, executed once more
        f"go on {pid} {now}",
    ]
    assert "glibc.malloc.hugetlb=1" in now or WIDE in now


def test_a_setting_that_does_not_hold_runs_the_process_again_once() -> None:
    """Where the second execution still lacks a setting (the loader drops ``GLIBC_TUNABLES``
    from a setuid interpreter's environment; here ``runtime_env`` always has one more to add),
    the process goes on after one more execution instead of executing itself forever."""
    code = (
        "import os\n"
        "import jax_impl.cpu as cpu\n"
        "cpu.runtime_env = lambda env: {**env, 'QLORA_SPEC_TEST_ADDED': 'yes'}\n"
        "print('start', os.getpid(), os.environ.get('QLORA_SPEC_TEST_ADDED'), flush=True)\n"
        "cpu.reexec_with_runtime_env()\n"
        "print('go on', os.getpid(), os.environ.get('QLORA_SPEC_TEST_ADDED'))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=_clean_env(),
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    pid = proc.stdout.split()[1]
    assert proc.stdout.split("\n")[:3] == [
        f"start {pid} None",
        f"start {pid} yes",
        f"go on {pid} yes",
    ]


def test_an_interpreter_that_cannot_be_executed_goes_on(monkeypatch: pytest.MonkeyPatch) -> None:
    """``execv`` failing (the interpreter's file gone) leaves this process running, with the
    settings in its environment for what reads them later (``XLA_FLAGS``)."""
    monkeypatch.setattr(cpu, "runtime_env", lambda env: {**env, "XLA_FLAGS": WIDE})
    for name in ("XLA_FLAGS", cpu.REEXEC_MARK):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(sys, "executable", str(ROOT / "no-such-interpreter"))
    cpu.reexec_with_runtime_env()
    assert os.environ["XLA_FLAGS"] == WIDE
    assert os.environ[cpu.REEXEC_MARK] == "1"
    monkeypatch.setattr(sys, "executable", "")  # embedded: no interpreter to execute at all
    monkeypatch.delenv(cpu.REEXEC_MARK)
    monkeypatch.setattr(cpu, "runtime_env", lambda env: pytest.fail("nothing to execute"))
    cpu.reexec_with_runtime_env()


def test_the_console_script_runs_under_the_settings() -> None:
    """``python -m jax_impl.apps.cli`` goes the console script's way (``console``: the
    re-execution tested above, then ``main``) and a command still runs to its output."""
    env = _clean_env()
    proc = subprocess.run(
        [sys.executable, "-m", "jax_impl.apps.cli", "memory", "--params", "1e6"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr
    assert "nf4" in proc.stdout.lower()


def test_the_heap_is_trimmed_after_long_compilations_only() -> None:
    calls: list[int] = []
    listener = cpu.heap_trimmer(lambda pad: calls.append(pad) or 1, min_seconds=1.0)
    listener(cpu.COMPILE_EVENT, 0.5)
    listener("/jax/core/compile/jaxpr_trace_duration", 30.0)
    assert calls == []
    listener(cpu.COMPILE_EVENT, 1.0, fun_name="step")
    listener(cpu.COMPILE_EVENT, 40.0)
    assert calls == [0, 0]


def test_jax_reports_its_compilations_under_the_event_the_trim_follows() -> None:
    """The event name is JAX's: a listener on it sees a fresh compilation (a renamed event would
    leave the trim silently off)."""
    seen: list[float] = []
    listener = cpu.heap_trimmer(lambda pad: seen.append(pad) or 1, min_seconds=0.0)
    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        jax.jit(lambda x: jnp.cumsum(jnp.sin(x) * 3.25))(jnp.ones((7, 13))).block_until_ready()
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
    assert seen


def test_the_trim_is_glibcs_and_registers_once(monkeypatch: pytest.MonkeyPatch) -> None:
    registered: list[object] = []
    monkeypatch.setattr(jax.monitoring, "register_event_duration_secs_listener", registered.append)
    monkeypatch.setattr(cpu, "_trimming", False)
    if sys.platform == "linux" and platform.libc_ver()[0] == "glibc":
        trim = cpu.malloc_trim()
        assert trim is not None and trim(0) in (0, 1)
        assert cpu.trim_heap_after_compiles() and cpu.trim_heap_after_compiles()
        assert len(registered) == 1 and callable(registered[0])
    monkeypatch.setattr(cpu, "_trimming", False)
    monkeypatch.setattr(platform, "libc_ver", lambda: ("", ""))  # musl, macOS: nothing to call
    assert cpu.malloc_trim() is None
    assert not cpu.trim_heap_after_compiles()
    assert len(registered) <= 1
