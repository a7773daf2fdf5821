"""The ``aiodcp`` command line, in process against moto's S3 server, plus a few real processes.

Every number the CLI reports is checked against an independent source: torch's own
``FileSystemReader`` metadata of the local checkpoint, the files on disk, and the ranged GETs a
real load sends (as moto's server logged them).
"""

from __future__ import annotations

import importlib.metadata
import io
import json
import os
import pickle
import subprocess
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint._extension import ZStandard
from torch.distributed.checkpoint.metadata import Metadata, TensorStorageMetadata

import aiodcp
from aiodcp._cli import main, parse_size, plan_report, render_plan
from aiodcp._path import parse_checkpoint_path
from aiodcp._planner import (
    DEFAULT_MAX_GAP_SIZE_BYTES,
    MAX_AUTO_GAP_SIZE_BYTES,
    MIN_AUTO_GAP_SIZE_BYTES,
    auto_gap_size,
)

from conftest import S3Server, save_checkpoint, upload_dir
from faultproxy import Fault, FaultProxy, _s3_error

ROOT = Path(__file__).parent.parent


def _state() -> dict[str, Any]:
    torch.manual_seed(0)
    return {
        "model": {
            "encoder": {"weight": torch.randn(64, 32), "bias": torch.randn(32)},
            "head": {"weight": torch.randn(10, 32).to(torch.bfloat16)},
            "embed": torch.randn(300, 16),
        },
        "optim": {"step": torch.tensor(7), "lr": 0.01},
        "epoch": 3,  # BYTE_IO
        "blob": io.BytesIO(b"raw bytes " * 40),  # BYTE_IO
        "zeros": torch.zeros(128, 128),  # compresses well
    }


@dataclass
class Checkpoint:
    url: str
    bucket: str
    prefix: str
    local: Path

    @property
    def metadata(self) -> Metadata:
        return dcp.FileSystemReader(str(self.local)).read_metadata()

    def stored_length(self, fqns: set[str]) -> int:
        return sum(i.length for k, i in self.metadata.storage_data.items() if k.fqn in fqns)


@dataclass
class Fixture:
    server: S3Server
    bucket: str
    plain: Checkpoint
    zstd: Checkpoint


@pytest.fixture(scope="module")
def ckpts(s3_server: S3Server, tmp_path_factory: pytest.TempPathFactory) -> Fixture:
    s3 = s3_server.client()
    bucket = f"cli-{uuid.uuid4().hex[:12]}"
    s3.create_bucket(Bucket=bucket)
    made = {}
    for name, kwargs in (("plain", {}), ("zstd", {"_extensions": [ZStandard()]})):
        local = save_checkpoint(_state(), tmp_path_factory.mktemp(name), thread_count=2, **kwargs)
        upload_dir(s3, local, bucket, f"runs/{name}")
        made[name] = Checkpoint(f"s3://{bucket}/runs/{name}", bucket, f"runs/{name}", local)
    return Fixture(s3_server, bucket, made["plain"], made["zstd"])


@dataclass
class Result:
    code: int
    out: str
    err: str

    def json(self) -> Any:
        return json.loads(self.out)


@pytest.fixture
def run(ckpts: Fixture, capsys: pytest.CaptureFixture[str]) -> Any:
    """``run("inspect", url, ...)``: main() in process against the test server."""

    def run(*argv: str) -> Result:
        common = ["--endpoint-url", ckpts.server.endpoint_url, "--addressing-style", "path"]
        code = main([*argv, *common])
        captured = capsys.readouterr()
        return Result(code, captured.out, captured.err)

    return run


# ------------------------------------------------------------------------------- inspect


def test_inspect_table_lists_every_key_in_aligned_columns(run: Any, ckpts: Fixture) -> None:
    result = run("inspect", ckpts.plain.url)
    assert result.code == 0, result.err
    assert result.err == ""
    lines = result.out.splitlines()
    top = next(i for i, line in enumerate(lines) if line.startswith("KEY"))
    header = lines[top]
    body = lines[top + 1 : lines.index("", top)]
    rows = {line.split()[0]: line for line in body}
    assert list(rows) == sorted(ckpts.plain.metadata.state_dict_metadata)
    for key, line in rows.items():  # each cell starts (text) or ends (numbers) under its header
        for column in ("KIND", "DTYPE", "SHAPE", "FILES", "COMPRESSION"):
            start = header.index(column)
            assert line[start - 1] == " " and line[start] != " ", (column, key, line)
        for column in ("CHUNKS", "STORED"):
            end = header.index(column) + len(column)
            assert line[end - 1] != " " and line[end] == " ", (column, key, line)
    assert rows["model.head.weight"].split()[1:4] == ["tensor", "bfloat16", "[10,"]
    assert "[10, 32]" in rows["model.head.weight"]
    assert rows["epoch"].split()[1:4] == ["bytes", "-", "-"]
    assert rows["blob"].split()[1] == "bytes"
    assert "9 keys (6 tensors, 3 bytes values)" in result.out
    assert "compression: none" in result.out
    assert "__0_0.distcp" in result.out and "__0_1.distcp" in result.out


def test_inspect_json_agrees_with_torch_metadata_and_files_on_disk(
    run: Any, ckpts: Fixture
) -> None:
    result = run("inspect", ckpts.plain.url, "--json")
    assert result.code == 0, result.err
    report = result.json()
    assert report["schema"] == "aiodcp.inspect/1"
    assert report["checkpoint"] == ckpts.plain.url
    assert report["metadata"] == {
        "key": "runs/plain/.metadata",
        "bytes": (ckpts.plain.local / ".metadata").stat().st_size,
    }
    metadata = ckpts.plain.metadata
    keys = {k["key"]: k for k in report["keys"]}
    assert list(keys) == sorted(metadata.state_dict_metadata)
    for fqn, meta in metadata.state_dict_metadata.items():
        entry = keys[fqn]
        stored = [i for k, i in metadata.storage_data.items() if k.fqn == fqn]
        assert entry["chunks"] == len(stored)
        assert entry["stored_bytes"] == sum(i.length for i in stored)
        assert entry["files"] == sorted({i.relative_path for i in stored})
        assert entry["compression"] == []
        if isinstance(meta, TensorStorageMetadata):
            assert entry["kind"] == "tensor"
            assert entry["dtype"] == str(meta.properties.dtype).removeprefix("torch.")
            assert entry["shape"] == list(meta.size)
        else:
            assert (entry["kind"], entry["dtype"], entry["shape"]) == ("bytes", None, None)
    assert keys["model.head.weight"]["dtype"] == "bfloat16"
    assert keys["optim.step"]["shape"] == []
    # thread_count=2 wrote two files; DCP packs items back to back, so each file's size is
    # the sum of its items.
    on_disk = {p.name: p.stat().st_size for p in ckpts.plain.local.glob("*.distcp")}
    assert len(on_disk) == 2
    assert {f["path"]: f["bytes"] for f in report["files"]} == on_disk
    assert [f["key"] for f in report["files"]] == [f"runs/plain/{n}" for n in sorted(on_disk)]
    summary = report["summary"]
    assert summary == {
        "keys": 9,
        "tensors": 6,
        "bytes_values": 3,
        "stored_items": len(metadata.storage_data),
        "stored_bytes": sum(on_disk.values()),
        "files": 2,
        "compression": [],
    }


def test_inspect_shows_zstd_compression(run: Any, ckpts: Fixture) -> None:
    report = run("inspect", ckpts.zstd.url, "--json").json()
    assert report["summary"]["compression"] == ["stream.zstd/1"]
    assert all(k["compression"] == ["stream.zstd/1"] for k in report["keys"])
    zeros = next(k for k in report["keys"] if k["key"] == "zeros")
    assert zeros["stored_bytes"] < 128 * 128 * 4 // 10  # stored compressed
    assert zeros["stored_bytes"] == ckpts.zstd.stored_length({"zeros"})
    table = run("inspect", ckpts.zstd.url)
    assert table.code == 0
    assert "compression: stream.zstd/1" in table.out
    assert all("stream.zstd/1" in line for line in table.out.splitlines() if "tensor" in line)


# ------------------------------------------------------------------------------- plan


def _wire_ranges(server: S3Server, ckpt: Checkpoint) -> list[tuple[str, int, int]]:
    """(file, start, end) of every ranged GET of a data file the server logged."""
    found = []
    for request in server.requests():
        path = request["path"]
        if request["method"] == "GET" and request["range"] and ".distcp" in path:
            if path.startswith(f"/{ckpt.bucket}/{ckpt.prefix}/"):
                first, last = request["range"].removeprefix("bytes=").split("-")
                found.append((path.rsplit("/", 1)[1], int(first), int(last) + 1))
    return sorted(found)


def _template(fqns: set[str]) -> dict[str, Any]:
    """A state dict holding only ``fqns`` (nested like the saved one)."""
    template: dict[str, Any] = {}

    def walk(src: dict[str, Any], dst: dict[str, Any], prefix: str) -> None:
        for name, value in src.items():
            fqn = f"{prefix}{name}"
            if isinstance(value, dict):
                sub: dict[str, Any] = {}
                walk(value, sub, f"{fqn}.")
                if sub:
                    dst[name] = sub
            elif fqn in fqns:
                dst[name] = torch.empty_like(value) if isinstance(value, torch.Tensor) else value

    walk(_state(), template, "")
    return template


HALF = {"model.encoder.bias", "model.embed", "optim.lr", "epoch"}  # 4 of the 9 keys


@pytest.mark.parametrize(
    ("keys", "options"),
    [
        (None, []),
        (HALF, ["--max-gap-size", "0"]),
        (HALF, ["--max-gap-size", "0", "--part-size", "4KiB", "--max-concurrency", "3"]),
        ({"model"}, ["--max-gap-size", "inf", "--part-size", "1MiB"]),
    ],
    ids=["all-keys", "half-gap0", "half-gap0-small-parts", "prefix-inf"],
)
def test_plan_matches_metadata_and_the_gets_a_real_load_sends(
    run: Any, ckpts: Fixture, keys: set[str] | None, options: list[str]
) -> None:
    ckpt = ckpts.plain
    all_keys = set(ckpt.metadata.state_dict_metadata)
    argv = ["plan", ckpt.url, "--json", *options]
    if keys is not None:
        argv += ["--keys", *sorted(keys)]
    result = run(*argv)
    assert result.code == 0, result.err
    report = result.json()
    totals = report["totals"]
    chosen = all_keys
    if keys is not None:
        chosen = {k for k in all_keys if any(k == s or k.startswith(f"{s}.") for s in keys)}
    assert set(report["keys"]) == chosen
    assert report["requested_keys"] == (None if keys is None else sorted(keys))
    # Independent: the stored lengths of the chosen keys, from torch's own reader.
    assert totals["bytes_needed"] == ckpt.stored_length(chosen)
    parts = [(f["path"], p["start"], p["end"]) for f in report["files"] for g in f["groups"]
             for p in g["parts"]]  # fmt: skip
    assert totals["requests"] == len(parts) == sum(f["requests"] for f in report["files"])
    assert totals["bytes_requested"] == sum(end - start for _, start, end in parts)
    assert totals["gap_bytes"] == totals["bytes_requested"] - totals["bytes_needed"]
    ranges = [r for f in report["files"] for g in f["groups"] for r in g["ranges"]]
    assert totals["ranges"] == len(ranges) == sum(len(r["keys"]) for r in ranges)
    assert {k for r in ranges for k in r["keys"]} == chosen
    if "--part-size" in options:
        limit = parse_size(options[options.index("--part-size") + 1])
        assert all(end - start <= limit for _, start, end in parts)
    if keys == HALF:
        assert totals["gap_bytes"] == 0  # gap 0: nothing between items is downloaded
        assert totals["groups"] > totals["files"]  # ... so non-adjacent items split groups
    if "--max-concurrency" in options:
        assert totals["requests"] > 3 and totals["max_in_flight"] == 3

    # The plan is what a load does: the same GETs on the wire, the same byte counts.
    settings = report["settings"]
    gap = settings["max_gap_size"]
    ckpts.server.clear_log()
    template = _template(chosen)
    with aiodcp.S3StorageReader(
        ckpt.url,
        endpoint_url=ckpts.server.endpoint_url,
        addressing_style="path",
        max_gap_size=float("inf") if gap is None else gap,
        part_size=settings["part_size"],
        max_concurrency=settings["max_concurrency"],
    ) as reader:
        dcp.load(template, storage_reader=reader)
        stats = reader.stats
    assert stats is not None
    assert _wire_ranges(ckpts.server, ckpt) == sorted(parts)
    assert stats.requests == totals["requests"] + 1  # + .metadata
    assert stats.bytes_requested == totals["bytes_requested"]
    assert stats.bytes_used == totals["bytes_needed"]


def test_plan_gap_setting_changes_what_is_fetched(run: Any, ckpts: Fixture) -> None:
    keys = ["--keys", *sorted(HALF)]
    tight = run("plan", ckpts.plain.url, "--json", "--max-gap-size", "0", *keys).json()
    loose = run("plan", ckpts.plain.url, "--json", "--max-gap-size", "1MiB", *keys).json()
    assert loose["settings"]["max_gap_size"] == 1024 * 1024
    assert tight["totals"]["bytes_needed"] == loose["totals"]["bytes_needed"]
    assert loose["totals"]["groups"] == loose["totals"]["files"] < tight["totals"]["groups"]
    assert loose["totals"]["gap_bytes"] > 0 == tight["totals"]["gap_bytes"]


def test_plan_resolves_auto_from_its_metadata_request(run: Any, ckpts: Fixture) -> None:
    keys = ["--keys", *sorted(HALF)]
    default = run("plan", ckpts.plain.url, "--json", *keys).json()["settings"]
    explicit = run("plan", ckpts.plain.url, "--json", "--max-gap-size", "AUTO", *keys).json()
    for settings in (default, explicit["settings"]):
        assert settings["max_gap_size_policy"] == "auto"
        latency = settings["request_latency_s"]
        assert isinstance(latency, float) and latency >= 0
        assert settings["max_gap_size"] == auto_gap_size(latency)
        assert MIN_AUTO_GAP_SIZE_BYTES <= settings["max_gap_size"] <= MAX_AUTO_GAP_SIZE_BYTES
    fixed = run("plan", ckpts.plain.url, "--json", "--max-gap-size", "inf", *keys).json()
    assert fixed["settings"]["max_gap_size_policy"] == "fixed"
    assert fixed["settings"]["max_gap_size"] is None  # inf
    assert isinstance(fixed["settings"]["request_latency_s"], float)  # measured all the same
    human = run("plan", ckpts.plain.url, *keys)
    assert human.code == 0, human.err
    settings_line = human.out.splitlines()[1]
    assert settings_line.startswith("settings: max_gap_size ")
    assert (
        " (auto: .metadata GET " in settings_line
        and " ms), part_size 8.0 MiB (buffered 2.0 MiB)" in settings_line
    )


def test_plan_and_load_resolve_auto_the_same_way(
    ckpts: Fixture, capsys: pytest.CaptureFixture[str]
) -> None:
    """With the same measured latency, ``plan`` and a default load send the same GETs: both
    through a proxy holding each .metadata GET 0.3 s, which puts "auto" at its largest gap."""
    with FaultProxy(ckpts.server.endpoint_url) as proxy:
        proxy.add(Fault.stall(0.3), path_suffix="/.metadata")
        options = ["--endpoint-url", proxy.endpoint_url, "--addressing-style", "path"]
        code = main(["plan", ckpts.plain.url, "--json", "--keys", *sorted(HALF), *options])
        out = capsys.readouterr().out
        assert code == 0
        report = json.loads(out)
        assert report["settings"]["max_gap_size"] == MAX_AUTO_GAP_SIZE_BYTES
        assert report["settings"]["request_latency_s"] >= 0.25
        parts = sorted(
            (f["path"], p["start"], p["end"]) for f in report["files"] for g in f["groups"]
            for p in g["parts"]
        )  # fmt: skip
        ckpts.server.clear_log()
        template = _template(set(report["keys"]))
        with aiodcp.S3StorageReader(
            ckpts.plain.url, endpoint_url=proxy.endpoint_url, addressing_style="path"
        ) as reader:
            dcp.load(template, storage_reader=reader)
            stats = reader.stats
    assert stats is not None and stats.max_gap_size == MAX_AUTO_GAP_SIZE_BYTES
    assert _wire_ranges(ckpts.server, ckpts.plain) == parts
    assert stats.bytes_requested == report["totals"]["bytes_requested"]


def test_plan_report_without_a_measurement_uses_the_prior(ckpts: Fixture) -> None:
    path = parse_checkpoint_path(ckpts.plain.url)
    report = plan_report(ckpts.plain.metadata, path, aiodcp.ReaderConfig())
    assert report["settings"]["max_gap_size"] == DEFAULT_MAX_GAP_SIZE_BYTES
    assert report["settings"]["max_gap_size_policy"] == "auto"
    assert report["settings"]["request_latency_s"] is None
    assert "(auto: .metadata GET unmeasured)" in render_plan(report).splitlines()[1]


def test_plan_table_lists_groups_ranges_and_gets(run: Any, ckpts: Fixture) -> None:
    argv = ("plan", ckpts.plain.url, "--max-gap-size", "0", "--keys", *sorted(HALF))
    report = run(*argv, "--json").json()
    result = run(*argv)
    assert result.code == 0, result.err
    lines = result.out.splitlines()
    totals = report["totals"]
    assert lines[0] == (
        f"plan for {ckpts.plain.url}: 4 keys selected, {totals['ranges']} stored items in 2 files"
    )
    assert lines[1].startswith("settings: max_gap_size 0 B, part_size 8.0 MiB (buffered 2.0 MiB)")
    total = next(line for line in lines if line.startswith("total")).split()
    assert total[1:4] == [str(totals["ranges"]), str(totals["groups"]), str(totals["requests"])]
    assert sum(line.lstrip().startswith("GET ") for line in lines) == totals["requests"]
    assert sum(line.lstrip().startswith("range ") for line in lines) == totals["ranges"]
    assert sum(line.lstrip().startswith("group ") for line in lines) == totals["groups"]
    for key in HALF:
        assert any(line.lstrip().startswith("range ") and line.endswith(key) for line in lines)


def test_plan_keys_file_equals_keys(run: Any, ckpts: Fixture, tmp_path: Path) -> None:
    keys_file = tmp_path / "keys.txt"
    keys_file.write_text("# the half\n\n" + "\n".join(sorted(HALF)) + "\n  \n")
    pin = ("--max-gap-size", "1MiB")  # "auto" would follow each run's measured latency
    from_file = run("plan", ckpts.plain.url, "--json", *pin, "--keys-file", str(keys_file))
    from_args = run("plan", ckpts.plain.url, "--json", *pin, "--keys", *sorted(HALF))
    assert from_file.code == from_args.code == 0
    first, second = from_file.json(), from_args.json()
    for report in (first, second):
        latency = report["settings"].pop("request_latency_s")
        assert isinstance(latency, float) and latency >= 0
    assert first == second
    assert from_file.json()["totals"]["keys"] == 4


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("0", 0),
        ("4096", 4096),
        ("32MiB", 32 * 1024**2),
        ("32 mib", 32 * 1024**2),
        ("1GiB", 1024**3),
        ("1.5K", 1536),
        ("2MB", 2_000_000),
        ("7b", 7),
    ],
)
def test_parse_size(text: str, expected: int) -> None:
    assert parse_size(text) == expected


def test_parse_size_rejects_junk_and_inf_where_not_allowed() -> None:
    assert parse_size("inf", allow_inf=True) == float("inf")
    for bad in ("inf", "-1", "1.3B", "12XB", "", "MiB", "1e6"):
        with pytest.raises(ValueError, match="invalid size"):
            parse_size(bad)


# ------------------------------------------------------------------------------- errors


def _put(ckpts: Fixture, key: str, body: bytes) -> str:
    ckpts.server.client().put_object(Bucket=ckpts.bucket, Key=key, Body=body)
    return f"s3://{ckpts.bucket}/{key.rsplit('/', 1)[0]}"


class _Evil:
    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, ("echo pwned",))


@pytest.mark.parametrize(
    ("case", "code", "message"),
    [
        ("bad-url", 2, "is not an S3 URL"),
        ("bad-bucket-name", 2, "has no valid bucket name"),
        ("bad-size", 2, "argument --part-size: invalid size '12XB'"),
        ("bad-gap", 2, "argument --max-gap-size: invalid size 'soon'"),
        ("bad-concurrency", 2, "max_concurrency must be a positive int"),
        (
            "unknown-key",
            2,
            "unknown key 'model.encoder.wieght' (did you mean 'model.encoder.weight'",
        ),
        ("missing-keys-file", 2, "cannot read --keys-file"),
        ("no-bucket", 3, "bucket 'no-such-bucket-cli' does not exist"),
        ("no-checkpoint", 3, "is this a DCP checkpoint?"),
        ("not-a-pickle", 5, "is not a PyTorch DCP metadata file"),
        ("hostile-pickle", 5, "refusing to unpickle it"),
        ("not-metadata", 5, "not a DCP Metadata"),
    ],
)
def test_errors_exit_with_their_code_and_one_clear_line(
    run: Any, ckpts: Fixture, tmp_path: Path, case: str, code: int, message: str
) -> None:
    url = ckpts.plain.url
    argv: tuple[str, ...] = ("inspect", url)
    if case == "bad-url":
        argv = ("inspect", "s3:/bucket/ckpt")
    elif case == "bad-bucket-name":
        argv = ("plan", "s3://-x/ckpt")
    elif case == "bad-size":
        argv = ("plan", url, "--part-size", "12XB")
    elif case == "bad-gap":
        argv = ("plan", url, "--max-gap-size", "soon")
    elif case == "bad-concurrency":
        argv = ("plan", url, "--max-concurrency", "0")
    elif case == "unknown-key":
        argv = ("plan", url, "--keys", "model.encoder.wieght", "epoch")
    elif case == "missing-keys-file":
        argv = ("plan", url, "--keys-file", str(tmp_path / "nope.txt"))
    elif case == "no-bucket":
        argv = ("inspect", "s3://no-such-bucket-cli/ckpt")
    elif case == "no-checkpoint":
        argv = ("plan", f"s3://{ckpts.bucket}/runs/nothing")
        message = f"no .metadata at s3://{ckpts.bucket}/runs/nothing, is this a DCP checkpoint?"
    elif case == "not-a-pickle":
        argv = ("inspect", _put(ckpts, "junk/.metadata", b"not a pickle at all"))
    elif case == "hostile-pickle":
        argv = ("inspect", _put(ckpts, "evil/.metadata", pickle.dumps(_Evil())))
    elif case == "not-metadata":
        argv = ("plan", _put(ckpts, "dict/.metadata", pickle.dumps({"a": 1})))
    result = run(*argv)
    assert result.code == code, result.err
    assert message in result.err
    assert "Traceback" not in result.err
    assert result.out == ""
    if code != 2 or case == "unknown-key":  # our own errors: exactly one line
        assert result.err.count("\n") == 1 and result.err.startswith(f"aiodcp {argv[0]}: error:")


@pytest.mark.parametrize(
    ("fault", "code", "said"),
    [
        (Fault.internal_error(), 1, "InternalError: We encountered"),  # every attempt
        (Fault.slow_down(), 1, "SlowDown: Please reduce your request rate. (gave up after 5"),
        (Fault(name="501", error=_s3_error(501, "NotImplemented", "odd")), 1, "NotImplemented"),
        (Fault.access_denied(), 4, "access denied to s3://"),
    ],
    ids=["500", "503", "501", "403"],
)
def test_store_errors_map_to_exit_codes(
    ckpts: Fixture,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    fault: Fault,
    code: int,
    said: str,
) -> None:
    """The store's answer to the .metadata GET, injected on the wire: the exit code and the
    one-line message are those of the aiodcp error the load would raise."""
    monkeypatch.setattr(aiodcp._store, "RETRY_BACKOFF_BASE_S", 0.01)
    with FaultProxy(ckpts.server.endpoint_url) as proxy:
        proxy.add(fault, path_suffix="/.metadata")
        argv = ["inspect", ckpts.plain.url, "--endpoint-url", proxy.endpoint_url]
        got = main([*argv, "--addressing-style", "path"])
        err = capsys.readouterr().err
    assert got == code, err
    assert err.startswith("aiodcp inspect: error: ") and err.endswith("\n")
    assert err.count("\n") == 1
    assert "/runs/plain/.metadata" in err and said in err
    assert proxy.fault_count >= 1


def test_no_credentials_exits_4(
    run: Any, ckpts: Fixture, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    result = run("inspect", ckpts.plain.url)
    assert result.code == 4, result.err
    assert "no AWS credentials found" in result.err
    assert "Traceback" not in result.err


def test_access_denied_exits_4(run: Any, ckpts: Fixture) -> None:
    # An unsigned (anonymous) request to a private bucket: the server answers 403.
    result = run("inspect", ckpts.plain.url, "--unsigned")
    assert result.code == 4, result.err
    assert result.err.startswith(f"aiodcp inspect: error: access denied to s3://{ckpts.bucket}/")


def test_help_and_version_exit_0(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--version"]) == 0
    assert capsys.readouterr().out == f"aiodcp {aiodcp.__version__}\n"
    assert main(["plan", "--help"]) == 0
    out = capsys.readouterr().out
    assert "--max-gap-size SIZE" in out and "--keys-file FILE" in out
    assert main([]) == 2  # a command is required
    assert "required: COMMAND" in capsys.readouterr().err


def test_console_script_points_at_main() -> None:
    (entry,) = importlib.metadata.entry_points(group="console_scripts", name="aiodcp")
    assert entry.load() is main


# ------------------------------------------------------------------------------- processes


def _python_m(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "aiodcp", *args],
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_python_m_aiodcp_help() -> None:
    result = _python_m("--help")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: aiodcp ")
    assert "inspect" in result.stdout and "plan" in result.stdout
    assert "5 corrupt metadata" in result.stdout


def test_python_m_aiodcp_inspect(ckpts: Fixture) -> None:
    result = _python_m(
        "inspect", ckpts.zstd.url, "--json",
        "--endpoint-url", ckpts.server.endpoint_url, "--addressing-style", "path",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["summary"]["keys"] == 9
    assert report["summary"]["stored_bytes"] == ckpts.zstd.stored_length(
        set(ckpts.zstd.metadata.state_dict_metadata)
    )


def test_cli_walkthrough_example_runs() -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "cli_walkthrough.py")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert "OK: the walkthrough ran both commands" in out
    assert "$ aiodcp inspect s3://demo-bucket/walkthrough/step-100" in out
    assert "8 keys (5 tensors, 3 bytes values)" in out
    assert "model.2.weight  tensor  bfloat16  [10, 64]" in out
    # the plan: model.0 alone in one file, model.2's two items split by the 0 gap size
    assert "3 keys selected, 3 stored items in 2 files" in out
    total = next(line for line in out.splitlines() if line.startswith("total")).split()
    assert total[1:4] == ["3", "3", "3"]
    assert out.count("(exit code 0)") == 2


def test_plan_help_states_the_defaults_in_force(capsys: pytest.CaptureFixture[str]) -> None:
    """The help text is made from the defaults themselves, so it cannot go stale."""
    assert main(["plan", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    defaults = aiodcp.ReaderConfig()
    assert f"(default: {defaults.max_concurrency})" in text
    assert f"(default: {defaults.part_size / 2**20:.1f} MiB;" in text
    assert "256.0 KiB..8.0 MiB" in text
