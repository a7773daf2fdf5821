"""Notebook-style prefetch: start pulling a checkpoint, build the model meanwhile, then load.

Each "# %%" block is a notebook cell (VS Code / Jupytext run them as cells). As a script it
runs end to end against an embedded local S3 server (moto on 127.0.0.1), no AWS account:

    python examples/prefetch_notebook.py
"""

# %% Setup: a local S3 server with a checkpoint in it (in real life: your bucket).
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

os.environ.setdefault("AWS_ACCESS_KEY_ID", "local")
os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "local")
os.environ["AWS_EC2_METADATA_DISABLED"] = "true"
logging.getLogger("werkzeug").setLevel(logging.ERROR)
warnings.filterwarnings("ignore", message="torch.distributed is disabled")

server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
server.start()
ENDPOINT = "http://{}:{}".format(*server.get_host_and_port())
OPTIONS = {"endpoint_url": ENDPOINT, "region": "us-east-1", "addressing_style": "path"}


def make_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(*(torch.nn.Linear(256, 256) for _ in range(8)))


trained = make_model()
s3 = boto3.client("s3", endpoint_url=ENDPOINT, region_name="us-east-1")
s3.create_bucket(Bucket="notebook")
with tempfile.TemporaryDirectory() as tmp:
    dcp.save({"model": trained.state_dict(), "step": 500}, checkpoint_id=tmp)
    for path in Path(tmp).iterdir():
        s3.upload_file(str(path), "notebook", f"run-7/step-500/{path.name}")
URL = "s3://notebook/run-7/step-500"

# %% Cell 1: start the download now; it returns at once and shows a progress bar.
handle = aiodcp.prefetch(URL, keys=["model"], **OPTIONS)
print(handle)

# %% Cell 2: build the model while the bytes stream in (here: pretend it takes a while).
model = torch.nn.Sequential(*(torch.nn.Linear(256, 256) for _ in range(8)))
time.sleep(0.2)

# %% Cell 3: load. Only what the prefetch does not hold is fetched ("step" here).
state = {"model": model.state_dict(), "step": 0}
stats = handle.load(state)
print(f"load after prefetch: {stats}")
print(f"prefetch itself:     {handle.stats}")
assert state["step"] == 500
for name, tensor in trained.state_dict().items():
    assert torch.equal(model.state_dict()[name], tensor), name


# %% Cell 4: the same from async code (a notebook cell can `await` directly).
async def fetch_and_load() -> aiodcp.LoadStats:
    handle = aiodcp.prefetch(URL, progress=False, **OPTIONS)
    fresh = make_model()
    for p in fresh.parameters():
        p.data.zero_()
    state = {"model": fresh.state_dict(), "step": 0}
    await handle  # wait for the whole download
    stats = await handle.aload(state)
    assert all(torch.equal(fresh.state_dict()[k], v) for k, v in trained.state_dict().items())
    return stats


stats = asyncio.run(fetch_and_load())
print(f"aload after await handle: {stats.requests} requests")  # 0: everything was prefetched
assert stats.requests == 0
handle.close()
server.stop()
print("OK: prefetched loads match the trained model")
