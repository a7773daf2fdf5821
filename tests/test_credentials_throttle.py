"""Credentials that expire or are revoked mid-load, and a store that throttles, on the wire.

Every load runs against tests/strictstore.py (SigV4 verified, expiring session tokens, a
per-bucket SlowDown token bucket), sometimes through tests/faultproxy.py in front of it (it
forwards the Host header unchanged, so signatures still verify). What is checked is what the
store saw (its request log and counters) and what the public API reports (``LoadStats``,
``aiodcp`` errors); every successful load is compared with the saved tensors.

Temporary credentials come from a real ``credential_process`` (a tiny script that asks the
strict store's control API to mint them). Each credential test runs on both paths
(``store_path``): natively (the plain case fetches and refreshes them, ``_credentials``) and
through botocore (its own refresh logic), with the same expectations.
"""

from __future__ import annotations

import asyncio
import copy
import json
import shlex
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import botocore.credentials
import pytest
import torch
from aiobotocore.credentials import AioRefreshableCredentials

import aiodcp
import aiodcp._store
import aiodcp._throttle

from conftest import StrictServer, assert_same, save_checkpoint, upload_dir
from faultproxy import Fault, FaultProxy

LOAD_TIMEOUT_S = 60.0  # a hang guard only: a hang fails the test, a slow machine does not
KIB = 1024

# The credential_process: mints credentials through the strict store's control API and appends
# (time, access key, ttl) to a log. argv: control URL, log path, then "ttl:advertised" per
# invocation (the last one repeats).
CREDENTIAL_SCRIPT = """\
import json, sys, time, urllib.request
url, log, plan = sys.argv[1], sys.argv[2], sys.argv[3:]
try:
    with open(log) as f:
        n = sum(1 for _ in f)
except FileNotFoundError:
    n = 0
ttl, advertised = (float(x) for x in plan[min(n, len(plan) - 1)].split(":"))
opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
request = urllib.request.Request(
    url, data=json.dumps({"ttl": ttl, "advertised_ttl": advertised}).encode(), method="POST"
)
now = time.time()
answer = json.loads(opener.open(request, timeout=10).read())
with open(log, "a") as f:
    f.write(json.dumps({"t": now, "ak": answer["AccessKeyId"], "ttl": ttl}) + "\\n")
print(json.dumps(answer))
"""


# --------------------------------------------------------------------------- fixtures


@dataclass(frozen=True)
class Checkpoint:
    bucket: str
    url: str
    state: dict[str, Any]

    def template(self) -> dict[str, Any]:
        return {
            k: torch.zeros_like(v) if isinstance(v, torch.Tensor) else None
            for k, v in self.state.items()
        }


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory, strict_server: StrictServer) -> Checkpoint:
    """6 MiB in 4 data files: 96 tensors of 64 KiB (~100 GETs of 64 KiB, ~200 of 32 KiB)."""
    g = torch.Generator().manual_seed(7)
    sd: dict[str, Any] = {f"t{i:02d}": torch.randn(16, 1024, generator=g) for i in range(96)}
    sd["step"] = 5
    local = tmp_path_factory.mktemp("credthrottle") / "ck"
    save_checkpoint(copy.deepcopy(sd), local, thread_count=4)
    assert len([p for p in local.iterdir() if p.suffix == ".distcp"]) == 4
    bucket = f"strict-{uuid.uuid4().hex[:12]}"
    s3 = strict_server.client()
    s3.create_bucket(Bucket=bucket)
    upload_dir(s3, local, bucket, "ck")
    return Checkpoint(bucket, f"s3://{bucket}/ck", sd)


@pytest.fixture
def server(strict_server: StrictServer) -> Iterator[StrictServer]:
    strict_server.reset()
    yield strict_server
    strict_server.reset()  # no throttle left behind; revoked/minted keys do not matter


@dataclass
class Minting:
    """The profile whose credential_process mints credentials; ``minted()`` lists them."""

    profile: str
    log: Path

    def minted(self) -> list[dict[str, Any]]:
        if not self.log.exists():
            return []
        return [json.loads(line) for line in self.log.read_text().splitlines() if line]


def credential_profile(
    server: StrictServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, *plan: str
) -> Minting:
    """An AWS config file with profile ``minting`` whose credential_process mints credentials
    ("ttl:advertised_ttl" per invocation, the last repeating); no other credentials around."""
    script = tmp_path / "mint.py"
    script.write_text(CREDENTIAL_SCRIPT)
    log = tmp_path / "minted.jsonl"
    command = shlex.join(
        [sys.executable, str(script), f"{server.endpoint_url}/_strict/credentials", str(log), *plan]
    )
    config = tmp_path / "config"
    config.write_text(f"[profile minting]\ncredential_process = {command}\n")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(config))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-credentials"))
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    return Minting("minting", log)


def options(endpoint_url: str, **extra: Any) -> dict[str, Any]:
    return {
        "endpoint_url": endpoint_url,
        "region": "us-east-1",
        "addressing_style": "path",
        **extra,
    }


async def load(ck: Checkpoint, endpoint_url: str, **extra: Any) -> aiodcp.LoadStats:
    """Load ``ck`` (hang guard only) and check every tensor against the saved one."""
    state = ck.template()
    stats = await asyncio.wait_for(
        aiodcp.load_checkpoint(state, ck.url, **options(endpoint_url, **extra)), LOAD_TIMEOUT_S
    )
    assert_same(state, ck.state)
    return stats


def data_gets(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in records if r["method"] == "GET" and r["path"].endswith(".distcp")]


def metadata_gets(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in records if r["method"] == "GET" and r["path"].endswith("/.metadata")]


def note(text: str) -> None:
    """Measured numbers, visible with ``pytest -s``."""
    print(text)  # noqa: T201


async def wait_until(condition: Any, within: float = 30.0) -> bool:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if condition():
            return True
        await asyncio.sleep(0.02)
    return bool(condition())


# --------------------------------------------------------------------------- credentials


def test_refresh_windows_are_class_attributes() -> None:
    """The windows shrunk below are the ones aiobotocore's credentials read (inherited)."""
    for name in ("_advisory_refresh_timeout", "_mandatory_refresh_timeout"):
        assert name not in vars(AioRefreshableCredentials)
        assert hasattr(botocore.credentials.RefreshableCredentials, name)
    assert issubclass(AioRefreshableCredentials, botocore.credentials.RefreshableCredentials)


async def test_credentials_rotate_during_load_without_refusals(
    server: StrictServer,
    checkpoint: Checkpoint,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    store_path: dict[str, Any],
) -> None:
    """Credentials living 7 s, a load of ~10 s: the credential provider (aiodcp's, or
    botocore's) refreshes them ahead of expiry, every presigned URL expires before the
    credentials that signed it, and the store refuses nothing: no ExpiredToken, no expired
    URL, nothing re-signed."""
    ttl = 7.0
    minting = credential_profile(server, tmp_path, monkeypatch, f"{ttl}:{ttl}")
    # Everything scaled from an hour-long credential to a 7 s one. botocore's refresh windows
    # (15 / 10 min before expiry by default; AioRefreshableCredentials inherits them):
    monkeypatch.setattr(
        botocore.credentials.RefreshableCredentials, "_advisory_refresh_timeout", 5.5
    )
    monkeypatch.setattr(
        botocore.credentials.RefreshableCredentials, "_mandatory_refresh_timeout", 4.75
    )
    # aiodcp's own configuration constants (not behaviour under test): a URL expires this long
    # before its credentials (60 s), and credentials with less life left than margin + minimum
    # sign no URL (10 s). With these, a URL lives >= 4 s and is reused for half of that, so a
    # request stalled 0.3 s by the proxy still arrives in time despite X-Amz-Date's whole
    # seconds; and the mandatory window (4.75 s) >= margin + minimum, so every data GET can be
    # presigned (botocore refreshes before a URL would be too short). The plain case's refresh
    # windows, botocore's scaled the same way:
    monkeypatch.setattr(
        aiodcp._store,
        "PRESIGN_TIMING",
        aiodcp._store.PresignTiming(
            credential_margin_s=0.5,
            min_presign_s=4,
            advisory_refresh_s=5.5,
            mandatory_refresh_s=4.75,
        ),
    )

    with FaultProxy(server.endpoint_url) as proxy:
        # Every data GET waits 0.3 s before it is forwarded: ~100 GETs, 3 at a time -> ~10 s.
        proxy.add(Fault.stall(0.3), path_suffix=".distcp")
        mark = len(server.requests())
        server.reset_counters()
        stats = await load(
            checkpoint,
            proxy.endpoint_url,
            profile=minting.profile,
            part_size=64 * KIB,
            max_concurrency=3,
            **store_path,
        )
        ended = time.time()
    records = server.requests()[mark:]
    counters = server.counters()
    minted = minting.minted()
    gets = data_gets(records)
    keys_used = Counter(r["access_key"] for r in gets)
    note(
        f"\nrotation: {len(gets)} data GETs, {len(minted)} credentials minted, "
        f"keys used {sorted(keys_used.values())}, wall {stats.wall_time_s:.1f} s, {stats}"
    )

    assert counters["refused"] == {}, counters
    assert all(r["status"] in (200, 206) for r in records), records
    assert len(gets) >= 90
    assert all(r["auth"] == "v4-query" for r in gets), Counter(r["auth"] for r in gets)
    assert len(keys_used) >= 2, keys_used  # the credentials really rotated
    assert set(keys_used) <= {m["ak"] for m in minted}
    # The load outlived the credentials it started with (the store enforces their expiry).
    assert ended > minted[0]["t"] + ttl
    assert any(r["access_key"] != minted[0]["ak"] for r in gets[-10:])
    assert stats.resigned == 0
    assert stats.retries == 0
    # refreshed about once per lifetime (from the advisory window on), not per request
    assert len(minted) <= 2 + (ended - minted[0]["t"]) / (ttl - 5.5), len(minted)


async def test_expired_token_burst_is_resigned(
    server: StrictServer,
    checkpoint: Checkpoint,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    store_path: dict[str, Any],
) -> None:
    """The store expires the first credentials after 2 s although they say an hour (clock
    skew, revocation). 32 data GETs signed with them are held by the proxy until then and all
    refused with ExpiredToken at once: each is signed again with refreshed credentials (not an
    attempt: max_attempts=1), the load succeeds, and the fast path stays on. The refusals that
    come back while the first of them is refreshing the credentials (a credential_process run)
    must be signed with the refreshed ones, not again with the refused key."""
    server_ttl = 2.0
    minting = credential_profile(server, tmp_path, monkeypatch, f"{server_ttl}:3600", "600:3600")
    release = threading.Event()
    with FaultProxy(server.endpoint_url) as proxy:
        held = proxy.add(Fault.stall(60, release=release), path_suffix=".distcp", times=32)
        mark = len(server.requests())
        server.reset_counters()
        task = asyncio.create_task(
            load(
                checkpoint,
                proxy.endpoint_url,
                profile=minting.profile,
                part_size=32 * KIB,
                max_concurrency=32,
                max_attempts=1,
                **store_path,
            )
        )
        try:
            assert await wait_until(lambda: held.hits >= 32 or task.done())
            assert not task.done()
            first = minting.minted()[0]
            await asyncio.sleep(max(0.0, first["t"] + server_ttl + 0.3 - time.time()))
        finally:
            release.set()
        stats = await task
    records = server.requests()[mark:]
    counters = server.counters()
    minted = minting.minted()
    gets = data_gets(records)
    refused = [i for i, r in enumerate(gets) if r["code"] is not None] or [-1]
    note(
        f"\nburst: {len(gets)} data GETs, refused {counters['refused']}, "
        f"resigned {stats.resigned}, minted {len(minted)}, auth after the refusals "
        f"{Counter(r['auth'] for r in gets[max(refused) + 1 :])}"
    )

    assert set(counters["refused"]) == {"ExpiredToken"}, counters
    # The 32 held GETs, each refused once (with the refresh, ~32 more, not waves of them).
    assert 32 <= counters["refused"]["ExpiredToken"] <= 2 * 32, counters
    assert all(gets[i]["access_key"] == first["ak"] for i in refused)
    assert stats.resigned >= 1
    assert stats.resigned == counters["refused"]["ExpiredToken"]  # each one signed again
    assert stats.retries == 0
    assert len(minted) >= 2
    after = gets[max(refused) + 1 :]
    assert len(after) >= 32
    assert all(r["auth"] == "v4-query" and r["status"] == 206 for r in after), Counter(
        (r["auth"], r["status"]) for r in after
    )
    assert all(r["access_key"] != first["ak"] for r in after)


async def test_revoked_static_credentials_fail_promptly(
    server: StrictServer,
    checkpoint: Checkpoint,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    store_path: dict[str, Any],
) -> None:
    """Static (not refreshable) credentials the store revokes mid-load: AccessDeniedError
    saying they expired, after a bounded number of re-signs, without hanging; the same error
    whether the store signs natively (the environment's credentials: nothing can refresh them)
    or through botocore."""
    minted = server.mint_credentials(ttl=600)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-credentials"))
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", minted["AccessKeyId"])
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", minted["SecretAccessKey"])
    monkeypatch.setenv("AWS_SESSION_TOKEN", minted["SessionToken"])
    release = threading.Event()
    with FaultProxy(server.endpoint_url) as proxy:
        held = proxy.add(Fault.stall(60, release=release), path_suffix=".distcp", times=32)
        mark = len(server.requests())
        server.reset_counters()
        task = asyncio.create_task(
            load(checkpoint, proxy.endpoint_url, part_size=32 * KIB, max_attempts=3, **store_path)
        )
        try:
            assert await wait_until(lambda: held.hits >= 32 or task.done())
            assert not task.done()
            assert server.revoke(minted["AccessKeyId"]) == [minted["AccessKeyId"]]
        finally:
            release.set()
            released = time.monotonic()
        with pytest.raises(aiodcp.AccessDeniedError) as info:
            await task
        failed_after = time.monotonic() - released
    records = server.requests()[mark:]
    counters = server.counters()
    expired = counters["refused"].get("ExpiredToken", 0)
    note(
        f"\nrevoked: refused {counters['refused']}, failed {failed_after:.2f} s after the "
        f"revocation: {info.value}"
    )

    assert "expired" in str(info.value) and "ExpiredToken" in str(info.value)
    assert set(counters["refused"]) == {"ExpiredToken"}, counters
    # Each of the 32 GETs in flight: the first try, _RESIGNS re-signs, and once via botocore.
    assert 1 <= expired <= 32 * (aiodcp._store._RESIGNS + 2), counters
    assert len(data_gets(records)) <= 32 * (aiodcp._store._RESIGNS + 2) + 32


# --------------------------------------------------------------------------- throttling

RATE = 40.0  # requests per second the store lets through for the bucket (burst: 40)


@dataclass(frozen=True)
class ThrottledLoad:
    stats: aiodcp.LoadStats
    data_ok: int
    data_slowdown: int
    metadata_slowdown: int
    refused: dict[str, int]
    head_slowdown: int = 0

    def line(self, name: str) -> str:
        s = self.stats
        rate = "None" if s.min_request_rate is None else f"{s.min_request_rate:.1f}"
        return (
            f"{name}: {self.data_ok} data GETs served, {self.data_slowdown} refused SlowDown "
            f"(+{self.metadata_slowdown} .metadata), stats.throttled {s.throttled}, "
            f"requests {s.requests}, retries {s.retries}, min_request_rate {rate}/s, "
            f"wall {s.wall_time_s:.2f} s"
        )


async def throttled_load(server: StrictServer, ck: Checkpoint) -> ThrottledLoad:
    """~200 GETs of 32 KiB against a bucket throttled to RATE requests/s, defaults otherwise
    (max_concurrency 32), 10 attempts per request."""
    server.throttle(ck.bucket, RATE)  # also fills the bucket's tokens (burst RATE)
    server.reset_counters()
    mark = len(server.requests())
    try:
        stats = await load(
            ck, server.endpoint_url, part_size=32 * KIB, max_gap_size=0, max_attempts=10
        )
    finally:
        server.throttle(ck.bucket, None)
    records = server.requests()[mark:]
    refused = server.counters()["refused"]
    gets = data_gets(records)
    meta = metadata_gets(records)
    # the HEAD asking for the data file's checksum (the checkpoint has no record, the load
    # reads the file whole), under the same limiter, retried on SlowDown
    heads = [r for r in records if r["method"] == "HEAD" and r["path"].endswith(".distcp")]
    assert len(records) == len(gets) + len(meta) + len(heads)  # nothing else was sent
    assert stats.requests == len(gets) + len(meta)  # every GET sent is counted, retries included
    assert stats.checksum_requests == len(heads) >= 1  # every HEAD too, apart
    assert set(refused) <= {"SlowDown"}, refused
    slow_data = sum(r["code"] == "SlowDown" for r in gets)
    slow_meta = sum(r["code"] == "SlowDown" for r in meta)
    slow_head = sum(r["code"] == "SlowDown" for r in heads)
    assert refused.get("SlowDown", 0) == slow_data + slow_meta + slow_head
    assert all(r["code"] == "SlowDown" or r["status"] == 206 for r in gets)
    assert all(r["code"] == "SlowDown" or r["status"] == 200 for r in heads)
    assert [r["code"] for r in heads][-1:] != ["SlowDown"]  # it got its answer in the end
    return ThrottledLoad(
        stats,
        sum(r["status"] == 206 for r in gets),
        slow_data,
        slow_meta,
        dict(refused),
        slow_head,
    )


async def test_throttled_load_adapts_its_rate(
    server: StrictServer, checkpoint: Checkpoint, record_property: Any
) -> None:
    result = await throttled_load(server, checkpoint)
    stats = result.stats
    note("\n" + result.line("adaptive"))
    record_property("adaptive", result.line("adaptive"))

    assert result.data_ok >= 150
    # Only data GETs and checksum HEADs (both under the load's limiter) count in
    # stats.throttled (a throttled .metadata GET is a plain retry).
    assert stats.throttled == result.data_slowdown + result.head_slowdown
    assert stats.throttled >= 1
    assert stats.retries == result.data_slowdown + result.metadata_slowdown
    assert stats.min_request_rate is not None
    # The limiter went below the store's rate (measured: ~19/s, half of RATE).
    assert 1.0 <= stats.min_request_rate < RATE
    assert result.data_slowdown < 0.5 * result.data_ok


async def test_adaptive_rate_refuses_less_than_backoff_alone(
    server: StrictServer,
    checkpoint: Checkpoint,
    monkeypatch: pytest.MonkeyPatch,
    record_property: Any,
) -> None:
    """The same load, same server, same checkpoint, twice: with the adaptive limiter, then
    with it neutralised (SlowDown replies no longer lower the rate: retries with exponential
    backoff and jitter only, the behaviour before the limiter)."""
    adaptive = await throttled_load(server, checkpoint)
    with monkeypatch.context() as patch:
        patch.setattr(aiodcp._throttle.AdaptiveRate, "throttled", lambda self, sent_at: None)
        backoff_only = await throttled_load(server, checkpoint)
    for name, result in (("adaptive", adaptive), ("backoff only", backoff_only)):
        note(("\n" if name == "adaptive" else "") + result.line(name))
        record_property(name, result.line(name))

    assert backoff_only.stats.min_request_rate is None  # the limiter really was off
    assert backoff_only.stats.throttled == backoff_only.data_slowdown + backoff_only.head_slowdown
    assert adaptive.data_slowdown < backoff_only.data_slowdown
