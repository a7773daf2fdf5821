"""A save against a store that behaves as S3 does, and faults on the wire: every save either
commits a checkpoint identical to its state dict, or raises a specific error having committed
nothing, with no multipart upload left open and none of its data files left behind.

The store is tests/strictstore.py (SigV4 on every request, CRC64NVME verified on receipt,
conditional writes with S3's 412 and 409) in front of moto, with tests/faultproxy.py in between
where a fault is injected.
"""

from __future__ import annotations

import asyncio
import gc
import threading
import time
import warnings
from collections.abc import Iterator
from typing import Any

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException

import aiodcp
import aiodcp._store
from aiodcp.dcp._session import _unwrap

from conftest import StrictServer, assert_same
from faultproxy import Fault, FaultProxy, aiodcp_threads, assert_clean

MIB = 1024 * 1024
HANG_GUARD_S = 60.0  # generous: a hang fails the test, a slow machine does not


@pytest.fixture(autouse=True)
def fast_backoff(monkeypatch: pytest.MonkeyPatch) -> None:
    """Backoff as in production but 25x shorter, so exhausting attempts takes milliseconds."""
    monkeypatch.setattr(aiodcp._store, "RETRY_BACKOFF_BASE_S", 0.01, raising=False)


@pytest.fixture
def strict(strict_server: StrictServer) -> Iterator[StrictServer]:
    strict_server.reset()
    strict_server.reset_counters()
    yield strict_server
    strict_server.reset()


@pytest.fixture
def s3s(strict: StrictServer) -> Any:
    return strict.client()


@pytest.fixture
def proxy(strict: StrictServer) -> Iterator[FaultProxy]:
    with FaultProxy(strict.endpoint_url, seed=99) as p:
        yield p


def opts(endpoint: str, **extra: Any) -> dict[str, Any]:
    return {"endpoint_url": endpoint, "region": "us-east-1", "addressing_style": "path", **extra}


def state(n_big: int = 3, big: int = 2 * MIB) -> dict[str, Any]:
    """``n_big`` tensors of ``big`` bytes (sent from their own memory), small ones, a value."""
    g = torch.Generator().manual_seed(5)
    sd: dict[str, Any] = {f"big{i}": torch.randn(big // 4, generator=g) for i in range(n_big)}
    sd.update({f"small{i}": torch.randn(100, generator=g) for i in range(20)})
    sd["step"] = 3
    return sd


def blank(sd: dict[str, Any]) -> dict[str, Any]:
    return {k: torch.zeros_like(v) if isinstance(v, torch.Tensor) else None for k, v in sd.items()}


def save(sd: dict[str, Any], url: str, **kwargs: Any) -> aiodcp.SaveStats:
    """``dcp.save`` through a fresh writer, raising aiodcp's own error (not torch's wrapper)."""
    with aiodcp.S3StorageWriter(url, **kwargs) as writer, warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        try:
            dcp.save(sd, storage_writer=writer)
        except CheckpointException as exc:
            raise _unwrap(exc) from None
        assert writer.stats is not None
        return writer.stats


def load_back(sd: dict[str, Any], url: str, endpoint: str) -> None:
    out = blank(sd)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        dcp.load(out, storage_reader=aiodcp.S3StorageReader(url, **opts(endpoint)))
    assert_same(out, sd)


def keys(s3: Any, bucket: str) -> list[str]:
    listed = s3.list_objects_v2(Bucket=bucket)
    return sorted(o["Key"] for o in listed.get("Contents", []))


def open_uploads(s3: Any, bucket: str) -> list[str]:
    return [u["Key"] for u in s3.list_multipart_uploads(Bucket=bucket).get("Uploads", [])]


def assert_nothing_left(s3: Any, bucket: str, before: list[str] | None = None) -> None:
    """No multipart upload open, and the bucket holds what it held before the save."""
    assert open_uploads(s3, bucket) == []
    assert keys(s3, bucket) == (before or [])


# --------------------------------------------------------------------------- the strict store


def test_save_to_the_strict_store_both_ways(
    strict: StrictServer, strict_bucket: str, store_path: dict[str, Any]
) -> None:
    """SigV4 (query form) on every request, checksums verified on receipt: nothing refused."""
    sd = state(n_big=5, big=3 * MIB)  # 15 MiB in 2 files: multipart uploads and PUTs
    url = f"s3://{strict_bucket}/ck"
    stats = save(sd, url, files_per_rank=2, **opts(strict.endpoint_url, **store_path))
    assert stats.multipart_uploads >= 1 and stats.retries == 0
    load_back(sd, url, strict.endpoint_url)
    counters = strict.counters()
    assert counters["refused"] == {}
    writes = [
        r
        for r in strict.requests()
        if r["method"] in ("PUT", "POST", "DELETE")
        and r["path"].startswith(f"/{strict_bucket}/ck/")
    ]
    assert writes and {r["auth"] for r in writes} == {"v4-query"}


def test_the_strict_store_refuses_a_wrong_checksum(s3s: Any, strict_bucket: str) -> None:
    """What makes the checksums worth sending: a body that is not what its CRC says is refused."""
    good = aiodcp._checksum.to_header(aiodcp._checksum.crc64nvme(b"payload"))
    bad = aiodcp._checksum.to_header(aiodcp._checksum.crc64nvme(b"paylaod"))
    s3s.put_object(Bucket=strict_bucket, Key="ok", Body=b"payload", ChecksumCRC64NVME=good)
    with pytest.raises(s3s.exceptions.ClientError, match="BadDigest"):
        s3s.put_object(Bucket=strict_bucket, Key="bad", Body=b"payload", ChecksumCRC64NVME=bad)
    assert keys(s3s, strict_bucket) == ["ok"]


@pytest.mark.parametrize("method", ["PUT"])
def test_a_body_damaged_in_transit_is_refused_and_sent_again(
    strict: StrictServer, strict_bucket: str, proxy: FaultProxy, method: str
) -> None:
    """A flipped bit in a part's body: the store answers BadDigest, the part is sent again
    from the same memory (the items are serialised once), and the checkpoint is exact."""
    sd = state(n_big=4, big=3 * MIB)
    rule = proxy.add(
        Fault.corrupt(), method=method, predicate=lambda r: "partNumber" in r.query, times=1
    )
    url = f"s3://{strict_bucket}/ck"
    stats = save(sd, url, **opts(proxy.endpoint_url))
    assert rule.hits == 1
    assert strict.counters()["refused"] == {"BadDigest": 1}
    assert stats.retries == 1
    assert stats.items == len(sd)  # each item serialised once, whatever was resent
    load_back(sd, url, strict.endpoint_url)


def test_conditional_commit_conflict_answers_409(
    strict: StrictServer, strict_bucket: str, s3s: Any
) -> None:
    """Two saves commit the same path at once: the store takes the first conditional write and
    answers the second 409 ConditionalRequestConflict; that save raises ConcurrentSaveError,
    deletes its files, and the first one's checkpoint is complete."""
    url = f"s3://{strict_bucket}/ck"
    first, second = state(), state()
    second["step"] = 4
    strict.hold_conditional(True)
    outcome: dict[str, Any] = {}

    def run_first() -> None:
        try:
            outcome["first"] = save(first, url, **opts(strict.endpoint_url))
        except BaseException as exc:
            outcome["first"] = exc

    thread = threading.Thread(target=run_first)
    thread.start()
    deadline = time.monotonic() + HANG_GUARD_S
    while strict.counters()["held"] == 0:  # the first commit is in progress, held
        assert time.monotonic() < deadline, "hang guard: the first commit never arrived"
        time.sleep(0.01)
    with pytest.raises(aiodcp.ConcurrentSaveError, match="409") as info:
        save(second, url, **opts(strict.endpoint_url))
    assert info.value.status == 409
    strict.hold_conditional(False)
    thread.join(HANG_GUARD_S)
    assert isinstance(outcome["first"], aiodcp.SaveStats), outcome
    load_back(first, url, strict.endpoint_url)
    md = s3s.get_object(Bucket=strict_bucket, Key="ck/.metadata")["Body"].read()
    files = [k for k in keys(s3s, strict_bucket) if k != "ck/.metadata"]
    assert len(files) == 1 and files[0].split(".")[1].encode() in md  # the second's are gone
    assert open_uploads(s3s, strict_bucket) == []


@pytest.mark.parametrize("overwrite", [True, False])
def test_a_checkpoint_committed_during_the_save_is_not_overwritten(
    strict: StrictServer, strict_bucket: str, s3s: Any, proxy: FaultProxy, overwrite: bool
) -> None:
    """Save A begins (it reads what is at the path), its commit is held on the wire while save
    B commits; A's conditional commit (If-Match the ETag it saw, or If-None-Match: *) is then
    refused with 412: A raises, commits nothing, deletes its files; B's checkpoint is intact."""
    url = f"s3://{strict_bucket}/ck"
    if overwrite:
        save(state(), url, **opts(strict.endpoint_url))  # something A replaces
    a, b = state(), state()
    a["step"], b["step"] = 10, 20
    release = threading.Event()
    rule = proxy.add(Fault.stall(HANG_GUARD_S, release), method="PUT", path_suffix="/.metadata")
    outcome: dict[str, Any] = {}

    def run_a() -> None:
        try:
            outcome["a"] = save(a, url, overwrite=overwrite, **opts(proxy.endpoint_url))
        except BaseException as exc:
            outcome["a"] = exc

    thread = threading.Thread(target=run_a)
    thread.start()
    assert rule.triggered.wait(HANG_GUARD_S), "hang guard: A's commit never arrived"
    save(b, url, **opts(strict.endpoint_url))
    release.set()
    thread.join(HANG_GUARD_S)
    expected = aiodcp.ConcurrentSaveError if overwrite else aiodcp.CheckpointExistsError
    assert isinstance(outcome["a"], expected), outcome
    assert "nothing was committed" in str(outcome["a"])
    load_back(b, url, strict.endpoint_url)
    assert len(keys(s3s, strict_bucket)) == 2  # B's .metadata and its one data file
    assert open_uploads(s3s, strict_bucket) == []


def test_a_commit_whose_reply_was_lost_is_recognised(
    strict: StrictServer, strict_bucket: str, proxy: FaultProxy
) -> None:
    """The store applied the .metadata PUT but its reply was cut: the retry meets 412 (its own
    If-None-Match: *), the save sees the store holds its very .metadata, and succeeds."""
    url = f"s3://{strict_bucket}/ck"
    sd = state()
    rule = proxy.add(Fault.lost_reply(), method="PUT", path_suffix="/.metadata", times=1)
    stats = save(sd, url, **opts(proxy.endpoint_url))
    assert rule.hits == 1 and stats.metadata_bytes > 0
    assert strict.counters()["refused"] == {}
    statuses = [
        r["status"]
        for r in strict.requests()
        if r["path"] == f"/{strict_bucket}/ck/.metadata" and r["method"] == "PUT"
    ]
    # applied, then the resent PUT refused (412) and recognised as this save's own write
    assert statuses == [200, 412]
    load_back(sd, url, strict.endpoint_url)


# --------------------------------------------------------------------------- faults on the wire


@pytest.mark.parametrize(
    "fault",
    [Fault.internal_error(), Fault.slow_down(), Fault.cut_upload(1000), Fault.hang_up_now()],
    ids=["500", "503", "cut-mid-body", "hang-up"],
)
def test_a_part_that_fails_once_is_sent_again(
    strict: StrictServer, strict_bucket: str, proxy: FaultProxy, fault: Fault
) -> None:
    sd = state(n_big=4, big=3 * MIB)
    rule = proxy.add(fault, method="PUT", predicate=lambda r: "partNumber" in r.query, times=1)
    url = f"s3://{strict_bucket}/ck"
    stats = save(sd, url, **opts(proxy.endpoint_url))
    assert rule.hits == 1
    parts = [r.query.split("&uploadId")[0] for r in proxy.requests if "partNumber" in r.query]
    assert len(parts) == len(set(parts)) + 1  # the failed part went once more
    # (an error reply is a counted retry; a connection that broke before any reply byte came
    # back is resent once at once, as a reused keep-alive connection that had died)
    assert stats.retries == (1 if fault.error is not None else stats.retries)
    if fault.name == "503":
        assert stats.throttled == 1 and stats.min_request_rate is not None
    load_back(sd, url, strict.endpoint_url)


def test_a_stalled_upload_times_out_and_is_sent_again(
    strict: StrictServer, strict_bucket: str, proxy: FaultProxy
) -> None:
    """The store stops reading a part's body: after read_timeout_s without progress the
    attempt fails, and the part goes again on a new connection."""
    sd = state(n_big=4, big=3 * MIB)
    release = threading.Event()
    rule = proxy.add(
        Fault.stall_upload(64 * 1024, HANG_GUARD_S, release),
        method="PUT",
        predicate=lambda r: "partNumber" in r.query,
        times=1,
    )
    url = f"s3://{strict_bucket}/ck"
    try:
        started = time.monotonic()
        stats = save(sd, url, **opts(proxy.endpoint_url, read_timeout_s=1.0))
        assert time.monotonic() - started < HANG_GUARD_S
    finally:
        release.set()
    assert rule.hits == 1 and stats.retries == 1
    load_back(sd, url, strict.endpoint_url)


@pytest.mark.parametrize(
    ("fault", "error"),
    [
        (Fault.internal_error(), aiodcp.TransferError),
        (Fault.access_denied(), aiodcp.AccessDeniedError),
    ],
    ids=["500-every-time", "403"],
)
def test_a_part_that_keeps_failing_fails_the_save_and_leaves_nothing(
    strict: StrictServer,
    strict_bucket: str,
    s3s: Any,
    proxy: FaultProxy,
    fault: Fault,
    error: type[Exception],
) -> None:
    url = f"s3://{strict_bucket}/ck"
    old = state(n_big=1)
    save(old, url, **opts(strict.endpoint_url))  # a checkpoint the failed save must not touch
    before = keys(s3s, strict_bucket)
    proxy.add(fault, method="PUT", predicate=lambda r: "partNumber=3" in r.query)
    with pytest.raises(error) as info:
        save(state(n_big=6, big=3 * MIB), url, max_attempts=3, **opts(proxy.endpoint_url))
    assert "(part 3)" in str(info.value) and f"s3://{strict_bucket}/ck/" in str(info.value)
    assert info.value.part == 3
    assert_nothing_left(s3s, strict_bucket, before)
    load_back(old, url, strict.endpoint_url)


# --------------------------------------------------------------------------- cancellation


async def test_cancelling_save_checkpoint_commits_nothing_and_leaves_nothing(
    strict: StrictServer, strict_bucket: str, s3s: Any, proxy: FaultProxy
) -> None:
    """A part stalls on the wire; the awaiting task is cancelled: every upload stops at once,
    multipart uploads are aborted, data files deleted, .metadata never written, and no aiodcp
    thread, task or connection is left."""
    release = threading.Event()
    rule = proxy.add(
        Fault.stall_upload(1, HANG_GUARD_S, release),
        method="PUT",
        predicate=lambda r: "partNumber=2" in r.query,
    )
    sd = state(n_big=6, big=3 * MIB)
    task = asyncio.create_task(
        aiodcp.save_checkpoint(sd, f"s3://{strict_bucket}/ck", **opts(proxy.endpoint_url))
    )
    try:
        assert await asyncio.to_thread(rule.triggered.wait, HANG_GUARD_S), "hang guard"
        started = time.monotonic()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(task, HANG_GUARD_S)
        assert time.monotonic() - started < 10, "cancellation was not prompt"
    finally:
        release.set()
    assert_nothing_left(s3s, strict_bucket)
    assert_clean(proxy)


def test_abort_from_another_thread_stops_dcp_save(
    strict: StrictServer, strict_bucket: str, s3s: Any, proxy: FaultProxy
) -> None:
    release = threading.Event()
    rule = proxy.add(
        Fault.stall_upload(1, HANG_GUARD_S, release),
        method="PUT",
        predicate=lambda r: "partNumber=2" in r.query,
    )
    writer = aiodcp.S3StorageWriter(f"s3://{strict_bucket}/ck", **opts(proxy.endpoint_url))
    threading.Thread(
        target=lambda: rule.triggered.wait(HANG_GUARD_S) and writer.abort(), daemon=True
    ).start()
    try:
        with pytest.raises(aiodcp.SaveCancelledError), warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            try:
                dcp.save(state(n_big=6, big=3 * MIB), storage_writer=writer)
            except CheckpointException as exc:
                raise _unwrap(exc) from None
    finally:
        release.set()
        writer.close()
    assert_nothing_left(s3s, strict_bucket)
    deadline = time.monotonic() + 5
    while aiodcp_threads() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert aiodcp_threads() == []


async def test_the_callers_loop_stays_responsive(strict: StrictServer, strict_bucket: str) -> None:
    """A 5 ms heartbeat on the caller's loop while 96 MiB upload.

    What the save could do to the caller's loop is run its own work there (stage or CRC bytes,
    build requests) or block it (a blocking wait). The wall-clock gap between two beats measures
    that and also the machine: on 2 busy cores the loop thread waits for a CPU, and for the GIL
    held by a thread that itself waits for a CPU, for longer than 100 ms (seen here once at a
    load average of ~5). So, as ``test_async.test_event_loop_stays_responsive`` does for loads:

    - strict, what our code controls: the loop thread's own CPU time between two beats
      (``time.thread_time()``) stays under 100 ms; waiting for a CPU or the GIL costs none;
    - the loop keeps running while the save streams its items: beats see the count of items
      the save has taken from the state dict at values between none and all (a loop blocked by
      a wait of ours, which costs no CPU, would see only the first and the last);
    - the wall-clock gap only gets a hang guard. The lag itself is a benchmark figure
      (benchmarks/save.py ``--lag``, on a quiet machine).
    """
    from torch.distributed.checkpoint.default_planner import DefaultSavePlanner

    sd = state(n_big=24, big=4 * MIB)
    taken = [0]  # write items the save's thread has resolved so far
    beats: list[tuple[float, float, int]] = []  # per gap: wall s, loop thread CPU s, taken
    done = asyncio.Event()

    class Counting(DefaultSavePlanner):
        def resolve_data(self, write_item: Any) -> Any:
            taken[0] += 1
            return super().resolve_data(write_item)

    async def heartbeat() -> None:
        while not done.is_set():
            wall, cpu = time.perf_counter(), time.thread_time()
            await asyncio.sleep(0.005)
            beats.append((time.perf_counter() - wall, time.thread_time() - cpu, taken[0]))

    gc.collect()  # the session's heap collected before, not during, what is measured
    beat = asyncio.create_task(heartbeat())
    try:
        stats = await aiodcp.save_checkpoint(
            sd, f"s3://{strict_bucket}/ck", planner=Counting(), **opts(strict.endpoint_url)
        )
    finally:
        done.set()
        await beat
    total = taken[0]
    assert stats.bytes_written > 96 * MIB and total >= 24 and len(beats) > 10
    busiest = max(cpu for _, cpu, _ in beats)
    assert busiest < 0.100, (
        f"the caller's loop thread ran {busiest * 1000:.0f} ms of CPU between two 5 ms beats: "
        "work of the save ran on it"
    )
    during = {n for _, _, n in beats if 0 < n < total}
    assert during, "no beat while the save took its items: the save blocked the caller's loop"
    longest = max(wall for wall, _, _ in beats)
    assert longest < HANG_GUARD_S, f"the loop stood still {longest:.1f} s (a hang guard)"


# --------------------------------------------------------------------------- TLS, requester pays


def test_save_over_tls(
    strict: StrictServer, strict_bucket: str, store_path: dict[str, Any]
) -> None:
    """The bodies go through the TLS transport the same way (written as the socket takes them)."""
    sd = state(n_big=3, big=3 * MIB)
    url = f"s3://{strict_bucket}/ck"
    tls = opts(strict.tls_endpoint_url, verify=str(strict.ca_path), **store_path)
    stats = save(sd, url, **tls)
    assert stats.multipart_uploads == 1 and stats.direct_bytes >= 9 * MIB
    out = blank(sd)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        dcp.load(out, storage_reader=aiodcp.S3StorageReader(url, **tls))
    assert_same(out, sd)


def test_save_to_a_requester_pays_bucket(
    strict: StrictServer, strict_bucket: str, store_path: dict[str, Any]
) -> None:
    """Every request of the save (uploads, multipart calls, the commit, its reads) carries
    x-amz-request-payer, signed: the store refuses any that does not."""
    strict.requester_pays(strict_bucket)
    sd = state(n_big=3, big=3 * MIB)
    url = f"s3://{strict_bucket}/ck"
    with pytest.raises(aiodcp.AccessDeniedError):
        save(sd, url, **opts(strict.endpoint_url, **store_path))
    payer = opts(strict.endpoint_url, request_payer="requester", **store_path)
    save(sd, url, **payer)
    save(sd, url, **payer)  # over it: reads the old .metadata, deletes its files
    out = blank(sd)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        dcp.load(out, storage_reader=aiodcp.S3StorageReader(url, **payer))
    assert_same(out, sd)
