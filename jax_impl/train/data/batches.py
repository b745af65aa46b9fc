"""Packing and batches: encoded examples side by side in rows (``pack``) or one per row
(``unpacked_rows``), and rows padded to a few bucket lengths in batches of int32 arrays
[A, B, L] (A gradient-accumulation steps, B rows per step, L a bucket length), in an order
fixed by the seed and the epoch."""

from __future__ import annotations

import bisect
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from ref_numpy.layers import IGNORE_INDEX

from .encode import Encoded, IntArray
from .formats import DataError

# --- packing --------------------------------------------------------------------------


@dataclass(frozen=True)
class Row:
    """One training row before padding: examples side by side, all int32 [L].

    ``segment_ids`` number the examples 1, 2, 3, ... (0 is left for padding); ``positions``
    restart at 0 in each segment; ``labels`` are the examples' labels with the first token of
    every segment set to ``IGNORE_INDEX`` (the token before it belongs to another example).
    """

    input_ids: IntArray
    labels: IntArray
    positions: IntArray
    segment_ids: IntArray

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])


def _row(parts: Sequence[Encoded]) -> Row:
    lengths = [len(e) for e in parts]
    labels = np.concatenate([e.labels for e in parts]).astype(np.int32)  # [L]
    starts = np.cumsum([0, *lengths[:-1]])
    labels[starts] = IGNORE_INDEX  # no loss across a segment boundary
    return Row(
        input_ids=np.concatenate([e.input_ids for e in parts]).astype(np.int32),
        labels=labels,
        positions=np.concatenate([np.arange(n, dtype=np.int32) for n in lengths]),
        segment_ids=np.repeat(np.arange(1, len(parts) + 1, dtype=np.int32), lengths),
    )


def pack(encoded: Sequence[Encoded], max_length: int) -> list[Row]:
    """Pack examples into rows of at most ``max_length`` tokens (best fit, longest first).

    Each example goes, whole, into the fullest row that still has room for it, or starts a
    new row; examples of length 0 are dropped. Raises ``DataError`` for an example longer
    than ``max_length`` (``fit`` first).
    """
    order = sorted(range(len(encoded)), key=lambda i: (-len(encoded[i]), i))
    free: list[tuple[int, int]] = []  # (room left, row index), sorted
    members: list[list[int]] = []
    for i in order:
        n = len(encoded[i])
        if n == 0:
            continue
        if n > max_length:
            raise DataError(
                f"{encoded[i].where or f'examples[{i}]'}: {n} tokens do not fit max_length "
                f"{max_length} (call fit first)"
            )
        k = bisect.bisect_left(free, (n, -1))  # the row with the least room that fits
        if k < len(free):
            room, r = free.pop(k)
            members[r].append(i)
        else:
            room, r = max_length, len(members)
            members.append([i])
        if room - n > 0:
            bisect.insort(free, (room - n, r))
    return [_row([encoded[i] for i in m]) for m in members]


def unpacked_rows(encoded: Sequence[Encoded]) -> list[Row]:
    """One row per example (no packing); examples of length 0 are dropped."""
    return [_row([e]) for e in encoded if len(e)]


# --- batches --------------------------------------------------------------------------


def bucket_lengths(max_length: int, smallest: int = 32) -> list[int]:
    """Row lengths batches are padded to: ``smallest``, doubling, below ``max_length``, then
    ``max_length`` itself. A bounded set, so a jitted step compiles a few shapes only."""
    if max_length < 1 or smallest < 1:
        raise DataError(f"bucket_lengths: need positive lengths, got {max_length}, {smallest}")
    out = []
    n = smallest
    while n < max_length:
        out.append(n)
        n *= 2
    return [*out, max_length]


def num_batches(n_rows: int, batch_size: int, grad_accum: int = 1) -> int:
    """Batches per epoch: every row once, the last batch padded."""
    return math.ceil(n_rows / (batch_size * grad_accum))


def epoch_order(n_rows: int, *, seed: int, epoch: int) -> npt.NDArray[np.int64]:
    """The row order of one epoch, a function of ``(seed, epoch)`` only. [n_rows]"""
    return np.random.default_rng([seed, epoch]).permutation(n_rows)


def batches(
    rows: Sequence[Row],
    batch_size: int,
    grad_accum: int,
    buckets: Sequence[int],
    *,
    seed: int,
    epoch: int,
    start: int = 0,
    pad_id: int | None = None,
    part: tuple[int, int] | None = None,
) -> Iterator[dict[str, IntArray]]:
    """The batches of one epoch, in an order fixed by ``(seed, epoch)``.

    Args:
      rows: from ``pack`` or ``unpacked_rows``.
      batch_size, grad_accum: each batch holds ``grad_accum * batch_size`` rows.
      buckets: allowed row lengths (``bucket_lengths``); a batch is padded to the smallest one
        that holds its longest row.
      start: the first batch to yield (resuming mid-epoch); the same batches as skipping.
      pad_id: the id written at padding (default 0; it is masked everywhere).
      part: ``(lo, hi)``: only rows ``lo`` to ``hi - 1`` of each micro-batch, one process's
        share of a multi-process run (``sharding.process_rows``). Every process draws the
        same order and pads to the length of the whole batch, so the shares put together are
        the whole batches. Default: every row.
    Yields:
      dicts of int32 arrays [A, B, L] (A = grad_accum, B = batch_size, or ``hi - lo`` with
      ``part``): ``input_ids``, ``labels`` (IGNORE_INDEX at padding), ``attention_mask`` (1
      real, 0 padding), ``positions`` and ``segment_ids`` (0 at padding). The last batch of
      an epoch is filled up with fully masked rows, so every batch has the same A and B.
    """
    if batch_size < 1 or grad_accum < 1:
        raise DataError(
            f"batch_size and grad_accum must be positive, got {batch_size}, {grad_accum}"
        )
    lo, hi = (0, batch_size) if part is None else part
    if not 0 <= lo < hi <= batch_size:
        raise DataError(f"part {part}: expected rows 0 <= lo < hi <= batch_size={batch_size}")
    sizes = sorted(set(buckets))
    if not sizes or sizes[0] < 1:
        raise DataError(f"buckets must be positive lengths, got {list(buckets)}")
    longest = max((len(r) for r in rows), default=0)
    if longest > sizes[-1]:
        raise DataError(f"a row of {longest} tokens is longer than the largest bucket {sizes[-1]}")
    total = num_batches(len(rows), batch_size, grad_accum)
    if not 0 <= start <= total:
        raise DataError(f"start={start} outside the {total} batches of the epoch")
    per_batch = batch_size * grad_accum
    order = epoch_order(len(rows), seed=seed, epoch=epoch)
    fill = 0 if pad_id is None else pad_id
    shape = (grad_accum, hi - lo)
    for b in range(start, total):
        chosen = [rows[i] for i in order[b * per_batch : (b + 1) * per_batch]]
        length = sizes[bisect.bisect_left(sizes, max(len(r) for r in chosen))]  # whole batch's
        out = {
            "input_ids": np.full((*shape, length), fill, np.int32),
            "labels": np.full((*shape, length), IGNORE_INDEX, np.int32),
            "attention_mask": np.zeros((*shape, length), np.int32),
            "positions": np.zeros((*shape, length), np.int32),
            "segment_ids": np.zeros((*shape, length), np.int32),
        }  # [A,B,L]
        for a in range(grad_accum):
            for j, r in enumerate(chosen[a * batch_size + lo : a * batch_size + hi]):
                n = len(r)
                out["input_ids"][a, j, :n] = r.input_ids
                out["labels"][a, j, :n] = r.labels
                out["attention_mask"][a, j, :n] = 1
                out["positions"][a, j, :n] = r.positions
                out["segment_ids"][a, j, :n] = r.segment_ids
        yield out
