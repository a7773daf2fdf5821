"""Hostile or odd checkpoints: untrusted values, escaping paths, partial loads, memory bounds."""

from __future__ import annotations

import copy
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import DefaultLoadPlanner

import aiodcp

from conftest import assert_same, save_checkpoint, upload_dir


@dataclass
class Custom:
    """A class torch's weights_only unpickler does not admit."""

    value: int


async def test_safe_bytes_refuses_values_that_need_arbitrary_classes(
    tmp_path: Path, s3: Any, bucket: str, reader_kwargs: dict[str, Any]
) -> None:
    sd = {"w": torch.randn(4), "plain": {"n": 3, "s": "x", "l": [1, 2.5]}, "obj": Custom(7)}
    local = save_checkpoint(copy.deepcopy(sd), tmp_path / "b")
    upload_dir(s3, local, bucket, "b")
    url = f"s3://{bucket}/b"

    trusting = {"w": torch.zeros(4), "plain": {"n": 0, "s": "", "l": [0, 0.0]}, "obj": None}
    await aiodcp.load_checkpoint(trusting, url, **reader_kwargs)
    assert trusting["obj"] == Custom(7)

    with pytest.raises(aiodcp.CheckpointFormatError, match=r"'obj'.*safe_bytes=True") as info:
        await aiodcp.load_checkpoint(
            {"w": torch.zeros(4), "obj": None}, url, safe_bytes=True, **reader_kwargs
        )
    assert info.value.fqn == "obj"

    plain = {"w": torch.zeros(4), "plain": {"n": 0, "s": "", "l": [0, 0.0]}}
    await aiodcp.load_checkpoint(plain, url, safe_bytes=True, **reader_kwargs)
    assert_same(plain, {"w": sd["w"], "plain": sd["plain"]})


@pytest.mark.parametrize(
    "evil_path",
    ["../other/__0_0.distcp", "/etc/passwd", "s3://elsewhere/__0_0.distcp", "a/../../__0_0.distcp"],
)
async def test_data_paths_escaping_the_prefix_are_refused(
    tmp_path: Path, s3: Any, bucket: str, reader_kwargs: dict[str, Any], evil_path: str
) -> None:
    sd = {"w": torch.randn(4)}
    local = save_checkpoint(copy.deepcopy(sd), tmp_path / "p")
    metadata = dcp.FileSystemReader(str(local)).read_metadata()
    for info in metadata.storage_data.values():
        info.relative_path = evil_path
    (local / ".metadata").write_bytes(pickle.dumps(metadata))
    upload_dir(s3, local, bucket, "ck/p")
    with pytest.raises(aiodcp.InvalidPathError, match="refusing") as info:
        await aiodcp.load_checkpoint({"w": torch.zeros(4)}, f"s3://{bucket}/ck/p", **reader_kwargs)
    assert isinstance(info.value, ValueError)


async def test_allow_partial_load_like_dcp_load(
    tmp_path: Path, s3: Any, bucket: str, reader_kwargs: dict[str, Any]
) -> None:
    sd = {"w": torch.randn(4), "b": torch.randn(2)}
    local = save_checkpoint(copy.deepcopy(sd), tmp_path / "pl")
    upload_dir(s3, local, bucket, "pl")
    url = f"s3://{bucket}/pl"
    state = {"w": torch.zeros(4), "new_head": torch.zeros(3)}
    with pytest.raises(RuntimeError, match="new_head"):
        await aiodcp.load_checkpoint(state, url, **reader_kwargs)
    await aiodcp.load_checkpoint(
        state, url, planner=DefaultLoadPlanner(allow_partial_load=True), **reader_kwargs
    )
    assert torch.equal(state["w"], sd["w"])
    assert torch.equal(state["new_head"], torch.zeros(3))  # untouched, as dcp.load does


@pytest.mark.parametrize("budget", [1, 20_000, 100_000, 10**9])
async def test_memory_stays_within_the_budget(
    tmp_path: Path, s3: Any, bucket: str, reader_kwargs: dict[str, Any], budget: int
) -> None:
    sd = {f"t{i:02d}": torch.randn(2048) for i in range(24)}  # ~9 KiB stored items
    sd["big"] = torch.randn(16384)  # one ~65 KiB item
    local = save_checkpoint(copy.deepcopy(sd), tmp_path / "m", thread_count=3)
    upload_dir(s3, local, bucket, "m")
    metadata = dcp.FileSystemReader(str(local)).read_metadata()
    largest = max(info.length for info in metadata.storage_data.values())
    state = {k: torch.zeros_like(v) for k, v in sd.items()}
    stats = await aiodcp.load_checkpoint(
        state, f"s3://{bucket}/m", memory_budget=budget, part_size=8192, **reader_kwargs
    )
    assert_same(state, sd)
    assert 0 < stats.peak_buffered_bytes <= max(budget, largest)
    if budget == 1:
        assert stats.peak_buffered_bytes == largest  # one item at a time, the largest alone
