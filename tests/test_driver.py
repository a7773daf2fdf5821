"""The private loop driver: one call cancelled alone, the others left running."""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading

import pytest

from aiodcp import ReaderConfig
from aiodcp._driver import PrivateLoopDriver
from aiodcp._store import S3Store


def _io_threads() -> set[threading.Thread]:
    return {t for t in threading.enumerate() if t.name == "aiodcp-io"}


def test_cancelling_one_call_cancels_it_alone() -> None:
    before = _io_threads()
    # No request is sent: the store is opened (a client is made) but never used.
    driver = PrivateLoopDriver(ReaderConfig(endpoint_url="http://127.0.0.1:9", unsigned=True))
    parked = threading.Event()
    saw_cancel = threading.Event()

    async def park(store: S3Store) -> None:
        parked.set()
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            saw_cancel.set()
            raise

    async def answer(store: S3Store) -> int:
        await asyncio.sleep(0.05)
        return 42

    try:
        first = driver.submit(park)
        second = driver.submit(answer)
        assert parked.wait(10)
        first.cancel()
        assert saw_cancel.wait(10), "the cancelled call's coroutine was not cancelled"
        assert second.result(timeout=10) == 42
        with pytest.raises(concurrent.futures.CancelledError):
            first.result(timeout=10)
        assert driver.run(answer) == 42  # the driver goes on serving
    finally:
        driver.close()
    assert _io_threads() <= before  # the driver's thread is gone
