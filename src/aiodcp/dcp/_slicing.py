"""Which bytes of a stored tensor a read item needs: the pure part of slicing (``dcp._load``
fetches and decodes).

A stored item is a ``torch.save`` archive whose storage bytes are contiguous and row-major, so
the region a read item covers (``storage_offsets``/``lengths``) is a set of runs of storage
elements at computable offsets (``region_runs``: one run for a dim-0 slice; strided runs
otherwise, merged while a gap costs no more than a request). ``probe_ranges`` are the head and
tail fetched first to find where the storage bytes begin and to check the zip directory;
``Candidate`` is a stored item chosen for slicing, ``Slice`` one fetched run of it;
``region_of`` lets the coordinator make one candidate per distinct region of an item (replicas
read the same one; ``DcpLoad.sliced_apart``). No I/O here.
"""

from __future__ import annotations

import ctypes
import itertools
from bisect import bisect_right
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

import torch

from .._errors import CheckpointFormatError
from .._planner import ItemRange
from .._reader import ChunkBuffer
from ._fastdecode import HEAD_BYTES

if TYPE_CHECKING:
    from torch.distributed.checkpoint.planner import ReadItem

__all__ = [
    "MAX_RUNS_PER_ITEM",
    "SLICE_DTYPES",
    "SLICE_MIN_BYTES",
    "Candidate",
    "Slice",
    "contiguous_strides",
    "probe_ranges",
    "read_into",
    "region_of",
    "region_runs",
    "within",
]


SLICE_MIN_BYTES = HEAD_BYTES
"""Smaller stored items are fetched whole, whatever ``max_gap_size`` says."""


SLICE_DTYPES = frozenset(
    (
        torch.float32,
        torch.float64,
        torch.float16,
        torch.bfloat16,
        torch.int64,
        torch.int32,
        torch.int16,
        torch.int8,
        torch.uint8,
        torch.bool,
        torch.complex64,
        torch.complex128,
    )
)
"""The dtypes whose storage records the archive parser knows (``_fastdecode``)."""


def probe_ranges(item_range: ItemRange, overhead: int) -> tuple[ItemRange, ItemRange]:
    """The head and tail of a stored item fetched to slice it, ``overhead`` bytes each (at
    most ``HEAD_BYTES`` for the head): the item's bytes that are not storage bytes, all before
    or all after them at the extremes. So each probe holds what it must, and reaches into the
    storage bytes by the other one's size at most (~0.7-0.9 KB for ``torch.save``)."""
    return (
        ItemRange(item_range.start, item_range.start + min(overhead, HEAD_BYTES)),
        ItemRange(item_range.end - overhead, item_range.end),
    )


def within(
    known: Mapping[str, Sequence[tuple[int, bytes]]], path: str, wanted: ItemRange
) -> bytes | None:
    """The bytes of ``wanted`` if one of ``known``'s spans of ``path`` holds them."""
    spans = known.get(path, ())
    i = bisect_right(spans, wanted.start, key=lambda span: span[0]) - 1
    if i < 0:
        return None
    start, data = spans[i]
    if wanted.end > start + len(data):
        return None
    return data[wanted.start - start : wanted.end - start]


def contiguous_strides(shape: Sequence[int]) -> tuple[int, ...]:
    strides: list[int] = []
    step = 1
    for dim in reversed(shape):
        strides.append(step)
        step *= max(dim, 1)
    return tuple(reversed(strides))


def read_into(buffer: ChunkBuffer, tensor: torch.Tensor) -> None:
    """Fill the C-contiguous CPU ``tensor`` with the bytes of ``buffer`` from its position."""
    nbytes = tensor.numel() * tensor.element_size()
    destination = (ctypes.c_ubyte * nbytes).from_address(tensor.data_ptr())
    if buffer.readinto(destination) != nbytes:
        raise CheckpointFormatError(f"a fetched run holds fewer than the {nbytes} bytes needed")


MAX_RUNS_PER_ITEM = 64
"""Most runs one read item's region is fetched in; beyond, runs merge further (so a stored
item never becomes a flood of small requests, whatever ``max_gap_size`` allows)."""


def region_runs(
    shape: tuple[int, ...],
    strides: tuple[int, ...],
    offsets: tuple[int, ...],
    lengths: tuple[int, ...],
    itemsize: int,
    max_gap_size: int | float,
) -> list[tuple[int, int, tuple[int, ...]]]:
    """The runs of storage elements ``[first, stop)`` that hold the region ``offsets`` /
    ``lengths`` of a C-contiguous tensor of ``shape``, each with the index (relative to
    ``offsets``, over the leading dims) of the block of the region it holds.

    The region is contiguous from its innermost dim out to the first dim ``k`` not taken
    whole (a dim-0 slice: the whole region is one run). Outside that, consecutive blocks
    along a dim are merged into one run while the gap between them costs no more than a
    request (``max_gap_size`` bytes, the gap policy's cost model), and while there would be
    more than ``MAX_RUNS_PER_ITEM`` runs; so ``j`` leading dims stay apart and a run is one
    box of the region over dims ``j`` onwards, fetched with the gaps inside it.
    """
    ndim = len(shape)

    def span(level: int) -> int:  # elements from the first to the last of a level block
        return 1 + sum((lengths[d] - 1) * strides[d] for d in range(level, ndim))

    k = ndim - 1
    while k > 0 and offsets[k] == 0 and lengths[k] == shape[k]:
        k -= 1
    j = k
    runs = 1
    for d in range(j):
        runs *= lengths[d]
    while j > 0:
        gap = (strides[j - 1] - span(j)) * itemsize
        if lengths[j - 1] > 1 and gap > max_gap_size and runs <= MAX_RUNS_PER_ITEM:
            break
        runs //= lengths[j - 1]
        j -= 1
    base = sum(o * s for o, s in zip(offsets, strides, strict=True))
    length = span(j)
    blocks = []
    for prefix in itertools.product(*(range(n) for n in lengths[:j])):
        first = base + sum(i * s for i, s in zip(prefix, strides, strict=False))
        blocks.append((first, first + length, prefix))
    return blocks


def region_of(reqs: list[ReadItem]) -> tuple[Any, ...]:
    """All ``_slice_candidate`` reads of a rank's read items on one stored item: two ranks
    with the same region get the same candidate."""
    return tuple(
        (
            req.type,
            req.storage_index.fqn,
            req.storage_index.offset,
            req.storage_index.index,
            req.storage_offsets,
            req.lengths,
        )
        for req in reqs
    )


class Candidate(NamedTuple):
    """A stored item to slice: its stored dtype and shape, and per read item (in order) the
    runs of storage elements its region takes (``region_runs``)."""

    dtype: torch.dtype
    shape: tuple[int, ...]
    blocks: tuple[tuple[tuple[int, int, tuple[int, ...]], ...], ...]
    probes: tuple[ItemRange, ...]
    """The head and tail to fetch first (``probe_ranges``); none when the stored item is the
    tensor's bytes (safetensors)."""


class Slice:
    """A run fetched from a sliced stored item: the stored tensor's dtype, shape and strides,
    ``first``, the storage element the run begins with, and per reader of the run (in order)
    the index of the block of its region the run holds (``region_runs``)."""

    __slots__ = ("dtype", "first", "prefixes", "shape", "strides")

    def __init__(
        self, dtype: torch.dtype, shape: tuple[int, ...], strides: tuple[int, ...], first: int
    ) -> None:
        self.dtype = dtype
        self.shape = shape
        self.strides = strides
        self.first = first
        self.prefixes: list[tuple[int, ...]] = []

    def element(self, offsets: Sequence[int]) -> int:
        """Storage element at ``offsets`` of the stored tensor."""
        return sum(o * s for o, s in zip(offsets, self.strides, strict=True))
