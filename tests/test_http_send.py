"""Requests with a body on the fast HTTP path (``RangeClient.send``), against a scripted HTTP
server on 127.0.0.1: what goes on the wire, every reply form S3 uses, and when a connection may
be reused."""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

import pytest

from aiodcp._http import HttpError, RangeClient, Url

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@asynccontextmanager
async def server(handler: Handler) -> AsyncIterator[tuple[int, list[int]]]:
    """A loopback server running ``handler`` per connection; yields (port, connection count)."""
    connections = [0]

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connections[0] += 1
        try:
            await handler(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    srv = await asyncio.start_server(serve, "127.0.0.1", 0)
    try:
        yield srv.sockets[0].getsockname()[1], connections
    finally:
        srv.close()
        await srv.wait_closed()


async def read_request(reader: asyncio.StreamReader) -> tuple[str, dict[str, str], bytes]:
    head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1")
    lines = head.split("\r\n")
    headers = {}
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if sep:
            headers[name.strip().lower()] = value.strip()
    body = await reader.readexactly(int(headers.get("content-length", "0")))
    return lines[0], headers, body


def client(read_timeout: float = 10.0) -> RangeClient:
    return RangeClient(
        ssl_context=ssl.create_default_context,
        max_idle=4,
        connect_timeout=5.0,
        read_timeout=read_timeout,
        user_agent="aiodcp-test",
    )


def url(port: int) -> Url:
    return Url.parse(f"http://127.0.0.1:{port}/bkt/key?partNumber=1&X-Amz-Signature=abc")


async def test_a_body_of_many_views_arrives_whole_and_the_connection_is_reused() -> None:
    seen: list[tuple[str, dict[str, str], bytes]] = []

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            seen.append(await read_request(reader))
            writer.write(b'HTTP/1.1 200 OK\r\nETag: "e1"\r\nContent-Length: 0\r\n\r\n')
            await writer.drain()

    big = bytes(range(256)) * 8192  # 2 MiB: written slice by slice
    ones = [memoryview(bytes([i % 256])) for i in range(300)]  # gathered into one slice
    views = [memoryview(b"head"), memoryview(big), *ones]
    expected = b"head" + big + bytes(range(256)) + bytes(range(44))
    async with server(handler) as (port, connections):
        http = client()
        status, headers, body = await http.send(
            url(port), "PUT", ("x-amz-checksum-crc64nvme: AAAA",), views
        )
        assert (status, headers["etag"], body) == (200, '"e1"', b"")
        await http.send(url(port), "PUT", (), [memoryview(b"again")])
        http.close()
    assert connections[0] == 1  # kept alive
    line, headers, received = seen[0]
    assert line == "PUT /bkt/key?partNumber=1&X-Amz-Signature=abc HTTP/1.1"
    assert received == expected and headers["content-length"] == str(len(expected))
    assert headers["x-amz-checksum-crc64nvme"] == "AAAA"
    assert seen[1][2] == b"again"


async def test_an_early_error_ends_the_upload_and_the_connection() -> None:
    """S3 may answer (403, 400) before the body is in: the client stops sending, raises the
    error, and never reuses that connection (the server has not read the rest)."""

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        body = b"<Error><Code>AccessDenied</Code><Message>no</Message></Error>"
        writer.write(b"HTTP/1.1 403 Forbidden\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
        await writer.drain()
        await asyncio.sleep(30)  # keeps the connection open, reading nothing

    async with server(handler) as (port, connections):
        http = client()
        for _ in range(2):
            with pytest.raises(HttpError) as info:
                await asyncio.wait_for(
                    http.send(url(port), "PUT", (), [memoryview(bytes(32 * 1024 * 1024))]), 30
                )
            assert info.value.status == 403 and info.value.code == "AccessDenied"
        http.close()
    assert connections[0] == 2  # each request on a new connection


@pytest.mark.parametrize(
    ("reply", "expected"),
    [
        (
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"5\r\n<Comp\r\n10\r\nleteResult><ETag\r\n0\r\n\r\n",
            b"<CompleteResult><ETag",
        ),
        (b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok", b"ok"),
        (b"HTTP/1.1 204 No Content\r\n\r\n", b""),
    ],
    ids=["chunked", "100-continue", "204"],
)
async def test_reply_forms(reply: bytes, expected: bytes) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            await read_request(reader)
            writer.write(reply)
            await writer.drain()

    async with server(handler) as (port, connections):
        http = client()
        for _ in range(2):
            _, _, body = await http.send(url(port), "POST", (), [memoryview(b"<xml/>")])
            assert body == expected
        http.close()
    assert connections[0] == 1


async def test_a_200_whose_body_is_an_error_is_an_error() -> None:
    """CompleteMultipartUpload can fail after its 200 was sent: the error is in the body."""

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        body = (
            b'<?xml version="1.0" encoding="UTF-8"?>\n\n   '
            b"<Error><Code>InternalError</Code><Message>retry</Message></Error>"
        )
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
        await writer.drain()

    async with server(handler) as (port, _):
        http = client()
        with pytest.raises(HttpError) as info:
            await http.send(url(port), "POST", (), [memoryview(b"<xml/>")])
        assert info.value.code == "InternalError" and info.value.status == 200
        http.close()


async def test_head_has_no_body_whatever_its_length() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            await read_request(reader)
            writer.write(b'HTTP/1.1 200 OK\r\nContent-Length: 12345\r\nETag: "x"\r\n\r\n')
            await writer.drain()

    async with server(handler) as (port, connections):
        http = client()
        for _ in range(2):
            status, headers, body = await http.send(url(port), "HEAD")
            assert (status, headers["content-length"], body) == (200, "12345", b"")
        http.close()
    assert connections[0] == 1


async def test_a_server_that_stops_reading_the_body_times_out() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        await asyncio.sleep(30)  # reads no body, answers nothing

    async with server(handler) as (port, _):
        http = client(read_timeout=0.5)
        loop = asyncio.get_running_loop()
        started = loop.time()
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(
                http.send(url(port), "PUT", (), [memoryview(bytes(64 * 1024 * 1024))]), 30
            )
        assert loop.time() - started < 20  # a generous bound: the timeout, not the guard
        http.close()
