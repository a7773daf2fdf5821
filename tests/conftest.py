"""Shared fixtures: a real S3 server (moto, own process, 127.0.0.1) and checkpoint helpers.

Also what keeps the suite honest on a busy 2-core machine: ``HANG_GUARD_S`` and the helpers that
wait for a state itself (``wait_until``, ``eventually``, ``thread_inside``,
``innermost_coroutine``) instead of sleeping and hoping it was reached, and the Hypothesis
profile every property test runs under (no deadline: a slow machine is not a failing example).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import boto3
import pytest
import torch
import torch.distributed.checkpoint as dcp
from botocore.config import Config
from hypothesis import HealthCheck, settings

HERE = Path(__file__).parent

# Every property test: no per-example deadline (a stalled process is not a failing example) and no
# "too slow" health check (data generation slows down with the machine, not with a bug). Tests
# that pass their own @settings inherit these and override only what they name.
settings.register_profile(
    "aiodcp", deadline=None, suppress_health_check=[HealthCheck.too_slow], print_blob=True
)
settings.load_profile("aiodcp")

# Fake credentials, and never walk to the instance-metadata address for real ones.
os.environ.update(
    AWS_ACCESS_KEY_ID="testing",
    AWS_SECRET_ACCESS_KEY="testing",
    AWS_SESSION_TOKEN="testing",
    AWS_DEFAULT_REGION="us-east-1",
    AWS_EC2_METADATA_DISABLED="true",
)
for _var in ("AWS_PROFILE", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
    os.environ.pop(_var, None)


NOT_PLAIN: dict[str, Any] = {"extra": {"user_agent_extra": "aiodcp-tests-botocore-path"}}
"""Reader options that leave the plain case (``aiodcp._native``) and nothing else: the store
resolves, signs and falls back through botocore, as every store did before the native path."""


@pytest.fixture(params=["native", "botocore"])
def store_path(request: pytest.FixtureRequest) -> dict[str, Any]:
    """Reader options for each way a store can run: the plain case (native: no botocore) and
    through botocore (``NOT_PLAIN``). For the tests of store behaviour that both must keep."""
    return {} if request.param == "native" else dict(NOT_PLAIN)


# --------------------------------------------------------------------------- waiting for a state

HANG_GUARD_S = 60.0
"""How long a test waits for something that takes milliseconds when nothing is wrong: only a hang
or a blocked loop gets near it, never a busy machine (the suite runs on 2 shared cores at load
averages of 10 and more). A time bound in a test is this kind of guard, never a performance
goal: those are measured in benchmarks/."""


def wait_until(condition: Callable[[], object], what: str, guard_s: float = HANG_GUARD_S) -> None:
    """Poll ``condition`` (from a thread, not a loop) until it is true; fail the test naming
    ``what`` if it is not within ``guard_s`` (a hang guard)."""
    deadline = time.monotonic() + guard_s
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"{what}: not within {guard_s:.0f} s (a hang guard, not a time bound)")
        time.sleep(0.005)


async def eventually(
    condition: Callable[[], object], what: str, guard_s: float = HANG_GUARD_S
) -> None:
    """``wait_until`` for a test on an event loop: the loop runs while it polls."""
    deadline = time.monotonic() + guard_s
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"{what}: not within {guard_s:.0f} s (a hang guard, not a time bound)")
        await asyncio.sleep(0.005)


def thread_inside(function: str) -> bool:
    """Whether a thread of this process is inside a function of this name now (running or
    blocked there): e.g. a load blocked in ``wait_item`` waiting for a held download."""
    for frame in sys._current_frames().values():
        walk: Any = frame
        while walk is not None:
            if walk.f_code.co_name == function:
                return True
            walk = walk.f_back
    return False


def innermost_coroutine(task: asyncio.Task[Any]) -> str | None:
    """The name of the innermost coroutine function ``task`` is suspended in (what it waits on
    is a future, not a coroutine), or None if it is not suspended in one."""
    coro: Any = task.get_coro()
    name = None
    while coro is not None and getattr(coro, "cr_frame", None) is not None:
        name = coro.cr_code.co_name
        coro = coro.cr_await
    return name


@dataclass
class _LoggedServer:
    """A server process that appends one JSON line per request to ``log_path``."""

    log_path: Path

    def requests(self) -> list[dict[str, Any]]:
        """The requests logged so far; a line the server is still writing (no newline yet)
        is not one of them."""
        if not self.log_path.exists():
            return []
        with self.log_path.open() as f:
            return [json.loads(line) for line in f if line.endswith("\n") and line.strip()]

    def clear_log(self) -> None:
        self.log_path.write_text("")


@dataclass
class S3Server(_LoggedServer):
    endpoint_url: str

    def client(self) -> Any:
        return boto3.client("s3", endpoint_url=self.endpoint_url, region_name="us-east-1")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def rank_results(outputs: list[str]) -> list[dict[str, Any]]:
    """Each rank's ``RESULT <json>`` line (exactly one per output), ordered by its ``rank``."""
    found = []
    for out in outputs:
        lines = [line for line in out.splitlines() if line.startswith("RESULT ")]
        assert len(lines) == 1, out[-3000:]
        found.append(json.loads(lines[0].removeprefix("RESULT ")))
    return sorted(found, key=lambda r: r["rank"])


def run_ranks(
    worker: Path,
    world: int,
    args: list[str],
    env: dict[str, str] | None = None,
    timeout: float = 240,
) -> list[str]:
    """Run ``world`` gloo ranks of ``python worker *args`` on 127.0.0.1; their outputs, each
    checked to exit 0 (``timeout``: a hang guard). A rank that fails stops the others."""
    port = free_port()
    procs = []
    for rank in range(world):
        rank_env = dict(os.environ)
        rank_env.update(
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(port),
            GLOO_SOCKET_IFNAME="lo",
            RANK=str(rank),
            WORLD_SIZE=str(world),
            LOCAL_RANK=str(rank),
            OMP_NUM_THREADS="1",
            PYTHONWARNINGS="ignore",
            **(env or {}),
        )
        procs.append(
            subprocess.Popen(
                [sys.executable, str(worker), *args],
                env=rank_env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
        )
    outputs = []
    try:
        for proc in procs:
            out, _ = proc.communicate(timeout=timeout)
            outputs.append(out)
            assert proc.returncode == 0, out[-3000:]
    finally:
        for proc in procs:  # one rank failed: do not leave the others running
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
    return outputs


@contextlib.contextmanager
def server_process(args: list[str], banner: str) -> Iterator[list[int]]:
    """Run ``python <args>`` until the block ends; yields the ports it prints after ``banner``
    (its first line of output, once it listens)."""
    proc = subprocess.Popen(
        [sys.executable, *args], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        if not line.startswith(f"{banner} "):
            raise RuntimeError(f"{args[0]} did not start: {line!r}")
        yield [int(p) for p in line.split()[1:]]
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        if proc.stdout is not None:
            proc.stdout.close()


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    log = tmp_path_factory.mktemp("s3log") / "requests.jsonl"
    with server_process([str(HERE / "s3server.py"), "--log", str(log)], "PORT") as (port,):
        yield S3Server(endpoint_url=f"http://127.0.0.1:{port}", log_path=log)


@pytest.fixture
def s3(s3_server: S3Server) -> Any:
    return s3_server.client()


@pytest.fixture
def bucket(s3: Any) -> str:
    name = f"test-{uuid.uuid4().hex[:12]}"
    s3.create_bucket(Bucket=name)
    return name


@pytest.fixture
def reader_kwargs(s3_server: S3Server) -> dict[str, Any]:
    """Keyword arguments pointing aiodcp at the test server."""
    return {
        "endpoint_url": s3_server.endpoint_url,
        "region": "us-east-1",
        "addressing_style": "path",
    }


def upload_dir(s3: Any, local: Path, bucket: str, prefix: str) -> None:
    for path in sorted(local.iterdir()):
        key = f"{prefix}/{path.name}" if prefix else path.name
        s3.upload_file(str(path), bucket, key)


def save_checkpoint(state_dict: dict[str, Any], local: Path, **writer_kwargs: Any) -> Path:
    dcp.save(state_dict, storage_writer=dcp.FileSystemWriter(str(local), **writer_kwargs))
    return local


def load_local(template: dict[str, Any], local: Path) -> dict[str, Any]:
    """What torch's own FileSystemReader loads from the checkpoint on disk (the reference)."""
    dcp.load(template, storage_reader=dcp.FileSystemReader(str(local)))
    return template


def assert_same(actual: Any, expected: Any, path: str = "") -> None:
    """Every tensor equal (dtype, shape, bits) and every value equal, recursively."""
    if isinstance(expected, torch.Tensor):
        assert isinstance(actual, torch.Tensor), path
        assert actual.dtype == expected.dtype, path
        assert actual.shape == expected.shape, path
        assert torch.equal(actual, expected), path
    elif isinstance(expected, dict):
        assert isinstance(actual, dict), path
        assert set(actual) == set(expected), path
        for k in expected:
            assert_same(actual[k], expected[k], f"{path}.{k}")
    elif isinstance(expected, (list, tuple)):
        assert len(actual) == len(expected), path
        for i, (a, e) in enumerate(zip(actual, expected, strict=True)):
            assert_same(a, e, f"{path}[{i}]")
    else:
        assert actual == expected, path


# --------------------------------------------------------------------------- strict S3 (auth)


_NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))


@dataclass
class StrictServer(_LoggedServer):
    """tests/strictstore.py: S3's authentication rules in front of moto (HTTP and HTTPS)."""

    endpoint_url: str
    tls_endpoint_url: str
    ca_path: Path

    def client(self, region: str = "us-east-1", *, tls: bool = False, **kwargs: Any) -> Any:
        """A boto3 S3 client signing SigV4 with path addressing; ``kwargs`` go to boto3.client
        (a ``config`` is merged over the default one)."""
        config = Config(signature_version="s3v4", s3={"addressing_style": "path"})
        if "config" in kwargs:
            config = config.merge(kwargs.pop("config"))
        if tls:
            kwargs.setdefault("endpoint_url", self.tls_endpoint_url)
            kwargs.setdefault("verify", str(self.ca_path))
        kwargs.setdefault("endpoint_url", self.endpoint_url)
        return boto3.client("s3", region_name=region, config=config, **kwargs)

    def control(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(
            f"{self.endpoint_url}/_strict/{path}", data=data, method=method
        )
        with _NO_PROXY.open(request, timeout=10) as response:
            return json.loads(response.read())

    def mint_credentials(self, ttl: float, advertised_ttl: float | None = None) -> dict[str, Any]:
        """Temporary credentials in credential_process format; the server enforces ``ttl``,
        ``Expiration`` says ``advertised_ttl`` (default ``ttl``)."""
        body: dict[str, Any] = {"ttl": ttl}
        if advertised_ttl is not None:
            body["advertised_ttl"] = advertised_ttl
        result: dict[str, Any] = self.control("POST", "credentials", body)
        return result

    def revoke(self, access_key_id: str | None = None, *, all_temporary: bool = False) -> list[str]:
        body = {"access_key_id": access_key_id, "all_temporary": all_temporary}
        revoked: list[str] = self.control("POST", "revoke", body)["revoked"]
        return revoked

    def throttle(self, bucket: str, rate: float | None) -> None:
        self.control("PUT", f"buckets/{bucket}", {"rate": rate})

    def requester_pays(self, bucket: str, on: bool = True) -> None:
        self.control("PUT", f"buckets/{bucket}", {"requester_pays": on})

    def public(self, bucket: str, on: bool = True) -> None:
        self.control("PUT", f"buckets/{bucket}", {"public": on})

    def region_mode(self, mode: int) -> None:
        """400: AuthorizationHeaderMalformed with <Region>; 301: PermanentRedirect."""
        self.control("PUT", "config", {"region_mode": mode})

    def path_prefix(self, prefix: str) -> None:
        """Serve S3 under ``prefix`` (``/s3``: ``/s3/bucket/key``), as a gateway; "" for none."""
        self.control("PUT", "config", {"path_prefix": prefix})

    def hold_conditional(self, on: bool) -> None:
        """While on, every conditional write waits in progress (a second one gets 409)."""
        self.control("PUT", "config", {"hold_conditional": on})

    def counters(self) -> dict[str, Any]:
        result: dict[str, Any] = self.control("GET", "counters")
        return result

    def reset_counters(self) -> None:
        self.control("DELETE", "counters")

    def reset(self) -> None:
        """Bucket settings cleared, region mode 400, the default credentials restored."""
        self.control("POST", "reset")


@pytest.fixture(scope="session")
def strict_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[StrictServer]:
    root = tmp_path_factory.mktemp("strict")
    log = root / "requests.jsonl"
    args = [str(HERE / "strictstore.py"), "--log", str(log), "--ca-dir", str(root / "ca")]
    with server_process(args, "PORTS") as (http_port, https_port):
        yield StrictServer(
            endpoint_url=f"http://127.0.0.1:{http_port}",
            tls_endpoint_url=f"https://localhost:{https_port}",
            ca_path=root / "ca" / "ca.pem",
            log_path=log,
        )


@pytest.fixture
def strict_bucket(strict_server: StrictServer) -> str:
    name = f"strict-{uuid.uuid4().hex[:12]}"
    strict_server.client().create_bucket(Bucket=name)
    return name
