"""Loading a Hugging Face checkpoint straight into shards on a device mesh.

``load_sharded`` gives the model ``checkpoint.load_pretrained`` gives, already placed by the
logical-axis rules (``sharding.state_shardings``), without ever holding the model on the host:

* The model's structure comes from ``nnx.eval_shape`` (shapes and logical names only); no full
  model is initialised.
* Every array is assembled from per-device pieces (``jax.make_array_from_single_device_arrays``):
  each device's piece is read from the safetensors files with ``safe_open(...).get_slice``
  (a block of layers of a stacked ``[L, ...]`` array is read layer by layer into one buffer),
  copied to its device, and dropped before the next piece is read. A piece that several
  devices hold (data-parallel replicas) is read once. Files are opened for at most
  ``BAND_BYTES`` of rows at a time, so the memory-mapped pages a strided read touches never
  add up to a whole tensor.
* QLoRA from a float checkpoint quantizes one layer's projection at a time on the host with
  the spec's NumPy quantizer, a band of whole rows at a time (blocks are independent; double
  quantization needs only the blocks' absmax), and copies the NF4 fields straight into the
  host buffers of this process's pieces of the stacked state; nothing is compiled, and no
  float copy of a tensor is held. Each process reads the whole weight (the double
  quantization offset is a mean over all of its blocks). An NF4 checkpoint (ours or the one
  transformers + bitsandbytes save) is read as its stored bytes, block scales and tables.

Host memory therefore peaks at the arrays already placed plus one device's piece (plus a
file band); on an accelerator the placed arrays live in device memory. Quantizing at load
adds this process's pieces of one projection's NF4 state (at most an eighth of that
projection's float32 size) and one band of float rows, so a float checkpoint loads for QLoRA
in about the memory its NF4 checkpoint does. LoRA adapters are drawn on the host as
``ref_numpy.lora.add_lora`` draws them (same seed, same order), which keeps them equal to
``load_pretrained``'s; they are small (rank R per projection).

Every family the spec reads slices directly, GPT-2's fused ``c_attn`` included (the engine
keeps it fused, with its own logical axis), so there is no whole-tensor fallback.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import ml_dtypes  # noqa: F401  (registers bfloat16 with NumPy, so safetensors can read it)
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from safetensors import SafetensorError

from ref_numpy import nf4 as spec_nf4
from ref_numpy.config import LoraConfig, ModelConfig
from ref_numpy.formats import bnb, hf
from ref_numpy.formats.hf import CheckpointError, HFTensor
from ref_numpy.lora import LORA_LEAVES, add_lora, projections
from ref_numpy.nf4 import NESTED_BLOCKSIZE, NF4_CODE

from ..model import EngineConfig, Model
from ..nf4 import NF4State
from .sharding import RULES, Rules, state_shardings

Index = tuple[slice, ...]
Bounds = tuple[tuple[int, int], ...]  # (start, stop) of each axis of a piece
Fill = Callable[[np.ndarray, Index], None]

BAND_BYTES = 8 << 20  # rows of a file mapped at once by one read (whole rows, at least one)
# float32 rows of a weight quantized to NF4 at once (whole blocks, at least one); the
# quantizer's temporaries (padded copy, normalised values, int64 indices) are about 6x this
QUANT_BAND_BYTES = 1 << 18

# safetensors' dtype codes as NumPy names (messages name NumPy dtypes, as ``hf`` does)
_DTYPES = {
    "F64": "float64",
    "F32": "float32",
    "F16": "float16",
    "BF16": "bfloat16",
    "U8": "uint8",
    "I8": "int8",
    "U16": "uint16",
    "I16": "int16",
    "U32": "uint32",
    "I32": "int32",
    "U64": "uint64",
    "I64": "int64",
    "BOOL": "bool",
}


@dataclasses.dataclass(frozen=True)
class Entry:
    """One tensor of the checkpoint as its file header describes it (no data read)."""

    file: Path
    shape: tuple[int, ...]
    dtype: str  # NumPy name, or safetensors' code for a dtype NumPy lacks


# --- reading slices -----------------------------------------------------------------------


def scan(model_dir: Path) -> dict[str, Entry]:
    """``{tensor name: Entry}`` of every tensor of a single-file or sharded checkpoint, from
    the file headers, each file checked first (``hf.verify_file``: its header, and its tensors
    against the checksums it records). Raises CheckpointError naming the file (and tensor) for
    a tensor the index lists but its file lacks, a damaged or unreadable file."""
    files = hf.weight_files(model_dir)
    by_file: dict[Path, list[str]] = {}
    for name, file in files.items():
        by_file.setdefault(file, []).append(name)
    out: dict[str, Entry] = {}
    for file, names in by_file.items():
        hf.verify_file(file)
        with hf.open_safetensors(file) as f:
            present = set(f.keys())
            for name in names:
                if name not in present:
                    raise CheckpointError(f"{file}: tensor {name!r} listed in the index is absent")
                part = f.get_slice(name)
                code = part.get_dtype()
                out[name] = Entry(file, tuple(part.get_shape()), _DTYPES.get(code, code))
    return out


def read_slice(file: Path, name: str, index: Index) -> np.ndarray:
    """``file[name][index]`` (a tuple of unit-step slices), the file open only meanwhile."""
    with hf.open_safetensors(file) as f:
        try:
            return np.asarray(f.get_slice(name)[index])
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"{file}: tensor {name!r} cannot be read ({e})") from None


def read_into(dest: np.ndarray, entry: Entry, name: str, index: Index, via: Any = None) -> None:
    """Copy ``file[name][index]`` into ``dest`` (same shape, file layout; a transposed view is
    fine), casting to ``via`` first when given (the float loaders read through float32).

    Reads run over bands of whole rows of at most ``BAND_BYTES``, each band in a file opened
    and closed around it, so a strided (column) slice never maps a whole tensor at once.
    """
    start, stop = index[0].start, index[0].stop
    row_bytes = math.prod(entry.shape[1:]) * _itemsize(entry.dtype)
    band = max(1, BAND_BYTES // max(row_bytes, 1))
    for lo in range(start, stop, band):
        hi = min(lo + band, stop)
        piece = read_slice(entry.file, name, (slice(lo, hi), *index[1:]))
        dest[lo - start : hi - start] = piece if via is None else np.asarray(piece, via)


def _itemsize(dtype: str) -> int:
    try:
        return np.dtype(dtype).itemsize
    except TypeError:  # a dtype NumPy lacks: refused by the checks before any read
        return 1


def _bounds(index: Index, shape: tuple[int, ...]) -> Bounds:
    """``(start, stop)`` of each slice of ``index`` (a sharding's may be ``slice(None)``)."""
    return tuple(s.indices(d)[:2] for s, d in zip(index, shape, strict=True))


# --- assembling sharded arrays --------------------------------------------------------------


def assemble(shape: tuple[int, ...], dtype: Any, sharding: NamedSharding, fill: Fill) -> jax.Array:
    """A global array of ``shape`` placed by ``sharding``, built piece by piece.

    For each distinct index the sharding gives this process's devices, ``fill(buffer, index)``
    writes that piece into a fresh host buffer (shape of the piece, ``dtype``); the buffer is
    copied to every device holding that piece and dropped before the next one.
    """

    def piece(bounds: Bounds) -> np.ndarray:
        buf = np.empty(tuple(stop - start for start, stop in bounds), dtype)
        fill(buf, tuple(slice(start, stop) for start, stop in bounds))
        return buf

    return _place(shape, sharding, piece)


def _pieces(shape: tuple[int, ...], sharding: NamedSharding) -> dict[Bounds, list[jax.Device]]:
    """``{bounds of a piece: this process's devices holding it}``, each distinct piece once."""
    groups: dict[Bounds, list[jax.Device]] = {}
    for device, index in sharding.addressable_devices_indices_map(shape).items():
        assert index is not None
        groups.setdefault(_bounds(index, shape), []).append(device)
    return groups


def _place(
    shape: tuple[int, ...], sharding: NamedSharding, piece: Callable[[Bounds], np.ndarray]
) -> jax.Array:
    """The global array whose piece at each of ``_pieces``' bounds is ``piece(bounds)``, a
    host array asked for when its turn comes and dropped once copied to its devices."""
    arrays: list[jax.Array] = []
    for bounds, devices in _pieces(shape, sharding).items():
        buf = piece(bounds)
        arrays.extend(jax.device_put(buf, d) for d in devices)
        del buf
    return jax.make_array_from_single_device_arrays(shape, sharding, arrays)


def _host_fill(value: np.ndarray) -> Fill:
    def fill(buf: np.ndarray, index: Index) -> None:
        buf[...] = value[index]

    return fill


# --- the checkpoint's tensors -----------------------------------------------------------


def _table(cfg: ModelConfig) -> dict[tuple[str, ...], list[HFTensor]]:
    """``{engine variable path: its tensors}``: one per layer (in order) for a stacked
    variable (``("layers", "attn", "q_proj", "kernel")``), one for any other."""
    out: dict[tuple[str, ...], list[HFTensor]] = {}
    for t in hf.hf_tensors(cfg):
        key = ("layers", *t.path[2:]) if t.path[0] == "layers" else t.path
        out.setdefault(tuple(map(str, key)), []).append(t)
    return out


def _is_projection(t: HFTensor) -> bool:
    return t.path[0] == "layers" and t.path[-1] == "kernel"


def _weight_shape(t: HFTensor) -> tuple[int, ...]:
    """PyTorch ``(out, in)`` of a projection (GPT-2's Conv1D file holds ``(in, out)``)."""
    return t.shape if t.transpose else t.shape[::-1]


def _check_float(t: HFTensor, entry: Entry) -> None:
    """A float tensor's shape and dtype, as hf.load_model checks them."""
    if entry.shape != t.shape:
        raise CheckpointError(
            f"{entry.file}: tensor {t.name!r} has shape {list(entry.shape)}, "
            f"expected {list(t.shape)}"
        )
    if entry.dtype not in hf.FLOAT_DTYPES:
        hint = " (a quantized weight without its quant_state?)" if entry.dtype == "uint8" else ""
        raise CheckpointError(
            f"{entry.file}: tensor {t.name!r} has dtype {entry.dtype}, expected a float{hint}"
        )


def _check_meta(entries: dict[str, Entry], name: str, dtype: str, shape: tuple[int, ...]) -> None:
    e = entries[name]
    if e.dtype != dtype or e.shape != shape:
        raise CheckpointError(
            f"{e.file}: tensor {name!r} has {e.dtype} {list(e.shape)}, expected {dtype} "
            f"{list(shape)}"
        )


@dataclasses.dataclass(frozen=True)
class _NF4Source:
    """Where one stored NF4 weight's fields are, and its quant state."""

    names: dict[str, str]  # engine field -> tensor name (packed, absmax, nested_absmax, ...)
    offset: np.float32 | None  # double quantization's offset (from the quant state JSON)
    blocksize: int


def _nf4_sources(
    cfg: ModelConfig, model_dir: Path, entries: dict[str, Entry]
) -> tuple[dict[str, _NF4Source], list[tuple[Any, ...]]]:
    """Check an NF4 checkpoint as ``bnb.load_nf4_model`` does (same messages), reading only
    the quant states and code tables; give each projection's ``_NF4Source`` and the param
    paths in the order that loader fills its tree (which fixes the order of LoRA's draws)."""
    qc = bnb.quant_config_of(model_dir)
    where = model_dir / "config.json"
    assert qc is not None  # is_nf4_checkpoint said so
    for key, want in (("bnb_4bit_quant_type", bnb.QUANT_TYPE), ("bnb_4bit_quant_storage", "uint8")):
        if qc.get(key, want) != want:
            raise CheckpointError(
                f"{where}: unsupported {key}={qc[key]!r} (only {want!r} is read here)"
            )
    files = {name: e.file for name, e in entries.items()}
    owner, nf4_parts = bnb.plan(cfg, files, model_dir)
    sources: dict[str, _NF4Source] = {}
    for t in hf.hf_tensors(cfg):
        if t.name not in nf4_parts:
            if _is_projection(t):
                e = entries[t.name]
                raise CheckpointError(
                    f"{e.file}: tensor {t.name!r} is not quantized, but the other projections "
                    "are NF4; the engine holds every projection in one NF4 layout"
                )
            _check_float(t, entries[t.name])
            continue
        sources[t.name] = _nf4_source(t, nf4_parts[t.name], entries)
    settings = {(s.blocksize, s.offset is not None) for s in sources.values()}
    if len(settings) != 1:  # the engine holds one NF4 layout for every projection
        raise ValueError(
            f"{model_dir}: expected every projection in NF4 with one (blocksize, "
            f"double_quant), got {sorted(settings)}"
        )
    return sources, _nf4_order(files, owner, nf4_parts)


def _nf4_source(t: HFTensor, present: set[str], entries: dict[str, Entry]) -> _NF4Source:
    """One stored NF4 weight checked as ``bnb.nf4_from_state`` checks it."""
    name = {part: t.name + bnb.PARTS.get(part, "") for part in present}
    state_entry = entries[name["quant_state"]]
    raw = read_slice(state_entry.file, name["quant_state"], (slice(0, state_entry.shape[0]),))
    state = bnb.parse_quant_state(state_entry.file, name["quant_state"], raw)
    shape = _weight_shape(t)
    if tuple(state["shape"]) != shape:
        raise CheckpointError(
            f"{state_entry.file}: tensor {name['quant_state']!r} has shape {state['shape']}, "
            f"expected {list(shape)}"
        )
    nested = "nested_offset" in state
    for part in bnb.NESTED_PARTS:
        if (part in present) != nested:
            has = "has" if part in present else "lacks"
            raise CheckpointError(
                f"{state_entry.file}: {t.name + bnb.PARTS[part]!r}: the checkpoint {has} this "
                f"tensor but {name['quant_state']!r} says double quantization is "
                f"{'on' if nested else 'off'}"
            )
    n = math.prod(shape)
    n_blocks = -(-n // state["blocksize"])
    _check_meta(entries, name["weight"], "uint8", ((n + 1) // 2, 1))
    _check_meta(entries, name["absmax"], "uint8" if nested else "float32", (n_blocks,))
    _check_meta(entries, name["quant_map"], "float32", (16,))
    code_entry = entries[name["quant_map"]]
    code = read_slice(code_entry.file, name["quant_map"], (slice(0, 16),))
    if not np.array_equal(code.view(np.uint32), NF4_CODE.view(np.uint32)):
        raise CheckpointError(
            f"{code_entry.file}: tensor {name['quant_map']!r} is not the NF4 code table"
        )
    fields = {"packed": name["weight"], "absmax": name["absmax"]}
    if nested:
        n_nested = -(-n_blocks // NESTED_BLOCKSIZE)
        _check_meta(entries, name["nested_absmax"], "float32", (n_nested,))
        _check_meta(entries, name["nested_quant_map"], "float32", (256,))
        fields["nested_absmax"] = name["nested_absmax"]
        fields["nested_code"] = name["nested_quant_map"]
    offset = np.float32(state["nested_offset"]) if nested else None  # exact: from a float32
    return _NF4Source(fields, offset, state["blocksize"])


def _nf4_order(
    files: dict[str, Path],
    owner: dict[str, tuple[HFTensor, str]],
    nf4_parts: dict[str, set[str]],
) -> list[tuple[Any, ...]]:
    """The param paths in the order ``bnb.load_nf4_model`` sets them: file by file, a float
    tensor when read, an NF4 weight when the last of its parts is read."""
    by_file: dict[Path, list[str]] = {}
    for name, file in files.items():
        if name in owner:
            by_file.setdefault(file, []).append(name)
    order: list[tuple[Any, ...]] = []
    seen: dict[str, set[str]] = {}
    for names in by_file.values():
        for name in names:
            t, part = owner[name]
            if t.name not in nf4_parts:
                order.append(t.path)
                continue
            got = seen.setdefault(t.name, set())
            got.add(part)
            if got == nf4_parts[t.name]:
                order.append(t.path)
    return order


def _fresh_adapters(
    cfg: ModelConfig, lora: LoraConfig, order: list[tuple[Any, ...]]
) -> dict[str, dict[str, np.ndarray]]:
    """``{projection path: {lora_A, lora_B}}`` exactly as ``add_lora`` draws them on the tree
    the host loader builds: the tree's order is rebuilt from ``order`` with shape-only
    kernels, so the same seed gives the same adapter to the same projection."""
    kernel_shape = {t.path: t.shape[::-1] if t.transpose else t.shape for t in hf.hf_tensors(cfg)}
    skeleton: dict[str, Any] = {}
    for path in order:
        kernel = path[-1] == "kernel"
        leaf = jax.ShapeDtypeStruct(kernel_shape[path], np.float32) if kernel else None
        hf.set_leaf(skeleton, path, leaf)
    drawn = add_lora(skeleton, cfg, lora)
    return {
        path: {leaf: p[leaf] for leaf in LORA_LEAVES}
        for path, p in projections(drawn)
        if "lora_A" in p
    }


# --- NF4 at load --------------------------------------------------------------------------


def _quantize_weight(
    t: HFTensor, entry: Entry, blocksize: int, double_quant: bool
) -> spec_nf4.NF4Tensor:
    """The spec's ``quantize_nf4`` of the weight ``W [out, in]`` (the file tensor, or its
    transpose for GPT-2's Conv1D), the bytes bnb stores, computed a band of whole rows at a time.

    Each band holds a whole number of NF4 blocks (the last one excepted) and is quantized as
    the spec quantizes (``quantize_blockwise``, ``pack_nibbles``) into its place in the packed
    bytes and the float32 absmax; ``nf4_from_blocks`` then double-quantizes the absmax of all
    of them. Host memory: one band of float32 rows (about ``QUANT_BAND_BYTES``) and its
    temporaries, besides the result. Raises CheckpointError for NaN or Inf in the weight.
    """
    d_out, d_in = _weight_shape(t)
    n = d_out * d_in
    step = blocksize // math.gcd(d_in, blocksize)  # rows per whole number of blocks
    rows_per_band = max(step, QUANT_BAND_BYTES // (4 * d_in) // step * step)
    packed = np.empty((n + 1) // 2, np.uint8)  # [ceil(n/2)]
    absmax = np.empty(-(-n // blocksize), np.float32)  # [n_blocks]
    band = np.empty((min(rows_per_band, d_out), d_in), np.float32)
    for r0 in range(0, d_out, rows_per_band):
        r1 = min(r0 + rows_per_band, d_out)
        rows = band[: r1 - r0]  # [r, in], rows r0:r1 of W
        if t.transpose:  # the file holds W [out, in]
            read_into(rows, entry, t.name, (slice(r0, r1), slice(0, d_in)), np.float32)
        else:  # the file holds W^T [in, out]
            read_into(rows.T, entry, t.name, (slice(0, d_in), slice(r0, r1)), np.float32)
        if not np.all(np.isfinite(rows)):
            raise CheckpointError(
                f"{entry.file}: tensor {t.name!r} contains NaN or Inf (after the cast to "
                "float32); it cannot be quantized to NF4"
            )
        v0 = r0 * d_in  # the band's first value: a block boundary, and even (blocksize >= 32)
        idx, band_absmax = spec_nf4.quantize_blockwise(rows.reshape(-1), NF4_CODE, blocksize)
        codes = spec_nf4.pack_nibbles(idx)  # [r * in] -> [ceil(r * in / 2)]
        packed[v0 // 2 : v0 // 2 + codes.size] = codes
        absmax[v0 // blocksize : v0 // blocksize + band_absmax.size] = band_absmax
        del idx, codes, band_absmax
    return spec_nf4.nf4_from_blocks(packed, absmax, (d_out, d_in), blocksize, double_quant)


def _quantize_stacked(
    ts: list[HFTensor],
    entries: dict[str, Entry],
    fields: dict[str, tuple[jax.ShapeDtypeStruct, NamedSharding]],
    eng: EngineConfig,
) -> dict[str, jax.Array]:
    """The stacked NF4 state ``{field: [L, ...]}`` of one projection of every layer,
    quantized from the float checkpoint on the host, each field placed as ``fields`` says.

    Layer by layer, the weight is quantized by the spec's quantizer (``_quantize_weight``:
    the same bytes as ``hf.load_model``'s, no compiled program, no float copy of the
    tensor) and its fields are copied straight into the host buffers of this process's
    pieces of the stacked state; once every layer is in, each piece goes to its devices.
    Host memory: this process's pieces of this one projection's NF4 state, one layer's NF4
    fields and one band of float rows.
    """
    bufs = {
        name: {
            bounds: np.empty(tuple(stop - start for start, stop in bounds), a.dtype)
            for bounds in _pieces(a.shape, s)
        }
        for name, (a, s) in fields.items()
    }
    for layer, t in enumerate(ts):
        q = _quantize_weight(t, entries[t.name], eng.nf4_blocksize, eng.double_quant)
        for name, pieces in bufs.items():
            value = np.asarray(getattr(q, name))  # this layer's field: [...] or [] (offset)
            for bounds, buf in pieces.items():
                (lo, hi), rest = bounds[0], bounds[1:]
                if lo <= layer < hi:
                    buf[layer - lo] = value[tuple(slice(start, stop) for start, stop in rest)]
        del q
    return {name: _place(a.shape, s, bufs.pop(name).pop) for name, (a, s) in fields.items()}


def _stored_nf4_fill(
    ts: list[HFTensor], field: str, sources: dict[str, _NF4Source], entries: dict[str, Entry]
) -> Fill:
    """Fill pieces ``[layers, ...]`` of one field of a stored NF4 projection."""

    def fill(buf: np.ndarray, index: Index) -> None:
        layers, rest = index[0], index[1:]
        for j, layer in enumerate(range(layers.start, layers.stop)):
            src = sources[ts[layer].name]
            if field == "offset":
                buf[j] = src.offset
                continue
            name = src.names[field]
            entry = entries[name]
            dest = buf[j].reshape(-1, 1) if field == "packed" else buf[j]  # file: [n/2, 1]
            where = (*rest, slice(0, 1)) if field == "packed" else rest
            read_into(dest, entry, name, where)

    return fill


# --- float tensors ----------------------------------------------------------------------


def _float_fill(ts: list[HFTensor], stacked: bool, entries: dict[str, Entry]) -> Fill:
    """Fill pieces of a float variable from its tensors: file dtype -> float32 (as the host
    loaders read) -> the variable's dtype, transposing PyTorch ``[out, in]`` to ``[in, out]``."""

    def one(dest: np.ndarray, t: HFTensor, index: Index) -> None:
        if t.transpose:
            dest, index = dest.T, index[::-1]
        read_into(dest, entries[t.name], t.name, index, np.float32)

    def fill(buf: np.ndarray, index: Index) -> None:
        if not stacked:
            one(buf, ts[0], index)
            return
        for j, layer in enumerate(range(index[0].start, index[0].stop)):
            one(buf[j], ts[layer], index[1:])

    return fill


# --- the loader ---------------------------------------------------------------------------


def load_sharded(
    model_dir: str | os.PathLike[str],
    lora: LoraConfig | None,
    eng: EngineConfig,
    mesh: Mesh,
    rules: Rules = RULES,
) -> tuple[ModelConfig, Model]:
    """An engine model from a Hugging Face directory, each array placed on ``mesh`` by
    ``rules`` as it is read: equal, leaf for leaf and bit for bit, to ``load_pretrained``
    followed by ``sharding.shard_state``, without a host copy of the model.

    A float checkpoint is quantized to NF4 at load when ``eng.quantize`` (QLoRA); an NF4
    checkpoint (bitsandbytes layout) loads its stored state, with ``eng.quantize``,
    ``nf4_blocksize`` and ``double_quant`` taken from it. With ``lora``, fresh adapters are
    drawn as ``ref_numpy.lora.add_lora`` draws them (``lora.seed``).

    Args:
      model_dir: config.json and ``model.safetensors`` or sharded files with
        ``model.safetensors.index.json``.
      lora: adapter config, or None (full fine-tuning).
      eng: dtypes and NF4 settings.
      mesh: the device mesh (``sharding.make_mesh``); in a multi-process run each process
        reads the pieces of its own devices.
      rules: logical-axis rules (``sharding.RULES``).
    Returns:
      ``(cfg, model)``; every array of ``nnx.state(model)`` carries the ``NamedSharding``
      ``state_shardings`` gives it.
    Raises:
      CheckpointError naming the file and tensor for a missing, unexpected, mis-shaped or
      mis-typed tensor, an unreadable file, a quant state that does not parse or disagrees
      with its tensors, or a float weight with NaN / Inf that is to be quantized; ValueError
      for a LoRA config that does not fit the model.
    """
    model_dir = Path(model_dir)
    cfg = hf.load_config(model_dir)
    entries = scan(model_dir)
    sources: dict[str, _NF4Source] = {}
    if bnb.is_nf4_checkpoint(model_dir):
        sources, order = _nf4_sources(cfg, model_dir, entries)
        first = next(iter(sources.values()))
        eng = dataclasses.replace(
            eng,
            quantize=True,
            nf4_blocksize=first.blocksize,
            double_quant=first.offset is not None,
        )
    else:
        expected = hf.hf_tensors(cfg)
        hf.check_tensor_names(model_dir, [t.name for t in expected], entries)
        for t in expected:
            _check_float(t, entries[t.name])
        order = [t.path for t in expected]
    adapters = {} if lora is None else _fresh_adapters(cfg, lora, order)

    abstract = nnx.eval_shape(lambda: Model(cfg, lora, eng, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    placed = dict(nnx.to_flat_state(state_shardings(state, mesh, rules)))
    table = _table(cfg)
    variables = list(nnx.to_flat_state(state))
    quantized: dict[tuple[str, ...], dict[str, jax.Array]] = {}
    flat = []
    for path, var in variables:
        key = tuple(map(str, path))
        a, sharding = var.get_value(), placed[path].get_value()
        stacked = key[0] == "layers"
        if key[-1] in LORA_LEAVES:
            value = _lora_value(key, a, cfg, adapters)
            array = assemble(a.shape, a.dtype, sharding, _host_fill(value))
        elif isinstance(var, NF4State):
            ts = table[key[:-1]]
            if sources:
                fill = _stored_nf4_fill(ts, key[-1], sources, entries)
                array = assemble(a.shape, a.dtype, sharding, fill)
            else:
                if key[:-1] not in quantized:
                    fields = {
                        str(p[-1]): (v.get_value(), placed[p].get_value())
                        for p, v in variables
                        if tuple(map(str, p[:-1])) == key[:-1]
                    }
                    quantized[key[:-1]] = _quantize_stacked(ts, entries, fields, eng)
                array = quantized[key[:-1]].pop(key[-1])
        else:
            ts = table[key]
            _check_engine_shape(key, a.shape, ts, stacked)
            array = assemble(a.shape, a.dtype, sharding, _float_fill(ts, stacked, entries))
        flat.append((path, var.replace(array)))
    return cfg, nnx.merge(graphdef, nnx.from_flat_state(flat))


def _lora_value(
    key: tuple[str, ...],
    a: jax.ShapeDtypeStruct,
    cfg: ModelConfig,
    adapters: dict[str, dict[str, np.ndarray]],
) -> np.ndarray:
    """The stacked adapter ``[L, ...]`` as ``model.from_spec`` builds it: the drawn adapter
    of each layer that has one, zeros elsewhere, cast from float64 as ``jnp.asarray`` casts."""
    _, group, name, leaf = key
    want = a.shape[1:]
    rows = []
    for i in range(cfg.n_layers):
        drawn = adapters.get(f"layers.{i}.{group}.{name}")
        rows.append(np.zeros(want) if drawn is None else drawn[leaf])
        if np.shape(rows[-1]) != want:
            raise ValueError(
                f"layers.{i}.{group}.{name}.{leaf}: expected shape {list(want)}, "
                f"got {list(np.shape(rows[-1]))}"
            )
    return np.asarray(np.stack(rows), a.dtype)


def _check_engine_shape(
    key: tuple[str, ...], shape: tuple[int, ...], ts: list[HFTensor], stacked: bool
) -> None:
    """The engine's variable holds exactly its tensors (one per layer when stacked)."""
    t = ts[0]
    want = (len(ts), *t.shape[::-1]) if t.transpose else (len(ts), *t.shape)
    if (want if stacked else want[1:]) != tuple(shape):
        raise ValueError(
            f"{'.'.join(key)}: the engine holds shape {list(shape)}, but {t.name!r} and its "
            f"kin give {list(want if stacked else want[1:])}"
        )
