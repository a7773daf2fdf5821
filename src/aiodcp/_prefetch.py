"""``prefetch``: start pulling a checkpoint now, load it into a model later.

Data flow::

    handle = prefetch("s3://bucket/ckpt", keys=[...])     returns at once
        private I/O loop thread: GET .metadata (timed: max_gap_size "auto" -> bytes)
        -> select the stored items of ``keys``
        -> FetchEngine over them with a budget equal to the memory they hold (nothing waits
           for a consumer: the handle holds every requested byte until it is loaded or
           cancelled)
        -> tqdm progress bar (``progress=False`` to hide it)
    handle.load(state_dict) / await handle.aload(state_dict)
        -> a LoadSession (dcp._session) over the handle's loop, with the metadata the prefetch
           read and a _LoadScope of the handle as its prefetch source
        -> dcp.load with an S3StorageReader attached to that session: items the prefetch holds
           (or is still downloading) are waited for, never fetched twice; anything else is
           fetched by the load itself. The .metadata read is not repeated.

The handle works from plain code and from a notebook cell whose loop is running, because its
I/O runs on its own loop thread. ``cancel()`` stops the downloads and frees the buffers.

Cancellation is scoped to the call cancelled (its ``LoadSession``): cancelling an ``aload`` (or a
task awaiting the handle) cancels that call's own work only, i.e. its decoding, its waits for
prefetched items (``_LoadScope.cancel``) and the requests it sent itself (the session's scope:
the handle's loop and connections, but its own set of submitted coroutines). The prefetch's
download goes on, so a later ``load``/``aload`` takes the same bytes, none fetched twice. Only
``cancel()`` and ``close()`` stop the download; a load waiting for it then raises
``LoadCancelledError``.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import os
import threading
import weakref
from collections.abc import Callable, Generator, Iterable
from types import TracebackType
from typing import Any

import torch.distributed as dist
from torch.distributed.checkpoint.metadata import Metadata
from torch.distributed.checkpoint.planner import LoadPlanner

from ._config import ReaderConfig
from ._detect import Describe, Format, check_format, location, reader_type
from ._driver import PrivateLoopDriver
from ._engine import FetchEngine, FileFetch
from ._errors import ConfigError, LoadCancelledError
from ._path import CheckpointPath, parse_checkpoint_path
from ._planner import ItemRange, plan_file, resolve_max_gap_size
from ._progress import with_progress
from ._reader import ChunkBuffer
from ._sinks import held_memory
from ._stats import LoadStats, StatsRecorder
from ._store import S3Store
from .dcp._integrity import Integrity
from .dcp._run import run_dcp_load, run_in_thread
from .dcp._session import LoadSession, select_keys
from .dcp._sharing import dcp_load_group
from .dcp._storage_reader import attached_reader

__all__ = ["PrefetchHandle", "prefetch"]


def prefetch(
    checkpoint_id: str | os.PathLike[str],
    keys: Iterable[str] | None = None,
    *,
    region: str | None = None,
    endpoint_url: str | None = None,
    config: ReaderConfig | None = None,
    progress: bool = True,
    max_gap_size: int | float | str | None = None,
    part_size: int | None = None,
    max_concurrency: int | None = None,
    format: Format = "auto",
    **options: Any,
) -> PrefetchHandle:
    """Start downloading the checkpoint (or only ``keys``) in the background; returns at once.

    The checkpoint is DCP's or Hugging Face safetensors (``format="auto"``: a URL ending in
    ``.safetensors`` is one file of it, else ``.metadata`` is looked for first, then the
    safetensors index or files); ``handle.load`` then loads it with the reader of its format.

    ``keys`` selects state-dict keys: a key takes every stored item whose fully qualified name
    is the key or starts with ``key + "."`` (so ``"model"`` takes ``"model.layer.weight"``).

    Memory: the handle holds the bytes of the requested keys, no more, until ``load``/``aload``
    consumed them or ``cancel()``/``close()`` is called. ``memory_budget`` does not apply.
    ``max_gap_size`` defaults to ``"auto"`` (chosen from the measured latency of the
    ``.metadata`` GET, as in a load; ``stats.max_gap_size`` shows the value used).
    """
    cfg = ReaderConfig.from_kwargs(
        config,
        region=region,
        endpoint_url=endpoint_url,
        max_gap_size=max_gap_size,
        part_size=part_size,
        max_concurrency=max_concurrency,
        **options,
    )
    path = parse_checkpoint_path(checkpoint_id)
    check_format(format)
    if keys is not None:
        if isinstance(keys, (str, bytes)):
            raise ConfigError(
                f"keys must be a list of state-dict keys, not a single string {keys!r}: "
                f"use keys=[{keys!r}]",
                field="keys",
                value=keys,
            )
        keys = list(keys)
        bad = [k for k in keys if not isinstance(k, str) or not k]
        if bad:
            raise ConfigError(f"keys must be non-empty strings, got {bad!r}", field="keys")
    return PrefetchHandle(path, cfg, keys, progress=progress, format=format)


class PrefetchHandle:
    """A background download of a checkpoint; see :func:`aiodcp.prefetch`."""

    def __init__(
        self,
        path: CheckpointPath,
        config: ReaderConfig,
        keys: list[str] | None,
        *,
        progress: bool,
        format: Format = "auto",
    ) -> None:
        self._url = path.url
        self._path, only = location(path)
        self._describe = Describe(format, only)
        self._config = config
        self._keys = keys
        self._progress = progress
        self._recorder = StatsRecorder()
        self._driver = PrivateLoopDriver(config)
        self._finalizer = weakref.finalize(self, self._driver.close)
        self._lock = threading.Lock()
        # Resolved once the metadata is read and the engine exists (or that failed).
        self._ready: concurrent.futures.Future[None] = concurrent.futures.Future()
        self._metadata: Metadata | None = None
        self._request_latency_s: float | None = None
        self._metadata_checksum: str | None = None
        self._engine: FetchEngine | None = None
        self._index: dict[tuple[str, ItemRange], tuple[int, int]] = {}
        self._cancelled = False
        self._total = 0
        self._future = self._driver.submit(self._run)
        self._future.add_done_callback(lambda _: self._set_ready())

    # ------------------------------------------------------------------ background

    async def _run(self, store: S3Store) -> LoadStats:
        path, recorder = self._path, self._recorder
        try:
            fetched = await self._describe(store, path, recorder)
            latency = fetched.request_latency_s
            metadata = fetched.parse()
            self._request_latency_s = latency
            self._metadata_checksum = fetched.checksum
            recorder.metadata_verified = fetched.checksum is not None
            max_gap_size = resolve_max_gap_size(self._config.max_gap_size, latency)
            recorder.max_gap_size = max_gap_size
            recorder.request_latency_s = latency
            integrity = None
            if self._config.verify_checksums:
                integrity = Integrity.of(metadata, f"{path.url}/.metadata")
            files, index = self._select(metadata, max_gap_size, integrity)
            # The budget is the memory every selected item holds (``held_memory``: whole 1 MiB
            # blocks for items of 512 KiB or more), not their bytes: no load releases a
            # prefetched item while the prefetch runs, so a budget short of that would stop the
            # download for good once it filled (items of 600 KiB hold 1 MiB each).
            held = sum(held_memory(r, r.start, r.end) for f in files for r in f.plan.items)
            config = self._config.replace(memory_budget=max(held, 1))
            etags = {  # safetensors: every GET pinned to the ETag its header was read from
                path.key(info.relative_path): etag
                for info in metadata.storage_data.values()
                if (etag := getattr(info, "etag", None)) is not None
            }
            recorded: dict[str, str] = {} if integrity is None else integrity.etags(path.key)
            etags.update(recorded)  # DCP saved by aiodcp: the ETags its record holds
            engine = FetchEngine(store, path.bucket, files, config, recorder, etags, recorded)
            with self._lock:
                self._metadata, self._engine, self._index = metadata, engine, index
                self._total = sum(f.plan.requested_bytes for f in files)
        finally:
            self._set_ready()
        total = self._total if self._progress else 0
        await with_progress(engine.run(), recorder, total, f"prefetch {path.url}")
        return recorder.finish()

    def _select(
        self, metadata: Metadata, max_gap_size: int | float, integrity: Integrity | None = None
    ) -> tuple[list[FileFetch], dict[tuple[str, ItemRange], tuple[int, int]]]:
        keys = self._keys
        selected: set[str] | None = None
        if keys is not None:
            selected, unknown = select_keys(keys, {i.fqn for i in metadata.storage_data})
            if unknown:
                raise ConfigError(
                    f"{self._path.url} has no key(s) {'; '.join(unknown)}; "
                    "`python -m aiodcp inspect` lists the keys it has",
                    field="keys",
                    value=keys,
                )
        wanted: dict[str, set[ItemRange]] = {}
        names: dict[tuple[str, int, int], str] = {}
        for index, info in metadata.storage_data.items():
            names[(info.relative_path, info.offset, info.length)] = repr(index.fqn)
            if selected is not None and index.fqn not in selected:
                continue
            if info.length:
                wanted.setdefault(info.relative_path, set()).add(
                    ItemRange(info.offset, info.offset + info.length)
                )
        files: list[FileFetch] = []
        positions: dict[tuple[str, ItemRange], tuple[int, int]] = {}
        for relative_path in sorted(wanted):
            plan = plan_file(
                wanted[relative_path],
                max_gap_size=max_gap_size,
                part_size=self._config.buffered_part_size,
            )
            key = self._path.key(relative_path)
            checks = {}
            for item_index, item_range in enumerate(plan.items):
                positions[(relative_path, item_range)] = (len(files), item_index)
                if integrity is not None:
                    checks[item_index] = integrity.check(
                        relative_path,
                        item_range.start,
                        item_range.length,
                        f"s3://{self._path.bucket}/{key}",
                        names.get((relative_path, item_range.start, item_range.length), ""),
                    )
            files.append(FileFetch(key, plan, checks=checks))
        return files, positions

    def _set_ready(self) -> None:
        with self._lock:
            if not self._ready.done():
                self._ready.set_result(None)

    # ------------------------------------------------------------------ source for loads

    def _position(
        self, relative_path: str, item_range: ItemRange
    ) -> tuple[FetchEngine, int, int] | None:
        """The engine and (file, item) indexes of an item this prefetch holds or is still
        downloading; None if it has not (a load then fetches the item itself)."""
        with self._lock:
            engine = self._engine
            position = self._index.get((relative_path, item_range))
        if engine is None or position is None or self._cancelled:
            return None
        future = self._future
        if future.done() and (future.cancelled() or future.exception() is not None):
            return None  # the prefetch failed or was stopped: the load fetches for itself
        return engine, *position

    # ------------------------------------------------------------------ public

    @property
    def checkpoint_id(self) -> str:
        return self._url

    @property
    def format(self) -> Format:
        """``"dcp"`` or ``"safetensors"`` once the prefetch read what describes the
        checkpoint (``"auto"`` before)."""
        return self._describe.format

    @property
    def stats(self) -> LoadStats:
        """Statistics of the prefetch so far (final once it is done)."""
        return self._recorder.snapshot()

    @property
    def bytes_total(self) -> int:
        """Bytes the prefetch requests (0 until the metadata is read)."""
        return self._total

    def done(self) -> bool:
        return self._future.done()

    def wait(self, timeout: float | None = None) -> LoadStats:
        """Block until every requested byte is downloaded; re-raise a failure."""
        return self._future.result(timeout)

    def __await__(self) -> Generator[Any, None, LoadStats]:
        # Shielded: cancelling a task that awaits the handle stops that wait, not the
        # download (``cancel()`` does that).
        return asyncio.shield(asyncio.wrap_future(self._future)).__await__()

    def _session(self) -> LoadSession:
        """A load's session: the metadata the prefetch read, its items as the source."""
        metadata: Metadata | None = None
        if not self._cancelled:
            # Bounded: the metadata GET is the store's (timeouts, attempts) while the loop runs.
            self._driver.wait(self._ready, f"the prefetch's GET of {self._path.url}/.metadata")
            with self._lock:
                metadata = self._metadata
            if metadata is None and not self._cancelled:
                # The prefetch ended before its engine existed: its future is done or about
                # to be (set_ready runs in its finally).
                self._driver.wait(self._future, f"the end of the prefetch of {self._path.url}")
                try:
                    error = self._future.exception()
                except concurrent.futures.CancelledError:
                    error = None  # stopped before reading it: the load reads it itself
                if error is not None:
                    raise error  # the metadata read failed: raise its error
        return LoadSession(
            self._path,
            self._config,
            self._driver,
            source=None if self._cancelled else _LoadScope(self),
            metadata=metadata,
            request_latency_s=self._request_latency_s,
            fetch=self._describe,
            metadata_checksum=self._metadata_checksum,
        )

    def load(
        self,
        state_dict: dict[str, Any],
        *,
        planner: LoadPlanner | None = None,
        process_group: dist.ProcessGroup | None = None,
        no_dist: bool = False,
        keep: bool = False,
    ) -> LoadStats:
        """``dcp.load`` into ``state_dict`` from what was prefetched, fetching only what is
        missing. Afterwards the prefetched bytes are freed unless ``keep=True``."""
        session = self._session()
        return self._load(session, state_dict, planner, process_group, no_dist, keep)

    async def aload(
        self,
        state_dict: dict[str, Any],
        *,
        planner: LoadPlanner | None = None,
        process_group: dist.ProcessGroup | None = None,
        no_dist: bool = False,
        keep: bool = False,
    ) -> LoadStats:
        """:meth:`load` without blocking the caller's event loop.

        Cancelling it cancels this load only (its decoding, its waits for prefetched items and
        the requests it sent itself): the prefetch's download goes on, and a later ``load`` or
        ``aload`` takes its bytes."""
        # Shielded: wrap_future would pass the caller's cancellation on to ``_ready``, which
        # belongs to the handle (every later aload would then raise CancelledError).
        await asyncio.shield(asyncio.wrap_future(self._ready))
        session = self._session()
        return await run_in_thread(
            lambda: self._load(session, state_dict, planner, process_group, no_dist, keep),
            on_cancel=session.cancel,  # its own engine, waits and requests only
        )

    def _load(
        self,
        session: LoadSession,
        state_dict: dict[str, Any],
        planner: LoadPlanner | None,
        process_group: dist.ProcessGroup | None,
        no_dist: bool,
        keep: bool,
    ) -> LoadStats:
        if session.metadata is None:  # stopped before the prefetch read it: the format too
            session.read_metadata()
        run_dcp_load(
            state_dict,
            attached_reader(
                session,
                self._driver,
                dcp_load_group(process_group, no_dist),
                reader_type(self._describe.format),
            ),
            planner=planner,
            process_group=process_group,
            no_dist=no_dist,
        )
        # A load cancelled once its last wait was over still completes in its thread; its
        # caller sees the cancellation, so it does not consume what the handle holds.
        if not keep and not session.cancelled:
            self.cancel()
        return session.stats if session.stats is not None else LoadStats()

    def cancel(self) -> None:
        """Stop downloading and free every prefetched byte. Later loads fetch for themselves."""
        self._cancelled = True
        with self._lock:
            engine, self._engine, self._index = self._engine, None, {}
        if engine is not None:
            engine.abort()
        self._future.cancel()

    def close(self) -> None:
        """Cancel, then shut the handle's I/O thread and connections down."""
        self.cancel()
        self._finalizer()

    def __enter__(self) -> PrefetchHandle:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "cancelled" if self._cancelled else "done" if self.done() else "running"
        return f"<PrefetchHandle {self._url} {state} {self.stats}>"


class _LoadScope:
    """One load's view of the prefetch (the session's ``PrefetchSource``): its waits for the
    prefetch's items, which cancelling the load ends (``cancel``). The prefetch's download is
    not the load's and goes on."""

    def __init__(self, handle: PrefetchHandle) -> None:
        self.handle = handle
        self._cancelled = False
        self._lock = threading.Lock()
        self._engines: set[FetchEngine] = set()

    def lookup(self, relative_path: str, item_range: ItemRange) -> Callable[[], ChunkBuffer] | None:
        """A waiter for an item the prefetch holds or is downloading; None otherwise."""
        found = self.handle._position(relative_path, item_range)
        if found is None:
            return None
        engine, file_index, item_index = found
        with self._lock:
            self._engines.add(engine)
        return functools.partial(self._wait, engine, file_index, item_index)

    def cancel(self) -> None:
        """Stop this load's waits (thread-safe): they raise ``LoadCancelledError``."""
        self._cancelled = True
        with self._lock:
            engines = list(self._engines)
        for engine in engines:
            engine.wake()

    def _wait(self, engine: FetchEngine, file_index: int, item_index: int) -> ChunkBuffer:
        """``engine.wait_item``, except that cancelling this load ends the wait (and only this
        wait: the engine goes on for the prefetch and for other loads). The item is returned as
        a buffer of this load's own over the prefetch's memory: a buffer has a read position,
        and two loads through one handle decode the same item in their own threads."""
        try:
            buffer = engine.wait_item(file_index, item_index, stop=lambda: self._cancelled)
        except LoadCancelledError:
            if self._cancelled:
                raise LoadCancelledError(
                    f"{self.handle.checkpoint_id}: this load was cancelled; the prefetch goes on "
                    "(load again to use it)"
                ) from None
            if self.handle._cancelled:
                raise LoadCancelledError(
                    f"{self.handle.checkpoint_id}: the prefetch was cancelled (cancel(), "
                    "close(), or a load without keep=True finished) while this load waited "
                    "for its bytes; load again: a load after cancel() fetches everything itself"
                ) from None
            raise
        return ChunkBuffer(buffer.chunks)
