"""Helpers shared by the tests: the one table of tolerances and the error measure."""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import numpy as np

# Relative tolerances per dtype, used by every parity check in the suite.
#   float64: spec vs finite differences, and engine vs spec in x64 mode.
#   float32: engine vs spec, spec vs transformers.
#   bfloat16: relative norm error of bf16 compute against a float64 reference.
RTOL = {"float64": 1e-10, "float32": 1e-5, "bfloat16": 2e-2}
FD_RTOL = 1e-6  # central finite differences in float64 against a hand-derived backward
HF_RTOL = 1e-4  # our float32 logits against transformers' float32 logits
# One gradient leaf of a bf16-compute model against its own norm. A leaf of a few dozen values
# sums the bf16 roundings of every activation on its path (the residual stream is bf16 too), and
# measured 1-4% on the tiny random models of the parity tests (6 seeds x 6 cases, worst 6.2%);
# a wrong leaf (a lost scale, a swapped operand) is off by tens of percent.
BF16_LEAF_RTOL = 8e-2
# A DPO loss under bf16 compute against a float64 reference. The loss is -log sigmoid of a
# difference of four sums of token log-probabilities: a small relative error in each sum is a
# larger one in their difference. 48 losses (8 seeds x LoRA and QLoRA x 3 steps) of the
# preference tests measured a median of 0.57% and a worst of 3.3%. It only holds bf16 compute
# near the spec: a wrong beta, reference or prompt mask is caught in float32
# (tests/test_preference.py::test_perturbations_are_caught).
DPO_BF16_RTOL = 5e-2


def rel_err(a: np.ndarray, b: np.ndarray) -> float:
    """Relative norm error ``|a - b| / max(|b|, tiny)`` over all elements."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        raise AssertionError(f"shape mismatch: {a.shape} vs {b.shape}")
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-300))


def grad_rel_errs(got: dict[str, np.ndarray], want: dict[str, np.ndarray]) -> dict[str, float]:
    """Relative error of every gradient leaf, measured against at least 1% of the largest
    leaf's norm: some gradients are zero in exact arithmetic (a key bias: softmax ignores a
    shift shared by all keys) and hold only rounding noise, which has no relative size."""
    if set(got) != set(want):
        raise AssertionError(f"gradient leaves differ: {sorted(set(got) ^ set(want))}")
    floor = 0.01 * max(float(np.linalg.norm(w)) for w in want.values())
    out = {}
    for path, w in want.items():
        diff = np.asarray(got[path], np.float64) - np.asarray(w, np.float64)
        out[path] = float(np.linalg.norm(diff) / max(float(np.linalg.norm(w)), floor))
    return out


def leaves(tree: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    """``(path, leaf)`` for every leaf of a nested dict / list param tree, paths dotted."""
    if isinstance(tree, dict):
        for k, v in tree.items():
            yield from leaves(v, f"{prefix}{k}.")
    elif isinstance(tree, list):
        for i, v in enumerate(tree):
            yield from leaves(v, f"{prefix}{i}.")
    else:
        yield prefix[:-1], tree


def simulated_devices_env(devices: int) -> dict[str, str]:
    """This process's environment for a subprocess that sees ``devices`` CPU devices (and no
    multi-process settings of its own); small programs compile faster without LLVM's
    expensive passes."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_", "SLURM_"))}
    env["JAX_PLATFORMS"] = "cpu"
    env["XLA_FLAGS"] = (
        f"--xla_force_host_platform_device_count={devices} "
        "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
    )
    return env
