"""aiodcp quickstart: save a model with DCP, put it in S3, load it back both ways.

Runs end to end with no AWS account: it starts moto's S3 server on 127.0.0.1 (a real S3 HTTP
protocol implementation) and points aiodcp at it with ``endpoint_url``. Against real S3, drop
``endpoint_url`` and use your bucket.

    make demo            # or: python examples/quickstart.py
"""

from __future__ import annotations

import asyncio
import logging
import os
import tempfile
import time
import warnings
from pathlib import Path

import boto3
import torch
import torch.distributed.checkpoint as dcp
from moto.server import ThreadedMotoServer

import aiodcp

# Fake credentials for the local server; never ask the instance-metadata service for real ones.
os.environ.setdefault("AWS_ACCESS_KEY_ID", "local")
os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "local")
os.environ["AWS_EC2_METADATA_DISABLED"] = "true"
logging.getLogger("werkzeug").setLevel(logging.ERROR)  # the local server's access log
# A single process without a process group: torch says so once; that is what we want here.
warnings.filterwarnings("ignore", message="torch.distributed is disabled")


class TinyNet(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(1000, 64)
        self.blocks = torch.nn.Sequential(*(torch.nn.Linear(64, 64) for _ in range(4)))
        self.head = torch.nn.Linear(64, 10).to(torch.bfloat16)


def upload(directory: Path, endpoint_url: str, bucket: str, prefix: str) -> None:
    s3 = boto3.client("s3", endpoint_url=endpoint_url, region_name="us-east-1")
    s3.create_bucket(Bucket=bucket)
    for path in sorted(directory.iterdir()):
        s3.upload_file(str(path), bucket, f"{prefix}/{path.name}")


def check(loaded: dict[str, torch.Tensor], saved: dict[str, torch.Tensor]) -> None:
    for name, tensor in saved.items():
        if not torch.equal(loaded[name], tensor):
            raise SystemExit(f"MISMATCH in {name}")


def main() -> None:
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint_url = f"http://{host}:{port}"
    try:
        torch.manual_seed(0)
        model = TinyNet()
        saved = {k: v.clone() for k, v in model.state_dict().items()}
        with tempfile.TemporaryDirectory() as tmp:
            dcp.save(model.state_dict(), storage_writer=dcp.FileSystemWriter(tmp, thread_count=2))
            upload(Path(tmp), endpoint_url, "demo-bucket", "tinynet/step-100")
        url = "s3://demo-bucket/tinynet/step-100"
        print(f"saved {len(saved)} tensors with dcp.save and uploaded them to {url}")

        # 1. Plain torch.distributed.checkpoint with aiodcp's StorageReader.
        fresh = TinyNet()
        state = fresh.state_dict()
        with aiodcp.S3StorageReader(url, endpoint_url=endpoint_url, region="us-east-1") as reader:
            start = time.perf_counter()
            dcp.load(state, storage_reader=reader)
            print(f"dcp.load + S3StorageReader: {time.perf_counter() - start:.3f} s")
            print(f"  {reader.stats}")
        fresh.load_state_dict(state)
        check(fresh.state_dict(), saved)

        # 2. asyncio: the event loop keeps running while the checkpoint streams in.
        async def load_async() -> aiodcp.LoadStats:
            fresh = TinyNet()
            state = fresh.state_dict()
            ticks = 0

            async def heartbeat() -> None:
                nonlocal ticks
                while True:
                    await asyncio.sleep(0.005)
                    ticks += 1

            beat = asyncio.create_task(heartbeat())
            stats = await aiodcp.load_checkpoint(
                state, url, endpoint_url=endpoint_url, region="us-east-1"
            )
            beat.cancel()
            fresh.load_state_dict(state)
            check(fresh.state_dict(), saved)
            print(f"  the event loop ran {ticks} heartbeats meanwhile")
            return stats

        start = time.perf_counter()
        stats = asyncio.run(load_async())
        print(f"await aiodcp.load_checkpoint: {time.perf_counter() - start:.3f} s")
        print(f"  {stats}")
        print("OK: both loads match the saved model exactly")
    finally:
        server.stop()


if __name__ == "__main__":
    main()
