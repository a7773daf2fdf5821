"""The object store: S3 through our own HTTP path in the plain case, else through aiobotocore.

Data flow: ``S3Store`` (one per event loop: its connections and any aiobotocore client belong
to the loop they were made on) -> ``open()`` resolves the store: in the plain case
(``_native.plain_case``, in a worker thread: endpoint, region and credentials that botocore
would resolve the same way, from the configuration, the environment and the AWS files) the
credentials are fetched if they come from a source (``_credentials``: STS, the container or
instance metadata endpoint, a process; a fetch that fails leaves the plain case) and kept
current by a ``Refresher``; otherwise the aiobotocore client is created (``_botostore``,
which alone imports botocore, aiobotocore and aiohttp). -> ``get_whole(bucket, key,
checksum=)`` (``get_object``) for small objects such as ``.metadata``, and ``object_size`` ->
``fetch_range(bucket, key, start, end, sink)`` for the data GETs, or ``open_range(bucket, key,
start, end, if_match)`` through botocore, returning a ``_botostore.RangeStream`` whose
``read_chunk()`` hands out the body as the network delivered it (one ``bytes`` per socket
read, never joined).

The botocore client is created lazily, once (``botocore_client``: concurrent callers share
the creation; ``_botostore`` is imported in a worker thread), the first time something needs it:
a configuration that is not plain, ``fast_http=False``, a bucket that is not plain, a response
the fast path does not handle, a region refusal, ``_FAST_FALLBACK_LIMIT``. A plain load never
creates it, so never imports botocore, aiobotocore or aiohttp.

Requests take the fast path when they can: the object's URL is presigned (``_fast_url``, reused
for half the life it has left) and the request handed to ``_http.RangeClient``, which writes
the body straight into the engine's sink (``fetch_range``) or into a buffer (``get_whole``:
one GET without a Range, whose body is received into buffers allocated as it arrives, and
which, asked with a signed ``x-amz-checksum-mode: ENABLED``, S3 answers with the object's
full-object checksum; ``object_size``: a GET of the first byte, whose ``Content-Range`` gives
the size). In the plain case URLs are signed here (``_native_url``: ``_sigv4``, stdlib only,
with the current credentials, ``current_plain``); otherwise as the client signs its own
requests (``_botocore_url``, ``_botostore.presign_as_requests``: SigV4 query form, the client's
endpoint, the bucket's region as botocore resolved it), never outliving the credentials that
signed them (``PresignTiming``).
Outside the plain case only data GETs take the fast path, as before. Proxies and client
certificates (seen in botocore's resolved HTTP settings), ``fast_http=False``, and any response
that is not the plain case go through botocore instead. An error response is sorted by
``_refusal_kind``: an expired signature is signed again (credentials refreshed once per refused
key; static ones cannot be, so their refusal is raised) and resent without counting as an
attempt; a region refusal goes through botocore, which follows S3's redirect and remembers the
region (a plain store then lets botocore sign every later URL); a possibly mangled URL goes
through botocore too, and after ``_FAST_FALLBACK_LIMIT`` of those a store stays on botocore;
anything else is classified as a botocore error response would be (``classify``). ``limiter``
(``_throttle.AdaptiveRate``) is the store's request rate, which the engine lowers on SlowDown.

Data GETs are conditional: ``If-Match`` once the object's ETag is known, else
``If-Unmodified-Since`` with the time the checkpoint's ``.metadata`` was served
(``load_started``), so no load mixes two versions of a checkpoint.

A save's requests (``send_write``, one attempt of a ``WriteRequest``: PUT of an object or a
part, CreateMultipartUpload, CompleteMultipartUpload, AbortMultipartUpload, DeleteObject,
HEAD) take the same two paths with the same connections, signing and credentials: through
``_http.RangeClient.send`` with a URL signed for that method, its parameters and the headers
S3 must see signed (``x-amz-checksum-*``, ``If-None-Match``, ``If-Match``): natively in the
plain case (``Plain.request_url``), else presigned by botocore; or, where the fast path does
not apply (proxies, client certificates, ``fast_http=False``, a reply it does not handle), as a
botocore call (the body's views joined into one buffer there). Their refusals are sorted by
``classify_write`` (412/409: ``ConditionalWriteError``; ``BadDigest``, a body that arrived
different from what was sent: retried). ``get_object_etag`` reads a small object and the ETag
it had (the ``.metadata`` a save replaces).

Every exception is translated at one boundary into the most specific ``aiodcp`` error
(``translate_error``), with bucket and key in the message, marked ``retryable`` when a new
request can fix it (``is_retryable``); botocore's and aiohttp's exception types are asked about
(``_botostore.translate``) only once ``_botostore`` was imported. An error response, botocore's
``ClientError`` or the fast path's ``HttpError``, is classified from its facts alone (HTTP
status, S3 code, message) by ``classify``, which holds every rule for error responses.

Retries are ours, not botocore's (its retries are switched off): botocore can only retry up to
the response headers, while a body that breaks mid-stream must be resumed from the last byte
received, and one attempt budget has to cover both. So every request, whatever fails (connect,
headers, body), is sent at most ``max_attempts`` times, with exponential backoff and full jitter
between attempts (``retry_delay``), and each attempt is counted in ``LoadStats``. A request that
still fails raises a ``TransferError`` carrying ``attempts`` (``exhausted``); errors that no
retry can fix (403, 404, 412, a truncated object) are raised at once. ``open_range`` makes one
attempt and leaves the retrying to its caller (the engine resumes where the body stopped);
``get_whole``, ``object_size`` and ``read_range`` retry themselves.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import email.utils
import importlib
import logging
import os
import posixpath
import random
import re
import ssl
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from types import TracebackType
from typing import TYPE_CHECKING, Any, NamedTuple, TypeVar
from urllib.parse import urlsplit

from ._checksum import ALGORITHM as _CRC_ALGORITHM
from ._checksum import HEADER as _CRC_HEADER
from ._checksum import full_object_checksum as _full_object_checksum
from ._checksum import to_header as _crc_to_header
from ._config import ReaderConfig
from ._credentials import FetchContext, FetchError, Refresher
from ._errors import (
    AccessDeniedError,
    AiodcpError,
    ConditionalWriteError,
    NoCredentialsError,
    NoSuchBucketError,
    NotFoundError,
    ObjectChangedError,
    StorageError,
    TransferError,
    TruncatedObjectError,
)
from ._http import FallbackRequired, HttpError, RangeClient, RangeSink, Url, feed
from ._native import Plain, ca_file, plain_case
from ._throttle import AdaptiveRate

if TYPE_CHECKING:
    from ._botostore import RangeStream
    from ._stats import StatsRecorder

__all__ = [
    "CHECKSUM_MODE",
    "PRESIGN_TIMING",
    "PresignTiming",
    "RangeSink",
    "S3Store",
    "WholeRead",
    "WriteReply",
    "WriteRequest",
    "classify_write",
    "exhausted",
    "is_retryable",
    "is_throttling",
    "retry_delay",
    "translate_error",
    "translate_write_error",
]

T = TypeVar("T")

logger = logging.getLogger(__name__)

RETRY_BACKOFF_BASE_S = 0.25
"""Seconds: the first retry waits up to this long, each later one up to twice as long."""
RETRY_BACKOFF_CAP_S = 20.0
"""Seconds: no retry waits longer than this (botocore's own cap)."""

_CONTENT_RANGE_RE = re.compile(r"^bytes (\d+)-(\d+)/(\d+|\*)$")

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
    """Map an exception (the fast path's ``HttpError`` or connection errors, botocore's and
    aiohttp's) to the most specific aiodcp error (``raise ... from``)."""
    if isinstance(exc, AiodcpError):
        return exc
    where = _where(bucket, key, byte_range)
    ctx: dict[str, Any] = {"bucket": bucket, "key": key, "byte_range": byte_range}
    boto = sys.modules.get("aiodcp._botostore")  # botocore's types: only once imported
    if boto is not None:
        translated: AiodcpError | None = boto.translate(exc, where, ctx)
        if translated is not None:
            return translated
    if isinstance(exc, HttpError):
        return classify(exc.status, exc.code, exc.message, where, ctx)
    transient = isinstance(exc, (asyncio.TimeoutError, ConnectionError))
    if boto is not None:
        transient = (transient or boto.is_transient(exc)) and not boto.is_ssl_error(exc)
    if transient:
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


def longest_retry_delay(max_attempts: int) -> float:
    """The longest wait between two attempts of a request of at most ``max_attempts``."""
    if max_attempts < 2:
        return 0.0
    return float(min(RETRY_BACKOFF_CAP_S, RETRY_BACKOFF_BASE_S * 2 ** min(max_attempts - 2, 30)))


def quiet_limit_s(config: ReaderConfig) -> float:
    """Seconds a wait for the store's work may see no progress at all (no byte received, no
    request sent or retried; or, for a wait on the I/O loop, the loop not running) before it
    gives up with an error naming what it waited for.

    A download that works is never that quiet: a request silent for its timeout fails, and the
    next attempt starts within the longest backoff, and the last attempt's failure ends every
    wait with the store's own error. So only work that stopped for good reaches twice that (an
    I/O loop blocked by an ``on_request`` hook that does not return; a bug): never a hang."""
    timeout = max(config.connect_timeout_s, config.read_timeout_s)
    return 2.0 * (timeout + longest_retry_delay(config.max_attempts))


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


class S3Store:
    """S3 (or S3-compatible) access on the event loop it is opened on."""

    def __init__(
        self, config: ReaderConfig, *, presign_timing: PresignTiming | None = None
    ) -> None:
        self.config = config
        self.timing = PRESIGN_TIMING if presign_timing is None else presign_timing
        """How long presigned URLs live and are reused (``PresignTiming``)."""
        self.not_plain: str | None = None
        """Why this store is not the plain case (``_native.plain_case``), once opened; None
        when it is (or is not opened yet)."""
        self._open = False
        self._plain: Plain | None = None  # None: botocore resolves and signs everything
        self._refresher: Refresher | None = None  # the plain case's credentials, refreshed
        self._stack: contextlib.AsyncExitStack | None = None
        self._client: Any = None
        self._client_lock: asyncio.Lock | None = None
        self._fast: RangeClient | None = None
        self._proxy_config: Any = None
        self._urls: dict[tuple[str, str], _Signed] = {}
        self._fast_fallbacks = 0
        self._retired: list[RangeClient] = []
        """Fast clients this store stopped using (``_fell_back``): closed with the store, as
        requests under way may still hold their connections."""
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
        """Resolve the store: the plain case needs nothing more (no botocore); otherwise the
        botocore client is created now, so a bad profile fails here."""
        if self._open:
            return
        self._open = True
        try:
            # files are read (config, credentials, tokens): off the loop
            plain = await asyncio.to_thread(plain_case, self.config)
            if isinstance(plain, Plain):
                plain = await self._first_credentials(plain)
        except BaseException:
            self._open = False
            raise
        if isinstance(plain, Plain):
            self._plain = plain
            self._fast = self._range_client(plain.verify)
            return
        self.not_plain = plain
        logger.debug("not the plain case (%s): botocore resolves and signs requests", plain)
        try:
            await self.botocore_client()
        except BaseException:
            self._open = False
            raise

    @property
    def is_aws(self) -> bool:
        """The opened store is AWS S3 itself (its endpoint's host is ``*.amazonaws.com``),
        which gives every object written since December 2024 a full-object CRC64NVME; False
        for any other endpoint, or before the store knows its endpoint."""
        if self._plain is not None:
            host = self._plain.host
        elif self._client is not None:
            host = urlsplit(self._client.meta.endpoint_url).hostname or ""
        else:
            return False
        return host.endswith(".amazonaws.com")

    async def botocore_client(self) -> Any:
        """The store's aiobotocore client, created the first time something needs it (once:
        concurrent callers wait for the same creation). ``_botostore``, which imports botocore,
        aiobotocore and aiohttp and parses S3's models, is imported in a worker thread, not
        on this loop."""
        if self._client is not None:
            return self._client
        self._check_open()
        if self._client_lock is None:
            self._client_lock = asyncio.Lock()
        async with self._client_lock:
            if self._client is not None:
                return self._client
            boto = sys.modules.get("aiodcp._botostore")
            if boto is None:
                boto = await asyncio.to_thread(importlib.import_module, "aiodcp._botostore")
            stack = contextlib.AsyncExitStack()
            try:
                client = await boto.create_client(self.config, stack)
                self._check_open()  # closed while the client was being made
            except BaseException:
                await stack.aclose()
                raise
            self._stack = stack
            settings = boto.fast_http_settings(client, self.config)
            if settings is not None:
                self._proxy_config, verify = settings
                boto.presign_as_requests(client)
                if self._plain is None and self._fast is None and not self._fast_fallbacks:
                    self._fast = self._range_client(verify)
            self._client = client
            return client

    async def _first_credentials(self, plain: Plain) -> Plain | str:
        """The plain case's credentials, fetched now if they come from a source (STS, the
        container or instance metadata endpoint, a process), with their refresher; or why the
        store is not plain after all: a fetch that failed here is left to botocore, which
        resolves the same chain again and raises its own error if it fails too."""
        source = plain.source
        context = self._fetch_context()
        if source is None:
            if plain.credentials is not None:
                self._refresher = Refresher(None, plain.credentials, context)
            return plain
        try:
            credentials = await source.fetch(context)
        except FetchError as exc:
            logger.debug("credentials from %s failed natively: %s", source.method, exc)
            return f"credentials from {source.method} could not be fetched natively ({exc})"
        timing = self.timing
        self._refresher = Refresher(
            source,
            credentials,
            context,
            advisory_s=timing.advisory_refresh_s,
            mandatory_s=timing.mandatory_refresh_s,
        )
        return plain.with_credentials(credentials)

    def _fetch_context(self) -> FetchContext:
        from ._version import __version__

        return FetchContext(
            ssl_context=self._ssl_context,
            user_agent=f"aiodcp/{__version__}",
            connect_timeout_s=self.config.connect_timeout_s,
            read_timeout_s=self.config.read_timeout_s,
        )

    @staticmethod
    def _ssl_context(verify: bool | str) -> ssl.SSLContext:
        return _shared_ssl_context(
            ("fast", verify), lambda: _fast_ssl_context(verify), ca_file(verify)
        )

    async def current_plain(self) -> Plain | None:
        """The plain case signing with current credentials (refreshed as botocore refreshes
        them: in the background from ``timing.advisory_refresh_s`` before they expire, waited
        for from ``timing.mandatory_refresh_s``); None when botocore signs this store's
        requests. Every natively signed request signs with what this returns."""
        return await self._current_plain(force=False)

    async def _current_plain(self, *, force: bool, bucket: str = "", key: str = "") -> Plain | None:
        refresher, plain = self._refresher, self._plain
        if refresher is None or plain is None or refresher.source is None:
            return plain
        try:
            credentials = await (refresher.refresh() if force else refresher.get())
        except FetchError as exc:
            left = refresher.seconds_left()
            where = f" to sign s3://{bucket}/{key} with" if bucket else ""
            raise NoCredentialsError(
                f"the credentials{where} from {refresher.source.method} expire in "
                f"{0 if left is None else left:.0f} s and refreshing them failed: {exc}; check "
                "the credential source (role, token file, endpoint) and load again",
                bucket=bucket,
                key=key,
                retryable=False,
            ) from exc
        plain = self._plain
        if plain is not None and plain.credentials is not credentials:
            plain = self._plain = plain.with_credentials(credentials)
        return plain

    def _range_client(self, verify: bool | str) -> RangeClient:
        def ssl_context() -> ssl.SSLContext:
            return self._ssl_context(verify)

        from ._version import __version__

        return RangeClient(
            ssl_context=ssl_context,
            max_idle=self.config.max_concurrency,
            connect_timeout=self.config.connect_timeout_s,
            read_timeout=self.config.read_timeout_s,
            user_agent=f"aiodcp/{__version__}",
        )

    async def close(self) -> None:
        self._open = False
        stack, self._stack, self._client = self._stack, None, None
        fast, self._fast = self._fast, None
        refresher, self._refresher = self._refresher, None
        if refresher is not None:
            refresher.close()
        self._urls.clear()
        for refresh in self._refreshing.values():
            refresh.cancel()
        self._refreshing.clear()
        if fast is not None:
            fast.close()
        retired, self._retired = self._retired, []
        for client in retired:
            client.close()
        if stack is not None:
            await stack.aclose()

    def _check_open(self) -> None:
        if not self._open:
            raise StorageError(
                "the S3 store is closed (the reader or load that owned it ended); open a new "
                "reader or start a new load",
                bucket="",
                key="",
            )

    @property
    def client(self) -> Any:
        """The botocore client once created (``botocore_client`` creates it)."""
        self._check_open()
        if self._client is None:
            raise StorageError(
                "this store has no botocore client yet (the plain case needs none); "
                "await botocore_client() to create it",
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
        """The whole object's bytes (``get_whole`` without its checksum)."""
        return (await self.get_whole(bucket, key, stats=stats)).data

    async def get_whole(
        self,
        bucket: str,
        key: str,
        *,
        stats: StatsRecorder | None = None,
        checksum: bool = False,
    ) -> WholeRead:
        """The whole object (for small objects such as ``.metadata``) from one GET without a
        Range, retried as a whole; with ``checksum``, the GET asks for the object's checksum
        (``x-amz-checksum-mode: ENABLED``, signed) and ``WholeRead`` carries what the store
        answered (``_verify.read_verified`` checks the bytes against it).

        In the plain case through the fast path (``RangeClient.fetch_whole``: the body is
        received into buffers allocated as it arrives, never past its ``Content-Length``);
        otherwise, or if the response is not the plain case, botocore's GET (whose own check
        of the checksum, when it fails, is a ``WholeRead`` with ``damaged`` set). A
        ``.metadata``'s response ``Date`` is the load's start (``load_started``). With
        ``stats``, each retry adds one request and one retry (the caller counts the first
        request itself).
        """

        def started(date: Any) -> None:
            if key.rsplit("/", 1)[-1] == ".metadata" and isinstance(date, str):
                self._started[(bucket, posixpath.dirname(key))] = date

        async def attempt_once(attempt: int) -> WholeRead:
            fast = await self._get_fast(bucket, key, 0, whole=True, checksum=checksum)
            if fast is not None:
                data, headers, _ = fast
                started(headers.get("date"))
                return WholeRead(data, headers if checksum else {}, headers.get("etag"))
            body = None
            params: dict[str, Any] = {"Bucket": bucket, "Key": key, **self._payer}
            if checksum:
                params["ChecksumMode"] = "ENABLED"
            try:
                client = await self.botocore_client()
                response = await client.get_object(**params)
                body = response["Body"]
                headers = response.get("ResponseMetadata", {}).get("HTTPHeaders", {})
                started(headers.get("date"))
                try:
                    got: bytes = await body.read()
                except Exception as exc:
                    if checksum and _botostore().is_checksum_error(exc):
                        # botocore checked the body against the checksum and it differs
                        return WholeRead(b"", dict(headers), response.get("ETag"), damaged=True)
                    raise
            except Exception as exc:
                raise translate_error(exc, bucket, key) from exc
            finally:
                if body is not None:
                    body.close()
            return WholeRead(got, dict(headers) if checksum else {}, response.get("ETag"))

        def on_retry(attempt: int) -> None:
            if stats is not None:
                stats.add(requests=1, retries=1)

        return await self.retrying(attempt_once, on_retry=on_retry, what=f"s3://{bucket}/{key}")

    async def object_size(self, bucket: str, key: str) -> int:
        """The object's size in bytes: in the plain case from the ``Content-Range`` of a GET of
        its first byte (fast path), otherwise a botocore HEAD."""

        async def attempt_once(attempt: int) -> int:
            fast = await self._get_fast(bucket, key, 1, whole=False)
            if fast is not None:
                return fast[2]
            try:
                client = await self.botocore_client()
                response = await client.head_object(Bucket=bucket, Key=key, **self._payer)
            except Exception as exc:
                raise translate_error(exc, bucket, key) from exc
            return int(response["ContentLength"])

        return await self.retrying(attempt_once, what=f"HEAD s3://{bucket}/{key}")

    async def read_head(
        self, bucket: str, key: str, span: int, *, stats: StatsRecorder | None = None
    ) -> tuple[bytes, int, str | None]:
        """The first ``span`` bytes of an object (all of it when it is shorter), its size and
        its ETag, from one ranged GET (a safetensors file's header length and header at once),
        retried as a whole. An empty object is ``(b"", 0, None)``. With ``stats``, each retry
        adds one request and one retry (the caller counts the first request itself)."""

        async def attempt_once(attempt: int) -> tuple[bytes, int, str | None]:
            try:
                fast = await self._get_fast(bucket, key, span, whole=False)
            except TruncatedObjectError as exc:
                if getattr(exc, "status", None) == 416:
                    return b"", 0, None  # an empty object has no first byte to range over
                raise
            if fast is not None:
                data, headers, size = fast
                return data, size, headers.get("etag")
            body = None
            try:
                client = await self.botocore_client()
                response = await client.get_object(
                    Bucket=bucket, Key=key, Range=f"bytes=0-{span - 1}", **self._payer
                )
                body = response["Body"]
                data = await body.read()
            except Exception as exc:
                error = translate_error(exc, bucket, key)
                if isinstance(error, TruncatedObjectError) and getattr(error, "status", 0) == 416:
                    return b"", 0, None
                raise error from exc
            finally:
                if body is not None:
                    body.close()
            match = _CONTENT_RANGE_RE.match(str(response.get("ContentRange") or ""))
            if match is not None and match.group(3) != "*":
                size = int(match.group(3))
            else:
                size = int(response.get("ContentLength", len(data)))
            return data[:span], size, response.get("ETag")

        def on_retry(attempt: int) -> None:
            if stats is not None:
                stats.add(requests=1, retries=1)

        return await self.retrying(
            attempt_once, on_retry=on_retry, what=f"s3://{bucket}/{key} bytes [0, {span})"
        )

    async def list_keys(self, bucket: str, prefix: str) -> list[str]:
        """The keys directly under ``prefix`` (a "folder" ending in ``/``, or "" for the
        bucket's top level; no deeper), listed with ListObjectsV2 through botocore (created on
        first need, imported in a worker thread), every page, each request retried."""
        keys: list[str] = []
        token: str | None = None
        while True:
            params: dict[str, Any] = {
                "Bucket": bucket,
                "Prefix": prefix,
                "Delimiter": "/",
                **self._payer,
            }
            if token is not None:
                params["ContinuationToken"] = token

            async def attempt_once(attempt: int, params: dict[str, Any] = params) -> Any:
                try:
                    client = await self.botocore_client()
                    return await client.list_objects_v2(**params)
                except Exception as exc:
                    raise translate_error(exc, bucket, prefix) from exc

            page = await self.retrying(attempt_once, what=f"list s3://{bucket}/{prefix}")
            keys.extend(str(entry["Key"]) for entry in page.get("Contents", ()))
            token = page.get("NextContinuationToken")
            if not page.get("IsTruncated") or token is None:
                return keys

    async def _get_fast(
        self, bucket: str, key: str, span: int, *, whole: bool, checksum: bool = False
    ) -> tuple[bytes, dict[str, str], int] | None:
        """(the first ``span`` bytes, or with ``whole`` the whole object from a GET without a
        Range, asking for its checksum with ``checksum``; the response's headers; the object's
        size) through the fast path with a natively signed URL; None: send it through botocore
        instead (not the plain case, a response that is not the plain case, an empty object's
        416, a refusal botocore can tell more about). A refusal of expired credentials or URL
        is signed again (credentials refreshed if they can be), ``_RESIGNS`` times at most, as
        data GETs are (``_fetch_fast``)."""
        for _ in range(_RESIGNS + 1):
            fast = self._fast
            if checksum:
                signed = await self._native_request_url(
                    "GET", bucket, key, {CHECKSUM_MODE: "ENABLED"}
                )
            else:
                signed = await self._native_url(bucket, key)
            if fast is None or signed is None or signed.url is None:
                return None
            try:
                if whole:
                    sink = _BufferSink(0, 0)
                    headers = await fast.fetch_whole(signed.url, sink)
                    data = sink.data()
                    return data, headers, len(data)
                first = _BufferSink(0, span)
                headers = await fast.fetch(signed.url, 0, span, None, first, accept_shorter=True)
                size = _object_size(headers)
                if size is None:
                    raise FallbackRequired("no object size in the response")
                return first.data(), headers, size
            except HttpError as exc:
                kind = _refusal_kind(exc.status, exc.code, exc.message)
                if kind is None and exc.status != 416:
                    raise translate_error(exc, bucket, key) from exc
                if kind in ("stale", "resign"):
                    self._urls.pop((bucket, key), None)
                    if kind == "stale" and not await self._refresh_credentials(
                        signed.access_key, native=True
                    ):
                        # nothing newer (static credentials): signing again cannot help
                        raise translate_error(exc, bucket, key) from exc
                    continue
                self._fell_back(bucket, key, kind)
            except FallbackRequired:
                self._fell_back(bucket, key, "fallback")
            except AiodcpError:
                raise
            except Exception as exc:
                raise translate_error(exc, bucket, key) from exc
            return None
        return None

    def _fell_back(self, bucket: str, key: str, kind: str | None, *, native: bool = True) -> None:
        """A fast-path request goes through botocore instead: its URL is forgotten; ``kind``
        (``_refusal_kind``) "region" on a natively signed URL: botocore signs this store's URLs
        from now on (``_leave_native``); "fallback" (or ``FallbackRequired``): counted, and after
        ``_FAST_FALLBACK_LIMIT`` of those the store stays on botocore."""
        self._urls.pop((bucket, key), None)
        if kind == "region" and native:
            self._leave_native()
        elif kind == "fallback":
            self._fast_fallbacks += 1
        if self._fast_fallbacks >= _FAST_FALLBACK_LIMIT:
            if self._fast is not None:  # keeps answering oddly: botocore from now on
                self._retired.append(self._fast)
            self._fast = None

    def _leave_native(self) -> None:
        """A region refusal: botocore follows S3's redirect and remembers the bucket's region;
        from now on it signs this store's URLs (``_botostore.presign_as_requests`` signs them
        for the region it learnt). Natively signed URLs still cached are dropped."""
        self._plain = None
        self._urls = {k: v for k, v in self._urls.items() if not v.native}

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
                if kind in ("stale", "resign"):
                    self._urls.pop((bucket, key), None)
                    if stats is not None:
                        stats.add(resigned=1)
                    if kind == "stale" and not await self._refresh_credentials(
                        signed.access_key, native=signed.native
                    ):
                        # the provider has nothing newer: signing again cannot help
                        raise translate_error(exc, bucket, key, (start, end)) from exc
                    continue
                self._fell_back(bucket, key, kind, native=signed.native)
            except FallbackRequired:
                self._fell_back(bucket, key, "fallback")
            except AiodcpError:
                raise
            except Exception as exc:
                raise translate_error(exc, bucket, key, (start, end)) from exc
            break
        return False

    async def _fast_url(self, bucket: str, key: str) -> _Signed:
        """The presigned URL of an object for the fast path (cached), ``url`` None to use
        botocore: signed natively in the plain case (``_native_url``), else by botocore
        (``_botocore_url``)."""
        cached = self._urls.get((bucket, key))
        if cached is not None and cached.reuse_until > time.monotonic():
            return cached
        native = await self._native_url(bucket, key)
        if native is not None:
            return native
        return await self._botocore_url(bucket, key)

    async def _native_url(self, bucket: str, key: str) -> _Signed | None:
        """The object's URL signed without botocore (cached), or None when the store or the
        bucket is not plain. A URL lives ``timing.expires_s``, and never past ``timing.
        credential_margin_s`` before the temporary credentials that signed it expire; it is
        reused for half of its life at most."""
        if self._plain is None:
            return None
        now = time.monotonic()
        cached = self._urls.get((bucket, key))
        if cached is not None and cached.native and cached.reuse_until > now:
            return cached
        plain = await self._current_plain(force=False, bucket=bucket, key=key)
        timing = self.timing
        lifetime = self._lifetime()
        if lifetime is not None and lifetime < timing.min_presign_s:
            # about to expire and not refreshed yet (a refresh that failed, or a source that
            # gives short-lived credentials): refresh now, whatever the windows say
            plain = await self._current_plain(force=True, bucket=bucket, key=key)
            lifetime = self._lifetime()
            if lifetime is not None and lifetime < timing.min_presign_s:
                left = self._refresher.seconds_left() if self._refresher is not None else None
                lifetime = int(left or 0) - 1  # no longer than the credentials
                if lifetime < 1:
                    raise NoCredentialsError(
                        f"the credentials to sign s3://{bucket}/{key} with have expired and "
                        "their source gave no newer ones; check the credential source",
                        bucket=bucket,
                        key=key,
                        retryable=False,
                    )
        if plain is None:
            return None
        lifetime = timing.expires_s if lifetime is None else min(timing.expires_s, lifetime)
        text = plain.url(
            bucket,
            key,
            now=datetime.datetime.now(datetime.UTC),
            expires=lifetime,
            payer=self.config.request_payer,
        )
        if text is None:
            return None
        url = self._with_payer(Url.parse(text))
        access_key = plain.credentials.access_key if plain.credentials is not None else None
        signed = _Signed(url, now + min(timing.reuse_s, lifetime / 2), access_key, native=True)
        self._urls[(bucket, key)] = signed
        return signed

    def _lifetime(self) -> int | None:
        """Seconds a URL signed now may live: until ``credential_margin_s`` before the current
        credentials expire (None: they do not)."""
        left = self._refresher.seconds_left() if self._refresher is not None else None
        if left is None:
            return None
        return int(min(self.timing.expires_s, left - self.timing.credential_margin_s))

    def _with_payer(self, url: Url, headers: dict[str, str] | None = None) -> Url:
        """``url`` with the header lines its signature covers: ``x-amz-request-payer`` (the
        store's setting) and ``headers`` (e.g. ``x-amz-checksum-mode``), which must be sent."""
        lines = tuple(f"{name}: {value}" for name, value in (headers or {}).items())
        if self.config.request_payer is not None:
            lines = (f"x-amz-request-payer: {self.config.request_payer}", *lines)
        return url._replace(headers=lines) if lines else url

    async def _botocore_url(self, bucket: str, key: str) -> _Signed:
        """The URL as botocore presigns it: the way the client signs its own requests (SigV4,
        the client's endpoint, the bucket's region once botocore learnt it, see
        ``_botostore.presign_as_requests``); it lives at most as long as the credentials that
        signed it, and is reused for at most half of the life it has left."""
        client = await self.botocore_client()
        boto = _botostore()
        timing = self.timing
        now = time.monotonic()
        if self._proxy_config is None:  # the client's HTTP settings keep it on botocore
            signed = _Signed(None, now + timing.reuse_s, None)
            self._urls[(bucket, key)] = signed
            return signed
        params: dict[str, Any] = {"Bucket": bucket, "Key": key, **self._payer}
        credentials = boto.signer_credentials(client)
        try:
            access_key = await boto.current_access_key(credentials)
            lifetime = timing.expires_s
            credentials_left = boto.seconds_left(credentials)
            if credentials_left is not None:
                lifetime = int(min(lifetime, credentials_left - timing.credential_margin_s))
            if _is_directory_bucket(bucket):
                lifetime = min(lifetime, timing.directory_session_s)
            if lifetime < timing.min_presign_s:
                # Credentials about to expire: botocore refreshes them on its own requests.
                signed = _Signed(None, now + timing.min_presign_s / 2, access_key)
                self._urls[(bucket, key)] = signed
                return signed
            text = await client.generate_presigned_url(
                "get_object", Params=params, ExpiresIn=lifetime
            )
        except Exception as exc:
            if boto.is_no_credentials(exc):
                raise translate_error(exc, bucket, key) from exc
            # Whatever botocore cannot presign (an S3 Express session it could not create, a
            # credential source that failed) it may still send: its request raises the real
            # error, if there is one.
            logger.debug("presigning s3://%s/%s failed (%r): botocore sends it", bucket, key, exc)
            signed = _Signed(None, now + timing.min_presign_s, None)
            self._urls[(bucket, key)] = signed
            return signed
        url: Url | None = self._with_payer(Url.parse(text))
        if self._proxy_config.proxy_url_for(text):
            url = None  # botocore knows how to go through the proxy
        signed = _Signed(url, now + min(timing.reuse_s, lifetime / 2), access_key)
        self._urls[(bucket, key)] = signed
        return signed

    async def _refresh_credentials(self, refused_key: str | None, *, native: bool) -> bool:
        """The store refused ``refused_key`` as expired: have the credential provider fetch
        new credentials, once per refused key (``native``: the plain case's refresher, else
        the botocore client's). A burst of refusals (32 GETs in flight) shares one refresh,
        and every request waits for it before it is signed again. Returns whether the store
        now signs with other credentials (static keys cannot refresh)."""
        if native:
            refresher = self._refresher
            if refresher is None or self._plain is None:
                return False
            changed = await refresher.refused(refused_key)
            if changed:
                await self._current_plain(force=False)
            return changed
        if refused_key is None or self._client is None:
            return False  # unsigned, or static
        refresh = self._refreshing.get(refused_key)
        if refresh is None:
            refresh = asyncio.ensure_future(self._refresh(refused_key))
            self._refreshing[refused_key] = refresh
        await asyncio.shield(refresh)
        boto = _botostore()
        current = await boto.current_access_key(boto.signer_credentials(self._client))
        return current is not None and current != refused_key

    async def _refresh(self, refused_key: str) -> None:
        boto = _botostore()
        credentials = boto.signer_credentials(self._client)
        refresh = getattr(credentials, "_protected_refresh", None)
        lock = getattr(credentials, "_refresh_lock", None)
        if refresh is None or lock is None:
            return
        try:
            async with lock:
                if await boto.current_access_key(credentials) == refused_key:
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
        """Start a GET of bytes ``[start, end)`` through botocore (creating its client if
        needed); checks the store served that whole range."""
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
            client = await self.botocore_client()
            response = await client.get_object(**kwargs)
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
        stream: RangeStream = _botostore().RangeStream(
            body, bucket=bucket, key=key, start=start, end=end, etag=etag
        )
        return stream

    # ------------------------------------------------------------------ a save's requests

    async def send_write(
        self, request: WriteRequest, body: Sequence[memoryview] = ()
    ) -> WriteReply:
        """One attempt of a save's request (``body``: the object's or part's bytes, written
        from these views as they are); raises translated errors (``translate_write_error``),
        retryable ones marked. Through the fast path with a URL signed for this request
        (natively in the plain case, else by botocore), or as a botocore call."""
        if self._fast is not None:
            reply = await self._write_fast(request, body)
            if reply is not None:
                return reply
        return await self._write_botocore(request, body)

    async def _write_fast(
        self, request: WriteRequest, body: Sequence[memoryview]
    ) -> WriteReply | None:
        """``send_write`` through ``_http``; None: send it through botocore instead. Refusals
        are handled as for GETs (``_fetch_fast``): an expired signature is signed again (not an
        attempt), a region refusal or a reply the fast path does not handle goes to botocore."""
        method, _, headers, _ = request.shape()
        lines = tuple(f"{name}: {value}" for name, value in headers.items())
        data = body if request.operation != "complete_multipart_upload" else (request.xml(),)
        where = (request.bucket, request.key)
        for _ in range(_RESIGNS + 1):
            fast = self._fast
            if fast is None:
                return None
            signed = await self._write_url(request)
            if signed.url is None:
                return None
            try:
                _, reply_headers, reply_body = await fast.send(signed.url, method, lines, data)
                return _write_reply(request, reply_headers, reply_body)
            except HttpError as exc:
                kind = _refusal_kind(exc.status, exc.code, exc.message)
                if kind is None:
                    raise translate_write_error(exc, *where, part=request.part_number) from exc
                if kind in ("stale", "resign"):
                    if kind == "stale" and not await self._refresh_credentials(
                        signed.access_key, native=signed.native
                    ):
                        raise translate_write_error(exc, *where) from exc
                    continue
                self._fell_back(*where, kind, native=signed.native)
            except FallbackRequired:
                self._fell_back(*where, "fallback")
            except AiodcpError:
                raise
            except Exception as exc:
                raise translate_write_error(exc, *where, part=request.part_number) from exc
            break
        return None

    async def _write_url(self, request: WriteRequest) -> _Signed:
        """The URL of one write request, signed for its method, parameters and headers: natively
        in the plain case, else by botocore (as the client signs its own requests, see
        ``_botocore_url``); ``url`` None: botocore sends it. Never cached: each request has a
        checksum of its own."""
        method, query, headers, params = request.shape()
        native = await self._native_request_url(
            method, request.bucket, request.key, None, query, signed_headers=headers
        )
        if native is not None:
            return native
        now = time.monotonic()
        timing = self.timing
        client = await self.botocore_client()
        if self._proxy_config is None:
            return _Signed(None, now, None)
        boto = _botostore()
        credentials = boto.signer_credentials(client)
        try:
            access_key = await boto.current_access_key(credentials)
            lifetime = timing.expires_s
            credentials_left = boto.seconds_left(credentials)
            if credentials_left is not None:
                lifetime = int(min(lifetime, credentials_left - timing.credential_margin_s))
            if _is_directory_bucket(request.bucket):
                lifetime = min(lifetime, timing.directory_session_s)
            if lifetime < timing.min_presign_s:
                return _Signed(None, now, access_key)
            text = await client.generate_presigned_url(
                request.operation, Params={**params, **self._payer}, ExpiresIn=lifetime
            )
        except Exception as exc:
            if boto.is_no_credentials(exc):
                raise translate_write_error(exc, request.bucket, request.key) from exc
            logger.debug("presigning %s failed (%r): botocore sends it", request.what, exc)
            return _Signed(None, now, None)
        signed_names = _signed_header_names(text)
        if self._proxy_config.proxy_url_for(text) or not signed_names <= {
            "host",
            "x-amz-request-payer",
            *headers,
        }:
            return _Signed(None, now, access_key)  # a proxy, or headers we would not send
        return _Signed(self._with_payer(Url.parse(text)), now, access_key)

    async def _native_request_url(
        self,
        method: str,
        bucket: str,
        key: str,
        headers: dict[str, str] | None,
        query: tuple[tuple[str, str], ...] = (),
        *,
        signed_headers: dict[str, str] | None = None,
    ) -> _Signed | None:
        """A URL for one ``method`` request signed natively (never cached), with ``headers``
        signed and carried by the URL (sent with it), and ``signed_headers`` signed but sent by
        the caller; None when the store or the bucket is not plain. It lives as long as the
        credentials allow (refreshed first when they are about to expire, as ``_native_url``
        does)."""
        if self._plain is None:
            return None
        now = time.monotonic()
        timing = self.timing
        plain = await self._current_plain(force=False, bucket=bucket, key=key)
        lifetime = self._lifetime()
        if lifetime is not None and lifetime < timing.min_presign_s:
            plain = await self._current_plain(force=True, bucket=bucket, key=key)
            lifetime = self._lifetime()
        if plain is None:
            return None
        expires = timing.expires_s if lifetime is None else max(1, lifetime)
        text = plain.request_url(
            method,
            bucket,
            key,
            now=datetime.datetime.now(datetime.UTC),
            expires=expires,
            payer=self.config.request_payer,
            query=query,
            headers={**(headers or {}), **(signed_headers or {})},
        )
        if text is None:
            return None
        access_key = plain.credentials.access_key if plain.credentials else None
        return _Signed(self._with_payer(Url.parse(text), headers), now, access_key, native=True)

    async def _write_botocore(
        self, request: WriteRequest, body: Sequence[memoryview]
    ) -> WriteReply:
        """``send_write`` as a botocore call (its body joined into one buffer)."""
        _, _, _, params = request.shape()
        params = {**params, **self._payer}
        if request.operation in ("put_object", "upload_part"):
            params["Body"] = b"".join(body)
        elif request.operation == "complete_multipart_upload":
            params["MultipartUpload"] = {
                "Parts": [
                    {"ETag": etag, "PartNumber": n, "ChecksumCRC64NVME": _crc_to_header(crc)}
                    for n, etag, crc in request.parts
                ]
            }
        try:
            client = await self.botocore_client()
            response = await getattr(client, request.operation)(**params)
        except Exception as exc:
            raise translate_write_error(
                exc, request.bucket, request.key, part=request.part_number
            ) from exc
        size = response.get("ContentLength")
        given = {
            header: str(response[key])
            for key, header in _BOTOCORE_CHECKSUMS.items()
            if isinstance(response.get(key), str)
        }
        if isinstance(response.get("ETag"), str):
            given["etag"] = response["ETag"]
        full = _full_object_checksum(given)
        return WriteReply(
            etag=response.get("ETag"),
            upload_id=response.get("UploadId"),
            checksum=None if full is None else full[1],
            size=size if isinstance(size, int) else None,
            checksum_algorithm=None if full is None else full[0],
            checksum_headers=given if request.operation == "head_object" else {},
        )

    async def get_object_etag(self, bucket: str, key: str) -> tuple[bytes, str | None] | None:
        """A small object's bytes and the ETag they had (one version: a longer object's rest is
        pinned to its first response's ETag); None if there is no such object. Retried as a
        whole (``retrying``)."""

        async def attempt_once(attempt: int) -> tuple[bytes, str | None] | None:
            try:
                fast = await self._get_fast(bucket, key, 0, whole=True)
            except NotFoundError:
                return None
            if fast is not None:
                data, headers, _ = fast
                return data, headers.get("etag")
            body = None
            try:
                client = await self.botocore_client()
                response = await client.get_object(Bucket=bucket, Key=key, **self._payer)
                body = response["Body"]
                got: bytes = await body.read()
            except Exception as exc:
                error = translate_error(exc, bucket, key)
                if isinstance(error, NotFoundError) and not isinstance(error, NoSuchBucketError):
                    return None
                raise error from exc
            finally:
                if body is not None:
                    body.close()
            return got, response.get("ETag")

        return await self.retrying(attempt_once, what=f"s3://{bucket}/{key}")


class WholeRead(NamedTuple):
    """An object read whole by one GET (``S3Store.get_whole``)."""

    data: bytes
    headers: dict[str, str]
    """The response's headers (lower-case names) when the GET asked for the object's checksum
    (``x-amz-checksum-*``, ``x-amz-checksum-type``, ``etag``); else empty."""
    etag: str | None
    damaged: bool = False
    """botocore checked the body against the checksum the store sent, and it differed
    (``data`` is then empty)."""


class WriteRequest(NamedTuple):
    """One request of a save, whichever path sends it (``S3Store.send_write``).

    ``operation`` is botocore's name: ``put_object``, ``create_multipart_upload``,
    ``upload_part``, ``complete_multipart_upload``, ``abort_multipart_upload``,
    ``delete_object`` or ``head_object``. ``checksum`` is the CRC64NVME of the body
    (``put_object``, ``upload_part``) or of the whole object (``complete_multipart_upload``),
    sent for S3 to verify on receipt; a multipart upload is created as a FULL_OBJECT CRC64NVME
    one. ``if_none_match`` (``If-None-Match: *``) and ``if_match`` (``If-Match: <etag>``) make a
    ``put_object`` or ``complete_multipart_upload`` conditional."""

    operation: str
    bucket: str
    key: str
    upload_id: str | None = None
    part_number: int | None = None
    checksum: int | None = None
    if_none_match: bool = False
    if_match: str | None = None
    parts: tuple[tuple[int, str, int], ...] = ()
    """``complete_multipart_upload``: (part number, ETag, CRC64NVME) of every part, in order."""

    @property
    def what(self) -> str:
        """The request, named for messages."""
        part = f" part {self.part_number}" if self.part_number is not None else ""
        return f"{self.operation}{part} of s3://{self.bucket}/{self.key}"

    def shape(self) -> tuple[str, tuple[tuple[str, str], ...], dict[str, str], dict[str, Any]]:
        """(HTTP method, the operation's query parameters, the headers to sign and send, the
        same request as botocore parameters)."""
        op = self.operation
        params: dict[str, Any] = {"Bucket": self.bucket, "Key": self.key}
        headers: dict[str, str] = {}
        query: tuple[tuple[str, str], ...] = ()
        if op in ("upload_part", "complete_multipart_upload", "abort_multipart_upload"):
            if self.upload_id is None:
                raise ValueError(f"{op} needs an upload id")
            params["UploadId"] = self.upload_id
            query = (("uploadId", self.upload_id),)
        if op == "upload_part":
            if self.part_number is None:
                raise ValueError("upload_part needs a part number")
            params["PartNumber"] = self.part_number
            query = (("partNumber", str(self.part_number)), *query)
        if self.checksum is not None:
            headers[_CRC_HEADER] = _crc_to_header(self.checksum)
            params["ChecksumCRC64NVME"] = headers[_CRC_HEADER]
            if op in ("put_object", "upload_part"):
                # The algorithm named too, as AWS's SDKs send it: S3 needs only the value, but
                # some S3-compatible stores (moto among them) keep a checksum only when named.
                headers["x-amz-sdk-checksum-algorithm"] = _CRC_ALGORITHM
                params["ChecksumAlgorithm"] = _CRC_ALGORITHM
        if op == "create_multipart_upload":
            query = (("uploads", ""),)
            headers["x-amz-checksum-algorithm"] = _CRC_ALGORITHM
            headers["x-amz-checksum-type"] = "FULL_OBJECT"
            params.update(ChecksumAlgorithm=_CRC_ALGORITHM, ChecksumType="FULL_OBJECT")
        elif op == "complete_multipart_upload":
            headers["x-amz-checksum-type"] = "FULL_OBJECT"
            params["ChecksumType"] = "FULL_OBJECT"
        elif op == "head_object":
            headers["x-amz-checksum-mode"] = "ENABLED"
            params["ChecksumMode"] = "ENABLED"
        if self.if_none_match:
            headers["if-none-match"] = "*"
            params["IfNoneMatch"] = "*"
        elif self.if_match is not None:
            headers["if-match"] = self.if_match
            params["IfMatch"] = self.if_match
        method = _WRITE_METHODS[op]
        return method, query, headers, params

    def xml(self) -> memoryview:
        """The body of a ``complete_multipart_upload``: every part's number, ETag and CRC."""
        parts = "".join(
            f"<Part><ChecksumCRC64NVME>{_crc_to_header(crc)}</ChecksumCRC64NVME>"
            f"<ETag>{_xml_escape(etag)}</ETag><PartNumber>{n}</PartNumber></Part>"
            for n, etag, crc in self.parts
        )
        text = (
            '<CompleteMultipartUpload xmlns="http://s3.amazonaws.com/doc/2006-03-01/">'
            f"{parts}</CompleteMultipartUpload>"
        )
        return memoryview(text.encode("utf-8"))


class WriteReply(NamedTuple):
    """What a save's request returned: the ETag (an object's, a part's), the upload id
    (``create_multipart_upload``), the full-object checksum and size the store reports
    (``head_object``)."""

    etag: str | None = None
    upload_id: str | None = None
    checksum: int | None = None
    """The object's full-object checksum (``head_object`` with ``x-amz-checksum-mode``),
    ``checksum_algorithm`` its algorithm (``_checksum.full_object_checksum``)."""
    size: int | None = None
    checksum_algorithm: str | None = None
    checksum_headers: Mapping[str, str] = {}  # (one shared default, never written)
    """``head_object``: every checksum header of the reply (``x-amz-checksum-*``, the type) and
    its ``etag``, lower-case names, for checks beyond the combinable CRCs (``aiodcp verify``:
    ``_checksum.full_object_checksum(..., WHOLE_READ_HEADERS)``, ``composite_checksum``)."""


_WRITE_METHODS = {
    "put_object": "PUT",
    "upload_part": "PUT",
    "create_multipart_upload": "POST",
    "complete_multipart_upload": "POST",
    "abort_multipart_upload": "DELETE",
    "delete_object": "DELETE",
    "head_object": "HEAD",
}

_XML_TEXT_RE = re.compile(r"<(UploadId|ETag)>([^<]{0,2048})</\1>")


def _xml_unescape(text: str) -> str:
    """S3's XML text as it was (``html`` is imported only for text that has an entity: a
    HEAD's reply on the load path has none)."""
    if "&" not in text:
        return text
    import html

    return html.unescape(text)


def _xml_escape(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def _write_reply(request: WriteRequest, headers: dict[str, str], body: bytes) -> WriteReply:
    """A fast-path reply in the form ``send_write`` returns (ETag and upload id from the
    headers, or the XML body for the multipart calls)."""
    found = {m.group(1): _xml_unescape(m.group(2)) for m in _XML_TEXT_RE.finditer(body.decode())}
    head = request.operation == "head_object"
    full = _full_object_checksum(headers) if head else None
    given = (
        {k: v for k, v in headers.items() if k.startswith("x-amz-checksum-") or k == "etag"}
        if head
        else {}
    )
    length = headers.get("content-length", "")
    return WriteReply(
        etag=found.get("ETag", headers.get("etag")),
        upload_id=found.get("UploadId"),
        checksum=None if full is None else full[1],
        size=int(length) if head and length.isdigit() else None,
        checksum_algorithm=None if full is None else full[0],
        checksum_headers=given,
    )


_BOTOCORE_CHECKSUMS = {
    "ChecksumCRC64NVME": "x-amz-checksum-crc64nvme",
    "ChecksumCRC32C": "x-amz-checksum-crc32c",
    "ChecksumCRC32": "x-amz-checksum-crc32",
    "ChecksumSHA256": "x-amz-checksum-sha256",
    "ChecksumSHA1": "x-amz-checksum-sha1",
    "ChecksumType": "x-amz-checksum-type",
}
"""botocore's names of a response's checksum fields -> the headers they come from."""


def _signed_header_names(url: str) -> set[str]:
    """The header names a presigned URL's ``X-Amz-SignedHeaders`` lists."""
    from urllib.parse import parse_qs, urlsplit

    values = parse_qs(urlsplit(url).query).get("X-Amz-SignedHeaders", [""])
    return {name for name in values[0].split(";") if name}


_WRITE_CLIENT_ERRORS_RETRYABLE = frozenset({"BadDigest", "XAmzContentChecksumMismatch"})
"""Codes of a body that reached the store different from what was sent (its checksum did not
match): sent again, from the same memory."""


def classify_write(
    status: int, code: str, message: str, where: str, ctx: dict[str, Any]
) -> StorageError:
    """The aiodcp error for an error reply to a save's request (``classify``'s counterpart
    for writes): conditional writes refused (412, 409) are ``ConditionalWriteError``, which the
    commit names; a checksum mismatch on receipt is retried."""
    detail = f"{code or status}: {message}"
    ctx = {**ctx, "code": code or None}
    if code == "NoSuchBucket":
        return NoSuchBucketError(
            f"bucket {ctx['bucket']!r} does not exist (while writing {where}); check the "
            f"bucket name and the endpoint/region ({detail})",
            status=status,
            retryable=False,
            **ctx,
        )
    if code in _STALE_CREDENTIAL_CODES:
        return AccessDeniedError(
            f"the store refused the credentials used to write {where} as expired ({detail}); "
            "refresh the credentials and save again",
            status=status,
            retryable=False,
            **ctx,
        )
    if code in ("PreconditionFailed", "ConditionalRequestConflict") or status in (409, 412):
        return ConditionalWriteError(
            f"the store refused the conditional write of {where} ({detail})",
            status=status,
            retryable=False,
            **ctx,
        )
    if code == "NoSuchUpload":
        return StorageError(
            f"the multipart upload of {where} no longer exists: another process or a lifecycle "
            f"rule aborted it; save again ({detail})",
            status=status,
            retryable=False,
            **ctx,
        )
    if code in ("AccessDenied", "Forbidden", "InvalidAccessKeyId", "SignatureDoesNotMatch") or (
        status == 403
    ):
        return AccessDeniedError(
            f"access denied writing {where}; check the credentials and that the bucket policy "
            f"allows s3:PutObject and s3:AbortMultipartUpload ({detail})",
            status=status,
            retryable=False,
            **ctx,
        )
    if status == 404 or code in ("NoSuchKey", "NotFound"):
        return NotFoundError(
            f"{where} does not exist ({detail})", status=status, retryable=False, **ctx
        )
    if code in _WRITE_CLIENT_ERRORS_RETRYABLE:
        return TransferError(
            f"writing {where}: the store received bytes whose CRC64NVME differs from the one "
            f"sent (damaged in transit); they are sent again ({detail})",
            status=status,
            retryable=True,
            **ctx,
        )
    retryable = status in _RETRYABLE_STATUS or code in _RETRYABLE_CODES
    if 400 <= status < 500 and not retryable:
        return StorageError(
            f"the store refused writing {where}: {detail}", status=status, retryable=False, **ctx
        )
    return TransferError(
        f"writing {where} failed: {detail}", status=status, retryable=retryable, **ctx
    )


def translate_write_error(
    exc: BaseException,
    bucket: str,
    key: str,
    byte_range: tuple[int, int] | None = None,
    *,
    part: int | None = None,
) -> AiodcpError:
    """``translate_error`` for a save's requests: error replies through ``classify_write``,
    connection failures as retryable ``TransferError`` (worded for writing); ``part``: the part
    of a multipart upload it was, named in the message."""
    if isinstance(exc, AiodcpError):
        return exc
    where = _where(bucket, key, byte_range) + (f" (part {part})" if part is not None else "")
    ctx: dict[str, Any] = {"bucket": bucket, "key": key, "byte_range": byte_range}
    if part is not None:
        ctx["part"] = part
    boto = sys.modules.get("aiodcp._botostore")
    facts: tuple[int, str, str] | None = None
    if isinstance(exc, HttpError):
        facts = (exc.status, exc.code, exc.message)
    elif boto is not None:
        if boto.is_no_credentials(exc):
            return NoCredentialsError(
                f"no AWS credentials found to write {where}: set AWS_ACCESS_KEY_ID/"
                "AWS_SECRET_ACCESS_KEY or a profile",
                retryable=False,
                **ctx,
            )
        facts = boto.error_facts(exc)
    if facts is not None:
        return classify_write(*facts, where, ctx)
    transient = isinstance(exc, (asyncio.TimeoutError, ConnectionError))
    if boto is not None:
        transient = (transient or boto.is_transient(exc)) and not boto.is_ssl_error(exc)
    if transient:
        return TransferError(
            f"writing {where} failed: {type(exc).__name__}: {exc}", retryable=True, **ctx
        )
    return StorageError(
        f"writing {where} failed: {type(exc).__name__}: {exc}", retryable=False, **ctx
    )


class PresignTiming(NamedTuple):
    """How long presigned URLs live and are reused. One object, so tests that scale an hour of
    credentials down to seconds replace ``PRESIGN_TIMING`` (or pass ``presign_timing``)."""

    expires_s: int = 3600
    """Seconds a URL is valid for, at most."""
    reuse_s: float = 1800.0
    """A presigned URL is used for half the life it has left (at most this long): credentials
    rotate, clocks drift, and a request may wait in a queue before it is sent."""
    credential_margin_s: float = 60.0
    """Seconds: a URL expires at least this long before the temporary credentials that signed
    it."""
    min_presign_s: float = 10
    """Seconds: credentials with less life left than this sign no URL (botocore, which
    refreshes them before each request, sends the GET instead)."""
    directory_session_s: int = 120
    """Seconds: the longest a URL for an S3 Express directory bucket lives. Its session
    credentials (CreateSession) last 5 minutes and their expiry is not visible to us."""
    advisory_refresh_s: float = 900.0
    """Seconds before temporary credentials expire from which the plain case refreshes them
    in the background (botocore's advisory window, 15 min)."""
    mandatory_refresh_s: float = 600.0
    """Seconds before they expire from which requests wait for refreshed credentials
    (botocore's mandatory window, 10 min)."""


PRESIGN_TIMING = PresignTiming()
"""The timing a store uses unless it is given one (read when the store is made)."""
CHECKSUM_MODE = "x-amz-checksum-mode"
"""The request header that asks S3 for an object's checksum (value ``ENABLED``): a GET without
a Range (``get_whole``) or a HEAD gets the object's full-object checksum, if it has one."""
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


class _Signed(NamedTuple):
    """A presigned URL (None: use botocore), when to stop reusing it, the access key that
    signed it (None for unsigned requests), and whether aiodcp signed it (``_native``) rather
    than botocore."""

    url: Url | None
    reuse_until: float
    access_key: str | None
    native: bool = False


def _botostore() -> Any:
    """``_botostore``, imported by now (``S3Store.botocore_client`` did, in a thread)."""
    return sys.modules["aiodcp._botostore"]


class _BufferSink:
    """A ``RangeSink`` collecting bytes ``[start, start + size)`` (or fewer: the object may be
    shorter) in buffers allocated as the body arrives, each as large as all before it (64 KiB
    first), none past ``size``: a span asked for generously costs only what came. As a
    ``WholeSink`` (``size`` 0 until ``expect``) it holds a whole object, allocated the same
    way, never past the object's ``Content-Length``."""

    __slots__ = ("_chunks", "_size", "_used", "etag", "start")

    def __init__(self, start: int, size: int) -> None:
        self.start = start
        self._size = size
        self._chunks: list[bytearray] = []
        self._used = 0  # bytes written into the last chunk
        self.etag: str | None = None

    def expect(self, size: int) -> None:
        self._size = size

    def begin(self, etag: str | None) -> None:
        self.etag = etag

    def buffer(self, pos: int) -> memoryview:
        # The body is written in order: ``pos`` is always where the last write ended.
        if not self._chunks or self._used == len(self._chunks[-1]):
            offset = pos - self.start
            self._chunks.append(bytearray(min(max(64 * 1024, offset), self._size - offset)))
            self._used = 0
        return memoryview(self._chunks[-1])[self._used :]

    def written(self, pos: int, n: int) -> None:
        self._used += n

    def data(self) -> bytes:
        """The bytes received, joined."""
        if self._chunks:
            del self._chunks[-1][self._used :]
        return b"".join(self._chunks)


def _object_size(headers: dict[str, str]) -> int | None:
    """The object's size from a fast-path response: ``Content-Range``'s total, or (the 200 of
    a whole object, see ``RangeClient.fetch``) its ``Content-Length``."""
    match = _CONTENT_RANGE_RE.match(headers.get("content-range", "").strip())
    if match is not None:
        return int(match.group(3)) if match.group(3) != "*" else None
    length = headers.get("content-length", "")
    return int(length) if length.isdigit() else None


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


def _is_directory_bucket(bucket: str) -> bool:
    """S3 Express One Zone directory buckets are named ``name--zone-id--x-s3``."""
    return bucket.endswith("--x-s3")


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
    """The fast path's context: botocore's ``verify`` setting (False, True or a CA bundle),
    with the CA bundle botocore would use (``_native.ca_file``)."""
    if verify is False:
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        return context
    return ssl.create_default_context(cafile=ca_file(verify))


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
