"""Valid ``torch.save`` archives laid out otherwise than torch writes them, for tests: what
``torch.load`` reads as the tensor, but the local headers alone misdescribe."""

from __future__ import annotations

import io
import pickle
import struct
import zipfile
import zlib
from pathlib import Path

import torch


def _zip(records: list[tuple[str, bytes]], directory: list[int] | None = None) -> bytes:
    """A STORED zip of ``records`` (sizes in the local headers); its central directory lists
    the records at the indexes in ``directory`` (default: all, in order)."""
    out = bytearray()
    local: list[tuple[int, bytes, int, int]] = []
    for name, data in records:
        raw, crc = name.encode(), zlib.crc32(data)
        local.append((len(out), raw, crc, len(data)))
        out += struct.pack(
            "<IHHHHHIIIHH", 0x04034B50, 20, 0, 0, 0, 0, crc, len(data), len(data), len(raw), 0
        )
        out += raw + data
    start = len(out)
    listed = list(range(len(records))) if directory is None else directory
    for i in listed:
        offset, raw, crc, size = local[i]
        out += struct.pack(
            "<IHHHHHHIIIHHHHHII",
            *(0x02014B50, 20, 20, 0, 0, 0, 0, crc, size, size, len(raw)),
            *(0, 0, 0, 0, 0, offset),
        )
        out += raw
    count, size = len(listed), len(out) - start
    out += struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, count, count, size, start, 0)
    return bytes(out)


def _records(tensor: torch.Tensor) -> dict[str, bytes]:
    saved = io.BytesIO()
    torch.save(tensor, saved)
    archive = zipfile.ZipFile(io.BytesIO(saved.getvalue()))
    return {i.filename: archive.read(i) for i in archive.infolist()}


def oddities(tensor: torch.Tensor) -> dict[str, bytes]:
    """Archives ``torch.load`` reads as ``tensor`` but the local headers alone misdescribe."""
    r = _records(tensor)
    names = ["archive/data.pkl", "archive/byteorder", "archive/data/0", "archive/version"]
    decoy = bytes(len(r["archive/data/0"]))
    return {
        # data.pkl after the storage: locate refuses, the item is fetched again
        "reordered": _zip([(n, r[n]) for n in reversed(names)]),
        # a first data/0 the directory does not list: locate finds it, verify refuses it
        "decoy": _zip(
            [
                (names[0], r[names[0]]),
                (names[1], r[names[1]]),
                (names[2], decoy),
                (names[2], r[names[2]]),
                (names[3], r[names[3]]),
            ],
            directory=[0, 1, 3, 4],
        ),
    }


def replace_items(local: Path, odd: dict[str, str]) -> dict[str, bytes]:
    """In the saved checkpoint at ``local``, replace the item of each fqn in ``odd`` by that
    odd archive (``oddities``) of its saved tensor, appended to its data file with the
    metadata pointing at it (the old item stays, unread). Returns the archives by fqn, each
    checked to load with ``torch.load`` as the saved tensor."""
    with open(local / ".metadata", "rb") as f:
        metadata = pickle.load(f)
    written = {}
    for index, info in list(metadata.storage_data.items()):
        if index.fqn in odd:
            path = local / info.relative_path
            with open(path, "rb") as f:
                f.seek(info.offset)
                tensor = torch.load(io.BytesIO(f.read(info.length)), weights_only=True)
            blob = oddities(tensor)[odd[index.fqn]]
            if not torch.equal(torch.load(io.BytesIO(blob), weights_only=True), tensor):
                raise AssertionError(f"the {odd[index.fqn]} archive of {index.fqn} is not it")
            offset = path.stat().st_size
            with open(path, "ab") as f:
                f.write(blob)
            metadata.storage_data[index] = type(info)(info.relative_path, offset, len(blob))
            written[index.fqn] = blob
    with open(local / ".metadata", "wb") as f:
        pickle.dump(metadata, f)
    return written
