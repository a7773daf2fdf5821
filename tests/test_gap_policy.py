"""``max_gap_size="auto"``: the setting, and loads that resolve it from the measured latency.

The pure arithmetic (``auto_gap_size`` and friends) is tested in ``test_planner.py``; here the
configuration surface and the three ways a load reaches the planner (``S3StorageReader``,
``load_checkpoint``, ``prefetch``) against moto's S3 server.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed.checkpoint as dcp

import aiodcp
from aiodcp._config import DEFAULT_MAX_GAP_SIZE
from aiodcp._planner import (
    DEFAULT_MAX_GAP_SIZE_BYTES,
    MAX_AUTO_GAP_SIZE_BYTES,
    MIN_AUTO_GAP_SIZE_BYTES,
    auto_gap_size,
)

from conftest import S3Server, assert_same, save_checkpoint, upload_dir
from faultproxy import Fault, FaultProxy

# ----------------------------------------------------------------------------- configuration


def test_default_is_auto() -> None:
    assert DEFAULT_MAX_GAP_SIZE == "auto"
    assert aiodcp.ReaderConfig().max_gap_size == "auto"
    assert aiodcp.ReaderConfig.from_kwargs(None, max_gap_size=None).max_gap_size == "auto"
    assert aiodcp.S3StorageReader("s3://bucket/x").config.max_gap_size == "auto"


@pytest.mark.parametrize(
    ("value", "expected"), [("auto", "auto"), (0, 0), (5, 5), (4.0, 4), (math.inf, math.inf)]
)
def test_explicit_settings_are_kept(value: Any, expected: Any) -> None:
    config = aiodcp.ReaderConfig(max_gap_size=value)
    assert config.max_gap_size == expected
    assert type(config.max_gap_size) is type(expected)
    assert config.replace(max_gap_size="auto").max_gap_size == "auto"


@pytest.mark.parametrize("value", ["AUTO", "Auto", "", "fast", "32MiB", "1", -1, math.nan, True])
def test_bad_settings_raise_a_clear_config_error(value: Any) -> None:
    with pytest.raises(aiodcp.ConfigError) as info:
        aiodcp.ReaderConfig(max_gap_size=value)
    message = str(info.value)
    assert "max_gap_size" in message and '"auto"' in message and "inf" in message
    assert repr(value) in message
    assert info.value.field == "max_gap_size"  # type: ignore[attr-defined]
    with pytest.raises(aiodcp.ConfigError, match="max_gap_size"):
        aiodcp.S3StorageReader("s3://bucket/x", max_gap_size=value)


def test_load_stats_show_the_gap() -> None:
    assert aiodcp.LoadStats().max_gap_size is None
    assert "max gap" not in str(aiodcp.LoadStats())
    assert str(aiodcp.LoadStats(max_gap_size=2 * 1024 * 1024)).endswith(", max gap 2.00 MiB")
    assert str(aiodcp.LoadStats(max_gap_size=math.inf)).endswith(", max gap inf")


# ----------------------------------------------------------------------------- loads on moto

MiB = 1024 * 1024
Ckpt = tuple[str, dict[str, torch.Tensor], int, int]


def _state() -> dict[str, torch.Tensor]:
    # a and c are small; b (1 MiB) lies between them in the data file: loading a and c alone
    # leaves a ~1 MiB gap, inside [MIN_AUTO_GAP_SIZE_BYTES, MAX_AUTO_GAP_SIZE_BYTES].
    g = torch.Generator().manual_seed(3)
    return {
        "a": torch.randn(1024, generator=g),
        "b": torch.randn(MiB // 4, generator=g),
        "c": torch.randn(1024, generator=g),
    }


@pytest.fixture
def ckpt(tmp_path: Path, s3: Any, bucket: str) -> Ckpt:
    """The checkpoint's URL, its state dict, the bytes a load of a and c needs, and the gap
    between them (b's bytes)."""
    sd = _state()
    local = save_checkpoint(copy.deepcopy(sd), tmp_path / "gap")
    upload_dir(s3, local, bucket, "gap")
    storage = dcp.FileSystemReader(str(local)).read_metadata().storage_data
    spans = {index.fqn: (info.offset, info.offset + info.length) for index, info in storage.items()}
    assert spans["a"][1] <= spans["b"][0] < spans["b"][1] <= spans["c"][0]  # b in between
    gap = spans["c"][0] - spans["a"][1]
    assert MIN_AUTO_GAP_SIZE_BYTES < gap < MAX_AUTO_GAP_SIZE_BYTES
    needed = (spans["a"][1] - spans["a"][0]) + (spans["c"][1] - spans["c"][0])
    return f"s3://{bucket}/gap", sd, needed, gap


@pytest.fixture
def slow_store(s3_server: S3Server) -> Iterator[dict[str, Any]]:
    """Reader options through a proxy that holds every ``.metadata`` GET 0.3 s before its first
    byte: a store whose measured latency puts "auto" at its largest gap (8 MiB is the
    break-even of a ~0.1 s request)."""
    with FaultProxy(s3_server.endpoint_url) as proxy:
        proxy.add(Fault.stall(0.3), path_suffix="/.metadata")
        yield {
            "endpoint_url": proxy.endpoint_url,
            "region": "us-east-1",
            "addressing_style": "path",
        }


def _ends(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {"a": torch.zeros_like(sd["a"]), "c": torch.zeros_like(sd["c"])}


def test_default_load_resolves_auto_from_the_metadata_request(
    ckpt: Ckpt, reader_kwargs: dict[str, Any]
) -> None:
    url, sd, _, _ = ckpt
    template = {k: torch.zeros_like(v) for k, v in sd.items()}
    with aiodcp.S3StorageReader(url, **reader_kwargs) as reader:
        dcp.load(template, storage_reader=reader)
        stats = reader.stats
    assert_same(template, sd)
    assert stats is not None
    latency = stats.request_latency_s
    assert latency is not None and latency >= 0
    assert stats.max_gap_size == auto_gap_size(latency)
    assert MIN_AUTO_GAP_SIZE_BYTES <= stats.max_gap_size <= MAX_AUTO_GAP_SIZE_BYTES
    assert f"max gap {stats.max_gap_size / MiB:.2f} MiB" in str(stats)
    assert stats.bytes_requested == stats.bytes_used  # a full load: no gap at all


@pytest.mark.parametrize("store", ["fast", "slow"])
def test_the_measured_latency_decides_whether_a_gap_is_fetched(
    ckpt: Ckpt,
    reader_kwargs: dict[str, Any],
    slow_store: dict[str, Any],
    store: str,
) -> None:
    """moto on loopback answers in milliseconds; through ``slow_store`` the .metadata GET
    takes 0.3 s. The gap each load plans with is the one its own measurement gives, and a and
    c share one GET exactly when b's bytes are within that gap."""
    url, sd, needed, gap = ckpt
    wanted = _ends(sd)
    options = slow_store if store == "slow" else reader_kwargs
    with aiodcp.S3StorageReader(url, **options) as reader:
        dcp.load(wanted, storage_reader=reader)
        stats = reader.stats
    assert_same(wanted, {"a": sd["a"], "c": sd["c"]})
    assert stats is not None and stats.request_latency_s is not None
    assert stats.max_gap_size == auto_gap_size(stats.request_latency_s)
    if store == "slow":
        assert stats.request_latency_s >= 0.25
        assert stats.max_gap_size == MAX_AUTO_GAP_SIZE_BYTES
    assert stats.bytes_used == needed
    if stats.max_gap_size >= gap:  # one GET over a, b and c; b's bytes are the gap
        assert stats.requests == 1 + 1 and stats.bytes_requested == needed + gap
    else:  # one GET each for a and c
        assert stats.requests == 1 + 2 and stats.bytes_requested == needed


def test_a_fixed_gap_ignores_the_latency(ckpt: Ckpt, slow_store: dict[str, Any]) -> None:
    url, sd, needed, _ = ckpt
    wanted = _ends(sd)
    with aiodcp.S3StorageReader(url, max_gap_size=0, **slow_store) as reader:
        dcp.load(wanted, storage_reader=reader)
        stats = reader.stats
    assert stats is not None and stats.max_gap_size == 0
    assert stats.requests == 1 + 2 and stats.bytes_requested == needed


async def test_load_checkpoint_resolves_auto(ckpt: Ckpt, slow_store: dict[str, Any]) -> None:
    url, sd, needed, _ = ckpt
    wanted = _ends(sd)
    stats = await aiodcp.load_checkpoint(wanted, url, **slow_store)
    assert_same(wanted, {"a": sd["a"], "c": sd["c"]})
    assert stats.max_gap_size == MAX_AUTO_GAP_SIZE_BYTES
    assert stats.requests == 1 + 1 and stats.bytes_requested > needed + MiB


async def test_load_checkpoint_default_gap_is_measured(
    ckpt: Ckpt, reader_kwargs: dict[str, Any]
) -> None:
    url, sd, _, _ = ckpt
    template = {k: torch.zeros_like(v) for k, v in sd.items()}
    stats = await aiodcp.load_checkpoint(template, url, **reader_kwargs)
    assert_same(template, sd)
    assert isinstance(stats.max_gap_size, int)
    assert MIN_AUTO_GAP_SIZE_BYTES <= stats.max_gap_size <= MAX_AUTO_GAP_SIZE_BYTES


def test_prefetch_and_its_load_plan_with_the_prefetch_measurement(
    ckpt: Ckpt, slow_store: dict[str, Any]
) -> None:
    url, sd, needed, _ = ckpt
    handle = aiodcp.prefetch(url, keys=["a", "c"], progress=False, **slow_store)
    try:
        prefetched = handle.wait(timeout=60)
        assert prefetched.max_gap_size == MAX_AUTO_GAP_SIZE_BYTES
        assert prefetched.requests == 1 + 1 and prefetched.bytes_requested > needed + MiB
        template = {k: torch.zeros_like(v) for k, v in sd.items()}
        loaded = handle.load(template)  # b is not prefetched: the load fetches it
    finally:
        handle.close()
    assert_same(template, sd)
    # The load reads no .metadata of its own: it plans b with the prefetch's latency.
    assert loaded.max_gap_size == MAX_AUTO_GAP_SIZE_BYTES
    assert loaded.request_latency_s == prefetched.request_latency_s


def test_prior_is_the_planner_default() -> None:
    assert auto_gap_size(None) == DEFAULT_MAX_GAP_SIZE_BYTES
