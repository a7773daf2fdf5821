"""Multi-rank loads: stored items several ranks need fetched once per job, shared over the
process group, unless each of those ranks fetches its own part for fewer bytes.

When several ranks of a ``dcp.load`` need the same stored items (data-parallel replicas, a
resharded load in which each rank needs part of every stored chunk), each would fetch them from
the store. Here the job fetches each once and torch.distributed carries it to the other ranks
that need it; torch.distributed is the transport, nothing of our own. An item of which every
rank that needs it slices just its part (a resharded load) is not shared: each rank fetching
its runs moves fewer bytes than receiving the whole item would.

Data flow, on every rank of the load's process group (``sharing_group``: the group the caller
names, ``process_group=``, else the one ``dcp.load`` runs on, found in torch's load frame)::

    read_metadata()             rank 0 GETs .metadata; share_metadata broadcasts the bytes and
                                the GET's latency, or its error, to every rank (1 GET per job)
    prepare_global_plan(plans)  coordinator (rank 0) only, pure: share_job (the storage
                                reader) groups the read items per stored item, assign_shares
                                -> one RankShare per rank, carried in LoadPlan.storage_data:
                                which shared items the rank fetches, and per round what it sends
                                to whom and receives from whom (its own items only: O(its share
                                + rounds) bytes for torch to scatter, whatever the job)
    read_data(plan)             the rank's engine fetches its share, in round order; per round:
                                wait for what it sends -> Exchange.status (all_gather of one
                                flag per rank: if any rank failed, every rank raises now) ->
                                isend/irecv in 1 MiB segments (a large tensor a rank reads
                                whole straight into it) -> decode what it needs -> release;
                                then the items only this rank needs load as in a
                                single-process load; a last Exchange.status carries the ranks'
                                counters, so every rank's LoadStats holds the job's totals, and
                                the CRCs of the files the job reads whole between its ranks
                                (a checkpoint without a record, ``_jobcheck``): every rank
                                checks them against the store's checksums before it returns

Invariants: an item is shared when two or more ranks need it, fetched by one of them (the one
with the fewest bytes to fetch so far), and sent in one round to every other rank that needs
it; unless every one of those ranks can slice it (``DcpLoad.sliced_apart``: the same rule as
each rank's own ``_slice``, which admits a part only when the bytes it leaves out are worth
more than its requests, so that the rank moves fewer bytes fetching its runs than it would
fetching or receiving the whole item): then each rank fetches its own runs, the item's head
and tail (its archive's own ~1.6 KB, which each needs to find its part) are shared like an
item, and no rank holds a whole chunk it mostly throws away. So the job fetches a stored byte
more than once exactly where sliced runs overlap: ranks that read the same part (replicas,
HSDP) fetch it once each, ranks whose strided runs merge across the gap into a row band (TP
blocks) fetch the rows they share; and where a probe reaches into the storage bytes (a few
hundred bytes of the first and last rows), or a small item's head and tail overlap (each rank
then probes for itself). Per round a
rank sends at most ``round_bytes`` of item memory (what its engine holds at once) and receives
at most ``round_bytes`` (or one larger item alone), so a rank holds at most
about its ``memory_budget`` plus the item in hand, whatever the world size. A rank's items are
sent in (file, offset) order, the order its engine fetches them in, so the engine's budget is
always released by the next round: no deadlock. Every rank takes part in every round's
collectives in the same order; a rank that failed (fetch, decode, cancellation) still takes
part in the next status round and says so, so no rank waits in a receive for the process
group's timeout.
"""

from __future__ import annotations

import contextlib
import itertools
import operator
import pickle
import sys
import warnings
from collections import defaultdict
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple, TypeVar

import torch
import torch.distributed as dist

from .._errors import AiodcpError, PeerLoadError
from .._reader import ChunkBuffer
from .._sinks import BLOCK_BYTES, BlockPool, item_memory
from ._format import Receive

if TYPE_CHECKING:
    from torch.distributed.checkpoint.planner import ReadItem
    from typing_extensions import Buffer

    from ._jobcheck import CheckedFile

__all__ = [
    "SEGMENT_BYTES",
    "SHARED",
    "dcp_load_group",
    "Exchange",
    "RankShare",
    "Readers",
    "Round",
    "StoredItem",
    "assign_shares",
    "item_memory",
    "merge_adjacent",
    "plan_sharing",
    "share_metadata",
    "sharing_group",
    "will_share",
]

T = TypeVar("T")

SEGMENT_BYTES = BLOCK_BYTES
"""Items cross the process group in messages of this size (the engine's item blocks)."""


class StoredItem(NamedTuple):
    """One stored item: bytes ``[start, end)`` of the data file ``path`` (relative).

    A tuple, ordered by file then offset: hashing, comparing and sorting items run in C,
    and a job's coordinator does each about once per (stored item, rank) pair."""

    path: str
    start: int
    end: int

    @property
    def length(self) -> int:
        return self.end - self.start


class Readers(NamedTuple):
    """The ranks that read one stored item (``DcpLoad.sliced_apart``), gathered rank by rank
    in one pass over the job's plans (``share_job``): no list per (item, rank) pair."""

    ranks: Sequence[int]
    """Ascending."""
    firsts: Sequence[ReadItem]
    """Each rank's first read item on the item, in ``ranks``' order."""
    several: Mapping[int, list[ReadItem]]
    """By position in ``ranks``: every read item of a rank that reads the item more than
    once, in plan order (most ranks read an item once: usually empty)."""
    aliased: bool = False
    """Whether the job reads the item under more than one index (fqn, offset)."""

    def per_rank(self) -> list[list[ReadItem]]:
        """Each rank's read items on the item, in ``ranks``' order."""
        several = self.several
        return [several.get(pos) or [req] for pos, req in enumerate(self.firsts)]


class Round(NamedTuple):
    """One rank's part of one exchange round (a tuple: a large job's plans hold many)."""

    sends: tuple[tuple[StoredItem, tuple[int, ...]], ...] = ()
    """Items this rank sends, each with the ranks it goes to, in (file, offset) order."""
    receives: tuple[tuple[StoredItem, int], ...] = ()
    """Items this rank receives, each with the rank it comes from, in (file, offset) order."""


class RankShare(NamedTuple):
    """What one rank's load plan carries (``LoadPlan.storage_data``) when the job shares."""

    rank: int
    world: int
    fetch: tuple[StoredItem, ...]
    """Shared items this rank fetches from the store, in the order it sends them."""
    shared: frozenset[StoredItem]
    """Every stored item this rank needs that goes through the exchange (fetched here and
    sent, or received); the rank's other items load as in a single-process load."""
    rounds: tuple[Round, ...]
    """As many on every rank: round k of every rank is one step of the job."""
    checked: Mapping[str, CheckedFile] = {}
    """The data files this rank reads that the job reads whole between its ranks, checked
    against the store's checksum at the end of the load (``_jobcheck``; a checkpoint without
    an integrity record), by relative path. (The default is one shared dict, never written: a
    plan crosses ranks in pickle, which a MappingProxyType does not survive.)"""
    check_slots: int = 0
    """Entries of every rank's row in that check (the same on every rank; 0: no check)."""


def plan_sharing(
    needs: Sequence[Collection[StoredItem]],
    *,
    round_bytes: int,
    sliced: Collection[StoredItem] = (),
) -> list[RankShare] | None:
    """Assign every stored item that two or more ranks need to one of them, and schedule its
    transfers in rounds. ``needs[r]``: the stored items rank ``r`` reads. ``sliced``: items
    several ranks need parts of, each rank fetching only its own part (slicing, see
    ``DcpLoad.sliced_apart``): not shared, loaded by each rank as its own items.
    None when no item is left to share and none is sliced (every rank loads alone).

    ``assign_shares`` with each item's ranks gathered from ``needs``.
    """
    holders: dict[StoredItem, list[int]] = {}
    for rank, items in enumerate(needs):
        for item in set(items):
            holders.setdefault(item, []).append(rank)
    return assign_shares(holders, len(needs), round_bytes=round_bytes, sliced=sliced)


def assign_shares(
    holders: Mapping[StoredItem, Sequence[int]],
    world: int,
    *,
    round_bytes: int,
    sliced: Collection[StoredItem] = (),
) -> list[RankShare] | None:
    """``plan_sharing`` from each stored item's ranks (``holders[item]``: the ranks of
    ``world`` that need it, each once, ascending), in time and memory proportional to the
    job's (item, rank) pairs and rounds: each rank's share holds only its own items.

    Balanced by bytes: items are assigned largest first, each to the rank that needs it with
    the fewest bytes to fetch so far (its own items included; ties to the lowest rank). Then
    in (file, offset) order each shared item goes to the first round, from the one its
    fetcher's previous item went to, in which its fetcher sends and each of its receivers
    receives at most ``round_bytes`` of item memory (``item_memory``; an item alone always
    fits): a rank's items are sent in the order its engine fetches them.
    """
    load = [0] * world
    shared: dict[StoredItem, Sequence[int]] = {}
    for item, ranks in holders.items():
        _, start, end = item
        if end <= start or item in sliced:
            continue
        if len(ranks) > 1:
            shared[item] = ranks
        else:
            load[ranks[0]] += end - start
    if not shared and not sliced:
        return None
    # By position in (file, offset) order: each item, its ranks, minus its length, its fetcher.
    order = sorted(shared)
    readers = list(map(shared.__getitem__, order))
    minus = [start - end for _, start, end in order]
    fetcher = [0] * len(order)
    # Largest first, then in (file, offset) order (a stable sort of that order by length).
    by_size = sorted(range(len(order)), key=minus.__getitem__)
    load_of = load.__getitem__
    for n in by_size:
        chosen = min(readers[n], key=load_of)  # the first (lowest) of the least
        fetcher[n] = chosen
        load[chosen] -= minus[n]

    schedule = _Schedule(world, round_bytes)
    place = schedule.place
    fetch: list[list[StoredItem]] = [[] for _ in range(world)]
    # Per rank: round -> what it sends (receives) in it, in placement order.
    sends: list[defaultdict[int, list[tuple[StoredItem, tuple[int, ...]]]]]
    sends = [defaultdict(list) for _ in range(world)]
    receives: list[defaultdict[int, list[tuple[StoredItem, int]]]]
    receives = [defaultdict(list) for _ in range(world)]
    memory: dict[int, int] = {}  # minus an item's length -> its item memory (lengths repeat)
    for n, item in enumerate(order):  # (file, offset) order
        src = fetcher[n]
        ranks = readers[n]
        at = ranks.index(src)
        dsts = (*ranks[:at], *ranks[at + 1 :])
        size = memory.get(minus[n])
        if size is None:
            size = memory[minus[n]] = item_memory(-minus[n])
        k = place(src, dsts, size)
        fetch[src].append(item)
        sends[src][k].append((item, dsts))
        pair = (item, src)  # one tuple for every receiver
        for d in dsts:
            receives[d][k].append(pair)

    shares = []
    idle = [_NO_ROUND] * schedule.rounds
    for rank in range(world):
        parts = idle.copy()
        sending, receiving = sends[rank], receives[rank]
        for k in sending.keys() | receiving.keys():
            parts[k] = Round(sends=tuple(sending.get(k, ())), receives=tuple(receiving.get(k, ())))
        received = map(_FIRST, itertools.chain.from_iterable(receiving.values()))
        shares.append(
            RankShare(
                rank=rank,
                world=world,
                fetch=tuple(fetch[rank]),
                shared=frozenset(itertools.chain(fetch[rank], received)),
                rounds=tuple(parts),
            )
        )
    return shares


_NO_ROUND = Round()
"""A rank's round with nothing to send or receive: one object, so a plan pickles it once."""


class _Schedule:
    """The exchange's rounds as they fill (see ``assign_shares``): per round, the item memory
    each rank sends and receives in it.

    ``place`` finds an item's round without trying every round, nor every receiver in each:
    per rank, the rounds it holds ``round_bytes`` in (full: no item fits beside) are skipped
    in one step (a jump table, path-compressed), so an item whose fetcher's last round is long
    past, among rounds every rank fills (a 1-process save loaded by every rank), does not walk
    them one by one; and a round in which no rank receives more than the item leaves room
    for is taken without looking at its receivers one by one."""

    def __init__(self, world: int, round_bytes: int) -> None:
        self.round_bytes = round_bytes
        self._world = world
        # Per round, by rank: the item memory it sends, receives (a list: indexed in C).
        self._sent: list[list[int]] = []
        self._got: list[list[int]] = []
        self._most: list[int] = []  # per round: the most any rank receives in it
        self._full_out: list[dict[int, int]] = [{} for _ in range(world)]  # full round -> next
        self._full_in: list[dict[int, int]] = [{} for _ in range(world)]
        self._next = [0] * world  # a rank's items go in (file, offset) order, rounds never back

    @property
    def rounds(self) -> int:
        return len(self._sent)

    def place(self, src: int, dsts: Sequence[int], size: int) -> int:
        """The round of an item of ``size`` bytes of item memory that ``src`` sends to
        ``dsts``: the first, from ``src``'s previous item's, in which each of them has room
        for it (or holds nothing), counted in."""
        limit, sent, got, most = self.round_bytes, self._sent, self._got, self._most
        # A rank that holds ``held`` has room for the item unless ``held > over``.
        over = limit - size if size <= limit else 0
        k = self._next[src]
        rounds = len(sent)
        while k < rounds:
            held = sent[k][src]
            if held > over:
                k = self._after(self._full_out[src], k, held)
                continue
            if most[k] > over:  # (else every receiver has room)
                into = got[k]
                for d in dsts:
                    held = into[d]
                    if held > over:  # the first receiver without room
                        k = self._after(self._full_in[d], k, held)
                        break
                else:
                    break
                continue
            break
        if k == rounds:
            sent.append([0] * self._world)
            got.append([0] * self._world)
            most.append(0)
        sent[k][src] += size
        into = got[k]
        top = most[k]
        for d in dsts:
            held = into[d] = into[d] + size
            if held > top:
                top = held
        most[k] = top
        self._next[src] = k
        return k

    def _after(self, full: dict[int, int], k: int, held: int) -> int:
        """The next round to try after ``k``, where a rank holds ``held`` (and so has no
        room): the first after it that is not full for that rank."""
        if held >= self.round_bytes:
            full[k] = k + 1
        k += 1
        first = k
        while k in full:
            k = full[k]
        while first in full and full[first] != k:  # shorten the chain walked next time
            full[first], first = k, full[first]
        return k


_FIRST = operator.itemgetter(0)


def merge_adjacent(items: Mapping[StoredItem, frozenset[int]]) -> dict[StoredItem, frozenset[int]]:
    """``items`` (each with the ranks that need it), with items that touch (one ends where the
    next begins, in one file) and that the same ranks need merged into one: one GET for the
    rank that fetches it."""
    merged: dict[StoredItem, frozenset[int]] = {}
    last: StoredItem | None = None
    for item in sorted(items):
        ranks = items[item]
        if last is not None and last.path == item.path and last.end == item.start:
            if merged[last] == ranks:
                del merged[last]
                item = StoredItem(item.path, last.start, item.end)
        merged[item] = ranks
        last = item
    return merged


# ----------------------------------------------------------------------------- collectives


def _shareable(group: dist.ProcessGroup | None) -> dist.ProcessGroup | None:
    """``group`` (None: the default group) if it has two or more ranks and moves CPU tensors
    (a gloo backend; NCCL alone cannot), else None."""
    group = group or dist.group.WORLD
    if group is None or dist.get_world_size(group) < 2:
        return None
    backend = str(dist.get_backend(group)).lower()
    return group if "gloo" in backend else None


def will_share(process_group: dist.ProcessGroup | None, no_dist: bool) -> bool:
    """Whether a ``dcp.load`` with these arguments would share its bytes (see sharing_group)."""
    if no_dist or not (dist.is_available() and dist.is_initialized()):
        return False
    return _shareable(process_group) is not None


def dcp_load_group(
    process_group: dist.ProcessGroup | None, no_dist: bool
) -> dist.ProcessGroup | None:
    """The group ``dcp.load(process_group=, no_dist=)`` runs on: None when it runs no
    collectives (``no_dist``, or torch.distributed not initialised)."""
    if no_dist or not (dist.is_available() and dist.is_initialized()):
        return None
    return process_group or dist.group.WORLD


SHARED = "shared"
"""``LoadStats.sharing`` of a load that shared its bytes across ranks."""

_NOT_FOUND = object()
_warned_not_found = False


def _load_frame_wrapper() -> Any:
    """torch's ``_DistWrapper`` of the ``dcp.load`` this call runs under (its
    ``_load_state_dict`` frame's ``distW``), or ``_NOT_FOUND``."""
    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_code.co_name == "_load_state_dict" and "distW" in frame.f_locals:
            return frame.f_locals["distW"]
        frame = frame.f_back  # type: ignore[assignment]
    return _NOT_FOUND


def sharing_group(
    given: dist.ProcessGroup | None, *, group_given: bool
) -> tuple[dist.ProcessGroup | None, str]:
    """The process group a load shares its bytes over (None: it loads alone), and the reason,
    for ``LoadStats.sharing``: ``"shared"`` or ``"off: <why>"``.

    ``given``/``group_given``: the group the caller named (``S3StorageReader(process_group=)``,
    ``load_checkpoint(process_group=)``: the group its ``dcp.load`` runs on; None given by
    ``load_checkpoint`` means it will not share). Otherwise the group comes from torch's own
    load frame up the stack (``_load_state_dict``'s ``_DistWrapper``), as torch does not tell a
    storage reader which group it loads on, and a collective on another group (or in a load
    only some ranks run, ``no_dist=True``) would hang. That lookup depends on torch's private
    names: when it finds nothing in a job of several ranks, sharing is off, said once in a
    warning and in ``LoadStats.sharing`` (pass ``process_group=`` to share)."""
    global _warned_not_found
    if not (dist.is_available() and dist.is_initialized()):
        return None, "off: a single process (no process group)"
    wrapper = _load_frame_wrapper()
    if wrapper is not _NOT_FOUND and not getattr(wrapper, "use_dist", True):
        return None, "off: dcp.load(no_dist=True)"
    if group_given:
        group = given
        if group is None:
            return None, "off: the load's caller does not share"
    elif wrapper is _NOT_FOUND:
        if dist.get_world_size() < 2:
            return None, "off: a process group of one rank"
        reason = (
            "off: the process group of this dcp.load is unknown (torch's _load_state_dict "
            f"frame was not found; torch {torch.__version__}): pass process_group= to "
            "aiodcp.S3StorageReader to share"
        )
        if not _warned_not_found:
            _warned_not_found = True
            warnings.warn(
                f"aiodcp: sharing across ranks is {reason}. Each rank fetches what it needs "
                "for itself (correct, but every rank pays for its own bytes).",
                RuntimeWarning,
                stacklevel=3,
            )
        return None, reason
    else:
        group = getattr(wrapper, "group", None)
    group = group or dist.group.WORLD
    if group is None or dist.get_world_size(group) < 2:
        return None, "off: a process group of one rank"
    if _shareable(group) is None:
        return None, (
            f"off: the process group's backend ({dist.get_backend(group)}) cannot move CPU "
            "tensors; pass a gloo group (dist.new_group(backend='gloo')) as process_group="
        )
    return group, SHARED


def _portable(error: BaseException) -> BaseException:
    """``error`` if it pickles (aiodcp's errors do), else an AiodcpError with its text."""
    try:
        pickle.dumps(error)
    except Exception:
        return AiodcpError(f"{type(error).__name__}: {error}")
    return error


def share_metadata(group: dist.ProcessGroup, fetch: Callable[[], T]) -> T:
    """``fetch()`` on the group's rank 0 only, its result (or its error) broadcast to every
    rank of ``group``: one ``.metadata`` GET per job. Every rank must call it."""
    payload: list[Any] = [None]
    if dist.get_rank(group) == 0:
        try:
            payload[0] = ("ok", fetch())
        except Exception as exc:
            payload[0] = ("error", _portable(exc))
    dist.broadcast_object_list(payload, src=dist.get_global_rank(group, 0), group=group)
    status, value = payload[0]
    if status == "error":
        raise value
    return value  # type: ignore[no-any-return]


class Exchange:
    """The collectives of one rank's shared load over ``group`` (see the module docstring).

    Items are received into 1 MiB blocks (a heap buffer for items under half a block), one
    message per block; released blocks serve the next rounds, so the memory received items
    hold is what a round holds (fresh memory costs a page fault per page, and memory freed to
    the allocator may not go back to the system)."""

    def __init__(self, group: dist.ProcessGroup, share: RankShare, name: str = "") -> None:
        self.group = group
        self.share = share
        self.name = name
        """What is loaded (the checkpoint's URL), for errors."""
        self.bytes_sent = 0
        self.bytes_received = 0
        self._pool = BlockPool()
        self._lent: dict[StoredItem, list[memoryview]] = {}

    def _global(self, rank: int) -> int:
        return dist.get_global_rank(self.group, rank)

    def status(
        self,
        error: BaseException | None,
        counters: Sequence[int] = (),
        extra: Sequence[int] = (),
    ) -> list[list[int]]:
        """Every rank's ``counters`` and ``extra`` (after a flag: did it fail; as many ints on
        every rank); if any rank failed, raise now, on every rank: a rank's own error, else
        ``PeerLoadError`` naming the first failed rank and its cause."""
        row = torch.tensor([1 if error is not None else 0, *counters, *extra], dtype=torch.int64)
        rows = [torch.zeros_like(row) for _ in range(self.share.world)]
        with self._waiting_for("every rank's status"):
            dist.all_gather(rows, row, group=self.group)
        table = [[int(x) for x in r.tolist()] for r in rows]
        failed = [rank for rank, r in enumerate(table) if r[0]]
        if not failed:
            return [r[1:] for r in table]
        errors: list[Any] = [None] * self.share.world
        with self._waiting_for("the failed ranks' errors"):
            dist.all_gather_object(
                errors, None if error is None else _portable(error), group=self.group
            )
        if error is not None:
            raise error
        rank = failed[0]
        cause = errors[rank]
        raise PeerLoadError(
            f"rank {rank} of {self.share.world} failed, so this rank (rank {self.share.rank}) "
            f"stopped its part of the shared load: {type(cause).__name__}: {cause}",
            rank=rank,
            cause=cause,
        )

    def _memory(self, item: StoredItem) -> list[memoryview]:
        """Buffers for a received item: one per message, lent until ``release``."""
        if item.length < SEGMENT_BYTES // 2:
            return [memoryview(bytearray(item.length))]
        views, blocks = [], []
        for start in range(0, item.length, SEGMENT_BYTES):
            block = self._block()
            blocks.append(block)
            views.append(block[: min(SEGMENT_BYTES, item.length - start)])
        self._lent[item] = blocks
        return views

    def release(self, received: Iterable[StoredItem]) -> None:
        """Take back the blocks of decoded received items, for the next rounds."""
        for item in received:
            self._pool.give(self._lent.pop(item, []))

    def transfer(
        self,
        k: int,
        sending: Mapping[StoredItem, ChunkBuffer],
        direct: Mapping[StoredItem, Receive] | None = None,
        check: Callable[[StoredItem, Sequence[Buffer]], bool] | None = None,
    ) -> tuple[dict[StoredItem, ChunkBuffer], list[StoredItem]]:
        """Round ``k``: send ``sending`` (this round's items, downloaded) to their ranks and
        receive this round's items from theirs. Returns the received items to decode
        (``release`` them once decoded) and the items received straight into their
        destination (``direct``'s targets, verified: commit them).

        A ``direct`` item's first segment is received first; its receiver's ``locate`` reads
        where its storage bytes begin, and the segments wholly inside them are then received
        straight into the destination's memory, the others into blocks whose storage bytes are
        copied there; the zip directory is checked as a fetched direct item's is, and its
        bytes with ``check`` (the checkpoint's checksums: the bytes before, in and after the
        destination). An item that does not locate, verify or match is returned with its bytes,
        as any other received item."""
        part = self.share.rounds[k]
        works: list[Any] = []
        # Messages between two ranks match by tag: the n-th segment this rank receives from a
        # peer is the n-th that peer sends to it (both enumerate the round's items in order).
        counts: dict[tuple[str, int], int] = {}

        def tag(direction: str, peer: int) -> int:
            n = counts.get((direction, peer), 0)
            counts[(direction, peer)] = n + 1
            return n

        def recv(view: memoryview, src: int, n: int) -> Any:
            return dist.irecv(
                torch.frombuffer(view, dtype=torch.uint8), self._global(src), self.group, n
            )

        received: dict[StoredItem, ChunkBuffer] = {}
        located: list[_Located] = []
        for item, src in part.receives:
            target = (direct or {}).get(item)
            segments = -(-item.length // SEGMENT_BYTES)
            if target is not None and segments >= 3:
                tags = [tag("in", src) for _ in range(segments)]
                first = self._block()
                work = recv(first, src, tags[0])
                located.append(_Located(item, src, target, tags, first, work))
                continue
            views = self._memory(item)
            works.extend(recv(view, src, tag("in", src)) for view in views)
            received[item] = ChunkBuffer(views)
        for item, dsts in part.sends:
            segments_of = _segments(sending[item], item.length)
            for dst in dsts:
                works.extend(
                    dist.isend(segment, self._global(dst), self.group, tag("out", dst))
                    for segment in segments_of
                )
                self.bytes_sent += item.length
        with self._waiting_for(
            f"round {k}'s items from ranks {sorted({s for _, s in part.receives})}"
        ):
            for entry in located:
                entry.first_work.wait()
                works.extend(entry.post(self, recv))
            for work in works:
                work.wait()
        done = []
        for entry in located:
            buffer = entry.finish(self, check)
            if buffer is None:
                done.append(entry.item)
            else:
                received[entry.item] = buffer
        self.bytes_received += sum(item.length for item, _ in part.receives)
        return received, done

    def _block(self) -> memoryview:
        return self._pool.block()

    @contextlib.contextmanager
    def _waiting_for(self, what: str) -> Iterator[None]:
        """The process group's own failures while this rank waits for ``what`` (a peer that
        died or hung: torch.distributed raises once the group's timeout passed) as an
        ``AiodcpError`` naming the load, the rank and what it waited for."""
        try:
            yield
        except RuntimeError as exc:  # DistBackendError and gloo's errors are RuntimeErrors
            raise AiodcpError(
                f"{self.name or 'a shared load'}: rank {self.share.rank} of {self.share.world} "
                f"waited for {what} in the exchange, and the process group failed ({exc}): a "
                "peer rank died or stopped answering (the group's timeout bounds this wait; "
                "set it with init_process_group(timeout=...))"
            ) from exc


class _Located:
    """One item received straight into its destination (see ``Exchange.transfer``)."""

    def __init__(
        self,
        item: StoredItem,
        src: int,
        target: Receive,
        tags: list[int],
        first: memoryview,
        first_work: Any,
    ) -> None:
        self.item, self.src, self.target, self.tags = item, src, target, tags
        self.first, self.first_work = first, first_work
        self.start = -1
        self.blocks: dict[int, memoryview] = {}  # segment index -> block (not in the target)

    def post(self, exchange: Exchange, recv: Callable[[memoryview, int, int], Any]) -> list[Any]:
        """The receives of every segment after the first, into the target where they can go."""
        length, nbytes = self.item.length, self.target.nbytes
        start = self.target.locate(bytes(self.first))
        if start is not None and 0 <= start and start + nbytes <= length:
            self.start = start
        works = []
        for i in range(1, len(self.tags)):
            lo, hi = i * SEGMENT_BYTES, min((i + 1) * SEGMENT_BYTES, length)
            if self.start >= 0 and self.start <= lo and hi <= self.start + nbytes:
                view = self.target.memory[lo - self.start : hi - self.start]
            else:
                block = exchange._block()
                self.blocks[i] = block
                view = block[: hi - lo]
            works.append(recv(view, self.src, self.tags[i]))
        return works

    def finish(
        self,
        exchange: Exchange,
        check: Callable[[StoredItem, Sequence[Buffer]], bool] | None = None,
    ) -> ChunkBuffer | None:
        """None once the target holds the item's storage bytes, its directory agrees and
        ``check`` passes; else the item's bytes, to check and decode the usual way."""
        length, start, nbytes = self.item.length, self.start, self.target.nbytes
        segments = {0: self.first, **self.blocks}
        try:
            if start >= 0:
                head, tail = bytearray(), bytearray()
                memory = self.target.memory
                for i, block in sorted(segments.items()):
                    lo, hi = i * SEGMENT_BYTES, min((i + 1) * SEGMENT_BYTES, length)
                    data = block[: hi - lo]
                    a, b = max(lo, start), min(hi, start + nbytes)
                    if a < b:
                        memory[a - start : b - start] = data[a - lo : b - lo]
                    if lo < start:
                        head += data[: min(hi, start) - lo]
                    if hi > start + nbytes:
                        tail += data[max(lo, start + nbytes) - lo :]
                if self.target.verify(bytes(head), bytes(tail)) and (
                    check is None or check(self.item, [head, memory, tail])
                ):
                    return None
                # Every byte is here, in the target or around it: decode from a copy.
                return ChunkBuffer([bytes(head), bytes(memory), bytes(tail)])
            parts = [
                bytes(block[: min(SEGMENT_BYTES, length - i * SEGMENT_BYTES)])
                for i, block in sorted(segments.items())
            ]
            return ChunkBuffer(parts)
        finally:
            exchange._pool.give([self.first, *self.blocks.values()])


def _segments(buffer: ChunkBuffer, length: int) -> list[torch.Tensor]:
    """The item's bytes as ``SEGMENT_BYTES`` tensors over its own memory when its chunks are
    those segments (the engine's 1 MiB blocks, or one buffer for a small item), else over one
    contiguous copy. Only sent: nothing writes to them."""
    chunks = buffer.chunks
    aligned = (
        sum(len(c) for c in chunks) == length
        and all(len(c) == SEGMENT_BYTES for c in chunks[:-1])
        and all(c.contiguous for c in chunks)
        and len(chunks) == max(1, -(-length // SEGMENT_BYTES))
    )
    if not aligned:
        whole = torch.frombuffer(bytearray(b"".join(chunks)), dtype=torch.uint8)
        return [whole[s : s + SEGMENT_BYTES] for s in range(0, length, SEGMENT_BYTES)]
    with warnings.catch_warnings():
        # The chunks are read-only views; torch warns that it cannot make them so. A send
        # only reads them.
        warnings.filterwarnings("ignore", message="The given buffer is not writable")
        return [torch.frombuffer(c, dtype=torch.uint8) for c in chunks]
