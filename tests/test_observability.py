"""The metrics hook and logging: what users can wire to their own monitoring."""

from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed.checkpoint as dcp

import aiodcp

from conftest import S3Server, assert_same, save_checkpoint, upload_dir


@pytest.fixture
def ckpt(tmp_path: Path, s3: Any, bucket: str) -> tuple[str, dict[str, Any]]:
    sd = {f"w{i}": torch.randn(32, 32) for i in range(12)}
    local = save_checkpoint(copy.deepcopy(sd), tmp_path / "obs", thread_count=3)
    upload_dir(s3, local, bucket, "obs")
    return f"s3://{bucket}/obs", sd


def test_on_request_sees_every_data_get(
    ckpt: tuple[str, dict[str, Any]], reader_kwargs: dict[str, Any], s3_server: S3Server
) -> None:
    url, sd = ckpt
    seen: list[aiodcp.RequestMetrics] = []
    state = {k: torch.zeros_like(v) for k, v in sd.items()}
    s3_server.clear_log()
    with aiodcp.S3StorageReader(
        url, part_size=4096, on_request=seen.append, **reader_kwargs
    ) as reader:
        dcp.load(state, storage_reader=reader)
        stats = reader.stats
    assert_same(state, sd)
    assert stats is not None
    to_data = [r for r in s3_server.requests() if r["path"].endswith(".distcp")]
    data_gets = [r for r in to_data if r["method"] == "GET"]
    assert len(seen) == len(data_gets) == stats.requests - 1  # all but .metadata
    # the rest: one HEAD per data file asking for its checksum, not a data request
    heads = [r for r in to_data if r not in data_gets]
    assert {r["method"] for r in heads} == {"HEAD"}
    assert len(heads) == stats.checksum_requests == len({r["path"] for r in data_gets})
    assert sum(m.bytes_received for m in seen) == stats.bytes_requested
    for m in seen:
        assert m.error is None and m.attempt == 1
        assert m.bytes_received == m.end - m.start
        assert m.time_to_first_byte_s is not None
        assert 0 <= m.time_to_first_byte_s <= m.latency_s
        assert m.key.startswith("obs/__") and m.bucket == url.split("/")[2]


def test_a_failing_hook_does_not_break_the_load(
    ckpt: tuple[str, dict[str, Any]],
    reader_kwargs: dict[str, Any],
    caplog: pytest.LogCaptureFixture,
) -> None:
    url, sd = ckpt

    def broken(_: aiodcp.RequestMetrics) -> None:
        raise RuntimeError("metrics backend down")

    state = {k: torch.zeros_like(v) for k, v in sd.items()}
    with caplog.at_level(logging.ERROR, logger="aiodcp"):
        with aiodcp.S3StorageReader(url, on_request=broken, **reader_kwargs) as reader:
            dcp.load(state, storage_reader=reader)
    assert_same(state, sd)
    assert any("hook raised" in r.getMessage() for r in caplog.records)


def test_hook_must_be_callable() -> None:
    with pytest.raises(aiodcp.ConfigError, match="on_request"):
        aiodcp.ReaderConfig(on_request=42)  # type: ignore[arg-type]


def test_nothing_at_info_on_the_hot_path(
    ckpt: tuple[str, dict[str, Any]],
    reader_kwargs: dict[str, Any],
    caplog: pytest.LogCaptureFixture,
) -> None:
    url, sd = ckpt
    state = {k: torch.zeros_like(v) for k, v in sd.items()}
    with caplog.at_level(logging.INFO, logger="aiodcp"):
        with aiodcp.S3StorageReader(url, part_size=4096, **reader_kwargs) as reader:
            dcp.load(state, storage_reader=reader)
    ours = [r for r in caplog.records if r.name.startswith("aiodcp")]
    assert len(ours) == 1  # one summary line per load, whatever the number of requests
    assert "loaded" in ours[0].getMessage() and url in ours[0].getMessage()
