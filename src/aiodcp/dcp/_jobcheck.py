"""Data files that a shared load's ranks read whole between them, checked against the store's
full-object checksum (a checkpoint without an integrity record).

In a shared multi-rank load (``_sharing``) each byte range is fetched by one rank and sent to
the others, so no rank reads a data file whole, and no rank alone can check it against the
checksum the store keeps for the object. The job can: the coordinator HEADs each file the job
reads whole once, each rank takes the CRC of every range of it that it fetches (in the store's
algorithm), and the load's last exchange round (``Exchange.status``) carries the CRCs to every
rank, which combines them and compares, before its load returns. Nothing is fetched twice; no
rank sends a request of its own for it.

Data flow::

    whole_candidates(items, ranks_of, sliced, known)     coordinator, pure
        -> per data file two or more ranks read, none of whose items the ranks slice apart,
           whose stored items the job reads tile [len(header), end): its end and its items
    CheckedFile(number, algorithm, size, expected, etag, known, known_crc)
        after the coordinator's HEAD (``_engine.ask_checksum``), one per file that answered
        with a full-object checksum of the right size; in ``RankShare.checked`` of each rank
        that reads the file (``number``: the file's index in the checkpoint's sorted data
        files, the same on every rank), with ``RankShare.check_slots`` (the same on every rank)
    encode(checked, ranges, used, slots)                  each rank, at the end of its load
        -> its row: the CRCs of the ranges it fetched (adjacent ones combined), each file's
           expected checksum, and the bytes of each file it handed to torch (fetched or
           received from a peer), in exactly ``slots * WIDTH`` ints
    verdicts(rows)                                        every rank, from every rank's row
        -> per file: "verified" (the ranges tile [0, size) once, and combine into the store's
           checksum), "unverified" (they do not: an item fetched again for torch.load, or a
           row too short), or "mismatch"; and per rank the bytes it used of each file

Invariants: every rank computes the same verdicts from the same rows. A file is "verified"
only if every one of its bytes is in exactly one range whose CRC was taken from the bytes a
rank fetched (and handed over, or sent); a range that is missing or overlaps another leaves it
"unverified", never "verified". The rows are ``int64``: a CRC64 travels as its two's
complement.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import NamedTuple

from .._verify import ALGORITHMS
from ._sharing import StoredItem

__all__ = [
    "WIDTH",
    "CheckedFile",
    "Verdict",
    "encode",
    "merged",
    "verdicts",
    "whole_candidates",
]

WIDTH = 5
"""Ints per entry of a rank's row: (kind, file number, three values)."""

_RANGE, _EXPECTED, _USED = 1, 2, 3
_ALGORITHM_CODES = {name: n for n, name in enumerate(ALGORITHMS)}
_ALGORITHM_NAMES = dict(enumerate(ALGORITHMS))
_SIGN = 1 << 63
_MOD = 1 << 64


class CheckedFile(NamedTuple):
    """A data file the job reads whole between its ranks, and the store's checksum of it."""

    number: int
    """The file's index in the checkpoint's data files, sorted by relative path."""
    algorithm: str
    expected: int
    size: int
    etag: str | None
    """The version the HEAD described: every GET of the file is pinned to it."""
    known: int = 0
    """Bytes at the file's start the load holds already (a safetensors header)."""
    known_crc: int = 0
    """Their CRC, in ``algorithm``."""


class Verdict(NamedTuple):
    """What the job found for one checked file."""

    status: str
    """``"verified"``, ``"unverified"`` or ``"mismatch"``."""
    algorithm: str
    size: int
    ranges: tuple[tuple[int, int, int], ...] = ()
    """(rank, start, end) of every range a rank fetched, in file order."""
    why: str = ""


def whole_candidates(
    items: Sequence[StoredItem],
    ranks_of: Sequence[Sequence[int]],
    sliced: Iterable[StoredItem],
    known: Mapping[str, int],
) -> dict[str, int]:
    """Each data file (relative path -> its end) whose stored items ``items`` (each read by
    the ranks ``ranks_of[i]``) tile ``[known.get(path, 0), end)``, that two or more ranks read
    (a file one rank reads alone is that rank's own, checked by its load), and none of whose
    items is in ``sliced`` (ranks fetch parts of those, heads and tails more than once)."""
    per_file: dict[str, list[StoredItem]] = {}
    readers: dict[str, set[int]] = {}
    for item, ranks in zip(items, ranks_of, strict=True):
        per_file.setdefault(item.path, []).append(item)
        readers.setdefault(item.path, set()).update(ranks)
    out_of_reach = {item.path for item in sliced}
    candidates: dict[str, int] = {}
    for path, stored in per_file.items():
        if len(readers[path]) < 2 or path in out_of_reach:
            continue
        at = known.get(path, 0)
        for item in sorted(stored):
            if item.start != at:
                break
            at = item.end
        else:
            candidates[path] = at
    return candidates


def merged(algorithm: str, ranges: Iterable[tuple[int, int, int]]) -> list[tuple[int, int, int]]:
    """``(start, end, crc)`` ranges in file order, adjacent ones combined into one (their CRCs
    with the algorithm's ``combine``)."""
    combine = ALGORITHMS[algorithm].combine
    out: list[tuple[int, int, int]] = []
    for start, end, crc in sorted(ranges):
        if out and out[-1][1] == start:
            first, _, before = out[-1]
            out[-1] = (first, end, combine(before, crc, end - start))
        else:
            out.append((start, end, crc))
    return out


def _signed(value: int) -> int:
    return value - _MOD if value >= _SIGN else value


def _unsigned(value: int) -> int:
    return value % _MOD


def encode(
    checked: Mapping[str, CheckedFile],
    ranges: Mapping[str, Sequence[tuple[int, int, int]]],
    used: Mapping[str, int],
    slots: int,
) -> list[int]:
    """This rank's row: for each file of ``checked`` (the ones it reads), the store's checksum,
    the bytes of it this rank handed to torch (``used``) and the CRCs of the ranges it fetched
    (``ranges``: ``(start, end, crc)``), in ``slots * WIDTH`` ints. Ranges that do not fit
    are left out (the file is then unverified, never verified)."""
    head: list[tuple[int, ...]] = []
    body: list[tuple[int, ...]] = []
    for path, f in sorted(checked.items(), key=lambda kv: kv[1].number):
        head.append(
            (_EXPECTED, f.number, f.size, _signed(f.expected), _ALGORITHM_CODES[f.algorithm])
        )
        head.append((_USED, f.number, used.get(path, 0), 0, 0))
        if f.known:
            body.append((_RANGE, f.number, 0, f.known, _signed(f.known_crc)))
        body.extend(
            (_RANGE, f.number, start, end, _signed(crc))
            for start, end, crc in merged(f.algorithm, ranges.get(path, ()))
        )
    entries = (head + body)[:slots]
    row = [value for entry in entries for value in entry]
    return row + [0] * (slots * WIDTH - len(row))


def verdicts(rows: Sequence[Sequence[int]]) -> tuple[dict[int, Verdict], list[dict[int, int]]]:
    """From every rank's row (``encode``; row ``r`` is rank ``r``'s): each checked file's
    verdict by file number, and per rank the bytes of each file it used."""
    expected: dict[int, tuple[str, int, int]] = {}
    # file number -> (start, end, crc) -> the first rank that sent it: a header every reader
    # of a file sends counts once
    ranges: dict[int, dict[tuple[int, int, int], int]] = {}
    used: list[dict[int, int]] = []
    for rank, row in enumerate(rows):
        mine: dict[int, int] = {}
        for at in range(0, len(row) - WIDTH + 1, WIDTH):
            kind, number, a, b, c = row[at : at + WIDTH]
            if kind == _EXPECTED:
                expected[number] = (_ALGORITHM_NAMES[c], a, _unsigned(b))
            elif kind == _USED:
                mine[number] = mine.get(number, 0) + a
            elif kind == _RANGE:
                ranges.setdefault(number, {}).setdefault((a, b, _unsigned(c)), rank)
        used.append(mine)
    found: dict[int, Verdict] = {}
    for number, (algorithm, size, want) in expected.items():
        spans = sorted(ranges.get(number, {}).items())
        named = tuple((rank, start, end) for (start, end, _), rank in spans)
        combine = ALGORITHMS[algorithm].combine
        at, crc = 0, 0
        why = ""
        for (start, end, part), _ in spans:
            if start != at:
                why = (
                    f"bytes [{at}, {start}) were not fetched by the job"
                    if start > at
                    else f"bytes [{start}, {at}) were fetched twice"
                )
                break
            crc = combine(crc, part, end - start) if at else part
            at = end
        else:
            if at != size:
                why = f"bytes [{at}, {size}) were not fetched by the job"
        if why:
            found[number] = Verdict("unverified", algorithm, size, named, why)
        elif crc == want:
            found[number] = Verdict("verified", algorithm, size, named)
        else:
            found[number] = Verdict("mismatch", algorithm, size, named)
    return found, used
