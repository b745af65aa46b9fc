"""bitsandbytes' PyTorch reference kernels (``bitsandbytes.backends.default.ops``), the
yardstick for our NF4: they compute what bnb's CUDA kernels compute.

On CPU bnb dispatches to C++ kernels instead. Its 8-bit kernel there skips the nearest code
for a few values in a thousand, and its ``dequantize_4bit`` was reported wrong when a row
does not align with the 64-blocks (shape 128x96: max error 1.68 where the correct bound is
0.46; it agreed with the reference on the AVX2 machine these tests were written on), so
neither is compared against. Import only after ``pytest.importorskip("bitsandbytes")``.
"""

from __future__ import annotations

import gc
import types
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from bitsandbytes.backends.default import ops as default_ops


def find_reference_quantize_blockwise() -> Callable[..., Any] | None:
    """bnb's PyTorch ``quantize_blockwise`` (A, code, blocksize) -> (codes, absmax), or None.

    The reference functions in default/ops.py are all registered under the name ``_``, so it
    is found among live functions by module and argument names.
    """
    for obj in gc.get_objects():
        if (
            type(obj) is types.FunctionType
            and obj.__module__ == default_ops.__name__
            and obj.__code__.co_varnames[:3] == ("A", "code", "blocksize")
        ):
            return obj
    return None


def _unwrapped(fn: Any) -> Any:
    return getattr(fn, "__wrapped__", fn)  # skips bnb's torch.compile wrapper


def reference_dequantize_4bit(packed: torch.Tensor, state: Any) -> np.ndarray:
    """float32 weights from bnb's packed NF4 bytes and ``QuantState``, by the reference."""
    absmax = state.absmax
    if state.nested:  # as bnb's dequantize_4bit: code * nested absmax, then + offset
        s2 = state.state2
        deq = _unwrapped(default_ops._dequantize_blockwise_compute)
        absmax = deq(absmax, s2.absmax, s2.code, s2.blocksize, torch.float32) + state.offset
    deq_4bit = _unwrapped(default_ops._dequantize_4bit_compute)
    out = deq_4bit(
        packed.reshape(-1), absmax, state.code, state.blocksize, state.shape, torch.float32
    )
    return out.reshape(state.shape).numpy()
