"""Resharded loads fetch only the runs of bytes each read item needs (issue 14).

Resharding gives read items that cover part of a stored chunk (``storage_offsets`` /
``lengths``). These tests build such loads the way torch does, without mocks: ``ShardedTensor``
state dicts in one process (a gloo group of one, over an in-memory store) hold several shards
of a tensor, so torch's own ``DefaultLoadPlanner`` saves one stored chunk per shard and, loading
into another sharding, plans read items that intersect them. Every load goes through moto and
is compared tensor by tensor with what torch's ``FileSystemReader`` loads from the same
directory with the same planner; multi-rank loads are in tests/test_distributed.py.
"""

from __future__ import annotations

import copy
import io
import json
import pickle
import struct
import uuid
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from torch.distributed._shard.sharded_tensor import (
    Shard,
    ShardedTensor,
    ShardMetadata,
    init_from_local_shards,
)
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.planner import LoadPlan

import aiodcp
from aiodcp._planner import DEFAULT_MAX_GAP_SIZE_BYTES
from aiodcp.dcp._fastdecode import DirectReceive

from archives import oddities
from conftest import S3Server, upload_dir
from faultproxy import Fault, FaultProxy
from recorded import data_start_of, upload_with_record

pytestmark = pytest.mark.filterwarnings(
    "ignore:Please use DTensor instead and we are deprecating ShardedTensor:FutureWarning"
)

MIB = 1024 * 1024


@pytest.fixture(scope="module", autouse=True)
def group_of_one(monkeypatch_module: pytest.MonkeyPatch) -> Iterator[None]:
    """A gloo process group of one rank over an in-memory store (no rendezvous, loopback)."""
    monkeypatch_module.setenv("GLOO_SOCKET_IFNAME", "lo")
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def monkeypatch_module() -> Iterator[pytest.MonkeyPatch]:
    with pytest.MonkeyPatch.context() as mp:
        yield mp


def bounds(size: int, parts: int) -> list[tuple[int, int]]:
    """``[start, end)`` of each of ``parts`` shards of ``size`` rows, as torch chunks them
    (ceil-sized shards, empty ones dropped)."""
    step = -(-size // parts)
    return [(a, min(size, a + step)) for a in range(0, size, step)]


def sharded(full: torch.Tensor, dim: int, parts: int) -> ShardedTensor:
    """``full`` as a ShardedTensor of ``parts`` shards along ``dim``, all held by this rank."""
    shards = []
    for start, end in bounds(full.shape[dim], parts):
        offsets = [0] * full.dim()
        offsets[dim] = start
        local = full.narrow(dim, start, end - start).clone()
        shards.append(Shard(local, ShardMetadata(offsets, list(local.shape), "rank:0/cpu")))
    return init_from_local_shards(shards, *full.shape)


def shards_of(value: ShardedTensor) -> list[torch.Tensor]:
    return [s.tensor for s in sorted(value.local_shards(), key=lambda s: s.metadata.shard_offsets)]


def zeros_like_sharded(value: ShardedTensor, dim: int, parts: int) -> ShardedTensor:
    full = torch.zeros(value.size(), dtype=value.dtype)
    return sharded(full, dim, parts)


class OneShard(DefaultLoadPlanner):
    """Plans only the read items of the destination shards starting at row ``start`` of
    ``dim``: what one rank of a resharded load reads. The read items are torch's own, and
    resolve_tensor stays the default's."""

    def __init__(self, start: int = 0, dim: int = 0) -> None:
        super().__init__()
        self.start = start
        self.dim = dim

    def create_local_plan(self) -> LoadPlan:
        plan = super().create_local_plan()
        items = [
            i for i in plan.items if i.dest_index.offset is None or self._mine(i.dest_index.offset)
        ]
        return LoadPlan(items, plan.storage_data, plan.planner_data)

    def _mine(self, offset: Any) -> bool:
        expected = [0] * len(offset)
        expected[self.dim] = self.start
        return list(offset) == expected


def save(state: dict[str, Any], local: Path, s3: Any, bucket: str, **kwargs: Any) -> str:
    dcp.save(state, storage_writer=dcp.FileSystemWriter(str(local), **kwargs))
    prefix = f"c-{uuid.uuid4().hex[:8]}"
    upload_dir(s3, local, bucket, prefix)
    return f"s3://{bucket}/{prefix}"


def reference(template: dict[str, Any], local: Path, planner: Any = None) -> dict[str, Any]:
    state = copy.deepcopy(template)
    dcp.load(state, storage_reader=dcp.FileSystemReader(str(local)), planner=planner)
    return state


def load(
    url: str, template: dict[str, Any], planner: Any = None, **kwargs: Any
) -> tuple[dict[str, Any], aiodcp.S3StorageReader]:
    state = copy.deepcopy(template)
    reader = aiodcp.S3StorageReader(url, **kwargs)
    with reader:
        dcp.load(state, storage_reader=reader, planner=planner)
    return state, reader


def assert_same_shards(actual: dict[str, Any], expected: dict[str, Any]) -> None:
    assert set(actual) == set(expected)
    for key, value in expected.items():
        if isinstance(value, ShardedTensor):
            got, want = shards_of(actual[key]), shards_of(value)
            assert len(got) == len(want), key
            for a, e in zip(got, want, strict=True):
                assert a.dtype == e.dtype and a.shape == e.shape, key
                assert torch.equal(a, e), key
        elif isinstance(value, torch.Tensor):
            assert torch.equal(actual[key], value), key
        else:
            assert actual[key] == value, key


def tensors(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "w_f32": torch.randn(512, 640, generator=g),  # 1.25 MiB
        "w_bf16": torch.randn(1024, 384, generator=g).to(torch.bfloat16),  # 768 KiB
        "w_i8": torch.randint(-128, 127, (256, 16, 64), generator=g, dtype=torch.int8),
        "w_bool": torch.rand(4096, 40, generator=g) > 0.5,
        "w_c64": torch.randn(300, 100, generator=g, dtype=torch.complex64),
        "w_4d": torch.randn(16, 4, 16, 32, generator=g).double(),
    }


def requested_ranges(s3_server: S3Server, key_suffix: str) -> list[tuple[int, int]]:
    out = []
    for r in s3_server.requests():
        if r["method"] == "GET" and r["path"].endswith(key_suffix) and r["range"]:
            first, last = r["range"][len("bytes=") :].split("-")
            out.append((int(first), int(last) + 1))
    return out


def overhead(info: Any, value: torch.Tensor) -> int:
    """Bytes of a stored chunk's archive that are not its storage bytes (what each probe of a
    sliced item fetches, the head at most 4 KiB)."""
    return int(info.length - value.numel() * value.element_size())


def storage(local: Path) -> dict[Any, Any]:
    with open(local / ".metadata", "rb") as f:
        return pickle.load(f).storage_data  # type: ignore[no-any-return]


# -- round trips ------------------------------------------------------------------------------


def test_dim0_resharding_fetches_only_the_rows_each_rank_needs(
    tmp_path: Path, s3: Any, bucket: str, reader_kwargs: dict[str, Any]
) -> None:
    """Saved as 2 shards along dim 0, loaded as 4, one rank's read items at a time: each rank
    reads half of one stored chunk and fetches that run plus the chunk's head and tail."""
    full = tensors(0)
    local = tmp_path / "c"
    url = save({k: sharded(v, 0, 2) for k, v in full.items()}, local, s3, bucket)
    template = {k: zeros_like_sharded(v, 0, 4) for k, v in full.items()}
    needed = sum(v.numel() * v.element_size() for v in full.values())
    requested = 0
    for rank in range(4):
        # max_gap_size 0: every item is worth slicing, whatever its size.
        planners = {k: OneShard(bounds(v.shape[0], 4)[rank][0]) for k, v in full.items()}
        for key, planner in planners.items():
            one = {key: template[key]}
            state, reader = load(url, one, planner, max_gap_size=0, **reader_kwargs)
            row = planner.start
            expected = reference(one, local, OneShard(row))
            assert_same_shards(state, expected)
            shard = next(s for s in state[key].local_shards() if s.metadata.shard_offsets[0] == row)
            assert torch.equal(shard.tensor, full[key][row : row + shard.tensor.shape[0]])
            stats = reader.stats
            assert stats is not None and stats.sliced_items == 1
            requested += stats.bytes_requested
    assert requested <= 1.10 * needed
    # A 2-rank share of w_f32 (640 KiB, of a 1-chunk save) goes from the socket straight into
    # the shard, holding no memory budget (a 4-rank share, 320 KiB, was copied from a buffer).
    url = save({"w": sharded(full["w_f32"], 0, 1)}, tmp_path / "one", s3, bucket)
    one = {"w": zeros_like_sharded(full["w_f32"], 0, 2)}
    state, reader = load(url, one, OneShard(256), max_gap_size=0, **reader_kwargs)
    assert_same_shards(state, reference(one, tmp_path / "one", OneShard(256)))
    assert reader.stats.direct_runs == 1
    assert reader.stats is not None and reader.stats.peak_buffered_bytes < 8192


def test_a_load_that_needs_every_row_fetches_whole_items(
    tmp_path: Path, s3: Any, bucket: str, reader_kwargs: dict[str, Any]
) -> None:
    """All four destination shards in one process: together they need every byte of both
    stored chunks, so nothing is left out and no item is sliced (the probes would only add)."""
    full = tensors(1)
    local = tmp_path / "c"
    url = save({k: sharded(v, 0, 2) for k, v in full.items()}, local, s3, bucket)
    template = {k: zeros_like_sharded(v, 0, 4) for k, v in full.items()}
    state, reader = load(url, template, max_gap_size=0, **reader_kwargs)
    assert_same_shards(state, reference(template, local))
    for key, value in full.items():
        assert torch.equal(torch.cat(shards_of(state[key]), 0), value)
    stats = reader.stats
    assert stats is not None and stats.sliced_items == 0 and stats.slice_saved_bytes == 0
    assert stats.bytes_requested == sum(i.length for i in storage(local).values())


def test_a_half_load_of_each_tensor_saves_the_other_half(
    tmp_path: Path, s3: Any, bucket: str, reader_kwargs: dict[str, Any]
) -> None:
    full = tensors(2)
    local = tmp_path / "c"
    url = save({k: sharded(v, 0, 1) for k, v in full.items()}, local, s3, bucket)
    template = {k: zeros_like_sharded(v, 0, 2) for k, v in full.items()}
    infos = {ix.fqn: i for ix, i in storage(local).items()}
    for key in full:
        one = {key: template[key]}
        state, reader = load(url, one, OneShard(), max_gap_size=0, **reader_kwargs)
        assert_same_shards(state, reference(one, local, OneShard()))
        rows = bounds(full[key].shape[0], 2)[0]
        assert torch.equal(shards_of(state[key])[0], full[key][rows[0] : rows[1]])
        stats = reader.stats
        assert stats is not None and stats.sliced_items == 1
        needed = shards_of(state[key])[0].numel() * full[key].element_size()
        probes = 2 * overhead(infos[key], full[key])
        assert 0 < probes < 4096
        assert stats.slice_saved_bytes == infos[key].length - needed - probes
        assert stats.bytes_requested == needed + probes  # the run, a head and a tail


def test_slices_in_other_dims_load_exactly(
    tmp_path: Path, s3: Any, bucket: str, reader_kwargs: dict[str, Any]
) -> None:
    """Saved along dim 0, loaded along dim 1 (and the reverse): whatever is fetched, the result
    is FileSystemReader's."""
    full = tensors(2)
    for save_dim, load_dim in [(0, 1), (1, 0), (1, 2)]:
        chosen = {k: v for k, v in full.items() if v.dim() > max(save_dim, load_dim)}
        local = tmp_path / f"c{save_dim}{load_dim}"
        url = save({k: sharded(v, save_dim, 2) for k, v in chosen.items()}, local, s3, bucket)
        template = {k: zeros_like_sharded(v, load_dim, 3) for k, v in chosen.items()}
        for gap in (0, "auto"):
            state, _ = load(url, template, max_gap_size=gap, **reader_kwargs)
            assert_same_shards(state, reference(template, local))


def grid(full: torch.Tensor, rows: int, cols: int) -> ShardedTensor:
    """``full`` as a ShardedTensor of ``rows`` x ``cols`` shards over its first two dims."""
    shards = []
    for r0, r1 in bounds(full.shape[0], rows):
        for c0, c1 in bounds(full.shape[1], cols):
            local = full[r0:r1, c0:c1].clone()
            offsets = [r0, c0] + [0] * (full.dim() - 2)
            shards.append(Shard(local, ShardMetadata(offsets, list(local.shape), "rank:0/cpu")))
    return init_from_local_shards(shards, *full.shape)


class OneBox(DefaultLoadPlanner):
    """Plans only the read items of the destination shard at ``offset`` (every dim)."""

    def __init__(self, offset: tuple[int, ...]) -> None:
        super().__init__()
        self.offset = offset

    def create_local_plan(self) -> LoadPlan:
        plan = super().create_local_plan()
        items = [i for i in plan.items if tuple(i.dest_index.offset) == self.offset]
        return LoadPlan(items, plan.storage_data, plan.planner_data)


def test_wide_rows_sliced_on_an_inner_dim_are_fetched_as_runs(
    tmp_path: Path, s3: Any, bucket: str, reader_kwargs: dict[str, Any], s3_server: S3Server
) -> None:
    """Half of dim 1 (runs of 256 KiB, 256 KiB apart) or dim 2 (128 KiB apart). Where a
    gap costs more than a request (max_gap_size 64 KiB) each row's run is its own GET;
    where it costs less (512 KiB) the item is fetched whole, as slicing would save less than
    the requests cost."""
    g = torch.Generator().manual_seed(13)
    full = torch.randn(4, 2, 65536, generator=g)
    local = tmp_path / "c"
    url = save({"w": sharded(full, 0, 1)}, local, s3, bucket)
    (info,) = storage(local).values()
    for dim in (1, 2):
        template = {"w": zeros_like_sharded(full, dim, 2)}
        for index in (0, 1):
            start = bounds(full.shape[dim], 2)[index][0]
            expected = reference(template, local, OneShard(start, dim))
            s3_server.clear_log()
            state, reader = load(
                url, template, OneShard(start, dim), max_gap_size=64 * 1024, **reader_kwargs
            )
            assert_same_shards(state, expected)
            stats = reader.stats
            assert stats is not None and stats.sliced_items == 1
            runs = 4 if dim == 1 else 8  # per row of dim 0 (dim 1), per (dim 0, dim 1) row
            ranges = requested_ranges(s3_server, info.relative_path)
            big = [r for r in ranges if r[1] - r[0] > 8192]
            assert len(big) == runs
            assert sum(end - begin for begin, end in big) == full.numel() * 4 // 2
            assert stats.bytes_requested == full.numel() * 4 // 2 + 2 * overhead(info, full)
        state, reader = load(
            url, template, OneShard(0, dim), max_gap_size=512 * 1024, **reader_kwargs
        )
        assert_same_shards(state, reference(template, local, OneShard(0, dim)))
        assert reader.stats is not None and reader.stats.sliced_items == 0


def test_a_box_sliced_in_two_dims_loads_exactly(
    tmp_path: Path, s3: Any, bucket: str, reader_kwargs: dict[str, Any]
) -> None:
    """A 2-D mesh's shard (rows and columns narrowed at once), from a 1-chunk and a 2-chunk
    save, at gaps that fetch it as one span, as a run per row, or whole."""
    g = torch.Generator().manual_seed(14)
    full = torch.randn(64, 4096, generator=g).to(torch.bfloat16)  # rows of 8 KiB
    for saved in (1, 2):
        local = tmp_path / f"c{saved}"
        url = save({"w": sharded(full, 0, saved)}, local, s3, bucket)
        template = {"w": grid(torch.zeros_like(full), 2, 2)}
        for offset in [(0, 0), (32, 2048), (0, 2048)]:
            for gap in (0, 4096, 64 * 1024):
                expected = reference(template, local, OneBox(offset))
                state, reader = load(
                    url, template, OneBox(offset), max_gap_size=gap, **reader_kwargs
                )
                assert_same_shards(state, expected)
                (shard,) = [
                    s
                    for s in state["w"].local_shards()
                    if tuple(s.metadata.shard_offsets) == offset
                ]
                want = full[offset[0] : offset[0] + 32, offset[1] : offset[1] + 2048]
                assert torch.equal(shard.tensor, want)
                assert reader.stats is not None
                if gap == 0:
                    assert reader.stats.sliced_items >= 1


def test_runs_into_other_dtypes_and_strided_destinations(
    tmp_path: Path, s3: Any, bucket: str, reader_kwargs: dict[str, Any]
) -> None:
    """A destination of another dtype (a float32 chunk into bfloat16 shards), or a strided one
    (chunks saved along dim 1, loaded along dim 0: each chunk's rows go to a column band of the
    shard), cannot take a run's bytes as they are: it is buffered and copied, as
    FileSystemReader's copy_ would, never received into the destination."""
    g = torch.Generator().manual_seed(16)
    full = torch.randn(1024, 512, generator=g)  # 2 MiB; half a chunk's rows: 512 KiB runs
    for save_dim, dtype in ((0, torch.bfloat16), (1, torch.float32)):
        local = tmp_path / f"c{save_dim}"
        url = save({"w": sharded(full, save_dim, 1 + save_dim)}, local, s3, bucket)
        template = {"w": sharded(torch.zeros(1024, 512, dtype=dtype), 0, 2)}
        state, reader = load(url, template, OneShard(512), max_gap_size=0, **reader_kwargs)
        assert_same_shards(state, reference(template, local, OneShard(512)))
        (shard,) = [s for s in state["w"].local_shards() if s.metadata.shard_offsets[0] == 512]
        assert torch.equal(shard.tensor, full[512:].to(dtype))
        assert reader.stats is not None and reader.stats.sliced_items == 1 + save_dim
        assert reader.stats.direct_runs == 0


def test_worth_slicing_follows_the_gap_cost_model(
    tmp_path: Path, s3: Any, bucket: str, reader_kwargs: dict[str, Any]
) -> None:
    """An item is sliced when the bytes slicing leaves out exceed max_gap_size (what one
    request is worth); below, or with max_gap_size=inf, it is fetched whole."""
    full = tensors(3)
    local = tmp_path / "c"
    url = save({k: sharded(v, 0, 1) for k, v in full.items()}, local, s3, bucket)
    template = {k: zeros_like_sharded(v, 0, 2) for k, v in full.items()}
    infos = {ix.fqn: i for ix, i in storage(local).items()}
    seen = set()
    for gap in (0, 256 * 1024, 600 * 1024, float("inf")):
        for key, value in full.items():
            one = {key: template[key]}
            state, reader = load(url, one, OneShard(), max_gap_size=gap, **reader_kwargs)
            assert_same_shards(state, reference(one, local, OneShard()))
            needed = bounds(value.shape[0], 2)[0][1] * value[0].numel() * value.element_size()
            left_out = infos[key].length - needed - 2 * overhead(infos[key], value)
            assert reader.stats is not None
            assert reader.stats.sliced_items == (left_out > gap), (key, gap)
            seen.add(left_out > gap)
    assert seen == {True, False}  # the sizes exercise both sides of the rule


def test_auto_counts_a_request_at_most_its_prior_when_slicing(
    tmp_path: Path, s3: Any, bucket: str, s3_server: S3Server
) -> None:
    """A slow first request (the .metadata GET held 300 ms) makes "auto" resolve to 8 MiB;
    whether to slice still counts a request at most the prior's ~2 MiB, so half of an 8 MiB
    tensor is sliced. The same 8 MiB given explicitly is taken as given: fetched whole."""
    g = torch.Generator().manual_seed(17)
    full = torch.randn(2048, 1024, generator=g)
    local = tmp_path / "c"
    url = save({"w": sharded(full, 0, 1)}, local, s3, bucket)
    template = {"w": zeros_like_sharded(full, 0, 2)}
    expected = reference(template, local, OneShard())
    through = {"region": "us-east-1", "addressing_style": "path"}
    sliced = {}
    with FaultProxy(s3_server.endpoint_url) as proxy:
        proxy.add(Fault.stall(0.3), path_suffix=".metadata")
        for gap in ("auto", 8 * MIB):
            state, reader = load(
                url,
                template,
                OneShard(),
                endpoint_url=proxy.endpoint_url,
                max_gap_size=gap,
                **through,
            )
            assert_same_shards(state, expected)
            stats = reader.stats
            assert stats is not None
            sliced[gap] = (stats.sliced_items, stats.max_gap_size)
    # a load that slices plans its requests with that worth too (not the 8 MiB "auto" chose)
    assert sliced == {"auto": (1, DEFAULT_MAX_GAP_SIZE_BYTES), 8 * MIB: (0, 8 * MIB)}


def test_load_checkpoint_slices_too(
    tmp_path: Path, s3: Any, bucket: str, reader_kwargs: dict[str, Any]
) -> None:
    import asyncio

    full = tensors(4)
    local = tmp_path / "c"
    url = save({k: sharded(v, 0, 2) for k, v in full.items()}, local, s3, bucket)
    key = "w_f32"
    template = {key: zeros_like_sharded(full[key], 0, 4)}
    planner = OneShard()
    state = copy.deepcopy(template)
    stats = asyncio.run(
        aiodcp.load_checkpoint(state, url, planner=planner, max_gap_size=0, **reader_kwargs)
    )
    assert_same_shards(state, reference(template, local, OneShard()))
    assert stats.sliced_items == 1 and stats.slice_saved_bytes > 0


# -- what falls back to whole-item fetches ------------------------------------------------------


def test_custom_planners_and_compressed_items_fetch_whole_items(
    tmp_path: Path, s3: Any, bucket: str, reader_kwargs: dict[str, Any]
) -> None:
    full = tensors(5)
    local = tmp_path / "c"
    url = save({k: sharded(v, 0, 2) for k, v in full.items()}, local, s3, bucket)
    template = {k: zeros_like_sharded(v, 0, 4) for k, v in full.items()}

    class Counting(DefaultLoadPlanner):
        def __init__(self) -> None:
            super().__init__()
            self.resolved = 0

        def resolve_tensor(self, read_item: Any) -> torch.Tensor:
            self.resolved += 1
            return super().resolve_tensor(read_item)

    planner = Counting()
    state, reader = load(url, template, planner, max_gap_size=0, **reader_kwargs)
    assert_same_shards(state, reference(template, local))
    assert reader.stats is not None and reader.stats.sliced_items == 0
    assert planner.resolved == 4 * len(full)

    pytest.importorskip("zstandard")
    from torch.distributed.checkpoint._extension import ZStandard

    zlocal = tmp_path / "z"
    zurl = save(
        {k: sharded(v, 0, 2) for k, v in full.items()},
        zlocal,
        s3,
        bucket,
        _extensions=[ZStandard()],
    )
    state, reader = load(zurl, template, max_gap_size=0, **reader_kwargs)
    assert_same_shards(state, reference(template, zlocal))
    assert reader.stats is not None and reader.stats.sliced_items == 0


def test_fast_decode_off_fetches_whole_items(
    tmp_path: Path, s3: Any, bucket: str, reader_kwargs: dict[str, Any]
) -> None:
    full = tensors(6)
    local = tmp_path / "c"
    url = save({k: sharded(v, 0, 2) for k, v in full.items()}, local, s3, bucket)
    template = {k: zeros_like_sharded(v, 0, 4) for k, v in full.items()}
    state, reader = load(url, template, max_gap_size=0, fast_decode=False, **reader_kwargs)
    assert_same_shards(state, reference(template, local))
    assert reader.stats is not None and reader.stats.sliced_items == 0


# -- property: any shapes, dtypes and shardings ---------------------------------------------------

DTYPES = [
    torch.float32,
    torch.float64,
    torch.float16,
    torch.bfloat16,
    torch.int64,
    torch.int32,
    torch.int16,
    torch.int8,
    torch.uint8,
    torch.bool,
    torch.complex64,
    torch.complex128,
]


def make(shape: tuple[int, ...], dtype: torch.dtype, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if dtype == torch.bool:
        return torch.rand(shape, generator=g) > 0.5
    if dtype.is_complex:
        return torch.randn(shape, generator=g, dtype=dtype)
    if dtype.is_floating_point:
        return torch.randn(shape, generator=g).to(dtype)
    info = torch.iinfo(dtype)
    return torch.randint(info.min, info.max, shape, generator=g, dtype=dtype)


@st.composite
def reshardings(draw: st.DrawFn) -> dict[str, Any]:
    ndim = draw(st.integers(1, 4))
    rest = tuple(draw(st.lists(st.integers(1, 16), min_size=ndim - 1, max_size=ndim - 1)))
    inner = 1
    for dim in rest:
        inner *= dim
    # rows enough that items outgrow their probes, at most ~200k elements (moto copies the
    # whole object per ranged GET: keep tests small)
    rows = draw(st.integers(2, max(2, 200_000 // inner)))
    shape = (rows, *rest)
    return {
        "shape": shape,
        "dtype": draw(st.sampled_from(DTYPES)),
        "save": (draw(st.integers(0, ndim - 1)), draw(st.integers(1, 4))),
        # dim 0 half the time: the common (FSDP) case, the one that slices
        "load": (draw(st.integers(0, ndim - 1) | st.just(0)), draw(st.integers(1, 5))),
        "gap": draw(st.sampled_from([0, 0, 16 * 1024])),
        "seed": draw(st.integers(0, 2**16)),
    }


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(case=reshardings(), rank=st.integers(0, 4))
def test_any_resharding_loads_what_filesystemreader_loads(
    case: dict[str, Any],
    rank: int,
    tmp_path: Path,
    s3: Any,
    bucket: str,
    reader_kwargs: dict[str, Any],
) -> None:
    """One rank's read items of a resharded load: any shape (1-D to 4-D), dtype, save and load
    sharding (dim and number of shards); the rank's shard is what FileSystemReader loads and
    what was saved, and every byte of the stored chunks it touches is either requested or
    counted as saved."""
    full = make(case["shape"], case["dtype"], case["seed"])
    local = tmp_path / uuid.uuid4().hex[:8]
    save_dim, save_parts = case["save"]
    load_dim, load_parts = case["load"]
    url = save({"t": sharded(full, save_dim, save_parts), "step": 3}, local, s3, bucket)
    template = {"t": sharded(torch.zeros_like(full), load_dim, load_parts), "step": 0}
    shards = bounds(full.shape[load_dim], load_parts)
    row, end = shards[rank % len(shards)]
    planner = OneShard(row, load_dim)
    state, reader = load(url, template, planner, max_gap_size=case["gap"], **reader_kwargs)
    expected = reference(template, local, OneShard(row, load_dim))
    assert_same_shards(state, expected)
    (shard,) = [s for s in state["t"].local_shards() if s.metadata.shard_offsets[load_dim] == row]
    assert torch.equal(shard.tensor, full.narrow(load_dim, row, end - row))
    stats = reader.stats
    assert stats is not None
    touched = sum(
        info.length
        for index, info in storage(local).items()
        if index.fqn == "step"
        or _overlaps(index.offset[load_dim], full, save_dim, save_parts, load_dim, (row, end))
    )
    if case["gap"] == 0:
        assert stats.bytes_requested + stats.slice_saved_bytes == touched
    else:
        assert stats.bytes_requested + stats.slice_saved_bytes >= touched
    assert (stats.sliced_items == 0) == (stats.slice_saved_bytes == 0)
    event("sliced" if stats.sliced_items else "fetched whole")


def _overlaps(
    chunk_start: int,
    full: torch.Tensor,
    save_dim: int,
    save_parts: int,
    load_dim: int,
    rows: tuple[int, int],
) -> bool:
    """Whether the stored chunk starting at ``chunk_start`` (along ``load_dim``) holds any of
    ``rows`` of ``load_dim``."""
    if save_dim != load_dim:
        return True  # chunks split another dim: each holds every row of load_dim
    (chunk,) = [b for b in bounds(full.shape[save_dim], save_parts) if b[0] == chunk_start]
    return chunk[0] < rows[1] and rows[0] < chunk[1]


# -- the wire: what is requested, and faults ---------------------------------------------------


def storage_start(local: Path, info: Any) -> int:
    """File offset of the storage bytes of a stored tensor item, read with ``zipfile``."""
    with open(local / info.relative_path, "rb") as f:
        f.seek(info.offset)
        blob = f.read(info.length)
    archive = zipfile.ZipFile(io.BytesIO(blob))
    (entry,) = [e for e in archive.infolist() if e.filename.endswith("/data/0")]
    name_len, extra_len = struct.unpack_from("<HH", blob, entry.header_offset + 26)
    return int(info.offset + entry.header_offset + 30 + name_len + extra_len)


@pytest.mark.parametrize("which", ["first", "second"])
def test_a_half_slice_requests_its_half_and_never_the_other(
    tmp_path: Path,
    s3: Any,
    bucket: str,
    reader_kwargs: dict[str, Any],
    s3_server: S3Server,
    which: str,
) -> None:
    """One stored 8 MiB tensor, half its rows loaded (max_gap_size at the gap policy's prior,
    ~2 MiB, fixed: "auto" follows the measured latency): the GETs ask for that half and the
    archive's head and tail. Of the other half's storage bytes they touch at
    most what a probe reaches past the archive's own bytes (under 1 KB), never the rest."""
    g = torch.Generator().manual_seed(9)
    full = torch.randn(2048, 1024, generator=g)
    local = tmp_path / "c"
    url = save({"w": sharded(full, 0, 1)}, local, s3, bucket)
    template = {"w": zeros_like_sharded(full, 0, 2)}
    (info,) = storage(local).values()
    half = 1024 * 1024 * 4
    start = storage_start(local, info)
    mine, other = (start, start + half), (start + half, start + 2 * half)
    if which == "second":
        mine, other = other, mine
    s3_server.clear_log()
    row = 0 if which == "first" else 1024
    gap = DEFAULT_MAX_GAP_SIZE_BYTES
    state, reader = load(url, template, OneShard(row), max_gap_size=gap, **reader_kwargs)
    shard = next(s for s in state["w"].local_shards() if s.metadata.shard_offsets[0] == row)
    assert torch.equal(shard.tensor, full[row : row + 1024])
    ranges = requested_ranges(s3_server, info.relative_path)
    extra = overhead(info, full)  # ~1.6 KB: the archive's bytes around the storage
    requested = sum(end - start for start, end in ranges)
    assert requested <= half + 2 * extra

    merged: list[list[int]] = []
    for begin, end in sorted(ranges):
        if merged and begin <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([begin, end])

    def touched(span: tuple[int, int]) -> int:
        return sum(max(0, min(end, span[1]) - max(begin, span[0])) for begin, end in merged)

    assert touched(mine) == half
    assert touched(other) < 1024, ranges
    stats = reader.stats
    assert stats is not None and stats.sliced_items == 1
    assert stats.bytes_requested == requested
    assert reader.stats.direct_runs == 1  # the run went straight into the shard


def test_a_body_cut_inside_a_run_resumes(
    tmp_path: Path, s3: Any, bucket: str, s3_server: S3Server
) -> None:
    g = torch.Generator().manual_seed(10)
    full = torch.randn(1024, 512, generator=g)
    local = tmp_path / "c"
    url = save({"w": sharded(full, 0, 1)}, local, s3, bucket)
    template = {"w": zeros_like_sharded(full, 0, 2)}
    (info,) = storage(local).values()
    with FaultProxy(s3_server.endpoint_url) as proxy:
        # the run's GET (1 MiB, beyond the 4 KiB probes) is cut 300 KiB in, twice
        rule = proxy.add(
            Fault.drop(300 * 1024),
            path_suffix=info.relative_path,
            predicate=lambda r: _length(r.range) > 64 * 1024,
            nth=[1, 2],
        )
        for planner in (OneShard(), OneShard(512)):
            state, reader = load(
                url,
                template,
                planner,
                endpoint_url=proxy.endpoint_url,
                region="us-east-1",
                addressing_style="path",
                part_size=2 * MIB,
                max_gap_size=0,
            )
            stats = reader.stats
            assert stats is not None and stats.sliced_items == 1
            expected = reference(template, local, copy.deepcopy(planner))
            assert_same_shards(state, expected)
    assert rule.hits == 2


def _length(header: str | None) -> int:
    if not header:
        return 0
    first, _, last = header[len("bytes=") :].partition("-")
    return int(last) + 1 - int(first) if last else 1 << 40


def test_an_unusual_layout_is_fetched_whole_and_decoded_normally(
    tmp_path: Path, s3: Any, bucket: str, reader_kwargs: dict[str, Any], s3_server: S3Server
) -> None:
    """A stored chunk rewritten as a valid archive whose records are in another order: its
    head does not locate, so it is fetched whole (pinned to the load's ETag) and decoded by
    torch.load; the other chunk is sliced."""
    full = torch.randn(512, 640, generator=torch.Generator().manual_seed(12))
    local = tmp_path / "c"
    save({"w": sharded(full, 0, 2)}, local, s3, bucket)
    with open(local / ".metadata", "rb") as f:
        metadata = pickle.load(f)
    (odd_index,) = [i for i in metadata.storage_data if i.offset[0] != 0]
    info = metadata.storage_data[odd_index]
    blob = oddities(full[256:].clone())["reordered"]
    path = local / info.relative_path
    offset = path.stat().st_size
    with open(path, "ab") as f:
        f.write(blob)
    metadata.storage_data[odd_index] = type(info)(info.relative_path, offset, len(blob))
    with open(local / ".metadata", "wb") as f:
        pickle.dump(metadata, f)
    prefix = f"odd-{uuid.uuid4().hex[:8]}"
    upload_dir(s3, local, bucket, prefix)
    etag = s3.head_object(Bucket=bucket, Key=f"{prefix}/{info.relative_path}")["ETag"]
    template = {"w": zeros_like_sharded(full, 0, 4)}
    url = f"s3://{bucket}/{prefix}"
    # The rank reading rows [384, 512): the second half of the odd chunk.
    s3_server.clear_log()
    state, reader = load(url, template, OneShard(384), max_gap_size=0, **reader_kwargs)
    assert_same_shards(state, reference(template, local, OneShard(384)))
    shard = next(s for s in state["w"].local_shards() if s.metadata.shard_offsets[0] == 384)
    assert torch.equal(shard.tensor, full[384:])
    stats = reader.stats
    assert stats is not None and stats.sliced_items == 0
    gets = [
        r for r in s3_server.requests() if r["method"] == "GET" and r["path"].endswith(".distcp")
    ]
    whole = f"bytes={offset}-{offset + len(blob) - 1}"
    *probes, last = gets
    assert last["range"] == whole  # after its head and tail: the item, in one GET
    assert last["if_match"] == etag  # pinned to the version probed
    assert len(probes) == 2 and all(_length(r["range"]) < 4096 for r in probes)
    # The rank reading rows [0, 128), of the plain chunk: sliced.
    state, reader = load(url, template, OneShard(0), max_gap_size=0, **reader_kwargs)
    assert_same_shards(state, reference(template, local, OneShard(0)))
    assert reader.stats is not None and reader.stats.sliced_items == 1


# -- aiodcp plan --slice ---------------------------------------------------------------------


def test_plan_slice_shows_what_the_load_of_that_shard_fetches(
    tmp_path: Path,
    s3: Any,
    bucket: str,
    s3_server: S3Server,
    reader_kwargs: dict[str, Any],
    capsys: pytest.CaptureFixture[str],
) -> None:
    """``aiodcp plan --slice 0:0:256``: the bytes needed, requested and the requests per file
    are those of a real load of that shard (rows [0, 256) of every tensor)."""
    from aiodcp._cli import main

    full = tensors(15)
    full = {"w_f32": full["w_f32"], "w_bf16": full["w_bf16"], "w_bool": full["w_bool"]}
    local = tmp_path / "c"
    state: dict[str, Any] = {k: sharded(v, 0, 1) for k, v in full.items()}
    state["step"] = 5
    url = save(state, local, s3, bucket)
    common = ["--endpoint-url", s3_server.endpoint_url, "--addressing-style", "path"]
    code = main(["plan", url, "--slice", "0:0:256", "--max-gap-size", "0", "--json", *common])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    report = json.loads(captured.out)
    totals = report["totals"]
    assert report["slices"] == [{"dim": 0, "start": 0, "length": 256}]

    # The same shard, loaded: rows [0, 256) of each tensor, one rank's read items.
    template: dict[str, Any] = {
        k: zeros_like_sharded(v, 0, v.shape[0] // 256) for k, v in full.items()
    }
    template["step"] = 0
    loaded, reader = load(url, template, OneShard(0), max_gap_size=0, **reader_kwargs)
    assert_same_shards(loaded, reference(template, local, OneShard(0)))
    stats = reader.stats
    assert stats is not None
    infos = storage(local)
    step = next(i.length for ix, i in infos.items() if ix.fqn == "step")
    shard_bytes = sum(v[:256].numel() * v.element_size() for v in full.values())
    assert totals["bytes_needed"] == shard_bytes + step
    assert totals["bytes_requested"] == stats.bytes_requested
    assert totals["requests"] + 1 == stats.requests  # + .metadata
    assert totals["sliced_items"] == stats.sliced_items == len(full)
    (entry,) = report["files"]
    assert entry["requests"] == totals["requests"] and entry["probe_requests"] >= 1
    assert totals["bytes_requested"] < sum(i.length for i in infos.values())

    # The table says the same; a malformed --slice is a usage error.
    assert main(["plan", url, "--slice", "0:0:256", "--max-gap-size", "0", *common]) == 0
    text = capsys.readouterr().out
    assert f"{len(full)} stored items sliced" in text and "dim 0 [0, 256)" in text
    assert main(["plan", url, "--slice", "0:x", *common]) == 2
    assert "DIM:START:LEN" in capsys.readouterr().err


# -- verified slices: runs widened to the checksum blocks they touch ---------------------------


def save_recorded(
    state: dict[str, Any], local: Path, s3: Any, bucket: str, *, aligned: bool = True
) -> str:
    """As ``save``, with the integrity record an aiodcp save attaches (tests/recorded.py);
    ``aligned=False``: every item's blocks counted from its first byte (data_start 0)."""
    dcp.save(state, storage_writer=dcp.FileSystemWriter(str(local)))
    prefix = f"r-{uuid.uuid4().hex[:8]}"
    upload_with_record(s3, local, bucket, prefix, aligned=aligned)
    return f"s3://{bucket}/{prefix}"


@pytest.mark.parametrize("aligned", [True, False], ids=["aligned", "from-first-byte"])
def test_a_verified_slice_fetches_the_whole_blocks_around_its_runs(
    tmp_path: Path,
    s3: Any,
    bucket: str,
    reader_kwargs: dict[str, Any],
    s3_server: S3Server,
    aligned: bool,
) -> None:
    """A 4 MiB tensor saved as one chunk, loaded a quarter (1 MiB of rows) at a time: each
    quarter is fetched as the whole 1 MiB checksum blocks its run touches, checked, and
    received straight into the shard; every byte loaded is verified and the result is
    FileSystemReader's. With the blocks aligned on the storage bytes (what aiodcp's writer
    records) each quarter is its blocks exactly: nothing more is fetched than without a record.
    Counted from the item's first byte (a record whose items have data_start 0), a quarter
    takes nearly a block more."""
    g = torch.Generator().manual_seed(21)
    full = torch.randn(1024, 1024, generator=g)
    local = tmp_path / "c"
    url = save_recorded({"w": sharded(full, 0, 1)}, local, s3, bucket, aligned=aligned)
    (info,) = storage(local).values()
    data = (local / info.relative_path).read_bytes()[info.offset : info.offset + info.length]
    first = DirectReceive(torch.zeros(1024, 1024), info.length).locate(data[:4096])
    assert first is not None and first > 0  # where the storage bytes begin in the item
    template = {"w": zeros_like_sharded(full, 0, 4)}
    origin = info.offset + (first if aligned else 0)  # where the 1 MiB blocks are counted from
    for start in (0, 256, 512, 768):
        s3_server.clear_log()
        state, reader = load(url, template, OneShard(start), max_gap_size=0, **reader_kwargs)
        assert_same_shards(state, reference(template, local, OneShard(start)))
        stats = reader.stats
        assert stats is not None and stats.sliced_items == 1 and stats.direct_runs == 1
        assert stats.unverified_bytes == 0 and stats.checksum_mismatches == 0
        big = [r for r in requested_ranges(s3_server, info.relative_path) if r[1] - r[0] > 8192]
        window = (min(a for a, _ in big), max(b for _, b in big))  # one window, in parts
        assert sum(b - a for a, b in big) == window[1] - window[0]
        assert (window[0] - origin) % MIB == 0  # starts on a checksum block
        end = info.offset + info.length
        assert window[1] == end or (window[1] - origin) % MIB == 0
        run_start = info.offset + first + start * 4096
        assert window[0] <= run_start and run_start + MIB <= window[1]
        assert window[1] - window[0] <= 2 * MIB + overhead(info, full)  # at most a block more
        if aligned:
            assert window == (run_start, run_start + MIB)  # the run's own blocks, no more
        else:
            assert window[1] - window[0] > MIB
        assert stats.verified_bytes == window[1] - window[0]
        probes = 2 * overhead(info, full)
        assert stats.slice_saved_bytes == info.length - (window[1] - window[0]) - probes


@pytest.mark.parametrize(
    ("dim", "where"),
    [(0, "run"), (0, "lead-in"), (0, "lead-in-aligned"), (0, "trail-aligned"), (1, "run")],
)
def test_a_flipped_byte_in_a_verified_slice_is_fetched_again(
    tmp_path: Path,
    s3: Any,
    bucket: str,
    reader_kwargs: dict[str, Any],
    s3_server: S3Server,
    dim: int,
    where: str,
) -> None:
    """A byte flipped in a sliced item's run (received into the shard for dim 0; buffered
    strided runs for dim 1), or in the bytes of its first (or last) checksum block that precede
    (follow) the run (fetched only to check the block): the block does not match, the window
    is fetched once more, and the shard loads exactly. Flipped on every fetch:
    ChecksumMismatchError. "lead-in": blocks counted from the item's first byte (a record with
    data_start 0); "*-aligned": blocks from the storage bytes, rows of 4000 bytes, so a quarter
    (250 rows) starts and ends inside a block."""
    g = torch.Generator().manual_seed(22)
    # dim 1: rows of 2 MiB, so a quarter of each row is a run of 512 KiB (narrower strided
    # runs widened to whole blocks would cover the item: it is then fetched whole)
    full = torch.randn(1024, 1024, generator=g) if dim == 0 else torch.randn(4, 524288)
    if where.endswith("-aligned"):
        full = torch.randn(1000, 1000, generator=g)
    local = tmp_path / "c"
    aligned = where != "lead-in"
    url = save_recorded({"w": sharded(full, 0, 1)}, local, s3, bucket, aligned=aligned)
    (info,) = storage(local).values()
    data = (local / info.relative_path).read_bytes()[info.offset : info.offset + info.length]
    storage_at = info.offset + data_start_of(data)
    template = {"w": zeros_like_sharded(full, dim, 4)}
    start = 512 if dim == 0 else 0
    if where.endswith("-aligned"):
        start = 250  # rows [250, 500): bytes [1,000,000, 2,000,000) of the storage
    at = {
        "run": info.offset + 2 * MIB + 100_000,  # in rows 512.. (dim 0), row 1's run (dim 1)
        "lead-in": info.offset + 2 * MIB + 10,  # before row 512's first byte: lead-in only
        "lead-in-aligned": storage_at + 999_990,  # block 1 of the storage, before row 250
        "trail-aligned": storage_at + 2_000_010,  # block 2 of the storage, after row 499
    }[where]
    proxy_kwargs = {**reader_kwargs}
    with FaultProxy(s3_server.endpoint_url) as proxy:
        proxy_kwargs["endpoint_url"] = proxy.endpoint_url
        proxy.add(Fault.flip(at), path_suffix=".distcp", predicate=lambda r: r.covers(at), times=1)
        state, reader = load(url, template, OneShard(start, dim), max_gap_size=0, **proxy_kwargs)
        assert len(proxy.flipped) == 1
    assert_same_shards(state, reference(template, local, OneShard(start, dim)))
    stats = reader.stats
    assert stats is not None and stats.sliced_items == 1 and stats.checksum_mismatches == 1
    with FaultProxy(s3_server.endpoint_url) as proxy:
        proxy_kwargs["endpoint_url"] = proxy.endpoint_url
        proxy.add(Fault.flip(at), path_suffix=".distcp", predicate=lambda r: r.covers(at))
        with pytest.raises(BaseException, match="do not match the CRC64NVME") as info_:
            load(url, template, OneShard(start, dim), max_gap_size=0, **proxy_kwargs)
        assert len(proxy.flipped) == 2
    assert "ChecksumMismatchError" in str(info_.value)


def test_without_a_record_slices_fetch_only_their_runs(
    tmp_path: Path, s3: Any, bucket: str, reader_kwargs: dict[str, Any], s3_server: S3Server
) -> None:
    """The same quarter of a checkpoint without a record (or with verify_checksums=False):
    only the run and the probes, as before."""
    g = torch.Generator().manual_seed(23)
    full = torch.randn(1024, 1024, generator=g)
    local = tmp_path / "c"
    url = save_recorded({"w": sharded(full, 0, 1)}, local, s3, bucket)
    (info,) = storage(local).values()
    template = {"w": zeros_like_sharded(full, 0, 4)}
    state, reader = load(
        url, template, OneShard(256), max_gap_size=0, verify_checksums=False, **reader_kwargs
    )
    assert_same_shards(state, reference(template, local, OneShard(256)))
    stats = reader.stats
    assert stats is not None and stats.verified_bytes == 0
    assert stats.bytes_requested == MIB + 2 * overhead(info, full)
