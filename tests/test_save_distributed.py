"""Multi-rank saves with torch.distributed (gloo): FSDP-style sharded DTensors saved by 2 and 4
ranks through every entry point (dcp.save, await save_checkpoint, dcp.async_save in its thread
and process modes), loaded back whole by one process with aiodcp and torch's FileSystemReader;
a rank that fails or is cancelled makes every rank raise, with nothing committed and nothing
left in the bucket."""

from __future__ import annotations

import pickle
import re
import threading
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed.checkpoint as dcp

import aiodcp
from aiodcp.dcp._integrity import Integrity
from save_worker import full_state, state_local

import conftest
from conftest import S3Server, assert_same
from faultproxy import Fault, FaultProxy

WORKER = Path(__file__).parent / "save_worker.py"
HANG_GUARD_S = 240.0


_VERDICT = re.compile(r"rank \d+ (OK|RAISED )")


def run(world: int, mode: str, url: str, env: dict[str, str]) -> list[str]:
    """Each rank's verdict (``rank N OK``, ``rank N RAISED <error>``: exactly one per rank).
    Not its last line of output: torch's checkpointing process (``async_save`` in process
    mode) may log after it."""
    outputs = conftest.run_ranks(WORKER, world, [mode, url], env, timeout=HANG_GUARD_S)
    verdicts = []
    for out in outputs:
        lines = [line.strip() for line in out.splitlines() if _VERDICT.match(line.strip())]
        assert len(lines) == 1, out[-3000:]
        verdicts.append(lines[0])
    return verdicts


def blank() -> dict[str, Any]:
    return {
        k: torch.zeros_like(v) if isinstance(v, torch.Tensor) else None
        for k, v in full_state().items()
    }


def everything(s3: Any, bucket: str) -> list[str]:
    return sorted(o["Key"] for o in s3.list_objects_v2(Bucket=bucket).get("Contents", []))


def open_uploads(s3: Any, bucket: str) -> list[str]:
    return [u["Key"] for u in s3.list_multipart_uploads(Bucket=bucket).get("Uploads", [])]


def load_both_ways(s3: Any, s3_server: S3Server, bucket: str, prefix: str, tmp: Path) -> None:
    options = {"endpoint_url": s3_server.endpoint_url, "region": "us-east-1"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        out = blank()
        dcp.load(out, storage_reader=aiodcp.S3StorageReader(f"s3://{bucket}/{prefix}", **options))
        assert_same(out, full_state())
        for key in everything(s3, bucket):
            path = tmp / key
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(s3.get_object(Bucket=bucket, Key=key)["Body"].read())
        out = blank()
        dcp.load(out, storage_reader=dcp.FileSystemReader(str(tmp / prefix)))
        assert_same(out, full_state())


@pytest.mark.slow
@pytest.mark.parametrize(
    ("world", "mode"),
    [(2, "sync"), (4, "sync"), (2, "api"), (4, "api"), (2, "thread"), (2, "process")],
)
def test_ranks_save_a_checkpoint_every_reader_loads(
    s3_server: S3Server, s3: Any, bucket: str, tmp_path: Path, world: int, mode: str
) -> None:
    lines = run(world, mode, f"s3://{bucket}/ck", {"TEST_S3_ENDPOINT": s3_server.endpoint_url})
    assert lines == [f"rank {r} OK" for r in range(world)]
    keys = everything(s3, bucket)
    data = [k for k in keys if k != "ck/.metadata"]
    assert "ck/.metadata" in keys and len(data) == world  # one file per rank
    assert sorted(k.split("/")[1].split("_")[2] for k in data) == [str(r) for r in range(world)]
    assert open_uploads(s3, bucket) == []
    md = pickle.loads(s3.get_object(Bucket=bucket, Key="ck/.metadata")["Body"].read())
    record = Integrity.of(md, "ck")
    assert record is not None and set(record.files) == {k[len("ck/") :] for k in data}
    load_both_ways(s3, s3_server, bucket, "ck", tmp_path)


@pytest.mark.slow
def test_a_rank_that_fails_makes_every_rank_raise_and_nothing_is_left(
    s3_server: S3Server, s3: Any, bucket: str, tmp_path: Path
) -> None:
    """Rank 1's uploads are refused (403). Every rank raises (rank 1 its own error, the
    others PeerSaveError naming it) instead of waiting; no .metadata is written, the other
    ranks' data files are deleted, and the checkpoint already at that path is untouched."""
    env = {"TEST_S3_ENDPOINT": s3_server.endpoint_url}
    url = f"s3://{bucket}/ck"
    assert run(2, "sync", url, env) == ["rank 0 OK", "rank 1 OK"]
    before = everything(s3, bucket)
    metadata = s3.get_object(Bucket=bucket, Key="ck/.metadata")["Body"].read()
    with FaultProxy(s3_server.endpoint_url) as proxy:
        proxy.add(Fault.access_denied(), method="PUT", path_suffix=".distcp")
        lines = run(4, "sync", url, {**env, "TEST_RANK1_ENDPOINT": proxy.endpoint_url})
    assert lines[1].startswith("rank 1 RAISED AccessDeniedError"), lines
    for rank in (0, 2, 3):
        assert lines[rank].startswith(f"rank {rank} RAISED PeerSaveError: "), lines
        assert "rank 1 of the save failed" in lines[rank]
    assert everything(s3, bucket) == before
    assert s3.get_object(Bucket=bucket, Key="ck/.metadata")["Body"].read() == metadata
    assert open_uploads(s3, bucket) == []
    load_both_ways(s3, s3_server, bucket, "ck", tmp_path)


@pytest.mark.slow
def test_a_rank_cancelled_mid_upload_makes_every_rank_raise(
    s3_server: S3Server, s3: Any, bucket: str
) -> None:
    """Rank 1's upload stalls on the wire and its ``await save_checkpoint`` is cancelled: it
    raises CancelledError, the others PeerSaveError; nothing committed, nothing left."""
    release = threading.Event()
    with FaultProxy(s3_server.endpoint_url) as proxy:
        proxy.add(Fault.stall_upload(1, HANG_GUARD_S, release), method="PUT", path_suffix=".distcp")
        try:
            lines = run(
                2,
                "cancel",
                f"s3://{bucket}/ck",
                {
                    "TEST_S3_ENDPOINT": s3_server.endpoint_url,
                    "TEST_RANK1_ENDPOINT": proxy.endpoint_url,
                },
            )
        finally:
            release.set()
    assert lines[1].startswith("rank 1 RAISED CancelledError"), lines
    assert lines[0].startswith("rank 0 RAISED PeerSaveError: "), lines
    assert everything(s3, bucket) == []
    assert open_uploads(s3, bucket) == []


@pytest.mark.slow
def test_ranks_saving_without_collectives_commit_their_own_metadata(
    s3_server: S3Server, s3: Any, bucket: str, tmp_path: Path
) -> None:
    """``use_collectives=False``: each rank commits ``__{rank}.metadata`` naming its own data
    file, as FileSystemWriter does; torch's reader loads each rank's checkpoint."""
    lines = run(2, "local", f"s3://{bucket}/ck", {"TEST_S3_ENDPOINT": s3_server.endpoint_url})
    assert lines == ["rank 0 OK", "rank 1 OK"]
    keys = everything(s3, bucket)
    assert "ck/__0.metadata" in keys and "ck/__1.metadata" in keys and len(keys) == 4
    for rank in (0, 1):
        md = pickle.loads(s3.get_object(Bucket=bucket, Key=f"ck/__{rank}.metadata")["Body"].read())
        paths = {info.relative_path for info in md.storage_data.values()}
        assert len(paths) == 1 and paths.pop().startswith(f"__{rank}_0.")
        record = Integrity.of(md, "ck")
        assert record is not None and len(record.files) == 1
        local = tmp_path / f"r{rank}"
        local.mkdir()
        for key in keys:
            (local / key.split("/", 1)[1]).write_bytes(
                s3.get_object(Bucket=bucket, Key=key)["Body"].read()
            )
        (local / ".metadata").write_bytes((local / f"__{rank}.metadata").read_bytes())
        expected = state_local(rank)
        out = {"weights": torch.zeros(300_000), "rank": None}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            dcp.load(out, storage_reader=dcp.FileSystemReader(str(local)))
        assert_same(out, expected)
