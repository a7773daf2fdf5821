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

import boto3
import pytest
import torch
from botocore.config import Config

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
    bucket: str,
    s3_server: S3Server,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Uploaded by a client that sends no checksum: moto keeps none, so neither the files nor
    the ``.metadata`` can be checked."""
    bare = boto3.client(
        "s3",
        endpoint_url=s3_server.endpoint_url,
        region_name="us-east-1",
        config=Config(request_checksum_calculation="when_required"),
    )
    upload_dir(bare, save_checkpoint(_state(), tmp_path / "p"), bucket, "plain")
    result = run(capsys, s3_server.endpoint_url, "verify", f"s3://{bucket}/plain", "--json")
    assert result.code == EXIT_UNVERIFIED
    assert "nothing to check" in result.err and "no full-object checksum" in result.err
    report = result.json()
    assert report["recorded"] is False
    assert report["metadata"] == {"key": "plain/.metadata", "checksum": None}
    assert {f["status"] for f in report["files"]} == {"unverified"}
    assert {f["algorithm"] for f in report["files"]} == {None}


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
    assert "differs from the store's full-object CRC64NVME" in bad[0]["detail"]


@pytest.mark.parametrize("algorithm", ["CRC64NVME", "CRC32", "CRC32C", "SHA256", "SHA1"])
def test_verify_checks_whichever_full_object_checksum_the_store_holds(
    tmp_path: Path,
    s3: Any,
    bucket: str,
    s3_server: S3Server,
    capsys: pytest.CaptureFixture[str],
    algorithm: str,
) -> None:
    """Each file is checked against the checksum its upload carried (moto keeps it: see what
    a HEAD with checksum mode gives), named per file; one damaged read is a mismatch of that
    file, found whatever the algorithm."""
    local = save_checkpoint(_state(), tmp_path / "p", thread_count=2)
    prefix = f"alg-{algorithm.lower()}"
    for path in sorted(local.iterdir()):
        s3.put_object(
            Bucket=bucket,
            Key=f"{prefix}/{path.name}",
            Body=path.read_bytes(),
            ChecksumAlgorithm=algorithm,
        )
    head = s3.head_object(Bucket=bucket, Key=f"{prefix}/.metadata", ChecksumMode="ENABLED")
    assert head[f"Checksum{algorithm}"]  # what moto returns: the checksum the PUT sent
    url = f"s3://{bucket}/{prefix}"
    result = run(capsys, s3_server.endpoint_url, "verify", url, "--json")
    assert result.code == EXIT_OK, result.err
    report = result.json()
    assert report["metadata"] == {"key": f"{prefix}/.metadata", "checksum": algorithm}
    assert {(f["status"], f["algorithm"]) for f in report["files"]} == {("ok", algorithm)}
    text = run(capsys, s3_server.endpoint_url, "verify", url)
    assert f".metadata: checked against the store's full-object {algorithm}" in text.out
    path, offset, length, _ = next(s for s in stored(local) if s[3] == "model.w1")
    at = offset + length // 3
    with FaultProxy(s3_server.endpoint_url) as proxy:
        proxy.add(Fault.flip(at), path_suffix=path, predicate=lambda r: r.covers(at))
        result = run(capsys, proxy.endpoint_url, "verify", url, "--json")
    assert result.code == EXIT_MISMATCH
    bad = [f for f in result.json()["files"] if f["status"] != "ok"]
    assert [(f["path"], f["status"], f["algorithm"]) for f in bad] == [
        (path, "mismatch", algorithm)
    ]
    assert f"{algorithm} differs from the store's full-object {algorithm}" in bad[0]["detail"]


def test_verify_says_a_composite_checksum_cannot_be_checked(
    tmp_path: Path,
    s3: Any,
    bucket: str,
    s3_server: S3Server,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A file uploaded in parts with a COMPOSITE CRC32 (moto answers ``...-2`` and the type)
    cannot be checked; the others are, and the exit code says something was left unchecked."""
    g = torch.Generator().manual_seed(4)
    local = save_checkpoint(
        {"big": torch.randn(1536, 1024, generator=g), "s": torch.ones(8)},
        tmp_path / "c",
        thread_count=2,
    )
    files = sorted(p for p in local.iterdir() if p.suffix == ".distcp")
    (large,) = [p for p in files if p.stat().st_size > 5 * MIB]
    for path in sorted(local.iterdir()):
        key = f"comp/{path.name}"
        if path != large:
            s3.put_object(Bucket=bucket, Key=key, Body=path.read_bytes(), ChecksumAlgorithm="CRC32")
            continue
        data = path.read_bytes()
        upload = s3.create_multipart_upload(
            Bucket=bucket, Key=key, ChecksumAlgorithm="CRC32", ChecksumType="COMPOSITE"
        )
        parts = []
        for number, start in enumerate(range(0, len(data), 5 * MIB), 1):
            reply = s3.upload_part(
                Bucket=bucket,
                Key=key,
                UploadId=upload["UploadId"],
                PartNumber=number,
                Body=data[start : start + 5 * MIB],
                ChecksumAlgorithm="CRC32",
            )
            parts.append(
                {
                    "ETag": reply["ETag"],
                    "PartNumber": number,
                    "ChecksumCRC32": reply["ChecksumCRC32"],
                }
            )
        s3.complete_multipart_upload(
            Bucket=bucket, Key=key, UploadId=upload["UploadId"], MultipartUpload={"Parts": parts}
        )
    head = s3.head_object(Bucket=bucket, Key=f"comp/{large.name}", ChecksumMode="ENABLED")
    assert head["ChecksumType"] == "COMPOSITE", head  # what moto returns
    result = run(capsys, s3_server.endpoint_url, "verify", f"s3://{bucket}/comp", "--json")
    assert result.code == EXIT_UNVERIFIED, result.err
    by_path = {f["path"]: f for f in result.json()["files"]}
    assert by_path[large.name]["status"] == "unverified"
    assert by_path[large.name]["algorithm"] is None
    assert "cannot check" in by_path[large.name]["detail"]
    assert "composite CRC32" in by_path[large.name]["detail"]
    others = [f for name, f in by_path.items() if name != large.name]
    assert others and all(f["status"] == "ok" and f["algorithm"] == "CRC32" for f in others)
    text = run(capsys, s3_server.endpoint_url, "verify", f"s3://{bucket}/comp")
    assert f"{large.name}: cannot check" in text.out


def test_verify_checks_the_metadata_itself(
    ckpt: tuple[str, Path, str], s3_server: S3Server, capsys: pytest.CaptureFixture[str]
) -> None:
    """The ``.metadata`` is checked against the store's checksum before it is unpickled (here
    the CRC32 boto3 sends with an upload by default); damaged on every read, ``verify`` stops
    with the mismatch code and names it."""
    url, local, _ = ckpt
    report = run(capsys, s3_server.endpoint_url, "verify", url, "--json").json()
    assert report["metadata"] == {"key": "runs/ck/.metadata", "checksum": "CRC32"}
    size = (local / ".metadata").stat().st_size
    with FaultProxy(s3_server.endpoint_url) as proxy:
        proxy.add(Fault.flip(size // 2), path_suffix=".metadata")
        result = run(capsys, proxy.endpoint_url, "verify", url, "--json")
        assert len([r for r in proxy.requests if r.path.endswith(".metadata")]) == 2
    assert result.code == EXIT_MISMATCH
    assert "runs/ck/.metadata: its bytes do not match the full-object CRC32" in result.err
    assert result.out == ""
