"""Shared test settings: the one table of tolerances, and the test groups.

Groups (pytest markers): ``slow`` for whole-model checks that take more than a few seconds,
``interop`` for comparisons with torch / transformers / PEFT / bitsandbytes. The fast subset
is ``pytest -m "not slow and not interop"``.
"""

from __future__ import annotations

import numpy as np
import pytest


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(0)
