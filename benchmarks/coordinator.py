"""The coordinator's step at job scale: ``S3StorageReader.prepare_global_plan`` on the load
plans of 64 to 1,024 ranks, with no network.

In a shared ``dcp.load`` the coordinator (rank 0) alone runs ``prepare_global_plan`` on every
rank's plan, between torch's gather of the local plans and its scatter of the final ones; every
other rank waits for it. This script builds the plans a real job's ranks would send, drives the
real method on them, and reports its wall time and peak memory, with torch's own coordinator
work on the same plans (unpickling the gathered plans, pickling the scattered ones) measured in
the same process as the peer.

Jobs (``--loads``), each at ``--ranks`` ranks (R) and about ``--items`` stored items:

- ``hsdp``: FSDP (R/8)-way x 8 replicas (mesh ``(replicate 8, shard R/8)``, placements
  ``[Replicate(), Shard(0)]``), resuming from a checkpoint the same job saved: every stored chunk
  is needed by its 8 replicas (all shared);
- ``tp_fsdp``: TP 8 x FSDP R/8 (mesh ``(dp R/8, tp 8)``; matrices ``[Shard(0), Shard(1)]``, a
  block per rank; norms ``[Shard(0), Replicate()]``), resuming from its own save: each matrix
  block is one rank's, each norm chunk its 8 TP ranks';
- ``one_to_hsdp`` / ``one_to_tp_fsdp``: a checkpoint saved by one process (one chunk per tensor,
  one file), loaded by those jobs: every rank needs part of every stored item. Here ``--items``
  is the number of tensors (``--one-items``), and the plans hold R x tensors read items.

The model is Llama-shaped (per layer wq, wk, wv, wo, w1, w3, w2 and two norms; an embedding and
an output layer of 16 d x d; bf16), with as many layers as the item count asks for and ``d``
(a multiple of 256) chosen so that each FSDP shard holds about ``--shard-gib`` GiB: at 1,024
ranks and 10^5 items, 87 layers of d = 7,680 (a 70B-class model). Stored chunks are laid out as
``FileSystemWriter`` writes them (``__{rank}_0.distcp``, one ``torch.save`` archive per chunk
back to back, 1,577 bytes of archive around the tensor bytes); replicated chunks are written by
one replica, rotating (as torch's save-plan dedup spreads them).

Each rank's plan is what ``DefaultLoadPlanner`` makes: torch's
``create_read_items_for_chunk_list`` over the rank's local chunk of each tensor, which
``DTensor`` computes with ``_compute_local_shape_and_global_offset`` (the same function here);
then the reader's ``prepare_local_plan`` (sorting; its time is one rank's own step, in
parallel on every rank). The plans are pickled and unpickled, as ``gather_object`` carries them
to the coordinator, so it holds distinct objects as in a job. A fake process group of R ranks
(torch's testing ``FakeStore``) stands for the load's group; nothing is sent anywhere.

Measured per cell, in a fresh process (``--aiodcp-src``: this checkout or a git revision, so
``--baseline REV`` gives the before and after of one command, interleaved per repeat):

- ``coord s``: wall time of ``prepare_global_plan(plans)``, garbage collector on (``gc s``: the
  part of it the collector ran, as torch's own objects make it run in a job too);
- ``peak MiB``: tracemalloc's peak above the start during a second call (the result included);
- ``torch s``: torch's coordinator work on the same job: unpickling the gathered local plans
  plus pickling the plain final plans for the scatter; ``x torch`` is the ratio;
- the final plans: pickled bytes per rank (``plan KiB``, max over ranks; ``x local``: the
  largest over ranks of final / local plan size, what ``RankShare`` adds to what each rank
  receives), rounds, items each rank fetches for the job and receives;
- ``own / moved GiB``: the most a rank fetches for its own items (those not shared: the runs
  of the items it slices, else whole items; untimed, after the step, ``own_fetch``) and the
  most it moves in all (own, plus its share's fetches and what it receives);
- ``same``: whether the assignment (every rank's fetches, shared items and rounds, in a
  canonical form) equals the baseline's, when ``--baseline`` is given.

Run (from the checkout; any venv with torch 2.13, e.g. benchmarks/.venv-bench)::

    python benchmarks/coordinator.py                       # the full grid, this checkout
    python benchmarks/coordinator.py --baseline f556aab    # before / after, interleaved
    python benchmarks/coordinator.py --loads hsdp --ranks 1024 --items 100000 --repeats 3

``--step-only N`` times the step alone: per cell (a fresh process), the plans built and passed
through pickle once, then ``N`` calls of ``prepare_global_plan`` on them, each one's wall and
CPU time (the step's collector pause included, no tracemalloc, no torch or scatter figures),
the first call's assignment digest (``same`` against ``--baseline``); ``--profile DIR`` adds
one more call under cProfile, its stats saved as ``DIR/<variant>-<load>-<ranks>-<items>.prof``
and its top functions printed (not counted in the timings)::

    python benchmarks/coordinator.py --loads hsdp --ranks 1024 --items 100000 \
        --step-only 3 --profile /tmp/prof --baseline 2840a46
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import hashlib
import json
import math
import os
import pickle
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import tracemalloc
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent

LOADS = ("hsdp", "tp_fsdp", "one_to_hsdp", "one_to_tp_fsdp")
ARCHIVE_BYTES = 1577
"""Bytes of a ``torch.save`` archive around the tensor bytes (measured for bf16 tensors)."""
REPLICAS = TP = 8
GIB = 1024**3

# ----------------------------------------------------------------------------- the job


@dataclasses.dataclass(frozen=True)
class Tensor:
    fqn: str
    shape: tuple[int, ...]
    kind: str  # "matrix" (2-D) or "norm" (1-D)


def model(layers: int, d: int) -> list[Tensor]:
    """A Llama-shaped state dict of ``layers`` layers, d_model ``d`` (see the docstring)."""
    ffn, kv, vocab = d * 7 // 2, d // 8, 16 * d
    tensors = [Tensor("tok_embeddings.weight", (vocab, d), "matrix")]
    for i in range(layers):
        p = f"layers.{i}."
        tensors += [
            Tensor(p + "attention.wq.weight", (d, d), "matrix"),
            Tensor(p + "attention.wk.weight", (kv, d), "matrix"),
            Tensor(p + "attention.wv.weight", (kv, d), "matrix"),
            Tensor(p + "attention.wo.weight", (d, d), "matrix"),
            Tensor(p + "feed_forward.w1.weight", (ffn, d), "matrix"),
            Tensor(p + "feed_forward.w3.weight", (ffn, d), "matrix"),
            Tensor(p + "feed_forward.w2.weight", (d, ffn), "matrix"),
            Tensor(p + "attention_norm.weight", (d,), "norm"),
            Tensor(p + "ffn_norm.weight", (d,), "norm"),
        ]
    tensors += [Tensor("norm.weight", (d,), "norm"), Tensor("output.weight", (vocab, d), "matrix")]
    return tensors


def shape_of(load: str, ranks: int, items: int, shard_gib: float) -> tuple[int, int]:
    """Layers and d_model for about ``items`` stored items and ``shard_gib`` GiB per shard."""
    shards = ranks // REPLICAS  # the FSDP degree of both meshes
    if load == "hsdp":
        per_layer, fixed = 9 * shards, 3 * shards
    elif load == "tp_fsdp":
        per_layer, fixed = 7 * shards * TP + 2 * shards, 2 * shards * TP + shards
    else:
        per_layer, fixed = 9, 3
    layers = max(1, round((items - fixed) / per_layer))
    # bytes ~ 2 (bf16) * d^2 * (layers * 12.75 + 32): 2.25 d^2 attention, 10.5 d^2 MLP, 32 d^2
    # embedding and output
    d = math.sqrt(shards * shard_gib * GIB / (2 * (layers * 12.75 + 32)))
    return layers, max(256, int(d) // 256 * 256)


def meshes(load: str, ranks: int) -> tuple[tuple[int, int], Any]:
    """The loading job's mesh shape and a function (tensor, rank) -> (coordinate, placements)."""
    from torch.distributed.tensor import Replicate, Shard

    shards = ranks // REPLICAS
    if load.endswith("hsdp"):

        def hsdp(t: Tensor, rank: int) -> tuple[list[int], list[Any]]:
            return [rank // shards, rank % shards], [Replicate(), Shard(0)]

        return (REPLICAS, shards), hsdp

    def tp_fsdp(t: Tensor, rank: int) -> tuple[list[int], list[Any]]:
        placements = [Shard(0), Shard(1) if t.kind == "matrix" else Replicate()]
        return [rank // TP, rank % TP], placements

    return (shards, TP), tp_fsdp


def build(load: str, ranks: int, items: int, shard_gib: float) -> dict[str, Any]:
    """The checkpoint's ``Metadata`` and every rank's local ``LoadPlan`` (torch's planner)."""
    import torch
    from torch.distributed.checkpoint.filesystem import _StorageInfo
    from torch.distributed.checkpoint.metadata import (
        ChunkStorageMetadata,
        Metadata,
        MetadataIndex,
        TensorProperties,
        TensorStorageMetadata,
    )
    from torch.distributed.checkpoint.planner import LoadPlan
    from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list
    from torch.distributed.tensor._utils import _compute_local_shape_and_global_offset

    layers, d = shape_of(load, ranks, items, shard_gib)
    tensors = model(layers, d)
    mesh_shape, layout = meshes(load, ranks)
    chunk_of: dict[tuple[Any, ...], Any] = {}

    def local_chunk(t: Tensor, shape: tuple[int, int], coord: list[int], placements: Any) -> Any:
        key = (t.shape, shape, tuple(coord), tuple(map(str, placements)))
        if key not in chunk_of:
            sizes, offsets = _compute_local_shape_and_global_offset(
                t.shape, shape, coord, placements
            )
            chunk_of[key] = ChunkStorageMetadata(
                offsets=torch.Size(offsets), sizes=torch.Size(sizes)
            )
        return chunk_of[key]

    # The save: which chunks are stored, by which saving rank (file), in write order.
    state_md: dict[str, Any] = {}
    files: dict[int, list[tuple[str, Any, int]]] = {}
    for n, t in enumerate(tensors):
        if load.startswith("one_to_"):
            saved = [(0, ChunkStorageMetadata(torch.Size([0] * len(t.shape)), torch.Size(t.shape)))]
        else:
            saved, seen = [], set()
            for rank in range(ranks):
                coord, placements = layout(t, rank)
                chunk = local_chunk(t, mesh_shape, coord, placements)
                if tuple(chunk.offsets) in seen:
                    continue
                seen.add(tuple(chunk.offsets))
                if load == "hsdp":  # replica (n + shard) % 8 writes it
                    writer = ((n + coord[1]) % REPLICAS) * mesh_shape[1] + coord[1]
                elif t.kind == "norm":  # one of its TP ranks writes it
                    writer = coord[0] * TP + n % TP
                else:
                    writer = rank
                saved.append((writer, chunk))
        state_md[t.fqn] = TensorStorageMetadata(
            properties=TensorProperties(dtype=torch.bfloat16),
            size=torch.Size(t.shape),
            chunks=[chunk for _, chunk in saved],
        )
        for index, (writer, chunk) in enumerate(saved):
            files.setdefault(writer, []).append((t.fqn, chunk, index))
    storage_data = {}
    for writer, written in files.items():
        offset = 0
        for fqn, chunk, index in written:
            length = math.prod(chunk.sizes) * 2 + ARCHIVE_BYTES
            storage_data[MetadataIndex(fqn, chunk.offsets, index)] = _StorageInfo(
                f"__{writer}_0.distcp", offset, length
            )
            offset += length
    metadata = Metadata(state_dict_metadata=state_md, storage_data=storage_data)

    # The load: each rank's local plan, as create_default_local_load_plan makes it.
    reads: dict[tuple[str, Any], list[Any]] = {}
    plans = []
    for rank in range(ranks):
        requests = []
        for t in tensors:
            coord, placements = layout(t, rank)
            chunk = local_chunk(t, mesh_shape, coord, placements)
            key = (t.fqn, tuple(chunk.offsets))
            if key not in reads:  # replicas read alike; the pickling below copies them apart
                reads[key] = create_read_items_for_chunk_list(t.fqn, state_md[t.fqn], [chunk])
            requests += reads[key]
        plans.append(LoadPlan(requests))
    return {
        "metadata": metadata,
        "plans": plans,
        "layers": layers,
        "d": d,
        "tensors": len(tensors),
        "stored_items": len(storage_data),
        "model_gib": sum(math.prod(t.shape) for t in tensors) * 2 / GIB,
    }


# ----------------------------------------------------------------------------- one cell


class GcTimer:
    """Seconds the cyclic garbage collector ran while installed."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self._start = 0.0

    def __call__(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._start = time.perf_counter()
        else:
            self.seconds += time.perf_counter() - self._start

    def __enter__(self) -> GcTimer:
        gc.callbacks.append(self)
        return self

    def __exit__(self, *exc: object) -> None:
        gc.callbacks.remove(self)


def canonical(share: Any) -> Any:
    """A rank's ``RankShare`` (or None) as plain, ordered data, to compare revisions."""
    if share is None or isinstance(share, str):
        return None

    def item(i: Any) -> tuple[str, int, int]:
        return (i.path, i.start, i.end)

    rounds = [
        (
            [(item(i), tuple(d)) for i, d in r.sends],
            [(item(i), s) for i, s in r.receives],
        )
        for r in share.rounds
    ]
    while rounds and rounds[-1] == ([], []):
        rounds.pop()  # trailing empty rounds, where a revision keeps them
    return (
        share.rank,
        share.world,
        [item(i) for i in share.fetch],
        sorted(item(i) for i in share.shared),
        len(share.rounds),
        [(k, r) for k, r in enumerate(rounds) if r != ([], [])],
    )


def gathered_plans(load: str, ranks: int, items: int, shard_gib: float) -> dict[str, Any]:
    """The job (``build``), its reader set up on a fake group of ``ranks`` as under
    ``dcp.load``, and the local plans as the coordinator holds them after ``gather_object``
    (each rank's ``prepare_local_plan``, pickled; ``payloads``: those bytes)."""
    import torch
    import torch.distributed as dist
    from torch.testing._internal.distributed.fake_pg import FakeStore

    import aiodcp
    import aiodcp.dcp._load  # (the S3 stack: a job imported it to GET .metadata first)

    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    job = build(load, ranks, items, shard_gib)
    job["built_s"] = time.perf_counter() - t0

    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=ranks)
    # No store here: with checks on, the step HEADs the data files the job reads whole
    # (``check_whole``, a checkpoint without a record), which would go to AWS's endpoint, off
    # this machine. That is one concurrent round trip on a real store, not CPU: left out.
    reader = aiodcp.S3StorageReader("s3://bench/ckpt", region="us-east-1", verify_checksums=False)
    reader.set_up_storage_reader(job["metadata"], True, rank=0, use_collectives=True)
    reader._share_group = dist.group.WORLD  # what read_metadata finds under dcp.load

    # Every rank's own step (in parallel in a job), then gather_object's pickling.
    local_s, payloads = [], []
    for plan in job["plans"]:
        start = time.perf_counter()
        local = reader.prepare_local_plan(plan)
        local_s.append(time.perf_counter() - start)
        payloads.append(pickle.dumps(local))
    del job["plans"]
    job.update(reader=reader, local_s=local_s, payloads=payloads)
    return job


def assignment_digest(final: list[Any]) -> str:
    """A digest of every rank's assignment (``canonical``), to compare revisions."""
    shares = [p.storage_data for p in final]
    return hashlib.sha256(pickle.dumps([canonical(s) for s in shares], protocol=4)).hexdigest()


def run_step_only(
    load: str, ranks: int, items: int, shard_gib: float, calls: int, profile: str | None
) -> dict[str, Any]:
    """``--step-only``: ``calls`` timed calls of ``prepare_global_plan`` on one job's gathered
    plans (built once), and optionally one more under cProfile (see the module docstring)."""
    job = gathered_plans(load, ranks, items, shard_gib)
    reader, payloads = job["reader"], job["payloads"]
    plans = [pickle.loads(p) for p in payloads]
    del job["payloads"], payloads
    gc.collect()
    walls, cpus, gcs, digest = [], [], [], ""
    for n in range(calls):
        with GcTimer() as gc_timer:
            start, cpu = time.perf_counter(), time.process_time()
            final = reader.prepare_global_plan(plans)
            walls.append(time.perf_counter() - start)
            cpus.append(time.process_time() - cpu)
        gcs.append(gc_timer.seconds)
        if n == 0:
            digest = assignment_digest(final)
        del final
        gc.collect()
    result = {
        "load": load,
        "ranks": ranks,
        "items_asked": items,
        "stored_items": job["stored_items"],
        "read_items": sum(len(p.items) for p in plans),
        "step_wall_s": walls,
        "step_cpu_s": cpus,
        "step_gc_s": gcs,
        "digest": digest,
    }
    if profile:
        import cProfile
        import io
        import pstats

        profiler = cProfile.Profile()
        profiler.enable()
        reader.prepare_global_plan(plans)
        profiler.disable()
        Path(profile).parent.mkdir(parents=True, exist_ok=True)
        profiler.dump_stats(profile)
        text = io.StringIO()
        pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(25)
        result["profile"] = profile
        result["profile_top"] = text.getvalue()
    return result


def run_cell(load: str, ranks: int, items: int, shard_gib: float) -> dict[str, Any]:
    job = gathered_plans(load, ranks, items, shard_gib)
    reader, local_s, payloads = job["reader"], job["local_s"], job["payloads"]
    built_s = job["built_s"]
    gc.collect()

    # The coordinator: torch unpickles what it gathered, then the reader plans the job.
    start, cpu = time.perf_counter(), time.process_time()
    plans = [pickle.loads(p) for p in payloads]
    unpickle_s, unpickle_cpu_s = time.perf_counter() - start, time.process_time() - cpu
    read_items = sum(len(p.items) for p in plans)
    gc.collect()
    with GcTimer() as gc_timer:
        start, cpu = time.perf_counter(), time.process_time()
        final = reader.prepare_global_plan(plans)
        coord_s, coord_cpu_s = time.perf_counter() - start, time.process_time() - cpu

    # torch's scatter pickles each rank's final plan (the plain plans: torch's own share).
    gc.collect()
    start, cpu = time.perf_counter(), time.process_time()
    plain = [pickle.dumps(dataclasses.replace(p, storage_data=None)) for p in final]
    scatter_plain_s, scatter_cpu_s = time.perf_counter() - start, time.process_time() - cpu
    gc.collect()
    start = time.perf_counter()
    sent = [pickle.dumps(p) for p in final]
    scatter_s = time.perf_counter() - start
    biggest = max(sent, key=len)
    start = time.perf_counter()
    pickle.loads(biggest)
    rank_unpickle_s = time.perf_counter() - start

    shares = [p.storage_data for p in final]
    digest = assignment_digest(final)
    summary = summarize(shares, [len(s) for s in sent], [len(s) for s in plain])
    summary.update(own_fetch(reader, plans, shares))
    del final, sent, plain, biggest
    gc.collect()

    # Peak memory of a second, identical call.
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    tracemalloc.reset_peak()
    again = reader.prepare_global_plan(plans)
    current, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    del again

    return {
        "load": load,
        "ranks": ranks,
        "items_asked": items,
        "stored_items": job["stored_items"],
        "tensors": job["tensors"],
        "layers": job["layers"],
        "d": job["d"],
        "model_gib": round(job["model_gib"], 1),
        "read_items": read_items,
        "build_s": built_s,
        "local_step_s_max": max(local_s),
        "local_plan_bytes_max": max(len(p) for p in payloads),
        "gather_bytes": sum(len(p) for p in payloads),
        "gather_unpickle_s": unpickle_s,
        "coord_s": coord_s,
        "coord_cpu_s": coord_cpu_s,
        "coord_gc_s": gc_timer.seconds,
        "coord_peak_mib": (peak - before) / 2**20,
        "coord_kept_mib": (current - before) / 2**20,
        "scatter_pickle_s": scatter_s,
        "scatter_plain_pickle_s": scatter_plain_s,
        "torch_s": unpickle_s + scatter_plain_s,
        "torch_cpu_s": unpickle_cpu_s + scatter_cpu_s,
        "rank_unpickle_s": rank_unpickle_s,
        "digest": digest,
        **summary,
    }


def summarize(shares: list[Any], sizes: list[int], plain: list[int]) -> dict[str, Any]:
    """What the assignment gives each rank: rounds, items fetched and received, plan sizes
    (``sizes``: pickled final plans; ``plain``: the same without the reader's share)."""
    out: dict[str, Any] = {
        "plan_bytes_max": max(sizes),
        "plan_bytes_total": sum(sizes),
        "plan_over_plain_max": max(s / max(p, 1) for s, p in zip(sizes, plain, strict=True)),
    }
    from aiodcp.dcp._sharing import RankShare

    real = [s for s in shares if isinstance(s, RankShare)]
    if not real:
        return {**out, "shared": False, "rounds": 0}
    received = [sum(i.length for r in s.rounds for i, _ in r.receives) for s in real]
    fetched = [sum(i.length for i in s.fetch) for s in real]
    return {
        **out,
        "shared": True,
        "rounds": len(real[0].rounds),
        "shared_items": len({i for s in real for i in s.shared}),
        "fetch_gib_max": max(fetched) / GIB,
        "receive_gib_max": max(received) / GIB,
    }


def own_fetch(reader: Any, plans: list[Any], shares: list[Any]) -> dict[str, Any]:
    """Per rank (untimed, after the step): the bytes it fetches for its own items, those not in
    its share (all of them when nothing is shared), as its ``read`` decides: the runs of an
    item ``_slice_candidate`` slices on its read items, else the whole item (probes, unusual
    archives and checksum windows aside); and the most a rank moves in all: that, plus what
    it fetches for its share and receives. Candidates are made once per item length, stored
    tensor and region (the layers repeat)."""
    from aiodcp._planner import ItemRange, resolve_max_gap_size
    from aiodcp._stats import StatsRecorder
    from aiodcp.dcp._sharing import RankShare, StoredItem

    session = reader._current()
    load = session.read_phase(reader._stored_format(session), recorder=StatsRecorder())
    gap = resolve_max_gap_size(load.config.max_gap_size, load._request_latency_s)
    stored_of: dict[tuple[str, int], Any] = {}
    memo: dict[tuple[Any, ...], int] = {}
    own, moved = [], []
    for plan, share in zip(plans, shares, strict=True):
        real = isinstance(share, RankShare)
        shared = share.shared if real else frozenset()
        by_item: dict[StoredItem, list[Any]] = {}
        for req in plan.items:
            info = load.storage_data[req.storage_index]
            item = StoredItem(info.relative_path, info.offset, info.offset + info.length)
            if item not in shared:
                by_item.setdefault(item, []).append(req)
        total = 0
        for item, reqs in by_item.items():
            where = (item.path, item.start)
            if where not in stored_of:
                stored_of[where] = load.format.stored_tensor(reqs[0])
            key = (
                item.length,
                stored_of[where],
                tuple((r.type, tuple(r.storage_offsets), tuple(r.lengths)) for r in reqs),
            )
            if key not in memo:
                candidate = load._slice_candidate(ItemRange(item.start, item.end), reqs, gap)
                if candidate is None:
                    memo[key] = item.length
                else:
                    runs = {(b[0], b[1]) for blocks in candidate.blocks for b in blocks}
                    memo[key] = sum(b - a for a, b in runs) * candidate.dtype.itemsize
            total += memo[key]
        own.append(total)
        if real:
            total += sum(i.length for i in share.fetch)
            total += sum(i.length for r in share.rounds for i, _ in r.receives)
        moved.append(total)
    return {"own_gib_max": max(own) / GIB, "moved_gib_max": max(moved) / GIB}


# ----------------------------------------------------------------------------- orchestration


def source(rev: str) -> tuple[Path, str]:
    """Where a cell imports aiodcp from: this checkout's src/, or a git archive of ``rev``."""
    head = subprocess.run(
        ["git", "-C", str(REPO), "rev-parse", "--short=12", "HEAD"], capture_output=True, text=True
    ).stdout.strip()
    if rev == "worktree":
        dirty = subprocess.run(
            ["git", "-C", str(REPO), "status", "--porcelain", "--", "src"],
            capture_output=True,
            text=True,
        ).stdout.strip()
        return REPO / "src", f"{head}{' + uncommitted src changes' if dirty else ''}"
    commit = subprocess.run(
        ["git", "-C", str(REPO), "rev-parse", rev], capture_output=True, text=True, check=True
    ).stdout.strip()
    target = Path(tempfile.gettempdir()) / "aiodcp-coordinator-src" / commit
    if not (target / "src" / "aiodcp").exists():
        target.mkdir(parents=True, exist_ok=True)
        archive = subprocess.run(
            ["git", "-C", str(REPO), "archive", commit, "src"], capture_output=True, check=True
        ).stdout
        subprocess.run(["tar", "-x", "-C", str(target)], input=archive, check=True)
    return target / "src", f"{commit[:12]} (git archive of {rev})"


def cells(args: argparse.Namespace) -> Iterator[tuple[str, int, int]]:
    for load in args.loads.split(","):
        counts = args.one_items if load.startswith("one_to_") else args.items
        for ranks in (int(r) for r in args.ranks.split(",")):
            for items in (int(float(i)) for i in counts.split(",")):
                yield load, ranks, items


def spawn(
    src: Path, cell: tuple[str, int, int], args: argparse.Namespace, variant: str = ""
) -> dict[str, Any]:
    load, ranks, items = cell
    env = {**os.environ, "PYTHONPATH": str(src), "PYTHONHASHSEED": "0"}
    cmd = [sys.executable, __file__, "--cell", f"{load},{ranks},{items}"]
    cmd += ["--shard-gib", str(args.shard_gib)]
    if args.step_only:
        cmd += ["--step-only", str(args.step_only)]
        if args.profile:
            cmd += ["--profile", str(Path(args.profile) / f"{variant}-{load}-{ranks}-{items}.prof")]
    proc = subprocess.run(
        cmd, env=env, capture_output=True, text=True, timeout=args.timeout, check=False
    )
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("CELL ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"cell {cell} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1].removeprefix("CELL "))  # type: ignore[no-any-return]


def loadavg() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def job_cells(r: dict[str, Any]) -> list[str]:
    """A row's first cells, the job's: load, ranks, stored and read items, variant."""
    return [
        r["load"],
        str(r["ranks"]),
        f"{r['stored_items']:,}",
        f"{r['read_items']:,}",
        r["variant"],
    ]


def table(rows: list[dict[str, Any]], baseline: bool) -> str:
    head = [
        "load",
        "ranks",
        "stored items",
        "read items",
        "variant",
        "coord s",
        "CPU s",
        "gc s",
        "peak MiB",
        "torch s",
        "x torch",
        "plan KiB (max rank)",
        "x local",
        "rounds",
        "fetch / receive GiB (max rank)",
        "own / moved GiB (max rank)",
        "load avg",
    ]
    if baseline:
        head.insert(6, "x base")
        head.append("same")
    out = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for r in rows:
        cells_ = [
            *job_cells(r),
            f"{r['coord_s']:.2f}",
            f"{r['coord_cpu_s']:.2f}",
            f"{r['coord_gc_s']:.2f}",
            f"{r['coord_peak_mib']:.0f}",
            f"{r['torch_s']:.2f}",
            f"{r['coord_s'] / r['torch_s']:.2f}",
            f"{r['plan_bytes_max'] / 1024:.0f}",
            f"{r['plan_over_plain_max']:.2f}",
            str(r["rounds"]),
            (
                f"{r['fetch_gib_max']:.2f} / {r['receive_gib_max']:.2f}"
                if r.get("shared")
                else "not shared"
            ),
            (f"{r['own_gib_max']:.2f} / {r['moved_gib_max']:.2f}" if "own_gib_max" in r else ""),
            r["loadavg"],
        ]
        if baseline:
            cells_.insert(6, f"{r['x_base']:.3f}" if "x_base" in r else "")
            cells_.append(r.get("same", ""))
        out.append("| " + " | ".join(cells_) + " |")
    return "\n".join(out)


def step_table(rows: list[dict[str, Any]], baseline: bool) -> str:
    """``--step-only``'s table: per cell and variant, each call's CPU and wall seconds."""
    head = ["load", "ranks", "stored items", "read items", "variant", "CPU s (each call)"]
    head += ["min CPU s", "wall s (each call)", "gc s (max)", "load avg"]
    if baseline:
        head.append("same")
    out = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for r in rows:
        cpus = [c for rep in r["repeats"] for c in rep["step_cpu_s"]]
        walls = [w for rep in r["repeats"] for w in rep["step_wall_s"]]
        gcs = [g for rep in r["repeats"] for g in rep["step_gc_s"]]
        cells_ = [
            *job_cells(r),
            " / ".join(f"{c:.2f}" for c in cpus),
            f"{min(cpus):.2f}",
            " / ".join(f"{w:.2f}" for w in walls),
            f"{max(gcs):.2f}",
            " ; ".join(rep["loadavg"] for rep in r["repeats"]),
        ]
        if baseline:
            cells_.append(r.get("same", ""))
        out.append("| " + " | ".join(cells_) + " |")
    return "\n".join(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--loads", default=",".join(LOADS))
    p.add_argument("--ranks", default="64,256,1024")
    p.add_argument("--items", default="10000,30000,100000", help="stored items (hsdp, tp_fsdp)")
    p.add_argument("--one-items", default="300,1000", help="tensors of the 1-process saves")
    p.add_argument("--shard-gib", type=float, default=1.0, help="GiB per FSDP shard")
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--aiodcp-src", default="worktree", help="'worktree' or a git revision")
    p.add_argument("--baseline", default=None, help="a git revision to compare against")
    p.add_argument("--timeout", type=float, default=1800.0, help="per cell, seconds")
    p.add_argument("--out", default=str(HERE / "results" / "coordinator.json"))
    p.add_argument(
        "--step-only",
        type=int,
        default=0,
        metavar="N",
        help="time N calls of prepare_global_plan alone per cell (plans built once)",
    )
    p.add_argument(
        "--profile", default=None, metavar="DIR", help="with --step-only: one more call profiled"
    )
    p.add_argument("--cell", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.profile and not args.step_only:
        p.error("--profile profiles the step alone: give --step-only N too")
    if args.cell:
        load, ranks, items = args.cell.split(",")
        if args.step_only:
            result = run_step_only(
                load, int(ranks), int(items), args.shard_gib, args.step_only, args.profile
            )
        else:
            result = run_cell(load, int(ranks), int(items), args.shard_gib)
        print("CELL " + json.dumps(result), flush=True)
        return

    sys.path.insert(0, str(HERE))
    import provenance  # (the orchestrator only: a cell imports nothing of benchmarks/)

    variants = {"aiodcp": source(args.aiodcp_src)}
    if args.baseline:
        variants["base"] = source(args.baseline)
    prov = {**provenance.collect(), "aiodcp": variants["aiodcp"][1]}
    if args.baseline:
        prov["aiodcp_baseline"] = variants["base"][1]
    print(provenance.line(prov), flush=True)
    print(
        f"{platform.node()}: {os.cpu_count()} cores, {platform.python_version()}, "
        + ", ".join(f"{name} = {desc}" for name, (_, desc) in variants.items()),
        flush=True,
    )
    rows: list[dict[str, Any]] = []
    for cell in cells(args):
        runs: dict[str, list[dict[str, Any]]] = {name: [] for name in variants}
        for repeat in range(args.repeats):
            order = list(variants)
            if repeat % 2:
                order.reverse()
            for name in order:
                load_avg = loadavg()
                result = spawn(variants[name][0], cell, args, name)
                result["loadavg"] = load_avg
                runs[name].append(result)
                if args.step_only:
                    print(
                        f"{cell} {name}: step CPU "
                        + " / ".join(f"{c:.2f}" for c in result["step_cpu_s"])
                        + " s, wall "
                        + " / ".join(f"{w:.2f}" for w in result["step_wall_s"])
                        + f" s, load {load_avg}",
                        flush=True,
                    )
                    if "profile_top" in result:
                        print(result["profile_top"], flush=True)
                    continue
                print(
                    f"{cell} {name}: coord {result['coord_s']:.2f} s"
                    f" (CPU {result['coord_cpu_s']:.2f})"
                    f" (gc {result['coord_gc_s']:.2f}), peak {result['coord_peak_mib']:.0f} MiB,"
                    f" torch {result['torch_s']:.2f} s, load {load_avg}",
                    flush=True,
                )
        medians = {}
        for name, results in runs.items():
            row = dict(results[0])
            for key in ("coord_s", "coord_cpu_s", "coord_gc_s", "coord_peak_mib", "torch_s"):
                if key in row:
                    row[key] = statistics.median(r[key] for r in results)
            row["variant"] = name
            row["repeats"] = results
            medians[name] = row
        if "base" in medians:
            if not args.step_only:
                ratios = [
                    a["coord_s"] / b["coord_s"]
                    for a, b in zip(runs["aiodcp"], runs["base"], strict=True)
                ]
                medians["aiodcp"]["x_base"] = statistics.median(ratios)
            same = medians["aiodcp"]["digest"] == medians["base"]["digest"]
            medians["aiodcp"]["same"] = medians["base"]["same"] = "yes" if same else "NO"
        rows.extend(medians.values())
    print()
    print((step_table if args.step_only else table)(rows, "base" in variants))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {name: desc for name, (_, desc) in variants.items()}
    out.write_text(
        json.dumps(
            {"provenance": prov, "variants": meta, "args": vars(args), "rows": rows}, indent=1
        )
    )
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
