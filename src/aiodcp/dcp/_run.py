"""Running torch's ``dcp.load``/``dcp.save`` for a coroutine: shared by loads and saves.

Kept apart from ``_session`` (a load's session, which imports the load-only modules: the
archive reader, the decoders, cross-rank sharing) so that ``save_checkpoint`` imports none of
them: every saver process pays for each module it imports (benchmarks/README.md, "Saves").

    run_in_thread(fn, on_cancel=..., name=...)   from a coroutine
        -> fn in a fresh thread; cancelling the awaiting task calls on_cancel and waits for
           the thread to finish before re-raising
    run_dcp_load(state_dict, reader, ...)        in the thread that decodes
    run_dcp_save(state_dict, writer, ...)        in the thread that serializes
        -> torch's dcp.load / dcp.save; its CheckpointException is unwrapped to this rank's
           own error
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from typing import Any, TypeVar

import torch.distributed as dist
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.planner import LoadPlanner, SavePlanner
from torch.distributed.checkpoint.state_dict_loader import load as dcp_load
from torch.distributed.checkpoint.storage import StorageReader, StorageWriter

__all__ = ["run_dcp_load", "run_dcp_save", "run_in_thread", "unwrap"]

T = TypeVar("T")


def run_dcp_load(
    state_dict: dict[str, Any],
    reader: StorageReader,
    *,
    planner: LoadPlanner | None,
    process_group: dist.ProcessGroup | None,
    no_dist: bool,
) -> None:
    """``dcp.load`` with ``reader``, raising this rank's original error instead of torch's
    ``CheckpointException`` wrapper."""
    unwrapped(
        lambda: dcp_load(
            state_dict,
            storage_reader=reader,
            planner=planner,
            process_group=process_group,
            no_dist=no_dist,
        )
    )


def run_dcp_save(
    state_dict: dict[str, Any],
    writer: StorageWriter,
    *,
    planner: SavePlanner | None,
    process_group: dist.ProcessGroup | None,
    no_dist: bool,
) -> None:
    """``dcp.save`` with ``writer``, raising this rank's original error instead of torch's
    ``CheckpointException`` wrapper."""
    from torch.distributed.checkpoint.state_dict_saver import save as dcp_save

    unwrapped(
        lambda: dcp_save(
            state_dict,
            storage_writer=writer,
            planner=planner,
            process_group=process_group,
            no_dist=no_dist,
        )
    )


def unwrapped(call: Callable[[], object]) -> None:
    """``call()`` (torch's ``dcp.load``/``dcp.save``), raising this rank's original error
    instead of torch's ``CheckpointException`` wrapper."""
    try:
        call()
    except CheckpointException as exc:
        raise unwrap(exc) from None


def unwrap(exc: CheckpointException) -> BaseException:
    """The original exception inside torch's ``CheckpointException`` (this rank's first)."""
    failures = exc.failures
    rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
    ordered = sorted(failures.items(), key=lambda kv: (kv[0] != rank, kv[0]))
    for _, failure in ordered:
        inner = failure[0] if isinstance(failure, tuple) else failure
        if isinstance(inner, BaseException):
            return inner
    return exc


async def run_in_thread(
    fn: Callable[[], T], *, on_cancel: Callable[[], None], name: str = "aiodcp-load"
) -> T:
    """Run ``fn`` in a fresh thread named ``name`` (what a profile or ``py-spy dump`` shows:
    ``aiodcp-load`` or ``aiodcp-save``); on cancellation call ``on_cancel`` and wait for the
    thread."""
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

    thread = threading.Thread(target=target, name=name, daemon=True)
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
