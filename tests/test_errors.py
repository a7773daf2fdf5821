"""Bad input and store errors: specific classes, bucket and key in the message, no hang."""

from __future__ import annotations

import copy
import pickle
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException

import aiodcp

from conftest import save_checkpoint, upload_dir


@pytest.fixture
def uploaded(tmp_path: Path, s3: Any, bucket: str) -> tuple[str, Path]:
    sd = {"w": torch.randn(32, 32), "b": torch.randn(32), "step": 5}
    local = save_checkpoint(copy.deepcopy(sd), tmp_path / "ck")
    upload_dir(s3, local, bucket, "ck")
    return bucket, local


@pytest.mark.parametrize(
    "path",
    [
        "bucket/ckpt",
        "s3:/bucket",
        "s3://",
        "s3://a",
        "s3://bad_bucket!/x",
        "s3://b/../x",
        "file:///tmp/x",
        "s3://bucket//x",
    ],
)
def test_malformed_path(path: str) -> None:
    with pytest.raises(aiodcp.InvalidPathError, match="s3://bucket") as info:
        aiodcp.S3StorageReader(path)
    assert isinstance(info.value, ValueError)
    assert aiodcp.S3StorageReader.validate_checkpoint_id(path) is False


def test_validate_checkpoint_id_accepts_s3_urls() -> None:
    assert aiodcp.S3StorageReader.validate_checkpoint_id("s3://bucket")
    assert aiodcp.S3StorageReader.validate_checkpoint_id("s3://bucket/a/b/")
    assert not aiodcp.S3StorageReader.validate_checkpoint_id("/local/dir")


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("max_gap_size", -1),
        ("part_size", 0),
        ("max_concurrency", 0),
        ("memory_budget", -5),
        ("max_concurrency", 10**9),
        ("max_attempts", 0),
        ("read_timeout_s", float("nan")),
        ("addressing_style", "sideways"),
        ("endpoint_url", "localhost:9000"),
    ],
)
def test_bad_configuration(option: str, value: Any) -> None:
    with pytest.raises(aiodcp.ConfigError, match=option) as info:
        aiodcp.S3StorageReader("s3://bucket/x", **{option: value})
    assert isinstance(info.value, ValueError)


def test_unknown_option_is_named() -> None:
    with pytest.raises(aiodcp.ConfigError, match="max_gapsize"):
        aiodcp.S3StorageReader("s3://bucket/x", max_gapsize=3)


async def test_missing_checkpoint(bucket: str, reader_kwargs: dict[str, Any]) -> None:
    with pytest.raises(aiodcp.NotFoundError, match=f"s3://{bucket}/nope/.metadata") as info:
        await aiodcp.load_checkpoint({"w": torch.zeros(1)}, f"s3://{bucket}/nope", **reader_kwargs)
    assert isinstance(info.value, FileNotFoundError)
    assert info.value.bucket == bucket and info.value.key == "nope/.metadata"


def test_missing_checkpoint_through_dcp_load(bucket: str, reader_kwargs: dict[str, Any]) -> None:
    reader = aiodcp.S3StorageReader(f"s3://{bucket}/nope", **reader_kwargs)
    with reader, pytest.raises((CheckpointException, AssertionError, aiodcp.NotFoundError)) as info:
        dcp.load({"w": torch.zeros(1)}, storage_reader=reader)
    # torch may keep only the text of our error: it must carry bucket, key and the cause.
    assert f"s3://{bucket}/nope/.metadata" in str(info.value)
    assert "does not exist" in str(info.value)


async def test_no_such_bucket(reader_kwargs: dict[str, Any]) -> None:
    with pytest.raises(aiodcp.NoSuchBucketError, match="no-such-bucket-xyz") as info:
        await aiodcp.load_checkpoint(
            {"w": torch.zeros(1)}, "s3://no-such-bucket-xyz/ck", **reader_kwargs
        )
    assert isinstance(info.value, FileNotFoundError)


async def test_metadata_not_a_pickle(s3: Any, bucket: str, reader_kwargs: dict[str, Any]) -> None:
    s3.put_object(Bucket=bucket, Key="junk/.metadata", Body=b"this is not a pickle")
    with pytest.raises(aiodcp.CheckpointFormatError, match=f"s3://{bucket}/junk/.metadata"):
        await aiodcp.load_checkpoint({"w": torch.zeros(1)}, f"s3://{bucket}/junk", **reader_kwargs)


async def test_malicious_metadata_does_not_run_code(
    s3: Any, bucket: str, reader_kwargs: dict[str, Any], tmp_path: Path
) -> None:
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self) -> Any:
            return (Path.touch, (marker,))

    s3.put_object(Bucket=bucket, Key="evil/.metadata", Body=pickle.dumps(Exploit()))
    with pytest.raises(aiodcp.CheckpointFormatError, match="refusing"):
        await aiodcp.load_checkpoint({"w": torch.zeros(1)}, f"s3://{bucket}/evil", **reader_kwargs)
    assert not marker.exists()


async def test_truncated_data_file(
    uploaded: tuple[str, Path], s3: Any, reader_kwargs: dict[str, Any]
) -> None:
    bucket, local = uploaded
    data_file = next(p for p in local.iterdir() if p.suffix == ".distcp")
    body = data_file.read_bytes()
    s3.put_object(Bucket=bucket, Key=f"ck/{data_file.name}", Body=body[: len(body) - 100])
    template = {"w": torch.zeros(32, 32), "b": torch.zeros(32), "step": 0}
    with pytest.raises(aiodcp.TruncatedObjectError, match=f"s3://{bucket}/ck/{data_file.name}"):
        await aiodcp.load_checkpoint(template, f"s3://{bucket}/ck", **reader_kwargs)


async def test_missing_key_is_reported_like_dcp_load(
    uploaded: tuple[str, Path], reader_kwargs: dict[str, Any]
) -> None:
    bucket, _ = uploaded
    with pytest.raises(RuntimeError, match="not_there"):
        await aiodcp.load_checkpoint(
            {"w": torch.zeros(32, 32), "not_there": torch.zeros(1)},
            f"s3://{bucket}/ck",
            **reader_kwargs,
        )


def test_no_credentials(
    uploaded: tuple[str, Path],
    reader_kwargs: dict[str, Any],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    bucket, _ = uploaded
    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    import asyncio

    with pytest.raises(aiodcp.NoCredentialsError, match="unsigned=True"):
        asyncio.run(
            aiodcp.load_checkpoint({"w": torch.zeros(32, 32)}, f"s3://{bucket}/ck", **reader_kwargs)
        )


class _Forbidden(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        body = (
            b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>AccessDenied</Code>'
            b"<Message>Access Denied</Message></Error>"
        )
        self.send_response(403)
        self.send_header("Content-Type", "application/xml")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def forbidding_server() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Forbidden)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


async def test_access_denied(forbidding_server: str) -> None:
    with pytest.raises(aiodcp.AccessDeniedError, match=r"s3://secret/ck/\.metadata") as info:
        await aiodcp.load_checkpoint(
            {"w": torch.zeros(1)},
            "s3://secret/ck",
            endpoint_url=forbidding_server,
            addressing_style="path",
        )
    assert isinstance(info.value, PermissionError)


def test_errors_pickle() -> None:
    error = aiodcp.NotFoundError("s3://b/k does not exist", bucket="b", key="k")
    clone = pickle.loads(pickle.dumps(error))
    assert type(clone) is aiodcp.NotFoundError
    assert str(clone) == str(error) and clone.bucket == "b" and clone.key == "k"
