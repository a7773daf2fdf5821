"""The ``torch.distributed.checkpoint`` adapter: ``S3StorageReader``.

``S3StorageReader`` is imported on first access (PEP 562), so the modules of this package that
need no S3 client (``_session``'s metadata fetch, ``_metadata``) import without it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ._storage_reader import S3StorageReader

__all__ = ["S3StorageReader"]


def __getattr__(name: str) -> Any:
    if name != "S3StorageReader":
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    from ._storage_reader import S3StorageReader

    return S3StorageReader


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))  # the lazy names before their first access
