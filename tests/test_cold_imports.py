"""Cold start: what ``import aiodcp`` (and the CLI's module) import, in fresh processes.

``import aiodcp`` must not import the S3 stack (botocore, aiobotocore, aiohttp) nor the DCP
adapter: the names that need them resolve on first access (PEP 562). A first load in the plain
case (``_native``) imports no botocore, aiobotocore or aiohttp at all, wherever its credentials
come from (environment, profile files, ``credential_process``, web identity, container
credentials, instance metadata: tests/credservers.py on 127.0.0.1) and whether its endpoint has
a path; any other imports them in a worker thread. See benchmarks/README.md, "Cold start".
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import aiodcp
from aiodcp import _checksum
from credservers import CredentialServer, fixed_credentials

from conftest import S3Server, StrictServer, save_checkpoint, upload_dir

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


STACK = ("aiobotocore", "aiohttp", "botocore")
LOADS = {
    "load_checkpoint": "asyncio.run(aiodcp.load_checkpoint(state, URL, **OPTIONS))",
    "dcp.load": (
        "with aiodcp.S3StorageReader(URL, **OPTIONS) as reader:\n"
        "    torch.distributed.checkpoint.load(state, storage_reader=reader)"
    ),
}


def _first_load(
    s3_server: S3Server | StrictServer,
    tmp_path: Path,
    load: str,
    *,
    endpoint_url: str | None = None,
    **options: object,
) -> object:
    """A fresh process: import torch's DCP and aiodcp, then one load (``LOADS[load]``) of a
    small checkpoint from moto (or the strict store); returns [which of STACK were imported,
    on the main thread or not (an import hook records it), the loaded tensor's sum]."""
    s3 = s3_server.client()
    bucket = "cold-loop-import"
    with contextlib.suppress(s3.exceptions.BucketAlreadyOwnedByYou):
        s3.create_bucket(Bucket=bucket)
    sd = {"w": torch.ones(256, 256)}
    upload_dir(s3, save_checkpoint(sd, tmp_path / "c"), bucket, "c")
    all_options = {
        "endpoint_url": endpoint_url or s3_server.endpoint_url,
        "region": "us-east-1",
        "addressing_style": "path",
        **options,
    }
    code = f"""
import asyncio, json, sys, threading
import torch
import torch.distributed.checkpoint
import aiodcp

on_loop = {{}}

class Spy:
    def find_spec(self, name, path=None, target=None):
        if name in {STACK!r} and name not in on_loop:
            on_loop[name] = threading.current_thread() is threading.main_thread()
        return None

sys.meta_path.insert(0, Spy())
URL = "s3://{bucket}/c"
OPTIONS = {all_options!r}
state = {{"w": torch.zeros(256, 256)}}
{LOADS[load]}
print(json.dumps([sorted(m for m in {STACK!r} if m in sys.modules), on_loop,
                  float(state["w"].sum())]))
"""
    return _fresh(code)


@pytest.mark.parametrize("load", sorted(LOADS))
def test_a_plain_first_load_imports_no_s3_stack(
    tmp_path: Path, s3_server: S3Server, load: str
) -> None:
    """Environment credentials and an explicit endpoint are the plain case: a fresh process's
    first load (``.metadata`` and data GETs) imports none of botocore, aiobotocore, aiohttp."""
    imported, on_loop, total = _first_load(s3_server, tmp_path, load)  # type: ignore[misc]
    assert total == 256 * 256
    assert imported == [] and on_loop == {}


def test_the_plain_load_check_sees_a_load_that_imports_the_stack(
    tmp_path: Path, s3_server: S3Server
) -> None:
    """The check above fails for a load that imports the stack: here one that is not plain
    (``extra`` set), which still loads correctly through botocore, importing it off the
    caller's loop (in a worker thread: it stalled every other task for ~0.4 s on the loop)."""
    imported, on_loop, total = _first_load(  # type: ignore[misc]
        s3_server, tmp_path, "load_checkpoint", extra={"user_agent_extra": "not-plain"}
    )
    assert total == 256 * 256
    assert imported == list(STACK)
    assert on_loop == {"botocore": False, "aiobotocore": False, "aiohttp": False}


@pytest.mark.parametrize("load", sorted(LOADS))
def test_a_first_load_that_is_not_plain_uses_botocore(
    tmp_path: Path, s3_server: S3Server, load: str
) -> None:
    """``fast_http=False`` (or a profile, see below): botocore, imported off the main
    thread."""
    imported, on_loop, total = _first_load(s3_server, tmp_path, load, fast_http=False)  # type: ignore[misc]
    assert total == 256 * 256
    assert imported == list(STACK)
    assert set(on_loop.values()) == {False}


def _clean_aws_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name in list(os.environ):
        if name.startswith("AWS_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "credentials"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")


SOURCES = ["profile", "process", "web_identity", "assume_role", "container", "imds"]


@pytest.mark.parametrize("source", SOURCES)
def test_a_first_load_with_credentials_from_elsewhere_imports_no_s3_stack(
    tmp_path: Path, s3_server: S3Server, monkeypatch: pytest.MonkeyPatch, source: str
) -> None:
    """Credentials from a profile, a credential_process, web identity (STS), container
    credentials or instance metadata (IMDSv2) are the plain case too: a fresh process's first
    load imports none of botocore, aiobotocore and aiohttp. moto accepts any credentials; the
    loopback services must have been asked."""
    _clean_aws_environment(monkeypatch, tmp_path)
    signers = {"AKIABASE": ("base-secret", None)}
    with CredentialServer(
        mint=fixed_credentials(), container_token="tok", signers=signers
    ) as creds:
        options: dict[str, object] = {}
        if source == "assume_role":
            (tmp_path / "credentials").write_text(
                "[base]\naws_access_key_id = AKIABASE\naws_secret_access_key = base-secret\n"
            )
            (tmp_path / "config").write_text(
                "[default]\nrole_arn = arn:aws:iam::1:role/r\nsource_profile = base\n"
            )
            monkeypatch.setenv("AWS_ENDPOINT_URL_STS", creds.url)
        elif source == "profile":
            (tmp_path / "config").write_text("[profile ck]\nregion = us-east-1\n")
            (tmp_path / "credentials").write_text(
                "[ck]\naws_access_key_id = testing\naws_secret_access_key = testing\n"
            )
            options["profile"] = "ck"
        elif source == "process":
            script = tmp_path / "process.py"
            script.write_text(
                "import json\nprint(json.dumps({'Version': 1, 'AccessKeyId': 'AKIAPROC',"
                " 'SecretAccessKey': 's', 'Expiration': '2031-01-01T00:00:00Z'}))\n"
            )
            (tmp_path / "config").write_text(
                f'[default]\ncredential_process = "{sys.executable}" "{script}"\n'
            )
        elif source == "web_identity":
            token = tmp_path / "token"
            token.write_text(creds.web_token)
            monkeypatch.setenv("AWS_WEB_IDENTITY_TOKEN_FILE", str(token))
            monkeypatch.setenv("AWS_ROLE_ARN", "arn:aws:iam::123456789012:role/r")
            monkeypatch.setenv("AWS_ENDPOINT_URL_STS", creds.url)
        elif source == "container":
            monkeypatch.setenv(
                "AWS_CONTAINER_CREDENTIALS_FULL_URI", creds.url + "/container/credentials"
            )
            monkeypatch.setenv("AWS_CONTAINER_AUTHORIZATION_TOKEN", "tok")
        else:
            monkeypatch.delenv("AWS_EC2_METADATA_DISABLED")
            monkeypatch.setenv("AWS_EC2_METADATA_SERVICE_ENDPOINT", creds.url)
        imported, on_loop, total = _first_load(s3_server, tmp_path, "load_checkpoint", **options)  # type: ignore[misc]
        asked = len(creds.requests)
    assert total == 256 * 256
    assert imported == [] and on_loop == {}
    assert asked == {"web_identity": 1, "assume_role": 1, "container": 1, "imds": 3}.get(source, 0)


@pytest.mark.parametrize("load", sorted(LOADS))
def test_a_first_load_from_an_endpoint_with_a_path_imports_no_s3_stack(
    tmp_path: Path, strict_server: StrictServer, load: str
) -> None:
    """A gateway serving S3 under a path (the strict store with a prefix, which verifies the
    signature over the whole path): plain too."""
    try:
        strict_server.path_prefix("")
        endpoint = strict_server.endpoint_url + "/s3/"
        imported = _first_load_prefixed(strict_server, tmp_path, load, endpoint)
    finally:
        strict_server.path_prefix("")
    assert imported[0] == [] and imported[1] == {} and imported[2] == 256 * 256


def _first_load_prefixed(
    strict: StrictServer, tmp_path: Path, load: str, endpoint: str
) -> list[object]:
    s3 = strict.client()  # uploads at the root, before the prefix is set
    bucket = "cold-prefixed"
    with contextlib.suppress(s3.exceptions.BucketAlreadyOwnedByYou):
        s3.create_bucket(Bucket=bucket)
    upload_dir(s3, save_checkpoint({"w": torch.ones(256, 256)}, tmp_path / "c"), bucket, "c")
    strict.path_prefix("/s3")
    code = f"""
import asyncio, json, sys, torch, torch.distributed.checkpoint, aiodcp
URL = "s3://{bucket}/c"
OPTIONS = {{"endpoint_url": {endpoint!r}, "region": "us-east-1"}}
state = {{"w": torch.zeros(256, 256)}}
{LOADS[load]}
print(json.dumps([sorted(m for m in {STACK!r} if m in sys.modules), {{}}, float(state["w"].sum())]))
"""
    result = _fresh(code)
    assert isinstance(result, list)
    return result


def test_the_reader_modules_leave_the_crc_library_to_a_load_that_checks() -> None:
    """awscrt (~30 ms of CPU to import) comes with neither ``import aiodcp`` nor
    ``S3StorageReader``'s module: a load imports it when it knows it will check bytes."""
    code = (
        "import json, sys\nimport aiodcp\naiodcp.S3StorageReader\naiodcp.load_checkpoint\n"
        "import aiodcp.dcp._storage_reader, aiodcp.safetensors\n"
        "print(json.dumps('awscrt' in sys.modules))"
    )
    assert _fresh(code) is False


@pytest.mark.parametrize("verify", [False, True])
def test_a_first_load_imports_the_crc_library_only_to_check(
    tmp_path: Path, s3_server: S3Server, verify: bool
) -> None:
    """A load that checks nothing (``verify_checksums=False``) never imports awscrt; one that
    checks a file read whole against moto's full-object checksum (a checkpoint without a
    record) imports it, and the load is right either way."""
    s3 = s3_server.client()
    bucket = "cold-crc-import"
    with contextlib.suppress(s3.exceptions.BucketAlreadyOwnedByYou):
        s3.create_bucket(Bucket=bucket)
    upload_dir(s3, save_checkpoint({"w": torch.ones(256, 256)}, tmp_path / "c"), bucket, "c")
    options = {
        "endpoint_url": s3_server.endpoint_url,
        "region": "us-east-1",
        "addressing_style": "path",
        "verify_checksums": verify,
    }
    code = f"""
import asyncio, json, sys
import torch
import aiodcp
state = {{"w": torch.zeros(256, 256)}}
stats = asyncio.run(aiodcp.load_checkpoint(state, "s3://{bucket}/c", **{options!r}))
print(json.dumps(["awscrt" in sys.modules, stats.verified_bytes, float(state["w"].sum())]))
"""
    imported, verified, total = _fresh(code)  # type: ignore[misc]
    assert total == 256 * 256
    assert imported is verify
    assert (verified > 0) is verify


def test_a_first_verified_load_of_a_recorded_checkpoint_leaves_awscrt_out(
    s3_server: S3Server,
) -> None:
    """A checkpoint aiodcp saved (an integrity record, CRC64NVME on every object) is checked
    whole, ``.metadata`` included, by a fresh process's first load with ISA-L's CRC64NVME
    alone: awscrt's ~30 ms import is not on that load's path (``_checksum``)."""
    s3 = s3_server.client()
    bucket = "cold-crc-recorded"
    with contextlib.suppress(s3.exceptions.BucketAlreadyOwnedByYou):
        s3.create_bucket(Bucket=bucket)
    options = {
        "endpoint_url": s3_server.endpoint_url,
        "region": "us-east-1",
        "addressing_style": "path",
    }
    url = f"s3://{bucket}/c"
    saved = {"w": torch.arange(256 * 256, dtype=torch.float32).view(256, 256), "n": 7}
    asyncio.run(aiodcp.save_checkpoint(saved, url, no_dist=True, **options))
    code = f"""
import asyncio, json, sys
import torch
import aiodcp
state = {{"w": torch.zeros(256, 256), "n": 0}}
stats = asyncio.run(aiodcp.load_checkpoint(state, "{url}", **{options!r}))
print(json.dumps(["awscrt" in sys.modules, stats.verified_bytes, stats.unverified_bytes,
                  stats.metadata_verified, float(state["w"].sum()), state["n"]]))
"""
    imported, verified, unverified, metadata_verified, total, n = _fresh(code)  # type: ignore[misc]
    assert (total, n) == (float(saved["w"].sum()), 7)  # type: ignore[union-attr]
    assert verified > 0 and unverified == 0 and metadata_verified is True
    # where isal exports no CRC64NVME (not its x86_64 wheels), awscrt is the CRC library
    assert imported is (_checksum._isal_crc64() is None)


LOAD_ONLY = (
    "aiodcp._planner",
    "aiodcp._reader",
    "aiodcp._engine",
    "aiodcp._sinks",
    "aiodcp.dcp._session",
    "aiodcp.dcp._sharing",
    "aiodcp.dcp._load",
    "aiodcp.dcp._archive",
    "aiodcp.dcp._format",
    "aiodcp.dcp._fastdecode",
    "aiodcp.dcp._slicing",
)
"""Modules only a load uses: a save imports none of them (each costs every saver process CPU
time, see benchmarks/README.md, "Saves")."""

SAVES = {
    "save_checkpoint": "asyncio.run(aiodcp.save_checkpoint(state, URL, **OPTIONS))",
    "dcp.save": (
        "with aiodcp.S3StorageWriter(URL, **OPTIONS) as writer:\n"
        "    torch.distributed.checkpoint.save(state, storage_writer=writer)"
    ),
    # the counterpart, to show the check can fail: a load imports them
    "dcp.load": (
        "with aiodcp.S3StorageReader(URL, **OPTIONS) as reader:\n"
        "    torch.distributed.checkpoint.load(state, storage_reader=reader)"
    ),
}


def _first_save(s3_server: S3Server, tmp_path: Path, save: str, bucket: str) -> object:
    """A fresh process: one ``SAVES[save]`` of a small state dict to moto; returns [which of
    LOAD_ONLY were imported, the names of the threads it started, the tensor's sum]."""
    s3 = s3_server.client()
    with contextlib.suppress(s3.exceptions.BucketAlreadyOwnedByYou):
        s3.create_bucket(Bucket=bucket)
    if save == "dcp.load":
        upload_dir(s3, save_checkpoint({"w": torch.ones(256, 256)}, tmp_path / "c"), bucket, "c")
    options = {
        "endpoint_url": s3_server.endpoint_url,
        "region": "us-east-1",
        "addressing_style": "path",
    }
    code = f"""
import asyncio, json, sys, threading, warnings
import torch
import torch.distributed.checkpoint
import aiodcp

warnings.simplefilter("ignore")  # dcp without a process group
started = set()
start = threading.Thread.start
def spy(self):
    started.add(self.name)
    return start(self)
threading.Thread.start = spy
URL = "s3://{bucket}/c"
OPTIONS = {options!r}
state = {{"w": torch.ones(256, 256) if {save!r} != "dcp.load" else torch.zeros(256, 256)}}
{SAVES[save]}
print(json.dumps([sorted(m for m in {LOAD_ONLY!r} if m in sys.modules), sorted(started),
                  float(state["w"].sum())]))
"""
    return _fresh(code)


@pytest.mark.parametrize("save", ["save_checkpoint", "dcp.save"])
def test_a_first_save_imports_no_load_only_module(
    tmp_path: Path, s3_server: S3Server, save: str
) -> None:
    """A fresh process's first save (either entry point) imports none of LOAD_ONLY, and the
    threads it starts say they save (``aiodcp-save``; ``dcp.save`` runs on the caller's)."""
    imported, threads, total = _first_save(s3_server, tmp_path, save, f"cold-save-{len(save)}")  # type: ignore[misc]
    assert total == 256 * 256
    assert imported == []
    assert "aiodcp-load" not in threads
    assert ("aiodcp-save" in threads) is (save == "save_checkpoint")


def test_the_load_only_check_sees_a_load(tmp_path: Path, s3_server: S3Server) -> None:
    """The check above fails for a process that loads: it imports the load-only modules."""
    imported, _, total = _first_save(s3_server, tmp_path, "dcp.load", "cold-save-load")  # type: ignore[misc]
    assert total == 256 * 256
    assert set(imported) >= {"aiodcp._planner", "aiodcp.dcp._load", "aiodcp.dcp._archive"}
