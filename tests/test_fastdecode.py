"""decode_into (straight into the destination) gives exactly what torch.load + narrow gives."""

from __future__ import annotations

import copy
import io
import random
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed.checkpoint as dcp
from hypothesis import given, settings
from hypothesis import strategies as st

import aiodcp
from aiodcp.dcp._fastdecode import decode_into

from conftest import assert_same, save_checkpoint, upload_dir

DTYPES = [
    torch.float32,
    torch.float64,
    torch.float16,
    torch.bfloat16,
    torch.int8,
    torch.uint8,
    torch.int16,
    torch.int32,
    torch.int64,
    torch.bool,
    torch.complex64,
    torch.complex128,
]


def saved(tensor: torch.Tensor) -> aiodcp.ChunkBuffer:
    raw = io.BytesIO()
    torch.save(tensor, raw)
    data = raw.getvalue()
    rng = random.Random(len(data))
    cuts = sorted(rng.sample(range(1, len(data)), min(5, len(data) - 1)))
    views = [memoryview(data)[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)], strict=True)]
    return aiodcp.ChunkBuffer(views)


def reference(tensor: torch.Tensor, offsets: list[int], lengths: list[int]) -> torch.Tensor:
    out = torch.load(io.BytesIO(_bytes(tensor)), weights_only=True)
    for dim, (o, n) in enumerate(zip(offsets, lengths, strict=True)):
        out = out.narrow(dim, o, n)
    return out


def _bytes(tensor: torch.Tensor) -> bytes:
    raw = io.BytesIO()
    torch.save(tensor, raw)
    return raw.getvalue()


def random_tensor(dtype: torch.dtype, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if dtype == torch.bool:
        return torch.rand(shape, generator=g) > 0.5
    if dtype.is_complex:
        return torch.randn(shape, dtype=dtype, generator=g)
    if dtype.is_floating_point:
        return torch.randn(shape, generator=g).to(dtype)
    info = torch.iinfo(dtype)
    return torch.randint(info.min, info.max, shape, dtype=dtype, generator=g)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(), (0,), (7,), (5, 3), (4, 0, 2), (3, 4, 5)], ids=str)
def test_whole_tensors_take_the_fast_path(dtype: torch.dtype, shape: tuple[int, ...]) -> None:
    tensor = random_tensor(dtype, shape, 1)
    target = (
        torch.zeros(shape, dtype=dtype) if dtype != torch.bool else torch.ones(shape, dtype=dtype)
    )
    lengths = list(shape)
    assert decode_into(saved(tensor), [0] * len(shape), lengths, target)
    assert torch.equal(target, reference(tensor, [0] * len(shape), lengths))


@settings(max_examples=150, deadline=None)
@given(
    dtype=st.sampled_from(DTYPES),
    shape=st.lists(st.integers(1, 5), min_size=1, max_size=3).map(tuple),
    data=st.data(),
)
def test_narrowed_regions_match_torch_load(
    dtype: torch.dtype, shape: tuple[int, ...], data: st.DataObject
) -> None:
    tensor = random_tensor(dtype, shape, 2)
    offsets = [data.draw(st.integers(0, n - 1)) for n in shape]
    lengths = [data.draw(st.integers(1, n - o)) for n, o in zip(shape, offsets, strict=True)]
    expected = reference(tensor, offsets, lengths)
    target = torch.zeros(lengths, dtype=dtype)
    if decode_into(saved(tensor), offsets, lengths, target):
        assert torch.equal(target, expected)
    else:
        # Only strided regions may fall back: a contiguous region must take the fast path.
        assert not expected.is_contiguous() or _is_strided_region(shape, offsets, lengths)


def _is_strided_region(shape: tuple[int, ...], offsets: list[int], lengths: list[int]) -> bool:
    partial = [
        i
        for i, (o, n, s) in enumerate(zip(offsets, lengths, shape, strict=True))
        if (o, n) != (0, s)
    ]
    if not partial:
        return False
    first = partial[0]
    return any(i != first for i in partial) or any(lengths[d] != 1 for d in range(first))


def test_unusual_items_fall_back() -> None:
    tensor = torch.randn(6, 4)
    # Stored non-contiguous (a transposed view keeps its strides through torch.save).
    assert not decode_into(saved(tensor.t()), [0, 0], [4, 6], torch.zeros(4, 6))
    # dtype or shape mismatch with the destination, non-contiguous destination.
    assert not decode_into(saved(tensor), [0, 0], [6, 4], torch.zeros(6, 4, dtype=torch.float64))
    assert not decode_into(saved(tensor), [0, 0], [6, 4], torch.zeros(4, 6).t())
    # Not a tensor at all, and not a zip.
    assert not decode_into(saved({"a": 1}), [], [], torch.zeros(()))  # type: ignore[arg-type]
    assert not decode_into(
        aiodcp.ChunkBuffer([b"not a zip file at all......"]), [0], [1], torch.zeros(1)
    )


def test_checkpoint_loads_identically_with_and_without_fast_decode(
    tmp_path: Path, s3: Any, bucket: str, reader_kwargs: dict[str, Any]
) -> None:
    g = torch.Generator().manual_seed(9)
    sd: dict[str, Any] = {f"t{d}": random_tensor(d, (9, 5), 3) for d in DTYPES}
    sd["transposed"] = torch.randn(5, 9, generator=g).t()
    sd["scalar"] = torch.tensor(2.5)
    sd["empty"] = torch.empty(0, 3)
    local = save_checkpoint(copy.deepcopy(sd), tmp_path / "fd", thread_count=2)
    upload_dir(s3, local, bucket, "fd")
    results = []
    for fast in (True, False):
        state = {k: torch.zeros_like(v) for k, v in sd.items()}
        with aiodcp.S3StorageReader(f"s3://{bucket}/fd", fast_decode=fast, **reader_kwargs) as r:
            dcp.load(state, storage_reader=r)
            results.append((state, r._fast_decoded))
    (fast_state, fast_count), (slow_state, slow_count) = results
    assert_same(fast_state, sd)
    assert_same(slow_state, sd)
    assert slow_count == 0
    # All but the transposed tensor (zeros_like keeps its strides: a non-contiguous destination)
    # and the empty one (DCP plans no read for a tensor without elements).
    assert fast_count == len(sd) - 2
