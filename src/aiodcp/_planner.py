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
concrete number.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Iterable
from dataclasses import dataclass
from itertools import pairwise
from operator import attrgetter
from typing import Literal, TypeAlias

from ._errors import ConfigError, InvalidRangeError

__all__ = [
    "ASSUMED_CONNECTION_BANDWIDTH_BYTES_PER_S",
    "ASSUMED_REQUEST_LATENCY_S",
    "AUTO_GAP_SIZE",
    "DEFAULT_MAX_GAP_SIZE_BYTES",
    "DEFAULT_PART_SIZE_BYTES",
    "MAX_AUTO_GAP_SIZE_BYTES",
    "MIN_AUTO_GAP_SIZE_BYTES",
    "FilePlan",
    "GapSetting",
    "ItemRange",
    "Part",
    "RangeGroup",
    "auto_gap_size",
    "coalesce",
    "plan_file",
    "request_latency_from_get",
    "resolve_max_gap_size",
    "split_into_parts",
    "validate_gap_setting",
    "validate_max_gap_size",
    "validate_part_size",
]

AUTO_GAP_SIZE: Literal["auto"] = "auto"
"""The ``max_gap_size`` setting that lets :func:`auto_gap_size` choose from a measured latency."""
ASSUMED_REQUEST_LATENCY_S = 0.025
"""Prior time to first byte of one S3 GET, used when nothing was measured: AWS documents median
latencies "in the tens of milliseconds" for small GETs, and this project's S3-shaped benchmark
holds every first byte 20 ms."""
ASSUMED_CONNECTION_BANDWIDTH_BYTES_PER_S = 85_000_000
"""Bytes per second one S3 connection streams: 80-100 MB/s is the usual single-stream figure
from an EC2 instance in the bucket's region (the S3-shaped benchmark paces at 80 MB/s)."""
MIN_AUTO_GAP_SIZE_BYTES = 256 * 1024
"""The smallest gap ``"auto"`` merges over, however fast the store answers."""
MAX_AUTO_GAP_SIZE_BYTES = 8 * 1024 * 1024
"""The largest gap ``"auto"`` merges over, however slow the measured request was."""
DEFAULT_MAX_GAP_SIZE_BYTES = round(
    ASSUMED_REQUEST_LATENCY_S * ASSUMED_CONNECTION_BANDWIDTH_BYTES_PER_S
)
"""The gap ``"auto"`` picks without a measurement (2,125,000 bytes, ~2 MiB), and the default of
``coalesce``/``plan_file``: two needed ranges whose gap is at most this many bytes are fetched
as one span."""
DEFAULT_PART_SIZE_BYTES = 8 * 1024 * 1024
"""The largest span one ranged GET asks for: 8 MiB. A store that answers each GET after a time
to first byte and streams each connection at a capped rate (S3: tens of ms, 80-100 MB/s)
spends the first byte's wait once per GET, so large parts waste less of each connection; but
GETs into buffered item memory are bounded by the memory budget, and there more, smaller GETs
win (throughput about ``memory_budget / (latency + part / per-connection bandwidth)``). So
this size applies to items received straight into their destination, and buffered parts are
cut to ``ReaderConfig.buffered_part_size`` (2 MiB with the default budget and concurrency).
Figures: benchmarks/README.md, "Choosing the defaults"."""

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


def validate_max_gap_size(value: object) -> int | float:
    """``value`` as a gap size: a non-negative int, or ``float('inf')`` (merge everything).

    A finite float with an integral value (``4.0``) is accepted and returned as an int.
    Raises ConfigError for anything else (bool, NaN, negative, fractional, other types).
    """
    if isinstance(value, bool):
        pass
    elif isinstance(value, int):
        if value >= 0:
            return int(value)
    elif isinstance(value, float):
        if value == math.inf:
            return value
        if math.isfinite(value) and value >= 0 and value.is_integer():
            return int(value)
    raise ConfigError(
        "max_gap_size must be a non-negative integer number of bytes, or float('inf') to merge "
        f"all ranges, got {value!r}",
        field="max_gap_size",
        value=value,
    )


GapSetting: TypeAlias = int | float | Literal["auto"]
"""A ``max_gap_size`` setting: bytes, ``float("inf")``, or ``"auto"``."""


def validate_gap_setting(value: object) -> GapSetting:
    """``value`` as a ``max_gap_size`` setting: ``"auto"`` or what :func:`validate_max_gap_size`
    accepts. Raises ConfigError (naming ``"auto"``) for anything else."""
    if value == AUTO_GAP_SIZE and isinstance(value, str):
        return AUTO_GAP_SIZE
    if not isinstance(value, str):
        try:
            return validate_max_gap_size(value)
        except ConfigError:
            pass
    raise ConfigError(
        f'max_gap_size must be "auto" (the default: chosen from the measured request latency), '
        "a non-negative integer number of bytes, or float('inf') to merge all ranges, "
        f"got {value!r}",
        field="max_gap_size",
        value=value,
    )


def auto_gap_size(
    request_latency_s: float | None,
    bandwidth_bytes_per_s: float = ASSUMED_CONNECTION_BANDWIDTH_BYTES_PER_S,
) -> int:
    """The gap in bytes worth downloading rather than sending one more request.

    Two needed ranges with ``gap`` bytes between them cost, on one connection, either one
    extra request (one more time to first byte, ``request_latency_s``) or ``gap / bandwidth``
    seconds of downloading bytes that are thrown away. They break even at::

        gap = request_latency_s * bandwidth_bytes_per_s

    so a gap up to that is merged. Without a measurement (``None`` or NaN) the prior is
    ``ASSUMED_REQUEST_LATENCY_S`` (25 ms: AWS documents median latencies "in the tens of
    milliseconds" for small S3 GETs; the benchmark's S3 shape uses 20 ms) times
    ``ASSUMED_CONNECTION_BANDWIDTH_BYTES_PER_S`` (85 MB/s: one S3 stream gives 80-100 MB/s;
    the benchmark paces 80 MB/s), i.e. 2,125,000 bytes (~2 MiB). The former fixed default,
    32 MiB, is the break-even point of a 395 ms request: in-region it downloaded gaps that
    took up to ~16x longer than the request they saved.

    The result is clamped to [``MIN_AUTO_GAP_SIZE_BYTES``, ``MAX_AUTO_GAP_SIZE_BYTES``] =
    [256 KiB, 8 MiB]:

    * below 256 KiB a request costs more than its latency suggests (signing, headers, request
      pricing, ~3 ms of a 85 MB/s stream), and a fast local store (MinIO, moto: a few ms)
      would otherwise split every non-adjacent pair of items;
    * above 8 MiB (a ~100 ms request) the measurement says more about the set-up than about S3
      (the timed request is the first of the process: DNS, TCP and TLS set-up, credential
      lookup, retries all lengthen it, which errs on the side of merging). A gap longer than
      a part (default 8 MiB, 2 MiB into buffered memory) is never downloaded anyway, since no
      GET spans more than one part.

    Monotone: a slower request never gives a smaller gap.
    """
    if not (math.isfinite(bandwidth_bytes_per_s) and bandwidth_bytes_per_s > 0):
        raise ConfigError(
            f"bandwidth must be a positive number, got {bandwidth_bytes_per_s!r}",
            field="bandwidth_bytes_per_s",
            value=bandwidth_bytes_per_s,
        )
    latency = ASSUMED_REQUEST_LATENCY_S
    if request_latency_s is not None and not math.isnan(request_latency_s):
        latency = max(0.0, request_latency_s)
    gap = latency * bandwidth_bytes_per_s
    return round(min(max(gap, MIN_AUTO_GAP_SIZE_BYTES), MAX_AUTO_GAP_SIZE_BYTES))


def request_latency_from_get(
    elapsed_s: float,
    body_bytes: int,
    bandwidth_bytes_per_s: float = ASSUMED_CONNECTION_BANDWIDTH_BYTES_PER_S,
) -> float:
    """The time to first byte of a whole-object GET that took ``elapsed_s`` for ``body_bytes``:
    the elapsed time minus the body's transfer at ``bandwidth_bytes_per_s`` (a ``.metadata``
    of many items can be megabytes), never below 0."""
    return max(0.0, elapsed_s - body_bytes / bandwidth_bytes_per_s)


def resolve_max_gap_size(setting: GapSetting, request_latency_s: float | None) -> int | float:
    """The gap size to plan with: ``auto_gap_size(request_latency_s)`` for ``"auto"``, the
    (validated) setting itself otherwise."""
    value = validate_gap_setting(setting)
    if isinstance(value, str):
        return auto_gap_size(request_latency_s)
    return value


def validate_part_size(value: object) -> int:
    """``value`` as a part size: a positive int. Raises ConfigError otherwise."""
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return int(value)
    raise ConfigError(
        f"part_size must be a positive integer number of bytes, got {value!r}",
        field="part_size",
        value=value,
    )


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
