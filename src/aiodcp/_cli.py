"""The ``aiodcp`` command: look inside a DCP checkpoint on S3 without loading it.

Usage::

    aiodcp inspect s3://bucket/ckpt [--json]
    aiodcp plan    s3://bucket/ckpt [--keys K [K ...] | --keys-file FILE]
                   [--slice DIM:START:LEN ...]
                   [--max-gap-size SIZE] [--part-size SIZE] [--max-concurrency N] [--json]
    aiodcp verify  s3://bucket/ckpt [--max-concurrency N] [--json]

    common: --endpoint-url URL  --region REGION  --profile NAME  --unsigned
            --addressing-style {auto,path,virtual}

(also ``python -m aiodcp``). ``inspect`` and ``plan`` read only ``.metadata``: one GET, unpickled
with the restricted unpickler (``dcp._metadata.load_metadata``); no data file is touched, except by
``plan --slice``, which GETs the head and tail of each stored item worth slicing, as a load does.
``verify`` reads every byte of every data file and checks it against the checkpoint's integrity
record (``dcp._integrity``, written by aiodcp's saves; ``dcp._audit`` does the reading), or
without one against the store's full-object checksum of each file (CRC64NVME, CRC32, CRC32C,
SHA-256 or SHA-1), and reports, per file, what does not match and which checksum was checked;
the ``.metadata`` (a safetensors index) is checked against the store's checksum as a load
checks it, before it is unpickled.

Data flow::

    argv -> argparse -> ReaderConfig (validated) + CheckpointPath (parsed)
         -> dcp._session.LoadSession.read_metadata() (a private I/O loop) -> Metadata
         -> _stored_items(): one validated record per storage_data entry
         -> inspect_report() | plan_report()       pure, JSON-ready dicts (the --json output)
            | verify: dcp._audit.audit_checkpoint() -> verify_report()
         -> render_inspect() | render_plan() | render_verify()
                                                   the human tables, drawn from those dicts

``plan`` selects every stored item whose ``MetadataIndex.fqn`` equals a given key or starts with
``key + "."`` (so ``--keys model`` selects ``model.*``), then plans each data file exactly as
a load's read phase (``DcpLoad.group``) does: identical ranges once, zero-length items skipped, and
``_planner.plan_file`` with the given ``max_gap_size`` and ``buffered_part_size`` (a load gives
large tensors it receives straight into the state dict whole ``part_size`` GETs, which a plan
without a state dict cannot tell; it shows the buffered parts). Files are in path
order, as a load consumes them. ``--max-gap-size auto`` (the default, as in a load) is resolved
as a load resolves it: from the time of the ``.metadata`` GET (``_planner.auto_gap_size``); a
load measures its own request, so its automatic gap can differ a little (pass a size to pin it).

``plan --slice DIM:START:LEN`` (repeatable, one per dim) plans the load of one shard instead:
elements ``[START, START+LEN)`` of dim ``DIM`` of every selected tensor, clamped to its size
(tensors without that dim are read whole, a tensor the shard misses is not read). The read items
are torch's own for that shard (``create_read_items_for_chunk_list``), and ``slice_load`` hands
them to a load session's read phase itself (``LoadSession.dcp_load``), which fetches the heads
and tails of the items worth slicing and plans their runs. The report then counts, per file,
the bytes the read items' regions need, and adds the head/tail GETs to the requests and
requested bytes.

Sizes on the command line are a whole number of bytes with an optional unit: ``B``;
``K``/``KiB``, ``M``/``MiB``, ``G``/``GiB``, ``T``/``TiB`` (powers of 1024); ``KB``, ``MB``,
``GB``, ``TB`` (powers of 1000); ``1.5GiB`` is fine when it is a whole number of bytes.
``--max-gap-size`` also takes ``inf`` (merge every range of a file) and ``auto``.

JSON output (``--json``), stable within a schema version (a version may gain keys; a key never
changes meaning); sizes and offsets are bytes, ranges are ``[start, end)``::

    inspect: {"schema": "aiodcp.inspect/1",
              "checkpoint": "s3://bucket/ckpt",
              "metadata": {"key": "ckpt/.metadata", "bytes": int},
              "keys": [{"key": fqn, "kind": "tensor" | "bytes",
                        "dtype": "bfloat16" | null, "shape": [int, ...] | null,
                        "chunks": int, "stored_bytes": int, "files": [relative path, ...],
                        "compression": ["stream.zstd/1", ...]}, ...],    sorted by key
              "files": [{"path": "__0_0.distcp", "key": "ckpt/__0_0.distcp",
                         "items": int, "bytes": int}, ...],               sorted by path
              "summary": {"keys": int, "tensors": int, "bytes_values": int,
                          "stored_items": int, "stored_bytes": int, "files": int,
                          "compression": [descriptor, ...]},
              "integrity": null                  no record: saved by another writer
                         | {"algorithm": "CRC64NVME", "block_bytes": int,
                            "files": [{"path": str, "etag": str, "size": int,
                                       "crc64nvme": str (base64, S3's header form)}, ...],
                            "items_recorded": int,   stored items with block checksums
                            "items_aligned": int,    of which blocks start at the tensor's
                                                     storage bytes (the framing: block 0)
                            "complete": bool}}       every stored item and file recorded

    plan:    {"schema": "aiodcp.plan/1",
              "checkpoint": "s3://bucket/ckpt",
              "requested_keys": [key, ...] | null,          null: all keys
              "keys": [fqn, ...],                           the keys selected, sorted
              "settings": {"max_gap_size": int | null,      the gap planned with; null: inf
                           "max_gap_size_policy": "auto" | "fixed",
                           "request_latency_s": float | null,   the timed .metadata GET
                           "part_size": int, "buffered_part_size": int,
                           "max_concurrency": int},
              "files": [{"path": "__0_0.distcp", "key": "ckpt/__0_0.distcp",
                         "bytes_needed": int, "bytes_requested": int, "gap_bytes": int,
                         "requests": int,
                         "groups": [{"start": int, "end": int, "gap_bytes": int,
                                     "ranges": [{"start": int, "end": int,
                                                 "keys": [fqn, ...]}, ...],
                                     "parts": [{"start": int, "end": int}, ...]}, ...]},
                        ...],
              "totals": {"files": int, "keys": int, "ranges": int, "groups": int,
                         "requests": int, "bytes_needed": int, "bytes_requested": int,
                         "gap_bytes": int, "max_in_flight": int}}
             with --slice also: "slices": [{"dim": int, "start": int, "length": int}, ...];
             per file and in totals "sliced_items", "probe_requests", "probe_bytes" (the
             heads and tails, included in "requests" and "bytes_requested"); "bytes_needed"
             is then the bytes of the shard's regions, and a range is a run of a sliced item

    verify:  {"schema": "aiodcp.verify/1",
              "checkpoint": "s3://bucket/ckpt",
              "recorded": bool,                         false: nothing to check against
              "metadata": {"key": str,                  .metadata (safetensors: the index),
                           "checksum": str | null} | null   checked against the store's
                                                        full-object checksum before parsing
              "files": [{"path": str, "key": str, "bytes": int, "items": int,
                         "status": "ok" | "mismatch" | "missing" | "changed" | "truncated"
                                   | "unverified",
                         "checked_bytes": int, "whole_crc_matches": bool | null,
                         "algorithm": "CRC64NVME" | "CRC32" | "CRC32C" | "SHA256" | "SHA1"
                                      | null,           the whole-file checksum checked
                         "detail": str,
                         "mismatches": [{"start": int, "end": int, "keys": [fqn, ...],
                                         "blocks": [[start, end], ...]}, ...]}, ...],
              "summary": {"files": int, "ok": int, "mismatch": int, "missing": int,
                          "changed": int, "truncated": int, "unverified": int,
                          "checked_bytes": int, "stored_bytes": int},
              "ok": bool}                               every file matched its record

``chunks`` counts stored items (shards) of a key; ``stored_bytes`` is what they occupy in the data
files (compressed size when compressed). A file's ``bytes`` is the sum of its items. In a plan, a
range is one stored item, a group is ranges whose gaps are ``<= max_gap_size``, a part is one
ranged GET (``requests`` counts them; a load also GETs ``.metadata`` once), and ``max_in_flight``
is ``min(max_concurrency, requests)``, the most GETs the load can have in flight at once.

Exit codes: 0 ok; 2 usage (bad arguments, bad ``s3://`` URL, invalid setting, unknown key);
3 not found (no such bucket, no ``.metadata``); 4 access denied or no credentials; 5 corrupt
metadata (a malformed integrity record too); 6 ``verify`` found stored bytes that do not match
the record or the store's checksum (or a data file missing, replaced since the save, or
shorter), or any command read a ``.metadata`` (index) that twice did not match the store's
checksum; 7 ``verify`` had nothing to check some files against (no record, no full-object
checksum: none, or a composite one) and found nothing wrong; 1 anything else (e.g.
the network failed). Expected errors print one line on stderr, no traceback; ``verify`` also
names the files that failed there.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import re
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import TYPE_CHECKING, Any

from torch.distributed.checkpoint.metadata import (
    BytesStorageMetadata,
    Metadata,
    TensorStorageMetadata,
)

from ._checksum import to_header
from ._config import DEFAULT_MAX_CONCURRENCY, ReaderConfig
from ._errors import (
    AccessDeniedError,
    AiodcpError,
    CheckpointFormatError,
    ChecksumMismatchError,
    ConfigError,
    InvalidPathError,
    InvalidRangeError,
    NoCredentialsError,
    NotFoundError,
)
from ._path import CheckpointPath, parse_checkpoint_path
from ._planner import (
    ASSUMED_CONNECTION_BANDWIDTH_BYTES_PER_S,
    AUTO_GAP_SIZE,
    DEFAULT_PART_SIZE_BYTES,
    MAX_AUTO_GAP_SIZE_BYTES,
    MIN_AUTO_GAP_SIZE_BYTES,
    FilePlan,
    ItemRange,
    plan_file,
    resolve_max_gap_size,
)
from .dcp._integrity import Integrity
from .dcp._session import METADATA_NAME, LoadSession, select_keys

if TYPE_CHECKING:
    from .dcp._audit import FileAudit

__all__ = [
    "EXIT_ACCESS_DENIED",
    "EXIT_CORRUPT",
    "EXIT_ERROR",
    "EXIT_MISMATCH",
    "EXIT_NOT_FOUND",
    "EXIT_OK",
    "EXIT_UNVERIFIED",
    "EXIT_USAGE",
    "SlicedLoad",
    "UsageError",
    "human_size",
    "inspect_report",
    "main",
    "parse_size",
    "plan_report",
    "read_metadata",
    "render_inspect",
    "render_plan",
    "render_verify",
    "slice_load",
    "verify_report",
]

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_NOT_FOUND = 3
EXIT_ACCESS_DENIED = 4
EXIT_CORRUPT = 5
EXIT_MISMATCH = 6
EXIT_UNVERIFIED = 7

_PROG = "aiodcp"
_INDEX_NAME = "model.safetensors.index.json"
_SAFETENSORS_TORCH = frozenset(
    (
        "BOOL",
        "U8",
        "I8",
        "F8_E5M2",
        "F8_E4M3",
        "F8_E8M0",
        "F8_E4M3FNUZ",
        "F8_E5M2FNUZ",
        "I16",
        "U16",
        "F16",
        "BF16",
        "I32",
        "U32",
        "F32",
        "F64",
        "I64",
        "U64",
        "C64",
        "F4",
    )
)  # safetensors dtypes torch has (safetensors/_format.py TORCH_DTYPES; no torch import here)
_INSPECT_SCHEMA = "aiodcp.inspect/1"
_PLAN_SCHEMA = "aiodcp.plan/1"
_VERIFY_SCHEMA = "aiodcp.verify/1"
_MAX_FILES_SHOWN = 2  # human table: files listed per key before "+N more"

_SIZE_RE = re.compile(r"^(\d+(?:\.\d*)?|\.\d+)\s*([A-Za-z]*)$")
_UNITS = {
    "": 1,
    "b": 1,
    **{f"{p}": 1024**n for n, p in enumerate("kmgt", 1)},
    **{f"{p}ib": 1024**n for n, p in enumerate("kmgt", 1)},
    **{f"{p}b": 1000**n for n, p in enumerate("kmgt", 1)},
}
_HUMAN_UNITS = ("KiB", "MiB", "GiB", "TiB", "PiB")


class UsageError(Exception):
    """A command-line argument the checkpoint cannot satisfy (exit code 2)."""


# ---------------------------------------------------------------------------------- arguments


def parse_size(text: str, *, allow_inf: bool = False) -> int | float:
    """``"32MiB"`` -> 33554432. Units as in the module docstring; ``inf`` if ``allow_inf``."""
    value = text.strip()
    if allow_inf and value.lower() in ("inf", "infinity"):
        return float("inf")
    match = _SIZE_RE.match(value)
    unit = match.group(2).lower() if match else ""
    if match is None or unit not in _UNITS:
        hint = " or 'inf'" if allow_inf else ""
        raise ValueError(
            f"invalid size {text!r}: expected a number of bytes with an optional unit such as "
            f"'4096', '512KiB', '32MiB', '1GiB'{hint}"
        )
    size = Fraction(match.group(1)) * _UNITS[unit]
    if size.denominator != 1:
        raise ValueError(f"invalid size {text!r}: {float(size)} is not a whole number of bytes")
    return int(size)


def _size_arg(text: str) -> int | float:
    try:
        return parse_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _gap_arg(text: str) -> int | float | str:
    if text.strip().lower() == AUTO_GAP_SIZE:
        return AUTO_GAP_SIZE
    try:
        return parse_size(text, allow_inf=True)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"{exc}, or 'auto' (the default)") from None


def _build_parser() -> argparse.ArgumentParser:
    from ._version import __version__

    common = argparse.ArgumentParser(add_help=False)
    store = common.add_argument_group("connection")
    store.add_argument("--endpoint-url", metavar="URL", help="S3-compatible endpoint")
    store.add_argument("--region", help="AWS region (default: botocore's resolution)")
    store.add_argument("--profile", metavar="NAME", help="botocore profile for credentials")
    store.add_argument(
        "--unsigned", action="store_true", help="send unsigned requests (public buckets)"
    )
    store.add_argument(
        "--request-payer",
        choices=("requester",),
        help="read a Requester Pays bucket (your account pays for the requests)",
    )
    store.add_argument(
        "--addressing-style",
        choices=("auto", "path", "virtual"),
        help="'path' for most S3-compatible stores (default: auto)",
    )
    common.add_argument("--json", action="store_true", help="machine-readable JSON on stdout")

    parser = argparse.ArgumentParser(
        prog=_PROG,
        description="Inspect PyTorch Distributed Checkpoints (DCP) on S3 from their metadata.",
        epilog="Exit codes: 0 ok, 1 other error, 2 usage, 3 not found, 4 access denied or no "
        "credentials, 5 corrupt metadata, 6 verify: stored bytes do not match, 7 verify: "
        "nothing recorded to check against.",
    )
    parser.add_argument("--version", action="version", version=f"{_PROG} {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    inspect = commands.add_parser(
        "inspect",
        parents=[common],
        help="list every key: kind, dtype, shape, chunks, stored bytes, files, compression",
        description="List every key of the checkpoint with its kind, dtype, global shape, "
        "stored chunks and bytes, data files and compression, then a summary. Reads only "
        ".metadata.",
    )
    inspect.add_argument("checkpoint", metavar="s3://bucket/ckpt", help="the checkpoint's URL")

    plan = commands.add_parser(
        "plan",
        parents=[common],
        help="what a load of some keys would fetch: byte ranges, groups, GETs, gap bytes",
        description="Show what a load of the given keys (default: all) would fetch with the "
        "given settings: per data file the byte ranges, range groups and ranged GETs, bytes "
        "needed and requested. A key selects itself and every key below it ('model' selects "
        "'model.*'). Sizes take units: 4096, 512KiB, 32MiB, 1GiB (KB/MB/GB are powers of "
        "1000). Reads only .metadata.",
    )
    plan.add_argument("checkpoint", metavar="s3://bucket/ckpt", help="the checkpoint's URL")
    which = plan.add_mutually_exclusive_group()
    which.add_argument(
        "--keys",
        nargs="+",
        metavar="KEY",
        help="keys to load (default: all); put them after the URL",
    )
    which.add_argument(
        "--keys-file",
        metavar="FILE",
        help="file with one key per line ('#' comments and blank lines ignored; '-' = stdin)",
    )
    plan.add_argument(
        "--slice",
        type=_slice_arg,
        action="append",
        metavar="DIM:START:LEN",
        help="plan the load of one shard: elements START..START+LEN of dim DIM of every "
        "selected tensor (clamped to its size; repeat for several dims). Sliced items take "
        "only the bytes they need; their heads and tails are fetched to plan it (the only "
        "data this reads)",
    )
    plan.add_argument(
        "--max-gap-size",
        type=_gap_arg,
        metavar="SIZE",
        help="ranges whose gap is <= SIZE share a request; 0 = only adjacent, inf = all, "
        f"auto = latency of the .metadata GET x {ASSUMED_CONNECTION_BANDWIDTH_BYTES_PER_S // 10**6}"
        f" MB/s, within {human_size(MIN_AUTO_GAP_SIZE_BYTES)}.."
        f"{human_size(MAX_AUTO_GAP_SIZE_BYTES)} (default: auto)",
    )
    plan.add_argument(
        "--part-size",
        type=_size_arg,
        metavar="SIZE",
        help=f"largest span of one GET (default: {human_size(DEFAULT_PART_SIZE_BYTES)}; "
        "buffered GETs are cut to memory_budget / max_concurrency)",
    )
    plan.add_argument(
        "--max-concurrency",
        type=int,
        metavar="N",
        help=f"GETs in flight at once (default: {DEFAULT_MAX_CONCURRENCY})",
    )
    verify = commands.add_parser(
        "verify",
        parents=[common],
        help="read every stored byte and check it against the checkpoint's integrity record",
        description="Read every byte of every data file and check it against what the "
        "checkpoint recorded when aiodcp saved it: each file's ETag (a file replaced since "
        "is 'changed'), size and CRC64NVME, and the CRC64NVME of each 1 MiB block of each "
        "stored item. A checkpoint without that record is checked file by file against the "
        "store's full-object CRC64NVME, where it has one. Reports per file what does not "
        "match (the items and blocks). Exits 6 if anything does not match, 7 if some file had "
        "nothing to check it against.",
    )
    verify.add_argument("checkpoint", metavar="s3://bucket/ckpt", help="the checkpoint's URL")
    verify.add_argument(
        "--max-concurrency",
        type=int,
        metavar="N",
        help=f"GETs in flight at once (default: {DEFAULT_MAX_CONCURRENCY})",
    )
    return parser


def _slice_arg(text: str) -> tuple[int, int, int]:
    """``DIM:START:LEN`` (non-negative ints, LEN > 0) for ``--slice``."""
    try:
        dim, start, length = (int(p) for p in text.split(":"))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected DIM:START:LEN (three integers), got {text!r}"
        ) from None
    if dim < 0 or start < 0 or length <= 0:
        raise argparse.ArgumentTypeError(f"DIM and START must be >= 0 and LEN > 0, got {text!r}")
    return dim, start, length


def _config(args: argparse.Namespace) -> ReaderConfig:
    return ReaderConfig.from_kwargs(
        None,
        endpoint_url=args.endpoint_url,
        region=args.region,
        profile=args.profile,
        unsigned=True if args.unsigned else None,
        request_payer=args.request_payer,
        addressing_style=args.addressing_style,
        max_gap_size=getattr(args, "max_gap_size", None),
        part_size=getattr(args, "part_size", None),
        max_concurrency=getattr(args, "max_concurrency", None),
    )


def _requested_keys(args: argparse.Namespace) -> list[str] | None:
    if args.keys is not None:
        return list(args.keys)
    if args.keys_file is None:
        return None
    try:
        if args.keys_file == "-":
            text = sys.stdin.read()
        else:
            text = Path(args.keys_file).read_text(encoding="utf-8")
    except OSError as exc:
        raise UsageError(f"cannot read --keys-file {args.keys_file}: {exc.strerror}") from None
    keys = [k for line in text.splitlines() if (k := line.strip()) and not k.startswith("#")]
    if not keys:
        raise UsageError(f"--keys-file {args.keys_file} lists no keys")
    return keys


# ---------------------------------------------------------------------------------- metadata


def read_metadata(
    path: CheckpointPath, config: ReaderConfig, format: str = "dcp"
) -> tuple[Metadata, int, float]:
    """GET and unpickle ``.metadata`` (``format="safetensors"``: the index and the headers of
    the safetensors checkpoint in the directory ``path``); returns it, its size in bytes and
    the GET's estimated time to first byte in seconds (what ``max_gap_size="auto"`` is
    resolved with)."""
    metadata, size, latency, _, _ = _describe(path, config, format)
    return metadata, size, latency


def _describe(
    path: CheckpointPath, config: ReaderConfig, format: str = "auto", only: str | None = None
) -> tuple[Metadata, int, float, str, str | None]:
    """``read_metadata`` for the checkpoint format asked for or found (``_detect.Describe``);
    also returns the format, and the algorithm of the store's checksum the ``.metadata`` (a
    safetensors index) was checked against (None: not checked; a mismatch read twice raises
    ``ChecksumMismatchError``)."""
    from ._detect import Describe, check_format
    from ._driver import PrivateLoopDriver  # the S3 stack: only commands that read a checkpoint

    describe = Describe(check_format(format), only)
    driver = PrivateLoopDriver(config)
    try:
        session = LoadSession(path, config, driver, fetch=describe)
        metadata = session.read_metadata()
    finally:
        driver.close()
    latency = session.request_latency_s
    assert latency is not None  # measured by the GET
    return metadata, session.metadata_bytes, latency, describe.format, session.metadata_checksum


def _integrity(metadata: Metadata, path: CheckpointPath) -> Integrity | None:
    """The checkpoint's integrity record (``CheckpointFormatError`` if malformed)."""
    return Integrity.of(metadata, f"s3://{path.bucket}/{path.key(METADATA_NAME)}")


@dataclass(frozen=True, slots=True)
class _Stored:
    """One ``storage_data`` entry: a stored item of key ``fqn`` at ``[offset, offset+length)``."""

    fqn: str
    path: str
    offset: int
    length: int
    transforms: tuple[str, ...]
    dtype: str | None = None
    """The stored dtype's safetensors name (safetensors checkpoints only)."""


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _stored_items(metadata: Metadata, where: str) -> list[_Stored]:
    """Every stored item, validated, sorted by (file, offset) as a load consumes them."""
    items: list[_Stored] = []
    for index, info in metadata.storage_data.items():
        fqn = getattr(index, "fqn", None)
        path = getattr(info, "relative_path", None)
        offset = getattr(info, "offset", None)
        length = getattr(info, "length", None)
        transforms = getattr(info, "transform_descriptors", None) or ()
        if not (
            isinstance(fqn, str)
            and isinstance(path, str)
            and _is_int(offset)
            and _is_int(length)
            and offset >= 0  # type: ignore[operator]
            and length >= 0  # type: ignore[operator]
            and isinstance(transforms, (list, tuple))
            and all(isinstance(t, str) for t in transforms)
        ):
            raise CheckpointFormatError(
                f"{where}: storage entry {index!r} -> {info!r} is not a DCP storage record "
                "(relative_path, offset, length); the metadata is corrupt"
            )
        dtype = getattr(info, "dtype", None)
        items.append(
            _Stored(
                fqn,
                path,
                offset,  # type: ignore[arg-type]
                length,  # type: ignore[arg-type]
                tuple(transforms),
                dtype if isinstance(dtype, str) else None,
            )
        )
    items.sort(key=lambda s: (s.path, s.offset, s.fqn))
    return items


def _file_key(path: CheckpointPath, relative_path: str) -> str:
    try:
        return path.key(relative_path)
    except InvalidPathError as exc:  # a path in the metadata, not on the command line
        raise CheckpointFormatError(str(exc), bucket=path.bucket, key=relative_path) from None


# ---------------------------------------------------------------------------------- reports


def inspect_report(
    metadata: Metadata, path: CheckpointPath, metadata_bytes: int, format: str = "dcp"
) -> dict[str, Any]:
    """The ``inspect --json`` document (schema in the module docstring)."""
    catalog = METADATA_NAME if format == "dcp" else _INDEX_NAME
    where = f"s3://{path.bucket}/{path.key(catalog)}"
    stored = _stored_items(metadata, where)
    by_key: dict[str, list[_Stored]] = {}
    files: dict[str, list[_Stored]] = {}
    for item in stored:
        by_key.setdefault(item.fqn, []).append(item)
        files.setdefault(item.path, []).append(item)

    keys: list[dict[str, Any]] = []
    tensors = 0
    for fqn in sorted(metadata.state_dict_metadata):
        meta = metadata.state_dict_metadata[fqn]
        mine = by_key.get(fqn, [])
        if isinstance(meta, TensorStorageMetadata):
            kind, dtype, shape = "tensor", _dtype_name(meta.properties.dtype), list(meta.size)
            tensors += 1
        elif isinstance(meta, BytesStorageMetadata):
            kind, dtype, shape = "bytes", None, None
        else:
            raise CheckpointFormatError(
                f"{where}: key {fqn!r} is described by a {type(meta).__name__}, neither "
                "tensor nor bytes metadata; the metadata is corrupt"
            )
        entry: dict[str, Any] = {
            "key": fqn,
            "kind": kind,
            "dtype": dtype,
            "shape": shape,
            "chunks": len(mine),
            "stored_bytes": sum(item.length for item in mine),
            "files": sorted({item.path for item in mine}),
            "compression": sorted({t for item in mine for t in item.transforms}),
        }
        if format == "safetensors":
            names = sorted({item.dtype for item in mine if item.dtype})
            entry["stored_dtype"] = names[0] if len(names) == 1 else names
            if any(item.dtype not in _SAFETENSORS_TORCH for item in mine):
                entry["dtype"] = None  # torch has none: a load of it is refused
        keys.append(entry)
    return {
        "schema": _INSPECT_SCHEMA,
        "format": format,
        "checkpoint": path.url,
        "metadata": {"key": path.key(catalog), "bytes": metadata_bytes},
        "keys": keys,
        "files": [
            {
                "path": name,
                "key": _file_key(path, name),
                "items": len(files[name]),
                "bytes": sum(item.length for item in files[name]),
            }
            for name in sorted(files)
        ],
        "summary": {
            "keys": len(keys),
            "tensors": tensors,
            "bytes_values": len(keys) - tensors,
            "stored_items": len(stored),
            "stored_bytes": sum(item.length for item in stored),
            "files": len(files),
            "compression": sorted({t for item in stored for t in item.transforms}),
        },
        "integrity": _integrity_report(_integrity(metadata, path), stored, set(files)),
    }


def _integrity_report(
    record: Integrity | None, stored: list[_Stored], files: set[str]
) -> dict[str, Any] | None:
    """What the checkpoint records for integrity (``inspect``'s ``integrity``)."""
    if record is None:
        return None
    items = {(s.path, s.offset, s.length) for s in stored if s.length}
    blocks = [b for b in (record.item(*i) for i in items) if b is not None]
    return {
        "algorithm": "CRC64NVME",
        "block_bytes": record.block_bytes,
        "files": [
            {"path": p, "etag": f.etag, "size": f.size, "crc64nvme": to_header(f.crc64nvme)}
            for p, f in sorted(record.files.items())
        ],
        "items_recorded": len(blocks),
        "items_aligned": sum(1 for b in blocks if b.data_start),
        "complete": len(blocks) == len(items) and files <= set(record.files),
    }


def _dtype_name(dtype: object) -> str:
    return str(dtype).removeprefix("torch.")


def _select(requested: Sequence[str], fqns: Iterable[str]) -> set[str]:
    """The fqns each requested key selects (itself, or below it); UsageError for unknown keys."""
    selected, unknown = select_keys(requested, fqns)
    if unknown:
        noun = "key" if len(unknown) == 1 else "keys"
        raise UsageError(
            f"unknown {noun} {'; '.join(unknown)}; `aiodcp inspect` lists the checkpoint's keys"
        )
    return selected


@dataclass(frozen=True, slots=True)
class SlicedLoad:
    """What a load of one shard (``--slice``) fetches, from ``slice_load``: per file the ranges
    planned (runs of sliced items, whole items) with the keys reading them, the heads and
    tails fetched first, the bytes the read items' regions hold and the items sliced."""

    slices: tuple[tuple[int, int, int], ...]
    per_file: dict[str, dict[ItemRange, list[str]]]
    probes: dict[str, FilePlan]
    needed: dict[str, int]
    sliced_items: dict[str, int]


def slice_load(
    metadata: Metadata,
    path: CheckpointPath,
    config: ReaderConfig,
    selected: Iterable[str],
    slices: Sequence[tuple[int, int, int]],
    request_latency_s: float | None = None,
    format: str = "dcp",
) -> SlicedLoad:
    """Plan the load of one shard of the ``selected`` keys exactly as ``S3StorageReader`` does:
    torch's read items for the shard (``create_read_items_for_chunk_list``, as
    ``DefaultLoadPlanner`` makes them), grouped and sliced by the reader itself. Slicing GETs
    each candidate's head and tail (to locate its storage bytes and verify its directory)."""
    import torch
    from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
    from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, MetadataIndex
    from torch.distributed.checkpoint.planner import LoadItemType, LoadPlan, ReadItem
    from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list

    from ._driver import PrivateLoopDriver
    from ._stats import StatsRecorder

    chosen = set(selected)
    items: list[ReadItem] = []
    for fqn, md in metadata.state_dict_metadata.items():
        if fqn not in chosen:
            continue
        if isinstance(md, TensorStorageMetadata):
            offsets, sizes = [0] * len(md.size), list(md.size)
            for dim, start, length in slices:
                if dim < len(sizes):
                    begin = min(start, md.size[dim])
                    offsets[dim], sizes[dim] = begin, min(start + length, md.size[dim]) - begin
            if all(sizes):
                shard = ChunkStorageMetadata(torch.Size(offsets), torch.Size(sizes))
                items += create_read_items_for_chunk_list(fqn, md, [shard])
        else:
            index = MetadataIndex(fqn)  # as planner_helpers._create_read_item_for_byteio
            zero = torch.Size((0,))
            items.append(ReadItem(LoadItemType.BYTE_IO, index, zero, index, zero, zero))
    from ._detect import reader_type

    reader = reader_type("safetensors" if format == "safetensors" else "dcp")(
        path.url, config=config
    )
    driver = PrivateLoopDriver(config)
    try:
        reader.set_up_storage_reader(metadata, True)
        plan = reader.prepare_local_plan(LoadPlan(items))  # the reader's item order
        session = LoadSession(
            path, config, driver, metadata=metadata, request_latency_s=request_latency_s
        )
        load = session.read_phase(reader._stored_format(session))
        grouped = load.group(plan)
        gap = resolve_max_gap_size(config.max_gap_size, request_latency_s)
        load.slice(grouped, DefaultLoadPlanner(), gap, StatsRecorder(), {})
    finally:
        driver.close()
        reader.close()
    per_file: dict[str, dict[ItemRange, list[str]]] = {}
    needed: dict[str, int] = {}
    sliced: dict[str, int] = {}
    for name, by_range in grouped.per_file.items():
        per_file[name] = {r: [req.dest_index.fqn for req in reqs] for r, reqs in by_range.items()}
        total = 0
        for item_range, reqs in by_range.items():
            for req in reqs:
                md = metadata.state_dict_metadata[req.dest_index.fqn]
                if req.type == LoadItemType.BYTE_IO or not isinstance(md, TensorStorageMetadata):
                    total += item_range.length
                    continue
                numel = 1
                for n in req.lengths:
                    numel *= n
                total += numel * md.properties.dtype.itemsize
        needed[name] = total
        key = path.key(name)
        # a sliced stored item's runs share one Slice per run; count stored items by req
        stored_items = {
            req.storage_index
            for (run_key, run), _ in grouped.slices.items()
            if run_key == key
            for req in grouped.run_readers.get((run_key, run), [])
        }
        sliced[name] = len(stored_items)
    return SlicedLoad(tuple(slices), per_file, grouped.probe_plans, needed, sliced)


def plan_report(
    metadata: Metadata,
    path: CheckpointPath,
    config: ReaderConfig,
    requested: Sequence[str] | None = None,
    request_latency_s: float | None = None,
    sliced: SlicedLoad | None = None,
) -> dict[str, Any]:
    """The ``plan --json`` document: what a load of ``requested`` (None: all) would fetch;
    with ``sliced`` (``slice_load``), what the load of that shard would fetch.

    ``request_latency_s`` is the measured time to first byte ``max_gap_size="auto"`` is
    resolved with (None: the prior, as ``_planner.auto_gap_size``)."""
    where = f"s3://{path.bucket}/{path.key(METADATA_NAME)}"
    stored = _stored_items(metadata, where)
    fqns = set(metadata.state_dict_metadata) | {item.fqn for item in stored}
    selected = fqns if requested is None else _select(requested, fqns)

    # As DcpLoad.group: per file (in load order) each distinct range once, with the
    # keys that read it; zero-length items need no request.
    per_file: dict[str, dict[ItemRange, list[str]]] = {}
    if sliced is not None:
        per_file = dict(sorted(sliced.per_file.items()))
    else:
        for item in stored:
            if item.fqn in selected and item.length:
                item_range = ItemRange(item.offset, item.offset + item.length)
                per_file.setdefault(item.path, {}).setdefault(item_range, []).append(item.fqn)

    gap = resolve_max_gap_size(config.max_gap_size, request_latency_s)
    files: list[dict[str, Any]] = []
    for name, by_range in per_file.items():
        try:
            file_plan = plan_file(
                by_range.keys(), max_gap_size=gap, part_size=config.buffered_part_size
            )
        except InvalidRangeError as exc:
            raise CheckpointFormatError(
                f"{where}: data file {name!r} has stored items that cannot be served ({exc}); "
                "the metadata is corrupt",
                bucket=path.bucket,
                key=path.key(METADATA_NAME),
            ) from exc
        parts = iter(file_plan.parts)
        groups = []
        part = next(parts, None)
        for group in file_plan.groups:
            group_parts = []
            while part is not None and part.end <= group.end:
                group_parts.append({"start": part.start, "end": part.end})
                part = next(parts, None)
            groups.append(
                {
                    "start": group.start,
                    "end": group.end,
                    "gap_bytes": group.gap_bytes,
                    "ranges": [
                        {"start": r.start, "end": r.end, "keys": sorted(set(by_range[r]))}
                        for r in group.items
                    ],
                    "parts": group_parts,
                }
            )
        entry: dict[str, Any] = {
            "path": name,
            "key": _file_key(path, name),
            "bytes_needed": file_plan.item_bytes,
            "bytes_requested": file_plan.requested_bytes,
            "gap_bytes": file_plan.gap_bytes,
            "requests": len(file_plan.parts),
            "groups": groups,
        }
        if sliced is not None:
            probes = sliced.probes.get(name)
            probe_requests = 0 if probes is None else len(probes.parts)
            probe_bytes = 0 if probes is None else probes.requested_bytes
            entry["bytes_needed"] = sliced.needed[name]
            entry["bytes_requested"] += probe_bytes
            entry["requests"] += probe_requests
            entry["sliced_items"] = sliced.sliced_items[name]
            entry["probe_requests"] = probe_requests
            entry["probe_bytes"] = probe_bytes
        files.append(entry)

    requests = sum(f["requests"] for f in files)
    report: dict[str, Any] = {
        "schema": _PLAN_SCHEMA,
        "checkpoint": path.url,
        "requested_keys": None if requested is None else list(requested),
        "keys": sorted(selected),
        "settings": {
            "max_gap_size": None if gap == float("inf") else int(gap),
            "max_gap_size_policy": "auto" if config.max_gap_size == AUTO_GAP_SIZE else "fixed",
            "request_latency_s": request_latency_s,
            "part_size": config.part_size,
            "buffered_part_size": config.buffered_part_size,
            "max_concurrency": config.max_concurrency,
        },
        "files": files,
        "totals": {
            "files": len(files),
            "keys": len(selected),
            "ranges": sum(len(g["ranges"]) for f in files for g in f["groups"]),
            "groups": sum(len(f["groups"]) for f in files),
            "requests": requests,
            "bytes_needed": sum(f["bytes_needed"] for f in files),
            "bytes_requested": sum(f["bytes_requested"] for f in files),
            "gap_bytes": sum(f["gap_bytes"] for f in files),
            "max_in_flight": min(config.max_concurrency, requests),
        },
    }
    if sliced is not None:
        report["slices"] = [
            {"dim": dim, "start": start, "length": length} for dim, start, length in sliced.slices
        ]
        for name in ("sliced_items", "probe_requests", "probe_bytes"):
            report["totals"][name] = sum(f[name] for f in files)
    return report


# ---------------------------------------------------------------------------------- rendering


def human_size(n: int | float) -> str:
    """``1536`` -> ``"1.5 KiB"``; bytes below 1 KiB exactly (``"512 B"``)."""
    if n == float("inf"):
        return "inf"
    if n < 1024:
        return f"{int(n)} B"
    value = float(n)
    for unit in _HUMAN_UNITS:
        value /= 1024
        if value < 1024 or unit == _HUMAN_UNITS[-1]:
            break
    return f"{value:.1f} {unit}"


def _table(rows: Sequence[Sequence[str]], right: Iterable[int] = (), indent: str = "") -> list[str]:
    """Rows as aligned columns (two spaces apart); columns in ``right`` are right-aligned."""
    align_right = set(right)
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return [
        indent
        + "  ".join(
            cell.rjust(width) if i in align_right else cell.ljust(width)
            for i, (cell, width) in enumerate(zip(row, widths, strict=True))
        ).rstrip()
        for row in rows
    ]


def _n(count: int, noun: str) -> str:
    return f"{count} {noun}" if count == 1 else f"{count} {noun}s"


def _shape(shape: list[int] | None) -> str:
    return "-" if shape is None else "[" + ", ".join(map(str, shape)) + "]"


def _files_cell(files: list[str]) -> str:
    if not files:
        return "-"
    shown = ", ".join(files[:_MAX_FILES_SHOWN])
    more = len(files) - _MAX_FILES_SHOWN
    return f"{shown} (+{more} more)" if more > 0 else shown


def render_inspect(report: dict[str, Any]) -> str:
    """The human form of an ``inspect_report``."""
    meta = report["metadata"]
    what = ".metadata" if report.get("format", "dcp") == "dcp" else "safetensors index and headers"
    lines = [f"{report['checkpoint']}  ({what}: {human_size(meta['bytes'])})", ""]
    rows = [["KEY", "KIND", "DTYPE", "SHAPE", "CHUNKS", "STORED", "FILES", "COMPRESSION"]]
    rows += [
        [
            k["key"],
            k["kind"],
            (k["dtype"] or "-")
            + (f" ({k['stored_dtype']})" if isinstance(k.get("stored_dtype"), str) else ""),
            _shape(k["shape"]),
            str(k["chunks"]),
            human_size(k["stored_bytes"]),
            _files_cell(k["files"]),
            ", ".join(k["compression"]) or "-",
        ]
        for k in report["keys"]
    ]
    lines += _table(rows, right=(4, 5))
    s = report["summary"]
    compression = ", ".join(s["compression"]) or "none"
    lines += [
        "",
        f"{_n(s['keys'], 'key')} ({_n(s['tensors'], 'tensor')}, "
        f"{_n(s['bytes_values'], 'bytes value')}), {_n(s['stored_items'], 'stored item')}, "
        f"{human_size(s['stored_bytes'])} in {_n(s['files'], 'file')}, "
        f"compression: {compression}",
    ]
    integrity = report.get("integrity")
    recorded = {} if integrity is None else {f["path"]: f for f in integrity["files"]}
    if report["files"]:
        file_rows = [["FILE", "ITEMS", "SIZE"] + (["ETAG", "CRC64NVME"] if recorded else [])]
        for f in report["files"]:
            row = [f["path"], str(f["items"]), human_size(f["bytes"])]
            if recorded:
                r = recorded.get(f["path"])
                row += [r["etag"], r["crc64nvme"]] if r else ["-", "-"]
            file_rows.append(row)
        lines += ["", *_table(file_rows, right=(1, 2))]
    lines += ["", _integrity_line(integrity, s["stored_items"])]
    return "\n".join(lines) + "\n"


def _integrity_line(integrity: dict[str, Any] | None, stored_items: int) -> str:
    if integrity is None:
        return (
            "integrity: nothing recorded (not saved by aiodcp): a load checks a data file it "
            "reads whole against the store's own full-object checksum, where there is one"
        )
    complete = "" if integrity["complete"] else "; INCOMPLETE: loads will refuse it"
    aligned = integrity.get("items_aligned", 0)
    return (
        f"integrity: {integrity['algorithm']} of each {human_size(integrity['block_bytes'])} "
        f"block of {integrity['items_recorded']} of {_n(stored_items, 'stored item')} "
        f"({aligned} with blocks aligned on their tensor's storage bytes), and "
        f"the ETag, size and {integrity['algorithm']} of "
        f"{_n(len(integrity['files']), 'data file')}{complete} (`aiodcp verify` checks them)"
    )


def _plan_row(
    name: str, ranges: int, groups: int, requests: int, sizes: dict[str, Any]
) -> list[str]:
    return [
        name,
        str(ranges),
        str(groups),
        str(requests),
        human_size(sizes["bytes_needed"]),
        human_size(sizes["bytes_requested"]),
        human_size(sizes["gap_bytes"]),
    ]


def render_plan(report: dict[str, Any]) -> str:
    """The human form of a ``plan_report``."""
    settings = report["settings"]
    totals = report["totals"]
    gap = settings["max_gap_size"]
    how = ""
    if settings.get("max_gap_size_policy") == "auto":
        latency = settings.get("request_latency_s")
        measured = "unmeasured" if latency is None else f"{latency * 1000:.1f} ms"
        how = f" (auto: .metadata GET {measured})"
    keys = _n(totals["keys"], "key")
    which = f"all {keys}" if report["requested_keys"] is None else f"{keys} selected"
    lines = [
        f"plan for {report['checkpoint']}: {which}, "
        f"{_n(totals['ranges'], 'stored item')} in {_n(totals['files'], 'file')}",
        f"settings: max_gap_size {human_size(float('inf') if gap is None else gap)}{how}, "
        f"part_size {human_size(settings['part_size'])} "
        f"(buffered {human_size(settings['buffered_part_size'])}), "
        f"max_concurrency {settings['max_concurrency']}",
        "",
    ]
    rows = [["FILE", "RANGES", "GROUPS", "REQUESTS", "NEEDED", "REQUESTED", "GAP"]]
    rows += [
        _plan_row(
            f["path"],
            sum(len(g["ranges"]) for g in f["groups"]),
            len(f["groups"]),
            f["requests"],
            f,
        )
        for f in report["files"]
    ]
    rows.append(_plan_row("total", totals["ranges"], totals["groups"], totals["requests"], totals))
    lines += _table(rows, right=range(1, 7))
    requested = totals["bytes_requested"]
    share = f"{100 * totals['bytes_needed'] / requested:.1f}%" if requested else "100%"
    lines += [
        "",
        f"a load sends {_n(totals['requests'], 'ranged GET')} (at most "
        f"{totals['max_in_flight']} at "
        f"once) for {human_size(requested)}, {share} of it needed; plus 1 GET of .metadata",
    ]
    if "slices" in report:
        shard = ", ".join(
            f"dim {s['dim']} [{s['start']}, {s['start'] + s['length']})" for s in report["slices"]
        )
        lines.append(
            f"shard {shard}: {_n(totals['sliced_items'], 'stored item')} sliced; their heads "
            f"and tails come first, in {_n(totals['probe_requests'], 'GET')} "
            f"({human_size(totals['probe_bytes'])}), counted above"
        )
    for f in report["files"]:
        lines += ["", f"{f['path']}  (s3 key {f['key']})"]
        for number, g in enumerate(f["groups"], 1):
            lines.append(
                f"  group {number}: [{g['start']}, {g['end']}) "
                f"{human_size(g['end'] - g['start'])}, {_n(len(g['ranges']), 'range')}, "
                f"gap {human_size(g['gap_bytes'])}, {_n(len(g['parts']), 'GET')}"
            )
            detail = [
                ["range", f"[{r['start']}, {r['end']})", human_size(r["end"] - r["start"]), k]
                for r in g["ranges"]
                for k in [", ".join(r["keys"])]
            ]
            detail += [
                ["GET", f"[{p['start']}, {p['end']})", human_size(p["end"] - p["start"]), ""]
                for p in g["parts"]
            ]
            lines += _table(detail, right=(2,), indent="    ")
    return "\n".join(lines) + "\n"


def verify_report(
    path: CheckpointPath,
    audits: Sequence[FileAudit],
    recorded: bool,
    metadata: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The ``verify --json`` document (schema in the module docstring); ``metadata``: the key
    of what describes the checkpoint and the checksum it was checked against (None: a single
    safetensors file, described by nothing else)."""
    statuses = ("ok", "mismatch", "missing", "changed", "truncated", "unverified")
    counts = dict.fromkeys(statuses, 0)
    for a in audits:
        counts[a.status] += 1
    return {
        "schema": _VERIFY_SCHEMA,
        "checkpoint": path.url,
        "recorded": recorded,
        "metadata": metadata,
        "files": [
            {
                "path": a.path,
                "key": a.key,
                "bytes": a.size,
                "items": a.items,
                "status": a.status,
                "checked_bytes": a.checked_bytes,
                "whole_crc_matches": a.whole_crc_matches,
                "algorithm": a.algorithm,
                "detail": a.detail,
                "mismatches": [
                    {
                        "start": m.start,
                        "end": m.end,
                        "keys": list(m.keys),
                        "blocks": [list(b) for b in m.blocks],
                    }
                    for m in a.mismatches
                ],
            }
            for a in audits
        ],
        "summary": {
            "files": len(audits),
            **counts,
            "checked_bytes": sum(a.checked_bytes for a in audits),
            "stored_bytes": sum(a.size for a in audits),
        },
        "ok": all(a.status == "ok" for a in audits),
    }


def _verify_exit(report: dict[str, Any]) -> int:
    s = report["summary"]
    if s["files"] - s["ok"] - s["unverified"]:
        return EXIT_MISMATCH
    return EXIT_UNVERIFIED if s["unverified"] else EXIT_OK


def _verify_problem(report: dict[str, Any]) -> str:
    """The one line ``verify`` writes on stderr when it does not exit 0."""
    bad = [f for f in report["files"] if f["status"] not in ("ok", "unverified")]
    if bad:
        named = ", ".join(f"{f['path']} ({f['status']})" for f in bad[:5])
        more = f" and {len(bad) - 5} more" if len(bad) > 5 else ""
        return (
            f"{len(bad)} of {_n(len(report['files']), 'data file')} do not match what the "
            f"checkpoint recorded: {named}{more}"
        )
    return (
        f"nothing to check {report['summary']['unverified']} of "
        f"{_n(len(report['files']), 'data file')} against: the checkpoint carries no integrity "
        "record (it was not saved by aiodcp) and the store holds no full-object checksum for "
        "them that a read can check (none, or a composite one of a multipart upload)"
    )


def render_verify(report: dict[str, Any]) -> str:
    """The human form of a ``verify_report``."""
    s = report["summary"]
    against = (
        "its integrity record (CRC64NVME per 1 MiB block of every stored item)"
        if report["recorded"]
        else "the store's full-object checksum of each (no integrity record)"
    )
    lines = [
        f"{report['checkpoint']}: {_n(s['files'], 'data file')}, "
        f"{human_size(s['checked_bytes'])} read and checked against {against}",
    ]
    described = report.get("metadata")
    if described is not None:
        name = described["key"].rsplit("/", 1)[-1]
        lines.append(
            f"{name}: checked against the store's full-object {described['checksum']}"
            if described["checksum"]
            else f"{name}: not checked (the store holds no full-object checksum for it that a "
            "read can check)"
        )
    lines.append("")
    rows = [["FILE", "SIZE", "CHECKED", "STATUS"]]
    for f in report["files"]:
        status = f["status"].upper() if f["status"] not in ("ok", "unverified") else f["status"]
        rows.append([f["path"], human_size(f["bytes"]), f.get("algorithm") or "-", status])
    lines += _table(rows, right=(1,))
    for f in report["files"]:
        if f["status"] == "unverified" and f["detail"]:
            lines += ["", f"{f['path']}: {f['detail']}"]
        if f["status"] in ("ok", "unverified"):
            continue
        lines += ["", f"{f['path']}  (s3 key {f['key']}): {f['status']}"]
        if f["detail"]:
            lines.append(f"  {f['detail']}")
        for m in f["mismatches"]:
            blocks = ", ".join(f"[{a}, {b})" for a, b in m["blocks"][:4])
            more = f" (+{len(m['blocks']) - 4} more)" if len(m["blocks"]) > 4 else ""
            keys = ", ".join(repr(k) for k in m["keys"])
            lines.append(
                f"  stored item [{m['start']}, {m['end']}) of {keys}: "
                f"{_n(len(m['blocks']), 'block')} differ: {blocks}{more}"
            )
    verdict = "every stored byte matches" if report["ok"] else _verify_problem(report)
    lines += ["", f"result: {verdict}"]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------- main


def _exit_code(exc: BaseException) -> int:
    if isinstance(exc, (UsageError, InvalidPathError, ConfigError)):
        return EXIT_USAGE
    if isinstance(exc, NotFoundError):
        return EXIT_NOT_FOUND
    if isinstance(exc, (AccessDeniedError, NoCredentialsError)):
        return EXIT_ACCESS_DENIED
    if isinstance(exc, CheckpointFormatError):
        return EXIT_CORRUPT
    if isinstance(exc, ChecksumMismatchError):
        return EXIT_MISMATCH  # what describes the checkpoint did not match, read twice
    return EXIT_ERROR


def _verify(path: CheckpointPath, config: ReaderConfig, only: str | None) -> dict[str, Any]:
    from ._driver import PrivateLoopDriver  # the S3 stack: only commands that read a checkpoint
    from .dcp._audit import audit_checkpoint

    metadata, _, _, format, checksum = _describe(path, config, "auto", only)
    catalog = METADATA_NAME if format == "dcp" else _INDEX_NAME
    _stored_items(metadata, f"s3://{path.bucket}/{path.key(catalog)}")  # validated
    record = _integrity(metadata, path) if format == "dcp" else None
    driver = PrivateLoopDriver(config)
    try:
        audits = audit_checkpoint(metadata, path, config, driver, record)
    finally:
        driver.close()
    described = None  # a safetensors checkpoint without an index: nothing read whole
    if format == "dcp" or checksum is not None:
        described = {"key": path.key(catalog), "checksum": checksum}
    return verify_report(path, audits, record is not None, described)


def _run(args: argparse.Namespace) -> tuple[str, int, str]:
    """The command's output, its exit code and (for a non-zero one) the line for stderr."""
    from .safetensors._catalog import safetensors_location

    config = _config(args)
    path, only = safetensors_location(parse_checkpoint_path(args.checkpoint))
    if args.command == "verify":
        report = _verify(path, config, only)
        code = _verify_exit(report)
        text = json.dumps(report, indent=2) + "\n" if args.json else render_verify(report)
        return text, code, "" if code == EXIT_OK else _verify_problem(report)
    requested = _requested_keys(args) if args.command == "plan" else None
    metadata, size, latency, format, _ = _describe(path, config, "auto", only)
    if args.command == "inspect":
        report = inspect_report(metadata, path, size, format)
        render = render_inspect
    else:
        sliced = None
        if args.slice:
            where = f"s3://{path.bucket}/{path.key(METADATA_NAME)}"
            fqns = set(metadata.state_dict_metadata)
            fqns |= {item.fqn for item in _stored_items(metadata, where)}
            selected = fqns if requested is None else _select(requested, fqns)
            sliced = slice_load(metadata, path, config, selected, args.slice, latency, format)
        report = plan_report(metadata, path, config, requested, latency, sliced)
        render = render_plan
    if args.json:
        return json.dumps(report, indent=2, allow_nan=False) + "\n", EXIT_OK, ""
    return render(report), EXIT_OK, ""


def _silence_stdout() -> None:
    """Point stdout at /dev/null so the interpreter's final flush does not fail again."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):
        pass


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line ``argv`` (default ``sys.argv[1:]``); returns the exit code."""
    if argv is None:
        # The program itself (console script, ``python -m aiodcp``): a short-lived process that
        # has just imported torch, whose ~250,000 objects every full collection would scan
        # again (0.12-0.2 s each, one of them at exit). Left out of collections from here on.
        gc.freeze()
    parser = _build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version, or a usage error argparse has printed
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    try:
        output, code, problem = _run(args)
    except (AiodcpError, UsageError) as exc:
        sys.stderr.write(f"{_PROG} {args.command}: error: {exc}\n")
        return _exit_code(exc)
    except KeyboardInterrupt:
        sys.stderr.write(f"{_PROG} {args.command}: interrupted\n")
        return 130
    try:
        sys.stdout.write(output)
        sys.stdout.flush()
    except BrokenPipeError:  # `aiodcp plan ... | head`: the reader left, nothing to report
        _silence_stdout()
        return EXIT_ERROR
    if problem:
        sys.stderr.write(f"{_PROG} {args.command}: {problem}\n")
    return code
