"""The object store: S3 through aiobotocore. The only module that knows botocore and aiohttp.

Data flow: ``S3Store`` (one per event loop: an aiobotocore client belongs to the loop it was made
on) -> ``get_object(bucket, key)`` for small objects such as ``.metadata`` -> ``open_range(bucket,
key, start, end, if_match)`` for ranged GETs, returning a ``RangeStream`` whose ``read_chunk()``
hands out the body as the network delivered it (one ``bytes`` per socket read, never joined).

Data GETs take the fast path when they can: ``fetch_range(bucket, key, start, end, sink)``
presigns the object's URL (``_fast_url``, reused for half the life it has left) and hands the
request to ``_http.RangeClient``, which writes the body straight into the engine's sink. URLs
are signed as the client signs its own requests (``_presign_as_requests``: SigV4 query form, the
client's endpoint, the bucket's region as botocore resolved it) and never outlive the
credentials that signed them. Proxies and client certificates (seen in botocore's resolved HTTP
settings), ``fast_http=False``, and any response that is not the plain case go through
``open_range`` (botocore) instead. An error response is sorted by ``_refusal_kind``: an expired
signature is signed again (credentials refreshed once per refused key) and resent without
counting as an attempt; a region refusal goes through botocore, which follows S3's redirect and
remembers the region; a possibly mangled URL goes through botocore too, and after
``_FAST_FALLBACK_LIMIT`` of those a store stays on botocore; anything else is classified as a
botocore error response would be (``classify``). ``limiter`` (``_throttle.AdaptiveRate``) is
the store's request rate, which the engine lowers on SlowDown.

Data GETs are conditional: ``If-Match`` once the object's ETag is known, else
``If-Unmodified-Since`` with the time the checkpoint's ``.metadata`` was served
(``load_started``), so no load mixes two versions of a checkpoint.

Every botocore/aiohttp exception is translated here, at one boundary, into the most specific
``aiodcp`` error (``translate_error``), with bucket and key in the message, marked ``retryable``
when a new request can fix it (``is_retryable``). An error response, botocore's ``ClientError``
or the fast path's ``HttpError``, is classified from its facts alone (HTTP status, S3 code,
message) by ``classify``, which holds every rule for error responses.

Retries are ours, not botocore's (its retries are switched off): botocore can only retry up to
the response headers, while a body that breaks mid-stream must be resumed from the last byte
received, and one attempt budget has to cover both. So every request, whatever fails (connect,
headers, body), is sent at most ``max_attempts`` times, with exponential backoff and full jitter
between attempts (``retry_delay``), and each attempt is counted in ``LoadStats``. A request that
still fails raises a ``TransferError`` carrying ``attempts`` (``exhausted``); errors that no
retry can fix (403, 404, 412, a truncated object) are raised at once. ``open_range`` makes one
attempt and leaves the retrying to its caller (the engine resumes where the body stopped);
``get_object``, ``object_size`` and ``read_range`` retry themselves.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime
import email.utils
import json
import logging
import os
import posixpath
import random
import re
import ssl
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from types import TracebackType
from typing import TYPE_CHECKING, Any, TypeVar

import aiohttp
import botocore.exceptions
import botocore.loaders
from aiobotocore.config import AioConfig
from aiobotocore.httpsession import AIOHTTPSession
from aiobotocore.session import AioSession
from botocore import UNSIGNED
from botocore.httpsession import get_cert_path

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
from ._http import FallbackRequired, HttpError, RangeClient, RangeSink, Url, feed
from ._throttle import AdaptiveRate

if TYPE_CHECKING:
    from ._stats import StatsRecorder

__all__ = [
    "RangeSink",
    "RangeStream",
    "S3Store",
    "exhausted",
    "is_retryable",
    "is_throttling",
    "retry_delay",
    "translate_error",
]

T = TypeVar("T")

logger = logging.getLogger(__name__)

RETRY_BACKOFF_BASE_S = 0.25
"""Seconds: the first retry waits up to this long, each later one up to twice as long."""
RETRY_BACKOFF_CAP_S = 20.0
"""Seconds: no retry waits longer than this (botocore's own cap)."""

_CONTENT_RANGE_RE = re.compile(r"^bytes (\d+)-(\d+)/(\d+|\*)$")

# Errors a new request can fix: the connection broke, the body stalled, the stream was cut short.
# (botocore's ConnectionError covers EndpointConnectionError, ConnectTimeoutError,
# ReadTimeoutError, ConnectionClosedError and ProxyConnectionError; SSLError is excluded below.)
_TRANSIENT = (
    aiohttp.ClientPayloadError,
    aiohttp.ClientConnectionError,
    asyncio.TimeoutError,
    ConnectionError,
    botocore.exceptions.ConnectionError,
    botocore.exceptions.HTTPClientError,
    botocore.exceptions.ResponseStreamingError,
    botocore.exceptions.IncompleteReadError,
)

_THROTTLING_CODES = frozenset(
    {
        "SlowDown",
        "Throttling",
        "ThrottlingException",
        "ThrottledException",
        "RequestThrottledException",
        "TooManyRequestsException",
        "ProvisionedThroughputExceededException",
        "TransactionInProgressException",
        "RequestLimitExceeded",
        "BandwidthLimitExceeded",
        "LimitExceededException",
        "RequestThrottled",
        "EC2ThrottledException",
    }
)
"""Error codes of a request refused for its rate: botocore standard mode's throttling list. The
load lowers its request rate on them (``is_throttling``)."""
# Error responses a new request can fix: botocore standard mode's transient and throttling
# lists, and the status codes it retries (plus 408 and 429).
_RETRYABLE_CODES = _THROTTLING_CODES | {
    "RequestTimeout",
    "RequestTimeoutException",
    "PriorRequestNotComplete",
    "InternalError",
    "ServiceUnavailable",
}
_RETRYABLE_STATUS = frozenset({408, 429, 500, 502, 503, 504})


def _where(bucket: str, key: str, byte_range: tuple[int, int] | None) -> str:
    where = f"s3://{bucket}/{key}"
    if byte_range is not None:
        where += f" bytes [{byte_range[0]}, {byte_range[1]})"
    return where


def classify(status: int, code: str, message: str, where: str, ctx: dict[str, Any]) -> StorageError:
    """The aiodcp error for an error response, from its facts alone: the HTTP ``status``, the S3
    error ``code`` ("" if none), its ``message``. ``where`` names the object (and range) in the
    error's message; ``ctx`` (bucket, key, byte_range) is its context, with ``code`` added.
    Every rule for error responses is here, whichever client received the response."""
    detail = f"{code or status}: {message}"
    ctx = {**ctx, "code": code or None}
    if code == "NoSuchBucket":
        return NoSuchBucketError(
            f"bucket {ctx['bucket']!r} does not exist (while reading {where}); check the bucket "
            f"name and the endpoint/region ({detail})",
            status=status,
            retryable=False,
            **ctx,
        )
    if code in _STALE_CREDENTIAL_CODES:
        return AccessDeniedError(
            f"the store refused the credentials used to read {where} as expired ({detail}); "
            "the credential provider did not supply fresh ones: refresh the credentials "
            "(or the profile's credential source) and load again",
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
        code in ("AccessDenied", "403", "Forbidden", "InvalidAccessKeyId", "SignatureDoesNotMatch")
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
        retryable=status in _RETRYABLE_STATUS or code in _RETRYABLE_CODES,
        **ctx,
    )


def translate_error(
    exc: BaseException,
    bucket: str,
    key: str,
    byte_range: tuple[int, int] | None = None,
) -> AiodcpError:
    """Map a botocore/aiohttp exception, or the fast path's ``HttpError``, to the most specific
    aiodcp error (``raise ... from``)."""
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
        status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
        message = str(error.get("Message", "") or exc)
        return classify(status, str(error.get("Code", "")), message, where, ctx)
    if isinstance(exc, HttpError):
        return classify(exc.status, exc.code, exc.message, where, ctx)
    if isinstance(exc, _TRANSIENT) and not isinstance(exc, botocore.exceptions.SSLError):
        return TransferError(
            f"reading {where} failed: {type(exc).__name__}: {exc}",
            retryable=True,
            **ctx,
        )
    return StorageError(
        f"reading {where} failed: {type(exc).__name__}: {exc}", retryable=False, **ctx
    )


def is_retryable(exc: BaseException) -> bool:
    """Whether a new request can fix the failure (translated errors only)."""
    return isinstance(exc, StorageError) and exc.retryable


def is_throttling(exc: BaseException) -> bool:
    """Whether the store refused a request for its rate (503 SlowDown, 429, Throttling...)."""
    code = getattr(exc, "code", None)
    return code in _THROTTLING_CODES or getattr(exc, "status", None) in (429, 503)


def retry_delay(attempt: int) -> float:
    """Seconds to wait after failed attempt ``attempt`` (1-based): exponential, full jitter."""
    cap = min(RETRY_BACKOFF_CAP_S, RETRY_BACKOFF_BASE_S * 2 ** min(attempt - 1, 30))
    return random.uniform(0.0, cap)


def exhausted(error: AiodcpError, attempts: int) -> AiodcpError:
    """The error to raise once ``attempts`` attempts failed, the last with ``error``."""
    if not is_retryable(error):
        return error
    context = dict(error.context)
    context.update(attempts=attempts, retryable=False)
    cause = error.__cause__
    timed_out = isinstance(cause, asyncio.TimeoutError) or "Timeout" in type(cause).__name__
    hint = "raise connect_timeout_s/read_timeout_s or " if timed_out else ""
    return TransferError(
        f"{error.message} (gave up after {attempts} attempt{'s' if attempts != 1 else ''}: "
        f"the store or the network keeps failing; try again later, or {hint}raise max_attempts)",
        **context,
    )


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
        self._fast: RangeClient | None = None
        self._proxy_config: Any = None
        self._urls: dict[tuple[str, str], _Signed] = {}
        self._fast_fallbacks = 0
        self._started: dict[tuple[str, str], str] = {}  # (bucket, dir) -> .metadata GET's Date
        # access key the store refused as expired -> the refresh it caused (one per key)
        self._refreshing: dict[str, asyncio.Future[None]] = {}
        self._payer: dict[str, str] = (
            {} if config.request_payer is None else {"RequestPayer": config.request_payer}
        )
        self.limiter = AdaptiveRate()
        """Request starts per second for this store, lowered when it answers SlowDown."""

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
            # One attempt per call: retries (and resumes) are ours, see the module docstring.
            "retries": {"total_max_attempts": 1, "mode": "standard"},
            "s3": {"addressing_style": cfg.addressing_style},
        }
        if cfg.unsigned:
            options["signature_version"] = UNSIGNED
        if _SharedSSLSession is not None:
            options["http_session_cls"] = _SharedSSLSession  # unless ``extra`` names another
        options.update(cfg.extra)
        session = AioSession(profile=cfg.profile)
        # botocore parses S3's service model (~0.1-0.3 s of JSON) for every new session; share
        # one parsed copy per process. (Parsing it in a thread was worse for the loop: json's C
        # parser holds the GIL throughout, and the two threads then convoy on the GIL.)
        session.register_component("data_loader", _load_loader())
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
        self._fast = self._fast_client()
        if self._fast is not None:
            _presign_as_requests(self._client)

    def _fast_client(self) -> RangeClient | None:
        """The fast ranged-GET path, unless this client's set-up needs botocore's HTTP stack
        (a client certificate, or settings we cannot see); proxies are checked per URL."""
        session = getattr(getattr(self._client, "_endpoint", None), "http_session", None)
        proxy_config = getattr(session, "_proxy_config", None)
        if (
            session is None
            or proxy_config is None
            or not hasattr(proxy_config, "proxy_url_for")
            or getattr(session, "_cert_file", None)
            or not self.config.fast_http
        ):
            return None
        self._proxy_config = proxy_config
        verify: bool | str = getattr(session, "_verify", self.config.verify)

        def ssl_context() -> ssl.SSLContext:
            ca_file = get_cert_path(verify) if verify is not False else None
            return _shared_ssl_context(("fast", verify), lambda: _fast_ssl_context(verify), ca_file)

        from ._version import __version__

        return RangeClient(
            ssl_context=ssl_context,
            max_idle=self.config.max_concurrency,
            connect_timeout=self.config.connect_timeout_s,
            read_timeout=self.config.read_timeout_s,
            user_agent=f"aiodcp/{__version__}",
        )

    async def close(self) -> None:
        stack, self._stack, self._client = self._stack, None, None
        fast, self._fast = self._fast, None
        self._urls.clear()
        for refresh in self._refreshing.values():
            refresh.cancel()
        self._refreshing.clear()
        if fast is not None:
            fast.close()
        if stack is not None:
            await stack.aclose()

    @property
    def client(self) -> Any:
        if self._client is None:
            raise StorageError(
                "the S3 store is closed (the reader or load that owned it ended); open a new "
                "reader or start a new load",
                bucket="",
                key="",
            )
        return self._client

    async def retrying(
        self,
        attempt_once: Callable[[int], Awaitable[T]],
        *,
        on_retry: Callable[[int], None] | None = None,
        what: str = "request",
    ) -> T:
        """The one retry policy of every request: ``await attempt_once(attempt)`` (1-based)
        until it succeeds, fails for good, or ``max_attempts`` attempts ran.

        ``attempt_once`` raises translated errors; a retryable one is retried after
        ``retry_delay`` (exponential backoff, full jitter), calling ``on_retry(next_attempt)``
        first; the last one raises ``exhausted(...)``. ``what`` names the request in the
        DEBUG line of each retry. Cancellation stops at once.
        """
        attempts = self.config.max_attempts
        attempt = 0
        while True:
            attempt += 1
            try:
                return await attempt_once(attempt)
            except AiodcpError as error:
                if not is_retryable(error):
                    raise
                if attempt >= attempts:
                    raise exhausted(error, attempt) from error
                logger.debug(
                    "%s: attempt %d/%d failed (%s); retrying", what, attempt, attempts, error
                )
            await asyncio.sleep(retry_delay(attempt))
            if on_retry is not None:
                on_retry(attempt + 1)

    async def get_object(
        self, bucket: str, key: str, *, stats: StatsRecorder | None = None
    ) -> bytes:
        """The whole object (for small objects such as ``.metadata``), retried as a whole.

        With ``stats``, each retry adds one request and one retry (the caller counts the first
        request itself).
        """

        async def attempt_once(attempt: int) -> bytes:
            body = None
            try:
                response = await self.client.get_object(Bucket=bucket, Key=key, **self._payer)
                body = response["Body"]
                data: bytes = await body.read()
                date = response.get("ResponseMetadata", {}).get("HTTPHeaders", {}).get("date")
                if key.rsplit("/", 1)[-1] == ".metadata" and isinstance(date, str):
                    self._started[(bucket, posixpath.dirname(key))] = date
            except Exception as exc:
                raise translate_error(exc, bucket, key) from exc
            finally:
                if body is not None:
                    body.close()
            return data

        def on_retry(attempt: int) -> None:
            if stats is not None:
                stats.add(requests=1, retries=1)

        return await self.retrying(attempt_once, on_retry=on_retry, what=f"s3://{bucket}/{key}")

    async def object_size(self, bucket: str, key: str) -> int:
        """The object's size in bytes (HEAD)."""

        async def attempt_once(attempt: int) -> int:
            try:
                response = await self.client.head_object(Bucket=bucket, Key=key, **self._payer)
            except Exception as exc:
                raise translate_error(exc, bucket, key) from exc
            return int(response["ContentLength"])

        return await self.retrying(attempt_once, what=f"HEAD s3://{bucket}/{key}")

    def load_started(self, bucket: str, key: str) -> str | None:
        """When the load of the checkpoint holding ``key`` began, in the store's clock: the
        ``Date`` of its latest ``.metadata`` GET (None if unknown). A data file modified after
        that is not the version the metadata describes: data GETs send it as
        ``If-Unmodified-Since`` until they pin the file's ETag."""
        return self._started.get((bucket, posixpath.dirname(key)))

    async def read_range(
        self, bucket: str, key: str, start: int, end: int, *, if_match: str | None = None
    ) -> tuple[bytes, str | None]:
        """Bytes ``[start, end)`` joined, and the object's ETag (for the generic reader); a
        broken body resumes. With ``if_match``, a replaced object raises ObjectChangedError."""
        if end <= start:
            return b"", if_match
        parts: list[bytes] = []
        received = 0
        etag: list[str] = [if_match] if if_match is not None else []

        async def attempt_once(attempt: int) -> None:
            nonlocal received
            stream = await self.open_range(
                bucket, key, start + received, end, if_match=etag[0] if etag else None
            )
            try:
                if stream.etag is not None and not etag:
                    etag.append(stream.etag)
                while start + received < end:
                    chunk = await stream.read_chunk()
                    if not chunk:
                        raise _ended_early(bucket, key, start, end, start + received)
                    parts.append(chunk)
                    received += len(chunk)
            finally:
                stream.close()

        await self.retrying(
            attempt_once, what=f"s3://{bucket}/{key} bytes [{start + received}, {end})"
        )
        return b"".join(parts)[: end - start], (etag[0] if etag else None)

    async def fetch_range(
        self,
        bucket: str,
        key: str,
        start: int,
        end: int,
        *,
        if_match: str | None,
        sink: RangeSink,
        unmodified_since: str | None = None,
        stats: StatsRecorder | None = None,
    ) -> None:
        """One attempt at bytes ``[start, end)`` into ``sink``; raises translated errors.

        ``if_match`` pins the object to an ETag; without one, ``unmodified_since`` (an HTTP
        date, see ``load_started``) makes the store refuse an object replaced after that time.

        ``sink.begin(etag)`` is called once the response headers are in, then the body goes
        into ``sink.buffer(pos)`` views. Through the fast path (``_http``) when it applies,
        otherwise (or when the response is not the plain case) through botocore.
        """
        if if_match is not None:
            unmodified_since = None
        if self._fast is not None and await self._fetch_fast(
            bucket, key, start, end, if_match, unmodified_since, sink, stats
        ):
            return
        stream = await self.open_range(
            bucket, key, start, end, if_match=if_match, unmodified_since=unmodified_since
        )
        try:
            sink.begin(stream.etag)
            pos = start
            while pos < end:
                chunk = await stream.read_chunk()
                if not chunk:
                    raise _ended_early(bucket, key, start, end, pos)
                pos = feed(sink, pos, end, chunk)
        finally:
            stream.close()

    async def _fetch_fast(
        self,
        bucket: str,
        key: str,
        start: int,
        end: int,
        if_match: str | None,
        unmodified_since: str | None,
        sink: RangeSink,
        stats: StatsRecorder | None,
    ) -> bool:
        """One attempt through the fast path; False: send it through botocore instead.

        A refusal that says the signature went stale (an expired token or URL) is not a failed
        attempt: the URL is signed again, with credentials refreshed if the refused ones are
        still current, and the request resent (``_RESIGNS`` times at most). A refusal that a
        botocore request can fix (a bucket in another region: botocore follows S3's redirect
        and remembers the region, and the next URL is signed for it) goes through botocore
        once. Anything else that is not the plain case goes through botocore too, and after
        ``_FAST_FALLBACK_LIMIT`` of those this store stays on botocore.
        """
        fast = self._fast
        for _ in range(_RESIGNS + 1):
            signed = await self._fast_url(bucket, key)
            if signed.url is None or self._fast is None:
                return False
            try:
                await fast.fetch(  # type: ignore[union-attr]
                    signed.url, start, end, if_match, sink, unmodified_since
                )
                return True
            except HttpError as exc:
                kind = _refusal_kind(exc.status, exc.code, exc.message)
                if kind is None:
                    raise translate_error(exc, bucket, key, (start, end)) from exc
                self._urls.pop((bucket, key), None)
                if kind in ("stale", "resign"):
                    if stats is not None:
                        stats.add(resigned=1)
                    if kind == "stale" and not await self._refresh_credentials(signed.access_key):
                        # the provider has nothing newer: signing again cannot help
                        raise translate_error(exc, bucket, key, (start, end)) from exc
                    continue
                if kind == "fallback":
                    self._fast_fallbacks += 1
            except FallbackRequired:
                self._urls.pop((bucket, key), None)
                self._fast_fallbacks += 1
            except AiodcpError:
                raise
            except Exception as exc:
                raise translate_error(exc, bucket, key, (start, end)) from exc
            break
        if self._fast_fallbacks >= _FAST_FALLBACK_LIMIT:
            self._fast = None  # this store keeps answering oddly: botocore from now on
        return False

    async def _fast_url(self, bucket: str, key: str) -> _Signed:
        """The presigned URL of an object for the fast path (cached), ``url`` None to use
        botocore. It is signed the way the client signs its own requests (SigV4, the client's
        endpoint, the bucket's region once botocore learnt it, see ``_presign_as_requests``),
        lives at most as long as the credentials that signed it, and is reused for at most half
        of the life it has left."""
        now = time.monotonic()
        cached = self._urls.get((bucket, key))
        if cached is not None and cached.reuse_until > now:
            return cached
        params: dict[str, Any] = {"Bucket": bucket, "Key": key, **self._payer}
        credentials = _signer_credentials(self._client)
        try:
            access_key = await _current_access_key(credentials)
            lifetime = _PRESIGN_EXPIRES_S
            credentials_left = _seconds_left(credentials)
            if credentials_left is not None:
                lifetime = int(min(lifetime, credentials_left - _CREDENTIAL_MARGIN_S))
            if _is_directory_bucket(bucket):
                lifetime = min(lifetime, _DIRECTORY_SESSION_S)
            if lifetime < _MIN_PRESIGN_S:
                # Credentials about to expire: botocore refreshes them on its own requests.
                signed = _Signed(None, now + _MIN_PRESIGN_S / 2, access_key)
                self._urls[(bucket, key)] = signed
                return signed
            text = await self.client.generate_presigned_url(
                "get_object", Params=params, ExpiresIn=lifetime
            )
        except botocore.exceptions.NoCredentialsError as exc:
            raise translate_error(exc, bucket, key) from exc
        except Exception as exc:
            # Whatever botocore cannot presign (an S3 Express session it could not create, a
            # credential source that failed) it may still send: its request raises the real
            # error, if there is one.
            logger.debug("presigning s3://%s/%s failed (%r): botocore sends it", bucket, key, exc)
            signed = _Signed(None, now + _MIN_PRESIGN_S, None)
            self._urls[(bucket, key)] = signed
            return signed
        url: Url | None = Url.parse(text)
        if url is not None and self.config.request_payer is not None:
            # signed as a header (X-Amz-SignedHeaders), so it must be sent as one
            url = dataclasses.replace(
                url, headers=(f"x-amz-request-payer: {self.config.request_payer}",)
            )
        if self._proxy_config.proxy_url_for(text):
            url = None  # botocore knows how to go through the proxy
        signed = _Signed(url, now + min(_PRESIGN_REUSE_S, lifetime / 2), access_key)
        self._urls[(bucket, key)] = signed
        return signed

    async def _refresh_credentials(self, refused_key: str | None) -> bool:
        """The store refused ``refused_key`` as expired: have the client's credential provider
        fetch new credentials, once per refused key. A burst of refusals (32 GETs in flight)
        shares one refresh, and every request waits for it before it is signed again. Returns
        whether the client now signs with other credentials (static keys cannot refresh)."""
        if refused_key is None:
            return False
        refresh = self._refreshing.get(refused_key)
        if refresh is None:
            refresh = asyncio.ensure_future(self._refresh(refused_key))
            self._refreshing[refused_key] = refresh
        await asyncio.shield(refresh)
        current = await _current_access_key(_signer_credentials(self._client))
        return current is not None and current != refused_key

    async def _refresh(self, refused_key: str) -> None:
        credentials = _signer_credentials(self._client)
        refresh = getattr(credentials, "_protected_refresh", None)
        lock = getattr(credentials, "_refresh_lock", None)
        if refresh is None or lock is None:
            return
        try:
            async with lock:
                if await _current_access_key(credentials) == refused_key:
                    await refresh(is_mandatory=True)
        except Exception:
            logger.warning(
                "refreshing credentials after an expired-token reply failed", exc_info=True
            )

    async def open_range(
        self,
        bucket: str,
        key: str,
        start: int,
        end: int,
        *,
        if_match: str | None = None,
        unmodified_since: str | None = None,
    ) -> RangeStream:
        """Start a GET of bytes ``[start, end)``; checks the store served that whole range."""
        kwargs: dict[str, Any] = {
            "Bucket": bucket,
            "Key": key,
            "Range": f"bytes={start}-{end - 1}",
            **self._payer,
        }
        if if_match is not None:
            kwargs["IfMatch"] = if_match
        elif unmodified_since is not None:
            kwargs["IfUnmodifiedSince"] = email.utils.parsedate_to_datetime(unmodified_since)
        try:
            response = await self.client.get_object(**kwargs)
        except Exception as exc:
            raise translate_error(exc, bucket, key, (start, end)) from exc
        body = response["Body"]
        served_start, served_end = _served_span(response, start, end)
        if served_start != start:
            body.close()
            status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            raise StorageError(
                f"{_where(bucket, key, (start, end))}: the store ignored the Range header (it "
                f"answered {status} with bytes from {served_start} instead of {start}, "
                f"Content-Range {response.get('ContentRange')!r}); aiodcp needs ranged GETs: "
                "use an S3-compatible store (or proxy) that supports them",
                bucket=bucket,
                key=key,
                byte_range=(start, end),
                retryable=False,
            )
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


_PRESIGN_EXPIRES_S = 3600
_PRESIGN_REUSE_S = 1800.0
"""A presigned URL is used for half the life it has left (at most this long): credentials
rotate, clocks drift, and a request may wait in a queue before it is sent."""
_CREDENTIAL_MARGIN_S = 60.0
"""Seconds: a URL expires at least this long before the temporary credentials that signed it."""
_MIN_PRESIGN_S = 10
"""Seconds: credentials with less life left than this sign no URL (botocore, which refreshes
them before each request, sends the GET instead)."""
_DIRECTORY_SESSION_S = 120
"""Seconds: the longest a URL for an S3 Express directory bucket lives. Its session
credentials (CreateSession) last 5 minutes and their expiry is not visible to us."""
_RESIGNS = 2
"""Times one request is signed again after the store refused its signature as expired."""
_FAST_FALLBACK_LIMIT = 3

_STALE_CREDENTIAL_CODES = frozenset({"ExpiredToken", "TokenRefreshRequired"})
"""S3 codes saying the credentials that signed a request have expired."""
_REGION_CODES = frozenset(
    {
        "AuthorizationHeaderMalformed",
        "AuthorizationQueryParametersError",
        "IllegalLocationConstraintException",
        "PermanentRedirect",
        "TemporaryRedirect",
    }
)
"""S3 codes saying the request went to, or was signed for, another region than the bucket's."""
_FALLBACK_CODES = frozenset({"SignatureDoesNotMatch", "InvalidToken"})
"""Codes that may be the fast path's own doing (a URL that a proxy or the store's host
handling mangled): botocore signs the request itself."""


@dataclass(frozen=True, slots=True)
class _Signed:
    """A presigned URL (None: use botocore), when to stop reusing it, and the access key that
    signed it (None for unsigned requests)."""

    url: Url | None
    reuse_until: float
    access_key: str | None


def _refusal_kind(status: int, code: str, message: str) -> str | None:
    """What an error response to a presigned GET calls for: ``"stale"`` (expired credentials:
    refresh them and sign again), ``"resign"`` (the URL expired: sign again), ``"region"``
    (botocore learns the bucket's region), ``"fallback"`` (botocore signs it itself), or None
    (a real error, raised)."""
    if code in _STALE_CREDENTIAL_CODES:
        return "stale"
    if code == "AccessDenied" and "request has expired" in message.lower():
        return "resign"
    if status in (301, 307) or code in _REGION_CODES:
        return "region"
    if code in _FALLBACK_CODES or (status in (400, 403) and code == str(status)):
        return "fallback"
    return None


def _presign_as_requests(client: Any) -> None:
    """Make ``generate_presigned_url`` sign as the client signs its own requests.

    botocore presigns S3 URLs with Signature Version 2 in the regions that once accepted it
    (``us-east-1``, ``us-west-2``...), points them at the global endpoint ``s3.amazonaws.com``,
    and signs them for the client's region even after its region redirector learnt that the
    bucket lives elsewhere. S3 refuses SigV2 for every bucket created since 2020. These two
    handlers keep the client's own signature version (SigV4, or S3 Express session auth), its
    endpoint, and the bucket's region as botocore resolved it for the request.
    """
    events = client.meta.events
    region = client.meta.region_name

    def keep_signature_version(signature_version: Any, **kwargs: Any) -> Any:
        # The presign of a SigV4 client arrives as "v4-query" (generic SigV4, which would sign
        # an empty payload hash: S3 refuses that) or "s3v4-query": S3's query form signs
        # UNSIGNED-PAYLOAD. S3 Express ("v4-s3express-query") is botocore's as it is.
        if signature_version in ("v4-query", "s3v4-query"):
            return "s3v4-query"
        if isinstance(signature_version, str) and signature_version.startswith("v4-s3express"):
            return signature_version
        return None

    def client_endpoint(context: Any = None, **kwargs: Any) -> None:
        # read when the endpoint is resolved, so set before: at parameter build
        if isinstance(context, dict) and context.get("is_presign_request"):
            context["use_global_endpoint"] = False

    def resolved_region(builtins: Any = None, context: Any = None, **kwargs: Any) -> None:
        # the region redirector has put the bucket's known region into the builtins by now
        if not isinstance(context, dict) or not context.get("is_presign_request"):
            return
        resolved = builtins.get("AWS::Region") if isinstance(builtins, dict) else None
        if resolved and resolved != region and resolved != "aws-global":
            context.setdefault("signing", {})["region"] = resolved

    events.register_first("choose-signer.s3", keep_signature_version)
    events.register_last("before-parameter-build.s3", client_endpoint)
    events.register_last("before-endpoint-resolution.s3", resolved_region)


def _signer_credentials(client: Any) -> Any:
    """The credentials object the client signs with (refreshable or not), or None."""
    return getattr(getattr(client, "_request_signer", None), "_credentials", None)


async def _current_access_key(credentials: Any) -> str | None:
    if credentials is None:
        return None
    frozen = credentials.get_frozen_credentials()
    if asyncio.iscoroutine(frozen):
        frozen = await frozen
    return getattr(frozen, "access_key", None)


def _seconds_left(credentials: Any) -> float | None:
    """Seconds until temporary credentials expire (None: they do not, or we cannot tell)."""
    expiry = getattr(credentials, "_expiry_time", None)
    if not isinstance(expiry, datetime.datetime):
        return None
    now = datetime.datetime.now(expiry.tzinfo or datetime.UTC)
    return (expiry - now).total_seconds()


def _is_directory_bucket(bucket: str) -> bool:
    """S3 Express One Zone directory buckets are named ``name--zone-id--x-s3``."""
    return bucket.endswith("--x-s3")


_LOADER_LOCK = threading.Lock()
_LOADER: tuple[int, Any] | None = None  # (pid, botocore Loader with S3's data parsed)
_S3_MODELS = ("service-2", "endpoint-rule-set-1")
_DATA = ("endpoints", "partitions", "_retry", "sdk-default-configuration")


class _PlainJSONFileLoader(botocore.loaders.JSONFileLoader):  # type: ignore[misc]
    """botocore's JSON file loader, parsing into plain dicts instead of ``OrderedDict``s.

    Dicts keep insertion order, which is all botocore relies on. A plain dict whose values are
    all strings or numbers is not tracked by the garbage collector, an ``OrderedDict`` always
    is: what an S3 client needs parses in ~36 ms of CPU instead of ~46 ms and leaves 21,000
    tracked objects instead of 32,000. (Beside torch's ~250,000, every ~50,000 new ones cost
    a full collection of 0.12-0.2 s; the S3 stack still makes ~45,000.)
    """

    def _load_file(self, full_path: str, open_method: Any) -> Any:
        if not os.path.isfile(full_path):
            return None
        with open_method(full_path, "rb") as fp:
            payload = fp.read().decode("utf-8")
        return json.loads(payload)


def _load_loader() -> Any:
    """A botocore Loader with everything an S3 client needs already parsed (blocking)."""
    global _LOADER
    with _LOADER_LOCK:
        if _LOADER is not None and _LOADER[0] == os.getpid():
            return _LOADER[1]
        loader = botocore.loaders.Loader(file_loader=_PlainJSONFileLoader())
        for name in _S3_MODELS:
            with contextlib.suppress(botocore.exceptions.DataNotFoundError):
                loader.load_service_model("s3", name)
        for name in _DATA:
            with contextlib.suppress(botocore.exceptions.DataNotFoundError):
                loader.load_data(name)
        _LOADER = (os.getpid(), loader)
        return loader


# Parsed when this module is imported (in the thread that first touches a name that needs the
# S3 stack: ``S3StorageReader``, ``load_checkpoint``...), not when a store creates its client on
# its event loop: json's C parser holds the GIL throughout, and on the I/O thread it would stall
# every other thread mid-load, including the loop of an ``await load_checkpoint`` caller (a 1 ms
# heartbeat measured a 244 ms gap on CI when the parse ran there).
_load_loader()


_SSL_LOCK = threading.Lock()
_SSL_CONTEXTS: dict[tuple[Any, ...], tuple[int, tuple[Any, ...], Any]] = {}
"""(who, settings) -> (pid, the files' stat, the contexts built): one build per process."""


def _file_stamp(path: Any) -> tuple[Any, ...]:
    if not isinstance(path, str):
        return (path,)
    try:
        st = os.stat(path)
    except OSError:
        return (path, None)
    return (path, st.st_mtime_ns, st.st_size)


def _shared_ssl_context(key: tuple[Any, ...], build: Callable[[], T], *files: Any) -> T:
    """The SSL context(s) ``build()`` makes for ``key``, built once per process and shared by
    every client and connection pool that asks with the same settings. Building one loads a CA
    bundle (~20-35 ms of CPU each time), and each load opens a client of its own. The files it
    reads (CA bundle, client certificate) are stat'ed at each use: a file replaced on disk
    gets a new context, as a new client would."""
    stamp = tuple(_file_stamp(f) for f in files)
    pid = os.getpid()
    with _SSL_LOCK:
        cached = _SSL_CONTEXTS.get(key)
        if cached is not None and cached[0] == pid and cached[1] == stamp:
            return cached[2]  # type: ignore[no-any-return]
    built = build()  # file I/O: aiobotocore runs this in a thread, the fast path on its loop
    with _SSL_LOCK:
        _SSL_CONTEXTS[key] = (pid, stamp, built)
    return built


def _fast_ssl_context(verify: bool | str) -> ssl.SSLContext:
    """The fast path's context: botocore's ``verify`` setting (False, True or a CA bundle)."""
    if verify is False:
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        return context
    return ssl.create_default_context(cafile=get_cert_path(verify))


def _shared_ssl_session_class() -> Any:
    """aiobotocore's aiohttp session, with the SSL contexts of its connection pool built once
    per process (``_shared_ssl_context``) instead of at each client's first request (aiobotocore
    builds them even for ``http://`` endpoints); a proxy still gets contexts of its own. None
    when this aiobotocore builds them elsewhere (older versions: in the session's constructor).
    """
    build = getattr(AIOHTTPSession, "_build_ssl_contexts", None)
    if build is None:
        return None

    class SharedSSLSession(AIOHTTPSession):  # type: ignore[misc]
        def _build_ssl_contexts(self, proxy_url: Any, *args: Any, **kwargs: Any) -> Any:
            if proxy_url is not None or args or kwargs:
                return super()._build_ssl_contexts(proxy_url, *args, **kwargs)
            key = ("aiobotocore", self._verify, self._cert_file, self._key_file)
            files = (
                get_cert_path(self._verify) if self._verify else None,
                self._cert_file,
                self._key_file,
            )
            return _shared_ssl_context(
                key, lambda: super(SharedSSLSession, self)._build_ssl_contexts(None), *files
            )

    return SharedSSLSession


_SharedSSLSession = _shared_ssl_session_class()


def _ended_early(bucket: str, key: str, start: int, end: int, pos: int) -> TransferError:
    return TransferError(
        f"{_where(bucket, key, (start, end))}: the body ended at byte {pos}, before the end of "
        "its range",
        bucket=bucket,
        key=key,
        byte_range=(start, end),
        retryable=True,
    )


def _served_span(response: dict[str, Any], start: int, end: int) -> tuple[int, int]:
    """``[first, end)`` of the bytes the store will send, from Content-Range or the status.

    A 206 names its range in Content-Range. A 200 without one is the whole object from byte 0:
    a store that ignored the Range header (fine only when ``start`` is 0).
    """
    content_range = response.get("ContentRange")
    if content_range:
        match = _CONTENT_RANGE_RE.match(content_range.strip())
        if match:
            return int(match.group(1)), int(match.group(2)) + 1
    length = response.get("ContentLength")
    status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    first = 0 if status == 200 else start
    if isinstance(length, int):
        return first, first + length
    return first, end
