"""aiodcp's command line: look inside a checkpoint on S3 and see what a load would fetch.

Runs end to end with no AWS account: it starts moto's S3 server on 127.0.0.1, saves a small
model with ``dcp.save``, uploads it, then runs the ``aiodcp`` command (as ``python -m aiodcp``)
and prints what it says:

    aiodcp inspect s3://bucket/ckpt               every key: dtype, shape, bytes, files
    aiodcp plan s3://bucket/ckpt --keys ...       byte ranges, groups and GETs of a load

Add ``--json`` to either for a stable machine-readable form (schema: ``aiodcp._cli``).

Against real S3, drop ``--endpoint-url`` and ``--addressing-style`` and use your bucket.

    python examples/cli_walkthrough.py
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

import boto3
import torch
import torch.distributed.checkpoint as dcp
from moto.server import ThreadedMotoServer

# Fake credentials for the local server; never ask the instance-metadata service for real ones.
os.environ.setdefault("AWS_ACCESS_KEY_ID", "local")
os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "local")
os.environ["AWS_EC2_METADATA_DISABLED"] = "true"
os.environ.pop("AWS_PROFILE", None)  # the fake keys above, not a profile of this machine
logging.getLogger("werkzeug").setLevel(logging.ERROR)  # the local server's access log
warnings.filterwarnings("ignore", message="torch.distributed is disabled")

BUCKET = "demo-bucket"
PREFIX = "walkthrough/step-100"


def state_dict() -> dict[str, object]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Embedding(512, 64),
        torch.nn.Linear(64, 64),
        torch.nn.Linear(64, 10).to(torch.bfloat16),
    )
    return {"model": model.state_dict(), "step": 100, "config": {"lr": 3e-4, "name": "demo"}}


def aiodcp_cli(*args: str, endpoint_url: str, expect: int = 0) -> str:
    """Run ``python -m aiodcp ARGS`` against the local server; print and return its stdout."""
    common = ["--endpoint-url", endpoint_url, "--region", "us-east-1", "--addressing-style", "path"]
    print(f"$ aiodcp {' '.join(args)}")
    result = subprocess.run(
        [sys.executable, "-m", "aiodcp", *args, *common],
        capture_output=True,
        text=True,
        timeout=120,
    )
    print(result.stdout + result.stderr, end="")
    print(f"(exit code {result.returncode})\n")
    if result.returncode != expect:
        raise SystemExit(f"expected exit code {expect}, got {result.returncode}")
    return result.stdout


def main() -> None:
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint_url = f"http://{host}:{port}"
    try:
        s3 = boto3.client("s3", endpoint_url=endpoint_url, region_name="us-east-1")
        s3.create_bucket(Bucket=BUCKET)
        with tempfile.TemporaryDirectory() as tmp:
            dcp.save(state_dict(), storage_writer=dcp.FileSystemWriter(tmp, thread_count=2))
            for path in sorted(Path(tmp).iterdir()):
                s3.upload_file(str(path), BUCKET, f"{PREFIX}/{path.name}")
        url = f"s3://{BUCKET}/{PREFIX}"
        print(f"saved a small model with dcp.save and uploaded it to {url}\n")

        aiodcp_cli("inspect", url, endpoint_url=endpoint_url)
        # model.2's weight and bias lie in one file with model.1.bias between them. With
        # --max-gap-size 0 that gap is skipped (two GETs); with the default 32 MiB one GET
        # covers all three and the gap is downloaded and dropped.
        aiodcp_cli(
            "plan", url, "--keys", "model.0", "model.2", "--max-gap-size", "0",
            endpoint_url=endpoint_url,
        )  # fmt: skip
        print("OK: the walkthrough ran both commands")
    finally:
        server.stop()


if __name__ == "__main__":
    main()
