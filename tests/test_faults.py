"""Faults on the wire (through tests/faultproxy.py): every load is exact or fails specifically.

For each fault the load either returns bytes identical to the saved checkpoint, or raises the
specific aiodcp error once the configured attempts are used, promptly, leaving no aiodcp thread
and no connection behind. Both entry points are covered: ``await aiodcp.load_checkpoint`` and
``dcp.load(..., storage_reader=aiodcp.S3StorageReader(...))``.
"""

from __future__ import annotations

import asyncio
import copy
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException

import aiodcp
import aiodcp._store

from conftest import S3Server, assert_same, save_checkpoint, upload_dir
from faultproxy import Fault, FaultProxy, aiodcp_threads, assert_clean

BUCKET = "faults-bucket"
LOAD_TIMEOUT_S = 60.0  # generous: a hang fails the test, a slow machine does not
STALL_S = 2 * LOAD_TIMEOUT_S
"""A stall longer than the load's hang guard: a load that finishes at all had its read timeout
end the stall (the client hung up), so no clock is needed to tell."""
READ_TIMEOUT_S = 2.0
"""For tests whose fault is a stall: long against scheduling noise on a busy machine (a healthy
GET's response does not pause that long), short enough that each stall costs little."""


@dataclass(frozen=True)
class Checkpoint:
    url: str
    prefix: str
    state: dict[str, Any]
    data_keys: list[str]

    def template(self) -> dict[str, Any]:
        return {
            k: torch.zeros_like(v) if isinstance(v, torch.Tensor) else None
            for k, v in self.state.items()
        }


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory, s3_server: S3Server) -> Checkpoint:
    """~1.5 MiB in 4 data files: 24 tensors of 64 KiB and a non-tensor value."""
    g = torch.Generator().manual_seed(11)
    sd: dict[str, Any] = {f"t{i:02d}": torch.randn(64, 256, generator=g) for i in range(24)}
    sd["step"] = 77
    local = tmp_path_factory.mktemp("faults") / "ck"
    save_checkpoint(copy.deepcopy(sd), local, thread_count=4)
    s3 = s3_server.client()
    s3.create_bucket(Bucket=BUCKET)
    upload_dir(s3, local, BUCKET, "ck")
    keys = sorted(f"ck/{p.name}" for p in local.iterdir() if p.suffix == ".distcp")
    assert len(keys) == 4
    return Checkpoint(f"s3://{BUCKET}/ck", "ck", sd, keys)


@pytest.fixture
def proxy(s3_server: S3Server) -> Iterator[FaultProxy]:
    with FaultProxy(s3_server.endpoint_url, seed=1234) as p:
        yield p


@pytest.fixture(autouse=True)
def fast_backoff(monkeypatch: pytest.MonkeyPatch) -> None:
    """Backoff as in production but 25x shorter, so exhausting attempts takes milliseconds."""
    monkeypatch.setattr(aiodcp._store, "RETRY_BACKOFF_BASE_S", 0.01, raising=False)


def options(proxy: FaultProxy, **extra: Any) -> dict[str, Any]:
    return {
        "endpoint_url": proxy.endpoint_url,
        "region": "us-east-1",
        "addressing_style": "path",
        # small parts: several GETs per file, so faults hit the middle of a file too
        "part_size": 64 * 1024,
        **extra,
    }


async def aload(ck: Checkpoint, proxy: FaultProxy, **extra: Any) -> tuple[dict[str, Any], Any]:
    state = ck.template()
    stats = await asyncio.wait_for(
        aiodcp.load_checkpoint(state, ck.url, **options(proxy, **extra)), LOAD_TIMEOUT_S
    )
    return state, stats


def sload(ck: Checkpoint, proxy: FaultProxy, **extra: Any) -> tuple[dict[str, Any], Any]:
    """dcp.load with an S3StorageReader in a thread, so a hang fails instead of blocking."""
    state = ck.template()
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            with aiodcp.S3StorageReader(ck.url, **options(proxy, **extra)) as reader:
                try:
                    dcp.load(state, storage_reader=reader)
                finally:
                    box["stats"] = reader.stats
        except BaseException as exc:
            box["error"] = exc

    thread = threading.Thread(target=run, name="test-sload", daemon=True)
    thread.start()
    thread.join(LOAD_TIMEOUT_S)
    assert not thread.is_alive(), "dcp.load hung"
    if "error" in box:
        raise unwrap(box["error"])
    return state, box["stats"]


def unwrap(exc: BaseException) -> BaseException:
    """The reader's own exception inside torch's CheckpointException."""
    if isinstance(exc, CheckpointException):
        for failure in exc.failures.values():
            inner = failure[0] if isinstance(failure, tuple) else failure
            if isinstance(inner, BaseException):
                return inner
    return exc


async def load(
    mode: str, ck: Checkpoint, proxy: FaultProxy, **extra: Any
) -> tuple[dict[str, Any], Any]:
    if mode == "async":
        return await aload(ck, proxy, **extra)
    return await asyncio.to_thread(sload, ck, proxy, **extra)


def data_gets(proxy: FaultProxy, key: str | None = None) -> list[Any]:
    return [
        r
        for r in proxy.requests
        if r.method == "GET"
        and r.path.endswith(".distcp")
        and (key is None or r.path.endswith(key))
    ]


MODES = ["async", "sync"]


# --------------------------------------------------------------------------- recoverable faults


@pytest.mark.parametrize("mode", MODES)
async def test_random_mid_body_drops_resume_and_load_exactly(
    mode: str, checkpoint: Checkpoint, proxy: FaultProxy
) -> None:
    clean_state, clean = await load(mode, checkpoint, proxy)
    assert_same(clean_state, checkpoint.state)
    assert clean.retries == 0 and clean.resumed_bytes == 0
    proxy.clear()

    proxy.add(Fault.drop(), path_suffix=".distcp", probability=0.2)
    # 10 attempts: a part fails for good with probability 0.2**10, never in practice.
    state, stats = await load(mode, checkpoint, proxy, max_attempts=10)
    assert_same(state, checkpoint.state)
    drops = proxy.faults["drop"]
    assert drops > 0
    assert stats.retries == drops
    assert stats.resumed_bytes > 0
    assert stats.files == 4 and stats.items == clean.items
    # every GET the proxy saw is counted (data GETs + the .metadata GET)
    assert stats.requests == len(data_gets(proxy)) + 1
    # the plan's bytes, asked once whatever was retried; retried GETs ask only what is missing
    assert stats.bytes_requested == clean.bytes_requested
    assert stats.bytes_used == clean.bytes_used
    assert_clean(proxy)


async def test_short_bodies_resume_from_the_last_byte(
    checkpoint: Checkpoint, proxy: FaultProxy
) -> None:
    key = checkpoint.data_keys[0]
    proxy.add(Fault.short(1000), path_suffix=key, times=3)
    state, stats = await aload(checkpoint, proxy, part_size=1024 * 1024)
    assert_same(state, checkpoint.state)
    gets = data_gets(proxy, key)
    assert proxy.faults["short"] == 3 and stats.retries == 3
    # the same part, each retry starting 1000 bytes further on: a resume, not a restart
    starts = [int(r.range.split("=")[1].split("-")[0]) for r in gets[:4]]
    assert starts == [0, 1000, 2000, 3000]
    assert stats.resumed_bytes == 1000 + 2000 + 3000
    # every resume is pinned to the ETag of the first response
    assert gets[0].if_match is None and gets[1].if_match
    assert {r.if_match for r in gets[1:4]} == {gets[1].if_match}
    assert_clean(proxy)


@pytest.mark.parametrize(
    "fault",
    [Fault.hang_up_now(), Fault.drop(0), Fault.short(0)],
    ids=["reset-before-headers", "reset-after-headers", "fin-after-headers"],
)
async def test_connection_lost_before_any_body_byte_is_retried(
    fault: Fault, checkpoint: Checkpoint, proxy: FaultProxy
) -> None:
    proxy.add(fault, path_suffix=".distcp", times=4)
    state, stats = await aload(checkpoint, proxy)
    assert_same(state, checkpoint.state)
    assert proxy.faults[fault.name] == 4
    assert stats.resumed_bytes == 0
    if fault.hang_up:
        # aiohttp itself resends a GET once when a *reused* connection closes before any
        # reply (a stale keep-alive connection); those resends are not in LoadStats.
        unseen = len(data_gets(proxy)) - (stats.requests - 1)
        assert unseen == 4 - stats.retries
    else:
        assert stats.retries == 4
    assert_clean(proxy)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("fault", [Fault.slow_down(), Fault.internal_error()], ids=["503", "500"])
async def test_transient_error_responses_are_retried(
    mode: str,
    fault: Fault,
    checkpoint: Checkpoint,
    proxy: FaultProxy,
    store_path: dict[str, Any],
) -> None:
    proxy.add(fault, path_suffix=".distcp", times=3)
    proxy.add(fault, path_suffix=".metadata", times=1)
    state, stats = await load(mode, checkpoint, proxy, **store_path)
    assert_same(state, checkpoint.state)
    assert proxy.faults[fault.name] == 4
    assert stats.retries >= 3  # the data GETs' retries (the .metadata retry is the caller's)
    assert stats.requests >= len(data_gets(proxy)) + 1
    assert stats.resumed_bytes == 0  # nothing had been received: retried from the start
    assert_clean(proxy)


async def test_stall_before_first_byte_times_out_and_is_retried(
    checkpoint: Checkpoint, proxy: FaultProxy
) -> None:
    """Two GETs stalled for longer than the load's hang guard: the load completes, exactly, so
    the read timeout ended both stalls; at least those two were retried (a busy machine may
    add a retry of its own, never a failure)."""
    rule = proxy.add(Fault.stall(STALL_S), path_suffix=".distcp", times=2)
    state, stats = await aload(checkpoint, proxy, read_timeout_s=READ_TIMEOUT_S)
    assert_same(state, checkpoint.state)
    assert rule.hits == 2 and stats.retries >= 2
    assert_clean(proxy)
    unanswered = proxy.statuses().count(None)  # the client hung up on them
    assert unanswered >= 2, "the stalled GETs were answered: the client did not give up"


async def test_stall_mid_body_times_out_and_resumes(
    checkpoint: Checkpoint, proxy: FaultProxy
) -> None:
    """A body that stops after 5000 bytes for longer than the load's hang guard: the read
    timeout fires and the next GET of that file resumes at byte 5000, pinned to the ETag."""
    key = checkpoint.data_keys[1]
    proxy.add(Fault.stall_body(5000, STALL_S), path_suffix=key, times=1)
    state, stats = await aload(
        checkpoint, proxy, read_timeout_s=READ_TIMEOUT_S, part_size=1024 * 1024
    )
    assert_same(state, checkpoint.state)
    assert stats.retries >= 1 and stats.resumed_bytes >= 5000
    stalled, resumed = data_gets(proxy, key)[:2]  # one GET per file with 1 MiB parts
    start = int(stalled.range.split("=")[1].split("-")[0])
    assert resumed.range.split("=")[1].split("-")[0] == str(start + 5000)
    assert resumed.if_match
    assert_clean(proxy)


async def test_metadata_body_dropped_is_fetched_again(
    checkpoint: Checkpoint, proxy: FaultProxy, store_path: dict[str, Any]
) -> None:
    proxy.add(Fault.drop(100), path_suffix=".metadata", times=2)
    state, _ = await aload(checkpoint, proxy, **store_path)
    assert_same(state, checkpoint.state)
    meta = [r for r in proxy.requests if r.path.endswith(".metadata")]
    assert len(meta) == 3 and proxy.faults["drop"] == 2
    assert_clean(proxy)


# --------------------------------------------------------------------------- faults that win


@pytest.mark.parametrize("mode", MODES)
async def test_persistent_5xx_fails_after_max_attempts(
    mode: str, checkpoint: Checkpoint, proxy: FaultProxy
) -> None:
    key = checkpoint.data_keys[2]
    proxy.add(Fault.internal_error(), path_suffix=key)
    started = time.perf_counter()
    with pytest.raises(aiodcp.TransferError, match=f"s3://{BUCKET}/{key}") as info:
        await load(mode, checkpoint, proxy, max_attempts=3, part_size=1024 * 1024)
    elapsed = time.perf_counter() - started
    assert elapsed < LOAD_TIMEOUT_S, f"failing took {elapsed:.0f} s: a hang guard, not a bound"
    error = info.value
    assert error.bucket == BUCKET and error.key == key
    assert error.attempts == 3 and error.status == 500
    assert "after 3 attempts" in str(error) and "InternalError" in str(error)
    assert len(data_gets(proxy, key)) == 3  # exactly max_attempts requests for the failing part
    assert_clean(proxy)


@pytest.mark.parametrize("mode", MODES)
async def test_persistent_drops_fail_after_max_attempts(
    mode: str, checkpoint: Checkpoint, proxy: FaultProxy
) -> None:
    key = checkpoint.data_keys[0]
    proxy.add(Fault.drop(10), path_suffix=key)
    with pytest.raises(aiodcp.TransferError, match=f"s3://{BUCKET}/{key}") as info:
        await load(mode, checkpoint, proxy, max_attempts=4, part_size=1024 * 1024)
    assert info.value.attempts == 4
    assert len(data_gets(proxy, key)) == 4
    assert_clean(proxy)


async def test_persistent_stall_fails_with_a_timeout_error(
    checkpoint: Checkpoint, proxy: FaultProxy
) -> None:
    """Every data GET stalls for longer than the load's hang guard: the load fails (within
    the guard, so by its read timeouts) after exactly max_attempts of the part it names."""
    proxy.add(Fault.stall(STALL_S), path_suffix=".distcp")
    with pytest.raises(aiodcp.TransferError, match=r"\.distcp") as info:
        await aload(checkpoint, proxy, read_timeout_s=1.0, max_attempts=2)
    assert info.value.attempts == 2
    assert "timeout" in str(info.value).lower()
    assert_clean(proxy)


async def test_connection_refused_fails_after_max_attempts(checkpoint: Checkpoint) -> None:
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(aiodcp.TransferError, match=rf"s3://{BUCKET}/ck/\.metadata") as info:
        await asyncio.wait_for(
            aiodcp.load_checkpoint(
                checkpoint.template(),
                checkpoint.url,
                endpoint_url=f"http://127.0.0.1:{port}",
                addressing_style="path",
                max_attempts=3,
                connect_timeout_s=1,
            ),
            LOAD_TIMEOUT_S,
        )
    assert info.value.attempts == 3
    assert aiodcp_threads() == []


async def test_connect_timeout_fails_after_max_attempts(checkpoint: Checkpoint) -> None:
    import socket

    # A listener whose accept queue is full and never drained: SYNs go unanswered, so
    # connecting times out (on loopback, without any real network).
    listener = socket.socket()
    fillers = []
    try:
        listener.bind(("127.0.0.1", 0))
        listener.listen(0)
        port = listener.getsockname()[1]
        for _ in range(3):
            filler = socket.socket()
            filler.setblocking(False)
            try:
                filler.connect(("127.0.0.1", port))
            except BlockingIOError:
                pass
            fillers.append(filler)
        started = time.perf_counter()
        with pytest.raises(aiodcp.TransferError, match="connect_timeout_s") as info:
            await asyncio.wait_for(
                aiodcp.load_checkpoint(
                    checkpoint.template(),
                    checkpoint.url,
                    endpoint_url=f"http://127.0.0.1:{port}",
                    addressing_style="path",
                    max_attempts=3,
                    connect_timeout_s=0.3,
                ),
                LOAD_TIMEOUT_S,
            )
        elapsed = time.perf_counter() - started
        assert elapsed < LOAD_TIMEOUT_S, f"took {elapsed:.0f} s: a hang guard, not a bound"
        assert info.value.attempts == 3 and info.value.key == "ck/.metadata"
        assert "ConnectTimeoutError" in str(info.value)
    finally:
        for filler in fillers:
            filler.close()
        listener.close()
    assert aiodcp_threads() == []


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("target", ["data", "metadata"])
async def test_access_denied_is_not_retried(
    mode: str, target: str, checkpoint: Checkpoint, proxy: FaultProxy, store_path: dict[str, Any]
) -> None:
    key = checkpoint.data_keys[3] if target == "data" else "ck/.metadata"
    proxy.add(Fault.access_denied(), path_suffix=key)
    with pytest.raises((aiodcp.AccessDeniedError, AssertionError)) as info:
        # one GET per file
        await load(mode, checkpoint, proxy, part_size=1024 * 1024, **store_path)
    error = info.value
    if mode == "sync" and target == "metadata":
        # dcp.load keeps only the text of a failing read_metadata (see DESIGN.md)
        assert isinstance(error, AssertionError)
    else:
        assert isinstance(error, aiodcp.AccessDeniedError)
        assert isinstance(error, PermissionError)
        assert error.bucket == BUCKET and error.key == key
    assert f"s3://{BUCKET}/{key}" in str(error) and "access denied" in str(error)
    # not retried: one GET (a data file's HEAD asking for its checksum is not refused here)
    to_key = [r for r in proxy.requests if r.path.endswith(key)]
    assert [r.method for r in to_key if r.method != "HEAD"] == ["GET"]
    assert len([r for r in to_key if r.method == "HEAD"]) <= (1 if target == "data" else 0)
    assert_clean(proxy)


async def test_a_store_that_ignores_range_is_reported(
    checkpoint: Checkpoint, proxy: FaultProxy, store_path: dict[str, Any]
) -> None:
    proxy.add(Fault.ignore_range(), path_suffix=".distcp")
    with pytest.raises(aiodcp.StorageError, match="ignored the Range header") as info:
        await aload(checkpoint, proxy, **store_path)  # 64 KiB parts: most start past byte 0
    assert info.value.key in checkpoint.data_keys
    assert 200 in proxy.statuses()
    assert_clean(proxy)


async def test_cancel_while_a_request_is_stalled(checkpoint: Checkpoint, proxy: FaultProxy) -> None:
    """Every data GET stalls for longer than the hang guard (the default read timeout is 60 s
    too): only the cancel can end the load within it, and it leaves nothing behind."""
    rule = proxy.add(Fault.stall(STALL_S), path_suffix=".distcp")
    task = asyncio.create_task(aload(checkpoint, proxy))
    assert await asyncio.to_thread(rule.triggered.wait, LOAD_TIMEOUT_S)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(task, LOAD_TIMEOUT_S)  # a hang guard, not a time bound
    assert_clean(proxy)


# --------------------------------------------------------------------------- consistency


@pytest.fixture
def mutable_checkpoint(tmp_path: Path, s3: Any, bucket: str) -> tuple[Checkpoint, Any]:
    """A one-file checkpoint of its own (8 items of 64 KiB), to be overwritten mid-load."""
    g = torch.Generator().manual_seed(5)
    sd = {f"w{i}": torch.randn(64, 256, generator=g) for i in range(8)}
    local = save_checkpoint(copy.deepcopy(sd), tmp_path / "ck")
    upload_dir(s3, local, bucket, "ck")
    keys = [f"ck/{p.name}" for p in local.iterdir() if p.suffix == ".distcp"]
    assert len(keys) == 1
    return Checkpoint(f"s3://{bucket}/ck", "ck", sd, keys), s3


@pytest.mark.parametrize("store_honours_if_match", [True, False], ids=["412", "etag-compare"])
async def test_object_replaced_mid_load_raises_object_changed(
    store_honours_if_match: bool,
    mutable_checkpoint: tuple[Checkpoint, Any],
    proxy: FaultProxy,
) -> None:
    ck, s3 = mutable_checkpoint
    key = ck.data_keys[0]
    bucket = ck.url.split("/")[2]
    release = threading.Event()
    stall = Fault.stall(60.0, release=release)
    if not store_honours_if_match:  # a store that ignores If-Match: the engine must notice
        stall = stall.also(strip_headers=("if-match",))
    rule = proxy.add(stall, path_suffix=key, nth=[2])
    # one GET at a time, 64 KiB each: the 2nd GET is sent after the 1st answered (and pinned)
    task = asyncio.create_task(aload(ck, proxy, max_concurrency=1, max_gap_size=0))
    try:
        assert await asyncio.to_thread(rule.triggered.wait, 30)
        body = (await asyncio.to_thread(s3.get_object, Bucket=bucket, Key=key))["Body"].read()
        await asyncio.to_thread(s3.put_object, Bucket=bucket, Key=key, Body=body[::-1])
    finally:
        release.set()
    with pytest.raises(aiodcp.ObjectChangedError, match=f"s3://{bucket}/{key}") as info:
        await task
    assert info.value.bucket == bucket and info.value.key == key
    gets = data_gets(proxy, key)
    first_etag = gets[1].if_match
    assert first_etag  # the 2nd GET was pinned to the 1st response's ETag
    if store_honours_if_match:
        assert proxy.status_of(gets[1]) == 412  # moto honours If-Match on GET
    else:
        assert proxy.status_of(gets[1]) == 206
        assert "became" in str(info.value)  # caught by the engine's own ETag comparison
    assert len(gets) == 2  # not retried
    assert_clean(proxy)


@pytest.fixture
def two_file_checkpoint(tmp_path: Path, s3: Any, bucket: str) -> tuple[Checkpoint, Path]:
    """Two data files of 4 x 64 KiB each, to have one overwritten before its first GET, and the
    same state dict saved again with other values (a job re-saving to the same path)."""
    g = torch.Generator().manual_seed(9)
    sd = {f"w{i}": torch.randn(64, 256, generator=g) for i in range(8)}
    local = save_checkpoint(copy.deepcopy(sd), tmp_path / "ck", thread_count=2)
    resaved = save_checkpoint({k: v + 1 for k, v in sd.items()}, tmp_path / "v2", thread_count=2)
    upload_dir(s3, local, bucket, "ck")
    keys = sorted(f"ck/{p.name}" for p in local.iterdir() if p.suffix == ".distcp")
    assert len(keys) == 2
    return Checkpoint(f"s3://{bucket}/ck", "ck", sd, keys), resaved


@pytest.mark.parametrize("mode", MODES)
async def test_file_replaced_before_its_first_get_raises_object_changed(
    mode: str, two_file_checkpoint: tuple[Checkpoint, Path], s3: Any, proxy: FaultProxy
) -> None:
    """A job re-saving to the same path while a load runs: the file the load has not reached
    yet is replaced by the same file of a new save (same layout, other values: it would decode
    fine). Its first GET has no ETag to pin to, so it carries If-Unmodified-Since (the
    .metadata GET's Date) and the store refuses the new version: no mix of versions."""
    ck, resaved = two_file_checkpoint
    first, second = ck.data_keys
    bucket = ck.url.split("/")[2]
    release = threading.Event()
    rule = proxy.add(Fault.stall(60.0, release=release), path_suffix=first, nth=[1])
    task = asyncio.ensure_future(load(mode, ck, proxy, max_concurrency=1, max_gap_size=0))
    try:
        assert await asyncio.to_thread(rule.triggered.wait, 30)
        # The stimulus, not a wait for a state: the new version's Last-Modified (whole
        # seconds) must be later than the .metadata GET's Date.
        await asyncio.sleep(1.1)
        body = (resaved / second.rsplit("/", 1)[1]).read_bytes()
        await asyncio.to_thread(s3.put_object, Bucket=bucket, Key=second, Body=body)
    finally:
        release.set()
    with pytest.raises(aiodcp.ObjectChangedError, match=f"s3://{bucket}/{second}"):
        await task
    gets = data_gets(proxy, second)
    assert gets[0].if_match is None
    assert gets[0].headers.get("if-unmodified-since")
    assert proxy.status_of(gets[0]) == 412
    assert len(gets) == 1  # not retried
    assert_clean(proxy)


# --------------------------------------------------------------------------- no unbounded wait


@pytest.mark.parametrize("mode", MODES)
async def test_a_blocked_io_loop_fails_the_load_naming_what_it_waited_for(
    mode: str, checkpoint: Checkpoint, proxy: FaultProxy
) -> None:
    """An on_request hook that does not return blocks aiodcp's I/O loop: no byte arrives and no
    timeout can fire there. The thread that decodes waits for its next item only as long as a
    working download can be that quiet (twice the longest read timeout plus backoff: ~1 s
    here), then raises a TransferError naming the bytes it waited for: never a hang."""
    blocked, release = threading.Event(), threading.Event()

    def hook(metrics: aiodcp.RequestMetrics) -> None:
        if not blocked.is_set():
            blocked.set()
            release.wait(4)  # bounded, so the reader's close can end the test

    started = time.perf_counter()
    try:
        with pytest.raises(aiodcp.TransferError, match="made no progress") as info:
            await load(
                mode,
                checkpoint,
                proxy,
                on_request=hook,
                read_timeout_s=0.5,
                connect_timeout_s=0.5,
                max_attempts=2,
                max_concurrency=2,
            )
    finally:
        release.set()
    assert blocked.is_set()
    error = info.value
    assert error.bucket == BUCKET and error.key in checkpoint.data_keys
    assert error.byte_range is not None and f"bytes [{error.byte_range[0]}," in str(error)
    assert "on_request hook" in str(error)
    # A hang guard, not a performance bound: the wait ends after ~1 s of silence.
    assert time.perf_counter() - started < LOAD_TIMEOUT_S
    assert aiodcp_threads() == []
