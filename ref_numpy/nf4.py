"""NF4: 4-bit NormalFloat quantization with double quantization, byte-compatible with bitsandbytes.

Follows bitsandbytes (bnb) 0.50 ``quantize_4bit(w, blocksize, compress_statistics, "nf4")``: the
packed bytes, the per-block absmax and the double-quantization state are the ones bnb stores, so
a tensor quantized here is read by bnb and the reverse (checked in tests/interop/test_nf4_bnb.py).

Layout. ``w`` is flattened row-major (C order) and cut into blocks of ``blocksize`` values; the
last block may be partial. Each value becomes the 4-bit index of the nearest entry of
``NF4_CODE`` after dividing by its block's absmax, and two indices share a byte, the even
element in the high nibble. Double quantization then stores each block's absmax as an 8-bit code
of ``absmax - mean(absmax)`` in the signed dynamic map, scaled per block of 256 absmax values.

Numerics, and which bnb path each choice follows (bnb has three: the CUDA kernel, the PyTorch
reference in ``bitsandbytes.backends.default.ops`` that bnb runs for NF4 on CPU, and a C++ CPU
kernel that it runs for the 8-bit step on CPU):

* Normalisation multiplies by the float32 reciprocal, ``x * (1 / absmax)``, as the CUDA kernel
  does for every block and the PyTorch reference does for every full block. (The reference
  divides in a trailing partial block, as does the C++ kernel in the sources we read; the two
  roundings differ in the last bit and almost never change an index.) A zero absmax is raised
  to 1e-38 before the reciprocal, as in the reference, so an all-zero block normalises to 0.
* Nearest code: thresholds are the float32 midpoints ``(code[i] + code[i+1]) / 2``, and a value
  exactly on a threshold takes the lower index. For NF4 these are bit for bit the thresholds in
  the CUDA kernel's decision tree and in the reference, both with ties to the lower index. For the
  8-bit map the reference also sends ties to the lower index; the CUDA kernel's binary search
  sends them to the even index of the pair, and bnb's C++ CPU kernel uses a table search that
  misses the nearest code for about 0.2% of values (its choice is then farther).
* All-zero block: absmax 0 and every index is that of the code 0.0 (NF4 7, dynamic map 127), as
  in the reference. The CUDA kernel and the C++ kernel compute ``0 * (1/0) = NaN`` there and
  store index 0; the dequantized values agree (0 times the code, plus the offset for absmax).
  The reference also stores the raised 1e-38 as the absmax of an all-zero trailing block; the
  spec stores 0 there, as the CUDA and C++ kernels do.
* Offset: ``mean(absmax)`` in float64, rounded once to float32. bnb takes torch's float32 mean,
  whose summation order and roundings differ, so its offset can differ by one float32 ulp
  (about a third of random cases) or, rarely, two.

Kernels in this project are stored ``[in, out]``; bnb quantizes the PyTorch weight ``[out, in]``.
``quantize_kernel`` therefore quantizes ``kernel.T`` and the resulting NF4Tensor holds W^T in the
PyTorch layout, exactly the bytes bnb writes for that ``nn.Linear``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

# The 16 NF4 values, in bnb's float32: quantiles of N(0, 1) rescaled to [-1, 1], with an exact 0
# (index 7) and asymmetric halves (8 positive values, 7 negative). Sorted ascending.
NF4_CODE = np.array(
    [
        -1.0,
        -0.6961928009986877,
        -0.5250730514526367,
        -0.39491748809814453,
        -0.28444138169288635,
        -0.18477343022823334,
        -0.09105003625154495,
        0.0,
        0.07958029955625534,
        0.16093020141124725,
        0.24611230194568634,
        0.33791524171829224,
        0.44070982933044434,
        0.5626170039176941,
        0.7229568362236023,
        1.0,
    ],
    dtype=np.float32,
)
NF4_CODE.flags.writeable = False
NF4_ZERO_INDEX = 7  # NF4_CODE[7] == 0.0; also the padding nibble after an odd trailing element

BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)  # the blocksizes bnb accepts for 4-bit
DEFAULT_BLOCKSIZE = 64  # bnb's and transformers' 4-bit default
NESTED_BLOCKSIZE = 256  # double quantization: absmax values per 8-bit block (fixed in bnb)

# Floor on a block's absmax before taking the reciprocal (bnb's PyTorch reference uses the same
# value): keeps 1/absmax finite, so an all-zero block normalises to 0 instead of 0 * inf = NaN.
_TINY_ABSMAX = np.float32(1e-38)


def _linspace_f32(start: float, end: float, steps: int) -> np.ndarray:
    """torch.linspace(start, end, steps, dtype=float32) on CPU, bit for bit.

    torch computes ``step = (end - start) / (steps - 1)`` in float32, fills the first half from
    ``start`` and the second half backwards from ``end``, each entry with one fused multiply-add.
    The float64 expression below is exact before its single rounding, so it equals that FMA.
    """
    s, e = np.float32(start), np.float32(end)
    step = np.float64((e - s) / np.float32(steps - 1))  # float32 step, as torch
    i = np.arange(steps, dtype=np.float64)  # [steps]
    forward = np.float64(s) + step * i  # [steps]
    backward = np.float64(e) - step * (steps - 1 - i)  # [steps]
    return np.where(i < steps // 2, forward, backward).astype(np.float32)  # [steps]


def dynamic_map(signed: bool = True) -> np.ndarray:
    """bnb's 8-bit dynamic map, ``create_dynamic_map(signed)``, as float32[256] sorted ascending.

    Seven decades 1e-6 .. 1e0; decade ``i`` holds the midpoints of a uniform grid on [0.1, 1]
    with ``2**i`` cells (``2**(i+1)`` unsigned), scaled by ``10**(i - 6)`` in float32. The signed
    map mirrors each decade to negative values; both maps add the values 0 and 1.

    Returns:
        float32[256]: the map; signed: min -0.99296875, code 0.0 at index 127, max 1.0.
    """
    values = [np.zeros(1, np.float32), np.ones(1, np.float32)]
    for i in range(7):
        cells = 2**i if signed else 2 ** (i + 1)
        grid = _linspace_f32(0.1, 1.0, cells + 1)  # [cells + 1]
        means = (grid[:-1] + grid[1:]) / np.float32(2)  # [cells + 1] -> [cells]
        decade = np.float32(10.0 ** (i - 6)) * means  # [cells], float32 product as torch
        values += [decade, -decade] if signed else [decade]
    return np.sort(np.concatenate(values))  # [256]


DYNAMIC_MAP = dynamic_map(signed=True)  # the code of the 8-bit absmax in double quantization
DYNAMIC_MAP.flags.writeable = False


def quantize_blockwise(
    x: np.ndarray, code: np.ndarray, blocksize: int
) -> tuple[np.ndarray, np.ndarray]:
    """Blockwise absmax quantization of a flat float32 vector to indices into a sorted code.

    Args:
        x: float32 [n], finite.
        code: float32 [C], sorted ascending, within [-1, 1] (NF4_CODE or DYNAMIC_MAP).
        blocksize: values per block; the last block holds the remaining ``n % blocksize``.

    Returns:
        idx: uint8 [n], index of the nearest code value to ``x / absmax`` (ties to the lower).
        absmax: float32 [ceil(n / blocksize)], max |x| over each block.
    """
    n = x.size
    n_blocks = -(-n // blocksize)
    # Zero padding fills the trailing partial block: |0| never raises its absmax, and the padded
    # entries are cut off again at the end (bnb's CUDA kernel loads the tail the same way).
    padded = np.zeros(n_blocks * blocksize, dtype=np.float32)  # [n_blocks * blocksize]
    padded[:n] = x
    blocks = padded.reshape(n_blocks, blocksize)  # [n] -> [n_blocks, blocksize]
    absmax = np.abs(blocks).max(axis=1)  # [n_blocks, blocksize] -> [n_blocks]
    # Multiply by the float32 reciprocal, as bnb's CUDA kernel (see the module docstring). No
    # clipping to [-1, 1] is needed: a value a rounding past +-1 still lands on the end code.
    inv = np.float32(1) / np.maximum(absmax, _TINY_ABSMAX)  # [n_blocks]
    normed = blocks * inv[:, None]  # [n_blocks, blocksize], float32
    thresholds = (code[:-1] + code[1:]) / np.float32(2)  # [C] -> [C-1], float32 midpoints
    # side="left" gives the first i with normed <= thresholds[i]: a tie takes the lower index.
    idx = np.searchsorted(thresholds, normed.reshape(-1), side="left")  # [n_blocks * blocksize]
    return idx[:n].astype(np.uint8), absmax


def dequantize_blockwise(
    idx: np.ndarray, absmax: np.ndarray, code: np.ndarray, blocksize: int
) -> np.ndarray:
    """Inverse of ``quantize_blockwise``: ``code[idx] * absmax`` of each value's block.

    Args:
        idx: uint8 [n]. absmax: float32 [ceil(n / blocksize)]. code: float32 [C].

    Returns:
        float32 [n]; one float32 product per value, the rounding bnb does.
    """
    scale = np.repeat(absmax.astype(np.float32), blocksize)[: idx.size]  # [n_blocks] -> [n]
    return code[idx] * scale  # [n]


def pack_nibbles(idx: np.ndarray) -> np.ndarray:
    """Two 4-bit indices per byte, the even element in the high nibble: uint8 [n] -> [ceil(n/2)].

    An odd trailing element is paired with NF4_ZERO_INDEX (the code of 0.0), as bnb pads.
    """
    idx = idx.astype(np.uint8)
    if idx.size % 2:
        idx = np.append(idx, np.uint8(NF4_ZERO_INDEX))  # [n] -> [n + 1]
    pairs = idx.reshape(-1, 2)  # [n] -> [n/2, 2]
    return (pairs[:, 0] << np.uint8(4)) | pairs[:, 1]  # [n/2, 2] -> [n/2]


def unpack_nibbles(packed: np.ndarray, n: int) -> np.ndarray:
    """Inverse of ``pack_nibbles``: uint8 [ceil(n/2)] -> uint8 [n] (drops a padding nibble)."""
    pairs = np.stack([packed >> np.uint8(4), packed & np.uint8(0x0F)], axis=1)  # [n/2, 2]
    return pairs.reshape(-1)[:n]  # [n/2, 2] -> [n]


def _check_blocksize(blocksize: object) -> int:
    if not isinstance(blocksize, int) or isinstance(blocksize, bool) or blocksize not in BLOCKSIZES:
        raise ValueError(f"blocksize: expected a power of two in 32..4096, got {blocksize!r}")
    return blocksize


@dataclass(frozen=True, eq=False)
class NF4Tensor:
    """A tensor quantized to NF4: bnb's packed bytes and quantization state, as NumPy arrays.

    With ``n = prod(shape)`` values and ``n_blocks = ceil(n / blocksize)``. The nested fields
    are all None without double quantization and all set with it.
    """

    packed: np.ndarray  # uint8 [ceil(n/2)]: two NF4 indices per byte, even element high nibble
    absmax: np.ndarray  # float32 [n_blocks]; uint8 [n_blocks] 8-bit codes with double quant
    shape: tuple[int, ...]  # original shape; values flattened row-major (C order)
    blocksize: int  # values per NF4 block, a power of two in 32..4096
    nested_absmax: np.ndarray | None = None  # float32 [ceil(n_blocks/256)], per 8-bit block
    nested_code: np.ndarray | None = None  # float32 [256], the signed dynamic map
    offset: np.float32 | None = None  # mean of the float32 absmax, subtracted before 8-bit
    nested_blocksize: int | None = None  # absmax values per 8-bit block: 256

    def __post_init__(self) -> None:
        _check_blocksize(self.blocksize)
        n = math.prod(self.shape)
        n_blocks = -(-n // self.blocksize)
        nested = (self.nested_absmax, self.nested_code, self.offset, self.nested_blocksize)
        if any(f is None for f in nested) and not all(f is None for f in nested):
            raise ValueError(
                "NF4Tensor: nested_absmax, nested_code, offset, nested_blocksize "
                f"must be all set or all None, got {[f is None for f in nested]}"
            )
        _check_array("packed", self.packed, np.uint8, ((n + 1) // 2,))
        _check_array(
            "absmax", self.absmax, np.uint8 if self.double_quant else np.float32, (n_blocks,)
        )
        if self.double_quant:
            if self.nested_blocksize != NESTED_BLOCKSIZE:
                raise ValueError(
                    f"NF4Tensor.nested_blocksize: expected {NESTED_BLOCKSIZE}, "
                    f"got {self.nested_blocksize!r}"
                )
            n_nested = -(-n_blocks // NESTED_BLOCKSIZE)
            _check_array("nested_absmax", self.nested_absmax, np.float32, (n_nested,))
            _check_array("nested_code", self.nested_code, np.float32, (256,))
            if not isinstance(self.offset, np.float32):
                raise ValueError(f"NF4Tensor.offset: expected np.float32, got {self.offset!r}")

    @property
    def double_quant(self) -> bool:
        """Whether ``absmax`` holds 8-bit codes (double quantization)."""
        return self.nested_absmax is not None

    @property
    def absmax_f32(self) -> np.ndarray:
        """float32 [n_blocks]: the block absmax, dequantized if double-quantized."""
        return dequantize_absmax(self)


def _check_array(name: str, a: object, dtype: type, shape: tuple[int, ...]) -> None:
    if not isinstance(a, np.ndarray) or a.dtype != dtype or a.shape != shape:
        got = (a.dtype, a.shape) if isinstance(a, np.ndarray) else type(a).__name__
        raise ValueError(f"NF4Tensor.{name}: expected {np.dtype(dtype)} {shape}, got {got}")


def quantize_nf4(
    w: np.ndarray, blocksize: int = DEFAULT_BLOCKSIZE, double_quant: bool = True
) -> NF4Tensor:
    """Quantize ``w`` to NF4 in blocks of ``blocksize``, optionally double-quantizing the absmax.

    Args:
        w: float16 / bfloat16 / float32 / float64, any shape, finite. Cast to float32 first:
            bnb quantizes a float32 (or fp16/bf16) torch tensor, so float64 is rounded once here.
        blocksize: values per block, a power of two in 32..4096 (bnb's default 64).
        double_quant: store the absmax as 8-bit codes (bnb's ``compress_statistics=True``).

    Returns:
        NF4Tensor with packed uint8 [ceil(n/2)] and absmax [ceil(n/blocksize)].

    Raises:
        ValueError: bad blocksize, non-float or empty ``w``, or NaN / Inf in ``w``.
    """
    _check_blocksize(blocksize)
    w = np.asarray(w)
    if w.dtype.kind != "f" and w.dtype.name != "bfloat16":
        raise ValueError(f"w: expected a float array, got dtype {w.dtype}")
    if w.size == 0:
        raise ValueError(f"w: expected at least one value, got shape {w.shape}")
    with np.errstate(over="ignore"):  # float64 beyond float32 range becomes inf, rejected below
        flat = w.astype(np.float32).reshape(-1)  # [*shape] -> [n], row-major
    if not np.all(np.isfinite(flat)):
        raise ValueError("w: contains NaN or Inf (after the cast to float32)")

    idx, absmax = quantize_blockwise(flat, NF4_CODE, blocksize)  # [n], [n_blocks]
    packed = pack_nibbles(idx)  # [n] -> [ceil(n/2)]
    return nf4_from_blocks(packed, absmax, w.shape, blocksize, double_quant)


def nf4_from_blocks(
    packed: np.ndarray,
    absmax: np.ndarray,
    shape: tuple[int, ...],
    blocksize: int,
    double_quant: bool = True,
) -> NF4Tensor:
    """The ``NF4Tensor`` of packed NF4 indices and their blocks' float32 absmax, the absmax
    double-quantized if asked: the last step of ``quantize_nf4``.

    Blocks are quantized independently, so ``packed`` and ``absmax`` may be computed a run of
    whole blocks at a time (``quantize_blockwise`` and ``pack_nibbles`` of each run, joined);
    only double quantization needs every block's absmax.

    Args:
        packed: uint8 [ceil(n/2)], ``pack_nibbles`` of the indices. absmax: float32 [n_blocks].
        shape: the quantized tensor's shape, ``prod(shape) = n``. blocksize, double_quant: as
            ``quantize_nf4``.
    """
    shape = tuple(int(d) for d in shape)
    if not double_quant:
        return NF4Tensor(packed=packed, absmax=absmax, shape=shape, blocksize=blocksize)

    # Double quantization: centre the absmax on its mean (absmax > 0, so centring halves the
    # range the 8-bit code has to cover), then quantize blockwise to the signed dynamic map.
    offset = np.float32(np.mean(absmax, dtype=np.float64))  # one rounding; bnb: torch f32 mean
    centred = absmax - offset  # [n_blocks], float32
    codes, nested_absmax = quantize_blockwise(centred, DYNAMIC_MAP, NESTED_BLOCKSIZE)
    return NF4Tensor(
        packed=packed,
        absmax=codes,  # uint8 [n_blocks]
        shape=shape,
        blocksize=blocksize,
        nested_absmax=nested_absmax,  # float32 [ceil(n_blocks/256)]
        nested_code=DYNAMIC_MAP,
        offset=offset,
        nested_blocksize=NESTED_BLOCKSIZE,
    )


def dequantize_absmax(q: NF4Tensor) -> np.ndarray:
    """float32 [n_blocks]: the block absmax; with double quant ``code[c] * nested_absmax + offset``.

    Two float32 roundings, product then sum, in the order bnb dequantizes the statistics.
    """
    if not q.double_quant:
        return q.absmax
    assert q.nested_absmax is not None and q.nested_code is not None and q.offset is not None
    assert q.nested_blocksize is not None
    centred = dequantize_blockwise(q.absmax, q.nested_absmax, q.nested_code, q.nested_blocksize)
    return centred + q.offset  # [n_blocks], float32


def dequantize_nf4(q: NF4Tensor) -> np.ndarray:
    """float32 array of ``q.shape``: ``NF4_CODE[index] * absmax`` of each value's block."""
    n = math.prod(q.shape)
    idx = unpack_nibbles(q.packed, n)  # [ceil(n/2)] -> [n]
    out = dequantize_blockwise(idx, dequantize_absmax(q), NF4_CODE, q.blocksize)  # [n]
    return out.reshape(q.shape)  # [n] -> [*shape]


def quantize_kernel(
    kernel: np.ndarray, blocksize: int = DEFAULT_BLOCKSIZE, double_quant: bool = True
) -> NF4Tensor:
    """Quantize a ``[in, out]`` kernel as bnb quantizes the PyTorch weight ``W = kernel.T``.

    bnb's blocks run over the ``[out, in]`` row-major order, so the result holds W^T: its shape
    is ``(out, in)`` and its bytes are the ones bnb stores for the matching ``nn.Linear``.
    """
    if kernel.ndim != 2:
        raise ValueError(f"kernel: expected a 2-D [in, out] array, got shape {kernel.shape}")
    return quantize_nf4(kernel.T, blocksize, double_quant)  # [in, out] -> W [out, in]


def dequantize_kernel(q: NF4Tensor) -> np.ndarray:
    """Inverse of ``quantize_kernel``: NF4Tensor of W ``[out, in]`` -> float32 ``[in, out]``."""
    if len(q.shape) != 2:
        raise ValueError(f"q.shape: expected a 2-D (out, in) weight, got {q.shape}")
    return np.ascontiguousarray(dequantize_nf4(q).T)  # [out, in] -> [in, out]


def nf4_bits_per_param(blocksize: int = DEFAULT_BLOCKSIZE, double_quant: bool = True) -> float:
    """Storage bits per weight: 4 for the index plus the per-block absmax, amortised.

    fp32 absmax: ``4 + 32/blocksize`` (4.5 at 64). Double quant: an 8-bit code per block plus an
    fp32 nested absmax per 256 blocks, ``4 + 8/blocksize + 32/(256 blocksize)`` (about 4.127 at
    64). The per-tensor offset and 256-entry map are a constant and not counted.
    """
    _check_blocksize(blocksize)
    if double_quant:
        return 4 + 8 / blocksize + 32 / (blocksize * NESTED_BLOCKSIZE)
    return 4 + 32 / blocksize
