"""s3torchconnector 1.5's DCP reader and writer against a local store, run by
tests/test_save_interop.py in the benchmarks' virtualenv (which has s3torchconnector).

``python s3tc_interop.py read ENDPOINT URL EXPECTED``: load the checkpoint at URL with
s3torchconnector's S3StorageReader (its DCP-optimized reader, and its sequential one) into
zeroed tensors shaped as in the torch.save'd state dict EXPECTED, compare, print ``OK``.
``python s3tc_interop.py write ENDPOINT URL EXPECTED``: save EXPECTED to URL with its
S3StorageWriter (2 threads: 2 files), print ``OK``.
Its DCP classes take no endpoint: their S3FileSystem gets a client that has one (path-style).
"""

from __future__ import annotations

import sys
import warnings
from typing import Any

import torch
import torch.distributed.checkpoint as dcp

REGION = "us-east-1"


def file_system(endpoint: str, constructor: Any = None) -> Any:
    from s3torchconnector import S3ClientConfig
    from s3torchconnector._s3client import S3Client
    from s3torchconnector.dcp.s3_file_system import S3FileSystem

    config = S3ClientConfig(force_path_style=True)
    client = S3Client(REGION, endpoint=endpoint, s3client_config=config)
    return S3FileSystem(REGION, s3_client=client, reader_constructor=constructor), config


def main() -> None:
    mode, endpoint, url, expected_path = sys.argv[1:5]
    warnings.simplefilter("ignore")
    expected = torch.load(expected_path, weights_only=False)
    from s3torchconnector import S3ReaderConstructor
    from s3torchconnector.dcp import S3StorageReader, S3StorageWriter

    if mode == "read":
        for constructor in (S3ReaderConstructor.dcp_optimized(), S3ReaderConstructor.sequential()):
            fs, config = file_system(endpoint, constructor)
            reader = S3StorageReader(
                REGION, url, s3client_config=config, reader_constructor=constructor
            )
            reader.fs = fs
            out = {
                k: torch.zeros_like(v) if isinstance(v, torch.Tensor) else None
                for k, v in expected.items()
            }
            dcp.load(out, storage_reader=reader)
            for key, value in expected.items():
                if isinstance(value, torch.Tensor):
                    assert torch.equal(out[key], value), key
                else:
                    assert out[key] == value, key
    elif mode == "write":
        fs, config = file_system(endpoint)
        writer = S3StorageWriter(REGION, url, s3client_config=config, thread_count=2)
        writer.fs = fs
        writer.path = fs.init_path(url)
        dcp.save(expected, storage_writer=writer)
    else:
        raise SystemExit(f"unknown mode {mode}")
    print("OK")  # noqa: T201


if __name__ == "__main__":
    main()
