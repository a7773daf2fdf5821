"""A save's memory is bounded by ``memory_budget``, whatever the state dict's size: measured as
the peak RSS of a fresh process above its RSS before the save (tests/save_memory_worker.py)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from conftest import S3Server

HERE = Path(__file__).parent
MIB = 1024 * 1024


def save_in_process(s3_server: S3Server, url: str, kind: str, budget: int) -> dict[str, Any]:
    result = subprocess.run(
        [
            sys.executable,
            str(HERE / "save_memory_worker.py"),
            s3_server.endpoint_url,
            url,
            kind,
            str(budget),
        ],
        capture_output=True,
        text=True,
        timeout=300,  # a hang guard
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return dict(json.loads(result.stdout.strip().splitlines()[-1]))


@pytest.mark.slow
def test_staged_items_stay_within_the_budget(s3_server: S3Server, bucket: str) -> None:
    """128 MiB of small tensors, every one staged (torch.save'd into a buffer), with a 16 MiB
    budget: the staged memory held at once stays within the budget plus one part being
    assembled, and the process grows by less than the budget + 64 MiB."""
    budget = 16 * MIB
    out = save_in_process(s3_server, f"s3://{bucket}/staged", "staged", budget)
    stats = out["stats"]
    assert stats["staged_bytes"] > 128 * MIB and stats["direct_bytes"] == 0
    part, credit = 5 * MIB, MIB
    assert stats["peak_staged_bytes"] <= budget + part + credit, stats
    assert out["rss_above"] < budget + 64 * MIB, out["rss_above"] / MIB


@pytest.mark.slow
def test_tensors_sent_from_their_memory_take_no_budget(s3_server: S3Server, bucket: str) -> None:
    """256 MiB of large tensors: sent from their own memory, so the process grows by far less
    than the state dict (a writer that copies each file, as s3torchconnector's does, grows by
    about its size)."""
    out = save_in_process(s3_server, f"s3://{bucket}/direct", "direct", 64 * MIB)
    stats = out["stats"]
    assert stats["direct_bytes"] == 256 * MIB and stats["staged_bytes"] < MIB
    assert out["rss_above"] < 64 * MIB, out["rss_above"] / MIB
