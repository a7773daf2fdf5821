"""The fetch engine under any layout, part size and budget, over HTTP to the test S3 server.

Parts may end inside items (the planner fills them to ``part_size``), so one item can span
several GETs and a GET can finish one item while it begins others. Whatever the mix, a consumer
that takes the items in order must get every byte right, the engine must never deadlock on its
own memory budget, and it must never reserve more than ``max(memory_budget, largest item)``.
"""

from __future__ import annotations

import asyncio
import os
import threading
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from aiodcp._config import ReaderConfig
from aiodcp._engine import FetchEngine, FileFetch
from aiodcp._planner import ItemRange, plan_file
from aiodcp._stats import StatsRecorder
from aiodcp._store import S3Store

OBJECT_BYTES = 64 * 1024
KEY = "engine/blob"


@pytest.fixture(scope="module")
def blob(s3_server: Any) -> tuple[str, bytes]:
    s3 = s3_server.client()
    bucket = "engine-budget"
    s3.create_bucket(Bucket=bucket)
    data = os.urandom(OBJECT_BYTES)
    s3.put_object(Bucket=bucket, Key=KEY, Body=data)
    return bucket, data


@st.composite
def layouts(draw: st.DrawFn) -> list[ItemRange]:
    """Sorted, non-overlapping items inside the object, with gaps of any size between."""
    ranges: list[ItemRange] = []
    offset = draw(st.integers(0, 2000))
    for _ in range(draw(st.integers(1, 14))):
        length = draw(st.one_of(st.integers(1, 600), st.integers(600, 9000)))
        if offset + length > OBJECT_BYTES:
            break
        ranges.append(ItemRange(offset, offset + length))
        offset += length + draw(st.one_of(st.just(0), st.integers(0, 3000)))
    return ranges or [ItemRange(0, 1)]


def load(bucket: str, items: list[ItemRange], config: ReaderConfig) -> tuple[list[bytes], int, int]:
    """Run the engine on a loop thread; consume in order on this thread like the decoder."""
    plan = plan_file(items, max_gap_size=config.max_gap_size, part_size=config.part_size)
    recorder = StatsRecorder()
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()

    async def open_store() -> S3Store:
        store = S3Store(config)
        await store.open()
        return store

    store = asyncio.run_coroutine_threadsafe(open_store(), loop).result(10)
    engine = FetchEngine(store, bucket, [FileFetch(KEY, plan)], config, recorder)
    future = asyncio.run_coroutine_threadsafe(engine.run(), loop)
    got: list[bytes] = []

    def consume() -> None:
        for index in range(len(plan.items)):
            buffer = engine.wait_item(0, index)
            got.append(b"".join(bytes(c) for c in buffer.chunks))
            engine.release_item(0, index)

    consumer = threading.Thread(target=consume, daemon=True)
    consumer.start()
    try:
        consumer.join(20)  # a guard against a deadlock, not a timing
        if consumer.is_alive():
            pytest.fail(f"deadlock: {len(got)} of {len(plan.items)} items after 20 s: {plan}")
        future.result(10)
    finally:
        engine.abort()
        asyncio.run_coroutine_threadsafe(store.close(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()
    return got, recorder.snapshot().peak_buffered_bytes, engine._pool.created


@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    layout=layouts(),
    part_size=st.sampled_from([1000, 4096, 7000, 16384]),
    budget=st.sampled_from([1, 3000, 9000, 20000, 10**6]),
    gap=st.sampled_from([0, 500, 4096]),
)
def test_engine_any_layout_exact_bytes_no_deadlock_within_budget(
    blob: tuple[str, bytes],
    reader_kwargs: dict[str, Any],
    layout: list[ItemRange],
    part_size: int,
    budget: int,
    gap: int,
) -> None:
    bucket, data = blob
    config = ReaderConfig(
        **reader_kwargs,
        part_size=part_size,
        memory_budget=budget,
        max_gap_size=gap,
        max_concurrency=3,
    )
    got, peak, _ = load(bucket, layout, config)
    assert got == [data[r.start : r.end] for r in layout]
    largest = max(r.length for r in layout)
    assert 0 < peak <= max(budget, largest)


@pytest.fixture(scope="module")
def big_blob(s3_server: Any) -> tuple[str, bytes]:
    s3 = s3_server.client()
    bucket = "engine-budget-blocks"
    s3.create_bucket(Bucket=bucket)
    data = os.urandom(6 * 1024 * 1024)
    s3.put_object(Bucket=bucket, Key=KEY, Body=data)
    return bucket, data


def test_budget_counts_whole_blocks(big_blob: tuple[str, bytes], reader_kwargs: dict[str, Any]):
    """Items of 600 KiB live in 1 MiB blocks: the budget must count the blocks, not the bytes,
    or 2 MiB of budget maps 3 MiB (measured with byte accounting put back)."""
    bucket, data = big_blob
    kib = 1024
    layout = [ItemRange(i * 600 * kib, (i + 1) * 600 * kib) for i in range(10)]
    budget = 2 * 1024 * kib
    config = ReaderConfig(
        **reader_kwargs, part_size=1024 * kib, memory_budget=budget, max_gap_size=0
    )
    got, peak, blocks = load(bucket, layout, config)
    assert got == [data[r.start : r.end] for r in layout]
    assert peak <= budget
    assert 0 < blocks * 1024 * kib <= budget  # the memory actually mapped
