"""decode_into (straight into the destination) gives exactly what torch.load + narrow gives."""

from __future__ import annotations

import copy
import io
import random
import threading
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed.checkpoint as dcp
from hypothesis import given, settings
from hypothesis import strategies as st

import aiodcp
from aiodcp.dcp import _fastdecode
from aiodcp.dcp._fastdecode import LayoutCache, decode_into

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
    return chunked(raw.getvalue())


def chunked(data: bytes) -> aiodcp.ChunkBuffer:
    """A ChunkBuffer over ``data`` cut into a few chunks (the same cuts for the same length)."""
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
            results.append((state, r.stats.fast_decoded_items))
    (fast_state, fast_count), (slow_state, slow_count) = results
    assert_same(fast_state, sd)
    assert_same(slow_state, sd)
    assert slow_count == 0
    # All but the transposed tensor (zeros_like keeps its strides: a non-contiguous destination)
    # and the empty one (DCP plans no read for a tensor without elements).
    assert fast_count == len(sd) - 2


# -- the layout cache ------------------------------------------------------------------------


@pytest.fixture
def layouts(monkeypatch: pytest.MonkeyPatch) -> LayoutCache:
    """An empty layout cache for this test (the module's own is left as it was)."""
    cache = LayoutCache()
    monkeypatch.setattr(_fastdecode, "LAYOUTS", cache)
    return cache


def _raw_bits(tensor: torch.Tensor) -> bytes:
    return tensor.reshape(-1).view(torch.uint8).numpy().tobytes()


@pytest.mark.parametrize(
    "dtype", [torch.float32, torch.bfloat16, torch.int64, torch.bool, torch.complex64], ids=str
)
@pytest.mark.parametrize("shape", [(), (1,), (4096,), (5, 3), (3, 4, 5)], ids=str)
def test_cached_layout_decodes_bit_identically(
    layouts: LayoutCache,
    dtype: torch.dtype,
    shape: tuple[int, ...],
) -> None:
    first, *others = [random_tensor(dtype, shape, seed) for seed in range(4)]
    assert decode_into(saved(first), [0] * len(shape), list(shape), torch.empty(shape, dtype=dtype))
    assert len(layouts) == 1 and layouts.parses == 1
    for tensor in others:
        target = torch.empty(shape, dtype=dtype)
        assert decode_into(saved(tensor), [0] * len(shape), list(shape), target)
        expected = reference(tensor, [0] * len(shape), list(shape))
        assert _raw_bits(target) == _raw_bits(expected)
    if len(shape) == 3:  # narrowed contiguous regions take the cached layout as well
        for offsets, lengths in [
            ([1, 0, 0], [2, 4, 5]),
            ([2, 0, 0], [1, 4, 5]),
            ([0, 0, 0], [1, 4, 5]),
        ]:
            target = torch.empty(lengths, dtype=dtype)
            assert decode_into(saved(others[0]), offsets, lengths, target)
            assert _raw_bits(target) == _raw_bits(reference(others[0], offsets, lengths))
    assert layouts.parses == 1  # every later item reused the layout


def _same_length_layouts(tmp_path: Path) -> dict[str, tuple[aiodcp.ChunkBuffer, torch.Tensor]]:
    """Items of one length and one end-of-directory record but each a different layout."""
    items: dict[str, tuple[bytes, torch.Tensor]] = {}
    for name, tensor in {
        "float32 (24,)": torch.randn(24),
        "int32 (24,)": torch.randint(-(2**31), 2**31 - 1, (24,), dtype=torch.int32),
        "float32 (4, 6)": torch.randn(4, 6),
        "float32 (6, 4)": torch.randn(6, 4),
        "float32 (2, 3, 4)": torch.randn(2, 3, 4),
        "storage offset 1": torch.randn(25)[1:],
        "storage offset 0 of 25": torch.randn(25)[:-1],
    }.items():
        items[name] = (_bytes(tensor), tensor)
    renamed = torch.randn(24)
    torch.save(renamed, tmp_path / "aaaaaaa.pt")  # records aaaaaaa/... instead of archive/...
    items["renamed records"] = ((tmp_path / "aaaaaaa.pt").read_bytes(), renamed)
    ends = {(len(raw), raw[-22:]) for raw, _ in items.values()}
    assert len(ends) == 1, "the items should share one cache key"
    return {name: (aiodcp.ChunkBuffer([raw]), tensor) for name, (raw, tensor) in items.items()}


def test_same_length_different_layout_never_reuses_a_wrong_entry(
    layouts: LayoutCache, tmp_path: Path
) -> None:
    items = _same_length_layouts(tmp_path)
    for _ in range(2):  # the second round finds every layout remembered or evicted
        for cached, primer in items.values():
            for name, (buffer, tensor) in items.items():
                # Decode one item (its layout is remembered), then every other one.
                shape = list(primer.shape)
                assert decode_into(cached, [0] * len(shape), shape, torch.empty_like(primer))
                target = torch.empty(tensor.shape, dtype=tensor.dtype)
                assert decode_into(buffer, [0] * tensor.dim(), list(tensor.shape), target), name
                assert torch.equal(target, tensor), name
                # The same bytes read as another dtype or shape would be wrong: refused.
                other = torch.float32 if tensor.dtype == torch.int32 else torch.int32
                assert not decode_into(
                    buffer,
                    [0] * tensor.dim(),
                    list(tensor.shape),
                    torch.empty(tensor.shape, dtype=other),
                )
                if tensor.dim() == 2:
                    flipped = torch.empty(tensor.shape[::-1], dtype=tensor.dtype)
                    assert not decode_into(buffer, [0, 0], list(flipped.shape), flipped), name
    assert all(len(kept) <= layouts.per_key for kept in layouts.values())


def test_cache_checks_every_byte_parsing_relied_on(
    layouts: LayoutCache,
) -> None:
    a, b = torch.randn(64), torch.randn(64)
    assert decode_into(saved(a), [0], [64], torch.empty(64))
    raw = bytearray(_bytes(b))
    eocd = len(raw) - 22
    cd_offset = int.from_bytes(raw[eocd + 16 : eocd + 20], "little")
    # CRC fields and the serialization id vary per item and are not relied on: still a hit.
    header = cd_offset - 4
    for _ in range(7):
        header = raw.index(b"PK\x01\x02", header + 4)
        raw[header + 16 : header + 20] = b"\x00\x01\x02\x03"
    target = torch.empty(64)
    assert decode_into(aiodcp.ChunkBuffer([bytes(raw)]), [0], [64], target)
    assert torch.equal(target, b)
    assert layouts.parses == 1  # a's layout, reused
    # A damaged local header, or a changed pickle byte, is not the remembered layout: parsed
    # again, and refused as parsing refuses it.
    damaged = bytearray(raw)
    damaged[damaged.index(b"PK\x03\x04", 10)] = ord("X")
    assert not decode_into(aiodcp.ChunkBuffer([bytes(damaged)]), [0], [64], torch.empty(64))
    assert layouts.parses == 2
    stored = bytearray(raw)
    pickle_at = stored.index(b"FloatStorage")
    stored[pickle_at : pickle_at + 12] = b"FloatStorag\x00"
    assert not decode_into(aiodcp.ChunkBuffer([bytes(stored)]), [0], [64], torch.empty(64))
    assert layouts.parses == 3


def test_cache_is_bounded(layouts: LayoutCache, tmp_path: Path) -> None:
    # Distinct lengths: one key each, more than the cache keeps.
    for k in range(1, layouts.max_keys + 20):
        tensor = torch.randn(64 * k)
        target = torch.empty(64 * k)
        assert decode_into(saved(tensor), [0], [64 * k], target)
        assert torch.equal(target, tensor)
        assert len(layouts) <= layouts.max_keys
    assert len(layouts) == layouts.max_keys
    # The oldest keys went first: the newest lengths are still there.
    assert max(length for length, _ in layouts.keys()) == len(_bytes(torch.randn(64 * k)))
    # More layouts under one key than it keeps.
    for buffer, tensor in _same_length_layouts(tmp_path).values():
        decode_into(buffer, [0] * tensor.dim(), list(tensor.shape), torch.empty_like(tensor))
        assert all(len(kept) <= layouts.per_key for kept in layouts.values())
    assert len(layouts) == layouts.max_keys


def test_concurrent_decoders_share_the_cache(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Four threads decode through one LayoutCache. Each decode has a ChunkBuffer of its own
    over the shared bytes, as in a load (a ChunkBuffer is a file with a position: threads
    sharing one would seek under each other, which made this test fail on a busy machine)."""
    layouts = LayoutCache(max_keys=2, per_key=2)  # plenty of evictions
    monkeypatch.setattr(_fastdecode, "LAYOUTS", layouts)
    items = [(b.read(), t) for b, t in _same_length_layouts(tmp_path).values()]
    items += [(_bytes(t), t) for t in (torch.randn(64), torch.randn(128), torch.randn(3, 64))]
    errors: list[BaseException] = []

    def work(seed: int) -> None:
        rng = random.Random(seed)
        try:
            for _ in range(300):
                raw, tensor = rng.choice(items)
                buffer = chunked(raw)
                target = torch.empty_like(tensor, memory_format=torch.contiguous_format)
                ok = decode_into(buffer, [0] * tensor.dim(), list(tensor.shape), target)
                assert ok and torch.equal(target, tensor)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(seed,)) for seed in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors
    assert len(layouts) <= 2
