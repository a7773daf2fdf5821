"""Which process group a load shares over, and LoadStats saying whether it did and why not.

The multi-rank cases (the group from the caller, torch's load frame lost) run on gloo in
tests/test_sharing.py; these are the single-process facts, and the pin on torch's private frame.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp

import aiodcp

from conftest import upload_dir


def test_torchs_load_frame_is_where_aiodcp_finds_the_group(tmp_path: Path) -> None:
    """aiodcp shares a multi-rank dcp.load over the group torch's ``_load_state_dict`` frame
    holds (``distW``) when the caller names none. That is a private name: this test fails on
    any torch of the supported range (pyproject: torch>=2.13) that no longer has it, before a
    release ships sharing turned off (the reader would then warn and say so in LoadStats)."""
    from torch.distributed.checkpoint.filesystem import FileSystemReader

    from aiodcp.dcp import _sharing

    found: list[Any] = []

    class Probe(FileSystemReader):
        def read_metadata(self, *args: Any, **kwargs: Any) -> Any:
            found.append(_sharing._load_frame_wrapper())
            return super().read_metadata(*args, **kwargs)

    sd = {"w": torch.arange(10.0)}
    dcp.save(sd, storage_writer=dcp.FileSystemWriter(str(tmp_path)))
    dcp.load({"w": torch.zeros(10)}, storage_reader=Probe(str(tmp_path)))
    assert found, "read_metadata was not called"
    wrapper = found[0]
    assert wrapper is not _sharing._NOT_FOUND, f"torch {torch.__version__}: frame not found"
    assert hasattr(wrapper, "use_dist") and hasattr(wrapper, "group")
    assert wrapper.use_dist is False  # a single process: dcp.load ran without collectives


def test_a_single_process_load_says_it_did_not_share(
    tmp_path: Path, s3: Any, bucket: str, reader_kwargs: dict[str, Any]
) -> None:
    sd = {"w": torch.arange(10.0)}
    dcp.save(sd, storage_writer=dcp.FileSystemWriter(str(tmp_path / "ck")))
    upload_dir(s3, tmp_path / "ck", bucket, "ck")
    with aiodcp.S3StorageReader(f"s3://{bucket}/ck", **reader_kwargs) as reader:
        dcp.load({"w": torch.zeros(10)}, storage_reader=reader)
        assert reader.stats is not None
        assert reader.stats.sharing == "off: a single process (no process group)"
    off = {**reader_kwargs, "share_across_ranks": False}
    with aiodcp.S3StorageReader(f"s3://{bucket}/ck", **off) as reader:
        dcp.load({"w": torch.zeros(10)}, storage_reader=reader)
        assert reader.stats is not None
        assert reader.stats.sharing == "off: share_across_ranks=False"
