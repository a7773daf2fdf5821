"""load_checkpoint from the caller's loop: responsiveness, cancellation, cleanup."""

from __future__ import annotations

import asyncio
import copy
import gc
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest
import torch

import aiodcp

from conftest import S3Server, assert_same, save_checkpoint, upload_dir
from faultproxy import Fault, FaultProxy, ProxyRequest, aiodcp_threads, established_to


@pytest.fixture(scope="module")
def big_checkpoint(
    tmp_path_factory: pytest.TempPathFactory, s3_server: S3Server
) -> tuple[str, dict[str, Any]]:
    """~48 MiB in 4 files, 96 tensors of 0.5 MiB."""
    g = torch.Generator().manual_seed(3)
    sd = {f"layer{i:03d}": torch.randn(128, 1024, generator=g) for i in range(96)}
    local = tmp_path_factory.mktemp("big") / "ck"
    save_checkpoint(copy.deepcopy(sd), local, thread_count=4)
    s3 = s3_server.client()
    s3.create_bucket(Bucket="big-bucket")
    upload_dir(s3, local, "big-bucket", "ck")
    return "s3://big-bucket/ck", sd


async def test_event_loop_stays_responsive(
    big_checkpoint: tuple[str, dict[str, Any]], reader_kwargs: dict[str, Any]
) -> None:
    url, sd = big_checkpoint
    lags: list[float] = []
    stop = asyncio.Event()
    pauses: list[float] = []  # garbage collections during the load, which stop every thread
    started = [0.0]

    def collecting(phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            started[0] = time.perf_counter()
        else:
            pauses.append(time.perf_counter() - started[0])

    async def heartbeat() -> None:
        while not stop.is_set():
            before = time.perf_counter()
            await asyncio.sleep(0.001)
            lags.append(time.perf_counter() - before - 0.001)

    state = {k: torch.zeros_like(v) for k, v in sd.items()}
    # A full collection of the whole test session's heap (every collected test module, torch)
    # costs ~0.2-0.3 s whenever it falls due; pay that debt before measuring, so the lag
    # measured is the load's, not the order of the suite's allocations.
    gc.collect()
    gc.callbacks.append(collecting)
    try:
        beat = asyncio.create_task(heartbeat())
        stats = await aiodcp.load_checkpoint(state, url, **reader_kwargs)
        stop.set()
        await beat
    finally:
        gc.callbacks.remove(collecting)
    assert_same(state, sd)
    assert stats.files == 4 and stats.items == 96
    assert len(lags) > 10, "the heartbeat barely ran: the loop was blocked"
    assert max(lags) < 0.100, (
        f"event loop lagged {max(lags) * 1000:.0f} ms (longest garbage collection during the "
        f"load: {max(pauses, default=0.0) * 1000:.0f} ms)"
    )


async def test_requests_run_on_aiodcp_io_thread_not_the_callers_loop(
    big_checkpoint: tuple[str, dict[str, Any]], reader_kwargs: dict[str, Any]
) -> None:
    """The caller's loop only awaits: every request's hook runs on aiodcp's I/O thread, so a
    busy receive loop (GIL hand-overs on every recv_into) cannot hold up the caller's tasks."""
    import threading

    url, sd = big_checkpoint
    threads: set[str] = set()
    state = {k: torch.zeros_like(v) for k, v in list(sd.items())[:20]}
    stats = await aiodcp.load_checkpoint(
        state,
        url,
        on_request=lambda metrics: threads.add(threading.current_thread().name),
        **reader_kwargs,
    )
    assert_same(state, {k: sd[k] for k in state})
    assert stats.requests > 1
    assert threads == {"aiodcp-io"}, threads
    assert threading.current_thread().name not in threads
    assert aiodcp_threads() == []


async def test_cancel_stops_everything_promptly(
    big_checkpoint: tuple[str, dict[str, Any]],
    reader_kwargs: dict[str, Any],
    s3_server: S3Server,
) -> None:
    url, sd = big_checkpoint
    port = int(s3_server.endpoint_url.rsplit(":", 1)[1])
    state = {k: torch.zeros_like(v) for k, v in sd.items()}
    # Many small parts, one at a time: the load takes long enough to be cancelled mid-stream.
    task = asyncio.create_task(
        aiodcp.load_checkpoint(state, url, part_size=64 * 1024, max_concurrency=2, **reader_kwargs)
    )
    s3_server.clear_log()
    deadline = time.monotonic() + 20
    while len(s3_server.requests()) < 5 and time.monotonic() < deadline:  # noqa: ASYNC110
        await asyncio.sleep(0.02)
    assert not task.done(), "the load finished before it could be cancelled"
    started = time.perf_counter()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    elapsed = time.perf_counter() - started
    assert elapsed < 2.0, f"cancellation took {elapsed:.2f} s"
    seen = len(s3_server.requests())
    await asyncio.sleep(0.5)
    assert len(s3_server.requests()) <= seen + 2, "requests kept being sent after cancel"
    assert aiodcp_threads() == []
    others = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
    assert others == []
    assert established_to(port) == 0


async def test_cancel_while_torch_plans_stops_the_load_before_it_fetches(
    big_checkpoint: tuple[str, dict[str, Any]], reader_kwargs: dict[str, Any]
) -> None:
    """Cancelled after its .metadata GET, while dcp.load is still planning (no request in
    flight, no engine yet): the load's session refuses the work it would start next, so no
    data is fetched and the task ends as soon as planning returns."""
    from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner

    url, sd = big_checkpoint
    planning, release = threading.Event(), threading.Event()

    class Parked(DefaultLoadPlanner):
        def create_local_plan(self) -> Any:
            planning.set()
            release.wait(30)
            return super().create_local_plan()

    keys: list[str] = []
    state = {k: torch.zeros_like(v) for k, v in sd.items()}
    task = asyncio.create_task(
        aiodcp.load_checkpoint(
            state, url, planner=Parked(), on_request=lambda m: keys.append(m.key), **reader_kwargs
        )
    )
    try:
        assert await asyncio.to_thread(planning.wait, 30), "planning never started"
        task.cancel()
        await asyncio.sleep(0.05)
        release.set()
        started = time.perf_counter()
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(task, 30)
        elapsed = time.perf_counter() - started
    finally:
        release.set()
        if not task.done():
            task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    assert [k for k in keys if k.endswith(".distcp")] == []
    assert not any(torch.equal(state[k], sd[k]) for k in sd)
    assert elapsed < 10.0
    assert aiodcp_threads() == []


async def test_no_connections_or_threads_left_after_a_load(
    big_checkpoint: tuple[str, dict[str, Any]],
    reader_kwargs: dict[str, Any],
    s3_server: S3Server,
) -> None:
    url, sd = big_checkpoint
    port = int(s3_server.endpoint_url.rsplit(":", 1)[1])
    state = {k: torch.zeros_like(v) for k, v in list(sd.items())[:10]}
    await aiodcp.load_checkpoint(state, url, **reader_kwargs)
    assert_same(state, {k: sd[k] for k in state})
    assert aiodcp_threads() == []
    assert established_to(port) == 0


def test_sync_reader_close_releases_thread_and_connections(
    big_checkpoint: tuple[str, dict[str, Any]],
    reader_kwargs: dict[str, Any],
    s3_server: S3Server,
) -> None:
    import torch.distributed.checkpoint as dcp

    url, sd = big_checkpoint
    port = int(s3_server.endpoint_url.rsplit(":", 1)[1])
    state = {k: torch.zeros_like(v) for k, v in list(sd.items())[:10]}
    reader = aiodcp.S3StorageReader(url, **reader_kwargs)
    dcp.load(state, storage_reader=reader)
    assert "aiodcp-io" in aiodcp_threads()
    reader.close()
    assert aiodcp_threads() == []
    assert established_to(port) == 0
    assert_same(state, {k: sd[k] for k in state})


@pytest.fixture(scope="module")
def two_checkpoints(
    tmp_path_factory: pytest.TempPathFactory, s3_server: S3Server
) -> dict[str, tuple[str, dict[str, Any]]]:
    """Two small checkpoints, "a" and "b", with different tensors."""
    s3 = s3_server.client()
    s3.create_bucket(Bucket="pair-bucket")
    out = {}
    for seed, name in enumerate(("a", "b")):
        g = torch.Generator().manual_seed(20 + seed)
        sd = {f"{name}{i}": torch.randn(64, 256, generator=g) for i in range(6)}
        local = tmp_path_factory.mktemp(f"pair-{name}") / "ck"
        save_checkpoint(copy.deepcopy(sd), local, thread_count=2)
        upload_dir(s3, local, "pair-bucket", name)
        out[name] = (f"s3://pair-bucket/{name}", sd)
    return out


async def test_cancelling_one_load_leaves_a_concurrent_one_alone(
    two_checkpoints: dict[str, tuple[str, dict[str, Any]]], s3_server: S3Server
) -> None:
    """Two load_checkpoint calls sharing nothing, each with a GET held by the proxy: the one
    cancelled raises CancelledError promptly, the other completes with the right tensors."""
    (url_a, sd_a), (url_b, sd_b) = two_checkpoints["a"], two_checkpoints["b"]

    def data_of(prefix: str) -> Callable[[ProxyRequest], bool]:
        def matches(request: ProxyRequest) -> bool:
            path = request.path
            return path.startswith(f"/pair-bucket/{prefix}/") and path.endswith(".distcp")

        return matches

    hold_a, hold_b = threading.Event(), threading.Event()
    with FaultProxy(s3_server.endpoint_url, seed=3) as proxy:
        options = {
            "endpoint_url": proxy.endpoint_url,
            "region": "us-east-1",
            "addressing_style": "path",
        }
        held_a = proxy.add(Fault.stall(60, release=hold_a), predicate=data_of("a"))
        held_b = proxy.add(Fault.stall(60, release=hold_b), predicate=data_of("b"), times=1)
        state_a = {k: torch.zeros_like(v) for k, v in sd_a.items()}
        state_b = {k: torch.zeros_like(v) for k, v in sd_b.items()}
        task_a = asyncio.create_task(aiodcp.load_checkpoint(state_a, url_a, **options))
        task_b = asyncio.create_task(aiodcp.load_checkpoint(state_b, url_b, **options))
        try:
            for rule in (held_a, held_b):
                assert await asyncio.to_thread(rule.triggered.wait, 30), "no GET was held"
            started = time.perf_counter()
            task_a.cancel()
            with pytest.raises(asyncio.CancelledError):
                await asyncio.wait_for(task_a, 30)
            elapsed = time.perf_counter() - started
            assert not task_b.done(), "the other load ended with the cancelled one"
            hold_b.set()
            stats_b = await asyncio.wait_for(task_b, 30)
        finally:
            hold_a.set()
            hold_b.set()
            for task in (task_a, task_b):
                if not task.done():
                    task.cancel()
            await asyncio.gather(task_a, task_b, return_exceptions=True)
        assert elapsed < 30.0
        assert_same(state_b, sd_b)
        assert stats_b.items == len(sd_b)
        assert not any(torch.equal(state_a[k], sd_a[k]) for k in sd_a)  # A was held throughout
        assert aiodcp_threads() == []
        assert [t for t in asyncio.all_tasks() if t is not asyncio.current_task()] == []
        assert proxy.wait_idle(5.0), f"{proxy.open_connections} connections left open"
        assert established_to(proxy.port) == 0


def test_without_an_asyncio_loop_it_says_so_and_starts_nothing(
    reader_kwargs: dict[str, Any],
) -> None:
    """Driven by a runner that is not asyncio (what trio does: ``send(None)`` with no asyncio
    loop running), ``load_checkpoint`` raises an aiodcp error saying what to do, before any
    thread or connection exists."""
    before = aiodcp_threads()
    coro = aiodcp.load_checkpoint({}, "s3://bucket/ckpt", **reader_kwargs)
    with pytest.raises(aiodcp.AiodcpError, match=r"asyncio event loop.*trio\.to_thread"):
        coro.send(None)
    assert aiodcp_threads() == before
