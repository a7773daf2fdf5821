"""Stored tensors received straight into their destination (``DirectReceive`` in the engine).

Large plain items skip item memory: their storage bytes go from the socket into the destination
tensor, located from the zip's local headers and checked against its central directory once
all arrived. These tests load through moto (and the fault proxy) and compare every tensor with
what was saved and with the ``torch.load`` path (``fast_decode=False``); odd archives must take
the buffered path again and still load exactly.
"""

from __future__ import annotations

import copy
import io
import pickle
import struct
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner

import aiodcp
from aiodcp.dcp._fastdecode import HEAD_BYTES, DirectReceive

from archives import oddities, replace_items
from conftest import HANG_GUARD_S, S3Server, assert_same, save_checkpoint, upload_dir, wait_until
from faultproxy import Fault, FaultProxy, ProxyRequest, unread_from

MIB = 1024 * 1024


def big_state(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "w_f32": torch.randn(512, 640, generator=g),  # 1.25 MiB
        "w_bf16": torch.randn(1024, 768, generator=g).to(torch.bfloat16),  # 1.5 MiB
        "w_i64": torch.randint(-(2**40), 2**40, (80_000,), generator=g),  # 625 KiB
        "bias": torch.randn(300, generator=g),  # small: the buffered path
        "w_3d": torch.randn(16, 128, 96, generator=g),  # 768 KiB
    }


def zeros(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: torch.zeros_like(v) for k, v in sd.items()}


def load(
    url: str, sd: dict[str, torch.Tensor], **kwargs: Any
) -> tuple[dict[str, torch.Tensor], aiodcp.S3StorageReader]:
    state = zeros(sd)
    reader = aiodcp.S3StorageReader(url, **kwargs)
    with reader:
        dcp.load(state, storage_reader=reader)
    return state, reader


def load_through(
    proxy: FaultProxy, url: str, sd: dict[str, torch.Tensor], **kwargs: Any
) -> tuple[dict[str, torch.Tensor], aiodcp.S3StorageReader]:
    """``load`` with every request going through the fault proxy."""
    return load(
        url,
        sd,
        endpoint_url=proxy.endpoint_url,
        region="us-east-1",
        addressing_style="path",
        **kwargs,
    )


def test_large_items_are_received_into_the_destination(
    tmp_path: Path, s3: Any, bucket: str, reader_kwargs: dict[str, Any]
) -> None:
    sd = big_state()
    upload_dir(s3, save_checkpoint(copy.deepcopy(sd), tmp_path / "c"), bucket, "c")
    url = f"s3://{bucket}/c"
    # Parts of 300 KiB: every large item spans several GETs, received concurrently.
    direct, reader = load(url, sd, part_size=300 * 1024, **reader_kwargs)
    plain, plain_reader = load(url, sd, fast_decode=False, **reader_kwargs)
    assert_same(direct, sd)
    assert_same(plain, sd)
    assert reader.stats.direct_items == 4  # every tensor of 512 KiB or more
    assert reader.stats.refetched_items == 0 and reader.stats.direct_runs == 0
    assert plain_reader.stats.direct_items == 0
    assert plain_reader.stats.fast_decoded_items == 0
    stats = reader.stats
    assert stats is not None
    # Only the small tensor was buffered: no large item held item memory.
    assert stats.peak_buffered_bytes < 64 * 1024


def test_destination_views_and_other_planners_keep_the_buffered_path(
    tmp_path: Path, s3: Any, bucket: str, reader_kwargs: dict[str, Any]
) -> None:
    sd = big_state(1)
    upload_dir(s3, save_checkpoint(copy.deepcopy(sd), tmp_path / "c"), bucket, "c")
    url = f"s3://{bucket}/c"

    class Counting(DefaultLoadPlanner):
        """A planner whose resolve_tensor has a side effect: it must be called in order."""

        def __init__(self) -> None:
            super().__init__()
            self.resolved: list[str] = []

        def resolve_tensor(self, read_item: Any) -> torch.Tensor:
            self.resolved.append(read_item.dest_index.fqn)
            return super().resolve_tensor(read_item)

    state = zeros(sd)
    planner = Counting()
    with aiodcp.S3StorageReader(url, **reader_kwargs) as reader:
        dcp.load(state, storage_reader=reader, planner=planner)
    assert_same(state, sd)
    assert reader.stats.direct_items == 0
    assert len(planner.resolved) == len(sd)

    # A non-contiguous destination (a transposed view) cannot take the bytes in file order.
    state = zeros(sd)
    state["w_f32"] = torch.zeros(640, 512).t()
    with aiodcp.S3StorageReader(url, **reader_kwargs) as reader:
        dcp.load(state, storage_reader=reader)
    assert_same(state, sd)
    assert reader.stats.direct_items == 3


def test_bytes_that_arrive_before_their_header_are_kept_and_placed(
    tmp_path: Path, s3: Any, bucket: str, s3_server: S3Server
) -> None:
    """The GET holding an item's first bytes is held back, so the item's later parts (and the
    rest of its header, cut by a part boundary) arrive first."""
    g = torch.Generator().manual_seed(5)
    sd = {"a": torch.randn(50_000, generator=g), "b": torch.randn(200_000, generator=g)}
    local = save_checkpoint(copy.deepcopy(sd), tmp_path / "c")
    upload_dir(s3, local, bucket, "c")
    infos = _storage(local)
    (name, a), (_, b) = sorted(
        ((i.relative_path, (i.offset, i.length)) for i in infos.values()), key=lambda x: x[1]
    )
    assert a[0] + a[1] == b[0]  # adjacent: one group, parts cut from a's start
    part_size = b[0] - a[0] + 300  # the first part ends 300 bytes into b's header
    held = f"bytes={a[0]}-"
    release = threading.Event()

    def is_held(request: ProxyRequest) -> bool:
        return (request.range or "").startswith(held)

    with FaultProxy(s3_server.endpoint_url) as proxy:
        rule = proxy.add(
            Fault.stall(HANG_GUARD_S, release=release), path_suffix=name, predicate=is_held
        )

        def later_part_read() -> bool:  # another part of b answered, and read by the client
            later = [r for r in proxy.requests if r.path.endswith(name) and not is_held(r)]
            return any(proxy.answered(r) for r in later) and unread_from(proxy.port) == 0

        def release_once_read() -> None:  # the held GET goes on once a later part is in
            wait_until(later_part_read, "a later part of b read while the first is held")
            release.set()

        releaser = threading.Thread(target=release_once_read, name="test-release", daemon=True)
        releaser.start()
        try:
            state, reader = load_through(proxy, f"s3://{bucket}/c", sd, part_size=part_size)
        finally:
            release.set()
            releaser.join(HANG_GUARD_S)
    assert rule.hits == 1
    assert_same(state, sd)
    assert reader.stats.direct_items == 1  # b; a is under half a MiB
    # b's later parts came before its start was known: kept aside, then put in place
    assert reader.stats is not None and reader.stats.held_aside_bytes > HEAD_BYTES


def test_an_interrupted_body_resumes_into_the_destination(
    tmp_path: Path, s3: Any, bucket: str, s3_server: S3Server
) -> None:
    sd = big_state(2)
    local = save_checkpoint(copy.deepcopy(sd), tmp_path / "c")
    upload_dir(s3, local, bucket, "c")
    data = next(p.name for p in local.iterdir() if p.suffix == ".distcp")
    with FaultProxy(s3_server.endpoint_url) as proxy:
        # Cut bodies inside a header (200 bytes in) and inside storage bytes (100 KiB in).
        proxy.add(Fault.drop(200), path_suffix=data, nth=[1, 3])
        proxy.add(Fault.drop(100 * 1024), path_suffix=data, nth=[5, 7])
        state, reader = load_through(proxy, f"s3://{bucket}/c", sd, part_size=512 * 1024)
        assert proxy.faults["drop"] == 4
    assert_same(state, sd)
    assert reader.stats.direct_items == 4
    stats = reader.stats
    assert stats is not None and stats.retries >= 4


# -- archives the direct path must not trust -----------------------------------------------


def _storage(local: Path) -> dict[Any, Any]:
    with open(local / ".metadata", "rb") as f:
        return pickle.load(f).storage_data  # type: ignore[no-any-return]


@pytest.fixture
def odd_checkpoint(
    tmp_path: Path, s3: Any, bucket: str
) -> Iterator[tuple[str, dict[str, torch.Tensor]]]:
    """A checkpoint whose ``w_f32`` and ``w_3d`` items are replaced by odd (valid) archives,
    appended to the data file with the metadata pointing at them."""
    sd = big_state(3)
    local = save_checkpoint(copy.deepcopy(sd), tmp_path / "odd")
    written = replace_items(local, {"w_f32": "reordered", "w_3d": "decoy"})
    assert sorted(written) == ["w_3d", "w_f32"]
    upload_dir(s3, local, bucket, "odd")
    yield f"s3://{bucket}/odd", sd


def test_archives_the_headers_misdescribe_are_loaded_by_torch_load(
    odd_checkpoint: tuple[str, dict[str, torch.Tensor]],
    reader_kwargs: dict[str, Any],
) -> None:
    url, sd = odd_checkpoint
    state, reader = load(url, sd, **reader_kwargs)
    assert_same(state, sd)  # the decoy's zeros never survive
    assert reader.stats.direct_items == 2  # w_bf16 and w_i64
    # The two odd items were fetched again and decoded from their directory; the rest
    # (the small bias included) took a fast path.
    # (Pinned to the version the rest of the load read: see the If-Match test below.)
    assert reader.stats.refetched_items == 2
    assert reader.stats.fast_decoded_items == len(sd)
    plain, _ = load(url, sd, fast_decode=False, **reader_kwargs)
    assert_same(plain, state)


async def test_load_checkpoint_receives_directly(
    tmp_path: Path, s3: Any, bucket: str, reader_kwargs: dict[str, Any]
) -> None:
    sd = big_state(4)
    upload_dir(s3, save_checkpoint(copy.deepcopy(sd), tmp_path / "c"), bucket, "c")
    state = zeros(sd)
    stats = await aiodcp.load_checkpoint(state, f"s3://{bucket}/c", **reader_kwargs)
    assert_same(state, sd)
    assert stats.peak_buffered_bytes < 64 * 1024


# -- DirectReceive on its own ----------------------------------------------------------------


def _saved(tensor: torch.Tensor) -> bytes:
    out = io.BytesIO()
    torch.save(tensor, out)
    return out.getvalue()


@pytest.mark.parametrize(
    "tensor",
    [
        torch.randn(64, 33),
        torch.arange(1000, dtype=torch.int64).reshape(10, 10, 10),
        torch.randn(7).to(torch.bfloat16),
        torch.tensor(3.5),
    ],
    ids=["f32", "i64-3d", "bf16", "scalar"],
)
def test_locate_finds_the_storage_bytes_in_any_prefix(tensor: torch.Tensor) -> None:
    blob = _saved(tensor)
    receive = DirectReceive(torch.zeros_like(tensor), len(blob))
    start = receive.locate(blob[:HEAD_BYTES])
    assert start is not None and start > 0
    for cut in range(0, start, 7):  # every shorter prefix: not yet known
        assert DirectReceive(torch.zeros_like(tensor), len(blob)).locate(blob[:cut]) is None
    end = start + receive.memory.nbytes
    receive.memory[:] = blob[start:end]
    assert torch.equal(receive.tensor, tensor)
    assert receive.verify(blob[:start], blob[end:])
    # Every single-byte change of the directory region is either harmless or refused; a
    # change of a name, offset or size the load relies on is refused.
    tail = bytearray(blob[end:])
    directory_start = struct.unpack_from("<I", tail, len(tail) - 6)[0] - end
    for at in range(directory_start, len(tail)):
        tail[at] ^= 0xFF
        accepted = receive.verify(blob[:start], bytes(tail))
        tail[at] ^= 0xFF
        if accepted:
            assert at - directory_start not in _relied_offsets(blob, end, directory_start)


def _relied_offsets(blob: bytes, end: int, directory_start: int) -> set[int]:
    """Offsets (from the directory's start) of the signature, method, sizes, name lengths,
    local offsets and names of the entries ``verify`` relies on."""
    relied: set[int] = set()
    pos = 0
    tail = blob[end:]
    while tail[directory_start + pos : directory_start + pos + 4] == b"PK\x01\x02":
        at = directory_start + pos
        name_len, extra_len, comment_len = struct.unpack_from("<HHH", tail, at + 28)
        name = tail[at + 46 : at + 46 + name_len].decode()
        if name.endswith(("data.pkl", "byteorder", "data/0")):
            for offset in [*range(4), 10, 11, *range(20, 30), *range(42, 46 + name_len)]:
                relied.add(pos + offset)
        pos += 46 + name_len + extra_len + comment_len
    return relied


def test_a_head_whose_storage_header_lengths_are_damaged_is_refused() -> None:
    """The storage bytes' start comes from the storage record's local header (name and extra
    lengths), which the directory does not repeat: ``verify`` checks it against where the
    directory says the next record begins, so a head damaged there (a shifted start: every
    byte of the tensor off, or a slice's runs at the wrong offsets) is refused, not trusted."""
    tensor = torch.randn(64, 64)
    blob = _saved(tensor)
    receive = DirectReceive(torch.zeros(64, 64), len(blob))
    start = receive.locate(blob[:HEAD_BYTES])
    assert start is not None and start > 0
    end = start + receive.memory.nbytes
    assert receive.verify(blob[:start], blob[end:])
    storage_header = blob.rfind(b"PK\x03\x04", 0, start)
    for delta in (64, 128, -64):  # torch.save pads to 64-byte alignment: shifts that keep it
        head = bytearray(blob)
        extra_len = struct.unpack_from("<H", head, storage_header + 28)[0]
        if extra_len + delta < 0:
            continue
        struct.pack_into("<H", head, storage_header + 28, extra_len + delta)
        damaged = DirectReceive(torch.zeros(64, 64), len(blob))
        moved = damaged.locate(bytes(head[:HEAD_BYTES]))
        assert moved == start + delta, delta  # the head alone cannot tell
        moved_end = moved + damaged.memory.nbytes
        assert not damaged.verify(bytes(head[:moved]), blob[moved_end:]), delta


def test_locate_refuses_other_dtypes_shapes_and_layouts() -> None:
    tensor = torch.randn(32, 32)
    blob = _saved(tensor)
    assert DirectReceive(torch.zeros(32, 32, dtype=torch.float64), len(blob)).locate(blob) == -1
    assert DirectReceive(torch.zeros(1024), len(blob)).locate(blob) == -1
    assert DirectReceive(torch.zeros(32, 32), len(blob)).locate(b"not a zip" * 500) == -1
    odd = oddities(torch.randn(256, 1024))
    target = torch.zeros(256, 1024)
    assert DirectReceive(target, len(odd["reordered"])).locate(odd["reordered"][:HEAD_BYTES]) == -1
    decoy = odd["decoy"]
    receive = DirectReceive(target, len(decoy))
    start = receive.locate(decoy[:HEAD_BYTES])
    assert start is not None and start > 0
    end = start + receive.memory.nbytes
    assert not receive.verify(decoy[:start], decoy[end:])
    # A storage slice (a view saved without its base) is not the destination's storage.
    view = torch.randn(100)[10:20]
    blob = _saved(view)
    assert DirectReceive(torch.zeros(10), len(blob)).locate(blob) == -1


def test_tied_destinations_are_written_in_plan_order(
    tmp_path: Path, s3: Any, bucket: str, reader_kwargs: dict[str, Any]
) -> None:
    """Two keys sharing one tensor (tied weights), saved with different values: the result is
    what FileSystemReader gives, not whichever GET finished last."""
    sd = big_state(6)
    sd["w_f32_copy"] = sd["w_f32"] * 2  # saved untied
    local = save_checkpoint(copy.deepcopy(sd), tmp_path / "c")
    upload_dir(s3, local, bucket, "c")
    tied = zeros(sd)
    tied["w_f32_copy"] = tied["w_f32"]
    expected = copy.deepcopy(tied)  # deepcopy keeps the tie
    assert expected["w_f32_copy"] is expected["w_f32"]
    dcp.load(expected, storage_reader=dcp.FileSystemReader(str(local)))
    with aiodcp.S3StorageReader(f"s3://{bucket}/c", part_size=256 * 1024, **reader_kwargs) as r:
        dcp.load(tied, storage_reader=r)
    assert torch.equal(tied["w_f32"], expected["w_f32"])
    others = [k for k in sd if not k.startswith("w_f32")]
    assert_same({k: tied[k] for k in others}, {k: sd[k] for k in others})
    assert r.stats.direct_items == 3  # not the two tied ones


def test_compressed_items_keep_the_buffered_path(
    tmp_path: Path, s3: Any, bucket: str, reader_kwargs: dict[str, Any]
) -> None:
    pytest.importorskip("zstandard")
    from torch.distributed.checkpoint._extension import ZStandard

    sd = big_state(7)
    local = save_checkpoint(copy.deepcopy(sd), tmp_path / "z", _extensions=[ZStandard()])
    upload_dir(s3, local, bucket, "z")
    state, reader = load(f"s3://{bucket}/z", sd, **reader_kwargs)
    assert_same(state, sd)
    assert reader.stats.direct_items == 0  # the stored bytes are zstd frames, not the tensor's


def test_an_item_fetched_again_is_pinned_to_the_version_already_read(
    odd_checkpoint: tuple[str, dict[str, torch.Tensor]], s3: Any, s3_server: S3Server
) -> None:
    """The second GET of a refused item carries If-Match with the ETag the load began with, so
    an object replaced meanwhile fails the load instead of mixing two versions."""
    url, sd = odd_checkpoint
    bucket, prefix = url[len("s3://") :].split("/", 1)
    data = next(
        o["Key"]
        for o in s3.list_objects_v2(Bucket=bucket, Prefix=prefix)["Contents"]
        if o["Key"].endswith(".distcp")
    )
    etag = s3.head_object(Bucket=bucket, Key=data)["ETag"]
    with FaultProxy(s3_server.endpoint_url) as proxy:
        state, reader = load_through(proxy, url, sd)
        gets = [r for r in proxy.requests if r.method == "GET" and r.path.endswith(data)]
    assert_same(state, sd)
    assert reader.stats.direct_items == 2
    first, again = gets[: len(gets) - 2], gets[len(gets) - 2 :]  # the two refused items, last
    assert {r.if_match for r in again} == {etag}
    assert all(r.range for r in first + again)
