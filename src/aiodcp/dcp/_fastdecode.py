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
"""

from __future__ import annotations

import collections
import ctypes
import io
import pickle
import struct
import sys
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


def _entries(buffer: ChunkBuffer) -> dict[str, tuple[int, int]]:
    """name -> (data offset, size) of every entry; raises _Unusual for anything but STORED."""
    total = len(buffer)
    if total < _EOCD.size:
        raise _Unusual("too short")
    buffer.seek(total - _EOCD.size)
    sig, _, _, _, count, cd_size, cd_offset, comment = _EOCD.unpack(buffer.read(_EOCD.size))
    if sig != _EOCD_SIG or comment or cd_offset == _ZIP64 or cd_size == _ZIP64:
        raise _Unusual("no plain end-of-directory record")
    buffer.seek(cd_offset)
    directory = buffer.read(cd_size)
    entries: dict[str, tuple[int, int]] = {}
    pos = 0
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
        name = directory[pos + _CDIR.size : pos + _CDIR.size + name_len].decode("utf-8")
        pos += _CDIR.size + name_len + extra_len + comment_len
        buffer.seek(local)
        header = _LOCAL.unpack(buffer.read(_LOCAL.size))
        if header[0] != _LOCAL_SIG:
            raise _Unusual("damaged local header")
        entries[name] = (local + _LOCAL.size + header[9] + header[10], size)
    return entries


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
    try:
        entries = _entries(buffer)
        pickles = [n for n in entries if n.endswith("/data.pkl") and n.count("/") == 1]
        if len(pickles) != 1:
            return False
        prefix = pickles[0][: -len("data.pkl")]
        byteorder = entries.get(prefix + "byteorder")
        if byteorder is not None:
            buffer.seek(byteorder[0])
            if buffer.read(byteorder[1]) != b"little":
                return False
        start, size = entries[pickles[0]]
        buffer.seek(start)
        record = _MetaUnpickler(io.BytesIO(buffer.read(size))).load()
    except (_Unusual, pickle.UnpicklingError, struct.error, UnicodeDecodeError, EOFError):
        return False
    if not isinstance(record, _Rebuild) or not isinstance(record.storage, _StorageRef):
        return False
    dtype = record.storage.dtype
    if dtype != target.dtype or record.stride != _contiguous_strides(record.size):
        return False
    if record.size and record.stride and len(record.size) != len(record.stride):
        return False
    element = _region(record.size, offsets, lengths)
    if element is None:
        return False
    data = entries.get(f"{prefix}data/{record.storage.key}")
    if data is None:
        return False
    itemsize = dtype.itemsize
    first = (record.offset + element) * itemsize
    nbytes = target.numel() * itemsize
    if first + nbytes > data[1]:
        return False
    if nbytes:
        destination = (ctypes.c_ubyte * nbytes).from_address(target.data_ptr())
        buffer.seek(data[0] + first)
        if buffer.readinto(destination) != nbytes:
            return False
    return True
