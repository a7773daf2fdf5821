"""Faults on the wire (tests/faultproxy.py) for safetensors loads, as tests/test_faults.py does
for DCP: each load is bit-exact or raises the specific error, leaving no thread or connection
behind. Header GETs and data GETs both meet the faults."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file

import aiodcp
import aiodcp._store
from test_safetensors import assert_bits, model_tensors, save_sharded

from conftest import S3Server, upload_dir
from faultproxy import Fault, FaultProxy, assert_clean

LOAD_TIMEOUT_S = 60.0  # a hang guard: a load here takes well under a second


@pytest.fixture
def proxy(s3_server: S3Server) -> Iterator[FaultProxy]:
    with FaultProxy(s3_server.endpoint_url, seed=4321) as p:
        yield p


@pytest.fixture(autouse=True)
def fast_backoff(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(aiodcp._store, "RETRY_BACKOFF_BASE_S", 0.01, raising=False)


@pytest.fixture
def model(tmp_path: Path, s3: Any, bucket: str) -> tuple[str, dict[str, torch.Tensor], str]:
    tensors = model_tensors(7)
    upload_dir(s3, save_sharded(tensors, tmp_path / "m", 3), bucket, "m")
    return f"s3://{bucket}/m", tensors, bucket


def options(proxy: FaultProxy, **extra: Any) -> dict[str, Any]:
    return {
        "endpoint_url": proxy.endpoint_url,
        "region": "us-east-1",
        "addressing_style": "path",
        "part_size": 64 * 1024,  # several GETs per tensor: faults hit them mid-tensor
        **extra,
    }


async def load(url: str, proxy: FaultProxy, **extra: Any) -> aiodcp.LoadedTensors:
    return await asyncio.wait_for(
        aiodcp.load_safetensors(url, **options(proxy, **extra)), LOAD_TIMEOUT_S
    )


def gets(proxy: FaultProxy, suffix: str = ".safetensors") -> list[Any]:
    return [r for r in proxy.requests if r.method == "GET" and r.path.endswith(suffix)]


async def test_mid_body_drops_resume_and_load_bit_exact(
    model: tuple[str, dict[str, torch.Tensor], str], proxy: FaultProxy
) -> None:
    url, tensors, _ = model
    clean = await load(url, proxy)
    assert_bits(clean, tensors)
    proxy.clear()
    proxy.add(Fault.drop(), path_suffix=".safetensors", probability=0.3)
    loaded = await load(url, proxy, max_attempts=10)
    assert_bits(loaded, tensors)
    assert proxy.faults["drop"] > 0
    assert loaded.stats.retries == proxy.faults["drop"]
    assert loaded.stats.bytes_used == clean.stats.bytes_used
    assert_clean(proxy)


@pytest.mark.parametrize("fault", [Fault.slow_down(), Fault.internal_error()], ids=["503", "500"])
async def test_error_responses_to_header_and_data_gets_are_retried(
    fault: Fault, model: tuple[str, dict[str, torch.Tensor], str], proxy: FaultProxy
) -> None:
    url, tensors, _ = model
    proxy.add(fault, path_suffix="00002-of-00003.safetensors", times=3)  # its header GET first
    proxy.add(fault, path_suffix=".index.json", times=1)
    loaded = await load(url, proxy)
    assert_bits(loaded, tensors)
    assert proxy.faults[fault.name] == 4
    assert loaded.stats.retries >= 3
    assert_clean(proxy)


async def test_persistent_failure_of_a_header_get_raises_transfer_error(
    model: tuple[str, dict[str, torch.Tensor], str], proxy: FaultProxy
) -> None:
    url, _, bucket = model
    proxy.add(Fault.internal_error(), path_suffix="00001-of-00003.safetensors")
    with pytest.raises(aiodcp.TransferError, match=f"s3://{bucket}/m/model-00001") as info:
        await load(url, proxy, max_attempts=3)
    assert info.value.attempts == 3
    assert_clean(proxy)


async def test_a_file_replaced_after_its_header_was_read_raises_object_changed(
    tmp_path: Path, s3: Any, bucket: str, proxy: FaultProxy
) -> None:
    """Every data GET is pinned to the ETag the header was read from: a file replaced in
    between (same layout, other values: it would decode fine) is never mixed in."""
    tensors = {"w": torch.randn(256, 256)}
    local = tmp_path / "r"
    local.mkdir()
    save_file(tensors, str(local / "model.safetensors"))
    upload_dir(s3, local, bucket, "r")
    key = "r/model.safetensors"
    release = threading.Event()
    rule = proxy.add(Fault.stall(60.0, release=release), path_suffix=key, nth=[2])
    # one GET at a time: the stalled one (the first data GET) is the one the store refuses
    task = asyncio.create_task(load(f"s3://{bucket}/r", proxy, max_concurrency=1))
    try:
        assert await asyncio.to_thread(rule.triggered.wait, 30)
        save_file({"w": tensors["w"] + 1}, str(local / "v2.safetensors"))
        body = (local / "v2.safetensors").read_bytes()
        await asyncio.to_thread(s3.put_object, Bucket=bucket, Key=key, Body=body)
    finally:
        release.set()
    with pytest.raises(aiodcp.ObjectChangedError, match=f"s3://{bucket}/{key}"):
        await task
    requests = gets(proxy)
    assert requests[0].if_match is None  # the header read
    assert requests[1].if_match  # the data GET, pinned to the header's ETag

    # The proxy records a status once it has written the response, which the client can
    # act on first: wait for the record (a hang guard, not a timing assumption).
    def recorded() -> int | None:
        deadline = time.monotonic() + 30
        while (status := proxy.status_of(requests[1])) is None and time.monotonic() < deadline:
            time.sleep(0.01)
        return status

    assert await asyncio.to_thread(recorded) == 412
    assert_clean(proxy)


async def test_cancelling_a_load_stalled_in_its_header_gets_leaves_nothing_behind(
    model: tuple[str, dict[str, torch.Tensor], str], proxy: FaultProxy
) -> None:
    url, _, _ = model
    release = threading.Event()
    rule = proxy.add(Fault.stall(60.0, release=release), path_suffix=".safetensors")
    task = asyncio.create_task(load(url, proxy))
    try:
        assert await asyncio.to_thread(rule.triggered.wait, 30)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    finally:
        release.set()
    assert_clean(proxy)
