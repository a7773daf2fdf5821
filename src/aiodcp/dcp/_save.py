"""One save session: a rank's write phase, and the coordinator's commit (``SaveSession``).

The mirror of ``_session.py`` + ``_load.py`` for a save. A ``SaveSession`` is one save of one
checkpoint on one rank. It owns, for that save: the path and configuration, a cancellation
scope of its own (a ``ScopedDriver`` over the loop and connections it runs on), the statistics
recorder, the upload engine (``_upload.UploadEngine``, on the I/O loop), what the checkpoint's
``.metadata`` was when the save began (ETag and bytes: what the commit is conditional on, and
which data files it supersedes), and the data files it wrote (deleted if the save fails).

Data flow::

    read_previous(name)                 coordinator, at set-up: GET .metadata with its ETag
        -> overwrite=False and one exists: CheckpointExistsError now (checked again,
           atomically, by the commit)
    write(plan, planner, prefix)        every rank, in write_data (the save's thread)
        -> _layout: the plan's items into files_per_rank data files, named per save
           (``<spread>/__{rank}_{k}.<token>.distcp``: never a name an older .metadata uses)
        -> per file, per item, in order (FileSystemWriter's: non-tensor values first):
           a tensor of 128 KiB or more whose storage is contiguous CPU memory of exactly its
           bytes: torch.save's framing around the storage's own memory (dcp/_savearchive.py; its
           CRC-32 computed from that memory as the stream reaches it); anything else staged:
           copied first (off the GPU, cloned to a storage of its own) or torch.save'd whole;
           non-tensor values as the planner pickles them. Staged memory is reserved from the
           byte budget (UploadEngine.reserve) before it is made.
        -> FileStream cuts parts, CRCs computed from the bytes as they are sent; each part is
           submitted to the engine (a window of max_concurrency requests in flight; a file of
           one part is one PUT, a larger one a multipart upload completed once its parts are in)
        -> a multi-rank save then all-gathers every rank's outcome: if any rank failed or was
           cancelled, every rank deletes what it wrote and raises (PeerSaveError on the others)
        -> one WriteResult per item; its storage_data carries the item's place, its block
           CRCs and (first item of a file) the file's ETag, size and CRC
    commit(metadata, results)           coordinator, in finish
        -> storage_data (plain _StorageInfo), storage_meta, version, the Integrity record
        -> PUT .metadata, one conditional write: If-None-Match: * (overwrite=False, or nothing
           there at the start) or If-Match: <the ETag seen at the start>; 412/409 -> a clear
           error, after checking the object there is not this very write (a retried PUT whose
           first reply was lost)
        -> committed: the data files the replaced .metadata named (and this one does not) are
           deleted; refused or failed: every data file of this save is deleted, unless the
           store may have taken the commit (then nothing is deleted)

Failure and cancellation: ``cancel()`` (any thread) cancels this save's requests and refuses new
ones; the write phase then aborts every multipart upload it opened and deletes every object it
sent (``UploadEngine.cleanup``, on a scope of its own), and raises ``SaveCancelledError``.
"""

from __future__ import annotations

import collections
import concurrent.futures
import io
import logging
import pickle
import struct
import sys
import threading
import uuid
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.filesystem import CURRENT_DCP_VERSION, _StorageInfo
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta
from torch.distributed.checkpoint.planner import SavePlan, SavePlanner, WriteItem, WriteItemType
from torch.distributed.checkpoint.storage import WriteResult

from .._config import WriterConfig
from .._errors import (
    AiodcpError,
    CheckpointExistsError,
    CheckpointFormatError,
    ConcurrentSaveError,
    ConditionalWriteError,
    LoadCancelledError,
    NotFoundError,
    PeerSaveError,
    SaveCancelledError,
)
from .._path import CheckpointPath
from .._stats import SaveRecorder, SaveStats
from .._upload import FileStream, ObjectRecord, Part, Staged, UploadEngine, part_size_for
from ._integrity import DEFAULT_BLOCK_BYTES, FileRecord, Integrity, ItemBlocks
from ._savearchive import crc32, tensor_archive

if TYPE_CHECKING:
    from .._driver import Driver, ScopedDriver
    from .._store import S3Store

__all__ = ["METADATA_NAME", "SaveSession", "SavedItem", "save_group"]

logger = logging.getLogger(__name__)

_T = TypeVar("_T")

METADATA_NAME = ".metadata"

DIRECT_MIN_BYTES = 128 * 1024
"""Tensors with at least this many bytes of contiguous CPU storage are sent from their own
memory (torch.save's framing around it); smaller ones are torch.save'd into a buffer (staged):
below this the framing's ~1.6 KB and a request's worth of views cost more than the copy."""
_CHUNK_BYTES = 4 * 1024 * 1024
"""A tensor's memory is added to the stream (and its CRC-32 computed) this much at a time."""
_CREDIT_BYTES = 1024 * 1024
"""Staged memory is reserved from the budget at least this much at a time (one round trip to
the I/O loop per MiB of small items, not one per item)."""


@dataclass(frozen=True, slots=True)
class SavedItem:
    """What a rank wrote for one item (``WriteResult.storage_data``; the coordinator's commit
    turns it into a plain ``_StorageInfo`` and the integrity record)."""

    relative_path: str
    offset: int
    length: int
    block_crcs: bytes
    """CRC64NVME of each block of the item, packed little-endian u64."""
    file: FileRecord | None = None
    """The data file as the store took it (on the first item of each file)."""
    data_start: int = 0
    """Where the item's storage bytes begin, which its blocks are aligned on (0: the item is
    not an archive sent around its storage's memory; blocks from its first byte)."""


@dataclass(frozen=True, slots=True)
class RankPrefix:
    """``SavePlan.storage_data`` after global planning: the rank's data file name prefix."""

    prefix: str


def save_group() -> dist.ProcessGroup | None:
    """The process group of the ``dcp.save`` this call runs under, when that save synchronises
    its ranks (not ``no_dist``) and has two or more of them; else None. torch does not tell a
    storage writer its group: this reads the ``_DistWrapper`` of torch's ``_save_state_dict``
    frame up the stack (as ``_sharing.load_group`` does for loads)."""
    if not (dist.is_available() and dist.is_initialized()):
        return None
    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_code.co_name == "_save_state_dict" and "distW" in frame.f_locals:
            wrapper = frame.f_locals["distW"]
            if not getattr(wrapper, "use_dist", False):
                return None
            group = getattr(wrapper, "group", None) or dist.group.WORLD  # None: the default
            try:
                return group if group is not None and dist.get_world_size(group) >= 2 else None
            except (RuntimeError, ValueError):
                return None
        frame = frame.f_back  # type: ignore[assignment]
    return None


def _portable(error: BaseException) -> BaseException:
    """``error`` if it pickles (aiodcp's errors do), else an AiodcpError with its text."""
    try:
        pickle.dumps(error)
    except Exception:
        return AiodcpError(f"{type(error).__name__}: {error}")
    return error


class _Window:
    """Requests in flight from the save's thread: at most ``size``; the first failure raised.

    Each request's future counts itself out when it ends (a done callback, on whichever thread
    ends it), so the save's thread waits on one condition and looks at each ended future once:
    O(1) per request, where ``concurrent.futures.wait`` over every pending future took each of
    their locks on every wait."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._open = 0
        self._ended: collections.deque[concurrent.futures.Future[Any]] = collections.deque()
        self._changed = threading.Condition(threading.Lock())

    def add(self, future: concurrent.futures.Future[Any]) -> None:
        with self._changed:
            self._open += 1
        future.add_done_callback(self._end)
        self._wait(self.size - 1)

    def drain(self) -> None:
        self._wait(0)

    def _end(self, future: concurrent.futures.Future[Any]) -> None:
        with self._changed:
            self._open -= 1
            self._ended.append(future)
            self._changed.notify()

    def _wait(self, most_open: int) -> None:
        """Until at most ``most_open`` requests are in flight; raises the first failure (or
        cancellation) among the requests that ended."""
        with self._changed:
            while True:
                while self._ended:
                    future = self._ended.popleft()
                    if future.cancelled():
                        raise SaveCancelledError("the save was cancelled")
                    error = future.exception()
                    if error is not None:
                        raise error
                if self._open <= most_open:
                    return
                self._changed.wait()


class SaveSession:
    """One save of one checkpoint on one rank (see the module docstring). One per save."""

    def __init__(
        self,
        path: CheckpointPath,
        config: WriterConfig,
        driver: Driver,
        *,
        overwrite: bool,
        rank: int = 0,
    ) -> None:
        self.path = path
        self.config = config
        self.overwrite = overwrite
        self.rank = rank
        self.token = uuid.uuid4().hex[:12]
        """In every data file name of this save: no name an older checkpoint's files use."""
        self._driver = driver
        self.scope: ScopedDriver = driver.scope()
        self.recorder = SaveRecorder()
        self.stats: SaveStats | None = None
        self.previous: tuple[bytes, str | None] | None = None
        """The ``.metadata`` (bytes, ETag) there when the save began; None: none was."""
        self._previous_read = False
        self._engine: UploadEngine | None = None
        self._lock = threading.Lock()
        self._cancelled = False

    # ------------------------------------------------------------------ plumbing

    def _run(self, fn: Callable[[S3Store], Any]) -> Any:
        if self._cancelled:
            raise SaveCancelledError(f"{self.path.url}: the save was cancelled")
        try:
            return self.scope.run(fn)
        except (LoadCancelledError, concurrent.futures.CancelledError) as exc:
            raise SaveCancelledError(f"{self.path.url}: the save was cancelled") from exc

    def _submit(self, fn: Callable[[S3Store], Any]) -> concurrent.futures.Future[Any]:
        if self._cancelled:
            raise SaveCancelledError(f"{self.path.url}: the save was cancelled")
        try:
            return self.scope.submit(fn)
        except LoadCancelledError as exc:
            raise SaveCancelledError(f"{self.path.url}: the save was cancelled") from exc

    def engine(self) -> UploadEngine:
        if self._engine is None:
            path, config, recorder = self.path, self.config, self.recorder

            async def make(store: S3Store) -> UploadEngine:
                return UploadEngine(store, path.bucket, config, recorder)

            self._engine = self._run(make)
        return self._engine

    def _unscoped(self, fn: Callable[[S3Store], Any]) -> Any:
        """Run ``fn`` on the loop outside this save's (possibly cancelled) scope: cleanup."""
        return self._driver.scope().run(fn)

    def cancel(self) -> None:
        """Stop this save (any thread): its requests are cancelled, new ones refused; the write
        phase cleans up and raises ``SaveCancelledError``."""
        with self._lock:
            self._cancelled = True
        self.scope.cancel()

    @property
    def cancelled(self) -> bool:
        return self._cancelled

    def finish_stats(self) -> SaveStats:
        self.stats = self.recorder.finish()
        return self.stats

    # ------------------------------------------------------------------ set-up

    def read_previous(self, name: str) -> None:
        """What ``name`` (``.metadata``) is now: the commit is conditional on it. With
        ``overwrite=False`` an existing checkpoint is refused now (and again by the commit)."""
        key = self.path.key(name)
        bucket = self.path.bucket

        async def get(store: S3Store) -> tuple[bytes, str | None] | None:
            return await store.get_object_etag(bucket, key)

        self.recorder.add(requests=1)
        self.previous = self._run(get)
        self._previous_read = True
        if self.previous is not None and not self.overwrite:
            raise CheckpointExistsError(
                f"a checkpoint already exists at {self.path.url} (s3://{bucket}/{key}) and "
                "overwrite=False; save to another path, or pass overwrite=True to replace it",
                bucket=bucket,
                key=key,
            )

    # ------------------------------------------------------------------ write phase

    def write(
        self,
        plan: SavePlan,
        planner: SavePlanner,
        prefix: str,
        group: dist.ProcessGroup | None,
    ) -> list[WriteResult]:
        """Upload this rank's items (see the module docstring); every rank of ``group`` must
        call it (it all-gathers the outcome)."""
        error: BaseException | None = None
        results: list[WriteResult] = []
        try:
            results = self._write(plan, planner, prefix)
        except BaseException as exc:
            error = exc
            self.cancel()  # this rank's other requests stop before its files are cleaned up
        if group is not None:
            error = self._agree(group, error)
        if error is not None:
            self._delete_written()
            raise error
        return results

    def _agree(self, group: dist.ProcessGroup, error: BaseException | None) -> BaseException | None:
        """Every rank's outcome, all-gathered: this rank's error, or the first failed rank's as
        ``PeerSaveError`` (so every rank raises, none waits)."""
        mine = None if error is None else _portable(error)
        outcomes: list[Any] = [None] * dist.get_world_size(group)
        dist.all_gather_object(outcomes, (dist.get_rank(group), mine), group=group)
        if error is not None:
            return error
        for rank, cause in outcomes:
            if cause is not None:
                return PeerSaveError(
                    f"{self.path.url}: rank {rank} of the save failed ({cause}); this rank's "
                    "data files were deleted and nothing was committed",
                    rank=rank,
                    cause=cause,
                )
        return None

    def _delete_written(self) -> None:
        """The save failed: abort this rank's uploads and delete its data files."""
        engine = self._engine
        if engine is None:
            return
        try:
            left = self._unscoped(lambda store: engine.cleanup())
        except BaseException as exc:  # the loop is gone (closed): nothing more to do
            logger.warning("%s: cleaning up a failed save failed: %r", self.path.url, exc)
            return
        if left:
            logger.warning(
                "%s: a failed save could not clean up %d object(s) or upload(s): %s",
                self.path.url,
                len(left),
                ", ".join(left[:10]),
            )

    def _write(self, plan: SavePlan, planner: SavePlanner, prefix: str) -> list[WriteResult]:
        files = self._layout(plan.items, prefix)
        if not files:
            return []
        engine = self.engine()
        window = _Window(self.config.max_concurrency)
        producer = _Producer(self, engine, window, planner)
        written: list[tuple[str, list[tuple[WriteItem, int, int, int, bytes]], Any]] = []
        try:
            for relative_path, items in files:
                entries, future = producer.file(relative_path, items)
                written.append((relative_path, entries, future))
            window.drain()
        finally:
            producer.close()
        results: list[WriteResult] = []
        for relative_path, entries, record_future in written:
            record: ObjectRecord = record_future.result()
            file = FileRecord(record.etag, record.size, record.crc)
            self.recorder.add(files=1, bytes_written=record.size)
            for n, (item, offset, length, data_start, crcs) in enumerate(entries):
                saved = SavedItem(
                    relative_path, offset, length, crcs, file if n == 0 else None, data_start
                )
                results.append(
                    WriteResult(index=item.index, size_in_bytes=length, storage_data=saved)
                )
        return results

    def _layout(self, items: Sequence[WriteItem], prefix: str) -> list[tuple[str, list[WriteItem]]]:
        """The plan's items in ``files_per_rank`` files (non-tensor values spread round-robin,
        tensors largest first onto the emptiest file, as ``FileSystemWriter``), each file's
        non-tensor values first; named ``[<spread>/]<prefix><k>.<token>.distcp``."""
        bins = self.config.files_per_rank
        byte_items = [i for i in items if i.type == WriteItemType.BYTE_IO]
        tensor_items = [i for i in items if i.type != WriteItemType.BYTE_IO]
        buckets: list[list[WriteItem]] = [[] for _ in range(bins)]
        if bins == 1:
            buckets[0] = byte_items + tensor_items
        else:
            sizes = [0] * bins
            for n, item in enumerate(byte_items):
                buckets[n % bins].append(item)
            for item in sorted(tensor_items, key=_item_bytes, reverse=True):
                k = min(range(bins), key=sizes.__getitem__)
                buckets[k].append(item)
                sizes[k] += _item_bytes(item)
        files = []
        count = 0
        spread = self.config.prefix_spread
        for bucket in buckets:
            if not bucket:
                continue
            name = f"{prefix}{count}.{self.token}.distcp"
            if spread:
                digits = max(1, (spread - 1).bit_length() + 3) // 4
                slot = zlib.crc32(name.encode()) % spread
                name = f"{slot:0{digits}x}/{name}"
            files.append((name, bucket))
            count += 1
        return files

    # ------------------------------------------------------------------ commit

    def commit(
        self,
        metadata: Metadata,
        results: Sequence[Sequence[WriteResult]],
        storage_meta: StorageMeta,
        name: str,
    ) -> None:
        """Write ``name`` (``.metadata``) last, as one conditional PUT (see the module
        docstring); on success delete the data files it supersedes."""
        key = self.path.key(name)
        bucket = self.path.bucket
        storage_data: dict[Any, _StorageInfo] = {}
        files: dict[str, FileRecord] = {}
        items: dict[tuple[str, int, int], ItemBlocks] = {}
        for rank_results in results:
            for result in rank_results:
                saved = result.storage_data
                if not isinstance(saved, SavedItem):
                    raise CheckpointFormatError(
                        f"{self.path.url}: a rank's write result is not aiodcp's "
                        f"({type(saved).__name__}); every rank must save with S3StorageWriter",
                        bucket=bucket,
                        key=key,
                    )
                storage_data[result.index] = _StorageInfo(
                    saved.relative_path, saved.offset, saved.length
                )
                if saved.file is not None:
                    files[saved.relative_path] = saved.file
                count = len(saved.block_crcs) // 8
                items[(saved.relative_path, saved.offset, saved.length)] = ItemBlocks(
                    saved.data_start, struct.unpack(f"<{count}Q", saved.block_crcs)
                )
        new_keys = sorted({self.path.key(p) for p in files})
        metadata.version = CURRENT_DCP_VERSION
        metadata.storage_data = storage_data
        metadata.storage_meta = storage_meta
        Integrity(DEFAULT_BLOCK_BYTES, files, items).attach(metadata)
        data = pickle.dumps(metadata)
        if not self._previous_read:
            self.read_previous(name)
        previous = self.previous
        if_match = None if (previous is None or not self.overwrite) else previous[1]
        engine = self.engine()
        body = Part(1, 0, [memoryview(data)], len(data), _crc(data))
        try:
            self._run(
                lambda store: engine.put(
                    key, body, if_none_match=if_match is None, if_match=if_match, track=False
                )
            )
        except BaseException as exc:
            committed = self._committed_anyway(key, data, exc)
            if committed is True:
                logger.warning("%s: the commit's reply was lost but it was applied", key)
            else:
                if committed is False:
                    self._unscoped(lambda store: engine.delete(new_keys))
                raise self._commit_error(exc, key, if_match) from exc
        self.recorder.add(metadata_bytes=len(data))
        self._delete_superseded(previous, set(files), name)

    def _committed_anyway(self, key: str, data: bytes, exc: BaseException) -> bool | None:
        """After a failed commit: whether the store holds this very ``.metadata`` (a retried
        PUT whose first reply was lost, or a cancellation after the store took it). None:
        unknown (the store cannot be read): nothing may be deleted then."""
        bucket = self.path.bucket
        if isinstance(exc, ConditionalWriteError) and exc.context.get("status") == 409:
            return False

        async def get(store: S3Store) -> tuple[bytes, str | None] | None:
            return await store.get_object_etag(bucket, key)

        try:
            now = self._unscoped(get)
        except BaseException as error:
            logger.warning("%s: could not read %s after a failed commit: %r", self.path, key, error)
            return None
        return now is not None and now[0] == data

    def _commit_error(self, exc: BaseException, key: str, if_match: str | None) -> BaseException:
        bucket = self.path.bucket
        url = self.path.url
        if isinstance(exc, ConditionalWriteError) or (
            isinstance(exc, NotFoundError) and if_match is not None
        ):
            status = exc.context.get("status")
            if if_match is None and not self.overwrite and status == 412:
                return CheckpointExistsError(
                    f"a checkpoint appeared at {url} while this save ran (s3://{bucket}/{key} "
                    "exists) and overwrite=False; nothing was committed and its data files "
                    "were deleted",
                    bucket=bucket,
                    key=key,
                    status=status,
                )
            seen = f"ETag {if_match}" if if_match is not None else "no checkpoint"
            return ConcurrentSaveError(
                f"another save wrote {url} while this one ran (this save began with {seen} at "
                f"s3://{bucket}/{key}; the store answered {status}): nothing was committed, "
                "this save's data files were deleted and the other save's checkpoint is "
                "intact; save each checkpoint from one job, or to its own path",
                bucket=bucket,
                key=key,
                status=status,
            )
        return exc

    def _delete_superseded(
        self, previous: tuple[bytes, str | None] | None, kept: set[str], name: str
    ) -> None:
        """After the commit: delete the data files the replaced ``.metadata`` named (only
        those, never a listing) that the new one does not."""
        if previous is None:
            return
        from ._metadata import load_metadata

        url = f"s3://{self.path.bucket}/{self.path.key(name)}"
        try:
            old = load_metadata(previous[0], url)
            paths = {info.relative_path for info in old.storage_data.values()}
            keys = sorted(self.path.key(p) for p in paths - kept)
        except (AiodcpError, AttributeError) as exc:
            logger.warning("%s: the replaced checkpoint's files are unknown (%s); kept", url, exc)
            return
        if not keys:
            return
        engine = self.engine()
        try:
            left = self._unscoped(lambda store: engine.delete(keys))
        except BaseException as exc:
            logger.warning("%s: deleting the replaced checkpoint's files failed: %r", url, exc)
            return
        if left:
            logger.warning("%s: %d replaced data file(s) could not be deleted", url, len(left))


class _Producer:
    """The write phase's thread side: files -> items -> views -> parts -> the engine."""

    def __init__(
        self, session: SaveSession, engine: UploadEngine, window: _Window, planner: SavePlanner
    ) -> None:
        self.session = session
        self.engine = engine
        self.window = window
        self.planner = planner
        self.config = session.config
        self.recorder = session.recorder
        self._credit = 0  # staged bytes reserved and not used yet
        self._held: Part | None = None  # a file's latest part, sent once the next one exists
        self._stream: FileStream | None = None

    def close(self) -> None:
        """Give back the staged memory reserved but never used."""
        credit, self._credit = self._credit, 0
        if credit:
            engine = self.engine

            async def give_back(store: S3Store) -> None:
                engine.release((), unused=credit)

            try:
                self.session._unscoped(give_back)
            except BaseException:  # the loop is gone: the budget with it
                pass

    # ------------------------------------------------------------------ staging

    def _stage(self, n: int) -> None:
        """Reserve ``n`` bytes of staged memory before making them."""
        if n <= self._credit:
            self._credit -= n
            return
        want = max(n - self._credit, _CREDIT_BYTES)
        carried = self._credit + self._unsent_staged()
        engine = self.engine
        self.session._run(lambda store: engine.reserve(want, carried))
        self._credit += want - n

    def _unsent_staged(self) -> int:
        """Staged bytes of parts not sent yet: waiting for them would never end."""
        held = self._held.staged if self._held is not None else []
        current = self._stream.current.staged if self._stream is not None else []
        return sum(s.nbytes for s in {id(s): s for s in (*held, *current)}.values())

    # ------------------------------------------------------------------ files

    def file(
        self, relative_path: str, items: list[WriteItem]
    ) -> tuple[list[tuple[WriteItem, int, int, int, bytes]], Any]:
        """Send one data file; returns its items' (item, offset, length, where their storage
        bytes begin, block CRCs) and the future of its ``ObjectRecord``."""
        session = self.session
        key = session.path.key(relative_path)
        hint = sum(_item_bytes(i) + 2048 for i in items)
        stream = FileStream(key, part_size_for(hint, self.config.part_size), DEFAULT_BLOCK_BYTES)
        self._stream = stream
        self._held = None
        parts: list[concurrent.futures.Future[Any]] = []
        entries = []
        engine = self.engine
        for item in items:
            if session.cancelled:
                raise SaveCancelledError(f"{session.path.url}: the save was cancelled")
            stream.begin_item()
            for part in self._item(stream, item):
                self._hold(part, key, parts)
            offset, length, data_start, blocks = stream.end_item()
            packed = struct.pack(f"<{len(blocks)}Q", *blocks)
            entries.append((item, offset, length, data_start, packed))
            self.recorder.add(items=1)
        last = stream.finish()
        if last is not None:
            if self._held is not None:
                self._send(key, self._held, parts)
            self._held = last
        held, self._held = self._held, None
        self._stream = None
        if held is None:  # items of no bytes at all: an empty object
            held = Part(1, 0)
        if not parts:  # one part: one PUT
            future = session._submit(lambda store: engine.put(key, held))
        else:
            self._send(key, held, parts)
            size, crc = stream.size, stream.crc
            future = session._submit(lambda store: engine.complete(key, size, crc, parts))
        self.window.add(future)
        return entries, future

    def _hold(self, part: Part, key: str, parts: list[concurrent.futures.Future[Any]]) -> None:
        """A part was cut: the one before it is not the file's last, so it goes as a part of
        a multipart upload; this one waits (it may be the file's only part: then one PUT)."""
        if self._held is not None:
            self._send(key, self._held, parts)
        self._held = part

    def _send(self, key: str, part: Part, parts: list[concurrent.futures.Future[Any]]) -> None:
        engine = self.engine
        future = self.session._submit(lambda store: engine.send_part(key, part))
        parts.append(future)
        self.window.add(future)

    # ------------------------------------------------------------------ items

    def _item(self, stream: FileStream, item: WriteItem) -> list[Part]:
        """Add one item's archive to ``stream``; the parts it completed."""
        data = self.planner.resolve_data(item)
        if item.type == WriteItemType.BYTE_IO:
            if not isinstance(data, io.BytesIO):
                raise TypeError(
                    f"{item.index}: the planner resolved a BYTE_IO item to {type(data)}"
                )
            view = data.getbuffer()
            self._stage(len(view))
            self.recorder.add(staged_bytes=len(view))
            return stream.add(view, Staged(len(view), data))
        if not isinstance(data, torch.Tensor):
            raise TypeError(f"{item.index}: the planner resolved a tensor item to {type(data)}")
        tensor = data.detach()
        small = tensor.nbytes < DIRECT_MIN_BYTES
        copy: Staged | None = None
        if tensor.device.type != "cpu" or tensor.untyped_storage().nbytes() != tensor.nbytes:
            # as FileSystemWriter: off the device, and a storage of exactly its bytes
            if not small:  # reserved first; a small one is a transient copy, torch.save'd
                self._stage(tensor.nbytes)
            tensor = tensor.cpu()
            if tensor.untyped_storage().nbytes() != tensor.nbytes:
                tensor = tensor.clone()
            if not small:
                copy = Staged(tensor.nbytes, tensor)
                self.recorder.add(staged_bytes=tensor.nbytes)
        archive = None if small else tensor_archive(tensor)
        if archive is None:
            buffer = io.BytesIO()
            torch.save(tensor, buffer)
            view = buffer.getbuffer()
            self._stage(len(view))
            self.recorder.add(staged_bytes=len(view))
            done = stream.add(view, Staged(len(view), buffer))
            if copy is not None:  # an unusual archive: its copy was torch.save'd, drop it
                copy.holders += 1
                engine, dropped = self.engine, copy
                self.session._run(lambda store: _release(engine, dropped))
            return done
        done = self._framing(stream, archive.prefix)
        if 0 < len(archive.prefix) < stream.block_bytes:
            stream.begin_data()  # the record's blocks are aligned on the storage bytes
        storage_crc = 0
        memory = archive.memory
        for at in range(0, len(memory), _CHUNK_BYTES):
            chunk = memory[at : at + _CHUNK_BYTES]
            storage_crc = crc32(chunk, storage_crc)
            done += stream.add(chunk, copy)
        if copy is None:
            self.recorder.add(direct_bytes=len(memory))
        done += self._framing(stream, archive.suffix(storage_crc))
        return done

    def _framing(self, stream: FileStream, data: bytes) -> list[Part]:
        self._stage(len(data))
        self.recorder.add(staged_bytes=len(data))
        return stream.add(memoryview(data), Staged(len(data), data))


async def _release(engine: UploadEngine, staged: Staged) -> None:
    engine.release([staged])


def _item_bytes(item: WriteItem) -> int:
    size = item.tensor_storage_size()
    return size if size is not None else 0


def _crc(data: bytes) -> int:
    from .._checksum import crc64nvme

    return crc64nvme(data)
