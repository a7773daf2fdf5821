"""torch.save's archive of one stored tensor, written around the tensor's own memory.

The write side of ``_fastdecode`` (which reads these archives). DCP's ``FileSystemWriter`` stores
each tensor as ``torch.save(tensor, stream)``: an uncompressed zip whose ``data/0`` record is the
tensor's storage bytes, 64-byte aligned, between a few hundred bytes of framing before (the
local headers, ``data.pkl``) and about a kilobyte after (data descriptors, the ``version`` and
``.data/serialization_id`` records, the central directory). A save sends that archive with the
storage bytes straight from the tensor's memory, byte for byte what ``torch.save`` writes:

Data flow::

    tensor_archive(tensor) -> TensorArchive | None
        torch.save(tensor) under torch.serialization.skip_data(), into memory: the archive
        torch writes, the storage bytes left as a hole of their length, and what depends on
        them not filled in (the storage's CRC-32, the serialization id)
        -> _records: the central directory (zip64 where torch writes it), every record's
           name, offsets, size and CRC-32
        -> checked: one storage record of the storage's size; the records' CRC-32s (the
           storage's left 0) fold into the serialization id torch wrote (c10::hash_combine,
           in write order); else None (the caller stages torch.save's own bytes)
        -> prefix (the bytes before the storage), memory (a view of the storage: no copy), and
           the suffix's template
    TensorArchive.suffix(crc32) -> the bytes after the storage: the storage's CRC-32 in its
        data descriptor and central directory entry, the serialization id recomputed (its
        second half folds every record's CRC-32, the storage's included) and its own CRC-32

The serialization id is ``%020d%020d`` of (a hash of the record names, unchanged, and the fold
of the records' CRC-32s); the fold is ``seed ^ (crc + 0x9e3779b9 + (seed << 6) + (seed >> 2))``
over 64 bits. Each archive checks it against what torch wrote before it is used, so a torch
that computes it otherwise is noticed, never written wrong. tests/test_save_archive.py compares
the bytes with ``torch.save``'s own.
"""

from __future__ import annotations

import ctypes
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["TensorArchive", "crc32", "storage_memory", "tensor_archive"]


def _crc32_function() -> Callable[[Any, int], int]:
    """zip's CRC-32 (a storage's, in its archive): ISA-L's (``isal``, ~0.03 CPU-s per GiB here,
    the GIL released) when installed, else zlib's (~0.16 CPU-s per GiB, GIL released too). The
    same CRC either way; a save computes it over every byte it sends from a tensor's memory."""
    try:
        from isal.isal_zlib import crc32 as isal_crc32
    except ImportError:
        return zlib.crc32
    return isal_crc32


crc32: Callable[[Any, int], int] = _crc32_function()
"""``crc32(data, previous)``: the CRC-32 of ``data`` continuing ``previous`` (zlib's form)."""

_EOCD = struct.Struct("<IHHHHIIH")
_EOCD_SIG = 0x06054B50
_ZIP64_LOCATOR_SIG = 0x07064B50
_ZIP64_EOCD_SIG = 0x06064B50
_CDIR = struct.Struct("<IHHHHHHIIIHHHHHII")
_CDIR_SIG = 0x02014B50
_LOCAL = struct.Struct("<IHHHHHIIIHH")
_LOCAL_SIG = 0x04034B50
_DESCRIPTOR_SIG = 0x08074B50
_ZIP64 = 0xFFFFFFFF
_CRC_FIELD = 16  # offset of the CRC-32 in a central directory header
_ID_DIGITS = 20
_MASK64 = (1 << 64) - 1


def _hash_combine(seed: int, value: int) -> int:
    """c10::hash_combine on 64-bit size_t."""
    return (seed ^ ((value + 0x9E3779B9 + ((seed << 6) & _MASK64) + (seed >> 2)) & _MASK64)) & (
        _MASK64
    )


class _Hole(Exception):
    """A read of bytes torch did not write (the storage's hole): not the expected layout."""


class _Capture:
    """A seekable in-memory file for ``torch.save``: the runs of bytes it writes, by offset.
    A seek over the storage (``skip_data``) leaves a hole that costs nothing: no zeros are
    allocated for it (a tensor of 1 GiB would otherwise cost 1 GiB of page faults)."""

    def __init__(self) -> None:
        self.pieces: list[tuple[int, bytearray]] = []
        self.pos = 0
        self.size = 0

    def write(self, data: bytes | memoryview) -> int:
        view = memoryview(data).cast("B")
        last = self.pieces[-1] if self.pieces else None
        if last is not None and last[0] + len(last[1]) == self.pos:
            last[1].extend(view)
        elif self.pos < self.size:
            raise _Hole("torch.save wrote over bytes it had written")
        else:
            self.pieces.append((self.pos, bytearray(view)))
        self.pos += len(view)
        self.size = max(self.size, self.pos)
        return len(view)

    def seek(self, offset: int, whence: int = 0) -> int:
        if whence == 0:
            self.pos = offset
        elif whence == 1:
            self.pos += offset
        else:
            self.pos = self.size + offset
        self.size = max(self.size, self.pos)
        return self.pos

    def tell(self) -> int:
        return self.pos

    def flush(self) -> None:
        pass

    def read(self, start: int, end: int) -> bytes:
        """Bytes ``[start, end)``, which torch wrote in one run (``_Hole`` otherwise)."""
        for at, piece in self.pieces:
            if at <= start and end <= at + len(piece):
                return bytes(piece[start - at : end - at])
        raise _Hole(f"bytes [{start}, {end}) were not written")

    def unpack(self, fmt: struct.Struct | str, offset: int) -> tuple[Any, ...]:
        layout = fmt if isinstance(fmt, struct.Struct) else struct.Struct(fmt)
        return layout.unpack(self.read(offset, offset + layout.size))


@dataclass(frozen=True, slots=True)
class _Record:
    name: str
    local: int
    data: int
    size: int
    crc: int
    directory: int
    """Offset of its central directory header in the archive."""


def _records(archive: _Capture) -> list[_Record] | None:
    """Every record of a zip torch wrote, in write order; None if it is laid out otherwise."""
    total = archive.size
    if total < _EOCD.size:
        return None
    eocd = total - _EOCD.size
    sig, _, _, _, count, cd_size, cd_offset, comment = archive.unpack(_EOCD, eocd)
    if sig != _EOCD_SIG or comment:
        return None
    if cd_offset == _ZIP64 or cd_size == _ZIP64 or count == 0xFFFF:
        locator = eocd - 20
        if locator < 0 or archive.unpack("<I", locator)[0] != _ZIP64_LOCATOR_SIG:
            return None
        (record,) = archive.unpack("<Q", locator + 8)
        if archive.unpack("<I", record)[0] != _ZIP64_EOCD_SIG:
            return None
        count, cd_size, cd_offset = archive.unpack("<QQQ", record + 32)
    records = []
    pos = cd_offset
    for _ in range(count):
        if pos + _CDIR.size > total:
            return None
        fields = archive.unpack(_CDIR, pos)
        if fields[0] != _CDIR_SIG or fields[4] != 0:  # signature; STORED only
            return None
        crc, size, name_len, extra_len, comment_len, local = (
            fields[7],
            fields[9],
            fields[10],
            fields[11],
            fields[12],
            fields[16],
        )
        name_at = pos + _CDIR.size
        name = archive.read(name_at, name_at + name_len).decode("utf-8")
        extra = archive.read(name_at + name_len, name_at + name_len + extra_len)
        if _ZIP64 in (size, local, fields[8]):
            wide = _zip64_fields(extra)
            if wide is None:
                return None
            if size == _ZIP64:
                size = wide.pop(0)
            if fields[8] == _ZIP64:
                wide.pop(0)  # the compressed size (the same, STORED)
            if local == _ZIP64:
                local = wide.pop(0)
        if local + _LOCAL.size > total:
            return None
        header = archive.unpack(_LOCAL, local)
        if header[0] != _LOCAL_SIG:
            return None
        data = local + _LOCAL.size + header[9] + header[10]
        records.append(_Record(name, local, data, size, crc, pos))
        pos += _CDIR.size + name_len + extra_len + comment_len
    return sorted(records, key=lambda r: r.local)


def _zip64_fields(extra: bytes) -> list[int] | None:
    pos = 0
    while pos + 4 <= len(extra):
        tag, length = struct.unpack_from("<HH", extra, pos)
        if tag == 0x0001:
            body = extra[pos + 4 : pos + 4 + length]
            return list(struct.unpack_from(f"<{len(body) // 8}Q", body))
        pos += 4 + length
    return None


def storage_memory(tensor: torch.Tensor) -> memoryview:
    """The bytes of ``tensor``'s storage (CPU), as a view of that memory (no copy). The view
    is valid while the storage lives: keep ``tensor`` alive with it."""
    storage = tensor.untyped_storage()
    nbytes = storage.nbytes()
    if nbytes == 0:
        return memoryview(b"")
    return memoryview((ctypes.c_char * nbytes).from_address(storage.data_ptr())).cast("B")


@dataclass(frozen=True, slots=True)
class TensorArchive:
    """``torch.save(tensor)``'s bytes as prefix + the storage's own memory + ``suffix(crc)``."""

    prefix: bytes
    memory: memoryview
    owner: torch.Tensor
    """The tensor whose storage ``memory`` views (kept alive with it)."""
    _template: bytes
    _id_prefix: bytes
    _crcs_before: tuple[int, ...]
    _crcs_after: tuple[int, ...]
    _descriptor_crc: int
    _directory_crc: int
    _id_at: int
    _id_descriptor_crc: int
    _id_directory_crc: int

    @property
    def length(self) -> int:
        """The archive's size in bytes."""
        return len(self.prefix) + len(self.memory) + len(self._template)

    def suffix(self, crc32: int) -> bytes:
        """The bytes after the storage, for a storage whose CRC-32 is ``crc32``."""
        out = bytearray(self._template)
        struct.pack_into("<I", out, self._descriptor_crc, crc32)
        struct.pack_into("<I", out, self._directory_crc, crc32)
        combined = 0
        for crc in (*self._crcs_before, crc32, *self._crcs_after):
            combined = _hash_combine(combined, crc)
        ident = self._id_prefix + b"%020d" % combined
        out[self._id_at : self._id_at + len(ident)] = ident
        ident_crc = zlib.crc32(ident)
        struct.pack_into("<I", out, self._id_descriptor_crc, ident_crc)
        struct.pack_into("<I", out, self._id_directory_crc, ident_crc)
        return bytes(out)


def tensor_archive(tensor: torch.Tensor) -> TensorArchive | None:
    """The archive ``torch.save(tensor)`` writes, around the storage's own memory; None when it
    is not laid out as expected (stage ``torch.save``'s bytes instead). ``tensor``: on the CPU,
    its storage exactly its bytes (as ``FileSystemWriter`` makes it)."""
    capture = _Capture()
    try:
        with torch.serialization.skip_data():
            torch.save(tensor, capture)  # type: ignore[arg-type]
        records = _records(capture)
        if records is None:
            return None
        return _built(tensor, capture, records)
    except (_Hole, struct.error, UnicodeDecodeError):
        return None


def _built(tensor: torch.Tensor, archive: _Capture, records: list[_Record]) -> TensorArchive | None:
    """The archive from what ``torch.save`` wrote under ``skip_data``, checked."""
    memory = storage_memory(tensor)
    storages = [r for r in records if r.name.split("/", 1)[-1].startswith("data/")]
    ids = [r for r in records if r.name.endswith("/.data/serialization_id")]
    if len(storages) != 1 or len(ids) != 1 or storages[0].size != len(memory):
        return None
    storage, ident = storages[0], ids[0]
    start, end = storage.data, storage.data + storage.size
    if not (
        ident.local >= end
        and storage.crc == 0
        and ident.size == 2 * _ID_DIGITS
        and archive.unpack("<I", end)[0] == _DESCRIPTOR_SIG
        and archive.unpack("<I", ident.data + ident.size)[0] == _DESCRIPTOR_SIG
    ):
        return None
    written = archive.read(ident.data, ident.data + ident.size)
    if not written.isdigit():
        return None
    before = tuple(r.crc for r in records if r.local < storage.local)
    after = tuple(r.crc for r in records if storage.local < r.local < ident.local)
    combined = 0
    for crc in (*before, 0, *after):  # what torch folded: the storage's CRC was left 0
        combined = _hash_combine(combined, crc)
    if combined != int(written[_ID_DIGITS:]):
        return None  # this torch computes the id otherwise: use its own bytes
    return TensorArchive(
        prefix=archive.read(0, start),
        memory=memory,
        owner=tensor,
        _template=archive.read(end, archive.size),
        _id_prefix=written[:_ID_DIGITS],
        _crcs_before=before,
        _crcs_after=after,
        _descriptor_crc=4,
        _directory_crc=storage.directory + _CRC_FIELD - end,
        _id_at=ident.data - end,
        _id_descriptor_crc=ident.data + ident.size + 4 - end,
        _id_directory_crc=ident.directory + _CRC_FIELD - end,
    )
