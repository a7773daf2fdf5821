"""Hugging Face safetensors checkpoints, through the same read phase as DCP checkpoints.

Where things live: the header and its one validator, ``_header.py``; safetensors as a format
of the read phase (raw tensors, dtypes), ``_format.py``; the index, listing and header GETs,
``_catalog.py``; ``S3HuggingFaceStorageReader`` (``dcp.load``), ``_storage_reader.py``;
``load_safetensors`` (asyncio), ``_api.py``. The public names are imported on first access
(PEP 562), so ``import aiodcp.safetensors`` needs no S3 client.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ._api import LoadedTensors, load_safetensors
    from ._storage_reader import S3HuggingFaceStorageReader

__all__ = ["LoadedTensors", "S3HuggingFaceStorageReader", "load_safetensors"]

_LAZY = {
    "LoadedTensors": "._api",
    "load_safetensors": "._api",
    "S3HuggingFaceStorageReader": "._storage_reader",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(module, __name__), name)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
