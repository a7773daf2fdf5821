"""``aiodcp inspect`` shows what a checkpoint records for integrity; ``aiodcp verify`` reads every
stored byte and checks it against that record, naming what does not match.

Checkpoints are saved by torch's FileSystemWriter and uploaded with their record
(``recorded.upload_with_record``) to moto's server; damage is a byte flipped on the wire by the
fault proxy (the stored object keeps its ETag), a data file replaced or deleted in the store.
"""

from __future__ import annotations

import json
import pickle
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

from aiodcp._checksum import crc64nvme, to_header
from aiodcp._cli import EXIT_CORRUPT, EXIT_MISMATCH, EXIT_OK, EXIT_UNVERIFIED, main

from conftest import S3Server, save_checkpoint, upload_dir
from faultproxy import Fault, FaultProxy
from recorded import data_start_of, upload_with_record

MIB = 1024 * 1024


def _state() -> dict[str, Any]:
    g = torch.Generator().manual_seed(9)
    return {
        "model": {
            "w1": torch.randn(768, 1024, generator=g),  # 3 MiB: three blocks and a bit
            "w2": torch.randn(256, 256, generator=g),
            "b": torch.randn(256, generator=g),
        },
        "step": 12,
    }


@dataclass
class Result:
    code: int
    out: str
    err: str

    def json(self) -> Any:
        return json.loads(self.out)


@pytest.fixture
def ckpt(tmp_path: Path, s3: Any, bucket: str) -> tuple[str, Path, str]:
    local = save_checkpoint(_state(), tmp_path / "ck", thread_count=2)
    upload_with_record(s3, local, bucket, "runs/ck")
    return f"s3://{bucket}/runs/ck", local, bucket


def run(capsys: pytest.CaptureFixture[str], endpoint: str, *argv: str) -> Result:
    code = main([*argv, "--endpoint-url", endpoint, "--addressing-style", "path"])
    captured = capsys.readouterr()
    return Result(code, captured.out, captured.err)


def stored(local: Path) -> list[tuple[str, int, int, str]]:
    metadata = pickle.loads((local / ".metadata").read_bytes())
    return sorted(
        (i.relative_path, i.offset, i.length, k.fqn) for k, i in metadata.storage_data.items()
    )


def test_inspect_shows_the_record(
    ckpt: tuple[str, Path, str], s3: Any, s3_server: S3Server, capsys: pytest.CaptureFixture[str]
) -> None:
    url, local, bucket = ckpt
    report = run(capsys, s3_server.endpoint_url, "inspect", url, "--json").json()
    integrity = report["integrity"]
    assert integrity["algorithm"] == "CRC64NVME" and integrity["block_bytes"] == MIB
    files = sorted({p for p, *_ in stored(local)})
    assert len(files) == 2
    assert [f["path"] for f in integrity["files"]] == files
    for f in integrity["files"]:
        data = (local / f["path"]).read_bytes()
        assert f["size"] == len(data)
        assert f["crc64nvme"] == to_header(crc64nvme(data))
        assert f["etag"] == s3.head_object(Bucket=bucket, Key=f"runs/ck/{f['path']}")["ETag"]
    assert integrity["items_recorded"] == len(stored(local))
    tensors = [
        s for s in stored(local) if data_start_of((local / s[0]).read_bytes()[s[1] : s[1] + s[2]])
    ]
    assert integrity["items_aligned"] == len(tensors) > 0
    assert integrity["complete"] is True
    text = run(capsys, s3_server.endpoint_url, "inspect", url)
    assert text.code == EXIT_OK
    assert f"integrity: CRC64NVME of each 1.0 MiB block of {len(stored(local))} of " in text.out
    assert integrity["files"][0]["crc64nvme"] in text.out  # the files table shows them


def test_inspect_without_a_record(
    tmp_path: Path,
    s3: Any,
    bucket: str,
    s3_server: S3Server,
    capsys: pytest.CaptureFixture[str],
) -> None:
    upload_dir(s3, save_checkpoint(_state(), tmp_path / "p"), bucket, "plain")
    url = f"s3://{bucket}/plain"
    assert run(capsys, s3_server.endpoint_url, "inspect", url, "--json").json()["integrity"] is None
    assert "integrity: nothing recorded" in run(capsys, s3_server.endpoint_url, "inspect", url).out


def test_verify_a_sound_checkpoint(
    ckpt: tuple[str, Path, str], s3_server: S3Server, capsys: pytest.CaptureFixture[str]
) -> None:
    url, local, _ = ckpt
    result = run(capsys, s3_server.endpoint_url, "verify", url, "--json")
    assert result.code == EXIT_OK, result.err
    assert result.err == ""
    report = result.json()
    assert report["schema"] == "aiodcp.verify/1" and report["ok"] is True
    assert report["recorded"] is True
    sizes = {p.name: p.stat().st_size for p in local.iterdir() if p.name != ".metadata"}
    assert {f["path"]: f["checked_bytes"] for f in report["files"]} == sizes
    assert all(f["status"] == "ok" and f["whole_crc_matches"] for f in report["files"])
    assert report["summary"]["checked_bytes"] == sum(sizes.values())
    text = run(capsys, s3_server.endpoint_url, "verify", url)
    assert text.code == EXIT_OK
    assert "result: every stored byte matches" in text.out


def test_verify_names_the_item_and_block_that_differ(
    ckpt: tuple[str, Path, str], s3_server: S3Server, capsys: pytest.CaptureFixture[str]
) -> None:
    url, local, _ = ckpt
    path, offset, length, fqn = next(s for s in stored(local) if s[3] == "model.w1")
    data_start = data_start_of((local / path).read_bytes()[offset : offset + length])
    block = offset + data_start + 2 * MIB  # the third MiB of its storage bytes
    at = block + 5
    with FaultProxy(s3_server.endpoint_url) as proxy:
        proxy.add(Fault.flip(at), path_suffix=path, predicate=lambda r: r.covers(at))
        result = run(capsys, proxy.endpoint_url, "verify", url, "--json")
        text = run(capsys, proxy.endpoint_url, "verify", url)
    assert result.code == EXIT_MISMATCH
    assert path in result.err and "mismatch" in result.err
    report = result.json()
    bad = [f for f in report["files"] if f["status"] != "ok"]
    assert [f["path"] for f in bad] == [path]
    (mismatch,) = bad[0]["mismatches"]
    assert (mismatch["start"], mismatch["end"]) == (offset, offset + length)
    assert mismatch["keys"] == [fqn]
    assert mismatch["blocks"] == [[block, block + MIB]]
    assert bad[0]["whole_crc_matches"] is False
    assert report["ok"] is False and report["summary"]["mismatch"] == 1
    assert text.code == EXIT_MISMATCH
    assert f"stored item [{offset}, {offset + length}) of '{fqn}': 1 block differ" in text.out


def test_verify_reports_replaced_and_missing_files(
    ckpt: tuple[str, Path, str],
    s3: Any,
    s3_server: S3Server,
    capsys: pytest.CaptureFixture[str],
) -> None:
    url, local, bucket = ckpt
    first, second = sorted({p for p, *_ in stored(local)})
    data = (local / first).read_bytes()
    s3.put_object(Bucket=bucket, Key=f"runs/ck/{first}", Body=data)  # same bytes, new upload
    s3.delete_object(Bucket=bucket, Key=f"runs/ck/{second}")
    result = run(capsys, s3_server.endpoint_url, "verify", url, "--json")
    assert result.code == EXIT_MISMATCH
    by_path = {f["path"]: f for f in result.json()["files"]}
    # moto's ETag is the MD5 of the bytes: the same bytes uploaded again keep it. So the
    # replaced file still matches its record, as it should (its bytes are the saved ones).
    assert by_path[first]["status"] == "ok"
    assert by_path[second]["status"] == "missing"
    assert "does not exist" in by_path[second]["detail"]
    s3.put_object(Bucket=bucket, Key=f"runs/ck/{first}", Body=data[:-1] + bytes([data[-1] ^ 1]))
    result = run(capsys, s3_server.endpoint_url, "verify", url, "--json")
    by_path = {f["path"]: f for f in result.json()["files"]}
    assert by_path[first]["status"] == "changed"
    assert "not the version this checkpoint's metadata describes" in by_path[first]["detail"]


def test_verify_without_a_record_checks_nothing_and_says_so(
    tmp_path: Path,
    s3: Any,
    bucket: str,
    s3_server: S3Server,
    capsys: pytest.CaptureFixture[str],
) -> None:
    upload_dir(s3, save_checkpoint(_state(), tmp_path / "p"), bucket, "plain")
    result = run(capsys, s3_server.endpoint_url, "verify", f"s3://{bucket}/plain", "--json")
    assert result.code == EXIT_UNVERIFIED
    assert "nothing to check" in result.err and "no full-object CRC64NVME" in result.err
    report = result.json()
    assert report["recorded"] is False
    assert {f["status"] for f in report["files"]} == {"unverified"}


def test_verify_refuses_a_malformed_record(
    tmp_path: Path, s3: Any, s3_server: S3Server, capsys: pytest.CaptureFixture[str]
) -> None:
    bucket = f"cli-{uuid.uuid4().hex[:12]}"
    s3.create_bucket(Bucket=bucket)
    local = save_checkpoint(_state(), tmp_path / "m")
    upload_with_record(s3, local, bucket, "m", change=lambda p: p.update(block_bytes=7))
    for command in ("verify", "inspect"):
        result = run(capsys, s3_server.endpoint_url, command, f"s3://{bucket}/m")
        assert result.code == EXIT_CORRUPT, (command, result)
        assert "integrity record" in result.err and "block_bytes 7" in result.err


def test_verify_without_a_record_checks_files_against_the_stores_checksum(
    tmp_path: Path,
    s3: Any,
    bucket: str,
    s3_server: S3Server,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A checkpoint saved by others whose objects carry a CRC64NVME (S3 gives them one): each
    file is read whole and checked against it; a damaged read is a mismatch of that file."""
    local = save_checkpoint(_state(), tmp_path / "p", thread_count=2)
    for path in sorted(local.iterdir()):
        s3.put_object(
            Bucket=bucket,
            Key=f"others/{path.name}",
            Body=path.read_bytes(),
            ChecksumAlgorithm="CRC64NVME",
        )
    url = f"s3://{bucket}/others"
    result = run(capsys, s3_server.endpoint_url, "verify", url, "--json")
    assert result.code == EXIT_OK, result.err
    report = result.json()
    assert report["recorded"] is False and report["ok"] is True
    assert all(f["status"] == "ok" and f["whole_crc_matches"] for f in report["files"])
    path, offset, length, _ = next(s for s in stored(local) if s[3] == "model.w1")
    at = offset + length // 2
    with FaultProxy(s3_server.endpoint_url) as proxy:
        proxy.add(Fault.flip(at), path_suffix=path, predicate=lambda r: r.covers(at))
        result = run(capsys, proxy.endpoint_url, "verify", url, "--json")
    assert result.code == EXIT_MISMATCH
    bad = [f for f in result.json()["files"] if f["status"] != "ok"]
    assert [(f["path"], f["status"]) for f in bad] == [(path, "mismatch")]
    assert "full-object checksum" in bad[0]["detail"]
