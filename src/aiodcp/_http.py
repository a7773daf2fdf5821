"""The fast path for ranged GETs: HTTP/1.1 over asyncio, received straight into item memory.

Why: a full load is bound by the event-loop thread. Through aiobotocore, every ranged GET costs
~0.9 ms of CPU to build and sign the request (botocore), and every socket read costs a ``bytes``
object, a pass through aiohttp's parser and stream reader, and a slice per item. Here a GET is
one ``transport.write`` of a request line for a URL presigned once per object, and the body is
received with ``sock.recv_into`` straight into the memory the item will be decoded from
(``asyncio.BufferedProtocol``): no per-chunk objects, no copy besides the kernel's.

Data flow::

    S3Store.fetch_range(bucket, key, start, end, sink)   (and get_object, object_size)
        -> RangeClient.fetch(url, start, end, if_match, sink) -> the response headers
            -> RangeClient._acquire(url)     an idle keep-alive connection or a new one
            -> _Connection.request()         "GET <presigned path> HTTP/1.1", Range, If-Match
                                             (or If-Unmodified-Since)
            -> get_buffer()/buffer_updated() the status line and headers into a small buffer,
                                             then sink.begin(etag), then the body straight into
                                             sink.buffer(pos) views; sink.written(pos, n)
            -> RangeClient._release()        back to the pool if the connection is IDLE

Requests with a body (a save's uploads) take the same connections::

    S3Store.send_write(...)   (PUT of an object or a part, POST/DELETE of multipart uploads,
                               HEAD/GET of a small object)
        -> RangeClient.send(url, method, headers, body) -> (status, headers, body)
            -> _Connection.send()            "<METHOD> <presigned path> HTTP/1.1", Content-Length,
                                             the signed headers; then the body, a sequence of
                                             memoryviews written slice by slice as the socket
                                             takes them (never joined: pause_writing and
                                             resume_writing bound what the transport buffers)
            -> get_buffer()/buffer_updated() the reply's head, then its body (Content-Length or
                                             chunked, at most 64 KiB) into memory (REPLY)

Connection states (``_State``, one value per connection, as in httpcore's HTTP/1.1 one)::

    NEW ---request()--+            +--206-----------> BODY --------+
                      +--> HEAD ---+                               +--> _end_response()
    IDLE --request()--+            +--3xx/4xx/5xx---> ERROR_BODY --+           |
     ^                                                                         |
     +------------ received whole and in step, and keep-alive allowed ---------+
                                                                               |
    CLOSED <------ anything else: failed, cut short, timed out, cancelled -----+
    CLOSED <------ close(), the server closing, an unrequested byte (from any state)

HEAD, BODY, ERROR_BODY and REPLY are the active states (REPLY: the reply to ``send``, of
any status, read into memory). A GET is written in one synchronous ``transport.write``; a body
is written while the connection is already waiting for the reply (HEAD): S3 may answer an
error before the body is through, and such a connection is never reused. Sending is no state of
its own. ``_end_response`` is the one place that
decides between IDLE and CLOSED; the pool only asks ``is_available()`` (IDLE) and
``has_expired()`` (idle over ``KEEPALIVE_EXPIRY_S``), and calls ``close()`` on the rest.

Scope: only the plain case is handled here, and everything else is reported to the caller
(``FallbackRequired``), which then sends the request through botocore as before: a response that
is not ``206`` with the exact ``Content-Range`` and ``Content-Length`` asked for, a chunked or
encoded body, or headers over 64 KiB. The exceptions are asked for by the caller
(``accept_shorter``, the store's GETs of an object's first bytes and size): a ``206`` that
ends early because the object does (``bytes 0-99/100``), or a ``200`` with the whole object
when the span starts at byte 0; and ``fetch_whole`` (the store's whole-object GETs of
``.metadata``: no Range sent), whose ``200`` and ``Content-Length`` are the object, told to
its ``WholeSink`` before the body; ``fetch`` returns the response headers, which say what came.
Error statuses whose meaning is certain (S3's XML error body) are raised as ``HttpError``, with
the facts an error is classified from (status, S3 code, message), which the store classifies by
the same rules as botocore's errors (``_store.classify``). Proxies and client certificates never
take this path (the store checks before using it).

Invariants: a connection goes back to the pool only after its whole response was received, the
whole request body was written, and the response did not ask to close; anything else (an error,
a timeout, a cancellation) aborts it. Exceptions never escape the protocol callbacks (asyncio
would log them as fatal errors): they are stored, the transport is aborted, and the waiting
request raises them.
"""

from __future__ import annotations

import asyncio
import enum
import re
import ssl
from collections.abc import Callable, Iterator, Sequence
from http import HTTPStatus
from typing import NamedTuple, Protocol, cast
from urllib.parse import urlsplit

__all__ = [
    "ConnectTimeoutError",
    "FallbackRequired",
    "HttpError",
    "RangeClient",
    "RangeSink",
    "Url",
    "WholeSink",
    "feed",
]

_MAX_HEADER_BYTES = 64 * 1024
_HEADER_BUFFER_BYTES = 8 * 1024
_CONTENT_RANGE_RE = re.compile(r"^bytes (\d+)-(\d+)/(\d+|\*)$")
_ERROR_BODY_LIMIT = 64 * 1024
_SEND_SLICE_BYTES = 256 * 1024
"""A request body is handed to the transport this much at a time: the socket takes what it can
straight from the caller's memory, and the transport buffers the rest of the slice only."""
_WRITE_HIGH_BYTES = 256 * 1024
_WRITE_LOW_BYTES = 64 * 1024
"""The transport's write buffer limits: above the high mark the sender waits until the buffer
drains below the low one, so a connection never buffers more than about a slice and a half."""
_XML_CODE_RE = re.compile(r"<Code>([^<]{0,200})</Code>")
_XML_MESSAGE_RE = re.compile(r"<Message>([^<]{0,2000})</Message>")
KEEPALIVE_EXPIRY_S = 12.0
"""Seconds: a pooled connection idle longer than this is closed rather than reused. S3 closes
idle keep-alive connections after about 20 s, and a request written as it does needs a resend;
12 s is aiobotocore's ``keepalive_timeout``, which the botocore path uses."""


class RangeSink(Protocol):
    """Where the body of one ranged GET goes (implemented by the fetch engine)."""

    def begin(self, etag: str | None) -> None:
        """The response headers arrived (the first byte); may raise to refuse the body."""

    def buffer(self, pos: int) -> memoryview:
        """A writable, non-empty view for the bytes from file offset ``pos`` on."""
        ...

    def written(self, pos: int, n: int) -> None:
        """``n`` bytes from file offset ``pos`` were written into the last ``buffer``."""


class WholeSink(RangeSink, Protocol):
    """Where the body of a whole-object GET goes (``RangeClient.fetch_whole``)."""

    def expect(self, size: int) -> None:
        """The object is ``size`` bytes (the response's ``Content-Length``): told before
        ``begin`` and any ``buffer``."""


def feed(sink: RangeSink, pos: int, end: int, data: bytes) -> int:
    """Copy ``data`` (the body from file offset ``pos`` on) into ``sink``, up to ``end``; return
    the offset reached. For bytes that arrived outside ``recv_into`` (after the headers, or
    through botocore)."""
    view = memoryview(data)
    while view and pos < end:
        target = sink.buffer(pos)
        n = min(len(target), len(view), end - pos)
        target[:n] = view[:n]
        sink.written(pos, n)
        pos += n
        view = view[n:]
    return pos


class ConnectTimeoutError(TimeoutError):
    """No connection within ``connect_timeout_s`` (named and worded as botocore's, so the error
    a load raises reads the same whichever client timed out)."""


class FallbackRequired(Exception):
    """The response is not the plain case this client handles: send it through botocore."""


class HttpError(Exception):
    """An error response: its status, headers and the start of its body, and the facts the
    store classifies it from (``_store.classify``). ``code`` and ``message`` are those of S3's
    XML error body; without them, as botocore reports such a response, the status as the code
    and its reason phrase as the message."""

    def __init__(self, status: int, headers: dict[str, str], body: bytes) -> None:
        super().__init__(f"HTTP {status}")
        self.status = status
        self.headers = headers
        self.body = body
        text = body.decode("utf-8", "replace")
        code = _XML_CODE_RE.search(text)
        message = _XML_MESSAGE_RE.search(text)
        self.code = (code.group(1).strip() if code else "") or str(status)
        self.message = (message.group(1).strip() if message else "") or _reason(status)


def _reason(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return f"HTTP {status}"


class Url(NamedTuple):
    """A presigned URL split for sending: where to connect, what to ask for."""

    scheme: str
    host: str
    port: int
    host_header: str
    target: str
    headers: tuple[str, ...] = ()
    """Header lines the signature covers besides ``host`` (e.g. ``x-amz-request-payer``)."""

    @classmethod
    def parse(cls, url: str) -> Url:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"not an http(s) URL: {url!r}")
        default_port = 443 if parts.scheme == "https" else 80
        target = parts.path or "/"
        if parts.query:
            target += "?" + parts.query
        return cls(
            scheme=parts.scheme,
            host=parts.hostname,
            port=parts.port or default_port,
            # As botocore signs it: the port only when it is not the scheme's default.
            host_header=(
                parts.netloc.rpartition("@")[2]
                if parts.port not in (None, default_port)
                else (f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname)
            ),
            target=target,
        )


class _State(enum.Enum):
    """Where a connection is in its life: the one value that says it (module docstring)."""

    NEW = enum.auto()
    """Connected; no request sent on it yet."""
    HEAD = enum.auto()
    """Active: the request was written, the status line and headers are being read."""
    BODY = enum.auto()
    """Active: a ``206``; its body is being received straight into the sink."""
    ERROR_BODY = enum.auto()
    """Active: an error status; its body is being read into memory for ``HttpError``."""
    REPLY = enum.auto()
    """Active: the reply to a request sent with ``send`` (any status); its body is being read
    into memory."""
    IDLE = enum.auto()
    """The last response ended whole and in step, and allowed keep-alive: reusable."""
    CLOSED = enum.auto()
    """Aborted, or closed by the server: never used again."""


# Module-level names for the hot callbacks: one global load and an identity test each.
_NEW = _State.NEW
_HEAD = _State.HEAD
_BODY = _State.BODY
_ERROR_BODY = _State.ERROR_BODY
_REPLY = _State.REPLY
_IDLE = _State.IDLE
_CLOSED = _State.CLOSED
_ACTIVE = frozenset({_HEAD, _BODY, _ERROR_BODY, _REPLY})


class _Connection(asyncio.BufferedProtocol):
    """One keep-alive connection; one request at a time. Its state is ``_state`` alone: only
    ``request`` makes it active, only ``_end_response`` ends a response (and decides between
    IDLE and CLOSED), and ``close`` (or the transport going away) makes it CLOSED."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self.transport: asyncio.Transport | None = None
        self.origin: tuple[str, str, int] = ("", "", 0)
        self._state = _NEW
        self._requests = 0
        self._keep_alive = False
        """The current response lets the connection be reused once received whole: HTTP/1.1
        without ``Connection: close``, no byte beyond it came with its head, and (an error) a
        body short enough to read whole. Set from the head; read only by ``_end_response``."""
        self._head = bytearray(_HEADER_BUFFER_BYTES)
        self._head_len = 0
        self._scratch = bytearray(4096)
        self._sink: RangeSink | None = None
        self._pos = 0
        self._end = 0
        self._start = 0
        self._error_status = 0
        self._error_headers: dict[str, str] = {}
        self._error_body = bytearray()
        self._error_left = 0
        self._headers: dict[str, str] = {}
        self._accept_shorter = False
        self._whole = False  # a GET without a Range (fetch_whole)
        self._waiter: asyncio.Future[None] | None = None
        self._last_activity = 0.0
        self._timeout = 0.0
        self._timer: asyncio.TimerHandle | None = None
        # a request sent with ``send``: its reply is read whole into memory (REPLY)
        self._generic = False
        self._no_body = False  # a HEAD: the reply's head says a length, no body follows
        self._reply_status = 0
        self._reply_body = bytearray()
        self._reply_left = 0
        self._reply_chunked = False
        self._body_written = True  # False while a request body is still being written
        self._paused = False
        self._drain: asyncio.Future[None] | None = None

    # ------------------------------------------------------------- what the pool asks

    def is_available(self) -> bool:
        """Idle: the last response ended whole and in step, and nothing closed it since."""
        return self._state is _IDLE

    def has_expired(self) -> bool:
        """Idle for over ``KEEPALIVE_EXPIRY_S``: the server may be closing it right now."""
        return self._state is _IDLE and self._loop.time() - self._last_activity > KEEPALIVE_EXPIRY_S

    @property
    def went_stale(self) -> bool:
        """The last request went out on a reused connection and no byte of its response came
        back: what a keep-alive connection the server had closed while idle looks like."""
        return self._requests > 1 and self._head_len == 0 and self._pos == self._start

    def close(self) -> None:
        """Abort the connection (CLOSED); a response still under way fails."""
        if self._state in _ACTIVE:
            self._end_response(ConnectionAbortedError("the connection was closed"))
        self._state = _CLOSED
        if self.transport is not None:
            self.transport.abort()

    # ------------------------------------------------------------- asyncio callbacks

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        transport.set_write_buffer_limits(high=_WRITE_HIGH_BYTES, low=_WRITE_LOW_BYTES)

    def pause_writing(self) -> None:
        self._paused = True

    def resume_writing(self) -> None:
        self._paused = False
        self._last_activity = self._loop.time()
        self._wake_sender()

    def _wake_sender(self) -> None:
        drain, self._drain = self._drain, None
        if drain is not None and not drain.done():
            drain.set_result(None)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._state in _ACTIVE:
            self._end_response(exc or ConnectionResetError("the server closed the connection"))
        self._state = _CLOSED

    def eof_received(self) -> bool:
        if self._state is _IDLE or self._state is _NEW:
            self._state = _CLOSED  # the server's keep-alive timeout: not reused from now on
        return False  # close the transport; connection_lost reports an unfinished response

    def get_buffer(self, sizehint: int) -> memoryview:
        state = self._state
        try:
            if state is _BODY:
                assert self._sink is not None
                view = self._sink.buffer(self._pos)
                left = self._end - self._pos
                return view if len(view) <= left else view[:left]
            if state is _HEAD:
                if self._head_len == len(self._head):
                    if len(self._head) >= _MAX_HEADER_BYTES:
                        raise FallbackRequired(f"response headers over {_MAX_HEADER_BYTES} bytes")
                    self._head.extend(bytes(len(self._head)))
                return memoryview(self._head)[self._head_len :]
        except BaseException as exc:
            self._end_response(exc)
        return memoryview(self._scratch)  # not reading a body or head: read and drop/keep

    def buffer_updated(self, nbytes: int) -> None:
        state = self._state
        try:
            if state is _BODY:
                assert self._sink is not None
                self._last_activity = self._loop.time()
                self._sink.written(self._pos, nbytes)
                self._pos += nbytes
                if self._pos >= self._end:
                    self._end_response(None)
            elif state is _HEAD:
                self._last_activity = self._loop.time()
                self._head_len += nbytes
                self._on_head_bytes(nbytes)
            elif state is _ERROR_BODY:
                self._last_activity = self._loop.time()
                self._error_body += self._scratch[:nbytes]
                self._error_left -= nbytes
                if self._error_left <= 0 or len(self._error_body) >= _ERROR_BODY_LIMIT:
                    self._end_error()
            elif state is _REPLY:
                self._last_activity = self._loop.time()
                self._on_reply_bytes(self._scratch[:nbytes])
            elif state is _IDLE or state is _NEW:
                # Bytes nobody asked for: the connection is out of step; never reuse it.
                self.close()
        except BaseException as exc:
            self._end_response(exc)

    # ------------------------------------------------------------- parsing

    def _on_head_bytes(self, nbytes: int) -> None:
        head = self._head
        end = head.find(b"\r\n\r\n", max(0, self._head_len - nbytes - 3), self._head_len)
        if end < 0:
            return
        lines = bytes(head[:end]).decode("latin-1").split("\r\n")
        status_line = lines[0].split(" ", 2)
        if len(status_line) < 2 or not status_line[0].startswith("HTTP/1."):
            raise FallbackRequired(f"not an HTTP/1.x response: {lines[0][:80]!r}")
        if not status_line[1].isdigit():
            raise FallbackRequired(f"malformed status line: {lines[0][:80]!r}")
        status = int(status_line[1])
        headers: dict[str, str] = {}
        for line in lines[1:]:
            name, sep, value = line.partition(":")
            if sep:
                headers[name.strip().lower()] = value.strip()
        keep_alive = (
            status_line[0] == "HTTP/1.1" and "close" not in headers.get("connection", "").lower()
        )
        if self._generic:
            self._on_reply_head(status, headers, keep_alive, bytes(head[end + 4 : self._head_len]))
            return
        if "transfer-encoding" in headers or headers.get("content-encoding", "identity") not in (
            "identity",
            "",
        ):
            raise FallbackRequired("chunked or encoded response body")
        length_text = headers.get("content-length")
        length = int(length_text) if length_text is not None and length_text.isdigit() else -1
        rest = bytes(head[end + 4 : self._head_len])
        self._headers = headers
        if (
            status == 200
            and self._accept_shorter
            and self._start == 0
            and "content-range" not in headers
            and 0 <= length
            and (length <= self._end or self._whole)
        ):
            # The whole object, shorter than the span asked for (a store may answer a range
            # covering the whole object so), or the answer to a GET without a Range
            # (``fetch_whole``): received as the 206 it stands for.
            status, self._end = 206, length
            if length:
                headers["content-range"] = f"bytes 0-{length - 1}/{length}"
            if self._whole:
                cast(WholeSink, self._sink).expect(length)
        if status != 206:
            if status < 300 or length < 0:
                raise FallbackRequired(f"status {status} to a ranged GET")
            self._error_status, self._error_headers = status, headers
            self._error_body = bytearray(rest)
            self._error_left = length - len(rest)
            self._keep_alive = keep_alive and length <= _ERROR_BODY_LIMIT
            self._state = _ERROR_BODY
            if self._error_left <= 0 or len(self._error_body) >= _ERROR_BODY_LIMIT:
                self._end_error()
            return
        match = _CONTENT_RANGE_RE.match(headers.get("content-range", ""))
        if (
            match is not None
            and self._accept_shorter
            and int(match.group(1)) == self._start
            and match.group(3) == str(int(match.group(2)) + 1)
            and int(match.group(2)) + 1 < self._end
        ):
            self._end = int(match.group(2)) + 1  # the object ends inside the span asked for
        if length == 0 and self._end == self._start == 0 and self._accept_shorter:
            pass  # an empty whole object (the 200 above)
        elif (
            match is None
            or int(match.group(1)) != self._start
            or int(match.group(2)) + 1 != self._end
            or length != self._end - self._start
        ):
            raise FallbackRequired("Content-Range/Content-Length differ from the range asked for")
        # Bytes beyond the response came with its head: out of step.
        self._keep_alive = keep_alive and len(rest) <= length
        assert self._sink is not None
        self._sink.begin(headers.get("etag"))
        self._state = _BODY
        if rest:
            self._pos = feed(self._sink, self._pos, self._end, rest)
        if self._pos >= self._end:
            self._end_response(None)

    def _end_error(self) -> None:
        self._end_response(
            HttpError(self._error_status, self._error_headers, bytes(self._error_body))
        )

    def _on_reply_head(
        self, status: int, headers: dict[str, str], keep_alive: bool, rest: bytes
    ) -> None:
        """The head of the reply to ``send``: its body, of any status, is read into memory."""
        if 100 <= status < 200:  # an interim reply (100 Continue): the real one follows
            self._head[: len(rest)] = rest
            self._head_len = len(rest)
            if rest:
                self._on_head_bytes(len(rest))
            return
        if headers.get("content-encoding", "identity") not in ("identity", ""):
            raise FallbackRequired("encoded reply body")
        self._headers = headers
        self._reply_status = status
        self._reply_body = bytearray()
        chunked = "chunked" in headers.get("transfer-encoding", "").lower()
        length_text = headers.get("content-length", "")
        if self._no_body or status in (204, 304):
            length = 0
            chunked = False
        elif chunked:
            length = -1
        elif length_text.isdigit():
            length = int(length_text)
        else:
            raise FallbackRequired(f"a reply of status {status} without a length")
        if length > _ERROR_BODY_LIMIT:
            raise FallbackRequired(f"a reply body of {length} bytes")
        self._reply_chunked = chunked
        self._reply_left = length
        self._keep_alive = keep_alive
        self._state = _REPLY
        self._on_reply_bytes(rest)

    def _on_reply_bytes(self, data: bytes | bytearray | memoryview) -> None:
        body = self._reply_body
        if self._reply_chunked:
            body += data
            if len(body) > _ERROR_BODY_LIMIT + 4096:
                raise FallbackRequired("a chunked reply body over 64 KiB")
            decoded = _dechunk(body)
            if decoded is None:
                return
            self._reply_body, extra = decoded
        else:
            take = min(len(data), self._reply_left)
            body += data[:take]
            self._reply_left -= take
            extra = len(data) - take
            if self._reply_left > 0:
                return
        if extra:
            self._keep_alive = False  # bytes beyond the reply: out of step
        status, headers = self._reply_status, self._headers
        if status >= 300 or _is_error_document(self._reply_body):
            self._end_response(HttpError(status, headers, bytes(self._reply_body)))
        else:
            self._end_response(None)

    # ------------------------------------------------------------- request side

    def _end_response(self, exc: BaseException | None) -> None:
        """The response ended: ``exc`` is None (the body arrived), an ``HttpError`` (an error
        response, its body read), or why it failed. The one place that decides what becomes of
        the connection: IDLE if the response was received whole and in step and allowed
        keep-alive, CLOSED otherwise. Then the waiting request is woken."""
        state = self._state
        if state not in _ACTIVE:
            return
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if exc is None:
            whole = (state is _BODY and self._pos == self._end) or state is _REPLY
        elif isinstance(exc, HttpError):
            whole = (
                state is _ERROR_BODY and self._error_left == 0  # all of it, nothing more
            ) or state is _REPLY
        else:
            whole = False  # failed, timed out or cancelled part way: in an unknown state
        if (
            whole
            and self._keep_alive
            and self._body_written
            # an early reply can come while the body's last bytes are still in the transport
            and (self.transport is None or self.transport.get_write_buffer_size() == 0)
        ):
            self._state = _IDLE  # any byte from now on is unrequested: see buffer_updated
        else:
            self._state = _CLOSED
            if self.transport is not None:
                self.transport.abort()
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            if exc is None:
                waiter.set_result(None)
            else:
                waiter.set_exception(exc)
        self._wake_sender()

    def _check_timeout(self) -> None:
        self._timer = None
        if self._state not in _ACTIVE:
            return
        idle = self._loop.time() - self._last_activity
        if idle >= self._timeout:
            self._end_response(TimeoutError(f"no data for {self._timeout:g} s (read_timeout_s)"))
        else:
            self._timer = self._loop.call_later(self._timeout - idle, self._check_timeout)

    async def request(
        self,
        url: Url,
        start: int,
        end: int,
        if_match: str | None,
        sink: RangeSink,
        read_timeout: float,
        user_agent: str,
        unmodified_since: str | None = None,
        accept_shorter: bool = False,
        whole: bool = False,
    ) -> dict[str, str]:
        """Send one ranged GET (NEW or IDLE -> HEAD) and receive its body into ``sink``; raises
        on any failure; returns the response headers (names in lower case). Returns or raises
        with the connection IDLE or CLOSED. ``accept_shorter``: see ``RangeClient.fetch``;
        ``whole``: a GET without a Range (``RangeClient.fetch_whole``)."""
        if self._state is _CLOSED:  # closed by the server before its first request was sent
            raise ConnectionResetError("the server closed the connection")
        assert self.transport is not None and (self._state is _NEW or self._state is _IDLE)
        self._requests += 1
        self._keep_alive = False
        self._sink, self._start, self._pos, self._end = sink, start, start, end
        self._head_len = 0
        self._headers = {}
        self._accept_shorter = accept_shorter or whole
        self._whole = whole
        self._generic = False
        self._body_written = True
        self._state = _HEAD
        self._waiter = self._loop.create_future()
        self._timeout = read_timeout
        self._last_activity = self._loop.time()
        self._timer = self._loop.call_later(read_timeout, self._check_timeout)
        lines = [
            f"GET {url.target} HTTP/1.1",
            f"Host: {url.host_header}",
            *(() if whole else (f"Range: bytes={start}-{end - 1}",)),
            "Accept-Encoding: identity",
            f"User-Agent: {user_agent}",
            *url.headers,
        ]
        if if_match is not None:
            lines.append(f"If-Match: {if_match}")
        elif unmodified_since is not None:
            lines.append(f"If-Unmodified-Since: {unmodified_since}")
        try:
            self.transport.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
            await self._waiter
            return self._headers
        except HttpError:
            raise  # the error body was read whole: the connection may be IDLE
        except BaseException as exc:
            # Cancelled, or failed: the connection is in an unknown state (even when the
            # response had ended: a cancellation can arrive after it did).
            self._end_response(exc if isinstance(exc, Exception) else ConnectionAbortedError())
            self.close()
            raise
        finally:
            self._sink = None
            self._waiter = None

    async def send(
        self,
        url: Url,
        method: str,
        headers: tuple[str, ...],
        body: Sequence[memoryview],
        read_timeout: float,
        user_agent: str,
    ) -> tuple[int, dict[str, str], bytes]:
        """Send one request with ``body`` (NEW or IDLE -> HEAD -> REPLY) and read its reply
        whole; returns (status, headers, body) of a 1xx-free, non-error reply and raises
        ``HttpError`` for an error status (or a 200 whose body is an S3 error document). The
        body's views are written as the socket takes them, slice by slice, never joined.
        ``read_timeout`` bounds any silence: no reply byte, or a body the server stops reading.
        Returns or raises with the connection IDLE or CLOSED."""
        if self._state is _CLOSED:
            raise ConnectionResetError("the server closed the connection")
        assert self.transport is not None and (self._state is _NEW or self._state is _IDLE)
        transport = self.transport
        self._requests += 1
        self._keep_alive = False
        self._sink, self._start, self._pos, self._end = None, 0, 0, 0
        self._head_len = 0
        self._headers = {}
        self._accept_shorter = False
        self._whole = False
        self._generic = True
        self._no_body = method == "HEAD"
        length = sum(len(view) for view in body)
        self._body_written = length == 0
        self._state = _HEAD
        self._waiter = self._loop.create_future()
        self._timeout = read_timeout
        self._last_activity = self._loop.time()
        self._timer = self._loop.call_later(read_timeout, self._check_timeout)
        lines = [
            f"{method} {url.target} HTTP/1.1",
            f"Host: {url.host_header}",
            f"User-Agent: {user_agent}",
            *url.headers,
            *headers,
        ]
        if length or method in ("PUT", "POST"):
            lines.append(f"Content-Length: {length}")
        try:
            transport.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
            if await self._write_body(body):
                self._body_written = True
            await self._waiter
            return self._reply_status, self._headers, bytes(self._reply_body)
        except HttpError:
            raise  # the reply was read whole: the connection may be IDLE
        except BaseException as exc:
            self._end_response(exc if isinstance(exc, Exception) else ConnectionAbortedError())
            self.close()
            raise
        finally:
            self._waiter = None
            self._drain = None
            self._generic = False

    async def _write_body(self, body: Sequence[memoryview]) -> bool:
        """Write ``body`` as the transport takes it; False if the reply ended it early. Views
        of a slice or more are written from their own memory, a slice at a time; smaller ones
        (a save's small items, archive framing) are gathered into one slice first, so that a
        part of many small items is a few writes, not one per item."""
        small = bytearray()
        for piece in _slices(body):
            if len(piece) < _SEND_SLICE_BYTES // 4:
                small += piece
                if len(small) < _SEND_SLICE_BYTES:
                    continue
                gathered, small = small, bytearray()
                if not await self._write(memoryview(gathered)):
                    return False
                continue
            if small:
                gathered, small = small, bytearray()
                if not await self._write(memoryview(gathered)):
                    return False
            if not await self._write(piece):
                return False
        return not small or await self._write(memoryview(small))

    async def _write(self, data: memoryview) -> bool:
        """One slice, once the transport's buffer is below its low mark; False if the reply
        ended the request (an early error, a failure) first."""
        while self._paused and self._state in _ACTIVE:
            self._drain = self._loop.create_future()
            await self._drain
        transport = self.transport
        if self._state not in _ACTIVE or transport is None or transport.is_closing():
            return False  # (closing: the connection broke; its loss is being reported)
        transport.write(data)
        self._last_activity = self._loop.time()
        return True


def _slices(body: Sequence[memoryview]) -> Iterator[memoryview]:
    for view in body:
        for at in range(0, len(view), _SEND_SLICE_BYTES):
            yield view[at : at + _SEND_SLICE_BYTES]


def _dechunk(raw: bytearray) -> tuple[bytearray, int] | None:
    """A chunked body decoded, and how many bytes followed it; None while it is incomplete."""
    out = bytearray()
    pos = 0
    while True:
        line_end = raw.find(b"\r\n", pos)
        if line_end < 0:
            return None
        size_text = bytes(raw[pos:line_end]).split(b";")[0].strip()
        try:
            size = int(size_text, 16)
        except ValueError:
            raise FallbackRequired(f"malformed chunk size {size_text[:20]!r}") from None
        pos = line_end + 2
        if size == 0:
            end = raw.find(b"\r\n\r\n", line_end)  # optional trailers, then a blank line
            if end < 0:
                return None
            return out, len(raw) - (end + 4)
        if len(raw) < pos + size + 2:
            return None
        out += raw[pos : pos + size]
        pos += size + 2


def _is_error_document(body: bytes | bytearray) -> bool:
    """Whether a 200 reply's body is an S3 error document (CompleteMultipartUpload can fail
    after its 200 was sent: the error comes in the body)."""
    head = bytes(body[:512]).lstrip()
    if head.startswith(b"<?xml"):
        head = head[head.find(b"?>") + 2 :].lstrip()
    return head.startswith(b"<Error>")


class RangeClient:
    """Connection pool plus ranged GETs; one per ``S3Store`` (so one per event loop)."""

    def __init__(
        self,
        *,
        ssl_context: Callable[[], ssl.SSLContext],
        max_idle: int,
        connect_timeout: float,
        read_timeout: float,
        user_agent: str,
    ) -> None:
        self._ssl_context_factory = ssl_context
        self._ssl_context: ssl.SSLContext | None = None
        self._idle: dict[tuple[str, str, int], list[_Connection]] = {}
        self._busy: set[_Connection] = set()
        self._max_idle = max_idle
        self._connect_timeout = connect_timeout
        self._read_timeout = read_timeout
        self._user_agent = user_agent
        self._closed = False

    async def fetch(
        self,
        url: Url,
        start: int,
        end: int,
        if_match: str | None,
        sink: RangeSink,
        unmodified_since: str | None = None,
        *,
        accept_shorter: bool = False,
    ) -> dict[str, str]:
        """Bytes ``[start, end)`` of ``url`` into ``sink``; returns the response headers (names
        in lower case). One attempt (plus one silent resend when a reused keep-alive connection
        turns out closed before any byte came back).

        ``accept_shorter``: an object that ends inside the span is no fallback: the 206 whose
        ``Content-Range`` starts at ``start`` and ends at the object's end (``bytes
        start-last/last+1``), or from byte 0 a 200 with the whole object, is received (the
        headers say how much came); the store reads whole small objects so."""
        return await self._fetch(url, start, end, if_match, sink, unmodified_since, accept_shorter)

    async def fetch_whole(self, url: Url, sink: WholeSink) -> dict[str, str]:
        """The whole object at ``url``, from a GET without a Range (to which S3 answers with
        the object's full-object checksum, when ``url`` asks for it), into ``sink``, which is
        told the object's size first (``WholeSink.expect``); returns the response headers. One
        attempt, as ``fetch``. A reply that is not a 200 with a ``Content-Length`` and a plain
        body is ``FallbackRequired``."""
        return await self._fetch(url, 0, 0, None, sink, None, True, whole=True)

    async def _fetch(
        self,
        url: Url,
        start: int,
        end: int,
        if_match: str | None,
        sink: RangeSink,
        unmodified_since: str | None,
        accept_shorter: bool,
        *,
        whole: bool = False,
    ) -> dict[str, str]:
        for resend in (True, False):
            connection = await self._acquire(url, fresh=not resend)
            try:
                headers = await connection.request(
                    url,
                    start,
                    end,
                    if_match,
                    sink,
                    self._read_timeout,
                    self._user_agent,
                    unmodified_since,
                    accept_shorter,
                    whole,
                )
            except OSError as exc:
                self._release(connection)
                if resend and connection.went_stale and not isinstance(exc, TimeoutError):
                    self._drop_idle(connection.origin)  # they idled as long: likely dead too
                    continue
                raise
            except BaseException:
                self._release(connection)
                raise
            self._release(connection)
            return headers
        raise AssertionError("unreachable")  # the second pass returns or raises

    async def send(
        self,
        url: Url,
        method: str,
        headers: tuple[str, ...] = (),
        body: Sequence[memoryview] = (),
    ) -> tuple[int, dict[str, str], bytes]:
        """A request with ``body`` (``method`` PUT, POST, DELETE, HEAD or GET; ``headers`` whole
        header lines, the ones the URL's signature covers); returns the reply's status, headers
        (lower-case names) and body, or raises ``HttpError`` for an error reply. One attempt
        (plus one silent resend when a reused keep-alive connection turns out closed before
        any byte of the reply came back)."""
        for resend in (True, False):
            connection = await self._acquire(url, fresh=not resend)
            try:
                reply = await connection.send(
                    url, method, headers, body, self._read_timeout, self._user_agent
                )
            except OSError as exc:
                self._release(connection)
                if resend and connection.went_stale and not isinstance(exc, TimeoutError):
                    self._drop_idle(connection.origin)
                    continue
                raise
            except BaseException:
                self._release(connection)
                raise
            self._release(connection)
            return reply
        raise AssertionError("unreachable")  # the second pass returns or raises

    def _drop_idle(self, origin: tuple[str, str, int]) -> None:
        for connection in self._idle.pop(origin, []):
            connection.close()

    async def _acquire(self, url: Url, *, fresh: bool = False) -> _Connection:
        if self._closed:
            raise ConnectionAbortedError("the store is closed")
        origin = (url.scheme, url.host, url.port)
        idle = None if fresh else self._idle.get(origin)
        while idle:
            connection = idle.pop()
            if connection.is_available() and not connection.has_expired():
                self._busy.add(connection)
                return connection
            connection.close()
        loop = asyncio.get_running_loop()
        context = None
        if url.scheme == "https":
            if self._ssl_context is None:
                self._ssl_context = self._ssl_context_factory()
            context = self._ssl_context
        try:
            _, protocol = await asyncio.wait_for(
                loop.create_connection(
                    lambda: _Connection(loop),
                    url.host,
                    url.port,
                    ssl=context,
                    server_hostname=url.host if context is not None else None,
                ),
                self._connect_timeout,
            )
        except TimeoutError as exc:
            raise ConnectTimeoutError(
                f'Connect timeout on endpoint URL: "{url.scheme}://{url.host_header}" '
                f"(no connection within {self._connect_timeout:g} s)"
            ) from exc
        protocol.origin = origin
        self._busy.add(protocol)
        return protocol

    def _release(self, connection: _Connection) -> None:
        self._busy.discard(connection)
        if self._closed or not connection.is_available():
            connection.close()
            return
        idle = self._idle.setdefault(connection.origin, [])
        if len(idle) < self._max_idle:
            idle.append(connection)
        else:
            connection.close()

    def close(self) -> None:
        """Abort every connection (idle or busy)."""
        self._closed = True
        for idle in self._idle.values():
            for connection in idle:
                connection.close()
        self._idle.clear()
        for connection in list(self._busy):
            connection.close()
        self._busy.clear()
