"""Safetensors as a format of the read phase: every stored item is a tensor's raw bytes.

A safetensors file's header (``safetensors/_header.py``) gives, for each tensor, its dtype,
shape and byte range; the bytes are row-major and little-endian, with nothing around them. So
for the read phase (``dcp/_load.py``, through the ``StoredFormat`` contract of
``dcp/_format.py``) a stored item is exactly the tensor's bytes::

    storage_data[index]       SafetensorsInfo(relative_path, offset, length, dtype, shape)
    stored_tensor(req)        its torch dtype and shape (the header's, F4's last dim halved)
    probes(...)               (): nothing to locate, a slice's runs are at known offsets
    whole_receive(target)     RunReceive: the socket writes the destination, nothing to verify
    file_prefix(path)         the file's length and header (read first), before its tensors
    decode(req, buffer)       the bytes viewed as the stored tensor, narrowed, copied (bit for
                              bit when the destination has the stored dtype)

Dtypes: every one the format defines that torch has (``TORCH_DTYPES``), ``F4`` as torch's
packed ``float4_e2m1fn_x2`` (two values per byte: the last dim is halved, and must be even).
The others (``F6_E2M3``, ``F6_E3M2``) are listed by the metadata but kept out of
``storage_data``: a load that asks for one raises ``UnsupportedDtypeError`` naming tensor and
dtype before anything is fetched (``missing``).
"""

from __future__ import annotations

import ctypes
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch.distributed.checkpoint.planner import LoadPlanner, ReadItem

from .._errors import AiodcpError, CheckpointFormatError, UnsupportedDtypeError
from .._path import CheckpointPath
from .._planner import ItemRange
from .._reader import ChunkBuffer
from .._stats import StatsRecorder
from ..dcp._format import Locator, RunReceive, StoredTensor, shape_error

if TYPE_CHECKING:
    from torch.distributed.checkpoint.metadata import MetadataIndex

__all__ = [
    "INDEX_NAME",
    "TORCH_DTYPES",
    "SafetensorsFormat",
    "SafetensorsInfo",
    "torch_shape",
]

INDEX_NAME = "model.safetensors.index.json"
"""The index of a sharded checkpoint: ``{"metadata": {...}, "weight_map": {tensor: file}}``."""

TORCH_DTYPES: Mapping[str, torch.dtype] = {
    "BOOL": torch.bool,
    "U8": torch.uint8,
    "I8": torch.int8,
    "F8_E5M2": torch.float8_e5m2,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E8M0": torch.float8_e8m0fnu,
    "F8_E4M3FNUZ": torch.float8_e4m3fnuz,
    "F8_E5M2FNUZ": torch.float8_e5m2fnuz,
    "I16": torch.int16,
    "U16": torch.uint16,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I32": torch.int32,
    "U32": torch.uint32,
    "F32": torch.float32,
    "F64": torch.float64,
    "I64": torch.int64,
    "U64": torch.uint64,
    "C64": torch.complex64,
    "F4": torch.float4_e2m1fn_x2,
}
"""The safetensors dtypes torch has, and torch's dtype for each (the reference implementation's
own mapping, plus ``F8_E8M0`` and ``F4``, which it writes but does not read)."""

_PACKED = {"F4": 2}  # values per torch element


def torch_shape(dtype: str, shape: tuple[int, ...]) -> tuple[int, ...] | None:
    """The torch shape of a stored tensor of safetensors ``dtype`` and ``shape``: the same, but
    for a packed dtype (``F4``: two values per byte) whose last dim is divided by its packing;
    None when it cannot be (odd, or a 0-d tensor)."""
    packing = _PACKED.get(dtype)
    if packing is None:
        return shape
    if not shape or shape[-1] % packing:
        return None
    return (*shape[:-1], shape[-1] // packing)


@dataclass(frozen=True, slots=True)
class SafetensorsInfo:
    """Where one stored tensor lies (bytes ``[offset, offset + length)`` of ``relative_path``)
    and what it is: its safetensors ``dtype`` name, its torch ``shape``."""

    relative_path: str
    offset: int
    length: int
    dtype: str
    shape: tuple[int, ...]
    etag: str | None = None
    """The ETag of the file when its header was read (data GETs are pinned to it)."""
    header: bytes = field(default=b"", repr=False, compare=False)
    """The file's first bytes, its length and header (one object per file, shared by its
    tensors): a load that reads the file whole checks them with its tensors against the
    store's full-object checksum."""

    @property
    def torch_dtype(self) -> torch.dtype | None:
        return TORCH_DTYPES.get(self.dtype)


class SafetensorsFormat:
    """The ``StoredFormat`` of a safetensors checkpoint (see the module docstring).

    ``storage_data``: the tensors torch can hold; ``unsupported``: the others (their error is
    raised when a plan asks for one); ``etags``: the ETag of each file's header read, which
    every data GET is pinned to (If-Match), so a file replaced since is an
    ``ObjectChangedError``, never a mix of two versions."""

    slice_dtypes = frozenset(TORCH_DTYPES.values())
    max_item_bytes = sys.maxsize  # no zip64 limit: the bytes are the tensor's

    def __init__(
        self, *, path: CheckpointPath, storage_data: Mapping[MetadataIndex, SafetensorsInfo]
    ) -> None:
        self._path = path
        self.storage_data: dict[MetadataIndex, SafetensorsInfo] = {}
        self.unsupported: dict[MetadataIndex, SafetensorsInfo] = {}
        self.etags: dict[str, str] = {}
        """Object key -> the ETag its header was read from."""
        self._headers: dict[str, bytes] = {}
        for index, info in storage_data.items():
            self._headers.setdefault(info.relative_path, info.header)
            if info.torch_dtype is None:
                self.unsupported[index] = info
            else:
                self.storage_data[index] = info
            if info.etag is not None:
                self.etags[path.key(info.relative_path)] = info.etag

    def file_prefix(self, relative_path: str) -> bytes:
        """The file's length and header, read before the load: its tensors follow them."""
        return self._headers.get(relative_path, b"")

    def _info(self, req: ReadItem) -> SafetensorsInfo:
        return self.storage_data[req.storage_index]

    def missing(self, index: MetadataIndex) -> AiodcpError:
        info = self.unsupported.get(index)
        if info is not None:
            key = self._path.key(info.relative_path)
            return UnsupportedDtypeError(
                f"s3://{self._path.bucket}/{key}: tensor {index.fqn!r} is stored as "
                f"{info.dtype}, a dtype torch does not have; leave it out of the state dict "
                "(load_safetensors(keys=...) or a state dict without it)",
                bucket=self._path.bucket,
                key=key,
                fqn=index.fqn,
                dtype=info.dtype,
            )
        return CheckpointFormatError(
            f"{self._path.url}: the load plan asks for {index}, which no safetensors file of "
            "the checkpoint holds",
            bucket=self._path.bucket,
            key=self._path.key(INDEX_NAME),
            fqn=index.fqn,
        )

    def stored_tensor(self, req: ReadItem) -> StoredTensor | None:
        info = self._info(req)
        dtype = info.torch_dtype
        if dtype is None:
            return None
        return StoredTensor(dtype, info.shape)

    def probes(self, item_range: ItemRange, stored: StoredTensor) -> tuple[ItemRange, ...] | None:
        """None (fetched whole) unless the item is exactly the tensor's bytes, as the header
        validator made sure; nothing to probe."""
        return () if item_range.length == stored.nbytes else None

    def locator(self, stored: StoredTensor, length: int) -> Locator:
        raise RuntimeError("a safetensors item has no probes: nothing to locate")

    def whole_receive(self, target: torch.Tensor, stored: StoredTensor, length: int) -> RunReceive:
        return RunReceive(target)

    def decode(
        self, req: ReadItem, buffer: ChunkBuffer, planner: LoadPlanner, recorder: StatsRecorder
    ) -> None:
        """Copy the region ``req`` reads of the stored tensor in ``buffer`` (its raw bytes)
        into its destination: read straight into it when it is the whole tensor and a
        contiguous CPU tensor of the stored dtype; else through a tensor over the bytes,
        narrowed, and ``copy_`` (which converts, as torch's reader does, when the dtypes
        differ)."""
        info = self._info(req)
        dtype = info.torch_dtype
        if dtype is None:  # kept out of storage_data: group() raised missing() already
            raise self.missing(req.storage_index)
        target = planner.resolve_tensor(req).detach()
        if tuple(target.shape) != tuple(req.lengths):
            raise shape_error(self._path, info.relative_path, req, tuple(req.lengths), target)
        nbytes = len(buffer)
        whole = not any(req.storage_offsets) and tuple(req.lengths) == info.shape
        buffer.seek(0)
        if (
            whole
            and type(target) is torch.Tensor
            and target.device.type == "cpu"
            and target.dtype == dtype
            and target.is_contiguous()
        ):
            if nbytes and buffer.readinto(_bytes_of(target)) != nbytes:
                raise self._short(info, nbytes)
        else:
            stored = torch.empty(info.shape, dtype=dtype)
            if nbytes and buffer.readinto(_bytes_of(stored)) != nbytes:
                raise self._short(info, nbytes)
            region = stored
            for dim, (offset, length) in enumerate(
                zip(req.storage_offsets, req.lengths, strict=True)
            ):
                if offset != 0 or length != region.size(dim):
                    region = region.narrow(dim, offset, length)
            target.copy_(region)
        recorder.add(fast_decoded_items=1)
        planner.commit_tensor(req, target)

    def _short(self, info: SafetensorsInfo, nbytes: int) -> CheckpointFormatError:
        key = self._path.key(info.relative_path)
        return CheckpointFormatError(
            f"s3://{self._path.bucket}/{key}: a stored tensor's {info.length} bytes were "
            f"expected, {nbytes} arrived",
            bucket=self._path.bucket,
            key=key,
        )


def _bytes_of(tensor: torch.Tensor) -> ctypes.Array[ctypes.c_ubyte]:
    """The memory of a C-contiguous CPU ``tensor``, to ``readinto``."""
    nbytes = tensor.numel() * tensor.element_size()
    return (ctypes.c_ubyte * nbytes).from_address(tensor.data_ptr())
