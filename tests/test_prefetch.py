"""prefetch: background download, loads that reuse it, no byte fetched twice; cancelling a
load on the handle cancels that load only (tests/faultproxy.py holds a GET so the cancel lands
mid-download)."""

from __future__ import annotations

import asyncio
import concurrent.futures
import copy
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

import aiodcp

from conftest import (
    HANG_GUARD_S,
    S3Server,
    assert_same,
    eventually,
    innermost_coroutine,
    save_checkpoint,
    thread_inside,
    upload_dir,
    wait_until,
)
from faultproxy import Fault, FaultProxy, assert_clean


@pytest.fixture
def ckpt(tmp_path: Path, s3: Any, bucket: str) -> tuple[str, dict[str, Any]]:
    g = torch.Generator().manual_seed(5)
    sd = {
        "model": {f"l{i}": torch.randn(64, 64, generator=g) for i in range(8)},
        "optim": {"step": 10, "lr": torch.tensor(0.1)},
        "extra": torch.arange(100),
    }
    local = save_checkpoint(copy.deepcopy(sd), tmp_path / "ck", thread_count=2)
    upload_dir(s3, local, bucket, "pf")
    return f"s3://{bucket}/pf", sd


def blank(sd: dict[str, Any]) -> dict[str, Any]:
    return {
        "model": {k: torch.zeros_like(v) for k, v in sd["model"].items()},
        "optim": {"step": 0, "lr": torch.tensor(0.0)},
        "extra": torch.zeros_like(sd["extra"]),
    }


def data_bytes(server: S3Server) -> list[tuple[str, int, int]]:
    out = []
    for req in server.requests():
        if req["method"] == "GET" and req["path"].endswith(".distcp"):
            first, last = req["range"].removeprefix("bytes=").split("-")
            out.append((req["path"], int(first), int(last) + 1))
    return out


def test_load_after_completed_prefetch_makes_zero_requests(
    ckpt: tuple[str, dict[str, Any]], reader_kwargs: dict[str, Any], s3_server: S3Server
) -> None:
    url, sd = ckpt
    handle = aiodcp.prefetch(url, progress=False, **reader_kwargs)
    stats = handle.wait(timeout=60)
    assert stats.bytes_used > 0 and handle.done()
    s3_server.clear_log()
    state = blank(sd)
    handle.load(state)
    assert s3_server.requests() == []
    assert_same(state, sd)
    handle.close()


def test_load_during_prefetch_fetches_nothing_twice(
    ckpt: tuple[str, dict[str, Any]], reader_kwargs: dict[str, Any], s3_server: S3Server
) -> None:
    url, sd = ckpt
    s3_server.clear_log()
    # Prefetch only the model, with tiny parts so it is still running when the load starts.
    with aiodcp.prefetch(
        url, keys=["model"], progress=False, part_size=1024, max_concurrency=1, **reader_kwargs
    ) as handle:
        state = blank(sd)
        handle.load(state)
    assert_same(state, sd)
    seen: set[tuple[str, int]] = set()
    for path, lo, hi in data_bytes(s3_server):
        for b in range(lo, hi):
            assert (path, b) not in seen, f"{path} byte {b} fetched twice"
            seen.add((path, b))
    metadata_gets = [r for r in s3_server.requests() if r["path"].endswith(".metadata")]
    assert len(metadata_gets) == 1


async def test_await_handle_and_aload(
    ckpt: tuple[str, dict[str, Any]], reader_kwargs: dict[str, Any]
) -> None:
    url, sd = ckpt
    handle = aiodcp.prefetch(url, keys=["model", "extra"], progress=False, **reader_kwargs)
    stats = await handle
    assert stats.items >= 9
    state = blank(sd)
    await handle.aload(state)
    assert_same(state, sd)
    handle.close()


def test_cancel_frees_and_later_load_fetches_itself(
    ckpt: tuple[str, dict[str, Any]], reader_kwargs: dict[str, Any]
) -> None:
    url, sd = ckpt
    handle = aiodcp.prefetch(
        url, progress=False, part_size=1024, max_concurrency=1, **reader_kwargs
    )
    handle.cancel()
    assert handle._engine is None  # buffers dropped
    with pytest.raises((asyncio.CancelledError, concurrent.futures.CancelledError)):
        handle.wait(timeout=30)
    state = blank(sd)
    stats = handle.load(state)  # nothing prefetched any more: the load fetches it all itself
    assert_same(state, sd)
    assert stats.bytes_used > 0
    handle.close()


def test_unknown_key_is_reported(
    ckpt: tuple[str, dict[str, Any]], reader_kwargs: dict[str, Any]
) -> None:
    url, _ = ckpt
    with aiodcp.prefetch(url, keys=["modle"], progress=False, **reader_kwargs) as handle:
        with pytest.raises(aiodcp.ConfigError, match="modle") as info:
            handle.wait(timeout=30)
    # The same key selection as `aiodcp plan --keys`: close matches are named.
    assert "'modle' (did you mean 'model'" in str(info.value)
    with pytest.raises(aiodcp.ConfigError, match="list"):
        aiodcp.prefetch(url, keys="model")  # type: ignore[arg-type]


def test_progress_bar_is_shown(
    ckpt: tuple[str, dict[str, Any]],
    reader_kwargs: dict[str, Any],
    capsys: pytest.CaptureFixture[str],
) -> None:
    url, sd = ckpt
    with aiodcp.prefetch(url, progress=True, **reader_kwargs) as handle:
        handle.wait(timeout=60)
    err = capsys.readouterr().err
    assert "prefetch s3://" in err and "100%" in err
    import torch.distributed.checkpoint as dcp

    state = blank(sd)
    with aiodcp.S3StorageReader(url, progress=True, **reader_kwargs) as reader:
        dcp.load(state, storage_reader=reader)
    assert "aiodcp s3://" in capsys.readouterr().err
    assert_same(state, sd)


# --------------------------------------------------------------------------- cancelled loads


@pytest.fixture
def proxy(s3_server: S3Server) -> Iterator[FaultProxy]:
    with FaultProxy(s3_server.endpoint_url, seed=7) as p:
        yield p


def through(proxy: FaultProxy) -> dict[str, Any]:
    return {"endpoint_url": proxy.endpoint_url, "region": "us-east-1", "addressing_style": "path"}


async def wait_for_event(event: threading.Event) -> None:
    assert await asyncio.to_thread(event.wait, HANG_GUARD_S), "the held request never came"


def waits_for_held(held: str, work: asyncio.Future[Any], how: str) -> Callable[[], bool]:
    """Whether a load (``work``: an ``aload`` task, or ``load`` in a thread) now waits for the
    prefetch's held GET: for data, its thread blocked in the engine's ``wait_item``; for
    ``.metadata``, an ``aload`` suspended on the handle's metadata future (in ``aload`` itself,
    before any thread) or a ``load``'s thread in ``_session`` (the driver's wait for it)."""
    if held == "data":
        return lambda: thread_inside("wait_item")
    if how == "aload":
        return lambda: innermost_coroutine(work) == "aload"  # type: ignore[arg-type]
    return lambda: thread_inside("_session")


async def gather_result(task: asyncio.Future[Any]) -> Any:
    """The task's result; a bare CancelledError (the bug) becomes a test failure."""
    try:
        return await asyncio.wait_for(task, HANG_GUARD_S)
    except (asyncio.CancelledError, concurrent.futures.CancelledError) as exc:
        pytest.fail(f"raised a bare {type(exc).__module__}.{type(exc).__name__}")


@pytest.mark.parametrize("second", ["load", "aload"])
@pytest.mark.parametrize("held", ["data", "metadata"])
async def test_cancelled_aload_leaves_the_prefetch_to_later_loads(
    held: str,
    second: str,
    ckpt: tuple[str, dict[str, Any]],
    s3_server: S3Server,
    proxy: FaultProxy,
) -> None:
    """aload cancelled while the prefetch's GET (of data, or of .metadata) is held: the
    download goes on, and a later load/aload gets exactly the saved tensors from it, every
    byte fetched once."""
    url, sd = ckpt
    release = threading.Event()
    suffix = ".distcp" if held == "data" else "/.metadata"
    rule = proxy.add(Fault.stall(60, release=release), path_suffix=suffix, times=1)
    s3_server.clear_log()
    handle = aiodcp.prefetch(url, progress=False, **through(proxy))
    try:
        await wait_for_event(rule.triggered)
        task = asyncio.create_task(handle.aload(blank(sd)))
        await eventually(waits_for_held(held, task, "aload"), "the aload waiting for the held GET")
        assert not task.done()
        task.cancel()
        # The GET is still held: only the cancel can end the aload (the guard is a hang guard).
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(task, HANG_GUARD_S)
        assert not handle.done(), "cancelling the aload stopped the prefetch"

        state = blank(sd)
        later: asyncio.Future[Any]
        if second == "aload":
            later = asyncio.ensure_future(handle.aload(state))
        else:
            later = asyncio.ensure_future(asyncio.to_thread(handle.load, state))
        await eventually(waits_for_held(held, later, second), f"the later {second} waiting")
        assert not later.done(), "the later load did not wait for the held download"
        release.set()
        stats = await gather_result(later)
    finally:
        release.set()
        handle.close()
    assert_same(state, sd)
    assert stats.requests == 0  # everything came from the prefetch
    # The held GET was answered, not abandoned: every request reached the server once, and
    # no byte was requested twice.
    assert len(proxy.requests) == len(s3_server.requests())
    seen: set[tuple[str, int]] = set()
    for path, lo, hi in data_bytes(s3_server):
        for b in range(lo, hi):
            assert (path, b) not in seen, f"{path} byte {b} fetched twice"
            seen.add((path, b))
    metadata_gets = [r for r in s3_server.requests() if r["path"].endswith(".metadata")]
    assert len(metadata_gets) == 1
    assert_clean(proxy)


async def test_cancelled_await_of_the_handle_leaves_the_download_running(
    ckpt: tuple[str, dict[str, Any]], s3_server: S3Server, proxy: FaultProxy
) -> None:
    url, sd = ckpt
    release = threading.Event()
    rule = proxy.add(Fault.stall(60, release=release), path_suffix=".distcp", times=1)
    handle = aiodcp.prefetch(url, progress=False, **through(proxy))

    async def wait() -> aiodcp.LoadStats:
        return await handle

    try:
        await wait_for_event(rule.triggered)
        waiter = asyncio.create_task(wait())
        # suspended on the handle (its __await__ is a future's, below this coroutine)
        await eventually(lambda: innermost_coroutine(waiter) == "wait", "the await of the handle")
        waiter.cancel()
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(waiter, HANG_GUARD_S)
        assert not handle.done()
        release.set()
        stats = await gather_result(asyncio.ensure_future(wait()))
        assert stats.bytes_used > 0
        state = blank(sd)
        assert (await handle.aload(state)).requests == 0
    finally:
        release.set()
        handle.close()
    assert_same(state, sd)
    assert_clean(proxy)


async def test_close_during_an_aload_stops_everything(
    ckpt: tuple[str, dict[str, Any]], proxy: FaultProxy
) -> None:
    """close() while an aload waits for a held GET: the aload raises LoadCancelledError (not
    a bare CancelledError), and no thread, task or connection is left."""
    url, sd = ckpt
    release = threading.Event()
    rule = proxy.add(Fault.stall(60, release=release), path_suffix=".distcp")
    handle = aiodcp.prefetch(url, progress=False, **through(proxy))
    try:
        await wait_for_event(rule.triggered)
        task = asyncio.create_task(handle.aload(blank(sd)))
        await eventually(waits_for_held("data", task, "aload"), "the aload waiting for the GET")
        assert not task.done()
        await asyncio.to_thread(handle.close)
        with pytest.raises(aiodcp.LoadCancelledError, match="prefetch was cancelled"):
            await gather_result(task)
    finally:
        release.set()
        handle.close()
    assert_clean(proxy)


# --------------------------------------------------------------------------- every order
# A cancelled load cancels only itself, in every order of: the cancel, the prefetch's download
# completing, and a later load through the same handle (issue 20). The store is slow and held by
# the test (every data GET waits at the proxy until released), so each order is exact, not a race;
# items of 600 KiB and 2.5 MiB hold whole 1 MiB blocks (a prefetch once stopped for good on
# those: its budget counted their bytes, not the memory they hold).


@pytest.fixture
def blocky(tmp_path: Path, s3: Any, bucket: str) -> tuple[str, dict[str, Any]]:
    g = torch.Generator().manual_seed(11)
    sd = {
        "model": {
            "small": torch.randn(16, 16, generator=g),
            "a": torch.randn(384, 400, generator=g),  # 600 KiB: one whole block
            "b": torch.randn(640, 1024, generator=g),  # 2.5 MiB: three blocks
            "c": torch.randn(400, 384, generator=g),
        },
        "step": 7,
    }
    local = save_checkpoint(copy.deepcopy(sd), tmp_path / "blocky")
    upload_dir(s3, local, bucket, "blocky")
    return f"s3://{bucket}/blocky", sd


def blank_blocky(sd: dict[str, Any]) -> dict[str, Any]:
    return {"model": {k: torch.zeros_like(v) for k, v in sd["model"].items()}, "step": 0}


class Parked:
    """A DefaultLoadPlanner that parks in ``where`` until released (a load caught mid-way)."""

    def __init__(self, where: str) -> None:
        from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner

        self.reached, self.release = threading.Event(), threading.Event()
        outer = self

        class Planner(DefaultLoadPlanner):
            def create_local_plan(self) -> Any:
                if where == "plan":
                    outer.park()
                return super().create_local_plan()

            def commit_tensor(self, read_item: Any, tensor: torch.Tensor) -> None:
                if where == "decode":
                    outer.park()
                super().commit_tensor(read_item, tensor)

        self.planner = Planner()

    def park(self) -> None:
        self.reached.set()
        self.release.wait(HANG_GUARD_S)


async def later_load(handle: aiodcp.PrefetchHandle, state: dict[str, Any], how: str) -> Any:
    """``handle.load``/``aload`` into ``state``; a hang fails the test instead of the run."""
    if how == "aload":
        work: asyncio.Future[Any] = asyncio.ensure_future(handle.aload(state))
    else:
        work = asyncio.ensure_future(asyncio.to_thread(handle.load, state))
    try:
        return await asyncio.wait_for(asyncio.shield(work), HANG_GUARD_S)
    except TimeoutError:
        pytest.fail(f"the later {how} hung (no result within {HANG_GUARD_S} s)")


def test_prefetch_of_items_that_hold_whole_blocks_completes(
    blocky: tuple[str, dict[str, Any]], reader_kwargs: dict[str, Any], s3_server: S3Server
) -> None:
    """Items of 600 KiB and 2.5 MiB hold 4 and 3 MiB of blocks but are 3.1 MiB of bytes: the
    prefetch's budget is the memory they hold, so the download completes (it stopped for
    good at 3.1 MiB before) and a load after it sends no request."""
    url, sd = blocky
    with aiodcp.prefetch(url, progress=False, part_size=1024 * 1024, **reader_kwargs) as handle:
        try:
            stats = handle.wait(timeout=HANG_GUARD_S)
        except concurrent.futures.TimeoutError:
            pytest.fail(f"the prefetch stopped: {handle.stats}")
        assert stats.items == 5
        s3_server.clear_log()
        state = blank_blocky(sd)
        handle.load(state)
        assert s3_server.requests() == []
    assert_same(state, sd)


ORDERS = [
    # (where the first aload is when cancelled, when the download completes, how the second loads)
    ("waiting", "after_second_starts", "load"),
    ("waiting", "after_second_starts", "aload"),
    ("waiting", "before_second", "load"),
    ("waiting", "before_second", "aload"),
    ("planning", "after_second_starts", "aload"),
    ("planning", "before_second", "load"),
    ("decoding", "before_second", "load"),
    ("decoding", "before_second", "aload"),
]


@pytest.mark.parametrize(("first", "completes", "second"), ORDERS)
async def test_cancelled_aload_in_every_order_leaves_the_prefetch_whole(
    first: str,
    completes: str,
    second: str,
    blocky: tuple[str, dict[str, Any]],
    s3_server: S3Server,
    proxy: FaultProxy,
) -> None:
    url, sd = blocky
    release = threading.Event()
    rule = proxy.add(Fault.stall(HANG_GUARD_S, release=release), path_suffix=".distcp")
    s3_server.clear_log()
    handle = aiodcp.prefetch(url, progress=False, part_size=1024 * 1024, **through(proxy))
    try:
        await wait_for_event(rule.triggered)  # the download is held at the store
        parked = Parked("plan" if first == "planning" else "decode")
        if first == "decoding":  # the download completes first; the load parks decoding it
            release.set()
            await asyncio.to_thread(handle.wait, HANG_GUARD_S)
        task = asyncio.create_task(handle.aload(blank_blocky(sd), planner=parked.planner))
        if first == "waiting":
            await asyncio.to_thread(
                wait_until, lambda: thread_inside("wait_item"), "the load waiting for an item"
            )
        else:
            assert await asyncio.to_thread(parked.reached.wait, HANG_GUARD_S), "never parked"
        task.cancel()
        parked.release.set()
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(task, HANG_GUARD_S)
        if first != "decoding":
            assert not handle.done(), "cancelling the aload stopped the prefetch"
        if completes == "before_second":
            release.set()
            stats = await asyncio.to_thread(handle.wait, HANG_GUARD_S)
            assert stats.items == 5
        state = blank_blocky(sd)
        if completes == "after_second_starts":
            later = asyncio.ensure_future(later_load(handle, state, second))
            await asyncio.to_thread(
                wait_until, lambda: thread_inside("wait_item"), "the later load waiting"
            )
            assert not later.done(), "the later load did not wait for the held download"
            release.set()
            loaded = await later
        else:
            loaded = await later_load(handle, state, second)
    finally:
        release.set()
        handle.close()
    assert_same(state, sd)
    assert loaded.requests == 0, "the later load fetched what the prefetch holds"
    seen: set[tuple[str, int]] = set()
    for path, lo, hi in data_bytes(s3_server):
        for b in range(lo, hi):
            assert (path, b) not in seen, f"{path} byte {b} fetched twice"
            seen.add((path, b))
    assert_clean(proxy)


def test_items_that_hold_whole_blocks_do_not_stall_the_prefetch(
    tmp_path: Path, s3: Any, bucket: str, reader_kwargs: dict[str, Any]
) -> None:
    # Three 600 KiB tensors hold a 1 MiB block each: a budget of their bytes (1.8 MiB) left
    # the third waiting for a release that only a load makes (it hung at f556aab).
    sd = {f"w{i}": torch.full((600 * 256,), float(i)) for i in range(3)}
    save_checkpoint(sd, tmp_path / "ck")
    upload_dir(s3, tmp_path / "ck", bucket, "blocks")
    with aiodcp.prefetch(f"s3://{bucket}/blocks", progress=False, **reader_kwargs) as handle:
        stats = handle.wait(timeout=60)  # a hang guard: the download takes well under a second
        assert stats.items == 3
        loaded = {name: torch.zeros_like(t) for name, t in sd.items()}
        handle.load(loaded)
    assert_same(loaded, sd)


def test_concurrent_loads_through_one_handle_each_read_their_own_position(
    tmp_path: Path, s3: Any, bucket: str, reader_kwargs: dict[str, Any]
) -> None:
    """Three loads through one handle at once (keep=True) decode the same prefetched items in
    three threads. An item's buffer has a read position, so each load must read through a
    buffer of its own over the prefetch's memory: sharing one, torch.load's seeks and reads
    interleaved (wrong tensors, miniz errors; seen with a 1 us switch interval)."""
    g = torch.Generator().manual_seed(21)
    sd = {f"t{i:03d}": torch.randn(64, 64, generator=g) for i in range(200)}
    local = save_checkpoint(copy.deepcopy(sd), tmp_path / "many")
    upload_dir(s3, local, bucket, "many")
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # threads switch between every few bytecodes
    try:
        with aiodcp.prefetch(
            f"s3://{bucket}/many", progress=False, fast_decode=False, **reader_kwargs
        ) as handle:
            handle.wait(timeout=HANG_GUARD_S)
            for _ in range(15):  # rounds of three: one round alone seldom interleaves
                outs = [{k: torch.zeros_like(v) for k, v in sd.items()} for _ in range(3)]
                with concurrent.futures.ThreadPoolExecutor(3) as pool:
                    done = [pool.submit(handle.load, out, keep=True) for out in outs]
                    stats = [f.result(timeout=HANG_GUARD_S) for f in done]
                assert all(s.requests == 0 for s in stats)
                for out in outs:
                    assert_same(out, sd)
    finally:
        sys.setswitchinterval(interval)
