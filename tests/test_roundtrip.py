"""Round trips through a real S3 server: what we load equals what FileSystemReader loads."""

from __future__ import annotations

import asyncio
import copy
import threading
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint._extension import ZStandard

import aiodcp

from conftest import S3Server, assert_same, load_local, save_checkpoint, upload_dir


def full_state_dict() -> dict[str, Any]:
    g = torch.Generator().manual_seed(0)
    return {
        "f32": torch.randn(64, 33, generator=g),
        "f16": torch.randn(17, generator=g).half(),
        "bf16": torch.randn(8, 8, generator=g).bfloat16(),
        "f64": torch.randn(3, 3, 3, generator=g).double(),
        "i8": torch.randint(-128, 127, (100,), dtype=torch.int8, generator=g),
        "u8": torch.randint(0, 255, (7, 5), dtype=torch.uint8, generator=g),
        "i64": torch.arange(1000, dtype=torch.int64),
        "bool": torch.rand(50, generator=g) > 0.5,
        "c64": torch.randn(12, dtype=torch.complex64, generator=g),
        "scalar": torch.tensor(3.25),
        "empty": torch.empty(0, 4),
        "noncontig": torch.randn(10, 6, generator=g).t(),
        "nested": {
            "layer": {"w": torch.randn(5, 5, generator=g), "b": torch.zeros(5)},
            "list": [torch.ones(3), torch.full((2, 2), 7.0), 42, "text"],
        },
        "step": 1234,
        "name": "checkpoint-α",
        "hparams": {"lr": 0.001, "betas": (0.9, 0.999), "flags": [True, None]},
    }


def template_of(state_dict: dict[str, Any]) -> dict[str, Any]:
    """Same structure, tensors zeroed, plain values replaced: the load must fill them all."""

    def blank(value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            return torch.zeros_like(value)
        if isinstance(value, dict):
            return {k: blank(v) for k, v in value.items()}
        if isinstance(value, list):
            return [blank(v) for v in value]
        return None

    return blank(state_dict)


VARIANTS: dict[str, dict[str, Any]] = {
    "one-file": {},
    "threads": {"thread_count": 4},
    "zstd": {"_extensions": [ZStandard()]},
    "zstd-threads": {"thread_count": 3, "_extensions": [ZStandard()]},
}


@pytest.fixture(params=sorted(VARIANTS))
def checkpoint(
    request: pytest.FixtureRequest, tmp_path: Path, s3: Any, bucket: str
) -> tuple[str, dict[str, Any], Path]:
    sd = full_state_dict()
    local = save_checkpoint(copy.deepcopy(sd), tmp_path / "ckpt", **VARIANTS[request.param])
    upload_dir(s3, local, bucket, "runs/1/step-10")
    return f"s3://{bucket}/runs/1/step-10", sd, local


SETTINGS = [
    {},
    {"max_gap_size": 0, "part_size": 1024, "memory_budget": 4096, "max_concurrency": 3},
    {"max_gap_size": float("inf"), "part_size": 512, "memory_budget": 1, "max_concurrency": 1},
]


@pytest.mark.parametrize("settings", SETTINGS, ids=["defaults", "small-parts", "tiny-budget"])
def test_sync_dcp_load(
    checkpoint: tuple[str, dict[str, Any], Path],
    settings: dict[str, Any],
    reader_kwargs: dict[str, Any],
) -> None:
    url, sd, local = checkpoint
    expected = load_local(template_of(sd), local)
    actual = template_of(sd)
    with aiodcp.S3StorageReader(url, **reader_kwargs, **settings) as reader:
        dcp.load(actual, storage_reader=reader)
        stats = reader.stats
    assert_same(actual, expected)
    assert_same(actual, sd)
    assert stats is not None and stats.items > 0
    assert stats.bytes_used <= stats.bytes_requested


@pytest.mark.parametrize("settings", SETTINGS[:2], ids=["defaults", "small-parts"])
async def test_async_load_checkpoint(
    checkpoint: tuple[str, dict[str, Any], Path],
    settings: dict[str, Any],
    reader_kwargs: dict[str, Any],
) -> None:
    url, sd, _ = checkpoint
    actual = template_of(sd)
    stats = await aiodcp.load_checkpoint(actual, url, **reader_kwargs, **settings)
    assert_same(actual, sd)
    assert isinstance(stats, aiodcp.LoadStats)
    assert stats.requests >= 2  # .metadata and at least one data GET
    assert stats.bytes_used > 0 and stats.wall_time_s > 0


def test_partial_load_subset_of_keys(
    checkpoint: tuple[str, dict[str, Any], Path], reader_kwargs: dict[str, Any]
) -> None:
    url, sd, _ = checkpoint
    wanted = {"f32": torch.zeros(64, 33), "nested": {"layer": {"b": torch.ones(5)}}, "step": 0}
    with aiodcp.S3StorageReader(url, **reader_kwargs) as reader:
        dcp.load(wanted, storage_reader=reader)
    assert torch.equal(wanted["f32"], sd["f32"])
    assert torch.equal(wanted["nested"]["layer"]["b"], sd["nested"]["layer"]["b"])
    assert wanted["step"] == 1234


def test_reader_is_reusable_across_loads(
    checkpoint: tuple[str, dict[str, Any], Path], reader_kwargs: dict[str, Any]
) -> None:
    url, sd, _ = checkpoint
    with aiodcp.S3StorageReader(url, **reader_kwargs) as reader:
        first, second = template_of(sd), template_of(sd)
        dcp.load(first, storage_reader=reader)
        stats1 = reader.stats
        dcp.load(second, storage_reader=reader)
        stats2 = reader.stats
    assert_same(first, sd)
    assert_same(second, sd)
    assert stats1 is not None and stats2 is not None
    assert stats1.bytes_used == stats2.bytes_used  # per-load statistics, not cumulative


def test_dcp_load_inside_asyncio_run(
    checkpoint: tuple[str, dict[str, Any], Path], reader_kwargs: dict[str, Any]
) -> None:
    url, sd, _ = checkpoint
    actual = template_of(sd)

    async def main() -> None:
        # Blocking call from a coroutine: the reader's private loop runs the I/O.
        with aiodcp.S3StorageReader(url, **reader_kwargs) as reader:
            dcp.load(actual, storage_reader=reader)

    asyncio.run(main())
    assert_same(actual, sd)


def test_dcp_load_from_thread_with_running_loop(
    checkpoint: tuple[str, dict[str, Any], Path], reader_kwargs: dict[str, Any]
) -> None:
    """A notebook cell: the thread's own loop is running while it calls dcp.load."""
    url, sd, _ = checkpoint
    actual = template_of(sd)
    errors: list[BaseException] = []

    def notebook_kernel() -> None:
        loop = asyncio.new_event_loop()

        async def cell() -> None:
            assert asyncio.get_running_loop() is loop
            with aiodcp.S3StorageReader(url, **reader_kwargs) as reader:
                dcp.load(actual, storage_reader=reader)

        try:
            loop.run_until_complete(cell())
        except BaseException as exc:
            errors.append(exc)
        finally:
            loop.close()

    thread = threading.Thread(target=notebook_kernel)
    thread.start()
    thread.join(60)
    assert not thread.is_alive()
    assert errors == []
    assert_same(actual, sd)


def test_checkpoint_at_bucket_root(
    tmp_path: Path, s3: Any, bucket: str, reader_kwargs: dict[str, Any]
) -> None:
    sd = {"w": torch.randn(4, 4), "n": 3}
    local = save_checkpoint(copy.deepcopy(sd), tmp_path / "root")
    upload_dir(s3, local, bucket, "")
    actual = template_of(sd)
    dcp.load(actual, storage_reader=aiodcp.S3StorageReader(f"s3://{bucket}", **reader_kwargs))
    assert_same(actual, sd)


def test_selective_fetch_requests_only_needed_bytes(
    tmp_path: Path, s3: Any, bucket: str, s3_server: S3Server, reader_kwargs: dict[str, Any]
) -> None:
    """Partial load of half the keys with max_gap_size=0: no byte outside the needed items."""
    sd = {f"t{i:02d}": torch.full((256,), float(i)) for i in range(20)}
    local = save_checkpoint(copy.deepcopy(sd), tmp_path / "sel")
    upload_dir(s3, local, bucket, "sel")
    reference = dcp.FileSystemReader(str(local)).read_metadata()
    wanted_keys = [k for i, k in enumerate(sorted(sd)) if i % 2 == 0]
    needed: set[tuple[int, int]] = set()
    for index, info in reference.storage_data.items():
        if index.fqn in wanted_keys:
            needed.add((info.offset, info.offset + info.length))
    s3_server.clear_log()
    wanted = {k: torch.zeros(256) for k in wanted_keys}
    with aiodcp.S3StorageReader(f"s3://{bucket}/sel", max_gap_size=0, **reader_kwargs) as r:
        dcp.load(wanted, storage_reader=r)
        stats = r.stats
    for k in wanted_keys:
        assert torch.equal(wanted[k], sd[k])
    fetched: set[int] = set()
    for req in s3_server.requests():
        if req["method"] == "GET" and req["path"].endswith(".distcp"):
            assert req["range"] is not None, "a data file was fetched whole"
            first, last = req["range"].removeprefix("bytes=").split("-")
            fetched.update(range(int(first), int(last) + 1))
    needed_bytes = {b for lo, hi in needed for b in range(lo, hi)}
    assert fetched == needed_bytes
    assert stats is not None
    assert stats.bytes_requested == stats.bytes_used == len(needed_bytes)


def test_rank_local_metadata(
    tmp_path: Path, s3: Any, bucket: str, reader_kwargs: dict[str, Any]
) -> None:
    """read_metadata(rank=r) reads __{r}.metadata and never falls back to .metadata."""
    sd = {"w": torch.randn(6, 6)}
    local = save_checkpoint(copy.deepcopy(sd), tmp_path / "rl")
    s3.upload_file(str(local / ".metadata"), bucket, "rl/__3.metadata")
    s3.upload_file(str(local / "__0_0.distcp"), bucket, "rl/__0_0.distcp")
    with aiodcp.S3StorageReader(f"s3://{bucket}/rl", **reader_kwargs) as reader:
        metadata = reader.read_metadata(rank=3)
        assert set(metadata.storage_data) == set(
            dcp.FileSystemReader(str(local)).read_metadata().storage_data
        )
        with pytest.raises(aiodcp.NotFoundError, match=r"rl/\.metadata"):
            reader.read_metadata()
        with pytest.raises(aiodcp.NotFoundError, match=r"rl/__1\.metadata"):
            reader.read_metadata(rank=1)


def test_zstd_checkpoint_without_zstd_module_is_a_clear_error(
    tmp_path: Path,
    s3: Any,
    bucket: str,
    reader_kwargs: dict[str, Any],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    sd = {"w": torch.randn(6, 6)}
    local = save_checkpoint(copy.deepcopy(sd), tmp_path / "z", _extensions=[ZStandard()])
    upload_dir(s3, local, bucket, "z")
    import torch.distributed.checkpoint._extension as extension

    monkeypatch.setattr(extension, "zstandard", None)
    monkeypatch.setattr(extension, "pyzstd", None)
    with pytest.raises(aiodcp.MissingDependencyError, match=r"aiodcp\[zstd\]") as info:
        asyncio.run(
            aiodcp.load_checkpoint({"w": torch.zeros(6, 6)}, f"s3://{bucket}/z", **reader_kwargs)
        )
    assert isinstance(info.value, ImportError)
