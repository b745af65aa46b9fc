"""The host CPU: the features the engine asks of it, and the process settings XLA's CPU runtime
runs the engine's steps best under, which ``qlora-spec`` sets for itself.

Two settings are read only as a process starts (glibc's tunables) or as JAX makes its CPU
client (``XLA_FLAGS``), so the console script executes itself once more with both added
before it does anything else (``reexec_with_runtime_env``):

* ``GLIBC_TUNABLES`` gets ``glibc.malloc.hugetlb=1``. XLA's CPU runtime allocates a
  computation's temporaries afresh on every execution, in one block (about 440 MB for a LoRA
  training step at ``bench/cpu_train.py``'s default shape), and frees it afterwards. glibc
  serves a block that large with a new ``mmap``, so every step faults each 4 KiB page of it in
  again and the kernel zeroes it: about 113,000 page faults and a tenth of the step's CPU time
  there. With the tunable, malloc asks for transparent huge pages on such mappings
  (``madvise(MADV_HUGEPAGE)``, where ``/sys/kernel/mm/transparent_hugepage/enabled`` allows
  it): about 600 faults a step, and the step about 8% faster. Added where glibc is the libc
  and transparent huge pages are ``always`` or ``madvise``.
* ``XLA_FLAGS`` gets ``--xla_cpu_prefer_vector_width=512`` on a CPU with bf16 matrix units
  (``BF16_CPU_FLAGS``: AMX, AVX512-BF16; both come with AVX-512). XLA's CPU backend emits its
  loops (the conversions around every bf16 product, the softmax, SwiGLU, the norms) with
  256-bit vectors unless told otherwise, a default kept for the older AVX-512 CPUs that lowered
  their clock for 512-bit work. On a Xeon with AMX the bf16 LoRA step at
  ``bench/cpu_train.py``'s default shape is about 3% faster with 512-bit vectors (five pairs
  of processes, 0.951-0.988 of the step time); float32 steps are unchanged.

A setting already there (the tunable or the flag, to any value) is left as it is. Programs that
call the library directly set both themselves::

    GLIBC_TUNABLES=glibc.malloc.hugetlb=1 XLA_FLAGS=--xla_cpu_prefer_vector_width=512 \\
        python my_training.py

One more setting takes effect in the running process (``trim_heap_after_compiles``): after every
XLA compilation of a second or more, glibc returns the heap the compiler freed to the kernel
(``malloc_trim``). glibc keeps freed memory for reuse, and XLA's compiler frees hundreds of MB
of it (about 400 MB for the bf16 LoRA step of ``bench/cpu_train.py``'s SmolLM2-135M shape, 600
for QLoRA) that the step's temporaries, one fresh ``mmap`` per execution, never reuse: without
the trim the first step's peak resident set is the compiler's leftovers plus the step's
temporaries. ``qlora-spec`` calls it as it starts; a program calling the library calls it once.
"""

from __future__ import annotations

import ctypes
import os
import platform
import sys
from collections.abc import Callable, Mapping
from typing import Any

# x86 CPU flags (as /proc/cpuinfo names them) of matrix units that multiply bf16 in hardware:
# AMX tiles and the AVX512-BF16 dot products, the units XLA's CPU dots reach for bf16.
BF16_CPU_FLAGS = ("amx_bf16", "avx512_bf16")
CPUINFO = "/proc/cpuinfo"

TUNABLE = "glibc.malloc.hugetlb"
THP_ENABLED = "/sys/kernel/mm/transparent_hugepage/enabled"
VECTOR_WIDTH_FLAG = "--xla_cpu_prefer_vector_width"
# Set in the environment of the second execution, so that a process whose settings do not
# hold (the loader drops ``GLIBC_TUNABLES`` from a setuid or file-capability interpreter's
# environment) goes on rather than executing itself again and again.
REEXEC_MARK = "QLORA_SPEC_RUNTIME_ENV"


def cpu_flags(path: str = CPUINFO) -> frozenset[str]:
    """The words of ``path`` (``/proc/cpuinfo``: its ``flags`` lines name the CPU's features);
    empty where the file cannot be read (not Linux)."""
    try:
        with open(path) as f:
            return frozenset(f.read().split())
    except OSError:
        return frozenset()


def bf16_units(flags: frozenset[str]) -> bool:
    """Whether CPU ``flags`` (``cpu_flags()``) name a matrix unit that multiplies bf16 in
    hardware (one of ``BF16_CPU_FLAGS``)."""
    return any(f in flags for f in BF16_CPU_FLAGS)


def thp_mode(path: str = THP_ENABLED) -> str | None:
    """The kernel's transparent huge page mode (``always``, ``madvise`` or ``never``), None
    where the file does not exist (not Linux, or a kernel without THP)."""
    try:
        with open(path) as f:
            text = f.read()
    except OSError:
        return None
    chosen = [w[1:-1] for w in text.split() if w.startswith("[") and w.endswith("]")]
    return chosen[0] if chosen else None


def huge_pages_env(env: Mapping[str, str], libc: str, thp: str | None) -> str | None:
    """The ``GLIBC_TUNABLES`` value that adds ``glibc.malloc.hugetlb=1`` to ``env``'s, or None
    when there is nothing to add: ``libc`` (``platform.libc_ver()[0]``) is not glibc, ``thp``
    (``thp_mode()``) is not ``always`` or ``madvise``, or the tunable is set already."""
    if libc != "glibc" or thp not in ("always", "madvise"):
        return None
    current = env.get("GLIBC_TUNABLES", "")
    if any(item.split("=")[0] == TUNABLE for item in current.split(":") if item):
        return None
    return f"{current}:{TUNABLE}=1" if current else f"{TUNABLE}=1"


def vector_width_env(env: Mapping[str, str], flags: frozenset[str]) -> str | None:
    """The ``XLA_FLAGS`` value that adds ``--xla_cpu_prefer_vector_width=512`` to ``env``'s, or
    None when there is nothing to add: none of ``BF16_CPU_FLAGS`` is among ``flags``
    (``cpu_flags()``), or ``XLA_FLAGS`` sets the vector width already."""
    if not bf16_units(flags):
        return None
    current = env.get("XLA_FLAGS", "")
    if any(item.split("=")[0] == VECTOR_WIDTH_FLAG for item in current.split()):
        return None
    return f"{current} {VECTOR_WIDTH_FLAG}=512" if current.strip() else f"{VECTOR_WIDTH_FLAG}=512"


def runtime_env(env: Mapping[str, str]) -> dict[str, str] | None:
    """A copy of ``env`` with what this machine wants added (``huge_pages_env``,
    ``vector_width_env``), or None when there is nothing to add."""
    values = {
        "GLIBC_TUNABLES": huge_pages_env(env, platform.libc_ver()[0], thp_mode()),
        "XLA_FLAGS": vector_width_env(env, cpu_flags()),
    }
    added = {k: v for k, v in values.items() if v is not None}
    return {**env, **added} if added else None


def reexec_with_runtime_env() -> None:
    """Execute this process again, same interpreter, arguments and process id, under
    ``runtime_env``. Returns, and the process goes on as it is, when there is nothing to add,
    in the second execution (``REEXEC_MARK`` set), and where the interpreter cannot be
    executed (no ``sys.executable``, or ``execv`` fails: ``XLA_FLAGS`` still holds for this
    process, the tunable does not)."""
    if os.environ.get(REEXEC_MARK) or not sys.executable:
        return
    env = runtime_env(os.environ)
    if env is None:
        return
    os.environ.update(env)
    os.environ[REEXEC_MARK] = "1"
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execv(sys.executable, [sys.executable, *sys.orig_argv[1:]])
    except OSError:
        return


# The jax.monitoring event of an XLA compilation, and the shortest compilation worth a trim: a
# trim walks the whole heap (about 0.1 s after the 25 s compilation of the SmolLM2-135M shape's
# QLoRA step), so only compilations that leave much behind are followed by one.
COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"
TRIM_AFTER_S = 1.0
_trimming = False


def malloc_trim() -> Callable[[int], int] | None:
    """glibc's ``malloc_trim`` (pad -> 1 if memory was returned), or None where the C library is
    not glibc or has none."""
    if platform.libc_ver()[0] != "glibc":
        return None
    try:
        libc = ctypes.CDLL(None)  # the C library this process already runs on
    except OSError:
        return None
    return getattr(libc, "malloc_trim", None)


def heap_trimmer(
    trim: Callable[[int], int], min_seconds: float = TRIM_AFTER_S
) -> Callable[..., None]:
    """A ``jax.monitoring`` duration listener that calls ``trim(0)`` after every XLA compilation
    (``COMPILE_EVENT``) that took at least ``min_seconds``, and ignores every other event."""

    def listener(event: str, duration_secs: float, **_: Any) -> None:
        if event == COMPILE_EVENT and duration_secs >= min_seconds:
            trim(0)

    return listener


def trim_heap_after_compiles() -> bool:
    """From now on in this process, return the heap an XLA compilation of ``TRIM_AFTER_S`` or
    more freed to the kernel (``malloc_trim``) as the compilation ends, before the program
    first runs. Registers once; returns whether the process trims (False without glibc)."""
    global _trimming
    if _trimming:
        return True
    trim = malloc_trim()
    if trim is None:
        return False
    import jax.monitoring

    jax.monitoring.register_event_duration_secs_listener(heap_trimmer(trim))
    _trimming = True
    return True
