"""Checking received bytes against checksums before anyone reads them.

What a checkpoint records (``dcp._integrity``) is, per stored item, the CRC64NVME of each
``block_bytes`` block of its bytes counted from the item's first byte (the last block may be
shorter). A ``BlockCheck`` is that for one stored item; the fetch engine holds one per item it
must check (a whole stored item, or a window of whole blocks of one: a slice is checked by the
blocks it touches, see ``widen``) and runs ``mismatches`` on the consumer's thread when the item
is first waited for, before handing it over. The CRCs come from ``_checksum`` (awscrt), which
releases the GIL on buffers over 5 KiB, so the I/O loop keeps receiving while a block is hashed.

For data files without a record, ``WholeObject`` folds the CRCs of the items of one file, in
file order, into the CRC of the whole object and compares it with the store's full-object
checksum (``x-amz-checksum-*`` of a HEAD with ``x-amz-checksum-mode: ENABLED``): CRC64NVME,
CRC32 or CRC32C, each combinable from its parts.

Data flow::

    BlockCheck(origin, length, block_bytes, crcs, where)      one stored item's record
        .covers(start, end)            whether [start, end) is whole blocks of it
        .mismatches(start, pieces)     -> [(block start, block end), ...] (file offsets)
                                       pieces: the bytes of [start, ...) in order (a buffered
                                       item's 1 MiB blocks; a direct item's head, destination
                                       memory and tail)
    widen(start, end, origin, length, block_bytes) -> the blocks' span covering [start, end)
    WholeObject(size, algorithm, expected)                   one data file read whole
        .add(start, pieces) ... .done -> .matches

Invariants: a check never reads more than the bytes it is given (the pieces of one item), and
only compares whole blocks of the record; an item that is not whole blocks of its stored item
is refused when the check is made (``covers``), never half checked.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from . import _checksum

if TYPE_CHECKING:
    from typing_extensions import Buffer

__all__ = ["ALGORITHMS", "BlockCheck", "WholeObject", "block_crcs", "widen"]


def _crt() -> Any:
    return _checksum._crt()


def _crc64(data: Buffer, previous: int) -> int:
    return _checksum.crc64nvme(data, previous)


def _crc32(data: Buffer, previous: int) -> int:
    return int(_crt().crc32(_bytes_view(data), previous))


def _crc32c(data: Buffer, previous: int) -> int:
    return int(_crt().crc32c(_bytes_view(data), previous))


def _combine64(a: int, b: int, n: int) -> int:
    return _checksum.combine(a, b, n)


def _combine32(a: int, b: int, n: int) -> int:
    return a if n == 0 else int(_crt().combine_crc32(a, b, n))


def _combine32c(a: int, b: int, n: int) -> int:
    return a if n == 0 else int(_crt().combine_crc32c(a, b, n))


def _bytes_view(data: Buffer) -> memoryview:
    view = memoryview(data)
    if view.ndim != 1 or view.itemsize != 1:
        view = view.cast("B")
    return view


@dataclass(frozen=True, slots=True)
class _Algorithm:
    name: str
    header: str
    width: int
    """Bytes of the checksum (its base64 header form decodes to this many)."""
    crc: Callable[[Buffer, int], int]
    combine: Callable[[int, int, int], int]


ALGORITHMS = {
    a.name: a
    for a in (
        _Algorithm("CRC64NVME", "x-amz-checksum-crc64nvme", 8, _crc64, _combine64),
        _Algorithm("CRC32", "x-amz-checksum-crc32", 4, _crc32, _combine32),
        _Algorithm("CRC32C", "x-amz-checksum-crc32c", 4, _crc32c, _combine32c),
    )
}
"""The full-object checksums whose parts combine (S3's other algorithms, SHA-1 and SHA-256,
and its composite checksums of multipart uploads, cannot be checked from ranged GETs)."""


def block_crcs(pieces: Sequence[Buffer], block_bytes: int) -> list[int]:
    """The CRC64NVME of each ``block_bytes`` block of the bytes of ``pieces`` joined (the last
    block may be shorter), without joining them."""
    crcs: list[int] = []
    crc = 0
    filled = 0
    for piece in pieces:
        view = _bytes_view(piece)
        if filled == 0 and len(view) == block_bytes:  # a buffered item's blocks: one call each
            crcs.append(_checksum.crc64nvme(view))
            continue
        while view:
            take = min(len(view), block_bytes - filled)
            crc = _checksum.crc64nvme(view[:take], crc)
            filled += take
            view = view[take:]
            if filled == block_bytes:
                crcs.append(crc)
                crc, filled = 0, 0
    if filled:
        crcs.append(crc)
    return crcs


def widen(start: int, end: int, origin: int, length: int, block_bytes: int) -> tuple[int, int]:
    """``[start, end)`` (file offsets, inside the stored item ``[origin, origin + length)``)
    widened to the whole blocks it touches, blocks counted from ``origin``."""
    first = (start - origin) // block_bytes * block_bytes
    stop = -(-(end - origin) // block_bytes) * block_bytes
    return origin + first, origin + min(stop, length)


@dataclass(frozen=True, slots=True)
class BlockCheck:
    """The recorded CRC64NVME of each block of one stored item (see the module docstring)."""

    origin: int
    """File offset of the stored item's first byte (where its blocks are counted from)."""
    length: int
    """The stored item's length in bytes."""
    block_bytes: int
    crcs: tuple[int, ...]
    """One per block, in order."""
    where: str = ""
    """What the item holds, for error messages (e.g. ``'model.w' chunk (0, 0)``)."""

    def covers(self, start: int, end: int) -> bool:
        """Whether ``[start, end)`` is whole blocks of this item (the last may be short)."""
        item_end = self.origin + self.length
        return (
            self.origin <= start < end <= item_end
            and (start - self.origin) % self.block_bytes == 0
            and (end == item_end or (end - self.origin) % self.block_bytes == 0)
        )

    def mismatches(self, start: int, pieces: Sequence[Buffer]) -> list[tuple[int, int]]:
        """The blocks (file offsets) of the bytes ``pieces`` hold from ``start`` on whose CRC is
        not the recorded one; ``[]`` when every block matches. ``ValueError`` if the bytes are
        not whole blocks of this item (a caller's mistake, never a partial check)."""
        views = [_bytes_view(p) for p in pieces]
        total = sum(len(v) for v in views)
        if not self.covers(start, start + total):
            raise ValueError(
                f"bytes [{start}, {start + total}) are not whole {self.block_bytes}-byte blocks "
                f"of the stored item [{self.origin}, {self.origin + self.length})"
            )
        first = (start - self.origin) // self.block_bytes
        if len(views) == 1 and total <= self.block_bytes:  # one block in one piece: most items
            if _checksum.crc64nvme(views[0]) == self.crcs[first]:
                return []
            lo = self.origin + first * self.block_bytes
            return [(lo, min(lo + self.block_bytes, self.origin + self.length))]
        bad: list[tuple[int, int]] = []
        for n, crc in enumerate(block_crcs(views, self.block_bytes)):
            index = first + n
            if index >= len(self.crcs) or crc != self.crcs[index]:
                lo = self.origin + index * self.block_bytes
                bad.append((lo, min(lo + self.block_bytes, self.origin + self.length)))
        return bad


@dataclass(slots=True)
class WholeObject:
    """The CRC of one data file, folded from its items' CRCs in file order, against the
    store's full-object checksum (``expected``, with ``algorithm``) of an object of ``size``
    bytes. Items may be added in any order; they must tile ``[0, size)`` exactly."""

    size: int
    algorithm: str
    expected: int
    _crc: int = 0
    _next: int = 0
    _pending: dict[int, tuple[int, int]] = field(default_factory=dict)

    def add(self, start: int, pieces: Sequence[Buffer]) -> None:
        """The bytes ``pieces`` hold from file offset ``start`` on."""
        algorithm = ALGORITHMS[self.algorithm]
        crc = 0
        length = 0
        for piece in pieces:
            view = _bytes_view(piece)
            if view:
                crc = algorithm.crc(view, crc)
                length += len(view)
        self._pending[start] = (length, crc)
        while self._next in self._pending:
            length, crc = self._pending.pop(self._next)
            self._crc = algorithm.combine(self._crc, crc, length) if self._next else crc
            self._next += length

    @property
    def done(self) -> bool:
        """Every byte of the object was added."""
        return self._next >= self.size

    @property
    def matches(self) -> bool:
        return self.done and self._next == self.size and self._crc == self.expected
