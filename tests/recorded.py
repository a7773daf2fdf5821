"""Test helper: checkpoints that carry an integrity record, made without aiodcp's writer.

``upload_with_record`` uploads a checkpoint torch's ``FileSystemWriter`` saved (data files
first, with boto3, taking the ETags the store answers), computes from the files' own bytes the
record aiodcp's writer attaches (``dcp._integrity``: per file its ETag, size and CRC64NVME, per
stored item where its tensor's storage bytes begin and the CRC64NVME of each block: the framing
before them, then 1 MiB blocks from them), attaches it to the ``.metadata`` and uploads that
last. The record is computed independently of the code under test (the storage bytes found
with the standard library's ``zipfile``, one ``crc64nvme`` call per block of the file's bytes),
so a load that checks against it checks against what was saved.
"""

from __future__ import annotations

import io
import pickle
import struct
import zipfile
from pathlib import Path
from typing import Any

from aiodcp._checksum import crc64nvme
from aiodcp.dcp._integrity import DEFAULT_BLOCK_BYTES, FileRecord, Integrity, ItemBlocks

__all__ = ["blocks_of", "data_start_of", "record_of", "upload_with_record"]


def data_start_of(raw: bytes) -> int:
    """Where the storage bytes of the ``torch.save`` archive ``raw`` begin (the data of its one
    ``*/data/<n>`` entry, past that entry's local header), found with ``zipfile``; 0 for bytes
    that are not such an archive (a pickled value)."""
    try:
        with zipfile.ZipFile(io.BytesIO(raw)) as archive:
            storages = [i for i in archive.infolist() if "/data/" in i.filename]
    except zipfile.BadZipFile:
        return 0
    if len(storages) != 1:
        return 0
    at = storages[0].header_offset
    name_length, extra_length = struct.unpack("<HH", raw[at + 26 : at + 30])
    return at + 30 + name_length + extra_length


def blocks_of(raw: bytes, block_bytes: int, data_start: int) -> list[bytes]:
    """The record's blocks of an item: ``[0, data_start)`` if not empty, then ``block_bytes``
    blocks from ``data_start`` (the last one ending with the item)."""
    blocks = [raw[:data_start]] if data_start else []
    body = raw[data_start:]
    blocks += [body[at : at + block_bytes] for at in range(0, max(len(body), 1), block_bytes)]
    return blocks


def record_of(
    local: Path,
    etags: dict[str, str],
    block_bytes: int = DEFAULT_BLOCK_BYTES,
    *,
    aligned: bool = True,
) -> Integrity:
    """The integrity record of the checkpoint in ``local`` whose data files the store answered
    with ``etags`` (relative path -> ETag); ``aligned=False``: every item's blocks from its
    first byte (``data_start`` 0, what a writer that does not mark the storage records)."""
    metadata = pickle.loads((local / ".metadata").read_bytes())
    files = {}
    data: dict[str, bytes] = {}
    for path, etag in etags.items():
        data[path] = (local / path).read_bytes()
        files[path] = FileRecord(etag, len(data[path]), crc64nvme(data[path]))
    items: dict[tuple[str, int, int], ItemBlocks] = {}
    for info in metadata.storage_data.values():
        raw = data[info.relative_path][info.offset : info.offset + info.length]
        data_start = data_start_of(raw) if aligned else 0
        crcs = tuple(crc64nvme(block) for block in blocks_of(raw, block_bytes, data_start))
        items[(info.relative_path, info.offset, info.length)] = ItemBlocks(data_start, crcs)
    return Integrity(block_bytes, files, items)


def upload_with_record(
    s3: Any,
    local: Path,
    bucket: str,
    prefix: str,
    *,
    block_bytes: int = DEFAULT_BLOCK_BYTES,
    change: Any = None,
    aligned: bool = True,
) -> Integrity:
    """Upload the checkpoint in ``local`` to ``s3://bucket/prefix`` with its integrity record
    attached to ``.metadata`` (uploaded last); returns the record. ``change(plain)``, if given,
    edits the record's plain form before it is attached (a malformed record)."""
    etags: dict[str, str] = {}
    for path in sorted(local.iterdir()):
        if path.name == ".metadata":
            continue
        response = s3.put_object(Bucket=bucket, Key=f"{prefix}/{path.name}", Body=path.read_bytes())
        etags[path.name] = response["ETag"]
    record = record_of(local, etags, block_bytes, aligned=aligned)
    metadata = pickle.loads((local / ".metadata").read_bytes())
    record.attach(metadata)
    if change is not None:
        change(metadata.aiodcp_integrity)
    s3.put_object(Bucket=bucket, Key=f"{prefix}/.metadata", Body=pickle.dumps(metadata))
    return record
