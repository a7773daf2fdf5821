"""Hostile safetensors headers: one validator, every rule its own error, checked before any
tensor is touched (no GET of a data byte, no destination written), and the index's own
errors. Unit tests of ``parse_header`` on crafted bytes, then the same files served by moto."""

from __future__ import annotations

import asyncio
import json
import struct
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import save

import aiodcp
from aiodcp.safetensors._header import HEADER_LIMIT_BYTES, parse_header

from conftest import S3Server


def blob(
    header: Any, data: bytes = b"", *, raw: bytes | None = None, length: int | None = None
) -> bytes:
    """A file: the header length (``length`` if given), the header (JSON of ``header``, or
    ``raw``), then ``data``."""
    text = raw if raw is not None else json.dumps(header).encode()
    return struct.pack("<Q", len(text) if length is None else length) + text + data


def entry(dtype: str, shape: list[int], begin: int, end: int) -> dict[str, Any]:
    return {"dtype": dtype, "shape": shape, "data_offsets": [begin, end]}


GOOD = {"a": entry("F32", [2], 0, 8), "b": entry("I8", [3], 8, 11)}
GOOD_DATA = bytes(11)

# (rule, file bytes): one file per rule, each breaking that rule alone
CASES: list[tuple[str, bytes]] = [
    ("HeaderTooSmall", b"\x01\x02\x03"),
    ("HeaderTooLarge", struct.pack("<Q", HEADER_LIMIT_BYTES + 1) + b"{}" + bytes(64)),
    ("InvalidHeaderLength", blob(GOOD, GOOD_DATA, length=10_000)),
    ("InvalidHeader", blob(None, raw=b'{"a": "\xff\xfe"}')),
    ("InvalidHeaderStart", blob(None, raw=b'["a", 1]')),
    ("InvalidHeaderDeserialization", blob(None, raw=b'{"a": {"dtype": "F32",')),
    ("InvalidHeaderDeserialization", blob({"a": [1, 2]}, GOOD_DATA)),
    ("InvalidHeaderDeserialization", blob({"a": {"dtype": "F32", "shape": [2]}}, bytes(8))),
    ("InvalidHeaderDeserialization", blob({**GOOD, "__metadata__": {"k": 1}}, GOOD_DATA)),
    (
        "DuplicateTensorName",
        blob(
            None,
            raw=b'{"a": {"dtype": "I8", "shape": [1], "data_offsets": [0, 1]}, '
            b'"a": {"dtype": "I8", "shape": [1], "data_offsets": [1, 2]}}',
            data=bytes(2),
        ),
    ),
    ("UnknownDtype", blob({"a": entry("F31", [2], 0, 8)}, bytes(8))),
    ("InvalidShape", blob({"a": entry("F32", [-2], 0, 8)}, bytes(8))),
    (
        "InvalidShape",
        blob({"a": {"dtype": "F32", "shape": [2.0], "data_offsets": [0, 8]}}, bytes(8)),
    ),
    ("InvalidOffset", blob({"a": entry("F32", [2], 8, 0)}, bytes(8))),
    ("InvalidOffset", blob({"a": entry("F32", [2], 0, 8_000)}, bytes(8))),
    ("InvalidOffset", blob({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0]}}, bytes(8))),
    ("TensorInvalidInfo", blob({"a": entry("F32", [3], 0, 8)}, bytes(8))),
    ("MisalignedSlice", blob({"a": entry("F4", [3], 0, 1)}, bytes(1))),
    (
        "OverlappingTensors",
        blob({"a": entry("F32", [2], 0, 8), "b": entry("I8", [4], 4, 8)}, bytes(8)),
    ),
    ("HoleInData", blob({"a": entry("F32", [1], 0, 4), "b": entry("I8", [3], 5, 8)}, bytes(8))),
    ("HoleInData", blob({"a": entry("F32", [1], 4, 8)}, bytes(8))),
    ("MetadataIncompleteBuffer", blob(GOOD, GOOD_DATA + b"trailing")),
]


def test_a_good_file_passes_and_says_where_its_tensors_lie() -> None:
    raw = blob(GOOD, GOOD_DATA)
    header = parse_header(raw, len(raw), "f")
    start = len(raw) - len(GOOD_DATA)
    assert header.data_start == start
    assert [(t.name, t.dtype, t.shape, t.begin, t.end) for t in header.tensors] == [
        ("a", "F32", (2,), start, start + 8),
        ("b", "I8", (3,), start + 8, start + 11),
    ]


def test_the_reference_writers_files_pass() -> None:
    tensors = {
        "w": torch.ones(3, 5),
        "z": torch.zeros(0, 2, dtype=torch.int64),
        "s": torch.tensor(2.0),
    }
    raw = save(tensors, metadata={"format": "pt"})
    header = parse_header(raw, len(raw), "f")
    assert header.metadata == {"format": "pt"}
    assert {t.name: t.shape for t in header.tensors} == {"w": (3, 5), "z": (0, 2), "s": ()}


@pytest.mark.parametrize(
    ("rule", "data"), CASES, ids=[f"{r}-{i}" for i, (r, _) in enumerate(CASES)]
)
def test_every_rule_is_its_own_error(rule: str, data: bytes) -> None:
    with pytest.raises(aiodcp.SafetensorsHeaderError) as info:
        parse_header(data, len(data), "s3://b/k", bucket="b", key="k")
    assert info.value.rule == rule
    assert f"({rule})" in str(info.value) and "s3://b/k" in str(info.value)
    assert info.value.bucket == "b" and info.value.key == "k"
    assert isinstance(info.value, aiodcp.CheckpointFormatError)


@settings(deadline=None, max_examples=300)
@given(st.binary(max_size=200), st.integers(min_value=0, max_value=400))
def test_arbitrary_bytes_raise_the_header_error_or_parse(data: bytes, extra: int) -> None:
    try:
        header = parse_header(data, len(data) + extra, "f")
    except aiodcp.SafetensorsHeaderError:
        return
    # whatever parsed, its tensors tile the data buffer exactly
    end = header.data_start
    for tensor in header.tensors:
        assert tensor.begin == end
        end = tensor.end
    assert end == header.file_size


@pytest.mark.parametrize(("rule", "data"), CASES[:3] + CASES[-3:], ids=lambda x: str(x)[:24])
def test_a_hostile_file_on_s3_fails_before_any_tensor_is_touched(
    rule: str,
    data: bytes,
    s3: Any,
    bucket: str,
    reader_kwargs: dict[str, Any],
    s3_server: S3Server,
) -> None:
    good = save({"x": torch.arange(4096, dtype=torch.float32)})
    s3.put_object(Bucket=bucket, Key="bad/a.safetensors", Body=good)
    s3.put_object(Bucket=bucket, Key="bad/b.safetensors", Body=data)
    s3.put_object(
        Bucket=bucket,
        Key="bad/model.safetensors.index.json",
        Body=json.dumps({"weight_map": {"x": "a.safetensors"}}),
    )
    s3_server.clear_log()
    destination = torch.full((4096,), -1.0)
    with pytest.raises(aiodcp.SafetensorsHeaderError) as info:
        asyncio.run(aiodcp.load_safetensors(f"s3://{bucket}/bad/b.safetensors", **reader_kwargs))
    assert info.value.rule == rule and info.value.key == "bad/b.safetensors"
    # through the index the good file loads; b is not part of it
    s3.put_object(
        Bucket=bucket,
        Key="bad/model.safetensors.index.json",
        Body=json.dumps({"weight_map": {"x": "a.safetensors", "y": "b.safetensors"}}),
    )
    s3_server.clear_log()
    with pytest.raises(aiodcp.SafetensorsHeaderError):
        asyncio.run(
            aiodcp.load_safetensors(f"s3://{bucket}/bad", into={"x": destination}, **reader_kwargs)
        )
    assert (destination == -1.0).all()  # nothing written
    header_reads = {
        r["path"].rsplit("/", 1)[-1]: r["range"]
        for r in s3_server.requests()
        if r["method"] == "GET"
    }
    # only the index and the heads of the files (a's may be cancelled once b's failed): no
    # tensor byte was asked for
    assert {"model.safetensors.index.json", "b.safetensors"} <= set(header_reads)
    assert set(header_reads) <= {"model.safetensors.index.json", "a.safetensors", "b.safetensors"}
    assert all(
        r["range"] is None or r["range"].startswith("bytes=0-")
        for r in s3_server.requests()
        if r["method"] == "GET"
    )


def test_index_errors_name_the_index_and_the_file(
    tmp_path: Path, s3: Any, bucket: str, reader_kwargs: dict[str, Any]
) -> None:
    s3.put_object(Bucket=bucket, Key="ix/a.safetensors", Body=save({"x": torch.ones(2)}))
    index = "ix/model.safetensors.index.json"
    url = f"s3://{bucket}/ix"
    s3.put_object(
        Bucket=bucket,
        Key=index,
        Body=json.dumps({"weight_map": {"x": "a.safetensors", "y": "gone.safetensors"}}),
    )
    with pytest.raises(
        aiodcp.NotFoundError, match=r"model.safetensors.index.json names gone.safetensors"
    ) as missing:
        asyncio.run(aiodcp.load_safetensors(url, **reader_kwargs))
    assert missing.value.key == "ix/gone.safetensors"
    s3.put_object(
        Bucket=bucket,
        Key=index,
        Body=json.dumps({"weight_map": {"x": "a.safetensors", "z": "a.safetensors"}}),
    )
    with pytest.raises(
        aiodcp.CheckpointFormatError,
        match=r"tensor 'z' is in a.safetensors, whose header does not list it",
    ):
        asyncio.run(aiodcp.load_safetensors(url, **reader_kwargs))
    s3.put_object(Bucket=bucket, Key=index, Body=b"{not json")
    with pytest.raises(aiodcp.CheckpointFormatError, match="is not JSON"):
        asyncio.run(aiodcp.load_safetensors(url, **reader_kwargs))
    s3.put_object(
        Bucket=bucket, Key=index, Body=json.dumps({"weight_map": {"x": "../other/a.safetensors"}})
    )
    with pytest.raises(aiodcp.CheckpointFormatError, match="outside its prefix"):
        asyncio.run(aiodcp.load_safetensors(url, **reader_kwargs))
    with pytest.raises(aiodcp.NotFoundError, match=r"no model\.safetensors\.index\.json and no"):
        asyncio.run(aiodcp.load_safetensors(f"s3://{bucket}/nothing-here", **reader_kwargs))


def test_a_tensor_the_state_dict_wants_that_no_file_has(
    s3: Any, bucket: str, reader_kwargs: dict[str, Any]
) -> None:
    s3.put_object(Bucket=bucket, Key="one/model.safetensors", Body=save({"x": torch.ones(2)}))
    with pytest.raises(aiodcp.ConfigError, match=r"no tensor\(s\) 'y'"):
        asyncio.run(
            aiodcp.load_safetensors(
                f"s3://{bucket}/one",
                into={"x": torch.zeros(2), "y": torch.zeros(2)},
                **reader_kwargs,
            )
        )
