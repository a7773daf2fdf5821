"""Test helper: checkpoints that carry an integrity record, made without aiodcp's writer.

``upload_with_record`` uploads a checkpoint torch's ``FileSystemWriter`` saved (data files
first, with boto3, taking the ETags the store answers), computes from the files' own bytes the
record aiodcp's writer attaches (``dcp._integrity``: per file its ETag, size and CRC64NVME, per
stored item the CRC64NVME of each block from its first byte), attaches it to the ``.metadata``
and uploads that last. The record is computed independently of the load path under test (one
``crc64nvme`` call per block of the file's bytes), so a load that checks against it checks
against what was saved.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

from aiodcp._checksum import crc64nvme
from aiodcp.dcp._integrity import DEFAULT_BLOCK_BYTES, FileRecord, Integrity

__all__ = ["record_of", "upload_with_record"]


def record_of(
    local: Path, etags: dict[str, str], block_bytes: int = DEFAULT_BLOCK_BYTES
) -> Integrity:
    """The integrity record of the checkpoint in ``local`` whose data files the store answered
    with ``etags`` (relative path -> ETag)."""
    metadata = pickle.loads((local / ".metadata").read_bytes())
    files = {}
    data: dict[str, bytes] = {}
    for path, etag in etags.items():
        data[path] = (local / path).read_bytes()
        files[path] = FileRecord(etag, len(data[path]), crc64nvme(data[path]))
    items: dict[tuple[str, int, int], tuple[int, ...]] = {}
    for info in metadata.storage_data.values():
        raw = data[info.relative_path][info.offset : info.offset + info.length]
        crcs = tuple(
            crc64nvme(raw[at : at + block_bytes]) for at in range(0, max(len(raw), 1), block_bytes)
        )
        items[(info.relative_path, info.offset, info.length)] = crcs
    return Integrity(block_bytes, files, items)


def upload_with_record(
    s3: Any,
    local: Path,
    bucket: str,
    prefix: str,
    *,
    block_bytes: int = DEFAULT_BLOCK_BYTES,
    change: Any = None,
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
    record = record_of(local, etags, block_bytes)
    metadata = pickle.loads((local / ".metadata").read_bytes())
    record.attach(metadata)
    if change is not None:
        change(metadata.aiodcp_integrity)
    s3.put_object(Bucket=bucket, Key=f"{prefix}/.metadata", Body=pickle.dumps(metadata))
    return record
