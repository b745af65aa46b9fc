"""Shared test settings: the one table of tolerances, the test groups, and "auto" on CPUs.

Groups (pytest markers): ``slow`` for whole-model checks that take more than a few seconds,
``interop`` for comparisons with torch / transformers / PEFT / bitsandbytes. The fast subset
is ``pytest -m "not slow and not interop"``.
"""

from __future__ import annotations

import os

import numpy as np
import pytest

# dtype="auto" resolves to bfloat16 on a CPU with bf16 matrix units (AMX, AVX512-BF16); the
# suite holds "auto" to float32 on every CPU, in this process and the ones it starts, so its
# float32 expectations do not depend on the machine. bf16 compute is tested by name.
os.environ["QLORA_SPEC_CPU_BF16"] = "0"


# Compiling is most of the suite's time (the same tests with every program already in a
# compilation cache take a sixth of it), and the machine code's optimization is a large part of
# compiling: XLA's backend compiles at LLVM's lowest level for the tests. It is set here, in the
# process that starts the run, so that the xdist workers and every process a test starts
# inherit it. The programs are the same HLO, optimized by the same XLA passes; only their
# machine code is less tuned, and no test holds a timing. A ``--xla_backend_optimization_level``
# already in XLA_FLAGS is kept.
def pytest_configure(config: pytest.Config) -> None:
    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_backend_optimization_level" not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} --xla_backend_optimization_level=0".strip()


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(0)
