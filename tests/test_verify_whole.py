"""Checkpoints without an integrity record: a data file the load reads whole is checked against
the store's own full-object checksum (a HEAD with ``x-amz-checksum-mode: ENABLED`` beside the
first GETs), CRC64NVME, CRC32C or CRC32; anything else counts as unverified, never as an error.

Faults are on the wire (``Fault.flip`` inverts one byte of a GET body): a damaged file is read
once more, pinned to its ETag; damaged twice, ``ChecksumMismatchError`` names the file. The
stores: moto (``s3_server``: boto3 uploads carry CRC32, a multipart upload a composite one) and
the strict store (``strict_server``: S3's answers to checksum-mode, CRC64NVME by default).
"""

from __future__ import annotations

import asyncio
import copy
import json
import pickle
import threading
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed.checkpoint as dcp
from boto3.s3.transfer import TransferConfig
from torch.distributed.checkpoint.api import CheckpointException

import aiodcp
from aiodcp._checksum import full_object_checksum
from test_safetensors import assert_bits, model_tensors, save_sharded

from conftest import S3Server, StrictServer, assert_same, save_checkpoint, upload_dir
from faultproxy import Fault, FaultProxy, aiodcp_threads

MIB = 1024 * 1024
HANG_GUARD_S = 60.0  # a hang guard: these loads take well under a second


def state(seed: int = 3) -> dict[str, torch.Tensor]:
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
    metadata = pickle.loads((local / ".metadata").read_bytes())
    return {
        index.fqn: (info.relative_path, info.offset, info.length)
        for index, info in metadata.storage_data.items()
    }


def data_bytes(local: Path) -> int:
    return sum(p.stat().st_size for p in local.iterdir() if p.suffix == ".distcp")


def through(proxy: FaultProxy, **kwargs: Any) -> dict[str, Any]:
    return {
        "endpoint_url": proxy.endpoint_url,
        "region": "us-east-1",
        "addressing_style": "path",
        **kwargs,
    }


def load(url: str, template: dict[str, torch.Tensor], **kwargs: Any) -> tuple[dict[str, Any], Any]:
    out = zeros(template)
    with aiodcp.S3StorageReader(url, **kwargs) as reader:
        dcp.load(out, storage_reader=reader)
    return out, reader.stats


def unwrapped(error: BaseException) -> BaseException:
    if isinstance(error, CheckpointException):
        (inner,) = error.failures.values()
        return inner[0] if isinstance(inner, tuple) else inner
    return error


def requests(proxy: FaultProxy, method: str) -> list[Any]:
    return [r for r in proxy.requests if r.method == method and r.path.endswith(".distcp")]


@pytest.fixture
def plain(tmp_path: Path, s3: Any, bucket: str) -> tuple[str, Path, dict[str, torch.Tensor]]:
    """A checkpoint without a record, uploaded by boto3 (each file one PUT with a CRC32)."""
    sd = state()
    local = save_checkpoint(copy.deepcopy(sd), tmp_path / "ck")
    upload_dir(s3, local, bucket, "ck")
    return f"s3://{bucket}/ck", local, sd


# --------------------------------------------------------------------------- clean loads


def test_a_file_read_whole_is_verified_against_the_stores_checksum(
    plain: tuple[str, Path, dict[str, torch.Tensor]], s3_server: S3Server
) -> None:
    url, local, sd = plain
    files = len([p for p in local.iterdir() if p.suffix == ".distcp"])
    with FaultProxy(s3_server.endpoint_url) as proxy:
        out, stats = load(url, sd, **through(proxy, part_size=1 * MIB))
        heads = requests(proxy, "HEAD")
        gets = requests(proxy, "GET")
    assert_same(out, sd)
    assert stats.verified_bytes == stats.bytes_used == data_bytes(local)
    assert stats.unverified_bytes == 0 and stats.checksum_mismatches == 0
    # one HEAD per data file, asking for the checksum; not counted as a data request
    assert stats.checksum_requests == len(heads) == files
    assert all(r.headers.get("x-amz-checksum-mode") == "ENABLED" for r in heads)
    assert stats.requests == len(gets) + 1  # + .metadata


def test_without_verification_nothing_is_asked(
    plain: tuple[str, Path, dict[str, torch.Tensor]], s3_server: S3Server
) -> None:
    url, _, sd = plain
    with FaultProxy(s3_server.endpoint_url) as proxy:
        out, stats = load(url, sd, **through(proxy, verify_checksums=False))
        assert requests(proxy, "HEAD") == []
    assert_same(out, sd)
    assert stats.verified_bytes == 0 and stats.unverified_bytes == stats.bytes_used
    assert stats.checksum_requests == 0


@pytest.mark.parametrize("algorithm", ["CRC64NVME", "CRC32C", "CRC32"])
async def test_each_full_object_algorithm_on_the_strict_store(
    tmp_path: Path, strict_server: StrictServer, strict_bucket: str, algorithm: str
) -> None:
    sd = state(5)
    local = save_checkpoint(copy.deepcopy(sd), tmp_path / "ck")
    client = strict_server.client()
    for path in sorted(local.iterdir()):
        client.put_object(
            Bucket=strict_bucket,
            Key=f"ck/{path.name}",
            Body=path.read_bytes(),
            ChecksumAlgorithm=algorithm,
        )
    out = zeros(sd)
    stats = await asyncio.wait_for(
        aiodcp.load_checkpoint(
            out,
            f"s3://{strict_bucket}/ck",
            endpoint_url=strict_server.endpoint_url,
            region="us-east-1",
            addressing_style="path",
        ),
        HANG_GUARD_S,
    )
    assert_same(out, sd)
    assert stats.verified_bytes == stats.bytes_used == data_bytes(local)
    assert stats.unverified_bytes == 0 and stats.checksum_requests >= 1


def test_a_composite_checksum_leaves_the_file_unverified(
    tmp_path: Path, s3: Any, bucket: str, s3_server: S3Server
) -> None:
    """A multipart upload with CRC32 parts keeps a composite checksum (S3: ``...-N``; moto
    gives it without the suffix): it says nothing about the whole file's CRC, so nothing is
    checked and nothing fails."""
    sd = {**state(6), "huge": torch.randn(1536, 1024, generator=torch.Generator().manual_seed(6))}
    local = save_checkpoint(copy.deepcopy(sd), tmp_path / "ck")
    config = TransferConfig(multipart_threshold=5 * MIB, multipart_chunksize=5 * MIB)
    for path in sorted(local.iterdir()):
        s3.upload_file(str(path), bucket, f"mp/{path.name}", Config=config)
    big = [p for p in local.iterdir() if p.stat().st_size > 5 * MIB]
    assert big  # the largest file was uploaded in parts
    head = s3.head_object(Bucket=bucket, Key=f"mp/{big[0].name}", ChecksumMode="ENABLED")
    given = {k.lower(): v for k, v in head["ResponseMetadata"]["HTTPHeaders"].items()}
    assert "x-amz-checksum-crc32" in given and full_object_checksum(given) is None
    out, stats = load(
        f"s3://{bucket}/mp",
        sd,
        endpoint_url=s3_server.endpoint_url,
        region="us-east-1",
        addressing_style="path",
    )
    assert_same(out, sd)
    assert stats.checksum_mismatches == 0
    unchecked = sum(p.stat().st_size for p in big)
    assert stats.unverified_bytes == unchecked
    assert stats.verified_bytes == data_bytes(local) - unchecked


def test_a_partial_load_is_unverified(
    plain: tuple[str, Path, dict[str, torch.Tensor]], s3_server: S3Server
) -> None:
    url, local, sd = plain
    path, _, length = items_of(local)["small"]
    others = [k for k, (p, _, _) in items_of(local).items() if p == path and k != "small"]
    with FaultProxy(s3_server.endpoint_url) as proxy:
        out, stats = load(url, {"small": sd["small"]}, **through(proxy))
        heads = requests(proxy, "HEAD")
    assert_same(out, {"small": sd["small"]})
    if others:  # the file holds more than the loaded item: not read whole, not asked
        assert heads == [] and stats.checksum_requests == 0
        assert stats.verified_bytes == 0 and stats.unverified_bytes == length
    else:
        assert stats.verified_bytes == length


# --------------------------------------------------------------------------- flipped bytes


@pytest.mark.parametrize(
    ("fqn", "where"),  # buffered, direct, direct; a byte torch cannot decode past
    [("small", "data"), ("big", "data"), ("mid", "data"), ("small", "framing")],
)
def test_a_flipped_byte_reads_the_file_again_and_the_right_tensors_load(
    plain: tuple[str, Path, dict[str, torch.Tensor]], s3_server: S3Server, fqn: str, where: str
) -> None:
    url, local, sd = plain
    path, offset, length = items_of(local)[fqn]
    at = offset + length // 2 if where == "data" else offset + length - 100
    with FaultProxy(s3_server.endpoint_url) as proxy:
        proxy.add(Fault.flip(at), path_suffix=path, predicate=lambda r: r.covers(at), times=1)
        out, stats = load(url, sd, **through(proxy, part_size=1 * MIB))
        assert [o for _, o in proxy.flipped] == [at]
        covering = [r for r in requests(proxy, "GET") if r.path.endswith(path) and r.covers(at)]
        etags = {r.if_match for r in covering[1:]}
    assert_same(out, sd)
    assert stats.checksum_mismatches == 1
    assert len(covering) == 2  # the damaged read and the second one
    assert len(etags) == 1 and None not in etags  # the second read is pinned
    assert stats.verified_bytes == stats.bytes_used == data_bytes(local)
    assert stats.unverified_bytes == 0


@pytest.mark.parametrize(
    ("fqn", "where"), [("small", "data"), ("big", "data"), ("small", "framing")]
)
def test_a_byte_flipped_on_every_read_raises_naming_the_file(
    plain: tuple[str, Path, dict[str, torch.Tensor]], s3_server: S3Server, fqn: str, where: str
) -> None:
    url, local, sd = plain
    path, offset, length = items_of(local)[fqn]
    # a tensor byte (torch decodes it) or one of the zip directory after it (torch fails)
    at = offset + length // 2 if where == "data" else offset + length - 100
    size = (local / path).stat().st_size
    with FaultProxy(s3_server.endpoint_url) as proxy:
        proxy.add(Fault.flip(at), path_suffix=path, predicate=lambda r: r.covers(at))
        out = zeros(sd)
        with (
            aiodcp.S3StorageReader(url, **through(proxy)) as reader,
            pytest.raises(CheckpointException) as info,
        ):
            dcp.load(out, storage_reader=reader)
        assert len(proxy.flipped) == 2  # the first read and the second
        assert proxy.wait_idle(), f"{proxy.open_connections} connections left open"
    error = unwrapped(info.value)
    assert isinstance(error, aiodcp.ChecksumMismatchError), repr(error)
    assert error.key == f"ck/{path}" and error.byte_range == (0, size)
    assert f"ck/{path}" in str(error) and "read whole twice" in str(error)
    clone = pickle.loads(pickle.dumps(error))
    assert isinstance(clone, aiodcp.ChecksumMismatchError) and clone.key == error.key
    assert reader.stats is not None and reader.stats.checksum_mismatches == 2


async def test_load_checkpoint_raises_the_whole_file_mismatch(
    plain: tuple[str, Path, dict[str, torch.Tensor]], s3_server: S3Server
) -> None:
    url, local, sd = plain
    path, offset, _ = items_of(local)["mid"]
    at = offset + 7
    with FaultProxy(s3_server.endpoint_url) as proxy:
        proxy.add(Fault.flip(at), path_suffix=path, predicate=lambda r: r.covers(at))
        with pytest.raises(aiodcp.ChecksumMismatchError, match=f"ck/{path}"):
            await asyncio.wait_for(
                aiodcp.load_checkpoint(zeros(sd), url, **through(proxy)), HANG_GUARD_S
            )
        assert proxy.wait_idle(), f"{proxy.open_connections} connections left open"


# --------------------------------------------------------------------------- the HEAD's lifetime


@pytest.mark.parametrize("mode", ["async", "sync"])
async def test_a_load_failing_while_the_head_is_out_ends_it(
    plain: tuple[str, Path, dict[str, torch.Tensor]], s3_server: S3Server, mode: str
) -> None:
    """The HEADs stall (until released, 60 s at most); a data GET is refused: the load fails
    at once with the GET's error, and leaves no connection, task or thread behind (the HEADs
    were cancelled and awaited by the load, not left to the stall)."""
    url, local, sd = plain
    path = items_of(local)["big"][0]
    release = threading.Event()
    with FaultProxy(s3_server.endpoint_url) as proxy:
        stalled = proxy.add(Fault.stall(60.0, release=release), method="HEAD")
        proxy.add(Fault.access_denied(), path_suffix=path)
        try:
            with pytest.raises((aiodcp.AccessDeniedError, CheckpointException)) as info:
                if mode == "async":
                    await asyncio.wait_for(
                        aiodcp.load_checkpoint(zeros(sd), url, **through(proxy)), HANG_GUARD_S
                    )
                else:
                    await asyncio.wait_for(
                        asyncio.to_thread(load, url, sd, **through(proxy)), HANG_GUARD_S
                    )
            assert stalled.triggered.is_set()
            assert isinstance(unwrapped(info.value), aiodcp.AccessDeniedError)
            # the stalled HEADs' connections were closed by the load, before the release
            assert proxy.wait_idle(), f"{proxy.open_connections} connections left open"
        finally:
            release.set()
    assert [t for t in asyncio.all_tasks() if t is not asyncio.current_task()] == []
    assert aiodcp_threads() == []


async def test_a_failing_head_only_leaves_the_file_unverified(
    plain: tuple[str, Path, dict[str, torch.Tensor]], s3_server: S3Server
) -> None:
    url, local, sd = plain
    with FaultProxy(s3_server.endpoint_url) as proxy:
        proxy.add(Fault.access_denied(), method="HEAD")
        out = zeros(sd)
        stats = await asyncio.wait_for(
            aiodcp.load_checkpoint(out, url, **through(proxy)), HANG_GUARD_S
        )
        heads = requests(proxy, "HEAD")
    assert_same(out, sd)
    assert stats.verified_bytes == 0 and stats.unverified_bytes == data_bytes(local)
    # refused, not retried: the HEAD's error reply has no body to name the error, so the fast
    # path hands it to botocore, which asks once more (one attempt, as for any request)
    assert 1 <= stats.checksum_requests <= len(heads) <= 2 * stats.checksum_requests
    assert stats.checksum_mismatches == 0


# --------------------------------------------------------------------------- safetensors


def tensor_span(file: Path, name: str) -> tuple[int, int]:
    """Object offsets ``[start, end)`` of a tensor's bytes in a safetensors file."""
    raw = file.read_bytes()
    length = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + length])
    begin, end = header[name]["data_offsets"]
    return 8 + length + begin, 8 + length + end


@pytest.fixture
def model(tmp_path: Path, s3: Any, bucket: str) -> tuple[str, Path, dict[str, torch.Tensor]]:
    tensors = model_tensors(11)
    local = save_sharded(tensors, tmp_path / "m", 2)
    upload_dir(s3, local, bucket, "m")
    return f"s3://{bucket}/m", local, tensors


async def load_st(url: str, proxy: FaultProxy, **extra: Any) -> aiodcp.LoadedTensors:
    return await asyncio.wait_for(
        aiodcp.load_safetensors(url, **through(proxy, part_size=256 * 1024, **extra)),
        HANG_GUARD_S,
    )


def shard_of(local: Path, name: str) -> Path:
    index = json.loads((local / "model.safetensors.index.json").read_text())
    return local / index["weight_map"][name]


async def test_a_safetensors_file_read_whole_is_verified(
    model: tuple[str, Path, dict[str, torch.Tensor]], s3_server: S3Server
) -> None:
    url, _, tensors = model
    with FaultProxy(s3_server.endpoint_url) as proxy:
        loaded = await load_st(url, proxy)
        heads = [r for r in proxy.requests if r.method == "HEAD"]
    assert_bits(loaded, tensors)
    stats = loaded.stats
    assert stats.verified_bytes == stats.bytes_used > 0 and stats.unverified_bytes == 0
    assert stats.checksum_requests == len(heads) == 2  # one per file
    # a file read in part is not checked
    name = "model.layers.0.mlp.up_proj.weight"
    with FaultProxy(s3_server.endpoint_url) as proxy:
        part = await load_st(url, proxy, keys=[name])
    assert_bits(part, {name: tensors[name]})
    assert part.stats.verified_bytes == 0
    assert part.stats.unverified_bytes == part.stats.bytes_used > 0


@pytest.mark.parametrize("times", [1, None], ids=["once", "every-read"])
async def test_a_flipped_byte_in_a_safetensors_file(
    model: tuple[str, Path, dict[str, torch.Tensor]], s3_server: S3Server, times: int | None
) -> None:
    url, local, tensors = model
    name = "model.layers.0.mlp.up_proj.weight"  # large: received into its destination
    file = shard_of(local, name)
    start, end = tensor_span(file, name)
    at = (start + end) // 2
    with FaultProxy(s3_server.endpoint_url) as proxy:
        proxy.add(
            Fault.flip(at), path_suffix=file.name, predicate=lambda r: r.covers(at), times=times
        )
        if times == 1:
            loaded = await load_st(url, proxy)
            assert_bits(loaded, tensors)
            assert loaded.stats.checksum_mismatches == 1
            assert loaded.stats.verified_bytes == loaded.stats.bytes_used
        else:
            with pytest.raises(aiodcp.ChecksumMismatchError) as info:
                await load_st(url, proxy)
            assert info.value.key == f"m/{file.name}"
            assert len(proxy.flipped) == 2
        assert proxy.wait_idle(), f"{proxy.open_connections} connections left open"
