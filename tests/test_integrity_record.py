"""The integrity record: CRC64NVME through awscrt, its place in .metadata, and that stock readers
(torch's FileSystemReader) load a checkpoint that carries one as if it were not there."""

from __future__ import annotations

import pickle
import zlib
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp

from aiodcp import CheckpointFormatError
from aiodcp._checksum import combine, crc64nvme, from_header, to_header
from aiodcp.dcp._integrity import ATTRIBUTE, FileRecord, Integrity, ItemBlocks, block_count
from aiodcp.dcp._metadata import load_metadata

from conftest import assert_same


def test_crc64nvme_check_value_and_running_form() -> None:
    # The CRC-64/NVME check value (the CRC of b"123456789"), as the catalogue of CRCs lists it.
    assert crc64nvme(b"123456789") == 0xAE8B14860A799888
    data = bytes(range(256)) * 1000
    assert crc64nvme(data[1000:], crc64nvme(data[:1000])) == crc64nvme(data)
    assert combine(crc64nvme(data[:777]), crc64nvme(data[777:]), len(data) - 777) == crc64nvme(data)
    assert combine(crc64nvme(data), crc64nvme(b""), 0) == crc64nvme(data)
    # Any buffer: a tensor's bytes through a memoryview of its numpy view.
    t = torch.arange(1000, dtype=torch.float32)
    assert crc64nvme(t.numpy()) == crc64nvme(t.numpy().tobytes())
    assert crc64nvme(b"a") != crc64nvme(b"b")
    assert crc64nvme(data) != zlib.crc32(data)


def test_header_form_round_trips_and_refuses_garbage() -> None:
    crc = crc64nvme(b"123456789")
    assert to_header(crc) == "rosUhgp5mIg="
    assert from_header(to_header(crc)) == crc
    for bad in ("", "not base64!", "AAAA"):
        with pytest.raises(ValueError):
            from_header(bad)


def record() -> Integrity:
    return Integrity(
        block_bytes=4096,
        files={"__0_0.distcp": FileRecord('"abc"', 10_000, 7)},
        items={
            ("__0_0.distcp", 0, 5000): ItemBlocks(0, (1, 2)),
            ("__0_0.distcp", 5000, 4096): ItemBlocks(0, (3,)),
            ("__0_0.distcp", 9096, 0): ItemBlocks(0, (0,)),
            # storage bytes at 900: block 0 is [0, 900), then 4096-byte blocks from 900
            ("__0_1.distcp", 0, 9000): ItemBlocks(900, (4, 5, 6)),
            ("__0_1.distcp", 9000, 5000): ItemBlocks(904, (7, 8)),
        },
    )


def test_plain_form_round_trips() -> None:
    rec = record()
    again = Integrity.from_plain(pickle.loads(pickle.dumps(rec.to_plain())), "s3://b/k")
    assert again == rec
    assert again.item("__0_0.distcp", 0, 5000) == ItemBlocks(0, (1, 2))
    assert again.item("__0_1.distcp", 0, 9000) == ItemBlocks(900, (4, 5, 6))
    assert again.item("__0_0.distcp", 1, 5000) is None
    assert block_count(5000, 4096) == 2 and block_count(0, 4096) == 1
    # block 0 (the framing), then whole blocks from the storage bytes, the last one short
    assert block_count(9000, 4096, 900) == 3 and block_count(5000, 4096, 904) == 2
    assert block_count(900 + 8192 + 1, 4096, 900) == 4
    check = again.check("__0_1.distcp", 0, 9000, "s3://b/k")
    assert check.data_start == 900 and check.crcs == (4, 5, 6)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda p: p.update(version=2), "version 2"),
        (lambda p: p.update(algorithm="CRC32"), "algorithm"),
        (lambda p: p.update(block_bytes=1), "block_bytes"),
        (lambda p: p.update(files=[]), "dicts"),
        (lambda p: p["files"].update(x=("e", -1, 0)), "file entry"),
        (lambda p: p["items"].update(x=((0, 10, 0, b"\0" * 16),)), "expected 1"),
        (lambda p: p["items"].update(x=((0, 10, 4, b"\0" * 8),)), "expected 2"),
        (lambda p: p["items"].update(x=((0, 10, 10, b"\0" * 16),)), "past its end"),
        (lambda p: p["items"].update(x=((0, "10", 0, b""),)), "item entry"),
        (lambda p: p["items"].update(x=((0, 10, b"\0" * 8),)), "item entry"),  # no data_start
    ],
)
def test_malformed_records_are_refused_by_field(change, message) -> None:  # type: ignore[no-untyped-def]
    plain = record().to_plain()
    change(plain)
    with pytest.raises(CheckpointFormatError, match=message) as info:
        Integrity.from_plain(plain, "s3://b/ck/.metadata")
    assert "s3://b/ck/.metadata" in str(info.value)


def test_record_in_metadata_is_ignored_by_stock_readers(tmp_path: Path) -> None:
    """A .metadata carrying the record loads through torch's FileSystemReader (plain pickle) and
    aiodcp's restricted unpickler, which finds the record again."""
    sd = {"w": torch.randn(64, 64), "step": 3}
    dcp.save(sd, storage_writer=dcp.FileSystemWriter(str(tmp_path)))
    meta_path = tmp_path / ".metadata"
    metadata = pickle.loads(meta_path.read_bytes())
    rec = record()
    rec.attach(metadata)
    meta_path.write_bytes(pickle.dumps(metadata))

    out = {"w": torch.zeros(64, 64), "step": 0}
    dcp.load(out, storage_reader=dcp.FileSystemReader(str(tmp_path)))
    assert_same(out, sd)
    ours = load_metadata(meta_path.read_bytes(), str(meta_path))
    assert getattr(ours, ATTRIBUTE) == rec.to_plain()
    assert Integrity.of(ours, str(meta_path)) == rec
    plain_metadata = pickle.loads(pickle.dumps(metadata))
    delattr(plain_metadata, ATTRIBUTE)
    assert Integrity.of(plain_metadata, "x") is None
