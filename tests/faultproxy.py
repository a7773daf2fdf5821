"""A loopback HTTP proxy in front of the test S3 server that injects faults on chosen requests.

Data flow, per client connection (one thread each, HTTP/1.1 keep-alive honoured)::

    client request (request line, headers)
        -> faults on the request's body (``cut_request_after``, ``stall_request_after``): the
           first such rule that fires for the head (its predicate sees no body) reads that many
           body bytes, then resets the connection, or stops reading (a stalled upload) until
           the client gives up or the stall ends
        -> the body (Content-Length or chunked)
        -> record it, find the first rule that fires for it (method, path suffix, predicate,
           nth matching request, seeded probability, at most ``times`` faults)
        -> ``corrupt_request``: flip one byte in the middle of the body before forwarding;
           ``lose_reply``: forward, then reset the connection instead of answering
        -> fault before forwarding: stall (``stall_s`` or until ``release`` is set; ends early
           when the client hangs up), strip request headers (``Range``, ``If-Match``), or answer
           an S3 XML error (503 SlowDown, 500 InternalError, 403 AccessDenied) without forwarding
        -> forward upstream on a fresh connection with ``Connection: close``, read the whole
           response (Content-Length, chunked or until EOF)
        -> fault while answering: send the headers (full Content-Length) and only part of the
           body, then close with a FIN (``short``) or a RST (``drop``); or flip one byte of the
           body (``flip``: at a chosen object offset, or at random), answering in full
        -> otherwise answer in full and keep the client connection open for its next request

Everything binds 127.0.0.1 only. ``FaultProxy`` counts requests, faults injected (per fault
name) and open client connections, so tests can assert what happened on the wire.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import re
import select
import socket
import struct
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import TracebackType
from urllib.parse import urlsplit

__all__ = [
    "Fault",
    "FaultProxy",
    "ProxyRequest",
    "Rule",
    "aiodcp_threads",
    "assert_clean",
    "established_to",
    "unread_from",
]

CLEANUP_GUARD_S = 30.0
"""How long a test waits for threads to end and connections to close after the work that held
them returned: they go at once, so this only guards against a hang (on a busy machine the
proxy's own threads may take a while to notice a hang-up)."""

_HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "expect",
    }
)
_MAX_LINE = 65536


# --------------------------------------------------------------------------- test helpers


def established_to(port: int) -> int:
    """Client-side TCP connections to ``port`` on loopback in ESTABLISHED state."""
    count = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except FileNotFoundError:
            continue
        for line in lines:
            fields = line.split()
            remote_port = int(fields[2].rsplit(":", 1)[1], 16)
            if remote_port == port and fields[3] == "01":
                count += 1
    return count


def unread_from(port: int) -> int:
    """Bytes the server on loopback ``port`` sent that its clients have not read yet: in flight
    (the server's send queues) or received and not read (the clients' receive queues). 0 once
    the clients consumed everything sent to them."""
    unread = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except FileNotFoundError:
            continue
        for line in lines:
            fields = line.split()
            if fields[3] == "0A":  # LISTEN: its queues count connections, not bytes
                continue
            tx_queue, rx_queue = (int(n, 16) for n in fields[4].split(":"))
            if int(fields[1].rsplit(":", 1)[1], 16) == port:  # the server's end
                unread += tx_queue
            if int(fields[2].rsplit(":", 1)[1], 16) == port:  # a client's end
                unread += rx_queue
    return unread


def aiodcp_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith("aiodcp")]


def assert_clean(proxy: FaultProxy) -> None:
    """No aiodcp thread, no client connection to the proxy, no connection held by the proxy,
    no task left on the calling test's loop."""
    current = asyncio.current_task()
    assert [t for t in asyncio.all_tasks() if t is not current] == []
    deadline = time.monotonic() + CLEANUP_GUARD_S
    while aiodcp_threads() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert aiodcp_threads() == []
    assert proxy.wait_idle(), f"{proxy.open_connections} connections left open"
    assert established_to(proxy.port) == 0


# --------------------------------------------------------------------------- faults and rules


def _s3_error(status: int, code: str, message: str) -> tuple[int, str, bytes]:
    body = (
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        f"<Error><Code>{code}</Code><Message>{message}</Message>"
        "<RequestId>FAULTPROXY</RequestId><HostId>faultproxy</HostId></Error>"
    ).encode()
    return status, code, body


@dataclass(frozen=True, kw_only=True)
class Fault:
    """What to do to one request. Fields compose (e.g. a stall that also strips If-Match)."""

    name: str
    stall_s: float = 0.0
    """Seconds to wait before forwarding (nothing is sent to the client meanwhile)."""
    release: threading.Event | None = None
    """Ends the stall early when set (a stall with only ``release`` waits up to 60 s)."""
    strip_headers: tuple[str, ...] = ()
    """Request headers removed before forwarding (lower case), e.g. ``("range",)``."""
    error: tuple[int, str, bytes] | None = None
    """Answer this S3 error (status, code, XML body) instead of forwarding."""
    body_bytes: int | None = None
    """Send the full headers but only this many body bytes, then close. ``-1``: a random
    number in ``[0, len(body))`` from the proxy's seeded RNG. ``None``: the whole body."""
    reset: bool = False
    """Close a truncated response with a RST (``drop``) instead of a FIN (``short``)."""
    hang_up: bool = False
    """Close the connection (RST) without answering at all."""
    hang_s: float = 0.0
    """After a truncated body, keep the connection silent this long before closing it (or
    until the client hangs up): a server that stalls mid-body."""
    cut_request_after: int | None = None
    """Read this many bytes of the request's body, then reset the connection (an upload cut
    mid-body); nothing is forwarded."""
    stall_request_after: int | None = None
    """Read this many bytes of the request's body, then read nothing more for ``stall_s``
    seconds (or until ``release``, or the client hangs up), then close; nothing is
    forwarded."""
    corrupt_request: bool = False
    """Flip one bit of the request body's middle byte before forwarding it."""
    lose_reply: bool = False
    """Forward the request (the store applies it), then reset the connection without
    answering: a reply lost on the way back."""
    flip_at: int | None = None
    """Invert one byte of a 200/206 body (all 8 bits), answering in full otherwise: the byte at
    this offset of the object (located through ``Content-Range``; a body that does not hold it
    is sent unchanged), or ``-1``: a random byte of the body (the proxy's seeded RNG). Every
    flip is recorded in ``FaultProxy.flipped``."""

    @property
    def on_request_body(self) -> bool:
        """Acts while the request's body is being read (before the request is complete)."""
        return self.cut_request_after is not None or self.stall_request_after is not None

    @classmethod
    def drop(cls, after_bytes: int | None = None) -> Fault:
        """Reset the connection after ``after_bytes`` body bytes (random when None)."""
        return cls(name="drop", body_bytes=-1 if after_bytes is None else after_bytes, reset=True)

    @classmethod
    def short(cls, after_bytes: int | None = None) -> Fault:
        """Send fewer body bytes than Content-Length, then close cleanly (FIN)."""
        return cls(name="short", body_bytes=-1 if after_bytes is None else after_bytes)

    @classmethod
    def hang_up_now(cls) -> Fault:
        """Reset the connection without sending a byte (before any response header)."""
        return cls(name="hang_up", hang_up=True)

    @classmethod
    def stall_body(cls, after_bytes: int, seconds: float = 60.0) -> Fault:
        """Send ``after_bytes`` body bytes, then nothing for ``seconds``, then close."""
        return cls(name="stall_body", body_bytes=after_bytes, hang_s=seconds)

    @classmethod
    def cut_upload(cls, after_bytes: int) -> Fault:
        """Reset the connection after ``after_bytes`` bytes of the request body arrived."""
        return cls(name="cut_upload", cut_request_after=after_bytes)

    @classmethod
    def stall_upload(
        cls, after_bytes: int, seconds: float = 60.0, release: threading.Event | None = None
    ) -> Fault:
        """Stop reading the request body after ``after_bytes`` bytes (for ``seconds``)."""
        return cls(
            name="stall_upload",
            stall_request_after=after_bytes,
            stall_s=seconds,
            release=release,
        )

    @classmethod
    def lost_reply(cls) -> Fault:
        """The store gets and applies the request; its reply never reaches the client."""
        return cls(name="lost_reply", lose_reply=True)

    @classmethod
    def corrupt(cls) -> Fault:
        """Forward the request with one bit of its body flipped."""
        return cls(name="corrupt", corrupt_request=True)

    @classmethod
    def flip(cls, at: int | None = None) -> Fault:
        """Flip the byte at object offset ``at`` of the body (a random one when None)."""
        return cls(name="flip", flip_at=-1 if at is None else at)

    @classmethod
    def slow_down(cls) -> Fault:
        return cls(name="503", error=_s3_error(503, "SlowDown", "Please reduce your request rate."))

    @classmethod
    def internal_error(cls) -> Fault:
        return cls(
            name="500",
            error=_s3_error(500, "InternalError", "We encountered an internal error."),
        )

    @classmethod
    def access_denied(cls) -> Fault:
        return cls(name="403", error=_s3_error(403, "AccessDenied", "Access Denied"))

    @classmethod
    def stall(cls, seconds: float = 60.0, release: threading.Event | None = None) -> Fault:
        """Wait before the first byte: ``seconds``, or until ``release`` is set."""
        return cls(name="stall", stall_s=seconds, release=release)

    @classmethod
    def ignore_range(cls) -> Fault:
        """Behave like a server without Range support: 200 with the whole object."""
        return cls(name="ignore_range", strip_headers=("range",))

    @classmethod
    def strip(cls, *headers: str) -> Fault:
        return cls(name="strip", strip_headers=tuple(h.lower() for h in headers))

    def also(self, **changes: object) -> Fault:
        """This fault with more effects, e.g. ``Fault.stall(...).also(strip_headers=(...))``."""
        return replace(self, **changes)  # type: ignore[arg-type]


@dataclass(frozen=True)
class ProxyRequest:
    """One request as the proxy received it."""

    index: int
    method: str
    path: str
    query: str
    headers: dict[str, str]
    body: bytes

    @property
    def range(self) -> str | None:
        return self.headers.get("range")

    @property
    def if_match(self) -> str | None:
        return self.headers.get("if-match")

    def covers(self, offset: int) -> bool:
        """Whether this GET asks for the byte at object offset ``offset`` (a GET without a
        Range asks for every byte)."""
        text = self.range
        if text is None:
            return True
        first, _, last = text.removeprefix("bytes=").partition("-")
        return int(first) <= offset and (not last or offset <= int(last))


@dataclass(eq=False)
class Rule:
    """Which requests get ``fault``: all filters must hold, then ``nth``/``probability``."""

    fault: Fault
    method: str | None = "GET"
    path_suffix: str | None = None
    predicate: Callable[[ProxyRequest], bool] | None = None
    nth: frozenset[int] | None = None
    """1-based positions among the requests that pass the filters."""
    probability: float = 1.0
    times: int | None = None
    """Inject at most this many faults (None: no limit)."""
    seen: int = 0
    hits: int = 0
    triggered: threading.Event = field(default_factory=threading.Event)
    """Set when the fault is first applied (e.g. a stall has begun)."""

    def matches(self, request: ProxyRequest) -> bool:
        if self.method is not None and request.method != self.method:
            return False
        if self.path_suffix is not None and not request.path.endswith(self.path_suffix):
            return False
        return self.predicate is None or self.predicate(request)


@dataclass
class _Record:
    request: ProxyRequest
    fault: str | None = None
    status: int | None = None
    sent: bool = False
    """The whole response was handed to the client's socket (not cut short by a fault)."""


# --------------------------------------------------------------------------- the proxy


class _ClientGone(Exception):
    pass


class FaultProxy:
    """A threaded HTTP/1.1 proxy on ``127.0.0.1:<free port>`` forwarding to ``upstream``."""

    def __init__(self, upstream: str, *, seed: int = 0) -> None:
        parts = urlsplit(upstream)
        if parts.hostname != "127.0.0.1" or parts.port is None:
            raise ValueError(f"the fault proxy forwards to 127.0.0.1 only, not {upstream!r}")
        self._upstream = (parts.hostname, parts.port)
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self._rules: list[Rule] = []
        self._records: list[_Record] = []
        self._next_index = 0
        self._fault_counts: Counter[str] = Counter()
        self.flipped: list[tuple[str, int]] = []
        """(path, object offset) of every byte a ``flip`` fault inverted, in order."""
        self._clients: set[socket.socket] = set()
        self._threads: set[threading.Thread] = set()
        self._stopping = threading.Event()
        self._listener: socket.socket | None = None
        self._acceptor: threading.Thread | None = None
        self.port = 0

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> FaultProxy:
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", 0))
        listener.listen(128)
        listener.settimeout(0.1)
        self._listener = listener
        self.port = listener.getsockname()[1]
        self._acceptor = threading.Thread(
            target=self._accept_loop, name="faultproxy-accept", daemon=True
        )
        self._acceptor.start()
        return self

    def stop(self) -> None:
        self._stopping.set()
        if self._acceptor is not None:
            self._acceptor.join(timeout=5)
        if self._listener is not None:
            self._listener.close()
        with self._lock:
            clients = list(self._clients)
            threads = list(self._threads)
        for sock in clients:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        for thread in threads:
            thread.join(timeout=5)

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    @property
    def endpoint_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    # ------------------------------------------------------------------ rules and counters

    def add(
        self,
        fault: Fault,
        *,
        method: str | None = "GET",
        path_suffix: str | None = None,
        predicate: Callable[[ProxyRequest], bool] | None = None,
        nth: Iterable[int] | None = None,
        probability: float = 1.0,
        times: int | None = None,
    ) -> Rule:
        """Inject ``fault`` into matching requests from now on; returns the rule."""
        rule = Rule(
            fault,
            method=method,
            path_suffix=path_suffix,
            predicate=predicate,
            nth=None if nth is None else frozenset(nth),
            probability=probability,
            times=times,
        )
        with self._lock:
            self._rules.append(rule)
        return rule

    def clear(self) -> None:
        """Remove every rule and forget the counters."""
        with self._lock:
            self._rules.clear()
            self._records.clear()
            self._fault_counts.clear()
            self.flipped.clear()

    @property
    def requests(self) -> list[ProxyRequest]:
        with self._lock:
            return [r.request for r in self._records]

    def statuses(self) -> list[int | None]:
        """The status answered to each request (None: no answer, e.g. the client left)."""
        with self._lock:
            return [r.status for r in self._records]

    def status_of(self, request: ProxyRequest) -> int | None:
        with self._lock:
            for record in self._records:
                if record.request.index == request.index:
                    return record.status
        raise KeyError(request.index)

    def answered(self, request: ProxyRequest) -> bool:
        """Whether the proxy sent ``request`` its whole response (with ``unread_from(port) ==
        0`` as well: the client has read it)."""
        with self._lock:
            return any(r.sent for r in self._records if r.request.index == request.index)

    @property
    def request_count(self) -> int:
        with self._lock:
            return len(self._records)

    @property
    def faults(self) -> Counter[str]:
        """Faults injected so far, by fault name."""
        with self._lock:
            return Counter(self._fault_counts)

    @property
    def fault_count(self) -> int:
        with self._lock:
            return sum(self._fault_counts.values())

    @property
    def open_connections(self) -> int:
        """Client connections the proxy currently holds open."""
        with self._lock:
            return len(self._clients)

    def wait_idle(self, timeout: float = CLEANUP_GUARD_S) -> bool:
        """Wait until every client connection is closed; True if it happened in time (the
        default is a hang guard: see ``CLEANUP_GUARD_S``)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.open_connections == 0:
                return True
            time.sleep(0.01)
        return self.open_connections == 0

    def _choose(
        self, request: ProxyRequest, *, on_body: bool = False
    ) -> tuple[Fault | None, Rule | None, int]:
        """The fault for this request (first rule that fires) and the RNG's byte cut.
        ``on_body``: among the faults that act while the body is read (else the others)."""
        with self._lock:
            cut = self._rng.getrandbits(32)
            for rule in self._rules:
                if rule.fault.on_request_body != on_body or not rule.matches(request):
                    continue
                rule.seen += 1
                if rule.times is not None and rule.hits >= rule.times:
                    continue
                if rule.nth is not None and rule.seen not in rule.nth:
                    continue
                if rule.probability < 1.0 and self._rng.random() >= rule.probability:
                    continue
                rule.hits += 1
                self._fault_counts[rule.fault.name] += 1
                return rule.fault, rule, cut
        return None, None, cut

    # ------------------------------------------------------------------ connections

    def _accept_loop(self) -> None:
        listener = self._listener
        if listener is None:
            return
        while not self._stopping.is_set():
            try:
                sock, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            sock.settimeout(None)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            thread = threading.Thread(
                target=self._serve, args=(sock,), name="faultproxy-conn", daemon=True
            )
            with self._lock:
                self._clients.add(sock)
                self._threads.add(thread)
            thread.start()

    def _serve(self, sock: socket.socket) -> None:
        rfile = sock.makefile("rb")
        try:
            while not self._stopping.is_set():
                parsed = self._read_request(rfile.readline, rfile.read, sock)
                if parsed is None or not self._handle(sock, *parsed):
                    return
        except (OSError, _ClientGone, ValueError):
            return
        finally:
            with self._lock:
                self._clients.discard(sock)
                self._threads.discard(threading.current_thread())
            rfile.close()
            with contextlib.suppress(OSError):
                sock.close()

    def _read_request(
        self,
        readline: Callable[[int], bytes],
        read: Callable[..., bytes],
        sock: socket.socket | None = None,
    ) -> tuple[_Record, bool] | None:
        line = readline(_MAX_LINE)
        while line in (b"\r\n", b"\n"):
            line = readline(_MAX_LINE)
        if not line:
            return None
        method, target, version = line.decode("latin-1").rstrip("\r\n").split(" ", 2)
        pairs = _read_headers(readline)
        headers = _header_map(pairs)
        path, _, query = target.partition("?")
        if sock is not None and self._body_fault(sock, method, path, query, headers, read):
            return None
        body = _read_body(headers, readline, read, is_request=True)
        conn = headers.get("connection", "").lower()
        keep_alive = conn != "close" and (version == "HTTP/1.1" or conn == "keep-alive")
        with self._lock:
            record = _Record(ProxyRequest(self._next_index, method, path, query, headers, body))
            self._next_index += 1
            self._records.append(record)
        return record, keep_alive

    def _body_fault(
        self,
        sock: socket.socket,
        method: str,
        path: str,
        query: str,
        headers: dict[str, str],
        read: Callable[..., bytes],
    ) -> bool:
        """A fault that acts while the request's body is read: True if one did (the
        connection is then done with)."""
        with self._lock:
            if not any(r.fault.on_request_body for r in self._rules):
                return False
            index = self._next_index
        head = ProxyRequest(index, method, path, query, headers, b"")
        fault, rule, _ = self._choose(head, on_body=True)
        if fault is None or rule is None:
            return False
        rule.triggered.set()
        length = int(headers.get("content-length", "0") or 0)
        after = fault.cut_request_after
        if after is None:
            after = fault.stall_request_after or 0
        body = read(min(after, length))
        with self._lock:
            record = _Record(ProxyRequest(index, method, path, query, headers, body))
            record.fault = fault.name
            self._next_index += 1
            self._records.append(record)
        if fault.stall_request_after is not None:
            # Not ``_stall``: the client's unread body keeps the socket readable. Wait, read
            # nothing; the client times out (or the test releases the stall).
            deadline = time.monotonic() + (fault.stall_s if fault.stall_s > 0 else 60.0)
            while not self._stopping.is_set() and time.monotonic() < deadline:
                if fault.release is not None and fault.release.is_set():
                    break
                time.sleep(0.02)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        return True

    def _handle(self, sock: socket.socket, record: _Record, keep_alive: bool) -> bool:
        """Answer one request; True to keep the client connection open."""
        request = record.request
        fault, rule, cut = self._choose(request)
        record.fault = None if fault is None else fault.name
        if rule is not None:
            rule.triggered.set()
        if fault is not None and (fault.stall_s > 0 or fault.release is not None):
            self._stall(sock, fault.stall_s, fault.release)
        if fault is not None and fault.hang_up:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            return False
        if fault is not None and fault.error is not None:
            status, _, body = fault.error
            record.status = status
            head = _response_head(
                status,
                [("Content-Type", "application/xml"), ("x-amz-request-id", "FAULTPROXY")],
                len(body),
                keep_alive,
            )
            sock.sendall(head + (b"" if request.method == "HEAD" else body))
            return keep_alive
        strip = set() if fault is None else set(fault.strip_headers)
        if fault is not None and fault.corrupt_request and request.body:
            flipped = bytearray(request.body)
            flipped[len(flipped) // 2] ^= 0x01
            request = replace(request, body=bytes(flipped))
        status, reason, headers, body = self._forward(request, strip)
        record.status = status
        if fault is not None and fault.lose_reply:
            record.status = None
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            return False
        if fault is not None and fault.flip_at is not None and status in (200, 206) and body:
            body = self._flip(request.path, fault.flip_at, cut, headers, body)
        length = len(body)
        if request.method == "HEAD":
            length = int(_header_map(headers).get("content-length", "0"))
        if fault is not None and fault.body_bytes is not None and request.method != "HEAD":
            n = fault.body_bytes if fault.body_bytes >= 0 else cut % max(1, len(body))
            n = min(n, max(0, len(body) - 1))
            head = _response_head(status, headers, length, True, reason=reason)
            sock.sendall(head + body[:n])
            if fault.hang_s > 0:
                with contextlib.suppress(_ClientGone):
                    self._stall(sock, fault.hang_s, None)
            if fault.reset:  # close() now sends a RST instead of a FIN
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            else:
                sock.shutdown(socket.SHUT_WR)
            return False
        head = _response_head(status, headers, length, keep_alive, reason=reason)
        sock.sendall(head + (b"" if request.method == "HEAD" else body))
        record.sent = True
        return keep_alive

    def _flip(
        self, path: str, at: int, cut: int, headers: list[tuple[str, str]], body: bytes
    ) -> bytes:
        """``body`` with the byte at object offset ``at`` (``-1``: a random one) inverted."""
        match = re.match(r"bytes (\d+)-", _header_map(headers).get("content-range", ""))
        start = int(match.group(1)) if match else 0
        index = cut % len(body) if at < 0 else at - start
        if not 0 <= index < len(body):
            return body
        with self._lock:
            self.flipped.append((path, start + index))
        return body[:index] + bytes([body[index] ^ 0xFF]) + body[index + 1 :]

    def _stall(self, sock: socket.socket, seconds: float, release: threading.Event | None) -> None:
        """Wait ``seconds`` (or until ``release``); raise ``_ClientGone`` if the client left."""
        deadline = time.monotonic() + (seconds if seconds > 0 else 60.0)
        while True:
            if release is not None and release.is_set():
                return
            if self._stopping.is_set():
                raise _ClientGone
            left = deadline - time.monotonic()
            if left <= 0:
                return
            readable, _, _ = select.select([sock], [], [], min(left, 0.02))
            if readable:
                try:
                    data = sock.recv(1, socket.MSG_PEEK)
                except OSError:
                    raise _ClientGone from None
                if not data:  # the client gave up (its read timeout) and closed
                    raise _ClientGone

    def _forward(
        self, request: ProxyRequest, strip: set[str]
    ) -> tuple[int, str, list[tuple[str, str]], bytes]:
        upstream = socket.create_connection(self._upstream, timeout=30)
        try:
            target = request.path + (f"?{request.query}" if request.query else "")
            lines = [f"{request.method} {target} HTTP/1.1"]
            for name, value in request.headers.items():
                if name in _HOP_BY_HOP or name in strip or name == "content-length":
                    continue
                lines.append(f"{name}: {value}")
            if request.body or request.method in ("PUT", "POST"):
                lines.append(f"content-length: {len(request.body)}")
            lines.append("connection: close")
            upstream.sendall(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + request.body)
            ufile = upstream.makefile("rb")
            try:
                status_line = ufile.readline(_MAX_LINE).decode("latin-1").rstrip("\r\n")
                _, status_text, reason = [*status_line.split(" ", 2), ""][:3]
                status = int(status_text)
                headers = _read_headers(ufile.readline)
                no_body = request.method == "HEAD" or status in (204, 304) or status < 200
                body = (
                    b""
                    if no_body
                    else _read_body(
                        _header_map(headers), ufile.readline, ufile.read, is_request=False
                    )
                )
            finally:
                ufile.close()
            return status, reason, headers, body
        finally:
            upstream.close()


# --------------------------------------------------------------------------- HTTP helpers


def _read_headers(readline: Callable[[int], bytes]) -> list[tuple[str, str]]:
    """Header lines up to the blank line, as (name, value) in their original spelling."""
    pairs: list[tuple[str, str]] = []
    while True:
        line = readline(_MAX_LINE)
        if not line:
            raise _ClientGone
        if line in (b"\r\n", b"\n"):
            return pairs
        name, _, value = line.decode("latin-1").partition(":")
        pairs.append((name.strip(), value.strip()))


def _header_map(pairs: Iterable[tuple[str, str]]) -> dict[str, str]:
    headers: dict[str, str] = {}
    for name, value in pairs:
        key = name.lower()
        headers[key] = f"{headers[key]}, {value}" if key in headers else value
    return headers


def _read_body(
    headers: dict[str, str],
    readline: Callable[[int], bytes],
    read: Callable[..., bytes],
    *,
    is_request: bool,
) -> bytes:
    """A message body framed by chunked encoding, Content-Length, or (responses) EOF."""
    if "chunked" in headers.get("transfer-encoding", "").lower():
        parts: list[bytes] = []
        while True:
            size = int(readline(_MAX_LINE).split(b";")[0].strip() or b"0", 16)
            if size == 0:
                while readline(_MAX_LINE) not in (b"\r\n", b"\n", b""):
                    pass
                return b"".join(parts)
            parts.append(read(size))
            readline(_MAX_LINE)
    length = headers.get("content-length")
    if length is not None:
        data: bytes = read(int(length))
        if len(data) < int(length):
            raise _ClientGone
        return data
    if is_request:  # a request without framing has no body
        return b""
    rest: bytes = read()
    return rest


def _response_head(
    status: int,
    headers: Iterable[tuple[str, str]],
    length: int,
    keep_alive: bool,
    *,
    reason: str = "",
) -> bytes:
    lines = [f"HTTP/1.1 {status} {reason or _REASONS.get(status, 'Unknown')}"]
    for name, value in headers:
        if name.lower() in _HOP_BY_HOP or name.lower() == "content-length":
            continue
        lines.append(f"{name}: {value}")
    lines.append(f"Content-Length: {length}")
    lines.append("Connection: keep-alive" if keep_alive else "Connection: close")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


_REASONS = {
    200: "OK",
    206: "Partial Content",
    403: "Forbidden",
    404: "Not Found",
    412: "Precondition Failed",
    500: "Internal Server Error",
    503: "Slow Down",
}
