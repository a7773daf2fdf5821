"""Hugging Face safetensors checkpoints, written by the ``safetensors`` library itself, loaded
from moto's S3 server through ``load_safetensors``, ``S3HuggingFaceStorageReader`` and
``prefetch``, and compared with torch's own ``HuggingFaceStorageReader`` (and
``safetensors.torch.load_file``) on the same files downloaded."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed.checkpoint as dcp
from safetensors.torch import load_file, save_file
from torch.distributed.checkpoint.api import CheckpointException

import aiodcp
from aiodcp.safetensors._header import FIRST_READ_BYTES

from conftest import S3Server, upload_dir

# Every dtype the format defines that torch has, as the safetensors library writes them.
DTYPES = [
    torch.bool,
    torch.uint8,
    torch.int8,
    torch.int16,
    torch.uint16,
    torch.float16,
    torch.bfloat16,
    torch.int32,
    torch.uint32,
    torch.float32,
    torch.float64,
    torch.int64,
    torch.uint64,
    torch.complex64,
    torch.float8_e4m3fn,
    torch.float8_e5m2,
    torch.float8_e8m0fnu,
    torch.float8_e4m3fnuz,
    torch.float8_e5m2fnuz,
    torch.float4_e2m1fn_x2,
]


def random_tensor(shape: tuple[int, ...], dtype: torch.dtype, seed: int) -> torch.Tensor:
    """Random bits of ``dtype`` (every byte pattern, NaNs included, for the float types)."""
    gen = torch.Generator().manual_seed(seed)
    if dtype == torch.bool:
        return torch.randint(0, 2, shape, generator=gen).bool()
    numel = 1
    for dim in shape:
        numel *= dim
    raw = torch.randint(0, 256, (numel * dtype.itemsize,), dtype=torch.uint8, generator=gen)
    return raw.view(dtype).reshape(shape) if numel else torch.empty(shape, dtype=dtype)


def bits(t: torch.Tensor) -> torch.Tensor:
    """``t``'s bytes, to compare bit for bit whatever the dtype (NaN != NaN otherwise)."""
    t = t.contiguous()
    return t.view(-1).view(torch.uint8) if t.numel() else torch.empty(0, dtype=torch.uint8)


def assert_bits(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert sorted(actual) == sorted(expected)
    for name, want in expected.items():
        got = actual[name]
        assert got.dtype == want.dtype, name
        assert got.shape == want.shape, name
        assert torch.equal(bits(got), bits(want)), name


def model_tensors(seed: int = 0) -> dict[str, torch.Tensor]:
    """A small Llama-shaped state dict: large weights (direct receipt), small norms, a 0-d and
    an empty tensor."""
    return {
        "model.embed_tokens.weight": random_tensor((512, 384), torch.bfloat16, seed),
        "model.layers.0.self_attn.q_proj.weight": random_tensor(
            (384, 384), torch.float32, seed + 1
        ),
        "model.layers.0.mlp.up_proj.weight": random_tensor((1024, 384), torch.bfloat16, seed + 2),
        "model.layers.0.input_layernorm.weight": random_tensor((384,), torch.float32, seed + 3),
        "model.layers.1.mlp.up_proj.weight": random_tensor((1024, 384), torch.float16, seed + 4),
        "model.norm.weight": random_tensor((384,), torch.bfloat16, seed + 5),
        "model.scale": random_tensor((), torch.float32, seed + 6),
        "model.empty": random_tensor((0, 7), torch.int64, seed + 7),
    }


def save_sharded(tensors: dict[str, torch.Tensor], local: Path, shards: int) -> Path:
    """``shards`` files ``model-0000k-of-0000n.safetensors`` and the index, as
    ``transformers``' ``save_pretrained`` lays them out."""
    local.mkdir(parents=True, exist_ok=True)
    names = sorted(tensors)
    weight_map: dict[str, str] = {}
    for k in range(shards):
        mine = names[k::shards]
        file = f"model-{k + 1:05d}-of-{shards:05d}.safetensors"
        save_file({n: tensors[n] for n in mine}, str(local / file), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(mine, file))
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    (local / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map})
    )
    return local


@pytest.fixture
def sharded(tmp_path: Path, s3: Any, bucket: str) -> tuple[str, dict[str, torch.Tensor], Path]:
    tensors = model_tensors()
    local = save_sharded(tensors, tmp_path / "model", 3)
    upload_dir(s3, local, bucket, "hf/model")
    return f"s3://{bucket}/hf/model", tensors, local


async def test_load_safetensors_returns_the_tensors_bit_exact(
    sharded: tuple[str, dict[str, torch.Tensor], Path], reader_kwargs: dict[str, Any]
) -> None:
    url, tensors, local = sharded
    loaded = await aiodcp.load_safetensors(url, **reader_kwargs)
    assert_bits(loaded, tensors)
    # the same as the safetensors library reads from the files themselves
    reference: dict[str, torch.Tensor] = {}
    for file in sorted(local.glob("*.safetensors")):
        reference.update(load_file(str(file)))
    assert_bits(loaded, reference)
    stats = loaded.stats
    assert stats.direct_items >= 3  # the large weights went from the socket into the tensors
    assert stats.files == 3


async def test_returned_tensors_are_the_callers_own(
    sharded: tuple[str, dict[str, torch.Tensor], Path], reader_kwargs: dict[str, Any]
) -> None:
    url, tensors, _ = sharded
    first = await aiodcp.load_safetensors(url, **reader_kwargs)
    second = await aiodcp.load_safetensors(url, **reader_kwargs)
    pointers = {t.data_ptr() for t in first.values() if t.numel()}
    assert not pointers & {t.data_ptr() for t in second.values() if t.numel()}
    for t in first.values():  # writable memory of their own, not a view of a shared buffer
        t.zero_() if t.dtype not in (torch.float4_e2m1fn_x2,) else None
    assert_bits(second, tensors)


def test_dcp_load_with_the_storage_reader_matches_torchs_reader(
    sharded: tuple[str, dict[str, torch.Tensor], Path], reader_kwargs: dict[str, Any]
) -> None:
    url, tensors, local = sharded
    mine = {n: torch.zeros_like(t) for n, t in tensors.items()}
    with aiodcp.S3HuggingFaceStorageReader(url, **reader_kwargs) as reader:
        dcp.load(mine, storage_reader=reader)
        stats = reader.stats
    theirs = {n: torch.zeros_like(t) for n, t in tensors.items()}
    dcp.load(theirs, storage_reader=dcp.HuggingFaceStorageReader(str(local)))
    assert_bits(mine, theirs)
    assert_bits(mine, tensors)
    assert stats is not None and stats.items == len(tensors) - 1  # the empty one is not fetched


async def test_keys_select_names_and_prefixes(
    sharded: tuple[str, dict[str, torch.Tensor], Path],
    reader_kwargs: dict[str, Any],
    s3_server: S3Server,
) -> None:
    url, tensors, _ = sharded
    loaded = await aiodcp.load_safetensors(
        url, keys=["model.layers.0", "model.norm.weight"], **reader_kwargs
    )
    want = {n: t for n, t in tensors.items() if n.startswith("model.layers.0.")}
    want["model.norm.weight"] = tensors["model.norm.weight"]
    assert_bits(loaded, want)
    with pytest.raises(aiodcp.ConfigError, match=r"model\.nrom\.weight.*did you mean"):
        await aiodcp.load_safetensors(url, keys=["model.nrom.weight"], **reader_kwargs)


async def test_into_fills_the_callers_state_dict(
    sharded: tuple[str, dict[str, torch.Tensor], Path], reader_kwargs: dict[str, Any]
) -> None:
    url, tensors, _ = sharded
    into = {
        "model.norm.weight": torch.zeros(384, dtype=torch.bfloat16),
        "model.layers.1.mlp.up_proj.weight": torch.zeros(1024, 384, dtype=torch.float16),
    }
    kept = {n: t.data_ptr() for n, t in into.items()}
    loaded = await aiodcp.load_safetensors(url, into=into, **reader_kwargs)
    assert {n: t.data_ptr() for n, t in loaded.items()} == kept
    assert_bits(into, {n: tensors[n] for n in into})
    with pytest.raises(aiodcp.ConfigError, match=r"model\.norm\.wieght"):
        await aiodcp.load_safetensors(
            url, into={"model.norm.wieght": torch.zeros(384)}, **reader_kwargs
        )


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_every_dtype_loads_bit_exact(
    dtype: torch.dtype, tmp_path: Path, s3: Any, bucket: str, reader_kwargs: dict[str, Any]
) -> None:
    # one large tensor (received straight into its destination), one small (buffered), one
    # 0-d and one empty (F4 is packed two to a byte: no 0-d tensor of it)
    tensors = {
        "large": random_tensor((1024, 640), dtype, 1),
        "small": random_tensor((3, 8), dtype, 2),
        "empty": random_tensor((0, 4), dtype, 3),
    }
    if dtype != torch.float4_e2m1fn_x2:
        tensors["scalar"] = random_tensor((), dtype, 4)
    local = tmp_path / "one"
    local.mkdir()
    save_file(tensors, str(local / "model.safetensors"))
    upload_dir(s3, local, bucket, "one")
    loaded = asyncio.run(aiodcp.load_safetensors(f"s3://{bucket}/one", **reader_kwargs))
    assert_bits(loaded, tensors)
    assert loaded.stats.direct_items == 1
    # a single file named by its URL
    url = f"s3://{bucket}/one/model.safetensors"
    assert_bits(asyncio.run(aiodcp.load_safetensors(url, **reader_kwargs)), tensors)


def test_a_dtype_torch_lacks_is_a_clear_error_naming_tensor_and_dtype(
    tmp_path: Path, s3: Any, bucket: str, reader_kwargs: dict[str, Any]
) -> None:
    header = {
        "ok": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
        "six": {"dtype": "F6_E2M3", "shape": [4], "data_offsets": [8, 11]},
    }
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    blob = len(raw).to_bytes(8, "little") + raw + torch.tensor([1.0, 2.0]).numpy().tobytes()
    blob += b"\x01\x02\x03"
    s3.put_object(Bucket=bucket, Key="f6/model.safetensors", Body=blob)
    url = f"s3://{bucket}/f6"
    with pytest.raises(aiodcp.UnsupportedDtypeError, match=r"'six'.*F6_E2M3") as info:
        asyncio.run(aiodcp.load_safetensors(url, **reader_kwargs))
    assert info.value.fqn == "six" and info.value.dtype == "F6_E2M3"
    # the other tensors load
    loaded = asyncio.run(aiodcp.load_safetensors(url, keys=["ok"], **reader_kwargs))
    assert loaded["ok"].tolist() == [1.0, 2.0]
    # and through dcp.load, before anything is fetched
    with (
        aiodcp.S3HuggingFaceStorageReader(url, **reader_kwargs) as reader,
        pytest.raises(CheckpointException, match=r"'six'.*F6_E2M3"),
    ):
        dcp.load({"six": torch.zeros(4, dtype=torch.uint8)}, storage_reader=reader)


def test_without_an_index_the_directory_is_listed(
    tmp_path: Path, s3: Any, bucket: str, reader_kwargs: dict[str, Any]
) -> None:
    tensors = model_tensors(3)
    local = save_sharded(tensors, tmp_path / "m", 2)
    (local / "model.safetensors.index.json").unlink()
    (local / "README.md").write_text("not a tensor file")
    upload_dir(s3, local, bucket, "listed")
    s3.put_object(
        Bucket=bucket, Key="listed/sub/other.safetensors", Body=b"ignored: not directly under"
    )
    loaded = asyncio.run(aiodcp.load_safetensors(f"s3://{bucket}/listed", **reader_kwargs))
    assert_bits(loaded, tensors)


def test_headers_take_one_get_per_file_and_a_second_only_when_longer(
    tmp_path: Path,
    s3: Any,
    bucket: str,
    reader_kwargs: dict[str, Any],
    s3_server: S3Server,
) -> None:
    # file a: a short header; file b: a header longer than the first read
    short = {"w": random_tensor((64,), torch.float32, 1)}
    long = {f"t{i:05d}.{'x' * 40}": random_tensor((2,), torch.int8, i) for i in range(2500)}
    local = tmp_path / "h"
    local.mkdir()
    save_file(short, str(local / "a.safetensors"))
    save_file(long, str(local / "b.safetensors"))
    raw = (local / "b.safetensors").read_bytes()
    assert int.from_bytes(raw[:8], "little") > FIRST_READ_BYTES
    (local / "model.safetensors.index.json").write_text(
        json.dumps(
            {
                "weight_map": {
                    **dict.fromkeys(short, "a.safetensors"),
                    **dict.fromkeys(long, "b.safetensors"),
                }
            }
        )
    )
    upload_dir(s3, local, bucket, "h")
    s3_server.clear_log()
    loaded = asyncio.run(aiodcp.load_safetensors(f"s3://{bucket}/h", keys=["w"], **reader_kwargs))
    assert_bits(loaded, short)
    gets = [r for r in s3_server.requests() if r["method"] == "GET"]
    per_key: dict[str, list[str | None]] = {}
    for r in gets:
        per_key.setdefault(r["path"].split("?")[0].rsplit("/", 1)[-1], []).append(r.get("range"))
    assert len(per_key["model.safetensors.index.json"]) == 1
    assert len(per_key["b.safetensors"]) == 2  # the first read, then the rest of its header
    assert len(per_key["a.safetensors"]) == 2  # its header, then the tensor "w"


def test_prefetch_of_a_safetensors_path_then_load_sends_no_more_requests(
    sharded: tuple[str, dict[str, torch.Tensor], Path],
    reader_kwargs: dict[str, Any],
    s3_server: S3Server,
) -> None:
    url, tensors, _ = sharded
    with aiodcp.prefetch(url, progress=False, **reader_kwargs) as handle:
        stats = handle.wait()
        assert handle.format == "safetensors"
        assert stats.bytes_used == sum(t.numel() * t.element_size() for t in tensors.values())
        s3_server.clear_log()
        mine = {n: torch.zeros_like(t) for n, t in tensors.items()}
        handle.load(mine)
        assert s3_server.requests() == []  # headers and tensors came from the prefetch
    assert_bits(mine, tensors)
    # a DCP path is still recognised as one (auto)


def test_inspect_shows_a_safetensors_directory(
    sharded: tuple[str, dict[str, torch.Tensor], Path],
    s3_server: S3Server,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from aiodcp._cli import main

    url, tensors, local = sharded
    common = ["--endpoint-url", s3_server.endpoint_url, "--addressing-style", "path"]
    assert main(["inspect", url, "--json", *common]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["format"] == "safetensors"
    keys = {k["key"]: k for k in report["keys"]}
    assert sorted(keys) == sorted(tensors)
    for name, t in tensors.items():
        entry = keys[name]
        assert entry["dtype"] == str(t.dtype).removeprefix("torch.")
        assert entry["shape"] == list(t.shape)
        assert entry["stored_bytes"] == t.numel() * t.element_size()
        assert entry["stored_dtype"] in ("F32", "BF16", "F16", "I64")
    files = {f["path"]: f for f in report["files"]}
    assert sorted(files) == sorted(p.name for p in local.glob("*.safetensors"))
    assert report["summary"]["tensors"] == len(tensors)
    # the human table, and a plan of one key
    assert main(["inspect", url, *common]) == 0
    table = capsys.readouterr().out
    assert "bfloat16 (BF16)" in table and "model-00001-of-00003.safetensors" in table
    assert main(["plan", url, "--keys", "model.norm.weight", "--json", *common]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["totals"]["bytes_needed"] == tensors["model.norm.weight"].numel() * 2
