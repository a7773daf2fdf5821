"""Many loads at once on one event loop: each gets exactly its own checkpoint's bytes."""

from __future__ import annotations

import asyncio
import copy
import time
from collections.abc import Iterator
from typing import Any

import pytest
import torch

import aiodcp
import aiodcp._store

from conftest import HANG_GUARD_S, S3Server, assert_same, save_checkpoint, upload_dir
from faultproxy import Fault, FaultProxy, aiodcp_threads, established_to

LOADS = 8
BUCKET = "load-bucket"


@pytest.fixture(scope="module")
def checkpoints(
    tmp_path_factory: pytest.TempPathFactory, s3_server: S3Server
) -> list[tuple[str, dict[str, Any]]]:
    """Four different checkpoints (different values, shapes and file counts)."""
    s3 = s3_server.client()
    s3.create_bucket(Bucket=BUCKET)
    result = []
    for n in range(4):
        g = torch.Generator().manual_seed(100 + n)
        sd: dict[str, Any] = {
            f"w{i}": torch.randn(16 + n, 512, generator=g) for i in range(10 + 2 * n)
        }
        sd["step"] = n
        local = tmp_path_factory.mktemp(f"load{n}") / "ck"
        save_checkpoint(copy.deepcopy(sd), local, thread_count=1 + n % 3)
        upload_dir(s3, local, BUCKET, f"ck{n}")
        result.append((f"s3://{BUCKET}/ck{n}", sd))
    return result


@pytest.fixture
def proxy(s3_server: S3Server) -> Iterator[FaultProxy]:
    with FaultProxy(s3_server.endpoint_url, seed=8) as p:
        yield p


def blank(sd: dict[str, Any]) -> dict[str, Any]:
    return {k: torch.zeros_like(v) if isinstance(v, torch.Tensor) else None for k, v in sd.items()}


async def run_loads(
    checkpoints: list[tuple[str, dict[str, Any]]], **kwargs: Any
) -> list[tuple[dict[str, Any], Any, float, float]]:
    async def one(i: int) -> tuple[dict[str, Any], Any, float, float]:
        url, sd = checkpoints[i % len(checkpoints)]
        state = blank(sd)
        started = time.perf_counter()
        stats = await aiodcp.load_checkpoint(state, url, **kwargs)
        return state, stats, started, time.perf_counter()

    # a hang guard, not a time bound
    return await asyncio.wait_for(asyncio.gather(*(one(i) for i in range(LOADS))), HANG_GUARD_S)


async def test_eight_concurrent_loads_on_one_loop(
    checkpoints: list[tuple[str, dict[str, Any]]], proxy: FaultProxy
) -> None:
    kwargs = {
        "endpoint_url": proxy.endpoint_url,
        "region": "us-east-1",
        "addressing_style": "path",
        "part_size": 128 * 1024,
    }
    results = await run_loads(checkpoints, **kwargs)
    for i, (state, stats, _, _) in enumerate(results):
        url, sd = checkpoints[i % len(checkpoints)]
        assert_same(state, sd)
        assert stats.items == len(sd), url
        assert stats.retries == 0
    # they really ran at the same time: every load started before the first one ended
    assert max(r[2] for r in results) < min(r[3] for r in results)
    assert aiodcp_threads() == []
    assert proxy.wait_idle()
    assert established_to(proxy.port) == 0


async def test_eight_concurrent_loads_with_dropped_streams(
    checkpoints: list[tuple[str, dict[str, Any]]],
    proxy: FaultProxy,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(aiodcp._store, "RETRY_BACKOFF_BASE_S", 0.01)
    proxy.add(Fault.drop(), path_suffix=".distcp", probability=0.15)
    kwargs = {
        "endpoint_url": proxy.endpoint_url,
        "region": "us-east-1",
        "addressing_style": "path",
        "part_size": 128 * 1024,
        "max_attempts": 10,
    }
    results = await run_loads(checkpoints, **kwargs)
    for i, (state, _, _, _) in enumerate(results):
        assert_same(state, checkpoints[i % len(checkpoints)][1])
    assert proxy.faults["drop"] > 0
    assert sum(r[1].retries for r in results) == proxy.faults["drop"]
    assert aiodcp_threads() == []
    assert proxy.wait_idle()
    assert established_to(proxy.port) == 0
