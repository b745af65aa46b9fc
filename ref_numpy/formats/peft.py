"""PEFT LoRA adapters: ``adapter_config.json`` + ``adapter_model.safetensors``, in and out.

An adapter directory, as PEFT's ``save_pretrained`` writes it (checked against PEFT 0.21)::

    adapter_config.json          peft_type "LORA", r, lora_alpha, target_modules, ...
    adapter_model.safetensors    base_model.model.<module>.lora_A.weight   [R, in]
                                 base_model.model.<module>.lora_B.weight   [out, R]

``<module>`` is the checkpoint name of the adapted projection (``hf.module_name``), e.g.
``model.layers.0.self_attn.q_proj`` or GPT-2's ``transformer.h.0.attn.c_attn``. PEFT's own
adapter name (``default``) is *not* in the file: PEFT strips it on save and inserts it on
load. The two matrices are ``nn.Linear`` weights, PyTorch ``[out, in]``, so they are the
transposes of our ``lora_A [in, R]`` and ``lora_B [R, out]``.

GPT-2's projections are ``Conv1D`` layers whose base weight is stored ``[in, out]``; PEFT
marks that with ``fan_in_fan_out: true``, which only changes how PEFT reads the *base*
weight when merging. The LoRA matrices keep the ``[R, in]`` / ``[out, R]`` layout above for
GPT-2 too, and ``c_attn``'s adapter is one ``[3*N*H, R]`` ``lora_B`` over the fused q, k, v
output (no per-head or per-q/k/v split).

``target_modules`` decides which modules PEFT wraps when it loads an adapter: a list entry
selects a module whose name equals it or ends with ``"." + entry``; a string is a regular
expression that must match the whole name. ``layers_to_transform`` narrows a list's suffix
matches to some layer indices (read from the module name, ``layers.<i>.`` / ``h.<i>.``, or
after ``layers_pattern``). We write the sorted short names (``["q_proj", "v_proj"]``), with
``layers_to_transform`` when only some layers are adapted, when they select exactly the
adapted projections, else the full module names.

Reading refuses every option that changes what the adapter computes beyond
``y = x @ W + b + scale * x @ A @ B`` (DoRA, per-module ranks, extra trained modules, ...),
rather than silently computing something else. ``adapter_model.bin`` (a pickle) is never
read. Writing is atomic (``files.atomic_dir``).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
from safetensors import SafetensorError, safe_open

from ..config import LoraConfig, ModelConfig, attn_shapes, mlp_shapes
from ..lora import join_lora, merge_lora, projections, selects
from . import hf, tensorfile
from .files import atomic_dir, check_output_dir, write_json
from .hf import CheckpointError, load_model, module_name, save_model

Params = dict[str, Any]
Adapters = dict[str, dict[str, np.ndarray]]  # {path: {"lora_A": [I,R], "lora_B": [R,O]}}

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PICKLE_FILE = "adapter_model.bin"  # PEFT's older torch.save format: never unpickled here
PREFIX = "base_model.model."  # PeftModel.base_model (LoraModel) .model (the transformers model)
FLOAT_DTYPES = ("float32", "float16", "bfloat16", "float64")
_NAME = re.compile(r"base_model\.model\.(?P<module>.+)\.(?P<leaf>lora_A|lora_B)\.weight")
_NAME_WITH_ADAPTER = re.compile(r"base_model\.model\..+\.lora_[AB]\.(?P<adapter>[^.]+)\.weight")

# adapter_config.json fields that, when set (truthy), change what PEFT computes in ways the
# spec does not implement. Each is refused with the reason.
REFUSED_OPTIONS = {
    "use_dora": "DoRA (weight-decomposed LoRA) is not implemented",
    "modules_to_save": "fully trained copies of extra modules are not read",
    "rank_pattern": "per-module ranks are not implemented",
    "alpha_pattern": "per-module alphas are not implemented",
    "layer_replication": "layer replication is not implemented",
    "target_parameters": "adapters on bare parameters are not implemented",
    "trainable_token_indices": "trainable token embeddings are not read",
    "lora_bias": "a bias on lora_B is not implemented",
    "use_qalora": "QALoRA is not implemented",
    "alora_invocation_tokens": "activated LoRA is not implemented",
    "megatron_config": "Megatron parallel layers are not implemented",
    "use_bdlora": "block-diagonal LoRA is not implemented",
    "arrow_config": "Arrow routing is not implemented",
    "kasa_config": "KaSA is not implemented",
    "monteclora_config": "MonteCLoRA is not implemented",
    "velora_config": "VeLoRA is not implemented",
}
# init_lora_weights values that only decide a fresh adapter's initial A and B (overwritten by
# the file). The others (pissa, olora, corda, loftq, eva, lora_ga, mica, ...) also rewrite the
# base weights or switch to a LoRA variant.
PLAIN_INITS: tuple[Any, ...] = (True, False, "gaussian", "orthogonal")
TASK_TYPES = (None, "CAUSAL_LM")


class AdapterError(CheckpointError):
    """An adapter directory that cannot be read for this base; the message names the file."""


# --- names and shapes -----------------------------------------------------------------


def projection_shapes(cfg: ModelConfig) -> dict[str, tuple[int, int]]:
    """``{path: (in, out)}`` for every projection of ``cfg``, in layer order, e.g.
    ``"layers.0.attn.q_proj": (D, N*H)``; the same paths as ``lora.projections``."""
    out: dict[str, tuple[int, int]] = {}
    for i in range(cfg.n_layers):
        for group, shapes in (("attn", attn_shapes(cfg)), ("mlp", mlp_shapes(cfg))):
            for name, shape in shapes.items():
                out[f"layers.{i}.{group}.{name}"] = shape
    return out


def tensor_name(cfg: ModelConfig, path: str, leaf: str) -> str:
    """The adapter file's name for ``leaf`` (``lora_A`` / ``lora_B``) of projection ``path``:
    ``layers.0.attn.q_proj``, ``lora_A`` ->
    ``base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight``."""
    return f"{PREFIX}{module_name(cfg, path)}.{leaf}.weight"


def peft_selects(
    module: str,
    target_modules: str | Iterable[str],
    exclude: Any = None,
    layers: int | Iterable[int] | None = None,
    layers_pattern: str | Iterable[str] | None = None,
) -> bool:
    """Whether PEFT wraps the module named ``module`` (``model.layers.0.self_attn.q_proj``)
    given ``target_modules``, ``exclude_modules``, ``layers_to_transform`` and
    ``layers_pattern`` (PEFT's ``check_target_module_exists``).

    A list entry selects a module whose name equals it or ends with ``"." + entry``; a string
    is a regex over the whole name. ``layers`` narrows the entries that match by suffix to
    the listed layer indices, read from the first ``<pattern>.<digits>.`` of the name (any
    ``.<word>.<digits>.`` without a pattern); a module whose name holds none is not wrapped.
    """

    def hit(spec: Any) -> bool:
        if isinstance(spec, str):
            return re.fullmatch(spec, module) is not None  # a string is a whole-name regex
        return any(module == key or module.endswith(f".{key}") for key in spec)

    if exclude and hit(exclude):
        return False
    if isinstance(target_modules, str) or module in target_modules:
        return hit(target_modules)
    if not hit(target_modules):
        return False
    wanted = [layers] if isinstance(layers, int) else list(layers or [])
    if not wanted:  # None or [] selects every layer
        return True
    if not layers_pattern:
        m = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", module)  # the first numbered segment
    else:
        patterns = [layers_pattern] if isinstance(layers_pattern, str) else list(layers_pattern)
        for pattern in patterns:
            m = re.match(rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\.", module)
            if m is not None:
                break
    return m is not None and int(m["idx"]) in wanted


def target_modules_for(
    cfg: ModelConfig, paths: Iterable[str]
) -> tuple[list[str], list[int] | None]:
    """``(target_modules, layers_to_transform)`` that make PEFT wrap exactly the projections
    ``paths``: the sorted short names (``["q_proj", "v_proj"]``), with the sorted layer
    indices when the adapter covers only some layers, if PEFT reads them as exactly these;
    else the sorted full module names (``["transformer.h.0.attn.c_proj", ...]``) and None."""
    adapted = set(paths)
    short = _short_names_if_exact(cfg, adapted)
    if short is not None:
        names, layers = short
        every = projection_shapes(cfg)
        chosen = {p for p in every if peft_selects(module_name(cfg, p), names, None, layers)}
        if chosen == adapted:
            return names, layers
    return sorted(module_name(cfg, p) for p in adapted), None


def _short_names_if_exact(
    cfg: ModelConfig, adapted: set[str]
) -> tuple[list[str], list[int] | None] | None:
    """``(names, layers)``: the sorted last path components of ``adapted`` and, unless it
    covers every layer, the sorted layer indices, if these select exactly ``adapted`` among
    all projections of ``cfg`` (GPT-2's ``c_proj`` is in attn *and* mlp); else None."""
    names = sorted({p.rsplit(".", 1)[-1] for p in adapted})
    layers = sorted({int(p.split(".")[1]) for p in adapted})
    chosen = {
        p
        for p in projection_shapes(cfg)
        if p.rsplit(".", 1)[-1] in names and int(p.split(".")[1]) in layers
    }
    if chosen != adapted:
        return None
    return names, None if len(layers) == cfg.n_layers else layers


# --- writing --------------------------------------------------------------------------


def adapter_config(
    cfg: ModelConfig, lora: LoraConfig, paths: Iterable[str], base_model_name_or_path: str
) -> dict[str, Any]:
    """The ``adapter_config.json`` fields for an adapter on ``paths``.

    These are the fields PEFT 0.21 writes that bear on what the adapter computes; PEFT fills
    the rest (arrow_config, eva_config, ...) with its defaults, which are "off".
    """
    alpha: float | int = int(lora.alpha) if float(lora.alpha).is_integer() else lora.alpha
    target_modules, layers = target_modules_for(cfg, paths)
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path,
        "revision": None,
        "inference_mode": True,
        "r": lora.rank,
        "lora_alpha": alpha,
        "lora_dropout": lora.dropout,
        "use_rslora": lora.use_rslora,
        "target_modules": target_modules,
        "exclude_modules": None,
        # GPT-2's Conv1D stores the base weight [in, out]; PEFT would set this itself (with a
        # warning) if it were wrong. The LoRA matrices are [R, in] / [out, R] either way.
        "fan_in_fan_out": cfg.family == "gpt2",
        "bias": "none",
        "lora_bias": False,
        "use_dora": False,
        "init_lora_weights": True,
        "modules_to_save": None,
        "layers_to_transform": layers,
        "layers_pattern": None,
        "rank_pattern": {},
        "alpha_pattern": {},
        "layer_replication": None,
    }


def adapter_state(
    params: Params, cfg: ModelConfig, lora: LoraConfig, dtype: Any = np.float32
) -> dict[str, np.ndarray]:
    """``{tensor name: array}`` in PEFT's layout: ``lora_A.weight [R, in]`` = our ``lora_A.T``,
    ``lora_B.weight [out, R]`` = our ``lora_B.T``.

    Raises ValueError when ``params`` carry no adapter, when an adapter's shape disagrees with
    ``cfg`` and ``lora.rank``, or when the adapted projections are not exactly those
    ``lora.targets`` and ``lora.layers_to_transform`` select (the message names the path).
    """
    shapes = projection_shapes(cfg)
    found = dict(projections(params))
    if set(found) != set(shapes):
        raise ValueError(
            f"params: projections {sorted(set(found) ^ set(shapes))[:5]} do not match "
            f"this {cfg.family} config"
        )
    if not any("lora_A" in p for p in found.values()):
        raise ValueError("params: no projection carries a LoRA adapter (lora_A / lora_B)")
    state: dict[str, np.ndarray] = {}
    choice = f"LoraConfig.targets={list(lora.targets)}"
    if lora.layers_to_transform is not None:
        choice += f" with layers_to_transform={list(lora.layers_to_transform)}"
    for path, (d_in, d_out) in shapes.items():
        p = found[path]
        selected = selects(path, lora)
        if "lora_A" in p and not selected:
            raise ValueError(f"{path}: carries an adapter that {choice} skips")
        if selected and "lora_A" not in p:
            raise ValueError(f"{path}: {choice} selects it; it has no adapter")
        if not selected:
            continue
        if "lora_B" not in p:
            raise ValueError(f"{path}: has lora_A but no lora_B")
        a, b = p["lora_A"], p["lora_B"]  # [I,R], [R,O]
        for leaf, got, want in (
            ("lora_A", a, (d_in, lora.rank)),
            ("lora_B", b, (lora.rank, d_out)),
        ):
            if tuple(got.shape) != want:
                raise ValueError(
                    f"{path}.{leaf}: shape {list(got.shape)}, expected {list(want)} "
                    f"(LoraConfig.rank={lora.rank})"
                )
        state[tensor_name(cfg, path, "lora_A")] = np.ascontiguousarray(a.T, dtype=dtype)  # [R,I]
        state[tensor_name(cfg, path, "lora_B")] = np.ascontiguousarray(b.T, dtype=dtype)  # [O,R]
    return state


def save_adapter(
    params: Params,
    cfg: ModelConfig,
    lora: LoraConfig,
    out_dir: str | os.PathLike[str],
    *,
    base_model_name_or_path: str,
    dtype: Any = np.float32,
    overwrite: bool = False,
) -> Path:
    """Write the adapters of ``params`` as a PEFT LoRA adapter directory.

    Args:
      params: a param tree whose targeted projections carry ``lora_A [I, R]`` and
        ``lora_B [R, O]`` (from ``lora.add_lora`` and training); base weights are not written.
      cfg: the base model's config (decides the module names).
      lora: the adapter's settings; ``targets`` must select exactly the adapted projections.
      out_dir: the directory to create.
      base_model_name_or_path: recorded in adapter_config.json (a hub id or a local path).
      dtype: dtype of the written tensors (PEFT keeps adapters in float32).
      overwrite: replace an existing ``out_dir``; otherwise FileExistsError.
    Returns:
      ``out_dir`` as a Path. Nothing is written when a check fails.
    """
    state = adapter_state(params, cfg, lora, dtype)
    paths = [p for p in projection_shapes(cfg) if tensor_name(cfg, p, "lora_A") in state]
    config = adapter_config(cfg, lora, paths, base_model_name_or_path)
    with atomic_dir(out_dir, overwrite) as tmp:
        tensorfile.save(state, tmp / WEIGHTS_FILE, metadata={"format": "pt"})
        write_json(tmp / CONFIG_FILE, config)
    return Path(out_dir)


# --- reading --------------------------------------------------------------------------


def read_adapter_config(adapter_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """The parsed ``adapter_config.json`` of ``adapter_dir`` (AdapterError if unreadable)."""
    path = Path(adapter_dir) / CONFIG_FILE
    try:
        hf = json.loads(path.read_text())
    except FileNotFoundError:
        raise AdapterError(
            f"{path}: no such file (is {adapter_dir} a PEFT adapter directory?)"
        ) from None
    except json.JSONDecodeError as e:
        raise AdapterError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None
    if not isinstance(hf, dict):
        raise AdapterError(f"{path}: expected a JSON object, got {type(hf).__name__}")
    return hf


def lora_settings(hf: dict[str, Any], where: str) -> tuple[int, float, float, bool]:
    """``(r, alpha, dropout, use_rslora)`` from adapter_config.json fields, after refusing
    every option the spec does not implement (the message names ``where`` and the field)."""
    if hf.get("peft_type") != "LORA":
        raise AdapterError(f"{where}: peft_type={hf.get('peft_type')!r}, expected 'LORA'")
    if hf.get("task_type") not in TASK_TYPES:
        raise AdapterError(
            f"{where}: unsupported task_type={hf['task_type']!r} (expected 'CAUSAL_LM' or null)"
        )
    for key, why in REFUSED_OPTIONS.items():
        if hf.get(key):
            raise AdapterError(f"{where}: unsupported {key}={hf[key]!r} ({why})")
    if hf.get("bias", "none") != "none":
        raise AdapterError(
            f"{where}: unsupported bias={hf['bias']!r} (trained base biases are not read; "
            "expected 'none')"
        )
    init = hf.get("init_lora_weights", True)
    if init not in PLAIN_INITS:
        raise AdapterError(
            f"{where}: unsupported init_lora_weights={init!r} (it rewrites the base weights "
            f"or selects a LoRA variant; expected one of {list(PLAIN_INITS)})"
        )
    r, alpha = (_positive(hf, key, where) for key in ("r", "lora_alpha"))
    if not r.is_integer():
        raise AdapterError(f"{where}: r={hf['r']!r}, expected an integer")
    dropout = hf.get("lora_dropout") or 0.0
    return int(r), alpha, float(dropout), bool(hf.get("use_rslora"))


def _positive(hf: dict[str, Any], key: str, where: str) -> float:
    v = hf.get(key)
    if not isinstance(v, (int, float)) or isinstance(v, bool) or not v > 0:
        raise AdapterError(f"{where}: {key}={v!r}, expected a positive number")
    return float(v)


def _selection(hf: dict[str, Any], cfg: ModelConfig, where: str) -> set[str]:
    """Our projection paths PEFT wraps under ``target_modules``, ``exclude_modules``,
    ``layers_to_transform`` and ``layers_pattern``."""
    targets = hf.get("target_modules")
    names_ok = isinstance(targets, list) and all(isinstance(t, str) for t in targets)
    if not targets or not (isinstance(targets, str) or names_ok):
        raise AdapterError(
            f"{where}: target_modules={targets!r}, expected a list of module names or a regex"
        )
    layers, pattern = hf.get("layers_to_transform"), hf.get("layers_pattern")
    if not (_is_int(layers) or layers is None or _all(layers, _is_int)):
        raise AdapterError(
            f"{where}: layers_to_transform={layers!r}, expected a layer index, a list of them "
            "or null"
        )
    if not (pattern is None or isinstance(pattern, str) or _all(pattern, _is_str)):
        raise AdapterError(
            f"{where}: layers_pattern={pattern!r}, expected a name, a list of names or null"
        )
    for key, value in (("layers_to_transform", layers), ("layers_pattern", pattern)):
        if isinstance(targets, str) and value is not None:  # PEFT's LoraConfig refuses it too
            raise AdapterError(
                f"{where}: {key}={value!r} with a regex target_modules={targets!r} (PEFT "
                "allows layer selection only with a list of module names)"
            )
    if pattern and layers is None:
        raise AdapterError(
            f"{where}: layers_pattern={pattern!r} without layers_to_transform (PEFT needs both)"
        )
    paths = projection_shapes(cfg)
    if isinstance(targets, str) and targets.lower() == "all-linear":
        return set(paths)  # every linear layer but the output layer: all projections here
    exclude = hf.get("exclude_modules")
    return {
        p for p in paths if peft_selects(module_name(cfg, p), targets, exclude, layers, pattern)
    }


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_str(v: Any) -> bool:
    return isinstance(v, str)


def _all(v: Any, test: Any) -> bool:
    """Whether ``v`` is a JSON list whose every item passes ``test``."""
    return isinstance(v, list) and all(test(x) for x in v)


def _weights_path(adapter_dir: Path) -> Path:
    path = adapter_dir / WEIGHTS_FILE
    if path.exists():
        return path
    if (adapter_dir / PICKLE_FILE).exists():
        raise AdapterError(
            f"{adapter_dir / PICKLE_FILE}: .bin (pickled PyTorch) adapters are not read, since "
            f"unpickling can run code; save it with safe_serialization=True to get {WEIGHTS_FILE}"
        )
    raise AdapterError(f"{path}: no such file")


def _read_tensors(path: Path) -> dict[str, np.ndarray]:
    """Every tensor of a (small) safetensors file, each checked against the checksum the file
    records for it (``tensorfile``; PEFT's files carry none)."""
    try:
        with safe_open(str(path), framework="numpy") as f:
            sums = tensorfile.checksums(f.metadata(), path)
            tensors = {name: f.get_tensor(name) for name in f.keys()}
        for name, array in tensors.items():
            tensorfile.check_array(path, name, array, sums.get(name))
        return tensors
    except tensorfile.TensorFileError as e:
        raise AdapterError(str(e)) from None
    except (SafetensorError, OSError) as e:
        raise AdapterError(str(hf.unreadable(path, e))) from None


def _parse_name(
    name: str, by_module: dict[str, str], cfg: ModelConfig, where: Path
) -> tuple[str, str]:
    """``base_model.model.<module>.lora_A.weight`` -> ``(our path, "lora_A")``."""
    m = _NAME.fullmatch(name)
    if m is None:
        adapter = _NAME_WITH_ADAPTER.fullmatch(name)
        if adapter is not None:
            raise AdapterError(
                f"{where}: tensor {name!r} carries the adapter name {adapter['adapter']!r}; "
                "PEFT's save_pretrained writes names without it (...lora_A.weight)"
            )
        raise AdapterError(
            f"{where}: tensor {name!r} is not a LoRA weight (expected "
            f"{PREFIX}<module>.lora_A.weight and .lora_B.weight)"
        )
    module = m["module"]
    if module not in by_module:
        raise AdapterError(
            f"{where}: adapter for a different base: {name} (this {cfg.family} model has no "
            f"projection named {module!r})"
        )
    return by_module[module], m["leaf"]


def load_adapter(
    adapter_dir: str | os.PathLike[str], cfg: ModelConfig, *, dtype: Any = np.float32
) -> tuple[LoraConfig, Adapters]:
    """Read a PEFT LoRA adapter directory for the base model ``cfg``.

    Args:
      adapter_dir: a directory with adapter_config.json and adapter_model.safetensors.
      cfg: the base model's config; every tensor must name one of its projections with the
        matching shape.
      dtype: dtype of the returned arrays.
    Returns:
      ``(lora, adapters)``: the settings (``lora.scale`` is the factor for ``model_forward``
      and ``merge_lora``; ``targets`` and ``layers_to_transform`` select exactly the adapted
      projections: short names, with the layers when only some are adapted, where they can,
      else escaped full paths) and
      ``{path: {"lora_A": [I, R], "lora_B": [R, O]}}`` in layer order, for ``lora.join_lora``.
    Raises:
      AdapterError (a ValueError): an unsupported option, a tensor of another base (unknown
        module, wrong shape), an incomplete A/B pair, a module ``target_modules`` selects with
        no tensors, a non-float tensor, only a pickled ``adapter_model.bin``; the message names
        the file and the field or tensor.
    """
    adapter_dir = Path(adapter_dir)
    hf = read_adapter_config(adapter_dir)
    where = str(adapter_dir / CONFIG_FILE)
    r, alpha, dropout, use_rslora = lora_settings(hf, where)
    selected = _selection(hf, cfg, where)
    shapes = projection_shapes(cfg)
    by_module = {module_name(cfg, p): p for p in shapes}
    choice = f"target_modules={hf['target_modules']!r}"
    if hf.get("layers_to_transform") is not None:
        choice += f" with layers_to_transform={hf['layers_to_transform']!r}"
    file = _weights_path(adapter_dir)
    found: dict[str, dict[str, np.ndarray]] = {}
    for name, array in _read_tensors(file).items():
        path, leaf = _parse_name(name, by_module, cfg, file)
        if path not in selected:
            raise AdapterError(
                f"{file}: tensor {name!r} is for a module that {choice} does not select "
                "(PEFT would not load it)"
            )
        d_in, d_out = shapes[path]
        want = (r, d_in) if leaf == "lora_A" else (d_out, r)  # PyTorch [out, in] layout
        if tuple(array.shape) != want:
            raise AdapterError(
                f"{file}: adapter for a different base: tensor {name!r} has shape "
                f"{list(array.shape)}, expected {list(want)} (r={r}, {path} is [{d_in}, {d_out}])"
            )
        if array.dtype.name not in FLOAT_DTYPES:
            raise AdapterError(f"{file}: tensor {name!r} has dtype {array.dtype}, expected a float")
        found.setdefault(path, {})[leaf] = np.ascontiguousarray(array.T, dtype=dtype)  # [I,R]/[R,O]
    if not found:
        raise AdapterError(f"{file}: holds no LoRA tensors")
    for path in shapes:
        if path in found:
            for leaf in ("lora_A", "lora_B"):
                if leaf not in found[path]:
                    raise AdapterError(f"{file}: missing tensor {tensor_name(cfg, path, leaf)!r}")
        elif path in selected:
            raise AdapterError(
                f"{file}: missing tensors {tensor_name(cfg, path, 'lora_A')!r} and lora_B "
                f"({choice} selects {module_name(cfg, path)})"
            )
    adapters = {p: found[p] for p in shapes if p in found}  # layer order
    short = _short_names_if_exact(cfg, set(adapters))
    targets = tuple(short[0]) if short is not None else tuple(re.escape(p) for p in adapters)
    layers = tuple(short[1]) if short is not None and short[1] is not None else None
    try:
        lora = LoraConfig(
            rank=r,
            alpha=alpha,
            dropout=dropout,
            targets=targets,
            use_rslora=use_rslora,
            layers_to_transform=layers,
        )
    except ValueError as e:  # e.g. lora_dropout outside [0, 1)
        raise AdapterError(f"{where}: {e}") from None
    return lora, adapters


# --- merging --------------------------------------------------------------------------


def merge_adapter(
    model_dir: str | os.PathLike[str],
    adapter_dir: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    dtype: Any = np.float32,
    overwrite: bool = False,
) -> Path:
    """Fold a PEFT LoRA adapter into its base checkpoint: ``W + scale * A @ B`` for every
    adapted projection, written as a plain Hugging Face checkpoint (+ the base's tokenizer).

    The merge is computed in float64 and written in ``dtype``. ``out_dir`` may be neither
    ``model_dir`` nor ``adapter_dir``. Raises FileExistsError for an existing ``out_dir``
    without ``overwrite`` and NotADirectoryError for one that is a file (before anything is
    read), CheckpointError / AdapterError for an
    unreadable base or adapter. Atomic: nothing is written on failure.
    """
    out = Path(out_dir)
    check_output_dir(out)
    for name, src in (("model_dir", model_dir), ("adapter_dir", adapter_dir)):
        if out.resolve() == Path(src).resolve():
            raise ValueError(f"out_dir: {out} is the {name}; write the merged model elsewhere")
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out}: exists (pass overwrite / --overwrite to replace it)")
    cfg, base = load_model(model_dir, dtype=np.float64)
    lora, adapters = load_adapter(adapter_dir, cfg, dtype=np.float64)
    merged = merge_lora(join_lora(base, adapters), lora.scale)  # W + scale * A @ B, [I,O]
    return save_model(merged, cfg, out, dtype=dtype, tokenizer_from=model_dir, overwrite=overwrite)


__all__ = [
    "AdapterError",
    "adapter_config",
    "adapter_state",
    "load_adapter",
    "merge_adapter",
    "peft_selects",
    "projection_shapes",
    "read_adapter_config",
    "save_adapter",
    "target_modules_for",
    "tensor_name",
]
