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


def test_a_cancelled_scope_stops_its_own_calls_and_refuses_new_ones() -> None:
    """A load's scope (``driver.scope()``): cancelling it cancels its coroutines only, and work
    submitted after the cancellation is refused, so nothing a cancelled load starts later
    escapes it; another scope on the same loop and connections goes on."""
    from aiodcp import LoadCancelledError

    driver = PrivateLoopDriver(ReaderConfig(endpoint_url="http://127.0.0.1:9", unsigned=True))
    parked = threading.Event()

    async def park(store: S3Store) -> None:
        parked.set()
        await asyncio.sleep(3600)

    async def answer(store: S3Store) -> int:
        await asyncio.sleep(0.05)
        return 42

    try:
        mine, other = driver.scope(), driver.scope()
        first = mine.submit(park)
        second = other.submit(answer)
        assert parked.wait(10)
        mine.cancel()
        with pytest.raises(concurrent.futures.CancelledError):
            first.result(timeout=10)
        with pytest.raises(LoadCancelledError, match="cancelled"):
            mine.submit(answer)
        with pytest.raises(LoadCancelledError):
            mine.run(answer)
        assert second.result(timeout=10) == 42
        assert other.run(answer) == 42  # the other scope, and the driver, go on
        assert driver.run(answer) == 42
    finally:
        driver.close()
