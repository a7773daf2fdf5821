"""Decode a stored DCP tensor straight into its destination, without ``torch.load``.

The package's only zip/``torch.save`` parsing (the archives of DCP's format, which
``dcp/_archive.py`` describes to the read phase), used three ways: ``decode_into`` (a buffered
item), ``DirectReceive`` (a whole stored tensor received from the socket into its destination)
and ``StoredTensorLocator`` (where a stored tensor's storage bytes lie, read from the archive's
head and checked against its tail: what a resharded load slices by, fetching only the runs of
storage bytes its read items need).

Every stored DCP tensor item is a small ``torch.save`` archive: an uncompressed (STORED) zip
with ``data.pkl`` (a pickle calling ``torch._utils._rebuild_tensor_v2(storage, offset, size,
stride, ...)``), ``byteorder`` and ``data/<key>`` (the raw storage bytes). ``torch.load`` builds a
new tensor from it, DCP narrows it to the read item and copies it into the destination: a fixed
cost per item plus a second copy and a temporary allocation as large as the item.

``decode_into`` reads the zip directory and the pickle itself (a restricted unpickler that only
records the rebuild arguments), and when the region the read item needs is one contiguous run
of the stored storage and the destination is a contiguous CPU tensor of the same dtype and
shape, ``readinto``s those bytes directly into the destination's memory: one copy, no
temporary. Anything else (compression, zip64, an unknown storage type, big-endian data, a
strided region, a tensor subclass...) returns ``False`` and the caller uses ``torch.load``;
``tests/test_fastdecode.py`` checks both paths give identical results.

The items of one checkpoint nearly all share one zip layout: the same length, the same
``data.pkl`` and record names, only the storage bytes (and their CRCs and the per-save
``serialization_id``) differ. Parsing that layout costs far more than copying a small tensor, so
a parsed layout is remembered::

    decode_into(buffer, offsets, lengths, target)
      -> LAYOUTS.layout(buffer)
           key = (len(buffer), the 22-byte end-of-directory record)
           for each _Layout remembered under key:       (at most per_key)
               _Layout.matches(buffer)  -> reuse it      (cache hit: no parsing)
           _parse(buffer) -> _Layout    -> remembered under key
      -> per-call checks (dtype, region, bounds) -> readinto(target's memory)

A ``_Layout`` holds what ``_parse`` concluded (dtype, storage offset, shape, where the storage
bytes lie) and every byte ``_parse`` based that on: the end-of-directory record, the central
directory except its CRC fields, the signature and name/extra lengths of each local header, the
``byteorder`` and ``data.pkl`` contents. The parse depends on nothing else (it reads the CRCs and
the rest of each local header but ignores them), so an item of the same length that holds those
same bytes at the same places parses to the same result; ``matches`` compares exactly those bytes
(read in a few windows, masked) before any reuse. A different dtype, shape, storage offset or
record name changes one of them and misses. The cache (``LayoutCache``) is a dict of tuples,
bounded (``_LAYOUT_KEYS`` keys, oldest dropped first), read without a lock.
"""

from __future__ import annotations

import collections
import ctypes
import io
import pickle
import struct
import sys
import threading
from collections.abc import Sequence
from typing import Any, NamedTuple

import torch

from .._reader import ChunkBuffer
from ._format import memory_of

__all__ = [
    "HEAD_BYTES",
    "LAYOUTS",
    "TAIL_BYTES",
    "DirectReceive",
    "LayoutCache",
    "StoredTensorLocator",
    "decode_into",
]

_EOCD = struct.Struct("<IHHHHIIH")  # end of central directory, 22 bytes
_CDIR = struct.Struct("<IHHHHHHIIIHHHHHII")  # central directory header, 46 bytes
_LOCAL = struct.Struct("<IHHHHHIIIHH")  # local file header, 30 bytes
_EOCD_SIG, _CDIR_SIG, _LOCAL_SIG = 0x06054B50, 0x02014B50, 0x04034B50
_ZIP64 = 0xFFFFFFFF
_CDIR_CRC = slice(16, 20)  # the CRC-32 field of a central directory header: varies per item

_LAYOUT_KEYS = 32  # distinct (length, end-of-directory record) keys remembered
_LAYOUTS_PER_KEY = 4  # layouts remembered per key (e.g. fp32 and int32 items of one shape)
_WINDOW_GAP_BYTES = 1024  # spans closer than this are checked with one read

_STORAGE_DTYPES: dict[str, torch.dtype] = {
    "FloatStorage": torch.float32,
    "DoubleStorage": torch.float64,
    "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16,
    "LongStorage": torch.int64,
    "IntStorage": torch.int32,
    "ShortStorage": torch.int16,
    "CharStorage": torch.int8,
    "ByteStorage": torch.uint8,
    "BoolStorage": torch.bool,
    "ComplexFloatStorage": torch.complex64,
    "ComplexDoubleStorage": torch.complex128,
}


class _Unusual(Exception):
    """Not the plain layout this fast path handles: use torch.load."""


class _StorageRef(NamedTuple):
    dtype: torch.dtype
    key: str
    numel: int | None


class _Rebuild(NamedTuple):
    storage: Any
    offset: int
    size: tuple[int, ...]
    stride: tuple[int, ...]


def _rebuild(storage: Any, offset: int, size: Any, stride: Any, *_: Any, **__: Any) -> _Rebuild:
    return _Rebuild(storage, offset, tuple(size), tuple(stride))


class _StorageType:
    def __init__(self, dtype: torch.dtype) -> None:
        self.dtype = dtype


class _MetaUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if module == "torch._utils" and name == "_rebuild_tensor_v2":
            return _rebuild
        if module == "collections" and name == "OrderedDict":
            return collections.OrderedDict
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(_STORAGE_DTYPES[name])
        raise _Unusual(f"{module}.{name}")

    def persistent_load(self, pid: Any) -> Any:
        if (
            isinstance(pid, tuple)
            and len(pid) == 5
            and pid[0] == "storage"
            and isinstance(pid[1], _StorageType)
            and pid[3] == "cpu"
        ):
            numel = pid[4] if type(pid[4]) is int else None
            return _StorageRef(pid[1].dtype, str(pid[2]), numel)
        raise _Unusual(f"persistent id {pid!r}")


def _entries(buffer: ChunkBuffer, used: list[tuple[int, int]]) -> dict[str, tuple[int, int]]:
    """name -> (data offset, size) of every entry; raises _Unusual for anything but STORED.

    Appends to ``used`` the ``[start, end)`` spans of the bytes the result depends on (see
    ``_Layout``); every span and every entry's data lies inside the buffer."""
    total = len(buffer)
    if total < _EOCD.size:
        raise _Unusual("too short")
    buffer.seek(total - _EOCD.size)
    sig, _, _, _, count, cd_size, cd_offset, comment = _EOCD.unpack(buffer.read(_EOCD.size))
    if sig != _EOCD_SIG or comment or cd_offset == _ZIP64 or cd_size == _ZIP64:
        raise _Unusual("no plain end-of-directory record")
    if cd_offset + cd_size > total - _EOCD.size:
        raise _Unusual("central directory past its end record")
    buffer.seek(cd_offset)
    directory = buffer.read(cd_size)
    entries: dict[str, tuple[int, int]] = {}
    pos = 0
    run = cd_offset  # start of the current run of directory bytes relied on
    for _ in range(count):
        fields = _CDIR.unpack_from(directory, pos)
        if fields[0] != _CDIR_SIG or fields[4] != 0:  # signature, method (0 = STORED)
            raise _Unusual("compressed or damaged entry")
        size, name_len, extra_len, comment_len, local = (
            fields[9],
            fields[10],
            fields[11],
            fields[12],
            fields[16],
        )
        if size == _ZIP64 or local == _ZIP64:
            raise _Unusual("zip64 entry")
        end = pos + _CDIR.size + name_len + extra_len + comment_len
        if end > cd_size:
            raise _Unusual("damaged central directory")
        name = directory[pos + _CDIR.size : pos + _CDIR.size + name_len].decode("utf-8")
        # The whole directory but its CRC fields, which nothing reads.
        used.append((run, cd_offset + pos + _CDIR_CRC.start))
        run = cd_offset + pos + _CDIR_CRC.stop
        pos = end
        buffer.seek(local)
        header = _LOCAL.unpack(buffer.read(_LOCAL.size))
        if header[0] != _LOCAL_SIG:
            raise _Unusual("damaged local header")
        data = local + _LOCAL.size + header[9] + header[10]
        if data + size > total:
            raise _Unusual("entry past the end")
        used.append((local, local + 4))  # signature
        used.append((local + _LOCAL.size - 4, local + _LOCAL.size))  # name and extra lengths
        entries[name] = (data, size)
    used.append((run, cd_offset + pos))
    used.append((total - _EOCD.size, total))
    return entries


class _Window(NamedTuple):
    """``[start, end)`` of an item, and the bytes of it a parse relied on: those under ``mask``
    (0xFF per byte relied on, 0 elsewhere, little-endian) equal those in ``expected``."""

    start: int
    end: int
    mask: int
    expected: int


class _Layout(NamedTuple):
    """What ``_parse`` found in one item, and the bytes (``windows``) it found it from.

    ``dtype``, ``offset`` (in elements) and ``size`` are the stored tensor's, which is
    C-contiguous; its storage bytes are ``[data_start, data_start + data_size)`` of the item."""

    length: int
    windows: tuple[_Window, ...]
    dtype: torch.dtype
    offset: int
    size: tuple[int, ...]
    data_start: int
    data_size: int

    def matches(self, buffer: ChunkBuffer) -> bool:
        """Whether ``buffer`` holds the same bytes as the parsed item wherever the parse looked,
        so that parsing it would give this same layout."""
        if len(buffer) != self.length:
            return False
        for window in self.windows:
            buffer.seek(window.start)
            raw = buffer.read(window.end - window.start)
            if int.from_bytes(raw, "little") & window.mask != window.expected:
                return False
        return True


def _windows(buffer: ChunkBuffer, used: list[tuple[int, int]]) -> tuple[_Window, ...]:
    """The spans in ``used`` (inside the buffer), grouped into windows read once each: a span
    starting within ``_WINDOW_GAP_BYTES`` of the current window's end joins it."""
    groups: list[tuple[int, list[tuple[int, int]]]] = []  # (window start, spans)
    ends: list[int] = []  # window ends
    for start, end in sorted(used):
        if ends and start <= ends[-1] + _WINDOW_GAP_BYTES:
            groups[-1][1].append((start, end))
            if end > ends[-1]:
                ends[-1] = end
        else:
            groups.append((start, [(start, end)]))
            ends.append(end)
    windows = []
    for (first, spans), last in zip(groups, ends, strict=True):
        mask = bytearray(last - first)
        for start, end in spans:
            mask[start - first : end - first] = b"\xff" * (end - start)
        bits = int.from_bytes(mask, "little")
        buffer.seek(first)
        expected = int.from_bytes(buffer.read(last - first), "little") & bits
        windows.append(_Window(first, last, bits, expected))
    return tuple(windows)


def _parse(buffer: ChunkBuffer) -> _Layout | None:
    """The layout of the item in ``buffer``, None if it is not the plain layout handled here.

    The result depends only on the buffer's length and the bytes in the layout's windows."""
    used: list[tuple[int, int]] = []
    try:
        entries = _entries(buffer, used)
        pickles = [n for n in entries if n.endswith("/data.pkl") and n.count("/") == 1]
        if len(pickles) != 1:
            return None
        prefix = pickles[0][: -len("data.pkl")]
        byteorder = entries.get(prefix + "byteorder")
        if byteorder is not None:
            buffer.seek(byteorder[0])
            used.append((byteorder[0], byteorder[0] + byteorder[1]))
            if buffer.read(byteorder[1]) != b"little":
                return None
        start, size = entries[pickles[0]]
        buffer.seek(start)
        used.append((start, start + size))
        record = _MetaUnpickler(io.BytesIO(buffer.read(size))).load()
    except (_Unusual, pickle.UnpicklingError, struct.error, UnicodeDecodeError, EOFError):
        return None
    if not isinstance(record, _Rebuild) or not isinstance(record.storage, _StorageRef):
        return None
    if (
        type(record.offset) is not int
        or record.offset < 0
        or any(type(dim) is not int or dim < 0 for dim in record.size)
        or record.stride != _contiguous_strides(record.size)
    ):
        return None
    data = entries.get(f"{prefix}data/{record.storage.key}")
    if data is None:
        return None
    return _Layout(
        len(buffer),
        _windows(buffer, used),
        record.storage.dtype,
        record.offset,
        record.size,
        data[0],
        data[1],
    )


class LayoutCache:
    """Parsed layouts, remembered per (length, end-of-directory record) key: at most
    ``max_keys`` keys (the oldest dropped first), ``per_key`` layouts under each (the newest
    first). ``parses`` counts the items it had to parse (a miss). Decode threads read it
    without a lock (one ``dict.get``) and replace entries under the lock, so a reader sees
    either the old or the new tuple, each a valid set of layouts. The module's one instance is
    ``LAYOUTS``; a test may put a fresh one in its place (the one seam into this cache)."""

    def __init__(self, max_keys: int = _LAYOUT_KEYS, per_key: int = _LAYOUTS_PER_KEY) -> None:
        self.max_keys = max_keys
        self.per_key = per_key
        self.parses = 0
        self._entries: dict[tuple[int, bytes], tuple[_Layout, ...]] = {}
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._entries)

    def keys(self) -> list[tuple[int, bytes]]:
        return list(self._entries)

    def values(self) -> list[tuple[_Layout, ...]]:
        return list(self._entries.values())

    def layout(self, buffer: ChunkBuffer) -> _Layout | None:
        """The layout of the item in ``buffer``: a remembered one it matches, else parsed."""
        total = len(buffer)
        if total < _EOCD.size:
            return None
        buffer.seek(total - _EOCD.size)
        key = (total, buffer.read(_EOCD.size))
        for known in self._entries.get(key, ()):
            if known.matches(buffer):
                return known
        with self._lock:  # a miss: the parse costs far more than the lock
            self.parses += 1
        layout = _parse(buffer)
        if layout is not None:
            self._remember(key, layout)
        return layout

    def _remember(self, key: tuple[int, bytes], layout: _Layout) -> None:
        """Put ``layout`` first under ``key``, keeping the cache within its bounds."""
        entries = self._entries
        with self._lock:
            # Another thread may have parsed an item of the same layout meanwhile: kept once.
            kept = tuple(known for known in entries.pop(key, ()) if known != layout)
            kept = kept[: self.per_key - 1]
            while len(entries) >= self.max_keys:
                del entries[next(iter(entries))]  # the oldest key; only writers hold the lock
            entries[key] = (layout, *kept)


LAYOUTS = LayoutCache()
"""The layouts remembered in this process."""


def _contiguous_strides(size: Sequence[int]) -> tuple[int, ...]:
    strides = []
    step = 1
    for dim in reversed(size):
        strides.append(step)
        step *= max(dim, 1)
    return tuple(reversed(strides))


def _region(size: tuple[int, ...], offsets: Sequence[int], lengths: Sequence[int]) -> int | None:
    """Element offset of ``offsets`` in a C-contiguous tensor of ``size`` if the narrowed
    region is one contiguous run, else None."""
    if len(offsets) != len(size) or len(lengths) != len(size):
        return None
    if tuple(lengths) == size and not any(offsets):  # the whole tensor: the common case
        return 0
    # After the first narrowed dim every dim must be whole; before it every length must be 1.
    narrowed = False
    for dim, (off, length, whole) in enumerate(zip(offsets, lengths, size, strict=True)):
        if off < 0 or length < 0 or off + length > whole:
            return None
        if narrowed and (off != 0 or length != whole):
            return None
        if not narrowed and (off != 0 or length != whole):
            narrowed = True
            if any(lengths[d] != 1 for d in range(dim)):
                return None
    strides = _contiguous_strides(size)
    return sum(o * s for o, s in zip(offsets, strides, strict=True))


def decode_into(
    buffer: ChunkBuffer,
    offsets: Sequence[int],
    lengths: Sequence[int],
    target: torch.Tensor,
) -> bool:
    """Fill ``target`` with the stored tensor's region ``offsets``/``lengths``; False when the
    item is not in the plain layout this handles (nothing is written then)."""
    if (
        target.device.type != "cpu"
        or not target.is_contiguous()
        or tuple(target.shape) != tuple(lengths)
        or type(target) is not torch.Tensor
        or sys.byteorder != "little"
    ):
        return False
    layout = LAYOUTS.layout(buffer)
    if layout is None or layout.dtype != target.dtype:
        return False
    element = _region(layout.size, offsets, lengths)
    if element is None:
        return False
    itemsize = layout.dtype.itemsize
    first = (layout.offset + element) * itemsize
    nbytes = target.numel() * itemsize
    if first + nbytes > layout.data_size:
        return False
    if nbytes:
        destination = (ctypes.c_ubyte * nbytes).from_address(target.data_ptr())
        buffer.seek(layout.data_start + first)
        if buffer.readinto(destination) != nbytes:
            return False
    return True


# -- receiving a stored tensor straight into its destination ----------------------------------

HEAD_BYTES = 4096
"""Bytes at the start of an item within which the storage record must begin (see
``DirectReceive``). A ``torch.save`` of one tensor puts its data at ~600-1000 bytes."""
TAIL_BYTES = 64 * 1024
"""Most bytes an item may hold after its storage bytes (the last records, the directory)."""
_DESCRIPTOR = struct.Struct("<IIII")  # data descriptor with its signature: sig, crc, sizes
_DESCRIPTOR_SIG = 0x08074B50
_DESCRIPTOR_MARK = b"PK\x07\x08"
_HAS_DESCRIPTOR = 0x08  # general purpose flag: sizes follow the data
_ENCRYPTED = 0x01


class StoredTensorLocator:
    """Where one stored tensor's storage bytes lie in its ``torch.save`` archive.

    :meth:`locate` reads the item's first bytes (its head: the local headers and the
    ``data.pkl`` pickle, which must rebuild exactly ``dtype`` and ``shape``, C-contiguous, from
    storage offset 0) and answers the item offset at which the ``nbytes`` storage bytes begin.
    :meth:`verify` then checks the zip's central directory, in the bytes after the storage
    bytes (its tail), against what ``locate`` read, so those are exactly the bytes
    ``torch.load`` would read. Neither needs the storage bytes themselves: a slice of the
    tensor (``DirectReceive`` is the whole of it) is a computable run of them.

    ``locate`` relies on the local headers, written by ``torch.save`` in this order: ``data.pkl``
    first (its size is where its pickle stops), small records, then ``data/<key>``; each
    followed by a data descriptor (``torch.save`` streams, so local headers carry no sizes).
    """

    __slots__ = ("_records", "_storage_tail", "dtype", "length", "nbytes", "shape")

    def __init__(self, dtype: torch.dtype, shape: Sequence[int], length: int) -> None:
        self.dtype = dtype
        self.shape = tuple(shape)
        numel = 1
        for dim in self.shape:
            numel *= dim
        self.nbytes = numel * dtype.itemsize
        self.length = length
        # name -> (local header offset, size) of each record located, the storage record last
        self._records: dict[str, tuple[int, int]] = {}
        # bytes the storage record's data descriptor takes after its data (0: none)
        self._storage_tail = 0

    def locate(self, head: bytes) -> int | None:
        """Item offset where the storage bytes begin; None if ``head`` (the item's first bytes)
        is too short to tell; -1 if the item is not the layout this path handles."""
        try:
            return self._locate(head)
        except _Unusual:
            return -1

    def _locate(self, head: bytes) -> int | None:
        records: dict[str, tuple[int, int]] = {}
        complete = len(head) >= HEAD_BYTES
        pos = 0
        prefix = storage = ""
        while True:
            if pos + _LOCAL.size > len(head):
                return _short(complete)
            sig, _, flags, method, _, _, _, csize, usize, name_len, extra_len = _LOCAL.unpack_from(
                head, pos
            )
            if sig != _LOCAL_SIG or method != 0 or flags & _ENCRYPTED:
                raise _Unusual("not a plain local header")
            data = pos + _LOCAL.size + name_len + extra_len
            if data > len(head):
                return _short(complete)
            try:
                name = head[pos + _LOCAL.size : pos + _LOCAL.size + name_len].decode("utf-8")
            except UnicodeDecodeError:
                raise _Unusual("record name") from None
            if not prefix:  # torch.save writes data.pkl first
                if not name.endswith("/data.pkl") or name.count("/") != 1:
                    raise _Unusual("data.pkl is not the first record")
                prefix = name[: -len("data.pkl")]
                stream = io.BytesIO(head[data:])
                try:
                    record = _MetaUnpickler(stream).load()
                except (pickle.UnpicklingError, EOFError, struct.error, ValueError):
                    return _short(complete)  # cut off (or damaged: fails once head is full)
                size = stream.tell()
                storage = f"{prefix}data/{self._check(record)}"
            elif name == storage:
                size = self.nbytes
                if not flags & _HAS_DESCRIPTOR and not csize == usize == size:
                    raise _Unusual("storage record size")
                if data + size + _DESCRIPTOR.size > self.length - _EOCD.size:
                    raise _Unusual("storage record past the end")
                records[name] = (pos, size)
                self._records = records
                self._storage_tail = _DESCRIPTOR.size if flags & _HAS_DESCRIPTOR else 0
                return int(data)
            elif flags & _HAS_DESCRIPTOR:
                described = _described_size(head, data)
                if described is None:
                    return _short(complete)
                size = described
            else:
                size = csize
            if name == f"{prefix}byteorder":
                if data + size > len(head):
                    return _short(complete)
                if head[data : data + size] != b"little":
                    raise _Unusual("byte order")
            if name in records:
                raise _Unusual("duplicate record")
            records[name] = (pos, size)
            pos = data + size
            if flags & _HAS_DESCRIPTOR:
                if pos + _DESCRIPTOR.size > len(head):
                    return _short(complete)
                sig, _, csize, usize = _DESCRIPTOR.unpack_from(head, pos)
                if sig != _DESCRIPTOR_SIG or not csize == usize == size:
                    raise _Unusual("data descriptor")
                pos += _DESCRIPTOR.size
            elif csize != usize:
                raise _Unusual("compressed record")

    def _check(self, record: Any) -> str:
        """The storage key of the rebuild ``record`` if it rebuilds exactly the stored tensor
        expected (dtype, shape, contiguous, the whole storage from its start)."""
        if not isinstance(record, _Rebuild) or not isinstance(record.storage, _StorageRef):
            raise _Unusual("not a plain tensor")
        if (
            record.storage.dtype != self.dtype
            or record.offset != 0
            or record.size != self.shape
            or record.stride != _contiguous_strides(record.size)
            or record.storage.numel != self.nbytes // self.dtype.itemsize
        ):
            raise _Unusual("not the expected dtype, shape or storage")
        return record.storage.key

    def verify(self, head: bytes, tail: bytes) -> bool:
        """Whether the item's central directory (in ``tail``, the bytes after the storage
        bytes) names the same records at the same places and sizes that ``locate`` read in
        ``head``, the bytes before them; anything else would make ``torch.load`` read others."""
        records = self._records
        if not records:
            return False
        tail_start = self.length - len(tail)
        try:
            directory = _directory(tail, tail_start)
        except (_Unusual, struct.error, UnicodeDecodeError):
            return False
        pickles = [n for n in directory if n.endswith("/data.pkl") and n.count("/") == 1]
        if len(pickles) != 1 or pickles[0] not in records:
            return False
        prefix = pickles[0][: -len("data.pkl")]
        byteorder = f"{prefix}byteorder"
        if byteorder in directory and byteorder not in records:
            return False
        storage = next(reversed(records))
        relied = [pickles[0], byteorder, storage]
        for name in relied:
            if name not in records:
                continue
            entry = directory.get(name)
            if entry is None or entry != records[name]:
                return False
        # Where the storage bytes begin (the local header's name and extra lengths, in the
        # head) must agree with where the directory says the next record (or the directory
        # itself) begins, after them and their descriptor: a head damaged in those lengths
        # would otherwise put every byte of the tensor off by its error.
        local = records[storage][0]
        following = [offset for offset, _ in directory.values() if offset > local]
        after = min(following) if following else _directory_offset(tail)
        if after != len(head) + self.nbytes + self._storage_tail:
            return False
        return len(head) == self.length - len(tail) - self.nbytes


class DirectReceive(StoredTensorLocator):
    """Receives one stored tensor's bytes straight into its destination tensor's memory.

    The fetch engine gives the first bytes of the item to :meth:`locate` until it answers where
    the storage bytes begin. It then receives them into :attr:`memory` (the destination's own
    bytes: no buffer, no copy) and keeps only the bytes before (``head``) and after (``tail``).
    Once every byte arrived, :meth:`verify` checks the zip's central directory against what
    ``locate`` read from the local headers (see ``StoredTensorLocator``). ``locate`` answering
    "unusual" or ``verify`` failing sends the item back to the buffered path (``torch.load``).

    Used only where the read item is the whole stored tensor, the destination is a C-contiguous
    CPU tensor of the stored dtype and shape, and the item is between ``HEAD_BYTES`` and 4 GiB
    (checked by the caller, from the checkpoint metadata, before the load).
    """

    __slots__ = ("memory", "tensor")

    head_bytes = HEAD_BYTES
    tail_bytes = TAIL_BYTES

    def __init__(self, tensor: torch.Tensor, length: int) -> None:
        super().__init__(tensor.dtype, tuple(tensor.shape), length)
        self.tensor = tensor
        self.memory = memory_of(tensor)


def _short(complete: bool) -> int | None:
    """``head`` ended too early: wait for more bytes, unless it is all there is to look at."""
    if complete:
        raise _Unusual("the storage record does not begin within HEAD_BYTES")
    return None


def _described_size(head: bytes, data: int) -> int | None:
    """Size of a small record whose sizes follow it in a data descriptor: the first descriptor
    mark after ``data`` whose sizes equal its distance from ``data``; None if none is in
    ``head`` yet (``verify`` later checks the result against the central directory)."""
    at = head.find(_DESCRIPTOR_MARK, data)
    while at >= 0 and at + _DESCRIPTOR.size <= len(head):
        _, _, csize, usize = _DESCRIPTOR.unpack_from(head, at)
        if csize == usize == at - data:
            return at - data
        at = head.find(_DESCRIPTOR_MARK, at + 1)
    return None


def _directory_offset(tail: bytes) -> int:
    """Item offset of the central directory, from the end record that ends ``tail``."""
    return int(_EOCD.unpack_from(tail, len(tail) - _EOCD.size)[6])


def _directory(tail: bytes, tail_start: int) -> dict[str, tuple[int, int]]:
    """name -> (local header offset, size) of every entry in the central directory, which
    with its end record must lie in ``tail`` (bytes ``[tail_start, ...)`` of the item, running
    to its end). Raises ``_Unusual`` for anything but plain STORED entries."""
    if len(tail) < _EOCD.size:
        raise _Unusual("too short")
    sig, _, _, _, count, cd_size, cd_offset, comment = _EOCD.unpack_from(tail, len(tail) - 22)
    if sig != _EOCD_SIG or comment or cd_offset == _ZIP64 or cd_size == _ZIP64:
        raise _Unusual("no plain end-of-directory record")
    pos = cd_offset - tail_start
    if pos < 0 or pos + cd_size > len(tail) - _EOCD.size:
        raise _Unusual("central directory outside the tail")
    entries: dict[str, tuple[int, int]] = {}
    for _ in range(count):
        fields = _CDIR.unpack_from(tail, pos)
        csize, usize, name_len, extra_len, comment_len, local = (
            fields[8],
            fields[9],
            fields[10],
            fields[11],
            fields[12],
            fields[16],
        )
        if fields[0] != _CDIR_SIG or fields[4] != 0 or csize != usize or local == _ZIP64:
            raise _Unusual("compressed, zip64 or damaged entry")
        name = tail[pos + _CDIR.size : pos + _CDIR.size + name_len].decode("utf-8")
        if name in entries:
            raise _Unusual("duplicate entry")
        entries[name] = (local, usize)
        pos += _CDIR.size + name_len + extra_len + comment_len
    if pos > cd_offset - tail_start + cd_size:
        raise _Unusual("damaged central directory")
    return entries
