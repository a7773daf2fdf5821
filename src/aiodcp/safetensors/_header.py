"""A safetensors file's header: parsed once, every rule checked, before any tensor is touched.

The format (huggingface/safetensors): a little-endian u64 ``N``; ``N`` bytes of UTF-8 JSON
(starting with ``{``, possibly padded with spaces); then the data buffer, to the end of the
file. The JSON maps each tensor name to ``{"dtype", "shape", "data_offsets": [begin, end]}``
(offsets relative to the buffer, end exclusive; row-major, little-endian) and may hold
``"__metadata__"``, a map of strings to strings. Tensors cover the buffer exactly: no holes,
no overlaps, and the buffer ends where the file ends.

Data flow::

    the first bytes of the file (one GET: FIRST_READ_BYTES, or the whole file if shorter)
        -> header_length(first, file_size)       N, checked against the file and the limit
        -> (a second GET for bytes [len(first), 8 + N) only when the header is longer)
    parse_header(raw, file_size, where)          one validator: every rule below raises its own
        -> Header(tensors, metadata, data_start) error (``SafetensorsHeaderError.rule``), so
                                                 the rest of the code sees plain, trusted facts

The rules (their names are the ``SafeTensorError`` variants of the reference implementation
where one exists): ``HeaderTooSmall`` (shorter than 8 bytes), ``HeaderTooLarge`` (``N`` over
100,000,000), ``InvalidHeaderLength`` (``8 + N`` beyond the file), ``InvalidHeader`` (not
UTF-8), ``InvalidHeaderStart`` (not ``{``), ``InvalidHeaderDeserialization`` (not JSON, not an
object, an entry that is not ``{dtype, shape, data_offsets}``, ``__metadata__`` that is not a
map of strings), ``DuplicateTensorName``, ``UnknownDtype``, ``InvalidShape``, ``InvalidOffset``
(not two integers ``0 <= begin <= end``), ``TensorInvalidInfo`` (the shape's byte count is not
``end - begin``), ``MisalignedSlice`` (a sub-byte dtype whose tensor does not end on a byte),
``OverlappingTensors`` and ``HoleInData`` (tensors sorted by offset must each begin where the
previous ended, the first at 0), ``MetadataIncompleteBuffer`` (the buffer does not end at the
end of the file).

Pure: standard library only (no torch: ``safetensors/_format.py`` maps dtypes to torch's).
"""

from __future__ import annotations

import json
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .._errors import SafetensorsHeaderError

__all__ = [
    "DTYPE_BITS",
    "FIRST_READ_BYTES",
    "HEADER_LIMIT_BYTES",
    "Header",
    "TensorEntry",
    "header_length",
    "parse_header",
]

HEADER_LIMIT_BYTES = 100_000_000
"""The reference implementation's limit on ``N``, the JSON header's length."""

FIRST_READ_BYTES = 128 * 1024
"""Bytes of each file the first GET asks for: the length and the header together. Headers of
Hugging Face shards hold ~100 bytes per tensor (a few hundred tensors per shard: 10-80 KB); a
longer one costs a second GET for its rest. 128 KiB take ~1.5 ms at 85 MB/s, far less than a
second request's time to first byte on S3."""

DTYPE_BITS: Mapping[str, int] = {
    "BOOL": 8,
    "U8": 8,
    "I8": 8,
    "F8_E5M2": 8,
    "F8_E4M3": 8,
    "F8_E8M0": 8,
    "F8_E4M3FNUZ": 8,
    "F8_E5M2FNUZ": 8,
    "I16": 16,
    "U16": 16,
    "F16": 16,
    "BF16": 16,
    "I32": 32,
    "U32": 32,
    "F32": 32,
    "F64": 64,
    "I64": 64,
    "U64": 64,
    "C64": 64,
    "F4": 4,
    "F6_E2M3": 6,
    "F6_E3M2": 6,
}
"""Every dtype the format defines, with its size in bits."""

_ENTRY_FIELDS = frozenset(("dtype", "shape", "data_offsets"))


@dataclass(frozen=True, slots=True)
class TensorEntry:
    """One tensor of a file: its safetensors ``dtype`` name, ``shape`` (as in the header) and
    bytes ``[begin, end)`` of the file (absolute offsets: the data buffer starts at 8 + N)."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def length(self) -> int:
        return self.end - self.begin


@dataclass(frozen=True, slots=True)
class Header:
    """A validated header: the tensors in file order, ``__metadata__`` (None if absent), where
    the data buffer begins, and the file's size."""

    tensors: tuple[TensorEntry, ...]
    metadata: Mapping[str, str] | None
    data_start: int
    file_size: int


def _error(where: str, rule: str, message: str, **context: Any) -> SafetensorsHeaderError:
    return SafetensorsHeaderError(
        f"{where}: not a valid safetensors file ({rule}): {message}", rule=rule, **context
    )


def header_length(first: bytes, file_size: int, where: str, **context: Any) -> int:
    """``N``, the header's length, from the file's first bytes (at least 8 of them, unless the
    file is shorter), checked against the file's size and the format's limit."""
    if file_size < 8 or len(first) < 8:
        raise _error(
            where,
            "HeaderTooSmall",
            f"the file is {file_size} bytes, shorter than the 8-byte header length",
            **context,
        )
    (length,) = struct.unpack_from("<Q", first)
    if length > HEADER_LIMIT_BYTES:
        raise _error(
            where,
            "HeaderTooLarge",
            f"its header length is {length} bytes, over the format's limit of {HEADER_LIMIT_BYTES}",
            **context,
        )
    if 8 + length > file_size:
        raise _error(
            where,
            "InvalidHeaderLength",
            f"its header length ({length} bytes) runs past the end of the file ({file_size} bytes)",
            **context,
        )
    return int(length)


def _unique_object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    seen: dict[str, Any] = {}
    for name, value in pairs:
        if name in seen:
            raise _Duplicate(name)
        seen[name] = value
    return seen


class _Duplicate(Exception):
    def __init__(self, name: str) -> None:
        self.name = name


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def parse_header(raw: bytes, file_size: int, where: str, **context: Any) -> Header:
    """The validated header of a file of ``file_size`` bytes whose first ``8 + N`` bytes are
    ``raw`` (``where`` names the file in errors; ``context`` goes into them: bucket, key).
    Raises ``SafetensorsHeaderError`` (``rule``: which rule the file breaks)."""
    length = header_length(raw, file_size, where, **context)
    if len(raw) < 8 + length:
        raise _error(
            where,
            "InvalidHeaderLength",
            f"{len(raw) - 8} bytes of its {length}-byte header could be read",
            **context,
        )
    data_start = 8 + length
    body = raw[8:data_start]
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise _error(
            where, "InvalidHeader", f"the header is not UTF-8 ({exc})", **context
        ) from None
    if not text.startswith("{"):
        raise _error(
            where,
            "InvalidHeaderStart",
            f"the header does not start with '{{' (it starts with {text[:16]!r})",
            **context,
        )
    try:
        document = json.loads(text, object_pairs_hook=_unique_object)
    except _Duplicate as dup:
        raise _error(
            where,
            "DuplicateTensorName",
            f"the name {dup.name!r} appears twice in the header",
            **context,
        ) from None
    except (ValueError, RecursionError) as exc:
        raise _error(
            where,
            "InvalidHeaderDeserialization",
            f"the header is not JSON ({str(exc)[:200]})",
            **context,
        ) from None
    if not isinstance(document, dict):
        raise _error(
            where,
            "InvalidHeaderDeserialization",
            f"the header is a JSON {type(document).__name__}, not an object",
            **context,
        )
    metadata = document.pop("__metadata__", None)
    if metadata is not None and not (
        isinstance(metadata, dict) and all(isinstance(v, str) for v in metadata.values())
    ):
        raise _error(
            where,
            "InvalidHeaderDeserialization",
            "its __metadata__ is not a map of strings to strings",
            **context,
        )
    buffer_size = file_size - data_start
    tensors: list[TensorEntry] = []
    for name, entry in document.items():
        tensors.append(_entry(name, entry, data_start, buffer_size, where, context))
    tensors.sort(key=lambda t: (t.begin, t.end))
    expected = data_start
    previous: TensorEntry | None = None
    for tensor in tensors:
        if tensor.begin < expected and previous is not None:
            raise _error(
                where,
                "OverlappingTensors",
                f"tensor {tensor.name!r} (data_offsets [{tensor.begin - data_start}, "
                f"{tensor.end - data_start}]) overlaps {previous.name!r} "
                f"([{previous.begin - data_start}, {previous.end - data_start}])",
                tensor=tensor.name,
                **context,
            )
        if tensor.begin > expected:
            raise _error(
                where,
                "HoleInData",
                f"tensor {tensor.name!r} begins at data offset {tensor.begin - data_start}, "
                f"but the tensors before it end at {expected - data_start}: the data buffer "
                "has a hole",
                tensor=tensor.name,
                **context,
            )
        expected, previous = tensor.end, tensor
    if expected != file_size:
        raise _error(
            where,
            "MetadataIncompleteBuffer",
            f"the tensors end at data offset {expected - data_start}, but the data buffer is "
            f"{buffer_size} bytes (file of {file_size} bytes, header of {length})",
            **context,
        )
    return Header(tuple(tensors), metadata, data_start, file_size)


def _entry(
    name: str,
    entry: object,
    data_start: int,
    buffer_size: int,
    where: str,
    context: dict[str, Any],
) -> TensorEntry:
    """One tensor's entry, checked on its own (the file-wide rules follow in the caller)."""
    if not isinstance(entry, dict) or not _ENTRY_FIELDS <= entry.keys():
        raise _error(
            where,
            "InvalidHeaderDeserialization",
            f"the entry of {name!r} is not an object with dtype, shape and data_offsets: "
            f"{str(entry)[:200]}",
            tensor=name,
            **context,
        )
    dtype = entry["dtype"]
    bits = DTYPE_BITS.get(dtype) if isinstance(dtype, str) else None
    if bits is None:
        raise _error(
            where,
            "UnknownDtype",
            f"tensor {name!r} has dtype {dtype!r}, which the format does not define",
            tensor=name,
            **context,
        )
    shape = entry["shape"]
    if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
        raise _error(
            where,
            "InvalidShape",
            f"tensor {name!r} has shape {shape!r}: not a list of non-negative integers",
            tensor=name,
            **context,
        )
    offsets = entry["data_offsets"]
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(_is_int(o) for o in offsets)
        or not 0 <= offsets[0] <= offsets[1]
        or offsets[1] > buffer_size
    ):
        raise _error(
            where,
            "InvalidOffset",
            f"tensor {name!r} has data_offsets {offsets!r}: not two integers "
            f"0 <= begin <= end <= {buffer_size} (the data buffer's size)",
            tensor=name,
            **context,
        )
    numel = 1
    for dim in shape:
        numel *= dim
    total_bits = numel * bits
    if total_bits % 8:
        raise _error(
            where,
            "MisalignedSlice",
            f"tensor {name!r} of {dtype} and shape {shape} is {total_bits} bits, not a whole "
            "number of bytes",
            tensor=name,
            **context,
        )
    begin, end = offsets
    if total_bits // 8 != end - begin:
        raise _error(
            where,
            "TensorInvalidInfo",
            f"tensor {name!r} of {dtype} and shape {shape} takes {total_bits // 8} bytes, but "
            f"its data_offsets [{begin}, {end}] hold {end - begin}",
            tensor=name,
            **context,
        )
    return TensorEntry(name, dtype, tuple(shape), data_start + begin, data_start + end)
