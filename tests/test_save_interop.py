"""Checkpoints saved by aiodcp load with s3torchconnector 1.5's DCP reader, and checkpoints
saved by its S3StorageWriter load with aiodcp: run in the benchmarks' virtualenv, which has
s3torchconnector (``AIODCP_BENCH_PYTHON``, default ``benchmarks/.venv-bench/bin/python``;
skipped when it is not there)."""

from __future__ import annotations

import os
import subprocess
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed.checkpoint as dcp

import aiodcp

from conftest import S3Server, assert_same

HERE = Path(__file__).parent
BENCH_PYTHON = Path(
    os.environ.get("AIODCP_BENCH_PYTHON", HERE.parent / "benchmarks/.venv-bench/bin/python")
)
pytestmark = pytest.mark.skipif(
    not BENCH_PYTHON.exists(), reason=f"no s3torchconnector virtualenv at {BENCH_PYTHON}"
)


def reference_state() -> dict[str, Any]:
    g = torch.Generator().manual_seed(77)
    return {
        "w": torch.randn(1024, 1536, generator=g),  # 6 MiB: a multipart upload with aiodcp
        "b": torch.randn(3000, generator=g).bfloat16(),
        "ids": torch.arange(100, dtype=torch.int64),
        "step": 9,
    }


def bench(mode: str, endpoint: str, url: str, expected: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    result = subprocess.run(
        [str(BENCH_PYTHON), str(HERE / "s3tc_interop.py"), mode, endpoint, url, str(expected)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0 and result.stdout.strip().endswith("OK"), result.stderr[-3000:]


def test_s3torchconnector_loads_what_aiodcp_saved(
    s3_server: S3Server, bucket: str, reader_kwargs: dict[str, Any], tmp_path: Path
) -> None:
    state = reference_state()
    torch.save(state, tmp_path / "expected.pt")
    url = f"s3://{bucket}/ours"
    with aiodcp.S3StorageWriter(url, **reader_kwargs) as writer, warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        dcp.save(state, storage_writer=writer)
    bench("read", s3_server.endpoint_url, url, tmp_path / "expected.pt")


def test_aiodcp_loads_what_s3torchconnector_saved(
    s3_server: S3Server, bucket: str, reader_kwargs: dict[str, Any], tmp_path: Path
) -> None:
    state = reference_state()
    torch.save(state, tmp_path / "expected.pt")
    url = f"s3://{bucket}/theirs"
    bench("write", s3_server.endpoint_url, url, tmp_path / "expected.pt")
    out = {
        k: torch.zeros_like(v) if isinstance(v, torch.Tensor) else None for k, v in state.items()
    }
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        dcp.load(out, storage_reader=aiodcp.S3StorageReader(url, **reader_kwargs))
    assert_same(out, state)
