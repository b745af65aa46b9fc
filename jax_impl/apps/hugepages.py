"""Huge pages for XLA's CPU temporaries: the console script runs under ``glibc.malloc.hugetlb=1``.

XLA's CPU runtime allocates a computation's temporaries afresh on every execution, in one
block (about 440 MB for a LoRA training step at ``bench/cpu_train.py``'s default shape), and
frees it afterwards. glibc serves a block that large with a new ``mmap``, so every step
faults each 4 KiB page of it in again and the kernel zeroes it: about 113,000 page faults and
a tenth of the step's CPU time there. With the glibc tunable ``glibc.malloc.hugetlb=1``,
malloc asks for transparent huge pages on such mappings (``madvise(MADV_HUGEPAGE)``, where
``/sys/kernel/mm/transparent_hugepage/enabled`` allows it): about 600 faults a step, and the
step about 8% faster. glibc reads its tunables when a process starts, so ``qlora-spec``
executes itself once more with the tunable added to ``GLIBC_TUNABLES`` before it does
anything else. Programs that call the library directly set it themselves::

    GLIBC_TUNABLES=glibc.malloc.hugetlb=1 python my_training.py

A ``GLIBC_TUNABLES`` that already sets ``glibc.malloc.hugetlb`` (to any value) is left alone,
as is a system without glibc or with transparent huge pages off.
"""

from __future__ import annotations

import os
import platform
import sys
from collections.abc import Mapping

TUNABLE = "glibc.malloc.hugetlb"
THP_ENABLED = "/sys/kernel/mm/transparent_hugepage/enabled"


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


def with_huge_pages(env: Mapping[str, str]) -> dict[str, str] | None:
    """A copy of ``env`` with ``glibc.malloc.hugetlb=1`` added to ``GLIBC_TUNABLES`` on this
    system, or None when there is nothing to add (``huge_pages_env``)."""
    value = huge_pages_env(env, platform.libc_ver()[0], thp_mode())
    return None if value is None else {**env, "GLIBC_TUNABLES": value}


def reexec_with_huge_pages() -> None:
    """Execute this process again, same interpreter, arguments and process id, under
    ``with_huge_pages``; returns when there is nothing to add, so the second run goes on."""
    env = with_huge_pages(os.environ)
    if env is None:
        return
    os.environ["GLIBC_TUNABLES"] = env["GLIBC_TUNABLES"]
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(sys.executable, [sys.executable, *sys.orig_argv[1:]])
