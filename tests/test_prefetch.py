"""prefetch: background download, loads that reuse it, no byte fetched twice."""

from __future__ import annotations

import asyncio
import concurrent.futures
import copy
from pathlib import Path
from typing import Any

import pytest
import torch

import aiodcp

from conftest import S3Server, assert_same, save_checkpoint, upload_dir


@pytest.fixture
def ckpt(tmp_path: Path, s3: Any, bucket: str) -> tuple[str, dict[str, Any]]:
    g = torch.Generator().manual_seed(5)
    sd = {
        "model": {f"l{i}": torch.randn(64, 64, generator=g) for i in range(8)},
        "optim": {"step": 10, "lr": torch.tensor(0.1)},
        "extra": torch.arange(100),
    }
    local = save_checkpoint(copy.deepcopy(sd), tmp_path / "ck", thread_count=2)
    upload_dir(s3, local, bucket, "pf")
    return f"s3://{bucket}/pf", sd


def blank(sd: dict[str, Any]) -> dict[str, Any]:
    return {
        "model": {k: torch.zeros_like(v) for k, v in sd["model"].items()},
        "optim": {"step": 0, "lr": torch.tensor(0.0)},
        "extra": torch.zeros_like(sd["extra"]),
    }


def data_bytes(server: S3Server) -> list[tuple[str, int, int]]:
    out = []
    for req in server.requests():
        if req["method"] == "GET" and req["path"].endswith(".distcp"):
            first, last = req["range"].removeprefix("bytes=").split("-")
            out.append((req["path"], int(first), int(last) + 1))
    return out


def test_load_after_completed_prefetch_makes_zero_requests(
    ckpt: tuple[str, dict[str, Any]], reader_kwargs: dict[str, Any], s3_server: S3Server
) -> None:
    url, sd = ckpt
    handle = aiodcp.prefetch(url, progress=False, **reader_kwargs)
    stats = handle.wait(timeout=60)
    assert stats.bytes_used > 0 and handle.done()
    s3_server.clear_log()
    state = blank(sd)
    handle.load(state)
    assert s3_server.requests() == []
    assert_same(state, sd)
    handle.close()


def test_load_during_prefetch_fetches_nothing_twice(
    ckpt: tuple[str, dict[str, Any]], reader_kwargs: dict[str, Any], s3_server: S3Server
) -> None:
    url, sd = ckpt
    s3_server.clear_log()
    # Prefetch only the model, with tiny parts so it is still running when the load starts.
    with aiodcp.prefetch(
        url, keys=["model"], progress=False, part_size=1024, max_concurrency=1, **reader_kwargs
    ) as handle:
        state = blank(sd)
        handle.load(state)
    assert_same(state, sd)
    seen: set[tuple[str, int]] = set()
    for path, lo, hi in data_bytes(s3_server):
        for b in range(lo, hi):
            assert (path, b) not in seen, f"{path} byte {b} fetched twice"
            seen.add((path, b))
    metadata_gets = [r for r in s3_server.requests() if r["path"].endswith(".metadata")]
    assert len(metadata_gets) == 1


async def test_await_handle_and_aload(
    ckpt: tuple[str, dict[str, Any]], reader_kwargs: dict[str, Any]
) -> None:
    url, sd = ckpt
    handle = aiodcp.prefetch(url, keys=["model", "extra"], progress=False, **reader_kwargs)
    stats = await handle
    assert stats.items >= 9
    state = blank(sd)
    await handle.aload(state)
    assert_same(state, sd)
    handle.close()


def test_cancel_frees_and_later_load_fetches_itself(
    ckpt: tuple[str, dict[str, Any]], reader_kwargs: dict[str, Any]
) -> None:
    url, sd = ckpt
    handle = aiodcp.prefetch(
        url, progress=False, part_size=1024, max_concurrency=1, **reader_kwargs
    )
    handle.cancel()
    assert handle._engine is None  # buffers dropped
    with pytest.raises((asyncio.CancelledError, concurrent.futures.CancelledError)):
        handle.wait(timeout=30)
    state = blank(sd)
    stats = handle.load(state)  # nothing prefetched any more: the load fetches it all itself
    assert_same(state, sd)
    assert stats.bytes_used > 0
    handle.close()


def test_unknown_key_is_reported(
    ckpt: tuple[str, dict[str, Any]], reader_kwargs: dict[str, Any]
) -> None:
    url, _ = ckpt
    with aiodcp.prefetch(url, keys=["modle"], progress=False, **reader_kwargs) as handle:
        with pytest.raises(aiodcp.ConfigError, match="modle"):
            handle.wait(timeout=30)
    with pytest.raises(aiodcp.ConfigError, match="list"):
        aiodcp.prefetch(url, keys="model")  # type: ignore[arg-type]


def test_progress_bar_is_shown(
    ckpt: tuple[str, dict[str, Any]],
    reader_kwargs: dict[str, Any],
    capsys: pytest.CaptureFixture[str],
) -> None:
    url, sd = ckpt
    with aiodcp.prefetch(url, progress=True, **reader_kwargs) as handle:
        handle.wait(timeout=60)
    err = capsys.readouterr().err
    assert "prefetch s3://" in err and "100%" in err
    import torch.distributed.checkpoint as dcp

    state = blank(sd)
    with aiodcp.S3StorageReader(url, progress=True, **reader_kwargs) as reader:
        dcp.load(state, storage_reader=reader)
    assert "aiodcp s3://" in capsys.readouterr().err
    assert_same(state, sd)
