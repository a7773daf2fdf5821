"""Safetensors on gloo ranks: resharding into DTensors (dim 0, dim 1, one file to four ranks,
FSDP2 through ``set_model_state_dict``), compared bit for bit with torch's
``HuggingFaceStorageReader`` on the same files downloaded; with sharing across ranks every
header is read once per job and every stored byte fetched once per job, and without it each
rank fetches only the runs its shards need (``tests/hf_worker.py`` ranks against moto)."""

from __future__ import annotations

import json
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from aiodcp.safetensors._header import FIRST_READ_BYTES, parse_header

import conftest
from conftest import S3Server, upload_dir

WORKER = Path(__file__).parent / "hf_worker.py"
RANK_TIMEOUT_S = 240  # a hang guard only

pytestmark = pytest.mark.slow


def run(world: int, args: list[str], env: dict[str, str] | None = None) -> list[dict[str, Any]]:
    outputs = conftest.run_ranks(WORKER, world, args, env, timeout=RANK_TIMEOUT_S)
    found = []
    for out in outputs:
        lines = [line for line in out.splitlines() if line.startswith("RESULT ")]
        if args[0] == "load":
            assert len(lines) == 1, out[-3000:]
            found.append(json.loads(lines[0].removeprefix("RESULT ")))
    return sorted(found, key=lambda r: r["rank"])


def saved(tmp_path: Path, s3_server: S3Server, kind: str, world: int) -> tuple[str, Path, str]:
    local = tmp_path / kind
    run(world, ["save", kind, str(local)])
    bucket = f"hf-{uuid.uuid4().hex[:12]}"
    s3 = s3_server.client()
    s3.create_bucket(Bucket=bucket)
    upload_dir(s3, local, bucket, "m")
    return f"s3://{bucket}/m", local, bucket


def tensor_spans(local: Path) -> dict[str, list[tuple[int, int]]]:
    """Per file, the byte ranges of its tensors (from its header)."""
    spans = {}
    for file in sorted(local.glob("*.safetensors")):
        raw = file.read_bytes()
        header = parse_header(raw, len(raw), str(file))
        spans[file.name] = [(t.begin, t.end) for t in header.tensors]
    return spans


def wire(server: S3Server, bucket: str) -> tuple[Counter[str], Counter[tuple[str, int]]]:
    """Header GETs per file (the first read, bytes 0..FIRST_READ_BYTES) and, per (file, byte),
    how many data GETs of the job asked for it."""
    headers: Counter[str] = Counter()
    per_byte: Counter[tuple[str, int]] = Counter()
    for r in server.requests():
        if r["method"] != "GET" or not r["path"].startswith(f"/{bucket}/"):
            continue
        name = r["path"].rsplit("/", 1)[1]
        if not name.endswith(".safetensors"):
            headers[name] += 1
            continue
        first, last = (int(x) for x in r["range"].removeprefix("bytes=").split("-"))
        if first == 0 and last == FIRST_READ_BYTES - 1:
            headers[name] += 1
            continue
        for b in range(first, last + 1):
            per_byte[(name, b)] += 1
    return headers, per_byte


def load(
    server: S3Server, url: str, local: Path, kind: str, world: int, api: str, **options: Any
) -> list[dict[str, Any]]:
    server.clear_log()
    env = {
        "TEST_S3_ENDPOINT": server.endpoint_url,
        "SHARE_OPTIONS": json.dumps({"max_gap_size": 0, **options}),
    }
    got = run(world, ["load", kind, url, str(local), api], env)
    for r in got:
        assert r["mismatched"] == [], r
        assert r["keys"], r
    return got


CASES = [
    # how it was saved, ranks that save, layout loaded into, ranks that load, API
    ("one", 1, "dim0", 4, "sync"),  # one file to four ranks
    ("shards", 1, "dim1", 2, "async"),
    ("shards", 1, "replicated", 2, "sync"),
    ("dcp", 2, "dim0", 4, "async"),  # DCP_SHARDING_INFO: chunks of a 2-rank save
    ("dcp", 2, "dim1", 2, "sync"),
    ("fsdp", 1, "fsdp", 2, "sync"),
    ("fsdp", 1, "fsdp", 4, "async"),
]


@pytest.mark.parametrize(("saved_as", "save_world", "kind", "world", "api"), CASES)
def test_shared_loads_match_torchs_reader_and_fetch_each_byte_once(
    tmp_path: Path,
    s3_server: S3Server,
    saved_as: str,
    save_world: int,
    kind: str,
    world: int,
    api: str,
) -> None:
    url, local, bucket = saved(tmp_path, s3_server, saved_as, save_world)
    got = load(s3_server, url, local, kind, world, api)
    headers, per_byte = wire(s3_server, bucket)
    files = sorted(p.name for p in local.glob("*.safetensors"))
    # every header read once for the whole job (and the index, when there is one)
    assert all(headers[f] == 1 for f in files), headers
    assert max(per_byte.values()) == 1  # no stored byte requested twice in the job
    spans = tensor_spans(local)
    for name, b in per_byte:  # every byte fetched is a tensor's (no gaps: max_gap_size=0)
        assert any(s <= b < e for s, e in spans[name])
    # every tensor byte is fetched: the ranks' shards together cover every tensor
    assert len(per_byte) == sum(e - s for f in files for s, e in spans[f])
    assert all(r["job"]["ranks"] == world for r in got)
    if kind == "dim0" and world > save_world:
        assert all(r["stats"]["sliced_items"] > 0 for r in got)  # each rank slices its rows
    if kind == "replicated":
        # every rank needs every tensor: each is fetched by one rank and sent; "big" goes
        # from the peer straight into the receiving ranks' destination
        assert all(r["stats"]["bytes_from_peers"] > 0 for r in got)
        assert any(r["stats"]["direct_items"] > 0 for r in got)


def test_without_sharing_each_rank_fetches_only_its_runs(
    tmp_path: Path, s3_server: S3Server
) -> None:
    url, local, bucket = saved(tmp_path, s3_server, "one", 1)
    got = load(s3_server, url, local, "dim0", 4, "sync", share_across_ranks=False)
    headers, per_byte = wire(s3_server, bucket)
    assert headers["model.safetensors"] == 4  # every rank read it for itself
    spans = tensor_spans(local)["model.safetensors"]
    needed = sum(e - s for s, e in spans)
    # Summed over the ranks, the bytes requested are the bytes their shards hold: the large
    # tensors sliced (no probes: a safetensors tensor's offsets are known), the small ones
    # fetched whole by every rank (a slice of them is not worth a request).
    fetched = sum(per_byte.values())
    small = sum(e - s for s, e in spans if e - s <= 4096 * 16)
    assert fetched <= needed + 3 * small
    assert all(r["stats"]["sliced_items"] > 0 for r in got)
    assert all(r["stats"]["direct_runs"] > 0 for r in got)  # rows straight into the shards
