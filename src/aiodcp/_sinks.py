"""Item sinks: where the bytes of one stored item go as a ranged GET delivers them.

The fetch engine (``_engine``) walks each response body and hands every item's bytes to that
item's sink (``ItemSink``), which says where they go; the engine knows nothing else of them:

- ``BlockSink`` (a buffered item): memory of the item's own, one heap buffer for a small item,
  else 1 MiB blocks from a ``BlockPool`` (recycled between items), each taken as its first byte
  arrives; the consumer reads a ``ChunkBuffer`` over them, then releases them to the pool.
- ``DirectSink`` (direct receipt): the payload straight into a ``DirectTarget``'s memory (a
  destination tensor; ``dcp._fastdecode.DirectReceive`` and ``dcp._format.RunReceive``
  implement it), after the target located it from the item's first bytes; bytes that arrive
  before that are kept aside and placed once it is. The consumer verifies the head and tail
  (``DirectSink.result``).

``held_memory`` is what receiving part of an item holds (whole blocks), which the engine
reserves from its byte budget; ``item_memory`` is the same for a whole item.

Runs on the event loop that receives (``view``/``written``/``aside``/``done``), except
``release``, called from the consumer thread (``list`` appends and pops are atomic).
"""

from __future__ import annotations

import mmap
from collections.abc import Iterable
from typing import Protocol

from ._planner import ItemRange
from ._reader import ChunkBuffer

__all__ = [
    "BLOCK_BYTES",
    "NO_BYTES",
    "BlockPool",
    "BlockSink",
    "DirectSink",
    "DirectTarget",
    "ItemSink",
    "held_memory",
    "item_memory",
]


class DirectTarget(Protocol):
    """Where an item's payload goes instead of item memory (``dcp._fastdecode.DirectReceive``).

    ``locate(head)`` is given the item's first bytes (at most ``head_bytes``) as they arrive and
    answers the item offset at which ``memory`` begins (None: not yet known; -1: this item is
    not for direct receipt). The item's bytes before that offset (``head``) and after
    ``memory`` (``tail``, at most ``tail_bytes``) are kept for the consumer to verify."""

    head_bytes: int
    tail_bytes: int
    memory: memoryview

    def locate(self, head: bytes) -> int | None: ...


class ItemSink(Protocol):
    """Where the bytes of one item go as they arrive (called on the loop, by ``_PartSink``).

    ``view(offset, limit)`` is memory for the item's bytes from ``offset`` on (at most
    ``limit``), or None: receive them into scratch and hand them over with ``aside``, which
    answers whether it kept them (they arrived before the sink could place them). ``written``
    says ``n`` bytes arrived in the view given for ``offset``. ``done()`` (the item's last byte
    arrived) is what the consumer's ``wait_item`` returns; ``release()`` (consumer thread)
    drops the item's memory.

    Two kinds: ``BlockSink`` (buffered items: recycled 1 MiB blocks, a ``ChunkBuffer`` over them)
    and ``DirectSink`` (a destination: the payload straight into a ``DirectTarget``'s memory)."""

    def view(self, offset: int, limit: int) -> memoryview | None: ...

    def written(self, offset: int, n: int) -> None: ...

    def aside(self, offset: int, data: memoryview) -> bool: ...

    def done(self) -> ChunkBuffer: ...

    def release(self) -> None: ...


NO_BYTES = ChunkBuffer([])
"""What a direct item publishes: its bytes are in its destination (see ``direct_result``)."""

BLOCK_BYTES = 1024 * 1024
"""Item memory comes in blocks of this size, recycled between items (``BlockPool``)."""


class BlockPool:
    """Recycled 1 MiB blocks of item memory.

    Fresh memory is expensive: the kernel zeroes every page on its first touch, which cost
    ~1.2 s per GiB here against ~0.07 s to write the same bytes into memory already mapped.
    So items of at least half a block are received into blocks that go back to this pool when
    the item is released and serve the next items; the pool holds about the bytes reserved at
    the peak (the byte budget), and is freed with its owner (an engine, or a shared load's
    exchange, whose received items take blocks from a pool of its own). Smaller items take a
    ``bytearray`` from the heap, which recycles them by itself. Taken on the loop, given back
    from the consumer thread (``list`` appends and pops are atomic).
    """

    def __init__(self) -> None:
        self._free: list[memoryview] = []
        self.created = 0  # blocks mapped so far: the pool's memory

    def slots(self, length: int) -> list[memoryview | None]:
        """Memory for an item of ``length`` bytes: one exact heap buffer for a small item, or a
        slot per block, filled by ``block()`` when the first byte of that block arrives (an item
        split over several GETs holds memory only for the bytes that came)."""
        if length < BLOCK_BYTES // 2:
            return [memoryview(bytearray(length))]
        return [None] * -(-length // BLOCK_BYTES)

    def block(self) -> memoryview:
        try:
            return self._free.pop()
        except IndexError:
            self.created += 1
            return memoryview(mmap.mmap(-1, BLOCK_BYTES))

    def give(self, blocks: Iterable[memoryview | None]) -> None:
        self._free.extend(b for b in blocks if b is not None and len(b) == BLOCK_BYTES)


def held_memory(item: ItemRange, start: int, end: int) -> int:
    """Bytes of memory that receiving bytes ``[start, end)`` of ``item`` takes first.

    A small item is one heap buffer, taken with its first byte. A larger one is 1 MiB blocks,
    each charged to the bytes that hold its first byte. Summed over any cut of the item into
    consecutive ranges this is the memory the whole item holds, so the budget counts memory,
    not bytes (an item of 600 KiB holds a whole block).
    """
    if item.length < BLOCK_BYTES // 2:
        return item.length if start <= item.start < end else 0
    first = -(-(start - item.start) // BLOCK_BYTES)  # first block starting at or after start
    stop = -(-(end - item.start) // BLOCK_BYTES)
    return (stop - first) * BLOCK_BYTES


class BlockSink:
    """The sink of a buffered item: its bytes in memory of its own from the pool (one heap
    buffer for a small item, else 1 MiB blocks, each taken as its first byte arrives)."""

    __slots__ = ("_blocks", "_length", "_pool")

    def __init__(self, pool: BlockPool, length: int) -> None:
        self._pool = pool
        self._length = length
        self._blocks: list[memoryview | None] | None = None

    def view(self, offset: int, limit: int) -> memoryview:
        blocks = self._blocks
        if blocks is None:
            blocks = self._blocks = self._pool.slots(self._length)
        block, at = divmod(offset, BLOCK_BYTES)
        memory = blocks[block]
        if memory is None:
            memory = blocks[block] = self._pool.block()
        view = memory[at:]
        return view if len(view) <= limit else view[:limit]

    def written(self, offset: int, n: int) -> None:
        pass  # the bytes are in place

    def aside(self, offset: int, data: memoryview) -> bool:
        raise AssertionError("a buffered item always has memory for its bytes")

    def done(self) -> ChunkBuffer:
        blocks = self._blocks
        assert blocks is not None
        full: list[memoryview] = [b for b in blocks if b is not None]
        assert len(full) == len(blocks)  # every byte arrived, so every block is there
        tail = self._length - (len(full) - 1) * BLOCK_BYTES
        chunks = [*full[:-1], full[-1][:tail]] if len(full[-1]) != tail else full
        return ChunkBuffer(chunks, self._length)

    def release(self) -> None:
        blocks, self._blocks = self._blocks, None
        if blocks is not None:
            self._pool.give(blocks)


class DirectSink:
    """The sink of an item received into its ``DirectTarget``: the state of one item, on the
    loop.

    Until ``locate`` answers, the first ``head_bytes`` go into ``head`` and any later byte
    (a part that starts inside the item can arrive first) is kept aside in ``spills``. Once
    located, bytes go straight to the target's memory, the few after it into ``tail``, and
    what was kept aside is put in place. An item ``locate`` refuses is ``failed``: its bytes are
    dropped and the consumer fetches it again for the buffered path. A target with
    ``head_bytes`` 0 needs no head to locate its memory: it answers at once, and the bytes it
    says lie before its memory (a verified run's lead-in: the rest of its first checksum
    block) are kept in ``head`` as they arrive, as the bytes after it are in ``tail``.
    """

    __slots__ = ("failed", "have", "head", "length", "spills", "start", "stop", "tail", "target")

    def __init__(self, target: DirectTarget, length: int) -> None:
        self.target = target
        self.length = length
        self.head = bytearray(min(length, target.head_bytes))
        self.have = bytearray(len(self.head))  # 1 for every head byte received
        self.start = -1  # item offset of the target's memory, -1 until located
        self.stop = -1
        self.tail = bytearray()
        self.spills: list[tuple[int, bytes]] = []
        self.failed = False
        if not self.head:  # nothing to locate from (a run): the target says where it begins
            self._locate(0)

    def view(self, offset: int, limit: int) -> memoryview | None:
        """Where the item's bytes from ``offset`` on go (at most ``limit``); None: drop them
        into scratch (failed), or keep them aside (``spill``) while the start is unknown."""
        if self.failed:
            return None
        start = self.start
        if start < 0:
            if offset >= len(self.head):
                return None
            view = memoryview(self.head)[offset:]
        elif offset < start:  # before the memory: the head (a run's lead-in)
            if len(self.head) < start:  # a lead-in, taken when its first byte comes
                self.head = bytearray(start)
            view = memoryview(self.head)[offset:start]
        elif offset < self.stop:
            view = self.target.memory[offset - start :]
        else:
            if len(self.tail) < self.length - self.stop:  # taken when its first byte comes
                self.tail = bytearray(self.length - self.stop)
            view = memoryview(self.tail)[offset - self.stop :]
        return view if len(view) <= limit else view[:limit]

    def written(self, offset: int, n: int) -> None:
        """``n`` bytes arrived at ``offset`` in the view given for it."""
        if self.start >= 0 or self.failed or offset >= len(self.head):
            return
        have = self.have
        have[offset : offset + n] = b"\x01" * n
        received = have.find(0)
        if received < 0:
            received = len(have)
        if received <= offset:  # an earlier byte is still missing
            return
        self._locate(received)

    def _locate(self, received: int) -> None:
        """Ask the target where its memory begins, from the first ``received`` head bytes;
        once it knows, put every byte received so far in place."""
        have = self.have
        found = self.target.locate(bytes(self.head[:received]))
        if found is None:
            return
        # Located from the head it read (at most the bytes it saw), or, needing none, at once.
        upfront = not self.have and received == 0
        if found < 0 or (found > received and not upfront):
            self._fail()
            return
        stop = found + len(self.target.memory)
        if not 0 <= self.length - stop <= self.target.tail_bytes:
            self._fail()
            return
        head = self.head
        # A lead-in and every tail are taken (``view``) when their first byte comes: a load of
        # many windows holds only those it is receiving.
        self.head = bytearray() if upfront else bytearray(head[:found])
        self.start, self.stop = found, stop
        self.tail = bytearray()
        at = found
        while at < len(have):  # head bytes past the start: into the memory or the tail
            at = have.find(1, at)
            if at < 0:
                break
            end = have.find(0, at)
            end = len(have) if end < 0 else end
            self._place(at, memoryview(head)[at:end])
            at = end
        self.have = bytearray()
        spills, self.spills = self.spills, []
        for offset_, data in spills:
            self._place(offset_, memoryview(data))

    def aside(self, offset: int, data: memoryview) -> bool:
        """Bytes that arrived before the start was known (or, failed, are not needed); True
        if they were kept aside until it is."""
        if self.failed:
            return False
        if self.start >= 0:
            self._place(offset, data)
            return False
        self.spills.append((offset, bytes(data)))
        return True

    def done(self) -> ChunkBuffer:
        return NO_BYTES  # the bytes are in the destination (see ``result``)

    def release(self) -> None:
        self.head = self.tail = bytearray()  # holds no budget (see ``FetchEngine._held``)

    def result(self) -> tuple[bytes, bytes] | None:
        """The bytes before and after the target's memory, or None if the item could not be
        received into it (fetch it again for the buffered path)."""
        if self.failed or self.start < 0:
            return None
        return bytes(self.head), bytes(self.tail)

    def _place(self, offset: int, data: memoryview) -> None:
        while data:
            view = self.view(offset, len(data))
            if view is None:
                return
            n = len(view)
            view[:] = data[:n]
            offset += n
            data = data[n:]

    def _fail(self) -> None:
        self.failed = True
        self.head = bytearray()
        self.have = bytearray()
        self.tail = bytearray()
        self.spills = []


def item_memory(length: int) -> int:
    """Bytes of memory an item of ``length`` bytes holds once received (``held_memory`` of
    the whole item): whole 1 MiB blocks for items of half a block or more."""
    if length < BLOCK_BYTES // 2:
        return length
    return -(-length // BLOCK_BYTES) * BLOCK_BYTES
