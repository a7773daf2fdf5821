"""``S3StorageReader``: a ``torch.distributed.checkpoint.StorageReader`` over the fetch engine.

Call tree under ``dcp.load(state_dict, storage_reader=S3StorageReader("s3://b/ckpt"))``::

    reset(checkpoint_id)                 new load id, fresh state; re-targets when given an id
    read_metadata(rank=None)             GET .metadata (or __{rank}.metadata), restricted unpickle;
                                         its time is the request latency "auto" gaps are chosen by
    set_up_storage_reader(md, ...)       keeps md.storage_data (MetadataIndex -> _StorageInfo)
    prepare_local_plan(plan)             items sorted per file by offset
    prepare_global_plan(plans)           unchanged, or each rank's part of a shared load (below)
    read_data(final_plan, planner)       one DcpLoad (dcp/_load.py) for this plan: grouping,
                                         slicing, direct receipt, the engines, decoding in plan
                                         order (when the job shares, the exchange rounds first)
        -> returns a completed torch.futures.Future

Multi-rank loads (``_sharing``): ``read_metadata`` shares the ``.metadata`` bytes over the group
``dcp.load`` runs on, ``prepare_local_plan`` marks a rank that can share, and the coordinator's
``prepare_global_plan`` assigns the stored items two or more ranks need (``plan_sharing``), except
those the ranks slice apart (``DcpLoad.sliced_apart``), whose heads and tails are shared instead.

The reader is reusable across loads (state is reset per load) and owns a private I/O loop
thread with its connections, released by ``close()`` or the context manager. Under
``aiodcp.load_checkpoint`` and prefetch handles it is given their driver (``attached_reader``).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import threading
import uuid
import weakref
from types import TracebackType
from typing import TYPE_CHECKING, Any, TypeVar, cast

import torch.distributed as dist
from torch.distributed.checkpoint._extension import ExtensionRegistry
from torch.distributed.checkpoint.metadata import Metadata, MetadataIndex, StorageMeta
from torch.distributed.checkpoint.planner import (
    LoadPlan,
    LoadPlanner,
    ReadItem,
)
from torch.distributed.checkpoint.storage import StorageReader
from torch.futures import Future

from .._config import ReaderConfig
from .._driver import Driver, PrivateLoopDriver, renew_locks_after_fork
from .._errors import CheckpointFormatError
from .._path import CheckpointPath, is_checkpoint_path, parse_checkpoint_path
from .._stats import LoadStats, StatsRecorder
from ._load import DcpLoad, PrefetchSource
from ._session import METADATA_NAME, FetchedMetadata, fetch_metadata
from ._sharing import (
    RankShare,
    StoredItem,
    load_group,
    merge_adjacent,
    plan_sharing,
    share_metadata,
)

if TYPE_CHECKING:
    from torch.distributed.checkpoint.filesystem import _StorageInfo

__all__ = ["S3StorageReader", "attached_reader"]


logger = logging.getLogger(__name__)

_T = TypeVar("_T")


class S3StorageReader(StorageReader):
    """Load a DCP checkpoint from ``s3://bucket/prefix`` with ``torch.distributed.checkpoint``.

    ``dcp.load(state_dict, storage_reader=S3StorageReader("s3://bucket/ckpt", region=...))``

    Only ``path`` is positional. ``region`` and ``endpoint_url`` default to botocore's own
    resolution (``AWS_REGION``, ``AWS_ENDPOINT_URL``...). Every other option is a field of
    :class:`aiodcp.ReaderConfig`; pass a ``config`` or the common knobs as keywords (a keyword
    overrides the same field of ``config``).

    ``max_gap_size`` is ``"auto"`` unless given: the gap size is then chosen from the measured
    latency of the ``.metadata`` GET (see :attr:`aiodcp.ReaderConfig.max_gap_size`); the
    value used is in ``stats.max_gap_size``.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        region: str | None = None,
        endpoint_url: str | None = None,
        config: ReaderConfig | None = None,
        max_gap_size: int | float | str | None = None,
        part_size: int | None = None,
        max_concurrency: int | None = None,
        memory_budget: int | None = None,
        progress: bool = False,
        **options: Any,
    ) -> None:
        super().__init__()
        self.progress = bool(progress)
        self._source: PrefetchSource | None = None
        self.config = ReaderConfig.from_kwargs(
            config,
            region=region,
            endpoint_url=endpoint_url,
            max_gap_size=max_gap_size,
            part_size=part_size,
            max_concurrency=max_concurrency,
            memory_budget=memory_budget,
            **options,
        )
        self._path: CheckpointPath = parse_checkpoint_path(path)
        self._driver: Driver | None = None
        self._driver_lock = threading.Lock()
        renew_locks_after_fork(self, "_driver_lock")
        self._owns_driver = True
        self._metadata: Metadata | None = None
        # Time to first byte of the last .metadata GET: what max_gap_size="auto" is chosen by.
        self._request_latency_s: float | None = None
        self._load: DcpLoad | None = None  # the load in progress (what abort() stops)
        self._share_group: dist.ProcessGroup | None = None
        self._stats: LoadStats | None = None
        self._recorder = StatsRecorder()
        self.storage_data: dict[MetadataIndex, _StorageInfo] = {}
        self._tensor_metadata: dict[str, Any] = {}
        self.load_id = uuid.uuid4().hex
        self.rank: int | None = None
        self._extensions = ExtensionRegistry()

    # ------------------------------------------------------------------ plumbing

    @property
    def _io(self) -> Driver:
        with self._driver_lock:
            if self._driver is None:
                driver = PrivateLoopDriver(self.config)
                # A reader dropped without close() still shuts its loop and connections down.
                weakref.finalize(self, driver.close)
                self._driver = driver
            return self._driver

    @property
    def checkpoint_id(self) -> str:
        """The checkpoint URL, ``s3://bucket/prefix``."""
        return self._path.url

    @property
    def stats(self) -> LoadStats | None:
        """Statistics of the last completed (or failed) load, ``None`` before the first."""
        return self._stats

    def close(self) -> None:
        """Release the private I/O loop and its connections. The reader can be used again."""
        with self._driver_lock:
            driver, self._driver = self._driver, None
        if driver is not None and self._owns_driver:
            driver.close()

    def __enter__(self) -> S3StorageReader:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def abort(self) -> None:
        """Cancel the load in progress, from any thread. ``read_data`` then raises."""
        load = self._load
        if load is not None:
            load.abort()
        if self._driver is not None:
            self._driver.cancel_all()

    # ------------------------------------------------------------------ StorageReader

    def reset(self, checkpoint_id: str | os.PathLike[str] | None = None) -> None:
        if checkpoint_id:
            path = parse_checkpoint_path(checkpoint_id)
            if path != self._path:
                self._metadata = None
            self._path = path
        self.storage_data = {}
        self.load_id = uuid.uuid4().hex
        self._recorder = StatsRecorder()
        self._stats = None

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        rank = kwargs.get("rank")
        # The process group to share this load's bytes over (None: this rank loads alone).
        # Rank-local metadata (rank=...) means a load without collectives.
        self._share_group = (
            load_group() if rank is None and self.config.share_across_ranks else None
        )
        if rank is None and self._metadata is not None:
            metadata = self._metadata  # prefetched by load_checkpoint, which counted it
        else:
            # The first call of every dcp.load (which calls reset() only when given a
            # checkpoint_id): statistics start here.
            self._recorder = StatsRecorder()
            path, recorder = self._path, self._recorder

            def fetch() -> FetchedMetadata:
                return self._io.run(lambda store: fetch_metadata(store, path, recorder, rank=rank))

            group = self._share_group
            # Shared: rank 0 GETs it, every rank gets its bytes (one GET per job).
            fetched = fetch() if group is None else share_metadata(group, fetch)
            self._request_latency_s = fetched.request_latency_s
            metadata = fetched.parse()
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        cast(StorageMeta, metadata.storage_meta).load_id = self.load_id
        return metadata

    def set_up_storage_reader(
        self, metadata: Metadata, is_coordinator: bool, *args: Any, **kwargs: Any
    ) -> None:
        storage_data = getattr(metadata, "storage_data", None)
        if not isinstance(storage_data, dict):
            raise CheckpointFormatError(
                f"{self._path.url}: the checkpoint metadata has no storage_data",
                bucket=self._path.bucket,
                key=self._path.key(METADATA_NAME),
            )
        self.storage_data = storage_data
        self._tensor_metadata = getattr(metadata, "state_dict_metadata", None) or {}
        self.rank = kwargs.get("rank")
        if kwargs.get("use_collectives") is False:
            self._share_group = None

    def prepare_local_plan(self, plan: LoadPlan) -> LoadPlan:
        def order(item: ReadItem) -> tuple[str, int]:
            info = self.storage_data[item.storage_index]
            return (info.relative_path, info.offset)

        # Marked when this rank can take part in a shared load: the coordinator shares only
        # if every rank's plan says so (same group found, sharing not switched off).
        marker = _CAN_SHARE if self._share_group is not None else plan.storage_data
        return dataclasses.replace(plan, items=sorted(plan.items, key=order), storage_data=marker)

    def prepare_global_plan(self, plans: list[LoadPlan]) -> list[LoadPlan]:
        """Unchanged, unless every rank can share: then each plan carries its rank's part of
        the job's sharing (``_sharing.plan_sharing``); items the ranks slice apart
        (``DcpLoad.sliced_apart``) are each rank's own."""
        plain = [
            dataclasses.replace(p, storage_data=None) if p.storage_data == _CAN_SHARE else p
            for p in plans
        ]
        group = self._share_group
        if (
            group is None
            or len(plans) != dist.get_world_size(group)
            or any(p.storage_data != _CAN_SHARE for p in plans)
        ):
            return plain
        reqs_of: list[dict[StoredItem, list[ReadItem]]] = []
        for plan in plans:
            items: dict[StoredItem, list[ReadItem]] = {}
            for req in plan.items:
                info = self.storage_data.get(req.storage_index)
                if info is None:
                    return plain  # each rank's own load raises the precise error
                item = StoredItem(info.relative_path, info.offset, info.offset + info.length)
                items.setdefault(item, []).append(req)
            reqs_of.append(items)
        session = self._session(StatsRecorder())
        apart = session.sliced_apart(reqs_of)
        needs = [set(items) for items in reqs_of]
        probed_by = {probe: ranks for probes, ranks in apart.values() for probe in probes}
        # Adjacent probes (one item's tail, the next one's head) travel as one span, so the
        # rank that fetches them makes one GET of it.
        for span, ranks in merge_adjacent(probed_by).items():
            for r in ranks:
                needs[r].add(span)
        shares = plan_sharing(needs, round_bytes=session.round_bytes, sliced=apart.keys())
        if shares is None:
            return plain
        return [
            dataclasses.replace(p, storage_data=share)
            for p, share in zip(plain, shares, strict=True)
        ]

    def read_data(self, plan: LoadPlan, planner: LoadPlanner) -> Future[None]:
        recorder = self._recorder
        logger.debug("%s: read_data of %d read items", self._path.url, len(plan.items))
        load = self._load = self._session(recorder)
        try:
            share = plan.storage_data
            if isinstance(share, RankShare) and self._share_group is not None:
                load.read_shared(plan, planner, recorder, share, self._share_group)
            else:
                load.read(plan, planner, recorder)
        except BaseException as exc:
            self._stats = recorder.finish()
            logger.debug("%s: load failed after %s: %r", self._path.url, self._stats, exc)
            raise
        finally:
            self._load = None
        self._stats = recorder.finish()
        logger.info("%s: loaded: %s", self._path.url, self._stats)
        future: Future[None] = Future()
        future.set_result(None)
        return future

    def _session(self, recorder: StatsRecorder) -> DcpLoad:
        """The read phase of a load of this reader's checkpoint (``dcp._load``)."""
        return DcpLoad(
            path=self._path,
            config=self.config,
            storage_data=self.storage_data,
            tensor_metadata=self._tensor_metadata,
            driver=self._io,
            recorder=recorder,
            request_latency_s=self._request_latency_s,
            source=self._source,
            extensions=self._extensions,
            progress=self.progress,
        )

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: str | os.PathLike[str]) -> bool:
        return is_checkpoint_path(checkpoint_id)


def attached_reader(
    path: CheckpointPath,
    config: ReaderConfig,
    driver: Driver,
    recorder: StatsRecorder,
    *,
    metadata: Metadata | None = None,
    request_latency_s: float | None = None,
    source: PrefetchSource | None = None,
    progress: bool = False,
) -> S3StorageReader:
    """A reader running its I/O through ``driver`` (not owned), for ``load_checkpoint`` and
    prefetch handles: ``metadata`` fetched by the caller, with ``request_latency_s`` (None:
    unmeasured), counted in ``recorder``; ``source``, a prefetch whose items the load takes."""
    reader = S3StorageReader(path.url, config=config, progress=progress)
    reader._recorder = recorder
    reader._driver = driver
    reader._owns_driver = False
    reader._metadata = metadata
    reader._request_latency_s = request_latency_s
    reader._source = source
    return reader


_CAN_SHARE = "aiodcp:can-share"
"""A local plan's ``storage_data`` when its rank can take part in a shared load."""
