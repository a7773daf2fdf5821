"""``S3HuggingFaceStorageReader``: Hugging Face safetensors checkpoints from S3 with ``dcp.load``.

torch 2.13's ``HuggingFaceStorageReader`` reads local files only; this reader gives its semantics
(the same keys: one per tensor name; ``DCP_SHARDING_INFO`` in a file's ``__metadata__`` places
the chunks of a sharded save) for ``s3://bucket/prefix``, through the same read phase as DCP
checkpoints. It is ``S3StorageReader`` with two things of its own::

    read_metadata()         the session fetches the catalog (``safetensors/_catalog.py``): the
                            index (or the listing), every header in one GET per file, all files
                            at once; shared over the load's gloo group like ``.metadata``: rank
                            0 reads it, every rank gets its bytes (headers read once per job)
    read_data(plan)         the read phase over ``SafetensorsFormat`` (``safetensors/_format.py``):
                            every stored item is a tensor's raw bytes, so a whole tensor goes
                            from the socket into its destination and a DTensor shard fetches
                            only the runs it needs; every GET pinned to the header's ETag

Everything else (planning hooks, sharing across ranks, statistics, ``close``/``abort``) is
``S3StorageReader``'s.
"""

from __future__ import annotations

import os
from typing import Any, cast

from torch.distributed.checkpoint.metadata import Metadata

from .._path import CheckpointPath, parse_checkpoint_path
from .._stats import StatsRecorder
from .._store import S3Store
from ..dcp._format import StoredFormat
from ..dcp._session import LoadSession
from ..dcp._storage_reader import S3StorageReader
from ._catalog import FetchedCatalog, fetch_catalog, safetensors_location
from ._format import SafetensorsFormat, SafetensorsInfo

__all__ = ["CatalogFetch", "S3HuggingFaceStorageReader"]


class CatalogFetch:
    """The session's ``Fetch`` of a safetensors checkpoint: its catalog, of the one file
    ``only`` when the URL named a file."""

    def __init__(self, only: str | None) -> None:
        self.only = only

    async def __call__(
        self,
        store: S3Store,
        path: CheckpointPath,
        recorder: StatsRecorder | None = None,
        *,
        rank: int | None = None,
    ) -> FetchedCatalog:
        return await fetch_catalog(store, path, recorder, rank=rank, only=self.only)


class S3HuggingFaceStorageReader(S3StorageReader):
    """Load a Hugging Face safetensors checkpoint from S3 with ``torch.distributed.checkpoint``.

    ``dcp.load(state_dict, storage_reader=S3HuggingFaceStorageReader("s3://bucket/model"))``

    ``path`` is a directory holding ``*.safetensors`` files (with ``model.safetensors.index.json``
    when it has one, else every ``*.safetensors`` directly under it, as torch's
    ``HuggingFaceStorageReader`` lists its directory), or one ``.safetensors`` file. The keys
    are the tensors' names. Options and statistics (``.stats``) are ``S3StorageReader``'s.
    """

    def __init__(self, path: str | os.PathLike[str], **kwargs: Any) -> None:
        super().__init__(path, **kwargs)
        self._path, self._only = safetensors_location(self._path)
        self._failed: BaseException | None = None

    def reset(self, checkpoint_id: str | os.PathLike[str] | None = None) -> None:
        if checkpoint_id:
            directory, only = safetensors_location(parse_checkpoint_path(checkpoint_id))
            if (directory, only) != (self._path, self._only):
                self._attached = None
            self._path, self._only = directory, only
            checkpoint_id = None
        super().reset(checkpoint_id)

    @property
    def checkpoint_id(self) -> str:
        """The checkpoint URL (a directory, or one ``.safetensors`` file)."""
        return self._path.url if self._only is None else f"{self._path.url}/{self._only}"

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        # torch calls this again with rank=... when it failed, for rank-local metadata, which a
        # safetensors checkpoint has not: the first failure is the one to report.
        if kwargs.get("rank") is not None and self._failed is not None:
            raise self._failed
        self._failed = None
        try:
            return super().read_metadata(*args, **kwargs)
        except Exception as exc:
            self._failed = exc
            raise

    def _new_session(self) -> LoadSession:
        return LoadSession(
            self._path,
            self.config,
            self._io,
            progress=self.progress,
            fetch=CatalogFetch(self._only),
        )

    def _stored_format(self, session: LoadSession) -> StoredFormat:
        storage_data = cast("dict[Any, SafetensorsInfo]", self.storage_data)
        return SafetensorsFormat(path=self._path, storage_data=storage_data)
