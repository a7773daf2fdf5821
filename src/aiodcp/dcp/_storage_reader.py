"""``S3StorageReader``: a ``torch.distributed.checkpoint.StorageReader`` over the fetch engine.

Call tree under ``dcp.load(state_dict, storage_reader=S3StorageReader("s3://b/ckpt"))``::

    reset(checkpoint_id)                 new load id, fresh state; re-targets when given an id
    read_metadata(rank=None)             this load's LoadSession (dcp/_session.py): GET .metadata
                                         (or __{rank}.metadata), restricted unpickle; its time is
                                         the request latency "auto" gaps are chosen by
    set_up_storage_reader(md, ...)       keeps md.storage_data (MetadataIndex -> _StorageInfo)
    prepare_local_plan(plan)             items sorted per file by offset
    prepare_global_plan(plans)           unchanged, or each rank's part of a shared load (below)
    read_data(final_plan, planner)       the session's read phase (a DcpLoad, dcp/_load.py):
                                         grouping, slicing, direct receipt, the engines, decoding
                                         in plan order (when the job shares, the exchange first)
        -> returns a completed torch.futures.Future

Multi-rank loads (``_sharing``): ``read_metadata`` shares the ``.metadata`` bytes over the group
``dcp.load`` runs on, ``prepare_local_plan`` marks a rank that can share, and the coordinator's
``prepare_global_plan`` assigns the stored items two or more ranks need (``share_job``,
``assign_shares``), except those each of their ranks slices its part of
(``DcpLoad.sliced_apart``), whose heads and tails are shared instead; its work grows with the
job's (stored item, rank) pairs (``benchmarks/coordinator.py`` measures it at 1,024 ranks). For
a checkpoint without an integrity record it also HEADs, once each, the data files the job reads
whole between its ranks (``check_whole``, ``_jobcheck``), whose CRCs the ranks then check
together.

The reader is reusable across loads (one session per ``dcp.load``) and owns a private I/O loop
thread with its connections, released by ``close()`` or the context manager. Under
``aiodcp.load_checkpoint`` and prefetch handles it is given their session, whose metadata they
read first and whose loop is theirs (``attached_reader``); ``abort()`` cancels the session.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import gc
import logging
import operator
import os
import threading
import uuid
import weakref
from collections.abc import Collection, Iterator, Mapping, Sequence
from types import TracebackType
from typing import TYPE_CHECKING, Any, TypeVar, cast

import torch.distributed as dist
from torch.distributed.checkpoint._extension import ExtensionRegistry
from torch.distributed.checkpoint.metadata import Metadata, MetadataIndex, StorageMeta
from torch.distributed.checkpoint.planner import (
    LoadPlan,
    LoadPlanner,
    ReadItem,
)
from torch.distributed.checkpoint.storage import StorageReader
from torch.futures import Future

from .._config import ReaderConfig
from .._driver import Driver, PrivateLoopDriver, renew_locks_after_fork
from .._errors import CheckpointFormatError
from .._path import CheckpointPath, is_checkpoint_path, parse_checkpoint_path
from .._stats import LoadStats, StatsRecorder
from .._verify import ALGORITHMS, crc_of
from ._jobcheck import CheckedFile, whole_candidates
from ._session import METADATA_NAME, LoadSession
from ._sharing import (
    RankShare,
    Readers,
    StoredItem,
    assign_shares,
    merge_adjacent,
    sharing_group,
)

if TYPE_CHECKING:
    from torch.distributed.checkpoint.filesystem import _StorageInfo

    from .._engine import StoreChecksum
    from .._store import S3Store
    from ._format import StoredFormat, StoredInfo
    from ._load import DcpLoad

__all__ = [
    "JobReads",
    "S3StorageReader",
    "SlotTable",
    "attached_reader",
    "check_whole",
    "share_job",
]


logger = logging.getLogger(__name__)

_T = TypeVar("_T")
_R = TypeVar("_R", bound="S3StorageReader")


class S3StorageReader(StorageReader):
    """Load a DCP checkpoint from ``s3://bucket/prefix`` with ``torch.distributed.checkpoint``.

    ``dcp.load(state_dict, storage_reader=S3StorageReader("s3://bucket/ckpt", region=...))``

    Only ``path`` is positional. ``region`` and ``endpoint_url`` default to botocore's own
    resolution (``AWS_DEFAULT_REGION``, ``AWS_ENDPOINT_URL``...). Every other option is a field of
    :class:`aiodcp.ReaderConfig`; pass a ``config`` or the common knobs as keywords (a keyword
    overrides the same field of ``config``).

    ``max_gap_size`` is ``"auto"`` unless given: the gap size is then chosen from the measured
    latency of the ``.metadata`` GET (see :attr:`aiodcp.ReaderConfig.max_gap_size`); the
    value used is in ``stats.max_gap_size``.

    ``process_group``: the group ``dcp.load`` runs on (pass the same one), to share a multi-rank
    load's bytes over (see README "Multi-rank loads"); None: torch's default group, found in
    torch's load frame (``stats.sharing`` says whether the load shared, and why not).
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        region: str | None = None,
        endpoint_url: str | None = None,
        config: ReaderConfig | None = None,
        max_gap_size: int | float | str | None = None,
        part_size: int | None = None,
        max_concurrency: int | None = None,
        memory_budget: int | None = None,
        progress: bool = False,
        process_group: dist.ProcessGroup | None = None,
        **options: Any,
    ) -> None:
        super().__init__()
        self.progress = bool(progress)
        # The group dcp.load runs on, to share over (None: found in torch's load frame).
        self._process_group = process_group
        self._group_given = process_group is not None
        self.config = ReaderConfig.from_kwargs(
            config,
            region=region,
            endpoint_url=endpoint_url,
            max_gap_size=max_gap_size,
            part_size=part_size,
            max_concurrency=max_concurrency,
            memory_budget=memory_budget,
            **options,
        )
        self._path: CheckpointPath = parse_checkpoint_path(path)
        self._driver: Driver | None = None
        self._driver_lock = threading.Lock()
        renew_locks_after_fork(self, "_driver_lock")
        self._owns_driver = True
        # The load in progress (what abort() stops), from read_metadata on.
        self._session: LoadSession | None = None
        # A session given by load_checkpoint or a prefetch, for the next dcp.load.
        self._attached: LoadSession | None = None
        self._share_group: dist.ProcessGroup | None = None
        self._sharing = ""  # LoadStats.sharing: "shared", or why not
        self._stats: LoadStats | None = None
        self.storage_data: dict[MetadataIndex, _StorageInfo] = {}
        self._tensor_metadata: dict[str, Any] = {}
        self.load_id = uuid.uuid4().hex
        self.rank: int | None = None
        self._extensions = ExtensionRegistry()

    # ------------------------------------------------------------------ plumbing

    @property
    def _io(self) -> Driver:
        with self._driver_lock:
            if self._driver is None:
                driver = PrivateLoopDriver(self.config)
                # A reader dropped without close() still shuts its loop and connections down.
                weakref.finalize(self, driver.close)
                self._driver = driver
            return self._driver

    @property
    def checkpoint_id(self) -> str:
        """The checkpoint URL, ``s3://bucket/prefix``."""
        return self._path.url

    @property
    def stats(self) -> LoadStats | None:
        """Statistics of the last completed (or failed) load, ``None`` before the first."""
        return self._stats

    def close(self) -> None:
        """Release the private I/O loop and its connections. The reader can be used again."""
        with self._driver_lock:
            driver, self._driver = self._driver, None
        if driver is not None and self._owns_driver:
            driver.close()

    def __enter__(self) -> S3StorageReader:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def abort(self) -> None:
        """Cancel the load in progress, from any thread. ``read_data`` then raises."""
        session = self._session or self._attached
        if session is not None:
            session.cancel()

    # ------------------------------------------------------------------ StorageReader

    def reset(self, checkpoint_id: str | os.PathLike[str] | None = None) -> None:
        if checkpoint_id:
            path = parse_checkpoint_path(checkpoint_id)
            if path != self._path:
                self._attached = None
            self._path = path
        self.storage_data = {}
        self.load_id = uuid.uuid4().hex
        self._session = None
        self._stats = None

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        rank = kwargs.get("rank")
        # The process group to share this load's bytes over (None: this rank loads alone).
        # Rank-local metadata (rank=...) means a load without collectives.
        if not self.config.share_across_ranks:
            self._share_group, self._sharing = None, "off: share_across_ranks=False"
        elif rank is not None:
            self._share_group, self._sharing = None, "off: rank-local metadata (no collectives)"
        else:
            self._share_group, self._sharing = sharing_group(
                self._process_group, group_given=self._group_given
            )
        # The first call of every dcp.load (which calls reset() only when given a
        # checkpoint_id): the load's session, and its statistics, start here.
        session, self._attached = self._attached, None
        if session is None or session.path != self._path:
            session = self._new_session()
        self._session = session
        if rank is not None or session.metadata is None:
            # Shared: rank 0 GETs it, every rank gets its bytes (one GET per job).
            metadata = session.read_metadata(rank=rank, group=self._share_group)
        else:
            metadata = session.metadata  # read by load_checkpoint or the prefetch, counted
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        cast(StorageMeta, metadata.storage_meta).load_id = self.load_id
        return metadata

    def set_up_storage_reader(
        self, metadata: Metadata, is_coordinator: bool, *args: Any, **kwargs: Any
    ) -> None:
        storage_data = getattr(metadata, "storage_data", None)
        if not isinstance(storage_data, dict):
            raise CheckpointFormatError(
                f"{self._path.url}: the checkpoint metadata has no storage_data",
                bucket=self._path.bucket,
                key=self._path.key(METADATA_NAME),
            )
        self.storage_data = storage_data
        self._tensor_metadata = getattr(metadata, "state_dict_metadata", None) or {}
        self.rank = kwargs.get("rank")
        if kwargs.get("use_collectives") is False:
            self._share_group = None
            self._sharing = "off: rank-local metadata (no collectives)"

    def prepare_local_plan(self, plan: LoadPlan) -> LoadPlan:
        def order(item: ReadItem) -> tuple[str, int]:
            info = self.storage_data[item.storage_index]
            return (info.relative_path, info.offset)

        # Marked when this rank can take part in a shared load: the coordinator shares only
        # if every rank's plan says so (same group found, sharing not switched off).
        marker = _CAN_SHARE if self._share_group is not None else plan.storage_data
        return dataclasses.replace(plan, items=sorted(plan.items, key=order), storage_data=marker)

    def prepare_global_plan(self, plans: list[LoadPlan]) -> list[LoadPlan]:
        """Unchanged, unless every rank can share: then each plan carries its rank's part of
        the job's sharing (``share_job``); items each of their ranks slices its part of
        (``DcpLoad.sliced_apart``) are each rank's own."""
        with _collector_paused():
            return self._global_plan(plans)

    def _global_plan(self, plans: list[LoadPlan]) -> list[LoadPlan]:
        plain = [
            dataclasses.replace(p, storage_data=None) if p.storage_data == _CAN_SHARE else p
            for p in plans
        ]
        group = self._share_group
        if (
            group is None
            or len(plans) != dist.get_world_size(group)
            or any(p.storage_data != _CAN_SHARE for p in plans)
        ):
            return plain
        current = self._current()
        load = current.read_phase(self._stored_format(current), recorder=StatsRecorder())
        reads = JobReads()
        shares = share_job(plans, load, reads)
        if shares is None:
            return plain
        if current.integrity is None and self.config.verify_checksums:
            shares = check_whole(shares, reads, load, current)
        return [
            dataclasses.replace(p, storage_data=share)
            for p, share in zip(plain, shares, strict=True)
        ]

    def read_data(self, plan: LoadPlan, planner: LoadPlanner) -> Future[None]:
        session = self._current()
        logger.debug("%s: read_data of %d read items", self._path.url, len(plan.items))
        try:
            self._stats = session.read(
                plan,
                planner,
                self._stored_format(session),
                group=self._share_group,
                sharing=self._sharing,
            )
        except BaseException as exc:
            self._stats = session.stats
            logger.debug("%s: load failed after %s: %r", self._path.url, self._stats, exc)
            raise
        logger.info("%s: loaded: %s", self._path.url, self._stats)
        future: Future[None] = Future()
        future.set_result(None)
        return future

    def _current(self) -> LoadSession:
        """This load's session (``read_metadata`` starts it; planning without it gets one)."""
        if self._session is None:
            self._session = self._new_session()
        return self._session

    def _new_session(self) -> LoadSession:
        """A load's session: it reads DCP's ``.metadata``."""
        return LoadSession(self._path, self.config, self._io, progress=self.progress)

    def _stored_format(self, session: LoadSession) -> StoredFormat:
        """The checkpoint's format for the read phase: DCP's (``dcp/_archive.py``)."""
        return session.dcp_format(self.storage_data, self._tensor_metadata, self._extensions)

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: str | os.PathLike[str]) -> bool:
        return is_checkpoint_path(checkpoint_id)


def attached_reader(
    session: LoadSession,
    driver: Driver,
    share_over: dist.ProcessGroup | None,
    reader_type: type[_R] | None = None,
) -> _R:
    """A reader (``reader_type``: ``S3StorageReader`` unless given) whose next ``dcp.load`` is
    ``session`` (its metadata, if the caller read it already, its prefetch source, its
    cancellation), for ``load_checkpoint`` and prefetch handles; ``driver``, the loop under the
    session, is the caller's (not closed with the reader); ``share_over``: the group the
    caller's ``dcp.load`` runs on when it shares, None when it does not (the caller knows: no
    frame lookup)."""
    kind = cast("type[_R]", S3StorageReader) if reader_type is None else reader_type
    reader = kind(session.path.url, config=session.config, progress=session.progress)
    reader._process_group, reader._group_given = share_over, True
    reader._driver = driver
    reader._owns_driver = False
    reader._attached = session
    return reader


@dataclasses.dataclass
class JobReads:
    """What ``share_job`` found the job reads: each stored item (``items``) and the ranks that
    read it (``ranks_of``, ascending), and the items the ranks slice apart."""

    items: Sequence[StoredItem] = ()
    ranks_of: Sequence[Sequence[int]] = ()
    sliced: Collection[StoredItem] = ()


def share_job(
    plans: Sequence[LoadPlan], load: DcpLoad, found: JobReads | None = None
) -> list[RankShare] | None:
    """Each rank's share of a shared load (the coordinator's part of ``prepare_global_plan``):
    ``plans[r]`` is rank ``r``'s local plan, ``load`` the read phase whose metadata, slicing
    rule and round size every rank uses. None when nothing is shared (every rank loads alone),
    also when a plan reads an item the metadata does not list (each rank's own load then
    raises the precise error).

    One pass over the read items groups them per stored item and rank (the stored item of a
    ``MetadataIndex`` looked up once per job); ``DcpLoad.sliced_apart`` picks the items each
    of their ranks slices its part of (replicas' parts overlapping or not), whose heads and
    tails (adjacent ones as one span) are then needed by their slicing ranks like stored
    items; ``assign_shares`` assigns and schedules the rest.
    Work and memory grow with the job's (stored item, rank) pairs; no rank's share holds
    another rank's items. ``found``, if given, gets what the job reads (``check_whole``).
    """
    # Per stored item, by slot: the item, the ranks that read it (ascending), each one's first
    # read item on it and (by position) all of them where a rank reads it more than once.
    table = SlotTable(load.storage_data)
    items = table.items
    ranks_of: list[list[int]] = []
    firsts: list[list[ReadItem]] = []
    several: list[dict[int, list[ReadItem]]] = []
    for rank, plan in enumerate(plans):
        found_slots = table.slots(plan.items)
        if found_slots is None:
            return None
        for _ in range(len(ranks_of), len(items)):  # stored items no rank before this reads
            ranks_of.append([])
            firsts.append([])
            several.append({})
        slots, distinct = found_slots
        _add_reads(rank, plan.items, slots, distinct, ranks_of, firsts, several)
    aliased = table.aliased
    apart = load.sliced_apart(
        (items[slot], Readers(ranks, firsts[slot], several[slot], slot in aliased))
        for slot, ranks in enumerate(ranks_of)
        if len(ranks) > 1
    )
    holders: dict[StoredItem, Sequence[int]] = dict(zip(items, ranks_of, strict=True))
    probed_by = {probe: ranks for probes, ranks in apart.values() for probe in probes}
    # Adjacent probes (one item's tail, the next one's head) travel as one span, so the
    # rank that fetches them makes one GET of it.
    for span, probers in merge_adjacent(probed_by).items():
        have = holders.get(span)
        holders[span] = sorted(probers if have is None else {*have, *probers})
    if found is not None:
        found.items, found.ranks_of, found.sliced = items, ranks_of, apart.keys()
    return assign_shares(holders, len(plans), round_bytes=load.round_bytes, sliced=apart.keys())


def check_whole(
    shares: list[RankShare], reads: JobReads, load: DcpLoad, session: LoadSession
) -> list[RankShare]:
    """``shares`` with the data files the job reads whole between its ranks (``_jobcheck``)
    in the shares of the ranks that read them: one HEAD per such file (concurrent, counted in
    the coordinator's ``checksum_requests``) asks the store for its full-object checksum; a
    file without one, or of another size, is left out (its bytes count as unverified)."""
    # Imported here, as the read phase imports it: the S3 stack stays out of the reader's module.
    from .._engine import ask_checksum

    fmt = load.format
    paths = sorted({item.path for item in reads.items})
    known = {path: len(fmt.file_prefix(path)) for path in paths}
    candidates = whole_candidates(reads.items, reads.ranks_of, reads.sliced, known)
    if not candidates:
        return shares
    path_of = session.path
    names = sorted(candidates)

    async def ask_all(store: S3Store) -> list[tuple[StoreChecksum | None, str]]:
        connections = asyncio.Semaphore(session.config.max_concurrency)
        return await asyncio.gather(
            *(
                ask_checksum(
                    store, path_of.bucket, path_of.key(name), session.recorder, connections
                )
                for name in names
            )
        )

    answers = session.scope.run(ask_all, f"the HEADs of {len(names)} data files of {path_of.url}")
    numbers = {info.relative_path for info in load.storage_data.values()}
    number_of = {path: n for n, path in enumerate(sorted(numbers))}
    checked: dict[str, CheckedFile] = {}
    for name, (answer, why) in zip(names, answers, strict=True):
        if answer is None or answer.algorithm not in ALGORITHMS or answer.size != candidates[name]:
            logger.debug(
                "s3://%s/%s: not checked whole: %s",
                path_of.bucket,
                path_of.key(name),
                why or f"{answer}: not a checksum that combines, or another size",
            )
            continue
        prefix = fmt.file_prefix(name)
        checked[name] = CheckedFile(
            number=number_of[name],
            algorithm=answer.algorithm,
            expected=answer.expected,
            size=answer.size,
            etag=answer.etag,
            known=len(prefix),
            known_crc=crc_of(answer.algorithm, [prefix]) if prefix else 0,
        )
    if not checked:
        return shares
    # Per rank: the checked files it reads, and the entries of its row (an upper bound: each
    # item of them it fetches, shared or its own, and three per file).
    touched: list[set[str]] = [set() for _ in shares]
    entries = [0] * len(shares)
    for item, ranks in zip(reads.items, reads.ranks_of, strict=True):
        if item.path in checked:
            for rank in ranks:
                touched[rank].add(item.path)
            if len(ranks) == 1:
                entries[ranks[0]] += 1
    for rank, share in enumerate(shares):
        entries[rank] += sum(1 for item in share.fetch if item.path in checked)
        entries[rank] += 3 * len(touched[rank])
    slots = max(entries)
    return [
        share._replace(checked={path: checked[path] for path in touched[rank]}, check_slots=slots)
        for rank, share in enumerate(shares)
    ]


@contextlib.contextmanager
def _collector_paused() -> Iterator[None]:
    """Python's cyclic garbage collector paused (if it runs) for the block: the coordinator's
    step. It allocates a job's worth of small containers, and each collection they trigger
    walks every object the process holds, torch's gathered plans first (4.2 of 6.5 s of the
    step at 1,024 ranks x 10^5 items, measured while it allocated more than it does now). The
    step makes no reference cycles: what it drops is freed at once all the same."""
    if not gc.isenabled():
        yield
        return
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


class SlotTable:
    """The slot (``share_job``'s number) of the stored item each read item of a plan reads, a
    slot per distinct stored item of the job (``items``, by slot).

    Plans that read the same indexes in the same order (data-parallel replicas: HSDP's, or
    every rank of a resharded 1-process save) are looked up once: a plan's key is its
    indexes' fqns and offsets, two tuples compared in C, where looking up each index is a
    step per read item; the others take the first one's slots. ``MetadataIndex`` compares and
    hashes (fqn, offset): the same key, so the same slots as looking each one up."""

    def __init__(self, storage_data: Mapping[MetadataIndex, StoredInfo]) -> None:
        self.storage_data = storage_data
        self.items: list[StoredItem] = []
        self.aliased: set[int] = set()
        """Slots read under two indexes (fqn, offset): their bytes are one stored item."""
        self.looked_up = 0
        """Plans looked up index by index (the others matched one of them)."""
        self._of: dict[str, dict[Any, int]] = {}  # fqn -> offset -> slot
        self._by_item: dict[StoredItem, int] = {}
        self._by_plan: dict[tuple[tuple[str, ...], tuple[Any, ...]], tuple[list[int], bool]]
        self._by_plan = {}
        self._info: dict[str, dict[Any, StoredInfo]] | None = None

    def slots(self, reqs: Sequence[ReadItem]) -> tuple[list[int], bool] | None:
        """The slots ``reqs`` read (in their order), and whether they are distinct (no stored
        item read twice); None if one of them is not in the metadata."""
        # Each index taken once, then its fields (a dotted getter would walk to it twice: a
        # job's read items are ~10^6 objects, each visit a cache miss).
        indexes = list(map(_STORAGE_INDEX, reqs))
        fqns = tuple(map(_FQN, indexes))
        offsets = tuple(map(_OFFSET, indexes))
        key = (fqns, offsets)
        found = self._by_plan.get(key)
        if found is None:
            slots = self._look_up(fqns, offsets)
            if slots is None:
                return None
            found = self._by_plan[key] = (slots, len(set(slots)) == len(slots))
        return found

    def _look_up(self, fqns: Sequence[str], offsets: Sequence[Any]) -> list[int] | None:
        """Each read item's slot, new stored items given the next ones (see ``slots``)."""
        self.looked_up += 1
        of, nothing = self._of, _NOTHING
        # Its fqn, then its offset: the entry a MetadataIndex finds, without a Python-level
        # __hash__ and __eq__ (nor a key to build) per read item.
        slots = [
            (of.get(fqn) or nothing).get(offset) for fqn, offset in zip(fqns, offsets, strict=True)
        ]
        if None not in slots:
            return cast("list[int]", slots)
        # Stored items no plan before this one reads: each new one the next slot, unless its
        # bytes are an item's already seen under another index.
        info_of, items, by_item = self._info_of(), self.items, self._by_item
        for n, slot in enumerate(slots):
            if slot is not None:
                continue
            fqn, offset = fqns[n], offsets[n]
            of_fqn = of.setdefault(fqn, {})
            slot = of_fqn.get(offset)
            if slot is None:
                info = (info_of.get(fqn) or nothing).get(offset)
                if info is None:
                    return None
                item = StoredItem(info.relative_path, info.offset, info.offset + info.length)
                slot = by_item.setdefault(item, len(items))
                if slot == len(items):
                    items.append(item)
                else:  # two indexes on the same bytes share a slot
                    self.aliased.add(slot)
                of_fqn[offset] = slot
            slots[n] = slot
        return cast("list[int]", slots)

    def _info_of(self) -> dict[str, dict[Any, StoredInfo]]:
        """The metadata's storage entries by fqn, then offset (what a ``MetadataIndex`` key
        finds), made on first use: one pass over the metadata instead of a ``MetadataIndex``
        hash and comparison, in Python, per stored item the job reads."""
        if self._info is None:
            self._info = {}
            for index, info in self.storage_data.items():
                self._info.setdefault(index.fqn, {})[index.offset] = info
        return self._info


def _add_reads(
    rank: int,
    reqs: list[ReadItem],
    slots: list[int],
    distinct: bool,
    ranks_of: list[list[int]],
    firsts: list[list[ReadItem]],
    several: list[dict[int, list[ReadItem]]],
) -> None:
    """Rank ``rank``'s read items ``reqs`` (on the stored items ``slots``, ``distinct`` if
    no two are the same) added to each slot's readers (see ``share_job``): one step per read
    item, no list per pair."""
    if distinct:  # each stored item read once: most ranks
        for slot, req in zip(slots, reqs, strict=True):
            ranks_of[slot].append(rank)
            firsts[slot].append(req)
        return
    mine: dict[int, list[ReadItem]] = {}
    for slot, req in zip(slots, reqs, strict=True):
        mine.setdefault(slot, []).append(req)
    for slot, on_slot in mine.items():
        if len(on_slot) > 1:
            several[slot][len(ranks_of[slot])] = on_slot
        ranks_of[slot].append(rank)
        firsts[slot].append(on_slot[0])


_STORAGE_INDEX = operator.attrgetter("storage_index")
_FQN = operator.attrgetter("fqn")
_OFFSET = operator.attrgetter("offset")
_NOTHING: Mapping[Any, Any] = {}


_CAN_SHARE = "aiodcp:can-share"
"""A local plan's ``storage_data`` when its rank can take part in a shared load."""
