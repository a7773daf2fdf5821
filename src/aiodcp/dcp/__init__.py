"""The ``torch.distributed.checkpoint`` adapter: ``S3StorageReader`` and ``S3StorageWriter``.

Both are imported on first access (PEP 562), so the modules of this package that need no S3
client (``_session``'s metadata fetch, ``_metadata``) import without them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ._storage_reader import S3StorageReader
    from ._storage_writer import S3StorageWriter

__all__ = ["S3StorageReader", "S3StorageWriter"]


def __getattr__(name: str) -> Any:
    if name == "S3StorageReader":
        from ._storage_reader import S3StorageReader

        return S3StorageReader
    if name == "S3StorageWriter":
        from ._storage_writer import S3StorageWriter

        return S3StorageWriter
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))  # the lazy names before their first access
