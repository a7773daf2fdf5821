"""The generic reader: any access pattern over one object, compared with io.BytesIO."""

from __future__ import annotations

import io
import random
from typing import Any

import pytest
import torch

import aiodcp


@pytest.fixture
def blob(s3: Any, bucket: str) -> tuple[str, bytes]:
    data = random.Random(7).randbytes(300_000)
    s3.put_object(Bucket=bucket, Key="blobs/data.bin", Body=data)
    return f"s3://{bucket}/blobs/data.bin", data


def test_random_access_matches_bytesio(
    blob: tuple[str, bytes], reader_kwargs: dict[str, Any]
) -> None:
    url, data = blob
    expected = io.BytesIO(data)
    rng = random.Random(1)
    with aiodcp.S3ObjectReader(url, readahead=4096, **reader_kwargs) as reader:
        assert reader.size == len(data)
        for _ in range(300):
            op = rng.choice(["read", "readinto", "seek_set", "seek_cur", "seek_end"])
            if op == "read":
                n = (
                    rng.choice([-1, 0, 1, 17, 4096, 10_000])
                    if rng.random() < 0.1
                    else rng.randrange(0, 9000)
                )
                assert reader.read(n) == expected.read(n)
            elif op == "readinto":
                a = bytearray(rng.randrange(0, 7000))
                b = bytearray(len(a))
                assert reader.readinto(a) == expected.readinto(b)
                assert a == b
            elif op == "seek_set":
                pos = rng.randrange(0, len(data) + 100)
                assert reader.seek(pos) == expected.seek(pos)
            elif op == "seek_cur":
                off = rng.randrange(-expected.tell(), 5000)
                assert reader.seek(off, io.SEEK_CUR) == expected.seek(off, io.SEEK_CUR)
            else:
                off = -rng.randrange(0, len(data))
                assert reader.seek(off, io.SEEK_END) == expected.seek(off, io.SEEK_END)
            assert reader.tell() == expected.tell()


def test_sequential_small_reads_use_one_request_per_window(
    blob: tuple[str, bytes], reader_kwargs: dict[str, Any], s3_server: Any
) -> None:
    url, data = blob
    s3_server.clear_log()
    with aiodcp.S3ObjectReader(url, readahead=100_000, **reader_kwargs) as reader:
        out = b"".join(iter(lambda: reader.read(1000), b""))
    assert out == data
    # the size: a HEAD, or in the plain case a GET of the first byte (bytes=0-0)
    gets = [r for r in s3_server.requests() if r["method"] == "GET" and r["range"] != "bytes=0-0"]
    assert len(gets) == 3  # 300,000 bytes in windows of 100,000


def test_torch_load_of_a_single_object(s3: Any, bucket: str, reader_kwargs: dict[str, Any]) -> None:
    state = {"w": torch.randn(50, 50), "step": 3}
    buf = io.BytesIO()
    torch.save(state, buf)
    s3.put_object(Bucket=bucket, Key="model.pt", Body=buf.getvalue())
    with aiodcp.S3ObjectReader(f"s3://{bucket}/model.pt", **reader_kwargs) as reader:
        loaded = torch.load(reader, weights_only=True)
    assert torch.equal(loaded["w"], state["w"]) and loaded["step"] == 3


def test_missing_object_and_bad_arguments(bucket: str, reader_kwargs: dict[str, Any]) -> None:
    with aiodcp.S3ObjectReader(f"s3://{bucket}/nope.bin", **reader_kwargs) as reader:
        with pytest.raises(aiodcp.NotFoundError, match=f"s3://{bucket}/nope.bin"):
            reader.read(10)
        with pytest.raises(aiodcp.ReaderTypeError):
            reader.read("10")  # type: ignore[arg-type]
        with pytest.raises(aiodcp.SequentialAccessError, match="whence"):
            reader.seek(0, 7)  # a ValueError too
        with pytest.raises(aiodcp.SequentialAccessError, match="negative seek position -1"):
            reader.seek(-1)
    with pytest.raises(aiodcp.InvalidPathError, match="not an object"):
        aiodcp.S3ObjectReader(f"s3://{bucket}")


def test_object_replaced_between_windows_is_detected(
    blob: tuple[str, bytes], reader_kwargs: dict[str, Any], s3: Any
) -> None:
    url, data = blob
    bucket = url.split("/")[2]
    with aiodcp.S3ObjectReader(url, readahead=1000, **reader_kwargs) as reader:
        assert reader.read(10) == data[:10]
        s3.put_object(Bucket=bucket, Key="blobs/data.bin", Body=b"x" * len(data))
        reader.seek(50_000)
        with pytest.raises(aiodcp.ObjectChangedError, match=r"blobs/data\.bin"):
            reader.read(10)
