"""``await load_checkpoint(...)`` and ``await save_checkpoint(...)``: DCP for asyncio programs.

``save_checkpoint`` mirrors ``load_checkpoint`` below: ``dcp.save`` runs in a worker thread
with an ``S3StorageWriter`` on aiodcp's private I/O loop (serialising and checksumming in the
worker thread, uploads on the I/O loop); the caller's loop only awaits it. Cancelling the
awaiting task cancels the save (every request at once), waits for its thread, which aborts the
multipart uploads it opened and deletes the data files it wrote, and re-raises: nothing is
committed, unless the cancellation came after the store took the ``.metadata`` (then the
checkpoint is complete).

The load:

Data flow: import the load's modules in a thread (not on the caller's loop; outside the plain
case, ``_native``, the store later imports botocore, aiobotocore and aiohttp in a thread too)
-> start aiodcp's private I/O loop (a ``PrivateLoopDriver``: its own thread, its own
``S3Store``) and the load's ``LoadSession`` over it (``dcp._session``) -> read ``.metadata``
through the session (``aread_metadata``: so a wrong path, missing bucket or access problem raises
aiodcp's own error at once; its time is the request latency ``max_gap_size="auto"`` is resolved
with) -> run the blocking ``dcp.load`` in a dedicated worker thread with an ``S3StorageReader``
attached to the session: the download runs on the I/O loop, the decoding in the worker thread,
and the caller's loop only awaits the result -> unwrap torch's ``CheckpointException`` so
callers see the original error -> close the driver (its loop, thread and connections).

Why not the caller's loop: every ``recv_into`` on the loop that receives the data gives up the
GIL, and while the decode thread is busy (many small tensors) getting it back can take up to the
~2 ms the decoder holds it; with 32 connections one loop iteration could wait for that dozens of
times, and every task of the caller's loop with it (the loop-lag scenario of benchmarks/README.md
measures it). Creating the S3 client is off the caller's loop too.

Cancelling the awaiting task cancels the session (every request at once, and any the load would
start later), lets the item being decoded finish, waits for the worker thread to leave
``dcp.load``, closes every connection and stops the I/O thread, then re-raises. Two concurrent
calls share nothing (each its own driver and session).
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch.distributed as dist
from torch.distributed.checkpoint.planner import LoadPlanner

from ._config import ReaderConfig, WriterConfig
from ._errors import AiodcpError, ConfigError
from ._path import parse_checkpoint_path
from ._stats import LoadStats, SaveStats
from .dcp._run import run_dcp_load, run_in_thread

if TYPE_CHECKING:
    from torch.distributed.checkpoint.planner import SavePlanner

    from ._driver import PrivateLoopDriver
    from .dcp._session import LoadSession
    from .dcp._storage_reader import S3StorageReader
    from .dcp._storage_writer import S3StorageWriter

__all__ = ["load_checkpoint", "save_checkpoint"]

SAVE_THREAD = "aiodcp-save"
"""The name of a save's worker threads (a load's are ``aiodcp-load``): what profiles show."""


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
    _need_asyncio("load_checkpoint", "dcp.load(state_dict, storage_reader=aiodcp.S3StorageReader")
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
    # The first load of a process imports the load's modules: in a thread, not on the loop.
    stack = await run_in_thread(_s3_stack, on_cancel=lambda: None)
    loop_driver, attached_reader, load_session, will_share, dcp_load_group = stack
    driver = loop_driver(cfg)
    try:
        session = load_session(path, cfg, driver, progress=progress)
        if not (cfg.share_across_ranks and will_share(process_group, no_dist)):
            # (Shared: rank 0 reads .metadata for the whole job inside dcp.load.)
            await session.aread_metadata()
        reader = attached_reader(session, driver, dcp_load_group(process_group, no_dist))
        await run_in_thread(
            lambda: run_dcp_load(
                state_dict,
                reader,
                planner=planner,
                process_group=process_group,
                no_dist=no_dist,
            ),
            on_cancel=session.cancel,
        )
        return session.stats if session.stats is not None else LoadStats()
    finally:
        # Stops the I/O loop and joins its thread (closing the connections first): in a
        # thread, so the caller's loop keeps running meanwhile, even while being cancelled.
        await run_in_thread(driver.close, on_cancel=lambda: None)


def _s3_stack() -> tuple[
    type[PrivateLoopDriver],
    Callable[..., S3StorageReader],
    type[LoadSession],
    Callable[[dist.ProcessGroup | None, bool], bool],
    Callable[[dist.ProcessGroup | None, bool], dist.ProcessGroup | None],
]:
    """What a load needs from the modules ``import aiodcp`` leaves out (see
    ``aiodcp/__init__.py``); botocore, aiobotocore and aiohttp only outside the plain case.
    The load-only modules (``_session``, ``_sharing``) are imported here, not by this module,
    so that ``save_checkpoint`` does not import them."""
    from ._driver import PrivateLoopDriver
    from .dcp._session import LoadSession
    from .dcp._sharing import dcp_load_group, will_share
    from .dcp._storage_reader import attached_reader

    return PrivateLoopDriver, attached_reader, LoadSession, will_share, dcp_load_group


def _need_asyncio(name: str, instead: str) -> None:
    """Checked before anything starts: under another event loop (trio) the I/O thread and its
    connections would be left behind, as their cleanup awaits asyncio."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        raise AiodcpError(
            f"aiodcp.{name} must be awaited on an asyncio event loop, and none is running "
            f"(trio?); from trio, run {instead}(...)) in trio.to_thread.run_sync"
        ) from None


async def save_checkpoint(
    state_dict: dict[str, Any],
    checkpoint_id: str | os.PathLike[str],
    *,
    region: str | None = None,
    endpoint_url: str | None = None,
    overwrite: bool = True,
    config: WriterConfig | None = None,
    planner: SavePlanner | None = None,
    process_group: dist.ProcessGroup | None = None,
    no_dist: bool = False,
    part_size: int | None = None,
    max_concurrency: int | None = None,
    memory_budget: int | None = None,
    **options: Any,
) -> SaveStats:
    """Save ``state_dict`` as a DCP checkpoint at ``s3://bucket/prefix``.

    Works like ``torch.distributed.checkpoint.save`` (``planner``, ``process_group`` and
    ``no_dist`` have its meaning) while the caller's event loop keeps running. The data files
    are uploaded first, ``.metadata`` last as one conditional write; ``overwrite=False``
    refuses an existing checkpoint (``CheckpointExistsError``). Returns this rank's
    :class:`SaveStats`. Raises aiodcp's errors directly, not torch's ``CheckpointException``.
    Cancelling the awaiting task commits nothing (see the module docstring).
    """
    _need_asyncio("save_checkpoint", "dcp.save(state_dict, storage_writer=aiodcp.S3StorageWriter")
    cfg = WriterConfig.from_kwargs(
        config,
        region=region,
        endpoint_url=endpoint_url,
        part_size=part_size,
        max_concurrency=max_concurrency,
        memory_budget=memory_budget,
        **options,
    )
    if not isinstance(overwrite, bool):
        raise ConfigError(
            f"overwrite must be a bool, got {overwrite!r}", field="overwrite", value=overwrite
        )
    path = parse_checkpoint_path(checkpoint_id)
    loop_driver, attached_writer, run_dcp_save = await run_in_thread(
        _save_stack, on_cancel=lambda: None, name=SAVE_THREAD
    )
    driver = loop_driver(cfg.store_config())
    writer = attached_writer(path.url, cfg, driver, overwrite=overwrite)
    try:
        await run_in_thread(
            lambda: run_dcp_save(
                state_dict,
                writer,
                planner=planner,
                process_group=process_group,
                no_dist=no_dist,
            ),
            on_cancel=writer.abort,
            name=SAVE_THREAD,
        )
        return writer.stats if writer.stats is not None else SaveStats()
    finally:
        await run_in_thread(driver.close, on_cancel=lambda: None, name=SAVE_THREAD)


def _save_stack() -> tuple[
    type[PrivateLoopDriver], Callable[..., S3StorageWriter], Callable[..., None]
]:
    """What a save needs from the modules ``import aiodcp`` leaves out (imported in a thread)."""
    from ._driver import PrivateLoopDriver
    from .dcp._run import run_dcp_save
    from .dcp._storage_writer import attached_writer

    return PrivateLoopDriver, attached_writer, run_dcp_save
