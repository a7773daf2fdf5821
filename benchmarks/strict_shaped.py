"""The S3-shaped load through a store as strict as AWS S3: how many requests does it refuse?

nginx (the benchmark's server) checks no signature, so the benchmark cannot tell whether a load
would be accepted by S3. This runs the S3-shaped scenario's load (20 ms to first byte, 80 MB/s
per connection, applied by ``s3proxy.py``) against ``tests/strictstore.py`` (SigV4 verified
with botocore's signer, SigV2 refused, moto behind it) and reports the requests the store
refused, which must be 0, and whether every tensor came back bit-exact. Timings are not
reported: moto copies the whole object for every ranged GET, so they measure moto.

Run from the checkout with the development venv (it has moto)::

    .venv/bin/python benchmarks/strict_shaped.py [--size-mib 256]

Everything listens on 127.0.0.1; the processes it starts are stopped when it ends.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import urllib.request
from pathlib import Path
from typing import Any

import boto3
import torch
import torch.distributed.checkpoint as dcp
from botocore.config import Config

import aiodcp

HERE = Path(__file__).resolve().parent
TESTS = HERE.parent / "tests"
sys.path.insert(0, str(HERE))
import provenance  # noqa: E402

NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def start(args: list[str], prefix: str) -> tuple[subprocess.Popen[str], list[str]]:
    proc = subprocess.Popen(
        [sys.executable, *args], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True
    )
    assert proc.stdout is not None
    line = proc.stdout.readline().split()
    if not line or line[0] != prefix:
        proc.kill()
        raise RuntimeError(f"{args[0]} did not start: {line}")
    return proc, line[1:]


def get_json(url: str, method: str = "GET") -> Any:
    with NO_PROXY.open(urllib.request.Request(url, method=method), timeout=10) as response:
        return json.loads(response.read())


def state_dict(size_mib: float) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(5)
    n = max(1, int(size_mib // 8))
    return {f"layer{i}": torch.randn(1024, 2048, generator=g) for i in range(n)}


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mib", type=float, default=256.0)
    options = parser.parse_args()
    facts = provenance.collect()
    print(  # the run's provenance, as every benchmark result carries it
        f"Command: `{facts['command']}`; harness {facts['harness']}; aiodcp from "
        f"{Path(aiodcp.__file__).parent}; started {facts['started']}, {facts['uptime_at_start']}"
    )
    os.environ.update(
        AWS_ACCESS_KEY_ID="testing",
        AWS_SECRET_ACCESS_KEY="testing",
        AWS_SESSION_TOKEN="testing",
        AWS_EC2_METADATA_DISABLED="true",
    )
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        strict, ports = start(
            [
                str(TESTS / "strictstore.py"),
                "--log",
                str(root / "log.jsonl"),
                "--ca-dir",
                str(root / "ca"),
            ],
            "PORTS",
        )
        shaper, (shaper_port,) = start(
            [str(HERE / "s3proxy.py"), "--upstream-port", ports[0]], "PORT"
        )
        try:
            store = f"http://127.0.0.1:{ports[0]}"
            shaped = f"http://127.0.0.1:{shaper_port}"
            s3 = boto3.client(
                "s3",
                endpoint_url=store,
                region_name="us-east-1",
                config=Config(signature_version="s3v4", s3={"addressing_style": "path"}),
            )
            s3.create_bucket(Bucket="strict-bench")
            state = state_dict(options.size_mib)
            dcp.save(state, storage_writer=dcp.FileSystemWriter(str(root / "ck")))
            for path in sorted((root / "ck").iterdir()):
                s3.upload_file(str(path), "strict-bench", f"ck/{path.name}")
            get_json(f"{shaped}/__bench__/reset?latency_ms=20&bandwidth=80000000")
            for api in ("async", "sync"):
                get_json(f"{store}/_strict/counters", method="DELETE")
                out = {k: torch.zeros_like(v) for k, v in state.items()}
                kwargs: dict[str, Any] = {"endpoint_url": shaped, "region": "us-east-1"}
                if api == "async":
                    stats = await aiodcp.load_checkpoint(out, "s3://strict-bench/ck", **kwargs)
                else:

                    def sync_load(
                        out: dict[str, torch.Tensor] = out, kwargs: dict[str, Any] = kwargs
                    ) -> aiodcp.LoadStats:
                        url = "s3://strict-bench/ck"
                        with aiodcp.S3StorageReader(url, **kwargs) as reader:
                            dcp.load(out, storage_reader=reader)
                            return reader.stats

                    stats = await asyncio.to_thread(sync_load)
                exact = all(torch.equal(out[k], state[k]) for k in state)
                counters = get_json(f"{store}/_strict/counters")
                print(
                    f"{api:5s} {options.size_mib:.0f} MiB: requests {counters['requests']}, "
                    f"accepted {counters['accepted']}, refused {counters['refused'] or 0}, "
                    f"bit-exact {exact}; aiodcp: {stats.requests} requests, "
                    f"{stats.retries} retries, resigned {stats.resigned}, "
                    f"throttled {stats.throttled}"
                )
        finally:
            for proc in (shaper, strict):
                proc.terminate()
                proc.wait(timeout=10)


if __name__ == "__main__":
    asyncio.run(main())
