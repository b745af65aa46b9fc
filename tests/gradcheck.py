"""Central finite differences, the yardstick for every hand-derived backward."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np


def numerical_grad(
    f: Callable[[], float],
    x: np.ndarray,
    eps: float = 1e-6,
    max_entries: int | None = None,
    rng: np.random.Generator | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """``(df/dx at the chosen entries, flat indices)`` by central differences.

    ``x`` is perturbed in place and restored. With ``max_entries`` only a random subset of
    entries is probed (whole-model checks), otherwise every entry.
    """
    flat = x.reshape(-1)
    idx = np.arange(flat.size)
    if max_entries is not None and flat.size > max_entries:
        idx = (rng or np.random.default_rng(0)).choice(flat.size, max_entries, replace=False)
    out = np.empty(idx.size)
    for j, i in enumerate(idx):
        old = flat[i]
        flat[i] = old + eps
        fp = f()
        flat[i] = old - eps
        fm = f()
        flat[i] = old
        out[j] = (fp - fm) / (2 * eps)
    return out, idx


def grad_rel_err(analytic: np.ndarray, numeric: np.ndarray) -> float:
    """``|a - n| / max(|a|, |n|)`` over the probed entries (norms).

    A gradient that is zero in exact arithmetic (a key bias: softmax ignores a shift shared
    by all keys) shows only rounding noise on both sides; below ``ZERO`` both count as zero.
    """
    scale = max(np.linalg.norm(analytic), np.linalg.norm(numeric))
    if scale < ZERO:
        return 0.0
    return float(np.linalg.norm(analytic - numeric) / scale)


ZERO = 1e-8  # finite differences resolve about 1e-10 here (eps 1e-6, float64 loss ~ 1)
