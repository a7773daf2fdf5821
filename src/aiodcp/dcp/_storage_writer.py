"""``S3StorageWriter``: a ``torch.distributed.checkpoint.StorageWriter`` over the upload engine.

The mirror of ``_storage_reader``. Call tree under ``dcp.save(sd, storage_writer=S3StorageWriter(
"s3://b/ckpt"))`` (and ``dcp.async_save``, in its thread or its process)::

    reset(checkpoint_id)                 re-targets (when given an id); a new save id
    storage_meta()                       StorageMeta(checkpoint_id, save_id)
    set_up_storage_writer(coord, rank=, use_collectives=)
                                         this save's SaveSession (dcp/_save.py); the rank that
                                         commits reads .metadata (or __{rank}.metadata) and its
                                         ETag now: overwrite=False refuses an existing one
    prepare_local_plan(plan)             rank-local saves (no collectives): the rank's prefix
    prepare_global_plan(plans)           each rank's data file prefix ``__{rank}_``
    write_data(plan, planner)            the session's write phase: every item uploaded, parts
                                         of every file in flight together; a multi-rank save
                                         agrees on the outcome, every rank raising if one failed
        -> returns a completed torch.futures.Future of the WriteResults
    finish(metadata, results)            the committing rank: .metadata last, one conditional
                                         PUT; then the replaced checkpoint's files deleted

The writer owns a private I/O loop thread with its connections (``close()`` or the context
manager releases them) and can save several times. It pickles without them (``dcp.async_save``
in PROCESS mode sends it to its checkpointing process, where a new loop starts on first use).
``abort()`` cancels the save in progress.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import threading
import uuid
import weakref
from types import TracebackType
from typing import Any

from torch.distributed.checkpoint.metadata import Metadata, StorageMeta
from torch.distributed.checkpoint.planner import SavePlan, SavePlanner
from torch.distributed.checkpoint.storage import StorageWriter, WriteResult
from torch.futures import Future

from .._config import WriterConfig
from .._driver import Driver, PrivateLoopDriver, renew_locks_after_fork
from .._errors import AiodcpError, ConfigError
from .._path import CheckpointPath, is_checkpoint_path, parse_checkpoint_path
from .._stats import SaveStats
from ._save import METADATA_NAME, RankPrefix, SaveSession, save_group

__all__ = ["S3StorageWriter", "attached_writer"]

logger = logging.getLogger(__name__)


class S3StorageWriter(StorageWriter):
    """Save a DCP checkpoint to ``s3://bucket/prefix`` with ``torch.distributed.checkpoint``.

    ``dcp.save(state_dict, storage_writer=S3StorageWriter("s3://bucket/ckpt", region=...))``

    Only ``checkpoint_id`` is positional. ``overwrite=True`` (the default) replaces a checkpoint
    already at that path, atomically (its ``.metadata`` is replaced by one conditional write,
    then its data files are deleted); ``overwrite=False`` refuses to (``CheckpointExistsError``)
    and leaves it intact. Every other option is a field of :class:`aiodcp.WriterConfig`; pass
    a ``config`` or the common knobs as keywords (a keyword overrides the same field of
    ``config``).
    """

    def __init__(
        self,
        checkpoint_id: str | os.PathLike[str],
        *,
        region: str | None = None,
        endpoint_url: str | None = None,
        overwrite: bool = True,
        config: WriterConfig | None = None,
        part_size: int | None = None,
        max_concurrency: int | None = None,
        memory_budget: int | None = None,
        **options: Any,
    ) -> None:
        super().__init__()
        if not isinstance(overwrite, bool):
            raise ConfigError(
                f"overwrite must be a bool, got {overwrite!r}", field="overwrite", value=overwrite
            )
        self.config = WriterConfig.from_kwargs(
            config,
            region=region,
            endpoint_url=endpoint_url,
            part_size=part_size,
            max_concurrency=max_concurrency,
            memory_budget=memory_budget,
            **options,
        )
        self.overwrite = overwrite
        self._path: CheckpointPath = parse_checkpoint_path(checkpoint_id)
        self.save_id = uuid.uuid4().hex
        self.rank: int | None = None
        self.is_coordinator = False
        self.use_collectives = True
        self._init_runtime()

    def _init_runtime(self) -> None:
        self._driver: Driver | None = None
        self._driver_lock = threading.Lock()
        renew_locks_after_fork(self, "_driver_lock")
        self._owns_driver = True
        self._session: SaveSession | None = None
        self._stats: SaveStats | None = None
        self._abort_requested = False

    # ------------------------------------------------------------------ plumbing

    def __getstate__(self) -> dict[str, Any]:
        """Without its loop, connections and save in progress (``async_save`` PROCESS mode
        pickles the writer into its checkpointing process)."""
        state = dict(self.__dict__)
        for name in (
            "_driver",
            "_driver_lock",
            "_owns_driver",
            "_session",
            "_stats",
            "_abort_requested",
        ):
            state.pop(name, None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._init_runtime()

    @property
    def _io(self) -> Driver:
        with self._driver_lock:
            if self._driver is None:
                driver = PrivateLoopDriver(self.config.store_config())
                weakref.finalize(self, driver.close)
                self._driver = driver
            return self._driver

    @property
    def checkpoint_id(self) -> str:
        """The checkpoint URL, ``s3://bucket/prefix``."""
        return self._path.url

    @property
    def stats(self) -> SaveStats | None:
        """Statistics of this rank's last completed (or failed) save, ``None`` before the first
        (in the checkpointing process for ``async_save`` in PROCESS mode)."""
        return self._stats

    def close(self) -> None:
        """Release the private I/O loop and its connections. The writer can be used again."""
        with self._driver_lock:
            driver, self._driver = self._driver, None
        if driver is not None and self._owns_driver:
            driver.close()

    def __enter__(self) -> S3StorageWriter:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def abort(self) -> None:
        """Cancel the save in progress, from any thread: nothing is committed, its uploads are
        aborted and its data files deleted; ``write_data`` (or ``finish``) raises. A save that
        has not reached ``set_up_storage_writer`` yet is cancelled as it does."""
        self._abort_requested = True
        session = self._session
        if session is not None:
            session.cancel()

    def _metadata_name(self) -> str:
        if not self.use_collectives and self.rank is not None:
            return f"__{self.rank}{METADATA_NAME}"
        return METADATA_NAME

    def _current(self) -> SaveSession:
        if self._session is None:
            session = SaveSession(
                self._path, self.config, self._io, overwrite=self.overwrite, rank=self.rank or 0
            )
            if self._abort_requested:
                session.cancel()
            self._session = session
        return self._session

    def _ended(self, session: SaveSession) -> None:
        """This rank's part of the save ended (committed, or failed): its statistics."""
        self._stats = session.finish_stats()
        self._session = None
        self._abort_requested = False
        self.save_id = uuid.uuid4().hex  # the next save through this writer is another one

    # ------------------------------------------------------------------ StorageWriter

    def reset(self, checkpoint_id: str | os.PathLike[str] | None = None) -> None:
        if checkpoint_id:
            self._path = parse_checkpoint_path(checkpoint_id)
        self.save_id = uuid.uuid4().hex
        self._session = None

    def storage_meta(self) -> StorageMeta:
        return StorageMeta(checkpoint_id=self._path.url, save_id=self.save_id)

    def set_up_storage_writer(self, is_coordinator: bool, *args: Any, **kwargs: Any) -> None:
        self.rank = kwargs.get("rank")
        self.use_collectives = kwargs.get("use_collectives", True)
        self.is_coordinator = is_coordinator
        # Every save starts here (torch calls reset() only when given a checkpoint_id).
        self._session = None
        self._stats = None
        session = self._current()
        if is_coordinator or not self.use_collectives:
            session.read_previous(self._metadata_name())

    def prepare_local_plan(self, plan: SavePlan) -> SavePlan:
        if self.rank is not None and not self.use_collectives:
            return dataclasses.replace(plan, storage_data=RankPrefix(f"__{self.rank}_"))
        return plan

    def prepare_global_plan(self, plans: list[SavePlan]) -> list[SavePlan]:
        return [
            dataclasses.replace(plan, storage_data=RankPrefix(f"__{i}_"))
            if plan.storage_data is None
            else plan
            for i, plan in enumerate(plans)
        ]

    def write_data(self, plan: SavePlan, planner: SavePlanner) -> Future[list[WriteResult]]:
        session = self._current()
        prefix = plan.storage_data
        if not isinstance(prefix, RankPrefix):
            raise AiodcpError(
                f"{self._path.url}: the save plan has no data file prefix (storage_data "
                f"{prefix!r}); S3StorageWriter's prepare_global_plan did not run on it"
            )
        group = save_group() if self.use_collectives else None
        try:
            results = session.write(plan, planner, prefix.prefix, group)
        except BaseException:
            self._ended(session)
            raise
        if not self.is_coordinator and self.use_collectives:
            self._ended(session)  # this rank's part ends here (the coordinator commits)
        future: Future[list[WriteResult]] = Future()
        future.set_result(results)
        return future

    def finish(self, metadata: Metadata, results: list[list[WriteResult]]) -> None:
        session = self._current()
        try:
            session.commit(metadata, results, self.storage_meta(), self._metadata_name())
        finally:
            self._ended(session)
        logger.info("%s: saved: %s", self._path.url, self._stats)

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: str | os.PathLike[str]) -> bool:
        return is_checkpoint_path(checkpoint_id)


def attached_writer(
    path: str, config: WriterConfig, driver: Driver, *, overwrite: bool
) -> S3StorageWriter:
    """A writer whose loop is ``driver`` (the caller's, not closed with the writer), for
    ``save_checkpoint``."""
    writer = S3StorageWriter(path, config=config, overwrite=overwrite)
    writer._driver = driver
    writer._owns_driver = False
    return writer
