"""Reading ``.metadata`` safely: a restricted unpickler that admits only DCP metadata types.

``.metadata`` is a pickle, and ``pickle.load`` on a crafted file runs arbitrary code. We unpickle
with ``find_class`` limited to the classes a ``torch.distributed.checkpoint.Metadata`` legitimately
contains (the metadata dataclasses, ``torch.Size``, dtypes, layouts, memory formats, paths), so a
hostile checkpoint fails with ``CheckpointFormatError`` instead of running code.
"""

from __future__ import annotations

import io
import pickle
from typing import Any

import torch
from torch.distributed.checkpoint.metadata import Metadata

from .._errors import CheckpointFormatError

__all__ = ["load_metadata"]

_ALLOWED: dict[str, frozenset[str]] = {
    "torch.distributed.checkpoint.metadata": frozenset(
        {
            "Metadata",
            "MetadataIndex",
            "StorageMeta",
            "TensorStorageMetadata",
            "TensorProperties",
            "ChunkStorageMetadata",
            "BytesStorageMetadata",
            "_MEM_FORMAT_ENCODING",
        }
    ),
    "torch.distributed.checkpoint.filesystem": frozenset({"_StorageInfo"}),
    "torch.serialization": frozenset({"_get_layout"}),
    "torch": frozenset({"Size"}),
    "pathlib": frozenset({"PosixPath", "PurePosixPath", "WindowsPath", "PureWindowsPath", "Path"}),
    "collections": frozenset({"OrderedDict"}),
    "builtins": frozenset({"set", "frozenset", "tuple", "list", "dict", "slice"}),
}


class _MetadataUnpickler(pickle.Unpickler):
    def __init__(self, data: bytes, where: str) -> None:
        super().__init__(io.BytesIO(data))
        self._where = where

    def find_class(self, module: str, name: str) -> Any:
        if name in _ALLOWED.get(module, ()):
            return super().find_class(module, name)
        if module == "torch":
            value = getattr(torch, name, None)
            if isinstance(value, (torch.dtype, torch.layout, torch.memory_format)):
                return value
        raise CheckpointFormatError(
            f"{self._where} refers to {module}.{name}, which a PyTorch DCP checkpoint's "
            "metadata never contains; refusing to unpickle it (a crafted .metadata could run "
            "code). If this checkpoint came from a custom planner you trust, load its metadata "
            "yourself with FileSystemReader.",
            module=module,
            name=name,
        )


def load_metadata(data: bytes, where: str) -> Metadata:
    """Unpickle ``data`` (the bytes of ``where``) with the restricted unpickler."""
    try:
        metadata = _MetadataUnpickler(data, where).load()
    except CheckpointFormatError:
        raise
    except Exception as exc:
        raise CheckpointFormatError(
            f"{where} is not a PyTorch DCP metadata file ({type(exc).__name__}: {exc}); "
            "check that the path points at a checkpoint saved with torch.distributed.checkpoint",
        ) from exc
    if not isinstance(metadata, Metadata) or not isinstance(
        getattr(metadata, "storage_data", None), dict
    ):
        raise CheckpointFormatError(
            f"{where} holds a {type(metadata).__name__}, not a DCP Metadata with storage_data; "
            "check that the path points at a checkpoint saved with torch.distributed.checkpoint",
        )
    return metadata
