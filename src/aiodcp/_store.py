"""The object store: S3 through aiobotocore. The only module that knows botocore and aiohttp.

Data flow: ``S3Store`` (one per event loop: an aiobotocore client belongs to the loop it was made
on) -> ``get_object(bucket, key)`` for small objects such as ``.metadata`` -> ``open_range(bucket,
key, start, end, if_match)`` for ranged GETs, returning a ``RangeStream`` whose ``read_chunk()``
hands out the body as the network delivered it (one ``bytes`` per socket read, never joined).

Every botocore/aiohttp exception is translated here, at one boundary, into the most specific
``aiodcp`` error (``translate_error``), with bucket and key in the message. botocore retries a
request up to its response headers; a failure while streaming a body surfaces as a
``TransferError`` marked ``retryable`` so the engine can resume from the last byte received.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from types import TracebackType
from typing import Any

import aiohttp
import botocore.exceptions
from aiobotocore.config import AioConfig
from aiobotocore.session import AioSession
from botocore import UNSIGNED

from ._config import ReaderConfig
from ._errors import (
    AccessDeniedError,
    AiodcpError,
    NoCredentialsError,
    NoSuchBucketError,
    NotFoundError,
    ObjectChangedError,
    StorageError,
    TransferError,
    TruncatedObjectError,
)

__all__ = ["RangeStream", "S3Store", "translate_error"]

_CONTENT_RANGE_RE = re.compile(r"^bytes (\d+)-(\d+)/(\d+|\*)$")

# Errors a new request can fix: the connection broke, the body stalled, the stream was cut short.
_TRANSIENT = (
    aiohttp.ClientPayloadError,
    aiohttp.ClientConnectionError,
    asyncio.TimeoutError,
    botocore.exceptions.ResponseStreamingError,
    botocore.exceptions.ReadTimeoutError,
    botocore.exceptions.ConnectTimeoutError,
    botocore.exceptions.EndpointConnectionError,
    botocore.exceptions.ConnectionClosedError,
    botocore.exceptions.IncompleteReadError,
)


def _where(bucket: str, key: str, byte_range: tuple[int, int] | None) -> str:
    where = f"s3://{bucket}/{key}"
    if byte_range is not None:
        where += f" bytes [{byte_range[0]}, {byte_range[1]})"
    return where


def translate_error(
    exc: BaseException,
    bucket: str,
    key: str,
    byte_range: tuple[int, int] | None = None,
) -> AiodcpError:
    """Map a botocore/aiohttp exception to the most specific aiodcp error (``raise ... from``)."""
    if isinstance(exc, AiodcpError):
        return exc
    where = _where(bucket, key, byte_range)
    ctx: dict[str, Any] = {"bucket": bucket, "key": key, "byte_range": byte_range}
    if isinstance(exc, botocore.exceptions.NoCredentialsError):
        return NoCredentialsError(
            f"no AWS credentials found to read {where}: set AWS_ACCESS_KEY_ID/"
            "AWS_SECRET_ACCESS_KEY, a profile, or pass unsigned=True for a public bucket",
            retryable=False,
            **ctx,
        )
    if isinstance(exc, botocore.exceptions.ClientError):
        error = exc.response.get("Error", {})
        code = str(error.get("Code", ""))
        status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
        detail = f"{code or status}: {error.get('Message', '') or exc}"
        if code == "NoSuchBucket":
            return NoSuchBucketError(
                f"bucket {bucket!r} does not exist (while reading {where}); check the bucket "
                f"name and the endpoint/region ({detail})",
                status=status,
                retryable=False,
                **ctx,
            )
        if code in ("NoSuchKey", "404", "NotFound") or status == 404:
            return NotFoundError(
                f"{where} does not exist; check the checkpoint path ({detail})",
                status=status,
                retryable=False,
                **ctx,
            )
        if (
            code
            in ("AccessDenied", "403", "Forbidden", "InvalidAccessKeyId", "SignatureDoesNotMatch")
            or status == 403
        ):
            return AccessDeniedError(
                f"access denied to {where}; check the credentials and the bucket policy ({detail})",
                status=status,
                retryable=False,
                **ctx,
            )
        if code == "PreconditionFailed" or status == 412:
            return ObjectChangedError(
                f"{where} was replaced while it was being loaded (its ETag changed); "
                "load again once the checkpoint is complete",
                status=status,
                retryable=False,
                **ctx,
            )
        if code == "InvalidRange" or status == 416:
            return TruncatedObjectError(
                f"{where} is shorter than the checkpoint metadata says (the store answered "
                f"{detail}); the checkpoint is incomplete or corrupt",
                status=status,
                retryable=False,
                **ctx,
            )
        return TransferError(
            f"reading {where} failed: {detail}",
            status=status,
            retryable=status >= 500 or status in (408, 429),
            **ctx,
        )
    if isinstance(exc, _TRANSIENT):
        return TransferError(
            f"reading {where} failed: {type(exc).__name__}: {exc}",
            retryable=True,
            **ctx,
        )
    if isinstance(exc, botocore.exceptions.BotoCoreError):
        return StorageError(
            f"reading {where} failed: {type(exc).__name__}: {exc}", retryable=False, **ctx
        )
    return StorageError(
        f"reading {where} failed: {type(exc).__name__}: {exc}", retryable=False, **ctx
    )


def is_retryable(exc: BaseException) -> bool:
    return bool(getattr(exc, "retryable", False))


class RangeStream:
    """The body of one ranged GET, chunk by chunk as received (no joins, no copies)."""

    __slots__ = ("_body", "_content", "bucket", "end", "etag", "key", "start")

    def __init__(
        self, body: Any, *, bucket: str, key: str, start: int, end: int, etag: str | None
    ) -> None:
        self._body = body
        self._content: aiohttp.StreamReader = body.raw_stream.content
        self.bucket = bucket
        self.key = key
        self.start = start
        self.end = end
        self.etag = etag

    async def read_chunk(self) -> bytes:
        """The next chunk of the body; ``b""`` at its end. Raises translated errors."""
        try:
            data, _ = await self._content.readchunk()
        except Exception as exc:
            raise translate_error(exc, self.bucket, self.key, (self.start, self.end)) from exc
        return data

    def close(self) -> None:
        """Release the connection (drops it if the body was not read to its end)."""
        self._body.close()


class S3Store:
    """S3 (or S3-compatible) access on the event loop it is opened on."""

    def __init__(self, config: ReaderConfig) -> None:
        self.config = config
        self._stack: contextlib.AsyncExitStack | None = None
        self._client: Any = None

    async def __aenter__(self) -> S3Store:
        await self.open()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def open(self) -> None:
        if self._client is not None:
            return
        cfg = self.config
        options: dict[str, Any] = {
            "connect_timeout": cfg.connect_timeout_s,
            "read_timeout": cfg.read_timeout_s,
            "max_pool_connections": cfg.max_concurrency,
            "retries": {"max_attempts": cfg.max_attempts - 1, "mode": "standard"},
            "s3": {"addressing_style": cfg.addressing_style},
        }
        if cfg.unsigned:
            options["signature_version"] = UNSIGNED
        options.update(cfg.extra)
        session = AioSession(profile=cfg.profile)
        stack = contextlib.AsyncExitStack()
        try:
            self._client = await stack.enter_async_context(
                session.create_client(
                    "s3",
                    region_name=cfg.region,
                    endpoint_url=cfg.endpoint_url,
                    verify=cfg.verify,
                    config=AioConfig(**options),
                )
            )
        except botocore.exceptions.ProfileNotFound as exc:
            await stack.aclose()
            raise NoCredentialsError(
                f"botocore profile {cfg.profile!r} does not exist; check ~/.aws/config",
                bucket="",
                key="",
                retryable=False,
            ) from exc
        except BaseException:
            await stack.aclose()
            raise
        self._stack = stack

    async def close(self) -> None:
        stack, self._stack, self._client = self._stack, None, None
        if stack is not None:
            await stack.aclose()

    @property
    def client(self) -> Any:
        if self._client is None:
            raise RuntimeError("S3Store is not open")
        return self._client

    async def get_object(self, bucket: str, key: str) -> bytes:
        """The whole object (for small objects such as ``.metadata``)."""
        attempts = self.config.max_attempts
        for attempt in range(1, attempts + 1):
            body = None
            try:
                response = await self.client.get_object(Bucket=bucket, Key=key)
                body = response["Body"]
                data: bytes = await body.read()
                return data
            except Exception as exc:
                error = translate_error(exc, bucket, key)
                if attempt == attempts or not is_retryable(error) or _is_client_error(exc):
                    raise error from exc
            finally:
                if body is not None:
                    body.close()
        raise AssertionError("unreachable")  # pragma: no cover

    async def object_size(self, bucket: str, key: str) -> int:
        """The object's size in bytes (HEAD)."""
        try:
            response = await self.client.head_object(Bucket=bucket, Key=key)
        except Exception as exc:
            raise translate_error(exc, bucket, key) from exc
        return int(response["ContentLength"])

    async def read_range(self, bucket: str, key: str, start: int, end: int) -> bytes:
        """Bytes ``[start, end)`` joined (for small reads of the generic reader)."""
        if end <= start:
            return b""
        stream = await self.open_range(bucket, key, start, end)
        try:
            parts = []
            while chunk := await stream.read_chunk():
                parts.append(chunk)
        finally:
            stream.close()
        data = b"".join(parts)
        if len(data) < end - start:
            raise TransferError(
                f"{_where(bucket, key, (start, end))}: the body ended after {len(data)} bytes",
                bucket=bucket,
                key=key,
                byte_range=(start, end),
                retryable=True,
            )
        return data[: end - start]

    async def open_range(
        self, bucket: str, key: str, start: int, end: int, *, if_match: str | None = None
    ) -> RangeStream:
        """Start a GET of bytes ``[start, end)``; checks the store served that whole range."""
        kwargs: dict[str, Any] = {"Bucket": bucket, "Key": key, "Range": f"bytes={start}-{end - 1}"}
        if if_match is not None:
            kwargs["IfMatch"] = if_match
        try:
            response = await self.client.get_object(**kwargs)
        except Exception as exc:
            raise translate_error(exc, bucket, key, (start, end)) from exc
        body = response["Body"]
        served_end = _served_end(response, start, end)
        if served_end < end:
            body.close()
            raise TruncatedObjectError(
                f"{_where(bucket, key, (start, end))}: the object ends at byte {served_end}, "
                "before the end the checkpoint metadata gives; the checkpoint is incomplete "
                "or corrupt",
                bucket=bucket,
                key=key,
                byte_range=(start, end),
                retryable=False,
            )
        etag = response.get("ETag")
        return RangeStream(body, bucket=bucket, key=key, start=start, end=end, etag=etag)


def _is_client_error(exc: BaseException) -> bool:
    """botocore already retried this one (an error response, not a broken body)."""
    return isinstance(exc, botocore.exceptions.ClientError)


def _served_end(response: dict[str, Any], start: int, end: int) -> int:
    """Exclusive end of the bytes the store will send, from Content-Range or Content-Length."""
    content_range = response.get("ContentRange")
    if content_range:
        match = _CONTENT_RANGE_RE.match(content_range.strip())
        if match:
            return int(match.group(2)) + 1
    length = response.get("ContentLength")
    if isinstance(length, int):
        return start + length
    return end
