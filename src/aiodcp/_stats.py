"""Statistics: a mutable recorder the engines write, a frozen value users read.

Loads: ``StatsRecorder`` -> ``LoadStats``. Saves: ``SaveRecorder`` -> ``SaveStats``."""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["LoadStats", "RequestMetrics", "SaveRecorder", "SaveStats", "StatsRecorder"]


@dataclass(frozen=True, slots=True)
class LoadStats:
    """What one load did. Byte counts are of the object store's payload (no HTTP headers)."""

    bytes_requested: int = 0
    """Bytes asked for by ranged GETs (needed item bytes plus coalesced gap bytes)."""
    bytes_used: int = 0
    """Bytes of stored items handed to torch (each stored item counted once)."""
    bytes_received: int = 0
    """Payload bytes actually received, retried and metadata bytes included."""
    requests: int = 0
    """GET requests sent for data and metadata, retries included."""
    retries: int = 0
    """Requests repeated after a failure (before headers or while streaming the body)."""
    resumed_bytes: int = 0
    """Bytes not downloaded again because an interrupted stream resumed where it stopped."""
    items: int = 0
    """Stored items fetched."""
    peak_buffered_bytes: int = 0
    """Most memory held at once for downloaded items (reserved from the memory budget: an item
    of 512 KiB or more counts in whole 1 MiB blocks); at most ``max(memory_budget, largest
    item)``, the largest item rounded up to whole MiB."""
    files: int = 0
    """Data files touched."""
    time_to_first_byte_s: float = 0.0
    """Seconds from the start of the load to the first data byte."""
    wall_time_s: float = 0.0
    """Seconds from the start to the end of the load."""
    max_gap_size: int | float | None = None
    """Bytes: the gap size the load planned its requests with (``ReaderConfig.max_gap_size``,
    with ``"auto"`` resolved from the measured latency); None if the load planned nothing."""
    request_latency_s: float | None = None
    """Seconds: the estimated time to first byte of the ``.metadata`` GET, which
    ``max_gap_size="auto"`` was resolved from; None if the load did not measure one."""
    throttled: int = 0
    """Requests the store refused for their rate (503 ``SlowDown`` and other throttling
    replies): data GETs and ``checksum_requests``; each was retried after the load lowered its
    request rate."""
    min_request_rate: float | None = None
    """Requests per second: the lowest rate the load limited itself to after throttling
    replies; None if the store never throttled it."""
    resigned: int = 0
    """Requests signed again and resent because the store refused their signature as expired
    (credentials that expired or rotated mid-load); not counted as failed attempts."""
    sliced_items: int = 0
    """Stored items of which only the runs of bytes the read items need were fetched (a
    resharded load), plus their head and tail to locate and verify them."""
    slice_saved_bytes: int = 0
    """Bytes of the sliced items that were not requested: their length minus the runs and the
    head and tail probes (what fetching them whole would have added to ``bytes_requested``)."""
    held_aside_bytes: int = 0
    """Bytes of items received straight into their destination that arrived before the item's
    first bytes said where its storage begins (a later part of the item came first): kept
    aside, then copied into place."""
    fast_decoded_items: int = 0
    """Read items decoded by aiodcp's own tensor decoder (``fast_decode``) instead of
    ``torch.load``: plain tensors copied from their stored bytes, and every item below."""
    direct_items: int = 0
    """Stored items received straight into their destination tensor's memory (items of 512 KiB
    or more for a contiguous CPU destination): no buffer, no copy."""
    direct_runs: int = 0
    """Runs of sliced items (``sliced_items``) received straight into their destination."""
    refetched_items: int = 0
    """Items meant to be received straight into their destination whose archive turned out to
    be laid out otherwise: fetched again and decoded by ``torch.load`` (their bytes count twice
    in ``bytes_received``)."""
    verified_bytes: int = 0
    """Stored bytes checked against a checksum: the block checksums of the checkpoint's
    integrity record (a checkpoint saved by aiodcp), before torch saw them; or, for a checkpoint
    without one, the store's own full-object checksum (CRC64NVME, CRC32C or CRC32) of a data
    file the load read whole, checked once its last byte was handed over. Bytes received from
    other ranks count too. ``verified_bytes + unverified_bytes == bytes_used`` for a load that
    checks (``verify_checksums``)."""
    unverified_bytes: int = 0
    """Stored bytes handed to torch without such a check: without a record, a file not read
    whole (a partial, sliced or shared load) or whose store keeps no full-object checksum that
    combines (nginx, older S3-compatible stores, a multipart upload with a composite one); or
    ``verify_checksums=False``."""
    checksum_mismatches: int = 0
    """Items (or blocks of them), or data files read whole, whose bytes did not match their
    checksum and were fetched again from the store (a second mismatch raises
    ``ChecksumMismatchError``)."""
    metadata_verified: bool = False
    """Whether what describes the checkpoint (its ``.metadata``; a safetensors checkpoint's
    ``model.safetensors.index.json``) was checked against the store's full-object checksum
    (CRC64NVME, CRC32, CRC32C, SHA-256 or SHA-1, sent with the GET that read it whole) before
    it was parsed. False: ``verify_checksums=False``, a store that keeps no such checksum (or a
    composite one), or nothing read whole (a safetensors checkpoint without an index). A
    mismatch is read once more and counts in ``checksum_mismatches``."""
    checksum_requests: int = 0
    """HEAD requests (retries included) that asked the store for the full-object checksum of
    a data file the load reads whole (a checkpoint without a record); not in ``requests``."""
    bytes_from_peers: int = 0
    """Stored item bytes this rank received from other ranks instead of the store (a shared
    multi-rank load, ``share_across_ranks``)."""
    bytes_to_peers: int = 0
    """Stored item bytes this rank fetched and sent to other ranks (counted once per
    receiving rank)."""
    sharing: str = ""
    """Whether this load shared its bytes across ranks (see README "Multi-rank loads"):
    ``"shared"``, or ``"off: <why>"`` (a single process, ``share_across_ranks=False``, no gloo
    group, the load's process group unknown...); empty for a load that read no data."""
    ranks: int = 1
    """Ranks whose counters these are: 1 for one rank's own statistics, the world size for
    ``job``."""
    job: LoadStats | None = None
    """In a shared multi-rank load, the whole job's statistics, the same on every rank: byte
    and request counts summed over the ranks, times and peaks the largest of any rank. None
    otherwise (each rank's own statistics are the only ones)."""

    @property
    def gap_bytes(self) -> int:
        """Bytes requested but not needed (coalesced gaps)."""
        return self.bytes_requested - self.bytes_used

    def __str__(self) -> str:
        mib = 1024 * 1024
        return (
            f"{self.bytes_used / mib:.1f} MiB used of {self.bytes_requested / mib:.1f} MiB "
            f"requested in {self.requests} requests ({self.retries} retries), "
            f"{self.items} items from {self.files} files, "
            f"first byte {self.time_to_first_byte_s * 1000:.0f} ms, "
            f"wall {self.wall_time_s:.3f} s{_gap_text(self.max_gap_size)}"
        )


def _gap_text(gap: int | float | None) -> str:
    if gap is None:
        return ""
    if gap == float("inf"):
        return ", max gap inf"
    return f", max gap {gap / (1024 * 1024):.2f} MiB"


@dataclass(frozen=True, slots=True)
class RequestMetrics:
    """One attempt of one ranged GET, handed to ``ReaderConfig.on_request`` when it ends."""

    bucket: str
    key: str
    start: int
    """First byte asked for."""
    end: int
    """End (exclusive) of the bytes asked for."""
    bytes_received: int
    """Payload bytes this attempt received."""
    attempt: int
    """1 for the first attempt, 2 for the first retry..."""
    latency_s: float
    """Seconds from sending the request to its last byte (or its failure)."""
    time_to_first_byte_s: float | None
    """Seconds from sending the request to its first body byte; None if none arrived."""
    error: str | None
    """``"ErrorClass: message"`` if the attempt failed, else None."""


class _Counters:
    """What a load's and a save's recorder share: counters added under one lock (they are
    written from the event loop and another thread), and the lowest request rate in force."""

    __slots__ = ("_lock", "min_request_rate")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.min_request_rate: float | None = None

    def add(self, **counts: int) -> None:
        with self._lock:
            for name, value in counts.items():
                setattr(self, name, getattr(self, name) + value)

    def observe_rate(self, limit: float | None) -> None:
        """The request-rate limit now in force (None: unlimited); the lowest one is kept."""
        if limit is None:
            return
        with self._lock:
            if self.min_request_rate is None or limit < self.min_request_rate:
                self.min_request_rate = limit


class StatsRecorder(_Counters):
    """Counters of one load. Written from the event loop and the decode thread; read at the end."""

    __slots__ = (
        "_first_byte",
        "_start",
        "_stop",
        "bytes_from_peers",
        "bytes_received",
        "bytes_requested",
        "bytes_to_peers",
        "bytes_used",
        "checksum_mismatches",
        "checksum_requests",
        "direct_items",
        "direct_runs",
        "fast_decoded_items",
        "files",
        "held_aside_bytes",
        "items",
        "job",
        "max_gap_size",
        "metadata_verified",
        "peak_buffered_bytes",
        "refetched_items",
        "request_latency_s",
        "requests",
        "resigned",
        "resumed_bytes",
        "retries",
        "sharing",
        "slice_saved_bytes",
        "sliced_items",
        "throttled",
        "unverified_bytes",
        "verified_bytes",
    )

    def __init__(self) -> None:
        super().__init__()
        self._start = time.perf_counter()
        self._first_byte: float | None = None
        self._stop: float | None = None
        self.bytes_requested = 0
        self.bytes_used = 0
        self.bytes_received = 0
        self.requests = 0
        self.retries = 0
        self.resumed_bytes = 0
        self.items = 0
        self.files = 0
        self.peak_buffered_bytes = 0
        self.max_gap_size: int | float | None = None
        self.request_latency_s: float | None = None
        self.throttled = 0
        self.resigned = 0
        self.sliced_items = 0
        self.slice_saved_bytes = 0
        self.held_aside_bytes = 0
        self.fast_decoded_items = 0
        self.direct_items = 0
        self.direct_runs = 0
        self.refetched_items = 0
        self.verified_bytes = 0
        self.unverified_bytes = 0
        self.checksum_mismatches = 0
        self.checksum_requests = 0
        self.metadata_verified = False
        self.min_request_rate: float | None = None
        self.bytes_from_peers = 0
        self.bytes_to_peers = 0
        self.sharing = ""
        self.job: LoadStats | None = None

    def observe_peak(self, buffered: int) -> None:
        with self._lock:
            self.peak_buffered_bytes = max(self.peak_buffered_bytes, buffered)

    def first_byte(self) -> None:
        if self._first_byte is None:
            self._first_byte = time.perf_counter()

    def finish(self) -> LoadStats:
        """The final statistics; the wall time stops at the first call."""
        if self._stop is None:
            self._stop = time.perf_counter()
        return self.snapshot()

    def snapshot(self) -> LoadStats:
        """The statistics so far (wall time up to now while the load runs)."""
        stop = self._stop if self._stop is not None else time.perf_counter()
        with self._lock:
            ttfb = 0.0 if self._first_byte is None else self._first_byte - self._start
            return LoadStats(
                bytes_requested=self.bytes_requested,
                bytes_used=self.bytes_used,
                bytes_received=self.bytes_received,
                requests=self.requests,
                retries=self.retries,
                resumed_bytes=self.resumed_bytes,
                items=self.items,
                files=self.files,
                peak_buffered_bytes=self.peak_buffered_bytes,
                time_to_first_byte_s=ttfb,
                wall_time_s=stop - self._start,
                max_gap_size=self.max_gap_size,
                request_latency_s=self.request_latency_s,
                throttled=self.throttled,
                min_request_rate=self.min_request_rate,
                resigned=self.resigned,
                sliced_items=self.sliced_items,
                slice_saved_bytes=self.slice_saved_bytes,
                held_aside_bytes=self.held_aside_bytes,
                fast_decoded_items=self.fast_decoded_items,
                direct_items=self.direct_items,
                direct_runs=self.direct_runs,
                refetched_items=self.refetched_items,
                verified_bytes=self.verified_bytes,
                unverified_bytes=self.unverified_bytes,
                checksum_mismatches=self.checksum_mismatches,
                checksum_requests=self.checksum_requests,
                metadata_verified=self.metadata_verified,
                bytes_from_peers=self.bytes_from_peers,
                bytes_to_peers=self.bytes_to_peers,
                sharing=self.sharing,
                job=self.job,
            )


_SUMMED = (
    "bytes_requested",
    "bytes_used",
    "bytes_received",
    "requests",
    "retries",
    "resumed_bytes",
    "items",
    "peak_buffered_bytes",
    "files",
    "throttled",
    "resigned",
    "bytes_from_peers",
    "bytes_to_peers",
    "sliced_items",
    "slice_saved_bytes",
    "held_aside_bytes",
    "fast_decoded_items",
    "direct_items",
    "direct_runs",
    "refetched_items",
    "verified_bytes",
    "unverified_bytes",
    "checksum_mismatches",
    "checksum_requests",
)
"""The counters a job's statistics sum over its ranks, in the order ranks exchange them."""

_LARGEST = ("peak_buffered_bytes",)


def counters(stats: LoadStats) -> list[int]:
    """``stats``' integer counters, in the order of ``_SUMMED``, plus its times in ns."""
    return [
        *(int(getattr(stats, name)) for name in _SUMMED),
        int(stats.time_to_first_byte_s * 1e9),
        int(stats.wall_time_s * 1e9),
    ]


def with_counts(row: Sequence[int], **counts: int) -> list[int]:
    """A rank's ``counters`` row with ``counts`` (``_SUMMED`` names) added."""
    out = list(row)
    for name, value in counts.items():
        out[_SUMMED.index(name)] += value
    return out


def job_stats(rows: list[list[int]], template: LoadStats) -> LoadStats:
    """The job's statistics from every rank's ``counters``: counts summed, peaks and times the
    largest; the gap, its measured latency and the request-rate settings are ``template``'s
    (this rank's)."""
    values: dict[str, int] = {}
    for i, name in enumerate(_SUMMED):
        column = [row[i] for row in rows]
        values[name] = max(column) if name in _LARGEST else sum(column)
    n = len(_SUMMED)
    return LoadStats(
        **values,  # type: ignore[arg-type]
        time_to_first_byte_s=max(row[n] for row in rows) / 1e9,
        wall_time_s=max(row[n + 1] for row in rows) / 1e9,
        max_gap_size=template.max_gap_size,
        request_latency_s=template.request_latency_s,
        min_request_rate=template.min_request_rate,
        metadata_verified=template.metadata_verified,
        sharing=template.sharing,
        ranks=len(rows),
    )


@dataclass(frozen=True, slots=True)
class SaveStats:
    """What one save did on this rank. Byte counts are of the object store's payload."""

    bytes_written: int = 0
    """Bytes of the data files this rank wrote (what the checkpoint holds)."""
    bytes_sent: int = 0
    """Payload bytes sent: the data files, parts sent again after a failure, and ``.metadata``."""
    requests: int = 0
    """Requests sent (PUTs of objects and parts, the multipart calls, the commit, deletions),
    retries included."""
    retries: int = 0
    """Requests sent again after a failure (a part is resent from the same memory)."""
    files: int = 0
    """Data files written by this rank."""
    items: int = 0
    """Stored items (tensors and non-tensor values) written by this rank."""
    parts: int = 0
    """Parts of multipart uploads (a file larger than ``part_size`` is uploaded in parts)."""
    multipart_uploads: int = 0
    """Data files uploaded as multipart uploads (the others were one PUT each)."""
    direct_bytes: int = 0
    """Bytes sent straight from the tensors' own memory (no copy)."""
    staged_bytes: int = 0
    """Bytes copied before they were sent: small tensors' archives, non-tensor values, tensors
    that were not contiguous CPU memory of their own, the archives' framing."""
    peak_staged_bytes: int = 0
    """Most staged memory held at once (reserved from ``memory_budget``): at most
    ``max(memory_budget, largest staged item)`` plus one part being assembled."""
    throttled: int = 0
    """Requests the store refused for their rate (503 ``SlowDown``...); each was retried after
    the save lowered its request rate."""
    min_request_rate: float | None = None
    """Requests per second: the lowest rate the save limited itself to; None if never throttled."""
    metadata_bytes: int = 0
    """Size of the ``.metadata`` this rank committed (0: another rank committed)."""
    deleted_files: int = 0
    """Data files deleted: those of the checkpoint this save replaced (after the commit), or
    this save's own after it failed."""
    wall_time_s: float = 0.0
    """Seconds from the start of the save (its planning) to its end (the commit)."""

    def __str__(self) -> str:
        mib = 1024 * 1024
        return (
            f"{self.bytes_written / mib:.1f} MiB in {self.files} files ({self.items} items), "
            f"{self.requests} requests ({self.retries} retries, {self.parts} parts), "
            f"{self.direct_bytes / mib:.1f} MiB sent from tensor memory, "
            f"{self.staged_bytes / mib:.1f} MiB staged (peak {self.peak_staged_bytes / mib:.1f}"
            f" MiB), wall {self.wall_time_s:.3f} s"
        )


class SaveRecorder(_Counters):
    """Counters of one save. Written from the event loop and the save's thread."""

    __slots__ = (
        "_start",
        "_stop",
        "bytes_sent",
        "bytes_written",
        "deleted_files",
        "direct_bytes",
        "files",
        "items",
        "metadata_bytes",
        "multipart_uploads",
        "parts",
        "peak_staged_bytes",
        "requests",
        "retries",
        "staged_bytes",
        "throttled",
    )

    def __init__(self) -> None:
        super().__init__()
        self._start = time.perf_counter()
        self._stop: float | None = None
        self.bytes_written = 0
        self.bytes_sent = 0
        self.requests = 0
        self.retries = 0
        self.files = 0
        self.items = 0
        self.parts = 0
        self.multipart_uploads = 0
        self.direct_bytes = 0
        self.staged_bytes = 0
        self.peak_staged_bytes = 0
        self.throttled = 0
        self.min_request_rate: float | None = None
        self.metadata_bytes = 0
        self.deleted_files = 0

    def observe_peak(self, staged: int) -> None:
        with self._lock:
            self.peak_staged_bytes = max(self.peak_staged_bytes, staged)

    def finish(self) -> SaveStats:
        """The final statistics; the wall time stops at the first call."""
        if self._stop is None:
            self._stop = time.perf_counter()
        return self.snapshot()

    def snapshot(self) -> SaveStats:
        stop = self._stop if self._stop is not None else time.perf_counter()
        with self._lock:
            return SaveStats(
                bytes_written=self.bytes_written,
                bytes_sent=self.bytes_sent,
                requests=self.requests,
                retries=self.retries,
                files=self.files,
                items=self.items,
                parts=self.parts,
                multipart_uploads=self.multipart_uploads,
                direct_bytes=self.direct_bytes,
                staged_bytes=self.staged_bytes,
                peak_staged_bytes=self.peak_staged_bytes,
                throttled=self.throttled,
                min_request_rate=self.min_request_rate,
                metadata_bytes=self.metadata_bytes,
                deleted_files=self.deleted_files,
                wall_time_s=stop - self._start,
            )
