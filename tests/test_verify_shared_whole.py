"""Shared multi-rank loads (gloo) of checkpoints without an integrity record: no rank reads a
data file whole, yet the job does, so the job checks it against the store's full-object
checksum. The coordinator HEADs each such file once (``x-amz-checksum-mode: ENABLED``), the
ranks that fetch its ranges take their CRCs, and the final exchange round carries them to every
rank, which combines them and compares before its load returns.

Each test runs real ranks (``share_worker.py`` subprocesses) through the fault proxy in front of
moto (boto3's uploads carry a full-object CRC32)."""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any

import pytest

import conftest
from conftest import S3Server, upload_dir
from faultproxy import Fault, FaultProxy

WORKER = Path(__file__).parent / "share_worker.py"
RANK_TIMEOUT_S = 240  # a hang guard only
RANK_GUARD_S = 100.0  # a hang guard on a failing rank's load (it takes ~1 s)

pytestmark = pytest.mark.slow


def saved(tmp_path: Path, s3_server: S3Server) -> tuple[str, Path]:
    """The ``replicated`` layout saved by one process (one data file), uploaded by boto3
    without a record; its URL and directory."""
    local = tmp_path / "replicated"
    conftest.run_ranks(WORKER, 1, ["save", "replicated", str(local)], timeout=RANK_TIMEOUT_S)
    bucket = f"share-{uuid.uuid4().hex[:12]}"
    s3 = s3_server.client()
    s3.create_bucket(Bucket=bucket)
    upload_dir(s3, local, bucket, "ck")
    return f"s3://{bucket}/ck", local


def data_files(local: Path) -> list[Path]:
    return sorted(p for p in local.iterdir() if p.suffix == ".distcp")


def load(
    proxy: FaultProxy, url: str, local: Path, world: int, **options: Any
) -> list[dict[str, Any]]:
    env = {
        "TEST_S3_ENDPOINT": proxy.endpoint_url,
        "SHARE_OPTIONS": json.dumps({"max_gap_size": 0, **options}),
    }
    outputs = conftest.run_ranks(
        WORKER, world, ["load", "replicated", url, str(local), "sync"], env, RANK_TIMEOUT_S
    )
    return conftest.rank_results(outputs)


def heads(proxy: FaultProxy) -> list[Any]:
    return [r for r in proxy.requests if r.method == "HEAD" and r.path.endswith(".distcp")]


def length(request: Any) -> int:
    first, _, last = request.range.removeprefix("bytes=").partition("-")
    return int(last) - int(first) + 1


def gets(proxy: FaultProxy) -> list[Any]:
    return [r for r in proxy.requests if r.method == "GET" and r.path.endswith(".distcp")]


@pytest.mark.parametrize("world", [2, 3])
def test_a_file_the_job_reads_whole_is_verified(
    tmp_path: Path, s3_server: S3Server, world: int
) -> None:
    url, local = saved(tmp_path, s3_server)
    (data,) = data_files(local)
    with FaultProxy(s3_server.endpoint_url) as proxy:
        got = load(proxy, url, local, world)
        asked = heads(proxy)
        fetched = gets(proxy)
    for r in got:
        assert "error" not in r, r
        assert r["mismatched"] == [], r
        assert r["stats"]["sharing"] == "shared", r
        assert r["stats"]["bytes_from_peers"] > 0, r  # no rank read the file alone
        stats = r["stats"]
        assert stats["unverified_bytes"] == 0, r
        assert stats["verified_bytes"] == stats["bytes_used"] > 0, r
        assert stats["checksum_mismatches"] == 0, r
    # One HEAD for the job (not one per rank), asking for the checksum, and every GET of the
    # file pinned to the version it describes.
    assert len(asked) == 1 and asked[0].headers.get("x-amz-checksum-mode") == "ENABLED"
    assert sum(r["stats"]["checksum_requests"] for r in got) == 1
    assert all(r.if_match for r in fetched), [r.headers for r in fetched]
    job = got[0]["job"]
    assert job["verified_bytes"] == job["bytes_used"] and job["unverified_bytes"] == 0
    # Each stored byte was fetched once in the job: the check fetched nothing more.
    assert sum(map(length, fetched)) == data.stat().st_size


def test_without_verification_nothing_is_asked(tmp_path: Path, s3_server: S3Server) -> None:
    url, local = saved(tmp_path, s3_server)
    with FaultProxy(s3_server.endpoint_url) as proxy:
        got = load(proxy, url, local, 2, verify_checksums=False)
        assert heads(proxy) == []
    for r in got:
        assert "error" not in r and r["mismatched"] == [], r
        assert r["stats"]["verified_bytes"] == 0, r
        assert r["stats"]["checksum_requests"] == 0, r


def test_a_store_without_checksums_leaves_the_file_unverified(
    tmp_path: Path, s3_server: S3Server
) -> None:
    """The HEAD reaches the store without ``x-amz-checksum-mode``: it gives no checksum, the
    file is loaded and counted unverified on every rank, and no rank fails."""
    url, local = saved(tmp_path, s3_server)
    with FaultProxy(s3_server.endpoint_url) as proxy:
        proxy.add(Fault.strip("x-amz-checksum-mode"), method="HEAD")  # noqa: B005
        got = load(proxy, url, local, 2)
        assert len(heads(proxy)) == 1
    for r in got:
        assert "error" not in r and r["mismatched"] == [], r
        stats = r["stats"]
        assert stats["verified_bytes"] == 0, r
        assert stats["unverified_bytes"] == stats["bytes_used"] > 0, r


def test_a_byte_flipped_on_one_ranks_get_fails_every_rank(
    tmp_path: Path, s3_server: S3Server
) -> None:
    """One rank's GET of the file comes with a byte flipped: its item decodes (a tensor byte),
    so only the job's check sees it, and every rank raises ``ChecksumMismatchError`` naming
    the file, none returns with the damaged tensor."""
    url, local = saved(tmp_path, s3_server)
    (data,) = data_files(local)
    size = data.stat().st_size
    at = size // 2  # inside ``big``'s storage bytes
    with FaultProxy(s3_server.endpoint_url) as proxy:
        proxy.add(Fault.flip(at), path_suffix=data.name, predicate=lambda r: r.covers(at))
        got = load(proxy, url, local, 3)
        assert len(proxy.flipped) >= 1
    for r in got:
        assert r.get("error") == "ChecksumMismatchError", r
        assert r["key"] == f"ck/{data.name}", r
        assert data.name in r["message"] and "rank" in r["message"], r
        assert r["elapsed_s"] < RANK_GUARD_S, r


# --------------------------------------------------------------------------- the job's verdict


def test_the_verdict_needs_every_byte_once_and_the_stores_crc() -> None:
    """``_jobcheck`` alone (no ranks): rows as two ranks send them, for a 10-byte file whose
    CRC64NVME is the store's; a range missing, one twice, one damaged, a row too short."""
    from aiodcp._checksum import crc64nvme
    from aiodcp.dcp._jobcheck import WIDTH, CheckedFile, encode, verdicts

    data = bytes(range(200, 210))
    whole = crc64nvme(data)
    f = CheckedFile(number=0, algorithm="CRC64NVME", expected=whole, size=10, etag=None)

    def part(a: int, b: int, flip: bool = False) -> tuple[int, int, int]:
        raw = bytearray(data[a:b])
        if flip:
            raw[0] ^= 0xFF
        return (a, b, crc64nvme(bytes(raw)))

    def check(*ranks: list[tuple[int, int, int]], slots: int = 8) -> str:
        rows = [encode({"f": f}, {"f": r}, {"f": 5}, slots) for r in ranks]
        assert all(len(row) == slots * WIDTH for row in rows)
        found, used = verdicts(rows)
        assert used == [{0: 5}] * len(ranks)
        return found[0].status

    assert check([part(0, 3), part(7, 10)], [part(3, 7)]) == "verified"
    assert check([part(0, 3)], [part(3, 7)]) == "unverified"  # [7, 10) missing
    assert check([part(0, 4)], [part(3, 10)]) == "unverified"  # [3, 4) twice
    assert check([part(0, 3), part(7, 10)], [part(3, 7, flip=True)]) == "mismatch"
    assert check([part(0, 3), part(5, 10)], [part(3, 5)], slots=3) == "unverified"  # cut short
