"""NF4 checkpoints in the layout transformers + bitsandbytes save for a 4-bit model.

``BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", ...)`` followed by
``save_pretrained`` (transformers 5.24, bitsandbytes 0.50) writes every ``nn.Linear`` inside the
decoder blocks as a ``bnb.nn.Linear4bit`` (GPT-2's ``Conv1D`` too, transposed to ``[out, in]``
first); the embeddings, norms, biases and ``lm_head`` keep the model dtype. One quantized weight
``<module>.weight`` becomes these safetensors entries (``n = out * in`` values, blocks of 64)::

    <module>.weight                                   uint8   [ceil(n/2), 1]  packed NF4 indices
    <module>.weight.absmax                            float32 [n_blocks]      (no double quant)
                                                      uint8   [n_blocks]      (double quant)
    <module>.weight.quant_map                         float32 [16]            NF4_CODE
    <module>.weight.nested_absmax                     float32 [ceil(n_blocks/256)]   double quant
    <module>.weight.nested_quant_map                  float32 [256]           DYNAMIC_MAP, d. q.
    <module>.weight.quant_state.bitsandbytes__nf4     uint8   [len(json)]     UTF-8 JSON, below

The last entry is bnb's ``QuantState.as_dict(packed=True)``: ``json.dumps`` (default separators)
of the non-tensor fields, in this order::

    {"quant_type": "nf4", "blocksize": 64, "dtype": "float32", "shape": [out, in],
     "nested_blocksize": 256, "nested_dtype": "float32", "nested_offset": 0.0514...}

``dtype`` is the dtype the weight had before quantization (the model dtype), the three nested
fields appear only with double quantization, and ``nested_offset`` is the float32 offset written
as Python's shortest repr of that float. ``config.json`` gains the ``quantization_config`` block
that transformers writes (``quantization_config`` below).

Reading takes such a checkpoint, ours or transformers', into the spec's param tree with
``NF4Tensor`` kernels (held in the PyTorch ``[out, in]`` order, see ``nf4.py``); everything that
is not a quantized projection is read as ``hf.load_model`` reads it.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import numpy as np

from ..config import ModelConfig
from ..lora import projections
from ..nf4 import (
    BLOCKSIZES,
    DEFAULT_BLOCKSIZE,
    NESTED_BLOCKSIZE,
    NF4_CODE,
    NF4Tensor,
    quantize_kernel,
)
from . import files, hf, tensorfile
from .hf import CheckpointError, HFTensor, Params

ComputeDtype = Literal["float32", "float16", "bfloat16"]
MODEL_DTYPES = ("float32", "float16", "bfloat16")  # dtypes bnb records in a QuantState
QUANT_TYPE = "nf4"
QUANT_STATE_KEY = "quant_state.bitsandbytes__"  # + quant_type: the packed-JSON tensor
# Suffixes after "<module>.weight" of the tensors that carry one quantized weight's state.
PARTS = {
    "absmax": ".absmax",
    "quant_map": ".quant_map",
    "nested_absmax": ".nested_absmax",
    "nested_quant_map": ".nested_quant_map",
    "quant_state": "." + QUANT_STATE_KEY + QUANT_TYPE,
}
NESTED_PARTS = ("nested_absmax", "nested_quant_map")
# Keys of the packed JSON, in the order bnb writes them; the last three only with double quant.
STATE_KEYS = ("quant_type", "blocksize", "dtype", "shape")
NESTED_STATE_KEYS = ("nested_blocksize", "nested_dtype", "nested_offset")


# --- config.json ----------------------------------------------------------------------


def quantization_config(double_quant: bool, compute_dtype: ComputeDtype) -> dict[str, Any]:
    """The ``quantization_config`` block transformers 5 writes for a bnb NF4 model."""
    _check_choice("compute_dtype", compute_dtype, MODEL_DTYPES)
    return {
        "_load_in_4bit": True,
        "_load_in_8bit": False,
        "bnb_4bit_compute_dtype": compute_dtype,
        "bnb_4bit_quant_storage": "uint8",
        "bnb_4bit_quant_type": QUANT_TYPE,
        "bnb_4bit_use_double_quant": bool(double_quant),
        "llm_int8_enable_fp32_cpu_offload": False,
        "llm_int8_has_fp16_weight": False,
        "llm_int8_skip_modules": None,
        "llm_int8_threshold": 6.0,
        "load_in_4bit": True,
        "load_in_8bit": False,
        "quant_method": "bitsandbytes",
    }


def quant_config_of(model_dir: Path) -> dict[str, Any] | None:
    """The bnb 4-bit ``quantization_config`` of ``model_dir/config.json``, or None."""
    try:
        hf = json.loads((model_dir / "config.json").read_text())
    except (OSError, json.JSONDecodeError):
        return None
    qc = hf.get("quantization_config") if isinstance(hf, dict) else None
    if not isinstance(qc, dict) or qc.get("quant_method") != "bitsandbytes":
        return None
    return qc if qc.get("load_in_4bit") or qc.get("_load_in_4bit") else None


def is_nf4_checkpoint(model_dir: str | os.PathLike[str]) -> bool:
    """Whether ``model_dir/config.json`` carries a bitsandbytes 4-bit ``quantization_config``.

    Any 4-bit quant type answers True (fp4 too), so that ``load_nf4_model`` is the one to refuse
    what it cannot read, with a message that says why. No or unreadable config.json: False.
    """
    return quant_config_of(Path(model_dir)) is not None


# --- one quantized weight -------------------------------------------------------------


def quant_state_json(q: NF4Tensor, dtype: str = "float32") -> bytes:
    """bnb's packed quant state of ``q``: ``json.dumps`` of its non-tensor fields, UTF-8.

    Args:
      q: the quantized weight. dtype: the weight's dtype before quantization (model dtype).
    """
    state: dict[str, Any] = {
        "quant_type": QUANT_TYPE,
        "blocksize": q.blocksize,
        "dtype": dtype,
        "shape": list(q.shape),
    }
    if q.double_quant:
        assert q.offset is not None
        state["nested_blocksize"] = q.nested_blocksize
        state["nested_dtype"] = "float32"
        state["nested_offset"] = float(q.offset)  # exact: a float32 widened; repr is shortest
    return json.dumps(state).encode("utf-8")


def nf4_state(weight_name: str, q: NF4Tensor, dtype: str = "float32") -> dict[str, np.ndarray]:
    """The safetensors entries bnb's ``Linear4bit`` saves for ``q`` under ``weight_name``.

    Args:
      weight_name: ``<module>.weight``. q: the weight, ``[out, in]``. dtype: model dtype.
    Returns:
      ``{name: array}`` with the names, dtypes and shapes of the module docstring.
    """
    out = {
        weight_name: q.packed.reshape(-1, 1),  # [ceil(n/2)] -> [ceil(n/2), 1], as Params4bit
        weight_name + PARTS["absmax"]: q.absmax,
        weight_name + PARTS["quant_map"]: np.array(NF4_CODE),
    }
    if q.double_quant:
        assert q.nested_absmax is not None and q.nested_code is not None
        out[weight_name + PARTS["nested_absmax"]] = q.nested_absmax
        out[weight_name + PARTS["nested_quant_map"]] = np.array(q.nested_code)
    state = np.frombuffer(quant_state_json(q, dtype), dtype=np.uint8)  # [len(json)]
    out[weight_name + PARTS["quant_state"]] = state.copy()
    return out


def _fail(file: Path, name: str, what: str) -> CheckpointError:
    return CheckpointError(f"{file}: tensor {name!r} {what}")


def _check_tensor(file: Path, name: str, a: np.ndarray, dtype: str, shape: tuple[int, ...]) -> None:
    if a.dtype.name != dtype or tuple(a.shape) != shape:
        raise _fail(file, name, f"has {a.dtype} {list(a.shape)}, expected {dtype} {list(shape)}")


def parse_quant_state(file: Path, name: str, raw: np.ndarray) -> dict[str, Any]:
    """Decode and check the packed JSON of one weight (``name`` is the JSON tensor's name).

    Raises CheckpointError naming file and tensor: not uint8 JSON, unknown or missing keys, a
    quant type other than nf4, a blocksize bnb does not use, a dtype that is not a float.
    """
    if raw.dtype != np.uint8 or raw.ndim != 1:
        raise _fail(file, name, f"has {raw.dtype} {list(raw.shape)}, expected uint8 [bytes]")
    try:
        state = json.loads(raw.tobytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise _fail(file, name, f"is not UTF-8 JSON ({e})") from None
    if not isinstance(state, dict):
        raise _fail(file, name, f"holds {type(state).__name__} JSON, expected an object")
    nested = "nested_offset" in state
    keys = STATE_KEYS + (NESTED_STATE_KEYS if nested else ())
    if set(state) != set(keys):
        raise _fail(file, name, f"has keys {sorted(state)}, expected {sorted(keys)}")
    if state["quant_type"] != QUANT_TYPE:
        raise _fail(file, name, f"has quant_type {state['quant_type']!r}; only 'nf4' is read here")
    if type(state["blocksize"]) is not int or state["blocksize"] not in BLOCKSIZES:
        raise _fail(
            file, name, f"has blocksize {state['blocksize']!r}, expected one of {BLOCKSIZES}"
        )
    if state["dtype"] not in MODEL_DTYPES:
        raise _fail(file, name, f"has dtype {state['dtype']!r}, expected one of {MODEL_DTYPES}")
    shape = state["shape"]
    if not (isinstance(shape, list) and all(type(d) is int and d > 0 for d in shape)):
        raise _fail(file, name, f"has shape {shape!r}, expected a list of positive ints")
    if nested:
        if state["nested_blocksize"] != NESTED_BLOCKSIZE or state["nested_dtype"] != "float32":
            raise _fail(
                file,
                name,
                f"has nested_blocksize {state['nested_blocksize']!r} and nested_dtype "
                f"{state['nested_dtype']!r}, expected {NESTED_BLOCKSIZE} and 'float32'",
            )
        offset = state["nested_offset"]
        if not isinstance(offset, (int, float)) or isinstance(offset, bool):
            raise _fail(file, name, f"has nested_offset {offset!r}, expected a number")
        if not math.isfinite(offset):
            raise _fail(file, name, f"has nested_offset {offset!r}, expected a finite number")
    return state


def nf4_from_state(
    weight_name: str,
    parts: dict[str, tuple[Path, np.ndarray]],
    shape: tuple[int, ...],
) -> NF4Tensor:
    """Rebuild one quantized weight from its safetensors entries.

    Args:
      weight_name: ``<module>.weight``.
      parts: ``{"weight" | part of PARTS: (file, array)}`` as read; the nested parts present
        exactly when the JSON says double quantization.
      shape: the expected PyTorch shape ``(out, in)``.
    Returns:
      The NF4Tensor, its arrays bnb's bytes as stored.
    Raises:
      CheckpointError naming file and tensor for any mismatch with the module docstring.
    """
    file, raw = parts["quant_state"]
    state_name = weight_name + PARTS["quant_state"]
    state = parse_quant_state(file, state_name, raw)
    if tuple(state["shape"]) != shape:
        raise _fail(file, state_name, f"has shape {state['shape']}, expected {list(shape)}")
    nested = "nested_offset" in state
    for part in NESTED_PARTS:
        if (part in parts) != nested:
            has = "has" if part in parts else "lacks"
            raise CheckpointError(
                f"{file}: {weight_name + PARTS[part]!r}: the checkpoint {has} this tensor but "
                f"{state_name!r} says double quantization is {'on' if nested else 'off'}"
            )
    n = math.prod(shape)
    n_blocks = -(-n // state["blocksize"])
    file, packed = parts["weight"]
    _check_tensor(file, weight_name, packed, "uint8", ((n + 1) // 2, 1))
    file, absmax = parts["absmax"]
    _check_tensor(
        file, weight_name + PARTS["absmax"], absmax, "uint8" if nested else "float32", (n_blocks,)
    )
    file, code = parts["quant_map"]
    _check_tensor(file, weight_name + PARTS["quant_map"], code, "float32", (16,))
    if not np.array_equal(code.view(np.uint32), NF4_CODE.view(np.uint32)):
        raise _fail(file, weight_name + PARTS["quant_map"], "is not the NF4 code table")
    nested_fields: dict[str, Any] = {}
    if nested:
        file, nested_absmax = parts["nested_absmax"]
        n_nested = -(-n_blocks // NESTED_BLOCKSIZE)
        _check_tensor(
            file, weight_name + PARTS["nested_absmax"], nested_absmax, "float32", (n_nested,)
        )
        file, nested_code = parts["nested_quant_map"]
        _check_tensor(file, weight_name + PARTS["nested_quant_map"], nested_code, "float32", (256,))
        nested_fields = {
            "nested_absmax": np.ascontiguousarray(nested_absmax),
            "nested_code": np.ascontiguousarray(nested_code),
            "offset": np.float32(state["nested_offset"]),  # exact: written from a float32
            "nested_blocksize": NESTED_BLOCKSIZE,
        }
    try:
        return NF4Tensor(
            packed=np.ascontiguousarray(packed.reshape(-1)),  # [ceil(n/2), 1] -> [ceil(n/2)]
            absmax=np.ascontiguousarray(absmax),
            shape=shape,
            blocksize=state["blocksize"],
            **nested_fields,
        )
    except ValueError as e:  # unreachable after the checks above; kept so errors name a file
        raise _fail(file, weight_name, f"is not a valid NF4 weight ({e})") from None


# --- writing --------------------------------------------------------------------------


def _check_choice(name: str, value: object, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name}: expected one of {list(choices)}, got {value!r}")


def _weight_shape(t: HFTensor) -> tuple[int, ...]:
    """PyTorch ``(out, in)`` of a kernel entry (GPT-2's Conv1D file shape is ``(in, out)``)."""
    return t.shape if t.transpose else t.shape[::-1]


def _is_projection(t: HFTensor) -> bool:
    """Whether ``t`` is a projection kernel inside a block: what transformers quantizes."""
    return t.path[0] == "layers" and t.path[-1] == "kernel"


def _nf4_entries(
    params: Params, cfg: ModelConfig, blocksize: int, double_quant: bool, dtype: Any
) -> dict[str, np.ndarray]:
    """Every safetensors entry of the NF4 checkpoint of ``params``."""
    dtype_name = np.dtype(dtype).name
    _check_choice("dtype", dtype_name, MODEL_DTYPES)
    for path, p in projections(params):
        if "lora_A" in p or "lora_B" in p:
            raise ValueError(
                f"{path}: carries a LoRA adapter; save the adapter separately (PEFT) and pass "
                "the base params (an NF4 kernel cannot absorb a merge)"
            )
    state: dict[str, np.ndarray] = {}
    for t in hf.hf_tensors(cfg):
        value = hf.get_leaf(params, t.path)
        if not _is_projection(t):  # as hf.hf_state writes it
            if isinstance(value, NF4Tensor):
                raise ValueError(f"{t.name}: NF4 outside the blocks; transformers keeps it float")
            state[t.name] = np.ascontiguousarray((value.T if t.transpose else value).astype(dtype))
            continue
        if isinstance(value, NF4Tensor):
            q = value
            if q.shape != _weight_shape(t) or q.double_quant != double_quant:
                raise ValueError(
                    f"{t.name}: NF4 kernel of shape {q.shape} with double_quant="
                    f"{q.double_quant}, expected shape {_weight_shape(t)} with double_quant="
                    f"{double_quant} (config.json records one double_quant for all)"
                )
        else:
            try:
                q = quantize_kernel(value, blocksize, double_quant)  # [in, out] -> W [out, in]
            except ValueError as e:
                raise ValueError(f"{t.name}: {e}") from None
        state.update(nf4_state(t.name, q, dtype_name))
    return state


def _write_nf4(
    tmp: Path,
    params: Params,
    cfg: ModelConfig,
    blocksize: int,
    double_quant: bool,
    compute_dtype: ComputeDtype,
    dtype: Any,
) -> None:
    state = _nf4_entries(params, cfg, blocksize, double_quant, dtype)
    config = {
        **hf.config_to_hf(cfg),
        "torch_dtype": np.dtype(dtype).name,  # as hf.save_model; transformers 5 reads it too
        "quantization_config": quantization_config(double_quant, compute_dtype),
    }
    tensorfile.save(state, tmp / "model.safetensors", metadata={"format": "pt"})
    files.write_json(tmp / "config.json", config)


def save_nf4_model(
    params: Params,
    cfg: ModelConfig,
    out_dir: str | os.PathLike[str],
    *,
    blocksize: int = DEFAULT_BLOCKSIZE,
    double_quant: bool = True,
    compute_dtype: ComputeDtype = "float32",
    dtype: Any = np.float32,
    tokenizer_from: str | os.PathLike[str] | None = None,
    overwrite: bool = False,
) -> Path:
    """Write ``params`` as the NF4 checkpoint transformers + bitsandbytes save.

    Every projection kernel inside the blocks is quantized with ``nf4.quantize_kernel`` (one
    that is already an NF4Tensor is written as it is); embeddings, norms, biases and lm_head
    are written in ``dtype`` as ``hf.hf_state`` writes them. Atomic (``files.atomic_dir``).

    Args:
      params: the base model's param tree (no LoRA adapters).
      cfg: its config.
      out_dir: the directory to create.
      blocksize, double_quant: NF4 settings (transformers always uses blocksize 64).
      compute_dtype: ``bnb_4bit_compute_dtype`` recorded in config.json.
      dtype: float32, float16 or bfloat16: the non-quantized tensors, and the ``dtype`` field
        of each quant state (bnb's dequantization output dtype).
      tokenizer_from: a directory whose tokenizer files are copied along.
      overwrite: replace an existing ``out_dir``.
    Returns:
      ``Path(out_dir)``.
    Raises:
      FileExistsError: ``out_dir`` exists and not ``overwrite``.
      ValueError: a bad setting, a LoRA adapter, an NF4 kernel that disagrees with the
        settings, or a kernel that cannot be quantized (NaN / Inf); nothing is written.
    """
    with files.atomic_dir(out_dir, overwrite) as tmp:
        _write_nf4(tmp, params, cfg, blocksize, double_quant, compute_dtype, dtype)
        if tokenizer_from is not None:
            hf.copy_tokenizer(Path(tokenizer_from), tmp)
    return Path(out_dir)


def _source_dtype(model_dir: Path) -> Any:
    """The dtype transformers' ``dtype="auto"`` picks: config.json's, else float32."""
    hf = json.loads((model_dir / "config.json").read_text())
    name = hf.get("dtype") or hf.get("torch_dtype")
    return np.dtype(name) if name in MODEL_DTYPES else np.dtype(np.float32)


def quantize_model(
    model_dir: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    blocksize: int = DEFAULT_BLOCKSIZE,
    double_quant: bool = True,
    compute_dtype: ComputeDtype = "float32",
    dtype: Any = None,
    overwrite: bool = False,
) -> Path:
    """Quantize the float checkpoint ``model_dir`` to NF4 into ``out_dir`` (tokenizer copied).

    Kernels are quantized as they are read (``hf.load_model``), so the float model is never
    held whole. The result equals what ``from_pretrained(model_dir, quantization_config=
    BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", ...))`` followed by
    ``save_pretrained`` writes, up to bnb's float32 mean in the double-quant offset.

    Args:
      dtype: of the non-quantized tensors; None takes config.json's ``dtype`` / ``torch_dtype``
        (float32 if absent or not a half / single float), as transformers' ``dtype="auto"``.
      Others: see ``save_nf4_model``.
    Raises:
      FileExistsError before any reading if ``out_dir`` exists and not ``overwrite``;
      CheckpointError for an unreadable source (see ``hf.load_model``).
    """
    src = Path(model_dir)
    with files.atomic_dir(out_dir, overwrite) as tmp:
        cfg, params = hf.load_model(
            src,
            dtype=np.float32,  # exact for float16 / bfloat16 sources, written back in ``dtype``
            quantize=lambda path: path[0] == "layers",  # block projections; lm_head stays
            blocksize=blocksize,
            double_quant=double_quant,
        )
        out_dtype = _source_dtype(src) if dtype is None else dtype
        _write_nf4(tmp, params, cfg, blocksize, double_quant, compute_dtype, out_dtype)
        hf.copy_tokenizer(src, tmp)
    return Path(out_dir)


# --- reading --------------------------------------------------------------------------


def plan(
    cfg: ModelConfig, files: dict[str, Path], model_dir: Path
) -> tuple[dict[str, tuple[HFTensor, str]], dict[str, set[str]]]:
    """Map each file tensor to ``(its param entry, part)``; list each NF4 weight's parts.

    A projection counts as quantized when its quant-state tensor is present (transformers may
    skip modules; those stay float). Raises CheckpointError for a quant type other than nf4,
    a missing part, a missing or unexpected tensor.
    """
    owner: dict[str, tuple[HFTensor, str]] = {}
    nf4_parts: dict[str, set[str]] = {}
    for t in hf.hf_tensors(cfg):
        owner[t.name] = (t, "weight")
        if not _is_projection(t):
            continue
        states = sorted(n for n in files if n.startswith(f"{t.name}.{QUANT_STATE_KEY}"))
        if not states:
            continue
        if states != [t.name + PARTS["quant_state"]]:
            raise CheckpointError(
                f"{files[states[0]]}: tensor {states[0]!r}: only quant_type 'nf4' "
                f"({QUANT_STATE_KEY}{QUANT_TYPE}) is read here"
            )
        present = {"weight"} | {p for p, s in PARTS.items() if t.name + s in files}
        for part in ("weight", "absmax", "quant_map"):
            if part not in present:
                name = t.name + PARTS.get(part, "")
                raise CheckpointError(f"{model_dir}: missing tensor {name!r} of an NF4 weight")
        nf4_parts[t.name] = present
        for part in present - {"weight"}:
            owner[t.name + PARTS[part]] = (t, part)
    hf.check_tensor_names(model_dir, owner, files)
    return owner, nf4_parts


def _float_value(t: HFTensor, file: Path, array: np.ndarray, dtype: Any) -> np.ndarray:
    """A non-quantized tensor checked and placed as ``hf.load_model`` does."""
    if tuple(array.shape) != t.shape:
        raise _fail(file, t.name, f"has shape {list(array.shape)}, expected {list(t.shape)}")
    if array.dtype.name not in hf.FLOAT_DTYPES:
        hint = " (a quantized weight without its quant_state?)" if array.dtype == np.uint8 else ""
        raise _fail(file, t.name, f"has dtype {array.dtype}, expected a float{hint}")
    return np.ascontiguousarray(array.T if t.transpose else array, dtype=dtype)


def _iter_values(
    cfg: ModelConfig, model_dir: Path, dtype: Any
) -> Iterator[tuple[tuple[Any, ...], Any]]:
    """``(param path, value)`` of each entry, NF4 weights once all their parts are read."""
    files = hf.weight_files(model_dir)
    owner, nf4_parts = plan(cfg, files, model_dir)
    pending: dict[str, dict[str, tuple[Path, np.ndarray]]] = {}
    wanted = {n: f for n, f in files.items() if n in owner}
    for name, array in hf.iter_tensors(wanted):
        t, part = owner[name]
        if t.name not in nf4_parts:
            yield t.path, _float_value(t, files[name], array, dtype)
            continue
        parts = pending.setdefault(t.name, {})
        parts[part] = (files[name], array)
        if set(parts) == nf4_parts[t.name]:
            yield t.path, nf4_from_state(t.name, pending.pop(t.name), _weight_shape(t))


def load_nf4_model(
    model_dir: str | os.PathLike[str], dtype: Any = np.float32
) -> tuple[ModelConfig, Params]:
    """Read a bnb NF4 checkpoint (ours or transformers') into the spec's param tree.

    Quantized projections become ``NF4Tensor`` kernels (``[out, in]`` order, bnb's bytes as
    stored); projections a checkpoint left float, and all other tensors, are read as
    ``hf.load_model`` reads them, in ``dtype``.

    Args:
      model_dir: a directory with config.json (with a bnb 4-bit quantization_config) and
        safetensors weights, single-file or sharded.
      dtype: NumPy dtype of the float arrays.
    Returns:
      ``(cfg, params)``.
    Raises:
      CheckpointError naming the file (and tensor): no bnb 4-bit quantization_config, a quant
        type other than nf4, a storage other than uint8, a missing / unexpected / mis-shaped /
        mis-typed tensor, a quant state that does not parse or disagrees with its tensors.
    """
    model_dir = Path(model_dir)
    cfg = hf.load_config(model_dir)
    qc = quant_config_of(model_dir)
    where = model_dir / "config.json"
    if qc is None:
        raise CheckpointError(
            f"{where}: no bitsandbytes 4-bit quantization_config (a float checkpoint? read it "
            "with hf.load_model)"
        )
    if qc.get("bnb_4bit_quant_type", QUANT_TYPE) != QUANT_TYPE:
        raise CheckpointError(
            f"{where}: unsupported bnb_4bit_quant_type={qc['bnb_4bit_quant_type']!r} "
            "(only 'nf4' is read here)"
        )
    if qc.get("bnb_4bit_quant_storage", "uint8") != "uint8":
        raise CheckpointError(
            f"{where}: unsupported bnb_4bit_quant_storage={qc['bnb_4bit_quant_storage']!r} "
            "(only 'uint8' is read here)"
        )
    params: Params = {}
    for path, value in _iter_values(cfg, model_dir, dtype):
        hf.set_leaf(params, path, value)
    return cfg, params
