"""What describes a checkpoint is checked before it is parsed: DCP's ``.metadata`` (and a
safetensors checkpoint's index) is read whole by one GET without a Range that asks for the
object's checksum (``x-amz-checksum-mode: ENABLED``), which S3 answers with the full-object
checksum, and the bytes are checked against it before anything unpickles them.

Faults are on the wire (``Fault.flip`` inverts one byte of the ``.metadata`` body): a damaged
read is read once more; damaged twice, ``ChecksumMismatchError`` names the object. The stores:
moto (``s3_server``: it keeps the checksum an upload sent, none for an upload that sent none)
and the strict store (``strict_server``: S3's answers, a CRC64NVME for every object; every
``x-amz-*`` header must be signed).
"""

from __future__ import annotations

import asyncio
import copy
import json
from pathlib import Path
from typing import Any

import boto3
import pytest
import torch
from botocore.config import Config
from safetensors.torch import save_file
from torch.distributed.checkpoint.api import CheckpointException

import aiodcp

from conftest import (
    HANG_GUARD_S,
    S3Server,
    StrictServer,
    assert_same,
    save_checkpoint,
    upload_dir,
)
from faultproxy import Fault, FaultProxy


def state(seed: int = 7) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "w": torch.randn(512, 256, generator=g),  # 512 KiB: received into its destination
        "b": torch.randn(300, generator=g),
        "step": torch.tensor(3),
    }


def zeros(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: torch.zeros_like(v) for k, v in sd.items()}


def options(endpoint: str, **kwargs: Any) -> dict[str, Any]:
    return {"endpoint_url": endpoint, "region": "us-east-1", "addressing_style": "path", **kwargs}


async def load(url: str, sd: dict[str, torch.Tensor], **kwargs: Any) -> Any:
    out = zeros(sd)
    stats = await asyncio.wait_for(aiodcp.load_checkpoint(out, url, **kwargs), HANG_GUARD_S)
    assert_same(out, sd)
    return stats


def metadata_gets(proxy: FaultProxy, name: str = ".metadata") -> list[Any]:
    return [r for r in proxy.requests if r.method == "GET" and r.path.endswith(name)]


def unwrapped(error: BaseException) -> BaseException:
    if isinstance(error, CheckpointException):
        (inner,) = error.failures.values()
        return inner[0] if isinstance(inner, tuple) else inner
    return error


def put_all(client: Any, local: Path, bucket: str, prefix: str, **kwargs: Any) -> None:
    for path in sorted(local.iterdir()):
        client.put_object(
            Bucket=bucket, Key=f"{prefix}/{path.name}", Body=path.read_bytes(), **kwargs
        )


@pytest.fixture
def saved(
    tmp_path: Path, s3_server: S3Server, bucket: str
) -> tuple[str, dict[str, torch.Tensor], int]:
    """A checkpoint whose objects carry their CRC64NVME, uploaded by boto3. (moto keeps the
    checksum of an upload that names its algorithm, ``x-amz-sdk-checksum-algorithm``, as
    boto3's and aiodcp's uploads do.)"""
    sd = state()
    local = save_checkpoint(copy.deepcopy(sd), tmp_path / "saved")
    put_all(s3_server.client(), local, bucket, "saved", ChecksumAlgorithm="CRC64NVME")
    return f"s3://{bucket}/saved", sd, (local / ".metadata").stat().st_size


def test_the_metadata_is_read_whole_and_checked(
    saved: tuple[str, dict[str, torch.Tensor], int], s3_server: S3Server, store_path: dict
) -> None:
    url, sd, size = saved
    with FaultProxy(s3_server.endpoint_url) as proxy:
        stats = asyncio.run(load(url, sd, **options(proxy.endpoint_url, **store_path)))
        (get,) = metadata_gets(proxy)  # one GET, as before
        data_gets = [r for r in proxy.requests if r.method == "GET" and r.path.endswith(".distcp")]
    assert get.range is None and get.headers.get("x-amz-checksum-mode") == "ENABLED"
    assert stats.metadata_verified is True
    assert stats.checksum_mismatches == 0
    assert stats.requests == len(data_gets) + 1  # no request added for the check
    assert stats.bytes_received >= size


def test_without_verification_nothing_is_asked_or_checked(
    saved: tuple[str, dict[str, torch.Tensor], int], s3_server: S3Server, store_path: dict
) -> None:
    url, sd, _ = saved
    with FaultProxy(s3_server.endpoint_url) as proxy:
        stats = asyncio.run(
            load(url, sd, **options(proxy.endpoint_url, verify_checksums=False, **store_path))
        )
        (get,) = metadata_gets(proxy)
    assert get.range is None and "x-amz-checksum-mode" not in get.headers
    assert stats.metadata_verified is False and stats.checksum_mismatches == 0


def test_a_byte_flipped_once_is_read_again(
    saved: tuple[str, dict[str, torch.Tensor], int], s3_server: S3Server, store_path: dict
) -> None:
    url, sd, size = saved
    with FaultProxy(s3_server.endpoint_url) as proxy:
        proxy.add(Fault.flip(size // 2), path_suffix=".metadata", times=1)
        stats = asyncio.run(load(url, sd, **options(proxy.endpoint_url, **store_path)))
        assert len(metadata_gets(proxy)) == 2
        assert len(proxy.flipped) == 1
    assert stats.metadata_verified is True
    assert stats.checksum_mismatches == 1


def test_a_byte_flipped_on_every_read_raises_naming_the_metadata(
    saved: tuple[str, dict[str, torch.Tensor], int], s3_server: S3Server, store_path: dict
) -> None:
    url, sd, size = saved
    with FaultProxy(s3_server.endpoint_url) as proxy:
        proxy.add(Fault.flip(size // 2), path_suffix=".metadata")
        with pytest.raises(aiodcp.ChecksumMismatchError) as info:
            asyncio.run(load(url, sd, **options(proxy.endpoint_url, **store_path)))
        assert len(metadata_gets(proxy)) == 2  # the first read and one more, no third
    error = info.value
    assert error.context["key"] == "saved/.metadata"
    assert "saved/.metadata" in str(error) and "CRC64NVME" in str(error)


def test_a_reader_checks_the_metadata_too(
    saved: tuple[str, dict[str, torch.Tensor], int], s3_server: S3Server
) -> None:
    """``S3StorageReader`` (``dcp.load``) reads the metadata through the same step; torch's
    ``dcp.load`` reports the failure as a ``CheckpointException`` that keeps its text."""
    import torch.distributed.checkpoint as dcp

    url, sd, size = saved
    with FaultProxy(s3_server.endpoint_url) as proxy:
        proxy.add(Fault.flip(size // 2), path_suffix=".metadata")
        reader = aiodcp.S3StorageReader(url, **options(proxy.endpoint_url))
        with reader, pytest.raises(CheckpointException) as info:
            dcp.load(zeros(sd), storage_reader=reader)
    # torch keeps only the text of a failed metadata read (then tries __0.metadata)
    assert "saved/.metadata: its bytes do not match the full-object CRC64NVME" in str(
        unwrapped(info.value)
    )
    with FaultProxy(s3_server.endpoint_url) as proxy:
        out = zeros(sd)
        with aiodcp.S3StorageReader(url, **options(proxy.endpoint_url)) as reader:
            dcp.load(out, storage_reader=reader)
    assert_same(out, sd)
    assert reader.stats is not None and reader.stats.metadata_verified is True


def test_an_aiodcp_save_on_moto_has_its_metadata_checked(
    s3_server: S3Server, bucket: str, store_path: dict
) -> None:
    """aiodcp's uploads name their algorithm (``x-amz-sdk-checksum-algorithm``) as AWS's SDKs
    do, so moto, which keeps a checksum only when it is named, keeps every object's CRC64NVME
    (a small file by one PUT, a large one by a multipart upload) and a load checks the
    ``.metadata`` against it."""
    sd = {**state(), "big": torch.arange(3 << 20, dtype=torch.float32)}  # 12 MiB: multipart
    url = f"s3://{bucket}/own"
    asyncio.run(
        aiodcp.save_checkpoint(
            copy.deepcopy(sd),
            url,
            **options(s3_server.endpoint_url, part_size=5 << 20, **store_path),
        )
    )
    client = s3_server.client()
    keys = [o["Key"] for o in client.list_objects_v2(Bucket=bucket, Prefix="own/")["Contents"]]
    assert "own/.metadata" in keys and len(keys) >= 2, keys
    for key in keys:
        head = client.head_object(Bucket=bucket, Key=key, ChecksumMode="ENABLED")
        assert head.get("ChecksumCRC64NVME"), (key, head)
    stats = asyncio.run(load(url, sd, **options(s3_server.endpoint_url, **store_path)))
    assert stats.metadata_verified is True
    assert stats.checksum_mismatches == 0 and stats.unverified_bytes == 0


def test_a_checkpoint_uploaded_without_checksums_loads_unverified(
    tmp_path: Path, s3_server: S3Server, bucket: str
) -> None:
    """torch's FileSystemWriter, uploaded by boto3 sending no checksum: moto keeps none, so
    there is nothing to check the metadata against; the load says so and goes on."""
    sd = state(8)
    local = save_checkpoint(copy.deepcopy(sd), tmp_path / "ck")
    client = boto3.client(  # sends no checksum with its uploads
        "s3",
        endpoint_url=s3_server.endpoint_url,
        region_name="us-east-1",
        config=Config(request_checksum_calculation="when_required"),
    )
    upload_dir(client, local, bucket, "bare")
    head = client.head_object(Bucket=bucket, Key="bare/.metadata", ChecksumMode="ENABLED")
    assert not [k for k in head if k.startswith("Checksum")], head  # moto holds none
    stats = asyncio.run(load(f"s3://{bucket}/bare", sd, **options(s3_server.endpoint_url)))
    assert stats.metadata_verified is False
    assert stats.checksum_mismatches == 0


@pytest.mark.parametrize("algorithm", ["CRC64NVME", "CRC32", "CRC32C", "SHA1", "SHA256"])
def test_each_algorithm_an_upload_can_carry(
    tmp_path: Path, s3_server: S3Server, bucket: str, algorithm: str
) -> None:
    """A ``.metadata`` uploaded with any of S3's checksums is checked against it (moto returns
    the one the PUT sent); a flipped byte in every read of it raises."""
    sd = state(9)
    local = save_checkpoint(copy.deepcopy(sd), tmp_path / "ck")
    put_all(s3_server.client(), local, bucket, algorithm, ChecksumAlgorithm=algorithm)
    url = f"s3://{bucket}/{algorithm}"
    size = (local / ".metadata").stat().st_size
    stats = asyncio.run(load(url, sd, **options(s3_server.endpoint_url)))
    assert stats.metadata_verified is True
    with FaultProxy(s3_server.endpoint_url) as proxy:
        proxy.add(Fault.flip(size - 1), path_suffix=".metadata")
        with pytest.raises(aiodcp.ChecksumMismatchError, match=algorithm):
            asyncio.run(load(url, sd, **options(proxy.endpoint_url)))


def test_on_the_strict_store(
    tmp_path: Path, strict_server: StrictServer, strict_bucket: str, store_path: dict
) -> None:
    """The strict store refuses an ``x-amz-*`` header the signature does not cover, and
    answers a GET without a Range that asks for it with the object's full-object checksum (a
    CRC64NVME for every object, as S3): a checkpoint uploaded with no checksum at all, and one
    aiodcp saved, are checked; a flip on every read raises."""
    sd = state(10)
    local = save_checkpoint(copy.deepcopy(sd), tmp_path / "ck")
    client = strict_server.client(config=Config(request_checksum_calculation="when_required"))
    put_all(client, local, strict_bucket, "ck")
    url = f"s3://{strict_bucket}/ck"
    saved = f"s3://{strict_bucket}/saved"
    asyncio.run(
        aiodcp.save_checkpoint(copy.deepcopy(sd), saved, **options(strict_server.endpoint_url))
    )
    for checkpoint in (url, saved):
        strict_server.clear_log()
        stats = asyncio.run(
            load(checkpoint, sd, **options(strict_server.endpoint_url, **store_path))
        )
        assert stats.metadata_verified is True
        gets = [r for r in strict_server.requests() if r["path"].endswith("/.metadata")]
        assert [(r["status"], r["range"]) for r in gets] == [(200, None)], gets
    size = (local / ".metadata").stat().st_size
    with FaultProxy(strict_server.endpoint_url) as proxy:
        proxy.add(Fault.flip(size // 3), path_suffix=".metadata")
        with pytest.raises(aiodcp.ChecksumMismatchError):
            asyncio.run(load(url, sd, **options(proxy.endpoint_url, **store_path)))
        assert len(metadata_gets(proxy)) == 2


def test_a_safetensors_index_is_checked(tmp_path: Path, s3_server: S3Server, bucket: str) -> None:
    g = torch.Generator().manual_seed(11)
    tensors = {"a": torch.randn(64, 64, generator=g), "b": torch.randn(10, generator=g)}
    save_file(tensors, str(tmp_path / "model-00001-of-00001.safetensors"))
    index = {
        "metadata": {},
        "weight_map": dict.fromkeys(tensors, "model-00001-of-00001.safetensors"),
    }
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    put_all(s3_server.client(), tmp_path, bucket, "st", ChecksumAlgorithm="CRC32C")
    url = f"s3://{bucket}/st"
    loaded = asyncio.run(aiodcp.load_safetensors(url, **options(s3_server.endpoint_url)))
    assert loaded.stats.metadata_verified is True
    for name, tensor in tensors.items():
        assert torch.equal(loaded[name], tensor)
    with FaultProxy(s3_server.endpoint_url) as proxy:
        proxy.add(Fault.flip(5), path_suffix="index.json")
        with pytest.raises(aiodcp.ChecksumMismatchError) as info:
            asyncio.run(aiodcp.load_safetensors(url, **options(proxy.endpoint_url)))
    assert info.value.context["key"] == "st/model.safetensors.index.json"
