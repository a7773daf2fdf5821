"""Cold start: what ``import aiodcp`` (and the CLI's module) import, in fresh processes.

``import aiodcp`` must not import the S3 stack (botocore, aiobotocore, aiohttp) nor the DCP
adapter: the names that need them resolve on first access (PEP 562). See benchmarks/README.md,
"Cold start".
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import aiodcp

from conftest import S3Server, save_checkpoint, upload_dir

SRC = Path(__file__).resolve().parent.parent / "src"
HEAVY = (
    "aiobotocore",
    "aiohttp",
    "botocore",
    "aiodcp._store",
    "aiodcp._engine",
    "aiodcp.dcp._storage_reader",
)


def _fresh(code: str) -> object:
    """Run ``code`` in a fresh interpreter (this checkout's aiodcp); its last stdout line."""
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")]),
    }
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


def _imported_after(statement: str) -> object:
    return _fresh(
        f"import json, sys\n{statement}\n"
        f"print(json.dumps(sorted(m for m in {HEAVY!r} if m in sys.modules)))"
    )


def test_import_aiodcp_leaves_the_s3_stack_out() -> None:
    assert _imported_after("import aiodcp") == []


def test_the_cli_module_imports_the_s3_stack_only_to_read_a_checkpoint() -> None:
    # `aiodcp --help`, argument errors: no S3 stack (and no DCP adapter)
    assert _imported_after("import aiodcp._cli") == []
    assert _imported_after("import aiodcp.dcp._session") == []


def test_lazy_names_resolve_and_are_listed_before_first_access() -> None:
    code = (
        "import json, aiodcp\n"
        "listed = set(aiodcp.__all__) <= set(dir(aiodcp))\n"
        "from aiodcp import S3StorageReader, load_checkpoint, prefetch, PrefetchHandle\n"
        "from aiodcp import S3ObjectReader\n"
        "from aiodcp.dcp import S3StorageReader as Adapter\n"
        "import torch.distributed.checkpoint as dcp\n"
        "ok = issubclass(S3StorageReader, dcp.StorageReader) and Adapter is S3StorageReader\n"
        "ok = ok and aiodcp.load_checkpoint is load_checkpoint and callable(prefetch)\n"
        "print(json.dumps([listed, ok, S3ObjectReader.__module__, PrefetchHandle.__name__]))"
    )
    assert _fresh(code) == [True, True, "aiodcp._objectreader", "PrefetchHandle"]


def test_unknown_names_still_raise_attribute_error() -> None:
    with pytest.raises(AttributeError, match="no attribute 'no_such_name'"):
        aiodcp.no_such_name  # noqa: B018
    assert not hasattr(aiodcp.dcp, "no_such_name")


def test_ssl_contexts_are_built_once_per_process_and_again_for_a_new_file(
    tmp_path: Path,
) -> None:
    from aiodcp import _store

    bundle = tmp_path / "ca.pem"
    bundle.write_text("one")
    built: list[object] = []

    def build() -> object:
        built.append(object())
        return built[-1]

    key = ("test", str(bundle))
    first = _store._shared_ssl_context(key, build, str(bundle))
    assert _store._shared_ssl_context(key, build, str(bundle)) is first
    assert len(built) == 1
    bundle.write_text("a replaced bundle")  # another size: a new context, as a new client
    assert _store._shared_ssl_context(key, build, str(bundle)) is not first
    assert len(built) == 2


def test_load_checkpoint_is_reached_without_the_s3_stack() -> None:
    # the attribute an async program touches first on its loop imports nothing heavy
    assert _imported_after("import aiodcp\naiodcp.load_checkpoint") == []


def test_a_first_load_imports_the_s3_stack_off_the_callers_loop(
    tmp_path: Path, s3_server: S3Server
) -> None:
    """A fresh process's first ``await aiodcp.load_checkpoint`` imports botocore, aiobotocore
    and aiohttp (~0.4 s of CPU): in a worker thread, not on the caller's loop (where it
    stalled every other task for as long). An import hook in the process records which
    thread imported each."""
    s3 = s3_server.client()
    bucket = "cold-loop-import"
    s3.create_bucket(Bucket=bucket)
    sd = {"w": torch.randn(256, 256)}
    upload_dir(s3, save_checkpoint(sd, tmp_path / "c"), bucket, "c")
    code = f"""
import asyncio, json, sys, threading
import torch
import torch.distributed.checkpoint
import aiodcp

on_loop = {{}}

class Spy:
    def find_spec(self, name, path=None, target=None):
        if name in ("botocore", "aiobotocore", "aiohttp") and name not in on_loop:
            on_loop[name] = threading.current_thread() is threading.main_thread()
        return None

sys.meta_path.insert(0, Spy())

async def main():
    state = {{"w": torch.zeros(256, 256)}}
    await aiodcp.load_checkpoint(
        state, "s3://{bucket}/c", endpoint_url={s3_server.endpoint_url!r},
        region="us-east-1", addressing_style="path",
    )
    return float(state["w"].abs().sum())

total = asyncio.run(main())
print(json.dumps([on_loop, total]))
"""
    on_loop, total = _fresh(code)
    assert total == pytest.approx(float(sd["w"].abs().sum()), rel=1e-5)
    assert on_loop == {"botocore": False, "aiobotocore": False, "aiohttp": False}
