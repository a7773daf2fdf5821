"""One rank of a gloo job for tests/test_safetensors_sharing.py (safetensors, multi-rank).

``save SAVE DIR``: write the checkpoint to DIR. ``one``: rank 0 writes every tensor in one
``model.safetensors`` with the ``safetensors`` library; ``shards``: rank 0 writes two shards and
``model.safetensors.index.json``, as ``save_pretrained`` lays them out; ``dcp``: every rank
writes its dim-0 shard of DTensors with torch's ``HuggingFaceStorageWriter(save_distributed=
True)`` (``DCP_SHARDING_INFO`` in each file's ``__metadata__``); ``fsdp``: rank 0 writes a small
model's weights (``a.weight``...) in one file.

``load LOAD URL DIR API``: load it from S3 with aiodcp (``API`` ``sync``: ``dcp.load`` +
``S3HuggingFaceStorageReader``; ``async``: ``await load_safetensors(into=...)``) into the
``LOAD`` layout (``replicated``: plain tensors; ``dim0``/``dim1``: DTensors sharded on that dim;
``fsdp``: an FSDP2 ``fully_shard`` model through ``get_model_state_dict`` /
``set_model_state_dict``), load it again from DIR with torch's ``HuggingFaceStorageReader``,
compare every local tensor bit for bit, and print ``RESULT {json}`` with this rank's
``LoadStats`` and the job's. Options come as JSON in ``SHARE_OPTIONS``.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Shard, distribute_tensor


def full_tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1234)
    return {
        "embed": torch.randn(256, 64, generator=g).bfloat16(),
        # 3 MiB: runs straight into shards, and (replicated) received from a peer straight
        # into the destination (items of 3 segments or more)
        "big": torch.randn(768, 1024, generator=g),
        "ids": torch.arange(64 * 40, dtype=torch.int64).reshape(64, 40),
        "norm": torch.randn(64, 8, generator=g),
        "half": torch.randn(128, 96, generator=g).half(),
    }


class Net(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = torch.nn.Linear(256, 512)
        self.b = torch.nn.Linear(512, 64)


def save(kind: str, directory: Path, world: int) -> None:
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    if kind == "dcp":
        from torch.distributed.checkpoint import HuggingFaceStorageWriter

        mesh = init_device_mesh("cpu", (world,))
        state = {k: distribute_tensor(v, mesh, [Shard(0)]) for k, v in full_tensors().items()}
        dcp.save(
            state, storage_writer=HuggingFaceStorageWriter(str(directory), save_distributed=True)
        )
        return
    if dist.get_rank() == 0:
        tensors = full_tensors()
        if kind == "fsdp":
            torch.manual_seed(7)
            tensors = {k: v.detach().clone() for k, v in Net().state_dict().items()}
        if kind in ("one", "fsdp"):
            save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})
        else:
            names = sorted(tensors)
            weight_map = {}
            for k in range(2):
                file = f"model-{k + 1:05d}-of-00002.safetensors"
                save_file({n: tensors[n] for n in names[k::2]}, str(directory / file))
                weight_map.update(dict.fromkeys(names[k::2], file))
            (directory / "model.safetensors.index.json").write_text(
                json.dumps({"metadata": {}, "weight_map": weight_map})
            )
    dist.barrier()


def state_for(kind: str, world: int) -> tuple[Any, dict[str, Any]]:
    """(model or None, the state dict to load into: zeros of each tensor's layout)."""
    if kind == "fsdp":
        from torch.distributed.checkpoint.state_dict import get_model_state_dict
        from torch.distributed.fsdp import fully_shard

        torch.manual_seed(99)
        model = Net()
        mesh = init_device_mesh("cpu", (world,))
        fully_shard(model.a, mesh=mesh)
        fully_shard(model, mesh=mesh)
        return model, get_model_state_dict(model)
    tensors = {k: torch.zeros_like(v) for k, v in full_tensors().items()}
    if kind == "replicated":
        return None, tensors
    placement = Shard(0) if kind == "dim0" else Shard(1)
    mesh = init_device_mesh("cpu", (world,))
    return None, {k: distribute_tensor(v, mesh, [placement]) for k, v in tensors.items()}


def local(value: Any) -> torch.Tensor:
    return value.to_local() if isinstance(value, DTensor) else value


def bits(t: torch.Tensor) -> bytes:
    return t.contiguous().view(-1).view(torch.uint8).numpy().tobytes()


def main() -> None:
    mode, kind = sys.argv[1], sys.argv[2]
    dist.init_process_group("gloo")
    world = dist.get_world_size()
    try:
        if mode == "save":
            save(kind, Path(sys.argv[3]), world)
            return
        url, directory, api = sys.argv[3], sys.argv[4], sys.argv[5]
        import aiodcp

        options = json.loads(os.environ.get("SHARE_OPTIONS", "{}"))
        options.setdefault("endpoint_url", os.environ["TEST_S3_ENDPOINT"])
        options.setdefault("addressing_style", "path")
        options.setdefault("region", "us-east-1")
        model, state = state_for(kind, world)
        _, reference = state_for(kind, world)
        dcp.load(reference, storage_reader=dcp.HuggingFaceStorageReader(directory))
        dist.barrier()
        if api == "sync":
            with aiodcp.S3HuggingFaceStorageReader(url, **options) as reader:
                dcp.load(state, storage_reader=reader)
                stats = reader.stats
        else:
            stats = asyncio.run(aiodcp.load_safetensors(url, into=state, **options)).stats
        if model is not None:
            from torch.distributed.checkpoint.state_dict import (
                get_model_state_dict,
                set_model_state_dict,
            )

            set_model_state_dict(model, state)
            state = get_model_state_dict(model)  # what the model now holds
        mismatched = sorted(
            k
            for k in reference
            if local(state[k]).dtype != local(reference[k]).dtype
            or bits(local(state[k])) != bits(local(reference[k]))
        )
        assert stats is not None
        job = stats.job
        print(  # noqa: T201
            "RESULT "
            + json.dumps(
                {
                    "rank": dist.get_rank(),
                    "mismatched": mismatched,
                    "keys": sorted(reference),
                    "stats": {
                        "requests": stats.requests,
                        "bytes_requested": stats.bytes_requested,
                        "bytes_from_peers": stats.bytes_from_peers,
                        "sliced_items": stats.sliced_items,
                        "direct_items": stats.direct_items,
                        "direct_runs": stats.direct_runs,
                    },
                    "job": None if job is None else {"ranks": job.ranks},
                }
            ),
            flush=True,
        )
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
