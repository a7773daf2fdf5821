"""Shared multi-rank loads (gloo): every stored byte fetched once per job, sent to the ranks
that need it over the process group, every tensor as ``FileSystemReader`` loads it.

Each test runs real ranks (``share_worker.py`` subprocesses) against moto, then checks the
server's request log: which byte ranges of which data files were requested, summed over the
job, and how many ``.metadata`` GETs there were.
"""

from __future__ import annotations

import json
import uuid
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from torch.distributed.checkpoint import FileSystemReader

import conftest
from archives import replace_items
from conftest import S3Server, upload_dir
from faultproxy import Fault, FaultProxy, ProxyRequest

WORKER = Path(__file__).parent / "share_worker.py"
RANK_TIMEOUT_S = 240  # a hang guard only
RANK_GUARD_S = 100.0
"""A hang guard on a rank's own load where it must end early (a failed, cancelled or aborted
rank, and its peers): those take ~1 s (0.4-1.2 s with a CPU hog on both cores and the suite
running beside them); a rank that waited instead would wait for the process group's timeout
(30 min), or in the cancel test for a stall and a read timeout twice this guard."""
PROBE_BYTES = 4096  # most a slicing rank reads of a chunk's head, and of its tail

pytestmark = pytest.mark.slow


def run_ranks(world: int, args: list[str], env: dict[str, str] | None = None) -> list[str]:
    """Run ``world`` gloo ranks of share_worker.py; their outputs (each must exit 0)."""
    return conftest.run_ranks(WORKER, world, args, env, timeout=RANK_TIMEOUT_S)


@dataclass
class Saved:
    url: str
    local: Path
    bucket: str
    prefix: str

    def stored_items(self) -> list[tuple[str, int, int]]:
        """(file, start, end) of every stored item of the checkpoint."""
        md = FileSystemReader(str(self.local)).read_metadata()
        return sorted(
            (info.relative_path, info.offset, info.offset + info.length)
            for info in md.storage_data.values()
        )


def save(
    tmp_path: Path,
    s3_server: S3Server,
    layout: str,
    world: int,
    odd: str | None = None,
) -> Saved:
    """Save ``layout`` with ``world`` ranks and upload it; with ``odd``, the ``big`` tensor's
    item is replaced by that odd but valid archive (tests/archives.py)."""
    local = tmp_path / f"{layout}-{world}"
    run_ranks(world, ["save", layout, str(local)])
    if odd is not None:
        assert list(replace_items(local, {"big": odd})) == ["big"]
    bucket = f"share-{uuid.uuid4().hex[:12]}"
    s3 = s3_server.client()
    s3.create_bucket(Bucket=bucket)
    upload_dir(s3, local, bucket, "ck")
    return Saved(f"s3://{bucket}/ck", local, bucket, "ck")


def requested(server: S3Server, saved: Saved) -> tuple[Counter[tuple[str, int]], int]:
    """Per (data file, byte): how many times the job's ranged GETs asked for it; and the
    number of ``.metadata`` GETs."""
    per_byte: Counter[tuple[str, int]] = Counter()
    metadata = 0
    for r in server.requests():
        path = r["path"]
        if r["method"] != "GET" or not path.startswith(f"/{saved.bucket}/{saved.prefix}/"):
            continue
        name = path.rsplit("/", 1)[1]
        if name == ".metadata":
            metadata += 1
        elif r["range"]:
            first, last = r["range"].removeprefix("bytes=").split("-")
            for b in range(int(first), int(last) + 1):
                per_byte[(name, b)] += 1
    return per_byte, metadata


def load(
    server: S3Server,
    saved: Saved,
    layout: str,
    world: int,
    api: str,
    *,
    endpoint_url: str | None = None,
    cancel_after_s: float = 0.0,
    abort_rank: int = -1,
    env_extra: dict[str, str] | None = None,
    **options: Any,
) -> list[dict[str, Any]]:
    server.clear_log()
    env = {
        **(env_extra or {}),
        "TEST_S3_ENDPOINT": endpoint_url or server.endpoint_url,
        "SHARE_OPTIONS": json.dumps({"max_gap_size": 0, **options}),
        "SHARE_CANCEL_AFTER_S": str(cancel_after_s),
        "SHARE_ABORT_RANK": str(abort_rank),
    }
    return conftest.rank_results(
        run_ranks(world, ["load", layout, saved.url, str(saved.local), api], env)
    )


CASES = [
    # layout, ranks that save, ranks that load, API
    ("replicated", 1, 4, "async"),
    ("replicated", 1, 2, "sync"),
    ("dim0", 2, 4, "sync"),
    ("dim0", 4, 2, "async"),
    ("dim1", 2, 2, "async"),
    ("dim1", 2, 4, "sync"),
    ("fsdp", 2, 2, "sync"),
    ("fsdp", 2, 4, "async"),
    ("hsdp", 4, 4, "async"),
]


@pytest.mark.parametrize(("layout", "save_world", "world", "api"), CASES)
def test_shared_load_fetches_each_stored_byte_once(
    tmp_path: Path, s3_server: S3Server, layout: str, save_world: int, world: int, api: str
) -> None:
    saved = save(tmp_path, s3_server, layout, save_world)
    got = load(s3_server, saved, layout, world, api)
    for r in got:
        assert "error" not in r, r
        assert r["mismatched"] == [], r
        assert r["stats"]["sharing"] == "shared", r
        assert r["warned"] == [], r
    per_byte, metadata_gets = requested(s3_server, saved)
    assert metadata_gets == 1  # one .metadata GET for the whole job
    assert per_byte, "nothing was fetched"
    items = saved.stored_items()
    if all(r["stats"]["sliced_items"] == 0 for r in got):
        assert max(per_byte.values()) == 1  # no stored byte requested twice in the job
    else:
        # Chunks the ranks need disjoint parts of are sliced by each rank (max_gap_size=0
        # makes every slice worth it): each reads the chunk's head and tail (its archive's own
        # ~1.6 KB) to find its rows; every other byte is requested once in the job.
        edges = {(f, s, e) for f, s, e in items}
        again = [(f, b) for (f, b), n in per_byte.items() if n > 1]
        assert all(
            any(
                f == g and (s <= b < s + PROBE_BYTES or e - PROBE_BYTES <= b < e)
                for g, s, e in edges
            )
            for f, b in again
        )
    # Every byte fetched belongs to a stored item (max_gap_size=0: no gap bytes).
    fetched_files = {f for f, _ in per_byte}
    for name in fetched_files:
        spans = [(s, e) for f, s, e in items if f == name]
        assert all(any(s <= b < e for s, e in spans) for f, b in per_byte if f == name)
    job = got[0]["job"]
    assert job is not None and job["ranks"] == world
    assert all(r["job"] == job for r in got)  # the job's totals, the same on every rank
    assert job["bytes_requested"] == sum(r["stats"]["bytes_requested"] for r in got)
    assert job["bytes_requested"] == sum(per_byte.values())
    assert job["bytes_from_peers"] == job["bytes_to_peers"]
    if layout in ("replicated", "hsdp"):  # every rank needs what others fetch
        assert all(r["stats"]["bytes_from_peers"] > 0 for r in got)
    if layout == "dim1" or (layout == "dim0" and world > save_world):
        # each rank needs parts of chunks that no other rank needs: it slices them
        assert all(r["stats"]["sliced_items"] > 0 for r in got)


def test_sharing_off_fetches_per_rank(tmp_path: Path, s3_server: S3Server) -> None:
    saved = save(tmp_path, s3_server, "replicated", 1)
    got = load(s3_server, saved, "replicated", 2, "sync", share_across_ranks=False)
    for r in got:
        assert r["mismatched"] == [] and r["job"] is None
        assert r["stats"]["bytes_from_peers"] == 0
        assert r["stats"]["sharing"] == "off: share_across_ranks=False", r
    per_byte, metadata_gets = requested(s3_server, saved)
    assert metadata_gets == 2
    assert set(per_byte.values()) == {2}  # each rank fetched every byte itself


@pytest.mark.parametrize("give_group", [False, True])
def test_sharing_without_torchs_load_frame(
    tmp_path: Path, s3_server: S3Server, give_group: bool
) -> None:
    """If a torch release renamed the frame aiodcp finds the load's group in, sharing must not
    turn off silently: without a group from the caller each rank warns once and its LoadStats
    say why sharing was off (every rank then fetches for itself, correctly); with
    ``S3StorageReader(process_group=...)`` the load shares as before."""
    saved = save(tmp_path, s3_server, "replicated", 1)
    env = {"SHARE_LOSE_FRAME": "1", **({"SHARE_GIVE_GROUP": "1"} if give_group else {})}
    got = load(s3_server, saved, "replicated", 2, "sync", env_extra=env)
    per_byte, metadata_gets = requested(s3_server, saved)
    for r in got:
        assert r["mismatched"] == [], r
        if give_group:
            assert r["stats"]["sharing"] == "shared", r
            assert r["warned"] == [], r
        else:
            assert r["stats"]["sharing"].startswith("off: the process group of this dcp.load"), r
            assert "process_group=" in r["stats"]["sharing"], r
            assert len(r["warned"]) == 1 and "process_group=" in r["warned"][0], r
    if give_group:
        assert metadata_gets == 1 and max(per_byte.values()) == 1
    else:
        assert metadata_gets == 2 and set(per_byte.values()) == {2}


def test_memory_per_rank_stays_within_the_budget(tmp_path: Path, s3_server: S3Server) -> None:
    """4 replicas, a 1 MiB budget: the rounds keep each rank's item memory (fetched, sent and
    received) within the budget plus the item in hand, the largest of which (2 MiB + its
    archive's ~1.5 KB) takes 3 whole 1 MiB blocks where it is buffered."""
    saved = save(tmp_path, s3_server, "replicated", 1)
    budget, largest = 1024 * 1024, 3 * 1024 * 1024
    got = load(s3_server, saved, "replicated", 4, "sync", memory_budget=budget)
    for r in got:
        assert r["mismatched"] == [], r
        assert 0 < r["stats"]["peak_buffered_bytes"] <= budget + largest, r
    # The rank that fetched the large item held all of it; the three it was sent to received
    # it straight into their state dicts (only the blocks around its storage bytes buffered).
    assert sorted(r["stats"]["peak_buffered_bytes"] >= largest for r in got) == [
        False,
        False,
        False,
        True,
    ]


def _overlaps(request: ProxyRequest, path: str, start: int, end: int) -> bool:
    if not request.path.endswith("/" + path) or not request.range:
        return False
    first, last = request.range.removeprefix("bytes=").split("-")
    return int(first) < end and start <= int(last)


@pytest.mark.parametrize("api", ["sync", "async"])
def test_a_rank_whose_share_fails_stops_every_rank(
    tmp_path: Path, s3_server: S3Server, api: str
) -> None:
    """The store refuses (403, for good) every GET of the largest stored item: the rank that
    fetches it raises AccessDeniedError, and every other rank raises PeerLoadError naming that
    rank and the cause, within seconds, not at the process group's timeout (30 min)."""
    saved = save(tmp_path, s3_server, "replicated", 1)
    md = FileSystemReader(str(saved.local)).read_metadata()
    big = next(info for index, info in md.storage_data.items() if index.fqn == "big")
    span = (big.relative_path, big.offset, big.offset + big.length)
    with FaultProxy(s3_server.endpoint_url) as proxy:
        proxy.add(Fault.access_denied(), predicate=lambda r: _overlaps(r, *span))
        got = load(s3_server, saved, "replicated", 4, api, endpoint_url=proxy.endpoint_url)
        assert proxy.fault_count >= 1
    failed = [r for r in got if r.get("error") == "AccessDeniedError"]
    assert len(failed) == 1, got
    culprit = failed[0]["rank"]
    for r in got:
        assert r["elapsed_s"] < RANK_GUARD_S, r  # a hang guard: measured ~1 s
        if r["rank"] != culprit:
            assert r["error"] == "PeerLoadError", r
            assert r["peer_rank"] == culprit, r
            assert f"rank {culprit} of 4 failed" in r["message"], r
            assert "AccessDenied" in r["message"], r


def test_cancelling_every_rank_stops_the_job(tmp_path: Path, s3_server: S3Server) -> None:
    """Every data GET stalls; each rank cancels its ``await load_checkpoint`` after 1 s: every
    rank raises CancelledError promptly and leaves no aiodcp thread behind."""
    saved = save(tmp_path, s3_server, "replicated", 1)
    with FaultProxy(s3_server.endpoint_url) as proxy:
        proxy.add(Fault.stall(2 * RANK_GUARD_S), path_suffix=".distcp")
        got = load(
            s3_server,
            saved,
            "replicated",
            4,
            "async",
            endpoint_url=proxy.endpoint_url,
            cancel_after_s=1.0,
            read_timeout_s=2 * RANK_GUARD_S,  # uncancelled, a rank would outlast the guard
        )
    for r in got:
        assert r.get("error") == "CancelledError", r
        assert r["elapsed_s"] < RANK_GUARD_S, r  # a hang guard: cancelled at 1 s
        assert r["threads"] == [], r


def test_a_rank_aborted_while_torch_plans_fails_every_rank_without_a_hang(
    tmp_path: Path, s3_server: S3Server
) -> None:
    """Rank 2 aborts its reader before ``read_data`` (no request in flight): it raises
    LoadCancelledError, and the ranks waiting for its share in the exchange learn of it
    (PeerLoadError naming rank 2) instead of waiting for it (an early raise left them in
    gloo's collectives, which aborted the job)."""
    saved = save(tmp_path, s3_server, "replicated", 1)
    got = load(s3_server, saved, "replicated", 4, "sync", abort_rank=2)
    assert len(got) == 4
    for r in got:
        if r["rank"] == 2:
            assert r.get("error") == "LoadCancelledError", r
        else:
            assert r.get("error") == "PeerLoadError", r
            assert r["peer_rank"] == 2, r
            assert "rank 2 of 4 failed" in r["message"], r
        assert r["elapsed_s"] < RANK_GUARD_S, r  # a hang guard
        assert r["threads"] == [], r


@pytest.mark.parametrize("odd", ["reordered", "decoy"])
def test_odd_archives_received_by_peers_are_decoded_from_their_bytes(
    tmp_path: Path, s3_server: S3Server, odd: str
) -> None:
    """The 2 MiB ``big`` item, which the ranks it is sent to receive straight into their
    state dicts, is an archive the local headers misdescribe: ``reordered`` (locate refuses
    it) or ``decoy`` (locate finds a decoy storage record, the directory refuses it). Every
    rank still ends with FileSystemReader's tensors, fetching each stored byte once."""
    saved = save(tmp_path, s3_server, "replicated", 1, odd=odd)
    got = load(s3_server, saved, "replicated", 4, "async")
    for r in got:
        assert "error" not in r, r
        assert r["mismatched"] == [], r
    per_byte, metadata_gets = requested(s3_server, saved)
    assert metadata_gets == 1 and max(per_byte.values()) == 1


def test_replicas_of_a_one_process_save_each_fetch_their_own_part(
    tmp_path: Path, s3_server: S3Server
) -> None:
    """A 1-process save (one whole tensor per stored item) loaded by 4 ranks as 2 replicas x
    2 dim-0 shards (HSDP): every rank needs the same half of every stored item as its
    replica. Each rank slices its half itself (the coordinator no longer shares such an item
    whole because two ranks' runs overlap): it fetches about its half plus heads and tails,
    and receives no stored item whole (shared whole, each rank would move at least the 2 MiB
    ``big`` item, fetched or received). The job fetches each byte of a sliced tensor twice,
    once per replica (past the reach of the heads and tails, fetched once and shared)."""
    saved = save(tmp_path, s3_server, "replicated", 1)
    got = load(s3_server, saved, "hsdp", 4, "sync")
    md = FileSystemReader(str(saved.local)).read_metadata()
    info = {index.fqn: i for index, i in md.storage_data.items()}
    sliced = ("embed", "proj", "ids", "big")  # flags: 1 KiB, under SLICE_MIN_BYTES
    tensors = {
        "embed": 256 * 64 * 4,
        "proj": 96 * 48 * 2,
        "ids": 64 * 40 * 8,
        "big": 512 * 1024 * 4,
    }
    half = sum(tensors.values()) // 2
    slack = 32 * 1024  # probes (~1.6 KB a head or tail), flags' and step's whole items
    for r in got:
        assert "error" not in r, r
        assert r["mismatched"] == [], r
        stats = r["stats"]
        assert stats["sharing"] == "shared", r
        assert stats["sliced_items"] == len(sliced), r
        assert half <= stats["bytes_requested"] <= half + slack, r
        assert stats["bytes_from_peers"] <= slack, r
    per_byte, metadata_gets = requested(s3_server, saved)
    assert metadata_gets == 1
    for name in sliced:  # past the probes' reach, each byte once per replica
        item = info[name]
        inside = range(item.offset + PROBE_BYTES, item.offset + item.length - PROBE_BYTES)
        assert {per_byte[item.relative_path, b] for b in inside} == {2}, name
