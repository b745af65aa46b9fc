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
* QLoRA from a float checkpoint quantizes one layer's projection at a time under ``jit``: the
  float weight arrives split over the devices the NF4 bytes are split over, XLA computes the
  cross-shard mean of the absmax that double quantization needs, and the result is written
  into its row of the stacked NF4 state, which stays sharded. An NF4 checkpoint (ours or the
  one transformers + bitsandbytes save) is read as its stored bytes, block scales and tables.

Host memory therefore peaks at the arrays already placed plus one device's piece (plus a
file band); on an accelerator the placed arrays live in device memory. Quantizing at load
adds one layer's float32 weight of one projection, split over the devices, and XLA's
compiled quantize programs (one per distinct weight size; on CPU with 8 simulated devices
they and their runtime buffers cost a few hundred MB of host memory). LoRA adapters are
drawn on the host as ``ref_numpy.lora.add_lora`` draws them (same seed, same order), which
keeps them equal to ``load_pretrained``'s; they are small (rank R per projection).

Every family the spec reads slices directly, GPT-2's fused ``c_attn`` included (the engine
keeps it fused, with its own logical axis), so there is no whole-tensor fallback.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes  # noqa: F401  (registers bfloat16 with NumPy, so safetensors can read it)
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from safetensors import SafetensorError

from ref_numpy.config import LoraConfig, ModelConfig
from ref_numpy.formats import bnb, hf
from ref_numpy.formats.hf import CheckpointError, HFTensor
from ref_numpy.lora import LORA_LEAVES, add_lora, projections
from ref_numpy.nf4 import NESTED_BLOCKSIZE, NF4_CODE

from ..model import EngineConfig, Model
from ..nf4 import NF4State, quantize_nf4
from .sharding import RULES, Rules, state_shardings

Index = tuple[slice, ...]
Fill = Callable[[np.ndarray, Index], None]

BAND_BYTES = 8 << 20  # rows of a file mapped at once by one read (whole rows, at least one)

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
    the file headers. Raises CheckpointError naming the file for a tensor the index lists but
    its file lacks, or an unreadable file."""
    files = hf.weight_files(model_dir)
    by_file: dict[Path, list[str]] = {}
    for name, file in files.items():
        by_file.setdefault(file, []).append(name)
    out: dict[str, Entry] = {}
    for file, names in by_file.items():
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


def _bounds(index: Index, shape: tuple[int, ...]) -> tuple[tuple[int, int], ...]:
    """``(start, stop)`` of each slice of ``index`` (a sharding's may be ``slice(None)``)."""
    return tuple(s.indices(d)[:2] for s, d in zip(index, shape, strict=True))


# --- assembling sharded arrays --------------------------------------------------------------


def assemble(shape: tuple[int, ...], dtype: Any, sharding: NamedSharding, fill: Fill) -> jax.Array:
    """A global array of ``shape`` placed by ``sharding``, built piece by piece.

    For each distinct index the sharding gives this process's devices, ``fill(buffer, index)``
    writes that piece into a fresh host buffer (shape of the piece, ``dtype``); the buffer is
    copied to every device holding that piece and dropped before the next one.
    """
    groups: dict[tuple[tuple[int, int], ...], list[jax.Device]] = {}
    for device, index in sharding.addressable_devices_indices_map(shape).items():
        assert index is not None
        groups.setdefault(_bounds(index, shape), []).append(device)
    pieces: list[jax.Array] = []
    for bounds, devices in groups.items():
        buf = np.empty(tuple(stop - start for start, stop in bounds), dtype)
        fill(buf, tuple(slice(start, stop) for start, stop in bounds))
        pieces.extend(jax.device_put(buf, d) for d in devices)
        del buf
    return jax.make_array_from_single_device_arrays(shape, sharding, pieces)


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


@partial(jax.jit, static_argnames=("blocksize", "double_quant", "shardings"), donate_argnums=0)
def _quantize_row(
    stacked: dict[str, jax.Array],
    w: jax.Array,
    layer: jax.Array,
    *,
    blocksize: int,
    double_quant: bool,
    shardings: tuple[tuple[str, NamedSharding], ...],
) -> dict[str, jax.Array]:
    """``stacked`` with row ``layer`` of each field set to ``quantize_nf4(w)``'s.

    Args:
      stacked: ``{field: [L, ...]}`` NF4 state of one projection, donated.
      w: float32 [n], the weight ``W [out, in]`` flattened row-major.
      layer: int32 [].
    """
    q = quantize_nf4(w, blocksize, double_quant)
    out = {name: stacked[name].at[layer].set(getattr(q, name)) for name in stacked}
    return {name: jax.lax.with_sharding_constraint(out[name], s) for name, s in shardings}


def _flat_weight_fill(t: HFTensor, entry: Entry) -> Fill:
    """Fill pieces ``[lo:hi]`` of the float32 weight ``W [out, in]`` flattened row-major
    (W is the file tensor, or its transpose for GPT-2's Conv1D), reading whole rows of W."""
    d_in = _weight_shape(t)[1]

    def fill(buf: np.ndarray, index: Index) -> None:
        lo, hi = index[0].start, index[0].stop
        r0, r1 = lo // d_in, -(-hi // d_in)
        aligned = lo == r0 * d_in and hi == r1 * d_in
        rows = buf.reshape(r1 - r0, d_in) if aligned else np.empty((r1 - r0, d_in), np.float32)
        if t.transpose:  # the file holds W [out, in]
            read_into(rows, entry, t.name, (slice(r0, r1), slice(0, d_in)), np.float32)
        else:  # the file holds W^T [in, out]
            read_into(rows.T, entry, t.name, (slice(0, d_in), slice(r0, r1)), np.float32)
        if not aligned:
            buf[...] = rows.reshape(-1)[lo - r0 * d_in : hi - r0 * d_in]
        if not np.all(np.isfinite(buf)):
            raise CheckpointError(
                f"{entry.file}: tensor {t.name!r} contains NaN or Inf (after the cast to "
                "float32); it cannot be quantized to NF4"
            )

    return fill


def _quantize_stacked(
    ts: list[HFTensor],
    entries: dict[str, Entry],
    fields: dict[str, tuple[jax.ShapeDtypeStruct, NamedSharding]],
    eng: EngineConfig,
    mesh: Mesh,
) -> dict[str, jax.Array]:
    """The stacked NF4 state ``{field: [L, ...]}`` of one projection of every layer,
    quantized layer by layer from the float checkpoint, each field placed as ``fields`` says.

    Layer l's weight is read as a float32 vector split like the NF4 bytes (whole when they
    do not divide), so each device reads only the rows its bytes come from.
    """
    n = math.prod(_weight_shape(ts[0]))
    spec = fields["packed"][1].spec
    axes = spec[1] if len(spec) > 1 else None
    split = math.prod(mesh.shape[a] for a in ((axes,) if isinstance(axes, str) else axes or ()))
    w_sharding = NamedSharding(mesh, PartitionSpec(axes if n % split == 0 else None))
    stacked = {
        name: assemble(a.shape, a.dtype, s, lambda buf, _: buf.fill(0))
        for name, (a, s) in fields.items()
    }
    shardings = tuple((name, s) for name, (_, s) in fields.items())
    for layer, t in enumerate(ts):
        w = assemble((n,), np.float32, w_sharding, _flat_weight_fill(t, entries[t.name]))
        stacked = _quantize_row(
            stacked,
            w,
            jnp.int32(layer),
            blocksize=eng.nf4_blocksize,
            double_quant=eng.double_quant,
            shardings=shardings,
        )
        del w
    return {name: _exactly(stacked[name], s) for name, s in shardings}


def _exactly(x: jax.Array, sharding: NamedSharding) -> jax.Array:
    """``x`` carrying ``sharding`` itself: jit may hand back an equivalent spelling of it
    (``P()`` for ``P(None, None)``); the same device buffers are re-labelled, not copied."""
    if x.sharding == sharding:
        return x
    if not x.sharding.is_equivalent_to(sharding, x.ndim):
        return jax.device_put(x, sharding)
    pieces = [s.data for s in x.addressable_shards]
    return jax.make_array_from_single_device_arrays(x.shape, sharding, pieces)


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
                    quantized[key[:-1]] = _quantize_stacked(ts, entries, fields, eng, mesh)
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
