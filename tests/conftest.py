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


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(0)
