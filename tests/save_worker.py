"""One rank of a gloo job saving to S3 with aiodcp, run by tests/test_save_distributed.py.

``python save_worker.py MODE URL``, the store's endpoint in ``TEST_S3_ENDPOINT`` (rank 1 uses
``TEST_RANK1_ENDPOINT`` when set: a fault proxy in front of the same store). Every rank holds
FSDP-style DTensors sharded on dim 0 of a 1-D CPU mesh, a replicated tensor and a value, and
saves them:

- ``sync``: ``dcp.save(..., storage_writer=S3StorageWriter(...))``
- ``api``: ``await aiodcp.save_checkpoint(...)``
- ``thread`` / ``process``: ``dcp.async_save`` in its THREAD or PROCESS mode
- ``cancel``: ``await aiodcp.save_checkpoint(...)``; rank 1 cancels its task once it has a
  connection open to its (stalling) endpoint
- ``local``: ``dcp.save(..., use_collectives=False)`` of each rank's own plain tensors
  (``state_local``): rank-local ``__{rank}.metadata``

Each rank prints ``rank R OK`` or ``rank R RAISED <ErrorClass>: <message>`` last and exits 0
with ``os._exit`` once its process group is destroyed (but in ``process`` mode, whose
checkpointing process torch stops at teardown): the test asserts what every rank saw.
(Interpreter teardown is skipped: once, in THREAD mode, a rank that had saved and reported OK
was aborted by a C++ ``terminate`` while the interpreter shut down, outside anything tested.)
"""

from __future__ import annotations

import asyncio
import os
import sys
import time
from typing import Any
from urllib.parse import urlsplit

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import distribute_tensor
from torch.distributed.tensor.placement_types import Replicate, Shard


def full_state() -> dict[str, Any]:
    """What the ranks save together (the test rebuilds it from the same seed)."""
    g = torch.Generator().manual_seed(2024)
    return {
        "layer.weight": torch.randn(512, 1024, generator=g),  # 2 MiB, sharded
        "layer.bias": torch.randn(4096, generator=g),  # sharded, small shards
        "embed": torch.randn(1000, 512, generator=g).bfloat16(),  # 1 MiB, sharded
        "norm": torch.randn(256, generator=g),  # replicated
        "step": 1234,
    }


def sharded_state(world: int) -> dict[str, Any]:
    mesh = init_device_mesh("cpu", (world,))
    state = full_state()
    out: dict[str, Any] = {}
    for name, value in state.items():
        if not isinstance(value, torch.Tensor):
            out[name] = value
        elif name == "norm":
            out[name] = distribute_tensor(value, mesh, [Replicate()])
        else:
            out[name] = distribute_tensor(value, mesh, [Shard(0)])
    return out


def state_local(rank: int) -> dict[str, Any]:
    """A rank's own plain tensors, for a save without collectives."""
    g = torch.Generator().manual_seed(100 + rank)
    return {"weights": torch.randn(300_000, generator=g), "rank": rank}


def established(port: int) -> bool:
    from faultproxy import established_to

    return established_to(port) > 0


async def save_cancelled_on_rank_1(
    state: dict[str, Any], url: str, options: dict[str, Any]
) -> None:
    import aiodcp

    task = asyncio.create_task(aiodcp.save_checkpoint(state, url, **options))
    if dist.get_rank() == 1:
        port = urlsplit(options["endpoint_url"]).port or 80
        deadline = time.monotonic() + 60  # hang guard
        while not established(port) and not task.done():
            if time.monotonic() > deadline:
                raise TimeoutError("hang guard: rank 1 never started uploading")
            await asyncio.sleep(0.01)
        task.cancel()
    await task


def main() -> None:
    mode, url = sys.argv[1], sys.argv[2]
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    import aiodcp
    from aiodcp.dcp._session import _unwrap

    endpoint = os.environ["TEST_S3_ENDPOINT"]
    if rank == 1 and os.environ.get("TEST_RANK1_ENDPOINT"):
        endpoint = os.environ["TEST_RANK1_ENDPOINT"]
    options = {
        "endpoint_url": endpoint,
        "region": "us-east-1",
        "addressing_style": "path",
        "max_attempts": 2,
        "part_size": 5 * 1024 * 1024,
    }
    state = sharded_state(world)
    try:
        try:
            if mode == "sync":
                with aiodcp.S3StorageWriter(url, **options) as writer:
                    dcp.save(state, storage_writer=writer)
            elif mode == "api":
                stats = asyncio.run(aiodcp.save_checkpoint(state, url, **options))
                assert stats.files == 1, stats
            elif mode in ("thread", "process"):
                kind = dcp.state_dict_saver.AsyncCheckpointerType[mode.upper()]
                writer = aiodcp.S3StorageWriter(url, **options)
                dcp.async_save(state, storage_writer=writer, async_checkpointer_type=kind).result(
                    timeout=120
                )
                writer.close()
            elif mode == "local":  # no collectives: each rank its own __{rank}.metadata
                with aiodcp.S3StorageWriter(url, **options) as writer:
                    dcp.save(state_local(rank), storage_writer=writer, use_collectives=False)
            elif mode == "cancel":
                asyncio.run(save_cancelled_on_rank_1(state, url, options))
            else:
                raise SystemExit(f"unknown mode {mode}")
        except CheckpointException as exc:
            if os.environ.get("AIODCP_DEBUG"):
                failures = {k: repr(v)[:200] for k, v in exc.failures.items()}
                print("FAILURES", failures, flush=True)  # noqa: T201
            raise _unwrap(exc) from None
    except (Exception, asyncio.CancelledError) as exc:
        if os.environ.get("AIODCP_DEBUG"):
            import traceback

            traceback.print_exc()
        print(f"rank {rank} RAISED {type(exc).__name__}: {exc}", flush=True)  # noqa: T201
    else:
        print(f"rank {rank} OK", flush=True)  # noqa: T201
    finally:
        dist.destroy_process_group()
    if mode != "process":  # (there, torch's checkpointing process is stopped at teardown)
        sys.stdout.flush()
        os._exit(0)


if __name__ == "__main__":
    main()
