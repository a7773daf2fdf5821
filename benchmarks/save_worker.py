"""One timed save in a fresh process (or one rank of a gloo job), run by ``save.py``.

``python save_worker.py JOB.json`` where the job names the saver, the checkpoint URL, the
endpoint, the tensors (``common.layer_specs``: their content is a pure function of their name),
the number of data files and the result path. The worker builds the state dict (pages touched),
reads the RSS baseline, then times the save (writer construction to its end) and its peak RSS
(``common.PeakRSS``: the kernel's ``VmHWM``, nothing sampling inside this process), and reads its
own CPU seconds (user + system, every thread) around it. Afterwards, untimed,
it loads the checkpoint back with aiodcp's reader and compares every tensor bit for bit.
In a gloo job (``RANK``/``WORLD_SIZE`` set) each rank saves FSDP-style DTensors sharded on dim 0
and checks its own shards.
"""

from __future__ import annotations

import asyncio
import gc
import json
import os
import resource
import sys
import time
import warnings
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.distributed.checkpoint as dcp  # noqa: E402
from common import PeakRSS, make_tensor  # noqa: E402

REGION = "us-east-1"


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def build_state(job: dict[str, Any]) -> dict[str, Any]:
    state: dict[str, Any] = {}
    if not job.get("dist"):
        for name, shape, dtype in job["specs"]:
            state[name] = make_tensor(name, shape, dtype)
        return state
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Shard

    world, rank = dist.get_world_size(), dist.get_rank()
    mesh = init_device_mesh("cpu", (world,))
    for name, shape, dtype in job["specs"]:
        local = make_tensor(name, shape, dtype).chunk(world)[rank].clone()
        state[name] = DTensor.from_local(local, mesh, [Shard(0)], run_check=False)
    return state


def writer_for(job: dict[str, Any]) -> Any:
    saver = job["saver"]
    if saver == "aiodcp_sync":
        import aiodcp

        return aiodcp.S3StorageWriter(job["url"], **aiodcp_options(job))
    if saver == "s3tc":
        from s3torchconnector import S3ClientConfig
        from s3torchconnector._s3client import S3Client
        from s3torchconnector.dcp import S3StorageWriter
        from s3torchconnector.dcp.s3_file_system import S3FileSystem

        # its DCP classes take no endpoint: the file system gets a client that has one
        config = S3ClientConfig(force_path_style=True)
        writer = S3StorageWriter(
            REGION, job["url"], s3client_config=config, thread_count=job["files"]
        )
        client = S3Client(REGION, endpoint=job["endpoint"], s3client_config=config)
        writer.fs = S3FileSystem(REGION, s3_client=client)
        writer.path = writer.fs.init_path(job["url"])
        return writer
    if saver == "fsspec":
        from torch.distributed.checkpoint._fsspec_filesystem import FsspecWriter

        return FsspecWriter(
            job["url"],
            thread_count=job["files"],
            sync_files=False,
            key=os.environ["AWS_ACCESS_KEY_ID"],
            secret=os.environ["AWS_SECRET_ACCESS_KEY"],
            endpoint_url=job["endpoint"],
            client_kwargs={"region_name": REGION},
            config_kwargs={"s3": {"addressing_style": "path"}},
            skip_instance_cache=True,
        )
    raise SystemExit(f"unknown saver {saver}")


def aiodcp_options(job: dict[str, Any]) -> dict[str, Any]:
    return {
        "endpoint_url": job["endpoint"],
        "region": REGION,
        "addressing_style": "path",
        "files_per_rank": job["files"],
        **job.get("aiodcp_options", {}),
    }


def save(state: dict[str, Any], job: dict[str, Any]) -> dict[str, Any]:
    if job["saver"] == "aiodcp_async":
        import aiodcp

        save = aiodcp.save_checkpoint(state, job["url"], **aiodcp_options(job))
        if job.get("lag"):
            stats, lags = asyncio.run(with_heartbeat(save))
            return {"aiodcp_stats": _stats(stats), "lag_ms": lag_summary(lags)}
        return {"aiodcp_stats": _stats(asyncio.run(save))}
    writer = writer_for(job)
    dcp.save(state, storage_writer=writer)
    extra: dict[str, Any] = {}
    if job["saver"] == "aiodcp_sync":
        extra["aiodcp_stats"] = _stats(writer.stats)
        writer.close()
    return extra


HEARTBEAT_S = 0.005
"""The caller's-loop heartbeat of ``--lag`` (issue 21: a 5 ms heartbeat never lags 100 ms)."""


async def with_heartbeat(save: Any) -> tuple[Any, list[float]]:
    """Await ``save`` beside a 5 ms heartbeat on the same loop; (its result, each beat's lag in
    seconds past its 5 ms)."""
    lags: list[float] = []
    done = asyncio.Event()

    async def beat() -> None:
        while not done.is_set():
            before = time.perf_counter()
            await asyncio.sleep(HEARTBEAT_S)
            lags.append(time.perf_counter() - before - HEARTBEAT_S)

    task = asyncio.create_task(beat())
    try:
        return await save, lags
    finally:
        done.set()
        await task


def lag_summary(lags: list[float]) -> dict[str, float]:
    ordered = sorted(lags) or [0.0]
    at = lambda q: ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000  # noqa: E731
    return {"p50": at(0.5), "p99": at(0.99), "max": ordered[-1] * 1000, "beats": len(lags)}


def crc32_module() -> str | None:
    """Which library computed aiodcp's zip CRC-32s (isal, or zlib when isal is missing)."""
    if "aiodcp.dcp._savearchive" not in sys.modules:
        return None
    return str(sys.modules["aiodcp.dcp._savearchive"].crc32.__module__)


def _stats(stats: Any) -> dict[str, Any]:
    import dataclasses

    return {k: v for k, v in dataclasses.asdict(stats).items() if not isinstance(v, dict)}


def verify(state: dict[str, Any], job: dict[str, Any]) -> bool:
    """Load what was saved back with aiodcp and compare bit for bit (untimed)."""
    import aiodcp

    out: dict[str, Any] = {}
    for name, value in state.items():
        if isinstance(value, torch.Tensor):
            out[name] = torch.zeros_like(value)
    reader = aiodcp.S3StorageReader(
        job["url"], endpoint_url=job["endpoint"], region=REGION, addressing_style="path"
    )
    with reader:
        dcp.load(out, storage_reader=reader)
    for name, value in state.items():
        got = out[name]
        if hasattr(value, "to_local"):
            value, got = value.to_local(), got.to_local()
        if not torch.equal(got, value):
            return False
    return True


def main() -> None:
    job = json.loads(Path(sys.argv[1]).read_text())
    warnings.simplefilter("ignore")
    if job.get("dist"):
        dist.init_process_group("gloo")
    state = build_state(job)
    gc.collect()
    if job.get("dist"):
        dist.barrier()
    with PeakRSS() as peak:
        cpu0, t0 = cpu_seconds(), time.perf_counter()
        extra = save(state, job)
        wall, cpu = time.perf_counter() - t0, cpu_seconds() - cpu0
    result = {
        "wall_s": wall,
        "cpu_s": cpu,
        "rss_above_state": peak.above_baseline,
        "rss_method": peak.method,
        "crc32": crc32_module(),
        "correct": verify(state, job),
        **extra,
    }
    rank = os.environ.get("RANK", "0") if job.get("dist") else "0"
    Path(f"{job['result']}.{rank}").write_text(json.dumps(result))
    if job.get("dist"):
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
