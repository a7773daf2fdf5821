"""Shared multi-rank loads (gloo) of a checkpoint with an integrity record: a byte flipped on
the wire is caught by the rank that fetched it before it sends the item, and by the ranks that
receive it from a peer that did not check it; either way every rank ends with
``FileSystemReader``'s tensors, or the job stops with ``ChecksumMismatchError`` on the rank that
saw it twice and ``PeerLoadError`` on the others.

Each test runs real ranks (``share_worker.py`` subprocesses) through the fault proxy in front of
moto."""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any

import pytest
from torch.distributed.checkpoint import FileSystemReader

import conftest
from conftest import S3Server
from faultproxy import Fault, FaultProxy
from recorded import upload_with_record

WORKER = Path(__file__).parent / "share_worker.py"
RANK_TIMEOUT_S = 240  # a hang guard only

pytestmark = pytest.mark.slow


def saved_with_record(tmp_path: Path, s3_server: S3Server) -> tuple[str, Path, tuple[int, int]]:
    """The ``replicated`` layout saved by one process, uploaded with its record; its URL,
    directory and the stored item of ``big`` (2 MiB: received straight into destinations)."""
    local = tmp_path / "replicated"
    conftest.run_ranks(WORKER, 1, ["save", "replicated", str(local)], timeout=RANK_TIMEOUT_S)
    bucket = f"share-{uuid.uuid4().hex[:12]}"
    s3 = s3_server.client()
    s3.create_bucket(Bucket=bucket)
    upload_with_record(s3, local, bucket, "ck")
    md = FileSystemReader(str(local)).read_metadata()
    big = next(info for index, info in md.storage_data.items() if index.fqn == "big")
    return f"s3://{bucket}/ck", local, (big.offset, big.offset + big.length)


def load(
    proxy: FaultProxy, url: str, local: Path, world: int, **per_rank: dict[str, Any]
) -> list[dict[str, Any]]:
    env = {
        "TEST_S3_ENDPOINT": proxy.endpoint_url,
        "SHARE_OPTIONS": json.dumps({"max_gap_size": 0}),
        **{f"SHARE_OPTIONS_{name[1:]}": json.dumps(o) for name, o in per_rank.items()},
    }
    outputs = conftest.run_ranks(
        WORKER, world, ["load", "replicated", url, str(local), "sync"], env, RANK_TIMEOUT_S
    )
    return conftest.rank_results(outputs)


def test_the_fetching_rank_checks_before_it_sends(tmp_path: Path, s3_server: S3Server) -> None:
    url, local, (start, end) = saved_with_record(tmp_path, s3_server)
    at = start + (end - start) // 2
    with FaultProxy(s3_server.endpoint_url) as proxy:
        proxy.add(Fault.flip(at), path_suffix=".distcp", predicate=lambda r: r.covers(at), times=1)
        got = load(proxy, url, local, 4)
        assert len(proxy.flipped) == 1
        covering = [r for r in proxy.requests if r.path.endswith(".distcp") and r.covers(at)]
    assert len(covering) == 2  # the damaged GET and one more, by the same rank
    for r in got:
        assert "error" not in r, r
        assert r["mismatched"] == [], r
    assert sum(r["stats"]["checksum_mismatches"] for r in got) == 1
    assert all(r["stats"]["unverified_bytes"] == 0 for r in got)
    assert all(r["stats"]["verified_bytes"] > 0 for r in got)


def test_ranks_check_what_a_peer_sends(tmp_path: Path, s3_server: S3Server) -> None:
    """Rank 0 fetches ``big`` (the coordinator gives the largest item to the least loaded rank,
    rank 0 first) and, loading without verification here, sends the damaged bytes on: each
    receiving rank finds the mismatch and fetches the item from the store itself."""
    url, local, (start, _) = saved_with_record(tmp_path, s3_server)
    at = start + 100_000
    with FaultProxy(s3_server.endpoint_url) as proxy:
        proxy.add(Fault.flip(at), path_suffix=".distcp", predicate=lambda r: r.covers(at), times=1)
        got = load(proxy, url, local, 3, r0={"verify_checksums": False})
        covering = [r for r in proxy.requests if r.path.endswith(".distcp") and r.covers(at)]
    assert len(covering) == 3  # rank 0's damaged GET, then one by each receiving rank
    assert got[0]["mismatched"] == ["big."], got[0]  # unchecked: what the others were sent
    for r in got[1:]:
        assert "error" not in r, r
        assert r["mismatched"] == [], r
        assert r["stats"]["checksum_mismatches"] == 1, r
        assert r["stats"]["bytes_from_peers"] > 0, r


def test_a_damaged_item_twice_stops_every_rank(tmp_path: Path, s3_server: S3Server) -> None:
    url, local, (start, end) = saved_with_record(tmp_path, s3_server)
    at = end - 10
    with FaultProxy(s3_server.endpoint_url) as proxy:
        proxy.add(Fault.flip(at), path_suffix=".distcp", predicate=lambda r: r.covers(at))
        got = load(proxy, url, local, 3)
    failed = [r for r in got if r.get("error") == "ChecksumMismatchError"]
    assert len(failed) == 1, got
    culprit = failed[0]["rank"]
    assert f"[{start}, {end})" in failed[0]["message"] and "'big'" in failed[0]["message"]
    for r in got:
        assert r["elapsed_s"] < 60, r  # a hang guard
        if r["rank"] != culprit:
            assert r["error"] == "PeerLoadError" and r["peer_rank"] == culprit, r
            assert "do not match" in r["message"], r


@pytest.mark.parametrize(("layout", "save_world", "world"), [("dim0", 2, 4), ("dim1", 2, 2)])
def test_resharded_shared_loads_of_a_recorded_checkpoint_check_every_item(
    tmp_path: Path, s3_server: S3Server, layout: str, save_world: int, world: int
) -> None:
    """Resharded loads that share and slice: every tensor as FileSystemReader loads it, every
    stored byte any rank decoded checked (each rank's verified bytes, none unverified)."""
    local = tmp_path / layout
    conftest.run_ranks(WORKER, save_world, ["save", layout, str(local)], timeout=RANK_TIMEOUT_S)
    bucket = f"share-{uuid.uuid4().hex[:12]}"
    s3 = s3_server.client()
    s3.create_bucket(Bucket=bucket)
    upload_with_record(s3, local, bucket, "ck")
    env = {"TEST_S3_ENDPOINT": s3_server.endpoint_url, "SHARE_OPTIONS": json.dumps({})}
    outputs = conftest.run_ranks(
        WORKER,
        world,
        ["load", layout, f"s3://{bucket}/ck", str(local), "sync"],
        env,
        RANK_TIMEOUT_S,
    )
    for out in outputs:
        (line,) = [x for x in out.splitlines() if x.startswith("RESULT ")]
        r = json.loads(line.removeprefix("RESULT "))
        assert "error" not in r, r
        assert r["mismatched"] == [], r
        assert r["stats"]["unverified_bytes"] == 0, r
        assert r["stats"]["verified_bytes"] > 0, r
