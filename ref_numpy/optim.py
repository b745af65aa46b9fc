"""AdamW, global-norm clipping and the warmup-cosine schedule, on nested param trees.

This is the optimizer half of the spec. It follows ``torch.optim.AdamW`` and
``optax.chain(optax.clip_by_global_norm(c), optax.adamw(schedule, ...))``: the three agree
to rounding (see ``adamw_update``), and the tests hold this file to both.

Param trees are nested dicts / lists / tuples with ``np.ndarray`` leaves, named like the
checkpoint, e.g. ``{"embed": {"embedding": E}, "layers": [{"attn": {"q_proj": {"kernel":
W}}}]}``. Gradients, and the AdamW moments ``mu`` and ``nu``, have the same structure.

One training step, and which step's learning rate it uses::

    grads, gnorm = clip_by_global_norm(grads, max_norm)
    lr = warmup_cosine(state.step, peak_lr, warmup_steps, total_steps)  # count BEFORE +1
    params, state = adamw_update(grads, state, params, lr, weight_decay=wd)

``state.step`` counts the updates already applied, so the first update (``state.step == 0``)
uses ``warmup_cosine(0, ...)``, which is ``init_lr`` (0.0 by default): with a warmup, the
very first update does not move the params. This is what optax does: ``scale_by_schedule``
evaluates the schedule at its ``count`` and only then increments it. PyTorch's
``LambdaLR`` lines up the same way when ``scheduler.step()`` is called after
``optimizer.step()``.

Note for the JAX mirror: optax keeps that ``count`` as int32, and
``optax.warmup_cosine_decay_schedule`` evaluated at an int32 count returns float32 even
under ``jax_enable_x64`` (``count / warmup_steps`` on int32 is float32, and ``join_schedules``'
``jnp.where`` keeps float32 against the weakly typed float64 cosine branch). The learning
rate is then ~1e-8 off from this file's float64 value. For float64 parity, hand optax
``lambda count: schedule(count.astype(jnp.int64))`` (or an equivalent float64 schedule).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

# A param tree: nested dict / list / tuple containers with ndarray leaves. Kept as ``Any``
# because the nesting is arbitrary; the helpers below define what counts as a container.
Tree = Any


# ----------------------------------------------------------------------------- tree helpers


def tree_map(fn: Callable[..., Any], tree: Tree, *rest: Tree) -> Tree:
    """Apply ``fn`` leaf-wise over one or more trees of the same structure.

    Containers are dicts (same keys), lists and tuples (same length); anything else is a
    leaf. The result has the structure of ``tree``; dict keys keep ``tree``'s order.

    Raises:
        ValueError: if the structures differ, naming the path where they do.
    """
    return _tree_map_at("", fn, tree, *rest)


def _tree_map_at(path: str, fn: Callable[..., Any], tree: Tree, *rest: Tree) -> Tree:
    if isinstance(tree, dict):
        for other in rest:
            if not isinstance(other, dict) or set(other) != set(tree):
                raise ValueError(f"tree structure mismatch at {path or '<root>'}: {_kind(other)}")
        return {
            k: _tree_map_at(f"{path}/{k}", fn, v, *(o[k] for o in rest)) for k, v in tree.items()
        }
    if isinstance(tree, (list, tuple)):
        for other in rest:
            if type(other) is not type(tree) or len(other) != len(tree):
                raise ValueError(f"tree structure mismatch at {path or '<root>'}: {_kind(other)}")
        mapped = [
            _tree_map_at(f"{path}/{i}", fn, v, *(o[i] for o in rest)) for i, v in enumerate(tree)
        ]
        return type(tree)(mapped)
    for other in rest:
        if isinstance(other, (dict, list, tuple)):
            raise ValueError(f"tree structure mismatch at {path or '<root>'}: {_kind(other)}")
    return fn(tree, *rest)


def _kind(x: object) -> str:
    if isinstance(x, dict):
        return f"dict with keys {sorted(x)}"
    if isinstance(x, (list, tuple)):
        return f"{type(x).__name__} of length {len(x)}"
    return f"leaf of type {type(x).__name__}"


def tree_leaves(tree: Tree) -> list[Any]:
    """The leaves of ``tree`` in ``jax.tree.leaves`` order (dict keys sorted, lists in order)."""
    if isinstance(tree, dict):
        return [leaf for k in sorted(tree) for leaf in tree_leaves(tree[k])]
    if isinstance(tree, (list, tuple)):
        return [leaf for v in tree for leaf in tree_leaves(v)]
    return [tree]


# ----------------------------------------------------------------------------- clipping


def global_norm(tree: Tree) -> float:
    """The L2 norm of all leaves taken together: ``sqrt(sum_leaves sum(x**2))``.

    Equals ``optax.tree.norm(tree)`` (formerly ``optax.global_norm``) and the ``total_norm``
    of ``torch.nn.utils.clip_grad_norm_``.
    """
    # Sum per leaf in the leaf's dtype, then across leaves; the order only matters at the
    # level of rounding.
    return math.sqrt(sum(float(np.sum(np.square(x))) for x in tree_leaves(tree)))


def clip_by_global_norm(grads: Tree, max_norm: float) -> tuple[Tree, float]:
    """Scale ``grads`` down so that their global norm is at most ``max_norm``.

    Semantics of ``optax.clip_by_global_norm(max_norm)``: with ``n = global_norm(grads)``,
    the grads pass through unchanged when ``n < max_norm``, and otherwise each leaf becomes
    ``(g / n) * max_norm`` (at ``n == max_norm`` that is ``g`` up to rounding).

    Args:
        grads: gradient tree.
        max_norm: the largest global norm let through; must be positive.

    Returns:
        ``(clipped, n)``: the clipped tree (same structure and dtypes) and the global norm
        of the *unclipped* grads, which is what training loops log.
    """
    if not max_norm > 0:
        raise ValueError(f"clip_by_global_norm: max_norm must be > 0, got {max_norm!r}")
    norm = global_norm(grads)
    if norm < max_norm:
        return grads, norm
    # Divide first, then multiply: the same order as optax, so the mirror agrees to the bit.
    return tree_map(lambda g: (g / norm) * max_norm, grads), norm


# ----------------------------------------------------------------------------- AdamW


@dataclass(frozen=True)
class AdamWState:
    """AdamW optimizer state.

    ``step`` is the number of updates applied so far (optax's ``count``, torch's
    ``state["step"]``); ``mu`` and ``nu`` are the first and second moment trees, shaped and
    typed like the params.
    """

    step: int  # updates applied so far; the next update uses bias correction with step + 1
    mu: Tree  # EMA of grads, same structure as params
    nu: Tree  # EMA of squared grads, same structure as params


def adamw_init(params: Tree) -> AdamWState:
    """Fresh state: ``step = 0`` and zero moments shaped and typed like ``params``."""
    return AdamWState(
        step=0, mu=tree_map(np.zeros_like, params), nu=tree_map(np.zeros_like, params)
    )


def adamw_update(
    grads: Tree,
    state: AdamWState,
    params: Tree,
    lr: float,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
) -> tuple[Tree, AdamWState]:
    """One AdamW step (Loshchilov & Hutter: Adam with decoupled weight decay).

    With ``t = state.step + 1`` and, per leaf::

        m  = b1·m + (1 − b1)·g                 v  = b2·v + (1 − b2)·g²
        m̂  = m / (1 − b1ᵗ)                     v̂  = v / (1 − b2ᵗ)

    torch.optim.AdamW and optax.adamw write the param update two ways that are equal::

        torch:  p ← p·(1 − lr·wd) − lr·m̂/(√v̂ + ε)
        optax:  p ← p − lr·(m̂/(√v̂ + ε) + wd·p)

    (expand the optax line: ``p − lr·wd·p − lr·m̂/(√v̂+ε)``). Both decay with the param from
    *before* the step, put ε outside the square root, and correct both moments for their
    zero start. We compute the optax form, since the JAX mirror uses optax; torch agrees to
    rounding. Default ``weight_decay`` here is 0.0; torch's default is 1e-2 and optax's
    1e-4, so always pass it explicitly when comparing.

    Note on the first step: ``m̂ = g`` and ``v̂ = g²`` exactly, so every element moves by
    ``lr·g/(|g| + ε) ≈ lr·sign(g)`` (plus weight decay), whatever the scale of ``g``.

    Args:
        grads: gradient tree, same structure as ``params``.
        state: from ``adamw_init`` or the previous ``adamw_update``.
        params: current param tree.
        lr: learning rate for this update; with a schedule, ``schedule(state.step)``.
        b1, b2: moment decay rates, in ``[0, 1)``.
        eps: added to ``√v̂`` in the denominator, ``>= 0``; keeps steps finite when v̂ ≈ 0.
        weight_decay: decoupled decay coefficient ``wd``, ``>= 0`` (scaled by ``lr``).

    Returns:
        ``(new_params, new_state)`` with ``new_state.step == state.step + 1``.
    """
    _check_adamw_args(lr, b1, b2, eps, weight_decay)
    t = state.step + 1
    mu = tree_map(lambda m, g: b1 * m + (1 - b1) * g, state.mu, grads)  # EMA of g
    nu = tree_map(lambda v, g: b2 * v + (1 - b2) * g * g, state.nu, grads)  # EMA of g²
    # Bias corrections: m and v start at 0, so after t steps they are short by a factor
    # (1 − bᵗ). Python floats: computing bᵗ in a low-precision dtype could round it to 1.
    bc1 = 1 - b1**t
    bc2 = 1 - b2**t

    def step(p: np.ndarray, m: np.ndarray, v: np.ndarray) -> np.ndarray:
        m_hat = m / bc1  # unbiased first moment
        v_hat = v / bc2  # unbiased second moment
        u = m_hat / (np.sqrt(v_hat) + eps)  # Adam direction; ε outside the sqrt (torch, optax)
        return p - lr * (u + weight_decay * p)  # decoupled decay uses the pre-step p

    new_params = tree_map(step, params, mu, nu)
    return new_params, AdamWState(step=t, mu=mu, nu=nu)


def _check_adamw_args(lr: float, b1: float, b2: float, eps: float, weight_decay: float) -> None:
    # The same checks torch.optim.AdamW makes in its constructor.
    if not lr >= 0:
        raise ValueError(f"adamw_update: lr must be >= 0, got {lr!r}")
    if not 0 <= b1 < 1:
        raise ValueError(f"adamw_update: b1 must be in [0, 1), got {b1!r}")
    if not 0 <= b2 < 1:
        raise ValueError(f"adamw_update: b2 must be in [0, 1), got {b2!r}")
    if not eps >= 0:
        raise ValueError(f"adamw_update: eps must be >= 0, got {eps!r}")
    if not weight_decay >= 0:
        raise ValueError(f"adamw_update: weight_decay must be >= 0, got {weight_decay!r}")


# ----------------------------------------------------------------------------- schedule


def warmup_cosine(
    step: int,
    peak_lr: float,
    warmup_steps: int,
    total_steps: int,
    end_lr: float = 0.0,
    init_lr: float = 0.0,
) -> float:
    """Linear warmup from ``init_lr`` to ``peak_lr``, then cosine decay to ``end_lr``.

    The same numbers as ``optax.warmup_cosine_decay_schedule(init_value=init_lr,
    peak_value=peak_lr, warmup_steps=warmup_steps, decay_steps=total_steps,
    end_value=end_lr)`` at every integer step. With ``W = warmup_steps``, ``T =
    total_steps``::

        step < W:        init_lr + (peak_lr − init_lr)·step/W
        W <= step:       end_lr + (peak_lr − end_lr)·½(1 + cos(π·min(step − W, T − W)/(T − W)))

    So ``step == 0`` gives ``init_lr`` (or ``peak_lr`` when ``W == 0``), ``step == W`` gives
    ``peak_lr``, and every ``step >= T`` gives ``end_lr``. ``total_steps`` *includes* the
    warmup, and must exceed it (optax raises otherwise: the cosine part needs ``T − W > 0``).
    Pass the count of updates already applied (``AdamWState.step``); see the module doc.

    Raises:
        ValueError: naming the argument, for a negative or non-int ``step``, ``warmup_steps``
            or ``total_steps``, ``warmup_steps >= total_steps``, or a negative or non-finite
            learning rate.
    """
    for name, value in (("step", step), ("warmup_steps", warmup_steps)):
        if not _is_int(value) or value < 0:
            raise ValueError(f"warmup_cosine: {name} must be an int >= 0, got {value!r}")
    if not _is_int(total_steps) or total_steps <= warmup_steps:
        raise ValueError(
            f"warmup_cosine: total_steps must be an int > warmup_steps ({warmup_steps}), "
            f"got {total_steps!r}"
        )
    for name, lr in (("peak_lr", peak_lr), ("end_lr", end_lr), ("init_lr", init_lr)):
        if not (isinstance(lr, numbers.Real) and math.isfinite(lr) and lr >= 0):
            raise ValueError(f"warmup_cosine: {name} must be a finite number >= 0, got {lr!r}")

    if step < warmup_steps:
        # optax.linear_schedule. optax writes it (init − peak)·(1 − step/W) + peak, which is
        # the same number to an ulp; this form returns init_lr exactly at step 0.
        return float(init_lr + (peak_lr - init_lr) * step / warmup_steps)
    # optax.cosine_decay_schedule(init_value=peak_lr, decay_steps=T − W, alpha=end/peak):
    # the floor is expressed as a fraction alpha of the peak. optax sets alpha = 0 when
    # peak_lr == 0, so then the whole decay phase is 0 even if end_lr > 0; we do the same.
    decay_steps = total_steps - warmup_steps
    alpha = 0.0 if peak_lr == 0 else end_lr / peak_lr
    t = min(step - warmup_steps, decay_steps)  # hold at end_lr after total_steps
    cosine = 0.5 * (1 + math.cos(math.pi * t / decay_steps))  # 1 -> 0 over the decay phase
    return float(peak_lr * ((1 - alpha) * cosine + alpha))


def _is_int(x: object) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, bool)
