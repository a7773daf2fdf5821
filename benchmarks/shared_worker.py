"""One rank of ``shared.py``'s gloo jobs: save a checkpoint, or load it timed and checked.

``save JOB``: ``replicated`` and ``dim0_1to4`` are saved by one process (plain tensors),
``dim1`` and ``dim0_2to4`` by the job's ranks (DTensors sharded on dim 0). ``load JOB``: the
rank allocates its state dict (plain tensors, or its dim-1 or dim-0 shards of them), reads its
RSS, waits at a barrier, runs ``await aiodcp.load_checkpoint`` (peak RSS: ``common.PeakRSS``),
checks every tensor it loaded, and prints ``RESULT {json}``.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import PeakRSS, make_tensor, zeros_like_spec

warnings.filterwarnings("ignore", message="torch.distributed is disabled")


def main() -> None:
    mode, job = sys.argv[1], json.loads(Path(sys.argv[2]).read_text())
    layout = job["layout"]
    if mode == "save" and layout in ("replicated", "dim0_1to4"):
        state = {name: make_tensor(name, shape, dtype) for name, shape, dtype in job["tensors"]}
        dcp.save(state, checkpoint_id=job["out"], no_dist=True)
        return
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Shard

    dist.init_process_group("gloo")
    try:
        world, rank = dist.get_world_size(), dist.get_rank()
        mesh = init_device_mesh("cpu", (world,))
        if mode == "save":
            saved: dict[str, Any] = {}
            for name, shape, dtype in job["tensors"]:
                local = make_tensor(name, shape, dtype).chunk(world, dim=0)[rank].clone()
                saved[name] = DTensor.from_local(local, mesh, [Shard(0)], run_check=False)
            dcp.save(saved, checkpoint_id=job["out"])
            return
        import aiodcp

        state: dict[str, Any] = {}
        for name, shape, dtype in job["tensors"]:
            if layout == "replicated":
                state[name] = zeros_like_spec(shape, dtype)
            else:
                dim = 1 if layout == "dim1" else 0
                local_shape = list(shape)
                local_shape[dim] //= world
                local = zeros_like_spec(local_shape, dtype)
                state[name] = DTensor.from_local(local, mesh, [Shard(dim)], run_check=False)
        options = {"endpoint_url": job["endpoint"], "addressing_style": "path"}
        options.update(region="us-east-1", **job["options"])
        dist.barrier()
        with PeakRSS() as rss:
            t0 = time.perf_counter()
            stats = asyncio.run(aiodcp.load_checkpoint(state, job["url"], **options))
            wall = time.perf_counter() - t0
        ok = True
        for name, shape, dtype in job["tensors"]:
            expected = make_tensor(name, shape, dtype)
            got = state[name]
            if layout != "replicated":
                expected = expected.chunk(world, dim=1 if layout == "dim1" else 0)[rank]
                got = got.to_local()
            ok = ok and torch.equal(got, expected)
        print(
            "RESULT "
            + json.dumps(
                {
                    "rank": rank,
                    "wall_s": wall,
                    "rss_above": rss.above_baseline,
                    "ok": ok,
                    "from_peers": getattr(stats, "bytes_from_peers", 0),
                    "sliced_items": getattr(stats, "sliced_items", 0),
                    "verified_bytes": getattr(stats, "verified_bytes", 0),
                    "unverified_bytes": getattr(stats, "unverified_bytes", 0),
                    "max_gap_size": stats.max_gap_size,
                    "needed_bytes": job["needed_bytes"],
                }
            ),
            flush=True,
        )
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
