"""torch.save's archive written around a tensor's own memory (``dcp._savearchive``): byte for byte
what ``torch.save`` writes, for every dtype and layout a save sends that way."""

from __future__ import annotations

import io
import zlib

import pytest
import torch

from aiodcp.dcp._savearchive import _hash_combine, storage_memory, tensor_archive


def reference(tensor: torch.Tensor) -> bytes:
    buffer = io.BytesIO()
    torch.save(tensor, buffer)
    return buffer.getvalue()


def assembled(tensor: torch.Tensor) -> bytes:
    archive = tensor_archive(tensor)
    assert archive is not None
    data = bytes(archive.memory)
    assert len(archive.prefix) + len(data) + len(archive.suffix(0)) == archive.length
    return archive.prefix + data + archive.suffix(zlib.crc32(archive.memory))


DTYPES = [
    torch.float32,
    torch.float64,
    torch.float16,
    torch.bfloat16,
    torch.int64,
    torch.int32,
    torch.int16,
    torch.int8,
    torch.uint8,
    torch.bool,
    torch.complex64,
    torch.float8_e4m3fn,
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_archive_is_torch_save_byte_for_byte(dtype: torch.dtype) -> None:
    tensor = (torch.arange(70_000) % 7).to(dtype)
    assert assembled(tensor) == reference(tensor)


@pytest.mark.parametrize(
    "make",
    [
        lambda: torch.randn(300, 200),
        lambda: torch.randn(300, 200).t(),  # strided, but its storage is exactly its bytes
        lambda: torch.randn(2, 3, 4, 5).permute(3, 1, 0, 2),
        lambda: torch.randn(()),
        lambda: torch.randn(1),
        lambda: torch.randn(2**20 + 3),  # records after the storage at unaligned offsets
        lambda: torch.randn(5, 1, 7).expand(5, 1, 7),
    ],
)
def test_archive_layouts(make) -> None:  # type: ignore[no-untyped-def]
    tensor = make()
    assert assembled(tensor) == reference(tensor)


def test_the_storage_is_the_tensors_own_memory() -> None:
    tensor = torch.randn(1000)
    archive = tensor_archive(tensor)
    assert archive is not None
    view = archive.memory
    tensor[5] = 123.0  # the archive's view sees the tensor's memory, not a copy
    assert bytes(view[20:24]) == tensor[5:6].numpy().tobytes()
    assert storage_memory(tensor).nbytes == tensor.nbytes


def test_different_data_changes_the_suffix_as_torch_does() -> None:
    a, b = torch.zeros(50_000), torch.ones(50_000)
    archive = tensor_archive(a)
    assert archive is not None
    assert archive.suffix(zlib.crc32(storage_memory(b))) == reference(b)[-len(archive.suffix(0)) :]


def test_unusual_archives_are_left_to_torch_save() -> None:
    assert tensor_archive(torch.randn(0)) is None  # no storage record at all


def test_hash_combine_is_c10s() -> None:
    # c10::hash_combine as torch folds record CRCs into the serialization id (64-bit size_t)
    seed = 0
    for crc in (0xBE3E117F, 0x83DCEFB7, 0xE971773F, 0x19E33D85, 0x2EBAB754, 0x55679ED1):
        seed = _hash_combine(seed, crc)
    assert f"{seed:020d}" == "06609561050285432677"
