"""What a checkpoint records for integrity, and where: ``Integrity`` in DCP's ``.metadata``.

A checkpoint saved by aiodcp records, for every data file, the ETag S3 gave it, its size and its
CRC64NVME (the full-object checksum S3 verified on receipt), and for every stored item the
CRC64NVME of each ``block_bytes`` block of its bytes (from the item's first byte; the last block
may be shorter). A load pins every GET of a data file to its recorded ETag (``If-Match`` from the
first request) and checks every block it receives against its CRC before torch sees a byte; a
slice of an item is checked by the blocks it covers, so a load that fetches only runs of an item
still verifies every byte it hands over.

Where it lives: an attribute of the pickled ``Metadata`` (``aiodcp_integrity``) holding plain data
only (dicts, tuples, ints, strings, bytes), so stock readers (torch's ``FileSystemReader``,
s3torchconnector's readers), which unpickle ``Metadata`` and look items up in ``storage_data``,
load the checkpoint as if it were not there, and the restricted unpickler (``_metadata``) needs no
class of ours. It is committed with the ``.metadata`` it describes (one object, one conditional
write), so a record never describes another version of the files than the metadata's.

Data flow::

    save:  Integrity(block_bytes, files, items).attach(metadata)   before pickling .metadata
    load:  Integrity.of(metadata, where) -> Integrity | None        after the restricted unpickle
           (None: a checkpoint saved by another writer; CheckpointFormatError: a malformed record)
           .check(path, offset, length, ...) -> _verify.BlockCheck   what the engine checks
           .etags(key_of) -> {key: ETag}                             what every GET pins to

The plain form (version 1)::

    {"version": 1, "algorithm": "CRC64NVME", "block_bytes": int,
     "files": {relative_path: (etag, size, crc)},
     "items": {relative_path: ((offset, length, crcs), ...)}}    crcs: packed little-endian u64
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from .._checksum import ALGORITHM
from .._errors import CheckpointFormatError
from .._verify import BlockCheck

__all__ = ["ATTRIBUTE", "DEFAULT_BLOCK_BYTES", "FileRecord", "Integrity", "block_count"]

ATTRIBUTE = "aiodcp_integrity"
"""The ``Metadata`` attribute that holds the record (plain data)."""

VERSION = 1

DEFAULT_BLOCK_BYTES = 1024 * 1024
"""Bytes per checksum block of an item (1 MiB): a slice is verified by the whole blocks it
touches, so this bounds the extra bytes a verified slice fetches (at most one block at each end
of a run); the record costs 8 bytes per block (8 MiB of metadata per TiB of checkpoint)."""

_MIN_BLOCK_BYTES = 4096


@dataclass(frozen=True, slots=True)
class FileRecord:
    """One data file as it was saved."""

    etag: str
    """The ETag the store answered the upload with (quotes included, as S3 sends it)."""
    size: int
    crc64nvme: int
    """CRC64NVME of the whole object (S3's full-object checksum)."""


def block_count(length: int, block_bytes: int) -> int:
    """Blocks of ``block_bytes`` that an item of ``length`` bytes is checked in (>= 1)."""
    return max(1, -(-length // block_bytes))


@dataclass(frozen=True)
class Integrity:
    """The integrity record of one checkpoint (see the module docstring)."""

    block_bytes: int
    files: Mapping[str, FileRecord]
    """relative path (as in ``_StorageInfo.relative_path``) -> the file as saved."""
    items: Mapping[tuple[str, int, int], tuple[int, ...]]
    """(relative path, offset, length) of a stored item -> the CRC64NVME of each of its
    ``block_bytes`` blocks, in order (one CRC for an item of one block or less)."""

    def block_crcs(self, relative_path: str, offset: int, length: int) -> tuple[int, ...] | None:
        """The blocks' CRCs of the stored item at ``[offset, offset + length)`` of the file, or
        None if the record does not cover it."""
        return self.items.get((relative_path, offset, length))

    def check(
        self, relative_path: str, offset: int, length: int, where: str, what: str = ""
    ) -> BlockCheck:
        """The ``BlockCheck`` of the stored item at ``[offset, offset + length)`` of the file
        (``what`` names it in errors); ``CheckpointFormatError`` naming ``where`` (the data
        file) if the record does not cover it: the record and the metadata disagree."""
        crcs = self.items.get((relative_path, offset, length))
        if crcs is None:
            raise CheckpointFormatError(
                f"{where}: the checkpoint's integrity record ({ATTRIBUTE}) has no checksums for "
                f"the stored item [{offset}, {offset + length}){f' of {what}' if what else ''} "
                "that its metadata lists: the record and the metadata disagree (damaged, or "
                "edited by another tool). verify_checksums=False loads it without checking.",
            )
        return BlockCheck(offset, length, self.block_bytes, crcs, what)

    def etags(self, key_of: Callable[[str], str]) -> dict[str, str]:
        """Object key (``key_of(relative path)``) -> the ETag the data file was saved with:
        what every GET of it is pinned to (``If-Match``)."""
        return {key_of(path): record.etag for path, record in self.files.items()}

    # ------------------------------------------------------------------ plain form

    def to_plain(self) -> dict[str, Any]:
        per_file: dict[str, list[tuple[int, int, bytes]]] = {}
        for (path, offset, length), crcs in sorted(self.items.items()):
            packed = struct.pack(f"<{len(crcs)}Q", *crcs)
            per_file.setdefault(path, []).append((offset, length, packed))
        return {
            "version": VERSION,
            "algorithm": ALGORITHM,
            "block_bytes": self.block_bytes,
            "files": {p: (f.etag, f.size, f.crc64nvme) for p, f in sorted(self.files.items())},
            "items": {p: tuple(entries) for p, entries in per_file.items()},
        }

    @classmethod
    def from_plain(cls, plain: object, where: str) -> Integrity:
        """Check every field of a plain record, then build it (``CheckpointFormatError`` naming
        ``where`` and the first field that is wrong)."""

        def bad(what: str) -> CheckpointFormatError:
            return CheckpointFormatError(
                f"{where}: its integrity record ({ATTRIBUTE}) is malformed: {what}; the "
                "checkpoint's metadata was damaged or written by an incompatible tool "
                "(verify=False loads it without checking)",
            )

        if not isinstance(plain, dict):
            raise bad(f"a {type(plain).__name__}, not a dict")
        if plain.get("version") != VERSION:
            raise bad(
                f"version {plain.get('version')!r}; this aiodcp reads version {VERSION} "
                "(upgrade aiodcp to read newer checkpoints' records)"
            )
        if plain.get("algorithm") != ALGORITHM:
            raise bad(f"algorithm {plain.get('algorithm')!r}, expected {ALGORITHM!r}")
        block_bytes = plain.get("block_bytes")
        if not isinstance(block_bytes, int) or block_bytes < _MIN_BLOCK_BYTES:
            raise bad(f"block_bytes {block_bytes!r}")
        raw_files, raw_items = plain.get("files"), plain.get("items")
        if not isinstance(raw_files, dict) or not isinstance(raw_items, dict):
            raise bad("files and items must be dicts")
        files: dict[str, FileRecord] = {}
        for path, entry in raw_files.items():
            if not (
                isinstance(path, str)
                and isinstance(entry, tuple)
                and len(entry) == 3
                and isinstance(entry[0], str)
                and all(isinstance(v, int) and v >= 0 for v in entry[1:])
            ):
                raise bad(f"file entry {path!r}: {entry!r}")
            files[path] = FileRecord(entry[0], entry[1], entry[2])
        items: dict[tuple[str, int, int], tuple[int, ...]] = {}
        for path, entries in raw_items.items():
            if not isinstance(path, str) or not isinstance(entries, tuple):
                raise bad(f"items of {path!r}")
            for entry in entries:
                if not (
                    isinstance(entry, tuple)
                    and len(entry) == 3
                    and isinstance(entry[0], int)
                    and isinstance(entry[1], int)
                    and isinstance(entry[2], bytes)
                    and entry[0] >= 0
                    and entry[1] >= 0
                ):
                    raise bad(f"an item entry of {path!r}")
                offset, length, packed = entry
                count = block_count(length, block_bytes)
                if len(packed) != 8 * count:
                    raise bad(
                        f"item [{offset}, {offset + length}) of {path!r} has "
                        f"{len(packed) // 8} block checksums, expected {count}"
                    )
                items[(path, offset, length)] = struct.unpack(f"<{count}Q", packed)
        return cls(block_bytes, files, items)

    # ------------------------------------------------------------------ in Metadata

    def attach(self, metadata: Any) -> None:
        """Record this in ``metadata`` (before it is pickled)."""
        setattr(metadata, ATTRIBUTE, self.to_plain())

    @classmethod
    def of(cls, metadata: Any, where: str) -> Integrity | None:
        """The record of ``metadata`` (read from ``where``), or None if it has none."""
        plain = getattr(metadata, ATTRIBUTE, None)
        if plain is None:
            return None
        return cls.from_plain(plain, where)
