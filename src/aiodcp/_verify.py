"""Checking received bytes against checksums before anyone reads them.

What a checkpoint records (``dcp._integrity``) is, per stored item, the CRC64NVME of each of its
blocks. The blocks are laid out around the tensor's storage bytes: with ``data_start`` (the
offset of the storage bytes in the item; 0 for an item that is not a tensor archive) block 0 is
the framing before them, ``[0, data_start)``, then ``block_bytes`` blocks from ``data_start``,
the last one ending with the item (the framing after the storage is in it). So a dim-0 slice of
a tensor whose rows split on a ``block_bytes`` boundary is whole blocks by itself, and a check
of it fetches nothing more. With ``data_start`` 0 the blocks count from the item's first byte.

A ``BlockCheck`` is that for one stored item; the fetch engine holds one per item it must check
(a whole stored item, or a window of whole blocks of one: a slice is checked by the blocks it
touches, see ``BlockCheck.window``) and runs ``mismatches`` on the consumer's thread when the
item is first waited for, before handing it over. The CRCs come from ``_checksum`` (awscrt),
which releases the GIL on buffers over 5 KiB, so the I/O loop keeps receiving while a block is
hashed.

For data files without a record, ``WholeObject`` folds the CRCs of the items of one file, in
file order, into the CRC of the whole object and compares it with the store's full-object
checksum (``x-amz-checksum-*`` of a HEAD with ``x-amz-checksum-mode: ENABLED``): CRC64NVME,
CRC32 or CRC32C, each combinable from its parts.

What describes a checkpoint (DCP's ``.metadata``, a safetensors index) is read whole in one GET
without a Range, which S3 answers with the object's full-object checksum when asked
(``x-amz-checksum-mode: ENABLED``): ``read_verified`` checks the bytes against it (CRC64NVME,
CRC32, CRC32C, SHA-256 or SHA-1, ``_checksum.Digest``, in a worker thread) before anyone
parses them, reads once more on a mismatch, and raises ``ChecksumMismatchError`` if the second
read differs too. An object with no full-object checksum (a store that keeps none, a composite
one) is returned unchecked.

Data flow::

    BlockCheck(origin, length, block_bytes, crcs, where, data_start)  one stored item's record
        .covers(start, end)            whether [start, end) is whole blocks of it
        .window(start, end)            the whole blocks' span covering [start, end)
        .block_crcs(start, pieces)     -> [(block start, block end, crc), ...] (file offsets)
        .mismatches(start, pieces)     -> [(block start, block end), ...] that differ
                                       pieces: the bytes of [start, ...) in order (a buffered
                                       item's 1 MiB chunks; a direct item's head, destination
                                       memory and tail)
    WholeObject(size, algorithm, expected)                   one data file read whole
        .add(start, pieces) ... .done -> .matches
    crc_of(algorithm, pieces)          -> the CRC of the bytes in one of ``ALGORITHMS``
    await read_verified(store, bucket, key, stats=, verify=) -> (bytes, algorithm | None)

Invariants: a check never reads more than the bytes it is given (the pieces of one item), and
only compares whole blocks of the record; an item that is not whole blocks of its stored item
is refused when the check is made (``covers``), never half checked.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

from . import _checksum
from ._errors import ChecksumMismatchError

if TYPE_CHECKING:
    from typing_extensions import Buffer

    from ._stats import StatsRecorder
    from ._store import S3Store

__all__ = [
    "ALGORITHMS",
    "BlockCheck",
    "WholeObject",
    "block_count",
    "crc_of",
    "crcs_of",
    "read_verified",
]

logger = logging.getLogger(__name__)


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


class _Algorithm(NamedTuple):
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


def crc_of(algorithm: str, pieces: Sequence[Buffer]) -> int:
    """The CRC in ``algorithm`` (an ``ALGORITHMS`` name) of the bytes ``pieces`` hold, in
    order."""
    compute = ALGORITHMS[algorithm].crc
    crc = 0
    for piece in pieces:
        view = _bytes_view(piece)
        if view:
            crc = compute(view, crc)
    return crc


def crcs_of(pieces: Sequence[Buffer], lengths: Iterable[int]) -> list[int]:
    """The CRC64NVME of each consecutive run of ``lengths`` bytes of the bytes of ``pieces``
    joined, without joining them; the pieces must hold exactly ``sum(lengths)`` bytes (a
    ``ValueError`` otherwise)."""
    crcs: list[int] = []
    runs = iter(lengths)
    want = next(runs, None)
    crc = 0
    filled = 0
    for piece in pieces:
        view = _bytes_view(piece)
        while view:
            if want is None:
                raise ValueError("more bytes than the blocks hold")
            if filled == 0 and len(view) >= want:  # one call for a block in one piece
                crcs.append(_checksum.crc64nvme(view[:want]))
                view = view[want:]
                want = next(runs, None)
                continue
            take = min(len(view), want - filled)
            crc = _checksum.crc64nvme(view[:take], crc)
            filled += take
            view = view[take:]
            if filled == want:
                crcs.append(crc)
                crc, filled = 0, 0
                want = next(runs, None)
    while want == 0:  # an empty block (an empty item)
        crcs.append(_checksum.crc64nvme(b""))
        want = next(runs, None)
    if filled or want is not None:
        raise ValueError("fewer bytes than the blocks hold")
    return crcs


def block_count(length: int, block_bytes: int, data_start: int = 0) -> int:
    """Blocks an item of ``length`` bytes whose storage bytes begin at ``data_start`` is checked
    in (>= 1; see the module docstring)."""
    return (1 if data_start else 0) + max(1, -(-(length - data_start) // block_bytes))


class BlockCheck(NamedTuple):
    """The recorded CRC64NVME of each block of one stored item (see the module docstring)."""

    origin: int
    """File offset of the stored item's first byte."""
    length: int
    """The stored item's length in bytes."""
    block_bytes: int
    crcs: tuple[int, ...]
    """One per block, in order."""
    where: str = ""
    """What the item holds, for error messages (e.g. ``'model.w' chunk (0, 0)``)."""
    data_start: int = 0
    """Offset in the item of the tensor's storage bytes, where the ``block_bytes`` blocks
    begin; block 0 is the bytes before it (none when 0)."""

    def _block_at(self, offset: int) -> int:
        """The index of the block holding item offset ``offset`` (< length)."""
        data_start = self.data_start
        if offset < data_start:
            return 0
        return (1 if data_start else 0) + (offset - data_start) // self.block_bytes

    def _bound(self, index: int) -> int:
        """Item offset where block ``index`` begins (the item's length for one past the last)."""
        if index <= 0:
            return 0
        data_start = self.data_start
        first = 1 if data_start else 0
        return min(data_start + (index - first) * self.block_bytes, self.length)

    def _is_bound(self, offset: int) -> bool:
        data_start = self.data_start
        return offset in (0, self.length) or (
            offset >= data_start and (offset - data_start) % self.block_bytes == 0
        )

    def covers(self, start: int, end: int) -> bool:
        """Whether ``[start, end)`` (file offsets) is whole blocks of this item."""
        origin = self.origin
        return (
            origin <= start < end <= origin + self.length
            and self._is_bound(start - origin)
            and self._is_bound(end - origin)
        )

    def window(self, start: int, end: int) -> tuple[int, int]:
        """``[start, end)`` (file offsets inside this item) widened to the whole blocks it
        touches."""
        origin = self.origin
        first = self._block_at(start - origin)
        last = self._block_at(end - 1 - origin)
        return origin + self._bound(first), origin + self._bound(last + 1)

    def block_crcs(self, start: int, pieces: Sequence[Buffer]) -> list[tuple[int, int, int]]:
        """``(block start, block end, CRC64NVME)`` (file offsets) of each block the bytes
        ``pieces`` hold from ``start`` on. ``ValueError`` if the bytes are not whole blocks of
        this item (a caller's mistake, never a partial check)."""
        views = [_bytes_view(p) for p in pieces]
        total = sum(len(v) for v in views)
        if not self.covers(start, start + total):
            raise ValueError(
                f"bytes [{start}, {start + total}) are not whole blocks of the stored item "
                f"[{self.origin}, {self.origin + self.length}) (blocks of {self.block_bytes} "
                f"bytes from its byte {self.data_start})"
            )
        origin = self.origin
        first = self._block_at(start - origin)
        last = self._block_at(start + total - 1 - origin)
        bounds = [origin + self._bound(i) for i in range(first, last + 2)]
        if len(views) == 1 and first == last:  # one block in one piece: most items
            return [(bounds[0], bounds[1], _checksum.crc64nvme(views[0]))]
        lengths = [b - a for a, b in itertools.pairwise(bounds)]
        crcs = crcs_of(views, lengths)
        return [(bounds[n], bounds[n + 1], crc) for n, crc in enumerate(crcs)]

    def mismatches(self, start: int, pieces: Sequence[Buffer]) -> list[tuple[int, int]]:
        """The blocks (file offsets) of the bytes ``pieces`` hold from ``start`` on whose CRC is
        not the recorded one; ``[]`` when every block matches (``ValueError``: see
        ``block_crcs``)."""
        first = self._block_at(start - self.origin)
        crcs = self.crcs
        return [
            (lo, hi)
            for n, (lo, hi, crc) in enumerate(self.block_crcs(start, pieces))
            if first + n >= len(crcs) or crc != crcs[first + n]
        ]


class WholeObject:
    """The CRC of one data file, folded from its items' CRCs in file order, against the
    store's full-object checksum (``expected``, with ``algorithm``) of an object of ``size``
    bytes. Items may be added in any order; they must tile ``[0, size)`` exactly."""

    __slots__ = ("_crc", "_next", "_pending", "algorithm", "expected", "size")

    def __init__(self, size: int, algorithm: str, expected: int) -> None:
        self.size = size
        self.algorithm = algorithm
        self.expected = expected
        self._crc = 0
        self._next = 0
        self._pending: dict[int, tuple[int, int]] = {}

    def crc(self, pieces: Sequence[Buffer]) -> int:
        """The CRC (this object's algorithm) of the bytes ``pieces`` hold."""
        return crc_of(self.algorithm, pieces)

    def add(self, start: int, length: int, crc: int) -> None:
        """The ``length`` bytes from file offset ``start`` on, whose CRC is ``crc``."""
        algorithm = ALGORITHMS[self.algorithm]
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


def _digest_matches(algorithm: str, expected: int, data: bytes) -> bool:
    digest = _checksum.Digest(algorithm)
    digest.update(data)
    return digest.value() == expected


async def read_verified(
    store: S3Store,
    bucket: str,
    key: str,
    *,
    stats: StatsRecorder | None = None,
    verify: bool = True,
) -> tuple[bytes, str | None]:
    """The object ``key`` read whole (``S3Store.get_whole``), and the algorithm of the store's
    full-object checksum its bytes were checked against (None: not checked: ``verify`` False,
    or the store gave none that a read can check, such as a composite one).

    With ``verify``, the GET asks for the checksum and the bytes are checked in a worker thread
    (the CRC library is loaded there, only when there is something to check; on AWS S3, which
    always has one, loading starts in a thread of its own as the GET is sent). A mismatch (or
    botocore's own check failing) reads the object once more; a second mismatch raises
    ``ChecksumMismatchError`` naming the object. ``stats``: the second GET adds a request,
    each discarded read its bytes to ``bytes_received``, each mismatch to
    ``checksum_mismatches`` (the caller counts the first request and the returned bytes)."""
    if verify and store.is_aws:
        # AWS S3 answers with a checksum to check (CRC64NVME for objects since December 2024):
        # its CRC library is loaded during the GET's round trip instead of after it
        _checksum.warm_up()
    got = await store.get_whole(bucket, key, stats=stats, checksum=verify)
    if not verify:
        return got.data, None
    where = f"s3://{bucket}/{key}"
    for attempt in (1, 2):
        if attempt == 2:
            if stats is not None:
                stats.add(requests=1, bytes_received=len(got.data), checksum_mismatches=1)
            got = await store.get_whole(bucket, key, stats=stats, checksum=True)
        expected = _checksum.full_object_checksum(got.headers, _checksum.WHOLE_READ_HEADERS)
        if expected is None and not got.damaged:
            return got.data, None
        algorithm = "checksum" if expected is None else expected[0]
        if expected is not None and not got.damaged:
            if await asyncio.to_thread(_digest_matches, algorithm, expected[1], got.data):
                if attempt == 2:
                    logger.warning(
                        "%s: read again, it matches the store's %s (the first read came damaged)",
                        where,
                        algorithm,
                    )
                return got.data, algorithm
    if stats is not None:
        stats.add(checksum_mismatches=1)
    size = len(got.data)
    etag = "" if got.etag is None else f", ETag {got.etag}"
    raise ChecksumMismatchError(
        f"{where}: its bytes do not match the full-object {algorithm} the store holds for it "
        f"({size} bytes{etag}), read whole twice: the object is damaged in the store, or "
        "something between the store and this host corrupts data. Nothing was parsed from it; "
        "`aiodcp verify` checks the checkpoint; verify_checksums=False reads the bytes as they "
        "are.",
        bucket=bucket,
        key=key,
        item_range=(0, size),
        byte_range=(0, size),
        mismatched=((0, size),),
    )
