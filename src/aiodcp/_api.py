"""``await load_checkpoint(state_dict, "s3://bucket/ckpt")``: DCP loading for asyncio programs.

Data flow: start aiodcp's private I/O loop (a ``PrivateLoopDriver``: its own thread, its own
``S3Store``) and read ``.metadata`` there (so a wrong path, missing bucket or access problem
raises aiodcp's own error at once; its time is the request latency ``max_gap_size="auto"`` is
resolved with) -> run the blocking ``dcp.load`` in a dedicated worker thread with an
``S3StorageReader`` on that driver: the download runs on the I/O loop, the decoding in the worker
thread, and the caller's loop only awaits the result -> unwrap torch's ``CheckpointException``
so callers see the original error -> close the driver (its loop, thread and connections).

Why not the caller's loop: every ``recv_into`` on the loop that receives the data gives up the
GIL, and while the decode thread is busy (many small tensors) getting it back can take up to the
~2 ms the decoder holds it; with 32 connections one loop iteration could wait for that dozens of
times, and every task of the caller's loop with it (the loop-lag scenario of benchmarks/README.md
measures it). Creating the S3 client is off the caller's loop too.

Cancelling the awaiting task cancels every request at once, lets the item being decoded finish,
waits for the worker thread to leave ``dcp.load``, closes every connection and stops the I/O
thread, then re-raises.
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import torch.distributed as dist
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.planner import LoadPlanner
from torch.distributed.checkpoint.state_dict_loader import load as dcp_load

from ._config import ReaderConfig
from ._driver import PrivateLoopDriver
from ._path import parse_checkpoint_path
from ._planner import request_latency_from_get
from ._stats import LoadStats, StatsRecorder
from ._store import S3Store
from .dcp._metadata import load_metadata
from .dcp._storage_reader import S3StorageReader

__all__ = ["load_checkpoint"]

T = TypeVar("T")


async def load_checkpoint(
    state_dict: dict[str, Any],
    checkpoint_id: str | os.PathLike[str],
    *,
    region: str | None = None,
    endpoint_url: str | None = None,
    config: ReaderConfig | None = None,
    planner: LoadPlanner | None = None,
    process_group: dist.ProcessGroup | None = None,
    no_dist: bool = False,
    max_gap_size: int | float | str | None = None,
    part_size: int | None = None,
    max_concurrency: int | None = None,
    memory_budget: int | None = None,
    progress: bool = False,
    **options: Any,
) -> LoadStats:
    """Load the DCP checkpoint at ``s3://bucket/prefix`` into ``state_dict``, in place.

    Works like ``torch.distributed.checkpoint.load`` (``planner``, ``process_group`` and
    ``no_dist`` have its meaning) while the caller's event loop keeps running: requests run on
    aiodcp's I/O thread (its own event loop), decoding in a worker thread, and this coroutine
    only awaits them. Returns the load's :class:`LoadStats`.

    Raises aiodcp's errors directly (``NotFoundError``, ``AccessDeniedError``...), not torch's
    ``CheckpointException``; other errors from ``dcp.load`` (a key missing from the checkpoint)
    are re-raised as they were raised on this rank. ``progress=True`` shows a tqdm bar.
    ``max_gap_size`` defaults to ``"auto"``: chosen from the measured latency of the
    ``.metadata`` GET; the stats' ``max_gap_size`` is the value used.
    """
    cfg = ReaderConfig.from_kwargs(
        config,
        region=region,
        endpoint_url=endpoint_url,
        max_gap_size=max_gap_size,
        part_size=part_size,
        max_concurrency=max_concurrency,
        memory_budget=memory_budget,
        **options,
    )
    path = parse_checkpoint_path(checkpoint_id)
    recorder = StatsRecorder()
    driver = PrivateLoopDriver(cfg)
    try:
        key = path.key(".metadata")

        async def fetch(store: S3Store) -> tuple[bytes, float]:
            started = time.perf_counter()
            data = await store.get_object(path.bucket, key, stats=recorder)
            return data, request_latency_from_get(time.perf_counter() - started, len(data))

        data, latency = await _on_driver(driver, fetch)
        # Unpickling the metadata of a checkpoint with many items takes long: not on the loop.
        metadata = await _run_in_thread(
            lambda: load_metadata(data, f"s3://{path.bucket}/{key}"), on_cancel=lambda: None
        )
        recorder.add(requests=1, bytes_received=len(data))
        reader = S3StorageReader._with_driver(path, cfg, driver, metadata, recorder, latency)
        reader.progress = progress

        def load() -> None:
            try:
                dcp_load(
                    state_dict,
                    storage_reader=reader,
                    planner=planner,
                    process_group=process_group,
                    no_dist=no_dist,
                )
            except CheckpointException as exc:
                raise _unwrap(exc) from None

        await _run_in_thread(load, on_cancel=reader.abort)
        stats = reader.stats
        return stats if stats is not None else LoadStats()
    finally:
        # Stops the I/O loop and joins its thread (closing the connections first): in a
        # thread, so the caller's loop keeps running meanwhile, even while being cancelled.
        await _run_in_thread(driver.close, on_cancel=lambda: None)


async def _on_driver(driver: PrivateLoopDriver, fn: Callable[[S3Store], Awaitable[T]]) -> T:
    """Await ``fn(store)`` running on the driver's loop; cancelling the caller cancels it."""
    future = driver.submit(fn)
    try:
        return await asyncio.wrap_future(future)
    except asyncio.CancelledError:
        driver.cancel_all()
        raise


def _unwrap(exc: CheckpointException) -> BaseException:
    """The original exception inside torch's ``CheckpointException`` (this rank's first)."""
    failures = exc.failures
    rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
    ordered = sorted(failures.items(), key=lambda kv: (kv[0] != rank, kv[0]))
    for _, failure in ordered:
        inner = failure[0] if isinstance(failure, tuple) else failure
        if isinstance(inner, BaseException):
            return inner
    return exc


async def _run_in_thread(fn: Callable[[], T], *, on_cancel: Callable[[], None]) -> T:
    """Run ``fn`` in a fresh thread; on cancellation call ``on_cancel`` and wait for the thread."""
    loop = asyncio.get_running_loop()
    done: asyncio.Future[T] = loop.create_future()

    def settle(result: T | None, error: BaseException | None) -> None:
        if done.done():
            return
        if error is not None:
            done.set_exception(error)
        else:
            done.set_result(result)  # type: ignore[arg-type]

    def target() -> None:
        try:
            result = fn()
        except BaseException as error:
            loop.call_soon_threadsafe(settle, None, error)
        else:
            loop.call_soon_threadsafe(settle, result, None)

    thread = threading.Thread(target=target, name="aiodcp-load", daemon=True)
    thread.start()
    try:
        return await asyncio.shield(done)
    except asyncio.CancelledError:
        on_cancel()
        while not done.done():
            try:
                await asyncio.shield(done)
            except asyncio.CancelledError:
                on_cancel()
            except BaseException:
                break
        raise
    finally:
        if done.done() and not done.cancelled():
            done.exception()  # retrieved: no "exception was never retrieved" warning
        thread.join(timeout=1.0)
