"""The exceptions aiodcp raises.

Every error aiodcp raises derives from :class:`AiodcpError`. The tree::

    AiodcpError
    ├── ConfigError (ValueError)            a configuration value is out of range
    ├── InvalidPathError (ValueError)       not an ``s3://bucket[/prefix]`` URL, or a data file
    │                                       path in the metadata that escapes the checkpoint
    ├── InvalidRangeError (ValueError)      byte ranges that cannot be served (planner)
    ├── SequentialAccessError (ValueError)  the item reader used against its contract
    ├── ReaderTypeError (TypeError)         the item reader called with a wrong argument type
    ├── StorageError                        talking to the object store failed
    │   ├── NotFoundError (FileNotFoundError)      no such object / checkpoint
    │   │   └── NoSuchBucketError                  no such bucket
    │   ├── AccessDeniedError (PermissionError)    403 from the store
    │   ├── NoCredentialsError                     no credentials found anywhere
    │   ├── TruncatedObjectError                   object shorter than the metadata says
    │   ├── ObjectChangedError                     object replaced during a load (ETag)
    │   ├── TransferError                          network failure after all attempts
    │   └── ConditionalWriteError                  a save's conditional write was refused
    │       ├── CheckpointExistsError (FileExistsError)  a checkpoint is there (overwrite=False)
    │       └── ConcurrentSaveError                the checkpoint changed during the save
    ├── CheckpointFormatError               ``.metadata`` is not a DCP metadata pickle, a
    │   │                                   stored item is not what the metadata says
    │   ├── SafetensorsHeaderError          a safetensors header breaks a rule (``rule``)
    │   └── UnsupportedDtypeError           a tensor asked for is in a dtype torch lacks
    ├── ChecksumMismatchError               received bytes differ from the checkpoint's
    │                                       checksums, again when fetched once more
    ├── MissingDependencyError (ImportError) an optional dependency (zstandard) is needed
    ├── LoadCancelledError                  the load was aborted (another part failed)
    ├── PeerLoadError                       another rank of a shared multi-rank load failed
    ├── SaveCancelledError                  the save was aborted (cancelled, or a part failed)
    └── PeerSaveError                       another rank of a multi-rank save failed

Errors carry their context as attributes (``bucket``, ``key``, ``byte_range``...) and in their
message, because ``dcp.load`` wraps reader errors and sometimes keeps only their text. They pickle
(they cross process boundaries in distributed runs).
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "AccessDeniedError",
    "AiodcpError",
    "CheckpointExistsError",
    "CheckpointFormatError",
    "ChecksumMismatchError",
    "ConcurrentSaveError",
    "ConditionalWriteError",
    "ConfigError",
    "InvalidPathError",
    "InvalidRangeError",
    "LoadCancelledError",
    "MissingDependencyError",
    "NoCredentialsError",
    "NoSuchBucketError",
    "NotFoundError",
    "ObjectChangedError",
    "PeerLoadError",
    "PeerSaveError",
    "ReaderTypeError",
    "SafetensorsHeaderError",
    "SaveCancelledError",
    "SequentialAccessError",
    "StorageError",
    "TransferError",
    "TruncatedObjectError",
    "UnsupportedDtypeError",
]


class AiodcpError(Exception):
    """Root of every error aiodcp raises."""

    def __init__(self, message: str, **context: Any) -> None:
        super().__init__(message)
        self.message = message
        self.context = context
        for name, value in context.items():
            setattr(self, name, value)

    def __reduce__(self) -> tuple[Any, ...]:
        return (_rebuild, (type(self), self.message, self.context))

    def __str__(self) -> str:
        return self.message


def _rebuild(cls: type[AiodcpError], message: str, context: dict[str, Any]) -> AiodcpError:
    return cls(message, **context)


class ConfigError(AiodcpError, ValueError):
    """A configuration value is missing, of the wrong type or out of range."""


class InvalidPathError(AiodcpError, ValueError):
    """A checkpoint path is not ``s3://bucket[/prefix]``, or a metadata path escapes it."""


class InvalidRangeError(AiodcpError, ValueError):
    """Byte ranges that cannot be served: negative, reversed or partially overlapping."""


class SequentialAccessError(AiodcpError, ValueError):
    """The DCP item reader was used outside its sequential-access contract."""


class ReaderTypeError(AiodcpError, TypeError):
    """The DCP item reader was called with an argument of the wrong type."""


class StorageError(AiodcpError):
    """Talking to the object store failed. ``bucket`` and ``key`` say where.

    ``retryable``: whether a new request can fix it (a connection that broke, a 5xx or
    throttling reply); set where the error is translated, False unless said."""

    retryable: bool = False


class NotFoundError(StorageError, FileNotFoundError):
    """The object (checkpoint ``.metadata`` or a data file) does not exist."""


class NoSuchBucketError(NotFoundError):
    """The bucket does not exist."""


class AccessDeniedError(StorageError, PermissionError):
    """The store refused access (HTTP 403)."""


class NoCredentialsError(StorageError):
    """No credentials were found; configure them or use ``unsigned=True`` for public buckets."""


class TruncatedObjectError(StorageError):
    """An object is shorter than the checkpoint metadata says it is."""


class ObjectChangedError(StorageError):
    """An object was replaced while it was being loaded (its ETag changed)."""


class TransferError(StorageError):
    """A transfer failed and every configured attempt was used."""


class CheckpointFormatError(AiodcpError):
    """The checkpoint metadata is not a PyTorch DCP ``Metadata`` pickle."""


class SafetensorsHeaderError(CheckpointFormatError):
    """A safetensors file's header breaks the format. ``rule`` names the rule it breaks (the
    reference implementation's error names: ``HeaderTooLarge``, ``InvalidOffset``,
    ``TensorInvalidInfo``...; the list is in ``aiodcp/safetensors/_header.py``), ``tensor``
    the tensor at fault when there is one; ``bucket`` and ``key`` name the file."""


class UnsupportedDtypeError(CheckpointFormatError):
    """A tensor the load asks for is stored in a dtype torch does not have (safetensors'
    ``F6_E2M3``, ``F6_E3M2``, an ``F4`` tensor with an odd last dim). ``fqn`` names the
    tensor, ``dtype`` the stored dtype."""


class ChecksumMismatchError(AiodcpError):
    """Bytes of a data file did not match the checksum the checkpoint recorded for them (or
    the store's own full-object checksum), and fetching them once more from the store did not
    help. Raised before torch sees them. ``bucket`` and ``key`` name the data file,
    ``item_range`` the stored item (file offsets, ``[start, end)``), ``byte_range`` the first
    block that differs, ``mismatched`` every block that did (file offsets)."""


class MissingDependencyError(AiodcpError, ImportError):
    """The checkpoint needs an optional dependency that is not installed."""


class LoadCancelledError(AiodcpError):
    """The load was aborted before this item was fetched (another part failed or was cancelled)."""


class PeerLoadError(AiodcpError):
    """Another rank of a multi-rank load that shares fetched bytes failed, so this rank stops
    too. ``rank`` is the failing rank (in the load's process group), ``cause`` its error."""


class ConditionalWriteError(StorageError):
    """The store refused a conditional write of a save: 412 (``If-None-Match: *`` found an
    object, ``If-Match`` found another ETag) or 409 ``ConditionalRequestConflict`` (another
    conditional write of the same key was under way). ``status`` says which."""


class CheckpointExistsError(ConditionalWriteError, FileExistsError):
    """A save with ``overwrite=False`` found a checkpoint (its ``.metadata``) at its path; the
    checkpoint there is untouched."""


class ConcurrentSaveError(ConditionalWriteError):
    """The checkpoint's ``.metadata`` changed (or was being written) while this save ran:
    another saver wrote the same path. This save committed nothing; the other's is intact."""


class SaveCancelledError(AiodcpError):
    """The save was aborted before it committed (cancelled, or another upload failed): nothing
    was committed, its multipart uploads were aborted and its data files deleted."""


class PeerSaveError(AiodcpError):
    """Another rank of a multi-rank save failed or was cancelled, so this rank's data files
    were deleted and nothing was committed. ``rank`` is that rank, ``cause`` its error."""
