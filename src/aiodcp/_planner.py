"""The range planner: which bytes of one data file to fetch, and in which ranged GETs.

Pure and synchronous: stdlib only, no I/O.

Data flow::

    ItemRange x N        the byte ranges ``[start, end)`` a load needs from one file, any order,
                         duplicates allowed (several readers of one stored item)
        -> coalesce()    sort, drop identical ranges, reject partial overlaps, and join ranges
                         whose gap is <= ``max_gap_size`` into RangeGroups (one contiguous span)
        -> split_into_parts()
                         cut every group into Parts of at most ``part_size`` bytes: full-size
                         parts wherever items run on, so a part may end inside an item and the
                         next part carry on with the rest of it
    FilePlan             items (unique, sorted) + groups + parts (file order); byte accounting

Invariants of a plan:

* every requested range is in exactly one group; groups are sorted and disjoint; gaps inside a
  group are ``<= max_gap_size``, gaps between consecutive groups are ``> max_gap_size``;
* every item byte is in exactly one part; parts are sorted, disjoint, ``<= part_size`` bytes long
  and never start or end inside a gap (a gap is fetched only when it lies inside one part);
* ``Part.items`` is exactly the items that overlap the part, in file order;
* a part shorter than ``part_size`` ends at an item's end, and the group's next item starts at
  or beyond ``part.start + part_size``. So parts are full wherever items run on: a
  1 GiB file of items of any size takes ~1 GiB / ``part_size`` GETs, not one GET per item.

Everything is ``O(n log n)`` in the number of ranges (the sort), linear afterwards; no side
effects.

The gap policy: ``ReaderConfig.max_gap_size`` is ``"auto"`` by default. The caller times one
small request before planning (the ``.metadata`` GET) and ``resolve_max_gap_size`` turns
``"auto"`` into ``auto_gap_size(latency)`` bytes; ``coalesce``/``plan_file`` only ever see a
concrete number. That policy (the defaults, validation, ``"auto"``) lives in ``_gapsize``,
which configuration imports without this module; its names are re-exported here.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable
from dataclasses import dataclass
from itertools import pairwise
from operator import attrgetter

from ._errors import InvalidRangeError
from ._gapsize import *  # noqa: F403  (the settings half, re-exported: see _gapsize)
from ._gapsize import (
    DEFAULT_MAX_GAP_SIZE_BYTES,
    DEFAULT_PART_SIZE_BYTES,
    validate_max_gap_size,
    validate_part_size,
)
from ._gapsize import __all__ as _SETTINGS

__all__ = [
    "FilePlan",
    "ItemRange",
    "Part",
    "RangeGroup",
    "coalesce",
    "plan_file",
    "split_into_parts",
]
__all__ += _SETTINGS

_SORT_KEY = attrgetter("start")


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True, slots=True, order=True)
class ItemRange:
    """Byte range of one stored item in one file: inclusive start, exclusive end."""

    start: int
    end: int

    def __post_init__(self) -> None:
        start: object = self.start
        end: object = self.end
        if type(start) is int and type(end) is int and 0 <= start < end:
            return  # the common case, checked cheaply (plans can hold ~1e5 ranges)
        if not (_is_int(start) and _is_int(end)):
            raise InvalidRangeError(
                f"invalid byte range ItemRange(start={start!r}, end={end!r}): "
                "start and end must be int byte offsets",
                ranges=((start, end),),
            )
        if self.start < 0:
            raise InvalidRangeError(
                f"invalid byte range {self!r}: start must be >= 0",
                ranges=((self.start, self.end),),
            )
        if self.end <= self.start:
            kind = "empty" if self.end == self.start else "reversed"
            raise InvalidRangeError(
                f"invalid byte range {self!r}: the range is {kind} (end must be > start)",
                ranges=((self.start, self.end),),
            )

    @property
    def length(self) -> int:
        """Bytes in the range."""
        return self.end - self.start


@dataclass(frozen=True, slots=True)
class RangeGroup:
    """Nearby ItemRanges (gaps <= max_gap_size) served by one contiguous span of the file."""

    items: tuple[ItemRange, ...]
    """Sorted, unique, non-overlapping, non-empty."""

    def __post_init__(self) -> None:
        items: object = self.items
        if not isinstance(items, tuple) or not items:
            raise InvalidRangeError(
                f"a RangeGroup needs a non-empty tuple of ItemRange, got {items!r}",
                ranges=items,
            )
        previous: ItemRange | None = None
        for item in items:
            if type(item) is not ItemRange and not isinstance(item, ItemRange):
                raise InvalidRangeError(
                    f"a RangeGroup holds ItemRange values, got {item!r}", ranges=items
                )
            if previous is not None and item.start < previous.end:
                raise InvalidRangeError(
                    f"a RangeGroup's items must be sorted and non-overlapping: "
                    f"{previous!r} is followed by {item!r}",
                    ranges=(previous, item),
                )
            previous = item

    @property
    def start(self) -> int:
        """First byte of the span."""
        return self.items[0].start

    @property
    def end(self) -> int:
        """One past the last byte of the span."""
        return self.items[-1].end

    @property
    def item_bytes(self) -> int:
        """Bytes that belong to items."""
        return sum(item.end - item.start for item in self.items)

    @property
    def gap_bytes(self) -> int:
        """Bytes of the span between items."""
        return (self.end - self.start) - self.item_bytes


@dataclass(frozen=True, slots=True)
class Part:
    """One ranged GET: bytes [start, end) of the file."""

    start: int
    end: int
    items: tuple[ItemRange, ...]
    """The items whose bytes overlap ``[start, end)``, in file order."""

    def __post_init__(self) -> None:
        start: object = self.start
        end: object = self.end
        if type(start) is int and type(end) is int and 0 <= start < end:
            return
        if not (_is_int(start) and _is_int(end)) or self.start < 0 or self.end <= self.start:
            raise InvalidRangeError(
                f"invalid part bytes [{start!r}, {end!r}): need int offsets, 0 <= start < end",
                ranges=((start, end),),
            )

    @property
    def length(self) -> int:
        """Bytes the GET asks for."""
        return self.end - self.start


@dataclass(frozen=True, slots=True)
class FilePlan:
    """Everything one file's load fetches: its items, their groups and the GETs, in file order."""

    items: tuple[ItemRange, ...]
    """Deduplicated, sorted."""
    groups: tuple[RangeGroup, ...]
    parts: tuple[Part, ...]
    """In file order."""

    @property
    def item_bytes(self) -> int:
        """Bytes the load needs (each unique item once)."""
        return sum(item.end - item.start for item in self.items)

    @property
    def requested_bytes(self) -> int:
        """Bytes the GETs ask for (items plus the gaps fetched inside parts)."""
        return sum(part.end - part.start for part in self.parts)

    @property
    def gap_bytes(self) -> int:
        """Bytes fetched and dropped."""
        return self.requested_bytes - self.item_bytes


def coalesce(
    ranges: Iterable[ItemRange], max_gap_size: int | float = DEFAULT_MAX_GAP_SIZE_BYTES
) -> list[RangeGroup]:
    """Sort, deduplicate and group ``ranges``: gaps ``<= max_gap_size`` share a group.

    Identical ranges are kept once. Ranges that overlap without being identical raise
    InvalidRangeError (``ranges`` = the two offending ranges). Adjacent ranges are fine.
    """
    max_gap = validate_max_gap_size(max_gap_size)
    ordered = list(ranges)
    for item in ordered:
        if not isinstance(item, ItemRange):
            raise InvalidRangeError(f"expected an ItemRange, got {item!r}", ranges=(item,))
    ordered.sort(key=_SORT_KEY)

    # One pass: drop duplicates, reject overlaps, note where each group starts. Groups are then
    # slices of one tuple (few allocations: plans can hold ~1e5 ranges).
    unique: list[ItemRange] = []
    group_starts: list[int] = []
    previous_end = -1
    for item in ordered:
        if item.start < previous_end:
            previous = unique[-1]
            if item == previous:
                continue
            raise InvalidRangeError(
                f"{previous!r} overlaps {item!r}: byte ranges that overlap without being "
                "identical cannot be served",
                ranges=(previous, item),
            )
        if not unique or item.start - previous_end > max_gap:
            group_starts.append(len(unique))
        unique.append(item)
        previous_end = item.end
    items = tuple(unique)
    group_starts.append(len(items))
    return [RangeGroup(items[a:b]) for a, b in pairwise(group_starts)]


def split_into_parts(group: RangeGroup, part_size: int = DEFAULT_PART_SIZE_BYTES) -> list[Part]:
    """Cut ``group`` into Parts of at most ``part_size`` bytes, in file order.

    A part covers ``part_size`` bytes from its start and ends early only at an item's end,
    where the group ends or the next item starts beyond the part's reach. Otherwise the cut
    falls inside an item, whose rest starts the next part: an item may be split over several
    parts, and a part may finish one item and begin others (``_engine.FetchEngine._schedule``
    reserves memory for such parts without deadlock).
    """
    size = validate_part_size(part_size)
    if not isinstance(group, RangeGroup):
        raise InvalidRangeError(f"expected a RangeGroup, got {group!r}", ranges=(group,))
    parts: list[Part] = []
    _split_items(group.items, size, parts)
    return parts


def _split_items(
    items: tuple[ItemRange, ...],
    size: int,
    parts: list[Part],
    unbuffered: Collection[ItemRange] = (),
    unbuffered_size: int = 0,
) -> None:
    """Append the parts of one group's ``items`` (validated, sorted) to ``parts``; a part that
    starts inside an item of ``unbuffered`` spans up to ``unbuffered_size`` bytes."""
    count = len(items)
    first = 0  # index of the first item the part being built overlaps
    start = items[0].start if count else 0  # where that part starts (inside items[first])
    while first < count:
        limit = start + (unbuffered_size if items[first] in unbuffered else size)
        last = first  # the last item that starts before the limit
        while last + 1 < count and items[last + 1].start < limit:
            last += 1
        end = items[last].end
        if end > limit:  # cut inside that item; its rest starts the next part
            parts.append(Part(start, limit, items[first : last + 1]))
            first, start = last, limit
            continue
        parts.append(Part(start, end, items[first : last + 1]))  # ends where the item ends
        first = last + 1
        if first < count:
            start = items[first].start


def plan_file(
    ranges: Iterable[ItemRange],
    *,
    max_gap_size: int | float = DEFAULT_MAX_GAP_SIZE_BYTES,
    part_size: int = DEFAULT_PART_SIZE_BYTES,
    unbuffered: Collection[ItemRange] = (),
    unbuffered_part_size: int | None = None,
) -> FilePlan:
    """Plan one file: coalesce ``ranges`` into groups, then split every group into parts of
    ``part_size``; a part that starts inside an item of ``unbuffered`` (received straight into
    its destination, so it holds no memory budget) may span ``unbuffered_part_size``."""
    size = validate_part_size(part_size)
    large = size if unbuffered_part_size is None else validate_part_size(unbuffered_part_size)
    groups = coalesce(ranges, max_gap_size)
    items: list[ItemRange] = []
    parts: list[Part] = []
    for group in groups:
        items.extend(group.items)
        _split_items(group.items, size, parts, unbuffered, large)
    return FilePlan(items=tuple(items), groups=tuple(groups), parts=tuple(parts))
