"""``aiodcp verify``: read every stored byte of a checkpoint and check it against its record.

A load checks what it loads and stops at the first item that stays damaged; an audit reads
every byte of every data file and reports everything that does not match, file by file, so a
checkpoint can be checked before it is needed (or after a copy) without loading it.

Data flow, per data file (path order)::

    the integrity record (dcp._integrity) -> the file's size, ETag, CRC64NVME, and each
        stored item's block CRCs (no record: a HEAD's size, ETag and full-object CRC64NVME)
    ranges tiling [0, size): the stored items, and the bytes between them (none in a file
        torch wrote) -> _planner.plan_file -> a FetchEngine of its own (GETs pinned to the
        recorded ETag, within the memory budget, the usual retries)
    in file order, as they arrive: each stored item's blocks against the record
        (``BlockCheck.mismatches``, every block, not only the first); every range's CRC
        combined into the file's, against the recorded full-object CRC64NVME
    -> FileAudit(status, mismatched items) ; a file that is gone, replaced since the save
       (412 on the recorded ETag) or shorter is reported so, and the audit goes on

Nothing is retried on a mismatch (a load does that): what an audit reports is what one read
of the store gave; run it again to tell a damaged object from a damaged transfer.

Checkpoints without a record: each data file is HEADed for the store's full-object checksum
(``x-amz-checksum-mode``): CRC64NVME (S3 gives every object one unless it was uploaded with
another algorithm), CRC32 or CRC32C (awscrt), SHA-256 or SHA-1 (hashlib), whichever the store
reports (``_checksum.full_object_checksum(..., WHOLE_READ_HEADERS)``); the file is read whole,
pinned to that HEAD's ETag, in file order, its checksum computed as the bytes arrive
(``_checksum.Digest``) and compared: ``ok`` or ``mismatch`` (which item cannot be told), with
the algorithm named (``FileAudit.algorithm``). A file the store holds no such checksum for is
``unverified``: a store that keeps none, or a composite checksum (a multipart upload's
checksum of its parts' checksums, ``-<parts>``), which no read of the whole file can check (the
CLI exits with its own code for that).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from .._checksum import (
    WHOLE_READ_HEADERS,
    Digest,
    combine,
    composite_checksum,
    full_object_checksum,
)
from .._config import ReaderConfig
from .._engine import FetchEngine, FileFetch
from .._errors import (
    NotFoundError,
    ObjectChangedError,
    TruncatedObjectError,
)
from .._planner import ItemRange, plan_file
from .._stats import StatsRecorder
from .._store import WriteRequest
from .._verify import crcs_of
from ._integrity import Integrity

if TYPE_CHECKING:
    from .._driver import Driver
    from .._path import CheckpointPath
    from .._store import S3Store

__all__ = ["FileAudit", "ItemMismatch", "audit_checkpoint"]

logger = logging.getLogger(__name__)

OK = "ok"
MISMATCH = "mismatch"
MISSING = "missing"
CHANGED = "changed"
TRUNCATED = "truncated"
UNVERIFIED = "unverified"
FAILED = {MISMATCH, MISSING, CHANGED, TRUNCATED}
"""File statuses that mean: the stored bytes are not the ones the checkpoint recorded."""


@dataclasses.dataclass(frozen=True, slots=True)
class ItemMismatch:
    """A stored item (``[start, end)`` of its file, holding ``keys``) whose recorded block
    CRCs differ from the bytes read: ``blocks`` are the file offsets of the blocks that do."""

    start: int
    end: int
    keys: tuple[str, ...]
    blocks: tuple[tuple[int, int], ...]


@dataclasses.dataclass(frozen=True, slots=True)
class FileAudit:
    """What an audit found for one data file."""

    path: str
    key: str
    size: int
    """Bytes recorded (or, without a record, up to the end of its last stored item)."""
    status: str
    """``ok``, ``mismatch`` (some bytes differ), ``missing`` (no such object), ``changed``
    (replaced since the save: its ETag is not the recorded one), ``truncated`` (shorter than
    recorded), or ``unverified`` (nothing recorded to check it against)."""
    items: int
    checked_bytes: int = 0
    mismatches: tuple[ItemMismatch, ...] = ()
    whole_crc_matches: bool | None = None
    """The whole file's checksum against the recorded one, or the store's (None: not read
    whole)."""
    detail: str = ""
    algorithm: str | None = None
    """The whole-file checksum it was checked against: ``CRC64NVME`` (the record's, or the
    store's), ``CRC32``, ``CRC32C``, ``SHA256`` or ``SHA1`` (the store's); None: unchecked."""


async def _opened(store: S3Store) -> S3Store:
    return store


def audit_checkpoint(
    metadata: Any,
    path: CheckpointPath,
    config: ReaderConfig,
    driver: Driver,
    integrity: Integrity | None,
    recorder: StatsRecorder | None = None,
) -> list[FileAudit]:
    """Audit every data file of the checkpoint (see the module docstring); blocking."""
    recorder = recorder if recorder is not None else StatsRecorder()
    per_file: dict[str, dict[tuple[int, int], list[str]]] = {}
    for index, info in metadata.storage_data.items():
        keys = per_file.setdefault(info.relative_path, {})
        keys.setdefault((info.offset, info.offset + info.length), []).append(index.fqn)
    audits = []
    for relative_path in sorted(per_file):
        items = per_file[relative_path]
        key = path.key(relative_path)
        record = None if integrity is None else integrity.files.get(relative_path)
        if integrity is not None and record is not None:
            audits.append(
                _audit_file(
                    path.bucket,
                    relative_path,
                    key,
                    items,
                    (record.size, record.etag, record.crc64nvme),
                    "CRC64NVME",
                    integrity,
                    config,
                    driver,
                    recorder,
                )
            )
            continue
        size = max((end for _, end in items), default=0)
        if integrity is not None:
            why = "the checkpoint's integrity record does not list this file"
            audits.append(FileAudit(relative_path, key, size, UNVERIFIED, len(items), detail=why))
            continue
        audits.append(
            _audit_against_store(path.bucket, relative_path, key, items, config, driver, recorder)
        )
    return audits


def _audit_against_store(
    bucket: str,
    relative_path: str,
    key: str,
    items: dict[tuple[int, int], list[str]],
    config: ReaderConfig,
    driver: Driver,
    recorder: StatsRecorder,
) -> FileAudit:
    """A file of a checkpoint without a record: read whole and checked against the store's
    full-object checksum (a HEAD with ``x-amz-checksum-mode``), when it has one that a read
    can check."""
    size = max((end for _, end in items), default=0)
    base = FileAudit(relative_path, key, size, UNVERIFIED, len(items))

    async def head(store: S3Store) -> Any:
        async def attempt_once(attempt: int) -> Any:
            return await store.send_write(WriteRequest("head_object", bucket, key))

        return await store.retrying(attempt_once, what=f"HEAD s3://{bucket}/{key}")

    try:
        reply = driver.run(head)
    except NotFoundError as exc:
        return dataclasses.replace(base, status=MISSING, detail=str(exc))
    full = full_object_checksum(reply.checksum_headers, WHOLE_READ_HEADERS)
    if full is None or reply.size is None:
        composite = composite_checksum(reply.checksum_headers)
        if composite is not None:
            why = (
                f"cannot check: the checkpoint records no checksums, and the store holds only a "
                f"composite {composite} for this file (a multipart upload's checksum of its "
                "parts' checksums), which no read of the whole file can check"
            )
        else:
            why = (
                "the checkpoint records no checksums, and the store holds no full-object "
                "checksum for this file (a store that keeps none)"
            )
        return dataclasses.replace(base, detail=why)
    algorithm, value = full
    expected = (reply.size, reply.etag, value)
    return _audit_file(
        bucket, relative_path, key, items, expected, algorithm, None, config, driver, recorder
    )


def _tiling(items: Sequence[tuple[int, int]], size: int) -> list[ItemRange]:
    """The stored items and the bytes between (and after) them, covering ``[0, size)``."""
    ranges: list[ItemRange] = []
    at = 0
    for start, end in sorted(items):
        if start > at:
            ranges.append(ItemRange(at, start))
        if end > start and start >= at:
            ranges.append(ItemRange(start, end))
            at = end
    if size > at:
        ranges.append(ItemRange(at, size))
    return ranges


def _audit_file(
    bucket: str,
    relative_path: str,
    key: str,
    items: dict[tuple[int, int], list[str]],
    expected: tuple[int, str | None, int],
    algorithm: str,
    integrity: Integrity | None,
    config: ReaderConfig,
    driver: Driver,
    recorder: StatsRecorder,
) -> FileAudit:
    """Read a file whole (pinned to ``expected``'s ETag) and check it against ``expected``'s
    size and whole-file checksum (``algorithm``; CRC64NVME with a record, whose blocks' CRCs
    combine into it), and each stored item against ``integrity``'s blocks when there is a
    record."""
    size, etag, file_crc = expected
    base = FileAudit(relative_path, key, size, OK, len(items), algorithm=algorithm)
    if any(end > size for _, end in items):
        return dataclasses.replace(
            base,
            status=MISMATCH,
            detail=f"the metadata places items past the file's size ({size} bytes)",
        )
    ranges = _tiling(list(items), size)
    if not ranges:
        return base
    plan = plan_file(ranges, max_gap_size=0, part_size=config.buffered_part_size)
    engine = FetchEngine(
        driver.run(_opened),
        bucket,
        [FileFetch(key, plan)],
        config.replace(verify_checksums=False),  # checked here: every block, no second fetch
        recorder,
        None if etag is None else {key: etag},
        (key,) if integrity is not None else (),
    )

    async def run(store: S3Store) -> None:
        await engine.run()

    future = driver.submit(run)
    mismatches: list[ItemMismatch] = []
    crc = 0
    checked = 0
    # without a record, the store's checksum of the bytes in file order (any algorithm)
    digest = Digest(algorithm) if integrity is None else None
    try:
        for index, item_range in enumerate(plan.items):
            buffer = engine.wait_item(0, index)
            start, end = item_range.start, item_range.end
            keys = items.get((start, end))
            if digest is not None:
                for chunk in buffer.chunks:
                    digest.update(chunk)
                checked += end - start
                engine.release_item(0, index)
                continue
            if keys is None or integrity is None:  # only in the file's CRC
                crcs = [(start, end, crcs_of(buffer.chunks, [end - start])[0])]
            else:
                check = integrity.check(relative_path, start, end - start, key)
                crcs = check.block_crcs(start, buffer.chunks)
                bad = tuple(
                    (lo, hi)
                    for (lo, hi, got), want in zip(crcs, check.crcs, strict=True)
                    if got != want
                )
                if bad:
                    mismatches.append(ItemMismatch(start, end, tuple(sorted(keys)), bad))
            for lo, hi, part_crc in crcs:
                crc = combine(crc, part_crc, hi - lo) if checked else part_crc
                checked += hi - lo
            engine.release_item(0, index)
    except NotFoundError as exc:
        return dataclasses.replace(base, status=MISSING, detail=str(exc))
    except ObjectChangedError as exc:
        return dataclasses.replace(base, status=CHANGED, detail=str(exc))
    except TruncatedObjectError as exc:
        return dataclasses.replace(base, status=TRUNCATED, detail=str(exc))
    finally:
        engine.abort()  # a no-op once everything arrived
        try:
            future.result()
        except BaseException:
            pass  # raised above through wait_item
    if digest is not None:
        crc = digest.value()
    whole = checked == size and crc == file_crc
    status = MISMATCH if mismatches or not whole else OK
    detail = ""
    if not whole and not mismatches:
        detail = (
            "the file's CRC64NVME differs from the recorded one (bytes outside items)"
            if integrity is not None
            else f"the file's {algorithm} differs from the store's full-object {algorithm} (the "
            "checkpoint records no per-item checksums to tell which item)"
        )
    return dataclasses.replace(
        base,
        status=status,
        checked_bytes=checked,
        mismatches=tuple(mismatches),
        whole_crc_matches=whole,
        detail=detail,
    )
