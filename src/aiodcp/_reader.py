"""File-like readers over downloaded items: what ``torch.load`` and ``dcp.load`` read from.

Data flow::

    S3 ranged GET ──> list[memoryview] chunks of one item, as they came off the network
                          │  (never joined, never copied into a BytesIO)
                          ▼
                      ChunkBuffer          random-access, read-only file view of ONE item
                          │  get_item(i) hands it out, release_item(i) frees it
                          ▼
                      SequentialReader     file-positioned view of ONE checkpoint file: the
                          │                planned items, in order, in file coordinates
                          ▼
                      current_buffer() ──> ChunkBuffer ──> torch.load(..., weights_only=True)
                      (or dcp's _ReaderView over the reader ──> torch.load)

``torch.load`` calls ``seek``/``tell``/``read``/``readinto`` ~50 times per item, so the hot paths
here are a bisect over precomputed chunk offsets and one slice copy; a read that spans chunks
joins only the slices it needs (a read never spans items: each item is its own buffer).
``readinto`` copies runs of ``_UNLOCKED_COPY_BYTES`` or more with ``ctypes.memmove``, which
releases the GIL, so the thread receiving the next items (the event loop's) is not held up
while a tensor's bytes are copied.

Misuse raises :class:`~aiodcp.SequentialAccessError` (a ``ValueError``) or
:class:`~aiodcp.ReaderTypeError` (a ``TypeError``); a failed call changes nothing (but a move to
the next item releases the current one before fetching it: see ``current_buffer``).
"""

from __future__ import annotations

import ctypes
import operator
from bisect import bisect_right
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Protocol

from ._errors import InvalidRangeError, ReaderTypeError, SequentialAccessError

if TYPE_CHECKING:
    from types import TracebackType
    from typing import Self

    from typing_extensions import Buffer

__all__ = [
    "FALLBACK_HINT",
    "SEQUENTIAL_ACCESS_CONTRACT",
    "ChunkBuffer",
    "SequentialReader",
]

SEQUENTIAL_ACCESS_CONTRACT = (
    "aiodcp's DCP reader serves only the planned byte ranges of {name}, in order: "
    "any seek inside the current item, forward-only across items."
)
"""Prefix of every :class:`SequentialAccessError` a :class:`SequentialReader` raises."""

FALLBACK_HINT = "For other access patterns use aiodcp.S3ObjectReader, the generic reader."
"""Suffix of every :class:`SequentialAccessError` a :class:`SequentialReader` raises."""

_SEEK_SET = 0
_SEEK_CUR = 1
_SEEK_END = 2

_UNLOCKED_COPY_BYTES = 64 * 1024
"""Copies at least this long go through ``ctypes.memmove`` with the GIL released. A slice
assignment holds the GIL for the whole memcpy, and the receiving thread waits meanwhile: 1 GiB
loads from a local nginx took a median 0.81 s that way and 0.72 s with unlocked copies (8 paired
loads). Shorter copies keep the slice assignment, cheaper than a GIL release and re-take."""


def _address(view: memoryview) -> int:
    """The address of a writable, C-contiguous byte view's first byte."""
    return ctypes.addressof(ctypes.c_char.from_buffer(view))


class _Span(Protocol):
    """A byte range ``[start, end)``: the planner's ``ItemRange`` or anything shaped like it."""

    @property
    def start(self) -> int: ...

    @property
    def end(self) -> int: ...


def _as_int(value: object, what: str, owner: str) -> int:
    """``value`` as an ``int`` (``__index__`` honoured, ``bool`` refused) or ReaderTypeError."""
    if isinstance(value, bool):
        raise ReaderTypeError(
            f"{owner}: {what} must be an int, not bool", argument=what, value=value
        )
    try:
        return operator.index(value)  # type: ignore[arg-type]
    except TypeError:
        raise ReaderTypeError(
            f"{owner}: {what} must be an int, not {type(value).__name__}",
            argument=what,
            value=repr(value),
        ) from None


def _buffer_type_error(obj: object, what: str, problem: str) -> ReaderTypeError:
    return ReaderTypeError(
        f"{what} must be a {problem} bytes-like object (bytes, bytearray, memoryview...), "
        f"not {type(obj).__name__}",
        argument=what,
        type=type(obj).__name__,
    )


def _byte_view(obj: object, what: str, *, writable: bool) -> memoryview:
    """A flat, C-contiguous, unsigned-byte memoryview of ``obj``, or ReaderTypeError."""
    try:
        view = obj if type(obj) is memoryview else memoryview(obj)  # type: ignore[arg-type]
    except TypeError:
        raise _buffer_type_error(obj, what, "writable" if writable else "readable") from None
    if writable and view.readonly:
        raise _buffer_type_error(obj, what, "writable (not read-only)")
    if not view.c_contiguous:
        raise _buffer_type_error(obj, what, "C-contiguous (not strided)")
    if view.format != "B" or view.ndim != 1:
        view = view.cast("B")
    return view


class ChunkBuffer:
    """Random-access, read-only binary file over one item held as a list of chunks.

    Positions run from 0 to ``len(self)``. Seeking past the end is allowed, as for a file; reads
    there return ``b""``. The chunks are kept as read-only ``memoryview`` objects and never joined:
    a read inside one chunk is ``chunk[a:b].tobytes()``, a read across chunks joins only the slices
    it needs, and :meth:`readinto` copies straight from the chunks into the destination.
    """

    __slots__ = ("_chunks", "_closed", "_ends", "_length", "_pos", "_sources", "_starts")

    def __init__(self, chunks: Iterable[Buffer], length: int | None = None) -> None:
        views: list[memoryview] = []
        sources: list[memoryview | None] = []
        starts: list[int] = []
        ends: list[int] = []
        total = 0
        for index, chunk in enumerate(chunks):
            view = _byte_view(chunk, f"ChunkBuffer chunk {index}", writable=False)
            size = len(view)
            if size:  # empty chunks would break the bisect; they hold nothing anyway
                # A writable chunk is kept writable too, privately: ctypes needs that to take
                # its address for an unlocked copy (_copy_into). Nothing here writes to it.
                sources.append(None if view.readonly else view)
                if not view.readonly:
                    view = view.toreadonly()
                views.append(view)
                starts.append(total)
                total += size
                ends.append(total)
        if length is not None:
            length = _as_int(length, "length", "ChunkBuffer")
            if length != total:
                raise InvalidRangeError(
                    f"ChunkBuffer: the chunks hold {total} bytes but length={length} was given",
                    length=length,
                    received=total,
                )
        self._chunks: tuple[memoryview, ...] = tuple(views)
        self._sources: tuple[memoryview | None, ...] = tuple(sources)
        self._starts = starts
        self._ends = ends
        self._length = total
        self._pos = 0
        self._closed = False

    # -- internals shared with SequentialReader (no position, no checks) ------------------

    def _slice(self, pos: int, end: int) -> bytes:
        """The bytes ``[pos, end)``; requires ``0 <= pos < end <= len(self)``."""
        starts = self._starts
        i = bisect_right(starts, pos) - 1
        chunk = self._chunks[i]
        base = starts[i]
        if end <= self._ends[i]:
            return chunk[pos - base : end - base].tobytes()
        parts = [chunk[pos - base :]]
        self._collect(i + 1, end, parts)
        return b"".join(parts)

    def _collect(self, i: int, end: int, parts: list[memoryview]) -> None:
        """Append chunk ``i`` onwards to ``parts``, the last one cut at ``end``."""
        chunks = self._chunks
        ends = self._ends
        while ends[i] < end:
            parts.append(chunks[i])
            i += 1
        parts.append(chunks[i][: end - self._starts[i]])

    def _copy_into(self, pos: int, end: int, dst: memoryview) -> None:
        """Copy ``[pos, end)`` into ``dst`` (a flat byte view of exactly ``end - pos`` bytes).

        Runs of ``_UNLOCKED_COPY_BYTES`` or more out of writable chunks are copied by
        ``ctypes.memmove`` with the GIL released (``dst`` is writable: every caller checks);
        the rest by slice assignment.
        """
        starts = self._starts
        ends = self._ends
        chunks = self._chunks
        i = bisect_right(starts, pos) - 1
        base = starts[i]
        if end - pos < _UNLOCKED_COPY_BYTES:
            if end <= ends[i]:
                dst[:] = chunks[i][pos - base : end - base]
                return
            destination = 0
        else:
            destination = _address(dst)
        sources = self._sources
        offset = 0
        while pos < end:
            stop = ends[i] if ends[i] < end else end
            count = stop - pos
            base = starts[i]
            source = sources[i]
            if destination and source is not None and count >= _UNLOCKED_COPY_BYTES:
                ctypes.memmove(destination + offset, _address(source) + pos - base, count)
            else:
                dst[offset : offset + count] = chunks[i][pos - base : stop - base]
            offset += count
            pos = stop
            i += 1

    def _closed_error(self) -> SequentialAccessError:
        return SequentialAccessError("I/O operation on a closed ChunkBuffer", length=self._length)

    def window(self, start: int, end: int) -> ChunkBuffer:
        """The bytes ``[start, end)`` as a ChunkBuffer of their own, over the same memory (no
        copy; a slice of a fetched window of whole checksum blocks, say)."""
        start = _as_int(start, "start", "ChunkBuffer.window()")
        end = _as_int(end, "end", "ChunkBuffer.window()")
        if not 0 <= start <= end <= self._length:
            raise InvalidRangeError(
                f"ChunkBuffer.window({start!r}, {end!r}): not a range of its {self._length} bytes",
                length=self._length,
            )
        pieces: list[memoryview] = []
        if start < end:
            i = bisect_right(self._starts, start) - 1
            while i < len(self._chunks) and self._starts[i] < end:
                base = self._starts[i]
                source = self._sources[i]
                chunk = source if source is not None else self._chunks[i]
                pieces.append(chunk[max(start, base) - base : min(end, self._ends[i]) - base])
                i += 1
        return ChunkBuffer(pieces, end - start)

    # -- file API ----------------------------------------------------------------------

    def read(self, size: int | None = -1, /) -> bytes:
        """Up to ``size`` bytes from the position (``None`` or negative: to the end)."""
        if type(size) is not int:
            size = -1 if size is None else _as_int(size, "size", "ChunkBuffer.read()")
        if self._closed:
            raise self._closed_error()
        pos = self._pos
        length = self._length
        end = length if size < 0 or pos + size > length else pos + size
        if pos >= end:
            return b""
        starts = self._starts
        i = bisect_right(starts, pos) - 1
        if end <= self._ends[i]:  # inside one chunk: the common case
            base = starts[i]
            data = self._chunks[i][pos - base : end - base].tobytes()
        else:
            data = self._slice(pos, end)
        self._pos = end
        return data

    def readall(self) -> bytes:
        """The bytes from the position to the end."""
        return self.read(-1)

    def readinto(self, buffer: Buffer, /) -> int:
        """Fill ``buffer`` (any writable, C-contiguous buffer) from the position; bytes copied."""
        if (
            type(buffer) is memoryview
            and not buffer.readonly
            and buffer.ndim == 1
            and buffer.format == "B"
            and buffer.c_contiguous
        ):
            dst = buffer
        else:
            dst = _byte_view(buffer, "ChunkBuffer.readinto() buffer", writable=True)
        if self._closed:
            raise self._closed_error()
        pos = self._pos
        count = len(dst)
        end = pos + count
        if end > self._length:
            end = self._length
            if pos >= end:
                return 0
            count = end - pos
            dst = dst[:count]
        elif count == 0:
            return 0
        starts = self._starts
        i = bisect_right(starts, pos) - 1
        if end <= self._ends[i] and count < _UNLOCKED_COPY_BYTES:  # the common small read
            base = starts[i]
            dst[:] = self._chunks[i][pos - base : end - base]
        else:
            self._copy_into(pos, end, dst)
        self._pos = end
        return count

    readinto1 = readinto

    def seek(self, offset: int, whence: int = _SEEK_SET, /) -> int:
        """Move to ``offset`` relative to the start, the position or the end; the new position."""
        if type(offset) is not int:
            offset = _as_int(offset, "offset", "ChunkBuffer.seek()")
        if type(whence) is not int:
            whence = _as_int(whence, "whence", "ChunkBuffer.seek()")
        if self._closed:
            raise self._closed_error()
        if whence == _SEEK_SET:
            target = offset
        elif whence == _SEEK_CUR:
            target = self._pos + offset
        elif whence == _SEEK_END:
            target = self._length + offset
        else:
            raise SequentialAccessError(
                f"ChunkBuffer.seek(): invalid whence {whence} (use 0, 1 or 2)", whence=whence
            )
        if target < 0:
            raise SequentialAccessError(
                f"ChunkBuffer.seek(): negative position {target} "
                f"(offset {offset}, whence {whence}, position {self._pos})",
                position=target,
            )
        self._pos = target
        return target

    def tell(self) -> int:
        """The position."""
        if self._closed:
            raise self._closed_error()
        return self._pos

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def writable(self) -> bool:
        return False

    def close(self) -> None:
        """Drop the chunks (their memory can be freed). Further I/O raises; idempotent."""
        self._closed = True
        self._chunks = ()
        self._starts = []
        self._ends = []

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def chunks(self) -> tuple[memoryview, ...]:
        """The non-empty chunks, as read-only flat byte views (empty once closed)."""
        return self._chunks

    def __len__(self) -> int:
        return self._length

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"position={self._pos}"
        return f"<ChunkBuffer length={self._length} chunks={len(self._chunks)} {state}>"


class SequentialReader:
    """File-positioned reader over the planned items of one checkpoint file, for ``dcp.load``.

    ``items`` are the planned byte ranges of the file (file coordinates; sorted, non-overlapping,
    deduplicated). Positions are file offsets and start at ``items[0].start``. The contract:

    * any seek inside the current item (``start <= position <= end``) is allowed;
    * a seek forward to a position inside a later item makes that item current (at the
      boundary of two adjacent items, the one starting there); the items passed are released,
      and the skipped ones are never fetched;
    * a seek back before the current item, into a gap, past the last item or relative to the end
      raises :class:`SequentialAccessError`;
    * ``read(n)``/``readinto(b)`` read from one item: the item :meth:`current_buffer` gives
      (the current one, or at its end the next if it starts exactly there, which then becomes
      current). A read past that item's end is short if a gap or nothing follows it, and
      raises :class:`SequentialAccessError` naming the boundary if the next item starts there:
      items are separate buffers, so read each on its own (``seek(item.start)`` then
      :meth:`current_buffer`, as ``dcp.load`` does). Sizes must be ``>= 0``.

    ``get_item(i)`` is called once, at the first read from item ``i`` (or :meth:`current_buffer`);
    ``release_item(i)`` exactly once, when the reader moves past item ``i`` or, for the current
    item, on :meth:`close`. A call that raises leaves the position and the current item as they
    were, except that a move to the next item releases the current one before fetching it (see
    :meth:`current_buffer`) and an exception from ``release_item`` propagates after the move.
    """

    __slots__ = (
        "_closed",
        "_cur",
        "_cur_buf",
        "_cur_end",
        "_cur_start",
        "_ends",
        "_get_item",
        "_items",
        "_pos",
        "_release_item",
        "_starts",
        "name",
    )

    def __init__(
        self,
        items: Sequence[_Span],
        get_item: Callable[[int], ChunkBuffer],
        release_item: Callable[[int], None] | None = None,
        *,
        name: str = "<object>",
    ) -> None:
        self.name = name
        starts: list[int] = []
        ends: list[int] = []
        previous_end = 0
        for index, item in enumerate(items):
            start = _as_int(item.start, f"items[{index}].start", "SequentialReader")
            end = _as_int(item.end, f"items[{index}].end", "SequentialReader")
            if start < 0 or end <= start or start < previous_end:
                raise InvalidRangeError(
                    f"SequentialReader for {name}: items must be sorted, non-overlapping, "
                    f"non-empty byte ranges with 0 <= start < end; items[{index}] is "
                    f"[{start}, {end}) after a range ending at {previous_end}",
                    index=index,
                    byte_range=(start, end),
                )
            starts.append(start)
            ends.append(end)
            previous_end = end
        self._items = tuple(items)
        self._starts = starts
        self._ends = ends
        self._get_item = get_item
        self._release_item = release_item
        self._cur = 0
        self._cur_buf: ChunkBuffer | None = None
        self._closed = False
        if starts:
            self._cur_start = starts[0]
            self._cur_end = ends[0]
            self._pos = starts[0]
        else:  # an empty range no position satisfies: every check falls to the slow path
            self._cur_start = 0
            self._cur_end = -1
            self._pos = 0

    # -- errors ------------------------------------------------------------------------

    def _describe(self, i: int) -> str:
        return f"item #{i} ItemRange(start={self._starts[i]}, end={self._ends[i]})"

    def _access_error(self, detail: str, **context: object) -> SequentialAccessError:
        contract = SEQUENTIAL_ACCESS_CONTRACT.format(name=self.name)
        return SequentialAccessError(
            f"{contract} {detail} {FALLBACK_HINT}", name=self.name, **context
        )

    def _current_range(self) -> tuple[int, int] | None:
        return (self._cur_start, self._cur_end) if self._starts else None

    def _closed_error(self) -> SequentialAccessError:
        return self._access_error(
            "The reader is closed.", position=self._pos, current_item=self._current_range()
        )

    def _no_items_error(self, position: int) -> SequentialAccessError:
        return self._access_error(
            "No byte ranges of it are planned, so nothing can be read or sought.",
            position=position,
            current_item=None,
        )

    def _seek_error(self, target: int) -> SequentialAccessError:
        starts = self._starts
        ends = self._ends
        cur = self._cur
        if not starts:
            return self._no_items_error(target)
        if target < self._cur_start:
            detail = (
                f"Position {target} is before the current {self._describe(cur)}: "
                f"seeking back is not supported (earlier items may already be released)."
            )
        elif target > ends[-1]:
            detail = f"Position {target} is after the last planned {self._describe(len(ends) - 1)}."
        else:
            j = bisect_right(starts, target) - 1
            detail = (
                f"Position {target} is not inside a planned item: it falls in the gap between "
                f"{self._describe(j)} and {self._describe(j + 1)}."
            )
        return self._access_error(
            detail, position=target, current_item=self._current_range(), current_index=cur
        )

    def _size_error(self, size: int | None) -> SequentialAccessError:
        return self._access_error(
            f"read(size={size}) at position {self._pos} asks for the whole file: read sizes "
            f"must be >= 0.",
            position=self._pos,
            size=size,
        )

    def _boundary_error(self, i: int, size: int) -> SequentialAccessError:
        pos = self._pos
        end = self._ends[i]
        return self._access_error(
            f"A {size}-byte read at position {pos} crosses the end of {self._describe(i)} "
            f"into {self._describe(i + 1)}, which starts there: a read comes from one item. "
            f"Read at most {end - pos} bytes here, then read on from position {end}.",
            position=pos,
            size=size,
            boundary=end,
            current_item=self._current_range(),
        )

    def _read_size(self, size: object) -> int:
        """Validate a ``read`` size that is not a plain non-negative int (slow path)."""
        checked = None if size is None else _as_int(size, "size", "SequentialReader.read()")
        if self._closed:
            raise self._closed_error()
        if checked is None or checked < 0:
            raise self._size_error(checked)
        return checked

    # -- items -------------------------------------------------------------------------

    def _fetch(self, i: int) -> ChunkBuffer:
        buffer = self._get_item(i)
        if not isinstance(buffer, ChunkBuffer):
            raise ReaderTypeError(
                f"SequentialReader for {self.name}: get_item({i}) returned "
                f"{type(buffer).__name__}, not a ChunkBuffer",
                index=i,
            )
        expected = self._ends[i] - self._starts[i]
        if len(buffer) != expected:
            raise InvalidRangeError(
                f"SequentialReader for {self.name}: get_item({i}) returned {len(buffer)} bytes "
                f"for {self._describe(i)} ({expected} bytes)",
                index=i,
                byte_range=(self._starts[i], self._ends[i]),
                received=len(buffer),
            )
        if buffer.closed:
            raise SequentialAccessError(
                f"SequentialReader for {self.name}: get_item({i}) returned a closed ChunkBuffer",
                index=i,
            )
        return buffer

    def _current_buffer(self) -> ChunkBuffer:
        buffer = self._cur_buf = self._fetch(self._cur)
        return buffer

    def _move_to(self, j: int, position: int) -> None:
        """Make item ``j >= cur`` current at ``position``, then release the items passed."""
        old = self._cur
        self._pos = position
        if j == old:
            return
        self._cur = j
        self._cur_start = self._starts[j]
        self._cur_end = self._ends[j]
        self._cur_buf = None
        self._release(old, j)

    def _release(self, first: int, stop: int) -> None:
        """Release items ``first..stop-1``: every one of them, even if a callback raises."""
        release = self._release_item
        error: BaseException | None = None
        for i in range(first, stop):
            if release is not None:
                try:
                    release(i)
                except BaseException as exc:
                    if error is None:
                        error = exc
        if error is not None:
            raise error

    # -- file API ----------------------------------------------------------------------

    def _source(self, size: int) -> tuple[ChunkBuffer, int, int] | None:
        """The buffer and the item coordinates ``[a, b)`` of a ``size``-byte read at the
        position; ``None`` if it reads nothing."""
        starts = self._starts
        if not starts:
            raise self._no_items_error(self._pos)
        ends = self._ends
        last = len(starts) - 1
        pos = self._pos
        i = self._cur
        if pos == ends[i] and i < last and starts[i + 1] == pos:
            i += 1  # at the boundary: the read comes from the item starting there
        end = pos + size
        if end > ends[i]:
            if i < last and starts[i + 1] == ends[i]:
                raise self._boundary_error(i, size)
            end = ends[i]  # short: a gap or nothing follows
        if end == pos:
            return None
        buffer = self.current_buffer()  # moves to item i if it is the next one
        return buffer, pos - starts[i], end - starts[i]

    def read(self, size: int | None = -1, /) -> bytes:
        """``size`` bytes from the position, out of one item (fewer before a gap or at the end)."""
        if type(size) is not int or size < 0 or self._closed:
            size = self._read_size(size)
        source = self._source(size)
        if source is None:
            return b""
        buffer, start, end = source
        data = buffer._slice(start, end)
        self._pos += end - start
        return data

    def readinto(self, buffer: Buffer, /) -> int:
        """Fill ``buffer`` from the position, like :meth:`read`; the number of bytes copied."""
        dst = _byte_view(buffer, "SequentialReader.readinto() buffer", writable=True)
        if self._closed:
            raise self._closed_error()
        source = self._source(len(dst))
        if source is None:
            return 0
        chunks, start, end = source
        count = end - start
        chunks._copy_into(start, end, dst[:count])
        self._pos += count
        return count

    readinto1 = readinto

    def seek(self, offset: int, whence: int = _SEEK_SET, /) -> int:
        """Move to a file offset (``whence`` 0 or 1) allowed by the contract; the new position."""
        if type(offset) is not int:
            offset = _as_int(offset, "offset", "SequentialReader.seek()")
        if type(whence) is not int:
            whence = _as_int(whence, "whence", "SequentialReader.seek()")
        if self._closed:
            raise self._closed_error()
        if whence == _SEEK_SET:
            target = offset
        elif whence == _SEEK_CUR:
            target = self._pos + offset
        else:
            raise self._whence_error(whence)
        if self._cur_start <= target <= self._cur_end:
            self._pos = target
            return target
        return self._seek_slow(target)

    def _whence_error(self, whence: int) -> SequentialAccessError:
        if whence == _SEEK_END:
            detail = (
                "seek(offset, SEEK_END) is not supported: this reader does not know the size "
                "of the file; seek to a file offset (SEEK_SET) or relative to the position "
                "(SEEK_CUR)."
            )
        else:
            detail = f"seek(): invalid whence {whence} (use 0 = SEEK_SET or 1 = SEEK_CUR)."
        return self._access_error(detail, position=self._pos, whence=whence)

    def _seek_slow(self, target: int) -> int:
        starts = self._starts
        if target > self._cur_end:
            j = bisect_right(starts, target) - 1
            if j > self._cur and target <= self._ends[j]:
                self._move_to(j, target)
                return target
        raise self._seek_error(target)

    def current_buffer(self) -> ChunkBuffer:
        """The :class:`ChunkBuffer` of the item a read at the position comes from.

        That is the current item, except at its end when the next item starts exactly there:
        then the next item becomes current (as a read would make it). So ``seek(items[i].start)``
        then ``current_buffer()`` gives item ``i``'s bytes. The position does not move. Moving to
        the next item releases the current one first, so if fetching the next item fails, the
        reader is already on it (a failed fetch ends a load anyway).
        """
        if self._closed:
            raise self._closed_error()
        starts = self._starts
        if not starts:
            raise self._no_items_error(self._pos)
        nxt = self._cur + 1
        if self._pos == self._cur_end and nxt < len(starts) and starts[nxt] == self._pos:
            # Release the current item *before* waiting for the next one: a fetch engine with a
            # byte budget may need those bytes back to fetch the next item (no deadlock).
            self._move_to(nxt, self._pos)
            return self._current_buffer()
        current = self._cur_buf
        return current if current is not None else self._current_buffer()

    def tell(self) -> int:
        """The position (a file offset)."""
        if self._closed:
            raise self._closed_error()
        return self._pos

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def writable(self) -> bool:
        return False

    def close(self) -> None:
        """Release the current item (once; idempotent). Further I/O raises."""
        if self._closed:
            return
        self._closed = True
        self._cur_buf = None
        if self._starts and self._release_item is not None:
            self._release_item(self._cur)

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def items(self) -> tuple[_Span, ...]:
        """The planned items, as given."""
        return self._items

    @property
    def current_index(self) -> int:
        """Index of the current item in :attr:`items`."""
        return self._cur

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        if not self._starts:
            where = "no items"
        else:
            where = f"position={self._pos} in {self._describe(self._cur)}"
        state = " closed" if self._closed else ""
        return f"<SequentialReader {self.name} {where}{state}>"
