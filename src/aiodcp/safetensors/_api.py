"""``await load_safetensors("s3://bucket/model")``: Hugging Face weights for asyncio programs.

Data flow (``load_checkpoint``'s, with safetensors' catalog): import the load's modules in a
thread -> start aiodcp's private I/O loop and a ``LoadSession`` whose fetch is the catalog
(``safetensors/_catalog.py``: index or listing, every header in one GET per file, all files at
once) -> read it off the caller's loop (over a gloo group when the job shares: rank 0 reads,
every rank gets the bytes) -> choose the tensors (``keys``; ``into``'s keys) and their
destinations: fresh ``torch.empty`` tensors of the stored dtype and shape (the caller's own:
nothing aiodcp keeps or reuses), or the caller's ``into`` -> ``dcp.load`` with an
``S3HuggingFaceStorageReader`` attached to the session, in a worker thread (the read phase:
whole tensors from the socket into the destinations, slices of DTensors as runs, shared
across ranks) -> close the driver -> the tensors, with the load's ``LoadStats``.

Cancelling the awaiting task cancels the session, waits for the worker thread, closes the
connections and re-raises, as ``load_checkpoint`` does.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.metadata import Metadata, TensorStorageMetadata
from torch.distributed.checkpoint.planner import LoadPlanner

from .._config import ReaderConfig
from .._errors import AiodcpError, ConfigError, UnsupportedDtypeError
from .._path import parse_checkpoint_path
from .._stats import LoadStats
from ..dcp._run import run_dcp_load, run_in_thread
from ..dcp._session import LoadSession, select_keys
from ..dcp._sharing import dcp_load_group, will_share

if TYPE_CHECKING:
    from .._driver import PrivateLoopDriver

__all__ = ["LoadedTensors", "load_safetensors"]


class LoadedTensors(dict[str, torch.Tensor]):
    """The tensors ``load_safetensors`` loaded, by name, and the load's statistics
    (``stats``)."""

    stats: LoadStats

    def __init__(self, tensors: Mapping[str, torch.Tensor], stats: LoadStats) -> None:
        super().__init__(tensors)
        self.stats = stats


async def load_safetensors(
    path: str | os.PathLike[str],
    *,
    keys: Iterable[str] | None = None,
    into: Mapping[str, Any] | None = None,
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
) -> LoadedTensors:
    """Load the safetensors checkpoint at ``path`` (a directory on S3, with or without
    ``model.safetensors.index.json``, or one ``.safetensors`` file); returns its tensors by
    name, in new tensors of the stored dtype and shape that belong to the caller.

    ``keys``: the tensors to load (a name selects itself and every name below it,
    ``"model.layers.0"`` selects ``"model.layers.0.*"``); default all. ``into``: a state dict
    whose tensors (or DTensors) are filled in place instead; its keys are the ones loaded
    (those ``keys`` selects, if given), each must be in the checkpoint, and the returned
    mapping holds its tensors. ``planner``, ``process_group`` and ``no_dist`` are
    ``dcp.load``'s; options are ``ReaderConfig``'s, as for ``load_checkpoint``. The result's
    ``stats`` is the load's ``LoadStats``.
    """
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        raise AiodcpError(
            "aiodcp.load_safetensors must be awaited on an asyncio event loop, and none is "
            "running (trio?); from trio, run dcp.load(state_dict, storage_reader="
            "aiodcp.S3HuggingFaceStorageReader(...)) in trio.to_thread.run_sync"
        ) from None
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
    requested = _keys(keys)
    url = parse_checkpoint_path(path)
    loop_driver, stack = await run_in_thread(_s3_stack, on_cancel=lambda: None)
    attached_reader, reader_type, catalog_fetch, location = stack
    directory, only = location(url)
    driver = loop_driver(cfg)
    try:
        session = LoadSession(directory, cfg, driver, progress=progress, fetch=catalog_fetch(only))
        group = (
            (process_group or dist.group.WORLD)
            if cfg.share_across_ranks and will_share(process_group, no_dist)
            else None
        )
        if group is None:
            metadata = await session.aread_metadata()
        else:  # rank 0 reads the headers for the whole job
            metadata = await run_in_thread(
                lambda: session.read_metadata(group=group), on_cancel=session.cancel
            )
        state = _destinations(metadata, requested, into, url.url)
        reader = attached_reader(
            session, driver, dcp_load_group(process_group, no_dist), reader_type
        )
        await run_in_thread(
            lambda: run_dcp_load(
                state, reader, planner=planner, process_group=process_group, no_dist=no_dist
            ),
            on_cancel=session.cancel,
        )
        stats = session.stats if session.stats is not None else LoadStats()
        return LoadedTensors(state, stats)
    finally:
        await run_in_thread(driver.close, on_cancel=lambda: None)


def _keys(keys: Iterable[str] | None) -> list[str] | None:
    if keys is None:
        return None
    if isinstance(keys, (str, bytes)):
        raise ConfigError(
            f"keys must be a list of tensor names, not a single string {keys!r}: use "
            f"keys=[{keys!r}]",
            field="keys",
            value=keys,
        )
    chosen = list(keys)
    bad = [k for k in chosen if not isinstance(k, str) or not k]
    if bad:
        raise ConfigError(f"keys must be non-empty strings, got {bad!r}", field="keys")
    return chosen


def _destinations(
    metadata: Metadata,
    requested: list[str] | None,
    into: Mapping[str, Any] | None,
    url: str,
) -> dict[str, Any]:
    """The state dict to load: ``into``'s entries (those ``requested`` selects), or a new
    tensor of the stored dtype and shape for every tensor ``requested`` selects. Raises,
    before anything is fetched, for a key the checkpoint lacks and a dtype torch lacks."""
    tensors = metadata.state_dict_metadata
    names = set(tensors) if into is None else set(into)
    if requested is not None:
        names, unknown = select_keys(requested, names)
        if unknown:
            where = "the checkpoint" if into is None else "into"
            raise ConfigError(
                f"{url}: {where} has no key(s) {'; '.join(unknown)}; `aiodcp inspect {url}` "
                "lists the checkpoint's tensors",
                field="keys",
                value=requested,
            )
    if into is not None:
        missing = sorted(n for n in names if n not in tensors)
        if missing:
            _, hints = select_keys(missing, tensors)
            raise ConfigError(
                f"{url} has no tensor(s) {'; '.join(hints)} that into= wants; `aiodcp inspect "
                f"{url}` lists the checkpoint's tensors",
                field="into",
                value=missing,
            )
    unsupported = {
        index.fqn: info
        for index, info in metadata.storage_data.items()
        if getattr(info, "torch_dtype", True) is None
    }
    for name in sorted(names & unsupported.keys()):
        info = unsupported[name]
        raise UnsupportedDtypeError(
            f"{url}: tensor {name!r} is stored as {info.dtype}, a dtype torch does not "
            "have; leave it out (keys=...)",
            fqn=name,
            dtype=info.dtype,
        )
    if into is not None:
        return {name: into[name] for name in sorted(names)}
    state: dict[str, Any] = {}
    for name in sorted(names):
        md = tensors[name]
        assert isinstance(md, TensorStorageMetadata)  # safetensors holds tensors only
        state[name] = torch.empty(md.size, dtype=md.properties.dtype)
    return state


def _s3_stack() -> tuple[type[PrivateLoopDriver], Any]:
    """What a load needs from the modules ``import aiodcp`` leaves out (``_api._s3_stack``)."""
    from .._driver import PrivateLoopDriver
    from ..dcp._storage_reader import attached_reader
    from ._catalog import safetensors_location
    from ._storage_reader import CatalogFetch, S3HuggingFaceStorageReader

    return PrivateLoopDriver, (
        attached_reader,
        S3HuggingFaceStorageReader,
        CatalogFetch,
        safetensors_location,
    )
