"""The fetch engine: concurrent ranged GETs straight into per-item memory, handed over in order.

Data flow::

    FileFetch(key, FilePlan) x N files          (planner output, in consumption order)
        -> run(): one scheduler walks every Part of every file in order; for each part it
           reserves the item memory the part's bytes take from the ByteBudget (an item split
           over several parts is reserved slice by slice), takes a connection slot, and starts a
           fetch task                                    (backpressure: budget + semaphore)
        -> _fetch(): a ranged GET (``S3Store.fetch_range``) whose body is written by the store
           into a ``_PartSink``: each item's bytes into its ``ItemSink`` (a buffered item's
           ``BlockSink``: 1 MiB blocks taken as their first byte arrives, see ``BlockPool``; a
           direct item's ``DirectSink``, below), gap bytes into a scratch buffer;
           an interrupted body resumes at the next byte it still needs, pinned to the first
           ETag seen for the object (If-Match); a part gets at most ``max_attempts`` GETs,
           under the store's one retry policy (``S3Store.retrying``: backoff, give-up error)
        -> an item whose last byte arrived becomes a ChunkBuffer over its blocks and is
           published
        -> a direct item (``FileFetch.direct``: a large plain tensor whose destination is known)
           takes no item memory and no budget: its first bytes go to a small head buffer until
           ``DirectTarget.locate`` says where its storage bytes begin, then those go from the
           socket straight into the destination tensor, and the ~1 KB after them into a tail
           buffer; bytes of a later part that arrive before the start is known are kept aside
           (``DirectSink.aside``) and put in place once it is. The consumer verifies head and
           tail (``direct_result``), or fetches the item again for the buffered path. A target
           with ``head_bytes`` 0 (a run of a sliced item, located beforehand) is located at
           once: all its bytes go straight to the destination
    consumer thread (torch decode): wait_item(f, i) blocks until item i of file f is published
        (or raises the load's failure; or, when the download made no progress at all for
        ``quiet_limit_s``, a TransferError naming the bytes it waited for: never forever),
        then checks it before handing it over (``verify_checksums``): against its
        ``FileFetch.checks`` (the checkpoint's recorded block CRCs; a mismatch is fetched once
        more, pinned, then ``ChecksumMismatchError``), or, in a file read whole without them
        (``FileFetch.whole``), folds its CRC into the file's, which ``whole_file(f)`` compares
        with the store's full-object checksum once the file's last item was handed over (a
        HEAD with ``x-amz-checksum-mode``, sent before the file's first GET, under the same
        connection slots, and owned by the engine: cancelled and awaited with its GETs; the
        caller reads the file again on a mismatch), or, with ``FileFetch.crc`` (a file the
        ranks of a shared load read whole between them), takes its CRC for the caller's check
        (``crcs(f)``); release_item(f, i) drops its memory and returns its bytes to the budget
        (batched).

Invariants: the budget is reserved in consumption order, so the item the consumer waits for
always holds its reservation and the engine cannot deadlock. A part that carries on with an
item an earlier part began cannot wait for that item's release (the consumer needs the part
first): once nothing else is held, the carried slice is fetched alone and the items after it
wait (``_schedule``). An item larger than the whole budget is reserved only when nothing else
is. Reservations count item memory, whole 1 MiB blocks for all but small items (``held_memory``),
so memory held is what is reserved, and never exceeds ``max(memory_budget, largest item's
memory)``; direct items hold none (their head and tail, ~1-4 KB each, are not counted). The
first failure cancels every other fetch and is re-raised to the consumer; ``abort()``
(consumer side) cancels everything as well.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import threading
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from types import MappingProxyType
from typing import NamedTuple

from ._budget import ByteBudget
from ._checksum import warm_up
from ._config import ReaderConfig
from ._errors import (
    AiodcpError,
    ChecksumMismatchError,
    LoadCancelledError,
    ObjectChangedError,
    TransferError,
)
from ._planner import FilePlan, ItemRange, Part
from ._reader import ChunkBuffer
from ._sinks import (
    BlockPool,
    BlockSink,
    DirectSink,
    DirectTarget,
    ItemSink,
    held_memory,
)
from ._stats import RequestMetrics, StatsRecorder
from ._store import S3Store, WriteReply, WriteRequest, is_throttling, quiet_limit_s
from ._verify import ALGORITHMS, BlockCheck, WholeObject, crc_of

__all__ = [
    "FetchEngine",
    "FileFetch",
    "StoreChecksum",
    "WholeFile",
    "WholeFileResult",
    "ask_checksum",
]

logger = logging.getLogger(__name__)

_WAKE_S = 1.0
"""A consumer waiting for an item looks at the download's progress this often (seconds)."""


class FileFetch(NamedTuple):
    """One data file of a load: its key, its planned ranges and, by item index, the items to
    receive straight into their destination (``DirectTarget``) rather than into item memory,
    and the checksums items must match before they are handed over (``BlockCheck``)."""

    key: str
    plan: FilePlan
    direct: Mapping[int, DirectTarget] = MappingProxyType({})
    checks: Mapping[int, BlockCheck] = MappingProxyType({})
    """By item index: the recorded block checksums of the stored item the item is whole blocks
    of. ``wait_item`` checks the item's bytes against them before handing it over; a mismatch
    is fetched once more (pinned to the same ETag), then raises ``ChecksumMismatchError``."""
    whole: WholeFile | None = None
    """Check the file against the store's full-object checksum, if the items tile it (a file
    without recorded checksums that the load reads whole)."""
    crc: str | None = None
    """Take each item's CRC in this algorithm (``_verify.ALGORITHMS``) for a check made
    elsewhere (a file the ranks of a shared load read whole between them, without recorded
    checksums): kept for ``crcs``; the items are counted neither verified nor unverified here
    (the caller counts them once that check is made). Ignored with ``checks`` or ``whole``."""


class WholeFile(NamedTuple):
    """How to check a file read whole against the store's full-object checksum
    (``FileFetch.whole``): ``known``, the file's first bytes the load already holds (a
    safetensors header), which the items must follow with no gap to the end of the object;
    ``expected``, ``(algorithm, checksum, size)`` when they are known already (the file read
    again after a mismatch), else the engine asks the store with a HEAD."""

    known: bytes = b""
    expected: tuple[str, int, int] | None = None


class WholeFileResult(NamedTuple):
    """What ``FetchEngine.whole_file`` found for a file read whole: ``status`` is
    ``"verified"``, ``"unverified"`` (the store gave no checksum that combines, another size,
    or an item's bytes could not be kept) or ``"mismatch"``, with the item CRCs (by item index,
    in ``algorithm``) and the store's ``expected`` checksum of the ``size``-byte object."""

    status: str
    algorithm: str = ""
    expected: int = 0
    size: int = 0
    crcs: Mapping[int, int] = MappingProxyType({})
    why: str = ""


class _Item:
    """One stored item being downloaded into its sink: memory of its own (``BlockSink``), or
    straight into its destination (``DirectSink``). ``checked``: its bytes were checked against
    its ``check`` (or it has none) and may be handed over; ``refetched``: it was fetched again
    after a mismatch; ``counted``: its first arrival was counted in the statistics."""

    __slots__ = ("buffer", "check", "checked", "counted", "missing", "range", "refetched", "sink")

    def __init__(self, item_range: ItemRange, sink: ItemSink, check: BlockCheck | None) -> None:
        self.range = item_range
        self.sink = sink
        self.missing = item_range.length
        self.buffer: ChunkBuffer | None = None
        self.check = check
        self.checked = False
        self.refetched = False
        self.counted = False


class _WholeState:
    """A file read whole, checked against the store's full-object checksum: ``state`` is
    ``"asking"`` until the HEAD answered, then ``"checking"`` (``object`` folds the items'
    CRCs) or ``"unchecked"`` (``why``). ``pending``: bytes handed over, not yet counted as
    verified or unverified; ``crcs``: each item's CRC, by item index."""

    __slots__ = ("crcs", "end", "etag", "known", "object", "pending", "state", "why")

    def __init__(self, known: bytes, end: int) -> None:
        self.known = known
        self.end = end
        self.state = "asking"
        self.object: WholeObject | None = None
        self.etag: str | None = None
        self.pending = 0
        self.crcs: dict[int, int] = {}
        self.why = ""

    def expect(self, algorithm: str, expected: int, size: int, etag: str | None) -> None:
        """The store's checksum arrived (with the lock held)."""
        if algorithm not in ALGORITHMS:
            self.give_up(f"its checksum is {algorithm}, which aiodcp cannot combine")
        elif size != self.end:
            self.give_up(f"the object is {size} bytes, the load reads [0, {self.end})")
        else:
            # the CRC library, needed from now on (ranges' CRCs combined): imported in a
            # thread of its own while the first items arrive (not for a store with no checksum)
            warm_up(combine=True)
            self.object = WholeObject(size, algorithm, expected)
            if self.known:
                self.object.add(0, len(self.known), self.object.crc([self.known]))
            self.etag = etag
            self.state = "checking"

    def give_up(self, why: str) -> int:
        """Nothing more is checked; returns the bytes handed over so far (now unverified)."""
        pending, self.pending = self.pending, 0
        if self.state != "unchecked":
            self.state, self.why, self.object = "unchecked", why, None
        return pending


def _tiles(items: Sequence[ItemRange], start: int) -> bool:
    """Whether ``items`` (sorted) cover ``[start, their end)`` with no gap."""
    at = start
    for item in items:
        if item.start != at:
            return False
        at = item.end
    return bool(items)


class StoreChecksum(NamedTuple):
    """A data file's full-object checksum as the store reports it (``ask_checksum``)."""

    algorithm: str
    expected: int
    size: int
    """The object's size in bytes (-1: not reported)."""
    etag: str | None


async def ask_checksum(
    store: S3Store,
    bucket: str,
    key: str,
    stats: StatsRecorder,
    connections: asyncio.Semaphore,
) -> tuple[StoreChecksum | None, str]:
    """HEAD ``key`` for its full-object checksum (``x-amz-checksum-mode``), under the store's
    retry policy and request rate, each attempt holding one of ``connections`` as a GET does
    (counted in ``stats.checksum_requests``). Returns what the store holds, else None and why
    not (the HEAD failed, or the store gave no full-object checksum)."""
    limiter = store.limiter

    async def attempt_once(attempt: int) -> WriteReply:
        async with connections:
            started = await limiter.acquire()
            stats.add(checksum_requests=1)
            try:
                return await store.send_write(WriteRequest("head_object", bucket, key))
            except AiodcpError as error:
                if is_throttling(error):
                    limiter.throttled(started)
                    stats.add(throttled=1)
                raise

    try:
        reply = await store.retrying(attempt_once, what=f"HEAD s3://{bucket}/{key} (its checksum)")
    except AiodcpError as error:
        return None, f"asking the store for its checksum failed ({error})"
    if reply.checksum is None or reply.checksum_algorithm is None:
        return None, "the store gave no full-object CRC64NVME, CRC32C or CRC32 for it"
    size = reply.size if reply.size is not None else -1
    return StoreChecksum(reply.checksum_algorithm, reply.checksum, size, reply.etag), ""


class _PartSink:
    """Receives the body of one ranged GET: each item's bytes into its ``ItemSink``, gap bytes
    into a scratch buffer (dropped). Implements ``_http.RangeSink``; runs on the loop."""

    __slots__ = (
        "_aside",
        "_engine",
        "_key",
        "_scratch",
        "_t",
        "_targets",
        "end",
        "first_at",
        "pos",
    )

    _SCRATCH_BYTES = 256 * 1024

    def __init__(self, engine: FetchEngine, key: str, targets: list[_Item], end: int) -> None:
        self._engine = engine
        self._key = key
        self._targets = targets
        self._t = 0  # first target that may still hold bytes at or after pos
        self._scratch: memoryview | None = None
        self._aside = False  # the last view given was scratch for an item's bytes
        self.pos = 0
        self.end = end
        self.first_at = 0.0

    def begin(self, etag: str | None) -> None:
        self.first_at = time.perf_counter()
        self._engine._stats.first_byte()
        self._engine._pin_etag(self._key, etag, (self.pos, self.end))

    def buffer(self, pos: int) -> memoryview:
        targets = self._targets
        t = self._t
        while t < len(targets) and targets[t].range.end <= pos:
            t += 1
        self._t = t
        if t < len(targets):
            item = targets[t]
            start = item.range.start
            if start <= pos:
                limit = min(item.range.end, self.end) - pos
                view = item.sink.view(pos - start, limit)
                if view is not None:
                    self._aside = False
                    return view
                self._aside = True
                return self._scratch_view(limit)
            gap_end = start
        else:
            gap_end = self.end
        return self._scratch_view(gap_end - pos)

    def _scratch_view(self, limit: int) -> memoryview:
        scratch = self._scratch
        if scratch is None:
            scratch = self._scratch = memoryview(bytearray(self._SCRATCH_BYTES))
        return scratch[: min(limit, self._SCRATCH_BYTES)]

    def written(self, pos: int, n: int) -> None:
        self.pos = pos + n
        engine = self._engine
        engine._stats.add(bytes_received=n)
        targets = self._targets
        t = self._t
        if t < len(targets):
            item = targets[t]
            if item.range.start <= pos < item.range.end:
                offset = pos - item.range.start
                if self._aside:
                    assert self._scratch is not None
                    if item.sink.aside(offset, self._scratch[:n]):
                        engine._stats.add(held_aside_bytes=n)
                else:
                    item.sink.written(offset, n)
                item.missing -= n
                if item.missing == 0:
                    engine._publish(item)


class FetchEngine:
    """Fetches the items of several files concurrently; see the module docstring."""

    def __init__(
        self,
        store: S3Store,
        bucket: str,
        files: Sequence[FileFetch],
        config: ReaderConfig,
        stats: StatsRecorder,
        etags: Mapping[str, str] | None = None,
        recorded: Collection[str] = (),
        *,
        count_items: bool = True,
    ) -> None:
        """``count_items=False``: the items were counted already (``items``, ``bytes_used``)
        by an earlier engine of the same load; this one reads them again."""
        self._store = store
        self._count_items = count_items
        self._bucket = bucket
        self._files = list(files)
        self._config = config
        self._stats = stats
        self._pool = BlockPool()
        self._verify = config.verify_checksums
        self._items: list[list[_Item]] = [
            [
                _Item(r, self._sink(r, f.direct.get(i)), self._check_of(f, i, r))
                for i, r in enumerate(f.plan.items)
            ]
            for f in self._files
        ]
        self._index: list[dict[ItemRange, int]] = [
            {r: i for i, r in enumerate(f.plan.items)} for f in self._files
        ]
        self._direct: list[frozenset[ItemRange]] = [
            frozenset(f.plan.items[i] for i in f.direct) for f in self._files
        ]
        # key -> the ETag every GET of it must match (If-Match): the first one seen, or given
        self._etags: dict[str, str] = dict(etags or {})
        # keys whose ETag the checkpoint recorded at its save (pinned from the first GET)
        self._recorded = frozenset(k for k in recorded if k in self._etags)
        # file index -> a file read whole, checked against the store's full-object checksum
        self._whole: dict[int, _WholeState] = {}
        for index, fetch in enumerate(self._files):
            whole = fetch.whole
            if whole is None or fetch.checks or not self._verify:
                continue
            if not _tiles(fetch.plan.items, len(whole.known)):
                continue  # not read whole: its items are counted unverified one by one
            state = self._whole[index] = _WholeState(whole.known, fetch.plan.items[-1].end)
            if whole.expected is not None:
                state.expect(*whole.expected, None)
        # file index -> (algorithm, item index -> CRC), of the files whose item CRCs a
        # caller checks (``FileFetch.crc``)
        self._crcs: dict[int, tuple[str, dict[int, int]]] = {
            index: (fetch.crc, {})
            for index, fetch in enumerate(self._files)
            if fetch.crc in ALGORITHMS and not fetch.checks and fetch.whole is None and self._verify
        }
        if self._crcs:
            warm_up(combine=True)  # the CRC library, loaded while the first GETs run
        self._cond = threading.Condition()
        self._error: BaseException | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._main: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._budget = ByteBudget(config.memory_budget)
        self._connections: asyncio.Semaphore | None = None
        self._check_lock = threading.Lock()  # one consumer thread checks an item at a time
        self._released = 0
        self._release_pending = False
        self._release_lock = threading.Lock()
        self._aborted = False

    def _sink(self, item: ItemRange, direct: DirectTarget | None) -> ItemSink:
        if direct is not None:
            return DirectSink(direct, item.length)
        return BlockSink(self._pool, item.length)

    def _check_of(self, fetch: FileFetch, index: int, item: ItemRange) -> BlockCheck | None:
        """The item's check, if the load verifies; it must be whole blocks of its stored item
        (refused here, before any request, rather than half checked later)."""
        check = fetch.checks.get(index)
        if check is None or not self._verify:
            return None
        if not check.covers(item.start, item.end):
            raise ValueError(
                f"{fetch.key}: item [{item.start}, {item.end}) is not whole blocks of its stored "
                f"item [{check.origin}, {check.origin + check.length}): it cannot be checked"
            )
        return check

    # ----------------------------------------------------------------- event-loop side

    async def run(self) -> None:
        """Fetch everything; returns when every item is downloaded. Raises the first failure."""
        self._loop = asyncio.get_running_loop()
        self._main = asyncio.current_task()
        if self._aborted:
            self._fail(LoadCancelledError("the load was cancelled before it started"))
            return
        connections = self._connections = asyncio.Semaphore(self._config.max_concurrency)
        if self._count_items:
            self._stats.add(files=sum(1 for f in self._files if f.plan.parts))
        try:
            for file_index, fetch in enumerate(self._files):
                whole = self._whole.get(file_index)
                if whole is not None and whole.state == "asking":
                    # before the file's first GET: the consumer folds its first item with it
                    task = asyncio.ensure_future(self._ask_checksum(file_index, connections))
                    self._tasks.add(task)
                    task.add_done_callback(self._task_done)
                for part in fetch.plan.parts:
                    await self._schedule(file_index, part, connections)
            while self._tasks:
                await asyncio.wait(set(self._tasks))
        except asyncio.CancelledError as exc:
            await self._cancel_tasks()
            error = self._error
            if error is not None and not self._aborted:
                current = asyncio.current_task()
                if current is not None:
                    current.uncancel()
                raise error from None
            self._fail(LoadCancelledError("the load was cancelled"))
            raise exc
        except BaseException as exc:
            await self._cancel_tasks()
            self._fail(exc)
            raise
        finally:
            self._stats.observe_peak(self._budget.peak)
        if self._error is not None:
            raise self._error

    async def _schedule(self, file_index: int, part: Part, connections: asyncio.Semaphore) -> None:
        """Reserve memory for the item bytes ``part`` holds, then start its GET.

        Memory is reserved per part, for the item memory its bytes take first (``held_memory``: an
        item split over several parts is reserved slice by slice), and released per item, when
        the consumer is done with it. A part is sent as planned unless the budget cannot hold it:

        - a part that carries on with an item an earlier part began cannot wait for that item's
          release (the consumer needs the part first). Once nothing else is held and the part
          still does not fit, the carried item's slice is fetched alone, beyond the budget if it
          must (an item larger than the whole budget is served alone), and the items after it
          wait for their own GET;
        - a part whose slices exceed even an empty budget is sent as several GETs, cut at item
          starts.

        So no more than ``max(memory_budget, largest item's memory)`` is ever reserved.
        """
        budget = self._budget
        items = part.items
        first = items[0]
        held = functools.partial(self._held, file_index)
        reserve = sum(held(r, max(r.start, part.start), min(r.end, part.end)) for r in items)
        if first.start < part.start:
            if await budget.acquire_beside(reserve, held(first, first.start, part.start)):
                await self._start(file_index, part, connections)
                return
            end = min(first.end, part.end)
            carried = held(first, part.start, end)
            budget.force(carried)
            await self._start(file_index, Part(part.start, end, (first,)), connections)
            if len(items) == 1:
                return
            reserve -= carried
            items = items[1:]
            part = Part(items[0].start, part.end, items)
        if reserve <= budget.limit or len(items) == 1:
            await budget.acquire(reserve)
            await self._start(file_index, part, connections)
            return
        piece: list[ItemRange] = []
        piece_held = 0
        for item in items:  # cut at item starts into pieces the budget can hold
            size = held(item, item.start, min(item.end, part.end))
            if piece and piece_held + size > budget.limit:
                await self._start_piece(file_index, piece, part.end, piece_held, connections)
                piece, piece_held = [], 0
            piece.append(item)
            piece_held += size
        await self._start_piece(file_index, piece, part.end, piece_held, connections)

    def _held(self, file_index: int, item: ItemRange, start: int, end: int) -> int:
        """Budget that receiving bytes ``[start, end)`` of ``item`` takes (``held_memory``); none
        for an item received into its destination, whose few header bytes are not counted."""
        if item in self._direct[file_index]:
            return 0
        return held_memory(item, start, end)

    async def _start_piece(
        self,
        file_index: int,
        piece: list[ItemRange],
        part_end: int,
        reserve: int,
        connections: asyncio.Semaphore,
    ) -> None:
        await self._budget.acquire(reserve)
        end = min(piece[-1].end, part_end)
        await self._start(file_index, Part(piece[0].start, end, tuple(piece)), connections)

    async def _start(self, file_index: int, part: Part, connections: asyncio.Semaphore) -> None:
        """Start the GET of ``part`` (its memory is reserved) once a connection slot is free."""
        await connections.acquire()
        task = asyncio.create_task(self._fetch_part(file_index, part, connections))
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    async def _ask_checksum(self, file_index: int, connections: asyncio.Semaphore) -> None:
        """HEAD a file read whole for its full-object checksum (``ask_checksum``); a failure
        only leaves the file unchecked (its GETs say what is wrong with it). Tracked as a
        fetch: ``abort`` cancels it, and ``run`` returns only once it ended."""
        whole = self._whole[file_index]
        key = self._files[file_index].key
        stats = self._stats
        reply, why = await ask_checksum(self._store, self._bucket, key, stats, connections)
        with self._cond:
            if whole.state == "asking":
                if reply is None:
                    stats.add(unverified_bytes=whole.give_up(why))
                else:
                    whole.expect(*reply)
                if whole.state == "unchecked":
                    logger.debug("s3://%s/%s: not checked whole: %s", self._bucket, key, whole.why)
            self._cond.notify_all()

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if task.cancelled():
            return
        exc = task.exception()
        if exc is not None:
            self._stop_on(exc)

    def _stop_on(self, exc: BaseException) -> None:
        """The first failure: record it and cancel the scheduler (which cancels the rest)."""
        if self._error is None:
            self._fail(exc)
            if self._main is not None and not self._main.done():
                self._main.cancel()

    async def _cancel_tasks(self) -> None:
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _fetch_part(
        self, file_index: int, part: Part, connections: asyncio.Semaphore
    ) -> None:
        try:
            await self._fetch(file_index, part)
        except Exception as exc:
            # Stop the scheduler *before* freeing the slot, or it would start one more GET.
            self._stop_on(exc)
            raise
        finally:
            connections.release()

    async def _fetch(self, file_index: int, part: Part) -> None:
        """Fetch one part into its items; resume a broken body at the next byte still needed.

        Every attempt (a new GET, whatever failed before it) counts towards ``max_attempts``,
        under the store's one retry policy (``S3Store.retrying``); each waits for the store's
        request-rate limiter, and a throttling reply lowers its rate.
        """
        key = self._files[file_index].key
        items = self._items[file_index]
        index = self._index[file_index]
        sink = _PartSink(self, key, [items[index[r]] for r in part.items], part.end)
        sink.pos = part.start
        stats = self._stats
        stats.add(bytes_requested=part.end - part.start)
        limiter = self._store.limiter

        async def attempt_once(attempt: int) -> None:
            if attempt > 1:
                stats.add(retries=1, resumed_bytes=sink.pos - part.start)
            started = await limiter.acquire()
            stats.add(requests=1)
            sent_at, sent_from = time.perf_counter(), sink.pos
            sink.first_at = 0.0
            try:
                await self._store.fetch_range(
                    self._bucket,
                    key,
                    sent_from,
                    part.end,
                    if_match=self._etags.get(key),
                    unmodified_since=self._store.load_started(self._bucket, key),
                    sink=sink,
                    stats=stats,
                )
                if sink.pos < part.end:  # the store's contract, checked: never publish a hole
                    raise TransferError(
                        f"s3://{self._bucket}/{key}: the body ended at byte {sink.pos}, "
                        f"before the end of its range [{part.start}, {part.end})",
                        bucket=self._bucket,
                        key=key,
                        byte_range=(part.start, part.end),
                        retryable=True,
                    )
            except AiodcpError as error:
                self._report(key, sink, sent_from, attempt, sent_at, error)
                if isinstance(error, ObjectChangedError) and key in self._recorded:
                    raise self._not_the_version(key, error) from error
                if is_throttling(error):
                    limiter.throttled(started)
                    stats.add(throttled=1)
                    stats.observe_rate(limiter.limit)
                raise
            self._report(key, sink, sent_from, attempt, sent_at, None)
            limiter.succeeded()

        await self._store.retrying(
            attempt_once,
            what=f"s3://{self._bucket}/{key} bytes [{part.start}, {part.end})",
        )

    def _report(
        self,
        key: str,
        sink: _PartSink,
        start: int,
        attempt: int,
        sent_at: float,
        error: BaseException | None,
    ) -> None:
        """Call the ``on_request`` hook for one attempt that asked for ``[start, sink.end)``."""
        hook = self._config.on_request
        if hook is None:
            return
        now = time.perf_counter()
        metrics = RequestMetrics(
            bucket=self._bucket,
            key=key,
            start=start,
            end=sink.end,
            bytes_received=sink.pos - start,
            attempt=attempt,
            latency_s=now - sent_at,
            time_to_first_byte_s=(sink.first_at - sent_at) if sink.first_at else None,
            error=None if error is None else f"{type(error).__name__}: {error}",
        )
        try:
            hook(metrics)
        except Exception:
            logger.exception("aiodcp on_request hook raised; ignored")

    def _not_the_version(self, key: str, error: ObjectChangedError) -> ObjectChangedError:
        """A GET pinned to the ETag the checkpoint recorded at its save refused: the object
        is not that version."""
        return ObjectChangedError(
            f"s3://{self._bucket}/{key} is not the version this checkpoint's metadata describes "
            f"(ETag {self._etags[key]}, recorded at the save): it was replaced or rewritten "
            "since. The checkpoint is inconsistent; save it again, or load the matching "
            f"metadata ({error})",
            bucket=self._bucket,
            key=key,
            byte_range=getattr(error, "byte_range", None),
            retryable=False,
        )

    def _pin_etag(self, key: str, etag: str | None, byte_range: tuple[int, int]) -> None:
        if etag is None:
            return
        known = self._etags.setdefault(key, etag)
        if known != etag and key in self._recorded:  # a store that ignores If-Match
            raise self._not_the_version(
                key,
                ObjectChangedError(f"it answered with ETag {etag}", bucket=self._bucket, key=key),
            )
        if known != etag:
            raise ObjectChangedError(
                f"s3://{self._bucket}/{key} was replaced while it was being loaded (ETag "
                f"{known} became {etag}); load again once the checkpoint is complete",
                bucket=self._bucket,
                key=key,
                byte_range=byte_range,
                retryable=False,
            )

    def _publish(self, item: _Item) -> None:
        """The item's last byte arrived: hand it to the consumer (who checks it first, see
        ``wait_item``)."""
        buffer = item.sink.done()
        with self._cond:
            item.buffer = buffer
            self._cond.notify_all()
        if not item.counted:  # a second fetch after a mismatch is not a second item
            item.counted = True
            if self._count_items:
                self._stats.add(items=1, bytes_used=item.range.length)

    def _fail(self, exc: BaseException) -> None:
        with self._cond:
            if self._error is None:
                self._error = exc
            self._cond.notify_all()

    # ----------------------------------------------------------------- consumer side

    def wait_item(
        self, file_index: int, item_index: int, stop: Callable[[], bool] | None = None
    ) -> ChunkBuffer:
        """Block (in a worker thread) until the item is downloaded and checked; raise the
        load's failure.

        An item with a ``BlockCheck`` is checked here, on the first waiter's thread, before any
        caller sees it; a mismatch is counted (``checksum_mismatches``), the item fetched once
        more (same ETag) and checked again, and a second mismatch raises
        ``ChecksumMismatchError``. ``stop``: checked whenever the waiter wakes (see ``wake``);
        once it returns True the wait ends with ``LoadCancelledError`` and the engine goes on
        (one caller's cancelled wait, not the download)."""
        item = self._items[file_index][item_index]
        buffer = item.buffer
        if buffer is not None and item.checked:
            return buffer
        while True:
            buffer = self._arrived(file_index, item, stop)
            if item.checked:
                return buffer
            with self._check_lock:
                if item.checked or item.buffer is not buffer:
                    continue  # another waiter checked it (or is fetching it again)
                bad = self._mismatches(file_index, item_index, item, stop)
                if not bad:
                    item.checked = True
                    return buffer
                self._stats.add(checksum_mismatches=1)
                if item.refetched:
                    raise self._mismatch_error(file_index, item, bad)
                logger.warning(
                    "%s: bytes [%d, %d) do not match their recorded checksum; fetching them again",
                    self._where(file_index),
                    bad[0][0],
                    bad[-1][1],
                )
                item.refetched = True
                self._fetch_again(file_index, item)

    def _arrived(
        self, file_index: int, item: _Item, stop: Callable[[], bool] | None
    ) -> ChunkBuffer:
        """Block until the item is published (its last byte arrived); raise the load's
        failure, ``LoadCancelledError`` once ``stop()`` says so, or, when the download made no
        progress at all for ``quiet_limit_s``, a TransferError naming the bytes waited for."""
        buffer = item.buffer
        if buffer is not None:
            return buffer
        quiet_limit = self.quiet_limit_s
        progress = self._progress()
        progress_at = time.monotonic()
        with self._cond:
            while item.buffer is None and self._error is None:
                if stop is not None and stop():
                    raise LoadCancelledError("this wait was cancelled; the download goes on")
                now = time.monotonic()
                seen = self._progress()
                if seen != progress:
                    progress, progress_at = seen, now
                elif now - progress_at >= quiet_limit:
                    raise self._stalled(file_index, item, now - progress_at)
                self._cond.wait(timeout=min(_WAKE_S, quiet_limit - (now - progress_at)))
            if item.buffer is not None:
                return item.buffer
            error = self._error
        if isinstance(error, asyncio.CancelledError):
            raise LoadCancelledError("the load was cancelled")
        raise error  # type: ignore[misc]

    @property
    def quiet_limit_s(self) -> float:
        """Seconds a consumer waits for an item while the download makes no progress at all
        (no byte received, no request started, no item completed) before it raises an error
        naming the bytes it waited for (``_store.quiet_limit_s``: only a download that stopped
        for good is that quiet)."""
        return quiet_limit_s(self._config)

    def _progress(self) -> tuple[int, int, int]:
        stats = self._stats
        return (stats.bytes_received, stats.requests, stats.items)

    def _stalled(self, file_index: int, item: _Item, quiet_s: float) -> TransferError:
        key = self._files[file_index].key
        start, end = item.range.start, item.range.end
        return TransferError(
            f"s3://{self._bucket}/{key}: waited {quiet_s:.0f} s for bytes [{start}, {end}) "
            "while the download made no progress at all (no byte received, no request sent "
            f"or retried; {len(self._tasks)} GETs in flight, {self._budget.used} of "
            f"{self._budget.limit} bytes of item memory reserved): the download stopped for "
            "good. Is aiodcp's I/O thread blocked (an on_request hook that does not return)? "
            "Otherwise this is a bug in aiodcp: please report this message",
            bucket=self._bucket,
            key=key,
            byte_range=(start, end),
            retryable=False,
        )

    def _mismatches(
        self,
        file_index: int,
        item_index: int,
        item: _Item,
        stop: Callable[[], bool] | None = None,
    ) -> list[tuple[int, int]]:
        """Check a published item (consumer thread): its blocks that differ from the record;
        counts what was verified. An item of a file read whole without a record is folded into
        the file's CRC instead (``whole_file`` says what it found). A direct item whose archive
        was not the plain layout holds no bytes here (its consumer fetches it again, checked;
        its file can no longer be checked whole)."""
        check = item.check
        length = item.range.length
        sink = item.sink
        whole = self._whole.get(file_index) if check is None else None
        pieces: Sequence[memoryview | bytes]
        if isinstance(sink, DirectSink):
            result = sink.result()
            if result is None:
                if whole is not None:
                    with self._cond:
                        why = "an item was fetched again for torch.load"
                        self._stats.add(unverified_bytes=whole.give_up(why))
                return []  # nothing was kept: the consumer fetches it again, checked
            head, tail = result
            pieces = [head, sink.target.memory, tail]
        else:
            assert item.buffer is not None
            pieces = item.buffer.chunks
        if check is None:
            taking = self._crcs.get(file_index)
            if taking is not None:  # counted by the caller, once its check is made
                algorithm, crcs = taking
                crc = crc_of(algorithm, pieces)  # outside the lock: releases the GIL
                with self._cond:
                    crcs[item_index] = crc
                return []
            if whole is None or not self._fold(file_index, item_index, item, pieces, stop):
                self._stats.add(unverified_bytes=length)
            return []
        bad = check.mismatches(item.range.start, pieces)
        if not bad:
            self._stats.add(verified_bytes=length)
        return bad

    def _fold(
        self,
        file_index: int,
        item_index: int,
        item: _Item,
        pieces: Sequence[memoryview | bytes],
        stop: Callable[[], bool] | None,
    ) -> bool:
        """Add an item's CRC to its file's (the file's algorithm: waits for the HEAD's answer
        if it is not in yet); False if the file is not being checked."""
        whole = self._whole[file_index]
        if whole.state == "asking":
            self._wait_checksum(file_index, whole, item.range, stop)
        with self._cond:
            checked = whole.object
            if whole.state != "checking" or checked is None:
                return False
        crc = checked.crc(pieces)  # outside the lock: the CRC releases the GIL, takes time
        with self._cond:
            if whole.object is not checked:
                return False  # given up meanwhile
            whole.crcs[item_index] = crc
            checked.add(item.range.start, item.range.length, crc)
            whole.pending += item.range.length
        return True

    def _wait_checksum(
        self,
        file_index: int,
        whole: _WholeState,
        item: ItemRange,
        stop: Callable[[], bool] | None,
    ) -> None:
        """Block until the file's HEAD answered (or the load failed: raise its failure; or no
        progress at all for ``quiet_limit_s``: a TransferError naming what it waited for)."""
        quiet_limit = self.quiet_limit_s
        progress = (*self._progress(), self._stats.checksum_requests)
        progress_at = time.monotonic()
        with self._cond:
            while whole.state == "asking" and self._error is None:
                if stop is not None and stop():
                    raise LoadCancelledError("this wait was cancelled; the download goes on")
                now = time.monotonic()
                seen = (*self._progress(), self._stats.checksum_requests)
                if seen != progress:
                    progress, progress_at = seen, now
                elif now - progress_at >= quiet_limit:
                    key = self._files[file_index].key
                    start, end = item.start, item.end
                    raise TransferError(
                        f"s3://{self._bucket}/{key}: waited {now - progress_at:.0f} s for the "
                        "store's answer to the HEAD asking for the object's checksum (to check "
                        f"bytes [{start}, {end})) while the download made no progress at all "
                        "(no byte received, no request sent or retried): the download stopped "
                        "for good. Is aiodcp's I/O thread blocked (an on_request hook that does "
                        "not return)? Otherwise this is a bug in aiodcp: please report this "
                        "message; verify_checksums=False loads without asking",
                        bucket=self._bucket,
                        key=key,
                        byte_range=(start, end),
                        retryable=False,
                    )
                self._cond.wait(timeout=min(_WAKE_S, quiet_limit - (now - progress_at)))
            if whole.state != "asking":
                return
            error = self._error
        if isinstance(error, asyncio.CancelledError):
            raise LoadCancelledError("the load was cancelled")
        raise error  # type: ignore[misc]

    def checks_whole(self, file_index: int) -> bool:
        """Whether the file is read whole to be checked against the store's checksum."""
        return file_index in self._whole

    def whole_file(self, file_index: int) -> WholeFileResult | None:
        """For a file read whole against the store's checksum (``FileFetch.whole``), once
        every item of it was waited for: whether its bytes match (counted as verified) or not
        (nothing counted: the caller reads it again, see ``WholeFileResult``), or could not be
        checked (counted as unverified); None for any other file. ``ObjectChangedError`` if the
        HEAD and the GETs saw different versions of the object."""
        whole = self._whole.get(file_index)
        if whole is None:
            return None
        key = self._files[file_index].key
        with self._cond:
            checked = whole.object
            if whole.state != "checking" or checked is None or not checked.done:
                why = whole.why or "not every byte of it was handed over"
                self._stats.add(unverified_bytes=whole.give_up(why))
                return WholeFileResult("unverified", why=why)
            pinned = self._etags.get(key)
            if whole.etag is not None and pinned is not None and whole.etag != pinned:
                whole.give_up("replaced while it was read")
                raise ObjectChangedError(
                    f"s3://{self._bucket}/{key} was replaced while it was being loaded (its "
                    f"checksum was asked of ETag {whole.etag}, its bytes came from {pinned}); "
                    "load again once the checkpoint is complete",
                    bucket=self._bucket,
                    key=key,
                    retryable=False,
                )
            if checked.matches:
                self._stats.add(verified_bytes=whole.pending)
                whole.pending = 0
                return WholeFileResult("verified", checked.algorithm, checked.expected, whole.end)
            whole.pending = 0  # the caller reads the file again: that read counts it
            return WholeFileResult(
                "mismatch", checked.algorithm, checked.expected, whole.end, dict(whole.crcs)
            )

    def crcs(self, file_index: int) -> list[tuple[ItemRange, int]]:
        """The items of a file with ``FileFetch.crc`` whose CRCs were taken (every item handed
        over, but for a direct item fetched again for torch.load), each with its CRC, in
        file order; [] for any other file."""
        taking = self._crcs.get(file_index)
        if taking is None:
            return []
        crcs = taking[1]
        items = self._files[file_index].plan.items
        with self._cond:
            return [(items[i], crc) for i, crc in sorted(crcs.items())]

    def item_crc(self, file_index: int, item_index: int) -> int | None:
        """The CRC (in its file's algorithm) of an item of a file read whole, once checked."""
        whole = self._whole.get(file_index)
        return None if whole is None else whole.crcs.get(item_index)

    def _fetch_again(self, file_index: int, item: _Item) -> None:
        """Fetch a published item once more into a fresh sink (its memory reservation is
        still held), pinned to the ETag of the first fetch; ``wait_item`` waits for it."""
        sink = item.sink
        direct = sink.target if isinstance(sink, DirectSink) else None
        with self._cond:
            item.buffer = None
            item.missing = item.range.length
        sink.release()
        item.sink = self._sink(item.range, direct)
        loop = self._loop
        part = Part(item.range.start, item.range.end, (item.range,))
        if loop is None or loop.is_closed():
            self._fail(LoadCancelledError("the load's event loop is closed"))
            return
        try:
            loop.call_soon_threadsafe(self._start_again, file_index, part)
        except RuntimeError:
            self._fail(LoadCancelledError("the load's event loop is closed"))

    def _start_again(self, file_index: int, part: Part) -> None:
        """On the loop: start the GET of ``_fetch_again``, tracked as any fetch (``abort``
        cancels it, its failure fails the load)."""
        if self._aborted or self._error is not None:
            self._fail(LoadCancelledError("the load was cancelled"))
            return
        task = asyncio.ensure_future(self._refetch(file_index, part))
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    async def _refetch(self, file_index: int, part: Part) -> None:
        connections = self._connections
        assert connections is not None  # run() began: an item was published
        await connections.acquire()
        await self._fetch_part(file_index, part, connections)

    def _where(self, file_index: int) -> str:
        return f"s3://{self._bucket}/{self._files[file_index].key}"

    def _mismatch_error(
        self, file_index: int, item: _Item, bad: list[tuple[int, int]]
    ) -> ChecksumMismatchError:
        check = item.check
        assert check is not None
        key = self._files[file_index].key
        stored = (check.origin, check.origin + check.length)
        blocks = ", ".join(f"[{a}, {b})" for a, b in bad[:4]) + (" ..." if len(bad) > 4 else "")
        etag = self._etags.get(key)
        what = f" of {check.where}" if check.where else ""
        error = ChecksumMismatchError(
            f"{self._where(file_index)}: bytes {blocks} (stored item [{stored[0]}, "
            f"{stored[1]}){what}) do not match the CRC64NVME the checkpoint recorded for them, "
            f"on the first fetch and again when fetched once more"
            f"{'' if etag is None else f' (ETag {etag})'}: the object was damaged or altered "
            "after it was saved, or something between the store and this host corrupts "
            "data. Nothing of it was handed to torch. Check the checkpoint with `aiodcp "
            "verify`; verify_checksums=False loads the bytes as they are.",
            bucket=self._bucket,
            key=key,
            item_range=stored,
            byte_range=bad[0],
            mismatched=tuple(bad),
        )
        self._fail(error)
        return error

    def wake(self) -> None:
        """Wake every ``wait_item`` so that each checks its ``stop`` again (any thread)."""
        with self._cond:
            self._cond.notify_all()

    def etags(self) -> dict[str, str]:
        """key -> the ETag the load's GETs of it were pinned to, for a later engine of the same
        load (a copy)."""
        return dict(self._etags)

    def etag(self, key: str) -> str | None:
        """The ETag the load's GETs of ``key`` are pinned to (None before the first response)."""
        return self._etags.get(key)

    def direct_result(self, file_index: int, item_index: int) -> tuple[bytes, bytes] | None:
        """For a downloaded direct item: its bytes before and after the target's memory, or
        None if it could not be received directly (fetch it again for the buffered path)."""
        sink = self._items[file_index][item_index].sink
        assert isinstance(sink, DirectSink)
        return sink.result()

    def release_item(self, file_index: int, item_index: int) -> None:
        """Drop the item's bytes and give them back to the budget (any thread).

        Releases are batched: while one wake-up of the loop is pending, later releases only add
        to it (20,000 small items would otherwise cost 20,000 loop wake-ups).
        """
        item = self._items[file_index][item_index]
        item.buffer = None
        item.sink.release()
        if item.range in self._direct[file_index]:
            return  # held no budget (see _held)
        with self._release_lock:
            self._released += held_memory(item.range, item.range.start, item.range.end)
            if self._release_pending:
                return
            self._release_pending = True
        loop = self._loop
        if loop is not None and not loop.is_closed():
            try:
                loop.call_soon_threadsafe(self._apply_releases)
            except RuntimeError:  # loop closed meanwhile: nothing left to wake
                pass

    def _apply_releases(self) -> None:
        with self._release_lock:
            released, self._released = self._released, 0
            self._release_pending = False
        self._budget.release(released)

    def abort(self) -> None:
        """Stop the load (thread-safe): cancel every request and wake the consumer."""
        self._aborted = True
        self._fail(LoadCancelledError("the load was cancelled"))
        loop, main = self._loop, self._main
        if loop is not None and main is not None and not loop.is_closed():
            try:
                loop.call_soon_threadsafe(main.cancel)
                loop.call_soon_threadsafe(self._cancel_stray)
            except RuntimeError:
                pass

    def _cancel_stray(self) -> None:
        """Cancel fetches started after ``run`` returned (an item fetched again)."""
        for task in list(self._tasks):
            task.cancel()
