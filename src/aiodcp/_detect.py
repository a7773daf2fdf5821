"""Which checkpoint format a path holds, for the clients that take either (``prefetch``, the
CLI): DCP (``.metadata``) or Hugging Face safetensors (an index, ``*.safetensors`` files).

``Describe(format)`` is a session's ``Fetch`` (``dcp/_session.py``) that decides on first use::

    "dcp"            GET .metadata
    "safetensors"    the safetensors catalog (index or listing, then the headers)
    "auto"           a URL ending in .safetensors is one; else GET .metadata, and if there is
                     none, the safetensors catalog; neither: NotFoundError naming both

and then remembers the format it found (``format``), so the load that follows uses the reader
for it (``reader_type``). ``location`` splits a URL naming one ``.safetensors`` file into its
directory (the checkpoint's path, under which its files' keys are) and the file.
"""

from __future__ import annotations

from typing import Literal

from ._errors import ConfigError, NotFoundError
from ._path import CheckpointPath
from ._stats import StatsRecorder
from ._store import S3Store
from .dcp._session import Fetched, fetch_metadata
from .dcp._storage_reader import S3StorageReader
from .safetensors._catalog import fetch_catalog, safetensors_location
from .safetensors._storage_reader import S3HuggingFaceStorageReader

__all__ = ["FORMATS", "Describe", "Format", "location", "reader_type"]

Format = Literal["auto", "dcp", "safetensors"]
FORMATS: tuple[Format, ...] = ("auto", "dcp", "safetensors")


def check_format(value: object) -> Format:
    if value not in FORMATS:
        raise ConfigError(
            f"format must be one of {', '.join(map(repr, FORMATS))}, got {value!r}",
            field="format",
            value=value,
        )
    return value


def location(path: CheckpointPath) -> tuple[CheckpointPath, str | None]:
    """The checkpoint's directory, and the one ``.safetensors`` file the URL names (or None)."""
    return safetensors_location(path)


class Describe:
    """Fetch what describes the checkpoint in the format asked for, or found (module
    docstring); ``only``: the one ``.safetensors`` file the URL named."""

    def __init__(self, format: Format = "auto", only: str | None = None) -> None:
        self.format: Format = check_format(format)
        self.only = only
        if only is not None:
            self.format = "safetensors"

    async def __call__(
        self,
        store: S3Store,
        path: CheckpointPath,
        recorder: StatsRecorder | None = None,
        *,
        rank: int | None = None,
    ) -> Fetched:
        if self.format == "safetensors":
            return await fetch_catalog(store, path, recorder, rank=rank, only=self.only)
        if self.format == "dcp":
            return await fetch_metadata(store, path, recorder, rank=rank)
        try:
            fetched: Fetched = await fetch_metadata(store, path, recorder, rank=rank)
        except NotFoundError as no_metadata:
            if type(no_metadata) is not NotFoundError or rank is not None:
                raise  # no such bucket; rank-local metadata is DCP's
            try:
                fetched = await fetch_catalog(store, path, recorder)
            except NotFoundError as no_catalog:
                if type(no_catalog) is not NotFoundError:
                    raise
                raise NotFoundError(
                    f"{no_metadata}; nor a Hugging Face safetensors checkpoint (no "
                    "model.safetensors.index.json and no *.safetensors file there)",
                    bucket=path.bucket,
                    key=path.key(".metadata"),
                ) from no_metadata
            self.format = "safetensors"
            return fetched
        self.format = "dcp"
        return fetched


def reader_type(format: Format) -> type[S3StorageReader]:
    """The ``StorageReader`` of a format (DCP's unless it is safetensors)."""
    return S3HuggingFaceStorageReader if format == "safetensors" else S3StorageReader
