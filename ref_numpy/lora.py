"""LoRA with PEFT semantics, and the linear layer every projection of the model goes through.

A projection is a dict ``{"kernel": [I, O], "bias"?: [O], "lora_A"?: [I, R], "lora_B"?: [R, O]}``
and computes ::

    y = x @ W + b + scale * (dropout(x) @ A) @ B        scale = alpha / R  (rsLoRA: alpha / sqrt(R))

``W`` may also be an ``NF4Tensor`` (QLoRA): it is dequantized to the compute dtype on every
call and never receives a gradient. Adapters live in the same dict as the weight they adapt,
so wrapping a layer leaves the base weight's path unchanged; whether a leaf trains is a
matter of its name (``lora_A`` / ``lora_B``), which is how the optimizer is told.

Initialisation follows PEFT: ``B = 0`` (so a fresh adapter changes nothing) and ``A`` from
kaiming-uniform with ``a = sqrt(5)`` on PEFT's ``[R, I]`` weight, i.e. ``U(-1/sqrt(I), 1/sqrt(I))``.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Iterator
from typing import Any

import numpy as np

from .config import ALL_LINEAR, LoraConfig, ModelConfig
from .layers import Cache, check_shape, linear_backward, linear_forward
from .nf4 import NF4Tensor, dequantize_kernel

Params = dict[str, Any]
LORA_LEAVES = ("lora_A", "lora_B")


# --- the projection -------------------------------------------------------------------


def dense_forward(
    x: np.ndarray, p: Params, scale: float = 0.0, dropout_mask: np.ndarray | None = None
) -> tuple[np.ndarray, Cache]:
    """A linear projection with an optional LoRA adapter and an optional NF4 base.

    Args:
      x: [..., I].
      p: the projection's dict (see module docstring).
      scale: the LoRA scale; unused without an adapter.
      dropout_mask: [..., I] of 0 and 1/(1-p) (inverted dropout) applied to the adapter's
        input only, or None for no dropout. Explicit so the computation is deterministic.
    Returns:
      [..., O] and the cache.
    """
    kernel = p["kernel"]
    quantized = isinstance(kernel, NF4Tensor)
    if quantized:
        kernel = dequantize_kernel(kernel).astype(x.dtype)  # NF4 -> [I,O] in compute dtype
    y, lin_cache = linear_forward(x, kernel, p.get("bias"))  # [...,I] -> [...,O]
    if "lora_A" not in p:
        return y, (lin_cache, quantized, None)
    a, b = p["lora_A"], p["lora_B"]  # [I,R], [R,O]
    xd = x
    if dropout_mask is not None:
        check_shape("dropout_mask", dropout_mask, x.shape)
        xd = x * dropout_mask  # [...,I]
    h = xd @ a  # [...,I] @ [I,R] -> [...,R]
    y = y + scale * (h @ b)  # [...,R] @ [R,O] -> [...,O]
    return y, (lin_cache, quantized, (xd, h, a, b, dropout_mask, scale))


def dense_backward(
    dout: np.ndarray, cache: Cache, train_base: bool
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Returns ``(dx, grads)``; ``grads`` names only what trains.

    With an adapter, only ``lora_A`` and ``lora_B`` train. Without one, ``kernel`` and ``bias``
    train when ``train_base`` (full fine-tuning) and the kernel is not NF4; nothing does
    otherwise.
    """
    lin_cache, quantized, lora_cache = cache
    frozen = lora_cache is not None or quantized or not train_base
    dx, dkernel, dbias = linear_backward(dout, lin_cache, weight_grads=not frozen)
    grads: dict[str, np.ndarray] = {}
    if dkernel is not None:
        grads["kernel"] = dkernel
    if dbias is not None:
        grads["bias"] = dbias
    if lora_cache is None:
        return dx, grads
    xd, h, a, b, mask, scale = lora_cache
    dh = scale * (dout @ b.T)  # [...,O] @ [O,R] -> [...,R]
    grads["lora_B"] = scale * _flat(h).T @ _flat(dout)  # [R,M] @ [M,O] -> [R,O]
    grads["lora_A"] = _flat(xd).T @ _flat(dh)  # [I,M] @ [M,R] -> [I,R]
    dxd = dh @ a.T  # [...,R] @ [R,I] -> [...,I]
    return dx + (dxd if mask is None else dxd * mask), grads


def _flat(x: np.ndarray) -> np.ndarray:
    return x.reshape(-1, x.shape[-1])  # [...,C] -> [M,C]


# --- choosing, creating and folding adapters ------------------------------------------


def projections(params: Params) -> Iterator[tuple[str, Params]]:
    """Every projection of a model's param tree as ``(path, dict)``; path like
    ``layers.3.attn.q_proj`` (the name LoRA targets match is the last component). Qwen3's
    ``q_norm`` / ``k_norm`` live in ``attn`` too but are not projections (no kernel)."""
    for i, layer in enumerate(params["layers"]):
        for group in ("attn", "mlp"):
            for name, p in layer[group].items():
                if "kernel" in p:
                    yield f"layers.{i}.{group}.{name}", p


def matches_target(path: str, targets: tuple[str, ...]) -> bool:
    """Whether a projection path (``layers.3.attn.q_proj``) is selected by LoRA targets."""
    # A target is a module name (``q_proj``), a regular expression over the whole path, or
    # PEFT's all-linear (every projection; the output head is not one).
    name = path.rsplit(".", 1)[-1]
    return any(t in (name, ALL_LINEAR) or re.fullmatch(t, path) for t in targets)


def selects(path: str, lora: LoraConfig) -> bool:
    """Whether ``lora`` adapts the projection ``path`` (``layers.3.attn.q_proj``): a target
    names or matches it, and its layer is in ``lora.layers_to_transform`` when that is set."""
    layers = lora.layers_to_transform
    if layers is not None and int(path.split(".")[1]) not in layers:
        return False
    return matches_target(path, lora.targets)


def selected_paths(paths: list[str], cfg: ModelConfig, lora: LoraConfig) -> list[str]:
    """The projection paths of ``paths`` (every projection of ``cfg``) that ``lora`` adapts.

    Raises ValueError for a target that matches no projection (listing the available names),
    a layer of ``layers_to_transform`` the model does not have, and a selection that is empty.
    """
    for t in lora.targets:
        if not any(matches_target(path, (t,)) for path in paths):
            names = sorted({path.rsplit(".", 1)[-1] for path in paths})
            raise ValueError(
                f"LoraConfig.targets: {t!r} matches no module of this {cfg.family} model; "
                f"available: {names}, {ALL_LINEAR}, or a regular expression over paths like "
                f"{paths[0]}"
            )
    layers = lora.layers_to_transform
    if layers is not None and layers[-1] >= cfg.n_layers:
        raise ValueError(
            f"LoraConfig.layers_to_transform: layer {layers[-1]} does not exist in this "
            f"{cfg.n_layers}-layer model (expected indices in [0, {cfg.n_layers}))"
        )
    out = [path for path in paths if selects(path, lora)]
    if not out:  # every target matches somewhere, so only layers_to_transform can empty it
        raise ValueError(
            f"LoraConfig.layers_to_transform: layers {list(layers or ())} hold none of the "
            f"projections targets={list(lora.targets)} select"
        )
    return out


def lora_a_bound(d_in: int) -> float:
    """The range of ``lora_A``'s uniform init: PEFT's kaiming-uniform with ``a = sqrt(5)`` over
    fan-in I, ``gain * sqrt(3 / I)`` with ``gain = sqrt(2 / (1 + a^2))``, which is ``1/sqrt(I)``."""
    return 1.0 / float(np.sqrt(d_in))


def add_lora(
    params: Params, cfg: ModelConfig, lora: LoraConfig, rng: np.random.Generator | None = None
) -> Params:
    """A copy of ``params`` with a fresh adapter on every projection ``lora`` selects.

    ``lora.targets`` holds module names as the checkpoint spells them (``q_proj``,
    ``c_attn``, ...) or regular expressions over paths (``layers\\.0\\.attn\\..*``);
    ``lora.layers_to_transform`` narrows them to some layers. Raises ValueError for a target
    that matches nothing (listing the available names), a layer the model lacks, and a rank
    outside ``1..min(I, O)``.
    """
    rng = np.random.default_rng(lora.seed) if rng is None else rng
    out = copy.deepcopy(params)
    chosen = set(selected_paths([path for path, _ in projections(out)], cfg, lora))
    for path, p in projections(out):
        if path not in chosen:
            continue
        d_in, d_out = _kernel_shape(p["kernel"])
        if lora.rank > min(d_in, d_out):
            raise ValueError(
                f"LoraConfig.rank: {lora.rank} exceeds min(in, out) = {min(d_in, d_out)} "
                f"of {path} ([{d_in}, {d_out}])"
            )
        bound = lora_a_bound(d_in)
        p["lora_A"] = rng.uniform(-bound, bound, size=(d_in, lora.rank))  # [I,R]
        p["lora_B"] = np.zeros((lora.rank, d_out))  # [R,O]
    return out


def _kernel_shape(kernel: np.ndarray | NF4Tensor) -> tuple[int, int]:
    if isinstance(kernel, NF4Tensor):
        d_out, d_in = kernel.shape  # NF4 holds the PyTorch [out, in] layout
        return d_in, d_out
    d_in, d_out = kernel.shape
    return d_in, d_out


def has_lora(params: Params) -> bool:
    """True when any projection carries an adapter (the base is then frozen)."""
    return any("lora_A" in p for _, p in projections(params))


def split_lora(params: Params) -> tuple[Params, dict[str, dict[str, np.ndarray]]]:
    """``(base, adapters)``: the tree without adapter leaves, and ``{path: {lora_A, lora_B}}``."""
    base = copy.deepcopy(params)
    adapters = {}
    for path, p in projections(base):
        if "lora_A" in p:
            adapters[path] = {k: p.pop(k) for k in LORA_LEAVES}
    return base, adapters


def join_lora(base: Params, adapters: dict[str, dict[str, np.ndarray]]) -> Params:
    """The inverse of ``split_lora``; shapes are checked against the base."""
    out = copy.deepcopy(base)
    found = dict(projections(out))
    for path, ad in adapters.items():
        if path not in found:
            raise ValueError(f"adapter {path}: no such module in the base model")
        d_in, d_out = _kernel_shape(found[path]["kernel"])
        r = ad["lora_A"].shape[-1]
        check_shape(f"{path}.lora_A", ad["lora_A"], (d_in, r))
        check_shape(f"{path}.lora_B", ad["lora_B"], (r, d_out))
        found[path].update(ad)
    return out


def merge_lora(params: Params, scale: float) -> Params:
    """Fold every adapter into its kernel: ``W + scale * A @ B``; adapters are removed.

    An NF4 kernel is dequantized first (the merged model is a float model).
    """
    base, adapters = split_lora(params)
    found = dict(projections(base))
    for path, ad in adapters.items():
        p = found[path]
        kernel = p["kernel"]
        if isinstance(kernel, NF4Tensor):
            kernel = dequantize_kernel(kernel).astype(ad["lora_A"].dtype)
        p["kernel"] = kernel + scale * (ad["lora_A"] @ ad["lora_B"])  # [I,R] @ [R,O] -> [I,O]
    return base


def unmerge_lora(
    merged: Params, adapters: dict[str, dict[str, np.ndarray]], scale: float
) -> Params:
    """The inverse of ``merge_lora`` for float kernels: ``W - scale * A @ B``, adapters back."""
    out = join_lora(merged, adapters)
    for _, p in projections(out):
        if "lora_A" in p:
            p["kernel"] = p["kernel"] - scale * (p["lora_A"] @ p["lora_B"])  # [I,O]
    return out


def dropout_mask(keep: np.ndarray, rate: float) -> np.ndarray:
    """Inverted dropout: kept inputs are scaled by ``1/(1-rate)``, dropped ones are 0.

    The scaling keeps each input's expectation unchanged (``E[mask] = 1``), so nothing needs
    rescaling when dropout is switched off for evaluation.

    Args:
      keep: boolean [..., I], True where the input is kept (probability ``1 - rate``).
      rate: the dropout probability in [0, 1).
    Returns:
      float64 [..., I] of 0 and ``1/(1-rate)``.
    """
    return keep.astype(np.float64) / (1.0 - rate)  # [...,I]


def dropout_masks(
    params: Params, rate: float, x_shape: tuple[int, ...], rng: np.random.Generator
) -> dict[str, np.ndarray]:
    """Inverted-dropout masks for every adapter input: ``{path: [B, T, I]}`` of 0 and
    ``1/(1-rate)``. ``x_shape`` is ``(B, T)``; the model looks masks up by projection path."""
    masks = {}
    for path, p in projections(params):
        if "lora_A" in p:
            d_in = p["lora_A"].shape[0]
            keep = rng.random((*x_shape, d_in)) >= rate  # [B,T,I]
            masks[path] = dropout_mask(keep, rate)  # [B,T,I]
    return masks
