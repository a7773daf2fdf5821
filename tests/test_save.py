"""Saving through ``S3StorageWriter`` to moto: a standard DCP checkpoint every reader loads, the
archives torch.save writes, the integrity record, and the commit protocol."""

from __future__ import annotations

import pickle
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed.checkpoint as dcp

import aiodcp
from aiodcp._checksum import crc64nvme
from aiodcp.dcp._integrity import DEFAULT_BLOCK_BYTES, Integrity, block_count

from conftest import S3Server, assert_same, save_checkpoint
from recorded import blocks_of, data_start_of

MIB = 1024 * 1024


def sample_state() -> dict[str, Any]:
    torch.manual_seed(0)
    return {
        "big": torch.randn(1536, 1024),  # 6 MiB: sent from its own memory
        "mid": torch.randn(300_000),  # 1.1 MiB
        "transposed": torch.randn(700, 300).t(),  # strided, storage exactly its bytes
        "view": torch.randn(200_000)[1000:150_000],  # a view: cloned first, as torch does
        "half": torch.randn(100_000).to(torch.bfloat16),
        "small": torch.arange(10, dtype=torch.int64),
        "scalar": torch.tensor(3.5),
        "step": 42,
        "nested": {"lr": 0.1, "names": ["a", "b"]},
    }


def blank(state: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in state.items():
        if isinstance(v, torch.Tensor):
            out[k] = torch.zeros(v.shape, dtype=v.dtype)
        elif isinstance(v, dict):
            out[k] = {kk: None for kk in v}
        else:
            out[k] = None
    return out


def objects(s3: Any, bucket: str, prefix: str) -> dict[str, bytes]:
    """Every object under ``prefix/``, by key relative to it."""
    found: dict[str, bytes] = {}
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix + "/"):
        for entry in page.get("Contents", []):
            body = s3.get_object(Bucket=bucket, Key=entry["Key"])["Body"].read()
            found[entry["Key"][len(prefix) + 1 :]] = body
    return found


def download(s3: Any, bucket: str, prefix: str, dest: Path) -> Path:
    for name, body in objects(s3, bucket, prefix).items():
        path = dest / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(body)
    return dest


def metadata_of(s3: Any, bucket: str, prefix: str) -> Any:
    return pickle.loads(s3.get_object(Bucket=bucket, Key=f"{prefix}/.metadata")["Body"].read())


@pytest.fixture
def writer_kwargs(reader_kwargs: dict[str, Any], store_path: dict[str, Any]) -> dict[str, Any]:
    return {**reader_kwargs, **store_path}


def save(state: dict[str, Any], url: str, **kwargs: Any) -> aiodcp.SaveStats:
    with aiodcp.S3StorageWriter(url, **kwargs) as writer, warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        dcp.save(state, storage_writer=writer)
        assert writer.stats is not None
        return writer.stats


def test_round_trip_with_every_reader(
    s3: Any, bucket: str, writer_kwargs: dict[str, Any], tmp_path: Path
) -> None:
    state = sample_state()
    stats = save(state, f"s3://{bucket}/ckpt", **writer_kwargs)
    assert stats.files == 1 and stats.items == len(state) + 1  # "nested" is two values
    assert stats.direct_bytes >= state["big"].nbytes + state["mid"].nbytes
    out = blank(state)
    dcp.load(out, storage_reader=aiodcp.S3StorageReader(f"s3://{bucket}/ckpt", **writer_kwargs))
    assert_same(out, state)
    # torch's own reader on a download of the objects
    local = download(s3, bucket, "ckpt", tmp_path / "dl")
    out = blank(state)
    dcp.load(out, storage_reader=dcp.FileSystemReader(str(local)))
    assert_same(out, state)


def test_items_are_the_archives_file_system_writer_stores(
    s3: Any, bucket: str, reader_kwargs: dict[str, Any], tmp_path: Path
) -> None:
    """Each stored item is byte for byte what FileSystemWriter writes for it: torch.save's
    archive of the same tensor (or the planner's pickle of the same value)."""
    state = sample_state()
    save(state, f"s3://{bucket}/ckpt", **reader_kwargs)
    local = save_checkpoint(state, tmp_path / "fs")
    ours = metadata_of(s3, bucket, "ckpt")
    theirs = pickle.loads((local / ".metadata").read_bytes())
    files = objects(s3, bucket, "ckpt")
    assert set(ours.storage_data) == set(theirs.storage_data)
    for index, info in theirs.storage_data.items():
        expected = (local / info.relative_path).read_bytes()[
            info.offset : info.offset + info.length
        ]
        mine = ours.storage_data[index]
        got = files[mine.relative_path][mine.offset : mine.offset + mine.length]
        assert got == expected, index
    assert ours.state_dict_metadata == theirs.state_dict_metadata
    assert ours.storage_meta.checkpoint_id == f"s3://{bucket}/ckpt"


def test_integrity_record_describes_what_the_store_holds(
    s3: Any, bucket: str, writer_kwargs: dict[str, Any]
) -> None:
    state = sample_state()
    state["huge"] = torch.randn(5 * MIB)  # 20 MiB: a multipart upload
    stats = save(state, f"s3://{bucket}/ckpt", files_per_rank=2, **writer_kwargs)
    assert stats.multipart_uploads >= 1 and stats.parts >= 3 and stats.files == 2
    record = Integrity.of(metadata_of(s3, bucket, "ckpt"), "ckpt")
    assert record is not None and record.block_bytes == DEFAULT_BLOCK_BYTES
    files = objects(s3, bucket, "ckpt")
    assert set(record.files) == {n for n in files if n != ".metadata"}
    for name, entry in record.files.items():
        head = s3.head_object(Bucket=bucket, Key=f"ckpt/{name}", ChecksumMode="ENABLED")
        assert entry.etag == head["ETag"]
        assert entry.size == len(files[name]) == head["ContentLength"]
        assert entry.crc64nvme == crc64nvme(files[name])
    md = metadata_of(s3, bucket, "ckpt")
    aligned = 0
    for index, info in md.storage_data.items():
        blocks = record.item(info.relative_path, info.offset, info.length)
        assert blocks is not None
        data = files[info.relative_path][info.offset : info.offset + info.length]
        # Tensors sent from their own memory (128 KiB or more) have their blocks aligned on
        # their storage bytes, where zipfile finds them; anything else from its first byte.
        big = isinstance(state.get(index.fqn), torch.Tensor) and info.length > 130 * 1024
        assert blocks.data_start == (data_start_of(data) if big else 0), index
        aligned += bool(blocks.data_start)
        count = block_count(info.length, DEFAULT_BLOCK_BYTES, blocks.data_start)
        assert len(blocks.crcs) == count
        expected = [crc64nvme(b) for b in blocks_of(data, DEFAULT_BLOCK_BYTES, blocks.data_start)]
        assert list(blocks.crcs) == expected, index
    assert aligned >= 2  # "huge" and the other large tensors


def test_overwrite_replaces_the_checkpoint_and_deletes_its_files(
    s3: Any, bucket: str, writer_kwargs: dict[str, Any]
) -> None:
    url = f"s3://{bucket}/ckpt"
    first = sample_state()
    save(first, url, **writer_kwargs)
    old_files = set(objects(s3, bucket, "ckpt")) - {".metadata"}
    second = {
        k: (v + 1 if isinstance(v, torch.Tensor) and v.is_floating_point() else v)
        for k, v in sample_state().items()
    }
    stats = save(second, url, **writer_kwargs)
    assert stats.deleted_files == len(old_files)
    now = set(objects(s3, bucket, "ckpt"))
    assert not old_files & now  # the replaced checkpoint's files are gone, no others
    out = blank(second)
    dcp.load(out, storage_reader=aiodcp.S3StorageReader(url, **writer_kwargs))
    assert_same(out, second)


def test_overwrite_false_refuses_and_leaves_the_checkpoint_intact(
    s3: Any, bucket: str, writer_kwargs: dict[str, Any]
) -> None:
    url = f"s3://{bucket}/ckpt"
    state = sample_state()
    save(state, url, **writer_kwargs)
    before = objects(s3, bucket, "ckpt")
    with pytest.raises(aiodcp.CheckpointExistsError, match="overwrite=False") as info:
        aiodcp_errors_of(lambda: save(sample_state(), url, overwrite=False, **writer_kwargs))
    assert isinstance(info.value, FileExistsError)
    assert objects(s3, bucket, "ckpt") == before


def aiodcp_errors_of(fn: Any) -> Any:
    """Run ``fn``, re-raising the aiodcp error inside torch's CheckpointException."""
    from torch.distributed.checkpoint.api import CheckpointException

    from aiodcp.dcp._session import _unwrap

    try:
        return fn()
    except CheckpointException as exc:
        raise _unwrap(exc) from None


def test_file_names_are_per_save_and_prefix_spread_is_recorded(
    s3: Any, bucket: str, reader_kwargs: dict[str, Any], tmp_path: Path
) -> None:
    url = f"s3://{bucket}/spread"
    state = sample_state()
    save(state, url, files_per_rank=4, prefix_spread=16, **reader_kwargs)
    md = metadata_of(s3, bucket, "spread")
    paths = {info.relative_path for info in md.storage_data.values()}
    assert len(paths) == 4
    for path in paths:
        spread, name = path.split("/")
        assert len(spread) == 1 and int(spread, 16) < 16
        assert name.startswith("__0_") and name.endswith(".distcp")
    out = blank(state)
    dcp.load(out, storage_reader=aiodcp.S3StorageReader(url, **reader_kwargs))
    assert_same(out, state)
    local = download(s3, bucket, "spread", tmp_path / "dl")
    out = blank(state)
    dcp.load(out, storage_reader=dcp.FileSystemReader(str(local)))
    assert_same(out, state)


def test_save_server_log_shows_data_first_metadata_last(
    s3_server: S3Server, bucket: str, reader_kwargs: dict[str, Any]
) -> None:
    s3_server.clear_log()
    state = sample_state()
    state["huge"] = torch.randn(3 * MIB)
    save(state, f"s3://{bucket}/order", **reader_kwargs)
    writes = [
        r for r in s3_server.requests() if r["method"] in ("PUT", "POST") and bucket in r["path"]
    ]
    assert writes[-1]["path"].endswith("/order/.metadata") and writes[-1]["method"] == "PUT"
    assert all(not r["path"].endswith(".metadata") for r in writes[:-1])
    assert any("uploadId" in r["query"] for r in writes)  # parts went as a multipart upload


# --------------------------------------------------------------------------- the contract


def test_writer_is_a_complete_storage_writer() -> None:
    import inspect

    assert issubclass(aiodcp.S3StorageWriter, dcp.StorageWriter)
    assert not getattr(aiodcp.S3StorageWriter, "__abstractmethods__", None)
    params = list(inspect.signature(aiodcp.S3StorageWriter).parameters.values())
    assert params[0].name == "checkpoint_id" and params[0].kind is params[0].POSITIONAL_OR_KEYWORD
    assert all(p.kind in (p.KEYWORD_ONLY, p.VAR_KEYWORD) for p in params[1:])
    assert {"region", "endpoint_url", "overwrite", "config"} <= {p.name for p in params}
    # torch passes rank and use_collectives only to a parameter literally named "kwargs"
    sig = inspect.signature(aiodcp.S3StorageWriter.set_up_storage_writer)
    assert "kwargs" in sig.parameters
    assert aiodcp.S3StorageWriter.validate_checkpoint_id("s3://bucket/ckpt")
    assert not aiodcp.S3StorageWriter.validate_checkpoint_id("/local/dir")
    save_sig = inspect.signature(aiodcp.save_checkpoint)
    assert list(save_sig.parameters)[:2] == ["state_dict", "checkpoint_id"]
    assert {"process_group", "no_dist", "planner", "overwrite"} <= set(save_sig.parameters)
    assert inspect.iscoroutinefunction(aiodcp.save_checkpoint)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"part_size": 1024 * 1024}, "part_size"),
        ({"part_size": 6 * 1024**3}, "part_size"),
        ({"files_per_rank": 0}, "files_per_rank"),
        ({"prefix_spread": -1}, "prefix_spread"),
        ({"memory_budget": 0}, "memory_budget"),
        ({"max_concurrency": 0}, "max_concurrency"),
        ({"overwrite": "yes"}, "overwrite"),
        ({"max_gap_size": 0}, "max_gap_size"),  # a load's option: not a save's
    ],
)
def test_bad_options_are_refused_by_name(kwargs: dict[str, Any], field: str) -> None:
    with pytest.raises(aiodcp.ConfigError, match=field) as info:
        aiodcp.S3StorageWriter("s3://bucket/ckpt", **kwargs)
    assert info.value.field == field


def test_writer_pickles_without_its_loop_and_saves_again(
    s3: Any, bucket: str, reader_kwargs: dict[str, Any]
) -> None:
    """dcp.async_save's PROCESS mode pickles the writer: without its thread and connections."""
    writer = aiodcp.S3StorageWriter(f"s3://{bucket}/a", **reader_kwargs)
    state = sample_state()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        dcp.save(state, storage_writer=writer)  # the writer now has a loop and connections
        clone = pickle.loads(pickle.dumps(writer))
        writer.close()
        assert clone.stats is None and clone.checkpoint_id == f"s3://{bucket}/a"
        clone.reset(f"s3://{bucket}/b")
        dcp.save(state, storage_writer=clone)
        clone.close()
    out = blank(state)
    dcp.load(out, storage_reader=aiodcp.S3StorageReader(f"s3://{bucket}/b", **reader_kwargs))
    assert_same(out, state)


def test_one_writer_saves_twice_under_new_names(
    s3: Any, bucket: str, reader_kwargs: dict[str, Any]
) -> None:
    """Each save through one writer names its files anew: the second never writes over the
    files the first checkpoint's .metadata names."""
    with aiodcp.S3StorageWriter(f"s3://{bucket}/ck", **reader_kwargs) as writer:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            dcp.save(sample_state(), storage_writer=writer)
            first = set(objects(s3, bucket, "ck"))
            dcp.save(sample_state(), storage_writer=writer)
    second = set(objects(s3, bucket, "ck"))
    assert first & second == {".metadata"} and len(second) == 2


def test_window_holds_at_most_its_size_in_flight() -> None:
    """The write phase's window of requests (``_save._Window``), on plain futures ended by
    another thread: ``add`` returns only with fewer than ``size`` requests in flight, and
    ``drain`` only once every one ended."""
    import concurrent.futures
    import threading

    from aiodcp.dcp._save import _Window

    from conftest import HANG_GUARD_S

    window = _Window(3)
    futures = [concurrent.futures.Future[Any]() for _ in range(3)]
    window.add(futures[0])
    window.add(futures[1])  # room: both return at once
    returned = threading.Event()

    def add_and_drain() -> None:
        window.add(futures[2])
        returned.set()
        window.drain()

    thread = threading.Thread(target=add_and_drain, daemon=True)
    thread.start()
    assert not returned.wait(0.2), "add returned with 3 requests in flight (size 3)"
    futures[0].set_result(None)
    assert returned.wait(HANG_GUARD_S), "add did not return once a request ended"
    futures[1].set_result(None)
    thread.join(0.2)
    assert thread.is_alive(), "drain returned with a request in flight"
    futures[2].set_result(None)
    thread.join(HANG_GUARD_S)
    assert not thread.is_alive(), "drain did not return once every request ended"


def test_window_raises_a_failed_request_at_the_next_add() -> None:
    """A request that failed is raised by the save's next ``add``, even while the window has
    room (the save stops producing parts at once), and a cancelled one as the save's
    cancellation."""
    import concurrent.futures

    from aiodcp.dcp._save import _Window

    window = _Window(8)
    window.add(concurrent.futures.Future[Any]())
    failed = concurrent.futures.Future[Any]()
    window.add(failed)
    failed.set_exception(OSError("refused"))
    with pytest.raises(OSError, match="refused"):
        window.add(concurrent.futures.Future[Any]())
    cancelled = concurrent.futures.Future[Any]()
    window.add(cancelled)
    cancelled.cancel()
    with pytest.raises(aiodcp.SaveCancelledError):
        window.add(concurrent.futures.Future[Any]())
