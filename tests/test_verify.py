"""Every loaded byte checked: checkpoints with an integrity record, against faults on the wire.

A checkpoint saved with a record (``recorded.upload_with_record``: torch's FileSystemWriter,
boto3, the record computed from the files' bytes) is loaded through the fault proxy, which
inverts one byte of a GET body (``Fault.flip``). The load must notice before torch sees the
byte, fetch the item once more and load the right tensor; when the second fetch is damaged too,
raise ``ChecksumMismatchError`` naming the file, the stored item and the block. Every data GET
is pinned to the recorded ETag from the first request.
"""

from __future__ import annotations

import copy
import itertools
import pickle
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException

import aiodcp
from aiodcp._checksum import crc64nvme
from aiodcp._verify import BlockCheck, crcs_of

from conftest import S3Server, assert_same, save_checkpoint
from faultproxy import Fault, FaultProxy
from recorded import data_start_of, upload_with_record

MIB = 1024 * 1024


def state(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "big": torch.randn(1024, 640, generator=g),  # 2.5 MiB: received into its destination
        "mid": torch.randn(200, 1024, generator=g),  # 800 KiB: direct too
        "small": torch.randn(3000, generator=g),  # 12 KiB: buffered
        "tiny": torch.arange(10, dtype=torch.int64),  # buffered
    }


def zeros(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: torch.zeros_like(v) for k, v in sd.items()}


def items_of(local: Path) -> dict[str, tuple[str, int, int]]:
    """fqn -> (relative path, offset, length) of its stored item."""
    metadata = pickle.loads((local / ".metadata").read_bytes())
    return {
        index.fqn: (info.relative_path, info.offset, info.length)
        for index, info in metadata.storage_data.items()
    }


@pytest.fixture
def recorded(tmp_path: Path, s3: Any, bucket: str) -> tuple[str, Path, dict[str, torch.Tensor]]:
    sd = state()
    local = save_checkpoint(copy.deepcopy(sd), tmp_path / "ck")
    upload_with_record(s3, local, bucket, "ck")
    return f"s3://{bucket}/ck", local, sd


def through(proxy: FaultProxy, **kwargs: Any) -> dict[str, Any]:
    return {
        "endpoint_url": proxy.endpoint_url,
        "region": "us-east-1",
        "addressing_style": "path",
        **kwargs,
    }


def load(url: str, sd: dict[str, torch.Tensor], **kwargs: Any) -> tuple[dict[str, Any], Any]:
    out = zeros(sd)
    with aiodcp.S3StorageReader(url, **kwargs) as reader:
        dcp.load(out, storage_reader=reader)
    return out, reader.stats


def stored_bytes(local: Path) -> int:
    return sum(n for _, _, n in items_of(local).values())


def unwrapped(error: BaseException) -> BaseException:
    """This rank's own error inside torch's CheckpointException (dcp.load wraps reader errors)."""
    if isinstance(error, CheckpointException):
        (inner,) = error.failures.values()
        return inner[0] if isinstance(inner, tuple) else inner
    return error


def data_gets(proxy: FaultProxy) -> list[Any]:
    return [r for r in proxy.requests if r.method == "GET" and r.path.endswith(".distcp")]


# --------------------------------------------------------------------------- clean loads


def test_a_recorded_checkpoint_loads_verified_and_pinned(
    recorded: tuple[str, Path, dict[str, torch.Tensor]], s3_server: S3Server, s3: Any
) -> None:
    url, local, sd = recorded
    bucket = url.split("/")[2]
    etag = s3.head_object(Bucket=bucket, Key="ck/__0_0.distcp")["ETag"]
    with FaultProxy(s3_server.endpoint_url) as proxy:
        out, stats = load(url, sd, **through(proxy, part_size=1 * MIB))
        gets = data_gets(proxy)
    assert_same(out, sd)
    assert stats.direct_items == 2
    assert stats.verified_bytes == stats.bytes_used == stored_bytes(local)
    assert stats.unverified_bytes == 0 and stats.checksum_mismatches == 0
    # Pinned to the recorded ETag from the very first data GET (no If-Unmodified-Since).
    assert len(gets) >= 3
    assert all(r.if_match == etag for r in gets), [r.headers for r in gets]
    assert not any("if-unmodified-since" in r.headers for r in gets)


def test_without_verification_nothing_is_checked_or_pinned_by_the_record(
    recorded: tuple[str, Path, dict[str, torch.Tensor]], s3_server: S3Server
) -> None:
    url, _, sd = recorded
    with FaultProxy(s3_server.endpoint_url) as proxy:
        out, stats = load(url, sd, **through(proxy, verify_checksums=False))
        first = data_gets(proxy)[0]
    assert_same(out, sd)
    assert stats.verified_bytes == 0 and stats.unverified_bytes == stats.bytes_used
    assert first.if_match is None  # the load pins what it sees first, as before


def test_a_checkpoint_without_a_record_loads_unverified_items(
    tmp_path: Path, s3: Any, bucket: str, reader_kwargs: dict[str, Any]
) -> None:
    from conftest import upload_dir

    sd = state(1)
    upload_dir(s3, save_checkpoint(copy.deepcopy(sd), tmp_path / "c"), bucket, "plain")
    out, stats = load(f"s3://{bucket}/plain", sd, **reader_kwargs)
    assert_same(out, sd)
    assert stats.checksum_mismatches == 0
    assert stats.verified_bytes + stats.unverified_bytes == stats.bytes_used


# --------------------------------------------------------------------------- flipped bytes


@pytest.mark.parametrize("fqn", ["small", "big", "mid"])  # buffered, direct, direct
def test_a_flipped_byte_is_fetched_again_and_the_right_tensor_loads(
    recorded: tuple[str, Path, dict[str, torch.Tensor]], s3_server: S3Server, fqn: str
) -> None:
    url, local, sd = recorded
    _, offset, length = items_of(local)[fqn]
    at = offset + length // 2  # inside the tensor's bytes
    with FaultProxy(s3_server.endpoint_url) as proxy:
        proxy.add(Fault.flip(at), path_suffix=".distcp", predicate=lambda r: r.covers(at), times=1)
        out, stats = load(url, sd, **through(proxy, part_size=1 * MIB))
        assert [o for _, o in proxy.flipped] == [at]
        covering = [r for r in data_gets(proxy) if r.covers(at)]
    assert_same(out, sd)
    assert stats.checksum_mismatches == 1
    assert len(covering) == 2  # the damaged GET and the one fetching the item again
    assert stats.verified_bytes == stored_bytes(local)


@pytest.mark.parametrize("fqn", ["small", "big"])
def test_a_byte_flipped_on_every_fetch_raises_naming_file_item_and_block(
    recorded: tuple[str, Path, dict[str, torch.Tensor]], s3_server: S3Server, fqn: str
) -> None:
    url, local, sd = recorded
    path, offset, length = items_of(local)[fqn]
    at = offset + length - 100
    with FaultProxy(s3_server.endpoint_url) as proxy:
        proxy.add(Fault.flip(at), path_suffix=".distcp", predicate=lambda r: r.covers(at))
        out = zeros(sd)
        with (
            aiodcp.S3StorageReader(url, **through(proxy)) as reader,
            pytest.raises(CheckpointException) as info,
        ):
            dcp.load(out, storage_reader=reader)
        assert len(proxy.flipped) == 2  # the first fetch and the one more
    error = unwrapped(info.value)
    assert isinstance(error, aiodcp.ChecksumMismatchError), repr(error)
    assert error.key == f"ck/{path}"
    assert error.item_range == (offset, offset + length)
    # the block holding the byte: blocks of 1 MiB from the item's storage bytes
    raw = (local / path).read_bytes()[offset : offset + length]
    data_start = data_start_of(raw)
    assert data_start > 0
    lo = offset + data_start + (at - offset - data_start) // MIB * MIB
    assert error.byte_range == (lo, min(lo + MIB, offset + length))
    start, end = error.byte_range
    assert f"'{fqn}'" in str(error) and f"ck/{path}" in str(error)
    clone = pickle.loads(pickle.dumps(error))
    assert isinstance(clone, aiodcp.ChecksumMismatchError) and clone.byte_range == (start, end)
    assert reader.stats is not None and reader.stats.checksum_mismatches == 2


async def test_load_checkpoint_raises_the_mismatch_itself(
    recorded: tuple[str, Path, dict[str, torch.Tensor]], s3_server: S3Server
) -> None:
    url, local, sd = recorded
    _, offset, length = items_of(local)["mid"]
    at = offset + 1000
    with FaultProxy(s3_server.endpoint_url) as proxy:
        proxy.add(Fault.flip(at), path_suffix=".distcp", predicate=lambda r: r.covers(at))
        with pytest.raises(aiodcp.ChecksumMismatchError) as info:
            await aiodcp.load_checkpoint(zeros(sd), url, **through(proxy))
    assert info.value.item_range == (offset, offset + length)


def test_without_verification_a_flipped_byte_loads_a_wrong_tensor(
    recorded: tuple[str, Path, dict[str, torch.Tensor]], s3_server: S3Server
) -> None:
    """What the checks catch: the same fault with verify_checksums=False is a silent error."""
    url, local, sd = recorded
    _, offset, length = items_of(local)["small"]
    at = offset + length // 2
    with FaultProxy(s3_server.endpoint_url) as proxy:
        proxy.add(Fault.flip(at), path_suffix=".distcp", predicate=lambda r: r.covers(at))
        out, _ = load(url, sd, **through(proxy, verify_checksums=False))
    assert not torch.equal(out["small"], sd["small"])


def test_prefetched_items_are_checked_before_they_are_loaded(
    recorded: tuple[str, Path, dict[str, torch.Tensor]], s3_server: S3Server
) -> None:
    url, local, sd = recorded
    _, offset, _ = items_of(local)["small"]
    at = offset + 7
    with FaultProxy(s3_server.endpoint_url) as proxy:
        proxy.add(Fault.flip(at), path_suffix=".distcp", predicate=lambda r: r.covers(at), times=1)
        handle = aiodcp.prefetch(url, progress=False, **through(proxy))
        prefetched = handle.wait(timeout=60)  # a hang guard only
        out = zeros(sd)
        handle.load(out)
        handle.close()
        assert len(proxy.flipped) == 1
    assert_same(out, sd)
    assert prefetched.checksum_mismatches == 0  # checked when a load first takes the item
    assert handle.stats.checksum_mismatches == 1
    assert handle.stats.verified_bytes == stored_bytes(local)


def test_prefetched_items_flipped_twice_raise(
    recorded: tuple[str, Path, dict[str, torch.Tensor]], s3_server: S3Server
) -> None:
    url, local, sd = recorded
    _, offset, length = items_of(local)["big"]
    at = offset + length // 3
    with FaultProxy(s3_server.endpoint_url) as proxy:
        proxy.add(Fault.flip(at), path_suffix=".distcp", predicate=lambda r: r.covers(at))
        with aiodcp.prefetch(url, progress=False, **through(proxy)) as handle:
            handle.wait(timeout=60)
            with pytest.raises(Exception, match=r"do not match"):
                handle.load(zeros(sd))


# --------------------------------------------------------------------------- bad records


def test_a_malformed_record_is_refused_before_any_data_get(
    tmp_path: Path, s3: Any, bucket: str, reader_kwargs: dict[str, Any], s3_server: S3Server
) -> None:
    sd = state(2)
    local = save_checkpoint(copy.deepcopy(sd), tmp_path / "bad")
    upload_with_record(s3, local, bucket, "bad", change=lambda p: p.update(version=99))
    s3_server.clear_log()
    with pytest.raises(BaseException, match=r"integrity record .* malformed: version 99"):
        load(f"s3://{bucket}/bad", sd, **reader_kwargs)
    assert not [r for r in s3_server.requests() if r["path"].endswith(".distcp")]
    # Without verification the record is not read at all.
    out, _ = load(f"s3://{bucket}/bad", sd, verify_checksums=False, **reader_kwargs)
    assert_same(out, sd)


def test_a_record_missing_an_item_is_refused(
    tmp_path: Path, s3: Any, bucket: str, reader_kwargs: dict[str, Any]
) -> None:
    sd = state(3)
    local = save_checkpoint(copy.deepcopy(sd), tmp_path / "gap")
    path, offset, _ = items_of(local)["tiny"]

    def drop(plain: dict[str, Any]) -> None:
        plain["items"][path] = tuple(e for e in plain["items"][path] if e[0] != offset)

    upload_with_record(s3, local, bucket, "gap", change=drop)
    with pytest.raises(BaseException, match=rf"no checksums for the stored item \[{offset}, "):
        load(f"s3://{bucket}/gap", sd, **reader_kwargs)


def test_a_data_file_replaced_after_the_save_is_refused_by_its_recorded_etag(
    recorded: tuple[str, Path, dict[str, torch.Tensor]], s3: Any, reader_kwargs: dict[str, Any]
) -> None:
    url, local, sd = recorded
    bucket = url.split("/")[2]
    data = (local / "__0_0.distcp").read_bytes()
    s3.put_object(Bucket=bucket, Key="ck/__0_0.distcp", Body=data[:-1] + bytes([data[-1] ^ 1]))
    with pytest.raises(BaseException, match=r"not the version this checkpoint.s metadata"):
        load(url, sd, **reader_kwargs)


# --------------------------------------------------------------------------- the checks alone


def test_block_crcs_do_not_depend_on_how_the_bytes_are_cut() -> None:
    data = bytes(range(256)) * 20_000  # 5 MB
    whole = crcs_of([data], [1 << 20] * 4 + [len(data) - (4 << 20)])
    assert len(whole) == 5
    assert whole == [crc64nvme(data[a : a + (1 << 20)]) for a in range(0, len(data), 1 << 20)]
    cuts = [0, 1, 4095, 1 << 20, (1 << 20) + 17, 3_000_000, len(data)]
    pieces = [memoryview(data)[a:b] for a, b in itertools.pairwise(cuts)]
    assert crcs_of(pieces, [1 << 20] * 4 + [len(data) - (4 << 20)]) == whole
    with pytest.raises(ValueError, match="fewer"):
        crcs_of(pieces, [len(data) + 1])
    check = BlockCheck(100, len(data), 1 << 20, tuple(whole), "'x'")
    assert check.mismatches(100, pieces) == []
    damaged = bytearray(data)
    damaged[(2 << 20) + 5] ^= 1
    bad = check.mismatches(100, [damaged])
    assert bad == [(100 + (2 << 20), 100 + (3 << 20))]
    # A window of whole blocks is checked by its blocks; anything else is refused.
    assert check.mismatches(100 + (3 << 20), [data[3 << 20 :]]) == []
    with pytest.raises(ValueError, match="not whole"):
        check.mismatches(101, [data[1:]])
    assert check.window(100 + 5, 100 + (1 << 20) + 1) == (100, 100 + (2 << 20))
    assert check.window(100 + (4 << 20) + 3, 100 + len(data)) == (
        100 + (4 << 20),
        100 + len(data),
    )


def test_blocks_aligned_on_the_storage_bytes() -> None:
    """With ``data_start`` the framing before the storage is block 0 and the blocks count from
    the storage bytes: a run on block boundaries of the storage is its own window."""
    head, block = 1000, 1 << 20
    data = bytes(range(256)) * 17_000  # 4.35 MB: framing, 4 whole blocks, a short last one
    blocks = [data[:head]] + [data[a : a + block] for a in range(head, len(data), block)]
    check = BlockCheck(7, len(data), block, tuple(crc64nvme(b) for b in blocks), "", head)
    assert len(blocks) == 6
    assert check.mismatches(7, [data]) == []
    # every cut, also across blocks and inside the framing
    cuts = [0, 3, head, head + 1, head + block + 9, len(data) - 2, len(data)]
    assert check.mismatches(7, [data[a:b] for a, b in itertools.pairwise(cuts)]) == []
    # a dim-0 run of rows split on a MiB boundary of the storage: exactly its blocks
    run = (7 + head + block, 7 + head + 3 * block)
    assert check.window(*run) == run
    assert (
        check.covers(*run)
        and check.mismatches(run[0], [data[head + block : head + 3 * block]]) == []
    )
    # the first rows start a block (the framing is not fetched for them); the last rows
    # take the rest of the item; a range reaching into the framing takes block 0
    assert check.window(7 + head, 7 + head + 10) == (7 + head, 7 + head + block)
    assert check.window(7 + head - 1, 7 + head + 10) == (7, 7 + head + block)
    assert check.window(7 + head + 4 * block + 1, 7 + len(data)) == (
        7 + head + 4 * block,
        7 + len(data),
    )
    assert check.covers(7, 7 + head) and not check.covers(7, 7 + block)
    damaged = bytearray(data)
    damaged[head - 1] ^= 1  # the framing
    damaged[head + 2 * block] ^= 1  # the first byte of block 3
    assert check.mismatches(7, [damaged]) == [
        (7, 7 + head),
        (7 + head + 2 * block, 7 + head + 3 * block),
    ]
    with pytest.raises(ValueError, match="not whole"):
        check.mismatches(7 + block, [data[block : 2 * block]])  # counted from the item's start


# --------------------------------------------------------------------------- saved by aiodcp


def save_with_writer(state: dict[str, Any], url: str, **kwargs: Any) -> None:
    with aiodcp.S3StorageWriter(url, **kwargs) as writer:
        dcp.save(state, storage_writer=writer)


def test_a_checkpoint_saved_by_aiodcp_loads_verified(
    s3: Any, bucket: str, reader_kwargs: dict[str, Any], s3_server: S3Server, tmp_path: Path
) -> None:
    """The round trip: S3StorageWriter records what the load then checks, every item of it;
    a byte flipped on the way is fetched again, and `aiodcp verify` finds the stored bytes
    sound (and names the block a damaged read gives it)."""
    from aiodcp._cli import EXIT_MISMATCH, EXIT_OK, main

    sd = {**state(5), "huge": torch.randn(3 * MIB)}  # 12 MiB: a multipart upload
    url = f"s3://{bucket}/saved"
    save_with_writer(copy.deepcopy(sd), url, **reader_kwargs)
    out, stats = load(url, sd, **reader_kwargs)
    assert_same(out, sd)
    assert stats.verified_bytes == stats.bytes_used > 0 and stats.unverified_bytes == 0
    metadata = pickle.loads(s3.get_object(Bucket=bucket, Key="saved/.metadata")["Body"].read())
    (info,) = [i for k, i in metadata.storage_data.items() if k.fqn == "huge"]
    at = info.offset + 5 * MIB + 3
    with FaultProxy(s3_server.endpoint_url) as proxy:
        proxy.add(Fault.flip(at), path_suffix=".distcp", predicate=lambda r: r.covers(at), times=1)
        out, stats = load(url, sd, **through(proxy))
        assert len(proxy.flipped) == 1
    assert_same(out, sd)
    assert stats.checksum_mismatches == 1
    endpoint = ["--endpoint-url", s3_server.endpoint_url, "--addressing-style", "path"]
    assert main(["verify", url, *endpoint]) == EXIT_OK
    with FaultProxy(s3_server.endpoint_url) as proxy:
        proxy.add(Fault.flip(at), path_suffix=".distcp", predicate=lambda r: r.covers(at))
        code = main(["verify", url, "--endpoint-url", proxy.endpoint_url, *endpoint[2:]])
    assert code == EXIT_MISMATCH


async def test_save_checkpoint_then_load_checkpoint_verified_on_the_strict_store(
    strict_server: Any, strict_bucket: str
) -> None:
    """Through the store that checks signatures and checksums as S3 does (the writer's uploads
    carry CRC64NVME that it verifies; the load checks the record)."""
    kwargs = {
        "endpoint_url": strict_server.endpoint_url,
        "region": "us-east-1",
        "addressing_style": "path",
    }
    sd = state(6)
    url = f"s3://{strict_bucket}/ck"
    await aiodcp.save_checkpoint(copy.deepcopy(sd), url, **kwargs)
    out = zeros(sd)
    stats = await aiodcp.load_checkpoint(out, url, **kwargs)
    assert_same(out, sd)
    assert stats.verified_bytes == stats.bytes_used and stats.unverified_bytes == 0
