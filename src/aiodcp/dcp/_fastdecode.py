"""Decode a stored DCP tensor straight into its destination, without ``torch.load``.

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
      -> _layout(buffer)
           key = (len(buffer), the 22-byte end-of-directory record)
           for each _Layout remembered under key:       (at most _LAYOUTS_PER_KEY)
               _Layout.matches(buffer)  -> reuse it      (cache hit: no parsing)
           _parse(buffer) -> _Layout    -> _remember(key, layout)
      -> per-call checks (dtype, region, bounds) -> readinto(target's memory)

A ``_Layout`` holds what ``_parse`` concluded (dtype, storage offset, shape, where the storage
bytes lie) and every byte ``_parse`` based that on: the end-of-directory record, the central
directory except its CRC fields, the signature and name/extra lengths of each local header, the
``byteorder`` and ``data.pkl`` contents. The parse depends on nothing else (it reads the CRCs and
the rest of each local header but ignores them), so an item of the same length that holds those
same bytes at the same places parses to the same result; ``matches`` compares exactly those bytes
(read in a few windows, masked) before any reuse. A different dtype, shape, storage offset or
record name changes one of them and misses. The cache is a plain dict of tuples, bounded
(``_LAYOUT_KEYS`` keys, oldest dropped first); decode threads read it without a lock (one
``dict.get``) and replace entries under ``_LAYOUTS_LOCK``, so a reader sees either the old or the
new tuple, each a valid set of layouts.
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
from dataclasses import dataclass
from typing import Any

import torch

from .._reader import ChunkBuffer

__all__ = ["decode_into"]

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


@dataclass(frozen=True, slots=True)
class _StorageRef:
    dtype: torch.dtype
    key: str


@dataclass(frozen=True, slots=True)
class _Rebuild:
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
            return _StorageRef(pid[1].dtype, str(pid[2]))
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


@dataclass(frozen=True, slots=True)
class _Window:
    """``[start, end)`` of an item, and the bytes of it a parse relied on: those under ``mask``
    (0xFF per byte relied on, 0 elsewhere, little-endian) equal those in ``expected``."""

    start: int
    end: int
    mask: int
    expected: int


@dataclass(frozen=True, slots=True)
class _Layout:
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


_LAYOUTS: dict[tuple[int, bytes], tuple[_Layout, ...]] = {}
_LAYOUTS_LOCK = threading.Lock()


def _remember(key: tuple[int, bytes], layout: _Layout) -> None:
    """Put ``layout`` first under ``key``, keeping the cache within its bounds."""
    with _LAYOUTS_LOCK:
        # Another thread may have parsed an item of the same layout meanwhile: kept once.
        kept = tuple(known for known in _LAYOUTS.pop(key, ()) if known != layout)
        kept = kept[: _LAYOUTS_PER_KEY - 1]
        while len(_LAYOUTS) >= _LAYOUT_KEYS:
            del _LAYOUTS[next(iter(_LAYOUTS))]  # the oldest key; only writers hold the lock
        _LAYOUTS[key] = (layout, *kept)


def _layout(buffer: ChunkBuffer) -> _Layout | None:
    """The layout of the item in ``buffer``: a remembered one it matches, else parsed."""
    total = len(buffer)
    if total < _EOCD.size:
        return None
    buffer.seek(total - _EOCD.size)
    key = (total, buffer.read(_EOCD.size))
    for known in _LAYOUTS.get(key, ()):
        if known.matches(buffer):
            return known
    layout = _parse(buffer)
    if layout is not None:
        _remember(key, layout)
    return layout


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
    layout = _layout(buffer)
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
