"""One benchmark process: save a checkpoint, or load one with one loader, timed and checked.

The orchestrator (``bench.py``) starts a fresh ``python worker.py load JOB.json`` per run, so no
loader inherits another's warm connections, caches, allocator state or RSS peak. A load run:

1. imports the loader's packages;
2. allocates the destination state dict (zeros, every page touched) and reads the RSS baseline;
3. times the load (reader construction to reader close; for ``boto3_then_fs`` the download and
   the local load) and its peak RSS (the kernel's ``VmHWM``, reset after the baseline: nothing
   samples inside this process), and with ``lag`` a 1 ms heartbeat on the event loop;
4. regenerates every expected tensor (a pure function of its name) and compares it with what
   was loaded, bit for bit;
5. writes a JSON result.

``save``/``save-dist`` write checkpoints with ``torch.distributed.checkpoint.save`` (one process
with ``thread_count`` files, or one rank of a gloo job saving DTensors sharded on dim 0);
``record`` writes a copy of a checkpoint's ``.metadata`` carrying the integrity record an aiodcp
save attaches (``bench.py``'s ``+rec`` loaders load that copy, verified).
"""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import PeakRSS, make_tensor, zeros_like_spec

warnings.filterwarnings("ignore", message="torch.distributed is disabled")
REGION = "us-east-1"


# ------------------------------------------------------------------------------ saving


def save(job: dict[str, Any]) -> None:
    from torch.distributed.checkpoint import FileSystemWriter

    state = {name: make_tensor(name, shape, dtype) for name, shape, dtype in job["tensors"]}
    writer = FileSystemWriter(job["out"], thread_count=job["files"], single_file_per_rank=True)
    dcp.save(state, storage_writer=writer, no_dist=True)


def record(job: dict[str, Any]) -> None:
    """Write ``job["out"]/.metadata``: the checkpoint in ``job["dir"]``'s metadata with the
    integrity record an aiodcp save attaches (its data files' ETags as the server answers them,
    sizes, CRC64NVME; each stored item's blocks: the framing before its storage bytes, found
    with ``zipfile``, then 1 MiB blocks from them), computed from the files."""
    import io
    import pickle
    import struct
    import zipfile

    from aiodcp._checksum import crc64nvme
    from aiodcp.dcp._integrity import DEFAULT_BLOCK_BYTES, FileRecord, Integrity, ItemBlocks

    def data_start_of(raw: memoryview) -> int:
        try:
            with zipfile.ZipFile(io.BytesIO(raw)) as archive:
                storages = [i for i in archive.infolist() if "/data/" in i.filename]
        except zipfile.BadZipFile:
            return 0
        if len(storages) != 1:
            return 0
        at = storages[0].header_offset
        name_length, extra_length = struct.unpack("<HH", raw[at + 26 : at + 30])
        return at + 30 + name_length + extra_length

    directory = Path(job["dir"])
    metadata = pickle.loads((directory / ".metadata").read_bytes())
    data = {name: (directory / name).read_bytes() for name in job["etags"]}
    files = {
        name: FileRecord(etag, len(data[name]), crc64nvme(data[name]))
        for name, etag in job["etags"].items()
    }
    items = {}
    block = DEFAULT_BLOCK_BYTES
    for info in metadata.storage_data.values():
        raw = memoryview(data[info.relative_path])[info.offset : info.offset + info.length]
        start = data_start_of(raw)
        body = raw[start:]
        blocks = [raw[:start]] if start else []
        blocks += [body[at : at + block] for at in range(0, max(len(body), 1), block)]
        crcs = tuple(crc64nvme(b) for b in blocks)
        items[(info.relative_path, info.offset, info.length)] = ItemBlocks(start, crcs)
    Integrity(block, files, items).attach(metadata)
    (Path(job["out"]) / ".metadata").write_bytes(pickle.dumps(metadata))


def save_dist(job: dict[str, Any]) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Shard

    dist.init_process_group("gloo")
    try:
        world, rank = dist.get_world_size(), dist.get_rank()
        mesh = init_device_mesh("cpu", (world,))
        state: dict[str, Any] = {}
        for name, shape, dtype in job["tensors"]:
            local = make_tensor(name, shape, dtype).chunk(world, dim=0)[rank].clone()
            state[name] = DTensor.from_local(local, mesh, [Shard(0)], run_check=False)
        dcp.save(state, checkpoint_id=job["out"])
    finally:
        dist.destroy_process_group()


# ------------------------------------------------------------------------------ loaders
# Each loader is (prepare, load): prepare() imports what it needs before the RSS baseline;
# load(state, job) runs the timed load and returns extra facts for the result.


def _aiodcp_options(job: dict[str, Any]) -> dict[str, Any]:
    options = {"endpoint_url": job["endpoint"], "addressing_style": "path", "region": REGION}
    options.update(job.get("aiodcp_options") or {})
    return options


def _stats_dict(stats: Any) -> dict[str, Any] | None:
    if stats is None:
        return None
    if dataclasses.is_dataclass(stats):
        return dataclasses.asdict(stats)  # type: ignore[arg-type]
    return {k: getattr(stats, k) for k in dir(stats) if not k.startswith("_")}


def load_aiodcp_sync(state: dict[str, Any], job: dict[str, Any]) -> dict[str, Any]:
    import aiodcp

    with aiodcp.S3StorageReader(job["url"], **_aiodcp_options(job)) as reader:
        dcp.load(state, storage_reader=reader)
        return {"aiodcp_stats": _stats_dict(reader.stats)}


async def load_aiodcp_async(state: dict[str, Any], job: dict[str, Any]) -> dict[str, Any]:
    import aiodcp

    stats = await aiodcp.load_checkpoint(state, job["url"], **_aiodcp_options(job))
    return {"aiodcp_stats": _stats_dict(stats)}


def _s3tc_reader(job: dict[str, Any], constructor: Any) -> Any:
    # s3torchconnector 1.5's DCP reader takes no endpoint: give its S3FileSystem a client that
    # has one (path-style addressing for the local server).
    from s3torchconnector import S3ClientConfig
    from s3torchconnector._s3client import S3Client
    from s3torchconnector.dcp import S3StorageReader
    from s3torchconnector.dcp.s3_file_system import S3FileSystem

    config = S3ClientConfig(force_path_style=True)
    reader = S3StorageReader(
        REGION, job["url"], s3client_config=config, reader_constructor=constructor
    )
    client = S3Client(REGION, endpoint=job["endpoint"], s3client_config=config)
    reader.fs = S3FileSystem(REGION, s3_client=client, reader_constructor=constructor)
    return reader


def load_s3tc_dcp_optimized(state: dict[str, Any], job: dict[str, Any]) -> dict[str, Any]:
    from s3torchconnector import S3ReaderConstructor

    reader = _s3tc_reader(job, S3ReaderConstructor.dcp_optimized())
    dcp.load(state, storage_reader=reader)
    return {}


def load_s3tc_sequential(state: dict[str, Any], job: dict[str, Any]) -> dict[str, Any]:
    from s3torchconnector import S3ReaderConstructor

    reader = _s3tc_reader(job, S3ReaderConstructor.sequential())
    dcp.load(state, storage_reader=reader)
    return {}


def _fsspec_load(state: dict[str, Any], job: dict[str, Any], block_size: int | None) -> None:
    from torch.distributed.checkpoint._fsspec_filesystem import FsspecReader

    options: dict[str, Any] = {
        "key": os.environ["AWS_ACCESS_KEY_ID"],
        "secret": os.environ["AWS_SECRET_ACCESS_KEY"],
        "endpoint_url": job["endpoint"],
        "client_kwargs": {"region_name": REGION},
        "config_kwargs": {"s3": {"addressing_style": "path"}},
        "skip_instance_cache": True,
    }
    if block_size:
        options["default_block_size"] = block_size
    reader = FsspecReader(job["url"], **options)
    dcp.load(state, storage_reader=reader)


def load_fsspec_default(state: dict[str, Any], job: dict[str, Any]) -> dict[str, Any]:
    _fsspec_load(state, job, None)
    return {}


def load_fsspec_tuned(state: dict[str, Any], job: dict[str, Any]) -> dict[str, Any]:
    _fsspec_load(state, job, job["fsspec_block_size"])
    return {"block_size": job["fsspec_block_size"]}


def load_boto3_then_fs(state: dict[str, Any], job: dict[str, Any]) -> dict[str, Any]:
    """``download_file`` of ``.metadata``, then of every data file it names (no LIST: the
    nginx server serves no listing), then ``FileSystemReader`` on the copy."""
    import boto3
    from botocore.config import Config
    from torch.distributed.checkpoint import FileSystemReader

    bucket, _, prefix = job["url"][len("s3://") :].partition("/")
    s3 = boto3.client(
        "s3",
        endpoint_url=job["endpoint"],
        region_name=REGION,
        config=Config(s3={"addressing_style": "path"}),
    )
    directory = tempfile.mkdtemp(dir=job["tmp_dir"])
    try:
        s3.download_file(bucket, f"{prefix}/.metadata", os.path.join(directory, ".metadata"))
        reader = FileSystemReader(directory)
        files = {info.relative_path for info in reader.read_metadata().storage_data.values()}
        for name in sorted(files):
            s3.download_file(bucket, f"{prefix}/{name}", os.path.join(directory, name))
        dcp.load(state, storage_reader=reader)
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    return {}


def _data_files(directory: str) -> list[tuple[str, int]]:
    names = sorted(n for n in os.listdir(directory) if n.endswith(".distcp"))
    return [(n, os.path.getsize(os.path.join(directory, n))) for n in names]


async def load_fetch_only(state: dict[str, Any], job: dict[str, Any]) -> dict[str, Any]:
    """Not a loader: the transport floor. Every byte of every data file through 8 concurrent
    16 MiB ranged GETs (plain aiohttp, unsigned: s3rver allows it), discarded; nothing decoded.
    """
    import aiohttp

    bucket, _, prefix = job["url"][len("s3://") :].partition("/")
    part = 16 * 1024 * 1024
    ranges = [
        (name, start, min(start + part, size))
        for name, size in _data_files(job["local_dir"])
        for start in range(0, size, part)
    ]
    received = 0
    semaphore = asyncio.Semaphore(8)
    connector = aiohttp.TCPConnector(limit=8)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def get(name: str, start: int, end: int) -> None:
            nonlocal received
            async with semaphore:
                url = f"{job['endpoint']}/{bucket}/{prefix}/{name}"
                headers = {"Range": f"bytes={start}-{end - 1}"}
                async with session.get(url, headers=headers) as response:
                    response.raise_for_status()
                    async for chunk in response.content.iter_any():
                        received += len(chunk)

        await asyncio.gather(*(get(*r) for r in ranges))
    return {"received": received}


def load_local_fs(state: dict[str, Any], job: dict[str, Any]) -> dict[str, Any]:
    from torch.distributed.checkpoint import FileSystemReader

    dcp.load(state, storage_reader=FileSystemReader(job["local_dir"]))
    return {}


PREPARE: dict[str, Callable[[], None]] = {
    # the S3 stack too, as the other loaders' imports bring theirs: `import aiodcp` alone
    # leaves it for the first use (the cold scenario times that)
    "aiodcp": lambda: __import__("aiodcp").S3StorageReader,
    "s3tc": lambda: __import__("s3torchconnector.dcp"),
    "fsspec": lambda: (__import__("s3fs"), __import__("torch.distributed.checkpoint")),
    "boto3": lambda: __import__("boto3"),
    "local": lambda: None,
    "fetch": lambda: __import__("aiohttp"),
}

LOADERS: dict[str, Callable[[dict[str, Any], dict[str, Any]], Any]] = {
    "aiodcp_sync": load_aiodcp_sync,
    "aiodcp_async": load_aiodcp_async,
    "s3tc_dcp_optimized": load_s3tc_dcp_optimized,
    "s3tc_sequential": load_s3tc_sequential,
    "fsspec_default": load_fsspec_default,
    "fsspec_tuned": load_fsspec_tuned,
    "boto3_then_fs": load_boto3_then_fs,
    "local_fs": load_local_fs,
    "fetch_only": load_fetch_only,
}


# ------------------------------------------------------------------------------ the run


def build_state(job: dict[str, Any]) -> dict[str, Any]:
    keys = set(job["keys"]) if job.get("keys") is not None else None
    specs = [s for s in job["tensors"] if keys is None or s[0] in keys]
    if not job.get("dist"):
        return {name: zeros_like_spec(shape, dtype) for name, shape, dtype in specs}
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Shard

    world = dist.get_world_size()
    mesh = init_device_mesh("cpu", (world,))
    state: dict[str, Any] = {}
    for name, shape, dtype in specs:
        local_shape = [shape[0], shape[1] // world]
        local = zeros_like_spec(local_shape, dtype)
        state[name] = DTensor.from_local(
            local,
            mesh,
            [Shard(1)],
            run_check=False,
            shape=torch.Size(shape),
            stride=(shape[1], 1),
        )
    return state


def check_state(state: dict[str, Any], job: dict[str, Any]) -> list[str]:
    """Names whose loaded value differs from the saved one (bitwise)."""
    bad: list[str] = []
    specs = {name: (shape, dtype) for name, shape, dtype in job["tensors"]}
    world = dist.get_world_size() if job.get("dist") else 1
    rank = dist.get_rank() if job.get("dist") else 0
    for name, tensor in state.items():
        shape, dtype = specs[name]
        expected = make_tensor(name, shape, dtype)
        if job.get("dist"):
            expected = expected.chunk(world, dim=1)[rank]
            tensor = tensor.to_local()
        # torch.equal is exact; the saved values hold no NaN (uniform floats, integers).
        if tensor.dtype != expected.dtype or not torch.equal(tensor, expected):
            bad.append(name)
    if job["loader"] == "fetch_only":
        return []  # nothing was loaded: the transport floor is not checked
    if set(state) != set(specs) and job.get("keys") is None:
        bad.append("<missing keys>")
    return bad


async def _heartbeat(lags: list[float], stop: asyncio.Event) -> None:
    loop = asyncio.get_running_loop()
    while not stop.is_set():
        t = loop.time()
        await asyncio.sleep(0.001)
        lags.append(loop.time() - t - 0.001)


class _GcTimer:
    """Time the garbage collector ran during a block (every thread; ``gc.callbacks``)."""

    def __init__(self) -> None:
        self.total_s = 0.0
        self.max_s = 0.0
        self._started = 0.0

    def _callback(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._started = time.perf_counter()
        else:
            spent = time.perf_counter() - self._started
            self.total_s += spent
            self.max_s = max(self.max_s, spent)

    def __enter__(self) -> _GcTimer:
        gc.callbacks.append(self._callback)
        return self

    def __exit__(self, *exc: object) -> None:
        gc.callbacks.remove(self._callback)


def _percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def run_load(job: dict[str, Any]) -> dict[str, Any]:
    loader = job["loader"]
    PREPARE[loader.split("_")[0]]()
    if job.get("dist"):
        dist.init_process_group("gloo")
    state = build_state(job)
    fn = LOADERS[loader]
    lags: list[float] = []
    extra: dict[str, Any] = {}
    if job.get("dist"):
        dist.barrier()
    gc_time = _GcTimer()
    with PeakRSS() as rss, gc_time:
        cpu0 = time.process_time()  # every thread of this process (the loaders' native ones too)
        t0 = time.perf_counter()
        if asyncio.iscoroutinefunction(fn) or job.get("lag"):

            async def main() -> Any:
                stop = asyncio.Event()
                beat = asyncio.create_task(_heartbeat(lags, stop)) if job.get("lag") else None
                try:
                    if asyncio.iscoroutinefunction(fn):
                        return await fn(state, job)
                    return await asyncio.to_thread(fn, state, job)
                finally:
                    stop.set()
                    if beat is not None:
                        await beat

            extra = asyncio.run(main())
        else:
            extra = fn(state, job)
        wall = time.perf_counter() - t0
        cpu = time.process_time() - cpu0  # every thread of this process, user + system
    bad = check_state(state, job)
    result: dict[str, Any] = {
        "loader": loader,
        "wall_s": wall,
        # CPU seconds of the load (user + system, all threads; the loader's alone, as nothing
        # samples RSS in this process): less disturbed than wall time by other processes
        "cpu_s": cpu,
        "rss_baseline": rss.baseline,
        "rss_peak": rss.peak,
        "rss_above": rss.above_baseline,
        "rss_method": rss.method,
        "machine_reclaimed_pages": rss.machine_reclaimed_pages,
        "ok": not bad,
        "mismatched": bad[:10],
        "tensors_checked": len(state),
        "gc_s": gc_time.total_s,
        "gc_max_s": gc_time.max_s,
        **(extra or {}),
    }
    if lags:
        ms = [x * 1000 for x in lags]
        result["lag_ms"] = {
            "beats": len(ms),
            "p50": statistics.median(ms),
            "p99": _percentile(ms, 0.99),
            "max": max(ms),
        }
    if job.get("dist"):
        result["rank"] = dist.get_rank()
        dist.destroy_process_group()
    return result


def main() -> None:
    mode, job_path = sys.argv[1], sys.argv[2]
    job = json.loads(Path(job_path).read_text())
    if mode == "save":
        save(job)
    elif mode == "save-dist":
        save_dist(job)
    elif mode == "record":
        record(job)
    elif mode == "load":
        try:
            result = run_load(job)
        except BaseException as exc:
            result = {"loader": job["loader"], "ok": False, "error": f"{type(exc).__name__}: {exc}"}
            out = job["result"] + (f".{os.environ.get('RANK', '0')}" if job.get("dist") else "")
            Path(out).write_text(json.dumps(result))
            raise
        out = job["result"] + (f".{result['rank']}" if job.get("dist") else "")
        Path(out).write_text(json.dumps(result))
    else:
        raise SystemExit(f"unknown mode {mode!r}")


if __name__ == "__main__":
    main()
