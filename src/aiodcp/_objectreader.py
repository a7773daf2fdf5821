"""``S3ObjectReader``: the generic, any-access-pattern file-like reader of one S3 object.

The DCP reader serves only planned ranges, forward across items. This one is the fallback for
everything else (non-DCP use, custom planners, ``torch.load`` of a single ``.pt`` object): any
``read`` size including ``read()`` to the end, ``seek`` with every ``whence``, ``readinto``. It
fetches on demand with ranged GETs of at least ``readahead`` bytes and keeps the last window, so
sequential small reads cost one request per window. Its I/O runs on a private loop thread.
"""

from __future__ import annotations

import io
import os
from types import TracebackType
from typing import Any

from ._config import ReaderConfig
from ._driver import PrivateLoopDriver
from ._errors import InvalidPathError, ReaderTypeError, SequentialAccessError
from ._path import parse_checkpoint_path
from ._store import S3Store

__all__ = ["DEFAULT_READAHEAD_BYTES", "S3ObjectReader"]

DEFAULT_READAHEAD_BYTES = 8 * 1024 * 1024


class S3ObjectReader(io.RawIOBase):
    """A seekable, read-only binary file over ``s3://bucket/key``.

    ``region``, ``endpoint_url``, ``config`` and the other keywords are those of
    :class:`aiodcp.S3StorageReader`. ``readahead`` (bytes) is the smallest request it makes.
    """

    def __init__(
        self,
        url: str | os.PathLike[str],
        *,
        region: str | None = None,
        endpoint_url: str | None = None,
        config: ReaderConfig | None = None,
        readahead: int = DEFAULT_READAHEAD_BYTES,
        **options: Any,
    ) -> None:
        super().__init__()
        path = parse_checkpoint_path(url)
        if not path.prefix:
            raise InvalidPathError(
                f"{os.fspath(url)!r} names a bucket, not an object: expected s3://bucket/key",
                path=str(url),
            )
        if isinstance(readahead, bool) or not isinstance(readahead, int) or readahead <= 0:
            raise ReaderTypeError(f"readahead must be a positive int, got {readahead!r}")
        self._config = ReaderConfig.from_kwargs(
            config, region=region, endpoint_url=endpoint_url, **options
        )
        self.bucket = path.bucket
        self.key = path.prefix
        self._readahead = readahead
        self._driver = PrivateLoopDriver(self._config)
        self._size: int | None = None
        self._pos = 0
        self._window_start = 0
        self._window = b""
        self._etag: str | None = None

    @property
    def size(self) -> int:
        """The object's size in bytes (one HEAD request, cached)."""
        if self._size is None:
            bucket, key = self.bucket, self.key

            async def head(store: S3Store) -> int:
                return await store.object_size(bucket, key)

            self._size = self._driver.run(head)
        return self._size

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET, /) -> int:
        if isinstance(offset, bool) or not isinstance(offset, int):
            raise ReaderTypeError(f"seek offset must be an int, got {offset!r}")
        if whence == io.SEEK_SET:
            target = offset
        elif whence == io.SEEK_CUR:
            target = self._pos + offset
        elif whence == io.SEEK_END:
            target = self.size + offset
        else:
            raise SequentialAccessError(
                f"invalid whence {whence!r}: use SEEK_SET, SEEK_CUR or SEEK_END", whence=whence
            )
        if target < 0:
            raise SequentialAccessError(f"negative seek position {target}", position=target)
        self._pos = target
        return target

    def readinto(self, buffer: Any) -> int:
        try:
            view = memoryview(buffer).cast("B")
        except TypeError as exc:
            raise ReaderTypeError(f"readinto needs a writable bytes-like object: {exc}") from exc
        if view.readonly:
            raise ReaderTypeError("readinto needs a writable buffer, got a read-only one")
        data = self.read(len(view))
        view[: len(data)] = data
        return len(data)

    def read(self, size: int | None = -1) -> bytes:
        if size is not None and (isinstance(size, bool) or not isinstance(size, int)):
            raise ReaderTypeError(f"read size must be an int or None, got {size!r}")
        total = self.size
        start = self._pos
        end = total if size is None or size < 0 else min(total, start + size)
        if start >= end:
            return b""
        lo, hi = self._window_start, self._window_start + len(self._window)
        if not (lo <= start and end <= hi):
            fetch_end = min(total, max(end, start + self._readahead))
            bucket, key = self.bucket, self.key

            etag = self._etag

            async def fetch(store: S3Store) -> tuple[bytes, str | None]:
                # Every window is pinned to the first one's ETag: never mix two versions.
                return await store.read_range(bucket, key, start, fetch_end, if_match=etag)

            self._window, self._etag = self._driver.run(fetch)
            self._window_start = lo = start
        self._pos = end
        return self._window[start - lo : end - lo]

    def close(self) -> None:
        if not self.closed:
            self._driver.close()
            self._window = b""
        super().close()

    def __enter__(self) -> S3ObjectReader:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
