"""The upload engine: a save's data files as PUTs and multipart uploads, many parts in flight.

The inverse of the fetch engine (``_engine``), on the same store (``S3Store``: connections,
signing, credentials, its one retry policy ``retrying`` and request rate ``limiter``) and the
same byte budget (``_budget.ByteBudget``). Torch-agnostic: it moves views of memory.

Data flow::

    the save's thread (dcp/_save.py), file after file, item after item:
        FileStream(key, part_size).add(view, staged)      the file's bytes as views (a tensor's
                                                          own memory, or a staged buffer), cut
                                                          into Parts of part_size; every byte's
                                                          CRC64NVME computed once, per piece, and
                                                          combined into its part's CRC, its
                                                          item's 1 MiB block CRCs and the file's
                                                          full-object CRC
            -> Part(number, offset, views, length, crc, staged)
        staged memory is reserved first (UploadEngine.reserve, from the byte budget)
    the I/O loop (each call submitted by that thread, at most max_concurrency in flight):
        UploadEngine.put(key, part)          a file of one part: one PUT with its CRC
        UploadEngine.send_part(key, part)    a larger file's part: its multipart upload is
                                             created by its first part (FULL_OBJECT CRC64NVME)
                                             and the others wait for it; then UploadPart with
                                             the part's CRC
        UploadEngine.complete(key, ...)      waits for the file's parts, then
                                             CompleteMultipartUpload with every part's ETag
                                             and CRC and the combined CRC
            -> ObjectRecord(key, etag, size, crc)
        each request: the store's retry policy (backoff, give-up error), a part sent again
        from the same views (never serialised again), the request rate lowered on SlowDown;
        a part's staged memory goes back to the budget once its request ended
    cleanup() (the save failed or was cancelled): no new upload is created, every multipart
        upload this engine opened (or was opening) is aborted and every object it sent is
        deleted, so a failed save leaves neither open uploads nor data files.

Invariants: S3's limits hold for every file (parts of 5 MiB..5 GiB but the last, at most 10,000
of them: ``part_size_for`` grows the part of a file that would need more); a byte's CRC is
computed from the memory it is sent from, once; nothing is re-read.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field

from ._budget import ByteBudget
from ._checksum import combine, crc64nvme, need_combine
from ._config import MAX_UPLOAD_PART_SIZE_BYTES, WriterConfig
from ._errors import AiodcpError, ConfigError, SaveCancelledError
from ._stats import SaveRecorder
from ._store import S3Store, WriteReply, WriteRequest, is_throttling

__all__ = [
    "MAX_PARTS",
    "FileStream",
    "ObjectRecord",
    "Part",
    "Staged",
    "UploadEngine",
    "part_size_for",
]

logger = logging.getLogger(__name__)

MAX_PARTS = 10_000
"""S3's most parts in one multipart upload."""
_PARTS_PLANNED = 9_000
"""Parts a file is planned for at most: headroom for the bytes not known when its part size
is chosen (non-tensor values are pickled as they are reached)."""
_MIB = 1024 * 1024
_HOLDERS = threading.Lock()
"""Guards ``Staged.holders``: parts take a staged buffer on the save's thread and give it
back on the loop."""


def part_size_for(size_hint: int, part_size: int) -> int:
    """The part size of a data file of about ``size_hint`` bytes: ``part_size``, or whole MiB
    large enough for ``_PARTS_PLANNED`` parts (at most S3's 5 GiB)."""
    needed = -(-size_hint // _PARTS_PLANNED)
    if needed <= part_size:
        return part_size
    grown = -(-needed // _MIB) * _MIB
    if grown > MAX_UPLOAD_PART_SIZE_BYTES:
        raise ConfigError(
            f"a data file of {size_hint} bytes needs parts over S3's 5 GiB limit; raise "
            "files_per_rank so that each file stays under ~45 TiB",
            field="files_per_rank",
            value=size_hint,
        )
    return grown


@dataclass(eq=False)
class Staged:
    """Memory copied for a save (a small item's archive, a non-tensor value, a clone): counted
    in the byte budget until every part holding a piece of it was sent (``holders``)."""

    nbytes: int
    buffer: object = None
    """What keeps the memory alive (the views sent point into it)."""
    holders: int = 0


@dataclass(eq=False)
class Part:
    """One request's body: part ``number`` (1-based) of a file, from file offset ``offset``."""

    number: int
    offset: int
    views: list[memoryview] = field(default_factory=list)
    length: int = 0
    crc: int = 0
    staged: list[Staged] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class ObjectRecord:
    """An object as the store took it: its key, ETag, size and full-object CRC64NVME."""

    key: str
    etag: str
    size: int
    crc: int


class FileStream:
    """One data file cut into parts as its bytes are added, in order (the save's thread).

    Each piece (a view's bytes within one part and one block of its item) is CRC'd once;
    the piece CRCs combine into the part's, the item block's, and through the parts the
    file's. An item's blocks are ``block_bytes`` long from its first byte, or, once
    ``begin_data`` marked where its tensor's storage bytes begin, the bytes before that are its
    block 0 and the ``block_bytes`` blocks start there (``_verify``'s layout). ``add`` returns
    the parts it completed; ``finish`` the last one."""

    def __init__(self, key: str, part_size: int, block_bytes: int) -> None:
        need_combine()  # every CRC from the library that combines them (``_checksum``)
        self.key = key
        self.part_size = part_size
        self.block_bytes = block_bytes
        self.size = 0
        self.crc = 0
        self.parts = 0
        self._part = Part(1, 0)
        self._item_start = -1
        self._data_start = 0
        self._block_crc = 0
        self._block_len = 0
        self._blocks: list[int] = []

    @property
    def current(self) -> Part:
        """The part being filled (not cut yet)."""
        return self._part

    def begin_item(self) -> int:
        """An item starts here; returns its offset in the file."""
        self._item_start = self.size
        self._data_start = 0
        self._block_crc = self._block_len = 0
        self._blocks = []
        return self.size

    def begin_data(self) -> None:
        """The current item's storage bytes begin here: the bytes of it added so far (less than
        ``block_bytes``: its framing) are its block 0, and its next blocks start here."""
        if self._blocks or self.size == self._item_start:
            raise ValueError("begin_data: the item's framing must be under one block and not empty")
        self._blocks.append(self._block_crc)
        self._block_crc = self._block_len = 0
        self._data_start = self.size - self._item_start

    def add(self, data: memoryview, staged: Staged | None = None) -> list[Part]:
        """The next bytes of the current item (``staged``: the copy they live in)."""
        done: list[Part] = []
        view = data if data.ndim == 1 and data.itemsize == 1 else data.cast("B")
        part = self._part
        while view:
            room = min(self.part_size - part.length, self.block_bytes - self._block_len)
            piece = view[:room]
            n = len(piece)
            crc = crc64nvme(piece)
            part.views.append(piece)
            part.crc = combine(part.crc, crc, n)
            part.length += n
            if staged is not None and (not part.staged or part.staged[-1] is not staged):
                part.staged.append(staged)
                with _HOLDERS:
                    staged.holders += 1
            self._block_crc = combine(self._block_crc, crc, n)
            self._block_len += n
            self.size += n
            view = view[n:]
            if self._block_len == self.block_bytes:
                self._blocks.append(self._block_crc)
                self._block_crc = self._block_len = 0
            if part.length == self.part_size:
                done.append(self._cut())
                part = self._part
        return done

    def end_item(self) -> tuple[int, int, int, tuple[int, ...]]:
        """The current item ended: (offset, length, where its storage bytes begin (0: not
        marked), the CRC of each of its blocks)."""
        if self._block_len or len(self._blocks) == (1 if self._data_start else 0):
            self._blocks.append(self._block_crc)
        start, blocks = self._item_start, tuple(self._blocks)
        self._item_start = -1
        return start, self.size - start, self._data_start, blocks

    def finish(self) -> Part | None:
        """The file's last part (None if the file ended on a part boundary)."""
        if self._part.length == 0:
            return None
        return self._cut()

    def _cut(self) -> Part:
        part = self._part
        self.crc = combine(self.crc, part.crc, part.length)
        self.parts = part.number
        self._part = Part(part.number + 1, self.size)
        if part.number > MAX_PARTS:
            raise ConfigError(
                f"{self.key} needs more than {MAX_PARTS} parts of {self.part_size} bytes "
                "(S3's limit); raise part_size or files_per_rank",
                field="part_size",
                value=self.part_size,
            )
        return part


class _Multipart:
    """A multipart upload being made: its creation (shared by the file's parts)."""

    __slots__ = ("created",)

    def __init__(self, created: asyncio.Task[str]) -> None:
        self.created = created


class UploadEngine:
    """Sends a save's files on the loop it was made on; see the module docstring."""

    def __init__(
        self, store: S3Store, bucket: str, config: WriterConfig, recorder: SaveRecorder
    ) -> None:
        self._store = store
        self._bucket = bucket
        self._config = config
        self._recorder = recorder
        self._budget = ByteBudget(config.memory_budget)
        self._uploads: dict[str, _Multipart] = {}
        self._sent: set[str] = set()  # keys a PUT or a completion was sent for
        self._closing = False

    # ------------------------------------------------------------------ memory

    async def reserve(self, n: int, carried: int) -> None:
        """Reserve ``n`` bytes of staged memory; ``carried``: what the caller already holds
        for a part it has not sent yet (waiting for that would deadlock: then it is forced)."""
        if not await self._budget.acquire_beside(n, carried):
            self._budget.force(n)
        self._recorder.observe_peak(self._budget.peak)

    def release(self, staged: Sequence[Staged], unused: int = 0) -> None:
        """A part's request ended: the staged memory it was the last holder of (and ``unused``
        reserved bytes) go back to the budget. On the loop."""
        freed = unused
        with _HOLDERS:
            for item in staged:
                item.holders -= 1
                if item.holders == 0:
                    freed += item.nbytes
                    item.buffer = None
        if freed:
            self._budget.release(freed)

    # ------------------------------------------------------------------ requests

    async def _send(self, request: WriteRequest, body: Sequence[memoryview] = ()) -> WriteReply:
        """One request under the store's retry policy and request rate; counted."""
        store, recorder = self._store, self._recorder
        limiter = store.limiter
        length = sum(len(v) for v in body)

        async def attempt_once(attempt: int) -> WriteReply:
            if attempt > 1:
                recorder.add(retries=1)
            started = await limiter.acquire()
            recorder.add(requests=1, bytes_sent=length)
            try:
                reply = await store.send_write(request, body)
            except AiodcpError as error:
                if is_throttling(error):
                    limiter.throttled(started)
                    recorder.add(throttled=1)
                    recorder.observe_rate(limiter.limit)
                raise
            limiter.succeeded()
            return reply

        return await store.retrying(attempt_once, what=request.what)

    async def put(
        self,
        key: str,
        part: Part,
        *,
        if_none_match: bool = False,
        if_match: str | None = None,
        track: bool = True,
    ) -> ObjectRecord:
        """A whole object in one PUT with its CRC64NVME (optionally conditional). ``track``:
        a data file, deleted by ``cleanup``; False for ``.metadata``, which never is."""
        if track:
            self._sent.add(key)
        request = WriteRequest(
            "put_object",
            self._bucket,
            key,
            checksum=part.crc,
            if_none_match=if_none_match,
            if_match=if_match,
        )
        try:
            reply = await self._send(request, part.views)
        finally:
            self.release(part.staged)
        return ObjectRecord(key, _etag(reply, request), part.length, part.crc)

    async def send_part(self, key: str, part: Part) -> tuple[int, str, int]:
        """Part ``part.number`` of ``key``'s multipart upload (created by whichever part comes
        first); returns (number, ETag, CRC) for ``complete``."""
        try:
            upload = self._uploads.get(key)
            if upload is None:
                upload = _Multipart(asyncio.ensure_future(self._create(key)))
                self._uploads[key] = upload
            upload_id = await asyncio.shield(upload.created)
            request = WriteRequest(
                "upload_part",
                self._bucket,
                key,
                upload_id=upload_id,
                part_number=part.number,
                checksum=part.crc,
            )
            reply = await self._send(request, part.views)
        finally:
            self.release(part.staged)
        self._recorder.add(parts=1)
        return part.number, _etag(reply, request), part.crc

    async def _create(self, key: str) -> str:
        if self._closing:
            raise SaveCancelledError(f"s3://{self._bucket}/{key}: the save was cancelled")
        request = WriteRequest("create_multipart_upload", self._bucket, key)
        reply = await self._send(request)
        if not reply.upload_id:
            raise AiodcpError(
                f"{request.what}: the store answered no UploadId; it does not support "
                "multipart uploads as S3 does",
                bucket=self._bucket,
                key=key,
            )
        self._recorder.add(multipart_uploads=1)
        return reply.upload_id

    async def complete(
        self, key: str, size: int, crc: int, parts: Sequence[concurrent.futures.Future[object]]
    ) -> ObjectRecord:
        """Complete ``key``'s multipart upload once every one of its ``parts`` (the futures the
        parts were submitted as) was sent."""
        done = [await asyncio.wrap_future(f) for f in parts]
        upload = self._uploads[key]
        upload_id = await asyncio.shield(upload.created)
        self._sent.add(key)
        request = WriteRequest(
            "complete_multipart_upload",
            self._bucket,
            key,
            upload_id=upload_id,
            checksum=crc,
            parts=tuple(sorted(done)),  # type: ignore[arg-type]
        )
        reply = await self._send(request)
        del self._uploads[key]  # completed: nothing to abort any more
        return ObjectRecord(key, _etag(reply, request), size, crc)

    async def delete(self, keys: Sequence[str]) -> list[str]:
        """Delete ``keys`` (retried, concurrently); returns those that could not be deleted."""
        semaphore = asyncio.Semaphore(self._config.max_concurrency)

        async def one(key: str) -> str | None:
            async with semaphore:
                try:
                    await self._send(WriteRequest("delete_object", self._bucket, key))
                except AiodcpError as error:
                    logger.warning("could not delete s3://%s/%s: %s", self._bucket, key, error)
                    return key
                self._recorder.add(deleted_files=1)
                return None

        left = await asyncio.gather(*(one(k) for k in keys))
        return [k for k in left if k is not None]

    async def cleanup(self) -> list[str]:
        """The save failed or was cancelled: abort every multipart upload this engine opened
        (waiting for one being created) and delete every object it sent. Returns what could
        not be cleaned up (logged)."""
        self._closing = True
        left: list[str] = []
        uploads, self._uploads = self._uploads, {}
        for key, upload in uploads.items():
            try:
                upload_id = await asyncio.shield(upload.created)
            except BaseException:  # never created (or refused): nothing to abort
                if not upload.created.done():
                    upload.created.cancel()
                continue
            try:
                await self._send(
                    WriteRequest("abort_multipart_upload", self._bucket, key, upload_id=upload_id)
                )
            except AiodcpError as error:
                logger.warning(
                    "could not abort the multipart upload of s3://%s/%s (%s): %s",
                    self._bucket,
                    key,
                    upload_id,
                    error,
                )
                left.append(f"upload {upload_id} of {key}")
        sent, self._sent = sorted(self._sent), set()
        left.extend(await self.delete(sent))
        return left


def _etag(reply: WriteReply, request: WriteRequest) -> str:
    if not reply.etag:
        raise AiodcpError(
            f"{request.what}: the store answered no ETag; aiodcp needs S3's ETags to record "
            "what it saved",
            bucket=request.bucket,
            key=request.key,
        )
    return reply.etag
