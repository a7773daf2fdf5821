"""aiodcp: fast, asyncio-native loading of PyTorch Distributed Checkpoints from S3.

Two ways in::

    await aiodcp.load_checkpoint(state_dict, "s3://bucket/ckpt", region="us-east-1")
    dcp.load(state_dict, storage_reader=aiodcp.S3StorageReader("s3://bucket/ckpt"))
"""

from __future__ import annotations

from ._api import load_checkpoint
from ._config import ReaderConfig
from ._errors import (
    AccessDeniedError,
    AiodcpError,
    CheckpointFormatError,
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
    ReaderTypeError,
    SequentialAccessError,
    StorageError,
    TransferError,
    TruncatedObjectError,
)
from ._objectreader import S3ObjectReader
from ._planner import ItemRange, RangeGroup
from ._prefetch import PrefetchHandle, prefetch
from ._reader import ChunkBuffer, SequentialReader
from ._stats import LoadStats, RequestMetrics
from ._version import __version__
from .dcp import S3StorageReader

__all__ = [
    "AccessDeniedError",
    "AiodcpError",
    "CheckpointFormatError",
    "ChunkBuffer",
    "ConfigError",
    "InvalidPathError",
    "InvalidRangeError",
    "ItemRange",
    "LoadCancelledError",
    "LoadStats",
    "MissingDependencyError",
    "NoCredentialsError",
    "NoSuchBucketError",
    "NotFoundError",
    "ObjectChangedError",
    "PeerLoadError",
    "PrefetchHandle",
    "RangeGroup",
    "ReaderConfig",
    "ReaderTypeError",
    "RequestMetrics",
    "S3ObjectReader",
    "S3StorageReader",
    "SequentialAccessError",
    "SequentialReader",
    "StorageError",
    "TransferError",
    "TruncatedObjectError",
    "__version__",
    "load_checkpoint",
    "prefetch",
]
