"""Multi-rank loads with torch.distributed (gloo), resharded: saved by 4 ranks, loaded by 2."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import S3Server, upload_dir

WORKER = Path(__file__).parent / "dist_worker.py"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run_ranks(world: int, args: list[str], extra_env: dict[str, str]) -> list[str]:
    port = free_port()
    procs = []
    for rank in range(world):
        env = dict(os.environ)
        env.update(
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(port),
            GLOO_SOCKET_IFNAME="lo",
            RANK=str(rank),
            WORLD_SIZE=str(world),
            LOCAL_RANK=str(rank),
            OMP_NUM_THREADS="1",
            PYTHONWARNINGS="ignore",
            **extra_env,
        )
        procs.append(
            subprocess.Popen(
                [sys.executable, str(WORKER), *args],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
        )
    outputs = []
    try:
        for proc in procs:
            out, _ = proc.communicate(timeout=180)
            outputs.append(out)
            assert proc.returncode == 0, out[-3000:]
    finally:
        for proc in procs:  # one rank failed: do not leave the others running
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
    return outputs


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
