"""One rank of a gloo job for tests/test_sharing.py (shared multi-rank loads), as a subprocess.

``save LAYOUT DIR``: the ranks save the layout's state dict with ``dcp.save`` to DIR.
``load LAYOUT URL DIR API``: the ranks load it from S3 with aiodcp (``API`` ``sync``:
``dcp.load`` + ``S3StorageReader``; ``async``: ``await load_checkpoint``), load it again from DIR
with ``FileSystemReader``, compare every local tensor, and print one ``RESULT {json}`` line
with this rank's ``LoadStats`` (and the job's). Options come as JSON in ``SHARE_OPTIONS``, and
for one rank only in ``SHARE_OPTIONS_<rank>``.

Layouts (``SAVE_WORLD`` ranks save, the job's world size loads):
- ``replicated``: plain tensors, every rank loads all of them (data-parallel replicas);
- ``dim0``: DTensors sharded on dim 0, loaded sharded on dim 0 (by another world size);
- ``dim1``: saved sharded on dim 0, loaded sharded on dim 1 (every rank needs a column half of
  every stored chunk);
- ``fsdp``: an FSDP2 (``fully_shard``) model and its AdamW state, through
  ``get_state_dict``/``set_state_dict``;
- ``hsdp``: DTensors on a 2-D mesh, replicated on one dimension and sharded on the other.
"""

from __future__ import annotations

import asyncio
import copy
import json
import os
import sys
import threading
import time
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor


def full_tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(4321)
    return {
        "embed": torch.randn(256, 64, generator=g),  # 64 KiB
        "proj": torch.randn(96, 48, generator=g).bfloat16(),
        "ids": torch.arange(64 * 40, dtype=torch.int64).reshape(64, 40),
        "big": torch.randn(512, 1024, generator=g),  # 2 MiB: several 1 MiB segments
        "flags": torch.rand(128, 8, generator=g) > 0.5,
    }


def layout(name: str, world: int, zero: bool, saving: bool) -> dict[str, Any]:
    tensors = full_tensors()
    if zero:
        tensors = {k: torch.zeros_like(v) for k, v in tensors.items()}
    if name == "replicated":
        return {**tensors, "step": 0 if zero else 11}
    if name in ("dim0", "dim1"):
        placement = Shard(0) if saving or name == "dim0" else Shard(1)
        mesh = init_device_mesh("cpu", (world,))
        out: dict[str, Any] = {
            k: distribute_tensor(v, mesh, [placement]) for k, v in tensors.items()
        }
        out["step"] = 0 if zero else 11
        return out
    if name == "hsdp":
        mesh = init_device_mesh("cpu", (2, world // 2), mesh_dim_names=("replicate", "shard"))
        out = {k: distribute_tensor(v, mesh, [Replicate(), Shard(0)]) for k, v in tensors.items()}
        out["step"] = 0 if zero else 11
        return out
    raise SystemExit(f"unknown layout {name}")


class Net(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = torch.nn.Linear(64, 128)
        self.b = torch.nn.Linear(128, 32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.relu(self.a(x)))


def fsdp_state(world: int, trained: bool) -> tuple[Any, Any, Any]:
    from torch.distributed.checkpoint.state_dict import get_state_dict
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0 if trained else 99)
    model = Net()
    mesh = init_device_mesh("cpu", (world,))
    fully_shard(model.a, mesh=mesh)
    fully_shard(model, mesh=mesh)
    optim = torch.optim.AdamW(model.parameters(), lr=0.01)
    if trained:
        for step in range(2):
            g = torch.Generator().manual_seed(step)
            model(torch.randn(8, 64, generator=g)).sum().backward()
            optim.step()
            optim.zero_grad()
    else:
        # A state to load into: the optimizer must have its state tensors.
        model(torch.randn(8, 64)).sum().backward()
        optim.step()
        optim.zero_grad()
    model_sd, optim_sd = get_state_dict(model, optim)
    return model, optim, {"model": model_sd, "optim": optim_sd}


def local_tensors(value: Any, prefix: str = "") -> dict[str, Any]:
    """Every leaf of a (nested) state dict, DTensors as their local shard."""
    out: dict[str, Any] = {}
    if isinstance(value, dict):
        for k, v in value.items():
            out.update(local_tensors(v, f"{prefix}{k}."))
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            out.update(local_tensors(v, f"{prefix}{i}."))
    elif isinstance(value, DTensor):
        out[prefix] = value.to_local()
    else:
        out[prefix] = value
    return out


def compare(actual: Any, expected: Any) -> list[str]:
    a, e = local_tensors(actual), local_tensors(expected)
    bad = sorted(set(a) ^ set(e))
    for key in sorted(set(a) & set(e)):
        x, y = a[key], e[key]
        if isinstance(x, torch.Tensor):
            if not isinstance(y, torch.Tensor) or x.dtype != y.dtype or not torch.equal(x, y):
                bad.append(key)
        elif x != y:
            bad.append(key)
    return bad


async def load_async(
    state: dict[str, Any], url: str, options: dict[str, Any], cancel_after: float
) -> Any:
    """``await load_checkpoint``; cancelled after ``cancel_after`` seconds when that is > 0."""
    import aiodcp

    task = asyncio.create_task(aiodcp.load_checkpoint(state, url, **options))
    if cancel_after > 0:
        await asyncio.sleep(cancel_after)
        task.cancel()
    return await task


def aborting(reader: Any) -> Any:
    """On rank ``SHARE_ABORT_RANK``, a planner that aborts ``reader`` while torch plans the
    load (after the metadata, before ``read_data``); None (torch's default) elsewhere."""
    if dist.get_rank() != int(os.environ.get("SHARE_ABORT_RANK", "-1")):
        return None
    from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner

    class Aborting(DefaultLoadPlanner):
        def create_local_plan(self) -> Any:
            reader.abort()
            return super().create_local_plan()

    return Aborting()


def main() -> None:
    mode, name = sys.argv[1], sys.argv[2]
    dist.init_process_group("gloo")
    world = dist.get_world_size()
    try:
        if mode == "save":
            directory = sys.argv[3]
            if name == "fsdp":
                _, _, state = fsdp_state(world, trained=True)
            else:
                state = layout(name, world, zero=False, saving=True)
            dcp.save(state, checkpoint_id=directory)
            return
        url, directory, api = sys.argv[3], sys.argv[4], sys.argv[5]
        import aiodcp

        options = json.loads(os.environ.get("SHARE_OPTIONS", "{}"))
        options.update(json.loads(os.environ.get(f"SHARE_OPTIONS_{dist.get_rank()}", "{}")))
        options.setdefault("endpoint_url", os.environ["TEST_S3_ENDPOINT"])
        options.setdefault("addressing_style", "path")
        options.setdefault("region", "us-east-1")
        if name == "fsdp":
            model, optim, state = fsdp_state(world, trained=False)
            _, _, reference = fsdp_state(world, trained=False)
        else:
            state = layout(name, world, zero=True, saving=False)
            reference = copy.deepcopy(state)
        dcp.load(reference, storage_reader=dcp.FileSystemReader(directory))
        cancel_after = float(os.environ.get("SHARE_CANCEL_AFTER_S", "0"))
        if os.environ.get("SHARE_GIVE_GROUP"):  # the caller names the group dcp.load runs on
            options["process_group"] = dist.group.WORLD
        if os.environ.get("SHARE_LOSE_FRAME"):
            # As if a torch release renamed _load_state_dict or its distW: the lookup of the
            # load's group finds nothing.
            import aiodcp.dcp._sharing as sharing

            sharing._load_frame_wrapper = lambda: sharing._NOT_FOUND
        dist.barrier()
        started = time.monotonic()
        try:
            if api == "sync":
                import warnings

                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always")
                    with aiodcp.S3StorageReader(url, **options) as reader:
                        dcp.load(state, storage_reader=reader, planner=aborting(reader))
                        stats = reader.stats
                warned = [str(w.message) for w in caught if "aiodcp" in str(w.message)]
            else:
                warned = []
                stats = asyncio.run(load_async(state, url, options, cancel_after))
        except BaseException as exc:
            # dcp.load wraps every rank's error in one CheckpointException: report this rank's.
            failures = getattr(exc, "failures", None)
            if isinstance(failures, dict) and dist.get_rank() in failures:
                inner = failures[dist.get_rank()]
                exc = inner[0] if isinstance(inner, tuple) else inner
            print(  # noqa: T201
                "RESULT "
                + json.dumps(
                    {
                        "rank": dist.get_rank(),
                        "error": type(exc).__name__,
                        "message": str(exc),
                        "peer_rank": getattr(exc, "rank", None),
                        "key": getattr(exc, "key", None),
                        "elapsed_s": time.monotonic() - started,
                        "threads": sorted(
                            t.name for t in threading.enumerate() if t.name.startswith("aiodcp")
                        ),
                    }
                ),
                flush=True,
            )
            return
        if name == "fsdp":
            from torch.distributed.checkpoint.state_dict import set_state_dict

            set_state_dict(
                model, optim, model_state_dict=state["model"], optim_state_dict=state["optim"]
            )
        mismatched = compare(state, reference)
        assert stats is not None
        job = stats.job
        print(  # noqa: T201
            "RESULT "
            + json.dumps(
                {
                    "rank": dist.get_rank(),
                    "mismatched": mismatched,
                    "warned": warned,
                    "stats": {
                        "sharing": stats.sharing,
                        "requests": stats.requests,
                        "bytes_requested": stats.bytes_requested,
                        "bytes_used": stats.bytes_used,
                        "bytes_received": stats.bytes_received,
                        "bytes_from_peers": stats.bytes_from_peers,
                        "bytes_to_peers": stats.bytes_to_peers,
                        "peak_buffered_bytes": stats.peak_buffered_bytes,
                        "sliced_items": stats.sliced_items,
                        "verified_bytes": stats.verified_bytes,
                        "unverified_bytes": stats.unverified_bytes,
                        "checksum_mismatches": stats.checksum_mismatches,
                        "checksum_requests": stats.checksum_requests,
                    },
                    "job": None
                    if job is None
                    else {
                        "ranks": job.ranks,
                        "requests": job.requests,
                        "bytes_requested": job.bytes_requested,
                        "bytes_from_peers": job.bytes_from_peers,
                        "bytes_to_peers": job.bytes_to_peers,
                        "bytes_used": job.bytes_used,
                        "verified_bytes": job.verified_bytes,
                        "unverified_bytes": job.unverified_bytes,
                        "checksum_requests": job.checksum_requests,
                    },
                }
            ),
            flush=True,
        )
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
    # As dist_worker.py: skip interpreter and C++ static teardown (a gloo rank once aborted
    # there in CI after its checks passed).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
