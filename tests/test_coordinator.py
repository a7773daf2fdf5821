"""The coordinator at job scale (issue 20): ``share_job``, the pure step of
``prepare_global_plan``, assigns and schedules exactly as the algorithm before it did (kept
here verbatim as the oracle), on random jobs and on 256-rank ones; at 1,024 ranks its
assignment keeps its properties (every needed item fetched once by a rank that needs it and
sent to the others, or sliced by its ranks; bytes balanced; rounds within their memory; no
rank's share holding another rank's items), and its work per item follows the item's ranks.

Plans are what torch's ``DefaultLoadPlanner`` makes (``create_read_items_for_chunk_list``
over each rank's local chunk of each tensor, the chunk ``DTensor`` would hold), metadata what
``FileSystemWriter`` writes; no network and no process group (the step is pure).
"""

from __future__ import annotations

import itertools
import math
import pickle
from collections import Counter
from collections.abc import Collection, Sequence
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch.distributed.checkpoint.filesystem import _StorageInfo
from torch.distributed.checkpoint.metadata import (
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    TensorProperties,
    TensorStorageMetadata,
)
from torch.distributed.checkpoint.planner import LoadPlan, ReadItem
from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list

import aiodcp
from aiodcp._sinks import item_memory
from aiodcp._stats import StatsRecorder
from aiodcp.dcp._load import DcpLoad
from aiodcp.dcp._sharing import RankShare, Readers, Round, StoredItem, plan_sharing
from aiodcp.dcp._storage_reader import SlotTable, share_job

ARCHIVE_BYTES = 1577  # a torch.save archive's bytes around a tensor's (measured)

Chunk = tuple[tuple[int, ...], tuple[int, ...]]  # offsets, sizes


# ----------------------------------------------------------------------------- jobs


def split(n: int, parts: int) -> list[tuple[int, int]]:
    """``(offset, size)`` of each part of ``n`` split as ``torch.chunk`` (and DTensor's Shard)
    does: ``ceil(n / parts)`` each, the last ones shorter or empty."""
    step = -(-n // parts)
    return [(min(i * step, n), max(0, min(step, n - i * step))) for i in range(parts)]


def grid(shape: tuple[int, ...], splits: Sequence[int], at: Sequence[int]) -> Chunk:
    """The chunk at index ``at`` of ``shape`` split ``splits[d]`` ways along each dim ``d``."""
    offsets, sizes = [], []
    for n, parts, i in zip(shape, splits, at, strict=True):
        offset, size = split(n, parts)[i]
        offsets.append(offset)
        sizes.append(size)
    return tuple(offsets), tuple(sizes)


def make_job(
    shapes: Sequence[tuple[int, ...]],
    saved: Sequence[Sequence[tuple[int, Chunk]]],
    loaded: Sequence[Sequence[Chunk | None]],
) -> tuple[Metadata, list[LoadPlan]]:
    """Metadata of ``shapes`` (float32) saved as ``saved[t]``: (writing rank, chunk) of each
    stored chunk of tensor ``t`` (empty chunks are not written); and the plan of each rank
    ``r`` loading chunk ``loaded[r][t]`` of each tensor (None: not that tensor)."""
    state: dict[str, Any] = {}
    files: dict[int, list[tuple[str, ChunkStorageMetadata, int]]] = {}
    for t, (shape, chunks) in enumerate(zip(shapes, saved, strict=True)):
        fqn = f"t{t}"
        stored = [
            (writer, ChunkStorageMetadata(torch.Size(offsets), torch.Size(sizes)))
            for writer, (offsets, sizes) in chunks
            if all(sizes)
        ]
        state[fqn] = TensorStorageMetadata(
            TensorProperties(dtype=torch.float32), torch.Size(shape), [c for _, c in stored]
        )
        for index, (writer, chunk) in enumerate(stored):
            files.setdefault(writer, []).append((fqn, chunk, index))
    storage: dict[MetadataIndex, _StorageInfo] = {}
    for writer, written in sorted(files.items()):
        offset = 0
        for fqn, chunk, index in written:
            length = math.prod(chunk.sizes) * 4 + ARCHIVE_BYTES
            storage[MetadataIndex(fqn, chunk.offsets, index)] = _StorageInfo(
                f"__{writer}_0.distcp", offset, length
            )
            offset += length
    plans = []
    reads: dict[tuple[int, Chunk], list[ReadItem]] = {}  # (replicas read alike)
    for chunks_of_rank in loaded:
        reqs: list[ReadItem] = []
        for t, chunk in enumerate(chunks_of_rank):
            if chunk is None or not all(chunk[1]):
                continue
            if (t, chunk) not in reads:
                local = ChunkStorageMetadata(torch.Size(chunk[0]), torch.Size(chunk[1]))
                reads[t, chunk] = create_read_items_for_chunk_list(f"t{t}", state[f"t{t}"], [local])
            reqs += reads[t, chunk]
        plans.append(LoadPlan(reqs))
    return Metadata(state_dict_metadata=state, storage_data=storage), plans


def mesh_job(
    shapes: Sequence[tuple[int, ...]],
    save: tuple[int, int],
    load: tuple[int, int, int],
) -> tuple[Metadata, list[LoadPlan]]:
    """``shapes`` (2-D) saved by ``save = (row parts, column parts)`` ranks, one block each,
    and loaded by ``load = (replicas, row parts, column parts)`` ranks, rank ``(rep * rows +
    i) * columns + j`` loading block ``(i, j)`` (HSDP: replicas x FSDP rows; TP x FSDP:
    columns too)."""
    rows, cols = save
    saved = [
        [(i * cols + j, grid(shape, save, (i, j))) for i in range(rows) for j in range(cols)]
        for shape in shapes
    ]
    reps, lrows, lcols = load
    loaded = [
        [grid(shape, (lrows, lcols), (i, j)) for shape in shapes]
        for _rep in range(reps)
        for i in range(lrows)
        for j in range(lcols)
    ]
    return make_job(shapes, saved, loaded)


class Planner:
    """A ``DcpLoad`` over a job's metadata, as ``prepare_global_plan`` makes one (no network:
    planning only), for the reader ``options``."""

    def __init__(self, metadata: Metadata, **options: Any) -> None:
        self.reader = aiodcp.S3StorageReader("s3://bucket/ckpt", region="us-east-1", **options)
        self.reader.set_up_storage_reader(metadata, True)
        self.load = self.reader._current().dcp_load(
            self.reader.storage_data, self.reader._tensor_metadata, recorder=StatsRecorder()
        )

    def __enter__(self) -> DcpLoad:
        return self.load

    def __exit__(self, *exc: object) -> None:
        self.reader.close()


# ----------------------------------------------------------------------------- the oracle


def old_plan_sharing(
    needs: Sequence[Collection[StoredItem]],
    *,
    round_bytes: int,
    sliced: Collection[StoredItem] = (),
) -> list[RankShare] | None:
    """``plan_sharing`` as it was before issue 20 (verbatim but for names)."""

    def fits(held: float, size: int, limit: int) -> bool:
        return held == 0 or held + size <= limit

    world = len(needs)
    holders: dict[StoredItem, list[int]] = {}
    for rank, items in enumerate(needs):
        for item in set(items):
            if item.length > 0:
                holders.setdefault(item, []).append(rank)
    for item in sliced:
        holders.pop(item, None)
    shared = {item: sorted(ranks) for item, ranks in holders.items() if len(ranks) > 1}
    if not shared and not sliced:
        return None
    load = [0] * world
    for item, ranks in holders.items():
        if len(ranks) == 1:
            load[ranks[0]] += item.length
    fetcher: dict[StoredItem, int] = {}
    for item in sorted(shared, key=lambda i: (-i.length, i)):
        chosen = min(shared[item], key=lambda r: (load[r], r))
        fetcher[item] = chosen
        load[chosen] += item.length

    sent: list[list[float]] = []
    got: list[list[float]] = []
    placed: list[list[tuple[StoredItem, int, tuple[int, ...]]]] = []
    next_round = [0] * world
    for item in sorted(shared):
        src = fetcher[item]
        dsts = tuple(r for r in shared[item] if r != src)
        size = item_memory(item.length)
        k = next_round[src]
        while True:
            if k == len(placed):
                sent.append([0] * world)
                got.append([0] * world)
                placed.append([])
            if fits(sent[k][src], size, round_bytes) and all(
                fits(got[k][d], size, round_bytes) for d in dsts
            ):
                break
            k += 1
        sent[k][src] += size
        for d in dsts:
            got[k][d] += size
        placed[k].append((item, src, dsts))
        next_round[src] = k

    shares = []
    for rank in range(world):
        rounds = [
            Round(
                sends=tuple((item, dsts) for item, src, dsts in entries if src == rank),
                receives=tuple((item, src) for item, src, dsts in entries if rank in dsts),
            )
            for entries in placed
        ]
        shares.append(
            RankShare(
                rank=rank,
                world=world,
                fetch=tuple(item for item in sorted(shared) if fetcher[item] == rank),
                shared=frozenset(item for item in shared if rank in shared[item]),
                rounds=tuple(rounds),
            )
        )
    return shares


def oracle_sliced_apart(
    load: DcpLoad, reqs_of: list[dict[StoredItem, list[ReadItem]]]
) -> dict[StoredItem, tuple[tuple[StoredItem, ...], frozenset[int]]]:
    """``DcpLoad.sliced_apart``'s rule, the plain way: every rank's candidate made, an item
    sliced when each of its ranks has one and moves fewer bytes with it (its runs, each once,
    and the probes) than the item's, and either no two ranks' runs overlap or every rank's
    runs are at most half the item. (Before, issue 20's version of this oracle: no two ranks'
    runs overlapping, always; replicas' items were shared whole.)"""
    from aiodcp._planner import ItemRange, resolve_max_gap_size

    if not load.config.fast_decode:
        return {}
    max_gap_size = resolve_max_gap_size(load.config.max_gap_size, load._request_latency_s)
    ranks_of: dict[StoredItem, list[tuple[int, list[ReadItem]]]] = {}
    for rank, items in enumerate(reqs_of):
        for item, reqs in items.items():
            ranks_of.setdefault(item, []).append((rank, reqs))
    apart: dict[StoredItem, tuple[tuple[StoredItem, ...], frozenset[int]]] = {}
    for item, per_rank in ranks_of.items():
        if len(per_rank) < 2:
            continue
        probes: tuple[ItemRange, ...] | None = None
        spans: list[tuple[int, int]] = []
        halves = True
        for _, reqs in per_rank:
            candidate = load._slice_candidate(ItemRange(item.start, item.end), reqs, max_gap_size)
            if candidate is None:
                break
            runs = {(b[0], b[1]) for blocks in candidate.blocks for b in blocks}
            spans.extend(runs)
            runs_bytes = sum(stop - first for first, stop in runs) * candidate.dtype.itemsize
            moved = runs_bytes + sum(p.length for p in candidate.probes)
            if moved >= item.length:
                break
            halves = halves and 2 * runs_bytes <= item.length
            if probes is None:
                probes = candidate.probes
        else:
            assert probes is not None
            spans.sort()
            if not halves and any(b[0] < a[1] for a, b in itertools.pairwise(spans)):
                continue
            shared = (
                ()
                if len(probes) != 2 or probes[0].end > probes[1].start
                else tuple(StoredItem(item.path, p.start, p.end) for p in probes)
            )
            apart[item] = (shared, frozenset(rank for rank, _ in per_rank))
    return apart


def old_merge_adjacent(
    items: dict[StoredItem, frozenset[int]],
) -> dict[StoredItem, frozenset[int]]:
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


def old_share_job(plans: Sequence[LoadPlan], load: DcpLoad) -> list[RankShare] | None:
    """``prepare_global_plan``'s coordinator step before issue 20, with the slicing rule of
    ``oracle_sliced_apart``."""
    reqs_of: list[dict[StoredItem, list[ReadItem]]] = []
    for plan in plans:
        items: dict[StoredItem, list[ReadItem]] = {}
        for req in plan.items:
            info = load.storage_data.get(req.storage_index)
            if info is None:
                return None
            item = StoredItem(info.relative_path, info.offset, info.offset + info.length)
            items.setdefault(item, []).append(req)
        reqs_of.append(items)
    apart = oracle_sliced_apart(load, reqs_of)
    needs = [set(items) for items in reqs_of]
    probed_by = {probe: ranks for probes, ranks in apart.values() for probe in probes}
    for span, ranks in old_merge_adjacent(probed_by).items():
        for r in ranks:
            needs[r].add(span)
    return old_plan_sharing(needs, round_bytes=load.round_bytes, sliced=apart.keys())


# ----------------------------------------------------------------------------- same as before


@st.composite
def raw_jobs(draw: st.DrawFn) -> tuple[list[set[StoredItem]], int, set[StoredItem]]:
    """Items of 3 files (some touching, some of length 0, some larger than a round), the
    ranks that need each, a round size and items to treat as sliced."""
    world = draw(st.integers(1, 7))
    items = set()
    for path in ("__0_0.distcp", "__1_0.distcp", "__2_0.distcp"):
        offset = 0
        for _ in range(draw(st.integers(0, 12))):
            offset += draw(st.sampled_from([0, 0, 7]))
            length = draw(st.sampled_from([0, 1, 300, 700, 1000, 1500, 2900, 600_000]))
            items.add(StoredItem(path, offset, offset + length))
            offset += length
    ordered = sorted(items)
    needs = [set() for _ in range(world)]
    for item in ordered:
        for rank in draw(st.sets(st.integers(0, world - 1), max_size=world)):
            needs[rank].add(item)
    sliced = {item for item in ordered if draw(st.integers(0, 9)) == 0}
    round_bytes = draw(st.sampled_from([1, 1000, 2000, 3000, 2**20, 2**30]))
    return needs, round_bytes, sliced


@settings(max_examples=400, deadline=None)
@given(raw_jobs())
def test_plan_sharing_assigns_and_schedules_as_before(
    job: tuple[list[set[StoredItem]], int, set[StoredItem]],
) -> None:
    needs, round_bytes, sliced = job
    new = plan_sharing(needs, round_bytes=round_bytes, sliced=sliced)
    old = old_plan_sharing(needs, round_bytes=round_bytes, sliced=sliced)
    assert new == old


@st.composite
def dtensor_jobs(draw: st.DrawFn) -> tuple[Metadata, list[LoadPlan], dict[str, Any]]:
    """2-D float32 tensors saved in blocks by 1-4 ranks and loaded by 2-8 ranks as replicas x
    rows x columns (so ranks need whole chunks, parts of them, the same parts, disjoint rows
    or strided columns), some ranks skipping some tensors; reader options that slice at
    every size (``max_gap_size`` 0) or less, and rounds of a few KiB to many MiB."""
    shapes = [
        (draw(st.integers(4, 80)), draw(st.integers(4, 80))) for _ in range(draw(st.integers(1, 4)))
    ]
    save = draw(st.sampled_from([(1, 1), (2, 1), (1, 2), (4, 1), (2, 2)]))
    load = draw(
        st.sampled_from(
            [(2, 1, 1), (1, 2, 1), (1, 4, 1), (2, 2, 1), (1, 2, 2), (2, 1, 2), (1, 8, 1), (1, 1, 4)]
        )
    )
    metadata, plans = mesh_job(shapes, save, load)
    for plan in plans:  # some ranks skip some tensors (a partial load)
        skip = draw(st.sets(st.sampled_from([f"t{t}" for t in range(len(shapes))]), max_size=1))
        plan.items[:] = [r for r in plan.items if r.storage_index.fqn not in skip]
    if draw(st.booleans()):  # a rank also loads another's chunks: 2 read items on an item
        taker, giver = draw(st.permutations(range(len(plans))))[:2]
        plans[taker].items.extend(plans[giver].items)
    options = {
        "max_gap_size": draw(st.sampled_from([0, 1024, 16384, float("inf")])),
        "memory_budget": draw(st.sampled_from([4096, 20000, 64 * 2**20])),
    }
    return metadata, plans, options


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(dtensor_jobs())
def test_the_coordinator_decides_as_the_oracle_on_random_jobs(
    job: tuple[Metadata, list[LoadPlan], dict[str, Any]],
) -> None:
    metadata, plans, options = job
    with Planner(metadata, **options) as load:
        assert share_job(plans, load) == old_share_job(plans, load)


def test_random_jobs_cover_what_the_coordinator_decides() -> None:
    """The random jobs above reach every outcome (else the equality proves little): nothing
    shared, items shared whole, items sliced apart with shared probes, items sliced by
    replicas (ranks whose runs are the same), several rounds."""
    seen: Counter[str] = Counter()
    shapes = [(64, 48), (40, 80)]
    for save, load, gap in [
        ((2, 1), (1, 2, 1), 0),  # each rank loads one stored chunk: nothing shared
        ((1, 1), (2, 1, 1), 0),  # replicas: shared whole
        ((1, 1), (1, 4, 1), 0),  # dim 0: sliced apart
        ((1, 1), (2, 2, 1), 0),  # replicas x dim 0: sliced, runs the same per replica
        ((2, 1), (1, 2, 2), float("inf")),  # no slicing: shared whole
    ]:
        metadata, plans = mesh_job(shapes, save, load)
        with Planner(metadata, max_gap_size=gap, memory_budget=8192) as planner:
            shares = share_job(plans, planner)
            assert shares == old_share_job(plans, planner)
            if shares is None:
                seen["none"] += 1
                continue
            if any(s.fetch for s in shares):
                seen["shared"] += 1
            if len(shares[0].rounds) > 1:
                seen["rounds"] += 1
            stored = {
                StoredItem(i.relative_path, i.offset, i.offset + i.length)
                for i in planner.storage_data.values()
            }
            if any(item not in stored for s in shares for item in s.shared):
                seen["probes"] += 1
            if load[0] > 1 and not any(s.shared & stored for s in shares):
                seen["replicas sliced"] += 1
    assert set(seen) == {"none", "shared", "rounds", "probes", "replicas sliced"}, seen


# ----------------------------------------------------------------------------- at scale


def check_assignment(plans: Sequence[LoadPlan], load: DcpLoad, shares: list[RankShare]) -> None:
    """The assignment's properties: every stored item two or more ranks need is either
    fetched by one of them and received once by each other one, or in no share (sliced
    apart: each rank fetches its own runs, and its head and tail probes are in the shares of
    its ranks); each rank's share holds only what it reads; per round a rank sends and
    receives at most ``round_bytes`` (or one item alone); a rank sends in (file, offset)
    order, round after round; balance: taken largest first, each item went to the rank of
    its ranks with the fewest bytes to fetch at the time (ties to the lowest)."""
    world, round_bytes = len(plans), load.round_bytes
    needs: list[set[StoredItem]] = []
    for plan in plans:
        mine = set()
        for req in plan.items:
            info = load.storage_data[req.storage_index]
            mine.add(StoredItem(info.relative_path, info.offset, info.offset + info.length))
        needs.append(mine)
    readers = Counter(item for mine in needs for item in mine)
    fetched_by: dict[StoredItem, int] = {}
    received: Counter[tuple[StoredItem, int]] = Counter()
    holders: dict[StoredItem, list[int]] = {}
    for rank, share in enumerate(shares):
        assert share.rank == rank and share.world == world
        assert len(share.rounds) == len(shares[0].rounds)
        for item in share.fetch:
            assert item not in fetched_by, f"{item} fetched twice"
            fetched_by[item] = rank
        assert set(share.fetch) <= share.shared
        for item in share.shared:
            holders.setdefault(item, []).append(rank)
            # What it reads: a stored item, or a probe within the items it reads.
            covered = sum(
                max(0, min(item.end, n.end) - max(item.start, n.start))
                for n in needs[rank]
                if n.path == item.path
            )
            assert covered == item.length, f"rank {rank} holds {item}, which it does not read"
        last = None
        for part in share.rounds:
            sent = sum(item_memory(item.length) for item, _ in part.sends)
            got = sum(item_memory(item.length) for item, _ in part.receives)
            assert sent <= round_bytes or len(part.sends) == 1
            assert got <= round_bytes or len(part.receives) == 1
            for item, dsts in part.sends:
                assert last is None or last < item  # (file, offset) order
                last = item
                assert rank not in dsts and item in share.shared
            for item, src in part.receives:
                assert src != rank and item in share.shared
                received[item, rank] += 1
    assert set(holders) == set(fetched_by)
    for item, rank in fetched_by.items():
        others = [r for r in holders[item] if r != rank]
        assert all(received[item, r] == 1 for r in others)
        sends = [d for part in shares[rank].rounds for i, d in part.sends if i == item]
        assert sends == [tuple(others)]
    assert sum(received.values()) == sum(len(h) - 1 for h in holders.values())
    for item, count in readers.items():
        if count > 1 and item not in fetched_by:  # sliced apart: each rank its own runs
            assert item not in holders
    load_of = [0] * world
    for item, count in readers.items():
        if count == 1 and item not in holders:
            load_of[next(r for r in range(world) if item in needs[r])] += item.length
    for item in sorted(fetched_by, key=lambda i: (-i.length, i)):
        least = min(holders[item], key=lambda r: (load_of[r], r))
        assert fetched_by[item] == least
        load_of[least] += item.length


def moved_per_rank(plans: Sequence[LoadPlan], load: DcpLoad, shares: list[RankShare]) -> list[int]:
    """Per rank, the bytes it moves in the job: what it fetches for its share and receives
    from its peers (whole items, probes), and its own items: the runs it slices of them
    (``_slice_candidate`` on its read items), or the whole item."""
    from aiodcp._planner import ItemRange, resolve_max_gap_size

    gap = resolve_max_gap_size(load.config.max_gap_size, load._request_latency_s)
    moved = []
    for plan, share in zip(plans, shares, strict=True):
        total = sum(i.length for i in share.fetch)
        total += sum(i.length for part in share.rounds for i, _ in part.receives)
        own: dict[StoredItem, list[ReadItem]] = {}
        for req in plan.items:
            info = load.storage_data[req.storage_index]
            item = StoredItem(info.relative_path, info.offset, info.offset + info.length)
            if item not in share.shared:
                own.setdefault(item, []).append(req)
        for item, reqs in own.items():
            candidate = load._slice_candidate(ItemRange(item.start, item.end), reqs, gap)
            if candidate is None:
                total += item.length
            else:
                runs = {(b[0], b[1]) for blocks in candidate.blocks for b in blocks}
                total += sum(stop - first for first, stop in runs) * candidate.dtype.itemsize
        moved.append(total)
    return moved


def layers(n: int, d: int) -> list[tuple[int, int]]:
    """A Llama-shaped model's 2-D tensors: per layer wq, wk, wv, wo, w1, w3, w2."""
    ffn = d * 7 // 2
    return [(d, d), (d // 8, d), (d // 8, d), (d, d), (ffn, d), (ffn, d), (d, ffn)] * n


def test_a_1024_rank_hsdp_job_shares_every_item_once_balanced() -> None:
    """FSDP 128-way x 8 replicas resuming from its own save: every stored chunk is fetched by
    one of its 8 replicas and sent to the 7 others."""
    metadata, plans = mesh_job(layers(2, 2048), (128, 1), (8, 128, 1))
    with Planner(metadata, memory_budget=2**20) as load:
        shares = share_job(plans, load)
        assert shares is not None
        check_assignment(plans, load, shares)
        assert len(shares[0].rounds) > 1
        assert all(len(s.fetch) > 0 for s in shares)
        assert sum(len(s.fetch) for s in shares) == len(load.storage_data)


def test_a_1024_rank_tp_fsdp_job_from_a_one_process_save() -> None:
    """TP 8 x FSDP 128 loading a 1-process save: every rank needs a block of every tensor;
    blocks of one row band overlap once merged into runs (TP ranks share rows), and each rank
    slices its row band all the same (before, such items were shared whole: every rank
    received the whole model)."""
    metadata, plans = mesh_job(layers(1, 1024), (1, 1), (1, 128, 8))
    with Planner(metadata) as load:
        shares = share_job(plans, load)
        assert shares is not None
        check_assignment(plans, load, shares)
        stored = {
            StoredItem(i.relative_path, i.offset, i.offset + i.length)
            for i in load.storage_data.values()
        }
        # wk and wv (512 KiB) are shared whole: slicing them leaves out less than a request
        # is worth at the default gap (~2 MB); every other item is sliced by every rank.
        small = 128 * 1024 * 4 + ARCHIVE_BYTES
        assert {i.length for s in shares for i in s.shared & stored} == {small}
        model = sum(i.length for i in stored)
        probes = 7 * 2 * ARCHIVE_BYTES
        assert max(moved_per_rank(plans, load, shares)) <= model / 128 * 1.01 + 2 * small + probes


def test_a_rank_share_does_not_grow_with_the_job() -> None:
    """What torch scatters to each rank: a rank's share holds its own items and rounds, so
    with the same items per rank, 16 times the ranks make its pickled share no larger."""
    sizes = {}
    for shards in (8, 128):
        metadata, plans = mesh_job(layers(2, 1024), (shards, 1), (8, shards, 1))
        with Planner(metadata, memory_budget=2**40) as load:
            shares = share_job(plans, load)
            assert shares is not None
            assert len(shares[0].rounds) == 1
            sizes[shards] = max(len(pickle.dumps(s)) for s in shares)
    assert sizes[128] <= sizes[8] * 1.1, sizes


def count_candidates(load: DcpLoad, monkeypatch: pytest.MonkeyPatch) -> Counter[tuple[int, int]]:
    """Per stored item (its byte range), how many ``_slice_candidate`` calls ``load`` makes
    (to the real one)."""
    calls: Counter[tuple[int, int]] = Counter()
    real = load._slice_candidate

    def counted(item_range: Any, reqs: list[ReadItem], gap: Any) -> Any:
        calls[item_range.start, item_range.end] += 1
        return real(item_range, reqs, gap)

    monkeypatch.setattr(load, "_slice_candidate", counted)
    return calls


def test_replicas_of_a_resharded_load_slice_their_parts_one_candidate_per_region(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A 1-process save loaded by 8 replicas x 64 shards on dim 0: every item's 512 ranks
    need a row band each, the 8 replicas the same one. Every rank slices its band (before:
    two ranks with the same runs meant the item was shared whole), each distinct region's
    candidate made once in the job: per item shape (wq and wo, wk and wv, w1 and w3 alike),
    64 regions, whatever the replicas (~15 us a candidate; the plain way makes 512 per item)."""
    metadata, plans = mesh_job(layers(1, 1024), (1, 1), (8, 64, 1))
    with Planner(metadata, max_gap_size=0) as load:
        calls = count_candidates(load, monkeypatch)
        shares = share_job(plans, load)
        assert shares is not None
        assert max(calls.values()) == 64
        assert sum(calls.values()) == 4 * 64  # 4 shapes among the 7 items
        stored = {
            StoredItem(i.relative_path, i.offset, i.offset + i.length)
            for i in load.storage_data.values()
        }
        assert not any(s.shared & stored for s in shares)
        check_assignment(plans, load, shares)
        calls.clear()
        assert shares == old_share_job(plans, load)
        assert set(calls.values()) == {512}  # the plain way: every rank's


def test_a_dim0_reshard_without_replicas_is_sliced_apart_by_every_rank(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The same save loaded by 512 ranks on dim 0: each rank's rows are its own, every item is
    sliced apart (its probes shared), each rank's candidate made once for the first item of
    each shape, none for the items of a shape already seen (wo, wv, w3)."""
    metadata, plans = mesh_job(layers(1, 1024), (1, 1), (1, 512, 1))
    with Planner(metadata, max_gap_size=0) as load:
        calls = count_candidates(load, monkeypatch)
        shares = share_job(plans, load)
        assert shares is not None
        span_of = {index: (i.offset, i.offset + i.length) for index, i in load.storage_data.items()}
        readers = Counter(
            span for plan in plans for span in {span_of[r.storage_index] for r in plan.items}
        )
        assert all(calls[span] in (readers[span], 0) for span in readers)
        # (128 ranks read the 128 rows of wk, 512 the rows of wq, w1 and w2)
        assert sum(calls.values()) == 3 * 512 + 128
        stored = {
            StoredItem(i.relative_path, i.offset, i.offset + i.length)
            for i in load.storage_data.values()
        }
        assert not any(s.shared & stored for s in shares)
        assert sum(len(s.fetch) for s in shares) > 0  # the probes
        check_assignment(plans, load, shares)


@pytest.mark.parametrize("load", [(8, 16, 1), (1, 16, 8), (2, 16, 4)], ids=["hsdp", "tp", "both"])
def test_a_rank_of_a_one_process_save_moves_its_part_not_the_model(
    load: tuple[int, int, int],
) -> None:
    """The rule: a 1-process save loaded by 128 ranks as 16 row bands (FSDP) x replicas (HSDP)
    or x column blocks (TP, whose runs merge into the band) or both: every rank can slice every
    item, so each fetches its band's runs; the most any rank moves (fetches, receives, slices)
    is about the model's 16th and the probes. Shared whole, as before the rule, each rank
    moved at least the whole model."""
    metadata, plans = mesh_job(layers(1, 1024), (1, 1), load)
    with Planner(metadata, max_gap_size=0) as planner:
        shares = share_job(plans, planner)
        assert shares is not None
        assert shares == old_share_job(plans, planner)
        check_assignment(plans, planner, shares)
        model = sum(i.length for i in planner.storage_data.values())
        probes = 7 * 2 * ARCHIVE_BYTES
        assert max(moved_per_rank(plans, planner, shares)) <= model / 16 * 1.01 + probes


def test_an_item_a_rank_reads_whole_is_shared_whole() -> None:
    """Rank 0 reads a stored tensor whole, ranks 1 and 2 a half each: rank 0 cannot slice it,
    so the item goes whole through one rank to the others (each moves the item: fetched or
    received). With rank 0 reading rank 1's half instead (a replica), every rank slices."""
    shape = (64, 48)
    saved = [[(0, ((0, 0), shape))]]
    halves: list[list[Chunk | None]] = [[((0, 0), (32, 48))], [((32, 0), (32, 48))]]
    for first, sliced in [(((0, 0), shape), False), (((0, 0), (32, 48)), True)]:
        metadata, plans = make_job([shape], saved, [[first], *halves])
        with Planner(metadata, max_gap_size=0) as load:
            shares = share_job(plans, load)
            assert shares is not None
            assert shares == old_share_job(plans, load)
            (info,) = load.storage_data.values()
            item = StoredItem(info.relative_path, info.offset, info.offset + info.length)
            assert [item in s.shared for s in shares] == [not sliced] * 3
            moved = moved_per_rank(plans, load, shares)
            if sliced:
                assert max(moved) <= item.length // 2 + 2 * ARCHIVE_BYTES  # its half, the probes
            else:
                assert min(moved) >= item.length


@pytest.mark.parametrize(
    ("save", "load"),
    [((32, 1), (8, 32, 1)), ((1, 1), (8, 32, 1)), ((32, 8), (1, 32, 8)), ((1, 1), (1, 32, 8))],
    ids=["hsdp", "1-to-hsdp", "tp_fsdp", "1-to-tp_fsdp"],
)
def test_256_rank_jobs_decide_as_the_oracle(
    save: tuple[int, int], load: tuple[int, int, int]
) -> None:
    metadata, plans = mesh_job(layers(2, 512), save, load)
    with Planner(metadata, memory_budget=4 * 2**20) as planner:
        shares = share_job(plans, planner)
        assert shares == old_share_job(plans, planner)
        if shares is not None:
            check_assignment(plans, planner, shares)


def test_a_plan_reading_an_unknown_item_shares_nothing() -> None:
    """Each rank's own load then raises the precise error, as before."""
    metadata, plans = mesh_job([(16, 16)], (1, 1), (2, 1, 1))
    with Planner(metadata) as load:
        assert share_job(plans, load) is not None
        bad = create_read_items_for_chunk_list(
            "t0",
            TensorStorageMetadata(
                TensorProperties(dtype=torch.float32),
                torch.Size([16, 16]),
                [ChunkStorageMetadata(torch.Size([8, 0]), torch.Size([8, 16]))],
            ),
            [ChunkStorageMetadata(torch.Size([8, 0]), torch.Size([8, 16]))],
        )
        plans[1].items.extend(bad)
        assert share_job(plans, load) is None
        assert old_share_job(plans, load) is None


def test_plans_reading_alike_are_looked_up_once_with_each_ones_slots() -> None:
    """``SlotTable``: replicas' plans (the same indexes in the same order; distinct objects,
    as gathered) are looked up index by index once, and every plan gets the slots of the
    stored items its read items read, as looking each one up in the metadata gives; a plan
    reading the same items in another order, or other items, is looked up itself."""
    metadata, plans = mesh_job([(64, 48), (40, 80)], (2, 1), (4, 2, 1))  # 4 x FSDP 2
    plans = [pickle.loads(pickle.dumps(plan)) for plan in plans]
    plans[5].items.reverse()  # a replica of row 1 reading in another order
    plans[6].items.extend(plans[6].items[:1])  # one reading an item twice
    table = SlotTable(metadata.storage_data)
    found = [table.slots(plan.items) for plan in plans]
    assert table.looked_up == 4  # rows 0 and 1, the reversed plan, the longer one
    for plan, slots_found in zip(plans, found, strict=True):
        assert slots_found is not None
        slots, distinct = slots_found
        each = []
        for req in plan.items:
            info = metadata.storage_data[req.storage_index]
            each.append(StoredItem(info.relative_path, info.offset, info.offset + info.length))
        assert [table.items[slot] for slot in slots] == each
        assert distinct == (len(set(each)) == len(each))
    assert found[0] is found[2] is found[4] and found[1] is found[3] is found[7]
    assert not found[6][1] and found[0][1]
    assert len(table.items) == len(set(table.items)) == len(metadata.storage_data)
    with Planner(metadata) as load:
        assert share_job(plans, load) == old_share_job(plans, load)


def test_the_collector_is_paused_for_the_step_and_restored() -> None:
    """The cyclic collector is off while the coordinator plans (each collection would walk
    every object the process holds) and back as it was after, also when the step raises."""
    import gc

    from aiodcp.dcp._storage_reader import _collector_paused

    assert gc.isenabled()
    with _collector_paused():
        assert not gc.isenabled()
    assert gc.isenabled()
    with pytest.raises(RuntimeError), _collector_paused():
        raise RuntimeError("planning failed")
    assert gc.isenabled()
    gc.disable()
    try:
        with _collector_paused():
            assert not gc.isenabled()
        assert not gc.isenabled()  # off before: left off
    finally:
        gc.enable()


def readers_of(plans: Sequence[LoadPlan], load: DcpLoad, aliased: bool) -> list[Any]:
    """Per stored item two or more ranks read: the item and its ``Readers`` (the plain way:
    every rank's read items on it), marked ``aliased`` or not."""
    per_item: dict[StoredItem, dict[int, list[ReadItem]]] = {}
    for rank, plan in enumerate(plans):
        for req in plan.items:
            info = load.storage_data[req.storage_index]
            item = StoredItem(info.relative_path, info.offset, info.offset + info.length)
            per_item.setdefault(item, {}).setdefault(rank, []).append(req)
    return [
        (
            item,
            Readers(
                ranks=list(by_rank),
                firsts=[reqs[0] for reqs in by_rank.values()],
                several={n: reqs for n, reqs in enumerate(by_rank.values()) if len(reqs) > 1},
                aliased=aliased,
            ),
        )
        for item, by_rank in per_item.items()
        if len(by_rank) > 1
    ]


@pytest.mark.parametrize(
    ("save", "load", "gap"),
    [
        ((1, 1), (2, 4, 1), 0),  # replicas x dim 0: one region per replica group
        ((1, 1), (1, 2, 4), 0),  # 2-D blocks: every rank's region its own
        ((2, 1), (2, 1, 2), 1024),  # replicas of strided columns
        ((1, 1), (1, 8, 1), float("inf")),  # no slicing
    ],
)
def test_readers_decided_once_per_region_decide_as_each_rank(
    save: tuple[int, int], load: tuple[int, int, int], gap: float
) -> None:
    """``sliced_apart`` decides an item from its distinct regions (a replica's looked at
    once, ``_sliced_by_each``) exactly as rank by rank (``_sliced_by_all``, the path of an
    item read under two indexes), also where a rank reads an item twice (``several``)."""
    metadata, plans = mesh_job([(64, 48), (40, 80)], save, load)
    plans[0].items.extend(plans[-1].items)  # rank 0 also loads the last rank's chunks
    with Planner(metadata, max_gap_size=gap) as planner:
        each = planner.sliced_apart(readers_of(plans, planner, aliased=False))
        by_rank = planner.sliced_apart(readers_of(plans, planner, aliased=True))
        assert each == by_rank
        assert any(r.several for _, r in readers_of(plans, planner, aliased=False))
        if gap == 0:
            assert each  # (something sliced: the equality is not of two empty dicts)
