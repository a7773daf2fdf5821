"""DCP's own storage format: what the read phase needs to know of ``.distcp`` data files.

A DCP checkpoint's ``.metadata`` maps each stored item (``MetadataIndex``) to a
``_StorageInfo(relative_path, offset, length, transform_descriptors)``: bytes of one data file,
packed back to back. Each stored tensor is a small ``torch.save`` zip archive (the only parser of
it is ``dcp/_fastdecode.py``), possibly wrapped by stream transforms (``stream.zstd/1``);
non-tensor values are pickles (``BYTE_IO``). ``DcpArchive`` is the ``StoredFormat``
(``dcp/_format.py``) over one checkpoint's metadata::

    stored_tensor(req)      dtype and shape of the stored chunk, from the tensor metadata
                            (None: transformed, bytes, or a chunk the metadata does not describe)
    probes(range, stored)   the archive's own bytes are the item minus the tensor's: at most
                            TAIL_BYTES of them, fetched as a head and a tail (probe_ranges)
    locator / whole_receive StoredTensorLocator / DirectReceive: the local headers say where
                            the storage bytes begin, the central directory is checked against them
    decode(req, buffer)     transforms -> BYTE_IO: planner.load_bytes (safe_bytes: weights_only
                            check first); tensors: decode_into, else torch.load -> narrow -> copy_

No I/O here: the read phase fetches, this module interprets.
"""

from __future__ import annotations

import io
import itertools
from collections.abc import Mapping, Sequence
from typing import IO, TYPE_CHECKING, Any, cast

import torch
from torch.distributed.checkpoint._extension import ExtensionRegistry, StreamTransformExtension
from torch.distributed.checkpoint.planner import LoadItemType, LoadPlanner, ReadItem

from .._config import ReaderConfig
from .._errors import CheckpointFormatError, MissingDependencyError
from .._path import CheckpointPath
from .._planner import ItemRange
from .._reader import ChunkBuffer
from .._stats import StatsRecorder
from ._fastdecode import TAIL_BYTES, DirectReceive, StoredTensorLocator, decode_into
from ._format import StoredTensor, shape_error
from ._slicing import SLICE_DTYPES, probe_ranges

if TYPE_CHECKING:
    from torch.distributed.checkpoint.filesystem import _StorageInfo
    from torch.distributed.checkpoint.metadata import MetadataIndex

__all__ = ["METADATA_NAME", "DcpArchive"]

METADATA_NAME = ".metadata"


_DIRECT_MAX_BYTES = 4 * 1024**3 - 1024**2  # beyond, torch.save writes zip64 records


def _narrow(
    tensor: torch.Tensor, offsets: torch.Size | Sequence[int], lengths: torch.Size | Sequence[int]
) -> torch.Tensor:
    """``tensor`` narrowed to ``lengths`` at ``offsets`` (torch's ``narrow_tensor_by_index``)."""
    for dim, (offset, length) in enumerate(zip(offsets, lengths, strict=True)):
        if offset != 0 or length != tensor.size(dim):
            tensor = torch.narrow(tensor, dim, offset, length)
    return tensor


class DcpArchive:
    """The ``StoredFormat`` of a DCP checkpoint (see the module docstring)."""

    slice_dtypes = SLICE_DTYPES
    max_item_bytes = _DIRECT_MAX_BYTES
    etags: Mapping[str, str] = {}  # pinned by each file's first response (and the load's start)

    def __init__(
        self,
        *,
        path: CheckpointPath,
        config: ReaderConfig,
        storage_data: Mapping[MetadataIndex, _StorageInfo],
        tensor_metadata: Mapping[str, Any],
        extensions: ExtensionRegistry | None = None,
    ) -> None:
        self._path = path
        self.config = config
        self.storage_data = storage_data
        self._tensor_metadata = tensor_metadata
        self._extensions = extensions if extensions is not None else ExtensionRegistry()

    def file_prefix(self, relative_path: str) -> bytes:
        """Nothing: a data file is its stored items, back to back from its first byte."""
        return b""

    def missing(self, index: MetadataIndex) -> CheckpointFormatError:
        return CheckpointFormatError(
            f"{self._path.url}: the load plan asks for {index}, which the "
            "checkpoint metadata does not list",
            bucket=self._path.bucket,
            key=self._path.key(METADATA_NAME),
        )

    def stored_tensor(self, req: ReadItem) -> StoredTensor | None:
        """The stored chunk ``req`` reads from (checkpoint metadata), None if the metadata does
        not tell or the item is transformed (its stored bytes are not the archive's)."""
        info = self.storage_data[req.storage_index]
        if getattr(info, "transform_descriptors", None):
            return None
        stored = self._stored_chunk(req)
        if stored is None:
            return None
        return StoredTensor(*stored)

    def _stored_chunk(self, req: ReadItem) -> tuple[torch.dtype, tuple[int, ...]] | None:
        """The dtype and shape of the stored chunk ``req`` reads from (checkpoint metadata),
        None if the metadata does not tell."""
        index = req.storage_index
        md = self._tensor_metadata.get(index.fqn)
        chunks = getattr(md, "chunks", None)
        if md is None or not chunks:
            return None
        offset = tuple(index.offset) if index.offset is not None else None
        hint = index.index
        # The hint first, then every chunk (not a copy of the list: a tensor saved by 1,024
        # ranks has as many chunks, and the coordinator asks once per stored item and rank).
        first = (chunks[hint],) if hint is not None and 0 <= hint < len(chunks) else ()
        for chunk in itertools.chain(first, chunks):
            if offset is None or tuple(chunk.offsets) == offset:
                return cast(torch.dtype, md.properties.dtype), tuple(chunk.sizes)
        return None

    def probes(
        self, item_range: ItemRange, stored: StoredTensor
    ) -> tuple[ItemRange, ItemRange] | None:
        """The head and tail of an archive to slice (``probe_ranges``), None if its overhead
        (the item's bytes that are not the tensor's) is not one plain tensor's archive."""
        overhead = item_range.length - stored.nbytes
        if not 0 < overhead <= TAIL_BYTES:
            return None  # not one plain tensor's archive: fetched whole
        return probe_ranges(item_range, overhead)

    def locator(self, stored: StoredTensor, length: int) -> StoredTensorLocator:
        return StoredTensorLocator(stored.dtype, stored.shape, length)

    def whole_receive(
        self, target: torch.Tensor, stored: StoredTensor, length: int
    ) -> DirectReceive:
        return DirectReceive(target, length)

    def decode(
        self, req: ReadItem, buffer: ChunkBuffer, planner: LoadPlanner, recorder: StatsRecorder
    ) -> None:
        """Decode one read item from ``buffer``, its whole stored item."""
        info = self.storage_data[req.storage_index]
        buffer.seek(0)
        stream: IO[bytes] = cast(IO[bytes], buffer)
        descriptors: Sequence[str] = getattr(info, "transform_descriptors", None) or ()
        if descriptors:
            stream = self._transform(descriptors, stream, info)
        if req.type == LoadItemType.BYTE_IO:
            data = stream.read()
            if self.config.safe_bytes:
                self._check_bytes(req, data, info)
            planner.load_bytes(req, io.BytesIO(data))
            return
        target = planner.resolve_tensor(req).detach()
        if (
            not descriptors
            and self.config.fast_decode
            and decode_into(buffer, req.storage_offsets, req.lengths, target)
        ):
            recorder.add(fast_decoded_items=1)
            planner.commit_tensor(req, target)
            return
        if not descriptors:
            buffer.seek(0)  # decode_into may have moved it
        if not stream.seekable():
            stream = io.BytesIO(stream.read())
        tensor = cast(torch.Tensor, torch.load(stream, map_location="cpu", weights_only=True))
        tensor = _narrow(tensor, req.storage_offsets, req.lengths)
        if target.size() != tensor.size():
            raise shape_error(self._path, info.relative_path, req, tuple(tensor.size()), target)
        target.copy_(tensor)
        planner.commit_tensor(req, target)

    def _check_bytes(self, req: ReadItem, data: bytes, info: _StorageInfo) -> None:
        """safe_bytes: refuse a value that torch's weights_only unpickler would not load."""
        try:
            torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        except Exception as exc:
            raise CheckpointFormatError(
                f"s3://{self._path.bucket}/{self._path.key(info.relative_path)}: the value of "
                f"{req.dest_index.fqn!r} is a pickle that needs more than plain data and "
                f"tensors ({type(exc).__name__}: {str(exc).splitlines()[0][:200]}); refused "
                "because safe_bytes=True. Load it with safe_bytes=False only if you trust "
                "this checkpoint.",
                bucket=self._path.bucket,
                key=self._path.key(info.relative_path),
                fqn=req.dest_index.fqn,
            ) from exc

    def _transform(
        self, descriptors: Sequence[str], stream: IO[bytes], info: _StorageInfo
    ) -> IO[bytes]:
        try:
            extensions = self._extensions.from_descriptor_list(descriptors)
        except ValueError as exc:
            where = f"s3://{self._path.bucket}/{self._path.key(info.relative_path)}"
            if "zstd" in str(exc).lower() or "zstandard" in str(exc).lower():
                raise MissingDependencyError(
                    f"{where} is zstd-compressed ({list(descriptors)}) and no zstd module is "
                    "installed: pip install 'aiodcp[zstd]'",
                    bucket=self._path.bucket,
                    key=self._path.key(info.relative_path),
                ) from exc
            raise CheckpointFormatError(
                f"{where}: unsupported stream transform {list(descriptors)} ({exc})",
                bucket=self._path.bucket,
                key=self._path.key(info.relative_path),
            ) from exc
        for extension in extensions:
            if isinstance(extension, StreamTransformExtension):
                stream = extension.transform_from(stream)
        return stream
