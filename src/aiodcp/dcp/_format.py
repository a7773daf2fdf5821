"""What a checkpoint's storage format tells the read phase, and nothing more.

The read phase (``DcpLoad``, ``dcp/_load.py``) is one for every format: it groups a plan's read
items per stored item, decides which items to slice, plans the ranged GETs, picks the items
received straight into their destination, runs the engines, hands items over in plan order and
shares them across ranks. What differs between formats is small, and a ``StoredFormat`` answers
it, per read item:

    storage_data[req.storage_index]  where its stored item lies: ``relative_path`` and the byte
                                     range ``[offset, offset + length)`` of that file
    stored_tensor(req)               the plain tensor the item holds (dtype, shape, row-major),
                                     when its bytes may be sliced or received straight into a
                                     destination; None: the item is decoded whole (``decode``)
    probes(item_range, stored)       the head and tail to fetch before slicing, when the
                                     tensor's bytes lie inside a container (DCP's ``torch.save``
                                     zip) and must be located; () when the item *is* the
                                     tensor's bytes (safetensors: offsets known, nothing to find)
    locator(stored, length)          finds the tensor's bytes in the head, checks the tail
    whole_receive(target, ...)       the receiver of a whole item straight into ``target``
    decode(req, buffer, planner)     an item that was buffered (any layout, transforms...)
    file_prefix(relative_path)       the file's first bytes the load already holds, before its
                                     first stored item (safetensors: the header; DCP: none):
                                     part of the file when it is checked whole against the
                                     store's full-object checksum

Formats: ``dcp/_archive.py`` (DCP: ``_StorageInfo`` records, ``torch.save`` archives, stream
transforms) and ``safetensors/_format.py`` (raw little-endian tensors after a JSON header).

Also here, shared by both: ``Receive`` (what a direct item is received by: the engine's
``DirectTarget`` plus the check the consumer makes once it arrived) and ``RunReceive``, the
receiver of bytes that are exactly a destination's (a run of a sliced tensor, a raw tensor).
"""

from __future__ import annotations

import ctypes
from collections.abc import Collection, Mapping
from typing import TYPE_CHECKING, NamedTuple, Protocol

import torch

from .._errors import AiodcpError, CheckpointFormatError
from .._planner import ItemRange

if TYPE_CHECKING:
    from torch.distributed.checkpoint.metadata import MetadataIndex
    from torch.distributed.checkpoint.planner import LoadPlanner, ReadItem

    from .._path import CheckpointPath
    from .._reader import ChunkBuffer
    from .._stats import StatsRecorder

__all__ = [
    "Locator",
    "Receive",
    "RunReceive",
    "StoredFormat",
    "StoredInfo",
    "StoredTensor",
    "memory_of",
    "shape_error",
]


class StoredInfo(Protocol):
    """Where one stored item lies: bytes ``[offset, offset + length)`` of ``relative_path``
    (DCP's ``_StorageInfo`` is one)."""

    @property
    def relative_path(self) -> str: ...

    @property
    def offset(self) -> int: ...

    @property
    def length(self) -> int: ...


class StoredTensor(NamedTuple):
    """The plain tensor a stored item holds: its bytes are ``dtype``, ``shape``, row-major and
    little-endian, somewhere in the item (``StoredFormat.probes`` says whether they must be
    located)."""

    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        numel = 1
        for dim in self.shape:
            numel *= dim
        return numel * self.dtype.itemsize


class Locator(Protocol):
    """Finds a stored tensor's bytes inside its item from the item's head and checks them
    against its tail (``dcp._fastdecode.StoredTensorLocator`` for ``torch.save`` archives)."""

    nbytes: int

    def locate(self, head: bytes) -> int | None: ...

    def verify(self, head: bytes, tail: bytes) -> bool: ...


class Receive(Protocol):
    """What a direct item is received by: ``_sinks.DirectTarget`` (``head_bytes``,
    ``tail_bytes``, ``memory``, ``locate``), the destination ``tensor`` and, once every byte
    arrived, ``verify(head, tail)`` of the bytes kept around ``memory`` (``nbytes`` long)."""

    head_bytes: int
    tail_bytes: int
    memory: memoryview
    tensor: torch.Tensor

    @property
    def nbytes(self) -> int: ...

    def locate(self, head: bytes) -> int | None: ...

    def verify(self, head: bytes, tail: bytes) -> bool: ...


class StoredFormat(Protocol):
    """A checkpoint format, as the read phase sees it (see the module docstring)."""

    @property
    def storage_data(self) -> Mapping[MetadataIndex, StoredInfo]: ...

    @property
    def slice_dtypes(self) -> Collection[torch.dtype]:
        """The dtypes whose stored tensors may be sliced."""
        ...

    @property
    def etags(self) -> Mapping[str, str]:
        """Object key -> the ETag every data GET of it is pinned to (If-Match) from the
        start: what the format's own metadata read saw (safetensors: each file's header).
        Other objects are pinned to their first response's ETag, as always."""
        ...

    @property
    def max_item_bytes(self) -> int:
        """Stored items this long or longer are neither sliced nor received directly."""
        ...

    def missing(self, index: MetadataIndex) -> AiodcpError:
        """The error for a plan item whose stored item this checkpoint does not list."""
        ...

    def stored_tensor(self, req: ReadItem) -> StoredTensor | None: ...

    def probes(
        self, item_range: ItemRange, stored: StoredTensor
    ) -> tuple[ItemRange, ...] | None: ...

    def locator(self, stored: StoredTensor, length: int) -> Locator: ...

    def whole_receive(self, target: torch.Tensor, stored: StoredTensor, length: int) -> Receive: ...

    def file_prefix(self, relative_path: str) -> bytes: ...

    def decode(
        self, req: ReadItem, buffer: ChunkBuffer, planner: LoadPlanner, recorder: StatsRecorder
    ) -> None: ...


class RunReceive:
    """Receives one contiguous run of a stored tensor's storage bytes (a slice, already located
    and verified from the item's head and tail) straight into its destination tensor.

    The engine fetches the run, or, when the load checks it against recorded checksums, the
    whole checksum blocks around it (a window): ``before`` bytes of the window precede the run
    and ``after`` follow it. Where its memory begins is known (``head_bytes`` 0: nothing to
    locate); the sink keeps the bytes around it for the check, and ``verify`` that there are
    exactly that many."""

    __slots__ = ("after", "before", "memory", "tail_bytes", "tensor")

    head_bytes = 0

    def __init__(self, tensor: torch.Tensor, before: int = 0, after: int = 0) -> None:
        self.tensor = tensor
        self.memory = memory_of(tensor)
        self.before = before
        self.after = self.tail_bytes = after

    @property
    def nbytes(self) -> int:
        return len(self.memory)

    def locate(self, head: bytes) -> int:
        return self.before

    def verify(self, head: bytes, tail: bytes) -> bool:
        return len(head) == self.before and len(tail) == self.after


def memory_of(tensor: torch.Tensor) -> memoryview:
    """The bytes of a C-contiguous CPU ``tensor``, writable in place."""
    nbytes = tensor.numel() * tensor.element_size()
    return memoryview((ctypes.c_ubyte * nbytes).from_address(tensor.data_ptr())).cast("B")


def shape_error(
    path: CheckpointPath,
    relative_path: str,
    req: ReadItem,
    shape: tuple[int, ...],
    target: torch.Tensor,
) -> CheckpointFormatError:
    """The error for a read item whose narrowed stored shape is not its destination's."""
    return CheckpointFormatError(
        f"{path.url}: stored item {req.storage_index} has shape {shape} after "
        f"narrowing, the destination {req.dest_index.fqn!r} has {tuple(target.size())}",
        bucket=path.bucket,
        key=path.key(relative_path),
    )
