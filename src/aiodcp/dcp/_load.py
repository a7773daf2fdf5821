"""One load's read phase: what a ``LoadSession`` runs for one plan (``DcpLoad``), in any format.

The read phase of a ``torch.distributed.checkpoint`` load is the same whatever the checkpoint's
storage format; the format (a ``StoredFormat``, ``dcp/_format.py``: DCP's ``torch.save``
archives in ``dcp/_archive.py``, safetensors in ``safetensors/_format.py``) says where each
stored item lies, which plain tensor it holds, how to locate and verify that tensor's bytes,
and how to decode an item that was buffered. Everything else is here.

A ``DcpLoad`` owns, for one ``read_data`` call, its engines (and so what ``abort`` stops, also
any engine it starts after an abort) and the sliced items' state; its session
(``dcp/_session.py``) gives it the checkpoint's path and configuration, the format, the
measured latency, the statistics recorder it counts into (how items were decoded too), its
scope of the driver (the loop the engines run on: the session cancels its requests) and a
prefetch to take items from. The storage readers keep the ``StorageReader`` protocol and the
multi-rank planning hooks.

Data flow of ``read(plan, planner)``::

    max_gap_size "auto" -> bytes (_planner.resolve_max_gap_size, the measured latency)
    -> group: per file, the ReadItems of each stored item's ItemRange (format.storage_data)
    -> slice (resharded loads): stored items the read items need only part of, when the bytes
       left out are worth more than the requests (the gap cost model), get their head and tail
       fetched first when the format must locate the tensor's bytes (an engine of their own; or
       received from the rank that fetched them, in a shared load; DCP: StoredTensorLocator
       finds the storage bytes and checks the zip directory; safetensors: nothing to fetch);
       each read item's region then becomes runs of storage bytes (region_runs: one run for a
       dim-0 slice) that replace the stored item's range. An unusual archive stays whole. The
       ETags seen pin the rest.
    -> _plan_files: per file planner.plan_file (dedupe, coalesce, parts)
    -> _direct_targets: large items that are a whole plain tensor for a contiguous CPU
       destination (DefaultLoadPlanner only) get the format's receiver over the destination
       (DCP: a DirectReceive, which locates the storage bytes in the archive), and large dim-0
       runs for such a destination a RunReceive
    -> FetchEngine.run() submitted to the driver's loop (concurrent GETs, byte budget)
    -> this thread decodes in plan order while later items download:
       direct item -> wait, verify (DCP: its zip directory) -> commit (or, when the archive is
       unusual, fetch it again and decode it as any other item); a direct run -> commit
       run -> _decode_run: its block of the region, copied with the stored strides (or read
       straight into a contiguous destination); committed with the last block
       other item -> SequentialReader(file) -> ChunkBuffer(item) -> format.decode (DCP:
       transforms (zstd) -> decode_into, else torch.load -> narrow -> copy_ into the
       destination -> commit; BYTE_IO -> planner.load_bytes)

``read_shared(plan, planner, share, group)`` (a multi-rank load that shares, ``_sharing``): the
rank's engine fetches its share, round by round the exchange sends and receives, received
items are decoded (or received straight into their destination), then the rank's own items
load through ``read``.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import logging
import sys
import time
from bisect import insort
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol, TypeVar, cast

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.planner import (
    LoadItemType,
    LoadPlan,
    LoadPlanner,
    ReadItem,
)

from .._config import ReaderConfig
from .._driver import Driver
from .._engine import FetchEngine, FileFetch, WholeFile, WholeFileResult
from .._errors import ChecksumMismatchError
from .._path import CheckpointPath
from .._planner import (
    AUTO_GAP_SIZE,
    DEFAULT_MAX_GAP_SIZE_BYTES,
    FilePlan,
    ItemRange,
    plan_file,
    resolve_max_gap_size,
)
from .._progress import with_progress
from .._reader import ChunkBuffer, SequentialReader
from .._stats import StatsRecorder, counters, job_stats, with_counts
from .._store import S3Store
from .._verify import BlockCheck
from ._format import Receive, RunReceive, StoredFormat, StoredTensor, shape_error
from ._integrity import Integrity
from ._jobcheck import CheckedFile, Verdict, encode, verdicts
from ._sharing import (
    Exchange,
    RankShare,
    Readers,
    StoredItem,
    item_memory,
)
from ._slicing import (
    SLICE_MIN_BYTES,
    Candidate,
    Slice,
    contiguous_strides,
    read_into,
    region_of,
    region_runs,
    within,
)

if TYPE_CHECKING:
    from typing_extensions import Buffer

__all__ = ["DcpLoad", "PrefetchSource"]

logger = logging.getLogger(__name__)

_T = TypeVar("_T")


_YIELD_EVERY_S = 0.002
"""Seconds of decoding after which the decode thread hands the GIL over (see DcpLoad.read)."""


_DIRECT_MIN_BYTES = 512 * 1024


def _drop_overlapping(chosen: list[dict[int, tuple[ReadItem, Receive]]]) -> None:
    """Keep out of ``chosen`` every item whose destination memory overlaps another's (tied
    weights: two keys, one tensor). Direct items arrive in any order; the buffered path writes
    them in plan order, so the result is the same as ``FileSystemReader``'s."""
    spans = sorted(
        (receive.tensor.data_ptr(), len(receive.memory), file_index, item_index)
        for file_index, items in enumerate(chosen)
        for item_index, (_, receive) in items.items()
    )
    overlapping: set[tuple[int, int]] = set()
    reach, holder = -1, (-1, -1)  # the furthest end so far, and whose it is
    for start, length, file_index, item_index in spans:
        if start < reach:
            overlapping.update({holder, (file_index, item_index)})
        if start + length > reach:
            reach, holder = start + length, (file_index, item_index)
    for file_index, item_index in overlapping:
        del chosen[file_index][item_index]


def _pure_resolve(planner: LoadPlanner) -> bool:
    """Whether ``planner.resolve_tensor`` is ``DefaultLoadPlanner``'s (a look-up and a narrow,
    no side effect), so it may be called ahead, before the item's bytes are there."""
    planner_type = type(planner)
    return isinstance(planner, DefaultLoadPlanner) and all(
        getattr(planner_type, name) is getattr(DefaultLoadPlanner, name)
        for name in ("resolve_tensor", "lookup_tensor", "transform_tensor")
    )


def _nth(call: Callable[[int, int], _T], file_index: int, indexes: list[int], nth: int) -> _T:
    """``call(file_index, indexes[nth])``: the reader's nth item is the file's ``indexes[nth]``."""
    return call(file_index, indexes[nth])


async def _opened(store: S3Store) -> S3Store:
    return store


def _windows(
    runs: Sequence[ItemRange], check: BlockCheck
) -> list[tuple[ItemRange, list[ItemRange]]]:
    """Each run (sorted, disjoint) of ``check``'s stored item widened to the whole checksum
    blocks it touches (``BlockCheck.window``: blocks aligned on the storage bytes, so a run
    that starts and ends on a block boundary is its own window), overlapping windows merged:
    the windows, each with the runs it holds, in file order."""
    windows: list[tuple[ItemRange, list[ItemRange]]] = []
    for run in runs:
        start, end = check.window(run.start, run.end)
        if windows and start < windows[-1][0].end:
            last, inside = windows.pop()
            windows.append((ItemRange(last.start, max(last.end, end)), [*inside, run]))
        else:
            windows.append((ItemRange(start, end), [run]))
    return windows


class _Part(NamedTuple):
    """What a rank that slices a stored item fetches (``DcpLoad.sliced_apart``): its runs of
    storage elements (each once, however many of its read items take it), their bytes, and
    ``moved``: those and the probes' (fetched, or received from the rank that fetched them)."""

    runs: tuple[tuple[int, int], ...]
    runs_bytes: int
    moved: int

    @classmethod
    def of(cls, candidate: Candidate) -> _Part:
        runs = tuple(sorted({(b[0], b[1]) for blocks in candidate.blocks for b in blocks}))
        runs_bytes = sum(stop - first for first, stop in runs) * candidate.dtype.itemsize
        return cls(runs, runs_bytes, runs_bytes + sum(p.length for p in candidate.probes))


_UNDECIDED: Any = object()
"""(A region not looked at yet, in ``sliced_apart``'s cache.)"""


def _relative(region: tuple[Any, ...], index: tuple[Any, Any]) -> tuple[Any, ...]:
    """A rank's region of several reads (``region_of``) on an item read under ``index``, keyed
    relative to the item (each read's index told as the item's or not), as the parts of one
    stored tensor are cached; a single read item's box is its own key."""
    return tuple((r[0], (r[1], r[2]) == index, r[4], r[5]) for r in region)


def _apart(parts: Iterable[_Part]) -> bool:
    """Whether no two of ``parts`` (of one stored item, distinct ranks') share a byte."""
    runs = sorted(run for part in parts for run in part.runs)
    return all(b[0] >= a[1] for a, b in itertools.pairwise(runs))


class PrefetchSource(Protocol):
    """Stored items another download already holds (a prefetch): ``lookup`` returns a call
    that blocks until the item's buffer is there, or ``None`` if the source does not have it.
    ``cancel`` ends this load's waits (they raise ``LoadCancelledError``), not the download."""

    def lookup(
        self, relative_path: str, item_range: ItemRange
    ) -> Callable[[], ChunkBuffer] | None: ...

    def cancel(self) -> None: ...


class _Grouped:
    """What ``DcpLoad.group`` makes of a plan, filled in as it goes."""

    def __init__(self) -> None:
        self.per_file: dict[str, dict[ItemRange, list[ReadItem]]] = {}
        self.slices: dict[tuple[str, ItemRange], Slice] = {}
        """(key, run's range) -> the stored tensor the run belongs to."""
        self.blocks_left: dict[int, int] = {}
        """id(sliced read item) -> its runs (it is committed once all are decoded)."""
        self.run_readers: dict[tuple[str, ItemRange], list[ReadItem]] = {}
        """(key, run's range) -> the read items it serves, in ``Slice.prefixes`` order."""
        self.windows: dict[tuple[str, ItemRange], list[ItemRange]] = {}
        """(key, window) -> the runs it holds, in order: when the load checks a sliced item against
        its recorded checksums, its runs widened to the whole blocks they touch
        (``BlockCheck.window``, overlapping ones merged) are what is fetched, checked, and sliced
        into the runs."""
        self.window_of: dict[tuple[str, ItemRange], ItemRange] = {}
        """(relative path, window) -> the stored item whose blocks it is."""
        self.probe_plans: dict[str, FilePlan] = {}
        """relative path -> the heads and tails fetched to slice its items (``aiodcp plan``)."""
        self.files: list[FileFetch] = []
        self.readers: list[list[list[ReadItem]]] = []
        self.empty: list[ReadItem] = []
        self.prefetched: list[tuple[Callable[[], ChunkBuffer], list[ReadItem]]] = []


class DcpLoad:
    """The read phase of one load (see the module docstring). Not reusable: one per
    ``read_data``; ``sliced_apart`` and ``group``/``slice`` are also used without a load (the
    coordinator's planning, ``aiodcp plan --slice``)."""

    def __init__(
        self,
        *,
        path: CheckpointPath,
        config: ReaderConfig,
        format: StoredFormat,
        driver: Driver,
        recorder: StatsRecorder,
        request_latency_s: float | None,
        source: PrefetchSource | None = None,
        progress: bool = False,
        integrity: Integrity | None = None,
    ) -> None:
        self._path = path
        self.config = config
        self.format = format
        self.storage_data = format.storage_data
        self._io = driver
        self._recorder = recorder
        self._request_latency_s = request_latency_s
        self._source = source
        self.progress = progress
        self._engine: FetchEngine | None = None
        self._aborted = False
        # id(read item) -> blocks of a sliced read item not decoded yet
        self._blocks_left: dict[int, int] = {}
        self._grouped = _Grouped()  # the plan being read (its slices and windows)
        self._integrity = integrity
        """The checkpoint's record (None: none, or not verifying): every stored item is checked
        against it (``_checks``) and every GET pinned to its ETags (``_etags``)."""
        self._recorded: dict[str, str] = {} if integrity is None else integrity.etags(path.key)
        """Object key -> the ETag the checkpoint's record holds (what the save wrote)."""
        self._etags: dict[str, str] = {**format.etags, **self._recorded}
        """Every pin a GET of this load starts with: the record's, and the format's own."""
        self._names: dict[tuple[str, int, int], str] | None = None
        self._job_checked: Mapping[str, CheckedFile] = {}
        """In a shared load, the data files the job reads whole between its ranks (by relative
        path): their items' CRCs are taken (``FileFetch.crc``) for the job's check, and their
        bytes counted once it is made (``_check_job``)."""
        self._job_ranges: dict[str, list[tuple[int, int, int]]] = {}
        """Relative path -> ``(start, end, crc)`` of each range of it this rank fetched."""
        self._job_used: dict[str, int] = {}
        """Relative path -> bytes of it this rank handed to torch, not counted yet."""

    # ------------------------------------------------------------------ integrity

    def _stored(self) -> Mapping[tuple[str, int, int], str]:
        """(relative path, offset, length) of every stored item -> its fqn, quoted."""
        if self._names is None:
            self._names = {
                (info.relative_path, info.offset, info.length): repr(index.fqn)
                for index, info in self.storage_data.items()
            }
        return self._names

    def _check(self, relative_path: str, item_range: ItemRange) -> BlockCheck | None:
        """The record's check of the stored item ``item_range`` of ``relative_path`` (None
        without a record)."""
        if self._integrity is None:
            return None
        where = f"s3://{self._path.bucket}/{self._path.key(relative_path)}"
        what = self._stored().get((relative_path, item_range.start, item_range.length), "")
        return self._integrity.check(
            relative_path, item_range.start, item_range.length, where, what
        )

    def _checks(
        self,
        relative_path: str,
        items: Sequence[ItemRange],
        window_of: Mapping[tuple[str, ItemRange], ItemRange] | None = None,
    ) -> dict[int, BlockCheck]:
        """By item index, the checks of the items of a file plan that are stored items, or
        windows of whole blocks of one (``window_of``: window -> its stored item); a probe has
        none (its archive's own directory checks it)."""
        checks: dict[int, BlockCheck] = {}
        integrity = self._integrity
        if integrity is None:
            return checks
        stored = self._stored()
        where = f"s3://{self._path.bucket}/{self._path.key(relative_path)}"
        window_of = window_of or {}
        for index, item_range in enumerate(items):
            whole = (
                window_of.get((relative_path, item_range), item_range) if window_of else item_range
            )
            what = stored.get((relative_path, whole.start, whole.length))
            if what is not None:
                checks[index] = integrity.check(
                    relative_path, whole.start, whole.length, where, what
                )
        return checks

    def abort(self) -> None:
        """Cancel this load's engine, from any thread, and every engine it starts later (the
        session also cancels the requests of its scope)."""
        self._aborted = True
        engine = self._engine
        if engine is not None:
            engine.abort()

    def _running(self, engine: FetchEngine) -> FetchEngine:
        """``engine`` is the one ``abort`` stops from now on (stopped at once if it came
        after an abort)."""
        self._engine = engine
        if self._aborted:
            engine.abort()
        return engine

    def sliced_apart(
        self, needed: Iterable[tuple[StoredItem, Readers]]
    ) -> dict[StoredItem, tuple[tuple[StoredItem, ...], frozenset[int]]]:
        """The stored items that several ranks need parts of, where each rank slices its own
        part (``_slice_candidate``, with the load's gap, the same on every rank) and so moves
        fewer bytes than the item's, each with its head and tail probes (``probe_ranges``):
        each rank fetches its runs instead of the item going whole, through one rank, to every
        rank that needs it. The probes, which every slicing rank needs, are shared like stored
        items (one rank GETs them; ``_slice`` takes them from ``known``), unless they overlap
        (a small item: each rank probes for itself). Returned per item: its probes to share
        and the ranks that slice it. ``needed``: each stored item two or more ranks read, with
        those ranks and their read items on it (``Readers``).

        The rule, per item: shared whole, a rank moves the item's bytes (it fetches the item,
        or receives it); sliced, it moves its runs and the probes (``_Part.moved``). The item
        is sliced when every one of its ranks can slice it and, for each, that is fewer bytes
        (``_slice_candidate`` admits a part only when the bytes it leaves out are worth more
        than its requests, so a rank that can slice always moves fewer), and either no two
        ranks' runs overlap (each byte fetched once in the job, as sharing would) or each
        rank's runs are at most half the item's bytes: the bytes it fetches that another rank
        may fetch too are no more than those it leaves out.
        Overlapping runs are replicas' (HSDP: the same region) and runs merged across a gap
        (a 2-D block: TP ranks share rows): each such rank fetches the bytes it shares with
        another itself, the only bytes a job fetches more than once besides probes that
        overlap. A dim-1 reshard whose strided runs merge into nearly the whole item saves a
        rank next to nothing: shared whole, it is fetched once.

        Work: per item, each rank's region once (a single read item's box, built in one
        comprehension: C-speed per rank), its distinct regions found by a dict, and the part
        of each distinct one looked up; a candidate per distinct region, stored tensor and
        item length of the whole job (``parts``, shared across items: the layers of a model
        repeat their shapes), so a job's step grows with its (stored item, rank) pairs, not
        with the candidates; the runs of distinct regions are compared only when a rank's
        part is more than half its item. A rank that cannot slice
        ends the item's decision (reading whole chunks, as a job resuming its own save does, is
        decided at its first rank).

        The ranks decide the same in their own ``_slice`` (same metadata, latency and
        configuration); a rank that cannot slice (a planner that resolves tensors itself,
        ``fast_decode=False``) fetches the item whole, which only costs bytes."""
        if not self.config.fast_decode or sys.byteorder != "little":
            return {}
        max_gap_size = resolve_max_gap_size(self.config.max_gap_size, self._request_latency_s)
        apart: dict[StoredItem, tuple[tuple[StoredItem, ...], frozenset[int]]] = {}
        parts: dict[tuple[Any, ...], dict[tuple[Any, ...], _Part | None]] = {}
        for item, readers in needed:
            if len(readers.ranks) < 2:
                continue
            item_range = ItemRange(item.start, item.end)
            if readers.aliased:  # (read under two indexes: each rank's stored tensor its own)
                probes = self._sliced_by_all(item_range, readers.per_rank(), max_gap_size, parts)
            else:
                probes = self._sliced_by_each(item_range, readers, max_gap_size, parts)
            if probes is not None:
                shared = (
                    ()
                    if len(probes) != 2 or probes[0].end > probes[1].start
                    else tuple(StoredItem(item.path, p.start, p.end) for p in probes)
                )
                apart[item] = (shared, frozenset(readers.ranks))
        return apart

    def _sliced_by_each(
        self,
        item_range: ItemRange,
        readers: Readers,
        max_gap_size: int | float,
        parts: dict[tuple[Any, ...], dict[tuple[Any, ...], _Part | None]],
    ) -> tuple[ItemRange, ...] | None:
        """``_sliced_by_all`` for an item every rank reads under one index (its stored
        tensor looked up once), decided the same: the ranks' regions made and told apart in
        C (a list comprehension, a dict), then each distinct region's part, in the order of
        its first rank (a replica's region is its first one's: only whether one repeats
        counts)."""
        length = item_range.length
        firsts = readers.firsts
        stored = self.format.stored_tensor(firsts[0])
        if stored is None:
            return None
        of_stored = parts.setdefault((length, stored.dtype, stored.shape), {})
        at = firsts[0].storage_index
        index = (at.fqn, at.offset)
        # The first rank's part first: a rank that cannot slice (the whole chunk, as a job
        # resuming its own save reads) decides the item without the other ranks' regions.
        several = readers.several
        reqs = several.get(0)
        if reqs is None:
            reqs = [firsts[0]]
            relative = (firsts[0].storage_offsets, firsts[0].lengths)
        else:
            relative = _relative(region_of(reqs), index)
        first = self._part(item_range, of_stored, relative, reqs, max_gap_size)
        if first is None or first.moved >= length:
            return None
        regions: list[tuple[Any, ...]] = [(req.storage_offsets, req.lengths) for req in firsts]
        relatives = regions
        if several:
            relatives = regions.copy()
            for pos, reqs in several.items():
                region = regions[pos] = region_of(reqs)
                relatives[pos] = _relative(region, index)
        n = len(regions)
        # Each distinct region with the position of its first rank, in rank order.
        first_at = dict(zip(reversed(regions), range(n - 1, -1, -1), strict=True))
        repeated = len(first_at) < n  # two ranks read the same region (replicas)
        halves = True  # every rank's runs are at most half the item
        decided: list[_Part] = []
        for pos in sorted(first_at.values()):
            relative = relatives[pos]
            part = of_stored.get(relative, _UNDECIDED)
            if part is _UNDECIDED:
                reqs = several.get(pos) or [firsts[pos]]
                part = self._part(item_range, of_stored, relative, reqs, max_gap_size)
            if part is None or part.moved >= length:
                return None
            if halves and 2 * part.runs_bytes > length:
                halves = False
            decided.append(part)
        if halves or (not repeated and _apart(decided)):
            return self.format.probes(item_range, stored)
        return None

    def _part(
        self,
        item_range: ItemRange,
        of_stored: dict[tuple[Any, ...], _Part | None],
        relative: tuple[Any, ...],
        reqs: list[ReadItem],
        max_gap_size: int | float,
    ) -> _Part | None:
        """The part of a rank with read items ``reqs`` (region ``relative``) on the item,
        its candidate made once per region in ``of_stored``."""
        part = of_stored.get(relative, _UNDECIDED)
        if part is _UNDECIDED:
            candidate = self._slice_candidate(item_range, reqs, max_gap_size)
            part = of_stored[relative] = None if candidate is None else _Part.of(candidate)
        return cast("_Part | None", part)

    def _sliced_by_all(
        self,
        item_range: ItemRange,
        reqs_per_rank: Iterable[list[ReadItem]],
        max_gap_size: int | float,
        parts: dict[tuple[Any, ...], dict[tuple[Any, ...], _Part | None]],
    ) -> tuple[ItemRange, ...] | None:
        """The probes of a stored item every one of its ranks (``reqs_per_rank``: their read
        items on it, in rank order) slices, moving fewer bytes than the item's; None if one
        of them cannot (see ``sliced_apart``). ``parts``: per (item length, stored dtype and
        shape), per region relative to its stored item, what a rank slicing it fetches
        (``_Part``; None: it cannot slice), as ``_slice_candidate`` decides from nothing
        else."""
        length = item_range.length
        seen: dict[tuple[Any, ...], _Part] = {}  # regions of this item decided
        # (fqn, offset) -> the stored tensor there (None: not one) and its parts by region
        stored_of: dict[tuple[Any, Any], tuple[StoredTensor | None, dict[Any, _Part | None]]]
        stored_of = {}
        probes: tuple[ItemRange, ...] | None = None
        repeated = False  # two ranks read the same region (replicas)
        halves = True  # every rank's runs are at most half the item
        for reqs in reqs_per_rank:
            # A rank's region: one read item (most ranks) by its box alone (its type and
            # stored item are the slot's), else every read (``region_of``); the two forms
            # never compare equal. (A LoadItemType hashes in Python: kept out of the
            # per-rank key, and of the relative one of a single read item.)
            single = len(reqs) == 1
            region = (reqs[0].storage_offsets, reqs[0].lengths) if single else region_of(reqs)
            if region in seen:
                repeated = True  # (a replica's: the same runs)
                continue
            at = reqs[0].storage_index
            index = (at.fqn, at.offset)  # (fqn, offset): what MetadataIndex compares
            found = stored_of.get(index)
            if found is None:
                stored = self.format.stored_tensor(reqs[0])
                found = stored_of[index] = (
                    stored,
                    {}
                    if stored is None
                    else parts.setdefault((length, stored.dtype, stored.shape), {}),
                )
            stored, of_stored = found
            if stored is None:
                return None
            relative = region if single else _relative(region, index)
            part = self._part(item_range, of_stored, relative, reqs, max_gap_size)
            if part is None or part.moved >= length:
                return None
            seen[region] = part
            if halves and 2 * part.runs_bytes > length:
                halves = False
            if probes is None:
                probes = self.format.probes(item_range, stored)
        if halves or (not repeated and _apart(seen.values())):
            return probes
        return None

    @property
    def round_bytes(self) -> int:
        """Item memory a rank sends (and receives) per exchange round: half the budget; the
        shared phase's engine holds the other half."""
        return max(self.config.memory_budget // 2, 1)

    def group(self, plan: LoadPlan) -> _Grouped:
        """Split the plan: items served by a prefetch, zero-length items, and per file the
        ReadItems of each stored item's range (files in first-use order)."""
        grouped = _Grouped()
        per_file: dict[str, dict[ItemRange, list[ReadItem]]] = {}
        from_source: dict[tuple[str, ItemRange], list[ReadItem]] = {}
        source = self._source
        for req in plan.items:
            try:
                info = self.storage_data[req.storage_index]
            except KeyError:
                raise self.format.missing(req.storage_index) from None
            if info.length == 0:  # nothing to fetch (DCP never writes one, but be exact)
                grouped.empty.append(req)
                continue
            item_range = ItemRange(info.offset, info.offset + info.length)
            where = (info.relative_path, item_range)
            if where in from_source:
                from_source[where].append(req)
                continue
            if source is not None:
                waiter = source.lookup(info.relative_path, item_range)
                if waiter is not None:
                    from_source[where] = [req]
                    grouped.prefetched.append((waiter, from_source[where]))
                    continue
            per_file.setdefault(info.relative_path, {}).setdefault(item_range, []).append(req)
        grouped.per_file = per_file
        return grouped

    def _plan_files(self, grouped: _Grouped, max_gap_size: int | float) -> None:
        """Plan each file's item ranges (stored items, and the runs of sliced ones)."""
        for relative_path, by_range in grouped.per_file.items():
            file_plan = plan_file(
                by_range.keys(),
                max_gap_size=max_gap_size,
                part_size=self.config.buffered_part_size,
            )
            whole = None
            job = self._job_checked.get(relative_path)
            if self._integrity is None and self.config.verify_checksums and job is None:
                # no record: checked against the store's checksum if the load reads it whole
                whole = WholeFile(known=self.format.file_prefix(relative_path))
            grouped.files.append(
                FileFetch(
                    self._path.key(relative_path),
                    file_plan,
                    checks=self._checks(relative_path, file_plan.items, grouped.window_of),
                    whole=whole,
                    crc=None if job is None else job.algorithm,
                )
            )
            grouped.readers.append([by_range[r] for r in file_plan.items])

    def read(
        self,
        plan: LoadPlan,
        planner: LoadPlanner,
        recorder: StatsRecorder,
        known: Mapping[str, Sequence[tuple[int, bytes]]] | None = None,
    ) -> None:
        """Load ``plan``'s items from the store; ``known``: bytes of slicing probes already
        here (received from the rank that fetched them; see ``_slice``)."""
        max_gap_size = resolve_max_gap_size(self.config.max_gap_size, self._request_latency_s)
        recorder.max_gap_size = max_gap_size
        logger.debug(
            "%s: max_gap_size %s (setting %r, request latency %s)",
            self._path.url,
            max_gap_size,
            self.config.max_gap_size,
            "unmeasured"
            if self._request_latency_s is None
            else f"{self._request_latency_s * 1000:.1f} ms",
        )
        grouped = self.group(plan)
        for req in grouped.empty:
            self._decode(req, ChunkBuffer([]), planner)
        etags = {
            **self.format.etags,
            **self.slice(grouped, planner, max_gap_size, recorder, known or {}),
        }
        if grouped.slices:
            # The runs are planned by what a request was worth when they were chosen: a gap
            # "auto" would merge but slicing left out is not fetched after all.
            max_gap_size = self._request_worth(max_gap_size)
            recorder.max_gap_size = max_gap_size
        self._plan_files(grouped, max_gap_size)
        files, readers, slices = grouped.files, grouped.readers, grouped.slices
        paths = list(grouped.per_file)  # the files' relative paths
        self._blocks_left = grouped.blocks_left
        self._grouped = grouped
        if not files:
            for waiter, reqs in grouped.prefetched:
                buffer = waiter()
                for req in reqs:
                    self._decode(req, buffer, planner)
            return
        direct = self._direct_targets(grouped, planner)
        files = [
            self._with_direct(fetch, targets, max_gap_size)
            for fetch, targets in zip(files, direct, strict=True)
        ]
        driver = self._io
        progress_total = sum(f.plan.requested_bytes for f in files) if self.progress else 0

        # Built here, not on the loop: a checkpoint of many items makes this the slow part,
        # and the loop may be the caller's (load_checkpoint), which must stay responsive.
        engine = self._running(
            FetchEngine(
                driver.run(_opened),
                self._path.bucket,
                files,
                self.config,
                recorder,
                {**self._etags, **etags},
                self._recorded.keys(),
            )
        )

        async def start(store: S3Store) -> None:
            label = f"aiodcp {self._path.url}"
            await with_progress(engine.run(), recorder, progress_total, label)

        future = driver.submit(start)
        finished = False
        try:
            # What a prefetch holds first (already downloaded, or downloading on its own
            # budget) while the engine fetches the rest.
            for waiter, reqs in grouped.prefetched:
                buffer = waiter()
                for req in reqs:
                    self._decode(req, buffer, planner)
            yielded = time.perf_counter()
            for file_index, fetch in enumerate(files):
                # Direct items are waited for apart; the reader serves the buffered ones.
                buffered = [i for i in range(len(fetch.plan.items)) if i not in fetch.direct]
                reader = SequentialReader(
                    [fetch.plan.items[i] for i in buffered],
                    functools.partial(_nth, engine.wait_item, file_index, buffered),
                    functools.partial(_nth, engine.release_item, file_index, buffered),
                    name=f"s3://{self._path.bucket}/{fetch.key}",
                )
                # A file checked whole against the store's checksum: an item torch cannot
                # decode may hold a damaged byte of its framing. The rest of the file is taken
                # in (its CRC folded), not decoded, until the file's check says which it is.
                whole = engine.checks_whole(file_index)
                failed: Exception | None = None
                skipped: set[int] = set()
                with reader:
                    for item_index, item_range in enumerate(fetch.plan.items):
                        if failed is not None:
                            skipped.add(item_index)
                            if item_index in fetch.direct:
                                engine.wait_item(file_index, item_index)
                                engine.release_item(file_index, item_index)
                            else:
                                reader.seek(item_range.start)
                                reader.current_buffer()
                            continue
                        sliced = slices.get((fetch.key, item_range))
                        run = sliced is not None or (fetch.key, item_range) in grouped.windows
                        reqs = readers[file_index][item_index]
                        if item_index in fetch.direct:
                            req, receive = direct[file_index][item_index]
                            if self._received_directly(engine, file_index, item_index, receive):
                                recorder.add(
                                    fast_decoded_items=1,
                                    **{"direct_runs" if run else "direct_items": 1},
                                )
                                planner.commit_tensor(req, receive.tensor)
                            else:
                                etag = engine.etag(fetch.key)
                                check = fetch.checks.get(item_index)
                                again = self._fetch_alone(fetch.key, item_range, etag, check)
                                self._decode_all(fetch.key, item_range, again, [req], planner)
                            continue
                        reader.seek(item_range.start)
                        buffer = reader.current_buffer()
                        try:
                            self._decode_all(fetch.key, item_range, buffer, reqs, planner)
                        except Exception as exc:
                            if not whole:
                                raise
                            failed = exc
                            skipped.add(item_index)
                        # Hand the GIL over every ~2 ms of decoding: an event loop thread
                        # waiting for it (the I/O loop, or the caller's loop) gets it then,
                        # not at the next 5 ms switch interval.
                        # (After every item was measured: 20,000 small items took 1.4x as
                        # long, the GIL ping-ponging.)
                        now = time.perf_counter()
                        if now - yielded >= _YIELD_EVERY_S:
                            time.sleep(0)
                            yielded = now
                self._took_crcs(paths[file_index], engine.crcs(file_index))
                checked = engine.whole_file(file_index)
                if checked is not None and checked.status == "mismatch":
                    self._read_again(fetch, engine, checked, readers[file_index], planner, skipped)
                elif failed is not None:
                    raise failed  # the file's bytes are as stored (or could not be checked)
            finished = True
        finally:
            if not finished:
                engine.abort()
            try:
                driver.wait(future, f"the end of the download of {self._path.url}")
                future.result()
            except BaseException:
                if finished:
                    raise
            self._engine = None

    def read_shared(
        self,
        plan: LoadPlan,
        planner: LoadPlanner,
        recorder: StatsRecorder,
        share: RankShare,
        group: dist.ProcessGroup,
    ) -> None:
        """A load whose shared items come through the exchange (``_sharing``): this rank
        fetches its share and sends it, receives the rest, round by round; then it loads the
        items only it needs as a single-process load does."""
        exchange = Exchange(group, share, self._path.url)
        self._job_checked = share.checked
        for path, checked_file in share.checked.items():
            if checked_file.etag is not None:  # the version the store's checksum is of
                self._etags.setdefault(self._path.key(path), checked_file.etag)
        reqs_of: dict[StoredItem, list[ReadItem]] = {}
        private: list[ReadItem] = []
        for req in plan.items:
            info = self.storage_data[req.storage_index]
            item = StoredItem(info.relative_path, info.offset, info.offset + info.length)
            if item in share.shared:
                reqs_of.setdefault(item, []).append(req)
            else:
                private.append(req)
        # Items this rank receives whole into a destination of their own, as direct receipt
        # would fetch them (Exchange.transfer receives them straight into it).
        direct: dict[StoredItem, Receive] = {}
        if self.config.fast_decode and _pure_resolve(planner):
            fetched = set(share.fetch)
            candidates: dict[int, tuple[ReadItem, Receive]] = {}
            keys: list[StoredItem] = []
            for item, reqs in reqs_of.items():
                target = None if item in fetched else self._whole_target(reqs, item.length, planner)
                if target is not None:
                    candidates[len(keys)] = (reqs[0], target)
                    keys.append(item)
            _drop_overlapping([candidates])
            direct = {keys[i]: receive for i, (_, receive) in candidates.items()}
        error: BaseException | None = None
        engine: FetchEngine | None = None
        future: Any = None
        where: dict[StoredItem, tuple[int, int]] = {}
        known: dict[str, list[tuple[int, bytes]]] = {}
        try:
            if share.fetch:
                engine, where = self._share_engine(share, recorder)
                self._running(engine)

                async def start(store: S3Store) -> None:
                    await engine.run()

                future = self._io.submit(start)
        except BaseException as exc:
            error = exc
        try:
            for k, part in enumerate(share.rounds):
                sending: dict[StoredItem, ChunkBuffer] = {}
                if error is None and engine is not None:
                    try:
                        for item, _ in part.sends:
                            sending[item] = engine.wait_item(*where[item])
                    except BaseException as exc:
                        error = exc
                exchange.status(error)  # raises on every rank if any rank failed
                received, placed = exchange.transfer(k, sending, direct, self._peer_check(recorder))
                recorder.observe_peak(sum(item_memory(i.length) for i in [*received, *sending]))
                try:
                    for item in placed:  # received straight into its destination
                        req = reqs_of[item][0]
                        recorder.add(direct_items=1, fast_decoded_items=1, bytes_used=item.length)
                        if self._integrity is None:  # (else _peer_check counted it)
                            self._unchecked(item, recorder)
                        planner.commit_tensor(req, direct[item].tensor)
                    checked = {i: self._from_peer(i, b, recorder) for i, b in received.items()}
                    for item, buffer in [*checked.items(), *sending.items()]:
                        if item not in reqs_of:  # probes of chunks this rank slices
                            insort(known.setdefault(item.path, []), (item.start, buffer.read()))
                        for req in reqs_of.get(item, ()):
                            self._decode(req, buffer, planner)
                except BaseException as exc:
                    error = exc
                finally:
                    exchange.release(received)
                    received.clear()
                    if engine is not None:
                        for item in sending:
                            engine.release_item(*where[item])
            if engine is not None and error is None:
                files = {item.path: where[item][0] for item in share.fetch}
                for path, file_index in files.items():
                    self._took_crcs(path, engine.crcs(file_index))
            # The probes are not stored items: LoadStats.items (and what was left unverified)
            # counts those the load decoded.
            probes = [item for item in share.fetch if item not in reqs_of]
            recorder.add(
                items=-len(probes),
                unverified_bytes=-sum(
                    p.length for p in probes if (p.path, p.start, p.length) not in self._stored()
                ),
            )
            if error is None and private:
                try:
                    self.read(dataclasses.replace(plan, items=private), planner, recorder, known)
                except BaseException as exc:
                    error = exc
            recorder.bytes_from_peers = exchange.bytes_received
            recorder.bytes_to_peers = exchange.bytes_sent
            counts = counters(recorder.snapshot())
            slots = share.check_slots
            extra = encode(share.checked, self._job_ranges, self._job_used, slots) if slots else []
            rows = exchange.status(error, counts, extra)
            n = len(counts)
            if slots:  # raises on every rank if a file does not match
                self._check_job(share, [r[:n] for r in rows], [r[n:] for r in rows], recorder)
            else:
                recorder.job = job_stats(rows, recorder.snapshot())
        finally:
            if engine is not None:
                engine.abort()  # a no-op once everything was fetched
                try:
                    self._io.wait(future, f"the end of the download of {self._path.url}")
                    future.result()
                except BaseException:
                    pass  # its failure, if any, was raised through wait_item and shared
            self._engine = None

    def _took_crcs(self, path: str, crcs: Sequence[tuple[ItemRange, int]]) -> None:
        """The CRCs of ranges of data file ``path`` this rank fetched for the job's check (and
        the bytes it handed over, counted once the check is made)."""
        if not crcs:
            return
        self._job_ranges.setdefault(path, []).extend((r.start, r.end, crc) for r, crc in crcs)
        self._job_used[path] = self._job_used.get(path, 0) + sum(r.length for r, _ in crcs)

    def _unchecked(self, item: StoredItem, recorder: StatsRecorder) -> None:
        """An item received from another rank without a record to check it against: counted
        once the job's check of its file is made, if the job checks it, else unverified."""
        if item.path in self._job_checked:
            self._job_used[item.path] = self._job_used.get(item.path, 0) + item.length
        else:
            recorder.add(unverified_bytes=item.length)

    def _check_job(
        self,
        share: RankShare,
        rows: list[list[int]],
        extra: list[list[int]],
        recorder: StatsRecorder,
    ) -> None:
        """The job's check of the files its ranks read whole between them (``_jobcheck``),
        from every rank's row, the same on every rank: this rank's bytes of each counted
        verified or unverified (and every rank's, in the job's statistics); a file that does
        not match raises ``ChecksumMismatchError`` on every rank, before its load returns."""
        found, used = verdicts(extra)
        rows = [
            with_counts(
                row,
                verified_bytes=sum(b for n, b in mine.items() if found[n].status == "verified"),
                unverified_bytes=sum(b for n, b in mine.items() if found[n].status != "verified"),
            )
            for row, mine in zip(rows, used, strict=True)
        ]
        for path, checked_file in share.checked.items():
            verdict = found.get(checked_file.number)
            nbytes = self._job_used.pop(path, 0)
            if verdict is not None and verdict.status == "verified":
                recorder.add(verified_bytes=nbytes)
            else:
                recorder.add(unverified_bytes=nbytes)
                if verdict is not None and verdict.status == "unverified":
                    logger.debug(
                        "s3://%s/%s: not checked whole: %s",
                        self._path.bucket,
                        self._path.key(path),
                        verdict.why,
                    )
        bad = sorted(n for n, verdict in found.items() if verdict.status == "mismatch")
        if bad:
            recorder.add(checksum_mismatches=1)
        recorder.job = job_stats(rows, recorder.snapshot())
        if bad:
            raise self._job_mismatch(bad[0], found[bad[0]], len(bad), share)

    def _job_mismatch(
        self, number: int, verdict: Verdict, files: int, share: RankShare
    ) -> ChecksumMismatchError:
        """The error every rank raises when file ``number`` (of the checkpoint's data files,
        sorted) does not match the store's checksum after a shared load."""
        path = sorted({info.relative_path for info in self.storage_data.values()})[number]
        key = self._path.key(path)
        etag = self._etags.get(key)
        ranges = ", ".join(f"[{a}, {b}) by rank {r}" for r, a, b in verdict.ranges[:6])
        ranges += " ..." if len(verdict.ranges) > 6 else ""
        more = f" ({files - 1} more data files did not match either)" if files > 1 else ""
        return ChecksumMismatchError(
            f"s3://{self._path.bucket}/{key}: its bytes, fetched by the ranks of a shared load "
            f"({ranges}), do not match the full-object {verdict.algorithm} the store holds for "
            f"it ({verdict.size} bytes{'' if etag is None else f', ETag {etag}'}){more}: the "
            "object is damaged in the store, or something between the store and a rank "
            "corrupts data. The checkpoint records no per-item checksums (it was not saved by "
            "aiodcp), so the damaged range cannot be named, and tensors loaded from this file "
            f"may hold its bytes: the load failed on every rank (this is rank {share.rank} of "
            f"{share.world}); it was not read again. Load again to fetch it again; `aiodcp "
            "verify` checks the object; verify_checksums=False loads the bytes as they are.",
            bucket=self._path.bucket,
            key=key,
            item_range=(0, verdict.size),
            byte_range=(0, verdict.size),
            mismatched=((0, verdict.size),),
        )

    def _peer_check(
        self, recorder: StatsRecorder
    ) -> Callable[[StoredItem, Sequence[Buffer]], bool] | None:
        """What ``Exchange.transfer`` checks an item received straight into its destination
        with (its bytes around and in the destination, in order), counting what it verified;
        False sends the item to ``_from_peer`` (which fetches it from the store)."""
        if self._integrity is None:
            return None

        def check(item: StoredItem, pieces: Sequence[Buffer]) -> bool:
            block_check = self._check(item.path, ItemRange(item.start, item.end))
            if block_check is None or block_check.mismatches(item.start, pieces):
                return False
            recorder.add(verified_bytes=item.length)
            return True

        return check

    def _from_peer(
        self, item: StoredItem, buffer: ChunkBuffer, recorder: StatsRecorder
    ) -> ChunkBuffer:
        """An item received from another rank, checked against the record before anything
        decodes it; one that does not match is fetched from the store (and checked there).
        Probes (heads and tails of items this rank slices) are not stored items: their
        archive's own directory checks them."""
        if (item.path, item.start, item.length) not in self._stored():
            return buffer
        check = self._check(item.path, ItemRange(item.start, item.end))
        if check is None:
            recorder.add(bytes_used=item.length)
            self._unchecked(item, recorder)
            return buffer
        bad = check.mismatches(item.start, buffer.chunks)
        if not bad:
            recorder.add(verified_bytes=item.length, bytes_used=item.length)
            return buffer
        recorder.add(checksum_mismatches=1)
        key = self._path.key(item.path)
        logger.warning(
            "s3://%s/%s: bytes [%d, %d) received from another rank do not match their recorded "
            "checksum; fetching the item from the store",
            self._path.bucket,
            key,
            bad[0][0],
            bad[-1][1],
        )
        return self._fetch_alone(key, ItemRange(item.start, item.end), None, check, count=False)

    def _share_engine(
        self, share: RankShare, recorder: StatsRecorder
    ) -> tuple[FetchEngine, dict[StoredItem, tuple[int, int]]]:
        """The engine that fetches this rank's share, files in path order and items in offset
        order (the order the rounds send them in), within half the memory budget."""
        max_gap_size = resolve_max_gap_size(self.config.max_gap_size, self._request_latency_s)
        recorder.max_gap_size = max_gap_size
        config = self.config.replace(memory_budget=self.round_bytes)
        per_file: dict[str, list[ItemRange]] = {}
        for item in share.fetch:
            per_file.setdefault(item.path, []).append(ItemRange(item.start, item.end))
        files: list[FileFetch] = []
        where: dict[StoredItem, tuple[int, int]] = {}
        for path in sorted(per_file):
            file_plan = plan_file(
                per_file[path], max_gap_size=max_gap_size, part_size=config.buffered_part_size
            )
            for index, item_range in enumerate(file_plan.items):
                where[StoredItem(path, item_range.start, item_range.end)] = (len(files), index)
            checks = self._checks(path, file_plan.items)
            job = self._job_checked.get(path)
            crc = None if job is None else job.algorithm
            files.append(FileFetch(self._path.key(path), file_plan, checks=checks, crc=crc))
        store = self._io.run(_opened)
        engine = FetchEngine(
            store, self._path.bucket, files, config, recorder, self._etags, self._recorded.keys()
        )
        return engine, where

    def slice(
        self,
        grouped: _Grouped,
        planner: LoadPlanner,
        max_gap_size: int | float,
        recorder: StatsRecorder,
        known: Mapping[str, Sequence[tuple[int, bytes]]],
    ) -> dict[str, str]:
        """Replace, in ``grouped.per_file``, each stored item worth slicing by the runs of it
        its read items need; returns the ETags the probes were pinned to (the load's).
        Probes within ``known`` (per file, sorted ``(offset, bytes)`` spans received from
        another rank of a shared load) are not fetched.

        Phase one of a sliced load: the head and tail (``StoredFormat.probes``) of every
        candidate (``_slice_candidate``) are fetched by an engine of their own (the tail of one
        item and the head of the next coalesce, as any ranges do). Each head is parsed by the
        format's locator (DCP: ``StoredTensorLocator``, where the storage bytes begin) and
        checked against the central directory in its tail; an item that passes has its runs at
        known file offsets. An item that does not (an unusual layout, a directory that
        disagrees, more after its storage bytes than the probe holds) stays whole: the main
        engine fetches and decodes it as usual, pinned to the same ETags. A format whose items
        are the tensor's bytes (safetensors) has no probes: its runs are at known offsets from
        the item's start."""
        if not self.config.fast_decode or not _pure_resolve(planner) or sys.byteorder != "little":
            return {}
        candidates: list[tuple[str, ItemRange, Candidate]] = []
        for relative_path, by_range in grouped.per_file.items():
            for item_range, reqs in by_range.items():
                candidate = self._slice_candidate(item_range, reqs, max_gap_size)
                if candidate is not None:
                    candidates.append((relative_path, item_range, candidate))
        if not candidates:
            return {}
        probes: dict[str, list[ItemRange]] = {}
        fetched: dict[tuple[str, ItemRange], bytes] = {}
        for relative_path, _, candidate in candidates:
            for probe in candidate.probes:
                data = within(known, relative_path, probe)
                if data is None:
                    probes.setdefault(relative_path, []).append(probe)
                else:
                    fetched[relative_path, probe] = data
        etags = (
            self._fetch_probes(probes, fetched, grouped, max_gap_size, recorder) if probes else {}
        )
        worth = self._request_worth(max_gap_size)
        for relative_path, item_range, candidate in candidates:
            start = 0  # no probes: the item is the tensor's bytes
            if candidate.probes:
                start = self._located(relative_path, item_range, candidate, fetched)
                if start < 0:
                    continue
            key = self._path.key(relative_path)
            reqs = grouped.per_file[relative_path][item_range]
            itemsize = candidate.dtype.itemsize
            placed: list[tuple[ReadItem, list[tuple[ItemRange, int, tuple[int, ...]]]]] = []
            runs: set[ItemRange] = set()
            for req, blocks in zip(reqs, candidate.blocks, strict=True):
                mine = []
                for first, stop, prefix in blocks:
                    run = ItemRange(
                        item_range.start + start + first * itemsize,
                        item_range.start + start + stop * itemsize,
                    )
                    mine.append((run, first, prefix))
                    runs.add(run)
                placed.append((req, mine))
            probed = sum(p.length for p in candidate.probes)
            fetched_bytes = sum(r.length for r in runs)
            windows: list[tuple[ItemRange, list[ItemRange]]] | None = None
            check = self._check(relative_path, item_range)
            if check is not None:
                windows = _windows(sorted(runs), check)
                fetched_bytes = sum(w.length for w, _ in windows)
                if item_range.length - fetched_bytes - probed <= worth * len(windows):
                    self._unusual(
                        relative_path,
                        item_range,
                        "once its runs are widened to the whole checksum blocks they touch, "
                        "slicing leaves out too little",
                    )
                    continue
            by_range = grouped.per_file[relative_path]
            del by_range[item_range]
            strides = contiguous_strides(candidate.shape)
            for req, mine in placed:
                grouped.blocks_left[id(req)] = len(mine)
                for run, first, prefix in mine:
                    sliced = grouped.slices.get((key, run))
                    if sliced is None:
                        sliced = grouped.slices[key, run] = Slice(
                            candidate.dtype, candidate.shape, strides, first
                        )
                    sliced.prefixes.append(prefix)
                    grouped.run_readers.setdefault((key, run), []).append(req)
                    if windows is None:
                        by_range.setdefault(run, []).append(req)
            for window, inside in windows or ():
                by_range[window] = list(
                    dict.fromkeys(r for run in inside for r in grouped.run_readers[key, run])
                )
                grouped.windows[key, window] = inside
                grouped.window_of[relative_path, window] = item_range
            recorder.add(
                sliced_items=1,
                slice_saved_bytes=item_range.length - fetched_bytes - probed,
            )
        return etags

    def _located(
        self,
        relative_path: str,
        item_range: ItemRange,
        candidate: Candidate,
        fetched: Mapping[tuple[str, ItemRange], bytes],
    ) -> int:
        """Where the storage bytes of a candidate begin in its item, read from its head and
        checked against its tail (the format's ``locator``); -1 to fetch it whole."""
        head_range, tail_range = candidate.probes
        head, tail = fetched[relative_path, head_range], fetched[relative_path, tail_range]
        located = self.format.locator(
            StoredTensor(candidate.dtype, candidate.shape), item_range.length
        )
        start = located.locate(head)
        if start is None or start < 0:
            self._unusual(relative_path, item_range, "its archive is not the plain layout")
            return -1
        end = start + located.nbytes
        tail_start = tail_range.start - item_range.start
        if end < tail_start or not located.verify(head[:start], tail[end - tail_start :]):
            self._unusual(relative_path, item_range, "its zip directory disagrees")
            return -1
        return start

    def _fetch_probes(
        self,
        probes: dict[str, list[ItemRange]],
        fetched: dict[tuple[str, ItemRange], bytes],
        grouped: _Grouped,
        max_gap_size: int | float,
        recorder: StatsRecorder,
    ) -> dict[str, str]:
        """Fetch the probes (per file, the heads and tails of items to slice) with an engine
        of their own into ``fetched``; the ETags they were pinned to (the load's)."""
        files = [
            FileFetch(
                self._path.key(relative_path),
                plan_file(
                    ranges, max_gap_size=max_gap_size, part_size=self.config.buffered_part_size
                ),
            )
            for relative_path, ranges in probes.items()
        ]
        grouped.probe_plans = {path: f.plan for path, f in zip(probes, files, strict=True)}
        engine = self._running(
            FetchEngine(
                self._io.run(_opened),
                self._path.bucket,
                files,
                self.config,
                recorder,
                self._etags,
                self._recorded.keys(),
            )
        )

        async def probe(store: S3Store) -> None:
            await engine.run()

        try:
            self._io.run(probe)
        finally:
            self._engine = None
        for file_index, (relative_path, fetch) in enumerate(zip(probes, files, strict=True)):
            for item_index, probed in enumerate(fetch.plan.items):
                fetched[relative_path, probed] = engine.wait_item(file_index, item_index).read()
                engine.release_item(file_index, item_index)
        # The probes are not stored items: LoadStats.items (and what was left unverified)
        # counts those the load decoded.
        recorder.add(
            items=-sum(len(f.plan.items) for f in files),
            unverified_bytes=-sum(r.length for f in files for r in f.plan.items),
        )
        return engine.etags()

    def _request_worth(self, max_gap_size: int | float) -> int | float:
        """Bytes one more request is worth when choosing between a slice and its whole item
        (and then planning a load that slices): ``max_gap_size``, except that ``"auto"``
        counts at most its prior (25 ms at 85 MB/s, ``DEFAULT_MAX_GAP_SIZE_BYTES``).

        The request "auto" measures is the load's first, connection set-up included, so it
        leans towards merging: cheap for a gap inside one GET, but here merging means
        fetching the whole chunk, holding it in buffered memory and copying out of it, on
        every rank that needs part of it (measured, benchmarks/README.md "Resharded loads":
        through a 20 ms proxy "auto" resolved high enough that no 2-to-4 rank sliced half a
        chunk of up to 8 MiB)."""
        if self.config.max_gap_size == AUTO_GAP_SIZE:
            return min(max_gap_size, DEFAULT_MAX_GAP_SIZE_BYTES)
        return max_gap_size

    def _slice_candidate(
        self, item_range: ItemRange, reqs: list[ReadItem], max_gap_size: int | float
    ) -> Candidate | None:
        """The slicing of one stored item, if it is worth it; None to fetch it whole.

        A stored tensor item (``StoredFormat.stored_tensor``: for DCP not transformed, plain
        dtype, under 4 GiB, its archive overhead at most ``TAIL_BYTES``; ``probes`` its head and
        tail, none for a format whose items are the tensor's bytes) is sliced when every read
        item on it covers part of it, the
        runs of storage bytes their regions take (``region_runs``: one run for a dim-0 slice) are
        identical or disjoint, and the bytes slicing leaves out (the item minus the runs and
        the head and tail probes) exceed ``max_gap_size`` per run: in the gap policy's cost
        model ``max_gap_size`` is what one request's time to first byte is worth, and each run
        is one more request than fetching the item whole (``_request_worth``: with "auto", at
        most the prior's worth). So a slice that is most of its item, or a small item, is
        fetched whole, and ``max_gap_size=inf`` turns slicing off.
        """
        if not SLICE_MIN_BYTES < item_range.length < self.format.max_item_bytes:
            return None
        worth = self._request_worth(max_gap_size)
        first_req = reqs[0]
        stored = self.format.stored_tensor(first_req)
        if stored is None:
            return None
        dtype, shape = stored.dtype, stored.shape
        if not shape or dtype not in self.format.slice_dtypes:
            return None
        strides = contiguous_strides(shape)
        probes = self.format.probes(item_range, stored)
        if probes is None:
            return None  # not one plain tensor's bytes where the format expects them
        blocks: list[list[tuple[int, int, tuple[int, ...]]]] = []
        for req in reqs:
            offsets, lengths = tuple(req.storage_offsets), tuple(req.lengths)
            if (
                req.type != LoadItemType.TENSOR
                or req.storage_index != first_req.storage_index
                or len(offsets) != len(shape)
                or len(lengths) != len(shape)
                or (lengths == shape and not any(offsets))
                or any(
                    off < 0 or length <= 0 or off + length > whole
                    for off, length, whole in zip(offsets, lengths, shape, strict=True)
                )
            ):
                return None
            blocks.append(region_runs(shape, strides, offsets, lengths, dtype.itemsize, worth))
        spans = sorted({(first, stop) for req_blocks in blocks for first, stop, _ in req_blocks})
        if any(b[0] < a[1] for a, b in itertools.pairwise(spans)):
            return None  # runs that overlap without being identical: one fetch of the item
        needed = sum(stop - first for first, stop in spans) * dtype.itemsize
        left_out = item_range.length - needed - sum(p.length for p in probes)
        if left_out <= worth * len(spans):
            return None
        return Candidate(dtype, shape, tuple(tuple(b) for b in blocks), probes)

    def _unusual(self, relative_path: str, item_range: ItemRange, why: str) -> None:
        logger.debug(
            "s3://%s/%s bytes [%d, %d): not sliced, %s; fetching it whole",
            self._path.bucket,
            self._path.key(relative_path),
            item_range.start,
            item_range.end,
            why,
        )

    def _run_target(
        self,
        run: ItemRange,
        reqs: list[ReadItem],
        sliced: Slice,
        planner: LoadPlanner,
        *,
        before: int = 0,
        after: int = 0,
    ) -> tuple[ReadItem, Receive] | None:
        """A run to receive straight into its destination: one read item, at least
        ``_DIRECT_MIN_BYTES``, whose region is the whole run (a dim-0 slice), for a C-contiguous
        CPU tensor of the stored dtype (``_direct_targets`` checked the planner). ``before`` and
        ``after``: bytes of its window (checked against the record) before and after it."""
        if len(reqs) != 1 or run.length < _DIRECT_MIN_BYTES or sliced.prefixes != [()]:
            return None
        req = reqs[0]
        if sliced.element(req.storage_offsets) != sliced.first:
            return None
        target = planner.resolve_tensor(req).detach()
        if (
            type(target) is not torch.Tensor
            or target.device.type != "cpu"
            or target.dtype != sliced.dtype
            or tuple(target.shape) != tuple(req.lengths)
            or not target.is_contiguous()
            or target.numel() * target.element_size() != run.length
        ):
            return None
        return req, RunReceive(target, before, after)

    def _direct_targets(
        self, grouped: _Grouped, planner: LoadPlanner
    ) -> list[dict[int, tuple[ReadItem, Receive]]]:
        """Per file, the items to receive straight into their destination, by item index: each
        the whole of one stored tensor, read by one read item into a C-contiguous CPU tensor of
        its dtype and shape, at least half a MiB (below that the copy costs less than the
        bookkeeping). Only with a planner whose ``resolve_tensor`` is ``DefaultLoadPlanner``'s,
        a pure look-up, so that it may be called before the item is downloaded. The run of a
        sliced item qualifies likewise (``_run_target``)."""
        chosen: list[dict[int, tuple[ReadItem, Receive]]] = [{} for _ in grouped.files]
        if not self.config.fast_decode or not _pure_resolve(planner):
            return chosen
        for file_index, (fetch, reqs_per_item) in enumerate(
            zip(grouped.files, grouped.readers, strict=True)
        ):
            for item_index, (item_range, reqs) in enumerate(
                zip(fetch.plan.items, reqs_per_item, strict=True)
            ):
                window = grouped.windows.get((fetch.key, item_range))
                if window is not None:  # a run with the rest of its checksum blocks around it
                    if len(window) == 1:
                        (run,) = window
                        target = self._run_target(
                            run,
                            grouped.run_readers[fetch.key, run],
                            grouped.slices[fetch.key, run],
                            planner,
                            before=run.start - item_range.start,
                            after=item_range.end - run.end,
                        )
                        if target is not None:
                            chosen[file_index][item_index] = target
                    continue
                sliced = grouped.slices.get((fetch.key, item_range))
                if sliced is not None:
                    run_target = self._run_target(item_range, reqs, sliced, planner)
                    if run_target is not None:
                        chosen[file_index][item_index] = run_target
                    continue
                receive = self._whole_target(reqs, item_range.length, planner)
                if receive is not None:
                    chosen[file_index][item_index] = (reqs[0], receive)
        _drop_overlapping(chosen)
        return chosen

    def _whole_target(
        self, reqs: list[ReadItem], length: int, planner: LoadPlanner
    ) -> Receive | None:
        """The receiver (``StoredFormat.whole_receive``) of a stored item of ``length`` bytes
        read by ``reqs``, if it can be received straight into its destination (see
        ``_direct_targets``), else None."""
        if (
            len(reqs) != 1
            or reqs[0].type != LoadItemType.TENSOR
            or not _DIRECT_MIN_BYTES <= length < self.format.max_item_bytes
        ):
            return None
        req = reqs[0]
        stored = self.format.stored_tensor(req)
        if stored is None or any(req.storage_offsets) or stored.shape != tuple(req.lengths):
            return None  # not the whole of a plain stored tensor
        target = planner.resolve_tensor(req).detach()
        if (
            type(target) is not torch.Tensor
            or target.device.type != "cpu"
            or target.dtype != stored.dtype
            or tuple(target.shape) != tuple(req.lengths)
            or not target.is_contiguous()
            or target.numel() == 0
        ):
            return None
        return self.format.whole_receive(target, stored, length)

    def _with_direct(
        self,
        fetch: FileFetch,
        targets: dict[int, tuple[ReadItem, Receive]],
        max_gap_size: int | float,
    ) -> FileFetch:
        """``fetch`` with its direct items, re-planned so that parts starting in them take
        whole ``part_size`` GETs (they hold no budget: fewer, longer GETs waste less time to
        first byte); the items, and so their indexes, stay as they were."""
        if not targets:
            return fetch
        items = fetch.plan.items
        plan = plan_file(
            items,
            max_gap_size=max_gap_size,
            part_size=self.config.buffered_part_size,
            unbuffered={items[i] for i in targets},
            unbuffered_part_size=self.config.part_size,
        )
        assert plan.items == items
        direct = {i: receive for i, (_, receive) in targets.items()}
        return FileFetch(fetch.key, plan, direct, fetch.checks, fetch.whole)

    def _reads_whole(self, req: ReadItem) -> bool:
        """Whether ``req`` reads the whole of its stored tensor (``StoredFormat.stored_tensor``),
        which ``_slice_candidate`` never slices."""
        stored = self.format.stored_tensor(req)
        return (
            stored is not None
            and not any(req.storage_offsets)
            and stored.shape == tuple(req.lengths)
        )

    def _received_directly(
        self, engine: FetchEngine, file_index: int, item_index: int, receive: Receive
    ) -> bool:
        """Wait for a direct item; whether it arrived in the plain layout and its zip directory
        agrees with what was located (else its destination holds nothing to trust)."""
        engine.wait_item(file_index, item_index)
        try:
            result = engine.direct_result(file_index, item_index)
            return result is not None and receive.verify(*result)
        finally:
            engine.release_item(file_index, item_index)

    def _fetch_alone(
        self,
        key: str,
        item_range: ItemRange,
        etag: str | None,
        check: BlockCheck | None = None,
        *,
        count: bool = True,
    ) -> ChunkBuffer:
        """One item, fetched by an engine of its own (same retries, budget and statistics),
        from the same version of the object as the rest of the load (If-Match ``etag``), and
        checked against ``check``: a direct item whose archive is laid out otherwise, for the
        buffered path, or an item received from another rank that did not match."""
        logger.debug(
            "s3://%s/%s bytes [%d, %d): not the plain layout; fetching it again for torch.load",
            self._path.bucket,
            key,
            item_range.start,
            item_range.end,
        )
        if count:
            self._recorder.add(refetched_items=1)
        plan = plan_file([item_range], max_gap_size=0, part_size=self.config.buffered_part_size)
        etag = self._etags.get(key, etag)
        engine = FetchEngine(
            self._io.run(_opened),
            self._path.bucket,
            [FileFetch(key, plan, checks={} if check is None else {0: check})],
            self.config,
            self._recorder,
            {key: etag} if etag is not None else None,
            self._recorded.keys(),
        )

        async def run(store: S3Store) -> None:
            await engine.run()

        self._io.run(run)
        return engine.wait_item(0, 0)

    def _read_again(
        self,
        fetch: FileFetch,
        first: FetchEngine,
        checked: WholeFileResult,
        reqs_per_item: list[list[ReadItem]],
        planner: LoadPlanner,
        undecoded: Collection[int] = (),
    ) -> None:
        """A file read whole whose bytes did not match the store's full-object checksum (no
        record: which item was damaged cannot be told): read it once more, pinned to the same
        ETag, and decode again every item whose CRC differs from the first read's (those
        were damaged on the way), and the ``undecoded`` ones (by item index: not decoded by
        the first read, after an item torch could not decode); then the second read must match
        the checksum, or ``ChecksumMismatchError`` names the file. Its bytes count once in the
        statistics (``bytes_used``, ``items``; ``bytes_received`` counts both reads)."""
        key = fetch.key
        where = f"s3://{self._path.bucket}/{key}"
        self._recorder.add(checksum_mismatches=1)
        logger.warning(
            "%s: its bytes do not match the store's full-object %s; reading it again",
            where,
            checked.algorithm,
        )
        etag = first.etag(key)
        whole = fetch.whole if fetch.whole is not None else WholeFile()
        again = WholeFile(whole.known, (checked.algorithm, checked.expected, checked.size))
        plan = plan_file(fetch.plan.items, max_gap_size=0, part_size=self.config.buffered_part_size)
        engine = self._running(
            FetchEngine(
                self._io.run(_opened),
                self._path.bucket,
                [FileFetch(key, plan, whole=again)],
                self.config,
                self._recorder,
                {key: etag} if etag is not None else None,
                count_items=False,
            )
        )

        async def run(store: S3Store) -> None:
            await engine.run()

        future = self._io.submit(run)
        finished = False
        changed: list[ItemRange] = []
        failed: Exception | None = None
        try:
            for index, item_range in enumerate(plan.items):
                buffer = engine.wait_item(0, index)
                try:
                    differs = engine.item_crc(0, index) != checked.crcs.get(index)
                    if differs:
                        changed.append(item_range)
                    if (differs or index in undecoded) and failed is None:
                        try:
                            self._decode_all(key, item_range, buffer, reqs_per_item[index], planner)
                        except Exception as exc:
                            failed = exc  # damaged again? the file's check says
                finally:
                    engine.release_item(0, index)
            second = engine.whole_file(0)
            finished = True
        finally:
            if not finished:
                engine.abort()
            try:
                self._io.wait(future, f"the end of the second read of {where}")
                future.result()
            except BaseException:
                if finished:
                    raise
            self._engine = first
        if second is not None and second.status == "verified":
            if failed is not None:
                raise failed  # the stored bytes themselves do not decode
            logger.warning(
                "%s: read again, it matches the store's checksum; %d item(s) had come damaged "
                "and were loaded again",
                where,
                len(changed),
            )
            return
        self._recorder.add(checksum_mismatches=1)
        items = ", ".join(f"[{r.start}, {r.end})" for r in changed[:4])
        items += " ..." if len(changed) > 4 else ""
        raise ChecksumMismatchError(
            f"{where}: its bytes do not match the full-object {checked.algorithm} the store "
            f"holds for it ({checked.size} bytes{'' if etag is None else f', ETag {etag}'}), "
            "read whole twice"
            f"{f' (items that differed between the reads: {items})' if changed else ''}: the "
            "object is damaged in the store, or something between the store and this host "
            "corrupts data. The checkpoint records no per-item checksums (it was not saved by "
            "aiodcp), so the damaged item cannot be named, and the tensors loaded from this "
            "file may hold its bytes: the load failed. `aiodcp verify` checks it; "
            "verify_checksums=False loads the bytes as they are.",
            bucket=self._path.bucket,
            key=key,
            item_range=(0, checked.size),
            byte_range=(0, checked.size),
            mismatched=((0, checked.size),),
        ) from failed

    def _decode_all(
        self,
        key: str,
        item_range: ItemRange,
        buffer: ChunkBuffer,
        reqs: list[ReadItem],
        planner: LoadPlanner,
    ) -> None:
        """Decode the read items of one fetched item: a stored item, a run of a sliced one, or
        a window of whole checksum blocks, whose runs are decoded from views of its bytes."""
        grouped = self._grouped
        window = grouped.windows.get((key, item_range))
        if window is None:
            sliced = grouped.slices.get((key, item_range))
            for nth, req in enumerate(reqs):
                self._decode(req, buffer, planner, sliced, nth)
            return
        for run in window:
            inside = buffer.window(run.start - item_range.start, run.end - item_range.start)
            sliced = grouped.slices[key, run]
            for nth, req in enumerate(grouped.run_readers[key, run]):
                self._decode(req, inside, planner, sliced, nth)

    def _decode(
        self,
        req: ReadItem,
        buffer: ChunkBuffer,
        planner: LoadPlanner,
        sliced: Slice | None = None,
        nth: int = 0,
    ) -> None:
        """Decode one read item from ``buffer``: its stored item, or a run of it that was
        fetched (``sliced``, of which ``req`` is the ``nth`` reader)."""
        if sliced is not None:
            self._decode_run(req, buffer, sliced, planner, nth)
            return
        self.format.decode(req, buffer, planner, self._recorder)

    def _shape_error(
        self, req: ReadItem, shape: tuple[int, ...], target: torch.Tensor
    ) -> Exception:
        """The error for a read item whose narrowed stored shape is not its destination's."""
        info = self.storage_data[req.storage_index]
        return shape_error(self._path, info.relative_path, req, shape, target)

    def _decode_run(
        self, req: ReadItem, buffer: ChunkBuffer, sliced: Slice, planner: LoadPlanner, nth: int
    ) -> None:
        """Copy the block of the region ``req`` reads that the run fetched for it holds (bytes
        of the stored storage from element ``sliced.first`` on; its ``nth`` reader) into its
        destination: straight into it when it is a contiguous CPU tensor of the stored dtype
        and the region is the whole run, else through a temporary the size of the run, viewed
        with the stored tensor's strides. The read item is committed with its last block."""
        target = planner.resolve_tensor(req).detach()
        if tuple(target.shape) != tuple(req.lengths):
            raise self._shape_error(req, tuple(req.lengths), target)
        prefix = sliced.prefixes[nth]
        offsets = [o + p for o, p in zip(req.storage_offsets, prefix, strict=False)]
        offsets += req.storage_offsets[len(prefix) :]
        lengths = (1,) * len(prefix) + tuple(req.lengths[len(prefix) :])
        destination = target
        for dim, index in enumerate(prefix):
            destination = destination.narrow(dim, index, 1)
        dtype = sliced.dtype
        count = len(buffer) // dtype.itemsize
        offset = sliced.element(offsets) - sliced.first
        buffer.seek(0)
        if (
            offset == 0
            and count == destination.numel()
            and type(destination) is torch.Tensor
            and destination.device.type == "cpu"
            and destination.dtype == dtype
            and destination.is_contiguous()
        ):
            read_into(buffer, destination)
        else:
            run = torch.empty(count, dtype=dtype)
            read_into(buffer, run)
            destination.copy_(run.as_strided(lengths, sliced.strides, offset))
        left = self._blocks_left[id(req)] - 1
        self._blocks_left[id(req)] = left
        if not left:
            self._recorder.add(fast_decoded_items=1)
            planner.commit_tensor(req, target)
