"""Multi-rank loads with torch.distributed (gloo), resharded: saved by 4 ranks, loaded by 2;
and larger tensors saved by 1 or 2 ranks, loaded by 2 or 4 fetching only their slices."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import conftest
from conftest import S3Server, upload_dir

WORKER = Path(__file__).parent / "dist_worker.py"


def run_ranks(world: int, args: list[str], extra_env: dict[str, str]) -> list[str]:
    return conftest.run_ranks(WORKER, world, args, extra_env, timeout=180)


@pytest.fixture(scope="module")
def resharded_checkpoint(tmp_path_factory: pytest.TempPathFactory, s3_server: S3Server) -> str:
    local = tmp_path_factory.mktemp("dist") / "ckpt"
    run_ranks(4, ["save", str(local)], {})
    s3 = s3_server.client()
    s3.create_bucket(Bucket="dist-bucket")
    upload_dir(s3, local, "dist-bucket", "model/step-1")
    assert len([p for p in local.iterdir() if p.suffix == ".distcp"]) == 4
    return "s3://dist-bucket/model/step-1"


@pytest.mark.slow
@pytest.mark.parametrize(
    ("world", "mode"), [(2, "load-sync"), (2, "load-async"), (4, "load-async")]
)
def test_ranks_load_a_four_rank_checkpoint_resharded(
    resharded_checkpoint: str, s3_server: S3Server, world: int, mode: str
) -> None:
    """Saved by 4 ranks sharded on dim 0; loaded by 2 or 4 ranks sharded on dim 1."""
    outputs = run_ranks(
        world, [mode, resharded_checkpoint], {"TEST_S3_ENDPOINT": s3_server.endpoint_url}
    )
    assert [o.strip().splitlines()[-1] for o in outputs] == [f"rank {r} OK" for r in range(world)]


@pytest.fixture(scope="module")
def big_checkpoints(
    tmp_path_factory: pytest.TempPathFactory, s3_server: S3Server
) -> dict[int, tuple[str, Path]]:
    """The larger tensors saved sharded on dim 0 by 1 and by 2 ranks: world -> (url, dir)."""
    s3 = s3_server.client()
    s3.create_bucket(Bucket="dist-slices")
    out = {}
    for world in (1, 2):
        local = tmp_path_factory.mktemp("slices") / f"by{world}"
        run_ranks(world, ["save-big", str(local)], {})
        upload_dir(s3, local, "dist-slices", f"by{world}")
        out[world] = (f"s3://dist-slices/by{world}", local)
    return out


@pytest.mark.slow
@pytest.mark.parametrize(
    ("saved_by", "world", "dim", "share"),
    [(2, 4, 0, False), (1, 4, 0, False), (2, 2, 1, False), (2, 4, 0, True), (2, 2, 1, True)],
    ids=["2to4", "1to4", "dim1", "2to4-shared", "dim1-shared"],
)
def test_resharded_ranks_fetch_only_their_rows(
    big_checkpoints: dict[int, tuple[str, Path]],
    s3_server: S3Server,
    saved_by: int,
    world: int,
    dim: int,
    share: bool,
) -> None:
    """Real ranks, real DTensor read items, each rank fetching for itself: sharded on dim 0
    both ways, the bytes requested summed over ranks are within 10% of what the ranks' shards
    hold (fetching whole chunks requests 2x or 4x that); on dim 1 (each rank needs a strided
    part of every chunk) no more than the whole chunks. Sharing across ranks (the default with
    a gloo group) leaves the dim-0 chunks to slicing (each rank needs rows no other rank
    needs) and serves the dim-1 chunks (every rank needs strided parts of each) through the
    process group, each fetched once. Every shard equals FileSystemReader's (checked in the
    worker)."""
    url, local = big_checkpoints[saved_by]
    outputs = run_ranks(
        world,
        ["load-slices", url, str(local), str(dim)],
        {"TEST_S3_ENDPOINT": s3_server.endpoint_url, "TEST_SHARE": "1" if share else "0"},
    )
    records = [json.loads(o.strip().splitlines()[-1]) for o in outputs]
    assert sorted(r["rank"] for r in records) == list(range(world))
    requested = sum(r["requested"] for r in records)
    needed = sum(r["needed"] for r in records)
    stored = sum(p.stat().st_size for p in local.iterdir() if p.suffix == ".distcp")
    if share and dim == 1:
        # each chunk two ranks need is fetched once and sent: nothing to slice
        assert requested <= stored and sum(r["bytes_from_peers"] for r in records) > 0
        assert all(r["sliced_items"] == 0 for r in records)
    elif dim == 0:
        assert requested <= 1.10 * needed
        assert all(r["sliced_items"] > 0 for r in records)
        if share:
            # received: the "step" entry every rank needs and the heads and tails (at most
            # 4 KiB each) of the chunks this rank slices, which one rank fetched for all
            assert all(
                0 < r["bytes_from_peers"] <= 4096 * (2 * r["sliced_items"] + 1) for r in records
            )
            # each rank GETs its runs and a share of the probes (rank 0 the .metadata too)
            assert all(r["requests"] - (r["rank"] == 0) <= 2 * r["sliced_items"] for r in records)
        else:
            assert all(r["bytes_from_peers"] == 0 for r in records)
        # no request explosion: besides the .metadata GET, each sliced chunk takes its run and
        # shares a probe GET with its neighbour (the tail of one and the head of the next)
        assert all(r["requests"] - 1 <= 2 * r["items"] + 1 for r in records)
    else:
        assert requested <= world * stored
    # a shared load sums the job's statistics on every rank, whether it sent bytes or not
    assert all(r["job_ranks"] == (world if share else None) for r in records)
