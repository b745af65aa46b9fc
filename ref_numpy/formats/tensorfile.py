"""Safetensors files that carry a checksum of every tensor, and a reading of their header that
names the tensor a damaged file gets wrong.

A safetensors file is an 8-byte little-endian header length ``N``, ``N`` bytes of JSON
(``{name: {"dtype", "shape", "data_offsets": [begin, end]}}`` and a free ``__metadata__``
table of strings), then the tensors' bytes, back to back, each at its offsets from the end of
the header. The format has no checksum: a flipped bit in the data reads back as a different
weight. Every file this project writes records, in ``__metadata__["sha256"]``, each tensor's
dtype, shape and the sha256 of its bytes (transformers and PEFT read the file as before; they
look only at ``format``), and every reader here checks them where present.

``check_header`` is what the safetensors library checks, said per tensor: a truncated file, a
tensor whose offsets overlap or leave a gap, or whose byte count disagrees with its dtype and
shape (a header that lies about offsets or dtypes). The readers call it to explain a file the
library refuses.
"""

from __future__ import annotations

import hashlib
import json
import math
import struct
from pathlib import Path
from typing import Any

import ml_dtypes  # noqa: F401  (registers bfloat16 with NumPy)
import numpy as np

CHECKSUM_KEY = "sha256"  # the __metadata__ entry: JSON {name: [dtype, shape, sha256]}
# safetensors' dtype codes and their sizes in bits
DTYPE_BITS = {
    "BOOL": 8,
    "F4": 4,
    "F6_E2M3": 6,
    "F6_E3M2": 6,
    "U8": 8,
    "I8": 8,
    "F8_E5M2": 8,
    "F8_E4M3": 8,
    "F8_E8M0": 8,
    "I16": 16,
    "U16": 16,
    "F16": 16,
    "BF16": 16,
    "I32": 32,
    "U32": 32,
    "F32": 32,
    "C64": 64,
    "F64": 64,
    "I64": 64,
    "U64": 64,
}
# NumPy dtype names (ml_dtypes for bfloat16 and the float8s) as safetensors codes
CODES = {
    "bool": "BOOL",
    "uint8": "U8",
    "int8": "I8",
    "float8_e5m2": "F8_E5M2",
    "float8_e4m3fn": "F8_E4M3",
    "int16": "I16",
    "uint16": "U16",
    "float16": "F16",
    "bfloat16": "BF16",
    "int32": "I32",
    "uint32": "U32",
    "float32": "F32",
    "complex64": "C64",
    "float64": "F64",
    "int64": "I64",
    "uint64": "U64",
}


class TensorFileError(ValueError):
    """A safetensors file that is damaged or lies about its contents; the message names the
    file and, where one is at fault, the tensor."""


def _digest(array: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(array).reshape(-1).view(np.uint8).data).hexdigest()


def save(tensors: dict[str, np.ndarray], path: Path, metadata: dict[str, str]) -> None:
    """Write ``tensors`` to ``path`` as safetensors with ``metadata`` and the checksum of every
    tensor, tensor by tensor (no copy of the whole file in memory). The layout is the
    safetensors library's: a compact header padded with spaces to 8 bytes, the tensors by
    falling item size, then name. An error of the file system is an OSError naming ``path``.

    Written here rather than by ``safetensors.numpy.save_file``, whose header holds the
    metadata in a hash map: with more than one entry their order, and so the file's bytes,
    would change from one save to the next."""
    arrays = {name: np.ascontiguousarray(a) for name, a in tensors.items()}
    for name, a in arrays.items():
        if a.dtype.name not in CODES:
            raise ValueError(f"{path}: tensor {name!r} has dtype {a.dtype}, unknown to safetensors")
        if a.dtype.byteorder == ">":
            arrays[name] = a.astype(a.dtype.newbyteorder("<"))
    order = sorted(arrays, key=lambda n: (-arrays[n].dtype.itemsize, n))
    sums = {name: [CODES[a.dtype.name], list(a.shape), _digest(a)] for name, a in arrays.items()}
    header: dict[str, Any] = {"__metadata__": {**metadata, CHECKSUM_KEY: json.dumps(sums)}}
    at = 0
    for name in order:
        a = arrays[name]
        header[name] = {
            "dtype": CODES[a.dtype.name],
            "shape": list(a.shape),
            "data_offsets": [at, at + a.nbytes],
        }
        at += a.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    try:
        with path.open("wb") as f:
            f.write(struct.pack("<Q", len(raw)) + raw)
            for name in order:
                f.write(arrays[name].reshape(-1).view(np.uint8).data)
    except OSError as e:
        raise OSError(e.errno, e.strerror, str(path)) from None


def checksums(metadata: dict[str, str] | None, path: Path) -> dict[str, tuple[str, list, str]]:
    """``{name: (dtype code, shape, sha256)}`` recorded in a file's ``__metadata__`` (empty for
    a file written elsewhere)."""
    raw = (metadata or {}).get(CHECKSUM_KEY)
    if raw is None:
        return {}
    try:
        table = json.loads(raw)
        return {str(k): (str(v[0]), list(v[1]), str(v[2])) for k, v in table.items()}
    except (json.JSONDecodeError, TypeError, IndexError, AttributeError):
        raise TensorFileError(f"{path}: __metadata__[{CHECKSUM_KEY!r}] is damaged") from None


def check_array(path: Path, name: str, array: np.ndarray, recorded: Any) -> None:
    """Refuse ``array`` read as tensor ``name`` of ``path`` when it differs from the checksum
    ``recorded`` for it at writing (None: nothing recorded, nothing to check)."""
    if recorded is None:
        return
    code, shape, digest = recorded
    got = CODES.get(array.dtype.name)
    if got != code or list(array.shape) != shape:
        raise TensorFileError(
            f"{path}: tensor {name!r} reads as {got} {list(array.shape)}, but was written as "
            f"{code} {shape} (the header was changed)"
        )
    if _digest(array) != digest:
        raise TensorFileError(
            f"{path}: tensor {name!r}: its bytes differ from the sha256 written with them "
            "(the file is corrupted)"
        )


def read_header(path: Path) -> tuple[int, dict[str, Any]]:
    """``(data start, header)`` of the safetensors file ``path``: the byte where the data
    begins and the parsed JSON. TensorFileError for a file too short or a header that is not
    a JSON object."""
    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise TensorFileError(f"{path}: {size} bytes, too short for a safetensors file")
        (n,) = struct.unpack("<Q", head)
        if n > size - 8:
            raise TensorFileError(
                f"{path}: the header claims {n} bytes but the file has {size - 8} after its "
                "length (truncated, or not a safetensors file)"
            )
        raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise TensorFileError(f"{path}: the header is not UTF-8 JSON ({e})") from None
    if not isinstance(header, dict):
        raise TensorFileError(f"{path}: the header is not a JSON object")
    return 8 + n, header


def check_header(path: Path) -> dict[str, tuple[str, list[int], int, int]]:
    """``{name: (dtype, shape, begin, end)}`` of the file's tensors (offsets from the start of
    the file), after the checks the safetensors library makes, each failure naming the tensor:
    a known dtype, a shape of non-negative ints, offsets whose span holds exactly the dtype's
    bytes for the shape, tensors back to back from the end of the header, and a file that ends
    where the last tensor does."""
    start, header = read_header(path)
    size = path.stat().st_size
    entries: list[tuple[int, int, str, str, list[int]]] = []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if not isinstance(info, dict):
            raise TensorFileError(f"{path}: tensor {name!r}: header entry is not an object")
        dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
        if dtype not in DTYPE_BITS:
            raise TensorFileError(f"{path}: tensor {name!r}: unknown dtype {dtype!r}")
        if not (isinstance(shape, list) and all(type(d) is int and d >= 0 for d in shape)):
            raise TensorFileError(f"{path}: tensor {name!r}: shape {shape!r} is not a list of ints")
        if not (
            isinstance(offsets, list)
            and len(offsets) == 2
            and all(type(o) is int and o >= 0 for o in offsets)
        ):
            raise TensorFileError(f"{path}: tensor {name!r}: data_offsets {offsets!r} malformed")
        bits = math.prod(shape) * DTYPE_BITS[dtype]
        begin, end = offsets
        if end - begin != -(-bits // 8):
            raise TensorFileError(
                f"{path}: tensor {name!r}: data_offsets {offsets} span {end - begin} bytes, but "
                f"{dtype} {shape} needs {-(-bits // 8)} (the header lies about its offsets or "
                "dtype)"
            )
        entries.append((begin, end, name, dtype, shape))
    at = 0
    for begin, end, name, _, _ in sorted(entries):
        if begin != at:
            what = "overlaps the tensor before it" if begin < at else "leaves a gap before it"
            raise TensorFileError(
                f"{path}: tensor {name!r}: data_offsets start at {begin}, expected {at} ({what})"
            )
        at = end
    for _, end, name, _, _ in sorted(entries):
        if start + end > size:  # the first tensor the file lacks bytes of
            raise TensorFileError(
                f"{path}: tensor {name!r} ends at byte {start + end}, past the end of the file "
                f"({size} bytes): the file is truncated"
            )
    if start + at < size:
        raise TensorFileError(
            f"{path}: {size - start - at} bytes after the last tensor (the header lies about "
            "its offsets)"
        )
    return {name: (dtype, shape, start + b, start + e) for b, e, name, dtype, shape in entries}


def verify(path: Path) -> None:
    """Check the header of ``path`` and, where the file carries checksums, every tensor's
    bytes against them, reading the file once in pieces of 1 MiB (no tensor is held whole).
    TensorFileError names the file and the tensor."""
    layout = check_header(path)
    sums = checksums(read_header(path)[1].get("__metadata__"), path)
    if not sums:
        return
    with path.open("rb") as f:
        for name, (dtype, shape, begin, end) in layout.items():
            recorded = sums.get(name)
            if recorded is None:
                continue
            if (dtype, shape) != (recorded[0], recorded[1]):
                raise TensorFileError(
                    f"{path}: tensor {name!r} is {dtype} {shape} in the header, but was written "
                    f"as {recorded[0]} {recorded[1]} (the header was changed)"
                )
            h = hashlib.sha256()
            f.seek(begin)
            left = end - begin
            while left:
                chunk = f.read(min(left, 1 << 20))
                if not chunk:  # shortened since its header was checked
                    break
                h.update(chunk)
                left -= len(chunk)
            if h.hexdigest() != recorded[2]:
                raise TensorFileError(
                    f"{path}: tensor {name!r}: its bytes differ from the sha256 written with "
                    "them (the file is corrupted)"
                )
