"""What a checkpoint records for integrity, and where: ``Integrity`` in DCP's ``.metadata``.

A checkpoint saved by aiodcp records, for every data file, the ETag S3 gave it, its size and its
CRC64NVME (the full-object checksum S3 verified on receipt), and for every stored item where its
tensor's storage bytes begin (``data_start``: the length of ``torch.save``'s framing before
them; 0 for an item that is not such an archive) and the CRC64NVME of each of its blocks: block
0 is the framing, ``[0, data_start)``, then a block every ``block_bytes`` from ``data_start``, the
last one ending with the item (``_verify``'s module docstring). A load pins every GET of a data
file to its recorded ETag (``If-Match`` from the first request) and checks every block it
receives against its CRC before torch sees a byte; a slice of an item is checked by the blocks
it covers, so a load that fetches only runs of an item still verifies every byte it hands over,
and because the blocks are aligned on the storage bytes, a dim-0 slice whose rows split on a
``block_bytes`` boundary is whole blocks by itself (nothing more is fetched to check it).

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
     "items": {relative_path: ((offset, length, data_start, crcs), ...)}}
                                                        crcs: packed little-endian u64
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

from .._checksum import ALGORITHM
from .._errors import CheckpointFormatError
from .._verify import BlockCheck, block_count

__all__ = [
    "ATTRIBUTE",
    "DEFAULT_BLOCK_BYTES",
    "FileRecord",
    "Integrity",
    "ItemBlocks",
    "block_count",
]

ATTRIBUTE = "aiodcp_integrity"
"""The ``Metadata`` attribute that holds the record (plain data)."""

VERSION = 1

DEFAULT_BLOCK_BYTES = 1024 * 1024
"""Bytes per checksum block of an item (1 MiB): a slice is verified by the whole blocks it
touches, so this bounds the extra bytes a verified slice fetches (at most one block at each end
of a run, none for a run that starts and ends on block boundaries of the storage bytes); the
record costs 8 bytes per block (8 MiB of metadata per TiB of checkpoint)."""

_MIN_BLOCK_BYTES = 4096


class FileRecord(NamedTuple):
    """One data file as it was saved."""

    etag: str
    """The ETag the store answered the upload with (quotes included, as S3 sends it)."""
    size: int
    crc64nvme: int
    """CRC64NVME of the whole object (S3's full-object checksum)."""


class ItemBlocks(NamedTuple):
    """What the record holds for one stored item: where its storage bytes begin, and the
    CRC64NVME of each of its blocks (``block_count(length, block_bytes, data_start)``)."""

    data_start: int
    crcs: tuple[int, ...]


class Integrity(NamedTuple):
    """The integrity record of one checkpoint (see the module docstring)."""

    block_bytes: int
    files: Mapping[str, FileRecord]
    """relative path (as in ``_StorageInfo.relative_path``) -> the file as saved."""
    items: Mapping[tuple[str, int, int], ItemBlocks]
    """(relative path, offset, length) of a stored item -> where its storage bytes begin and
    the CRC64NVME of each of its blocks, in order (see the module docstring)."""

    def item(self, relative_path: str, offset: int, length: int) -> ItemBlocks | None:
        """The record of the stored item at ``[offset, offset + length)`` of the file, or None
        if the record does not cover it."""
        return self.items.get((relative_path, offset, length))

    def check(
        self, relative_path: str, offset: int, length: int, where: str, what: str = ""
    ) -> BlockCheck:
        """The ``BlockCheck`` of the stored item at ``[offset, offset + length)`` of the file
        (``what`` names it in errors); ``CheckpointFormatError`` naming ``where`` (the data
        file) if the record does not cover it: the record and the metadata disagree."""
        blocks = self.items.get((relative_path, offset, length))
        if blocks is None:
            raise CheckpointFormatError(
                f"{where}: the checkpoint's integrity record ({ATTRIBUTE}) has no checksums for "
                f"the stored item [{offset}, {offset + length}){f' of {what}' if what else ''} "
                "that its metadata lists: the record and the metadata disagree (damaged, or "
                "edited by another tool). verify_checksums=False loads it without checking.",
            )
        return BlockCheck(offset, length, self.block_bytes, blocks.crcs, what, blocks.data_start)

    def etags(self, key_of: Callable[[str], str]) -> dict[str, str]:
        """Object key (``key_of(relative path)``) -> the ETag the data file was saved with:
        what every GET of it is pinned to (``If-Match``)."""
        return {key_of(path): record.etag for path, record in self.files.items()}

    # ------------------------------------------------------------------ plain form

    def to_plain(self) -> dict[str, Any]:
        per_file: dict[str, list[tuple[int, int, int, bytes]]] = {}
        for (path, offset, length), blocks in sorted(self.items.items()):
            packed = struct.pack(f"<{len(blocks.crcs)}Q", *blocks.crcs)
            per_file.setdefault(path, []).append((offset, length, blocks.data_start, packed))
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
        items: dict[tuple[str, int, int], ItemBlocks] = {}
        for path, entries in raw_items.items():
            if not isinstance(path, str) or not isinstance(entries, tuple):
                raise bad(f"items of {path!r}")
            for entry in entries:
                if not (
                    isinstance(entry, tuple)
                    and len(entry) == 4
                    and all(isinstance(v, int) and v >= 0 for v in entry[:3])
                    and isinstance(entry[3], bytes)
                ):
                    raise bad(f"an item entry of {path!r}")
                offset, length, data_start, packed = entry
                if data_start and data_start >= length:
                    raise bad(
                        f"item [{offset}, {offset + length}) of {path!r} has its storage bytes "
                        f"at {data_start}, past its end"
                    )
                count = block_count(length, block_bytes, data_start)
                if len(packed) != 8 * count:
                    raise bad(
                        f"item [{offset}, {offset + length}) of {path!r} has "
                        f"{len(packed) // 8} block checksums, expected {count}"
                    )
                items[(path, offset, length)] = ItemBlocks(
                    data_start, struct.unpack(f"<{count}Q", packed)
                )
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
