"""The console script runs again under ``glibc.malloc.hugetlb=1`` (``apps/hugepages.py``)."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

from jax_impl.apps.hugepages import huge_pages_env, thp_mode

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


@pytest.mark.skipif(
    platform.libc_ver()[0] != "glibc" or thp_mode() not in ("always", "madvise"),
    reason="needs glibc and transparent huge pages (always or madvise)",
)
def test_the_process_runs_again_with_the_tunable_and_the_same_pid() -> None:
    code = (
        "import os\n"
        "from jax_impl.apps.hugepages import reexec_with_huge_pages\n"
        "print('start', os.getpid(), os.environ.get('GLIBC_TUNABLES'), flush=True)\n"
        "reexec_with_huge_pages()\n"
        "print('go on', os.getpid(), os.environ.get('GLIBC_TUNABLES'))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, env=env, check=True
    ).stdout.split("\n")
    pid = out[0].split()[1]
    assert out[:3] == [
        f"start {pid} None",
        f"start {pid} glibc.malloc.hugetlb=1",  # the same process, executed once more
        f"go on {pid} glibc.malloc.hugetlb=1",
    ]


def test_the_console_script_runs_under_the_tunable() -> None:
    """``python -m jax_impl.apps.cli`` goes the console script's way (``console``: the
    re-execution tested above, then ``main``) and a command still runs to its output."""
    env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
    proc = subprocess.run(
        [sys.executable, "-m", "jax_impl.apps.cli", "memory", "--params", "1e6"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr
    assert "nf4" in proc.stdout.lower()
