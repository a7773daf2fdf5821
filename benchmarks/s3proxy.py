"""A counting, shaping HTTP/1.1 proxy on 127.0.0.1 in front of the local S3 server.

With ``--server s3rver`` every loader of the benchmark talks to the S3 server through this
proxy, so requests and bytes are counted the same way for all of them, on the wire. (The default
server, nginx, counts in its access log and shapes the S3-shaped scenario itself; the proxy
shapes for it only where nginx lacks its echo module.) It can also make loopback look like S3:

- ``latency_ms``: the first byte of every response leaves the proxy no earlier than this long
  after the request arrived (S3's time to first byte is ~10-30 ms);
- ``bandwidth``: bytes per second per client connection (S3 serves ~50-100 MB/s per connection),
  paced with a token bucket that never banks credit across idle time; request bodies (uploads)
  are read at that pace too, and their reply waits ``latency_ms`` after the body is in;
- ``total_bandwidth``: bytes per second summed over every connection (a node's NIC that all
  its ranks share): body bytes leave one after another on one shared timeline.

Run: ``python s3proxy.py --upstream-port N`` prints ``PORT <p>`` once it listens. Control (never
forwarded): ``GET /__bench__/stats`` returns the counters as JSON; ``GET /__bench__/reset?
latency_ms=20&bandwidth=80000000&total_bandwidth=200000000`` returns them, zeroes them and sets
the shaping (omitted values mean no shaping). Only 127.0.0.1 is ever contacted.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys
from urllib.parse import parse_qs, urlsplit

CHUNK = 1024 * 1024
CONTROL_PREFIX = b"/__bench__/"


class Counters:
    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.requests = 0
        self.by_method: dict[str, int] = {}
        self.ranged_gets = 0
        self.body_bytes = 0  # response bodies delivered to clients: "bytes fetched"
        self.header_bytes = 0
        self.request_bytes = 0
        self.connections = 0
        self.active = 0
        self.max_active = 0
        self.statuses: dict[str, int] = {}
        self.upstream_reconnects = 0
        self.client_aborts = 0
        self.metadata_gets = 0

    def as_dict(self) -> dict[str, object]:
        return {
            "requests": self.requests,
            "by_method": self.by_method,
            "ranged_gets": self.ranged_gets,
            "body_bytes": self.body_bytes,
            "header_bytes": self.header_bytes,
            "request_bytes": self.request_bytes,
            "connections": self.connections,
            "max_in_flight": self.max_active,
            "statuses": self.statuses,
            "upstream_reconnects": self.upstream_reconnects,
            "client_aborts": self.client_aborts,
            "metadata_gets": self.metadata_gets,
        }


class ClientGone(Exception):
    pass


def parse_headers(head: bytes) -> tuple[str, dict[str, str]]:
    lines = head.decode("latin-1").split("\r\n")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        if not line:
            continue
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return lines[0], headers


class Proxy:
    def __init__(self, upstream_host: str, upstream_port: int) -> None:
        self.upstream = (upstream_host, upstream_port)
        self.counters = Counters()
        self.latency_s = 0.0
        self.bandwidth = 0.0
        self.total_bandwidth = 0.0
        self._line = 0.0  # loop time at which the shared link is free again

    async def handle(self, creader: asyncio.StreamReader, cwriter: asyncio.StreamWriter) -> None:
        self.counters.connections += 1
        up: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None
        try:
            while True:
                try:
                    head = await creader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
                    return
                t0 = asyncio.get_running_loop().time()
                request_line, headers = parse_headers(head)
                method, _, rest = request_line.partition(" ")
                target = rest.rpartition(" ")[0]
                if target.encode().startswith(CONTROL_PREFIX):
                    await self.control(target, cwriter)
                    continue
                body = b""
                if "100-continue" in headers.get("expect", "").lower():
                    # aiobotocore (s3fs) waits for it before sending a body: answer it here and
                    # forward the request without the expectation
                    cwriter.write(b"HTTP/1.1 100 Continue\r\n\r\n")
                    head = b"\r\n".join(
                        line
                        for line in head.split(b"\r\n")
                        if not line.lower().startswith(b"expect:")
                    )
                if "content-length" in headers:
                    body = await self.read_body(creader, int(headers["content-length"]))
                    if body:
                        t0 = asyncio.get_running_loop().time()  # latency after the upload
                elif "chunked" in headers.get("transfer-encoding", "").lower():
                    body = await self.read_chunked(creader)
                c = self.counters
                c.requests += 1
                c.by_method[method] = c.by_method.get(method, 0) + 1
                if method == "GET" and "range" in headers:
                    c.ranged_gets += 1
                if method == "GET" and target.split("?", 1)[0].endswith("/.metadata"):
                    c.metadata_gets += 1
                c.request_bytes += len(head) + len(body)
                c.active += 1
                c.max_active = max(c.max_active, c.active)
                try:
                    up, keep = await self.exchange(up, method, head + body, t0, cwriter)
                finally:
                    c.active -= 1
                if not keep or "close" in headers.get("connection", "").lower():
                    return
        except ClientGone:
            self.counters.client_aborts += 1
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            if up is not None:
                up[1].close()
            cwriter.close()
            with contextlib.suppress(Exception):
                await cwriter.wait_closed()

    async def exchange(
        self,
        up: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None,
        method: str,
        request: bytes,
        t0: float,
        cwriter: asyncio.StreamWriter,
    ) -> tuple[tuple[asyncio.StreamReader, asyncio.StreamWriter] | None, bool]:
        """Forward one request, stream its response back; returns (upstream, keep-alive)."""
        for attempt in range(2):
            if up is None or up[0].at_eof():
                if up is not None:
                    up[1].close()
                    self.counters.upstream_reconnects += 1
                up = await asyncio.open_connection(*self.upstream, limit=CHUNK)
            up[1].write(request)
            try:
                await up[1].drain()
                rhead = await up[0].readuntil(b"\r\n\r\n")
                break
            except (asyncio.IncompleteReadError, ConnectionError):
                # The server closed an idle keep-alive connection: retry once on a new one.
                up[1].close()
                up = None
                self.counters.upstream_reconnects += 1
                if attempt:
                    raise
        else:  # pragma: no cover
            raise ConnectionError("upstream")
        assert up is not None
        ureader = up[0]
        status_line, rheaders = parse_headers(rhead)
        status = int(status_line.split(" ", 2)[1])
        c = self.counters
        c.statuses[str(status)] = c.statuses.get(str(status), 0) + 1
        loop = asyncio.get_running_loop()
        if self.latency_s:
            delay = t0 + self.latency_s - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
        c.header_bytes += len(rhead)
        self.send(cwriter, rhead)
        upstream_keep = "close" not in rheaders.get("connection", "").lower()
        if method == "HEAD" or status in (204, 304) or status < 200:
            return up, upstream_keep
        if "chunked" in rheaders.get("transfer-encoding", "").lower():
            await self.pump_chunked(ureader, cwriter)
            return up, upstream_keep
        if "content-length" in rheaders:
            await self.pump(ureader, cwriter, int(rheaders["content-length"]))
            return up, upstream_keep
        await self.pump(ureader, cwriter, -1)  # until the server closes
        up[1].close()
        return None, False

    def send(self, cwriter: asyncio.StreamWriter, data: bytes) -> None:
        if cwriter.is_closing():
            raise ClientGone
        cwriter.write(data)

    async def pump(
        self, ureader: asyncio.StreamReader, cwriter: asyncio.StreamWriter, n: int
    ) -> None:
        """Forward ``n`` body bytes (-1: until EOF), paced to ``bandwidth`` if set."""
        loop = asyncio.get_running_loop()
        bandwidth = self.bandwidth
        start = loop.time()
        sent = 0
        remaining = n
        c = self.counters
        while remaining:
            data = await ureader.read(CHUNK if remaining < 0 else min(remaining, CHUNK))
            if not data:
                if remaining < 0:
                    return
                raise asyncio.IncompleteReadError(b"", remaining)
            size = len(data)
            if remaining > 0:
                remaining -= size
            try:
                self.send(cwriter, data)
                c.body_bytes += size
                sent += size
                delay = 0.0
                if bandwidth:
                    delay = start + sent / bandwidth - loop.time()
                if self.total_bandwidth:
                    now = loop.time()
                    self._line = max(self._line, now) + size / self.total_bandwidth
                    delay = max(delay, self._line - now)
                if delay > 0:
                    await asyncio.sleep(delay)
                await cwriter.drain()
            except ConnectionError:
                raise ClientGone from None

    async def pump_chunked(
        self, ureader: asyncio.StreamReader, cwriter: asyncio.StreamWriter
    ) -> None:
        while True:
            line = await ureader.readuntil(b"\r\n")
            self.send(cwriter, line)
            size = int(line.split(b";")[0], 16)
            if size == 0:
                while True:  # trailers, then the blank line
                    trailer = await ureader.readuntil(b"\r\n")
                    self.send(cwriter, trailer)
                    if trailer == b"\r\n":
                        return
            await self.pump(ureader, cwriter, size)
            self.send(cwriter, await ureader.readexactly(2))

    async def read_body(self, reader: asyncio.StreamReader, n: int) -> bytes:
        """A request body of ``n`` bytes, read at ``bandwidth`` (and ``total_bandwidth``) when
        set: an upload as fast as S3 takes one connection's."""
        if not (self.bandwidth or self.total_bandwidth) or n <= CHUNK:
            return await reader.readexactly(n)
        loop = asyncio.get_running_loop()
        start = loop.time()
        parts: list[bytes] = []
        got = 0
        while got < n:
            data = await reader.readexactly(min(CHUNK, n - got))
            parts.append(data)
            got += len(data)
            delay = start + got / self.bandwidth - loop.time() if self.bandwidth else 0.0
            if self.total_bandwidth:
                now = loop.time()
                self._line = max(self._line, now) + len(data) / self.total_bandwidth
                delay = max(delay, self._line - now)
            if delay > 0:
                await asyncio.sleep(delay)
        return b"".join(parts)

    async def read_chunked(self, reader: asyncio.StreamReader) -> bytes:
        parts = []
        while True:
            line = await reader.readuntil(b"\r\n")
            parts.append(line)
            size = int(line.split(b";")[0], 16)
            if size == 0:
                while True:
                    trailer = await reader.readuntil(b"\r\n")
                    parts.append(trailer)
                    if trailer == b"\r\n":
                        return b"".join(parts)
            parts.append(await reader.readexactly(size + 2))

    async def control(self, target: str, cwriter: asyncio.StreamWriter) -> None:
        url = urlsplit(target)
        body = json.dumps(self.counters.as_dict()).encode()
        if url.path.endswith("/reset"):
            query = parse_qs(url.query)
            self.latency_s = float(query.get("latency_ms", ["0"])[0]) / 1000.0
            self.bandwidth = float(query.get("bandwidth", ["0"])[0])
            self.total_bandwidth = float(query.get("total_bandwidth", ["0"])[0])
            self._line = 0.0
            self.counters.reset()
        cwriter.write(
            b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
            + f"Content-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
        await cwriter.drain()


async def serve(args: argparse.Namespace) -> None:
    proxy = Proxy("127.0.0.1", args.upstream_port)
    server = await asyncio.start_server(proxy.handle, "127.0.0.1", args.port, limit=1 << 20)
    port = server.sockets[0].getsockname()[1]
    sys.stdout.write(f"PORT {port}\n")
    sys.stdout.flush()
    async with server:
        await server.serve_forever()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--upstream-port", type=int, required=True)
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args()
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve(args))


if __name__ == "__main__":
    main()
