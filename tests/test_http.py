"""The fast ranged-GET path (``aiodcp._http``) end to end on the wire.

Every load here talks HTTP to the moto server on 127.0.0.1, through ``tests/faultproxy.py``
(extended below to count the TCP connections it accepts, to answer in ways the fast path does
not handle, and to close connections), and for TLS through a TLS-terminating loopback proxy in
front of it. Nothing of aiodcp is mocked: what is asserted is what crossed the wire (the
proxy's and moto's request logs) and what the load returned or raised.

A data GET sent by the fast path carries presigned query auth (``Signature=`` or
``X-Amz-Signature=``) and no ``Authorization`` header; one sent by botocore is the opposite.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import socket
import ssl
import struct
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import botocore.auth
import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException

import aiodcp
import aiodcp._http
import aiodcp._store
from aiodcp._http import Url

from conftest import (
    HANG_GUARD_S,
    NOT_PLAIN,
    S3Server,
    assert_same,
    eventually,
    save_checkpoint,
    thread_inside,
    upload_dir,
    wait_until,
)
from faultproxy import (
    CLEANUP_GUARD_S,
    Fault,
    FaultProxy,
    ProxyRequest,
    _Record,
    aiodcp_threads,
    established_to,
    unread_from,
)

BUCKET = "http-bucket"
LOAD_TIMEOUT_S = HANG_GUARD_S  # a guard against hangs only: every load here takes ~1 s or less
T = TypeVar("T")


# --------------------------------------------------------------------------- the checkpoint


@dataclass(frozen=True)
class Checkpoint:
    url: str
    bucket: str
    state: dict[str, Any]
    data_keys: list[str]

    def template(self) -> dict[str, Any]:
        return {
            k: torch.zeros_like(v) if isinstance(v, torch.Tensor) else None
            for k, v in self.state.items()
        }


def _make_checkpoint(local: Path, s3: Any, bucket: str, seed: int, files: int) -> Checkpoint:
    """24 tensors of 64 KiB and a non-tensor value, in ``files`` data files."""
    g = torch.Generator().manual_seed(seed)
    sd: dict[str, Any] = {f"t{i:02d}": torch.randn(64, 256, generator=g) for i in range(24)}
    sd["step"] = 41
    save_checkpoint(copy.deepcopy(sd), local, thread_count=files)
    upload_dir(s3, local, bucket, "ck")
    keys = sorted(f"ck/{p.name}" for p in local.iterdir() if p.suffix == ".distcp")
    assert len(keys) == files
    return Checkpoint(f"s3://{bucket}/ck", bucket, sd, keys)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory, s3_server: S3Server) -> Checkpoint:
    s3 = s3_server.client()
    s3.create_bucket(Bucket=BUCKET)
    return _make_checkpoint(tmp_path_factory.mktemp("http") / "ck", s3, BUCKET, 23, 4)


@pytest.fixture(autouse=True)
def no_env_proxy_and_fast_backoff(monkeypatch: pytest.MonkeyPatch) -> None:
    """A proxy from the environment would (rightly) send every GET through botocore; and
    retries wait as in production but 25x shorter."""
    for var in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(aiodcp._store, "RETRY_BACKOFF_BASE_S", 0.01)


# --------------------------------------------------------------------------- the proxies


@dataclass(eq=False)
class Rewrite:
    """Answer matching requests with ``build(status, reason, headers, body)`` of the upstream
    response, raw (the fault proxy's own rules can only answer well-formed responses)."""

    name: str
    predicate: Callable[[ProxyRequest], bool]
    build: Callable[[int, str, list[tuple[str, str]], bytes], bytes]
    times: int | None = None
    hits: int = 0


@dataclass
class _Counters:
    accepted: int = 0
    ports: list[int] = field(default_factory=list)
    stale: int = 0


class WireProxy(FaultProxy):
    """The fault proxy, plus: the TCP connections it accepted (``accepted``), raw rewrites of
    responses (``rewrite``), closing every idle client connection (``close_idle``), and closing
    each connection right after its response although that said keep-alive
    (``close_after_response``)."""

    def __init__(self, upstream: str) -> None:
        super().__init__(upstream, seed=99)
        self._counters = _Counters()
        self._rewrites: list[Rewrite] = []
        self._forgotten: set[socket.socket] = set()
        self.close_after_response = False

    @property
    def accepted(self) -> int:
        with self._lock:
            return self._counters.accepted

    def reset_counts(self) -> None:
        self.clear()
        with self._lock:
            self._counters = _Counters()
            self._rewrites.clear()

    def rewrite(self, rewrite: Rewrite) -> Rewrite:
        with self._lock:
            self._rewrites.append(rewrite)
        return rewrite

    def close_idle(self) -> None:
        """Close (FIN) every client connection the proxy holds; they are all idle here."""
        with self._lock:
            clients = list(self._clients)
        for sock in clients:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        assert self.wait_idle()

    def forget_open_connections(self) -> None:
        """Act as a server that forgot every connection open now (restarted, or a balancer's
        idle timeout): the next fast-path request on one of them gets a RST and no answer."""
        with self._lock:
            self._forgotten = set(self._clients)

    @property
    def stale_resets(self) -> int:
        with self._lock:
            return self._counters.stale

    def _serve(self, sock: socket.socket) -> None:
        with self._lock:
            self._counters.accepted += 1
            self._counters.ports.append(sock.getpeername()[1])
        super()._serve(sock)

    def _handle(self, sock: socket.socket, record: _Record, keep_alive: bool) -> bool:
        chosen = None
        with self._lock:
            if sock in self._forgotten and presigned(record.request):
                self._counters.stale += 1
                record.fault = "stale"
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                return False
            for rewrite in self._rewrites:
                if rewrite.predicate(record.request) and (
                    rewrite.times is None or rewrite.hits < rewrite.times
                ):
                    rewrite.hits += 1
                    chosen = rewrite
                    break
        if chosen is not None:
            status, reason, headers, body = self._forward(record.request, set())
            record.status, record.fault = status, chosen.name
            sock.sendall(chosen.build(status, reason, headers, body))
            return keep_alive
        keep = super()._handle(sock, record, keep_alive)
        return keep and not self.close_after_response


_HOP = {"connection", "keep-alive", "transfer-encoding", "content-length"}


def _head(status: int, reason: str, headers: list[tuple[str, str]], *extra: str) -> bytes:
    lines = [f"HTTP/1.1 {status} {reason}"]
    lines += [f"{n}: {v}" for n, v in headers if n.lower() not in _HOP]
    lines += [*extra, "Connection: keep-alive"]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def chunked(status: int, reason: str, headers: list[tuple[str, str]], body: bytes) -> bytes:
    """The same response with a chunked body (valid HTTP/1.1, which botocore reads fine)."""
    out = [_head(status, reason, headers, "Transfer-Encoding: chunked")]
    for i in range(0, len(body), 7000):
        chunk = body[i : i + 7000]
        out.append(f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n")
    out.append(b"0\r\n\r\n")
    return b"".join(out)


def with_trailing_junk(
    status: int, reason: str, headers: list[tuple[str, str]], body: bytes
) -> bytes:
    """The response, then bytes nobody asked for."""
    return _head(status, reason, headers, f"Content-Length: {len(body)}") + body + b"JUNK" * 8


class TlsProxy:
    """TLS on ``127.0.0.1:<port>``, forwarding the plain bytes to ``127.0.0.1:<upstream>``.

    Runs its own event loop on a thread, so the loads under test (on the test's loop or on
    aiodcp's private one) share nothing with it.
    """

    def __init__(self, upstream_port: int, cert: Path, key: Path) -> None:
        self._upstream_port = upstream_port
        self._context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self._context.load_cert_chain(cert, key)
        self._loop = asyncio.new_event_loop()
        self._loop.set_exception_handler(lambda loop, context: None)  # failed handshakes
        self._thread = threading.Thread(target=self._loop.run_forever, name="tls-proxy")
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self.port = 0

    def __enter__(self) -> TlsProxy:
        self._thread.start()
        self._server = asyncio.run_coroutine_threadsafe(
            asyncio.start_server(self._client, "127.0.0.1", 0, ssl=self._context), self._loop
        ).result(10)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    def __exit__(self, *exc: object) -> None:
        async def stop() -> None:
            assert self._server is not None
            self._server.close()
            for writer in list(self._writers):
                writer.transport.abort()
            current = asyncio.current_task()
            tasks = [t for t in asyncio.all_tasks() if t is not current]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await self._server.wait_closed()

        asyncio.run_coroutine_threadsafe(stop(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()

    @property
    def endpoint_url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        up_writer = None
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self._upstream_port)
            self._writers.add(up_writer)
            await asyncio.gather(_pipe(reader, up_writer), _pipe(up_reader, writer))
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            for w in (writer, up_writer):
                if w is not None:
                    self._writers.discard(w)
                    w.transport.abort()


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except OSError:
        pass
    finally:
        with contextlib.suppress(OSError, RuntimeError):
            if writer.can_write_eof():
                writer.write_eof()


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 (it is its own CA bundle)."""
    where = tmp_path_factory.mktemp("tls")
    cert, key = where / "cert.pem", where / "key.pem"
    subprocess.run(
        [
            *("/usr/bin/openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2"),
            *("-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"),
            *("-keyout", str(key), "-out", str(cert)),
        ],
        check=True,
        capture_output=True,
        timeout=60,
    )
    return cert, key


@pytest.fixture
def proxy(s3_server: S3Server) -> Iterator[WireProxy]:
    p = WireProxy(s3_server.endpoint_url)
    p.start()
    try:
        yield p
    finally:
        p.stop()


# --------------------------------------------------------------------------- helpers


def presigned(request: ProxyRequest) -> bool:
    """Sent by the fast path: query auth, no Authorization header."""
    query_auth = "Signature=" in request.query  # SigV2 Signature= or SigV4 X-Amz-Signature=
    return query_auth and "authorization" not in request.headers


def presigned_data(request: ProxyRequest) -> bool:
    """A data GET sent by the fast path (in the plain case the .metadata GET is presigned
    too)."""
    return presigned(request) and request.method == "GET" and request.path.endswith(".distcp")


def signed(request: ProxyRequest) -> bool:
    """Sent by botocore: an Authorization header, no query auth."""
    return "authorization" in request.headers and "Signature=" not in request.query


def data_gets(proxy: FaultProxy, key: str | None = None) -> list[ProxyRequest]:
    return [
        r
        for r in proxy.requests
        if r.method == "GET" and r.path.endswith(key if key is not None else ".distcp")
    ]


def range_start(request: ProxyRequest) -> int:
    assert request.range is not None
    return int(request.range.split("=")[1].split("-")[0])


def options(endpoint_url: str, **extra: Any) -> dict[str, Any]:
    return {
        "endpoint_url": endpoint_url,
        "region": "us-east-1",
        "addressing_style": "path",
        # 64 KiB parts, one item each: ~24 data GETs per load
        "part_size": 64 * 1024,
        **extra,
    }


async def aload(ck: Checkpoint, endpoint_url: str, **extra: Any) -> tuple[dict[str, Any], Any]:
    state = ck.template()
    stats = await asyncio.wait_for(
        aiodcp.load_checkpoint(state, ck.url, **options(endpoint_url, **extra)), LOAD_TIMEOUT_S
    )
    return state, stats


def in_thread(fn: Callable[[], T]) -> T:
    """``fn()`` on a thread of its own, so a hang fails the test instead of blocking it."""
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            box["result"] = fn()
        except BaseException as exc:
            box["error"] = exc

    thread = threading.Thread(target=run, name="test-http-sync", daemon=True)
    thread.start()
    thread.join(LOAD_TIMEOUT_S)
    assert not thread.is_alive(), "the load hung"
    if "error" in box:
        raise box["error"]
    result: T = box["result"]
    return result


def dcp_load(reader: aiodcp.S3StorageReader, ck: Checkpoint) -> tuple[dict[str, Any], Any]:
    state = ck.template()
    try:
        dcp.load(state, storage_reader=reader)
    except CheckpointException as exc:
        for failure in exc.failures.values():
            inner = failure[0] if isinstance(failure, tuple) else failure
            if isinstance(inner, BaseException):
                raise inner from None
        raise
    return state, reader.stats


def assert_clean(port: int, proxy: FaultProxy | None = None) -> None:
    """No task left on the test's loop, no aiodcp thread, no client connection to ``port``."""
    current = asyncio.current_task()
    assert [t for t in asyncio.all_tasks() if t is not current] == []
    deadline = time.monotonic() + CLEANUP_GUARD_S
    while aiodcp_threads() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert aiodcp_threads() == []
    if proxy is not None:
        assert proxy.wait_idle(), f"{proxy.open_connections} connections left open"
    assert established_to(port) == 0


def s3_error(status: int, code: str, message: str) -> Fault:
    body = (
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        f"<Error><Code>{code}</Code><Message>{message}</Message>"
        "<RequestId>WIRE</RequestId><HostId>wire</HostId></Error>"
    ).encode()
    return Fault(name=f"{status} {code}", error=(status, code, body))


# --------------------------------------------------------------------------- 1. the default path


@pytest.mark.parametrize("mode", ["async", "sync"])
async def test_data_gets_go_through_the_fast_path_by_default(
    mode: str, checkpoint: Checkpoint, proxy: WireProxy, s3_server: S3Server
) -> None:
    s3_server.clear_log()
    if mode == "async":
        state, stats = await aload(checkpoint, proxy.endpoint_url)
    else:

        def load() -> tuple[dict[str, Any], Any]:
            with aiodcp.S3StorageReader(checkpoint.url, **options(proxy.endpoint_url)) as r:
                return dcp_load(r, checkpoint)

        state, stats = await asyncio.to_thread(in_thread, load)
    assert_same(state, checkpoint.state)
    gets = data_gets(proxy)
    assert len(gets) >= 20 and stats.requests == len(gets) + 1 and stats.retries == 0
    assert all(presigned(r) for r in gets), [(r.query, sorted(r.headers)) for r in gets[:2]]
    assert all(r.headers["user-agent"].startswith("aiodcp/") for r in gets)
    assert all(r.range is not None and r.range.startswith("bytes=") for r in gets)
    # the .metadata GET takes the fast path too (the plain case): one GET without a Range,
    # presigned, asking for the object's checksum (a header the signature covers)
    (meta,) = [r for r in proxy.requests if r.path.endswith(".metadata")]
    assert presigned(meta) and meta.range is None, meta
    assert meta.headers["x-amz-checksum-mode"] == "ENABLED"
    assert "x-amz-checksum-mode" in meta.query, meta.query  # in X-Amz-SignedHeaders
    # moto saw the same: query auth on every data GET
    to_data = [r for r in s3_server.requests() if r["path"].endswith(".distcp")]
    logged = [r for r in to_data if r["method"] == "GET"]
    assert len(logged) == len(gets)
    assert all("Signature=" in r["query"] and r["status"] == 206 for r in logged)
    # and on the HEADs asking for each file's checksum (the checkpoint has no record, the
    # load reads every file whole), which took the fast path too
    heads = [r for r in to_data if r["method"] == "HEAD"]
    assert len(to_data) == len(logged) + len(heads)
    assert len(heads) == stats.checksum_requests == len(checkpoint.data_keys)
    assert all("Signature=" in r["query"] and r["status"] == 200 for r in heads)
    assert_clean(proxy.port, proxy)


@pytest.mark.parametrize("how", ["keyword", "config"])
async def test_fast_http_false_sends_data_gets_through_botocore(
    how: str, checkpoint: Checkpoint, proxy: WireProxy, s3_server: S3Server
) -> None:
    # A fixed gap: "auto" follows each load's measured latency, so ranges could differ.
    fast_state, _ = await aload(checkpoint, proxy.endpoint_url, max_gap_size=0)
    fast_gets = data_gets(proxy)
    proxy.reset_counts()
    s3_server.clear_log()
    extra: dict[str, Any] = (
        {"fast_http": False, "max_gap_size": 0}
        if how == "keyword"
        else {"config": aiodcp.ReaderConfig(fast_http=False, max_concurrency=3, max_gap_size=0)}
    )
    slow_state, stats = await aload(checkpoint, proxy.endpoint_url, **extra)
    gets = data_gets(proxy)
    assert gets and all(signed(r) for r in gets)
    assert not any(r["query"] for r in s3_server.requests() if r["path"].endswith(".distcp"))
    # the same requests either way, and bit-identical results
    assert sorted(r.range or "" for r in gets) == sorted(r.range or "" for r in fast_gets)
    assert stats.retries == 0
    assert_same(fast_state, checkpoint.state)
    assert_same(slow_state, checkpoint.state)
    assert_same(slow_state, fast_state)
    assert_clean(proxy.port, proxy)


# --------------------------------------------------------------------------- 2. keep-alive


async def test_a_load_reuses_its_connections(checkpoint: Checkpoint, proxy: WireProxy) -> None:
    state, stats = await aload(checkpoint, proxy.endpoint_url, max_concurrency=2)
    assert_same(state, checkpoint.state)
    gets = data_gets(proxy)
    assert len(gets) >= 20 and stats.retries == 0
    # at most one connection per concurrent GET, plus botocore's for .metadata
    assert proxy.accepted <= 2 + 1, f"{proxy.accepted} connections for {len(gets)} GETs"
    # load_checkpoint closes its store: nothing left open
    assert_clean(proxy.port, proxy)


def test_reader_keeps_connections_until_closed(checkpoint: Checkpoint, proxy: WireProxy) -> None:
    reader = aiodcp.S3StorageReader(checkpoint.url, **options(proxy.endpoint_url))
    try:
        for _ in range(2):  # the second load reuses the first one's connections too
            state, stats = in_thread(lambda: dcp_load(reader, checkpoint))
            assert_same(state, checkpoint.state)
            assert stats.retries == 0
        gets = data_gets(proxy)
        assert len(gets) >= 40
        assert proxy.accepted <= aiodcp.ReaderConfig().max_concurrency + 1 < len(gets)
        assert established_to(proxy.port) >= 1  # idle keep-alive connections, kept for reuse
    finally:
        reader.close()
    assert aiodcp_threads() == []
    assert established_to(proxy.port) == 0
    assert proxy.wait_idle()


# --------------------------------------------------------------------------- 3. stale connections


def test_idle_connections_closed_by_the_server_between_loads(
    checkpoint: Checkpoint, proxy: WireProxy
) -> None:
    with aiodcp.S3StorageReader(checkpoint.url, **options(proxy.endpoint_url)) as reader:
        state, _ = in_thread(lambda: dcp_load(reader, checkpoint))
        assert_same(state, checkpoint.state)
        assert established_to(proxy.port) >= 1
        proxy.close_idle()  # the server's idle timeout: every pooled connection gets a FIN
        first = proxy.accepted
        proxy.clear()
        state, stats = in_thread(lambda: dcp_load(reader, checkpoint))
        assert_same(state, checkpoint.state)
        assert stats.retries == 0
        assert proxy.accepted > first  # new connections, none of the closed ones
        assert stats.requests == len(data_gets(proxy)) + 1  # no GET was lost on a closed one
    assert established_to(proxy.port) == 0


async def test_server_closing_right_after_each_response(
    checkpoint: Checkpoint, proxy: WireProxy
) -> None:
    """Each response says keep-alive, then the server closes: a GET may be written to a
    connection whose FIN is already on its way. It is resent, not counted as a retry.
    (One GET at a time: with several, see test_resend_after_a_stale_connection_...)"""
    proxy.close_after_response = True
    state, stats = await aload(checkpoint, proxy.endpoint_url, max_concurrency=1)
    assert_same(state, checkpoint.state)
    assert stats.retries == 0
    gets = data_gets(proxy)
    assert all(presigned(r) for r in gets)
    assert proxy.accepted >= len(gets)  # one connection per request
    assert_clean(proxy.port, proxy)


async def test_reused_connection_reset_before_any_byte_is_resent_once(
    checkpoint: Checkpoint, proxy: WireProxy
) -> None:
    # One GET at a time: the 3rd data GET goes out on the connection of the 1st and 2nd.
    proxy.add(Fault.hang_up_now(), path_suffix=".distcp", predicate=presigned, nth=[3])
    state, stats = await aload(checkpoint, proxy.endpoint_url, max_concurrency=1)
    assert_same(state, checkpoint.state)
    assert proxy.faults["hang_up"] == 1
    assert stats.retries == 0 and stats.resumed_bytes == 0
    gets = data_gets(proxy)
    assert len(gets) == stats.requests - 1 + 1  # one silent resend, not in LoadStats
    assert range_start(gets[2]) == range_start(gets[3])  # the same range, sent again
    assert all(presigned(r) for r in gets)
    assert_clean(proxy.port, proxy)


@pytest.mark.parametrize("nth", [[1], [3, 4]], ids=["fresh-connection", "resend-fails-too"])
async def test_reset_that_is_not_a_stale_connection_counts_as_a_retry(
    nth: list[int], checkpoint: Checkpoint, proxy: WireProxy
) -> None:
    """A fresh connection reset is a real failure; and the silent resend happens only once.
    (The first data GET goes out on a fresh connection when the .metadata GET is botocore's,
    as it is outside the plain case: NOT_PLAIN.)"""
    proxy.add(Fault.hang_up_now(), path_suffix=".distcp", predicate=presigned, nth=nth)
    extra = NOT_PLAIN if nth == [1] else {}
    state, stats = await aload(checkpoint, proxy.endpoint_url, max_concurrency=1, **extra)
    assert_same(state, checkpoint.state)
    assert proxy.faults["hang_up"] == len(nth)
    assert stats.retries == 1
    # every GET sent is in LoadStats but the one silent resend (when the first reset was on a
    # reused connection)
    silent = 1 if nth[0] > 1 else 0
    assert len(data_gets(proxy)) == stats.requests - 1 + silent
    assert_clean(proxy.port, proxy)


# --------------------------------------------------------------------------- 4. TLS


async def test_tls_with_a_ca_bundle_uses_the_fast_path(
    checkpoint: Checkpoint, proxy: WireProxy, certificate: tuple[Path, Path]
) -> None:
    cert, key = certificate
    with TlsProxy(proxy.port, cert, key) as tls:
        for verify in (str(cert), False):
            proxy.reset_counts()
            state, stats = await aload(checkpoint, tls.endpoint_url, verify=verify)
            assert_same(state, checkpoint.state)
            assert stats.retries == 0
            gets = data_gets(proxy)
            assert len(gets) >= 20 and all(presigned(r) for r in gets), verify
            assert gets[0].headers["host"] == f"127.0.0.1:{tls.port}"
            assert proxy.accepted <= aiodcp.ReaderConfig().max_concurrency + 1
            assert_clean(tls.port)


async def test_tls_with_an_untrusted_certificate_fails_clearly(
    checkpoint: Checkpoint, proxy: WireProxy, certificate: tuple[Path, Path]
) -> None:
    cert, key = certificate
    with TlsProxy(proxy.port, cert, key) as tls:
        started = time.perf_counter()
        with pytest.raises(aiodcp.StorageError, match=r"(?i)certificate") as info:
            await aload(checkpoint, tls.endpoint_url, verify=True)
        elapsed = time.perf_counter() - started
        assert elapsed < LOAD_TIMEOUT_S, f"took {elapsed:.0f} s: a hang guard, not a bound"
        assert info.value.bucket == BUCKET and not info.value.retryable
        assert proxy.request_count == 0  # nothing got through the TLS handshake
        assert_clean(tls.port)

        # The fast path itself (the load above stopped at botocore's .metadata GET).
        store = aiodcp._store.S3Store(aiodcp.ReaderConfig(**options(tls.endpoint_url)))
        await store.open()
        try:
            sink = _Sink(100)
            with pytest.raises(aiodcp.StorageError, match="CERTIFICATE_VERIFY_FAILED") as info:
                await asyncio.wait_for(
                    store.fetch_range(
                        BUCKET, checkpoint.data_keys[0], 0, 100, if_match=None, sink=sink
                    ),
                    LOAD_TIMEOUT_S,
                )
            assert info.value.key == checkpoint.data_keys[0] and not info.value.retryable
            assert sink.received == 0
        finally:
            await store.close()
        assert proxy.request_count == 0
        assert_clean(tls.port)


class _Sink:
    """A plain ``RangeSink`` into one buffer (for the one direct ``fetch_range`` above)."""

    def __init__(self, size: int) -> None:
        self.data = bytearray(size)
        self.received = 0

    def begin(self, etag: str | None) -> None:
        pass

    def buffer(self, pos: int) -> memoryview:
        return memoryview(self.data)[pos:]

    def written(self, pos: int, n: int) -> None:
        self.received += n


# --------------------------------------------------------------------------- 5. fallbacks


async def test_chunked_response_is_fetched_again_through_botocore(
    checkpoint: Checkpoint, proxy: WireProxy
) -> None:
    proxy.rewrite(Rewrite("chunked", presigned_data, chunked, times=1))
    state, stats = await aload(checkpoint, proxy.endpoint_url, max_concurrency=1)
    assert_same(state, checkpoint.state)
    assert stats.retries == 0  # a fallback is not a retry
    gets = data_gets(proxy)
    first, again, *rest = gets
    assert presigned(first) and proxy.status_of(first) == 206  # answered, but chunked
    assert signed(again) and again.range == first.range and proxy.status_of(again) == 206
    assert rest and all(presigned(r) for r in rest)  # the fast path goes on
    assert stats.requests == len(gets)  # + .metadata - the uncounted fallback
    assert_clean(proxy.port, proxy)


async def test_a_store_that_keeps_answering_oddly_loses_the_fast_path(
    checkpoint: Checkpoint, proxy: WireProxy
) -> None:
    proxy.rewrite(Rewrite("chunked", presigned_data, chunked))
    state, stats = await aload(checkpoint, proxy.endpoint_url, max_concurrency=1)
    assert_same(state, checkpoint.state)
    assert stats.retries == 0
    gets = data_gets(proxy)
    fast = [r for r in gets if presigned(r)]
    assert len(fast) == aiodcp._store._FAST_FALLBACK_LIMIT
    assert len(gets) - len(fast) == stats.requests - 1  # every part went through botocore
    assert_clean(proxy.port, proxy)


async def test_whole_object_to_the_fast_path_falls_back(
    checkpoint: Checkpoint, proxy: WireProxy
) -> None:
    """A 200 with the whole object, to the fast path only: botocore's GET gets its 206."""
    proxy.add(Fault.ignore_range(), path_suffix=".distcp", predicate=presigned, times=2)
    state, stats = await aload(checkpoint, proxy.endpoint_url, max_concurrency=1)
    assert_same(state, checkpoint.state)
    assert stats.retries == 0
    gets = data_gets(proxy)
    assert [proxy.status_of(r) for r in gets[:4]] == [200, 206, 200, 206]
    assert [presigned(r) for r in gets[:4]] == [True, False, True, False]
    assert gets[0].range == gets[1].range and gets[2].range == gets[3].range
    assert_clean(proxy.port, proxy)


async def test_a_store_that_ignores_range_is_still_reported(
    checkpoint: Checkpoint, proxy: WireProxy
) -> None:
    proxy.add(Fault.ignore_range(), path_suffix=".distcp")
    with pytest.raises(aiodcp.StorageError, match="ignored the Range header") as info:
        await aload(checkpoint, proxy.endpoint_url)
    assert info.value.key in checkpoint.data_keys
    gets = data_gets(proxy)
    assert any(presigned(r) for r in gets) and any(signed(r) for r in gets)
    assert {proxy.status_of(r) for r in gets} <= {200, None}
    assert_clean(proxy.port, proxy)


async def test_slow_down_through_the_fast_path_is_retried(
    checkpoint: Checkpoint, proxy: WireProxy
) -> None:
    proxy.add(Fault.slow_down(), path_suffix=".distcp", predicate=presigned, times=3)
    state, stats = await aload(checkpoint, proxy.endpoint_url, max_concurrency=2)
    assert_same(state, checkpoint.state)
    assert proxy.faults["503"] == 3
    assert stats.retries == 3 and stats.resumed_bytes == 0
    gets = data_gets(proxy)
    assert all(presigned(r) for r in gets)  # retried through the fast path
    assert stats.requests == len(gets) + 1
    # the error body was read whole: its connection was reused
    assert proxy.accepted <= 2 + 1
    assert_clean(proxy.port, proxy)


async def test_missing_data_file_raises_not_found_naming_it(
    tmp_path: Path, s3: Any, bucket: str, proxy: WireProxy
) -> None:
    ck = _make_checkpoint(tmp_path / "ck", s3, bucket, 7, 2)
    missing = ck.data_keys[1]
    s3.delete_object(Bucket=bucket, Key=missing)
    with pytest.raises(aiodcp.NotFoundError, match=f"s3://{bucket}/{missing}") as info:
        await aload(ck, proxy.endpoint_url)
    error = info.value
    assert error.key == missing and error.bucket == bucket and error.status == 404
    assert isinstance(error, FileNotFoundError)
    assert_clean(proxy.port, proxy)  # (and every proxy thread is done)
    gets = data_gets(proxy, missing)  # the parts already started, each asked once:
    assert gets and len({r.range for r in gets}) == len(gets)  # not retried,
    assert all(presigned(r) and proxy.status_of(r) == 404 for r in gets)  # nor sent by botocore


async def test_signature_mismatch_on_the_fast_path_falls_back_to_botocore(
    checkpoint: Checkpoint, proxy: WireProxy
) -> None:
    fault = s3_error(403, "SignatureDoesNotMatch", "The request signature we calculated ...")
    proxy.add(fault, path_suffix=checkpoint.data_keys[0], predicate=presigned, times=1)
    # One GET at a time, so the object has GETs left to send after the fallback (with 8 in
    # flight, all of them may already be out when it happens).
    state, stats = await aload(checkpoint, proxy.endpoint_url, max_concurrency=1)
    assert_same(state, checkpoint.state)
    assert proxy.faults[fault.name] == 1
    assert stats.retries == 0
    gets = data_gets(proxy, checkpoint.data_keys[0])
    denied = [r for r in gets if proxy.status_of(r) == 403]
    assert len(denied) == 1 and presigned(denied[0])
    (again,) = [r for r in gets if r.range == denied[0].range and r is not denied[0]]
    assert signed(again) and proxy.status_of(again) == 206
    # later GETs of the object use the fast path again (with a URL presigned afresh)
    later = gets[gets.index(again) + 1 :]
    assert later and all(presigned(r) for r in later)
    assert_clean(proxy.port, proxy)


async def test_access_denied_on_the_fast_path_is_not_sent_again(
    checkpoint: Checkpoint, proxy: WireProxy
) -> None:
    key = checkpoint.data_keys[2]
    proxy.add(Fault.access_denied(), path_suffix=key)
    with pytest.raises(aiodcp.AccessDeniedError, match=f"s3://{BUCKET}/{key}") as info:
        await aload(checkpoint, proxy.endpoint_url, part_size=1024 * 1024)  # one GET per file
    assert info.value.key == key and info.value.status == 403
    (get,) = data_gets(proxy, key)
    assert presigned(get)
    assert_clean(proxy.port, proxy)


# --------------------------------------------------------------------------- 6. cancellation


def body_is_read(proxy: WireProxy) -> Callable[[], bool]:
    """Whether the held response's headers and first body bytes were sent (the proxy's thread
    now stalls in ``_stall``) and read by the client (nothing unread on its connections)."""
    return lambda: thread_inside("_stall") and unread_from(proxy.port) == 0


async def test_cancel_during_a_fast_path_body(checkpoint: Checkpoint, proxy: WireProxy) -> None:
    """Cancelled while a body is half read (and stalls for longer than the hang guard, so
    only the cancel can end the load in time)."""
    key = checkpoint.data_keys[1]
    stall = Fault.stall_body(20_000, 2 * LOAD_TIMEOUT_S)
    rule = proxy.add(stall, path_suffix=key, predicate=presigned, times=1)
    task = asyncio.create_task(aload(checkpoint, proxy.endpoint_url, part_size=1024 * 1024))
    assert await asyncio.to_thread(rule.triggered.wait, LOAD_TIMEOUT_S)
    (stalled,) = data_gets(proxy, key)
    await eventually(lambda: proxy.status_of(stalled) is not None, "the held response")
    assert proxy.status_of(stalled) == 206
    await eventually(body_is_read(proxy), "the headers and 20,000 body bytes read")
    assert not task.done()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(task, LOAD_TIMEOUT_S)  # a hang guard, not a time bound
    assert_clean(proxy.port, proxy)


def test_abort_during_a_fast_path_body_sync(checkpoint: Checkpoint, proxy: WireProxy) -> None:
    key = checkpoint.data_keys[1]
    stall = Fault.stall_body(20_000, 2 * LOAD_TIMEOUT_S)  # only the abort can end it in time
    rule = proxy.add(stall, path_suffix=key, predicate=presigned, times=1)
    reader = aiodcp.S3StorageReader(
        checkpoint.url, **options(proxy.endpoint_url, part_size=1024 * 1024)
    )
    box: dict[str, BaseException] = {}

    def load() -> None:
        try:
            dcp_load(reader, checkpoint)
        except BaseException as exc:
            box["error"] = exc

    thread = threading.Thread(target=load, name="test-http-abort", daemon=True)
    thread.start()
    try:
        assert rule.triggered.wait(LOAD_TIMEOUT_S)
        wait_until(body_is_read(proxy), "the headers and 20,000 body bytes read")
        reader.abort()
        thread.join(LOAD_TIMEOUT_S)  # a hang guard, not a time bound
        assert not thread.is_alive(), "the aborted load hung"
        assert isinstance(box.get("error"), aiodcp.LoadCancelledError), box
    finally:
        reader.close()
    assert aiodcp_threads() == []
    assert proxy.wait_idle()
    assert established_to(proxy.port) == 0


# --------------------------------------------------------------------------- 7. Url.parse


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("http://s3.local/b/k", Url("http", "s3.local", 80, "s3.local", "/b/k")),
        ("https://s3.local/b/k", Url("https", "s3.local", 443, "s3.local", "/b/k")),
        (
            "http://127.0.0.1:9000/b/a%20b.distcp?X-Amz-Signature=ab%2Fc&x-id=GetObject",
            Url(
                "http",
                "127.0.0.1",
                9000,
                "127.0.0.1:9000",
                "/b/a%20b.distcp?X-Amz-Signature=ab%2Fc&x-id=GetObject",
            ),
        ),
        (
            "https://b.s3.amazonaws.com",
            Url("https", "b.s3.amazonaws.com", 443, "b.s3.amazonaws.com", "/"),
        ),
        ("https://s3.local:8443/k?a=1", Url("https", "s3.local", 8443, "s3.local:8443", "/k?a=1")),
        ("http://user:pw@s3.local:81/k", Url("http", "s3.local", 81, "s3.local:81", "/k")),
        ("http://[::1]:9000/b/k", Url("http", "::1", 9000, "[::1]:9000", "/b/k")),
    ],
)
def test_url_parse(url: str, expected: Url) -> None:
    assert Url.parse(url) == expected


@pytest.mark.parametrize(
    "url", ["ftp://s3.local/k", "s3://bucket/k", "s3.local/k", "http:///k", "", "HTTP//x"]
)
def test_url_parse_rejects_what_is_not_http(url: str) -> None:
    with pytest.raises(ValueError, match="not an http"):
        Url.parse(url)


# ------------------------------------------- regressions: bugs found in review, since fixed


@pytest.mark.parametrize("url", ["https://s3.example.com:443/b/k", "http://127.0.0.1:80/b/k"])
def test_url_parse_host_header_matches_what_botocore_signs(url: str) -> None:
    assert Url.parse(url).host_header == botocore.auth._host_from_url(url)


async def test_bytes_after_a_response_make_the_connection_unusable(
    checkpoint: Checkpoint, proxy: WireProxy
) -> None:
    proxy.rewrite(Rewrite("junk", presigned, with_trailing_junk, times=1))
    state, stats = await aload(checkpoint, proxy.endpoint_url, max_concurrency=1)
    # The junk may reach the connection before or after it went back to the pool: either it
    # is seen while idle (the connection is dropped), or it precedes the next response's
    # status line (that request falls back to botocore). Never is it taken as data.
    assert_same(state, checkpoint.state)
    assert stats.retries == 0


def test_resend_after_a_stale_connection_uses_a_fresh_one(
    checkpoint: Checkpoint, proxy: WireProxy
) -> None:
    with aiodcp.S3StorageReader(checkpoint.url, **options(proxy.endpoint_url)) as reader:
        state, _ = in_thread(lambda: dcp_load(reader, checkpoint))
        assert_same(state, checkpoint.state)
        assert proxy.accepted >= 3  # botocore's + at least 2 pooled fast-path connections
        proxy.forget_open_connections()
        proxy.clear()

        def load_one() -> Any:
            one = {"t00": torch.zeros_like(checkpoint.state["t00"])}
            dcp.load(one, storage_reader=reader)
            assert_same(one, {"t00": checkpoint.state["t00"]})
            return reader.stats

        stats = in_thread(load_one)  # a single data GET
        assert proxy.stale_resets >= 1
        assert stats.retries == 0, f"{proxy.stale_resets} stale connections tried"


def test_idle_connections_past_the_keepalive_expiry_are_not_reused(
    checkpoint: Checkpoint, proxy: WireProxy, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A pooled connection idle longer than ``KEEPALIVE_EXPIRY_S`` is closed, not reused: no
    GET goes out on one (the server may be closing it), so none needs a resend. (Without the
    expiry, the same GETs meet the forgotten connections: see the test above.)"""
    monkeypatch.setattr(aiodcp._http, "KEEPALIVE_EXPIRY_S", 0.2)
    with aiodcp.S3StorageReader(checkpoint.url, **options(proxy.endpoint_url)) as reader:
        state, _ = in_thread(lambda: dcp_load(reader, checkpoint))
        assert_same(state, checkpoint.state)
        first = proxy.accepted
        assert first >= 3  # botocore's + at least 2 pooled fast-path connections
        time.sleep(0.5)  # the stimulus, not a wait for a state: idle past the expiry
        proxy.forget_open_connections()  # a GET on any of them would get a RST and no answer
        proxy.clear()
        state, stats = in_thread(lambda: dcp_load(reader, checkpoint))
        assert_same(state, checkpoint.state)
        assert proxy.stale_resets == 0
        assert stats.retries == 0
        assert proxy.accepted > first  # new connections
        assert stats.requests == len(data_gets(proxy)) + 1  # no GET was sent twice
    assert established_to(proxy.port) == 0
