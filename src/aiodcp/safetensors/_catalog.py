"""What a safetensors checkpoint holds, read once per load: its files and their headers.

``.metadata``'s role in a DCP load is taken by the index and the headers. Data flow::

    fetch_catalog(store, path, recorder)                          on the I/O loop
        -> the files: a URL ending in ``.safetensors`` is that one file; else
           GET model.safetensors.index.json whole (timed: the request latency "auto" gaps are
           chosen by; checked against the store's full-object checksum before it is parsed, as
           DCP's ``.metadata``: ``_verify.read_verified``) -> its weight_map's files; or,
           with no index, every ``*.safetensors`` directly under the prefix (ListObjectsV2,
           as torch's HuggingFaceStorageReader lists its directory)
        -> every file's header, all files at once: one GET of its first FIRST_READ_BYTES gives
           the header length and the header (a second GET, pinned to the first's ETag, only
           for a longer header); a file the index names that does not exist is an error naming
           both
        -> FetchedCatalog (bytes only: what a shared load broadcasts to the other ranks)
    FetchedCatalog.parse()                                        off the loop
        -> every header through the one validator (``_header.parse_header``), the index
           checked against them -> torch's ``Metadata`` as ``HuggingFaceStorageReader`` builds
           it (a key per tensor name; ``DCP_SHARDING_INFO`` in a file's ``__metadata__`` gives
           each chunk's offsets in a sharded save), with ``SafetensorsInfo`` storage records
           that carry each file's ETag

Verification (issue 22, item 5): each ``SafetensorsInfo`` carries its file's header bytes, so
a load that reads a file whole (every tensor of it) checks the header and the tensors against
the store's full-object checksum (``FetchEngine``'s ``WholeFile``: a HEAD beside the first data
GETs; ``LoadStats.verified_bytes``). A file read in part is not checked (``unverified_bytes``).
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from dataclasses import dataclass
from typing import Any

import torch
from torch.distributed.checkpoint.metadata import (
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    TensorProperties,
    TensorStorageMetadata,
)

from .._errors import AiodcpError, CheckpointFormatError, InvalidPathError, NotFoundError
from .._path import CheckpointPath
from .._planner import request_latency_from_get
from .._stats import StatsRecorder
from .._store import S3Store
from .._verify import read_verified
from ._format import INDEX_NAME, SafetensorsInfo, torch_shape
from ._header import FIRST_READ_BYTES, Header, header_length, parse_header

__all__ = [
    "SHARDING_INFO_KEY",
    "SUFFIX",
    "FetchedCatalog",
    "FetchedHeader",
    "fetch_catalog",
    "safetensors_location",
]

SUFFIX = ".safetensors"
SHARDING_INFO_KEY = "DCP_SHARDING_INFO"
"""A file's ``__metadata__`` key with each tensor's ``saved_offsets`` (torch's sharded saves)."""


def safetensors_location(path: CheckpointPath) -> tuple[CheckpointPath, str | None]:
    """The directory a URL names and, for a URL ending in ``.safetensors``, its one file."""
    if path.prefix.endswith(SUFFIX):
        directory, _, name = path.prefix.rpartition("/")
        return CheckpointPath(path.bucket, directory), name
    return path, None


@dataclass(frozen=True, slots=True)
class FetchedHeader:
    """One file's first ``8 + N`` bytes (all of its header), its size and ETag."""

    name: str
    raw: bytes
    size: int
    etag: str | None


@dataclass(frozen=True, slots=True)
class FetchedCatalog:
    """The bytes that describe a safetensors checkpoint, as fetched (see the module docstring)."""

    bucket: str
    prefix: str
    index: bytes | None
    """The index's bytes; None when the files were listed (or named by the URL)."""
    headers: tuple[FetchedHeader, ...]
    request_latency_s: float
    """Estimated time to first byte of the first request (``max_gap_size="auto"`` uses it)."""
    checksum: str | None = None
    """The algorithm of the store's full-object checksum the index was checked against before
    it was parsed (None: not checked, or no index)."""

    @property
    def path(self) -> CheckpointPath:
        return CheckpointPath(self.bucket, self.prefix)

    @property
    def nbytes(self) -> int:
        return len(self.index or b"") + sum(len(h.raw) for h in self.headers)

    @property
    def url(self) -> str:
        return self.path.url

    def parse(self) -> Metadata:
        """Validate every header (``SafetensorsHeaderError``), check the index against them,
        and build the checkpoint's ``Metadata`` (module docstring)."""
        path = self.path
        if sys.byteorder != "little":  # the data is little-endian, copied as it is
            raise AiodcpError(
                f"{path.url}: loading safetensors needs a little-endian host (the format's "
                "data is little-endian and aiodcp copies it as it is)",
                bucket=path.bucket,
                key=path.prefix,
            )
        weight_map = _weight_map(self.index, path) if self.index is not None else None
        headers: dict[str, Header] = {}
        for fetched in self.headers:
            key = path.key(fetched.name)
            headers[fetched.name] = parse_header(
                fetched.raw, fetched.size, f"s3://{path.bucket}/{key}", bucket=path.bucket, key=key
            )
        if weight_map is not None:
            for tensor, name in weight_map.items():
                if not any(t.name == tensor for t in headers[name].tensors):
                    raise CheckpointFormatError(
                        f"s3://{path.bucket}/{path.key(INDEX_NAME)} says tensor {tensor!r} is "
                        f"in {name}, whose header does not list it",
                        bucket=path.bucket,
                        key=path.key(INDEX_NAME),
                        fqn=tensor,
                    )
        etags = {h.name: h.etag for h in self.headers}
        raw = {h.name: h.raw for h in self.headers}
        return _metadata(path, headers, etags, raw)


def _weight_map(index: bytes, path: CheckpointPath) -> dict[str, str]:
    """The index's ``weight_map`` (tensor -> file), checked: a JSON object of strings naming
    files under the checkpoint."""
    key = path.key(INDEX_NAME)
    where = f"s3://{path.bucket}/{key}"
    try:
        document = json.loads(index)
    except (ValueError, RecursionError) as exc:
        raise CheckpointFormatError(
            f"{where} is not JSON ({str(exc)[:200]}); is this a Hugging Face checkpoint?",
            bucket=path.bucket,
            key=key,
        ) from None
    weight_map = document.get("weight_map") if isinstance(document, dict) else None
    if not isinstance(weight_map, dict) or not all(
        isinstance(k, str) and isinstance(v, str) and v for k, v in weight_map.items()
    ):
        raise CheckpointFormatError(
            f"{where} has no weight_map of tensor names to file names",
            bucket=path.bucket,
            key=key,
        )
    for name in set(weight_map.values()):
        try:
            path.key(name)
        except InvalidPathError as exc:
            raise CheckpointFormatError(str(exc), bucket=path.bucket, key=key) from None
    return weight_map


async def fetch_catalog(
    store: S3Store,
    path: CheckpointPath,
    recorder: StatsRecorder | None = None,
    *,
    rank: int | None = None,
    only: str | None = None,
) -> FetchedCatalog:
    """Fetch what describes the safetensors checkpoint in the directory ``path`` (module
    docstring; ``only``: that one file of it), every request counted in ``recorder``.
    ``rank`` is refused: safetensors has no rank-local metadata."""
    if rank is not None:
        raise NotFoundError(
            f"{path.url}: a safetensors checkpoint has no rank-local metadata",
            bucket=path.bucket,
            key=path.prefix,
        )
    directory, single = path, only
    index: bytes | None = None
    checksum: str | None = None
    latency: float | None = None
    if single is not None:
        names = [single]
    else:
        index_key = directory.key(INDEX_NAME)
        if recorder is not None:
            recorder.add(requests=1)
        started = time.perf_counter()
        try:
            index, checksum = await read_verified(
                store,
                directory.bucket,
                index_key,
                stats=recorder,
                verify=store.config.verify_checksums,
            )
        except NotFoundError as exc:
            if exc.__class__ is not NotFoundError:
                raise  # no such bucket
            names = await _listed(store, directory)
        else:
            latency = request_latency_from_get(time.perf_counter() - started, len(index))
            if recorder is not None:
                recorder.add(bytes_received=len(index))
            names = sorted(set(_weight_map(index, directory).values()))

    # All files at once; the first failure cancels the others (nothing left running) and is
    # raised as it is.
    try:
        async with asyncio.TaskGroup() as group:
            tasks = [
                group.create_task(
                    _fetch_header(store, directory, name, recorder, index is not None)
                )
                for name in names
            ]
    except BaseExceptionGroup as failed:
        raise failed.exceptions[0] from None
    results = [task.result() for task in tasks]
    if latency is None:
        latency = min((t for _, t in results), default=0.0)
    return FetchedCatalog(
        directory.bucket,
        directory.prefix,
        index,
        tuple(h for h, _ in results),
        latency,
        checksum,
    )


async def _listed(store: S3Store, directory: CheckpointPath) -> list[str]:
    """The ``*.safetensors`` files directly under ``directory`` (no index there)."""
    prefix = f"{directory.prefix}/" if directory.prefix else ""
    keys = await store.list_keys(directory.bucket, prefix)
    names = sorted(
        k[len(prefix) :] for k in keys if k.endswith(SUFFIX) and "/" not in k[len(prefix) :]
    )
    if not names:
        raise NotFoundError(
            f"no {INDEX_NAME} and no *{SUFFIX} file at {directory.url}, is this a Hugging Face "
            "safetensors checkpoint?",
            bucket=directory.bucket,
            key=directory.key(INDEX_NAME),
        )
    return names


async def _fetch_header(
    store: S3Store,
    directory: CheckpointPath,
    name: str,
    recorder: StatsRecorder | None,
    indexed: bool,
) -> tuple[FetchedHeader, float]:
    """One file's header (``FetchedHeader``) and the first GET's estimated time to first byte:
    its first ``FIRST_READ_BYTES``, then the rest of a longer header, pinned to its ETag."""
    key = directory.key(name)
    where = f"s3://{directory.bucket}/{key}"
    if recorder is not None:
        recorder.add(requests=1)
    started = time.perf_counter()
    try:
        first, size, etag = await store.read_head(
            directory.bucket, key, FIRST_READ_BYTES, stats=recorder
        )
    except NotFoundError as exc:
        if exc.__class__ is not NotFoundError or not indexed:
            raise
        raise NotFoundError(
            f"{directory.url}/{INDEX_NAME} names {name}, and {where} does not exist; the "
            "checkpoint is incomplete",
            bucket=directory.bucket,
            key=key,
        ) from exc
    latency = request_latency_from_get(time.perf_counter() - started, len(first))
    if recorder is not None:
        recorder.add(bytes_received=len(first))
    length = header_length(first, size, where, bucket=directory.bucket, key=key)
    raw = first[: 8 + length]
    if len(raw) < 8 + length:
        if recorder is not None:
            recorder.add(requests=1)
        rest, _ = await store.read_range(directory.bucket, key, len(raw), 8 + length, if_match=etag)
        if recorder is not None:
            recorder.add(bytes_received=len(rest))
        raw += rest
    return FetchedHeader(name, raw, size, etag), latency


def _sharding_offsets(
    header: Header, where: str, **context: Any
) -> dict[str, tuple[int, ...]] | None:
    """Each tensor's ``saved_offsets`` from ``DCP_SHARDING_INFO`` in the header's
    ``__metadata__`` (torch's sharded saves), None when there is none."""
    text = (header.metadata or {}).get(SHARDING_INFO_KEY)
    if text is None:
        return None
    try:
        info = json.loads(text)
    except (ValueError, RecursionError):
        info = None
    offsets: dict[str, tuple[int, ...]] = {}
    if isinstance(info, dict):
        for tensor in header.tensors:
            entry = info.get(tensor.name)
            saved = entry.get("saved_offsets") if isinstance(entry, dict) else None
            if (
                isinstance(saved, list)
                and len(saved) == len(tensor.shape)
                and all(isinstance(o, int) and not isinstance(o, bool) and o >= 0 for o in saved)
            ):
                offsets[tensor.name] = tuple(saved)
            else:
                break
        else:
            return offsets
    raise CheckpointFormatError(
        f"{where}: its __metadata__ {SHARDING_INFO_KEY} does not give every tensor's "
        "saved_offsets (one non-negative integer per dim)",
        **context,
    )


def _metadata(
    path: CheckpointPath,
    headers: dict[str, Header],
    etags: dict[str, str | None],
    raw: dict[str, bytes],
) -> Metadata:
    """torch's ``Metadata`` of the checkpoint, as ``HuggingFaceStorageReader.read_metadata``
    builds it, with ``SafetensorsInfo`` storage records."""
    tensors: dict[str, TensorStorageMetadata] = {}
    storage_data: dict[MetadataIndex, SafetensorsInfo] = {}
    where_of: dict[MetadataIndex, str] = {}
    first_file: dict[str, str] = {}
    for name in sorted(headers):
        header = headers[name]
        key = path.key(name)
        where = f"s3://{path.bucket}/{key}"
        sharding = _sharding_offsets(header, where, bucket=path.bucket, key=key)
        for tensor in header.tensors:
            shape = torch_shape(tensor.dtype, tensor.shape)
            info = SafetensorsInfo(
                name,
                tensor.begin,
                tensor.length,
                tensor.dtype if shape is not None else f"{tensor.dtype} (odd last dim)",
                shape if shape is not None else tensor.shape,
                etags.get(name),
                raw.get(name, b""),
            )
            offsets = sharding[tensor.name] if sharding is not None else (0,) * len(tensor.shape)
            index = MetadataIndex(tensor.name, offsets)
            if index in storage_data:
                raise CheckpointFormatError(
                    f"{path.url}: tensor {tensor.name!r} at offsets {list(offsets)} is in both "
                    f"{where_of[index]} and {name}",
                    bucket=path.bucket,
                    key=key,
                    fqn=tensor.name,
                )
            storage_data[index] = info
            where_of[index] = name
            dtype = info.torch_dtype or torch.uint8  # unsupported: refused when asked for
            chunk = ChunkStorageMetadata(torch.Size(offsets), torch.Size(info.shape))
            known = tensors.get(tensor.name)
            if known is None:
                first_file[tensor.name] = name
                tensors[tensor.name] = TensorStorageMetadata(
                    properties=TensorProperties(dtype=dtype),
                    size=torch.Size(o + s for o, s in zip(offsets, info.shape, strict=True)),
                    chunks=[chunk],
                )
            else:
                if len(known.size) != len(offsets):
                    raise CheckpointFormatError(
                        f"{path.url}: tensor {tensor.name!r} has {len(offsets)} dims in {name} "
                        f"and {len(known.size)} in {first_file[tensor.name]}",
                        bucket=path.bucket,
                        key=key,
                        fqn=tensor.name,
                    )
                known.chunks.append(chunk)
                known.size = torch.Size(
                    max(k, o + s) for k, o, s in zip(known.size, offsets, info.shape, strict=True)
                )
    return Metadata(state_dict_metadata=tensors, storage_data=storage_data)  # type: ignore[arg-type]
