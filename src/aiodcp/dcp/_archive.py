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
from dataclasses import dataclass

import torch

__all__ = ["TensorArchive", "storage_memory", "tensor_archive"]

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


class _Capture:
    """A seekable in-memory file for ``torch.save``: what it writes, holes where it seeks."""

    def __init__(self) -> None:
        self.buffer = bytearray()
        self.pos = 0

    def write(self, data: bytes | memoryview) -> int:
        view = memoryview(data).cast("B")
        end = self.pos + len(view)
        if end > len(self.buffer):
            self.buffer.extend(bytes(end - len(self.buffer)))
        self.buffer[self.pos : end] = view
        self.pos = end
        return len(view)

    def seek(self, offset: int, whence: int = 0) -> int:
        if whence == 0:
            self.pos = offset
        elif whence == 1:
            self.pos += offset
        else:
            self.pos = len(self.buffer) + offset
        if self.pos > len(self.buffer):
            self.buffer.extend(bytes(self.pos - len(self.buffer)))
        return self.pos

    def tell(self) -> int:
        return self.pos

    def flush(self) -> None:
        pass


@dataclass(frozen=True, slots=True)
class _Record:
    name: str
    local: int
    data: int
    size: int
    crc: int
    directory: int
    """Offset of its central directory header in the archive."""


def _records(archive: bytes | bytearray) -> list[_Record] | None:
    """Every record of a zip torch wrote, in write order; None if it is laid out otherwise."""
    total = len(archive)
    if total < _EOCD.size:
        return None
    eocd = total - _EOCD.size
    sig, _, _, _, count, cd_size, cd_offset, comment = _EOCD.unpack_from(archive, eocd)
    if sig != _EOCD_SIG or comment:
        return None
    if cd_offset == _ZIP64 or cd_size == _ZIP64 or count == 0xFFFF:
        locator = eocd - 20
        if locator < 0 or struct.unpack_from("<I", archive, locator)[0] != _ZIP64_LOCATOR_SIG:
            return None
        (record,) = struct.unpack_from("<Q", archive, locator + 8)
        if struct.unpack_from("<I", archive, record)[0] != _ZIP64_EOCD_SIG:
            return None
        count, cd_size, cd_offset = struct.unpack_from("<QQQ", archive, record + 32)
    records = []
    pos = cd_offset
    for _ in range(count):
        if pos + _CDIR.size > total:
            return None
        fields = _CDIR.unpack_from(archive, pos)
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
        name = bytes(archive[pos + _CDIR.size : pos + _CDIR.size + name_len]).decode("utf-8")
        extra = bytes(
            archive[pos + _CDIR.size + name_len : pos + _CDIR.size + name_len + extra_len]
        )
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
        header = _LOCAL.unpack_from(archive, local)
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
    with torch.serialization.skip_data():
        torch.save(tensor, capture)  # type: ignore[arg-type]
    archive = capture.buffer
    records = _records(archive)
    if records is None:
        return None
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
        and struct.unpack_from("<I", archive, end)[0] == _DESCRIPTOR_SIG
        and struct.unpack_from("<I", archive, ident.data + ident.size)[0] == _DESCRIPTOR_SIG
    ):
        return None
    written = bytes(archive[ident.data : ident.data + ident.size])
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
        prefix=bytes(archive[:start]),
        memory=memory,
        owner=tensor,
        _template=bytes(archive[end:]),
        _id_prefix=written[:_ID_DIGITS],
        _crcs_before=before,
        _crcs_after=after,
        _descriptor_crc=4,
        _directory_crc=storage.directory + _CRC_FIELD - end,
        _id_at=ident.data - end,
        _id_descriptor_crc=ident.data + ident.size + 4 - end,
        _id_directory_crc=ident.directory + _CRC_FIELD - end,
    )
