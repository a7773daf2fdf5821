"""The private loop driver: one call cancelled alone, the others left running."""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
import time
from collections.abc import Callable, Coroutine
from typing import Any

import pytest

import aiodcp
from aiodcp import ReaderConfig
from aiodcp._driver import PrivateLoopDriver
from aiodcp._store import S3Store

from conftest import HANG_GUARD_S, eventually


async def answer(store: S3Store) -> int:
    return 42


def answer_when(go: threading.Event) -> Callable[[S3Store], Coroutine[Any, Any, int]]:
    """A call that stays in flight on the driver's loop until ``go`` is set, then answers."""

    async def answer_later(store: S3Store) -> int:
        await eventually(go.is_set, "the test's go-ahead")  # the driver's loop runs meanwhile
        return 42

    return answer_later


def _io_threads() -> set[threading.Thread]:
    return {t for t in threading.enumerate() if t.name == "aiodcp-io"}


def test_cancelling_one_call_cancels_it_alone() -> None:
    before = _io_threads()
    # No request is sent: the store is opened (a client is made) but never used.
    driver = PrivateLoopDriver(ReaderConfig(endpoint_url="http://127.0.0.1:9", unsigned=True))
    parked, saw_cancel, go = threading.Event(), threading.Event(), threading.Event()

    async def park(store: S3Store) -> None:
        parked.set()
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            saw_cancel.set()
            raise

    try:
        first = driver.submit(park)
        second = driver.submit(answer_when(go))
        assert parked.wait(HANG_GUARD_S)
        first.cancel()
        assert saw_cancel.wait(HANG_GUARD_S), "the cancelled call's coroutine was not cancelled"
        assert not second.done(), "the other call ended with the cancelled one"
        go.set()
        assert second.result(timeout=HANG_GUARD_S) == 42
        with pytest.raises(concurrent.futures.CancelledError):
            first.result(timeout=HANG_GUARD_S)
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
    parked, go = threading.Event(), threading.Event()

    async def park(store: S3Store) -> None:
        parked.set()
        await asyncio.sleep(3600)

    try:
        mine, other = driver.scope(), driver.scope()
        first = mine.submit(park)
        second = other.submit(answer_when(go))
        assert parked.wait(HANG_GUARD_S)
        mine.cancel()
        with pytest.raises(concurrent.futures.CancelledError):
            first.result(timeout=HANG_GUARD_S)
        with pytest.raises(LoadCancelledError, match="cancelled"):
            mine.submit(answer)
        with pytest.raises(LoadCancelledError):
            mine.run(answer)
        assert not second.done(), "the other scope's call ended with the cancelled scope"
        go.set()
        assert second.result(timeout=HANG_GUARD_S) == 42
        assert other.run(answer) == 42  # the other scope, and the driver, go on
        assert driver.run(answer) == 42
    finally:
        driver.close()


def test_a_wait_on_a_blocked_loop_is_bounded_and_says_what_it_waited_for() -> None:
    """Work on the driver's loop is bounded by the store's timeouts only while the loop runs:
    a loop blocked for good (a hook that never returns) must not leave the waiting thread
    waiting forever. The wait checks that the loop runs and names what it waited for."""
    config = ReaderConfig(read_timeout_s=0.2, connect_timeout_s=0.2, max_attempts=1)
    driver = PrivateLoopDriver(config)
    release = threading.Event()
    try:
        blocker = asyncio.run_coroutine_threadsafe(_block(release), driver.loop)
        work = asyncio.run_coroutine_threadsafe(asyncio.sleep(0), driver.loop)
        started = time.monotonic()
        with pytest.raises(aiodcp.AiodcpError, match="the thing this test waits for"):
            driver.wait(work, "the thing this test waits for")
        waited = time.monotonic() - started
        assert driver.quiet_limit_s == pytest.approx(0.4)
        assert waited >= driver.quiet_limit_s
        assert waited < HANG_GUARD_S, f"waited {waited:.0f} s: a hang guard, not a time bound"
    finally:
        release.set()
        blocker.result(timeout=30)
        driver.close()


async def _block(release: threading.Event) -> None:
    release.wait(30)  # blocks the loop itself, as a hook that never returns would
