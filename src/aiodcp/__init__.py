"""aiodcp: fast, asyncio-native saving and loading of PyTorch Distributed Checkpoints on S3.

Two ways in, each way round::

    await aiodcp.load_checkpoint(state_dict, "s3://bucket/ckpt", region="us-east-1")
    dcp.load(state_dict, storage_reader=aiodcp.S3StorageReader("s3://bucket/ckpt"))
    await aiodcp.save_checkpoint(state_dict, "s3://bucket/ckpt", region="us-east-1")
    dcp.save(state_dict, storage_writer=aiodcp.S3StorageWriter("s3://bucket/ckpt"))

and the same for Hugging Face safetensors checkpoints: ``await aiodcp.load_safetensors(url)``,
``aiodcp.S3HuggingFaceStorageReader(url)``.

``import aiodcp`` imports only the light modules (errors, configuration, stats). The names whose
modules bring in the store and the DCP adapter (``S3StorageReader``, ``S3StorageWriter``,
``load_checkpoint``, ``save_checkpoint``, ``prefetch``, ``PrefetchHandle``, ``S3ObjectReader``)
are imported on first access (PEP 562): a process that only inspects metadata, or only builds a
config, never pays for them. So are the load's range and reader classes (``ItemRange``,
``RangeGroup``, ``ChunkBuffer``, ``SequentialReader``), which a save does not use. The S3
stack (botocore, aiobotocore, aiohttp) is imported only by a store outside the plain case
(``_native``), when it needs it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING as _TYPE_CHECKING
from typing import Any as _Any

from ._config import ReaderConfig, WriterConfig
from ._errors import (
    AccessDeniedError,
    AiodcpError,
    CheckpointExistsError,
    CheckpointFormatError,
    ChecksumMismatchError,
    ConcurrentSaveError,
    ConditionalWriteError,
    ConfigError,
    InvalidPathError,
    InvalidRangeError,
    LoadCancelledError,
    MissingDependencyError,
    NoCredentialsError,
    NoSuchBucketError,
    NotFoundError,
    ObjectChangedError,
    PeerLoadError,
    PeerSaveError,
    ReaderTypeError,
    SafetensorsHeaderError,
    SaveCancelledError,
    SequentialAccessError,
    StorageError,
    TransferError,
    TruncatedObjectError,
    UnsupportedDtypeError,
)
from ._stats import LoadStats, RequestMetrics, SaveStats
from ._version import __version__

if _TYPE_CHECKING:
    from ._api import load_checkpoint, save_checkpoint
    from ._objectreader import S3ObjectReader
    from ._planner import ItemRange, RangeGroup
    from ._prefetch import PrefetchHandle, prefetch
    from ._reader import ChunkBuffer, SequentialReader
    from .dcp import S3StorageReader, S3StorageWriter
    from .safetensors import LoadedTensors, S3HuggingFaceStorageReader, load_safetensors

__all__ = [
    "AccessDeniedError",
    "AiodcpError",
    "CheckpointExistsError",
    "CheckpointFormatError",
    "ChecksumMismatchError",
    "ChunkBuffer",
    "ConcurrentSaveError",
    "ConditionalWriteError",
    "ConfigError",
    "InvalidPathError",
    "InvalidRangeError",
    "ItemRange",
    "LoadCancelledError",
    "LoadStats",
    "LoadedTensors",
    "MissingDependencyError",
    "NoCredentialsError",
    "NoSuchBucketError",
    "NotFoundError",
    "ObjectChangedError",
    "PeerLoadError",
    "PeerSaveError",
    "PrefetchHandle",
    "RangeGroup",
    "ReaderConfig",
    "ReaderTypeError",
    "RequestMetrics",
    "S3HuggingFaceStorageReader",
    "S3ObjectReader",
    "S3StorageReader",
    "S3StorageWriter",
    "SafetensorsHeaderError",
    "SaveCancelledError",
    "SaveStats",
    "SequentialAccessError",
    "SequentialReader",
    "StorageError",
    "TransferError",
    "TruncatedObjectError",
    "UnsupportedDtypeError",
    "WriterConfig",
    "__version__",
    "load_checkpoint",
    "load_safetensors",
    "prefetch",
    "save_checkpoint",
]

_LAZY = {
    "load_checkpoint": "._api",
    "S3ObjectReader": "._objectreader",
    "PrefetchHandle": "._prefetch",
    "prefetch": "._prefetch",
    "S3StorageReader": ".dcp._storage_reader",
    "S3HuggingFaceStorageReader": ".safetensors._storage_reader",
    "load_safetensors": ".safetensors._api",
    "LoadedTensors": ".safetensors._api",
    "S3StorageWriter": ".dcp._storage_writer",
    "save_checkpoint": "._api",
    "ItemRange": "._planner",
    "RangeGroup": "._planner",
    "ChunkBuffer": "._reader",
    "SequentialReader": "._reader",
}
"""Public names imported on first access, and the module that defines each."""


def __getattr__(name: str) -> _Any:
    import importlib

    module = _LAZY.get(name)
    if module is not None:
        value = getattr(importlib.import_module(module, __name__), name)
        globals()[name] = value  # later accesses are plain attribute lookups
        return value
    if not name.startswith("__"):
        # a submodule (``aiodcp.dcp``, ``aiodcp._store``...): as reachable as when this module
        # imported them all
        import importlib.util

        if importlib.util.find_spec(f"{__name__}.{name}") is not None:
            return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))  # the lazy names before their first access
